// Fuzzes DiodeDecoder::Feed with a sequence of datagrams: the input is split into datagrams,
// each a 2-byte big-endian length followed by that many bytes (a short tail is the last one).
// Checks the documented bounds after every Feed (pending_bytes() <= max_pending_bytes, at most
// max_streams streams) and that MissingCount agrees with the (uncapped here) Incomplete list.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string_view>
#include <vector>

#include "transports/diode.h"

namespace {
constexpr std::size_t kMaxPending = 64u << 10;  // small, so eviction paths are reachable
constexpr std::size_t kMaxStreams = 3;
constexpr std::size_t kMaxRanges = 4;  // small, so forgetting ranges is reachable
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  relay::transports::DiodeDecoder decoder(kMaxPending, kMaxStreams, kMaxRanges);
  std::vector<relay::transports::DiodeDecoder::Message> out;
  std::size_t pos = 0;
  while (pos < size) {
    std::size_t len = size - pos;
    if (len >= 2) {
      len = (std::size_t{data[pos]} << 8) | data[pos + 1];
      pos += 2;
      if (len > size - pos) len = size - pos;
    } else {
      len = size - pos;
    }
    (void)decoder.Feed(std::string_view(reinterpret_cast<const char*>(data + pos), len), &out);
    pos += len;
    if (decoder.pending_bytes() > kMaxPending) {
      std::fprintf(stderr, "pending_bytes %zu exceeds max %zu\n", decoder.pending_bytes(),
                   kMaxPending);
      std::abort();
    }
    if (decoder.Streams().size() > kMaxStreams) {
      std::fprintf(stderr, "%zu streams held, max %zu\n", decoder.Streams().size(), kMaxStreams);
      std::abort();
    }
  }
  for (const auto& stream : decoder.Streams()) {
    const auto listed = decoder.Incomplete(stream.stream_id).size();
    const auto counted = decoder.MissingCount(stream.stream_id);
    if (listed < 100000 ? counted != listed : counted < listed) {
      std::fprintf(stderr, "MissingCount %llu, Incomplete lists %zu\n",
                   static_cast<unsigned long long>(counted), listed);
      std::abort();
    }
  }
  return 0;
}
