#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <poll.h>

#include <catch2/catch.hpp>
#include <condition_variable>
#include <map>
#include <mutex>
#include <thread>
#include <vector>
#include <zmq.hpp>

#include "crypto/frame.h"
#include "transports/zmq_link.h"

#include "tests/test_util.h"

using relay::testing::FreePort;
using relay::testing::TempDir;

namespace {

using namespace std::chrono_literals;
using relay::crypto::ControlType;
using relay::crypto::PublicIdentity;
using relay::crypto::SiteKey;
using relay::transports::LinkPeer;
using relay::transports::LinkRefusal;
using relay::transports::ZmqLink;
using relay::transports::ZmqLinkOptions;

struct Recorder : relay::transports::LinkHandler {
  std::mutex mu;
  std::condition_variable cv;
  int ups = 0, downs = 0;
  bool up = false;
  std::uint64_t epoch = 0;
  std::vector<std::size_t> up_peers;  // the peer of each OnLinkUp
  std::vector<std::string> frames;
  std::vector<std::uint64_t> acks;
  std::vector<std::string> rejected;
  std::map<LinkRefusal, int> refused;
  std::vector<std::string> refusal_messages;
  void OnLinkUp(std::size_t peer, std::uint64_t e) override {
    std::lock_guard<std::mutex> l(mu);
    ++ups;
    up = true;
    epoch = e;
    up_peers.push_back(peer);
    cv.notify_all();
  }
  void OnLinkDown(std::size_t) override {
    std::lock_guard<std::mutex> l(mu);
    ++downs;
    up = false;
    cv.notify_all();
  }
  void OnFrame(std::size_t, std::string b) override {
    std::lock_guard<std::mutex> l(mu);
    frames.push_back(std::move(b));
    cv.notify_all();
  }
  void OnAck(std::size_t, std::uint64_t s, bool) override {
    std::lock_guard<std::mutex> l(mu);
    acks.push_back(s);
    cv.notify_all();
  }
  void OnRejectedControl(const std::string& reason, const std::string&) override {
    std::lock_guard<std::mutex> l(mu);
    rejected.push_back(reason);
    cv.notify_all();
  }
  void OnLinkRefused(LinkRefusal reason, const std::string& message) override {
    std::lock_guard<std::mutex> l(mu);
    ++refused[reason];
    refusal_messages.push_back(message);
    cv.notify_all();
  }
  int Refused(LinkRefusal reason) {
    std::lock_guard<std::mutex> l(mu);
    return refused[reason];
  }
  template <typename P>
  bool Wait(P pred, std::chrono::milliseconds limit = 10s) {
    std::unique_lock<std::mutex> l(mu);
    return cv.wait_for(l, limit, pred);
  }
};

ZmqLinkOptions Fast(const std::string& listen = "") {
  ZmqLinkOptions o;
  o.listen = listen;
  o.heartbeat_interval = 100ms;
  o.peer_timeout = 600ms;
  return o;
}

std::string Endpoint() { return "tcp://127.0.0.1:" + std::to_string(FreePort()); }

std::string Hello(const SiteKey& from, const PublicIdentity& to,
                  ControlType type = ControlType::kHello, std::string_view body = {}) {
  return relay::crypto::SealControl(from, to, type, 1764129324000, body);
}

// A bare ZeroMQ CURVE client that authenticates with `as`'s box key and sends whatever a test
// wants: an attacker who holds that key, or a stranger.
struct RawClient {
  zmq::context_t ctx{1};
  zmq::socket_t s{ctx, zmq::socket_type::dealer};
  RawClient(const SiteKey& as, const PublicIdentity& server, const std::string& endpoint) {
    s.set(zmq::sockopt::linger, 0);
    REQUIRE(zmq_setsockopt(s.handle(), ZMQ_CURVE_SERVERKEY, server.box_pk.data(), 32) == 0);
    REQUIRE(zmq_setsockopt(s.handle(), ZMQ_CURVE_PUBLICKEY, as.identity().box_pk.data(), 32) == 0);
    as.LendBoxSecret([&](const std::uint8_t* secret) {
      REQUIRE(zmq_setsockopt(s.handle(), ZMQ_CURVE_SECRETKEY, secret, 32) == 0);
    });
    s.connect(endpoint);
  }
  void Send(const std::string& bytes) { s.send(zmq::buffer(bytes), zmq::send_flags::none); }
  // Every message that arrives within `limit`.
  std::vector<std::string> Received(std::chrono::milliseconds limit) {
    std::vector<std::string> out;
    auto end = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < end) {
      zmq::pollitem_t item{s.handle(), 0, ZMQ_POLLIN, 0};
      zmq::poll(&item, 1, 20ms);
      zmq::message_t m;
      while (s.recv(m, zmq::recv_flags::dontwait)) out.push_back(m.to_string());
    }
    return out;
  }
};

// The control message types among received messages (frames count as 0), without pings.
std::vector<int> Types(const std::vector<std::string>& messages) {
  std::vector<int> out;
  for (const auto& m : messages) {
    int type = m.size() > 5 && m.rfind("RLYC", 0) == 0 ? m[5] : 0;
    if (type != static_cast<int>(ControlType::kPing)) out.push_back(type);
  }
  return out;
}

}  // namespace

TEST_CASE("two links say hello, carry frames both ways and signed acks") {
  REQUIRE(relay::crypto::Init().ok());
  auto a = relay::crypto::SiteKey::Generate(), b = relay::crypto::SiteKey::Generate();
  std::string ep = "tcp://127.0.0.1:" + std::to_string(FreePort());
  Recorder ra, rb;
  ZmqLink listener(b, {{"a", a.identity(), "", std::nullopt}}, Fast(ep), &rb);
  ZmqLink dialer(a, {{"b", b.identity(), ep, std::nullopt}}, Fast(), &ra);
  REQUIRE(listener.Start().ok());
  REQUIRE(dialer.Start().ok());
  REQUIRE(ra.Wait([&] { return ra.up; }));
  REQUIRE(rb.Wait([&] { return rb.up; }));
  CHECK(dialer.IsUp(0));

  std::string frame = relay::crypto::SealFrame(a, b.identity(), 1, 1, 0, "");
  dialer.SendFrame(0, ra.epoch, frame);
  REQUIRE(rb.Wait([&] { return rb.frames.size() == 1; }));
  CHECK(rb.frames[0] == frame);
  listener.SendAck(0, 1);
  REQUIRE(ra.Wait([&] { return ra.acks.size() == 1; }));
  CHECK(ra.acks[0] == 1);

  // The listener can send to the dialer over the same connection.
  std::string back = relay::crypto::SealFrame(b, a.identity(), 1, 1, 0, "");
  listener.SendFrame(0, rb.epoch, back);
  REQUIRE(ra.Wait([&] { return ra.frames.size() == 1; }));

  // A frame for an epoch that is over is dropped.
  dialer.SendFrame(0, ra.epoch + 100, frame);
  std::this_thread::sleep_for(200ms);
  CHECK(rb.frames.size() == 1);
  CHECK(listener.LastContactMs(0) > 0);
}

TEST_CASE("a restarted listener is detected and the link comes back with a new epoch") {
  REQUIRE(relay::crypto::Init().ok());
  auto a = relay::crypto::SiteKey::Generate(), b = relay::crypto::SiteKey::Generate();
  std::string ep = "tcp://127.0.0.1:" + std::to_string(FreePort());
  Recorder ra;
  ZmqLink dialer(a, {{"b", b.identity(), ep, std::nullopt}}, Fast(), &ra);
  REQUIRE(dialer.Start().ok());
  std::uint64_t first_epoch;
  {
    Recorder rb;
    ZmqLink listener(b, {{"a", a.identity(), "", std::nullopt}}, Fast(ep), &rb);
    REQUIRE(listener.Start().ok());
    REQUIRE(ra.Wait([&] { return ra.up; }));
    first_epoch = ra.epoch;
  }
  // Listener gone: the dialer notices by missing heartbeats.
  REQUIRE(ra.Wait([&] { return !ra.up; }));
  CHECK(ra.downs == 1);
  Recorder rb2;
  ZmqLink listener2(b, {{"a", a.identity(), "", std::nullopt}}, Fast(ep), &rb2);
  REQUIRE(listener2.Start().ok());
  REQUIRE(ra.Wait([&] { return ra.up; }));
  CHECK(ra.epoch > first_epoch);
  std::string frame = relay::crypto::SealFrame(a, b.identity(), 1, 1, 0, "");
  dialer.SendFrame(0, ra.epoch, frame);
  REQUIRE(rb2.Wait([&] { return rb2.frames.size() == 1; }));
}

TEST_CASE("a dialer with a key the listener does not know never comes up") {
  REQUIRE(relay::crypto::Init().ok());
  auto a = relay::crypto::SiteKey::Generate(), b = relay::crypto::SiteKey::Generate();
  auto rogue = relay::crypto::SiteKey::Generate();
  std::string ep = Endpoint();
  Recorder rb, rr;
  ZmqLink listener(b, {{"a", a.identity(), "", std::nullopt}}, Fast(ep), &rb);
  ZmqLink dialer(rogue, {{"b", b.identity(), ep, std::nullopt}}, Fast(), &rr);
  REQUIRE(listener.Start().ok());
  REQUIRE(dialer.Start().ok());
  // Refused by ZAP before any relay message is read: nothing to reject, nothing answered.
  REQUIRE(rb.Wait([&] { return rb.refused[LinkRefusal::kUnknownKey] > 0; }));
  REQUIRE(rr.Wait([&] { return rr.refused[LinkRefusal::kDialFailed] > 0; }));
  std::this_thread::sleep_for(300ms);
  CHECK_FALSE(rr.up);
  CHECK_FALSE(rb.up);
  CHECK(rb.rejected.empty());
  {
    std::lock_guard<std::mutex> l(rr.mu);
    CHECK_THAT(rr.refusal_messages[0], Catch::Contains("refused this site's CURVE key"));
  }
  // libzmq does not retry after a ZAP refusal; the link makes a new socket now and then.
  REQUIRE(rb.Wait([&] { return rb.refused[LinkRefusal::kUnknownKey] >= 2; }, 5s));
}

TEST_CASE("a stranger's key gets no answer, no link and no frames") {
  // Attack: a party without a configured peer's key connects and sends a peer's hello, pings
  // and frames; safe outcome: ZAP refuses the connection, nothing reaches the handler, nothing
  // is sent back.
  REQUIRE(relay::crypto::Init().ok());
  auto a = SiteKey::Generate(), b = SiteKey::Generate(), stranger = SiteKey::Generate();
  std::string ep = Endpoint();
  Recorder rb;
  ZmqLink listener(b, {{"a", a.identity(), "", std::nullopt}}, Fast(ep), &rb);
  REQUIRE(listener.Start().ok());
  RawClient raw(stranger, b.identity(), ep);
  raw.Send(Hello(a, b.identity()));  // a's own, valid hello
  raw.Send(Hello(stranger, b.identity()));
  raw.Send(Hello(a, b.identity(), ControlType::kPing));
  raw.Send(relay::crypto::SealFrame(a, b.identity(), 1, 1, 0, ""));
  REQUIRE(rb.Wait([&] { return rb.refused[LinkRefusal::kUnknownKey] > 0; }));
  CHECK(raw.Received(800ms).empty());
  std::lock_guard<std::mutex> l(rb.mu);
  CHECK(rb.ups == 0);
  CHECK(rb.frames.empty());
  CHECK(rb.rejected.empty());
  CHECK(rb.refused[LinkRefusal::kUnregistered] == 0);
  CHECK_THAT(rb.refusal_messages[0], Catch::Contains("is not the box key of a configured peer"));
}

TEST_CASE("a connection authenticated as one peer cannot speak for another") {
  // Attack: configured peer c, authenticated as itself, sends messages signed by peer a (a
  // replayed hello, ping, ack and frame); safe outcome: each is refused as sender_mismatch, no
  // route or link for a, nothing answered; a's own hello on its own connection still works.
  REQUIRE(relay::crypto::Init().ok());
  auto a = SiteKey::Generate(), b = SiteKey::Generate(), c = SiteKey::Generate();
  std::string ep = Endpoint();
  Recorder rb;
  ZmqLink listener(b,
                   {{"a", a.identity(), "", std::nullopt}, {"c", c.identity(), "", std::nullopt}},
                   Fast(ep), &rb);
  REQUIRE(listener.Start().ok());
  RawClient as_c(c, b.identity(), ep);
  as_c.Send(Hello(a, b.identity()));
  as_c.Send(Hello(a, b.identity(), ControlType::kPing));
  as_c.Send(Hello(a, b.identity(), ControlType::kAck, std::string(7, '\0') + '\x05'));
  as_c.Send(relay::crypto::SealFrame(a, b.identity(), 1, 1, 0, ""));
  REQUIRE(rb.Wait([&] { return rb.refused[LinkRefusal::kSenderMismatch] == 4; }));
  CHECK(as_c.Received(500ms).empty());
  {
    std::lock_guard<std::mutex> l(rb.mu);
    CHECK(rb.ups == 0);
    CHECK(rb.frames.empty());
    CHECK(rb.acks.empty());
    CHECK_THAT(rb.refusal_messages[0],
               Catch::Contains("hello signed as peer 'a' arrived on a connection from") &&
                   Catch::Contains("authenticated as peer 'c'"));
  }
  CHECK(listener.LastContactMs(0) == 0);
  // The same bytes are fine from a: c's connection gained nothing, a's works.
  RawClient as_a(a, b.identity(), ep);
  as_a.Send(Hello(a, b.identity()));
  REQUIRE(rb.Wait([&] { return rb.ups == 1; }));
  CHECK(rb.up_peers == std::vector<std::size_t>{0});
  CHECK(Types(as_a.Received(300ms)) == std::vector<int>{2});  // hello_ack
  listener.SendFrame(0, rb.epoch, relay::crypto::SealFrame(b, a.identity(), 1, 1, 0, ""));
  CHECK(Types(as_a.Received(300ms)) == std::vector<int>{0});  // the frame
  CHECK(as_c.Received(200ms).empty());
}

TEST_CASE("a hello replayed from another connection takes nothing over") {
  // Attack: while a is linked to b, its hello is replayed from other connections (a stranger's,
  // and configured peer c's); safe outcome: a keeps its route and epoch, b's frames for a go
  // to a only, the replayers get nothing.
  REQUIRE(relay::crypto::Init().ok());
  auto a = SiteKey::Generate(), b = SiteKey::Generate(), c = SiteKey::Generate();
  auto stranger = SiteKey::Generate();
  std::string ep = Endpoint();
  Recorder ra, rb;
  ZmqLink listener(b,
                   {{"a", a.identity(), "", std::nullopt}, {"c", c.identity(), "", std::nullopt}},
                   Fast(ep), &rb);
  ZmqLink dialer(a, {{"b", b.identity(), ep, std::nullopt}}, Fast(), &ra);
  REQUIRE(listener.Start().ok());
  REQUIRE(dialer.Start().ok());
  REQUIRE(ra.Wait([&] { return ra.up; }));
  REQUIRE(rb.Wait([&] { return rb.up; }));
  const std::uint64_t epoch = rb.epoch;
  const std::string hello = Hello(a, b.identity());
  RawClient from_stranger(stranger, b.identity(), ep);
  RawClient from_c(c, b.identity(), ep);
  for (int i = 0; i < 10; ++i) {
    from_stranger.Send(hello);
    from_c.Send(hello);
  }
  REQUIRE(rb.Wait([&] { return rb.refused[LinkRefusal::kSenderMismatch] == 10; }));
  for (std::uint64_t seq = 1; seq <= 5; ++seq)
    listener.SendFrame(0, epoch, relay::crypto::SealFrame(b, a.identity(), seq, seq, 0, ""));
  REQUIRE(ra.Wait([&] { return ra.frames.size() == 5; }));
  CHECK(from_stranger.Received(300ms).empty());
  CHECK(from_c.Received(300ms).empty());
  std::lock_guard<std::mutex> l(rb.mu);
  CHECK(rb.ups == 1);
  CHECK(rb.epoch == epoch);
  CHECK(rb.refused[LinkRefusal::kUnknownKey] >= 1);
}

TEST_CASE("messages from a connection without hello draw at most one rehello per interval") {
  // Attack: a holder of a's key floods pings and frames on a connection that never says hello;
  // safe outcome: each is refused (unregistered), at most one signed rehello per second goes back.
  REQUIRE(relay::crypto::Init().ok());
  auto a = SiteKey::Generate(), b = SiteKey::Generate();
  std::string ep = Endpoint();
  Recorder rb;
  ZmqLink listener(b, {{"a", a.identity(), "", std::nullopt}}, Fast(ep), &rb);
  REQUIRE(listener.Start().ok());
  RawClient raw(a, b.identity(), ep);
  for (int i = 0; i < 20; ++i) raw.Send(Hello(a, b.identity(), ControlType::kPing));
  for (int i = 0; i < 5; ++i) raw.Send(relay::crypto::SealFrame(a, b.identity(), 1, 1, 0, ""));
  REQUIRE(rb.Wait([&] { return rb.refused[LinkRefusal::kUnregistered] == 25; }));
  CHECK(Types(raw.Received(400ms)) == std::vector<int>{5});
  std::this_thread::sleep_for(700ms);  // the interval (1 s) has passed
  raw.Send(Hello(a, b.identity(), ControlType::kPing));
  CHECK(Types(raw.Received(400ms)) == std::vector<int>{5});
  std::lock_guard<std::mutex> l(rb.mu);
  CHECK(rb.ups == 0);
  CHECK(rb.frames.empty());
  CHECK(listener.LastContactMs(0) == 0);
}

// A connection to the listener on loopback that sends `bytes`; -1 if it cannot connect.
int SendRaw(std::uint16_t port, std::string_view bytes) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(port);
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0 ||
      send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(bytes.size())) {
    close(fd);
    return -1;
  }
  return fd;
}

// Whether the other end closed fd within `limit` (reads until EOF or an error).
bool ClosedByPeer(int fd, std::chrono::milliseconds limit) {
  const auto end = std::chrono::steady_clock::now() + limit;
  char buf[256];
  while (std::chrono::steady_clock::now() < end) {
    pollfd pfd{fd, POLLIN, 0};
    if (poll(&pfd, 1, 20) <= 0) continue;
    if (read(fd, buf, sizeof buf) <= 0) return true;
  }
  return false;
}

TEST_CASE("pending connections are bounded per address and in time") {
  // Attack: silent TCP connections to the listener; safe outcome: beyond the bound the oldest
  // are closed at once, the rest after handshake_timeout, and a real peer still links up.
  REQUIRE(relay::crypto::Init().ok());
  auto a = SiteKey::Generate(), b = SiteKey::Generate();
  const std::uint16_t port = FreePort();
  std::string ep = "tcp://127.0.0.1:" + std::to_string(port);
  Recorder ra, rb;
  ZmqLinkOptions o = Fast(ep);
  o.max_pending_per_address = 4;
  o.handshake_timeout = 1500ms;
  ZmqLink listener(b, {{"a", a.identity(), "", std::nullopt}}, o, &rb);
  REQUIRE(listener.Start().ok());
  std::vector<int> socks;
  for (int i = 0; i < 20; ++i) {
    socks.push_back(SendRaw(port, ""));  // silent
    REQUIRE(socks.back() >= 0);
  }
  // Closed by the listener: reading gives EOF (after the 64-byte-or-less greeting it sent).
  auto closed = [&](int fd) {
    char buf[256];
    while (true) {
      pollfd pfd{fd, POLLIN, 0};
      if (poll(&pfd, 1, 0) <= 0) return false;
      ssize_t n = read(fd, buf, sizeof buf);
      if (n <= 0) return true;
    }
  };
  auto count_closed = [&] {
    int n = 0;
    for (int fd : socks) n += closed(fd) ? 1 : 0;
    return n;
  };
  int early = 0;
  for (int i = 0; i < 50 && early < 16; ++i) {
    std::this_thread::sleep_for(20ms);
    early = count_closed();
  }
  CHECK(early == 16);
  CHECK(rb.Refused(LinkRefusal::kConnectionLimit) == 16);
  // The newest 4 are still open; the peer's own connection is newer still, pushes out the
  // oldest of them and gets through.
  ZmqLink dialer(a, {{"b", b.identity(), ep, std::nullopt}}, Fast(), &ra);
  REQUIRE(dialer.Start().ok());
  REQUIRE(rb.Wait([&] { return rb.up; }));
  CHECK(rb.Refused(LinkRefusal::kConnectionLimit) == 17);
  // The other 3 are closed when handshake_timeout has passed.
  bool timed_out = rb.Wait([&] { return rb.refused[LinkRefusal::kHandshakeFailed] == 3; }, 5s);
  if (!timed_out) {
    std::lock_guard<std::mutex> l(rb.mu);
    for (auto& m : rb.refusal_messages) UNSCOPED_INFO(m);
  }
  REQUIRE(timed_out);
  std::this_thread::sleep_for(100ms);
  CHECK(count_closed() == 20);
  for (int fd : socks) close(fd);
  CHECK(rb.up);
}

TEST_CASE("junk connections closed before the link thread sees them are still counted") {
  // Attack: junk on the ZeroMQ port while the link thread is busy (a loaded or slow daemon):
  // libzmq closes each connection before the thread reads its ACCEPTED event. Safe outcome:
  // each is closed and still counted as handshake_failed (the counters are what an operator
  // sees of such an attack). It was counted only when the thread was fast enough.
  REQUIRE(relay::crypto::Init().ok());
  auto a = SiteKey::Generate(), b = SiteKey::Generate();
  const std::uint16_t port = FreePort();
  Recorder rb;
  ZmqLink listener(b, {{"a", a.identity(), "", std::nullopt}},
                   Fast("tcp://127.0.0.1:" + std::to_string(port)), &rb);
  REQUIRE(listener.Start().ok());
  // A plaintext (NULL mechanism) ZMTP 3 greeting: refused by a CURVE server at once.
  std::string greeting("\xff\0\0\0\0\0\0\0\0\x7f\x03\x00NULL", 16);
  greeting.append(16, '\0');
  greeting.append(32, '\0');
  std::vector<int> socks;
  {
    // The link thread blocks in OnLinkRefused of the first connection while this holds mu.
    std::unique_lock<std::mutex> hold(rb.mu);
    socks.push_back(SendRaw(port, greeting));
    REQUIRE(socks.back() >= 0);
    REQUIRE(ClosedByPeer(socks.back(), 5s));
    std::this_thread::sleep_for(200ms);  // the thread reaches the refusal and waits for mu
    for (int i = 0; i < 3; ++i) {
      socks.push_back(SendRaw(port, greeting));
      REQUIRE(socks.back() >= 0);
      REQUIRE(ClosedByPeer(socks.back(), 5s));  // by libzmq's I/O thread, not the link thread
    }
  }
  bool counted = rb.Wait([&] { return rb.refused[LinkRefusal::kHandshakeFailed] == 4; }, 5s);
  {
    std::lock_guard<std::mutex> l(rb.mu);
    for (auto& m : rb.refusal_messages) UNSCOPED_INFO(m);
    CHECK(rb.refused[LinkRefusal::kConnectionLimit] == 0);
  }
  CHECK(counted);
  for (int fd : socks) close(fd);
}

TEST_CASE("connections authenticated as one peer are bounded") {
  REQUIRE(relay::crypto::Init().ok());
  auto a = SiteKey::Generate(), b = SiteKey::Generate();
  std::string ep = Endpoint();
  Recorder rb;
  ZmqLinkOptions o = Fast(ep);
  o.max_connections_per_peer = 2;
  ZmqLink listener(b, {{"a", a.identity(), "", std::nullopt}}, o, &rb);
  REQUIRE(listener.Start().ok());
  std::vector<std::unique_ptr<RawClient>> clients;
  for (int i = 0; i < 5; ++i) {
    clients.push_back(std::make_unique<RawClient>(a, b.identity(), ep));
    clients.back()->Send(Hello(a, b.identity(), ControlType::kPing));
    REQUIRE(rb.Wait([&] { return rb.refused[LinkRefusal::kUnregistered] == i + 1; }));
  }
  CHECK(rb.Refused(LinkRefusal::kConnectionLimit) == 3);
}

// A rotation's end a day away: the previous keys are still accepted.
std::chrono::system_clock::time_point RotationEnd() {
  return std::chrono::system_clock::now() + std::chrono::hours(24);
}

TEST_CASE("during a key rotation both keys of a peer connect") {
  REQUIRE(relay::crypto::Init().ok());
  auto a_old = SiteKey::Generate(), a_new = SiteKey::Generate();
  auto b_old = SiteKey::Generate(), b_new = SiteKey::Generate();
  SECTION("the listener rotated: it presents its previous key, dialers find it") {
    std::string ep = Endpoint();
    Recorder rb, r_knows_old, r_knows_both;
    ZmqLink listener(b_new, {{"a", a_old.identity(), "", std::nullopt}}, Fast(ep), &rb, &b_old);
    REQUIRE(listener.Start().ok());
    // A dialer that knows only the previous key, and one that tries the new key first.
    ZmqLink old_config(a_old, {{"b", b_old.identity(), ep, std::nullopt}}, Fast(), &r_knows_old);
    REQUIRE(old_config.Start().ok());
    REQUIRE(rb.Wait([&] { return rb.up; }));
    // The hello_ack is signed with b's new key, which this dialer does not know yet.
    REQUIRE(r_knows_old.Wait([&] { return !r_knows_old.rejected.empty(); }));
    CHECK(r_knows_old.rejected[0] == "unknown_sender");
    old_config.Stop();
    ZmqLink new_config(a_old, {{"b", b_new.identity(), ep, b_old.identity(), RotationEnd()}},
                       Fast(), &r_knows_both);
    REQUIRE(new_config.Start().ok());
    REQUIRE(r_knows_both.Wait([&] { return r_knows_both.up; }));
    CHECK(r_knows_both.Refused(LinkRefusal::kDialFailed) >= 1);  // the new key, tried first
    std::lock_guard<std::mutex> l(r_knows_both.mu);
    CHECK(r_knows_both.rejected.empty());
  }
  SECTION("the dialer rotated: the listener admits the previous and the new box key") {
    std::string ep = Endpoint();
    Recorder rb, ra;
    ZmqLink listener(b_old, {{"a", a_new.identity(), "", a_old.identity(), RotationEnd()}},
                     Fast(ep), &rb);
    REQUIRE(listener.Start().ok());
    {
      ZmqLink not_yet(a_old, {{"b", b_old.identity(), ep, std::nullopt}}, Fast(), &ra);
      REQUIRE(not_yet.Start().ok());
      REQUIRE(rb.Wait([&] { return rb.ups == 1; }));
    }
    Recorder ra2;
    ZmqLink rotated(a_new, {{"b", b_old.identity(), ep, std::nullopt}}, Fast(), &ra2, &a_old);
    REQUIRE(rotated.Start().ok());
    REQUIRE(ra2.Wait([&] { return ra2.up; }));
    REQUIRE(rb.Wait([&] { return rb.ups == 2; }));
    CHECK(rb.Refused(LinkRefusal::kUnknownKey) == 0);
  }
}

TEST_CASE("listening on an address in use fails with a clear error") {
  REQUIRE(relay::crypto::Init().ok());
  auto a = relay::crypto::SiteKey::Generate();
  std::string ep = "tcp://127.0.0.1:" + std::to_string(FreePort());
  Recorder r1, r2;
  ZmqLink first(a, {}, Fast(ep), &r1);
  REQUIRE(first.Start().ok());
  ZmqLink second(a, {}, Fast(ep), &r2);
  relay::Status s = second.Start();
  REQUIRE_FALSE(s.ok());
  CHECK_THAT(s.message(), Catch::Contains(ep));
}
