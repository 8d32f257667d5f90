#include "crypto/identity.h"

#include <fcntl.h>
#include <sodium.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cassert>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <new>
#include <vector>

namespace relay::crypto {
namespace {

constexpr std::string_view kIdentityPrefix = "relay1:";
constexpr std::string_view kIdentityContext = "relay-identity-v1";
constexpr std::size_t kChecksumSize = 4;
constexpr std::size_t kIdentityBytes = 32 + 32 + kChecksumSize;

constexpr std::string_view kKeyFileLine1 = "# relay site key -- secret, keep mode 0600";
constexpr std::string_view kKeyFilePrefix = "relay-secret-key-v1 ";
constexpr std::size_t kKeyFileSecretBytes = 32 + 32;  // ed25519 seed || x25519 secret key
constexpr off_t kKeyFileMaxSize = 4096;

const unsigned char* Bytes(std::string_view s) {
  return reinterpret_cast<const unsigned char*>(s.data());
}

std::string Base64(const unsigned char* data, std::size_t size) {
  std::string out(sodium_base64_ENCODED_LEN(size, sodium_base64_VARIANT_URLSAFE_NO_PADDING), '\0');
  sodium_bin2base64(out.data(), out.size(), data, size, sodium_base64_VARIANT_URLSAFE_NO_PADDING);
  out.resize(std::strlen(out.c_str()));
  return out;
}

// Decodes strict base64url without padding into *out (resized to the decoded length).
bool DecodeBase64(std::string_view text, std::vector<unsigned char>* out) {
  out->assign(text.size() * 3 / 4 + 3, 0);
  std::size_t len = 0;
  if (sodium_base642bin(out->data(), out->size(), text.data(), text.size(), nullptr, &len, nullptr,
                        sodium_base64_VARIANT_URLSAFE_NO_PADDING) != 0) {
    sodium_memzero(out->data(), out->size());
    return false;
  }
  out->resize(len);
  return true;
}

void IdentityChecksum(const PublicKey& sign_pk, const PublicKey& box_pk,
                      unsigned char out[kChecksumSize]) {
  crypto_generichash_state state;
  unsigned char hash[32];
  crypto_generichash_init(&state, nullptr, 0, sizeof hash);
  crypto_generichash_update(&state, Bytes(kIdentityContext), kIdentityContext.size());
  crypto_generichash_update(&state, sign_pk.data(), sign_pk.size());
  crypto_generichash_update(&state, box_pk.data(), box_pk.size());
  crypto_generichash_final(&state, hash, sizeof hash);
  std::memcpy(out, hash, kChecksumSize);
}

std::string Quote(std::string_view s) {
  constexpr std::size_t kMax = 120;
  if (s.size() > kMax) return "'" + std::string(s.substr(0, kMax)) + "...'";
  return "'" + std::string(s) + "'";
}

std::string Errno() { return std::strerror(errno); }

// The directory holding `path`, for fsync after creating a file in it.
std::string ParentDirectory(const std::string& path) {
  std::size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

Status WriteAll(int fd, std::string_view data) {
  while (!data.empty()) {
    ssize_t n = ::write(fd, data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::Error(Errno());
    }
    data.remove_prefix(static_cast<std::size_t>(n));
  }
  return Status::Ok();
}

// Wipes a string that held secret material before it is freed.
void WipeString(std::string* s) {
  if (!s->empty()) sodium_memzero(s->data(), s->size());
  s->clear();
}

}  // namespace

Status Init() {
  if (sodium_init() < 0) return Status::Error("libsodium initialisation failed (sodium_init)");
  return Status::Ok();
}

// --- PublicIdentity ---------------------------------------------------------------------------

std::string PublicIdentity::ToString() const {
  unsigned char raw[kIdentityBytes];
  std::memcpy(raw, sign_pk.data(), 32);
  std::memcpy(raw + 32, box_pk.data(), 32);
  IdentityChecksum(sign_pk, box_pk, raw + 64);
  return std::string(kIdentityPrefix) + Base64(raw, sizeof raw);
}

Result<PublicIdentity> PublicIdentity::Parse(std::string_view text) {
  if (text.substr(0, kIdentityPrefix.size()) != kIdentityPrefix)
    return Status::Error("public identity " + Quote(text) + " does not start with 'relay1:'");
  std::vector<unsigned char> raw;
  if (!DecodeBase64(text.substr(kIdentityPrefix.size()), &raw))
    return Status::Error("public identity " + Quote(text) +
                         " is not valid base64url after 'relay1:' (allowed: A-Z a-z 0-9 - _, "
                         "no padding)");
  if (raw.size() != kIdentityBytes)
    return Status::Error("public identity " + Quote(text) + " decodes to " +
                         std::to_string(raw.size()) + " bytes, want " +
                         std::to_string(kIdentityBytes) + " (was it cut off or joined?)");
  PublicIdentity id;
  std::memcpy(id.sign_pk.data(), raw.data(), 32);
  std::memcpy(id.box_pk.data(), raw.data() + 32, 32);
  unsigned char checksum[kChecksumSize];
  IdentityChecksum(id.sign_pk, id.box_pk, checksum);
  if (sodium_memcmp(checksum, raw.data() + 64, kChecksumSize) != 0)
    return Status::Error("public identity " + Quote(text) +
                         " fails its checksum: a character was changed or lost");
  // A correct checksum over unusable keys means the string was crafted, not mistyped.
  if (crypto_core_ed25519_is_valid_point(id.sign_pk.data()) != 1)
    return Status::Error("public identity " + Quote(text) +
                         " holds an invalid Ed25519 signing key (small-order or not on the curve)");
  unsigned char probe_scalar[32] = {1};
  unsigned char probe[32];
  if (crypto_scalarmult(probe, probe_scalar, id.box_pk.data()) != 0)
    return Status::Error("public identity " + Quote(text) +
                         " holds an invalid X25519 key (a low-order point)");
  return id;
}

std::string PublicIdentity::Fingerprint() const {
  char hex[8 * 2 + 1];
  sodium_bin2hex(hex, sizeof hex, sign_pk.data(), 8);
  return hex;
}

// --- SiteKey ----------------------------------------------------------------------------------

// Lives in sodium_malloc memory (guard pages, mlock where allowed, wiped by sodium_free).
struct SiteKey::Secrets {
  unsigned char sign_sk[crypto_sign_SECRETKEYBYTES];  // libsodium format: seed || sign_pk
  unsigned char box_sk[crypto_scalarmult_SCALARBYTES];
  PublicIdentity identity;

  ~Secrets() {
    sodium_memzero(sign_sk, sizeof sign_sk);
    sodium_memzero(box_sk, sizeof box_sk);
  }
  static void* operator new(std::size_t size) {
    void* p = sodium_malloc(size);
    if (p == nullptr) throw std::bad_alloc();
    return p;
  }
  static void operator delete(void* p) { sodium_free(p); }
};

SiteKey::SiteKey(std::unique_ptr<Secrets> secrets) : secrets_(std::move(secrets)) {}
SiteKey::~SiteKey() = default;
SiteKey::SiteKey(SiteKey&&) noexcept = default;
SiteKey& SiteKey::operator=(SiteKey&&) noexcept = default;

SiteKey SiteKey::Generate() {
  auto s = std::make_unique<Secrets>();
  crypto_sign_keypair(s->identity.sign_pk.data(), s->sign_sk);
  crypto_box_keypair(s->identity.box_pk.data(), s->box_sk);
  return SiteKey(std::move(s));
}

Status SiteKey::CreateFile(const std::string& path) {
  SiteKey key = Generate();
  unsigned char secret[kKeyFileSecretBytes];
  crypto_sign_ed25519_sk_to_seed(secret, key.secrets_->sign_sk);
  std::memcpy(secret + 32, key.secrets_->box_sk, 32);
  std::string content;
  content.reserve(kKeyFileLine1.size() + kKeyFilePrefix.size() + 100);
  content.append(kKeyFileLine1).append("\n").append(kKeyFilePrefix);
  std::string encoded = Base64(secret, sizeof secret);
  content.append(encoded).append("\n");
  sodium_memzero(secret, sizeof secret);
  WipeString(&encoded);

  const std::string quoted = "'" + path + "'";
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) {
    Status error =
        errno == EEXIST
            ? Status::Error("key file " + quoted + " already exists; refusing to overwrite")
            : Status::Error("cannot create key file " + quoted + ": " + Errno());
    WipeString(&content);
    return error;
  }
  // The umask may have narrowed the mode; make it exactly 0600.
  Status status;
  if (::fchmod(fd, 0600) != 0) {
    status = Status::Error("cannot chmod key file " + quoted + " to 0600: " + Errno());
  } else if (Status w = WriteAll(fd, content); !w) {
    status = w.Wrap("cannot write key file " + quoted);
  } else if (::fsync(fd) != 0) {
    status = Status::Error("cannot fsync key file " + quoted + ": " + Errno());
  }
  WipeString(&content);
  if (::close(fd) != 0 && status.ok())
    status = Status::Error("cannot close key file " + quoted + ": " + Errno());
  if (!status.ok()) {
    ::unlink(path.c_str());  // leave no half-written key behind; a retry can start afresh
    return status;
  }
  const std::string dir = ParentDirectory(path);
  int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd < 0)
    return Status::Error("key file " + quoted + " written but cannot open its directory '" + dir +
                         "' to fsync it: " + Errno());
  int rc = ::fsync(dir_fd);
  int fsync_errno = errno;
  ::close(dir_fd);
  if (rc != 0)
    return Status::Error("key file " + quoted + " written but cannot fsync its directory '" + dir +
                         "': " + std::strerror(fsync_errno));
  return Status::Ok();
}

Result<SiteKey> SiteKey::LoadFile(const std::string& path) {
  const std::string quoted = "'" + path + "'";
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::Error("cannot open key file " + quoted + ": " + Errno());
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    Status error = Status::Error("cannot stat key file " + quoted + ": " + Errno());
    ::close(fd);
    return error;
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return Status::Error("key file " + quoted + " is not a regular file");
  }
  if ((st.st_mode & 077) != 0) {
    ::close(fd);
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    return Status::Error("key file " + quoted + " has mode " + mode +
                         ": it must not be readable or writable by group or others (chmod 600 " +
                         quoted + ")");
  }
  if (st.st_size > kKeyFileMaxSize) {
    ::close(fd);
    return Status::Error("key file " + quoted + " is " + std::to_string(st.st_size) +
                         " bytes; a relay key file is two short lines");
  }
  std::string content(static_cast<std::size_t>(kKeyFileMaxSize) + 1, '\0');
  std::size_t size = 0;
  while (size < content.size()) {
    ssize_t n = ::read(fd, content.data() + size, content.size() - size);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      Status error = Status::Error("cannot read key file " + quoted + ": " + Errno());
      ::close(fd);
      WipeString(&content);
      return error;
    }
    if (n == 0) break;
    size += static_cast<std::size_t>(n);
  }
  ::close(fd);

  // Parse; errors name the file and the line but never quote secret material.
  std::string_view text(content.data(), size);
  auto fail = [&](const std::string& what) -> Result<SiteKey> {
    WipeString(&content);
    return Status::Error("key file " + quoted + " " + what);
  };
  if (size > static_cast<std::size_t>(kKeyFileMaxSize)) return fail("is too large");
  std::size_t eol = text.find('\n');
  if (eol == std::string_view::npos || text.substr(0, eol) != kKeyFileLine1)
    return fail("line 1: expected '" + std::string(kKeyFileLine1) + "'");
  text.remove_prefix(eol + 1);
  if (text.substr(0, kKeyFilePrefix.size()) != kKeyFilePrefix)
    return fail("line 2: expected 'relay-secret-key-v1 ' followed by the key");
  text.remove_prefix(kKeyFilePrefix.size());
  eol = text.find('\n');
  std::string_view encoded = text.substr(0, eol);
  if (eol != std::string_view::npos && eol + 1 != text.size())
    return fail("has unexpected content after line 2");
  std::vector<unsigned char> secret;
  if (!DecodeBase64(encoded, &secret))
    return fail("line 2: the key is not valid base64url (A-Z a-z 0-9 - _, no padding)");
  if (secret.size() != kKeyFileSecretBytes) {
    std::size_t got = secret.size();
    sodium_memzero(secret.data(), secret.size());
    return fail("line 2: the key decodes to " + std::to_string(got) + " bytes, want " +
                std::to_string(kKeyFileSecretBytes));
  }
  auto s = std::make_unique<Secrets>();
  crypto_sign_seed_keypair(s->identity.sign_pk.data(), s->sign_sk, secret.data());
  std::memcpy(s->box_sk, secret.data() + 32, 32);
  sodium_memzero(secret.data(), secret.size());
  WipeString(&content);
  if (crypto_scalarmult_base(s->identity.box_pk.data(), s->box_sk) != 0)
    return Status::Error("key file " + quoted + " line 2: the X25519 secret key is unusable");
  return SiteKey(std::move(s));
}

const PublicIdentity& SiteKey::identity() const {
  assert(secrets_ && "use of a moved-from SiteKey");
  return secrets_->identity;
}

Signature SiteKey::Sign(std::string_view message) const {
  assert(secrets_ && "use of a moved-from SiteKey");
  Signature sig{};
  crypto_sign_detached(sig.data(), nullptr, Bytes(message), message.size(), secrets_->sign_sk);
  return sig;
}

bool SiteKey::SharedSecret(const PublicKey& their_box_pk, std::array<std::uint8_t, 32>* out) const {
  assert(secrets_ && "use of a moved-from SiteKey");
  // crypto_scalarmult fails (returns -1) exactly when the result is all zero.
  return crypto_scalarmult(out->data(), secrets_->box_sk, their_box_pk.data()) == 0;
}

void SiteKey::LendBoxSecret(const std::function<void(const std::uint8_t* secret)>& use) const {
  assert(secrets_ && "use of a moved-from SiteKey");
  use(secrets_->box_sk);
}

bool VerifySignature(const PublicKey& sign_pk, std::string_view message, const Signature& sig) {
  return crypto_sign_verify_detached(sig.data(), Bytes(message), message.size(), sign_pk.data()) ==
         0;
}

bool PreviousKeyAccepted(std::chrono::system_clock::time_point until,
                         std::chrono::system_clock::time_point now) {
  return now < until;
}

}  // namespace relay::crypto
