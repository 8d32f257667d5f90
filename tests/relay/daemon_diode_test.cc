// Drives a real in-process Daemon listening on a diode, with datagrams made by the test with
// the sender's real keys, and checks what the receiver does with frames that reassemble but
// are not stored: they count as missing (and a later good copy completes them), also across a
// restart of the receiver.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "config/config.h"
#include "crypto/frame.h"
#include "crypto/origin.h"
#include "event/event.h"
#include "relay/daemon.h"
#include "relay/http_server.h"
#include "transports/diode.h"
#include "transports/diode_auth.h"

#include "tests/test_util.h"

using relay::testing::FreePort;
using relay::testing::TempDir;

namespace {

using namespace std::chrono_literals;

relay::Event MakeEvent(std::uint64_t seq) {
  relay::Event e;
  e.origin_site = "europe";
  e.origin_seq = seq;
  e.id = relay::MakeEventId("europe", seq);
  e.channel = "war-room";
  e.author = "alice";
  e.text = "message " + std::to_string(seq);
  e.created_at_ms = 1764129324000;
  e.hops = {"europe"};
  return e;
}

// One event of europe, with europe's origin signature (crypto/origin.h).
std::string Payload(std::uint64_t seq, const relay::crypto::SiteKey& origin) {
  std::string encoded;
  relay::EncodeEvent(MakeEvent(seq), &encoded);
  const relay::crypto::Digest d =
      relay::crypto::EventDigest(relay::ParseEventEnvelope(encoded)->core);
  const std::string attestation = relay::crypto::SealAttestation(origin, "europe", &d, 1);
  return relay::EncodeFramePayload({{seq, encoded}}, {attestation});
}

std::size_t CountLines(const std::string& path) {
  std::ifstream in(path);
  std::size_t n = 0;
  std::string line;
  while (std::getline(in, line)) ++n;
  return n;
}

// One sample from /metrics, e.g. Metric(port, "relay_diode_frames_missing").
long Metric(std::uint16_t port, const std::string& series) {
  relay::HttpClient c("127.0.0.1", port);
  auto r = c.Request("GET", "/metrics");
  REQUIRE(r.ok());
  const std::string needle = "\n" + series + " ";
  auto pos = r->body.find(needle);
  REQUIRE(pos != std::string::npos);
  return std::atol(r->body.c_str() + pos + needle.size());
}

template <typename Pred>
bool WaitFor(Pred pred, std::chrono::milliseconds limit = 10s) {
  auto end = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(20ms);
  }
  return pred();
}

// Sends datagrams to 127.0.0.1:port.
class UdpSender {
 public:
  explicit UdpSender(std::uint16_t port) : fd_(socket(AF_INET, SOCK_DGRAM, 0)) {
    REQUIRE(fd_ >= 0);
    to_.sin_family = AF_INET;
    to_.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    to_.sin_port = htons(port);
  }
  ~UdpSender() { close(fd_); }
  void Send(const std::vector<std::string>& datagrams) {
    for (const auto& d : datagrams) {
      REQUIRE(sendto(fd_, d.data(), d.size(), 0, reinterpret_cast<const sockaddr*>(&to_),
                     sizeof to_) == static_cast<ssize_t>(d.size()));
      std::this_thread::sleep_for(1ms);  // no burst beyond the socket buffer
    }
  }

 private:
  int fd_;
  sockaddr_in to_{};
};

// The datagram with another number, tagged again with `key` (as the sender would number a
// later copy).
std::string Renumber(std::string d, std::uint64_t seq, const relay::transports::DiodeKey& key) {
  const std::uint64_t number = seq;
  for (std::size_t i = 8; i-- > 0; seq >>= 8) d[32 + i] = static_cast<char>(seq & 0xff);
  std::uint64_t stream = 0;  // offsets: docs/wire-format.md, "Diode datagrams"
  for (std::size_t i = 0; i < 8; ++i)
    stream = (stream << 8) | static_cast<unsigned char>(d[24 + i]);
  const std::size_t n = d.size() - 16;
  key.Tag({key.sender_id(), key.recipient_id(), stream, number, std::string_view(d).substr(0, n)},
          reinterpret_cast<std::uint8_t*>(d.data() + n));
  return d;
}

}  // namespace

TEST_CASE("diode receiver: a frame that is not stored stays missing until a good copy comes") {
  REQUIRE(relay::crypto::Init().ok());
  TempDir dir;
  const std::string aws_key = dir.File("aws.key"), eu_key = dir.File("europe.key");
  REQUIRE(relay::crypto::SiteKey::CreateFile(aws_key).ok());
  REQUIRE(relay::crypto::SiteKey::CreateFile(eu_key).ok());
  auto aws = relay::crypto::SiteKey::LoadFile(aws_key);
  auto eu = relay::crypto::SiteKey::LoadFile(eu_key);
  REQUIRE(aws.ok());
  REQUIRE(eu.ok());
  const relay::crypto::SiteKey stranger = relay::crypto::SiteKey::Generate();

  const std::uint16_t ingest = FreePort(), diode = FreePort();
  const std::string conf = dir.File("aws.conf"), sink = dir.File("war-room.jsonl");
  std::ofstream(conf) << "[site]\nname = aws\nkey_file = aws.key\ndata_dir = data\n"
                      << "[ingest]\nlisten = 127.0.0.1:" << ingest << "\nallow_anonymous = true\n"
                      << "[diode]\nlisten = udp://127.0.0.1:" << diode << "\n"
                      << "[peer.europe]\npublic_key = " << eu->identity().ToString() << "\n"
                      << "[channel.war-room]\npeers = europe\nsink = jsonl\n"
                      << "jsonl_path = war-room.jsonl\n";
  auto start = [&] {
    auto cfg = relay::config::LoadConfig(conf);
    REQUIRE(cfg.ok());
    auto d = std::make_unique<relay::Daemon>(std::move(cfg).value());
    REQUIRE(d->Start().ok());
    return d;
  };
  auto daemon = start();

  auto key = std::make_shared<relay::transports::DiodeKey>(
      relay::transports::DiodeKey::ForSending(*eu, aws->identity()).value());
  relay::transports::DiodeEncoder enc(1000, relay::transports::DiodeParams{},
                                      relay::transports::DiodeKey::Sealer(key));
  UdpSender udp(diode);
  std::vector<std::string> sent;  // everything, for the replays below
  std::uint64_t seq_offset = 0;   // added to enc's numbers once a copy took some (below)
  auto renumber = [&](std::vector<std::string>* datagrams) {
    if (seq_offset == 0) return;
    for (auto& d : *datagrams) {
      std::uint64_t seq = 0;
      for (std::size_t i = 0; i < 8; ++i) seq = (seq << 8) | static_cast<unsigned char>(d[32 + i]);
      d = Renumber(d, seq + seq_offset, *key);
    }
  };
  auto send = [&](const std::string& message) {
    std::vector<std::string> datagrams;
    enc.Encode(message, &datagrams);
    renumber(&datagrams);
    udp.Send(datagrams);
    sent.insert(sent.end(), datagrams.begin(), datagrams.end());
    return datagrams;
  };
  auto missing = [&] { return Metric(ingest, "relay_diode_frames_missing"); };

  // Message 1: a good frame, stored and delivered.
  send(relay::crypto::SealFrame(*eu, aws->identity(), 1, 1, 1, Payload(1, *eu)));
  REQUIRE(WaitFor([&] { return CountLines(sink) == 1; }));
  // Message 2: authentic datagrams, but the frame inside does not verify (it is signed by a
  // site that is not a peer): not stored, so counted missing.
  const auto bad =
      send(relay::crypto::SealFrame(stranger, aws->identity(), 2, 2, 1, Payload(2, *eu)));
  // Message 3: not even a frame.
  send("not a frame at all");
  REQUIRE(WaitFor([&] { return missing() == 2; }));
  // Shards of a message that arrive after it was reopened may reassemble it again: each time
  // the frame is verified (and refused) again, and counted.
  CHECK(Metric(ingest, "relay_diode_frames_not_stored_total") >= 2);
  CHECK(Metric(ingest, "relay_frames_rejected_total{reason=\"unknown_sender\"}") >= 1);
  CHECK(Metric(ingest, "relay_frames_rejected_total{reason=\"bad_magic\"}") >= 1);
  CHECK(CountLines(sink) == 1);

  // A good copy of message 2 (the same id, later datagram numbers) completes it.
  {
    relay::transports::DiodeEncoder copy(1000, relay::transports::DiodeParams{},
                                         relay::transports::DiodeKey::Sealer(key));
    std::vector<std::string> ignored, good;
    copy.Encode("message 1 of the copy, not sent", &ignored);
    copy.Encode(relay::crypto::SealFrame(*eu, aws->identity(), 2, 2, 1, Payload(2, *eu)), &good);
    std::uint64_t seq = 5000;
    for (auto& d : good) d = Renumber(d, ++seq, *key);
    udp.Send(good);
    seq_offset = seq;  // the sender's later datagrams come after these
  }
  REQUIRE(WaitFor([&] { return CountLines(sink) == 2; }));
  REQUIRE(WaitFor([&] { return missing() == 1; }));  // message 3 only

  // Forged and replayed datagrams change nothing.
  std::vector<std::string> forged = bad;
  for (auto& d : forged) d[d.size() - 1] ^= 1;
  udp.Send(forged);
  udp.Send(sent);
  REQUIRE(WaitFor([&] {
    return Metric(ingest, "relay_diode_datagrams_rejected_total{reason=\"bad_tag\"}") ==
               static_cast<long>(forged.size()) &&
           Metric(ingest, "relay_diode_datagrams_rejected_total{reason=\"replay\"}") ==
               static_cast<long>(sent.size());
  }));
  std::this_thread::sleep_for(1200ms);
  CHECK(missing() == 1);
  CHECK(CountLines(sink) == 2);

  // After a restart of the receiver, the record of the stream keeps the count, replays stay
  // refused, and the stream goes on.
  daemon->Stop();
  daemon.reset();  // releases the store
  daemon = start();
  REQUIRE(WaitFor([&] { return missing() == 1; }));
  const auto replayed = static_cast<long>(sent.size());
  udp.Send(sent);
  std::vector<std::string> hb = {enc.Heartbeat()};
  renumber(&hb);
  udp.Send(hb);
  send(relay::crypto::SealFrame(*eu, aws->identity(), 3, 3, 1, Payload(3, *eu)));
  REQUIRE(WaitFor([&] { return CountLines(sink) == 3; }));
  REQUIRE(WaitFor([&] {
    return Metric(ingest, "relay_diode_datagrams_rejected_total{reason=\"replay\"}") == replayed;
  }));
  std::this_thread::sleep_for(1200ms);
  CHECK(missing() == 1);
  CHECK(CountLines(sink) == 3);
  daemon->Stop();
}
