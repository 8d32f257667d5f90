#pragma once
// The site configuration: one INI file (see docs/configuration.md and design.md).
//
// LoadConfig parses and validates the whole file and reports every problem it finds at once,
// each naming the section/key and quoting the value. Relative paths are resolved against the
// folder of the config file.

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "base/status.h"
#include "crypto/identity.h"

namespace relay::config {

struct Endpoint {  // host:port for TCP listeners
  std::string host;
  std::uint16_t port = 0;
};

struct PeerConfig {
  std::string name;                   // from [peer.NAME]
  crypto::PublicIdentity public_key;  // public_key =
  // Key rotation: the peer's previous identity, still accepted while it rotates its key, until
  // previous_public_key_until (required with it). Use PreviousKeyAt, not these fields, to decide
  // whether a message signed with the previous key is accepted.
  std::optional<crypto::PublicIdentity> previous_public_key;
  std::chrono::system_clock::time_point previous_public_key_until{};
  std::string zmq_connect;  // optional, "tcp://host:port"
  std::string files_dir;    // optional (sneakernet, issue 4)
  bool files_auto = false;  // the daemon exports to and imports from files_dir by itself
  std::chrono::milliseconds files_interval{30000};  // how often it looks
  std::string diode_send;                           // optional: "udp://host:port", one-way sender
  std::uint64_t diode_rate = 8u << 20;              // bytes/s the diode sender may put on the wire
  std::uint32_t diode_data_shards = 16;             // FEC: data shards per block (k)
  std::uint32_t diode_parity_shards = 8;            // FEC: parity shards per block (m)
  std::uint32_t diode_interleave = 8;               // FEC blocks interleaved against burst loss
  std::chrono::milliseconds diode_retention{std::chrono::hours(24 * 7)};  // kept unacked
  std::uint32_t window = 8;  // frames in flight before back-pressure
  // Events queued for this peer (stored, not yet acknowledged by it) before new messages for it
  // are refused with 503.
  std::uint32_t max_queue = 10'000'000;
  std::uint32_t max_frame_events = 2048;
  std::uint64_t max_frame_bytes = 4u << 20;
  // Bytes of events received from this peer stored and not yet delivered to every local sink;
  // beyond, its frames wait (not acknowledged) until delivery catches up.
  std::uint64_t max_inbound = std::uint64_t{1} << 30;
  // Bytes of large-attachment chunks in the spool for origins this peer sends chunks of.
  std::uint64_t max_spool = std::uint64_t{16} << 30;
  // Peers that may forward this peer's own events to this site (it always may send them
  // itself), e.g. the third side of a triangle.
  std::vector<std::string> via;

  // The previous identity if it may still be used at `now` (crypto::PreviousKeyAccepted), else
  // null: null also when there is none.
  const crypto::PublicIdentity* PreviousKeyAt(std::chrono::system_clock::time_point now) const;
  // True when there is a previous identity and `now` is past its previous_public_key_until.
  bool PreviousKeyExpiredAt(std::chrono::system_clock::time_point now) const;
};

// [origin.NAME]: a site reached only through others, whose events this site accepts when they
// carry its signature (crypto/origin.h) and come from one of the peers in `via`.
struct OriginConfig {
  std::string name;
  crypto::PublicIdentity public_key;  // only sign_pk is used: it verifies the origin signatures
  // During the origin's key rotation, until previous_public_key_until (required with it).
  std::optional<crypto::PublicIdentity> previous_public_key;
  std::chrono::system_clock::time_point previous_public_key_until{};
  std::vector<std::string> via;  // peer names
};

enum class SinkKind { kJsonl, kMattermost, kWebhook };

struct ChannelConfig {
  std::string name;                // from [channel.NAME]
  std::vector<std::string> peers;  // peer names, each a [peer.NAME]
  SinkKind sink = SinkKind::kJsonl;
  std::string jsonl_path;  // absolute after loading
  std::string mattermost_channel_id;
  std::string webhook_url;  // sink = webhook: a Slack-compatible incoming webhook
  // sink = mattermost: system post types (e.g. system_header_change) carried to the peers as
  // notices; every other system post stays at this site (docs/mattermost.md).
  std::vector<std::string> mattermost_system_posts;
};

struct Config {
  std::string path;  // the file loaded (absolute)
  std::string dir;   // its folder
  // [site]
  std::string site_name;
  std::string key_file;
  // Key rotation: this site's previous key; frames still sealed for it are opened.
  std::string previous_key_file;
  std::string data_dir;
  std::chrono::milliseconds dedup_ttl{std::chrono::hours(24 * 7)};
  // How long a received post waits for the chunks of its large attachments before it is
  // delivered with a note that they are missing.
  std::chrono::milliseconds attachment_wait{std::chrono::minutes(10)};
  // Below this many free bytes on data_dir's file system, new messages are refused (503) before
  // the store runs into the full disk; 0 leaves it to the store's own error.
  std::uint64_t min_free = 64u << 20;
  // Folders, besides each peer's files_dir, that bundle export and import may use (and their
  // subfolders); absolute after loading. See docs/sneakernet.md.
  std::vector<std::string> transfer_dirs;
  // [ingest]
  Endpoint ingest_listen;
  std::uint64_t ingest_max_body = 16u << 20;  // bytes of one HTTP request body
  std::uint64_t ingest_max_text = 64u << 10;  // bytes of one message's text
  // Bytes of request bodies held in memory at once (being read or awaiting their answer);
  // default max(64 MiB, max_body).
  std::uint64_t ingest_max_pending = 0;
  // The API's bearer token (docs/security.md); absolute after loading. Empty only with
  // allow_anonymous.
  std::string ingest_token_file;
  bool ingest_allow_anonymous = false;  // demos only: anyone who reaches the port uses the API
  // Host names clients may use for the API besides the listen address (DNS-rebinding check).
  std::vector<std::string> ingest_allowed_hosts;
  // [zmq]
  std::string zmq_listen;  // optional, "tcp://host:port"
  std::chrono::milliseconds heartbeat_interval{1000};
  std::chrono::milliseconds peer_timeout{5000};
  // [diode]
  std::string diode_listen;  // optional
  // [mattermost]
  std::string mattermost_url;
  std::string mattermost_token_file;
  std::string mattermost_ca_file;      // optional CA bundle (TLS)
  std::string mattermost_client_cert;  // optional client certificate (mutual TLS)
  std::string mattermost_client_key;
  std::chrono::milliseconds mattermost_timeout{10000};
  // How remote authors are shown; {author} and {site} are replaced.
  std::string mattermost_display_name = "{author} ({site})";
  std::string mattermost_icon_url;  // optional override_icon_url, same placeholders
  std::uint64_t mattermost_max_file_bytes = 50u << 20;
  std::chrono::milliseconds mattermost_catchup_overlap{60000};
  std::chrono::milliseconds mattermost_poll_interval{300000};  // periodic catch-up safety net

  std::vector<PeerConfig> peers;
  std::vector<OriginConfig> origins;
  std::vector<ChannelConfig> channels;

  const PeerConfig* FindPeer(const std::string& name) const;
  const OriginConfig* FindOrigin(const std::string& name) const;
  const ChannelConfig* FindChannel(const std::string& name) const;
};

// Parses and validates `path`. On failure the Status message holds every problem, one per
// line, e.g. "europe.conf: [peer.aws] public_key = 'xyz': bad public key: ...".
Result<Config> LoadConfig(const std::string& path);

// Checks this site's own public identity (`own`, from [site] key_file) and, during a rotation,
// its previous one (`own_previous`, from [site] previous_key_file, or null) against every peer's
// public_key and previous_public_key: no signing or box key may appear twice. LoadConfig cannot do
// this (the public identity is in the key file); the daemon does it when it loads the key, and
// `relay check-config` when it can read the key file. Every problem is one line naming both
// sections, e.g. "europe.conf: [peer.aws] public_key = '...': its signing key is this site's own
// key ([site] key_file '/etc/relay/europe.key')".
Status CheckOwnKeys(const Config& config, const crypto::PublicIdentity& own,
                    const crypto::PublicIdentity* own_previous);

// An RFC 3339 time, e.g. "2026-12-31T00:00:00Z", "2026-12-31T01:30:00+01:30" or with fractions
// of a second ("...00.250Z", kept to the millisecond). The offset (Z or +hh:mm / -hh:mm) is
// required; a leap second (:60) is refused, and so is a time outside the years 1900 to 2199 in UTC
// (system_clock's nanoseconds cover 1678 to 2261).
Result<std::chrono::system_clock::time_point> ParseTime(const std::string& text);
// The time in UTC, "2026-12-31T00:00:00Z" (with milliseconds when there are any).
std::string FormatTime(std::chrono::system_clock::time_point time);

// Helpers shared with the CLI: "1500ms", "2s", "5m", "1h", "7d" and "64KiB", "16MiB", "1GiB".
Result<std::chrono::milliseconds> ParseDuration(const std::string& text);
Result<std::uint64_t> ParseSize(const std::string& text);
// "host:port" or "[v6]:port".
Result<Endpoint> ParseEndpoint(const std::string& text);

}  // namespace relay::config
