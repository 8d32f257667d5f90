#include "event/event.h"

#include <msgpack.hpp>

#include <algorithm>

namespace relay {
namespace {

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

// The object's strings and bins point into `bytes` (not copied into its zone): every caller
// copies what it keeps before `bytes` goes.
msgpack::object_handle Unpack(std::string_view bytes, Status* status) {
  msgpack::object_handle handle;
  try {
    std::size_t offset = 0;
    auto always_ref = [](msgpack::type::object_type, std::size_t, void*) { return true; };
    handle =
        msgpack::unpack(bytes.data(), bytes.size(), offset, always_ref, nullptr, CountLimit(bytes));
    if (offset != bytes.size()) *status = Status::Error("trailing bytes after the msgpack value");
  } catch (const std::exception& e) {
    *status = Status::Error(std::string("malformed msgpack: ") + e.what());
  }
  return handle;
}

// The fields of an event's core, in order (docs/wire-format.md, "Event"): everything the origin
// signs. The chunk follows for a kFileChunk event.
constexpr std::uint32_t kCoreFields = 12;
constexpr std::uint32_t kChunkCoreFields = 13;
// The envelope: [version, kind, core (bin), hops].
constexpr std::uint32_t kEnvelopeFields = 4;

// Reads the big-endian integer of `width` bytes at `at` (a msgpack length); false if cut off.
bool ReadBigEndian(std::string_view bytes, std::size_t at, std::size_t width, std::size_t* out) {
  if (at > bytes.size() || width > bytes.size() - at) return false;
  *out = 0;
  for (std::size_t i = 0; i < width; ++i)
    *out = (*out << 8) | static_cast<unsigned char>(bytes[at + i]);
  return true;
}

// Walks the hop list (a msgpack array of strings at the start of `h`) by hand, calling
// `hop(view)` for each entry, and returns the offset just past the array. Read by hand rather
// than unpacked: the inbound path reads the hops of every event it receives. Errors name what
// is wrong, like the strict accessors.
template <typename OnHop>
Result<std::size_t> WalkHops(std::string_view h, OnHop&& hop) {
  const auto u8 = [&](std::size_t i) { return static_cast<unsigned char>(h[i]); };
  const auto cut = [] { return Status::Error("field 'hops' is cut off"); };
  if (h.empty()) return cut();
  std::size_t n = 0, pos = 1;
  if (u8(0) >= 0x90 && u8(0) <= 0x9f) {
    n = u8(0) & 0x0f;
  } else if (u8(0) == 0xdc || u8(0) == 0xdd) {
    pos = u8(0) == 0xdc ? 3 : 5;
    if (!ReadBigEndian(h, 1, pos - 1, &n)) return cut();
  } else {
    return Status::Error("field 'hops' is not an array");
  }
  if (n > kMaxHops)
    return Status::Error("field 'hops' has " + std::to_string(n) +
                         " entries, more than the limit " + std::to_string(kMaxHops));
  for (std::size_t i = 0; i < n; ++i) {
    if (pos >= h.size()) return cut();
    std::size_t len = 0, head = 1;
    const unsigned t = u8(pos);
    if (t >= 0xa0 && t <= 0xbf) {
      len = t & 0x1f;
    } else if (t == 0xd9 || t == 0xda || t == 0xdb) {
      head = t == 0xd9 ? 2 : t == 0xda ? 3 : 5;
      if (!ReadBigEndian(h, pos + 1, head - 1, &len)) return cut();
    } else {
      return Status::Error("field 'hops[]' is not a string");
    }
    if (len > h.size() - pos - head) return cut();
    hop(h.substr(pos + head, len));
    pos += head + len;
  }
  return pos;
}

// Decodes the core (a msgpack array, see kCoreFields) of an event whose envelope says `kind`.
Result<Event> DecodeCoreObject(const msgpack::object& o, std::uint64_t envelope_kind) {
  if (o.type != msgpack::type::ARRAY) return Status::Error("event core is not a msgpack array");
  const auto& a = o.via.array;
  const std::uint32_t want = envelope_kind == static_cast<std::uint64_t>(EventKind::kFileChunk)
                                 ? kChunkCoreFields
                                 : kCoreFields;
  if (a.size != want)
    return Status::Error("event core has " + std::to_string(a.size) + " fields, expected " +
                         std::to_string(want));
  Status s;
  std::uint64_t kind = 0;
  if (!(s = WantUint(a.ptr[3], "kind", &kind))) return s;
  if (kind != envelope_kind)
    return Status::Error("field 'kind' of the core (" + std::to_string(kind) +
                         ") differs from the envelope's (" + std::to_string(envelope_kind) + ")");
  Event e;
  if (!(s = WantStr(a.ptr[0], "id", &e.id))) return s;
  if (!(s = WantStr(a.ptr[1], "origin_site", &e.origin_site))) return s;
  if (!(s = WantUint(a.ptr[2], "origin_seq", &e.origin_seq))) return s;
  e.kind = static_cast<EventKind>(kind);
  if (!(s = WantStr(a.ptr[4], "channel", &e.channel))) return s;
  if (!(s = WantStr(a.ptr[5], "author", &e.author))) return s;
  if (!(s = WantStr(a.ptr[6], "text", &e.text))) return s;
  if (!(s = WantStr(a.ptr[7], "thread", &e.thread))) return s;
  if (!(s = WantStr(a.ptr[8], "ref", &e.ref))) return s;
  if (!(s = WantInt(a.ptr[9], "created_at", &e.created_at_ms))) return s;
  const msgpack::object& props = a.ptr[10];
  if (props.type != msgpack::type::MAP) return Status::Error("field 'props' is not a map");
  for (std::uint32_t i = 0; i < props.via.map.size; ++i) {
    std::string k, v;
    if (!(s = WantStr(props.via.map.ptr[i].key, "props key", &k))) return s;
    if (!(s = WantStr(props.via.map.ptr[i].val, "props value", &v))) return s;
    e.props.emplace_back(std::move(k), std::move(v));
  }
  const msgpack::object& files = a.ptr[11];
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
    const msgpack::object& c = a.ptr[12];
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

namespace {

// The core's fields (kCoreFields, plus the chunk) packed into `buf`.
void PackCore(const Event& e, msgpack::sbuffer* buf) {
  const bool chunk = e.kind == EventKind::kFileChunk;
  msgpack::packer<msgpack::sbuffer> pk(*buf);
  pk.pack_array(chunk ? kChunkCoreFields : kCoreFields);
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
}

// A msgpack output stream that appends to a std::string.
struct StringSink {
  std::string* out;
  void write(const char* data, std::size_t size) { out->append(data, size); }
};

// Appends the envelope [version, kind, core, hops] to *out, packed straight into it; returns
// where the core lies in *out.
template <typename Hops>
std::string_view AppendEnvelope(EventKind kind, std::string_view core, const Hops& hops,
                                std::string* out) {
  out->reserve(out->size() + 16 + core.size() + 8 + 34 * hops.size());
  StringSink sink{out};
  msgpack::packer<StringSink> pk(sink);
  pk.pack_array(kEnvelopeFields);  // fixarray: 0x94
  pk.pack_uint8(kEventFormatVersion);
  pk.pack_uint8(static_cast<std::uint8_t>(kind));
  pk.pack_bin(static_cast<std::uint32_t>(core.size()));
  const std::size_t core_at = out->size();
  pk.pack_bin_body(core.data(), static_cast<std::uint32_t>(core.size()));
  pk.pack_array(static_cast<std::uint32_t>(hops.size()));
  for (const auto& h : hops) pk.pack(std::string_view(h));
  return std::string_view(*out).substr(core_at, core.size());
}

}  // namespace

std::string_view OriginOfEventId(std::string_view id) {
  const auto colon = id.rfind(':');
  return colon == std::string_view::npos ? std::string_view() : id.substr(0, colon);
}

std::string_view EncodeEvent(const Event& e, std::string* out) {
  const bool chunk = e.kind == EventKind::kFileChunk;
  msgpack::sbuffer core(256 + e.text.size() + (chunk ? e.chunk.data.size() : 0));
  PackCore(e, &core);
  return AppendEnvelope(e.kind, std::string_view(core.data(), core.size()), e.hops, out);
}

Result<EventEnvelope> ParseEventEnvelope(std::string_view bytes) {
  // Read by hand rather than unpacked: the shipper and the inbound path call this per event.
  auto fail = [](const std::string& what) { return Status::Error("event: " + what); };
  if (bytes.size() < 3) return fail("truncated (" + std::to_string(bytes.size()) + " bytes)");
  const auto u8 = [&](std::size_t i) { return static_cast<unsigned char>(bytes[i]); };
  if ((u8(0) == 0x9e || u8(0) == 0x9f) && u8(1) == 1)  // a flat array of 14/15: version 1
    return fail("event format version 1 is not supported (this relay supports version " +
                std::to_string(kEventFormatVersion) + ")");
  if (u8(0) != 0x90 + kEnvelopeFields)
    return fail("not an event envelope (first byte " + std::to_string(u8(0)) + ", want " +
                std::to_string(0x90 + kEnvelopeFields) + ")");
  if (u8(1) != kEventFormatVersion)
    return fail("event format version " + std::to_string(u8(1)) +
                " is not supported (this relay supports version " +
                std::to_string(kEventFormatVersion) + ")");
  const unsigned kind = u8(2);
  if (kind < 1 || kind > kLastKind) return fail("unknown event kind " + std::to_string(kind));
  std::size_t pos = 3, len = 0, width = 0;
  if (pos >= bytes.size()) return fail("truncated before the core");
  switch (u8(pos)) {
    case 0xc4:
      width = 1;
      break;
    case 0xc5:
      width = 2;
      break;
    case 0xc6:
      width = 4;
      break;
    default:
      return fail("field 'core' is not bin");
  }
  if (!ReadBigEndian(bytes, pos + 1, width, &len)) return fail("truncated in the core's length");
  pos += 1 + width;
  if (len > bytes.size() - pos) return fail("core of " + std::to_string(len) + " bytes is cut off");
  EventEnvelope env;
  env.kind = static_cast<EventKind>(kind);
  env.core = bytes.substr(pos, len);
  env.hops = bytes.substr(pos + len);
  if (env.hops.empty()) return fail("missing field 'hops'");
  return env;
}

Result<std::string_view> LastHop(const EventEnvelope& envelope) {
  std::string_view last;
  if (!WalkHops(envelope.hops, [&](std::string_view hop) { last = hop; }))
    return Status::Error("event: field 'hops' is not an array of strings");
  return last;
}

void EncodeEventEnvelope(EventKind kind, std::string_view core,
                         const std::vector<std::string>& hops, std::string* out) {
  AppendEnvelope(kind, core, hops, out);
}

Result<Event> DecodeEvent(std::string_view bytes, std::string_view* core_out) {
  auto env = ParseEventEnvelope(bytes);
  if (!env) return env.status();
  std::vector<std::string> hops;
  auto hops_end = WalkHops(env->hops, [&](std::string_view hop) { hops.emplace_back(hop); });
  if (!hops_end) return hops_end.status().Wrap("event");
  if (*hops_end != env->hops.size())
    return Status::Error("event hops: trailing bytes after the msgpack value");
  Status status;
  msgpack::object_handle core = Unpack(env->core, &status);
  if (!status) return status.Wrap("event core");
  auto r = DecodeCoreObject(core.get(), static_cast<std::uint64_t>(env->kind));
  if (!r) return r.status().Wrap("event");
  r->hops = std::move(hops);
  if (core_out != nullptr) *core_out = env->core;
  return r;
}

namespace {
void PutBe(std::string* out, std::uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; --i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
}  // namespace

FramePayloadWriter::FramePayloadWriter(std::size_t reserve_bytes) {
  buf_.reserve(reserve_bytes + 6);
  buf_.push_back(static_cast<char>(0x92));  // [events, attestations]
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

void FramePayloadWriter::AddAttestation(std::string_view attestation) {
  attestations_.push_back(static_cast<char>(0xc6));  // bin32
  PutBe(&attestations_, attestation.size(), 4);
  attestations_.append(attestation);
  ++attestation_count_;
}

std::string FramePayloadWriter::Finish() {
  for (int i = 0; i < 4; ++i)
    buf_[2 + static_cast<std::size_t>(i)] = static_cast<char>((count_ >> (8 * (3 - i))) & 0xff);
  buf_.push_back(static_cast<char>(0xdd));
  PutBe(&buf_, attestation_count_, 4);
  buf_.append(attestations_);
  std::string out = std::move(buf_);
  buf_.clear();
  attestations_.clear();
  count_ = attestation_count_ = 0;
  return out;
}

std::string EncodeFramePayload(const std::vector<FramedEvent>& events,
                               const std::vector<std::string_view>& attestations) {
  std::size_t size = 0;
  for (const auto& e : events) size += e.encoded.size() + 16;
  FramePayloadWriter w(size);
  for (const auto& e : events) w.Add(e.seq, e.encoded);
  for (const auto& a : attestations) w.AddAttestation(a);
  return w.Finish();
}

Result<FramePayload> DecodeFramePayload(std::string_view bytes) {
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
  const msgpack::object& top = h.get();
  if (top.type != msgpack::type::ARRAY || top.via.array.size != 2)
    return Status::Error("frame payload is not an [events, attestations] array");
  const msgpack::object& o = top.via.array.ptr[0];
  const msgpack::object& att = top.via.array.ptr[1];
  if (o.type != msgpack::type::ARRAY)
    return Status::Error("frame payload: events are not an array");
  if (att.type != msgpack::type::ARRAY)
    return Status::Error("frame payload: attestations are not an array");
  FramePayload out;
  out.events.reserve(o.via.array.size);
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
    out.events.push_back(fe);
  }
  out.attestations.reserve(att.via.array.size);
  for (std::uint32_t i = 0; i < att.via.array.size; ++i) {
    const msgpack::object& bin = att.via.array.ptr[i];
    if (bin.type != msgpack::type::BIN)
      return Status::Error("frame payload attestation " + std::to_string(i) + " is not bin");
    out.attestations.emplace_back(bin.via.bin.ptr, bin.via.bin.size);
  }
  return out;
}

}  // namespace relay
