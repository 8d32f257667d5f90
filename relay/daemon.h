#pragma once
// The relay daemon of one site: ingest API -> outbound log -> shipper -> ZeroMQ link -> peer,
// and peer -> verify/decrypt -> inbound store + dedup -> JSONL sinks. See docs/architecture.md.
//
// Threads: the HTTP I/O thread, the ingest committer (group commit), the shipper (frames out),
// the link thread (ZeroMQ), the inbound processor (frames in), the delivery thread (sinks) and
// a maintenance thread (queue GC, dedup expiry, metrics gauges).

#include <cstdint>
#include <memory>
#include <string>

#include "config/config.h"
#include "relay/status.h"

namespace relay {

class Daemon {
 public:
  explicit Daemon(config::Config config);
  ~Daemon();  // stops
  Daemon(const Daemon&) = delete;
  Daemon& operator=(const Daemon&) = delete;

  // Loads the key, opens the store, recovers sinks, binds the listeners and starts every thread.
  // Errors name what failed (key file mode, store locked, address in use, ...).
  Status Start();
  // Graceful stop: no new ingest; what was accepted stays durable; threads are joined.
  void Stop();
  std::uint16_t ingest_port() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// `relay run`: runs the daemon for `config_path` until SIGTERM or SIGINT. Returns the exit code.
int RunDaemon(const std::string& config_path);

}  // namespace relay
