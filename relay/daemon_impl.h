#pragma once
// Internal header of the daemon, not a public interface (that is relay/daemon.h): the state
// of a running site, Daemon::Impl, and the helper types its members share. Only the files
// that define Impl's members include it, one file per role:
//   daemon.cc              start-up, stop, status; the Daemon methods and RunDaemon
//   daemon_ingest.cc       HTTP routing, the ingest committer, queue limits and accounting
//   daemon_shipper.cc      frames out (shipper), acks and link state
//   daemon_inbound.cc      frames in: verify, de-duplicate, store, forward, acknowledge
//   daemon_delivery.cc     stored inbound events to the JSONL sinks
//   daemon_bundles.cc      sneakernet export and import
//   daemon_diode.cc        data diode sender and receiver
//   daemon_maintenance.cc  GC, spool collection, files_auto, gauges

#include <pthread.h>
#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "base/status.h"
#include "chat/jsonl_sink.h"
#include "config/config.h"
#include "crypto/api_token.h"
#include "crypto/bundle.h"
#include "crypto/frame.h"
#include "crypto/identity.h"
#include "event/event.h"
#include "queue/store.h"
#include "relay/blob_spool.h"
#include "relay/daemon.h"
#include "relay/http_server.h"
#include "relay/ingest.h"
#include "relay/mattermost_bridge.h"
#include "relay/metrics.h"
#include "relay/worker_pool.h"
#include "transports/diode.h"
#include "transports/diode_auth.h"
#include "transports/zmq_link.h"

namespace relay {
namespace daemon_detail {

using Clock = std::chrono::steady_clock;

inline std::int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// Counter names in the store's meta family.
constexpr char kNextOrigin[] = "next/origin";  // next origin sequence of this site's events
constexpr char kNextOut[] = "next/out";        // next outbound log sequence
constexpr char kNextIn[] = "next/in";          // next inbound store sequence
constexpr char kDelivered[] = "delivered";     // inbound sequence delivered to sinks through
constexpr char kStoreFormat[] = "format";      // the store's layout version (kStoreFormatVersion)
// The first 8 bytes of the signing key that signed this site's own queued attestations.
constexpr char kAttestSigner[] = "attest/signer";
// 2: wire version 2 -- outbound entries carry an attestation key, events the v2 envelope.
constexpr std::uint64_t kStoreFormatVersion = 2;
inline std::string AckedKey(const std::string& peer) { return "acked/" + peer; }
inline std::string AcceptedKey(const std::string& peer) { return "accepted/" + peer; }
inline std::string SinkPosKey(const std::string& channel) { return "sinkpos/" + channel; }
inline std::string ExportedKey(const std::string& peer) { return "exported/" + peer; }
inline std::string DiodePosKey(const std::string& peer) { return "diode/" + peer; }
// The diode stream this site last started for a peer (sender), and the highest stream received
// from a peer (receiver; older streams are refused as replays, also after a restart).
inline std::string DiodeStreamKey(const std::string& peer) { return "diode-stream/" + peer; }
inline std::string DiodeInKey(const std::string& peer) { return "diode-in/" + peer; }
// Dedup family (never expiring): the receiver's record of a peer's newest diode stream.
inline std::string DiodeRecordKey(const std::string& peer) { return "diode-record/" + peer; }
inline std::string RangesKey(const std::string& peer) { return "rr:" + peer; }
inline std::string SentKey(const std::string& peer) { return "sent/" + peer; }
// A reaction `emoji` that `author` of site `origin` added to event `ref`, received here: only
// that site may remove it again.
inline std::string ReactionKey(std::string_view ref, std::string_view emoji,
                               std::string_view origin, std::string_view author) {
  std::string k = "rx:";
  k.append(ref).push_back('\x1f');
  k.append(emoji).push_back('\x1f');
  k.append(origin).push_back('\x1f');
  k.append(author);
  return k;
}
constexpr std::int64_t kForeverMs = 100LL * 365 * 24 * 3600 * 1000;  // "never" for the dedup family

constexpr std::uint64_t kUnset = ~std::uint64_t{0};
// Log and link sequences never exceed this (frames and acknowledgements beyond it are refused),
// so that `seq + 1` never overflows anywhere.
constexpr std::uint64_t kMaxSeq = crypto::kMaxSequence;

// /v1/bundles/* requests served at once, and waiting for a worker, before 429.
constexpr std::size_t kBundleWorkers = 2;
constexpr std::size_t kBundleWaiting = 2;

struct InFlight {
  std::uint64_t first = 0, last = 0;
  std::uint32_t events = 0;
  bool chunk = false;  // ends with a chunk of a large attachment
};

struct PeerRuntime {
  std::string name;
  crypto::PublicIdentity identity;
  const config::PeerConfig* config = nullptr;
  PeerMetrics* metrics = nullptr;
  // Shipper state, guarded by Impl::ship_mu.
  bool up = false;
  std::uint64_t epoch = 0;
  std::uint64_t acked = 0;     // durable cursor: peer accepted everything through here
  std::uint64_t send_pos = 1;  // first sequence of the next frame
  std::uint64_t scan_pos = 1;  // where the next scan resumes (>= send_pos)
  std::deque<InFlight> inflight;
  Clock::time_point last_progress{};
  // Highest log position sent to the peer by any path (link, bundle, diode), as far as this site
  // knows; an acknowledgement beyond it is refused. Guarded by ship_mu.
  std::uint64_t sent_through = 0;
  std::uint64_t sent_recorded = 0;  // the value last written to SentKey (maintenance thread)
  // Previous-key notices (Impl::NoticePreviousKey), maintenance thread and start-up only.
  Clock::time_point previous_key_noticed{};
  bool previous_key_expiry_logged = false;
};

// How this site checks the origin of a received event (crypto/origin.h): the key that signs the
// origin's attestations and the peers that may send its events.
struct OriginRule {
  crypto::PublicKey key{};
  std::optional<crypto::PublicKey> previous;  // during the origin's key rotation, until:
  std::chrono::system_clock::time_point previous_until{};
  std::vector<std::size_t> senders;  // peer indexes: itself when a peer, and its `via`
  std::optional<std::size_t> peer;   // the origin's own peer index, when it is a peer
};

// An entry being added to the outbound log by one commit. Entries with the same `group` are
// covered by one attestation (the origin's channel in this commit, or the attestation a
// forwarded event came with).
struct PendingOut {
  std::uint64_t seq = 0;
  std::uintptr_t group = 0;
  crypto::Digest digest{};  // of the event's core (crypto::EventDigest)
  std::string value;        // queue::EncodeOutboundValue, attestation key filled in at the end
};

struct ChannelRuntime {
  const config::ChannelConfig* config = nullptr;
  std::vector<std::size_t> peers;  // indices into Impl::peers
  std::vector<std::string> peer_names;
  std::unique_ptr<chat::JsonlFile> jsonl;
};

struct PendingIngest {
  IngestRequest request;
  HttpResponder respond;
};

struct PendingCapture {
  CaptureSubmission* submission;
  std::promise<Status>* done;
};

struct ReceivedFrame {
  std::size_t link_peer;
  std::string bytes;
  std::uint64_t ref = 0;  // the transport's own handle (diode: which message it came in)
};

// Frames that arrived off the link -- a sneakernet bundle, or messages from the diode -- stored
// on the inbound thread in one batch. They may come in any order.
struct BundleImport {
  std::deque<ReceivedFrame> frames;
  std::string bundle_key;      // "b:<bundle id>", recorded with the events (bundles only)
  bool all_or_nothing = true;  // bundles: one bad frame refuses all; diode: bad frames skipped
  bool owned = false;          // handed over without waiting: the inbound thread deletes it
  std::promise<Status> done;
  // Diode: told (on the inbound thread) of each frame that failed verification, and when the
  // import is settled (an error: none of its frames was stored), so that the receiver counts
  // what was not stored as missing again and records what was.
  std::function<void(const ReceivedFrame&)> not_stored;
  std::function<void(const Status&)> settled;
};

// ReceivedFrame::link_peer for frames whose sender is only known from the frame itself.
constexpr std::size_t kAnyPeer = ~std::size_t{0};

// Free bytes on the file system of `dir` for an unprivileged writer, or nullopt when statvfs
// fails (the store then says what fails).
std::optional<std::uint64_t> FreeBytes(const std::string& dir);

// Rate limit for repeated warnings (e.g. a flood of rejected frames): at most a few a second.
class WarnLimiter {
 public:
  bool Allow() {
    auto now = Clock::now();
    std::lock_guard<std::mutex> lock(mu_);
    if (now - window_ > std::chrono::seconds(1)) {
      window_ = now;
      count_ = 0;
    }
    return ++count_ <= 5;
  }

 private:
  std::mutex mu_;
  Clock::time_point window_{};
  int count_ = 0;
};

}  // namespace daemon_detail

struct Daemon::Impl : transports::LinkHandler {
  // The helper types above, by the names the members use.
  using Clock = daemon_detail::Clock;
  using InFlight = daemon_detail::InFlight;
  using PeerRuntime = daemon_detail::PeerRuntime;
  using ChannelRuntime = daemon_detail::ChannelRuntime;
  using PendingIngest = daemon_detail::PendingIngest;
  using PendingCapture = daemon_detail::PendingCapture;
  using ReceivedFrame = daemon_detail::ReceivedFrame;
  using BundleImport = daemon_detail::BundleImport;
  using WarnLimiter = daemon_detail::WarnLimiter;
  using OriginRule = daemon_detail::OriginRule;
  using PendingOut = daemon_detail::PendingOut;

  config::Config config;
  std::optional<crypto::SiteKey> key;
  std::optional<crypto::SiteKey> previous_key;  // [site] previous_key_file, during a rotation
  std::unique_ptr<queue::Store> store;
  Metrics metrics;
  std::vector<PeerRuntime> peers;
  std::map<std::string, ChannelRuntime> channels;
  std::unordered_map<std::string, daemon_detail::OriginRule> origins;  // by site name
  std::unique_ptr<HttpServer> http;
  std::unique_ptr<transports::ZmqLink> link;
  std::unique_ptr<MattermostBridge> bridge;  // when a channel uses sink = mattermost or webhook
  WarnLimiter warn_limiter;
  std::atomic<bool> stopping{false};
  bool started = false;
  bool offline = false;  // Options::offline

  // Data diode: senders (one per peer with diode_send) and the receiver ([diode] listen).
  struct DiodeSender {
    std::size_t peer = 0;
    int fd = -1;
    sockaddr_storage addr{};
    socklen_t addr_len = 0;
    std::unique_ptr<transports::DiodeEncoder> encoder;
    std::atomic<std::uint64_t> pos{1};  // first log sequence of the next frame
    std::uint64_t scan = 1;             // where the next scan resumes (>= pos)
    std::deque<std::pair<std::uint64_t, std::uint64_t>> resend;  // guarded by diode_mu
    double tokens = 0;
    Clock::time_point refill{}, last_heartbeat{};
  };
  std::mutex diode_mu;
  std::vector<std::unique_ptr<DiodeSender>> diode_senders;
  std::thread diode_send_thread, diode_recv_thread;
  int diode_recv_fd = -1;
  std::unique_ptr<transports::DiodeKeyring> diode_keyring;  // receiver: every peer's tag keys
  // Receiver thread, per peer: the highest stream stored; the record of its newest stream
  // stored by the last run, and the text last written.
  std::vector<std::uint64_t> diode_stream_floor;
  std::vector<std::optional<transports::DiodeDecoder::StreamRecord>> diode_records;
  std::vector<std::string> diode_record_text;
  // A message the diode receiver reassembled, by the decoder's names for it.
  struct DiodeMessageRef {
    std::uint32_t sender;
    std::uint64_t stream;
    std::uint64_t message;
  };
  // Frames the inbound thread did not store, for the receiver to count missing again, and
  // imports it settled (number, ok) (guarded by diode_mu).
  std::vector<DiodeMessageRef> diode_not_stored;
  std::vector<std::pair<std::uint64_t, bool>> diode_settled;
  std::vector<std::pair<Clock::time_point, std::uint64_t>> head_samples;  // maintenance only
  std::map<std::string, Clock::time_point> auto_files_last;               // maintenance only
  std::set<std::string> auto_files_seen;                                  // maintenance only
  std::map<std::string, std::uint64_t> auto_acked;                        // maintenance only
  // /v1/bundles/* requests: a fixed pool (429 when it is full), stopped after the HTTP server.
  std::unique_ptr<WorkerPool> bundle_pool;
  std::mutex export_mu;  // one export at a time: each reads and advances its folder's cursor
  // [ingest] token_file, loaded at Start (not offline); wiped at Stop.
  std::unique_ptr<crypto::ApiToken> api_token;

  // Outbound log writers (committer, inbound forwarding) allocate sequences and commit under
  // out_mu, so the log is gap-free up to `published` when the shipper reads it.
  std::mutex out_mu;
  std::uint64_t next_out = 1;
  std::atomic<std::uint64_t> published{0};
  // Events queued for each peer ([peer] max_queue and the queue-depth gauge), under out_mu:
  // queue_counted is exact as of the last recount (cursors recount_acked: maintenance thread
  // only); queue_added counts events routed to the peer and appended since.
  std::vector<std::uint64_t> queue_counted, queue_added;
  std::vector<std::uint64_t> recount_acked;
  std::atomic<bool> queues_dirty{false};  // the log was rebased: count everything again

  // Ingest committer.
  std::mutex ingest_mu;
  std::condition_variable ingest_cv;
  std::vector<PendingIngest> ingest_queue;
  std::vector<PendingCapture> capture_queue;
  bool ingest_closed = false;
  std::uint64_t next_origin = 1;  // committer thread only
  bool disk_low = false;          // committer thread only
  std::thread committer;

  // Shipper.
  std::mutex ship_mu;
  std::condition_variable ship_cv;
  std::thread shipper;

  // Inbound.
  std::mutex in_mu;
  std::condition_variable in_cv;
  std::deque<ReceivedFrame> in_queue;
  std::size_t in_queue_bytes = 0;
  std::thread inbound;
  std::vector<std::uint64_t> accepted;  // inbound thread only
  // Ranges of each peer's log received in bundles beyond `accepted` (inbound thread only).
  std::vector<std::map<std::uint64_t, std::uint64_t>> file_ranges;
  std::deque<BundleImport*> in_imports;     // guarded by in_mu
  std::uint64_t next_in = 1;                // inbound thread only
  std::atomic<std::uint64_t> stored_in{0};  // highest inbound seq committed

  // Delivery.
  std::mutex deliver_mu;
  std::condition_variable deliver_cv;
  std::thread delivery;
  std::uint64_t delivered = 0;
  std::atomic<std::uint64_t> delivered_through{0};
  std::map<std::string, std::string>
      delivery_lines;  // delivery thread only  // `delivered`, readable by other threads
  std::uint64_t inbound_removed = 0;  // maintenance thread only: inbound entries deleted through
  // Bytes of chunk files in data_dir/spool/in/<origin>, by origin (against [peer] max_spool):
  // measured by maintenance every few seconds, raised by the inbound thread as it writes.
  std::mutex spool_mu;
  std::map<std::string, std::uint64_t> spool_usage;  // guarded by spool_mu
  Clock::time_point last_spool_measure{};            // maintenance thread only
  std::atomic<bool> inbound_disk_low{false};         // the state last logged by InboundDiskLow
  std::unique_ptr<BlobWaiter> delivery_waiter;  // delivery thread only: posts waiting for blobs
  bool delivery_blocked = false;                // delivery thread only: stopped at such a post

  // Maintenance.
  std::mutex maint_mu;
  std::condition_variable maint_cv;
  std::thread maintenance;
  std::uint64_t gc_deleted_through = 0;  // maintenance thread only
  Clock::time_point last_dedup_compaction = Clock::now();
  Clock::time_point last_spool_collection{};

  explicit Impl(config::Config c) : config(std::move(c)) {}

  // ---- peer lookup, start-up, stop, status (daemon.cc) ------------------------------------------
  // The peer a verified message came from, by its signing key: its current key, or during a
  // rotation its previous one (whether that is still accepted is LookupPeer's to decide, before
  // verification).
  std::optional<std::size_t> PeerBySignKey(const crypto::PublicKey& pk) const;

  // The identity to verify a message signed by `pk` with: a peer's current key, or its previous
  // key while config::PeerConfig::PreviousKeyAt(now) allows it. For a previous key past its
  // previous_public_key_until nothing is returned (the message is refused), and when `expired`
  // is given that peer's index is stored in it, so that the refusal can be counted and logged
  // as previous_key_expired rather than as an unknown sender (RejectPreviousKeyExpired).
  std::optional<crypto::PublicIdentity> LookupPeer(
      const crypto::PublicKey& pk,
      std::chrono::system_clock::time_point now = std::chrono::system_clock::now(),
      std::optional<std::size_t>* expired = nullptr) const;
  // Counts (relay_frames_rejected_total{reason="previous_key_expired"}) and logs, rate-limited,
  // `what` ("a frame", "bundle '...'") refused because it was signed with peer `p`'s previous
  // key after previous_public_key_until. Returns the message logged.
  std::string RejectPreviousKeyExpired(std::size_t p, const std::string& what);
  // Logs, for each peer with a previous key: a warning at start and then once a day while the
  // key is still accepted (with the time left), and once that it has expired and is refused.
  void NoticePreviousKeys(std::chrono::system_clock::time_point now);
  // The notice for peer `p`'s previous key at `now` (empty when it has none).
  std::string PreviousKeyNotice(std::size_t p, std::chrono::system_clock::time_point now) const;

  Status Open();
  // A store of wire version 1 is taken only when nothing is queued or undelivered in it (its
  // events have no origin signatures); then it is marked as version 2.
  Status CheckStoreFormat();
  // After this site's key changed (a rotation), its own queued events are signed again with
  // the current key: their receivers refuse the previous key once its rotation ends, and the
  // events are this site's own. Once per key change (kAttestSigner); attestations of other
  // origins, queued here for forwarding, stay as their origin signed them.
  Status ResignOwnAttestations();
  Status Start();
  // A thread running one of the loops below under `name` (at most 15 characters): top -H and
  // gdb show which loop is which.
  std::thread RunNamed(const char* name, void (Impl::*loop)()) {
    return std::thread([this, name, loop] {
      pthread_setname_np(pthread_self(), name);
      (this->*loop)();
    });
  }
  void Stop();

  // One line for systemd's STATUS= and logs: "ingested 12, delivered 9, aws up (backlog 0)".
  std::string StatusLine() const;

  std::string StatusJson();

  // ---- ingest: queue accounting, HTTP routing, committer (daemon_ingest.cc) ---------------------
  // Per-peer queue accounting.
  // Events routed to peer `p` in the log range (from, through].
  Result<std::uint64_t> CountRouted(std::size_t p, std::uint64_t from, std::uint64_t through);

  // Counts every event queued for each peer from its cursor in `acked` (one scan of the
  // unacknowledged log): at start, and after the log was rebased. No appends meanwhile (at
  // start nothing runs; otherwise the caller holds out_mu).
  Status CountQueues(const std::vector<std::uint64_t>& acked);

  std::vector<std::uint64_t> AckedCursors();

  // Maintenance: moves the counts to the cursors in `acked` (the snapshot the GC that follows
  // uses, so no entry read here is deleted before) and to the current log head. Only the
  // entries a peer acknowledged since the last recount are read; appended ones were counted by
  // their writers (NoteQueued).
  void RecountQueues(const std::vector<std::uint64_t>& acked);

  // Writers of the outbound log (under out_mu) count the events they append for each peer.
  void NoteQueued(const std::vector<std::size_t>& peer_indexes);

  // HTTP. CreateApi loads [ingest] token_file and creates the server (started later) with the
  // access checks of docs/security.md, and the bundle worker pool.
  Status CreateApi();
  void Route(HttpRequest&& req, const HttpResponder& respond);
  // {"host": n, ...}: relay_api_refused_total by reason, for /v1/status.
  std::string ApiRefusedJson() const;
  void Ingest(HttpRequest&& req, const HttpResponder& respond);

  // Ingest committer: group commit.
  void CommitterLoop();

  // Submits captured chat changes through the committer (called by the Mattermost bridge).
  Status SubmitCapture(CaptureSubmission& submission);

  // Adds captured changes to the batch: post ids become event ids (through the mapping, which
  // a post captured in the same round may have just created). Their outbound entries go to *own.
  std::uint64_t AddCaptures(std::vector<PendingCapture>& captures, queue::WriteBatch& batch,
                            std::vector<PendingOut>* own, std::int64_t now);

  // The outbound entry of an event this site originates: encoded, with its core's digest.
  static PendingOut OwnEntry(std::uint64_t seq, std::uintptr_t group,
                             const std::vector<std::string>& peers, const Event& event);

  // Adds `out` to the batch, each group of entries (PendingOut::group, at most
  // crypto::kMaxAttestedEvents at a time) with the attestation `attest` gives for it, stored
  // under the highest seq of the group (so that the log's GC deletes it with the last entry
  // that needs it).
  static void PutOutboundGroups(
      std::vector<PendingOut>& out, queue::WriteBatch& batch,
      const std::function<std::string(const std::vector<PendingOut*>&)>& attest);
  // PutOutboundGroups for this site's own events: each group is signed with the site's key.
  void PutOwnEvents(std::vector<PendingOut>& own, queue::WriteBatch& batch);

  static HttpResponse Unavailable(const std::string& why);

  // Non-empty (the reason) when data_dir's file system has less than [site] min_free free.
  // Logged when the state changes. Committer thread.
  std::string DiskLow();

  // Non-empty (the reason) when the items (ingest messages or captured changes: anything with
  // a `channel`) would take a peer's queue past its max_queue. Under out_mu.
  template <typename Items>
  std::string QueueFull(const Items& items);

  void CommitIngest(std::vector<PendingIngest>& work, std::vector<PendingCapture>& captures,
                    std::unordered_map<std::string, std::string>& round_keys);

  // Moves every entry of the outbound log to new positions above `floor` (in order, with their
  // attestations, in one synced batch), so that a peer whose cursor is at `floor` takes them as
  // new. Other peers keep their cursors: the moved entries follow them, those they had already
  // taken come again and are dropped by event id. Only by the operator (`relay rebase`, with the
  // daemon stopped): a store re-created behind a peer's cursor. Returns how many moved.
  Result<std::uint64_t> RebaseLog(std::uint64_t floor);

  // ---- shipper; link callbacks: link state, acks (daemon_shipper.cc) ----------------------------
  // Link callbacks (link thread).
  void OnLinkUp(std::size_t peer, std::uint64_t epoch) override;
  void OnLinkDown(std::size_t peer) override;
  void OnAck(std::size_t peer, std::uint64_t seq, bool by_previous_key) override;
  // Applies an acknowledgement from any path (link, ack or resend file): refused, counted and
  // logged when it is signed with the peer's previous key or goes beyond what was sent to the
  // peer (never more than the log holds). The error says why.
  Status AcceptAck(std::size_t peer, std::uint64_t seq, bool by_previous_key);

  // Shipper.
  void ShipperLoop();

  struct BuiltFrame {
    std::string bytes;           // empty when the range held no event for the peer
    std::uint32_t count = 0;     // events inside
    std::uint64_t last_seq = 0;  // the range it covers ends here
    bool chunk = false;          // ends with an attachment chunk
  };

  // Seals the next frame for `peer`: scans the log from `from` (not beyond `head`), taking the
  // peer's events up to the frame limits; the frame covers [first, last_seq]. Events are copied
  // once, from the store's iterator straight into the payload. An attachment chunk ends the
  // frame, so a frame holds at most one. Used by the shipper and by sneakernet export.
  // The payload stays within the peer's max_frame_bytes and `byte_limit` (export's file limit),
  // attestations included, unless a single event is larger.
  Result<BuiltFrame> BuildFrame(std::size_t peer, std::uint64_t first, std::uint64_t from,
                                std::uint64_t head, std::uint8_t flags = 0,
                                std::uint64_t byte_limit = ~std::uint64_t{0});

  // Called with ship_mu held; releases it while reading the store and sealing.
  bool BuildAndSend(std::size_t peer, std::unique_lock<std::mutex>& lock);

  // ---- inbound; link callbacks: frames, rejections (daemon_inbound.cc) --------------------------
  // Opens a frame addressed to this site, or during a rotation to its previous key.
  // `expired`: see LookupPeer.
  crypto::OpenResult OpenFrameAny(std::string_view bytes,
                                  std::optional<std::size_t>* expired = nullptr) const;

  // Link callbacks (link thread).
  void OnFrame(std::size_t peer, std::string bytes) override;
  void OnRejectedControl(const std::string& reason, const std::string& message) override;
  void OnLinkRefused(transports::LinkRefusal reason, const std::string& message) override;

  // Inbound.
  void Reject(crypto::RejectReason reason, const std::string& message);
  void InboundLoop();

  // Hands a bundle's frames to the inbound thread and waits until they are stored (or not).
  Status ImportFrames(BundleImport& bundle);

  // Hands frames to the inbound thread without waiting (the diode receiver must keep reading
  // its socket while they are stored). Bounded by the inbound queue's byte limit: frames beyond
  // it are dropped, and come back through FEC-less loss handling (resend requests).
  void SubmitFramesAsync(std::unique_ptr<BundleImport> import);

  // Records that a file frame covered [first, last] of the peer's log, and moves the peer's
  // accepted cursor over every range that now joins it.
  void CoverRange(std::size_t p, std::uint64_t first, std::uint64_t last);

  // Whether sequence `seq` of peer p's log was stored before: at or below the cursor, or inside
  // a range received out of order (bundles, diode).
  bool AlreadyAccepted(std::size_t p, std::uint64_t seq) const;

  // Bytes in the spool for chunks of `origin` (last measured, plus what was written since).
  std::uint64_t SpoolUsage(const std::string& origin);
  // Maintenance: measures the spool's usage per origin (blocks on disk: chunk files are sparse
  // until complete).
  void MeasureSpool();
  // Non-empty (the reason) when data_dir has less than [site] min_free free: received frames are
  // then not taken (nor acknowledged) until space is back. Logged when the state changes.
  std::string InboundDiskLow();
  // The peer an inbound store entry came from (the last of its hops), or nullopt.
  std::optional<std::size_t> InboundPeerOf(std::string_view encoded) const;

  static std::string EncodeRanges(const std::map<std::uint64_t, std::uint64_t>& ranges);
  static std::map<std::uint64_t, std::uint64_t> DecodeRanges(const std::string& text);

  struct Forward {
    std::vector<std::string> peers;       // names, as the log stores them
    std::vector<std::size_t> peer_index;  // the same peers, for the queue accounting
    std::string encoded;
    crypto::Digest digest{};      // of its core, as verified
    std::size_t attestation = 0;  // index into the round's attestations
  };

  // Why a received event may not be accepted from peer `p` (the reason to count, *why says
  // more), or nullopt when it may: its origin is known and may send through p, a verified
  // attestation of its origin covers it (`attested`), its hops start at the origin and end at p, it
  // is not older than the dedup memory when it comes through a transit site, and an edit or
  // delete comes from the site where the message was posted.
  std::optional<InboundDrop> CheckOrigin(const Event& ev, std::size_t p, bool attested,
                                         std::int64_t now, std::string* why) const;

  // Verifies, de-duplicates and stores received frames in one synced batch, then acknowledges.
  // Frames from the link must continue the peer's sequence (replay and gap checks). Frames of a
  // sneakernet bundle (`bundle` set) may come in any order: they are checked by event id only,
  // mark their range as received, and are all-or-nothing (any bad frame refuses the bundle).
  Status ProcessFrames(std::deque<ReceivedFrame>& work, BundleImport* bundle);

  // ---- delivery (daemon_delivery.cc) ------------------------------------------------------------
  Status RecoverSinks();
  void DeliveryLoop();

  // Writes the next batch of stored events to their sinks. False on a sink failure, after
  // restoring every file to its recorded size so that the retry cannot duplicate lines.
  bool DeliverBatch();

  // For a post with blob attachments: where each goes next to the sink
  // ("<jsonl_path>.files/<event id>-<n>-<name>", the name sanitized), adding the moves of
  // complete spool files to *moves and the spool files of blobs given up on to *drop. False
  // while a blob is incomplete and [site] attachment_wait has not passed since first seen.
  bool PlaceBlobs(const Event& ev, const ChannelRuntime& ch,
                  std::vector<chat::DeliveredFile>* placed,
                  std::vector<std::pair<std::string, std::string>>* moves,
                  std::vector<std::string>* drop);

  // Cuts each touched file back to its recorded size.
  void RollbackSinks(const std::map<std::string, std::string>& lines, const std::string& failed,
                     std::uint64_t failed_before);

  // ---- sneakernet bundles (daemon_bundles.cc) ---------------------------------------------------
  // Export and import can take a while: they run on bundle_pool and answer when done; 429 with
  // Retry-After when every worker is busy and the pool's queue is full.
  void BundleRequest(const std::string& path, std::string body, const HttpResponder& respond);
  // POST /v1/mattermost/backfill {"channel": NAME, "since_ms": N}: `relay backfill`.
  void BackfillRequest(const std::string& body, const HttpResponder& respond);
  void ServeBundleRequest(const std::string& path, const std::string& body,
                          const HttpResponder& respond);

  // The folders bundle files may be written to and read from: every peer's files_dir and
  // [site] transfer_dirs, as configured (not resolved).
  std::vector<std::string> BundleFolders() const;

  // Resolves `path` (realpath: no symlink or '..' is left) and checks that it is one of
  // BundleFolders() or inside one, and not inside data_dir. Returns the resolved path, or an
  // error naming the path, the folders and the key to set. Counted as ApiRefusal::kFolder.
  Result<std::string> ResolveBundlePath(const std::string& path);

  // The store counter of what was exported for peer `p` into `folder` (resolved): the peer's
  // own files_dir keeps the historical "exported/<peer>"; any other folder has its own, so an
  // export elsewhere never hides events from the next export to the peer's folder.
  std::string ExportCursorKey(std::size_t p, const std::string& folder);

  std::optional<std::size_t> PeerByName(const std::string& name) const;

  // Writes `bytes` to name in the folder open as `dir_fd` (named `dir` in messages) atomically: a
  // temporary file, fsync, rename, fsync of the folder. A pulled disk never holds half a bundle
  // under the final name. The folder may be writable by others (a transfer disk): the
  // temporary name is random and created exclusively without following symlinks, so nothing
  // planted there redirects the write; rename replaces a planted final name itself, never what
  // it points to; and working relative to dir_fd, a folder swapped for a symlink after it was
  // checked cannot redirect the write either.
  Status WriteAtomically(int dir_fd, const std::string& dir, const std::string& name,
                         const std::string& bytes);

  std::string BundleName(const std::string& peer, const char* ext, std::int64_t now, int part);
  Result<ExportReport> Export(const ExportOptions& o);
  std::vector<ImportResult> Import(const std::vector<std::string>& paths);

  // Opens a bundle or ack file for reading in pieces (crypto::BundleSource over pread). It must
  // be a regular file (opened without blocking, so a FIFO or a device is refused rather than
  // waited on or read for ever) of at most the largest size the format allows.
  static Result<std::unique_ptr<crypto::BundleSource>> OpenBundleFile(const std::string& path);

  ImportResult ImportOne(const std::string& path);

  // ---- data diode (daemon_diode.cc) -------------------------------------------------------------
  Status StartDiode();
  void StopDiode();

  // Sends one datagram, paced by the peer's rate limit (token bucket, 20 ms of burst: a
  // diode's receiver has no flow control, so bursts must stay small).
  void SendPaced(DiodeSender& ds, const std::string& dg);

  void DiodeSendLoop();

  // A resend request from `peer`: it has everything through `accepted` and the given ranges
  // beyond; everything else this site sent over the diode is queued again.
  void QueueResend(std::size_t peer, std::uint64_t accepted_through,
                   const std::vector<std::pair<std::uint64_t, std::uint64_t>>& have);

  void DiodeRecvLoop();

  // Peers reached only through the diode never acknowledge (unless an ack or resend-request file
  // comes back by disk). What was sent to them longer ago than their retention time counts as
  // acknowledged, so the queue stays bounded; how much was dropped that way is counted and logged.
  void ApplyDiodeRetention();

  // ---- maintenance (daemon_maintenance.cc) ------------------------------------------------------
  // Spool files nobody will use (chunks of a post that was never committed, or that arrived
  // after their post was delivered without them) are removed once unchanged for dedup_ttl:
  // after that long a chunk sent again would not be recognised as a duplicate either.
  void CollectSpools();

  void MaintenanceLoop();

  // Peers with files_auto: import what the peer left in files_dir ("<peer>-to-<site>-*"), write
  // what is new for it there, and an acknowledgement when more has arrived from it.
  void AutoFiles();

  // Deletes inbound events that every local sink has taken: the JSONL delivery and, for
  // Mattermost and webhook channels, the bridge (which has its own cursor).
  void CollectInbound();

  // Deletes the log prefix that every peer has acknowledged, and refreshes the per-peer depth
  // and oldest-unacked gauges. Everything at or below the lowest peer cursor is deletable
  // without reading it (a peer's cursor passes entries not meant for it too). The gauges come
  // from a bounded scan above that point; past the bound, depth falls back to the upper bound
  // "log head minus cursor".
  void CollectOutbound();
};

}  // namespace relay
