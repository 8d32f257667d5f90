// Daemon::Impl, sneakernet bundles: export and import of bundle, ack and resend-request
// files (see docs/sneakernet.md). See relay/daemon_impl.h.

#include "relay/daemon_impl.h"

#include <fcntl.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include <simdjson.h>

#include "crypto/bundle.h"
#include "relay/json.h"
#include "relay/log.h"

namespace relay {

using daemon_detail::AcceptedKey;
using daemon_detail::ExportedKey;
using daemon_detail::kForeverMs;
using daemon_detail::NowMs;
using daemon_detail::RangesKey;

void Daemon::Impl::BundleRequest(const std::string& path, std::string body,
                                 const HttpResponder& respond) {
  std::lock_guard<std::mutex> lock(bundle_mu);
  bundle_threads.emplace_back([this, path, body = std::move(body), respond] {
    pthread_setname_np(pthread_self(), "relay-bundle");
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
    auto r = Export(o);
    if (!r) {
      respond({400, "application/json", JsonError(r.message())});
      return;
    }
    respond({200, "application/json", ExportReportJson(*r)});
  });
}

std::optional<std::size_t> Daemon::Impl::PeerByName(const std::string& name) const {
  for (std::size_t i = 0; i < peers.size(); ++i)
    if (peers[i].name == name) return i;
  return std::nullopt;
}

Status Daemon::Impl::WriteAtomically(const std::string& dir, const std::string& name,
                                     const std::string& bytes) {
  std::string tmp = dir + "/.tmp-" + RandomHex(8) + "-" + name, final_path = dir + "/" + name;
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0640);
  if (fd < 0)
    return Status::Error("cannot create '" + log::Printable(tmp) + "': " + std::strerror(errno));
  std::size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      Status st = Status::Error("cannot write '" + tmp + "': " + std::strerror(errno));
      ::close(fd);
      ::unlink(tmp.c_str());
      return st;
    }
    done += static_cast<std::size_t>(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    ::unlink(tmp.c_str());
    return Status::Error("cannot sync '" + tmp + "': " + std::strerror(errno));
  }
  if (::rename(tmp.c_str(), final_path.c_str()) != 0) {
    ::unlink(tmp.c_str());
    return Status::Error("cannot rename to '" + final_path + "': " + std::strerror(errno));
  }
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  return Status::Ok();
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
    if (Status s = WriteAtomically(o.out_dir, name, bytes); !s) return s;
    report.files.push_back(o.out_dir + "/" + name);
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
    if (Status s = WriteAtomically(o.out_dir, name, bytes); !s) return s;
    report.files.push_back(o.out_dir + "/" + name);
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
  std::uint64_t exported = store->GetCounter(ExportedKey(p.name), 0);
  std::uint64_t first = (o.all ? acked : std::max(acked, exported)) + 1;
  std::uint64_t head = published.load();
  std::vector<std::string> frames;
  std::uint64_t body_bytes = 4;  // the bundle body so far: frame count, then length + frame each
  int part = 0;
  auto flush = [&]() -> Status {
    if (frames.empty()) return Status::Ok();
    std::string bytes = crypto::SealBundle(*key, p.identity, frames, now, expires);
    std::string name = BundleName(p.name, ".bundle", now, ++part);
    if (Status s = WriteAtomically(o.out_dir, name, bytes); !s) return s;
    report.files.push_back(o.out_dir + "/" + name);
    report.bytes += bytes.size();
    if (o.progress) o.progress(report.files.back(), report.events, report.bytes);
    frames.clear();
    body_bytes = 4;
    return Status::Ok();
  };
  std::uint64_t pos = first;
  while (pos <= head) {
    auto built = BuildFrame(*idx, pos, pos, head);
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
  queue::WriteBatch b;
  b.PutCounter(ExportedKey(p.name), std::max(exported, pos - 1));
  if (Status s = store->Commit(b, true); !s) return s;
  return report;
}

std::vector<ImportResult> Daemon::Impl::Import(const std::vector<std::string>& paths) {
  std::vector<std::string> files;
  std::vector<ImportResult> results;
  for (const std::string& path : paths) {
    std::error_code ec;
    if (std::filesystem::is_directory(path, ec)) {
      std::vector<std::string> found;
      for (const auto& entry : std::filesystem::directory_iterator(path, ec)) {
        std::string name = entry.path().filename().string();
        if (name.rfind(".tmp-", 0) == 0) continue;  // an export still being written
        std::string ext = entry.path().extension().string();
        if (entry.is_regular_file() && (ext == ".bundle" || ext == ".ack" || ext == ".resend"))
          found.push_back(entry.path().string());
      }
      if (ec) results.push_back({path, false, "cannot read folder: " + ec.message(), 0});
      std::sort(found.begin(), found.end());
      files.insert(files.end(), found.begin(), found.end());
    } else {
      files.push_back(path);
    }
  }
  for (const std::string& f : files) results.push_back(ImportOne(f));
  return results;
}

Status Daemon::Impl::ReadBundleFile(const std::string& path, std::string* bytes) {
  constexpr std::uint64_t kMaxFile = 112 + (std::uint64_t{1} << 32) + 64;  // header, body, sig
  int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
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
  bytes->resize(static_cast<std::size_t>(st.st_size));
  std::size_t done = 0;
  while (done < bytes->size()) {
    ssize_t n = ::read(fd, bytes->data() + done, bytes->size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    done += static_cast<std::size_t>(n);
  }
  ::close(fd);
  bytes->resize(done);  // a file that shrank while read is judged by what was read
  return Status::Ok();
}

ImportResult Daemon::Impl::ImportOne(const std::string& path) {
  ImportResult r{path, false, "", 0};
  std::string bytes;
  if (Status s = ReadBundleFile(path, &bytes); !s) {
    r.message = s.message();
    return r;
  }
  std::optional<std::size_t> expired;
  const auto wall = std::chrono::system_clock::now();
  auto lookup = [&](const crypto::PublicKey& pk) { return LookupPeer(pk, wall, &expired); };
  std::int64_t now = NowMs();
  crypto::BundleResult opened = crypto::OpenBundle(*key, lookup, bytes, now);
  if (!opened.ok() && previous_key &&
      opened.rejection.reason == crypto::RejectReason::kWrongRecipient) {
    crypto::BundleResult old = crypto::OpenBundle(*previous_key, lookup, bytes, now);
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
    OnAck(p, b.ack_through);
    if (b.header.kind == crypto::BundleKind::kResend) QueueResend(p, b.ack_through, b.ranges);
    queue::WriteBatch wb;
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
  BundleImport import;
  import.bundle_key = bundle_key;
  for (const std::string& frame : b.frames) import.frames.push_back({p, frame});
  std::uint64_t before = peers[p].metrics->events_received.load();
  Status s = ImportFrames(import);
  if (!s) {
    r.message = "bundle refused, nothing imported: " + s.message();
    return r;
  }
  r.ok = true;
  r.events = peers[p].metrics->events_received.load() - before;
  r.message = "imported " + std::to_string(r.events) + " new event(s) from '" + peers[p].name +
              "' (" + std::to_string(b.frames.size()) + " frame(s))";
  return r;
}

}  // namespace relay
