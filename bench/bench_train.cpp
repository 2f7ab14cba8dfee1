// bench/bench_train.cpp — what a training step costs: one BERT-base layer's forward + backward against its inference
// forward, and a whole MiniLM-shaped LoRA step (forward, loss, backward, AdamW) in tokens/s.
//
// forward/cpet/<policy>/bert_base_8x128/<method>/t<n>
//   TransformerLayer::forward of one BERT-base layer (d 768, 12 heads, d_ff 3072) on 8 sequences × 128 tokens with
//   the task of <method>: the inference forward a step is measured against.
// train_step/cpet/<policy>/bert_base_8x128/<method>/t<n>
//   train::forward (the same output, keeping the tape) + train::backward (dy random, dx and the task's gradients)
//   of the same layer, task and input. Counters:
//     x_forward  the median step of this repetition over the median of every forward above (same process, run
//                just before it); the aim is ≤ 3. The table at the end divides the medians of all calls
//     tape_MiB   layer_tape::bytes(): the activations the forward keeps for the backward
//     rss_MiB    growth of the process's resident set over the first step (the tape, y and dx then persist
//                across steps, as in a training loop): the peak (VmHWM, reset through /proc/self/clear_refs just
//                before) minus the resident set before the step. It counts the tape, dx, dy and the backward's
//                temporaries; memory malloc already holds from earlier runs is not counted again, so it is the
//                footprint a step adds to a warm process. 0 where the kernel refuses the reset.
//   Policies: dense (fp32), w8a8 (int8 per channel, dynamic per-token int8 activations), 2:4 (magnitude 2:4 sparse,
//   fp32 values); every backbone is built from the same random dense weights, without calibration.
//   Methods: lora_r32 (LoRA r 32, α 32 on q and k: the paper's task modules) and cpet (the paper's GELU recovery
//   r 32 on every linear + LoRA r 32 on q, k, as one pet::task). B factors are random, not zero, so that every
//   term's gradient is formed as in a step after the first.
// train_step/cpet/minilm_lora/32x64/t<n>
//   One optimizer step of a MiniLM-shaped model (6 layers, d 384, 12 heads, d_ff 1536, vocab 30522, random
//   weights): zero the gradients, forward with LoRA r 8 on q, v, mean pooling, a linear head over 6 labels,
//   cross-entropy, backward, AdamW step, on 32 sequences × 64 tokens. Counter tokens_per_s (2048 / step time).
//   bench/pytorch_train_step.py does the same step with PyTorch + PEFT.
// After the runs a table prints the medians side by side, per thread count.
//
// Times are medians of 5 repetitions (wall time). The machine may be shared: compare the ratios, which come from the
// same process minutes apart, rather than absolute times across runs.
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "cpet/cpet.hpp"
#include "cpet/train/layer.hpp"
#include "cpet/train/loss.hpp"
#include "cpet/train/model.hpp"
#include "cpet/train/optim.hpp"
#include "roofline.hpp"

namespace {

using cpet::index_t;
namespace cc = cpet::compress;
namespace pet = cpet::pet;
namespace train = cpet::train;
using clock_type = std::chrono::steady_clock;

void use_threads(int n) {
    cpet::set_num_threads(n);
    Eigen::setNbThreads(n);
}

double seconds_since(clock_type::time_point t0) {
    return std::chrono::duration<double>(clock_type::now() - t0).count();
}

double median(std::vector<double> s) {
    if (s.empty()) return 0;
    std::nth_element(s.begin(), s.begin() + std::ptrdiff_t(s.size() / 2), s.end());
    return s[s.size() / 2];
}

// ---- resident-set growth over one step ----

/// A field of /proc/self/status in KiB ("VmHWM", "VmRSS"), or -1.
long status_kib(const char* field) {
    std::ifstream f("/proc/self/status");
    std::string key;
    long v = -1;
    while (f >> key) {
        if (key.rfind(field, 0) == 0 && key.size() == std::char_traits<char>::length(field) + 1) {
            f >> v;
            return v;
        }
        f.ignore(1 << 12, '\n');
    }
    return -1;
}

/// Resets VmHWM to the current resident set (Linux ≥ 4.0: writing 5 to clear_refs); false where refused.
bool reset_peak_rss() {
    std::ofstream f("/proc/self/clear_refs");
    if (!f) return false;
    f << "5";
    f.flush();
    return bool(f);
}

/// MiB the resident set's peak rose above its value before `fn` ran, or 0 where the peak cannot be reset.
template <class F>
double rss_growth_mib(F&& fn) {
    if (!reset_peak_rss()) {
        fn();
        return 0;
    }
    const long before = status_kib("VmRSS");
    fn();
    const long peak = status_kib("VmHWM");
    return before < 0 || peak < 0 ? 0.0 : double(std::max(0L, peak - before)) / 1024.0;
}

// ---- the BERT-base layer ----

cpet::nn::layer_shape bert_base() {
    cpet::nn::layer_shape s;
    s.d_model = 768, s.n_heads = 12, s.n_kv_heads = 12, s.head_dim = 64, s.d_ff = 3072, s.eps = 1e-12f;
    return s;
}
constexpr index_t batch = 8, seq = 128;

const cpet::nn::dense_layer_weights& bert_weights() {
    static const auto w =
        cpet::nn::random_layer_weights(bert_base(), 1, cpet::nn::kind_of<cpet::config::bert<>>);
    return w;
}
const cpet::Matrix<float>& bert_input() {
    static const cpet::Matrix<float> x = cpet::bench::random_matrix(batch * seq, bert_base().d_model, 2);
    return x;
}
const cpet::Matrix<float>& bert_dy() {
    static const cpet::Matrix<float> g = cpet::bench::random_matrix(batch * seq, bert_base().d_model, 3, 1e-3f);
    return g;
}

/// The layer of `Policy`, built on first use and kept (one static per instantiation: three BERT layers in all).
template <class Policy>
const cpet::TransformerLayer<cpet::config::bert<Policy>>& bert_layer() {
    static const cpet::TransformerLayer<cpet::config::bert<Policy>> layer(bert_weights(), bert_base());
    return layer;
}

template <class M>
void randomise_b(M& m, unsigned seed) {
    for (int i = 0; i < pet::target_count; ++i) {
        auto& b = m.f.B[std::size_t(i)];
        if (!b.empty()) b = cpet::bench::random_matrix(b.rows(), b.cols(), seed + unsigned(i), 0.02f);
    }
}

enum class method { lora_r32, cpet };
const char* method_name(method m) { return m == method::lora_r32 ? "lora_r32" : "cpet"; }

pet::task make_task(const pet::layer_dims& d, method m) {
    auto lora = pet::lora::make(d, {.rank = 32, .alpha = 32.f, .targets = pet::target_set{pet::target::q, pet::target::k}}, 4);
    randomise_b(lora, 5);
    if (m == method::lora_r32) return pet::task(std::move(lora));
    pet::recovery::options ro;
    ro.rank = 32;
    auto rec = pet::recovery::make(d, ro, 6);
    randomise_b(rec, 7);
    return pet::task(std::move(rec), std::move(lora));
}

struct layer_row {
    std::vector<double> forward_s, step_s;
    std::size_t tape_bytes = 0;
    double rss_mib = 0;
};
using layer_key = std::tuple<std::string, std::string, int>;  // policy, method, threads
std::map<layer_key, layer_row>& layer_table() {
    static std::map<layer_key, layer_row> t;
    return t;
}

std::string isa_label() { return std::string("isa=").append(cpet::arch::name(cpet::arch::active())); }

template <class Policy>
void bm_forward(benchmark::State& st, const std::string& policy, method m, int threads) {
    use_threads(threads);
    const auto& layer = bert_layer<Policy>();
    const pet::task task = make_task(layer.pet_dims(), m);
    const std::vector<index_t> lengths(batch, seq);
    cpet::Matrix<float> y(batch * seq, bert_base().d_model);
    cpet::nn::workspace ws;
    layer.forward(bert_input(), lengths, y, ws, task);  // warm-up: workspace, packing buffers
    auto& r = layer_table()[{policy, method_name(m), threads}];
    for (auto _ : st) {
        const auto t0 = clock_type::now();
        layer.forward(bert_input(), lengths, y, ws, task);
        benchmark::DoNotOptimize(y.data());
        r.forward_s.push_back(seconds_since(t0));
    }
    st.SetLabel(std::string("isa=").append(cpet::arch::name(ws.last_isa())));
}

template <class Policy>
void bm_step(benchmark::State& st, const std::string& policy, method m, int threads) {
    use_threads(threads);
    const auto& layer = bert_layer<Policy>();
    pet::task task = make_task(layer.pet_dims(), m);
    pet::task grads = train::zeros_like(task);
    const auto terms = train::bind(layer.pet_dims(), task, grads);
    const std::vector<index_t> lengths(batch, seq);
    const index_t M = batch * seq, d = bert_base().d_model;
    auto& r = layer_table()[{policy, method_name(m), threads}];
    // The tape, y and dx live across steps, as a training loop holds them (train::forward refills the tape's
    // buffers in place): the first step allocates everything, so the resident-set growth over it is the footprint
    // of one step, and the timed steps are those of a running loop.
    train::layer_tape tape;
    cpet::Matrix<float> y, dx;
    auto step = [&] {
        y.reset(M, d);
        dx.reset(M, d);
        train::forward(layer, bert_input(), lengths, y, terms, tape);
        train::backward(layer, tape, terms, bert_dy(), dx);
        benchmark::DoNotOptimize(dx.data());
        return tape.bytes();
    };
    r.rss_mib = std::max(r.rss_mib, rss_growth_mib([&] { r.tape_bytes = step(); }));
    std::vector<double> mine;  // this repetition's steps: the counter's median over repetitions is then a median
    for (auto _ : st) {
        const auto t0 = clock_type::now();
        step();
        mine.push_back(seconds_since(t0));
    }
    r.step_s.insert(r.step_s.end(), mine.begin(), mine.end());
    const double fwd = median(r.forward_s), stp = median(mine);
    if (fwd > 0) st.counters["x_forward"] = stp / fwd;
    st.counters["tape_MiB"] = double(r.tape_bytes) / 1048576.0;
    st.counters["rss_MiB"] = r.rss_mib;
    st.SetLabel(isa_label());
}

// ---- the MiniLM-shaped LoRA step ----

constexpr index_t minilm_batch = 32, minilm_seq = 64, minilm_vocab = 30522, minilm_labels = 6;

const cpet::nn::Model<cpet::config::bert<>>& minilm() {
    static const cpet::nn::Model<cpet::config::bert<>> m = [] {
        using C = cpet::config::bert<>;
        cpet::nn::layer_shape s;
        s.d_model = 384, s.n_heads = 12, s.n_kv_heads = 12, s.head_dim = 32, s.d_ff = 1536, s.eps = 1e-12f;
        cpet::nn::model_weights w;
        w.shape = s;
        for (unsigned l = 0; l < 6; ++l) w.layers.push_back(cpet::nn::random_layer_weights(s, 10 + l, cpet::nn::kind_of<C>));
        w.embeddings.word = cpet::bench::random_matrix(minilm_vocab, s.d_model, 20, 0.05f);
        w.embeddings.position = cpet::bench::random_matrix(512, s.d_model, 21, 0.05f);
        w.embeddings.token_type = cpet::bench::random_matrix(2, s.d_model, 22, 0.05f);
        w.embeddings.norm_gamma.assign(std::size_t(s.d_model), 1.f);
        w.embeddings.norm_beta.assign(std::size_t(s.d_model), 0.f);
        return cpet::nn::Model<C>(w);
    }();
    return m;
}

void bm_minilm_step(benchmark::State& st, int threads) {
    use_threads(threads);
    const auto& model = minilm();
    const std::size_t L = model.stack().size();
    std::vector<pet::lora::modules> loras, grads;
    for (std::size_t l = 0; l < L; ++l) {
        // PEFT's LoraConfig(r=8, lora_alpha=8, target_modules=["query", "value"]); B starts at zero as in PEFT
        loras.push_back(pet::lora::make(model.stack().layer(l).pet_dims(),
                                        {.rank = 8, .alpha = 8.f, .targets = pet::target_set{pet::target::q, pet::target::v}},
                                        30 + l));
    }
    for (const auto& m : loras) grads.push_back(train::zeros_like(m));
    std::vector<train::layer_terms> terms;
    std::vector<train::parameter> ps;
    for (std::size_t l = 0; l < L; ++l) {
        terms.push_back(train::bind(model.stack().layer(l).pet_dims(), loras[l], grads[l]));
        train::append_parameters(loras[l], grads[l], "layer." + std::to_string(l) + ".", ps);
    }
    auto head = train::linear_head::make(model.d_model(), minilm_labels, 40);
    head.append_parameters("head.", ps);
    train::adamw opt({.weight_decay = 0.01});

    cpet::nn::token_batch tb;
    tb.seq_len = minilm_seq;
    tb.lengths.assign(std::size_t(minilm_batch), minilm_seq);
    std::mt19937 gen(41);
    for (index_t i = 0; i < minilm_batch * minilm_seq; ++i) tb.ids.push_back(std::int32_t(gen() % minilm_vocab));
    std::vector<std::int32_t> labels;
    for (index_t b = 0; b < minilm_batch; ++b) labels.push_back(std::int32_t(gen() % minilm_labels));
    const auto layout = tb.layout("bench");

    train::model_tape tape;
    cpet::Matrix<float> pooled(minilm_batch, model.d_model()), logits(minilm_batch, minilm_labels),
        dlogits(minilm_batch, minilm_labels), dpooled(minilm_batch, model.d_model()),
        dh(minilm_batch * minilm_seq, model.d_model());
    auto step = [&] {
        train::zero_grad(ps);
        train::forward(model, tb, terms, tape);
        cpet::nn::pool(tape.hidden, layout, cpet::nn::pooling::mean, pooled);
        head.forward(pooled, logits);
        const double loss = train::cross_entropy(logits, labels, dlogits);
        head.backward(pooled, dlogits, dpooled);
        train::pool_backward(dpooled, layout, cpet::nn::pooling::mean, dh);
        train::backward(model, tape, terms, dh);
        opt.step(ps, 1e-4);
        benchmark::DoNotOptimize(loss);
    };
    step();  // warm-up: the optimizer's state, the tape's buffers
    std::vector<double> times;
    for (auto _ : st) {
        const auto t0 = clock_type::now();
        step();
        times.push_back(seconds_since(t0));
    }
    st.counters["tokens_per_s"] =
        benchmark::Counter(double(minilm_batch * minilm_seq) * double(st.iterations()), benchmark::Counter::kIsRate);
    st.counters["tape_MiB"] = double(tape.bytes()) / 1048576.0;
    st.SetLabel(isa_label());
}

// ---- registration ----

template <class Policy>
void register_policy(const std::string& policy) {
    for (method m : {method::lora_r32, method::cpet})
        for (int t : {1, 2}) {
            const std::string tail = "/cpet/" + policy + "/bert_base_8x128/" + method_name(m) + "/t" + std::to_string(t);
            // the forward right before its step: the ratio compares runs minutes apart, not a whole program apart
            for (const bool is_step : {false, true})
                benchmark::RegisterBenchmark(((is_step ? "train_step" : "forward") + tail).c_str(),
                                             [=](benchmark::State& st) {
                                                 if (is_step) bm_step<Policy>(st, policy, m, t);
                                                 else bm_forward<Policy>(st, policy, m, t);
                                             })
                    ->Unit(benchmark::kMillisecond)
                    ->Repetitions(5)
                    ->ReportAggregatesOnly(true)
                    ->UseRealTime()
                    ->MinTime(0.2);
        }
}

void register_all() {
    register_policy<cc::dense>("dense");
    register_policy<cc::w8a8>("w8a8");
    register_policy<cc::nm_sparse<2, 4>>("2:4");
    for (int t : {1, 2})
        benchmark::RegisterBenchmark(("train_step/cpet/minilm_lora/32x64/t" + std::to_string(t)).c_str(),
                                     [t](benchmark::State& st) { bm_minilm_step(st, t); })
            ->Unit(benchmark::kMillisecond)
            ->Repetitions(5)
            ->ReportAggregatesOnly(true)
            ->UseRealTime()
            ->MinTime(0.5);
}

void print_table() {
    const auto& t = layer_table();
    if (t.empty()) return;
    std::printf("\nBERT-base layer, %lld tokens: medians of every timed call\n%-7s %-9s %3s %12s %12s %10s %10s %9s\n",
                static_cast<long long>(batch * seq), "policy", "method", "t", "forward ms", "step ms", "step/fwd",
                "tape MiB", "RSS MiB");
    for (const char* policy : {"dense", "w8a8", "2:4"})
        for (const char* m : {"lora_r32", "cpet"})
            for (int threads : {1, 2}) {
                const auto it = t.find({policy, m, threads});
                if (it == t.end() || it->second.step_s.empty()) continue;
                const auto& r = it->second;
                const double f = median(r.forward_s), s = median(r.step_s);
                std::printf("%-7s %-9s %3d %12.1f %12.1f %9.2fx %10.1f %9.1f\n", policy, m, threads, f * 1e3, s * 1e3,
                            f > 0 ? s / f : 0.0, double(r.tape_bytes) / 1048576.0, r.rss_mib);
            }
}

}  // namespace

int main(int argc, char** argv) {
    register_all();
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    print_table();
    return 0;
}
