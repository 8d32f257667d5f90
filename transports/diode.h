#pragma once
// The one-way data diode transport (UDP): frames cut into datagrams with forward error
// correction, interleaved against burst loss, paced by a rate limit; heartbeats carry
// cumulative counters so the receiver knows what it missed even on an idle link. Every datagram
// names its sender and recipient, is numbered in its sender's stream and ends with a tag keyed
// from the two sites' keys (transports/diode_auth.h), which the receiver checks before anything
// else. See docs/wire-format.md, "Diode datagrams".
//
// DiodeEncoder (sender side) turns messages (frames) into datagrams; DiodeDecoder (receiver
// side) turns datagrams back into messages. Both are pure (no sockets, no clock, no keys: tags
// are made and checked by the functions they are given), so tests can drop, duplicate, reorder,
// replay and forge datagrams at will. Not thread-safe: one owner each.

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "base/status.h"

namespace relay::transports {

inline constexpr std::uint8_t kDiodeVersion = 2;
inline constexpr std::size_t kDiodeTagBytes = 16;

struct DiodeParams {
  std::uint16_t shard_bytes = 1200;  // payload bytes per datagram (below a 1500-byte MTU)
  std::uint16_t data_shards = 16;    // k: data shards per FEC block
  std::uint16_t parity_shards = 4;   // m: parity shards per block (recovers m losses of k+m)
  std::uint16_t interleave = 8;      // blocks whose shards are interleaved when sent
};

// What a datagram's tag is computed over and keyed by. The ids and numbers are also inside
// `signed_part` (every byte of the datagram before its tag); they are passed parsed so the tag
// function need not know the layout.
struct DiodeTagInput {
  std::uint64_t sender_id = 0;     // the sender's site id (first 8 bytes of its sign_pk)
  std::uint64_t recipient_id = 0;  // the recipient's site id
  std::uint64_t stream_id = 0;     // the sender's stream (one per start, only growing)
  std::uint64_t seq = 0;           // the datagram's number in its stream, from 1
  std::string_view signed_part;
};

// Sender side: the site ids written into every datagram, and the function that writes the
// kDiodeTagBytes-byte tag of a datagram (DiodeKey::Sealer makes one).
struct DiodeSealer {
  std::uint64_t sender_id = 0;
  std::uint64_t recipient_id = 0;
  std::function<void(const DiodeTagInput& input, std::uint8_t* tag)> tag;
};

// Receiver side: whether a datagram's tag is genuine, and whose it is (DiodeKeyring makes one).
enum class DiodeAuthVerdict : std::uint8_t { kOk, kWrongRecipient, kUnknownSender, kBadTag };
struct DiodeAuthResult {
  DiodeAuthVerdict verdict = DiodeAuthVerdict::kBadTag;
  // With kOk: the sender's index (a configured peer). Senders get their own state, so an
  // authenticator must map to a few indices only.
  std::uint32_t sender = 0;
};
using DiodeAuthenticator =
    std::function<DiodeAuthResult(const DiodeTagInput& input, std::string_view tag)>;

// Why a datagram was refused; each is counted (DiodeDecoder::rejected).
enum class DiodeReject : std::uint8_t {
  kMalformed = 0,       // bad magic, truncated, a field out of range, an inconsistent layout
  kUnsupportedVersion,  // not version 2 (version 1 datagrams had no tag)
  kWrongRecipient,      // addressed to a site id that is not this site's (current or previous)
  kUnknownSender,       // from a site id that is not a configured peer's
  kBadTag,              // the tag does not verify: forged, altered, or sealed with other keys
  kStaleStream,         // a stream older than the ones kept for its sender (replayed, or late)
  kReplay,              // a datagram number already received, or older than the replay window
  kCount
};
// Stable snake_case name used as the metrics label: "malformed", "bad_tag", ...
const char* DiodeRejectName(DiodeReject reason);

// Sender side. Messages get consecutive ids 1, 2, 3, ... in the stream, datagrams (data and
// heartbeats) consecutive numbers 1, 2, 3, ...
class DiodeEncoder {
 public:
  // `stream_id` must be higher than every stream id the sender used before for this recipient:
  // receivers refuse datagrams of older streams as replays, and (stream_id, seq) is the nonce
  // of the tag, which must never repeat under one key.
  DiodeEncoder(std::uint64_t stream_id, DiodeParams params, DiodeSealer sealer);
  ~DiodeEncoder();
  DiodeEncoder(const DiodeEncoder&) = delete;
  DiodeEncoder& operator=(const DiodeEncoder&) = delete;

  // Appends the datagrams that carry `message` (with parity, interleaved) to *out and returns
  // the message id it was given.
  std::uint64_t Encode(std::string_view message, std::vector<std::string>* out);
  // A heartbeat datagram: the id of the last message sent so far, and how many data datagrams.
  std::string Heartbeat();
  std::uint64_t last_message_id() const;
  std::uint64_t stream_id() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Receiver side.
inline constexpr std::size_t kDiodeStreamsPerSender = 2;    // the newest stream and the one before
inline constexpr std::uint64_t kDiodeReplayWindow = 65536;  // datagram numbers remembered

struct DiodeDecoderLimits {
  // Partial messages are held up to this many bytes (all senders; oldest dropped first).
  std::size_t max_pending_bytes = 256u << 20;
  // Ranges of completed message ids kept per stream (each message lost for good splits one);
  // beyond it, the lowest range and every id below it are final: their datagrams are ignored
  // and the missing ones among them stay counted as missing.
  std::size_t max_completed_ranges = 4096;
};

class DiodeDecoder {
 public:
  // Every datagram's tag is checked by `authenticate` before it can change anything.
  explicit DiodeDecoder(DiodeAuthenticator authenticate, DiodeDecoderLimits limits = {});
  ~DiodeDecoder();
  DiodeDecoder(const DiodeDecoder&) = delete;
  DiodeDecoder& operator=(const DiodeDecoder&) = delete;

  struct Message {
    std::uint32_t sender;  // as the authenticator named it
    std::uint64_t stream_id;
    std::uint64_t message_id;
    std::string bytes;
  };
  // Feeds one datagram. Complete messages are appended to *out (each once, even if datagrams
  // repeat). A refused datagram is an error naming what is wrong (counted by reason); it
  // changes nothing else. Checks, in order: magic, version, length, then the tag, then the
  // fields; then whether its stream is one kept for the sender and its number new.
  //
  // Streams: per sender, the newest stream and the one it replaced (a sender starts a new,
  // higher stream each time it starts) are kept; datagrams of any older stream are refused
  // (kStaleStream), so replayed old streams cannot push out the live one. Each stream has a
  // replay window of kDiodeReplayWindow datagram numbers: a number seen before, or older than
  // the window, is refused (kReplay).
  Status Feed(std::string_view datagram, std::vector<Message>* out);

  // The frame of a message this decoder completed was not stored (its verification failed, or
  // the store could not take it): the id counts as missing again and a later copy of it may
  // complete it. No-op for an id not completed, below the forgotten ranges, or of a stream no
  // longer kept.
  void Reopen(std::uint32_t sender, std::uint64_t stream_id, std::uint64_t message_id);

  // Streams of `sender` below `stream_id` are refused as stale (the highest stream seen before
  // a restart, from durable storage). Only raises the floor.
  void SetStreamFloor(std::uint32_t sender, std::uint64_t stream_id);

  // What a receiver keeps of a sender's newest stream across its own restarts (Record, then
  // Restore in the next process), so that the stream's completed ids are neither counted
  // missing nor completed again, its lost ones stay counted, and replays of its datagrams stay
  // refused.
  struct StreamRecord {
    std::uint64_t stream_id = 0;
    std::uint64_t highest_seq = 0;  // datagrams numbered up to here are refused after Restore
    std::uint64_t announced = 0;
    std::uint64_t final_through = 0;    // ids at or below are final (see DiodeDecoderLimits)
    std::uint64_t final_missing = 0;    // missing ids among the final ones
    std::uint64_t carried_missing = 0;  // missing ids of the sender's older streams
    std::vector<std::pair<std::uint64_t, std::uint64_t>> completed;  // ranges above final

    // One line of text: "diode-stream-record-1 <stream_id> <highest_seq> ... <a>-<b>,...".
    std::string Encode() const;
    // Parses Encode's text; nullopt when it is not a well-formed record.
    static std::optional<StreamRecord> Decode(std::string_view text);
  };
  // The newest stream of `sender`, leaving out the ids in `unsettled` (completed here but not
  // yet known to be stored: after a crash they count as missing); nullopt when none is kept.
  std::optional<StreamRecord> Record(std::uint32_t sender,
                                     const std::vector<std::uint64_t>& unsettled) const;
  // Starts `sender` from a record (at start-up, before any Feed): its stream is the newest,
  // older streams are stale (as SetStreamFloor), and datagrams of it numbered up to
  // highest_seq are refused as replays.
  void Restore(std::uint32_t sender, const StreamRecord& record);
  // The highest stream id accepted from `sender` (or its floor), 0 if none.
  std::uint64_t HighestStream(std::uint32_t sender) const;

  // Per stream: the highest message id announced (by data or heartbeat), and the ids below it
  // that are neither complete nor still possible to complete are "missing".
  struct StreamState {
    std::uint32_t sender = 0;
    std::uint64_t stream_id = 0;
    std::uint64_t announced = 0;          // highest message id known to exist
    std::uint64_t completed = 0;          // messages completed (and not reopened) so far
    std::uint64_t recovered_shards = 0;   // data shards rebuilt from parity
    std::uint64_t forgotten_missing = 0;  // missing ids among those made final (see limits)
  };
  std::vector<StreamState> Streams() const;
  // Message ids in [1, announced] not completed (pending or lost), at most 100,000, leaving
  // out the ids made final (see DiodeDecoderLimits).
  std::vector<std::uint64_t> Incomplete(std::uint32_t sender, std::uint64_t stream_id) const;
  // How many ids of the stream are missing: those Incomplete would list without its cap, plus
  // forgotten_missing.
  std::uint64_t MissingCount(std::uint32_t sender, std::uint64_t stream_id) const;
  // Missing ids over every stream kept, plus those of streams dropped for newer ones.
  std::uint64_t MissingCount() const;
  // Bytes currently held for partial messages (shards and decoded blocks, plus a fixed
  // per-block overhead); kept at or below max_pending_bytes after every Feed.
  std::size_t pending_bytes() const;
  // Data shards rebuilt from parity, over every stream ever seen (dropped ones included).
  std::uint64_t recovered_shards() const;
  // Streams whose state was dropped for a newer stream of the same sender.
  std::uint64_t streams_dropped() const;
  // Datagrams refused for `reason`.
  std::uint64_t rejected(DiodeReject reason) const;
  // Completed ids counted missing again by Reopen.
  std::uint64_t reopened() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace relay::transports
