#include "config/config.h"

#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "crypto/identity.h"

#include "tests/test_util.h"

using relay::testing::TempDir;

namespace relay::config {
namespace {

namespace fs = std::filesystem;
using std::chrono::milliseconds;

std::string NewPublicKey() {
  REQUIRE(crypto::Init().ok());
  return crypto::SiteKey::Generate().identity().ToString();
}

// One public key per peer name, stable for the whole test run.
const std::string& KeyOf(const std::string& peer) {
  static const std::string kAws = NewPublicKey();
  static const std::string kEnclave = NewPublicKey();
  static const std::string kOther = NewPublicKey();
  if (peer == "aws") return kAws;
  if (peer == "enclave") return kEnclave;
  return kOther;
}

// A public identity with the signing key of `sign_from` and the box key of `box_from`.
std::string MixedKey(const std::string& sign_from, const std::string& box_from) {
  crypto::PublicIdentity mixed = *crypto::PublicIdentity::Parse(sign_from);
  mixed.box_pk = crypto::PublicIdentity::Parse(box_from)->box_pk;
  return mixed.ToString();
}

std::vector<std::string> Lines(const std::string& text) {
  std::vector<std::string> lines;
  std::size_t start = 0;
  while (start <= text.size()) {
    const auto end = text.find('\n', start);
    lines.push_back(text.substr(start, end - start));
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return lines;
}

const std::string kSite =
    "[site]\n"
    "name = europe\n"
    "key_file = europe.key\n"
    "data_dir = data\n";
const std::string kIngest =
    "[ingest]\n"
    "listen = 127.0.0.1:8081\n"
    "token_file = ingest.token\n";

std::string Peer(const std::string& name) {
  return "[peer." + name + "]\npublic_key = " + KeyOf(name) + "\n";
}

// A valid config (site, ingest, peer aws) followed by `extra`.
std::string Valid(const std::string& extra = "") { return kSite + kIngest + Peer("aws") + extra; }

// Loads `text` and returns the error message, which must exist.
std::string ErrorsOf(const std::string& text) {
  TempDir dir;
  const std::string path = dir.Write("europe.conf", text);
  const auto config = LoadConfig(path);
  REQUIRE_FALSE(config.ok());
  for (const std::string& line : Lines(config.message())) {
    CHECK(line.rfind(path + ": ", 0) == 0);  // every problem names the file
  }
  return config.message();
}

TEST_CASE("the example from design.md loads with every field set") {
  TempDir dir;
  const std::string text =
      "; relay site config\n"
      "# europe\n"
      "[site]\n"
      "name = europe                     # [a-z0-9-], 1..32 chars\n"
      "key_file = keys/europe.key\n"
      "data_dir = /var/lib/relay/europe\n"
      "dedup_ttl = 3d\n"
      "\n"
      "[ingest]\n"
      "listen = 127.0.0.1:8081           # HTTP: ingest API, /healthz, /metrics\n"
      "token_file = /etc/relay/ingest.token   # bearer token for the API (see Trust model)\n"
      "max_body = 8MiB\n"
      "max_text = 32KiB ; inline comment with a semicolon\n"
      "\n"
      "[zmq]\n"
      "listen = tcp://0.0.0.0:7400       # optional: accept peers here\n"
      "heartbeat_interval = 500ms\n"
      "peer_timeout = 3s\n"
      "\n"
      "[peer.aws]\n"
      "public_key = " +
      KeyOf("aws") +
      "   # pasted from relay pubkey\n"
      "zmq_connect = tcp://aws-relay.internal:7400   # optional: this side dials out\n"
      "files_dir = /media/usb/relay                 # optional: sneakernet export default\n"
      "diode_send = udp://10.9.0.2:9000             # optional: one-way sender\n"
      "window = 16\n"
      "max_frame_events = 500\n"
      "max_frame_bytes = 1MiB\n"
      "\n"
      "  [ peer.enclave ]  \n"
      "\tpublic_key=" +
      KeyOf("enclave") +
      "\n"
      "files_dir = ../usb\n"
      "\n"
      "[diode]\n"
      "listen = udp://0.0.0.0:9000       # optional: one-way receiver\n"
      "\n"
      "[channel.war-room]\n"
      "peers = aws, enclave              # comma-separated peer names\n"
      "sink = jsonl                      # jsonl | mattermost\n"
      "jsonl_path = /var/lib/relay/europe/war-room.jsonl\n"
      "\n"
      "[channel.ops.eu_1]\n"
      "peers =aws\n"
      "jsonl_path = out/ops.jsonl\n"
      "\n"
      "[mattermost]\n"
      "url = https://chat.europe.example\n"
      "token_file = mattermost.token\n";
  const std::string path = dir.Write("europe.conf", text);
  const auto loaded = LoadConfig(path);
  INFO(loaded.message());
  REQUIRE(loaded.ok());
  const Config& config = *loaded;
  const fs::path base = fs::canonical(dir.path());  // mkdtemp's folder is already canonical

  CHECK(config.path == (base / "europe.conf").string());
  CHECK(config.dir == base.string());
  CHECK(config.site_name == "europe");
  CHECK(config.key_file == (base / "keys/europe.key").string());
  CHECK(config.data_dir == "/var/lib/relay/europe");
  CHECK(config.dedup_ttl == std::chrono::hours(72));

  CHECK(config.ingest_listen.host == "127.0.0.1");
  CHECK(config.ingest_listen.port == 8081);
  CHECK(config.ingest_max_body == 8u << 20);
  CHECK(config.ingest_max_text == 32u << 10);
  CHECK(config.ingest_token_file == "/etc/relay/ingest.token");
  CHECK_FALSE(config.ingest_allow_anonymous);

  CHECK(config.zmq_listen == "tcp://0.0.0.0:7400");
  CHECK(config.heartbeat_interval == milliseconds(500));
  CHECK(config.peer_timeout == milliseconds(3000));
  CHECK(config.diode_listen == "udp://0.0.0.0:9000");
  CHECK(config.mattermost_url == "https://chat.europe.example");
  CHECK(config.mattermost_token_file == (base / "mattermost.token").string());

  REQUIRE(config.peers.size() == 2);
  const PeerConfig* aws = config.FindPeer("aws");
  REQUIRE(aws != nullptr);
  CHECK(aws->name == "aws");
  CHECK(aws->public_key.ToString() == KeyOf("aws"));
  CHECK(aws->zmq_connect == "tcp://aws-relay.internal:7400");
  CHECK(aws->files_dir == "/media/usb/relay");
  CHECK(aws->diode_send == "udp://10.9.0.2:9000");
  CHECK(aws->window == 16);
  CHECK(aws->max_frame_events == 500);
  CHECK(aws->max_frame_bytes == 1u << 20);

  const PeerConfig* enclave = config.FindPeer("enclave");
  REQUIRE(enclave != nullptr);
  CHECK(enclave->public_key.ToString() == KeyOf("enclave"));
  CHECK(enclave->zmq_connect.empty());
  CHECK(enclave->files_dir == (base.parent_path() / "usb").string());
  CHECK(enclave->diode_send.empty());
  CHECK(enclave->window == 8);  // defaults
  CHECK(enclave->max_frame_events == 2048);
  CHECK(enclave->max_frame_bytes == 4u << 20);
  CHECK(config.FindPeer("europe") == nullptr);

  REQUIRE(config.channels.size() == 2);
  const ChannelConfig* war_room = config.FindChannel("war-room");
  REQUIRE(war_room != nullptr);
  CHECK(war_room->peers == std::vector<std::string>{"aws", "enclave"});
  CHECK(war_room->sink == SinkKind::kJsonl);
  CHECK(war_room->jsonl_path == "/var/lib/relay/europe/war-room.jsonl");
  const ChannelConfig* ops = config.FindChannel("ops.eu_1");
  REQUIRE(ops != nullptr);
  CHECK(ops->peers == std::vector<std::string>{"aws"});
  CHECK(ops->sink == SinkKind::kJsonl);  // the default
  CHECK(ops->jsonl_path == (base / "out/ops.jsonl").string());
  CHECK(config.FindChannel("nope") == nullptr);
}

TEST_CASE("a minimal config gets the documented defaults") {
  TempDir dir;
  const std::string path = dir.Write("site.conf", kSite + kIngest);
  const auto loaded = LoadConfig(path);
  INFO(loaded.message());
  REQUIRE(loaded.ok());
  CHECK(loaded->dedup_ttl == std::chrono::hours(24 * 7));
  CHECK(loaded->ingest_max_body == 16u << 20);
  CHECK(loaded->ingest_max_text == 64u << 10);
  CHECK(loaded->zmq_listen.empty());
  CHECK(loaded->heartbeat_interval == milliseconds(1000));
  CHECK(loaded->peer_timeout == milliseconds(5000));
  CHECK(loaded->diode_listen.empty());
  CHECK(loaded->peers.empty());
  CHECK(loaded->channels.empty());
}

TEST_CASE("the local API keys: token_file, allow_anonymous, allowed_hosts, transfer_dirs") {
  TempDir dir;
  const fs::path base = fs::canonical(dir.path());
  SECTION("token_file is resolved like every path") {
    const auto loaded = LoadConfig(dir.Write("a.conf", Valid()));
    INFO(loaded.message());
    REQUIRE(loaded.ok());
    CHECK(loaded->ingest_token_file == (base / "ingest.token").string());
    CHECK_FALSE(loaded->ingest_allow_anonymous);
    CHECK(loaded->ingest_allowed_hosts.empty());
    CHECK(loaded->transfer_dirs.empty());
  }
  SECTION("allow_anonymous = true instead of a token (demos)") {
    const auto loaded = LoadConfig(
        dir.Write("b.conf", kSite + "[ingest]\nlisten = 127.0.0.1:8081\nallow_anonymous = true\n"));
    INFO(loaded.message());
    REQUIRE(loaded.ok());
    CHECK(loaded->ingest_allow_anonymous);
    CHECK(loaded->ingest_token_file.empty());
  }
  SECTION("allowed_hosts and transfer_dirs are lists") {
    const auto loaded = LoadConfig(
        dir.Write("c.conf", kSite + "transfer_dirs = /media/usb , outbox,../shared/\n" + kIngest +
                                "allowed_hosts = relay-eu.internal, metrics.example\n"));
    INFO(loaded.message());
    REQUIRE(loaded.ok());
    CHECK(loaded->ingest_allowed_hosts ==
          std::vector<std::string>{"relay-eu.internal", "metrics.example"});
    CHECK(loaded->transfer_dirs ==
          std::vector<std::string>{"/media/usb", (base / "outbox").string(),
                                   (base.parent_path() / "shared").string()});
  }
}

TEST_CASE("a config path given relative to the working directory becomes absolute") {
  TempDir dir;
  dir.Write("rel.conf", Valid());
  const fs::path old_cwd = fs::current_path();
  fs::current_path(dir.path());
  const auto loaded = LoadConfig("rel.conf");
  fs::current_path(old_cwd);
  INFO(loaded.message());
  REQUIRE(loaded.ok());
  const fs::path base = fs::canonical(dir.path());
  CHECK(loaded->path == (base / "rel.conf").string());
  CHECK(loaded->key_file == (base / "europe.key").string());
}

TEST_CASE("a missing or unreadable file is one clear error") {
  TempDir dir;
  const std::string missing = (dir.path() / "nope.conf").string();
  const auto loaded = LoadConfig(missing);
  REQUIRE_FALSE(loaded.ok());
  CHECK(loaded.message() == "cannot open config file '" + missing + "': " + std::strerror(ENOENT));

  const auto folder = LoadConfig(dir.path().string());
  REQUIRE_FALSE(folder.ok());
  CHECK(folder.message() ==
        "cannot read config file '" + dir.path().string() + "': " + std::strerror(EISDIR));
}

struct ErrorCase {
  const char* what;
  std::string text;
  std::vector<std::string> expected;  // one per problem, each a substring of its line
};

TEST_CASE("each kind of mistake is reported naming the key and quoting the value") {
  const std::string mattermost =
      "[mattermost]\nurl = https://chat.example\ntoken_file = mm.token\n";
  const std::vector<ErrorCase> cases = {
      // structure
      {"repeated section",
       Valid("[site]\nname = x\n"),
       {"section [site] appears again (first on line 1)"}},
      {"misspelt key",
       "[site]\nnmae = europe\nname = europe\nkey_file = k\ndata_dir = d\n" + kIngest,
       {"unknown key 'nmae' in [site]"}},
      {"unknown section", Valid("[sites]\nname = x\n"), {"line 10: unknown section [sites]"}},
      {"unknown dotted section", Valid("[site.x]\nname = x\n"), {"unknown section [site.x]"}},
      {"nameless peer",
       Valid("[peer.]\npublic_key = x\n"),
       {"line 10: section [peer.] has no name; use [peer.NAME]"}},
      {"nameless channel",
       Valid("[channel]\npeers = aws\n"),
       {"section [channel] has no name; use [channel.NAME]"}},
      {"section name ending in a dot",
       Valid("[channel.a.]\npeers = aws\n"),
       {"section name [channel.a.] ends with '.'"}},
      {"empty section name", Valid("[ ]\n"), {"line 10: empty section name '[ ]'"}},
      {"unterminated section",
       Valid("[channel.x\n"),
       {"line 10: missing ']' in section header '[channel.x'"}},
      {"duplicate key",
       Valid("[zmq]\nlisten = tcp://*:1\nlisten = tcp://*:2\n"),
       {"duplicate key 'listen' in [zmq]: 'tcp://*:1', then 'tcp://*:2'"}},
      {"line without =",
       Valid("just words\n"),
       {"line 10: expected 'key = value' or '[section]', got 'just words'"}},
      {"missing key name", Valid("= 5\n"), {"line 10: missing key name before '=' in '= 5'"}},
      {"bad key name", Valid("a.b = 5\n"), {"line 10: bad key name 'a.b'"}},
      {"key outside a section",
       "name = x\n" + kSite + kIngest,
       {"line 1: key 'name' is outside any section"}},
      {"hash inside a value",
       Valid("files_dir = /media/a#b\n"),
       {"line 10: 'files_dir = /media/a#b': '#' starts a comment only"}},
      {"missing site", kIngest, {"missing section [site]"}},
      {"missing ingest", kSite, {"missing section [ingest]"}},
      {"missing key_file",
       "[site]\nname = europe\ndata_dir = d\n" + kIngest,
       {"missing required key 'key_file' in [site]"}},
      {"missing listen", kSite + "[ingest]\n", {"missing required key 'listen' in [ingest]"}},
      {"empty value",
       kSite + kIngest + "[zmq]\nlisten =\n",
       {"[zmq] listen = '': empty value (remove the line to use the default)"}},
      {"empty required value",
       "[site]\nname = europe\nkey_file =\ndata_dir = d\n" + kIngest,
       {"[site] key_file = '': empty value"}},
      // [site]
      {"bad site name",
       "[site]\nname = Europe!\nkey_file = k\ndata_dir = d\n" + kIngest,
       {"[site] name = 'Europe!': must be 1 to 32 characters from a-z, 0-9 and '-'"}},
      {"long site name",
       "[site]\nname = " + std::string(33, 'a') + "\nkey_file = k\ndata_dir = d\n" + kIngest,
       {"[site] name = '" + std::string(33, 'a') + "': must be 1 to 32"}},
      {"bad dedup_ttl",
       kSite + "dedup_ttl = 7\n" + kIngest,
       {"[site] dedup_ttl = '7': bad duration '7': missing unit"}},
      {"zero dedup_ttl",
       kSite + "dedup_ttl = 0s\n" + kIngest,
       {"[site] dedup_ttl = '0s': must be more than 0"}},
      // [ingest]
      {"ingest port 0",
       kSite + "[ingest]\nlisten = 127.0.0.1:0\ntoken_file = t\n",
       {"[ingest] listen = '127.0.0.1:0': port must be 1..65535"}},
      {"ingest without port",
       kSite + "[ingest]\nlisten = localhost\ntoken_file = t\n",
       {"[ingest] listen = 'localhost': bad endpoint 'localhost': missing ':port'"}},
      {"bad max_body",
       kSite + kIngest + "max_body = 10XB\n",
       {"[ingest] max_body = '10XB': bad size '10XB': unknown unit 'XB'"}},
      {"TCP listen without token_file",
       kSite + "[ingest]\nlisten = 0.0.0.0:8081\n",
       {"[ingest] listen = '0.0.0.0:8081' is a TCP address and there is no token_file: anyone "
        "who can reach it could use the API. Set token_file = PATH (create the file with `relay "
        "token PATH`), or allow_anonymous = true (for demos only)"}},
      {"allow_anonymous = false is the default, still needs a token",
       kSite + "[ingest]\nlisten = 127.0.0.1:8081\nallow_anonymous = no\n",
       {"is a TCP address and there is no token_file"}},
      {"allow_anonymous with token_file",
       kSite + kIngest + "allow_anonymous = true\n",
       {"[ingest] allow_anonymous = 'true': contradicts token_file"}},
      {"bad allow_anonymous",
       kSite + kIngest + "allow_anonymous = maybe\n",
       {"[ingest] allow_anonymous = 'maybe': expected true or false"}},
      {"empty token_file",
       kSite + "[ingest]\nlisten = 127.0.0.1:8081\ntoken_file =\n",
       {"[ingest] token_file = '': empty value", "is a TCP address and there is no token_file"}},
      {"bad allowed_hosts",
       kSite + kIngest + "allowed_hosts = relay.internal, evil.example/x, ,\n",
       {"[ingest] allowed_hosts = 'relay.internal, evil.example/x, ,': bad host name "
        "'evil.example/x'",
        "empty host name in the list", "empty host name in the list"}},
      {"transfer_dirs inside data_dir",
       "[site]\nname = europe\nkey_file = k\ndata_dir = /var/lib/relay\n"
       "transfer_dirs = /media/usb, /var/lib/relay/out, /var/lib/relay\n" +
           kIngest,
       {"[site] transfer_dirs = '/media/usb, /var/lib/relay/out, /var/lib/relay': folder "
        "'/var/lib/relay/out' is inside data_dir '/var/lib/relay': bundles never go into the "
        "store's own folder",
        "folder '/var/lib/relay' is inside data_dir"}},
      {"transfer_dirs listed twice or empty",
       kSite + "transfer_dirs = /media/usb,/media/usb/, ,\n" + kIngest,
       {"folder '/media/usb/' is listed twice", "empty folder in the list",
        "empty folder in the list"}},
      {"max_text above max_body",
       kSite + kIngest + "max_body = 1KiB\nmax_text = 2KiB\n",
       {"[ingest] max_text (2048 bytes) must not exceed max_body (1024 bytes)"}},
      // [zmq]
      {"zmq listen scheme",
       Valid("[zmq]\nlisten = udp://0.0.0.0:7400\n"),
       {"[zmq] listen = 'udp://0.0.0.0:7400': expected tcp://host:port or tcp://*:port"}},
      {"zmq listen port",
       Valid("[zmq]\nlisten = tcp://*:70000\n"),
       {"[zmq] listen = 'tcp://*:70000': expected tcp://host:port or tcp://*:port: bad endpoint "
        "'*:70000': bad port '70000'"}},
      {"bad heartbeat",
       Valid("[zmq]\nheartbeat_interval = soon\n"),
       {"[zmq] heartbeat_interval = 'soon': bad duration 'soon'"}},
      {"peer_timeout not above heartbeat",
       Valid("[zmq]\nheartbeat_interval = 2s\npeer_timeout = 2000ms\n"),
       {"[zmq] peer_timeout (2000ms) must exceed heartbeat_interval (2000ms)"}},
      // [peer.NAME]
      {"bad peer name", Valid(Peer("AWS")), {"[peer.AWS]: bad peer name 'AWS': must be 1 to 32"}},
      {"peer named like the site",
       Valid(Peer("europe")),
       {"[peer.europe]: a peer cannot have the site's own name 'europe'"}},
      {"bad public key",
       Valid("[peer.mars]\npublic_key = xyz\n"),
       {"[peer.mars] public_key = 'xyz': bad public key: "}},
      {"missing public key",
       Valid("[peer.mars]\nfiles_dir = x\n"),
       {"missing required key 'public_key' in [peer.mars]"}},
      {"shared public key",
       Valid("[peer.mars]\npublic_key = " + KeyOf("aws") + "\n"),
       {"[peer.mars] public_key = '" + KeyOf("aws") +
        "': same public key as [peer.aws] public_key (each site has its own keys"}},
      {"a peer's current key is another's previous key",
       Valid("[peer.mars]\npublic_key = " + KeyOf("mars") + "\nprevious_public_key = " +
             KeyOf("aws") + "\nprevious_public_key_until = 2030-01-01T00:00:00Z\n"),
       {"[peer.mars] previous_public_key = '" + KeyOf("aws") +
        "': same public key as [peer.aws] public_key"}},
      {"two peers' previous keys are the same",
       Peer("aws") + "previous_public_key = " + KeyOf("enclave") +
           "\nprevious_public_key_until = 2030-01-01T00:00:00Z\n" + Peer("mars") +
           "previous_public_key = " + KeyOf("enclave") +
           "\nprevious_public_key_until = 2030-01-01T00:00:00Z\n",
       {"missing section [site]", "missing section [ingest]",
        "[peer.mars] previous_public_key = '" + KeyOf("enclave") +
            "': same public key as [peer.aws] previous_public_key"}},
      {"a peer's previous key is its current key",
       Valid("previous_public_key = " + KeyOf("aws") +
             "\nprevious_public_key_until = 2030-01-01T00:00:00Z\n"),
       {"[peer.aws] previous_public_key = '" + KeyOf("aws") +
        "': same public key as [peer.aws] public_key (previous_public_key is the key being "
        "replaced, not the new one)"}},
      {"the same signing key with another box key",
       Valid("[peer.mars]\npublic_key = " + MixedKey(KeyOf("aws"), KeyOf("mars")) + "\n"),
       {"[peer.mars] public_key = '" + MixedKey(KeyOf("aws"), KeyOf("mars")) +
        "': same signing key as [peer.aws] public_key"}},
      {"the same box key with another signing key",
       Valid("[peer.mars]\npublic_key = " + MixedKey(KeyOf("mars"), KeyOf("aws")) + "\n"),
       {"[peer.mars] public_key = '" + MixedKey(KeyOf("mars"), KeyOf("aws")) +
        "': same box key as [peer.aws] public_key"}},
      {"previous key without an end",
       Valid("previous_public_key = " + KeyOf("mars") + "\n"),
       {"[peer.aws] previous_public_key needs previous_public_key_until = <RFC 3339 time>, the "
        "moment the previous key stops being accepted (e.g. previous_public_key_until = "
        "2026-12-31T00:00:00Z): a key rotation must end"}},
      {"an end without a previous key",
       Valid("previous_public_key_until = 2030-01-01T00:00:00Z\n"),
       {"[peer.aws] previous_public_key_until = '2030-01-01T00:00:00Z': only used with "
        "previous_public_key"}},
      {"a bad end of the rotation",
       Valid("previous_public_key = " + KeyOf("mars") +
             "\nprevious_public_key_until = 2030-01-01\n"),
       {"[peer.aws] previous_public_key_until = '2030-01-01': bad time '2030-01-01': expected 'T' "
        "between the date and the time (expected an RFC 3339 time such as "
        "2026-12-31T00:00:00Z)"}},
      {"wildcard zmq_connect",
       Valid("zmq_connect = tcp://*:7400\n"),
       {"[peer.aws] zmq_connect = 'tcp://*:7400': expected tcp://host:port: bad endpoint '*:7400': "
        "'*' is not allowed here"}},
      {"bad diode_send",
       Valid("diode_send = tcp://10.0.0.1:9000\n"),
       {"[peer.aws] diode_send = 'tcp://10.0.0.1:9000': expected udp://host:port"}},
      {"window 0",
       Valid("window = 0\n"),
       {"[peer.aws] window = '0': must be a whole number from 1 to 1024"}},
      {"window too big", Valid("window = 1025\n"), {"[peer.aws] window = '1025'"}},
      {"negative window", Valid("window = -1\n"), {"[peer.aws] window = '-1'"}},
      {"max_frame_events too big",
       Valid("max_frame_events = 100001\n"),
       {"[peer.aws] max_frame_events = '100001': must be a whole number from 1 to 100000"}},
      {"max_frame_bytes too small",
       Valid("max_frame_bytes = 512\n"),
       {"[peer.aws] max_frame_bytes = '512': must be from 1024 to 67108864 bytes"}},
      {"max_frame_bytes too big",
       Valid("max_frame_bytes = 65MiB\n"),
       {"[peer.aws] max_frame_bytes = '65MiB'"}},
      // [diode]
      {"bad diode listen",
       Valid("[diode]\nlisten = udp://0.0.0.0\n"),
       {"[diode] listen = 'udp://0.0.0.0': expected udp://host:port: bad endpoint '0.0.0.0': "
        "missing ':port'"}},
      // [channel.NAME]
      {"bad channel name",
       Valid("[channel.-x]\npeers = aws\njsonl_path = x\n"),
       {"[channel.-x]: bad channel name '-x': must be 1 to 64 characters"}},
      {"unknown peer",
       Valid("[channel.ops]\npeers = aws, mars\njsonl_path = x\n"),
       {"[channel.ops] peers = 'aws, mars': unknown peer 'mars' (there is no [peer.mars] "
        "section)"}},
      {"peer listed twice",
       Valid("[channel.ops]\npeers = aws,aws\njsonl_path = x\n"),
       {"[channel.ops] peers = 'aws,aws': peer 'aws' is listed twice"}},
      {"empty peer in list",
       Valid("[channel.ops]\npeers = aws, ,\njsonl_path = x\n"),
       {"[channel.ops] peers = 'aws, ,': empty peer name",
        "[channel.ops] peers = 'aws, ,': empty peer name"}},
      {"missing peers",
       Valid("[channel.ops]\njsonl_path = x\n"),
       {"missing required key 'peers' in [channel.ops]"}},
      {"unknown sink",
       Valid("[channel.ops]\npeers = aws\nsink = slack\njsonl_path = x\n"),
       {"[channel.ops] sink = 'slack': unknown sink 'slack' (expected jsonl, mattermost or "
        "webhook)"}},
      {"missing jsonl_path",
       Valid("[channel.ops]\npeers = aws\nsink = jsonl\n"),
       {"missing required key 'jsonl_path' in [channel.ops] (required when sink = jsonl)"}},
      {"mattermost key on a jsonl channel",
       Valid("[channel.ops]\npeers = aws\njsonl_path = x\nmattermost_channel_id = abc\n"),
       {"[channel.ops] mattermost_channel_id = 'abc': only used with sink = mattermost"}},
      {"shared jsonl_path",
       Valid("[channel.a]\npeers = aws\njsonl_path = x.jsonl\n[channel.b]\npeers = aws\n"
             "jsonl_path = ./x.jsonl\n"),
       {"[channel.b] jsonl_path = './x.jsonl': the same file as [channel.a] jsonl_path"}},
      // sink = mattermost
      {"webhook sink without its url",
       Valid("[channel.ops]\npeers = aws\nsink = webhook\n"),
       {"missing required key 'webhook_url' in [channel.ops] (required when sink = webhook)"}},
      {"webhook url that is not http",
       Valid("[channel.ops]\npeers = aws\nsink = webhook\nwebhook_url = ftp://x/hooks/1\n"),
       {"[channel.ops] webhook_url = 'ftp://x/hooks/1': expected http://HOST/hooks/ID"}},
      {"mattermost client certificate without its key",
       Valid("[channel.ops]\npeers = aws\nsink = mattermost\nmattermost_channel_id = abc\n" +
             mattermost + "client_cert = c.pem\n"),
       {"[mattermost]: client_cert and client_key go together"}},
      {"mattermost sink without its settings",
       Valid("[channel.ops]\npeers = aws\nsink = mattermost\njsonl_path = x\n"),
       {"[channel.ops] jsonl_path = 'x': only used with sink = jsonl",
        "missing required key 'mattermost_channel_id' in [channel.ops] (required when sink = "
        "mattermost)",
        "missing section [mattermost] (required because [channel.ops] uses sink = mattermost)"}},
      {"mattermost section incomplete",
       Valid("[channel.ops]\npeers = aws\nsink = mattermost\nmattermost_channel_id = abc\n"
             "[mattermost]\nurl = chat.example\n"),
       {"[mattermost] url = 'chat.example': expected http://HOST or https://HOST",
        "missing required key 'token_file' in [mattermost] (required because [channel.ops] uses "
        "sink = mattermost)"}},
      {"unknown mattermost key",
       Valid(mattermost + "team = x\n"),
       {"unknown key 'team' in [mattermost]"}},
  };
  for (const ErrorCase& error_case : cases) {
    INFO(error_case.what);
    const std::string message = ErrorsOf(error_case.text);
    INFO(message);
    const std::vector<std::string> lines = Lines(message);
    REQUIRE(lines.size() == error_case.expected.size());
    for (std::size_t i = 0; i < lines.size(); ++i) {
      CHECK(lines[i].find(error_case.expected[i]) != std::string::npos);
    }
  }
}

TEST_CASE("all problems in a file are reported at once") {
  const std::string text =
      "[site]\n"
      "nmae = europe\n"  // 1: unknown key
      "key_file = k\n"   // 2: name missing (reported after key checks)
      "data_dir = d\n"
      "this is not ini\n"  // 3: syntax error; parsing goes on
      "[ingest]\n"
      "listen = 127.0.0.1:99999\n"  // 4: bad port
      "token_file = t\n"
      "[peer.aws]\n"
      "public_key = nope\n"  // 5: bad key
      "window = 0\n"         // 6: bad window
      "[channel.ops]\n"
      "peers = aws, mars\n"      // 7: unknown peer
      "sink = carrier-pigeon\n"  // 8: unknown sink
      "jsonl_path = ops.jsonl\n"
      "[bogus]\n"  // 9: unknown section
      "x = 1\n";
  const std::string message = ErrorsOf(text);
  INFO(message);
  CHECK(Lines(message).size() == 9);
  for (const char* expected : {
           "line 5: expected 'key = value' or '[section]', got 'this is not ini'",
           "line 16: unknown section [bogus]",
           "unknown key 'nmae' in [site]",
           "missing required key 'name' in [site]",
           "[ingest] listen = '127.0.0.1:99999': bad endpoint '127.0.0.1:99999': bad port '99999'",
           "[peer.aws] public_key = 'nope': bad public key",
           "[peer.aws] window = '0'",
           "[channel.ops] peers = 'aws, mars': unknown peer 'mars'",
           "[channel.ops] sink = 'carrier-pigeon': unknown sink 'carrier-pigeon'",
       }) {
    CHECK(message.find(expected) != std::string::npos);
  }
}

TEST_CASE("comments and whitespace") {
  TempDir dir;
  const std::string path =
      dir.Write("c.conf",
                "\xEF\xBB\xBF[site]   ; a byte-order mark and a comment after the header\r\n"
                "name=europe#not-a-comment-but-an-error\r\n"
                "key_file = k\r\n"
                "data_dir = d;still-the-value\r\n"
                "   # indented comment\n"
                "[ingest]\n"
                "listen = [::1]:8081\t# tab before the comment\n"
                "token_file = t\n");
  const auto loaded = LoadConfig(path);
  REQUIRE_FALSE(loaded.ok());
  CHECK(loaded.message() == path +
                                ": line 2: 'name=europe#not-a-comment-but-an-error': '#' starts a "
                                "comment only at the start of a line or after whitespace\n" +
                                path + ": missing required key 'name' in [site]");

  const std::string fixed = dir.Write("d.conf",
                                      "\xEF\xBB\xBF[site]   ; comment\r\n"
                                      "name=europe  #comment\r\n"
                                      "key_file = k\r\n"
                                      "data_dir = d;still-the-value\r\n"
                                      "[ingest]\n"
                                      "listen = [::1]:8081\t# tab before the comment\n"
                                      "token_file = t\n");
  const auto good = LoadConfig(fixed);
  INFO(good.message());
  REQUIRE(good.ok());
  CHECK(good->site_name == "europe");
  CHECK(good->data_dir == (fs::canonical(dir.path()) / "d;still-the-value").string());
  CHECK(good->ingest_listen.host == "::1");
  CHECK(good->ingest_listen.port == 8081);
}

TEST_CASE("ParseDuration") {
  CHECK(*ParseDuration("1500ms") == milliseconds(1500));
  CHECK(*ParseDuration("2s") == milliseconds(2000));
  CHECK(*ParseDuration("5m") == milliseconds(5 * 60 * 1000));
  CHECK(*ParseDuration("1h") == std::chrono::hours(1));
  CHECK(*ParseDuration("7d") == std::chrono::hours(7 * 24));
  CHECK(*ParseDuration("0s") == milliseconds(0));
  CHECK(*ParseDuration(" 10 s ") == milliseconds(10000));

  for (const char* bad : {"", "s", "5", "5x", "5 sec", "-1s", "1.5s", "+2s", "5S",
                          "99999999999999999999ms", "9223372036854776d"}) {
    const auto parsed = ParseDuration(bad);
    INFO(bad);
    REQUIRE_FALSE(parsed.ok());
    CHECK(parsed.message().find("bad duration '" + std::string(bad) + "'") == 0);
  }
  CHECK(ParseDuration("5").message() ==
        "bad duration '5': missing unit (expected ms, s, m, h or d, e.g. '1500ms', '2s', '7d')");
  CHECK(ParseDuration("9223372036854776d").message() ==
        "bad duration '9223372036854776d': too large");
}

TEST_CASE("ParseSize") {
  CHECK(*ParseSize("0") == 0);
  CHECK(*ParseSize("1000") == 1000);
  CHECK(*ParseSize("12B") == 12);
  CHECK(*ParseSize("64KiB") == 64u << 10);
  CHECK(*ParseSize("64K") == 64u << 10);
  CHECK(*ParseSize("16 MiB") == 16u << 20);
  CHECK(*ParseSize("16M") == 16u << 20);
  CHECK(*ParseSize("1GiB") == 1u << 30);
  CHECK(*ParseSize("3G") == std::uint64_t{3} << 30);
  CHECK(*ParseSize("2TiB") == std::uint64_t{2} << 40);
  CHECK(*ParseSize("18446744073709551615") == UINT64_MAX);

  for (const char* bad :
       {"", "KiB", "1KB", "1kib", "1.5MiB", "-1", "1 2", "18446744073709551616", "16777216TiB"}) {
    const auto parsed = ParseSize(bad);
    INFO(bad);
    REQUIRE_FALSE(parsed.ok());
    CHECK(parsed.message().find("bad size '" + std::string(bad) + "'") == 0);
  }
  CHECK(ParseSize("16777216TiB").message() == "bad size '16777216TiB': too large");
  CHECK(ParseSize("18446744073709551616").message() ==
        "bad size '18446744073709551616': number '18446744073709551616' is too large");
}

TEST_CASE("a rotation's previous key is accepted until previous_public_key_until") {
  TempDir dir;
  const auto config = LoadConfig(
      dir.Write("europe.conf", Valid("previous_public_key = " + KeyOf("mars") +
                                     "\nprevious_public_key_until = 2026-12-31T00:00:00Z\n")));
  REQUIRE(config.ok());
  const PeerConfig& aws = config->peers.at(0);
  REQUIRE(aws.previous_public_key);
  CHECK(aws.previous_public_key->ToString() == KeyOf("mars"));
  const auto until = *ParseTime("2026-12-31T00:00:00Z");
  CHECK(aws.previous_public_key_until == until);
  using std::chrono::milliseconds;
  CHECK(aws.PreviousKeyAt(until - milliseconds(1)) == &*aws.previous_public_key);
  CHECK_FALSE(aws.PreviousKeyExpiredAt(until - milliseconds(1)));
  // Refused from that moment on, not after it.
  CHECK(aws.PreviousKeyAt(until) == nullptr);
  CHECK(aws.PreviousKeyExpiredAt(until));
  CHECK(aws.PreviousKeyAt(until + std::chrono::hours(24 * 365)) == nullptr);
  CHECK(crypto::PreviousKeyAccepted(until, until - milliseconds(1)));
  CHECK_FALSE(crypto::PreviousKeyAccepted(until, until));
  // A peer without a previous key has none at any time.
  const auto plain = LoadConfig(dir.Write("plain.conf", Valid()));
  REQUIRE(plain.ok());
  CHECK(plain->peers.at(0).PreviousKeyAt(until) == nullptr);
  CHECK_FALSE(plain->peers.at(0).PreviousKeyExpiredAt(until));
}

TEST_CASE("CheckOwnKeys: a peer cannot have this site's own or previous key") {
  REQUIRE(crypto::Init().ok());
  TempDir dir;
  const crypto::SiteKey own = crypto::SiteKey::Generate();
  const crypto::SiteKey old = crypto::SiteKey::Generate();
  const std::string own_key = own.identity().ToString();
  const std::string old_key = old.identity().ToString();
  const std::string site = kSite + "previous_key_file = old.key\n" + kIngest;
  const auto config = LoadConfig(
      dir.Write("europe.conf", site + Peer("aws") + "[peer.mars]\npublic_key = " + own_key +
                                   "\n[peer.venus]\npublic_key = " + KeyOf("venus") +
                                   "\nprevious_public_key = " + old_key +
                                   "\nprevious_public_key_until = 2030-01-01T00:00:00Z\n"));
  REQUIRE(config.ok());  // LoadConfig cannot know the site's own keys
  const std::string key_file = (dir.path() / "europe.key").string();
  const std::string old_file = (dir.path() / "old.key").string();
  const std::string advice =
      "' is this site's own key; a peer's key is the output of `relay pubkey` on that site)";

  const Status status = CheckOwnKeys(*config, own.identity(), &old.identity());
  REQUIRE_FALSE(status.ok());
  const std::vector<std::string> lines = Lines(status.message());
  INFO(status.message());
  REQUIRE(lines.size() == 2);
  CHECK(lines[0] == config->path + ": [peer.mars] public_key = '" + own_key +
                        "': same public key as [site] key_file ('" + key_file + advice);
  CHECK(lines[1] == config->path + ": [peer.venus] previous_public_key = '" + old_key +
                        "': same public key as [site] previous_key_file ('" + old_file + advice);

  // Without the previous key file, only the current key counts.
  const Status current_only = CheckOwnKeys(*config, old.identity(), nullptr);
  REQUIRE_FALSE(current_only.ok());
  CHECK(Lines(current_only.message()).size() == 1);
  CHECK(current_only.message().find("[peer.venus] previous_public_key") != std::string::npos);

  // The previous key file holding the current key is a mistake too.
  const Status same = CheckOwnKeys(*config, old.identity(), &old.identity());
  CHECK(same.message().find("[site] previous_key_file = '" + old_file +
                            "': same public key as [site] key_file (previous_key_file is the key "
                            "being replaced: the old key file)") != std::string::npos);

  // Sharing only the box key counts.
  const std::string mixed = MixedKey(KeyOf("venus"), own_key);
  const auto box_only = LoadConfig(
      dir.Write("box.conf", site + Peer("aws") + "[peer.venus]\npublic_key = " + mixed + "\n"));
  REQUIRE(box_only.ok());
  const Status box = CheckOwnKeys(*box_only, own.identity(), nullptr);
  CHECK(box.message() == box_only->path + ": [peer.venus] public_key = '" + mixed +
                             "': same box key as [site] key_file ('" + key_file + advice);

  // Keys nobody else has pass.
  const auto clean = LoadConfig(dir.Write("clean.conf", Valid()));
  REQUIRE(clean.ok());
  CHECK(CheckOwnKeys(*clean, own.identity(), &old.identity()).ok());
}

TEST_CASE("ParseTime and FormatTime: RFC 3339") {
  using namespace std::chrono;
  const auto at = [](const std::string& text) {
    const auto parsed = ParseTime(text);
    INFO(text << ": " << parsed.message());
    REQUIRE(parsed.ok());
    return duration_cast<milliseconds>(parsed->time_since_epoch()).count();
  };
  CHECK(at("1970-01-01T00:00:00Z") == 0);
  CHECK(at("2026-12-31T00:00:00Z") == 1798675200000);
  CHECK(at("2026-12-31t00:00:00z") == 1798675200000);
  CHECK(at("2026-12-31T01:30:00+01:30") == 1798675200000);
  CHECK(at("2026-12-30T23:00:00-01:00") == 1798675200000);
  CHECK(at("2026-12-31T00:00:00-00:00") == 1798675200000);
  CHECK(at("2026-12-31T00:00:00.25Z") == 1798675200250);
  CHECK(at("2026-12-31T00:00:00.123456789Z") == 1798675200123);
  CHECK(at("2028-02-29T12:00:00Z") == 1835438400000);  // a leap year
  CHECK(at("1969-12-31T23:59:59Z") == -1000);
  CHECK(at(" 2026-12-31T00:00:00Z ") == 1798675200000);
  CHECK(FormatTime(*ParseTime("1900-01-01T00:00:00Z")) == "1900-01-01T00:00:00Z");
  CHECK(FormatTime(*ParseTime("2199-12-31T23:59:59.999Z")) == "2199-12-31T23:59:59.999Z");

  const std::vector<std::pair<std::string, std::string>> bad = {
      {"", "the date must be YYYY-MM-DD"},
      {"2026-12-31", "expected 'T' between the date and the time"},
      {"2026-12-31 00:00:00Z", "expected 'T' between the date and the time"},
      {"2026-12-31T00:00:00", "missing the offset from UTC (Z, +hh:mm or -hh:mm)"},
      {"2026-12-31T00:00Z", "the time of day must be hh:mm:ss"},
      {"2026-13-01T00:00:00Z", "there is no such date"},
      {"2027-02-29T00:00:00Z", "there is no such date"},
      {"2026-04-31T00:00:00Z", "there is no such date"},
      {"2026-12-31T24:00:00Z", "there is no such time of day"},
      {"2026-12-31T23:60:00Z", "there is no such time of day"},
      {"2016-12-31T23:59:60Z", "seconds must be 00 to 59 (leap seconds are not accepted)"},
      {"2026-12-31T00:00:00.Z", "expected digits after '.'"},
      {"2026-12-31T00:00:00+0100", "the offset must be Z, +hh:mm or -hh:mm"},
      {"2026-12-31T00:00:00+24:00", "the offset must be Z, +hh:mm or -hh:mm"},
      {"2026-12-31T00:00:00Z tomorrow", "unexpected ' tomorrow' at the end"},
      {"26-12-31T00:00:00Z", "the date must be YYYY-MM-DD"},
      {"next week", "the date must be YYYY-MM-DD"},
      {"1900-01-01T00:00:00+00:01", "the time in UTC must be in the years 1900 to 2199"},
      {"2199-12-31T23:59:59-00:01", "the time in UTC must be in the years 1900 to 2199"},
      {"9999-12-31T23:59:59Z", "the time in UTC must be in the years 1900 to 2199"},
  };
  for (const auto& [text, why] : bad) {
    const auto parsed = ParseTime(text);
    INFO(text);
    REQUIRE_FALSE(parsed.ok());
    CHECK(parsed.message() == "bad time '" + text + "': " + why +
                                  " (expected an RFC 3339 time such as 2026-12-31T00:00:00Z)");
  }

  CHECK(FormatTime(*ParseTime("2026-12-31T01:30:00+01:30")) == "2026-12-31T00:00:00Z");
  CHECK(FormatTime(*ParseTime("2026-12-31T00:00:00.25Z")) == "2026-12-31T00:00:00.250Z");
  CHECK(FormatTime(system_clock::time_point{}) == "1970-01-01T00:00:00Z");
  CHECK(FormatTime(*ParseTime("1969-12-31T23:59:59Z")) == "1969-12-31T23:59:59Z");
  CHECK(FormatTime(*ParseTime("2028-02-29T12:00:00Z")) == "2028-02-29T12:00:00Z");
}

TEST_CASE("ParseEndpoint") {
  const auto check = [](const std::string& text, const std::string& host, std::uint16_t port) {
    const auto parsed = ParseEndpoint(text);
    INFO(text << ": " << parsed.message());
    REQUIRE(parsed.ok());
    CHECK(parsed->host == host);
    CHECK(parsed->port == port);
  };
  check("127.0.0.1:8081", "127.0.0.1", 8081);
  check("localhost:0", "localhost", 0);
  check("relay-1.example.org:65535", "relay-1.example.org", 65535);
  check("[::1]:7400", "::1", 7400);
  check("[fe80::1%eth0]:1", "fe80::1%eth0", 1);

  const std::vector<std::pair<std::string, std::string>> bad = {
      {"", "expected host:port"},
      {"localhost", "missing ':port'"},
      {"localhost:", "missing port after ':'"},
      {":80", "missing host before ':'"},
      {"host:65536", "bad port '65536' (expected 0..65535)"},
      {"host:http", "bad port 'http'"},
      {"host:-1", "bad port '-1'"},
      {"::1:80", "an IPv6 address must be in brackets"},
      {"[::1]80", "expected ':port' after ']'"},
      {"[::1:80", "missing ']'"},
      {"[]:80", "bad IPv6 address ''"},
      {"*:80", "'*' is not allowed here"},
      {"bad host:80", "bad host 'bad host'"},
  };
  for (const auto& [text, why] : bad) {
    const auto parsed = ParseEndpoint(text);
    INFO(text);
    REQUIRE_FALSE(parsed.ok());
    CHECK(parsed.message().rfind("bad endpoint '" + text + "': " + why, 0) == 0);
  }
}

}  // namespace
}  // namespace relay::config
