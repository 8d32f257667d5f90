// Daemon::Impl, shipper: frames out to each peer over the link, acknowledgements and
// link state (link callbacks). See relay/daemon_impl.h.

#include "relay/daemon_impl.h"

#include <algorithm>
#include <cstring>
#include <unordered_set>

#include "base/log.h"

namespace relay {
namespace {

// Frames carrying attachment chunks (up to 1 MiB each) in flight per peer, whatever the window:
// a large attachment then occupies a few MiB between the two stores, not window * frame size.
constexpr std::size_t kMaxChunkFramesInFlight = 4;

// Whether an encoded event is a kFileChunk event, from its envelope's kind (the third byte; see
// EncodeEvent and docs/wire-format.md).
bool IsChunkEncoding(std::string_view encoded) {
  return encoded.size() > 2 && static_cast<unsigned char>(encoded[2]) ==
                                   static_cast<unsigned char>(EventKind::kFileChunk);
}

}  // namespace

using daemon_detail::AckedKey;
using daemon_detail::NowMs;

void Daemon::Impl::OnLinkUp(std::size_t peer, std::uint64_t epoch) {
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

void Daemon::Impl::OnLinkDown(std::size_t peer) {
  {
    std::lock_guard<std::mutex> lock(ship_mu);
    PeerRuntime& p = peers[peer];
    p.up = false;
    p.inflight.clear();
    p.metrics->link_up = 0;
  }
  log::Warning("link to peer '" + peers[peer].name + "' is down (no heartbeat)");
}

void Daemon::Impl::OnAck(std::size_t peer, std::uint64_t seq, bool by_previous_key) {
  peers[peer].metrics->last_contact_ms = NowMs();
  (void)AcceptAck(peer, seq, by_previous_key);  // a refusal is counted and logged there
}

Status Daemon::Impl::AcceptAck(std::size_t peer, std::uint64_t seq, bool by_previous_key) {
  PeerRuntime& p = peers[peer];
  auto refuse = [&](AckRefusal why, const std::string& message, bool error) {
    ++p.metrics->acks_refused[static_cast<std::size_t>(why)];
    if (warn_limiter.Allow()) (error ? log::Error : log::Warning)(message);
    return Status::Error(message);
  };
  if (by_previous_key)
    return refuse(AckRefusal::kPreviousKey,
                  "acknowledgement through " + std::to_string(seq) + " from peer '" + p.name +
                      "' is signed with its previous key, which may not move its cursor: refused",
                  false);
  const std::uint64_t head = published.load();
  if (seq > head) {
    // Either an attack (a peer, or someone with its key, trying to empty the queue) or this
    // site's store was re-created with its clock behind, so that its new log positions restarted
    // below the peer's cursor. Never applied: the operator decides (docs/security.md).
    return refuse(AckRefusal::kBeyondLog,
                  "peer '" + p.name + "' acknowledges this site's log through " +
                      std::to_string(seq) + ", beyond anything it ever held (head " +
                      std::to_string(head) + "): refused, nothing is dropped. If this site's " +
                      "data folder was re-created, stop relay and run `relay rebase --config " +
                      config.path + " --above " + std::to_string(seq) +
                      "`; otherwise someone holding the peer's key is attacking the queue",
                  true);
  }
  bool advanced = false;
  {
    std::lock_guard<std::mutex> lock(ship_mu);
    if (seq > p.sent_through) {
      const std::uint64_t sent = p.sent_through;
      return refuse(AckRefusal::kBeyondSent,
                    "peer '" + p.name + "' acknowledges this site's log through " +
                        std::to_string(seq) + ", beyond what was sent to it (" +
                        std::to_string(sent) + "): refused (a misconfiguration or an attack)",
                    false);
    }
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
    queue::WriteBatch b(*store);
    b.PutCounter(AckedKey(p.name), seq);
    if (Status s = store->Commit(b, false); !s) log::Error("storing ack cursor: " + s.message());
    ship_cv.notify_all();
  }
  return Status::Ok();
}

void Daemon::Impl::ShipperLoop() {
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

Result<Daemon::Impl::BuiltFrame> Daemon::Impl::BuildFrame(std::size_t peer, std::uint64_t first,
                                                          std::uint64_t from, std::uint64_t head,
                                                          std::uint8_t flags,
                                                          std::uint64_t byte_limit) {
  const PeerRuntime& p = peers[peer];
  const std::uint64_t max_events = p.config->max_frame_events;
  const std::uint64_t max_bytes = std::min(byte_limit, p.config->max_frame_bytes);
  FramePayloadWriter payload(
      static_cast<std::size_t>(std::min<std::uint64_t>(max_bytes, 64u << 20)));
  std::uint64_t last_scanned = from - 1;
  bool chunk = false, full = false;
  // The attestations the frame carries, each once (a group's entries are mostly adjacent).
  std::uint64_t last_attestation = 0;
  std::unordered_set<std::uint64_t> carried;
  crypto::FrameBodyDigest body;
  Status error;
  Status s = store->ScanOutbound(from, [&](const queue::OutboundEntry& e) {
    if (e.seq > head) return false;
    if (!e.HasPeer(p.name)) {
      last_scanned = e.seq;
      return true;
    }
    // Its size in the payload: the event with its framing, and its attestation unless the
    // frame has it already (read here so that the frame's size is exact).
    std::uint64_t add = e.event.size() + 14;
    std::optional<std::string> attestation;
    const bool new_attestation =
        (carried.empty() || last_attestation != e.attestation) && carried.count(e.attestation) == 0;
    if (new_attestation) {
      auto att = store->GetAttestation(e.attestation);
      if (!att || !*att) {
        error = att ? Status::Error("the attestation (" + std::to_string(e.attestation) +
                                    ") of log entry " + std::to_string(e.seq) + " is missing")
                    : att.status();
        return false;
      }
      attestation = std::move(**att);
      add += attestation->size() + 5;
    }
    // A frame holds at least one event, however large; otherwise it stays within max_bytes.
    if (payload.count() > 0 && payload.size() + add > max_bytes) {
      full = true;
      return false;
    }
    // The frame is signed over the events' digests (kept with them) and hops, not its bytes.
    auto env = ParseEventEnvelope(e.event);
    if (!env || e.digest.size() != sizeof(crypto::Digest)) {
      error = Status::Error("log entry " + std::to_string(e.seq) + " holds no valid event" +
                            (env ? std::string() : ": " + env.message()));
      return false;
    }
    last_scanned = e.seq;
    if (attestation) {
      payload.AddAttestation(*attestation);
      body.AddAttestation(*attestation);
      carried.insert(e.attestation);
    }
    last_attestation = e.attestation;
    payload.Add(e.seq, e.event);
    crypto::Digest digest;
    std::memcpy(digest.data(), e.digest.data(), digest.size());
    body.AddEvent(e.seq, digest, env->hops);
    chunk = IsChunkEncoding(e.event);
    if (chunk || payload.count() >= max_events) {
      full = true;
      return false;
    }
    return true;
  });
  if (!s) return s;
  if (!error) return error;
  BuiltFrame f;
  f.count = payload.count();
  f.chunk = chunk;
  // Entries may have been removed by GC (acked by everyone): the range is still covered.
  if (!full) last_scanned = std::max(last_scanned, head);
  f.last_seq = last_scanned;
  if (f.count > 0)
    f.bytes = crypto::SealFrameWithDigest(*key, p.identity, first, last_scanned, f.count,
                                          payload.Finish(), body.Final(), flags);
  return f;
}

bool Daemon::Impl::BuildAndSend(std::size_t peer, std::unique_lock<std::mutex>& lock) {
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
  p.sent_through = std::max(p.sent_through, built->last_seq);
  if (p.inflight.empty()) p.last_progress = Clock::now();
  p.inflight.push_back({first, built->last_seq, built->count, built->chunk});
  ++p.metrics->frames_sent;
  p.metrics->events_sent += built->count;
  link->SendFrame(peer, epoch, std::move(built->bytes));
  return true;
}

}  // namespace relay
