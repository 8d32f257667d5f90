// Fuzzes OpenBundle for a fixed site key with one known peer (fuzz_keys.h), at a fixed "now".
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "crypto/bundle.h"
#include "fuzz_keys.h"

namespace {
relay::crypto::SiteKey* g_self = nullptr;
relay::crypto::PeerLookup* g_peers = nullptr;
constexpr std::int64_t kNowMs = 1764129324123;  // seeds are created at 1764000000000
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  g_self = new relay::crypto::SiteKey(relay::fuzz::LoadFixedKey(relay::fuzz::kSiteSecret));
  const auto peer = relay::fuzz::LoadFixedKey(relay::fuzz::kPeerSecret);
  g_peers = new relay::crypto::PeerLookup(relay::fuzz::OnePeer(peer.identity()));
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  auto bundle = relay::crypto::OpenBundle(*g_self, *g_peers, bytes, kNowMs);
  if (bundle.ok()) {
    (void)relay::crypto::BundleIdHex(bundle.bundle->header.id);
    for (const auto& frame : bundle.bundle->frames)
      (void)relay::crypto::OpenFrame(*g_self, *g_peers, frame);
  }
  return 0;
}
