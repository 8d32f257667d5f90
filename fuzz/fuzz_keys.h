#pragma once
// Fixed, deterministic site keys for the fuzz targets and the seed generator. They are public
// test values (bytes 0x11.. and 0x71..), never used outside fuzz/: deterministic keys let the
// checked-in seed frames and bundles stay valid (sealed for "site", signed by "peer") across
// runs, so mutations get past the signature check and reach the deeper parsing.

#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <utility>

#include "crypto/frame.h"
#include "crypto/identity.h"

namespace relay::fuzz {

// Key-file secrets: base64url(ed25519 seed || x25519 secret key), as SiteKey::CreateFile writes.
inline constexpr const char* kSiteSecret =
    "ERITFBUWFxgZGhscHR4fICEiIyQlJicoKSorLC0uLzBAQ0ZJTE9SVVhbXmFkZ2ptcHN2eXx_goWIi46RlJeanQ";
inline constexpr const char* kPeerSecret =
    "cXJzdHV2d3h5ent8fX5_gIGCg4SFhoeIiYqLjI2Oj5CQk5aZnJ-ipairrrG0t7q9wMPGyczP0tXY297h5Ofq7Q";

// Loads a fixed key through the ordinary key-file path (a 0600 temp file, removed again).
inline crypto::SiteKey LoadFixedKey(const char* secret) {
  if (!crypto::Init().ok()) std::abort();
  char path[] = "/tmp/relay-fuzz-key-XXXXXX";
  const int fd = ::mkstemp(path);  // mode 0600
  if (fd < 0) std::abort();
  const std::string content = std::string("# relay site key -- secret, keep mode 0600\n") +
                              "relay-secret-key-v1 " + secret + "\n";
  if (::write(fd, content.data(), content.size()) != static_cast<ssize_t>(content.size()))
    std::abort();
  ::close(fd);
  auto key = crypto::SiteKey::LoadFile(path);
  ::unlink(path);
  if (!key.ok()) {
    std::fprintf(stderr, "fuzz: cannot load fixed key: %s\n", key.message().c_str());
    std::abort();
  }
  return std::move(key).value();
}

// A PeerLookup that knows exactly one peer.
inline crypto::PeerLookup OnePeer(const crypto::PublicIdentity& peer) {
  return [peer](const crypto::PublicKey& sign_pk) -> std::optional<crypto::PublicIdentity> {
    if (sign_pk == peer.sign_pk) return peer;
    return std::nullopt;
  };
}

}  // namespace relay::fuzz
