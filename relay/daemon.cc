#include "relay/daemon.h"

#include <fcntl.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <future>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <unordered_set>

#include <simdjson.h>
#include <sodium.h>
#include "chat/jsonl_sink.h"

#include "crypto/bundle.h"
#include "crypto/frame.h"
#include "crypto/identity.h"
#include "queue/store.h"
#include "relay/blob_spool.h"
#include "relay/event.h"
#include "relay/http_server.h"
#include "relay/ingest.h"
#include "relay/json.h"
#include "relay/log.h"
#include "relay/mattermost_bridge.h"
#include "relay/metrics.h"
#include "transports/diode.h"
#include "transports/zmq_link.h"

namespace relay {
namespace {

using Clock = std::chrono::steady_clock;

std::int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// Counter names in the store's meta family.
constexpr char kNextOrigin[] = "next/origin";  // next origin sequence of this site's events
constexpr char kNextOut[] = "next/out";        // next outbound log sequence
constexpr char kNextIn[] = "next/in";          // next inbound store sequence
constexpr char kDelivered[] = "delivered";     // inbound sequence delivered to sinks through
std::string AckedKey(const std::string& peer) { return "acked/" + peer; }
std::string AcceptedKey(const std::string& peer) { return "accepted/" + peer; }
std::string SinkPosKey(const std::string& channel) { return "sinkpos/" + channel; }
std::string ExportedKey(const std::string& peer) { return "exported/" + peer; }
std::string DiodePosKey(const std::string& peer) { return "diode/" + peer; }

// Resolves "udp://host:port" into a socket address; error names the endpoint.
Status ResolveUdp(const std::string& url, sockaddr_storage* addr, socklen_t* len) {
  std::string rest = url.substr(url.find("://") + 3);
  auto colon = rest.rfind(':');
  if (colon == std::string::npos) return Status::Error("bad UDP endpoint '" + url + "'");
  std::string host = rest.substr(0, colon), port = rest.substr(colon + 1);
  if (host.size() > 1 && host.front() == '[') host = host.substr(1, host.size() - 2);
  if (host == "*") host = "0.0.0.0";
  addrinfo hints{};
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* res = nullptr;
  if (int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &res); rc != 0 || !res)
    return Status::Error("cannot resolve '" + url + "': " + gai_strerror(rc));
  std::memcpy(addr, res->ai_addr, res->ai_addrlen);
  *len = static_cast<socklen_t>(res->ai_addrlen);
  freeaddrinfo(res);
  return Status::Ok();
}
std::string RangesKey(const std::string& peer) { return "rr:" + peer; }
constexpr std::int64_t kForeverMs = 100LL * 365 * 24 * 3600 * 1000;  // "never" for the dedup family

constexpr std::uint64_t kUnset = ~std::uint64_t{0};
constexpr std::size_t kMaxInboundQueueBytes = 256u << 20;
constexpr std::size_t kDeliveryBatchEvents = 8192;
constexpr std::size_t kDeliveryBatchBytes = 16u << 20;
constexpr std::size_t kGcScanLimit = 50'000;
// Exit status after a failed store write (EX_TEMPFAIL: a restart is expected to recover).
constexpr int kExitStoreFailed = 75;

struct InFlight {
  std::uint64_t first = 0, last = 0;
  std::uint32_t events = 0;
  bool chunk = false;  // ends with a chunk of a large attachment
};

// Frames carrying attachment chunks (up to 1 MiB each) in flight per peer, whatever the window:
// a large attachment then occupies a few MiB between the two stores, not window * frame size.
constexpr std::size_t kMaxChunkFramesInFlight = 4;

// Whether an encoded event is a kFileChunk event: only those are msgpack arrays of 15 (fixarray
// 0x9f); every other event has 14 fields (see EncodeEvent and docs/wire-format.md).
bool IsChunkEncoding(std::string_view encoded) {
  return !encoded.empty() && static_cast<unsigned char>(encoded[0]) == 0x9f;
}

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
};

// Frames that arrived off the link -- a sneakernet bundle, or messages from the diode -- stored
// on the inbound thread in one batch. They may come in any order.
struct BundleImport {
  std::deque<ReceivedFrame> frames;
  std::string bundle_key;      // "b:<bundle id>", recorded with the events (bundles only)
  bool all_or_nothing = true;  // bundles: one bad frame refuses all; diode: bad frames skipped
  bool owned = false;          // handed over without waiting: the inbound thread deletes it
  std::promise<Status> done;
};

// ReceivedFrame::link_peer for frames whose sender is only known from the frame itself.
constexpr std::size_t kAnyPeer = ~std::size_t{0};

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

}  // namespace

struct Daemon::Impl : transports::LinkHandler {
  config::Config config;
  std::optional<crypto::SiteKey> key;
  std::optional<crypto::SiteKey> previous_key;  // [site] previous_key_file, during a rotation
  std::unique_ptr<queue::Store> store;
  Metrics metrics;
  std::vector<PeerRuntime> peers;
  std::map<std::string, ChannelRuntime> channels;
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
  std::vector<std::pair<Clock::time_point, std::uint64_t>> head_samples;  // maintenance only
  std::map<std::string, Clock::time_point> auto_files_last;               // maintenance only
  std::set<std::string> auto_files_seen;                                  // maintenance only
  std::map<std::string, std::uint64_t> auto_acked;                        // maintenance only
  std::mutex bundle_mu;
  std::vector<std::thread> bundle_threads;  // export/import requests, joined at Stop

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

  // A peer by its signing key: its current key, or during a rotation its previous one.
  std::optional<std::size_t> PeerBySignKey(const crypto::PublicKey& pk) const {
    for (std::size_t i = 0; i < peers.size(); ++i) {
      if (peers[i].identity.sign_pk == pk) return i;
      const auto& prev = peers[i].config->previous_public_key;
      if (prev && prev->sign_pk == pk) return i;
    }
    return std::nullopt;
  }

  // The identity to verify a message signed by `pk` with (current or previous key).
  std::optional<crypto::PublicIdentity> LookupPeer(const crypto::PublicKey& pk) const {
    for (const PeerRuntime& p : peers) {
      if (p.identity.sign_pk == pk) return p.identity;
      const auto& prev = p.config->previous_public_key;
      if (prev && prev->sign_pk == pk) return prev;
    }
    return std::nullopt;
  }

  // Opens a frame addressed to this site, or during a rotation to its previous key.
  crypto::OpenResult OpenFrameAny(std::string_view bytes) const {
    auto lookup = [this](const crypto::PublicKey& pk) { return LookupPeer(pk); };
    crypto::OpenResult r = crypto::OpenFrame(*key, lookup, bytes);
    if (!r.ok() && previous_key && r.rejection.reason == crypto::RejectReason::kWrongRecipient) {
      crypto::OpenResult old = crypto::OpenFrame(*previous_key, lookup, bytes);
      if (old.ok() || old.rejection.reason != crypto::RejectReason::kWrongRecipient) return old;
    }
    return r;
  }

  // ---- start-up ------------------------------------------------------------------------------
  Status Open() {
    if (Status s = crypto::Init(); !s) return s;
    auto k = crypto::SiteKey::LoadFile(config.key_file);
    if (!k) return k.status();
    key.emplace(std::move(k).value());
    if (!config.previous_key_file.empty()) {
      auto old = crypto::SiteKey::LoadFile(config.previous_key_file);
      if (!old) return old.status().Wrap("[site] previous_key_file");
      previous_key.emplace(std::move(old).value());
    }
    auto st = queue::Store::Open(config.data_dir);
    if (!st) return st.status();
    store = std::move(st).value();
    // Downloads in progress when the process stopped: their posts are captured again (the store
    // lock above says no other process of this site is running).
    {
      std::error_code ec;
      std::filesystem::remove_all(SpoolOutDir(config.data_dir), ec);
    }
    delivery_waiter = std::make_unique<BlobWaiter>(config.attachment_wait);
    store->SetWriteFailureHandler([](const Status& failure) {
      // Crash-only recovery, as databases do on a failed WAL write: nothing more is written,
      // the answers already decided (503s) get a moment to leave, then the process exits and
      // its supervisor restarts it; reopening the store recovers every durable write.
      log::Error("fatal: " + failure.message() + "; exiting with code " +
                 std::to_string(kExitStoreFailed) +
                 " so that a restart reopens the store (nothing acknowledged is lost)");
      std::thread([] {
        std::this_thread::sleep_for(std::chrono::milliseconds(300));
        std::_Exit(kExitStoreFailed);
      }).detach();
    });

    peers.resize(config.peers.size());
    for (std::size_t i = 0; i < config.peers.size(); ++i) {
      PeerRuntime& p = peers[i];
      p.name = config.peers[i].name;
      p.identity = config.peers[i].public_key;
      p.config = &config.peers[i];
      metrics.peers.push_back(std::make_unique<PeerMetrics>());
      metrics.peers.back()->name = p.name;
      p.metrics = metrics.peers.back().get();
      p.acked = store->GetCounter(AckedKey(p.name), 0);
      p.send_pos = p.scan_pos = p.acked + 1;
      p.metrics->acked_through = p.acked;
      accepted.push_back(store->GetCounter(AcceptedKey(p.name), 0));
      file_ranges.push_back(DecodeRanges(store->GetDedup(RangesKey(p.name), NowMs()).value_or("")));
    }
    for (const PeerRuntime& p : peers) {
      if (key->identity() == p.identity)
        return Status::Error("[peer." + p.name + "] public_key is this site's own public key (" +
                             config.key_file + "): paste the peer's `relay pubkey` output");
    }
    for (const auto& c : config.channels) {
      ChannelRuntime& ch = channels[c.name];
      ch.config = &c;
      for (const auto& pn : c.peers) {
        for (std::size_t i = 0; i < peers.size(); ++i) {
          if (peers[i].name == pn) {
            ch.peers.push_back(i);
            ch.peer_names.push_back(pn);
          }
        }
      }
    }
    if (store->GetCounter(kNextOut, kUnset) == kUnset) {
      // A new store starts its sequences at the current time in microseconds, not at 1: if a
      // site loses its data folder but keeps its key, its new events must not reuse event ids
      // or link sequences its peers have already accepted (they would be dropped as replays).
      std::uint64_t start = static_cast<std::uint64_t>(NowMs()) * 1000;
      queue::WriteBatch b;
      b.PutCounter(kNextOrigin, start);
      b.PutCounter(kNextOut, start);
      if (Status s = store->Commit(b, true); !s) return s;
    }
    next_origin = store->GetCounter(kNextOrigin, 1);
    next_out = store->GetCounter(kNextOut, 1);
    published = next_out - 1;
    next_in = store->GetCounter(kNextIn, 1);
    stored_in = next_in - 1;
    delivered = store->GetCounter(kDelivered, 0);
    delivered_through = delivered;
    if (Status s = CountQueues(AckedCursors()); !s) return s;
    return RecoverSinks();
  }

  // ---- per-peer queue accounting -------------------------------------------------------------
  // Events routed to peer `p` in the log range (from, through].
  Result<std::uint64_t> CountRouted(std::size_t p, std::uint64_t from, std::uint64_t through) {
    std::uint64_t n = 0;
    if (through <= from) return n;
    Status s = store->ScanOutbound(from + 1, [&](const queue::OutboundEntry& e) {
      if (e.seq > through) return false;
      if (e.HasPeer(peers[p].name)) ++n;
      return true;
    });
    if (!s) return s;
    return n;
  }

  // Counts every event queued for each peer from its cursor in `acked` (one scan of the
  // unacknowledged log): at start, and after the log was rebased. No appends meanwhile (at
  // start nothing runs; otherwise the caller holds out_mu).
  Status CountQueues(const std::vector<std::uint64_t>& acked) {
    queue_counted.assign(peers.size(), 0);
    queue_added.assign(peers.size(), 0);
    recount_acked = acked;
    for (std::size_t i = 0; i < peers.size(); ++i) {
      auto n = CountRouted(i, acked[i], published.load());
      if (!n) return n.status().Wrap("counting the queue for peer '" + peers[i].name + "'");
      queue_counted[i] = *n;
      peers[i].metrics->queue_depth = *n;
    }
    return Status::Ok();
  }

  std::vector<std::uint64_t> AckedCursors() {
    std::lock_guard<std::mutex> lock(ship_mu);
    std::vector<std::uint64_t> acked(peers.size());
    for (std::size_t i = 0; i < peers.size(); ++i) acked[i] = peers[i].acked;
    return acked;
  }

  // Maintenance: moves the counts to the cursors in `acked` (the snapshot the GC that follows
  // uses, so no entry read here is deleted before) and to the current log head. Only the
  // entries a peer acknowledged since the last recount are read; appended ones were counted by
  // their writers (NoteQueued).
  void RecountQueues(const std::vector<std::uint64_t>& acked) {
    if (queues_dirty.exchange(false)) {
      std::lock_guard<std::mutex> lock(out_mu);  // no appends while counting
      if (Status s = CountQueues(AckedCursors()); !s) {
        log::Error("queue accounting: " + s.message());
        queues_dirty = true;
      }
      return;
    }
    std::vector<std::uint64_t> taken, done(peers.size(), 0);
    std::uint64_t head;
    {
      std::lock_guard<std::mutex> lock(out_mu);
      taken = queue_added;  // exactly the events appended through `head` since the last time
      head = published.load();
    }
    for (std::size_t i = 0; i < peers.size(); ++i) {
      std::uint64_t to = std::min(acked[i], head);
      if (to <= recount_acked[i]) continue;
      auto n = CountRouted(i, recount_acked[i], to);
      if (!n) {
        log::Error("queue accounting: " + n.status().message());
        return;  // counted again next time
      }
      done[i] = *n;
    }
    std::lock_guard<std::mutex> lock(out_mu);
    for (std::size_t i = 0; i < peers.size(); ++i) {
      queue_counted[i] += taken[i];
      queue_counted[i] -= std::min(queue_counted[i], done[i]);
      queue_added[i] -= taken[i];
      recount_acked[i] = std::max(recount_acked[i], std::min(acked[i], head));
      peers[i].metrics->queue_depth = queue_counted[i] + queue_added[i];
    }
  }

  // Writers of the outbound log (under out_mu) count the events they append for each peer.
  void NoteQueued(const std::vector<std::size_t>& peer_indexes) {
    for (std::size_t i : peer_indexes) ++queue_added[i];
  }

  Status RecoverSinks() {
    for (auto& [name, ch] : channels) {
      if (ch.config->sink != config::SinkKind::kJsonl) continue;
      auto f = chat::JsonlFile::Open(ch.config->jsonl_path);
      if (!f) return f.status().Wrap("channel '" + name + "'");
      ch.jsonl = std::move(f).value();
      std::uint64_t recorded = store->GetCounter(SinkPosKey(name), kUnset);
      if (recorded == kUnset) {
        // First use of this file: whatever it holds is not ours; start after it.
        queue::WriteBatch b;
        b.PutCounter(SinkPosKey(name), ch.jsonl->size());
        if (Status s = store->Commit(b, true); !s) return s;
        continue;
      }
      std::string note;
      auto r = ch.jsonl->Recover(recorded, &note);
      if (!r) return r.status();
      if (!note.empty()) log::Warning("channel '" + name + "': " + note);
    }
    return Status::Ok();
  }

  Status Start() {
    if (Status s = Open(); !s) return s;
    if (offline) {
      committer = std::thread([this] { CommitterLoop(); });
      inbound = std::thread([this] { InboundLoop(); });
      delivery = std::thread([this] { DeliveryLoop(); });
      started = true;
      return Status::Ok();
    }

    std::vector<transports::LinkPeer> link_peers;
    for (const auto& p : peers)
      link_peers.push_back(
          {p.name, p.identity, p.config->zmq_connect, p.config->previous_public_key});
    transports::ZmqLinkOptions lo;
    lo.listen = config.zmq_listen;
    lo.heartbeat_interval = config.heartbeat_interval;
    lo.peer_timeout = config.peer_timeout;
    link = std::make_unique<transports::ZmqLink>(*key, std::move(link_peers), lo, this,
                                                 previous_key ? &*previous_key : nullptr);

    HttpServer::Options ho;
    ho.host = config.ingest_listen.host;
    ho.port = config.ingest_listen.port;
    ho.max_body = config.ingest_max_body;
    ho.max_pending = std::max(config.ingest_max_pending, config.ingest_max_body);
    ho.on_busy = [this] {
      ++metrics.ingest_unavailable;
      ++metrics.ingest_busy;
    };
    http = std::make_unique<HttpServer>(
        ho, [this](HttpRequest&& req, HttpResponder respond) { Route(std::move(req), respond); });

    bool chat_sinks = false;
    for (const auto& c : config.channels)
      chat_sinks |= c.sink == config::SinkKind::kMattermost || c.sink == config::SinkKind::kWebhook;
    if (chat_sinks) {
      MattermostBridge::Hooks hooks;
      hooks.submit = [this](CaptureSubmission& sub) { return SubmitCapture(sub); };
      hooks.stored_head = [this] { return stored_in.load(); };
      hooks.store = store.get();
      hooks.metrics = &metrics;
      bridge = std::make_unique<MattermostBridge>(config, std::move(hooks));
    }
    committer = std::thread([this] {
      pthread_setname_np(pthread_self(), "relay-commit");
      CommitterLoop();
    });
    shipper = std::thread([this] {
      pthread_setname_np(pthread_self(), "relay-ship");
      ShipperLoop();
    });
    inbound = std::thread([this] {
      pthread_setname_np(pthread_self(), "relay-inbound");
      InboundLoop();
    });
    delivery = std::thread([this] {
      pthread_setname_np(pthread_self(), "relay-deliver");
      DeliveryLoop();
    });
    maintenance = std::thread([this] {
      pthread_setname_np(pthread_self(), "relay-maint");
      MaintenanceLoop();
    });
    started = true;
    if (Status s = StartDiode(); !s) return s;
    if (bridge) {
      if (Status s = bridge->Start(); !s) return s;
    }
    if (Status s = link->Start(); !s) return s;
    if (Status s = http->Start(); !s) return s;
    log::Info("site '" + config.site_name + "' serving: ingest on " + config.ingest_listen.host +
              ":" + std::to_string(http->port()) +
              (config.zmq_listen.empty() ? "" : ", zmq on " + config.zmq_listen) + ", " +
              std::to_string(peers.size()) + " peer(s), " + std::to_string(channels.size()) +
              " channel(s), identity " + key->identity().Fingerprint());
    return Status::Ok();
  }

  void Stop() {
    if (!started) return;
    started = false;
    // Order: stop taking work in, let each stage finish what it holds, then stop the links.
    if (http) http->Stop();
    {
      std::lock_guard<std::mutex> lock(bundle_mu);
      for (auto& t : bundle_threads) t.join();
      bundle_threads.clear();
    }
    if (bridge) bridge->Stop();
    {
      std::lock_guard<std::mutex> lock(ingest_mu);
      ingest_closed = true;
    }
    ingest_cv.notify_all();
    if (committer.joinable()) committer.join();
    stopping = true;
    ship_cv.notify_all();
    StopDiode();
    if (link) link->Stop();
    {
      // Taking the lock orders this wake-up after the inbound thread's check of `stopping`:
      // without it the notification can fall between check and wait and be lost.
      std::lock_guard<std::mutex> lock(in_mu);
    }
    in_cv.notify_all();
    if (inbound.joinable()) inbound.join();
    deliver_cv.notify_all();
    if (delivery.joinable()) delivery.join();
    ship_cv.notify_all();
    if (shipper.joinable()) shipper.join();
    maint_cv.notify_all();
    if (maintenance.joinable()) maintenance.join();
    log::Info("site '" + config.site_name + "' stopped");
  }

  // ---- HTTP ----------------------------------------------------------------------------------
  void Route(HttpRequest&& req, const HttpResponder& respond) {
    std::string path = req.target.substr(0, req.target.find('?'));
    if (path == "/v1/messages") {
      if (req.method != "POST") {
        respond({405, "application/json", JsonError("use POST for /v1/messages")});
        return;
      }
      Ingest(std::move(req), respond);
    } else if (path == "/healthz") {
      respond({200, "application/json", "{\"status\":\"ok\"}"});
    } else if (path == "/metrics") {
      metrics.store_bytes = store->ApproximateSize();
      respond({200, "text/plain; version=0.0.4", metrics.RenderPrometheus(config.site_name)});
    } else if (path == "/v1/bundles/export" || path == "/v1/bundles/import") {
      if (req.method != "POST") {
        respond({405, "application/json", JsonError("use POST for " + path)});
        return;
      }
      BundleRequest(path, std::move(req.body), respond);
    } else if (path == "/v1/status") {
      respond({200, "application/json", StatusJson()});
    } else {
      respond({404, "application/json", JsonError("no such endpoint: " + path)});
    }
  }

  void Ingest(HttpRequest&& req, const HttpResponder& respond) {
    ++metrics.ingest_requests;
    PendingIngest p;
    IngestError err;
    if (!ParseIngestBody(req.body, config, &p.request, &err)) {
      ++metrics.ingest_rejected;
      respond({err.http_status, "application/json", JsonError(err.message)});
      return;
    }
    p.respond = respond;
    {
      std::lock_guard<std::mutex> lock(ingest_mu);
      if (ingest_closed) {
        ++metrics.ingest_unavailable;
        respond({503, "application/json", JsonError("relay is shutting down")});
        return;
      }
      ingest_queue.push_back(std::move(p));
    }
    ingest_cv.notify_one();
  }

  // Export and import can take a while: they run on their own thread and answer when done.
  void BundleRequest(const std::string& path, std::string body, const HttpResponder& respond) {
    std::lock_guard<std::mutex> lock(bundle_mu);
    bundle_threads.emplace_back([this, path, body = std::move(body), respond] {
      simdjson::dom::parser parser;
      simdjson::dom::element doc;
      if (parser.parse(body).get(doc) || doc.type() != simdjson::dom::element_type::OBJECT) {
        respond({400, "application/json", JsonError("body must be a JSON object")});
        return;
      }
      if (path == "/v1/bundles/import") {
        std::vector<std::string> paths;
        simdjson::dom::array list;
        if (doc["paths"].get(list)) {
          respond({400, "application/json", JsonError("missing field 'paths' (array of strings)")});
          return;
        }
        for (simdjson::dom::element e : list) {
          std::string_view v;
          if (e.get(v)) {
            respond({400, "application/json", JsonError("'paths' must hold strings")});
            return;
          }
          paths.emplace_back(v);
        }
        respond({200, "application/json", ImportResultsJson(Import(paths))});
        return;
      }
      ExportOptions o;
      std::string_view v;
      if (doc["peer"].get(v)) {
        respond({400, "application/json", JsonError("missing field 'peer'")});
        return;
      }
      o.peer = std::string(v);
      if (doc["out"].get(v)) {
        respond({400, "application/json", JsonError("missing field 'out'")});
        return;
      }
      o.out_dir = std::string(v);
      bool flag = false;
      if (!doc["all"].get(flag)) o.all = flag;
      if (!doc["ack"].get(flag)) o.ack = flag;
      if (!doc["resend"].get(flag)) o.resend = flag;
      std::uint64_t n = 0;
      if (!doc["max_bytes"].get(n)) o.max_bytes = n;
      std::int64_t ttl = 0;
      if (!doc["ttl_ms"].get(ttl)) o.ttl = std::chrono::milliseconds(ttl);
      auto r = Export(o);
      if (!r) {
        respond({400, "application/json", JsonError(r.message())});
        return;
      }
      respond({200, "application/json", ExportReportJson(*r)});
    });
  }

  // One line for systemd's STATUS= and logs: "ingested 12, delivered 9, aws up (backlog 0)".
  std::string StatusLine() const {
    std::string out = "ingested " + std::to_string(metrics.events_ingested.load()) +
                      ", delivered " + std::to_string(metrics.events_delivered.load());
    for (const PeerRuntime& p : peers) {
      out += ", " + p.name + (p.metrics->link_up ? " up" : " down") + " (backlog " +
             std::to_string(p.metrics->queue_depth.load()) + ")";
    }
    return out;
  }

  std::string StatusJson() {
    std::string out = "{\"site\":" + JsonString(config.site_name) +
                      ",\"identity\":" + JsonString(key->identity().ToString()) +
                      ",\"events_ingested\":" + std::to_string(metrics.events_ingested.load()) +
                      ",\"events_delivered\":" + std::to_string(metrics.events_delivered.load()) +
                      ",\"inbound_backlog\":" + std::to_string(metrics.inbound_backlog.load()) +
                      ",\"peers\":[";
    for (std::size_t i = 0; i < peers.size(); ++i) {
      const PeerMetrics& m = *peers[i].metrics;
      if (i) out += ",";
      out += "{\"name\":" + JsonString(peers[i].name) +
             ",\"link\":" + (m.link_up ? std::string("\"up\"") : std::string("\"down\"")) +
             ",\"queue_depth\":" + std::to_string(m.queue_depth.load()) +
             ",\"acked_through\":" + std::to_string(m.acked_through.load()) +
             ",\"last_contact_ms\":" + std::to_string(link->LastContactMs(i)) +
             ",\"frames_sent\":" + std::to_string(m.frames_sent.load()) +
             ",\"frames_received\":" + std::to_string(m.frames_received.load()) + "}";
    }
    out += "]}";
    return out;
  }

  // ---- ingest committer: group commit --------------------------------------------------------
  void CommitterLoop() {
    std::vector<PendingIngest> work;
    std::vector<PendingCapture> captures;
    std::unordered_map<std::string, std::string> round_keys;  // client id -> event id
    while (true) {
      {
        std::unique_lock<std::mutex> lock(ingest_mu);
        ingest_cv.wait(
            lock, [&] { return !ingest_queue.empty() || !capture_queue.empty() || ingest_closed; });
        if (ingest_queue.empty() && capture_queue.empty() && ingest_closed) return;
        work.swap(ingest_queue);
        captures.swap(capture_queue);
      }
      CommitIngest(work, captures, round_keys);
      work.clear();
      captures.clear();
      round_keys.clear();
    }
  }

  // Submits captured chat changes through the committer (called by the Mattermost bridge).
  Status SubmitCapture(CaptureSubmission& submission) {
    std::promise<Status> done;
    auto result = done.get_future();
    {
      std::lock_guard<std::mutex> lock(ingest_mu);
      if (ingest_closed) return Status::Error("relay is shutting down");
      capture_queue.push_back({&submission, &done});
    }
    ingest_cv.notify_one();
    return result.get();
  }

  // Adds captured changes to the batch: post ids become event ids (through the mapping, which
  // a post captured in the same round may have just created).
  std::uint64_t AddCaptures(std::vector<PendingCapture>& captures, queue::WriteBatch& batch,
                            std::int64_t now) {
    std::int64_t map_expire = now + MattermostBridge::kMappingTtlMs;
    std::unordered_map<std::string, std::string> round_map;  // post id -> event id
    auto event_of = [&](const std::string& post_id) -> std::optional<std::string> {
      if (post_id.empty()) return std::nullopt;
      auto it = round_map.find(post_id);
      if (it != round_map.end()) return it->second;
      return store->GetDedup(MattermostBridge::PostToEventKey(post_id), now);
    };
    std::uint64_t added = 0;
    std::string encoded;
    for (PendingCapture& pc : captures) {
      for (CapturedChange& c : pc.submission->changes) {
        Event e;
        e.kind = c.kind;
        if (c.kind != EventKind::kPost && c.kind != EventKind::kFileChunk) {
          auto ref = event_of(c.post_id);
          if (!ref) {
            log::Warning("capture: change to post " + c.post_id +
                         " that was never bridged: skipped");
            continue;
          }
          e.ref = *ref;
        }
        if (auto thread = event_of(c.thread_post_id)) e.thread = *thread;
        auto ch = channels.find(c.channel);
        if (ch == channels.end()) continue;
        e.origin_site = config.site_name;
        e.origin_seq = next_origin++;
        e.id = MakeEventId(e.origin_site, e.origin_seq);
        e.channel = c.channel;
        e.author = std::move(c.author);
        e.text = std::move(c.text);
        e.created_at_ms = now;
        e.hops = {config.site_name};
        e.props = std::move(c.props);
        e.files = std::move(c.files);
        e.chunk = std::move(c.chunk);
        encoded.clear();
        EncodeEvent(e, &encoded);
        if (!ch->second.peer_names.empty()) {
          batch.AppendOutbound(next_out++, ch->second.peer_names, encoded);
          NoteQueued(ch->second.peers);
        }
        if (c.kind == EventKind::kPost) {
          round_map[c.post_id] = e.id;
          batch.PutDedup(MattermostBridge::PostToEventKey(c.post_id), map_expire, e.id);
          batch.PutDedup(MattermostBridge::EventToPostKey(e.id), map_expire, c.post_id);
        }
        ++added;
      }
      for (const auto& [k, v] : pc.submission->state) batch.PutDedup(k, map_expire, v);
      for (const auto& [k, v] : pc.submission->counters) batch.PutCounter(k, v);
    }
    return added;
  }

  static HttpResponse Unavailable(const std::string& why) {
    HttpResponse r{503, "application/json", JsonError(why)};
    r.retry_after_s = 1;
    return r;
  }

  // Non-empty (the reason) when data_dir's file system has less than [site] min_free free.
  // Logged when the state changes. Committer thread.
  std::string DiskLow() {
    if (config.min_free == 0) return {};
    struct statvfs fs {};
    if (statvfs(config.data_dir.c_str(), &fs) != 0) return {};  // the store will say what fails
    const std::uint64_t free_bytes = static_cast<std::uint64_t>(fs.f_bavail) * fs.f_frsize;
    const bool low = free_bytes < config.min_free;
    if (low != disk_low) {
      disk_low = low;
      if (low) {
        log::Error("data_dir '" + config.data_dir + "' has " + std::to_string(free_bytes) +
                   " bytes free, below [site] min_free (" + std::to_string(config.min_free) +
                   "): new messages are refused (503) until space is freed");
      } else {
        log::Info("data_dir '" + config.data_dir + "' has space again (" +
                  std::to_string(free_bytes) + " bytes free): accepting messages");
      }
    }
    if (!low) return {};
    return "disk nearly full: data_dir has " + std::to_string(free_bytes) +
           " bytes free, below [site] min_free (" + std::to_string(config.min_free) +
           " bytes); nothing was stored, retry later";
  }

  // Non-empty (the reason) when the items (ingest messages or captured changes: anything with
  // a `channel`) would take a peer's queue past its max_queue. Under out_mu.
  template <typename Items>
  std::string QueueFull(const Items& items) {
    std::vector<std::uint64_t> want(peers.size(), 0);
    for (const auto& item : items) {
      auto ch = channels.find(item.channel);
      if (ch == channels.end()) continue;
      for (std::size_t i : ch->second.peers) ++want[i];
    }
    for (std::size_t i = 0; i < peers.size(); ++i) {
      if (want[i] == 0) continue;
      const std::uint64_t queued = queue_counted[i] + queue_added[i];
      if (queued + want[i] > peers[i].config->max_queue) {
        ++peers[i].metrics->queue_full;
        return "queue for peer '" + peers[i].name + "' is full: " + std::to_string(queued) +
               " events wait for it ([peer." + peers[i].name +
               "] max_queue = " + std::to_string(peers[i].config->max_queue) +
               "); nothing was stored, retry when it has caught up";
      }
    }
    return {};
  }

  void CommitIngest(std::vector<PendingIngest>& work, std::vector<PendingCapture>& captures,
                    std::unordered_map<std::string, std::string>& round_keys) {
    std::int64_t now = NowMs();
    std::int64_t expire = now + config.dedup_ttl.count();
    queue::WriteBatch batch;
    std::vector<std::vector<std::pair<std::string, bool>>> answers(work.size());
    std::uint64_t new_events = 0, duplicates = 0;
    std::string encoded;
    std::lock_guard<std::mutex> lock(out_mu);
    std::uint64_t origin_before = next_origin, out_before = next_out;
    const std::vector<std::uint64_t> queued_before = queue_added;
    if (std::string low = DiskLow(); !low.empty()) {
      for (PendingCapture& pc : captures) pc.done->set_value(Status::Error(low));
      for (auto& w : work) {
        ++metrics.ingest_unavailable;
        ++metrics.ingest_disk_low;
        w.respond(Unavailable(low));
      }
      return;
    }
    std::vector<bool> refused(work.size(), false);
    for (std::size_t r = 0; r < work.size(); ++r) {
      if (std::string full = QueueFull(work[r].request.messages); !full.empty()) {
        refused[r] = true;
        ++metrics.ingest_unavailable;
        work[r].respond(Unavailable(full));
        continue;
      }
      for (const IngestMessage& m : work[r].request.messages) {
        std::string client_key;
        if (!m.client_id.empty()) {
          client_key = "c:" + m.client_id;
          auto it = round_keys.find(client_key);
          std::optional<std::string> known;
          if (it != round_keys.end()) {
            known = it->second;
          } else {
            known = store->GetDedup(client_key, now);
          }
          if (known) {
            answers[r].emplace_back(*known, true);
            ++duplicates;
            continue;
          }
        }
        const ChannelRuntime& ch = channels.at(m.channel);
        Event e;
        e.origin_site = config.site_name;
        e.origin_seq = next_origin++;
        e.id = MakeEventId(e.origin_site, e.origin_seq);
        e.kind = m.kind;
        e.channel = m.channel;
        e.author = m.author;
        e.text = m.text;
        e.thread = m.thread;
        e.ref = m.ref;
        e.created_at_ms = now;
        e.hops = {config.site_name};
        e.props = m.props;
        encoded.clear();
        EncodeEvent(e, &encoded);
        if (!ch.peer_names.empty()) {
          batch.AppendOutbound(next_out++, ch.peer_names, encoded);
          NoteQueued(ch.peers);
        }
        if (!client_key.empty()) {
          batch.PutDedup(client_key, expire, e.id);
          round_keys[client_key] = e.id;
        }
        answers[r].emplace_back(e.id, false);
        ++new_events;
      }
    }
    for (PendingCapture& pc : captures) {
      if (std::string full = QueueFull(pc.submission->changes); !full.empty()) {
        pc.done->set_value(Status::Error(full));
        pc.done = nullptr;
      }
    }
    std::erase_if(captures, [](const PendingCapture& pc) { return pc.done == nullptr; });
    new_events += AddCaptures(captures, batch, now);
    batch.PutCounter(kNextOrigin, next_origin);
    batch.PutCounter(kNextOut, next_out);
    Status s = store->Commit(batch, /*sync=*/true);
    for (PendingCapture& pc : captures) pc.done->set_value(s);
    if (!s) {
      next_origin = origin_before;
      next_out = out_before;
      queue_added = queued_before;
      log::Error("ingest commit failed, answering 503: " + s.message());
      for (std::size_t r = 0; r < work.size(); ++r) {
        if (refused[r]) continue;
        ++metrics.ingest_unavailable;
        work[r].respond(Unavailable("store cannot accept: " + s.message()));
      }
      return;
    }
    published = next_out - 1;
    ++metrics.commits;
    metrics.events_ingested += new_events;
    metrics.ingest_duplicates += duplicates;
    ship_cv.notify_all();
    for (std::size_t r = 0; r < work.size(); ++r) {
      if (refused[r]) continue;
      std::string body;
      auto one = [&](const std::pair<std::string, bool>& a) {
        body += "{\"id\":" + JsonString(a.first) + (a.second ? ",\"duplicate\":true}" : "}");
      };
      if (work[r].request.batch) {
        body.reserve(answers[r].size() * 24 + 2);
        body += "[";
        for (std::size_t i = 0; i < answers[r].size(); ++i) {
          if (i) body += ",";
          one(answers[r][i]);
        }
        body += "]";
      } else {
        one(answers[r][0]);
      }
      work[r].respond({202, "application/json", std::move(body)});
    }
  }

  // ---- link callbacks (link thread) ----------------------------------------------------------
  void OnLinkUp(std::size_t peer, std::uint64_t epoch) override {
    {
      std::lock_guard<std::mutex> lock(ship_mu);
      PeerRuntime& p = peers[peer];
      p.up = true;
      p.epoch = epoch;
      if (!p.inflight.empty()) ++p.metrics->resends;
      p.inflight.clear();
      p.send_pos = p.scan_pos = p.acked + 1;
      p.last_progress = Clock::now();
      p.metrics->link_up = 1;
    }
    log::Info("link to peer '" + peers[peer].name + "' is up");
    ship_cv.notify_all();
  }

  void OnLinkDown(std::size_t peer) override {
    {
      std::lock_guard<std::mutex> lock(ship_mu);
      PeerRuntime& p = peers[peer];
      p.up = false;
      p.inflight.clear();
      p.metrics->link_up = 0;
    }
    log::Warning("link to peer '" + peers[peer].name + "' is down (no heartbeat)");
  }

  void OnFrame(std::size_t peer, std::string bytes) override {
    peers[peer].metrics->last_contact_ms = NowMs();
    {
      std::lock_guard<std::mutex> lock(in_mu);
      if (in_queue_bytes + bytes.size() > kMaxInboundQueueBytes) return;  // resent later
      in_queue_bytes += bytes.size();
      in_queue.push_back({peer, std::move(bytes)});
    }
    in_cv.notify_one();
  }

  void OnAck(std::size_t peer, std::uint64_t seq) override {
    PeerRuntime& p = peers[peer];
    p.metrics->last_contact_ms = NowMs();
    bool advanced = false;
    if (seq > published.load()) {
      // The peer has accepted positions this log never wrote: this site's store was re-created
      // (data folder lost) with its clock behind, so its new sequences restarted below the
      // peer's cursor and the peer would drop them as replays. Never count that as an ack:
      // move the queue above the peer's cursor instead.
      RebaseLog(peer, seq);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(ship_mu);
      if (seq > p.acked) {
        p.acked = seq;
        advanced = true;
        while (!p.inflight.empty() && p.inflight.front().last <= seq) p.inflight.pop_front();
        if (p.send_pos <= seq) p.send_pos = p.scan_pos = seq + 1;
        p.last_progress = Clock::now();
        p.metrics->acked_through = seq;
      }
    }
    if (advanced) {
      // Not synced: a lost cursor update only means those frames are sent again and dropped by
      // the receiver as already accepted.
      queue::WriteBatch b;
      b.PutCounter(AckedKey(p.name), seq);
      if (Status s = store->Commit(b, false); !s) log::Error("storing ack cursor: " + s.message());
      ship_cv.notify_all();
    }
  }

  // Moves every entry of the outbound log to new positions above `floor` (in order, in one
  // synced batch), so that peer `who`, whose cursor is at `floor`, takes them as new. Other
  // peers keep their cursors: the moved entries follow them, those they had already taken come
  // again and are dropped by event id. Rare (a re-created store); holds out_mu, so ingest waits.
  void RebaseLog(std::size_t who, std::uint64_t floor) {
    std::lock_guard<std::mutex> out_lock(out_mu);
    const std::uint64_t head = published.load();
    if (floor <= head) return;  // done meanwhile
    queue::WriteBatch b;
    std::uint64_t pos = floor + 1, moved = 0;
    Status s = store->ScanOutbound(1, [&](const queue::OutboundEntry& e) {
      if (e.seq > head) return false;
      b.AppendOutbound(pos++, e.Peers(), e.event);
      ++moved;
      return true;
    });
    if (s) {
      b.DeleteOutboundRange(1, head + 1);
      b.PutCounter(kNextOut, pos);
      s = store->Commit(b, true);
    }
    if (!s) {
      log::Error("peer '" + peers[who].name + "' has accepted this site's log through " +
                 std::to_string(floor) + ", beyond its head " + std::to_string(head) +
                 ", and moving the queue above that failed: " + s.message());
      return;
    }
    next_out = pos;
    published = pos - 1;
    {
      std::lock_guard<std::mutex> lock(ship_mu);
      for (PeerRuntime& p : peers) {
        p.inflight.clear();
        p.send_pos = p.scan_pos = p.acked + 1;
      }
    }
    queues_dirty = true;
    ++metrics.log_rebases;
    log::Error("peer '" + peers[who].name + "' has accepted this site's log through " +
               std::to_string(floor) + ", beyond its head " + std::to_string(head) +
               ": this site's store was re-created while its clock was behind. " +
               std::to_string(moved) + " queued event(s) moved above that position (" +
               std::to_string(floor + 1) + ".." + std::to_string(pos - 1) +
               ") so that nothing is lost; check the clock (NTP)");
    ship_cv.notify_all();
  }

  void OnRejectedControl(const std::string& reason, const std::string& message) override {
    for (std::size_t i = 0; i < static_cast<std::size_t>(crypto::RejectReason::kCount); ++i) {
      if (reason == crypto::RejectReasonName(static_cast<crypto::RejectReason>(i))) {
        ++metrics.frames_rejected[i];
        break;
      }
    }
    if (warn_limiter.Allow()) log::Warning(message);
  }

  // ---- shipper -------------------------------------------------------------------------------
  void ShipperLoop() {
    std::unique_lock<std::mutex> lock(ship_mu);
    while (!stopping) {
      bool did_work = false;
      auto now = Clock::now();
      for (std::size_t i = 0; i < peers.size(); ++i) {
        PeerRuntime& p = peers[i];
        if (!p.up) continue;
        // No acknowledgement progress for a whole peer timeout: frames were lost with a
        // connection that ZeroMQ re-established transparently; send everything again.
        if (!p.inflight.empty() && now - p.last_progress > config.peer_timeout) {
          ++p.metrics->resends;
          p.inflight.clear();
          p.send_pos = p.scan_pos = p.acked + 1;
          p.last_progress = now;
        }
        if (p.inflight.size() >= p.config->window) continue;
        if (std::count_if(p.inflight.begin(), p.inflight.end(), [](const InFlight& f) {
              return f.chunk;
            }) >= static_cast<std::ptrdiff_t>(kMaxChunkFramesInFlight))
          continue;
        std::uint64_t head = published.load();
        if (p.scan_pos > head) continue;
        did_work |= BuildAndSend(i, lock);
      }
      if (!did_work) ship_cv.wait_for(lock, std::chrono::milliseconds(100));
    }
  }

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
  Result<BuiltFrame> BuildFrame(std::size_t peer, std::uint64_t first, std::uint64_t from,
                                std::uint64_t head, std::uint8_t flags = 0) {
    const PeerRuntime& p = peers[peer];
    std::uint64_t max_events = p.config->max_frame_events, max_bytes = p.config->max_frame_bytes;
    FramePayloadWriter payload(static_cast<std::size_t>(max_bytes) + 64 * 1024);
    std::uint64_t last_scanned = from - 1, bytes = 0;
    bool chunk = false;
    Status s = store->ScanOutbound(from, [&](const queue::OutboundEntry& e) {
      if (e.seq > head) return false;
      last_scanned = e.seq;
      if (e.HasPeer(p.name)) {
        payload.Add(e.seq, e.event);
        bytes += e.event.size();
        chunk = IsChunkEncoding(e.event);
        if (chunk || payload.count() >= max_events || bytes >= max_bytes) return false;
      }
      return true;
    });
    if (!s) return s;
    BuiltFrame f;
    f.count = payload.count();
    f.chunk = chunk;
    // Entries may have been removed by GC (acked by everyone): the range is still covered.
    if (!chunk && f.count < max_events && bytes < max_bytes)
      last_scanned = std::max(last_scanned, head);
    f.last_seq = last_scanned;
    if (f.count > 0)
      f.bytes = crypto::SealFrame(*key, p.identity, first, last_scanned, f.count, payload.Finish(),
                                  flags);
    return f;
  }

  // Called with ship_mu held; releases it while reading the store and sealing.
  bool BuildAndSend(std::size_t peer, std::unique_lock<std::mutex>& lock) {
    PeerRuntime& p = peers[peer];
    std::uint64_t epoch = p.epoch, from = p.scan_pos, first = p.send_pos;
    std::uint64_t head = published.load();
    const std::uint8_t flags = p.acked > 0 && first == p.acked + 1 ? crypto::kFrameResume : 0;
    lock.unlock();
    auto built = BuildFrame(peer, first, from, head, flags);
    lock.lock();
    if (!built) {
      log::Error("shipper: " + built.message());
      return false;
    }
    if (p.epoch != epoch || !p.up || p.scan_pos != from) return false;  // state moved on
    p.scan_pos = built->last_seq + 1;
    if (built->count == 0) return false;  // nothing for this peer; send_pos stays
    p.send_pos = built->last_seq + 1;
    if (p.inflight.empty()) p.last_progress = Clock::now();
    p.inflight.push_back({first, built->last_seq, built->count, built->chunk});
    ++p.metrics->frames_sent;
    p.metrics->events_sent += built->count;
    link->SendFrame(peer, epoch, std::move(built->bytes));
    return true;
  }

  // ---- sneakernet bundles ----------------------------------------------------------------------
  std::optional<std::size_t> PeerByName(const std::string& name) const {
    for (std::size_t i = 0; i < peers.size(); ++i)
      if (peers[i].name == name) return i;
    return std::nullopt;
  }

  // Writes `bytes` to dir/name atomically: a temporary file, fsync, rename, fsync of the folder.
  // A pulled disk never holds half a bundle under the final name. The folder may be writable by
  // others (a transfer disk): the temporary name is random and created exclusively without
  // following symlinks, so nothing planted there redirects the write; rename replaces a planted
  // final name itself, never what it points to.
  Status WriteAtomically(const std::string& dir, const std::string& name,
                         const std::string& bytes) {
    std::string tmp = dir + "/.tmp-" + RandomHex(8) + "-" + name, final_path = dir + "/" + name;
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0640);
    if (fd < 0)
      return Status::Error("cannot create '" + log::Printable(tmp) + "': " + std::strerror(errno));
    std::size_t done = 0;
    while (done < bytes.size()) {
      ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        Status st = Status::Error("cannot write '" + tmp + "': " + std::strerror(errno));
        ::close(fd);
        ::unlink(tmp.c_str());
        return st;
      }
      done += static_cast<std::size_t>(n);
    }
    if (::fsync(fd) != 0 || ::close(fd) != 0) {
      ::unlink(tmp.c_str());
      return Status::Error("cannot sync '" + tmp + "': " + std::strerror(errno));
    }
    if (::rename(tmp.c_str(), final_path.c_str()) != 0) {
      ::unlink(tmp.c_str());
      return Status::Error("cannot rename to '" + final_path + "': " + std::strerror(errno));
    }
    int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      ::fsync(dfd);
      ::close(dfd);
    }
    return Status::Ok();
  }

  std::string BundleName(const std::string& peer, const char* ext, std::int64_t now, int part) {
    std::string stamp = FormatTimestampMs(now);  // 2026-11-26T04:05:35.489Z
    std::string compact;
    for (char c : stamp)
      if (std::isdigit(static_cast<unsigned char>(c))) compact.push_back(c);
    return config.site_name + "-to-" + peer + "-" + compact + "-" + std::to_string(part) + ext;
  }

  Result<ExportReport> Export(const ExportOptions& o) {
    auto idx = PeerByName(o.peer);
    if (!idx)
      return Status::Error("unknown peer '" + o.peer + "' (no [peer." + o.peer + "] section)");
    std::error_code ec;
    if (!std::filesystem::is_directory(o.out_dir, ec))
      return Status::Error("output folder '" + o.out_dir + "' does not exist");
    std::int64_t now = NowMs();
    std::int64_t expires = o.ttl.count() > 0 ? now + o.ttl.count() : 0;
    const PeerRuntime& p = peers[*idx];
    ExportReport report;
    if (o.resend) {
      // What this site has from the peer (cursor + ranges beyond it): the peer sends the rest.
      std::uint64_t through = store->GetCounter(AcceptedKey(p.name), 0);
      auto ranges_map = DecodeRanges(store->GetDedup(RangesKey(p.name), now).value_or(""));
      std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges;
      for (const auto& [a, b] : ranges_map)
        if (a > through + 1 || b > through) ranges.emplace_back(std::max(a, through + 1), b);
      std::string bytes =
          crypto::SealResendRequest(*key, p.identity, through, ranges, now, expires);
      std::string name = BundleName(p.name, ".resend", now, 1);
      if (Status s = WriteAtomically(o.out_dir, name, bytes); !s) return s;
      report.files.push_back(o.out_dir + "/" + name);
      report.bytes = bytes.size();
      report.note = "asks '" + p.name + "' to send again everything after " +
                    std::to_string(through) + " except " + std::to_string(ranges.size()) +
                    " range(s) already here";
      return report;
    }
    if (o.ack) {
      // What this site has stored from the peer: its accepted cursor (durable value).
      std::uint64_t through = store->GetCounter(AcceptedKey(p.name), 0);
      std::string bytes = crypto::SealAck(*key, p.identity, through, now, expires);
      std::string name = BundleName(p.name, ".ack", now, 1);
      if (Status s = WriteAtomically(o.out_dir, name, bytes); !s) return s;
      report.files.push_back(o.out_dir + "/" + name);
      report.bytes = bytes.size();
      report.note =
          "acknowledges everything from '" + p.name + "' through " + std::to_string(through);
      return report;
    }
    std::uint64_t acked;
    {
      std::lock_guard<std::mutex> lock(ship_mu);
      acked = p.acked;
    }
    std::uint64_t exported = store->GetCounter(ExportedKey(p.name), 0);
    std::uint64_t first = (o.all ? acked : std::max(acked, exported)) + 1;
    std::uint64_t head = published.load();
    std::vector<std::string> frames;
    std::size_t frames_bytes = 0;
    int part = 0;
    auto flush = [&]() -> Status {
      if (frames.empty()) return Status::Ok();
      std::string bytes = crypto::SealBundle(*key, p.identity, frames, now, expires);
      std::string name = BundleName(p.name, ".bundle", now, ++part);
      if (Status s = WriteAtomically(o.out_dir, name, bytes); !s) return s;
      report.files.push_back(o.out_dir + "/" + name);
      report.bytes += bytes.size();
      if (o.progress) o.progress(report.files.back(), report.events, report.bytes);
      frames.clear();
      frames_bytes = 0;
      return Status::Ok();
    };
    std::uint64_t pos = first;
    while (pos <= head) {
      auto built = BuildFrame(*idx, pos, pos, head);
      if (!built) return built.status();
      if (built->count == 0) break;
      if (!frames.empty() && frames_bytes + built->bytes.size() > o.max_bytes)
        if (Status s = flush(); !s) return s;
      report.events += built->count;
      frames_bytes += built->bytes.size();
      frames.push_back(std::move(built->bytes));
      pos = built->last_seq + 1;
    }
    if (Status s = flush(); !s) return s;
    if (report.files.empty()) {
      report.note = "nothing to export for '" + p.name + "' (everything after " +
                    std::to_string(first - 1) +
                    " is acknowledged or exported; --all re-exports "
                    "what is not acknowledged)";
      return report;
    }
    queue::WriteBatch b;
    b.PutCounter(ExportedKey(p.name), std::max(exported, pos - 1));
    if (Status s = store->Commit(b, true); !s) return s;
    return report;
  }

  std::vector<ImportResult> Import(const std::vector<std::string>& paths) {
    std::vector<std::string> files;
    std::vector<ImportResult> results;
    for (const std::string& path : paths) {
      std::error_code ec;
      if (std::filesystem::is_directory(path, ec)) {
        std::vector<std::string> found;
        for (const auto& entry : std::filesystem::directory_iterator(path, ec)) {
          std::string name = entry.path().filename().string();
          if (name.rfind(".tmp-", 0) == 0) continue;  // an export still being written
          std::string ext = entry.path().extension().string();
          if (entry.is_regular_file() && (ext == ".bundle" || ext == ".ack" || ext == ".resend"))
            found.push_back(entry.path().string());
        }
        if (ec) results.push_back({path, false, "cannot read folder: " + ec.message(), 0});
        std::sort(found.begin(), found.end());
        files.insert(files.end(), found.begin(), found.end());
      } else {
        files.push_back(path);
      }
    }
    for (const std::string& f : files) results.push_back(ImportOne(f));
    return results;
  }

  // Reads a bundle or ack file. It must be a regular file (opened without blocking, so a FIFO or
  // a device is refused rather than waited on or read for ever) of at most the largest size the
  // format allows.
  static Status ReadBundleFile(const std::string& path, std::string* bytes) {
    constexpr std::uint64_t kMaxFile = 112 + (std::uint64_t{1} << 32) + 64;  // header, body, sig
    int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return Status::Error(std::string("cannot read: ") + std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      return Status::Error("not a regular file (FIFO, device or folder): refused");
    }
    if (static_cast<std::uint64_t>(st.st_size) > kMaxFile) {
      ::close(fd);
      return Status::Error("file of " + std::to_string(st.st_size) +
                           " bytes is larger than any bundle can be: refused");
    }
    bytes->resize(static_cast<std::size_t>(st.st_size));
    std::size_t done = 0;
    while (done < bytes->size()) {
      ssize_t n = ::read(fd, bytes->data() + done, bytes->size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      done += static_cast<std::size_t>(n);
    }
    ::close(fd);
    bytes->resize(done);  // a file that shrank while read is judged by what was read
    return Status::Ok();
  }

  ImportResult ImportOne(const std::string& path) {
    ImportResult r{path, false, "", 0};
    std::string bytes;
    if (Status s = ReadBundleFile(path, &bytes); !s) {
      r.message = s.message();
      return r;
    }
    auto lookup = [this](const crypto::PublicKey& pk) { return LookupPeer(pk); };
    std::int64_t now = NowMs();
    crypto::BundleResult opened = crypto::OpenBundle(*key, lookup, bytes, now);
    if (!opened.ok() && previous_key &&
        opened.rejection.reason == crypto::RejectReason::kWrongRecipient) {
      crypto::BundleResult old = crypto::OpenBundle(*previous_key, lookup, bytes, now);
      if (old.ok() || old.rejection.reason != crypto::RejectReason::kWrongRecipient)
        opened = std::move(old);
    }
    if (!opened.ok()) {
      if (opened.expired) {
        ++metrics.bundles_expired;
      } else {
        ++metrics.frames_rejected[static_cast<std::size_t>(opened.rejection.reason)];
      }
      r.message = opened.rejection.message;
      return r;
    }
    const crypto::Bundle& b = *opened.bundle;
    std::string bundle_key = "b:" + crypto::BundleIdHex(b.header.id);
    if (store->GetDedup(bundle_key, now)) {
      r.ok = true;
      r.message = "already imported; nothing applied again";
      return r;
    }
    std::size_t p = *PeerBySignKey(b.header.sender);
    if (b.header.kind == crypto::BundleKind::kAck || b.header.kind == crypto::BundleKind::kResend) {
      OnAck(p, b.ack_through);
      if (b.header.kind == crypto::BundleKind::kResend) QueueResend(p, b.ack_through, b.ranges);
      queue::WriteBatch wb;
      wb.PutDedup(bundle_key, now + kForeverMs, std::to_string(now));
      if (Status s = store->Commit(wb, true); !s) {
        r.message = s.message();
        return r;
      }
      r.ok = true;
      r.message = "peer '" + peers[p].name + "' acknowledges everything through " +
                  std::to_string(b.ack_through);
      return r;
    }
    BundleImport import;
    import.bundle_key = bundle_key;
    for (const std::string& frame : b.frames) import.frames.push_back({p, frame});
    std::uint64_t before = peers[p].metrics->events_received.load();
    Status s = ImportFrames(import);
    if (!s) {
      r.message = "bundle refused, nothing imported: " + s.message();
      return r;
    }
    r.ok = true;
    r.events = peers[p].metrics->events_received.load() - before;
    r.message = "imported " + std::to_string(r.events) + " new event(s) from '" + peers[p].name +
                "' (" + std::to_string(b.frames.size()) + " frame(s))";
    return r;
  }

  // ---- data diode ------------------------------------------------------------------------------
  Status StartDiode() {
    for (std::size_t i = 0; i < peers.size(); ++i) {
      const config::PeerConfig& pc = *peers[i].config;
      if (pc.diode_send.empty()) continue;
      auto ds = std::make_unique<DiodeSender>();
      ds->peer = i;
      if (Status s = ResolveUdp(pc.diode_send, &ds->addr, &ds->addr_len); !s) return s;
      ds->fd = ::socket(ds->addr.ss_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
      if (ds->fd < 0)
        return Status::Error("cannot create a UDP socket: " + std::string(std::strerror(errno)));
      int buf = 4 << 20;
      ::setsockopt(ds->fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
      transports::DiodeParams params;
      params.data_shards = static_cast<std::uint16_t>(pc.diode_data_shards);
      params.parity_shards = static_cast<std::uint16_t>(pc.diode_parity_shards);
      params.interleave = static_cast<std::uint16_t>(pc.diode_interleave);
      std::uint64_t stream = 0;
      randombytes_buf(&stream, sizeof stream);
      ds->encoder = std::make_unique<transports::DiodeEncoder>(stream, params);
      std::uint64_t sent = store->GetCounter(DiodePosKey(peers[i].name), 0);
      ds->scan = std::max(sent, peers[i].acked) + 1;
      ds->pos = ds->scan;
      ds->refill = Clock::now();
      diode_senders.push_back(std::move(ds));
    }
    if (!diode_senders.empty()) {
      diode_send_thread = std::thread([this] {
        pthread_setname_np(pthread_self(), "relay-diode-tx");
        DiodeSendLoop();
      });
    }
    if (!config.diode_listen.empty()) {
      sockaddr_storage addr{};
      socklen_t len = 0;
      if (Status s = ResolveUdp(config.diode_listen, &addr, &len); !s) return s;
      diode_recv_fd = ::socket(addr.ss_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
      // A large receive buffer absorbs bursts while frames are stored. SO_RCVBUFFORCE passes
      // net.core.rmem_max when the process may (root, CAP_NET_ADMIN); else the capped size.
      int buf = 64 << 20;
      if (::setsockopt(diode_recv_fd, SOL_SOCKET, SO_RCVBUFFORCE, &buf, sizeof buf) != 0)
        ::setsockopt(diode_recv_fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
      if (diode_recv_fd < 0 || ::bind(diode_recv_fd, reinterpret_cast<sockaddr*>(&addr), len) != 0)
        return Status::Error("cannot listen on '" + config.diode_listen +
                             "': " + std::strerror(errno));
      timeval tv{0, 200000};
      ::setsockopt(diode_recv_fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
      diode_recv_thread = std::thread([this] {
        pthread_setname_np(pthread_self(), "relay-diode-rx");
        DiodeRecvLoop();
      });
    }
    return Status::Ok();
  }

  void StopDiode() {
    if (diode_send_thread.joinable()) diode_send_thread.join();
    if (diode_recv_thread.joinable()) diode_recv_thread.join();
    for (auto& ds : diode_senders)
      if (ds->fd >= 0) ::close(ds->fd);
    if (diode_recv_fd >= 0) ::close(diode_recv_fd);
    diode_recv_fd = -1;
  }

  // Sends one datagram, paced by the peer's rate limit (token bucket, 20 ms of burst: a
  // diode's receiver has no flow control, so bursts must stay small).
  void SendPaced(DiodeSender& ds, const std::string& dg) {
    double rate = static_cast<double>(peers[ds.peer].config->diode_rate);
    while (!stopping) {
      auto now = Clock::now();
      ds.tokens =
          std::min(rate, ds.tokens + rate * std::chrono::duration<double>(now - ds.refill).count());
      ds.refill = now;
      if (ds.tokens >= static_cast<double>(dg.size())) break;
      double wait_s = (static_cast<double>(dg.size()) - ds.tokens) / rate;
      std::this_thread::sleep_for(std::chrono::duration<double>(std::min(wait_s, 0.005)));
    }
    ds.tokens -= static_cast<double>(dg.size());
    // A full socket buffer or an unreachable receiver: the datagram is lost, which is what a
    // diode does anyway; FEC, heartbeats and resend requests deal with it.
    if (::sendto(ds.fd, dg.data(), dg.size(), 0, reinterpret_cast<sockaddr*>(&ds.addr),
                 ds.addr_len) == static_cast<ssize_t>(dg.size()))
      ++metrics.diode_datagrams_sent;
  }

  void DiodeSendLoop() {
    std::vector<std::string> datagrams;
    while (!stopping) {
      bool did = false;
      for (auto& dsp : diode_senders) {
        DiodeSender& ds = *dsp;
        auto now = Clock::now();
        if (now - ds.last_heartbeat >= config.heartbeat_interval) {
          ds.last_heartbeat = now;
          SendPaced(ds, ds.encoder->Heartbeat());
        }
        // Ranges asked for again by a resend request come first.
        std::uint64_t first, from, head;
        bool resending = false;
        {
          std::lock_guard<std::mutex> lock(diode_mu);
          if (!ds.resend.empty()) {
            first = from = ds.resend.front().first;
            head = ds.resend.front().second;
            ds.resend.pop_front();
            resending = true;
          }
        }
        if (!resending) {
          first = ds.pos.load();
          from = ds.scan;
          head = published.load();
          if (from > head) continue;
        }
        while (from <= head && !stopping) {
          auto built = BuildFrame(ds.peer, first, from, head);
          if (!built) {
            log::Error("diode sender: " + built.message());
            break;
          }
          from = built->last_seq + 1;
          if (built->count == 0) continue;
          datagrams.clear();
          ds.encoder->Encode(built->bytes, &datagrams);
          for (const std::string& dg : datagrams) SendPaced(ds, dg);
          ++peers[ds.peer].metrics->frames_sent;
          peers[ds.peer].metrics->events_sent += built->count;
          first = from;
          did = true;
          if (!resending) ds.pos = from;
        }
        if (!resending) {
          ds.scan = from;
          queue::WriteBatch b;
          b.PutCounter(DiodePosKey(peers[ds.peer].name), ds.pos - 1);
          (void)store->Commit(b, false);  // lost: those frames are sent again, deduplicated
        }
      }
      if (!did) {
        std::unique_lock<std::mutex> lock(ship_mu);
        ship_cv.wait_for(lock, std::chrono::milliseconds(100));
      }
    }
  }

  // A resend request from `peer`: it has everything through `accepted` and the given ranges
  // beyond; everything else this site sent over the diode is queued again.
  void QueueResend(std::size_t peer, std::uint64_t accepted_through,
                   const std::vector<std::pair<std::uint64_t, std::uint64_t>>& have) {
    for (auto& dsp : diode_senders) {
      if (dsp->peer != peer) continue;
      std::lock_guard<std::mutex> lock(diode_mu);
      std::uint64_t next = accepted_through + 1, end = dsp->pos - 1;
      std::size_t queued = 0;
      for (const auto& [a, b] : have) {
        if (a > next && next <= end) {
          dsp->resend.emplace_back(next, std::min(a - 1, end));
          ++queued;
        }
        next = std::max(next, b + 1);
      }
      if (next <= end) {
        dsp->resend.emplace_back(next, end);
        ++queued;
      }
      metrics.diode_resend_ranges += queued;
      log::Info("resend request from '" + peers[peer].name + "': " + std::to_string(queued) +
                " range(s) queued for the diode again");
    }
    ship_cv.notify_all();
  }

  void DiodeRecvLoop() {
    transports::DiodeDecoder decoder;
    std::vector<transports::DiodeDecoder::Message> done;
    std::string buf(65536, '\0');
    auto last_stats = Clock::now();
    while (!stopping) {
      done.clear();
      // Read what is there (bounded), then store the frames completed so far in one batch.
      for (int i = 0; i < 4096; ++i) {
        ssize_t n = ::recv(diode_recv_fd, buf.data(), buf.size(), i == 0 ? 0 : MSG_DONTWAIT);
        if (n < 0) break;
        ++metrics.diode_datagrams_received;
        Status s = decoder.Feed(std::string_view(buf.data(), static_cast<std::size_t>(n)), &done);
        if (!s) {
          ++metrics.diode_datagrams_malformed;
          if (warn_limiter.Allow()) log::Warning("diode datagram refused: " + s.message());
        }
      }
      if (!done.empty()) {
        auto import = std::make_unique<BundleImport>();
        import->all_or_nothing = false;
        for (auto& m : done) import->frames.push_back({kAnyPeer, std::move(m.bytes)});
        metrics.diode_messages_received += done.size();
        SubmitFramesAsync(std::move(import));
      }
      if (Clock::now() - last_stats > std::chrono::seconds(1)) {
        last_stats = Clock::now();
        std::uint64_t missing = 0;
        for (const auto& st : decoder.Streams()) missing += decoder.MissingCount(st.stream_id);
        metrics.diode_shards_recovered = decoder.recovered_shards();
        metrics.diode_messages_missing = missing;
        if (decoder.streams_dropped() > metrics.diode_streams_dropped) {
          log::Warning("diode: state of " +
                       std::to_string(decoder.streams_dropped() - metrics.diode_streams_dropped) +
                       " sender stream(s) dropped for newer ones (more than " +
                       std::to_string(transports::kDiodeMaxStreams) +
                       " seen: sender restarts, or datagrams forged on the diode's network)");
          metrics.diode_streams_dropped = decoder.streams_dropped();
        }
      }
    }
  }

  // ---- inbound -------------------------------------------------------------------------------
  void Reject(crypto::RejectReason reason, const std::string& message) {
    ++metrics.frames_rejected[static_cast<std::size_t>(reason)];
    if (warn_limiter.Allow()) log::Warning(message);
  }

  void InboundLoop() {
    std::deque<ReceivedFrame> work;
    std::deque<BundleImport*> imports;
    while (true) {
      {
        std::unique_lock<std::mutex> lock(in_mu);
        in_cv.wait(lock, [&] { return !in_queue.empty() || !in_imports.empty() || stopping; });
        if (in_queue.empty() && in_imports.empty() && stopping) return;
        work.swap(in_queue);
        imports.swap(in_imports);
        in_queue_bytes = 0;
      }
      if (!work.empty()) (void)ProcessFrames(work, nullptr);
      work.clear();
      for (BundleImport* b : imports) {
        Status st = ProcessFrames(b->frames, b);
        if (b->owned) {
          if (!st) log::Error("storing received frames failed: " + st.message());
          delete b;
        } else {
          b->done.set_value(st);
        }
      }
      imports.clear();
    }
  }

  // Hands a bundle's frames to the inbound thread and waits until they are stored (or not).
  Status ImportFrames(BundleImport& bundle) {
    auto result = bundle.done.get_future();
    {
      std::lock_guard<std::mutex> lock(in_mu);
      if (stopping) return Status::Error("relay is shutting down");
      in_imports.push_back(&bundle);
    }
    in_cv.notify_one();
    return result.get();
  }

  // Hands frames to the inbound thread without waiting (the diode receiver must keep reading
  // its socket while they are stored). Bounded by the inbound queue's byte limit: frames beyond
  // it are dropped, and come back through FEC-less loss handling (resend requests).
  void SubmitFramesAsync(std::unique_ptr<BundleImport> import) {
    std::size_t bytes = 0;
    for (const auto& f : import->frames) bytes += f.bytes.size();
    {
      std::lock_guard<std::mutex> lock(in_mu);
      if (stopping || in_queue_bytes + bytes > kMaxInboundQueueBytes) return;
      in_queue_bytes += bytes;
      import->owned = true;
      in_imports.push_back(import.release());
    }
    in_cv.notify_one();
  }

  // Records that a file frame covered [first, last] of the peer's log, and moves the peer's
  // accepted cursor over every range that now joins it.
  void CoverRange(std::size_t p, std::uint64_t first, std::uint64_t last) {
    auto& ranges = file_ranges[p];
    std::uint64_t& end = ranges[first];
    end = std::max(end, last);
    while (!ranges.empty() && ranges.begin()->first <= accepted[p] + 1) {
      accepted[p] = std::max(accepted[p], ranges.begin()->second);
      ranges.erase(ranges.begin());
    }
  }

  // Whether sequence `seq` of peer p's log was stored before: at or below the cursor, or inside
  // a range received out of order (bundles, diode).
  bool AlreadyAccepted(std::size_t p, std::uint64_t seq) const {
    if (seq <= accepted[p]) return true;
    for (auto it = file_ranges[p].begin(); it != file_ranges[p].end() && it->first <= seq; ++it)
      if (seq <= it->second) return true;
    return false;
  }

  static std::string EncodeRanges(const std::map<std::uint64_t, std::uint64_t>& ranges) {
    std::string out;
    for (const auto& [a, b] : ranges) out += std::to_string(a) + "-" + std::to_string(b) + ",";
    return out;
  }

  static std::map<std::uint64_t, std::uint64_t> DecodeRanges(const std::string& text) {
    std::map<std::uint64_t, std::uint64_t> out;
    std::size_t pos = 0;
    while (pos < text.size()) {
      auto dash = text.find('-', pos), comma = text.find(',', pos);
      if (dash == std::string::npos || comma == std::string::npos || dash > comma) break;
      out[std::stoull(text.substr(pos, dash - pos))] =
          std::stoull(text.substr(dash + 1, comma - dash - 1));
      pos = comma + 1;
    }
    return out;
  }

  struct Forward {
    std::vector<std::string> peers;       // names, as the log stores them
    std::vector<std::size_t> peer_index;  // the same peers, for the queue accounting
    std::string encoded;
  };

  // Verifies, de-duplicates and stores received frames in one synced batch, then acknowledges.
  // Frames from the link must continue the peer's sequence (replay and gap checks). Frames of a
  // sneakernet bundle (`bundle` set) may come in any order: they are checked by event id only,
  // mark their range as received, and are all-or-nothing (any bad frame refuses the bundle).
  Status ProcessFrames(std::deque<ReceivedFrame>& work, BundleImport* bundle) {
    std::int64_t now = NowMs();
    std::int64_t expire = now + config.dedup_ttl.count();
    queue::WriteBatch batch;
    std::vector<std::uint64_t> accepted_before = accepted;
    auto ranges_before = file_ranges;
    std::uint64_t in_before = next_in;
    std::set<std::size_t> ack_peers;
    std::unordered_set<std::string> round_ids;
    std::vector<Forward> forwards;
    std::vector<std::uint64_t> frames_ok(peers.size(), 0), events_ok(peers.size(), 0);
    std::uint64_t dedup = 0, chunks_written = 0;
    // Chunks of large attachments go to their spool file, not into the inbound store: written
    // at their offset (again after a crash: harmless) and synced before the batch that records
    // them as received and acknowledges them is committed.
    ChunkWriter chunks;
    Status spool_status;
    for (ReceivedFrame& rf : work) {
      crypto::OpenResult opened = OpenFrameAny(rf.bytes);
      if (!opened.ok()) {
        Reject(opened.rejection.reason, opened.rejection.message);
        if (bundle && bundle->all_or_nothing) return Status::Error(opened.rejection.message);
        continue;
      }
      const crypto::FrameHeader& h = opened.frame->header;
      std::size_t p = *PeerBySignKey(h.sender);
      const std::string& pname = peers[p].name;
      // Link frames continue the peer's sequence: what is at or below `acc` was stored before.
      // Bundle and diode frames come in any order: an event was stored before if its sequence
      // is at or below the cursor or inside a range received earlier (durable, unlike the
      // dedup index, which forgets after dedup_ttl while a bundle may live longer).
      std::uint64_t acc = bundle ? 0 : accepted[p];
      auto stored_before = [&](std::uint64_t seq) {
        return bundle ? AlreadyAccepted(p, seq) : seq <= acc;
      };
      if (bundle && rf.link_peer != kAnyPeer && rf.link_peer != p) {
        return Status::Error("a frame inside the bundle is from peer '" + pname +
                             "', not from the bundle's sender");
      }
      if (!bundle && h.last_seq <= acc) {
        Reject(crypto::RejectReason::kReplay,
               "frame from peer '" + pname + "' rejected: replay of sequences " +
                   std::to_string(h.first_seq) + ".." + std::to_string(h.last_seq) +
                   ", already accepted through " + std::to_string(acc));
        ack_peers.insert(p);  // the sender may have missed our ack
        continue;
      }
      // A gap: frames before this one are missing. With nothing accepted yet, a frame that
      // does not start at 1 must say it resumes from a cursor we acknowledged (kFrameResume).
      if (!bundle && h.first_seq > acc + 1 && (acc != 0 || !(h.flags & crypto::kFrameResume))) {
        ++metrics.inbound_dropped[static_cast<std::size_t>(InboundDrop::kGap)];
        if (warn_limiter.Allow())
          log::Warning("frame from peer '" + pname + "' starts at " + std::to_string(h.first_seq) +
                       " but only " + std::to_string(acc) +
                       " is accepted: dropped, it is sent again in order");
        continue;
      }
      auto payload = DecodeFramePayload(opened.frame->plaintext);
      std::string bad;
      std::vector<Event> events;
      if (!payload) {
        bad = payload.message();
      } else if (payload->size() != h.event_count) {
        bad = "header says " + std::to_string(h.event_count) + " events, payload has " +
              std::to_string(payload->size());
      } else {
        for (const FramedEvent& fe : *payload) {
          if (fe.seq < h.first_seq || fe.seq > h.last_seq) {
            bad = "event sequence " + std::to_string(fe.seq) + " outside the frame's range";
            break;
          }
          if (stored_before(fe.seq)) {
            events.emplace_back();  // placeholder, already accepted earlier
            continue;
          }
          auto ev = DecodeEvent(fe.encoded);
          if (!ev) {
            bad = ev.message();
            break;
          }
          events.push_back(std::move(ev).value());
        }
      }
      if (!bad.empty()) {
        Reject(crypto::RejectReason::kMalformed,
               "frame from peer '" + pname + "' rejected: malformed payload: " + bad);
        if (bundle && bundle->all_or_nothing)
          return Status::Error("a frame's payload is malformed: " + bad);
        continue;
      }
      // One batched lookup of the frame's event ids in the dedup index.
      std::vector<std::string> dkeys(events.size());
      for (std::size_t k = 0; k < events.size(); ++k)
        if (!stored_before((*payload)[k].seq)) dkeys[k] = "e:" + events[k].id;
      std::vector<bool> known = store->HasDedup(dkeys, now);
      for (std::size_t k = 0; k < events.size(); ++k) {
        const FramedEvent& fe = (*payload)[k];
        if (stored_before(fe.seq)) {
          if (bundle) ++dedup;  // received before, by the link or another bundle
          continue;
        }
        Event& ev = events[k];
        auto ch = channels.find(ev.channel);
        if (ch == channels.end() || std::find(ch->second.peers.begin(), ch->second.peers.end(),
                                              p) == ch->second.peers.end()) {
          ++metrics.inbound_dropped[static_cast<std::size_t>(InboundDrop::kUnroutable)];
          if (warn_limiter.Allow())
            log::Warning("event " + ev.id + " from peer '" + pname + "' for channel '" +
                         ev.channel + "', which is not bridged with that peer: dropped");
          continue;
        }
        if (std::find(ev.hops.begin(), ev.hops.end(), config.site_name) != ev.hops.end() ||
            ev.origin_site == config.site_name || ev.hops.size() >= kMaxHops) {
          ++metrics.inbound_dropped[static_cast<std::size_t>(InboundDrop::kLoop)];
          continue;
        }
        std::string& dkey = dkeys[k];
        if (known[k] || round_ids.count(dkey)) {
          ++dedup;
          continue;
        }
        round_ids.insert(dkey);
        if (ev.kind == EventKind::kFileChunk) {
          if (spool_status) {
            spool_status =
                chunks.Write(SpoolInPath(config.data_dir, ev.origin_site, ev.chunk.blob_id),
                             ev.chunk.offset, ev.chunk.data);
          }
          ++chunks_written;
        } else {
          batch.PutInbound(next_in++, fe.encoded);
        }
        batch.PutDedup(dkey, expire, "");
        ++events_ok[p];
        // Forward to the channel's other peers that the event has not passed through.
        Forward f;
        for (std::size_t q : ch->second.peers) {
          if (q == p) continue;
          if (std::find(ev.hops.begin(), ev.hops.end(), peers[q].name) != ev.hops.end()) continue;
          f.peers.push_back(peers[q].name);
          f.peer_index.push_back(q);
        }
        if (!f.peers.empty()) {
          ev.hops.push_back(config.site_name);
          EncodeEvent(ev, &f.encoded);
          forwards.push_back(std::move(f));
        }
      }
      if (bundle) {
        CoverRange(p, h.first_seq, h.last_seq);
        batch.PutDedup(RangesKey(pname), now + kForeverMs, EncodeRanges(file_ranges[p]));
      } else {
        accepted[p] = h.last_seq;
      }
      batch.PutCounter(AcceptedKey(pname), accepted[p]);
      ack_peers.insert(p);
      ++frames_ok[p];
    }
    if (bundle && !bundle->bundle_key.empty())
      batch.PutDedup(bundle->bundle_key, now + kForeverMs, std::to_string(now));
    if (batch.Count() > 0) {
      batch.PutCounter(kNextIn, next_in);
      Status s = spool_status;
      if (s) s = chunks.Sync();
      if (!s) {
        chunks.Close();
      } else if (forwards.empty()) {
        s = store->Commit(batch, true);
      } else {
        std::lock_guard<std::mutex> lock(out_mu);
        std::uint64_t out_before = next_out;
        const std::vector<std::uint64_t> queued_before = queue_added;
        for (const Forward& f : forwards) {
          batch.AppendOutbound(next_out++, f.peers, f.encoded);
          NoteQueued(f.peer_index);
        }
        batch.PutCounter(kNextOut, next_out);
        s = store->Commit(batch, true);
        if (s) {
          published = next_out - 1;
        } else {
          next_out = out_before;
          queue_added = queued_before;
        }
      }
      if (!s) {
        // Nothing is acknowledged; the senders will send these frames again.
        log::Error("storing received events failed: " + s.message());
        accepted = accepted_before;
        file_ranges = ranges_before;
        next_in = in_before;
        if (bundle) return s;
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
        return s;
      }
      stored_in = next_in - 1;
      metrics.blob_chunks_received += chunks_written;
      if (!forwards.empty()) {
        metrics.events_forwarded += forwards.size();
        ship_cv.notify_all();
      }
      deliver_cv.notify_one();
      if (bridge) bridge->Notify();
    }
    metrics.dedup_hits += dedup;
    for (std::size_t p = 0; p < peers.size(); ++p) {
      peers[p].metrics->frames_received += frames_ok[p];
      peers[p].metrics->events_received += events_ok[p];
    }
    if (link)
      for (std::size_t p : ack_peers) link->SendAck(p, accepted[p]);
    return Status::Ok();
  }

  // ---- delivery ------------------------------------------------------------------------------
  void DeliveryLoop() {
    while (true) {
      {
        std::unique_lock<std::mutex> lock(deliver_mu);
        deliver_cv.wait_for(lock, std::chrono::milliseconds(500),
                            [&] { return stored_in.load() > delivered || stopping; });
        // Online, stop after the batch at hand (what is stored is delivered after the restart);
        // offline (`relay import`), deliver everything first.
        if (stopping && (!offline || stored_in.load() <= delivered)) return;
      }
      if (stored_in.load() > delivered && !DeliverBatch()) {
        ++metrics.delivery_failures;
        std::unique_lock<std::mutex> lock(deliver_mu);
        deliver_cv.wait_for(lock, std::chrono::seconds(1), [&] { return stopping.load(); });
        if (stopping) return;
      } else if (delivery_blocked) {
        // A post waits for chunks of its attachments: new inbound commits wake us.
        std::unique_lock<std::mutex> lock(deliver_mu);
        deliver_cv.wait_for(lock, std::chrono::milliseconds(250));
        if (stopping && !offline) return;
      }
    }
  }

  // Writes the next batch of stored events to their sinks. False on a sink failure, after
  // restoring every file to its recorded size so that the retry cannot duplicate lines.
  bool DeliverBatch() {
    // channel -> lines of this batch; the buffers are kept across batches (no regrowth).
    std::map<std::string, std::string>& lines = delivery_lines;
    for (auto& [name, text] : lines) text.clear();
    std::uint64_t last = delivered, count = 0, bytes = 0;
    delivery_blocked = false;
    std::vector<std::pair<std::string, std::string>> moves;  // verified spool file -> target
    std::vector<std::string> drop;                           // spool files of missing blobs
    std::vector<std::string> done_ids;                       // events the waiter can forget
    Status s = store->ScanInbound(delivered + 1, [&](std::uint64_t seq, std::string_view enc) {
      auto ev = DecodeEvent(enc);
      if (ev) {
        auto ch = channels.find(ev->channel);
        if (ch != channels.end() && ch->second.jsonl) {
          std::vector<chat::DeliveredFile> placed;
          if (!PlaceBlobs(*ev, ch->second, &placed, &moves, &drop)) {
            delivery_blocked = true;  // wait for its chunks; deliver what comes before it
            return false;
          }
          if (!placed.empty()) done_ids.push_back(ev->id);
          std::string& out = lines[ev->channel];
          std::size_t before = out.size();
          chat::AppendJsonlLine(*ev, &out, placed);
          bytes += out.size() - before;
          ++count;
        }
      } else {
        log::Error("stored event " + std::to_string(seq) + " does not decode: " + ev.message());
      }
      last = seq;
      return count < kDeliveryBatchEvents && bytes < kDeliveryBatchBytes;
    });
    if (!s) {
      log::Error("delivery: " + s.message());
      return false;
    }
    if (last == delivered) return true;
    // Blobs go next to the sink before the lines that name them: a line is never durable
    // without its file. A crash in between delivers the line again and finds the file there.
    for (const auto& [from, to] : moves) {
      if (Status m = MoveBlob(from, to); !m) {
        log::Error("delivery: placing an attachment failed (retrying): " + m.message());
        return false;
      }
      ++metrics.blobs_delivered;
    }
    queue::WriteBatch batch;
    for (auto& [name, text] : lines) {
      if (text.empty()) continue;  // channel not in this batch
      chat::JsonlFile& f = *channels[name].jsonl;
      std::uint64_t before = f.size();
      Status w = f.Append(text);
      if (w) w = f.Sync();
      if (!w) {
        log::Error("delivery to channel '" + name + "' failed (retrying): " + w.message());
        RollbackSinks(lines, name, before);
        return false;
      }
      batch.PutCounter(SinkPosKey(name), f.size());
    }
    batch.PutCounter(kDelivered, last);
    // Not synced: the files are synced, and a lost cursor means the files are cut back to the
    // recorded sizes at start and the same events written again.
    if (Status c = store->Commit(batch, false); !c) {
      log::Error("recording delivery failed (retrying): " + c.message());
      RollbackSinks(lines, "", 0);
      return false;
    }
    delivered = last;
    delivered_through = last;
    for (const std::string& path : drop) ::unlink(path.c_str());
    for (const std::string& id : done_ids) delivery_waiter->Forget(id);
    metrics.events_delivered += count;
    metrics.inbound_backlog = stored_in.load() - delivered;
    return true;
  }

  // For a post with blob attachments: where each goes next to the sink
  // ("<jsonl_path>.files/<event id>-<n>-<name>", the name sanitized), adding the moves of
  // complete spool files to *moves and the spool files of blobs given up on to *drop. False
  // while a blob is incomplete and [site] attachment_wait has not passed since first seen.
  bool PlaceBlobs(const Event& ev, const ChannelRuntime& ch,
                  std::vector<chat::DeliveredFile>* placed,
                  std::vector<std::pair<std::string, std::string>>* moves,
                  std::vector<std::string>* drop) {
    bool any = false;
    for (const Attachment& a : ev.files) any |= a.is_blob();
    if (!any) return true;
    placed->assign(ev.files.size(), {});
    std::vector<std::pair<std::string, std::string>> mine;
    std::vector<std::string> gone;
    for (std::size_t i = 0; i < ev.files.size(); ++i) {
      const Attachment& a = ev.files[i];
      if (!a.is_blob()) continue;
      const std::string target = ch.config->jsonl_path + ".files/" +
                                 SanitizeFileName(ev.id + "-" + std::to_string(i) + "-" + a.name);
      struct stat st {};
      if (::stat(target.c_str(), &st) == 0 && static_cast<std::uint64_t>(st.st_size) == a.size) {
        (*placed)[i].path = target;  // placed before a crash or an earlier failed batch
        continue;
      }
      const std::string spool = SpoolInPath(config.data_dir, ev.origin_site, a.blob_id);
      std::string why;
      switch (delivery_waiter->Check(ev.id, spool, a, &why)) {
        case BlobState::kWaiting:
          return false;
        case BlobState::kReady:
          mine.emplace_back(spool, target);
          (*placed)[i].path = target;
          break;
        case BlobState::kMissing:
          ++metrics.blobs_missing;
          log::Warning("event " + ev.id + ": attachment '" + a.name + "' is missing: " + why);
          (*placed)[i].missing = "the attachment did not arrive within attachment_wait: " + why;
          gone.push_back(spool);
          break;
      }
    }
    moves->insert(moves->end(), mine.begin(), mine.end());
    drop->insert(drop->end(), gone.begin(), gone.end());
    return true;
  }

  // Cuts each touched file back to its recorded size.
  void RollbackSinks(const std::map<std::string, std::string>& lines, const std::string& failed,
                     std::uint64_t failed_before) {
    for (const auto& entry : lines) {
      const std::string& name = entry.first;
      chat::JsonlFile& f = *channels[name].jsonl;
      std::uint64_t recorded =
          name == failed ? failed_before : store->GetCounter(SinkPosKey(name), f.size());
      std::string note;
      if (auto r = f.Recover(recorded, &note); !r) log::Error(r.message());
    }
  }

  // ---- maintenance ---------------------------------------------------------------------------
  // Spool files nobody will use (chunks of a post that was never committed, or that arrived
  // after their post was delivered without them) are removed once unchanged for dedup_ttl:
  // after that long a chunk sent again would not be recognised as a duplicate either.
  void CollectSpools() {
    if (Clock::now() - last_spool_collection < std::chrono::minutes(10) &&
        last_spool_collection != Clock::time_point{})
      return;
    last_spool_collection = Clock::now();
    std::size_t n = CollectSpool(config.data_dir + "/spool/in", config.dedup_ttl);
    if (n > 0) {
      metrics.spool_collected += n;
      log::Info("removed " + std::to_string(n) + " orphaned spool file(s) older than dedup_ttl");
    }
  }

  void MaintenanceLoop() {
    while (!stopping) {
      {
        std::unique_lock<std::mutex> lock(maint_mu);
        maint_cv.wait_for(lock, std::chrono::seconds(1), [&] { return stopping.load(); });
      }
      if (stopping) return;
      CollectOutbound();
      CollectInbound();
      CollectSpools();
      AutoFiles();
      // Expired dedup entries go with RocksDB's compactions; force one every few hours so
      // an idle site does not keep them for ever.
      if (Clock::now() - last_dedup_compaction > std::chrono::hours(6)) {
        last_dedup_compaction = Clock::now();
        if (Status c = store->CompactDedup(); !c) log::Error(c.message());
      }
      metrics.store_bytes = store->ApproximateSize();
    }
  }

  // Peers with files_auto: import what the peer left in files_dir ("<peer>-to-<site>-*"), write
  // what is new for it there, and an acknowledgement when more has arrived from it.
  void AutoFiles() {
    auto now = Clock::now();
    for (std::size_t i = 0; i < peers.size(); ++i) {
      const config::PeerConfig& pc = *peers[i].config;
      if (!pc.files_auto) continue;
      auto& last = auto_files_last[pc.name];
      if (now - last < pc.files_interval) continue;
      last = now;
      std::vector<std::string> incoming;
      std::error_code ec;
      std::string prefix = pc.name + "-to-" + config.site_name + "-";
      for (const auto& entry : std::filesystem::directory_iterator(pc.files_dir, ec)) {
        std::string name = entry.path().filename().string();
        if (name.rfind(prefix, 0) != 0 || auto_files_seen.count(entry.path().string())) continue;
        // Only plain files: a FIFO would block this thread, a symlink could point anywhere
        // (e.g. /dev/zero). Whoever writes to the transfer folder is not trusted.
        std::error_code type_ec;
        if (entry.symlink_status(type_ec).type() != std::filesystem::file_type::regular) {
          if (auto_files_seen.insert(entry.path().string()).second)
            log::Warning("files_dir: " + entry.path().string() +
                         " ignored: not a regular file (symlink, FIFO, device or folder)");
          continue;
        }
        auto_files_seen.insert(entry.path().string());
        incoming.push_back(entry.path().string());
      }
      std::sort(incoming.begin(), incoming.end());
      for (const auto& r : Import(incoming)) {
        if (r.ok) {
          log::Info("files_dir: " + r.path + ": " + r.message);
        } else {
          log::Warning("files_dir: " + r.path + " refused: " + r.message);
        }
      }
      ExportOptions o;
      o.peer = pc.name;
      o.out_dir = pc.files_dir;
      auto r = Export(o);
      if (!r) log::Warning("files_dir: export for '" + pc.name + "' failed: " + r.message());
      std::uint64_t accepted_now = store->GetCounter(AcceptedKey(pc.name), 0);
      if (accepted_now > auto_acked[pc.name]) {
        o.ack = true;
        if (Export(o)) auto_acked[pc.name] = accepted_now;
      }
    }
  }

  // Peers reached only through the diode never acknowledge (unless an ack or resend-request file
  // comes back by disk). What was sent to them longer ago than their retention time counts as
  // acknowledged, so the queue stays bounded; how much was dropped that way is counted and logged.
  void ApplyDiodeRetention() {
    auto now = Clock::now();
    head_samples.emplace_back(now, published.load());
    std::chrono::milliseconds longest{0};
    for (const auto& ds : diode_senders)
      longest = std::max(longest, peers[ds->peer].config->diode_retention);
    while (head_samples.size() > 1 &&
           now - head_samples.front().first > longest + std::chrono::minutes(1))
      head_samples.erase(head_samples.begin());
    for (const auto& ds : diode_senders) {
      PeerRuntime& p = peers[ds->peer];
      std::uint64_t expired = 0;  // log head as it was one retention time ago
      for (const auto& [t, seq] : head_samples)
        if (now - t >= p.config->diode_retention) expired = seq;
      // Only what the diode sender has sent (it reads below ds->pos).
      expired = std::min(expired, ds->pos - 1);
      std::uint64_t dropped = 0;
      {
        std::lock_guard<std::mutex> lock(ship_mu);
        if (expired <= p.acked) continue;
        dropped = expired - p.acked;
        p.acked = expired;
        p.metrics->acked_through = expired;
      }
      queue::WriteBatch b;
      b.PutCounter(AckedKey(p.name), expired);
      (void)store->Commit(b, false);
      metrics.diode_retention_dropped += dropped;
      log::Warning("diode peer '" + p.name + "': " + std::to_string(dropped) +
                   " log position(s) sent more than the retention time ago were never "
                   "acknowledged and are dropped from the queue");
    }
  }

  // Deletes inbound events that every local sink has taken: the JSONL delivery and, for
  // Mattermost and webhook channels, the bridge (which has its own cursor).
  void CollectInbound() {
    std::uint64_t removable = delivered_through.load();
    if (bridge) removable = std::min(removable, bridge->replayed_through());
    if (removable <= inbound_removed) return;
    queue::WriteBatch b;
    b.DeleteInboundRange(inbound_removed + 1, removable + 1);
    if (Status s = store->Commit(b, false); !s) {
      log::Error("inbound GC: " + s.message());
      return;
    }
    inbound_removed = removable;
  }

  // Deletes the log prefix that every peer has acknowledged, and refreshes the per-peer depth
  // and oldest-unacked gauges. Everything at or below the lowest peer cursor is deletable
  // without reading it (a peer's cursor passes entries not meant for it too). The gauges come
  // from a bounded scan above that point; past the bound, depth falls back to the upper bound
  // "log head minus cursor".
  void CollectOutbound() {
    ApplyDiodeRetention();
    std::vector<std::uint64_t> acked(peers.size());
    std::uint64_t head = published.load();
    std::uint64_t low = head;
    {
      std::lock_guard<std::mutex> lock(ship_mu);
      for (std::size_t i = 0; i < peers.size(); ++i) {
        const PeerRuntime& p = peers[i];
        acked[i] = p.acked;
        // A peer with nothing in flight whose shipper scanned past its cursor and found nothing
        // for it does not hold back the entries it skipped (it may never get an event to ack).
        std::uint64_t passed = p.acked;
        if (p.inflight.empty() && p.send_pos == p.acked + 1 && p.scan_pos > p.send_pos)
          passed = p.scan_pos - 1;
        low = std::min(low, passed);
      }
    }
    RecountQueues(acked);  // before the GC below deletes what it reads
    if (low > gc_deleted_through) {
      queue::WriteBatch b;
      b.DeleteOutboundRange(gc_deleted_through + 1, low + 1);
      if (Status s = store->Commit(b, false); !s) {
        log::Error("queue GC: " + s.message());
      } else {
        gc_deleted_through = low;
      }
    }
    std::vector<std::int64_t> oldest(peers.size(), 0);
    std::size_t scanned = 0, found = 0;
    Status s = store->ScanOutbound(low + 1, [&](const queue::OutboundEntry& e) {
      if (e.seq > head || ++scanned > kGcScanLimit || found == peers.size()) return false;
      for (std::size_t i = 0; i < peers.size(); ++i) {
        if (e.seq <= acked[i] || !e.HasPeer(peers[i].name)) continue;
        if (oldest[i] == 0) {
          ++found;
          auto ev = DecodeEvent(e.event);
          oldest[i] = ev ? ev->created_at_ms : 1;
        }
      }
      return true;
    });
    if (!s) log::Error("queue GC: " + s.message());
    for (std::size_t i = 0; i < peers.size(); ++i) {
      peers[i].metrics->oldest_unacked_ms = oldest[i];
      if (link) peers[i].metrics->last_contact_ms = link->LastContactMs(i);
    }
  }
};

std::string ExportReportJson(const ExportReport& r) {
  std::string out = "{\"files\":[";
  for (std::size_t i = 0; i < r.files.size(); ++i) out += (i ? "," : "") + JsonString(r.files[i]);
  out += "],\"events\":" + std::to_string(r.events) + ",\"bytes\":" + std::to_string(r.bytes) +
         ",\"note\":" + JsonString(r.note) + "}";
  return out;
}

std::string ImportResultsJson(const std::vector<ImportResult>& results) {
  std::string out = "{\"results\":[";
  for (std::size_t i = 0; i < results.size(); ++i) {
    const ImportResult& r = results[i];
    out += std::string(i ? "," : "") + "{\"path\":" + JsonString(r.path) +
           ",\"ok\":" + (r.ok ? "true" : "false") + ",\"message\":" + JsonString(r.message) +
           ",\"events\":" + std::to_string(r.events) + "}";
  }
  return out + "]}";
}

Daemon::Daemon(config::Config config, Options options)
    : impl_(std::make_unique<Impl>(std::move(config))) {
  impl_->offline = options.offline;
}
Result<ExportReport> Daemon::Export(const ExportOptions& options) { return impl_->Export(options); }
std::vector<ImportResult> Daemon::Import(const std::vector<std::string>& paths) {
  return impl_->Import(paths);
}
Daemon::~Daemon() { Stop(); }
Status Daemon::Start() { return impl_->Start(); }
void Daemon::Stop() { impl_->Stop(); }
std::uint16_t Daemon::ingest_port() const { return impl_->http ? impl_->http->port() : 0; }

int RunDaemon(const std::string& config_path) {
  auto cfg = config::LoadConfig(config_path);
  if (!cfg) {
    log::Error("invalid configuration:\n" + cfg.message());
    return 1;
  }
  // Block the signals in every thread; the main thread waits for them synchronously.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  Daemon daemon(std::move(cfg).value());
  if (Status s = daemon.Start(); !s) {
    log::Error(s.message());
    sd_notifyf(0, "STATUS=failed to start: %s", s.message().c_str());
    daemon.Stop();
    return 1;
  }
  // systemd (Type=notify): READY only once serving; STATUS lines; WATCHDOG from this loop
  // when WatchdogSec is set. Without NOTIFY_SOCKET these calls do nothing.
  std::uint64_t watchdog_usec = 0;
  bool watchdog = sd_watchdog_enabled(0, &watchdog_usec) > 0;
  sd_notifyf(0, "READY=1\nSTATUS=%s", daemon.StatusLine().c_str());
  auto period = std::chrono::microseconds(watchdog ? watchdog_usec / 2 : 5'000'000);
  period = std::min<std::chrono::microseconds>(period, std::chrono::seconds(5));
  while (true) {
    timespec ts{static_cast<time_t>(period.count() / 1'000'000),
                static_cast<long>((period.count() % 1'000'000) * 1000)};
    int sig = sigtimedwait(&signals, nullptr, &ts);
    if (sig < 0) {  // timeout (or EINTR): the main loop is alive
      sd_notifyf(0, "%sSTATUS=%s", watchdog ? "WATCHDOG=1\n" : "", daemon.StatusLine().c_str());
      continue;
    }
    if (sig == SIGHUP) {
      // Logs go to stderr (journald under systemd): there is no log file to reopen, and the
      // configuration is not reloaded (a restart is safe: SIGTERM drains, state is durable).
      log::Info("SIGHUP: " + daemon.StatusLine() +
                " (nothing to reload; restart to apply "
                "configuration changes)");
      continue;
    }
    log::Info(std::string("received ") + (sig == SIGTERM ? "SIGTERM" : "SIGINT") + ", stopping");
    sd_notify(0, "STOPPING=1\nSTATUS=stopping");
    break;
  }
  daemon.Stop();
  return 0;
}

std::string Daemon::StatusLine() const { return impl_->StatusLine(); }

}  // namespace relay
