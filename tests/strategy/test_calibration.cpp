// Calibration of stacks and models over several batches (strategy/calibration.hpp) against a naive accumulation
// in double of the rows each site sees, and the EoRA recovery init built on it (strategy/recovery_init.hpp).
#include <algorithm>
#include <cmath>
#include <limits>
#include <span>
#include <vector>

#include "cpet/compress/compress.hpp"
#include "cpet/nn/nn.hpp"
#include "cpet/strategy/calibration.hpp"
#include "cpet/strategy/recovery_init.hpp"
#include "support/testing.hpp"

namespace cpet_test_strategy_calibration {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using testing::MatD;

namespace {

nn::layer_shape bert_shape() {
    nn::layer_shape s;
    s.d_model = 32, s.n_heads = 4, s.n_kv_heads = 4, s.head_dim = 8, s.d_ff = 48, s.eps = 1e-12f;
    return s;
}
nn::layer_shape llama_shape() {
    nn::layer_shape s;
    s.d_model = 32, s.n_heads = 4, s.n_kv_heads = 2, s.head_dim = 8, s.d_ff = 40, s.eps = 1e-6f;
    return s;
}

/// Three batches of different sizes and padding; the padded rows hold random values, which must be skipped.
std::vector<nn::calibration_set> batches_for(index_t d, unsigned seed) {
    std::vector<nn::calibration_set> b;
    b.push_back({testing::random_matrix(3 * 9, d, seed), {9, 4, 7}});
    b.push_back({testing::random_matrix(1 * 5, d, seed + 1), {5}});
    b.push_back({testing::random_matrix(2 * 11, d, seed + 2), {1, 11}});
    return b;
}

/// Naive statistics of the real rows of x (sequences of length lengths[b], padded to x.rows() / B).
struct naive_site {
    std::vector<double> sum_sq;
    std::vector<double> max_abs;
    MatD gram;
    std::int64_t samples = 0;

    void add(ConstMatrixView<float> x, const std::vector<index_t>& lengths) {
        const index_t n = x.cols(), S = x.rows() / index_t(lengths.size());
        if (sum_sq.empty()) sum_sq.assign(std::size_t(n), 0.0), max_abs.assign(std::size_t(n), 0.0), gram = MatD::Zero(n, n);
        for (std::size_t b = 0; b < lengths.size(); ++b)
            for (index_t r = 0; r < lengths[b]; ++r) {
                const float* xr = x.row(index_t(b) * S + r);
                for (index_t j = 0; j < n; ++j) {
                    sum_sq[std::size_t(j)] += double(xr[j]) * double(xr[j]);
                    max_abs[std::size_t(j)] = std::max(max_abs[std::size_t(j)], double(std::abs(xr[j])));
                    for (index_t k = 0; k < n; ++k) gram(j, k) += double(xr[j]) * double(xr[k]);
                }
                ++samples;
            }
    }
};

void check_site(const compress::calibration& got, const naive_site& ref, bool gram) {
    REQUIRE(got.samples == ref.samples);
    REQUIRE(got.sum_sq.size() == ref.sum_sq.size());
    for (std::size_t j = 0; j < ref.sum_sq.size(); ++j) {
        CHECK(got.sum_sq[j] == doctest::Approx(ref.sum_sq[j]).epsilon(1e-12));
        CHECK(double(got.max_abs[j]) == ref.max_abs[j]);
    }
    CHECK(got.has_hessian() == gram);
    if (gram) CHECK((MatD(as_eigen(got.hessian)) - ref.gram).cwiseAbs().maxCoeff() <= 1e-12 * ref.gram.norm());
}

void check_same(const compress::calibration& a, const compress::calibration& b) {
    REQUIRE(a.samples == b.samples);
    REQUIRE(a.sum_sq.size() == b.sum_sq.size());
    for (std::size_t j = 0; j < a.sum_sq.size(); ++j) {
        CHECK(a.sum_sq[j] == doctest::Approx(b.sum_sq[j]).epsilon(1e-12));
        CHECK(a.max_abs[j] == b.max_abs[j]);
    }
    REQUIRE(a.has_hessian() == b.has_hessian());
    if (a.has_hessian()) {
        const MatD d = MatD(as_eigen(a.hessian));
        CHECK((d - MatD(as_eigen(b.hessian))).cwiseAbs().maxCoeff() <= 1e-12 * d.norm());
    }
}
void check_same(const nn::layer_statistics& a, const nn::layer_statistics& b) {
    check_same(a.linears.attention_in, b.linears.attention_in);
    check_same(a.linears.o_in, b.linears.o_in);
    check_same(a.linears.ffn_in, b.linears.ffn_in);
    check_same(a.linears.down_in, b.linears.down_in);
    for (auto [x, y] : {std::pair{&a.moments.o_in, &b.moments.o_in}, std::pair{&a.moments.down_in, &b.moments.down_in}}) {
        REQUIRE(x->samples == y->samples);
        REQUIRE(x->sum.size() == y->sum.size());
        for (std::size_t j = 0; j < x->sum.size(); ++j) {
            CHECK(x->sum[j] == doctest::Approx(y->sum[j]).epsilon(1e-12));
            CHECK(x->sum_sq[j] == doctest::Approx(y->sum_sq[j]).epsilon(1e-12));
        }
    }
}

/// Each layer's statistics the long way: nn::calibrate per layer and batch on the inputs the stack's previous
/// layers produce (run one by one), merged.
template <class C>
std::vector<nn::layer_statistics> per_batch(const nn::Stack<C>& stack, const std::vector<nn::calibration_set>& batches,
                                            bool gram) {
    std::vector<nn::layer_statistics> out(stack.size());
    for (const auto& b : batches) {
        nn::calibration_set cur{b.x, b.lengths};
        for (std::size_t i = 0; i < stack.size(); ++i) {
            strategy::accumulate(out[i], nn::calibrate(stack.layer(i), cur, {.hessian = gram}));
            Matrix<float> y(cur.x.rows(), cur.x.cols());
            nn::workspace ws;
            stack.layer(i).forward(cur.x, cur.lengths, y, ws);
            cur.x = std::move(y);
        }
    }
    return out;
}

}  // namespace

TEST_CASE("calibrate_stack: per-layer Σx², max |x|, Gram matrices and moments over several batches equal a naive "
          "accumulation") {
    using C = config::bert<>;  // post-LN: a layer's q/k/v site is its input itself, so it can be summed naively
    const auto s = bert_shape();
    const std::vector<nn::dense_layer_weights> w{nn::random_layer_weights(s, 1, nn::kind_of<C>),
                                                 nn::random_layer_weights(s, 2, nn::kind_of<C>)};
    const nn::Stack<C> stack(w, s);
    const auto batches = batches_for(s.d_model, 3);
    for (const bool gram : {true, false}) {
        CAPTURE(gram);
        const auto got = strategy::calibrate_stack(stack, std::span<const nn::calibration_set>(batches), {.hessian = gram});
        REQUIRE(got.size() == 2);
        // layer 0's q/k/v site: the batches' real rows; layer 1's: layer 0's outputs
        naive_site in0, in1;
        for (const auto& b : batches) {
            in0.add(b.x, b.lengths);
            Matrix<float> y(b.x.rows(), s.d_model);
            nn::workspace ws;
            stack.layer(0).forward(b.x, b.lengths, y, ws);
            in1.add(y, b.lengths);
        }
        check_site(got[0].linears.attention_in, in0, gram);
        check_site(got[1].linears.attention_in, in1, gram);
        CHECK(got[0].linears.attention_in.samples == 9 + 4 + 7 + 5 + 1 + 11);
        // every site against nn::calibrate (tested against the reference layer in tests/nn) batch by batch
        const auto ref = per_batch(stack, batches, gram);
        for (std::size_t i = 0; i < 2; ++i) check_same(got[i], ref[i]);
    }
}

TEST_CASE("calibrate_stack / calibrate_model: a compressed LLaMA (GQA, pre-LN) stack, and token batches through "
          "a model's embeddings") {
    using C = config::llama<compress::int8_per_channel>;
    const auto s = llama_shape();
    std::vector<nn::dense_layer_weights> w;
    for (unsigned i = 0; i < 3; ++i) w.push_back(nn::random_layer_weights(s, 10 + i, nn::kind_of<C>));
    nn::Stack<C> stack(w, s);
    const auto batches = batches_for(s.d_model, 20);
    const auto got = strategy::calibrate_stack(stack, std::span<const nn::calibration_set>(batches), {.hessian = true});
    const auto ref = per_batch(stack, batches, true);
    for (std::size_t i = 0; i < 3; ++i) check_same(got[i], ref[i]);
    const auto one = strategy::calibrate_stack(stack, batches[0]);
    check_same(one[0].linears.attention_in, nn::calibrate(stack.layer(0), batches[0]).linears.attention_in);

    // a model: 50-token vocabulary, no positions (RoPE); its embeddings feed the stack
    nn::embedding_weights e;
    e.word = testing::random_matrix(50, s.d_model, 30);
    const nn::Model<C> model(nn::Embeddings(std::move(e)), std::move(stack), {}, {}, s.eps, std::nullopt, false,
                             std::nullopt);
    std::vector<nn::token_batch> tokens(2);
    tokens[0].seq_len = 6, tokens[0].lengths = {6, 2};
    tokens[1].seq_len = 4, tokens[1].lengths = {3};
    for (auto& t : tokens) {
        t.ids.assign(std::size_t(t.rows()), 0);
        for (std::size_t i = 0; i < t.ids.size(); ++i) t.ids[i] = std::int32_t((7 * i + 3) % 50);
    }
    const auto from_model = strategy::calibrate_model(model, std::span<const nn::token_batch>(tokens), {.hessian = true});
    std::vector<nn::calibration_set> embedded;
    for (const auto& t : tokens) {
        const auto L = t.layout("test");
        nn::calibration_set set{Matrix<float>(t.rows(), s.d_model), t.lengths};
        model.embeddings().forward(t, L, set.x);
        embedded.push_back(std::move(set));
    }
    const auto ref_model = per_batch(model.stack(), embedded, true);
    REQUIRE(from_model.size() == 3);
    for (std::size_t i = 0; i < 3; ++i) check_same(from_model[i], ref_model[i]);
    CHECK(strategy::linears_of(from_model).size() == 3);
}

TEST_CASE("calibration bad input: no batch, a batch of the wrong width, NaN samples, statistics that do not "
          "accumulate") {
    using C = config::bert<>;
    const auto s = bert_shape();
    const nn::Stack<C> stack(std::vector<nn::dense_layer_weights>{nn::random_layer_weights(s, 1, nn::kind_of<C>)}, s);
    CHECK_THROWS_WITH_AS(strategy::calibrate_stack(stack, std::span<const nn::calibration_set>()),
                         doctest::Contains("no calibration batch"), shape_error);
    auto batches = batches_for(s.d_model, 5);
    batches[1].x = testing::random_matrix(5, s.d_model + 1, 6);
    CHECK_THROWS_AS(strategy::calibrate_stack(stack, std::span<const nn::calibration_set>(batches)), shape_error);
    batches = batches_for(s.d_model, 5);
    batches[2].x(12, 3) = std::numeric_limits<float>::quiet_NaN();  // sequence 1, token 1: a real row
    CHECK_THROWS_AS(strategy::calibrate_stack(stack, std::span<const nn::calibration_set>(batches)), numeric_error);

    auto a = nn::calibrate(stack.layer(0), batches_for(s.d_model, 7)[0]);
    const auto with_gram = nn::calibrate(stack.layer(0), batches_for(s.d_model, 7)[0], {.hessian = true});
    CHECK_THROWS_WITH_AS(strategy::accumulate(a, with_gram), doctest::Contains("Gram matrix"), shape_error);
    const auto s2 = [] {
        auto t = bert_shape();
        t.d_ff = 64;
        return t;
    }();
    const auto wider = nn::calibrate<C>(nn::random_layer_weights(s2, 2, nn::kind_of<C>), s2, batches_for(s.d_model, 8)[0]);
    const auto a_before = a;
    CHECK_THROWS_WITH_AS(strategy::accumulate(a, wider), doctest::Contains("down input"), shape_error);
    check_same(a, a_before);  // nothing was added
}

TEST_CASE("strategy::init_recovery: EoRA on the compressed layer's own inputs over several batches; per stack "
          "layer on what the compressed layers before it produce") {
    using C = config::bert<compress::quantized<compress::int4, compress::per_group<16>, compress::asymmetric>>;
    const auto s = bert_shape();
    const std::vector<nn::dense_layer_weights> w{nn::random_layer_weights(s, 40, nn::kind_of<C>),
                                                 nn::random_layer_weights(s, 41, nn::kind_of<C>)};
    const nn::Stack<C> stack(w, s);
    const auto batches = batches_for(s.d_model, 42);
    const std::span<const nn::calibration_set> bs(batches);
    const pet::recovery_linear::options o{.rank = 6};

    const auto m0 = strategy::init_recovery(stack.layer(0), w[0], bs, o);
    // q's factors: the Gram-whitened SVD of q's residual with the naive Gram matrix of the batches' real rows
    naive_site in0;
    for (const auto& b : batches) in0.add(b.x, b.lengths);
    compress::calibration cal;
    cal.sum_sq = in0.sum_sq;
    cal.samples = in0.samples;
    cal.hessian = Matrix<double>(s.d_model, s.d_model);
    for (index_t i = 0; i < s.d_model; ++i)
        for (index_t j = 0; j < s.d_model; ++j) cal.hessian(i, j) = in0.gram(i, j);
    const auto wq_hat = stack.layer(0).attention().q().weight().to_dense();
    const auto f = pet::svd_residual(w[0].wq, wq_hat, 6, &cal);
    CHECK(f.weighting == pet::residual_weighting::gram);
    const MatD ba = testing::to_double(m0.B(pet::target::q)) * testing::to_double(m0.A(pet::target::q));
    const MatD ba_ref = testing::to_double(f.B) * testing::to_double(f.A);
    CHECK((ba - ba_ref).norm() <= 1e-5 * ba_ref.norm());

    // the stack: layer 1 calibrated on compressed layer 0's outputs
    const auto ms = strategy::init_recovery(stack, w, bs, o);
    REQUIRE(ms.size() == 2);
    std::vector<nn::calibration_set> mid;
    for (const auto& b : batches) {
        nn::calibration_set m{Matrix<float>(b.x.rows(), s.d_model), b.lengths};
        nn::workspace ws;
        stack.layer(0).forward(b.x, b.lengths, m.x, ws);
        mid.push_back(std::move(m));
    }
    const auto m1 = strategy::init_recovery(stack.layer(1), w[1], std::span<const nn::calibration_set>(mid), o);
    for (int i = 0; i < pet::target_count; ++i) {
        const auto t = pet::target(i);
        if (!m1.rank(t)) continue;
        CAPTURE(pet::target_name(t));
        const MatD a = testing::to_double(ms[1].B(t)) * testing::to_double(ms[1].A(t));
        const MatD b = testing::to_double(m1.B(t)) * testing::to_double(m1.A(t));
        CHECK((a - b).norm() <= 1e-5 * b.norm());
        const MatD a0 = testing::to_double(ms[0].B(t)) * testing::to_double(ms[0].A(t));
        const MatD b0 = testing::to_double(m0.B(t)) * testing::to_double(m0.A(t));
        CHECK((a0 - b0).norm() <= 1e-5 * b0.norm());
    }

    // the stack's output error on the calibration tokens falls with the recovery modules
    const auto& x = batches[0];
    nn::workspace ws;
    Matrix<float> y_dense(x.x.rows(), s.d_model), y(x.x.rows(), s.d_model);
    nn::Stack<config::bert<>>(w, s).forward(x.x, x.lengths, y_dense, ws);
    stack.forward(x.x, x.lengths, y, ws);
    const auto ref = testing::to_double(y_dense);
    const double before = testing::rel_error(y, ref);
    stack.forward(x.x, x.lengths, y, ws, ms);
    const double after = testing::rel_error(y, ref);
    MESSAGE("int4 g16 BERT stack of 2, rank-6 EoRA recovery: output error ", before, " -> ", after);
    CHECK(after < before);

    CHECK_THROWS_WITH_AS(strategy::init_recovery(stack, std::vector<nn::dense_layer_weights>{w[0]}, bs, o),
                         doctest::Contains("1 dense layers for a stack of 2"), shape_error);
    CHECK_THROWS_AS(strategy::init_recovery(stack.layer(0), w[0], std::span<const nn::calibration_set>(), o),
                    shape_error);
}

}  // namespace cpet_test_strategy_calibration
