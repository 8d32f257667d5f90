#include <catch2/catch.hpp>

#include "relay/event.h"

using relay::Event;

TEST_CASE("event round-trips through msgpack") {
  Event e;
  e.origin_site = "europe";
  e.origin_seq = 42;
  e.id = relay::MakeEventId(e.origin_site, e.origin_seq);
  e.channel = "war-room";
  e.author = "alice";
  e.text = "hello \xe2\x9c\x93";
  e.thread = "europe:1";
  e.created_at_ms = 1764129324123;
  e.hops = {"europe", "aws"};
  e.props = {{"k", "v"}};
  e.files = {{"plan.pdf", "application/pdf", std::string("%PDF\0\x01", 6)}};
  std::string bytes;
  relay::EncodeEvent(e, &bytes);
  auto back = relay::DecodeEvent(bytes);
  REQUIRE(back.ok());
  CHECK(*back == e);
}

TEST_CASE("event decoding is strict") {
  Event e;
  e.origin_site = "europe";
  e.origin_seq = 1;
  e.id = "europe:1";
  std::string bytes;
  relay::EncodeEvent(e, &bytes);
  SECTION("trailing bytes") {
    bytes.push_back('\0');
    auto r = relay::DecodeEvent(bytes);
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.message(), Catch::Contains("trailing"));
  }
  SECTION("truncated") {
    bytes.resize(bytes.size() - 1);
    CHECK_FALSE(relay::DecodeEvent(bytes).ok());
  }
  SECTION("id not matching origin") {
    Event bad = e;
    bad.id = "aws:1";
    std::string b;
    relay::EncodeEvent(bad, &b);
    auto r = relay::DecodeEvent(b);
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.message(), Catch::Contains("does not match"));
  }
  SECTION("not msgpack") { CHECK_FALSE(relay::DecodeEvent("\xc1").ok()); }
}

TEST_CASE("frame payload keeps sequences and requires them increasing") {
  std::string a = "event-a", b = "event-b";
  auto payload = relay::EncodeFramePayload({{5, a}, {9, b}});
  auto back = relay::DecodeFramePayload(payload);
  REQUIRE(back.ok());
  REQUIRE(back->size() == 2);
  CHECK((*back)[0].seq == 5);
  CHECK((*back)[1].encoded == "event-b");
  auto bad = relay::EncodeFramePayload({{9, a}, {5, b}});
  auto r = relay::DecodeFramePayload(bad);
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.message(), Catch::Contains("not increasing"));
}

TEST_CASE("event kinds have names") {
  relay::EventKind k;
  REQUIRE(relay::ParseEventKind("reaction_add", &k));
  CHECK(k == relay::EventKind::kReactionAdd);
  CHECK(std::string(relay::EventKindName(relay::EventKind::kPost)) == "post");
  CHECK_FALSE(relay::ParseEventKind("nope", &k));
}

TEST_CASE("decoding refuses a container count larger than the input (fuzz finding)") {
  // fuzz/crashes/event-map32-huge-count: an event whose 'kind' field is a map32 declaring
  // 0x18733a32 entries in 74 bytes made msgpack allocate gigabytes before noticing the input ends.
  const std::string hex =
      "9effffdf18733a32a36177730202a87761722d726f6f6da5616c696365ac68656c6c6f20e29c93202332a561"
      "77733a31a56177733a31cf0000019ab697e80291a36177738090";
  std::string bytes;
  for (std::size_t i = 0; i < hex.size(); i += 2)
    bytes.push_back(static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  CHECK_FALSE(relay::DecodeEvent(bytes).ok());
  CHECK_FALSE(relay::DecodeFramePayload(bytes).ok());
  // The same for a frame payload: array32 of 0xffffffff pairs.
  CHECK_FALSE(relay::DecodeFramePayload(std::string("\xdd\xff\xff\xff\xff\x92\x01\xc4\x00", 9)).ok());
}
