// Daemon::Impl, shipper: frames out to each peer over the link, acknowledgements and
// link state (link callbacks). See relay/daemon_impl.h.

#include "relay/daemon_impl.h"

#include <algorithm>

#include "relay/log.h"

namespace relay {
namespace {

// Frames carrying attachment chunks (up to 1 MiB each) in flight per peer, whatever the window:
// a large attachment then occupies a few MiB between the two stores, not window * frame size.
constexpr std::size_t kMaxChunkFramesInFlight = 4;

// Whether an encoded event is a kFileChunk event: only those are msgpack arrays of 15 (fixarray
// 0x9f); every other event has 14 fields (see EncodeEvent and docs/wire-format.md).
bool IsChunkEncoding(std::string_view encoded) {
  return !encoded.empty() && static_cast<unsigned char>(encoded[0]) == 0x9f;
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

void Daemon::Impl::OnAck(std::size_t peer, std::uint64_t seq) {
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
                                                          std::uint8_t flags) {
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
    f.bytes =
        crypto::SealFrame(*key, p.identity, first, last_scanned, f.count, payload.Finish(), flags);
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
  if (p.inflight.empty()) p.last_progress = Clock::now();
  p.inflight.push_back({first, built->last_seq, built->count, built->chunk});
  ++p.metrics->frames_sent;
  p.metrics->events_sent += built->count;
  link->SendFrame(peer, epoch, std::move(built->bytes));
  return true;
}

}  // namespace relay
