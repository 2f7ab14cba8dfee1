// multitask — one compressed backbone, three dozen tasks of mixed kinds, a stream of requests each naming its task.
//
//   cmake --build build --target multitask && ./build/examples/multitask
//
// A 2-layer LLaMA-shaped decoder is compressed once (int8 per channel) and shared by every task; each task adds
// only its modules (LoRA / rsLoRA of several ranks, CPET's recovery + LoRA, adapters, prefixes, IA3, BitFit,
// prompt tuning, MAM's prefix + scaled parallel adapter). A request stream is served in mixed batches of 16
// requests in arrival order, whatever their tasks' kinds (the backbone runs once per batch, each sequence gets its
// own task's modules). Every request's output is checked against running it alone with its task, and the
// throughput of the batched stream is printed beside serving the requests one at a time.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cpet/cpet.hpp>
#include <cpet/pet/task.hpp>
#include <cpet/serve/registry.hpp>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <vector>

using namespace cpet;

namespace {

using C = config::llama<compress::int8_per_channel>;

Matrix<float> random_matrix(index_t rows, index_t cols, unsigned seed, float lo = -1.f, float hi = 1.f) {
    std::mt19937 gen(seed);
    std::uniform_real_distribution<float> dist(lo, hi);
    Matrix<float> m(rows, cols);
    for (index_t i = 0; i < m.size(); ++i) m.data()[i] = dist(gen);
    return m;
}

/// Low-rank factors B made non-zero (fresh PEFT-style modules add nothing), so every task changes the output.
template <class M>
void randomize_b(M& m, const pet::layer_dims& d, unsigned seed) {
    for (int i = 0; i < pet::target_count; ++i) {
        const auto t = pet::target(i);
        if (m.rank(t)) m.set(t, m.A(t), random_matrix(d.out(t), m.rank(t), seed + unsigned(i), -0.2f, 0.2f));
    }
}

/// Task `k` of the catalogue; returns its kind's name.
std::string make_task(const Stack<C>& bb, int k, std::vector<pet::task>& layers) {
    layers.assign(bb.size(), pet::task{});
    const int kind = k % 9;
    for (std::size_t l = 0; l < bb.size(); ++l) {
        const auto d = bb.layer(l).pet_dims();
        const unsigned seed = 1000u * unsigned(k) + unsigned(l);
        auto lora = [&](index_t r, pet::target_set ts) {
            auto m = pet::lora::make(d, {.rank = r, .alpha = float(2 * r), .targets = ts}, seed);
            randomize_b(m, d, seed + 1);
            return m;
        };
        switch (kind) {
            case 0: layers[l].add(lora(4 << (k % 3), {pet::target::q, pet::target::v})); break;
            case 1: {
                auto m = pet::rslora::make(d, {.rank = 8, .alpha = 8, .targets = pet::target_set::attention()}, seed);
                randomize_b(m, d, seed + 2);
                layers[l].add(std::move(m));
                break;
            }
            case 2: {
                auto r = pet::recovery::make(d, {.rank = 16}, seed);
                randomize_b(r, d, seed + 3);
                layers[l].add(std::move(r));
                layers[l].add(lora(8, {pet::target::q, pet::target::v}));
                break;
            }
            case 3: {
                auto a = pet::adapter::make(d, {.bottleneck = 16}, seed);
                a.set(pet::sublayer::ffn, a.down[1], random_matrix(d.d_model, 16, seed + 4, -0.1f, 0.1f));
                layers[l].add(std::move(a));
                break;
            }
            case 4: layers[l].add(pet::prefix_tuning::make(d, {.length = 8}, seed)); break;
            case 5: {
                auto m = pet::ia3::make(d);
                std::vector<float> v(std::size_t(d.d_ff));
                for (std::size_t i = 0; i < v.size(); ++i) v[i] = 0.5f + float((i * 7 + seed) % 10) / 10.f;
                m.set(pet::target::down, v);
                layers[l].add(std::move(m));
                break;
            }
            case 6: {
                auto m = pet::bitfit::make(d);
                std::vector<float> v(std::size_t(d.d_model), 0.05f * float(k % 5 + 1));
                m.set(pet::target::o, v);
                layers[l].add(std::move(m));
                break;
            }
            case 7:  // prompt tuning: tokens before each sequence, in the first layer's modules
                if (l == 0) layers[l].add(pet::prompt_tuning::make(d, {.length = 4 + index_t(k % 3)}, seed));
                break;
            default: {  // MAM: prefix + scaled parallel adapter
                layers[l].add(pet::prefix_tuning::make(d, {.length = 4}, seed));
                auto a = pet::scaled_parallel_adapter::make(d, {.bottleneck = 8, .scale = 2}, seed + 5);
                a.set(pet::sublayer::attention, a.down[0], random_matrix(d.d_model, 8, seed + 6, -0.1f, 0.1f));
                layers[l].add(std::move(a));
            }
        }
    }
    static const char* kinds[] = {"lora", "rslora", "recovery+lora", "adapter", "prefix", "ia3", "bitfit",
                                  "prompt", "mam"};
    return kinds[kind];
}

struct request {
    std::string task;
    Matrix<float> x;  // [len, d]
};

}  // namespace

int main() {
    nn::layer_shape s;
    s.d_model = 256, s.n_heads = 8, s.n_kv_heads = 4, s.head_dim = 32, s.d_ff = 688, s.eps = 1e-6f;
    std::vector<nn::dense_layer_weights> w;
    for (unsigned l = 0; l < 2; ++l) w.push_back(nn::random_layer_weights(s, 7 + l, nn::kind_of<C>));
    const auto backbone = std::make_shared<const Stack<C>>(w, s);
    serve::registry<C> reg(backbone);

    constexpr int n_tasks = 36;
    std::map<std::string, std::string> kind_of_task;
    for (int k = 0; k < n_tasks; ++k) {
        std::vector<pet::task> layers;
        const std::string kind = make_task(*backbone, k, layers);
        const std::string name = kind + "_" + std::to_string(k);
        reg.add(name, std::move(layers));
        kind_of_task[name] = kind;
    }
    const auto mem = reg.memory();
    std::printf("backbone (int8 per channel, 2 layers, d %lld): %.2f MiB once; %zu tasks add %.2f MiB (%.1f KiB each "
                "on average); total %.2f MiB\n",
                (long long)s.d_model, double(mem.backbone_bytes) / 1048576.0, mem.tasks,
                double(mem.task_bytes) / 1048576.0, double(mem.task_bytes) / 1024.0 / double(mem.tasks),
                double(mem.total()) / 1048576.0);

    // the request stream
    const auto names = reg.names();
    std::mt19937 gen(42);
    std::vector<request> stream;
    for (int i = 0; i < 192; ++i) {
        const index_t len = 4 + index_t(gen() % 29);
        stream.push_back({names[gen() % names.size()], random_matrix(len, s.d_model, 5000u + unsigned(i))});
    }
    index_t tokens = 0;
    for (const auto& r : stream) tokens += r.x.rows();

    // mixed batches of 16 requests in arrival order, tasks of every kind together
    std::vector<std::vector<std::size_t>> batches;
    for (std::size_t i = 0; i < stream.size(); ++i) {
        if (i % 16 == 0) batches.emplace_back();
        batches.back().push_back(i);
    }

    nn::workspace ws;
    std::vector<Matrix<float>> out(stream.size());
    const auto t0 = std::chrono::steady_clock::now();
    for (const auto& bt : batches) {
        index_t S = 0;
        for (auto i : bt) S = std::max(S, stream[i].x.rows());
        const index_t B = index_t(bt.size());
        Matrix<float> x(B * S, s.d_model), y(B * S, s.d_model);
        std::vector<index_t> lengths;
        std::vector<std::string_view> task_names;
        for (index_t b = 0; b < B; ++b) {
            const auto& r = stream[bt[std::size_t(b)]];
            for (index_t t = 0; t < r.x.rows(); ++t)
                for (index_t c = 0; c < s.d_model; ++c) x(b * S + t, c) = r.x(t, c);
            lengths.push_back(r.x.rows());
            task_names.push_back(r.task);
        }
        reg.forward_batch(task_names, x, lengths, y, ws);
        for (index_t b = 0; b < B; ++b) {
            auto& o = out[bt[std::size_t(b)]];
            o = Matrix<float>(lengths[std::size_t(b)], s.d_model);
            for (index_t t = 0; t < o.rows(); ++t)
                for (index_t c = 0; c < s.d_model; ++c) o(t, c) = y(b * S + t, c);
        }
    }
    const double batched = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

    // one request at a time (and the per-task check)
    double worst = 0;
    std::map<std::string, double> worst_by_kind;
    const auto t1 = std::chrono::steady_clock::now();
    for (std::size_t i = 0; i < stream.size(); ++i) {
        const auto& r = stream[i];
        Matrix<float> y(r.x.rows(), s.d_model);
        const std::vector<index_t> l{r.x.rows()};
        reg.forward(r.task, r.x, l, y, ws);
        double num = 0, den = 0;
        for (index_t j = 0; j < y.size(); ++j) {
            const double d = double(out[i].data()[j]) - double(y.data()[j]);
            num += d * d, den += double(y.data()[j]) * double(y.data()[j]);
        }
        const double e = std::sqrt(num / std::max(den, 1e-30));
        worst = std::max(worst, e);
        auto& wk = worst_by_kind[kind_of_task[r.task]];
        wk = std::max(wk, e);
    }
    const double single = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();

    std::printf("%zu requests (%lld tokens) over %d tasks in %zu batches\n", stream.size(), (long long)tokens, n_tasks,
                batches.size());
    std::printf("  batched : %.3f s, %.0f tokens/s\n", batched, double(tokens) / batched);
    std::printf("  one by one: %.3f s, %.0f tokens/s (batched is %.2fx)\n", single, double(tokens) / single,
                single / batched);
    for (const auto& [k, e] : worst_by_kind) std::printf("  %-14s worst relative difference to alone: %.2e\n", k.c_str(), e);
    const bool ok = worst <= 1e-5;
    std::printf("%s: every request's output equals its task run alone (worst %.2e)\n", ok ? "OK" : "FAILED", worst);
    return ok ? 0 : 1;
}
