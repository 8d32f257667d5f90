#include "crypto/secret.h"

#include <fcntl.h>
#include <sodium.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>

namespace relay::crypto {
namespace {

std::string Errno() { return std::strerror(errno); }

// sodium_malloc, or the process ends: out of memory may crash (style.md), and a secret must not
// fall back to ordinary memory.
char* LockedAlloc(std::size_t size) {
  // sodium_malloc needs sodium_init (idempotent and thread-safe) for the page size.
  if (sodium_init() < 0) {
    std::fprintf(stderr, "relay: libsodium cannot be initialised\n");
    std::abort();
  }
  void* p = sodium_malloc(size == 0 ? 1 : size);
  if (p == nullptr) {
    std::fprintf(stderr, "relay: out of locked memory for a secret (%zu bytes)\n", size);
    std::abort();
  }
  return static_cast<char*>(p);
}

// Closes the file and wipes and frees the read buffer however the read ends.
struct TokenRead {
  int fd = -1;
  char* buffer = nullptr;
  ~TokenRead() {
    if (fd >= 0) ::close(fd);
    if (buffer != nullptr) sodium_free(buffer);  // wipes
  }
};

bool IsTokenChar(char c) { return c > ' ' && c < 0x7f; }
bool IsBlank(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

}  // namespace

Secret Secret::FromString(std::string_view text) {
  char* data = LockedAlloc(text.size());
  std::memcpy(data, text.data(), text.size());
  return Secret(data, text.size());
}

Secret::~Secret() {
  if (data_ != nullptr) sodium_free(data_);  // wipes
}

Secret::Secret(Secret&& other) noexcept : data_(other.data_), size_(other.size_) {
  other.data_ = nullptr;
  other.size_ = 0;
}

Secret& Secret::operator=(Secret&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) sodium_free(data_);
    data_ = other.data_;
    size_ = other.size_;
    other.data_ = nullptr;
    other.size_ = 0;
  }
  return *this;
}

void Wipe(void* data, std::size_t size) { sodium_memzero(data, size); }
void Wipe(std::string* text) { sodium_memzero(text->data(), text->size()); }

Result<Secret> ReadTokenFile(const std::string& path, std::string_view what, std::size_t max_size) {
  const std::string named = std::string(what) + " '" + path + "'";
  TokenRead file;
  // O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below).
  file.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
  if (file.fd < 0) return Status::Error("cannot open the " + named + ": " + Errno());
  struct stat st {};
  if (::fstat(file.fd, &st) != 0) return Status::Error("cannot stat the " + named + ": " + Errno());
  if (!S_ISREG(st.st_mode)) {
    return Status::Error("the " + named + " is not a regular file (a FIFO, device or folder)");
  }
  if ((st.st_mode & 077) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    return Status::Error("the " + named + " has mode " + mode +
                         ": it must not be readable or writable by group or others (chmod 600 '" +
                         path + "')");
  }
  if (st.st_size < 0 || static_cast<std::uint64_t>(st.st_size) > max_size) {
    return Status::Error("the " + named + " is " + std::to_string(st.st_size) +
                         " bytes; a token file holds one line of at most " +
                         std::to_string(max_size) + " bytes");
  }
  // Read straight into locked memory, one byte more than allowed to notice a file that grew.
  file.buffer = LockedAlloc(max_size + 1);
  std::size_t size = 0;
  while (size < max_size + 1) {
    const ssize_t n = ::read(file.fd, file.buffer + size, max_size + 1 - size);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Status::Error("cannot read the " + named + ": " + Errno());
    if (n == 0) break;
    size += static_cast<std::size_t>(n);
  }
  if (size > max_size)
    return Status::Error("the " + named + " grew past " + std::to_string(max_size) +
                         " bytes while read");
  std::size_t begin = 0;
  while (begin < size && IsBlank(file.buffer[begin])) ++begin;
  std::size_t end = begin;
  while (end < size && file.buffer[end] != '\n') ++end;
  while (end > begin && IsBlank(file.buffer[end - 1])) --end;
  for (std::size_t i = end; i < size; ++i) {
    if (!IsBlank(file.buffer[i])) {
      return Status::Error("the " + named + " has more than one line; it holds the token alone");
    }
  }
  if (begin == end) return Status::Error("the " + named + " is empty");
  for (std::size_t i = begin; i < end; ++i) {
    if (!IsTokenChar(file.buffer[i])) {
      return Status::Error("the " + named + " has a character at offset " + std::to_string(i) +
                           " that cannot be in a token (printable ASCII without spaces)");
    }
  }
  char* token = LockedAlloc(end - begin);
  std::memcpy(token, file.buffer + begin, end - begin);
  return Secret(token, end - begin);
}

}  // namespace relay::crypto
