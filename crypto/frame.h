#pragma once
// Frames and signed link messages: the bytes that cross a link (see docs/wire-format.md).
//
// A frame carries a batch of events from one site to one peer: a plaintext header (format
// version, sender, recipient, ephemeral X25519 key, nonce, link sequence range, event count),
// the payload sealed with XChaCha20-Poly1305 (IETF) under a key derived from X25519(ephemeral,
// recipient) bound to both sites' public keys, with the header as associated data, and an
// Ed25519 signature by the sender over header + ciphertext.
//
// A control message (hello, ack, heartbeat) is a small signed, unencrypted message.
//
// Opening is strict: every way a frame can be wrong maps to one RejectReason with a message that
// says what was wrong. Replay detection needs durable state, so the caller does it, using
// RejectReason::kReplay for the error it reports.

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"
#include "crypto/identity.h"
#include "crypto/origin.h"

namespace relay::crypto {

// Wire version 2 (docs/wire-format.md): frame payloads carry origin attestations, events the
// core/hops envelope, and the ZeroMQ link runs over CURVE. Version 1 is refused by name.
inline constexpr std::uint8_t kFrameVersion = 2;
inline constexpr std::uint8_t kControlVersion = 2;
// Link sequences (a frame's range, an acknowledgement) never exceed this; larger ones are
// malformed, so that arithmetic on them cannot overflow.
inline constexpr std::uint64_t kMaxSequence = std::uint64_t{1} << 62;

enum class RejectReason : std::uint8_t {
  kTruncated = 0,       // shorter than its header says, or than a header
  kBadMagic,            // not a relay frame / control message at all
  kUnsupportedVersion,  // known magic, unknown format version
  kUnknownSender,       // sender key is not a configured peer
  kWrongRecipient,      // addressed to another site
  kBadSignature,        // Ed25519 signature does not verify
  kDecryptFailed,  // signature fine but AEAD open failed (should not happen unless keyed wrong)
  kMalformed,      // well signed and decrypted but the content does not parse
  kReplay,         // a frame sequence already accepted (reported by the caller)
  kCount
};
// Stable snake_case name used as the metrics label: "truncated", "bad_signature", ...
const char* RejectReasonName(RejectReason reason);

struct Rejection {
  RejectReason reason;
  std::string message;  // says what was wrong, e.g. "frame truncated: 41 bytes, header needs 170"
};

// Frame header flags.
// kFrameResume: the frame starts right after a position the recipient acknowledged before
// (first_seq - 1, its cursor at the sender). A recipient that has accepted nothing from the
// sender takes a first frame starting anywhere but at 1 only with this flag, so an on-path
// attacker cannot make it skip (and acknowledge away) the frames before by holding them back,
// while a recipient that lost its store still resumes.
inline constexpr std::uint8_t kFrameResume = 0x01;
inline constexpr std::uint8_t kFrameKnownFlags = kFrameResume;

struct FrameHeader {
  std::uint8_t version = kFrameVersion;
  std::uint8_t flags = 0;       // kFrame* flags
  PublicKey sender{};           // sender's sign_pk
  PublicKey recipient{};        // recipient's sign_pk
  std::uint64_t first_seq = 0;  // link sequence range of the events inside
  std::uint64_t last_seq = 0;
  std::uint32_t event_count = 0;
};

// What a frame's signature covers besides its header (docs/wire-format.md, "Frame"): a digest
// of its payload built from the digests of its events' cores (crypto/origin.h), their link
// sequences and hops, and its attestations -- not of its bytes, so that neither side hashes a
// payload twice: the sender keeps each event's digest with the event, the receiver needs it
// anyway to check the origin's signature.
class FrameBodyDigest {
 public:
  FrameBodyDigest();
  void AddEvent(std::uint64_t seq, const Digest& core_digest, std::string_view hops);
  void AddAttestation(std::string_view attestation);
  Digest Final();

 private:
  alignas(64) std::array<unsigned char, 384> events_;  // crypto_generichash_state, opaque here
  alignas(64) std::array<unsigned char, 384> attestations_;
  std::uint32_t event_count_ = 0, attestation_count_ = 0;
};

// An event of an opened frame: its link sequence, its bytes, the core inside them and the
// core's digest (views into OpenedFrame::plaintext).
struct OpenedEvent {
  std::uint64_t seq = 0;
  std::string_view encoded;
  std::string_view core;
  Digest digest{};
};

struct OpenedFrame {
  FrameHeader header;
  std::string plaintext;
  std::vector<OpenedEvent> events;
  std::vector<std::string_view> attestations;
};

// Looks up a peer by its sign_pk; nullopt when the key is not a configured peer.
using PeerLookup = std::function<std::optional<PublicIdentity>(const PublicKey& sign_pk)>;

// Seals `plaintext` for `recipient`, signing `body_digest` (FrameBodyDigest of the payload).
std::string SealFrameWithDigest(const SiteKey& sender, const PublicIdentity& recipient,
                                std::uint64_t first_seq, std::uint64_t last_seq,
                                std::uint32_t event_count, std::string_view plaintext,
                                const Digest& body_digest, std::uint8_t flags = 0);
// The same, computing the body digest from the plaintext (a frame payload); a plaintext that is
// no payload is signed all the same (its receiver refuses it as malformed). For tests and tools.
std::string SealFrame(const SiteKey& sender, const PublicIdentity& recipient,
                      std::uint64_t first_seq, std::uint64_t last_seq, std::uint32_t event_count,
                      std::string_view plaintext, std::uint8_t flags = 0);

// Verifies and decrypts a frame addressed to `self`. On failure returns a Rejection.
// Order of checks: length/magic/version, header fields, recipient, sender lookup, decryption,
// the payload's layout, signature (over the header and the payload's digest).
struct OpenResult {
  std::optional<OpenedFrame> frame;
  Rejection rejection{RejectReason::kMalformed, ""};
  bool ok() const { return frame.has_value(); }
};
OpenResult OpenFrame(const SiteKey& self, const PeerLookup& peers, std::string_view bytes);

// True when the bytes start with the frame magic (as opposed to a control message).
bool LooksLikeFrame(std::string_view bytes);

// --- Control messages -----------------------------------------------------------------------
enum class ControlType : std::uint8_t {
  kHello = 1,     // "I am sender, I want to talk to recipient"; body empty
  kHelloAck = 2,  // answer to hello; body empty
  kAck = 3,       // body: u64 big-endian: sender has durably accepted every event through seq
  kPing = 4,      // heartbeat; body empty
  kRehello = 5,   // "I do not know this connection; say hello again"; body empty
};

struct ControlMessage {
  ControlType type = ControlType::kPing;
  PublicKey sender{};
  PublicKey recipient{};
  std::int64_t timestamp_ms = 0;  // sender's wall clock, Unix ms
  std::string body;
};

std::string SealControl(const SiteKey& sender, const PublicIdentity& recipient, ControlType type,
                        std::int64_t timestamp_ms, std::string_view body);

struct ControlResult {
  std::optional<ControlMessage> message;
  Rejection rejection{RejectReason::kMalformed, ""};
  bool ok() const { return message.has_value(); }
};
// Verifies a control message addressed to `self` and signed by a known peer.
ControlResult OpenControl(const SiteKey& self, const PeerLookup& peers, std::string_view bytes);

}  // namespace relay::crypto
