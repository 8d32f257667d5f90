#pragma once
// The ZeroMQ link: moves frames and signed control messages between this site and its peers.
//
// One thread owns every ZeroMQ socket. Peers with a connect endpoint are dialled with a DEALER
// socket; a ROUTER socket accepts peers when a listen endpoint is set. Either side may dial.
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

#include "crypto/identity.h"
#include "relay/status.h"

namespace relay::transports {

struct LinkPeer {
  std::string name;
  crypto::PublicIdentity identity;
  std::string connect;                                     // "tcp://host:port" to dial, or empty
  std::optional<crypto::PublicIdentity> previous;          // still accepted during a key rotation,
  std::chrono::system_clock::time_point previous_until{};  // before this (PreviousKeyAccepted)
};

class LinkHandler {
 public:
  virtual ~LinkHandler() = default;
  virtual void OnLinkUp(std::size_t peer, std::uint64_t epoch) = 0;
  virtual void OnLinkDown(std::size_t peer) = 0;
  // Bytes of a frame that arrived from the connection of `peer`; not yet verified.
  virtual void OnFrame(std::size_t peer, std::string bytes) = 0;
  // A verified acknowledgement: `peer` has durably accepted everything through `seq`.
  // `previous_key`: it was signed with the peer's previous key (during a key rotation).
  virtual void OnAck(std::size_t peer, std::uint64_t seq, bool previous_key) = 0;
  // A message that failed verification (bad signature, unknown sender, ...), for metrics.
  virtual void OnRejectedControl(const std::string& reason, const std::string& message) = 0;
};

struct ZmqLinkOptions {
  std::string listen;  // "tcp://host:port" or empty
  std::chrono::milliseconds heartbeat_interval{1000};
  std::chrono::milliseconds peer_timeout{5000};
  std::size_t max_message_bytes = 80u << 20;  // larger incoming messages are refused by ZeroMQ
};

class ZmqLink {
 public:
  // `previous_key`, when set, is this site's previous key: messages still addressed to it are
  // accepted during a key rotation.
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
  // Wall-clock ms of the last valid message from `peer` (0 = never).
  std::int64_t LastContactMs(std::size_t peer) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace relay::transports
