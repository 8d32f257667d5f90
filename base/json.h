#pragma once
// Minimal JSON writing helpers (parsing uses simdjson in the ingest path).

#include <cstdint>
#include <string>
#include <string_view>

namespace relay {

// Appends `s` as a quoted JSON string. Control characters are escaped; invalid UTF-8 sequences
// are replaced by U+FFFD so the output is always valid JSON.
void AppendJsonString(std::string* out, std::string_view s);
std::string JsonString(std::string_view s);
// {"error": "<message>"}
std::string JsonError(std::string_view message);
// Standard base64 (RFC 4648 section 4, with padding).
std::string Base64(std::string_view bytes);
// RFC 3339 UTC with milliseconds: "2026-11-26T03:55:24.123Z".
std::string FormatTimestampMs(std::int64_t unix_ms);

}  // namespace relay
