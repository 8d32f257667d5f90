#pragma once
// A fixed pool of named worker threads with a bounded queue, for work that may take a while
// and must not cost a thread per request (the daemon's /v1/bundles/* requests).
//
// Thread-safety: TrySubmit and Stop may be called from any thread (not from a job for Stop).
// The threads are started by the constructor and joined by Stop (or the destructor); no
// thread is created afterwards, whatever is submitted.

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace relay {

class WorkerPool {
 public:
  // `threads` workers named `name` (at most 15 characters, for top -H and gdb); at most
  // `max_waiting` jobs wait for a free worker.
  WorkerPool(std::string name, std::size_t threads, std::size_t max_waiting);
  ~WorkerPool();  // Stop()
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  // Queues `job`. False (and `job` is dropped unrun) when every worker is busy and
  // max_waiting jobs already wait, or after Stop.
  [[nodiscard]] bool TrySubmit(std::function<void()> job);

  // Refuses new jobs, drops the queued ones that have not started (destroying them), waits for
  // the running ones and joins the threads. Idempotent; call it from one thread.
  void Stop();

 private:
  void Loop();

  const std::string name_;
  const std::size_t thread_count_;
  const std::size_t max_waiting_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;  // guarded by mu_
  std::size_t running_ = 0;                  // guarded by mu_: jobs being run
  bool stopped_ = false;                     // guarded by mu_
  std::vector<std::thread> threads_;         // touched by the constructor and Stop only
};

}  // namespace relay
