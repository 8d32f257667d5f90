// relay_bench: the performance targets of docs/design.md ("Performance targets"), measured.
//
// One run prints, on this machine:
//   1. raw limits -- libsodium XChaCha20-Poly1305 MB/s on 64 KiB buffers; RocksDB synced
//      WriteBatch commits/s (one 1 KiB entry, and 1000 x 1 KiB entries per batch) on the disk
//      holding the temporary folder;
//   2. end-to-end throughput -- two real `relay` daemons on loopback (europe dials aws,
//      durability on), client threads posting batches to europe's ingest API while this process
//      tails aws's JSONL sink until every message has arrived;
//   3. latency at a steady open-loop rate -- one message per request, sent at scheduled times,
//      ingest -> line observed in aws's sink;
//   4. PASS/MISS against the targets, and one "RESULT {json}" line with every figure.
//
// The daemons are the real binary (--relay, $RELAY_BIN, or the one built next to this bench),
// each in its own folder under a temporary directory that is removed at the end (--keep keeps
// it). Children are stopped with SIGTERM, then SIGKILL after 10 s, on every path; they also get
// PR_SET_PDEATHSIG so that even a SIGKILLed bench leaves nothing running.
//
// Exit status: 0 when every message arrived exactly once (timings never fail the run), 1 when a
// message is missing or duplicated or a phase could not run, 2 for bad arguments.

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sodium.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "crypto/identity.h"
#include "queue/store.h"
#include "relay/http_server.h"
#include "relay/status.h"

#ifndef RELAY_DEFAULT_BIN
#define RELAY_DEFAULT_BIN "relay"
#endif

namespace relay::bench {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

// Targets from docs/design.md.
constexpr double kTargetMessagesPerSecond = 100000;
constexpr double kTargetP99Ms = 20;

constexpr std::size_t kTextBytes = 1024;                  // payload of one message ("1 KiB text")
constexpr double kMB = 1e6;                               // MB = 10^6 bytes throughout
constexpr auto kStallTimeout = std::chrono::seconds(60);  // no progress at all: give up
constexpr auto kStopGrace = std::chrono::seconds(10);     // SIGTERM, then SIGKILL
constexpr char kChannel[] = "war-room";

// Set by SIGINT/SIGTERM/SIGHUP: every loop gives up and the cleanup runs.
std::atomic<bool> g_interrupted{false};
void OnSignal(int) { g_interrupted.store(true); }

std::int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
      .count();
}
double SecondsSince(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

struct Options {
  std::uint64_t messages = 200000;
  int clients = 4;
  int batch = 500;
  double rate = 1000;
  double seconds = 10;
  bool keep = false;
  bool quick = false;
  std::string relay_bin;
  // Durations of the raw-limit loops (shortened by --quick).
  double aead_seconds = 1.0;
  double commit_seconds = 2.0;
};

// ---- small helpers ---------------------------------------------------------------------------

// A 1 KiB message text: `tag`, a 10-digit index, then filler. Printable ASCII without quotes or
// backslashes, so the JSON string needs no escaping and reads back verbatim from the sink.
void AppendText(std::string* out, std::string_view tag, std::uint64_t index) {
  static constexpr char kFiller[] =
      "the quick brown fox jumps over the lazy dog while the war room waits for news ";
  char head[64];
  int n = std::snprintf(head, sizeof head, "%.*s %010llu ", static_cast<int>(tag.size()),
                        tag.data(), static_cast<unsigned long long>(index));
  std::size_t start = out->size();
  out->append(head, static_cast<std::size_t>(n));
  while (out->size() - start < kTextBytes) {
    std::size_t want = kTextBytes - (out->size() - start);
    out->append(kFiller, std::min(want, sizeof kFiller - 1));
  }
}

void AppendMessage(std::string* body, std::string_view tag, std::uint64_t index) {
  body->append("{\"channel\":\"");
  body->append(kChannel);
  body->append("\",\"author\":\"bench\",\"text\":\"");
  AppendText(body, tag, index);
  body->append("\"}");
}

// Parses the index out of a sink line whose text was made by AppendText(tag).
std::optional<std::uint64_t> IndexInLine(std::string_view line, std::string_view tag) {
  std::string needle = "\"text\":\"" + std::string(tag) + " ";
  std::size_t pos = line.find(needle);
  if (pos == std::string_view::npos) return std::nullopt;
  pos += needle.size();
  if (pos + 10 > line.size()) return std::nullopt;
  std::uint64_t v = 0;
  for (std::size_t i = pos; i < pos + 10; ++i) {
    if (line[i] < '0' || line[i] > '9') return std::nullopt;
    v = v * 10 + static_cast<std::uint64_t>(line[i] - '0');
  }
  return v;
}

std::uint16_t FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return 0;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  std::uint16_t port = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0)
    port = ntohs(a.sin_port);
  close(fd);
  return port;
}

// The command name and user + system CPU seconds in a /proc/.../stat file; nullopt when it
// cannot be read (e.g. the thread has exited).
struct StatCpu {
  std::string comm;
  double seconds = 0;
};
std::optional<StatCpu> ReadStatCpu(const fs::path& path) {
  std::ifstream in(path);
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::size_t open_paren = stat.find('('), close_paren = stat.rfind(')');
  if (open_paren == std::string::npos || close_paren == std::string::npos) return std::nullopt;
  // Fields after "pid (comm) ": 3 state ... 14 utime, 15 stime.
  std::vector<std::string> fields;
  std::size_t pos = close_paren + 2;
  while (pos < stat.size() && fields.size() < 13) {
    std::size_t sp = stat.find(' ', pos);
    if (sp == std::string::npos) sp = stat.size();
    fields.push_back(stat.substr(pos, sp - pos));
    pos = sp + 1;
  }
  if (fields.size() < 13) return std::nullopt;
  double ticks =
      std::strtod(fields[11].c_str(), nullptr) + std::strtod(fields[12].c_str(), nullptr);
  return StatCpu{stat.substr(open_paren + 1, close_paren - open_paren - 1),
                 ticks / static_cast<double>(sysconf(_SC_CLK_TCK))};
}

// CPU seconds of a process, all its threads together.
double CpuSeconds(pid_t pid) {
  auto s = ReadStatCpu(fs::path("/proc") / std::to_string(pid) / "stat");
  return s ? s->seconds : 0;
}

// CPU seconds of each thread of a process, by thread id.
using ThreadCpu = std::map<std::string, StatCpu>;
ThreadCpu ThreadCpuSeconds(pid_t pid) {
  ThreadCpu out;
  std::error_code ec;
  for (const auto& task :
       fs::directory_iterator(fs::path("/proc") / std::to_string(pid) / "task", ec)) {
    if (auto s = ReadStatCpu(task.path() / "stat")) out[task.path().filename().string()] = *s;
  }
  return out;
}

// "comm/tid 0.93, ..." for the busiest threads between two snapshots: CPU seconds per wall
// second, so ~1.00 is a thread that kept one core busy the whole time.
std::string BusiestThreads(const ThreadCpu& before, const ThreadCpu& after, double wall_seconds,
                           std::size_t max_threads) {
  std::vector<std::pair<double, std::string>> used;
  for (const auto& [tid, s] : after) {
    auto b = before.find(tid);
    double cpu = s.seconds - (b == before.end() ? 0 : b->second.seconds);
    if (cpu > 0) used.emplace_back(cpu / wall_seconds, s.comm + "/" + tid);
  }
  std::sort(used.rbegin(), used.rend());
  std::string out;
  char buf[32];
  for (std::size_t i = 0; i < used.size() && i < max_threads; ++i) {
    std::snprintf(buf, sizeof buf, " %.2f", used[i].first);
    out += (i ? ", " : "") + used[i].second + buf;
  }
  return out.empty() ? "(none measurable)" : out;
}

std::vector<std::string> TailOfFile(const fs::path& p, std::size_t max_lines) {
  std::vector<std::string> lines;
  std::ifstream in(p);
  std::string line;
  while (std::getline(in, line)) {
    lines.push_back(line);
    if (lines.size() > max_lines) lines.erase(lines.begin());
  }
  return lines;
}

// Nearest-rank percentile of sorted values.
double Percentile(const std::vector<double>& sorted, double q) {
  if (sorted.empty()) return 0;
  auto rank = static_cast<std::size_t>(std::ceil(q * static_cast<double>(sorted.size())));
  return sorted[std::clamp<std::size_t>(rank, 1, sorted.size()) - 1];
}

// First error reported by any worker thread; once set, every worker stops.
class Failure {
 public:
  void Set(const std::string& message) {
    std::lock_guard<std::mutex> lock(mu_);
    if (message_.empty()) message_ = message;
    failed_.store(true);
  }
  bool failed() const { return failed_.load() || g_interrupted.load(); }
  std::string message() const {
    std::lock_guard<std::mutex> lock(mu_);
    if (!message_.empty()) return message_;
    return g_interrupted.load() ? "interrupted" : "";
  }

 private:
  mutable std::mutex mu_;
  std::string message_;
  std::atomic<bool> failed_{false};
};

// Threads of one phase. Leaving the scope early (an error return) marks the phase failed so
// that the threads give up, then joins them: no thread outlives its phase.
class ThreadGroup {
 public:
  explicit ThreadGroup(Failure* failure) : failure_(failure) {}
  ~ThreadGroup() {
    if (!threads_.empty()) failure_->Set("stopped");
    JoinAll();
  }
  ThreadGroup(const ThreadGroup&) = delete;
  ThreadGroup& operator=(const ThreadGroup&) = delete;
  template <typename F>
  void Start(F f) {
    threads_.emplace_back(std::move(f));
  }
  void JoinAll() {
    for (auto& t : threads_) t.join();
    threads_.clear();
  }

 private:
  Failure* failure_;
  std::vector<std::thread> threads_;
};

// Timer slack is per thread (50 us by default): make sleeps in the timing threads precise.
void PreciseSleeps() { prctl(PR_SET_TIMERSLACK, 1UL); }

// ---- tailing a JSONL sink ------------------------------------------------------------------

// Follows a file that another process appends to, from a given offset, without re-reading it.
// Not thread-safe; one reader.
class SinkTail {
 public:
  ~SinkTail() {
    if (fd_ >= 0) close(fd_);
  }
  Status Open(const fs::path& path) {
    fd_ = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0)
      return Status::Error("cannot open sink '" + path.string() + "': " + std::strerror(errno));
    return Status::Ok();
  }
  // Reads what was appended since the last call and returns how many complete lines it held.
  // With `on_line`, each complete line (without its newline) is passed to it.
  Result<std::uint64_t> ReadNew(const std::function<void(std::string_view)>& on_line = nullptr) {
    std::uint64_t lines = 0;
    while (true) {
      ssize_t n = read(fd_, buffer_.data(), buffer_.size());
      if (n < 0) {
        if (errno == EINTR) continue;
        return Status::Error(std::string("reading sink: ") + std::strerror(errno));
      }
      if (n == 0) return lines;
      std::string_view chunk(buffer_.data(), static_cast<std::size_t>(n));
      if (!on_line) {
        lines += static_cast<std::uint64_t>(std::count(chunk.begin(), chunk.end(), '\n'));
        continue;
      }
      while (!chunk.empty()) {
        std::size_t nl = chunk.find('\n');
        if (nl == std::string_view::npos) {
          partial_.append(chunk);
          break;
        }
        if (partial_.empty()) {
          on_line(chunk.substr(0, nl));
        } else {
          partial_.append(chunk.substr(0, nl));
          on_line(partial_);
          partial_.clear();
        }
        ++lines;
        chunk.remove_prefix(nl + 1);
      }
      if (static_cast<std::size_t>(n) < buffer_.size()) return lines;
    }
  }

 private:
  int fd_ = -1;
  std::vector<char> buffer_ = std::vector<char>(1u << 20);
  std::string partial_;
};

// ---- two relay sites on loopback -----------------------------------------------------------

struct Site {
  std::string name;
  fs::path dir;
  std::uint16_t ingest_port = 0, zmq_port = 0;
  std::string identity;
  pid_t pid = -1;
  fs::path conf() const { return dir / (name + ".conf"); }
  fs::path key() const { return dir / (name + ".key"); }
  fs::path sink() const { return dir / "war-room.jsonl"; }
  fs::path log() const { return dir / "relay.log"; }
};

// europe and aws as separate `relay run` processes in `dir`; europe dials aws over ZeroMQ and
// both bridge channel war-room into a JSONL sink. Durability settings are the defaults (on).
// The destructor stops both processes.
class SitePair {
 public:
  SitePair(fs::path dir, std::string relay_bin) : bin_(std::move(relay_bin)) {
    europe_.name = "europe";
    europe_.dir = dir / "europe";
    aws_.name = "aws";
    aws_.dir = dir / "aws";
  }
  ~SitePair() { Stop(); }
  SitePair(const SitePair&) = delete;
  SitePair& operator=(const SitePair&) = delete;

  // Generates keys and configs, starts both daemons and waits until each answers /healthz and
  // europe reports its link to aws up.
  Status Start() {
    for (Site* s : {&europe_, &aws_}) {
      std::error_code ec;
      fs::create_directories(s->dir, ec);
      if (ec) return Status::Error("cannot create '" + s->dir.string() + "': " + ec.message());
      s->ingest_port = FreePort();
      s->zmq_port = FreePort();
      if (s->ingest_port == 0 || s->zmq_port == 0)
        return Status::Error("cannot find a free loopback port");
      if (Status st = crypto::SiteKey::CreateFile(s->key().string()); !st) return st;
      auto key = crypto::SiteKey::LoadFile(s->key().string());
      if (!key) return key.status();
      s->identity = key->identity().ToString();
    }
    if (Status s = WriteConfig(europe_, aws_, /*dial=*/true); !s) return s;
    if (Status s = WriteConfig(aws_, europe_, /*dial=*/false); !s) return s;
    for (Site* s : {&aws_, &europe_}) {
      if (Status st = Spawn(*s); !st) return st;
      if (Status st = WaitHealthy(*s); !st) return st;
    }
    return WaitLinkUp();
  }

  // SIGTERM to both, SIGKILL to whichever has not exited after kStopGrace. Idempotent.
  void Stop() {
    for (Site* s : {&europe_, &aws_})
      if (s->pid > 0) kill(s->pid, SIGTERM);
    auto deadline = Clock::now() + kStopGrace;
    for (Site* s : {&europe_, &aws_}) {
      while (s->pid > 0) {
        int status = 0;
        pid_t r = waitpid(s->pid, &status, WNOHANG);
        if (r == s->pid || (r < 0 && errno == ECHILD)) {
          s->pid = -1;
        } else if (Clock::now() >= deadline) {
          std::fprintf(stderr, "relay_bench: site '%s' ignored SIGTERM for %lld s: SIGKILL\n",
                       s->name.c_str(), static_cast<long long>(kStopGrace.count()));
          kill(s->pid, SIGKILL);
          waitpid(s->pid, &status, 0);
          s->pid = -1;
        } else {
          std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
      }
    }
  }

  // An error naming a site that exited on its own, with the end of its log.
  Status CheckAlive() {
    for (Site* s : {&europe_, &aws_}) {
      int status = 0;
      if (s->pid > 0 && waitpid(s->pid, &status, WNOHANG) == s->pid) {
        s->pid = -1;
        std::string how = WIFSIGNALED(status)
                              ? "was killed by signal " + std::to_string(WTERMSIG(status))
                              : "exited with status " + std::to_string(WEXITSTATUS(status));
        return Status::Error("site '" + s->name + "' " + how + LogNote(*s));
      }
    }
    return Status::Ok();
  }

  // The end of both logs, for failure reports.
  std::string Logs() const { return LogNote(europe_) + LogNote(aws_); }

  const Site& europe() const { return europe_; }
  const Site& aws() const { return aws_; }

 private:
  static Status WriteConfig(const Site& self, const Site& peer, bool dial) {
    std::ofstream f(self.conf());
    f << "# relay_bench site '" << self.name << "'\n"
      << "[site]\nname = " << self.name << "\nkey_file = " << self.name << ".key\n"
      << "data_dir = data\n\n"
      << "[ingest]\nlisten = 127.0.0.1:" << self.ingest_port << "\n\n"
      << "[zmq]\nlisten = tcp://127.0.0.1:" << self.zmq_port << "\n\n"
      << "[peer." << peer.name << "]\npublic_key = " << peer.identity << "\n";
    if (dial) f << "zmq_connect = tcp://127.0.0.1:" << peer.zmq_port << "\n";
    f << "\n[channel." << kChannel << "]\npeers = " << peer.name << "\nsink = jsonl\n"
      << "jsonl_path = war-room.jsonl\n";
    f.close();
    if (!f) return Status::Error("cannot write config '" + self.conf().string() + "'");
    return Status::Ok();
  }

  // fork + exec rather than posix_spawn, to set PR_SET_PDEATHSIG in the child: if the bench is
  // killed outright, the kernel kills the daemons too. Only async-signal-safe calls after fork.
  Status Spawn(Site& s) {
    std::string conf = s.conf().string(), log = s.log().string();
    std::vector<char*> argv = {bin_.data(), const_cast<char*>("run"), const_cast<char*>("--config"),
                               conf.data(), nullptr};
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) return Status::Error(std::string("fork: ") + std::strerror(errno));
    if (pid == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(127);
      int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      int null_fd = open("/dev/null", O_RDONLY);
      if (fd < 0 || null_fd < 0) _exit(126);
      dup2(null_fd, 0);
      dup2(fd, 1);
      dup2(fd, 2);
      execv(bin_.c_str(), argv.data());
      _exit(127);
    }
    s.pid = pid;
    return Status::Ok();
  }

  Status WaitHealthy(Site& s) {
    auto deadline = Clock::now() + std::chrono::seconds(30);
    while (Clock::now() < deadline && !g_interrupted) {
      if (Status st = CheckAlive(); !st) return st;
      HttpClient c("127.0.0.1", s.ingest_port);
      auto r = c.Request("GET", "/healthz");
      if (r && r->status == 200) return Status::Ok();
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (g_interrupted) return Status::Error("interrupted");
    return Status::Error("site '" + s.name + "' did not answer /healthz within 30 s" + LogNote(s));
  }

  Status WaitLinkUp() {
    HttpClient c("127.0.0.1", europe_.ingest_port);
    auto deadline = Clock::now() + std::chrono::seconds(30);
    while (Clock::now() < deadline && !g_interrupted) {
      if (Status st = CheckAlive(); !st) return st;
      auto r = c.Request("GET", "/v1/status");
      if (r && r->status == 200 && r->body.find("\"link\":\"up\"") != std::string::npos)
        return Status::Ok();
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    if (g_interrupted) return Status::Error("interrupted");
    return Status::Error("europe's link to aws did not come up within 30 s" + Logs());
  }

  static std::string LogNote(const Site& s) {
    std::string out = "\n  --- end of " + s.name + "'s log " + s.log().string() + " ---";
    for (const auto& l : TailOfFile(s.log(), 15)) out += "\n  " + l;
    return out;
  }

  std::string bin_;
  Site europe_, aws_;
};

// ---- 1. raw limits ---------------------------------------------------------------------------

struct RawLimits {
  double aead_mb_s = 0;
  double commits_per_s = 0;        // synced, one 1 KiB entry each
  double batch_commits_per_s = 0;  // synced, 1000 x 1 KiB entries each
  double batch_mb_s = 0;
};

double MeasureAead(double seconds) {
  constexpr std::size_t kBuf = 64 * 1024;
  std::vector<unsigned char> in(kBuf), out(kBuf + crypto_aead_xchacha20poly1305_ietf_ABYTES);
  unsigned char key[crypto_aead_xchacha20poly1305_ietf_KEYBYTES];
  unsigned char nonce[crypto_aead_xchacha20poly1305_ietf_NPUBBYTES];
  randombytes_buf(in.data(), in.size());
  crypto_aead_xchacha20poly1305_ietf_keygen(key);
  randombytes_buf(nonce, sizeof nonce);
  std::uint64_t bytes = 0;
  unsigned long long out_len = 0;
  // One warm-up call, then as many as fit in `seconds`.
  crypto_aead_xchacha20poly1305_ietf_encrypt(out.data(), &out_len, in.data(), in.size(), nullptr, 0,
                                             nullptr, nonce, key);
  auto t0 = Clock::now();
  double elapsed = 0;
  do {
    sodium_increment(nonce, sizeof nonce);
    crypto_aead_xchacha20poly1305_ietf_encrypt(out.data(), &out_len, in.data(), in.size(), nullptr,
                                               0, nullptr, nonce, key);
    bytes += kBuf;
    elapsed = SecondsSince(t0);
  } while (elapsed < seconds);
  return static_cast<double>(bytes) / kMB / elapsed;
}

// Synced commits of `entries` x 1 KiB outbound entries for `seconds`; returns commits/s.
Result<double> MeasureCommits(queue::Store& store, std::uint64_t* seq, int entries,
                              double seconds) {
  const std::vector<std::string> peers = {"aws"};
  std::string value;
  AppendText(&value, "raw", 0);
  std::uint64_t commits = 0;
  auto t0 = Clock::now();
  double elapsed = 0;
  do {
    queue::WriteBatch batch;
    for (int i = 0; i < entries; ++i) batch.AppendOutbound((*seq)++, peers, value);
    if (Status s = store.Commit(batch, /*sync=*/true); !s) return s;
    ++commits;
    elapsed = SecondsSince(t0);
  } while (elapsed < seconds && !g_interrupted);
  return static_cast<double>(commits) / elapsed;
}

Result<RawLimits> MeasureRawLimits(const Options& o, const fs::path& root) {
  RawLimits r;
  std::printf("\n== 1. raw limits of this machine\n");
  r.aead_mb_s = MeasureAead(o.aead_seconds);
  std::printf("  AEAD  xchacha20poly1305_ietf_encrypt, 64 KiB buffers: %10.1f MB/s (one core)\n",
              r.aead_mb_s);
  std::fflush(stdout);
  fs::path dir = root / "raw-store";
  {
    auto store = queue::Store::Open(dir.string());
    if (!store) return store.status();
    std::uint64_t seq = 1;
    auto one = MeasureCommits(**store, &seq, 1, o.commit_seconds);
    if (!one) return one.status();
    r.commits_per_s = *one;
    std::printf("  RocksDB synced WriteBatch, 1 x 1 KiB entry:          %10.0f commits/s\n",
                r.commits_per_s);
    std::fflush(stdout);
    auto many = MeasureCommits(**store, &seq, 1000, o.commit_seconds);
    if (!many) return many.status();
    r.batch_commits_per_s = *many;
    r.batch_mb_s = r.batch_commits_per_s * 1000 * kTextBytes / kMB;
    std::printf(
        "  RocksDB synced WriteBatch, 1000 x 1 KiB entries:     %10.1f commits/s = %.1f MB/s\n",
        r.batch_commits_per_s, r.batch_mb_s);
    std::printf("  (store in %s)\n", dir.c_str());
  }
  std::error_code ec;
  fs::remove_all(dir, ec);  // no leftover compaction work during the next phases
  return r;
}

// ---- 2. end-to-end throughput ----------------------------------------------------------------

struct Throughput {
  std::uint64_t messages = 0;
  double seconds = 0;         // first POST -> last line observed in aws's sink
  double ingest_seconds = 0;  // first POST -> last POST answered 202
  double msgs_per_s = 0;
  double mb_s = 0;
  double europe_cpu = 0, aws_cpu = 0, bench_cpu = 0;  // CPU seconds used during the phase
  // The CPU cost of one message, all processes together, and the rate it allows when the cores
  // are kept busy all the time: a ceiling that no pipelining can beat.
  double cpu_us_per_msg = 0;
  double cpu_bound_msgs_per_s = 0;
};

void PostBatches(std::uint16_t port, const Options& o, std::atomic<std::uint64_t>* next_batch,
                 std::atomic<int>* ready, const std::atomic<bool>* go, Failure* failure) {
  HttpClient client("127.0.0.1", port);
  // Connect before the clock starts.
  if (auto r = client.Request("GET", "/healthz"); !r) {
    failure->Set("client: " + r.message());
    return;
  }
  ready->fetch_add(1);
  while (!go->load() && !failure->failed()) std::this_thread::yield();
  const auto batch = static_cast<std::uint64_t>(o.batch);
  std::string body;
  body.reserve(static_cast<std::size_t>(o.batch) * (kTextBytes + 64));
  while (!failure->failed()) {
    std::uint64_t first = next_batch->fetch_add(1) * batch;
    if (first >= o.messages) return;
    std::uint64_t end = std::min(o.messages, first + batch);
    body.assign("[");
    for (std::uint64_t i = first; i < end; ++i) {
      if (i > first) body.push_back(',');
      AppendMessage(&body, "e2e", i);
    }
    body.push_back(']');
    auto r = client.Request("POST", "/v1/messages", body);
    if (!r) {
      failure->Set("POST of messages " + std::to_string(first) + ".." + std::to_string(end - 1) +
                   ": " + r.message());
      return;
    }
    if (r->status != 202) {
      failure->Set("POST of messages " + std::to_string(first) + ".." + std::to_string(end - 1) +
                   ": HTTP " + std::to_string(r->status) + ": " + r->body.substr(0, 300));
      return;
    }
  }
}

// Reads the whole sink once more (after the clock stopped) and checks that every index
// 0..count-1 is there exactly once.
Status VerifySink(const fs::path& sink, std::string_view tag, std::uint64_t count) {
  SinkTail tail;
  if (Status s = tail.Open(sink); !s) return s;
  std::vector<std::uint8_t> seen(count, 0);
  std::uint64_t lines = 0, foreign = 0, duplicates = 0;
  auto r = tail.ReadNew([&](std::string_view line) {
    ++lines;
    auto i = IndexInLine(line, tag);
    if (!i || *i >= count) {
      ++foreign;
    } else if (seen[*i]++) {
      ++duplicates;
    }
  });
  if (!r) return r.status();
  std::uint64_t missing = static_cast<std::uint64_t>(std::count(seen.begin(), seen.end(), 0));
  if (missing || duplicates || foreign) {
    return Status::Error("sink " + sink.string() + ": " + std::to_string(lines) + " lines, " +
                         std::to_string(missing) + " messages missing, " +
                         std::to_string(duplicates) + " duplicated, " + std::to_string(foreign) +
                         " unexpected lines");
  }
  return Status::Ok();
}

Result<Throughput> MeasureThroughput(const Options& o, const fs::path& root) {
  std::printf("\n== 2. end-to-end throughput: %llu messages of 1 KiB, %d clients x batches of %d\n",
              static_cast<unsigned long long>(o.messages), o.clients, o.batch);
  std::fflush(stdout);
  SitePair sites(root / "throughput", o.relay_bin);
  if (Status s = sites.Start(); !s) return s;
  std::printf("  europe (ingest 127.0.0.1:%u) dials aws (zmq 127.0.0.1:%u); tailing %s\n",
              sites.europe().ingest_port, sites.aws().zmq_port, sites.aws().sink().c_str());
  std::fflush(stdout);
  SinkTail tail;
  if (Status s = tail.Open(sites.aws().sink()); !s) return s;
  if (auto r = tail.ReadNew(); !r) return r.status();  // start at the end (empty: fresh site)

  Failure failure;
  std::atomic<std::uint64_t> next_batch{0};
  std::atomic<bool> go{false};
  std::atomic<int> ready{0}, clients_done{0};
  std::atomic<std::int64_t> ingest_done_ns{0};
  ThreadGroup clients(&failure);
  for (int c = 0; c < o.clients; ++c) {
    clients.Start([&] {
      PostBatches(sites.europe().ingest_port, o, &next_batch, &ready, &go, &failure);
      if (clients_done.fetch_add(1) + 1 == o.clients) ingest_done_ns.store(NowNs());
    });
  }

  while (ready.load() < o.clients && !failure.failed())
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  double cpu_eu0 = CpuSeconds(sites.europe().pid), cpu_aws0 = CpuSeconds(sites.aws().pid);
  double cpu_self0 = CpuSeconds(getpid());
  ThreadCpu threads_eu0 = ThreadCpuSeconds(sites.europe().pid);
  ThreadCpu threads_aws0 = ThreadCpuSeconds(sites.aws().pid);
  auto t0 = Clock::now();
  std::int64_t t0_ns = NowNs();
  go.store(true);
  std::uint64_t lines = 0;
  auto last_progress = Clock::now(), last_check = Clock::now(), last_report = Clock::now();
  Clock::time_point t_end;
  while (true) {
    auto n = tail.ReadNew();
    if (!n) return n.status();
    auto now = Clock::now();
    if (*n > 0) {
      lines += *n;
      last_progress = now;
      if (lines >= o.messages) {
        t_end = now;
        break;
      }
    }
    if (failure.failed()) return Status::Error(failure.message());
    if (now - last_check > std::chrono::milliseconds(100)) {
      last_check = now;
      if (Status s = sites.CheckAlive(); !s) return s;
      if (now - last_progress > kStallTimeout)
        return Status::Error("no new line in aws's sink for " +
                             std::to_string(kStallTimeout.count()) + " s; " +
                             std::to_string(lines) + " of " + std::to_string(o.messages) +
                             " arrived" + sites.Logs());
    }
    if (now - last_report > std::chrono::seconds(2)) {
      last_report = now;
      std::printf("  ... %llu delivered after %.1f s\n", static_cast<unsigned long long>(lines),
                  SecondsSince(t0));
      std::fflush(stdout);
    }
    if (*n == 0) std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  // Every line arrived, so every POST was accepted; the last answers may still be on their way.
  clients.JoinAll();
  Throughput t;
  t.europe_cpu = CpuSeconds(sites.europe().pid) - cpu_eu0;
  t.aws_cpu = CpuSeconds(sites.aws().pid) - cpu_aws0;
  t.bench_cpu = CpuSeconds(getpid()) - cpu_self0;
  ThreadCpu threads_eu1 = ThreadCpuSeconds(sites.europe().pid);
  ThreadCpu threads_aws1 = ThreadCpuSeconds(sites.aws().pid);
  t.messages = o.messages;
  t.seconds = std::chrono::duration<double>(t_end - t0).count();
  t.ingest_seconds = static_cast<double>(ingest_done_ns.load() - t0_ns) / 1e9;
  t.msgs_per_s = static_cast<double>(o.messages) / t.seconds;
  t.mb_s = t.msgs_per_s * kTextBytes / kMB;
  if (lines > o.messages)
    return Status::Error("aws's sink has " + std::to_string(lines) + " lines for " +
                         std::to_string(o.messages) + " messages");
  if (Status s = VerifySink(sites.aws().sink(), "e2e", o.messages); !s) return s;
  std::printf("  all %llu arrived exactly once in %.2f s (europe had accepted all after %.2f s)\n",
              static_cast<unsigned long long>(o.messages), t.seconds, t.ingest_seconds);
  std::printf("  end to end: %10.0f messages/s  %8.1f MB/s of payload\n", t.msgs_per_s, t.mb_s);
  const double per_msg = 1e6 / static_cast<double>(o.messages);
  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  t.cpu_us_per_msg = (t.europe_cpu + t.aws_cpu + t.bench_cpu) * per_msg;
  t.cpu_bound_msgs_per_s = cores * 1e6 / t.cpu_us_per_msg;
  std::printf("  CPU used: europe %.2f s, aws %.2f s, bench %.2f s over %.2f s wall (%u cores)\n",
              t.europe_cpu, t.aws_cpu, t.bench_cpu, t.seconds, cores);
  std::printf("  CPU per message: europe %.1f us + aws %.1f us + bench %.1f us = %.1f us\n",
              t.europe_cpu * per_msg, t.aws_cpu * per_msg, t.bench_cpu * per_msg, t.cpu_us_per_msg);
  std::printf("    at that cost %u busy cores allow at most %.0f messages/s\n", cores,
              t.cpu_bound_msgs_per_s);
  std::printf("  busiest threads, CPU s per wall s (1.00 = one core kept busy):\n");
  std::printf("    europe: %s\n", BusiestThreads(threads_eu0, threads_eu1, t.seconds, 6).c_str());
  std::printf("    aws:    %s\n", BusiestThreads(threads_aws0, threads_aws1, t.seconds, 6).c_str());
  return t;
}

// ---- 3. latency at a steady rate -------------------------------------------------------------

struct Latency {
  double rate = 0;
  double seconds = 0;
  std::uint64_t sent = 0, count = 0;
  double p50 = 0, p90 = 0, p99 = 0, max = 0;  // ms
  double max_send_lag_ms = 0;                 // how late the open-loop senders were at worst
  int senders = 0;
};

Result<Latency> MeasureLatency(const Options& o, const fs::path& root) {
  Latency lat;
  lat.rate = o.rate;
  lat.seconds = o.seconds;
  const auto total = static_cast<std::uint64_t>(std::llround(o.rate * o.seconds));
  lat.sent = total;
  if (total == 0) return Status::Error("--rate x --seconds gives no message to send");
  // Open loop: message i is due at t0 + i / rate whatever happened to earlier ones. Each request
  // holds its connection until europe's group commit answers it, so keep enough connections for
  // 50 ms worth of requests in flight; a sender takes the next due message when it is free.
  lat.senders = static_cast<int>(std::clamp(std::ceil(o.rate * 0.05), 4.0, 128.0));
  std::printf(
      "\n== 3. latency: open loop, %.0f messages/s for %.1f s (%llu messages of 1 KiB, "
      "one per request, %d connections)\n",
      o.rate, o.seconds, static_cast<unsigned long long>(total), lat.senders);
  std::fflush(stdout);
  SitePair sites(root / "latency", o.relay_bin);
  if (Status s = sites.Start(); !s) return s;
  SinkTail tail;
  if (Status s = tail.Open(sites.aws().sink()); !s) return s;
  if (auto r = tail.ReadNew(); !r) return r.status();

  const double period_ns = 1e9 / o.rate;
  Failure failure;
  std::atomic<std::uint64_t> next{0};
  std::atomic<bool> go{false};
  std::atomic<std::int64_t> t0_ns{0};
  auto due_ns = [&](std::uint64_t i) {
    return t0_ns.load() + static_cast<std::int64_t>(static_cast<double>(i) * period_ns);
  };
  std::vector<std::atomic<std::int64_t>> lag_ns(total);  // actual send time - due time
  std::atomic<int> ready{0};

  auto sender = [&] {
    PreciseSleeps();
    HttpClient client("127.0.0.1", sites.europe().ingest_port);
    if (auto r = client.Request("GET", "/healthz"); !r) {  // connect before the clock starts
      failure.Set("sender: " + r.message());
      return;
    }
    ready.fetch_add(1);
    while (!go.load() && !failure.failed()) std::this_thread::yield();
    std::string body;
    while (!failure.failed()) {
      std::uint64_t i = next.fetch_add(1);
      if (i >= total) return;
      body.clear();
      AppendMessage(&body, "lat", i);
      std::int64_t due = due_ns(i);
      std::this_thread::sleep_until(Clock::time_point(std::chrono::nanoseconds(due)));
      lag_ns[i].store(NowNs() - due);
      auto r = client.Request("POST", "/v1/messages", body);
      if (!r || r->status != 202) {
        failure.Set("POST of latency message " + std::to_string(i) + ": " +
                    (r ? "HTTP " + std::to_string(r->status) + ": " + r->body : r.message()));
        return;
      }
    }
  };

  // The reader observes lines as they land in aws's sink. Latency counts from the due time, so
  // a sender running late cannot hide delay (no coordinated omission). Only the reader touches
  // `latencies` and `seen` until it is joined.
  std::vector<double> latencies;
  latencies.reserve(total);
  std::vector<std::uint8_t> seen(total, 0);
  std::uint64_t unexpected = 0, duplicates = 0;
  std::atomic<bool> senders_done{false}, reader_done{false};
  Status reader_status;
  auto reader = [&] {
    PreciseSleeps();
    auto last_progress = Clock::now();
    while (latencies.size() < total && !failure.failed()) {
      std::int64_t observed = 0;
      auto n = tail.ReadNew([&](std::string_view line) {
        if (observed == 0) observed = NowNs();  // when this read() returned the line
        auto i = IndexInLine(line, "lat");
        if (!i || *i >= total) {
          ++unexpected;
        } else if (seen[*i]++) {
          ++duplicates;
        } else {
          latencies.push_back(static_cast<double>(observed - due_ns(*i)) / 1e6);
        }
      });
      if (!n) {
        reader_status = n.status();
        break;
      }
      if (*n > 0) {
        last_progress = Clock::now();
        continue;
      }
      if (senders_done.load() && Clock::now() - last_progress > std::chrono::seconds(30)) {
        reader_status = Status::Error("latency phase: " + std::to_string(latencies.size()) +
                                      " of " + std::to_string(total) +
                                      " messages arrived; none for 30 s" + sites.Logs());
        break;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    reader_done.store(true);
  };

  ThreadGroup senders(&failure), readers(&failure);
  for (int s = 0; s < lat.senders; ++s) senders.Start(sender);
  while (ready.load() < lat.senders && !failure.failed())
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  readers.Start(reader);
  // Start slightly in the future so that every sender is already waiting for its first message.
  t0_ns.store(NowNs() + 20'000'000);
  go.store(true);
  auto report_at = Clock::now();
  // Each sender takes one index past the end when it is done.
  while (next.load() < total + static_cast<std::uint64_t>(lat.senders) && !failure.failed()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    if (Status s = sites.CheckAlive(); !s) failure.Set(s.message());
    if (SecondsSince(report_at) > 2) {
      report_at = Clock::now();
      std::printf("  ... %llu sent\n",
                  static_cast<unsigned long long>(std::min(next.load(), total)));
      std::fflush(stdout);
    }
  }
  senders.JoinAll();
  senders_done.store(true);
  while (!reader_done.load() && !failure.failed()) {
    if (Status s = sites.CheckAlive(); !s) failure.Set(s.message());
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  readers.JoinAll();
  if (!reader_status.ok()) return reader_status;
  if (failure.failed()) return Status::Error(failure.message());
  if (duplicates || unexpected)
    return Status::Error("latency phase: " + std::to_string(duplicates) + " duplicated and " +
                         std::to_string(unexpected) + " unexpected lines in aws's sink");
  std::int64_t max_lag = 0;
  for (const auto& l : lag_ns) max_lag = std::max(max_lag, l.load());
  lat.max_send_lag_ms = static_cast<double>(max_lag) / 1e6;
  std::sort(latencies.begin(), latencies.end());
  lat.count = latencies.size();
  lat.p50 = Percentile(latencies, 0.50);
  lat.p90 = Percentile(latencies, 0.90);
  lat.p99 = Percentile(latencies, 0.99);
  lat.max = latencies.empty() ? 0 : latencies.back();
  std::printf("  ingest -> delivered (POST due -> line seen in aws's sink), all %llu arrived:\n",
              static_cast<unsigned long long>(lat.count));
  std::printf("  p50 %.2f ms   p90 %.2f ms   p99 %.2f ms   max %.2f ms\n", lat.p50, lat.p90,
              lat.p99, lat.max);
  std::printf(
      "  (senders were at most %.2f ms behind schedule; latency counts from the schedule)\n",
      lat.max_send_lag_ms);
  return lat;
}

// A JSON number, or null for a figure that was not measured.
std::string Num(double v, int decimals) {
  if (!std::isfinite(v)) return "null";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
  return buf;
}

// ---- the run ---------------------------------------------------------------------------------

int Run(const Options& o) {
  if (Status s = crypto::Init(); !s) {
    std::fprintf(stderr, "relay_bench: %s\n", s.message().c_str());
    return 1;
  }
  if (access(o.relay_bin.c_str(), X_OK) != 0) {
    std::fprintf(stderr, "relay_bench: relay binary '%s' is not executable: %s (use --relay)\n",
                 o.relay_bin.c_str(), std::strerror(errno));
    return 1;
  }
  std::error_code ec;
  std::string tmpl = (fs::temp_directory_path(ec) / "relay-bench-XXXXXX").string();
  if (ec || !mkdtemp(tmpl.data())) {
    std::fprintf(stderr, "relay_bench: cannot create a temporary folder: %s\n",
                 std::strerror(errno));
    return 1;
  }
  const fs::path root = tmpl;
  // Removes the folder on every path out of Run (the SitePairs stop their children first, being
  // destroyed inside the phase functions).
  struct RootGuard {
    const fs::path& root;
    bool keep;
    ~RootGuard() {
      if (keep) {
        std::printf("temporary folder kept: %s\n", root.c_str());
        return;
      }
      std::error_code e;
      fs::remove_all(root, e);
    }
  } guard{root, o.keep};

  std::printf("relay_bench: relay %s, temporary folder %s, %u cores\n", o.relay_bin.c_str(),
              root.c_str(), std::thread::hardware_concurrency());
  std::fflush(stdout);

  auto fail = [](const char* phase, const std::string& message) {
    std::fprintf(stderr, "relay_bench: %s failed: %s\n", phase, message.c_str());
    return 1;
  };
  auto raw = MeasureRawLimits(o, root);
  if (!raw) return fail("raw limits", raw.message());
  if (g_interrupted) return fail("raw limits", "interrupted");
  auto tp = MeasureThroughput(o, root);
  if (!tp) return fail("end-to-end throughput", tp.message());
  double ratio_aead = tp->mb_s / raw->aead_mb_s;
  double ratio_commits = tp->msgs_per_s / raw->commits_per_s;
  double ratio_batch_mb = tp->mb_s / raw->batch_mb_s;
  std::printf("  ratio e2e MB/s / AEAD MB/s             = %.3f\n", ratio_aead);
  std::printf(
      "    each byte is sealed (europe) and opened (aws) once: AEAD alone caps this at ~0.5 "
      "per core\n");
  std::printf("  ratio e2e msgs/s / synced commits/s    = %.1f\n", ratio_commits);
  std::printf(
      "    messages per synced-commit time; each crosses 3 syncs, so group commits average "
      ">= ~3x this\n");
  std::printf("  ratio e2e MB/s / synced 1000x1KiB MB/s = %.3f\n", ratio_batch_mb);
  std::printf(
      "    each byte is synced 3 times (europe WAL, aws WAL, aws sink): the disk caps this "
      "at ~0.33\n");
  std::fflush(stdout);
  auto lat = MeasureLatency(o, root);
  if (!lat) return fail("latency", lat.message());

  bool tp_pass = tp->msgs_per_s >= kTargetMessagesPerSecond;
  bool lat_pass = lat->p99 <= kTargetP99Ms;
  std::printf("\n== 4. targets (docs/design.md)\n");
  std::printf("  %-4s end to end %.0f messages/s of 1 KiB (target >= %.0f)\n",
              tp_pass ? "PASS" : "MISS", tp->msgs_per_s, kTargetMessagesPerSecond);
  std::printf("  %-4s p99 ingest->delivered %.2f ms at %.0f messages/s (target <= %.0f ms)\n",
              lat_pass ? "PASS" : "MISS", lat->p99, lat->rate, kTargetP99Ms);

  std::string json = "{";
  auto field = [&json](const char* name, const std::string& value) {
    if (json.size() > 1) json += ",";
    json += "\"";
    json += name;
    json += "\":";
    json += value;
  };
  field("quick", o.quick ? "true" : "false");
  field("cores", std::to_string(std::thread::hardware_concurrency()));
  field("aead_mb_s", Num(raw->aead_mb_s, 1));
  field("synced_commits_per_s", Num(raw->commits_per_s, 1));
  field("synced_1000x1k_commits_per_s", Num(raw->batch_commits_per_s, 1));
  field("synced_1000x1k_mb_s", Num(raw->batch_mb_s, 1));
  field("e2e_messages", std::to_string(tp->messages));
  field("e2e_clients", std::to_string(o.clients));
  field("e2e_batch", std::to_string(o.batch));
  field("e2e_seconds", Num(tp->seconds, 3));
  field("e2e_ingest_seconds", Num(tp->ingest_seconds, 3));
  field("e2e_msgs_per_s", Num(tp->msgs_per_s, 0));
  field("e2e_mb_s", Num(tp->mb_s, 1));
  field("e2e_cpu_s_europe", Num(tp->europe_cpu, 2));
  field("e2e_cpu_s_aws", Num(tp->aws_cpu, 2));
  field("e2e_cpu_s_bench", Num(tp->bench_cpu, 2));
  field("e2e_cpu_us_per_msg", Num(tp->cpu_us_per_msg, 2));
  field("e2e_cpu_bound_msgs_per_s", Num(tp->cpu_bound_msgs_per_s, 0));
  field("ratio_e2e_mb_to_aead", Num(ratio_aead, 4));
  field("ratio_e2e_msgs_to_synced_commits", Num(ratio_commits, 2));
  field("ratio_e2e_mb_to_synced_batch_mb", Num(ratio_batch_mb, 4));
  field("latency_rate", Num(lat->rate, 0));
  field("latency_seconds", Num(lat->seconds, 1));
  field("latency_count", std::to_string(lat->count));
  field("latency_p50_ms", Num(lat->p50, 3));
  field("latency_p90_ms", Num(lat->p90, 3));
  field("latency_p99_ms", Num(lat->p99, 3));
  field("latency_max_ms", Num(lat->max, 3));
  field("latency_max_send_lag_ms", Num(lat->max_send_lag_ms, 3));
  field("target_throughput", tp_pass ? "\"PASS\"" : "\"MISS\"");
  field("target_latency_p99", lat_pass ? "\"PASS\"" : "\"MISS\"");
  json += "}";
  std::printf("RESULT %s\n", json.c_str());
  std::fflush(stdout);
  return 0;
}

// ---- arguments -------------------------------------------------------------------------------

constexpr char kUsage[] =
    "usage: relay_bench [options]\n"
    "Measures raw machine limits, end-to-end throughput and latency of two relay daemons on\n"
    "loopback, and prints PASS/MISS against docs/design.md plus a 'RESULT {json}' line.\n"
    "  --messages N   messages in the throughput phase (default 200000)\n"
    "  --clients N    client threads posting batches (default 4)\n"
    "  --batch N      messages per POST in the throughput phase (default 500)\n"
    "  --rate R       messages/s in the latency phase (default 1000)\n"
    "  --seconds S    duration of the latency phase (default 10)\n"
    "  --relay PATH   the relay binary (default $RELAY_BIN, else the one built with the bench)\n"
    "  --keep         keep the temporary folder (configs, logs, sinks)\n"
    "  --quick        smoke run: 20000 messages, 3 s of latency, short raw-limit loops\n"
    "Exit status: 0 when every message arrived exactly once (timings never fail the run).\n";

// Parses the arguments; nullopt with *exit_code set when the run should not go ahead.
std::optional<Options> ParseArgs(int argc, char** argv, int* exit_code) {
  Options o;
  std::vector<std::string> args(argv + 1, argv + argc);
  // --quick first, so that explicit sizes given with it win wherever they appear.
  if (std::find(args.begin(), args.end(), "--quick") != args.end()) {
    o.quick = true;
    o.messages = 20000;
    o.seconds = 3;
    o.aead_seconds = 0.25;
    o.commit_seconds = 0.5;
  }
  const char* env = std::getenv("RELAY_BIN");
  o.relay_bin = env && *env ? env : RELAY_DEFAULT_BIN;
  auto bad = [exit_code](const std::string& message) -> std::optional<Options> {
    std::fprintf(stderr, "relay_bench: %s\n%s", message.c_str(), kUsage);
    *exit_code = 2;
    return std::nullopt;
  };
  for (std::size_t i = 0; i < args.size(); ++i) {
    std::string name = args[i], value;
    bool has_value = false;
    if (auto eq = name.find('='); eq != std::string::npos && name.rfind("--", 0) == 0) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    if (name == "--help" || name == "-h") {
      std::printf("%s", kUsage);
      *exit_code = 0;
      return std::nullopt;
    }
    if (name == "--quick" || name == "--keep") {
      if (has_value) return bad(name + " takes no value");
      if (name == "--keep") o.keep = true;
      continue;
    }
    static const char* const kValued[] = {"--messages", "--clients", "--batch",
                                          "--rate",     "--seconds", "--relay"};
    if (std::find(std::begin(kValued), std::end(kValued), name) == std::end(kValued))
      return bad("unknown option '" + args[i] + "'");
    if (!has_value) {
      if (i + 1 >= args.size()) return bad("missing value after " + name);
      value = args[++i];
    }
    auto number = [&](double lo, double hi, double* out) -> bool {
      char* end = nullptr;
      errno = 0;
      double v = std::strtod(value.c_str(), &end);
      if (value.empty() || *end != '\0' || errno != 0 || !(v >= lo && v <= hi)) return false;
      *out = v;
      return true;
    };
    double v = 0;
    if (name == "--messages") {
      if (!number(1, 1e9, &v) || v != std::floor(v))
        return bad("--messages '" + value + "': expected a whole number 1..1e9");
      o.messages = static_cast<std::uint64_t>(v);
    } else if (name == "--clients") {
      if (!number(1, 256, &v) || v != std::floor(v))
        return bad("--clients '" + value + "': expected a whole number 1..256");
      o.clients = static_cast<int>(v);
    } else if (name == "--batch") {
      if (!number(1, 100000, &v) || v != std::floor(v))
        return bad("--batch '" + value + "': expected a whole number 1..100000");
      o.batch = static_cast<int>(v);
    } else if (name == "--rate") {
      if (!number(1, 1e6, &v)) return bad("--rate '" + value + "': expected messages/s, 1..1e6");
      o.rate = v;
    } else if (name == "--seconds") {
      if (!number(0.1, 3600, &v)) return bad("--seconds '" + value + "': expected 0.1..3600");
      o.seconds = v;
    } else if (name == "--relay") {
      if (value.empty()) return bad("--relay needs a path");
      o.relay_bin = value;
    } else {
      return bad("unknown option '" + args[i] + "'");
    }
  }
  return o;
}

}  // namespace
}  // namespace relay::bench

int main(int argc, char** argv) {
  using namespace relay::bench;
  int exit_code = 0;
  auto options = ParseArgs(argc, argv, &exit_code);
  if (!options) return exit_code;
  struct sigaction sa {};
  sa.sa_handler = OnSignal;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) sigaction(sig, &sa, nullptr);
  signal(SIGPIPE, SIG_IGN);  // a daemon dying mid-request must not kill the bench
  try {
    return Run(*options);
  } catch (const std::exception& e) {
    // Run's guards have stopped the daemons and removed the folder while unwinding.
    std::fprintf(stderr, "relay_bench: %s\n", e.what());
    return 1;
  }
}
