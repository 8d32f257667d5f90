// Fuzzes OpenFrame and OpenControl for a fixed site key with one known peer (fuzz_keys.h).
// The seeds are frames and control messages that peer sealed for this site.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "crypto/frame.h"
#include "crypto/origin.h"
#include "event/event.h"
#include "fuzz_keys.h"

namespace {
relay::crypto::SiteKey* g_self = nullptr;
relay::crypto::PeerLookup* g_peers = nullptr;
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  g_self = new relay::crypto::SiteKey(relay::fuzz::LoadFixedKey(relay::fuzz::kSiteSecret));
  const auto peer = relay::fuzz::LoadFixedKey(relay::fuzz::kPeerSecret);
  g_peers = new relay::crypto::PeerLookup(relay::fuzz::OnePeer(peer.identity()));
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  (void)relay::crypto::LooksLikeFrame(bytes);
  auto frame = relay::crypto::OpenFrame(*g_self, *g_peers, bytes);
  if (frame.ok()) {
    // What the daemon does next with an opened frame.
    auto payload = relay::DecodeFramePayload(frame.frame->plaintext);
    if (payload.ok()) {
      for (const auto& item : payload->events) {
        std::string_view core;
        if (relay::DecodeEvent(item.encoded, &core).ok()) (void)relay::crypto::EventDigest(core);
      }
      for (std::string_view a : payload->attestations) {
        auto att = relay::crypto::ParseAttestation(a);
        if (att.ok()) (void)relay::crypto::VerifyAttestation(*att, g_self->identity().sign_pk);
      }
    }
  } else {
    (void)relay::crypto::RejectReasonName(frame.rejection.reason);
  }
  (void)relay::crypto::OpenControl(*g_self, *g_peers, bytes);
  // Origin attestations are parsed before their signature is checked (crypto/origin.h).
  if (auto att = relay::crypto::ParseAttestation(bytes); att.ok()) {
    if (att->count() * 32 != att->digests.size()) std::abort();
    (void)relay::crypto::VerifyAttestation(*att, g_self->identity().sign_pk);
  }
  return 0;
}
