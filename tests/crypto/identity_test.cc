#include "crypto/identity.h"

#include <sodium.h>
#include <sys/stat.h>

#include <catch2/catch.hpp>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "tests/test_util.h"

using relay::testing::TempDir;

namespace relay::crypto {
namespace {

namespace fs = std::filesystem;

std::string Base64Url(const std::vector<unsigned char>& bytes) {
  std::string out(sodium_base64_ENCODED_LEN(bytes.size(), sodium_base64_VARIANT_URLSAFE_NO_PADDING),
                  '\0');
  sodium_bin2base64(out.data(), out.size(), bytes.data(), bytes.size(),
                    sodium_base64_VARIANT_URLSAFE_NO_PADDING);
  out.resize(std::strlen(out.c_str()));
  return out;
}

// Builds an identity string independently of ToString, from the documented format.
std::string EncodeIdentity(const PublicKey& sign_pk, const PublicKey& box_pk) {
  std::vector<unsigned char> raw(sign_pk.begin(), sign_pk.end());
  raw.insert(raw.end(), box_pk.begin(), box_pk.end());
  const std::string context = "relay-identity-v1";
  std::vector<unsigned char> input(context.begin(), context.end());
  input.insert(input.end(), raw.begin(), raw.end());
  unsigned char hash[32];
  crypto_generichash(hash, sizeof hash, input.data(), input.size(), nullptr, 0);
  raw.insert(raw.end(), hash, hash + 4);
  return "relay1:" + Base64Url(raw);
}

void WriteFile(const std::string& path, const std::string& content, mode_t mode) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << content;
  REQUIRE(::chmod(path.c_str(), mode) == 0);
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

mode_t FileMode(const std::string& path) {
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  return st.st_mode & 07777;
}

TEST_CASE("Init is idempotent", "[crypto][identity]") {
  REQUIRE(Init().ok());
  REQUIRE(Init().ok());
}

TEST_CASE("public identity string round trips", "[crypto][identity]") {
  REQUIRE(Init().ok());
  const SiteKey key = SiteKey::Generate();
  const PublicIdentity& id = key.identity();
  const std::string text = id.ToString();
  CHECK(text.rfind("relay1:", 0) == 0);
  CHECK(text.size() == 7 + 91);  // 68 bytes in unpadded base64
  CHECK(text == EncodeIdentity(id.sign_pk, id.box_pk));
  auto parsed = PublicIdentity::Parse(text);
  REQUIRE(parsed.ok());
  CHECK(*parsed == id);
  CHECK_FALSE(SiteKey::Generate().identity() == id);
}

TEST_CASE("fingerprint is 16 lowercase hex chars of the signing key", "[crypto][identity]") {
  REQUIRE(Init().ok());
  PublicIdentity id;
  for (std::size_t i = 0; i < id.sign_pk.size(); ++i)
    id.sign_pk[i] = static_cast<std::uint8_t>(0xa0 + i);
  CHECK(id.Fingerprint() == "a0a1a2a3a4a5a6a7");
}

TEST_CASE("public identity parse errors name the problem", "[crypto][identity]") {
  REQUIRE(Init().ok());
  const SiteKey key = SiteKey::Generate();
  const std::string good = key.identity().ToString();
  const std::string body = good.substr(7);

  SECTION("missing prefix") {
    for (const std::string& text : {body, "relay2:" + body, std::string(), "RELAY1:" + body}) {
      auto r = PublicIdentity::Parse(text);
      REQUIRE_FALSE(r.ok());
      CHECK_THAT(r.message(), Catch::Contains("does not start with 'relay1:'"));
    }
  }
  SECTION("not base64url") {
    for (const std::string& bad :
         {body.substr(0, 10) + "+" + body.substr(11), body.substr(0, 10) + "/" + body.substr(11),
          body + "=", body.substr(0, 10) + " " + body.substr(11)}) {
      auto r = PublicIdentity::Parse("relay1:" + bad);
      REQUIRE_FALSE(r.ok());
      CHECK_THAT(r.message(), Catch::Contains("not valid base64url"));
    }
  }
  SECTION("wrong length") {
    std::vector<unsigned char> bytes67(67, 7), bytes69(69, 7);
    auto r = PublicIdentity::Parse("relay1:" + Base64Url(bytes67));
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.message(), Catch::Contains("decodes to 67 bytes, want 68"));
    r = PublicIdentity::Parse("relay1:" + Base64Url(bytes69));
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.message(), Catch::Contains("decodes to 69 bytes, want 68"));
    r = PublicIdentity::Parse("relay1:");
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.message(), Catch::Contains("decodes to 0 bytes, want 68"));
    // Pasted twice: a valid base64 string of twice the length.
    r = PublicIdentity::Parse(good + body);
    REQUIRE_FALSE(r.ok());
  }
  SECTION("changed character fails the checksum") {
    for (std::size_t pos : {0u, 20u, 45u, 60u, 85u}) {
      std::string bad = body;
      bad[pos] = bad[pos] == 'A' ? 'B' : 'A';
      auto r = PublicIdentity::Parse("relay1:" + bad);
      REQUIRE_FALSE(r.ok());
      CHECK_THAT(r.message(), Catch::Contains("a character was changed or lost"));
    }
  }
  SECTION("valid checksum over unusable keys") {
    PublicKey zero{};
    auto r = PublicIdentity::Parse(EncodeIdentity(key.identity().sign_pk, zero));
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.message(), Catch::Contains("invalid X25519 key"));
    r = PublicIdentity::Parse(EncodeIdentity(zero, key.identity().box_pk));
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.message(), Catch::Contains("invalid Ed25519 signing key"));
  }
}

TEST_CASE("sign and verify", "[crypto][identity]") {
  REQUIRE(Init().ok());
  const SiteKey a = SiteKey::Generate();
  const SiteKey b = SiteKey::Generate();
  const Signature sig = a.Sign("hello");
  CHECK(VerifySignature(a.identity().sign_pk, "hello", sig));
  CHECK_FALSE(VerifySignature(a.identity().sign_pk, "hellO", sig));
  CHECK_FALSE(VerifySignature(b.identity().sign_pk, "hello", sig));
  Signature bad = sig;
  bad[10] ^= 1;
  CHECK_FALSE(VerifySignature(a.identity().sign_pk, "hello", bad));
}

TEST_CASE("shared secret agrees and rejects low-order points", "[crypto][identity]") {
  REQUIRE(Init().ok());
  const SiteKey a = SiteKey::Generate();
  const SiteKey b = SiteKey::Generate();
  std::array<std::uint8_t, 32> ab{}, ba{};
  REQUIRE(a.SharedSecret(b.identity().box_pk, &ab));
  REQUIRE(b.SharedSecret(a.identity().box_pk, &ba));
  CHECK(ab == ba);
  CHECK(ab != std::array<std::uint8_t, 32>{});
  std::array<std::uint8_t, 32> out{};
  CHECK_FALSE(a.SharedSecret(PublicKey{}, &out));
  PublicKey one{};
  one[0] = 1;  // the point u=1 has order 4
  CHECK_FALSE(a.SharedSecret(one, &out));
}

TEST_CASE("the lent box secret is the key of box_pk and is not copied", "[crypto][identity]") {
  REQUIRE(Init().ok());
  const SiteKey a = SiteKey::Generate();
  const std::uint8_t* first = nullptr;
  PublicKey derived{};
  a.LendBoxSecret([&](const std::uint8_t* secret) {
    first = secret;
    REQUIRE(crypto_scalarmult_base(derived.data(), secret) == 0);
  });
  CHECK(derived == a.identity().box_pk);
  a.LendBoxSecret([&](const std::uint8_t* secret) { CHECK(secret == first); });
}

TEST_CASE("site key moves keep the identity", "[crypto][identity]") {
  REQUIRE(Init().ok());
  SiteKey a = SiteKey::Generate();
  const PublicIdentity id = a.identity();
  SiteKey b = std::move(a);
  CHECK(b.identity() == id);
  SiteKey c = SiteKey::Generate();
  c = std::move(b);
  CHECK(c.identity() == id);
  CHECK(VerifySignature(id.sign_pk, "x", c.Sign("x")));
}

TEST_CASE("key file create and load", "[crypto][identity][keyfile]") {
  REQUIRE(Init().ok());
  TempDir dir;
  const std::string path = dir.File("site.key");

  const mode_t old_umask = ::umask(0);  // a permissive umask must not widen the mode
  Status created = SiteKey::CreateFile(path);
  ::umask(old_umask);
  REQUIRE(created.ok());
  CHECK(FileMode(path) == 0600);

  const std::string content = ReadFile(path);
  CHECK(content.rfind("# relay site key -- secret, keep mode 0600\nrelay-secret-key-v1 ", 0) == 0);
  CHECK(content.size() == 43 + 20 + 86 + 1);  // 64 secret bytes in unpadded base64
  CHECK(content.back() == '\n');

  auto first = SiteKey::LoadFile(path);
  REQUIRE(first.ok());
  auto second = SiteKey::LoadFile(path);
  REQUIRE(second.ok());
  CHECK(first->identity() == second->identity());
  CHECK(VerifySignature(first->identity().sign_pk, "m", second->Sign("m")));
  std::array<std::uint8_t, 32> s1{}, s2{};
  const SiteKey other = SiteKey::Generate();
  REQUIRE(first->SharedSecret(other.identity().box_pk, &s1));
  REQUIRE(other.SharedSecret(second->identity().box_pk, &s2));
  CHECK(s1 == s2);

  SECTION("refuses to overwrite") {
    Status again = SiteKey::CreateFile(path);
    REQUIRE_FALSE(again.ok());
    CHECK(again.message() == "key file '" + path + "' already exists; refusing to overwrite");
    CHECK(ReadFile(path) == content);
  }
  SECTION("refuses group- or other-accessible files") {
    for (mode_t mode : {0640, 0604, 0660, 0602, 0620}) {
      REQUIRE(::chmod(path.c_str(), mode) == 0);
      auto r = SiteKey::LoadFile(path);
      REQUIRE_FALSE(r.ok());
      CHECK_THAT(r.message(), Catch::Contains("mode"));
      CHECK_THAT(r.message(), Catch::Contains("chmod 600 '" + path + "'"));
    }
    REQUIRE(::chmod(path.c_str(), 0640) == 0);
    CHECK_THAT(SiteKey::LoadFile(path).message(), Catch::Contains("has mode 0640"));
    REQUIRE(::chmod(path.c_str(), 0604) == 0);
    CHECK_THAT(SiteKey::LoadFile(path).message(), Catch::Contains("has mode 0604"));
    REQUIRE(::chmod(path.c_str(), 0400) == 0);
    CHECK(SiteKey::LoadFile(path).ok());
  }
}

TEST_CASE("key file load errors", "[crypto][identity][keyfile]") {
  REQUIRE(Init().ok());
  TempDir dir;
  const std::string good_path = dir.File("good.key");
  REQUIRE(SiteKey::CreateFile(good_path).ok());
  const std::string good = ReadFile(good_path);
  const std::string line1 = "# relay site key -- secret, keep mode 0600\n";
  const std::string encoded = good.substr(line1.size() + 20, 86);

  SECTION("missing file") {
    auto r = SiteKey::LoadFile(dir.File("absent.key"));
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.message(), Catch::Contains("cannot open key file '" + dir.File("absent.key")));
  }
  SECTION("create in a missing directory") {
    Status s = SiteKey::CreateFile(dir.File("no/such/dir.key"));
    REQUIRE_FALSE(s.ok());
    CHECK_THAT(s.message(), Catch::Contains("cannot create key file"));
  }
  SECTION("no trailing newline is accepted") {
    const std::string path = dir.File("k");
    WriteFile(path, good.substr(0, good.size() - 1), 0600);
    auto r = SiteKey::LoadFile(path);
    REQUIRE(r.ok());
    CHECK(r->identity() == SiteKey::LoadFile(good_path)->identity());
  }

  struct Case {
    std::string content;
    std::string expect;
  };
  std::string changed = encoded;
  changed[5] = changed[5] == 'A' ? 'B' : 'A';
  const std::vector<Case> cases = {
      {"", "line 1: expected"},
      {"relay-secret-key-v1 " + encoded + "\n", "line 1: expected"},
      {"# relay site key\nrelay-secret-key-v1 " + encoded + "\n", "line 1: expected"},
      {line1, "line 2: expected 'relay-secret-key-v1 '"},
      {line1 + "relay-secret-key-v2 " + encoded + "\n", "line 2: expected"},
      {line1 + "relay-secret-key-v1  " + encoded + "\n", "not valid base64url"},
      {line1 + "relay-secret-key-v1 " + encoded + "=\n", "not valid base64url"},
      {line1 + "relay-secret-key-v1 " + encoded + "\r\n", "not valid base64url"},
      {line1 + "relay-secret-key-v1 " + Base64Url(std::vector<unsigned char>(32, 9)) + "\n",
       "decodes to 32 bytes, want 64"},
      {line1 + "relay-secret-key-v1 " + Base64Url(std::vector<unsigned char>(65, 9)) + "\n",
       "decodes to 65 bytes, want 64"},
      {line1 + "relay-secret-key-v1 " + encoded + "\n\n", "unexpected content after line 2"},
      {line1 + "relay-secret-key-v1 " + encoded + "\nextra", "unexpected content after line 2"},
      {std::string(5000, 'x'), "bytes; a relay key file is two short lines"},
  };
  for (const Case& c : cases) {
    const std::string path = dir.File("bad.key");
    WriteFile(path, c.content, 0600);
    auto r = SiteKey::LoadFile(path);
    INFO("content: " << c.content);
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.message(), Catch::Contains("key file '" + path + "'"));
    CHECK_THAT(r.message(), Catch::Contains(c.expect));
    CHECK_THAT(r.message(), !Catch::Contains(encoded.substr(0, 20)));  // secrets never quoted
  }

  SECTION("a changed character loads a different key") {
    // The key file has no checksum: any 64 bytes are a valid key. Loading must still be exact.
    const std::string path = dir.File("changed.key");
    WriteFile(path, line1 + "relay-secret-key-v1 " + changed + "\n", 0600);
    auto r = SiteKey::LoadFile(path);
    REQUIRE(r.ok());
    CHECK_FALSE(r->identity() == SiteKey::LoadFile(good_path)->identity());
  }
}

}  // namespace
}  // namespace relay::crypto
