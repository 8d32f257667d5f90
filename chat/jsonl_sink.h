#pragma once
// The JSON Lines sink: one line per delivered event, appended and fsynced in batches.
//
// Exactly-once across crashes: the daemon records the file's size together with its delivery
// cursor after each synced batch. On start, Recover(recorded) cuts anything written after the
// last recorded batch (a batch that was written but not recorded is written again), so an id
// never appears twice. Not thread-safe: one delivery thread owns each file.

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"
#include "event/event.h"

namespace relay::chat {

// Where the daemon put a blob attachment of a delivered event (`path`), or why it is missing.
struct DeliveredFile {
  std::string path;
  std::string missing;
};

// {"id","origin_site","channel","author","text","thread","kind","created_at", ...}: one line,
// newline appended to *out. Inline attachments are written as {"name","mime_type","size",
// "data_base64"}; blob attachments (Attachment::is_blob) as {"name","mime_type","size","path"}
// from `blob_files[i]` (indexed like event.files), or with "missing" instead of "path".
void AppendJsonlLine(const Event& event, std::string* out,
                     const std::vector<DeliveredFile>& blob_files = {});

class JsonlFile {
 public:
  // Opens or creates `path` (mode 0640) for appending; creates missing parent folders.
  static Result<std::unique_ptr<JsonlFile>> Open(const std::string& path);
  ~JsonlFile();
  JsonlFile(const JsonlFile&) = delete;
  JsonlFile& operator=(const JsonlFile&) = delete;

  // Brings the file back to `recorded_size` bytes (the size stored with the delivery cursor).
  // A longer file is truncated; a shorter one (rotated or truncated by an operator) is kept as
  // is and *note says so. Returns the size after recovery.
  Result<std::uint64_t> Recover(std::uint64_t recorded_size, std::string* note);
  // Appends bytes (whole lines) to the file.
  Status Append(std::string_view lines);
  // fdatasync: the appended lines are on stable storage when this returns ok.
  Status Sync();
  std::uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  JsonlFile(std::string path, int fd, std::uint64_t size);
  std::string path_;
  int fd_;
  std::uint64_t size_;
};

}  // namespace relay::chat
