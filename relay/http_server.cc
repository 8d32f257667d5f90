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
// A keep-alive connection (or a request trickling in) idle this long is closed.
constexpr std::chrono::seconds kIdleTimeout{120};
constexpr std::chrono::seconds kWriteTimeout{30};
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

class Session;

struct Core : std::enable_shared_from_this<Core> {
  Core(HttpServer::Options opts, HttpHandler h) : options(std::move(opts)), handler(std::move(h)) {}

  void Accept();
  void OnAccept(beast::error_code ec, tcp::socket socket);
  void CloseAll();  // I/O thread

  const HttpServer::Options options;
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

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(Core& core, tcp::socket socket) : core_(core), stream_(std::move(socket)) {
    // Beast sizes each read by the buffer's spare capacity (at least 512 bytes), and the parser
    // consumes what it reads, so without this a 1 MB body would arrive in ~1 KB recv calls.
    buffer_.reserve(kReadBufferSize);
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
  void ReadHeader() {
    parser_.emplace();
    parser_->body_limit(core_.options.max_body);
    parser_->header_limit(kHeaderLimit);
    stream_.expires_after(kIdleTimeout);
    http::async_read_header(stream_, buffer_, *parser_,
                            beast::bind_front_handler(&Session::OnHeader, shared_from_this()));
  }

  void OnHeader(beast::error_code ec, std::size_t /*bytes*/) {
    if (ec) return OnReadError(ec);
    const auto& header = parser_->get();
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
      version_ = header.version();
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
    http::async_read(stream_, buffer_, *parser_,
                     [self = shared_from_this()](beast::error_code ec, std::size_t) {
                       if (ec) return self->OnReadError(ec);
                       self->OnRequest();
                     });
  }

  void OnReadError(beast::error_code ec) {
    Release();
    if (core_.stopped.load(std::memory_order_relaxed)) return;
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

  Core& core_;
  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  http::response<http::string_body> response_;
  bool keep_alive_ = false;
  unsigned version_ = 11;
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
