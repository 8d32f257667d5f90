#include "transports/zmq_link.h"

#include <pthread.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
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

struct Outgoing {
  std::size_t peer;
  std::uint64_t epoch;  // 0 for control messages (not tied to an epoch)
  bool is_frame;
  std::string bytes;
};

struct PeerState {
  LinkPeer config;
  std::unique_ptr<zmq::socket_t> dealer;  // when config.connect is set
  std::optional<std::string> router_id;   // when reached through our listener
  bool up = false;
  std::uint64_t epoch = 0;
  Clock::time_point last_recv{};
  Clock::time_point last_ping{};
  Clock::time_point last_hello{};
  std::atomic<bool> up_flag{false};
  std::atomic<std::int64_t> last_contact_ms{0};
};

}  // namespace

struct ZmqLink::Impl {
  const crypto::SiteKey& key;
  const crypto::SiteKey* previous_key = nullptr;
  ZmqLinkOptions options;
  LinkHandler* handler;
  std::vector<std::unique_ptr<PeerState>> peers;
  zmq::context_t context{1};
  std::unique_ptr<zmq::socket_t> router;
  int wake_fd = -1;
  std::thread thread;
  std::atomic<bool> stop{false};
  std::mutex mu;
  std::deque<Outgoing> outbox;                      // guarded by mu
  std::map<std::string, std::size_t> router_peers;  // routing id -> peer, link thread only

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
  }

  void NewDealer(PeerState& p) {
    p.dealer = std::make_unique<zmq::socket_t>(context, zmq::socket_type::dealer);
    ConfigureSocket(*p.dealer);
    // Queue nothing for a connection that is not complete: stale frames would be sent late.
    p.dealer->set(zmq::sockopt::immediate, 1);
    p.dealer->connect(p.config.connect);
  }

  std::string Control(std::size_t peer, crypto::ControlType type, std::string_view body = {}) {
    return crypto::SealControl(key, peers[peer]->config.identity, type, WallMs(), body);
  }

  // Sends on the peer's current route. False when there is no route or the socket refused.
  bool SendRaw(std::size_t peer, const std::string& bytes, bool prefer_dealer = true) {
    PeerState& p = *peers[peer];
    try {
      if (p.dealer && (prefer_dealer || !p.router_id)) {
        return p.dealer->send(zmq::buffer(bytes), zmq::send_flags::dontwait).has_value();
      }
      if (p.router_id && router) {
        if (!router->send(zmq::buffer(*p.router_id),
                          zmq::send_flags::sndmore | zmq::send_flags::dontwait))
          return false;
        return router->send(zmq::buffer(bytes), zmq::send_flags::dontwait).has_value();
      }
    } catch (const zmq::error_t& e) {
      // EHOSTUNREACH: the peer's connection to our listener is gone.
      if (!p.dealer && p.router_id) {
        router_peers.erase(*p.router_id);
        p.router_id.reset();
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

  void HandleControl(const std::optional<std::string>& router_id, std::string_view bytes) {
    std::string expired;
    auto r = Open(bytes, &expired);
    if (!r.ok()) {
      if (!expired.empty()) {
        handler->OnRejectedControl("previous_key_expired", "control message from peer '" + expired +
                                                               "' refused: signed with its "
                                                               "previous key after its "
                                                               "previous_public_key_until");
        return;
      }
      handler->OnRejectedControl(crypto::RejectReasonName(r.rejection.reason), r.rejection.message);
      return;
    }
    const crypto::ControlMessage& m = *r.message;
    auto idx = PeerIndex(m.sender);
    if (!idx) return;  // OpenControl already checked the sender is known
    std::size_t peer = *idx;
    PeerState& p = *peers[peer];
    p.last_contact_ms = WallMs();
    p.last_recv = Clock::now();
    if (router_id) {
      bool known = router_peers.count(*router_id) && router_peers[*router_id] == peer;
      if (m.type == crypto::ControlType::kHello) {
        if (p.router_id && *p.router_id != *router_id) router_peers.erase(*p.router_id);
        p.router_id = *router_id;
        router_peers[*router_id] = peer;
        SendRaw(peer, Control(peer, crypto::ControlType::kHelloAck), /*prefer_dealer=*/false);
        // A peer we dial ourselves keeps using our connection; otherwise this hello starts a
        // new epoch (the peer may have restarted and lost what was in flight).
        if (!p.dealer) {
          p.up = false;
          LinkUp(peer);
        }
        return;
      }
      if (!known) {
        // A connection we have no hello for (we restarted, or it reconnected): ask again.
        std::string rid = *router_id;
        try {
          router->send(zmq::buffer(rid), zmq::send_flags::sndmore | zmq::send_flags::dontwait);
          router->send(zmq::buffer(Control(peer, crypto::ControlType::kRehello)),
                       zmq::send_flags::dontwait);
        } catch (const zmq::error_t&) {
        }
        return;
      }
    } else {
      // From our dealer.
      if (m.type == crypto::ControlType::kHelloAck) {
        if (!p.up) LinkUp(peer);
        return;
      }
      if (m.type == crypto::ControlType::kRehello) {
        LinkDown(peer);
        p.last_hello = Clock::time_point{};  // say hello on the next tick
        return;
      }
    }
    if (m.type == crypto::ControlType::kAck) {
      auto seq = DecodeU64(m.body);
      if (!seq) {
        handler->OnRejectedControl("malformed", "ack body is not 8 bytes");
        return;
      }
      handler->OnAck(peer, *seq, m.sender != p.config.identity.sign_pk);
    }
  }

  void HandleFrame(std::optional<std::size_t> peer, const std::optional<std::string>& router_id,
                   std::string bytes) {
    if (!peer) {
      // Frame on a connection without hello: the header names the sender; ask it to say hello
      // (the frame will be re-sent in the new epoch).
      if (router_id && bytes.size() >= 40) {
        crypto::PublicKey pk;
        std::copy(bytes.begin() + 8, bytes.begin() + 40, pk.begin());
        if (auto idx = PeerIndex(pk)) {
          try {
            router->send(zmq::buffer(*router_id),
                         zmq::send_flags::sndmore | zmq::send_flags::dontwait);
            router->send(zmq::buffer(Control(*idx, crypto::ControlType::kRehello)),
                         zmq::send_flags::dontwait);
          } catch (const zmq::error_t&) {
          }
        }
      }
      return;
    }
    peers[*peer]->last_recv = Clock::now();
    peers[*peer]->last_contact_ms = WallMs();
    handler->OnFrame(*peer, std::move(bytes));
  }

  void ReadRouter() {
    while (true) {
      zmq::message_t id, msg;
      if (!router->recv(id, zmq::recv_flags::dontwait)) return;
      if (!id.more()) continue;
      if (!router->recv(msg, zmq::recv_flags::dontwait)) return;
      while (msg.more()) {  // a well-behaved peer sends one part; drain any extra
        zmq::message_t extra;
        if (!router->recv(extra, zmq::recv_flags::dontwait)) break;
        msg = std::move(extra);
      }
      std::string rid = id.to_string();
      std::string bytes = msg.to_string();
      if (crypto::LooksLikeFrame(bytes)) {
        auto it = router_peers.find(rid);
        HandleFrame(
            it == router_peers.end() ? std::nullopt : std::optional<std::size_t>(it->second), rid,
            std::move(bytes));
      } else {
        HandleControl(rid, bytes);
      }
    }
  }

  void ReadDealer(std::size_t peer) {
    PeerState& p = *peers[peer];
    while (p.dealer) {
      zmq::message_t msg;
      if (!p.dealer->recv(msg, zmq::recv_flags::dontwait)) return;
      std::string bytes = msg.to_string();
      if (crypto::LooksLikeFrame(bytes)) {
        HandleFrame(peer, std::nullopt, std::move(bytes));
      } else {
        HandleControl(std::nullopt, bytes);
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
          // The connection may be half dead: start over with a fresh socket.
          NewDealer(p);
          p.last_hello = Clock::time_point{};
        }
      }
      if (p.up && now - p.last_ping >= options.heartbeat_interval) {
        p.last_ping = now;
        SendRaw(i, Control(i, crypto::ControlType::kPing));
      }
      if (!p.up && p.dealer && now - p.last_hello >= options.heartbeat_interval) {
        // With ZMQ_IMMEDIATE the send fails until the connection is complete: try again on the
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
      if (router) items.push_back({router->handle(), 0, ZMQ_POLLIN, 0});
      std::vector<std::size_t> dealer_peers;
      for (std::size_t i = 0; i < peers.size(); ++i) {
        if (peers[i]->dealer) {
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
          if (items[k].revents & ZMQ_POLLIN) ReadRouter();
          ++k;
        }
        for (std::size_t i = 0; i < dealer_peers.size(); ++i, ++k) {
          if (items[k].revents & ZMQ_POLLIN) ReadDealer(dealer_peers[i]);
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
  try {
    if (!impl_->options.listen.empty()) {
      impl_->router = std::make_unique<zmq::socket_t>(impl_->context, zmq::socket_type::router);
      impl_->ConfigureSocket(*impl_->router);
      impl_->router->set(zmq::sockopt::router_mandatory, 1);
      impl_->router->bind(impl_->options.listen);
    }
  } catch (const zmq::error_t& e) {
    return Status::Error("cannot listen on '" + impl_->options.listen + "': " + e.what());
  }
  for (auto& p : impl_->peers) {
    if (p->config.connect.empty()) continue;
    try {
      impl_->NewDealer(*p);
    } catch (const zmq::error_t& e) {
      return Status::Error("cannot dial peer '" + p->config.name + "' at '" + p->config.connect +
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
  for (auto& p : impl_->peers) p->dealer.reset();
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
