// Fuzzes config::LoadConfig: the input is the INI file. Also the CLI helpers on each line.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "config/config.h"
#include "crypto/identity.h"

namespace {
std::string g_path;
}

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (!relay::crypto::Init().ok()) std::abort();
  char dir[] = "/tmp/relay-fuzz-config-XXXXXX";
  if (::mkdtemp(dir) == nullptr) std::abort();
  g_path = std::string(dir) + "/site.conf";
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::FILE* f = std::fopen(g_path.c_str(), "wb");
  if (f == nullptr) std::abort();
  if (size > 0 && std::fwrite(data, 1, size, f) != size) std::abort();
  std::fclose(f);
  auto config = relay::config::LoadConfig(g_path);
  if (config.ok()) {
    for (const auto& channel : config->channels) (void)config->FindChannel(channel.name);
    for (const auto& peer : config->peers) (void)config->FindPeer(peer.name);
  }
  // The value helpers, on the whole input as one string (short inputs only).
  if (size <= 64) {
    const std::string text(reinterpret_cast<const char*>(data), size);
    (void)relay::config::ParseDuration(text);
    (void)relay::config::ParseSize(text);
    (void)relay::config::ParseEndpoint(text);
    // A time that parses formats back to one that parses to the same moment.
    if (auto time = relay::config::ParseTime(text); time.ok()) {
      auto again = relay::config::ParseTime(relay::config::FormatTime(*time));
      if (!again.ok() || *again != *time) std::abort();
    }
  }
  return 0;
}
