// bench/bench_roofline.cpp — prints the roofline the other programs report against: measured peak fp32 FMA rate
// (roofline/fma_f32/t<threads>) and DRAM read bandwidth (roofline/read_bw/t<threads>), for 1 and 2 threads.
#include "roofline.hpp"

#include <string>

namespace {

void fma_f32(benchmark::State& st, int threads) {
    const auto& r = cpet::bench::roofline(threads);
    for (auto _ : st) benchmark::DoNotOptimize(r.peak_gflops);
    st.counters["GFLOPs"] = r.peak_gflops;
    st.counters["threads"] = threads;
}

void read_bw(benchmark::State& st, int threads) {
    const auto& r = cpet::bench::roofline(threads);
    for (auto _ : st) benchmark::DoNotOptimize(r.read_gbs);
    st.counters["GBps"] = r.read_gbs;
    st.counters["threads"] = threads;
    st.SetLabel(r.read_loop);
}

const bool registered = [] {
    for (int t : {1, 2}) {
        const std::string suffix = "/t" + std::to_string(t);
        benchmark::RegisterBenchmark(("roofline/fma_f32" + suffix).c_str(), fma_f32, t)->Iterations(1);
        benchmark::RegisterBenchmark(("roofline/read_bw" + suffix).c_str(), read_bw, t)->Iterations(1);
    }
    return true;
}();

}  // namespace

BENCHMARK_MAIN();
