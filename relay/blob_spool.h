#pragma once
// Large attachments on disk: the spool that holds a blob while it is cut into chunks (sender)
// or put back together from chunks (receiver), so that no step holds more than a chunk of it in
// memory (docs/mattermost.md, "Large attachments"; docs/wire-format.md, "Event").
//
//   <data_dir>/spool/out/<random>.part        a download in progress (capture thread); removed
//                                             once its chunks are committed, and at start
//   <data_dir>/spool/in/<origin>/<blob id>    chunks received so far, written at their offsets
//
// Nothing here is thread-safe by itself; each object belongs to one thread.

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <string>
#include <string_view>

#include "base/status.h"
#include "event/event.h"

namespace relay {

// Streaming BLAKE2b-256 (libsodium crypto_generichash), the attachment content hash.
class Blake2b {
 public:
  Blake2b();
  void Update(std::string_view bytes);
  // The 32-byte digest; the object must not be used afterwards.
  std::string Final();

 private:
  alignas(64) unsigned char state_[384];
};

// BLAKE2b-256 of a whole file, read in 1 MiB pieces. Error names the file.
Result<std::string> HashFile(const std::string& path);

// The blob id for a file of `origin_site` known there as `source_id` (e.g. a Mattermost file
// id): 32 hex digits of BLAKE2b-128("relay-blob-v1" || origin || 0 || source_id). Deterministic,
// so a file captured twice (a crash between its chunks and its post) lands in the same spool
// file at the receiver instead of leaving an orphan.
std::string BlobIdFor(std::string_view origin_site, std::string_view source_id);

// A name safe as one path component: '/', NUL and control characters become '_', leading dots
// are dropped (no "." / ".." / hidden files), at most 120 bytes; "file" when nothing is left.
std::string SanitizeFileName(std::string_view name);

// 2 * `bytes` random hex digits (libsodium's CSPRNG): unpredictable temporary file names.
std::string RandomHex(std::size_t bytes);

std::string SpoolOutDir(const std::string& data_dir);
// <data_dir>/spool/in/<sanitized origin>/<blob id>; `blob_id` must be valid (IsValidBlobId).
std::string SpoolInPath(const std::string& data_dir, std::string_view origin_site,
                        std::string_view blob_id);

// Writes received chunks into spool files (pwrite at their offsets: writing a chunk again is
// harmless) and makes them durable together. Keeps the touched files open until Sync/Close.
class ChunkWriter {
 public:
  ChunkWriter() = default;
  ~ChunkWriter();
  ChunkWriter(const ChunkWriter&) = delete;
  ChunkWriter& operator=(const ChunkWriter&) = delete;

  // Creates the file (and its directories) when needed. Error names the file. At most
  // kMaxOpenFiles stay open: opening another syncs and closes the oldest (a peer's frames can
  // name any number of blobs; descriptors are bounded, what was written is durable all the same).
  [[nodiscard]] Status Write(const std::string& path, std::uint64_t offset, std::string_view data);
  static constexpr std::size_t kMaxOpenFiles = 32;
  std::size_t open_files() const { return files_.size(); }
  // fsync of every file written since the last Sync (and of directories entries were created
  // in); closes them. Must succeed before the chunks are recorded as received.
  [[nodiscard]] Status Sync();
  // Closes without syncing (after a failure).
  void Close();

 private:
  std::map<std::string, int> files_;
  std::deque<std::string> opened_;  // files_ in the order they were opened
  std::map<std::string, bool> new_dirs_;
};

// Whether a blob attachment's bytes are all in its spool file.
enum class BlobState { kReady, kWaiting, kMissing };

// Decides, for events waiting on blob attachments, whether they can be delivered: kReady when
// the file has the attachment's size and BLAKE2b-256; kWaiting while not and `wait` has not
// passed since the event was first checked (by this object); kMissing afterwards. A file whose
// size and modification time have not changed since a failed check is not hashed again.
class BlobWaiter {
 public:
  using Clock = std::chrono::steady_clock;
  explicit BlobWaiter(std::chrono::milliseconds wait, std::function<Clock::time_point()> now = {});
  BlobState Check(const std::string& event_id, const std::string& path, const Attachment& a,
                  std::string* why);
  // Forgets an event (delivered).
  void Forget(const std::string& event_id);

 private:
  std::chrono::milliseconds wait_;
  std::function<Clock::time_point()> now_;
  std::map<std::string, Clock::time_point> first_seen_;
  struct Seen {
    std::int64_t size = -1;
    std::int64_t mtime_ns = -1;
  };
  std::map<std::string, Seen> failed_;  // path -> file state at its last failed hash check
};

// Streams the file at `path` in pieces of at most kMaxChunkBytes to `piece` (offset, bytes),
// stopping at the first error it returns. Error names the file.
[[nodiscard]] Status ForEachChunk(const std::string& path, std::uint64_t size,
                                  const std::function<Status(std::uint64_t, std::string&)>& piece);

// Moves a verified spool file to `target` (created with its parent directory): rename when they
// share a file system, else a streamed copy to "<target>.tmp", fsync, rename, unlink of the
// source. Either way the target is complete when it exists; the directory is synced.
[[nodiscard]] Status MoveBlob(const std::string& spool_path, const std::string& target);

// Removes regular files under `dir` (recursively) not modified for `ttl`, and directories left
// empty. Returns how many files were removed.
std::size_t CollectSpool(const std::string& dir, std::chrono::milliseconds ttl);

}  // namespace relay
