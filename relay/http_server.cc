#include <pthread.h>
// HttpServer on Boost.Beast: one io_context, one I/O thread, one Session per connection.
//
// Lifetime design. A Responder may outlive the connection, Stop() and even the HttpServer, and
// may be called from any thread. So everything the I/O objects need lives in a Core owned by
// shared_ptr: the server holds one reference, every Responder holds one. A Responder also holds
// its Session (so a request awaiting an answer keeps its connection open); the Session only
// refers back to the Core by reference, which is safe because the Core outlives every Session
// (Sessions are owned by Responders, which release the Session before the Core, and by
// handlers queued in the io_context, which the Core destroys before its other members).
// Nothing queued in the io_context owns the Core, so there is no reference cycle.

#include <algorithm>
#include <atomic>
#include <cassert>
#include <chrono>
#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "relay/http_server.h"

namespace relay {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

constexpr std::uint32_t kHeaderLimit = 64 * 1024;
constexpr std::size_t kReadBufferSize = 64 * 1024;
constexpr std::chrono::seconds kWriteTimeout{30};
// Client-supplied values quoted in error messages are cut to this many bytes.
constexpr std::size_t kQuoteLimit = 200;
// After an error response we stop sending and discard what the client still sends for this long
// before closing, so that unread request bytes do not turn the close into a reset that destroys
// the response in flight.
constexpr std::chrono::seconds kLingerTimeout{2};
constexpr std::chrono::milliseconds kAcceptRetryDelay{50};
constexpr std::string_view kContinue = "HTTP/1.1 100 Continue\r\n\r\n";

std::string JsonEscape(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (char c : text) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          static constexpr char kHex[] = "0123456789abcdef";
          out += "\\u00";
          out += kHex[(c >> 4) & 0xf];
          out += kHex[c & 0xf];
        } else {
          out += c;
        }
    }
  }
  return out;
}

HttpResponse JsonError(int status, std::string_view message) {
  HttpResponse response;
  response.status = status;
  response.body = "{\"error\":\"" + JsonEscape(message) + "\"}";
  return response;
}

std::string FormatAddress(const std::string& host, std::uint16_t port) {
  const bool ipv6 = host.find(':') != std::string::npos;
  return (ipv6 ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

std::string_view View(beast::string_view s) { return {s.data(), s.size()}; }

std::string Quote(std::string_view text) {
  if (text.size() > kQuoteLimit) return "'" + std::string(text.substr(0, kQuoteLimit)) + "...'";
  return "'" + std::string(text) + "'";
}

std::string Lower(std::string_view text) {
  std::string out(text);
  for (char& c : out) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return out;
}

std::string_view TrimSpaces(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

bool IsWildcard(const std::string& host) {
  return host.empty() || host == "0.0.0.0" || host == "::";
}

// An IPv4-mapped IPv6 address (a dual-stack socket's view of an IPv4 client) as IPv4.
asio::ip::address Unmapped(const asio::ip::address& a) {
  if (a.is_v6() && a.to_v6().is_v4_mapped()) {
    return asio::ip::make_address_v4(asio::ip::v4_mapped, a.to_v6());
  }
  return a;
}

// Splits a Host header value ("name", "name:port", "[v6]", "[v6]:port") into name and port
// (80 when absent). False when it is not of that form.
bool SplitHostPort(std::string_view value, std::string_view* name, std::uint32_t* port) {
  std::string_view port_text;
  bool has_port = false;
  if (!value.empty() && value.front() == '[') {
    const auto close = value.find(']');
    if (close == std::string_view::npos) return false;
    *name = value.substr(1, close - 1);
    std::string_view rest = value.substr(close + 1);
    if (!rest.empty()) {
      if (rest.front() != ':') return false;
      port_text = rest.substr(1);
      has_port = true;
    }
  } else {
    const auto colon = value.rfind(':');
    if (colon != std::string_view::npos) {
      if (value.find(':') != colon) return false;  // an IPv6 literal must be in brackets
      port_text = value.substr(colon + 1);
      has_port = true;
      *name = value.substr(0, colon);
    } else {
      *name = value;
    }
  }
  if (name->empty()) return false;
  *port = 80;
  if (has_port) {
    if (port_text.empty() || port_text.size() > 5) return false;
    std::uint32_t n = 0;
    for (char c : port_text) {
      if (c < '0' || c > '9') return false;
      n = n * 10 + static_cast<std::uint32_t>(c - '0');
    }
    if (n == 0 || n > 65535) return false;
    *port = n;
  }
  return true;
}

// A request the server refuses before its body is read.
struct Refused {
  HttpRefusal reason;
  HttpResponse response;
  std::string message;
};

class Session;

struct Core : std::enable_shared_from_this<Core> {
  Core(HttpServer::Options opts, HttpHandler h) : options(std::move(opts)), handler(std::move(h)) {}

  void Accept();
  void OnAccept(beast::error_code ec, tcp::socket socket);
  void CloseAll();  // I/O thread

  // Whether a Host header value (or an Origin's host part) names this server, for a client
  // connected to `local`. See Options::check_host.
  bool HostAllowed(std::string_view value, const asio::ip::address& local) const;
  // This server as the error messages name it: "127.0.0.1:8081".
  std::string ListenAddress() const { return FormatAddress(options.host, bound_port); }

  const HttpServer::Options options;
  std::uint16_t bound_port = 0;  // set by Start() before the I/O thread runs
  HttpHandler handler;  // reset by Stop(), in case it owns Responders (which own the Core)
  std::atomic<bool> stopped{false};
  // Bytes reserved by requests being read or awaiting their answer (see Options::max_pending).
  // Atomic because a Session may be destroyed on any thread (with the last Responder).
  std::atomic<std::uint64_t> pending_bytes{0};
  // Declared after everything a Session or queued handler touches: destroying the io_context
  // destroys queued handlers, and with them possibly the last references to Sessions.
  asio::io_context ioc{1};
  tcp::acceptor acceptor{ioc};
  asio::steady_timer accept_retry{ioc};
  std::vector<std::weak_ptr<Session>> sessions;  // I/O thread only; pruned on accept
};

bool Core::HostAllowed(std::string_view value, const asio::ip::address& local) const {
  std::string_view name;
  std::uint32_t port = 0;
  if (!SplitHostPort(value, &name, &port) || port != bound_port) return false;
  const std::string lower = Lower(name);
  if (!IsWildcard(options.host) && lower == Lower(options.host)) return true;
  for (const std::string& allowed : options.allowed_hosts) {
    if (lower == Lower(allowed)) return true;
  }
  if (lower.find('%') == std::string::npos) {  // no zone ids: browsers never send them
    beast::error_code ec;
    const asio::ip::address literal = asio::ip::make_address(lower, ec);
    if (!ec) return Unmapped(literal) == Unmapped(local);
  }
  return lower == "localhost" && Unmapped(local).is_loopback();
}

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(Core& core, tcp::socket socket) : core_(core), stream_(std::move(socket)) {
    // Beast sizes each read by the buffer's spare capacity (at least 512 bytes), and the parser
    // consumes what it reads, so without this a 1 MB body would arrive in ~1 KB recv calls.
    buffer_.reserve(kReadBufferSize);
    beast::error_code ec;
    const tcp::endpoint local = stream_.socket().local_endpoint(ec);
    if (!ec) local_address_ = local.address();
  }
  ~Session() { Release(); }

  void Start() { ReadHeader(); }

  // Sends the answer to the current request. I/O thread.
  void Send(HttpResponse response) {
    if (core_.stopped.load(std::memory_order_relaxed) || !stream_.socket().is_open()) return;
    Write(std::move(response), /*close_after=*/!keep_alive_);
  }

  // Closes the connection at once. I/O thread.
  void Close() {
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
    stream_.close();
  }

 private:
  // Reads the next request's header: on a new connection (or with bytes of a pipelined request
  // already buffered) under the header deadline at once; on a kept-alive connection after
  // waiting up to idle_timeout for its first bytes.
  void ReadHeader() {
    parser_.emplace();
    parser_->body_limit(core_.options.max_body);
    parser_->header_limit(kHeaderLimit);
    if (requests_ == 0 || buffer_.size() > 0) return ReadHeaderBytes();
    phase_ = Phase::kIdle;
    stream_.expires_after(core_.options.idle_timeout);
    stream_.async_read_some(buffer_.prepare(kReadBufferSize),
                            [self = shared_from_this()](beast::error_code ec, std::size_t n) {
                              // An idle connection that ends or expires is not an error.
                              if (ec || self->core_.stopped.load(std::memory_order_relaxed)) {
                                return self->Close();
                              }
                              self->buffer_.commit(n);
                              self->ReadHeaderBytes();
                            });
  }

  void ReadHeaderBytes() {
    phase_ = Phase::kHeader;
    stream_.expires_after(core_.options.header_timeout);
    http::async_read_header(stream_, buffer_, *parser_,
                            beast::bind_front_handler(&Session::OnHeader, shared_from_this()));
  }

  // The access checks of Options, on a complete header; nullopt when the request may proceed.
  std::optional<Refused> CheckAccess(const http::request_parser<http::string_body>& parser) {
    const HttpServer::Options& o = core_.options;
    const auto& header = parser.get();
    auto refuse = [](HttpRefusal reason, int status, std::string message) {
      Refused r{reason, JsonError(status, message), std::move(message)};
      return std::optional<Refused>(std::move(r));
    };
    if (o.check_host) {
      const auto hosts = header.count(http::field::host);
      if (hosts > 1) return refuse(HttpRefusal::kHost, 400, "more than one Host header");
      if (hosts == 0 && header.version() >= 11) {
        return refuse(HttpRefusal::kHost, 400, "missing Host header (HTTP/1.1 requires one)");
      }
      const std::string_view host = View(header[http::field::host]);
      if (hosts == 1 && !core_.HostAllowed(host, local_address_)) {
        return refuse(HttpRefusal::kHost, 403,
                      "Host " + Quote(host) + " does not name this relay (listening on " +
                          core_.ListenAddress() +
                          "): refused, as a web page reached through another name (DNS "
                          "rebinding) would be; add the name to [ingest] allowed_hosts if "
                          "clients use it");
      }
    }
    if (o.check_origin) {
      if (header.count(http::field::origin) > 0) {
        const std::string_view origin = View(header[http::field::origin]);
        const bool ok = origin.size() > 7 && Lower(origin.substr(0, 7)) == "http://" &&
                        core_.HostAllowed(origin.substr(7), local_address_);
        if (!ok) {
          return refuse(HttpRefusal::kOrigin, 403,
                        "requests from web pages are refused: Origin " + Quote(origin) +
                            " is not this relay (" + core_.ListenAddress() + ")");
        }
      }
      const std::string site = Lower(TrimSpaces(View(header["Sec-Fetch-Site"])));
      if (site == "cross-site" || site == "same-site") {
        return refuse(HttpRefusal::kOrigin, 403,
                      "requests from web pages are refused: Sec-Fetch-Site is " + Quote(site));
      }
    }
    if (o.authorize) {
      const std::string_view target = View(header.target());
      const std::string_view path = target.substr(0, target.find('?'));
      const bool public_path =
          header.method() == http::verb::get &&
          std::find(o.public_paths.begin(), o.public_paths.end(), path) != o.public_paths.end();
      if (!public_path) {
        auto unauthorized = [&](HttpRefusal reason, const std::string& message,
                                const char* challenge) {
          std::optional<Refused> r = refuse(reason, 401, message);
          r->response.headers.emplace_back("WWW-Authenticate", challenge);
          return r;
        };
        constexpr const char* kChallenge = "Bearer realm=\"relay\"";
        constexpr const char* kInvalid = "Bearer realm=\"relay\", error=\"invalid_token\"";
        const auto fields = header.count(http::field::authorization);
        if (fields == 0) {
          return unauthorized(HttpRefusal::kMissingToken,
                              "missing 'Authorization: Bearer <token>' header (the token is in "
                              "the file named by [ingest] token_file)",
                              kChallenge);
        }
        const std::string_view value = TrimSpaces(View(header[http::field::authorization]));
        const auto space = value.find(' ');
        const std::string_view scheme = value.substr(0, space);
        const std::string_view token =
            space == std::string_view::npos ? std::string_view() : TrimSpaces(value.substr(space));
        if (fields > 1 || Lower(scheme) != "bearer" || token.empty()) {
          return unauthorized(HttpRefusal::kMissingToken,
                              "the Authorization header must be one 'Bearer <token>'", kChallenge);
        }
        if (!o.authorize(token)) {
          return unauthorized(HttpRefusal::kWrongToken,
                              "wrong token: it does not match [ingest] token_file", kInvalid);
        }
      }
    }
    if (o.require_json) {
      const bool has_body = parser.chunked() || parser.content_length().value_or(0) > 0;
      const std::string_view type = View(header[http::field::content_type]);
      const std::string media = Lower(TrimSpaces(type.substr(0, type.find(';'))));
      if (has_body && media != "application/json") {
        return refuse(HttpRefusal::kContentType, 415,
                      type.empty() ? std::string("missing Content-Type: send application/json")
                                   : "Content-Type " + Quote(type) +
                                         " is not supported: send application/json");
      }
    }
    return std::nullopt;
  }

  void OnHeader(beast::error_code ec, std::size_t /*bytes*/) {
    if (ec) return OnReadError(ec);
    const auto& header = parser_->get();
    version_ = header.version();
    // Before anything is reserved or read: a refused client holds no memory.
    if (std::optional<Refused> refused = CheckAccess(*parser_)) {
      if (core_.options.on_refused) core_.options.on_refused(refused->reason, refused->message);
      keep_alive_ = false;
      return Write(std::move(refused->response), /*close_after=*/true);
    }
    // Back-pressure: reserve the body's size against the budget before reading it. A request
    // that does not fit is refused without reading its body (a client that sent it anyway is
    // drained by the lingering close, without keeping the bytes).
    // A request without Content-Length that is not chunked has no body (RFC 9112 6.3): GETs
    // such as /healthz and /metrics reserve nothing and are never refused as busy.
    std::uint64_t need = 0;
    if (parser_->chunked()) {
      need = core_.options.max_body;
    } else if (auto length = parser_->content_length()) {
      need = std::min<std::uint64_t>(*length, core_.options.max_body);
    }
    std::uint64_t held = core_.pending_bytes.load();
    if (need > 0 && held > 0 && held + need > core_.options.max_pending) {
      if (core_.options.on_busy) core_.options.on_busy();
      HttpResponse busy =
          JsonError(503, "relay is busy: " + std::to_string(held) +
                             " bytes of requests are waiting for the store (limit " +
                             std::to_string(core_.options.max_pending) + "); retry later");
      busy.retry_after_s = 1;
      keep_alive_ = false;
      return Write(std::move(busy), /*close_after=*/true);
    }
    core_.pending_bytes += need;
    reserved_ = need;
    if (header.version() >= 11 && beast::iequals(header[http::field::expect], "100-continue")) {
      // The client waits for this before sending the body (curl does for large bodies).
      asio::async_write(stream_, asio::buffer(kContinue.data(), kContinue.size()),
                        [self = shared_from_this()](beast::error_code write_ec, std::size_t) {
                          if (write_ec) return self->Close();
                          self->ReadBody();
                        });
      return;
    }
    ReadBody();
  }

  void ReadBody() {
    if (core_.stopped.load(std::memory_order_relaxed)) return;
    if (parser_->is_done()) return OnRequest();
    phase_ = Phase::kBody;
    const auto rate = std::max<std::uint64_t>(core_.options.body_min_rate, 1);
    stream_.expires_after(
        core_.options.body_timeout +
        std::chrono::milliseconds(reserved_ / rate * 1000 + reserved_ % rate * 1000 / rate));
    http::async_read(stream_, buffer_, *parser_,
                     [self = shared_from_this()](beast::error_code ec, std::size_t) {
                       if (ec) return self->OnReadError(ec);
                       self->OnRequest();
                     });
  }

  void OnReadError(beast::error_code ec) {
    const std::uint64_t reserved = reserved_;
    Release();
    if (core_.stopped.load(std::memory_order_relaxed)) return;
    if (ec == beast::error::timeout) {
      // tcp_stream has closed the socket already: nobody is left to answer.
      const bool body = phase_ == Phase::kBody;
      if (core_.options.on_refused) {
        const auto limit = body ? core_.options.body_timeout : core_.options.header_timeout;
        core_.options.on_refused(
            body ? HttpRefusal::kBodyTimeout : HttpRefusal::kHeaderTimeout,
            std::string(body ? "request body" : "request header") + " not complete within " +
                (body ? "its deadline (" + std::to_string(limit.count()) + " ms + " +
                            std::to_string(reserved) + " bytes at " +
                            std::to_string(core_.options.body_min_rate) + " bytes/s)"
                      : std::to_string(limit.count()) + " ms") +
                ": connection closed");
      }
      return Close();
    }
    if (ec == http::error::body_limit) {
      return Write(JsonError(413, "request body larger than " +
                                      std::to_string(core_.options.max_body) + " bytes"),
                   /*close_after=*/true);
    }
    if (ec == http::error::header_limit) {
      return Write(
          JsonError(431, "request header larger than " + std::to_string(kHeaderLimit) + " bytes"),
          /*close_after=*/true);
    }
    // end_of_stream: the client closed between requests; partial_message: it closed mid-request.
    // Either way nobody is left to read an answer. Other non-HTTP errors are socket errors.
    if (ec.category() == http::make_error_code(http::error::bad_method).category() &&
        ec != http::error::end_of_stream && ec != http::error::partial_message) {
      return Write(JsonError(400, "malformed HTTP request: " + ec.message()),
                   /*close_after=*/true);
    }
    Close();
  }

  void OnRequest() {
    if (core_.stopped.load(std::memory_order_relaxed)) return;
    stream_.expires_never();  // the handler may take its time; no read is pending meanwhile
    phase_ = Phase::kHandler;
    ++requests_;
    http::request<http::string_body> message = parser_->release();
    parser_.reset();
    keep_alive_ = message.keep_alive();
    version_ = message.version();

    HttpRequest request;
    request.method = std::string(message.method_string());
    request.target = std::string(message.target());
    request.content_type = std::string(message[http::field::content_type]);
    request.body = std::move(message.body());

    HttpResponder responder = MakeResponder();
    try {
      core_.handler(std::move(request), responder);
    } catch (const std::exception& e) {
      responder(JsonError(500, std::string("request handler failed: ") + e.what()));
    } catch (...) {
      responder(JsonError(500, "request handler failed"));
    }
  }

  HttpResponder MakeResponder();

  void Write(HttpResponse response, bool close_after) {
    int status = response.status;
    if (status < 100 || status > 999) {
      response = JsonError(500, "handler returned invalid HTTP status " + std::to_string(status));
      status = 500;
    }
    // These statuses must not carry a body (prepare_payload would throw).
    if (status < 200 || status == 204 || status == 304) response.body.clear();

    response_ = {};
    response_.version(version_);
    response_.result(static_cast<unsigned>(status));
    response_.set(http::field::server, "relay");
    if (!response.content_type.empty()) {
      response_.set(http::field::content_type, response.content_type);
    }
    if (response.retry_after_s > 0) {
      response_.set(http::field::retry_after, std::to_string(response.retry_after_s));
    }
    for (const auto& [name, value] : response.headers) response_.set(name, value);
    response_.body() = std::move(response.body);
    response_.keep_alive(!close_after);
    response_.prepare_payload();

    stream_.expires_after(kWriteTimeout);
    http::async_write(stream_, response_,
                      [self = shared_from_this(), close_after](beast::error_code ec, std::size_t) {
                        self->OnWrite(ec, close_after);
                      });
  }

  void OnWrite(beast::error_code ec, bool close_after) {
    response_ = {};  // free the body now
    Release();
    if (ec || core_.stopped.load(std::memory_order_relaxed)) return Close();
    if (close_after) return LingeringClose();
    ReadHeader();
  }

  void LingeringClose() {
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
    stream_.expires_after(kLingerTimeout);
    buffer_.clear();
    Drain();
  }

  void Drain() {
    stream_.async_read_some(buffer_.prepare(kReadBufferSize),
                            [self = shared_from_this()](beast::error_code ec, std::size_t) {
                              self->buffer_.clear();
                              if (ec || self->core_.stopped.load(std::memory_order_relaxed)) {
                                return self->Close();
                              }
                              self->Drain();
                            });
  }

  // Returns this connection's reservation (request answered, failed or connection gone).
  void Release() {
    if (reserved_ > 0) core_.pending_bytes -= std::exchange(reserved_, 0);
  }

  // What the connection is waiting for: tells a missed header deadline from a body's.
  enum class Phase { kIdle, kHeader, kBody, kHandler };

  Core& core_;
  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  http::response<http::string_body> response_;
  asio::ip::address local_address_;  // the address the client connected to (Host checks)
  bool keep_alive_ = false;
  unsigned version_ = 11;
  Phase phase_ = Phase::kHeader;
  std::uint64_t requests_ = 0;  // requests handed to the handler on this connection
  std::uint64_t reserved_ = 0;  // this request's share of Core::pending_bytes
};

// Shared by all copies of one HttpResponder.
struct ResponderState {
  // Member order matters: the Session is released before the Core (see the file comment).
  std::shared_ptr<Core> core;
  std::shared_ptr<Session> session;
  std::atomic<bool> used{false};
};

HttpResponder Session::MakeResponder() {
  auto state = std::make_shared<ResponderState>();
  state->core = core_.shared_from_this();
  state->session = shared_from_this();
  return [state](HttpResponse response) {
    if (state->used.exchange(true)) return;  // exactly once; later calls are ignored
    // Only the first caller gets here, so taking the Session needs no lock.
    std::shared_ptr<Session> session = std::move(state->session);
    const std::shared_ptr<Core>& core = state->core;
    if (core->stopped.load()) return;
    if (core->ioc.get_executor().running_in_this_thread()) {
      session->Send(std::move(response));
      return;
    }
    asio::post(core->ioc, [session = std::move(session), response = std::move(response)]() mutable {
      session->Send(std::move(response));
    });
  };
}

void Core::Accept() {
  acceptor.async_accept(
      [this](beast::error_code ec, tcp::socket socket) { OnAccept(ec, std::move(socket)); });
}

void Core::OnAccept(beast::error_code ec, tcp::socket socket) {
  if (stopped.load(std::memory_order_relaxed) || ec == asio::error::operation_aborted) return;
  if (ec) {
    // E.g. out of file descriptors: back off instead of spinning, then keep accepting.
    accept_retry.expires_after(kAcceptRetryDelay);
    accept_retry.async_wait([this](beast::error_code wait_ec) {
      if (!wait_ec && !stopped.load(std::memory_order_relaxed)) Accept();
    });
    return;
  }
  std::erase_if(sessions, [](const std::weak_ptr<Session>& s) { return s.expired(); });
  if (sessions.size() >= static_cast<std::size_t>(std::max(options.max_connections, 0))) {
    beast::error_code ignored;
    socket.shutdown(tcp::socket::shutdown_both, ignored);
    socket.close(ignored);
  } else {
    beast::error_code ignored;
    socket.set_option(tcp::no_delay(true), ignored);
    auto session = std::make_shared<Session>(*this, std::move(socket));
    sessions.push_back(session);
    session->Start();
  }
  Accept();
}

void Core::CloseAll() {
  beast::error_code ignored;
  acceptor.close(ignored);
  accept_retry.cancel();
  for (const std::weak_ptr<Session>& weak : sessions) {
    if (std::shared_ptr<Session> session = weak.lock()) session->Close();
  }
  sessions.clear();
  // Queued completions (now mostly operation_aborted) are dropped with the io_context.
  ioc.stop();
}

}  // namespace

const char* HttpRefusalName(HttpRefusal reason) {
  switch (reason) {
    case HttpRefusal::kHost:
      return "host";
    case HttpRefusal::kOrigin:
      return "origin";
    case HttpRefusal::kMissingToken:
      return "missing_token";
    case HttpRefusal::kWrongToken:
      return "wrong_token";
    case HttpRefusal::kContentType:
      return "content_type";
    case HttpRefusal::kHeaderTimeout:
      return "header_timeout";
    case HttpRefusal::kBodyTimeout:
      return "body_timeout";
    case HttpRefusal::kCount:
      break;
  }
  return "unknown";
}

struct HttpServer::Impl {
  std::shared_ptr<Core> core;
  std::thread thread;
  std::atomic<std::uint16_t> port{0};
  bool started = false;
};

HttpServer::HttpServer(Options options, HttpHandler handler) : impl_(std::make_unique<Impl>()) {
  impl_->core = std::make_shared<Core>(std::move(options), std::move(handler));
}

HttpServer::~HttpServer() { Stop(); }

Status HttpServer::Start() {
  Core& core = *impl_->core;
  const std::string address = FormatAddress(core.options.host, core.options.port);
  if (impl_->started || core.stopped.load()) {
    return Status::Error("HTTP server on " + address + " was already started");
  }
  try {
    beast::error_code ec;
    tcp::endpoint endpoint;
    const asio::ip::address ip = asio::ip::make_address(core.options.host, ec);
    if (!ec) {
      endpoint = tcp::endpoint(ip, core.options.port);
    } else {
      // Not a literal: resolve it (e.g. "localhost").
      tcp::resolver resolver(core.ioc);
      auto results = resolver.resolve(core.options.host, std::to_string(core.options.port),
                                      tcp::resolver::passive, ec);
      if (ec || results.empty()) {
        return Status::Error("cannot listen on " + address + ": cannot resolve host '" +
                             core.options.host + "'" + (ec ? ": " + ec.message() : ""));
      }
      endpoint = results.begin()->endpoint();
    }
    auto fail = [&](const char* step) {
      beast::error_code ignored;
      core.acceptor.close(ignored);
      return Status::Error("cannot listen on " + address + ": " + ec.message() + " (" + step + ")");
    };
    if (core.acceptor.open(endpoint.protocol(), ec); ec) return fail("socket");
    if (core.acceptor.set_option(asio::socket_base::reuse_address(true), ec); ec) {
      return fail("SO_REUSEADDR");
    }
    if (core.acceptor.bind(endpoint, ec); ec) return fail("bind");
    if (core.acceptor.listen(asio::socket_base::max_listen_connections, ec); ec) {
      return fail("listen");
    }
    const tcp::endpoint bound = core.acceptor.local_endpoint(ec);
    if (ec) return fail("getsockname");
    impl_->port = bound.port();
    core.bound_port = bound.port();

    core.Accept();
    impl_->started = true;
    impl_->thread = std::thread([&core] {
      pthread_setname_np(pthread_self(), "relay-http");
      // Handlers catch their own exceptions; this is the last line of defence.
      for (;;) {
        try {
          core.ioc.run();
          return;
        } catch (const std::exception&) {
        }
      }
    });
  } catch (const std::exception& e) {
    beast::error_code ignored;
    core.acceptor.close(ignored);
    return Status::Error("cannot listen on " + address + ": " + e.what());
  }
  return Status::Ok();
}

void HttpServer::Stop() {
  Core& core = *impl_->core;
  if (core.stopped.exchange(true)) return;
  if (impl_->thread.joinable()) {
    assert(impl_->thread.get_id() != std::this_thread::get_id() &&
           "HttpServer::Stop must not be called from the request handler");
    asio::post(core.ioc, [&core] { core.CloseAll(); });
    impl_->thread.join();
  }
  // Again on this thread, in case the I/O thread had already run out of work and never ran the
  // posted call; it is idempotent and nothing else touches the Core now.
  core.CloseAll();
  // The I/O thread is gone, so nothing else touches the handler now.
  core.handler = nullptr;
}

std::uint16_t HttpServer::port() const { return impl_->port.load(); }

}  // namespace relay
