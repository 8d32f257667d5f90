#include "relay/cli.h"

#include <unistd.h>

#include <simdjson.h>
#include <boost/program_options.hpp>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "base/json.h"
#include "base/log.h"
#include "config/config.h"
#include "crypto/api_token.h"
#include "crypto/identity.h"
#include "relay/daemon.h"
#include "relay/demo.h"
#include "relay/http_server.h"

namespace po = boost::program_options;

namespace relay {
namespace {

struct Invocation {
  po::variables_map vm;
};

struct Command {
  const char* name;
  const char* synopsis;  // after "relay NAME"
  const char* summary;
  std::function<void(po::options_description&, po::positional_options_description&)> declare;
  std::function<int(const po::variables_map&)> run;
};

int Fail(const std::string& message) {
  std::fprintf(stderr, "relay: %s\n", message.c_str());
  return 1;
}

void AddConfig(po::options_description& o) {
  o.add_options()("config,c", po::value<std::string>()->required(), "site configuration file");
}

Result<config::Config> Load(const po::variables_map& vm) {
  return config::LoadConfig(vm["config"].as<std::string>());
}

std::string IngestHost(const config::Config& c) {
  // A daemon listening on every address is reached on loopback.
  if (c.ingest_listen.host == "0.0.0.0" || c.ingest_listen.host.empty()) return "127.0.0.1";
  if (c.ingest_listen.host == "::") return "::1";
  return c.ingest_listen.host;
}

// A client for the site's API, sending the token of [ingest] token_file (none with
// allow_anonymous). Error when the token file cannot be used.
Result<std::unique_ptr<HttpClient>> ApiClient(const config::Config& c) {
  auto client = std::make_unique<HttpClient>(IngestHost(c), c.ingest_listen.port);
  if (!c.ingest_token_file.empty()) {
    auto token = crypto::ApiToken::LoadFile(c.ingest_token_file);
    if (!token) return token.status().Wrap("[ingest] token_file");
    client->SetBearerToken(token->value());
  }
  return client;
}

int CmdKeygen(const po::variables_map& vm) {
  if (Status s = crypto::Init(); !s) return Fail(s.message());
  std::string file = vm["file"].as<std::string>();
  if (Status s = crypto::SiteKey::CreateFile(file); !s) return Fail(s.message());
  auto key = crypto::SiteKey::LoadFile(file);
  if (!key) return Fail(key.message());
  std::fprintf(stderr, "wrote %s (mode 0600); public identity:\n", file.c_str());
  std::printf("%s\n", key->identity().ToString().c_str());
  return 0;
}

int CmdPubkey(const po::variables_map& vm) {
  if (Status s = crypto::Init(); !s) return Fail(s.message());
  auto key = crypto::SiteKey::LoadFile(vm["file"].as<std::string>());
  if (!key) return Fail(key.message());
  std::printf("%s\n", key->identity().ToString().c_str());
  return 0;
}

int CmdToken(const po::variables_map& vm) {
  if (Status s = crypto::Init(); !s) return Fail(s.message());
  const std::string file = vm["file"].as<std::string>();
  if (Status s = crypto::ApiToken::CreateFile(file); !s) return Fail(s.message());
  // The token itself is never printed: it stays in the file.
  std::fprintf(stderr, "wrote %s (mode 0600); use it with [ingest] token_file = %s\n", file.c_str(),
               file.c_str());
  return 0;
}

int CmdRun(const po::variables_map& vm) { return RunDaemon(vm["config"].as<std::string>()); }

int CmdCheckConfig(const po::variables_map& vm) {
  if (Status s = crypto::Init(); !s) return Fail(s.message());
  auto cfg = Load(vm);
  if (!cfg) {
    std::printf("%s\n", cfg.message().c_str());
    return 1;
  }
  if (!cfg->ingest_token_file.empty()) {
    if (auto token = crypto::ApiToken::LoadFile(cfg->ingest_token_file); !token) {
      std::printf("%s: [ingest] token_file: %s\n", cfg->path.c_str(), token.message().c_str());
      return 1;
    }
  }
  std::vector<std::string> notes;
  Status secrets = CheckSecretFiles(*cfg, &notes);
  for (const std::string& note : notes) std::printf("note: %s\n", note.c_str());
  if (!secrets) {
    std::printf("%s\n", secrets.message().c_str());
    return 1;
  }
  std::printf("%s: ok (site '%s', %zu peer(s), %zu channel(s))\n", cfg->path.c_str(),
              cfg->site_name.c_str(), cfg->peers.size(), cfg->channels.size());
  return 0;
}

int CmdPost(const po::variables_map& vm) {
  if (Status s = crypto::Init(); !s) return Fail(s.message());
  auto cfg = Load(vm);
  if (!cfg) return Fail(cfg.message());
  std::string body = "{\"channel\":" + JsonString(vm["channel"].as<std::string>()) +
                     ",\"author\":" + JsonString(vm["author"].as<std::string>()) +
                     ",\"text\":" + JsonString(vm["text"].as<std::string>());
  if (vm.count("id")) body += ",\"id\":" + JsonString(vm["id"].as<std::string>());
  if (vm.count("thread")) body += ",\"thread\":" + JsonString(vm["thread"].as<std::string>());
  body += "}";
  auto client = ApiClient(*cfg);
  if (!client) return Fail(client.message());
  auto r = (*client)->Request("POST", "/v1/messages", body);
  if (!r) return Fail(r.message() + " (is the relay daemon running?)");
  if (r->status != 202)
    return Fail("the daemon answered " + std::to_string(r->status) + ": " + r->body);
  std::printf("%s\n", r->body.c_str());
  return 0;
}

// `--since`: an RFC 3339 time or a date (YYYY-MM-DD, midnight UTC), in ms since 1970.
Result<std::int64_t> ParseSince(const std::string& text) {
  std::string full = text;
  if (text.size() == 10 && text[4] == '-' && text[7] == '-') full += "T00:00:00Z";
  auto t = config::ParseTime(full);
  if (!t) {
    return Status::Error("--since " + JsonString(text) +
                         ": expected a date (2026-01-31) or an RFC 3339 time "
                         "(2026-01-31T08:00:00Z): " +
                         t.message());
  }
  return static_cast<std::int64_t>(
      std::chrono::duration_cast<std::chrono::milliseconds>(t.value().time_since_epoch()).count());
}

int CmdBackfill(const po::variables_map& vm) {
  if (Status s = crypto::Init(); !s) return Fail(s.message());
  auto cfg = Load(vm);
  if (!cfg) return Fail(cfg.message());
  const std::string channel = vm["channel"].as<std::string>();
  std::int64_t since = 0;
  if (vm.count("since")) {
    auto parsed = ParseSince(vm["since"].as<std::string>());
    if (!parsed) return Fail(parsed.message());
    since = parsed.value();
  }
  auto client = ApiClient(*cfg);
  if (!client) return Fail(client.message());
  auto r = (*client)->Request(
      "POST", "/v1/mattermost/backfill",
      "{\"channel\":" + JsonString(channel) + ",\"since_ms\":" + std::to_string(since) + "}");
  if (!r) return Fail(r.message() + " (is the relay daemon running?)");
  if (r->status != 202)
    return Fail("the daemon answered " + std::to_string(r->status) + ": " + r->body);
  simdjson::dom::parser parser;
  simdjson::dom::element doc;
  std::uint64_t request = 0;
  if (!parser.parse(r->body).get(doc) && doc["request"].get(request)) request = 0;
  std::printf("backfill of channel '%s' asked (posts created from %s until bridging began)\n",
              channel.c_str(),
              since == 0 ? "the beginning"
                         : config::FormatTime(std::chrono::system_clock::time_point(
                                                  std::chrono::milliseconds(since)))
                               .c_str());
  if (vm.count("no-wait")) return 0;
  // Progress until done. A daemon that stops meanwhile resumes the backfill when it starts.
  std::string last;
  int unanswered = 0;
  while (true) {
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    auto st = (*client)->Request("GET", "/v1/status");
    if (!st || st->status != 200) {
      if (++unanswered >= 60) {
        return Fail(
            "the daemon does not answer; the backfill is stored and goes on when the "
            "daemon runs again (see `relay status`)");
      }
      continue;
    }
    unanswered = 0;
    simdjson::dom::element status;
    simdjson::dom::array channels;
    if (parser.parse(st->body).get(status) || status["mattermost"]["channels"].get(channels))
      return Fail("the daemon's status has no chat channels: " + st->body);
    for (simdjson::dom::element c : channels) {
      std::string_view name, state;
      if (c["name"].get(name) || name != channel) continue;
      simdjson::dom::element b;
      if (c["backfill"].get(b) || b["state"].get(state)) continue;
      auto u64 = [&b](const char* key) {
        std::uint64_t v = 0;
        return b[key].get(v) ? std::uint64_t{0} : v;
      };
      const std::uint64_t req = u64("request"), listed = u64("listed"), done = u64("done"),
                          captured = u64("captured");
      double seconds = 0;
      if (b["seconds"].get(seconds)) seconds = 0;
      // After a restart the daemon resumes it as request 0.
      if (req != request && req != 0) continue;
      std::string line;
      if (state == "listing") {
        line = "listing: " + std::to_string(listed) + " posts found";
      } else if (state == "capturing") {
        line = "carrying: " + std::to_string(done) + " of " + std::to_string(listed) + " posts";
      } else if (state == "done") {
        char rate[64];
        std::snprintf(rate, sizeof rate, "%.1f s, %.0f posts/s", seconds,
                      seconds > 0 ? static_cast<double>(listed) / seconds : 0.0);
        std::printf("done: %llu posts carried (%llu changes with their reactions) in %s\n",
                    static_cast<unsigned long long>(listed),
                    static_cast<unsigned long long>(captured), rate);
        return 0;
      } else {
        line = std::string(state);
      }
      if (line != last) std::printf("%s\n", line.c_str());
      std::fflush(stdout);
      last = line;
    }
  }
}

int CmdStatus(const po::variables_map& vm) {
  if (Status s = crypto::Init(); !s) return Fail(s.message());
  auto cfg = Load(vm);
  if (!cfg) return Fail(cfg.message());
  auto client = ApiClient(*cfg);
  if (!client) return Fail(client.message());
  auto r = (*client)->Request("GET", "/v1/status");
  if (!r) return Fail(r.message() + " (is the relay daemon running?)");
  if (r->status != 200)
    return Fail("the daemon answered " + std::to_string(r->status) + ": " + r->body);
  if (vm.count("json")) {
    std::printf("%s\n", r->body.c_str());
    return 0;
  }
  simdjson::dom::parser parser;
  simdjson::dom::element doc;
  if (parser.parse(r->body).get(doc)) return Fail("the daemon's status is not JSON: " + r->body);
  auto str = [](simdjson::dom::element e, const char* k) {
    std::string_view v;
    return e[k].get(v) ? std::string("?") : std::string(v);
  };
  auto num = [](simdjson::dom::element e, const char* k) {
    std::int64_t v = 0;
    return e[k].get(v) ? std::int64_t{-1} : v;
  };
  std::printf("site %s  ingested %lld  delivered %lld  inbound backlog %lld\n",
              str(doc, "site").c_str(), static_cast<long long>(num(doc, "events_ingested")),
              static_cast<long long>(num(doc, "events_delivered")),
              static_cast<long long>(num(doc, "inbound_backlog")));
  std::printf("%-16s %-5s %10s %12s %s\n", "PEER", "LINK", "BACKLOG", "ACKED", "LAST CONTACT");
  simdjson::dom::array peers;
  if (!doc["peers"].get(peers)) {
    std::int64_t now = std::chrono::duration_cast<std::chrono::milliseconds>(
                           std::chrono::system_clock::now().time_since_epoch())
                           .count();
    for (simdjson::dom::element p : peers) {
      std::int64_t last = num(p, "last_contact_ms");
      std::string ago = last <= 0 ? "never" : std::to_string((now - last) / 1000) + " s ago";
      std::printf("%-16s %-5s %10lld %12lld %s\n", str(p, "name").c_str(), str(p, "link").c_str(),
                  static_cast<long long>(num(p, "queue_depth")),
                  static_cast<long long>(num(p, "acked_through")), ago.c_str());
    }
  }
  simdjson::dom::object refused;
  if (!doc["api_refused"].get(refused)) {
    std::string line;
    for (auto [reason, count] : refused) {
      std::int64_t n = 0;
      if (!count.get(n) && n > 0)
        line += (line.empty() ? "" : ", ") + std::string(reason) + " " + std::to_string(n);
    }
    if (!line.empty()) std::printf("API requests refused: %s\n", line.c_str());
  }
  if (!doc["refused"].get(refused)) {
    std::string line;
    for (auto [reason, count] : refused) {
      std::int64_t n = 0;
      if (!count.get(n) && n > 0)
        line += (line.empty() ? "" : ", ") + std::string(reason) + " " + std::to_string(n);
    }
    if (!line.empty()) std::printf("frames and events refused: %s\n", line.c_str());
  }
  simdjson::dom::array chat;
  if (!doc["mattermost"]["channels"].get(chat)) {
    for (simdjson::dom::element c : chat) {
      simdjson::dom::element b;
      if (c["backfill"].get(b)) continue;
      std::printf("chat channel %s: backfill %s, %lld of %lld posts\n", str(c, "name").c_str(),
                  str(b, "state").c_str(), static_cast<long long>(num(b, "done")),
                  static_cast<long long>(num(b, "listed")));
    }
  }
  simdjson::dom::array warnings;
  if (!doc["warnings"].get(warnings)) {
    for (simdjson::dom::element w : warnings) {
      std::string_view text;
      if (!w.get(text)) std::printf("warning: %.*s\n", static_cast<int>(text.size()), text.data());
    }
  }
  return 0;
}

// True when the site's daemon answers on its ingest address.
bool DaemonRunning(const config::Config& c) {
  HttpClient client(IngestHost(c), c.ingest_listen.port);
  auto r = client.Request("GET", "/healthz");
  return r && r->status == 200;
}

constexpr int kBusyRetries = 60;  // seconds `relay export` / `import` wait for a bundle worker

// Runs `work` against the site's store: through the running daemon when there is one (the
// daemon owns the store), else with the store opened here.
template <typename T>
Result<T> WithStore(const config::Config& c, const std::string& endpoint, const std::string& body,
                    const std::function<Result<T>(const std::string&)>& parse,
                    const std::function<Result<T>(Daemon&)>& offline) {
  if (DaemonRunning(c)) {
    auto client = ApiClient(c);
    if (!client) return client.status();
    auto r = (*client)->Request("POST", endpoint, body);
    // Every bundle worker busy (429): wait for one, for a while.
    for (int i = 0; r && r->status == 429 && i < kBusyRetries; ++i) {
      std::this_thread::sleep_for(std::chrono::seconds(1));
      r = (*client)->Request("POST", endpoint, body);
    }
    if (!r) return Status::Error(r.message());
    if (r->status != 200) {
      simdjson::dom::parser parser;
      simdjson::dom::element doc;
      std::string_view error;
      if (!parser.parse(r->body).get(doc) && !doc["error"].get(error))
        return Status::Error(std::string(error));
      return Status::Error("the daemon answered " + std::to_string(r->status) + ": " + r->body);
    }
    return parse(r->body);
  }
  Daemon daemon(c, Daemon::Options{/*offline=*/true});
  if (Status s = daemon.Start(); !s) {
    daemon.Stop();
    return s.Wrap("opening the site's store (is another relay using it?)");
  }
  Result<T> result = offline(daemon);
  daemon.Stop();
  return result;
}

int CmdExport(const po::variables_map& vm) {
  if (Status s = crypto::Init(); !s) return Fail(s.message());
  auto cfg = Load(vm);
  if (!cfg) return Fail(cfg.message());
  ExportOptions o;
  o.peer = vm["peer"].as<std::string>();
  const config::PeerConfig* peer = cfg->FindPeer(o.peer);
  if (!peer) return Fail("unknown peer '" + o.peer + "' (no [peer." + o.peer + "] section)");
  o.out_dir = vm.count("out") ? vm["out"].as<std::string>() : peer->files_dir;
  if (o.out_dir.empty()) return Fail("no --out folder, and [peer." + o.peer + "] has no files_dir");
  o.out_dir = std::filesystem::absolute(o.out_dir).string();
  o.all = vm.count("all") > 0;
  o.ack = vm.count("ack") > 0;
  o.resend = vm.count("resend-request") > 0;
  if (vm.count("max-bytes")) {
    auto n = config::ParseSize(vm["max-bytes"].as<std::string>());
    if (!n) return Fail("--max-bytes: " + n.message());
    o.max_bytes = *n;
  }
  if (vm.count("ttl")) {
    auto d = config::ParseDuration(vm["ttl"].as<std::string>());
    if (!d) return Fail("--ttl: " + d.message());
    o.ttl = *d;
  }
  bool tty = isatty(STDERR_FILENO);
  o.progress = [tty](const std::string& file, std::uint64_t events, std::uint64_t bytes) {
    if (tty)
      std::fprintf(stderr, "  wrote %s (%llu events, %llu bytes so far)\n", file.c_str(),
                   static_cast<unsigned long long>(events), static_cast<unsigned long long>(bytes));
  };
  std::string body = "{\"peer\":" + JsonString(o.peer) + ",\"out\":" + JsonString(o.out_dir) +
                     ",\"all\":" + (o.all ? "true" : "false") +
                     ",\"ack\":" + (o.ack ? "true" : "false") +
                     ",\"resend\":" + (o.resend ? "true" : "false") +
                     ",\"max_bytes\":" + std::to_string(o.max_bytes) +
                     ",\"ttl_ms\":" + std::to_string(o.ttl.count()) + "}";
  auto parse = [](const std::string& json) -> Result<ExportReport> {
    simdjson::dom::parser parser;
    simdjson::dom::element doc;
    if (parser.parse(json).get(doc)) return Status::Error("the daemon's answer is not JSON");
    ExportReport r;
    simdjson::dom::array files;
    if (!doc["files"].get(files))
      for (simdjson::dom::element f : files) {
        std::string_view v;
        if (!f.get(v)) r.files.emplace_back(v);
      }
    if (doc["events"].get(r.events)) r.events = 0;
    if (doc["bytes"].get(r.bytes)) r.bytes = 0;
    std::string_view note;
    if (!doc["note"].get(note)) r.note = std::string(note);
    return r;
  };
  auto r = WithStore<ExportReport>(*cfg, "/v1/bundles/export", body, parse,
                                   [&](Daemon& d) { return d.Export(o); });
  if (!r) return Fail("export: " + r.message());
  for (const auto& f : r->files) std::printf("%s\n", f.c_str());
  if (!r->note.empty()) std::fprintf(stderr, "%s\n", r->note.c_str());
  if (!o.ack && !o.resend && !r->files.empty())
    std::fprintf(stderr, "exported %llu event(s) for '%s' in %zu file(s), %llu bytes\n",
                 static_cast<unsigned long long>(r->events), o.peer.c_str(), r->files.size(),
                 static_cast<unsigned long long>(r->bytes));
  return 0;
}

int CmdImport(const po::variables_map& vm) {
  if (Status s = crypto::Init(); !s) return Fail(s.message());
  auto cfg = Load(vm);
  if (!cfg) return Fail(cfg.message());
  std::vector<std::string> paths;
  for (const auto& p : vm["path"].as<std::vector<std::string>>())
    paths.push_back(std::filesystem::absolute(p).string());
  std::string body = "{\"paths\":[";
  for (std::size_t i = 0; i < paths.size(); ++i) body += (i ? "," : "") + JsonString(paths[i]);
  body += "]}";
  using Results = std::vector<ImportResult>;
  auto parse = [](const std::string& json) -> Result<Results> {
    simdjson::dom::parser parser;
    simdjson::dom::element doc;
    simdjson::dom::array list;
    if (parser.parse(json).get(doc) || doc["results"].get(list))
      return Status::Error("the daemon's answer is not the expected JSON");
    Results out;
    for (simdjson::dom::element e : list) {
      ImportResult r;
      std::string_view v;
      if (!e["path"].get(v)) r.path = std::string(v);
      if (!e["message"].get(v)) r.message = std::string(v);
      if (e["ok"].get(r.ok)) r.ok = false;
      if (e["events"].get(r.events)) r.events = 0;
      out.push_back(std::move(r));
    }
    return out;
  };
  auto r = WithStore<Results>(*cfg, "/v1/bundles/import", body, parse,
                              [&](Daemon& d) -> Result<Results> { return d.Import(paths); });
  if (!r) return Fail("import: " + r.message());
  int refused = 0;
  for (const auto& res : *r) {
    std::printf("%s: %s%s\n", log::Printable(res.path).c_str(),
                res.ok ? "" : "REFUSED: ", log::Printable(res.message).c_str());
    if (!res.ok) ++refused;
  }
  if (r->empty()) return Fail("import: no .bundle or .ack files found");
  return refused == 0 ? 0 : 1;
}

int CmdRebase(const po::variables_map& vm) {
  if (Status s = crypto::Init(); !s) return Fail(s.message());
  auto cfg = Load(vm);
  if (!cfg) return Fail(cfg.message());
  const std::uint64_t above = vm["above"].as<std::uint64_t>();
  if (DaemonRunning(*cfg)) return Fail("stop the relay daemon first: the log moves only offline");
  Daemon daemon(*cfg, Daemon::Options{/*offline=*/true});
  if (Status s = daemon.Start(); !s) {
    daemon.Stop();
    return Fail(s.Wrap("opening the site's store (is another relay using it?)").message());
  }
  auto moved = daemon.RebaseLog(above);
  daemon.Stop();
  if (!moved) return Fail("rebase: " + moved.message());
  std::printf(
      "moved %llu queued event(s) above log position %llu; peers whose cursor is there "
      "take them as new\n",
      static_cast<unsigned long long>(*moved), static_cast<unsigned long long>(above));
  return 0;
}

int CmdDemo(const po::variables_map& vm) {
  DemoOptions o;
  o.messages = vm["messages"].as<int>();
  o.keep = vm.count("keep") > 0;
  return RunDemo(o);
}

const std::vector<Command>& Commands() {
  static const std::vector<Command> kCommands = {
      {"keygen", "FILE", "create a new site key file (0600); refuses to overwrite",
       [](auto& o, auto& p) {
         o.add_options()("file", po::value<std::string>()->required(), "key file to create");
         p.add("file", 1);
       },
       CmdKeygen},
      {"pubkey", "FILE", "print the site's public identity (one line)",
       [](auto& o, auto& p) {
         o.add_options()("file", po::value<std::string>()->required(), "key file");
         p.add("file", 1);
       },
       CmdPubkey},
      {"token", "FILE",
       "create a new token file for [ingest] token_file (0600); refuses to overwrite",
       [](auto& o, auto& p) {
         o.add_options()("file", po::value<std::string>()->required(), "token file to create");
         p.add("file", 1);
       },
       CmdToken},
      {"run", "--config FILE", "run the daemon in the foreground (systemd runs this)",
       [](auto& o, auto&) { AddConfig(o); }, CmdRun},
      {"check-config", "--config FILE", "validate; exit 0 or print every problem and exit 1",
       [](auto& o, auto&) { AddConfig(o); }, CmdCheckConfig},
      {"post", "--config FILE --channel NAME --author NAME TEXT",
       "submit one message through the running daemon's ingest API",
       [](auto& o, auto& p) {
         AddConfig(o);
         o.add_options()("channel", po::value<std::string>()->required(), "channel name")(
             "author", po::value<std::string>()->required(), "author display name")(
             "id", po::value<std::string>(), "client idempotency key")(
             "thread", po::value<std::string>(), "id of the thread root event")(
             "text", po::value<std::string>()->required(), "message text");
         p.add("text", 1);
       },
       CmdPost},
      {"status", "--config FILE [--json]", "show the running daemon's peers, links and backlog",
       [](auto& o, auto&) {
         AddConfig(o);
         o.add_options()("json", "machine-readable output");
       },
       CmdStatus},
      {"backfill", "--config FILE --channel NAME [--since DATE] [--no-wait]",
       "carry a Mattermost channel's history (posts from before bridging began) to the peers, "
       "through the running daemon",
       [](auto& o, auto&) {
         AddConfig(o);
         o.add_options()("channel", po::value<std::string>()->required(), "channel name")(
             "since", po::value<std::string>(),
             "only posts created from then: 2026-01-31 or 2026-01-31T08:00:00Z (default: all)")(
             "no-wait", "return once the daemon has the request (progress: relay status)");
       },
       CmdBackfill},
      {"export", "--config FILE --peer NAME --out DIR [--all] [--ack]",
       "write sneakernet bundle(s) for a peer (or, with --ack, an acknowledgement file)",
       [](auto& o, auto&) {
         AddConfig(o);
         o.add_options()("peer", po::value<std::string>()->required(), "peer name")(
             "out", po::value<std::string>(), "output folder (default: the peer's files_dir)")(
             "all", "re-export everything the peer has not acknowledged")(
             "ack", "write an acknowledgement of what this site has from the peer")(
             "resend-request", "write a request for what is missing from the peer's diode")(
             "max-bytes", po::value<std::string>(), "largest bundle file (default 256MiB)")(
             "ttl", po::value<std::string>(), "bundles expire after this (default 30d; 0s: never)");
       },
       CmdExport},
      {"import", "--config FILE PATH...", "verify and import bundles, ack and resend-request files",
       [](auto& o, auto& p) {
         AddConfig(o);
         o.add_options()("path", po::value<std::vector<std::string>>()->required(), "bundles");
         p.add("path", -1);
       },
       CmdImport},
      {"rebase", "--config FILE --above SEQ",
       "with the daemon stopped: move the outbound log above a peer's cursor (a store re-created "
       "behind it; the daemon's log names SEQ)",
       [](auto& o, auto&) {
         AddConfig(o);
         o.add_options()("above", po::value<std::uint64_t>()->required(),
                         "the peer's acknowledged position, as the refusal in the log names it");
       },
       CmdRebase},
      {"demo", "[--messages N] [--keep]",
       "run two sites on loopback, send messages both ways, print what arrived",
       [](auto& o, auto&) {
         o.add_options()("messages", po::value<int>()->default_value(1000), "messages each way")(
             "keep", "keep the demo folder");
       },
       CmdDemo},
  };
  return kCommands;
}

void PrintUsage(std::FILE* out) {
  std::fprintf(out, "usage: relay COMMAND [OPTIONS]\n\ncommands:\n");
  for (const auto& c : Commands())
    std::fprintf(out, "  %-13s %-50s\n  %-13s   %s\n", c.name, c.synopsis, "", c.summary);
  std::fprintf(out, "\n'relay COMMAND --help' shows a command's options.\n");
}

void PrintCommandUsage(std::FILE* out, const Command& c, const po::options_description& o) {
  std::ostringstream s;
  s << o;
  std::fprintf(out, "usage: relay %s %s\n%s\n\n%s", c.name, c.synopsis, c.summary, s.str().c_str());
}

}  // namespace

int RunCli(int argc, char** argv) {
  if (argc < 2) {
    PrintUsage(stderr);
    return 2;
  }
  std::string name = argv[1];
  if (name == "--help" || name == "-h" || name == "help") {
    PrintUsage(stdout);
    return 0;
  }
  const Command* cmd = nullptr;
  for (const auto& c : Commands())
    if (name == c.name) cmd = &c;
  if (!cmd) {
    std::fprintf(stderr, "relay: unknown command '%s'\n\n", name.c_str());
    PrintUsage(stderr);
    return 2;
  }
  po::options_description options("options");
  options.add_options()("help,h", "show this help");
  po::positional_options_description positional;
  cmd->declare(options, positional);
  po::variables_map vm;
  try {
    po::store(
        po::command_line_parser(argc - 1, argv + 1).options(options).positional(positional).run(),
        vm);
    if (vm.count("help")) {
      PrintCommandUsage(stdout, *cmd, options);
      return 0;
    }
    po::notify(vm);
  } catch (const po::error& e) {
    std::fprintf(stderr, "relay %s: %s\n\n", cmd->name, e.what());
    PrintCommandUsage(stderr, *cmd, options);
    return 2;
  }
  return cmd->run(vm);
}

}  // namespace relay
