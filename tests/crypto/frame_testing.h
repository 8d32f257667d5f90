// Frame payloads for the crypto tests, and what a frame's signature covers, computed from
// docs/wire-format.md ("Frame", "The frame signature") independently of crypto/frame.cc: only
// the payload decoders are shared with the implementation, the digests are built here.
#ifndef RELAY_TESTS_CRYPTO_FRAME_TESTING_H_
#define RELAY_TESTS_CRYPTO_FRAME_TESTING_H_

#include <sodium.h>

#include <catch2/catch.hpp>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "crypto/frame.h"
#include "event/event.h"

namespace relay::testing {

using crypto::Signature;
using crypto::SiteKey;

inline void PutBe(std::uint64_t v, std::size_t width, std::string* out) {
  for (std::size_t i = width; i-- > 0;) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

// A valid frame payload: `events` posts with link sequences first_seq, first_seq + 1, ...,
// `text_bytes` of text each, and no attestations (OpenFrame does not check origins).
inline std::string Payload(std::size_t text_bytes, std::size_t events = 1,
                           std::uint64_t first_seq = 1) {
  std::vector<std::string> encoded(events);
  std::vector<FramedEvent> framed;
  for (std::size_t i = 0; i < events; ++i) {
    Event e;
    e.kind = EventKind::kPost;
    e.id = MakeEventId("europe", first_seq + i);
    e.origin_site = "europe";
    e.origin_seq = first_seq + i;
    e.channel = "war-room";
    e.author = "alice";
    e.text = std::string(text_bytes, static_cast<char>('a' + i % 26));
    e.created_at_ms = 1'700'000'000'000;
    e.hops = {"europe"};
    EncodeEvent(e, &encoded[i]);
    framed.push_back({first_seq + i, encoded[i]});
  }
  return EncodeFramePayload(framed);
}

// header || FrameBodyDigest(plaintext), the frame's signed input.
inline std::string FrameSignedInput(std::string_view frame, std::string_view plaintext) {
  auto payload = DecodeFramePayload(plaintext);
  REQUIRE(payload.ok());
  crypto_generichash_state events, atts;
  crypto_generichash_init(&events, nullptr, 0, 32);
  crypto_generichash_init(&atts, nullptr, 0, 32);
  for (const FramedEvent& fe : payload->events) {
    auto env = ParseEventEnvelope(fe.encoded);
    REQUIRE(env.ok());
    std::string core_input = "relay-event-v2";
    core_input.append(env->core);
    unsigned char core_digest[32];
    crypto_generichash(core_digest, 32, reinterpret_cast<const unsigned char*>(core_input.data()),
                       core_input.size(), nullptr, 0);
    std::string item;
    PutBe(fe.seq, 8, &item);
    item.append(reinterpret_cast<const char*>(core_digest), 32);
    PutBe(env->hops.size(), 4, &item);
    item.append(env->hops);
    crypto_generichash_update(&events, reinterpret_cast<const unsigned char*>(item.data()),
                              item.size());
  }
  for (std::string_view a : payload->attestations) {
    std::string item;
    PutBe(a.size(), 4, &item);
    item.append(a);
    crypto_generichash_update(&atts, reinterpret_cast<const unsigned char*>(item.data()),
                              item.size());
  }
  std::string body = "relay-frame-body-v2";
  unsigned char h[32];
  crypto_generichash_final(&events, h, 32);
  body.append(reinterpret_cast<const char*>(h), 32);
  crypto_generichash_final(&atts, h, 32);
  body.append(reinterpret_cast<const char*>(h), 32);
  PutBe(payload->events.size(), 4, &body);
  PutBe(payload->attestations.size(), 4, &body);
  std::string input(frame.substr(0, 152));
  crypto_generichash(h, 32, reinterpret_cast<const unsigned char*>(body.data()), body.size(),
                     nullptr, 0);
  input.append(reinterpret_cast<const char*>(h), 32);
  return input;
}

// Re-signs a frame sealed over `plaintext` with `key`, so that only the deliberate change is
// wrong.
inline void ResignFrame(const SiteKey& key, std::string_view plaintext, std::string* frame) {
  const Signature sig = key.Sign(FrameSignedInput(*frame, plaintext));
  frame->replace(frame->size() - 64, 64, reinterpret_cast<const char*>(sig.data()), 64);
}

}  // namespace relay::testing

#endif  // RELAY_TESTS_CRYPTO_FRAME_TESTING_H_
