#pragma once
// The ZeroMQ link: moves frames and signed control messages between this site and its peers.
//
// One thread owns every ZeroMQ socket. Peers with a connect endpoint are dialled with a DEALER
// socket; a ROUTER socket accepts peers when a listen endpoint is set. Either side may dial.
//
// Every connection is secured with ZeroMQ's CURVE mechanism (CurveZMQ: X25519 key exchange with
// ephemeral keys, then XSalsa20-Poly1305 per message), keyed with the sites' X25519 box keys:
// the dialer is the CURVE client and knows the listener's box key from its peer config; the
// listener is the CURVE server and a ZAP handler (RFC 27, on the link thread) admits only
// clients whose key is a configured peer's current or previous box key. The ZAP User-Id of a
// connection names the peer it proved to be, and binds everything on it: a control message or
// frame signed by any other site is refused, a route to a peer is registered only by that
// peer's hello on a connection authenticated as that peer, frames go only to that route, and
// contact and liveness come only from it (or from our own dialled connection). See
// docs/wire-format.md, "ZeroMQ link".
//
// A connection becomes usable for a peer after a signed hello/hello-ack exchange; heartbeats
// (signed pings) keep it alive, and silence for longer than peer_timeout takes it down.
//
// Each time a peer's link comes up it gets a new epoch. Frames are sent for an epoch; a frame
// queued for an older epoch is dropped, because after a reconnect the shipper re-sends
// everything not yet acknowledged. The link does not open frames: it hands their bytes to the
// Handler, which verifies and decrypts them.
//
// Thread-safety: Start/Stop from one thread; SendFrame/SendAck/IsUp from any thread. Handler
// callbacks run on the link thread and must not block for long.

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "base/status.h"
#include "crypto/identity.h"

namespace relay::transports {

struct LinkPeer {
  std::string name;
  crypto::PublicIdentity identity;
  std::string connect;                                     // "tcp://host:port" to dial, or empty
  std::optional<crypto::PublicIdentity> previous;          // still accepted during a key rotation,
  std::chrono::system_clock::time_point previous_until{};  // before this (PreviousKeyAccepted)
};

// What the link refused (or, for kDialFailed, could not complete), for metrics and logs.
enum class LinkRefusal : std::uint8_t {
  kUnknownKey = 0,   // ZAP: a CURVE client key that is no configured peer's box key
  kSenderMismatch,   // a message signed by another site than the connection proved to be
  kUnregistered,     // a message on an authenticated connection that has not said hello
  kConnectionLimit,  // a connection closed by the bounds of ZmqLinkOptions
  kHandshakeFailed,  // an incoming CURVE handshake failed or timed out
  kDialFailed,       // our CURVE handshake with a peer failed (refused key, wrong key, old peer)
  kCount
};
// Stable snake_case name used as the metrics label: "unknown_key", "sender_mismatch", ...
const char* LinkRefusalName(LinkRefusal reason);

class LinkHandler {
 public:
  virtual ~LinkHandler() = default;
  virtual void OnLinkUp(std::size_t peer, std::uint64_t epoch) = 0;
  virtual void OnLinkDown(std::size_t peer) = 0;
  // Bytes of a frame that arrived from the connection of `peer`; not yet verified. The link has
  // checked that the frame does not name another configured peer as its sender.
  virtual void OnFrame(std::size_t peer, std::string bytes) = 0;
  // A verified acknowledgement: `peer` has durably accepted everything through `seq`.
  // `previous_key`: it was signed with the peer's previous key (during a key rotation).
  virtual void OnAck(std::size_t peer, std::uint64_t seq, bool previous_key) = 0;
  // A message that failed verification (bad signature, unknown sender, ...), for metrics.
  virtual void OnRejectedControl(const std::string& reason, const std::string& message) = 0;
  // A connection or message the link refused; `message` says what and from where.
  virtual void OnLinkRefused(LinkRefusal reason, const std::string& message) = 0;
};

struct ZmqLinkOptions {
  std::string listen;  // "tcp://host:port" or empty
  std::chrono::milliseconds heartbeat_interval{1000};
  std::chrono::milliseconds peer_timeout{5000};
  std::size_t max_message_bytes = 80u << 20;  // larger incoming messages are refused by ZeroMQ
  // Bounds on what an unauthenticated (or a misbehaving) party can hold open at the listener.
  // A connection must complete the CURVE handshake within handshake_timeout (ZMQ_HANDSHAKE_IVL;
  // it cannot pass ZAP without a configured peer's key). Accepted connections that have not
  // yet delivered a message are "pending": over max_pending_per_address from one IP address,
  // or max_pending_connections in all, the oldest pending one (of that address) is closed.
  // Over max_connections_per_peer authenticated as one peer, the oldest that is not the
  // peer's route is closed.
  std::chrono::milliseconds handshake_timeout{5000};
  std::size_t max_pending_connections = 64;
  std::size_t max_pending_per_address = 8;
  std::size_t max_connections_per_peer = 4;
  // At most one rehello per peer in this interval (they answer messages from connections that
  // have not said hello).
  std::chrono::milliseconds rehello_interval{1000};
};

class ZmqLink {
 public:
  // `previous_key`, when set, is this site's previous key: messages still addressed to it are
  // accepted during a key rotation, and the listener presents it as its CURVE server key (so
  // that peers which know only the previous key can still connect; docs/deployment.md).
  ZmqLink(const crypto::SiteKey& key, std::vector<LinkPeer> peers, ZmqLinkOptions options,
          LinkHandler* handler, const crypto::SiteKey* previous_key = nullptr);
  ~ZmqLink();  // stops
  ZmqLink(const ZmqLink&) = delete;
  ZmqLink& operator=(const ZmqLink&) = delete;

  // Binds the listener (error names the endpoint), starts dialling and the link thread.
  Status Start();
  void Stop();

  // Queues a frame for `peer` on link epoch `epoch`; dropped if that epoch is over.
  void SendFrame(std::size_t peer, std::uint64_t epoch, std::string frame);
  // Queues a signed acknowledgement "accepted through seq" to `peer` (dropped while down).
  void SendAck(std::size_t peer, std::uint64_t seq);
  bool IsUp(std::size_t peer) const;
  // Wall-clock ms of the last valid message from `peer` on its registered route or our own
  // connection to it (0 = never).
  std::int64_t LastContactMs(std::size_t peer) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace relay::transports
