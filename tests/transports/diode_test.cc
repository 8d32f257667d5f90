#include <sodium.h>

#include <algorithm>
#include <array>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "crypto/identity.h"
#include "transports/diode.h"
#include "transports/diode_auth.h"

namespace {

using relay::crypto::SiteKey;
using relay::transports::DiodeAuthVerdict;
using relay::transports::DiodeDecoder;
using relay::transports::DiodeDecoderLimits;
using relay::transports::DiodeEncoder;
using relay::transports::DiodeKey;
using relay::transports::DiodeKeyring;
using relay::transports::DiodeParams;
using relay::transports::DiodeReject;
using relay::transports::DiodeSiteId;
using relay::transports::DiodeTagInput;
using relay::transports::kDiodeReplayWindow;

constexpr std::uint64_t kStream = 0x0123456789abcdefULL;
constexpr std::uint32_t kEurope = 0;  // sender indices in the enclave's keyring
constexpr std::uint32_t kAws = 1;

// Three sites with real keys: europe and aws send to enclave over the diode; rogue is nobody's
// peer. The enclave's keyring knows europe (sender 0) and aws (sender 1).
struct Sites {
  SiteKey europe = SiteKey::Generate();
  SiteKey aws = SiteKey::Generate();
  SiteKey enclave = SiteKey::Generate();
  SiteKey rogue = SiteKey::Generate();
  std::shared_ptr<const DiodeKey> europe_key, aws_key;
  DiodeKeyring ring;

  Sites() {
    europe_key =
        std::make_shared<DiodeKey>(DiodeKey::ForSending(europe, enclave.identity()).value());
    aws_key = std::make_shared<DiodeKey>(DiodeKey::ForSending(aws, enclave.identity()).value());
    REQUIRE(ring.Add(kEurope, enclave, europe.identity()).ok());
    REQUIRE(ring.Add(kAws, enclave, aws.identity()).ok());
  }
};

const Sites& S() {
  static const Sites* sites = [] {
    REQUIRE(relay::crypto::Init().ok());
    return new Sites();
  }();
  return *sites;
}

// An encoder at europe (or aws) for the enclave.
DiodeEncoder Encoder(std::uint64_t stream = kStream, DiodeParams params = {},
                     std::uint32_t sender = kEurope) {
  return DiodeEncoder(stream, params,
                      DiodeKey::Sealer(sender == kEurope ? S().europe_key : S().aws_key));
}
// The enclave's decoder.
DiodeDecoder Decoder(DiodeDecoderLimits limits = {}) {
  return DiodeDecoder(S().ring.Authenticator(), limits);
}
DiodeDecoderLimits Pending(std::size_t max_pending_bytes) {
  DiodeDecoderLimits limits;
  limits.max_pending_bytes = max_pending_bytes;
  return limits;
}

std::string RandomBytes(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::string out(n, '\0');
  for (char& c : out) c = static_cast<char>(rng() & 0xff);
  return out;
}

std::uint64_t GetBE(const std::string& d, std::size_t offset, std::size_t bytes) {
  std::uint64_t v = 0;
  for (std::size_t i = 0; i < bytes; ++i) v = (v << 8) | static_cast<unsigned char>(d[offset + i]);
  return v;
}
void SetBE(std::string* d, std::size_t offset, std::size_t bytes, std::uint64_t v) {
  for (std::size_t i = bytes; i-- > 0;) {
    (*d)[offset + i] = static_cast<char>(v & 0xff);
    v >>= 8;
  }
}

// Header fields, read at the documented offsets.
std::uint64_t StreamId(const std::string& d) { return GetBE(d, 24, 8); }
std::uint64_t Seq(const std::string& d) { return GetBE(d, 32, 8); }
std::uint64_t MessageId(const std::string& d) { return GetBE(d, 40, 8); }
std::uint32_t BlockIndex(const std::string& d) {
  return static_cast<std::uint32_t>(GetBE(d, 52, 4));
}
int K(const std::string& d) { return static_cast<int>(GetBE(d, 60, 2)); }
int M(const std::string& d) { return static_cast<int>(GetBE(d, 62, 2)); }
int ShardIndex(const std::string& d) { return static_cast<int>(GetBE(d, 64, 2)); }

// Tags `d` again with `key` (by default europe's), as its sender would after changing a field:
// tests use it to make datagrams that are authentic but wrong in some other way.
std::string Retag(std::string d, const DiodeKey* key = nullptr) {
  if (key == nullptr) key = S().europe_key.get();
  const std::size_t n = d.size() - 16;
  DiodeTagInput in{GetBE(d, 8, 8), GetBE(d, 16, 8), StreamId(d), Seq(d),
                   std::string_view(d).substr(0, n)};
  key->Tag(in, reinterpret_cast<std::uint8_t*>(d.data() + n));
  return d;
}
// `d` as `key`'s sender would seal it: its site ids in the header, and its tag.
std::string RetagAs(std::string d, const DiodeKey& key) {
  SetBE(&d, 8, 8, key.sender_id());
  SetBE(&d, 16, 8, key.recipient_id());
  return Retag(std::move(d), &key);
}
// `d` with another field value, tagged again.
std::string With(const std::string& d, std::size_t offset, std::size_t bytes, std::uint64_t v) {
  std::string out = d;
  SetBE(&out, offset, bytes, v);
  return Retag(out);
}

std::vector<DiodeDecoder::Message> FeedAll(DiodeDecoder& decoder,
                                           const std::vector<std::string>& datagrams) {
  std::vector<DiodeDecoder::Message> out;
  for (const auto& d : datagrams) {
    const auto st = decoder.Feed(d, &out);
    INFO(st.message());
    REQUIRE(st.ok());
  }
  return out;
}

DiodeDecoder::StreamState StateOf(const DiodeDecoder& decoder, std::uint64_t stream,
                                  std::uint32_t sender = kEurope) {
  for (const auto& s : decoder.Streams()) {
    if (s.stream_id == stream && s.sender == sender) return s;
  }
  FAIL("no such stream");
  return {};
}

std::uint64_t Rejected(const DiodeDecoder& decoder) {
  std::uint64_t total = 0;
  for (std::size_t r = 0; r < static_cast<std::size_t>(DiodeReject::kCount); ++r) {
    total += decoder.rejected(static_cast<DiodeReject>(r));
  }
  return total;
}

// What a decoder holds, to check that refused datagrams change none of it.
struct Snapshot {
  std::vector<std::tuple<std::uint32_t, std::uint64_t, std::uint64_t, std::uint64_t, std::uint64_t>>
      streams;
  std::size_t pending = 0;
  std::uint64_t missing = 0, dropped = 0, recovered = 0;
  bool operator==(const Snapshot&) const = default;
};
Snapshot Snap(const DiodeDecoder& decoder) {
  Snapshot s;
  for (const auto& st : decoder.Streams()) {
    s.streams.emplace_back(st.sender, st.stream_id, st.announced, st.completed,
                           st.forgotten_missing);
  }
  s.pending = decoder.pending_bytes();
  s.missing = decoder.MissingCount();
  s.dropped = decoder.streams_dropped();
  s.recovered = decoder.recovered_shards();
  return s;
}

TEST_CASE("diode: datagram and heartbeat bytes follow the documented layout") {
  DiodeEncoder enc = Encoder();
  std::vector<std::string> out;
  REQUIRE(enc.Encode(RandomBytes(1201, 1), &out) == 1);
  // 1201 bytes = 2 data shards of 1200 (the second zero-padded) + 4 parity.
  REQUIRE(out.size() == 6);
  const std::string& d = out[0];
  REQUIRE(d.size() == 68 + 1200 + 16);
  CHECK(d.substr(0, 4) == "RLYD");
  CHECK(GetBE(d, 4, 1) == 2);
  CHECK(GetBE(d, 5, 1) == 1);
  CHECK(GetBE(d, 6, 2) == 0);
  CHECK(GetBE(d, 8, 8) == DiodeSiteId(S().europe.identity().sign_pk));
  CHECK(GetBE(d, 16, 8) == DiodeSiteId(S().enclave.identity().sign_pk));
  CHECK(StreamId(d) == kStream);
  CHECK(MessageId(d) == 1);
  CHECK(GetBE(d, 48, 4) == 1201);
  CHECK(BlockIndex(d) == 0);
  CHECK(GetBE(d, 56, 4) == 1);
  CHECK(K(d) == 2);
  CHECK(M(d) == 4);
  CHECK(GetBE(d, 66, 2) == 1200);
  for (std::size_t i = 0; i < out.size(); ++i) {
    CHECK(ShardIndex(out[i]) == static_cast<int>(i));
    CHECK(Seq(out[i]) == i + 1);  // every datagram numbered, from 1
  }
  // The first shard is the message's first 1200 bytes verbatim (systematic code).
  CHECK(d.substr(68, 1200) == RandomBytes(1201, 1).substr(0, 1200));
  // The site id is the first 8 bytes of sign_pk: the identity's fingerprint.
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(GetBE(d, 8, 8)));
  CHECK(std::string(hex) == S().europe.identity().Fingerprint());

  // The tag: XChaCha20-Poly1305 sealing nothing, the rest as associated data, the nonce
  // stream_id || 0^8 || seq (docs/wire-format.md), recomputed here with libsodium directly.
  {
    std::array<std::uint8_t, 32> shared{};
    REQUIRE(S().europe.SharedSecret(S().enclave.identity().box_pk, &shared));
    const std::string label = "relay-diode-v2";
    crypto_generichash_state st;
    unsigned char key[32];
    crypto_generichash_init(&st, nullptr, 0, sizeof key);
    crypto_generichash_update(&st, reinterpret_cast<const unsigned char*>(label.data()),
                              label.size());
    crypto_generichash_update(&st, shared.data(), shared.size());
    crypto_generichash_update(&st, S().europe.identity().sign_pk.data(), 32);
    crypto_generichash_update(&st, S().enclave.identity().sign_pk.data(), 32);
    crypto_generichash_final(&st, key, sizeof key);
    unsigned char nonce[24] = {};
    for (int i = 0; i < 8; ++i) {
      nonce[i] = static_cast<unsigned char>(kStream >> (56 - 8 * i));
      nonce[16 + i] = static_cast<unsigned char>(std::uint64_t{1} >> (56 - 8 * i));
    }
    unsigned char tag[16], nothing[1] = {0};
    crypto_aead_xchacha20poly1305_ietf_encrypt_detached(
        nothing, tag, nullptr, nothing, 0, reinterpret_cast<const unsigned char*>(d.data()),
        d.size() - 16, nullptr, nonce, key);
    CHECK(d.substr(d.size() - 16) == std::string(reinterpret_cast<const char*>(tag), 16));
  }

  // A message shorter than a shard uses a shard of its own length; the empty one, 1 byte.
  out.clear();
  REQUIRE(enc.Encode("hello", &out) == 2);
  REQUIRE(out.size() == 5);
  for (const auto& x : out) CHECK(x.size() == 68 + 5 + 16);
  out.clear();
  REQUIRE(enc.Encode("", &out) == 3);
  REQUIRE(out.size() == 5);
  for (const auto& x : out) CHECK(x.size() == 68 + 1 + 16);
  CHECK(Seq(out.back()) == 16);

  const std::string hb = enc.Heartbeat();
  REQUIRE(hb.size() == 72);
  CHECK(hb.substr(0, 4) == "RLYD");
  CHECK(GetBE(hb, 4, 1) == 2);
  CHECK(GetBE(hb, 5, 1) == 2);
  CHECK(GetBE(hb, 6, 2) == 0);
  CHECK(StreamId(hb) == kStream);
  CHECK(Seq(hb) == 17);  // heartbeats are numbered with the data datagrams
  CHECK(GetBE(hb, 40, 8) == 3);
  CHECK(GetBE(hb, 48, 8) == 6 + 5 + 5);
  CHECK(enc.last_message_id() == 3);
  CHECK(enc.stream_id() == kStream);
}

TEST_CASE("diode: both ends derive the same key; each direction and pair has its own") {
  const Sites& s = S();
  // europe -> enclave, computed at europe and at the enclave.
  auto at_europe = DiodeKey::ForSending(s.europe, s.enclave.identity());
  auto at_enclave = DiodeKey::ForReceiving(s.enclave, s.europe.identity());
  REQUIRE(at_europe.ok());
  REQUIRE(at_enclave.ok());
  CHECK(at_europe->sender_id() == at_enclave->sender_id());
  CHECK(at_europe->recipient_id() == at_enclave->recipient_id());
  const std::string body = "a datagram's signed part";
  const DiodeTagInput in{at_europe->sender_id(), at_europe->recipient_id(), 7, 9, body};
  std::uint8_t tag[16];
  at_europe->Tag(in, tag);
  const std::string t(reinterpret_cast<const char*>(tag), 16);
  CHECK(at_enclave->Verify(in, t));
  // The nonce is part of it: another stream or number, another tag.
  CHECK_FALSE(at_enclave->Verify({in.sender_id, in.recipient_id, 8, 9, body}, t));
  CHECK_FALSE(at_enclave->Verify({in.sender_id, in.recipient_id, 7, 10, body}, t));
  CHECK_FALSE(at_enclave->Verify(in, t.substr(0, 15)));
  // enclave -> europe (the same X25519 secret) is another key.
  auto back = DiodeKey::ForSending(s.enclave, s.europe.identity());
  REQUIRE(back.ok());
  std::uint8_t back_tag[16];
  back->Tag(in, back_tag);
  CHECK(std::memcmp(tag, back_tag, 16) != 0);
  // So is europe -> aws.
  auto other = DiodeKey::ForSending(s.europe, s.aws.identity());
  REQUIRE(other.ok());
  std::uint8_t other_tag[16];
  other->Tag(in, other_tag);
  CHECK(std::memcmp(tag, other_tag, 16) != 0);
  // A low-order box key (all zero) gives no key, naming the peer.
  relay::crypto::PublicIdentity bad = s.europe.identity();
  bad.box_pk.fill(0);
  auto refused = DiodeKey::ForReceiving(s.enclave, bad);
  REQUIRE_FALSE(refused.ok());
  CHECK_THAT(refused.message(), Catch::Contains(bad.Fingerprint()));
  CHECK_THAT(refused.message(), Catch::Contains("low-order"));
}

TEST_CASE("diode: messages of many sizes round-trip") {
  const std::vector<std::size_t> sizes = {0, 1, 1199, 1200, 1201, 100 * 1024, 3 * 1024 * 1024};
  DiodeEncoder enc = Encoder();
  std::vector<std::string> datagrams;
  std::vector<std::size_t> counts;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    const std::size_t before = datagrams.size();
    REQUIRE(enc.Encode(RandomBytes(sizes[i], static_cast<std::uint32_t>(i)), &datagrams) == i + 1);
    counts.push_back(datagrams.size() - before);
  }
  // 100 KiB: 5 full blocks + a last block of 6 shards; 3 MiB: 163 full blocks + one of 14.
  CHECK(counts == std::vector<std::size_t>{5, 5, 5, 5, 6, 5 * 20 + 6 + 4, 163 * 20 + 14 + 4});

  DiodeDecoder dec = Decoder();
  const auto messages = FeedAll(dec, datagrams);
  REQUIRE(messages.size() == sizes.size());
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    CHECK(messages[i].stream_id == kStream);
    CHECK(messages[i].message_id == i + 1);
    CHECK(messages[i].bytes == RandomBytes(sizes[i], static_cast<std::uint32_t>(i)));
  }
  const auto state = StateOf(dec, kStream);
  CHECK(state.announced == sizes.size());
  CHECK(state.completed == sizes.size());
  CHECK(state.recovered_shards == 0);
  CHECK(dec.Incomplete(kEurope, kStream).empty());
  CHECK(dec.pending_bytes() == 0);
}

TEST_CASE("diode: any m lost shards per block are recovered") {
  const std::vector<std::size_t> sizes = {0, 1, 1201, 100 * 1024, 3 * 1024 * 1024};
  // Which m shards of block b (k data, m parity) are dropped.
  using Pattern = std::function<std::set<int>(std::uint32_t b, int k, int m)>;
  std::mt19937 rng(7);
  const std::vector<std::pair<const char*, Pattern>> patterns = {
      {"first shards (data)",
       [](std::uint32_t, int, int m) {
         std::set<int> s;
         for (int j = 0; j < m; ++j) s.insert(j);
         return s;
       }},
      {"all parity",
       [](std::uint32_t, int k, int m) {
         std::set<int> s;
         for (int j = 0; j < m; ++j) s.insert(k + j);
         return s;
       }},
      {"rotating window",
       [](std::uint32_t b, int k, int m) {
         std::set<int> s;
         for (int j = 0; j < m; ++j)
           s.insert(
               static_cast<int>((b * 7 + static_cast<unsigned>(j)) % static_cast<unsigned>(k + m)));
         return s;
       }},
      {"random positions",
       [&rng](std::uint32_t, int k, int m) {
         std::vector<int> all(static_cast<std::size_t>(k + m));
         for (int i = 0; i < k + m; ++i) all[static_cast<std::size_t>(i)] = i;
         std::shuffle(all.begin(), all.end(), rng);
         return std::set<int>(all.begin(), all.begin() + m);
       }},
  };
  for (const auto& [name, pattern] : patterns) {
    SECTION(name) {
      DiodeEncoder enc = Encoder();
      DiodeDecoder dec = Decoder();
      std::vector<std::string> datagrams;
      for (std::size_t i = 0; i < sizes.size(); ++i) {
        enc.Encode(RandomBytes(sizes[i], static_cast<std::uint32_t>(i)), &datagrams);
      }
      // Decide per (message, block) once, then filter.
      std::map<std::pair<std::uint64_t, std::uint32_t>, std::set<int>> drops;
      std::vector<std::string> kept;
      std::uint64_t dropped = 0, dropped_data = 0;
      for (const auto& d : datagrams) {
        const auto key = std::make_pair(MessageId(d), BlockIndex(d));
        auto it = drops.find(key);
        if (it == drops.end()) it = drops.emplace(key, pattern(key.second, K(d), M(d))).first;
        REQUIRE(it->second.size() == static_cast<std::size_t>(M(d)));
        if (it->second.count(ShardIndex(d)) != 0) {
          ++dropped;
          if (ShardIndex(d) < K(d)) ++dropped_data;
        } else {
          kept.push_back(d);
        }
      }
      CHECK(dropped == 4 * drops.size());
      const auto messages = FeedAll(dec, kept);
      REQUIRE(messages.size() == sizes.size());
      for (std::size_t i = 0; i < sizes.size(); ++i) {
        CHECK(messages[i].message_id == i + 1);
        CHECK(messages[i].bytes == RandomBytes(sizes[i], static_cast<std::uint32_t>(i)));
      }
      CHECK(StateOf(dec, kStream).recovered_shards == dropped_data);
      CHECK(dec.Incomplete(kEurope, kStream).empty());
      CHECK(dec.pending_bytes() == 0);
    }
  }
}

TEST_CASE("diode: extreme parameters (k + m = 255, k = m = 1) recover m losses") {
  const std::vector<DiodeParams> all = {DiodeParams{7, 200, 55, 3}, DiodeParams{9000, 1, 1, 2},
                                        DiodeParams{16, 3, 1, 1}};
  std::mt19937 rng(11);
  for (const auto& params : all) {
    INFO("k " << params.data_shards << " m " << params.parity_shards);
    DiodeEncoder enc = Encoder(kStream, params);
    DiodeDecoder dec = Decoder();
    std::vector<std::string> datagrams;
    const std::vector<std::size_t> sizes = {3, 50000, 20000};
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      enc.Encode(RandomBytes(sizes[i], static_cast<std::uint32_t>(i)), &datagrams);
    }
    // Drop m random shards of every block.
    std::map<std::pair<std::uint64_t, std::uint32_t>, std::set<int>> drops;
    std::vector<std::string> kept;
    for (const auto& d : datagrams) {
      const auto key = std::make_pair(MessageId(d), BlockIndex(d));
      auto it = drops.find(key);
      if (it == drops.end()) {
        std::vector<int> order(static_cast<std::size_t>(K(d) + M(d)));
        for (std::size_t j = 0; j < order.size(); ++j) order[j] = static_cast<int>(j);
        std::shuffle(order.begin(), order.end(), rng);
        it = drops.emplace(key, std::set<int>(order.begin(), order.begin() + M(d))).first;
      }
      if (it->second.count(ShardIndex(d)) == 0) kept.push_back(d);
    }
    CHECK(kept.size() < datagrams.size());
    const auto messages = FeedAll(dec, kept);
    REQUIRE(messages.size() == sizes.size());
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      CHECK(messages[i].bytes == RandomBytes(sizes[i], static_cast<std::uint32_t>(i)));
    }
    CHECK(StateOf(dec, kStream).recovered_shards > 0);
  }
}

TEST_CASE("diode: more than m lost shards in one block lose the message") {
  DiodeEncoder enc = Encoder();
  std::vector<std::string> datagrams;
  enc.Encode(RandomBytes(5000, 1), &datagrams);
  enc.Encode(RandomBytes(100 * 1024, 2), &datagrams);  // 6 blocks
  enc.Encode(RandomBytes(5000, 3), &datagrams);
  std::vector<std::string> kept;
  for (const auto& d : datagrams) {
    // m + 1 = 5 shards of block 2 of message 2: three data, two parity.
    const bool drop = MessageId(d) == 2 && BlockIndex(d) == 2 &&
                      (ShardIndex(d) < 3 || ShardIndex(d) == 16 || ShardIndex(d) == 19);
    if (!drop) kept.push_back(d);
  }
  REQUIRE(kept.size() == datagrams.size() - 5);
  DiodeDecoder dec = Decoder();
  const auto messages = FeedAll(dec, kept);
  REQUIRE(messages.size() == 2);
  CHECK(messages[0].message_id == 1);
  CHECK(messages[1].message_id == 3);
  CHECK(dec.Incomplete(kEurope, kStream) == std::vector<std::uint64_t>{2});
  const auto state = StateOf(dec, kStream);
  CHECK(state.announced == 3);
  CHECK(state.completed == 2);
  CHECK(dec.pending_bytes() > 0);  // the other blocks of message 2 wait for the lost one
}

// Sends every datagram through a channel that loses each with probability `loss`.
std::vector<std::string> Lossy(const std::vector<std::string>& in, double loss, std::mt19937& rng) {
  std::bernoulli_distribution lost(loss);
  std::vector<std::string> out;
  for (const auto& d : in) {
    if (!lost(rng)) out.push_back(d);
  }
  return out;
}

TEST_CASE("diode: 5% random loss over 2000 messages of 1 KiB with default parameters") {
  DiodeEncoder enc = Encoder();
  DiodeDecoder dec = Decoder();
  std::mt19937 rng(20240601);
  std::size_t sent = 0, received = 0;
  std::vector<DiodeDecoder::Message> messages;
  for (std::uint32_t i = 0; i < 2000; ++i) {
    std::vector<std::string> datagrams;
    enc.Encode(RandomBytes(1024, i), &datagrams);
    const auto kept = Lossy(datagrams, 0.05, rng);
    sent += datagrams.size();
    received += kept.size();
    for (const auto& d : kept) REQUIRE(dec.Feed(d, &messages).ok());
  }
  // 1 KiB is one data shard + 4 parity; the message is lost only if all 5 are (p = 0.05^5).
  CHECK(received < sent);
  CHECK(messages.size() == 2000);
  CHECK(StateOf(dec, kStream).recovered_shards > 50);  // about 5% of data shards were rebuilt
  CHECK(dec.Incomplete(kEurope, kStream).empty());
  for (std::size_t i = 0; i < messages.size(); ++i) {
    CHECK(messages[i].bytes ==
          RandomBytes(1024, static_cast<std::uint32_t>(messages[i].message_id - 1)));
  }
}

TEST_CASE("diode: per-block failure rate at 5% loss matches the binomial tail") {
  // Full blocks of k = 16, m = 4 (small shards keep the test fast; the code does not care).
  DiodeParams params;
  params.shard_bytes = 32;
  DiodeEncoder enc = Encoder(kStream, params);
  DiodeDecoder dec = Decoder();
  std::mt19937 rng(99);
  const int blocks = 20000;
  std::vector<DiodeDecoder::Message> messages;
  for (int i = 0; i < blocks; ++i) {
    std::vector<std::string> datagrams;
    enc.Encode(RandomBytes(16 * 32, static_cast<std::uint32_t>(i)), &datagrams);
    REQUIRE(datagrams.size() == 20);
    for (const auto& d : Lossy(datagrams, 0.05, rng)) REQUIRE(dec.Feed(d, &messages).ok());
  }
  const double measured = 1.0 - static_cast<double>(messages.size()) / blocks;
  // P(more than 4 of 20 lost) = 1 - sum_{i<=4} C(20,i) 0.05^i 0.95^(20-i) = 0.00257.
  double expected = 0;
  for (int i = 0; i <= 4; ++i) {
    double c = 1;
    for (int j = 0; j < i; ++j) c = c * (20 - j) / (j + 1);
    expected += c * std::pow(0.05, i) * std::pow(0.95, 20 - i);
  }
  expected = 1 - expected;
  INFO("per-block failure at 5% loss (k=16, m=4): measured " << measured << " over " << blocks
                                                             << " blocks, binomial " << expected);
  CHECK(expected == Approx(0.00257).epsilon(0.01));
  CHECK(measured > expected * 0.6);
  CHECK(measured < expected * 1.6);
  CHECK(dec.Incomplete(kEurope, kStream).size() == blocks - messages.size());
}

TEST_CASE("diode: interleaving spreads a burst over blocks") {
  // 8 full blocks, interleaved 8 deep: any burst of 8 * (m - 1) + 1 = 25 consecutive losses
  // hits each block at most m = 4 times.
  const std::string message = RandomBytes(8 * 16 * 1200, 5);
  DiodeEncoder enc = Encoder();
  std::vector<std::string> datagrams;
  enc.Encode(message, &datagrams);
  REQUIRE(datagrams.size() == 160);
  // Consecutive datagrams belong to different blocks.
  for (std::size_t i = 0; i + 1 < datagrams.size(); ++i) {
    CHECK(BlockIndex(datagrams[i]) != BlockIndex(datagrams[i + 1]));
  }
  for (std::size_t start = 0; start + 25 <= datagrams.size(); ++start) {
    std::vector<std::string> kept(datagrams.begin(), datagrams.begin() + static_cast<long>(start));
    kept.insert(kept.end(), datagrams.begin() + static_cast<long>(start + 25), datagrams.end());
    DiodeDecoder dec = Decoder();
    const auto messages = FeedAll(dec, kept);
    REQUIRE(messages.size() == 1);
    REQUIRE(messages[0].bytes == message);
  }
  // Without interleaving, a burst of m + 1 inside one block loses the message.
  DiodeParams flat;
  flat.interleave = 1;
  DiodeEncoder flat_enc = Encoder(kStream, flat);
  datagrams.clear();
  flat_enc.Encode(message, &datagrams);
  std::vector<std::string> kept(datagrams.begin(), datagrams.begin() + 20);
  kept.insert(kept.end(), datagrams.begin() + 25, datagrams.end());
  DiodeDecoder dec = Decoder();
  CHECK(FeedAll(dec, kept).empty());
  CHECK(dec.Incomplete(kEurope, kStream) == std::vector<std::uint64_t>{1});
}

TEST_CASE("diode: reordering and duplication deliver each message exactly once") {
  // Two senders (europe and aws), interleaved.
  DiodeEncoder enc = Encoder();
  DiodeEncoder other = Encoder(kStream + 1, DiodeParams{}, kAws);
  std::vector<std::string> datagrams;
  using Id = std::tuple<std::uint32_t, std::uint64_t, std::uint64_t>;
  std::map<Id, std::string> sent;
  for (std::uint32_t i = 0; i < 300; ++i) {
    const std::string m = RandomBytes(i % 7 == 0 ? 40000 : i * 13, i);
    const auto id = enc.Encode(m, &datagrams);
    sent[{kEurope, kStream, id}] = m;
    const std::string n = RandomBytes(i * 3, i + 1000);
    sent[{kAws, kStream + 1, other.Encode(n, &datagrams)}] = n;
  }
  // Every datagram twice, the copy right after or much later; then shuffled within windows of 64.
  std::vector<std::string> channel;
  for (const auto& d : datagrams) {
    channel.push_back(d);
    channel.push_back(d);
  }
  channel.insert(channel.end(), datagrams.begin(), datagrams.begin() + 500);
  std::mt19937 rng(3);
  for (std::size_t start = 0; start < channel.size(); start += 64) {
    std::shuffle(channel.begin() + static_cast<long>(start),
                 channel.begin() + static_cast<long>(std::min(start + 64, channel.size())), rng);
  }
  DiodeDecoder dec = Decoder();
  std::vector<DiodeDecoder::Message> messages;
  std::uint64_t refused = 0;
  for (const auto& d : channel) {
    const auto st = dec.Feed(d, &messages);
    if (!st.ok()) {
      // Every copy is refused as a replay (the window remembers each datagram's number).
      CHECK_THAT(st.message(), Catch::Contains("was received before"));
      ++refused;
    }
  }
  CHECK(refused == datagrams.size() + 500);
  CHECK(dec.rejected(DiodeReject::kReplay) == refused);
  CHECK(Rejected(dec) == refused);
  REQUIRE(messages.size() == sent.size());
  std::set<Id> seen;
  for (const auto& msg : messages) {
    const Id id{msg.sender, msg.stream_id, msg.message_id};
    CHECK(seen.insert(id).second);
    CHECK(msg.bytes == sent.at(id));
  }
  REQUIRE(dec.Streams().size() == 2);
  for (const auto& s : dec.Streams()) {
    CHECK(s.announced == 300);
    CHECK(s.completed == 300);
    CHECK(dec.Incomplete(s.sender, s.stream_id).empty());
  }
  CHECK(dec.MissingCount() == 0);
  CHECK(dec.pending_bytes() == 0);
}

TEST_CASE("diode: a heartbeat reveals messages that were lost entirely") {
  DiodeEncoder enc = Encoder();
  DiodeDecoder dec = Decoder();
  std::vector<std::string> first, lost;
  enc.Encode("one", &first);
  enc.Encode("two", &lost);
  enc.Encode(RandomBytes(30000, 1), &lost);
  REQUIRE(FeedAll(dec, first).size() == 1);
  CHECK(StateOf(dec, kStream).announced == 1);
  CHECK(dec.Incomplete(kEurope, kStream).empty());

  std::vector<DiodeDecoder::Message> out;
  const std::string hb3 = enc.Heartbeat();
  REQUIRE(dec.Feed(hb3, &out).ok());
  CHECK(out.empty());
  CHECK(StateOf(dec, kStream).announced == 3);
  CHECK(dec.Incomplete(kEurope, kStream) == std::vector<std::uint64_t>{2, 3});
  CHECK(dec.MissingCount(kEurope, kStream) == 2);
  CHECK(dec.MissingCount() == 2);

  // An older heartbeat (one saying 1, sent with a later number) does not lower it; one with a
  // number already seen is refused as a replay.
  CHECK_FALSE(dec.Feed(With(hb3, 40, 8, 1), &out).ok());
  REQUIRE(dec.Feed(With(With(hb3, 32, 8, 1000), 40, 8, 1), &out).ok());
  CHECK(StateOf(dec, kStream).announced == 3);

  // A heartbeat of a newer stream (the sender restarted), announcing much; the list is capped.
  std::string hb = With(With(hb3, 24, 8, kStream + 77), 40, 8, 5000000000ULL);
  REQUIRE(dec.Feed(hb, &out).ok());
  const auto missing = dec.Incomplete(kEurope, kStream + 77);
  REQUIRE(missing.size() == 100000);
  CHECK(missing.front() == 1);
  CHECK(missing.back() == 100000);
  CHECK(dec.MissingCount(kEurope, kStream + 77) == 5000000000ULL);
  CHECK(dec.MissingCount() == 5000000002ULL);
  CHECK(dec.Incomplete(kEurope, 12345).empty());  // unknown stream
  CHECK(dec.Incomplete(kAws, kStream).empty());   // unknown sender
}

TEST_CASE("diode: refused datagrams name what is wrong, are counted by reason, change nothing") {
  DiodeEncoder enc = Encoder();
  std::vector<std::string> datagrams;
  enc.Encode(RandomBytes(30000, 1), &datagrams);  // 2 blocks: k 16 then k 9
  const std::string data = datagrams[0];          // block 0, a full block
  REQUIRE(BlockIndex(data) == 0);
  const std::string hb = enc.Heartbeat();
  const std::uint64_t rogue_id = DiodeSiteId(S().rogue.identity().sign_pk);
  const std::uint64_t aws_id = DiodeSiteId(S().aws.identity().sign_pk);
  auto key_of = [](const SiteKey& from, const SiteKey& to) {
    return DiodeKey::ForSending(from, to.identity()).value();
  };
  const DiodeKey rogue_key = key_of(S().rogue, S().enclave);
  const DiodeKey to_aws = key_of(S().europe, S().aws);

  struct Case {
    DiodeReject reason;
    const char* want;  // substring of the error
    std::string datagram;
  };
  auto raw = [](std::string d, std::size_t offset, std::size_t bytes, std::uint64_t v) {
    SetBE(&d, offset, bytes, v);  // not tagged again
    return d;
  };
  auto tail = [](const std::string& d, std::size_t keep, std::size_t extra) {
    return d.substr(0, keep) + std::string(extra, 'x') + std::string(16, '\0');
  };
  std::string flipped = data;
  flipped[100] ^= 1;
  std::string untagged = data;
  std::fill(untagged.end() - 16, untagged.end(), '\0');
  using R = DiodeReject;
  const std::vector<Case> cases = {
      // Before the tag: magic, version, length.
      {R::kMalformed, "bad magic", ""},
      {R::kMalformed, "bad magic", "RLY"},
      {R::kMalformed, "bad magic", "XLYD" + data.substr(4)},
      {R::kMalformed, "truncated: 7 bytes", data.substr(0, 7)},
      {R::kUnsupportedVersion, "version 1 is not supported (this relay supports version 2)",
       raw(data, 4, 1, 1)},
      {R::kUnsupportedVersion, "version 3 is not supported", raw(data, 4, 1, 3)},
      {R::kMalformed, "truncated: 55 bytes, header and tag need 56", data.substr(0, 55)},
      // The tag, and whose it is.
      {R::kWrongRecipient, "which is not this site", raw(data, 16, 8, aws_id)},
      {R::kWrongRecipient, "which is not this site", RetagAs(data, to_aws)},
      {R::kUnknownSender, "which is not a configured peer", raw(data, 8, 8, rogue_id)},
      {R::kUnknownSender, "which is not a configured peer", RetagAs(data, rogue_key)},
      {R::kBadTag, "tag does not verify", flipped},
      {R::kBadTag, "tag does not verify", untagged},
      {R::kBadTag, "tag does not verify", Retag(data, &rogue_key)},        // rogue posing as europe
      {R::kBadTag, "tag does not verify", raw(data, 8, 8, aws_id)},        // europe's, named aws's
      {R::kBadTag, "tag does not verify", raw(data, 5, 1, 3)},             // fields only after it
      {R::kBadTag, "tag does not verify", raw(data, 32, 8, 2)},            // the number is covered
      {R::kBadTag, "tag does not verify", raw(data, 24, 8, kStream + 1)},  // the stream too
      // Authentic (tagged by europe) but malformed: the fields.
      {R::kMalformed, "type 3", With(data, 5, 1, 3)},
      {R::kMalformed, "type 0", With(hb, 5, 1, 0)},
      {R::kMalformed, "reserved 1", With(data, 6, 2, 1)},
      {R::kMalformed, "seq 0", With(data, 32, 8, 0)},
      {R::kMalformed, "heartbeat length 73", Retag(hb + "x")},
      {R::kMalformed, "heartbeat length 71", Retag(hb.substr(0, 71))},
      {R::kMalformed, "truncated: 83 bytes, a data datagram needs 84", Retag(data.substr(0, 83))},
      {R::kMalformed, "does not match shard_bytes 1200", Retag(data + "x")},
      {R::kMalformed, "does not match shard_bytes 1200", Retag(data.substr(0, data.size() - 1))},
      {R::kMalformed, "message_id 0", With(data, 40, 8, 0)},
      {R::kMalformed, "k 0", With(data, 60, 2, 0)},
      {R::kMalformed, "m 0", With(data, 62, 2, 0)},
      {R::kMalformed, "k + m = 260 over 255", With(With(data, 60, 2, 250), 62, 2, 10)},
      {R::kMalformed, "shard_index 20 not below k + m = 20", With(data, 64, 2, 20)},
      {R::kMalformed, "shard_bytes 0", Retag(tail(With(data, 66, 2, 0), 68, 0))},
      {R::kMalformed, "shard_bytes 9001 over 9000", Retag(tail(With(data, 66, 2, 9001), 68, 9001))},
      {R::kMalformed, "block_count 0", With(data, 56, 4, 0)},
      {R::kMalformed, "block_index 2 not below block_count 2", With(data, 52, 4, 2)},
      {R::kMalformed, "message_len 1073741825 over 1 GiB", With(data, 48, 4, (1u << 30) + 1)},
      {R::kMalformed, "message_len 100 inconsistent with block_count 2, block_index 0, k 16",
       With(data, 48, 4, 100)},
      {R::kMalformed, "message_len 20000 inconsistent", With(datagrams[1], 48, 4, 20000)},
      {R::kMalformed, "message_len 5 inconsistent with block_count 1",
       With(With(data, 48, 4, 5), 56, 4, 1)},
  };
  DiodeDecoder dec = Decoder();
  std::array<std::uint64_t, static_cast<std::size_t>(DiodeReject::kCount)> counted{};
  for (const auto& c : cases) {
    INFO("want: " << c.want);
    std::vector<DiodeDecoder::Message> out;
    const auto st = dec.Feed(c.datagram, &out);
    REQUIRE_FALSE(st.ok());
    CHECK_THAT(st.message(), Catch::Contains(c.want));
    CHECK_THAT(st.message(), Catch::StartsWith("diode datagram rejected: "));
    ++counted[static_cast<std::size_t>(c.reason)];
    CHECK(dec.rejected(c.reason) == counted[static_cast<std::size_t>(c.reason)]);
    CHECK(out.empty());
    CHECK(dec.Streams().empty());
    CHECK(dec.pending_bytes() == 0);
  }
  CHECK(Rejected(dec) == cases.size());
  CHECK(std::string(relay::transports::DiodeRejectName(DiodeReject::kBadTag)) == "bad_tag");
  CHECK(std::string(relay::transports::DiodeRejectName(DiodeReject::kUnsupportedVersion)) ==
        "unsupported_version");

  // Authentic datagrams that contradict earlier ones of the same message are refused too.
  std::vector<DiodeDecoder::Message> out;
  REQUIRE(dec.Feed(data, &out).ok());
  const Snapshot before = Snap(dec);
  REQUIRE(before.pending > 0);
  std::uint64_t fresh = 10000;  // unseen numbers, so that the replay window lets them through
  auto renumbered = [&fresh](const std::string& d) { return With(d, 32, 8, ++fresh); };
  const std::vector<Case> contradicting = {
      {R::kMalformed, "message_len 29000 differs from earlier datagrams of message 1 (30000)",
       renumbered(With(datagrams[2], 48, 4, 29000))},
      {R::kMalformed, "shard_bytes 1000 differs",
       renumbered(Retag(tail(With(data, 66, 2, 1000), 68 + 1000, 0)))},
      {R::kMalformed, "m 5 differs", renumbered(With(With(data, 62, 2, 5), 64, 2, 5))},
      {R::kMalformed, "k 15 differs", renumbered(With(datagrams[2], 60, 2, 15))},
      // The last block's k must fit the full blocks' k 16: 30000 - 19200 needs 9 shards.
      {R::kMalformed, "k 10 inconsistent with k 16",
       renumbered(With(With(datagrams[1], 60, 2, 10), 48, 4, 30000))},
  };
  for (const auto& c : contradicting) {
    INFO("want: " << c.want);
    const auto st = dec.Feed(c.datagram, &out);
    REQUIRE_FALSE(st.ok());
    CHECK_THAT(st.message(), Catch::Contains(c.want));
    CHECK(Snap(dec) == before);
  }
  // The genuine datagrams still complete the message.
  const auto messages =
      FeedAll(dec, std::vector<std::string>(datagrams.begin() + 1, datagrams.end()));
  REQUIRE(messages.size() == 1);
  CHECK(messages[0].bytes == RandomBytes(30000, 1));
  CHECK(messages[0].sender == kEurope);
}

TEST_CASE("diode: the tag covers every byte before it") {
  DiodeEncoder enc = Encoder();
  std::vector<std::string> datagrams;
  enc.Encode(RandomBytes(300, 2), &datagrams);
  datagrams.push_back(enc.Heartbeat());
  DiodeDecoder dec = Decoder();
  for (const std::string& d : {datagrams[0], datagrams.back()}) {
    for (std::size_t i = 0; i < d.size(); ++i) {
      for (int bit : {0, 7}) {
        std::string changed = d;
        changed[i] = static_cast<char>(changed[i] ^ (1 << bit));
        std::vector<DiodeDecoder::Message> out;
        INFO("byte " << i << " bit " << bit);
        CHECK_FALSE(dec.Feed(changed, &out).ok());
      }
    }
  }
  CHECK(dec.Streams().empty());
  CHECK(FeedAll(dec, datagrams).size() == 1);
}

TEST_CASE("diode: pending memory is bounded, oldest partial messages dropped first") {
  const std::size_t limit = 64 * 1024;
  DiodeEncoder enc = Encoder();
  DiodeDecoder dec = Decoder(Pending(limit));
  // 10 KiB messages: k = 9, 13 datagrams; feeding 8 leaves each one shard short.
  std::vector<std::vector<std::string>> per_message(20);
  std::vector<DiodeDecoder::Message> out;
  for (std::uint32_t i = 0; i < 20; ++i) {
    enc.Encode(RandomBytes(10 * 1024, i), &per_message[i]);
    REQUIRE(per_message[i].size() == 13);
    for (std::size_t j = 0; j < 8; ++j) {
      REQUIRE(dec.Feed(per_message[i][j], &out).ok());
      CHECK(dec.pending_bytes() <= limit);
    }
  }
  CHECK(out.empty());
  CHECK(dec.pending_bytes() > limit / 2);
  // Message 1 was dropped: its last 5 datagrams alone cannot rebuild it.
  for (std::size_t j = 8; j < 13; ++j) REQUIRE(dec.Feed(per_message[0][j], &out).ok());
  CHECK(out.empty());
  // The newest survived: one more shard completes it.
  REQUIRE(dec.Feed(per_message[19][8], &out).ok());
  REQUIRE(out.size() == 1);
  CHECK(out[0].message_id == 20);
  CHECK(out[0].bytes == RandomBytes(10 * 1024, 19));
  CHECK(dec.pending_bytes() <= limit);
  const auto missing = dec.Incomplete(kEurope, kStream);
  CHECK(missing.size() == 19);
  CHECK(std::find(missing.begin(), missing.end(), 1) != missing.end());

  // A message larger than the bound can never be held; it is dropped, not kept over the bound.
  std::vector<std::string> big;
  enc.Encode(RandomBytes(200 * 1024, 99), &big);
  out.clear();
  for (const auto& d : big) {
    REQUIRE(dec.Feed(d, &out).ok());
    CHECK(dec.pending_bytes() <= limit);
  }
  CHECK(out.empty());
}

TEST_CASE("diode: forged, untagged and wrong-key datagrams change no state") {
  // The security review's attack (issue 10): datagrams shaped like the live stream's complete
  // made-up one-shard messages under the next real ids, so that the real ones are dropped as
  // duplicates and nothing counts as missing. Now every forged datagram is refused before it
  // touches anything.
  DiodeEncoder enc = Encoder();
  DiodeDecoder dec = Decoder();
  std::vector<std::string> first;
  for (int i = 0; i < 10; ++i) enc.Encode(RandomBytes(3000, 500 + i), &first);
  std::vector<std::string> partial;
  enc.Encode(RandomBytes(20000, 7), &partial);  // message 11, partly received
  REQUIRE(FeedAll(dec, first).size() == 10);
  REQUIRE(FeedAll(dec, {partial[0], partial[1]}).empty());
  const Snapshot before = Snap(dec);
  REQUIRE(before.pending > 0);

  std::vector<std::string> tiny;
  DiodeEncoder shape = Encoder();
  shape.Encode("x", &tiny);  // a one-shard message: the datagram is the whole message
  REQUIRE(K(tiny[0]) == 1);
  std::mt19937 rng(12);
  auto random_tag = [&rng](std::string d) {
    for (std::size_t i = d.size() - 16; i < d.size(); ++i) d[i] = static_cast<char>(rng());
    return d;
  };
  const DiodeKey rogue = DiodeKey::ForSending(S().rogue, S().enclave.identity()).value();
  const DiodeKey to_aws = DiodeKey::ForSending(S().europe, S().aws.identity()).value();
  std::vector<std::pair<DiodeReject, std::string>> forged;
  for (std::uint64_t i = 0; i < 30; ++i) {
    std::string d = tiny[0];
    SetBE(&d, 32, 8, Seq(partial.back()) + 1 + i);  // plausible numbers, not seen yet
    SetBE(&d, 40, 8, 12 + i);                       // the next real ids
    forged.emplace_back(DiodeReject::kBadTag, random_tag(d));
    // The same, "untagged": the 45-byte version 1 datagram of the review.
    std::string v1 = std::string("RLYD\x01\x01\x00\x00", 8);
    for (std::uint64_t v : {kStream, 12 + i}) {
      for (int b = 7; b >= 0; --b) v1.push_back(static_cast<char>(v >> (8 * b)));
    }
    v1 += std::string(
              "\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x01\x00\x01\x00\x04\x00"
              "\x00\x00\x01",
              20) +
          "x";
    REQUIRE(v1.size() == 45);
    forged.emplace_back(DiodeReject::kUnsupportedVersion, v1);
    // Sealed by a site that is nobody's peer, claiming europe's id; or by europe for aws.
    forged.emplace_back(DiodeReject::kBadTag, Retag(d, &rogue));
    forged.emplace_back(DiodeReject::kWrongRecipient, RetagAs(d, to_aws));
    // Heartbeats of made-up streams announcing much, and of the live stream.
    std::string hb = shape.Heartbeat();
    SetBE(&hb, 24, 8, rng());
    SetBE(&hb, 40, 8, 1ULL << 40);
    forged.emplace_back(DiodeReject::kBadTag, random_tag(hb));
    SetBE(&hb, 24, 8, kStream);
    forged.emplace_back(DiodeReject::kBadTag, random_tag(hb));
  }
  for (const auto& [reason, d] : forged) {
    std::vector<DiodeDecoder::Message> out;
    const auto st = dec.Feed(d, &out);
    REQUIRE_FALSE(st.ok());
    CHECK(out.empty());
    REQUIRE(Snap(dec) == before);
  }
  CHECK(dec.rejected(DiodeReject::kBadTag) == 120);
  CHECK(dec.rejected(DiodeReject::kUnsupportedVersion) == 30);
  CHECK(dec.rejected(DiodeReject::kWrongRecipient) == 30);
  CHECK(Rejected(dec) == forged.size());
  // The real stream goes on: message 11 completes, the next ten arrive, nothing is missing.
  REQUIRE(FeedAll(dec, std::vector<std::string>(partial.begin() + 2, partial.end())).size() == 1);
  for (std::uint32_t i = 0; i < 10; ++i) {
    std::vector<std::string> datagrams;
    enc.Encode(RandomBytes(3000, 600 + i), &datagrams);
    const auto got = FeedAll(dec, datagrams);
    REQUIRE(got.size() == 1);
    CHECK(got[0].message_id == 12 + i);
    CHECK(got[0].bytes == RandomBytes(3000, 600 + i));
  }
  CHECK(dec.MissingCount() == 0);
  CHECK(dec.Streams().size() == 1);
  CHECK(dec.streams_dropped() == 0);
}

TEST_CASE("diode: replayed datagrams change no state and complete nothing twice") {
  DiodeEncoder enc = Encoder();
  DiodeDecoder dec = Decoder();
  std::vector<std::string> datagrams;
  for (int i = 0; i < 20; ++i) enc.Encode(RandomBytes(5000, 40 + i), &datagrams);
  std::vector<std::string> lost;
  enc.Encode(RandomBytes(5000, 99), &lost);  // message 21: only three of its datagrams arrive
  datagrams.push_back(enc.Heartbeat());
  REQUIRE(FeedAll(dec, datagrams).size() == 20);
  REQUIRE(FeedAll(dec, {lost[0], lost[1], lost[2]}).empty());
  const Snapshot before = Snap(dec);
  CHECK(before.missing == 1);
  // Everything again, in order and backwards: all refused, nothing delivered, nothing changed.
  std::vector<std::string> replay = datagrams;
  replay.insert(replay.end(), datagrams.rbegin(), datagrams.rend());
  replay.insert(replay.end(), lost.begin(), lost.begin() + 3);
  for (const auto& d : replay) {
    std::vector<DiodeDecoder::Message> out;
    const auto st = dec.Feed(d, &out);
    REQUIRE_FALSE(st.ok());
    CHECK_THAT(st.message(), Catch::Contains("was received before"));
    CHECK(out.empty());
    REQUIRE(Snap(dec) == before);
  }
  CHECK(dec.rejected(DiodeReject::kReplay) == replay.size());
  // A datagram whose number is older than the replay window is refused unseen.
  std::vector<DiodeDecoder::Message> out;
  REQUIRE(dec.Feed(With(enc.Heartbeat(), 32, 8, kDiodeReplayWindow + 10000), &out).ok());
  const auto old = dec.Feed(lost[3], &out);  // never received, but far older than the newest
  REQUIRE_FALSE(old.ok());
  CHECK_THAT(old.message(), Catch::Contains("older than the replay window"));
  // The real loss is still counted (the replays neither completed nor hid it).
  CHECK(dec.MissingCount() == 1);
  CHECK(dec.Incomplete(kEurope, kStream) == std::vector<std::uint64_t>{21});
}

TEST_CASE("diode: the replay window takes each number once, late ones included") {
  DiodeEncoder enc = Encoder();
  DiodeDecoder dec = Decoder();
  const std::string hb = enc.Heartbeat();
  auto feed = [&](std::uint64_t seq) {
    std::vector<DiodeDecoder::Message> out;
    return dec.Feed(With(hb, 32, 8, seq), &out).ok();
  };
  for (std::uint64_t seq = 1; seq <= 63; ++seq) REQUIRE(feed(seq));
  // Jumps over word boundaries of the bitmap; the numbers skipped still come, once.
  REQUIRE(feed(200));
  for (std::uint64_t seq = 64; seq < 200; ++seq) REQUIRE(feed(seq));
  for (std::uint64_t seq : {1, 63, 64, 127, 128, 199, 200}) CHECK_FALSE(feed(seq));
  REQUIRE(feed(200 + kDiodeReplayWindow - 1));  // 201.. skipped, 200 still inside the window
  CHECK_FALSE(feed(200));
  CHECK(feed(201));
  CHECK_FALSE(feed(199));                 // older than the window now
  REQUIRE(feed(5 * kDiodeReplayWindow));  // a jump past the whole window clears it
  CHECK(feed(4 * kDiodeReplayWindow + 1));
  CHECK_FALSE(feed(4 * kDiodeReplayWindow + 1));
  CHECK_FALSE(feed(4 * kDiodeReplayWindow));  // exactly the window's size below: too old
  CHECK(dec.rejected(DiodeReject::kReplay) == 11);
}

TEST_CASE("diode: a replayed old stream cannot evict the live one") {
  // europe starts three times: streams 100, 200, 300 (a durable counter, raised at each start).
  DiodeEncoder a = Encoder(100), b = Encoder(200), c = Encoder(300);
  std::vector<std::string> da, db, dc, db_late;
  for (int i = 0; i < 5; ++i) {
    a.Encode(RandomBytes(2000, 10 + i), &da);
    b.Encode(RandomBytes(2000, 20 + i), &db);
    c.Encode(RandomBytes(2000, 30 + i), &dc);
  }
  std::vector<std::string> b_lost;
  b.Encode(RandomBytes(2000, 29), &b_lost);   // stream 200's message 6, lost
  b.Encode(RandomBytes(2000, 28), &db_late);  // its message 7 arrives late, after 300 started
  db.push_back(b.Heartbeat());
  DiodeDecoder dec = Decoder();
  REQUIRE(FeedAll(dec, da).size() == 5);
  REQUIRE(FeedAll(dec, db).size() == 5);  // 200 is newer: 100 is kept as the one before
  CHECK(dec.Streams().size() == 2);
  REQUIRE(FeedAll(dec, dc).size() == 5);  // 300: 100 is dropped, 200 is the one before
  CHECK(dec.streams_dropped() == 1);
  CHECK(dec.HighestStream(kEurope) == 300);
  REQUIRE(FeedAll(dec, db_late).size() == 1);  // late datagrams of the stream before still count
  const Snapshot before = Snap(dec);
  CHECK(before.missing == 1);  // 200's message 6

  // Replays of stream 100 are refused (older than the kept ones), of 200 and 300 as replays.
  for (const auto& d : da) {
    std::vector<DiodeDecoder::Message> out;
    const auto st = dec.Feed(d, &out);
    REQUIRE_FALSE(st.ok());
    CHECK_THAT(st.message(), Catch::Contains("stream 100 of sender"));
    CHECK_THAT(st.message(), Catch::Contains("older than stream 300"));
    REQUIRE(Snap(dec) == before);
  }
  for (const auto* replay : {&db, &dc}) {
    for (const auto& d : *replay) {
      std::vector<DiodeDecoder::Message> out;
      REQUIRE_FALSE(dec.Feed(d, &out).ok());
      REQUIRE(Snap(dec) == before);
    }
  }
  CHECK(dec.rejected(DiodeReject::kStaleStream) == da.size());
  CHECK(dec.rejected(DiodeReject::kReplay) == db.size() + dc.size());
  // The live stream goes on.
  std::vector<std::string> more;
  c.Encode("after the replays", &more);
  auto got = FeedAll(dec, more);
  REQUIRE(got.size() == 1);
  CHECK(got[0].stream_id == 300);
  CHECK(got[0].message_id == 6);
  // Another sender's streams are its own: aws's stream 1 is not "older" than europe's 300.
  DiodeEncoder aws = Encoder(1, DiodeParams{}, kAws);
  std::vector<std::string> from_aws;
  aws.Encode("from aws", &from_aws);
  got = FeedAll(dec, from_aws);
  REQUIRE(got.size() == 1);
  CHECK(got[0].sender == kAws);

  // A fourth start drops 200: its lost message stays counted as missing.
  DiodeEncoder d4 = Encoder(400);
  std::vector<std::string> dd;
  d4.Encode("fourth", &dd);
  REQUIRE(FeedAll(dec, dd).size() == 1);
  CHECK(dec.streams_dropped() == 2);
  CHECK(dec.MissingCount() == 1);

  // After a restart of the receiver, the highest stream seen (kept in its store) is the floor.
  DiodeDecoder restarted = Decoder();
  restarted.SetStreamFloor(kEurope, 400);
  CHECK(restarted.HighestStream(kEurope) == 400);
  for (const auto* replay : {&da, &db, &dc}) {
    for (const auto& d : *replay) {
      std::vector<DiodeDecoder::Message> out;
      const auto st = restarted.Feed(d, &out);
      REQUIRE_FALSE(st.ok());
      CHECK_THAT(st.message(), Catch::Contains("older than stream 400"));
    }
  }
  CHECK(restarted.Streams().empty());
  std::vector<std::string> next;
  d4.Encode("after the receiver's restart", &next);
  CHECK(FeedAll(restarted, next).size() == 1);
}

TEST_CASE("diode: a message whose frame fails verification stays missing until a good copy") {
  // Reassembly only joins shards: the frame inside is verified downstream, which reports a
  // frame that fails (or could not be stored) with Reopen. The id is missing again, and a later
  // copy of the message completes it.
  DiodeEncoder bad = Encoder();
  DiodeEncoder good = Encoder();  // the same stream: another copy of message 1
  std::vector<std::string> bad_copy, good_copy, second;
  bad.Encode("a frame that will not verify", &bad_copy);
  good.Encode(RandomBytes(3000, 77), &good_copy);
  good.Encode("message 2", &second);
  for (auto& d : good_copy) d = With(d, 32, 8, Seq(d) + 1000);  // later numbers
  for (auto& d : second) d = With(d, 32, 8, Seq(d) + 1000);
  DiodeDecoder dec = Decoder();
  auto got = FeedAll(dec, bad_copy);
  REQUIRE(got.size() == 1);
  CHECK(got[0].message_id == 1);
  CHECK(dec.MissingCount() == 0);
  dec.Reopen(kEurope, kStream, 1);
  CHECK(dec.reopened() == 1);
  CHECK(dec.MissingCount() == 1);
  CHECK(dec.Incomplete(kEurope, kStream) == std::vector<std::uint64_t>{1});
  CHECK(StateOf(dec, kStream).completed == 0);
  // Idempotent, and a no-op for ids not completed or streams not kept.
  dec.Reopen(kEurope, kStream, 1);
  dec.Reopen(kEurope, kStream, 5);
  dec.Reopen(kEurope, kStream + 1, 1);
  dec.Reopen(kAws, kStream, 1);
  CHECK(dec.reopened() == 1);
  CHECK(dec.MissingCount() == 1);
  // Message 2 arrives; message 1 is still missing.
  REQUIRE(FeedAll(dec, second).size() == 1);
  CHECK(dec.Incomplete(kEurope, kStream) == std::vector<std::uint64_t>{1});
  // The good copy completes it.
  got = FeedAll(dec, good_copy);
  REQUIRE(got.size() == 1);
  CHECK(got[0].message_id == 1);
  CHECK(got[0].bytes == RandomBytes(3000, 77));
  CHECK(dec.MissingCount() == 0);
  CHECK(StateOf(dec, kStream).completed == 2);
  // Reopening one id inside a range splits it: 1..2 complete, 1 reopened leaves 2.
  dec.Reopen(kEurope, kStream, 1);
  CHECK(dec.Incomplete(kEurope, kStream) == std::vector<std::uint64_t>{1});
  dec.Reopen(kEurope, kStream, 2);
  CHECK(dec.Incomplete(kEurope, kStream) == std::vector<std::uint64_t>{1, 2});
}

TEST_CASE(
    "diode: messages lost for good leave bounded state; the oldest are final, still missing") {
  DiodeEncoder enc = Encoder();
  DiodeDecoder dec = Decoder();  // 4096 ranges of completed ids per stream
  constexpr std::uint64_t kMessages = 10000;
  std::vector<std::vector<std::string>> datagrams(kMessages + 1);
  for (std::uint64_t id = 1; id <= kMessages; ++id) {
    // Message 4 spans several shards, so that part of it can be held.
    enc.Encode(id == 4 ? RandomBytes(20000, 4) : "message " + std::to_string(id), &datagrams[id]);
  }
  // Message 4 is partly received early.
  std::vector<DiodeDecoder::Message> out;
  REQUIRE(dec.Feed(datagrams[4][0], &out).ok());
  CHECK(dec.pending_bytes() > 0);
  // Every even message is lost: 5000 ranges of completed ids, more than the 4096 kept. The
  // lowest 904 and every id below are made final: 1..1807; the 903 even ids among them (with
  // the partial message 4) stay counted as missing.
  for (std::uint64_t id = 1; id < kMessages; id += 2) {
    REQUIRE(FeedAll(dec, datagrams[id]).size() == 1);
  }
  CHECK(StateOf(dec, kStream).announced == kMessages - 1);
  CHECK(StateOf(dec, kStream).forgotten_missing == 903);
  const auto missing = dec.Incomplete(kEurope, kStream);
  REQUIRE(missing.size() == 4096);  // 1808, 1810, ..., 9998
  CHECK(missing.front() == kMessages - 2 * 4096);
  CHECK(missing.back() == kMessages - 2);
  CHECK(dec.MissingCount(kEurope, kStream) == 4999);  // every even id, honestly
  CHECK(dec.MissingCount() == 4999);
  // The partial message 4 was final: dropped, and its late datagrams complete nothing.
  CHECK(dec.pending_bytes() == 0);
  CHECK(
      FeedAll(dec, std::vector<std::string>(datagrams[4].begin() + 1, datagrams[4].end())).empty());
  CHECK(dec.pending_bytes() == 0);
  // A message at the edge still completes, and the count follows.
  REQUIRE(FeedAll(dec, datagrams[kMessages - 2]).size() == 1);
  CHECK(dec.MissingCount() == 4998);
  CHECK(dec.MissingCount(kEurope, kStream) ==
        dec.Incomplete(kEurope, kStream).size() + StateOf(dec, kStream).forgotten_missing);
}

TEST_CASE("diode: during key rotations the previous keys of both sites are accepted") {
  // The enclave rotates (previous_key_file = its old key) and europe rotates (the enclave has
  // europe's previous_public_key): each of the four combinations verifies, as europe.
  const Sites& s = S();
  const SiteKey enclave_new = SiteKey::Generate(), europe_new = SiteKey::Generate();
  DiodeKeyring ring;
  for (const SiteKey* self : {&enclave_new, &s.enclave}) {
    for (const SiteKey* peer : {&europe_new, &s.europe}) {
      REQUIRE(ring.Add(kEurope, *self, peer->identity()).ok());
    }
  }
  REQUIRE(ring.Add(kAws, enclave_new, s.aws.identity()).ok());
  DiodeDecoder dec(ring.Authenticator());
  std::uint64_t stream = 10;
  for (const SiteKey* from : {&europe_new, &s.europe}) {
    for (const SiteKey* to : {&enclave_new, &s.enclave}) {
      auto key = std::make_shared<DiodeKey>(DiodeKey::ForSending(*from, to->identity()).value());
      DiodeEncoder enc(++stream, DiodeParams{}, DiodeKey::Sealer(key));
      std::vector<std::string> datagrams;
      enc.Encode("rotating", &datagrams);
      const auto got = FeedAll(dec, datagrams);
      REQUIRE(got.size() == 1);
      CHECK(got[0].sender == kEurope);
    }
  }
  // aws is known only to the new key: its datagrams for the old key are refused.
  auto old = std::make_shared<DiodeKey>(DiodeKey::ForSending(s.aws, s.enclave.identity()).value());
  DiodeEncoder enc(1, DiodeParams{}, DiodeKey::Sealer(old));
  std::vector<std::string> datagrams;
  enc.Encode("x", &datagrams);
  std::vector<DiodeDecoder::Message> out;
  const auto st = dec.Feed(datagrams[0], &out);
  REQUIRE_FALSE(st.ok());
  CHECK(dec.rejected(DiodeReject::kBadTag) == 1);
}

TEST_CASE("diode: a receiver's record of the newest stream carries its state across a restart") {
  DiodeEncoder old_run = Encoder(kStream - 1);  // the sender's run before: one frame lost
  DiodeEncoder enc = Encoder();
  std::vector<std::string> before_run, lost_before;
  old_run.Encode("old 1", &before_run);
  old_run.Encode("old 2", &lost_before);
  before_run.push_back(old_run.Heartbeat());
  std::vector<std::vector<std::string>> datagrams(13);
  for (std::size_t id = 1; id <= 12; ++id) enc.Encode(RandomBytes(3000, 900 + id), &datagrams[id]);
  DiodeDecoder dec = Decoder();
  REQUIRE(FeedAll(dec, before_run).size() == 1);
  std::vector<std::string> seen;
  for (std::size_t id = 1; id <= 10; ++id) {
    if (id == 4) continue;  // lost
    std::vector<std::string> part = datagrams[id];
    if (id == 7) part.resize(2);  // partial when the receiver stops
    seen.insert(seen.end(), part.begin(), part.end());
  }
  seen.push_back(enc.Heartbeat());  // announces 12: 11 and 12 were sent, not received
  REQUIRE(FeedAll(dec, seen).size() == 8);
  CHECK(dec.MissingCount() == 1 + 4);  // old 2; 4, 7, 11, 12
  // Message 8 was handed to the store but not known to be stored when the record was taken.
  const auto record = dec.Record(kEurope, {8});
  REQUIRE(record);
  CHECK(record->stream_id == kStream);
  CHECK(record->carried_missing == 1);
  const std::string text = record->Encode();
  INFO(text);
  const auto decoded = DiodeDecoder::StreamRecord::Decode(text);
  REQUIRE(decoded);
  CHECK(decoded->Encode() == text);
  CHECK(decoded->completed ==
        std::vector<std::pair<std::uint64_t, std::uint64_t>>{{1, 3}, {5, 6}, {9, 10}});

  DiodeDecoder restarted = Decoder();
  restarted.SetStreamFloor(kEurope, kStream);
  restarted.Restore(kEurope, *decoded);
  CHECK(restarted.HighestStream(kEurope) == kStream);
  CHECK(restarted.MissingCount() == 1 + 5);  // and 8, which may not have been stored
  CHECK(restarted.Incomplete(kEurope, kStream) == std::vector<std::uint64_t>{4, 7, 8, 11, 12});
  // Replays of what came before the restart are refused; nothing completes twice.
  for (const auto* replay : {&before_run, &seen}) {
    for (const auto& d : *replay) {
      std::vector<DiodeDecoder::Message> out;
      REQUIRE_FALSE(restarted.Feed(d, &out).ok());
      CHECK(out.empty());
    }
  }
  CHECK(restarted.pending_bytes() == 0);
  // The stream goes on, and the loss of message 4 stays counted.
  std::vector<std::string> next;
  enc.Encode("after the restart", &next);
  const auto got = FeedAll(restarted, next);
  REQUIRE(got.size() == 1);
  CHECK(got[0].message_id == 13);
  CHECK(restarted.MissingCount() == 1 + 5);
  // A record older than the floor is ignored.
  DiodeDecoder newer = Decoder();
  newer.SetStreamFloor(kEurope, kStream + 5);
  newer.Restore(kEurope, *decoded);
  CHECK(newer.Streams().empty());
  CHECK(newer.MissingCount() == 0);
  // Malformed records are refused.
  for (const std::string bad :
       {"", "diode-stream-record-1", "diode-stream-record-1 1 2 3 4 5 6",
        "diode-stream-record-1 1 2 3 4 5 6 7-", "diode-stream-record-1 1 2 3 4 5 6 7-8",
        "diode-stream-record-1 1 2 3 4 5 6 8-7,", "diode-stream-record-1 1 2 3 4 5 6 1-4,",
        "diode-stream-record-1 1 2 3 0 5 6 1-4,5-6,", "diode-stream-record-1 1 2 3 0 5 6 5-6,1-2,",
        "diode-stream-record-1 1 2 3 0 5 6 x", "diode-stream-record-2 1 2 3 0 5 6 ",
        "diode-stream-record-1 99999999999999999999 2 3 0 5 6 "}) {
    INFO(bad);
    CHECK_FALSE(DiodeDecoder::StreamRecord::Decode(bad));
  }
  CHECK(DiodeDecoder::StreamRecord::Decode("diode-stream-record-1 1 2 3 0 5 6 "));
}

}  // namespace
