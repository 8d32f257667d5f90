#include "crypto/bundle.h"

#include <sodium.h>

#include <algorithm>
#include <cassert>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "base/json.h"  // FormatTimestampMs

namespace relay::crypto {
namespace {

using detail::AppendSignature;
using detail::CheckFraming;
using detail::Envelope;
using detail::GetBigEndian;
using detail::PutBigEndian;
using detail::Reject;

// Bundle header layout (docs/wire-format.md, "Bundle"); all integers big-endian.
constexpr std::string_view kBundleMagic = "RLYB";
constexpr std::size_t kVersionOffset = 4;
constexpr std::size_t kKindOffset = 5;
constexpr std::size_t kReservedOffset = 6;
constexpr std::size_t kSenderOffset = 8;
constexpr std::size_t kRecipientOffset = 40;
constexpr std::size_t kIdOffset = 72;
constexpr std::size_t kCreatedAtOffset = 88;
constexpr std::size_t kExpiresAtOffset = 96;
constexpr std::size_t kBodyLenOffset = 104;
constexpr std::size_t kHeaderSize = 112;
constexpr std::uint64_t kMaxBodyLen = kMaxBundleBodyBytes;
constexpr std::size_t kAckBodySize = 8;
constexpr std::string_view kFrameMagic = "RLYF";
constexpr std::uint64_t kMaxU32 = std::numeric_limits<std::uint32_t>::max();
constexpr std::size_t kSignatureBytes = crypto_sign_BYTES;

constexpr Envelope kBundleEnvelope{.noun = "bundle",
                                   .magic = kBundleMagic,
                                   .version = kBundleVersion,
                                   .header_size = kHeaderSize,
                                   .body_len_offset = kBodyLenOffset,
                                   .body_len_width = 8,
                                   .max_body_len = kMaxBodyLen,
                                   .sender_offset = kSenderOffset,
                                   .recipient_offset = kRecipientOffset};

[[noreturn]] void CallerBug(const char* what) {
  std::fprintf(stderr, "relay: %s\n", what);
  std::abort();
}

// A buffer with room for the header at its front, for the body to be appended to, so that Seal
// never copies a body (a frames bundle can be gigabytes).
std::string HeaderSpace(std::size_t body_len) {
  std::string out(kHeaderSize, '\0');
  out.reserve(kHeaderSize + body_len + crypto_sign_BYTES);
  return out;
}

// `out` is HeaderSpace followed by the body: fills in the header and appends the signature.
std::string Seal(const SiteKey& sender, const PublicIdentity& recipient, BundleKind kind,
                 std::string out, std::int64_t created_at_ms, std::int64_t expires_at_ms,
                 BundleId* id_out) {
  assert(out.size() >= kHeaderSize);
  const std::size_t body_len = out.size() - kHeaderSize;
  if (body_len > kMaxBodyLen) CallerBug("SealBundle: the body exceeds the 4 GiB limit");
  BundleId id;
  randombytes_buf(id.data(), id.size());
  if (id_out != nullptr) *id_out = id;

  auto* h = reinterpret_cast<unsigned char*>(out.data());
  std::memcpy(h, kBundleMagic.data(), kBundleMagic.size());
  h[kVersionOffset] = kBundleVersion;
  h[kKindOffset] = static_cast<unsigned char>(kind);
  PutBigEndian(0, 2, h + kReservedOffset);
  std::memcpy(h + kSenderOffset, sender.identity().sign_pk.data(), 32);
  std::memcpy(h + kRecipientOffset, recipient.sign_pk.data(), 32);
  std::memcpy(h + kIdOffset, id.data(), id.size());
  PutBigEndian(static_cast<std::uint64_t>(created_at_ms), 8, h + kCreatedAtOffset);
  PutBigEndian(static_cast<std::uint64_t>(expires_at_ms), 8, h + kExpiresAtOffset);
  PutBigEndian(body_len, 8, h + kBodyLenOffset);
  AppendSignature(sender, kHeaderSize, &out);
  return out;
}

// A bundle in memory as a BundleSource.
class MemorySource : public BundleSource {
 public:
  explicit MemorySource(std::string_view bytes) : bytes_(bytes) {}
  std::uint64_t size() const override { return bytes_.size(); }
  Status Read(std::uint64_t offset, std::size_t len, std::string* out) override {
    if (offset > bytes_.size() || len > bytes_.size() - offset)
      return Status::Error("read beyond the end of the bundle");
    out->assign(bytes_.substr(static_cast<std::size_t>(offset), len));
    return Status::Ok();
  }

 private:
  std::string_view bytes_;
};

// Walks a frames body (count u32, then count x (len u32, frame)) of `body_len` bytes at
// kHeaderSize in `source`, calling `visit` for each frame. Returns what is wrong with the
// layout (an entry running past the end, bytes after the last, an entry without the frame
// magic) in *bad, or a read error. Only the layout is checked: the frames are opened by the
// caller.
Status WalkFrameList(
    BundleSource& source, std::uint64_t body_len, std::optional<std::string>* bad,
    const std::function<Status(std::uint64_t, std::uint64_t, std::uint32_t)>& visit) {
  std::string piece;
  if (body_len < 4) {
    *bad = "frames body is " + std::to_string(body_len) +
           " bytes, too short for the 4-byte frame count";
    return Status::Ok();
  }
  if (Status s = source.Read(kHeaderSize, 4, &piece); !s) return s;
  const std::uint64_t count = GetBigEndian(piece, 0, 4);
  std::uint64_t pos = 4;
  for (std::uint64_t i = 0; i < count; ++i) {
    const std::string entry = "frame " + std::to_string(i + 1) + " of " + std::to_string(count);
    const std::uint64_t left = body_len - pos;
    if (left < 4) {
      *bad = entry + ": its 4-byte length needs more than the " + std::to_string(left) +
             " bytes left in the body";
      return Status::Ok();
    }
    if (Status s = source.Read(kHeaderSize + pos, 4, &piece); !s) return s;
    const std::uint64_t len = GetBigEndian(piece, 0, 4);
    pos += 4;
    if (len > body_len - pos) {
      *bad = entry + " declares " + std::to_string(len) + " bytes, but only " +
             std::to_string(body_len - pos) + " are left in the body";
      return Status::Ok();
    }
    const std::size_t magic = static_cast<std::size_t>(std::min<std::uint64_t>(len, 4));
    if (Status s = source.Read(kHeaderSize + pos, magic, &piece); !s) return s;
    if (std::string_view(piece).substr(0, kFrameMagic.size()) != kFrameMagic) {
      *bad = entry + " (" + std::to_string(len) + " bytes) does not start with '" +
             std::string(kFrameMagic) + "' (not a relay frame)";
      return Status::Ok();
    }
    if (visit)
      if (Status s = visit(i, kHeaderSize + pos, static_cast<std::uint32_t>(len)); !s) return s;
    pos += len;
  }
  if (pos != body_len)
    *bad = std::to_string(body_len - pos) + " bytes after the last of " + std::to_string(count) +
           " frames in the body";
  return Status::Ok();
}

// A resend request bounds its ranges (16 bytes each): more than this is malformed.
constexpr std::uint64_t kMaxResendRanges = 1u << 20;

}  // namespace

std::string BundleIdHex(const BundleId& id) {
  char hex[2 * std::tuple_size_v<BundleId> + 1];
  sodium_bin2hex(hex, sizeof hex, id.data(), id.size());
  return std::string(hex, 2 * id.size());
}

std::string SealBundle(const SiteKey& sender, const PublicIdentity& recipient,
                       const std::vector<std::string>& frames, std::int64_t created_at_ms,
                       std::int64_t expires_at_ms, BundleId* id_out) {
  if (frames.size() > kMaxU32) CallerBug("SealBundle: more than 2^32-1 frames");
  std::uint64_t body_len = 4;
  for (const std::string& frame : frames) {
    // A frame that is not one would make the whole bundle unreadable for the recipient.
    if (frame.size() > kMaxU32 || std::string_view(frame).substr(0, 4) != kFrameMagic)
      CallerBug("SealBundle: an entry is not a sealed frame (no 'RLYF' magic, or over 4 GiB)");
    body_len += 4 + frame.size();
  }
  if (body_len > kMaxBodyLen) CallerBug("SealBundle: the frames exceed the 4 GiB body limit");

  std::string out = HeaderSpace(static_cast<std::size_t>(body_len));
  unsigned char count[4];
  PutBigEndian(frames.size(), 4, count);
  out.append(reinterpret_cast<const char*>(count), sizeof count);
  for (const std::string& frame : frames) {
    unsigned char len[4];
    PutBigEndian(frame.size(), 4, len);
    out.append(reinterpret_cast<const char*>(len), sizeof len);
    out.append(frame);
  }
  return Seal(sender, recipient, BundleKind::kFrames, std::move(out), created_at_ms, expires_at_ms,
              id_out);
}

std::string SealResendRequest(const SiteKey& sender, const PublicIdentity& recipient,
                              std::uint64_t accepted,
                              const std::vector<std::pair<std::uint64_t, std::uint64_t>>& ranges,
                              std::int64_t created_at_ms, std::int64_t expires_at_ms) {
  const std::size_t body_len = 12 + 16 * ranges.size();
  std::string out = HeaderSpace(body_len);
  out.resize(kHeaderSize + body_len);
  auto* b = reinterpret_cast<unsigned char*>(out.data()) + kHeaderSize;
  PutBigEndian(accepted, 8, b);
  PutBigEndian(ranges.size(), 4, b + 8);
  for (std::size_t i = 0; i < ranges.size(); ++i) {
    PutBigEndian(ranges[i].first, 8, b + 12 + 16 * i);
    PutBigEndian(ranges[i].second, 8, b + 20 + 16 * i);
  }
  return Seal(sender, recipient, BundleKind::kResend, std::move(out), created_at_ms, expires_at_ms,
              nullptr);
}

std::string SealAck(const SiteKey& sender, const PublicIdentity& recipient,
                    std::uint64_t ack_through, std::int64_t created_at_ms,
                    std::int64_t expires_at_ms) {
  std::string out = HeaderSpace(kAckBodySize);
  out.resize(kHeaderSize + kAckBodySize);
  PutBigEndian(ack_through, kAckBodySize,
               reinterpret_cast<unsigned char*>(out.data()) + kHeaderSize);
  return Seal(sender, recipient, BundleKind::kAck, std::move(out), created_at_ms, expires_at_ms,
              nullptr);
}

BundleResult OpenBundle(const SiteKey& self, const PeerLookup& peers, std::string_view bytes,
                        std::int64_t now_ms) {
  MemorySource source(bytes);
  BundleResult result = OpenBundleFrom(self, peers, source, now_ms);
  if (result.ok() && result.bundle->header.kind == BundleKind::kFrames) {
    std::vector<std::string>& frames = result.bundle->frames;
    (void)ForEachBundleFrame(source, [&](std::uint64_t, std::uint64_t offset, std::uint32_t len) {
      frames.emplace_back(bytes.substr(static_cast<std::size_t>(offset), len));
      return Status::Ok();
    });
  }
  return result;
}

Status ForEachBundleFrame(
    BundleSource& source,
    const std::function<Status(std::uint64_t, std::uint64_t, std::uint32_t)>& visit) {
  if (source.size() < kHeaderSize + kSignatureBytes) return Status::Error("not a bundle");
  std::optional<std::string> bad;
  Status s = WalkFrameList(source, source.size() - kHeaderSize - kSignatureBytes, &bad, visit);
  if (s && bad) return Status::Error(*bad);
  return s;
}

BundleResult OpenBundleFrom(const SiteKey& self, const PeerLookup& peers, BundleSource& source,
                            std::int64_t now_ms) {
  BundleResult result;
  const Envelope& env = kBundleEnvelope;
  auto failed = [&](const Status& read) {
    result.rejection = Reject(env, RejectReason::kTruncated, "cannot be read: " + read.message());
    return result;
  };
  // The header first: nothing of the body is read for a file that is not a bundle for here.
  std::string head;
  if (Status s = source.Read(
          0, static_cast<std::size_t>(std::min<std::uint64_t>(source.size(), kHeaderSize)), &head);
      !s)
    return failed(s);
  std::uint64_t body_len = 0;
  if (auto r = detail::CheckFramingSized(env, head, source.size(), &body_len)) {
    result.rejection = std::move(*r);
    return result;
  }
  const unsigned kind = static_cast<unsigned char>(head[kKindOffset]);
  if (kind != static_cast<unsigned>(BundleKind::kFrames) &&
      kind != static_cast<unsigned>(BundleKind::kAck) &&
      kind != static_cast<unsigned>(BundleKind::kResend)) {
    result.rejection = Reject(env, RejectReason::kMalformed,
                              "unknown bundle kind " + std::to_string(kind) +
                                  " (1 is frames, 2 is ack, 3 is resend request)");
    return result;
  }
  const auto reserved = GetBigEndian(head, kReservedOffset, 2);
  if (reserved != 0) {
    result.rejection = Reject(env, RejectReason::kMalformed,
                              "reserved field is " + std::to_string(reserved) + ", must be 0");
    return result;
  }
  // The signature covers header || BLAKE2b-256(body): the body is hashed in pieces.
  crypto_generichash_state state;
  crypto_generichash_init(&state, nullptr, 0, crypto_generichash_BYTES);
  std::string piece;
  constexpr std::uint64_t kPiece = 1u << 20;
  for (std::uint64_t pos = 0; pos < body_len; pos += kPiece) {
    const std::size_t n = static_cast<std::size_t>(std::min(kPiece, body_len - pos));
    if (Status s = source.Read(kHeaderSize + pos, n, &piece); !s) return failed(s);
    crypto_generichash_update(&state, reinterpret_cast<const unsigned char*>(piece.data()), n);
  }
  unsigned char digest[crypto_generichash_BYTES];
  crypto_generichash_final(&state, digest, sizeof digest);
  Signature sig;
  if (Status s = source.Read(kHeaderSize + body_len, kSignatureBytes, &piece); !s) return failed(s);
  std::memcpy(sig.data(), piece.data(), sig.size());
  PublicIdentity peer;
  if (auto r = detail::CheckPartiesSigned(
          env, self, peers, head,
          std::string_view(reinterpret_cast<const char*>(digest), sizeof digest), sig, &peer)) {
    result.rejection = std::move(*r);
    return result;
  }

  Bundle bundle;
  bundle.header.kind = static_cast<BundleKind>(kind);
  bundle.header.sender = peer.sign_pk;
  bundle.header.recipient = self.identity().sign_pk;
  std::memcpy(bundle.header.id.data(), head.data() + kIdOffset, bundle.header.id.size());
  bundle.header.created_at_ms = static_cast<std::int64_t>(GetBigEndian(head, kCreatedAtOffset, 8));
  bundle.header.expires_at_ms = static_cast<std::int64_t>(GetBigEndian(head, kExpiresAtOffset, 8));

  if (bundle.header.kind == BundleKind::kFrames) {
    std::optional<std::string> bad;
    if (Status s = WalkFrameList(source, body_len, &bad, nullptr); !s) return failed(s);
    if (bad) {
      result.rejection = Reject(env, RejectReason::kMalformed, *bad);
      return result;
    }
  } else if (bundle.header.kind == BundleKind::kResend) {
    std::string body;
    if (body_len >= 12)
      if (Status s = source.Read(kHeaderSize, 12, &body); !s) return failed(s);
    const std::uint64_t count = body_len >= 12 ? GetBigEndian(body, 8, 4) : 0;
    if (body_len < 12 || body_len != 12 + 16 * count) {
      result.rejection = Reject(env, RejectReason::kMalformed,
                                "resend request body is " + std::to_string(body_len) +
                                    " bytes, which does not match its range count");
      return result;
    }
    if (count > kMaxResendRanges) {
      result.rejection =
          Reject(env, RejectReason::kMalformed,
                 "resend request holds " + std::to_string(count) +
                     " ranges, more than the limit of " + std::to_string(kMaxResendRanges));
      return result;
    }
    if (Status s = source.Read(kHeaderSize, static_cast<std::size_t>(body_len), &body); !s)
      return failed(s);
    bundle.ack_through = GetBigEndian(body, 0, 8);
    std::uint64_t previous = bundle.ack_through;
    for (std::uint64_t i = 0; i < count; ++i) {
      std::uint64_t first = GetBigEndian(body, 12 + 16 * i, 8);
      std::uint64_t last = GetBigEndian(body, 20 + 16 * i, 8);
      if (first <= previous || last < first) {
        result.rejection = Reject(env, RejectReason::kMalformed,
                                  "resend request range " + std::to_string(i) + " (" +
                                      std::to_string(first) + ".." + std::to_string(last) +
                                      ") is not ascending beyond the acknowledged position");
        return result;
      }
      bundle.ranges.emplace_back(first, last);
      previous = last;
    }
  } else {
    if (body_len != kAckBodySize) {
      result.rejection = Reject(env, RejectReason::kMalformed,
                                "ack body is " + std::to_string(body_len) + " bytes, must be " +
                                    std::to_string(kAckBodySize));
      return result;
    }
    std::string body;
    if (Status s = source.Read(kHeaderSize, kAckBodySize, &body); !s) return failed(s);
    bundle.ack_through = GetBigEndian(body, 0, kAckBodySize);
  }

  // Last: an expired bundle is otherwise sound, and the message can say so.
  if (bundle.header.expires_at_ms != 0 && bundle.header.expires_at_ms <= now_ms) {
    result.expired = true;
    result.rejection =
        Reject(env, RejectReason::kMalformed,
               "expired at " + FormatTimestampMs(bundle.header.expires_at_ms) + " (created " +
                   FormatTimestampMs(bundle.header.created_at_ms) + ")");
    return result;
  }
  result.bundle = std::move(bundle);
  return result;
}

}  // namespace relay::crypto
