#include "relay/metrics.h"

#include <algorithm>
#include <chrono>

namespace relay {
namespace {

void Family(std::string* out, const char* name, const char* type, const char* help) {
  out->append("# HELP ").append(name).append(" ").append(help).append("\n");
  out->append("# TYPE ").append(name).append(" ").append(type).append("\n");
}

void Sample(std::string* out, const char* name, const std::string& labels, std::int64_t v) {
  out->append(name);
  if (!labels.empty()) out->append("{").append(labels).append("}");
  out->append(" ").append(std::to_string(v)).append("\n");
}

void Simple(std::string* out, const char* name, const char* type, const char* help,
            std::int64_t v) {
  Family(out, name, type, help);
  Sample(out, name, "", v);
}

std::string PeerLabel(const PeerMetrics& p) { return "peer=\"" + p.name + "\""; }

}  // namespace

const char* InboundDropName(InboundDrop d) {
  switch (d) {
    case InboundDrop::kGap:
      return "gap";
    case InboundDrop::kUnroutable:
      return "unroutable";
    case InboundDrop::kLoop:
      return "loop";
    case InboundDrop::kUnknownOrigin:
      return "unknown_origin";
    case InboundDrop::kBadOriginSignature:
      return "bad_origin_signature";
    case InboundDrop::kOriginNotAllowed:
      return "origin_not_allowed";
    case InboundDrop::kBadHops:
      return "bad_hops";
    case InboundDrop::kStale:
      return "stale";
    case InboundDrop::kNotOwner:
      return "not_owner";
    case InboundDrop::kPreviousKeyExpired:
      return "previous_key_expired";
    case InboundDrop::kCount:
      break;
  }
  return "unknown";
}

const char* AckRefusalName(AckRefusal r) {
  switch (r) {
    case AckRefusal::kBeyondLog:
      return "beyond_log";
    case AckRefusal::kBeyondSent:
      return "beyond_sent";
    case AckRefusal::kPreviousKey:
      return "previous_key";
  }
  return "unknown";
}

const char* InboundWaitName(InboundWait w) {
  switch (w) {
    case InboundWait::kMaxInbound:
      return "max_inbound";
    case InboundWait::kMaxSpool:
      return "max_spool";
    case InboundWait::kDiskLow:
      return "disk_low";
  }
  return "unknown";
}

const char* ApiRefusalName(ApiRefusal r) {
  switch (r) {
    case ApiRefusal::kBundleBusy:
      return "bundle_busy";
    case ApiRefusal::kFolder:
      return "folder";
    case ApiRefusal::kCount:
      break;
  }
  return "unknown";
}

std::string Metrics::RenderPrometheus(const std::string& site) const {
  std::string out;
  auto i64 = [](std::uint64_t v) { return static_cast<std::int64_t>(v); };
  Family(&out, "relay_info", "gauge", "Constant 1, labelled with the site name.");
  Sample(&out, "relay_info", "site=\"" + site + "\"", 1);
  Simple(&out, "relay_events_ingested_total", "counter",
         "Events accepted through the ingest API and made durable.", i64(events_ingested));
  Simple(&out, "relay_ingest_requests_total", "counter", "POST /v1/messages requests.",
         i64(ingest_requests));
  Simple(&out, "relay_ingest_duplicates_total", "counter",
         "Messages whose client id was already accepted (answered idempotently).",
         i64(ingest_duplicates));
  Simple(&out, "relay_ingest_rejected_total", "counter", "Ingest requests answered 400 or 413.",
         i64(ingest_rejected));
  Simple(&out, "relay_ingest_unavailable_total", "counter",
         "Ingest requests answered 503 (store could not accept).", i64(ingest_unavailable));
  Simple(&out, "relay_ingest_busy_total", "counter",
         "Ingest requests answered 503 because [ingest] max_pending bytes were already held.",
         i64(ingest_busy));
  Simple(&out, "relay_ingest_disk_low_total", "counter",
         "Ingest requests answered 503 because data_dir had less than [site] min_free free.",
         i64(ingest_disk_low));
  Simple(&out, "relay_bundles_expired_total", "counter",
         "Bundle files refused because they were past their expiry (not counted as frames).",
         i64(bundles_expired));
  Simple(&out, "relay_store_commits_total", "counter", "Synced ingest write batches.",
         i64(commits));
  Simple(&out, "relay_events_delivered_total", "counter", "Events written to a local sink.",
         i64(events_delivered));
  Simple(&out, "relay_delivery_failures_total", "counter", "Failed sink writes (retried).",
         i64(delivery_failures));
  Simple(&out, "relay_dedup_hits_total", "counter",
         "Received events dropped because their id was already accepted.", i64(dedup_hits));
  Simple(&out, "relay_events_forwarded_total", "counter",
         "Received events queued for further peers.", i64(events_forwarded));
  Simple(&out, "relay_inbound_backlog", "gauge", "Received events not yet delivered to a sink.",
         i64(inbound_backlog));
  Simple(&out, "relay_store_bytes", "gauge", "Approximate size of the store on disk and in memory.",
         i64(store_bytes));

  Simple(&out, "relay_diode_datagrams_sent_total", "counter", "Diode datagrams sent.",
         i64(diode_datagrams_sent));
  Simple(&out, "relay_diode_datagrams_received_total", "counter", "Diode datagrams received.",
         i64(diode_datagrams_received));
  Simple(&out, "relay_diode_datagrams_malformed_total", "counter",
         "Diode datagrams refused as malformed.", i64(diode_datagrams_malformed));
  Family(&out, "relay_diode_datagrams_rejected_total", "counter",
         "Diode datagrams refused before they changed anything, by reason (bad_tag: forged or "
         "altered; replay, stale_stream: replayed or very late).");
  for (std::size_t i = 0; i < diode_datagrams_rejected.size(); ++i) {
    Sample(&out, "relay_diode_datagrams_rejected_total",
           std::string("reason=\"") +
               transports::DiodeRejectName(static_cast<transports::DiodeReject>(i)) + "\"",
           i64(diode_datagrams_rejected[i]));
  }
  Simple(&out, "relay_diode_frames_not_stored_total", "counter",
         "Frames reassembled from the diode that failed verification or could not be stored; "
         "each counts as missing again (relay_diode_frames_missing).",
         i64(diode_frames_not_stored));
  Simple(&out, "relay_diode_frames_received_total", "counter",
         "Frames reassembled from diode datagrams.", i64(diode_messages_received));
  Simple(&out, "relay_diode_shards_recovered_total", "counter",
         "Lost diode data shards rebuilt from parity (FEC).", i64(diode_shards_recovered));
  Simple(&out, "relay_diode_frames_missing", "gauge",
         "Frames announced by the diode sender and not complete here: lost beyond FEC, or not "
         "verified or stored (recovered by a resend request; they come again under new ids).",
         i64(diode_messages_missing));
  Simple(&out, "relay_diode_streams_dropped_total", "counter",
         "Diode sender streams whose reassembly state was dropped for a newer stream of the same "
         "sender (each sender's two newest are kept).",
         i64(diode_streams_dropped));
  Simple(&out, "relay_diode_resend_ranges_total", "counter",
         "Log ranges queued for the diode again by resend-request files.",
         i64(diode_resend_ranges));
  Simple(&out, "relay_diode_retention_dropped_total", "counter",
         "Log positions dropped for diode peers after the retention time, never acknowledged.",
         i64(diode_retention_dropped));
  Simple(&out, "relay_mattermost_captured_total", "counter",
         "Changes captured from the local Mattermost and committed.", i64(mm_captured));
  Simple(&out, "relay_mattermost_catchups_total", "counter", "REST catch-up queries.",
         i64(mm_catchups));
  Simple(&out, "relay_mattermost_ws_connects_total", "counter", "WebSocket (re)connections.",
         i64(mm_ws_connects));
  Simple(&out, "relay_mattermost_seq_gaps_total", "counter",
         "WebSocket sequence gaps (each followed by a REST catch-up).", i64(mm_seq_gaps));
  Simple(&out, "relay_mattermost_replayed_total", "counter",
         "Events applied to the local Mattermost (or webhook).", i64(mm_replayed));
  Simple(&out, "relay_mattermost_replay_failures_total", "counter",
         "Events that could never be applied (permanent 4xx) and were skipped.",
         i64(mm_replay_failures));
  Simple(&out, "relay_mattermost_retries_total", "counter",
         "Chat server calls retried after 429, 5xx or a timeout.", i64(mm_retries));
  Simple(&out, "relay_mattermost_files_too_large_total", "counter",
         "Attachments not carried because they exceed max_file_bytes.", i64(mm_files_too_large));
  Simple(&out, "relay_mattermost_system_posts_skipped_total", "counter",
         "System posts (joins, header changes, ...) not bridged (mattermost_system_posts).",
         i64(mm_system_posts_skipped));
  Simple(&out, "relay_mattermost_channel_holds_total", "counter",
         "Times a channel's replay was held by an error about the channel, token or server.",
         i64(mm_channel_holds));
  Simple(&out, "relay_blobs_sent_total", "counter", "Large attachments committed as chunk events.",
         i64(blobs_sent));
  Simple(&out, "relay_blob_chunks_received_total", "counter",
         "Chunks of large attachments written to the spool.", i64(blob_chunks_received));
  Simple(&out, "relay_blobs_delivered_total", "counter",
         "Large attachments delivered to a sink from the spool.", i64(blobs_delivered));
  Simple(&out, "relay_blobs_missing_total", "counter",
         "Large attachments not complete within [site] attachment_wait (delivered with a note).",
         i64(blobs_missing));
  Simple(&out, "relay_spool_collected_total", "counter",
         "Orphaned spool files removed after dedup_ttl.", i64(spool_collected));
  Family(&out, "relay_frames_rejected_total", "counter",
         "Frames and control messages rejected, by reason.");
  for (std::size_t i = 0; i < frames_rejected.size(); ++i) {
    Sample(&out, "relay_frames_rejected_total",
           std::string("reason=\"") +
               crypto::RejectReasonName(static_cast<crypto::RejectReason>(i)) + "\"",
           i64(frames_rejected[i]));
  }
  for (std::size_t i = 0; i < inbound_dropped.size(); ++i) {
    Sample(&out, "relay_frames_rejected_total",
           std::string("reason=\"") + InboundDropName(static_cast<InboundDrop>(i)) + "\"",
           i64(inbound_dropped[i]));
  }
  Family(&out, "relay_api_refused_total", "counter",
         "Local API requests refused (or connections closed at a deadline), by reason.");
  for (std::size_t i = 0; i < http_refused.size(); ++i) {
    Sample(&out, "relay_api_refused_total",
           std::string("reason=\"") + HttpRefusalName(static_cast<HttpRefusal>(i)) + "\"",
           i64(http_refused[i]));
  }
  for (std::size_t i = 0; i < api_refused.size(); ++i) {
    Sample(&out, "relay_api_refused_total",
           std::string("reason=\"") + ApiRefusalName(static_cast<ApiRefusal>(i)) + "\"",
           i64(api_refused[i]));
  }

  Family(&out, "relay_link_refused_total", "counter",
         "ZeroMQ link connections and messages refused (or, dial_failed, not completed), by "
         "reason.");
  for (std::size_t i = 0; i < link_refused.size(); ++i) {
    Sample(&out, "relay_link_refused_total",
           std::string("reason=\"") +
               transports::LinkRefusalName(static_cast<transports::LinkRefusal>(i)) + "\"",
           i64(link_refused[i]));
  }

  struct PeerFamily {
    const char* name;
    const char* type;
    const char* help;
    std::int64_t (*get)(const PeerMetrics&);
  };
  static const PeerFamily kPeerFamilies[] = {
      {"relay_frames_sent_total", "counter", "Frames sent to the peer (including resends).",
       [](const PeerMetrics& p) { return static_cast<std::int64_t>(p.frames_sent.load()); }},
      {"relay_frames_received_total", "counter", "Frames from the peer accepted.",
       [](const PeerMetrics& p) { return static_cast<std::int64_t>(p.frames_received.load()); }},
      {"relay_events_sent_total", "counter", "Events sent to the peer (including resends).",
       [](const PeerMetrics& p) { return static_cast<std::int64_t>(p.events_sent.load()); }},
      {"relay_events_received_total", "counter", "New events accepted from the peer.",
       [](const PeerMetrics& p) { return static_cast<std::int64_t>(p.events_received.load()); }},
      {"relay_queue_depth", "gauge", "Events queued for the peer and not yet acknowledged.",
       [](const PeerMetrics& p) { return static_cast<std::int64_t>(p.queue_depth.load()); }},
      {"relay_acked_through", "gauge", "Outbound log position acknowledged by the peer.",
       [](const PeerMetrics& p) { return static_cast<std::int64_t>(p.acked_through.load()); }},
      {"relay_oldest_unacked_age_seconds", "gauge",
       "Age of the oldest event not yet acknowledged by the peer (0 when none).",
       [](const PeerMetrics& p) {
         std::int64_t t = p.oldest_unacked_ms.load();
         if (t == 0) return std::int64_t{0};
         std::int64_t now = std::chrono::duration_cast<std::chrono::milliseconds>(
                                std::chrono::system_clock::now().time_since_epoch())
                                .count();
         return std::max<std::int64_t>(0, (now - t) / 1000);
       }},
      {"relay_link_up", "gauge", "1 when the ZeroMQ link to the peer is up.",
       [](const PeerMetrics& p) { return static_cast<std::int64_t>(p.link_up.load()); }},
      {"relay_last_contact_timestamp_seconds", "gauge", "Unix time of the last valid message.",
       [](const PeerMetrics& p) { return p.last_contact_ms.load() / 1000; }},
      {"relay_frame_resends_total", "counter", "Times unacknowledged frames were sent again.",
       [](const PeerMetrics& p) { return static_cast<std::int64_t>(p.resends.load()); }},
      {"relay_queue_full_total", "counter",
       "Ingest requests refused (503) because the peer's queue held max_queue events.",
       [](const PeerMetrics& p) { return static_cast<std::int64_t>(p.queue_full.load()); }},
  };
  for (const auto& f : kPeerFamilies) {
    Family(&out, f.name, f.type, f.help);
    for (const auto& p : peers) Sample(&out, f.name, PeerLabel(*p), f.get(*p));
  }
  Family(&out, "relay_inbound_held_bytes", "gauge",
         "Bytes of events from the peer stored and not yet delivered to every sink.");
  for (const auto& p : peers)
    Sample(&out, "relay_inbound_held_bytes", PeerLabel(*p), i64(p->inbound_held));
  Family(&out, "relay_inbound_deferred_total", "counter",
         "Frames from the peer not taken for now (not acknowledged; they come again), by reason.");
  for (const auto& p : peers) {
    for (std::size_t r = 0; r < p->inbound_deferred.size(); ++r)
      Sample(&out, "relay_inbound_deferred_total",
             PeerLabel(*p) + ",reason=\"" + InboundWaitName(static_cast<InboundWait>(r)) + "\"",
             i64(p->inbound_deferred[r]));
  }
  Family(&out, "relay_acks_refused_total", "counter",
         "Acknowledgements from the peer not applied to its cursor, by reason.");
  for (const auto& p : peers) {
    for (std::size_t r = 0; r < p->acks_refused.size(); ++r)
      Sample(&out, "relay_acks_refused_total",
             PeerLabel(*p) + ",reason=\"" + AckRefusalName(static_cast<AckRefusal>(r)) + "\"",
             i64(p->acks_refused[r]));
  }
  return out;
}

}  // namespace relay
