#include "transports/zmq_link.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <zmq.hpp>

#include "crypto/frame.h"

namespace relay::transports {
namespace {

using Clock = std::chrono::steady_clock;

// ZAP (RFC 27) requests go to this endpoint of the socket's context; one handler per context.
constexpr const char* kZapEndpoint = "inproc://zeromq.zap.01";
constexpr const char* kZapDomain = "relay";
constexpr const char* kListenMonitor = "inproc://relay-listen-monitor";
// A frame header names its sender's sign_pk at bytes [8, 40) (docs/wire-format.md, "Frame").
constexpr std::size_t kFrameSenderOffset = 8;
constexpr std::size_t kKeyBytes = 32;

std::int64_t WallMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string EncodeU64(std::uint64_t v) {
  std::string s(8, '\0');
  for (int i = 7; i >= 0; --i) {
    s[static_cast<std::size_t>(i)] = static_cast<char>(v & 0xff);
    v >>= 8;
  }
  return s;
}

std::optional<std::uint64_t> DecodeU64(std::string_view s) {
  if (s.size() != 8) return std::nullopt;
  std::uint64_t v = 0;
  for (char c : s) v = (v << 8) | static_cast<unsigned char>(c);
  return v;
}

// First 8 bytes of a key as 16 hex characters (like PublicIdentity::Fingerprint).
std::string KeyPrefix(const std::uint8_t* key) {
  static const char kHex[] = "0123456789abcdef";
  std::string out;
  for (std::size_t i = 0; i < 8; ++i) {
    out += kHex[key[i] >> 4];
    out += kHex[key[i] & 15];
  }
  return out;
}

const char* TypeName(crypto::ControlType t) {
  switch (t) {
    case crypto::ControlType::kHello:
      return "hello";
    case crypto::ControlType::kHelloAck:
      return "hello_ack";
    case crypto::ControlType::kAck:
      return "ack";
    case crypto::ControlType::kPing:
      return "ping";
    case crypto::ControlType::kRehello:
      return "rehello";
  }
  return "control message";
}

std::string HandshakeProtocolError(std::uint32_t code) {
  switch (code) {
    case ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
      return "no CURVE security was offered: relay link version 1 is not supported (this relay "
             "supports version 2; upgrade every site of the federation together)";
    case ZMQ_PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
      return "a CURVE box from it did not open (bytes altered on the way, or it does not hold "
             "the key configured for it)";
    default: {
      char hex[16];
      std::snprintf(hex, sizeof hex, "0x%08x", code);
      return std::string("ZMTP protocol error ") + hex;
    }
  }
}

struct Outgoing {
  std::size_t peer;
  std::uint64_t epoch;  // 0 for control messages (not tied to an epoch)
  bool is_frame;
  std::string bytes;
};

// The listener-side connection a peer said hello on.
struct Route {
  std::string routing_id;
  int fd = -1;
};

struct PeerState {
  LinkPeer config;
  // Dialling (config.connect is set): our CURVE client socket and its monitor.
  std::unique_ptr<zmq::socket_t> dealer;
  std::unique_ptr<zmq::socket_t> dealer_monitor;
  std::uint64_t dealer_generation = 0;
  bool dial_previous_key = false;  // the server key in use is config.previous's box key
  bool dial_connected = false;     // a TCP connection is up, handshake in progress or done
  bool dial_handshaken = false;    // ... and its CURVE handshake succeeded
  Clock::time_point dial_since{};  // the socket was made, or its last good connection dropped
  // Reached through our listener.
  std::optional<Route> route;
  Clock::time_point last_rehello{};
  bool up = false;
  std::uint64_t epoch = 0;
  Clock::time_point last_recv{};
  Clock::time_point last_ping{};
  Clock::time_point last_hello{};
  std::atomic<bool> up_flag{false};
  std::atomic<std::int64_t> last_contact_ms{0};
};

// A TCP connection accepted by the listener (from the socket monitor), keyed by its fd.
struct Connection {
  Clock::time_point since;
  sockaddr_storage local{};
  sockaddr_storage remote{};
  socklen_t local_len = 0;
  socklen_t remote_len = 0;
  std::string address;              // remote IP address
  std::optional<std::size_t> peer;  // set by its first message: it passed CURVE and ZAP
  bool closed = false;              // libzmq had closed it before its ACCEPTED event was read
};

std::string AddressOf(const sockaddr_storage& sa) {
  char buf[INET6_ADDRSTRLEN] = "?";
  if (sa.ss_family == AF_INET) {
    inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(&sa)->sin_addr, buf, sizeof buf);
  } else if (sa.ss_family == AF_INET6) {
    inet_ntop(AF_INET6, &reinterpret_cast<const sockaddr_in6*>(&sa)->sin6_addr, buf, sizeof buf);
  }
  return buf;
}

// Reads the addresses of a connected socket; false when fd is not one (any more).
bool ReadAddresses(int fd, Connection* c) {
  c->local_len = sizeof c->local;
  c->remote_len = sizeof c->remote;
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&c->local), &c->local_len) != 0) return false;
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&c->remote), &c->remote_len) != 0) return false;
  c->address = AddressOf(c->remote);
  return true;
}

void SetKey(zmq::socket_t& s, int option, const std::uint8_t* key) {
  if (zmq_setsockopt(s.handle(), option, key, kKeyBytes) != 0) throw zmq::error_t();
}

// Receives every part of one message; false when none is waiting.
bool RecvParts(zmq::socket_t& s, std::vector<zmq::message_t>* parts, std::size_t max_parts) {
  parts->clear();
  zmq::message_t part;
  if (!s.recv(part, zmq::recv_flags::dontwait)) return false;
  bool more = part.more();
  parts->push_back(std::move(part));
  while (more) {
    zmq::message_t next;
    if (!s.recv(next, zmq::recv_flags::dontwait)) break;
    more = next.more();
    if (parts->size() < max_parts) parts->push_back(std::move(next));
  }
  return true;
}

}  // namespace

const char* LinkRefusalName(LinkRefusal reason) {
  switch (reason) {
    case LinkRefusal::kUnknownKey:
      return "unknown_key";
    case LinkRefusal::kSenderMismatch:
      return "sender_mismatch";
    case LinkRefusal::kUnregistered:
      return "unregistered";
    case LinkRefusal::kConnectionLimit:
      return "connection_limit";
    case LinkRefusal::kHandshakeFailed:
      return "handshake_failed";
    case LinkRefusal::kDialFailed:
      return "dial_failed";
    case LinkRefusal::kCount:
      break;
  }
  return "unknown";
}

struct ZmqLink::Impl {
  const crypto::SiteKey& key;
  const crypto::SiteKey* previous_key = nullptr;
  ZmqLinkOptions options;
  LinkHandler* handler;
  std::vector<std::unique_ptr<PeerState>> peers;
  zmq::context_t context{1};           // one I/O thread: monitor events of a socket come in order
  std::unique_ptr<zmq::socket_t> zap;  // ZAP handler, when listening
  std::unique_ptr<zmq::socket_t> router;          // the listener
  std::unique_ptr<zmq::socket_t> listen_monitor;  // events of the listener's connections
  int wake_fd = -1;
  std::thread thread;
  std::atomic<bool> stop{false};
  std::mutex mu;
  std::deque<Outgoing> outbox;                      // guarded by mu
  std::map<std::string, std::size_t> router_peers;  // routing id -> peer, link thread only
  std::map<int, Connection> connections;            // accepted by the listener, link thread only
  std::uint16_t failure_event = 0;  // the listener's last HANDSHAKE_FAILED_* event, if pending
  std::uint32_t failure_value = 0;

  Impl(const crypto::SiteKey& k, std::vector<LinkPeer> ps, ZmqLinkOptions o, LinkHandler* h)
      : key(k), options(std::move(o)), handler(h) {
    for (auto& p : ps) {
      auto st = std::make_unique<PeerState>();
      st->config = std::move(p);
      peers.push_back(std::move(st));
    }
  }

  // `expired` gets the peer's name when pk is its previous key past its previous_until.
  std::optional<crypto::PublicIdentity> Lookup(const crypto::PublicKey& pk,
                                               std::string* expired = nullptr) const {
    for (const auto& p : peers) {
      if (p->config.identity.sign_pk == pk) return p->config.identity;
      if (p->config.previous && p->config.previous->sign_pk == pk) {
        if (crypto::PreviousKeyAccepted(p->config.previous_until, std::chrono::system_clock::now()))
          return p->config.previous;
        if (expired) *expired = p->config.name;
      }
    }
    return std::nullopt;
  }

  std::optional<std::size_t> PeerIndex(const crypto::PublicKey& pk) const {
    for (std::size_t i = 0; i < peers.size(); ++i) {
      if (peers[i]->config.identity.sign_pk == pk) return i;
      if (peers[i]->config.previous && peers[i]->config.previous->sign_pk == pk) return i;
    }
    return std::nullopt;
  }

  // Whether the peer's previous key may still be used now ([peer] previous_public_key_until).
  static bool PreviousAccepted(const LinkPeer& p) {
    return p.previous &&
           crypto::PreviousKeyAccepted(p.previous_until, std::chrono::system_clock::now());
  }

  std::optional<std::size_t> PeerByBoxKey(const crypto::PublicKey& pk) const {
    for (std::size_t i = 0; i < peers.size(); ++i) {
      if (peers[i]->config.identity.box_pk == pk) return i;
      if (PreviousAccepted(peers[i]->config) && peers[i]->config.previous->box_pk == pk) return i;
    }
    return std::nullopt;
  }

  // Counts and logs a control message that did not open; `expired` names the peer whose
  // previous key signed it after its end time.
  void RejectedControl(const crypto::ControlResult& r, const std::string& expired) {
    if (!expired.empty()) {
      handler->OnRejectedControl("previous_key_expired",
                                 "control message from peer '" + expired +
                                     "' refused: signed with its previous key after its "
                                     "previous_public_key_until");
      return;
    }
    handler->OnRejectedControl(crypto::RejectReasonName(r.rejection.reason), r.rejection.message);
  }

  std::optional<std::size_t> PeerByName(std::string_view name) const {
    for (std::size_t i = 0; i < peers.size(); ++i)
      if (peers[i]->config.name == name) return i;
    return std::nullopt;
  }

  const std::string& Name(std::size_t peer) const { return peers[peer]->config.name; }

  void Refuse(LinkRefusal reason, const std::string& message) {
    handler->OnLinkRefused(reason, message);
  }

  // Opens a control message addressed to this site's key, or during a rotation its previous one.
  crypto::ControlResult Open(std::string_view bytes, std::string* expired) const {
    auto lookup = [this, expired](const crypto::PublicKey& pk) { return Lookup(pk, expired); };
    crypto::ControlResult r = crypto::OpenControl(key, lookup, bytes);
    if (!r.ok() && previous_key && r.rejection.reason == crypto::RejectReason::kWrongRecipient) {
      crypto::ControlResult old = crypto::OpenControl(*previous_key, lookup, bytes);
      if (old.ok() || old.rejection.reason != crypto::RejectReason::kWrongRecipient) return old;
    }
    return r;
  }

  void Wake() {
    std::uint64_t one = 1;
    [[maybe_unused]] auto n = write(wake_fd, &one, sizeof one);
  }

  void ConfigureSocket(zmq::socket_t& s) {
    s.set(zmq::sockopt::linger, 0);
    s.set(zmq::sockopt::sndhwm, 10000);
    s.set(zmq::sockopt::rcvhwm, 10000);
    s.set(zmq::sockopt::maxmsgsize, static_cast<std::int64_t>(options.max_message_bytes));
    s.set(zmq::sockopt::reconnect_ivl, 100);
    s.set(zmq::sockopt::reconnect_ivl_max, 2000);
    s.set(zmq::sockopt::tcp_keepalive, 1);
    s.set(zmq::sockopt::handshake_ivl, static_cast<int>(options.handshake_timeout.count()));
  }

  // How long a dialler waits for a CURVE handshake with one server key before it makes a new
  // socket: with the peer's other key during a rotation, and in any case because libzmq does
  // not reconnect after the peer's ZAP handler refused it.
  Clock::duration DialRetryInterval() const {
    return std::max<Clock::duration>(2 * options.heartbeat_interval, std::chrono::seconds(1));
  }

  void NewDealer(std::size_t peer) {
    PeerState& p = *peers[peer];
    p.dealer.reset();  // closing the socket also ends its monitor
    p.dealer_monitor.reset();
    const crypto::PublicIdentity& server =
        p.dial_previous_key && p.config.previous ? *p.config.previous : p.config.identity;
    p.dealer = std::make_unique<zmq::socket_t>(context, zmq::socket_type::dealer);
    ConfigureSocket(*p.dealer);
    // Queue nothing for a connection that is not complete: stale frames would be sent late.
    // (The pipe is attached only once the CURVE handshake has succeeded.)
    p.dealer->set(zmq::sockopt::immediate, 1);
    SetKey(*p.dealer, ZMQ_CURVE_SERVERKEY, server.box_pk.data());
    SetKey(*p.dealer, ZMQ_CURVE_PUBLICKEY, key.identity().box_pk.data());
    key.LendBoxSecret(
        [&](const std::uint8_t* secret) { SetKey(*p.dealer, ZMQ_CURVE_SECRETKEY, secret); });
    // HANDSHAKE_FAILED_PROTOCOL names a peer without CURVE (link version 1). Its libzmq 4.3.4
    // bug (see ReadListenMonitor) can leave a connection whose MESSAGE box did not open unread
    // here too; the link then goes down by peer_timeout and a new socket closes it.
    std::string monitor =
        "inproc://relay-dial-" + std::to_string(peer) + "-" + std::to_string(++p.dealer_generation);
    if (zmq_socket_monitor(
            p.dealer->handle(), monitor.c_str(),
            ZMQ_EVENT_CONNECTED | ZMQ_EVENT_DISCONNECTED | ZMQ_EVENT_HANDSHAKE_SUCCEEDED |
                ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL | ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL |
                ZMQ_EVENT_HANDSHAKE_FAILED_AUTH) != 0)
      throw zmq::error_t();
    p.dealer_monitor = std::make_unique<zmq::socket_t>(context, zmq::socket_type::pair);
    p.dealer_monitor->set(zmq::sockopt::linger, 0);
    p.dealer_monitor->connect(monitor);
    p.dial_connected = false;
    p.dial_handshaken = false;
    p.dial_since = Clock::now();
    p.dealer->connect(p.config.connect);
  }

  std::string Control(std::size_t peer, crypto::ControlType type, std::string_view body = {}) {
    return crypto::SealControl(key, peers[peer]->config.identity, type, WallMs(), body);
  }

  bool SendOnRoute(const std::string& routing_id, const std::string& bytes) {
    if (!router->send(zmq::buffer(routing_id),
                      zmq::send_flags::sndmore | zmq::send_flags::dontwait))
      return false;
    return router->send(zmq::buffer(bytes), zmq::send_flags::dontwait).has_value();
  }

  // Sends on the peer's current route: our own connection to it, else the connection it said
  // hello on. False when there is no route or the socket refused.
  bool SendRaw(std::size_t peer, const std::string& bytes, bool prefer_dealer = true) {
    PeerState& p = *peers[peer];
    try {
      if (p.dealer && (prefer_dealer || !p.route)) {
        return p.dealer->send(zmq::buffer(bytes), zmq::send_flags::dontwait).has_value();
      }
      if (p.route && router) return SendOnRoute(p.route->routing_id, bytes);
    } catch (const zmq::error_t&) {
      // EHOSTUNREACH: the peer's connection to our listener is gone.
      if (!p.dealer && p.route) {
        router_peers.erase(p.route->routing_id);
        p.route.reset();
        LinkDown(peer);
      }
    }
    return false;
  }

  void LinkUp(std::size_t peer) {
    PeerState& p = *peers[peer];
    p.up = true;
    p.up_flag = true;
    ++p.epoch;
    p.last_recv = Clock::now();
    p.last_ping = Clock::now();
    handler->OnLinkUp(peer, p.epoch);
  }

  void LinkDown(std::size_t peer) {
    PeerState& p = *peers[peer];
    if (!p.up) return;
    p.up = false;
    p.up_flag = false;
    handler->OnLinkDown(peer);
  }

  void Contact(PeerState& p) {
    p.last_contact_ms = WallMs();
    p.last_recv = Clock::now();
  }

  // Another configured peer than `peer` that a frame names as its sender, if any. A frame
  // naming `peer`, an unknown key or too short to say goes to the handler, whose verification
  // refuses it by reason unless `peer` signed it.
  std::optional<std::size_t> OtherFrameSender(std::size_t peer, const std::string& bytes) const {
    if (bytes.size() < kFrameSenderOffset + kKeyBytes) return std::nullopt;
    crypto::PublicKey pk;
    std::memcpy(pk.data(), bytes.data() + kFrameSenderOffset, kKeyBytes);
    auto sender = PeerIndex(pk);
    if (!sender || *sender == peer) return std::nullopt;
    return sender;
  }

  void RefuseSender(const std::string& what, std::size_t sender, const std::string& where) {
    Refuse(LinkRefusal::kSenderMismatch,
           what + " signed as peer '" + Name(sender) + "' arrived on " + where + ": refused");
  }

  // --- Listener ---------------------------------------------------------------------------

  // A message from an authenticated connection that has not said hello (we restarted, it
  // reconnected underneath, or it is a replay): ask it to say hello, at most once per interval.
  void Unregistered(std::size_t peer, const std::string& routing_id, const std::string& what,
                    const std::string& where) {
    PeerState& p = *peers[peer];
    auto now = Clock::now();
    bool answer = now - p.last_rehello >= options.rehello_interval;
    Refuse(LinkRefusal::kUnregistered,
           what + " from peer '" + Name(peer) + "' on " + where + ", which has not said hello: " +
               (answer ? "asked it to say hello again" : "ignored (a rehello was sent lately)"));
    if (!answer) return;
    p.last_rehello = now;
    try {
      SendOnRoute(routing_id, Control(peer, crypto::ControlType::kRehello));
    } catch (const zmq::error_t&) {
    }
  }

  struct Incoming {
    std::size_t peer;  // the peer the connection authenticated as (ZAP User-Id)
    std::string routing_id;
    int fd;
    const char* address;  // the connection's remote address (ZeroMQ's Peer-Address)
  };

  std::string Where(const Incoming& in) const {
    return std::string("a connection from ") + (in.address ? in.address : "?") +
           " authenticated as peer '" + Name(in.peer) + "'";
  }

  void RouterControl(const Incoming& in, std::string_view bytes) {
    std::string expired;
    auto r = Open(bytes, &expired);
    if (!r.ok()) {
      RejectedControl(r, expired);
      return;
    }
    const crypto::ControlMessage& m = *r.message;
    auto sender = PeerIndex(m.sender);
    if (!sender) return;  // OpenControl already checked the sender is known
    if (*sender != in.peer) {
      RefuseSender(TypeName(m.type), *sender, Where(in));
      return;
    }
    std::size_t peer = in.peer;
    PeerState& p = *peers[peer];
    if (m.type == crypto::ControlType::kHello) {
      // The connection proved to be this peer (CURVE + ZAP) and the peer signed the hello:
      // this is now its route. A replayed hello cannot get here on anyone else's connection.
      if (p.route && p.route->routing_id != in.routing_id) router_peers.erase(p.route->routing_id);
      p.route = Route{in.routing_id, in.fd};
      router_peers[in.routing_id] = peer;
      Contact(p);
      SendRaw(peer, Control(peer, crypto::ControlType::kHelloAck), /*prefer_dealer=*/false);
      // A peer we dial ourselves keeps using our connection; otherwise this hello starts a
      // new epoch (the peer may have restarted and lost what was in flight).
      if (!p.dealer) {
        p.up = false;
        LinkUp(peer);
      }
      return;
    }
    if (!p.route || p.route->routing_id != in.routing_id) {
      Unregistered(peer, in.routing_id, TypeName(m.type), Where(in));
      return;
    }
    Contact(p);
    if (m.type == crypto::ControlType::kAck) {
      auto seq = DecodeU64(m.body);
      if (!seq) {
        handler->OnRejectedControl("malformed", "ack body is not 8 bytes");
        return;
      }
      handler->OnAck(peer, *seq, m.sender != p.config.identity.sign_pk);
    }
  }

  void RouterFrame(const Incoming& in, std::string bytes) {
    if (auto other = OtherFrameSender(in.peer, bytes)) {
      RefuseSender("frame", *other, Where(in));
      return;
    }
    PeerState& p = *peers[in.peer];
    if (!p.route || p.route->routing_id != in.routing_id) {
      // The frame will be re-sent in the epoch that starts with the hello.
      Unregistered(in.peer, in.routing_id, "frame", Where(in));
      return;
    }
    Contact(p);
    handler->OnFrame(in.peer, std::move(bytes));
  }

  void ReadRouter() {
    std::vector<zmq::message_t> parts;
    while (RecvParts(*router, &parts, 2)) {
      // A well-behaved peer sends one part after the routing id; the rest were dropped.
      if (parts.size() < 2) continue;
      zmq::message_t& msg = parts[1];
      const char* user = zmq_msg_gets(msg.handle(), "User-Id");
      auto peer = user ? PeerByName(user) : std::nullopt;
      if (!peer) continue;  // impossible: ZAP admits only configured peers' keys
      const int fd = zmq_msg_get(msg.handle(), ZMQ_SRCFD);
      Incoming in{*peer, parts[0].to_string(), fd, zmq_msg_gets(msg.handle(), "Peer-Address")};
      if (fd >= 0) Authenticated(fd, *peer);
      std::string bytes = msg.to_string();
      if (crypto::LooksLikeFrame(bytes)) {
        RouterFrame(in, std::move(bytes));
      } else {
        RouterControl(in, bytes);
      }
    }
  }

  // ZAP: admit a CURVE client only with a configured peer's current or previous box key; the
  // User-Id names the peer, and every message of the connection carries it.
  void ReadZap() {
    std::vector<zmq::message_t> parts;
    while (RecvParts(*zap, &parts, 16)) {
      // [routing id] [] [version] [request id] [domain] [address] [identity] [mechanism] [key]
      if (parts.size() < 8) continue;  // only libzmq writes here
      std::string address = parts[5].to_string();
      std::string status = "400", text = "not a configured peer", user;
      if (parts[7].to_string_view() != "CURVE" || parts.size() != 9 ||
          parts[8].size() != kKeyBytes) {
        text = "CURVE required";
        Refuse(LinkRefusal::kUnknownKey,
               "connection from " + address + " refused: it did not authenticate with CURVE");
      } else {
        crypto::PublicKey client;
        std::memcpy(client.data(), parts[8].data(), kKeyBytes);
        if (auto peer = PeerByBoxKey(client)) {
          status = "200";
          text = "OK";
          user = Name(*peer);
        } else {
          Refuse(LinkRefusal::kUnknownKey,
                 "connection from " + address + " refused: its CURVE key " +
                     KeyPrefix(client.data()) + "... is not the box key of a configured peer");
        }
      }
      const std::string reply[] = {
          parts[0].to_string(), "", "1.0", parts[3].to_string(), status, text, user, ""};
      for (std::size_t i = 0; i < std::size(reply); ++i) {
        zap->send(zmq::buffer(reply[i]),
                  i + 1 < std::size(reply) ? zmq::send_flags::sndmore : zmq::send_flags::none);
      }
    }
  }

  // Closes a connection that libzmq owns: shutdown() makes it fail and libzmq closes it (and
  // reports DISCONNECTED). The fd is checked to still be the same TCP connection first.
  void CloseConnection(int fd, const std::string& why) {
    auto it = connections.find(fd);
    if (it == connections.end()) return;
    Connection now;
    const Connection& was = it->second;
    if (ReadAddresses(fd, &now) && now.local_len == was.local_len &&
        now.remote_len == was.remote_len &&
        std::memcmp(&now.local, &was.local, was.local_len) == 0 &&
        std::memcmp(&now.remote, &was.remote, was.remote_len) == 0) {
      ::shutdown(fd, SHUT_RDWR);
      Refuse(LinkRefusal::kConnectionLimit, "closed a connection from " + was.address + ": " + why);
    }
    connections.erase(it);
  }

  // The oldest pending connection (no message yet), of `address` when it is not empty.
  std::optional<int> OldestPending(const std::string& address, std::size_t* count) const {
    std::optional<int> oldest;
    Clock::time_point since = Clock::time_point::max();
    *count = 0;
    for (const auto& [fd, c] : connections) {
      if (c.peer || c.closed || (!address.empty() && c.address != address)) continue;
      ++*count;
      if (c.since < since) {
        since = c.since;
        oldest = fd;
      }
    }
    return oldest;
  }

  void Accepted(int fd) {
    Connection c;
    c.since = Clock::now();
    // Not readable: libzmq already closed it (junk is refused within microseconds, and this
    // thread can be slower); its DISCONNECTED follows and counts it. Such an entry is never
    // closed by a bound below, since its descriptor may already belong to another file.
    c.closed = !ReadAddresses(fd, &c);
    if (c.closed) c.address = "an address not read (it was closed at once)";
    const std::string address = c.address;
    const bool closed = c.closed;
    connections[fd] = std::move(c);  // replaces an entry whose fd was closed and reused
    if (closed) return;
    std::size_t count = 0;
    for (auto oldest = OldestPending(address, &count);
         oldest && count > options.max_pending_per_address;
         oldest = OldestPending(address, &count)) {
      CloseConnection(*oldest, std::to_string(count) +
                                   " connections from that address had not completed the "
                                   "CURVE handshake (limit " +
                                   std::to_string(options.max_pending_per_address) +
                                   "); the oldest is closed");
    }
    for (auto oldest = OldestPending("", &count); oldest && count > options.max_pending_connections;
         oldest = OldestPending("", &count)) {
      CloseConnection(*oldest, std::to_string(count) +
                                   " connections had not completed the CURVE handshake (limit " +
                                   std::to_string(options.max_pending_connections) +
                                   "); the oldest is closed");
    }
  }

  // A message arrived on fd: its connection passed CURVE and ZAP as `peer`.
  void Authenticated(int fd, std::size_t peer) {
    auto it = connections.find(fd);
    if (it == connections.end() || it->second.closed) {  // a closed entry: fd reused since
      Connection c;
      c.since = Clock::now();
      if (!ReadAddresses(fd, &c)) return;
      it = connections.insert_or_assign(fd, std::move(c)).first;
    }
    if (it->second.peer == peer) return;
    it->second.peer = peer;
    while (true) {
      std::size_t count = 0;
      std::optional<int> oldest;
      Clock::time_point since = Clock::time_point::max();
      const PeerState& p = *peers[peer];
      for (const auto& [cfd, c] : connections) {
        if (c.peer != peer) continue;
        ++count;
        if (cfd != fd && !(p.route && p.route->fd == cfd) && c.since < since) {
          since = c.since;
          oldest = cfd;
        }
      }
      if (count <= options.max_connections_per_peer || !oldest) return;
      CloseConnection(*oldest, std::to_string(count) + " connections were authenticated as peer '" +
                                   Name(peer) + "' (limit " +
                                   std::to_string(options.max_connections_per_peer) +
                                   "); the oldest that is not its route is closed");
    }
  }

  static bool ReadEvent(zmq::socket_t& monitor, std::uint16_t* event, std::uint32_t* value) {
    std::vector<zmq::message_t> parts;
    if (!RecvParts(monitor, &parts, 2)) return false;
    *event = 0;
    *value = 0;
    if (parts[0].size() >= 6) {
      std::memcpy(event, parts[0].data(), 2);
      std::memcpy(value, static_cast<const char*>(parts[0].data()) + 2, 4);
    }
    return true;
  }

  // The listener's monitor does not ask for HANDSHAKE_FAILED_PROTOCOL: libzmq 4.3.4 sends
  // that event between setting errno = EPROTO and reading it when a MESSAGE box does not open
  // after the handshake; the event's own send leaves errno = EAGAIN, so the engine merely stops
  // reading instead of closing, and the connection stays open, unread, for good (a tampered
  // byte would leak a descriptor). Failed handshakes are counted from DISCONNECTED instead.
  void ReadListenMonitor() {
    std::uint16_t event = 0;
    std::uint32_t value = 0;
    while (ReadEvent(*listen_monitor, &event, &value)) {
      switch (event) {
        case ZMQ_EVENT_ACCEPTED:
          Accepted(static_cast<int>(value));
          break;
        case ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        case ZMQ_EVENT_HANDSHAKE_FAILED_AUTH:
          // Emitted just before the DISCONNECTED of the same connection (one I/O thread).
          failure_event = event;
          failure_value = value;
          break;
        case ZMQ_EVENT_DISCONNECTED:
          Disconnected(static_cast<int>(value));
          break;
        default:
          break;
      }
    }
  }

  void Disconnected(int fd) {
    const std::uint16_t why = failure_event;
    const std::uint32_t code = failure_value;
    failure_event = 0;
    auto it = connections.find(fd);
    if (it == connections.end()) return;  // closed by a bound above (counted there)
    const Connection c = it->second;
    connections.erase(it);
    if (c.peer || why == ZMQ_EVENT_HANDSHAKE_FAILED_AUTH) return;  // ZAP refused: counted there
    const auto ms =
        std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - c.since).count();
    std::string what;
    if (why == ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL && code == EAGAIN) {
      what = "did not complete the CURVE handshake within " +
             std::to_string(options.handshake_timeout.count()) + " ms";
    } else if (why == ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL) {
      what = "was closed by the client during the CURVE handshake";
    } else {
      what =
          "failed the CURVE handshake: a client that expects another box key for this site "
          "(a wrong public_key at a peer, or a rotation on one side only), no CURVE at all "
          "(relay link version 1 is not supported; this relay supports version 2), or junk";
    }
    Refuse(LinkRefusal::kHandshakeFailed, "a connection from " + c.address + " " + what +
                                              " (after " + std::to_string(ms) + " ms): closed");
  }

  // --- Dialler ----------------------------------------------------------------------------

  void ReadDealerMonitor(std::size_t peer) {
    PeerState& p = *peers[peer];
    std::uint16_t event = 0;
    std::uint32_t value = 0;
    while (p.dealer_monitor && ReadEvent(*p.dealer_monitor, &event, &value)) {
      const std::string who = "peer '" + Name(peer) + "' at '" + p.config.connect + "'";
      switch (event) {
        case ZMQ_EVENT_CONNECTED:
          p.dial_connected = true;
          break;
        case ZMQ_EVENT_HANDSHAKE_SUCCEEDED:
          p.dial_handshaken = true;
          break;
        case ZMQ_EVENT_DISCONNECTED:
          if (p.dial_handshaken) {
            // A working connection dropped: ZeroMQ reconnects with the same (good) key; the
            // link comes up again with a new hello.
            p.dial_since = Clock::now();
            LinkDown(peer);
          }
          p.dial_connected = false;
          p.dial_handshaken = false;
          break;
        case ZMQ_EVENT_HANDSHAKE_FAILED_AUTH:
          Refuse(LinkRefusal::kDialFailed,
                 who + " refused this site's CURVE key (ZAP status " + std::to_string(value) +
                     "): does its config hold this site's current public key?");
          break;
        case ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL:
          Refuse(LinkRefusal::kDialFailed,
                 "CURVE handshake with " + who + " failed: " + HandshakeProtocolError(value));
          break;
        case ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL:
          Refuse(LinkRefusal::kDialFailed,
                 "CURVE handshake with " + who + " failed (" +
                     std::strerror(static_cast<int>(value)) + "): its box key is not the " +
                     (p.dial_previous_key ? "previous_public_key" : "public_key") +
                     " configured for it, or it closed the connection");
          break;
        default:
          break;
      }
    }
  }

  std::string DealerWhere(std::size_t peer) const {
    return "our connection to peer '" + Name(peer) + "' at '" + peers[peer]->config.connect + "'";
  }

  void DealerControl(std::size_t peer, std::string_view bytes) {
    std::string expired;
    auto r = Open(bytes, &expired);
    if (!r.ok()) {
      RejectedControl(r, expired);
      return;
    }
    const crypto::ControlMessage& m = *r.message;
    auto sender = PeerIndex(m.sender);
    if (!sender) return;
    PeerState& p = *peers[peer];
    if (*sender != peer) {
      RefuseSender(TypeName(m.type), *sender, DealerWhere(peer));
      return;
    }
    Contact(p);
    switch (m.type) {
      case crypto::ControlType::kHelloAck:
        if (!p.up) LinkUp(peer);
        return;
      case crypto::ControlType::kRehello:
        LinkDown(peer);
        p.last_hello = Clock::time_point{};  // say hello on the next tick
        return;
      case crypto::ControlType::kAck: {
        auto seq = DecodeU64(m.body);
        if (!seq) {
          handler->OnRejectedControl("malformed", "ack body is not 8 bytes");
          return;
        }
        handler->OnAck(peer, *seq, m.sender != p.config.identity.sign_pk);
        return;
      }
      default:
        return;
    }
  }

  void ReadDealer(std::size_t peer) {
    PeerState& p = *peers[peer];
    while (p.dealer) {
      zmq::message_t msg;
      if (!p.dealer->recv(msg, zmq::recv_flags::dontwait)) return;
      std::string bytes = msg.to_string();
      if (crypto::LooksLikeFrame(bytes)) {
        if (auto other = OtherFrameSender(peer, bytes)) {
          RefuseSender("frame", *other, DealerWhere(peer));
          continue;
        }
        Contact(p);
        handler->OnFrame(peer, std::move(bytes));
      } else {
        DealerControl(peer, bytes);
      }
    }
  }

  void DrainOutbox() {
    std::deque<Outgoing> items;
    {
      std::lock_guard<std::mutex> lock(mu);
      items.swap(outbox);
    }
    std::deque<Outgoing> retry;
    for (auto& item : items) {
      PeerState& p = *peers[item.peer];
      if (!p.up || (item.is_frame && item.epoch != p.epoch)) continue;  // stale: dropped
      if (!SendRaw(item.peer, item.bytes)) retry.push_back(std::move(item));
    }
    if (!retry.empty()) {
      std::lock_guard<std::mutex> lock(mu);
      for (auto it = retry.rbegin(); it != retry.rend(); ++it) outbox.push_front(std::move(*it));
    }
  }

  void Tick() {
    auto now = Clock::now();
    for (std::size_t i = 0; i < peers.size(); ++i) {
      PeerState& p = *peers[i];
      if (p.up && now - p.last_recv > options.peer_timeout) {
        LinkDown(i);
        if (p.dealer) {
          // The connection may be half dead: start over with a fresh socket (same key).
          NewDealer(i);
          p.last_hello = Clock::time_point{};
        }
      }
      if (p.up && now - p.last_ping >= options.heartbeat_interval) {
        p.last_ping = now;
        SendRaw(i, Control(i, crypto::ControlType::kPing));
      }
      if (!p.up && p.dealer && !p.dial_connected && !p.dial_handshaken &&
          now - p.dial_since >= DialRetryInterval()) {
        // No CURVE handshake for a while and none in progress: during a rotation, try the
        // peer's other key; in any case a fresh socket (after a ZAP refusal libzmq would not
        // try again). The key that works is kept: this only runs while nothing works.
        p.dial_previous_key = PreviousAccepted(p.config) && !p.dial_previous_key;
        NewDealer(i);
        p.last_hello = Clock::time_point{};
      }
      if (!p.up && p.dealer && now - p.last_hello >= options.heartbeat_interval) {
        // With ZMQ_IMMEDIATE the send fails until the handshake is complete: try again on the
        // next tick rather than a whole heartbeat interval later.
        if (SendRaw(i, Control(i, crypto::ControlType::kHello))) p.last_hello = now;
      }
    }
  }

  void Run() {
    auto tick = std::min(options.heartbeat_interval / 4, std::chrono::milliseconds(250));
    if (tick.count() < 1) tick = std::chrono::milliseconds(1);
    auto next_tick = Clock::now();
    while (!stop) {
      std::vector<zmq::pollitem_t> items;
      items.push_back({nullptr, wake_fd, ZMQ_POLLIN, 0});
      if (router) {
        // The monitor first: a connection's ACCEPTED event precedes its first message.
        items.push_back({listen_monitor->handle(), 0, ZMQ_POLLIN, 0});
        items.push_back({zap->handle(), 0, ZMQ_POLLIN, 0});
        items.push_back({router->handle(), 0, ZMQ_POLLIN, 0});
      }
      std::vector<std::size_t> dealer_peers;
      for (std::size_t i = 0; i < peers.size(); ++i) {
        if (peers[i]->dealer) {
          items.push_back({peers[i]->dealer_monitor->handle(), 0, ZMQ_POLLIN, 0});
          items.push_back({peers[i]->dealer->handle(), 0, ZMQ_POLLIN, 0});
          dealer_peers.push_back(i);
        }
      }
      auto wait = std::chrono::duration_cast<std::chrono::milliseconds>(next_tick - Clock::now());
      if (wait.count() < 0) wait = std::chrono::milliseconds(0);
      try {
        zmq::poll(items.data(), items.size(), wait);
        if (items[0].revents & ZMQ_POLLIN) {
          std::uint64_t v;
          [[maybe_unused]] auto n = read(wake_fd, &v, sizeof v);
        }
        std::size_t k = 1;
        if (router) {
          if (items[k].revents & ZMQ_POLLIN) ReadListenMonitor();
          if (items[k + 1].revents & ZMQ_POLLIN) ReadZap();
          if (items[k + 2].revents & ZMQ_POLLIN) {
            ReadListenMonitor();
            ReadRouter();
          }
          k += 3;
        }
        for (std::size_t i = 0; i < dealer_peers.size(); ++i, k += 2) {
          // Either may replace the peer's sockets (a link going down): read the monitor first.
          if (items[k].revents & ZMQ_POLLIN) ReadDealerMonitor(dealer_peers[i]);
          if (items[k + 1].revents & ZMQ_POLLIN) ReadDealer(dealer_peers[i]);
        }
        DrainOutbox();
        if (Clock::now() >= next_tick) {
          Tick();
          next_tick = Clock::now() + tick;
        }
      } catch (const zmq::error_t& e) {
        if (e.num() == ETERM) return;
        // Any other error is transient for a socket; the heartbeat logic recovers the link.
      }
    }
  }
};

ZmqLink::ZmqLink(const crypto::SiteKey& key, std::vector<LinkPeer> peers, ZmqLinkOptions options,
                 LinkHandler* handler, const crypto::SiteKey* previous_key)
    : impl_(std::make_unique<Impl>(key, std::move(peers), std::move(options), handler)) {
  impl_->previous_key = previous_key;
}

ZmqLink::~ZmqLink() { Stop(); }

Status ZmqLink::Start() {
  impl_->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (impl_->wake_fd < 0) return Status::Error("eventfd failed");
  if (!impl_->options.listen.empty()) {
    Impl& m = *impl_;
    try {
      // The ZAP handler is bound before the listener and closed after it, so that no CURVE
      // client is ever admitted without it (libzmq admits everyone when no handler is bound).
      m.zap = std::make_unique<zmq::socket_t>(m.context, zmq::socket_type::router);
      m.zap->set(zmq::sockopt::linger, 0);
      m.zap->bind(kZapEndpoint);
      m.router = std::make_unique<zmq::socket_t>(m.context, zmq::socket_type::router);
      m.ConfigureSocket(*m.router);
      m.router->set(zmq::sockopt::router_mandatory, 1);
      m.router->set(zmq::sockopt::curve_server, 1);
      m.router->set(zmq::sockopt::zap_domain, kZapDomain);
      // During a rotation the listener keeps the previous key, which the peers that have not
      // learned the new one still dial (docs/deployment.md, key rotation).
      const crypto::SiteKey& server = m.previous_key ? *m.previous_key : m.key;
      server.LendBoxSecret(
          [&](const std::uint8_t* secret) { SetKey(*m.router, ZMQ_CURVE_SECRETKEY, secret); });
      if (zmq_socket_monitor(m.router->handle(), kListenMonitor,
                             ZMQ_EVENT_ACCEPTED | ZMQ_EVENT_DISCONNECTED |
                                 ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL |
                                 ZMQ_EVENT_HANDSHAKE_FAILED_AUTH) != 0)
        throw zmq::error_t();
      m.listen_monitor = std::make_unique<zmq::socket_t>(m.context, zmq::socket_type::pair);
      m.listen_monitor->set(zmq::sockopt::linger, 0);
      m.listen_monitor->connect(kListenMonitor);
      m.router->bind(m.options.listen);
    } catch (const zmq::error_t& e) {
      m.router.reset();
      m.listen_monitor.reset();
      m.zap.reset();
      return Status::Error("cannot listen on '" + m.options.listen + "': " + e.what());
    }
  }
  for (std::size_t i = 0; i < impl_->peers.size(); ++i) {
    PeerState& p = *impl_->peers[i];
    if (p.config.connect.empty()) continue;
    try {
      impl_->NewDealer(i);
    } catch (const zmq::error_t& e) {
      return Status::Error("cannot dial peer '" + p.config.name + "' at '" + p.config.connect +
                           "': " + e.what());
    }
  }
  impl_->thread = std::thread([this] {
    pthread_setname_np(pthread_self(), "relay-link");
    impl_->Run();
  });
  return Status::Ok();
}

void ZmqLink::Stop() {
  if (!impl_) return;
  if (impl_->thread.joinable()) {
    impl_->stop = true;
    impl_->Wake();
    impl_->thread.join();
  }
  impl_->router.reset();
  impl_->listen_monitor.reset();
  impl_->zap.reset();
  for (auto& p : impl_->peers) {
    p->dealer.reset();
    p->dealer_monitor.reset();
  }
  if (impl_->wake_fd >= 0) {
    close(impl_->wake_fd);
    impl_->wake_fd = -1;
  }
}

void ZmqLink::SendFrame(std::size_t peer, std::uint64_t epoch, std::string frame) {
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->outbox.push_back({peer, epoch, true, std::move(frame)});
  }
  impl_->Wake();
}

void ZmqLink::SendAck(std::size_t peer, std::uint64_t seq) {
  std::string msg = impl_->Control(peer, crypto::ControlType::kAck, EncodeU64(seq));
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->outbox.push_back({peer, 0, false, std::move(msg)});
  }
  impl_->Wake();
}

bool ZmqLink::IsUp(std::size_t peer) const { return impl_->peers[peer]->up_flag; }

std::int64_t ZmqLink::LastContactMs(std::size_t peer) const {
  return impl_->peers[peer]->last_contact_ms;
}

}  // namespace relay::transports
