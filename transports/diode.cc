#include "transports/diode.h"

#include <isa-l/erasure_code.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <cstring>
#include <iterator>
#include <limits>
#include <map>
#include <utility>

namespace relay::transports {
namespace {

// Wire constants; see docs/wire-format.md, "Diode datagrams".
constexpr char kMagic[4] = {'R', 'L', 'Y', 'D'};
constexpr std::uint8_t kTypeData = 1;
constexpr std::uint8_t kTypeHeartbeat = 2;
constexpr std::size_t kCommonHeaderBytes = 40;  // magic .. seq
constexpr std::size_t kDataHeaderBytes = 68;    // common header + data fields, before the shard
constexpr std::size_t kHeartbeatBytes = 72;     // tag included
constexpr std::size_t kMinBytes = kCommonHeaderBytes + kDiodeTagBytes;
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

std::string Hex16(std::uint64_t v) {
  static const char kDigits[] = "0123456789abcdef";
  std::string out(16, '0');
  for (int i = 15; i >= 0; --i, v >>= 4) out[static_cast<std::size_t>(i)] = kDigits[v & 0xf];
  return out;
}

// The 40 bytes every datagram starts with.
std::string CommonHeader(std::uint8_t type, const DiodeSealer& sealer, std::uint64_t stream_id,
                         std::uint64_t seq, std::size_t reserve) {
  std::string out;
  out.reserve(reserve);
  out.append(kMagic, sizeof kMagic);
  out.push_back(static_cast<char>(kDiodeVersion));
  out.push_back(static_cast<char>(type));
  PutU16(&out, 0);
  PutU64(&out, sealer.sender_id);
  PutU64(&out, sealer.recipient_id);
  PutU64(&out, stream_id);
  PutU64(&out, seq);
  return out;
}

// Appends the tag of everything in *d so far.
void AppendTag(std::string* d, const DiodeSealer& sealer, std::uint64_t stream_id,
               std::uint64_t seq) {
  const std::size_t signed_bytes = d->size();
  d->resize(signed_bytes + kDiodeTagBytes);
  DiodeTagInput in{sealer.sender_id, sealer.recipient_id, stream_id, seq,
                   std::string_view(d->data(), signed_bytes)};
  sealer.tag(in, reinterpret_cast<std::uint8_t*>(d->data() + signed_bytes));
}

std::uint64_t CeilDiv(std::uint64_t a, std::uint64_t b) { return (a + b - 1) / b; }

std::uint64_t SaturatingAdd(std::uint64_t a, std::uint64_t b) {
  return b > ~a ? ~std::uint64_t{0} : a + b;
}

// The (k+m) x k Cauchy encode matrix: identity on top, parity rows below. Row r >= k is
// 1/(r xor j), independent of m, so every block with the same k shares its parity rows.
std::vector<unsigned char> EncodeMatrix(int k, int m) {
  std::vector<unsigned char> a(static_cast<std::size_t>((k + m) * k));
  gf_gen_cauchy1_matrix(a.data(), k + m, k);
  return a;
}

struct DataHeader {
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
// given number of them: each message lost for good leaves a gap. Beyond the limit the lowest
// range and every id below it are made final ("forgotten"): they count as done (their datagrams
// are ignored, so nothing completes twice), and the ids among them that were not completed are
// returned to the caller to be counted as missing for good. Datagrams are authenticated, so only
// the real sender's losses can split ranges.
class IdRanges {
 public:
  // Completed, or at or below the forgotten end.
  bool Done(std::uint64_t id) const {
    if (id <= forgotten_through_) return true;
    auto it = ranges_.upper_bound(id);
    if (it == ranges_.begin()) return false;
    --it;
    return id <= it->second;
  }
  // Marks `id` (not Done) completed. Returns how many missing ids were made final.
  std::uint64_t Insert(std::uint64_t id, std::size_t max_ranges) {
    assert(!Done(id));
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
    return Trim(max_ranges);
  }
  // Un-marks a completed id above the forgotten end. False (and nothing changed) when it was
  // not completed or is final. *forgotten_missing is set as Insert's return value.
  bool Remove(std::uint64_t id, std::size_t max_ranges, std::uint64_t* forgotten_missing) {
    *forgotten_missing = 0;
    if (id <= forgotten_through_) return false;
    auto it = ranges_.upper_bound(id);
    if (it == ranges_.begin()) return false;
    --it;
    const std::uint64_t first = it->first, last = it->second;
    if (id > last) return false;
    ranges_.erase(it);
    if (first < id) ranges_[first] = id - 1;
    if (id < last) ranges_[id + 1] = last;
    *forgotten_missing = Trim(max_ranges);
    return true;
  }
  // How many ids in (forgotten, through] are not completed.
  std::uint64_t CountMissing(std::uint64_t through) const {
    if (through <= forgotten_through_) return 0;
    std::uint64_t contained = 0;
    for (const auto& [first, last] : ranges_) {
      if (first > through) break;
      contained += std::min(last, through) - first + 1;
    }
    return through - forgotten_through_ - contained;
  }
  // Ids in (forgotten, through] not completed, at most `cap` of them.
  std::vector<std::uint64_t> Missing(std::uint64_t through, std::size_t cap) const {
    std::vector<std::uint64_t> out;
    if (through <= forgotten_through_) return out;
    std::uint64_t next = forgotten_through_ + 1;  // smallest id not classified yet; <= through
    for (const auto& [first, last] : ranges_) {
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
  std::uint64_t forgotten_through() const { return forgotten_through_; }
  const std::map<std::uint64_t, std::uint64_t>& ranges() const { return ranges_; }
  // Replaces everything with sorted, disjoint, non-adjacent ranges above `forgotten_through`
  // (checked by the caller); returns the missing ids made final as Insert.
  std::uint64_t Restore(const std::vector<std::pair<std::uint64_t, std::uint64_t>>& ranges,
                        std::uint64_t forgotten_through, std::size_t max_ranges) {
    ranges_.clear();
    forgotten_through_ = forgotten_through;
    for (const auto& [first, last] : ranges) ranges_[first] = last;
    return Trim(max_ranges);
  }

 private:
  // Forgets the lowest ranges beyond max_ranges; returns the missing ids made final.
  std::uint64_t Trim(std::size_t max_ranges) {
    std::uint64_t missing = 0;
    while (ranges_.size() > max_ranges) {
      auto lowest = ranges_.begin();
      // Every id between the forgotten end and the lowest range is missing.
      missing += lowest->first - forgotten_through_ - 1;
      forgotten_through_ = lowest->second;
      ranges_.erase(lowest);
    }
    return missing;
  }

  std::map<std::uint64_t, std::uint64_t> ranges_;  // first -> last, all above forgotten_through_
  std::uint64_t forgotten_through_ = 0;            // ids at or below are final
};

// Which datagram numbers of a stream were received: the highest, and a bitmap of the
// kDiodeReplayWindow numbers up to it. Numbers older than that are refused unseen.
class ReplayWindow {
 public:
  enum class Seen { kNew, kAgain, kTooOld };
  Seen Check(std::uint64_t seq) const {
    if (seq > highest_) return Seen::kNew;
    if (highest_ - seq >= kDiodeReplayWindow) return Seen::kTooOld;
    return Bit(seq) ? Seen::kAgain : Seen::kNew;
  }
  // Records `seq` (Check said kNew).
  void Mark(std::uint64_t seq) {
    if (bits_.empty()) bits_.assign(kDiodeReplayWindow / 64, 0);
    if (seq > highest_) {
      if (seq - highest_ >= kDiodeReplayWindow) {
        std::fill(bits_.begin(), bits_.end(), 0);
      } else {
        // Clear the numbers skipped (lost, or still to come out of order): whole words where
        // they can be, so a jump costs at most kDiodeReplayWindow / 64 word writes.
        for (std::uint64_t s = highest_ + 1; s < seq;) {
          if (s % 64 == 0 && seq - s >= 64) {
            bits_[(s % kDiodeReplayWindow) / 64] = 0;
            s += 64;
          } else {
            Clear(s++);
          }
        }
      }
      highest_ = seq;
    }
    bits_[(seq % kDiodeReplayWindow) / 64] |= std::uint64_t{1} << (seq % 64);
  }
  std::uint64_t highest() const { return highest_; }
  // After a restart: every number up to `highest` counts as seen.
  void Restore(std::uint64_t highest) {
    highest_ = highest;
    bits_.assign(kDiodeReplayWindow / 64, ~std::uint64_t{0});
  }

 private:
  bool Bit(std::uint64_t seq) const {
    return !bits_.empty() && (bits_[(seq % kDiodeReplayWindow) / 64] >> (seq % 64) & 1) != 0;
  }
  void Clear(std::uint64_t seq) {
    bits_[(seq % kDiodeReplayWindow) / 64] &= ~(std::uint64_t{1} << (seq % 64));
  }

  std::uint64_t highest_ = 0;
  std::vector<std::uint64_t> bits_;  // bit seq % window; empty until the first Mark
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Encoder

struct DiodeEncoder::Impl {
  std::uint64_t stream_id;
  DiodeParams params;
  DiodeSealer sealer;
  std::uint64_t last_message_id = 0;
  std::uint64_t last_seq = 0;  // number of the last datagram made
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

DiodeEncoder::DiodeEncoder(std::uint64_t stream_id, DiodeParams params, DiodeSealer sealer)
    : impl_(std::make_unique<Impl>()) {
  // Parameters come from validated configuration; anything else is a programming error.
  assert(params.shard_bytes >= 1 && params.shard_bytes <= kMaxShardBytes);
  assert(params.data_shards >= 1 && params.parity_shards >= 1);
  assert(std::uint32_t{params.data_shards} + params.parity_shards <= kMaxShards);
  assert(params.interleave >= 1);
  assert(sealer.tag);
  impl_->stream_id = stream_id;
  impl_->params = params;
  impl_->sealer = std::move(sealer);
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
        const std::uint64_t seq = ++im.last_seq;
        std::string d = CommonHeader(kTypeData, im.sealer, im.stream_id, seq,
                                     kDataHeaderBytes + s + kDiodeTagBytes);
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
        AppendTag(&d, im.sealer, im.stream_id, seq);
        out->push_back(std::move(d));
        ++im.datagrams_sent;
      }
    }
  }
  return id;
}

std::string DiodeEncoder::Heartbeat() {
  Impl& im = *impl_;
  const std::uint64_t seq = ++im.last_seq;
  std::string d = CommonHeader(kTypeHeartbeat, im.sealer, im.stream_id, seq, kHeartbeatBytes);
  PutU64(&d, im.last_message_id);
  PutU64(&d, im.datagrams_sent);
  AppendTag(&d, im.sealer, im.stream_id, seq);
  assert(d.size() == kHeartbeatBytes);
  return d;
}

std::uint64_t DiodeEncoder::last_message_id() const { return impl_->last_message_id; }
std::uint64_t DiodeEncoder::stream_id() const { return impl_->stream_id; }

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
    std::uint64_t announced = 0;
    std::uint64_t completed_count = 0;
    std::uint64_t recovered_shards = 0;
    std::uint64_t forgotten_missing = 0;  // missing ids made final by IdRanges
    IdRanges completed;
    ReplayWindow seen;
    std::map<std::uint64_t, Pending> pending;

    std::uint64_t Missing() const {
      return SaturatingAdd(completed.CountMissing(announced), forgotten_missing);
    }
  };
  struct Sender {
    std::uint64_t floor = 0;                  // streams below are stale
    std::uint64_t dropped_missing = 0;        // missing ids of its streams dropped for newer ones
    std::map<std::uint64_t, Stream> streams;  // at most kDiodeStreamsPerSender; newest last
  };
  struct Key {
    std::uint32_t sender;
    std::uint64_t stream;
    std::uint64_t message;
    bool operator==(const Key&) const = default;
  };

  DiodeAuthenticator authenticate;
  DiodeDecoderLimits limits;
  std::size_t pending_bytes = 0;
  std::uint64_t next_arrival = 0;
  std::uint64_t recovered_shards = 0;  // over every stream ever seen
  std::uint64_t streams_dropped = 0;
  std::uint64_t reopened = 0;
  std::array<std::uint64_t, static_cast<std::size_t>(DiodeReject::kCount)> rejected{};
  std::map<std::uint32_t, Sender> senders;
  // Every pending message by arrival order: Evict takes the oldest without a scan.
  std::map<std::uint64_t, Key> by_arrival;

  // The kept stream `stream_id` of `sender`; nullptr when it is not kept: then *stale says
  // whether it is older than the kept ones (or the floor), else it would be a new stream.
  const Stream* Find(std::uint32_t sender, std::uint64_t stream_id, bool* stale) const;
  Stream* Find(std::uint32_t sender, std::uint64_t stream_id, bool* stale) {
    return const_cast<Stream*>(std::as_const(*this).Find(sender, stream_id, stale));
  }
  // Starts a new (newest) stream of `sender`, dropping its oldest kept one when full.
  Stream& Create(std::uint32_t sender, std::uint64_t stream_id);
  void DropStream(Sender& sender, std::map<std::uint64_t, Stream>::iterator it);
  void DropPending(Stream& stream, std::map<std::uint64_t, Pending>::iterator it);
  // Drops partial messages whose ids were made final (they can no longer complete).
  void DropFinal(Stream& stream);
  void FeedData(const Key& key, Stream& stream, const DataHeader& h, std::vector<Message>* out);
  // Cross-checks a datagram against what earlier datagrams of the same message said.
  static Status CheckAgainst(const DataHeader& h, const Pending& p);
  void DecodeBlock(Block* block, std::uint16_t shard_bytes, Stream* stream);
  void Evict(const Key& keep);
  std::uint64_t Highest(std::uint32_t sender) const;
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

std::uint64_t DiodeDecoder::Impl::Highest(std::uint32_t sender) const {
  auto it = senders.find(sender);
  if (it == senders.end()) return 0;
  const Sender& snd = it->second;
  return snd.streams.empty() ? snd.floor : std::max(snd.floor, snd.streams.rbegin()->first);
}

const DiodeDecoder::Impl::Stream* DiodeDecoder::Impl::Find(std::uint32_t sender,
                                                           std::uint64_t stream_id,
                                                           bool* stale) const {
  *stale = false;
  auto sit = senders.find(sender);
  if (sit == senders.end()) return nullptr;
  const Sender& snd = sit->second;
  if (auto it = snd.streams.find(stream_id); it != snd.streams.end()) return &it->second;
  // Only a stream newer than every one seen may start; older ones are replays (or late).
  *stale =
      stream_id < snd.floor || (!snd.streams.empty() && stream_id < snd.streams.rbegin()->first);
  return nullptr;
}

DiodeDecoder::Impl::Stream& DiodeDecoder::Impl::Create(std::uint32_t sender,
                                                       std::uint64_t stream_id) {
  Sender& snd = senders[sender];
  while (snd.streams.size() >= kDiodeStreamsPerSender) {
    DropStream(snd, snd.streams.begin());
    ++streams_dropped;
  }
  return snd.streams[stream_id];
}

void DiodeDecoder::Impl::DropStream(Sender& sender, std::map<std::uint64_t, Stream>::iterator it) {
  Stream& stream = it->second;
  // Its partial and lost messages will not complete any more: they stay counted as missing.
  sender.dropped_missing = SaturatingAdd(sender.dropped_missing, stream.Missing());
  while (!stream.pending.empty()) DropPending(stream, stream.pending.begin());
  sender.streams.erase(it);
}

void DiodeDecoder::Impl::DropPending(Stream& stream,
                                     std::map<std::uint64_t, Pending>::iterator it) {
  pending_bytes -= it->second.bytes;
  by_arrival.erase(it->second.arrival);
  stream.pending.erase(it);
}

void DiodeDecoder::Impl::DropFinal(Stream& stream) {
  while (!stream.pending.empty() &&
         stream.pending.begin()->first <= stream.completed.forgotten_through()) {
    DropPending(stream, stream.pending.begin());
  }
}

void DiodeDecoder::Impl::Evict(const Key& keep) {
  // Oldest first; the message just fed goes last, and only if it alone exceeds the bound.
  while (pending_bytes > limits.max_pending_bytes) {
    assert(!by_arrival.empty());
    auto victim = by_arrival.begin();
    if (victim->second == keep && by_arrival.size() > 1) ++victim;
    const Key key = victim->second;
    Stream& stream = senders.at(key.sender).streams.at(key.stream);
    DropPending(stream, stream.pending.find(key.message));
  }
}

void DiodeDecoder::Impl::FeedData(const Key& key, Stream& stream, const DataHeader& h,
                                  std::vector<Message>* out) {
  stream.announced = std::max(stream.announced, h.message_id);
  if (stream.completed.Done(h.message_id)) return;  // a late shard of a completed message
  auto [pending_it, created] = stream.pending.try_emplace(h.message_id);
  Pending& p = pending_it->second;
  if (created) {
    p.arrival = next_arrival++;
    by_arrival.emplace(p.arrival, key);
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
    Message message{key.sender, key.stream, h.message_id, {}};
    message.bytes.reserve(p.message_len);
    for (auto& [index, decoded] : p.blocks) {
      const std::size_t want =
          std::min<std::size_t>(decoded.data.size(), p.message_len - message.bytes.size());
      message.bytes.append(decoded.data, 0, want);
    }
    assert(message.bytes.size() == p.message_len);
    DropPending(stream, pending_it);
    stream.forgotten_missing += stream.completed.Insert(h.message_id, limits.max_completed_ranges);
    DropFinal(stream);
    ++stream.completed_count;
    out->push_back(std::move(message));
    return;
  }
  Evict(key);
}

const char* DiodeRejectName(DiodeReject reason) {
  switch (reason) {
    case DiodeReject::kMalformed:
      return "malformed";
    case DiodeReject::kUnsupportedVersion:
      return "unsupported_version";
    case DiodeReject::kWrongRecipient:
      return "wrong_recipient";
    case DiodeReject::kUnknownSender:
      return "unknown_sender";
    case DiodeReject::kBadTag:
      return "bad_tag";
    case DiodeReject::kStaleStream:
      return "stale_stream";
    case DiodeReject::kReplay:
      return "replay";
    case DiodeReject::kCount:
      break;
  }
  return "unknown";
}

DiodeDecoder::DiodeDecoder(DiodeAuthenticator authenticate, DiodeDecoderLimits limits)
    : impl_(std::make_unique<Impl>()) {
  assert(authenticate);
  impl_->authenticate = std::move(authenticate);
  impl_->limits = limits;
  impl_->limits.max_completed_ranges = std::max<std::size_t>(limits.max_completed_ranges, 1);
}

DiodeDecoder::~DiodeDecoder() = default;

Status DiodeDecoder::Feed(std::string_view datagram, std::vector<Message>* out) {
  Impl& im = *impl_;
  auto reject = [&im](DiodeReject reason, const std::string& why) {
    ++im.rejected[static_cast<std::size_t>(reason)];
    return Status::Error("diode datagram rejected: " + why);
  };
  const std::size_t size = datagram.size();
  if (size < 4 || std::memcmp(datagram.data(), kMagic, 4) != 0) {
    return reject(DiodeReject::kMalformed, "bad magic (want \"RLYD\")");
  }
  if (size < 8) {
    return reject(DiodeReject::kMalformed, "truncated: " + std::to_string(size) + " bytes");
  }
  const auto version = static_cast<std::uint8_t>(datagram[4]);
  const auto type = static_cast<std::uint8_t>(datagram[5]);
  if (version != kDiodeVersion) {
    return reject(DiodeReject::kUnsupportedVersion,
                  "version " + std::to_string(version) +
                      " is not supported (this relay supports version " +
                      std::to_string(kDiodeVersion) + ")");
  }
  if (size < kMinBytes) {
    return reject(DiodeReject::kMalformed, "truncated: " + std::to_string(size) +
                                               " bytes, header and tag need " +
                                               std::to_string(kMinBytes));
  }
  // The tag first: until it verifies, nothing in the datagram is believed.
  const DiodeTagInput in{GetBE(datagram, 8, 8), GetBE(datagram, 16, 8), GetBE(datagram, 24, 8),
                         GetBE(datagram, 32, 8), datagram.substr(0, size - kDiodeTagBytes)};
  const DiodeAuthResult auth = im.authenticate(in, datagram.substr(size - kDiodeTagBytes));
  switch (auth.verdict) {
    case DiodeAuthVerdict::kOk:
      break;
    case DiodeAuthVerdict::kWrongRecipient:
      return reject(DiodeReject::kWrongRecipient,
                    "addressed to site id " + Hex16(in.recipient_id) + ", which is not this site");
    case DiodeAuthVerdict::kUnknownSender:
      return reject(DiodeReject::kUnknownSender,
                    "from site id " + Hex16(in.sender_id) + ", which is not a configured peer");
    case DiodeAuthVerdict::kBadTag:
      return reject(DiodeReject::kBadTag,
                    "tag does not verify (forged, altered on the way, or sealed with other keys): "
                    "sender " +
                        Hex16(in.sender_id) + ", stream " + std::to_string(in.stream_id) +
                        ", seq " + std::to_string(in.seq));
  }
  // Authentic from here on (or a replay of an authentic datagram).
  auto malformed = [&reject](const std::string& why) {
    return reject(DiodeReject::kMalformed, why);
  };
  if (type != kTypeData && type != kTypeHeartbeat) {
    return malformed("type " + std::to_string(type) + " (want 1 data or 2 heartbeat)");
  }
  if (const auto reserved = GetBE(datagram, 6, 2); reserved != 0) {
    return malformed("reserved " + std::to_string(reserved) + " (want 0)");
  }
  if (in.seq == 0) return malformed("seq 0 (datagrams are numbered from 1)");
  DataHeader h;
  if (type == kTypeHeartbeat) {
    if (size != kHeartbeatBytes) {
      return malformed("heartbeat length " + std::to_string(size) + " (want " +
                       std::to_string(kHeartbeatBytes) + ")");
    }
  } else {
    if (size < kDataHeaderBytes + kDiodeTagBytes) {
      return malformed("truncated: " + std::to_string(size) + " bytes, a data datagram needs " +
                       std::to_string(kDataHeaderBytes + kDiodeTagBytes) + " and its shard");
    }
    h.message_id = GetBE(datagram, 40, 8);
    h.message_len = static_cast<std::uint32_t>(GetBE(datagram, 48, 4));
    h.block_index = static_cast<std::uint32_t>(GetBE(datagram, 52, 4));
    h.block_count = static_cast<std::uint32_t>(GetBE(datagram, 56, 4));
    h.k = static_cast<std::uint16_t>(GetBE(datagram, 60, 2));
    h.m = static_cast<std::uint16_t>(GetBE(datagram, 62, 2));
    h.shard_index = static_cast<std::uint16_t>(GetBE(datagram, 64, 2));
    h.shard_bytes = static_cast<std::uint16_t>(GetBE(datagram, 66, 2));
    h.payload = datagram.substr(kDataHeaderBytes, size - kDataHeaderBytes - kDiodeTagBytes);
    if (h.payload.size() != h.shard_bytes) {
      return malformed("length " + std::to_string(size) + " does not match shard_bytes " +
                       std::to_string(h.shard_bytes) + " (want " +
                       std::to_string(kDataHeaderBytes + h.shard_bytes + kDiodeTagBytes) + ")");
    }
    if (Status st = CheckDataHeader(h); !st.ok()) return malformed(st.message());
  }
  // Its stream must be one kept for the sender (or a newer one), its number new.
  bool stale = false;
  Impl::Stream* stream = im.Find(auth.sender, in.stream_id, &stale);
  if (stale) {
    return reject(DiodeReject::kStaleStream,
                  "stream " + std::to_string(in.stream_id) + " of sender " + Hex16(in.sender_id) +
                      " is older than stream " + std::to_string(im.Highest(auth.sender)) +
                      ", the newest seen from it (a replay, or a late datagram of an earlier run)");
  }
  if (stream != nullptr) {
    switch (stream->seen.Check(in.seq)) {
      case ReplayWindow::Seen::kNew:
        break;
      case ReplayWindow::Seen::kAgain:
        return reject(DiodeReject::kReplay, "seq " + std::to_string(in.seq) + " of stream " +
                                                std::to_string(in.stream_id) +
                                                " was received before");
      case ReplayWindow::Seen::kTooOld:
        return reject(DiodeReject::kReplay, "seq " + std::to_string(in.seq) + " of stream " +
                                                std::to_string(in.stream_id) +
                                                " is older than the replay window (" +
                                                std::to_string(kDiodeReplayWindow) + " below " +
                                                std::to_string(stream->seen.highest()) + ")");
    }
    if (type == kTypeData) {
      if (auto p = stream->pending.find(h.message_id); p != stream->pending.end()) {
        if (Status st = Impl::CheckAgainst(h, p->second); !st.ok()) return malformed(st.message());
      }
    }
  }
  // Valid: state may change.
  if (stream == nullptr) stream = &im.Create(auth.sender, in.stream_id);
  stream->seen.Mark(in.seq);
  if (type == kTypeHeartbeat) {
    stream->announced = std::max(stream->announced, GetBE(datagram, 40, 8));
    return Status::Ok();
  }
  im.FeedData({auth.sender, in.stream_id, h.message_id}, *stream, h, out);
  return Status::Ok();
}

void DiodeDecoder::Reopen(std::uint32_t sender, std::uint64_t stream_id, std::uint64_t message_id) {
  Impl& im = *impl_;
  bool stale = false;
  Impl::Stream* stream = im.Find(sender, stream_id, &stale);
  if (stream == nullptr) return;
  std::uint64_t forgotten = 0;
  if (!stream->completed.Remove(message_id, im.limits.max_completed_ranges, &forgotten)) return;
  stream->forgotten_missing += forgotten;
  im.DropFinal(*stream);
  --stream->completed_count;
  ++im.reopened;
}

void DiodeDecoder::SetStreamFloor(std::uint32_t sender, std::uint64_t stream_id) {
  Impl::Sender& snd = impl_->senders[sender];
  snd.floor = std::max(snd.floor, stream_id);
  while (!snd.streams.empty() && snd.streams.begin()->first < snd.floor) {
    impl_->DropStream(snd, snd.streams.begin());
    ++impl_->streams_dropped;
  }
}

std::uint64_t DiodeDecoder::HighestStream(std::uint32_t sender) const {
  return impl_->Highest(sender);
}

std::vector<DiodeDecoder::StreamState> DiodeDecoder::Streams() const {
  std::vector<StreamState> out;
  for (const auto& [sender, snd] : impl_->senders) {
    for (const auto& [id, stream] : snd.streams) {
      out.push_back({sender, id, stream.announced, stream.completed_count, stream.recovered_shards,
                     stream.forgotten_missing});
    }
  }
  return out;
}

std::vector<std::uint64_t> DiodeDecoder::Incomplete(std::uint32_t sender,
                                                    std::uint64_t stream_id) const {
  bool stale = false;
  const Impl::Stream* stream = impl_->Find(sender, stream_id, &stale);
  if (stream == nullptr) return {};
  return stream->completed.Missing(stream->announced, kMaxIncompleteListed);
}

std::uint64_t DiodeDecoder::MissingCount(std::uint32_t sender, std::uint64_t stream_id) const {
  bool stale = false;
  const Impl::Stream* stream = impl_->Find(sender, stream_id, &stale);
  return stream == nullptr ? 0 : stream->Missing();
}

std::uint64_t DiodeDecoder::MissingCount() const {
  std::uint64_t total = 0;
  for (const auto& [sender, snd] : impl_->senders) {
    total = SaturatingAdd(total, snd.dropped_missing);
    for (const auto& [id, stream] : snd.streams) total = SaturatingAdd(total, stream.Missing());
  }
  return total;
}

std::optional<DiodeDecoder::StreamRecord> DiodeDecoder::Record(
    std::uint32_t sender, const std::vector<std::uint64_t>& unsettled) const {
  auto sit = impl_->senders.find(sender);
  if (sit == impl_->senders.end() || sit->second.streams.empty()) return std::nullopt;
  const Impl::Sender& snd = sit->second;
  const auto& [stream_id, stream] = *snd.streams.rbegin();
  StreamRecord r;
  r.stream_id = stream_id;
  r.highest_seq = stream.seen.highest();
  r.announced = stream.announced;
  r.final_through = stream.completed.forgotten_through();
  r.final_missing = stream.forgotten_missing;
  r.carried_missing = snd.dropped_missing;
  for (auto it = snd.streams.begin(); it->first != stream_id; ++it) {
    r.carried_missing = SaturatingAdd(r.carried_missing, it->second.Missing());
  }
  IdRanges completed = stream.completed;
  std::uint64_t ignored = 0;
  for (std::uint64_t id : unsettled) {
    (void)completed.Remove(id, std::numeric_limits<std::size_t>::max(), &ignored);
  }
  for (const auto& range : completed.ranges()) r.completed.push_back(range);
  return r;
}

void DiodeDecoder::Restore(std::uint32_t sender, const StreamRecord& record) {
  Impl& im = *impl_;
  SetStreamFloor(sender, record.stream_id);
  Impl::Sender& snd = im.senders[sender];
  if (snd.streams.count(record.stream_id) != 0 || im.Highest(sender) > record.stream_id) return;
  Impl::Stream& stream = im.Create(sender, record.stream_id);
  stream.announced = record.announced;
  stream.forgotten_missing = SaturatingAdd(
      record.final_missing, stream.completed.Restore(record.completed, record.final_through,
                                                     im.limits.max_completed_ranges));
  stream.seen.Restore(record.highest_seq);
  snd.dropped_missing = SaturatingAdd(snd.dropped_missing, record.carried_missing);
}

std::string DiodeDecoder::StreamRecord::Encode() const {
  std::string out = "diode-stream-record-1";
  for (std::uint64_t v :
       {stream_id, highest_seq, announced, final_through, final_missing, carried_missing}) {
    out += " " + std::to_string(v);
  }
  out += " ";
  for (const auto& [first, last] : completed) {
    out += std::to_string(first) + "-" + std::to_string(last) + ",";
  }
  return out;
}

std::optional<DiodeDecoder::StreamRecord> DiodeDecoder::StreamRecord::Decode(
    std::string_view text) {
  constexpr std::string_view kTag = "diode-stream-record-1 ";
  if (text.substr(0, kTag.size()) != kTag) return std::nullopt;
  text.remove_prefix(kTag.size());
  // Reads a decimal u64 ending at `end` (a space, '-' or ','), consuming it.
  auto number = [&text](char end, std::uint64_t* out) {
    std::uint64_t v = 0;
    std::size_t i = 0;
    for (; i < text.size() && text[i] >= '0' && text[i] <= '9'; ++i) {
      const std::uint64_t digit = static_cast<std::uint64_t>(text[i] - '0');
      if (v > (~std::uint64_t{0} - digit) / 10) return false;
      v = v * 10 + digit;
    }
    if (i == 0 || i >= text.size() || text[i] != end) return false;
    text.remove_prefix(i + 1);
    *out = v;
    return true;
  };
  StreamRecord r;
  for (std::uint64_t* field : {&r.stream_id, &r.highest_seq, &r.announced, &r.final_through,
                               &r.final_missing, &r.carried_missing}) {
    if (!number(' ', field)) return std::nullopt;
  }
  std::uint64_t above = r.final_through;  // ranges must be sorted, disjoint, non-adjacent
  bool first_range = true;
  while (!text.empty()) {
    std::uint64_t a = 0, b = 0;
    if (!number('-', &a) || !number(',', &b) || a > b || a <= above ||
        (!first_range && a == above + 1)) {
      return std::nullopt;
    }
    r.completed.emplace_back(a, b);
    above = b;
    first_range = false;
  }
  return r;
}

std::size_t DiodeDecoder::pending_bytes() const { return impl_->pending_bytes; }
std::uint64_t DiodeDecoder::recovered_shards() const { return impl_->recovered_shards; }
std::uint64_t DiodeDecoder::streams_dropped() const { return impl_->streams_dropped; }
std::uint64_t DiodeDecoder::rejected(DiodeReject reason) const {
  return impl_->rejected[static_cast<std::size_t>(reason)];
}
std::uint64_t DiodeDecoder::reopened() const { return impl_->reopened; }

}  // namespace relay::transports
