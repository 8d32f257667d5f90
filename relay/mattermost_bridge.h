#pragma once
// The Mattermost side of a site: capture (server -> events) and replay (events -> server).
//
// Capture follows the bridged channels over the WebSocket and catches up over REST `since`
// after every start, new connection id, sequence gap and periodically, with an overlap window;
// per-post state (update_at, edit_at, delete_at, reactions) makes it idempotent. Captured
// changes are committed through the daemon's committer together with the capture state and the
// channel cursor, so a change is captured exactly once across crashes.
//
// Replay reads the inbound store in order (its own cursor), and applies each event to the
// server: create (with an intent record so a crash between "created" and "mapped" cannot create
// a duplicate), edit, delete, reactions (one bot reaction per emoji while any remote reactor is
// left) and attachments. An error about the channel, the token or the server (401, 403, 429,
// 5xx, an archived or missing channel) holds that channel's replay, in order, until it passes;
// a refusal of one post's content leaves a note in its place.
//
// Loop prevention: posts created by the relay carry props.relay_event_id and are never
// captured; neither is anything by the relay's bot user.

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "base/status.h"
#include "config/config.h"
#include "event/event.h"

namespace relay {

namespace queue {
class Store;
class WriteBatch;
}  // namespace queue
struct Metrics;

// One change captured from the chat server. Post ids are resolved to event ids by the
// committer (the mapping may be created in the same commit).
struct CapturedChange {
  EventKind kind = EventKind::kPost;
  std::string channel;         // relay channel name
  std::string author;          // display name of the chat user
  std::string text;            // message text, or the emoji name for reactions
  std::string post_id;         // the post this change is about
  std::string thread_post_id;  // root post of a reply, or empty
  std::vector<std::pair<std::string, std::string>> props;
  std::vector<Attachment> files;
  FileChunk chunk;  // kind kFileChunk: one piece of a large attachment, committed before its post
};

// A capture commit: changes plus state that must become durable with them.
struct CaptureSubmission {
  std::vector<CapturedChange> changes;
  std::vector<std::pair<std::string, std::string>> state;  // long-lived key/values
  std::vector<std::pair<std::string, std::uint64_t>> counters;
};

class MattermostBridge {
 public:
  struct Hooks {
    // Commits a submission (blocks until durable or failed).
    std::function<Status(CaptureSubmission&)> submit;
    // Highest inbound sequence committed so far.
    std::function<std::uint64_t()> stored_head;
    queue::Store* store = nullptr;
    Metrics* metrics = nullptr;
  };
  MattermostBridge(const config::Config& config, Hooks hooks);
  ~MattermostBridge();  // stops
  MattermostBridge(const MattermostBridge&) = delete;
  MattermostBridge& operator=(const MattermostBridge&) = delete;

  // Reads the token file (error names it) and starts the capture and replay threads. A server
  // that cannot be reached is retried in the background, not an error.
  Status Start();
  void Stop();
  // Wakes the replay thread (new inbound events).
  void Notify();
  // Inbound sequence through which every event for a Mattermost channel has been applied.
  std::uint64_t replayed_through() const;

  // Progress of a `relay backfill` of one channel (docs/mattermost.md, "History").
  struct BackfillProgress {
    std::string state;           // "" (none asked since start), queued, listing, capturing, done
    std::uint64_t request = 0;   // counts requests since the daemon started
    std::int64_t since_ms = 0;   // posts created from then (server time)
    std::uint64_t listed = 0;    // history posts found so far
    std::uint64_t done = 0;      // of them, processed
    std::uint64_t captured = 0;  // changes committed (posts and their reactions)
    double seconds = 0;
  };
  // Asks for the history of `channel` (a Mattermost channel of this site) created from
  // `since_ms` (server time; 0: all) until bridging began. Stored first: a daemon killed during
  // it resumes it at start. Posts already carried are not carried again.
  Status Backfill(const std::string& channel, std::int64_t since_ms);

  // Replay of one chat channel: held (blocked) by an error about the channel, the token or the
  // server, with the reason and since when (ms), or flowing; and its backfill, if any.
  struct ChannelReplay {
    std::string channel;
    bool blocked = false;
    std::string reason;
    std::int64_t since_ms = 0;
    BackfillProgress backfill;
  };
  std::vector<ChannelReplay> Channels() const;
  // relay_mattermost_channel_blocked{channel} as Prometheus text.
  std::string MetricsText() const;

  // Key names in the store, shared with the committer.
  static std::string PostToEventKey(const std::string& post_id) { return "m:" + post_id; }
  static std::string EventToPostKey(const std::string& event_id) { return "p:" + event_id; }
  // Attachments up to this size travel inline in the post event; larger ones as a blob of
  // chunk events (docs/mattermost.md, "Large attachments").
  static constexpr std::uint64_t kInlineFileBytes = 256u << 10;
  // Chunks committed per capture submission: a few MiB in memory at a time.
  static constexpr std::size_t kChunksPerCommit = 4;
  // How long id mappings and capture state are kept.
  static constexpr std::int64_t kMappingTtlMs = 400LL * 24 * 3600 * 1000;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace relay
