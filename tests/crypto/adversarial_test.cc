// Adversarial-input catalogue for the crypto layer (issue 6, item 4).
//
// Every known-bad input class is fed to OpenFrame, OpenControl and OpenBundle with real keys, and
// each must be refused with its own reason AND the message that names what was wrong (the full
// text, computed here from docs/wire-format.md rather than from the implementation):
//   - a flipped bit in every bit of every header field of frames, control messages (every type)
//     and bundles (every kind), in the ciphertext / body and in the signature;
//   - truncation at every length, and extra bytes;
//   - inputs sealed by an unknown key, for another site, claiming another sender, re-signed by
//     the real sender after tampering (decrypt_failed), low-order ephemeral keys;
//   - oversize declared lengths (4 GiB frames, 2^64-1 bundle bodies);
//   - bundles of the wrong kind, expired, with inconsistent bodies, and well-signed bundles that
//     carry bad frames (the frames inside are refused when opened).
// Replay is not a property of these functions (they keep no state): the daemon's replay checks
// are covered by tests/relay/daemon_frames_test.cc and tests/integration/test_adversarial.py.
//
// The number of inputs checked is printed as "adversarial cases: N" when the test binary exits
// (and per test case as "adversarial cases (<class>): N").

#include <sodium.h>

#include <catch2/catch.hpp>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "crypto/bundle.h"
#include "crypto/frame.h"
#include "tests/crypto/frame_testing.h"

namespace relay::crypto {
namespace {

using namespace std::string_literals;
using testing::Payload;
using testing::ResignFrame;

// ---- layouts (docs/wire-format.md), written out independently of the implementation --------
constexpr std::size_t kSig = 64;
constexpr std::size_t kFrameHeader = 152;
constexpr std::size_t kFFlags = 5, kFReserved = 6, kFSender = 8, kFRecipient = 40;
constexpr std::size_t kFEphemeral = 72, kFNonce = 104, kFFirst = 128, kFLast = 136;
constexpr std::size_t kFCount = 144, kFCtLen = 148;
constexpr std::size_t kControlHeader = 84;
constexpr std::size_t kCType = 5, kCReserved = 6, kCSender = 8, kCRecipient = 40;
constexpr std::size_t kCTimestamp = 72, kCBodyLen = 80;
constexpr std::size_t kBundleHeader = 112;
constexpr std::size_t kBKind = 5, kBReserved = 6, kBSender = 8, kBRecipient = 40, kBId = 72;
constexpr std::size_t kBCreated = 88, kBExpires = 96, kBBodyLen = 104;
constexpr std::uint64_t kBundleMaxBody = std::uint64_t{1} << 32;

constexpr std::int64_t kCreatedAt = 1'700'000'000'000;  // 2023-11-14T22:13:20.000Z
constexpr std::int64_t kExpiresAt = kCreatedAt + 3'600'000;
constexpr std::int64_t kNow = kCreatedAt + 1'000;

// ---- counting ---------------------------------------------------------------------------------
std::size_t g_total = 0;
struct TotalReport {
  ~TotalReport() { std::printf("adversarial cases: %zu\n", g_total); }
} g_total_report;

class Counter {
 public:
  explicit Counter(const char* what) : what_(what) {}
  ~Counter() { std::printf("adversarial cases (%s): %zu\n", what_, n_); }
  void operator++() {
    ++n_;
    ++g_total;
  }
  std::size_t count() const { return n_; }

 private:
  const char* what_;
  std::size_t n_ = 0;
};

// ---- keys ---------------------------------------------------------------------------------------
// a sends to b; c is a stranger to b.
struct Sites {
  bool initialised = Init().ok();  // first member: Init runs before the keys are generated
  SiteKey a = SiteKey::Generate();
  SiteKey b = SiteKey::Generate();
  SiteKey c = SiteKey::Generate();

  static PeerLookup Lookup(std::vector<PublicIdentity> known) {
    return [known](const PublicKey& pk) -> std::optional<PublicIdentity> {
      for (const auto& id : known)
        if (id.sign_pk == pk) return id;
      return std::nullopt;
    };
  }
  PeerLookup b_peers() const { return Lookup({a.identity()}); }
};

// ---- helpers ------------------------------------------------------------------------------------
std::uint64_t GetU(std::string_view bytes, std::size_t offset, std::size_t width) {
  std::uint64_t v = 0;
  for (std::size_t i = 0; i < width; ++i)
    v = (v << 8) | static_cast<unsigned char>(bytes[offset + i]);
  return v;
}
void PutU(std::string* bytes, std::size_t offset, std::size_t width, std::uint64_t v) {
  for (std::size_t i = width; i-- > 0; v >>= 8) (*bytes)[offset + i] = static_cast<char>(v & 0xff);
}
std::string Flip(std::string bytes, std::size_t offset, int bit) {
  bytes[offset] = static_cast<char>(bytes[offset] ^ (1 << bit));
  return bytes;
}
// The value of a big-endian field after flipping `bit` of byte `offset` inside it.
std::uint64_t FlippedField(std::string_view bytes, std::size_t field, std::size_t width,
                           std::size_t offset, int bit) {
  const std::size_t shift = (field + width - 1 - offset) * 8 + static_cast<std::size_t>(bit);
  return GetU(bytes, field, width) ^ (std::uint64_t{1} << shift);
}
// Fingerprint: the first 8 bytes of a sign_pk in lowercase hex.
std::string Fp(std::string_view bytes, std::size_t offset) {
  static const char kHex[] = "0123456789abcdef";
  std::string out;
  for (std::size_t i = 0; i < 8; ++i) {
    const auto c = static_cast<unsigned char>(bytes[offset + i]);
    out += kHex[c >> 4];
    out += kHex[c & 15];
  }
  return out;
}
std::string Fp(const SiteKey& key) {
  std::string_view pk(reinterpret_cast<const char*>(key.identity().sign_pk.data()), 32);
  return Fp(pk, 0);
}
std::string Random(std::size_t n) {
  std::string out(n, '\0');
  randombytes_buf(out.data(), out.size());
  return out;
}
// Re-signs header || BLAKE2b-256(body) of a control message or bundle with `key`, so only the
// deliberate change is wrong (frames: ResignFrame, tests/crypto/frame_testing.h).
void Resign(const SiteKey& key, std::size_t header_size, std::string* bytes) {
  std::string_view signed_part = std::string_view(*bytes).substr(0, bytes->size() - kSig);
  std::string input(signed_part.substr(0, header_size));
  unsigned char digest[32];
  crypto_generichash(digest, sizeof digest,
                     reinterpret_cast<const unsigned char*>(signed_part.data()) + header_size,
                     signed_part.size() - header_size, nullptr, 0);
  input.append(reinterpret_cast<const char*>(digest), sizeof digest);
  const Signature sig = key.Sign(input);
  bytes->replace(bytes->size() - kSig, kSig, reinterpret_cast<const char*>(sig.data()), kSig);
}

struct Expect {
  RejectReason reason;
  std::string message;  // the whole message
};

// The messages of docs/wire-format.md, "<noun> rejected: ...".
std::string BadMagic(const std::string& noun, const char* magic) {
  return noun + " rejected: does not start with '" + magic + "' (not a relay " + noun + ")";
}
std::string Version(const std::string& noun, unsigned v) {
  return noun + " rejected: format version " + std::to_string(v) +
         " is not supported (this relay supports version 2)";
}
std::string ShortHeader(const std::string& noun, std::size_t n, std::size_t header) {
  return noun + " rejected: truncated: " + std::to_string(n) + " bytes, header needs " +
         std::to_string(header);
}
std::string Declares(const std::string& noun, std::size_t n, std::uint64_t total) {
  return noun + " rejected: truncated: " + std::to_string(n) + " bytes, header declares " +
         std::to_string(total);
}
std::string Trailing(const std::string& noun, std::size_t n, std::uint64_t total) {
  return noun + " rejected: " + std::to_string(n - total) +
         " trailing bytes after the signature (" + std::to_string(n) + " bytes, header declares " +
         std::to_string(total) + ")";
}
std::string OverLimit(const std::string& noun, std::uint64_t declared, std::uint64_t limit) {
  return noun + " rejected: header declares a body of " + std::to_string(declared) +
         " bytes, more than the limit of " + std::to_string(limit);
}
std::string WrongRecipient(const std::string& noun, const std::string& to,
                           const std::string& self) {
  return noun + " rejected: addressed to site " + to + ", but this site is " + self;
}
std::string UnknownSender(const std::string& noun, const std::string& from) {
  return noun + " rejected: sender " + from + " is not a configured peer";
}
std::string BadSignature(const std::string& noun, const std::string& from) {
  return noun + " rejected: bad signature from peer " + from;
}
// A changed declared length: larger is truncated, smaller leaves trailing bytes.
Expect Length(const std::string& noun, std::size_t size, std::uint64_t declared_total,
              std::uint64_t original_total) {
  if (declared_total > original_total)
    return {RejectReason::kTruncated, Declares(noun, size, declared_total)};
  return {RejectReason::kMalformed, Trailing(noun, size, declared_total)};
}

template <typename Result>
void CheckRejected(const Result& r, const Expect& want, Counter& n) {
  REQUIRE_FALSE(r.ok());
  CHECK(RejectReasonName(r.rejection.reason) == std::string(RejectReasonName(want.reason)));
  CHECK(r.rejection.message == want.message);
  ++n;
}

// ---- frames -------------------------------------------------------------------------------------
const std::string kFrameNoun = "frame";

std::string FlagsMessage(std::uint64_t flags, std::uint64_t reserved) {
  return "frame rejected: flags " + std::to_string(flags) +
         " (known: " + std::to_string(kFrameKnownFlags) + ") and reserved " +
         std::to_string(reserved) + " (must be 0)";
}

Expect DecryptFailed(const Sites& s) {
  return {RejectReason::kDecryptFailed,
          "frame rejected: frame from peer " + Fp(s.a) +
              " does not decrypt (altered, or not sealed for this site)"};
}

// What a single flipped bit at (offset, bit) of a frame header gives, in the documented order.
Expect FrameHeaderFlip(const Sites& s, const std::string& frame, std::size_t offset, int bit) {
  const std::string bad = Flip(frame, offset, bit);
  const std::uint64_t ctlen = GetU(frame, kFCtLen, 4);
  const std::uint64_t total = kFrameHeader + ctlen + kSig;
  if (offset < 4) return {RejectReason::kBadMagic, BadMagic(kFrameNoun, "RLYF")};
  if (offset == 4)
    return {RejectReason::kUnsupportedVersion,
            Version(kFrameNoun, static_cast<unsigned char>(bad[4]))};
  if (offset >= kFCtLen) {
    const std::uint64_t declared = FlippedField(frame, kFCtLen, 4, offset, bit);
    return Length(kFrameNoun, frame.size(), kFrameHeader + declared + kSig, total);
  }
  const std::uint64_t flags = GetU(bad, kFFlags, 1), reserved = GetU(bad, kFReserved, 2);
  if ((flags & ~std::uint64_t{kFrameKnownFlags}) != 0 || reserved != 0)
    return {RejectReason::kMalformed, FlagsMessage(flags, reserved)};
  if (offset < kFSender)  // a known flag set or cleared: the AEAD's associated data changed
    return DecryptFailed(s);
  const std::uint64_t first = GetU(bad, kFFirst, 8), last = GetU(bad, kFLast, 8);
  if (last > kMaxSequence)
    return {RejectReason::kMalformed, "frame rejected: sequence " + std::to_string(last) +
                                          " is beyond the largest allowed (" +
                                          std::to_string(kMaxSequence) + ")"};
  if (first > last)
    return {RejectReason::kMalformed, "frame rejected: sequence range " + std::to_string(first) +
                                          ".." + std::to_string(last) + " is inverted"};
  if (offset < kFRecipient)
    return {RejectReason::kUnknownSender, UnknownSender(kFrameNoun, Fp(bad, kFSender))};
  if (offset < kFEphemeral)
    return {RejectReason::kWrongRecipient,
            WrongRecipient(kFrameNoun, Fp(bad, kFRecipient), Fp(s.b))};
  // ephemeral, nonce, first_seq, last_seq, event_count: the AEAD's associated data.
  return DecryptFailed(s);
}

TEST_CASE("catalogue: a flipped bit in every bit of a frame header", "[crypto][adversarial]") {
  Sites s;
  REQUIRE(s.initialised);
  Counter n("frame header bits");
  // Sequence values with bits set high and low, so flips go both ways (inverted or not).
  const std::uint64_t first = 0x0000'0100'0000'0005, last = 0x0000'0100'0001'0007;
  const std::string frame = SealFrame(s.a, s.b.identity(), first, last, 3, Payload(40));
  REQUIRE(OpenFrame(s.b, s.b_peers(), frame).ok());
  std::size_t per_reason[static_cast<std::size_t>(RejectReason::kCount)] = {};
  for (std::size_t offset = 0; offset < kFrameHeader; ++offset) {
    for (int bit = 0; bit < 8; ++bit) {
      INFO("header byte " << offset << " bit " << bit);
      const Expect want = FrameHeaderFlip(s, frame, offset, bit);
      CheckRejected(OpenFrame(s.b, s.b_peers(), Flip(frame, offset, bit)), want, n);
      ++per_reason[static_cast<std::size_t>(want.reason)];
    }
  }
  CHECK(n.count() == kFrameHeader * 8);
  // Every class of the field table is exercised by this frame.
  for (RejectReason r :
       {RejectReason::kBadMagic, RejectReason::kUnsupportedVersion, RejectReason::kMalformed,
        RejectReason::kUnknownSender, RejectReason::kWrongRecipient, RejectReason::kDecryptFailed,
        RejectReason::kTruncated}) {
    INFO(RejectReasonName(r));
    CHECK(per_reason[static_cast<std::size_t>(r)] > 0);
  }
}

TEST_CASE("catalogue: a flipped bit in every bit of a frame's ciphertext and signature",
          "[crypto][adversarial]") {
  Sites s;
  Counter n("frame ciphertext and signature bits");
  const std::string payload = Payload(8, 2);
  const std::string frame = SealFrame(s.a, s.b.identity(), 1, 2, 2, payload);
  for (std::size_t offset = kFrameHeader; offset < frame.size(); ++offset) {
    for (int bit = 0; bit < 8; ++bit) {
      INFO("byte " << offset << " bit " << bit);
      // The ciphertext and its tag fail the AEAD; the signature fails itself.
      const Expect want = offset < frame.size() - kSig ? DecryptFailed(s)
                                                       : Expect{RejectReason::kBadSignature,
                                                                BadSignature(kFrameNoun, Fp(s.a))};
      CheckRejected(OpenFrame(s.b, s.b_peers(), Flip(frame, offset, bit)), want, n);
    }
  }
  CHECK(n.count() == (payload.size() + 16 + kSig) * 8);
}

TEST_CASE("catalogue: a frame truncated at every length, or with bytes appended",
          "[crypto][adversarial]") {
  Sites s;
  Counter n("frame truncation and extension");
  const std::string frame = SealFrame(s.a, s.b.identity(), 3, 9, 4, Payload(30, 4, 3));
  const std::uint64_t total = frame.size();
  for (std::size_t len = 0; len < frame.size(); ++len) {
    INFO("first " << len << " bytes");
    const Expect want{RejectReason::kTruncated, len < kFrameHeader
                                                    ? ShortHeader(kFrameNoun, len, kFrameHeader)
                                                    : Declares(kFrameNoun, len, total)};
    CheckRejected(OpenFrame(s.b, s.b_peers(), frame.substr(0, len)), want, n);
  }
  for (std::size_t extra : {1, 2, 63, 64, 65, 1000}) {
    INFO(extra << " bytes appended");
    CheckRejected(OpenFrame(s.b, s.b_peers(), frame + Random(extra)),
                  {RejectReason::kMalformed, Trailing(kFrameNoun, total + extra, total)}, n);
  }
  CheckRejected(OpenFrame(s.b, s.b_peers(), frame + frame),
                {RejectReason::kMalformed, Trailing(kFrameNoun, 2 * total, total)}, n);
  // Shorter than the magic but not a prefix of it: too short to tell.
  for (const std::string& junk : {"X"s, "XY"s, "\0\0\0"s}) {
    CheckRejected(OpenFrame(s.b, s.b_peers(), junk),
                  {RejectReason::kTruncated, ShortHeader(kFrameNoun, junk.size(), kFrameHeader)},
                  n);
  }
  // A control message and a bundle are not frames.
  CheckRejected(
      OpenFrame(s.b, s.b_peers(), SealControl(s.a, s.b.identity(), ControlType::kPing, kNow, "")),
      {RejectReason::kBadMagic, BadMagic(kFrameNoun, "RLYF")}, n);
  CheckRejected(OpenFrame(s.b, s.b_peers(), SealAck(s.a, s.b.identity(), 1, kCreatedAt, 0)),
                {RejectReason::kBadMagic, BadMagic(kFrameNoun, "RLYF")}, n);
}

TEST_CASE("catalogue: oversize declared frame lengths do not allocate and are truncated",
          "[crypto][adversarial]") {
  Sites s;
  Counter n("frame oversize");
  const std::string frame = SealFrame(s.a, s.b.identity(), 1, 1, 1, Payload(1));
  for (std::uint64_t declared : {std::uint64_t{0xffffffff}, std::uint64_t{0x80000000},
                                 std::uint64_t{64} << 20, std::uint64_t{80} << 20}) {
    std::string bad = frame;
    PutU(&bad, kFCtLen, 4, declared);
    INFO("ciphertext_len " << declared);
    CheckRejected(OpenFrame(s.b, s.b_peers(), bad),
                  {RejectReason::kTruncated,
                   Declares(kFrameNoun, frame.size(), kFrameHeader + declared + kSig)},
                  n);
  }
}

TEST_CASE("catalogue: frames sealed by an unknown key, for another site, or claiming a peer",
          "[crypto][adversarial]") {
  Sites s;
  Counter n("frame keys");
  const std::string evil = Payload(4);
  const std::string from_c = SealFrame(s.c, s.b.identity(), 1, 1, 1, evil);
  CheckRejected(OpenFrame(s.b, s.b_peers(), from_c),
                {RejectReason::kUnknownSender, UnknownSender(kFrameNoun, Fp(s.c))}, n);
  // No peer table at all, an empty one, and a lookup that answers a different identity.
  for (const PeerLookup& peers :
       {PeerLookup(), Sites::Lookup({}),
        PeerLookup(
            [&](const PublicKey&) -> std::optional<PublicIdentity> { return s.a.identity(); })}) {
    CheckRejected(OpenFrame(s.b, peers, from_c),
                  {RejectReason::kUnknownSender, UnknownSender(kFrameNoun, Fp(s.c))}, n);
  }
  // Sealed by a peer for another site: refused before the sender is even looked up.
  const std::string for_c = SealFrame(s.a, s.c.identity(), 1, 1, 1, Payload(5));
  for (const PeerLookup& peers : {s.b_peers(), Sites::Lookup({})}) {
    CheckRejected(OpenFrame(s.b, peers, for_c),
                  {RejectReason::kWrongRecipient, WrongRecipient(kFrameNoun, Fp(s.c), Fp(s.b))}, n);
  }
  // c seals for b but writes a's key as the sender, signed by c, or re-signed by c after the
  // change: c holds neither a's box secret nor b's, so the frame does not decrypt and its
  // payload is never parsed.
  std::string claims_a = from_c;
  claims_a.replace(kFSender, 32, reinterpret_cast<const char*>(s.a.identity().sign_pk.data()), 32);
  CheckRejected(OpenFrame(s.b, s.b_peers(), claims_a), DecryptFailed(s), n);
  ResignFrame(s.c, evil, &claims_a);
  CheckRejected(OpenFrame(s.b, s.b_peers(), claims_a), DecryptFailed(s), n);
  // A frame for b sealed by a, but b's peer table holds the wrong box key for a.
  PublicIdentity wrong_box = s.a.identity();
  wrong_box.box_pk = s.c.identity().box_pk;
  CheckRejected(OpenFrame(s.b, Sites::Lookup({wrong_box}),
                          SealFrame(s.a, s.b.identity(), 1, 1, 1, Payload(1))),
                DecryptFailed(s), n);
}

TEST_CASE("catalogue: frames tampered and re-signed by the real sender", "[crypto][adversarial]") {
  // A broken or misbehaving peer signs what it did not seal correctly: every change the
  // signature no longer catches is caught by the header checks or the AEAD.
  Sites s;
  Counter n("frame re-signed tampering");
  const std::string payload = Payload(16, 4, 10);
  const std::string frame = SealFrame(s.a, s.b.identity(), 10, 20, 4, payload);
  const Expect decrypt = DecryptFailed(s);
  // ephemeral key, nonce, sequence fields (kept in order), event count, ciphertext: one bit of
  // every byte.
  for (std::size_t offset = kFEphemeral; offset < frame.size() - kSig; ++offset) {
    if (offset >= kFCtLen && offset < kFrameHeader) continue;  // the length: below
    const int bit = static_cast<int>(offset % 8);
    std::string bad = Flip(frame, offset, bit);
    if (GetU(bad, kFFirst, 8) > GetU(bad, kFLast, 8)) continue;  // inverted: below
    ResignFrame(s.a, payload, &bad);
    INFO("byte " << offset << " bit " << bit);
    CheckRejected(OpenFrame(s.b, s.b_peers(), bad), decrypt, n);
  }
  // An event count of 2^32 - 1 (the header is the AEAD's associated data).
  std::string count = frame;
  PutU(&count, kFCount, 4, 0xffffffff);
  ResignFrame(s.a, payload, &count);
  CheckRejected(OpenFrame(s.b, s.b_peers(), count), decrypt, n);
  // The ciphertext cut by one byte with a matching length.
  std::string shorter = frame.substr(0, frame.size() - kSig - 1) + std::string(kSig, '\0');
  PutU(&shorter, kFCtLen, 4, GetU(frame, kFCtLen, 4) - 1);
  ResignFrame(s.a, payload, &shorter);
  CheckRejected(OpenFrame(s.b, s.b_peers(), shorter), decrypt, n);
  // Low-order ephemeral keys (all zero, and the order-2 point 1).
  for (int v : {0, 1}) {
    std::string low = frame;
    low.replace(kFEphemeral, 32, std::string(32, '\0'));
    low[kFEphemeral] = static_cast<char>(v);
    ResignFrame(s.a, payload, &low);
    CheckRejected(OpenFrame(s.b, s.b_peers(), low),
                  {RejectReason::kDecryptFailed,
                   "frame rejected: ephemeral key from peer " + Fp(s.a) + " is a low-order point"},
                  n);
  }
  // Structurally invalid headers, correctly signed.
  for (auto [first, last] : {std::pair<std::uint64_t, std::uint64_t>{21, 20},
                             {std::numeric_limits<std::uint64_t>::max(), 0}}) {
    std::string bad = frame;
    PutU(&bad, kFFirst, 8, first);
    PutU(&bad, kFLast, 8, last);
    ResignFrame(s.a, payload, &bad);
    CheckRejected(
        OpenFrame(s.b, s.b_peers(), bad),
        {RejectReason::kMalformed, "frame rejected: sequence range " + std::to_string(first) +
                                       ".." + std::to_string(last) + " is inverted"},
        n);
  }
  for (auto [flags, reserved] :
       {std::pair<unsigned, unsigned>{2, 0}, {0x80, 0}, {0, 1}, {0, 0x8000}, {0xff, 0xffff}}) {
    std::string bad = frame;
    PutU(&bad, kFFlags, 1, flags);
    PutU(&bad, kFReserved, 2, reserved);
    ResignFrame(s.a, payload, &bad);
    CheckRejected(OpenFrame(s.b, s.b_peers(), bad),
                  {RejectReason::kMalformed, FlagsMessage(flags, reserved)}, n);
  }
  for (std::size_t ct : {0, 1, 15}) {
    std::string bad = frame.substr(0, kFrameHeader) + Random(ct) + std::string(kSig, '\0');
    PutU(&bad, kFCtLen, 4, ct);
    ResignFrame(s.a, payload, &bad);
    CheckRejected(OpenFrame(s.b, s.b_peers(), bad),
                  {RejectReason::kMalformed, "frame rejected: ciphertext is " + std::to_string(ct) +
                                                 " bytes, shorter than the 16-byte "
                                                 "authentication tag"},
                  n);
  }
}

TEST_CASE("catalogue: frames sealed by the real sender around a payload that is not one",
          "[crypto][adversarial]") {
  // A broken or misbehaving peer seals and signs bytes that are no frame payload: each is
  // refused as malformed, naming what is wrong, once it has decrypted.
  Sites s;
  Counter n("frame payloads");
  std::string event;
  {
    Event e;
    e.id = MakeEventId("europe", 1);
    e.origin_site = "europe";
    e.origin_seq = 1;
    e.channel = "war-room";
    e.author = "alice";
    e.hops = {"europe"};
    EncodeEvent(e, &event);
  }
  const std::string good = Payload(4, 2);
  const std::vector<std::string> junk = {
      "",                           // nothing
      "\xc0"s,                      // nil
      "\x90"s,                      // [] (no attestations slot)
      "\x91\x90"s,                  // [[]]
      "\x93\x90\x90\x90"s,          // three elements
      "\x92\x90\x91\x01"s,          // an attestation that is not bytes
      "\x92\x91\x01\x90"s,          // an event that is not a pair
      "\x92\x91\x92\x01\x01\x90"s,  // an event that is not bytes
      "\x92\x91\x92\xcf\x7f\xff\xff\xff\xff\xff\xff\xff\xc4\x00\x90"s,  // seq beyond 2^62
      good.substr(0, good.size() - 1),                                  // truncated
      good + "\x00"s,                                                   // trailing
      Random(64),
  };
  std::vector<std::string> payloads(junk.begin(), junk.end());
  // An event whose bytes are no envelope, and one with another envelope version.
  payloads.push_back(EncodeFramePayload({{1, "\x94\x02\x01\xc4\x00"s}}));
  std::string v3 = event;
  v3[1] = '\x03';
  payloads.push_back(EncodeFramePayload({{1, v3}}));
  for (std::size_t i = 0; i < payloads.size(); ++i) {
    INFO("payload case " << i);
    OpenResult r =
        OpenFrame(s.b, s.b_peers(), SealFrame(s.a, s.b.identity(), 1, 1, 1, payloads[i]));
    REQUIRE_FALSE(r.ok());
    CHECK(RejectReasonName(r.rejection.reason) == std::string("malformed"));
    CHECK_THAT(r.rejection.message, Catch::StartsWith("frame rejected: malformed payload: "));
    CHECK(r.rejection.message.size() > std::string("frame rejected: malformed payload: ").size());
    ++n;
  }
  // The same encoder's output is accepted (the cases above differ from it only as described).
  REQUIRE(OpenFrame(s.b, s.b_peers(),
                    SealFrame(s.a, s.b.identity(), 1, 1, 1, EncodeFramePayload({{1, event}})))
              .ok());
}

// ---- control messages ---------------------------------------------------------------------------
const std::string kControlNoun = "control message";

Expect ControlHeaderFlip(const Sites& s, const std::string& msg, std::size_t offset, int bit) {
  const std::string bad = Flip(msg, offset, bit);
  const std::uint64_t total = kControlHeader + GetU(msg, kCBodyLen, 4) + kSig;
  if (offset < 4) return {RejectReason::kBadMagic, BadMagic(kControlNoun, "RLYC")};
  if (offset == 4)
    return {RejectReason::kUnsupportedVersion,
            Version(kControlNoun, static_cast<unsigned char>(bad[4]))};
  if (offset >= kCBodyLen)
    return Length(kControlNoun, msg.size(),
                  kControlHeader + FlippedField(msg, kCBodyLen, 4, offset, bit) + kSig, total);
  const unsigned type = static_cast<unsigned char>(bad[kCType]);
  if (type < 1 || type > 5)
    return {RejectReason::kMalformed,
            "control message rejected: unknown message type " + std::to_string(type)};
  if (offset >= kCReserved && offset < kCSender)
    return {RejectReason::kMalformed, "control message rejected: reserved field is " +
                                          std::to_string(GetU(bad, kCReserved, 2)) + ", must be 0"};
  if (offset >= kCSender && offset < kCRecipient)
    return {RejectReason::kUnknownSender, UnknownSender(kControlNoun, Fp(bad, kCSender))};
  if (offset >= kCRecipient && offset < kCTimestamp)
    return {RejectReason::kWrongRecipient,
            WrongRecipient(kControlNoun, Fp(bad, kCRecipient), Fp(s.b))};
  // type changed to another known type, timestamp: caught by the signature.
  return {RejectReason::kBadSignature, BadSignature(kControlNoun, Fp(s.a))};
}

TEST_CASE("catalogue: a flipped bit in every bit of every control message type",
          "[crypto][adversarial]") {
  Sites s;
  Counter n("control message bits");
  for (ControlType type : {ControlType::kHello, ControlType::kHelloAck, ControlType::kAck,
                           ControlType::kPing, ControlType::kRehello}) {
    const std::string body = type == ControlType::kAck ? "\0\0\0\0\0\0\0\x2a"s : ""s;
    const std::string msg = SealControl(s.a, s.b.identity(), type, kNow, body);
    REQUIRE(OpenControl(s.b, s.b_peers(), msg).ok());
    for (std::size_t offset = 0; offset < msg.size(); ++offset) {
      for (int bit = 0; bit < 8; ++bit) {
        INFO("type " << static_cast<int>(type) << " byte " << offset << " bit " << bit);
        const Expect want = offset < kControlHeader ? ControlHeaderFlip(s, msg, offset, bit)
                                                    : Expect{RejectReason::kBadSignature,
                                                             BadSignature(kControlNoun, Fp(s.a))};
        CheckRejected(OpenControl(s.b, s.b_peers(), Flip(msg, offset, bit)), want, n);
      }
    }
    // Truncated at every length, and one byte more.
    const std::uint64_t total = msg.size();
    for (std::size_t len = 0; len < msg.size(); ++len) {
      INFO("type " << static_cast<int>(type) << " first " << len << " bytes");
      CheckRejected(OpenControl(s.b, s.b_peers(), msg.substr(0, len)),
                    {RejectReason::kTruncated, len < kControlHeader
                                                   ? ShortHeader(kControlNoun, len, kControlHeader)
                                                   : Declares(kControlNoun, len, total)},
                    n);
    }
    CheckRejected(OpenControl(s.b, s.b_peers(), msg + "x"),
                  {RejectReason::kMalformed, Trailing(kControlNoun, total + 1, total)}, n);
  }
  // Sealed by a stranger, for another site; a frame is not a control message.
  CheckRejected(OpenControl(s.b, s.b_peers(),
                            SealControl(s.c, s.b.identity(), ControlType::kHello, kNow, "")),
                {RejectReason::kUnknownSender, UnknownSender(kControlNoun, Fp(s.c))}, n);
  CheckRejected(OpenControl(s.b, s.b_peers(),
                            SealControl(s.a, s.c.identity(), ControlType::kHello, kNow, "")),
                {RejectReason::kWrongRecipient, WrongRecipient(kControlNoun, Fp(s.c), Fp(s.b))}, n);
  CheckRejected(OpenControl(s.b, s.b_peers(), SealFrame(s.a, s.b.identity(), 1, 1, 1, Payload(1))),
                {RejectReason::kBadMagic, BadMagic(kControlNoun, "RLYC")}, n);
  // A declared body of 4 GiB - 1.
  std::string huge = SealControl(s.a, s.b.identity(), ControlType::kPing, kNow, "");
  PutU(&huge, kCBodyLen, 4, 0xffffffff);
  CheckRejected(OpenControl(s.b, s.b_peers(), huge),
                {RejectReason::kTruncated,
                 Declares(kControlNoun, huge.size(), kControlHeader + 0xffffffffULL + kSig)},
                n);
  // Unknown types, correctly signed.
  for (unsigned type : {0u, 6u, 255u}) {
    std::string bad = SealControl(s.a, s.b.identity(), ControlType::kPing, kNow, "");
    PutU(&bad, kCType, 1, type);
    Resign(s.a, kControlHeader, &bad);
    CheckRejected(OpenControl(s.b, s.b_peers(), bad),
                  {RejectReason::kMalformed,
                   "control message rejected: unknown message type " + std::to_string(type)},
                  n);
  }
}

// ---- bundles ------------------------------------------------------------------------------------
const std::string kBundleNoun = "bundle";

Expect BundleHeaderFlip(const Sites& s, const std::string& bundle, std::size_t offset, int bit) {
  const std::string bad = Flip(bundle, offset, bit);
  const std::uint64_t total = kBundleHeader + GetU(bundle, kBBodyLen, 8) + kSig;
  if (offset < 4) return {RejectReason::kBadMagic, BadMagic(kBundleNoun, "RLYB")};
  if (offset == 4)
    return {RejectReason::kUnsupportedVersion,
            Version(kBundleNoun, static_cast<unsigned char>(bad[4]))};
  if (offset >= kBBodyLen) {
    const std::uint64_t declared = FlippedField(bundle, kBBodyLen, 8, offset, bit);
    if (declared > kBundleMaxBody)
      return {RejectReason::kMalformed, OverLimit(kBundleNoun, declared, kBundleMaxBody)};
    return Length(kBundleNoun, bundle.size(), kBundleHeader + declared + kSig, total);
  }
  const unsigned kind = static_cast<unsigned char>(bad[kBKind]);
  if (kind < 1 || kind > 3)
    return {RejectReason::kMalformed, "bundle rejected: unknown bundle kind " +
                                          std::to_string(kind) +
                                          " (1 is frames, 2 is ack, 3 is resend request)"};
  if (offset >= kBReserved && offset < kBSender)
    return {RejectReason::kMalformed, "bundle rejected: reserved field is " +
                                          std::to_string(GetU(bad, kBReserved, 2)) + ", must be 0"};
  if (offset >= kBSender && offset < kBRecipient)
    return {RejectReason::kUnknownSender, UnknownSender(kBundleNoun, Fp(bad, kBSender))};
  if (offset >= kBRecipient && offset < kBId)
    return {RejectReason::kWrongRecipient,
            WrongRecipient(kBundleNoun, Fp(bad, kBRecipient), Fp(s.b))};
  // kind changed to another known kind, bundle id, created_at, expires_at: the signature.
  return {RejectReason::kBadSignature, BadSignature(kBundleNoun, Fp(s.a))};
}

struct Sample {
  const char* name;
  std::string bytes;
};

std::vector<Sample> Bundles(const Sites& s) {
  return {
      {"frames", SealBundle(s.a, s.b.identity(),
                            {SealFrame(s.a, s.b.identity(), 1, 3, 2, Payload(30, 2)),
                             SealFrame(s.a, s.b.identity(), 4, 4, 1, Payload(7, 1, 4))},
                            kCreatedAt, kExpiresAt)},
      {"ack", SealAck(s.a, s.b.identity(), 0x0102'0304'0506'0708, kCreatedAt, 0)},
      {"resend", SealResendRequest(s.a, s.b.identity(), 10, {{12, 20}, {25, 25}, {40, 99}},
                                   kCreatedAt, kExpiresAt)},
  };
}

TEST_CASE("catalogue: a flipped bit in every bit of every bundle kind", "[crypto][adversarial]") {
  Sites s;
  Counter n("bundle bits");
  for (const Sample& b : Bundles(s)) {
    REQUIRE(OpenBundle(s.b, s.b_peers(), b.bytes, kNow).ok());
    for (std::size_t offset = 0; offset < b.bytes.size(); ++offset) {
      for (int bit = 0; bit < 8; ++bit) {
        INFO(b.name << " byte " << offset << " bit " << bit);
        const Expect want = offset < kBundleHeader ? BundleHeaderFlip(s, b.bytes, offset, bit)
                                                   : Expect{RejectReason::kBadSignature,
                                                            BadSignature(kBundleNoun, Fp(s.a))};
        BundleResult r = OpenBundle(s.b, s.b_peers(), Flip(b.bytes, offset, bit), kNow);
        CHECK_FALSE(r.expired);
        CheckRejected(r, want, n);
      }
    }
  }
}

TEST_CASE("catalogue: a bundle truncated at every length, or with bytes appended",
          "[crypto][adversarial]") {
  Sites s;
  Counter n("bundle truncation and extension");
  for (const Sample& b : Bundles(s)) {
    const std::uint64_t total = b.bytes.size();
    for (std::size_t len = 0; len < b.bytes.size(); ++len) {
      INFO(b.name << " first " << len << " bytes");
      CheckRejected(OpenBundle(s.b, s.b_peers(), b.bytes.substr(0, len), kNow),
                    {RejectReason::kTruncated, len < kBundleHeader
                                                   ? ShortHeader(kBundleNoun, len, kBundleHeader)
                                                   : Declares(kBundleNoun, len, total)},
                    n);
    }
    for (std::size_t extra : {1, 64, 4096}) {
      INFO(b.name << " + " << extra << " bytes");
      CheckRejected(OpenBundle(s.b, s.b_peers(), b.bytes + std::string(extra, '\n'), kNow),
                    {RejectReason::kMalformed, Trailing(kBundleNoun, total + extra, total)}, n);
    }
    // Declared bodies over the 4 GiB limit, up to 2^64 - 1 (the sum must not overflow).
    for (std::uint64_t declared :
         {kBundleMaxBody + 1, std::uint64_t{1} << 63, std::numeric_limits<std::uint64_t>::max()}) {
      std::string bad = b.bytes;
      PutU(&bad, kBBodyLen, 8, declared);
      CheckRejected(OpenBundle(s.b, s.b_peers(), bad, kNow),
                    {RejectReason::kMalformed, OverLimit(kBundleNoun, declared, kBundleMaxBody)},
                    n);
    }
  }
}

TEST_CASE("catalogue: bundles for another site, from an unknown key, expired",
          "[crypto][adversarial]") {
  Sites s;
  Counter n("bundle keys and expiry");
  const std::vector<std::string> frames = {SealFrame(s.a, s.b.identity(), 1, 1, 1, Payload(1))};
  CheckRejected(
      OpenBundle(s.b, s.b_peers(), SealBundle(s.a, s.c.identity(), frames, kCreatedAt, 0), kNow),
      {RejectReason::kWrongRecipient, WrongRecipient(kBundleNoun, Fp(s.c), Fp(s.b))}, n);
  CheckRejected(OpenBundle(s.b, s.b_peers(), SealAck(s.a, s.c.identity(), 5, kCreatedAt, 0), kNow),
                {RejectReason::kWrongRecipient, WrongRecipient(kBundleNoun, Fp(s.c), Fp(s.b))}, n);
  CheckRejected(
      OpenBundle(s.b, s.b_peers(), SealBundle(s.c, s.b.identity(), frames, kCreatedAt, 0), kNow),
      {RejectReason::kUnknownSender, UnknownSender(kBundleNoun, Fp(s.c))}, n);
  CheckRejected(OpenBundle(s.b, s.b_peers(),
                           SealResendRequest(s.c, s.b.identity(), 1, {}, kCreatedAt, 0), kNow),
                {RejectReason::kUnknownSender, UnknownSender(kBundleNoun, Fp(s.c))}, n);
  // c's bundle claiming a's key as sender, re-signed by c.
  std::string claims_a = SealAck(s.c, s.b.identity(), 5, kCreatedAt, 0);
  claims_a.replace(kBSender, 32, reinterpret_cast<const char*>(s.a.identity().sign_pk.data()), 32);
  Resign(s.c, kBundleHeader, &claims_a);
  CheckRejected(OpenBundle(s.b, s.b_peers(), claims_a, kNow),
                {RejectReason::kBadSignature, BadSignature(kBundleNoun, Fp(s.a))}, n);

  // Expired: at and after expires_at; the message names both times.
  for (const Sample& b : Bundles(s)) {
    if (GetU(b.bytes, kBExpires, 8) == 0) continue;
    for (std::int64_t now :
         {kExpiresAt, kExpiresAt + 1, std::numeric_limits<std::int64_t>::max()}) {
      INFO(b.name << " at " << now);
      BundleResult r = OpenBundle(s.b, s.b_peers(), b.bytes, now);
      REQUIRE_FALSE(r.ok());
      CHECK(r.expired);
      CHECK(r.rejection.reason == RejectReason::kMalformed);
      CHECK(r.rejection.message ==
            "bundle rejected: expired at 2023-11-14T23:13:20.000Z (created "
            "2023-11-14T22:13:20.000Z)");
      ++n;
      // Expired and also tampered, foreign or truncated: the other problem is reported.
      BundleResult t = OpenBundle(s.b, s.b_peers(), Flip(b.bytes, kBId, 0), now);
      CHECK_FALSE(t.expired);
      CheckRejected(t, {RejectReason::kBadSignature, BadSignature(kBundleNoun, Fp(s.a))}, n);
      BundleResult u = OpenBundle(s.b, s.b_peers(), b.bytes.substr(0, b.bytes.size() - 1), now);
      CHECK_FALSE(u.expired);
      CheckRejected(
          u, {RejectReason::kTruncated, Declares(kBundleNoun, b.bytes.size() - 1, b.bytes.size())},
          n);
    }
  }
  // expires_at rewritten to the past (or to "never") by whoever carries the disk.
  for (std::int64_t expires : {std::int64_t{0}, std::int64_t{1}, kNow - 1}) {
    std::string bad = Bundles(s)[0].bytes;
    PutU(&bad, kBExpires, 8, static_cast<std::uint64_t>(expires));
    BundleResult r = OpenBundle(s.b, s.b_peers(), bad, kNow);
    CHECK_FALSE(r.expired);
    CheckRejected(r, {RejectReason::kBadSignature, BadSignature(kBundleNoun, Fp(s.a))}, n);
    // created_at moved as well (to look fresh).
    PutU(&bad, kBCreated, 8, static_cast<std::uint64_t>(kNow));
    CheckRejected(OpenBundle(s.b, s.b_peers(), bad, kNow),
                  {RejectReason::kBadSignature, BadSignature(kBundleNoun, Fp(s.a))}, n);
  }
}

// Replaces the body (fixing body_len) and kind of a bundle and re-signs it with `key`.
std::string Rebuilt(const SiteKey& key, std::string bundle, unsigned kind, std::string_view body) {
  bundle.replace(kBundleHeader, bundle.size() - kBundleHeader - kSig, body);
  PutU(&bundle, kBBodyLen, 8, body.size());
  PutU(&bundle, kBKind, 1, kind);
  Resign(key, kBundleHeader, &bundle);
  return bundle;
}

TEST_CASE("catalogue: bundles of the wrong kind and with inconsistent bodies, correctly signed",
          "[crypto][adversarial]") {
  Sites s;
  Counter n("bundle kinds and bodies");
  const std::vector<Sample> bundles = Bundles(s);
  auto body = [](const std::string& b) {
    return b.substr(kBundleHeader, b.size() - kBundleHeader - kSig);
  };
  const std::string frames_body = body(bundles[0].bytes), ack_body = body(bundles[1].bytes),
                    resend_body = body(bundles[2].bytes);
  auto rejected = [&](unsigned kind, const std::string& b, const std::string& says) {
    INFO("kind " << kind << ", body of " << b.size() << " bytes");
    CheckRejected(OpenBundle(s.b, s.b_peers(), Rebuilt(s.a, bundles[0].bytes, kind, b), kNow),
                  {RejectReason::kMalformed, "bundle rejected: " + says}, n);
  };
  // The body of one kind under the header of another.
  rejected(2, frames_body,
           "ack body is " + std::to_string(frames_body.size()) + " bytes, must be 8");
  rejected(2, resend_body,
           "ack body is " + std::to_string(resend_body.size()) + " bytes, must be 8");
  rejected(3, frames_body,
           "resend request body is " + std::to_string(frames_body.size()) +
               " bytes, which does not match its range count");
  rejected(3, ack_body, "resend request body is 8 bytes, which does not match its range count");
  // ack_through 0x0102030405060708 read as a frame count of 0x01020304 frames.
  rejected(1, ack_body,
           "frame 1 of 16909060 declares 84281096 bytes, but only 0 are left in the body");
  rejected(
      1, resend_body,
      std::to_string(resend_body.size() - 4) + " bytes after the last of 0 frames in the body");
  for (unsigned kind : {0u, 4u, 0x81u, 255u}) {
    INFO("kind " << kind);
    CheckRejected(
        OpenBundle(s.b, s.b_peers(), Rebuilt(s.a, bundles[1].bytes, kind, ack_body), kNow),
        {RejectReason::kMalformed, "bundle rejected: unknown bundle kind " + std::to_string(kind) +
                                       " (1 is frames, 2 is ack, 3 is resend request)"},
        n);
  }
  std::string reserved = bundles[1].bytes;
  PutU(&reserved, kBReserved, 2, 0x0100);
  Resign(s.a, kBundleHeader, &reserved);
  CheckRejected(OpenBundle(s.b, s.b_peers(), reserved, kNow),
                {RejectReason::kMalformed, "bundle rejected: reserved field is 256, must be 0"}, n);
  // Resend requests whose ranges are not ascending beyond the acknowledged position.
  using Ranges = std::vector<std::pair<std::uint64_t, std::uint64_t>>;
  const std::vector<std::pair<Ranges, std::string>> bad_ranges = {
      {{{10, 12}}, "range 0 (10..12)"},            // starts at the acknowledged position
      {{{5, 8}}, "range 0 (5..8)"},                // before it
      {{{12, 11}}, "range 0 (12..11)"},            // inverted
      {{{12, 20}, {20, 25}}, "range 1 (20..25)"},  // overlapping
      {{{30, 40}, {12, 20}}, "range 1 (12..20)"},  // descending
  };
  for (const auto& [ranges, which] : bad_ranges) {
    INFO(which);
    CheckRejected(
        OpenBundle(s.b, s.b_peers(),
                   SealResendRequest(s.a, s.b.identity(), 10, ranges, kCreatedAt, 0), kNow),
        {RejectReason::kMalformed, "bundle rejected: resend request " + which +
                                       " is not ascending beyond the acknowledged position"},
        n);
  }
  // A resend request whose count promises more ranges than the body holds.
  std::string count = resend_body;
  PutU(&count, 8, 4, 0xffffffff);
  CheckRejected(OpenBundle(s.b, s.b_peers(), Rebuilt(s.a, bundles[2].bytes, 3, count), kNow),
                {RejectReason::kMalformed, "bundle rejected: resend request body is " +
                                               std::to_string(count.size()) +
                                               " bytes, which does not match its range count"},
                n);
}

TEST_CASE("catalogue: a correctly signed bundle carrying bad frames", "[crypto][adversarial]") {
  // OpenBundle does not open the frames; the receiver opens each one and refuses the bundle
  // when any is bad (relay/daemon_inbound.cc, all-or-nothing import). Each bad frame keeps
  // its reason.
  Sites s;
  Counter n("frames inside bundles");
  const std::string good = SealFrame(s.a, s.b.identity(), 1, 2, 2, Payload(20, 2));
  const std::uint64_t total = good.size();
  const std::vector<std::pair<std::string, Expect>> inner = {
      {SealFrame(s.a, s.c.identity(), 3, 3, 1, Payload(5, 1, 3)),
       {RejectReason::kWrongRecipient, WrongRecipient(kFrameNoun, Fp(s.c), Fp(s.b))}},
      {SealFrame(s.c, s.b.identity(), 3, 3, 1, Payload(6, 1, 3)),
       {RejectReason::kUnknownSender, UnknownSender(kFrameNoun, Fp(s.c))}},
      {Flip(good, kFrameHeader + 3, 1), DecryptFailed(s)},
      {Flip(good, kFNonce, 0), DecryptFailed(s)},
      {Flip(good, total - 1, 0), {RejectReason::kBadSignature, BadSignature(kFrameNoun, Fp(s.a))}},
      {good.substr(0, good.size() - 1),
       {RejectReason::kTruncated, Declares(kFrameNoun, total - 1, total)}},
      {good.substr(0, 100), {RejectReason::kTruncated, ShortHeader(kFrameNoun, 100, kFrameHeader)}},
      {good + "!", {RejectReason::kMalformed, Trailing(kFrameNoun, total + 1, total)}},
      {"RLYF", {RejectReason::kTruncated, ShortHeader(kFrameNoun, 4, kFrameHeader)}},
      {Flip(good, 4, 1), {RejectReason::kUnsupportedVersion, Version(kFrameNoun, 0)}},
  };
  for (std::size_t i = 0; i < inner.size(); ++i) {
    INFO("inner case " << i);
    const std::string bundle =
        SealBundle(s.a, s.b.identity(), {good, inner[i].first}, kCreatedAt, 0);
    BundleResult r = OpenBundle(s.b, s.b_peers(), bundle, kNow);
    REQUIRE(r.ok());
    REQUIRE(r.bundle->frames.size() == 2);
    CHECK(OpenFrame(s.b, s.b_peers(), r.bundle->frames[0]).ok());
    CheckRejected(OpenFrame(s.b, s.b_peers(), r.bundle->frames[1]), inner[i].second, n);
  }
}

}  // namespace
}  // namespace relay::crypto
