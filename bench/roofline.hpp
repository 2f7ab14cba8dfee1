// bench/roofline.hpp — the roofline every cpet benchmark reports against: the machine's measured peak fp32 FMA
// rate and its measured DRAM read bandwidth, per thread count.
//
// Both are measured here (not taken from a datasheet), once per thread count and cached, so "pct_peak" and
// "pct_bw" mean the same on every program:
// Both use each thread's CPU time (CLOCK_THREAD_CPUTIME_ID): the machine may be shared, and a ceiling measured in
// wall time would drop whenever another process runs.
//   peak_gflops: each thread runs a loop of FMAs on the widest ISA over many independent accumulators (24 zmm /
//                12 ymm: more than latency × ports = 4 × 2, so the FMA ports are the only limit); best of 10
//                (other processes share this machine: the best run is the one nothing interrupted).
//   read_gbs:    each thread sums its contiguous share of a buffer at least 4× the L3 size (capped at ~1 GiB),
//                read as 1, 2, 4 or 8 interleaved sequential streams, with and without software prefetch
//                (sum_streams); the best variant, each the best of 3 passes after a first-touch initialisation.
//                One plain stream under-read an AVX2 Zen core by ~25 % against Eigen's GEMV: the probe has to
//                reach what the fastest kernel in the same binary reaches, or every "% of bandwidth" is too high.
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <ctime>
#include <cstddef>
#include <cstdlib>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

#include "cpet/arch/dispatch.hpp"
#include "cpet/core/buffer.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/core/parallel.hpp"

namespace cpet::bench {

struct roofline_figures {
    double peak_gflops;  ///< fp32 FMA rate, GFLOP/s (an FMA counts 2 flops)
    double read_gbs;     ///< DRAM read bandwidth, GB/s (1e9 bytes)
    int threads;
    std::string read_loop;  ///< which read loop of the probe reached read_gbs
};

/// Threads the benchmarks use: OMP_NUM_THREADS when set, else cpet::max_threads().
inline int bench_threads() {
    if (const char* s = std::getenv("OMP_NUM_THREADS"); s && *s) {
        const int n = std::atoi(s);
        if (n > 0) return n;
    }
    return max_threads();
}

/// Size of the last-level (L3) cache in bytes: sysconf, else /sys, else 32 MiB.
inline std::size_t l3_cache_bytes() {
    long v = -1;
#ifdef _SC_LEVEL3_CACHE_SIZE
    v = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    if (v > 0) return static_cast<std::size_t>(v);
    std::ifstream f("/sys/devices/system/cpu/cpu0/cache/index3/size");
    std::string s;
    if (f >> s && !s.empty()) {
        std::size_t n = std::strtoull(s.c_str(), nullptr, 10);
        const char unit = s.back();
        if (unit == 'K' || unit == 'k') n <<= 10;
        if (unit == 'M' || unit == 'm') n <<= 20;
        if (n > 0) return n;
    }
    return std::size_t(32) << 20;
}

namespace roofline_detail {

template <class Arch>
double fma_loop(long iters) {
    if constexpr (!arch::is_simd_v<Arch>) {
        constexpr int A = 8;
        float acc[A];
        for (int i = 0; i < A; ++i) acc[i] = float(i);
        for (long it = 0; it < iters; ++it)
            for (int i = 0; i < A; ++i) acc[i] = acc[i] * 0.999999f + 1e-7f;
        float s = 0;
        for (float v : acc) s += v;
        benchmark::DoNotOptimize(s);
        return 2.0 * A * double(iters);
    } else {
        using B = xsimd::batch<float, Arch>;
        constexpr int A = B::size >= 16 ? 24 : 12;
        B acc[A];
        for (int i = 0; i < A; ++i) acc[i] = B(float(i));
        B a(0.999999f), b(1e-7f);
        benchmark::DoNotOptimize(a);
        benchmark::DoNotOptimize(b);
        for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 32
            for (int i = 0; i < A; ++i) acc[i] = xsimd::fma(acc[i], a, b);
        }
        B s = acc[0];
        for (int i = 1; i < A; ++i) s += acc[i];
        float out = xsimd::hadd(s);
        benchmark::DoNotOptimize(out);
        return 2.0 * A * double(B::size) * double(iters);
    }
}

/// Sums n floats read as S interleaved sequential streams (the range cut into S equal parts, one vector of each
/// part per step), prefetching PF floats ahead into L2 in every stream (PF = 0: no software prefetch). One stream
/// leaves one core short of its bandwidth on some CPUs: DRAM bandwidth per core is bound by the misses in flight,
/// and the hardware prefetchers track a few streams each, so more streams or software prefetch reach further.
template <class Arch, std::size_t S, std::size_t PF>
float sum_streams(const float* p, std::size_t n) {
    if constexpr (!arch::is_simd_v<Arch>) {
        float s = 0;
        for (std::size_t i = 0; i < n; ++i) s += p[i];
        return s;
    } else {
        using B = xsimd::batch<float, Arch>;
        constexpr std::size_t W = B::size;
        constexpr std::size_t step = 64 / sizeof(float);  // one cache line per stream per step
        constexpr std::size_t V = step / W;               // vectors per line
        const std::size_t part = n / S / step * step;
        B acc[S][V];
        for (auto& a : acc)
            for (auto& v : a) v = B(0.f);
        for (std::size_t i = 0; i < part; i += step) {
#pragma GCC unroll 16
            for (std::size_t s = 0; s < S; ++s) {
                const float* q = p + s * part + i;
                if constexpr (PF > 0) __builtin_prefetch(q + PF, 0, 2);
#pragma GCC unroll 4
                for (std::size_t v = 0; v < V; ++v) acc[s][v] += B::load_aligned(q + v * W);
            }
        }
        B sum(0.f);
        for (auto& a : acc)
            for (auto& v : a) sum += v;
        float out = xsimd::hadd(sum);
        for (std::size_t i = S * part; i < n; ++i) out += p[i];
        return out;
    }
}

/// The read loops the probe tries: streams × prefetch distance. The best of them is the machine's figure.
struct read_variant {
    const char* name;
    float (*run)(const float*, std::size_t);
};
template <class Arch>
inline const std::vector<read_variant>& read_variants() {
    static const std::vector<read_variant> v{
        {"1 stream", &sum_streams<Arch, 1, 0>},          {"1 stream, prefetch 4 KiB", &sum_streams<Arch, 1, 1024>},
        {"1 stream, prefetch 8 KiB", &sum_streams<Arch, 1, 2048>}, {"2 streams", &sum_streams<Arch, 2, 0>},
        {"2 streams, prefetch 4 KiB", &sum_streams<Arch, 2, 1024>}, {"4 streams", &sum_streams<Arch, 4, 0>},
        {"4 streams, prefetch 2 KiB", &sum_streams<Arch, 4, 512>}, {"8 streams", &sum_streams<Arch, 8, 0>},
        {"8 streams, prefetch 1 KiB", &sum_streams<Arch, 8, 256>},
    };
    return v;
}

struct thread_scope {
    int saved = max_threads();
    explicit thread_scope(int n) { set_num_threads(n); }
    ~thread_scope() { set_num_threads(saved); }
};

/// CPU seconds of the calling thread. The machine is shared (other processes compile while benchmarks run), so
/// the ceilings are measured in the time each thread actually ran, not wall time: what the hardware can do.
inline double thread_seconds() {
    timespec ts{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

inline double measure_peak(int threads) {
    thread_scope ts(threads);
    const long iters = 2'000'000;
    double best = 0;
    for (int rep = 0; rep < 10; ++rep) {
        double rate[64] = {};
        parallel_region(threads, [&](int t, int) {
            const double t0 = thread_seconds();
            const double f = arch::dispatch([&](auto tag) { return fma_loop<decltype(tag)>(iters); });
            rate[std::min(t, 63)] = f / (thread_seconds() - t0);
        });
        double total = 0;  // cores are independent: the rates add up
        for (double r : rate) total += r;
        best = std::max(best, total * 1e-9);
    }
    return best;
}

/// Best read bandwidth over read_variants() (each the best of 3 passes); `which` names the winner.
inline double measure_read_bw(int threads, std::string* which = nullptr) {
    thread_scope ts(threads);
    const std::size_t cap = std::size_t(1) << 30;
    const std::size_t bytes = std::min(cap, std::max<std::size_t>(4 * l3_cache_bytes(), std::size_t(256) << 20));
    const std::size_t n = bytes / sizeof(float);
    aligned_buffer<float> buf(n);  // zeroed by the allocating thread; rewritten below by the readers (first touch)
    const std::size_t chunk = (n / std::size_t(threads) + 1023) / 1024 * 1024;
    parallel_region(threads, [&](int t, int) {
        const std::size_t lo = std::min(n, chunk * std::size_t(t)), hi = std::min(n, lo + chunk);
        for (std::size_t i = lo; i < hi; ++i) buf[i] = float(i & 7);
    });
    const auto& variants = arch::dispatch([&](auto tag) -> const std::vector<read_variant>& {
        return read_variants<decltype(tag)>();
    });
    double best = 0;
    for (const auto& var : variants) {
        for (int rep = 0; rep < 3; ++rep) {
            float sums[64] = {};
            double secs[64] = {};
            parallel_region(threads, [&](int t, int) {
                const std::size_t lo = std::min(n, chunk * std::size_t(t)), hi = std::min(n, lo + chunk);
                const double t0 = thread_seconds();
                sums[std::min(t, 63)] = var.run(buf.data() + lo, hi - lo);
                secs[std::min(t, 63)] = thread_seconds() - t0;
            });
            benchmark::DoNotOptimize(sums);
            double slowest = 0;  // the threads share the memory system: all bytes over the slowest thread's time
            for (double v : secs) slowest = std::max(slowest, v);
            const double gbs = double(bytes) / slowest * 1e-9;
            if (gbs > best) {
                best = gbs;
                if (which) *which = var.name;
            }
        }
    }
    return best;
}

}  // namespace roofline_detail

/// Measured once per thread count and cached (the first call for a count takes about a second).
inline const roofline_figures& roofline(int threads) {
    static std::mutex mu;
    static std::map<int, roofline_figures> cache;
    threads = std::max(1, threads);
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(threads);
    if (it == cache.end()) {
        const double peak = roofline_detail::measure_peak(threads);
        std::string which;
        const double bw = roofline_detail::measure_read_bw(threads, &which);
        it = cache.emplace(threads, roofline_figures{peak, bw, threads, which}).first;
    }
    return it->second;
}

/// Uniform random matrix in [-scale, scale) (bench inputs and weights).
inline Matrix<float> random_matrix(index_t rows, index_t cols, unsigned seed, float scale = 1.f) {
    std::mt19937 gen(seed);
    std::uniform_real_distribution<float> dist(-scale, scale);
    Matrix<float> m(rows, cols);
    for (index_t i = 0; i < m.size(); ++i) m.data()[i] = dist(gen);
    return m;
}

/// Copies of a weight of `bytes` to rotate through so that decode shapes (m <= 8) stream from DRAM: more than
/// 2x the L3 size in all, capped near 3 GiB; other shapes use one copy.
inline std::size_t weight_copies(index_t m, double bytes) {
    if (m > 8) return 1;
    const double want = 2.0 * double(l3_cache_bytes());
    const double cap = 3.0 * double(std::size_t(1) << 30);
    const std::size_t copies = std::size_t(want / bytes) + 1;
    return std::max<std::size_t>(1, std::min(copies, std::size_t(cap / bytes)));
}

/// Counters GFLOPs (rate) and pct_peak (% of roofline(threads).peak_gflops), from the flops of one iteration.
inline void report_flops(benchmark::State& st, double flops_per_iteration, int threads) {
    const double total = flops_per_iteration * double(st.iterations());
    const double peak = roofline(threads).peak_gflops;
    st.counters["GFLOPs"] = benchmark::Counter(total * 1e-9, benchmark::Counter::kIsRate);
    st.counters["pct_peak"] = benchmark::Counter(total * 1e-9 / peak * 100.0, benchmark::Counter::kIsRate);
}

/// Counters GBps (rate) and pct_bw (% of roofline(threads).read_gbs), from the bytes one iteration reads.
inline void report_bytes(benchmark::State& st, double bytes_per_iteration, int threads) {
    const double total = bytes_per_iteration * double(st.iterations());
    const double bw = roofline(threads).read_gbs;
    st.counters["GBps"] = benchmark::Counter(total * 1e-9, benchmark::Counter::kIsRate);
    st.counters["pct_bw"] = benchmark::Counter(total * 1e-9 / bw * 100.0, benchmark::Counter::kIsRate);
}

}  // namespace cpet::bench
