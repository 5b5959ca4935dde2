// Splits a range over the machine's cores for the extension's own loops (the BLAS
// threads its GEMMs itself; the two never run at the same time). Workers persist
// across calls: the op calls this once per tile, where spawning threads would cost
// as much as the work.
#pragma once

#include <algorithm>
#include <cstdint>
#include <future>
#include <thread>
#include <vector>

#include "mlx/threadpool.h"

namespace mfl::cpu {

inline int num_threads() {
  static const int n = std::max(1u, std::thread::hardware_concurrency());
  return n;
}

// Made once and never destroyed, as MLX leaks its scheduler and its own pools: a static
// pool's destructor would stop and join the workers during exit(), while MLX's stream
// thread, which is never joined, may still be evaluating one of our ops (an async_eval or
// a daemon thread left running at interpreter exit) and would enqueue onto a destroyed pool.
// The OS reclaims the idle workers at exit.
//
// Not ours, and not avoidable here (MLX 0.32.4): a Python thread that drew from
// mx.random's global key (mx.random.normal without key=, nn.Dropout, the LoRA layers in
// training mode) owns a thread_local key whose destructor takes the GIL when the thread
// exits; if the interpreter is finalizing by then, the thread is killed inside that
// destructor and the process aborts ("terminate called without an active exception").
// The op itself leaves no per-thread state (tests/test_thread_exit.py); README, "Threads".
inline ThreadPool& workers() {
  static ThreadPool* pool = new ThreadPool(std::max(1, num_threads() - 1));
  return *pool;
}

// Calls fn(begin, end, thread_index) on disjoint chunks covering [0, n). A chunk is
// at least `grain` long, so small problems stay on the calling thread.
template <typename Fn>
void parallel_for(int64_t n, int64_t grain, Fn&& fn) {
  const int64_t chunks = std::min<int64_t>(num_threads(), n / std::max<int64_t>(grain, 1));
  if (chunks <= 1) {
    fn(int64_t(0), n, 0);
    return;
  }
  std::vector<std::future<void>> pending;
  pending.reserve(chunks - 1);
  for (int t = 1; t < chunks; ++t) {
    pending.push_back(
        workers().enqueue([&fn, n, chunks, t] { fn(n * t / chunks, n * (t + 1) / chunks, t); }));
  }
  fn(int64_t(0), n / chunks, 0);
  for (auto& p : pending) {
    p.get();
  }
}

}  // namespace mfl::cpu
