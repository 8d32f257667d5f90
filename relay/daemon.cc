// Daemon::Impl: peer lookup, start-up (Open, Start), Stop and status; the Daemon methods,
// RunDaemon and the JSON of export / import reports. Impl's other members are defined in
// daemon_*.cc, one file per role (see relay/daemon_impl.h).

#include "relay/daemon.h"

#include "relay/daemon_impl.h"

#include <pthread.h>
#include <signal.h>
#include <sys/prctl.h>
#include <systemd/sd-daemon.h>

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "base/json.h"
#include "base/log.h"
#include "chat/mattermost_client.h"
#include "crypto/origin.h"

namespace relay {
namespace {

// Exit status after a failed store write (EX_TEMPFAIL: a restart is expected to recover).
constexpr int kExitStoreFailed = 75;

}  // namespace

using daemon_detail::AcceptedKey;
using daemon_detail::AckedKey;
using daemon_detail::DiodePosKey;
using daemon_detail::ExportedKey;
using daemon_detail::kAttestSigner;
using daemon_detail::kDelivered;
using daemon_detail::kNextIn;
using daemon_detail::kNextOrigin;
using daemon_detail::kNextOut;
using daemon_detail::kStoreFormat;
using daemon_detail::kStoreFormatVersion;
using daemon_detail::kUnset;
using daemon_detail::NowMs;
using daemon_detail::RangesKey;
using daemon_detail::SentKey;

std::optional<std::size_t> Daemon::Impl::PeerBySignKey(const crypto::PublicKey& pk) const {
  for (std::size_t i = 0; i < peers.size(); ++i) {
    if (peers[i].identity.sign_pk == pk) return i;
    const auto& prev = peers[i].config->previous_public_key;
    if (prev && prev->sign_pk == pk) return i;
  }
  return std::nullopt;
}

std::optional<crypto::PublicIdentity> Daemon::Impl::LookupPeer(
    const crypto::PublicKey& pk, std::chrono::system_clock::time_point now,
    std::optional<std::size_t>* expired) const {
  for (std::size_t i = 0; i < peers.size(); ++i) {
    const PeerRuntime& p = peers[i];
    if (p.identity.sign_pk == pk) return p.identity;
    const auto& prev = p.config->previous_public_key;
    if (prev && prev->sign_pk == pk) {
      if (const crypto::PublicIdentity* still = p.config->PreviousKeyAt(now)) return *still;
      if (expired != nullptr) *expired = i;
      return std::nullopt;
    }
  }
  return std::nullopt;
}

std::string Daemon::Impl::RejectPreviousKeyExpired(std::size_t p, const std::string& what) {
  const config::PeerConfig& pc = *peers[p].config;
  std::string message = what + " from peer '" + peers[p].name +
                        "' refused: signed with its previous key " +
                        pc.previous_public_key->Fingerprint() + ", accepted only until " +
                        config::FormatTime(pc.previous_public_key_until) + " ([peer." + pc.name +
                        "] previous_public_key_until)";
  ++metrics.inbound_dropped[static_cast<std::size_t>(InboundDrop::kPreviousKeyExpired)];
  if (warn_limiter.Allow()) log::Warning(message);
  return message;
}

namespace {

// "3 days", "5 hours", "12 minutes", "40 seconds": roughly how long until something happens.
std::string RoughDuration(std::chrono::system_clock::duration d) {
  using namespace std::chrono;
  const auto plural = [](long long n, const char* unit) {
    return std::to_string(n) + " " + unit + (n == 1 ? "" : "s");
  };
  if (d >= hours(48)) return plural(duration_cast<hours>(d).count() / 24, "day");
  if (d >= hours(2)) return plural(duration_cast<hours>(d).count(), "hour");
  if (d >= minutes(2)) return plural(duration_cast<minutes>(d).count(), "minute");
  return plural(std::max<long long>(0, duration_cast<seconds>(d).count()), "second");
}

}  // namespace

std::string Daemon::Impl::PreviousKeyNotice(std::size_t p,
                                            std::chrono::system_clock::time_point now) const {
  const config::PeerConfig& pc = *peers[p].config;
  if (!pc.previous_public_key) return "";
  const std::string what =
      "[peer." + pc.name + "] previous_public_key (" + pc.previous_public_key->Fingerprint() + ")";
  const std::string until = config::FormatTime(pc.previous_public_key_until);
  if (pc.PreviousKeyExpiredAt(now)) {
    return what + " expired at " + until + ": whatever it signs is refused; remove " +
           "previous_public_key and previous_public_key_until";
  }
  return what + " is still accepted until " + until + " (in " +
         RoughDuration(pc.previous_public_key_until - now) + "): finish the key rotation at '" +
         pc.name + "', then remove previous_public_key and previous_public_key_until";
}

void Daemon::Impl::NoticePreviousKeys(std::chrono::system_clock::time_point now) {
  for (std::size_t i = 0; i < peers.size(); ++i) {
    PeerRuntime& p = peers[i];
    if (!p.config->previous_public_key) continue;
    if (p.config->PreviousKeyExpiredAt(now)) {
      if (!p.previous_key_expiry_logged) log::Warning(PreviousKeyNotice(i, now));
      p.previous_key_expiry_logged = true;
    } else if (p.previous_key_noticed == Clock::time_point{} ||
               Clock::now() - p.previous_key_noticed >= std::chrono::hours(24)) {
      log::Warning(PreviousKeyNotice(i, now));
      p.previous_key_noticed = Clock::now();
    }
  }
}

Status Daemon::Impl::Open() {
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
    // What was sent to the peer before this start (acks up to it are expected): the link's
    // position (recorded every second), the last export and the diode sender's position.
    p.sent_through = std::max({p.acked, store->GetCounter(SentKey(p.name), 0),
                               store->GetCounter(DiodePosKey(p.name), 0)});
    // Exports: to the peer's files_dir ("exported/<peer>") or another folder ("...@<folder>").
    for (const auto& [name, value] : store->ListCounters(ExportedKey(p.name)))
      if (name == ExportedKey(p.name) || name.rfind(ExportedKey(p.name) + "@", 0) == 0)
        p.sent_through = std::max(p.sent_through, value);
    p.sent_recorded = p.sent_through;
    accepted.push_back(store->GetCounter(AcceptedKey(p.name), 0));
    file_ranges.push_back(DecodeRanges(store->GetDedup(RangesKey(p.name), NowMs()).value_or("")));
  }
  if (Status s = config::CheckOwnKeys(config, key->identity(),
                                      previous_key ? &previous_key->identity() : nullptr);
      !s) {
    return s;
  }
  // Whose events may come from whom (origin signatures, crypto/origin.h).
  auto peer_indexes = [this](const std::vector<std::string>& names) {
    std::vector<std::size_t> out;
    for (const auto& n : names)
      if (auto i = PeerByName(n)) out.push_back(*i);
    return out;
  };
  for (std::size_t i = 0; i < peers.size(); ++i) {
    OriginRule& r = origins[peers[i].name];
    r.key = peers[i].identity.sign_pk;
    if (peers[i].config->previous_public_key) {
      r.previous = peers[i].config->previous_public_key->sign_pk;
      r.previous_until = peers[i].config->previous_public_key_until;
    }
    r.peer = i;
    r.senders = peer_indexes(peers[i].config->via);
    r.senders.push_back(i);
  }
  for (const config::OriginConfig& o : config.origins) {
    OriginRule& r = origins[o.name];
    r.key = o.public_key.sign_pk;
    if (o.previous_public_key) {
      r.previous = o.previous_public_key->sign_pk;
      r.previous_until = o.previous_public_key_until;
    }
    r.senders = peer_indexes(o.via);
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
  if (Status s = CheckStoreFormat(); !s) return s;
  if (Status s = ResignOwnAttestations(); !s) return s;
  if (store->GetCounter(kNextOut, kUnset) == kUnset) {
    // A new store starts its sequences at the current time in microseconds, not at 1: if a
    // site loses its data folder but keeps its key, its new events must not reuse event ids
    // or link sequences its peers have already accepted (they would be dropped as replays).
    std::uint64_t start = static_cast<std::uint64_t>(NowMs()) * 1000;
    queue::WriteBatch b(*store);
    b.PutCounter(kNextOrigin, start);
    b.PutCounter(kNextOut, start);
    if (Status s = store->Commit(b, true); !s) return s;
  }
  next_origin = store->GetCounter(kNextOrigin, 1);
  next_out = store->GetCounter(kNextOut, 1);
  published = next_out - 1;
  next_in = store->GetCounter(kNextIn, 1);
  stored_in = next_in - 1;
  // What each peer's events hold in the inbound store now ([peer] max_inbound): every entry
  // still there (entries go once every sink has them).
  Status held = store->ScanInbound(1, [&](std::uint64_t, std::string_view e) {
    if (auto p = InboundPeerOf(e)) peers[*p].metrics->inbound_held += e.size();
    return true;
  });
  if (!held) return held;
  delivered = store->GetCounter(kDelivered, 0);
  delivered_through = delivered;
  if (Status s = CountQueues(AckedCursors()); !s) return s;
  return RecoverSinks();
}

Status Daemon::Impl::CheckStoreFormat() {
  if (store->GetCounter(kStoreFormat, 0) >= kStoreFormatVersion) return Status::Ok();
  if (store->GetCounter(kNextOut, kUnset) != kUnset) {
    // A store of wire version 1: its queued events carry no origin signature and its log
    // entries no attestation key, so they can be neither sent nor delivered. Drained, it is fine.
    std::uint64_t low = kUnset;
    for (const PeerRuntime& p : peers) low = std::min(low, p.acked);
    bool queued = false, undelivered = false;
    Status s = store->ScanOutbound(low == kUnset ? 1 : low + 1, [&](const queue::OutboundEntry&) {
      queued = true;
      return false;
    });
    // An entry of the version-1 layout may not even parse as this version's: it is queued.
    if (!s) queued = true;
    s = store->ScanInbound(store->GetCounter(kDelivered, 0) + 1,
                           [&](std::uint64_t, std::string_view) {
                             undelivered = true;
                             return false;
                           });
    if (!s) undelivered = true;
    if (queued || undelivered)
      return Status::Error(
          "the store in '" + config.data_dir + "' was written by relay wire version 1 and still " +
          "holds " + (queued ? "events queued for a peer" : "received events not yet delivered") +
          ": those carry no origin signature and cannot be sent or delivered by this version. "
          "Drain it with the previous version first (docs/wire-format.md, \"Upgrading a "
          "federation\"), or move the folder away");
  }
  queue::WriteBatch b(*store);
  b.PutCounter(kStoreFormat, kStoreFormatVersion);
  return store->Commit(b, true);
}

Status Daemon::Impl::ResignOwnAttestations() {
  std::uint64_t signer = 0;
  for (std::size_t i = 0; i < 8; ++i) signer = (signer << 8) | key->identity().sign_pk[i];
  if (store->GetCounter(kAttestSigner, 0) == signer) return Status::Ok();
  queue::WriteBatch b(*store);
  std::uint64_t resigned = 0;
  std::vector<crypto::Digest> digests;
  Status committed;
  Status s = store->ScanAttestations([&](std::uint64_t k, std::string_view bytes) {
    auto a = crypto::ParseAttestation(bytes);
    if (!a || a->origin_site != config.site_name) return true;
    digests.clear();
    for (std::size_t i = 0; i < a->count(); ++i) digests.push_back(a->digest(i));
    b.PutAttestation(
        k, crypto::SealAttestation(*key, config.site_name, digests.data(), digests.size()));
    ++resigned;
    if (b.Count() >= 1000) {
      committed = store->Commit(b, false);
      b.Clear();
      if (!committed) return false;
    }
    return true;
  });
  if (s) s = committed;
  if (!s) return s.Wrap("signing queued events again with the current key");
  b.PutCounter(kAttestSigner, signer);
  if (Status c = store->Commit(b, true); !c) return c;
  if (resigned > 0)
    log::Info("this site's key changed: " + std::to_string(resigned) +
              " origin signature(s) of its queued events signed again with the current key " +
              key->identity().Fingerprint());
  return Status::Ok();
}

Status Daemon::Impl::Start() {
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
    link_peers.push_back({p.name, p.identity, p.config->zmq_connect, p.config->previous_public_key,
                          p.config->previous_public_key_until});
  transports::ZmqLinkOptions lo;
  lo.listen = config.zmq_listen;
  lo.heartbeat_interval = config.heartbeat_interval;
  lo.peer_timeout = config.peer_timeout;
  link = std::make_unique<transports::ZmqLink>(*key, std::move(link_peers), lo, this,
                                               previous_key ? &*previous_key : nullptr);

  if (Status s = CreateApi(); !s) return s;

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
  committer = RunNamed("relay-commit", &Impl::CommitterLoop);
  shipper = RunNamed("relay-ship", &Impl::ShipperLoop);
  inbound = RunNamed("relay-inbound", &Impl::InboundLoop);
  delivery = RunNamed("relay-deliver", &Impl::DeliveryLoop);
  maintenance = RunNamed("relay-maint", &Impl::MaintenanceLoop);
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
  NoticePreviousKeys(std::chrono::system_clock::now());
  return Status::Ok();
}

void Daemon::Impl::Stop() {
  if (!started) return;
  started = false;
  // Order: stop taking work in, let each stage finish what it holds, then stop the links.
  if (http) http->Stop();
  if (api_token) api_token->Wipe();
  if (bundle_pool) bundle_pool->Stop();  // waits for the exports and imports being served
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

std::string Daemon::Impl::StatusLine() const {
  std::string out = "ingested " + std::to_string(metrics.events_ingested.load()) + ", delivered " +
                    std::to_string(metrics.events_delivered.load());
  for (const PeerRuntime& p : peers) {
    out += ", " + p.name + (p.metrics->link_up ? " up" : " down") + " (backlog " +
           std::to_string(p.metrics->queue_depth.load()) + ")";
  }
  return out;
}

std::string Daemon::Impl::StatusJson() {
  const auto now = std::chrono::system_clock::now();
  // Every refusal by reason (the same counts as relay_frames_rejected_total), then per peer.
  std::string refused;
  auto add = [&refused](const char* reason, std::uint64_t n) {
    refused +=
        std::string(refused.empty() ? "" : ",") + JsonString(reason) + ":" + std::to_string(n);
  };
  for (std::size_t i = 0; i < metrics.frames_rejected.size(); ++i)
    add(crypto::RejectReasonName(static_cast<crypto::RejectReason>(i)), metrics.frames_rejected[i]);
  for (std::size_t i = 0; i < metrics.inbound_dropped.size(); ++i)
    add(InboundDropName(static_cast<InboundDrop>(i)), metrics.inbound_dropped[i]);
  std::string out = "{\"site\":" + JsonString(config.site_name) +
                    ",\"identity\":" + JsonString(key->identity().ToString()) +
                    ",\"events_ingested\":" + std::to_string(metrics.events_ingested.load()) +
                    ",\"events_delivered\":" + std::to_string(metrics.events_delivered.load()) +
                    ",\"inbound_backlog\":" + std::to_string(metrics.inbound_backlog.load()) +
                    ",\"log_head\":" + std::to_string(published.load()) + ",\"refused\":{" +
                    refused + "},\"api_refused\":" + ApiRefusedJson() + ",\"peers\":[";
  for (std::size_t i = 0; i < peers.size(); ++i) {
    const PeerMetrics& m = *peers[i].metrics;
    std::uint64_t sent;
    {
      std::lock_guard<std::mutex> lock(ship_mu);
      sent = peers[i].sent_through;
    }
    std::string acks;
    for (std::size_t r = 0; r < m.acks_refused.size(); ++r)
      acks += std::string(r ? "," : "") + JsonString(AckRefusalName(static_cast<AckRefusal>(r))) +
              ":" + std::to_string(m.acks_refused[r].load());
    if (i) out += ",";
    out += "{\"name\":" + JsonString(peers[i].name) +
           ",\"link\":" + (m.link_up ? std::string("\"up\"") : std::string("\"down\"")) +
           ",\"queue_depth\":" + std::to_string(m.queue_depth.load()) +
           ",\"acked_through\":" + std::to_string(m.acked_through.load()) +
           ",\"sent_through\":" + std::to_string(sent) +
           ",\"last_contact_ms\":" + std::to_string(link->LastContactMs(i)) +
           ",\"frames_sent\":" + std::to_string(m.frames_sent.load()) +
           ",\"frames_received\":" + std::to_string(m.frames_received.load()) +
           ",\"acks_refused\":{" + acks + "}";
    if (const auto& prev = peers[i].config->previous_public_key) {
      out += ",\"previous_key\":{\"fingerprint\":" + JsonString(prev->Fingerprint()) +
             ",\"until\":" +
             JsonString(config::FormatTime(peers[i].config->previous_public_key_until)) +
             ",\"accepted\":" + (peers[i].config->PreviousKeyAt(now) ? "true" : "false") + "}";
    }
    out += "}";
  }
  out += "]";
  std::vector<std::string> notices;
  if (bridge) {
    // Chat channels whose replay is held, and why (docs/mattermost.md, "Errors").
    out += ",\"mattermost\":{\"channels\":[";
    bool first_channel = true;
    for (const MattermostBridge::ChannelReplay& c : bridge->Channels()) {
      out += std::string(first_channel ? "" : ",") + "{\"name\":" + JsonString(c.channel) +
             ",\"blocked\":" + (c.blocked ? "true" : "false");
      if (c.blocked) {
        out +=
            ",\"reason\":" + JsonString(c.reason) + ",\"since_ms\":" + std::to_string(c.since_ms);
        notices.push_back("chat channel '" + c.channel + "' is held since " +
                          config::FormatTime(std::chrono::system_clock::time_point(
                              std::chrono::milliseconds(c.since_ms))) +
                          ": " + c.reason + " (its events wait, in order)");
      }
      const MattermostBridge::BackfillProgress& b = c.backfill;
      if (!b.state.empty()) {
        out += ",\"backfill\":{\"state\":" + JsonString(b.state) +
               ",\"request\":" + std::to_string(b.request) +
               ",\"since_ms\":" + std::to_string(b.since_ms) +
               ",\"listed\":" + std::to_string(b.listed) + ",\"done\":" + std::to_string(b.done) +
               ",\"captured\":" + std::to_string(b.captured) +
               ",\"seconds\":" + std::to_string(b.seconds) + "}";
      }
      out += "}";
      first_channel = false;
    }
    out += "]}";
  }
  // Things the operator should act on, one sentence each (shown by `relay status`).
  for (std::size_t i = 0; i < peers.size(); ++i) {
    std::string notice = PreviousKeyNotice(i, now);
    if (!notice.empty()) notices.push_back(std::move(notice));
  }
  out += ",\"warnings\":[";
  for (std::size_t i = 0; i < notices.size(); ++i) out += (i ? "," : "") + JsonString(notices[i]);
  out += "]}";
  return out;
}

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
Result<std::uint64_t> Daemon::RebaseLog(std::uint64_t above) {
  if (!impl_->offline) return Status::Error("the log is moved only with the daemon stopped");
  return impl_->RebaseLog(above);
}
Daemon::~Daemon() { Stop(); }
Status Daemon::Start() { return impl_->Start(); }
void Daemon::Stop() { impl_->Stop(); }
std::uint16_t Daemon::ingest_port() const { return impl_->http ? impl_->http->port() : 0; }

int RunDaemon(const std::string& config_path) {
  // Before any secret is read: no core dumps of this process, and /proc/<pid>/{mem,environ,fd,
  // maps,...} and ptrace only for root (CAP_SYS_PTRACE), not for other processes of the same user.
  // (The unit also sets LimitCORE=0.)
  if (::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) {
    log::Error(std::string("cannot make the process non-dumpable (prctl PR_SET_DUMPABLE): ") +
               std::strerror(errno));
    return 1;
  }
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

Status CheckSecretFiles(const config::Config& config, std::vector<std::string>* notes) {
  if (Status s = crypto::Init(); !s) return s;
  std::vector<std::string> problems;
  // Files the daemon's user can read but this one cannot are not this check's to judge.
  const auto readable_here = [&](const std::string& what, const std::string& path) {
    if (::access(path.c_str(), R_OK) == 0 || (errno != EACCES && errno != EPERM)) return true;
    notes->push_back(what + " '" + path + "' not checked: not readable by this user (" +
                     std::strerror(EACCES) + ")");
    return false;
  };
  if (readable_here("[site] key_file", config.key_file)) {
    auto own = crypto::SiteKey::LoadFile(config.key_file);
    std::optional<crypto::SiteKey> old;
    bool old_ok = true;
    if (!config.previous_key_file.empty() &&
        readable_here("[site] previous_key_file", config.previous_key_file)) {
      auto loaded = crypto::SiteKey::LoadFile(config.previous_key_file);
      if (loaded) {
        old.emplace(std::move(loaded).value());
      } else {
        old_ok = false;
        problems.push_back(config.path + ": " +
                           loaded.status().Wrap("[site] previous_key_file").message());
      }
    }
    if (!own) {
      problems.push_back(config.path + ": " + own.status().Wrap("[site] key_file").message());
    } else if (old_ok) {
      if (Status s =
              config::CheckOwnKeys(config, own->identity(), old ? &old->identity() : nullptr);
          !s) {
        problems.push_back(s.message());
      }
    }
  }
  if (!config.mattermost_token_file.empty() &&
      readable_here("[mattermost] token_file", config.mattermost_token_file)) {
    if (auto token = chat::LoadMattermostToken(config.mattermost_token_file); !token) {
      problems.push_back(config.path + ": " +
                         token.status().Wrap("[mattermost] token_file").message());
    }
  }
  if (problems.empty()) return Status::Ok();
  std::string message;
  for (const std::string& p : problems) message += (message.empty() ? "" : "\n") + p;
  return Status::Error(message);
}

}  // namespace relay
