#pragma once
// Parsing and validation of POST /v1/messages bodies (see README, "Ingest API").
//
// A body is one JSON object or a JSON array of objects (a batch, committed as one). Validation
// is all-or-nothing: one bad message rejects the whole request, and the error names the message
// index and the field.

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "config/config.h"
#include "event/event.h"

namespace relay {

struct IngestMessage {
  std::string channel;
  std::string author;
  std::string text;
  std::string client_id;  // "id": optional idempotency key
  std::string thread;     // optional id of the thread root event
  std::string ref;        // optional: the event an edit/delete/reaction applies to
  EventKind kind = EventKind::kPost;
  std::vector<std::pair<std::string, std::string>> props;
};

struct IngestRequest {
  std::vector<IngestMessage> messages;
  bool batch = false;  // the body was an array: answer with an array
};

struct IngestError {
  int http_status = 400;  // 400, 403 (another site's message) or 413
  std::string message;
};

inline constexpr std::size_t kMaxFieldBytes = 256;  // author, id, thread, ref, prop keys

// Parses `body`; on failure fills *error and returns false.
bool ParseIngestBody(std::string_view body, const config::Config& config, IngestRequest* out,
                     IngestError* error);

}  // namespace relay
