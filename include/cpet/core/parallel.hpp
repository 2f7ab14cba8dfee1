// cpet/core/parallel.hpp — the one place cpet starts threads.
//
// OpenMP when the consumer compiles with it (CPET_WITH_OPENMP is set by the cpet::cpet target when OpenMP is
// found), sequential otherwise. The thread count follows OMP_NUM_THREADS / omp_set_num_threads, so the
// benchmarks' 1- and 2-thread runs and the user's own setting agree.
#pragma once

#include <algorithm>
#include <cstddef>

#if defined(CPET_WITH_OPENMP) && defined(_OPENMP)
#include <omp.h>
#define CPET_PARALLEL_OPENMP 1
#endif

namespace cpet {

/// Threads a parallel region will use (1 without OpenMP or inside a parallel region already).
inline int max_threads() noexcept {
#ifdef CPET_PARALLEL_OPENMP
    return omp_in_parallel() ? 1 : omp_get_max_threads();
#else
    return 1;
#endif
}

/// Sets the thread count for later parallel regions (no-op without OpenMP).
inline void set_num_threads(int n) noexcept {
#ifdef CPET_PARALLEL_OPENMP
    omp_set_num_threads(std::max(1, n));
#else
    (void)n;
#endif
}

/// Calls fn(i) for every i in [begin, end), statically split over the threads. Each thread gets one
/// contiguous chunk, so neighbouring work items (e.g. adjacent weight panels) stay on one core.
/// `fn` must not throw: an exception cannot cross an OpenMP region.
template <class Index, class Fn>
void parallel_for(Index begin, Index end, Fn&& fn) {
    if (end <= begin) return;
#ifdef CPET_PARALLEL_OPENMP
    const Index n = end - begin;
    const int threads = static_cast<int>(std::min<Index>(n, static_cast<Index>(max_threads())));
    if (threads > 1) {
#pragma omp parallel num_threads(threads)
        {
            const Index t = static_cast<Index>(omp_get_thread_num());
            const Index lo = begin + n * t / threads;
            const Index hi = begin + n * (t + 1) / threads;
            for (Index i = lo; i < hi; ++i) fn(i);
        }
        return;
    }
#endif
    for (Index i = begin; i < end; ++i) fn(i);
}

/// Calls fn(thread_index, thread_count) once on each of `threads` threads (or once with (0, 1) sequentially).
template <class Fn>
void parallel_region(int threads, Fn&& fn) {
#ifdef CPET_PARALLEL_OPENMP
    threads = std::max(1, std::min(threads, max_threads()));
    if (threads > 1) {
#pragma omp parallel num_threads(threads)
        fn(omp_get_thread_num(), omp_get_num_threads());
        return;
    }
#endif
    (void)threads;
    fn(0, 1);
}

}  // namespace cpet
