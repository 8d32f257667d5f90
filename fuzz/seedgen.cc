// Writes the binary seed corpora (event, frame, bundle, diode) under argv[1]/<target>/.
// Deterministic except for the random parts of sealing (ephemeral keys, nonces, bundle ids);
// diode datagrams are deterministic (fixed keys, streams and numbers).
// Run: build-fuzz/fuzz/relay_fuzz_seedgen fuzz/corpus   (the output is checked in).
#include <sys/stat.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "crypto/bundle.h"
#include "crypto/frame.h"
#include "crypto/origin.h"
#include "event/event.h"
#include "fuzz_keys.h"
#include "transports/diode.h"
#include "transports/diode_auth.h"

namespace {
std::string g_root;

void Write(const std::string& target, const std::string& name, const std::string& bytes) {
  const std::string dir = g_root + "/" + target;
  ::mkdir(g_root.c_str(), 0755);
  ::mkdir(dir.c_str(), 0755);
  std::FILE* f = std::fopen((dir + "/" + name).c_str(), "wb");
  if (f == nullptr) std::abort();
  std::fwrite(bytes.data(), 1, bytes.size(), f);
  std::fclose(f);
}

relay::Event MakeEvent(std::uint64_t seq, relay::EventKind kind) {
  relay::Event e;
  e.origin_site = "aws";
  e.origin_seq = seq;
  e.id = relay::MakeEventId(e.origin_site, seq);
  e.kind = kind;
  e.channel = "war-room";
  e.author = "alice";
  e.text = "hello \xe2\x9c\x93 #" + std::to_string(seq);
  e.created_at_ms = 1764000000000 + static_cast<std::int64_t>(seq);
  e.hops = {"aws"};
  if (kind != relay::EventKind::kPost) e.ref = "aws:1";
  if (seq % 2 == 0) e.thread = "aws:1";
  if (seq == 3) e.props = {{"k", "v"}, {"emoji", "thumbsup"}};
  if (seq == 4)
    e.files = {
        relay::Attachment::Inline("plan.pdf", "application/pdf", std::string("%PDF\0\x01", 6))};
  return e;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR\n", argv[0]);
    return 2;
  }
  g_root = argv[1];
  const auto site = relay::fuzz::LoadFixedKey(relay::fuzz::kSiteSecret);
  const auto peer = relay::fuzz::LoadFixedKey(relay::fuzz::kPeerSecret);

  // event: single events of every kind, and frame payloads.
  std::vector<std::string> encoded;
  const relay::EventKind kinds[] = {relay::EventKind::kPost, relay::EventKind::kEdit,
                                    relay::EventKind::kDelete, relay::EventKind::kReactionAdd,
                                    relay::EventKind::kReactionRemove};
  for (std::uint64_t i = 1; i <= 5; ++i) {
    std::string bytes;
    relay::EncodeEvent(MakeEvent(i, kinds[i - 1]), &bytes);
    Write("event", "event-" + std::to_string(i), bytes);
    encoded.push_back(bytes);
  }
  {
    // A post with a blob attachment and one of its chunks (kind 6, 15 fields).
    relay::Event post = MakeEvent(6, relay::EventKind::kPost);
    relay::Attachment blob;
    blob.name = "big.iso";
    blob.mime_type = "application/octet-stream";
    blob.size = 300000;
    blob.blake2b = std::string(32, '\x11');
    blob.blob_id = "0123456789abcdef0123456789abcdef";
    post.files = {blob};
    std::string bytes;
    relay::EncodeEvent(post, &bytes);
    Write("event", "event-blob-post", bytes);
    relay::Event chunk = MakeEvent(7, relay::EventKind::kFileChunk);
    chunk.ref.clear();
    chunk.thread.clear();
    chunk.chunk = {blob.blob_id, 262144, 300000, std::string(64, 'c')};
    bytes.clear();
    relay::EncodeEvent(chunk, &bytes);
    Write("event", "event-chunk", bytes);
  }
  // The origin ("aws", the peer's key) signs its events: one attestation for all of them.
  std::vector<relay::crypto::Digest> digests;
  for (const std::string& e : encoded)
    digests.push_back(relay::crypto::EventDigest(relay::ParseEventEnvelope(e)->core));
  const std::string attestation =
      relay::crypto::SealAttestation(peer, "aws", digests.data(), digests.size());
  Write("frame", "attestation-5", attestation);
  std::vector<relay::FramedEvent> framed;
  for (std::size_t i = 0; i < encoded.size(); ++i) framed.push_back({i + 10, encoded[i]});
  const std::string payload = relay::EncodeFramePayload(framed, {attestation});
  Write("event", "payload-5", payload);
  relay::FramePayloadWriter writer;
  writer.Add(7, encoded[0]);
  writer.Add(8, encoded[3]);
  writer.AddAttestation(attestation);
  const std::string payload2 = writer.Finish();
  Write("event", "payload-writer-2", payload2);

  // frame: frames and control messages peer -> site.
  Write("frame", "frame-5", relay::crypto::SealFrame(peer, site.identity(), 10, 14, 5, payload));
  Write("frame", "frame-2", relay::crypto::SealFrame(peer, site.identity(), 7, 8, 2, payload2));
  Write("frame", "frame-1",
        relay::crypto::SealFrame(peer, site.identity(), 3, 3, 1,
                                 relay::EncodeFramePayload({{3, encoded[2]}}, {attestation})));
  using relay::crypto::ControlType;
  Write("frame", "control-hello",
        relay::crypto::SealControl(peer, site.identity(), ControlType::kHello, 1764000000000, ""));
  Write("frame", "control-ack",
        relay::crypto::SealControl(peer, site.identity(), ControlType::kAck, 1764000000000,
                                   std::string("\0\0\0\0\0\0\0\x0e", 8)));
  Write("frame", "control-ping",
        relay::crypto::SealControl(peer, site.identity(), ControlType::kPing, 1764000000000, ""));

  // bundle: frames, ack and resend request, peer -> site.
  const std::vector<std::string> frames = {
      relay::crypto::SealFrame(peer, site.identity(), 7, 8, 2, payload2),
      relay::crypto::SealFrame(peer, site.identity(), 9, 9, 1,
                               relay::EncodeFramePayload({{9, encoded[1]}}, {attestation}))};
  Write("bundle", "frames-2",
        relay::crypto::SealBundle(peer, site.identity(), frames, 1764000000000, 0));
  Write("bundle", "frames-0",
        relay::crypto::SealBundle(peer, site.identity(), {}, 1764000000000, 1864000000000));
  Write("bundle", "ack",
        relay::crypto::SealAck(peer, site.identity(), 42, 1764000000000, 1864000000000));
  Write("bundle", "resend",
        relay::crypto::SealResendRequest(peer, site.identity(), 5, {{8, 9}, {12, 20}},
                                         1764000000000, 0));

  // diode: a mode byte (0: the real authenticator, 1: the trusting one; see diode_fuzz.cc),
  // then datagram sequences, each datagram prefixed with its 2-byte big-endian length. Sealed
  // by "peer" for "site", so that the real authenticator accepts them.
  const auto diode_key = std::make_shared<relay::transports::DiodeKey>(
      relay::transports::DiodeKey::ForSending(peer, site.identity()).value());
  auto with_lengths = [](const std::vector<std::string>& datagrams) {
    std::string out;
    for (const auto& d : datagrams) {
      out.push_back(static_cast<char>(d.size() >> 8));
      out.push_back(static_cast<char>(d.size() & 0xff));
      out += d;
    }
    return out;
  };
  auto diode_seed = [&](std::uint64_t stream, relay::transports::DiodeParams params,
                        const std::vector<std::string>& msgs, bool heartbeat) {
    relay::transports::DiodeEncoder encoder(stream, params,
                                            relay::transports::DiodeKey::Sealer(diode_key));
    std::vector<std::string> datagrams;
    for (const auto& m : msgs) encoder.Encode(m, &datagrams);
    if (heartbeat) datagrams.push_back(encoder.Heartbeat());
    return datagrams;
  };
  relay::transports::DiodeParams small;
  small.shard_bytes = 64;
  small.data_shards = 4;
  small.parity_shards = 2;
  small.interleave = 2;
  relay::transports::DiodeParams tiny;
  tiny.shard_bytes = 16;
  tiny.data_shards = 2;
  tiny.parity_shards = 1;
  tiny.interleave = 1;
  const std::uint64_t kStream = 0x1122334455667788ULL;
  const auto small1 = diode_seed(kStream, small, {"hello diode"}, true);
  const auto small3 = diode_seed(kStream, small, {encoded[0], encoded[1], payload2}, false);
  const auto tiny2 = diode_seed(kStream, tiny, {"abc", std::string(100, 'x')}, true);
  const auto heartbeat = diode_seed(7, small, {}, true);
  for (const char mode : {'\0', '\1'}) {
    const std::string prefix = mode == 0 ? "real-" : "trusting-";
    Write("diode", prefix + "small-1", std::string(1, mode) + with_lengths(small1));
    Write("diode", prefix + "small-3", std::string(1, mode) + with_lengths(small3));
    Write("diode", prefix + "tiny-2", std::string(1, mode) + with_lengths(tiny2));
    Write("diode", prefix + "heartbeat-only", std::string(1, mode) + with_lengths(heartbeat));
  }
  // Two runs of the sender (streams 7 and kStream), the first replayed after the second, and
  // every datagram of a message twice.
  {
    auto both = heartbeat;
    both.insert(both.end(), small1.begin(), small1.end());
    both.insert(both.end(), heartbeat.begin(), heartbeat.end());
    both.insert(both.end(), small1.begin(), small1.end());
    Write("diode", "real-replays", std::string(1, '\0') + with_lengths(both));
  }

  // config: the INI file, with the fixed peer's public identity.
  const std::string pk = peer.identity().ToString();
  Write(
      "config", "minimal.conf",
      "[site]\nname = europe\nkey_file = europe.key\ndata_dir = data\n\n"
      "[ingest]\nlisten = 127.0.0.1:8081\ntoken_file = ingest.token\n\n[peer.aws]\npublic_key = " +
          pk +
          "\n\n"
          "[channel.war-room]\npeers = aws\nsink = jsonl\njsonl_path = war-room.jsonl\n");
  Write("config", "full.conf",
        "# every section\n[site]\nname = europe\nkey_file = /etc/relay/europe.key\n"
        "previous_key_file = old.key\ndata_dir = /var/lib/relay/europe\ndedup_ttl = 7d\n"
        "transfer_dirs = /media/usb, /srv/relay/outbox\n\n"
        "[ingest]\nlisten = [::1]:8081\ntoken_file = /etc/relay/ingest.token\nmax_body = 16MiB\n"
        "max_text = 64KiB\nallowed_hosts = relay-eu.internal\n\n"
        "[zmq]\nlisten = tcp://0.0.0.0:7400\nheartbeat_interval = 1500ms\n"
        "peer_timeout = 5s\n\n[diode]\nlisten = udp://0.0.0.0:9000\n\n"
        "[peer.aws]\npublic_key = " +
            pk + "\nprevious_public_key = " + site.identity().ToString() +
            "\nprevious_public_key_until = 2026-12-31T00:00:00Z"
            "\nzmq_connect = tcp://aws-relay.internal:7400\nfiles_dir = /media/usb/relay\n"
            "files_auto = true\nfiles_interval = 1m\ndiode_send = udp://10.9.0.2:9000\n"
            "diode_rate = 8MiB\ndiode_data_shards = 16\ndiode_parity_shards = 8\n"
            "diode_interleave = 8\ndiode_retention = 7d\nwindow = 8\nmax_frame_events = 2048\n"
            "max_frame_bytes = 4MiB\n\n"
            "[channel.war-room]\npeers = aws\nsink = mattermost\n"
            "mattermost_channel_id = 4xp9fdt77pncbef59f4k1qe83o\n\n"
            "[channel.ops]\npeers = aws\nsink = webhook\nwebhook_url = "
            "https://hooks.example/T0/B0/x\n\n"
            "[mattermost]\nurl = https://chat.europe.example\ntoken_file = mm.token\n"
            "timeout = 10s\ndisplay_name = {author} ({site})\nmax_file_bytes = 50MiB\n");
  return 0;
}
