#include <catch2/catch.hpp>

#include <arpa/inet.h>
#include <curl/curl.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "chat/mattermost_client.h"

#include "tests/test_util.h"

using relay::chat::MattermostClient;
using relay::chat::MattermostOptions;
using relay::chat::MattermostWebSocket;
using relay::chat::MmError;
using relay::chat::MmNewPost;
using relay::chat::MmWsEvent;
using relay::chat::ParseMmFileInfo;
using relay::chat::ParseMmPost;
using relay::chat::ParseMmPostList;
using relay::chat::ParseMmReaction;
using relay::chat::ParseMmWsEvent;

namespace {

std::shared_ptr<const relay::crypto::Secret> Token(const std::string& text) {
  return std::make_shared<const relay::crypto::Secret>(relay::crypto::Secret::FromString(text));
}

// A post as the server serialises it (model.Post with metadata).
const char* const kFullPost = R"({
  "id": "p1aaaaaaaaaaaaaaaaaaaaaaaa",
  "create_at": 1700000000001,
  "update_at": 1700000000005,
  "edit_at": 1700000000004,
  "delete_at": 0,
  "is_pinned": false,
  "user_id": "u1aaaaaaaaaaaaaaaaaaaaaaaa",
  "channel_id": "c1aaaaaaaaaaaaaaaaaaaaaaaa",
  "root_id": "r1aaaaaaaaaaaaaaaaaaaaaaaa",
  "original_id": "",
  "message": "hello \"world\"\nline 2 \u00e9",
  "type": "",
  "props": {"from_bot": "true", "relay_origin": {"site": "aws", "seq": 3}},
  "hashtags": "",
  "file_ids": ["f1aaaaaaaaaaaaaaaaaaaaaaaa", "f2aaaaaaaaaaaaaaaaaaaaaaaa"],
  "pending_post_id": "",
  "reply_count": 2,
  "last_reply_at": 0,
  "participants": null,
  "metadata": {
    "embeds": [],
    "files": [],
    "reactions": [
      {"user_id": "u2aaaaaaaaaaaaaaaaaaaaaaaa", "post_id": "p1aaaaaaaaaaaaaaaaaaaaaaaa",
       "emoji_name": "+1", "create_at": 1700000000003, "update_at": 1700000000003,
       "delete_at": 0, "remote_id": "", "channel_id": "c1aaaaaaaaaaaaaaaaaaaaaaaa"},
      {"user_id": "u3aaaaaaaaaaaaaaaaaaaaaaaa", "post_id": "p1aaaaaaaaaaaaaaaaaaaaaaaa",
       "emoji_name": "white_check_mark", "create_at": 1700000000004}
    ]
  }
})";

}  // namespace

// ---------------------------------------------------------------------------------------------
// Parsing

TEST_CASE("ParseMmPost reads every documented field") {
  auto r = ParseMmPost(kFullPost);
  REQUIRE(r.ok());
  const auto& p = *r.value;
  CHECK(p.id == "p1aaaaaaaaaaaaaaaaaaaaaaaa");
  CHECK(p.create_at == 1700000000001);
  CHECK(p.update_at == 1700000000005);
  CHECK(p.edit_at == 1700000000004);
  CHECK(p.delete_at == 0);
  CHECK(p.user_id == "u1aaaaaaaaaaaaaaaaaaaaaaaa");
  CHECK(p.channel_id == "c1aaaaaaaaaaaaaaaaaaaaaaaa");
  CHECK(p.root_id == "r1aaaaaaaaaaaaaaaaaaaaaaaa");
  CHECK(p.original_id.empty());
  CHECK(p.message == "hello \"world\"\nline 2 \xc3\xa9");
  CHECK(p.type.empty());
  CHECK(p.file_ids ==
        std::vector<std::string>{"f1aaaaaaaaaaaaaaaaaaaaaaaa", "f2aaaaaaaaaaaaaaaaaaaaaaaa"});
  CHECK(p.props_json == R"({"from_bot":"true","relay_origin":{"seq":3,"site":"aws"}})");
  REQUIRE(p.reactions.size() == 2);
  CHECK(p.reactions[0].user_id == "u2aaaaaaaaaaaaaaaaaaaaaaaa");
  CHECK(p.reactions[0].post_id == "p1aaaaaaaaaaaaaaaaaaaaaaaa");
  CHECK(p.reactions[0].emoji_name == "+1");
  CHECK(p.reactions[0].create_at == 1700000000003);
  CHECK(p.reactions[1].emoji_name == "white_check_mark");
}

TEST_CASE("ParseMmPost tolerates missing and null fields except the id") {
  auto r = ParseMmPost(R"({"id":"abc","props":null,"file_ids":null,"metadata":{}})");
  REQUIRE(r.ok());
  CHECK(r.value->id == "abc");
  CHECK(r.value->props_json == "{}");
  CHECK(r.value->file_ids.empty());
  CHECK(r.value->reactions.empty());
  CHECK(r.value->create_at == 0);
  CHECK(r.value->message.empty());

  r = ParseMmPost(R"({"id":"abc"})");
  REQUIRE(r.ok());
  CHECK(r.value->props_json == "{}");

  r = ParseMmPost(R"({"message":"no id"})");
  REQUIRE_FALSE(r.ok());
  CHECK(r.error.message.find("\"id\"") != std::string::npos);
  r = ParseMmPost(R"({"id":""})");
  REQUIRE_FALSE(r.ok());
  CHECK(r.error.message.find("\"id\"") != std::string::npos);
}

TEST_CASE("ParseMmPostList and ParseMmFileInfo read replies and refuse garbage") {
  auto list =
      ParseMmPostList(R"({"order":["p1"],"posts":{"p1":{"id":"p1","message":"hi"},"r":{"id":"r"}},)"
                      R"("next_post_id":"","prev_post_id":""})");
  REQUIRE(list.ok());
  CHECK(list.value->order == std::vector<std::string>{"p1"});
  CHECK(list.value->posts.size() == 2);
  for (const char* bad : {"", "[]", "null", R"({"order":"p1"})", R"({"order":[1],"posts":{}})",
                          R"({"order":["p1"],"posts":{"p1":7}})", "<html>502</html>"}) {
    INFO(bad);
    CHECK_FALSE(ParseMmPostList(bad).ok());
  }
  auto info = ParseMmFileInfo(R"({"id":"f1","name":"a.png","mime_type":"image/png","size":12})");
  REQUIRE(info.ok());
  CHECK(info.value->name == "a.png");
  CHECK(info.value->size == 12);
  for (const char* bad : {"{}", R"({"id":"f1","size":"12"})", "[1]", "{"}) {
    INFO(bad);
    CHECK_FALSE(ParseMmFileInfo(bad).ok());
  }
}

TEST_CASE("ParseMmPost names the field of a wrong type") {
  struct Case {
    const char* json;
    const char* field;
  };
  const Case cases[] = {
      {R"({"id":"a","create_at":"1700000000000"})", "\"create_at\""},
      {R"({"id":"a","update_at":1.5})", "\"update_at\""},
      {R"({"id":"a","delete_at":true})", "\"delete_at\""},
      {R"({"id":"a","edit_at":18446744073709551615})", "\"edit_at\""},
      {R"({"id":7})", "\"id\""},
      {R"({"id":"a","message":["x"]})", "\"message\""},
      {R"({"id":"a","channel_id":{}})", "\"channel_id\""},
      {R"({"id":"a","file_ids":"f1"})", "\"file_ids\""},
      {R"({"id":"a","file_ids":["f1",2]})", "\"file_ids\""},
      {R"({"id":"a","props":"{}"})", "\"props\""},
      {R"({"id":"a","props":[]})", "\"props\""},
      {R"({"id":"a","metadata":[]})", "\"metadata\""},
      {R"({"id":"a","metadata":{"reactions":{}}})", "\"metadata.reactions\""},
      {R"({"id":"a","metadata":{"reactions":[{"user_id":"u","post_id":"a"}]}})", "\"emoji_name\""},
      {R"({"id":"a","metadata":{"reactions":[{"user_id":"u","post_id":"a","emoji_name":"x",
          "create_at":"now"}]}})",
       "\"create_at\""},
  };
  for (const Case& c : cases) {
    INFO(c.json);
    auto r = ParseMmPost(c.json);
    REQUIRE_FALSE(r.ok());
    CHECK(r.error.message.find(c.field) != std::string::npos);
    CHECK(r.error.id == "bad_reply");
  }
}

TEST_CASE("ParseMmPost rejects garbage without crashing") {
  for (const char* text : {"", "null", "[]", "\"post\"", "42", "{", "{\"id\":\"a\"", "<html>",
                           "{\"id\":\"a\"} trailing", "\xff\xfe{}"}) {
    INFO(text);
    auto r = ParseMmPost(text);
    CHECK_FALSE(r.ok());
    CHECK_FALSE(r.error.message.empty());
  }
  // Error messages quote the offending input, bounded.
  auto r = ParseMmPost(std::string(100000, 'x'));
  REQUIRE_FALSE(r.ok());
  CHECK(r.error.message.size() < 1000);
}

TEST_CASE("ParseMmReaction reads a reaction and requires its key") {
  auto r = ParseMmReaction(
      R"({"user_id":"u1","post_id":"p1","emoji_name":"tada","create_at":17,"update_at":17})");
  REQUIRE(r.ok());
  CHECK(r.value->user_id == "u1");
  CHECK(r.value->post_id == "p1");
  CHECK(r.value->emoji_name == "tada");
  CHECK(r.value->create_at == 17);
  CHECK_FALSE(ParseMmReaction(R"({"user_id":"u1","post_id":"p1"})").ok());
  CHECK_FALSE(ParseMmReaction(R"({"user_id":"u1","post_id":"p1","emoji_name":5})").ok());
  CHECK_FALSE(ParseMmReaction("[]").ok());
  CHECK_FALSE(ParseMmReaction("nope").ok());
}

TEST_CASE("ParseMmWsEvent unwraps the stringified post and reaction") {
  SECTION("hello") {
    auto r = ParseMmWsEvent(
        R"({"event":"hello","data":{"connection_id":"conn1","server_version":"9.11.0"},
            "broadcast":{"omit_users":null,"user_id":"u1","channel_id":"","team_id":""},
            "seq":0})");
    REQUIRE(r.ok());
    CHECK(r.value->event == "hello");
    CHECK(r.value->seq == 0);
    CHECK(r.value->connection_id == "conn1");
    CHECK(r.value->channel_id.empty());
    CHECK(r.value->post_json.empty());
  }
  SECTION("posted") {
    std::string post = R"({"id":"p1","channel_id":"c1","message":"hi \"there\"","props":{}})";
    std::string escaped;
    for (char c : post) {
      if (c == '"' || c == '\\') escaped += '\\';
      escaped += c;
    }
    std::string event = R"({"event":"posted","data":{"channel_display_name":"Town",
        "channel_name":"town","channel_type":"O","post":")" +
                        escaped + R"(","sender_name":"@bob","team_id":"t1"},
        "broadcast":{"omit_users":null,"user_id":"","channel_id":"c1","team_id":""},"seq":7})";
    auto r = ParseMmWsEvent(event);
    REQUIRE(r.ok());
    CHECK(r.value->event == "posted");
    CHECK(r.value->seq == 7);
    CHECK(r.value->channel_id == "c1");
    CHECK(r.value->post_json == post);
    auto p = ParseMmPost(r.value->post_json);
    REQUIRE(p.ok());
    CHECK(p.value->message == "hi \"there\"");
  }
  SECTION("reaction_added, channel from data") {
    auto r = ParseMmWsEvent(
        R"({"event":"reaction_added","data":{"channel_id":"c9","reaction":"{\"user_id\":\"u1\",\"post_id\":\"p1\",\"emoji_name\":\"+1\",\"create_at\":5}"},"seq":3})");
    REQUIRE(r.ok());
    CHECK(r.value->event == "reaction_added");
    CHECK(r.value->channel_id == "c9");
    auto reaction = ParseMmReaction(r.value->reaction_json);
    REQUIRE(reaction.ok());
    CHECK(reaction.value->emoji_name == "+1");
  }
  SECTION("missing data and broadcast") {
    auto r = ParseMmWsEvent(R"({"event":"typing","seq":2})");
    REQUIRE(r.ok());
    CHECK(r.value->event == "typing");
    CHECK(r.value->seq == 2);
    r = ParseMmWsEvent(R"({"event":"typing","data":null,"broadcast":null})");
    REQUIRE(r.ok());
    CHECK(r.value->seq == -1);
  }
  SECTION("an action reply has no event") {
    auto r = ParseMmWsEvent(R"({"status":"OK","seq_reply":1})");
    REQUIRE(r.ok());
    CHECK(r.value->event.empty());
  }
}

TEST_CASE("ParseMmWsEvent rejects garbage and wrong types") {
  for (const char* text :
       {"", "garbage", "[]", "{}", "{\"seq\":1}", "{\"event\":5}", "{\"event\":\"posted\"",
        R"({"event":"posted","seq":"1"})", R"({"event":"posted","data":[]})",
        R"({"event":"posted","data":{"post":42}})", R"({"event":"posted","broadcast":"c1"})",
        R"({"event":"posted","broadcast":{"channel_id":1}})",
        R"({"event":"hello","data":{"connection_id":false}})"}) {
    INFO(text);
    auto r = ParseMmWsEvent(text);
    CHECK_FALSE(r.ok());
    CHECK_FALSE(r.error.message.empty());
  }
}

// ---------------------------------------------------------------------------------------------
// The token file

TEST_CASE("the token file is checked like a key file and its content never quoted") {
  relay::testing::TempDir dir;
  const std::string token = "abcdefghijklmnopqrstuvwxyz";
  const auto write = [&](const std::string& name, const std::string& text, mode_t mode) {
    const std::string path = dir.Write(name, text);
    REQUIRE(::chmod(path.c_str(), mode) == 0);
    return path;
  };
  SECTION("a 0600 file: the first line, without surrounding whitespace") {
    const auto loaded =
        relay::chat::LoadMattermostToken(write("t", "  " + token + " \r\n\n", 0600));
    REQUIRE(loaded.ok());
    CHECK((*loaded)->view() == token);
    CHECK(relay::chat::LoadMattermostToken(write("u", token, 0400)).ok());
  }
  SECTION("refused, naming the file and the problem, never the token") {
    const std::vector<std::pair<std::string, std::string>> cases = {
        {write("loose", token + "\n", 0644),
         "has mode 0644: it must not be readable or writable by group or others (chmod 600 '"},
        {write("group", token + "\n", 0640), "has mode 0640"},
        {write("other-write", token + "\n", 0602), "has mode 0602"},
        {write("empty", " \n\n", 0600), "is empty"},
        {write("two-lines", token + "\nsecond\n", 0600), "has more than one line"},
        {write("space", "abc def\n", 0600),
         "has a character at offset 3 that cannot be in a token"},
        {write("control", token + "\x01\n", 0600), "that cannot be in a token"},
        {write("large", std::string(5000, 'a'), 0600),
         "is 5000 bytes; a token file holds one line of at most 4096 bytes"},
        {dir.path().string(), "is not a regular file"},
        {(dir.path() / "missing").string(), "cannot open the Mattermost token file '"},
    };
    for (const auto& [path, why] : cases) {
      const auto loaded = relay::chat::LoadMattermostToken(path);
      INFO(path);
      REQUIRE_FALSE(loaded.ok());
      INFO(loaded.message());
      CHECK(loaded.message().find("Mattermost token file '" + path + "'") != std::string::npos);
      CHECK(loaded.message().find(why) != std::string::npos);
      CHECK(loaded.message().find(token) == std::string::npos);
    }
  }
  SECTION("a FIFO is refused without waiting for a writer") {
    const std::string fifo = (dir.path() / "fifo").string();
    REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
    const auto loaded = relay::chat::LoadMattermostToken(fifo);
    REQUIRE_FALSE(loaded.ok());
    CHECK(loaded.message().find("is not a regular file") != std::string::npos);
  }
}

// ---------------------------------------------------------------------------------------------
// Transport failures that need no server

TEST_CASE("REST: connection refused is retryable with no HTTP status") {
  MattermostOptions o;
  o.url = "http://127.0.0.1:" + std::to_string(relay::testing::FreePort());
  o.token = Token("secret-token-value");
  o.timeout = std::chrono::milliseconds(2000);
  MattermostClient client(o);
  auto r = client.GetMe();
  REQUIRE_FALSE(r.ok());
  CHECK(r.error.http_status == 0);
  CHECK(r.error.retryable);
  CHECK(r.error.id == "connect");
  CHECK(r.error.message.find("GET /api/v4/users/me") != std::string::npos);
  CHECK(r.error.message.find("secret-token-value") == std::string::npos);
}

TEST_CASE("REST and WebSocket: a server that never answers times out, retryable") {
  // A listening socket that never accepts: the kernel completes the handshake, nobody answers.
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  REQUIRE(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  REQUIRE(listen(fd, 16) == 0);
  REQUIRE(getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0);
  MattermostOptions o;
  o.url = "http://127.0.0.1:" + std::to_string(ntohs(a.sin_port));
  o.token = Token("t");
  o.timeout = std::chrono::milliseconds(300);

  MattermostClient client(o);
  auto start = std::chrono::steady_clock::now();
  auto r = client.GetPost("p1");
  auto elapsed = std::chrono::steady_clock::now() - start;
  REQUIRE_FALSE(r.ok());
  CHECK(r.error.http_status == 0);
  CHECK(r.error.retryable);
  CHECK(r.error.id == "timeout");
  CHECK(elapsed < std::chrono::seconds(5));

  MattermostWebSocket ws(o);
  start = std::chrono::steady_clock::now();
  auto c = ws.Connect("", 0);
  elapsed = std::chrono::steady_clock::now() - start;
  REQUIRE_FALSE(c.ok());
  CHECK(c.error.retryable);
  CHECK(c.error.id == "timeout");
  CHECK(elapsed < std::chrono::seconds(5));
  // Not connected: Read fails at once, not with "timeout".
  auto ev = ws.Read(std::chrono::milliseconds(50));
  REQUIRE_FALSE(ev.ok());
  CHECK(ev.error.id != "timeout");
  close(fd);
}

TEST_CASE("a bad URL is not retryable") {
  MattermostOptions o;
  o.url = "ftp://example.invalid";
  o.token = Token("t");
  MattermostWebSocket ws(o);
  auto c = ws.Connect("", 0);
  REQUIRE_FALSE(c.ok());
  CHECK_FALSE(c.error.retryable);
  CHECK(c.error.id == "bad_url");
  MattermostClient client(o);
  auto r = client.GetMe();
  REQUIRE_FALSE(r.ok());
  CHECK_FALSE(r.error.retryable);
}

// ---------------------------------------------------------------------------------------------
// Live tests against the Mattermost emulator (tests/mattermost_emulator/emulator.py)

extern char** environ;

namespace {

using Json = nlohmann::json;
using std::chrono::milliseconds;

const std::string kBotToken = "bot-token-6c1f0e9b";
const std::string kBotId(26, 'b');
const std::string kAliceToken = "alice-token-2d8a4c71";
const std::string kAliceId(26, 'a');
const std::string kChannelId(26, 'c');

// A child process (python3 ...) that prints "LISTENING <port>" on stdout once it accepts
// connections. Killed (SIGTERM, then SIGKILL) at scope exit. Never throws: check error().
class ListeningProcess {
 public:
  explicit ListeningProcess(std::vector<std::string> args) {
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    // The child's environment: ours, without writing __pycache__ into the source tree.
    std::vector<std::string> env_strings = {"PYTHONDONTWRITEBYTECODE=1"};
    for (char** e = environ; *e != nullptr; ++e) env_strings.emplace_back(*e);
    std::vector<char*> envp;
    for (std::string& e : env_strings) envp.push_back(e.data());
    envp.push_back(nullptr);

    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) {
      error_ = "pipe2 failed";
      return;
    }
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
    int rc = posix_spawnp(&pid_, argv[0], &actions, nullptr, argv.data(), envp.data());
    posix_spawn_file_actions_destroy(&actions);
    close(fds[1]);
    out_fd_ = fds[0];
    if (rc != 0) {
      pid_ = -1;
      error_ = "posix_spawnp " + args[0] + ": " + strerror(rc);
      return;
    }
    std::string line;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (line.find('\n') == std::string::npos) {
      auto left =
          std::chrono::duration_cast<milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) {
        error_ = args[1] + " did not print LISTENING within 20 s";
        return;
      }
      pollfd p{out_fd_, POLLIN, 0};
      if (poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
      char buf[256];
      ssize_t n = read(out_fd_, buf, sizeof buf);
      if (n <= 0) {
        error_ = args[1] + " exited before listening (see its stderr above)";
        return;
      }
      line.append(buf, static_cast<std::size_t>(n));
    }
    if (line.rfind("LISTENING ", 0) != 0) {
      error_ = "unexpected first line from " + args[1] + ": " + line;
      return;
    }
    port_ = std::stoi(line.substr(10));
  }

  ~ListeningProcess() {
    if (pid_ > 0) {
      kill(pid_, SIGTERM);
      int status = 0;
      bool exited = false;
      for (int i = 0; i < 100 && !exited; ++i) {
        if (waitpid(pid_, &status, WNOHANG) == pid_) {
          exited = true;
        } else {
          std::this_thread::sleep_for(milliseconds(20));
        }
      }
      if (!exited) {
        kill(pid_, SIGKILL);
        waitpid(pid_, &status, 0);
      }
    }
    if (out_fd_ >= 0) close(out_fd_);
  }
  ListeningProcess(const ListeningProcess&) = delete;
  ListeningProcess& operator=(const ListeningProcess&) = delete;

  const std::string& error() const { return error_; }
  int port() const { return port_; }

 private:
  pid_t pid_ = -1;
  int out_fd_ = -1;
  int port_ = 0;
  std::string error_;
};

std::vector<std::string> EmulatorArgs(const std::vector<std::string>& extra_args) {
  std::vector<std::string> args = {
      "python3",   std::string(RELAY_SOURCE_DIR) + "/tests/mattermost_emulator/emulator.py",
      "--port",    "0",
      "--seed",    "42",
      "--user",    "relay-bot:" + kBotToken + ":bot=true,id=" + kBotId,
      "--user",    "alice:" + kAliceToken + ":id=" + kAliceId,
      "--channel", "town=" + kChannelId};
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  return args;
}

// The Mattermost emulator with a bot, alice and one channel (fixed ids).
class Emulator {
 public:
  explicit Emulator(const std::vector<std::string>& extra_args = {})
      : process_(EmulatorArgs(extra_args)),
        url_("http://127.0.0.1:" + std::to_string(process_.port())) {}

  int port() const { return process_.port(); }
  const std::string& error() const { return process_.error(); }
  const std::string& url() const { return url_; }

  MattermostOptions Options(const std::string& token = kBotToken) const {
    MattermostOptions o;
    o.url = url_;
    o.token = Token(token);
    o.timeout = milliseconds(5000);
    return o;
  }

  // Calls the unauthenticated control API (/__control/...). Returns the parsed JSON reply.
  Json Control(const std::string& method, const std::string& path, const Json& body = nullptr,
               long* status_out = nullptr) const {
    CURL* h = curl_easy_init();
    REQUIRE(h != nullptr);
    std::string reply;
    std::string url = url_ + "/__control/" + path;
    std::string text = body.is_null() ? std::string() : body.dump();
    curl_slist* headers = curl_slist_append(nullptr, "Content-Type: application/json");
    SetOpt(h, CURLOPT_URL, url.c_str());
    SetOpt(h, CURLOPT_CUSTOMREQUEST, method.c_str());
    SetOpt(h, CURLOPT_HTTPHEADER, headers);
    if (!text.empty()) {
      SetOpt(h, CURLOPT_POSTFIELDS, text.c_str());
      SetOpt(h, CURLOPT_POSTFIELDSIZE, static_cast<long>(text.size()));
    }
    SetOpt(h, CURLOPT_WRITEFUNCTION, &Append);
    SetOpt(h, CURLOPT_WRITEDATA, &reply);
    SetOpt(h, CURLOPT_TIMEOUT_MS, 10000L);
    CURLcode code = curl_easy_perform(h);
    long status = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
    curl_slist_free_all(headers);
    curl_easy_cleanup(h);
    INFO(method << " /__control/" << path << " -> " << status << " " << reply);
    REQUIRE(code == CURLE_OK);
    if (status_out != nullptr) {
      *status_out = status;
    } else {
      REQUIRE(status >= 200);
      REQUIRE(status < 300);
    }
    Json j = Json::parse(reply, nullptr, false);
    REQUIRE_FALSE(j.is_discarded());
    return j;
  }

 private:
  template <typename T>
  static void SetOpt(CURL* h, CURLoption option, T value) {
    REQUIRE(curl_easy_setopt(h, option, value) == CURLE_OK);
  }
  static size_t Append(char* data, size_t size, size_t count, void* user) {
    static_cast<std::string*>(user)->append(data, size * count);
    return size * count;
  }

  ListeningProcess process_;
  std::string url_;
};

MmNewPost NewPost(const std::string& message, const std::string& root_id = "",
                  const std::string& props_json = "{}") {
  MmNewPost p;
  p.channel_id = kChannelId;
  p.message = message;
  p.root_id = root_id;
  p.props_json = props_json;
  return p;
}

// Reads events until one named `name` arrives (others are collected in *skipped).
MmWsEvent ReadUntil(MattermostWebSocket& ws, const std::string& name,
                    std::vector<MmWsEvent>* skipped = nullptr) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (std::chrono::steady_clock::now() < deadline) {
    auto r = ws.Read(milliseconds(1000));
    if (!r.ok() && r.error.id == "timeout") continue;
    INFO("waiting for " << name << ": " << r.error.message);
    REQUIRE(r.ok());
    if (r.value->event == name) return *r.value;
    if (skipped != nullptr) skipped->push_back(*r.value);
  }
  FAIL("no " << name << " event within 10 s");
  return {};
}

Json Props(const std::string& props_json) {
  Json j = Json::parse(props_json, nullptr, false);
  REQUIRE(j.is_object());
  return j;
}

}  // namespace

TEST_CASE("live: GetMe, GetUser and a bad token") {
  Emulator emu;
  REQUIRE(emu.error().empty());
  MattermostClient client(emu.Options());
  auto me = client.GetMe();
  INFO(me.error.message);
  REQUIRE(me.ok());
  CHECK(me.value->id == kBotId);
  CHECK(me.value->username == "relay-bot");
  auto alice = client.GetUser(kAliceId);
  REQUIRE(alice.ok());
  CHECK(alice.value->username == "alice");

  // Path components from data are escaped: this is one (bad) id, not extra path segments.
  auto odd = client.GetUser("../posts/x y");
  REQUIRE_FALSE(odd.ok());
  CHECK(odd.error.http_status >= 400);
  CHECK(odd.error.http_status < 500);
  CHECK_FALSE(odd.error.retryable);

  MattermostClient bad(emu.Options("wrong-token-value"));
  auto r = bad.GetMe();
  REQUIRE_FALSE(r.ok());
  CHECK(r.error.http_status == 401);
  CHECK_FALSE(r.error.retryable);
  CHECK(r.error.id == "api.context.session_expired.app_error");
  CHECK(r.error.message.find("GET /api/v4/users/me") != std::string::npos);
  CHECK(r.error.message.find("401") != std::string::npos);
  CHECK(r.error.message.find("wrong-token-value") == std::string::npos);
}

TEST_CASE("live: create, get, patch and delete a post") {
  Emulator emu;
  REQUIRE(emu.error().empty());
  MattermostClient client(emu.Options());

  auto root = client.CreatePost(
      NewPost("root \"quoted\" \xc3\xa9", "", R"({"relay_origin":"aws:1","keep":{"n":1}})"));
  INFO(root.error.message);
  REQUIRE(root.ok());
  CHECK(root.value->id.size() == 26);
  CHECK(root.value->channel_id == kChannelId);
  CHECK(root.value->user_id == kBotId);
  CHECK(root.value->message == "root \"quoted\" \xc3\xa9");
  CHECK(root.value->create_at > 0);
  CHECK(Props(root.value->props_json)["relay_origin"] == "aws:1");
  CHECK(Props(root.value->props_json)["keep"]["n"] == 1);

  auto got = client.GetPost(root.value->id);
  REQUIRE(got.ok());
  CHECK(got.value->message == root.value->message);
  CHECK(got.value->props_json == root.value->props_json);

  SECTION("replies go to the root; a reply to a reply is a 400 with the server's id") {
    auto reply = client.CreatePost(NewPost("reply", root.value->id));
    INFO(reply.error.message);
    REQUIRE(reply.ok());
    CHECK(reply.value->root_id == root.value->id);
    auto nested = client.CreatePost(NewPost("nested", reply.value->id));
    REQUIRE_FALSE(nested.ok());
    CHECK(nested.error.http_status == 400);
    CHECK_FALSE(nested.error.retryable);
    CHECK(nested.error.id == "api.post.create_post.root_id.app_error");
    CHECK(nested.error.message.find("POST /api/v4/posts") != std::string::npos);
  }

  SECTION("patch replaces message and the whole props map") {
    auto patched = client.PatchPost(root.value->id, "edited", R"({"other":"x"})");
    INFO(patched.error.message);
    REQUIRE(patched.ok());
    CHECK(patched.value->id == root.value->id);
    CHECK(patched.value->message == "edited");
    CHECK(patched.value->edit_at > 0);
    CHECK(patched.value->update_at >= root.value->update_at);
    Json props = Props(patched.value->props_json);
    CHECK(props["other"] == "x");
    CHECK_FALSE(props.contains("relay_origin"));
    CHECK_FALSE(props.contains("keep"));
    auto again = client.GetPost(root.value->id);
    REQUIRE(again.ok());
    CHECK(again.value->message == "edited");
    CHECK_FALSE(Props(again.value->props_json).contains("relay_origin"));

    // Invalid props are refused before anything is sent.
    auto invalid = client.PatchPost(root.value->id, "x", "[1,2]");
    REQUIRE_FALSE(invalid.ok());
    CHECK_FALSE(invalid.error.retryable);
  }

  SECTION("delete, then the post is gone for GetPost but listed by since with delete_at") {
    auto deleted = client.DeletePost(root.value->id);
    INFO(deleted.error.message);
    REQUIRE(deleted.ok());
    auto gone = client.GetPost(root.value->id);
    REQUIRE_FALSE(gone.ok());
    CHECK(gone.error.http_status == 404);
    CHECK_FALSE(gone.error.retryable);
    auto since = client.GetPostsSince(kChannelId, root.value->create_at - 1);
    REQUIRE(since.ok());
    bool found = false;
    for (const auto& p : since.value->posts) {
      if (p.id == root.value->id) {
        found = true;
        CHECK(p.delete_at > 0);
      }
    }
    CHECK(found);
  }
}

TEST_CASE("live: reactions are added and removed (emoji names escaped in the path)") {
  Emulator emu;
  REQUIRE(emu.error().empty());
  MattermostClient client(emu.Options());
  auto post = client.CreatePost(NewPost("react to me"));
  REQUIRE(post.ok());

  for (const char* emoji : {"+1", "white_check_mark"}) {
    auto added = client.AddReaction(kBotId, post.value->id, emoji);
    INFO(emoji << ": " << added.error.message);
    CHECK(added.ok());
  }
  auto got = client.GetPost(post.value->id);
  REQUIRE(got.ok());
  std::set<std::string> names;
  for (const auto& r : got.value->reactions) {
    CHECK(r.user_id == kBotId);
    CHECK(r.post_id == post.value->id);
    CHECK(r.create_at > 0);
    names.insert(r.emoji_name);
  }
  CHECK(names == std::set<std::string>{"+1", "white_check_mark"});

  auto removed = client.RemoveReaction(kBotId, post.value->id, "+1");
  INFO(removed.error.message);
  REQUIRE(removed.ok());
  got = client.GetPost(post.value->id);
  REQUIRE(got.ok());
  REQUIRE(got.value->reactions.size() == 1);
  CHECK(got.value->reactions[0].emoji_name == "white_check_mark");

  // Reacting in someone else's name is refused (403), not retryable.
  auto forged = client.AddReaction(kAliceId, post.value->id, "smile");
  REQUIRE_FALSE(forged.ok());
  CHECK(forged.error.http_status == 403);
  CHECK_FALSE(forged.error.retryable);
}

TEST_CASE("live: a create repeated with its pending_post_id answers the first post") {
  Emulator emu;
  REQUIRE(emu.error().empty());
  MattermostOptions options = emu.Options();
  options.timeout = milliseconds(1000);
  MattermostClient client(options);
  MmNewPost post = NewPost("only once");
  post.pending_post_id = "relay:test:aws:1";
  // The first answer is lost although the server created the post.
  emu.Control("POST", "faults",
              {{"kind", "status"}, {"status", 500}, {"process", true}, {"method", "POST"}});
  auto lost = client.CreatePost(post);
  REQUIRE_FALSE(lost.ok());
  CHECK(lost.error.retryable);
  auto again = client.CreatePost(post);
  INFO(again.error.message);
  REQUIRE(again.ok());
  auto third = client.CreatePost(post);
  REQUIRE(third.ok());
  CHECK(third.value->id == again.value->id);
  auto all = client.GetPostsSince(kChannelId, 1);
  REQUIRE(all.ok());
  int copies = 0;
  for (const auto& p : all.value->posts) copies += p.message == "only once";
  CHECK(copies == 1);
  // Without the id, a repeat is a second post.
  post.pending_post_id.clear();
  auto fresh = client.CreatePost(post);
  REQUIRE(fresh.ok());
  CHECK(fresh.value->id != again.value->id);
}

TEST_CASE("live: a 2xx that is not the API's answer fails deletes and reactions (retryable)") {
  Emulator emu;
  REQUIRE(emu.error().empty());
  MattermostClient client(emu.Options());
  auto post = client.CreatePost(NewPost("target"));
  REQUIRE(post.ok());
  const std::string id = post.value->id;
  // A proxy answers 200 without passing the request on (process: false).
  auto proxy = [&](const char* method, const char* style) {
    emu.Control("POST", "faults",
                {{"kind", "garbage"},
                 {"style", style},
                 {"process", false},
                 {"method", method},
                 {"count", 1}});
  };
  auto expect_bad_reply = [](const auto& r, const char* what) {
    INFO(what << ": " << r.error.message);
    REQUIRE_FALSE(r.ok());
    CHECK(r.error.retryable);
    CHECK(r.error.id == "bad_reply");
    CHECK(r.error.http_status == 200);
  };

  proxy("POST", "empty");
  expect_bad_reply(client.AddReaction(kBotId, id, "tada"), "reaction add, empty body");
  proxy("POST", "html");
  expect_bad_reply(client.AddReaction(kBotId, id, "tada"), "reaction add, HTML page");
  proxy("POST", "null");
  expect_bad_reply(client.AddReaction(kBotId, id, "tada"), "reaction add, null");
  auto got = client.GetPost(id);
  REQUIRE(got.ok());
  CHECK(got.value->reactions.empty());  // none of them reached the server
  REQUIRE(client.AddReaction(kBotId, id, "tada").ok());

  proxy("DELETE", "html");
  expect_bad_reply(client.RemoveReaction(kBotId, id, "tada"), "reaction removal, HTML page");
  proxy("DELETE", "empty");
  expect_bad_reply(client.RemoveReaction(kBotId, id, "tada"), "reaction removal, empty body");
  emu.Control("POST", "faults",
              {{"kind", "garbage"},
               {"method", "DELETE"},
               {"process", false},
               {"body", R"({"status":"FAIL"})"}});
  auto fail = client.RemoveReaction(kBotId, id, "tada");
  expect_bad_reply(fail, "reaction removal, status FAIL");
  CHECK(fail.error.message.find("FAIL") != std::string::npos);
  got = client.GetPost(id);
  REQUIRE(got.ok());
  CHECK(got.value->reactions.size() == 1);
  REQUIRE(client.RemoveReaction(kBotId, id, "tada").ok());

  proxy("DELETE", "html");
  expect_bad_reply(client.DeletePost(id), "delete, HTML page");
  proxy("DELETE", "null");
  expect_bad_reply(client.DeletePost(id), "delete, null");
  got = client.GetPost(id);
  REQUIRE(got.ok());  // still there
  auto deleted = client.DeletePost(id);
  INFO(deleted.error.message);
  REQUIRE(deleted.ok());
  CHECK_FALSE(client.GetPost(id).ok());
}

TEST_CASE("live: GetPostsSince is exclusive and lists every post") {
  Emulator emu;
  REQUIRE(emu.error().empty());
  MattermostClient client(emu.Options());
  auto first = client.CreatePost(NewPost("first"));
  REQUIRE(first.ok());
  // Wait for the clock to move so that `since` separates the two posts.
  std::this_thread::sleep_for(milliseconds(5));
  auto second = client.CreatePost(NewPost("second"));
  REQUIRE(second.ok());
  auto reply = client.CreatePost(NewPost("reply", second.value->id));
  REQUIRE(reply.ok());

  auto all = client.GetPostsSince(kChannelId, first.value->update_at - 1);
  INFO(all.error.message);
  REQUIRE(all.ok());
  std::set<std::string> ids;
  for (const auto& p : all.value->posts) ids.insert(p.id);
  CHECK(ids.count(first.value->id) == 1);
  CHECK(ids.count(second.value->id) == 1);
  CHECK(ids.count(reply.value->id) == 1);
  for (const auto& id : all.value->order) CHECK(ids.count(id) == 1);

  auto later = client.GetPostsSince(kChannelId, first.value->update_at);
  REQUIRE(later.ok());
  ids.clear();
  for (const auto& id : later.value->order) ids.insert(id);
  CHECK(ids.count(first.value->id) == 0);  // exclusive
  CHECK(ids.count(reply.value->id) == 1);

  // since=0 still means "everything" (the server would answer a page, without deleted posts).
  REQUIRE(client.DeletePost(first.value->id).ok());
  auto from_zero = client.GetPostsSince(kChannelId, 0);
  REQUIRE(from_zero.ok());
  ids.clear();
  for (const auto& p : from_zero.value->posts) ids.insert(p.id);
  CHECK(ids.count(first.value->id) == 1);
  CHECK(ids.count(second.value->id) == 1);

  auto none = client.GetPostsSince(kChannelId, reply.value->update_at + 60000);
  REQUIRE(none.ok());
  CHECK(none.value->order.empty());
}

TEST_CASE("live: files are uploaded, described and downloaded within max_bytes") {
  Emulator emu;
  REQUIRE(emu.error().empty());
  MattermostClient client(emu.Options());
  std::string data = "binary\0data\xff\x01 with \"quotes\"";
  data += std::string(3000, 'z');
  auto info = client.UploadFile(kChannelId, "report \"q1\".txt", data);
  INFO(info.error.message);
  REQUIRE(info.ok());
  CHECK(info.value->id.size() == 26);
  CHECK(info.value->size == static_cast<std::int64_t>(data.size()));

  auto described = client.GetFileInfo(info.value->id);
  INFO(described.error.message);
  REQUIRE(described.ok());
  CHECK(described.value->id == info.value->id);
  CHECK(described.value->size == static_cast<std::int64_t>(data.size()));
  CHECK(described.value->name == info.value->name);
  CHECK_FALSE(described.value->mime_type.empty());

  auto downloaded = client.DownloadFile(info.value->id, data.size());
  INFO(downloaded.error.message);
  REQUIRE(downloaded.ok());
  CHECK(*downloaded.value == data);

  auto too_big = client.DownloadFile(info.value->id, data.size() - 1);
  REQUIRE_FALSE(too_big.ok());
  CHECK_FALSE(too_big.error.retryable);
  CHECK(too_big.error.id == "too_large");

  // The handle still works after an aborted transfer, and the file can be posted.
  MmNewPost p = NewPost("with a file");
  p.file_ids = {info.value->id};
  auto post = client.CreatePost(p);
  INFO(post.error.message);
  REQUIRE(post.ok());
  CHECK(post.value->file_ids == std::vector<std::string>{info.value->id});

  auto missing = client.GetFileInfo(std::string(26, 'z'));
  REQUIRE_FALSE(missing.ok());
  CHECK_FALSE(missing.error.retryable);
}

TEST_CASE("live: files are streamed from a file and into a sink") {
  Emulator emu;
  REQUIRE(emu.error().empty());
  MattermostClient client(emu.Options());
  relay::testing::TempDir dir;
  std::string data;
  for (int i = 0; i < 3 * 1024 * 1024; ++i) data.push_back(static_cast<char>(i * 7 + i / 251));
  const std::string path = dir.Write("big.bin", data);
  auto info = client.UploadFileFromPath(kChannelId, "big.bin", path);
  INFO(info.error.message);
  REQUIRE(info.ok());
  CHECK(info.value->name == "big.bin");  // the part's name, not the spool file's
  CHECK(info.value->size == static_cast<std::int64_t>(data.size()));

  std::string got;
  std::size_t pieces = 0;
  auto n = client.DownloadFileTo(info.value->id, data.size(), [&](std::string_view piece) {
    got.append(piece);
    ++pieces;
    return true;
  });
  INFO(n.error.message);
  REQUIRE(n.ok());
  CHECK(*n.value == data.size());
  CHECK(got == data);
  CHECK(pieces > 1);  // handed over as it arrives, not once at the end

  auto too_big =
      client.DownloadFileTo(info.value->id, data.size() - 1, [](std::string_view) { return true; });
  REQUIRE_FALSE(too_big.ok());
  CHECK(too_big.error.id == "too_large");
  auto refused =
      client.DownloadFileTo(info.value->id, data.size(), [](std::string_view) { return false; });
  REQUIRE_FALSE(refused.ok());
  CHECK(refused.error.id == "sink");
  CHECK_FALSE(refused.error.retryable);

  // The handle still works after aborted transfers.
  auto again = client.DownloadFile(info.value->id, data.size());
  REQUIRE(again.ok());
  CHECK(*again.value == data);
}

TEST_CASE("live: errors are classified (429, 5xx, 4xx, garbage, drops, slow replies)") {
  Emulator emu;
  REQUIRE(emu.error().empty());
  MattermostOptions options = emu.Options();
  options.timeout = milliseconds(1000);
  MattermostClient client(options);

  SECTION("429 with Retry-After and a plain-text body") {
    emu.Control("POST", "faults", {{"kind", "rate_limit"}, {"retry_after", 7}});
    auto r = client.GetMe();
    REQUIRE_FALSE(r.ok());
    CHECK(r.error.http_status == 429);
    CHECK(r.error.retryable);
    CHECK(r.error.retry_after == milliseconds(7000));
    CHECK(r.error.message.find("limit exceeded") != std::string::npos);
    CHECK(client.GetMe().ok());
  }
  SECTION("429 without Retry-After waits the default second") {
    emu.Control("POST", "faults", {{"kind", "status"}, {"status", 429}});
    auto r = client.GetMe();
    REQUIRE_FALSE(r.ok());
    CHECK(r.error.http_status == 429);
    CHECK(r.error.retryable);
    CHECK(r.error.retry_after == milliseconds(1000));
  }
  SECTION("the server's own rate limiter") {
    emu.Control("POST", "config",
                {{"rate_limit", {{"enabled", true}, {"per_sec", 1}, {"max_burst", 1}}}});
    MmError last;
    for (int i = 0; i < 10; ++i) {
      auto r = client.GetMe();
      if (!r.ok()) {
        last = r.error;
        break;
      }
    }
    CHECK(last.http_status == 429);
    CHECK(last.retryable);
    CHECK(last.retry_after >= milliseconds(1000));
    CHECK(last.retry_after <= milliseconds(2000));
  }
  SECTION("500 with a JSON error and 503 from a proxy are retryable") {
    emu.Control("POST", "faults", {{"kind", "status"}, {"status", 500}});
    auto r = client.CreatePost(NewPost("x"));
    REQUIRE_FALSE(r.ok());
    CHECK(r.error.http_status == 500);
    CHECK(r.error.retryable);
    CHECK(r.error.id == "emulator.fault.injected");
    CHECK(r.error.retry_after == milliseconds(0));
    emu.Control("POST", "faults", {{"kind", "status"}, {"status", 503}});
    r = client.CreatePost(NewPost("x"));
    REQUIRE_FALSE(r.ok());
    CHECK(r.error.http_status == 503);
    CHECK(r.error.retryable);
    CHECK(r.error.message.find("nginx") != std::string::npos);
  }
  SECTION("a 2xx reply with malformed JSON is a retryable error") {
    auto post = client.CreatePost(NewPost("x"));
    REQUIRE(post.ok());
    emu.Control("POST", "faults",
                {{"kind", "garbage"}, {"method", "GET"}, {"path_prefix", "/api/v4/posts/"}});
    auto r = client.GetPost(post.value->id);
    REQUIRE_FALSE(r.ok());
    CHECK(r.error.retryable);
    CHECK(r.error.id == "bad_reply");
    CHECK(r.error.message.find("not valid JSON") != std::string::npos);
    emu.Control("POST", "faults",
                {{"kind", "garbage"},
                 {"method", "GET"},
                 {"path_prefix", "/api/v4/posts/"},
                 {"body", R"({"id":"abc","create_at":"yesterday"})"}});
    r = client.GetPost(post.value->id);
    REQUIRE_FALSE(r.ok());
    CHECK(r.error.retryable);
    CHECK(r.error.message.find("create_at") != std::string::npos);
    CHECK(client.GetPost(post.value->id).ok());
  }
  SECTION("a dropped connection and a slow reply are retryable without status") {
    emu.Control("POST", "faults", {{"kind", "drop"}});
    auto r = client.GetMe();
    REQUIRE_FALSE(r.ok());
    CHECK(r.error.http_status == 0);
    CHECK(r.error.retryable);
    emu.Control("POST", "faults", {{"kind", "delay"}, {"delay_ms", 2500}});
    r = client.GetMe();
    REQUIRE_FALSE(r.ok());
    CHECK(r.error.http_status == 0);
    CHECK(r.error.retryable);
    CHECK(r.error.id == "timeout");
    CHECK(client.GetMe().ok());
  }
}

TEST_CASE("live: WebSocket hello, posted, timeout, drop and resume") {
  Emulator emu;
  REQUIRE(emu.error().empty());
  MattermostClient client(emu.Options());
  MattermostWebSocket ws(emu.Options());
  auto connected = ws.Connect("", 0);
  INFO(connected.error.message);
  REQUIRE(connected.ok());

  auto hello = ws.Read(milliseconds(5000));
  INFO(hello.error.message);
  REQUIRE(hello.ok());
  CHECK(hello.value->event == "hello");
  CHECK(hello.value->seq == 0);
  const std::string connection_id = hello.value->connection_id;
  CHECK_FALSE(connection_id.empty());
  std::int64_t last_seq = 0;

  // A post created over REST arrives as "posted" with the post as JSON text.
  auto post = client.CreatePost(NewPost("over the socket", "", R"({"k":"v"})"));
  REQUIRE(post.ok());
  std::vector<MmWsEvent> skipped;
  MmWsEvent posted = ReadUntil(ws, "posted", &skipped);
  CHECK(posted.channel_id == kChannelId);
  CHECK(posted.seq == last_seq + 1 + static_cast<std::int64_t>(skipped.size()));
  last_seq = posted.seq;
  auto parsed = ParseMmPost(posted.post_json);
  INFO(posted.post_json);
  REQUIRE(parsed.ok());
  CHECK(parsed.value->id == post.value->id);
  CHECK(Props(parsed.value->props_json)["k"] == "v");

  // Reactions come with the reaction as JSON text.
  REQUIRE(client.AddReaction(kBotId, post.value->id, "+1").ok());
  MmWsEvent reaction = ReadUntil(ws, "reaction_added");
  last_seq = reaction.seq;
  auto r = ParseMmReaction(reaction.reaction_json);
  INFO(reaction.reaction_json);
  REQUIRE(r.ok());
  CHECK(r.value->emoji_name == "+1");

  // Nothing to read: "timeout", and the socket still works afterwards.
  auto start = std::chrono::steady_clock::now();
  auto idle = ws.Read(milliseconds(300));
  auto elapsed = std::chrono::steady_clock::now() - start;
  REQUIRE_FALSE(idle.ok());
  CHECK(idle.error.id == "timeout");
  CHECK(idle.error.retryable);
  CHECK(idle.error.http_status == 0);
  CHECK(elapsed >= milliseconds(250));
  CHECK(elapsed < milliseconds(2000));
  for (int i = 0; i < 3; ++i) CHECK_FALSE(ws.Read(milliseconds(20)).ok());
  REQUIRE(client.PatchPost(post.value->id, "edited", "{}").ok());
  MmWsEvent edited = ReadUntil(ws, "post_edited");
  last_seq = edited.seq;
  CHECK(ParseMmPost(edited.post_json).ok());

  // Read(0) only polls: it returns what has arrived.
  REQUIRE(client.CreatePost(NewPost("polled")).ok());
  std::optional<MmWsEvent> polled;
  for (int i = 0; i < 500 && !polled; ++i) {
    auto ev = ws.Read(milliseconds(0));
    if (ev.ok()) {
      polled = *ev.value;
    } else {
      REQUIRE(ev.error.id == "timeout");
      std::this_thread::sleep_for(milliseconds(10));
    }
  }
  REQUIRE(polled.has_value());
  CHECK(polled->event == "posted");
  last_seq = polled->seq;

  // Interrupt() from another thread ends a blocked Read early; the socket survives it.
  std::thread interrupter([&ws] {
    std::this_thread::sleep_for(milliseconds(200));
    ws.Interrupt();
  });
  start = std::chrono::steady_clock::now();
  auto interrupted = ws.Read(milliseconds(10000));
  elapsed = std::chrono::steady_clock::now() - start;
  interrupter.join();
  REQUIRE_FALSE(interrupted.ok());
  CHECK(interrupted.error.id == "timeout");
  CHECK(elapsed < milliseconds(3000));
  REQUIRE(client.CreatePost(NewPost("after the interrupt")).ok());
  last_seq = ReadUntil(ws, "posted").seq;

  // The server drops the socket (a network failure): Read reports a broken connection.
  emu.Control("POST", "ws/drop", {{"keep_buffer", true}});
  auto broken = ws.Read(milliseconds(5000));
  REQUIRE_FALSE(broken.ok());
  CHECK(broken.error.id != "timeout");
  CHECK_FALSE(ws.Read(milliseconds(10)).ok());

  // Missed while away, then replayed on resume with no hello.
  auto missed1 = client.CreatePost(NewPost("missed 1"));
  auto missed2 = client.CreatePost(NewPost("missed 2"));
  REQUIRE(missed1.ok());
  REQUIRE(missed2.ok());
  auto resumed = ws.Connect(connection_id, last_seq + 1);
  INFO(resumed.error.message);
  REQUIRE(resumed.ok());
  std::vector<std::string> replayed;
  while (replayed.size() < 2) {
    auto ev = ws.Read(milliseconds(5000));
    INFO(ev.error.message);
    REQUIRE(ev.ok());
    CHECK(ev.value->event != "hello");
    CHECK(ev.value->seq == last_seq + 1);
    last_seq = ev.value->seq;
    if (ev.value->event == "posted") {
      auto p = ParseMmPost(ev.value->post_json);
      REQUIRE(p.ok());
      replayed.push_back(p.value->id);
    }
  }
  CHECK(replayed == std::vector<std::string>{missed1.value->id, missed2.value->id});

  // A server that forgot the connection starts over: new connection id, hello with seq 0.
  emu.Control("POST", "ws/drop", {{"keep_buffer", false}});
  auto broken2 = ws.Read(milliseconds(5000));
  REQUIRE_FALSE(broken2.ok());
  REQUIRE(ws.Connect(connection_id, last_seq + 1).ok());
  auto fresh = ws.Read(milliseconds(5000));
  INFO(fresh.error.message);
  REQUIRE(fresh.ok());
  CHECK(fresh.value->event == "hello");
  CHECK(fresh.value->seq == 0);
  CHECK_FALSE(fresh.value->connection_id.empty());
  CHECK(fresh.value->connection_id != connection_id);

  // A close frame from the server is reported as "closed".
  emu.Control("POST", "ws/drop", {{"keep_buffer", true}, {"close_code", 1001}});
  auto closed = ws.Read(milliseconds(5000));
  REQUIRE_FALSE(closed.ok());
  CHECK(closed.error.id == "closed");

  // Close() ends the session cleanly; Read afterwards fails at once.
  REQUIRE(ws.Connect("", 0).ok());
  REQUIRE(ws.Read(milliseconds(5000)).ok());  // hello
  ws.Close();
  auto after = ws.Read(milliseconds(1000));
  REQUIRE_FALSE(after.ok());
  CHECK(after.error.id == "closed");
}

TEST_CASE("live: WebSocket Close with a read pending, and an unauthenticated socket") {
  Emulator emu({"--set", "ws_auth_timeout_ms=300"});
  REQUIRE(emu.error().empty());
  MattermostWebSocket ws(emu.Options());
  REQUIRE(ws.Connect("", 0).ok());
  REQUIRE(ws.Read(milliseconds(5000)).ok());    // hello
  CHECK_FALSE(ws.Read(milliseconds(50)).ok());  // leaves a read pending
  auto start = std::chrono::steady_clock::now();
  ws.Close();
  CHECK(std::chrono::steady_clock::now() - start < milliseconds(3000));
  auto status = emu.Control("GET", "ws");
  INFO(status.dump());

  // A wrong token is not refused at the upgrade: the server drops the socket unauthenticated.
  MattermostWebSocket bad(emu.Options("wrong-token"));
  REQUIRE(bad.Connect("", 0).ok());
  auto r = bad.Read(milliseconds(5000));
  REQUIRE_FALSE(r.ok());
  CHECK(r.error.id != "timeout");
}

namespace {

// A TLS front for the emulator (which speaks plain HTTP): python3 asyncio, one connection to the
// emulator per client connection. argv: cert key ca upstream_port require_client_cert(0/1).
const char* const kTlsProxy = R"PY(
import asyncio, ssl, sys
cert, key, ca, upstream, require = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
if require:
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(ca)

async def pump(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except Exception:
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass

async def handle(client_reader, client_writer):
    try:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream)
    except OSError:
        client_writer.close()
        return
    await asyncio.gather(pump(client_reader, up_writer), pump(up_reader, client_writer))

async def main():
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: None)
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    print("LISTENING", server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

asyncio.run(main())
)PY";

bool Shell(const std::string& command) {
  return std::system((command + " >/dev/null 2>&1").c_str()) == 0;
}

struct TestPki {
  std::string ca, server_cert, server_key, client_cert, client_key;
};

// A CA, a server certificate for "localhost" only, and a client certificate (openssl CLI).
bool MakePki(const relay::testing::TempDir& dir, TestPki* pki) {
  const std::string d = dir.path().string() + "/";
  const std::string newkey = "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes ";
  dir.Write("server.ext",
            "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n"
            "extendedKeyUsage=serverAuth\n");
  dir.Write("client.ext", "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n");
  pki->ca = d + "ca.pem";
  pki->server_cert = d + "server.pem";
  pki->server_key = d + "server.key";
  pki->client_cert = d + "client.pem";
  pki->client_key = d + "client.key";
  return Shell(newkey + "-x509 -days 2 -subj /CN=relay-test-ca -keyout " + d + "ca.key -out " +
               pki->ca) &&
         Shell(newkey + "-subj /CN=localhost -keyout " + pki->server_key + " -out " + d +
               "server.csr") &&
         Shell("openssl x509 -req -days 2 -in " + d + "server.csr -CA " + pki->ca + " -CAkey " + d +
               "ca.key -CAcreateserial -extfile " + d + "server.ext -out " + pki->server_cert) &&
         Shell(newkey + "-subj /CN=relay-bot -keyout " + pki->client_key + " -out " + d +
               "client.csr") &&
         Shell("openssl x509 -req -days 2 -in " + d + "client.csr -CA " + pki->ca + " -CAkey " + d +
               "ca.key -CAcreateserial -extfile " + d + "client.ext -out " + pki->client_cert);
}

}  // namespace

TEST_CASE("live: TLS for REST and WebSocket (CA file, host name check, client certificates)") {
  relay::testing::TempDir dir;
  TestPki pki;
  if (!MakePki(dir, &pki)) {
    WARN("openssl CLI not usable: TLS test skipped");
    return;
  }
  Emulator emu;
  REQUIRE(emu.error().empty());
  const std::string proxy_script = dir.Write("tls_proxy.py", kTlsProxy);
  ListeningProcess tls({"python3", proxy_script, pki.server_cert, pki.server_key, pki.ca,
                        std::to_string(emu.port()), "0"});
  REQUIRE(tls.error().empty());
  ListeningProcess mtls({"python3", proxy_script, pki.server_cert, pki.server_key, pki.ca,
                         std::to_string(emu.port()), "1"});
  REQUIRE(mtls.error().empty());

  MattermostOptions o = emu.Options();
  o.url = "https://localhost:" + std::to_string(tls.port());
  o.ca_file = pki.ca;

  SECTION("trusted through ca_file") {
    MattermostClient client(o);
    auto me = client.GetMe();
    INFO(me.error.message);
    REQUIRE(me.ok());
    CHECK(me.value->id == kBotId);
    MattermostWebSocket ws(o);
    auto c = ws.Connect("", 0);
    INFO(c.error.message);
    REQUIRE(c.ok());
    auto hello = ws.Read(milliseconds(5000));
    INFO(hello.error.message);
    REQUIRE(hello.ok());
    CHECK(hello.value->event == "hello");
    REQUIRE(client.CreatePost(NewPost("over TLS")).ok());
    MmWsEvent posted = ReadUntil(ws, "posted");
    CHECK(ParseMmPost(posted.post_json).ok());
    ws.Close();
  }
  SECTION("a certificate for another name, or from an unknown CA, is refused for good") {
    MattermostOptions wrong_name = o;
    wrong_name.url = "https://127.0.0.1:" + std::to_string(tls.port());
    MattermostOptions no_ca = o;
    no_ca.ca_file.clear();
    for (const MattermostOptions& bad : {wrong_name, no_ca}) {
      INFO(bad.url << " ca_file=" << bad.ca_file);
      MattermostClient client(bad);
      auto me = client.GetMe();
      REQUIRE_FALSE(me.ok());
      CHECK(me.error.id == "tls_config");
      CHECK_FALSE(me.error.retryable);
      MattermostWebSocket ws(bad);
      auto c = ws.Connect("", 0);
      INFO(c.error.message);
      REQUIRE_FALSE(c.ok());
      CHECK(c.error.id == "tls_config");
      CHECK_FALSE(c.error.retryable);
    }
    MattermostOptions missing = o;
    missing.ca_file = dir.File("missing.pem");
    MattermostWebSocket ws(missing);
    auto c = ws.Connect("", 0);
    REQUIRE_FALSE(c.ok());
    CHECK(c.error.id == "tls_config");
    MattermostClient client(missing);
    CHECK_FALSE(client.GetMe().ok());
  }
  SECTION("mutual TLS") {
    MattermostOptions m = o;
    m.url = "https://localhost:" + std::to_string(mtls.port());
    m.client_cert = pki.client_cert;
    m.client_key = pki.client_key;
    MattermostClient client(m);
    auto me = client.GetMe();
    INFO(me.error.message);
    REQUIRE(me.ok());
    MattermostWebSocket ws(m);
    auto c = ws.Connect("", 0);
    INFO(c.error.message);
    REQUIRE(c.ok());
    auto hello = ws.Read(milliseconds(5000));
    INFO(hello.error.message);
    REQUIRE(hello.ok());
    CHECK(hello.value->event == "hello");

    MattermostOptions anonymous = m;
    anonymous.client_cert.clear();
    anonymous.client_key.clear();
    MattermostClient anonymous_client(anonymous);
    CHECK_FALSE(anonymous_client.GetMe().ok());
    MattermostWebSocket anonymous_ws(anonymous);
    auto ac = anonymous_ws.Connect("", 0);
    if (ac.ok()) CHECK_FALSE(anonymous_ws.Read(milliseconds(5000)).ok());
  }
}
