#pragma once
// Sneakernet bundle files: the container that carries sealed frames (or an acknowledgement)
// on a USB disk between sites that share no network. See docs/wire-format.md, "Bundle".
//
// A bundle is self-describing and signed by its sender: header (magic "RLYB", version, kind,
// sender, recipient, bundle id, creation and expiry time), a body, and an Ed25519 signature over
// header || BLAKE2b-256(body). The frames inside are ordinary frames (crypto/frame.h): already
// encrypted for the recipient and signed, so a bundle adds integrity of the whole file (nothing
// cut off, nothing added) and an expiry.
//
// Opening is strict and every failure names what is wrong; the reasons reuse RejectReason, plus
// kExpired for a bundle past its expiry.

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "crypto/frame.h"
#include "crypto/identity.h"

namespace relay::crypto {

inline constexpr std::uint8_t kBundleVersion = 2;  // wire version 2 (frames inside are version 2)

enum class BundleKind : std::uint8_t {
  kFrames = 1,  // body: frames for the recipient
  kAck = 2,     // body: u64 "the sender of this ack has stored everything through seq"
  kResend = 3,  // body: u64 accepted through, u32 count, count x (u64 first, u64 last) ranges
                // also stored: "send me everything else again" (for one-way diode links)
};

using BundleId = std::array<std::uint8_t, 16>;

struct BundleHeader {
  BundleKind kind = BundleKind::kFrames;
  PublicKey sender{};
  PublicKey recipient{};
  BundleId id{};
  std::int64_t created_at_ms = 0;
  std::int64_t expires_at_ms = 0;  // 0: never expires
};

struct Bundle {
  BundleHeader header;
  std::vector<std::string> frames;  // kind kFrames: the sealed frames, in order
  std::uint64_t ack_through = 0;    // kind kAck and kResend
  // kind kResend: ranges of the recipient's log the sender has beyond ack_through, ascending.
  std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges;
};

// 32 lowercase hex characters.
std::string BundleIdHex(const BundleId& id);

// The largest body a bundle can carry (its frames and their framing): 4 GiB.
inline constexpr std::uint64_t kMaxBundleBodyBytes = std::uint64_t{1} << 32;

// Writes a bundle of `frames` (each a SealFrame result for `recipient`). A random id is drawn.
// The body is a 4-byte count, then per frame a 4-byte length and the frame.
std::string SealBundle(const SiteKey& sender, const PublicIdentity& recipient,
                       const std::vector<std::string>& frames, std::int64_t created_at_ms,
                       std::int64_t expires_at_ms, BundleId* id_out = nullptr);
std::string SealAck(const SiteKey& sender, const PublicIdentity& recipient,
                    std::uint64_t ack_through, std::int64_t created_at_ms,
                    std::int64_t expires_at_ms);

// A resend request: "I have everything through `accepted` and these ranges; send the rest again".
std::string SealResendRequest(const SiteKey& sender, const PublicIdentity& recipient,
                              std::uint64_t accepted,
                              const std::vector<std::pair<std::uint64_t, std::uint64_t>>& ranges,
                              std::int64_t created_at_ms, std::int64_t expires_at_ms);

struct BundleResult {
  std::optional<Bundle> bundle;
  Rejection rejection{RejectReason::kMalformed, ""};
  bool expired = false;  // rejection is "expired" (reason kMalformed is not used then)
  bool ok() const { return bundle.has_value(); }
};

// Verifies a bundle addressed to `self`, from a known peer, not expired at `now_ms`. The frames
// inside are NOT opened here (the caller opens each with OpenFrame).
BundleResult OpenBundle(const SiteKey& self, const PeerLookup& peers, std::string_view bytes,
                        std::int64_t now_ms);

// A bundle that need not be in memory (a file of up to 4 GiB): its size and its bytes by offset.
class BundleSource {
 public:
  virtual ~BundleSource() = default;
  virtual std::uint64_t size() const = 0;
  // Exactly `len` bytes at `offset` into *out; an error names what failed.
  virtual Status Read(std::uint64_t offset, std::size_t len, std::string* out) = 0;
};

// OpenBundle on a source, with the same checks in the same order and the same messages, in
// bounded memory: the header is checked before the body is read; the body is then read once
// in pieces for the signature, and the frames' layout walked without keeping them. On success
// the bundle carries no frames: read them with ForEachBundleFrame.
BundleResult OpenBundleFrom(const SiteKey& self, const PeerLookup& peers, BundleSource& source,
                            std::int64_t now_ms);

// Visits the frames of a frames bundle opened from `source`, in order, as (index, offset of the
// frame in the source, length). Stops at the first error of `visit`, or of the source.
Status ForEachBundleFrame(BundleSource& source,
                          const std::function<Status(std::uint64_t index, std::uint64_t offset,
                                                     std::uint32_t len)>& visit);

// --- Internal: shared by frames, control messages and bundles --------------------------------
// One implementation (in frame.cc) of the checks every signed envelope makes and of its signing
// scheme, header || BLAKE2b-256(body). Not an interface for code outside crypto/.
namespace detail {

struct Envelope {
  const char* noun;  // "frame", "control message", "bundle": messages read "<noun> rejected: ..."
  std::string_view magic;
  std::uint8_t version;
  std::size_t header_size;
  std::size_t body_len_offset;  // big-endian length of what lies between header and signature
  std::size_t body_len_width;   // 4 or 8 bytes
  std::uint64_t max_body_len;   // a larger declared length is malformed
  std::size_t sender_offset;
  std::size_t recipient_offset;
};

Rejection Reject(const Envelope& env, RejectReason reason, const std::string& what);
// Magic, version, header length, declared length (limit, truncated, trailing bytes), in that
// order. On success *body_len is the declared body length.
std::optional<Rejection> CheckFraming(const Envelope& env, std::string_view bytes,
                                      std::uint64_t* body_len);
// The same from the header alone (the first header_size bytes, or fewer) and the total size,
// for an envelope read in pieces (a bundle file).
std::optional<Rejection> CheckFramingSized(const Envelope& env, std::string_view head,
                                           std::uint64_t total_size, std::uint64_t* body_len);
// Recipient, sender lookup and signature, in that order. On success *peer is the sender.
std::optional<Rejection> CheckParties(const Envelope& env, const SiteKey& self,
                                      const PeerLookup& peers, std::string_view bytes,
                                      PublicIdentity* peer);
// The same from the header, BLAKE2b-256 of the body (computed in pieces) and the signature.
std::optional<Rejection> CheckPartiesSigned(const Envelope& env, const SiteKey& self,
                                            const PeerLookup& peers, std::string_view head,
                                            std::string_view body_digest, const Signature& sig,
                                            PublicIdentity* peer);
// The 2-byte reserved field at `reserved_offset` must be 0 (malformed otherwise), then
// CheckParties. Shared by control messages and bundles.
std::optional<Rejection> CheckReservedAndParties(const Envelope& env, const SiteKey& self,
                                                 const PeerLookup& peers, std::string_view bytes,
                                                 std::size_t reserved_offset, PublicIdentity* peer);
// Signs out (header || body) as header || BLAKE2b-256(body) and appends the signature.
void AppendSignature(const SiteKey& sender, std::size_t header_size, std::string* out);
void PutBigEndian(std::uint64_t value, std::size_t width, unsigned char* out);
std::uint64_t GetBigEndian(std::string_view bytes, std::size_t offset, std::size_t width);

}  // namespace detail

}  // namespace relay::crypto
