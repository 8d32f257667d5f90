// Daemon::Impl, inbound: frames from the link, bundles and the diode are verified,
// de-duplicated, stored, forwarded and acknowledged. See relay/daemon_impl.h.

#include "relay/daemon_impl.h"

#include <algorithm>
#include <unordered_set>

#include "relay/log.h"

namespace relay {
namespace {

constexpr std::size_t kMaxInboundQueueBytes = 256u << 20;

}  // namespace

using daemon_detail::AcceptedKey;
using daemon_detail::kAnyPeer;
using daemon_detail::kForeverMs;
using daemon_detail::kNextIn;
using daemon_detail::kNextOut;
using daemon_detail::NowMs;
using daemon_detail::RangesKey;

crypto::OpenResult Daemon::Impl::OpenFrameAny(std::string_view bytes) const {
  auto lookup = [this](const crypto::PublicKey& pk) { return LookupPeer(pk); };
  crypto::OpenResult r = crypto::OpenFrame(*key, lookup, bytes);
  if (!r.ok() && previous_key && r.rejection.reason == crypto::RejectReason::kWrongRecipient) {
    crypto::OpenResult old = crypto::OpenFrame(*previous_key, lookup, bytes);
    if (old.ok() || old.rejection.reason != crypto::RejectReason::kWrongRecipient) return old;
  }
  return r;
}

void Daemon::Impl::OnFrame(std::size_t peer, std::string bytes) {
  peers[peer].metrics->last_contact_ms = NowMs();
  {
    std::lock_guard<std::mutex> lock(in_mu);
    if (in_queue_bytes + bytes.size() > kMaxInboundQueueBytes) return;  // resent later
    in_queue_bytes += bytes.size();
    in_queue.push_back({peer, std::move(bytes)});
  }
  in_cv.notify_one();
}

void Daemon::Impl::OnRejectedControl(const std::string& reason, const std::string& message) {
  for (std::size_t i = 0; i < static_cast<std::size_t>(crypto::RejectReason::kCount); ++i) {
    if (reason == crypto::RejectReasonName(static_cast<crypto::RejectReason>(i))) {
      ++metrics.frames_rejected[i];
      break;
    }
  }
  if (warn_limiter.Allow()) log::Warning(message);
}

void Daemon::Impl::OnLinkRefused(transports::LinkRefusal reason, const std::string& message) {
  ++metrics.link_refused[static_cast<std::size_t>(reason)];
  if (warn_limiter.Allow()) log::Warning(message);
}

void Daemon::Impl::Reject(crypto::RejectReason reason, const std::string& message) {
  ++metrics.frames_rejected[static_cast<std::size_t>(reason)];
  if (warn_limiter.Allow()) log::Warning(message);
}

void Daemon::Impl::InboundLoop() {
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

Status Daemon::Impl::ImportFrames(BundleImport& bundle) {
  auto result = bundle.done.get_future();
  {
    std::lock_guard<std::mutex> lock(in_mu);
    if (stopping) return Status::Error("relay is shutting down");
    in_imports.push_back(&bundle);
  }
  in_cv.notify_one();
  return result.get();
}

void Daemon::Impl::SubmitFramesAsync(std::unique_ptr<BundleImport> import) {
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

void Daemon::Impl::CoverRange(std::size_t p, std::uint64_t first, std::uint64_t last) {
  auto& ranges = file_ranges[p];
  std::uint64_t& end = ranges[first];
  end = std::max(end, last);
  while (!ranges.empty() && ranges.begin()->first <= accepted[p] + 1) {
    accepted[p] = std::max(accepted[p], ranges.begin()->second);
    ranges.erase(ranges.begin());
  }
}

bool Daemon::Impl::AlreadyAccepted(std::size_t p, std::uint64_t seq) const {
  if (seq <= accepted[p]) return true;
  for (auto it = file_ranges[p].begin(); it != file_ranges[p].end() && it->first <= seq; ++it)
    if (seq <= it->second) return true;
  return false;
}

std::string Daemon::Impl::EncodeRanges(const std::map<std::uint64_t, std::uint64_t>& ranges) {
  std::string out;
  for (const auto& [a, b] : ranges) out += std::to_string(a) + "-" + std::to_string(b) + ",";
  return out;
}

std::map<std::uint64_t, std::uint64_t> Daemon::Impl::DecodeRanges(const std::string& text) {
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

Status Daemon::Impl::ProcessFrames(std::deque<ReceivedFrame>& work, BundleImport* bundle) {
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
      if (ch == channels.end() || std::find(ch->second.peers.begin(), ch->second.peers.end(), p) ==
                                      ch->second.peers.end()) {
        ++metrics.inbound_dropped[static_cast<std::size_t>(InboundDrop::kUnroutable)];
        if (warn_limiter.Allow())
          log::Warning("event " + ev.id + " from peer '" + pname + "' for channel '" + ev.channel +
                       "', which is not bridged with that peer: dropped");
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

}  // namespace relay
