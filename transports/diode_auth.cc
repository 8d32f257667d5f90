#include "transports/diode_auth.h"

#include <sodium.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <new>
#include <string>
#include <utility>

namespace relay::transports {
namespace {

constexpr char kKeyLabel[] = "relay-diode-v2";  // without its NUL

static_assert(kDiodeTagBytes == crypto_aead_xchacha20poly1305_ietf_ABYTES);

// The tag's nonce: stream_id || 8 zero bytes || seq, each big-endian.
std::array<unsigned char, crypto_aead_xchacha20poly1305_ietf_NPUBBYTES> Nonce(
    const DiodeTagInput& in) {
  std::array<unsigned char, crypto_aead_xchacha20poly1305_ietf_NPUBBYTES> nonce{};
  static_assert(sizeof nonce == 24);
  for (int i = 0; i < 8; ++i) {
    nonce[static_cast<std::size_t>(i)] = static_cast<unsigned char>(in.stream_id >> (56 - 8 * i));
    nonce[static_cast<std::size_t>(16 + i)] = static_cast<unsigned char>(in.seq >> (56 - 8 * i));
  }
  return nonce;
}

const unsigned char* Bytes(std::string_view s) {
  return reinterpret_cast<const unsigned char*>(s.data());
}

}  // namespace

std::uint64_t DiodeSiteId(const crypto::PublicKey& sign_pk) {
  std::uint64_t id = 0;
  for (std::size_t i = 0; i < 8; ++i) id = (id << 8) | sign_pk[i];
  return id;
}

// Lives in sodium_malloc memory (guard pages, mlock where allowed, wiped by sodium_free).
struct DiodeKey::Secret {
  unsigned char key[crypto_aead_xchacha20poly1305_ietf_KEYBYTES];

  ~Secret() { sodium_memzero(key, sizeof key); }
  static void* operator new(std::size_t size) {
    void* p = sodium_malloc(size);
    if (p == nullptr) throw std::bad_alloc();
    return p;
  }
  static void operator delete(void* p) { sodium_free(p); }
};

DiodeKey::DiodeKey(std::unique_ptr<Secret> secret, std::uint64_t sender_id,
                   std::uint64_t recipient_id)
    : secret_(std::move(secret)), sender_id_(sender_id), recipient_id_(recipient_id) {}
DiodeKey::~DiodeKey() = default;
DiodeKey::DiodeKey(DiodeKey&&) noexcept = default;
DiodeKey& DiodeKey::operator=(DiodeKey&&) noexcept = default;

Result<DiodeKey> DiodeKey::Derive(const crypto::SiteKey& self, const crypto::PublicIdentity& other,
                                  bool sending) {
  const crypto::PublicKey& me = self.identity().sign_pk;
  const crypto::PublicKey& sender = sending ? me : other.sign_pk;
  const crypto::PublicKey& recipient = sending ? other.sign_pk : me;
  std::array<std::uint8_t, 32> shared{};
  if (!self.SharedSecret(other.box_pk, &shared)) {
    return Status::Error("the box key of peer " + other.Fingerprint() +
                         " is a low-order point: no diode key can be derived from it");
  }
  auto secret = std::make_unique<Secret>();
  crypto_generichash_state state;
  crypto_generichash_init(&state, nullptr, 0, sizeof secret->key);
  crypto_generichash_update(&state, reinterpret_cast<const unsigned char*>(kKeyLabel),
                            sizeof kKeyLabel - 1);
  crypto_generichash_update(&state, shared.data(), shared.size());
  crypto_generichash_update(&state, sender.data(), sender.size());
  crypto_generichash_update(&state, recipient.data(), recipient.size());
  crypto_generichash_final(&state, secret->key, sizeof secret->key);
  sodium_memzero(shared.data(), shared.size());
  sodium_memzero(&state, sizeof state);
  return DiodeKey(std::move(secret), DiodeSiteId(sender), DiodeSiteId(recipient));
}

Result<DiodeKey> DiodeKey::ForSending(const crypto::SiteKey& self,
                                      const crypto::PublicIdentity& recipient) {
  return Derive(self, recipient, true);
}

Result<DiodeKey> DiodeKey::ForReceiving(const crypto::SiteKey& self,
                                        const crypto::PublicIdentity& sender) {
  return Derive(self, sender, false);
}

void DiodeKey::Tag(const DiodeTagInput& input, std::uint8_t* tag) const {
  assert(secret_ && "use of a moved-from DiodeKey");
  const auto nonce = Nonce(input);
  unsigned char nothing[1] = {0};
  crypto_aead_xchacha20poly1305_ietf_encrypt_detached(
      nothing, tag, nullptr, nothing, 0, Bytes(input.signed_part), input.signed_part.size(),
      nullptr, nonce.data(), secret_->key);
}

bool DiodeKey::Verify(const DiodeTagInput& input, std::string_view tag) const {
  assert(secret_ && "use of a moved-from DiodeKey");
  if (tag.size() != kDiodeTagBytes) return false;
  const auto nonce = Nonce(input);
  unsigned char nothing[1] = {0};
  // Compares the computed tag with crypto_verify_16 (constant time).
  return crypto_aead_xchacha20poly1305_ietf_decrypt_detached(
             nothing, nullptr, nothing, 0, Bytes(tag), Bytes(input.signed_part),
             input.signed_part.size(), nonce.data(), secret_->key) == 0;
}

DiodeSealer DiodeKey::Sealer(std::shared_ptr<const DiodeKey> key) {
  DiodeSealer sealer;
  sealer.sender_id = key->sender_id();
  sealer.recipient_id = key->recipient_id();
  sealer.tag = [key = std::move(key)](const DiodeTagInput& input, std::uint8_t* tag) {
    key->Tag(input, tag);
  };
  return sealer;
}

Status DiodeKeyring::Add(std::uint32_t sender, const crypto::SiteKey& self,
                         const crypto::PublicIdentity& peer) {
  auto key = DiodeKey::ForReceiving(self, peer);
  if (!key) return key.status();
  const std::uint64_t me = key->recipient_id();
  if (std::find(recipients_.begin(), recipients_.end(), me) == recipients_.end()) {
    recipients_.push_back(me);
  }
  entries_.push_back({sender, std::move(key).value()});
  return Status::Ok();
}

DiodeAuthResult DiodeKeyring::Authenticate(const DiodeTagInput& input, std::string_view tag) const {
  if (std::find(recipients_.begin(), recipients_.end(), input.recipient_id) == recipients_.end()) {
    return {DiodeAuthVerdict::kWrongRecipient, 0};
  }
  bool known = false;
  for (const Entry& e : entries_) {
    if (e.key.sender_id() != input.sender_id) continue;
    known = true;
    if (e.key.recipient_id() == input.recipient_id && e.key.Verify(input, tag)) {
      return {DiodeAuthVerdict::kOk, e.sender};
    }
  }
  return {known ? DiodeAuthVerdict::kBadTag : DiodeAuthVerdict::kUnknownSender, 0};
}

DiodeAuthenticator DiodeKeyring::Authenticator() const {
  return
      [this](const DiodeTagInput& input, std::string_view tag) { return Authenticate(input, tag); };
}

}  // namespace relay::transports
