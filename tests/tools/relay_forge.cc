// relay_forge: builds hostile inputs for the integration tests' attacks on live daemons --
// bundle files whose frames carry events and origin attestations exactly as a spec says,
// acknowledgement and resend files with any position, and single sealed frames or control
// messages -- signed with the key files the test holds (a compromised peer, a transit site
// that alters what it forwards, a peer posing as another site, ...). Test-only: not installed.
//
//   relay_forge bundle --key SENDER.key --to RECIPIENT_IDENTITY --spec SPEC.json --out FILE
//   relay_forge frames --key SENDER.key --to RECIPIENT_IDENTITY --spec SPEC.json --out PREFIX
//   relay_forge ack    --key SENDER.key --to RECIPIENT_IDENTITY --through N --out FILE
//                      [--resend]
//   relay_forge control --key SENDER.key --to RECIPIENT_IDENTITY --type ack|hello|ping
//                      [--through N] --out FILE
//
// SPEC.json:
//   {"frames": [{"first": 1, "last": 2, "flags": 0,
//                "events": [{"seq": 1, "origin": "beta", "origin_seq": 7, "kind": "post",
//                            "channel": "war-room", "author": "mallory", "text": "hi",
//                            "thread": "", "ref": "", "created_at": 0 (now), "hops": [...],
//                            "tamper_text": "changed after signing" (optional)}],
//                "attestations": [{"key": "FILE.key", "origin": "beta",
//                                  "covers": [0, 1] (event indexes; default all)}]}]}
// `hops` defaults to [origin] (plus the sender's name given as "via" when it is not the origin).

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "crypto/bundle.h"
#include "crypto/frame.h"
#include "crypto/identity.h"
#include "crypto/origin.h"
#include "event/event.h"

namespace {

using relay::crypto::PublicIdentity;
using relay::crypto::SiteKey;
using Json = nlohmann::json;

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "relay_forge: %s\n", what.c_str());
  std::exit(2);
}

std::int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::map<std::string, std::string> Args(int argc, char** argv, int from) {
  std::map<std::string, std::string> out;
  for (int i = from; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--", 0) != 0) Die("unexpected argument '" + a + "'");
    if (a == "--resend") {
      out[a] = "1";
      continue;
    }
    if (i + 1 >= argc) Die(a + " needs a value");
    out[a] = argv[++i];
  }
  return out;
}

const std::string& Need(const std::map<std::string, std::string>& args, const std::string& k) {
  auto it = args.find(k);
  if (it == args.end()) Die("missing " + k);
  return it->second;
}

SiteKey LoadKey(const std::string& path) {
  auto key = SiteKey::LoadFile(path);
  if (!key) Die(key.message());
  return std::move(key).value();
}

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) Die("cannot write " + path);
}

relay::EventKind Kind(const std::string& name) {
  relay::EventKind k;
  if (name == "file_chunk") return relay::EventKind::kFileChunk;
  if (!relay::ParseEventKind(name, &k)) Die("unknown kind '" + name + "'");
  return k;
}

// The sealed frames a spec describes.
std::vector<std::string> BuildFrames(const SiteKey& sender, const PublicIdentity& recipient,
                                     const Json& spec) {
  std::vector<std::string> frames;
  for (const Json& f : spec.at("frames")) {
    std::vector<std::string> encoded;
    std::vector<std::string> cores;
    std::vector<relay::FramedEvent> framed;
    for (const Json& e : f.at("events")) {
      relay::Event ev;
      ev.origin_site = e.at("origin").get<std::string>();
      ev.origin_seq = e.at("origin_seq").get<std::uint64_t>();
      ev.id = e.value("id", relay::MakeEventId(ev.origin_site, ev.origin_seq));
      ev.kind = Kind(e.value("kind", std::string("post")));
      ev.channel = e.value("channel", std::string("war-room"));
      ev.author = e.value("author", std::string("mallory"));
      ev.text = e.value("text", std::string());
      ev.thread = e.value("thread", std::string());
      ev.ref = e.value("ref", std::string());
      ev.created_at_ms = e.value("created_at", std::int64_t{0});
      if (ev.created_at_ms == 0) ev.created_at_ms = NowMs();
      if (e.contains("hops")) {
        ev.hops = e.at("hops").get<std::vector<std::string>>();
      } else {
        ev.hops = {ev.origin_site};
      }
      std::string bytes;
      relay::EncodeEvent(ev, &bytes);
      cores.emplace_back(relay::ParseEventEnvelope(bytes)->core);
      if (e.contains("tamper_text")) {
        // The event as a transit site would alter it: signed as it was, sent as it is now.
        ev.text = e.at("tamper_text").get<std::string>();
        bytes.clear();
        relay::EncodeEvent(ev, &bytes);
      }
      encoded.push_back(std::move(bytes));
    }
    for (std::size_t i = 0; i < encoded.size(); ++i)
      framed.push_back({f.at("events")[i].at("seq").get<std::uint64_t>(), encoded[i]});
    std::vector<std::string> attestations;
    for (const Json& a : f.value("attestations", Json::array())) {
      SiteKey key = LoadKey(a.at("key").get<std::string>());
      std::vector<relay::crypto::Digest> digests;
      std::vector<std::size_t> covers;
      if (a.contains("covers")) {
        covers = a.at("covers").get<std::vector<std::size_t>>();
      } else {
        for (std::size_t i = 0; i < cores.size(); ++i) covers.push_back(i);
      }
      for (std::size_t i : covers) digests.push_back(relay::crypto::EventDigest(cores.at(i)));
      if (digests.empty()) Die("an attestation covers no event");
      attestations.push_back(relay::crypto::SealAttestation(key, a.at("origin").get<std::string>(),
                                                            digests.data(), digests.size()));
    }
    const std::string payload =
        relay::EncodeFramePayload(framed, {attestations.begin(), attestations.end()});
    const std::uint64_t first = f.at("first").get<std::uint64_t>();
    const std::uint64_t last = f.at("last").get<std::uint64_t>();
    frames.push_back(relay::crypto::SealFrame(sender, recipient, first, last,
                                              static_cast<std::uint32_t>(framed.size()), payload,
                                              f.value("flags", std::uint8_t{0})));
  }
  return frames;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) Die("usage: relay_forge bundle|frames|ack|control --key K --to ID ...");
  if (!relay::crypto::Init()) Die("libsodium init failed");
  const std::string cmd = argv[1];
  const auto args = Args(argc, argv, 2);
  SiteKey sender = LoadKey(Need(args, "--key"));
  auto to = PublicIdentity::Parse(Need(args, "--to"));
  if (!to) Die("--to: " + to.message());
  const std::string out = Need(args, "--out");
  const std::int64_t now = NowMs();
  if (cmd == "bundle" || cmd == "frames") {
    std::ifstream in(Need(args, "--spec"));
    std::stringstream text;
    text << in.rdbuf();
    Json spec;
    try {
      spec = Json::parse(text.str());
    } catch (const std::exception& e) {
      Die(std::string("--spec: ") + e.what());
    }
    std::vector<std::string> frames;
    try {
      frames = BuildFrames(sender, *to, spec);
    } catch (const std::exception& e) {
      Die(std::string("spec: ") + e.what());
    }
    if (cmd == "bundle") {
      WriteFile(out, relay::crypto::SealBundle(sender, *to, frames, now, now + 86400000));
    } else {
      for (std::size_t i = 0; i < frames.size(); ++i)
        WriteFile(out + "." + std::to_string(i), frames[i]);
    }
  } else if (cmd == "ack") {
    const std::uint64_t through = std::stoull(Need(args, "--through"));
    WriteFile(out,
              args.count("--resend")
                  ? relay::crypto::SealResendRequest(sender, *to, through, {}, now, now + 86400000)
                  : relay::crypto::SealAck(sender, *to, through, now, now + 86400000));
  } else if (cmd == "control") {
    const std::string type = Need(args, "--type");
    relay::crypto::ControlType t = relay::crypto::ControlType::kPing;
    std::string body;
    if (type == "ack") {
      t = relay::crypto::ControlType::kAck;
      std::uint64_t through = std::stoull(Need(args, "--through"));
      for (int i = 7; i >= 0; --i) body.push_back(static_cast<char>((through >> (8 * i)) & 0xff));
    } else if (type == "hello") {
      t = relay::crypto::ControlType::kHello;
    } else if (type != "ping") {
      Die("unknown --type '" + type + "'");
    }
    WriteFile(out, relay::crypto::SealControl(sender, *to, t, now, body));
  } else {
    Die("unknown command '" + cmd + "'");
  }
  return 0;
}
