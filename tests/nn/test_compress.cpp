// nn::calibrate / nn::compress / nn::compress_stack (nn/compress.hpp).
//
// Oracles: the statistics against sums taken over the inputs the plain Eigen reference layer feeds each linear
// (double precision, one sequence at a time, so padding cannot leak in); the compressed layer against one built
// by hand from the same statistics (the pipeline must wire them, not change them); the report's error against
// the double reference of the dense layer.
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "cpet/cpet.hpp"
#include "nn/reference_layer.hpp"
#include "support/testing.hpp"

namespace cpet_test_nn_compress {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using testing::MatD;

namespace {

using int4_g32_rtn = compress::quantized<compress::int4, compress::per_group<32>, compress::symmetric, compress::rtn>;
using int4_g32_gptq = compress::quantized<compress::int4, compress::per_group<32>, compress::symmetric, compress::gptq>;

nn::layer_shape bert_shape() {
    nn::layer_shape s;
    s.d_model = 64, s.n_heads = 4, s.n_kv_heads = 4, s.head_dim = 16, s.d_ff = 128, s.eps = 1e-12f;
    return s;
}
nn::layer_shape llama_shape() {  // GQA 4/2
    nn::layer_shape s;
    s.d_model = 96, s.n_heads = 4, s.n_kv_heads = 2, s.head_dim = 24, s.d_ff = 160, s.eps = 1e-6f;
    return s;
}

/// Three sequences padded to 9 rows; a few channels scaled up (outliers, as real activations have).
nn::calibration_set samples(index_t d, unsigned seed, std::vector<index_t> lengths = {9, 4, 7}) {
    nn::calibration_set set;
    set.lengths = std::move(lengths);
    const index_t S = 9;
    set.x = testing::random_matrix(S * index_t(set.lengths.size()), d, seed);
    for (index_t r = 0; r < set.x.rows(); ++r)
        for (index_t c = 0; c < d; c += 13) set.x(r, c) *= 6.f;
    return set;
}

struct site_ref {
    Eigen::VectorXd sum, sum_sq, max_abs;
    MatD hessian;
    index_t samples = 0;
    void add(const MatD& x) {
        if (!samples) {
            sum = sum_sq = max_abs = Eigen::VectorXd::Zero(x.cols());
            hessian = MatD::Zero(x.cols(), x.cols());
        }
        sum += x.colwise().sum().transpose();
        sum_sq += x.cwiseAbs2().colwise().sum().transpose();
        max_abs = max_abs.cwiseMax(x.cwiseAbs().colwise().maxCoeff().transpose());
        hessian += x.transpose() * x;
        samples += x.rows();
    }
};

/// Sums over the inputs of q, o, up, down in the reference layer, per sequence.
template <class C>
std::array<site_ref, 4> reference_stats(const nn::dense_layer_weights& w, const nn::layer_shape& s,
                                        const nn::calibration_set& set) {
    std::array<site_ref, 4> r;
    testing::reference_hooks hk;
    hk.linear_delta = [&](pet::target t, const MatD& in) {
        if (t == pet::target::q) r[0].add(in);
        if (t == pet::target::o) r[1].add(in);
        if (t == pet::target::up) r[2].add(in);
        if (t == pet::target::down) r[3].add(in);
        return MatD();
    };
    const MatD x = testing::to_double(set.x);
    const index_t S = set.x.rows() / index_t(set.lengths.size());
    for (std::size_t b = 0; b < set.lengths.size(); ++b)
        (void)testing::reference_layer<C>(w, s, x.middleRows(index_t(b) * S, set.lengths[b]), hk);
    return r;
}

double rel(const Eigen::VectorXd& got, const Eigen::VectorXd& ref) { return (got - ref).norm() / ref.norm(); }
Eigen::VectorXd vec(const std::vector<double>& v) { return Eigen::Map<const Eigen::VectorXd>(v.data(), Eigen::Index(v.size())); }
Eigen::VectorXd vec(const std::vector<float>& v) {
    return Eigen::Map<const Eigen::VectorXf>(v.data(), Eigen::Index(v.size())).cast<double>();
}

template <class C>
void check_calibrate(const nn::layer_shape& s, unsigned seed) {
    const auto w = nn::random_layer_weights(s, seed, nn::kind_of<C>);
    const auto set = samples(s.d_model, seed + 1);
    const auto ref = reference_stats<C>(w, s, set);
    testing::for_each_isa([&](arch::isa) {
        const nn::layer_statistics st = nn::calibrate<C>(w, s, set, {.hessian = true});
        const compress::calibration* sites[4] = {&st.linears.attention_in, &st.linears.o_in, &st.linears.ffn_in,
                                                 &st.linears.down_in};
        for (int i = 0; i < 4; ++i) {
            CAPTURE(i);
            const compress::calibration& c = *sites[i];
            CHECK(c.samples == set.tokens());
            CHECK(c.samples == ref[std::size_t(i)].samples);
            CHECK(rel(vec(c.sum_sq), ref[std::size_t(i)].sum_sq) <= 1e-5);
            CHECK(rel(vec(c.max_abs), ref[std::size_t(i)].max_abs) <= 1e-5);
            REQUIRE(c.has_hessian());
            const MatD h = as_eigen(c.hessian.view());
            CHECK((h - ref[std::size_t(i)].hessian).norm() / ref[std::size_t(i)].hessian.norm() <= 1e-5);
            CHECK((h - h.transpose()).norm() == 0.0);
        }
        CHECK(rel(vec(st.moments.o_in.sum), ref[1].sum) <= 1e-5);
        CHECK(rel(vec(st.moments.down_in.sum_sq), ref[3].sum_sq) <= 1e-5);
        CHECK(st.moments.down_in.samples == set.tokens());
        // Without hessian: the sums only.
        const nn::layer_statistics light = nn::calibrate<C>(w, s, set);
        CHECK(!light.linears.down_in.has_hessian());
        CHECK(rel(vec(light.linears.down_in.sum_sq), ref[3].sum_sq) <= 1e-5);
    });
}

}  // namespace

TEST_CASE("calibrate: per-site sums, max |x|, Hessians and moments equal the reference layer's linear inputs") {
    SUBCASE("bert (post-LN)") { check_calibrate<config::bert<>>(bert_shape(), 10); }
    SUBCASE("llama (pre-LN, SwiGLU, GQA, causal)") { check_calibrate<config::llama<>>(llama_shape(), 20); }
}

TEST_CASE("calibrate: a layer object (dense or compressed) gives the statistics of what it computes") {
    const auto s = bert_shape();
    const auto w = nn::random_layer_weights(s, 30, nn::kind_of<config::bert<>>);
    const auto set = samples(s.d_model, 31);
    const TransformerLayer<config::bert<>> dense(w, s);
    const auto a = nn::calibrate<config::bert<>>(w, s, set);
    const auto b = nn::calibrate(dense, set);
    CHECK(rel(vec(b.linears.down_in.sum_sq), vec(a.linears.down_in.sum_sq)) <= 1e-6);
    // A weight-only int8 layer computes the dense layer of its dequantised weights: the same statistics as that
    // one, and not the fp32 layer's.
    const TransformerLayer<config::bert<compress::int8_per_channel>> q8(w, s);
    const auto c = nn::calibrate(q8, set);
    const auto d = nn::calibrate<config::bert<>>(nn::dense_weights_of(q8), s, set);
    CHECK(rel(vec(c.linears.down_in.sum_sq), vec(d.linears.down_in.sum_sq)) <= 1e-5);
    CHECK(rel(vec(c.linears.down_in.sum_sq), vec(a.linears.down_in.sum_sq)) > 1e-5);
}

TEST_CASE("compress: the layer equals one built from the same statistics, and the report measures it") {
    const auto s = bert_shape();
    using C = config::bert<int4_g32_gptq>;
    const auto w = nn::random_layer_weights(s, 40, nn::kind_of<C>);
    const auto set = samples(s.d_model, 41);
    const auto c = nn::compress<C>(w, s, set);  // GPTQ: compress collects the Hessian itself

    const auto st = nn::calibrate<C>(w, s, set, {.hessian = true});
    const TransformerLayer<C> by_hand(w, s, &st.linears);
    Matrix<float> y1(set.x.rows(), s.d_model), y2(set.x.rows(), s.d_model);
    nn::workspace ws;
    c.layer.forward(set.x, set.lengths, y1, ws);
    by_hand.forward(set.x, set.lengths, y2, ws);
    CHECK(testing::rel_error(y1, testing::to_double(y2)) == 0.0);

    // The report: bytes, ratio, and the error against the double reference of the dense layer.
    const MatD ref = testing::reference_batch<C>({w}, s, testing::to_double(set.x), set.lengths);
    const double err = testing::rel_error(y1, ref);
    CHECK(c.report.rel_error == doctest::Approx(err).epsilon(1e-3));
    CHECK(c.report.rel_error > 0.0);
    CHECK(c.report.bytes == c.layer.bytes());
    CHECK(c.report.dense_bytes == TransformerLayer<config::bert<>>(w, s).bytes());
    CHECK(c.report.ratio == doctest::Approx(double(c.report.dense_bytes) / double(c.report.bytes)));
    CHECK(c.report.ratio > 4.0);
    CHECK(c.report.tokens == 20);
    CHECK(c.report.str().find(std::string(C::compression::name())) != std::string::npos);
    CHECK(c.kept_neurons.size() == std::size_t(s.d_ff));
    CHECK(c.kept_heads.size() == std::size_t(s.n_heads));

    // GPTQ's output error below RTN's on the same weights and samples.
    const auto r = nn::compress<config::bert<int4_g32_rtn>>(w, s, set);
    MESSAGE("int4 g32 layer error: RTN " << r.report.rel_error << ", GPTQ " << c.report.rel_error);
    CHECK(c.report.rel_error < r.report.rel_error);
}

TEST_CASE("compress: structured pruning first, then the policy on the pruned layer's own statistics") {
    const auto s = llama_shape();
    using C = config::llama<compress::w8a8>;
    const auto w = nn::random_layer_weights(s, 50, nn::kind_of<C>);
    const auto set = samples(s.d_model, 51);
    nn::compress_options o;
    o.prune = {.head_ratio = 0.5, .neuron_ratio = 0.5, .score = compress::prune_score::fluctuation,
               .bias_compensation = true};
    const auto c = nn::compress<C>(w, s, set, o);

    const auto st = nn::calibrate<C>(w, s, set);
    const auto p = nn::prune_structured(w, s, o.prune, &st.moments);
    const auto st2 = nn::calibrate<C>(p.weights, p.shape, set);
    const TransformerLayer<C> by_hand(p.weights, p.shape, &st2.linears);
    CHECK(c.kept_heads == p.kept_heads);
    CHECK(c.kept_kv_heads == p.kept_kv_heads);
    CHECK(c.kept_neurons == p.kept_neurons);
    CHECK(c.report.shape.n_heads == 2);
    CHECK(c.report.shape.d_ff == 80);
    Matrix<float> y1(set.x.rows(), s.d_model), y2(set.x.rows(), s.d_model);
    nn::workspace ws;
    c.layer.forward(set.x, set.lengths, y1, ws);
    by_hand.forward(set.x, set.lengths, y2, ws);
    CHECK(testing::rel_error(y1, testing::to_double(y2)) == 0.0);
    CHECK(c.report.ratio > 6.0);  // half the units, then a quarter of the bytes
    CHECK(c.report.policy.find("pruned") != std::string::npos);
}

TEST_CASE("compress: from a dense layer with a PET policy, the result keeps the PET policy") {
    const auto s = bert_shape();
    using D = config::bert<compress::dense>;
    const auto w = nn::random_layer_weights(s, 60, nn::kind_of<D>);
    const TransformerLayer<D> dense(w, s);
    const auto set = samples(s.d_model, 61);
    auto c = nn::compress<compress::int8_per_channel>(dense, set);
    static_assert(std::is_same_v<decltype(c.layer), TransformerLayer<config::bert<compress::int8_per_channel>>>);
    const auto bare = nn::compress<config::bert<compress::int8_per_channel>>(w, s, set);
    // LoRA with B = 0 adds nothing: the same output as the bare compressed layer.
    const auto m = pet::lora::make(c.layer.pet_dims(), {.rank = 4, .targets = {pet::target::q, pet::target::v, pet::target::down}});
    Matrix<float> y1(set.x.rows(), s.d_model), y2(set.x.rows(), s.d_model);
    nn::workspace ws;
    c.layer.forward(set.x, set.lengths, y1, ws, m);
    bare.layer.forward(set.x, set.lengths, y2, ws);
    CHECK(testing::rel_error(y1, testing::to_double(y2)) == 0.0);
    CHECK(c.report.rel_error == bare.report.rel_error);
}

TEST_CASE("compress_stack: each layer calibrated on the compressed layers before it") {
    const auto s = bert_shape();
    using C = config::bert<int4_g32_gptq>;
    const std::vector<nn::dense_layer_weights> w = {nn::random_layer_weights(s, 70, nn::kind_of<C>),
                                                    nn::random_layer_weights(s, 71, nn::kind_of<C>)};
    const auto set = samples(s.d_model, 72);
    const auto cs = nn::compress_stack<C>(w, s, set);
    REQUIRE(cs.layers.size() == 2);
    REQUIRE(cs.reports.size() == 2);
    // Layer 1 by hand: calibrated on layer 0 (compressed)'s output.
    nn::workspace ws;
    nn::calibration_set mid{Matrix<float>(set.x.rows(), s.d_model), set.lengths};
    cs.layers[0].forward(set.x, set.lengths, mid.x, ws);
    const auto st = nn::calibrate<C>(w[1], s, mid, {.hessian = true});
    const TransformerLayer<C> l1(w[1], s, &st.linears);
    Matrix<float> y1(set.x.rows(), s.d_model), y2(set.x.rows(), s.d_model);
    cs.layers[1].forward(mid.x, set.lengths, y1, ws);
    l1.forward(mid.x, set.lengths, y2, ws);
    CHECK(testing::rel_error(y1, testing::to_double(y2)) == 0.0);
    const nn::Stack<C> stack(std::vector<TransformerLayer<C>>(cs.layers));
    CHECK(stack.size() == 2);
    CHECK_THROWS_WITH_AS(nn::compress_stack<C>(w, s, set, {.prune = {.head_ratio = 0.5}}),
                         doctest::Contains("prune layer by layer"), format_error);
}

TEST_CASE("calibrate / compress bad input: empty or non-finite samples, NaN weights, wrong width") {
    const auto s = bert_shape();
    using C = config::bert<compress::w8a8>;
    const auto w = nn::random_layer_weights(s, 80, nn::kind_of<C>);
    auto set = samples(s.d_model, 81);

    nn::calibration_set empty{Matrix<float>(0, s.d_model), {}};
    CHECK_THROWS_WITH_AS(nn::compress<C>(w, s, empty), doctest::Contains("calibration set is empty"), shape_error);
    nn::calibration_set no_tokens{Matrix<float>(6, s.d_model), {0, 0}};
    CHECK_THROWS_WITH_AS(nn::calibrate<C>(w, s, no_tokens), doctest::Contains("calibration set is empty"),
                         shape_error);
    nn::calibration_set narrow{testing::random_matrix(9, 10, 1), {9}};
    CHECK_THROWS_WITH_AS(nn::compress<C>(w, s, narrow), doctest::Contains("calibration_set.x"), shape_error);

    auto nan = set;
    nan.x(12, 3) = std::numeric_limits<float>::quiet_NaN();  // sequence 1, token 3: a real token
    CHECK_THROWS_WITH_AS(nn::compress<C>(w, s, nan), doctest::Contains("calibration_set.x(12, 3)"), numeric_error);
    auto inf = set;
    inf.x(0, 0) = std::numeric_limits<float>::infinity();
    CHECK_THROWS_AS(nn::calibrate<C>(w, s, inf), numeric_error);
    auto pad = set;
    pad.x(16, 5) = std::numeric_limits<float>::quiet_NaN();  // sequence 1 has 4 tokens: row 16 is padding
    CHECK_NOTHROW(nn::calibrate<C>(w, s, pad));

    auto bad_w = w;
    bad_w.w_up(3, 7) = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_WITH_AS(nn::calibrate<C>(bad_w, s, set), doctest::Contains("down input"), numeric_error);
    CHECK_THROWS_AS(nn::compress<C>(bad_w, s, set), error);

    nn::compress_options o;
    o.prune.head_ratio = 1.0;
    CHECK_THROWS_AS(nn::compress<C>(w, s, set, o), format_error);
}

TEST_CASE("compress: SmoothQuant W8A8 beats plain W8A8 on a layer whose input has outlier channels") {
    const auto s = llama_shape();  // pre-LN: the q/k/v and up inputs are RMSNorm outputs, scaled by gamma
    auto w = nn::random_layer_weights(s, 90, nn::kind_of<config::llama<>>);
    for (index_t j = 5; j < s.d_model; j += 17) w.norm1_gamma[std::size_t(j)] *= 40.f, w.norm2_gamma[std::size_t(j)] *= 40.f;
    const auto set = samples(s.d_model, 91);
    const auto plain = nn::compress<config::llama<compress::w8a8>>(w, s, set);
    const auto smooth = nn::compress<config::llama<compress::w8a8_smooth>>(w, s, set);
    MESSAGE("layer error with outlier channels: " << plain.report.str() << " | " << smooth.report.str());
    CHECK(smooth.report.rel_error < 0.8 * plain.report.rel_error);
    CHECK(smooth.report.bytes > plain.report.bytes);  // the 1/s factors
}

}  // namespace cpet_test_nn_compress
