#pragma once
// A small HTTP/1.1 server for the ingest API, /healthz and /metrics (Boost.Beast underneath).
//
// One I/O thread accepts connections and reads requests (keep-alive supported). Each complete
// request is handed to the Handler on the I/O thread together with a Responder; the handler may
// answer at once or keep the Responder and call it later from ANY thread (e.g. once a group
// commit is durable). Requests on one connection are answered in order. A body larger than
// max_body is answered 413 without calling the handler; a malformed request gets 400; a request
// that would take the bodies held in memory past max_pending gets 503 (back-pressure).

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "relay/status.h"

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
};

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
