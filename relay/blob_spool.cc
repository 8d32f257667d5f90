#include "relay/blob_spool.h"

#include <fcntl.h>
#include <sodium.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

namespace relay {
namespace {

namespace fs = std::filesystem;

static_assert(sizeof(crypto_generichash_state) <= 384, "Blake2b::state_ is too small");

std::string Errno(const std::string& what, const std::string& path) {
  return what + " '" + path + "': " + std::strerror(errno);
}

Status SyncDir(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Status::Error(Errno("cannot open directory", dir));
  int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) return Status::Error(Errno("cannot sync directory", dir));
  return Status::Ok();
}

// Creates `dir` and its parents; true in *created when something was created.
Status MakeDirs(const std::string& dir, bool* created) {
  std::error_code ec;
  *created = fs::create_directories(dir, ec);
  if (ec) return Status::Error("cannot create directory '" + dir + "': " + ec.message());
  return Status::Ok();
}

std::string Hex(const unsigned char* p, std::size_t n) {
  static const char kDigits[] = "0123456789abcdef";
  std::string out;
  out.reserve(2 * n);
  for (std::size_t i = 0; i < n; ++i) {
    out.push_back(kDigits[p[i] >> 4]);
    out.push_back(kDigits[p[i] & 15]);
  }
  return out;
}

crypto_generichash_state* State(unsigned char* raw) {
  return reinterpret_cast<crypto_generichash_state*>(raw);
}

}  // namespace

Blake2b::Blake2b() { crypto_generichash_init(State(state_), nullptr, 0, kBlobHashBytes); }

void Blake2b::Update(std::string_view bytes) {
  crypto_generichash_update(State(state_), reinterpret_cast<const unsigned char*>(bytes.data()),
                            bytes.size());
}

std::string Blake2b::Final() {
  std::string out(kBlobHashBytes, '\0');
  crypto_generichash_final(State(state_), reinterpret_cast<unsigned char*>(out.data()), out.size());
  return out;
}

Result<std::string> HashFile(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::Error(Errno("cannot open", path));
  Blake2b h;
  std::string buf(kMaxChunkBytes, '\0');
  while (true) {
    ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      Status s = Status::Error(Errno("cannot read", path));
      ::close(fd);
      return s;
    }
    if (n == 0) break;
    h.Update(std::string_view(buf.data(), static_cast<std::size_t>(n)));
  }
  ::close(fd);
  return h.Final();
}

std::string RandomHex(std::size_t bytes) {
  std::string raw(bytes, '\0');
  randombytes_buf(raw.data(), raw.size());
  return Hex(reinterpret_cast<const unsigned char*>(raw.data()), raw.size());
}

std::string BlobIdFor(std::string_view origin_site, std::string_view source_id) {
  crypto_generichash_state st;
  unsigned char out[16];
  crypto_generichash_init(&st, nullptr, 0, sizeof out);
  const std::string_view ctx = "relay-blob-v1";
  crypto_generichash_update(&st, reinterpret_cast<const unsigned char*>(ctx.data()), ctx.size());
  crypto_generichash_update(&st, reinterpret_cast<const unsigned char*>(origin_site.data()),
                            origin_site.size());
  const unsigned char zero = 0;
  crypto_generichash_update(&st, &zero, 1);
  crypto_generichash_update(&st, reinterpret_cast<const unsigned char*>(source_id.data()),
                            source_id.size());
  crypto_generichash_final(&st, out, sizeof out);
  return Hex(out, sizeof out);
}

std::string SanitizeFileName(std::string_view name) {
  std::string out;
  for (char c : name) {
    unsigned char u = static_cast<unsigned char>(c);
    out.push_back(c == '/' || c == '\\' || u < 0x20 || u == 0x7f ? '_' : c);
  }
  std::size_t dots = 0;
  while (dots < out.size() && out[dots] == '.') ++dots;
  out.erase(0, dots);
  if (out.size() > 120) {
    out.resize(120);
    // Do not leave half of a UTF-8 sequence at the end: find where the last character starts
    // and drop it if its lead byte announces more bytes than are left.
    std::size_t start = out.size();
    while (start > 0 && (static_cast<unsigned char>(out[start - 1]) & 0xc0) == 0x80) --start;
    if (start > 0) {
      const auto lead = static_cast<unsigned char>(out[start - 1]);
      const std::size_t len = lead >= 0xf0 ? 4 : lead >= 0xe0 ? 3 : lead >= 0xc0 ? 2 : 1;
      if (start - 1 + len > out.size()) out.resize(start - 1);
    }
  }
  if (out.empty()) out = "file";
  return out;
}

std::string SpoolOutDir(const std::string& data_dir) { return data_dir + "/spool/out"; }

std::string SpoolInPath(const std::string& data_dir, std::string_view origin_site,
                        std::string_view blob_id) {
  return data_dir + "/spool/in/" + SanitizeFileName(origin_site) + "/" + std::string(blob_id);
}

// ---- ChunkWriter ------------------------------------------------------------------------------

ChunkWriter::~ChunkWriter() { Close(); }

void ChunkWriter::Close() {
  for (auto& [path, fd] : files_) ::close(fd);
  files_.clear();
  opened_.clear();
  new_dirs_.clear();
}

Status ChunkWriter::Write(const std::string& path, std::uint64_t offset, std::string_view data) {
  auto it = files_.find(path);
  if (it == files_.end()) {
    const std::string dir = fs::path(path).parent_path().string();
    bool created = false;
    if (Status s = MakeDirs(dir, &created); !s) return s;
    if (created) {
      new_dirs_[dir] = true;
      new_dirs_[fs::path(dir).parent_path().string()] = true;
      new_dirs_[fs::path(dir).parent_path().parent_path().string()] = true;
    }
    if (files_.size() >= kMaxOpenFiles) {
      // The oldest is done with for now: made durable here rather than at Sync.
      const std::string oldest = opened_.front();
      opened_.pop_front();
      const int old_fd = files_.at(oldest);
      files_.erase(oldest);
      if (::fdatasync(old_fd) != 0) {
        Status failed = Status::Error(Errno("cannot sync spool file", oldest));
        ::close(old_fd);
        return failed;
      }
      ::close(old_fd);
    }
    struct stat st {};
    bool existed = ::stat(path.c_str(), &st) == 0;
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) return Status::Error(Errno("cannot open spool file", path));
    if (!existed) new_dirs_[dir] = true;
    it = files_.emplace(path, fd).first;
    opened_.push_back(path);
  }
  std::size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::pwrite(it->second, data.data() + done, data.size() - done,
                         static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Status::Error(Errno("cannot write spool file", path));
    done += static_cast<std::size_t>(n);
  }
  return Status::Ok();
}

Status ChunkWriter::Sync() {
  Status result;
  for (auto& [path, fd] : files_) {
    if (::fdatasync(fd) != 0 && result)
      result = Status::Error(Errno("cannot sync spool file", path));
  }
  for (auto& [dir, unused] : new_dirs_) {
    if (Status s = SyncDir(dir); !s && result) result = s;
  }
  Close();
  return result;
}

// ---- BlobWaiter -------------------------------------------------------------------------------

BlobWaiter::BlobWaiter(std::chrono::milliseconds wait, std::function<Clock::time_point()> now)
    : wait_(wait), now_(now ? std::move(now) : [] { return Clock::now(); }) {}

BlobState BlobWaiter::Check(const std::string& event_id, const std::string& path,
                            const Attachment& a, std::string* why) {
  auto first = first_seen_.emplace(event_id, now_()).first->second;
  auto waiting = [&](std::string reason) {
    *why = std::move(reason);
    if (now_() - first < wait_) return BlobState::kWaiting;
    failed_.erase(path);
    return BlobState::kMissing;
  };
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return waiting("no chunk of it has arrived");
  if (static_cast<std::uint64_t>(st.st_size) != a.size)
    return waiting("its chunks have not all arrived (" + std::to_string(st.st_size) + " of " +
                   std::to_string(a.size) + " bytes)");
  Seen seen{static_cast<std::int64_t>(st.st_size),
            static_cast<std::int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec};
  auto f = failed_.find(path);
  if (f != failed_.end() && f->second.size == seen.size && f->second.mtime_ns == seen.mtime_ns)
    return waiting("its chunks have not all arrived (content hash differs)");
  auto hash = HashFile(path);
  if (hash && *hash == a.blake2b) {
    failed_.erase(path);
    return BlobState::kReady;
  }
  failed_[path] = seen;
  return waiting(hash ? "its chunks have not all arrived (content hash differs)" : hash.message());
}

void BlobWaiter::Forget(const std::string& event_id) { first_seen_.erase(event_id); }

// ---- chunking and moving ----------------------------------------------------------------------

Status ForEachChunk(const std::string& path, std::uint64_t size,
                    const std::function<Status(std::uint64_t, std::string&)>& piece) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::Error(Errno("cannot open", path));
  std::uint64_t offset = 0;
  Status result;
  while (offset < size && result) {
    std::string buf(
        static_cast<std::size_t>(std::min<std::uint64_t>(kMaxChunkBytes, size - offset)), '\0');
    std::size_t got = 0;
    while (got < buf.size()) {
      ssize_t n = ::pread(fd, buf.data() + got, buf.size() - got, static_cast<off_t>(offset + got));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      got += static_cast<std::size_t>(n);
    }
    if (got != buf.size()) {
      result =
          Status::Error("cannot read '" + path + "' at offset " + std::to_string(offset + got) +
                        ": " + (errno ? std::strerror(errno) : "file is shorter than expected"));
      break;
    }
    result = piece(offset, buf);
    offset += got;
  }
  ::close(fd);
  return result;
}

Status MoveBlob(const std::string& spool_path, const std::string& target) {
  const std::string dir = fs::path(target).parent_path().string();
  bool created = false;
  if (Status s = MakeDirs(dir, &created); !s) return s;
  if (created) {
    if (Status s = SyncDir(fs::path(dir).parent_path().string()); !s) return s;
  }
  if (::rename(spool_path.c_str(), target.c_str()) == 0) return SyncDir(dir);
  if (errno != EXDEV) return Status::Error(Errno("cannot move '" + spool_path + "' to", target));
  // Another file system: copy, sync, then put in place.
  const std::string tmp = target + ".tmp";
  int in = ::open(spool_path.c_str(), O_RDONLY | O_CLOEXEC);
  if (in < 0) return Status::Error(Errno("cannot open", spool_path));
  int out = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (out < 0) {
    Status s = Status::Error(Errno("cannot create", tmp));
    ::close(in);
    return s;
  }
  std::string buf(kMaxChunkBytes, '\0');
  Status result;
  while (result) {
    ssize_t n = ::read(in, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      result = Status::Error(Errno("cannot read", spool_path));
      break;
    }
    if (n == 0) break;
    std::size_t done = 0;
    while (done < static_cast<std::size_t>(n)) {
      ssize_t w = ::write(out, buf.data() + done, static_cast<std::size_t>(n) - done);
      if (w < 0 && errno == EINTR) continue;
      if (w < 0) {
        result = Status::Error(Errno("cannot write", tmp));
        break;
      }
      done += static_cast<std::size_t>(w);
    }
  }
  if (result && ::fsync(out) != 0) result = Status::Error(Errno("cannot sync", tmp));
  ::close(in);
  ::close(out);
  if (result && ::rename(tmp.c_str(), target.c_str()) != 0)
    result = Status::Error(Errno("cannot rename '" + tmp + "' to", target));
  if (!result) {
    ::unlink(tmp.c_str());
    return result;
  }
  if (Status s = SyncDir(dir); !s) return s;
  ::unlink(spool_path.c_str());
  return Status::Ok();
}

std::size_t CollectSpool(const std::string& dir, std::chrono::milliseconds ttl) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return 0;
  const auto cutoff = fs::file_time_type::clock::now() - ttl;
  std::size_t removed = 0;
  std::vector<fs::path> dirs;
  for (auto it = fs::recursive_directory_iterator(dir, ec); !ec && it != fs::end(it);
       it.increment(ec)) {
    std::error_code e2;
    if (it->is_directory(e2)) {
      dirs.push_back(it->path());
      continue;
    }
    if (!it->is_regular_file(e2)) continue;
    auto mtime = fs::last_write_time(it->path(), e2);
    if (!e2 && mtime < cutoff && fs::remove(it->path(), e2)) ++removed;
  }
  // Deepest first, so a directory emptied by removing its children goes too.
  for (auto d = dirs.rbegin(); d != dirs.rend(); ++d) {
    std::error_code e2;
    if (fs::is_empty(*d, e2) && !e2) fs::remove(*d, e2);
  }
  return removed;
}

}  // namespace relay
