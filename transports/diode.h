#pragma once
// The one-way data diode transport (UDP): frames cut into datagrams with forward error
// correction, interleaved against burst loss, paced by a rate limit; heartbeats carry
// cumulative counters so the receiver knows what it missed even on an idle link.
// See docs/wire-format.md, "Diode datagrams".
//
// DiodeEncoder (sender side) turns messages (frames) into datagrams; DiodeDecoder (receiver
// side) turns datagrams back into messages. Both are pure (no sockets, no clock), so tests can
// drop, duplicate and reorder datagrams at will. Not thread-safe: one owner each.

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "relay/status.h"

namespace relay::transports {

struct DiodeParams {
  std::uint16_t shard_bytes = 1200;  // payload bytes per datagram (below a 1500-byte MTU)
  std::uint16_t data_shards = 16;    // k: data shards per FEC block
  std::uint16_t parity_shards = 4;   // m: parity shards per block (recovers m losses of k+m)
  std::uint16_t interleave = 8;      // blocks whose shards are interleaved when sent
};

// Sender side. Messages get consecutive ids 1, 2, 3, ... for the stream.
class DiodeEncoder {
 public:
  // `stream_id` identifies this sender's stream (e.g. random per process start, or durable).
  DiodeEncoder(std::uint64_t stream_id, DiodeParams params);
  ~DiodeEncoder();
  DiodeEncoder(const DiodeEncoder&) = delete;
  DiodeEncoder& operator=(const DiodeEncoder&) = delete;

  // Appends the datagrams that carry `message` (with parity, interleaved) to *out and returns
  // the message id it was given.
  std::uint64_t Encode(std::string_view message, std::vector<std::string>* out);
  // A heartbeat datagram: the stream id and the id of the last message sent so far.
  std::string Heartbeat() const;
  std::uint64_t last_message_id() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Receiver side.
inline constexpr std::size_t kDiodeMaxStreams = 16;  // default stream state a decoder keeps

class DiodeDecoder {
 public:
  // Partial messages are held up to max_pending_bytes (oldest dropped first); state is kept for
  // at most max_streams streams (a sender has one per process start; the least recently active
  // stream is dropped for a new one) and at most max_completed_ranges ranges of completed ids per
  // stream (the lowest forgotten: no longer de-duplicated, no longer counted as missing), so
  // forged datagrams cannot grow any of it without bound (a forged completed id shadows only
  // that id of the real stream, whose frame then comes back with a resend request).
  explicit DiodeDecoder(std::size_t max_pending_bytes = 256u << 20,
                        std::size_t max_streams = kDiodeMaxStreams,
                        std::size_t max_completed_ranges = 4096);
  ~DiodeDecoder();
  DiodeDecoder(const DiodeDecoder&) = delete;
  DiodeDecoder& operator=(const DiodeDecoder&) = delete;

  struct Message {
    std::uint64_t stream_id;
    std::uint64_t message_id;
    std::string bytes;
  };
  // Feeds one datagram. Complete messages are appended to *out (each once, even if datagrams
  // repeat). A malformed datagram is an error naming what is wrong; it changes nothing.
  Status Feed(std::string_view datagram, std::vector<Message>* out);

  // Per stream: the highest message id announced (by data or heartbeat), and the ids below it
  // that are neither complete nor still possible to complete are "missing".
  struct StreamState {
    std::uint64_t stream_id = 0;
    std::uint64_t announced = 0;         // highest message id known to exist
    std::uint64_t completed = 0;         // messages completed so far (count)
    std::uint64_t recovered_shards = 0;  // data shards rebuilt from parity
  };
  std::vector<StreamState> Streams() const;
  // Message ids of `stream_id` in [1, announced] not completed (pending or lost), at most
  // 100,000, leaving out ids at or below the end of a forgotten range (see the constructor).
  std::vector<std::uint64_t> Incomplete(std::uint64_t stream_id) const;
  // How many ids Incomplete would list without its cap, without listing them.
  std::uint64_t MissingCount(std::uint64_t stream_id) const;
  // Bytes currently held for partial messages (shards and decoded blocks, plus a fixed
  // per-block overhead); kept at or below max_pending_bytes after every Feed.
  std::size_t pending_bytes() const;
  // Data shards rebuilt from parity, over every stream ever seen (dropped ones included).
  std::uint64_t recovered_shards() const;
  // Streams whose state was dropped to make room for a new one.
  std::uint64_t streams_dropped() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace relay::transports
