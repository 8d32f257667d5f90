#include <dirent.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include <catch2/catch.hpp>

#include "relay/worker_pool.h"

using relay::WorkerPool;

namespace {

int ThreadCount() {
  int n = 0;
  if (DIR* d = ::opendir("/proc/self/task")) {
    while (dirent* e = ::readdir(d)) n += e->d_name[0] != '.';
    ::closedir(d);
  }
  return n;
}

// The thread count once it is `want`, or after 2 s whatever it is then: a joined thread can
// still be listed in /proc/self/task for a moment after pthread_join returns (the kernel wakes
// the joiner before it has reaped the task), which a busy machine makes visible.
int ThreadCountSettled(int want) {
  int n = ThreadCount();
  for (int i = 0; i < 200 && n != want; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    n = ThreadCount();
  }
  return n;
}

// Jobs block until released.
struct Gate {
  void Wait() {
    std::unique_lock lock(mu);
    ++waiting;
    cv.notify_all();
    cv.wait(lock, [&] { return open; });
  }
  void WaitForWaiting(int n) {
    std::unique_lock lock(mu);
    REQUIRE(cv.wait_for(lock, std::chrono::seconds(10), [&] { return waiting >= n; }));
  }
  void Open() {
    std::lock_guard lock(mu);
    open = true;
    cv.notify_all();
  }
  std::mutex mu;
  std::condition_variable cv;
  int waiting = 0;
  bool open = false;
};

}  // namespace

TEST_CASE("a worker pool runs at most threads + max_waiting jobs and never adds a thread") {
  const int before = ThreadCount();
  Gate gate;
  std::atomic<int> done{0};
  WorkerPool pool("test-pool", 2, 1);
  CHECK(ThreadCountSettled(before + 2) == before + 2);
  auto job = [&] {
    gate.Wait();
    ++done;
  };
  CHECK(pool.TrySubmit(job));
  CHECK(pool.TrySubmit(job));
  gate.WaitForWaiting(2);      // both workers busy
  CHECK(pool.TrySubmit(job));  // waits
  CHECK_FALSE(pool.TrySubmit(job));
  CHECK_FALSE(pool.TrySubmit(job));
  CHECK(ThreadCountSettled(before + 2) == before + 2);
  gate.Open();
  for (int i = 0; i < 500 && done < 3; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  CHECK(done == 3);
  // Free again: many jobs in a row, one at a time, on the same two threads.
  for (int i = 0; i < 100; ++i) {
    const int target = done + 1;
    REQUIRE(pool.TrySubmit([&] { ++done; }));
    for (int k = 0; k < 500 && done < target; ++k)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  CHECK(done == 103);
  CHECK(ThreadCountSettled(before + 2) == before + 2);
  pool.Stop();
  CHECK(ThreadCountSettled(before) == before);
  CHECK_FALSE(pool.TrySubmit(job));
}

TEST_CASE("Stop waits for running jobs and drops the queued ones unrun") {
  Gate gate;
  std::atomic<int> ran{0};
  auto owned = std::make_shared<int>(7);  // what a dropped job owns is released
  auto pool = std::make_unique<WorkerPool>("test-pool", 1, 2);
  REQUIRE(pool->TrySubmit([&] {
    gate.Wait();
    ++ran;
  }));
  gate.WaitForWaiting(1);
  REQUIRE(pool->TrySubmit([&, owned] { ++ran; }));
  CHECK(owned.use_count() == 2);
  std::thread opener([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    gate.Open();
  });
  pool->Stop();
  opener.join();
  CHECK(ran == 1);
  CHECK(owned.use_count() == 1);
  pool->Stop();  // idempotent
}
