// Drives a real in-process Daemon with a fake peer built from the link and crypto libraries,
// and checks that every kind of bad frame is rejected with its own counted reason while the
// store and the sink stay unchanged.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <thread>

#include "config/config.h"
#include "crypto/frame.h"
#include "crypto/origin.h"
#include "event/event.h"
#include "queue/store.h"
#include "relay/daemon.h"
#include "relay/http_server.h"
#include "transports/zmq_link.h"

#include "tests/test_util.h"

using relay::testing::FreePort;
using relay::testing::TempDir;

namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

// The fake peer's side of the link: records link state and acknowledgements.
struct FakePeer : relay::transports::LinkHandler {
  std::mutex mu;
  std::condition_variable cv;
  bool up = false;
  std::uint64_t epoch = 0;
  std::uint64_t acked = 0;
  int acks = 0;
  void OnLinkUp(std::size_t, std::uint64_t e) override {
    std::lock_guard<std::mutex> l(mu);
    up = true;
    epoch = e;
    cv.notify_all();
  }
  void OnLinkDown(std::size_t) override {
    std::lock_guard<std::mutex> l(mu);
    up = false;
  }
  void OnFrame(std::size_t, std::string) override {}
  void OnAck(std::size_t, std::uint64_t seq, bool) override {
    std::lock_guard<std::mutex> l(mu);
    acked = seq;
    ++acks;
    cv.notify_all();
  }
  void OnRejectedControl(const std::string&, const std::string&) override {}
  void OnLinkRefused(relay::transports::LinkRefusal, const std::string&) override {}
};

relay::Event MakeEvent(std::uint64_t seq, const std::string& channel = "war-room") {
  relay::Event e;
  e.origin_site = "europe";
  e.origin_seq = seq;
  e.id = relay::MakeEventId("europe", seq);
  e.channel = channel;
  e.author = "alice";
  e.text = "message " + std::to_string(seq);
  e.created_at_ms = 1764129324000;
  e.hops = {"europe"};
  return e;
}

// A frame payload of `events`, with an origin attestation for all of them signed by `origin`
// under the name `origin_name` (none when `origin` is null).
std::string Payload(const std::vector<std::pair<std::uint64_t, relay::Event>>& events,
                    const relay::crypto::SiteKey* origin,
                    const std::string& origin_name = "europe") {
  std::vector<std::string> encoded(events.size());
  std::vector<relay::FramedEvent> fe;
  std::vector<relay::crypto::Digest> digests;
  for (std::size_t i = 0; i < events.size(); ++i) {
    relay::EncodeEvent(events[i].second, &encoded[i]);
    fe.push_back({events[i].first, encoded[i]});
    digests.push_back(relay::crypto::EventDigest(relay::ParseEventEnvelope(encoded[i])->core));
  }
  std::vector<std::string> attestations;
  if (origin != nullptr && !digests.empty())
    attestations.push_back(
        relay::crypto::SealAttestation(*origin, origin_name, digests.data(), digests.size()));
  return relay::EncodeFramePayload(fe, {attestations.begin(), attestations.end()});
}

std::size_t CountLines(const std::string& path) {
  std::ifstream in(path);
  std::size_t n = 0;
  std::string line;
  while (std::getline(in, line)) ++n;
  return n;
}

// Reads one sample of relay_frames_rejected_total{reason="..."} from /metrics.
long Rejected(std::uint16_t port, const std::string& reason) {
  relay::HttpClient c("127.0.0.1", port);
  auto r = c.Request("GET", "/metrics");
  REQUIRE(r.ok());
  std::string needle = "relay_frames_rejected_total{reason=\"" + reason + "\"} ";
  auto pos = r->body.find(needle);
  REQUIRE(pos != std::string::npos);
  return std::atol(r->body.c_str() + pos + needle.size());
}

template <typename Pred>
bool WaitFor(Pred pred, std::chrono::milliseconds limit = 10s) {
  auto end = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(10ms);
  }
  return pred();
}

}  // namespace

TEST_CASE("the daemon rejects each kind of bad frame, counts it, and changes nothing") {
  REQUIRE(relay::crypto::Init().ok());
  TempDir dir;
  std::string aws_key = dir.path().string() + "/aws.key",
              eu_key = dir.path().string() + "/europe.key";
  REQUIRE(relay::crypto::SiteKey::CreateFile(aws_key).ok());
  REQUIRE(relay::crypto::SiteKey::CreateFile(eu_key).ok());
  auto aws = relay::crypto::SiteKey::LoadFile(aws_key);
  auto eu = relay::crypto::SiteKey::LoadFile(eu_key);
  REQUIRE(aws.ok());
  REQUIRE(eu.ok());
  relay::crypto::SiteKey stranger = relay::crypto::SiteKey::Generate();

  std::uint16_t ingest = FreePort(), zmq = FreePort();
  std::string conf = dir.path().string() + "/aws.conf";
  std::string sink = dir.path().string() + "/war-room.jsonl";
  std::ofstream(conf) << "[site]\nname = aws\nkey_file = aws.key\ndata_dir = data\n"
                      << "[ingest]\nlisten = 127.0.0.1:" << ingest << "\nallow_anonymous = true\n"
                      << "[zmq]\nlisten = tcp://127.0.0.1:" << zmq << "\n"
                      << "[peer.europe]\npublic_key = " << eu->identity().ToString() << "\n"
                      << "[channel.war-room]\npeers = europe\nsink = jsonl\n"
                      << "jsonl_path = war-room.jsonl\n";
  auto cfg = relay::config::LoadConfig(conf);
  REQUIRE(cfg.ok());
  relay::Daemon daemon(std::move(cfg).value());
  REQUIRE(daemon.Start().ok());

  FakePeer peer;
  relay::transports::ZmqLinkOptions lo;
  lo.heartbeat_interval = 200ms;
  relay::transports::ZmqLink link(
      *eu, {{"aws", aws->identity(), "tcp://127.0.0.1:" + std::to_string(zmq), std::nullopt}}, lo,
      &peer);
  REQUIRE(link.Start().ok());
  {
    std::unique_lock<std::mutex> l(peer.mu);
    REQUIRE(peer.cv.wait_for(l, 10s, [&] { return peer.up; }));
  }
  auto send = [&](std::string frame) {
    std::uint64_t epoch;
    {
      std::lock_guard<std::mutex> l(peer.mu);
      epoch = peer.epoch;
    }
    link.SendFrame(0, epoch, std::move(frame));
  };
  auto wait_ack = [&](std::uint64_t seq) {
    std::unique_lock<std::mutex> l(peer.mu);
    return peer.cv.wait_for(l, 10s, [&] { return peer.acked >= seq; });
  };

  // A good frame is accepted, acknowledged and delivered.
  std::string good =
      relay::crypto::SealFrame(*eu, aws->identity(), 1, 1, 1, Payload({{1, MakeEvent(1)}}, &*eu));
  send(good);
  REQUIRE(wait_ack(1));
  REQUIRE(WaitFor([&] { return CountLines(sink) == 1; }));

  SECTION("replayed frame") {
    int acks_before;
    {
      std::lock_guard<std::mutex> l(peer.mu);
      acks_before = peer.acks;
    }
    send(good);
    REQUIRE(WaitFor([&] { return Rejected(ingest, "replay") == 1; }));
    // The replay is answered with the current cursor (the sender may have lost the ack).
    std::unique_lock<std::mutex> l(peer.mu);
    CHECK(peer.cv.wait_for(l, 5s, [&] { return peer.acks > acks_before; }));
    CHECK(peer.acked == 1);
  }
  SECTION("tampered, misaddressed and foreign frames") {
    std::string next =
        relay::crypto::SealFrame(*eu, aws->identity(), 2, 2, 1, Payload({{2, MakeEvent(2)}}, &*eu));
    std::string flipped = next;
    flipped[flipped.size() - 1] ^= 1;
    send(flipped);
    std::string cut = next.substr(0, next.size() - 10);
    send(cut);
    std::string version = next;
    version[4] = 9;
    send(version);
    send(relay::crypto::SealFrame(*eu, stranger.identity(), 2, 2, 1,
                                  Payload({{2, MakeEvent(2)}}, &*eu)));
    send(relay::crypto::SealFrame(stranger, aws->identity(), 2, 2, 1,
                                  Payload({{2, MakeEvent(2)}}, &*eu)));
    send(relay::crypto::SealFrame(*eu, aws->identity(), 2, 2, 1, "\xc1 not msgpack"));
    // A frame that skips sequences: dropped until the missing ones come, not acknowledged.
    send(relay::crypto::SealFrame(*eu, aws->identity(), 7, 7, 1,
                                  Payload({{7, MakeEvent(7)}}, &*eu)));
    REQUIRE(WaitFor([&] {
      return Rejected(ingest, "bad_signature") == 1 && Rejected(ingest, "truncated") == 1 &&
             Rejected(ingest, "unsupported_version") == 1 &&
             Rejected(ingest, "wrong_recipient") == 1 && Rejected(ingest, "unknown_sender") == 1 &&
             Rejected(ingest, "malformed") == 1 && Rejected(ingest, "gap") == 1;
    }));
    CHECK(CountLines(sink) == 1);
    {
      std::lock_guard<std::mutex> l(peer.mu);
      CHECK(peer.acked == 1);
    }
    // After all that, the genuine next frame still goes through.
    send(next);
    REQUIRE(wait_ack(2));
    REQUIRE(WaitFor([&] { return CountLines(sink) == 2; }));
  }
  SECTION("an event for a channel not bridged with the sender is dropped and counted") {
    send(relay::crypto::SealFrame(*eu, aws->identity(), 2, 2, 1,
                                  Payload({{2, MakeEvent(2, "secret-channel")}}, &*eu)));
    REQUIRE(wait_ack(2));
    CHECK(Rejected(ingest, "unroutable") == 1);
    std::this_thread::sleep_for(200ms);
    CHECK(CountLines(sink) == 1);
  }
  SECTION("the same event id twice in later frames is delivered once") {
    send(relay::crypto::SealFrame(*eu, aws->identity(), 2, 3, 2,
                                  Payload({{2, MakeEvent(1)}, {3, MakeEvent(3)}}, &*eu)));
    REQUIRE(wait_ack(3));
    REQUIRE(WaitFor([&] { return CountLines(sink) == 2; }));
    std::this_thread::sleep_for(200ms);
    CHECK(CountLines(sink) == 2);
  }
  SECTION("events without a valid origin signature are refused one by one; the link moves on") {
    // No attestation at all, one signed by a stranger, and one for another origin name.
    send(relay::crypto::SealFrame(*eu, aws->identity(), 2, 2, 1,
                                  Payload({{2, MakeEvent(2)}}, nullptr)));
    send(relay::crypto::SealFrame(*eu, aws->identity(), 3, 3, 1,
                                  Payload({{3, MakeEvent(3)}}, &stranger)));
    REQUIRE(wait_ack(3));  // acknowledged: a refused event does not stall the link
    CHECK(Rejected(ingest, "bad_origin_signature") == 2);
    // An event claiming another origin, signed with the peer's own key.
    relay::Event gamma = MakeEvent(4);
    gamma.origin_site = "gamma";
    gamma.id = relay::MakeEventId("gamma", 4);
    gamma.hops = {"gamma", "europe"};
    send(relay::crypto::SealFrame(*eu, aws->identity(), 4, 4, 1,
                                  Payload({{4, gamma}}, &*eu, "gamma")));
    REQUIRE(wait_ack(4));
    CHECK(Rejected(ingest, "unknown_origin") == 1);
    // The signature covers the core: an event changed after signing is refused.
    relay::Event changed = MakeEvent(5);
    std::string p5 = Payload({{5, changed}}, &*eu);
    auto at = p5.find("message 5");
    REQUIRE(at != std::string::npos);
    p5[at] = 'M';
    send(relay::crypto::SealFrame(*eu, aws->identity(), 5, 5, 1, p5));
    REQUIRE(wait_ack(5));
    CHECK(Rejected(ingest, "bad_origin_signature") == 3);
    std::this_thread::sleep_for(200ms);
    CHECK(CountLines(sink) == 1);
    // The genuine next one is delivered.
    send(relay::crypto::SealFrame(*eu, aws->identity(), 6, 6, 1,
                                  Payload({{6, MakeEvent(6)}}, &*eu)));
    REQUIRE(wait_ack(6));
    REQUIRE(WaitFor([&] { return CountLines(sink) == 2; }));
  }
  SECTION("a peer cannot edit, delete or un-react what another site posted") {
    relay::Event edit = MakeEvent(2);
    edit.kind = relay::EventKind::kEdit;
    edit.ref = "aws:12345";  // a message of this site
    relay::Event del = MakeEvent(3);
    del.kind = relay::EventKind::kDelete;
    del.ref = "gamma:1";
    relay::Event unreact = MakeEvent(4);
    unreact.kind = relay::EventKind::kReactionRemove;
    unreact.ref = "aws:12345";
    unreact.text = "thumbsup";
    send(relay::crypto::SealFrame(*eu, aws->identity(), 2, 4, 3,
                                  Payload({{2, edit}, {3, del}, {4, unreact}}, &*eu)));
    REQUIRE(wait_ack(4));
    CHECK(Rejected(ingest, "not_owner") == 3);
    // Its own reaction it may remove again, and its own message it may edit.
    relay::Event react = unreact;
    react.origin_seq = 5;
    react.id = relay::MakeEventId("europe", 5);
    react.kind = relay::EventKind::kReactionAdd;
    relay::Event unreact2 = react;
    unreact2.origin_seq = 6;
    unreact2.id = relay::MakeEventId("europe", 6);
    unreact2.kind = relay::EventKind::kReactionRemove;
    relay::Event own_edit = MakeEvent(7);
    own_edit.kind = relay::EventKind::kEdit;
    own_edit.ref = "europe:1";
    send(relay::crypto::SealFrame(*eu, aws->identity(), 5, 7, 3,
                                  Payload({{5, react}, {6, unreact2}, {7, own_edit}}, &*eu)));
    REQUIRE(wait_ack(7));
    REQUIRE(WaitFor([&] { return CountLines(sink) == 4; }));
    CHECK(Rejected(ingest, "not_owner") == 3);
  }
  link.Stop();
  daemon.Stop();
}

TEST_CASE("a store of wire version 1 with events still queued is refused at start") {
  REQUIRE(relay::crypto::Init().ok());
  TempDir dir;
  const std::string base = dir.path().string();
  REQUIRE(relay::crypto::SiteKey::CreateFile(base + "/aws.key").ok());
  relay::crypto::SiteKey eu = relay::crypto::SiteKey::Generate();
  std::ofstream(base + "/aws.conf")
      << "[site]\nname = aws\nkey_file = aws.key\ndata_dir = data\n"
      << "[ingest]\nlisten = 127.0.0.1:" << FreePort() << "\nallow_anonymous = true\n"
      << "[peer.europe]\npublic_key = " << eu.identity().ToString()
      << "\n[channel.war-room]\npeers = europe\nsink = jsonl\n"
      << "jsonl_path = war-room.jsonl\n";
  auto start = [&] {
    auto cfg = relay::config::LoadConfig(base + "/aws.conf");
    REQUIRE(cfg.ok());
    relay::Daemon daemon(std::move(cfg).value(), relay::Daemon::Options{/*offline=*/true});
    relay::Status s = daemon.Start();
    daemon.Stop();
    return s;
  };
  {
    // What version 1 left behind: its counters, no format mark, and one queued entry (peer list
    // and a flat version-1 event).
    auto store = relay::queue::Store::Open(base + "/data");
    REQUIRE(store.ok());
    relay::queue::WriteBatch b(**store);
    b.PutCounter("next/out", 11);
    b.PutCounter("next/origin", 11);
    b.PutOutbound(10, std::string("\x01\x06"
                                  "europe"
                                  "\x9e\x01\xa8"
                                  "aws:10",
                                  17));
    REQUIRE((*store)->Commit(b, true).ok());
  }
  relay::Status refused = start();
  REQUIRE_FALSE(refused.ok());
  CHECK_THAT(refused.message(), Catch::Contains("wire version 1") &&
                                    Catch::Contains("events queued for a peer") &&
                                    Catch::Contains("Upgrading a federation"));
  {
    // Drained (the entry acknowledged and collected), the same store is taken and marked.
    auto store = relay::queue::Store::Open(base + "/data");
    REQUIRE(store.ok());
    relay::queue::WriteBatch b(**store);
    b.DeleteOutboundRange(1, 11);
    REQUIRE((*store)->Commit(b, true).ok());
  }
  CHECK(start().ok());
  auto store = relay::queue::Store::Open(base + "/data");
  REQUIRE(store.ok());
  CHECK((*store)->GetCounter("format", 0) == 2);
}

namespace {
// One sample of /metrics, e.g. `relay_inbound_held_bytes{peer="europe"}`; -1 when absent.
long Metric(std::uint16_t port, const std::string& series) {
  relay::HttpClient c("127.0.0.1", port);
  auto r = c.Request("GET", "/metrics");
  REQUIRE(r.ok());
  auto pos = r->body.find("\n" + series + " ");
  if (pos == std::string::npos) return -1;
  return std::atol(r->body.c_str() + pos + series.size() + 2);
}
}  // namespace

TEST_CASE("a peer's undelivered events are bounded by max_inbound; its frames wait, unacked") {
  REQUIRE(relay::crypto::Init().ok());
  TempDir dir;
  const std::string base = dir.path().string();
  REQUIRE(relay::crypto::SiteKey::CreateFile(base + "/aws.key").ok());
  REQUIRE(relay::crypto::SiteKey::CreateFile(base + "/europe.key").ok());
  auto aws = relay::crypto::SiteKey::LoadFile(base + "/aws.key");
  auto eu = relay::crypto::SiteKey::LoadFile(base + "/europe.key");
  REQUIRE(aws.ok());
  REQUIRE(eu.ok());
  std::uint16_t ingest = FreePort(), zmq = FreePort(), nobody = FreePort();
  // The channel's sink is a webhook nobody answers: delivery never completes, so every event
  // taken stays in the inbound store and counts against the peer's bound.
  std::ofstream(base + "/aws.conf")
      << "[site]\nname = aws\nkey_file = aws.key\ndata_dir = data\n"
      << "[ingest]\nlisten = 127.0.0.1:" << ingest << "\nallow_anonymous = true\n"
      << "[zmq]\nlisten = tcp://127.0.0.1:" << zmq << "\n"
      << "[peer.europe]\npublic_key = " << eu->identity().ToString() << "\nmax_inbound = 1MiB\n"
      << "[channel.war-room]\npeers = europe\nsink = webhook\n"
      << "webhook_url = http://127.0.0.1:" << nobody << "/hooks/x\n";
  auto cfg = relay::config::LoadConfig(base + "/aws.conf");
  REQUIRE(cfg.ok());
  relay::Daemon daemon(std::move(cfg).value());
  REQUIRE(daemon.Start().ok());
  FakePeer peer;
  relay::transports::ZmqLinkOptions lo;
  lo.heartbeat_interval = 200ms;
  relay::transports::ZmqLink link(
      *eu, {{"aws", aws->identity(), "tcp://127.0.0.1:" + std::to_string(zmq), std::nullopt}}, lo,
      &peer);
  REQUIRE(link.Start().ok());
  {
    std::unique_lock<std::mutex> l(peer.mu);
    REQUIRE(peer.cv.wait_for(l, 10s, [&] { return peer.up; }));
  }
  auto send = [&](std::uint64_t seq) {
    relay::Event e = MakeEvent(seq);
    e.text = std::string(600 * 1024, 'x');  // two of them are more than max_inbound
    std::uint64_t epoch;
    {
      std::lock_guard<std::mutex> l(peer.mu);
      epoch = peer.epoch;
    }
    link.SendFrame(
        0, epoch,
        relay::crypto::SealFrame(*eu, aws->identity(), seq, seq, 1, Payload({{seq, e}}, &*eu)));
  };
  auto acked = [&] {
    std::lock_guard<std::mutex> l(peer.mu);
    return peer.acked;
  };
  send(1);
  REQUIRE(WaitFor([&] { return acked() == 1; }));
  CHECK(Metric(ingest, "relay_inbound_held_bytes{peer=\"europe\"}") > 600 * 1024);
  send(2);
  REQUIRE(WaitFor([&] {
    return Metric(ingest, "relay_inbound_deferred_total{peer=\"europe\",reason=\"max_inbound\"}") ==
           1;
  }));
  std::this_thread::sleep_for(500ms);
  CHECK(acked() == 1);  // not taken, not acknowledged: the sender keeps it and sends it again
  CHECK(Metric(ingest, "relay_inbound_held_bytes{peer=\"europe\"}") < 1024 * 1024);
  link.Stop();
  daemon.Stop();
}
