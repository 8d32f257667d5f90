// Fuzzes DiodeDecoder::Feed with a sequence of datagrams. The input's first byte picks the
// authenticator: even, the real one (DiodeKeyring with the fixed keys of fuzz_keys.h: datagrams
// from "peer" to "site", as the seeds are sealed), so that reordered, repeated and spliced real
// datagrams reach the stream, replay and reassembly logic; odd, a trusting one (every tag is
// genuine unless it starts with 0xfd, 0xfe or 0xff: wrong recipient, unknown sender, bad tag;
// the sender is sender_id % 3), so that mutated fields get past the tag. The rest is split into
// datagrams, each a 2-byte big-endian length followed by that many bytes (a short tail is the
// last one). A delivered message whose first byte is odd is reopened, as if its frame had
// failed verification.
//
// Checks after every Feed: pending_bytes() <= max_pending_bytes; at most kDiodeStreamsPerSender
// streams per sender and 3 senders; a refused datagram changed nothing (streams, pending bytes,
// missing count); no message is delivered twice unless it was reopened in between. At the end:
// MissingCount agrees with Incomplete, and a decoder restored from Record (through its text)
// counts the same missing ids.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <set>
#include <string_view>
#include <tuple>
#include <vector>

#include "fuzz_keys.h"
#include "transports/diode.h"
#include "transports/diode_auth.h"

namespace {

using relay::transports::DiodeAuthResult;
using relay::transports::DiodeAuthVerdict;
using relay::transports::DiodeDecoder;
using relay::transports::DiodeTagInput;

constexpr std::size_t kMaxPending = 64u << 10;  // small, so eviction paths are reachable
constexpr std::size_t kMaxRanges = 4;           // small, so final ranges are reachable

[[noreturn]] void Fail(const char* what) {
  std::fprintf(stderr, "invariant broken: %s\n", what);
  std::abort();
}

const relay::transports::DiodeKeyring& Keyring() {
  static const relay::transports::DiodeKeyring* ring = [] {
    static const auto site = relay::fuzz::LoadFixedKey(relay::fuzz::kSiteSecret);
    static const auto peer = relay::fuzz::LoadFixedKey(relay::fuzz::kPeerSecret);
    auto* r = new relay::transports::DiodeKeyring();
    if (!r->Add(0, site, peer.identity()).ok()) std::abort();
    return r;
  }();
  return *ring;
}

DiodeAuthResult Trusting(const DiodeTagInput& in, std::string_view tag) {
  switch (static_cast<unsigned char>(tag[0])) {
    case 0xfd:
      return {DiodeAuthVerdict::kWrongRecipient, 0};
    case 0xfe:
      return {DiodeAuthVerdict::kUnknownSender, 0};
    case 0xff:
      return {DiodeAuthVerdict::kBadTag, 0};
    default:
      return {DiodeAuthVerdict::kOk, static_cast<std::uint32_t>(in.sender_id % 3)};
  }
}

using State = std::tuple<std::vector<std::tuple<std::uint32_t, std::uint64_t, std::uint64_t,
                                                std::uint64_t, std::uint64_t>>,
                         std::size_t, std::uint64_t>;
State Snapshot(const DiodeDecoder& d) {
  State s;
  for (const auto& st : d.Streams()) {
    std::get<0>(s).emplace_back(st.sender, st.stream_id, st.announced, st.completed,
                                st.forgotten_missing);
  }
  std::get<1>(s) = d.pending_bytes();
  std::get<2>(s) = d.MissingCount();
  return s;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const bool real = data[0] % 2 == 0;
  relay::transports::DiodeDecoderLimits limits;
  limits.max_pending_bytes = kMaxPending;
  limits.max_completed_ranges = kMaxRanges;
  DiodeDecoder decoder(
      real ? Keyring().Authenticator() : relay::transports::DiodeAuthenticator(Trusting), limits);
  std::set<std::tuple<std::uint32_t, std::uint64_t, std::uint64_t>> delivered;
  std::vector<DiodeDecoder::Message> out;
  std::size_t pos = 1;
  while (pos < size) {
    std::size_t len = size - pos;
    if (len >= 2) {
      len = (std::size_t{data[pos]} << 8) | data[pos + 1];
      pos += 2;
      if (len > size - pos) len = size - pos;
    }
    const State before = Snapshot(decoder);
    out.clear();
    const auto st =
        decoder.Feed(std::string_view(reinterpret_cast<const char*>(data + pos), len), &out);
    pos += len;
    if (!st.ok() && (!out.empty() || Snapshot(decoder) != before)) {
      Fail("a refused datagram changed the decoder");
    }
    for (const auto& m : out) {
      const auto id = std::make_tuple(m.sender, m.stream_id, m.message_id);
      if (!delivered.insert(id).second) Fail("a message was delivered twice");
      if (!m.bytes.empty() && (static_cast<unsigned char>(m.bytes[0]) & 1) != 0) {
        decoder.Reopen(m.sender, m.stream_id, m.message_id);
        delivered.erase(id);
      }
    }
    if (decoder.pending_bytes() > kMaxPending) Fail("pending_bytes exceeds its bound");
    std::map<std::uint32_t, std::size_t> per_sender;
    for (const auto& s : decoder.Streams()) {
      if (++per_sender[s.sender] > relay::transports::kDiodeStreamsPerSender) {
        Fail("more streams kept for a sender than its bound");
      }
    }
    if (per_sender.size() > 3) Fail("more senders than the authenticator names");
  }
  for (const auto& s : decoder.Streams()) {
    // Listing is capped at 100,000 ids; compare where the list is short (listing 100,000 ids
    // per input would make most of the fuzzer's time).
    const auto counted = decoder.MissingCount(s.sender, s.stream_id);
    if (counted < s.forgotten_missing) Fail("MissingCount below the final missing ids");
    if (counted - s.forgotten_missing > 10000) continue;
    const auto listed = decoder.Incomplete(s.sender, s.stream_id).size();
    if (counted != listed + s.forgotten_missing) Fail("MissingCount disagrees with Incomplete");
  }
  // The record of each sender's newest stream, through its text, restores the same count.
  DiodeDecoder restored(relay::transports::DiodeAuthenticator(Trusting), limits);
  std::set<std::uint32_t> senders;
  for (const auto& s : decoder.Streams()) senders.insert(s.sender);
  for (std::uint32_t sender : senders) {
    const auto record = decoder.Record(sender, {});
    if (!record) Fail("no record of a sender with streams");
    const auto text = record->Encode();
    const auto decoded = DiodeDecoder::StreamRecord::Decode(text);
    if (!decoded || decoded->Encode() != text) Fail("a record does not survive its text");
    restored.Restore(sender, *decoded);
  }
  if (decoder.MissingCount() != ~std::uint64_t{0} &&
      restored.MissingCount() != decoder.MissingCount()) {
    Fail("a restored decoder counts other missing ids");
  }
  return 0;
}
