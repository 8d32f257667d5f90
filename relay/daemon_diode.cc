// Daemon::Impl, data diode: the UDP sender (paced, FEC) and receiver, resend requests
// and the retention of unacknowledged positions. See relay/daemon_impl.h.

#include "relay/daemon_impl.h"

#include <netdb.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <map>

#include "base/log.h"

namespace relay {
namespace {

// Resolves "udp://host:port" into a socket address; error names the endpoint.
Status ResolveUdp(const std::string& url, sockaddr_storage* addr, socklen_t* len) {
  std::string rest = url.substr(url.find("://") + 3);
  auto colon = rest.rfind(':');
  if (colon == std::string::npos) return Status::Error("bad UDP endpoint '" + url + "'");
  std::string host = rest.substr(0, colon), port = rest.substr(colon + 1);
  if (host.size() > 1 && host.front() == '[') host = host.substr(1, host.size() - 2);
  if (host == "*") host = "0.0.0.0";
  addrinfo hints{};
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* res = nullptr;
  if (int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &res); rc != 0 || !res)
    return Status::Error("cannot resolve '" + url + "': " + gai_strerror(rc));
  std::memcpy(addr, res->ai_addr, res->ai_addrlen);
  *len = static_cast<socklen_t>(res->ai_addrlen);
  freeaddrinfo(res);
  return Status::Ok();
}

}  // namespace

using daemon_detail::AckedKey;
using daemon_detail::DiodeInKey;
using daemon_detail::DiodePosKey;
using daemon_detail::DiodeRecordKey;
using daemon_detail::DiodeStreamKey;
using daemon_detail::kAnyPeer;
using daemon_detail::kForeverMs;
using daemon_detail::NowMs;

Status Daemon::Impl::StartDiode() {
  for (std::size_t i = 0; i < peers.size(); ++i) {
    const config::PeerConfig& pc = *peers[i].config;
    if (pc.diode_send.empty()) continue;
    auto ds = std::make_unique<DiodeSender>();
    ds->peer = i;
    if (Status s = ResolveUdp(pc.diode_send, &ds->addr, &ds->addr_len); !s) return s;
    ds->fd = ::socket(ds->addr.ss_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (ds->fd < 0)
      return Status::Error("cannot create a UDP socket: " + std::string(std::strerror(errno)));
    int buf = 4 << 20;
    ::setsockopt(ds->fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
    transports::DiodeParams params;
    params.data_shards = static_cast<std::uint16_t>(pc.diode_data_shards);
    params.parity_shards = static_cast<std::uint16_t>(pc.diode_parity_shards);
    params.interleave = static_cast<std::uint16_t>(pc.diode_interleave);
    auto tag_key = transports::DiodeKey::ForSending(*key, peers[i].identity);
    if (!tag_key) return tag_key.status().Wrap("[peer." + peers[i].name + "] diode_send");
    // Stream ids only grow (receivers refuse older streams as replays, and (stream, datagram
    // number) is the tag's nonce): a durable counter, raised past the wall clock in µs at each
    // start, so that a re-created store still starts above the streams of earlier runs.
    const auto now_us =
        static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(
                                       std::chrono::system_clock::now().time_since_epoch())
                                       .count());
    const std::uint64_t stream =
        std::max(store->GetCounter(DiodeStreamKey(peers[i].name), 0) + 1, now_us);
    queue::WriteBatch stream_batch(*store);
    stream_batch.PutCounter(DiodeStreamKey(peers[i].name), stream);
    if (Status s = store->Commit(stream_batch, true); !s)
      return s.Wrap("recording the diode stream for peer '" + peers[i].name + "'");
    ds->encoder = std::make_unique<transports::DiodeEncoder>(
        stream, params,
        transports::DiodeKey::Sealer(
            std::make_shared<transports::DiodeKey>(std::move(tag_key).value())));
    std::uint64_t sent = store->GetCounter(DiodePosKey(peers[i].name), 0);
    ds->scan = std::max(sent, peers[i].acked) + 1;
    ds->pos = ds->scan;
    ds->refill = Clock::now();
    diode_senders.push_back(std::move(ds));
  }
  if (!diode_senders.empty()) {
    diode_send_thread = RunNamed("relay-diode-tx", &Impl::DiodeSendLoop);
  }
  if (!config.diode_listen.empty()) {
    // The tag keys of every peer's datagrams: its current and (during a rotation) previous
    // identity, to this site's current and previous key.
    diode_keyring = std::make_unique<transports::DiodeKeyring>();
    diode_stream_floor.assign(peers.size(), 0);
    for (std::size_t p = 0; p < peers.size(); ++p) {
      const auto& prev = peers[p].config->previous_public_key;
      const crypto::PublicIdentity* ids[] = {&peers[p].identity, prev ? &*prev : nullptr};
      const crypto::SiteKey* selves[] = {&*key, previous_key ? &*previous_key : nullptr};
      for (const crypto::PublicIdentity* id : ids) {
        for (const crypto::SiteKey* self : selves) {
          if (id == nullptr || self == nullptr) continue;
          if (Status s = diode_keyring->Add(static_cast<std::uint32_t>(p), *self, *id); !s)
            return s.Wrap("[peer." + peers[p].name + "] diode keys");
        }
      }
      diode_stream_floor[p] = store->GetCounter(DiodeInKey(peers[p].name), 0);
      const auto text = store->GetDedup(DiodeRecordKey(peers[p].name), NowMs());
      diode_records.push_back(text ? transports::DiodeDecoder::StreamRecord::Decode(*text)
                                   : std::nullopt);
      if (text && !diode_records.back())
        log::Warning("diode: the stored record of peer '" + peers[p].name +
                     "''s stream is unreadable; its frames sent before this start count missing");
      diode_record_text.push_back(text.value_or(""));
    }
    sockaddr_storage addr{};
    socklen_t len = 0;
    if (Status s = ResolveUdp(config.diode_listen, &addr, &len); !s) return s;
    diode_recv_fd = ::socket(addr.ss_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    // A large receive buffer absorbs bursts while frames are stored. SO_RCVBUFFORCE passes
    // net.core.rmem_max when the process may (root, CAP_NET_ADMIN); else the capped size.
    int buf = 64 << 20;
    if (::setsockopt(diode_recv_fd, SOL_SOCKET, SO_RCVBUFFORCE, &buf, sizeof buf) != 0)
      ::setsockopt(diode_recv_fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
    if (diode_recv_fd < 0 || ::bind(diode_recv_fd, reinterpret_cast<sockaddr*>(&addr), len) != 0)
      return Status::Error("cannot listen on '" + config.diode_listen +
                           "': " + std::strerror(errno));
    timeval tv{0, 200000};
    ::setsockopt(diode_recv_fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    diode_recv_thread = RunNamed("relay-diode-rx", &Impl::DiodeRecvLoop);
  }
  return Status::Ok();
}

void Daemon::Impl::StopDiode() {
  if (diode_send_thread.joinable()) diode_send_thread.join();
  if (diode_recv_thread.joinable()) diode_recv_thread.join();
  for (auto& ds : diode_senders)
    if (ds->fd >= 0) ::close(ds->fd);
  if (diode_recv_fd >= 0) ::close(diode_recv_fd);
  diode_recv_fd = -1;
}

void Daemon::Impl::SendPaced(DiodeSender& ds, const std::string& dg) {
  double rate = static_cast<double>(peers[ds.peer].config->diode_rate);
  while (!stopping) {
    auto now = Clock::now();
    ds.tokens =
        std::min(rate, ds.tokens + rate * std::chrono::duration<double>(now - ds.refill).count());
    ds.refill = now;
    if (ds.tokens >= static_cast<double>(dg.size())) break;
    double wait_s = (static_cast<double>(dg.size()) - ds.tokens) / rate;
    std::this_thread::sleep_for(std::chrono::duration<double>(std::min(wait_s, 0.005)));
  }
  ds.tokens -= static_cast<double>(dg.size());
  // A full socket buffer or an unreachable receiver: the datagram is lost, which is what a
  // diode does anyway; FEC, heartbeats and resend requests deal with it.
  if (::sendto(ds.fd, dg.data(), dg.size(), 0, reinterpret_cast<sockaddr*>(&ds.addr),
               ds.addr_len) == static_cast<ssize_t>(dg.size()))
    ++metrics.diode_datagrams_sent;
}

void Daemon::Impl::DiodeSendLoop() {
  std::vector<std::string> datagrams;
  while (!stopping) {
    bool did = false;
    for (auto& dsp : diode_senders) {
      DiodeSender& ds = *dsp;
      auto now = Clock::now();
      if (now - ds.last_heartbeat >= config.heartbeat_interval) {
        ds.last_heartbeat = now;
        SendPaced(ds, ds.encoder->Heartbeat());
      }
      // Ranges asked for again by a resend request come first.
      std::uint64_t first, from, head;
      bool resending = false;
      {
        std::lock_guard<std::mutex> lock(diode_mu);
        if (!ds.resend.empty()) {
          first = from = ds.resend.front().first;
          head = ds.resend.front().second;
          ds.resend.pop_front();
          resending = true;
        }
      }
      if (!resending) {
        first = ds.pos.load();
        from = ds.scan;
        head = published.load();
        if (from > head) continue;
      }
      while (from <= head && !stopping) {
        auto built = BuildFrame(ds.peer, first, from, head);
        if (!built) {
          log::Error("diode sender: " + built.message());
          break;
        }
        from = built->last_seq + 1;
        if (built->count == 0) continue;
        datagrams.clear();
        ds.encoder->Encode(built->bytes, &datagrams);
        for (const std::string& dg : datagrams) SendPaced(ds, dg);
        ++peers[ds.peer].metrics->frames_sent;
        peers[ds.peer].metrics->events_sent += built->count;
        {
          std::lock_guard<std::mutex> lock(ship_mu);
          peers[ds.peer].sent_through = std::max(peers[ds.peer].sent_through, built->last_seq);
        }
        first = from;
        did = true;
        if (!resending) ds.pos = from;
      }
      if (!resending) {
        ds.scan = from;
        queue::WriteBatch b(*store);
        b.PutCounter(DiodePosKey(peers[ds.peer].name), ds.pos - 1);
        (void)store->Commit(b, false);  // lost: those frames are sent again, deduplicated
      }
    }
    if (!did) {
      std::unique_lock<std::mutex> lock(ship_mu);
      ship_cv.wait_for(lock, std::chrono::milliseconds(100));
    }
  }
}

void Daemon::Impl::QueueResend(std::size_t peer, std::uint64_t accepted_through,
                               const std::vector<std::pair<std::uint64_t, std::uint64_t>>& have) {
  for (auto& dsp : diode_senders) {
    if (dsp->peer != peer) continue;
    std::lock_guard<std::mutex> lock(diode_mu);
    std::uint64_t next = accepted_through + 1, end = dsp->pos - 1;
    std::size_t queued = 0;
    for (const auto& [a, b] : have) {
      if (a > next && next <= end) {
        dsp->resend.emplace_back(next, std::min(a - 1, end));
        ++queued;
      }
      next = std::max(next, b + 1);
    }
    if (next <= end) {
      dsp->resend.emplace_back(next, end);
      ++queued;
    }
    metrics.diode_resend_ranges += queued;
    log::Info("resend request from '" + peers[peer].name + "': " + std::to_string(queued) +
              " range(s) queued for the diode again");
  }
  ship_cv.notify_all();
}

void Daemon::Impl::DiodeRecvLoop() {
  transports::DiodeDecoder decoder(diode_keyring->Authenticator());
  for (std::size_t p = 0; p < peers.size(); ++p) {
    const auto sender = static_cast<std::uint32_t>(p);
    decoder.SetStreamFloor(sender, diode_stream_floor[p]);
    if (diode_records[p]) decoder.Restore(sender, *diode_records[p]);
  }
  std::vector<transports::DiodeDecoder::Message> done;
  // Imports handed to the inbound thread and not settled yet, with the messages they carry:
  // until then their ids are not recorded as complete.
  std::map<std::uint64_t, std::vector<DiodeMessageRef>> unsettled;
  std::uint64_t next_import = 0;
  std::vector<DiodeMessageRef> not_stored;
  std::vector<std::pair<std::uint64_t, bool>> settled;
  std::string buf(65536, '\0');
  auto last_stats = Clock::now();
  // Writes the record of each peer's newest stream when it changed (not synced: an older
  // record after a crash only counts more as missing).
  auto write_records = [&] {
    queue::WriteBatch batch(*store);
    for (std::size_t p = 0; p < peers.size(); ++p) {
      const auto sender = static_cast<std::uint32_t>(p);
      std::vector<std::uint64_t> open;
      const std::uint64_t newest = decoder.HighestStream(sender);
      for (const auto& entry : unsettled) {
        for (const DiodeMessageRef& r : entry.second) {
          if (r.sender == sender && r.stream == newest) open.push_back(r.message);
        }
      }
      auto record = decoder.Record(sender, open);
      if (!record) continue;
      std::string text = record->Encode();
      if (text == diode_record_text[p]) continue;
      batch.PutDedup(DiodeRecordKey(peers[p].name), NowMs() + kForeverMs, text);
      diode_record_text[p] = std::move(text);
    }
    if (batch.Count() > 0) {
      if (Status s = store->Commit(batch, false); !s)
        log::Error("recording the diode streams failed: " + s.message());
    }
  };
  // What the inbound thread did with earlier frames: those not stored are missing again.
  auto take_verdicts = [&] {
    {
      std::lock_guard<std::mutex> lock(diode_mu);
      not_stored.swap(diode_not_stored);
      settled.swap(diode_settled);
    }
    for (const auto& [settled_number, ok] : settled) {
      auto it = unsettled.find(settled_number);
      if (it == unsettled.end()) continue;
      if (!ok) not_stored.insert(not_stored.end(), it->second.begin(), it->second.end());
      unsettled.erase(it);
    }
    for (const DiodeMessageRef& r : not_stored) decoder.Reopen(r.sender, r.stream, r.message);
    metrics.diode_frames_not_stored += not_stored.size();
    not_stored.clear();
    settled.clear();
  };
  while (!stopping) {
    done.clear();
    take_verdicts();
    // Read what is there (bounded), then store the frames completed so far in one batch.
    for (int i = 0; i < 4096; ++i) {
      ssize_t n = ::recv(diode_recv_fd, buf.data(), buf.size(), i == 0 ? 0 : MSG_DONTWAIT);
      if (n < 0) break;
      ++metrics.diode_datagrams_received;
      Status s = decoder.Feed(std::string_view(buf.data(), static_cast<std::size_t>(n)), &done);
      if (!s) {
        for (std::size_t r = 0; r < metrics.diode_datagrams_rejected.size(); ++r)
          metrics.diode_datagrams_rejected[r] =
              decoder.rejected(static_cast<transports::DiodeReject>(r));
        metrics.diode_datagrams_malformed = decoder.rejected(transports::DiodeReject::kMalformed);
        if (warn_limiter.Allow()) log::Warning("diode datagram refused: " + s.message());
      }
    }
    if (!done.empty()) {
      // Each frame keeps the name of its message, so that one the inbound thread does not store
      // (it fails verification, or there is no room) is counted missing again.
      auto refs = std::make_shared<std::vector<DiodeMessageRef>>();
      auto arrived = std::make_unique<BundleImport>();
      arrived->all_or_nothing = false;
      for (auto& m : done) {
        arrived->frames.push_back({kAnyPeer, std::move(m.bytes), refs->size()});
        refs->push_back({m.sender, m.stream_id, m.message_id});
      }
      const std::uint64_t number = next_import++;
      unsettled.emplace(number, *refs);
      arrived->not_stored = [this, refs](const ReceivedFrame& f) {
        std::lock_guard<std::mutex> lock(diode_mu);
        diode_not_stored.push_back((*refs)[f.ref]);
      };
      arrived->settled = [this, number](const Status& st) {
        std::lock_guard<std::mutex> lock(diode_mu);
        diode_settled.emplace_back(number, st.ok());
      };
      metrics.diode_messages_received += done.size();
      SubmitFramesAsync(std::move(arrived));
    }
    // A newer stream of a peer: remember it now, so that its older streams stay refused as
    // replays after a restart (rare: once per start of the sender).
    queue::WriteBatch floors(*store);
    for (std::size_t p = 0; p < peers.size(); ++p) {
      const std::uint64_t highest = decoder.HighestStream(static_cast<std::uint32_t>(p));
      if (highest <= diode_stream_floor[p]) continue;
      floors.PutCounter(DiodeInKey(peers[p].name), highest);
      diode_stream_floor[p] = highest;
    }
    if (floors.Count() > 0) {
      if (Status s = store->Commit(floors, true); !s)
        log::Error("recording the newest diode streams failed: " + s.message());
    }
    if (Clock::now() - last_stats > std::chrono::seconds(1)) {
      last_stats = Clock::now();
      // Saturate: the gauge is an int64.
      constexpr std::uint64_t kMaxGauge = std::numeric_limits<std::int64_t>::max();
      metrics.diode_shards_recovered = decoder.recovered_shards();
      metrics.diode_messages_missing = std::min(kMaxGauge, decoder.MissingCount());
      if (decoder.streams_dropped() > metrics.diode_streams_dropped) {
        log::Warning("diode: state of " +
                     std::to_string(decoder.streams_dropped() - metrics.diode_streams_dropped) +
                     " earlier sender stream(s) dropped for newer ones (each sender's two newest "
                     "are kept: a sender restarted twice); their missing frames stay counted");
        metrics.diode_streams_dropped = decoder.streams_dropped();
      }
      write_records();
    }
  }
  // The inbound thread is still running: give it a moment to settle what was handed over, so
  // that the last record counts those frames as they are.
  for (auto until = Clock::now() + std::chrono::seconds(2);
       !unsettled.empty() && Clock::now() < until;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    take_verdicts();
  }
  write_records();
}

void Daemon::Impl::ApplyDiodeRetention() {
  auto now = Clock::now();
  head_samples.emplace_back(now, published.load());
  std::chrono::milliseconds longest{0};
  for (const auto& ds : diode_senders)
    longest = std::max(longest, peers[ds->peer].config->diode_retention);
  while (head_samples.size() > 1 &&
         now - head_samples.front().first > longest + std::chrono::minutes(1))
    head_samples.erase(head_samples.begin());
  for (const auto& ds : diode_senders) {
    PeerRuntime& p = peers[ds->peer];
    std::uint64_t expired = 0;  // log head as it was one retention time ago
    for (const auto& [t, seq] : head_samples)
      if (now - t >= p.config->diode_retention) expired = seq;
    // Only what the diode sender has sent (it reads below ds->pos).
    expired = std::min(expired, ds->pos - 1);
    std::uint64_t dropped = 0;
    {
      std::lock_guard<std::mutex> lock(ship_mu);
      if (expired <= p.acked) continue;
      dropped = expired - p.acked;
      p.acked = expired;
      p.metrics->acked_through = expired;
    }
    queue::WriteBatch b(*store);
    b.PutCounter(AckedKey(p.name), expired);
    (void)store->Commit(b, false);
    metrics.diode_retention_dropped += dropped;
    log::Warning("diode peer '" + p.name + "': " + std::to_string(dropped) +
                 " log position(s) sent more than the retention time ago were never "
                 "acknowledged and are dropped from the queue");
  }
}

}  // namespace relay
