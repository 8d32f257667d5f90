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
//   4. sneakernet -- europe (no network, bundle files only) ingests M messages; `relay export`
//      through the running daemon, then `relay import` into the running aws daemon until the
//      last line is in aws's sink: MB/s of payload each way;
//   5. diode goodput -- europe sends to aws over the UDP diode (rate limit, default FEC) through
//      a forwarder thread in this process that drops 0 %, then 5 % of the datagrams (seeded):
//      payload MB/s delivered, the ratio to the rate limit, the bytes on the wire per payload
//      byte, the shards FEC rebuilt;
//   6. PASS/MISS against the targets, and one "RESULT {json}" line with every figure.
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
#include <poll.h>
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
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "base/status.h"
#include "config/config.h"
#include "crypto/api_token.h"
#include "crypto/identity.h"
#include "queue/store.h"
#include "relay/http_server.h"

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
constexpr double kTargetBundleMBPerSecond = 300;  // export, and import to the sink

constexpr std::size_t kTextBytes = 1024;                  // payload of one message ("1 KiB text")
constexpr double kMB = 1e6;                               // MB = 10^6 bytes throughout
constexpr auto kStallTimeout = std::chrono::seconds(60);  // no progress at all: give up
constexpr auto kStopGrace = std::chrono::seconds(10);     // SIGTERM, then SIGKILL
// Diode: no new line for this long means frames were lost beyond what FEC repairs (only a
// resend request, carried by hand, would bring them): give up sooner than kStallTimeout.
constexpr auto kDiodeStallTimeout = std::chrono::seconds(30);
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
  // Phases 4 and 5.
  std::uint64_t sneakernet_messages = 200000;
  std::uint64_t diode_messages = 50000;
  // As in the config file; bytes/s. 50MiB loses datagrams in aws's socket buffer beyond what
  // FEC repairs on this kind of machine (2 cores) at 5 % loss now and then: see MeasureDiode.
  std::string diode_rate = "20MiB";
  std::uint64_t diode_rate_bytes = 20u << 20;
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

// A loopback port free at the time of the call, TCP by default.
std::uint16_t FreePort(int type = SOCK_STREAM) {
  int fd = socket(AF_INET, type | SOCK_CLOEXEC, 0);
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

// ---- child processes -------------------------------------------------------------------------

// fork + exec of `bin args...` with stdout appended to `out`, stderr to `err` (may be the same
// file) and stdin from /dev/null. fork + exec rather than posix_spawn, to set PR_SET_PDEATHSIG
// in the child: if the bench is killed outright, the kernel kills the child too. Only
// async-signal-safe calls after fork.
Result<pid_t> SpawnChild(const std::string& bin, const std::vector<std::string>& args,
                         const fs::path& out, const fs::path& err) {
  std::string bin_copy = bin, out_s = out.string(), err_s = err.string();
  std::vector<std::string> arg_copy = args;
  std::vector<char*> argv = {bin_copy.data()};
  for (auto& a : arg_copy) argv.push_back(a.data());
  argv.push_back(nullptr);
  const bool same = out_s == err_s;
  pid_t parent = getpid();
  pid_t pid = fork();
  if (pid < 0) return Status::Error(std::string("fork: ") + std::strerror(errno));
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);
    int fd = open(out_s.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    int err_fd = same ? fd : open(err_s.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    int null_fd = open("/dev/null", O_RDONLY);
    if (fd < 0 || err_fd < 0 || null_fd < 0) _exit(126);
    dup2(null_fd, 0);
    dup2(fd, 1);
    dup2(err_fd, 2);
    execv(bin_copy.c_str(), argv.data());
    _exit(127);
  }
  return pid;
}

// One `relay` CLI command run as a child (export, import). The destructor kills it if it is
// still running, so that no child outlives its phase.
class CliCommand {
 public:
  CliCommand() = default;
  ~CliCommand() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  CliCommand(const CliCommand&) = delete;
  CliCommand& operator=(const CliCommand&) = delete;

  Status Start(const std::string& bin, const std::vector<std::string>& args, const fs::path& out,
               const fs::path& err) {
    out_ = out;
    err_ = err;
    line_ = bin;
    for (const auto& a : args) line_ += " " + a;
    start_ = Clock::now();
    auto pid = SpawnChild(bin, args, out, err);
    if (!pid) return pid.status();
    pid_ = *pid;
    return Status::Ok();
  }
  // The exit code (128 + signal when killed) once it has exited; nullopt while it runs.
  std::optional<int> Poll() {
    if (pid_ <= 0) return code_;
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) != pid_) return std::nullopt;
    seconds_ = SecondsSince(start_);
    pid_ = -1;
    code_ = WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
    return code_;
  }
  // Waits until it exits; kills it after `timeout`.
  Result<int> Wait(std::chrono::seconds timeout) {
    auto deadline = Clock::now() + timeout;
    while (true) {
      if (auto c = Poll()) return *c;
      if (g_interrupted) return Status::Error("interrupted");
      if (Clock::now() > deadline)
        return Status::Error("'" + line_ + "' did not finish within " +
                             std::to_string(timeout.count()) + " s");
      std::this_thread::sleep_for(std::chrono::microseconds(500));
    }
  }
  // Start -> exit, as observed by Poll (within its polling interval).
  double seconds() const { return seconds_; }
  // "'command' exited with N" and the end of its output, for failure reports.
  std::string Failed() const {
    std::string out = "'" + line_ + "' exited with " + std::to_string(code_.value_or(-1));
    for (const fs::path& p : {out_, err_}) {
      for (const auto& l : TailOfFile(p, 10)) out += "\n  " + l;
      if (out_ == err_) break;
    }
    return out;
  }

 private:
  pid_t pid_ = -1;
  std::optional<int> code_;
  Clock::time_point start_;
  double seconds_ = 0;
  fs::path out_, err_;
  std::string line_;
};

// ---- two relay sites on loopback -----------------------------------------------------------

// The API token of every site this bench started ([ingest] token_file), by ingest port.
std::mutex g_tokens_mu;
std::map<std::uint16_t, std::string> g_tokens;

// Makes `client` send the token of the site on `port`.
void Authorize(HttpClient& client, std::uint16_t port) {
  std::lock_guard<std::mutex> lock(g_tokens_mu);
  if (auto it = g_tokens.find(port); it != g_tokens.end()) client.SetBearerToken(it->second);
}

struct Site {
  std::string name;
  fs::path dir;
  std::uint16_t ingest_port = 0, zmq_port = 0;
  std::uint16_t diode_port = 0;  // aws in a diode pair: its [diode] listen port
  std::string identity;
  pid_t pid = -1;
  fs::path conf() const { return dir / (name + ".conf"); }
  fs::path key() const { return dir / (name + ".key"); }
  fs::path token() const { return dir / "ingest.token"; }
  fs::path sink() const { return dir / "war-room.jsonl"; }
  fs::path log() const { return dir / "relay.log"; }
};

// How europe sends over the diode in a SitePair of mode kDiode.
struct DiodeSetup {
  std::uint16_t send_port = 0;  // where europe sends: aws's diode port, or a forwarder
  std::string rate;             // diode_rate, as in the config file
};

// europe and aws as separate `relay run` processes in `dir`; both bridge channel war-room into a
// JSONL sink. How europe reaches aws depends on the mode: kZmq, europe dials aws over ZeroMQ;
// kBundles, no network at all (bundle files only); kDiode, europe sends over the UDP diode to
// `diode_send_port` (aws listens on its own diode port). Durability settings are the defaults
// (on). The destructor stops both processes.
class SitePair {
 public:
  enum class Mode { kZmq, kBundles, kDiode };
  SitePair(fs::path dir, std::string relay_bin, Mode mode = Mode::kZmq, DiodeSetup diode = {})
      : bin_(std::move(relay_bin)), mode_(mode), diode_(std::move(diode)) {
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
      if (mode_ == Mode::kDiode && s == &aws_ && s->diode_port == 0)
        return Status::Error("a diode pair needs aws's diode port (SetAwsDiodePort)");
      if (Status st = crypto::SiteKey::CreateFile(s->key().string()); !st) return st;
      auto key = crypto::SiteKey::LoadFile(s->key().string());
      if (!key) return key.status();
      s->identity = key->identity().ToString();
      if (Status st = crypto::ApiToken::CreateFile(s->token().string()); !st) return st;
      auto token = crypto::ApiToken::LoadFile(s->token().string());
      if (!token) return token.status();
      std::lock_guard<std::mutex> lock(g_tokens_mu);
      g_tokens[s->ingest_port] = std::string(token->value());
    }
    if (Status s = WriteConfig(europe_, aws_, /*dial=*/true); !s) return s;
    if (Status s = WriteConfig(aws_, europe_, /*dial=*/false); !s) return s;
    for (Site* s : {&aws_, &europe_}) {
      if (Status st = Spawn(*s); !st) return st;
      if (Status st = WaitHealthy(*s); !st) return st;
    }
    return mode_ == Mode::kZmq ? WaitLinkUp() : Status::Ok();
  }

  // The UDP port aws's diode listens on (kDiode); before Start.
  void SetAwsDiodePort(std::uint16_t port) { aws_.diode_port = port; }

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
  Status WriteConfig(const Site& self, const Site& peer, bool dial) const {
    std::ofstream f(self.conf());
    f << "# relay_bench site '" << self.name << "'\n"
      << "[site]\nname = " << self.name << "\nkey_file = " << self.name << ".key\n"
      << "data_dir = data\n";
    // Bundles go through <pair folder>/usb (phase 4): a folder the configuration must name.
    if (mode_ == Mode::kBundles) f << "transfer_dirs = ../usb\n";
    f << "\n[ingest]\nlisten = 127.0.0.1:" << self.ingest_port << "\ntoken_file = ingest.token\n\n";
    if (mode_ == Mode::kZmq) f << "[zmq]\nlisten = tcp://127.0.0.1:" << self.zmq_port << "\n\n";
    if (mode_ == Mode::kDiode && self.diode_port != 0)
      f << "[diode]\nlisten = udp://127.0.0.1:" << self.diode_port << "\n\n";
    f << "[peer." << peer.name << "]\npublic_key = " << peer.identity << "\n";
    if (dial && mode_ == Mode::kZmq) f << "zmq_connect = tcp://127.0.0.1:" << peer.zmq_port << "\n";
    if (dial && mode_ == Mode::kDiode)
      f << "diode_send = udp://127.0.0.1:" << diode_.send_port << "\n"
        << "diode_rate = " << diode_.rate << "\n";
    f << "\n[channel." << kChannel << "]\npeers = " << peer.name << "\nsink = jsonl\n"
      << "jsonl_path = war-room.jsonl\n";
    f.close();
    if (!f) return Status::Error("cannot write config '" + self.conf().string() + "'");
    return Status::Ok();
  }

  Status Spawn(Site& s) {
    auto pid = SpawnChild(bin_, {"run", "--config", s.conf().string()}, s.log(), s.log());
    if (!pid) return pid.status();
    s.pid = *pid;
    return Status::Ok();
  }

  Status WaitHealthy(Site& s) {
    auto deadline = Clock::now() + std::chrono::seconds(30);
    while (Clock::now() < deadline && !g_interrupted) {
      if (Status st = CheckAlive(); !st) return st;
      HttpClient c("127.0.0.1", s.ingest_port);
      Authorize(c, s.ingest_port);
      auto r = c.Request("GET", "/healthz");
      if (r && r->status == 200) return Status::Ok();
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (g_interrupted) return Status::Error("interrupted");
    return Status::Error("site '" + s.name + "' did not answer /healthz within 30 s" + LogNote(s));
  }

  Status WaitLinkUp() {
    HttpClient c("127.0.0.1", europe_.ingest_port);
    Authorize(c, europe_.ingest_port);
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
  Mode mode_;
  DiodeSetup diode_;
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
    queue::WriteBatch batch(store);
    for (int i = 0; i < entries; ++i)
      batch.AppendOutbound((*seq)++, peers, 0, std::string_view(), value);
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

// Posts messages `tag` 0..count-1 in batches of `batch_size` (batch numbers taken from
// *next_batch, shared by the clients), after *go.
void PostBatches(std::uint16_t port, std::string_view tag, std::uint64_t count, int batch_size,
                 std::atomic<std::uint64_t>* next_batch, std::atomic<int>* ready,
                 const std::atomic<bool>* go, Failure* failure) {
  HttpClient client("127.0.0.1", port);
  Authorize(client, port);
  // Connect before the clock starts.
  if (auto r = client.Request("GET", "/healthz"); !r) {
    failure->Set("client: " + r.message());
    return;
  }
  ready->fetch_add(1);
  while (!go->load() && !failure->failed()) std::this_thread::yield();
  const auto batch = static_cast<std::uint64_t>(batch_size);
  std::string body;
  body.reserve(static_cast<std::size_t>(batch_size) * (kTextBytes + 64));
  while (!failure->failed()) {
    std::uint64_t first = next_batch->fetch_add(1) * batch;
    if (first >= count) return;
    std::uint64_t end = std::min(count, first + batch);
    body.assign("[");
    for (std::uint64_t i = first; i < end; ++i) {
      if (i > first) body.push_back(',');
      AppendMessage(&body, tag, i);
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
      PostBatches(sites.europe().ingest_port, "e2e", o.messages, o.batch, &next_batch, &ready, &go,
                  &failure);
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
    Authorize(client, sites.europe().ingest_port);
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

// ---- helpers for phases 4 and 5 --------------------------------------------------------------

std::string Num(double v, int decimals);

// Posts messages `tag` 0..count-1 to `port` from `clients` threads in batches; returns when
// every POST was answered 202 (the events are durable at the site).
Status PostAll(std::uint16_t port, std::string_view tag, std::uint64_t count, int clients,
               int batch) {
  Failure failure;
  std::atomic<std::uint64_t> next_batch{0};
  std::atomic<bool> go{true};
  std::atomic<int> ready{0};
  {
    ThreadGroup group(&failure);
    for (int c = 0; c < clients; ++c)
      group.Start(
          [&] { PostBatches(port, tag, count, batch, &next_batch, &ready, &go, &failure); });
    group.JoinAll();
  }
  if (failure.failed()) return Status::Error(failure.message());
  return Status::Ok();
}

// The sum of every sample of metric `name` (all label sets) in the site's /metrics.
Result<double> ReadMetric(std::uint16_t port, std::string_view name) {
  HttpClient c("127.0.0.1", port);
  Authorize(c, port);
  auto r = c.Request("GET", "/metrics");
  if (!r) return r.status();
  if (r->status != 200) return Status::Error("/metrics answered " + std::to_string(r->status));
  double sum = 0;
  bool found = false;
  std::string_view body = r->body;
  while (!body.empty()) {
    std::size_t nl = body.find('\n');
    std::string_view line = body.substr(0, nl);
    body.remove_prefix(nl == std::string_view::npos ? body.size() : nl + 1);
    if (line.size() <= name.size() || line.substr(0, name.size()) != name) continue;
    char next = line[name.size()];
    if (next != ' ' && next != '{') continue;
    std::size_t sp = line.rfind(' ');
    sum += std::strtod(std::string(line.substr(sp + 1)).c_str(), nullptr);
    found = true;
  }
  if (!found) return Status::Error("no metric " + std::string(name) + " in /metrics");
  return sum;
}

// Payload bytes and file bytes of the bundle files in `dir`.
struct BundleFiles {
  std::uint64_t files = 0, bytes = 0;
};
BundleFiles ListBundles(const fs::path& dir) {
  BundleFiles b;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (e.path().extension() != ".bundle") continue;
    ++b.files;
    b.bytes += e.file_size(ec);
  }
  return b;
}

// Tails `tail` until `want` more lines have arrived; returns the time they took from `t0`.
// `poll` runs every ~100 ms (liveness checks); it may fail the wait. `each_turn` runs before
// every read with the lines seen so far. Gives up when no line came for `stall`.
Result<double> WaitForLines(SinkTail* tail, std::uint64_t want, Clock::time_point t0,
                            std::chrono::seconds stall, const std::function<Status()>& poll,
                            const std::function<void(std::uint64_t)>& each_turn = nullptr) {
  std::uint64_t lines = 0;
  auto last_progress = Clock::now(), last_check = Clock::now(), last_report = Clock::now();
  while (true) {
    if (each_turn) each_turn(lines);
    auto n = tail->ReadNew();
    if (!n) return n.status();
    auto now = Clock::now();
    if (*n > 0) {
      lines += *n;
      last_progress = now;
      if (lines >= want) return std::chrono::duration<double>(now - t0).count();
    }
    if (g_interrupted) return Status::Error("interrupted");
    if (now - last_check > std::chrono::milliseconds(100)) {
      last_check = now;
      if (Status s = poll(); !s) return s;
      if (now - last_progress > stall)
        return Status::Error("no new line in aws's sink for " + std::to_string(stall.count()) +
                             " s; " + std::to_string(lines) + " of " + std::to_string(want) +
                             " arrived");
    }
    if (now - last_report > std::chrono::seconds(2)) {
      last_report = now;
      std::printf("  ... %llu delivered after %.1f s\n", static_cast<unsigned long long>(lines),
                  SecondsSince(t0));
      std::fflush(stdout);
    }
    if (*n == 0) std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

// ---- 4. sneakernet ---------------------------------------------------------------------------

struct Sneakernet {
  std::uint64_t messages = 0;
  double ingest_seconds = 0;
  double export_seconds = 0;  // `relay export` start -> exit
  double export_mb_s = 0;     // payload
  std::uint64_t bundle_files = 0, bundle_bytes = 0;
  double import_seconds = 0;      // `relay import` start -> last line in aws's sink
  double import_mb_s = 0;         // payload
  double import_cmd_seconds = 0;  // `relay import` start -> exit
  double import_cmd_mb_s = 0;
};

Result<Sneakernet> MeasureSneakernet(const Options& o, const fs::path& dir) {
  Sneakernet r;
  r.messages = o.sneakernet_messages;
  const double payload_mb = static_cast<double>(r.messages) * kTextBytes / kMB;
  std::printf(
      "\n== 4. sneakernet: %llu messages of 1 KiB, europe -> aws by bundle files only "
      "(no network)\n",
      static_cast<unsigned long long>(r.messages));
  std::fflush(stdout);
  SitePair sites(dir, o.relay_bin, SitePair::Mode::kBundles);
  if (Status s = sites.Start(); !s) return s;
  SinkTail tail;
  if (Status s = tail.Open(sites.aws().sink()); !s) return s;
  if (auto n = tail.ReadNew(); !n) return n.status();

  auto t0 = Clock::now();
  if (Status s = PostAll(sites.europe().ingest_port, "snk", r.messages, o.clients, o.batch); !s)
    return s;
  r.ingest_seconds = SecondsSince(t0);
  std::printf("  europe ingested them in %.2f s (%.0f messages/s, %d clients x batches of %d)\n",
              r.ingest_seconds, static_cast<double>(r.messages) / r.ingest_seconds, o.clients,
              o.batch);
  std::fflush(stdout);

  // Export through europe's running daemon.
  const fs::path disk = dir / "usb";
  std::error_code ec;
  fs::create_directories(disk, ec);
  if (ec) return Status::Error("cannot create '" + disk.string() + "': " + ec.message());
  std::string export_threads, import_threads;
  {
    double cpu_before = CpuSeconds(sites.europe().pid);
    CliCommand cmd;
    if (Status s = cmd.Start(o.relay_bin,
                             {"export", "--config", sites.europe().conf().string(), "--peer", "aws",
                              "--out", disk.string()},
                             dir / "export.out", dir / "export.err");
        !s)
      return s;
    auto code = cmd.Wait(std::chrono::seconds(300));
    if (!code) return code.status();
    if (*code != 0) return Status::Error(cmd.Failed());
    r.export_seconds = cmd.seconds();
    if (Status s = sites.CheckAlive(); !s) return s;
    // Whole process (exited threads included): the export may run on a short-lived thread.
    char buf[96];
    std::snprintf(buf, sizeof buf, "%.2f CPU s over %.2f s wall",
                  CpuSeconds(sites.europe().pid) - cpu_before, r.export_seconds);
    export_threads = buf;
  }
  BundleFiles files = ListBundles(disk);
  r.bundle_files = files.files;
  r.bundle_bytes = files.bytes;
  r.export_mb_s = payload_mb / r.export_seconds;
  std::printf(
      "  relay export (through europe's daemon): %.2f s -> %8.1f MB/s of payload; %llu file(s), "
      "%.1f MB (%.3f file bytes per payload byte)\n",
      r.export_seconds, r.export_mb_s, static_cast<unsigned long long>(r.bundle_files),
      static_cast<double>(r.bundle_bytes) / kMB,
      static_cast<double>(r.bundle_bytes) / (payload_mb * kMB));
  std::printf("    europe's daemon used %s\n", export_threads.c_str());
  std::fflush(stdout);

  // Import into aws's running daemon, until the last line is in its sink.
  {
    ThreadCpu before = ThreadCpuSeconds(sites.aws().pid);
    CliCommand cmd;
    auto t_import = Clock::now();
    if (Status s = cmd.Start(o.relay_bin,
                             {"import", "--config", sites.aws().conf().string(), disk.string()},
                             dir / "import.out", dir / "import.err");
        !s)
      return s;
    auto poll = [&]() -> Status {
      if (Status s = sites.CheckAlive(); !s) return s;
      if (auto c = cmd.Poll(); c && *c != 0) return Status::Error(cmd.Failed());
      return Status::Ok();
    };
    auto seconds = WaitForLines(&tail, r.messages, t_import, kStallTimeout, poll,
                                [&](std::uint64_t) { (void)cmd.Poll(); });
    if (!seconds) return seconds.status().Wrap("import" + sites.Logs());
    r.import_seconds = *seconds;
    import_threads = BusiestThreads(before, ThreadCpuSeconds(sites.aws().pid), r.import_seconds, 4);
    auto code = cmd.Wait(std::chrono::seconds(300));
    if (!code) return code.status();
    if (*code != 0) return Status::Error(cmd.Failed());
    r.import_cmd_seconds = cmd.seconds();
  }
  if (auto n = tail.ReadNew(); !n || *n != 0)
    return Status::Error("aws's sink has more lines than messages sent");
  if (Status s = VerifySink(sites.aws().sink(), "snk", r.messages); !s) return s;
  r.import_mb_s = payload_mb / r.import_seconds;
  r.import_cmd_mb_s = payload_mb / r.import_cmd_seconds;
  std::printf(
      "  relay import (through aws's daemon) -> last line in aws's sink: %.2f s -> %8.1f MB/s "
      "of payload\n",
      r.import_seconds, r.import_mb_s);
  std::printf("  the import command itself: %.2f s -> %8.1f MB/s; all %llu arrived exactly once\n",
              r.import_cmd_seconds, r.import_cmd_mb_s, static_cast<unsigned long long>(r.messages));
  std::printf("    aws's busiest threads until the last line, CPU s per wall s: %s\n",
              import_threads.c_str());
  return r;
}

// ---- 5. diode goodput ------------------------------------------------------------------------

// A lossy UDP link: a thread forwarding datagrams from its own port to `target`, dropping each
// with probability loss() (seeded RNG, so a run is repeatable up to timing), counting what
// passes through.
class UdpForwarder {
 public:
  ~UdpForwarder() { Stop(); }
  Status Start(std::uint16_t target_port, std::uint64_t seed) {
    in_fd_ = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    out_fd_ = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (in_fd_ < 0 || out_fd_ < 0)
      return Status::Error(std::string("UDP socket: ") + std::strerror(errno));
    // A large buffer (beyond rmem_max when allowed): the forwarder should not be the lossy part.
    int buf = 32 << 20;
    if (setsockopt(in_fd_, SOL_SOCKET, SO_RCVBUFFORCE, &buf, sizeof buf) != 0)
      setsockopt(in_fd_, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
    if (setsockopt(out_fd_, SOL_SOCKET, SO_SNDBUFFORCE, &buf, sizeof buf) != 0)
      setsockopt(out_fd_, SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (bind(in_fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
        getsockname(in_fd_, reinterpret_cast<sockaddr*>(&a), &len) != 0)
      return Status::Error(std::string("UDP bind: ") + std::strerror(errno));
    port_ = ntohs(a.sin_port);
    sockaddr_in t{};
    t.sin_family = AF_INET;
    t.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    t.sin_port = htons(target_port);
    if (connect(out_fd_, reinterpret_cast<sockaddr*>(&t), sizeof t) != 0)
      return Status::Error(std::string("UDP connect: ") + std::strerror(errno));
    rng_.seed(seed);
    thread_ = std::thread([this] { Loop(); });
    return Status::Ok();
  }
  void Stop() {
    stop_.store(true);
    if (thread_.joinable()) thread_.join();
    for (int* fd : {&in_fd_, &out_fd_})
      if (*fd >= 0) close(*fd), *fd = -1;
  }
  std::uint16_t port() const { return port_; }
  void set_loss(double loss) { loss_ppm_.store(static_cast<std::uint32_t>(loss * 1e6)); }
  struct Counts {
    std::uint64_t in = 0, in_bytes = 0, dropped = 0, forwarded = 0;
  };
  Counts counts() const {
    return {in_.load(), in_bytes_.load(), dropped_.load(), forwarded_.load()};
  }
  // When the last datagram of at least 256 bytes arrived (heartbeats are smaller).
  std::int64_t last_data_ns() const { return last_data_ns_.load(); }

 private:
  void Loop() {
    constexpr int kBatch = 64;
    constexpr std::size_t kMax = 65536;
    std::vector<char> bufs(kBatch * kMax);
    mmsghdr in[kBatch], out[kBatch];
    iovec in_iov[kBatch], out_iov[kBatch];
    std::memset(in, 0, sizeof in);
    for (int i = 0; i < kBatch; ++i) {
      in_iov[i] = {bufs.data() + static_cast<std::size_t>(i) * kMax, kMax};
      in[i].msg_hdr.msg_iov = &in_iov[i];
      in[i].msg_hdr.msg_iovlen = 1;
    }
    std::uniform_int_distribution<std::uint32_t> ppm(0, 999999);
    pollfd pfd{in_fd_, POLLIN, 0};
    while (!stop_.load()) {
      if (poll(&pfd, 1, 100) <= 0) continue;
      int n = recvmmsg(in_fd_, in, kBatch, MSG_DONTWAIT, nullptr);
      if (n <= 0) continue;
      std::uint32_t loss = loss_ppm_.load();
      int kept = 0;
      std::uint64_t bytes = 0;
      for (int i = 0; i < n; ++i) {
        bytes += in[i].msg_len;
        if (loss > 0 && ppm(rng_) < loss) continue;
        out_iov[kept] = {in_iov[i].iov_base, in[i].msg_len};
        std::memset(&out[kept], 0, sizeof out[kept]);
        out[kept].msg_hdr.msg_iov = &out_iov[kept];
        out[kept].msg_hdr.msg_iovlen = 1;
        ++kept;
      }
      in_.fetch_add(static_cast<std::uint64_t>(n));
      in_bytes_.fetch_add(bytes);
      for (int i = 0; i < n; ++i)
        if (in[i].msg_len >= 256) {
          last_data_ns_.store(NowNs());
          break;
        }
      dropped_.fetch_add(static_cast<std::uint64_t>(n - kept));
      // A full receive buffer at aws loses the datagram silently, as a diode would.
      for (int done = 0; done < kept;) {
        int s = sendmmsg(out_fd_, out + done, static_cast<unsigned>(kept - done), 0);
        if (s <= 0) break;
        done += s;
        forwarded_.fetch_add(static_cast<std::uint64_t>(s));
      }
    }
  }

  int in_fd_ = -1, out_fd_ = -1;
  std::uint16_t port_ = 0;
  std::mt19937_64 rng_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<std::uint32_t> loss_ppm_{0};
  std::atomic<std::uint64_t> in_{0}, in_bytes_{0}, dropped_{0}, forwarded_{0};
  std::atomic<std::int64_t> last_data_ns_{0};
};

struct DiodeRound {
  double loss = 0;
  double seconds = 0;  // first POST -> last line in aws's sink
  double goodput_mb_s = 0;
  double ratio_to_rate = 0;  // goodput / diode_rate
  // After the sender's token bucket ran dry (it holds one second of burst, `diode_rate` bytes,
  // sent unpaced): bytes/s reaching the forwarder from then to the last data datagram, and the
  // payload goodput it carries (divided by wire bytes per payload byte). Measured at the
  // forwarder, so the receiver's pipeline lag does not skew it. NaN when the round put less
  // than 1.2 x `diode_rate` bytes on the wire.
  double paced_wire_mb_s = std::nan("");
  double paced_goodput_mb_s = std::nan("");
  double paced_ratio_to_rate = std::nan("");
  std::uint64_t datagrams_sent = 0;      // europe: relay_diode_datagrams_sent_total
  std::uint64_t datagrams_in = 0;        // reached the forwarder
  std::uint64_t wire_bytes = 0;          // bytes of the datagrams that reached the forwarder
  std::uint64_t dropped = 0;             // by the forwarder, on purpose
  std::uint64_t datagrams_received = 0;  // aws: relay_diode_datagrams_received_total
  double overhead = 0;                   // wire bytes / payload bytes
  std::uint64_t shards_recovered = 0;    // aws: relay_diode_shards_recovered_total
};

struct Diode {
  std::uint64_t messages = 0;
  std::vector<DiodeRound> rounds;
};

Result<Diode> MeasureDiode(const Options& o, const fs::path& dir) {
  Diode d;
  d.messages = o.diode_messages;
  const double payload = static_cast<double>(d.messages) * kTextBytes;
  std::printf(
      "\n== 5. diode goodput: %llu messages of 1 KiB per round, europe -> aws over UDP, "
      "diode_rate %s, FEC 16 data + 8 parity shards (the defaults)\n",
      static_cast<unsigned long long>(d.messages), o.diode_rate.c_str());
  std::fflush(stdout);
  std::printf(
      "  per round a fresh pair: europe sends to a forwarder thread that drops datagrams (seeded), "
      "then on to aws\n");
  std::fflush(stdout);
  const char* const tags[] = {"d00", "d05"};
  const double losses[] = {0.0, 0.05};
  for (int round = 0; round < 2; ++round) {
    DiodeRound rr;
    rr.loss = losses[round];
    // A fresh pair per round, posted to as soon as it is up: the sender's token bucket fills
    // while the link is idle (up to one second of `diode_rate`), and a round started after an
    // idle second begins with a burst of that size at full CPU speed, which overflows aws's
    // socket buffer at 50MiB (losses beyond what FEC repairs, even with no loss on the link).
    // Paced at 50MiB, aws's receive thread (which also stores each batch of frames) still falls
    // behind now and then at 5 % loss and its socket buffer (net.core.rmem_max, 4 MiB here)
    // overflows: hence the default of 20MiB.
    const std::uint16_t aws_diode_port = FreePort(SOCK_DGRAM);
    if (aws_diode_port == 0) return Status::Error("cannot find a free loopback port");
    UdpForwarder fwd;
    if (Status s = fwd.Start(aws_diode_port, /*seed=*/20261126 + round); !s) return s;
    fwd.set_loss(rr.loss);
    SitePair sites(dir / tags[round], o.relay_bin, SitePair::Mode::kDiode,
                   DiodeSetup{fwd.port(), o.diode_rate});
    sites.SetAwsDiodePort(aws_diode_port);
    if (Status s = sites.Start(); !s) return s;
    SinkTail tail;
    if (Status s = tail.Open(sites.aws().sink()); !s) return s;
    if (auto n = tail.ReadNew(); !n) return n.status();
    const std::uint16_t eu_port = sites.europe().ingest_port, aws_port = sites.aws().ingest_port;
    // aws refreshes the recovered-shards counter once a second: each round ends with a pause.
    struct Snapshot {
      double sent = 0, received = 0, recovered = 0;
      UdpForwarder::Counts fwd;
    };
    auto snapshot = [&]() -> Result<Snapshot> {
      Snapshot s;
      auto sent = ReadMetric(eu_port, "relay_diode_datagrams_sent_total");
      if (!sent) return sent.status();
      auto received = ReadMetric(aws_port, "relay_diode_datagrams_received_total");
      if (!received) return received.status();
      auto recovered = ReadMetric(aws_port, "relay_diode_shards_recovered_total");
      if (!recovered) return recovered.status();
      s.sent = *sent;
      s.received = *received;
      s.recovered = *recovered;
      s.fwd = fwd.counts();
      return s;
    };
    auto before = snapshot();
    if (!before) return before.status();
    Status post_status;
    std::atomic<bool> posted{false};
    std::optional<std::pair<std::int64_t, std::uint64_t>> burst_end;  // ns, forwarder bytes
    auto t0 = Clock::now();
    std::thread poster([&] {
      post_status = PostAll(eu_port, tags[round], d.messages, o.clients, o.batch);
      posted.store(true);
    });
    auto poll = [&]() -> Status {
      if (posted.load() && !post_status.ok()) return post_status;
      return sites.CheckAlive();
    };
    // Generous: with 5 % loss every message must still arrive through FEC alone.
    auto seconds =
        WaitForLines(&tail, d.messages, t0, kDiodeStallTimeout, poll, [&](std::uint64_t) {
          if (burst_end) return;
          std::uint64_t bytes = fwd.counts().in_bytes - before->fwd.in_bytes;
          if (bytes >= o.diode_rate_bytes) burst_end.emplace(NowNs(), bytes);
        });
    poster.join();
    if (!seconds) {
      // Where the datagrams went: sent by europe, through the forwarder, received by aws.
      std::string where;
      if (auto now = snapshot()) {
        UdpForwarder::Counts f = now->fwd;
        auto missing = ReadMetric(aws_port, "relay_diode_frames_missing");
        where = "; datagrams this round: europe sent " +
                std::to_string(static_cast<std::uint64_t>(now->sent - before->sent)) +
                ", forwarder got " + std::to_string(f.in - before->fwd.in) + ", dropped " +
                std::to_string(f.dropped - before->fwd.dropped) + ", forwarded " +
                std::to_string(f.forwarded - before->fwd.forwarded) + ", aws received " +
                std::to_string(static_cast<std::uint64_t>(now->received - before->received)) +
                "; aws: frames missing " + (missing ? Num(*missing, 0) : missing.message()) +
                ", shards rebuilt " +
                std::to_string(static_cast<std::uint64_t>(now->recovered - before->recovered));
      }
      return Status::Error(std::to_string(round * 5) + " % loss: " + seconds.message() + where +
                           sites.Logs());
    }
    if (!post_status.ok()) return post_status;
    rr.seconds = *seconds;
    std::this_thread::sleep_for(std::chrono::milliseconds(1100));
    auto after = snapshot();
    if (!after) return after.status();
    if (auto n = tail.ReadNew(); !n || *n != 0)
      return Status::Error("aws's sink has more lines than messages sent over the diode");
    if (Status s = VerifySink(sites.aws().sink(), tags[round], d.messages); !s) return s;
    rr.goodput_mb_s = payload / kMB / rr.seconds;
    rr.ratio_to_rate = payload / rr.seconds / static_cast<double>(o.diode_rate_bytes);
    rr.datagrams_sent = static_cast<std::uint64_t>(after->sent - before->sent);
    rr.datagrams_received = static_cast<std::uint64_t>(after->received - before->received);
    rr.shards_recovered = static_cast<std::uint64_t>(after->recovered - before->recovered);
    rr.datagrams_in = after->fwd.in - before->fwd.in;
    rr.wire_bytes = after->fwd.in_bytes - before->fwd.in_bytes;
    rr.dropped = after->fwd.dropped - before->fwd.dropped;
    rr.overhead = static_cast<double>(rr.wire_bytes) / payload;
    if (burst_end && static_cast<double>(rr.wire_bytes) >= 1.2 * o.diode_rate_bytes) {
      double paced_s = static_cast<double>(fwd.last_data_ns() - burst_end->first) / 1e9;
      double paced_bytes = static_cast<double>(rr.wire_bytes - burst_end->second);
      rr.paced_wire_mb_s = paced_bytes / kMB / paced_s;
      rr.paced_goodput_mb_s = rr.paced_wire_mb_s / rr.overhead;
      rr.paced_ratio_to_rate =
          rr.paced_goodput_mb_s * kMB / static_cast<double>(o.diode_rate_bytes);
    }
    std::printf(
        "  %2.0f %% loss: all %llu arrived exactly once in %.2f s -> goodput %7.1f MB/s = %.3f "
        "of the rate limit\n",
        rr.loss * 100, static_cast<unsigned long long>(d.messages), rr.seconds, rr.goodput_mb_s,
        rr.ratio_to_rate);
    if (std::isfinite(rr.paced_goodput_mb_s)) {
      std::printf(
          "    paced part (after the first diode_rate bytes, the most the sender may burst): wire "
          "%.1f MB/s = %.3f of the rate limit, "
          "goodput %.1f MB/s = %.3f of it\n",
          rr.paced_wire_mb_s, rr.paced_wire_mb_s * kMB / static_cast<double>(o.diode_rate_bytes),
          rr.paced_goodput_mb_s, rr.paced_ratio_to_rate);
    } else {
      std::printf(
          "    (the round put less than 1.2 x diode_rate bytes on the wire: no paced part to "
          "measure)\n");
    }
    std::printf(
        "    on the wire %.1f MB = %.3f bytes per payload byte; datagrams: europe sent %llu, "
        "forwarder got %llu, dropped %llu, aws received %llu; shards rebuilt by FEC %llu\n",
        static_cast<double>(rr.wire_bytes) / kMB, rr.overhead,
        static_cast<unsigned long long>(rr.datagrams_sent),
        static_cast<unsigned long long>(rr.datagrams_in),
        static_cast<unsigned long long>(rr.dropped),
        static_cast<unsigned long long>(rr.datagrams_received),
        static_cast<unsigned long long>(rr.shards_recovered));
    std::fflush(stdout);
    d.rounds.push_back(rr);
  }
  return d;
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
  // Phases 4 and 5 remove their folders when done (big stores), unless --keep.
  auto drop_dir = [&](const fs::path& dir) {
    std::error_code e;
    if (!o.keep) fs::remove_all(dir, e);
  };
  auto snk = MeasureSneakernet(o, root / "sneakernet");
  if (!snk) return fail("sneakernet", snk.message());
  drop_dir(root / "sneakernet");
  const double ratio_export_aead = snk->export_mb_s / raw->aead_mb_s;
  const double ratio_export_batch = snk->export_mb_s / raw->batch_mb_s;
  const double ratio_import_aead = snk->import_mb_s / raw->aead_mb_s;
  const double ratio_import_batch = snk->import_mb_s / raw->batch_mb_s;
  std::printf("  ratio export MB/s / AEAD MB/s             = %.3f\n", ratio_export_aead);
  std::printf("  ratio export MB/s / synced 1000x1KiB MB/s = %.3f\n", ratio_export_batch);
  std::printf("  ratio import MB/s / AEAD MB/s             = %.3f\n", ratio_import_aead);
  std::printf("  ratio import MB/s / synced 1000x1KiB MB/s = %.3f\n", ratio_import_batch);
  std::printf(
      "    export seals each byte once and writes + syncs the bundle; import opens each byte once "
      "and syncs it twice (aws WAL, aws sink)\n");
  std::fflush(stdout);
  auto diode = MeasureDiode(o, root / "diode");
  if (!diode) return fail("diode", diode.message());
  drop_dir(root / "diode");

  bool tp_pass = tp->msgs_per_s >= kTargetMessagesPerSecond;
  bool lat_pass = lat->p99 <= kTargetP99Ms;
  bool export_pass = snk->export_mb_s >= kTargetBundleMBPerSecond;
  bool import_pass = snk->import_mb_s >= kTargetBundleMBPerSecond;
  std::printf("\n== 6. targets (docs/design.md; bundles: this benchmark's brief)\n");
  std::printf("  %-4s end to end %.0f messages/s of 1 KiB (target >= %.0f)\n",
              tp_pass ? "PASS" : "MISS", tp->msgs_per_s, kTargetMessagesPerSecond);
  std::printf("  %-4s p99 ingest->delivered %.2f ms at %.0f messages/s (target <= %.0f ms)\n",
              lat_pass ? "PASS" : "MISS", lat->p99, lat->rate, kTargetP99Ms);
  std::printf("  %-4s relay export %.1f MB/s of payload (target >= %.0f)\n",
              export_pass ? "PASS" : "MISS", snk->export_mb_s, kTargetBundleMBPerSecond);
  std::printf("  %-4s relay import to aws's sink %.1f MB/s of payload (target >= %.0f)\n",
              import_pass ? "PASS" : "MISS", snk->import_mb_s, kTargetBundleMBPerSecond);

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
  field("sneakernet_messages", std::to_string(snk->messages));
  field("sneakernet_ingest_seconds", Num(snk->ingest_seconds, 3));
  field("sneakernet_export_seconds", Num(snk->export_seconds, 3));
  field("sneakernet_export_mb_s", Num(snk->export_mb_s, 1));
  field("sneakernet_bundle_files", std::to_string(snk->bundle_files));
  field("sneakernet_bundle_bytes", std::to_string(snk->bundle_bytes));
  field("sneakernet_import_seconds", Num(snk->import_seconds, 3));
  field("sneakernet_import_mb_s", Num(snk->import_mb_s, 1));
  field("sneakernet_import_cmd_seconds", Num(snk->import_cmd_seconds, 3));
  field("sneakernet_import_cmd_mb_s", Num(snk->import_cmd_mb_s, 1));
  field("ratio_export_mb_to_aead", Num(ratio_export_aead, 4));
  field("ratio_export_mb_to_synced_batch_mb", Num(ratio_export_batch, 4));
  field("ratio_import_mb_to_aead", Num(ratio_import_aead, 4));
  field("ratio_import_mb_to_synced_batch_mb", Num(ratio_import_batch, 4));
  field("target_export", export_pass ? "\"PASS\"" : "\"MISS\"");
  field("target_import", import_pass ? "\"PASS\"" : "\"MISS\"");
  field("diode_messages", std::to_string(diode->messages));
  field("diode_rate_bytes_s", std::to_string(o.diode_rate_bytes));
  for (const DiodeRound& rr : diode->rounds) {
    char prefix[32];
    std::snprintf(prefix, sizeof prefix, "diode_loss%02.0f_", rr.loss * 100);
    auto name = [&prefix](const char* n) { return std::string(prefix) + n; };
    field(name("seconds").c_str(), Num(rr.seconds, 3));
    field(name("goodput_mb_s").c_str(), Num(rr.goodput_mb_s, 1));
    field(name("ratio_to_rate").c_str(), Num(rr.ratio_to_rate, 4));
    field(name("paced_wire_mb_s").c_str(), Num(rr.paced_wire_mb_s, 1));
    field(name("paced_goodput_mb_s").c_str(), Num(rr.paced_goodput_mb_s, 1));
    field(name("paced_ratio_to_rate").c_str(), Num(rr.paced_ratio_to_rate, 4));
    field(name("wire_bytes").c_str(), std::to_string(rr.wire_bytes));
    field(name("wire_per_payload_byte").c_str(), Num(rr.overhead, 4));
    field(name("datagrams_sent").c_str(), std::to_string(rr.datagrams_sent));
    field(name("datagrams_forwarder_in").c_str(), std::to_string(rr.datagrams_in));
    field(name("datagrams_dropped").c_str(), std::to_string(rr.dropped));
    field(name("datagrams_received").c_str(), std::to_string(rr.datagrams_received));
    field(name("shards_recovered").c_str(), std::to_string(rr.shards_recovered));
  }
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
    "  --sneakernet-messages N  messages exported and imported as bundles (default 200000)\n"
    "  --diode-messages N       messages per diode round, 0 % and 5 % loss (default 50000)\n"
    "  --diode-rate SIZE        diode_rate of the diode sender, bytes/s (default 20MiB;\n"
    "                           4MiB with --quick)\n"
    "  --relay PATH   the relay binary (default $RELAY_BIN, else the one built with the bench)\n"
    "  --keep         keep the temporary folder (configs, logs, sinks)\n"
    "  --quick        smoke run: 20000 messages (bundles too; diode 5000), 3 s of latency,\n"
    "                 short raw-limit loops\n"
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
    o.sneakernet_messages = 20000;
    o.diode_messages = 5000;
    o.diode_rate = "4MiB";  // so that part of a round is paced by the limit
    o.diode_rate_bytes = 4u << 20;
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
    static const char* const kValued[] = {"--messages",
                                          "--clients",
                                          "--batch",
                                          "--rate",
                                          "--seconds",
                                          "--relay",
                                          "--sneakernet-messages",
                                          "--diode-messages",
                                          "--diode-rate"};
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
    } else if (name == "--sneakernet-messages" || name == "--diode-messages") {
      if (!number(1, 1e8, &v) || v != std::floor(v))
        return bad(name + " '" + value + "': expected a whole number 1..1e8");
      (name == "--diode-messages" ? o.diode_messages : o.sneakernet_messages) =
          static_cast<std::uint64_t>(v);
    } else if (name == "--diode-rate") {
      auto bytes = config::ParseSize(value);
      if (!bytes || *bytes < 1024 || *bytes > (std::uint64_t{10} << 30))
        return bad("--diode-rate '" + value + "': expected a size 1KiB..10GiB, e.g. 50MiB");
      o.diode_rate = value;
      o.diode_rate_bytes = *bytes;
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
