#include <catch2/catch.hpp>

#include "event/event.h"

using relay::Event;

namespace {
// The smallest valid event: a post, europe's first.
Event EuropeOne() {
  Event e;
  e.origin_site = "europe";
  e.origin_seq = 1;
  e.id = "europe:1";
  return e;
}
}  // namespace

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
  e.files = {
      relay::Attachment::Inline("plan.pdf", "application/pdf", std::string("%PDF\0\x01", 6))};
  std::string bytes;
  relay::EncodeEvent(e, &bytes);
  auto back = relay::DecodeEvent(bytes);
  REQUIRE(back.ok());
  CHECK(*back == e);
}

namespace {
Event ChunkEvent() {
  Event e;
  e.origin_site = "europe";
  e.origin_seq = 7;
  e.id = relay::MakeEventId(e.origin_site, e.origin_seq);
  e.kind = relay::EventKind::kFileChunk;
  e.channel = "war-room";
  e.hops = {"europe"};
  e.chunk.blob_id = "0123456789abcdef0123456789abcdef";
  e.chunk.offset = 1u << 20;
  e.chunk.total_size = 3u << 20;
  e.chunk.data = std::string(1u << 20, 'x');
  return e;
}
}  // namespace

TEST_CASE("blob attachments and chunk events round-trip") {
  Event post;
  post.origin_site = "europe";
  post.origin_seq = 8;
  post.id = relay::MakeEventId(post.origin_site, post.origin_seq);
  relay::Attachment blob;
  blob.name = "big.iso";
  blob.mime_type = "application/octet-stream";
  blob.size = 3u << 20;
  blob.blake2b = std::string(32, '\x5a');
  blob.blob_id = "0123456789abcdef0123456789abcdef";
  post.files = {relay::Attachment::Inline("small.txt", "text/plain", "hi"), blob};
  std::string bytes;
  relay::EncodeEvent(post, &bytes);
  auto back = relay::DecodeEvent(bytes);
  REQUIRE(back.ok());
  CHECK(*back == post);
  CHECK_FALSE(back->files[0].is_blob());
  CHECK(back->files[1].is_blob());

  Event chunk = ChunkEvent();
  bytes.clear();
  relay::EncodeEvent(chunk, &bytes);
  CHECK(bytes.size() < chunk.chunk.data.size() + 200);  // the chunk is the event
  auto c = relay::DecodeEvent(bytes);
  REQUIRE(c.ok());
  CHECK(*c == chunk);
  CHECK(std::string(relay::EventKindName(relay::EventKind::kFileChunk)) == "file_chunk");
  relay::EventKind k;
  CHECK_FALSE(relay::ParseEventKind("file_chunk", &k));  // producers cannot send chunks
}

TEST_CASE("the envelope keeps the core apart from the hops (wire version 2)") {
  Event e = EuropeOne();
  e.hops = {"europe"};
  e.files = {relay::Attachment::Inline("a", "b", "c")};
  std::string bytes;
  relay::EncodeEvent(e, &bytes);
  CHECK(static_cast<unsigned char>(bytes[0]) == 0x94);  // [version, kind, core, hops]
  CHECK(static_cast<unsigned char>(bytes[1]) == 2);
  CHECK(static_cast<unsigned char>(bytes[2]) == 1);  // the kind, readable without decoding
  auto env = relay::ParseEventEnvelope(bytes);
  REQUIRE(env.ok());
  std::string_view core;
  auto back = relay::DecodeEvent(bytes, &core);
  REQUIRE(back.ok());
  CHECK(core == env->core);
  // A transit site adds itself to the hops: the core (what the origin signed) is unchanged.
  std::string forwarded;
  relay::EncodeEventEnvelope(e.kind, env->core, {"europe", "aws"}, &forwarded);
  std::string_view core2;
  auto fwd = relay::DecodeEvent(forwarded, &core2);
  REQUIRE(fwd.ok());
  CHECK(core2 == core);
  CHECK(fwd->hops == std::vector<std::string>{"europe", "aws"});
  fwd->hops = e.hops;
  CHECK(*fwd == e);
}

TEST_CASE("an event of wire version 1 is refused naming both versions") {
  // A version-1 event was one flat msgpack array of 14 fields starting with the version.
  const std::string v1(
      "\x9e\x01\xa8"
      "europe:1",
      11);
  auto r = relay::DecodeEvent(v1);
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.message(), Catch::Contains("version 1 is not supported") &&
                              Catch::Contains("supports version 2"));
  std::string bytes;
  Event e = EuropeOne();
  relay::EncodeEvent(e, &bytes);
  bytes[1] = 3;
  CHECK_THAT(relay::DecodeEvent(bytes).message(), Catch::Contains("version 3 is not supported"));
}

TEST_CASE("the envelope's kind must be the core's") {
  Event e = EuropeOne();
  std::string bytes;
  relay::EncodeEvent(e, &bytes);
  bytes[2] = 3;  // says delete; the signed core says post
  auto r = relay::DecodeEvent(bytes);
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.message(), Catch::Contains("differs from the envelope"));
}

TEST_CASE("chunk and blob fields are checked") {
  auto fails = [](const Event& e, const char* what) {
    std::string b;
    relay::EncodeEvent(e, &b);
    auto r = relay::DecodeEvent(b);
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.message(), Catch::Contains(what));
  };
  SECTION("blob id with a path in it") {
    Event e = ChunkEvent();
    e.chunk.blob_id = "../../../../etc/passwd0123456789a";
    fails(e, "chunk.blob_id");
  }
  SECTION("chunk larger than the limit") {
    Event e = ChunkEvent();
    e.chunk.data.push_back('y');
    fails(e, "chunk.data");
  }
  SECTION("empty chunk") {
    Event e = ChunkEvent();
    e.chunk.data.clear();
    fails(e, "chunk.data");
  }
  SECTION("chunk beyond the blob's end") {
    Event e = ChunkEvent();
    e.chunk.offset = e.chunk.total_size - 10;
    fails(e, "do not fit");
  }
  SECTION("offset that would overflow") {
    Event e = ChunkEvent();
    e.chunk.offset = ~std::uint64_t{0};
    e.chunk.total_size = ~std::uint64_t{0};
    fails(e, "do not fit");
  }
  SECTION("blob attachment with a bad id or hash") {
    Event e;
    e.origin_site = "europe";
    e.origin_seq = 2;
    e.id = "europe:2";
    relay::Attachment a;
    a.name = "x";
    a.size = 10;
    a.blake2b = std::string(31, 'h');
    a.blob_id = std::string(32, 'a');
    e.files = {a};
    fails(e, "files[].blake2b");
    e.files[0].blake2b = std::string(32, 'h');
    e.files[0].blob_id = std::string(32, 'A');
    fails(e, "files[].blob_id");
  }
  SECTION("a chunk kind without the chunk field") {
    // Kind 6 with a 12-field core: the count check names the expected 13.
    Event p = ChunkEvent();
    p.kind = relay::EventKind::kPost;
    std::string pb;
    relay::EncodeEvent(p, &pb);  // a 12-field core, kind 1
    REQUIRE(pb[2] == 0x01);      // the envelope's kind
    pb[2] = 0x06;                // -> file_chunk
    auto r = relay::DecodeEvent(pb);
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.message(), Catch::Contains("expected 13"));
  }
}

TEST_CASE("event decoding is strict") {
  Event e = EuropeOne();
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

TEST_CASE("the hop list is read strictly, by hand") {
  Event e = EuropeOne();
  std::string bytes;
  relay::EncodeEvent(e, &bytes);
  const auto env = relay::ParseEventEnvelope(bytes);
  REQUIRE(env.ok());
  const std::string head(bytes.data(), bytes.size() - env->hops.size());
  auto with_hops = [&](std::string hops) { return relay::DecodeEvent(head + hops); };
  SECTION("every string width, in order") {
    const std::string long_name(40, 'x');
    std::string hops = "\x93";                       // fixarray of 3
    hops += "\xa6" + std::string("europe");          // fixstr
    hops += "\xd9\x28" + long_name;                  // str8
    hops += std::string("\xda\x00\x03", 3) + "aws";  // str16
    auto r = with_hops(hops);
    REQUIRE(r.ok());
    CHECK(r->hops == std::vector<std::string>{"europe", long_name, "aws"});
    const std::string encoded = head + hops;  // LastHop's answer points into it
    auto last = relay::LastHop(*relay::ParseEventEnvelope(encoded));
    REQUIRE(last.ok());
    CHECK(*last == "aws");
  }
  SECTION("errors name what is wrong") {
    CHECK_THAT(with_hops("\xa1"
                         "a")
                   .message(),
               Catch::Contains("'hops' is not an array"));
    CHECK_THAT(with_hops("\x91\x01").message(), Catch::Contains("'hops[]' is not a string"));
    CHECK_THAT(with_hops("\x92\xa1"
                         "a")
                   .message(),
               Catch::Contains("'hops' is cut off"));
    CHECK_THAT(with_hops("\x91\xa5"
                         "ab")
                   .message(),
               Catch::Contains("'hops' is cut off"));
    CHECK_THAT(with_hops("\x91\xa1"
                         "a"
                         "z")
                   .message(),
               Catch::Contains("trailing bytes"));
    CHECK_THAT(with_hops(std::string("\xdc\x00\x11", 3) + std::string(17, '\xa0')).message(),
               Catch::Contains("17 entries, more than the limit 16"));
    CHECK_THAT(with_hops(std::string("\xdd\xff\xff\xff\xff", 5)).message(),
               Catch::Contains("more than the limit"));
    CHECK_FALSE(relay::LastHop(*relay::ParseEventEnvelope(head + "\x91\x01")).ok());
  }
}

TEST_CASE("frame payload keeps sequences and requires them increasing") {
  std::string a = "event-a", b = "event-b";
  auto payload = relay::EncodeFramePayload({{5, a}, {9, b}}, {"att-1", "att-2"});
  auto back = relay::DecodeFramePayload(payload);
  REQUIRE(back.ok());
  REQUIRE(back->events.size() == 2);
  CHECK(back->events[0].seq == 5);
  CHECK(back->events[1].encoded == "event-b");
  CHECK(back->attestations == std::vector<std::string_view>{"att-1", "att-2"});
  relay::FramePayloadWriter w;
  w.Add(3, a);
  w.AddAttestation("x");
  auto built = relay::DecodeFramePayload(w.Finish());
  REQUIRE(built.ok());
  CHECK(built->events.size() == 1);
  CHECK(built->attestations.size() == 1);
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
  CHECK_FALSE(
      relay::DecodeFramePayload(std::string("\xdd\xff\xff\xff\xff\x92\x01\xc4\x00", 9)).ok());
}
