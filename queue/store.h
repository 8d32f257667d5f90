#pragma once
// The durable store of one site (RocksDB underneath), see docs/storage.md.
//
// Column families:
//   outbound  be64(seq) -> OutboundValue   the append-only outbound log (EncodeOutboundValue); an
//   event routed to N
//                                           peers is stored once with the list of its peers
//   inbound   be64(seq) -> encoded event    events accepted from peers, awaiting delivery
//   dedup     key -> be64(expire_ms) value  event ids ("e:<id>") and client keys ("c:<key>");
//                                           expired entries are dropped by a compaction filter
//   meta      name -> be64(value)           counters and cursors (see queue/cursors.h names)
//   attest    be64(key) -> attestation      origin signatures (crypto/origin.h) of the events in
//                                           the outbound log; the key is the highest log seq
//                                           whose entry refers to it, so the log's GC deletes
//                                           an attestation with the last entry that needs it
//
// All writes go through WriteBatch + Commit, so every change made together is atomic. Commit
// with sync=true returns only once the batch is on stable storage (WAL fsync).
// Thread-safety: Store methods may be called from several threads at once (RocksDB is
// thread-safe); a WriteBatch belongs to one thread.

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"

namespace relay::queue {

class Store;

// Operations written together by Store::Commit, all or none. A batch is made for one store
// (and must not outlive it) and built straight into RocksDB's own batch (each value copied
// once).
class WriteBatch {
 public:
  // `reserve_bytes`: room for about that many bytes of keys and values, when known.
  explicit WriteBatch(const Store& store, std::size_t reserve_bytes = 0);
  ~WriteBatch();
  WriteBatch(const WriteBatch&) = delete;
  WriteBatch& operator=(const WriteBatch&) = delete;

  // Appends an event to the outbound log for `peers` (names of configured peers), covered by
  // the attestation stored under key `attestation` (PutAttestation).
  void AppendOutbound(std::uint64_t seq, const std::vector<std::string>& peers,
                      std::uint64_t attestation, std::string_view digest,
                      std::string_view encoded_event);
  // The same with a value built by EncodeOutboundValue.
  void PutOutbound(std::uint64_t seq, std::string value);
  void PutAttestation(std::uint64_t key, std::string_view attestation);
  void DeleteAttestationRange(std::uint64_t from, std::uint64_t to_exclusive);
  void DeleteOutboundRange(std::uint64_t from, std::uint64_t to_exclusive);
  void PutInbound(std::uint64_t seq, std::string_view encoded_event);
  void DeleteInboundRange(std::uint64_t from, std::uint64_t to_exclusive);
  // A dedup/idempotency entry that expires at `expire_ms` (Unix ms).
  void PutDedup(std::string_view key, std::int64_t expire_ms, std::string_view value);
  void DeleteDedup(std::string_view key);
  void PutCounter(std::string_view name, std::uint64_t value);

  std::size_t Count() const;
  void Clear();

 private:
  friend class Store;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The stored value of an outbound log entry: the packed peer list, the key of the attestation
// that covers the event, the digest of the event's core (crypto::EventDigest, 32 bytes: frames
// are signed over it, so it is computed once per site), the encoded event.
// SetOutboundAttestation fills in the key later (the committer knows it only once the whole
// group is built); OutboundValueEvent finds the event.
inline constexpr std::size_t kOutboundDigestBytes = 32;
std::string EncodeOutboundValue(const std::vector<std::string>& peers, std::uint64_t attestation,
                                std::string_view digest, std::string_view encoded_event);
// The value's head (peers, attestation key, a zero digest) appended to *value, for a caller that
// encodes the event straight behind it; returns the digest's offset in *value.
std::size_t AppendOutboundHead(const std::vector<std::string>& peers, std::uint64_t attestation,
                               std::size_t event_size_hint, std::string* value);
void SetOutboundAttestation(std::string* value, std::uint64_t attestation);
std::string_view OutboundValueEvent(std::string_view value);

// One entry of the outbound log as read back.
struct OutboundEntry {
  std::uint64_t seq = 0;
  std::string_view peers;         // packed peer list; use HasPeer()
  std::uint64_t attestation = 0;  // key of its attestation (Store::GetAttestation)
  std::string_view digest;        // of the event's core, kOutboundDigestBytes
  std::string_view event;         // encoded event
  bool HasPeer(std::string_view peer) const;
  std::vector<std::string> Peers() const;
};

class Store {
 public:
  // Opens (creating if needed) the store in `dir`. Error names the folder and RocksDB's reason
  // (e.g. the folder is locked by another running relay).
  static Result<std::unique_ptr<Store>> Open(const std::string& dir);
  ~Store();

  // Applies the batch atomically (and durably with sync). After a write fails (an I/O error
  // such as ENOSPC) the store accepts no further writes: RocksDB 7 cannot safely append to a WAL
  // after a failed append, so recovery is a restart (reopening replays the WAL up to the last
  // complete write; nothing committed before is lost). The handler below is told once.
  Status Commit(WriteBatch& batch, bool sync);
  // Called (on the failing writer's thread) by the first failed write; e.g. to exit for a
  // supervised restart.
  void SetWriteFailureHandler(std::function<void(const Status&)> handler);

  // Counters and cursors; `fallback` when never written.
  std::uint64_t GetCounter(std::string_view name, std::uint64_t fallback = 0) const;
  // All counters whose name starts with `prefix`, in name order.
  std::vector<std::pair<std::string, std::uint64_t>> ListCounters(std::string_view prefix) const;

  // Looks up a dedup entry; nullopt when absent or expired at `now_ms`.
  std::optional<std::string> GetDedup(std::string_view key, std::int64_t now_ms) const;
  // Batched lookup: for each key, whether a live (unexpired at now_ms) entry exists. Empty keys
  // are answered false without a lookup.
  std::vector<bool> HasDedup(const std::vector<std::string>& keys, std::int64_t now_ms) const;
  // Compacts the dedup family now, which drops every entry expired by the wall clock (the
  // compaction filter does this on its own whenever RocksDB compacts; this forces it).
  Status CompactDedup();

  // Visits outbound entries with seq >= from in order until `visit` returns false.
  Status ScanOutbound(std::uint64_t from,
                      const std::function<bool(const OutboundEntry&)>& visit) const;
  // Visits inbound entries with seq >= from in order until `visit` returns false.
  Status ScanInbound(
      std::uint64_t from,
      const std::function<bool(std::uint64_t seq, std::string_view event)>& visit) const;
  // The attestation stored under `key`; nullopt when there is none, an error when it cannot be
  // read.
  Result<std::optional<std::string>> GetAttestation(std::uint64_t key) const;
  // Visits every stored attestation in key order until `visit` returns false.
  Status ScanAttestations(
      const std::function<bool(std::uint64_t key, std::string_view attestation)>& visit) const;
  // The lowest outbound seq still stored, or nullopt when the log is empty.
  std::optional<std::uint64_t> FirstOutboundSeq() const;

  // Approximate bytes on disk (SST + WAL), for metrics.
  std::uint64_t ApproximateSize() const;

 private:
  friend class WriteBatch;  // a batch is built with the store's column families
  struct Impl;
  explicit Store(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Big-endian fixed-width encoding used for keys and counter values.
void PutBigEndian64(std::uint64_t v, char* out);
std::uint64_t GetBigEndian64(const char* in);

}  // namespace relay::queue
