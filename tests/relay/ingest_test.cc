#include <catch2/catch.hpp>

#include "relay/ingest.h"

namespace {

relay::config::Config TestConfig() {
  relay::config::Config c;
  c.site_name = "europe";
  relay::config::ChannelConfig ch;
  ch.name = "war-room";
  ch.peers = {"aws"};
  c.channels.push_back(ch);
  c.ingest_max_text = 100;
  return c;
}

relay::IngestError MustFail(std::string_view body) {
  relay::IngestRequest req;
  relay::IngestError err;
  REQUIRE_FALSE(relay::ParseIngestBody(body, TestConfig(), &req, &err));
  return err;
}

}  // namespace

TEST_CASE("ingest accepts one object and a batch") {
  relay::IngestRequest req;
  relay::IngestError err;
  REQUIRE(relay::ParseIngestBody(
      R"({"channel":"war-room","author":"alice","text":"hi","id":"k1","thread":"europe:1"})",
      TestConfig(), &req, &err));
  CHECK_FALSE(req.batch);
  REQUIRE(req.messages.size() == 1);
  CHECK(req.messages[0].author == "alice");
  CHECK(req.messages[0].client_id == "k1");
  CHECK(req.messages[0].thread == "europe:1");
  CHECK(req.messages[0].kind == relay::EventKind::kPost);

  relay::IngestRequest batch;
  REQUIRE(relay::ParseIngestBody(
      R"([{"channel":"war-room","author":"a","text":"1"},{"channel":"war-room","author":"b","text":"2","props":{"k":"v"}}])",
      TestConfig(), &batch, &err));
  CHECK(batch.batch);
  REQUIRE(batch.messages.size() == 2);
  CHECK(batch.messages[1].text == "2");
  CHECK(batch.messages[1].props.size() == 1);
}

TEST_CASE("ingest rejects bad bodies with an error naming the problem") {
  struct Case {
    const char* body;
    int status;
    const char* says;
  };
  const Case cases[] = {
      {"{", 400, "malformed JSON"},
      {"[]", 400, "empty batch"},
      {"42", 400, "JSON object"},
      {R"({"author":"a","text":"t"})", 400, "missing field 'channel'"},
      {R"({"channel":"war-room","text":"t"})", 400, "missing field 'author'"},
      {R"({"channel":"war-room","author":"a"})", 400, "missing field 'text'"},
      {R"({"channel":"nope","author":"a","text":"t"})", 400, "unknown channel 'nope'"},
      {R"({"channel":"war-room","author":7,"text":"t"})", 400, "'author' must be a string"},
      {R"({"channel":"war-room","author":"a","text":"t","colour":"red"})", 400,
       "unknown field 'colour'"},
      {R"({"channel":"war-room","author":"","text":"t"})", 400, "'author' is empty"},
      {R"({"channel":"war-room","author":"a","text":"t","kind":"shout"})", 400,
       "unknown kind 'shout'"},
      {R"({"channel":"war-room","author":"a","text":"t","kind":"edit"})", 400, "needs field 'ref'"},
      {R"([{"channel":"war-room","author":"a","text":"t"},{"channel":"war-room"}])", 400,
       "message 1: missing field 'author'"},
      {"{\"channel\":\"war-room\",\"author\":\"a\",\"text\":\"\xff\"}", 400, "malformed JSON"},
      // Bad string content is located (simdjson alone says "Problem while parsing a string").
      {R"({"channel":"war-room","author":"a","text":"x\ud800y"})", 400,
       "malformed JSON: a lone UTF-16 high surrogate \\ud800 at byte 44"},
      {R"({"channel":"war-room","author":"a","text":"x\ud800\u0041"})", 400,
       "lone UTF-16 high surrogate \\ud800 at byte 44"},
      {R"({"channel":"war-room","author":"\udc00","text":"t"})", 400,
       "a lone UTF-16 low surrogate \\udc00 at byte 32"},
      {R"({"channel":"war-room","author":"a","text":"x\q"})", 400,
       "an invalid escape \\q at byte 44"},
      {R"({"channel":"war-room","author":"a","text":"x\u12"})", 400,
       "a \\u escape without four hex digits at byte 44"},
      {R"({"channel":"war-room","author":"a","text":"x\ud800\u12"})", 400,
       "a \\u escape without four hex digits at byte 50"},
      {"{\"channel\":\"war-room\",\"author\":\"a\",\"text\":\"x\ty\"}", 400,
       "a raw control character (byte 9) inside a string at byte 44"},
  };
  for (const Case& c : cases) {
    INFO(c.body);
    relay::IngestError err = MustFail(c.body);
    CHECK(err.http_status == c.status);
    CHECK_THAT(err.message, Catch::Contains(c.says));
  }
}

TEST_CASE("ingest takes escaped surrogate pairs and other escapes") {
  relay::IngestRequest req;
  relay::IngestError err;
  REQUIRE(relay::ParseIngestBody(
      R"({"channel":"war-room","author":"a\"\\\/\b\f\n\r\t","text":"\ud83d\ude00 \u00e9"})",
      TestConfig(), &req, &err));
  CHECK(req.messages[0].text == "\xf0\x9f\x98\x80 \xc3\xa9");
  CHECK(req.messages[0].author == "a\"\\/\b\f\n\r\t");
}

TEST_CASE("ingest answers 413 for text over the limit") {
  std::string body =
      R"({"channel":"war-room","author":"a","text":")" + std::string(101, 'x') + "\"}";
  relay::IngestError err = MustFail(body);
  CHECK(err.http_status == 413);
  CHECK_THAT(err.message, Catch::Contains("101 bytes"));
}

TEST_CASE("deeply nested JSON is refused, not a crash") {
  std::string body(100000, '[');
  relay::IngestError err = MustFail(body);
  CHECK(err.http_status == 400);
}
