#include "relay/demo.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "base/json.h"
#include "crypto/api_token.h"
#include "crypto/identity.h"
#include "relay/http_server.h"

extern char** environ;

namespace relay {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

std::uint16_t FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  std::uint16_t port = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0)
    port = ntohs(a.sin_port);
  close(fd);
  return port;
}

struct DemoSite {
  std::string name;
  fs::path dir;
  std::uint16_t ingest_port = 0, zmq_port = 0;
  std::string identity;
  pid_t pid = -1;
  fs::path conf() const { return dir / (name + ".conf"); }
  fs::path key() const { return dir / (name + ".key"); }
  fs::path token() const { return dir / "ingest.token"; }  // the API's bearer token
  fs::path sink() const { return dir / "war-room.jsonl"; }
  fs::path log() const { return dir / "relay.log"; }
};

std::vector<std::string> ReadLines(const fs::path& p) {
  std::vector<std::string> out;
  std::ifstream in(p);
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) out.push_back(line);
  return out;
}

// Pulls a top-level string field out of one sink line (the demo's own output; well-formed).
std::string Field(const std::string& line, const std::string& key) {
  std::string needle = "\"" + key + "\":\"";
  auto pos = line.find(needle);
  if (pos == std::string::npos) return "";
  pos += needle.size();
  std::string out;
  while (pos < line.size() && line[pos] != '"') {
    if (line[pos] == '\\' && pos + 1 < line.size()) ++pos;
    out.push_back(line[pos++]);
  }
  return out;
}

bool Spawn(DemoSite& s, const std::string& self) {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, s.log().c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  std::string conf = s.conf().string();
  std::vector<char*> argv = {const_cast<char*>(self.c_str()), const_cast<char*>("run"),
                             const_cast<char*>("--config"), conf.data(), nullptr};
  int rc = posix_spawn(&s.pid, self.c_str(), &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  return rc == 0;
}

bool WaitHealthy(const DemoSite& s) {
  auto end = Clock::now() + std::chrono::seconds(20);
  while (Clock::now() < end) {
    int status = 0;
    if (waitpid(s.pid, &status, WNOHANG) == s.pid) return false;
    HttpClient c("127.0.0.1", s.ingest_port);
    auto r = c.Request("GET", "/healthz");
    if (r && r->status == 200) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

void StopSite(DemoSite& s) {
  if (s.pid <= 0) return;
  kill(s.pid, SIGTERM);
  int status = 0;
  for (int i = 0; i < 100; ++i) {
    if (waitpid(s.pid, &status, WNOHANG) == s.pid) {
      s.pid = -1;
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  kill(s.pid, SIGKILL);
  waitpid(s.pid, &status, 0);
  s.pid = -1;
}

void WriteConfig(const DemoSite& self, const DemoSite& peer, bool dial) {
  std::ofstream f(self.conf());
  f << "# relay demo site '" << self.name << "'\n"
    << "[site]\nname = " << self.name << "\nkey_file = " << self.name << ".key\n"
    << "data_dir = data\n\n"
    << "[ingest]\nlisten = 127.0.0.1:" << self.ingest_port << "\ntoken_file = ingest.token\n\n"
    << "[zmq]\nlisten = tcp://127.0.0.1:" << self.zmq_port << "\n\n"
    << "[peer." << peer.name << "]\npublic_key = " << peer.identity << "\n";
  if (dial) f << "zmq_connect = tcp://127.0.0.1:" << peer.zmq_port << "\n";
  f << "\n[channel.war-room]\npeers = " << peer.name << "\nsink = jsonl\n"
    << "jsonl_path = war-room.jsonl\n";
}

bool PostMessages(DemoSite& from, int count, std::string* error) {
  HttpClient c("127.0.0.1", from.ingest_port);
  auto token = crypto::ApiToken::LoadFile(from.token().string());
  if (!token) {
    *error = token.message();
    return false;
  }
  c.SetBearerToken(token->value());
  const int kBatch = 250;
  for (int start = 0; start < count; start += kBatch) {
    std::string body = "[";
    for (int i = start; i < std::min(count, start + kBatch); ++i) {
      if (i > start) body += ",";
      std::string author = from.name == "europe" ? "alice" : "bob";
      body += "{\"channel\":\"war-room\",\"author\":\"" + author + "\",\"text\":" +
              JsonString("message " + std::to_string(i + 1) + " from " + from.name) +
              ",\"id\":\"demo-" + from.name + "-" + std::to_string(i + 1) + "\"}";
    }
    body += "]";
    auto r = c.Request("POST", "/v1/messages", body);
    if (!r || r->status != 202) {
      *error = r ? "HTTP " + std::to_string(r->status) + ": " + r->body : r.message();
      return false;
    }
  }
  return true;
}

}  // namespace

int RunDemo(const DemoOptions& options) {
  if (Status s = crypto::Init(); !s) {
    std::fprintf(stderr, "relay demo: %s\n", s.message().c_str());
    return 1;
  }
  std::error_code ec;
  std::string self = fs::read_symlink("/proc/self/exe", ec).string();
  if (ec) {
    std::fprintf(stderr, "relay demo: cannot find own binary: %s\n", ec.message().c_str());
    return 1;
  }
  std::string tmpl = (fs::temp_directory_path() / "relay-demo-XXXXXX").string();
  if (!mkdtemp(tmpl.data())) {
    std::perror("relay demo: mkdtemp");
    return 1;
  }
  fs::path root = tmpl;
  DemoSite eu, aws;
  eu.name = "europe";
  eu.dir = root / "europe";
  aws.name = "aws";
  aws.dir = root / "aws";
  int rc = 1;
  std::string error;
  auto finish = [&]() {
    StopSite(eu);
    StopSite(aws);
    if (options.keep) {
      std::printf("demo folder kept: %s\n", root.c_str());
    } else {
      fs::remove_all(root, ec);
    }
    return rc;
  };
  for (DemoSite* s : {&eu, &aws}) {
    fs::create_directories(s->dir);
    s->ingest_port = FreePort();
    s->zmq_port = FreePort();
    if (Status st = crypto::SiteKey::CreateFile(s->key().string()); !st) {
      std::fprintf(stderr, "relay demo: %s\n", st.message().c_str());
      return finish();
    }
    s->identity = crypto::SiteKey::LoadFile(s->key().string())->identity().ToString();
    if (Status st = crypto::ApiToken::CreateFile(s->token().string()); !st) {
      std::fprintf(stderr, "relay demo: %s\n", st.message().c_str());
      return finish();
    }
  }
  WriteConfig(eu, aws, /*dial=*/true);
  WriteConfig(aws, eu, /*dial=*/false);
  std::printf("relay demo: two sites in %s\n", root.c_str());
  std::printf("  europe  ingest 127.0.0.1:%u  dials aws over ZeroMQ\n", eu.ingest_port);
  std::printf("  aws     ingest 127.0.0.1:%u  zmq listen 127.0.0.1:%u\n", aws.ingest_port,
              aws.zmq_port);
  for (DemoSite* s : {&eu, &aws}) {
    if (!Spawn(*s, self) || !WaitHealthy(*s)) {
      std::fprintf(stderr, "relay demo: site '%s' did not start; its log:\n", s->name.c_str());
      for (const auto& l : ReadLines(s->log())) std::fprintf(stderr, "  %s\n", l.c_str());
      return finish();
    }
  }
  auto t0 = Clock::now();
  int n = options.messages;
  std::printf("sending %d messages europe -> aws and %d aws -> europe (batches of 250)\n", n, n);
  if (!PostMessages(eu, n, &error) || !PostMessages(aws, n, &error)) {
    std::fprintf(stderr, "relay demo: posting failed: %s\n", error.c_str());
    return finish();
  }
  // Post the first batch again: client ids make this a no-op.
  if (!PostMessages(eu, std::min(n, 250), &error)) {
    std::fprintf(stderr, "relay demo: posting failed: %s\n", error.c_str());
    return finish();
  }
  auto end = Clock::now() + std::chrono::seconds(60);
  while (Clock::now() < end && (ReadLines(aws.sink()).size() < static_cast<std::size_t>(n) ||
                                ReadLines(eu.sink()).size() < static_cast<std::size_t>(n))) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  bool ok = true;
  for (DemoSite* s : {&aws, &eu}) {
    auto lines = ReadLines(s->sink());
    std::set<std::string> ids;
    std::size_t in_order = 0;
    for (std::size_t i = 0; i < lines.size(); ++i) {
      ids.insert(Field(lines[i], "id"));
      std::string from = s == &aws ? "europe" : "aws";
      if (Field(lines[i], "text") == "message " + std::to_string(i + 1) + " from " + from)
        ++in_order;
    }
    std::printf("\n%s's sink %s: %zu lines, %zu distinct ids, %zu in order\n", s->name.c_str(),
                s->sink().c_str(), lines.size(), ids.size(), in_order);
    for (std::size_t i = 0; i < lines.size() && i < 2; ++i) std::printf("  %s\n", lines[i].c_str());
    if (lines.size() > 2) std::printf("  ... (%zu more)\n", lines.size() - 2);
    ok = ok && lines.size() == static_cast<std::size_t>(n) && ids.size() == lines.size() &&
         in_order == lines.size();
  }
  std::printf("\nsummary: %d + %d messages crossed in %.2f s, each exactly once and in order: %s\n",
              n, n, secs, ok ? "yes" : "NO");
  rc = ok ? 0 : 1;
  return finish();
}

}  // namespace relay
