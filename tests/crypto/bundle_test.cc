#include "crypto/bundle.h"

#include <sodium.h>

#include <catch2/catch.hpp>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include "tests/crypto/frame_testing.h"
#include "tests/test_util.h"

namespace relay::crypto {
namespace {

using namespace std::string_literals;

// Layout from docs/wire-format.md, "Bundle", written out here independently of bundle.cc.
constexpr std::size_t kHeader = 112;
constexpr std::size_t kSig = 64;
constexpr std::size_t kKind = 5;
constexpr std::size_t kSender = 8;
constexpr std::size_t kRecipient = 40;
constexpr std::size_t kId = 72;
constexpr std::size_t kCreated = 88;
constexpr std::size_t kExpires = 96;
constexpr std::size_t kBodyLen = 104;

constexpr std::int64_t kCreatedAt = 1'700'000'000'000;  // 2023-11-14T22:13:20.000Z
constexpr std::int64_t kExpiresAt = kCreatedAt + 3'600'000;
constexpr std::int64_t kNow = kCreatedAt + 1'000;

// Three sites: a sends to b; c is a stranger to b.
struct Sites {
  bool initialised = Init().ok();  // first member: Init runs before the keys are generated
  SiteKey a = SiteKey::Generate();
  SiteKey b = SiteKey::Generate();
  SiteKey c = SiteKey::Generate();

  // b's peer table: only a.
  PeerLookup b_peers() const {
    PublicIdentity known = a.identity();
    return [known](const PublicKey& pk) -> std::optional<PublicIdentity> {
      if (pk == known.sign_pk) return known;
      return std::nullopt;
    };
  }
  // A frame of one event whose text is as long as `text`.
  std::string Frame(std::string_view text, std::uint64_t seq = 1) const {
    return SealFrame(a, b.identity(), seq, seq, 1, testing::Payload(text.size(), 1, seq));
  }
  BundleResult Open(std::string_view bytes, std::int64_t now = kNow) const {
    return OpenBundle(b, b_peers(), bytes, now);
  }
};

std::uint64_t GetU(std::string_view bytes, std::size_t offset, std::size_t width) {
  std::uint64_t v = 0;
  for (std::size_t i = 0; i < width; ++i)
    v = (v << 8) | static_cast<unsigned char>(bytes[offset + i]);
  return v;
}
void PutU(std::string* bytes, std::size_t offset, std::size_t width, std::uint64_t v) {
  for (std::size_t i = width; i-- > 0; v >>= 8) (*bytes)[offset + i] = static_cast<char>(v & 0xff);
}
std::string U32(std::uint64_t v) {
  std::string s(4, '\0');
  PutU(&s, 0, 4, v);
  return s;
}

// header || BLAKE2b-256(body), as the spec says, computed independently of the implementation.
std::string SignedInput(std::string_view bundle) {
  std::string_view signed_part = bundle.substr(0, bundle.size() - kSig);
  std::string input(signed_part.substr(0, kHeader));
  unsigned char digest[32];
  crypto_generichash(digest, sizeof digest,
                     reinterpret_cast<const unsigned char*>(signed_part.data()) + kHeader,
                     signed_part.size() - kHeader, nullptr, 0);
  input.append(reinterpret_cast<const char*>(digest), sizeof digest);
  return input;
}

// Replaces the body of a sealed bundle (fixing body_len) and re-signs it with `key`, so that
// only the deliberate change is wrong.
std::string WithBody(const SiteKey& key, std::string bundle, std::string_view body) {
  bundle.replace(kHeader, bundle.size() - kHeader - kSig, body);
  PutU(&bundle, kBodyLen, 8, body.size());
  const Signature sig = key.Sign(SignedInput(bundle));
  bundle.replace(bundle.size() - kSig, kSig, reinterpret_cast<const char*>(sig.data()), kSig);
  return bundle;
}

Rejection Rejected(const Sites& s, std::string_view bytes, std::int64_t now = kNow) {
  BundleResult r = s.Open(bytes, now);
  REQUIRE_FALSE(r.ok());
  CHECK_FALSE(r.expired);
  CHECK(r.rejection.message.rfind("bundle rejected: ", 0) == 0);
  return r.rejection;
}
RejectReason Reason(const Sites& s, std::string_view bytes) { return Rejected(s, bytes).reason; }

std::string Random(std::size_t n) {
  std::string out(n, '\0');
  randombytes_buf(out.data(), out.size());
  return out;
}

TEST_CASE("frames bundles round trip", "[crypto][bundle]") {
  Sites s;
  std::vector<std::string> frames;
  SECTION("no frames") {}
  SECTION("one frame") { frames.push_back(s.Frame("one event")); }
  SECTION("50 frames") {
    for (std::uint64_t i = 1; i <= 50; ++i) frames.push_back(s.Frame(Random(i * 7), i));
  }
  SECTION("a 2 MiB frame between small ones") {
    frames.push_back(s.Frame("before", 1));
    frames.push_back(s.Frame(Random(2 << 20), 2));
    frames.push_back(s.Frame("after", 3));
  }

  BundleId id{};
  const std::string bytes = SealBundle(s.a, s.b.identity(), frames, kCreatedAt, kExpiresAt, &id);
  std::size_t body_len = 4;
  for (const auto& f : frames) body_len += 4 + f.size();
  REQUIRE(bytes.size() == kHeader + body_len + kSig);
  CHECK(bytes.substr(0, 4) == "RLYB");
  CHECK(GetU(bytes, kBodyLen, 8) == body_len);
  CHECK(static_cast<std::int64_t>(GetU(bytes, kCreated, 8)) == kCreatedAt);
  CHECK(static_cast<std::int64_t>(GetU(bytes, kExpires, 8)) == kExpiresAt);
  CHECK(GetU(bytes, kHeader, 4) == frames.size());

  BundleResult r = s.Open(bytes);
  REQUIRE(r.ok());
  CHECK_FALSE(r.expired);
  const Bundle& bundle = *r.bundle;
  CHECK(bundle.header.kind == BundleKind::kFrames);
  CHECK(bundle.header.sender == s.a.identity().sign_pk);
  CHECK(bundle.header.recipient == s.b.identity().sign_pk);
  CHECK(bundle.header.id == id);
  CHECK(std::string(bytes, kId, 16) == std::string(id.begin(), id.end()));
  CHECK(bundle.header.created_at_ms == kCreatedAt);
  CHECK(bundle.header.expires_at_ms == kExpiresAt);
  CHECK(bundle.ack_through == 0);
  REQUIRE(bundle.frames == frames);
  // The frames inside are untouched: each still opens for the recipient.
  for (const auto& f : bundle.frames) CHECK(OpenFrame(s.b, s.b_peers(), f).ok());
}

TEST_CASE("bundle ids are random and printed as 32 lowercase hex digits", "[crypto][bundle]") {
  Sites s;
  BundleId first{};
  BundleId second{};
  SealBundle(s.a, s.b.identity(), {}, kCreatedAt, 0, &first);
  SealBundle(s.a, s.b.identity(), {}, kCreatedAt, 0, &second);
  CHECK(first != second);

  BundleId id{};
  for (std::size_t i = 0; i < id.size(); ++i) id[i] = static_cast<std::uint8_t>(i * 17);
  CHECK(BundleIdHex(id) == "00112233445566778899aabbccddeeff");
  CHECK(BundleIdHex(BundleId{}) == std::string(32, '0'));
  id.fill(0xAB);
  std::string abs;
  for (int i = 0; i < 16; ++i) abs += "ab";
  CHECK(BundleIdHex(id) == abs);
}

TEST_CASE("ack bundles round trip", "[crypto][bundle]") {
  Sites s;
  const std::uint64_t through =
      GENERATE(std::uint64_t{0}, std::uint64_t{42}, std::numeric_limits<std::uint64_t>::max());
  const std::string bytes = SealAck(s.a, s.b.identity(), through, kCreatedAt, 0);
  REQUIRE(bytes.size() == kHeader + 8 + kSig);
  CHECK(bytes[kKind] == 2);
  CHECK(GetU(bytes, kHeader, 8) == through);

  BundleResult r = s.Open(bytes);
  REQUIRE(r.ok());
  CHECK(r.bundle->header.kind == BundleKind::kAck);
  CHECK(r.bundle->ack_through == through);
  CHECK(r.bundle->frames.empty());
  CHECK(r.bundle->header.expires_at_ms == 0);
  CHECK(r.bundle->header.sender == s.a.identity().sign_pk);
}

TEST_CASE("a bundle survives a round trip through a file", "[crypto][bundle]") {
  Sites s;
  testing::TempDir dir;
  const std::string bytes =
      SealBundle(s.a, s.b.identity(), {s.Frame(std::string(300, '\0'))}, kCreatedAt, kExpiresAt);
  const std::string path = dir.Write("out.rlyb", bytes);
  std::ifstream in(path, std::ios::binary);
  const std::string read((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  REQUIRE(read == bytes);
  BundleResult r = s.Open(read);
  REQUIRE(r.ok());
  CHECK(r.bundle->frames.at(0) == bytes.substr(kHeader + 8, r.bundle->frames.at(0).size()));
}

TEST_CASE("every proper prefix of a bundle is truncated", "[crypto][bundle]") {
  Sites s;
  for (const std::string& bytes :
       {SealAck(s.a, s.b.identity(), 7, kCreatedAt, 0),
        SealBundle(s.a, s.b.identity(), {s.Frame("x"), s.Frame("y")}, kCreatedAt, 0)}) {
    for (std::size_t n = 0; n < bytes.size(); ++n) {
      INFO("prefix of " << n << " bytes");
      const Rejection rej = Rejected(s, bytes.substr(0, n));
      CHECK(rej.reason == RejectReason::kTruncated);
      CHECK(rej.message.find("truncated: " + std::to_string(n) + " bytes") != std::string::npos);
    }
  }
  CHECK(Rejected(s, "").message == "bundle rejected: truncated: 0 bytes, header needs 112");
}

TEST_CASE("bundle with a bad magic or version", "[crypto][bundle]") {
  Sites s;
  std::string bytes = SealAck(s.a, s.b.identity(), 1, kCreatedAt, 0);

  SECTION("a frame is not a bundle") {
    const Rejection rej = Rejected(s, s.Frame("hi"));
    CHECK(rej.reason == RejectReason::kBadMagic);
    CHECK(rej.message.find("not a relay bundle") != std::string::npos);
  }
  SECTION("four bytes of something else") {
    CHECK(Reason(s, "PK\x03\x04") == RejectReason::kBadMagic);
  }
  SECTION("version 0 and 1") {
    for (char v : {'\0', '\1'}) {
      bytes[4] = v;
      const Rejection rej = Rejected(s, bytes);
      CHECK(rej.reason == RejectReason::kUnsupportedVersion);
      CHECK(rej.message.find("format version " + std::to_string(v)) != std::string::npos);
    }
  }
  SECTION("a short input with a future version is unsupported, not truncated") {
    CHECK(Reason(s, "RLYB\x09") == RejectReason::kUnsupportedVersion);
  }
}

// Which reason a flipped bit at `offset` of the header gives (the table in the spec).
RejectReason ExpectedForHeaderFlip(std::string_view original, std::size_t offset, int bit) {
  if (offset < 4) return RejectReason::kBadMagic;
  if (offset == 4) return RejectReason::kUnsupportedVersion;
  if (offset == 5) {  // kind: another known kind is caught by the signature
    const unsigned kind = static_cast<unsigned char>(original[5]) ^ (1u << bit);
    return kind >= 1 && kind <= 3 ? RejectReason::kBadSignature : RejectReason::kMalformed;
  }
  if (offset < kSender) return RejectReason::kMalformed;  // reserved
  if (offset < kRecipient) return RejectReason::kUnknownSender;
  if (offset < kId) return RejectReason::kWrongRecipient;
  if (offset < kBodyLen) return RejectReason::kBadSignature;  // id, created_at, expires_at
  // body_len: over 4 GiB is malformed, longer than the file is truncated, shorter leaves
  // trailing bytes (malformed).
  const std::uint64_t declared = GetU(original, kBodyLen, 8);
  const std::uint64_t flipped =
      declared ^ (std::uint64_t{1} << ((kHeader - 1 - offset) * 8 + static_cast<std::size_t>(bit)));
  if (flipped > (std::uint64_t{1} << 32)) return RejectReason::kMalformed;
  return flipped > declared ? RejectReason::kTruncated : RejectReason::kMalformed;
}

TEST_CASE("a flipped bit anywhere in the header is rejected with the field's reason",
          "[crypto][bundle]") {
  Sites s;
  for (const std::string& original :
       {SealBundle(s.a, s.b.identity(), {s.Frame("x"), s.Frame("yz")}, kCreatedAt, kExpiresAt),
        SealAck(s.a, s.b.identity(), 99, kCreatedAt, 0)}) {
    for (std::size_t offset = 0; offset < kHeader; ++offset) {
      for (int bit = 0; bit < 8; ++bit) {
        std::string bytes = original;
        bytes[offset] = static_cast<char>(bytes[offset] ^ (1 << bit));
        INFO("offset " << offset << " bit " << bit);
        CHECK(Reason(s, bytes) == ExpectedForHeaderFlip(original, offset, bit));
      }
    }
  }
}

TEST_CASE("a flipped bit in the body or signature is a bad signature", "[crypto][bundle]") {
  Sites s;
  const std::string frames =
      SealBundle(s.a, s.b.identity(), {s.Frame("hello"), s.Frame("world")}, kCreatedAt, 0);
  const std::string ack = SealAck(s.a, s.b.identity(), 5, kCreatedAt, 0);
  for (const bool is_ack : {false, true}) {
    const std::string& original = is_ack ? ack : frames;
    for (std::size_t offset = kHeader; offset < original.size(); ++offset) {
      // Every bit of the ack and of both signatures; bits 0, 3, 6 of each byte of the frames body.
      const bool every_bit = is_ack || offset >= original.size() - kSig;
      for (int bit = 0; bit < 8; bit += every_bit ? 1 : 3) {
        std::string bytes = original;
        bytes[offset] = static_cast<char>(bytes[offset] ^ (1 << bit));
        INFO("offset " << offset << " bit " << bit);
        const Rejection rej = Rejected(s, bytes);
        CHECK(rej.reason == RejectReason::kBadSignature);
        CHECK(rej.message.find("bad signature from peer " + s.a.identity().Fingerprint()) !=
              std::string::npos);
      }
    }
  }
}

TEST_CASE("trailing bytes after the signature are malformed", "[crypto][bundle]") {
  Sites s;
  const std::string bytes = SealBundle(s.a, s.b.identity(), {s.Frame("x")}, kCreatedAt, 0);
  for (std::size_t extra : {1, 64, 1000}) {
    const Rejection rej = Rejected(s, bytes + std::string(extra, '\0'));
    CHECK(rej.reason == RejectReason::kMalformed);
    CHECK(rej.message.find(std::to_string(extra) + " trailing bytes") != std::string::npos);
  }
  // A second bundle appended to the first is not read as one.
  CHECK(Reason(s, bytes + bytes) == RejectReason::kMalformed);
}

TEST_CASE("a declared body over 4 GiB is malformed", "[crypto][bundle]") {
  Sites s;
  std::string bytes = SealAck(s.a, s.b.identity(), 1, kCreatedAt, 0);
  PutU(&bytes, kBodyLen, 8, (std::uint64_t{1} << 32) + 1);
  Rejection rej = Rejected(s, bytes);
  CHECK(rej.reason == RejectReason::kMalformed);
  CHECK(rej.message.find("more than the limit of 4294967296") != std::string::npos);
  // Exactly 4 GiB is allowed; this file is just far too short for it.
  PutU(&bytes, kBodyLen, 8, std::uint64_t{1} << 32);
  CHECK(Reason(s, bytes) == RejectReason::kTruncated);
  PutU(&bytes, kBodyLen, 8, std::numeric_limits<std::uint64_t>::max());
  CHECK(Reason(s, bytes) == RejectReason::kMalformed);
}

TEST_CASE("a bundle sealed for another site is the wrong recipient", "[crypto][bundle]") {
  Sites s;
  const std::string bytes = SealBundle(s.a, s.c.identity(), {}, kCreatedAt, 0);
  const Rejection rej = Rejected(s, bytes);
  CHECK(rej.reason == RejectReason::kWrongRecipient);
  CHECK(rej.message.find("addressed to site " + s.c.identity().Fingerprint()) != std::string::npos);
  CHECK(rej.message.find("this site is " + s.b.identity().Fingerprint()) != std::string::npos);
}

TEST_CASE("a bundle from a site that is not a peer is an unknown sender", "[crypto][bundle]") {
  Sites s;
  const std::string bytes = SealAck(s.c, s.b.identity(), 3, kCreatedAt, 0);
  const Rejection rej = Rejected(s, bytes);
  CHECK(rej.reason == RejectReason::kUnknownSender);
  CHECK(rej.message.find("sender " + s.c.identity().Fingerprint() + " is not a configured peer") !=
        std::string::npos);
  // No peer table at all.
  CHECK(OpenBundle(s.b, nullptr, bytes, kNow).rejection.reason == RejectReason::kUnknownSender);
}

TEST_CASE("bundle expiry", "[crypto][bundle]") {
  Sites s;
  const std::string bytes = SealAck(s.a, s.b.identity(), 8, kCreatedAt, kExpiresAt);
  CHECK(s.Open(bytes, kExpiresAt - 1).ok());

  for (std::int64_t now : {kExpiresAt, kExpiresAt + 1, std::numeric_limits<std::int64_t>::max()}) {
    BundleResult r = s.Open(bytes, now);
    REQUIRE_FALSE(r.ok());
    CHECK(r.expired);
    CHECK(r.rejection.reason == RejectReason::kMalformed);
    CHECK(r.rejection.message ==
          "bundle rejected: expired at 2023-11-14T23:13:20.000Z (created "
          "2023-11-14T22:13:20.000Z)");
  }

  // expires_at 0 never expires.
  const std::string forever = SealAck(s.a, s.b.identity(), 8, kCreatedAt, 0);
  CHECK(s.Open(forever, std::numeric_limits<std::int64_t>::max()).ok());

  // Expiry is checked last: a tampered expired bundle reports the tampering.
  std::string tampered = bytes;
  tampered[kCreated] = static_cast<char>(tampered[kCreated] ^ 1);
  BundleResult r = s.Open(tampered, kExpiresAt + 1);
  CHECK_FALSE(r.expired);
  CHECK(r.rejection.reason == RejectReason::kBadSignature);
}

TEST_CASE("a correctly signed body with an inconsistent frame list is malformed",
          "[crypto][bundle]") {
  Sites s;
  const std::string x = s.Frame("x");
  const std::string y = s.Frame("y");
  const std::string sealed = SealBundle(s.a, s.b.identity(), {x, y}, kCreatedAt, 0);
  // The helper itself produces a bundle the implementation accepts.
  const std::string consistent = U32(2) + U32(x.size()) + x + U32(y.size()) + y;
  REQUIRE(WithBody(s.a, sealed, consistent) == sealed);

  struct Case {
    std::string body;
    std::string says;
  };
  const std::vector<Case> cases = {
      {"", "frames body is 0 bytes, too short for the 4-byte frame count"},
      {"\0\0\0"s, "frames body is 3 bytes"},
      {U32(3) + U32(x.size()) + x + U32(y.size()) + y, "frame 3 of 3: its 4-byte length"},
      {U32(2) + U32(x.size()) + x + U32(y.size()) + y.substr(0, 10),
       "frame 2 of 2 declares " + std::to_string(y.size()) + " bytes, but only 10 are left"},
      {U32(2) + U32(x.size()) + x + "\0\0"s, "frame 2 of 2: its 4-byte length needs more"},
      {U32(1) + U32(x.size()) + x + U32(y.size()) + y,
       std::to_string(4 + y.size()) + " bytes after the last of 1 frames"},
      {U32(0) + "x", "1 bytes after the last of 0 frames"},
      {U32(0xffffffff) + U32(x.size()) + x, "frame 2 of 4294967295"},
  };
  for (const Case& c : cases) {
    INFO(c.says);
    const Rejection rej = Rejected(s, WithBody(s.a, sealed, c.body));
    CHECK(rej.reason == RejectReason::kMalformed);
    CHECK(rej.message.find(c.says) != std::string::npos);
  }
}

TEST_CASE("a frame entry that does not start with RLYF is malformed", "[crypto][bundle]") {
  Sites s;
  const std::string x = s.Frame("x");
  const std::string sealed = SealBundle(s.a, s.b.identity(), {x}, kCreatedAt, 0);
  for (const std::string& entry :
       {std::string("RLYC") + x.substr(4), std::string(), std::string("RLY"), Random(300)}) {
    const std::string body = U32(2) + U32(x.size()) + x + U32(entry.size()) + entry;
    const Rejection rej = Rejected(s, WithBody(s.a, sealed, body));
    CHECK(rej.reason == RejectReason::kMalformed);
    CHECK(rej.message.find("frame 2 of 2 (" + std::to_string(entry.size()) +
                           " bytes) does not start with 'RLYF'") != std::string::npos);
  }
}

TEST_CASE("resend requests carry the position and ascending ranges", "[crypto][bundle]") {
  Sites s;
  const std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges = {{12, 20}, {25, 25}};
  const std::string sealed =
      relay::crypto::SealResendRequest(s.a, s.b.identity(), 10, ranges, kCreatedAt, 0);
  auto r = relay::crypto::OpenBundle(s.b, s.b_peers(), sealed, kCreatedAt);
  REQUIRE(r.ok());
  CHECK(r.bundle->header.kind == relay::crypto::BundleKind::kResend);
  CHECK(r.bundle->ack_through == 10);
  CHECK(r.bundle->ranges == ranges);
  // A range not beyond the position (or overlapping) is malformed even when correctly signed.
  const std::string bad =
      relay::crypto::SealResendRequest(s.a, s.b.identity(), 10, {{5, 8}}, kCreatedAt, 0);
  const Rejection rej = Rejected(s, bad);
  CHECK(rej.reason == RejectReason::kMalformed);
  CHECK_THAT(rej.message, Catch::Contains("not ascending"));
}

TEST_CASE("ack bodies must be exactly 8 bytes and kinds 1 to 3", "[crypto][bundle]") {
  Sites s;
  const std::string sealed = SealAck(s.a, s.b.identity(), 1, kCreatedAt, 0);
  for (std::size_t n : {0, 7, 9, 16}) {
    const Rejection rej = Rejected(s, WithBody(s.a, sealed, std::string(n, '\1')));
    CHECK(rej.reason == RejectReason::kMalformed);
    CHECK(rej.message == "bundle rejected: ack body is " + std::to_string(n) + " bytes, must be 8");
  }
  for (char kind : {'\0', '\4', '\xff'}) {
    std::string bytes = sealed;
    bytes[kKind] = kind;
    const Rejection rej = Rejected(s, WithBody(s.a, bytes, std::string(8, '\0')));
    CHECK(rej.reason == RejectReason::kMalformed);
    CHECK(rej.message.find("unknown bundle kind") != std::string::npos);
  }
  std::string reserved = sealed;
  reserved[7] = 1;
  CHECK(Rejected(s, WithBody(s.a, reserved, std::string(8, '\0'))).message ==
        "bundle rejected: reserved field is 1, must be 0");
}

}  // namespace
}  // namespace relay::crypto
