// Fuzzes the Mattermost reply parsers: ParseMmPost, ParseMmPostList, ParseMmFileInfo,
// ParseMmReaction and ParseMmWsEvent (and the post/reaction a WebSocket event carries, as the
// bridge parses them next).
#include <cstddef>
#include <cstdint>
#include <string>

#include "chat/mattermost_client.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string json(reinterpret_cast<const char*>(data), size);
  (void)relay::chat::ParseMmPost(json);
  (void)relay::chat::ParseMmPostList(json);
  (void)relay::chat::ParseMmFileInfo(json);
  (void)relay::chat::ParseMmReaction(json);
  auto event = relay::chat::ParseMmWsEvent(json);
  if (event.ok()) {
    if (!event.value->post_json.empty()) (void)relay::chat::ParseMmPost(event.value->post_json);
    if (!event.value->reaction_json.empty())
      (void)relay::chat::ParseMmReaction(event.value->reaction_json);
  }
  return 0;
}
