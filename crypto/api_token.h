#pragma once
// The bearer token of the local API ([ingest] token_file, docs/security.md).
//
// A token file holds one line: the token, 32 to 256 characters from A-Z a-z 0-9 - . _ ~ + /
// (RFC 6750's b64token), optionally followed by '=' padding and a newline. `relay token FILE`
// writes 32 random bytes as 64 hex characters. The file must be a regular file that group and
// others can neither read nor write (checked like the site key file).
//
// The daemon keeps only a BLAKE2b digest of the token and compares digests in constant time;
// the CLI keeps the token itself, to send it. Both are wiped by Wipe() and the destructor.
// Not thread-safe for Wipe(); Matches() and value() may be called from several threads.

#include <array>
#include <cstddef>
#include <string>
#include <string_view>

#include "base/status.h"

namespace relay::crypto {

class ApiToken {
 public:
  static constexpr std::size_t kMinLength = 32;
  static constexpr std::size_t kMaxLength = 256;
  static constexpr std::size_t kMaxFileSize = 1024;

  // Writes a fresh random token to `path`, created exclusively with mode 0600 (whatever the
  // umask), fsynced with its folder. Refuses to overwrite an existing file (like `relay keygen`):
  // to rotate, write a new file and move it over the old one.
  [[nodiscard]] static Status CreateFile(const std::string& path);

  // Reads and checks a token file. Errors name the file, never quote its content.
  [[nodiscard]] static Result<ApiToken> LoadFile(const std::string& path);

  // For tests: a token from its text (the same format checks as a file).
  [[nodiscard]] static Result<ApiToken> FromString(std::string_view text);

  ApiToken(const ApiToken&) = delete;
  ApiToken& operator=(const ApiToken&) = delete;
  ApiToken(ApiToken&& other) noexcept;
  ApiToken& operator=(ApiToken&& other) noexcept;
  ~ApiToken();

  // Whether `presented` is the token. Constant time in the token's content and length (digests
  // of both are compared with sodium_memcmp). False once wiped.
  bool Matches(std::string_view presented) const;

  // The token, to send as "Authorization: Bearer <value>". Empty once wiped.
  std::string_view value() const { return {value_.data(), size_}; }

  // Overwrites the token and its digest with zeros.
  void Wipe();

 private:
  ApiToken() = default;

  std::array<char, kMaxLength> value_{};
  std::size_t size_ = 0;
  std::array<unsigned char, 32> digest_{};
};

}  // namespace relay::crypto
