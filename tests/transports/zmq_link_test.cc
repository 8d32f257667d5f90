#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <condition_variable>
#include <mutex>
#include <vector>

#include "crypto/frame.h"
#include "transports/zmq_link.h"

#include "tests/test_util.h"

using relay::testing::FreePort;
using relay::testing::TempDir;

namespace {

using namespace std::chrono_literals;
using relay::transports::LinkPeer;
using relay::transports::ZmqLink;
using relay::transports::ZmqLinkOptions;

struct Recorder : relay::transports::LinkHandler {
  std::mutex mu;
  std::condition_variable cv;
  int ups = 0, downs = 0;
  bool up = false;
  std::uint64_t epoch = 0;
  std::vector<std::string> frames;
  std::vector<std::uint64_t> acks;
  std::vector<std::string> rejected;
  void OnLinkUp(std::size_t, std::uint64_t e) override {
    std::lock_guard<std::mutex> l(mu);
    ++ups;
    up = true;
    epoch = e;
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
  std::string ep = "tcp://127.0.0.1:" + std::to_string(FreePort());
  Recorder rb, rr;
  ZmqLink listener(b, {{"a", a.identity(), "", std::nullopt}}, Fast(ep), &rb);
  ZmqLink dialer(rogue, {{"b", b.identity(), ep, std::nullopt}}, Fast(), &rr);
  REQUIRE(listener.Start().ok());
  REQUIRE(dialer.Start().ok());
  REQUIRE(rb.Wait([&] { return !rb.rejected.empty(); }));
  CHECK(rb.rejected[0] == "unknown_sender");
  std::this_thread::sleep_for(300ms);
  CHECK_FALSE(rr.up);
  CHECK_FALSE(rb.up);
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
