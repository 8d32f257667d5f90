#pragma once
// Origin signatures: how a site signs the events it originates, so that every site they reach
// -- directly or through transit sites -- can tell which site really made them.
//
// The origin hashes each event's core (every field but the hop list, event/event.h) and signs
// the digests of a batch of its events (the events of one channel in one group commit) in one
// attestation:
//
//   "RLYA" | version | origin name | digests | Ed25519 signature by the origin's key
//
// The attestation travels next to the events in every frame that carries one of them (a frame
// payload's `attestations`), unchanged across transit sites; a receiver verifies it with the
// origin's configured key and accepts an event only if the digest of its core is in an
// attestation of its origin. One signature covers many events, so the cost per event is one
// BLAKE2b hash of its core and 32 bytes. See docs/wire-format.md, "Attestation".
//
// Thread-safety: pure functions.

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "base/status.h"
#include "crypto/identity.h"

namespace relay::crypto {

inline constexpr std::uint8_t kAttestationVersion = 2;
// An attestation covers at most this many events (the origin splits larger groups).
inline constexpr std::size_t kMaxAttestedEvents = 4096;

using Digest = std::array<std::uint8_t, 32>;
struct DigestHash {
  std::size_t operator()(const Digest& d) const {
    std::size_t h;
    std::memcpy(&h, d.data(), sizeof h);  // the digest is uniformly random already
    return h;
  }
};

// BLAKE2b-256("relay-event-v2" || core): what an attestation lists for one event.
Digest EventDigest(std::string_view event_core);

// Signs the digests of `count` events of `origin_site` with the origin's key.
std::string SealAttestation(const SiteKey& origin, std::string_view origin_site,
                            const Digest* digests, std::size_t count);

// A parsed attestation; the views point into the bytes it was parsed from.
struct Attestation {
  std::string_view origin_site;
  std::string_view digests;  // count() x 32 bytes
  std::string_view signed_part;
  Signature signature{};

  std::size_t count() const { return digests.size() / 32; }
  Digest digest(std::size_t i) const {
    Digest d;
    std::memcpy(d.data(), digests.data() + 32 * i, 32);
    return d;
  }
};

// Checks the layout (magic, version, lengths, count); errors name what is wrong. Does not
// check the signature: the caller looks up the origin's key by name, then calls Verify.
Result<Attestation> ParseAttestation(std::string_view bytes);

// Whether the attestation's signature verifies with `sign_pk`.
bool VerifyAttestation(const Attestation& attestation, const PublicKey& sign_pk);

// Which of a frame's verified attestations lists an event's digest, for the event's origin.
// Events come in the order their origin listed them, so the digest after each attestation's
// last match is tried first; a hash index over every listed digest is built only when those
// guesses miss. Holds views into the attestations' bytes. Not thread-safe.
class AttestationIndex {
 public:
  // Forgets every attestation (keeps the memory for the next frame).
  void Clear();
  // Adds an attestation whose signature verified, under the caller's `slot`.
  void Add(const Attestation& attestation, std::size_t slot);
  // The slot of an added attestation of `origin_site` that lists `digest`, if any.
  std::optional<std::size_t> Find(const Digest& digest, std::string_view origin_site);

 private:
  struct Entry {
    Attestation attestation;
    std::size_t slot = 0;
    std::size_t next = 0;  // the position tried first
  };
  std::vector<Entry> entries_;
  // digest -> (entry, position), the first listing of each digest; built on the first miss.
  std::unordered_map<Digest, std::pair<std::size_t, std::size_t>, DigestHash> index_;
  bool indexed_ = false;
};

}  // namespace relay::crypto
