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
// How far before a create's first attempt (server time) the look-up for its post reads.
constexpr std::int64_t kLookBackMs = 120000;
// The server refuses a message over this many code points (model.PostMessageMaxRunesV2), on
// create and on patch: longer ones are split into consecutive posts.
constexpr std::size_t kMaxPostRunes = 16383;
std::size_t RuneCount(std::string_view s) {
  std::size_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}
// The texts of the posts `text` is carried in: itself when it fits, else parts marked
// "(1/3) ", "(2/3) ", ... each within kMaxPostRunes, cut after a line break or a space in the
// last fifth of a part when there is one (never inside a UTF-8 sequence).
std::vector<std::string> PostParts(const std::string& text) {
  if (RuneCount(text) <= kMaxPostRunes) return {text};
  // Room for "(123/123) " and a note the replay may put in front.
  constexpr std::size_t kPartRunes = kMaxPostRunes - 64;
  std::vector<std::string> pieces;
  std::size_t pos = 0;
  while (pos < text.size()) {
    std::size_t end = pos, runes = 0, soft = std::string::npos;
    while (end < text.size() && runes < kPartRunes) {
      const unsigned char c = static_cast<unsigned char>(text[end]);
      std::size_t len = c < 0x80 ? 1 : c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
      len = std::min(len, text.size() - end);
      end += len;
      ++runes;
      if ((c == '\n' || c == ' ') && runes > kPartRunes * 4 / 5) soft = end;
    }
    if (end < text.size() && soft != std::string::npos) end = soft;
    pieces.push_back(text.substr(pos, end - pos));
    pos = end;
  }
  for (std::size_t i = 0; i < pieces.size(); ++i)
    pieces[i] =
        "(" + std::to_string(i + 1) + "/" + std::to_string(pieces.size()) + ") " + pieces[i];
  return pieces;
}

std::string CursorKey(const std::string& channel) { return "mmcursor/" + channel; }
std::string StartKey(const std::string& channel) { return "mmstart/" + channel; }
constexpr std::uint64_t kUnset = ~std::uint64_t{0};
std::string StateKey(const std::string& post_id) { return "s:" + post_id; }
std::string ReactionsKey(const std::string& post_id) { return "x:" + post_id; }
std::string IntentKey(const std::string& event_id) { return "i:" + event_id; }
// Part k (2, 3, ...) of a post split in several: its key in place of the event id (mapping,
// intent, props.relay_event_id, pending_post_id).
std::string PartKey(const std::string& event_id, std::size_t k) {
  return event_id + "#" + std::to_string(k);
}
// A split post: "<the thread its parts are in>\n<the full text>" (the latest version).
std::string SplitKey(const std::string& event_id) { return "t:" + event_id; }
// How many posts of a split post may exist on the server: raised before a part is created,
// lowered once an edit's surplus parts are deleted.
std::string PartCountKey(const std::string& event_id) { return "n:" + event_id; }
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

  // Runs `call` until it succeeds, fails for good, the bridge stops, or (max_attempts > 0)
  // that many attempts failed. Counts retries.
  template <typename T, typename F>
  chat::MmResult<T> Retry(const char* what, F call, int max_attempts = 0) {
    std::chrono::milliseconds backoff(250);
    for (int attempt = 1;; ++attempt) {
      chat::MmResult<T> r = call();
      if (r.ok() || !r.error.retryable || stop) return r;
      if (max_attempts > 0 && attempt >= max_attempts) return r;
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
    bool backfill = false;  // history asked for by `relay backfill`: not filtered out
    bool live = false;      // from the WebSocket
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
  std::map<std::string, std::int64_t> starts;    // relay channel -> ChannelStart, capture thread

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
    if (!relay_made) {
      auto start =
          ChannelStart(client, post.channel_id, channel, round.live ? post.create_at : INT64_MAX);
      if (!start) {
        round.incomplete = true;  // captured by the catch-up that follows
        return;
      }
      // History (created before bridging began) stays here, with its edits and reactions.
      if (post.create_at < *start && !round.backfill && !LoadState(round, post.id).known) return;
      if (!post.type.empty()) {
        // A system post (joins, header changes, ...): a notice when the channel carries its
        // kind, else it stays here.
        const auto& kinds = sinks.at(channel)->mattermost_system_posts;
        if (std::find(kinds.begin(), kinds.end(), post.type) == kinds.end()) {
          if (!LoadState(round, post.id).known) {
            ++hooks.metrics->mm_system_posts_skipped;
            PostState st;
            st.known = true;
            st.update_at = post.update_at;
            round.states[post.id] = st;
          }
          return;
        }
        post.message = "[notice] " + post.message;
        post.file_ids.clear();
      }
    }
    // The post itself first: a reaction change of a new post must follow the post's creation
    // in the submission, or the committer cannot map it (the post is not bridged yet).
    if (!relay_made) CapturePostChange(client, round, channel, post, deleted);

    // Reactions of a post not captured (yet): they cross with it, later.
    if (reactions_known && post.delete_at == 0 && (relay_made || LoadState(round, post.id).known)) {
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
    // Only posts that crossed (history and system posts do not, nor their reactions).
    if (!Get(MattermostBridge::PostToEventKey(r.post_id))) return;
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

  // The moment bridging of `channel` began, in server time: posts created before it are the
  // channel's history and are not bridged (docs/mattermost.md, "Where bridging starts"). A
  // channel seen for the first time starts now: after its newest post and at the server's clock
  // (the Date of the answer); the start and a cursor at it are stored before anything else is
  // captured. A channel bridged before starts were kept (a cursor, no start) starts at 0.
  // `live_at`: the creation time of a post that arrived live (a WebSocket event) and so is not
  // history, when that is what makes the channel seen.
  std::optional<std::int64_t> ChannelStart(chat::MattermostClient& client,
                                           const std::string& mm_channel,
                                           const std::string& channel,
                                           std::int64_t live_at = INT64_MAX) {
    auto it = starts.find(channel);
    if (it != starts.end()) return it->second;
    const std::uint64_t stored = hooks.store->GetCounter(StartKey(channel), kUnset);
    if (stored != kUnset) return starts[channel] = static_cast<std::int64_t>(stored);
    std::int64_t start = 0;
    CaptureSubmission sub;
    if (hooks.store->GetCounter(CursorKey(channel), 0) == 0) {
      auto newest = Retry<chat::MmPostList>("GET /channels/{id}/posts?page",
                                            [&] { return client.GetPostsPage(mm_channel, 0, 1); });
      if (!newest.ok()) {
        log::Error("mattermost capture: cannot learn where channel '" + channel +
                   "' starts: " + newest.error.message);
        return std::nullopt;
      }
      start = client.ServerNowMs();
      for (const MmPost& p : newest.value->posts) {
        if (InOrder(*newest.value, p.id)) start = std::max(start, p.create_at + 1);
      }
      start = std::min(start, live_at);
      sub.counters.emplace_back(CursorKey(channel), static_cast<std::uint64_t>(start));
      log::Info("mattermost capture: channel '" + channel + "' is bridged from now on (server " +
                "time " + std::to_string(start) + "); its history crosses only with " +
                "`relay backfill`");
    }
    sub.counters.emplace_back(StartKey(channel), static_cast<std::uint64_t>(start));
    if (Status s = hooks.submit(sub); !s) {
      log::Error("mattermost capture: storing where channel '" + channel +
                 "' starts failed: " + s.message());
      return std::nullopt;
    }
    return starts[channel] = start;
  }

  static bool InOrder(const chat::MmPostList& list, const std::string& id) {
    return std::find(list.order.begin(), list.order.end(), id) != list.order.end();
  }

  // The posts a list answers with: those in `order`. `posts` also holds the roots (and, for
  // pages, other replies) of the threads in the answer, which may be older than the query.
  static std::vector<MmPost> Answered(chat::MmPostList& list) {
    std::set<std::string> ids(list.order.begin(), list.order.end());
    std::vector<MmPost> out;
    for (MmPost& p : list.posts) {
      if (ids.erase(p.id)) out.push_back(std::move(p));
    }
    return out;
  }

  static void SortByCreation(std::vector<MmPost>& posts) {
    std::stable_sort(posts.begin(), posts.end(), [](const MmPost& a, const MmPost& b) {
      const bool a_reply = !a.root_id.empty(), b_reply = !b.root_id.empty();
      return std::tie(a.create_at, a_reply, a.update_at) <
             std::tie(b.create_at, b_reply, b.update_at);
    });
  }

  // The answered post created first (`posts` is a JSON object: in no particular order).
  static const MmPost& Oldest(const std::vector<MmPost>& posts) {
    return *std::min_element(posts.begin(), posts.end(), [](const MmPost& a, const MmPost& b) {
      return a.create_at < b.create_at;
    });
  }

  // Catches up one channel over REST `since`, from its cursor minus the overlap window. Only the
  // posts in each answer's `order` are read, and the cursor moves to the newest update_at among
  // them (server time): never past a change not yet read.
  bool CatchUp(chat::MattermostClient& client, const std::string& mm_channel,
               const std::string& channel) {
    if (!ChannelStart(client, mm_channel, channel)) return false;
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
    const bool capped = list.value->order.size() >= kSinceCap;
    std::vector<MmPost> posts = Answered(*list.value);
    if (capped) {
      // The server returns at most 1000 rows for `since`, an arbitrary subset when more
      // changed. Page through the channel's current posts (newest first, by create_at) until a
      // page's oldest answered post is older than `since`, so no new post or edit of a new post
      // is missed; only edits and deletes of posts created before `since` can hide behind the
      // cap (see docs/mattermost.md).
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
        std::vector<MmPost> answered = Answered(*more.value);
        bool older = answered.empty();
        for (MmPost& p : answered) {
          if (p.create_at <= since) older = true;
          posts.push_back(std::move(p));
        }
        if (older) break;
      }
    }
    // In the order the posts were created: a root before its replies (a reply or a reaction
    // bumps the root's update_at, so update_at would put the root last; a reply may be made in
    // the same millisecond as its root, so at one create_at roots come first), and the peer
    // sees new posts in the channel's order. Versions of one post (listed twice when paging)
    // oldest first, so the reaction diff compares against the newest.
    SortByCreation(posts);
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

  // ---- backfill ----------------------------------------------------------------------------
  // `relay backfill` carries a channel's history (posts created before bridging began, from a
  // given time) as new posts, oldest first, roots before their replies. The request is stored
  // (a killed daemon resumes it); the capture thread lists the history through anchored pages,
  // then captures it a chunk at a time between WebSocket reads, so live capture goes on. Posts
  // already captured are known by their state and never captured twice.
  static std::string BackfillKey(const std::string& channel) { return "mmbackfill/" + channel; }
  static constexpr std::size_t kBackfillChunk = 200;

  struct BackfillJob {
    std::string channel, mm_channel;
    std::int64_t since = 0, start = 0;
    bool listed = false;
    std::string before;  // the oldest post listed so far: the next page's anchor
    int pages = 0;
    std::map<std::string, MmPost> found;
    std::vector<MmPost> posts;  // listed, in creation order
    std::size_t next = 0;
    std::uint64_t captured = 0;  // changes committed (posts and their reactions)
    std::uint64_t request = 0;   // the request it serves (0: resumed after a restart)
    std::uint64_t asked = 0;     // the stored request's value (since + 1)
    Clock::time_point began = Clock::now();
  };
  std::map<std::string, std::uint64_t> backfill_requests;  // latest request per channel, view_mu
  std::unique_ptr<BackfillJob> job;                        // capture thread
  std::atomic<bool> backfill_asked{true};  // look for stored requests (start, Backfill())
  std::map<std::string, MattermostBridge::BackfillProgress> backfill_view;  // under view_mu

  void PublishBackfill(const BackfillJob& j, const char* state) {
    std::lock_guard<std::mutex> lock(view_mu);
    auto& v = backfill_view[j.channel];
    v.request = j.request;
    v.state = state;
    v.since_ms = j.since;
    v.listed = j.listed ? j.posts.size() : j.found.size();
    v.done = j.next;
    v.captured = j.captured;
    v.seconds = std::chrono::duration<double>(Clock::now() - j.began).count();
  }

  Status AskBackfill(const std::string& channel, std::int64_t since_ms) {
    bool bridged = false;
    for (const auto& [mm, name] : relay_by_mm) bridged = bridged || name == channel;
    if (!bridged)
      return Status::Error("channel '" + channel +
                           "' is not a channel with sink = mattermost in this configuration");
    if (since_ms < 0) return Status::Error("the backfill's start time is before 1970");
    {
      std::lock_guard<std::mutex> lock(view_mu);  // against the running job's clear
      queue::WriteBatch b(*hooks.store);
      b.PutCounter(BackfillKey(channel), static_cast<std::uint64_t>(since_ms) + 1);
      if (Status s = hooks.store->Commit(b, true); !s) return s;
      auto& v = backfill_view[channel];
      const std::uint64_t request = backfill_requests[channel] + 1;
      v = MattermostBridge::BackfillProgress{};
      v.state = "queued";
      v.since_ms = since_ms;
      v.request = request;
      backfill_requests[channel] = request;
    }
    backfill_asked = true;
    cv.notify_all();
    return Status::Ok();
  }

  // One step of the backfill in progress (a page listed, or a chunk captured), starting a
  // stored one when none runs. True when there is more to do.
  bool StepBackfill(chat::MattermostClient& client) {
    if (!job) {
      if (!backfill_asked.exchange(false)) return false;
      for (const auto& [mm, channel] : relay_by_mm) {
        const std::uint64_t asked = hooks.store->GetCounter(BackfillKey(channel), 0);
        if (asked == 0) continue;
        auto start = ChannelStart(client, mm, channel);
        if (!start) {
          backfill_asked = true;
          return false;
        }
        job = std::make_unique<BackfillJob>();
        job->channel = channel;
        job->mm_channel = mm;
        job->since = static_cast<std::int64_t>(asked - 1);
        job->asked = asked;
        job->start = *start;
        {
          std::lock_guard<std::mutex> lock(view_mu);
          job->request = backfill_requests[channel];
        }
        log::Info("mattermost backfill: channel '" + channel + "': listing the posts created " +
                  "from " + std::to_string(job->since) + " until bridging began (" +
                  std::to_string(job->start) + ", server time)");
        PublishBackfill(*job, "listing");
        break;
      }
      if (!job) return false;
    }
    BackfillJob& j = *job;
    if (!j.listed) {
      auto page = Retry<chat::MmPostList>("GET /channels/{id}/posts?before", [&] {
        return j.before.empty() ? client.GetPostsPage(j.mm_channel, 0, kPageSize)
                                : client.GetPostsBefore(j.mm_channel, j.before, kPageSize);
      });
      if (!page.ok()) {
        log::Error("mattermost backfill: channel '" + j.channel +
                   "': listing failed, trying again: " + page.error.message);
        Sleep(std::chrono::milliseconds(1000));
        return true;
      }
      std::vector<MmPost> answered = Answered(*page.value);
      bool last = answered.empty() || ++j.pages >= kMaxPages;
      if (!answered.empty()) j.before = Oldest(answered).id;
      for (MmPost& p : answered) {
        if (p.create_at < j.since) {
          last = true;
        } else if (p.create_at < j.start && p.original_id.empty()) {
          j.found.emplace(p.id, std::move(p));
        }
      }
      if (last) {
        if (j.pages >= kMaxPages)
          log::Warning("mattermost backfill: channel '" + j.channel + "': only the newest " +
                       std::to_string(kMaxPages * kPageSize) + " posts are listed");
        for (auto& [id, p] : j.found) j.posts.push_back(std::move(p));
        j.found.clear();
        SortByCreation(j.posts);
        j.listed = true;
        log::Info("mattermost backfill: channel '" + j.channel +
                  "': " + std::to_string(j.posts.size()) + " posts to carry");
      }
      PublishBackfill(j, "listing");
      return true;
    }
    if (j.next < j.posts.size()) {
      Round round;
      round.backfill = true;
      const std::size_t end = std::min(j.next + kBackfillChunk, j.posts.size());
      for (std::size_t i = j.next; i < end; ++i) {
        ProcessPost(client, round, j.posts[i], /*deleted=*/false, /*reactions_known=*/true);
      }
      const std::size_t changes = round.sub.changes.size();
      if (!Submit(round)) return true;  // the same chunk again (what was stored is known)
      j.captured += changes;
      j.next = end;
      PublishBackfill(j, "capturing");
      return true;
    }
    // Done: the request is cleared unless a newer one replaced it meanwhile (that one runs
    // next). (A request arrives on another thread: compare and clear under view_mu, which
    // AskBackfill holds while it stores one.)
    Status s;
    {
      std::lock_guard<std::mutex> lock(view_mu);
      if (hooks.store->GetCounter(BackfillKey(j.channel), 0) == j.asked &&
          backfill_requests[j.channel] == j.request) {
        queue::WriteBatch b(*hooks.store);
        b.PutCounter(BackfillKey(j.channel), 0);
        s = hooks.store->Commit(b, true);
      }
    }
    if (!s) {
      log::Error("mattermost backfill: " + s.message());
      Sleep(std::chrono::milliseconds(1000));
      return true;
    }
    const double seconds = std::chrono::duration<double>(Clock::now() - j.began).count();
    log::Info("mattermost backfill: channel '" + j.channel + "': done, " +
              std::to_string(j.posts.size()) + " posts listed, " + std::to_string(j.captured) +
              " changes captured in " + std::to_string(static_cast<long>(seconds)) + " s");
    PublishBackfill(j, "done");
    job.reset();
    backfill_asked = true;  // another channel may be waiting
    return false;
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
          // The wait before the next attempt goes to the backfill, if one runs.
          const auto until = Clock::now() + std::min<std::chrono::milliseconds>(
                                                backoff, std::max<std::chrono::milliseconds>(
                                                             config.mattermost_poll_interval,
                                                             std::chrono::milliseconds(500)));
          while (!stop && Clock::now() < until && StepBackfill(client)) {
          }
          if (Clock::now() < until)
            Sleep(std::chrono::duration_cast<std::chrono::milliseconds>(until - Clock::now()));
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
      const bool more_backfill = StepBackfill(client);
      auto r = ws.Read(std::chrono::milliseconds(more_backfill ? 1 : 500));
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
      round.live = true;
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

  // Result of applying one event: done (also for events given up with a note or a log line),
  // stopped (the bridge stops or the store failed), or held: the channel cannot take anything
  // for now (`held_reason` says why) and the event is tried again after a backoff.
  enum class Applied { kDone, kStopped, kHeld };
  std::string held_reason;                        // replay thread
  std::chrono::milliseconds held_retry_after{0};  // a 429's Retry-After: the next try's time

  // Quick retries inside one attempt at an event; past them the channel is held (with its own,
  // longer backoff) so the other channels go on.
  static constexpr int kReplayAttempts = 3;

  // What a call's failure says: about the channel, the token or the server (every event of the
  // channel would fail alike: hold the channel until it passes), or about this one event.
  enum class Call { kCreate, kUpload, kChange, kReaction };
  static bool HoldsChannel(const MmError& e, Call call) {
    if (e.retryable) return true;  // 429, 5xx but 501, timeouts, connection errors, bad replies
    switch (e.http_status) {
      case 401:  // token revoked or expired, bot deactivated
        return true;
      case 403:  // bot removed from the channel, read-only or moderated channel, archived
        return e.id != "api.emoji.disabled.app_error" &&
               e.id != "api.file.attachments.disabled.app_error" &&
               e.id != "api.reaction.save_reaction.user_id.app_error";
      case 404:  // the channel is gone (for a post's change: the post is)
        return call == Call::kCreate || call == Call::kUpload;
      case 400:  // archived channel
        return e.id.find("can_not_post_to_deleted") != std::string::npos ||
               e.id.find("archived_channel") != std::string::npos;
      default:
        return false;
    }
  }

  // Held until `wait` has passed (0: the usual backoff).
  Applied HeldFor(const char* what, const MmError& e, std::chrono::milliseconds wait) {
    Applied a = Held(what, e);
    if (wait.count() > 0) held_retry_after = wait;
    return a;
  }

  Applied Held(const char* what, const MmError& e) {
    held_reason = std::string(what) + ": " + e.message;
    held_retry_after = e.http_status == 429 ? e.retry_after : std::chrono::milliseconds(0);
    return Applied::kHeld;
  }

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

  // The intent record of a create: when the first attempt was about to be sent and when the
  // latest one was (this host's clock, ms), and the server's clock at the first attempt
  // ("<first> <last> <server first>"; records of older versions hold one or two numbers).
  // `uncertain`: some attempt may have been carried out (it was sent and got no answer, or a
  // 5xx); false when every attempt was refused by the API itself (429, a 4xx with an error
  // id), which creates nothing: then no look-up is needed before sending again.
  struct Intent {
    std::int64_t first_ms = 0, last_ms = 0, server_first_ms = 0;
    bool uncertain = true;
    std::string Encode() const {
      return std::to_string(first_ms) + " " + std::to_string(last_ms) + " " +
             std::to_string(server_first_ms) + " " + (uncertain ? "1" : "0");
    }
    static Intent Decode(const std::string& s) {
      Intent in;
      std::istringstream text(s);
      text >> in.first_ms;
      if (!(text >> in.last_ms)) in.last_ms = in.first_ms;
      if (!(text >> in.server_first_ms)) in.server_first_ms = 0;
      int u = 1;
      if (text >> u) in.uncertain = u != 0;
      return in;
    }
  };

  // An answer that proves the create was not carried out: the API refused it.
  static bool NotCreated(const MmError& e) {
    return e.http_status == 429 ||
           (e.http_status >= 400 && e.http_status < 500 && !e.id.empty() && e.id != "sink");
  }

  // The outcome of a look-up for an earlier create's post: found, not there (`done` without a
  // post), or not known (`done` false: the server did not answer; nothing may be re-sent).
  struct LookUp {
    bool done = false;
    std::optional<std::string> post_id;
    MmError error;
    std::chrono::milliseconds wait{0};  // not done yet: look again after this long
  };

  // Looks for a post this relay created for `event_id` (after a crash between create and
  // mapping, or a create whose answer was lost): the origin marker in props identifies it. The
  // post was created after the first attempt was sent, in server time: the look-up reads the
  // channel's changes since then (less a margin for the Date header's whole seconds and the
  // time in flight), and pages back through a busy channel whose changes exceed the `since` cap.
  // Intents of older versions have no server time: this host's clock, as before.
  LookUp FindCreated(chat::MattermostClient& client, const std::string& mm_channel,
                     const std::string& event_id, const Intent& intent) {
    LookUp out;
    const std::int64_t sent = intent.server_first_ms > 0 ? intent.server_first_ms : intent.first_ms;
    const std::int64_t bound = std::max<std::int64_t>(0, sent - kLookBackMs);
    // A part of a split post that an edit deleted is no proof that a later one exists.
    const bool part = event_id.find('#') != std::string::npos;
    auto find = [&](const chat::MmPostList& list) {
      for (const MmPost& p : list.posts) {
        if (!p.original_id.empty() || (part && p.delete_at > 0)) continue;
        if (ParseProps(p.props_json).value("relay_event_id", "") == event_id) {
          out.post_id = p.id;
          return true;
        }
      }
      return false;
    };
    auto list = Retry<chat::MmPostList>(
        "GET /channels/{id}/posts?since", [&] { return client.GetPostsSince(mm_channel, bound); },
        kReplayAttempts);
    if (!list.ok()) {
      out.error = list.error;
      return out;
    }
    if (find(*list.value) || list.value->order.size() < kSinceCap) {
      out.done = true;
      return out;
    }
    for (int page = 0; page < kMaxPages; ++page) {
      if (stop) {
        out.error.message = "stopped";
        return out;
      }
      auto more = Retry<chat::MmPostList>(
          "GET /channels/{id}/posts?page",
          [&] { return client.GetPostsPage(mm_channel, page, kPageSize); }, kReplayAttempts);
      if (!more.ok()) {
        out.error = more.error;
        return out;
      }
      if (find(*more.value)) break;
      std::vector<MmPost> answered = Answered(*more.value);
      if (answered.empty() || Oldest(answered).create_at < bound) break;
    }
    out.done = true;
    return out;
  }

  // The create's idempotency key (see MmNewPost::pending_post_id): the same for every attempt
  // at one event in one channel, whichever relay process sends it.
  static std::string PendingPostId(const std::string& mm_channel, const std::string& event_id) {
    return "relay:" + mm_channel + ":" + event_id;
  }

  // Before a create is sent again: was an earlier attempt carried out after all (its answer
  // lost, or carried out late by a slow server)? The server's pending_post_id de-duplication
  // covers a repeat within 30 s only on the node that saw the first attempt (unless the
  // cluster shares that cache), so the look-up decides: it waits until the latest attempt can
  // no longer be in flight (`timeout`, when it got no answer; always after a restart) nor
  // hidden by the read replica's lag (catchup_overlap, the lag allowed for everywhere else).
  LookUp LookUpBeforeResend(chat::MattermostClient& client, const std::string& mm_channel,
                            const std::string& event_id, const Intent& intent, bool answered) {
    const std::int64_t now = NowMs();
    const std::int64_t span = config.mattermost_catchup_overlap.count() +
                              (answered ? 0 : config.mattermost_timeout.count());
    // (At most `span` from now: a clock stepped back must not park the channel for hours.)
    const std::int64_t wait = std::min(intent.last_ms + span - now, span);
    if (wait > 0) {
      // The channel is held meanwhile (the other channels go on).
      LookUp l;
      l.wait = std::chrono::milliseconds(wait);
      l.error.message = "waiting " + std::to_string(wait) + " ms before looking for event " +
                        event_id + "'s post (an earlier create may still be in flight or not " +
                        "yet readable)";
      return l;
    }
    if (stop) {
      LookUp l;
      l.error.message = "stopped";
      return l;
    }
    return FindCreated(client, mm_channel, event_id, intent);
  }

  // `key` (the event's id, or a part's) is `post_id`; the post stands for event `event_id`.
  Applied Mapped(const std::string& key, const std::string& event_id, const std::string& post_id) {
    if (Status s = Put({{EventToPostKey(key), post_id}, {PostToEventKey(post_id), event_id}},
                       {IntentKey(key)}, false);
        !s) {
      log::Error("mattermost replay: " + s.message());
      return Applied::kStopped;
    }
    return Applied::kDone;
  }

  // Sends the create of `np` for `e` (each attempt after the first looks for the post first)
  // and maps it. A refusal about the post itself (the server would refuse it again) is
  // returned in `refused`, with nothing mapped; anything else about the channel holds it.
  Applied Create(chat::MattermostClient& client, const Event& e, const std::string& key,
                 const chat::MmNewPost& np, Intent& intent, std::optional<MmError>* refused) {
    // The look-up after a lost answer is bounded by the server's clock at the first attempt:
    // learn it first when no answer has come yet (a fresh process).
    if (client.ServerNowMs() == 0) {
      auto me = client.GetMe();
      if (!me.ok() && HoldsChannel(me.error, Call::kCreate)) return Held("GET /users/me", me.error);
    }
    bool first_try = true;
    bool unknown = false;  // a look-up failed: whether an attempt was carried out is not known
    std::chrono::milliseconds settle{0};  // or is not due yet: when to look
    bool answered = false;  // the latest attempt got an HTTP answer (it is not in flight)
    Status stored;
    auto created = Retry<std::string>(
        "POST /posts",
        [&]() -> chat::MmResult<std::string> {
          chat::MmResult<std::string> r;
          if (!first_try && intent.uncertain) {
            LookUp l = LookUpBeforeResend(client, np.channel_id, key, intent, answered);
            if (l.post_id) {
              log::Info("mattermost replay: event " + key + " was created by an earlier " +
                        "attempt as post " + *l.post_id + "; not creating it again");
              r.value = *l.post_id;
              return r;
            }
            if (!l.done) {
              unknown = true;
              settle = l.wait;
              r.error = l.error;
              r.error.retryable = false;
              return r;
            }
          }
          first_try = false;
          // The intent (synced) says when this attempt was sent: after a crash, the next process
          // knows whether the server's de-duplication still covers it, and from when (server
          // time) to look for the post.
          const bool was_uncertain = intent.first_ms != 0 && intent.uncertain;
          intent.uncertain = true;  // until the answer says otherwise
          intent.last_ms = NowMs();
          if (intent.first_ms == 0) {
            intent.first_ms = intent.last_ms;
            intent.server_first_ms = client.ServerNowMs();
          }
          if (stored = Put({{IntentKey(key), intent.Encode()}}, {}, true); !stored) {
            r.error.message = "storing the intent failed: " + stored.message();
            return r;  // not retryable
          }
          auto c = client.CreatePost(np);
          if (c.ok()) {
            r.value = c.value->id;
          } else {
            r.error = c.error;
            answered = c.error.http_status != 0;
            if (NotCreated(c.error) && !was_uncertain) {
              // Not synced: a crash before it is stored only makes the next process look.
              intent.uncertain = false;
              (void)Put({{IntentKey(key), intent.Encode()}}, {}, false);
            }
          }
          return r;
        },
        kReplayAttempts);
    if (!stored) {
      log::Error("mattermost replay: " + stored.message());
      return Applied::kStopped;
    }
    // The post stands for the post event (an edit may create parts of it).
    if (created.ok()) return Mapped(key, e.kind == EventKind::kPost ? e.id : e.ref, *created.value);
    if (stop) return Applied::kStopped;
    // The intent stays: the next attempt looks for the post before sending it again.
    if (unknown) return HeldFor("looking for an earlier create", created.error, settle);
    if (HoldsChannel(created.error, Call::kCreate)) return Held("POST /posts", created.error);
    // Refused for what the post is; the look-up before this attempt found no earlier one.
    if (Status s = Put({}, {IntentKey(key)}, false); !s) {
      log::Error("mattermost replay: " + s.message());
      return Applied::kStopped;
    }
    *refused = created.error;
    return Applied::kDone;
  }

  // A create of `key` was sent before a restart (or before the channel was held) and its outcome
  // never recorded: was it carried out? kDone with `*intent` loaded when it must be sent (again),
  // or the post mapped (`*mapped`), or held.
  Applied Resume(chat::MattermostClient& client, const Event& e, const std::string& key,
                 const std::string& mm_channel, Intent* intent, bool* mapped) {
    *mapped = false;
    auto stored = Get(IntentKey(key));
    if (!stored) return Applied::kDone;
    *intent = Intent::Decode(*stored);
    if (!intent->uncertain) return Applied::kDone;  // refused every time: nothing to look for
    LookUp found = LookUpBeforeResend(client, mm_channel, key, *intent, /*answered=*/false);
    if (stop) return Applied::kStopped;
    if (!found.done) return HeldFor("looking for an earlier create", found.error, found.wait);
    if (!found.post_id) return Applied::kDone;
    log::Info("mattermost replay: event " + key + " was created before as post " + *found.post_id +
              "; not creating it again");
    *mapped = true;
    return Mapped(key, e.kind == EventKind::kPost ? e.id : e.ref, *found.post_id);
  }

  // The props of part k of `e`'s post (k >= 2): the event's, with the part's own key.
  std::string PartProps(const Event& e, const std::string& event_id, std::size_t k, std::size_t n) {
    Json props = ParseProps(PropsFor(e));
    props["relay_event_id"] = PartKey(event_id, k);
    props["relay_part"] = std::to_string(k) + "/" + std::to_string(n);
    return props.dump(-1, ' ', false, Json::error_handler_t::replace);
  }

  // Creates the parts after the first of event `event_id`'s split post (those not created yet),
  // as replies in `root`, from its stored split record. `e` is the post or the edit asking.
  Applied CreateParts(chat::MattermostClient& client, const Event& e, const std::string& event_id,
                      const std::string& mm_channel) {
    auto split = Get(SplitKey(event_id));
    if (!split) return Applied::kDone;
    const std::size_t nl = split->find('\n');
    // The post's thread, or the first part's own when it started one.
    std::string root = split->substr(0, nl);
    if (root.empty()) root = Get(EventToPostKey(event_id)).value_or("");
    const std::vector<std::string> parts =
        PostParts(nl == std::string::npos ? std::string() : split->substr(nl + 1));
    for (std::size_t k = 2; k <= parts.size(); ++k) {
      const std::string key = PartKey(event_id, k);
      if (Get(EventToPostKey(key))) continue;
      Intent intent;
      bool mapped = false;
      if (Applied a = Resume(client, e, key, mm_channel, &intent, &mapped);
          a != Applied::kDone || mapped) {
        if (a != Applied::kDone) return a;
        continue;
      }
      if (PartCount(event_id) < k) {
        if (Status st = Put({{PartCountKey(event_id), std::to_string(k)}}, {}, true); !st) {
          log::Error("mattermost replay: " + st.message());
          return Applied::kStopped;
        }
      }
      chat::MmNewPost np;
      np.channel_id = mm_channel;
      np.message = parts[k - 1];
      np.root_id = root;
      // Per creating event: a part an edit deleted may be created again by a later edit, and
      // the server would answer that with the deleted one.
      np.pending_post_id = PendingPostId(mm_channel, key + "@" + e.id);
      np.props_json = PartProps(e, event_id, k, parts.size());
      std::optional<MmError> refused;
      if (Applied a = Create(client, e, key, np, intent, &refused); a != Applied::kDone) return a;
      if (refused) (void)Fail(e, "part " + std::to_string(k) + ": " + refused->message);
    }
    return Applied::kDone;
  }

  Applied ApplyPost(chat::MattermostClient& client, const Event& e, const std::string& mm_channel) {
    // Created before (and, for a long one, the parts not yet created after a crash).
    if (Get(EventToPostKey(e.id))) return CreateParts(client, e, e.id, mm_channel);
    Intent intent;
    bool mapped = false;
    if (Applied a = Resume(client, e, e.id, mm_channel, &intent, &mapped);
        a != Applied::kDone || mapped) {
      return a != Applied::kDone ? a : CreateParts(client, e, e.id, mm_channel);
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
      auto up = Retry<chat::MmFileInfo>(
          "POST /files",
          [&] {
            return f.is_blob() ? client.UploadFileFromPath(mm_channel, f.name, spool)
                               : client.UploadFile(mm_channel, f.name, f.data);
          },
          kReplayAttempts);
      if (stop) return Applied::kStopped;
      if (!up.ok()) {
        if (HoldsChannel(up.error, Call::kUpload)) return Held("POST /files", up.error);
        np.message +=
            "\n[attachment '" + f.name + "' could not be uploaded: " + up.error.message + "]";
        continue;
      }
      if (f.is_blob()) ++hooks.metrics->blobs_delivered;
      np.file_ids.push_back(up.value->id);
    }
    np.props_json = PropsFor(e);
    // Longer than the server takes: the first part is the post, the others replies in its thread
    // (created after it, from the split record stored first).
    const std::vector<std::string> parts = PostParts(np.message);
    const bool split = parts.size() > 1;
    const std::string full = np.message;
    if (split) np.message = parts[0];
    // A refusal about the post itself never makes it vanish: a reply whose root is gone here
    // becomes a new thread, anything else a note in its place (docs/mattermost.md).
    for (int variant = 0;; ++variant) {
      std::optional<MmError> refused;
      if (split && variant < 2 && np.pending_post_id.find(":note") == std::string::npos) {
        // The thread the parts go in: the post's, or the first part's (known once created).
        if (Status st = Put({{SplitKey(e.id), np.root_id + "\n" + full}}, {}, true); !st) {
          log::Error("mattermost replay: " + st.message());
          return Applied::kStopped;
        }
      }
      Applied a = Create(client, e, e.id, np, intent, &refused);
      if (!refused) {
        if (a != Applied::kDone || !split) return a;
        return CreateParts(client, e, e.id, mm_channel);
      }
      log::Warning("mattermost replay: event " + e.id + " was refused by the server (" +
                   refused->message + ")");
      if (variant == 0 && !np.root_id.empty() && refused->id.find("root") != std::string::npos) {
        np.root_id.clear();
        np.message = "[in reply to a post that is no longer here]\n" + np.message;
        np.pending_post_id = PendingPostId(mm_channel, e.id) + ":thread";
        intent = Intent{};
        continue;
      }
      if (variant < 2 && np.pending_post_id.find(":note") == std::string::npos) {
        ++hooks.metrics->mm_replay_failures;
        np.root_id.clear();
        np.file_ids.clear();
        np.message = "[a message from " + e.author + " (" + e.origin_site +
                     ") could not be posted here: " + refused->message + "]";
        np.pending_post_id = PendingPostId(mm_channel, e.id) + ":note";
        if (split) (void)Put({}, {SplitKey(e.id)}, false);
        intent = Intent{};
        continue;
      }
      return Fail(e, refused->message);
    }
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
      auto r = Retry<bool>(
          "POST /reactions", [&] { return client.AddReaction(bot, local, emoji); },
          kReplayAttempts);
      if (!r.ok()) return Refused(e, "POST /reactions", r.error, Call::kReaction);
    } else if (!add && reactors.empty()) {
      auto r = Retry<bool>(
          "DELETE reaction", [&] { return client.RemoveReaction(bot, local, emoji); },
          kReplayAttempts);
      if (!r.ok() && r.error.http_status != 404)
        return Refused(e, "DELETE reaction", r.error, Call::kReaction);
    }
    if (Status s = Put({{key, JoinSet(reactors)}}, {}, false); !s) return Applied::kStopped;
    return Applied::kDone;
  }

  // How many posts of event `event_id`'s post may exist (1 unless it was split).
  std::size_t PartCount(const std::string& event_id) {
    auto n = Get(PartCountKey(event_id));
    std::size_t count = 1;
    if (n) {
      std::istringstream text(*n);
      if (!(text >> count) || count < 1) count = 1;
    }
    return count;
  }

  // An edit: the post's new text, split like a new post's. Parts that exist are patched, new
  // ones created in the post's thread, parts the new text no longer needs deleted. Every step
  // can be done again: after a hold or a crash the edit is applied again from the start.
  Applied ApplyEdit(chat::MattermostClient& client, const Event& e, const std::string& local,
                    const std::string& mm_channel) {
    const std::size_t before = PartCount(e.ref);
    const std::vector<std::string> parts = PostParts(e.text);
    auto first = Retry<MmPost>(
        "PUT /posts/{id}/patch", [&] { return client.PatchPost(local, parts[0], PropsFor(e)); },
        kReplayAttempts);
    if (!first.ok()) return Refused(e, "PUT /posts/{id}/patch", first.error, Call::kChange);
    if (before == 1 && parts.size() == 1) return Applied::kDone;
    // The thread the parts are in: the split record's, or (a post not split before) the
    // post's own thread as the server has it ("" for a root: its own, see CreateParts).
    auto split = Get(SplitKey(e.ref));
    const std::string root = split ? split->substr(0, split->find('\n')) : first.value->root_id;
    if (Status st = Put({{SplitKey(e.ref), root + "\n" + e.text}}, {}, true); !st) {
      log::Error("mattermost replay: " + st.message());
      return Applied::kStopped;
    }
    for (std::size_t k = 2; k <= std::min(before, parts.size()); ++k) {
      auto post = Get(EventToPostKey(PartKey(e.ref, k)));
      if (!post) continue;  // created below
      const std::string props = PartProps(e, e.ref, k, parts.size());
      auto r = Retry<MmPost>(
          "PUT /posts/{id}/patch", [&] { return client.PatchPost(*post, parts[k - 1], props); },
          kReplayAttempts);
      if (!r.ok()) return Refused(e, "PUT /posts/{id}/patch", r.error, Call::kChange);
    }
    if (parts.size() > 1) {
      if (Applied a = CreateParts(client, e, e.ref, mm_channel); a != Applied::kDone) return a;
    }
    for (std::size_t k = before; k > parts.size(); --k) {
      const std::string key = PartKey(e.ref, k);
      if (auto post = Get(EventToPostKey(key))) {
        auto r = Retry<bool>(
            "DELETE /posts/{id}", [&] { return client.DeletePost(*post); }, kReplayAttempts);
        if (!r.ok() && r.error.http_status != 404)
          return Refused(e, "DELETE /posts/{id}", r.error, Call::kChange);
        if (Status st = Put({}, {EventToPostKey(key)}, false); !st) return Applied::kStopped;
      }
    }
    if (before > parts.size()) {
      if (Status st = Put({{PartCountKey(e.ref), std::to_string(parts.size())}}, {}, false); !st)
        return Applied::kStopped;
    }
    return Applied::kDone;
  }

  // A call for `e` failed: stopped, held (about the channel), or given up for this event.
  Applied Refused(const Event& e, const char* what, const MmError& error, Call call) {
    if (stop) return Applied::kStopped;
    if (HoldsChannel(error, call)) return Held(what, error);
    return Fail(e, error.message);
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
      auto r = Retry<bool>(
          "POST webhook", [&] { return chat::PostWebhook(ch.webhook_url, body.dump(), options); },
          kReplayAttempts);
      if (!r.ok()) return Refused(e, "POST webhook", r.error, Call::kCreate);
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
      case EventKind::kEdit:
        return ApplyEdit(client, e, *local, ch.mattermost_channel_id);
      case EventKind::kDelete: {
        // Every part of a split post (replies in the post's own thread go with it anyway).
        for (std::size_t k = PartCount(e.ref); k >= 2; --k) {
          if (auto part = Get(EventToPostKey(PartKey(e.ref, k)))) {
            auto r = Retry<bool>(
                "DELETE /posts/{id}", [&] { return client.DeletePost(*part); }, kReplayAttempts);
            if (!r.ok() && r.error.http_status != 404)
              return Refused(e, "DELETE /posts/{id}", r.error, Call::kChange);
          }
        }
        auto r = Retry<bool>(
            "DELETE /posts/{id}", [&] { return client.DeletePost(*local); }, kReplayAttempts);
        if (!r.ok() && r.error.http_status != 404)
          return Refused(e, "DELETE /posts/{id}", r.error, Call::kChange);
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

  // ---- replay order and held channels ----------------------------------------------------------
  // Events are applied in inbound order per channel. A channel whose replay is held waits at
  // the event it stopped at (later events of that channel wait behind it, in order) while the
  // other channels go on; it is tried again after a backoff, and the first success releases
  // it. Persisted: the inbound sequence through which every channel is done (kReplayedCounter,
  // where a restart resumes) and, per channel, the last event applied (so the events other
  // channels applied past a held one are not applied twice).
  struct Block {
    std::uint64_t seq = 0;  // the event it stopped at
    std::string reason;
    std::int64_t since_ms = 0;
    Clock::time_point next;
    std::chrono::milliseconds backoff{1000};
    bool retrying = false;      // its events are being tried again
    std::uint64_t held_at = 0;  // the event it was last held at
  };
  static constexpr std::chrono::milliseconds kMaxHoldBackoff{30000};
  std::map<std::string, Block> blocks;           // replay thread
  std::map<std::string, std::uint64_t> applied;  // relay channel -> last event applied
  mutable std::mutex view_mu;
  std::vector<MattermostBridge::ChannelReplay> view;  // for status and metrics, under view_mu

  static std::string AppliedKey(const std::string& channel) { return "mm/replayed/" + channel; }

  void PublishView() {
    std::vector<MattermostBridge::ChannelReplay> next;
    for (const auto& [name, ch] : sinks) {
      MattermostBridge::ChannelReplay c;
      c.channel = name;
      auto it = blocks.find(name);
      if (it != blocks.end()) {
        c.blocked = true;
        c.reason = it->second.reason;
        c.since_ms = it->second.since_ms;
      }
      next.push_back(std::move(c));
    }
    std::lock_guard<std::mutex> lock(view_mu);
    view.swap(next);
  }

  // Through which inbound sequence every channel is done, `scanned` being the last event looked
  // at for the channels that are not held.
  std::uint64_t DoneThrough(std::uint64_t scanned) const {
    std::uint64_t done = scanned;
    for (const auto& [name, b] : blocks) done = std::min(done, b.seq - 1);
    return done;
  }

  bool Persist(std::uint64_t scanned, const std::string& channel, std::uint64_t seq) {
    queue::WriteBatch b(*hooks.store);
    const std::uint64_t done = DoneThrough(scanned);
    b.PutCounter(kReplayedCounter, done);
    if (!channel.empty()) b.PutCounter(AppliedKey(channel), seq);
    // Not synced: replaying an event again is a no-op (mappings, intents and reactor sets).
    if (Status c = hooks.store->Commit(b, false); !c) {
      log::Error("mattermost replay: " + c.message());
      return false;
    }
    replayed = done;
    return true;
  }

  // Applies one stored event if it is for a chat channel that is not held and not applied yet.
  // Returns the channel it applied (empty when none), or nullopt when the bridge must stop.
  std::optional<std::string> Replay(chat::MattermostClient& client, std::uint64_t seq,
                                    std::string_view bytes, const std::string* only) {
    auto ev = DecodeEvent(bytes);
    if (!ev) return std::string();
    auto it = sinks.find(ev->channel);
    if (it == sinks.end() || (only != nullptr && ev->channel != *only)) return std::string();
    if (only == nullptr && blocks.count(ev->channel)) return std::string();
    if (seq <= applied[ev->channel]) return std::string();
    Applied a = Apply(client, *ev, *it->second);
    if (a == Applied::kStopped) return std::nullopt;
    if (a == Applied::kHeld) {
      const bool fresh = blocks.count(ev->channel) == 0;  // else held again while retried
      Block& b = blocks[ev->channel];
      b.retrying = false;
      if (fresh) {
        b.since_ms = NowMs();
        ++hooks.metrics->mm_channel_holds;
      } else if (b.held_at != seq) {
        b.backoff = std::chrono::milliseconds(1000);  // it got further: start the backoff over
      } else if (held_retry_after.count() == 0) {
        b.backoff = std::min(b.backoff * 2, kMaxHoldBackoff);
      }
      b.held_at = seq;
      // A rate limit says when to come back; anything else backs off.
      const std::chrono::milliseconds wait =
          held_retry_after.count() > 0 ? held_retry_after : b.backoff;
      if (fresh || b.reason != held_reason)
        log::Warning("mattermost replay: channel '" + ev->channel + "' is held at event " + ev->id +
                     " (" + held_reason + "); its later events wait, in order; " + "retrying in " +
                     std::to_string(wait.count()) + " ms");
      b.seq = seq;
      b.reason = held_reason;
      b.next = Clock::now() + wait;
      PublishView();
      return std::string();
    }
    ++hooks.metrics->mm_replayed;
    // The post is on the server (or was given up): its spooled blobs are done with.
    for (const Attachment& f : ev->files) {
      if (!f.is_blob()) continue;
      ::unlink(SpoolInPath(config.data_dir, ev->origin_site, f.blob_id).c_str());
    }
    blob_waiter.Forget(ev->id);
    applied[ev->channel] = seq;
    return ev->channel;
  }

  // Replays stored events from `from` through `to` (inclusive), of `only` when set, committing
  // the cursors after each. False when the bridge must stop. Without `only`, `*scanned` is the
  // last sequence read.
  // `*complete` says whether every event through `to` was read (not cut short by a stop or a
  // store error, nor by `only` being held again).
  bool ReplayRange(chat::MattermostClient& client, std::uint64_t from, std::uint64_t to,
                   const std::string* only, std::uint64_t* scanned, bool* complete) {
    *complete = false;
    std::vector<std::pair<std::uint64_t, std::string>> batch;
    while (from <= to) {
      if (stop) return true;
      batch.clear();
      Status s = hooks.store->ScanInbound(from, [&](std::uint64_t seq, std::string_view ev) {
        if (seq > to) return false;
        batch.emplace_back(seq, std::string(ev));
        return batch.size() < 256;
      });
      if (!s) {
        log::Error("mattermost replay: " + s.message());
        Sleep(std::chrono::milliseconds(1000));
        return true;
      }
      if (batch.empty()) {
        // Entries up to `to` were removed after the JSONL delivery; none were ours.
        if (only == nullptr) {
          *scanned = to;
          if (!Persist(*scanned, "", 0)) return false;
        }
        *complete = true;
        return true;
      }
      for (const auto& [seq, bytes] : batch) {
        auto channel = Replay(client, seq, bytes, only);
        if (!channel) return false;
        if (only == nullptr) *scanned = seq;
        if (only != nullptr) {
          Block& b = blocks.at(*only);
          if (!b.retrying) return true;  // held again
          // Done through here: the cursor (and so the store's clean-up) may pass this event.
          b.seq = seq + 1;
        }
        if (!Persist(*scanned, *channel, seq)) return false;
      }
      from = batch.back().first + 1;
    }
    *complete = true;
    return true;
  }

  void ReplayLoop() {
    chat::MattermostClient client(options);
    std::uint64_t scanned = hooks.store->GetCounter(kReplayedCounter, 0);
    for (const auto& [name, ch] : sinks)
      applied[name] = hooks.store->GetCounter(AppliedKey(name), 0);
    replayed = scanned;
    PublishView();
    while (!stop) {
      // Held channels whose backoff is over: their events from where they stopped.
      for (auto it = blocks.begin(); it != blocks.end() && !stop;) {
        const std::string name = it->first;
        if (Clock::now() < it->second.next) {
          ++it;
          continue;
        }
        const std::int64_t since = it->second.since_ms;
        it->second.retrying = true;
        std::uint64_t unused = scanned;
        bool complete = false;
        if (!ReplayRange(client, it->second.seq, scanned, &name, &unused, &complete)) return;
        it = blocks.find(name);
        if (it != blocks.end() && it->second.retrying && complete && !stop) {
          // Every event through `scanned` is applied: released.
          log::Info("mattermost replay: channel '" + name + "' is released after " +
                    std::to_string((NowMs() - since) / 1000) + " s held");
          it = blocks.erase(it);
          PublishView();
          if (!Persist(scanned, "", 0)) return;
        } else if (it != blocks.end()) {
          ++it;
        }
      }
      std::uint64_t head = hooks.stored_head();
      if (head <= scanned) {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait_for(lock, std::chrono::milliseconds(200), [&] { return stop.load(); });
        continue;
      }
      bool complete = false;
      if (!ReplayRange(client, scanned + 1, head, nullptr, &scanned, &complete)) return;
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

std::vector<MattermostBridge::ChannelReplay> MattermostBridge::Channels() const {
  std::lock_guard<std::mutex> lock(impl_->view_mu);
  std::vector<ChannelReplay> out = impl_->view;
  for (ChannelReplay& c : out) {
    auto it = impl_->backfill_view.find(c.channel);
    if (it != impl_->backfill_view.end()) c.backfill = it->second;
  }
  return out;
}

Status MattermostBridge::Backfill(const std::string& channel, std::int64_t since_ms) {
  return impl_->AskBackfill(channel, since_ms);
}

std::string MattermostBridge::MetricsText() const {
  std::string out =
      "# HELP relay_mattermost_channel_blocked 1 while the channel's replay is held by an error "
      "about the channel, the token or the server (relay status says why).\n"
      "# TYPE relay_mattermost_channel_blocked gauge\n";
  for (const ChannelReplay& c : Channels()) {
    out += "relay_mattermost_channel_blocked{channel=\"" + c.channel + "\"} " +
           (c.blocked ? "1" : "0") + "\n";
  }
  return out;
}

}  // namespace relay
