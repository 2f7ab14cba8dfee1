// bench/bench_gemm_f32.cpp — y = x·Wᵀ (W [N, K] like torch.nn.Linear), cpet against Eigen, OpenBLAS and oneDNN.
//
// Names: gemm_f32/<impl>/<M>x<N>x<K>/t<threads>. Every run reports GFLOPs and pct_peak (of the measured FMA peak,
// bench/roofline.hpp); decode shapes (M <= 8) also GBps and pct_bw (of the measured DRAM read bandwidth), counting
// the bytes of W read per call. Decode shapes rotate through copies of W totalling more than 2× the L3 size so
// that each call streams W from DRAM, as a decoder's layers do; the other shapes reuse one W (cache-resident
// between calls when it fits, as in a prefill step that runs the same layer over many tokens).
#include "roofline.hpp"

#include <unistd.h>

#include <Eigen/Core>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cpet/arch/isa.hpp"
#include "cpet/core/eigen.hpp"
#include "cpet/kernels/gemm_f32.hpp"

#ifdef CPET_BENCH_HAVE_OPENBLAS
#include <cblas.h>
#endif
#ifdef CPET_BENCH_HAVE_ONEDNN
#include <dnnl.hpp>
#endif

namespace {

using cpet::index_t;
using cpet::Matrix;

struct shape {
    index_t m, n, k;
};

using cpet::bench::random_matrix;

/// How many copies of W to rotate through: decode shapes exceed 2× L3 (capped near 3 GiB in all), others use one.
std::size_t weight_copies(const shape& s) {
    return cpet::bench::weight_copies(s.m, double(s.n) * double(s.k) * sizeof(float));
}

void set_threads(int t) {
    cpet::set_num_threads(t);
    Eigen::setNbThreads(t);
#ifdef CPET_BENCH_HAVE_OPENBLAS
    openblas_set_num_threads(t);
#endif
}

void finish(benchmark::State& st, const shape& s, int threads) {
    cpet::bench::report_flops(st, 2.0 * double(s.m) * double(s.n) * double(s.k), threads);
    if (s.m <= 8) cpet::bench::report_bytes(st, double(s.n) * double(s.k) * sizeof(float), threads);
}

void bench_cpet(benchmark::State& st, shape s, int threads) {
    set_threads(threads);
    const auto x = random_matrix(s.m, s.k, 1);
    Matrix<float> y(s.m, s.n);
    std::vector<cpet::kernels::packed_weights_f32> w;
    {
        const auto dense = random_matrix(s.n, s.k, 2);
        for (std::size_t i = 0; i < weight_copies(s); ++i) w.emplace_back(dense);
    }
    std::size_t i = 0;
    for (auto _ : st) {
        cpet::kernels::gemm_f32(x, w[i], y);
        if (++i == w.size()) i = 0;
        benchmark::ClobberMemory();
    }
    finish(st, s, threads);
}

/// Row-major copies of W shared by the peers that take W as it is (Eigen, OpenBLAS).
std::vector<Matrix<float>> dense_copies(const shape& s) {
    std::vector<Matrix<float>> w;
    const auto dense = random_matrix(s.n, s.k, 2);
    for (std::size_t i = 0; i < weight_copies(s); ++i) w.emplace_back(dense.view());
    return w;
}

void bench_eigen(benchmark::State& st, shape s, int threads) {
    set_threads(threads);
    const auto x = random_matrix(s.m, s.k, 1);
    Matrix<float> y(s.m, s.n);
    const auto w = dense_copies(s);
    std::size_t i = 0;
    for (auto _ : st) {
        cpet::as_eigen(y.view()).noalias() = cpet::as_eigen(x.view()) * cpet::as_eigen(w[i].view()).transpose();
        if (++i == w.size()) i = 0;
        benchmark::ClobberMemory();
    }
    finish(st, s, threads);
}

#ifdef CPET_BENCH_HAVE_OPENBLAS
void bench_openblas(benchmark::State& st, shape s, int threads) {
    set_threads(threads);
    const auto x = random_matrix(s.m, s.k, 1);
    Matrix<float> y(s.m, s.n);
    const auto w = dense_copies(s);
    std::size_t i = 0;
    for (auto _ : st) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(s.m), int(s.n), int(s.k), 1.f, x.data(), int(s.k),
                    w[i].data(), int(s.k), 0.f, y.data(), int(s.n));
        if (++i == w.size()) i = 0;
        benchmark::ClobberMemory();
    }
    finish(st, s, threads);
}
#endif

#ifdef CPET_BENCH_HAVE_ONEDNN
/// A dnnl::matmul primitive built once; the weights are reordered once into the layout the primitive prefers
/// (format_tag::any), as a real deployment would at load time.
void bench_onednn(benchmark::State& st, shape s, int threads) {
    set_threads(threads);
    using dt = dnnl::memory::data_type;
    using tag = dnnl::memory::format_tag;
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    dnnl::stream strm(eng);
    const dnnl::memory::desc src_md({s.m, s.k}, dt::f32, tag::ab);
    const dnnl::memory::desc wei_any({s.k, s.n}, dt::f32, tag::any);
    const dnnl::memory::desc wei_user({s.k, s.n}, dt::f32, tag::ba);  // W [N, K] row-major is Wᵀ [K, N] as "ba"
    const dnnl::memory::desc dst_md({s.m, s.n}, dt::f32, tag::ab);
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src_md, wei_any, dst_md), eng);
    const dnnl::matmul prim(pd);

    auto x = random_matrix(s.m, s.k, 1);
    Matrix<float> y(s.m, s.n);
    dnnl::memory src(src_md, eng, x.data()), dst(dst_md, eng, y.data());
    std::vector<dnnl::memory> w;
    {
        auto dense = random_matrix(s.n, s.k, 2);
        dnnl::memory user(wei_user, eng, dense.data());
        for (std::size_t i = 0; i < weight_copies(s); ++i) {
            w.emplace_back(pd.weights_desc(), eng);
            dnnl::reorder(user, w.back()).execute(strm, user, w.back());
        }
        strm.wait();
    }
    std::size_t i = 0;
    for (auto _ : st) {
        prim.execute(strm, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, w[i]}, {DNNL_ARG_DST, dst}});
        strm.wait();
        if (++i == w.size()) i = 0;
    }
    finish(st, s, threads);
}
#endif

const bool registered = [] {
    const shape shapes[] = {{1, 4096, 4096},  {8, 4096, 4096},  {128, 768, 768},
                            {128, 3072, 768}, {128, 768, 3072}, {512, 4096, 4096}};
    using fn_t = void (*)(benchmark::State&, shape, int);
    std::vector<std::pair<const char*, fn_t>> impls = {{"cpet", bench_cpet}, {"eigen", bench_eigen}};
#ifdef CPET_BENCH_HAVE_OPENBLAS
    impls.emplace_back("openblas", bench_openblas);
#endif
#ifdef CPET_BENCH_HAVE_ONEDNN
    impls.emplace_back("onednn", bench_onednn);
#endif
    for (int t : {1, 2})
        for (const auto& s : shapes)
            for (const auto& [name, fn] : impls) {
                const std::string id = std::string("gemm_f32/") + name + "/" + std::to_string(s.m) + "x" +
                                       std::to_string(s.n) + "x" + std::to_string(s.k) + "/t" + std::to_string(t);
                benchmark::RegisterBenchmark(id.c_str(), fn, s, t)
                    ->Repetitions(5)
                    ->ReportAggregatesOnly(true)
                    ->UseRealTime()
                    ->Unit(benchmark::kMicrosecond);
            }
    return true;
}();

}  // namespace

int main(int argc, char** argv) {
#ifdef CPET_BENCH_HAVE_OPENBLAS
    // Debian's OpenBLAS 0.3.21 does not recognise newer Xeons (e.g. CPU model 207) and falls back to a generic
    // kernel at ~30 GFLOP/s; the kernel it would pick for AVX-512 runs ~4x faster. OpenBLAS reads
    // OPENBLAS_CORETYPE when the library loads (before main), so set it and re-execute once, giving the
    // baseline its best kernel. An explicit OPENBLAS_CORETYPE from the user is left alone.
    if (!std::getenv("OPENBLAS_CORETYPE") && cpet::arch::cpu().avx512) {
        setenv("OPENBLAS_CORETYPE", "SKYLAKEX", 1);
        execv("/proc/self/exe", argv);  // returns only on failure: then run with the generic kernel
    }
#endif
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
