// bench/bench_quantized.cpp — quantized GEMMs y = x·Ŵᵀ (W [N, K]): weight-only int8 / int4 (fp32 activations),
// W8A8 (fp32 in and out, the per-token activation quantisation included), against the dense fp32 GEMM and
// oneDNN's integer-only matmul (u8 · s8 → s32, activations already quantised: a lower bound on what the integer
// part of W8A8 costs).
//
// Names: <family>/<impl>/<M>x<N>x<K>/t<threads>, families gemm_wq, gemm_w4a8 (int4 × per-token int8), gemm_w8a8
// (cpet: any int8 codes; cpet_pairbound: codes quantised with quant_options::pair_bound, the exact u8 · s8 tile
// on AVX2 CPUs without VNNI — the same kernel as cpet where VNNI is present), gemm_f32; gemm_wq/decode_* forces the decode kernel (rows in lanes) at large M, the baseline of gemm_wq's
// blocked path there. Every run reports GOP/s
// (2·M·N·K per call) and pct_peak of the fp32 FMA peak (bench/roofline.hpp); decode shapes (M <= 8) also GBps and
// pct_bw, counting the bytes of the packed weights read per call, and rotate through copies of the weights
// totalling more than 2× the L3 size (capped near 3 GiB), so each call streams them from DRAM as a decoder does.
#include "roofline.hpp"

#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cpet/compress/quantize.hpp"
#include "cpet/kernels/gemm_f32.hpp"

#ifdef CPET_BENCH_HAVE_ONEDNN
#include <dnnl.hpp>
#endif

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
}

/// The quantized weights every cpet variant uses, built once per shape and format (RTN on uniform weights).
cc::quantized_weights make_weights(const shape& s, const cc::quant_options& o) {
    const auto dense = random_matrix(s.n, s.k, 2, 0.05f);
    return cc::quantize_rtn(dense.view(), o);
}

/// Weight-only GEMM through gemm_wq (decode kernel below 32 rows, blocked GEMM over dequantised slices from 32), or,
/// with `decode_kernel`, the decode kernel at any M (the pre-blocked path: the baseline of the large-M cases).
void bench_wq_impl(benchmark::State& st, shape s, int threads, cc::quant_options o, bool decode_kernel) {
    cpet::set_num_threads(threads);
    const auto x = random_matrix(s.m, s.k, 1);
    Matrix<float> y(s.m, s.n);
    std::vector<cc::quantized_weights> w;
    w.push_back(make_weights(s, o));
    const double bytes = double(w[0].bytes());
    for (std::size_t i = 1; i < cpet::bench::weight_copies(s.m, bytes); ++i) w.push_back(w[0]);
    std::vector<cpet::kernels::wq_weights> views;
    for (const auto& q : w) views.push_back(cc::kernel_view(q));
    std::size_t i = 0;
    for (auto _ : st) {
        if (decode_kernel)
            cpet::arch::dispatch(
                [&](auto tag) { cpet::kernels::gemm_wq_decode(tag, x.view(), views[i], y.view(), nullptr); });
        else
            cpet::kernels::gemm_wq(x.view(), views[i], y.view());
        if (++i == views.size()) i = 0;
        benchmark::ClobberMemory();
    }
    finish(st, s, threads, bytes);
}

void bench_wq(benchmark::State& st, shape s, int threads, cc::quant_options o) {
    bench_wq_impl(st, s, threads, o, false);
}
void bench_wq_decode(benchmark::State& st, shape s, int threads, cc::quant_options o) {
    bench_wq_impl(st, s, threads, o, true);
}

/// int4 weights × per-token int8 activations (W4A8): the VNNI decode path of ggml's q4 × q8.
void bench_w4a8(benchmark::State& st, shape s, int threads, cc::quant_options o) {
    cpet::set_num_threads(threads);
    const auto x = random_matrix(s.m, s.k, 1);
    Matrix<float> y(s.m, s.n);
    std::vector<cc::quantized_weights> w;
    w.push_back(make_weights(s, o));
    const double bytes = double(w[0].bytes());
    for (std::size_t i = 1; i < cpet::bench::weight_copies(s.m, bytes); ++i) w.push_back(w[0]);
    std::vector<cpet::kernels::wq_weights> views;
    for (const auto& q : w) views.push_back(cc::kernel_view(q));
    std::size_t i = 0;
    for (auto _ : st) {
        cpet::kernels::gemm_w4a8(x.view(), views[i], y.view());
        if (++i == views.size()) i = 0;
        benchmark::ClobberMemory();
    }
    finish(st, s, threads, bytes);
}

void bench_w8a8(benchmark::State& st, shape s, int threads, cc::quant_options o) {
    cpet::set_num_threads(threads);
    const auto x = random_matrix(s.m, s.k, 1);
    Matrix<float> y(s.m, s.n);
    std::vector<cc::quantized_weights> w;
    w.push_back(make_weights(s, o));
    const double bytes = double(w[0].bytes());
    for (std::size_t i = 1; i < cpet::bench::weight_copies(s.m, bytes); ++i) w.push_back(w[0]);
    std::vector<cpet::kernels::wq_weights> views;
    for (const auto& q : w) views.push_back(cc::kernel_view(q));
    std::size_t i = 0;
    for (auto _ : st) {
        cpet::kernels::gemm_s8(x.view(), views[i], y.view());
        if (++i == views.size()) i = 0;
        benchmark::ClobberMemory();
    }
    finish(st, s, threads, bytes);
}

void bench_dense(benchmark::State& st, shape s, int threads) {
    cpet::set_num_threads(threads);
    const auto x = random_matrix(s.m, s.k, 1);
    Matrix<float> y(s.m, s.n);
    std::vector<cpet::kernels::packed_weights_f32> w;
    const double bytes = double(s.n) * double(s.k) * sizeof(float);
    {
        const auto dense = random_matrix(s.n, s.k, 2);
        for (std::size_t i = 0; i < cpet::bench::weight_copies(s.m, bytes); ++i) w.emplace_back(dense.view());
    }
    std::size_t i = 0;
    for (auto _ : st) {
        cpet::kernels::gemm_f32(x.view(), w[i], y.view());
        if (++i == w.size()) i = 0;
        benchmark::ClobberMemory();
    }
    finish(st, s, threads, bytes);
}

#ifdef CPET_BENCH_HAVE_ONEDNN
/// oneDNN matmul u8 src × s8 weights → s32 dst: integer only (no activation quantisation, no rescale). Weights
/// reordered once into the primitive's preferred layout (format_tag::any).
void bench_onednn_s8(benchmark::State& st, shape s, int threads) {
    cpet::set_num_threads(threads);
    using dt = dnnl::memory::data_type;
    using tag = dnnl::memory::format_tag;
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    dnnl::stream strm(eng);
    const dnnl::memory::desc src_md({s.m, s.k}, dt::u8, tag::ab);
    const dnnl::memory::desc wei_any({s.k, s.n}, dt::s8, tag::any);
    const dnnl::memory::desc wei_user({s.k, s.n}, dt::s8, tag::ba);  // W [N, K] row-major is Wᵀ [K, N] as "ba"
    const dnnl::memory::desc dst_md({s.m, s.n}, dt::s32, tag::ab);
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src_md, wei_any, dst_md), eng);
    const dnnl::matmul prim(pd);

    std::vector<std::uint8_t> x(static_cast<std::size_t>(s.m * s.k));
    std::vector<std::int32_t> y(static_cast<std::size_t>(s.m * s.n));
    std::mt19937 gen(1);
    for (auto& v : x) v = static_cast<std::uint8_t>(gen() & 0xFF);
    dnnl::memory src(src_md, eng, x.data()), dst(dst_md, eng, y.data());
    std::vector<dnnl::memory> w;
    const double bytes = double(s.n) * double(s.k);
    {
        std::vector<std::int8_t> dense(static_cast<std::size_t>(s.n * s.k));
        for (auto& v : dense) v = static_cast<std::int8_t>(static_cast<int>(gen() % 255) - 127);
        dnnl::memory user(wei_user, eng, dense.data());
        for (std::size_t i = 0; i < cpet::bench::weight_copies(s.m, bytes); ++i) {
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
    finish(st, s, threads, bytes);
}
#endif

std::string shape_name(const shape& s) {
    return std::to_string(s.m) + "x" + std::to_string(s.n) + "x" + std::to_string(s.k);
}

/// "/<M>x<N>x<K>/t<threads>", appended piece by piece (GCC 12 warns, falsely, on `"/" + std::string` here).
std::string name_tail(const shape& s, int t) {
    std::string r("/");
    r.append(shape_name(s)).append("/t").append(std::to_string(t));
    return r;
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
    const index_t n = 4096, k = 4096;
    cc::quant_options int8_pc{cc::qbits::int8, cc::granularity::per_channel};
    cc::quant_options int4_g128{cc::qbits::int4, cc::granularity::per_group, 128};
    cc::quant_options int8_pairs = int8_pc;
    int8_pairs.pair_bound = true;
    for (int t : {1, 2})
        for (index_t m : {1, 8, 128, 512}) {
            const shape s{m, n, k};
            const std::string tail = name_tail(s, t);
            if (m <= 128) {
                add("gemm_wq/cpet_int8" + tail, bench_wq, s, t, int8_pc);
                add("gemm_wq/cpet_int4_g128" + tail, bench_wq, s, t, int4_g128);
            }
            if (m <= 8) add("gemm_w4a8/cpet_int4_g128" + tail, bench_w4a8, s, t, int4_g128);
            add("gemm_w8a8/cpet" + tail, bench_w8a8, s, t, int8_pc);
            // pair-bounded codes (quant_options::pair_bound): the exact u8 · s8 tile on AVX2 without VNNI
            add("gemm_w8a8/cpet_pairbound" + tail, bench_w8a8, s, t, int8_pairs);
#ifdef CPET_BENCH_HAVE_ONEDNN
            add("gemm_w8a8/onednn_u8s8s32" + tail, bench_onednn_s8, s, t);
#endif
            add("gemm_f32/cpet_dense" + tail, bench_dense, s, t);
        }
    // Large M, weight-only beside dense fp32 on the same shapes (BERT-base FFN at 128 tokens, a 4096² layer, the
    // crossover rows): cpet_* is gemm_wq (blocked GEMM over dequantised slices from M = 32), decode_* the decode
    // kernel forced at the same M (the path large M took before).
    for (int t : {1, 2})
        for (const shape& s : {shape{16, 4096, 4096}, shape{32, 4096, 4096}, shape{64, 4096, 4096},
                               shape{128, 4096, 4096}, shape{128, 768, 3072}, shape{128, 3072, 768}}) {
            const std::string tail = name_tail(s, t);
            for (const auto& [name, o] : {std::pair{"int8", int8_pc}, std::pair{"int4_g128", int4_g128}}) {
                if (s.n != 4096 || s.m != 128) add(std::string("gemm_wq/cpet_") + name + tail, bench_wq, s, t, o);
                add(std::string("gemm_wq/decode_") + name + tail, bench_wq_decode, s, t, o);
            }
            if (s.n != 4096 || s.m != 128) add("gemm_f32/cpet_dense" + tail, bench_dense, s, t);
        }
    // W8A8 on the BERT-base layer's own GEMMs at the layer's 8 × 128 tokens (QKV, attention output, FFN up and
    // down: K = 768 and 3072, one or three K blocks), beside oneDNN on the same shapes.
    for (int t : {1, 2})
        for (const shape& s : {shape{1024, 2304, 768}, shape{1024, 768, 768}, shape{1024, 3072, 768},
                               shape{1024, 768, 3072}}) {
            const std::string tail = name_tail(s, t);
            add("gemm_w8a8/cpet" + tail, bench_w8a8, s, t, int8_pc);
#ifdef CPET_BENCH_HAVE_ONEDNN
            add("gemm_w8a8/onednn_u8s8s32" + tail, bench_onednn_s8, s, t);
#endif
        }
    return true;
}();

}  // namespace

BENCHMARK_MAIN();
