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

inline ThreadPool& workers() {
  static ThreadPool pool(std::max(1, num_threads() - 1));
  return pool;
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
