#include "crypto/api_token.h"

#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <string>

#include "tests/test_util.h"

using relay::crypto::ApiToken;
using relay::testing::TempDir;

namespace {

std::string Slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::string WriteMode(const TempDir& dir, const std::string& name, const std::string& text,
                      mode_t mode) {
  const std::string path = dir.Write(name, text);
  REQUIRE(::chmod(path.c_str(), mode) == 0);
  return path;
}

}  // namespace

TEST_CASE("relay token writes a fresh 0600 token and refuses to overwrite") {
  TempDir dir;
  const std::string path = dir.File("ingest.token");
  const mode_t old = ::umask(0);
  const relay::Status created = ApiToken::CreateFile(path);
  ::umask(old);
  REQUIRE(created.ok());
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  CHECK((st.st_mode & 07777) == 0600);
  const std::string text = Slurp(path);
  REQUIRE(text.size() == 65);
  CHECK(text.back() == '\n');
  CHECK(text.find_first_not_of("0123456789abcdef") == 64);

  auto token = ApiToken::LoadFile(path);
  REQUIRE(token.ok());
  CHECK(token->value() == text.substr(0, 64));
  CHECK(token->Matches(text.substr(0, 64)));
  CHECK_FALSE(token->Matches(text.substr(0, 63)));
  CHECK_FALSE(token->Matches(text.substr(0, 64) + "0"));
  CHECK_FALSE(token->Matches(""));

  const relay::Status again = ApiToken::CreateFile(path);
  REQUIRE_FALSE(again.ok());
  CHECK(again.message().find("already exists; refusing to overwrite") != std::string::npos);
  CHECK(Slurp(path) == text);

  const std::string other = dir.File("other.token");
  REQUIRE(ApiToken::CreateFile(other).ok());
  CHECK(Slurp(other) != text);  // fresh each time
}

TEST_CASE("a token file is checked like the key file") {
  TempDir dir;
  const std::string good(40, 'a');
  SECTION("mode bits for group or others are refused, naming the mode and the fix") {
    for (mode_t mode : {0640, 0604, 0660, 0644, 0602}) {
      const std::string path = WriteMode(dir, "t" + std::to_string(mode), good + "\n", mode);
      auto token = ApiToken::LoadFile(path);
      REQUIRE_FALSE(token.ok());
      char octal[8];
      std::snprintf(octal, sizeof octal, "%04o", static_cast<unsigned>(mode));
      CHECK(token.message().find(std::string("has mode ") + octal) != std::string::npos);
      CHECK(token.message().find("chmod 600 '" + path + "'") != std::string::npos);
    }
    CHECK(ApiToken::LoadFile(WriteMode(dir, "ok", good + "\n", 0600)).ok());
    CHECK(ApiToken::LoadFile(WriteMode(dir, "ro", good, 0400)).ok());
  }
  SECTION("not a regular file") {
    auto token = ApiToken::LoadFile(dir.path().string());
    REQUIRE_FALSE(token.ok());
    CHECK(token.message().find("is not a regular file") != std::string::npos);
    const std::string fifo = dir.File("fifo");
    REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
    auto from_fifo = ApiToken::LoadFile(fifo);  // refused, not waited on
    REQUIRE_FALSE(from_fifo.ok());
    CHECK(from_fifo.message().find("is not a regular file") != std::string::npos);
  }
  SECTION("missing") {
    auto token = ApiToken::LoadFile(dir.File("nope.token"));
    REQUIRE_FALSE(token.ok());
    CHECK(token.message().find("cannot open token file '" + dir.File("nope.token") + "'") == 0);
  }
  SECTION("bad size and format; the content is never quoted") {
    const std::string secret = "S3cr3tS3cr3tS3cr3tS3cr3tS3cr3tS3cr3t";
    struct Case {
      std::string text, says;
    };
    for (const Case& c :
         {Case{"", "holds a token of 0 characters"}, Case{"\n", "holds a token of 0 characters"},
          Case{std::string(31, 'a'), "holds a token of 31 characters"},
          Case{std::string(257, 'a'), "holds a token of 257 characters"},
          Case{std::string(2000, 'a'), "is 2000 bytes"},
          Case{secret + " x", "not allowed in a token at position 37"},
          Case{secret + "\n" + secret + "\n", "more than one line"},
          Case{secret + "\n\n", "more than one line"}, Case{"\"" + secret + "\"", "position 1"},
          Case{std::string(40, '='), "holds no token"}}) {
      const std::string path = WriteMode(dir, "bad", c.text, 0600);
      auto token = ApiToken::LoadFile(path);
      REQUIRE_FALSE(token.ok());
      CHECK(token.message().find("token file '" + path + "' ") == 0);
      CHECK(token.message().find(c.says) != std::string::npos);
      CHECK(token.message().find(secret) == std::string::npos);
      std::filesystem::remove(path);
    }
  }
  SECTION("tokens of other tools: base64 with padding, CRLF") {
    const std::string b64 = "dGhpcyBpcyBhIHRva2VuIG9mIHRoaXJ0eSB0d28gYnl0ZXM+/w==";
    auto token = ApiToken::LoadFile(WriteMode(dir, "b64", b64 + "\r\n", 0600));
    REQUIRE(token.ok());
    CHECK(token->Matches(b64));
  }
}

TEST_CASE("a wiped token matches nothing") {
  auto token = ApiToken::FromString(std::string(32, 'k'));
  REQUIRE(token.ok());
  CHECK(token->Matches(std::string(32, 'k')));
  ApiToken moved = std::move(token).value();
  CHECK(moved.Matches(std::string(32, 'k')));
  moved.Wipe();
  CHECK_FALSE(moved.Matches(std::string(32, 'k')));
  CHECK(moved.value().empty());
}
