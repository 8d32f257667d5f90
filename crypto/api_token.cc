#include "crypto/api_token.h"

#include <fcntl.h>
#include <sodium.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <utility>

namespace relay::crypto {
namespace {

constexpr std::size_t kRandomBytes = 32;  // 256 bits, written as 64 hex characters

std::string Errno() { return std::strerror(errno); }

bool IsTokenChar(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' ||
         c == '.' || c == '_' || c == '~' || c == '+' || c == '/';
}

std::string ParentDirectory(const std::string& path) {
  const auto slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// Checks the token's text (the file without its final newline). The message never quotes it.
Status CheckFormat(std::string_view token) {
  if (token.find('\n') != std::string_view::npos)
    return Status::Error("has more than one line; it must hold the token only");
  if (token.size() < ApiToken::kMinLength || token.size() > ApiToken::kMaxLength)
    return Status::Error("holds a token of " + std::to_string(token.size()) +
                         " characters; a token has " + std::to_string(ApiToken::kMinLength) +
                         " to " + std::to_string(ApiToken::kMaxLength) +
                         " (write a fresh one with `relay token FILE`)");
  std::size_t end = token.size();
  while (end > 0 && token[end - 1] == '=') --end;  // base64 padding
  for (std::size_t i = 0; i < end; ++i) {
    if (!IsTokenChar(token[i]))
      return Status::Error("has a character not allowed in a token at position " +
                           std::to_string(i + 1) +
                           " (allowed: A-Z a-z 0-9 - . _ ~ + /, and '=' at the end)");
  }
  if (end == 0) return Status::Error("holds no token");
  return Status::Ok();
}

void Digest(std::string_view text, unsigned char out[32]) {
  crypto_generichash(out, 32, reinterpret_cast<const unsigned char*>(text.data()), text.size(),
                     nullptr, 0);
}

}  // namespace

ApiToken::ApiToken(ApiToken&& other) noexcept { *this = std::move(other); }

ApiToken& ApiToken::operator=(ApiToken&& other) noexcept {
  if (this != &other) {
    Wipe();
    value_ = other.value_;
    size_ = other.size_;
    digest_ = other.digest_;
    other.Wipe();
  }
  return *this;
}

ApiToken::~ApiToken() { Wipe(); }

void ApiToken::Wipe() {
  sodium_memzero(value_.data(), value_.size());
  sodium_memzero(digest_.data(), digest_.size());
  size_ = 0;
}

bool ApiToken::Matches(std::string_view presented) const {
  // A presented value longer than any token cannot match; refusing it early says only that.
  if (size_ == 0 || presented.size() > kMaxFileSize) return false;
  unsigned char digest[32];
  Digest(presented, digest);
  const bool equal = sodium_memcmp(digest, digest_.data(), sizeof digest) == 0;
  sodium_memzero(digest, sizeof digest);
  return equal;
}

Result<ApiToken> ApiToken::FromString(std::string_view text) {
  if (text.size() >= 2 && text.substr(text.size() - 2) == "\r\n") {
    text.remove_suffix(2);
  } else if (!text.empty() && text.back() == '\n') {
    text.remove_suffix(1);
  }
  if (Status s = CheckFormat(text); !s) return s;
  ApiToken token;
  std::memcpy(token.value_.data(), text.data(), text.size());
  token.size_ = text.size();
  Digest(text, token.digest_.data());
  return token;
}

Status ApiToken::CreateFile(const std::string& path) {
  if (sodium_init() < 0) return Status::Error("libsodium failed to initialise");
  unsigned char random[kRandomBytes];
  randombytes_buf(random, sizeof random);
  char hex[kRandomBytes * 2 + 1];
  sodium_bin2hex(hex, sizeof hex, random, sizeof random);
  sodium_memzero(random, sizeof random);
  hex[kRandomBytes * 2] = '\n';  // replaces the terminating NUL: the file is the line

  const std::string quoted = "'" + path + "'";
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) {
    sodium_memzero(hex, sizeof hex);
    if (errno == EEXIST)
      return Status::Error("token file " + quoted +
                           " already exists; refusing to overwrite (to rotate the token, write a "
                           "new file and move it over the old one, then restart the daemon)");
    return Status::Error("cannot create token file " + quoted + ": " + Errno());
  }
  Status status;
  if (::fchmod(fd, 0600) != 0) {  // the umask may have narrowed the mode; make it exactly 0600
    status = Status::Error("cannot chmod token file " + quoted + " to 0600: " + Errno());
  } else {
    std::size_t done = 0;
    while (done < sizeof hex && status.ok()) {
      const ssize_t n = ::write(fd, hex + done, sizeof hex - done);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        status = Status::Error("cannot write token file " + quoted + ": " + Errno());
      } else {
        done += static_cast<std::size_t>(n);
      }
    }
    if (status.ok() && ::fsync(fd) != 0)
      status = Status::Error("cannot fsync token file " + quoted + ": " + Errno());
  }
  sodium_memzero(hex, sizeof hex);
  if (::close(fd) != 0 && status.ok())
    status = Status::Error("cannot close token file " + quoted + ": " + Errno());
  if (!status.ok()) {
    ::unlink(path.c_str());  // leave no half-written token behind
    return status;
  }
  const std::string dir = ParentDirectory(path);
  const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd < 0)
    return Status::Error("token file " + quoted + " written but cannot open its folder '" + dir +
                         "' to fsync it: " + Errno());
  const int rc = ::fsync(dir_fd);
  const int fsync_errno = errno;
  ::close(dir_fd);
  if (rc != 0)
    return Status::Error("token file " + quoted + " written but cannot fsync its folder '" + dir +
                         "': " + std::strerror(fsync_errno));
  return Status::Ok();
}

Result<ApiToken> ApiToken::LoadFile(const std::string& path) {
  if (sodium_init() < 0) return Status::Error("libsodium failed to initialise");
  const std::string quoted = "'" + path + "'";
  // O_NONBLOCK: a FIFO planted at the path is refused below instead of blocking the open.
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) return Status::Error("cannot open token file " + quoted + ": " + Errno());
  auto fail = [&](const std::string& what) -> Result<ApiToken> {
    ::close(fd);
    return Status::Error("token file " + quoted + " " + what);
  };
  struct stat st {};
  if (::fstat(fd, &st) != 0) return fail("cannot be examined: " + Errno());
  if (!S_ISREG(st.st_mode)) return fail("is not a regular file");
  if ((st.st_mode & 077) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    return fail(std::string("has mode ") + mode +
                ": it must not be readable or writable by group or others (chmod 600 " + quoted +
                ")");
  }
  if (st.st_size > static_cast<off_t>(kMaxFileSize))
    return fail("is " + std::to_string(st.st_size) +
                " bytes; a token file is one line of at most " + std::to_string(kMaxLength) +
                " characters");
  char content[kMaxFileSize + 1];
  std::size_t size = 0;
  while (size < sizeof content) {
    const ssize_t n = ::read(fd, content + size, sizeof content - size);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      sodium_memzero(content, sizeof content);
      return fail("cannot be read: " + Errno());
    }
    if (n == 0) break;
    size += static_cast<std::size_t>(n);
  }
  ::close(fd);
  Result<ApiToken> token = size > kMaxFileSize
                               ? Result<ApiToken>(Status::Error("grew past its size limit"))
                               : FromString(std::string_view(content, size));
  sodium_memzero(content, sizeof content);
  if (!token) return Status::Error("token file " + quoted + " " + token.message());
  return token;
}

}  // namespace relay::crypto
