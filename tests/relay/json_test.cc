#include <catch2/catch.hpp>

#include "base/json.h"

TEST_CASE("JSON strings are escaped and always valid UTF-8") {
  CHECK(relay::JsonString("plain") == "\"plain\"");
  CHECK(relay::JsonString("a\"b\\c\n\t\x01") == "\"a\\\"b\\\\c\\n\\t\\u0001\"");
  CHECK(relay::JsonString("caf\xc3\xa9 \xe2\x9c\x93") == "\"caf\xc3\xa9 \xe2\x9c\x93\"");
  // Invalid sequences (lone continuation byte, truncated, overlong, surrogate) become U+FFFD.
  CHECK(relay::JsonString("\x80") == "\"\xef\xbf\xbd\"");
  CHECK(relay::JsonString("a\xe2\x9c") == "\"a\xef\xbf\xbd\xef\xbf\xbd\"");
  CHECK(relay::JsonString("\xc0\xaf") == "\"\xef\xbf\xbd\xef\xbf\xbd\"");
  CHECK(relay::JsonString("\xed\xa0\x80") == "\"\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\"");
  CHECK(relay::JsonError("bad \"x\"") == "{\"error\":\"bad \\\"x\\\"\"}");
}

TEST_CASE("timestamps are RFC 3339 UTC with milliseconds") {
  CHECK(relay::FormatTimestampMs(0) == "1970-01-01T00:00:00.000Z");
  CHECK(relay::FormatTimestampMs(1764129324123) == "2025-11-26T03:55:24.123Z");
}

TEST_CASE("base64 follows RFC 4648 test vectors") {
  CHECK(relay::Base64("") == "");
  CHECK(relay::Base64("f") == "Zg==");
  CHECK(relay::Base64("fo") == "Zm8=");
  CHECK(relay::Base64("foo") == "Zm9v");
  CHECK(relay::Base64("foob") == "Zm9vYg==");
  CHECK(relay::Base64("fooba") == "Zm9vYmE=");
  CHECK(relay::Base64("foobar") == "Zm9vYmFy");
  CHECK(relay::Base64(std::string("\xff\x00\xfe", 3)) == "/wD+");
}
