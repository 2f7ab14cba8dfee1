// Knowledge inheritance (strategy/inherit.hpp): every PET method's tensors carried from a dense layer to its
// quantized (copied) and structurally pruned (sliced by the kept heads / KV heads / neurons) versions.
//   - element by element: each inherited tensor equals the dense tensor indexed by the kept maps (indices written
//     out here, not through compress::select_*);
//   - forward: a dense layer whose removed units contribute nothing (their o / down input columns are zero, in the
//     weights and in the task's o / down factors) running the dense task equals the pruned layer running the
//     inherited task, on a BERT-shaped (MHA) and a LLaMA-shaped (GQA, SwiGLU, RoPE, causal) layer with awkward
//     counts;
//   - bad input: modules of another layer, maps of the wrong length, indices out of range or repeated, query heads
//     split from their KV head; the source task stays as it was.
#include <algorithm>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "cpet/compress/compress.hpp"
#include "cpet/nn/nn.hpp"
#include "cpet/strategy/inherit.hpp"
#include "nn/reference_layer.hpp"
#include "support/testing.hpp"

namespace cpet_test_strategy_inherit {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using testing::MatD;

namespace {

nn::layer_shape bert_shape() {  // 6 heads of 8, d_ff 150: pruning leaves 4 heads and 105 neurons
    nn::layer_shape s;
    s.d_model = 48, s.n_heads = 6, s.n_kv_heads = 6, s.head_dim = 8, s.d_ff = 150, s.eps = 1e-12f;
    return s;
}
nn::layer_shape llama_shape() {  // GQA 6/3 (groups of 2 query heads), d_ff 100: 2 groups and 63 neurons remain
    nn::layer_shape s;
    s.d_model = 48, s.n_heads = 6, s.n_kv_heads = 3, s.head_dim = 8, s.d_ff = 100, s.eps = 1e-6f;
    return s;
}

/// What to remove, chosen up front (not ascending-contiguous: a middle head group, scattered neurons).
struct plan {
    std::vector<index_t> removed_kv_heads, removed_neurons;
    compress::structured_options prune;
};
plan plan_for(const nn::layer_shape& s, unsigned seed) {
    plan p;
    if (s.n_kv_heads == s.n_heads) p.removed_kv_heads = {1, 4};  // 2 of 6 heads
    else p.removed_kv_heads = {1};                                // 1 of 3 groups
    p.prune.head_ratio = double(p.removed_kv_heads.size()) / double(s.n_kv_heads) + 0.01;
    const index_t drop = s.d_ff == 150 ? 45 : 37;
    std::vector<index_t> all(static_cast<std::size_t>(s.d_ff));
    std::iota(all.begin(), all.end(), index_t{0});
    std::shuffle(all.begin(), all.end(), std::mt19937(seed));
    p.removed_neurons.assign(all.begin(), all.begin() + drop);
    std::sort(p.removed_neurons.begin(), p.removed_neurons.end());
    p.prune.neuron_ratio = double(drop) / double(s.d_ff);
    return p;
}
std::vector<index_t> complement(const std::vector<index_t>& removed, index_t n) {
    std::vector<index_t> out;
    for (index_t i = 0; i < n; ++i)
        if (!std::binary_search(removed.begin(), removed.end(), i)) out.push_back(i);
    return out;
}

/// Channel i of the pruned layer's q (or o input) / k, v / FFN hidden, in the dense layer: written out here.
struct ref_maps {
    std::vector<index_t> q, kv, ff;
};
ref_maps ref_maps_of(const strategy::kept_units& k) {
    ref_maps m;
    const index_t hd = k.head_dim;
    for (index_t i = 0; i < index_t(k.heads.size()) * hd; ++i) m.q.push_back(k.heads[std::size_t(i / hd)] * hd + i % hd);
    for (index_t i = 0; i < index_t(k.kv_heads.size()) * hd; ++i)
        m.kv.push_back(k.kv_heads[std::size_t(i / hd)] * hd + i % hd);
    m.ff = k.neurons;
    return m;
}
const std::vector<index_t>* out_map(const ref_maps& m, pet::target t) {
    using pet::target;
    return t == target::q ? &m.q : (t == target::k || t == target::v) ? &m.kv
                                   : (t == target::up || t == target::gate) ? &m.ff : nullptr;
}
const std::vector<index_t>* in_map(const ref_maps& m, pet::target t) {
    return t == pet::target::o ? &m.q : t == pet::target::down ? &m.ff : nullptr;
}
index_t at(const std::vector<index_t>* map, index_t i) { return map ? (*map)[std::size_t(i)] : i; }

void check_rows_cols(const Matrix<float>& got, const Matrix<float>& dense, const std::vector<index_t>* rows,
                     const std::vector<index_t>* cols, const std::string& what) {
    CAPTURE(what);
    REQUIRE(got.rows() == (rows ? index_t(rows->size()) : dense.rows()));
    REQUIRE(got.cols() == (cols ? index_t(cols->size()) : dense.cols()));
    bool same = true;
    for (index_t i = 0; i < got.rows(); ++i)
        for (index_t j = 0; j < got.cols(); ++j) same = same && got(i, j) == dense(at(rows, i), at(cols, j));
    CHECK(same);
}
void check_elems(const std::vector<float>& got, const std::vector<float>& dense, const std::vector<index_t>* map,
                 const std::string& what) {
    CAPTURE(what);
    if (dense.empty()) {
        CHECK(got.empty());
        return;
    }
    REQUIRE(got.size() == (map ? map->size() : dense.size()));
    bool same = true;
    for (std::size_t i = 0; i < got.size(); ++i) same = same && got[i] == dense[std::size_t(at(map, index_t(i)))];
    CHECK(same);
}

/// got == dense restricted to the maps, per method (the rules of strategy/inherit.hpp, written as indices).
template <class M>
void check_sliced(const M& dense, const M& got, const ref_maps& m) {
    if constexpr (requires { dense.f; }) {
        for (int i = 0; i < pet::target_count; ++i) {
            const auto t = pet::target(i);
            CHECK(got.rank(t) == dense.rank(t));
            if (!dense.rank(t)) continue;
            check_rows_cols(got.f.A[std::size_t(i)], dense.f.A[std::size_t(i)], nullptr, in_map(m, t),
                                   std::string(pet::target_name(t)) + " A");
            check_rows_cols(got.f.B[std::size_t(i)], dense.f.B[std::size_t(i)], out_map(m, t), nullptr,
                                   std::string(pet::target_name(t)) + " B");
            CHECK(got.lowrank_scale(t) == dense.lowrank_scale(t));
        }
    } else if constexpr (std::is_same_v<M, pet::ia3::modules>) {
        for (int i = 0; i < pet::target_count; ++i) {
            const auto t = pet::target(i);
            check_elems(got.l[std::size_t(i)], dense.l[std::size_t(i)],
                        t == pet::target::down ? in_map(m, t) : out_map(m, t), std::string(pet::target_name(t)) + " l");
        }
    } else if constexpr (std::is_same_v<M, pet::bitfit::modules>) {
        for (int i = 0; i < pet::target_count; ++i)
            check_elems(got.delta[std::size_t(i)], dense.delta[std::size_t(i)], out_map(m, pet::target(i)),
                        std::string(pet::target_name(pet::target(i))) + " Δb");
        for (int i = 0; i < pet::norm_site_count; ++i)
            check_elems(got.norm_delta[std::size_t(i)], dense.norm_delta[std::size_t(i)], nullptr, "Δβ");
    } else if constexpr (requires { dense.k; dense.v; }) {
        check_rows_cols(got.k, dense.k, nullptr, &m.kv, "prefix k");
        check_rows_cols(got.v, dense.v, nullptr, &m.kv, "prefix v");
    } else if constexpr (requires { dense.tokens; }) {
        check_rows_cols(got.tokens, dense.tokens, nullptr, nullptr, "prompt tokens");
    } else {  // adapters
        for (std::size_t i = 0; i < 2; ++i) {
            check_rows_cols(got.down[i], dense.down[i], nullptr, nullptr, "adapter down");
            check_rows_cols(got.up[i], dense.up[i], nullptr, nullptr, "adapter up");
            check_elems(got.b_down[i], dense.b_down[i], nullptr, "adapter b_down");
            check_elems(got.b_up[i], dense.b_up[i], nullptr, "adapter b_up");
        }
        CHECK(got.s == dense.s);
    }
}

void check_sliced(const pet::task& dense, const pet::task& got, const ref_maps& m) {
    REQUIRE(got.size() == dense.size());
    for (std::size_t i = 0; i < dense.size(); ++i) {
        CAPTURE(std::string(dense.method_name(i)));
        REQUIRE(got.at(i).index() == dense.at(i).index());
        std::visit([&](const auto& d) { check_sliced(d, std::get<std::decay_t<decltype(d)>>(got.at(i)), m); },
                   dense.at(i));
    }
}

/// Every stored value of a task (to see it unchanged).
std::vector<float> flatten(const pet::task& t) {
    std::vector<float> out;
    auto put = [&](const float* p, std::size_t n) { out.insert(out.end(), p, p + n); };
    auto mat = [&](const Matrix<float>& m) { put(m.data(), std::size_t(m.size())); };
    auto vec = [&](const std::vector<float>& v) { put(v.data(), v.size()); };
    for (std::size_t i = 0; i < t.size(); ++i)
        std::visit([&](const auto& m) {
            using M = std::decay_t<decltype(m)>;
            if constexpr (requires { m.f; }) {
                for (const auto& a : m.f.A) mat(a);
                for (const auto& b : m.f.B) mat(b);
            } else if constexpr (std::is_same_v<M, pet::ia3::modules>) {
                for (const auto& v : m.l) vec(v);
            } else if constexpr (std::is_same_v<M, pet::bitfit::modules>) {
                for (const auto& v : m.delta) vec(v);
                for (const auto& v : m.norm_delta) vec(v);
            } else if constexpr (requires { m.k; m.v; }) {
                mat(m.k), mat(m.v);
            } else if constexpr (requires { m.tokens; }) {
                mat(m.tokens);
            } else {
                for (std::size_t j = 0; j < 2; ++j) mat(m.down[j]), mat(m.up[j]), vec(m.b_down[j]), vec(m.b_up[j]);
            }
        }, t.at(i));
    return out;
}

std::vector<float> random_vector(index_t n, unsigned seed, float lo, float hi) {
    const auto m = testing::random_matrix(1, n, seed, lo, hi);
    return std::vector<float>(m.data(), m.data() + n);
}

/// LoRA / recovery factors with random A and B on every target the modules adapt.
template <class M>
void randomize_lowrank(M& m, const pet::layer_dims& d, unsigned seed) {
    for (int i = 0; i < pet::target_count; ++i) {
        const auto t = pet::target(i);
        if (!m.rank(t)) continue;
        m.set(t, testing::random_matrix(m.rank(t), d.in(t), seed + 2 * unsigned(i), -0.3f, 0.3f),
              testing::random_matrix(d.out(t), m.rank(t), seed + 2 * unsigned(i) + 1, -0.3f, 0.3f));
    }
}

/// A dense task of every method a single layer runs: LoRA and the GELU recovery on every linear, a sequential
/// and a parallel adapter, prefix tuning, IA3 on q, k, v, down, BitFit on every bias (and β where there is one).
pet::task full_task(const pet::layer_dims& d, unsigned seed) {
    const pet::target_set every = d.gated ? pet::target_set::all()
                                          : pet::target_set::attention() | pet::target_set{pet::target::up,
                                                                                             pet::target::down};
    auto lora = pet::lora::make(d, {.rank = 4, .alpha = 8.f, .targets = every}, seed);
    randomize_lowrank(lora, d, seed + 10);
    auto rec = pet::recovery::make(d, {.rank = 3, .scale = 0.5f}, seed + 1);
    randomize_lowrank(rec, d, seed + 30);
    auto ad = pet::adapter::make(d, {.bottleneck = 5}, seed + 2);
    auto pad = pet::parallel_adapter::make(d, {.bottleneck = 6, .attention = false}, seed + 3);
    for (auto* a : {&ad}) {
        a->set(pet::sublayer::attention, testing::random_matrix(5, d.d_model, seed + 40, -0.3f, 0.3f),
               testing::random_matrix(d.d_model, 5, seed + 41, -0.3f, 0.3f), random_vector(5, seed + 42, -0.1f, 0.1f),
               random_vector(d.d_model, seed + 43, -0.1f, 0.1f));
        a->set(pet::sublayer::ffn, testing::random_matrix(5, d.d_model, seed + 44, -0.3f, 0.3f),
               testing::random_matrix(d.d_model, 5, seed + 45, -0.3f, 0.3f));
    }
    pad.set(pet::sublayer::ffn, testing::random_matrix(6, d.d_model, seed + 46, -0.3f, 0.3f),
            testing::random_matrix(d.d_model, 6, seed + 47, -0.3f, 0.3f));
    auto pre = pet::prefix_tuning::make(d, {.length = 3}, seed + 4);
    auto ia = pet::ia3::make(d, {.targets = {pet::target::q, pet::target::k, pet::target::v, pet::target::down}});
    for (auto t : {pet::target::q, pet::target::k, pet::target::v, pet::target::down})
        ia.set(t, random_vector(ia.width(t), seed + 50 + unsigned(t), 0.7f, 1.3f));
    auto bf = pet::bitfit::make(d);
    for (int i = 0; i < pet::target_count; ++i)
        if (d.has(pet::target(i)))
            bf.set(pet::target(i), random_vector(d.out(pet::target(i)), seed + 60 + unsigned(i), -0.2f, 0.2f));
    if (d.norm_bias)
        for (auto n : {pet::norm_site::norm1, pet::norm_site::norm2})
            bf.set_norm(n, random_vector(d.d_model, seed + 70 + unsigned(n), -0.2f, 0.2f));
    return pet::task(std::move(lora), std::move(rec), std::move(ad), std::move(pad), std::move(pre), std::move(ia),
                     std::move(bf));
}

/// The methods the first task lacks (rsLoRA, the linear recovery, the scaled parallel adapter, P-tuning v2,
/// prompt tuning), for the element-wise checks.
pet::task other_task(const pet::layer_dims& d, unsigned seed) {
    auto rs = pet::rslora::make(d, {.rank = 5, .alpha = 4.f, .targets = {pet::target::q, pet::target::o,
                                                                         pet::target::up, pet::target::down}}, seed);
    randomize_lowrank(rs, d, seed + 1);
    auto rl = pet::recovery_linear::make(d, {.rank = 2}, seed + 2);
    randomize_lowrank(rl, d, seed + 3);
    auto spa = pet::scaled_parallel_adapter::make(d, {.bottleneck = 4, .scale = 2.f}, seed + 4);
    spa.set(pet::sublayer::attention, testing::random_matrix(4, d.d_model, seed + 5),
            testing::random_matrix(d.d_model, 4, seed + 6));
    auto pt = pet::p_tuning_v2::make(d, {.length = 2}, seed + 7);
    auto pr = pet::prompt_tuning::make(d, {.length = 3}, seed + 8);
    return pet::task(std::move(rs), std::move(rl), std::move(spa), std::move(pt), std::move(pr));
}

/// Zeroes what reads the removed units in the dense task: the o / down input columns of its low-rank factors
/// (the only task tensors that consume a removed head's output or a removed neuron's activation).
void zero_removed_inputs(pet::task& t, const std::vector<index_t>& removed_q_channels,
                         const std::vector<index_t>& removed_neurons) {
    pet::task out;
    for (std::size_t i = 0; i < t.size(); ++i)
        std::visit([&](auto m) {
            if constexpr (requires { m.f; }) {
                auto& ao = m.f.A[std::size_t(pet::target::o)];
                for (index_t r = 0; r < ao.rows(); ++r)
                    for (index_t c : removed_q_channels) ao(r, c) = 0.f;
                auto& ad = m.f.A[std::size_t(pet::target::down)];
                for (index_t r = 0; r < ad.rows(); ++r)
                    for (index_t c : removed_neurons) ad(r, c) = 0.f;
            }
            out.add(std::move(m));
        }, t.at(i));
    t = std::move(out);
}

template <class C>
void check_forward_equivalence(const nn::layer_shape& s, unsigned seed) {
    const plan p = plan_for(s, seed);
    const index_t hd = s.head_dim, group = s.n_heads / s.n_kv_heads;
    std::vector<index_t> removed_q;  // the o-input channels of the removed query heads
    for (index_t g : p.removed_kv_heads)
        for (index_t h = g * group; h < (g + 1) * group; ++h)
            for (index_t c = 0; c < hd; ++c) removed_q.push_back(h * hd + c);
    auto w = nn::random_layer_weights(s, seed, nn::kind_of<C>);
    for (index_t r = 0; r < s.d_model; ++r) {
        for (index_t c : removed_q) w.wo(r, c) = 0.f;
        for (index_t c : p.removed_neurons) w.w_down(r, c) = 0.f;
    }
    const TransformerLayer<C> dense(w, s);
    auto task = full_task(dense.pet_dims(), seed + 100);
    zero_removed_inputs(task, removed_q, p.removed_neurons);
    const auto before = flatten(task);

    // the magnitude scores of the zero columns are 0: exactly the planned units go
    const nn::pruned_layer pruned = nn::prune_structured(w, s, p.prune);
    REQUIRE(pruned.kept_kv_heads == complement(p.removed_kv_heads, s.n_kv_heads));
    REQUIRE(pruned.kept_neurons == complement(p.removed_neurons, s.d_ff));
    const TransformerLayer<C> small(pruned.weights, pruned.shape);
    const auto kept = strategy::kept_units::of(pruned);
    const pet::task inherited = strategy::inherit(task, dense, small, kept);
    CHECK(flatten(task) == before);
    check_sliced(task, inherited, ref_maps_of(kept));
    CHECK(inherited.parameters().size() == task.parameters().size());
    CHECK(inherited.bytes() < task.bytes());

    const std::vector<index_t> lengths{9, 4, 7};
    const auto x = testing::random_matrix(27, s.d_model, seed + 200);
    nn::workspace ws;
    Matrix<float> y_dense(27, s.d_model), y_small(27, s.d_model);
    dense.forward(x, lengths, y_dense, ws, task);
    small.forward(x, lengths, y_small, ws, inherited);
    const double err = testing::rel_error(y_small, testing::to_double(y_dense));
    const std::string name = C::ffn == nn::ffn_kind::swiglu ? "llama" : "bert";
    MESSAGE(name, ": ", s.n_heads, " -> ",
            pruned.shape.n_heads, " heads, ", s.d_ff, " -> ", pruned.shape.d_ff,
            " neurons; pruned layer + inherited task vs dense layer + dense task: rel. error ", err);
    CHECK(err <= 1e-5);
    // and the inheritance matters: the dense task does not fit the pruned layer at all
    CHECK_THROWS_AS(small.forward(x, lengths, y_small, ws, task), shape_error);
}

}  // namespace

TEST_CASE("inherit: pruned BERT (MHA) layer + inherited task == dense layer + dense task on the kept units") {
    check_forward_equivalence<config::bert<>>(bert_shape(), 11);
}

TEST_CASE("inherit: pruned LLaMA (GQA, SwiGLU, RoPE, causal) layer + inherited task == dense layer + dense task") {
    check_forward_equivalence<config::llama<>>(llama_shape(), 21);
}

TEST_CASE("inherit: every method's tensors are the dense ones indexed by the kept maps, single modules types too") {
    for (const bool gqa : {false, true}) {
        CAPTURE(gqa);
        const auto s = gqa ? llama_shape() : bert_shape();
        const auto w = nn::random_layer_weights(s, 5, gqa ? nn::kind_of<config::llama<>> : nn::kind_of<config::bert<>>);
        const auto p = plan_for(s, 6);
        const auto pruned = nn::prune_structured(w, s, p.prune);  // magnitude scores of random weights
        const auto kept = strategy::kept_units::of(pruned);
        const auto maps = ref_maps_of(kept);
        pet::layer_dims dense;
        dense.d_model = s.d_model, dense.q_dim = s.q_dim(), dense.kv_dim = s.kv_dim(), dense.d_ff = s.d_ff;
        dense.gated = gqa, dense.bias = !gqa, dense.norm_bias = !gqa;
        const auto small = strategy::pruned_dims(dense, kept);
        CHECK(small.q_dim == pruned.shape.q_dim());
        CHECK(small.kv_dim == pruned.shape.kv_dim());
        CHECK(small.d_ff == pruned.shape.d_ff);
        for (const auto& t : {full_task(dense, 31), other_task(dense, 41)}) {
            const auto got = strategy::inherit(t, dense, kept);
            check_sliced(t, got, maps);
            CHECK_NOTHROW(got.check_fits(small, "test"));
            // one method at a time, as its own modules type
            for (std::size_t i = 0; i < t.size(); ++i)
                std::visit([&](const auto& m) {
                    const auto one = strategy::inherit(m, dense, small, kept);
                    check_sliced(m, one, maps);
                }, t.at(i));
        }
    }
}

TEST_CASE("inherit: quantized / sparse backbones (same shapes) get the modules copied, checked to fit") {
    const auto s = llama_shape();
    const auto w = nn::random_layer_weights(s, 7, nn::kind_of<config::llama<>>);
    const TransformerLayer<config::llama<>> dense(w, s);
    const TransformerLayer<config::llama<compress::int8_per_channel>> q8(w, s);
    const TransformerLayer<config::llama<compress::nm_sparse<2, 4>>> sparse(w, s);
    const auto task = full_task(dense.pet_dims(), 8);
    const auto a = strategy::inherit(task, q8);
    const auto b = strategy::inherit(task, sparse.pet_dims());
    CHECK(flatten(a) == flatten(task));
    CHECK(flatten(b) == flatten(task));
    const auto lora = pet::lora::make(dense.pet_dims(), {.rank = 4, .targets = pet::target_set::all()}, 9);
    const auto l2 = strategy::inherit(lora, q8);
    check_sliced(lora, l2, ref_maps_of(strategy::kept_units::all(s)));
    // the all-units map is the same thing through the pruning path
    const auto c = strategy::inherit(task, dense.pet_dims(), q8.pet_dims(), strategy::kept_units::all(s));
    CHECK(flatten(c) == flatten(task));
    const std::vector<index_t> lengths{5, 3};
    const auto x = testing::random_matrix(10, s.d_model, 10);
    nn::workspace ws;
    Matrix<float> y(10, s.d_model);
    CHECK_NOTHROW(q8.forward(x, lengths, y, ws, a));
    // a task for another layer shape does not fit
    const auto other = full_task(TransformerLayer<config::llama<>>(nn::random_layer_weights(bert_shape(), 1,
                                                                       nn::kind_of<config::llama<>>), bert_shape())
                                     .pet_dims(), 3);
    CHECK_THROWS_AS(strategy::inherit(other, q8), shape_error);
}

TEST_CASE("inherit: from nn::compress's result (pruned + int8), the kept maps it reports slice the task") {
    using C = config::bert<compress::int8_per_channel>;
    const auto s = bert_shape();
    const auto w = nn::random_layer_weights(s, 12, nn::kind_of<C>);
    const TransformerLayer<config::bert<>> dense(w, s);
    nn::calibration_set set{testing::random_matrix(24, s.d_model, 13), {12, 12}};
    const auto c = nn::compress<C>(w, s, set, {.prune = {.head_ratio = 0.34, .neuron_ratio = 0.3}});
    REQUIRE(c.layer.shape().n_heads == 4);
    REQUIRE(c.layer.shape().d_ff == 105);
    const auto task = full_task(dense.pet_dims(), 14);
    const auto got = strategy::inherit(task, dense, c);
    check_sliced(task, got, ref_maps_of(strategy::kept_units::of(c)));
    nn::workspace ws;
    Matrix<float> y(24, s.d_model);
    CHECK_NOTHROW(c.layer.forward(set.x, set.lengths, y, ws, got));
}

TEST_CASE("inherit bad input: modules of another layer, maps of the wrong length, out of range, repeated, heads "
          "split from their KV group; the source is unchanged") {
    const auto s = llama_shape();
    const auto w = nn::random_layer_weights(s, 15, nn::kind_of<config::llama<>>);
    const TransformerLayer<config::llama<>> dense(w, s);
    const auto d = dense.pet_dims();
    const auto pruned = nn::prune_structured(w, s, plan_for(s, 16).prune);
    const TransformerLayer<config::llama<>> small(pruned.weights, pruned.shape);
    const auto kept = strategy::kept_units::of(pruned);
    const auto task = full_task(d, 17);
    const auto before = flatten(task);

    // modules built for another layer (the BERT shape's d_ff and kv_dim)
    pet::layer_dims other = d;
    other.d_ff = 150;
    other.kv_dim = 48;
    const auto foreign = pet::lora::make(other, {.rank = 4, .targets = {pet::target::k, pet::target::down}}, 1);
    CHECK_THROWS_WITH_AS(strategy::inherit(foreign, d, kept), doctest::Contains("target k expects A [r, 48] and B [24, r]"), shape_error);
    CHECK_THROWS_WITH_AS(strategy::inherit(pet::task(foreign), dense, small, kept), doctest::Contains("lora"),
                         shape_error);

    auto short_neurons = kept;
    short_neurons.neurons.pop_back();
    CHECK_THROWS_WITH_AS(strategy::inherit(task, dense, small, short_neurons),
                         doctest::Contains("kept_neurons has 62 entries, the compressed layer has 63 FFN neurons"),
                         shape_error);
    auto short_heads = kept;
    short_heads.heads.pop_back();
    CHECK_THROWS_WITH_AS(strategy::inherit(task, dense, small, short_heads),
                         doctest::Contains("kept_heads has 3 entries"), shape_error);
    auto bad_neuron = kept;
    bad_neuron.neurons[3] = 100;
    CHECK_THROWS_WITH_AS(strategy::inherit(task, dense, small, bad_neuron),
                         doctest::Contains("kept_neurons[3] = 100 is out of range [0, 100)"), shape_error);
    auto negative = kept;
    negative.kv_heads[0] = -1;
    CHECK_THROWS_WITH_AS(strategy::inherit(task, dense, small, negative),
                         doctest::Contains("kept_kv_heads[0] = -1 is out of range [0, 3)"), shape_error);
    auto repeated = kept;
    repeated.neurons[1] = repeated.neurons[0];
    CHECK_THROWS_WITH_AS(strategy::inherit(task, dense, small, repeated), doctest::Contains("is repeated"),
                         shape_error);
    auto split = kept;  // query heads of one group under the other kept KV head
    std::swap(split.heads[0], split.heads[2]);
    CHECK_THROWS_WITH_AS(strategy::inherit(task, dense, small, split), doctest::Contains("reads KV head"),
                         shape_error);
    auto bad_hd = kept;
    bad_hd.head_dim = 7;
    CHECK_THROWS_AS(strategy::inherit(task, dense, small, bad_hd), shape_error);
    // a compressed layer of another d_model
    pet::layer_dims wide = strategy::pruned_dims(d, kept);
    wide.d_model = 64;
    CHECK_THROWS_WITH_AS(strategy::inherit(task, d, wide, kept), doctest::Contains("d_model 64"), shape_error);
    // same-shape inheritance onto the pruned layer: the modules do not fit it
    CHECK_THROWS_AS(strategy::inherit(task, small), shape_error);

    CHECK(flatten(task) == before);
    CHECK_NOTHROW(strategy::inherit(task, dense, small, kept));
}

}  // namespace cpet_test_strategy_inherit
