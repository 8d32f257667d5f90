#pragma once
// Keys of the diode's datagram tags (docs/wire-format.md, "Diode datagrams"). Each direction
// between two sites has its own 32-byte key, derived once from the two sites' key pairs: the
// sender tags every datagram with it, the receiver checks the tag before it believes anything
// else in the datagram. DiodeKey and DiodeKeyring are read-only once built, so they may be used
// from several threads.

#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "base/status.h"
#include "crypto/identity.h"
#include "transports/diode.h"

namespace relay::transports {

// How a datagram names a site: the first 8 bytes of its Ed25519 public key, big-endian.
std::uint64_t DiodeSiteId(const crypto::PublicKey& sign_pk);

class DiodeKey {
 public:
  // The key of datagrams from this site to `recipient`, and of datagrams from `sender` to this
  // site. Both ends compute the same key:
  //   BLAKE2b-256("relay-diode-v2" || X25519(own box sk, other's box pk)
  //               || sender sign_pk || recipient sign_pk),
  // so the two directions between two sites have different keys. Fails (naming the peer's
  // fingerprint) when the peer's box key is a low-order point.
  static Result<DiodeKey> ForSending(const crypto::SiteKey& self,
                                     const crypto::PublicIdentity& recipient);
  static Result<DiodeKey> ForReceiving(const crypto::SiteKey& self,
                                       const crypto::PublicIdentity& sender);
  ~DiodeKey();
  DiodeKey(DiodeKey&&) noexcept;
  DiodeKey& operator=(DiodeKey&&) noexcept;
  DiodeKey(const DiodeKey&) = delete;
  DiodeKey& operator=(const DiodeKey&) = delete;

  std::uint64_t sender_id() const { return sender_id_; }
  std::uint64_t recipient_id() const { return recipient_id_; }

  // Writes the kDiodeTagBytes-byte tag of a datagram: the Poly1305 tag of XChaCha20-Poly1305
  // (IETF) sealing nothing, with `input.signed_part` as associated data and the nonce
  // stream_id (8 bytes, big-endian) || 8 zero bytes || seq (8 bytes, big-endian).
  void Tag(const DiodeTagInput& input, std::uint8_t* tag) const;
  // Whether `tag` is the tag of the datagram (compared in constant time).
  bool Verify(const DiodeTagInput& input, std::string_view tag) const;

  // A sealer for DiodeEncoder that tags with `key` (kept alive by the sealer).
  static DiodeSealer Sealer(std::shared_ptr<const DiodeKey> key);

 private:
  struct Secret;
  static Result<DiodeKey> Derive(const crypto::SiteKey& self, const crypto::PublicIdentity& other,
                                 bool sending);
  DiodeKey(std::unique_ptr<Secret> secret, std::uint64_t sender_id, std::uint64_t recipient_id);
  std::unique_ptr<Secret> secret_;
  std::uint64_t sender_id_ = 0;
  std::uint64_t recipient_id_ = 0;
};

// Receiver side: the keys of every datagram this site accepts, found by the sender and
// recipient ids a datagram names (normally exactly one key fits; none is tried twice).
class DiodeKeyring {
 public:
  // Accepts datagrams from `peer` (one of its identities: during a rotation, its current and
  // previous one are both added) to `self` (this site's current key, or its previous one while
  // peers still seal for it), reported as sender index `sender`.
  Status Add(std::uint32_t sender, const crypto::SiteKey& self, const crypto::PublicIdentity& peer);
  // kWrongRecipient when the recipient id is none of the added `self` keys, kUnknownSender when
  // no added peer has the sender id, kBadTag when no fitting key verifies the tag.
  DiodeAuthResult Authenticate(const DiodeTagInput& input, std::string_view tag) const;
  // For DiodeDecoder; refers to *this, which must outlive it.
  DiodeAuthenticator Authenticator() const;

 private:
  struct Entry {
    std::uint32_t sender;
    DiodeKey key;
  };
  std::vector<std::uint64_t> recipients_;
  std::vector<Entry> entries_;
};

}  // namespace relay::transports
