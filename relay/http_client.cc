// HttpClient on Boost.Beast. Blocking calls are async operations run to completion on a private
// io_context, because beast::tcp_stream timeouts only apply to async operations.

#include <string.h>  // explicit_bzero

#include <chrono>
#include <cstdint>
#include <exception>
#include <string>
#include <utility>

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "relay/http_server.h"

namespace relay {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

constexpr std::chrono::seconds kTimeout{30};  // for connecting and for each read or write
constexpr std::uint64_t kMaxResponseBody = std::uint64_t{256} << 20;
constexpr std::uint32_t kHeaderLimit = 64 * 1024;

}  // namespace

struct HttpClient::Impl {
  Impl(std::string h, std::uint16_t p)
      : host(std::move(h)),
        port(p),
        address((host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":" +
                std::to_string(port)) {
    // Beast sizes each read by the buffer's spare capacity; keep it large for big responses.
    buffer.reserve(64 * 1024);
  }

  // Starts an async operation with a completion handler that records its error, then runs the
  // io_context until it completes.
  template <typename Start>
  beast::error_code RunIo(Start start) {
    beast::error_code result = asio::error::would_block;
    start([&result](beast::error_code ec, auto&&...) { result = ec; });
    ioc.restart();
    ioc.run();
    return result;
  }

  Status Connect() {
    beast::error_code ec;
    tcp::resolver resolver(ioc);
    const auto endpoints = resolver.resolve(host, std::to_string(port), ec);
    if (ec) return Status::Error("cannot connect to " + address + ": " + ec.message());
    stream.expires_after(kTimeout);
    ec = RunIo([&](auto handler) { stream.async_connect(endpoints, std::move(handler)); });
    if (ec) {
      Disconnect();
      return Status::Error("cannot connect to " + address + ": " + ec.message());
    }
    beast::error_code ignored;
    stream.socket().set_option(tcp::no_delay(true), ignored);
    connected = true;
    return Status::Ok();
  }

  ~Impl() { WipeAuthorization(); }

  void WipeAuthorization() {
    if (!authorization.empty()) explicit_bzero(authorization.data(), authorization.size());
    authorization.clear();
  }

  void Disconnect() {
    beast::error_code ignored;
    stream.socket().shutdown(tcp::socket::shutdown_both, ignored);
    stream.close();
    buffer.consume(buffer.size());
    connected = false;
    reused = false;
  }

  const std::string host;
  const std::uint16_t port;
  const std::string address;  // "host:port" for error messages
  asio::io_context ioc{1};
  beast::tcp_stream stream{ioc};
  beast::flat_buffer buffer;
  bool connected = false;
  bool reused = false;  // a response was already read on this connection
  std::string authorization;  // "Bearer <token>", or empty
};

HttpClient::HttpClient(std::string host, std::uint16_t port)
    : impl_(std::make_unique<Impl>(std::move(host), port)) {}

HttpClient::~HttpClient() = default;

void HttpClient::SetBearerToken(std::string_view token) {
  impl_->WipeAuthorization();
  impl_->authorization.reserve(7 + token.size());  // no reallocation leaves a copy behind
  impl_->authorization.append("Bearer ").append(token);
}

Result<HttpResponse> HttpClient::Request(const std::string& method, const std::string& target,
                                         const std::string& body, const std::string& content_type) {
  Impl& impl = *impl_;
  try {
    // span_body sends the caller's string without copying it (batches are ~1 MB).
    http::request<http::span_body<const char>> request;
    const http::verb verb = http::string_to_verb(method);
    if (verb == http::verb::unknown) {
      request.method_string(method);
    } else {
      request.method(verb);
    }
    request.target(target);
    request.version(11);
    request.set(http::field::host, impl.address);
    request.set(http::field::user_agent, "relay");
    if (!impl.authorization.empty()) request.set(http::field::authorization, impl.authorization);
    if (!body.empty() || verb == http::verb::post) {
      request.set(http::field::content_type, content_type);
    }
    request.body() = beast::span<const char>(body.data(), body.size());
    request.prepare_payload();

    for (int attempt = 0;; ++attempt) {
      if (!impl.connected) {
        if (Status status = impl.Connect(); !status.ok()) return status;
      }
      // A failure on a connection that already carried a request most likely means the server
      // closed it while idle; the request never reached the handler, so trying again is safe.
      const bool may_retry = impl.reused && attempt == 0;

      impl.stream.expires_after(kTimeout);
      beast::error_code ec = impl.RunIo(
          [&](auto handler) { http::async_write(impl.stream, request, std::move(handler)); });
      if (ec) {
        impl.Disconnect();
        if (may_retry) continue;
        return Status::Error("sending request to " + impl.address + ": " + ec.message());
      }

      http::response_parser<http::string_body> parser;
      parser.body_limit(kMaxResponseBody);
      parser.header_limit(kHeaderLimit);
      impl.stream.expires_after(kTimeout);
      ec = impl.RunIo([&](auto handler) {
        http::async_read(impl.stream, impl.buffer, parser, std::move(handler));
      });
      if (ec) {
        const bool got_some = parser.got_some();
        impl.Disconnect();
        if (may_retry && !got_some) continue;
        return Status::Error("reading response from " + impl.address + ": " + ec.message());
      }

      http::response<http::string_body> message = parser.release();
      if (message.keep_alive()) {
        impl.reused = true;
      } else {
        impl.Disconnect();
      }
      HttpResponse response;
      response.status = static_cast<int>(message.result_int());
      response.content_type = std::string(message[http::field::content_type]);
      response.body = std::move(message.body());
      return response;
    }
  } catch (const std::exception& e) {
    impl.Disconnect();
    return Status::Error("HTTP " + method + " " + target + " to " + impl.address + ": " + e.what());
  }
}

}  // namespace relay
