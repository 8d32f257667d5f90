#include "relay/event.h"

#include <msgpack.hpp>

#include <algorithm>

namespace relay {
namespace {

constexpr std::uint32_t kEventFields = 14;
// A kFileChunk event has one more field, the chunk. Other kinds keep 14 fields, so their bytes
// are what relays without chunk support expect.
constexpr std::uint32_t kChunkEventFields = 15;

const char* const kKindNames[] = {"post",      "edit", "delete", "reaction_add", "reaction_remove",
                                  "file_chunk"};
constexpr std::uint64_t kLastKind = 6;
constexpr std::size_t kProducerKinds = 5;  // kinds a producer may name (not file_chunk)

// Strict accessors: each names the field that is wrong.
Status WantStr(const msgpack::object& o, const char* field, std::string* out) {
  if (o.type != msgpack::type::STR)
    return Status::Error(std::string("field '") + field + "' is not a string");
  out->assign(o.via.str.ptr, o.via.str.size);
  return Status::Ok();
}

Status WantUint(const msgpack::object& o, const char* field, std::uint64_t* out) {
  if (o.type != msgpack::type::POSITIVE_INTEGER)
    return Status::Error(std::string("field '") + field + "' is not an unsigned integer");
  *out = o.via.u64;
  return Status::Ok();
}

Status WantInt(const msgpack::object& o, const char* field, std::int64_t* out) {
  if (o.type == msgpack::type::POSITIVE_INTEGER) {
    if (o.via.u64 > static_cast<std::uint64_t>(INT64_MAX))
      return Status::Error(std::string("field '") + field + "' is out of range");
    *out = static_cast<std::int64_t>(o.via.u64);
    return Status::Ok();
  }
  if (o.type == msgpack::type::NEGATIVE_INTEGER) {
    *out = o.via.i64;
    return Status::Ok();
  }
  return Status::Error(std::string("field '") + field + "' is not an integer");
}

// Every array element takes at least one byte and every map entry two, so a container that
// declares more elements than there are input bytes is malformed; refusing it up front keeps
// msgpack from allocating for the declared count (a few bytes could ask for gigabytes).
msgpack::unpack_limit CountLimit(std::string_view bytes) {
  const auto n = static_cast<std::size_t>(std::min<std::uint64_t>(bytes.size(), 0xffffffffu));
  return msgpack::unpack_limit(n, n);
}

msgpack::object_handle Unpack(std::string_view bytes, Status* status) {
  msgpack::object_handle handle;
  try {
    std::size_t offset = 0;
    handle =
        msgpack::unpack(bytes.data(), bytes.size(), offset, nullptr, nullptr, CountLimit(bytes));
    if (offset != bytes.size()) *status = Status::Error("trailing bytes after the msgpack value");
  } catch (const std::exception& e) {
    *status = Status::Error(std::string("malformed msgpack: ") + e.what());
  }
  return handle;
}

Result<Event> DecodeEventObject(const msgpack::object& o) {
  if (o.type != msgpack::type::ARRAY) return Status::Error("event is not a msgpack array");
  const auto& a = o.via.array;
  if (a.size < 1) return Status::Error("event array is empty");
  std::uint64_t version = 0;
  if (Status s = WantUint(a.ptr[0], "version", &version); !s) return s;
  if (version != kEventFormatVersion)
    return Status::Error("unsupported event format version " + std::to_string(version));
  // The kind decides the field count, so it is read first (when there is one).
  std::uint64_t kind = 0;
  Status s;
  if (a.size > 4) {
    if (!(s = WantUint(a.ptr[4], "kind", &kind))) return s;
    if (kind < 1 || kind > kLastKind)
      return Status::Error("unknown event kind " + std::to_string(kind));
  }
  const std::uint32_t want =
      kind == static_cast<std::uint64_t>(EventKind::kFileChunk) ? kChunkEventFields : kEventFields;
  if (a.size != want)
    return Status::Error("event has " + std::to_string(a.size) + " fields, expected " +
                         std::to_string(want));
  Event e;
  if (!(s = WantStr(a.ptr[1], "id", &e.id))) return s;
  if (!(s = WantStr(a.ptr[2], "origin_site", &e.origin_site))) return s;
  if (!(s = WantUint(a.ptr[3], "origin_seq", &e.origin_seq))) return s;
  e.kind = static_cast<EventKind>(kind);
  if (!(s = WantStr(a.ptr[5], "channel", &e.channel))) return s;
  if (!(s = WantStr(a.ptr[6], "author", &e.author))) return s;
  if (!(s = WantStr(a.ptr[7], "text", &e.text))) return s;
  if (!(s = WantStr(a.ptr[8], "thread", &e.thread))) return s;
  if (!(s = WantStr(a.ptr[9], "ref", &e.ref))) return s;
  if (!(s = WantInt(a.ptr[10], "created_at", &e.created_at_ms))) return s;
  const msgpack::object& hops = a.ptr[11];
  if (hops.type != msgpack::type::ARRAY) return Status::Error("field 'hops' is not an array");
  if (hops.via.array.size > kMaxHops)
    return Status::Error("field 'hops' has " + std::to_string(hops.via.array.size) +
                         " entries, more than the limit " + std::to_string(kMaxHops));
  for (std::uint32_t i = 0; i < hops.via.array.size; ++i) {
    std::string hop;
    if (!(s = WantStr(hops.via.array.ptr[i], "hops[]", &hop))) return s;
    e.hops.push_back(std::move(hop));
  }
  const msgpack::object& props = a.ptr[12];
  if (props.type != msgpack::type::MAP) return Status::Error("field 'props' is not a map");
  for (std::uint32_t i = 0; i < props.via.map.size; ++i) {
    std::string k, v;
    if (!(s = WantStr(props.via.map.ptr[i].key, "props key", &k))) return s;
    if (!(s = WantStr(props.via.map.ptr[i].val, "props value", &v))) return s;
    e.props.emplace_back(std::move(k), std::move(v));
  }
  const msgpack::object& files = a.ptr[13];
  if (files.type != msgpack::type::ARRAY) return Status::Error("field 'files' is not an array");
  for (std::uint32_t i = 0; i < files.via.array.size; ++i) {
    const msgpack::object& f = files.via.array.ptr[i];
    if (f.type != msgpack::type::ARRAY || (f.via.array.size != 3 && f.via.array.size != 6))
      return Status::Error("field 'files[" + std::to_string(i) +
                           "]' is not a [name, type, data] or [name, type, data, size, "
                           "blake2b, blob_id]");
    const msgpack::object* fa = f.via.array.ptr;
    Attachment at;
    if (!(s = WantStr(fa[0], "files[].name", &at.name))) return s;
    if (!(s = WantStr(fa[1], "files[].mime_type", &at.mime_type))) return s;
    if (fa[2].type != msgpack::type::BIN) return Status::Error("field 'files[].data' is not bin");
    at.data.assign(fa[2].via.bin.ptr, fa[2].via.bin.size);
    if (f.via.array.size == 6) {
      if (!(s = WantUint(fa[3], "files[].size", &at.size))) return s;
      if (at.size > kMaxBlobBytes)
        return Status::Error("field 'files[].size' is " + std::to_string(at.size) +
                             ", more than the limit " + std::to_string(kMaxBlobBytes));
      if (fa[4].type != msgpack::type::BIN || fa[4].via.bin.size != kBlobHashBytes)
        return Status::Error("field 'files[].blake2b' is not 32 bytes of bin");
      at.blake2b.assign(fa[4].via.bin.ptr, fa[4].via.bin.size);
      if (!(s = WantStr(fa[5], "files[].blob_id", &at.blob_id))) return s;
      if (!IsValidBlobId(at.blob_id))
        return Status::Error("field 'files[].blob_id' is not " + std::to_string(kBlobIdChars) +
                             " lowercase hex digits");
      if (!at.data.empty()) return Status::Error("field 'files[].data' of a blob is not empty");
    }
    e.files.push_back(std::move(at));
  }
  if (e.kind == EventKind::kFileChunk) {
    const msgpack::object& c = a.ptr[14];
    if (c.type != msgpack::type::ARRAY || c.via.array.size != 4)
      return Status::Error("field 'chunk' is not a [blob_id, offset, total_size, data]");
    const msgpack::object* ca = c.via.array.ptr;
    FileChunk& ch = e.chunk;
    if (!(s = WantStr(ca[0], "chunk.blob_id", &ch.blob_id))) return s;
    if (!IsValidBlobId(ch.blob_id))
      return Status::Error("field 'chunk.blob_id' is not " + std::to_string(kBlobIdChars) +
                           " lowercase hex digits");
    if (!(s = WantUint(ca[1], "chunk.offset", &ch.offset))) return s;
    if (!(s = WantUint(ca[2], "chunk.total_size", &ch.total_size))) return s;
    if (ca[3].type != msgpack::type::BIN) return Status::Error("field 'chunk.data' is not bin");
    const std::uint64_t len = ca[3].via.bin.size;
    if (len == 0 || len > kMaxChunkBytes)
      return Status::Error("field 'chunk.data' has " + std::to_string(len) + " bytes, want 1 to " +
                           std::to_string(kMaxChunkBytes));
    if (ch.total_size > kMaxBlobBytes || ch.offset > ch.total_size ||
        len > ch.total_size - ch.offset)
      return Status::Error("field 'chunk': bytes " + std::to_string(ch.offset) + "+" +
                           std::to_string(len) + " do not fit a blob of " +
                           std::to_string(ch.total_size) + " bytes (at most " +
                           std::to_string(kMaxBlobBytes) + ")");
    ch.data.assign(ca[3].via.bin.ptr, len);
  }
  if (e.id != MakeEventId(e.origin_site, e.origin_seq))
    return Status::Error("event id '" + e.id + "' does not match its origin '" + e.origin_site +
                         "' and sequence " + std::to_string(e.origin_seq));
  return e;
}

}  // namespace

const char* EventKindName(EventKind kind) {
  auto i = static_cast<std::size_t>(kind);
  return (i >= 1 && i <= kLastKind) ? kKindNames[i - 1] : "unknown";
}

bool IsValidBlobId(std::string_view id) {
  if (id.size() != kBlobIdChars) return false;
  for (char c : id)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  return true;
}

bool ParseEventKind(std::string_view name, EventKind* kind) {
  for (std::size_t i = 0; i < kProducerKinds; ++i) {
    if (name == kKindNames[i]) {
      *kind = static_cast<EventKind>(i + 1);
      return true;
    }
  }
  return false;
}

std::string MakeEventId(std::string_view origin_site, std::uint64_t origin_seq) {
  std::string id;
  id.reserve(origin_site.size() + 21);
  id.append(origin_site);
  id.push_back(':');
  id.append(std::to_string(origin_seq));
  return id;
}

void EncodeEvent(const Event& e, std::string* out) {
  const bool chunk = e.kind == EventKind::kFileChunk;
  msgpack::sbuffer buf(256 + e.text.size() + (chunk ? e.chunk.data.size() : 0));
  msgpack::packer<msgpack::sbuffer> pk(buf);
  pk.pack_array(chunk ? kChunkEventFields : kEventFields);
  pk.pack_uint8(kEventFormatVersion);
  pk.pack(e.id);
  pk.pack(e.origin_site);
  pk.pack_uint64(e.origin_seq);
  pk.pack_uint8(static_cast<std::uint8_t>(e.kind));
  pk.pack(e.channel);
  pk.pack(e.author);
  pk.pack(e.text);
  pk.pack(e.thread);
  pk.pack(e.ref);
  pk.pack_int64(e.created_at_ms);
  pk.pack_array(static_cast<std::uint32_t>(e.hops.size()));
  for (const auto& h : e.hops) pk.pack(h);
  pk.pack_map(static_cast<std::uint32_t>(e.props.size()));
  for (const auto& [k, v] : e.props) {
    pk.pack(k);
    pk.pack(v);
  }
  pk.pack_array(static_cast<std::uint32_t>(e.files.size()));
  for (const auto& f : e.files) {
    pk.pack_array(f.is_blob() ? 6 : 3);
    pk.pack(f.name);
    pk.pack(f.mime_type);
    pk.pack_bin(static_cast<std::uint32_t>(f.data.size()));
    pk.pack_bin_body(f.data.data(), static_cast<std::uint32_t>(f.data.size()));
    if (f.is_blob()) {
      pk.pack_uint64(f.size);
      pk.pack_bin(static_cast<std::uint32_t>(f.blake2b.size()));
      pk.pack_bin_body(f.blake2b.data(), static_cast<std::uint32_t>(f.blake2b.size()));
      pk.pack(f.blob_id);
    }
  }
  if (chunk) {
    pk.pack_array(4);
    pk.pack(e.chunk.blob_id);
    pk.pack_uint64(e.chunk.offset);
    pk.pack_uint64(e.chunk.total_size);
    pk.pack_bin(static_cast<std::uint32_t>(e.chunk.data.size()));
    pk.pack_bin_body(e.chunk.data.data(), static_cast<std::uint32_t>(e.chunk.data.size()));
  }
  out->append(buf.data(), buf.size());
}

Result<Event> DecodeEvent(std::string_view bytes) {
  Status status;
  msgpack::object_handle h = Unpack(bytes, &status);
  if (!status) return status.Wrap("event");
  auto r = DecodeEventObject(h.get());
  if (!r) return r.status().Wrap("event");
  return r;
}

namespace {
void PutBe(std::string* out, std::uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; --i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
}  // namespace

FramePayloadWriter::FramePayloadWriter(std::size_t reserve_bytes) {
  buf_.reserve(reserve_bytes + 5);
  buf_.push_back(static_cast<char>(0xdd));  // array32; the count is patched by Finish()
  PutBe(&buf_, 0, 4);
}

void FramePayloadWriter::Add(std::uint64_t seq, std::string_view encoded_event) {
  buf_.push_back(static_cast<char>(0x92));  // fixarray of 2
  buf_.push_back(static_cast<char>(0xcf));  // uint64
  PutBe(&buf_, seq, 8);
  buf_.push_back(static_cast<char>(0xc6));  // bin32
  PutBe(&buf_, encoded_event.size(), 4);
  buf_.append(encoded_event);
  ++count_;
}

std::string FramePayloadWriter::Finish() {
  for (int i = 0; i < 4; ++i)
    buf_[1 + static_cast<std::size_t>(i)] = static_cast<char>((count_ >> (8 * (3 - i))) & 0xff);
  std::string out = std::move(buf_);
  buf_.clear();
  count_ = 0;
  return out;
}

std::string EncodeFramePayload(const std::vector<FramedEvent>& events) {
  std::size_t size = 0;
  for (const auto& e : events) size += e.encoded.size() + 16;
  FramePayloadWriter w(size);
  for (const auto& e : events) w.Add(e.seq, e.encoded);
  return w.Finish();
}

Result<std::vector<FramedEvent>> DecodeFramePayload(std::string_view bytes) {
  // msgpack's unpack references (does not copy) BIN bodies when the reference function says so.
  msgpack::object_handle h;
  try {
    std::size_t offset = 0;
    auto always_ref = [](msgpack::type::object_type, std::size_t, void*) { return true; };
    h = msgpack::unpack(bytes.data(), bytes.size(), offset, always_ref, nullptr, CountLimit(bytes));
    if (offset != bytes.size()) return Status::Error("frame payload: trailing bytes");
  } catch (const std::exception& e) {
    return Status::Error(std::string("frame payload: malformed msgpack: ") + e.what());
  }
  const msgpack::object& o = h.get();
  if (o.type != msgpack::type::ARRAY) return Status::Error("frame payload is not an array");
  std::vector<FramedEvent> out;
  out.reserve(o.via.array.size);
  std::uint64_t last = 0;
  for (std::uint32_t i = 0; i < o.via.array.size; ++i) {
    const msgpack::object& item = o.via.array.ptr[i];
    if (item.type != msgpack::type::ARRAY || item.via.array.size != 2)
      return Status::Error("frame payload entry " + std::to_string(i) +
                           " is not a [seq, event] pair");
    FramedEvent fe;
    if (Status s = WantUint(item.via.array.ptr[0], "seq", &fe.seq); !s)
      return s.Wrap("frame payload entry " + std::to_string(i));
    if (fe.seq <= last)
      return Status::Error("frame payload entry " + std::to_string(i) + ": sequence " +
                           std::to_string(fe.seq) + " is not increasing");
    last = fe.seq;
    const msgpack::object& bin = item.via.array.ptr[1];
    if (bin.type != msgpack::type::BIN)
      return Status::Error("frame payload entry " + std::to_string(i) + ": event is not bin");
    // With always_ref, bin bodies point into `bytes`.
    fe.encoded = std::string_view(bin.via.bin.ptr, bin.via.bin.size);
    out.push_back(fe);
  }
  return out;
}

}  // namespace relay
