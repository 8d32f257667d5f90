#include "crypto/origin.h"

#include <sodium.h>

#include <cstdio>
#include <cstdlib>

#include "crypto/bundle.h"  // detail::PutBigEndian / GetBigEndian

namespace relay::crypto {
namespace {

// Layout (docs/wire-format.md, "Attestation"); integers big-endian.
constexpr std::string_view kMagic = "RLYA";
constexpr std::size_t kVersionOffset = 4;
constexpr std::size_t kNameLenOffset = 5;
constexpr std::size_t kReservedOffset = 6;
constexpr std::size_t kNameOffset = 8;
constexpr std::size_t kMaxName = 32;  // site names are [a-z0-9-]{1,32}
constexpr std::size_t kSignatureSize = crypto_sign_BYTES;
constexpr std::string_view kEventContext = "relay-event-v2";

const unsigned char* Bytes(std::string_view s) {
  return reinterpret_cast<const unsigned char*>(s.data());
}

// What the signature covers: BLAKE2b-256 of the attestation up to the signature.
std::array<unsigned char, 32> SigningDigest(std::string_view signed_part) {
  std::array<unsigned char, 32> d{};
  crypto_generichash(d.data(), d.size(), Bytes(signed_part), signed_part.size(), nullptr, 0);
  return d;
}

}  // namespace

Digest EventDigest(std::string_view event_core) {
  crypto_generichash_state state;
  crypto_generichash_init(&state, nullptr, 0, 32);
  crypto_generichash_update(&state, Bytes(kEventContext), kEventContext.size());
  crypto_generichash_update(&state, Bytes(event_core), event_core.size());
  Digest d;
  crypto_generichash_final(&state, d.data(), d.size());
  return d;
}

std::string SealAttestation(const SiteKey& origin, std::string_view origin_site,
                            const Digest* digests, std::size_t count) {
  if (origin_site.empty() || origin_site.size() > kMaxName || count == 0 ||
      count > kMaxAttestedEvents) {
    std::fprintf(stderr, "relay: SealAttestation called with a bad name or count\n");
    std::abort();
  }
  std::string out;
  out.reserve(kNameOffset + origin_site.size() + 4 + 32 * count + kSignatureSize);
  out.append(kMagic);
  out.push_back(static_cast<char>(kAttestationVersion));
  out.push_back(static_cast<char>(origin_site.size()));
  out.append(2, '\0');
  out.append(origin_site);
  unsigned char n[4];
  detail::PutBigEndian(count, 4, n);
  out.append(reinterpret_cast<const char*>(n), 4);
  out.append(reinterpret_cast<const char*>(digests->data()), 32 * count);
  const auto d = SigningDigest(out);
  const Signature sig =
      origin.Sign(std::string_view(reinterpret_cast<const char*>(d.data()), d.size()));
  out.append(reinterpret_cast<const char*>(sig.data()), sig.size());
  return out;
}

Result<Attestation> ParseAttestation(std::string_view bytes) {
  auto fail = [](const std::string& what) {
    return Status::Error("origin attestation rejected: " + what);
  };
  if (bytes.size() < kMagic.size() || bytes.substr(0, kMagic.size()) != kMagic)
    return fail("does not start with 'RLYA'");
  if (bytes.size() <= kVersionOffset) return fail("truncated");
  const unsigned version = static_cast<unsigned char>(bytes[kVersionOffset]);
  if (version != kAttestationVersion)
    return fail("format version " + std::to_string(version) +
                " is not supported (this relay supports version " +
                std::to_string(kAttestationVersion) + ")");
  if (bytes.size() < kNameOffset)
    return fail("truncated: " + std::to_string(bytes.size()) + " bytes");
  const std::size_t name_len = static_cast<unsigned char>(bytes[kNameLenOffset]);
  if (name_len == 0 || name_len > kMaxName)
    return fail("origin name length " + std::to_string(name_len) + " (want 1 to 32)");
  if (detail::GetBigEndian(bytes, kReservedOffset, 2) != 0) return fail("reserved field is not 0");
  const std::size_t count_offset = kNameOffset + name_len;
  if (bytes.size() < count_offset + 4)
    return fail("truncated: " + std::to_string(bytes.size()) + " bytes");
  const std::uint64_t count = detail::GetBigEndian(bytes, count_offset, 4);
  if (count == 0 || count > kMaxAttestedEvents)
    return fail("covers " + std::to_string(count) + " events (want 1 to " +
                std::to_string(kMaxAttestedEvents) + ")");
  const std::size_t want = count_offset + 4 + 32 * count + kSignatureSize;
  if (bytes.size() != want)
    return fail(std::to_string(bytes.size()) + " bytes, its count of " + std::to_string(count) +
                " events needs " + std::to_string(want));
  Attestation a;
  a.origin_site = bytes.substr(kNameOffset, name_len);
  a.digests = bytes.substr(count_offset + 4, 32 * count);
  a.signed_part = bytes.substr(0, want - kSignatureSize);
  std::memcpy(a.signature.data(), bytes.data() + want - kSignatureSize, kSignatureSize);
  return a;
}

bool VerifyAttestation(const Attestation& attestation, const PublicKey& sign_pk) {
  const auto d = SigningDigest(attestation.signed_part);
  return VerifySignature(sign_pk,
                         std::string_view(reinterpret_cast<const char*>(d.data()), d.size()),
                         attestation.signature);
}

void AttestationIndex::Clear() {
  entries_.clear();
  index_.clear();
  indexed_ = false;
}

void AttestationIndex::Add(const Attestation& attestation, std::size_t slot) {
  entries_.push_back({attestation, slot, 0});
  indexed_ = false;
}

std::optional<std::size_t> AttestationIndex::Find(const Digest& digest,
                                                  std::string_view origin_site) {
  constexpr std::size_t kGuesses = 8;  // beyond that many attestations, only the index
  if (entries_.size() <= kGuesses) {
    for (Entry& e : entries_) {
      if (e.next < e.attestation.count() && e.attestation.origin_site == origin_site &&
          std::memcmp(e.attestation.digests.data() + 32 * e.next, digest.data(), 32) == 0) {
        ++e.next;
        return e.slot;
      }
    }
  }
  if (!indexed_) {
    index_.clear();
    for (std::size_t i = 0; i < entries_.size(); ++i)
      for (std::size_t k = 0; k < entries_[i].attestation.count(); ++k)
        index_.emplace(entries_[i].attestation.digest(k), std::make_pair(i, k));
    indexed_ = true;
  }
  auto it = index_.find(digest);
  if (it == index_.end()) return std::nullopt;
  Entry& e = entries_[it->second.first];
  if (e.attestation.origin_site != origin_site) return std::nullopt;
  e.next = it->second.second + 1;
  return e.slot;
}

}  // namespace relay::crypto
