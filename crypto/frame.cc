#include "crypto/frame.h"

#include <sodium.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>

#include "crypto/bundle.h"  // detail::Envelope and the checks shared with bundles
#include "event/event.h"

namespace relay::crypto {
namespace {

// Frame header layout (docs/wire-format.md, "Frame"); all integers big-endian.
constexpr std::string_view kFrameMagic = "RLYF";
constexpr std::size_t kVersionOffset = 4;  // shared by frames and control messages
constexpr std::size_t kFrameFlagsOffset = 5;
constexpr std::size_t kFrameReservedOffset = 6;
constexpr std::size_t kFrameSenderOffset = 8;
constexpr std::size_t kFrameRecipientOffset = 40;
constexpr std::size_t kFrameEphemeralOffset = 72;
constexpr std::size_t kFrameNonceOffset = 104;
constexpr std::size_t kFrameFirstSeqOffset = 128;
constexpr std::size_t kFrameLastSeqOffset = 136;
constexpr std::size_t kFrameEventCountOffset = 144;
constexpr std::size_t kFrameCiphertextLenOffset = 148;
constexpr std::size_t kFrameHeaderSize = 152;
constexpr std::size_t kTagSize = crypto_aead_xchacha20poly1305_ietf_ABYTES;
constexpr std::size_t kSignatureSize = crypto_sign_BYTES;
constexpr std::string_view kFrameKdfContext = "relay-frame-v2";
constexpr std::string_view kFrameBodyContext = "relay-frame-body-v2";

// Control message layout (docs/wire-format.md, "Control messages").
constexpr std::string_view kControlMagic = "RLYC";
constexpr std::size_t kControlTypeOffset = 5;
constexpr std::size_t kControlReservedOffset = 6;
constexpr std::size_t kControlSenderOffset = 8;
constexpr std::size_t kControlRecipientOffset = 40;
constexpr std::size_t kControlTimestampOffset = 72;
constexpr std::size_t kControlBodyLenOffset = 80;
constexpr std::size_t kControlHeaderSize = 84;

static_assert(crypto_aead_xchacha20poly1305_ietf_NPUBBYTES == 24);
static_assert(crypto_aead_xchacha20poly1305_ietf_KEYBYTES == 32);

const unsigned char* Bytes(std::string_view s) {
  return reinterpret_cast<const unsigned char*>(s.data());
}
unsigned char* MutableBytes(std::string* s) { return reinterpret_cast<unsigned char*>(s->data()); }

PublicKey GetKey(std::string_view bytes, std::size_t offset) {
  PublicKey key;
  std::memcpy(key.data(), bytes.data() + offset, key.size());
  return key;
}
bool KeysEqual(const PublicKey& a, const PublicKey& b) {
  return sodium_memcmp(a.data(), b.data(), a.size()) == 0;
}
std::string Fingerprint(const PublicKey& sign_pk) {
  PublicIdentity id;
  id.sign_pk = sign_pk;
  return id.Fingerprint();
}

// What the Ed25519 signature covers: the header followed by BLAKE2b-256 of the body. Signing a
// digest of the body rather than the body itself keeps the signature's cost constant (Ed25519
// hashes its message twice with SHA-512 when signing, which cost more than the AEAD per byte);
// BLAKE2b-256's collision resistance keeps the binding of header and body.
std::string SigningInput(std::string_view signed_part, std::size_t header_size) {
  std::string input(signed_part.substr(0, header_size));
  unsigned char digest[crypto_generichash_BYTES];
  crypto_generichash(digest, sizeof digest, Bytes(signed_part.substr(header_size)),
                     signed_part.size() - header_size, nullptr, 0);
  input.append(reinterpret_cast<const char*>(digest), sizeof digest);
  return input;
}

}  // namespace

namespace detail {

void PutBigEndian(std::uint64_t value, std::size_t width, unsigned char* out) {
  for (std::size_t i = 0; i < width; ++i)
    out[i] = static_cast<unsigned char>(value >> (8 * (width - 1 - i)));
}
std::uint64_t GetBigEndian(std::string_view bytes, std::size_t offset, std::size_t width) {
  std::uint64_t value = 0;
  for (std::size_t i = 0; i < width; ++i)
    value = (value << 8) | static_cast<unsigned char>(bytes[offset + i]);
  return value;
}

Rejection Reject(const Envelope& env, RejectReason reason, const std::string& what) {
  return Rejection{reason, std::string(env.noun) + " rejected: " + what};
}

// Magic, version and length checks. On success *body_len is the declared length of the body.
std::optional<Rejection> CheckFraming(const Envelope& env, std::string_view bytes,
                                      std::uint64_t* body_len) {
  return CheckFramingSized(env, bytes.substr(0, env.header_size), bytes.size(), body_len);
}

std::optional<Rejection> CheckFramingSized(const Envelope& env, std::string_view head,
                                           std::uint64_t total_size, std::uint64_t* body_len) {
  // Magic and version come before the header-length check: a short non-relay message is
  // "bad magic", and a future version may have a different header size.
  if (head.size() >= env.magic.size() && head.substr(0, env.magic.size()) != env.magic)
    return Reject(
        env, RejectReason::kBadMagic,
        "does not start with '" + std::string(env.magic) + "' (not a relay " + env.noun + ")");
  if (head.size() > kVersionOffset) {
    unsigned version = static_cast<unsigned char>(head[kVersionOffset]);
    if (version != env.version)
      return Reject(env, RejectReason::kUnsupportedVersion,
                    "format version " + std::to_string(version) + " is not supported (this relay " +
                        "supports version " + std::to_string(env.version) + ")");
  }
  if (total_size < env.header_size)
    return Reject(env, RejectReason::kTruncated,
                  "truncated: " + std::to_string(total_size) + " bytes, header needs " +
                      std::to_string(env.header_size));
  *body_len = GetBigEndian(head, env.body_len_offset, env.body_len_width);
  // Checked before the total is computed, which a u64 length could overflow.
  if (*body_len > env.max_body_len)
    return Reject(env, RejectReason::kMalformed,
                  "header declares a body of " + std::to_string(*body_len) +
                      " bytes, more than the limit of " + std::to_string(env.max_body_len));
  const std::uint64_t total = env.header_size + std::uint64_t{*body_len} + kSignatureSize;
  if (total_size < total)
    return Reject(env, RejectReason::kTruncated,
                  "truncated: " + std::to_string(total_size) + " bytes, header declares " +
                      std::to_string(total));
  if (total_size > total)
    return Reject(env, RejectReason::kMalformed,
                  std::to_string(total_size - total) + " trailing bytes after the signature (" +
                      std::to_string(total_size) + " bytes, header declares " +
                      std::to_string(total) + ")");
  return std::nullopt;
}

// Recipient, sender and signature checks, in that order. On success *peer is the sender.
std::optional<Rejection> CheckParties(const Envelope& env, const SiteKey& self,
                                      const PeerLookup& peers, std::string_view bytes,
                                      PublicIdentity* peer) {
  const std::string_view signed_part = bytes.substr(0, bytes.size() - kSignatureSize);
  const std::string input = SigningInput(signed_part, env.header_size);
  Signature sig;
  std::memcpy(sig.data(), bytes.data() + bytes.size() - kSignatureSize, kSignatureSize);
  return CheckPartiesSigned(env, self, peers, bytes.substr(0, env.header_size),
                            std::string_view(input).substr(env.header_size), sig, peer);
}

std::optional<Rejection> CheckPartiesSigned(const Envelope& env, const SiteKey& self,
                                            const PeerLookup& peers, std::string_view head,
                                            std::string_view body_digest, const Signature& sig,
                                            PublicIdentity* peer) {
  const PublicKey recipient = GetKey(head, env.recipient_offset);
  if (!KeysEqual(recipient, self.identity().sign_pk))
    return Reject(env, RejectReason::kWrongRecipient,
                  "addressed to site " + Fingerprint(recipient) + ", but this site is " +
                      self.identity().Fingerprint());
  const PublicKey sender = GetKey(head, env.sender_offset);
  std::optional<PublicIdentity> found = peers ? peers(sender) : std::nullopt;
  if (!found || !KeysEqual(found->sign_pk, sender))
    return Reject(env, RejectReason::kUnknownSender,
                  "sender " + Fingerprint(sender) + " is not a configured peer");
  std::string input(head.substr(0, env.header_size));
  input.append(body_digest);
  if (!VerifySignature(sender, input, sig))
    return Reject(env, RejectReason::kBadSignature,
                  "bad signature from peer " + Fingerprint(sender));
  *peer = *found;
  return std::nullopt;
}

std::optional<Rejection> CheckReservedAndParties(const Envelope& env, const SiteKey& self,
                                                 const PeerLookup& peers, std::string_view bytes,
                                                 std::size_t reserved_offset,
                                                 PublicIdentity* peer) {
  const auto reserved = GetBigEndian(bytes, reserved_offset, 2);
  if (reserved != 0)
    return Reject(env, RejectReason::kMalformed,
                  "reserved field is " + std::to_string(reserved) + ", must be 0");
  return CheckParties(env, self, peers, bytes, peer);
}

void AppendSignature(const SiteKey& sender, std::size_t header_size, std::string* out) {
  Signature sig = sender.Sign(SigningInput(*out, header_size));
  out->append(reinterpret_cast<const char*>(sig.data()), sig.size());
}

}  // namespace detail

namespace {

using detail::AppendSignature;
using detail::CheckFraming;
using detail::CheckParties;
using detail::Envelope;
using detail::GetBigEndian;
using detail::PutBigEndian;
using detail::Reject;

constexpr std::uint64_t kMaxU32 = std::numeric_limits<std::uint32_t>::max();
constexpr Envelope kFrameEnvelope{.noun = "frame",
                                  .magic = kFrameMagic,
                                  .version = kFrameVersion,
                                  .header_size = kFrameHeaderSize,
                                  .body_len_offset = kFrameCiphertextLenOffset,
                                  .body_len_width = 4,
                                  .max_body_len = kMaxU32,
                                  .sender_offset = kFrameSenderOffset,
                                  .recipient_offset = kFrameRecipientOffset};
constexpr Envelope kControlEnvelope{.noun = "control message",
                                    .magic = kControlMagic,
                                    .version = kControlVersion,
                                    .header_size = kControlHeaderSize,
                                    .body_len_offset = kControlBodyLenOffset,
                                    .body_len_width = 4,
                                    .max_body_len = kMaxU32,
                                    .sender_offset = kControlSenderOffset,
                                    .recipient_offset = kControlRecipientOffset};

// key = BLAKE2b-256("relay-frame-v1" || shared || eph_pk || recipient box_pk || sender box_pk ||
//                   sender sign_pk || recipient sign_pk)
// `shared` is X25519(ephemeral, recipient box key); `statics` is X25519(sender box key,
// recipient box key), so that only the sender (or the recipient) can seal a frame that
// decrypts: the payload is parsed only once decryption has authenticated its sender, and its
// signature (over the payload's digest) is checked after that.
void DeriveFrameKey(const std::array<std::uint8_t, 32>& shared,
                    const std::array<std::uint8_t, 32>& statics, const PublicKey& eph_pk,
                    const PublicIdentity& sender, const PublicIdentity& recipient,
                    unsigned char key[crypto_aead_xchacha20poly1305_ietf_KEYBYTES]) {
  crypto_generichash_state state;
  crypto_generichash_init(&state, nullptr, 0, crypto_aead_xchacha20poly1305_ietf_KEYBYTES);
  crypto_generichash_update(&state, Bytes(kFrameKdfContext), kFrameKdfContext.size());
  crypto_generichash_update(&state, shared.data(), shared.size());
  crypto_generichash_update(&state, statics.data(), statics.size());
  crypto_generichash_update(&state, eph_pk.data(), eph_pk.size());
  crypto_generichash_update(&state, recipient.box_pk.data(), recipient.box_pk.size());
  crypto_generichash_update(&state, sender.box_pk.data(), sender.box_pk.size());
  crypto_generichash_update(&state, sender.sign_pk.data(), sender.sign_pk.size());
  crypto_generichash_update(&state, recipient.sign_pk.data(), recipient.sign_pk.size());
  crypto_generichash_final(&state, key, crypto_aead_xchacha20poly1305_ietf_KEYBYTES);
  sodium_memzero(&state, sizeof state);
}

}  // namespace

const char* RejectReasonName(RejectReason reason) {
  static const char* const kNames[] = {"truncated",      "bad_magic",       "unsupported_version",
                                       "unknown_sender", "wrong_recipient", "bad_signature",
                                       "decrypt_failed", "malformed",       "replay"};
  static_assert(std::size(kNames) == static_cast<std::size_t>(RejectReason::kCount));
  auto i = static_cast<std::size_t>(reason);
  return i < std::size(kNames) ? kNames[i] : "unknown";
}

bool LooksLikeFrame(std::string_view bytes) {
  return bytes.size() >= kFrameMagic.size() && bytes.substr(0, kFrameMagic.size()) == kFrameMagic;
}

FrameBodyDigest::FrameBodyDigest() {
  static_assert(sizeof(crypto_generichash_state) <= sizeof(events_));
  crypto_generichash_init(reinterpret_cast<crypto_generichash_state*>(events_.data()), nullptr, 0,
                          crypto_generichash_BYTES);
  crypto_generichash_init(reinterpret_cast<crypto_generichash_state*>(attestations_.data()),
                          nullptr, 0, crypto_generichash_BYTES);
}

void FrameBodyDigest::AddEvent(std::uint64_t seq, const Digest& core_digest,
                               std::string_view hops) {
  unsigned char head[8 + 32 + 4];
  PutBigEndian(seq, 8, head);
  std::memcpy(head + 8, core_digest.data(), 32);
  PutBigEndian(hops.size(), 4, head + 40);
  auto* st = reinterpret_cast<crypto_generichash_state*>(events_.data());
  crypto_generichash_update(st, head, sizeof head);
  crypto_generichash_update(st, Bytes(hops), hops.size());
  ++event_count_;
}

void FrameBodyDigest::AddAttestation(std::string_view attestation) {
  unsigned char len[4];
  PutBigEndian(attestation.size(), 4, len);
  auto* st = reinterpret_cast<crypto_generichash_state*>(attestations_.data());
  crypto_generichash_update(st, len, sizeof len);
  crypto_generichash_update(st, Bytes(attestation), attestation.size());
  ++attestation_count_;
}

Digest FrameBodyDigest::Final() {
  unsigned char parts[32 + 32 + 8];
  crypto_generichash_final(reinterpret_cast<crypto_generichash_state*>(events_.data()), parts, 32);
  crypto_generichash_final(reinterpret_cast<crypto_generichash_state*>(attestations_.data()),
                           parts + 32, 32);
  PutBigEndian(event_count_, 4, parts + 64);
  PutBigEndian(attestation_count_, 4, parts + 68);
  crypto_generichash_state st;
  crypto_generichash_init(&st, nullptr, 0, 32);
  crypto_generichash_update(&st, Bytes(kFrameBodyContext), kFrameBodyContext.size());
  crypto_generichash_update(&st, parts, sizeof parts);
  Digest d;
  crypto_generichash_final(&st, d.data(), d.size());
  return d;
}

namespace {

// The body digest of a plaintext, or nullopt when it is no frame payload.
std::optional<Digest> PayloadDigest(std::string_view plaintext, std::vector<OpenedEvent>* events,
                                    std::vector<std::string_view>* attestations, std::string* bad) {
  auto payload = DecodeFramePayload(plaintext);
  if (!payload) {
    *bad = payload.message();
    return std::nullopt;
  }
  FrameBodyDigest body;
  for (const FramedEvent& fe : payload->events) {
    auto env = ParseEventEnvelope(fe.encoded);
    if (!env) {
      *bad = env.message();
      return std::nullopt;
    }
    OpenedEvent e{fe.seq, fe.encoded, env->core, EventDigest(env->core)};
    body.AddEvent(e.seq, e.digest, env->hops);
    if (events) events->push_back(e);
  }
  for (std::string_view a : payload->attestations) body.AddAttestation(a);
  if (attestations) *attestations = std::move(payload->attestations);
  return body.Final();
}

}  // namespace

std::string SealFrame(const SiteKey& sender, const PublicIdentity& recipient,
                      std::uint64_t first_seq, std::uint64_t last_seq, std::uint32_t event_count,
                      std::string_view plaintext, std::uint8_t flags) {
  std::string bad;
  std::optional<Digest> d = PayloadDigest(plaintext, nullptr, nullptr, &bad);
  if (!d) {
    // No payload: signed over the plaintext's hash; the receiver says it is malformed.
    d.emplace();
    crypto_generichash(d->data(), d->size(), Bytes(plaintext), plaintext.size(), nullptr, 0);
  }
  return SealFrameWithDigest(sender, recipient, first_seq, last_seq, event_count, plaintext, *d,
                             flags);
}

std::string SealFrameWithDigest(const SiteKey& sender, const PublicIdentity& recipient,
                                std::uint64_t first_seq, std::uint64_t last_seq,
                                std::uint32_t event_count, std::string_view plaintext,
                                const Digest& body_digest, std::uint8_t flags) {
  if (first_seq > last_seq || last_seq > kMaxSequence || (flags & ~kFrameKnownFlags) != 0 ||
      plaintext.size() > std::numeric_limits<std::uint32_t>::max() - kTagSize) {
    std::fprintf(stderr, "relay: SealFrame called with an invalid sequence range or size\n");
    std::abort();
  }
  unsigned char eph_pk[32];
  unsigned char eph_sk[32];
  crypto_box_keypair(eph_pk, eph_sk);
  std::array<std::uint8_t, 32> shared{};
  if (crypto_scalarmult(shared.data(), eph_sk, recipient.box_pk.data()) != 0) {
    // Only a low-order box key gets here, and PublicIdentity::Parse rejects those: a caller bug.
    // Continuing would encrypt under a key derived from public values only.
    std::fprintf(stderr, "relay: SealFrame: recipient %s has a low-order X25519 key\n",
                 recipient.Fingerprint().c_str());
    std::abort();
  }
  sodium_memzero(eph_sk, sizeof eph_sk);
  std::array<std::uint8_t, 32> statics{};
  if (!sender.SharedSecret(recipient.box_pk, &statics)) {
    std::fprintf(stderr, "relay: SealFrame: recipient %s has a low-order X25519 key\n",
                 recipient.Fingerprint().c_str());
    std::abort();
  }
  PublicKey eph{};
  std::memcpy(eph.data(), eph_pk, sizeof eph_pk);
  unsigned char key[crypto_aead_xchacha20poly1305_ietf_KEYBYTES];
  DeriveFrameKey(shared, statics, eph, sender.identity(), recipient, key);
  sodium_memzero(shared.data(), shared.size());
  sodium_memzero(statics.data(), statics.size());

  const std::size_t ciphertext_len = plaintext.size() + kTagSize;
  std::string out(kFrameHeaderSize + ciphertext_len, '\0');
  unsigned char* h = MutableBytes(&out);
  std::memcpy(h, kFrameMagic.data(), kFrameMagic.size());
  h[kVersionOffset] = kFrameVersion;
  h[kFrameFlagsOffset] = flags;
  PutBigEndian(0, 2, h + kFrameReservedOffset);
  std::memcpy(h + kFrameSenderOffset, sender.identity().sign_pk.data(), 32);
  std::memcpy(h + kFrameRecipientOffset, recipient.sign_pk.data(), 32);
  std::memcpy(h + kFrameEphemeralOffset, eph_pk, 32);
  randombytes_buf(h + kFrameNonceOffset, crypto_aead_xchacha20poly1305_ietf_NPUBBYTES);
  PutBigEndian(first_seq, 8, h + kFrameFirstSeqOffset);
  PutBigEndian(last_seq, 8, h + kFrameLastSeqOffset);
  PutBigEndian(event_count, 4, h + kFrameEventCountOffset);
  PutBigEndian(ciphertext_len, 4, h + kFrameCiphertextLenOffset);

  unsigned long long written = 0;
  crypto_aead_xchacha20poly1305_ietf_encrypt(h + kFrameHeaderSize, &written, Bytes(plaintext),
                                             plaintext.size(), h, kFrameHeaderSize, nullptr,
                                             h + kFrameNonceOffset, key);
  sodium_memzero(key, sizeof key);
  std::string input(out, 0, kFrameHeaderSize);
  input.append(reinterpret_cast<const char*>(body_digest.data()), body_digest.size());
  const Signature sig = sender.Sign(input);
  out.append(reinterpret_cast<const char*>(sig.data()), sig.size());
  return out;
}

OpenResult OpenFrame(const SiteKey& self, const PeerLookup& peers, std::string_view bytes) {
  OpenResult result;
  const Envelope& env = kFrameEnvelope;
  std::uint64_t ciphertext_len = 0;
  if (auto r = CheckFraming(env, bytes, &ciphertext_len)) {
    result.rejection = std::move(*r);
    return result;
  }
  FrameHeader header;
  header.version = kFrameVersion;
  header.sender = GetKey(bytes, kFrameSenderOffset);
  header.recipient = GetKey(bytes, kFrameRecipientOffset);
  header.first_seq = GetBigEndian(bytes, kFrameFirstSeqOffset, 8);
  header.last_seq = GetBigEndian(bytes, kFrameLastSeqOffset, 8);
  header.event_count = static_cast<std::uint32_t>(GetBigEndian(bytes, kFrameEventCountOffset, 4));
  const unsigned flags = static_cast<unsigned char>(bytes[kFrameFlagsOffset]);
  const auto reserved = GetBigEndian(bytes, kFrameReservedOffset, 2);
  if ((flags & ~unsigned{kFrameKnownFlags}) != 0 || reserved != 0) {
    result.rejection =
        Reject(env, RejectReason::kMalformed,
               "flags " + std::to_string(flags) + " (known: " + std::to_string(kFrameKnownFlags) +
                   ") and reserved " + std::to_string(reserved) + " (must be 0)");
    return result;
  }
  header.flags = static_cast<std::uint8_t>(flags);
  if (header.last_seq > kMaxSequence) {
    result.rejection =
        Reject(env, RejectReason::kMalformed,
               "sequence " + std::to_string(header.last_seq) + " is beyond the largest allowed (" +
                   std::to_string(kMaxSequence) + ")");
    return result;
  }
  if (header.first_seq > header.last_seq) {
    result.rejection = Reject(env, RejectReason::kMalformed,
                              "sequence range " + std::to_string(header.first_seq) + ".." +
                                  std::to_string(header.last_seq) + " is inverted");
    return result;
  }
  if (ciphertext_len < kTagSize) {
    result.rejection =
        Reject(env, RejectReason::kMalformed,
               "ciphertext is " + std::to_string(ciphertext_len) + " bytes, shorter than the " +
                   std::to_string(kTagSize) + "-byte authentication tag");
    return result;
  }
  // Recipient and sender first (nothing is decrypted for a stranger); the signature covers the
  // payload's digest, so it is checked once the payload is decrypted and laid out.
  const PublicKey recipient = GetKey(bytes, kFrameRecipientOffset);
  if (!KeysEqual(recipient, self.identity().sign_pk)) {
    result.rejection = Reject(env, RejectReason::kWrongRecipient,
                              "addressed to site " + Fingerprint(recipient) +
                                  ", but this site is " + self.identity().Fingerprint());
    return result;
  }
  const PublicKey sender = GetKey(bytes, kFrameSenderOffset);
  std::optional<PublicIdentity> found = peers ? peers(sender) : std::nullopt;
  if (!found || !KeysEqual(found->sign_pk, sender)) {
    result.rejection = Reject(env, RejectReason::kUnknownSender,
                              "sender " + Fingerprint(sender) + " is not a configured peer");
    return result;
  }
  const PublicIdentity& peer = *found;

  const PublicKey eph = GetKey(bytes, kFrameEphemeralOffset);
  std::array<std::uint8_t, 32> shared{};
  if (!self.SharedSecret(eph, &shared)) {
    result.rejection =
        Reject(env, RejectReason::kDecryptFailed,
               "ephemeral key from peer " + peer.Fingerprint() + " is a low-order point");
    return result;
  }
  std::array<std::uint8_t, 32> statics{};
  if (!self.SharedSecret(peer.box_pk, &statics)) {
    sodium_memzero(shared.data(), shared.size());
    result.rejection = Reject(env, RejectReason::kDecryptFailed,
                              "box key of peer " + peer.Fingerprint() + " is a low-order point");
    return result;
  }
  unsigned char key[crypto_aead_xchacha20poly1305_ietf_KEYBYTES];
  DeriveFrameKey(shared, statics, eph, peer, self.identity(), key);
  sodium_memzero(shared.data(), shared.size());
  sodium_memzero(statics.data(), statics.size());

  OpenedFrame frame;
  frame.header = header;
  frame.plaintext.reserve(32);  // on the heap: the views below survive moving the frame
  frame.plaintext.resize(ciphertext_len - kTagSize);
  unsigned long long plaintext_len = 0;
  const int rc = crypto_aead_xchacha20poly1305_ietf_decrypt(
      MutableBytes(&frame.plaintext), &plaintext_len, nullptr, Bytes(bytes) + kFrameHeaderSize,
      ciphertext_len, Bytes(bytes), kFrameHeaderSize, Bytes(bytes) + kFrameNonceOffset, key);
  sodium_memzero(key, sizeof key);
  if (rc != 0) {
    result.rejection = Reject(env, RejectReason::kDecryptFailed,
                              "frame from peer " + peer.Fingerprint() +
                                  " does not decrypt (altered, or not sealed for this site)");
    return result;
  }
  std::string bad;
  std::optional<Digest> body =
      PayloadDigest(frame.plaintext, &frame.events, &frame.attestations, &bad);
  if (!body) {
    result.rejection = Reject(env, RejectReason::kMalformed, "malformed payload: " + bad);
    return result;
  }
  std::string input(bytes.substr(0, kFrameHeaderSize));
  input.append(reinterpret_cast<const char*>(body->data()), body->size());
  Signature sig;
  std::memcpy(sig.data(), bytes.data() + bytes.size() - kSignatureSize, kSignatureSize);
  if (!VerifySignature(sender, input, sig)) {
    result.rejection =
        Reject(env, RejectReason::kBadSignature, "bad signature from peer " + Fingerprint(sender));
    return result;
  }
  result.frame = std::move(frame);
  return result;
}

std::string SealControl(const SiteKey& sender, const PublicIdentity& recipient, ControlType type,
                        std::int64_t timestamp_ms, std::string_view body) {
  if (body.size() > std::numeric_limits<std::uint32_t>::max()) {
    std::fprintf(stderr, "relay: SealControl called with an oversized body\n");
    std::abort();
  }
  std::string out(kControlHeaderSize, '\0');
  unsigned char* h = MutableBytes(&out);
  std::memcpy(h, kControlMagic.data(), kControlMagic.size());
  h[kVersionOffset] = kControlVersion;
  h[kControlTypeOffset] = static_cast<unsigned char>(type);
  PutBigEndian(0, 2, h + kControlReservedOffset);
  std::memcpy(h + kControlSenderOffset, sender.identity().sign_pk.data(), 32);
  std::memcpy(h + kControlRecipientOffset, recipient.sign_pk.data(), 32);
  PutBigEndian(static_cast<std::uint64_t>(timestamp_ms), 8, h + kControlTimestampOffset);
  PutBigEndian(body.size(), 4, h + kControlBodyLenOffset);
  out.append(body);
  AppendSignature(sender, kControlHeaderSize, &out);
  return out;
}

ControlResult OpenControl(const SiteKey& self, const PeerLookup& peers, std::string_view bytes) {
  ControlResult result;
  const Envelope& env = kControlEnvelope;
  std::uint64_t body_len = 0;
  if (auto r = CheckFraming(env, bytes, &body_len)) {
    result.rejection = std::move(*r);
    return result;
  }
  const unsigned type = static_cast<unsigned char>(bytes[kControlTypeOffset]);
  if (type < static_cast<unsigned>(ControlType::kHello) ||
      type > static_cast<unsigned>(ControlType::kRehello)) {
    result.rejection =
        Reject(env, RejectReason::kMalformed, "unknown message type " + std::to_string(type));
    return result;
  }
  PublicIdentity peer;
  if (auto r =
          detail::CheckReservedAndParties(env, self, peers, bytes, kControlReservedOffset, &peer)) {
    result.rejection = std::move(*r);
    return result;
  }
  ControlMessage message;
  message.type = static_cast<ControlType>(type);
  message.sender = GetKey(bytes, kControlSenderOffset);
  message.recipient = GetKey(bytes, kControlRecipientOffset);
  message.timestamp_ms = static_cast<std::int64_t>(GetBigEndian(bytes, kControlTimestampOffset, 8));
  message.body.assign(bytes.substr(kControlHeaderSize, body_len));
  result.message = std::move(message);
  return result;
}

}  // namespace relay::crypto
