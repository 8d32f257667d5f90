#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "relay/http_server.h"

using relay::HttpClient;
using relay::HttpRequest;
using relay::HttpResponder;
using relay::HttpResponse;
using relay::HttpServer;

namespace {

// Echoes method, target and content type in headers-free form: "<METHOD> <target> <type>\n<body>".
void Echo(HttpRequest&& request, HttpResponder respond) {
  HttpResponse response;
  response.content_type = "text/plain";
  response.body = request.method + " " + request.target + " " + request.content_type + "\n" +
                  std::move(request.body);
  respond(std::move(response));
}

HttpServer::Options Loopback() {
  HttpServer::Options options;
  options.host = "127.0.0.1";
  options.port = 0;
  return options;
}

// The Host header a client of the server on `port` sends (the server checks it).
std::string Host(std::uint16_t port) { return "Host: 127.0.0.1:" + std::to_string(port) + "\r\n"; }

// A raw loopback TCP connection for sending bytes no well-behaved client would send.
class RawConnection {
 public:
  explicit RawConnection(std::uint16_t port) : fd_(::socket(AF_INET, SOCK_STREAM, 0)) {
    REQUIRE(fd_ >= 0);
    timeval timeout{5, 0};
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::connect(fd_, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0);
  }
  ~RawConnection() { ::close(fd_); }
  int fd() const { return fd_; }
  RawConnection(const RawConnection&) = delete;
  RawConnection& operator=(const RawConnection&) = delete;

  void Send(const std::string& bytes) {
    REQUIRE(::send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL) ==
            static_cast<ssize_t>(bytes.size()));
  }
  // Reads until the peer closes (or the 5 s receive timeout expires).
  std::string ReadToEof() {
    std::string out;
    char chunk[4096];
    for (;;) {
      const ssize_t n = ::recv(fd_, chunk, sizeof chunk, 0);
      if (n <= 0) return out;
      out.append(chunk, static_cast<std::size_t>(n));
    }
  }
  // Reads until `count` occurrences of `marker` have arrived.
  std::string ReadUntil(const std::string& marker, int count) {
    std::string out;
    char chunk[4096];
    auto occurrences = [&] {
      int found = 0;
      for (auto pos = out.find(marker); pos != std::string::npos; pos = out.find(marker, pos + 1)) {
        ++found;
      }
      return found;
    };
    while (occurrences() < count) {
      const ssize_t n = ::recv(fd_, chunk, sizeof chunk, 0);
      if (n <= 0) break;
      out.append(chunk, static_cast<std::size_t>(n));
    }
    return out;
  }

 private:
  int fd_;
};

// Holds Responders handed out by a deferring handler until the test answers them.
struct PendingResponders {
  void Add(HttpResponder responder) {
    std::lock_guard lock(mu);
    responders.push_back(std::move(responder));
    cv.notify_all();
  }
  HttpResponder WaitForOne() {
    std::unique_lock lock(mu);
    REQUIRE(cv.wait_for(lock, std::chrono::seconds(10), [&] { return !responders.empty(); }));
    HttpResponder responder = std::move(responders.front());
    responders.erase(responders.begin());
    return responder;
  }
  std::mutex mu;
  std::condition_variable cv;
  std::vector<HttpResponder> responders;
};

}  // namespace

TEST_CASE("GET and POST round trip") {
  HttpServer server(Loopback(), Echo);
  REQUIRE(server.Start().ok());
  REQUIRE(server.port() != 0);

  HttpClient client("127.0.0.1", server.port());
  auto get = client.Request("GET", "/healthz?verbose=1");
  REQUIRE(get.ok());
  CHECK(get->status == 200);
  CHECK(get->content_type == "text/plain");
  CHECK(get->body == "GET /healthz?verbose=1 \n");

  auto post = client.Request("POST", "/v1/messages", "{\"text\":\"hi\"}");
  REQUIRE(post.ok());
  CHECK(post->status == 200);
  CHECK(post->body == "POST /v1/messages application/json\n{\"text\":\"hi\"}");

  // A batch-sized body survives intact.
  std::string big(1 << 20, '\0');
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>('a' + i % 26);
  auto large = client.Request("POST", "/v1/batch", big, "application/json; charset=utf-8");
  REQUIRE(large.ok());
  CHECK(large->body == "POST /v1/batch application/json; charset=utf-8\n" + big);
}

TEST_CASE("handler chooses status and content type; server header is set") {
  HttpServer server(Loopback(), [](HttpRequest&&, HttpResponder respond) {
    respond(HttpResponse{404, "application/problem+json", "{\"error\":\"no such thing\"}"});
  });
  REQUIRE(server.Start().ok());
  RawConnection raw(server.port());
  raw.Send("GET /nope HTTP/1.1\r\n" + Host(server.port()) + "Connection: close\r\n\r\n");
  const std::string reply = raw.ReadToEof();
  CHECK(reply.rfind("HTTP/1.1 404", 0) == 0);
  CHECK(reply.find("Server: relay\r\n") != std::string::npos);
  CHECK(reply.find("Content-Type: application/problem+json\r\n") != std::string::npos);
  CHECK(reply.find("Content-Length: 25\r\n") != std::string::npos);
  CHECK(reply.find("Connection: close\r\n") != std::string::npos);
}

TEST_CASE("keep-alive serves several requests on one connection") {
  std::atomic<int> calls{0};
  HttpServer server(Loopback(), [&](HttpRequest&& request, HttpResponder respond) {
    ++calls;
    Echo(std::move(request), std::move(respond));
  });
  REQUIRE(server.Start().ok());

  SECTION("client reuses its connection") {
    HttpClient client("127.0.0.1", server.port());
    for (int i = 0; i < 20; ++i) {
      auto response = client.Request("POST", "/n", std::to_string(i));
      REQUIRE(response.ok());
      CHECK(response->body == "POST /n application/json\n" + std::to_string(i));
    }
    CHECK(calls == 20);
  }
  SECTION("one raw connection gets every answer, then a close") {
    RawConnection raw(server.port());
    raw.Send("GET /a HTTP/1.1\r\n" + Host(server.port()) + "\r\n");
    std::string first = raw.ReadUntil("GET /a", 1);
    CHECK(first.find("HTTP/1.1 200") == 0);
    CHECK(first.find("Connection: close") == std::string::npos);
    raw.Send("GET /b HTTP/1.1\r\n" + Host(server.port()) + "Connection: close\r\n\r\n");
    std::string second = raw.ReadToEof();  // the server closes after answering
    CHECK(second.find("GET /b") != std::string::npos);
    CHECK(calls == 2);
  }
}

TEST_CASE("a response can be deferred and sent from another thread") {
  std::mutex mu;
  std::vector<std::thread> answerers;
  HttpServer server(Loopback(), [&](HttpRequest&& request, HttpResponder respond) {
    std::lock_guard lock(mu);
    answerers.emplace_back([body = std::move(request.body), respond = std::move(respond)] {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      respond(HttpResponse{202, "text/plain", "durable:" + body});
      respond(HttpResponse{500, "text/plain", "second call must be ignored"});
    });
  });
  REQUIRE(server.Start().ok());

  HttpClient client("127.0.0.1", server.port());
  for (int i = 0; i < 3; ++i) {
    const auto start = std::chrono::steady_clock::now();
    auto response = client.Request("POST", "/v1/messages", "m" + std::to_string(i));
    const auto elapsed = std::chrono::steady_clock::now() - start;
    REQUIRE(response.ok());
    CHECK(response->status == 202);
    CHECK(response->body == "durable:m" + std::to_string(i));
    CHECK(elapsed >= std::chrono::milliseconds(50));
  }
  server.Stop();
  for (auto& t : answerers) t.join();
}

TEST_CASE("a body over max_body is answered 413 without calling the handler") {
  std::atomic<int> calls{0};
  HttpServer::Options options = Loopback();
  options.max_body = 1024;
  HttpServer server(options, [&](HttpRequest&& request, HttpResponder respond) {
    ++calls;
    Echo(std::move(request), std::move(respond));
  });
  REQUIRE(server.Start().ok());

  HttpClient client("127.0.0.1", server.port());
  auto ok = client.Request("POST", "/small", std::string(1024, 'x'));  // exactly the limit
  REQUIRE(ok.ok());
  CHECK(ok->status == 200);
  CHECK(calls == 1);

  auto too_big = client.Request("POST", "/big", std::string(4096, 'x'));
  REQUIRE(too_big.ok());
  CHECK(too_big->status == 413);
  CHECK(too_big->content_type == "application/json");
  CHECK(too_big->body == "{\"error\":\"request body larger than 1024 bytes\"}");
  CHECK(calls == 1);

  // The server closed that connection; the client reconnects transparently.
  auto after = client.Request("GET", "/again");
  REQUIRE(after.ok());
  CHECK(after->status == 200);
  CHECK(calls == 2);

  SECTION("also when the client waits for 100-continue") {
    RawConnection raw(server.port());
    raw.Send("POST /big HTTP/1.1\r\n" + Host(server.port()) +
             "Content-Length: 100000\r\nExpect: 100-continue\r\n\r\n");
    const std::string reply = raw.ReadToEof();
    CHECK(reply.rfind("HTTP/1.1 413", 0) == 0);
    CHECK(calls == 2);
  }
  SECTION("100-continue is honoured for an acceptable body") {
    RawConnection raw(server.port());
    raw.Send("POST /c HTTP/1.1\r\n" + Host(server.port()) +
             "Content-Type: application/json\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"
             "Connection: close\r\n\r\n");
    CHECK(raw.ReadUntil("\r\n\r\n", 1) == "HTTP/1.1 100 Continue\r\n\r\n");
    raw.Send("hello");
    const std::string reply = raw.ReadToEof();
    CHECK(reply.rfind("HTTP/1.1 200", 0) == 0);
    CHECK(reply.find("\r\n\r\nPOST /c application/json\nhello") != std::string::npos);
    CHECK(calls == 3);
  }
}

TEST_CASE("bodies held past max_pending are refused 503 busy; body-less requests never are") {
  PendingResponders pending;
  std::atomic<int> busy{0};
  HttpServer::Options options = Loopback();
  options.max_body = 1000;
  options.max_pending = 1500;
  options.on_busy = [&] { ++busy; };
  HttpServer server(options, [&](HttpRequest&& request, HttpResponder respond) {
    if (request.target == "/hold") {
      pending.Add(std::move(respond));  // answered later: its body stays reserved
    } else {
      Echo(std::move(request), std::move(respond));
    }
  });
  REQUIRE(server.Start().ok());

  // 800 bytes held by an unanswered request.
  std::thread holder([&] {
    HttpClient c("127.0.0.1", server.port());
    auto r = c.Request("POST", "/hold", std::string(800, 'h'));
    REQUIRE(r.ok());
    CHECK(r->status == 202);
  });
  HttpResponder held = pending.WaitForOne();

  // 800 more would pass 1500: refused at once, with Retry-After, the handler not called.
  RawConnection raw(server.port());
  raw.Send("POST /more HTTP/1.1\r\n" + Host(server.port()) +
           "Content-Type: application/json\r\nContent-Length: 800\r\n\r\n" + std::string(800, 'm'));
  const std::string reply = raw.ReadToEof();
  CHECK(reply.rfind("HTTP/1.1 503", 0) == 0);
  CHECK(reply.find("Retry-After: 1\r\n") != std::string::npos);
  CHECK(reply.find("relay is busy: 800 bytes of requests are waiting") != std::string::npos);
  CHECK(busy == 1);

  HttpClient client("127.0.0.1", server.port());
  auto get = client.Request("GET", "/metrics");  // no body: reserves nothing
  REQUIRE(get.ok());
  CHECK(get->status == 200);
  auto small = client.Request("POST", "/small", std::string(700, 's'));  // 800 + 700 fits
  REQUIRE(small.ok());
  CHECK(small->status == 200);
  CHECK(busy == 1);

  // Answering the held request returns its reservation.
  held(HttpResponse{202, "text/plain", "done"});
  holder.join();
  auto big = client.Request("POST", "/again", std::string(1000, 'b'));
  REQUIRE(big.ok());
  CHECK(big->status == 200);
  CHECK(busy == 1);
  server.Stop();
}

TEST_CASE("malformed requests get 400 and the connection is closed") {
  std::atomic<int> calls{0};
  HttpServer server(Loopback(), [&](HttpRequest&& request, HttpResponder respond) {
    ++calls;
    Echo(std::move(request), std::move(respond));
  });
  REQUIRE(server.Start().ok());

  RawConnection raw(server.port());
  raw.Send(std::string("\x01\x02\x03 \xff garbage\r\n\r\n"));
  const std::string reply = raw.ReadToEof();  // returns only once the server closed
  CHECK(reply.rfind("HTTP/1.1 400", 0) == 0);
  CHECK(reply.find("{\"error\":\"malformed HTTP request: ") != std::string::npos);
  CHECK(reply.find("Connection: close") != std::string::npos);
  CHECK(calls == 0);

  // The server is still fine.
  HttpClient client("127.0.0.1", server.port());
  auto response = client.Request("GET", "/");
  REQUIRE(response.ok());
  CHECK(response->status == 200);
}

TEST_CASE("client errors name the address") {
  std::uint16_t port = 0;
  {
    HttpServer server(Loopback(), Echo);
    REQUIRE(server.Start().ok());
    port = server.port();
  }  // nothing listens on `port` any more
  HttpClient client("127.0.0.1", port);
  auto response = client.Request("GET", "/");
  REQUIRE_FALSE(response.ok());
  const std::string address = "127.0.0.1:" + std::to_string(port);
  CHECK(response.message().find("cannot connect to " + address) == 0);
  CHECK(response.message().find("refused") != std::string::npos);
}

TEST_CASE("Start reports an address that is already in use") {
  HttpServer first(Loopback(), Echo);
  REQUIRE(first.Start().ok());
  HttpServer::Options options = Loopback();
  options.port = first.port();
  HttpServer second(options, Echo);
  const relay::Status status = second.Start();
  REQUIRE_FALSE(status.ok());
  CHECK(status.message().find("cannot listen on 127.0.0.1:" + std::to_string(first.port()) +
                              ": ") == 0);
  CHECK(status.message().find("in use") != std::string::npos);
}

TEST_CASE("IPv6 loopback works for server and client", "[ipv6]") {
  HttpServer::Options options;
  options.host = "::1";
  HttpServer server(options, Echo);
  const relay::Status started = server.Start();
  if (!started.ok()) {
    WARN("no IPv6 loopback here: " << started.message());
    return;
  }
  HttpClient client("::1", server.port());
  auto response = client.Request("GET", "/v6");
  REQUIRE(response.ok());
  CHECK(response->body == "GET /v6 \n");
}

TEST_CASE("a Responder called after Stop or after the server is gone does nothing") {
  PendingResponders pending;
  auto server = std::make_unique<HttpServer>(
      Loopback(), [&](HttpRequest&&, HttpResponder respond) { pending.Add(std::move(respond)); });
  REQUIRE(server->Start().ok());

  std::future<bool> client_failed = std::async(std::launch::async, [port = server->port()] {
    HttpClient client("127.0.0.1", port);
    return !client.Request("POST", "/v1/messages", "x").ok();
  });
  HttpResponder responder = pending.WaitForOne();
  HttpResponder copy = responder;
  server->Stop();
  // Stop closed the connection, so the waiting client fails instead of hanging.
  REQUIRE(client_failed.wait_for(std::chrono::seconds(10)) == std::future_status::ready);
  CHECK(client_failed.get());

  responder(HttpResponse{200, "text/plain", "too late"});
  server->Stop();  // idempotent
  server.reset();
  copy(HttpResponse{200, "text/plain", "far too late"});
  std::thread([r = std::move(copy)] { r(HttpResponse{}); }).join();
  SUCCEED("no crash");
}

TEST_CASE("a dropped Responder closes the connection") {
  HttpServer server(Loopback(), [](HttpRequest&&, HttpResponder) {});
  REQUIRE(server.Start().ok());
  HttpClient client("127.0.0.1", server.port());
  auto response = client.Request("GET", "/");
  REQUIRE_FALSE(response.ok());
  CHECK(response.message().find("reading response from 127.0.0.1:") == 0);
}

TEST_CASE("max_connections refuses further connections") {
  HttpServer::Options options = Loopback();
  options.max_connections = 1;
  HttpServer server(options, Echo);
  REQUIRE(server.Start().ok());

  auto held = std::make_unique<HttpClient>("127.0.0.1", server.port());
  REQUIRE(held->Request("GET", "/first").ok());  // its connection stays open (keep-alive)

  HttpClient refused("127.0.0.1", server.port());
  CHECK_FALSE(refused.Request("GET", "/second").ok());

  held.reset();  // frees the slot once the server notices the close
  bool served = false;
  for (int i = 0; i < 200 && !served; ++i) {
    served = refused.Request("GET", "/third").ok();
    if (!served) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  CHECK(served);
}

TEST_CASE("many concurrent clients all get their own answers") {
  HttpServer server(Loopback(), Echo);
  REQUIRE(server.Start().ok());

  constexpr int kThreads = 8;
  constexpr int kRequests = 200;
  std::atomic<int> correct{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      HttpClient client("127.0.0.1", server.port());
      for (int i = 0; i < kRequests; ++i) {
        const std::string body = "thread " + std::to_string(t) + " request " + std::to_string(i);
        auto response = client.Request("POST", "/t" + std::to_string(t), body);
        if (response.ok() && response->status == 200 &&
            response->body == "POST /t" + std::to_string(t) + " application/json\n" + body) {
          ++correct;
        }
      }
    });
  }
  for (auto& thread : threads) thread.join();
  CHECK(correct == kThreads * kRequests);
}

// ---- access control and deadlines -----------------------------------------------------------

namespace {

constexpr char kToken[] = "0123456789abcdef0123456789abcdef";

// Records refusals by reason.
struct Refusals {
  void Add(relay::HttpRefusal reason, const std::string& message) {
    std::lock_guard lock(mu);
    reasons.push_back(reason);
    messages.push_back(message);
  }
  int Count(relay::HttpRefusal reason) {
    std::lock_guard lock(mu);
    int n = 0;
    for (auto r : reasons) n += r == reason;
    return n;
  }
  // The count once it reaches `n` (a deadline's callback may run just after the client saw
  // the close), or what it is after 2 s.
  int WaitCount(relay::HttpRefusal reason, int n) {
    for (int i = 0; i < 200 && Count(reason) < n; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    return Count(reason);
  }
  std::mutex mu;
  std::vector<relay::HttpRefusal> reasons;
  std::vector<std::string> messages;
};

HttpServer::Options Guarded(Refusals* refusals) {
  HttpServer::Options options = Loopback();
  options.authorize = [](std::string_view token) { return token == kToken; };
  options.on_refused = [refusals](relay::HttpRefusal reason, const std::string& message) {
    refusals->Add(reason, message);
  };
  return options;
}

// The status code of a raw reply ("HTTP/1.1 401 ..." -> 401), or 0.
int StatusOf(const std::string& reply) {
  if (reply.rfind("HTTP/1.", 0) != 0 || reply.size() < 12) return 0;
  return std::stoi(reply.substr(9, 3));
}

}  // namespace

TEST_CASE("without the bearer token only GET /healthz and /metrics are served") {
  Refusals refusals;
  std::atomic<int> calls{0};
  HttpServer server(Guarded(&refusals), [&](HttpRequest&& request, HttpResponder respond) {
    ++calls;
    Echo(std::move(request), std::move(respond));
  });
  REQUIRE(server.Start().ok());
  const std::uint16_t port = server.port();

  HttpClient anonymous("127.0.0.1", port);
  for (const char* path : {"/healthz", "/metrics", "/healthz?x=1"}) {
    auto r = anonymous.Request("GET", path);
    REQUIRE(r.ok());
    CHECK(r->status == 200);
  }
  CHECK(calls == 3);

  auto missing = anonymous.Request("POST", "/v1/messages", "{}");
  REQUIRE(missing.ok());
  CHECK(missing->status == 401);
  CHECK(missing->content_type == "application/json");
  CHECK(missing->body.find("missing 'Authorization: Bearer <token>' header") != std::string::npos);
  for (auto [method, path] : {std::pair{"GET", "/v1/status"}, std::pair{"POST", "/healthz"},
                              std::pair{"GET", "/no-such-endpoint"}}) {
    auto r = anonymous.Request(method, path);
    REQUIRE(r.ok());
    CHECK(r->status == 401);
  }
  CHECK(calls == 3);
  CHECK(refusals.Count(relay::HttpRefusal::kMissingToken) == 4);

  HttpClient wrong("127.0.0.1", port);
  wrong.SetBearerToken("0123456789abcdef0123456789abcdeX");
  auto w = wrong.Request("POST", "/v1/messages", "{}");
  REQUIRE(w.ok());
  CHECK(w->status == 401);
  CHECK(w->body.find("wrong token") != std::string::npos);
  HttpClient truncated("127.0.0.1", port);
  truncated.SetBearerToken(std::string(kToken).substr(0, 31));
  auto t = truncated.Request("GET", "/v1/status");
  REQUIRE(t.ok());
  CHECK(t->status == 401);
  CHECK(refusals.Count(relay::HttpRefusal::kWrongToken) == 2);
  for (const std::string& m : refusals.messages) CHECK(m.find(kToken) == std::string::npos);
  CHECK(calls == 3);

  HttpClient right("127.0.0.1", port);
  right.SetBearerToken(kToken);
  auto ok = right.Request("POST", "/v1/messages", "{}");
  REQUIRE(ok.ok());
  CHECK(ok->status == 200);
  CHECK(calls == 4);

  SECTION("the challenge and the scheme") {
    RawConnection raw(port);
    raw.Send("GET /v1/status HTTP/1.1\r\n" + Host(port) + "\r\n");
    const std::string reply = raw.ReadToEof();
    CHECK(StatusOf(reply) == 401);
    CHECK(reply.find("WWW-Authenticate: Bearer realm=\"relay\"\r\n") != std::string::npos);
    CHECK(reply.find("Connection: close") != std::string::npos);

    RawConnection bad(port);
    bad.Send("GET /v1/status HTTP/1.1\r\n" + Host(port) + "Authorization: Bearer wrong\r\n\r\n");
    CHECK(bad.ReadToEof().find("error=\"invalid_token\"") != std::string::npos);

    RawConnection lower(port);  // the scheme is case-insensitive
    lower.Send("GET /x HTTP/1.1\r\n" + Host(port) + "Authorization: bearer   " + kToken +
               "\r\nConnection: close\r\n\r\n");
    CHECK(StatusOf(lower.ReadToEof()) == 200);

    for (const std::string& auth :
         {std::string("Basic ") + kToken, std::string(kToken), std::string("Bearer"),
          std::string("Bearer ") + kToken + "\r\nAuthorization: Bearer " + kToken}) {
      RawConnection other(port);
      other.Send("GET /x HTTP/1.1\r\n" + Host(port) + "Authorization: " + auth + "\r\n\r\n");
      CHECK(StatusOf(other.ReadToEof()) == 401);
    }
  }
}

TEST_CASE("refused requests reserve nothing: a flood of unauthenticated bodies never makes 503") {
  Refusals refusals;
  std::atomic<int> busy{0};
  HttpServer::Options options = Guarded(&refusals);
  options.max_body = 1000;
  options.max_pending = 1000;
  options.on_busy = [&] { ++busy; };
  HttpServer server(options, Echo);
  REQUIRE(server.Start().ok());
  const std::uint16_t port = server.port();

  // Each announces a whole max_pending of body and sends none of it: answered at the header.
  std::vector<std::unique_ptr<RawConnection>> flood;
  for (int i = 0; i < 8; ++i) {
    flood.push_back(std::make_unique<RawConnection>(port));
    flood.back()->Send("POST /v1/messages HTTP/1.1\r\n" + Host(port) +
                       "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n");
    CHECK(StatusOf(flood.back()->ReadUntil("\r\n\r\n", 1)) == 401);
  }
  HttpClient client("127.0.0.1", port);
  client.SetBearerToken(kToken);
  auto r = client.Request("POST", "/v1/messages", std::string(1000, 'x'));
  REQUIRE(r.ok());
  CHECK(r->status == 200);
  CHECK(busy == 0);
  CHECK(refusals.Count(relay::HttpRefusal::kMissingToken) == 8);
}

TEST_CASE("a Host that does not name the server is refused (DNS rebinding)") {
  Refusals refusals;
  std::atomic<int> calls{0};
  HttpServer::Options options = Guarded(&refusals);
  options.allowed_hosts = {"relay.example.internal"};
  HttpServer server(options, [&](HttpRequest&& request, HttpResponder respond) {
    ++calls;
    Echo(std::move(request), std::move(respond));
  });
  REQUIRE(server.Start().ok());
  const std::uint16_t port = server.port();
  const std::string p = std::to_string(port);
  auto status_for = [&](const std::string& host_lines, const std::string& version = "1.1") {
    RawConnection raw(port);
    raw.Send("GET /healthz HTTP/" + version + "\r\n" + host_lines + "Connection: close\r\n\r\n");
    return StatusOf(raw.ReadToEof());
  };
  CHECK(status_for("Host: 127.0.0.1:" + p + "\r\n") == 200);
  CHECK(status_for("Host: localhost:" + p + "\r\n") == 200);
  CHECK(status_for("Host: LocalHost:" + p + "\r\n") == 200);
  CHECK(status_for("Host: relay.example.internal:" + p + "\r\n") == 200);
  CHECK(status_for("Host: RELAY.example.internal:" + p + "\r\n") == 200);
  CHECK(status_for("", "1.0") == 200);  // HTTP/1.0 without Host: no browser sends that
  const int served = calls;
  CHECK(status_for("Host: evil.example:" + p + "\r\n") == 403);
  CHECK(status_for("Host: evil.example\r\n") == 403);
  CHECK(status_for("Host: 127.0.0.1\r\n") == 403);             // port 80
  CHECK(status_for("Host: 127.0.0.1:1" + p + "\r\n") == 403);  // another port
  CHECK(status_for("Host: 127.0.0.2:" + p + "\r\n") == 403);   // not the local address
  CHECK(status_for("Host: [::1]:" + p + "\r\n") == 403);       // not this connection's
  CHECK(status_for("Host: 0.0.0.0:" + p + "\r\n") == 403);
  CHECK(status_for("Host: localhost.evil.example:" + p + "\r\n") == 403);
  CHECK(status_for("Host: 127.0.0.1:" + p + ".evil\r\n") == 403);
  CHECK(status_for("Host: ::1:" + p + "\r\n") == 403);  // IPv6 without brackets
  CHECK(status_for("Host: :" + p + "\r\n") == 403);
  CHECK(status_for("") == 400);  // HTTP/1.1 requires Host
  CHECK(status_for("Host: 127.0.0.1:" + p + "\r\nHost: evil.example:" + p + "\r\n") == 400);
  CHECK(calls == served);
  CHECK(refusals.Count(relay::HttpRefusal::kHost) == 13);

  RawConnection raw(port);  // with a token too: the Host check comes first
  raw.Send("GET /v1/status HTTP/1.1\r\nHost: evil.example:" + p + "\r\nAuthorization: Bearer " +
           kToken + "\r\n\r\n");
  const std::string reply = raw.ReadToEof();
  CHECK(StatusOf(reply) == 403);
  CHECK(reply.find("{\"error\":\"Host 'evil.example:" + p + "' does not name this relay") !=
        std::string::npos);
  CHECK(calls == served);
}

TEST_CASE("a wildcard listen accepts the address the client connected to") {
  HttpServer::Options options;
  options.host = "0.0.0.0";
  HttpServer server(options, Echo);
  REQUIRE(server.Start().ok());
  const std::string p = std::to_string(server.port());
  for (auto [host, status] :
       {std::pair{"127.0.0.1:" + p, 200}, std::pair{"localhost:" + p, 200},
        std::pair{"0.0.0.0:" + p, 403}, std::pair{"evil.example:" + p, 403}}) {
    RawConnection raw(server.port());
    raw.Send("GET /x HTTP/1.1\r\nHost: " + host + "\r\nConnection: close\r\n\r\n");
    CHECK(StatusOf(raw.ReadToEof()) == status);
  }
}

TEST_CASE("IPv6: the bracketed literal of the listen address is accepted", "[ipv6]") {
  HttpServer::Options options;
  options.host = "::1";
  HttpServer server(options, Echo);
  if (!server.Start().ok()) {
    WARN("no IPv6 loopback here");
    return;
  }
  HttpClient client("::1", server.port());  // sends Host: [::1]:port
  auto r = client.Request("GET", "/v6");
  REQUIRE(r.ok());
  CHECK(r->status == 200);
}

TEST_CASE("requests from web pages are refused: Origin and Sec-Fetch-Site") {
  Refusals refusals;
  std::atomic<int> calls{0};
  HttpServer server(Guarded(&refusals), [&](HttpRequest&& request, HttpResponder respond) {
    ++calls;
    Echo(std::move(request), std::move(respond));
  });
  REQUIRE(server.Start().ok());
  const std::uint16_t port = server.port();
  const std::string p = std::to_string(port);
  auto status_for = [&](const std::string& lines) {
    RawConnection raw(port);
    raw.Send("POST /v1/messages HTTP/1.1\r\n" + Host(port) + lines + "Authorization: Bearer " +
             kToken +
             "\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
             "Connection: close\r\n\r\n{}");
    return StatusOf(raw.ReadToEof());
  };
  CHECK(status_for("") == 200);
  CHECK(status_for("Origin: http://127.0.0.1:" + p + "\r\n") == 200);
  CHECK(status_for("Sec-Fetch-Site: same-origin\r\n") == 200);
  CHECK(status_for("Sec-Fetch-Site: none\r\n") == 200);
  const int served = calls;
  CHECK(status_for("Origin: http://evil.example\r\n") == 403);
  CHECK(status_for("Origin: null\r\n") == 403);
  CHECK(status_for("Origin: https://127.0.0.1:" + p + "\r\n") == 403);
  CHECK(status_for("Origin: http://localhost:3000\r\n") == 403);
  CHECK(status_for("Sec-Fetch-Site: cross-site\r\n") == 403);
  CHECK(status_for("Sec-Fetch-Site: same-site\r\n") == 403);
  CHECK(calls == served);
  CHECK(refusals.Count(relay::HttpRefusal::kOrigin) == 6);
}

TEST_CASE("a body must be declared application/json") {
  Refusals refusals;
  std::atomic<int> calls{0};
  HttpServer server(Guarded(&refusals), [&](HttpRequest&& request, HttpResponder respond) {
    ++calls;
    Echo(std::move(request), std::move(respond));
  });
  REQUIRE(server.Start().ok());
  HttpClient client("127.0.0.1", server.port());
  client.SetBearerToken(kToken);
  for (const char* type :
       {"application/json", "application/json; charset=utf-8", "Application/JSON;charset=UTF-8"}) {
    auto r = client.Request("POST", "/v1/messages", "{}", type);
    REQUIRE(r.ok());
    CHECK(r->status == 200);
  }
  for (const char* type : {"text/plain", "application/x-www-form-urlencoded",
                           "multipart/form-data; boundary=x", "application/jsonx", ""}) {
    auto r = client.Request("POST", "/v1/messages", "{}", type);
    REQUIRE(r.ok());
    CHECK(r->status == 415);
    CHECK(r->body.find("application/json") != std::string::npos);
  }
  CHECK(calls == 3);
  CHECK(refusals.Count(relay::HttpRefusal::kContentType) == 5);
  // A request without a body needs no Content-Type.
  RawConnection raw(server.port());
  raw.Send("POST /v1/x HTTP/1.1\r\n" + Host(server.port()) + "Authorization: Bearer " + kToken +
           "\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
  CHECK(StatusOf(raw.ReadToEof()) == 200);
}

TEST_CASE("a header not complete by its deadline closes the connection and costs nothing") {
  Refusals refusals;
  HttpServer::Options options = Guarded(&refusals);
  options.header_timeout = std::chrono::milliseconds(300);
  HttpServer server(options, Echo);
  REQUIRE(server.Start().ok());
  const std::uint16_t port = server.port();

  SECTION("a connection that sends nothing") {
    RawConnection raw(port);
    const auto t0 = std::chrono::steady_clock::now();
    CHECK(raw.ReadToEof().empty());
    const auto waited = std::chrono::steady_clock::now() - t0;
    CHECK(waited >= std::chrono::milliseconds(250));
    CHECK(waited < std::chrono::seconds(3));
  }
  SECTION("a header trickled byte by byte") {
    RawConnection raw(port);
    const std::string header = "GET /healthz HTTP/1.1\r\n" + Host(port) + "X-Slow: ";
    const auto t0 = std::chrono::steady_clock::now();
    bool closed = false;
    for (int i = 0; i < 200 && !closed; ++i) {
      closed = ::send(raw.fd(), "a", 1, MSG_NOSIGNAL) != 1;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      if (i == 0) raw.Send(header);
    }
    CHECK(closed);
    CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(3));
  }
  CHECK(refusals.WaitCount(relay::HttpRefusal::kHeaderTimeout, 1) == 1);
  // The server still serves others.
  HttpClient client("127.0.0.1", port);
  auto r = client.Request("GET", "/healthz");
  REQUIRE(r.ok());
  CHECK(r->status == 200);
}

TEST_CASE("a body not complete by its deadline closes the connection and releases its bytes") {
  Refusals refusals;
  std::atomic<int> busy{0};
  HttpServer::Options options = Guarded(&refusals);
  options.max_body = 1000;
  options.max_pending = 1000;
  options.body_timeout = std::chrono::milliseconds(300);
  options.on_busy = [&] { ++busy; };
  HttpServer server(options, Echo);
  REQUIRE(server.Start().ok());
  const std::uint16_t port = server.port();

  RawConnection slow(port);
  slow.Send("POST /v1/messages HTTP/1.1\r\n" + Host(port) + "Authorization: Bearer " + kToken +
            "\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n[");
  // While it holds all of max_pending, another body is refused busy...
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  HttpClient client("127.0.0.1", port);
  client.SetBearerToken(kToken);
  auto refused = client.Request("POST", "/v1/messages", std::string(10, ' '));
  REQUIRE(refused.ok());
  CHECK(refused->status == 503);
  // ... until its deadline closes it (300 ms + 1000 bytes at 1 MiB/s).
  const auto t0 = std::chrono::steady_clock::now();
  CHECK(slow.ReadToEof().empty());
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(3));
  CHECK(refusals.WaitCount(relay::HttpRefusal::kBodyTimeout, 1) == 1);
  auto after = client.Request("POST", "/v1/messages", std::string(1000, ' '));
  REQUIRE(after.ok());
  CHECK(after->status == 200);
  CHECK(busy == 1);
}

TEST_CASE("a kept-alive connection is closed after idle_timeout, without a refusal") {
  Refusals refusals;
  HttpServer::Options options = Guarded(&refusals);
  options.idle_timeout = std::chrono::milliseconds(300);
  options.header_timeout = std::chrono::milliseconds(5000);
  HttpServer server(options, Echo);
  REQUIRE(server.Start().ok());
  RawConnection raw(server.port());
  raw.Send("GET /healthz HTTP/1.1\r\n" + Host(server.port()) + "\r\n");
  CHECK(StatusOf(raw.ReadUntil("/healthz \n", 1)) == 200);  // the end of Echo's body
  const auto t0 = std::chrono::steady_clock::now();
  raw.ReadToEof();
  const auto waited = std::chrono::steady_clock::now() - t0;
  CHECK(waited >= std::chrono::milliseconds(200));
  CHECK(waited < std::chrono::seconds(3));
  CHECK(refusals.reasons.empty());
}
