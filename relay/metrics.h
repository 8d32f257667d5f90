#pragma once
// Daemon-wide counters and gauges, rendered as Prometheus text on GET /metrics.
// All members are atomics: any thread may update them without locks.

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "crypto/frame.h"
#include "relay/http_server.h"
#include "transports/diode.h"
#include "transports/zmq_link.h"

namespace relay {

struct PeerMetrics {
  std::string name;
  std::atomic<std::uint64_t> frames_sent{0};
  std::atomic<std::uint64_t> frames_received{0};
  std::atomic<std::uint64_t> events_sent{0};
  std::atomic<std::uint64_t> events_received{0};
  std::atomic<std::uint64_t> queue_depth{0};  // events routed to the peer, not yet acked
  std::atomic<std::uint64_t> acked_through{0};
  std::atomic<std::int64_t> oldest_unacked_ms{0};  // created_at of the oldest unacked event
  std::atomic<int> link_up{0};
  std::atomic<std::int64_t> last_contact_ms{0};
  std::atomic<std::uint64_t> resends{0};
  std::atomic<std::uint64_t> queue_full{0};  // ingest requests refused: max_queue reached
  // Acknowledgements from this peer that were not applied (AckRefusal).
  std::array<std::atomic<std::uint64_t>, 3> acks_refused{};
  // Bytes of events received from the peer still in the inbound store (until every sink has
  // them), against [peer] max_inbound.
  std::atomic<std::uint64_t> inbound_held{0};
  // Frames from the peer not taken for now (InboundWait): not acknowledged, so they come again.
  std::array<std::atomic<std::uint64_t>, 3> inbound_deferred{};
};

// Why a frame from a peer was not taken for now (it comes again: resent, imported again, or
// asked for by a resend request).
enum class InboundWait : std::size_t {
  kMaxInbound = 0,  // the peer's undelivered events reached [peer] max_inbound
  kMaxSpool,        // the spool of its chunks' origin reached [peer] max_spool
  kDiskLow,         // data_dir has less than [site] min_free free
};
const char* InboundWaitName(InboundWait w);

// Why an acknowledgement was not applied to a peer's cursor.
enum class AckRefusal : std::size_t {
  kBeyondLog = 0,  // beyond anything this site's log ever held (attack, or a re-created store)
  kBeyondSent,     // beyond what was sent to the peer (attack or misconfiguration)
  kPreviousKey,    // signed with the peer's previous key, which may not move cursors
};
const char* AckRefusalName(AckRefusal r);

// Reasons a frame or control message can be rejected, beyond crypto::RejectReason.
enum class InboundDrop : std::size_t {
  kGap = 0,     // frame starts after a sequence not yet received (resent later)
  kUnroutable,  // event for a channel not bridged with that peer
  kLoop,        // event whose hop list already holds this site
  // Origin signatures (crypto/origin.h) and ownership.
  kUnknownOrigin,       // event from a site that is neither a peer nor an [origin.X]
  kBadOriginSignature,  // no valid attestation of its origin covers the event
  kOriginNotAllowed,    // the sending peer may not forward that origin's events (via =)
  kBadHops,             // the hop list does not start at the origin or end at the sender
  kStale,               // forwarded event older than the dedup memory (a replay could pass)
  kNotOwner,            // edit, delete or reaction removal of another site's post or reaction
  // Signed with a peer's previous key after [peer] previous_public_key_until (a frame, control
  // message, bundle or ack file).
  kPreviousKeyExpired,
  kCount
};

// Refusals of the local API beyond the HTTP server's own (HttpRefusal).
enum class ApiRefusal : std::size_t {
  kBundleBusy = 0,  // /v1/bundles/* answered 429: every bundle worker busy
  kFolder,          // a bundle path outside the folders the configuration names
  kCount
};
const char* ApiRefusalName(ApiRefusal r);  // "bundle_busy", "folder"

struct Metrics {
  std::atomic<std::uint64_t> events_ingested{0};
  std::atomic<std::uint64_t> ingest_requests{0};
  std::atomic<std::uint64_t> ingest_duplicates{0};   // repeated client ids
  std::atomic<std::uint64_t> ingest_rejected{0};     // 4xx answers
  std::atomic<std::uint64_t> ingest_unavailable{0};  // 503 answers (all reasons below, and more)
  std::atomic<std::uint64_t> ingest_busy{0};         // 503: max_pending bytes in memory
  std::atomic<std::uint64_t> ingest_disk_low{0};     // 503: free space below min_free
  std::atomic<std::uint64_t> commits{0};             // synced ingest write batches
  std::atomic<std::uint64_t> bundles_expired{0};     // bundle files refused as past expiry
  std::atomic<std::uint64_t> events_delivered{0};
  std::atomic<std::uint64_t> delivery_failures{0};
  std::atomic<std::uint64_t> dedup_hits{0};
  std::atomic<std::uint64_t> events_forwarded{0};
  std::atomic<std::uint64_t> store_bytes{0};
  std::atomic<std::uint64_t> inbound_backlog{0};
  // Data diode.
  std::atomic<std::uint64_t> diode_datagrams_sent{0};
  std::atomic<std::uint64_t> diode_datagrams_received{0};
  std::atomic<std::uint64_t> diode_datagrams_malformed{0};  // = rejected{malformed}
  std::array<std::atomic<std::uint64_t>, static_cast<std::size_t>(transports::DiodeReject::kCount)>
      diode_datagrams_rejected{};                         // by reason, before they changed anything
  std::atomic<std::uint64_t> diode_frames_not_stored{0};  // reassembled, then counted missing again
  std::atomic<std::uint64_t> diode_messages_received{0};  // frames reassembled
  std::atomic<std::uint64_t> diode_shards_recovered{0};   // data shards rebuilt from parity
  std::atomic<std::uint64_t> diode_messages_missing{0};   // announced, not (yet) complete
  std::atomic<std::uint64_t> diode_streams_dropped{0};    // decoder state dropped for newer
  std::atomic<std::uint64_t> diode_resend_ranges{0};      // log ranges queued by requests
  std::atomic<std::uint64_t> diode_retention_dropped{0};  // log entries dropped unacked
  // Mattermost adapter.
  std::atomic<std::uint64_t> mm_captured{0};              // changes captured and committed
  std::atomic<std::uint64_t> mm_catchups{0};              // REST catch-up queries
  std::atomic<std::uint64_t> mm_ws_connects{0};           // WebSocket (re)connections
  std::atomic<std::uint64_t> mm_seq_gaps{0};              // WebSocket sequence gaps seen
  std::atomic<std::uint64_t> mm_replayed{0};              // events applied to the local server
  std::atomic<std::uint64_t> mm_replay_failures{0};       // events that could never be applied
  std::atomic<std::uint64_t> mm_retries{0};               // calls retried (429, 5xx, timeouts)
  std::atomic<std::uint64_t> mm_files_too_large{0};       // attachments over the size limit
  std::atomic<std::uint64_t> mm_system_posts_skipped{0};  // system posts not bridged
  std::atomic<std::uint64_t> mm_channel_holds{0};         // replay held on a channel error
  // Large attachments (blobs carried in chunk events).
  std::atomic<std::uint64_t> blobs_sent{0};            // captured and committed as chunks
  std::atomic<std::uint64_t> blob_chunks_received{0};  // chunks written to the spool
  std::atomic<std::uint64_t> blobs_delivered{0};       // delivered to a sink from the spool
  std::atomic<std::uint64_t> blobs_missing{0};         // not complete within attachment_wait
  std::atomic<std::uint64_t> spool_collected{0};       // orphaned spool files removed
  std::array<std::atomic<std::uint64_t>, static_cast<std::size_t>(crypto::RejectReason::kCount)>
      frames_rejected{};
  std::array<std::atomic<std::uint64_t>, static_cast<std::size_t>(InboundDrop::kCount)>
      inbound_dropped{};
  // Local API (relay_api_refused_total{reason}).
  std::array<std::atomic<std::uint64_t>, static_cast<std::size_t>(HttpRefusal::kCount)>
      http_refused{};
  std::array<std::atomic<std::uint64_t>, static_cast<std::size_t>(ApiRefusal::kCount)>
      api_refused{};
  std::array<std::atomic<std::uint64_t>, static_cast<std::size_t>(transports::LinkRefusal::kCount)>
      link_refused{};
  std::vector<std::unique_ptr<PeerMetrics>> peers;

  std::string RenderPrometheus(const std::string& site) const;
};

const char* InboundDropName(InboundDrop d);

}  // namespace relay
