#pragma once
// The relay daemon of one site: ingest API -> outbound log -> shipper -> ZeroMQ link -> peer,
// and peer -> verify/decrypt -> inbound store + dedup -> JSONL sinks. See docs/architecture.md.
//
// Threads: the HTTP I/O thread, the ingest committer (group commit), the shipper (frames out),
// the link thread (ZeroMQ), the inbound processor (frames in), the delivery thread (sinks) and
// a maintenance thread (queue GC, dedup expiry, metrics gauges).

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "base/status.h"
#include "config/config.h"

namespace relay {

// Sneakernet export (see docs/sneakernet.md).
struct ExportOptions {
  std::string peer;
  std::string out_dir;
  bool all = false;     // everything not acknowledged, not only what was not exported yet
  bool ack = false;     // write an acknowledgement file for the peer instead of events
  bool resend = false;  // write a resend request (what is missing from the peer's diode stream)
  std::uint64_t max_bytes = 256u << 20;  // per bundle file; larger exports are split
  std::chrono::milliseconds ttl{std::chrono::hours(24 * 30)};  // 0: bundles never expire
  // Called after each file is written (for progress output); may be empty.
  std::function<void(const std::string& file, std::uint64_t events, std::uint64_t bytes)> progress;
};

struct ExportReport {
  std::vector<std::string> files;
  std::uint64_t events = 0;
  std::uint64_t bytes = 0;
  std::string note;  // e.g. "nothing to export ..."
};

struct ImportResult {
  std::string path;
  bool ok = false;      // imported, or already imported before
  std::string message;  // what happened, or why the file was refused
  std::uint64_t events = 0;
};

// The JSON the daemon answers on POST /v1/bundles/export and /v1/bundles/import.
std::string ExportReportJson(const ExportReport& report);
std::string ImportResultsJson(const std::vector<ImportResult>& results);

class Daemon {
 public:
  struct Options {
    // No HTTP, no links, no chat bridge: the store and its threads only (`relay export` and
    // `relay import` when no daemon is running).
    bool offline = false;
  };
  explicit Daemon(config::Config config, Options options);
  explicit Daemon(config::Config config) : Daemon(std::move(config), Options{}) {}
  ~Daemon();  // stops
  Daemon(const Daemon&) = delete;
  Daemon& operator=(const Daemon&) = delete;

  // Loads the key, opens the store, recovers sinks, binds the listeners and starts every thread.
  // Errors name what failed (key file mode, store locked, address in use, ...).
  Status Start();
  // Graceful stop: no new ingest; what was accepted stays durable; threads are joined.
  void Stop();
  std::uint16_t ingest_port() const;
  // A one-line summary (systemd STATUS=, SIGHUP).
  std::string StatusLine() const;

  // Sneakernet: write bundle files for a peer, and verify and import bundle / ack files.
  // Safe while the daemon runs (they use its threads and state).
  Result<ExportReport> Export(const ExportOptions& options);
  std::vector<ImportResult> Import(const std::vector<std::string>& paths);

  // `relay rebase` (offline only): moves the outbound log above position `above`, for a store
  // re-created behind a peer's cursor (its acknowledgements are refused until then). Returns how
  // many queued events moved.
  Result<std::uint64_t> RebaseLog(std::uint64_t above);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// `relay run`: runs the daemon for `config_path` until SIGTERM or SIGINT. Returns the exit code.
int RunDaemon(const std::string& config_path);

// The checks of `relay check-config` that need the site's secret files, which LoadConfig does not
// open: this site's own keys against the peers' (config::CheckOwnKeys, from [site] key_file and
// previous_key_file) and the Mattermost token file. A file this process may not read
// (check-config run as another user than the daemon's) is skipped with a note in *notes; any
// other problem -- a missing file, a loose mode, a repeated key -- is in the error, one per line.
Status CheckSecretFiles(const config::Config& config, std::vector<std::string>* notes);

}  // namespace relay
