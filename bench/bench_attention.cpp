// bench/bench_attention.cpp — flash-style attention vs the way a user writes it with Eigen.
//
// attention/cpet/<shape>/t<threads>  : cpet::kernels::attention (tiled, online softmax, no Sq×Sk matrix)
// attention/eigen/<shape>/t<threads> : per head S = Q_h·K_hᵀ·scale, mask, row softmax, O_h = S·V_h (Eigen GEMMs,
//                                      Eigen's own OpenMP threading inside each product)
// Shapes: BERT-base-like (12 heads × 64, bidirectional, seq 128/512/2048) and a LLaMA-7B-like decode step
// (32 heads × 128, one query, causal, KV cache of 512/2048). FLOPs count 4·D per visible (query, key) pair and head.
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <cmath>
#include <string>
#include <vector>

#include "cpet/core/eigen.hpp"
#include "cpet/core/parallel.hpp"
#include "cpet/kernels/attention.hpp"

#include "roofline.hpp"

namespace {

using cpet::index_t;
using MatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

struct shape {
    std::string name;
    index_t heads, kv_heads, dim, sq, sk;
    bool causal;
};

struct data {
    cpet::Matrix<float> q, k, v, out;
    cpet::kernels::attention_args args;
    explicit data(const shape& s)
        : q(s.sq, s.heads * s.dim), k(s.sk, s.kv_heads * s.dim), v(s.sk, s.kv_heads * s.dim),
          out(s.sq, s.heads * s.dim) {
        cpet::as_eigen(q) = MatF::Random(q.rows(), q.cols());
        cpet::as_eigen(k) = MatF::Random(k.rows(), k.cols());
        cpet::as_eigen(v) = MatF::Random(v.rows(), v.cols());
        args.q = q.view();
        args.k = k.view();
        args.v = v.view();
        args.out = out.view();
        args.n_heads = s.heads;
        args.n_kv_heads = s.kv_heads;
        args.head_dim = s.dim;
        args.causal = s.causal;
        args.q_pos0 = s.sk - s.sq;  // queries are the last Sq positions (decode: the new token)
    }
};

void run_cpet(benchmark::State& st, const shape& s, int threads) {
    cpet::set_num_threads(threads);
    data d(s);
    for (auto _ : st) {
        cpet::kernels::attention(d.args);
        benchmark::DoNotOptimize(d.out.data());
        benchmark::ClobberMemory();
    }
    cpet::bench::report_flops(st, cpet::kernels::attention_flops(d.args), threads);
}

void run_eigen(benchmark::State& st, const shape& s, int threads) {
    cpet::set_num_threads(threads);
    data d(s);
    const index_t D = s.dim, group = s.heads / s.kv_heads;
    const float scale = 1.f / std::sqrt(float(D));
    auto Q = cpet::as_eigen(d.q);
    auto K = cpet::as_eigen(d.k);
    auto V = cpet::as_eigen(d.v);
    auto O = cpet::as_eigen(d.out);
    MatF S(s.sq, s.sk);
    for (auto _ : st) {
        for (index_t h = 0; h < s.heads; ++h) {
            const index_t g = h / group;
            S.noalias() = Q.middleCols(h * D, D) * K.middleCols(g * D, D).transpose();
            S *= scale;
            if (s.causal)
                for (index_t i = 0; i < s.sq; ++i)
                    for (index_t j = d.args.q_pos0 + i + 1; j < s.sk; ++j) S(i, j) = -INFINITY;
            S = (S.colwise() - S.rowwise().maxCoeff()).array().exp();
            S.array().colwise() /= S.rowwise().sum().array();
            O.middleCols(h * D, D).noalias() = S * V.middleCols(g * D, D);
        }
        benchmark::DoNotOptimize(d.out.data());
        benchmark::ClobberMemory();
    }
    cpet::bench::report_flops(st, cpet::kernels::attention_flops(d.args), threads);
}

}  // namespace

int main(int argc, char** argv) {
    const std::vector<shape> shapes{
        {"bert_h12_d64_s128", 12, 12, 64, 128, 128, false},
        {"bert_h12_d64_s512", 12, 12, 64, 512, 512, false},
        {"bert_h12_d64_s2048", 12, 12, 64, 2048, 2048, false},
        {"llama7b_decode_h32_d128_kv512", 32, 32, 128, 1, 512, true},
        {"llama7b_decode_h32_d128_kv2048", 32, 32, 128, 1, 2048, true},
        // grouped-query decode: 4 and 8 query heads share each K/V head (bench_serve's and TinyLlama's layers)
        {"gqa4_decode_h16_kv4_d128_kv256", 16, 4, 128, 1, 256, true},
        {"gqa8_decode_h32_kv4_d64_kv512", 32, 4, 64, 1, 512, true},
    };
    for (const auto& s : shapes)
        for (int t : {1, 2}) {
            const std::string suffix = s.name + "/t" + std::to_string(t);
            benchmark::RegisterBenchmark(("attention/cpet/" + suffix).c_str(),
                                         [s, t](benchmark::State& st) { run_cpet(st, s, t); })
                ->Repetitions(5)
                ->ReportAggregatesOnly(true)
                ->UseRealTime()
                ->Unit(benchmark::kMicrosecond);
            benchmark::RegisterBenchmark(("attention/eigen/" + suffix).c_str(),
                                         [s, t](benchmark::State& st) { run_eigen(st, s, t); })
                ->Repetitions(5)
                ->ReportAggregatesOnly(true)
                ->UseRealTime()
                ->Unit(benchmark::kMicrosecond);
        }
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
