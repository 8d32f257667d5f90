// Fuzzes DecodeEvent and DecodeFramePayload. A decoded event must survive a re-encode unchanged,
// and LastHop must name its last hop.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "event/event.h"

namespace {
void CheckRoundTrip(std::string_view bytes) {
  auto event = relay::DecodeEvent(bytes);
  if (!event.ok()) return;
  // The inbound path reads the last hop without decoding: it must agree with the decoder.
  auto last = relay::LastHop(*relay::ParseEventEnvelope(bytes));
  if (!last.ok() || *last != (event->hops.empty() ? std::string() : event->hops.back())) {
    std::fprintf(stderr, "LastHop disagrees with DecodeEvent\n");
    std::abort();
  }
  std::string again;
  relay::EncodeEvent(*event, &again);
  auto back = relay::DecodeEvent(again);
  if (!back.ok() || !(*back == *event)) {
    std::fprintf(stderr, "event does not round-trip: %s\n", back.message().c_str());
    std::abort();
  }
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  CheckRoundTrip(bytes);
  auto framed = relay::DecodeFramePayload(bytes);
  if (framed.ok()) {
    for (const auto& item : framed->events) CheckRoundTrip(item.encoded);
  }
  return 0;
}
