#include "relay/mattermost_bridge.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <thread>
#include <tuple>

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "base/log.h"
#include "chat/mattermost_client.h"
#include "chat/mattermost_props.h"
#include "chat/webhook.h"
#include "queue/store.h"
#include "relay/blob_spool.h"
#include "relay/metrics.h"

namespace relay {
namespace {

using Clock = std::chrono::steady_clock;
using chat::MmError;
using chat::MmPost;
using Json = nlohmann::json;

std::int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

constexpr char kReplayedCounter[] = "mm/replayed";
constexpr std::size_t kSinceCap = 1000;  // rows the server returns at most for `since`
constexpr int kPageSize = 200;
constexpr int kMaxPages = 500;  // 100,000 posts: a bound on one catch-up
// Downloads whose size disagrees with the file info before the attachment is given up.
constexpr int kMaxSizeMismatches = 5;
// The server answers a repeated pending_post_id with the first post for 30 s after that post
// was saved (pendingPostIDsCacheTTL); a create re-sent within this much of the previous attempt
// is safe whatever became of that attempt (the margin covers the attempt's own time in flight).
constexpr std::int64_t kPendingPostIdTrustMs = 20000;
std::string CursorKey(const std::string& channel) { return "mmcursor/" + channel; }
std::string StateKey(const std::string& post_id) { return "s:" + post_id; }
std::string ReactionsKey(const std::string& post_id) { return "x:" + post_id; }
std::string IntentKey(const std::string& event_id) { return "i:" + event_id; }
std::string ReactorsKey(const std::string& post_id, const std::string& emoji) {
  return "r:" + post_id + ":" + emoji;
}

// What capture remembers of a post between versions.
struct PostState {
  bool known = false;
  std::int64_t update_at = 0, edit_at = 0, delete_at = 0;
  std::string Encode() const {
    return std::to_string(update_at) + "|" + std::to_string(edit_at) + "|" +
           std::to_string(delete_at);
  }
  static PostState Decode(const std::string& s) {
    PostState st;
    std::istringstream in(s);
    char bar;
    if (in >> st.update_at >> bar >> st.edit_at >> bar >> st.delete_at) st.known = true;
    return st;
  }
};

std::set<std::string> SplitSet(const std::string& s) {
  std::set<std::string> out;
  std::size_t pos = 0;
  while (pos < s.size()) {
    auto comma = s.find('\n', pos);
    if (comma == std::string::npos) comma = s.size();
    if (comma > pos) out.insert(s.substr(pos, comma - pos));
    pos = comma + 1;
  }
  return out;
}

std::string JoinSet(const std::set<std::string>& set) {
  std::string out;
  for (const auto& s : set) {
    if (!out.empty()) out.push_back('\n');
    out += s;
  }
  return out;
}

Json ParseProps(const std::string& text) {
  Json j = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  return j.is_object() ? j : Json::object();
}

std::string Replace(std::string text, const std::string& key, const std::string& value) {
  for (std::size_t pos = text.find(key); pos != std::string::npos;
       pos = text.find(key, pos + value.size())) {
    text.replace(pos, key.size(), value);
  }
  return text;
}

}  // namespace

struct MattermostBridge::Impl {
  const config::Config& config;
  Hooks hooks;
  chat::MattermostOptions options;
  std::map<std::string, std::string> relay_by_mm;  // mattermost channel id -> relay channel
  std::map<std::string, const config::ChannelConfig*> sinks;  // relay channel -> config
  bool capture_enabled = false;

  std::atomic<bool> stop{false};
  std::mutex mu;
  std::condition_variable cv;
  std::thread capture_thread, replay_thread;
  std::atomic<std::uint64_t> replayed{0};
  std::string bot_id;      // set by whichever thread learns it first, under mu
  BlobWaiter blob_waiter;  // replay thread only

  Impl(const config::Config& c, Hooks h)
      : config(c), hooks(std::move(h)), blob_waiter(c.attachment_wait) {}

  void Sleep(std::chrono::milliseconds d) {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait_for(lock, d, [&] { return stop.load(); });
  }

  std::optional<std::string> Get(const std::string& key) {
    return hooks.store->GetDedup(key, NowMs());
  }

  // Runs `call` until it succeeds, fails for good, or the bridge stops. Counts retries.
  template <typename T, typename F>
  chat::MmResult<T> Retry(const char* what, F call) {
    std::chrono::milliseconds backoff(250);
    while (true) {
      chat::MmResult<T> r = call();
      if (r.ok() || !r.error.retryable || stop) return r;
      ++hooks.metrics->mm_retries;
      std::chrono::milliseconds wait = r.error.http_status == 429 && r.error.retry_after.count() > 0
                                           ? r.error.retry_after
                                           : backoff;
      log::Warning(std::string("mattermost: ") + what + " failed, retrying in " +
                   std::to_string(wait.count()) + " ms: " + r.error.message);
      Sleep(wait);
      backoff = std::min(backoff * 2, std::chrono::milliseconds(30000));
    }
  }

  std::string BotId(chat::MattermostClient& client) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (!bot_id.empty()) return bot_id;
    }
    auto me = Retry<chat::MmUser>("GET /users/me", [&] { return client.GetMe(); });
    if (!me.ok()) return "";
    std::lock_guard<std::mutex> lock(mu);
    bot_id = me.value->id;
    return bot_id;
  }

  // ---- capture ---------------------------------------------------------------------------------
  struct Round {
    CaptureSubmission sub;
    std::map<std::string, PostState> states;
    std::map<std::string, std::set<std::string>> reactions;
    // A post could not be captured now (its attachment's chunks were not stored): the round's
    // cursor must not move past it, and a catch-up must follow.
    bool incomplete = false;
  };

  PostState LoadState(Round& round, const std::string& post_id) {
    auto it = round.states.find(post_id);
    if (it != round.states.end()) return it->second;
    auto v = Get(StateKey(post_id));
    return v ? PostState::Decode(*v) : PostState{};
  }

  std::set<std::string>& LoadReactions(Round& round, const std::string& post_id) {
    auto it = round.reactions.find(post_id);
    if (it != round.reactions.end()) return it->second;
    auto v = Get(ReactionsKey(post_id));
    return round.reactions[post_id] = v ? SplitSet(*v) : std::set<std::string>{};
  }

  std::map<std::string, std::string> usernames;  // capture thread only

  std::string Username(chat::MattermostClient& client, const std::string& user_id) {
    auto it = usernames.find(user_id);
    if (it != usernames.end()) return it->second;
    auto u = Retry<chat::MmUser>("GET /users/{id}", [&] { return client.GetUser(user_id); });
    std::string name = u.ok() && !u.value->username.empty() ? u.value->username : user_id;
    usernames[user_id] = name;
    return name;
  }

  // Downloads one large file into the spool (streamed, hashed on the way) and commits it as
  // chunk events of `channel`, kChunksPerCommit per synced commit, before the post that will
  // reference it. False when a commit failed: the post must be captured again later. A file
  // that cannot be downloaded for good is a note, as for small files.
  bool CarryBlob(chat::MattermostClient& client, const std::string& channel,
                 const chat::MmFileInfo& info, std::vector<Attachment>* files, std::string* note) {
    const std::string dir = SpoolOutDir(config.data_dir);
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    const std::string path = dir + "/" + RandomHex(12) + ".part";
    struct Unlink {
      const std::string& p;
      ~Unlink() { ::unlink(p.c_str()); }
    } unlink_at_end{path};
    std::string hash, write_error;
    int mismatches = 0;
    auto got = Retry<std::uint64_t>("GET /files/{id}", [&]() -> chat::MmResult<std::uint64_t> {
      // Every attempt starts over: a fresh file and a fresh hash.
      int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
      if (fd < 0) {
        chat::MmResult<std::uint64_t> r;
        r.error.id = "sink";
        r.error.message = "cannot create spool file '" + path + "': " + std::strerror(errno);
        return r;
      }
      Blake2b h;
      auto r = client.DownloadFileTo(
          info.id, config.mattermost_max_file_bytes, [&](std::string_view piece) {
            h.Update(piece);
            while (!piece.empty()) {
              ssize_t n = ::write(fd, piece.data(), piece.size());
              if (n < 0 && errno == EINTR) continue;
              if (n < 0) {
                write_error = "cannot write spool file '" + path + "': " + std::strerror(errno);
                return false;
              }
              piece.remove_prefix(static_cast<std::size_t>(n));
            }
            return true;
          });
      ::close(fd);
      if (r.ok() && *r.value != static_cast<std::uint64_t>(info.size)) {
        // A proxy's page or a cut body can come with 200: the size must be the file info's.
        r.error =
            MmError{0, ++mismatches < kMaxSizeMismatches, std::chrono::milliseconds(0), "bad_reply",
                    "GET /api/v4/files/" + info.id + ": got " + std::to_string(*r.value) +
                        " bytes, the file info says " + std::to_string(info.size)};
        r.value.reset();
      }
      if (r.ok()) hash = h.Final();
      if (!r.ok() && !write_error.empty()) r.error.message = write_error;
      return r;
    });
    if (!got.ok()) {
      if (stop) return false;  // shutting down: capture the post after the restart
      if (!write_error.empty()) {
        // Our disk, not the file: capture the post again later rather than lose the file.
        log::Error("mattermost capture: attachment '" + info.name + "': " + write_error);
        return false;
      }
      *note += "[attachment '" + info.name + "' could not be read]";
      return true;
    }
    const std::uint64_t size = *got.value;
    const std::string blob_id = BlobIdFor(config.site_name, info.id);
    CaptureSubmission sub;
    auto flush = [&]() -> Status {
      if (sub.changes.empty()) return Status::Ok();
      Status s = hooks.submit(sub);
      sub.changes.clear();
      return s;
    };
    Status s = ForEachChunk(path, size, [&](std::uint64_t offset, std::string& bytes) {
      CapturedChange c;
      c.kind = EventKind::kFileChunk;
      c.channel = channel;
      c.chunk.blob_id = blob_id;
      c.chunk.offset = offset;
      c.chunk.total_size = size;
      c.chunk.data = std::move(bytes);
      sub.changes.push_back(std::move(c));
      return sub.changes.size() >= kChunksPerCommit ? flush() : Status::Ok();
    });
    if (s) s = flush();
    if (!s) {
      log::Error("mattermost capture: storing the chunks of attachment '" + info.name +
                 "' failed, the post is captured again: " + s.message());
      return false;
    }
    ++hooks.metrics->blobs_sent;
    Attachment a;
    a.name = info.name;
    a.mime_type = info.mime_type;
    a.size = size;
    a.blake2b = hash;
    a.blob_id = blob_id;
    files->push_back(std::move(a));
    return true;
  }

  // The post's attachments: small ones inline, large ones committed as chunks first (see
  // CarryBlob). False when the post must be captured again later (nothing for it is recorded).
  bool Download(chat::MattermostClient& client, const std::string& channel, const MmPost& post,
                std::vector<Attachment>* files, std::string* note) {
    for (const std::string& id : post.file_ids) {
      auto info =
          Retry<chat::MmFileInfo>("GET /files/{id}/info", [&] { return client.GetFileInfo(id); });
      if (!info.ok()) {
        *note += "[attachment " + id + " could not be read: " + info.error.message + "]";
        continue;
      }
      if (static_cast<std::uint64_t>(info.value->size) > config.mattermost_max_file_bytes) {
        ++hooks.metrics->mm_files_too_large;
        *note += "[attachment '" + info.value->name + "' (" + std::to_string(info.value->size) +
                 " bytes) is over the relay's limit of " +
                 std::to_string(config.mattermost_max_file_bytes) + " bytes]";
        continue;
      }
      if (info.value->id.empty()) info.value->id = id;
      if (static_cast<std::uint64_t>(info.value->size) > kInlineFileBytes) {
        if (!CarryBlob(client, channel, *info.value, files, note)) return false;
        continue;
      }
      // A proxy's page or a cut body can come with 200: the size must be the file info's.
      // Retried like any bad reply, but a server whose info keeps disagreeing must not stall
      // capture for ever.
      int mismatches = 0;
      auto data = Retry<std::string>("GET /files/{id}", [&] {
        auto got = client.DownloadFile(id, config.mattermost_max_file_bytes);
        if (got.ok() && got.value->size() != static_cast<std::uint64_t>(info.value->size)) {
          got.error = MmError{
              0, ++mismatches < kMaxSizeMismatches, std::chrono::milliseconds(0), "bad_reply",
              "GET /api/v4/files/" + id + ": got " + std::to_string(got.value->size()) +
                  " bytes, the file info says " + std::to_string(info.value->size)};
          got.value.reset();
        }
        return got;
      });
      if (!data.ok()) {
        *note += "[attachment '" + info.value->name + "' could not be read]";
        continue;
      }
      files->push_back(
          Attachment::Inline(info.value->name, info.value->mime_type, std::move(*data.value)));
    }
    return true;
  }

  void AddReactionChange(chat::MattermostClient& client, Round& round, const std::string& channel,
                         const std::string& post_id, const std::string& user_id,
                         const std::string& emoji, bool added) {
    CapturedChange c;
    c.kind = added ? EventKind::kReactionAdd : EventKind::kReactionRemove;
    c.channel = channel;
    c.author = Username(client, user_id);
    c.text = emoji;
    c.post_id = post_id;
    round.sub.changes.push_back(std::move(c));
  }

  // Turns one version of a post into changes. `deleted` forces deletion (post_deleted carries
  // the post as it was before); `reactions_known` says the post's reaction list is complete
  // (REST reads), so it can be compared with what was seen.
  void ProcessPost(chat::MattermostClient& client, Round& round, MmPost post, bool deleted,
                   bool reactions_known) {
    if (!post.original_id.empty()) return;  // archived pre-edit copy
    auto ch = relay_by_mm.find(post.channel_id);
    if (ch == relay_by_mm.end()) return;
    const std::string& channel = ch->second;
    std::string bot = BotId(client);
    if (deleted && post.delete_at == 0) post.delete_at = std::max<std::int64_t>(post.update_at, 1);
    Json props = ParseProps(post.props_json);
    bool relay_made = props.contains("relay_event_id") || (!bot.empty() && post.user_id == bot);
    // The post itself first: a reaction change of a new post must follow the post's creation
    // in the submission, or the committer cannot map it (the post is not bridged yet).
    if (!relay_made) CapturePostChange(client, round, channel, post, deleted);

    if (reactions_known && post.delete_at == 0) {
      std::set<std::string>& seen = LoadReactions(round, post.id);
      std::set<std::string> now;
      for (const auto& r : post.reactions) {
        if (r.user_id == bot) continue;
        now.insert(r.user_id + "/" + r.emoji_name);
      }
      if (now != seen) {
        for (const auto& r : now) {
          if (seen.count(r)) continue;
          auto slash = r.find('/');
          AddReactionChange(client, round, channel, post.id, r.substr(0, slash),
                            r.substr(slash + 1), true);
        }
        for (const auto& r : seen) {
          if (now.count(r)) continue;
          auto slash = r.find('/');
          AddReactionChange(client, round, channel, post.id, r.substr(0, slash),
                            r.substr(slash + 1), false);
        }
        seen = now;
      }
    }
  }

  // The create, edit or delete this version of a (human's) post stands for, if any.
  void CapturePostChange(chat::MattermostClient& client, Round& round, const std::string& channel,
                         const MmPost& post, bool deleted) {
    PostState st = LoadState(round, post.id);
    if (st.known && st.update_at >= post.update_at && !(deleted && st.delete_at == 0)) return;
    PostState next;
    next.known = true;
    next.update_at = std::max(st.update_at, post.update_at);
    next.edit_at = post.edit_at;
    next.delete_at = post.delete_at;
    // Only props safe to show at the peers leave this site (the receivers check again).
    const std::string carried = chat::CarriedProps(post.props_json);
    if (!st.known) {
      if (post.delete_at == 0) {
        CapturedChange c;
        c.kind = EventKind::kPost;
        c.channel = channel;
        c.author = Username(client, post.user_id);
        c.text = post.message;
        c.post_id = post.id;
        c.thread_post_id = post.root_id;
        std::string note;
        if (!Download(client, channel, post, &c.files, &note)) {
          round.incomplete = true;
          return;  // no state recorded: captured again by the next catch-up
        }
        if (!note.empty()) c.text += (c.text.empty() ? "" : "\n") + note;
        if (carried != "{}") c.props.emplace_back("mm_props", carried);
        round.sub.changes.push_back(std::move(c));
      }
    } else if (post.delete_at > 0 && st.delete_at == 0) {
      CapturedChange c;
      c.kind = EventKind::kDelete;
      c.channel = channel;
      c.author = Username(client, post.user_id);
      c.post_id = post.id;
      round.sub.changes.push_back(std::move(c));
    } else if (post.delete_at == 0 && post.edit_at != st.edit_at) {
      CapturedChange c;
      c.kind = EventKind::kEdit;
      c.channel = channel;
      c.author = Username(client, post.user_id);
      c.text = post.message;
      c.post_id = post.id;
      if (carried != "{}") c.props.emplace_back("mm_props", carried);
      round.sub.changes.push_back(std::move(c));
    } else if (post.delete_at > 0) {
      next.delete_at = st.delete_at;
    }
    round.states[post.id] = next;
  }

  void ProcessReaction(chat::MattermostClient& client, Round& round, const std::string& mm_channel,
                       const chat::MmReaction& r, bool added) {
    auto ch = relay_by_mm.find(mm_channel);
    if (ch == relay_by_mm.end()) return;
    if (r.user_id == BotId(client)) return;
    std::set<std::string>& seen = LoadReactions(round, r.post_id);
    std::string key = r.user_id + "/" + r.emoji_name;
    if (added == (seen.count(key) > 0)) return;  // already known
    if (added) {
      seen.insert(key);
    } else {
      seen.erase(key);
    }
    AddReactionChange(client, round, ch->second, r.post_id, r.user_id, r.emoji_name, added);
  }

  bool Submit(Round& round) {
    for (auto& [id, st] : round.states) round.sub.state.emplace_back(StateKey(id), st.Encode());
    for (auto& [id, set] : round.reactions)
      round.sub.state.emplace_back(ReactionsKey(id), JoinSet(set));
    if (round.sub.changes.empty() && round.sub.state.empty() && round.sub.counters.empty())
      return true;
    std::size_t n = round.sub.changes.size();
    Status s = hooks.submit(round.sub);
    if (!s) {
      log::Error("mattermost capture: storing " + std::to_string(n) +
                 " captured change(s) failed, they are captured again: " + s.message());
      return false;
    }
    hooks.metrics->mm_captured += n;
    if (round.incomplete) {
      Sleep(std::chrono::milliseconds(1000));  // e.g. a full queue: do not spin on it
      return false;
    }
    return true;
  }

  // Catches up one channel over REST `since`, from its cursor minus the overlap window.
  bool CatchUp(chat::MattermostClient& client, const std::string& mm_channel,
               const std::string& channel) {
    std::uint64_t cursor = hooks.store->GetCounter(CursorKey(channel), 0);
    std::int64_t since = std::max<std::int64_t>(
        0, static_cast<std::int64_t>(cursor) - config.mattermost_catchup_overlap.count());
    auto list = Retry<chat::MmPostList>("GET /channels/{id}/posts?since",
                                        [&] { return client.GetPostsSince(mm_channel, since); });
    if (!list.ok()) {
      log::Error("mattermost capture: catch-up of channel '" + channel +
                 "' failed: " + list.error.message);
      return false;
    }
    ++hooks.metrics->mm_catchups;
    std::vector<MmPost> posts = list.value->posts;
    if (list.value->order.size() >= kSinceCap) {
      // The server returns at most 1000 rows for `since`, an arbitrary subset when more
      // changed. Page through the channel's current posts (newest first) back to `since` so no
      // new post or edit of a new post is missed; only edits and deletes of posts created
      // before `since` can hide behind the cap (see docs/mattermost.md).
      log::Warning("mattermost capture: channel '" + channel +
                   "' has more than 1000 changes to catch up; paging through its posts");
      for (int page = 0; page < kMaxPages && !stop; ++page) {
        auto more = Retry<chat::MmPostList>("GET /channels/{id}/posts?page", [&] {
          return client.GetPostsPage(mm_channel, page, kPageSize);
        });
        if (!more.ok()) {
          log::Error("mattermost capture: paging channel '" + channel +
                     "' failed: " + more.error.message);
          return false;
        }
        bool older = false;
        for (MmPost& p : more.value->posts) {
          if (p.create_at <= since) older = true;
          posts.push_back(std::move(p));
        }
        if (more.value->order.empty() || older) break;
      }
    }
    // In the order the posts were created: a root before its replies (a reply or a reaction
    // bumps the root's update_at, so update_at would put the root last; a reply may be made in
    // the same millisecond as its root, so at one create_at roots come first), and the peer
    // sees new posts in the channel's order. Versions of one post (listed twice when paging)
    // oldest first, so the reaction diff compares against the newest.
    std::stable_sort(posts.begin(), posts.end(), [](const MmPost& a, const MmPost& b) {
      const bool a_reply = !a.root_id.empty(), b_reply = !b.root_id.empty();
      return std::tie(a.create_at, a_reply, a.update_at) <
             std::tie(b.create_at, b_reply, b.update_at);
    });
    Round round;
    std::int64_t max_update = static_cast<std::int64_t>(cursor);
    for (MmPost& p : posts) {
      max_update = std::max(max_update, p.update_at);
      ProcessPost(client, round, std::move(p), /*deleted=*/false, /*reactions_known=*/true);
    }
    if (!round.incomplete)
      round.sub.counters.emplace_back(CursorKey(channel), static_cast<std::uint64_t>(max_update));
    return Submit(round);
  }

  bool CatchUpAll(chat::MattermostClient& client) {
    bool ok = true;
    for (const auto& [mm, channel] : relay_by_mm) ok = CatchUp(client, mm, channel) && ok;
    return ok;
  }

  void CaptureLoop() {
    chat::MattermostClient client(options);
    chat::MattermostWebSocket ws(options);
    std::string connection_id;
    std::int64_t next_seq = 0;
    bool connected = false;
    bool need_catchup = true;
    auto last_catchup = Clock::now();
    std::chrono::milliseconds backoff(500);
    while (!stop) {
      if (!connected) {
        auto r = ws.Connect(connection_id, next_seq);
        if (!r.ok()) {
          log::Warning("mattermost capture: WebSocket connect failed: " + r.error.message);
          // A server that cannot be reached over the WebSocket may still answer REST: capture
          // goes on over REST every poll_interval (and at once when a catch-up is due) until
          // the WebSocket is back.
          Sleep(std::min<std::chrono::milliseconds>(
              backoff, std::max<std::chrono::milliseconds>(config.mattermost_poll_interval,
                                                           std::chrono::milliseconds(500))));
          backoff = std::min(backoff * 2, std::chrono::milliseconds(30000));
          if ((need_catchup || Clock::now() - last_catchup >= config.mattermost_poll_interval) &&
              CatchUpAll(client)) {
            need_catchup = false;
            last_catchup = Clock::now();
          }
          continue;
        }
        connected = true;
        backoff = std::chrono::milliseconds(500);
        ++hooks.metrics->mm_ws_connects;
      }
      if (need_catchup || Clock::now() - last_catchup > config.mattermost_poll_interval) {
        if (CatchUpAll(client)) {
          need_catchup = false;
          last_catchup = Clock::now();
        }
      }
      auto r = ws.Read(std::chrono::milliseconds(500));
      if (!r.ok()) {
        if (r.error.id == "timeout") continue;
        log::Warning("mattermost capture: WebSocket lost (" + r.error.message + "), resuming");
        connected = false;
        continue;
      }
      const chat::MmWsEvent& ev = *r.value;
      if (ev.event == "hello") {
        if (ev.connection_id != connection_id) need_catchup = true;  // events may be lost
        connection_id = ev.connection_id;
        next_seq = ev.seq + 1;
        continue;
      }
      if (ev.seq >= 0) {
        if (ev.seq != next_seq) {
          // A gap: events were lost. Start a fresh session and catch up over REST.
          log::Warning("mattermost capture: WebSocket sequence gap (expected " +
                       std::to_string(next_seq) + ", got " + std::to_string(ev.seq) +
                       "): reconnecting and catching up");
          ++hooks.metrics->mm_seq_gaps;
          ws.Close();
          connection_id.clear();
          next_seq = 0;
          connected = false;
          need_catchup = true;
          continue;
        }
        next_seq = ev.seq + 1;
      }
      Round round;
      if (ev.event == "posted" || ev.event == "post_edited" || ev.event == "post_deleted") {
        auto post = chat::ParseMmPost(ev.post_json);
        if (!post.ok()) {
          // The frame was fine, so the server will not send the change again: learn it over
          // REST at once, as after a sequence gap (before reading further events, so the
          // channel's order is kept).
          log::Warning("mattermost capture: unreadable " + ev.event +
                       " event: " + post.error.message + "; catching up over REST");
          need_catchup = true;
          continue;
        }
        ProcessPost(client, round, std::move(*post.value), ev.event == "post_deleted", false);
      } else if (ev.event == "reaction_added" || ev.event == "reaction_removed") {
        auto reaction = chat::ParseMmReaction(ev.reaction_json);
        if (!reaction.ok()) {
          log::Warning("mattermost capture: unreadable " + ev.event +
                       " event: " + reaction.error.message + "; catching up over REST");
          need_catchup = true;
          continue;
        }
        ProcessReaction(client, round, ev.channel_id, *reaction.value,
                        ev.event == "reaction_added");
      } else {
        continue;
      }
      if (!Submit(round)) need_catchup = true;
    }
  }

  // ---- replay ----------------------------------------------------------------------------------
  // The props of the post made for `e`: what the origin's post carried, through the allow-list
  // (chat::CarriedProps: checked here again, whatever the sending site did), then this site's
  // own markers and display name, which nothing carried can override.
  std::string PropsFor(const Event& e) {
    Json props = Json::object();
    for (const auto& [k, v] : e.props) {
      if (k == "mm_props") props = ParseProps(chat::CarriedProps(v));
    }
    std::string origin = e.origin_site;
    props["relay_event_id"] = e.ref.empty() || e.kind == EventKind::kPost ? e.id : e.ref;
    props["relay_origin"] = origin;
    props["from_webhook"] = "true";
    props["override_username"] =
        Replace(Replace(config.mattermost_display_name, "{author}", e.author), "{site}", origin);
    if (!config.mattermost_icon_url.empty())
      props["override_icon_url"] =
          Replace(Replace(config.mattermost_icon_url, "{author}", e.author), "{site}", origin);
    // The author and origin come from the remote event: never throw on bad UTF-8 in them.
    return props.dump(-1, ' ', false, Json::error_handler_t::replace);
  }

  // Result of applying one event: done (also for events skipped for good), or retry later.
  enum class Applied { kDone, kStopped };

  Applied Fail(const Event& e, const std::string& why) {
    ++hooks.metrics->mm_replay_failures;
    log::Error("mattermost replay: event " + e.id + " (" + EventKindName(e.kind) +
               ") in channel '" + e.channel + "' cannot be applied and is skipped: " + why);
    return Applied::kDone;
  }

  Status Put(const std::vector<std::pair<std::string, std::string>>& kv,
             const std::vector<std::string>& erase, bool sync) {
    queue::WriteBatch b(*hooks.store);
    std::int64_t expire = NowMs() + kMappingTtlMs;
    for (const auto& [k, v] : kv) b.PutDedup(k, expire, v);
    for (const auto& k : erase) b.DeleteDedup(k);
    return hooks.store->Commit(b, sync);
  }

  // Looks for a post this relay created for `event_id` (after a crash between create and
  // mapping, or a create whose answer was lost): the origin marker in props identifies it.
  std::optional<std::string> FindCreated(chat::MattermostClient& client,
                                         const std::string& mm_channel, const std::string& event_id,
                                         std::int64_t intent_ms) {
    auto list = Retry<chat::MmPostList>("GET /channels/{id}/posts?since", [&] {
      return client.GetPostsSince(mm_channel, std::max<std::int64_t>(0, intent_ms - 120000));
    });
    if (!list.ok()) return std::nullopt;
    for (const MmPost& p : list.value->posts) {
      if (!p.original_id.empty()) continue;
      Json props = ParseProps(p.props_json);
      if (props.value("relay_event_id", "") == event_id) return p.id;
    }
    return std::nullopt;
  }

  // The intent record of a create: when the first attempt was about to be sent and when the
  // latest one was ("<first> <last>", ms; records of older versions hold one number).
  struct Intent {
    std::int64_t first_ms = 0, last_ms = 0;
    std::string Encode() const { return std::to_string(first_ms) + " " + std::to_string(last_ms); }
    static Intent Decode(const std::string& s) {
      Intent in;
      std::istringstream text(s);
      text >> in.first_ms;
      if (!(text >> in.last_ms)) in.last_ms = in.first_ms;
      return in;
    }
  };

  // The create's idempotency key (see MmNewPost::pending_post_id): the same for every attempt
  // at one event in one channel, whichever relay process sends it.
  static std::string PendingPostId(const std::string& mm_channel, const std::string& event_id) {
    return "relay:" + mm_channel + ":" + event_id;
  }

  // Before a create is sent again: was an earlier attempt carried out after all (its answer
  // lost, or carried out late by a slow server)? An attempt sent less than
  // kPendingPostIdTrustMs ago is covered by the server's pending_post_id de-duplication, and
  // older ones by the look-up. When the latest attempt is older than that, the look-up alone
  // decides, so it waits until that attempt can no longer be in flight (timeout) nor hidden by
  // the read replica's lag (catchup_overlap, the lag allowed for everywhere else).
  std::optional<std::string> LookUpBeforeResend(chat::MattermostClient& client,
                                                const std::string& mm_channel,
                                                const std::string& event_id, const Intent& intent) {
    std::int64_t now = NowMs();
    if (now - intent.last_ms >= kPendingPostIdTrustMs) {
      std::int64_t settled = intent.last_ms + config.mattermost_timeout.count() +
                             config.mattermost_catchup_overlap.count();
      if (settled > now) {
        log::Info("mattermost replay: waiting " + std::to_string(settled - now) +
                  " ms before looking for event " + event_id + "'s post (an earlier create may " +
                  "still be in flight or not yet readable)");
        Sleep(std::chrono::milliseconds(settled - now));
      }
    }
    if (stop) return std::nullopt;
    return FindCreated(client, mm_channel, event_id, intent.first_ms);
  }

  Applied Mapped(const Event& e, const std::string& post_id) {
    if (Status s = Put({{EventToPostKey(e.id), post_id}, {PostToEventKey(post_id), e.id}},
                       {IntentKey(e.id)}, false);
        !s) {
      log::Error("mattermost replay: " + s.message());
      return Applied::kStopped;
    }
    return Applied::kDone;
  }

  Applied ApplyPost(chat::MattermostClient& client, const Event& e, const std::string& mm_channel) {
    if (Get(EventToPostKey(e.id))) return Applied::kDone;  // created before
    Intent intent;
    if (auto stored = Get(IntentKey(e.id))) {
      // A create was sent before a restart and its outcome never recorded.
      intent = Intent::Decode(*stored);
      auto found = LookUpBeforeResend(client, mm_channel, e.id, intent);
      if (stop) return Applied::kStopped;
      if (found) {
        log::Info("mattermost replay: event " + e.id + " was created before a restart as post " +
                  *found + "; not creating it again");
        return Mapped(e, *found);
      }
    }
    chat::MmNewPost np;
    np.channel_id = mm_channel;
    np.message = e.text;
    np.pending_post_id = PendingPostId(mm_channel, e.id);
    if (!e.thread.empty()) {
      if (auto root = Get(EventToPostKey(e.thread))) {
        np.root_id = *root;
      } else {
        log::Warning("mattermost replay: thread root " + e.thread + " of event " + e.id +
                     " is unknown here; posting it as a new thread");
      }
    }
    for (const Attachment& f : e.files) {
      std::string spool;
      if (f.is_blob()) {
        spool = SpoolInPath(config.data_dir, e.origin_site, f.blob_id);
        std::string why;
        BlobState st;
        while ((st = blob_waiter.Check(e.id, spool, f, &why)) == BlobState::kWaiting) {
          if (stop) return Applied::kStopped;
          Sleep(std::chrono::milliseconds(250));  // Notify() wakes it when chunks are stored
        }
        if (st == BlobState::kMissing) {
          ++hooks.metrics->blobs_missing;
          log::Warning("mattermost replay: attachment '" + f.name + "' of event " + e.id +
                       " is missing: " + why);
          np.message += "\n[attachment '" + f.name + "' (" + std::to_string(f.size) +
                        " bytes) is missing: " + why + "]";
          continue;
        }
      }
      auto up = Retry<chat::MmFileInfo>("POST /files", [&] {
        return f.is_blob() ? client.UploadFileFromPath(mm_channel, f.name, spool)
                           : client.UploadFile(mm_channel, f.name, f.data);
      });
      if (stop) return Applied::kStopped;
      if (up.ok() && f.is_blob()) ++hooks.metrics->blobs_delivered;
      if (!up.ok()) {
        np.message +=
            "\n[attachment '" + f.name + "' could not be uploaded: " + up.error.message + "]";
        continue;
      }
      np.file_ids.push_back(up.value->id);
    }
    np.props_json = PropsFor(e);
    // A failed create may still have created the post (the answer was lost, or a slow server
    // carries it out after the client gave up): before trying again, look for it.
    bool first_try = true;
    Status stored;
    auto created = Retry<std::string>("POST /posts", [&]() -> chat::MmResult<std::string> {
      chat::MmResult<std::string> r;
      if (!first_try) {
        if (auto found = LookUpBeforeResend(client, mm_channel, e.id, intent)) {
          log::Info("mattermost replay: event " + e.id + " was created by an earlier attempt " +
                    "as post " + *found + "; not creating it again");
          r.value = *found;
          return r;
        }
        if (stop) {
          r.error.message = "stopped";
          return r;
        }
      }
      first_try = false;
      // The intent (synced) says when this attempt was sent: after a crash, the next process
      // knows whether the server's de-duplication still covers it.
      intent.last_ms = NowMs();
      if (intent.first_ms == 0) intent.first_ms = intent.last_ms;
      if (stored = Put({{IntentKey(e.id), intent.Encode()}}, {}, true); !stored) {
        r.error.message = "storing the intent failed: " + stored.message();
        return r;  // not retryable
      }
      auto c = client.CreatePost(np);
      if (c.ok()) {
        r.value = c.value->id;
      } else {
        r.error = c.error;
      }
      return r;
    });
    if (!stored) {
      log::Error("mattermost replay: " + stored.message());
      return Applied::kStopped;
    }
    if (stop && !created.ok()) return Applied::kStopped;
    if (!created.ok()) {
      (void)Put({}, {IntentKey(e.id)}, false);
      return Fail(e, created.error.message);
    }
    return Mapped(e, *created.value);
  }

  Applied ApplyReaction(chat::MattermostClient& client, const Event& e, const std::string& local) {
    std::string emoji = e.text;
    std::string key = ReactorsKey(local, emoji);
    std::set<std::string> reactors = SplitSet(Get(key).value_or(""));
    std::string who = e.author + "@" + e.origin_site;
    bool add = e.kind == EventKind::kReactionAdd;
    if (add == (reactors.count(who) > 0)) return Applied::kDone;
    bool was_empty = reactors.empty();
    if (add) {
      reactors.insert(who);
    } else {
      reactors.erase(who);
    }
    std::string bot = BotId(client);
    if (add && was_empty) {
      auto r =
          Retry<bool>("POST /reactions", [&] { return client.AddReaction(bot, local, emoji); });
      if (!r.ok()) return stop ? Applied::kStopped : Fail(e, r.error.message);
    } else if (!add && reactors.empty()) {
      auto r =
          Retry<bool>("DELETE reaction", [&] { return client.RemoveReaction(bot, local, emoji); });
      if (!r.ok() && r.error.http_status != 404)
        return stop ? Applied::kStopped : Fail(e, r.error.message);
    }
    if (Status s = Put({{key, JoinSet(reactors)}}, {}, false); !s) return Applied::kStopped;
    return Applied::kDone;
  }

  Applied Apply(chat::MattermostClient& client, const Event& e, const config::ChannelConfig& ch) {
    if (ch.sink == config::SinkKind::kWebhook) {
      if (e.kind != EventKind::kPost) return Applied::kDone;  // webhooks cannot edit or delete
      Json body = {
          {"text", e.text},
          {"username", Replace(Replace(config.mattermost_display_name, "{author}", e.author),
                               "{site}", e.origin_site)},
          {"props", {{"relay_event_id", e.id}, {"relay_origin", e.origin_site}}}};
      if (!config.mattermost_icon_url.empty())
        body["icon_url"] = Replace(Replace(config.mattermost_icon_url, "{author}", e.author),
                                   "{site}", e.origin_site);
      auto r = Retry<bool>("POST webhook",
                           [&] { return chat::PostWebhook(ch.webhook_url, body.dump(), options); });
      if (!r.ok()) return stop ? Applied::kStopped : Fail(e, r.error.message);
      return Applied::kDone;
    }
    const std::string& mm_channel = ch.mattermost_channel_id;
    if (e.kind == EventKind::kPost) return ApplyPost(client, e, mm_channel);
    // Only the site where a message was posted changes it, and never a local user's post: the
    // inbound path refused anything else already (CheckOrigin); this guards the server too.
    if ((e.kind == EventKind::kEdit || e.kind == EventKind::kDelete) &&
        (OriginOfEventId(e.ref) != e.origin_site || e.origin_site == config.site_name))
      return Fail(e,
                  "it would change " + e.ref + ", which site '" + e.origin_site + "' did not post");
    auto local = Get(EventToPostKey(e.ref));
    if (!local) return Fail(e, "the post it applies to (" + e.ref + ") is not known here");
    switch (e.kind) {
      case EventKind::kEdit: {
        auto r = Retry<MmPost>("PUT /posts/{id}/patch",
                               [&] { return client.PatchPost(*local, e.text, PropsFor(e)); });
        if (!r.ok()) return stop ? Applied::kStopped : Fail(e, r.error.message);
        return Applied::kDone;
      }
      case EventKind::kDelete: {
        auto r = Retry<bool>("DELETE /posts/{id}", [&] { return client.DeletePost(*local); });
        if (!r.ok() && r.error.http_status != 404)
          return stop ? Applied::kStopped : Fail(e, r.error.message);
        return Applied::kDone;
      }
      case EventKind::kReactionAdd:
      case EventKind::kReactionRemove:
        return ApplyReaction(client, e, *local);
      case EventKind::kPost:
      case EventKind::kFileChunk:  // never stored for delivery (the inbound thread spools it)
        break;
    }
    return Applied::kDone;
  }

  void ReplayLoop() {
    chat::MattermostClient client(options);
    std::uint64_t cursor = hooks.store->GetCounter(kReplayedCounter, 0);
    replayed = cursor;
    while (!stop) {
      std::uint64_t head = hooks.stored_head();
      if (head <= cursor) {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait_for(lock, std::chrono::milliseconds(200), [&] { return stop.load(); });
        continue;
      }
      std::vector<std::pair<std::uint64_t, std::string>> batch;
      Status s = hooks.store->ScanInbound(cursor + 1, [&](std::uint64_t seq, std::string_view ev) {
        if (seq > head) return false;
        batch.emplace_back(seq, std::string(ev));
        return batch.size() < 256;
      });
      if (!s) {
        log::Error("mattermost replay: " + s.message());
        Sleep(std::chrono::milliseconds(1000));
        continue;
      }
      if (batch.empty()) {
        // Entries between cursor and head were removed after the JSONL delivery; none were ours.
        cursor = head;
        continue;
      }
      for (const auto& [seq, bytes] : batch) {
        auto ev = DecodeEvent(bytes);
        if (ev) {
          auto it = sinks.find(ev->channel);
          if (it != sinks.end()) {
            if (Apply(client, *ev, *it->second) == Applied::kStopped) return;
            ++hooks.metrics->mm_replayed;
            // The post is on the server (or was given up): its spooled blobs are done with.
            for (const Attachment& f : ev->files) {
              if (!f.is_blob()) continue;
              ::unlink(SpoolInPath(config.data_dir, ev->origin_site, f.blob_id).c_str());
            }
            blob_waiter.Forget(ev->id);
          }
        }
        cursor = seq;
        queue::WriteBatch b(*hooks.store);
        b.PutCounter(kReplayedCounter, cursor);
        // Not synced: replaying an event again is a no-op (mappings and reactor sets).
        if (Status c = hooks.store->Commit(b, false); !c) {
          log::Error("mattermost replay: " + c.message());
          return;
        }
        replayed = cursor;
      }
    }
  }
};

MattermostBridge::MattermostBridge(const config::Config& config, Hooks hooks)
    : impl_(std::make_unique<Impl>(config, std::move(hooks))) {}

MattermostBridge::~MattermostBridge() { Stop(); }

Status MattermostBridge::Start() {
  Impl& m = *impl_;
  for (const auto& ch : m.config.channels) {
    if (ch.sink == config::SinkKind::kMattermost) {
      m.relay_by_mm[ch.mattermost_channel_id] = ch.name;
      m.sinks[ch.name] = &ch;
      m.capture_enabled = true;
    } else if (ch.sink == config::SinkKind::kWebhook) {
      m.sinks[ch.name] = &ch;
    }
  }
  m.options.url = m.config.mattermost_url;
  while (!m.options.url.empty() && m.options.url.back() == '/') m.options.url.pop_back();
  m.options.ca_file = m.config.mattermost_ca_file;
  m.options.client_cert = m.config.mattermost_client_cert;
  m.options.client_key = m.config.mattermost_client_key;
  m.options.timeout = m.config.mattermost_timeout;
  if (m.capture_enabled) {
    auto token = chat::LoadMattermostToken(m.config.mattermost_token_file);
    if (!token) return token.status().Wrap("[mattermost] token_file");
    m.options.token = std::move(token).value();
    m.capture_thread = std::thread([&m] {
      pthread_setname_np(pthread_self(), "relay-mm-capt");
      m.CaptureLoop();
    });
  }
  m.replay_thread = std::thread([&m] {
    pthread_setname_np(pthread_self(), "relay-mm-play");
    m.ReplayLoop();
  });
  return Status::Ok();
}

void MattermostBridge::Stop() {
  if (!impl_) return;
  impl_->stop = true;
  impl_->cv.notify_all();
  if (impl_->capture_thread.joinable()) impl_->capture_thread.join();
  if (impl_->replay_thread.joinable()) impl_->replay_thread.join();
}

void MattermostBridge::Notify() { impl_->cv.notify_all(); }

std::uint64_t MattermostBridge::replayed_through() const { return impl_->replayed.load(); }

}  // namespace relay
