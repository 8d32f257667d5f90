#include "queue/store.h"

#include <rocksdb/compaction_filter.h>
#include <rocksdb/db.h>
#include <rocksdb/filter_policy.h>
#include <rocksdb/listener.h>
#include <rocksdb/options.h>
#include <rocksdb/table.h>
#include <rocksdb/utilities/options_util.h>
#include <rocksdb/write_batch.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <mutex>

#include "base/log.h"

namespace relay::queue {
namespace {

enum Cf : std::size_t { kOutbound = 0, kInbound, kDedup, kMeta, kAttest, kCfCount };
const char* const kCfNames[kCfCount] = {"outbound", "inbound", "dedup", "meta", "attest"};

// Drops dedup entries whose expiry (the value's first 8 bytes) has passed by the wall clock.
// Lookups check the expiry themselves, so an expired entry that survives until the next
// compaction is never used.
class DedupExpiryFilter : public rocksdb::CompactionFilter {
 public:
  bool Filter(int /*level*/, const rocksdb::Slice& /*key*/, const rocksdb::Slice& value,
              std::string* /*new_value*/, bool* /*value_changed*/) const override {
    if (value.size() < 8) return true;
    auto now = std::chrono::duration_cast<std::chrono::milliseconds>(
                   std::chrono::system_clock::now().time_since_epoch())
                   .count();
    return static_cast<std::int64_t>(GetBigEndian64(value.data())) <= now;
  }
  const char* Name() const override { return "relay.DedupExpiryFilter"; }
};

std::string Key64(std::uint64_t v) {
  std::string k(8, '\0');
  PutBigEndian64(v, k.data());
  return k;
}

rocksdb::Slice ToSlice(std::string_view s) { return rocksdb::Slice(s.data(), s.size()); }
std::string_view ToView(const rocksdb::Slice& s) { return std::string_view(s.data(), s.size()); }

}  // namespace

void PutBigEndian64(std::uint64_t v, char* out) {
  for (int i = 7; i >= 0; --i) {
    out[i] = static_cast<char>(v & 0xff);
    v >>= 8;
  }
}

std::uint64_t GetBigEndian64(const char* in) {
  std::uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | static_cast<unsigned char>(in[i]);
  return v;
}

// --- OutboundEntry ------------------------------------------------------------------------------
// The packed peer list is: u8 count, then count x (u8 length, name bytes).
bool OutboundEntry::HasPeer(std::string_view peer) const {
  if (peers.empty()) return false;
  std::size_t n = static_cast<unsigned char>(peers[0]);
  std::size_t pos = 1;
  for (std::size_t i = 0; i < n && pos < peers.size(); ++i) {
    std::size_t len = static_cast<unsigned char>(peers[pos]);
    if (peers.substr(pos + 1, len) == peer) return true;
    pos += 1 + len;
  }
  return false;
}

std::vector<std::string> OutboundEntry::Peers() const {
  std::vector<std::string> out;
  if (peers.empty()) return out;
  std::size_t n = static_cast<unsigned char>(peers[0]);
  std::size_t pos = 1;
  for (std::size_t i = 0; i < n && pos < peers.size(); ++i) {
    std::size_t len = static_cast<unsigned char>(peers[pos]);
    out.emplace_back(peers.substr(pos + 1, len));
    pos += 1 + len;
  }
  return out;
}

// --- WriteBatch ---------------------------------------------------------------------------------
struct WriteBatch::Impl {
  Impl(const std::array<rocksdb::ColumnFamilyHandle*, kCfCount>& families,
       std::size_t reserve_bytes)
      : cf(families), wb(reserve_bytes + 12) {}                  // + the batch's header
  const std::array<rocksdb::ColumnFamilyHandle*, kCfCount>& cf;  // of the store it is for
  rocksdb::WriteBatch wb;
  std::size_t count = 0;   // operations added, taken or not
  rocksdb::Status status;  // the first failure to add one (a value over RocksDB's limits)
  void Put(Cf family, std::string_view key, std::string_view value) {
    Keep(wb.Put(cf[family], ToSlice(key), ToSlice(value)));
  }
  void Delete(Cf family, std::string_view key) { Keep(wb.Delete(cf[family], ToSlice(key))); }
  void DeleteRange(Cf family, std::string_view from, std::string_view to) {
    Keep(wb.DeleteRange(cf[family], ToSlice(from), ToSlice(to)));
  }
  void Keep(const rocksdb::Status& s) {
    ++count;
    if (!s.ok() && status.ok()) status = s;
  }
};

WriteBatch::~WriteBatch() = default;

std::size_t AppendOutboundHead(const std::vector<std::string>& peers, std::uint64_t attestation,
                               std::size_t event_size_hint, std::string* value) {
  std::size_t size = value->size() + 1 + 8 + kOutboundDigestBytes + event_size_hint;
  for (const auto& p : peers) size += 1 + p.size();
  value->reserve(size);
  value->push_back(static_cast<char>(peers.size()));
  for (const auto& p : peers) {
    // Peer names are validated to at most 32 characters by the config.
    value->push_back(static_cast<char>(p.size()));
    value->append(p);
  }
  value->append(Key64(attestation));
  const std::size_t digest_at = value->size();
  value->append(kOutboundDigestBytes, '\0');
  return digest_at;
}

std::string EncodeOutboundValue(const std::vector<std::string>& peers, std::uint64_t attestation,
                                std::string_view digest, std::string_view encoded_event) {
  std::string value;
  const std::size_t digest_at =
      AppendOutboundHead(peers, attestation, encoded_event.size(), &value);
  value.replace(digest_at, std::min(digest.size(), kOutboundDigestBytes), digest.data(),
                std::min(digest.size(), kOutboundDigestBytes));
  value.append(encoded_event);
  return value;
}

namespace {
// Offset of the attestation key in an outbound value, or npos when the peer list is cut off.
std::size_t AttestationOffset(std::string_view v) {
  if (v.empty()) return std::string_view::npos;
  std::size_t n = static_cast<unsigned char>(v[0]);
  std::size_t pos = 1;
  for (std::size_t i = 0; i < n; ++i) {
    if (pos >= v.size()) return std::string_view::npos;
    pos += 1 + static_cast<unsigned char>(v[pos]);
  }
  return pos + 8 + kOutboundDigestBytes <= v.size() ? pos : std::string_view::npos;
}
}  // namespace

void SetOutboundAttestation(std::string* value, std::uint64_t attestation) {
  const std::size_t pos = AttestationOffset(*value);
  if (pos != std::string_view::npos) PutBigEndian64(attestation, value->data() + pos);
}

std::string_view OutboundValueEvent(std::string_view value) {
  const std::size_t pos = AttestationOffset(value);
  return pos == std::string_view::npos ? std::string_view()
                                       : value.substr(pos + 8 + kOutboundDigestBytes);
}

void WriteBatch::PutOutbound(std::uint64_t seq, std::string value) {
  impl_->Put(kOutbound, Key64(seq), value);
}

void WriteBatch::AppendOutbound(std::uint64_t seq, const std::vector<std::string>& peers,
                                std::uint64_t attestation, std::string_view digest,
                                std::string_view encoded_event) {
  PutOutbound(seq, EncodeOutboundValue(peers, attestation, digest, encoded_event));
}

void WriteBatch::PutAttestation(std::uint64_t key, std::string_view attestation) {
  impl_->Put(kAttest, Key64(key), attestation);
}

void WriteBatch::DeleteAttestationRange(std::uint64_t from, std::uint64_t to_exclusive) {
  impl_->DeleteRange(kAttest, Key64(from), Key64(to_exclusive));
}

void WriteBatch::DeleteOutboundRange(std::uint64_t from, std::uint64_t to_exclusive) {
  impl_->DeleteRange(kOutbound, Key64(from), Key64(to_exclusive));
}

void WriteBatch::PutInbound(std::uint64_t seq, std::string_view encoded_event) {
  impl_->Put(kInbound, Key64(seq), encoded_event);
}

void WriteBatch::DeleteInboundRange(std::uint64_t from, std::uint64_t to_exclusive) {
  impl_->DeleteRange(kInbound, Key64(from), Key64(to_exclusive));
}

void WriteBatch::PutDedup(std::string_view key, std::int64_t expire_ms, std::string_view value) {
  std::string v = Key64(static_cast<std::uint64_t>(expire_ms));
  v.append(value);
  impl_->Put(kDedup, key, v);
}

void WriteBatch::DeleteDedup(std::string_view key) { impl_->Delete(kDedup, key); }

void WriteBatch::PutCounter(std::string_view name, std::uint64_t value) {
  impl_->Put(kMeta, name, Key64(value));
}

std::size_t WriteBatch::Count() const { return impl_->count; }
void WriteBatch::Clear() {
  impl_->wb.Clear();
  impl_->count = 0;
  impl_->status = rocksdb::Status::OK();
}

// --- Store --------------------------------------------------------------------------------------
struct Store::Impl {
  std::unique_ptr<rocksdb::DB> db;
  // Set by the first failed write; later writes are refused without reaching RocksDB.
  std::atomic<bool> write_failed{false};
  std::mutex failure_mu;
  std::string first_failure;  // under failure_mu once write_failed is set
  std::function<void(const Status&)> on_write_failure;
  std::array<rocksdb::ColumnFamilyHandle*, kCfCount> cf{};
  ~Impl() {
    if (db) {
      for (auto* h : cf)
        if (h) (void)db->DestroyColumnFamilyHandle(h);
      (void)db->Close();
    }
  }
};

// RocksDB 7 tries to recover from some background errors by itself (e.g. after ENOSPC, once
// space returns); that path writes to the WAL that failed and aborts on an assertion. relay
// recovers by restarting instead (Store::Commit), so automatic recovery is turned off.
class NoAutoRecovery : public rocksdb::EventListener {
 public:
  void OnErrorRecoveryBegin(rocksdb::BackgroundErrorReason, rocksdb::Status,
                            bool* auto_recovery) override {
    *auto_recovery = false;
  }
};

// RocksDB's own log goes to relay's log (stderr / journald), warnings and errors only, rather
// than to a LOG file in data_dir: that file shares the store's disk, and when the disk is full a
// failed append to it makes RocksDB 7 abort on an assertion at the next log line.
class StoreLogger : public rocksdb::Logger {
 public:
  StoreLogger() : rocksdb::Logger(rocksdb::InfoLogLevel::WARN_LEVEL) {}
  using rocksdb::Logger::Logv;
  void Logv(const char* format, va_list ap) override {
    Logv(rocksdb::InfoLogLevel::INFO_LEVEL, format, ap);
  }
  void Logv(const rocksdb::InfoLogLevel level, const char* format, va_list ap) override {
    if (level < GetInfoLogLevel() || level == rocksdb::InfoLogLevel::HEADER_LEVEL) return;
    char buf[1024];
    std::vsnprintf(buf, sizeof buf, format, ap);
    std::string line = std::string("store (RocksDB): ") + buf;
    if (level >= rocksdb::InfoLogLevel::ERROR_LEVEL) {
      log::Error(line);
    } else {
      log::Warning(line);
    }
  }
};

WriteBatch::WriteBatch(const Store& store, std::size_t reserve_bytes)
    : impl_(std::make_unique<Impl>(store.impl_->cf, reserve_bytes)) {}

Store::Store(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Store::~Store() = default;

Result<std::unique_ptr<Store>> Store::Open(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return Status::Error("cannot create data folder '" + dir + "': " + ec.message());

  rocksdb::DBOptions db_options;
  db_options.create_if_missing = true;
  db_options.create_missing_column_families = true;
  db_options.max_background_jobs = 2;
  db_options.bytes_per_sync = 1 << 20;
  db_options.max_total_wal_size = 256u << 20;
  db_options.keep_log_file_num = 4;
  db_options.max_log_file_size = 16u << 20;
  // Several writers (ingest committer, inbound, delivery) share the WAL.
  db_options.enable_pipelined_write = true;
  db_options.listeners.push_back(std::make_shared<NoAutoRecovery>());
  db_options.info_log = std::make_shared<StoreLogger>();

  rocksdb::ColumnFamilyOptions log_options;
  // Large memtables: most entries are deleted within seconds, and an entry whose delete lands
  // in the same memtable is never written to an SST file.
  log_options.write_buffer_size = 256u << 20;
  log_options.max_write_buffer_number = 4;
  // Queue contents are short-lived and mostly incompressible chat text: spend no CPU on it.
  log_options.compression = rocksdb::kNoCompression;

  // Received events stay only until they are delivered (what is delivered is removed every
  // second), and a bundle import or a link's burst writes them faster than that: small
  // memtables, two at most (writes wait for the flush), so that receiving holds at most about
  // 16 MiB of them in memory whatever arrives -- the store takes a backlog, not RAM. They are
  // read once (delivery) and once more (collection): no block cache.
  rocksdb::ColumnFamilyOptions inbound_options = log_options;
  inbound_options.write_buffer_size = 8u << 20;
  inbound_options.max_write_buffer_number = 2;
  rocksdb::BlockBasedTableOptions read_once;
  read_once.no_block_cache = true;
  inbound_options.table_factory.reset(rocksdb::NewBlockBasedTableFactory(read_once));

  rocksdb::ColumnFamilyOptions lookup_options;
  lookup_options.write_buffer_size = 32u << 20;
  // Most dedup look-ups are for ids never seen (every new event): a Bloom filter over the
  // memtable's whole keys answers them without walking its skip list (about 15 % of the
  // inbound thread's time before). 0.02 of the memtable, 640 KiB per lookup family: about 12
  // bits for each of the ~450,000 dedup entries a full memtable holds (under 1 % false hits).
  lookup_options.memtable_prefix_bloom_size_ratio = 0.02;
  lookup_options.memtable_whole_key_filtering = true;
  static DedupExpiryFilter expiry_filter;
  rocksdb::BlockBasedTableOptions table;
  table.filter_policy.reset(rocksdb::NewBloomFilterPolicy(10));
  lookup_options.table_factory.reset(rocksdb::NewBlockBasedTableFactory(table));

  std::vector<rocksdb::ColumnFamilyDescriptor> cfs;
  cfs.emplace_back(rocksdb::kDefaultColumnFamilyName, rocksdb::ColumnFamilyOptions());
  for (std::size_t i = 0; i < kCfCount; ++i) {
    bool lookup = (i == kDedup || i == kMeta);
    cfs.emplace_back(kCfNames[i], lookup          ? lookup_options
                                  : i == kInbound ? inbound_options
                                                  : log_options);
    if (i == kDedup) cfs.back().options.compaction_filter = &expiry_filter;
  }
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::DB* raw = nullptr;
  rocksdb::Status s = rocksdb::DB::Open(db_options, dir, cfs, &handles, &raw);
  if (!s.ok()) return Status::Error("cannot open store in '" + dir + "': " + s.ToString());
  auto impl = std::make_unique<Impl>();
  impl->db.reset(raw);
  // handles[0] is the default family, which relay does not use.
  (void)raw->DestroyColumnFamilyHandle(handles[0]);
  for (std::size_t i = 0; i < kCfCount; ++i) impl->cf[i] = handles[i + 1];
  return std::unique_ptr<Store>(new Store(std::move(impl)));
}

void Store::SetWriteFailureHandler(std::function<void(const Status&)> handler) {
  std::lock_guard<std::mutex> lock(impl_->failure_mu);
  impl_->on_write_failure = std::move(handler);
}

Status Store::Commit(WriteBatch& batch, bool sync) {
  if (!batch.impl_->status.ok())
    return Status::Error("building write batch: " + batch.impl_->status.ToString());
  if (&batch.impl_->cf != &impl_->cf)
    return Status::Error("a write batch made for another store");  // a programming error
  if (impl_->write_failed.load()) {
    // RocksDB (7.x) must not be written to again after a failed write: its WAL writer asserts.
    std::lock_guard<std::mutex> lock(impl_->failure_mu);  // first_failure may be being set
    return Status::Error("store is unavailable after a failed write (" + impl_->first_failure +
                         "); relay must restart to recover");
  }
  rocksdb::WriteOptions wo;
  wo.sync = sync;
  rocksdb::Status s = impl_->db->Write(wo, &batch.impl_->wb);
  if (!s.ok()) {
    std::string what = s.IsNoSpace() || s.ToString().find("No space") != std::string::npos
                           ? "store is out of disk space: "
                           : "store write failed: ";
    Status error = Status::Error(what + s.ToString());
    std::function<void(const Status&)> handler;
    {
      std::lock_guard<std::mutex> lock(impl_->failure_mu);
      if (!impl_->write_failed.exchange(true)) {
        impl_->first_failure = error.message();
        handler = impl_->on_write_failure;
      }
    }
    if (handler) handler(error);
    return error;
  }
  return Status::Ok();
}

std::uint64_t Store::GetCounter(std::string_view name, std::uint64_t fallback) const {
  std::string v;
  rocksdb::Status s = impl_->db->Get(rocksdb::ReadOptions(), impl_->cf[kMeta], ToSlice(name), &v);
  if (!s.ok() || v.size() != 8) return fallback;
  return GetBigEndian64(v.data());
}

std::vector<std::pair<std::string, std::uint64_t>> Store::ListCounters(
    std::string_view prefix) const {
  std::vector<std::pair<std::string, std::uint64_t>> out;
  std::unique_ptr<rocksdb::Iterator> it(
      impl_->db->NewIterator(rocksdb::ReadOptions(), impl_->cf[kMeta]));
  for (it->Seek(ToSlice(prefix)); it->Valid(); it->Next()) {
    std::string_view k = ToView(it->key());
    if (k.substr(0, prefix.size()) != prefix) break;
    if (it->value().size() == 8) out.emplace_back(k, GetBigEndian64(it->value().data()));
  }
  return out;
}

std::optional<std::string> Store::GetDedup(std::string_view key, std::int64_t now_ms) const {
  std::string v;
  rocksdb::Status s = impl_->db->Get(rocksdb::ReadOptions(), impl_->cf[kDedup], ToSlice(key), &v);
  if (!s.ok() || v.size() < 8) return std::nullopt;
  auto expire = static_cast<std::int64_t>(GetBigEndian64(v.data()));
  if (expire <= now_ms) return std::nullopt;
  return v.substr(8);
}

std::vector<bool> Store::HasDedup(const std::vector<std::string>& keys, std::int64_t now_ms) const {
  std::vector<bool> out(keys.size(), false);
  std::vector<rocksdb::Slice> slices;
  std::vector<std::size_t> index;
  slices.reserve(keys.size());
  for (std::size_t i = 0; i < keys.size(); ++i) {
    if (keys[i].empty()) continue;
    slices.emplace_back(keys[i]);
    index.push_back(i);
  }
  if (slices.empty()) return out;
  std::vector<rocksdb::PinnableSlice> values(slices.size());
  std::vector<rocksdb::Status> statuses(slices.size());
  impl_->db->MultiGet(rocksdb::ReadOptions(), impl_->cf[kDedup], slices.size(), slices.data(),
                      values.data(), statuses.data());
  for (std::size_t j = 0; j < slices.size(); ++j) {
    if (!statuses[j].ok() || values[j].size() < 8) continue;
    out[index[j]] = static_cast<std::int64_t>(GetBigEndian64(values[j].data())) > now_ms;
  }
  return out;
}

Status Store::CompactDedup() {
  rocksdb::CompactRangeOptions o;
  o.bottommost_level_compaction = rocksdb::BottommostLevelCompaction::kForce;
  rocksdb::Status s = impl_->db->CompactRange(o, impl_->cf[kDedup], nullptr, nullptr);
  if (!s.ok()) return Status::Error("compacting dedup index: " + s.ToString());
  return Status::Ok();
}

Status Store::ScanOutbound(std::uint64_t from,
                           const std::function<bool(const OutboundEntry&)>& visit) const {
  std::unique_ptr<rocksdb::Iterator> it(
      impl_->db->NewIterator(rocksdb::ReadOptions(), impl_->cf[kOutbound]));
  for (it->Seek(Key64(from)); it->Valid(); it->Next()) {
    rocksdb::Slice k = it->key();
    const std::string_view v = ToView(it->value());
    const std::size_t pos = AttestationOffset(v);
    if (k.size() != 8 || pos == std::string_view::npos)
      return Status::Error("corrupt outbound log entry at " +
                           std::to_string(k.size() == 8 ? GetBigEndian64(k.data()) : 0));
    OutboundEntry e;
    e.seq = GetBigEndian64(k.data());
    e.peers = v.substr(0, pos);
    e.attestation = GetBigEndian64(v.data() + pos);
    e.digest = v.substr(pos + 8, kOutboundDigestBytes);
    e.event = v.substr(pos + 8 + kOutboundDigestBytes);
    if (!visit(e)) return Status::Ok();
  }
  if (!it->status().ok()) return Status::Error("reading outbound log: " + it->status().ToString());
  return Status::Ok();
}

Status Store::ScanInbound(
    std::uint64_t from,
    const std::function<bool(std::uint64_t seq, std::string_view event)>& visit) const {
  std::unique_ptr<rocksdb::Iterator> it(
      impl_->db->NewIterator(rocksdb::ReadOptions(), impl_->cf[kInbound]));
  for (it->Seek(Key64(from)); it->Valid(); it->Next()) {
    rocksdb::Slice k = it->key();
    if (k.size() != 8) return Status::Error("corrupt inbound store key");
    if (!visit(GetBigEndian64(k.data()), ToView(it->value()))) return Status::Ok();
  }
  if (!it->status().ok()) return Status::Error("reading inbound store: " + it->status().ToString());
  return Status::Ok();
}

Result<std::optional<std::string>> Store::GetAttestation(std::uint64_t key) const {
  std::string v;
  rocksdb::Status s = impl_->db->Get(rocksdb::ReadOptions(), impl_->cf[kAttest], Key64(key), &v);
  if (s.IsNotFound()) return std::optional<std::string>();
  if (!s.ok())
    return Status::Error("reading attestation " + std::to_string(key) + ": " + s.ToString());
  return std::optional<std::string>(std::move(v));
}

Status Store::ScanAttestations(
    const std::function<bool(std::uint64_t key, std::string_view attestation)>& visit) const {
  std::unique_ptr<rocksdb::Iterator> it(
      impl_->db->NewIterator(rocksdb::ReadOptions(), impl_->cf[kAttest]));
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    if (it->key().size() != 8) return Status::Error("corrupt attestation key");
    if (!visit(GetBigEndian64(it->key().data()), ToView(it->value()))) return Status::Ok();
  }
  if (!it->status().ok()) return Status::Error("reading attestations: " + it->status().ToString());
  return Status::Ok();
}

std::optional<std::uint64_t> Store::FirstOutboundSeq() const {
  std::unique_ptr<rocksdb::Iterator> it(
      impl_->db->NewIterator(rocksdb::ReadOptions(), impl_->cf[kOutbound]));
  it->SeekToFirst();
  if (!it->Valid() || it->key().size() != 8) return std::nullopt;
  return GetBigEndian64(it->key().data());
}

std::uint64_t Store::ApproximateSize() const {
  std::uint64_t total = 0;
  for (auto* cf : impl_->cf) {
    std::uint64_t v = 0;
    if (impl_->db->GetIntProperty(cf, "rocksdb.total-sst-files-size", &v)) total += v;
    if (impl_->db->GetIntProperty(cf, "rocksdb.cur-size-all-mem-tables", &v)) total += v;
  }
  return total;
}

}  // namespace relay::queue
