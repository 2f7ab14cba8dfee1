// Structured pruning of a whole layer (nn/prune.hpp over compress/structured.hpp).
//
// Oracle: removing heads / neurons is the same as zeroing their o columns / down columns in the dense layer, so
// without bias compensation the pruned layer equals the zeroed dense layer up to fp32 rounding. With FLAP bias
// compensation the output error on the calibration tokens is lower than without.
#include <algorithm>
#include <string>
#include <vector>

#include "cpet/nn/nn.hpp"
#include "cpet/nn/prune.hpp"
#include "nn/reference_layer.hpp"
#include "support/testing.hpp"

namespace cpet_test_nn_prune {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using testing::MatD;

namespace {

nn::layer_shape bert_shape() {
    nn::layer_shape s;
    s.d_model = 64, s.n_heads = 4, s.n_kv_heads = 4, s.head_dim = 16, s.d_ff = 128, s.eps = 1e-12f;
    return s;
}
nn::layer_shape llama_shape() {  // GQA 8/4: a head group is one KV head with two query heads
    nn::layer_shape s;
    s.d_model = 96, s.n_heads = 8, s.n_kv_heads = 4, s.head_dim = 12, s.d_ff = 176, s.eps = 1e-6f;
    return s;
}

Matrix<float> to_float(const MatD& m) {
    Matrix<float> out(m.rows(), m.cols());
    as_eigen(out) = m.cast<float>();
    return out;
}

/// Moments of the o and down inputs of the dense layer on x (one sequence), from the reference layer's hooks.
template <class C>
nn::prune_calibration collect(const nn::dense_layer_weights& w, const nn::layer_shape& s, const MatD& x) {
    nn::prune_calibration cal;
    testing::reference_hooks hk;
    hk.linear_delta = [&](pet::target t, const MatD& in) {
        if (t == pet::target::o) cal.o_in.add(to_float(in));
        if (t == pet::target::down) cal.down_in.add(to_float(in));
        return MatD();
    };
    (void)testing::reference_layer<C>(w, s, x, hk);
    return cal;
}

/// The dense weights with the o columns of removed heads and the down columns of removed neurons set to zero.
nn::dense_layer_weights zeroed(const nn::dense_layer_weights& w, const nn::layer_shape& s, const nn::pruned_layer& p) {
    nn::dense_layer_weights z = w;
    for (index_t h = 0; h < s.n_heads; ++h)
        if (!std::binary_search(p.kept_heads.begin(), p.kept_heads.end(), h))
            for (index_t r = 0; r < s.d_model; ++r)
                for (index_t c = h * s.head_dim; c < (h + 1) * s.head_dim; ++c) z.wo(r, c) = 0.f;
    for (index_t n = 0; n < s.d_ff; ++n)
        if (!std::binary_search(p.kept_neurons.begin(), p.kept_neurons.end(), n))
            for (index_t r = 0; r < s.d_model; ++r) z.w_down(r, n) = 0.f;
    return z;
}

/// Output of TransformerLayer<C>(w, s) on x with the given lengths, on the active path.
template <class C>
Matrix<float> run(const nn::dense_layer_weights& w, const nn::layer_shape& s, const Matrix<float>& x,
                  const std::vector<index_t>& lengths) {
    const TransformerLayer<C> layer(w, s);
    nn::workspace ws;
    Matrix<float> y(x.rows(), s.d_model);
    layer.forward(x, lengths, y, ws);
    return y;
}

bool strictly_ascending(const std::vector<index_t>& v, index_t bound) {
    for (std::size_t i = 0; i < v.size(); ++i)
        if (v[i] < 0 || v[i] >= bound || (i > 0 && v[i] <= v[i - 1])) return false;
    return true;
}

/// Maps are sorted, in range, sized like the new shape, and the pruned weights are the dense rows/columns they name.
void check_maps(const nn::dense_layer_weights& w, const nn::layer_shape& s, const nn::pruned_layer& p,
                nn::layer_kind kind) {
    const index_t group = s.n_heads / s.n_kv_heads, hd = s.head_dim;
    CHECK_NOTHROW(nn::check_weights(p.weights, p.shape, nn::layer_kind{kind.norm, kind.ffn, false}));
    REQUIRE(index_t(p.kept_heads.size()) == p.shape.n_heads);
    REQUIRE(index_t(p.kept_kv_heads.size()) == p.shape.n_kv_heads);
    REQUIRE(index_t(p.kept_neurons.size()) == p.shape.d_ff);
    CHECK(strictly_ascending(p.kept_heads, s.n_heads));
    CHECK(strictly_ascending(p.kept_kv_heads, s.n_kv_heads));
    CHECK(strictly_ascending(p.kept_neurons, s.d_ff));
    CHECK(p.shape.n_heads / p.shape.n_kv_heads == group);
    for (std::size_t i = 0; i < p.kept_heads.size(); ++i)  // query head i belongs to kept KV group i / group
        CHECK(p.kept_heads[i] / group == p.kept_kv_heads[i / std::size_t(group)]);
    bool rows_match = true;
    for (std::size_t i = 0; i < p.kept_heads.size(); ++i)
        for (index_t d = 0; d < hd; ++d) {
            const index_t src = p.kept_heads[i] * hd + d, dst = index_t(i) * hd + d;
            for (index_t c = 0; c < s.d_model; ++c) rows_match &= p.weights.wq(dst, c) == w.wq(src, c);
            for (index_t r = 0; r < s.d_model; ++r) rows_match &= p.weights.wo(r, dst) == w.wo(r, src);
        }
    for (std::size_t i = 0; i < p.kept_kv_heads.size(); ++i)
        for (index_t d = 0; d < hd; ++d)
            for (index_t c = 0; c < s.d_model; ++c) {
                const index_t src = p.kept_kv_heads[i] * hd + d, dst = index_t(i) * hd + d;
                rows_match &= p.weights.wk(dst, c) == w.wk(src, c) && p.weights.wv(dst, c) == w.wv(src, c);
            }
    for (std::size_t i = 0; i < p.kept_neurons.size(); ++i) {
        const index_t n = p.kept_neurons[i];
        for (index_t c = 0; c < s.d_model; ++c) {
            rows_match &= p.weights.w_up(index_t(i), c) == w.w_up(n, c);
            if (!w.w_gate.empty()) rows_match &= p.weights.w_gate(index_t(i), c) == w.w_gate(n, c);
            rows_match &= p.weights.w_down(c, index_t(i)) == w.w_down(c, n);
        }
        if (!w.b_up.empty()) rows_match &= p.weights.b_up[i] == w.b_up[std::size_t(n)];
    }
    CHECK(rows_match);
}

template <class C>
void check_equals_zeroed(const nn::layer_shape& s, unsigned seed, compress::prune_score score) {
    const auto w = nn::random_layer_weights(s, seed, nn::kind_of<C>);
    const Matrix<float> xc = testing::random_matrix(64, s.d_model, seed + 3);
    const auto cal = collect<C>(w, s, testing::to_double(xc));
    compress::structured_options o;
    o.head_ratio = 0.5;
    o.neuron_ratio = 0.5;
    o.score = score;
    const auto p = nn::prune_structured(w, s, o, &cal);
    CHECK(p.shape.n_heads == s.n_heads / 2);
    CHECK(p.shape.n_kv_heads == s.n_kv_heads / 2);
    CHECK(p.shape.d_ff == s.d_ff / 2);
    CHECK(p.shape.d_model == s.d_model);
    check_maps(w, s, p, nn::kind_of<C>);
    CHECK(p.weights.bo == w.bo);  // no compensation: biases untouched
    CHECK(p.weights.b_down == w.b_down);

    const auto z = zeroed(w, s, p);
    const std::vector<index_t> lengths{9, 4, 7};
    const Matrix<float> x = testing::random_matrix(27, s.d_model, seed + 5);
    testing::for_each_isa([&](arch::isa) {
        const Matrix<float> yp = run<C>(p.weights, p.shape, x, lengths);
        const Matrix<float> yz = run<C>(z, s, x, lengths);
        CHECK(testing::rel_error(yp, testing::to_double(yz)) <= 1e-5);
    });
}

/// Error of the pruned layer against the dense one on the calibration tokens, without and with compensation.
template <class C>
void check_compensation(const nn::layer_shape& s, unsigned seed, const char* label) {
    const auto w = nn::random_layer_weights(s, seed, nn::kind_of<C>);
    const Matrix<float> x = testing::random_matrix(96, s.d_model, seed + 7);
    const auto cal = collect<C>(w, s, testing::to_double(x));
    compress::structured_options o;
    o.head_ratio = 0.5;
    o.neuron_ratio = 0.5;
    o.score = compress::prune_score::fluctuation;
    const auto plain = nn::prune_structured(w, s, o, &cal);
    o.bias_compensation = true;
    const auto comp = nn::prune_structured(w, s, o, &cal);
    CHECK(comp.kept_heads == plain.kept_heads);  // compensation changes biases, not the choice
    CHECK(comp.kept_neurons == plain.kept_neurons);
    CHECK(comp.weights.bo.size() == std::size_t(s.d_model));  // a bias even when the dense layer had none
    CHECK(comp.weights.b_down.size() == std::size_t(s.d_model));
    const std::vector<index_t> lengths{x.rows()};
    const MatD y = testing::to_double(run<C>(w, s, x, lengths));
    const double e_plain = testing::rel_error(run<C>(plain.weights, plain.shape, x, lengths), y);
    const double e_comp = testing::rel_error(run<C>(comp.weights, comp.shape, x, lengths), y);
    MESSAGE(std::string(label), " 50% heads + 50% neurons (FLAP): rel. error on calibration tokens ", e_plain,
            " without, ", e_comp, " with bias compensation");
    CHECK(e_comp < e_plain);
}

}  // namespace

TEST_CASE("a pruned BERT layer equals the dense layer with those heads and neurons zeroed") {
    check_equals_zeroed<config::bert<>>(bert_shape(), 3, compress::prune_score::magnitude);
    check_equals_zeroed<config::bert<>>(bert_shape(), 4, compress::prune_score::fluctuation);
}

TEST_CASE("a pruned LLaMA (GQA) layer equals the dense layer with those head groups and neurons zeroed") {
    check_equals_zeroed<config::llama<>>(llama_shape(), 5, compress::prune_score::magnitude);
    check_equals_zeroed<config::llama<>>(llama_shape(), 6, compress::prune_score::fluctuation);
}

TEST_CASE("magnitude pruning keeps the units with the largest scores; ratios give the right shapes") {
    const auto s = llama_shape();
    const auto w = nn::random_layer_weights(s, 9, nn::kind_of<config::llama<>>);
    compress::structured_options o;
    o.neuron_ratio = 0.25;
    const auto p = nn::prune_structured(w, s, o);
    CHECK(p.shape.n_heads == s.n_heads);  // ratio 0: nothing removed
    CHECK(p.shape.d_ff == 132);           // 176 − round(44)
    const auto sc = compress::channel_scores(w.w_down, compress::prune_score::magnitude, nullptr);
    double min_kept = 1e300, max_removed = 0;
    for (index_t n = 0; n < s.d_ff; ++n) {
        const bool kept = std::binary_search(p.kept_neurons.begin(), p.kept_neurons.end(), n);
        if (kept) min_kept = std::min(min_kept, sc[std::size_t(n)]);
        else max_removed = std::max(max_removed, sc[std::size_t(n)]);
    }
    CHECK(min_kept >= max_removed);
    o.head_ratio = 0.75;  // 3 of 4 groups
    const auto q = nn::prune_structured(w, s, o);
    CHECK(q.shape.n_kv_heads == 1);
    CHECK(q.shape.n_heads == 2);
    check_maps(w, s, q, nn::kind_of<config::llama<>>);
}

TEST_CASE("FLAP bias compensation lowers the output error on the calibration tokens") {
    check_compensation<config::bert<>>(bert_shape(), 11, "bert");
    check_compensation<config::llama<>>(llama_shape(), 12, "llama");
}

TEST_CASE("bad pruning options give clear errors") {
    const auto s = bert_shape();
    const auto w = nn::random_layer_weights(s, 1, nn::kind_of<config::bert<>>);
    compress::structured_options o;
    o.head_ratio = 1.0;
    CHECK_THROWS_WITH_AS(nn::prune_structured(w, s, o), doctest::Contains("outside [0, 1)"), format_error);
    o.head_ratio = -0.1;
    CHECK_THROWS_WITH_AS(nn::prune_structured(w, s, o), doctest::Contains("outside [0, 1)"), format_error);
    o.head_ratio = 0.9;  // round(3.6) = 4 of 4 heads
    CHECK_THROWS_WITH_AS(nn::prune_structured(w, s, o), doctest::Contains("would remove all 4 head group"),
                         format_error);
    o.head_ratio = 0.0;
    o.neuron_ratio = 0.999;
    CHECK_THROWS_WITH_AS(nn::prune_structured(w, s, o), doctest::Contains("would remove all 128 neuron"), format_error);
    o.neuron_ratio = 0.5;
    o.score = compress::prune_score::fluctuation;
    CHECK_THROWS_WITH_AS(nn::prune_structured(w, s, o), doctest::Contains("needs calibration"), format_error);
    o.score = compress::prune_score::magnitude;
    o.bias_compensation = true;
    CHECK_THROWS_WITH_AS(nn::prune_structured(w, s, o), doctest::Contains("bias compensation needs"), format_error);
    nn::prune_calibration wrong;
    wrong.o_in.add(testing::random_matrix(4, 8, 1));
    wrong.down_in.add(testing::random_matrix(4, s.d_ff, 1));
    CHECK_THROWS_WITH_AS(nn::prune_structured(w, s, o, &wrong), doctest::Contains("o_in has 8 channels"), shape_error);
    nn::dense_layer_weights bad = w;
    bad.wo = Matrix<float>(3, 3);
    CHECK_THROWS_AS(nn::prune_structured(w, nn::layer_shape{}, {}), shape_error);
    CHECK_THROWS_AS(nn::prune_structured(bad, s, {}), shape_error);
}

}  // namespace cpet_test_nn_prune
