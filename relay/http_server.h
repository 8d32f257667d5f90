#pragma once
// A small HTTP/1.1 server for the ingest API, /healthz and /metrics (Boost.Beast underneath).
//
// One I/O thread accepts connections and reads requests (keep-alive supported). Each complete
// request is handed to the Handler on the I/O thread together with a Responder; the handler may
// answer at once or keep the Responder and call it later from ANY thread (e.g. once a group
// commit is durable). Requests on one connection are answered in order. A body larger than
// max_body is answered 413 without calling the handler; a malformed request gets 400; a request
// that would take the bodies held in memory past max_pending gets 503 (back-pressure).
//
// Access control (Options below) is applied when a request's header has arrived, before its
// body is read and before any of max_pending is reserved: a refused client holds no memory,
// and its connection is closed after the answer. Deadlines bound how long a client may take
// to send a header or a body (slowloris): past them the connection is closed and whatever it
// had reserved is released.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "base/status.h"

namespace relay {

struct HttpRequest {
  std::string method;  // "GET", "POST", ...
  std::string target;  // path and query, e.g. "/v1/messages"
  std::string content_type;
  std::string body;
};

struct HttpResponse {
  int status = 200;
  std::string content_type = "application/json";
  std::string body;
  int retry_after_s = 0;  // > 0: sent as a Retry-After header (with 503 / 429)
  std::vector<std::pair<std::string, std::string>> headers{};  // further header fields
};

// Why the server refused a request (or closed a connection) before the handler saw it.
enum class HttpRefusal : std::size_t {
  kHost = 0,       // Host header missing (HTTP/1.1), repeated or not naming this server: 400/403
  kOrigin,         // sent by a web page of another origin (Origin, Sec-Fetch-Site): 403
  kMissingToken,   // no "Authorization: Bearer" header: 401
  kWrongToken,     // a token that does not match: 401
  kContentType,    // a body that is not declared application/json: 415
  kHeaderTimeout,  // header not complete within header_timeout: connection closed
  kBodyTimeout,    // body not complete within its deadline: connection closed
  kCount
};
// "host", "origin", "missing_token", "wrong_token", "content_type", "header_timeout",
// "body_timeout": the metric label.
const char* HttpRefusalName(HttpRefusal reason);

using HttpResponder = std::function<void(HttpResponse)>;
using HttpHandler = std::function<void(HttpRequest&&, HttpResponder)>;

class HttpServer {
 public:
  struct Options {
    std::string host = "127.0.0.1";
    std::uint16_t port = 0;  // 0 picks a free port (see port())
    std::uint64_t max_body = 16u << 20;
    int max_connections = 256;  // further connections are accepted then closed at once
    // Bytes of request bodies being received or waiting for their answer, over all connections
    // (a body's Content-Length is reserved when its header arrives; a chunked body reserves
    // max_body; a request without a body reserves nothing). A request that does not fit is
    // answered 503 with Retry-After at once, without reading its body into memory. Must be >=
    // max_body.
    std::uint64_t max_pending = 64u << 20;
    std::function<void()> on_busy;  // called (I/O thread) for each request refused as above

    // ---- Access control, checked in this order.
    // Host must name this server, against DNS rebinding: the listen host as given (unless it is
    // a wildcard such as 0.0.0.0 or ::), one of allowed_hosts, an IP literal equal to the
    // address the client connected to, or "localhost" on a loopback connection; with the bound
    // port (no port: 80). Names compare case-insensitively. An HTTP/1.1 request without Host
    // gets 400 (RFC 9112); HTTP/1.0 without Host is accepted (browsers always send one).
    bool check_host = true;
    std::vector<std::string> allowed_hosts;
    // An Origin header must be "http://" + a Host accepted above ("null" is refused), and a
    // Sec-Fetch-Site of "cross-site" or "same-site" is refused: no web page drives the API.
    bool check_origin = true;
    // When set, every request except a GET of one of public_paths (query ignored) must carry
    // "Authorization: Bearer <token>" with authorize(token) true; otherwise 401 with
    // WWW-Authenticate: Bearer. Called on the I/O thread; it should compare in constant time.
    std::function<bool(std::string_view token)> authorize;
    std::vector<std::string> public_paths{"/healthz", "/metrics"};
    // A request with a body must declare Content-Type: application/json (parameters such as
    // charset allowed); 415 otherwise. This also keeps out the "simple" cross-site POSTs a
    // browser sends without asking (text/plain, form encodings).
    bool require_json = true;
    // Called (I/O thread) for each refusal above and each deadline missed, with the message
    // sent (or, for a deadline, what happened). Client-supplied text in it is not escaped.
    std::function<void(HttpRefusal, const std::string& message)> on_refused;

    // ---- Deadlines.
    // A new connection must deliver its first request header within header_timeout of being
    // accepted; a kept-alive connection may wait idle_timeout for its next request, which must
    // then be complete header_timeout after its first bytes.
    std::chrono::milliseconds header_timeout{10000};
    std::chrono::milliseconds idle_timeout{60000};
    // A body must be complete within body_timeout plus its length (Content-Length; max_body
    // for a chunked body) at body_min_rate bytes per second, from the end of its header.
    std::chrono::milliseconds body_timeout{10000};
    std::uint64_t body_min_rate = 1u << 20;
  };
  HttpServer(Options options, HttpHandler handler);
  ~HttpServer();  // stops if running
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Binds and starts the I/O thread. Error names the address when binding fails.
  Status Start();
  // Stops accepting, closes connections, joins the I/O thread. Responders called afterwards are
  // ignored. Idempotent.
  void Stop();
  std::uint16_t port() const;  // the bound port, valid after Start()

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// A blocking HTTP/1.1 client connection (keep-alive) for `relay post`, the demo, tests and the
// benchmark. Not thread-safe; use one per thread.
class HttpClient {
 public:
  HttpClient(std::string host, std::uint16_t port);
  ~HttpClient();
  HttpClient(const HttpClient&) = delete;
  HttpClient& operator=(const HttpClient&) = delete;

  // Sends "Authorization: Bearer <token>" with every request from now on. The client's copy is
  // wiped when it is replaced or the client is destroyed.
  void SetBearerToken(std::string_view token);

  // Sends one request and reads the response; reconnects once if the kept-alive connection was
  // closed by the server. Error says what failed (connect refused, timeout, ...).
  Result<HttpResponse> Request(const std::string& method, const std::string& target,
                               const std::string& body = "",
                               const std::string& content_type = "application/json");

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace relay
