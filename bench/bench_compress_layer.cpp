// bench/bench_compress_layer.cpp — one BERT-base layer (d 768, 12 heads, d_ff 3072; 8 sequences × 128 tokens)
// under each compression: what it costs in bytes, in output error and what it buys in time.
//
// layer_compress/<policy>/bert_base_8x128/t1   policy ∈ dense, int8_per_channel, int4_g128, w8a8, pruned50
//   pruned50: 50% of the heads and 50% of the FFN neurons removed by magnitude (data-free), then dense fp32.
// After the runs a table prints: policy, weight bytes, relative output error against the dense layer on the
// benchmark input, speed-up of the best repetition over dense's best.
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "cpet/compress/quantized.hpp"
#include "cpet/cpet.hpp"
#include "cpet/nn/prune.hpp"

namespace {

using cpet::index_t;
using MatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

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
    static const cpet::Matrix<float> x = [] {
        std::srand(2);
        cpet::Matrix<float> m(batch * seq, bert_base().d_model);
        cpet::as_eigen(m) = MatF::Random(m.rows(), m.cols());
        return m;
    }();
    return x;
}

struct row {
    std::size_t bytes = 0;
    double rel_error = 0;
    double best_s = 1e300;  ///< fastest single forward over all repetitions
};
std::map<std::string, row>& table() {
    static std::map<std::string, row> t;
    return t;
}
const std::vector<std::string> order{"dense", "int8_per_channel", "int4_g128", "w8a8", "pruned50"};

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

template <class Layer>
void run(benchmark::State& st, const std::string& name, const Layer& layer) {
    cpet::set_num_threads(1);
    const std::vector<index_t> lengths(batch, seq);
    cpet::Matrix<float> y(input().rows(), input().cols());
    cpet::nn::workspace ws;
    layer.forward(input(), lengths, y, ws);
    row& r = table()[name];
    if (r.bytes == 0) {
        r.bytes = layer.bytes();
        const auto d = cpet::as_eigen(dense_output());
        r.rel_error = double((cpet::as_eigen(y) - d).norm() / d.norm());
    }
    for (auto _ : st) {
        const auto t0 = std::chrono::steady_clock::now();
        layer.forward(input(), lengths, y, ws);
        benchmark::DoNotOptimize(y.data());
        r.best_s = std::min(r.best_s, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::string label("isa=");
    label.append(cpet::arch::name(ws.last_isa()));
    st.SetLabel(label);
}

template <class Policy>
void bm_policy(benchmark::State& st, const char* name) {
    static const cpet::TransformerLayer<cpet::config::bert<Policy>> layer(weights(), bert_base());
    run(st, name, layer);
}

void bm_pruned(benchmark::State& st) {
    static const cpet::nn::pruned_layer p = [] {
        cpet::compress::structured_options o;
        o.head_ratio = 0.5;
        o.neuron_ratio = 0.5;
        return cpet::nn::prune_structured(weights(), bert_base(), o);
    }();
    static const cpet::TransformerLayer<cpet::config::bert<>> layer(p.weights, p.shape);
    run(st, "pruned50", layer);
}

void register_all() {
    const auto reg = [](const std::string& policy, auto fn) {
        std::string name("layer_compress/");
        name.append(policy).append("/bert_base_8x128/t1");
        benchmark::RegisterBenchmark(name.c_str(), fn)
            ->Unit(benchmark::kMillisecond)
            ->Repetitions(5)
            ->ReportAggregatesOnly(true)
            ->UseRealTime();
    };
    reg("dense", [](benchmark::State& st) { bm_policy<cpet::compress::dense>(st, "dense"); });
    reg("int8_per_channel", [](benchmark::State& st) { bm_policy<cpet::compress::int8_per_channel>(st, "int8_per_channel"); });
    reg("int4_g128", [](benchmark::State& st) { bm_policy<cpet::compress::int4_g128>(st, "int4_g128"); });
    reg("w8a8", [](benchmark::State& st) { bm_policy<cpet::compress::w8a8>(st, "w8a8"); });
    reg("pruned50", bm_pruned);
}

}  // namespace

int main(int argc, char** argv) {
    register_all();
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    const auto& t = table();
    const auto dense = t.find("dense");
    std::printf("\n%-18s %14s %14s %12s %10s\n", "policy", "bytes", "rel. error", "best ms", "speed-up");
    for (const auto& name : order) {
        const auto it = t.find(name);
        if (it == t.end()) continue;
        const row& r = it->second;
        const double speedup = dense != t.end() ? dense->second.best_s / r.best_s : 0.0;
        std::printf("%-18s %14zu %14.3e %12.2f %9.2fx\n", name.c_str(), r.bytes, r.rel_error, r.best_s * 1e3, speedup);
    }
    return 0;
}
