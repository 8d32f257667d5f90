// Fuzzes ParseIngestBody (POST /v1/messages) against a config with one channel.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "config/config.h"
#include "relay/ingest.h"

namespace {
relay::config::Config* g_config = nullptr;
}

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  g_config = new relay::config::Config();
  g_config->site_name = "europe";
  g_config->ingest_max_text = 1024;  // small, so the limit path is reachable
  relay::config::ChannelConfig channel;
  channel.name = "war-room";
  channel.peers = {"aws"};
  channel.jsonl_path = "/dev/null";
  g_config->channels.push_back(channel);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  relay::IngestRequest request;
  relay::IngestError error;
  (void)relay::ParseIngestBody(std::string_view(reinterpret_cast<const char*>(data), size),
                               *g_config, &request, &error);
  return 0;
}
