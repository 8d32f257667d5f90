#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "transports/diode.h"

namespace {

using relay::transports::DiodeDecoder;
using relay::transports::DiodeEncoder;
using relay::transports::DiodeParams;
using relay::transports::kDiodeMaxStreams;

constexpr std::uint64_t kStream = 0x0123456789abcdefULL;

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

// Header fields of a data datagram, read at the documented offsets.
std::uint64_t MessageId(const std::string& d) { return GetBE(d, 16, 8); }
std::uint32_t BlockIndex(const std::string& d) {
  return static_cast<std::uint32_t>(GetBE(d, 28, 4));
}
int K(const std::string& d) { return static_cast<int>(GetBE(d, 36, 2)); }
int M(const std::string& d) { return static_cast<int>(GetBE(d, 38, 2)); }
int ShardIndex(const std::string& d) { return static_cast<int>(GetBE(d, 40, 2)); }

std::vector<DiodeDecoder::Message> FeedAll(DiodeDecoder& decoder,
                                           const std::vector<std::string>& datagrams) {
  std::vector<DiodeDecoder::Message> out;
  for (const auto& d : datagrams) {
    const auto st = decoder.Feed(d, &out);
    REQUIRE(st.ok());
  }
  return out;
}

DiodeDecoder::StreamState StateOf(const DiodeDecoder& decoder, std::uint64_t stream) {
  for (const auto& s : decoder.Streams()) {
    if (s.stream_id == stream) return s;
  }
  FAIL("no such stream");
  return {};
}

TEST_CASE("diode: datagram and heartbeat bytes follow the documented layout") {
  DiodeEncoder enc(kStream, DiodeParams{});
  std::vector<std::string> out;
  REQUIRE(enc.Encode(RandomBytes(1201, 1), &out) == 1);
  // 1201 bytes = 2 data shards of 1200 (the second zero-padded) + 4 parity.
  REQUIRE(out.size() == 6);
  const std::string& d = out[0];
  REQUIRE(d.size() == 44 + 1200);
  CHECK(d.substr(0, 4) == "RLYD");
  CHECK(GetBE(d, 4, 1) == 1);
  CHECK(GetBE(d, 5, 1) == 1);
  CHECK(GetBE(d, 6, 2) == 0);
  CHECK(GetBE(d, 8, 8) == kStream);
  CHECK(MessageId(d) == 1);
  CHECK(GetBE(d, 24, 4) == 1201);
  CHECK(BlockIndex(d) == 0);
  CHECK(GetBE(d, 32, 4) == 1);
  CHECK(K(d) == 2);
  CHECK(M(d) == 4);
  CHECK(GetBE(d, 42, 2) == 1200);
  for (std::size_t i = 0; i < out.size(); ++i) CHECK(ShardIndex(out[i]) == static_cast<int>(i));
  // The first shard is the message's first 1200 bytes verbatim (systematic code).
  CHECK(d.substr(44) == RandomBytes(1201, 1).substr(0, 1200));

  // A message shorter than a shard uses a shard of its own length; the empty one, 1 byte.
  out.clear();
  REQUIRE(enc.Encode("hello", &out) == 2);
  REQUIRE(out.size() == 5);
  for (const auto& x : out) CHECK(x.size() == 44 + 5);
  out.clear();
  REQUIRE(enc.Encode("", &out) == 3);
  REQUIRE(out.size() == 5);
  for (const auto& x : out) CHECK(x.size() == 44 + 1);

  const std::string hb = enc.Heartbeat();
  REQUIRE(hb.size() == 32);
  CHECK(hb.substr(0, 4) == "RLYD");
  CHECK(GetBE(hb, 4, 1) == 1);
  CHECK(GetBE(hb, 5, 1) == 2);
  CHECK(GetBE(hb, 6, 2) == 0);
  CHECK(GetBE(hb, 8, 8) == kStream);
  CHECK(GetBE(hb, 16, 8) == 3);
  CHECK(GetBE(hb, 24, 8) == 6 + 5 + 5);
  CHECK(enc.last_message_id() == 3);
}

TEST_CASE("diode: messages of many sizes round-trip") {
  const std::vector<std::size_t> sizes = {0, 1, 1199, 1200, 1201, 100 * 1024, 3 * 1024 * 1024};
  DiodeEncoder enc(kStream, DiodeParams{});
  std::vector<std::string> datagrams;
  std::vector<std::size_t> counts;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    const std::size_t before = datagrams.size();
    REQUIRE(enc.Encode(RandomBytes(sizes[i], static_cast<std::uint32_t>(i)), &datagrams) == i + 1);
    counts.push_back(datagrams.size() - before);
  }
  // 100 KiB: 5 full blocks + a last block of 6 shards; 3 MiB: 163 full blocks + one of 14.
  CHECK(counts == std::vector<std::size_t>{5, 5, 5, 5, 6, 5 * 20 + 6 + 4, 163 * 20 + 14 + 4});

  DiodeDecoder dec;
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
  CHECK(dec.Incomplete(kStream).empty());
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
      DiodeEncoder enc(kStream, DiodeParams{});
      DiodeDecoder dec;
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
      CHECK(dec.Incomplete(kStream).empty());
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
    DiodeEncoder enc(kStream, params);
    DiodeDecoder dec;
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
  DiodeEncoder enc(kStream, DiodeParams{});
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
  DiodeDecoder dec;
  const auto messages = FeedAll(dec, kept);
  REQUIRE(messages.size() == 2);
  CHECK(messages[0].message_id == 1);
  CHECK(messages[1].message_id == 3);
  CHECK(dec.Incomplete(kStream) == std::vector<std::uint64_t>{2});
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
  DiodeEncoder enc(kStream, DiodeParams{});
  DiodeDecoder dec;
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
  CHECK(dec.Incomplete(kStream).empty());
  for (std::size_t i = 0; i < messages.size(); ++i) {
    CHECK(messages[i].bytes ==
          RandomBytes(1024, static_cast<std::uint32_t>(messages[i].message_id - 1)));
  }
}

TEST_CASE("diode: per-block failure rate at 5% loss matches the binomial tail") {
  // Full blocks of k = 16, m = 4 (small shards keep the test fast; the code does not care).
  DiodeParams params;
  params.shard_bytes = 32;
  DiodeEncoder enc(kStream, params);
  DiodeDecoder dec;
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
  CHECK(dec.Incomplete(kStream).size() == blocks - messages.size());
}

TEST_CASE("diode: interleaving spreads a burst over blocks") {
  // 8 full blocks, interleaved 8 deep: any burst of 8 * (m - 1) + 1 = 25 consecutive losses
  // hits each block at most m = 4 times.
  const std::string message = RandomBytes(8 * 16 * 1200, 5);
  DiodeEncoder enc(kStream, DiodeParams{});
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
    DiodeDecoder dec;
    const auto messages = FeedAll(dec, kept);
    REQUIRE(messages.size() == 1);
    REQUIRE(messages[0].bytes == message);
  }
  // Without interleaving, a burst of m + 1 inside one block loses the message.
  DiodeParams flat;
  flat.interleave = 1;
  DiodeEncoder flat_enc(kStream, flat);
  datagrams.clear();
  flat_enc.Encode(message, &datagrams);
  std::vector<std::string> kept(datagrams.begin(), datagrams.begin() + 20);
  kept.insert(kept.end(), datagrams.begin() + 25, datagrams.end());
  DiodeDecoder dec;
  CHECK(FeedAll(dec, kept).empty());
  CHECK(dec.Incomplete(kStream) == std::vector<std::uint64_t>{1});
}

TEST_CASE("diode: reordering and duplication deliver each message exactly once") {
  DiodeEncoder enc(kStream, DiodeParams{});
  DiodeEncoder other(kStream + 1, DiodeParams{});
  std::vector<std::string> datagrams;
  std::map<std::pair<std::uint64_t, std::uint64_t>, std::string> sent;
  for (std::uint32_t i = 0; i < 300; ++i) {
    const std::string m = RandomBytes(i % 7 == 0 ? 40000 : i * 13, i);
    const auto id = enc.Encode(m, &datagrams);
    sent[{kStream, id}] = m;
    const std::string n = RandomBytes(i * 3, i + 1000);
    sent[{kStream + 1, other.Encode(n, &datagrams)}] = n;
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
  DiodeDecoder dec;
  const auto messages = FeedAll(dec, channel);
  REQUIRE(messages.size() == sent.size());
  std::set<std::pair<std::uint64_t, std::uint64_t>> seen;
  for (const auto& msg : messages) {
    CHECK(seen.insert({msg.stream_id, msg.message_id}).second);
    CHECK(msg.bytes == sent.at({msg.stream_id, msg.message_id}));
  }
  REQUIRE(dec.Streams().size() == 2);
  for (const auto& s : dec.Streams()) {
    CHECK(s.announced == 300);
    CHECK(s.completed == 300);
    CHECK(dec.Incomplete(s.stream_id).empty());
  }
  CHECK(dec.pending_bytes() == 0);
}

TEST_CASE("diode: a heartbeat reveals messages that were lost entirely") {
  DiodeEncoder enc(kStream, DiodeParams{});
  DiodeDecoder dec;
  std::vector<std::string> first, lost;
  enc.Encode("one", &first);
  enc.Encode("two", &lost);
  enc.Encode(RandomBytes(30000, 1), &lost);
  REQUIRE(FeedAll(dec, first).size() == 1);
  CHECK(StateOf(dec, kStream).announced == 1);
  CHECK(dec.Incomplete(kStream).empty());

  std::vector<DiodeDecoder::Message> out;
  REQUIRE(dec.Feed(enc.Heartbeat(), &out).ok());
  CHECK(out.empty());
  CHECK(StateOf(dec, kStream).announced == 3);
  CHECK(dec.Incomplete(kStream) == std::vector<std::uint64_t>{2, 3});

  // An older heartbeat does not lower what was announced.
  DiodeEncoder fresh(kStream, DiodeParams{});
  REQUIRE(dec.Feed(fresh.Heartbeat(), &out).ok());
  CHECK(StateOf(dec, kStream).announced == 3);

  // A heartbeat from a stream never heard of; the incomplete list is capped.
  std::string hb = enc.Heartbeat();
  SetBE(&hb, 8, 8, 77);
  SetBE(&hb, 16, 8, 5000000000ULL);
  REQUIRE(dec.Feed(hb, &out).ok());
  const auto missing = dec.Incomplete(77);
  REQUIRE(missing.size() == 100000);
  CHECK(missing.front() == 1);
  CHECK(missing.back() == 100000);
  CHECK(dec.Incomplete(12345).empty());  // unknown stream
}

TEST_CASE("diode: malformed datagrams are rejected naming the field and change nothing") {
  DiodeEncoder enc(kStream, DiodeParams{});
  std::vector<std::string> datagrams;
  enc.Encode(RandomBytes(30000, 1), &datagrams);  // 2 blocks: k 16 then k 9
  const std::string data = datagrams[0];          // block 0, a full block
  REQUIRE(BlockIndex(data) == 0);
  const std::string hb = enc.Heartbeat();

  struct Case {
    const char* want;  // substring of the error
    std::string datagram;
  };
  auto with = [&](std::size_t offset, std::size_t bytes, std::uint64_t v, const std::string& base) {
    std::string d = base;
    SetBE(&d, offset, bytes, v);
    return d;
  };
  std::string empty_shard = with(42, 2, 0, data).substr(0, 44);
  std::string jumbo = with(42, 2, 9001, data).substr(0, 44) + std::string(9001, 'x');
  const std::vector<Case> cases = {
      {"bad magic", ""},
      {"bad magic", "RLY"},
      {"bad magic", "XLYD" + data.substr(4)},
      {"truncated", data.substr(0, 7)},
      {"version 2", with(4, 1, 2, data)},
      {"type 3", with(5, 1, 3, data)},
      {"type 0", with(5, 1, 0, hb)},
      {"reserved 1", with(6, 2, 1, data)},
      {"heartbeat length 33", hb + "x"},
      {"heartbeat length 31", hb.substr(0, 31)},
      {"truncated: 43 bytes", data.substr(0, 43)},
      {"does not match shard_bytes 1200", data + "x"},
      {"does not match shard_bytes 1200", data.substr(0, data.size() - 1)},
      {"message_id 0", with(16, 8, 0, data)},
      {"k 0", with(36, 2, 0, data)},
      {"m 0", with(38, 2, 0, data)},
      {"k + m = 260 over 255", with(36, 2, 250, with(38, 2, 10, data))},
      {"shard_index 20 not below k + m = 20", with(40, 2, 20, data)},
      {"shard_bytes 0", empty_shard},
      {"shard_bytes 9001 over 9000", jumbo},
      {"block_count 0", with(32, 4, 0, data)},
      {"block_index 2 not below block_count 2", with(28, 4, 2, data)},
      {"message_len 1073741825 over 1 GiB", with(24, 4, (1u << 30) + 1, data)},
      {"message_len 100 inconsistent with block_count 2, block_index 0, k 16",
       with(24, 4, 100, data)},
      {"message_len 20000 inconsistent", with(24, 4, 20000, datagrams[1])},  // last block k 9
      {"message_len 5 inconsistent with block_count 1", with(24, 4, 5, with(32, 4, 1, data))},
  };
  DiodeDecoder dec;
  for (const auto& c : cases) {
    INFO("want: " << c.want);
    std::vector<DiodeDecoder::Message> out;
    const auto st = dec.Feed(c.datagram, &out);
    REQUIRE_FALSE(st.ok());
    CHECK_THAT(st.message(), Catch::Contains(c.want));
    CHECK_THAT(st.message(), Catch::StartsWith("diode datagram rejected: "));
    CHECK(out.empty());
    CHECK(dec.Streams().empty());
    CHECK(dec.pending_bytes() == 0);
  }

  // Datagrams that contradict earlier ones of the same message are rejected too.
  std::vector<DiodeDecoder::Message> out;
  REQUIRE(dec.Feed(data, &out).ok());
  const std::size_t pending = dec.pending_bytes();
  REQUIRE(pending > 0);
  const std::vector<Case> contradicting = {
      {"message_len 29000 differs from earlier datagrams of message 1 (30000)",
       with(24, 4, 29000, datagrams[2])},
      {"shard_bytes 1000 differs", with(42, 2, 1000, data).substr(0, 44 + 1000)},
      {"m 5 differs", with(38, 2, 5, with(40, 2, 5, data))},
      {"k 15 differs", with(36, 2, 15, datagrams[2])},
      // The last block's k must fit the full blocks' k 16: 30000 - 19200 needs 9 shards.
      {"k 10 inconsistent with k 16", with(36, 2, 10, with(24, 4, 30000, datagrams[1]))},
  };
  for (const auto& c : contradicting) {
    INFO("want: " << c.want);
    const auto st = dec.Feed(c.datagram, &out);
    REQUIRE_FALSE(st.ok());
    CHECK_THAT(st.message(), Catch::Contains(c.want));
    CHECK(dec.pending_bytes() == pending);
    CHECK(StateOf(dec, kStream).announced == 1);
  }
  // The genuine datagrams still complete the message.
  const auto messages = FeedAll(dec, datagrams);
  REQUIRE(messages.size() == 1);
  CHECK(messages[0].bytes == RandomBytes(30000, 1));
}

TEST_CASE("diode: pending memory is bounded, oldest partial messages dropped first") {
  const std::size_t limit = 64 * 1024;
  DiodeEncoder enc(kStream, DiodeParams{});
  DiodeDecoder dec(limit);
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
  const auto missing = dec.Incomplete(kStream);
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

TEST_CASE("diode: forged stream ids cannot grow the decoder; the live stream keeps working") {
  constexpr std::size_t kStreams = 4;
  DiodeEncoder enc(kStream, DiodeParams{});
  DiodeDecoder dec(256u << 20, kStreams);
  std::vector<DiodeDecoder::Message> out;
  // Message 1 with one shard lost: FEC rebuilds it.
  std::vector<std::string> first;
  enc.Encode(RandomBytes(3000, 1), &first);
  first.erase(first.begin());
  REQUIRE(FeedAll(dec, first).size() == 1);
  CHECK(dec.recovered_shards() == 1);

  // A flood of heartbeats from new stream ids, two per datagram of the live stream: the live
  // stream is always among the most recently active, so it is never dropped.
  std::string forged = enc.Heartbeat();
  std::uint64_t next_forged = 1000;
  std::vector<std::uint64_t> delivered;
  for (std::uint32_t i = 0; i < 200; ++i) {
    std::vector<std::string> datagrams;
    enc.Encode(RandomBytes(2000, 100 + i), &datagrams);
    for (const auto& d : datagrams) {
      for (int f = 0; f < 2; ++f) {
        SetBE(&forged, 8, 8, next_forged++);
        SetBE(&forged, 16, 8, 1ULL << 40);
        REQUIRE(dec.Feed(forged, &out).ok());
      }
      REQUIRE(dec.Feed(d, &out).ok());
      REQUIRE(dec.Streams().size() <= kStreams);
    }
  }
  for (const auto& m : out) delivered.push_back(m.message_id);
  REQUIRE(delivered.size() == 200);
  CHECK(delivered.front() == 2);
  CHECK(delivered.back() == 201);
  CHECK(dec.streams_dropped() == next_forged - 1000 - (kStreams - 1));
  CHECK(StateOf(dec, kStream).completed == 201);
  CHECK(dec.MissingCount(kStream) == 0);

  // Forged streams arriving faster than the live one push it out: its state goes (a partial
  // message with it), and comes back with its next datagram; the recovered count stays.
  std::vector<std::string> partial;
  enc.Encode(RandomBytes(20000, 7), &partial);
  REQUIRE(dec.Feed(partial[0], &out).ok());
  CHECK(dec.pending_bytes() > 0);
  for (std::size_t f = 0; f < kStreams; ++f) {
    SetBE(&forged, 8, 8, next_forged++);
    REQUIRE(dec.Feed(forged, &out).ok());
  }
  CHECK(dec.pending_bytes() == 0);
  for (const auto& s : dec.Streams()) CHECK(s.stream_id != kStream);
  CHECK(dec.recovered_shards() == 1);
  out.clear();
  std::vector<std::string> after;
  enc.Encode("after", &after);
  REQUIRE(FeedAll(dec, after).size() == 1);
  CHECK(StateOf(dec, kStream).announced == enc.last_message_id());
}

TEST_CASE("diode: messages lost for good leave bounded state; the oldest ranges are forgotten") {
  DiodeEncoder enc(kStream, DiodeParams{});
  DiodeDecoder dec;  // 4096 ranges of completed ids per stream
  constexpr std::uint64_t kMessages = 10000;
  std::vector<std::vector<std::string>> datagrams(kMessages + 1);
  for (std::uint64_t id = 1; id <= kMessages; ++id) {
    // Message 4 spans several shards, so that part of it can be held.
    enc.Encode(id == 4 ? RandomBytes(20000, 4) : "message " + std::to_string(id), &datagrams[id]);
  }
  // Message 4 is partly received early.
  std::vector<DiodeDecoder::Message> out;
  REQUIRE(dec.Feed(datagrams[4][0], &out).ok());
  const std::size_t partial_bytes = dec.pending_bytes();
  CHECK(partial_bytes > 0);
  // Every even message is lost: 5000 ranges of completed ids, more than the 4096 kept. The
  // lowest are forgotten: the ids up to 1807 are neither completed nor missing any more.
  for (std::uint64_t id = 1; id < kMessages; id += 2) {
    REQUIRE(FeedAll(dec, datagrams[id]).size() == 1);
  }
  CHECK(StateOf(dec, kStream).announced == kMessages - 1);
  const auto missing = dec.Incomplete(kStream);
  CHECK(dec.MissingCount(kStream) == missing.size());
  REQUIRE(missing.size() == 4096);  // 1808, 1810, ..., 9998
  CHECK(missing.front() == kMessages - 2 * 4096);
  CHECK(missing.back() == kMessages - 2);
  // Forgetting dropped nothing held: message 4 still completes when the rest comes late.
  CHECK(dec.pending_bytes() == partial_bytes);
  auto late = FeedAll(dec, datagrams[4]);
  REQUIRE(late.size() == 1);
  CHECK(late[0].message_id == 4);
  CHECK(late[0].bytes == RandomBytes(20000, 4));
  CHECK(dec.pending_bytes() == 0);
  // A late copy of a forgotten completed message is delivered again (frames are de-duplicated
  // downstream); one of a remembered message is not.
  CHECK(FeedAll(dec, datagrams[1]).size() == 1);
  CHECK(FeedAll(dec, datagrams[kMessages - 1]).empty());
  CHECK(dec.MissingCount(kStream) == dec.Incomplete(kStream).size());
}

TEST_CASE("diode: forged completions far ahead cannot silence the real stream") {
  // Someone on the diode's network completes made-up one-shard messages with ids far beyond the
  // real stream's, more of them than the decoder keeps ranges for. The real stream goes on.
  DiodeEncoder enc(kStream, DiodeParams{});
  DiodeDecoder dec(256u << 20, kDiodeMaxStreams, 64);
  std::vector<std::string> one;
  for (int i = 0; i < 10; ++i) enc.Encode(RandomBytes(3000, 500 + i), &one);
  REQUIRE(FeedAll(dec, one).size() == 10);
  DiodeEncoder forger(kStream, DiodeParams{});
  std::vector<std::string> tiny;
  forger.Encode("x", &tiny);
  REQUIRE(K(tiny[0]) == 1);  // one shard is the whole message
  std::vector<DiodeDecoder::Message> out;
  for (std::uint64_t i = 0; i < 200; ++i) {
    std::string forged = tiny[0];
    SetBE(&forged, 16, 8, (1ULL << 62) + 2 * i);
    REQUIRE(dec.Feed(forged, &out).ok());
  }
  CHECK(out.size() == 200);  // delivered as frames, and refused there (not authentic)
  for (std::uint32_t i = 0; i < 50; ++i) {
    std::vector<std::string> datagrams;
    enc.Encode(RandomBytes(3000, 600 + i), &datagrams);
    const auto got = FeedAll(dec, datagrams);
    REQUIRE(got.size() == 1);
    CHECK(got[0].message_id == 11 + i);
    CHECK(got[0].bytes == RandomBytes(3000, 600 + i));
  }
}

}  // namespace
