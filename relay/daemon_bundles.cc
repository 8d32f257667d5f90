// Daemon::Impl, sneakernet bundles: export and import of bundle, ack and resend-request
// files (see docs/sneakernet.md). See relay/daemon_impl.h.

#include "relay/daemon_impl.h"

#include <fcntl.h>
#include <malloc.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include <simdjson.h>

#include "base/json.h"
#include "base/log.h"
#include "crypto/bundle.h"

namespace relay {

using daemon_detail::AcceptedKey;
using daemon_detail::ExportedKey;
using daemon_detail::kBundleWaiting;
using daemon_detail::kBundleWorkers;
using daemon_detail::kForeverMs;
using daemon_detail::NowMs;
using daemon_detail::RangesKey;

void Daemon::Impl::BundleRequest(const std::string& path, std::string body,
                                 const HttpResponder& respond) {
  auto job = [this, path, body = std::move(body), respond] {
    ServeBundleRequest(path, body, respond);
  };
  if (bundle_pool && bundle_pool->TrySubmit(std::move(job))) return;
  ++metrics.api_refused[static_cast<std::size_t>(ApiRefusal::kBundleBusy)];
  HttpResponse busy{
      429, "application/json",
      JsonError("relay is busy with other bundle requests (" + std::to_string(kBundleWorkers) +
                " at work and " + std::to_string(kBundleWaiting) + " waiting); retry later")};
  busy.retry_after_s = 1;
  respond(std::move(busy));
}

void Daemon::Impl::ServeBundleRequest(const std::string& path, const std::string& body,
                                      const HttpResponder& respond) {
  simdjson::dom::parser parser;
  simdjson::dom::element doc;
  if (parser.parse(body).get(doc) || doc.type() != simdjson::dom::element_type::OBJECT) {
    respond({400, "application/json", JsonError("body must be a JSON object")});
    return;
  }
  if (path == "/v1/bundles/import") {
    std::vector<std::string> paths;
    simdjson::dom::array list;
    if (doc["paths"].get(list)) {
      respond({400, "application/json", JsonError("missing field 'paths' (array of strings)")});
      return;
    }
    for (simdjson::dom::element e : list) {
      std::string_view v;
      if (e.get(v)) {
        respond({400, "application/json", JsonError("'paths' must hold strings")});
        return;
      }
      paths.emplace_back(v);
    }
    respond({200, "application/json", ImportResultsJson(Import(paths))});
    return;
  }
  ExportOptions o;
  std::string_view v;
  if (doc["peer"].get(v)) {
    respond({400, "application/json", JsonError("missing field 'peer'")});
    return;
  }
  o.peer = std::string(v);
  if (doc["out"].get(v)) {
    respond({400, "application/json", JsonError("missing field 'out'")});
    return;
  }
  o.out_dir = std::string(v);
  bool flag = false;
  if (!doc["all"].get(flag)) o.all = flag;
  if (!doc["ack"].get(flag)) o.ack = flag;
  if (!doc["resend"].get(flag)) o.resend = flag;
  std::uint64_t n = 0;
  if (!doc["max_bytes"].get(n)) o.max_bytes = n;
  std::int64_t ttl = 0;
  if (!doc["ttl_ms"].get(ttl)) o.ttl = std::chrono::milliseconds(ttl);
  // Checked here too (Export checks again) to answer 403 rather than 400.
  std::error_code ec;
  if (std::filesystem::is_directory(o.out_dir, ec)) {
    if (Result<std::string> folder = ResolveBundlePath(o.out_dir); !folder) {
      respond({403, "application/json", JsonError(folder.message())});
      return;
    }
  }
  auto r = Export(o);
  if (!r) {
    respond({400, "application/json", JsonError(r.message())});
    return;
  }
  respond({200, "application/json", ExportReportJson(*r)});
}

std::optional<std::size_t> Daemon::Impl::PeerByName(const std::string& name) const {
  for (std::size_t i = 0; i < peers.size(); ++i)
    if (peers[i].name == name) return i;
  return std::nullopt;
}

Status Daemon::Impl::WriteAtomically(int dir_fd, const std::string& dir, const std::string& name,
                                     const std::string& bytes) {
  const std::string tmp_name = ".tmp-" + RandomHex(8) + "-" + name;
  const std::string tmp = dir + "/" + tmp_name, final_path = dir + "/" + name;
  int fd = ::openat(dir_fd, tmp_name.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                    0640);
  if (fd < 0)
    return Status::Error("cannot create '" + log::Printable(tmp) + "': " + std::strerror(errno));
  std::size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      Status st = Status::Error("cannot write '" + tmp + "': " + std::strerror(errno));
      ::close(fd);
      ::unlinkat(dir_fd, tmp_name.c_str(), 0);
      return st;
    }
    done += static_cast<std::size_t>(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    ::unlinkat(dir_fd, tmp_name.c_str(), 0);
    return Status::Error("cannot sync '" + tmp + "': " + std::strerror(errno));
  }
  if (::renameat(dir_fd, tmp_name.c_str(), dir_fd, name.c_str()) != 0) {
    ::unlinkat(dir_fd, tmp_name.c_str(), 0);
    return Status::Error("cannot rename to '" + final_path + "': " + std::strerror(errno));
  }
  ::fsync(dir_fd);
  return Status::Ok();
}

std::vector<std::string> Daemon::Impl::BundleFolders() const {
  std::vector<std::string> out;
  for (const PeerRuntime& p : peers)
    if (!p.config->files_dir.empty()) out.push_back(p.config->files_dir);
  out.insert(out.end(), config.transfer_dirs.begin(), config.transfer_dirs.end());
  return out;
}

namespace {

std::optional<std::string> RealPath(const std::string& path) {
  char* real = ::realpath(path.c_str(), nullptr);
  if (real == nullptr) return std::nullopt;
  std::string out(real);
  std::free(real);
  return out;
}

bool SameOrInside(const std::string& path, const std::string& folder) {
  return path == folder || folder == "/" || path.starts_with(folder + "/");
}

// Closes a file descriptor when it goes out of scope.
struct FdCloser {
  int fd;
  ~FdCloser() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

Result<std::string> Daemon::Impl::ResolveBundlePath(const std::string& path) {
  const std::string shown = "'" + log::Printable(path) + "'";
  auto refuse = [&](const std::string& why) -> Result<std::string> {
    ++metrics.api_refused[static_cast<std::size_t>(ApiRefusal::kFolder)];
    return Status::Error(why);
  };
  std::optional<std::string> real = RealPath(path);
  if (!real) return Status::Error("cannot read " + shown + ": " + std::strerror(errno));
  std::error_code ec;
  const bool is_dir = std::filesystem::is_directory(*real, ec);
  const std::string folder = is_dir ? *real : std::filesystem::path(*real).parent_path().string();
  if (std::optional<std::string> data = RealPath(config.data_dir);
      data && SameOrInside(*real, *data))
    return refuse(shown + " is inside the site's data_dir ('" + *data +
                  "'): bundle files are never written to or read from the store's folder; use "
                  "a folder of [site] transfer_dirs or a peer's files_dir");
  const std::vector<std::string> folders = BundleFolders();
  std::string listed;
  for (const std::string& f : folders) {
    listed += (listed.empty() ? "" : ", ") + f;
    std::optional<std::string> allowed = RealPath(f);
    if (allowed && SameOrInside(*real, *allowed)) return *real;
  }
  return refuse(std::string(is_dir ? "folder " : "") + shown + " (resolved: '" +
                log::Printable(*real) +
                "') is not in a folder the configuration names for bundles" +
                (folders.empty() ? " (none is configured)" : " (" + log::Printable(listed) + ")") +
                ": add '" + log::Printable(folder) +
                "' to [site] transfer_dirs, or make it a peer's files_dir");
}

std::string Daemon::Impl::ExportCursorKey(std::size_t p, const std::string& folder) {
  const std::string& own = peers[p].config->files_dir;
  std::optional<std::string> own_real = own.empty() ? std::nullopt : RealPath(own);
  if (own_real && *own_real == folder) return ExportedKey(peers[p].name);
  return ExportedKey(peers[p].name) + "@" + folder;
}

std::string Daemon::Impl::BundleName(const std::string& peer, const char* ext, std::int64_t now,
                                     int part) {
  std::string stamp = FormatTimestampMs(now);  // 2026-11-26T04:05:35.489Z
  std::string compact;
  for (char c : stamp)
    if (std::isdigit(static_cast<unsigned char>(c))) compact.push_back(c);
  return config.site_name + "-to-" + peer + "-" + compact + "-" + std::to_string(part) + ext;
}

Result<ExportReport> Daemon::Impl::Export(const ExportOptions& o) {
  auto idx = PeerByName(o.peer);
  if (!idx)
    return Status::Error("unknown peer '" + o.peer + "' (no [peer." + o.peer + "] section)");
  std::error_code ec;
  if (!std::filesystem::is_directory(o.out_dir, ec))
    return Status::Error("output folder '" + o.out_dir + "' does not exist");
  Result<std::string> resolved = ResolveBundlePath(o.out_dir);
  if (!resolved) return resolved.status();
  const std::string& dir = *resolved;
  // Everything is written relative to this descriptor: a folder swapped for a symlink after the
  // check above cannot redirect the files (the resolved path has no symlink left to follow).
  FdCloser dir_fd{::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)};
  if (dir_fd.fd < 0)
    return Status::Error("cannot open output folder '" + dir + "': " + std::strerror(errno));
  if (RealPath("/proc/self/fd/" + std::to_string(dir_fd.fd)).value_or("") != dir)
    return Status::Error("output folder '" + dir + "' changed while it was checked: refused");
  std::lock_guard<std::mutex> export_lock(export_mu);
  std::int64_t now = NowMs();
  std::int64_t expires = o.ttl.count() > 0 ? now + o.ttl.count() : 0;
  const PeerRuntime& p = peers[*idx];
  ExportReport report;
  if (o.resend) {
    // What this site has from the peer (cursor + ranges beyond it): the peer sends the rest.
    std::uint64_t through = store->GetCounter(AcceptedKey(p.name), 0);
    auto ranges_map = DecodeRanges(store->GetDedup(RangesKey(p.name), now).value_or(""));
    std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges;
    for (const auto& [a, b] : ranges_map)
      if (a > through + 1 || b > through) ranges.emplace_back(std::max(a, through + 1), b);
    std::string bytes = crypto::SealResendRequest(*key, p.identity, through, ranges, now, expires);
    std::string name = BundleName(p.name, ".resend", now, 1);
    if (Status s = WriteAtomically(dir_fd.fd, dir, name, bytes); !s) return s;
    report.files.push_back(dir + "/" + name);
    report.bytes = bytes.size();
    report.note = "asks '" + p.name + "' to send again everything after " +
                  std::to_string(through) + " except " + std::to_string(ranges.size()) +
                  " range(s) already here";
    return report;
  }
  if (o.ack) {
    // What this site has stored from the peer: its accepted cursor (durable value).
    std::uint64_t through = store->GetCounter(AcceptedKey(p.name), 0);
    std::string bytes = crypto::SealAck(*key, p.identity, through, now, expires);
    std::string name = BundleName(p.name, ".ack", now, 1);
    if (Status s = WriteAtomically(dir_fd.fd, dir, name, bytes); !s) return s;
    report.files.push_back(dir + "/" + name);
    report.bytes = bytes.size();
    report.note =
        "acknowledges everything from '" + p.name + "' through " + std::to_string(through);
    return report;
  }
  if (o.max_bytes > crypto::kMaxBundleBodyBytes)
    return Status::Error("max_bytes " + std::to_string(o.max_bytes) +
                         " is more than one bundle can hold (" +
                         std::to_string(crypto::kMaxBundleBodyBytes) + " bytes, 4 GiB)");
  std::uint64_t acked;
  {
    std::lock_guard<std::mutex> lock(ship_mu);
    acked = p.acked;
  }
  const std::string cursor = ExportCursorKey(*idx, dir);
  std::uint64_t exported = store->GetCounter(cursor, 0);
  std::uint64_t first = (o.all ? acked : std::max(acked, exported)) + 1;
  std::uint64_t head = published.load();
  std::vector<std::string> frames;
  std::uint64_t body_bytes = 4;  // the bundle body so far: frame count, then length + frame each
  int part = 0;
  auto flush = [&]() -> Status {
    if (frames.empty()) return Status::Ok();
    std::string bytes = crypto::SealBundle(*key, p.identity, frames, now, expires);
    std::string name = BundleName(p.name, ".bundle", now, ++part);
    if (Status s = WriteAtomically(dir_fd.fd, dir, name, bytes); !s) return s;
    report.files.push_back(dir + "/" + name);
    report.bytes += bytes.size();
    if (o.progress) o.progress(report.files.back(), report.events, report.bytes);
    frames.clear();
    body_bytes = 4;
    return Status::Ok();
  };
  std::uint64_t pos = first;
  while (pos <= head) {
    // A frame adds 232 bytes to its payload, and its length and the count 8 to the body.
    auto built = BuildFrame(*idx, pos, pos, head, 0, o.max_bytes > 240 ? o.max_bytes - 240 : 1);
    if (!built) return built.status();
    if (built->count == 0) break;
    if (!frames.empty() && body_bytes + 4 + built->bytes.size() > o.max_bytes)
      if (Status s = flush(); !s) return s;
    report.events += built->count;
    body_bytes += 4 + built->bytes.size();
    frames.push_back(std::move(built->bytes));
    pos = built->last_seq + 1;
  }
  if (Status s = flush(); !s) return s;
  if (report.files.empty()) {
    report.note = "nothing to export for '" + p.name + "' (everything after " +
                  std::to_string(first - 1) +
                  " is acknowledged or exported; --all re-exports "
                  "what is not acknowledged)";
    return report;
  }
  queue::WriteBatch b(*store);
  b.PutCounter(cursor, std::max(exported, pos - 1));
  if (Status s = store->Commit(b, true); !s) return s;
  {
    std::lock_guard<std::mutex> lock(ship_mu);
    peers[*idx].sent_through = std::max(peers[*idx].sent_through, pos - 1);
  }
  return report;
}

std::vector<ImportResult> Daemon::Impl::Import(const std::vector<std::string>& paths) {
  struct File {
    std::string read;   // resolved: what is opened
    std::string shown;  // as the caller named it (a folder's entries: folder + "/" + name)
  };
  std::vector<File> files;
  std::vector<ImportResult> results;
  for (const std::string& path : paths) {
    Result<std::string> resolved = ResolveBundlePath(path);
    if (!resolved) {
      results.push_back({path, false, resolved.message(), 0});
      continue;
    }
    std::error_code ec;
    if (std::filesystem::is_directory(*resolved, ec)) {
      std::vector<File> found;
      const std::string shown_dir = path.ends_with("/") ? path.substr(0, path.size() - 1) : path;
      for (const auto& entry : std::filesystem::directory_iterator(*resolved, ec)) {
        std::string name = entry.path().filename().string();
        if (name.rfind(".tmp-", 0) == 0) continue;  // an export still being written
        std::string ext = entry.path().extension().string();
        // Plain files only: a symlink found in a folder is skipped (it could point anywhere;
        // name a file itself to import through a link, and its target must be in a folder
        // the configuration names).
        std::error_code type_ec;
        if (entry.symlink_status(type_ec).type() == std::filesystem::file_type::regular &&
            (ext == ".bundle" || ext == ".ack" || ext == ".resend"))
          found.push_back({entry.path().string(), shown_dir + "/" + name});
      }
      if (ec) results.push_back({path, false, "cannot read folder: " + ec.message(), 0});
      std::sort(found.begin(), found.end(),
                [](const File& a, const File& b) { return a.read < b.read; });
      files.insert(files.end(), found.begin(), found.end());
    } else {
      files.push_back({*resolved, path});
    }
  }
  for (const File& f : files) {
    ImportResult r = ImportOne(f.read);
    r.path = f.shown;
    results.push_back(std::move(r));
  }
  return results;
}

namespace {

// A bundle file read with pread: memory stays flat whatever its size (a 4 GiB bundle, or a
// sparse file made to look like one).
class FileSource : public crypto::BundleSource {
 public:
  FileSource(int fd, std::uint64_t size) : fd_(fd), size_(size) {}
  ~FileSource() override { ::close(fd_); }
  FileSource(const FileSource&) = delete;
  FileSource& operator=(const FileSource&) = delete;
  std::uint64_t size() const override { return size_; }
  Status Read(std::uint64_t offset, std::size_t len, std::string* out) override {
    out->resize(len);
    std::size_t done = 0;
    while (done < len) {
      ssize_t n = ::pread(fd_, out->data() + done, len - done, static_cast<off_t>(offset + done));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return Status::Error(std::string("read failed: ") + std::strerror(errno));
      if (n == 0) return Status::Error("the file shrank while it was read");
      done += static_cast<std::size_t>(n);
    }
    return Status::Ok();
  }

 private:
  int fd_;
  std::uint64_t size_;
};

// Frames of a bundle are handed to the inbound thread in slices of about this many bytes (at
// least one frame; one at the default max_frame_bytes): an import holds one slice at a time,
// not the bundle, and the inbound thread a few copies of it (opened, encoded for the store).
constexpr std::uint64_t kImportSliceBytes = 4u << 20;

}  // namespace

Result<std::unique_ptr<crypto::BundleSource>> Daemon::Impl::OpenBundleFile(
    const std::string& path) {
  constexpr std::uint64_t kMaxFile = 112 + (std::uint64_t{1} << 32) + 64;  // header, body, sig
  // O_NOFOLLOW: the path was resolved; a symlink swapped in at its end since is not followed.
  int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return Status::Error(std::string("cannot read: ") + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return Status::Error("not a regular file (FIFO, device or folder): refused");
  }
  if (static_cast<std::uint64_t>(st.st_size) > kMaxFile) {
    ::close(fd);
    return Status::Error("file of " + std::to_string(st.st_size) +
                         " bytes is larger than any bundle can be: refused");
  }
  return std::unique_ptr<crypto::BundleSource>(
      new FileSource(fd, static_cast<std::uint64_t>(st.st_size)));
}

ImportResult Daemon::Impl::ImportOne(const std::string& path) {
  ImportResult r{path, false, "", 0};
  auto file = OpenBundleFile(path);
  if (!file) {
    r.message = file.message();
    return r;
  }
  crypto::BundleSource& source = **file;
  std::optional<std::size_t> expired;
  const auto wall = std::chrono::system_clock::now();
  auto lookup = [&](const crypto::PublicKey& pk) { return LookupPeer(pk, wall, &expired); };
  std::int64_t now = NowMs();
  crypto::BundleResult opened = crypto::OpenBundleFrom(*key, lookup, source, now);
  if (!opened.ok() && previous_key &&
      opened.rejection.reason == crypto::RejectReason::kWrongRecipient) {
    crypto::BundleResult old = crypto::OpenBundleFrom(*previous_key, lookup, source, now);
    if (old.ok() || old.rejection.reason != crypto::RejectReason::kWrongRecipient)
      opened = std::move(old);
  }
  if (!opened.ok()) {
    if (expired && opened.rejection.reason == crypto::RejectReason::kUnknownSender) {
      r.message = RejectPreviousKeyExpired(*expired, "bundle");
      return r;
    }
    if (opened.expired) {
      ++metrics.bundles_expired;
    } else {
      ++metrics.frames_rejected[static_cast<std::size_t>(opened.rejection.reason)];
    }
    r.message = opened.rejection.message;
    return r;
  }
  const crypto::Bundle& b = *opened.bundle;
  std::string bundle_key = "b:" + crypto::BundleIdHex(b.header.id);
  if (store->GetDedup(bundle_key, now)) {
    r.ok = true;
    r.message = "already imported; nothing applied again";
    return r;
  }
  std::size_t p = *PeerBySignKey(b.header.sender);
  if (b.header.kind == crypto::BundleKind::kAck || b.header.kind == crypto::BundleKind::kResend) {
    const bool previous = b.header.sender != peers[p].identity.sign_pk;
    if (Status acked = AcceptAck(p, b.ack_through, previous); !acked) {
      r.message = "refused: " + acked.message();  // nothing recorded: it may be imported later
      return r;
    }
    if (b.header.kind == crypto::BundleKind::kResend) QueueResend(p, b.ack_through, b.ranges);
    queue::WriteBatch wb(*store);
    wb.PutDedup(bundle_key, now + kForeverMs, std::to_string(now));
    if (Status s = store->Commit(wb, true); !s) {
      r.message = s.message();
      return r;
    }
    r.ok = true;
    r.message = "peer '" + peers[p].name + "' acknowledges everything through " +
                std::to_string(b.ack_through);
    return r;
  }
  // The bundle's signature covers every byte, so its frames are as the peer wrote them; they
  // are stored slice by slice (each verified frame by frame, all-or-nothing within its slice),
  // and the bundle is marked imported with the last one. A frame that does not open stops the
  // import there: the slices before stay (their frames verified; importing the bundle again
  // takes up where it stopped, each event once).
  std::uint64_t before = peers[p].metrics->events_received.load();
  std::uint64_t frames = 0, stored_frames = 0;
  Status imported;
  auto import = std::make_unique<BundleImport>();
  std::uint64_t slice_bytes = 0;
  auto flush = [&](bool last) -> Status {
    if (last) import->bundle_key = bundle_key;
    const std::size_t n = import->frames.size();
    Status s = ImportFrames(*import);
    if (s) stored_frames += n;
    import = std::make_unique<BundleImport>();
    // The slice's copies were large blocks that the threads' heaps keep for reuse, in pieces
    // that the next slice's blocks do not fit: handing the free pages back after each slice
    // takes about 8 MiB off a 1 GiB import's peak RSS growth (50 -> 42 MiB), for a walk of the
    // heaps per 4 MiB. (A fixed mmap threshold did better, 27-32 MiB, but made every large
    // block of the link's path fault in fresh pages: a quarter of the end-to-end throughput.)
    (void)::malloc_trim(0);
    slice_bytes = 0;
    return s;
  };
  Status walk = crypto::ForEachBundleFrame(
      source, [&](std::uint64_t, std::uint64_t offset, std::uint32_t len) -> Status {
        if (slice_bytes > 0 && slice_bytes + len > kImportSliceBytes)
          if (Status s = flush(false); !s) return imported = s;
        std::string frame;
        if (Status s = source.Read(offset, len, &frame); !s) return s;
        import->frames.push_back({p, std::move(frame)});
        slice_bytes += len;
        ++frames;
        return Status::Ok();
      });
  if (walk && imported) walk = imported = flush(true);
  r.events = peers[p].metrics->events_received.load() - before;
  if (!walk) {
    r.message = stored_frames == 0
                    ? "bundle refused, nothing imported: " + walk.message()
                    : "bundle refused after its first " + std::to_string(stored_frames) +
                          " frame(s) (" + std::to_string(r.events) +
                          " new event(s)) were imported: " + walk.message() +
                          "; importing it again takes up from there";
    return r;
  }
  r.ok = true;
  r.message = "imported " + std::to_string(r.events) + " new event(s) from '" + peers[p].name +
              "' (" + std::to_string(frames) + " frame(s))";
  return r;
}

}  // namespace relay
