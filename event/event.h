#pragma once
// The event model: one chat operation travelling between sites.
//
// An event has a globally unique id "<origin_site>:<origin_seq>". It is encoded with msgpack as a
// versioned envelope [version, kind, core, hops] (see docs/wire-format.md, "Event"): the core
// holds every field but the hop list, as the bytes the origin signs (crypto/origin.h), so a
// transit site appends itself to the hops without touching them. DecodeEvent is strict: wrong
// types, wrong field counts, an unknown version or kind are errors that name the field.

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "base/status.h"

namespace relay {

enum class EventKind : std::uint8_t {
  kPost = 1,
  kEdit = 2,
  kDelete = 3,
  kReactionAdd = 4,
  kReactionRemove = 5,
  // One piece of a large attachment (see FileChunk). Internal: never delivered to a sink, never
  // accepted from the ingest API; the post that references the blob follows it in the log.
  kFileChunk = 6,
};

// "post", "edit", ..., "file_chunk" as used in the JSONL sink and logs.
const char* EventKindName(EventKind kind);
// Parses the name of a kind a producer may send (post .. reaction_remove); false otherwise,
// also for "file_chunk".
bool ParseEventKind(std::string_view name, EventKind* kind);

// Changed in wire version 2: the core/hops envelope (version 1 was one flat array).
inline constexpr std::uint8_t kEventFormatVersion = 2;
// An event's hop list may hold at most this many sites; longer paths are dropped as loops.
inline constexpr std::size_t kMaxHops = 16;

// Large attachments travel as a blob: its bytes are cut into chunks of at most kMaxChunkBytes,
// each carried by its own kFileChunk event committed before the post that references the blob.
inline constexpr std::size_t kMaxChunkBytes = 1u << 20;
// A blob may not be larger than this (4 GiB - 1: sizes and offsets stay u32-friendly).
inline constexpr std::uint64_t kMaxBlobBytes = 0xffffffffu;
// Length of a blob id (lowercase hex) and of its BLAKE2b-256 content hash (raw bytes).
inline constexpr std::size_t kBlobIdChars = 32;
inline constexpr std::size_t kBlobHashBytes = 32;

// A file carried with an event (e.g. a chat attachment): either inline (`data`, `blob_id`
// empty) or by reference to a blob carried in kFileChunk events (`blob_id` set, `data` empty,
// `size` and `blake2b` describe the whole file).
struct Attachment {
  std::string name;
  std::string mime_type;
  std::string data;
  std::uint64_t size = 0;  // blob attachments only
  std::string blake2b;     // blob attachments only: BLAKE2b-256 of the content, 32 bytes
  std::string blob_id;     // blob attachments only: kBlobIdChars lowercase hex digits

  static Attachment Inline(std::string name, std::string mime_type, std::string data) {
    Attachment a;
    a.name = std::move(name);
    a.mime_type = std::move(mime_type);
    a.data = std::move(data);
    return a;
  }
  bool is_blob() const { return !blob_id.empty(); }
  bool operator==(const Attachment&) const = default;
};

// The payload of a kFileChunk event: bytes [offset, offset + data.size()) of blob `blob_id`,
// whose total size is `total_size`. The decoder guarantees 0 < data.size() <= kMaxChunkBytes,
// offset + data.size() <= total_size <= kMaxBlobBytes and a well-formed blob id.
struct FileChunk {
  std::string blob_id;
  std::uint64_t offset = 0;
  std::uint64_t total_size = 0;
  std::string data;
  bool operator==(const FileChunk&) const = default;
};

// True for a blob id as the wire allows it: kBlobIdChars of [0-9a-f]. Safe as a file name.
bool IsValidBlobId(std::string_view id);

struct Event {
  std::string id;           // "<origin_site>:<origin_seq>", globally unique
  std::string origin_site;  // site whose relay first accepted the event
  std::uint64_t origin_seq = 0;
  EventKind kind = EventKind::kPost;
  std::string channel;
  std::string author;
  std::string text;
  std::string thread;  // id of the thread root event, or empty
  std::string ref;     // for edit/delete/reaction: id of the event it applies to, or empty
  std::int64_t created_at_ms = 0;  // Unix milliseconds at the origin
  std::vector<std::string> hops;   // sites the event passed through, origin first
  std::vector<std::pair<std::string, std::string>> props;  // free-form string properties
  std::vector<Attachment> files;                           // attachments (post events)
  FileChunk chunk;  // kFileChunk events only; empty otherwise

  bool operator==(const Event&) const = default;
};

// Builds the globally unique id of an event.
std::string MakeEventId(std::string_view origin_site, std::uint64_t origin_seq);
// The origin site named by an event id ("europe" for "europe:42"); empty when it has no ':'.
std::string_view OriginOfEventId(std::string_view id);

// msgpack encoding of one event (appended to *out) and strict decoding. The encoder returns
// where the core lies in *out (valid until *out changes) and, with `core` set, the decoder where
// it lies in `bytes`: the core is what the origin signs (its digest, crypto::EventDigest).
std::string_view EncodeEvent(const Event& event, std::string* out);
Result<Event> DecodeEvent(std::string_view bytes, std::string_view* core = nullptr);

// The outer layer of an encoded event, read without decoding the core (cheap: the shipper and
// the inbound path look at every event). Views point into the encoded bytes.
struct EventEnvelope {
  EventKind kind = EventKind::kPost;
  std::string_view core;  // the signed fields, a msgpack array (see docs/wire-format.md)
  std::string_view hops;  // the msgpack array of hops (not validated here)
};
Result<EventEnvelope> ParseEventEnvelope(std::string_view bytes);
// The last site in an envelope's hops (the peer an event was received from), read without
// decoding the event; empty for an empty list.
Result<std::string_view> LastHop(const EventEnvelope& envelope);
// Encodes an envelope around an existing core: a transit site forwards an event with itself
// added to `hops`, the origin's bytes (and so its signature) unchanged.
void EncodeEventEnvelope(EventKind kind, std::string_view core,
                         const std::vector<std::string>& hops, std::string* out);

// The plaintext payload of a frame: a msgpack array [events, attestations]. `events` is an
// array of [log sequence, encoded event] pairs, the sequence being the sender's outbound-log
// position of that event for this peer; `attestations` holds the origin signatures
// (crypto/origin.h) that cover the events, each once.
struct FramedEvent {
  std::uint64_t seq = 0;
  std::string_view encoded;  // an EncodeEvent() result; views into the caller's buffer
};
struct FramePayload {
  std::vector<FramedEvent> events;
  std::vector<std::string_view> attestations;  // views into the caller's buffer
};
std::string EncodeFramePayload(const std::vector<FramedEvent>& events,
                               const std::vector<std::string_view>& attestations = {});

// Builds a frame payload one event at a time, copying each encoded event once. It writes the
// fixed-width msgpack forms (array32, uint64, bin32), which every msgpack decoder accepts.
class FramePayloadWriter {
 public:
  explicit FramePayloadWriter(std::size_t reserve_bytes = 0);
  void Add(std::uint64_t seq, std::string_view encoded_event);
  void AddAttestation(std::string_view attestation);
  std::uint32_t count() const { return count_; }
  std::size_t size() const { return buf_.size() + attestations_.size(); }
  // The finished payload; the writer is empty afterwards.
  std::string Finish();

 private:
  std::string buf_;
  std::string attestations_;
  std::uint32_t count_ = 0;
  std::uint32_t attestation_count_ = 0;
};
// Views in the result point into `bytes`, which must outlive them.
Result<FramePayload> DecodeFramePayload(std::string_view bytes);

}  // namespace relay
