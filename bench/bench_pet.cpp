// bench/bench_pet.cpp — what PET methods cost over the bare compressed backbone.
//
// pet_overhead/linear/<backbone>/<N>x<K>/t1                 the base linear y = x·Wᵀ, M = 128 tokens
// pet_overhead/lora_r<r>_fused/<backbone>/<N>x<K>/t1        LoRA through the layer's path: U = x·Aᵀ (one thin GEMM),
//                                                           s·U·Bᵀ added in the base GEMM's epilogue
// pet_overhead/lora_r<r>_unfused/<backbone>/<N>x<K>/t1      the baseline: base GEMM, then U = x·Aᵀ and a second
//                                                           pass y += s·U·Bᵀ (Eigen)
// pet_overhead/recovery_r32/<backbone>/<N>x<K>/t1           CPET's GELU recovery module, fused like LoRA
// pet_overhead/<method>/<backbone>/bert_base_1x128/t1       a whole BERT-base layer (d 768, d_ff 3072), 128 tokens:
//                                                           layer (bare), lora_r<r> (all six linears), adapters
//                                                           (bottleneck 64, both sublayers), prefix_L16/L64,
//                                                           recovery_r32, ia3, bitfit (linear biases + LayerNorm β),
//                                                           cpet (recovery 32 + LoRA 16)
// Compare each with `linear` / `layer` of the same backbone and shape: ratio = time / base time. The extra FLOPs
// of LoRA at rank r on an N×K linear are r·(N + K)/(N·K) of the base (1.6 % at r = 32, 4096×4096).
// Backbones (`backbones` below, one line each): dense fp32, int8 weight-only per channel, int4 weight-only group
// 128 (both RTN, fp32 activations) and 2:4 sparse (magnitude, fp32 values). Every backbone takes every method.
// Only the dense fp32 GEMM fuses the low-rank term into its tile epilogue; the int8/int4 and 2:4 kernels fuse the
// bias only and finish through compress/split_epilogue.hpp, which adds s·U·Bᵀ as one thin Eigen GEMM over y after
// the product — the same work as the unfused baseline, so there `fused` ≈ `unfused` by construction.
// Single-threaded (t1): the machine is shared, and the ratio is what matters. Weights and layers are built once
// per backbone and shape (not per repetition); the whole program runs in a few minutes.
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <memory>
#include <string>
#include <tuple>
#include <typeinfo>
#include <vector>

#include "cpet/cpet.hpp"
#include "roofline.hpp"

namespace {

using cpet::index_t;
namespace pet = cpet::pet;

using backbones = std::tuple<cpet::compress::dense, cpet::compress::int8_per_channel, cpet::compress::int4_g128,
                             cpet::compress::nm_sparse<2, 4>>;
constexpr index_t tokens = 128;
constexpr int threads = 1;

using cpet::bench::random_matrix;

/// One object built per key and kept while consecutive benchmarks (and the repetitions of one) ask for that key;
/// a new key frees the old object, so at most one 4096² weight or BERT layer is alive at a time.
std::string held_key;
std::shared_ptr<const void> held;

template <class T, class Make>
const T& cached(std::string key, Make make) {
    key += typeid(T).name();
    if (!held || held_key != key) {
        held.reset();
        held = std::make_shared<const T>(make());
        held_key = key;
    }
    return *static_cast<const T*>(held.get());
}

void single_thread() {
    cpet::set_num_threads(threads);
    Eigen::setNbThreads(threads);
}

pet::layer_dims linear_dims(index_t n, index_t k) {
    pet::layer_dims d;
    d.d_model = k, d.q_dim = n, d.kv_dim = n, d.d_ff = n;
    return d;
}

template <class Modules>
void randomize_b(Modules& m, const pet::layer_dims& d, unsigned seed) {
    for (int i = 0; i < pet::target_count; ++i) {
        const auto t = pet::target(i);
        if (m.rank(t)) m.set(t, m.A(t), random_matrix(d.out(t), m.rank(t), seed + unsigned(i), 0.05f));
    }
}

// ---- linear level ----

enum class mode { base, fused, unfused };

template <class Comp, class P>
void bm_linear(benchmark::State& st, index_t n, index_t k, index_t rank, mode md) {
    single_thread();
    using F = typename Comp::format;
    const auto& lin = cached<cpet::nn::Linear<F>>(std::string(Comp::name()) + "/" + std::to_string(n) + "x" + std::to_string(k), [&] {
        const auto w = random_matrix(n, k, 1, 1.f / std::sqrt(float(k)));
        return cpet::nn::Linear<F>(Comp::compress(w, nullptr), std::vector<float>(std::size_t(n), 0.01f));
    });
    const auto x = random_matrix(tokens, k, 2);
    cpet::Matrix<float> y(tokens, n);
    const auto d = linear_dims(n, k);
    typename P::modules m;
    if (md != mode::base) {
        typename P::options o;
        o.rank = rank;
        o.targets = pet::target_set{pet::target::q};
        m = P::make(d, o, 3);
        randomize_b(m, d, 4);
    }
    pet::scratch sc;
    cpet::Matrix<float> u(tokens, std::max<index_t>(rank, 1));
    auto body = [&](auto tag) {
        switch (md) {
            case mode::base: lin.forward(tag, x, y, {}); break;
            case mode::fused: cpet::nn::detail::project(tag, lin, pet::target::q, x, y, {}, m, sc); break;
            case mode::unfused: {
                lin.forward(tag, x, y, {});
                m.project(pet::target::q, x, u, sc);
                cpet::as_eigen(y).noalias() +=
                    m.lowrank_scale(pet::target::q) * (cpet::as_eigen(u) * cpet::as_eigen(m.B(pet::target::q)).transpose());
                break;
            }
        }
    };
    cpet::arch::dispatch(body);  // warm-up (scratch, packing buffers)
    for (auto _ : st) {
        cpet::arch::dispatch(body);
        benchmark::DoNotOptimize(y.data());
    }
    const double base = 2.0 * double(tokens) * double(n) * double(k);
    cpet::bench::report_flops(st, base, threads);  // counted as the base's flops: pct_peak compares like for like
    st.SetLabel(std::string("isa=") + std::string(cpet::arch::name(cpet::arch::active())));
}

// ---- layer level (BERT-base) ----

cpet::nn::layer_shape bert_base() {
    cpet::nn::layer_shape s;
    s.d_model = 768, s.n_heads = 12, s.n_kv_heads = 12, s.head_dim = 64, s.d_ff = 3072, s.eps = 1e-12f;
    return s;
}

template <class Comp, class P, class Make>
void bm_layer(benchmark::State& st, Make make) {
    single_thread();
    using C = cpet::config::bert<Comp>;
    const auto s = bert_base();
    const auto& layer = cached<cpet::TransformerLayer<C>>(std::string(Comp::name()) + "/" + P::name(), [&] {
        return cpet::TransformerLayer<C>(cpet::nn::random_layer_weights(s, 5, cpet::nn::kind_of<C>), s);
    });
    const typename P::modules task = make(layer.pet_dims());
    const std::vector<index_t> lengths{tokens};
    const auto x = random_matrix(tokens, s.d_model, 6);
    cpet::Matrix<float> y(tokens, s.d_model);
    cpet::nn::workspace ws;
    layer.forward(x, lengths, y, ws, task);
    for (auto _ : st) {
        layer.forward(x, lengths, y, ws, task);
        benchmark::DoNotOptimize(y.data());
    }
    const double T = double(tokens), dm = double(s.d_model);
    cpet::bench::report_flops(st, 2 * T * (4 * dm * dm + 2 * dm * double(s.d_ff)) + 4 * T * T * dm, threads);
    st.SetLabel(std::string("isa=") + std::string(cpet::arch::name(ws.last_isa())));
}

template <class Comp>
void register_backbone() {
    const std::string bb(Comp::name());
    auto reg = [](const std::string& name, auto fn) {
        benchmark::RegisterBenchmark(("pet_overhead/" + name + "/t1").c_str(), fn)
            ->Unit(benchmark::kMillisecond)
            ->Repetitions(5)
            ->ReportAggregatesOnly(true)
            ->UseRealTime()
            ->MinTime(0.3);
    };
    for (auto [n, k] : {std::pair<index_t, index_t>{768, 768}, {4096, 4096}}) {
        const std::string sh = "/" + bb + "/" + std::to_string(n) + "x" + std::to_string(k);
        reg("linear" + sh, [=](benchmark::State& st) { bm_linear<Comp, pet::lora>(st, n, k, 0, mode::base); });
        for (index_t r : {8, 16, 32, 64}) {
            const std::string rn = "lora_r" + std::to_string(r);
            reg(rn + "_fused" + sh, [=](benchmark::State& st) { bm_linear<Comp, pet::lora>(st, n, k, r, mode::fused); });
            reg(rn + "_unfused" + sh,
                [=](benchmark::State& st) { bm_linear<Comp, pet::lora>(st, n, k, r, mode::unfused); });
        }
        reg("recovery_r32" + sh, [=](benchmark::State& st) { bm_linear<Comp, pet::recovery>(st, n, k, 32, mode::fused); });
    }
    const std::string sh = "/" + bb + "/bert_base_1x128";
    reg("layer" + sh, [](benchmark::State& st) { bm_layer<Comp, pet::none>(st, [](const auto&) { return pet::none::modules{}; }); });
    for (index_t r : {8, 16, 32, 64})
        reg("lora_r" + std::to_string(r) + sh, [r](benchmark::State& st) {
            bm_layer<Comp, pet::lora>(st, [r](const pet::layer_dims& d) {
                auto m = pet::lora::make(d, {.rank = r, .alpha = 16, .targets = pet::target_set::attention() |
                                                                                 pet::target_set{pet::target::up, pet::target::down}});
                randomize_b(m, d, 7);
                return m;
            });
        });
    reg("adapter" + sh, [](benchmark::State& st) {
        bm_layer<Comp, pet::adapter>(st, [](const pet::layer_dims& d) { return pet::adapter::make(d, {.bottleneck = 64}); });
    });
    reg("parallel_adapter" + sh, [](benchmark::State& st) {
        bm_layer<Comp, pet::parallel_adapter>(st, [](const pet::layer_dims& d) { return pet::parallel_adapter::make(d, {.bottleneck = 64}); });
    });
    reg("scaled_parallel_adapter" + sh, [](benchmark::State& st) {
        bm_layer<Comp, pet::scaled_parallel_adapter>(st, [](const pet::layer_dims& d) {
            return pet::scaled_parallel_adapter::make(d, {.bottleneck = 64});
        });
    });
    for (index_t L : {16, 64})
        reg("prefix_L" + std::to_string(L) + sh, [L](benchmark::State& st) {
            bm_layer<Comp, pet::prefix_tuning>(st, [L](const pet::layer_dims& d) { return pet::prefix_tuning::make(d, {.length = L}); });
        });
    reg("recovery_r32" + sh, [](benchmark::State& st) {
        bm_layer<Comp, pet::recovery>(st, [](const pet::layer_dims& d) {
            auto m = pet::recovery::make(d, {});
            randomize_b(m, d, 8);
            return m;
        });
    });
    reg("ia3" + sh, [](benchmark::State& st) { bm_layer<Comp, pet::ia3>(st, [](const pet::layer_dims& d) { return pet::ia3::make(d); }); });
    reg("bitfit" + sh, [](benchmark::State& st) {
        bm_layer<Comp, pet::bitfit>(st, [](const pet::layer_dims& d) { return pet::bitfit::make(d); });
    });
    using cpet_stack = pet::stack<pet::recovery, pet::lora>;
    reg("cpet_recovery32_lora16" + sh, [](benchmark::State& st) {
        bm_layer<Comp, cpet_stack>(st, [](const pet::layer_dims& d) {
            auto rec = pet::recovery::make(d, {});
            randomize_b(rec, d, 9);
            auto lora = pet::lora::make(d, {.rank = 16, .alpha = 16, .targets = pet::target_set::attention() |
                                                                                pet::target_set{pet::target::up, pet::target::down}});
            randomize_b(lora, d, 10);
            return cpet_stack::modules(rec, lora);
        });
    });
}

}  // namespace

int main(int argc, char** argv) {
    std::apply([](auto... c) { (register_backbone<decltype(c)>(), ...); }, backbones{});
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
