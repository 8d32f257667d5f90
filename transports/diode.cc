#include "transports/diode.h"

#include <isa-l/erasure_code.h>

#include <algorithm>
#include <cassert>
#include <cstring>
#include <iterator>
#include <map>
#include <utility>

namespace relay::transports {
namespace {

// Wire constants; see docs/wire-format.md, "Diode datagrams".
constexpr char kMagic[4] = {'R', 'L', 'Y', 'D'};
constexpr std::uint8_t kVersion = 1;
constexpr std::uint8_t kTypeData = 1;
constexpr std::uint8_t kTypeHeartbeat = 2;
constexpr std::size_t kDataHeaderBytes = 44;
constexpr std::size_t kHeartbeatBytes = 32;
constexpr std::uint32_t kMaxShardBytes = 9000;
constexpr std::uint32_t kMaxShards = 255;  // k + m; GF(2^8) Cauchy rows must stay distinct
constexpr std::uint64_t kMaxMessageBytes = std::uint64_t{1} << 30;
constexpr std::size_t kMaxIncompleteListed = 100000;
// Bookkeeping charged per stored block on top of its payload bytes, so that a flood of tiny
// shards cannot hold much more memory than max_pending_bytes says.
constexpr std::size_t kBlockOverheadBytes = 256;

void PutU16(std::string* out, std::uint16_t v) {
  out->push_back(static_cast<char>(v >> 8));
  out->push_back(static_cast<char>(v & 0xff));
}
void PutU32(std::string* out, std::uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8)
    out->push_back(static_cast<char>((v >> shift) & 0xff));
}
void PutU64(std::string* out, std::uint64_t v) {
  for (int shift = 56; shift >= 0; shift -= 8)
    out->push_back(static_cast<char>((v >> shift) & 0xff));
}
std::uint64_t GetBE(std::string_view in, std::size_t offset, std::size_t bytes) {
  std::uint64_t v = 0;
  for (std::size_t i = 0; i < bytes; ++i) v = (v << 8) | static_cast<unsigned char>(in[offset + i]);
  return v;
}

std::string CommonHeader(std::uint8_t type) {
  std::string out(kMagic, sizeof kMagic);
  out.push_back(static_cast<char>(kVersion));
  out.push_back(static_cast<char>(type));
  PutU16(&out, 0);
  return out;
}

std::uint64_t CeilDiv(std::uint64_t a, std::uint64_t b) { return (a + b - 1) / b; }

// The (k+m) x k Cauchy encode matrix: identity on top, parity rows below. Row r >= k is
// 1/(r xor j), independent of m, so every block with the same k shares its parity rows.
std::vector<unsigned char> EncodeMatrix(int k, int m) {
  std::vector<unsigned char> a(static_cast<std::size_t>((k + m) * k));
  gf_gen_cauchy1_matrix(a.data(), k + m, k);
  return a;
}

struct DataHeader {
  std::uint64_t stream_id = 0;
  std::uint64_t message_id = 0;
  std::uint32_t message_len = 0;
  std::uint32_t block_index = 0;
  std::uint32_t block_count = 0;
  std::uint16_t k = 0;
  std::uint16_t m = 0;
  std::uint16_t shard_index = 0;
  std::uint16_t shard_bytes = 0;
  std::string_view payload;
};

// The k of the last block of a message whose full blocks have `full_k` data shards.
std::uint64_t LastBlockK(std::uint64_t message_len, std::uint64_t block_count, std::uint64_t full_k,
                         std::uint64_t shard_bytes) {
  const std::uint64_t before = (block_count - 1) * full_k * shard_bytes;
  if (message_len <= before) return 0;  // inconsistent: caller reports it
  return std::max<std::uint64_t>(1, CeilDiv(message_len - before, shard_bytes));
}

// Stateless checks of a data datagram's header (the common header is already checked).
Status CheckDataHeader(const DataHeader& h) {
  if (h.message_id == 0) return Status::Error("message_id 0 (ids start at 1)");
  if (h.k == 0) return Status::Error("k 0 (at least one data shard)");
  if (h.m == 0) return Status::Error("m 0 (at least one parity shard)");
  if (std::uint32_t{h.k} + h.m > kMaxShards) {
    return Status::Error("k + m = " + std::to_string(h.k + h.m) + " over " +
                         std::to_string(kMaxShards));
  }
  if (h.shard_index >= std::uint32_t{h.k} + h.m) {
    return Status::Error("shard_index " + std::to_string(h.shard_index) +
                         " not below k + m = " + std::to_string(h.k + h.m));
  }
  if (h.shard_bytes == 0) return Status::Error("shard_bytes 0");
  if (h.shard_bytes > kMaxShardBytes) {
    return Status::Error("shard_bytes " + std::to_string(h.shard_bytes) + " over " +
                         std::to_string(kMaxShardBytes));
  }
  if (h.block_count == 0) return Status::Error("block_count 0");
  if (h.block_index >= h.block_count) {
    return Status::Error("block_index " + std::to_string(h.block_index) +
                         " not below block_count " + std::to_string(h.block_count));
  }
  if (h.message_len > kMaxMessageBytes) {
    return Status::Error("message_len " + std::to_string(h.message_len) + " over 1 GiB");
  }
  const std::uint64_t len = h.message_len, count = h.block_count, k = h.k, s = h.shard_bytes;
  bool consistent;
  if (h.block_index + 1 < h.block_count) {
    // A full block: the message fills block_count - 1 blocks of this k and part of one more.
    consistent = len > (count - 1) * k * s && len <= count * k * s;
  } else if (count == 1) {
    consistent = k == std::max<std::uint64_t>(1, CeilDiv(len, s));
  } else {
    // The last of several blocks; the full blocks' k (>= this k, <= 255 - m) is not known here.
    consistent = len > (count - 1) * k * s + (k - 1) * s &&
                 len <= (count - 1) * (kMaxShards - h.m) * s + k * s;
  }
  if (!consistent) {
    return Status::Error("message_len " + std::to_string(len) + " inconsistent with block_count " +
                         std::to_string(count) + ", block_index " + std::to_string(h.block_index) +
                         ", k " + std::to_string(k) + " and shard_bytes " + std::to_string(s));
  }
  return Status::Ok();
}

// Completed message ids of one stream as disjoint, non-adjacent inclusive ranges, at most a
// given number of them: each message lost for good leaves a gap, and datagrams forged on the
// diode's network can complete made-up ids anywhere. Beyond the limit the lowest range (other
// than the one just changed) is forgotten: its ids are no longer "completed" (a late duplicate of
// one may be delivered again; frames are de-duplicated downstream), and ids up to its end are
// no longer counted as missing. Forgetting never marks an id as done, so forged ids cannot make
// the decoder refuse real ones.
class IdRanges {
 public:
  bool Contains(std::uint64_t id) const {
    auto it = ranges_.upper_bound(id);
    if (it == ranges_.begin()) return false;
    --it;
    return id <= it->second;
  }
  void Insert(std::uint64_t id, std::size_t max_ranges) {
    assert(!Contains(id));
    auto next = ranges_.upper_bound(id);
    std::uint64_t first = id, last = id;
    if (next != ranges_.begin()) {
      auto prev = std::prev(next);
      if (prev->second + 1 == id) {
        first = prev->first;
        ranges_.erase(prev);
      }
    }
    if (next != ranges_.end() && next->first == id + 1) {
      last = next->second;
      ranges_.erase(next);
    }
    ranges_[first] = last;
    if (ranges_.size() > max_ranges) {
      auto victim = ranges_.begin();
      if (victim->first == first) ++victim;  // keep the range just changed
      forgotten_through_ = std::max(forgotten_through_, victim->second);
      ranges_.erase(victim);
    }
  }
  // How many ids in (forgotten, through] are not contained.
  std::uint64_t CountMissing(std::uint64_t through) const {
    if (through <= forgotten_through_) return 0;
    std::uint64_t contained = 0;
    for (const auto& [first, last] : ranges_) {
      if (first > through) break;
      if (last <= forgotten_through_) continue;
      contained += std::min(last, through) - std::max(first, forgotten_through_ + 1) + 1;
    }
    return through - forgotten_through_ - contained;
  }
  // Ids in (forgotten, through] not contained, at most `cap` of them.
  std::vector<std::uint64_t> Missing(std::uint64_t through, std::size_t cap) const {
    std::vector<std::uint64_t> out;
    if (through <= forgotten_through_) return out;
    std::uint64_t next = forgotten_through_ + 1;  // smallest id not classified yet; <= through
    for (const auto& [first, last] : ranges_) {
      if (last < next) continue;
      if (first > through) break;
      for (std::uint64_t id = next; id < first && out.size() < cap; ++id) out.push_back(id);
      if (out.size() >= cap || last >= through) return out;
      next = last + 1;
    }
    // Stop at `through` before incrementing, so through = 2^64 - 1 cannot wrap.
    for (std::uint64_t id = next; out.size() < cap; ++id) {
      out.push_back(id);
      if (id == through) break;
    }
    return out;
  }

 private:
  std::map<std::uint64_t, std::uint64_t> ranges_;  // first -> last
  std::uint64_t forgotten_through_ = 0;            // the end of the highest range forgotten
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Encoder

struct DiodeEncoder::Impl {
  std::uint64_t stream_id;
  DiodeParams params;
  std::uint64_t last_message_id = 0;
  std::uint64_t datagrams_sent = 0;
  std::map<std::pair<int, int>, std::vector<unsigned char>> tables;  // (k, m) -> ISA-L tables

  std::vector<unsigned char>& Tables(int k, int m) {
    auto [it, inserted] = tables.try_emplace({k, m});
    if (inserted) {
      auto a = EncodeMatrix(k, m);
      it->second.resize(static_cast<std::size_t>(32 * k * m));
      ec_init_tables(k, m, &a[static_cast<std::size_t>(k * k)], it->second.data());
    }
    return it->second;
  }
};

DiodeEncoder::DiodeEncoder(std::uint64_t stream_id, DiodeParams params)
    : impl_(std::make_unique<Impl>()) {
  // Parameters come from validated configuration; anything else is a programming error.
  assert(params.shard_bytes >= 1 && params.shard_bytes <= kMaxShardBytes);
  assert(params.data_shards >= 1 && params.parity_shards >= 1);
  assert(std::uint32_t{params.data_shards} + params.parity_shards <= kMaxShards);
  assert(params.interleave >= 1);
  impl_->stream_id = stream_id;
  impl_->params = params;
}

DiodeEncoder::~DiodeEncoder() = default;

std::uint64_t DiodeEncoder::Encode(std::string_view message, std::vector<std::string>* out) {
  assert(message.size() <= kMaxMessageBytes);
  Impl& im = *impl_;
  const std::uint64_t id = ++im.last_message_id;
  const std::uint64_t len = message.size();
  // A message shorter than one shard travels in a single shard of its own length (at least 1
  // byte), so small messages do not pay for a full-size shard m+1 times.
  const std::uint64_t s =
      len >= im.params.shard_bytes ? im.params.shard_bytes : std::max<std::uint64_t>(1, len);
  const std::uint64_t full_k = im.params.data_shards;
  const int m = im.params.parity_shards;
  const std::uint64_t block_bytes = full_k * s;
  const std::uint64_t block_count = len == 0 ? 1 : CeilDiv(len, block_bytes);

  struct Block {
    int k;
    std::vector<unsigned char> shards;  // (k + m) * s bytes: data shards, then parity
  };
  std::vector<Block> group;
  for (std::uint64_t group_start = 0; group_start < block_count;
       group_start += im.params.interleave) {
    const std::uint64_t group_end =
        std::min<std::uint64_t>(block_count, group_start + im.params.interleave);
    group.clear();
    for (std::uint64_t b = group_start; b < group_end; ++b) {
      const std::uint64_t offset = b * block_bytes;
      const std::uint64_t bytes = std::min(block_bytes, len - offset);
      Block block;
      // The last block carries only as many data shards as it needs.
      block.k = static_cast<int>(std::max<std::uint64_t>(1, CeilDiv(bytes, s)));
      block.shards.assign(static_cast<std::size_t>(block.k + m) * s, 0);
      if (bytes > 0) std::memcpy(block.shards.data(), message.data() + offset, bytes);
      std::vector<unsigned char*> data(static_cast<std::size_t>(block.k)),
          parity(static_cast<std::size_t>(m));
      for (int i = 0; i < block.k; ++i) data[static_cast<std::size_t>(i)] = &block.shards[i * s];
      for (int i = 0; i < m; ++i) {
        parity[static_cast<std::size_t>(i)] = &block.shards[(block.k + i) * s];
      }
      auto& tables = im.Tables(block.k, m);
      ec_encode_data(static_cast<int>(s), block.k, m, tables.data(), data.data(), parity.data());
      group.push_back(std::move(block));
    }
    // Interleave: shard 0 of every block of the group, then shard 1 of each, and so on, so
    // consecutive datagrams belong to different blocks.
    int max_shards = 0;
    for (const Block& block : group) max_shards = std::max(max_shards, block.k + m);
    for (int shard = 0; shard < max_shards; ++shard) {
      for (std::size_t g = 0; g < group.size(); ++g) {
        const Block& block = group[g];
        if (shard >= block.k + m) continue;
        std::string d = CommonHeader(kTypeData);
        d.reserve(kDataHeaderBytes + s);
        PutU64(&d, im.stream_id);
        PutU64(&d, id);
        PutU32(&d, static_cast<std::uint32_t>(len));
        PutU32(&d, static_cast<std::uint32_t>(group_start + g));
        PutU32(&d, static_cast<std::uint32_t>(block_count));
        PutU16(&d, static_cast<std::uint16_t>(block.k));
        PutU16(&d, static_cast<std::uint16_t>(m));
        PutU16(&d, static_cast<std::uint16_t>(shard));
        PutU16(&d, static_cast<std::uint16_t>(s));
        assert(d.size() == kDataHeaderBytes);
        d.append(reinterpret_cast<const char*>(&block.shards[shard * s]), s);
        out->push_back(std::move(d));
        ++im.datagrams_sent;
      }
    }
  }
  return id;
}

std::string DiodeEncoder::Heartbeat() const {
  std::string d = CommonHeader(kTypeHeartbeat);
  PutU64(&d, impl_->stream_id);
  PutU64(&d, impl_->last_message_id);
  PutU64(&d, impl_->datagrams_sent);
  assert(d.size() == kHeartbeatBytes);
  return d;
}

std::uint64_t DiodeEncoder::last_message_id() const { return impl_->last_message_id; }

// ---------------------------------------------------------------------------------------------
// Decoder

struct DiodeDecoder::Impl {
  struct Block {
    int k = 0;
    int m = 0;
    std::vector<std::string> shards;  // k + m entries; empty = not received
    int present = 0;
    std::string data;  // k * shard_bytes once decoded
    bool decoded = false;
  };
  struct Pending {
    std::uint64_t arrival = 0;  // order of the first datagram, for eviction
    std::uint32_t message_len = 0;
    std::uint32_t block_count = 0;
    std::uint16_t shard_bytes = 0;
    std::uint16_t full_k = 0;  // k of the non-last blocks, once one was seen
    std::uint16_t last_k = 0;  // k of the last block, once seen
    std::uint32_t decoded_blocks = 0;
    std::size_t bytes = 0;  // charged against max_pending_bytes
    std::map<std::uint32_t, Block> blocks;
  };
  struct Stream {
    std::uint64_t last_active = 0;  // arrival counter of its latest datagram, for eviction
    std::uint64_t announced = 0;
    std::uint64_t completed_count = 0;
    std::uint64_t recovered_shards = 0;
    IdRanges completed;
    std::map<std::uint64_t, Pending> pending;
  };

  std::size_t max_pending_bytes;
  std::size_t max_streams;
  std::size_t max_completed_ranges;
  std::size_t pending_bytes = 0;
  std::uint64_t next_arrival = 0;
  std::uint64_t recovered_shards = 0;  // over every stream ever seen
  std::uint64_t streams_dropped = 0;
  std::map<std::uint64_t, Stream> streams;
  // Every pending message by arrival order: Evict takes the oldest without a scan.
  std::map<std::uint64_t, std::pair<std::uint64_t, std::uint64_t>> by_arrival;

  // The stream for a datagram (created if new, dropping the least recently active stream when
  // max_streams are held), marked active.
  Stream& Touch(std::uint64_t stream_id);
  void DropPending(Stream& stream, std::map<std::uint64_t, Pending>::iterator it);
  Status FeedData(const DataHeader& h, std::vector<Message>* out);
  // Cross-checks a datagram against what earlier datagrams of the same message said.
  static Status CheckAgainst(const DataHeader& h, const Pending& p);
  void DecodeBlock(Block* block, std::uint16_t shard_bytes, Stream* stream);
  void Evict(std::uint64_t keep_stream, std::uint64_t keep_message);
};

Status DiodeDecoder::Impl::CheckAgainst(const DataHeader& h, const Pending& p) {
  auto differs = [&](const char* field, std::uint64_t got, std::uint64_t earlier) {
    return Status::Error(std::string(field) + " " + std::to_string(got) +
                         " differs from earlier datagrams of message " +
                         std::to_string(h.message_id) + " (" + std::to_string(earlier) + ")");
  };
  if (h.message_len != p.message_len) return differs("message_len", h.message_len, p.message_len);
  if (h.block_count != p.block_count) return differs("block_count", h.block_count, p.block_count);
  if (h.shard_bytes != p.shard_bytes) return differs("shard_bytes", h.shard_bytes, p.shard_bytes);
  const bool last = h.block_index + 1 == h.block_count;
  if (!last && p.full_k != 0 && h.k != p.full_k) return differs("k", h.k, p.full_k);
  if (last && p.last_k != 0 && h.k != p.last_k) return differs("k", h.k, p.last_k);
  // Knowing both k's pins down the last block's size.
  const std::uint64_t full_k = last ? p.full_k : h.k;
  const std::uint64_t last_k = last ? h.k : p.last_k;
  if (full_k != 0 && last_k != 0 && h.block_count > 1 &&
      LastBlockK(h.message_len, h.block_count, full_k, h.shard_bytes) != last_k) {
    return Status::Error("k " + std::to_string(h.k) + " inconsistent with k " +
                         std::to_string(last ? full_k : last_k) +
                         " of earlier datagrams of message " + std::to_string(h.message_id));
  }
  if (auto it = p.blocks.find(h.block_index); it != p.blocks.end() && it->second.m != h.m) {
    return differs("m", h.m, static_cast<std::uint64_t>(it->second.m));
  }
  return Status::Ok();
}

void DiodeDecoder::Impl::DecodeBlock(Block* block, std::uint16_t shard_bytes, Stream* stream) {
  const int k = block->k;
  const std::size_t s = shard_bytes;
  const auto uk = static_cast<std::size_t>(k);
  block->data.assign(uk * s, '\0');
  std::vector<int> missing;
  for (int i = 0; i < k; ++i) {
    const std::string& shard = block->shards[static_cast<std::size_t>(i)];
    if (shard.empty()) {
      missing.push_back(i);
    } else {
      std::memcpy(&block->data[static_cast<std::size_t>(i) * s], shard.data(), s);
    }
  }
  if (!missing.empty()) {
    // Survivors: the present data rows, then parity rows, k in all. Their rows of the encode
    // matrix form B with survivors = B * data, so data row i = (row i of B^-1) * survivors.
    const auto a = EncodeMatrix(k, block->m);
    std::vector<unsigned char> b(uk * uk), inverse(uk * uk);
    std::vector<unsigned char*> sources;
    for (int row = 0; row < k + block->m && sources.size() < uk; ++row) {
      std::string& shard = block->shards[static_cast<std::size_t>(row)];
      if (shard.empty()) continue;
      std::memcpy(&b[sources.size() * uk], &a[static_cast<std::size_t>(row) * uk], uk);
      sources.push_back(reinterpret_cast<unsigned char*>(shard.data()));
    }
    assert(sources.size() == uk);
    // Every k x k submatrix of [I; Cauchy] is invertible, so this cannot fail.
    [[maybe_unused]] const int singular = gf_invert_matrix(b.data(), inverse.data(), k);
    assert(singular == 0);
    std::vector<unsigned char> rows(missing.size() * uk);
    std::vector<unsigned char*> outputs;
    for (std::size_t j = 0; j < missing.size(); ++j) {
      std::memcpy(&rows[j * uk], &inverse[static_cast<std::size_t>(missing[j]) * uk], uk);
      outputs.push_back(
          reinterpret_cast<unsigned char*>(&block->data[static_cast<std::size_t>(missing[j]) * s]));
    }
    const int nerrs = static_cast<int>(missing.size());
    std::vector<unsigned char> tables(32 * uk * missing.size());
    ec_init_tables(k, nerrs, rows.data(), tables.data());
    ec_encode_data(static_cast<int>(s), k, nerrs, tables.data(), sources.data(), outputs.data());
    stream->recovered_shards += missing.size();
    recovered_shards += missing.size();
  }
  block->shards.clear();
  block->shards.shrink_to_fit();
  block->decoded = true;
}

DiodeDecoder::Impl::Stream& DiodeDecoder::Impl::Touch(std::uint64_t stream_id) {
  auto it = streams.find(stream_id);
  if (it == streams.end()) {
    if (streams.size() >= max_streams) {
      auto victim = std::min_element(streams.begin(), streams.end(), [](auto& a, auto& b) {
        return a.second.last_active < b.second.last_active;
      });
      while (!victim->second.pending.empty()) {
        DropPending(victim->second, victim->second.pending.begin());
      }
      streams.erase(victim);
      ++streams_dropped;
    }
    it = streams.try_emplace(stream_id).first;
  }
  it->second.last_active = next_arrival++;
  return it->second;
}

void DiodeDecoder::Impl::DropPending(Stream& stream,
                                     std::map<std::uint64_t, Pending>::iterator it) {
  pending_bytes -= it->second.bytes;
  by_arrival.erase(it->second.arrival);
  stream.pending.erase(it);
}

void DiodeDecoder::Impl::Evict(std::uint64_t keep_stream, std::uint64_t keep_message) {
  // Oldest first; the message just fed goes last, and only if it alone exceeds the bound.
  while (pending_bytes > max_pending_bytes) {
    assert(!by_arrival.empty());
    auto victim = by_arrival.begin();
    if (victim->second == std::make_pair(keep_stream, keep_message) && by_arrival.size() > 1) {
      ++victim;
    }
    Stream& stream = streams.at(victim->second.first);
    DropPending(stream, stream.pending.find(victim->second.second));
  }
}

Status DiodeDecoder::Impl::FeedData(const DataHeader& h, std::vector<Message>* out) {
  auto stream_it = streams.find(h.stream_id);
  if (stream_it != streams.end()) {
    Stream& stream = stream_it->second;
    if (stream.completed.Contains(h.message_id)) {  // a late duplicate: the stream is alive
      stream.last_active = next_arrival++;
      return Status::Ok();
    }
    if (auto p = stream.pending.find(h.message_id); p != stream.pending.end()) {
      if (Status st = CheckAgainst(h, p->second); !st.ok()) return st;
    }
  }
  // Valid from here on: state may change.
  Stream& stream = Touch(h.stream_id);
  stream.announced = std::max(stream.announced, h.message_id);
  auto [pending_it, created] = stream.pending.try_emplace(h.message_id);
  Pending& p = pending_it->second;
  if (created) {
    p.arrival = next_arrival++;
    by_arrival.emplace(p.arrival, std::make_pair(h.stream_id, h.message_id));
    p.message_len = h.message_len;
    p.block_count = h.block_count;
    p.shard_bytes = h.shard_bytes;
  }
  if (h.block_index + 1 == h.block_count) {
    p.last_k = h.k;
  } else {
    p.full_k = h.k;
  }
  auto [block_it, new_block] = p.blocks.try_emplace(h.block_index);
  Block& block = block_it->second;
  if (new_block) {
    block.k = h.k;
    block.m = h.m;
    block.shards.resize(static_cast<std::size_t>(h.k + h.m));
    p.bytes += kBlockOverheadBytes;
    pending_bytes += kBlockOverheadBytes;
  }
  std::string* slot = block.decoded ? nullptr : &block.shards[h.shard_index];
  if (slot != nullptr && slot->empty()) {
    slot->assign(h.payload);
    ++block.present;
    p.bytes += h.shard_bytes;
    pending_bytes += h.shard_bytes;
    if (block.present == block.k) {
      const std::size_t before = static_cast<std::size_t>(block.present) * h.shard_bytes;
      DecodeBlock(&block, h.shard_bytes, &stream);
      p.bytes = p.bytes - before + block.data.size();
      pending_bytes = pending_bytes - before + block.data.size();
      ++p.decoded_blocks;
    }
  }
  if (p.decoded_blocks == p.block_count) {
    // Full blocks precede the last one; the last block's k may be smaller.
    Message message{h.stream_id, h.message_id, {}};
    message.bytes.reserve(p.message_len);
    for (auto& [index, decoded] : p.blocks) {
      const std::size_t want =
          std::min<std::size_t>(decoded.data.size(), p.message_len - message.bytes.size());
      message.bytes.append(decoded.data, 0, want);
    }
    assert(message.bytes.size() == p.message_len);
    DropPending(stream, pending_it);
    stream.completed.Insert(h.message_id, max_completed_ranges);
    ++stream.completed_count;
    out->push_back(std::move(message));
    return Status::Ok();
  }
  Evict(h.stream_id, h.message_id);
  return Status::Ok();
}

DiodeDecoder::DiodeDecoder(std::size_t max_pending_bytes, std::size_t max_streams,
                           std::size_t max_completed_ranges)
    : impl_(std::make_unique<Impl>()) {
  impl_->max_pending_bytes = max_pending_bytes;
  impl_->max_streams = std::max<std::size_t>(max_streams, 1);
  impl_->max_completed_ranges = std::max<std::size_t>(max_completed_ranges, 2);
}

DiodeDecoder::~DiodeDecoder() = default;

Status DiodeDecoder::Feed(std::string_view datagram, std::vector<Message>* out) {
  auto reject = [](const Status& st) { return st.Wrap("diode datagram rejected"); };
  if (datagram.size() < 4 || std::memcmp(datagram.data(), kMagic, 4) != 0) {
    return reject(Status::Error("bad magic (want \"RLYD\")"));
  }
  if (datagram.size() < 8) {
    return reject(Status::Error("truncated: " + std::to_string(datagram.size()) + " bytes"));
  }
  const auto version = static_cast<std::uint8_t>(datagram[4]);
  const auto type = static_cast<std::uint8_t>(datagram[5]);
  if (version != kVersion) {
    return reject(Status::Error("version " + std::to_string(version) + " (want 1)"));
  }
  if (type != kTypeData && type != kTypeHeartbeat) {
    return reject(Status::Error("type " + std::to_string(type) + " (want 1 data or 2 heartbeat)"));
  }
  if (const auto reserved = GetBE(datagram, 6, 2); reserved != 0) {
    return reject(Status::Error("reserved " + std::to_string(reserved) + " (want 0)"));
  }
  if (type == kTypeHeartbeat) {
    if (datagram.size() != kHeartbeatBytes) {
      return reject(Status::Error("heartbeat length " + std::to_string(datagram.size()) +
                                  " (want " + std::to_string(kHeartbeatBytes) + ")"));
    }
    Impl::Stream& stream = impl_->Touch(GetBE(datagram, 8, 8));
    stream.announced = std::max(stream.announced, GetBE(datagram, 16, 8));
    return Status::Ok();
  }
  if (datagram.size() < kDataHeaderBytes) {
    return reject(Status::Error("truncated: " + std::to_string(datagram.size()) +
                                " bytes, data header is " + std::to_string(kDataHeaderBytes)));
  }
  DataHeader h;
  h.stream_id = GetBE(datagram, 8, 8);
  h.message_id = GetBE(datagram, 16, 8);
  h.message_len = static_cast<std::uint32_t>(GetBE(datagram, 24, 4));
  h.block_index = static_cast<std::uint32_t>(GetBE(datagram, 28, 4));
  h.block_count = static_cast<std::uint32_t>(GetBE(datagram, 32, 4));
  h.k = static_cast<std::uint16_t>(GetBE(datagram, 36, 2));
  h.m = static_cast<std::uint16_t>(GetBE(datagram, 38, 2));
  h.shard_index = static_cast<std::uint16_t>(GetBE(datagram, 40, 2));
  h.shard_bytes = static_cast<std::uint16_t>(GetBE(datagram, 42, 2));
  h.payload = datagram.substr(kDataHeaderBytes);
  if (h.payload.size() != h.shard_bytes) {
    return reject(Status::Error("length " + std::to_string(datagram.size()) +
                                " does not match shard_bytes " + std::to_string(h.shard_bytes) +
                                " (want " + std::to_string(kDataHeaderBytes + h.shard_bytes) +
                                ")"));
  }
  if (Status st = CheckDataHeader(h); !st.ok()) return reject(st);
  if (Status st = impl_->FeedData(h, out); !st.ok()) return reject(st);
  return Status::Ok();
}

std::vector<DiodeDecoder::StreamState> DiodeDecoder::Streams() const {
  std::vector<StreamState> out;
  for (const auto& [id, stream] : impl_->streams) {
    out.push_back({id, stream.announced, stream.completed_count, stream.recovered_shards});
  }
  return out;
}

std::vector<std::uint64_t> DiodeDecoder::Incomplete(std::uint64_t stream_id) const {
  auto it = impl_->streams.find(stream_id);
  if (it == impl_->streams.end()) return {};
  return it->second.completed.Missing(it->second.announced, kMaxIncompleteListed);
}

std::uint64_t DiodeDecoder::MissingCount(std::uint64_t stream_id) const {
  auto it = impl_->streams.find(stream_id);
  if (it == impl_->streams.end()) return 0;
  return it->second.completed.CountMissing(it->second.announced);
}

std::size_t DiodeDecoder::pending_bytes() const { return impl_->pending_bytes; }
std::uint64_t DiodeDecoder::recovered_shards() const { return impl_->recovered_shards; }
std::uint64_t DiodeDecoder::streams_dropped() const { return impl_->streams_dropped; }

}  // namespace relay::transports
