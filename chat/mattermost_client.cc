// MattermostClient (libcurl) and MattermostWebSocket (Boost.Beast) — see mattermost_client.h and
// ../shared/docs/mattermost-api.md.
//
// Error ids made up by the client itself (never sent by a server), so that callers can switch
// on MmError::id without parsing messages:
//   "timeout"    REST: the request exceeded options.timeout; WebSocket: nothing arrived within
//                `wait` (or Interrupt() was called) — the socket is still usable.
//   "connect"    REST/WebSocket: no HTTP answer (DNS, refused, reset, TLS handshake, ...).
//   "tls_config" a CA bundle or client certificate/key could not be loaded, or the server's
//                certificate was rejected: retrying does not help until the config changes.
//   "bad_url"    options.url is not an http(s):// URL.
//   "bad_reply"  a 2xx reply whose body is not the JSON the API documents (retryable: a proxy
//                in between may have answered).
//   "too_large"  DownloadFile: the file is larger than max_bytes; a reply over the client's
//                JSON size limit.
//   "file"       UploadFileFromPath: the file to send cannot be read.
//   "sink"       DownloadFileTo: the caller's sink refused a piece (e.g. its disk is full).
//   "closed"     WebSocket: the server closed the connection (close frame).
//   "error"      WebSocket: the connection broke, or sent a message that is not an event.

#include "chat/mattermost_client.h"

#include <curl/curl.h>
#include <malloc.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include <algorithm>
#include <atomic>
#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <boost/beast/websocket.hpp>
#include <boost/beast/websocket/ssl.hpp>
#include <cctype>
#include <charconv>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string_view>
#include <utility>

namespace relay::chat {
namespace {

using Json = nlohmann::json;

// Replies larger than this are refused (a PostList of 1000 long posts is a few MiB).
constexpr std::size_t kMaxJsonReply = 128u << 20;
// Error bodies are only quoted in messages: keep the first bytes.
constexpr std::size_t kMaxErrorBody = 16u << 10;
// How much of a non-JSON error body an error message quotes.
constexpr std::size_t kQuotedBodyChars = 200;
constexpr std::chrono::milliseconds kDefaultRetryAfter{1000};
// A Retry-After beyond this is clamped: a broken proxy must not park the bridge for days.
constexpr std::chrono::seconds kMaxRetryAfter{3600};
constexpr char kUserAgent[] = "relay-mattermost/0.1";

// ---------------------------------------------------------------------------------------------
// Small helpers

template <typename T>
MmResult<T> Fail(MmError error) {
  MmResult<T> r;
  r.error = std::move(error);
  return r;
}

template <typename T>
MmResult<T> Ok(T value) {
  MmResult<T> r;
  r.value = std::move(value);
  return r;
}

MmError MakeError(int http_status, bool retryable, std::string id, std::string message) {
  MmError e;
  e.http_status = http_status;
  e.retryable = retryable;
  e.id = std::move(id);
  e.message = std::move(message);
  return e;
}

// Percent-encodes everything but RFC 3986 unreserved characters: safe for one path segment or
// one query value.
std::string Escape(std::string_view s) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(s.size());
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out.push_back(static_cast<char>(c));
    } else {
      out.push_back('%');
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 15]);
    }
  }
  return out;
}

// Quotes untrusted text for an error message: bounded, control characters escaped.
std::string Quote(std::string_view s, std::size_t max_chars = kQuotedBodyChars) {
  std::string out = "\"";
  for (std::size_t i = 0; i < s.size() && i < max_chars; ++i) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20 || c == 0x7f) {
      static constexpr char kHex[] = "0123456789abcdef";
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    } else {
      out += static_cast<char>(c);
    }
  }
  if (s.size() > max_chars) out += "...";
  out += '"';
  return out;
}

const char* TypeName(const Json& j) { return j.type_name(); }

// ---------------------------------------------------------------------------------------------
// Strict field readers. A missing or null field yields the default; a field of another type is
// an error naming it. `what` says which object is read ("post", "reaction", ...).

class FieldReader {
 public:
  FieldReader(const Json& object, std::string what) : object_(object), what_(std::move(what)) {}

  const std::string& error() const { return error_; }
  bool ok() const { return error_.empty(); }

  const Json* Find(const char* name) const {
    auto it = object_.find(name);
    if (it == object_.end() || it->is_null()) return nullptr;
    return &*it;
  }

  void String(const char* name, std::string* out) {
    const Json* v = Find(name);
    if (v == nullptr) return;
    if (!v->is_string()) return TypeError(name, *v, "a string");
    *out = v->get_ref<const std::string&>();
  }

  void Int(const char* name, std::int64_t* out) {
    const Json* v = Find(name);
    if (v == nullptr) return;
    if (v->is_number_integer()) {
      if (v->is_number_unsigned() &&
          v->get<std::uint64_t>() >
              static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
        return SetError("field \"" + std::string(name) + "\" is out of range: " + v->dump());
      }
      *out = v->get<std::int64_t>();
      return;
    }
    TypeError(name, *v, "an integer");
  }

  void StringArray(const char* name, std::vector<std::string>* out) {
    const Json* v = Find(name);
    if (v == nullptr) return;
    if (!v->is_array()) return TypeError(name, *v, "an array of strings");
    out->clear();
    for (const Json& item : *v) {
      if (!item.is_string()) {
        return SetError("field \"" + std::string(name) + "\" holds a " + TypeName(item) +
                        ", expected strings only");
      }
      out->push_back(item.get<std::string>());
    }
  }

  // A required non-empty string (an object without it cannot be referred to).
  void RequiredString(const char* name, std::string* out) {
    const Json* v = Find(name);
    if (v == nullptr) return SetError("field \"" + std::string(name) + "\" is missing");
    String(name, out);
    if (ok() && out->empty()) SetError("field \"" + std::string(name) + "\" is empty");
  }

  void SetError(std::string message) {
    if (error_.empty()) error_ = what_ + ": " + message;
  }

 private:
  void TypeError(const char* name, const Json& v, const char* expected) {
    SetError("field \"" + std::string(name) + "\" is " + TypeName(v) + ", expected " + expected);
  }

  const Json& object_;
  std::string what_;
  std::string error_;
};

// Parses `text` as JSON; an error message when it is not JSON or not an object.
std::optional<Json> ParseObject(std::string_view text, const std::string& what,
                                std::string* error) {
  Json j = Json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    *error = what + " is not valid JSON: " + Quote(text);
    return std::nullopt;
  }
  if (!j.is_object()) {
    *error = what + " is a JSON " + TypeName(j) + ", expected an object: " + Quote(text);
    return std::nullopt;
  }
  return j;
}

// Parsing errors of 2xx replies and WebSocket messages are all "bad_reply" errors; the caller
// decorates the message with the request.
MmError ParseError(std::string message) {
  return MmError{0, true, std::chrono::milliseconds{0}, "bad_reply", std::move(message)};
}

MmResult<MmReaction> ReactionFromJson(const Json& j) {
  if (!j.is_object()) {
    return Fail<MmReaction>(
        ParseError(std::string("reaction is a JSON ") + TypeName(j) + ", expected an object"));
  }
  MmReaction r;
  FieldReader f(j, "reaction");
  f.RequiredString("user_id", &r.user_id);
  f.RequiredString("post_id", &r.post_id);
  f.RequiredString("emoji_name", &r.emoji_name);
  f.Int("create_at", &r.create_at);
  if (!f.ok()) return Fail<MmReaction>(ParseError(f.error()));
  return Ok(std::move(r));
}

MmResult<MmPost> PostFromJson(const Json& j) {
  if (!j.is_object()) {
    return Fail<MmPost>(
        ParseError(std::string("post is a JSON ") + TypeName(j) + ", expected an object"));
  }
  MmPost p;
  FieldReader f(j, "post");
  f.RequiredString("id", &p.id);
  f.String("channel_id", &p.channel_id);
  f.String("user_id", &p.user_id);
  f.String("root_id", &p.root_id);
  f.String("original_id", &p.original_id);
  f.String("message", &p.message);
  f.String("type", &p.type);
  f.Int("create_at", &p.create_at);
  f.Int("update_at", &p.update_at);
  f.Int("edit_at", &p.edit_at);
  f.Int("delete_at", &p.delete_at);
  f.StringArray("file_ids", &p.file_ids);
  if (const Json* props = f.Find("props")) {
    if (props->is_object()) {
      p.props_json = props->dump();
    } else {
      f.SetError(std::string("field \"props\" is ") + TypeName(*props) + ", expected an object");
    }
  }
  if (const Json* metadata = f.Find("metadata")) {
    if (!metadata->is_object()) {
      f.SetError(std::string("field \"metadata\" is ") + TypeName(*metadata) +
                 ", expected an object");
    } else {
      auto reactions = metadata->find("reactions");
      if (reactions != metadata->end() && !reactions->is_null()) {
        if (!reactions->is_array()) {
          f.SetError(std::string("field \"metadata.reactions\" is ") + TypeName(*reactions) +
                     ", expected an array");
        } else {
          for (const Json& item : *reactions) {
            MmResult<MmReaction> r = ReactionFromJson(item);
            if (!r.ok()) {
              f.SetError("metadata.reactions: " + r.error.message);
              break;
            }
            p.reactions.push_back(std::move(*r.value));
          }
        }
      }
    }
  }
  if (!f.ok()) return Fail<MmPost>(ParseError(f.error()));
  return Ok(std::move(p));
}

MmResult<MmPostList> PostListFromJson(const Json& j) {
  MmPostList list;
  FieldReader f(j, "post list");
  f.StringArray("order", &list.order);
  const Json* posts = f.Find("posts");
  if (posts != nullptr && !posts->is_object()) {
    f.SetError(std::string("field \"posts\" is ") + TypeName(*posts) + ", expected an object");
  }
  if (!f.ok()) return Fail<MmPostList>(ParseError(f.error()));
  if (posts == nullptr) return Ok(std::move(list));
  // Posts in `order` first (in that order), then the others (roots of returned replies).
  std::vector<std::string> keys = list.order;
  for (const auto& [key, value] : posts->items()) {
    if (std::find(list.order.begin(), list.order.end(), key) == list.order.end()) {
      keys.push_back(key);
    }
  }
  for (const std::string& key : keys) {
    auto it = posts->find(key);
    if (it == posts->end()) continue;  // in order but not in posts: nothing to return
    MmResult<MmPost> p = PostFromJson(*it);
    if (!p.ok()) {
      return Fail<MmPostList>(
          ParseError("post list: posts[" + Quote(key) + "]: " + p.error.message));
    }
    list.posts.push_back(std::move(*p.value));
  }
  return Ok(std::move(list));
}

MmResult<MmUser> UserFromJson(const Json& j) {
  MmUser u;
  FieldReader f(j, "user");
  f.RequiredString("id", &u.id);
  f.String("username", &u.username);
  f.String("first_name", &u.first_name);
  f.String("last_name", &u.last_name);
  f.String("nickname", &u.nickname);
  if (!f.ok()) return Fail<MmUser>(ParseError(f.error()));
  return Ok(std::move(u));
}

MmResult<MmFileInfo> FileInfoFromJson(const Json& j) {
  if (!j.is_object()) {
    return Fail<MmFileInfo>(
        ParseError(std::string("file info is a JSON ") + TypeName(j) + ", expected an object"));
  }
  MmFileInfo info;
  FieldReader f(j, "file info");
  f.RequiredString("id", &info.id);
  f.String("name", &info.name);
  f.String("mime_type", &info.mime_type);
  f.Int("size", &info.size);
  if (!f.ok()) return Fail<MmFileInfo>(ParseError(f.error()));
  return Ok(std::move(info));
}

// Reads data.post / data.reaction: documented as a JSON string holding the object; an object
// sent inline is accepted too (re-serialised).
bool UnwrapEmbedded(const Json& data, const char* name, std::string* out, FieldReader* f) {
  const Json* v = nullptr;
  auto it = data.find(name);
  if (it != data.end() && !it->is_null()) v = &*it;
  if (v == nullptr) return true;
  if (v->is_string()) {
    *out = v->get<std::string>();
  } else if (v->is_object()) {
    *out = v->dump();
  } else {
    f->SetError(std::string("field \"data.") + name + "\" is " + TypeName(*v) +
                ", expected a JSON string");
    return false;
  }
  return true;
}

// Turns a parser's exception (should not happen: we check types first) into an error.
template <typename T, typename F>
MmResult<T> Guarded(const char* what, F&& f) {
  try {
    return f();
  } catch (const std::exception& e) {
    return Fail<T>(ParseError(std::string(what) + ": " + e.what()));
  }
}

// ---------------------------------------------------------------------------------------------
// Error bodies (4xx/5xx): {"id","message","detailed_error","request_id","status_code"}, or plain
// text (429 "limit exceeded", proxies).

void DescribeErrorBody(const std::string& body, MmError* e) {
  Json j = Json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (!j.is_discarded() && j.is_object()) {
    auto str = [&](const char* key) -> std::string {
      auto it = j.find(key);
      return it != j.end() && it->is_string() ? it->get<std::string>() : std::string();
    };
    e->id = str("id");
    std::string message = str("message");
    std::string detail = str("detailed_error");
    if (!message.empty()) e->message += ": " + Quote(message);
    if (!detail.empty()) e->message += " (" + Quote(detail) + ")";
    if (!e->id.empty()) e->message += " [" + e->id + "]";
    if (!message.empty() || !e->id.empty()) return;
  }
  if (!body.empty()) e->message += ": " + Quote(body);
}

MmError HttpStatusError(const std::string& what, long status, const std::string& body,
                        const std::string& retry_after_header) {
  MmError e;
  e.http_status = static_cast<int>(status);
  e.message = what + ": HTTP " + std::to_string(status);
  if (status == 429) {
    e.retryable = true;
    e.retry_after = kDefaultRetryAfter;
    // Retry-After is delta-seconds here; an HTTP date or garbage falls back to the default.
    std::string_view v = retry_after_header;
    while (!v.empty() && (v.front() == ' ' || v.front() == '\t')) v.remove_prefix(1);
    while (!v.empty() && std::isspace(static_cast<unsigned char>(v.back()))) v.remove_suffix(1);
    std::int64_t seconds = 0;
    auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), seconds);
    if (ec == std::errc() && end == v.data() + v.size() && !v.empty() && seconds >= 0) {
      e.retry_after = std::chrono::seconds(std::min<std::int64_t>(seconds, kMaxRetryAfter.count()));
    }
  } else if (status >= 500 && status != 501) {
    // 501 Not Implemented (e.g. custom emoji on older servers) answers the same every time.
    e.retryable = true;
  }
  DescribeErrorBody(body, &e);
  return e;
}

// ---------------------------------------------------------------------------------------------
// libcurl glue

// libcurl's memory, wiped when freed: its request buffers hold the Authorization header, and
// left as they are they would keep copies of the token in freed heap memory (measured: 3 to 9 in
// a daemon that had bridged for a few seconds). Requests to the chat server are few, so the cost
// of zeroing what curl frees does not matter.
void WipingFree(void* p) {
  if (p == nullptr) return;
  crypto::Wipe(p, ::malloc_usable_size(p));
  std::free(p);
}
void* WipingMalloc(size_t size) { return std::malloc(size); }
void* WipingCalloc(size_t n, size_t size) { return std::calloc(n, size); }
char* WipingStrdup(const char* s) { return ::strdup(s); }
// realloc would free the old block unwiped when it moves it: move by hand instead.
void* WipingRealloc(void* p, size_t size) {
  if (p == nullptr) return std::malloc(size);
  const size_t old = ::malloc_usable_size(p);
  if (size <= old) return p;  // a smaller request fits where it is
  void* q = std::malloc(size);
  if (q == nullptr) return nullptr;
  std::memcpy(q, p, old);
  WipingFree(p);
  return q;
}

}  // namespace

void InitCurl() {
  static std::once_flag once;
  std::call_once(once, [] {
    curl_global_init_mem(CURL_GLOBAL_DEFAULT, WipingMalloc, WipingFree, WipingRealloc, WipingStrdup,
                         WipingCalloc);
  });
}

namespace {

void GlobalCurlInit() { InitCurl(); }

// curl_easy_setopt is variadic: pass exactly long, pointers or curl_off_t (see its manual), so
// every call goes through one of these typed helpers.
CURLcode SetLong(CURL* h, CURLoption option, long value) {
  return curl_easy_setopt(h, option, value);
}
CURLcode SetOffset(CURL* h, CURLoption option, curl_off_t value) {
  return curl_easy_setopt(h, option, value);
}
CURLcode SetPointer(CURL* h, CURLoption option, const void* value) {
  return curl_easy_setopt(h, option, value);
}
CURLcode SetString(CURL* h, CURLoption option, const std::string& value) {
  return curl_easy_setopt(h, option, value.c_str());
}
using CurlWriteFn = size_t (*)(char*, size_t, size_t, void*);
CURLcode SetCallback(CURL* h, CURLoption option, CurlWriteFn fn) {
  return curl_easy_setopt(h, option, fn);
}

// Header lists may hold the Authorization header: their copies are wiped before they are freed.
struct CurlSlistDeleter {
  void operator()(curl_slist* l) const {
    for (curl_slist* node = l; node != nullptr; node = node->next) {
      if (node->data != nullptr) crypto::Wipe(node->data, std::strlen(node->data));
    }
    curl_slist_free_all(l);
  }
};
using CurlSlist = std::unique_ptr<curl_slist, CurlSlistDeleter>;

struct CurlMimeDeleter {
  void operator()(curl_mime* m) const { curl_mime_free(m); }
};
using CurlMime = std::unique_ptr<curl_mime, CurlMimeDeleter>;

// What the write/header callbacks collect for one request.
struct Transfer {
  CURL* handle = nullptr;
  std::string body;
  std::string retry_after;
  std::string date;  // the Date header: the server's clock
  std::size_t max_success_body = kMaxJsonReply;
  bool too_large = false;
  // When set, a 2xx body goes here piece by piece instead of into `body`.
  const std::function<bool(std::string_view)>* sink = nullptr;
  std::size_t sunk = 0;
  bool sink_failed = false;
};

size_t OnBody(char* data, size_t size, size_t count, void* user) {
  auto* t = static_cast<Transfer*>(user);
  std::size_t n = size * count;
  long status = 0;
  curl_easy_getinfo(t->handle, CURLINFO_RESPONSE_CODE, &status);
  if (status >= 200 && status < 300) {
    const std::size_t have = t->sink != nullptr ? t->sunk : t->body.size();
    if (have + n > t->max_success_body) {
      t->too_large = true;
      return 0;  // aborts the transfer with CURLE_WRITE_ERROR
    }
    if (t->sink != nullptr) {
      t->sunk += n;
      if (!(*t->sink)(std::string_view(data, n))) {
        t->sink_failed = true;
        return 0;
      }
      return n;
    }
    t->body.append(data, n);
  } else if (t->body.size() < kMaxErrorBody) {
    // Error bodies are only quoted: keep the start, drain the rest so the connection survives.
    t->body.append(data, std::min(n, kMaxErrorBody - t->body.size()));
  }
  return n;
}

size_t OnHeader(char* data, size_t size, size_t count, void* user) {
  auto* t = static_cast<Transfer*>(user);
  std::size_t n = size * count;
  std::string_view line(data, n);
  if (line.substr(0, 5) == "HTTP/") {
    t->retry_after.clear();  // a new response (after 100 Continue): forget earlier headers
    t->date.clear();
    return n;
  }
  const auto named = [&line](std::string_view name) {
    if (line.size() < name.size()) return false;
    for (std::size_t i = 0; i < name.size(); ++i) {
      if (std::tolower(static_cast<unsigned char>(line[i])) != name[i]) return false;
    }
    return true;
  };
  if (named("retry-after:")) t->retry_after = std::string(line.substr(12));
  if (named("date:")) t->date = std::string(line.substr(5));
  return n;
}

bool IsTlsConfigError(CURLcode code) {
  switch (code) {
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CRL_BADFILE:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
    case CURLE_SSL_CLIENTCERT:
      return true;
    default:
      return false;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Public parsers

MmResult<MmPost> ParseMmPost(const std::string& json) {
  return Guarded<MmPost>("post", [&]() -> MmResult<MmPost> {
    std::string error;
    std::optional<Json> j = ParseObject(json, "post", &error);
    if (!j) return Fail<MmPost>(ParseError(error));
    return PostFromJson(*j);
  });
}

MmResult<MmReaction> ParseMmReaction(const std::string& json) {
  return Guarded<MmReaction>("reaction", [&]() -> MmResult<MmReaction> {
    std::string error;
    std::optional<Json> j = ParseObject(json, "reaction", &error);
    if (!j) return Fail<MmReaction>(ParseError(error));
    return ReactionFromJson(*j);
  });
}

MmResult<MmPostList> ParseMmPostList(const std::string& json) {
  return Guarded<MmPostList>("post list", [&]() -> MmResult<MmPostList> {
    std::string error;
    std::optional<Json> j = ParseObject(json, "post list", &error);
    if (!j) return Fail<MmPostList>(ParseError(error));
    return PostListFromJson(*j);
  });
}

MmResult<MmFileInfo> ParseMmFileInfo(const std::string& json) {
  return Guarded<MmFileInfo>("file info", [&]() -> MmResult<MmFileInfo> {
    std::string error;
    std::optional<Json> j = ParseObject(json, "file info", &error);
    if (!j) return Fail<MmFileInfo>(ParseError(error));
    return FileInfoFromJson(*j);
  });
}

MmResult<MmWsEvent> ParseMmWsEvent(const std::string& json) {
  return Guarded<MmWsEvent>("websocket event", [&]() -> MmResult<MmWsEvent> {
    std::string error;
    std::optional<Json> j = ParseObject(json, "websocket event", &error);
    if (!j) return Fail<MmWsEvent>(ParseError(error));
    MmWsEvent ev;
    FieldReader f(*j, "websocket event");
    f.String("event", &ev.event);
    f.Int("seq", &ev.seq);
    // A reply to a client action ({"status":"OK","seq_reply":N}) has no "event"; anything else
    // without one is not a Mattermost event.
    if (f.ok() && ev.event.empty() && f.Find("seq_reply") == nullptr) {
      f.SetError("field \"event\" is missing");
    }
    const Json* broadcast = f.Find("broadcast");
    if (broadcast != nullptr) {
      if (!broadcast->is_object()) {
        f.SetError(std::string("field \"broadcast\" is ") + TypeName(*broadcast) +
                   ", expected an object");
      } else {
        FieldReader b(*broadcast, "websocket event: broadcast");
        b.String("channel_id", &ev.channel_id);
        if (!b.ok()) f.SetError(b.error());
      }
    }
    const Json* data = f.Find("data");
    if (data != nullptr) {
      if (!data->is_object()) {
        f.SetError(std::string("field \"data\" is ") + TypeName(*data) + ", expected an object");
      } else {
        FieldReader d(*data, "websocket event: data");
        if (ev.channel_id.empty()) d.String("channel_id", &ev.channel_id);
        d.String("connection_id", &ev.connection_id);
        if (!d.ok()) f.SetError(d.error());
        UnwrapEmbedded(*data, "post", &ev.post_json, &f);
        UnwrapEmbedded(*data, "reaction", &ev.reaction_json, &f);
      }
    }
    if (!f.ok()) return Fail<MmWsEvent>(ParseError(f.error()));
    return Ok(std::move(ev));
  });
}

// ---------------------------------------------------------------------------------------------
// MattermostClient

struct MattermostClient::Impl {
  explicit Impl(MattermostOptions o) : options(std::move(o)) {
    while (!options.url.empty() && options.url.back() == '/') options.url.pop_back();
    GlobalCurlInit();
    handle = curl_easy_init();
  }
  ~Impl() {
    if (handle != nullptr) curl_easy_cleanup(handle);
  }

  struct Request {
    const char* method = "GET";
    std::string path;  // starting with /api/v4/, already escaped
    std::optional<std::string> json_body;
    // Multipart upload (POST /files): parts are built on the handle.
    const std::string* upload_channel = nullptr;
    const std::string* upload_name = nullptr;
    const std::string* upload_data = nullptr;
    const std::string* upload_path = nullptr;  // instead of upload_data: streamed from a file
    // When set, a 2xx body is handed to it in pieces (memory stays O(curl's buffer)).
    const std::function<bool(std::string_view)>* body_sink = nullptr;
    std::size_t max_body = kMaxJsonReply;
    const char* max_body_what = "reply";
    // On a new connection: libcurl silently sends a request again when a reused connection dies
    // before any answer, and a create sent twice is two posts on a cluster whose nodes do not
    // share the pending_post_id cache. Only the caller, after looking, may send it again.
    bool fresh_connection = false;
  };

  struct Response {
    long status = 0;
    std::string body;
  };

  // The server's clock as of the last answer's Date header (whole seconds), and when that was
  // here: server time is what the server's own queries compare.
  std::int64_t server_date_ms = 0;
  std::chrono::steady_clock::time_point server_date_at;

  void NoteServerTime(const std::string& date) {
    std::string_view v = date;
    while (!v.empty() && (v.front() == ' ' || v.front() == '\t')) v.remove_prefix(1);
    while (!v.empty() && std::isspace(static_cast<unsigned char>(v.back()))) v.remove_suffix(1);
    if (v.empty()) return;
    const time_t t = curl_getdate(std::string(v).c_str(), nullptr);
    if (t <= 0) return;
    server_date_ms = static_cast<std::int64_t>(t) * 1000;
    server_date_at = std::chrono::steady_clock::now();
  }

  // Performs one request. A value only for 2xx statuses; everything else is classified.
  MmResult<Response> Perform(const Request& req) {
    const std::string what = std::string(req.method) + " " + req.path;
    if (handle == nullptr) {
      return Fail<Response>(MakeError(0, false, "connect", what + ": curl_easy_init failed"));
    }
    // reset() keeps live connections, DNS and TLS session caches: connections are reused.
    curl_easy_reset(handle);
    Transfer t;
    t.handle = handle;
    t.max_success_body = req.max_body;
    t.sink = req.body_sink;
    char error_buffer[CURL_ERROR_SIZE] = {0};

    std::string url = options.url + req.path;
    CurlSlist headers;
    auto add_header = [&headers](const std::string& h) {
      curl_slist* l = curl_slist_append(headers.get(), h.c_str());
      if (l != nullptr) {
        static_cast<void>(headers.release());
        headers.reset(l);
      }
    };
    {
      // Built in place and wiped once curl has its copy (the list, wiped when freed).
      static constexpr std::string_view kPrefix = "Authorization: Bearer ";
      const std::string_view token = options.token ? options.token->view() : std::string_view();
      std::string header;
      header.reserve(kPrefix.size() + token.size());
      header.append(kPrefix).append(token);
      add_header(header);
      crypto::Wipe(&header);
    }
    add_header("Accept: application/json");
    add_header("Expect:");  // no 100-continue round trip for uploads
    if (req.json_body) add_header("Content-Type: application/json");

    SetString(handle, CURLOPT_URL, url);
    SetPointer(handle, CURLOPT_ERRORBUFFER, error_buffer);
    SetLong(handle, CURLOPT_NOSIGNAL, 1L);
    SetString(handle, CURLOPT_PROTOCOLS_STR, "http,https");
    SetLong(handle, CURLOPT_FOLLOWLOCATION, 0L);
    SetLong(handle, CURLOPT_TIMEOUT_MS, static_cast<long>(options.timeout.count()));
    SetLong(handle, CURLOPT_CONNECTTIMEOUT_MS, static_cast<long>(options.timeout.count()));
    SetLong(handle, CURLOPT_TCP_KEEPALIVE, 1L);
    if (req.fresh_connection) SetLong(handle, CURLOPT_FRESH_CONNECT, 1L);
    SetLong(handle, CURLOPT_SSL_VERIFYPEER, 1L);
    SetLong(handle, CURLOPT_SSL_VERIFYHOST, 2L);
    if (!options.ca_file.empty()) SetString(handle, CURLOPT_CAINFO, options.ca_file);
    if (!options.client_cert.empty()) SetString(handle, CURLOPT_SSLCERT, options.client_cert);
    if (!options.client_key.empty()) SetString(handle, CURLOPT_SSLKEY, options.client_key);
    SetString(handle, CURLOPT_USERAGENT, kUserAgent);
    SetCallback(handle, CURLOPT_WRITEFUNCTION, &OnBody);
    SetPointer(handle, CURLOPT_WRITEDATA, &t);
    SetCallback(handle, CURLOPT_HEADERFUNCTION, &OnHeader);
    SetPointer(handle, CURLOPT_HEADERDATA, &t);

    CurlMime mime;
    const std::string method = req.method;
    if (req.upload_data != nullptr || req.upload_path != nullptr) {
      mime.reset(curl_mime_init(handle));
      // Mattermost needs channel_id before the files (it streams the parts in order).
      curl_mimepart* part = curl_mime_addpart(mime.get());
      curl_mime_name(part, "channel_id");
      curl_mime_data(part, req.upload_channel->data(), req.upload_channel->size());
      part = curl_mime_addpart(mime.get());
      curl_mime_name(part, "files");
      if (req.upload_path != nullptr) {
        // Read by curl while sending: the file is never held in memory.
        if (curl_mime_filedata(part, req.upload_path->c_str()) != CURLE_OK) {
          return Fail<Response>(
              MakeError(0, false, "file", what + ": cannot read " + Quote(*req.upload_path)));
        }
      } else {
        curl_mime_data(part, req.upload_data->data(), req.upload_data->size());
      }
      curl_mime_filename(part, req.upload_name->c_str());
      curl_mime_type(part, "application/octet-stream");
      SetPointer(handle, CURLOPT_MIMEPOST, mime.get());
    } else if (req.json_body) {
      SetOffset(handle, CURLOPT_POSTFIELDSIZE_LARGE,
                static_cast<curl_off_t>(req.json_body->size()));
      SetPointer(handle, CURLOPT_POSTFIELDS, req.json_body->data());
      if (method != "POST") SetString(handle, CURLOPT_CUSTOMREQUEST, method);
    } else if (method == "DELETE" || method == "PUT") {
      SetString(handle, CURLOPT_CUSTOMREQUEST, method);
    }
    SetPointer(handle, CURLOPT_HTTPHEADER, headers.get());

    CURLcode code = curl_easy_perform(handle);
    long status = 0;
    curl_easy_getinfo(handle, CURLINFO_RESPONSE_CODE, &status);
    // Leave no dangling pointers to this frame on the handle.
    SetPointer(handle, CURLOPT_HTTPHEADER, nullptr);
    SetPointer(handle, CURLOPT_ERRORBUFFER, nullptr);
    if (mime) SetPointer(handle, CURLOPT_MIMEPOST, nullptr);

    if (code != CURLE_OK) {
      if (t.sink_failed) {
        return Fail<Response>(
            MakeError(static_cast<int>(status), false, "sink", what + ": storing the body failed"));
      }
      if (t.too_large) {
        return Fail<Response>(MakeError(static_cast<int>(status), false, "too_large",
                                        what + ": " + req.max_body_what + " is larger than " +
                                            std::to_string(req.max_body) + " bytes"));
      }
      std::string detail = error_buffer[0] != '\0' ? error_buffer : curl_easy_strerror(code);
      if (code == CURLE_OPERATION_TIMEDOUT) {
        return Fail<Response>(MakeError(0, true, "timeout",
                                        what + ": no answer within " +
                                            std::to_string(options.timeout.count()) +
                                            " ms: " + detail));
      }
      if (IsTlsConfigError(code)) {
        return Fail<Response>(MakeError(0, false, "tls_config", what + ": TLS: " + detail));
      }
      if (code == CURLE_URL_MALFORMAT || code == CURLE_UNSUPPORTED_PROTOCOL) {
        return Fail<Response>(MakeError(
            0, false, "bad_url", what + ": bad server URL " + Quote(options.url) + ": " + detail));
      }
      return Fail<Response>(MakeError(0, true, "connect", what + ": " + detail));
    }
    NoteServerTime(t.date);
    if (status < 200 || status >= 300) {
      return Fail<Response>(HttpStatusError(what, status, t.body, t.retry_after));
    }
    return Ok(Response{status, std::move(t.body)});
  }

  // Performs a request and parses its 2xx JSON body with `parse`.
  template <typename T, typename Parse>
  MmResult<T> Call(const Request& req, Parse&& parse) {
    MmResult<Response> r = Perform(req);
    if (!r.ok()) return Fail<T>(std::move(r.error));
    const std::string what = std::string(req.method) + " " + req.path;
    MmResult<T> parsed = Guarded<T>("reply", [&]() -> MmResult<T> {
      Json j = Json::parse(r.value->body, nullptr, /*allow_exceptions=*/false);
      if (j.is_discarded()) {
        return Fail<T>(ParseError("body is not valid JSON: " + Quote(r.value->body)));
      }
      return parse(j);
    });
    if (!parsed.ok()) {
      parsed.error.http_status = static_cast<int>(r.value->status);
      parsed.error.message =
          what + ": HTTP " + std::to_string(r.value->status) + " reply: " + parsed.error.message;
    }
    return parsed;
  }

  // For calls whose 2xx reply is the status object {"status":"OK"} (deletes, reaction
  // removal). Any other 2xx body (a proxy's page, an empty body) is a retryable bad_reply: the
  // request may never have reached the server.
  MmResult<bool> CallStatusOk(const Request& req) {
    return Call<bool>(req, [](const Json& j) -> MmResult<bool> {
      if (!j.is_object()) {
        return Fail<bool>(ParseError(std::string("status reply is a JSON ") + TypeName(j) +
                                     ", expected {\"status\":\"OK\"}"));
      }
      auto status = j.find("status");
      if (status == j.end() || !status->is_string() || status->get<std::string>() != "OK") {
        return Fail<bool>(
            ParseError("reply is not {\"status\":\"OK\"}: " +
                       Quote(j.dump(-1, ' ', false, Json::error_handler_t::replace))));
      }
      return Ok(true);
    });
  }

  MattermostOptions options;
  CURL* handle = nullptr;
};

MattermostClient::MattermostClient(MattermostOptions options)
    : impl_(std::make_unique<Impl>(std::move(options))) {}
MattermostClient::~MattermostClient() = default;

namespace {
MmResult<MmPost> ParsePostReply(const Json& j) { return PostFromJson(j); }
MmResult<MmUser> ParseUserReply(const Json& j) {
  if (!j.is_object()) {
    return Fail<MmUser>(
        ParseError(std::string("user is a JSON ") + TypeName(j) + ", expected an object"));
  }
  return UserFromJson(j);
}
}  // namespace

std::int64_t MattermostClient::ServerNowMs() const {
  if (impl_->server_date_ms == 0) return 0;
  return impl_->server_date_ms + std::chrono::duration_cast<std::chrono::milliseconds>(
                                     std::chrono::steady_clock::now() - impl_->server_date_at)
                                     .count();
}

MmResult<MmUser> MattermostClient::GetMe() {
  Impl::Request req;
  req.path = "/api/v4/users/me";
  return impl_->Call<MmUser>(req, ParseUserReply);
}

MmResult<MmUser> MattermostClient::GetUser(const std::string& user_id) {
  Impl::Request req;
  req.path = "/api/v4/users/" + Escape(user_id);
  return impl_->Call<MmUser>(req, ParseUserReply);
}

MmResult<MmPost> MattermostClient::GetPost(const std::string& post_id) {
  Impl::Request req;
  req.path = "/api/v4/posts/" + Escape(post_id);
  return impl_->Call<MmPost>(req, ParsePostReply);
}

namespace {
// Parses caller-supplied props text into an object (an empty string means no props).
std::optional<Json> PropsObject(const std::string& props_json, std::string* error) {
  if (props_json.empty()) return Json::object();
  Json j = Json::parse(props_json, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    *error = "props_json is not a JSON object: " + Quote(props_json);
    return std::nullopt;
  }
  return j;
}

MmError InvalidArgument(const std::string& what, const std::string& message) {
  return MakeError(0, false, "invalid_argument", what + ": " + message);
}

// nlohmann throws on invalid UTF-8 when dumping strings; replace it instead.
std::string Dump(const Json& j) { return j.dump(-1, ' ', false, Json::error_handler_t::replace); }
}  // namespace

MmResult<MmPost> MattermostClient::CreatePost(const MmNewPost& post) {
  Impl::Request req;
  req.method = "POST";
  req.path = "/api/v4/posts";
  req.fresh_connection = true;
  std::string error;
  std::optional<Json> props = PropsObject(post.props_json, &error);
  if (!props) return Fail<MmPost>(InvalidArgument("POST /api/v4/posts", error));
  Json body = {{"channel_id", post.channel_id}, {"message", post.message}};
  if (!post.root_id.empty()) body["root_id"] = post.root_id;
  if (!post.file_ids.empty()) body["file_ids"] = post.file_ids;
  if (!props->empty()) body["props"] = std::move(*props);
  if (!post.pending_post_id.empty()) body["pending_post_id"] = post.pending_post_id;
  req.json_body = Dump(body);
  return impl_->Call<MmPost>(req, ParsePostReply);
}

MmResult<MmPost> MattermostClient::PatchPost(const std::string& post_id, const std::string& message,
                                             const std::string& props_json) {
  Impl::Request req;
  req.method = "PUT";
  req.path = "/api/v4/posts/" + Escape(post_id) + "/patch";
  std::string error;
  std::optional<Json> props = PropsObject(props_json, &error);
  if (!props) return Fail<MmPost>(InvalidArgument("PUT " + req.path, error));
  // props replace the whole map on the server: always send it, even when empty.
  Json body = {{"message", message}, {"props", std::move(*props)}};
  req.json_body = Dump(body);
  return impl_->Call<MmPost>(req, ParsePostReply);
}

MmResult<bool> MattermostClient::DeletePost(const std::string& post_id) {
  Impl::Request req;
  req.method = "DELETE";
  req.path = "/api/v4/posts/" + Escape(post_id);
  return impl_->CallStatusOk(req);
}

MmResult<bool> MattermostClient::AddReaction(const std::string& user_id, const std::string& post_id,
                                             const std::string& emoji_name) {
  Impl::Request req;
  req.method = "POST";
  req.path = "/api/v4/reactions";
  Json body = {{"user_id", user_id}, {"post_id", post_id}, {"emoji_name", emoji_name}};
  req.json_body = Dump(body);
  // The server answers 200 (the OpenAPI file says 201) with the Reaction: any 2xx status is
  // fine, but the body must be the reaction asked for (not a proxy's page).
  return impl_->Call<bool>(req, [&](const Json& j) -> MmResult<bool> {
    MmResult<MmReaction> r = ReactionFromJson(j);
    if (!r.ok()) return Fail<bool>(std::move(r.error));
    if (r.value->post_id != post_id || r.value->emoji_name != emoji_name) {
      return Fail<bool>(ParseError("reply is the reaction " + Quote(r.value->emoji_name) +
                                   " on post " + Quote(r.value->post_id) + ", not " +
                                   Quote(emoji_name) + " on " + Quote(post_id)));
    }
    return Ok(true);
  });
}

MmResult<bool> MattermostClient::RemoveReaction(const std::string& user_id,
                                                const std::string& post_id,
                                                const std::string& emoji_name) {
  Impl::Request req;
  req.method = "DELETE";
  req.path = "/api/v4/users/" + Escape(user_id) + "/posts/" + Escape(post_id) + "/reactions/" +
             Escape(emoji_name);
  return impl_->CallStatusOk(req);
}

namespace {

// The reply of POST /files: {"file_infos": [FileInfo, ...], ...}.
MmResult<MmFileInfo> UploadReplyFromJson(const Json& j) {
  if (!j.is_object()) {
    return Fail<MmFileInfo>(
        ParseError(std::string("upload reply is a JSON ") + TypeName(j) + ", expected an object"));
  }
  auto infos = j.find("file_infos");
  if (infos == j.end() || !infos->is_array() || infos->empty()) {
    return Fail<MmFileInfo>(ParseError("upload reply has no \"file_infos\" entry"));
  }
  return FileInfoFromJson(infos->front());
}

MmResult<MmPostList> PostListReplyFromJson(const Json& j) {
  if (!j.is_object()) {
    return Fail<MmPostList>(
        ParseError(std::string("post list is a JSON ") + TypeName(j) + ", expected an object"));
  }
  return PostListFromJson(j);
}

}  // namespace

MmResult<MmPostList> MattermostClient::GetPostsSince(const std::string& channel_id,
                                                     std::int64_t since_ms) {
  Impl::Request req;
  // since=0 is not a catch-up query for the server (it answers the first page instead), and
  // since is exclusive: since=1 asks for everything.
  req.path = "/api/v4/channels/" + Escape(channel_id) +
             "/posts?since=" + std::to_string(std::max<std::int64_t>(since_ms, 1));
  return impl_->Call<MmPostList>(req, PostListReplyFromJson);
}

MmResult<MmPostList> MattermostClient::GetPostsPage(const std::string& channel_id, int page,
                                                    int per_page) {
  Impl::Request req;
  req.path = "/api/v4/channels/" + Escape(channel_id) + "/posts?page=" + std::to_string(page) +
             "&per_page=" + std::to_string(per_page);
  return impl_->Call<MmPostList>(req, PostListReplyFromJson);
}

MmResult<MmPostList> MattermostClient::GetPostsBefore(const std::string& channel_id,
                                                      const std::string& before_post_id,
                                                      int per_page) {
  Impl::Request req;
  req.path = "/api/v4/channels/" + Escape(channel_id) + "/posts?before=" + Escape(before_post_id) +
             "&per_page=" + std::to_string(per_page);
  return impl_->Call<MmPostList>(req, PostListReplyFromJson);
}

MmResult<MmFileInfo> MattermostClient::UploadFile(const std::string& channel_id,
                                                  const std::string& name,
                                                  const std::string& data) {
  Impl::Request req;
  req.method = "POST";
  req.path = "/api/v4/files";
  req.upload_channel = &channel_id;
  req.upload_name = &name;
  req.upload_data = &data;
  return impl_->Call<MmFileInfo>(req, UploadReplyFromJson);
}

MmResult<MmFileInfo> MattermostClient::UploadFileFromPath(const std::string& channel_id,
                                                          const std::string& name,
                                                          const std::string& path) {
  Impl::Request req;
  req.method = "POST";
  req.path = "/api/v4/files";
  req.upload_channel = &channel_id;
  req.upload_name = &name;
  req.upload_path = &path;
  return impl_->Call<MmFileInfo>(req, UploadReplyFromJson);
}

MmResult<MmFileInfo> MattermostClient::GetFileInfo(const std::string& file_id) {
  Impl::Request req;
  req.path = "/api/v4/files/" + Escape(file_id) + "/info";
  return impl_->Call<MmFileInfo>(req, FileInfoFromJson);
}

MmResult<std::string> MattermostClient::DownloadFile(const std::string& file_id,
                                                     std::size_t max_bytes) {
  Impl::Request req;
  req.path = "/api/v4/files/" + Escape(file_id);
  req.max_body = max_bytes;
  req.max_body_what = "file";
  MmResult<Impl::Response> r = impl_->Perform(req);
  if (!r.ok()) return Fail<std::string>(std::move(r.error));
  return Ok(std::move(r.value->body));
}

MmResult<std::uint64_t> MattermostClient::DownloadFileTo(
    const std::string& file_id, std::size_t max_bytes,
    const std::function<bool(std::string_view)>& sink) {
  Impl::Request req;
  req.path = "/api/v4/files/" + Escape(file_id);
  req.max_body = max_bytes;
  req.max_body_what = "file";
  std::uint64_t total = 0;
  std::function<bool(std::string_view)> counting = [&](std::string_view piece) {
    total += piece.size();
    return sink(piece);
  };
  req.body_sink = &counting;
  MmResult<Impl::Response> r = impl_->Perform(req);
  if (!r.ok()) return Fail<std::uint64_t>(std::move(r.error));
  return Ok(total);
}

// ---------------------------------------------------------------------------------------------
// MattermostWebSocket
//
// One io_context, run only by the thread calling Connect/Read/Close, for at most the caller's
// deadline. Every asynchronous operation's handler owns (shared_ptr) what the operation touches:
// the Connection and a small OpState. So an operation can be abandoned at a deadline (its socket
// closed, or a DNS lookup left to finish in asio's resolver thread) without waiting for it; its
// handler runs later, harmlessly, on a stale OpState. A pending async_read survives a Read()
// timeout: the next Read() keeps waiting for the same read, so a timeout never disturbs the
// WebSocket (Beast's own timeouts would close the stream).

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace websocket = beast::websocket;
namespace http = beast::http;
namespace ssl = asio::ssl;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;

using PlainWs = websocket::stream<beast::tcp_stream>;
using TlsWs = websocket::stream<beast::ssl_stream<beast::tcp_stream>>;

struct Connection {
  std::shared_ptr<ssl::context> tls_context;  // outlives the stream that uses it
  std::optional<PlainWs> plain;
  std::optional<TlsWs> tls;
  beast::flat_buffer buffer;

  template <typename F>
  decltype(auto) Visit(F&& f) {
    if (plain) return f(*plain);
    return f(*tls);
  }
  void CloseSocket() {
    Visit([](auto& ws) { beast::get_lowest_layer(ws).close(); });
  }
};

struct OpState {
  bool done = false;
  beast::error_code ec;
};

// Whether a TLS handshake failed over a certificate (ours or the server's): retrying does not
// help until the configuration changes.
bool IsCertificateRejection(const beast::error_code& ec) {
  if (ec.category() != asio::error::get_ssl_category()) return false;
  switch (ERR_GET_REASON(static_cast<unsigned long>(ec.value()))) {
    case SSL_R_CERTIFICATE_VERIFY_FAILED:
    case SSL_R_SSLV3_ALERT_BAD_CERTIFICATE:
    case SSL_R_TLSV1_ALERT_UNKNOWN_CA:
    case SSL_R_TLSV13_ALERT_CERTIFICATE_REQUIRED:
      return true;
    default:
      return false;
  }
}

struct WsUrl {
  bool tls = false;
  std::string host;         // for DNS and certificate checks (no brackets)
  std::string port;         // numeric or service name
  std::string host_header;  // Host: value
  std::string base_path;    // "" or "/prefix" (Mattermost under a subpath)
};

std::optional<WsUrl> ParseWsUrl(const std::string& url, std::string* error) {
  WsUrl out;
  std::string_view rest = url;
  auto take_scheme = [&rest](std::string_view s) {
    if (rest.size() < s.size()) return false;
    for (std::size_t i = 0; i < s.size(); ++i) {
      if (std::tolower(static_cast<unsigned char>(rest[i])) != s[i]) return false;
    }
    rest.remove_prefix(s.size());
    return true;
  };
  if (take_scheme("https://") || take_scheme("wss://")) {
    out.tls = true;
  } else if (take_scheme("http://") || take_scheme("ws://")) {
    out.tls = false;
  } else {
    *error = "the server URL " + Quote(url) + " does not start with http:// or https://";
    return std::nullopt;
  }
  std::size_t slash = rest.find('/');
  std::string_view authority = rest.substr(0, slash);
  std::string_view path = slash == std::string_view::npos ? "" : rest.substr(slash);
  while (!path.empty() && path.back() == '/') path.remove_suffix(1);
  out.base_path = std::string(path);
  if (authority.find('@') != std::string_view::npos || authority.empty()) {
    *error = "the server URL " + Quote(url) + " has no host (or has user info)";
    return std::nullopt;
  }
  std::string_view host = authority;
  std::string_view port;
  if (authority.front() == '[') {
    std::size_t close = authority.find(']');
    if (close == std::string_view::npos) {
      *error = "the server URL " + Quote(url) + " has an unterminated IPv6 address";
      return std::nullopt;
    }
    host = authority.substr(1, close - 1);
    std::string_view after = authority.substr(close + 1);
    if (!after.empty()) {
      if (after.front() != ':') {
        *error = "the server URL " + Quote(url) + " has junk after the IPv6 address";
        return std::nullopt;
      }
      port = after.substr(1);
    }
  } else if (std::size_t colon = authority.rfind(':'); colon != std::string_view::npos) {
    host = authority.substr(0, colon);
    port = authority.substr(colon + 1);
  }
  if (host.empty()) {
    *error = "the server URL " + Quote(url) + " has no host";
    return std::nullopt;
  }
  out.host = std::string(host);
  out.port = port.empty() ? (out.tls ? "443" : "80") : std::string(port);
  out.host_header = std::string(authority);
  return out;
}

}  // namespace

struct MattermostWebSocket::Impl {
  explicit Impl(MattermostOptions o) : options(std::move(o)) {}
  ~Impl() { Teardown(); }

  enum class Outcome { kDone, kTimedOut, kInterrupted };

  // Runs the io_context until op->done, the deadline, or Interrupt().
  Outcome RunUntil(const std::shared_ptr<OpState>& op, Clock::time_point deadline) {
    ioc.restart();
    while (!op->done) {
      // Checked after restart(): an Interrupt() whose stop() came before restart() is not lost.
      if (interrupted.exchange(false)) return Outcome::kInterrupted;
      if (Clock::now() >= deadline) {
        ioc.poll();  // what is ready counts even when `wait` is 0
        return op->done ? Outcome::kDone : Outcome::kTimedOut;
      }
      if (ioc.run_one_until(deadline) == 0 && ioc.stopped()) ioc.restart();
    }
    return Outcome::kDone;
  }

  // Closes the current connection's socket (pending operations complete with
  // operation_aborted whenever the io_context runs next) and forgets it.
  void Teardown() {
    if (conn) conn->CloseSocket();
    conn.reset();
    read.reset();
    ioc.restart();
    ioc.poll();  // run the aborted handlers now rather than during the next connection
  }

  MmError WsError(const char* id, bool retryable, const std::string& message) const {
    return MakeError(0, retryable, id, "websocket " + Quote(options.url) + ": " + message);
  }

  MmResult<bool> Connect(const std::string& connection_id, std::int64_t next_seq) {
    Teardown();
    std::string error;
    std::optional<WsUrl> url = ParseWsUrl(options.url, &error);
    if (!url) return Fail<bool>(MakeError(0, false, "bad_url", "websocket: " + error));
    std::string target = url->base_path + "/api/v4/websocket";
    if (!connection_id.empty()) {
      target += "?connection_id=" + Escape(connection_id) +
                "&sequence_number=" + std::to_string(next_seq);
    }
    try {
      return ConnectTo(*url, target);
    } catch (const std::exception& e) {
      // Asio setup calls that throw (e.g. loading a certificate file).
      Teardown();
      return Fail<bool>(WsError("connect", true, std::string("setup failed: ") + e.what()));
    }
  }

  MmResult<bool> ConnectTo(const WsUrl& url, const std::string& target) {
    const Clock::time_point deadline = Clock::now() + options.timeout;
    auto c = std::make_shared<Connection>();
    if (url.tls) {
      auto ctx = std::make_shared<ssl::context>(ssl::context::tls_client);
      beast::error_code ec;
      ctx->set_verify_mode(ssl::verify_peer, ec);
      if (!options.ca_file.empty()) {
        ctx->load_verify_file(options.ca_file, ec);
        if (ec) {
          return Fail<bool>(
              WsError("tls_config", false,
                      "cannot load CA file " + Quote(options.ca_file) + ": " + ec.message()));
        }
      } else {
        ctx->set_default_verify_paths(ec);
      }
      if (!options.client_cert.empty()) {
        ctx->use_certificate_chain_file(options.client_cert, ec);
        if (ec) {
          return Fail<bool>(WsError("tls_config", false,
                                    "cannot load client certificate " + Quote(options.client_cert) +
                                        ": " + ec.message()));
        }
      }
      if (!options.client_key.empty()) {
        ctx->use_private_key_file(options.client_key, ssl::context::pem, ec);
        if (ec) {
          return Fail<bool>(
              WsError("tls_config", false,
                      "cannot load client key " + Quote(options.client_key) + ": " + ec.message()));
        }
      }
      c->tls_context = ctx;
      c->tls.emplace(ioc, *ctx);
      c->tls->next_layer().set_verify_mode(ssl::verify_peer);
      c->tls->next_layer().set_verify_callback(ssl::host_name_verification(url.host));
      // SNI (the SSL_set_tlsext_host_name macro, without its C cast).
      SSL_ctrl(c->tls->next_layer().native_handle(), SSL_CTRL_SET_TLSEXT_HOSTNAME,
               TLSEXT_NAMETYPE_host_name, const_cast<char*>(url.host.c_str()));
    } else {
      c->plain.emplace(ioc);
    }
    conn = c;

    // 1. DNS.
    auto resolver = std::make_shared<tcp::resolver>(ioc);
    auto results = std::make_shared<tcp::resolver::results_type>();
    auto op = std::make_shared<OpState>();
    resolver->async_resolve(
        url.host, url.port,
        [op, results, resolver](beast::error_code ec, tcp::resolver::results_type r) {
          op->done = true;
          op->ec = ec;
          *results = std::move(r);
        });
    if (auto failed = Await(
            op, deadline, [resolver] { resolver->cancel(); }, "resolving " + url.host)) {
      return Fail<bool>(*failed);
    }

    // 2. TCP.
    op = std::make_shared<OpState>();
    c->Visit([&](auto& ws) {
      beast::get_lowest_layer(ws).async_connect(
          *results, [op, c](beast::error_code ec, const tcp::endpoint&) {
            op->done = true;
            op->ec = ec;
          });
    });
    if (auto failed = Await(
            op, deadline, [c] { c->CloseSocket(); },
            "connecting to " + url.host + ":" + url.port)) {
      return Fail<bool>(*failed);
    }

    // 3. TLS.
    if (c->tls) {
      op = std::make_shared<OpState>();
      c->tls->next_layer().async_handshake(ssl::stream_base::client, [op, c](beast::error_code ec) {
        op->done = true;
        op->ec = ec;
      });
      if (auto failed = Await(
              op, deadline, [c] { c->CloseSocket(); }, "TLS handshake")) {
        // A rejected certificate is a configuration problem, not a network one.
        if (failed->id == "connect" && IsCertificateRejection(op->ec)) {
          failed->id = "tls_config";
          failed->retryable = false;
        }
        return Fail<bool>(*failed);
      }
    }

    // 4. WebSocket upgrade, authenticated by header.
    auto response = std::make_shared<websocket::response_type>();
    op = std::make_shared<OpState>();
    // The decorator builds the header value from the shared token when the request is made and
    // wipes its own copy (Beast's request, freed after the handshake, keeps the last one).
    // `token` must not be const: Beast moves the decorator without destroying the moved-from
    // one, and a const capture would be copied by that move (one reference leaked per move).
    std::shared_ptr<const crypto::Secret> token = options.token;
    c->Visit([&](auto& ws) {
      websocket::stream_base::timeout timeouts{};
      timeouts.handshake_timeout = options.timeout;
      timeouts.idle_timeout = websocket::stream_base::none();
      timeouts.keep_alive_pings = false;
      ws.set_option(timeouts);
      ws.set_option(websocket::stream_base::decorator([token](websocket::request_type& r) {
        static constexpr std::string_view kPrefix = "Bearer ";
        const std::string_view secret = token ? token->view() : std::string_view();
        std::string value;
        value.reserve(kPrefix.size() + secret.size());
        value.append(kPrefix).append(secret);
        r.set(http::field::authorization, value);
        crypto::Wipe(&value);
        r.set(http::field::user_agent, kUserAgent);
      }));
      // From now on only the WebSocket's own (handshake/close) timeouts apply.
      beast::get_lowest_layer(ws).expires_never();
      ws.async_handshake(*response, url.host_header, target,
                         [op, c, response](beast::error_code ec) {
                           op->done = true;
                           op->ec = ec;
                         });
    });
    if (auto failed = Await(
            op, deadline, [c] { c->CloseSocket(); }, "upgrading " + target)) {
      unsigned status = response->result_int();
      if (op->ec == websocket::error::upgrade_declined && status != 101) {
        // The server answered the upgrade with an HTTP error: classify it like REST.
        MmError e = HttpStatusError("websocket GET " + target, status, response->body(),
                                    std::string(response->base()[http::field::retry_after]));
        Teardown();
        return Fail<bool>(std::move(e));
      }
      return Fail<bool>(*failed);
    }
    return Ok(true);
  }

  // Waits for an operation of Connect; on failure tears the connection down and returns why.
  template <typename Abort>
  std::optional<MmError> Await(const std::shared_ptr<OpState>& op, Clock::time_point deadline,
                               Abort&& abort, const std::string& step) {
    Outcome outcome = RunUntil(op, deadline);
    if (outcome == Outcome::kDone && !op->ec) return std::nullopt;
    MmError e;
    if (outcome == Outcome::kDone && op->ec == beast::error::timeout) {
      // Beast's own handshake timer (options.timeout) fired before our deadline.
      e = WsError("timeout", true,
                  step + ": no answer within " + std::to_string(options.timeout.count()) + " ms");
    } else if (outcome == Outcome::kDone) {
      e = WsError("connect", true, step + " failed: " + op->ec.message());
    } else if (outcome == Outcome::kTimedOut) {
      e = WsError("timeout", true,
                  step + ": no answer within " + std::to_string(options.timeout.count()) + " ms");
    } else {
      e = WsError("timeout", true, step + ": interrupted");
    }
    abort();
    Teardown();
    return e;
  }

  MmResult<MmWsEvent> Read(std::chrono::milliseconds wait) {
    if (!conn) return Fail<MmWsEvent>(WsError("closed", true, "not connected"));
    const Clock::time_point deadline = Clock::now() + wait;
    if (!read) {
      read = std::make_shared<OpState>();
      auto op = read;
      auto c = conn;
      c->Visit([&](auto& ws) {
        ws.async_read(c->buffer, [op, c](beast::error_code ec, std::size_t) {
          op->done = true;
          op->ec = ec;
        });
      });
    }
    Outcome outcome = RunUntil(read, deadline);
    if (outcome != Outcome::kDone) {
      // The read stays pending for the next call. An interrupt looks like an early timeout:
      // the connection is intact and the caller's loop gets to check why it was woken.
      return Fail<MmWsEvent>(WsError("timeout", true,
                                     outcome == Outcome::kTimedOut
                                         ? "no event within " + std::to_string(wait.count()) + " ms"
                                         : std::string("read interrupted")));
    }
    std::shared_ptr<OpState> op = std::move(read);
    read.reset();
    if (op->ec) {
      // A close frame from the server: Beast reports error::closed, or the error of answering
      // it when the server did not wait for the answer; either way the reason is recorded.
      websocket::close_reason reason =
          conn->Visit([](auto& ws) -> websocket::close_reason { return ws.reason(); });
      bool closed =
          op->ec == websocket::error::closed || reason.code != websocket::close_code::none;
      std::string message = op->ec.message();
      if (closed) {
        message = "the server closed the connection (code " + std::to_string(reason.code);
        if (!reason.reason.empty()) {
          message += ", " + Quote(std::string_view(reason.reason.data(), reason.reason.size()));
        }
        message += ")";
      }
      Teardown();
      return Fail<MmWsEvent>(WsError(closed ? "closed" : "error", true, message));
    }
    std::string text = beast::buffers_to_string(conn->buffer.data());
    conn->buffer.consume(conn->buffer.size());
    MmResult<MmWsEvent> ev = ParseMmWsEvent(text);
    if (!ev.ok()) {
      // A stream that sends non-events cannot be trusted to be in step: drop it (the caller
      // reconnects and catches up), as the contract says of every non-timeout error.
      Teardown();
      return Fail<MmWsEvent>(WsError("error", true, ev.error.message));
    }
    return ev;
  }

  void Close() {
    if (!conn) return Teardown();
    auto c = conn;
    auto op = std::make_shared<OpState>();
    try {
      c->Visit([&](auto& ws) {
        ws.async_close(websocket::close_code::normal, [op, c](beast::error_code ec) {
          op->done = true;
          op->ec = ec;
        });
      });
      // A pending read completes too (with "closed") once the close handshake is done.
      RunUntil(op, Clock::now() + options.timeout);
    } catch (const std::exception&) {
      // Nothing to report: the socket is closed below either way.
    }
    Teardown();
  }

  MattermostOptions options;
  asio::io_context ioc{1};
  std::atomic<bool> interrupted{false};
  std::shared_ptr<Connection> conn;
  std::shared_ptr<OpState> read;  // the pending async_read, if any
};

MattermostWebSocket::MattermostWebSocket(MattermostOptions options)
    : impl_(std::make_unique<Impl>(std::move(options))) {}
MattermostWebSocket::~MattermostWebSocket() = default;

MmResult<bool> MattermostWebSocket::Connect(const std::string& connection_id,
                                            std::int64_t next_seq) {
  return impl_->Connect(connection_id, next_seq);
}

MmResult<MmWsEvent> MattermostWebSocket::Read(std::chrono::milliseconds wait) {
  return impl_->Read(wait);
}

void MattermostWebSocket::Close() { impl_->Close(); }

void MattermostWebSocket::Interrupt() {
  impl_->interrupted.store(true);
  impl_->ioc.stop();
}

Result<std::shared_ptr<const crypto::Secret>> LoadMattermostToken(const std::string& path) {
  auto token = crypto::ReadTokenFile(path, "Mattermost token file");
  if (!token) return token.status();
  return std::make_shared<const crypto::Secret>(std::move(token).value());
}

}  // namespace relay::chat
