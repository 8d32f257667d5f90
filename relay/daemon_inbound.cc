// Daemon::Impl, inbound: frames from the link, bundles and the diode are verified,
// de-duplicated, stored, forwarded and acknowledged. See relay/daemon_impl.h.

#include "relay/daemon_impl.h"

#include <algorithm>
#include <unordered_map>
#include <unordered_set>

#include "base/json.h"
#include "base/log.h"
#include "crypto/origin.h"

namespace relay {
namespace {

constexpr std::size_t kMaxInboundQueueBytes = 256u << 20;
// How long a received reaction is remembered, so that only its site may remove it (as long as
// the Mattermost bridge's mappings).
constexpr std::int64_t kReactionMemoryMs = 400LL * 24 * 3600 * 1000;
constexpr std::int64_t kHourMs = 3600 * 1000;

}  // namespace

using daemon_detail::AcceptedKey;
using daemon_detail::kAnyPeer;
using daemon_detail::kForeverMs;
using daemon_detail::kNextIn;
using daemon_detail::kNextOut;
using daemon_detail::NowMs;
using daemon_detail::RangesKey;
using daemon_detail::ReactionKey;

crypto::OpenResult Daemon::Impl::OpenFrameAny(std::string_view bytes,
                                              std::optional<std::size_t>* expired) const {
  const auto now = std::chrono::system_clock::now();
  auto lookup = [&](const crypto::PublicKey& pk) { return LookupPeer(pk, now, expired); };
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
  for (std::size_t i = 0; i < static_cast<std::size_t>(InboundDrop::kCount); ++i) {
    if (reason == InboundDropName(static_cast<InboundDrop>(i))) ++metrics.inbound_dropped[i];
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
      if (b->settled) b->settled(st);
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
    if (!stopping && in_queue_bytes + bytes <= kMaxInboundQueueBytes) {
      in_queue_bytes += bytes;
      import->owned = true;
      in_imports.push_back(import.release());
    }
  }
  if (import && import->settled) import->settled(Status::Error("no room in the inbound queue"));
  in_cv.notify_one();
}

std::uint64_t Daemon::Impl::SpoolUsage(const std::string& origin) {
  std::lock_guard<std::mutex> lock(spool_mu);
  auto it = spool_usage.find(origin);
  return it == spool_usage.end() ? 0 : it->second;
}

std::string Daemon::Impl::InboundDiskLow() {
  auto free_bytes = daemon_detail::FreeBytes(config.data_dir);
  const bool low = config.min_free > 0 && free_bytes && *free_bytes < config.min_free;
  if (low != inbound_disk_low.exchange(low)) {
    if (low) {
      log::Error("data_dir '" + config.data_dir + "' has " + std::to_string(*free_bytes) +
                 " bytes free, below [site] min_free: received frames are not taken (nor " +
                 "acknowledged) until space is freed");
    } else {
      log::Info("data_dir '" + config.data_dir + "' has space again: taking received frames");
    }
  }
  if (!low) return {};
  return "data_dir has " + std::to_string(*free_bytes) + " bytes free, below [site] min_free (" +
         std::to_string(config.min_free) + ")";
}

std::optional<std::size_t> Daemon::Impl::InboundPeerOf(std::string_view encoded) const {
  auto env = ParseEventEnvelope(encoded);
  if (!env) return std::nullopt;
  auto last = LastHop(*env);
  if (!last) return std::nullopt;
  return PeerByName(std::string(*last));
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

std::optional<InboundDrop> Daemon::Impl::CheckOrigin(const Event& ev, std::size_t p, bool attested,
                                                     std::int64_t now, std::string* why) const {
  const std::string& pname = peers[p].name;
  auto rule = origins.find(ev.origin_site);
  if (rule == origins.end()) {
    *why = "its origin '" + ev.origin_site + "' is neither a peer nor an [origin." +
           ev.origin_site + "] of this site";
    return InboundDrop::kUnknownOrigin;
  }
  const OriginRule& r = rule->second;
  if (std::find(r.senders.begin(), r.senders.end(), p) == r.senders.end()) {
    *why = "peer '" + pname + "' may not send events of '" + ev.origin_site + "' (add it to " +
           (r.peer ? "[peer." : "[origin.") + ev.origin_site + "] via to allow it)";
    return InboundDrop::kOriginNotAllowed;
  }
  if (!attested) {
    *why = "no origin signature of '" + ev.origin_site + "' that verifies covers it";
    return InboundDrop::kBadOriginSignature;
  }
  if (ev.hops.empty() || ev.hops.front() != ev.origin_site || ev.hops.back() != pname) {
    *why = "its hop list does not start at its origin '" + ev.origin_site +
           "' and end at the sending peer '" + pname + "'";
    return InboundDrop::kBadHops;
  }
  // Through a transit site, the dedup index is what recognises a replayed event; past its
  // memory (dedup_ttl, less an hour for clock differences) a replay could not be told apart.
  // An origin's own frames are also checked by their log position, which never expires.
  const std::int64_t memory = config.dedup_ttl.count();
  const std::int64_t limit = memory > 2 * kHourMs ? memory - kHourMs : memory / 2;
  if (r.peer != p && now - ev.created_at_ms > limit) {
    *why = "it was created at " + FormatTimestampMs(ev.created_at_ms) +
           ", longer ago than this site remembers events (dedup_ttl): a replay could not be "
           "recognised (raise [site] dedup_ttl on sites forwarding over links down that long)";
    return InboundDrop::kStale;
  }
  if ((ev.kind == EventKind::kEdit || ev.kind == EventKind::kDelete) &&
      OriginOfEventId(ev.ref) != ev.origin_site) {
    *why = "it would " + std::string(ev.kind == EventKind::kEdit ? "edit" : "delete") + " " +
           ev.ref + ", which was posted at '" + std::string(OriginOfEventId(ev.ref)) +
           "': only that site may change it";
    return InboundDrop::kNotOwner;
  }
  return std::nullopt;
}

Status Daemon::Impl::ProcessFrames(std::deque<ReceivedFrame>& work, BundleImport* bundle) {
  std::int64_t now = NowMs();
  std::int64_t expire = now + config.dedup_ttl.count();
  // What is stored is about what was received (events, smaller than their frames, and their
  // dedup keys): room for it at once rather than growing by doubling (a bundle's slice).
  std::size_t received_bytes = 0;
  for (const ReceivedFrame& rf : work) received_bytes += rf.bytes.size();
  queue::WriteBatch batch(*store, received_bytes);
  std::vector<std::uint64_t> accepted_before = accepted;
  auto ranges_before = file_ranges;
  std::uint64_t in_before = next_in;
  std::set<std::size_t> ack_peers;
  std::unordered_set<std::string> round_ids;
  std::vector<Forward> forwards;
  // Attestations of forwarded events, each once per round (a commit's events may come in two
  // frames), and the reactions added in this round.
  std::vector<std::string> round_attestations;
  std::unordered_map<std::string, std::size_t> round_attestation_index;
  std::unordered_set<std::string> round_reactions;
  crypto::AttestationIndex attested;
  std::vector<std::uint64_t> frames_ok(peers.size(), 0), events_ok(peers.size(), 0);
  // Taken in this round, counted against the peer's bounds; the bytes actually stored.
  std::vector<std::uint64_t> round_held(peers.size(), 0), stored_bytes(peers.size(), 0);
  std::map<std::string, std::uint64_t> round_spool;
  std::string disk_low_why = InboundDiskLow();
  const auto wall_now = std::chrono::system_clock::now();
  const bool no_space = !disk_low_why.empty();
  std::uint64_t dedup = 0, chunks_written = 0;
  // Chunks of large attachments go to their spool file, not into the inbound store: written
  // at their offset (again after a crash: harmless) and synced before the batch that records
  // them as received and acknowledges them is committed.
  ChunkWriter chunks;
  Status spool_status;
  for (ReceivedFrame& rf : work) {
    std::optional<std::size_t> expired;
    crypto::OpenResult opened = OpenFrameAny(rf.bytes, &expired);
    if (!opened.ok()) {
      if (expired) {
        std::string message = RejectPreviousKeyExpired(*expired, "a frame");
        if (bundle && bundle->all_or_nothing) return Status::Error(message);
        continue;
      }
      Reject(opened.rejection.reason, opened.rejection.message);
      if (bundle && bundle->not_stored) bundle->not_stored(rf);
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
    if (!bundle && rf.link_peer != p) {
      // The link checked the sender already (its connection proved the peer's key); this is
      // the same rule once more, where the frame is opened.
      Reject(crypto::RejectReason::kUnknownSender,
             "frame signed by peer '" + pname + "' arrived on the link of peer '" +
                 (rf.link_peer < peers.size() ? peers[rf.link_peer].name : std::string("?")) +
                 "': refused");
      continue;
    }
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
    // Opening laid the payload out (every event's core and its digest, the attestations).
    const std::vector<crypto::OpenedEvent>& framed = opened.frame->events;
    const std::vector<std::string_view>& frame_attestations = opened.frame->attestations;
    std::string bad;
    std::vector<Event> events;
    if (framed.size() != h.event_count) {
      bad = "header says " + std::to_string(h.event_count) + " events, payload has " +
            std::to_string(framed.size());
    } else {
      for (const crypto::OpenedEvent& fe : framed) {
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
      if (bundle && bundle->not_stored) bundle->not_stored(rf);
      if (bundle && bundle->all_or_nothing)
        return Status::Error("a frame's payload is malformed: " + bad);
      continue;
    }
    // Bounds on what a peer can make this site hold (stored, not yet delivered; spooled
    // chunks) and the disk's free space: a frame over them is not taken now, and not
    // acknowledged, so it comes again once delivery has caught up or space is back.
    std::optional<InboundWait> wait;
    std::string wait_why;
    const std::uint64_t held = peers[p].metrics->inbound_held + round_held[p];
    const std::uint64_t frame_bytes = opened.frame->plaintext.size();
    if (no_space) {
      wait = InboundWait::kDiskLow;
      wait_why = disk_low_why;
    } else if (held > 0 && held + frame_bytes > peers[p].config->max_inbound) {
      wait = InboundWait::kMaxInbound;
      wait_why = std::to_string(held) + " bytes of its events wait for delivery here ([peer." +
                 pname + "] max_inbound = " + std::to_string(peers[p].config->max_inbound) + ")";
    } else {
      for (const Event& ev : events) {
        if (ev.kind != EventKind::kFileChunk) continue;
        const std::uint64_t used = SpoolUsage(ev.origin_site) + round_spool[ev.origin_site];
        if (used + ev.chunk.data.size() > peers[p].config->max_spool) {
          wait = InboundWait::kMaxSpool;
          wait_why = "the spool of attachments from '" + ev.origin_site + "' holds " +
                     std::to_string(used) + " bytes ([peer." + pname +
                     "] max_spool = " + std::to_string(peers[p].config->max_spool) + ")";
          break;
        }
      }
    }
    if (wait) {
      ++peers[p].metrics->inbound_deferred[static_cast<std::size_t>(*wait)];
      if (warn_limiter.Allow())
        log::Warning("frame from peer '" + pname + "' not taken for now (" +
                     InboundWaitName(*wait) + "): " + wait_why + "; it comes again");
      if (bundle && bundle->not_stored) bundle->not_stored(rf);
      if (bundle && bundle->all_or_nothing)
        return Status::Error("not taken for now: " + wait_why + "; import it again later");
      continue;
    }
    round_held[p] += frame_bytes;
    for (const Event& ev : events)
      if (ev.kind == EventKind::kFileChunk) round_spool[ev.origin_site] += ev.chunk.data.size();
    // The origin signatures that came with the frame whose signature verifies with their
    // origin's key, indexed by the digests they list. A bad one is not fatal to the frame: the
    // events it would cover are refused one by one below, the rest is taken.
    attested.Clear();
    constexpr std::size_t kNoSlot = ~std::size_t{0};
    constexpr std::size_t kSignatureBytes = 64;  // an attestation ends with its signature
    std::vector<std::size_t> att_round(frame_attestations.size(), kNoSlot);
    for (std::size_t i = 0; i < frame_attestations.size(); ++i) {
      auto a = crypto::ParseAttestation(frame_attestations[i]);
      if (!a) {
        if (warn_limiter.Allow())
          log::Warning("frame from peer '" + pname + "': " + a.message() +
                       "; the events it covers are refused");
        continue;
      }
      auto rule = origins.find(std::string(a->origin_site));
      if (rule == origins.end()) continue;  // its events are refused as of an unknown origin
      const OriginRule& r = rule->second;
      // During the origin's rotation its previous key signs too, until its end time.
      if (!crypto::VerifyAttestation(*a, r.key) &&
          !(r.previous && crypto::PreviousKeyAccepted(r.previous_until, wall_now) &&
            crypto::VerifyAttestation(*a, *r.previous))) {
        if (warn_limiter.Allow())
          log::Warning("frame from peer '" + pname + "': an origin attestation for '" +
                       std::string(a->origin_site) +
                       "' does not verify with that site's key; the events it covers are refused");
        continue;
      }
      attested.Add(*a, i);
    }
    // One batched lookup of the frame's event ids in the dedup index.
    std::vector<std::string> dkeys(events.size());
    for (std::size_t k = 0; k < events.size(); ++k)
      if (!stored_before(framed[k].seq)) dkeys[k] = "e:" + events[k].id;
    std::vector<bool> known = store->HasDedup(dkeys, now);
    for (std::size_t k = 0; k < events.size(); ++k) {
      const crypto::OpenedEvent& fe = framed[k];
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
      const std::optional<std::size_t> by = attested.Find(fe.digest, ev.origin_site);
      std::string why;
      if (auto refused = CheckOrigin(ev, p, by.has_value(), now, &why)) {
        ++metrics.inbound_dropped[static_cast<std::size_t>(*refused)];
        if (warn_limiter.Allow())
          log::Warning("event " + ev.id + " from peer '" + pname + "' refused (" +
                       InboundDropName(*refused) + "): " + why);
        continue;
      }
      std::string& dkey = dkeys[k];
      if (known[k] || round_ids.count(dkey)) {
        ++dedup;
        continue;
      }
      // A reaction may be removed only by the site (and author) that added it.
      if (ev.kind == EventKind::kReactionAdd || ev.kind == EventKind::kReactionRemove) {
        std::string rkey = ReactionKey(ev.ref, ev.text, ev.origin_site, ev.author);
        if (ev.kind == EventKind::kReactionAdd) {
          batch.PutDedup(rkey, now + kReactionMemoryMs, "");
          round_reactions.insert(std::move(rkey));
        } else if (round_reactions.erase(rkey) == 0 && !store->GetDedup(rkey, now)) {
          ++metrics.inbound_dropped[static_cast<std::size_t>(InboundDrop::kNotOwner)];
          if (warn_limiter.Allow())
            log::Warning("event " + ev.id + " from peer '" + pname +
                         "' refused (not_owner): it removes reaction '" + ev.text + "' of " +
                         ev.author + "@" + ev.origin_site + " from " + ev.ref +
                         ", which that site never added here");
          continue;
        } else {
          batch.DeleteDedup(rkey);
        }
      }
      batch.PutDedup(dkey, expire, "");
      round_ids.insert(std::move(dkey));
      if (ev.kind == EventKind::kFileChunk) {
        if (spool_status) {
          spool_status =
              chunks.Write(SpoolInPath(config.data_dir, ev.origin_site, ev.chunk.blob_id),
                           ev.chunk.offset, ev.chunk.data);
        }
        ++chunks_written;
      } else {
        batch.PutInbound(next_in++, fe.encoded);
        stored_bytes[p] += fe.encoded.size();
      }
      ++events_ok[p];
      // Forward to the channel's other peers that the event has not passed through, with the
      // origin's core and attestation unchanged.
      Forward f;
      for (std::size_t q : ch->second.peers) {
        if (q == p) continue;
        if (std::find(ev.hops.begin(), ev.hops.end(), peers[q].name) != ev.hops.end()) continue;
        f.peers.push_back(peers[q].name);
        f.peer_index.push_back(q);
      }
      if (!f.peers.empty()) {
        ev.hops.push_back(config.site_name);
        EncodeEventEnvelope(ev.kind, fe.core, ev.hops, &f.encoded);
        f.digest = fe.digest;
        std::size_t& slot = att_round[*by];
        if (slot == kNoSlot) {
          // Keyed by its signature: the same attestation may come in two frames of the round.
          const std::string_view att = frame_attestations[*by];
          auto [it, added] = round_attestation_index.emplace(
              std::string(att.substr(att.size() - kSignatureBytes)), round_attestations.size());
          if (added) round_attestations.emplace_back(att);
          slot = it->second;
        }
        f.attestation = slot;
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
      std::vector<PendingOut> out;
      out.reserve(forwards.size());
      for (const Forward& f : forwards) {
        out.push_back(
            {next_out++, f.attestation, f.digest,
             queue::EncodeOutboundValue(
                 f.peers, 0,
                 std::string_view(reinterpret_cast<const char*>(f.digest.data()), f.digest.size()),
                 f.encoded)});
        NoteQueued(f.peer_index);
      }
      PutOutboundGroups(out, batch, [&](const std::vector<PendingOut*>& part) {
        return round_attestations[part.front()->group];
      });
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
    peers[p].metrics->inbound_held += stored_bytes[p];
  }
  if (chunks_written > 0) {
    std::lock_guard<std::mutex> lock(spool_mu);
    for (const auto& [origin, n] : round_spool) spool_usage[origin] += n;
  }
  if (link)
    for (std::size_t p : ack_peers) link->SendAck(p, accepted[p]);
  return Status::Ok();
}

}  // namespace relay
