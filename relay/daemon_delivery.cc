// Daemon::Impl, delivery: stored inbound events to the JSONL sinks (attachments placed
// next to them), and the sinks' recovery at start. See relay/daemon_impl.h.

#include "relay/daemon_impl.h"

#include <sys/stat.h>
#include <unistd.h>

#include "base/log.h"

namespace relay {
namespace {

constexpr std::size_t kDeliveryBatchEvents = 8192;
// A batch's lines are built in memory before they are written and synced: 2 MiB (and one
// event) keeps that small beside a bundle import; a sync per 2 MiB costs little.
constexpr std::size_t kDeliveryBatchBytes = 2u << 20;

}  // namespace

using daemon_detail::kDelivered;
using daemon_detail::kUnset;
using daemon_detail::SinkPosKey;

Status Daemon::Impl::RecoverSinks() {
  for (auto& [name, ch] : channels) {
    if (ch.config->sink != config::SinkKind::kJsonl) continue;
    auto f = chat::JsonlFile::Open(ch.config->jsonl_path);
    if (!f) return f.status().Wrap("channel '" + name + "'");
    ch.jsonl = std::move(f).value();
    std::uint64_t recorded = store->GetCounter(SinkPosKey(name), kUnset);
    if (recorded == kUnset) {
      // First use of this file: whatever it holds is not ours; start after it.
      queue::WriteBatch b(*store);
      b.PutCounter(SinkPosKey(name), ch.jsonl->size());
      if (Status s = store->Commit(b, true); !s) return s;
      continue;
    }
    std::string note;
    auto r = ch.jsonl->Recover(recorded, &note);
    if (!r) return r.status();
    if (!note.empty()) log::Warning("channel '" + name + "': " + note);
  }
  return Status::Ok();
}

void Daemon::Impl::DeliveryLoop() {
  while (true) {
    {
      std::unique_lock<std::mutex> lock(deliver_mu);
      deliver_cv.wait_for(lock, std::chrono::milliseconds(500),
                          [&] { return stored_in.load() > delivered || stopping; });
      // Online, stop after the batch at hand (what is stored is delivered after the restart);
      // offline (`relay import`), deliver everything first.
      if (stopping && (!offline || stored_in.load() <= delivered)) return;
    }
    if (stored_in.load() > delivered && !DeliverBatch()) {
      ++metrics.delivery_failures;
      std::unique_lock<std::mutex> lock(deliver_mu);
      deliver_cv.wait_for(lock, std::chrono::seconds(1), [&] { return stopping.load(); });
      if (stopping) return;
    } else if (delivery_blocked) {
      // A post waits for chunks of its attachments: new inbound commits wake us.
      std::unique_lock<std::mutex> lock(deliver_mu);
      deliver_cv.wait_for(lock, std::chrono::milliseconds(250));
      if (stopping && !offline) return;
    }
  }
}

bool Daemon::Impl::DeliverBatch() {
  // channel -> lines of this batch; the buffers are kept across batches (no regrowth).
  std::map<std::string, std::string>& lines = delivery_lines;
  for (auto& [name, text] : lines) text.clear();
  std::uint64_t last = delivered, count = 0, bytes = 0;
  delivery_blocked = false;
  std::vector<std::pair<std::string, std::string>> moves;  // verified spool file -> target
  std::vector<std::string> drop;                           // spool files of missing blobs
  std::vector<std::string> done_ids;                       // events the waiter can forget
  Status s = store->ScanInbound(delivered + 1, [&](std::uint64_t seq, std::string_view enc) {
    auto ev = DecodeEvent(enc);
    if (ev) {
      auto ch = channels.find(ev->channel);
      if (ch != channels.end() && ch->second.jsonl) {
        std::vector<chat::DeliveredFile> placed;
        if (!PlaceBlobs(*ev, ch->second, &placed, &moves, &drop)) {
          delivery_blocked = true;  // wait for its chunks; deliver what comes before it
          return false;
        }
        if (!placed.empty()) done_ids.push_back(ev->id);
        std::string& out = lines[ev->channel];
        std::size_t before = out.size();
        chat::AppendJsonlLine(*ev, &out, placed);
        bytes += out.size() - before;
        ++count;
      }
    } else {
      log::Error("stored event " + std::to_string(seq) + " does not decode: " + ev.message());
    }
    last = seq;
    return count < kDeliveryBatchEvents && bytes < kDeliveryBatchBytes;
  });
  if (!s) {
    log::Error("delivery: " + s.message());
    return false;
  }
  if (last == delivered) return true;
  // Blobs go next to the sink before the lines that name them: a line is never durable
  // without its file. A crash in between delivers the line again and finds the file there.
  for (const auto& [from, to] : moves) {
    if (Status m = MoveBlob(from, to); !m) {
      log::Error("delivery: placing an attachment failed (retrying): " + m.message());
      return false;
    }
    ++metrics.blobs_delivered;
  }
  queue::WriteBatch batch(*store);
  for (auto& [name, text] : lines) {
    if (text.empty()) continue;  // channel not in this batch
    chat::JsonlFile& f = *channels[name].jsonl;
    std::uint64_t before = f.size();
    Status w = f.Append(text);
    if (w) w = f.Sync();
    if (!w) {
      log::Error("delivery to channel '" + name + "' failed (retrying): " + w.message());
      RollbackSinks(lines, name, before);
      return false;
    }
    batch.PutCounter(SinkPosKey(name), f.size());
  }
  batch.PutCounter(kDelivered, last);
  // Not synced: the files are synced, and a lost cursor means the files are cut back to the
  // recorded sizes at start and the same events written again.
  if (Status c = store->Commit(batch, false); !c) {
    log::Error("recording delivery failed (retrying): " + c.message());
    RollbackSinks(lines, "", 0);
    return false;
  }
  delivered = last;
  delivered_through = last;
  for (const std::string& path : drop) ::unlink(path.c_str());
  for (const std::string& id : done_ids) delivery_waiter->Forget(id);
  metrics.events_delivered += count;
  metrics.inbound_backlog = stored_in.load() - delivered;
  return true;
}

bool Daemon::Impl::PlaceBlobs(const Event& ev, const ChannelRuntime& ch,
                              std::vector<chat::DeliveredFile>* placed,
                              std::vector<std::pair<std::string, std::string>>* moves,
                              std::vector<std::string>* drop) {
  bool any = false;
  for (const Attachment& a : ev.files) any |= a.is_blob();
  if (!any) return true;
  placed->assign(ev.files.size(), {});
  std::vector<std::pair<std::string, std::string>> mine;
  std::vector<std::string> gone;
  for (std::size_t i = 0; i < ev.files.size(); ++i) {
    const Attachment& a = ev.files[i];
    if (!a.is_blob()) continue;
    const std::string target = ch.config->jsonl_path + ".files/" +
                               SanitizeFileName(ev.id + "-" + std::to_string(i) + "-" + a.name);
    struct stat st {};
    if (::stat(target.c_str(), &st) == 0 && static_cast<std::uint64_t>(st.st_size) == a.size) {
      (*placed)[i].path = target;  // placed before a crash or an earlier failed batch
      continue;
    }
    const std::string spool = SpoolInPath(config.data_dir, ev.origin_site, a.blob_id);
    std::string why;
    switch (delivery_waiter->Check(ev.id, spool, a, &why)) {
      case BlobState::kWaiting:
        return false;
      case BlobState::kReady:
        mine.emplace_back(spool, target);
        (*placed)[i].path = target;
        break;
      case BlobState::kMissing:
        ++metrics.blobs_missing;
        log::Warning("event " + ev.id + ": attachment '" + a.name + "' is missing: " + why);
        (*placed)[i].missing = "the attachment did not arrive within attachment_wait: " + why;
        gone.push_back(spool);
        break;
    }
  }
  moves->insert(moves->end(), mine.begin(), mine.end());
  drop->insert(drop->end(), gone.begin(), gone.end());
  return true;
}

void Daemon::Impl::RollbackSinks(const std::map<std::string, std::string>& lines,
                                 const std::string& failed, std::uint64_t failed_before) {
  for (const auto& entry : lines) {
    const std::string& name = entry.first;
    chat::JsonlFile& f = *channels[name].jsonl;
    std::uint64_t recorded =
        name == failed ? failed_before : store->GetCounter(SinkPosKey(name), f.size());
    std::string note;
    if (auto r = f.Recover(recorded, &note); !r) log::Error(r.message());
  }
}

}  // namespace relay
