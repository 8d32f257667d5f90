#pragma once
// A client for the parts of the Mattermost REST API v4 and WebSocket API that relay uses
// (see ../shared/docs/mattermost-api.md). libcurl for REST, Boost.Beast for the WebSocket.
//
// Every call returns a MmResult: a value, or an MmError that says whether retrying can help
// (429 with Retry-After, 5xx, timeouts, connection failures) or not (other 4xx). Replies are
// parsed strictly: a body that is not the JSON the API documents is an error naming what is
// wrong, never a crash. The token is never logged or put in an error message.
// Thread-safety: one MattermostClient per thread.

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"
#include "crypto/secret.h"

namespace relay::chat {

// Initialises libcurl once, with an allocator that wipes what curl frees (its request buffers
// hold the Authorization header). MattermostClient and PostWebhook call it; anything else in the
// process that uses libcurl must call it before its first curl call.
void InitCurl();

// Reads the [mattermost] token_file: a regular file of at most 4 KiB, not readable or writable
// by group or others (the error names the mode and "chmod 600 FILE"), holding the token alone.
// Errors name the file, never its content.
Result<std::shared_ptr<const crypto::Secret>> LoadMattermostToken(const std::string& path);

struct MattermostOptions {
  std::string url;  // "https://chat.example" or "http://127.0.0.1:8065" (no trailing slash)
  // The bot's (or a personal) access token, from LoadMattermostToken: one locked, wiped copy
  // shared by every client and WebSocket made from these options.
  std::shared_ptr<const crypto::Secret> token;
  std::string ca_file;                  // optional CA bundle for TLS
  std::string client_cert, client_key;  // optional, for mutual TLS
  std::chrono::milliseconds timeout{10000};
};

struct MmError {
  int http_status = 0;                       // 0 when no HTTP answer (connect failure, timeout)
  bool retryable = false;                    // 429, 5xx, timeouts, connection errors
  std::chrono::milliseconds retry_after{0};  // from Retry-After on 429, else 0
  std::string id;       // Mattermost error id, e.g. "api.post.create_post.root_id.app_error"
  std::string message;  // says what failed: method, path, status, server message
};

template <typename T>
struct MmResult {
  std::optional<T> value;
  MmError error;
  bool ok() const { return value.has_value(); }
};

struct MmReaction {
  std::string user_id;
  std::string post_id;
  std::string emoji_name;
  std::int64_t create_at = 0;
};

struct MmPost {
  std::string id, channel_id, user_id, root_id, original_id, message, type;
  std::int64_t create_at = 0, update_at = 0, edit_at = 0, delete_at = 0;
  std::vector<std::string> file_ids;
  std::string props_json = "{}";      // the post's props object, as JSON text
  std::vector<MmReaction> reactions;  // from metadata.reactions when present
};

struct MmPostList {
  std::vector<std::string> order;
  std::vector<MmPost> posts;  // every post in "posts" (including roots not in order)
};

struct MmFileInfo {
  std::string id, name, mime_type;
  std::int64_t size = 0;
};

struct MmUser {
  std::string id, username, first_name, last_name, nickname;
};

struct MmNewPost {
  std::string channel_id;
  std::string message;
  std::string root_id;
  std::vector<std::string> file_ids;
  std::string props_json = "{}";
  // Idempotency key: the server answers a repeat of this id within 30 s with the post created
  // first (or a retryable 500 api.post.deduplicate_create_post.pending while that create is
  // still being saved) instead of creating a second post. Empty: no de-duplication.
  std::string pending_post_id;
};

class MattermostClient {
 public:
  explicit MattermostClient(MattermostOptions options);
  ~MattermostClient();
  MattermostClient(const MattermostClient&) = delete;
  MattermostClient& operator=(const MattermostClient&) = delete;

  // The server's clock now, from the last answer's Date header (second precision, so up to
  // 1 s behind), or 0 before any answer. Bounds of server queries use it, not this host's clock.
  std::int64_t ServerNowMs() const;

  MmResult<MmUser> GetMe();
  MmResult<MmUser> GetUser(const std::string& user_id);
  MmResult<MmPost> GetPost(const std::string& post_id);
  MmResult<MmPost> CreatePost(const MmNewPost& post);
  // PUT /posts/{id}/patch with message and the FULL props map (props replace, not merge).
  MmResult<MmPost> PatchPost(const std::string& post_id, const std::string& message,
                             const std::string& props_json);
  // DeletePost, AddReaction and RemoveReaction check the 2xx body ({"status":"OK"}, or the
  // Reaction added): any other body is a retryable "bad_reply" (a proxy answered, not the server).
  MmResult<bool> DeletePost(const std::string& post_id);
  MmResult<bool> AddReaction(const std::string& user_id, const std::string& post_id,
                             const std::string& emoji_name);
  MmResult<bool> RemoveReaction(const std::string& user_id, const std::string& post_id,
                                const std::string& emoji_name);
  // GET /channels/{id}/posts?since=ms (exclusive; at most 1000 rows).
  MmResult<MmPostList> GetPostsSince(const std::string& channel_id, std::int64_t since_ms);
  // GET /channels/{id}/posts?page=N&per_page=M: current (not deleted) posts, newest first.
  MmResult<MmPostList> GetPostsPage(const std::string& channel_id, int page, int per_page);
  // GET /channels/{id}/posts?before=post_id&per_page=N: the posts created before that one,
  // newest first (anchored: posts made or deleted meanwhile do not shift it).
  MmResult<MmPostList> GetPostsBefore(const std::string& channel_id,
                                      const std::string& before_post_id, int per_page);
  MmResult<MmFileInfo> UploadFile(const std::string& channel_id, const std::string& name,
                                  const std::string& data);
  MmResult<MmFileInfo> GetFileInfo(const std::string& file_id);
  // POST /files with the content streamed from the file at `path` (never held in memory).
  MmResult<MmFileInfo> UploadFileFromPath(const std::string& channel_id, const std::string& name,
                                          const std::string& path);
  // Downloads at most max_bytes; larger files are an error (not retryable).
  MmResult<std::string> DownloadFile(const std::string& file_id, std::size_t max_bytes);
  // Downloads at most max_bytes, handing the body to `sink` piece by piece as it arrives
  // (memory stays at curl's buffer). A sink returning false aborts with error id "sink" (not
  // retryable). A retry must start over: the caller resets what the sink wrote. Returns the
  // number of bytes received.
  MmResult<std::uint64_t> DownloadFileTo(const std::string& file_id, std::size_t max_bytes,
                                         const std::function<bool(std::string_view)>& sink);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Parses one Post object (JSON text). Exposed for tests and for WebSocket event payloads.
MmResult<MmPost> ParseMmPost(const std::string& json);
MmResult<MmReaction> ParseMmReaction(const std::string& json);
// A PostList (GET /channels/{id}/posts) and a FileInfo, as the client parses its replies.
// Exposed for tests and the fuzz target.
MmResult<MmPostList> ParseMmPostList(const std::string& json);
MmResult<MmFileInfo> ParseMmFileInfo(const std::string& json);

// One WebSocket event as received: {"event", "data", "broadcast", "seq"}.
struct MmWsEvent {
  std::string event;  // "hello", "posted", "post_edited", "post_deleted", ...
  std::int64_t seq = -1;
  std::string channel_id;     // broadcast.channel_id, or data.channel_id
  std::string connection_id;  // data.connection_id on hello
  std::string post_json;      // data.post (the JSON string, unwrapped) when present
  std::string reaction_json;  // data.reaction (unwrapped) when present
};
MmResult<MmWsEvent> ParseMmWsEvent(const std::string& json);

// A WebSocket session to /api/v4/websocket, authenticated with the token. Resumes with
// connection_id + sequence_number when given. Read() blocks for up to `wait`.
class MattermostWebSocket {
 public:
  explicit MattermostWebSocket(MattermostOptions options);
  ~MattermostWebSocket();
  MattermostWebSocket(const MattermostWebSocket&) = delete;
  MattermostWebSocket& operator=(const MattermostWebSocket&) = delete;

  // Connects (closing any previous connection). Empty connection_id: a fresh session.
  MmResult<bool> Connect(const std::string& connection_id, std::int64_t next_seq);
  // The next event, nullopt-valued result with error.http_status == 0 and retryable on
  // timeout (error.id == "timeout"); other errors mean the connection is gone.
  MmResult<MmWsEvent> Read(std::chrono::milliseconds wait);
  void Close();
  // Makes a blocked Read() return soon (from another thread).
  void Interrupt();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace relay::chat
