// bench/bench_sparse.cpp — sparse GEMMs y = x·Ŵᵀ (W [N, K]) against the dense fp32 GEMM in the same binary:
// N:M 2:4 (fp32 and int8 values; N = K = 2048 at M = 1, 8, 128, 256; N = K = 4096 at every power of two M = 1..512;
// the BERT-base FFN shapes 3072×768, 768×3072 at M = 128, 256) and unstructured SELL-16 at 50–95 % sparsity (to find where it beats dense).
//
// Names: <family>/<impl>/<M>x<N>x<K>/t<threads>: gemm_sparse/cpet_2of4, gemm_sparse/cpet_2of4_int8,
// gemm_sparse/cpet_unstructured_s<percent>, gemm_f32/cpet (kernels::gemm_f32 on packed_weights_f32). Every run
// reports GOP/s of the DENSE-equivalent work (2·M·N·K per call, so the rates compare directly) and pct_peak; decode
// shapes (M <= 8) also GBps / pct_bw of the packed bytes read per call, and rotate through weight copies totalling
// more than 2× the L3 size (capped near 3 GiB), so each call streams them from DRAM as a decoder does.
#include "roofline.hpp"

#include <random>
#include <string>
#include <vector>

#include "cpet/compress/prune.hpp"
#include "cpet/kernels/gemm_f32.hpp"
#include "cpet/kernels/gemm_sparse.hpp"

namespace {

using cpet::index_t;
using cpet::Matrix;
namespace cc = cpet::compress;

struct shape {
    index_t m, n, k;
};

using cpet::bench::random_matrix;

void finish(benchmark::State& st, const shape& s, int threads, double weight_bytes) {
    cpet::bench::report_flops(st, 2.0 * double(s.m) * double(s.n) * double(s.k), threads);
    if (s.m <= 8) cpet::bench::report_bytes(st, weight_bytes, threads);
    st.counters["weight_MiB"] = weight_bytes / double(1 << 20);
}

template <class Packed, class Kernel>
void run_rotating(benchmark::State& st, const shape& s, int threads, Packed first, Kernel kernel) {
    cpet::set_num_threads(threads);
    const auto x = random_matrix(s.m, s.k, 1);
    Matrix<float> y(s.m, s.n);
    std::vector<Packed> w;
    const double bytes = double(first.bytes());
    const std::size_t copies = cpet::bench::weight_copies(s.m, bytes);
    w.reserve(copies);
    w.push_back(std::move(first));
    for (std::size_t i = 1; i < copies; ++i) w.push_back(w[0]);
    std::size_t i = 0;
    for (auto _ : st) {
        kernel(x.view(), w[i], y.view());
        if (++i == w.size()) i = 0;
        benchmark::ClobberMemory();
    }
    finish(st, s, threads, bytes);
}

void bench_nm(benchmark::State& st, shape s, int threads, cc::sparse_values vt) {
    const auto dense = random_matrix(s.n, s.k, 2);
    run_rotating(st, s, threads, cc::prune_nm(dense.view(), {2, 4}, cc::sparsity_score::magnitude, nullptr, vt),
                 [](auto x, const cc::nm_sparse_weights& w, auto y) { cc::matmul(x, w, y); });
}

void bench_unstructured(benchmark::State& st, shape s, int threads, double sparsity) {
    const auto dense = random_matrix(s.n, s.k, 2);
    run_rotating(st, s, threads, cc::prune_unstructured(dense.view(), sparsity),
                 [](auto x, const cc::unstructured_sparse_weights& w, auto y) { cc::matmul(x, w, y); });
}

void bench_dense(benchmark::State& st, shape s, int threads) {
    const auto dense = random_matrix(s.n, s.k, 2);
    run_rotating(st, s, threads, cpet::kernels::packed_weights_f32(dense.view()),
                 [](auto x, const cpet::kernels::packed_weights_f32& w, auto y) { cpet::kernels::gemm_f32(x, w, y); });
}

std::string shape_name(const shape& s) {
    return std::to_string(s.m) + "x" + std::to_string(s.n) + "x" + std::to_string(s.k);
}

template <class... Args>
void add(const std::string& id, void (*fn)(benchmark::State&, shape, int, Args...), shape s, int t, Args... args) {
    benchmark::RegisterBenchmark(id.c_str(), fn, s, t, args...)
        ->Repetitions(5)
        ->ReportAggregatesOnly(true)
        ->UseRealTime()
        ->Unit(benchmark::kMicrosecond);
}

const bool registered = [] {
    for (int t : {1, 2}) {
        const std::string ts = "/t" + std::to_string(t);
        // 2:4 vs dense at N = K ∈ {2048, 4096} (decode and prefill) and the BERT-base FFN shapes (prefill)
        std::vector<shape> shapes;
        for (index_t m : {1, 8, 128, 256}) shapes.push_back({m, 2048, 2048});
        // every power of two from 1 to 512 at 4096² (the aim is ≥ 1.5× dense at every M)
        for (index_t m : {1, 2, 4, 8, 16, 32, 64, 128, 256, 512}) shapes.push_back({m, 4096, 4096});
        for (index_t m : {128, 256}) {
            shapes.push_back({m, 3072, 768});
            shapes.push_back({m, 768, 3072});
        }
        for (const shape& s : shapes) {
            const std::string tail = "/" + shape_name(s) + ts;
            add("gemm_sparse/cpet_2of4" + tail, bench_nm, s, t, cc::sparse_values::f32);
            add("gemm_sparse/cpet_2of4_int8" + tail, bench_nm, s, t, cc::sparse_values::int8);
            const bool below = s.n == 4096 && s.k == 4096 && (s.m == 1 || s.m == 128);  // registered below
            if (!below) add("gemm_f32/cpet" + tail, bench_dense, s, t);
        }
        // unstructured vs dense at 4096², M = 1 and 128
        for (index_t m : {1, 128}) {
            const shape s{m, 4096, 4096};
            const std::string tail = "/" + shape_name(s) + ts;
            for (int pct : {50, 70, 80, 90, 95})
                add("gemm_sparse/cpet_unstructured_s" + std::to_string(pct) + tail, bench_unstructured, s, t,
                    pct / 100.0);
            add("gemm_f32/cpet" + tail, bench_dense, s, t);
        }
    }
    return true;
}();

}  // namespace

BENCHMARK_MAIN();
