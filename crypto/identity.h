#pragma once
// Site identities and key files.
//
// A site has an Ed25519 signing key pair and an X25519 key pair, kept together in one key file
// (mode 0600). Its public identity -- both public keys -- is one printable line, shown by
// `relay pubkey` and pasted into peers' configs. SiteKey wipes its secrets on destruction and is
// move-only. All functions are thread-safe; a SiteKey may be shared read-only between threads.

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "base/status.h"

namespace relay::crypto {

// Must be called once before any other function here (calls sodium_init); idempotent.
Status Init();

using PublicKey = std::array<std::uint8_t, 32>;
using Signature = std::array<std::uint8_t, 64>;

struct PublicIdentity {
  PublicKey sign_pk{};  // Ed25519: identifies the site in frame headers
  PublicKey box_pk{};   // X25519: frames are encrypted to it

  // "relay1:" followed by base64url of sign_pk || box_pk || 4-byte checksum.
  std::string ToString() const;
  // Parses ToString() output; errors name what is wrong (prefix, length, checksum).
  static Result<PublicIdentity> Parse(std::string_view text);
  // Short printable fingerprint of sign_pk (16 hex chars) for logs and status.
  std::string Fingerprint() const;

  bool operator==(const PublicIdentity&) const = default;
};

class SiteKey {
 public:
  ~SiteKey();
  SiteKey(SiteKey&&) noexcept;
  SiteKey& operator=(SiteKey&&) noexcept;
  SiteKey(const SiteKey&) = delete;
  SiteKey& operator=(const SiteKey&) = delete;

  static SiteKey Generate();
  // Writes a new key file with mode 0600; refuses if `path` exists.
  static Status CreateFile(const std::string& path);
  // Reads a key file; refuses one readable or writable by group or others, naming the mode.
  static Result<SiteKey> LoadFile(const std::string& path);

  const PublicIdentity& identity() const;
  Signature Sign(std::string_view message) const;
  // X25519 scalar multiplication with the site's box secret key (for frame decryption).
  // False if the result is all zero (a low-order point).
  bool SharedSecret(const PublicKey& their_box_pk, std::array<std::uint8_t, 32>* out) const;
  // Lends the 32-byte X25519 secret key to `use` for the duration of the call, for a library
  // that must be handed it as bytes (ZeroMQ's CURVE, transports/zmq_link.cc). The pointer is
  // into the key's own protected memory: no copy is made here; `use` must not keep it, and a
  // copy it makes is its own to wipe.
  void LendBoxSecret(const std::function<void(const std::uint8_t* secret)>& use) const;

 private:
  struct Secrets;
  explicit SiteKey(std::unique_ptr<Secrets> secrets);
  std::unique_ptr<Secrets> secrets_;
};

bool VerifySignature(const PublicKey& sign_pk, std::string_view message, const Signature& sig);

// Key rotation: a peer's previous identity ([peer.NAME] previous_public_key) is accepted before
// `until` ([peer.NAME] previous_public_key_until) and refused from that moment on. This is the
// one rule for every place that accepts a previous key -- frames, control messages, bundles and
// ack files, origin signatures -- so that they all stop at the same moment; callers pass the
// wall-clock time at which they verify.
bool PreviousKeyAccepted(std::chrono::system_clock::time_point until,
                         std::chrono::system_clock::time_point now);

}  // namespace relay::crypto
