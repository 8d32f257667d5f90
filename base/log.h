#pragma once
// Leveled, one-event-per-line logging to stderr. Under systemd (JOURNAL_STREAM set) each line
// gets a syslog priority prefix ("<4>") so journald files it at the right level; otherwise a
// UTC timestamp. Message bodies and secrets are never logged by relay code at any level.

#include <string>
#include <string_view>

namespace relay::log {

enum class Level { kDebug = 7, kInfo = 6, kWarning = 4, kError = 3 };

void SetMinLevel(Level level);
// `text` with control characters (and backslashes) written as \xNN: safe to print on one line.
// Write() applies it to every message.
std::string Printable(std::string_view text);
void Write(Level level, std::string_view message);

inline void Debug(std::string_view m) { Write(Level::kDebug, m); }
inline void Info(std::string_view m) { Write(Level::kInfo, m); }
inline void Warning(std::string_view m) { Write(Level::kWarning, m); }
inline void Error(std::string_view m) { Write(Level::kError, m); }

}  // namespace relay::log
