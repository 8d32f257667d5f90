#include "crypto/frame.h"

#include <sodium.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "tests/crypto/frame_testing.h"

namespace relay::crypto {
namespace {

using testing::FrameSignedInput;
using testing::Payload;
using testing::ResignFrame;

constexpr std::size_t kHeader = 152;
constexpr std::size_t kControlHeader = 84;

// Three sites: a sends to b; c is a stranger to b.
struct Sites {
  bool initialised = Init().ok();  // first member: Init runs before the keys are generated
  SiteKey a = SiteKey::Generate();
  SiteKey b = SiteKey::Generate();
  SiteKey c = SiteKey::Generate();

  // b's peer table: only a.
  PeerLookup b_peers() const { return Lookup({a.identity()}); }

  static PeerLookup Lookup(std::vector<PublicIdentity> known) {
    return [known](const PublicKey& pk) -> std::optional<PublicIdentity> {
      for (const auto& id : known)
        if (id.sign_pk == pk) return id;
      return std::nullopt;
    };
  }
};

// What a control message's signature covers (docs/wire-format.md): header || BLAKE2b-256(body),
// computed here independently of the implementation. Frames: tests/crypto/frame_testing.h.
std::string SignedInput(std::string_view message) {
  constexpr std::size_t header = 84;
  std::string_view signed_part = message.substr(0, message.size() - 64);
  std::string input(signed_part.substr(0, header));
  unsigned char digest[32];
  crypto_generichash(digest, sizeof digest,
                     reinterpret_cast<const unsigned char*>(signed_part.data()) + header,
                     signed_part.size() - header, nullptr, 0);
  input.append(reinterpret_cast<const char*>(digest), sizeof digest);
  return input;
}

// Re-signs a control message with `key` so that only the deliberate change is wrong.
void Resign(const SiteKey& key, std::string* bytes) {
  const Signature sig = key.Sign(SignedInput(*bytes));
  bytes->replace(bytes->size() - 64, 64, reinterpret_cast<const char*>(sig.data()), 64);
}

void PutU64(std::string* bytes, std::size_t offset, std::uint64_t v) {
  for (int i = 7; i >= 0; --i, v >>= 8)
    (*bytes)[offset + static_cast<std::size_t>(i)] = static_cast<char>(v & 0xff);
}

RejectReason FrameReason(const Sites& s, std::string_view bytes) {
  OpenResult r = OpenFrame(s.b, s.b_peers(), bytes);
  REQUIRE_FALSE(r.ok());
  CHECK_FALSE(r.rejection.message.empty());
  return r.rejection.reason;
}

TEST_CASE("reject reason names", "[crypto][frame]") {
  CHECK(std::string(RejectReasonName(RejectReason::kTruncated)) == "truncated");
  CHECK(std::string(RejectReasonName(RejectReason::kBadMagic)) == "bad_magic");
  CHECK(std::string(RejectReasonName(RejectReason::kUnsupportedVersion)) == "unsupported_version");
  CHECK(std::string(RejectReasonName(RejectReason::kUnknownSender)) == "unknown_sender");
  CHECK(std::string(RejectReasonName(RejectReason::kWrongRecipient)) == "wrong_recipient");
  CHECK(std::string(RejectReasonName(RejectReason::kBadSignature)) == "bad_signature");
  CHECK(std::string(RejectReasonName(RejectReason::kDecryptFailed)) == "decrypt_failed");
  CHECK(std::string(RejectReasonName(RejectReason::kMalformed)) == "malformed");
  CHECK(std::string(RejectReasonName(RejectReason::kReplay)) == "replay");
}

TEST_CASE("frame seal/open round trip", "[crypto][frame]") {
  Sites s;
  REQUIRE(s.initialised);
  for (auto [events, text] : {std::pair<std::size_t, std::size_t>{0, 0},
                              {1, 0},
                              {1, 5},
                              {3, 100},
                              {4, std::size_t{1} << 18}}) {
    const std::string payload = Payload(text, events, 5);
    const std::string frame = SealFrame(s.a, s.b.identity(), 5, 7, 3, payload);
    CHECK(frame.size() == kHeader + payload.size() + 16 + 64);
    CHECK(LooksLikeFrame(frame));
    OpenResult r = OpenFrame(s.b, s.b_peers(), frame);
    REQUIRE(r.ok());
    CHECK(r.frame->plaintext == payload);
    CHECK(r.frame->header.version == kFrameVersion);
    CHECK(r.frame->header.sender == s.a.identity().sign_pk);
    CHECK(r.frame->header.recipient == s.b.identity().sign_pk);
    CHECK(r.frame->header.first_seq == 5);
    CHECK(r.frame->header.last_seq == 7);
    CHECK(r.frame->header.event_count == 3);
    // The opened events, their cores and the cores' digests, in order.
    REQUIRE(r.frame->events.size() == events);
    for (std::size_t i = 0; i < events; ++i) {
      const OpenedEvent& e = r.frame->events[i];
      CHECK(e.seq == 5 + i);
      std::string_view core;
      auto decoded = DecodeEvent(e.encoded, &core);
      REQUIRE(decoded.ok());
      CHECK(decoded->origin_seq == 5 + i);
      CHECK(e.core == core);
      CHECK(e.digest == EventDigest(core));
    }
    CHECK(r.frame->attestations.empty());
  }
  // The views survive moving the opened frame.
  const std::string payload = Payload(40, 2);
  OpenResult r = OpenFrame(s.b, s.b_peers(), SealFrame(s.a, s.b.identity(), 1, 2, 2, payload));
  REQUIRE(r.ok());
  OpenedFrame moved = std::move(*r.frame);
  REQUIRE(moved.events.size() == 2);
  CHECK(DecodeEvent(moved.events[1].encoded).ok());
}

TEST_CASE("frame header bytes follow the documented layout", "[crypto][frame]") {
  Sites s;
  const std::string payload = Payload(5);
  const std::string f =
      SealFrame(s.a, s.b.identity(), 0x0102030405060708, 0x1112131415161718, 0x21222324, payload);
  const auto* u = reinterpret_cast<const unsigned char*>(f.data());
  CHECK(f.substr(0, 4) == "RLYF");
  CHECK(u[4] == 2);
  CHECK(u[5] == 0);
  CHECK((u[6] | u[7]) == 0);
  CHECK(std::equal(u + 8, u + 40, s.a.identity().sign_pk.begin()));
  CHECK(std::equal(u + 40, u + 72, s.b.identity().sign_pk.begin()));
  CHECK(u[128] == 0x01);
  CHECK(u[135] == 0x08);
  CHECK(u[136] == 0x11);
  CHECK(u[143] == 0x18);
  CHECK(u[144] == 0x21);
  CHECK(u[147] == 0x24);
  CHECK((u[148] | u[149] | u[150]) == 0);
  CHECK(u[151] == payload.size() + 16);
  // The signature covers the header and the payload's digest (docs/wire-format.md).
  Signature sig;
  std::copy(u + f.size() - 64, u + f.size(), sig.begin());
  CHECK(VerifySignature(s.a.identity().sign_pk, FrameSignedInput(f, payload), sig));
  CHECK_FALSE(VerifySignature(s.a.identity().sign_pk, FrameSignedInput(f, Payload(6)), sig));

  // Fresh ephemeral key and nonce every time.
  const std::string g =
      SealFrame(s.a, s.b.identity(), 0x0102030405060708, 0x1112131415161718, 0x21222324, payload);
  CHECK(f.substr(72, 32) != g.substr(72, 32));
  CHECK(f.substr(104, 24) != g.substr(104, 24));
  CHECK(f.substr(kHeader) != g.substr(kHeader));
}

TEST_CASE("frame body digest binds every event, sequence, hop and attestation", "[crypto][frame]") {
  Sites s;
  auto digest = [](std::initializer_list<std::tuple<std::uint64_t, std::string, std::string>> ev,
                   std::initializer_list<std::string> atts) {
    FrameBodyDigest d;
    for (const auto& [seq, core, hops] : ev) d.AddEvent(seq, EventDigest(core), hops);
    for (const std::string& a : atts) d.AddAttestation(a);
    return d.Final();
  };
  const Digest base = digest({{1, "core1", "h1"}, {2, "core2", "h2"}}, {"att"});
  CHECK(base == digest({{1, "core1", "h1"}, {2, "core2", "h2"}}, {"att"}));
  const Digest changed[] = {
      digest({{1, "core1", "h1"}, {3, "core2", "h2"}}, {"att"}),      // a sequence
      digest({{1, "core1", "h1"}, {2, "core3", "h2"}}, {"att"}),      // a core
      digest({{1, "core1", "h1"}, {2, "core2", "h3"}}, {"att"}),      // hops
      digest({{1, "core1", "h1h"}, {2, "core2", "2"}}, {"att"}),      // hops moved between events
      digest({{2, "core2", "h2"}, {1, "core1", "h1"}}, {"att"}),      // order
      digest({{1, "core1", "h1"}}, {"att"}),                          // an event dropped
      digest({{1, "core1", "h1"}, {2, "core2", "h2"}}, {"atu"}),      // an attestation
      digest({{1, "core1", "h1"}, {2, "core2", "h2"}}, {"at", "t"}),  // split
      digest({{1, "core1", "h1"}, {2, "core2", "h2"}}, {}),           // dropped
  };
  for (const Digest& d : changed) CHECK(d != base);

  // A frame signed over another payload's digest is refused as a bad signature.
  const std::string payload = Payload(10, 2);
  FrameBodyDigest other;
  other.AddEvent(1, EventDigest("x"), "");
  const std::string f = SealFrameWithDigest(s.a, s.b.identity(), 1, 2, 2, payload, other.Final());
  OpenResult r = OpenFrame(s.b, s.b_peers(), f);
  REQUIRE_FALSE(r.ok());
  CHECK(r.rejection.reason == RejectReason::kBadSignature);
}

TEST_CASE("looks like frame", "[crypto][frame]") {
  Sites s;
  CHECK(LooksLikeFrame("RLYF"));
  CHECK_FALSE(LooksLikeFrame("RLY"));
  CHECK_FALSE(LooksLikeFrame(""));
  CHECK_FALSE(LooksLikeFrame(SealControl(s.a, s.b.identity(), ControlType::kPing, 1, "")));
}

TEST_CASE("frame rejections", "[crypto][frame]") {
  Sites s;
  const std::string payload = Payload(5, 3, 5);
  const std::string frame = SealFrame(s.a, s.b.identity(), 5, 7, 3, payload);
  REQUIRE(OpenFrame(s.b, s.b_peers(), frame).ok());
  const std::size_t ct_len = payload.size() + 16;

  SECTION("truncated") {
    for (std::size_t len : {std::size_t{0}, std::size_t{3}, std::size_t{4}, std::size_t{10},
                            kHeader - 1, kHeader, kHeader + 5, frame.size() - 1}) {
      INFO("length " << len);
      CHECK(FrameReason(s, frame.substr(0, len)) == RejectReason::kTruncated);
    }
    CHECK(OpenFrame(s.b, s.b_peers(), frame.substr(0, 41)).rejection.message ==
          "frame rejected: truncated: 41 bytes, header needs 152");
  }
  SECTION("bad magic") {
    std::string bad = frame;
    bad[0] = 'X';
    CHECK(FrameReason(s, bad) == RejectReason::kBadMagic);
    CHECK(FrameReason(s, "hello world") == RejectReason::kBadMagic);
    CHECK(FrameReason(s, SealControl(s.a, s.b.identity(), ControlType::kPing, 0, "")) ==
          RejectReason::kBadMagic);
  }
  SECTION("unsupported version, checked before anything else") {
    std::string bad = frame;
    bad[4] = 1;  // wire version 1, before origin signatures: refused naming both versions
    OpenResult r = OpenFrame(s.b, s.b_peers(), bad);
    REQUIRE_FALSE(r.ok());
    CHECK(r.rejection.reason == RejectReason::kUnsupportedVersion);
    CHECK_THAT(r.rejection.message, Catch::Contains("format version 1 is not supported") &&
                                        Catch::Contains("supports version 2"));
    // A future version with a different header size is still reported as a version problem.
    CHECK(FrameReason(s, bad.substr(0, 20)) == RejectReason::kUnsupportedVersion);
  }
  SECTION("unknown sender") {
    for (const PeerLookup& peers :
         {Sites::Lookup({}), Sites::Lookup({s.c.identity()}), PeerLookup()}) {
      OpenResult r = OpenFrame(s.b, peers, frame);
      REQUIRE_FALSE(r.ok());
      CHECK(r.rejection.reason == RejectReason::kUnknownSender);
      CHECK_THAT(r.rejection.message, Catch::Contains(s.a.identity().Fingerprint()));
    }
  }
  SECTION("wrong recipient") {
    const std::string for_c = SealFrame(s.a, s.c.identity(), 5, 7, 3, payload);
    OpenResult r = OpenFrame(s.b, s.b_peers(), for_c);
    REQUIRE_FALSE(r.ok());
    CHECK(r.rejection.reason == RejectReason::kWrongRecipient);
    CHECK_THAT(r.rejection.message, Catch::Contains(s.c.identity().Fingerprint()) &&
                                        Catch::Contains(s.b.identity().Fingerprint()));
    CHECK(OpenFrame(s.c, Sites::Lookup({s.a.identity()}), for_c).ok());
  }
  SECTION("bad signature") {
    for (std::size_t pos : {frame.size() - 64, frame.size() - 1}) {
      std::string bad = frame;
      bad[pos] = static_cast<char>(bad[pos] ^ 1);
      OpenResult r = OpenFrame(s.b, s.b_peers(), bad);
      REQUIRE_FALSE(r.ok());
      CHECK(r.rejection.reason == RejectReason::kBadSignature);
      CHECK(r.rejection.message ==
            "frame rejected: bad signature from peer " + s.a.identity().Fingerprint());
    }
    // Signed by another key over the right input.
    std::string forged = frame;
    ResignFrame(s.c, payload, &forged);
    CHECK(FrameReason(s, forged) == RejectReason::kBadSignature);
    // Re-signed by a itself: accepted (the helper computes the documented input).
    std::string resigned = frame;
    ResignFrame(s.a, payload, &resigned);
    CHECK(OpenFrame(s.b, s.b_peers(), resigned).ok());
  }
  SECTION("flipped ciphertext bit fails decryption") {
    for (std::size_t pos : {kHeader, kHeader + 4, kHeader + ct_len - 1}) {
      std::string bad = frame;
      bad[pos] = static_cast<char>(bad[pos] ^ 0x80);
      OpenResult r = OpenFrame(s.b, s.b_peers(), bad);
      REQUIRE_FALSE(r.ok());
      CHECK(r.rejection.reason == RejectReason::kDecryptFailed);
      CHECK(r.rejection.message == "frame rejected: frame from peer " +
                                       s.a.identity().Fingerprint() +
                                       " does not decrypt (altered, or not sealed for this site)");
    }
  }
  SECTION("flipped bit in each header field") {
    struct Field {
      const char* name;
      std::size_t offset;  // the lowest bit of this byte is flipped
      RejectReason expect;
    };
    const Field fields[] = {
        {"magic", 0, RejectReason::kBadMagic},
        {"version", 4, RejectReason::kUnsupportedVersion},
        {"flags", 5, RejectReason::kDecryptFailed},  // bit 0 is kFrameResume: a known flag
        {"reserved", 7, RejectReason::kMalformed},
        {"sender", 8, RejectReason::kUnknownSender},
        {"recipient", 40, RejectReason::kWrongRecipient},
        {"ephemeral key", 72, RejectReason::kDecryptFailed},
        {"nonce", 104, RejectReason::kDecryptFailed},
        {"first_seq", 135, RejectReason::kDecryptFailed},    // 5 -> 4, still <= last_seq
        {"last_seq", 143, RejectReason::kDecryptFailed},     // 7 -> 6
        {"event_count", 147, RejectReason::kDecryptFailed},  // 3 -> 2
        // A smaller declared length leaves trailing bytes, a larger one is truncated.
        {"ciphertext_len", 151, (ct_len & 1) ? RejectReason::kMalformed : RejectReason::kTruncated},
        {"ciphertext_len", 150,
         (ct_len & 0x100) ? RejectReason::kMalformed : RejectReason::kTruncated},
    };
    for (const Field& f : fields) {
      std::string bad = frame;
      bad[f.offset] = static_cast<char>(bad[f.offset] ^ 1);
      INFO("field " << f.name);
      CHECK(FrameReason(s, bad) == f.expect);
    }
    // Every single-bit flip anywhere in the frame is rejected.
    for (std::size_t byte = 0; byte < frame.size(); ++byte) {
      for (int bit = 0; bit < 8; ++bit) {
        std::string bad = frame;
        bad[byte] = static_cast<char>(bad[byte] ^ (1 << bit));
        INFO("byte " << byte << " bit " << bit);
        CHECK_FALSE(OpenFrame(s.b, s.b_peers(), bad).ok());
      }
    }
  }
  SECTION("trailing bytes") {
    OpenResult r = OpenFrame(s.b, s.b_peers(), frame + "x");
    REQUIRE_FALSE(r.ok());
    CHECK(r.rejection.reason == RejectReason::kMalformed);
    CHECK_THAT(r.rejection.message, Catch::Contains("1 trailing bytes"));
  }
  SECTION("well-signed but structurally invalid header") {
    std::string inverted = frame;
    PutU64(&inverted, 128, 8);  // first_seq 8 > last_seq 7
    ResignFrame(s.a, payload, &inverted);
    CHECK(FrameReason(s, inverted) == RejectReason::kMalformed);

    std::string flags = frame;
    flags[5] = 2;  // not a known flag
    ResignFrame(s.a, payload, &flags);
    CHECK(FrameReason(s, flags) == RejectReason::kMalformed);

    // The flags are covered by the AEAD and the signature: a resume frame is sealed as one.
    const std::string resume = SealFrame(s.a, s.b.identity(), 5, 7, 3, payload, kFrameResume);
    CHECK(static_cast<std::uint8_t>(resume[5]) == kFrameResume);
    OpenResult r = OpenFrame(s.b, s.b_peers(), resume);
    REQUIRE(r.ok());
    CHECK(r.frame->header.flags == kFrameResume);

    // ciphertext_len 10 < tag size, with a matching total length.
    std::string short_ct = frame.substr(0, kHeader) + std::string(10, 'c') + std::string(64, 's');
    short_ct[148] = short_ct[149] = short_ct[150] = 0;
    short_ct[151] = 10;
    CHECK(FrameReason(s, short_ct) == RejectReason::kMalformed);
  }
  SECTION("decrypt failed: the sealed data or its header was changed") {
    // Changed header fields are bound as associated data, even when re-signed.
    std::string count = frame;
    count[147] = static_cast<char>(count[147] ^ 1);
    ResignFrame(s.a, payload, &count);
    CHECK(FrameReason(s, count) == RejectReason::kDecryptFailed);

    // A low-order ephemeral key.
    std::string low = frame;
    low.replace(72, 32, std::string(32, '\0'));
    OpenResult r = OpenFrame(s.b, s.b_peers(), low);
    REQUIRE_FALSE(r.ok());
    CHECK(r.rejection.reason == RejectReason::kDecryptFailed);
    CHECK_THAT(r.rejection.message, Catch::Contains("low-order"));

    // The key is bound to the sender's box key: a peer table with the wrong box key fails.
    PublicIdentity wrong_box = s.a.identity();
    wrong_box.box_pk = s.c.identity().box_pk;
    CHECK(OpenFrame(s.b, Sites::Lookup({wrong_box}), frame).rejection.reason ==
          RejectReason::kDecryptFailed);
  }
  SECTION("only the sender's box key seals a frame that decrypts") {
    // c knows a's and b's public keys and writes a's signing key as the sender: without a's box
    // secret the frame does not decrypt, so its payload is never parsed.
    std::string claims_a = SealFrame(s.c, s.b.identity(), 5, 7, 3, payload);
    claims_a.replace(8, 32, reinterpret_cast<const char*>(s.a.identity().sign_pk.data()), 32);
    ResignFrame(s.c, payload, &claims_a);
    CHECK(FrameReason(s, claims_a) == RejectReason::kDecryptFailed);
    // Even with a peer table entry that pairs a's signing key with c's box key: the key
    // derivation binds the sender's signing key as well.
    PublicIdentity mixed = s.a.identity();
    mixed.box_pk = s.c.identity().box_pk;
    CHECK(OpenFrame(s.b, Sites::Lookup({mixed}), claims_a).rejection.reason ==
          RejectReason::kDecryptFailed);
  }
  SECTION("a payload that is not a frame payload is malformed, after decryption") {
    for (const std::string& junk : {std::string(), std::string("hello"), std::string(40, '\xc1')}) {
      OpenResult r = OpenFrame(s.b, s.b_peers(), SealFrame(s.a, s.b.identity(), 1, 1, 1, junk));
      REQUIRE_FALSE(r.ok());
      CHECK(r.rejection.reason == RejectReason::kMalformed);
      CHECK_THAT(r.rejection.message, Catch::StartsWith("frame rejected: malformed payload: "));
    }
  }
  SECTION("recipient is checked before the sender") {
    const std::string for_c = SealFrame(s.a, s.c.identity(), 5, 7, 3, payload);
    CHECK(OpenFrame(s.b, Sites::Lookup({}), for_c).rejection.reason ==
          RejectReason::kWrongRecipient);
  }
}

TEST_CASE("control message round trip per type", "[crypto][control]") {
  Sites s;
  const std::string ack_body("\x00\x00\x00\x00\x00\x00\x01\x2a", 8);
  const ControlType types[] = {ControlType::kHello, ControlType::kHelloAck, ControlType::kAck,
                               ControlType::kPing, ControlType::kRehello};
  for (ControlType type : types) {
    const std::string body = type == ControlType::kAck ? ack_body : "";
    for (std::int64_t ts : {std::int64_t{1700000000123}, std::int64_t{-5}, std::int64_t{0}}) {
      const std::string bytes = SealControl(s.a, s.b.identity(), type, ts, body);
      CHECK(bytes.size() == kControlHeader + body.size() + 64);
      CHECK(bytes.substr(0, 4) == "RLYC");
      CHECK(static_cast<int>(bytes[5]) == static_cast<int>(type));
      ControlResult r = OpenControl(s.b, s.b_peers(), bytes);
      REQUIRE(r.ok());
      CHECK(r.message->type == type);
      CHECK(r.message->sender == s.a.identity().sign_pk);
      CHECK(r.message->recipient == s.b.identity().sign_pk);
      CHECK(r.message->timestamp_ms == ts);
      CHECK(r.message->body == body);
    }
  }
}

TEST_CASE("control message rejections", "[crypto][control]") {
  Sites s;
  const std::string msg = SealControl(s.a, s.b.identity(), ControlType::kHello, 42, "");
  auto reason = [&](std::string_view bytes) {
    ControlResult r = OpenControl(s.b, s.b_peers(), bytes);
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.rejection.message, Catch::StartsWith("control message rejected: "));
    return r.rejection.reason;
  };

  SECTION("bad signature") {
    std::string bad = msg;
    bad.back() = static_cast<char>(bad.back() ^ 1);
    CHECK(reason(bad) == RejectReason::kBadSignature);
    std::string ts = msg;
    ts[79] = static_cast<char>(ts[79] ^ 1);  // timestamp is signed
    CHECK(reason(ts) == RejectReason::kBadSignature);
  }
  SECTION("wrong recipient") {
    CHECK(reason(SealControl(s.a, s.c.identity(), ControlType::kHello, 42, "")) ==
          RejectReason::kWrongRecipient);
  }
  SECTION("unknown sender") {
    CHECK(reason(SealControl(s.c, s.b.identity(), ControlType::kHello, 42, "")) ==
          RejectReason::kUnknownSender);
  }
  SECTION("unknown type, even when correctly signed") {
    for (int type : {0, 6, 255}) {
      std::string bad = msg;
      bad[5] = static_cast<char>(type);
      CHECK(reason(bad) == RejectReason::kMalformed);
      Resign(s.a, &bad);
      ControlResult r = OpenControl(s.b, s.b_peers(), bad);
      REQUIRE_FALSE(r.ok());
      CHECK(r.rejection.reason == RejectReason::kMalformed);
      CHECK_THAT(r.rejection.message,
                 Catch::Contains("unknown message type " + std::to_string(type)));
    }
  }
  SECTION("framing") {
    for (std::size_t len : {std::size_t{0}, std::size_t{10}, kControlHeader - 1, msg.size() - 1})
      CHECK(reason(msg.substr(0, len)) == RejectReason::kTruncated);
    CHECK(reason(msg + "x") == RejectReason::kMalformed);
    std::string version = msg;
    version[4] = 9;
    CHECK(reason(version) == RejectReason::kUnsupportedVersion);
    CHECK(reason(SealFrame(s.a, s.b.identity(), 1, 1, 1, Payload(1))) == RejectReason::kBadMagic);
    std::string reserved = msg;
    reserved[6] = 1;
    Resign(s.a, &reserved);
    CHECK(reason(reserved) == RejectReason::kMalformed);
  }
}

}  // namespace
}  // namespace relay::crypto
