#pragma once
// Secrets other than site keys -- bearer tokens read from files -- held so that they leave as
// few copies in memory as possible.
//
// A Secret lives in memory from sodium_malloc (guard pages, locked against swapping where the
// limits allow, wiped by sodium_free) and is move-only: share one through a
// std::shared_ptr<const Secret> rather than copying its text. Reading a Secret from several
// threads at once is safe. Never log view(), and wipe (Wipe) any buffer it is copied into.

#include <cstddef>
#include <string>
#include <string_view>

#include "base/status.h"

namespace relay::crypto {

class Secret {
 public:
  // Copies `text` into locked memory (for secrets made in memory, and tests).
  static Secret FromString(std::string_view text);
  ~Secret();
  Secret(Secret&& other) noexcept;
  Secret& operator=(Secret&& other) noexcept;
  Secret(const Secret&) = delete;
  Secret& operator=(const Secret&) = delete;

  std::string_view view() const { return {data_, size_}; }
  std::size_t size() const { return size_; }

 private:
  Secret(char* data, std::size_t size) : data_(data), size_(size) {}
  char* data_ = nullptr;
  std::size_t size_ = 0;
  friend Result<Secret> ReadTokenFile(const std::string&, std::string_view, std::size_t);
};

// Overwrites `size` bytes at `data` with zeros in a way the compiler does not remove.
void Wipe(void* data, std::size_t size);
// Wipes the string's bytes (not what it may have left behind when it grew).
void Wipe(std::string* text);

// Reads a bearer token from a file the way key files are read (SiteKey::LoadFile). The file
// must be a regular file (a FIFO, device or folder is refused without blocking), have no group
// or other permission bits (the error names the mode and the fix, "chmod 600 FILE") and be at
// most `max_size` bytes. The token is its first line without surrounding whitespace, and must be
// non-empty printable ASCII without spaces (it goes into an HTTP header). `what` names the file in
// errors ("Mattermost token file"); errors quote the path, never the content.
Result<Secret> ReadTokenFile(const std::string& path, std::string_view what,
                             std::size_t max_size = 4096);

}  // namespace relay::crypto
