// Daemon::Impl, ingest: the HTTP API's routing, the ingest committer (group commit of
// messages and captured chat changes), disk and queue limits, the per-peer queue
// accounting, and the rebase of the outbound log. See relay/daemon_impl.h.

#include "relay/daemon_impl.h"

#include <sys/statvfs.h>

#include <simdjson.h>

#include <algorithm>
#include <cstring>

#include "base/json.h"
#include "base/log.h"
#include "crypto/origin.h"

namespace relay {

using daemon_detail::kBundleWaiting;
using daemon_detail::kBundleWorkers;
using daemon_detail::kNextOrigin;
using daemon_detail::kNextOut;
using daemon_detail::NowMs;

Result<std::uint64_t> Daemon::Impl::CountRouted(std::size_t p, std::uint64_t from,
                                                std::uint64_t through) {
  std::uint64_t n = 0;
  if (through <= from) return n;
  Status s = store->ScanOutbound(from + 1, [&](const queue::OutboundEntry& e) {
    if (e.seq > through) return false;
    if (e.HasPeer(peers[p].name)) ++n;
    return true;
  });
  if (!s) return s;
  return n;
}

Status Daemon::Impl::CountQueues(const std::vector<std::uint64_t>& acked) {
  queue_counted.assign(peers.size(), 0);
  queue_added.assign(peers.size(), 0);
  recount_acked = acked;
  for (std::size_t i = 0; i < peers.size(); ++i) {
    auto n = CountRouted(i, acked[i], published.load());
    if (!n) return n.status().Wrap("counting the queue for peer '" + peers[i].name + "'");
    queue_counted[i] = *n;
    peers[i].metrics->queue_depth = *n;
  }
  return Status::Ok();
}

std::vector<std::uint64_t> Daemon::Impl::AckedCursors() {
  std::lock_guard<std::mutex> lock(ship_mu);
  std::vector<std::uint64_t> acked(peers.size());
  for (std::size_t i = 0; i < peers.size(); ++i) acked[i] = peers[i].acked;
  return acked;
}

void Daemon::Impl::RecountQueues(const std::vector<std::uint64_t>& acked) {
  if (queues_dirty.exchange(false)) {
    std::lock_guard<std::mutex> lock(out_mu);  // no appends while counting
    if (Status s = CountQueues(AckedCursors()); !s) {
      log::Error("queue accounting: " + s.message());
      queues_dirty = true;
    }
    return;
  }
  std::vector<std::uint64_t> taken, done(peers.size(), 0);
  std::uint64_t head;
  {
    std::lock_guard<std::mutex> lock(out_mu);
    taken = queue_added;  // exactly the events appended through `head` since the last time
    head = published.load();
  }
  for (std::size_t i = 0; i < peers.size(); ++i) {
    std::uint64_t to = std::min(acked[i], head);
    if (to <= recount_acked[i]) continue;
    auto n = CountRouted(i, recount_acked[i], to);
    if (!n) {
      log::Error("queue accounting: " + n.status().message());
      return;  // counted again next time
    }
    done[i] = *n;
  }
  std::lock_guard<std::mutex> lock(out_mu);
  for (std::size_t i = 0; i < peers.size(); ++i) {
    queue_counted[i] += taken[i];
    queue_counted[i] -= std::min(queue_counted[i], done[i]);
    queue_added[i] -= taken[i];
    recount_acked[i] = std::max(recount_acked[i], std::min(acked[i], head));
    peers[i].metrics->queue_depth = queue_counted[i] + queue_added[i];
  }
}

void Daemon::Impl::NoteQueued(const std::vector<std::size_t>& peer_indexes) {
  for (std::size_t i : peer_indexes) ++queue_added[i];
}

Status Daemon::Impl::CreateApi() {
  const std::string address = (config.ingest_listen.host.find(':') != std::string::npos
                                   ? "[" + config.ingest_listen.host + "]"
                                   : config.ingest_listen.host) +
                              ":" + std::to_string(config.ingest_listen.port);
  HttpServer::Options ho;
  ho.host = config.ingest_listen.host;
  ho.port = config.ingest_listen.port;
  ho.max_body = config.ingest_max_body;
  ho.max_pending = std::max(config.ingest_max_pending, config.ingest_max_body);
  ho.on_busy = [this] {
    ++metrics.ingest_unavailable;
    ++metrics.ingest_busy;
  };
  ho.allowed_hosts = config.ingest_allowed_hosts;
  if (!config.ingest_token_file.empty()) {
    auto token = crypto::ApiToken::LoadFile(config.ingest_token_file);
    if (!token) return token.status().Wrap("[ingest] token_file");
    api_token = std::make_unique<crypto::ApiToken>(std::move(token).value());
    // The server's I/O thread is stopped before api_token is wiped or destroyed (Stop).
    const crypto::ApiToken* t = api_token.get();
    ho.authorize = [t](std::string_view presented) { return t->Matches(presented); };
  } else {
    log::Warning("[ingest] allow_anonymous = true: the API on " + address +
                 " takes no token; anyone who can reach it can post, export and import. For "
                 "demos only: set token_file (`relay token FILE`)");
  }
  ho.on_refused = [this](HttpRefusal reason, const std::string& message) {
    ++metrics.http_refused[static_cast<std::size_t>(reason)];
    // Never the token: the messages quote the Host, Origin and Content-Type only.
    if (warn_limiter.Allow())
      log::Warning("ingest API: refused (" + std::string(HttpRefusalName(reason)) +
                   "): " + log::Printable(message));
  };
  http = std::make_unique<HttpServer>(
      ho, [this](HttpRequest&& req, HttpResponder respond) { Route(std::move(req), respond); });
  bundle_pool = std::make_unique<WorkerPool>("relay-bundle", kBundleWorkers, kBundleWaiting);
  return Status::Ok();
}

std::string Daemon::Impl::ApiRefusedJson() const {
  std::string out = "{";
  for (std::size_t i = 0; i < metrics.http_refused.size(); ++i) {
    out += std::string(i ? "," : "") + "\"" + HttpRefusalName(static_cast<HttpRefusal>(i)) +
           "\":" + std::to_string(metrics.http_refused[i].load());
  }
  for (std::size_t i = 0; i < metrics.api_refused.size(); ++i) {
    out += std::string(",\"") + ApiRefusalName(static_cast<ApiRefusal>(i)) +
           "\":" + std::to_string(metrics.api_refused[i].load());
  }
  return out + "}";
}

void Daemon::Impl::Route(HttpRequest&& req, const HttpResponder& respond) {
  std::string path = req.target.substr(0, req.target.find('?'));
  if (path == "/v1/messages") {
    if (req.method != "POST") {
      respond({405, "application/json", JsonError("use POST for /v1/messages")});
      return;
    }
    Ingest(std::move(req), respond);
  } else if (path == "/healthz") {
    respond({200, "application/json", "{\"status\":\"ok\"}"});
  } else if (path == "/metrics") {
    metrics.store_bytes = store->ApproximateSize();
    respond({200, "text/plain; version=0.0.4",
             metrics.RenderPrometheus(config.site_name) + (bridge ? bridge->MetricsText() : "")});
  } else if (path == "/v1/bundles/export" || path == "/v1/bundles/import") {
    if (req.method != "POST") {
      respond({405, "application/json", JsonError("use POST for " + path)});
      return;
    }
    BundleRequest(path, std::move(req.body), respond);
  } else if (path == "/v1/status") {
    respond({200, "application/json", StatusJson()});
  } else if (path == "/v1/mattermost/backfill") {
    if (req.method != "POST") {
      respond({405, "application/json", JsonError("use POST for " + path)});
      return;
    }
    BackfillRequest(req.body, respond);
  } else {
    respond({404, "application/json", JsonError("no such endpoint: " + path)});
  }
}

void Daemon::Impl::BackfillRequest(const std::string& body, const HttpResponder& respond) {
  simdjson::dom::parser parser;
  simdjson::dom::element doc;
  std::string_view channel;
  std::int64_t since_ms = 0;
  if (parser.parse(body).get(doc) || doc.type() != simdjson::dom::element_type::OBJECT) {
    respond({400, "application/json", JsonError("body must be a JSON object")});
  } else if (doc["channel"].get(channel)) {
    respond({400, "application/json", JsonError("missing field 'channel' (string)")});
  } else if (doc["since_ms"].get(since_ms) || since_ms < 0) {
    respond({400, "application/json",
             JsonError("missing or bad field 'since_ms' (milliseconds since 1970, at least 0)")});
  } else if (!bridge) {
    respond({400, "application/json",
             JsonError("no channel of this site uses sink = mattermost: nothing to backfill")});
  } else if (Status s = bridge->Backfill(std::string(channel), since_ms); !s) {
    respond({400, "application/json", JsonError(s.message())});
  } else {
    std::uint64_t request = 0;
    for (const MattermostBridge::ChannelReplay& c : bridge->Channels()) {
      if (c.channel == channel) request = c.backfill.request;
    }
    respond(
        {202, "application/json",
         "{\"channel\":" + JsonString(channel) + ",\"request\":" + std::to_string(request) + "}"});
  }
}

void Daemon::Impl::Ingest(HttpRequest&& req, const HttpResponder& respond) {
  ++metrics.ingest_requests;
  PendingIngest p;
  IngestError err;
  if (!ParseIngestBody(req.body, config, &p.request, &err)) {
    ++metrics.ingest_rejected;
    respond({err.http_status, "application/json", JsonError(err.message)});
    return;
  }
  p.respond = respond;
  {
    std::lock_guard<std::mutex> lock(ingest_mu);
    if (ingest_closed) {
      ++metrics.ingest_unavailable;
      respond({503, "application/json", JsonError("relay is shutting down")});
      return;
    }
    ingest_queue.push_back(std::move(p));
  }
  ingest_cv.notify_one();
}

void Daemon::Impl::CommitterLoop() {
  std::vector<PendingIngest> work;
  std::vector<PendingCapture> captures;
  std::unordered_map<std::string, std::string> round_keys;  // client id -> event id
  while (true) {
    {
      std::unique_lock<std::mutex> lock(ingest_mu);
      ingest_cv.wait(
          lock, [&] { return !ingest_queue.empty() || !capture_queue.empty() || ingest_closed; });
      if (ingest_queue.empty() && capture_queue.empty() && ingest_closed) return;
      work.swap(ingest_queue);
      captures.swap(capture_queue);
    }
    CommitIngest(work, captures, round_keys);
    work.clear();
    captures.clear();
    round_keys.clear();
  }
}

Status Daemon::Impl::SubmitCapture(CaptureSubmission& submission) {
  std::promise<Status> done;
  auto result = done.get_future();
  {
    std::lock_guard<std::mutex> lock(ingest_mu);
    if (ingest_closed) return Status::Error("relay is shutting down");
    capture_queue.push_back({&submission, &done});
  }
  ingest_cv.notify_one();
  return result.get();
}

std::uint64_t Daemon::Impl::AddCaptures(std::vector<PendingCapture>& captures,
                                        queue::WriteBatch& batch, std::vector<PendingOut>* own,
                                        std::int64_t now) {
  std::int64_t map_expire = now + MattermostBridge::kMappingTtlMs;
  std::unordered_map<std::string, std::string> round_map;  // post id -> event id
  auto event_of = [&](const std::string& post_id) -> std::optional<std::string> {
    if (post_id.empty()) return std::nullopt;
    auto it = round_map.find(post_id);
    if (it != round_map.end()) return it->second;
    return store->GetDedup(MattermostBridge::PostToEventKey(post_id), now);
  };
  std::uint64_t added = 0;
  for (PendingCapture& pc : captures) {
    for (CapturedChange& c : pc.submission->changes) {
      Event e;
      e.kind = c.kind;
      if (c.kind != EventKind::kPost && c.kind != EventKind::kFileChunk) {
        auto ref = event_of(c.post_id);
        if (!ref) {
          log::Warning("capture: change to post " + c.post_id + " that was never bridged: skipped");
          continue;
        }
        e.ref = *ref;
      }
      if (auto thread = event_of(c.thread_post_id)) e.thread = *thread;
      auto ch = channels.find(c.channel);
      if (ch == channels.end()) continue;
      e.origin_site = config.site_name;
      e.origin_seq = next_origin++;
      e.id = MakeEventId(e.origin_site, e.origin_seq);
      e.channel = c.channel;
      e.author = std::move(c.author);
      e.text = std::move(c.text);
      e.created_at_ms = now;
      e.hops = {config.site_name};
      e.props = std::move(c.props);
      e.files = std::move(c.files);
      e.chunk = std::move(c.chunk);
      if (!ch->second.peer_names.empty()) {
        own->push_back(OwnEntry(next_out++, reinterpret_cast<std::uintptr_t>(&ch->second),
                                ch->second.peer_names, e));
        NoteQueued(ch->second.peers);
      }
      if (c.kind == EventKind::kPost) {
        round_map[c.post_id] = e.id;
        batch.PutDedup(MattermostBridge::PostToEventKey(c.post_id), map_expire, e.id);
        batch.PutDedup(MattermostBridge::EventToPostKey(e.id), map_expire, c.post_id);
      }
      ++added;
    }
    for (const auto& [k, v] : pc.submission->state) batch.PutDedup(k, map_expire, v);
    for (const auto& [k, v] : pc.submission->counters) batch.PutCounter(k, v);
  }
  return added;
}

void Daemon::Impl::PutOutboundGroups(
    std::vector<PendingOut>& out, queue::WriteBatch& batch,
    const std::function<std::string(const std::vector<PendingOut*>&)>& attest) {
  std::vector<std::vector<PendingOut*>> groups;
  std::unordered_map<std::uintptr_t, std::size_t> index;
  for (PendingOut& e : out) {
    auto [it, added] = index.emplace(e.group, groups.size());
    if (added) groups.emplace_back();
    groups[it->second].push_back(&e);
  }
  std::vector<PendingOut*> part;
  for (const auto& g : groups) {
    for (std::size_t start = 0; start < g.size(); start += crypto::kMaxAttestedEvents) {
      part.assign(g.begin() + static_cast<std::ptrdiff_t>(start),
                  g.begin() + static_cast<std::ptrdiff_t>(
                                  std::min(g.size(), start + crypto::kMaxAttestedEvents)));
      const std::uint64_t key = part.back()->seq;  // entries are in log order
      for (PendingOut* e : part) queue::SetOutboundAttestation(&e->value, key);
      batch.PutAttestation(key, attest(part));
    }
  }
  for (PendingOut& e : out) batch.PutOutbound(e.seq, std::move(e.value));
}

Daemon::Impl::PendingOut Daemon::Impl::OwnEntry(std::uint64_t seq, std::uintptr_t group,
                                                const std::vector<std::string>& peers,
                                                const Event& event) {
  PendingOut e;
  e.seq = seq;
  e.group = group;
  // The event is encoded straight behind the value's head, and its core hashed where it lies.
  // (EncodeEvent reserves what the event needs.)
  const std::size_t digest_at = queue::AppendOutboundHead(peers, 0, 0, &e.value);
  e.digest = crypto::EventDigest(EncodeEvent(event, &e.value));
  std::memcpy(e.value.data() + digest_at, e.digest.data(), e.digest.size());
  return e;
}

void Daemon::Impl::PutOwnEvents(std::vector<PendingOut>& own, queue::WriteBatch& batch) {
  std::vector<crypto::Digest> digests;
  PutOutboundGroups(own, batch, [&](const std::vector<PendingOut*>& part) {
    digests.clear();
    for (const PendingOut* e : part) digests.push_back(e->digest);
    return crypto::SealAttestation(*key, config.site_name, digests.data(), digests.size());
  });
}

HttpResponse Daemon::Impl::Unavailable(const std::string& why) {
  HttpResponse r{503, "application/json", JsonError(why)};
  r.retry_after_s = 1;
  return r;
}

std::optional<std::uint64_t> daemon_detail::FreeBytes(const std::string& dir) {
  struct statvfs fs {};
  if (statvfs(dir.c_str(), &fs) != 0) return std::nullopt;  // the store will say what fails
  return static_cast<std::uint64_t>(fs.f_bavail) * fs.f_frsize;
}

std::string Daemon::Impl::DiskLow() {
  if (config.min_free == 0) return {};
  const auto free_or = daemon_detail::FreeBytes(config.data_dir);
  if (!free_or) return {};
  const std::uint64_t free_bytes = *free_or;
  const bool low = free_bytes < config.min_free;
  if (low != disk_low) {
    disk_low = low;
    if (low) {
      log::Error("data_dir '" + config.data_dir + "' has " + std::to_string(free_bytes) +
                 " bytes free, below [site] min_free (" + std::to_string(config.min_free) +
                 "): new messages are refused (503) until space is freed");
    } else {
      log::Info("data_dir '" + config.data_dir + "' has space again (" +
                std::to_string(free_bytes) + " bytes free): accepting messages");
    }
  }
  if (!low) return {};
  return "disk nearly full: data_dir has " + std::to_string(free_bytes) +
         " bytes free, below [site] min_free (" + std::to_string(config.min_free) +
         " bytes); nothing was stored, retry later";
}

template <typename Items>
std::string Daemon::Impl::QueueFull(const Items& items) {
  std::vector<std::uint64_t> want(peers.size(), 0);
  for (const auto& item : items) {
    auto ch = channels.find(item.channel);
    if (ch == channels.end()) continue;
    for (std::size_t i : ch->second.peers) ++want[i];
  }
  for (std::size_t i = 0; i < peers.size(); ++i) {
    if (want[i] == 0) continue;
    const std::uint64_t queued = queue_counted[i] + queue_added[i];
    if (queued + want[i] > peers[i].config->max_queue) {
      ++peers[i].metrics->queue_full;
      return "queue for peer '" + peers[i].name + "' is full: " + std::to_string(queued) +
             " events wait for it ([peer." + peers[i].name +
             "] max_queue = " + std::to_string(peers[i].config->max_queue) +
             "); nothing was stored, retry when it has caught up";
    }
  }
  return {};
}

void Daemon::Impl::CommitIngest(std::vector<PendingIngest>& work,
                                std::vector<PendingCapture>& captures,
                                std::unordered_map<std::string, std::string>& round_keys) {
  std::int64_t now = NowMs();
  std::int64_t expire = now + config.dedup_ttl.count();
  queue::WriteBatch batch(*store);
  std::vector<std::vector<std::pair<std::string, bool>>> answers(work.size());
  std::uint64_t new_events = 0, duplicates = 0;
  std::lock_guard<std::mutex> lock(out_mu);
  std::uint64_t origin_before = next_origin, out_before = next_out;
  const std::vector<std::uint64_t> queued_before = queue_added;
  if (std::string low = DiskLow(); !low.empty()) {
    for (PendingCapture& pc : captures) pc.done->set_value(Status::Error(low));
    for (auto& w : work) {
      ++metrics.ingest_unavailable;
      ++metrics.ingest_disk_low;
      w.respond(Unavailable(low));
    }
    return;
  }
  std::vector<bool> refused(work.size(), false);
  std::vector<PendingOut> own;  // this commit's outbound entries, signed per channel below
  for (std::size_t r = 0; r < work.size(); ++r) {
    if (std::string full = QueueFull(work[r].request.messages); !full.empty()) {
      refused[r] = true;
      ++metrics.ingest_unavailable;
      work[r].respond(Unavailable(full));
      continue;
    }
    for (IngestMessage& m : work[r].request.messages) {  // moved from: answered by id
      std::string client_key;
      if (!m.client_id.empty()) {
        client_key = "c:" + m.client_id;
        auto it = round_keys.find(client_key);
        std::optional<std::string> known;
        if (it != round_keys.end()) {
          known = it->second;
        } else {
          known = store->GetDedup(client_key, now);
        }
        if (known) {
          answers[r].emplace_back(*known, true);
          ++duplicates;
          continue;
        }
      }
      const ChannelRuntime& ch = channels.at(m.channel);
      Event e;
      e.origin_site = config.site_name;
      e.origin_seq = next_origin++;
      e.id = MakeEventId(e.origin_site, e.origin_seq);
      e.kind = m.kind;
      e.channel = m.channel;
      e.author = m.author;
      e.text = std::move(m.text);
      e.thread = m.thread;
      e.ref = m.ref;
      e.created_at_ms = now;
      e.hops = {config.site_name};
      e.props = std::move(m.props);
      if (!ch.peer_names.empty()) {
        own.push_back(
            OwnEntry(next_out++, reinterpret_cast<std::uintptr_t>(&ch), ch.peer_names, e));
        NoteQueued(ch.peers);
      }
      if (!client_key.empty()) {
        batch.PutDedup(client_key, expire, e.id);
        round_keys[client_key] = e.id;
      }
      answers[r].emplace_back(e.id, false);
      ++new_events;
    }
  }
  for (PendingCapture& pc : captures) {
    if (std::string full = QueueFull(pc.submission->changes); !full.empty()) {
      pc.done->set_value(Status::Error(full));
      pc.done = nullptr;
    }
  }
  std::erase_if(captures, [](const PendingCapture& pc) { return pc.done == nullptr; });
  new_events += AddCaptures(captures, batch, &own, now);
  PutOwnEvents(own, batch);
  batch.PutCounter(kNextOrigin, next_origin);
  batch.PutCounter(kNextOut, next_out);
  Status s = store->Commit(batch, /*sync=*/true);
  for (PendingCapture& pc : captures) pc.done->set_value(s);
  if (!s) {
    next_origin = origin_before;
    next_out = out_before;
    queue_added = queued_before;
    log::Error("ingest commit failed, answering 503: " + s.message());
    for (std::size_t r = 0; r < work.size(); ++r) {
      if (refused[r]) continue;
      ++metrics.ingest_unavailable;
      work[r].respond(Unavailable("store cannot accept: " + s.message()));
    }
    return;
  }
  published = next_out - 1;
  ++metrics.commits;
  metrics.events_ingested += new_events;
  metrics.ingest_duplicates += duplicates;
  ship_cv.notify_all();
  for (std::size_t r = 0; r < work.size(); ++r) {
    if (refused[r]) continue;
    std::string body;
    auto one = [&](const std::pair<std::string, bool>& a) {
      body += "{\"id\":" + JsonString(a.first) + (a.second ? ",\"duplicate\":true}" : "}");
    };
    if (work[r].request.batch) {
      body.reserve(answers[r].size() * 24 + 2);
      body += "[";
      for (std::size_t i = 0; i < answers[r].size(); ++i) {
        if (i) body += ",";
        one(answers[r][i]);
      }
      body += "]";
    } else {
      one(answers[r][0]);
    }
    work[r].respond({202, "application/json", std::move(body)});
  }
}

Result<std::uint64_t> Daemon::Impl::RebaseLog(std::uint64_t floor) {
  std::lock_guard<std::mutex> out_lock(out_mu);
  const std::uint64_t head = published.load();
  if (floor >= daemon_detail::kMaxSeq)
    return Status::Error("position " + std::to_string(floor) + " is beyond the largest (" +
                         std::to_string(daemon_detail::kMaxSeq) + ")");
  if (floor <= head)
    return Status::Error("the log's head " + std::to_string(head) + " is already at or above " +
                         std::to_string(floor) + ": nothing to move");
  // Entries move in order to floor+1, floor+2, ...; an attestation moves with the entry whose
  // old position was its key (the highest entry that refers to it).
  std::vector<std::uint64_t> old_seqs;
  Status s = store->ScanOutbound(1, [&](const queue::OutboundEntry& e) {
    if (e.seq > head) return false;
    old_seqs.push_back(e.seq);
    return true;
  });
  if (!s) return s;
  auto new_pos = [&](std::uint64_t old) -> std::optional<std::uint64_t> {
    auto it = std::lower_bound(old_seqs.begin(), old_seqs.end(), old);
    if (it == old_seqs.end() || *it != old) return std::nullopt;
    return floor + 1 + static_cast<std::uint64_t>(it - old_seqs.begin());
  };
  queue::WriteBatch b(*store);
  std::set<std::uint64_t> moved_attestations;
  s = store->ScanOutbound(1, [&](const queue::OutboundEntry& e) {
    if (e.seq > head) return false;
    const auto att_key = new_pos(e.attestation);
    if (!att_key) {
      s = Status::Error("log entry " + std::to_string(e.seq) + " refers to attestation " +
                        std::to_string(e.attestation) + ", which has no entry");
      return false;
    }
    if (moved_attestations.insert(e.attestation).second) {
      auto att = store->GetAttestation(e.attestation);
      if (!att || !*att) {
        s = att ? Status::Error("attestation " + std::to_string(e.attestation) + " is missing")
                : att.status();
        return false;
      }
      b.PutAttestation(*att_key, **att);
    }
    b.AppendOutbound(*new_pos(e.seq), e.Peers(), *att_key, e.digest, e.event);
    return true;
  });
  if (!s) return s;
  const std::uint64_t pos = floor + 1 + old_seqs.size();
  b.DeleteOutboundRange(1, head + 1);
  b.DeleteAttestationRange(1, head + 1);
  b.PutCounter(kNextOut, pos);
  // Event ids started at the same (behind) clock: keep new ones above the old ones too, as far
  // as the peer's position tells.
  next_origin = std::max(next_origin, pos);
  b.PutCounter(kNextOrigin, next_origin);
  if (Status c = store->Commit(b, true); !c) return c;
  next_out = pos;
  published = pos - 1;
  return static_cast<std::uint64_t>(old_seqs.size());
}

}  // namespace relay
