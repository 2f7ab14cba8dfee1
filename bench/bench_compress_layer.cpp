// bench/bench_compress_layer.cpp — one BERT-base layer (d 768, 12 heads, d_ff 3072; 8 sequences × 128 tokens)
// under each compression policy: bytes, output error, and time against the dense fp32 layer.
//
// layer_compress/<policy>/bert_base_8x128/t<threads>
//   Every layer is made by nn::compress from the same random dense weights, calibrated on 24 × 128 tokens of
//   its own (not the benchmark input). Policies:
//     dense, int8 (per-channel, weight-only), int8_gptq, int4_g128 (weight-only), int4_g128_gptq, w8a8,
//     w8a8_pairs (pair-bounded codes: the exact u8 · s8 tile on AVX2 without VNNI), w8a8_smooth (SmoothQuant α 0.5), w4a8_g128, sparse_2:4 (magnitude), sparse_2:4_wanda,
//     pruned50 (50 % of heads and FFN neurons, FLAP fluctuation score + bias compensation, then dense fp32),
//     pruned50+w8a8.
// After the runs one table prints per thread count: policy, MiB, compression ratio, relative output error on the
// calibration tokens (nn::compress's report) and on the benchmark input (held out), the median time of all
// timed forwards, and the speed-up of that median over dense's.
// Random weights have no outlier channels and no structure, so the errors here rank the policies only roughly;
// what a policy costs on a real checkpoint is a property of that checkpoint.
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "cpet/cpet.hpp"
#include "roofline.hpp"

namespace {

using cpet::index_t;
namespace cc = cpet::compress;

cpet::nn::layer_shape bert_base() {
    cpet::nn::layer_shape s;
    s.d_model = 768, s.n_heads = 12, s.n_kv_heads = 12, s.head_dim = 64, s.d_ff = 3072, s.eps = 1e-12f;
    return s;
}
constexpr index_t batch = 8, seq = 128;

const cpet::nn::dense_layer_weights& weights() {
    static const auto w = cpet::nn::random_layer_weights(bert_base(), 1, cpet::nn::kind_of<cpet::config::bert<>>);
    return w;
}
const cpet::Matrix<float>& input() {
    static const cpet::Matrix<float> x = cpet::bench::random_matrix(batch * seq, bert_base().d_model, 2);
    return x;
}
const cpet::nn::calibration_set& calibration() {
    // 24 × 128 tokens: GPTQ's Hessian of the down input (3072 channels) needs more tokens than channels, or it
    // fits the calibration set and loses on held-out input
    static const cpet::nn::calibration_set set{cpet::bench::random_matrix(24 * seq, bert_base().d_model, 3),
                                               std::vector<index_t>(24, seq)};
    return set;
}

struct row {
    std::size_t bytes = 0;
    double ratio = 0, calib_error = 0, held_out_error = 0;
    std::vector<double> seconds;  ///< every timed forward
    double median() const {
        std::vector<double> s = seconds;
        if (s.empty()) return 0;
        std::nth_element(s.begin(), s.begin() + std::ptrdiff_t(s.size() / 2), s.end());
        return s[s.size() / 2];
    }
};
std::map<std::pair<std::string, int>, row>& table() {
    static std::map<std::pair<std::string, int>, row> t;
    return t;
}
std::vector<std::string>& order() {
    static std::vector<std::string> o;
    return o;
}

cpet::Matrix<float> forward_of(const auto& layer) {
    const std::vector<index_t> lengths(batch, seq);
    cpet::Matrix<float> y(input().rows(), input().cols());
    cpet::nn::workspace ws;
    layer.forward(input(), lengths, y, ws);
    return y;
}
const cpet::Matrix<float>& dense_output() {
    static const cpet::Matrix<float> y = forward_of(cpet::TransformerLayer<cpet::config::bert<>>(weights(), bert_base()));
    return y;
}

template <class Compressed>
void run(benchmark::State& st, const std::string& name, int threads, const Compressed& c) {
    cpet::set_num_threads(threads);
    const std::vector<index_t> lengths(batch, seq);
    cpet::Matrix<float> y(input().rows(), input().cols());
    cpet::nn::workspace ws;
    c.layer.forward(input(), lengths, y, ws);
    row& r = table()[{name, threads}];
    r.bytes = c.report.bytes;
    r.ratio = c.report.ratio;
    r.calib_error = c.report.rel_error;
    const auto d = cpet::as_eigen(dense_output());
    r.held_out_error = double((cpet::as_eigen(y) - d).norm() / d.norm());
    for (auto _ : st) {
        const auto t0 = std::chrono::steady_clock::now();
        c.layer.forward(input(), lengths, y, ws);
        benchmark::DoNotOptimize(y.data());
        r.seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    st.SetLabel(std::string("isa=").append(cpet::arch::name(ws.last_isa())));
}

/// The layer of `Policy` (compressed once, on first use: one static per instantiation) as a benchmark body.
template <class Policy, bool Prune = false>
auto body() {
    return [](benchmark::State& st, const std::string& name, int threads) {
        static const auto c = [] {
            cpet::nn::compress_options o;
            if (Prune)
                o.prune = {.head_ratio = 0.5, .neuron_ratio = 0.5, .score = cc::prune_score::fluctuation,
                           .bias_compensation = true};
            return cpet::nn::compress<cpet::config::bert<Policy>>(weights(), bert_base(), calibration(), o);
        }();
        run(st, name, threads, c);
    };
}

void register_all() {
    const auto reg = [](const std::string& policy, auto fn) {
        order().push_back(policy);
        for (int t : {1, 2}) {  // the thread count is the one argument, named /t<n> like every other bench
            const std::string name = "layer_compress/" + policy + "/bert_base_8x128/t" + std::to_string(t);
            benchmark::RegisterBenchmark(name.c_str(), [fn, policy, t](benchmark::State& st) { fn(st, policy, t); })
                ->Unit(benchmark::kMillisecond)
                ->Repetitions(5)
                ->ReportAggregatesOnly(true)
                ->UseRealTime();
        }
    };
    using int8_gptq = cc::int8_per_channel_gptq;
    using int4_gptq = cc::int4_g128_gptq;
    reg("dense", body<cc::dense>());
    reg("int8", body<cc::int8_per_channel>());
    reg("int8_gptq", body<int8_gptq>());
    reg("int4_g128", body<cc::int4_g128>());
    reg("int4_g128_gptq", body<int4_gptq>());
    reg("w8a8", body<cc::w8a8>());
    reg("w8a8_pairs", body<cc::w8a8_pairs>());
    reg("w8a8_smooth", body<cc::w8a8_smooth>());
    reg("w4a8_g128", body<cc::w4a8_g128>());
    reg("sparse_2:4", body<cc::nm_sparse<2, 4>>());
    reg("sparse_2:4_wanda", body<cc::nm_sparse<2, 4, cc::sparsity_score::wanda>>());
    reg("pruned50", body<cc::dense, true>());
    reg("pruned50+w8a8", body<cc::w8a8, true>());
}

}  // namespace

int main(int argc, char** argv) {
    register_all();
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    const auto& t = table();
    for (int threads : {1, 2}) {
        const auto dense = t.find({"dense", threads});
        bool header = false;
        for (const auto& name : order()) {
            const auto it = t.find({name, threads});
            if (it == t.end()) continue;
            if (!header) {
                std::printf("\nBERT-base layer, %lld tokens, %d thread(s)\n%-18s %9s %7s %12s %12s %10s %9s\n",
                            static_cast<long long>(batch * seq), threads, "policy", "MiB", "ratio", "err (calib)",
                            "err (input)", "median ms", "speed-up");
                header = true;
            }
            const row& r = it->second;
            const double speedup = dense != t.end() ? dense->second.median() / r.median() : 0.0;
            std::printf("%-18s %9.2f %6.2fx %12.3e %12.3e %10.2f %8.2fx\n", name.c_str(), double(r.bytes) / 1048576.0,
                        r.ratio, r.calib_error, r.held_out_error, r.median() * 1e3, speedup);
        }
    }
    return 0;
}
