// Daemon::Impl, maintenance thread: outbound and inbound GC, spool collection,
// files_auto transfers and gauges. See relay/daemon_impl.h.

#include "relay/daemon_impl.h"

#include <sys/stat.h>

#include <algorithm>
#include <filesystem>

#include "base/log.h"

namespace relay {
namespace {

constexpr std::size_t kGcScanLimit = 50'000;

}  // namespace

using daemon_detail::AcceptedKey;
using daemon_detail::SentKey;

void Daemon::Impl::CollectSpools() {
  if (Clock::now() - last_spool_collection < std::chrono::minutes(10) &&
      last_spool_collection != Clock::time_point{})
    return;
  last_spool_collection = Clock::now();
  std::size_t n = CollectSpool(config.data_dir + "/spool/in", config.dedup_ttl);
  if (n > 0) {
    metrics.spool_collected += n;
    log::Info("removed " + std::to_string(n) + " orphaned spool file(s) older than dedup_ttl");
  }
}

void Daemon::Impl::MaintenanceLoop() {
  while (!stopping) {
    {
      std::unique_lock<std::mutex> lock(maint_mu);
      maint_cv.wait_for(lock, std::chrono::seconds(1), [&] { return stopping.load(); });
    }
    if (stopping) return;
    CollectOutbound();
    CollectInbound();
    CollectSpools();
    MeasureSpool();
    AutoFiles();
    NoticePreviousKeys(std::chrono::system_clock::now());
    // Expired dedup entries go with RocksDB's compactions; force one every few hours so
    // an idle site does not keep them for ever.
    if (Clock::now() - last_dedup_compaction > std::chrono::hours(6)) {
      last_dedup_compaction = Clock::now();
      if (Status c = store->CompactDedup(); !c) log::Error(c.message());
    }
    metrics.store_bytes = store->ApproximateSize();
  }
}

void Daemon::Impl::AutoFiles() {
  auto now = Clock::now();
  for (std::size_t i = 0; i < peers.size(); ++i) {
    const config::PeerConfig& pc = *peers[i].config;
    if (!pc.files_auto) continue;
    auto& last = auto_files_last[pc.name];
    if (now - last < pc.files_interval) continue;
    last = now;
    std::vector<std::string> incoming;
    std::error_code ec;
    std::string prefix = pc.name + "-to-" + config.site_name + "-";
    for (const auto& entry : std::filesystem::directory_iterator(pc.files_dir, ec)) {
      std::string name = entry.path().filename().string();
      if (name.rfind(prefix, 0) != 0 || auto_files_seen.count(entry.path().string())) continue;
      // Only plain files: a FIFO would block this thread, a symlink could point anywhere
      // (e.g. /dev/zero). Whoever writes to the transfer folder is not trusted.
      std::error_code type_ec;
      if (entry.symlink_status(type_ec).type() != std::filesystem::file_type::regular) {
        if (auto_files_seen.insert(entry.path().string()).second)
          log::Warning("files_dir: " + entry.path().string() +
                       " ignored: not a regular file (symlink, FIFO, device or folder)");
        continue;
      }
      auto_files_seen.insert(entry.path().string());
      incoming.push_back(entry.path().string());
    }
    std::sort(incoming.begin(), incoming.end());
    for (const auto& r : Import(incoming)) {
      if (r.ok) {
        log::Info("files_dir: " + r.path + ": " + r.message);
      } else {
        log::Warning("files_dir: " + r.path + " refused: " + r.message);
      }
    }
    ExportOptions o;
    o.peer = pc.name;
    o.out_dir = pc.files_dir;
    auto r = Export(o);
    if (!r) log::Warning("files_dir: export for '" + pc.name + "' failed: " + r.message());
    std::uint64_t accepted_now = store->GetCounter(AcceptedKey(pc.name), 0);
    if (accepted_now > auto_acked[pc.name]) {
      o.ack = true;
      if (Export(o)) auto_acked[pc.name] = accepted_now;
    }
  }
}

void Daemon::Impl::CollectInbound() {
  std::uint64_t removable = delivered_through.load();
  if (bridge) removable = std::min(removable, bridge->replayed_through());
  if (removable <= inbound_removed) return;
  // What each peer's events held in the store goes with them ([peer] max_inbound).
  std::vector<std::uint64_t> freed(peers.size(), 0);
  Status scan = store->ScanInbound(inbound_removed + 1, [&](std::uint64_t seq, std::string_view e) {
    if (seq > removable) return false;
    if (auto p = InboundPeerOf(e)) freed[*p] += e.size();
    return true;
  });
  if (!scan) {
    log::Error("inbound GC: " + scan.message());
    return;
  }
  queue::WriteBatch b(*store);
  b.DeleteInboundRange(inbound_removed + 1, removable + 1);
  if (Status s = store->Commit(b, false); !s) {
    log::Error("inbound GC: " + s.message());
    return;
  }
  inbound_removed = removable;
  for (std::size_t p = 0; p < peers.size(); ++p) {
    std::atomic<std::uint64_t>& held = peers[p].metrics->inbound_held;
    held -= std::min(held.load(), freed[p]);
  }
}

void Daemon::Impl::MeasureSpool() {
  if (Clock::now() - last_spool_measure < std::chrono::seconds(5)) return;
  last_spool_measure = Clock::now();
  std::map<std::string, std::uint64_t> usage;
  std::error_code ec;
  const std::filesystem::path in = std::filesystem::path(config.data_dir) / "spool" / "in";
  for (const auto& origin : std::filesystem::directory_iterator(in, ec)) {
    std::uint64_t bytes = 0;
    std::error_code ec2;
    for (const auto& f : std::filesystem::directory_iterator(origin.path(), ec2)) {
      struct stat st {};
      if (::lstat(f.path().c_str(), &st) == 0 && S_ISREG(st.st_mode))
        bytes += static_cast<std::uint64_t>(st.st_blocks) * 512;  // sparse until complete
    }
    usage[origin.path().filename().string()] = bytes;
  }
  std::lock_guard<std::mutex> lock(spool_mu);
  spool_usage = std::move(usage);
}

void Daemon::Impl::CollectOutbound() {
  ApplyDiodeRetention();
  std::vector<std::uint64_t> acked(peers.size()), sent(peers.size());
  std::uint64_t head = published.load();
  std::uint64_t low = head;
  {
    std::lock_guard<std::mutex> lock(ship_mu);
    for (std::size_t i = 0; i < peers.size(); ++i) {
      const PeerRuntime& p = peers[i];
      acked[i] = p.acked;
      sent[i] = p.sent_through;
      // A peer with nothing in flight whose shipper scanned past its cursor and found nothing
      // for it does not hold back the entries it skipped (it may never get an event to ack).
      std::uint64_t passed = p.acked;
      if (p.inflight.empty() && p.send_pos == p.acked + 1 && p.scan_pos > p.send_pos)
        passed = p.scan_pos - 1;
      low = std::min(low, passed);
    }
  }
  RecountQueues(acked);  // before the GC below deletes what it reads
  {
    // How far each peer was sent, so that its acknowledgements up to there are expected after a
    // restart too (AcceptAck). Not synced: a lost value only refuses a few early acks, which
    // come again once the frames are sent again.
    queue::WriteBatch b(*store);
    for (std::size_t i = 0; i < peers.size(); ++i) {
      if (sent[i] <= peers[i].sent_recorded) continue;
      b.PutCounter(SentKey(peers[i].name), sent[i]);
      peers[i].sent_recorded = sent[i];
    }
    if (b.Count() > 0) {
      if (Status s = store->Commit(b, false); !s)
        log::Error("recording sent positions: " + s.message());
    }
  }
  if (low > gc_deleted_through) {
    queue::WriteBatch b(*store);
    b.DeleteOutboundRange(gc_deleted_through + 1, low + 1);
    // An attestation's key is the highest entry that refers to it: it goes with that entry.
    b.DeleteAttestationRange(gc_deleted_through + 1, low + 1);
    if (Status s = store->Commit(b, false); !s) {
      log::Error("queue GC: " + s.message());
    } else {
      gc_deleted_through = low;
    }
  }
  std::vector<std::int64_t> oldest(peers.size(), 0);
  std::size_t scanned = 0, found = 0;
  Status s = store->ScanOutbound(low + 1, [&](const queue::OutboundEntry& e) {
    if (e.seq > head || ++scanned > kGcScanLimit || found == peers.size()) return false;
    for (std::size_t i = 0; i < peers.size(); ++i) {
      if (e.seq <= acked[i] || !e.HasPeer(peers[i].name)) continue;
      if (oldest[i] == 0) {
        ++found;
        auto ev = DecodeEvent(e.event);
        oldest[i] = ev ? ev->created_at_ms : 1;
      }
    }
    return true;
  });
  if (!s) log::Error("queue GC: " + s.message());
  for (std::size_t i = 0; i < peers.size(); ++i) {
    peers[i].metrics->oldest_unacked_ms = oldest[i];
    if (link) peers[i].metrics->last_contact_ms = link->LastContactMs(i);
  }
}

}  // namespace relay
