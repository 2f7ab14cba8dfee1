// Quantized weights as a WeightFormat and as a layer's compression policy (compress/quantized.hpp).
//
// The oracle of a quantized linear / layer is the same linear / layer built with compress::dense from the
// DEQUANTISED weights (s·(q − z), the values every kernel multiplies): weight-only formats match it to ≤ 1e-5
// relative. W8A8 / W4A8 also round the activations per token to int8 (relative step 1/127 of the row's absmax),
// so they match it only within that rounding: ≤ 2e-2 relative per linear, ≤ 3e-2 through a layer (measured
// ~3e-3 and ~5e-3 on these shapes). The error against the fp32 dense layer (the cost of quantising) is reported
// with MESSAGE and bounded loosely.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "cpet/compress/dense.hpp"
#include "cpet/compress/quantized.hpp"
#include "cpet/nn/nn.hpp"
#include "nn/reference_layer.hpp"
#include "support/testing.hpp"

namespace cpet_test_compress_quantized_policy {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using testing::MatD;

namespace {

/// Calibration of k channels with max |x| in 0.5 .. 2, every 7th one `spike` times larger (SmoothQuant's input).
const compress::calibration& outlier_stats(index_t k, unsigned seed, float spike) {
    static compress::calibration c;
    c = {};
    const Matrix<float> m = testing::random_matrix(1, k, seed, 0.5f, 2.f);
    for (index_t j = 0; j < k; ++j) {
        const float v = m(0, j) * (j % 7 == 0 ? spike : 1.f);
        c.max_abs.push_back(v);
        c.sum_sq.push_back(double(v) * v);
    }
    c.samples = 1;
    return c;
}

static_assert(compress::WeightFormat<compress::int8_per_channel::format>);
static_assert(compress::WeightFormat<compress::int4_g128::format>);
static_assert(compress::WeightFormat<compress::w8a8::format>);
static_assert(compress::CompressionPolicy<compress::int4_g128_gptq>);
static_assert(nn::LayerConfig<config::bert<compress::int8_per_channel>>);
static_assert(nn::LayerConfig<config::llama<compress::int4_g128>>);

/// y = act(x·Wᵀ + b + s·U·Bᵀ) + r in double.
MatD ref_epilogue(const MatD& x, const MatD& w, const std::vector<float>& b, kernels::activation act, const MatD& u,
                  const MatD& bb, double s, const MatD& r) {
    MatD y = x * w.transpose();
    for (Eigen::Index i = 0; i < y.rows(); ++i)
        for (Eigen::Index j = 0; j < y.cols(); ++j) y(i, j) += b[std::size_t(j)];
    y += s * u * bb.transpose();
    y = y.unaryExpr([&](double z) { return testing::ref_act(act, z); });
    return y + r;
}

/// The format's matmul with the full epilogue (residual in place) and matmul_t against the dequantised weights.
template <class Policy>
void check_format(index_t n, index_t k, double tol, const compress::calibration* cal = nullptr) {
    const Matrix<float> w = testing::random_matrix(n, k, 11);
    const auto f = Policy::compress(w, cal);
    CHECK(f.out_features() == n);
    CHECK(f.in_features() == k);
    const Matrix<float> wd = f.to_dense();
    const MatD wdd = testing::to_double(wd);
    // The dequantised weights are close to the originals (a sanity bound on the quantizer, not a tight one).
    CHECK((wdd - testing::to_double(w)).norm() / testing::to_double(w).norm() < 0.1);
    CHECK(f.bytes() < std::size_t(n * k) * sizeof(float));

    const index_t rank = 4;
    for (index_t M : {index_t(1), index_t(5), index_t(37)}) {
        CAPTURE(M);
        const Matrix<float> x = testing::random_matrix(M, k, 21 + unsigned(M));
        const Matrix<float> u = testing::random_matrix(M, rank, 31);
        const Matrix<float> bb = testing::random_matrix(n, rank, 41);
        const Matrix<float> r = testing::random_matrix(M, n, 51);
        const std::vector<float> bias = [&] {
            const Matrix<float> b = testing::random_matrix(1, n, 61);
            return std::vector<float>(b.data(), b.data() + n);
        }();
        const MatD ref = ref_epilogue(testing::to_double(x), wdd, bias, kernels::activation::gelu_erf,
                                      testing::to_double(u), testing::to_double(bb), 0.5, testing::to_double(r));
        testing::for_each_isa([&](arch::isa) {
            Matrix<float> y = r;  // residual read from y itself (in place, as the layer does)
            kernels::epilogue ep;
            ep.bias = bias.data();
            ep.act = kernels::activation::gelu_erf;
            ep.residual = y.data();
            ep.ld_residual = n;
            ep.lowrank_u = u.data();
            ep.ld_u = rank;
            ep.lowrank_b = bb.data();
            ep.ld_b = rank;
            ep.rank = rank;
            ep.lowrank_scale = 0.5f;
            f.matmul(x, y, ep);
            CHECK(testing::rel_error(y, ref) <= tol);

            // Plain product (no epilogue) into a separate y.
            Matrix<float> y2(M, n);
            f.matmul(x, y2, {});
            CHECK(testing::rel_error(y2, testing::to_double(x) * wdd.transpose()) <= tol);

            // dx = dy·Ŵ
            const Matrix<float> dy = testing::random_matrix(M, n, 71);
            Matrix<float> dx(M, k);
            f.matmul_t(dy, dx);
            CHECK(testing::rel_error(dx, testing::to_double(dy) * wdd) <= 1e-5);
        });
    }
}

/// Quantised weights of every linear, dequantised: the oracle layer's weights.
template <class Policy>
nn::dense_layer_weights dequantised(const nn::dense_layer_weights& w, const nn::layer_calibration* cal = nullptr) {
    nn::dense_layer_weights d = w;
    auto back = [](const Matrix<float>& m, const compress::calibration* c) { return Policy::compress(m, c).to_dense(); };
    d.wq = back(w.wq, cal ? &cal->attention_in : nullptr);
    d.wk = back(w.wk, cal ? &cal->attention_in : nullptr);
    d.wv = back(w.wv, cal ? &cal->attention_in : nullptr);
    d.wo = back(w.wo, cal ? &cal->o_in : nullptr);
    d.w_up = back(w.w_up, cal ? &cal->ffn_in : nullptr);
    if (!w.w_gate.empty()) d.w_gate = back(w.w_gate, cal ? &cal->ffn_in : nullptr);
    d.w_down = back(w.w_down, cal ? &cal->down_in : nullptr);
    return d;
}

struct layer_errors {
    double vs_dequantised = 0;  ///< against compress::dense on the dequantised weights (the kernels' exactness)
    double vs_fp32 = 0;         ///< against the fp32 dense layer (the cost of quantising)
};

/// Runs TransformerLayer<Cfg<Policy>> and the two dense oracles on a padded batch, on every ISA; worst errors.
template <template <class> class Cfg, class Policy>
layer_errors run_layer(const nn::layer_shape& s, unsigned seed, const nn::layer_calibration* cal = nullptr,
                       const Matrix<float>* input = nullptr) {
    using Q = Cfg<Policy>;
    using D = Cfg<compress::dense>;
    const auto w = nn::random_layer_weights(s, seed, nn::kind_of<Q>);
    const TransformerLayer<Q> layer(w, s, cal);
    const TransformerLayer<D> oracle(dequantised<Policy>(w, cal), s);
    const TransformerLayer<D> fp32(w, s);
    CHECK(layer.bytes() < fp32.bytes() / 3);
    // A padded batch of three sequences, or `input` as one sequence.
    const std::vector<index_t> lengths = input ? std::vector<index_t>{input->rows()} : std::vector<index_t>{9, 4, 7};
    const index_t M = input ? input->rows() : 27;
    const Matrix<float> x = input ? *input : testing::random_matrix(M, s.d_model, seed + 1);
    nn::workspace ws;
    layer_errors e;
    testing::for_each_isa([&](arch::isa i) {
        Matrix<float> y(M, s.d_model), yo(M, s.d_model), yf(M, s.d_model);
        layer.forward(x, lengths, y, ws);
        CHECK(ws.last_isa() == i);
        oracle.forward(x, lengths, yo, ws);
        fp32.forward(x, lengths, yf, ws);
        e.vs_dequantised = std::max(e.vs_dequantised, testing::rel_error(y, testing::to_double(yo)));
        e.vs_fp32 = std::max(e.vs_fp32, testing::rel_error(y, testing::to_double(yf)));
    });
    return e;
}

nn::layer_shape bert_shape() {
    nn::layer_shape s;
    s.d_model = 64, s.n_heads = 4, s.n_kv_heads = 4, s.head_dim = 16, s.d_ff = 128, s.eps = 1e-12f;
    return s;
}
nn::layer_shape llama_shape() {  // GQA 4/2; every K a multiple of 128 for int4_g128
    nn::layer_shape s;
    s.d_model = 128, s.n_heads = 4, s.n_kv_heads = 2, s.head_dim = 32, s.d_ff = 256, s.eps = 1e-6f;
    return s;
}

/// Calibration (Hessians Σ xᵀx and the per-channel sums) of every input site of a layer, collected by running
/// the reference layer on x with a hook that sees each linear's input.
template <class C>
nn::layer_calibration collect(const nn::dense_layer_weights& w, const nn::layer_shape& s, const MatD& x) {
    nn::layer_calibration cal;
    auto add = [](compress::calibration& c, const MatD& in) {
        if (c.hessian.empty()) {
            c.hessian = Matrix<double>(in.cols(), in.cols());
            std::fill(c.hessian.data(), c.hessian.data() + c.hessian.size(), 0.0);
            c.sum_sq.assign(std::size_t(in.cols()), 0.0);
            c.max_abs.assign(std::size_t(in.cols()), 0.f);
        }
        as_eigen(c.hessian) += in.transpose() * in;
        for (Eigen::Index j = 0; j < in.cols(); ++j) {
            c.sum_sq[std::size_t(j)] += in.col(j).squaredNorm();
            c.max_abs[std::size_t(j)] = std::max(c.max_abs[std::size_t(j)], float(in.col(j).cwiseAbs().maxCoeff()));
        }
        c.samples += in.rows();
    };
    testing::reference_hooks hk;
    hk.linear_delta = [&](pet::target t, const MatD& in) {
        if (t == pet::target::q) add(cal.attention_in, in);
        if (t == pet::target::o) add(cal.o_in, in);
        if (t == pet::target::up) add(cal.ffn_in, in);
        if (t == pet::target::down) add(cal.down_in, in);
        return MatD();
    };
    (void)testing::reference_layer<C>(w, s, x, hk);
    return cal;
}

}  // namespace

TEST_CASE("quantized formats: matmul applies the full epilogue, matmul_t multiplies by the dequantised W") {
    SUBCASE("int8 per channel, weight-only") { check_format<compress::int8_per_channel>(45, 64, 1e-5); }
    SUBCASE("int4 g128, weight-only") { check_format<compress::int4_g128>(45, 256, 1e-5); }
    SUBCASE("int4 g64 asymmetric, weight-only") {
        check_format<compress::quantized<compress::int4, compress::per_group<64>, compress::asymmetric>>(33, 128, 1e-5);
    }
    SUBCASE("int8 per tensor asymmetric, weight-only") {
        check_format<compress::quantized<compress::int8, compress::per_tensor, compress::asymmetric>>(17, 72, 1e-5);
    }
    SUBCASE("w8a8 (int8 activations)") { check_format<compress::w8a8>(45, 64, 2e-2); }
    SUBCASE("w4a8 g128 (int8 activations)") { check_format<compress::w4a8_g128>(45, 256, 2e-2); }
    SUBCASE("w8a8 with SmoothQuant") { check_format<compress::w8a8_smooth>(45, 64, 2e-2, &outlier_stats(64, 5, 20.f)); }
    SUBCASE("w4a8 g32 with SmoothQuant") {
        using P = compress::quantized<compress::int4, compress::per_group<32>, compress::symmetric, compress::rtn,
                                      compress::activations_int8_smooth<50>>;
        check_format<P>(33, 64, 2e-2, &outlier_stats(64, 6, 1.5f));  // int4 groups tolerate only a mild spread of s
    }
}

TEST_CASE("SmoothQuant moves activation outliers into the weights: lower W8A8 error on outlier inputs") {
    const index_t n = 96, k = 128, M = 64;
    const Matrix<float> w = testing::random_matrix(n, k, 90);
    // Activations with a few outlier channels (x30), as LLM activations have.
    Matrix<float> x = testing::random_matrix(M, k, 91);
    for (index_t r = 0; r < M; ++r)
        for (index_t c = 3; c < k; c += 29) x(r, c) *= 30.f;
    compress::calibration cal;
    cal.sum_sq.assign(std::size_t(k), 0.0);
    cal.max_abs.assign(std::size_t(k), 0.f);
    for (index_t r = 0; r < M; ++r)
        for (index_t c = 0; c < k; ++c) {
            cal.sum_sq[std::size_t(c)] += double(x(r, c)) * x(r, c);
            cal.max_abs[std::size_t(c)] = std::max(cal.max_abs[std::size_t(c)], std::abs(x(r, c)));
        }
    cal.samples = M;
    const auto plain = compress::w8a8::compress(w, &cal);
    const auto smooth = compress::w8a8_smooth::compress(w, &cal);
    CHECK(smooth.act_scale() != nullptr);
    CHECK(plain.act_scale() == nullptr);
    CHECK(smooth.bytes() == plain.bytes() + std::size_t(k) * sizeof(float));
    // The effective weight is still W (to within int8 rounding of W·diag(s)).
    CHECK(testing::rel_error(smooth.to_dense(), testing::to_double(w)) < 2e-2);
    const MatD ref = testing::to_double(x) * testing::to_double(w).transpose();
    testing::for_each_isa([&](arch::isa) {
        Matrix<float> yp(M, n), ys(M, n);
        plain.matmul(x, yp, {});
        smooth.matmul(x, ys, {});
        const double ep = testing::rel_error(yp, ref), es = testing::rel_error(ys, ref);
        MESSAGE("W8A8 error on outlier activations: plain " << ep << ", SmoothQuant " << es);
        CHECK(es < 0.6 * ep);
    });
    // Bad input: no calibration, the wrong width, a non-finite maximum, factors given to a plain format.
    CHECK_THROWS_WITH_AS(compress::w8a8_smooth::compress(w, nullptr), doctest::Contains("SmoothQuant needs calibration"),
                         format_error);
    compress::calibration narrow = cal;
    narrow.max_abs.resize(10);
    CHECK_THROWS_WITH_AS(compress::w8a8_smooth::compress(w, &narrow), doctest::Contains("10 channels"), shape_error);
    compress::calibration nan = cal;
    nan.max_abs[7] = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_WITH_AS(compress::w8a8_smooth::compress(w, &nan), doctest::Contains("channel 7"), numeric_error);
    CHECK_THROWS_AS(compress::w8a8::format(compress::quantize_rtn(w, compress::w8a8::options()),
                                           std::vector<float>(std::size_t(k), 1.f)),
                    format_error);
    CHECK_THROWS_AS(compress::w8a8_smooth::format(compress::quantize_rtn(w, compress::w8a8::options()), {}),
                    format_error);
    // All-zero input channels and weight columns keep s = 1 (no NaN).
    Matrix<float> wz = w;
    for (index_t r = 0; r < n; ++r) wz(r, 0) = 0.f;
    compress::calibration zc = cal;
    zc.max_abs[1] = 0.f;
    const auto z = compress::w8a8_smooth::compress(wz, &zc);
    CHECK(z.act_scale()[0] == 1.f);
    CHECK(z.act_scale()[1] == 1.f);
}

TEST_CASE("quantized formats report their kernel and reject bad operands") {
    CHECK(std::string(compress::int8_per_channel::format::kernel()) == "gemm_wq");
    CHECK(std::string(compress::w8a8::format::kernel()) == "gemm_s8");
    CHECK(std::string(compress::w4a8_g128::format::kernel()) == "gemm_w4a8");
    CHECK(std::string(compress::int4_g128::name()) == "int4_g128");
    CHECK(compress::quantized<compress::int4, compress::per_group<64>, compress::asymmetric>::name() ==
          "int4_g64_asym_rtn_a32");

    const Matrix<float> w = testing::random_matrix(16, 64, 3);
    const auto f = compress::int8_per_channel::compress(w);
    Matrix<float> x(2, 63), y(2, 16), dx(2, 64);
    CHECK_THROWS_AS(f.matmul(x, y, {}), shape_error);
    CHECK_THROWS_AS(f.matmul_t(y, x), shape_error);
    // K not a multiple of the group
    CHECK_THROWS_WITH_AS(compress::int4_g128::compress(w), doctest::Contains("does not divide"), shape_error);
    // GPTQ without calibration
    CHECK_THROWS_WITH_AS(compress::int8_per_channel_gptq::compress(w, nullptr), doctest::Contains("GPTQ needs"),
                         format_error);
    compress::calibration empty;
    CHECK_THROWS_AS(compress::int4_g128_gptq::compress(w, &empty), format_error);
    // a format refuses weights of another kind
    CHECK_THROWS_AS(compress::int4_g128::format(compress::quantize_rtn(w)), format_error);
}

TEST_CASE("TransformerLayer<bert<int8_per_channel>> equals the dense layer on dequantised weights") {
    const auto e = run_layer<config::bert, compress::int8_per_channel>(bert_shape(), 5);
    MESSAGE("bert int8_per_channel: rel. error vs dequantised-dense ", e.vs_dequantised, ", vs fp32 dense ", e.vs_fp32);
    CHECK(e.vs_dequantised <= 1e-5);
    CHECK(e.vs_fp32 <= 2e-2);
}

TEST_CASE("TransformerLayer<llama<int4_g128>> (GQA) equals the dense layer on dequantised weights") {
    const auto e = run_layer<config::llama, compress::int4_g128>(llama_shape(), 7);
    MESSAGE("llama int4_g128: rel. error vs dequantised-dense ", e.vs_dequantised, ", vs fp32 dense ", e.vs_fp32);
    CHECK(e.vs_dequantised <= 1e-5);
    CHECK(e.vs_fp32 <= 0.15);
}

TEST_CASE("W8A8 / W4A8 layers stay within the int8-activation bound of the dequantised-dense layer") {
    const auto e8 = run_layer<config::bert, compress::w8a8>(bert_shape(), 5);
    MESSAGE("bert w8a8: rel. error vs dequantised-dense ", e8.vs_dequantised, ", vs fp32 dense ", e8.vs_fp32);
    CHECK(e8.vs_dequantised <= 3e-2);
    CHECK(e8.vs_fp32 <= 5e-2);
    // Pair-bounded codes (the exact u8 tile on AVX2 without VNNI): a coarser scale, the same kind of bound.
    const auto ep = run_layer<config::bert, compress::w8a8_pairs>(bert_shape(), 5);
    MESSAGE("bert w8a8_pairs: rel. error vs dequantised-dense ", ep.vs_dequantised, ", vs fp32 dense ", ep.vs_fp32);
    CHECK(ep.vs_dequantised <= 3e-2);
    CHECK(ep.vs_fp32 <= 5e-2);
    CHECK(compress::w8a8_pairs::options().pair_bound);
    CHECK_FALSE(compress::w8a8::options().pair_bound);
    CHECK(compress::quantized<compress::int8, compress::per_channel, compress::symmetric,
                              compress::pair_bounded<compress::gptq>>::name() == "int8_per_channel_sym_gptq_pairs_a32");
    {
        const Matrix<float> w = testing::random_matrix(16, 64, 3);
        CHECK(compress::w8a8_pairs::compress(w).weights().pair_bounded());
    }
    const auto e4 = run_layer<config::llama, compress::w4a8_g128>(llama_shape(), 7);
    MESSAGE("llama w4a8_g128: rel. error vs dequantised-dense ", e4.vs_dequantised, ", vs fp32 dense ", e4.vs_fp32);
    CHECK(e4.vs_dequantised <= 3e-2);
    CHECK(e4.vs_fp32 <= 0.2);
}

TEST_CASE("GPTQ policies use the layer calibration's Hessians and beat RTN on the calibration inputs") {
    using Q = config::llama<compress::int4_g128_gptq>;
    const auto s = llama_shape();
    const auto w = nn::random_layer_weights(s, 7, nn::kind_of<Q>);
    CHECK_THROWS_WITH_AS((TransformerLayer<Q>(w, s)), doctest::Contains("GPTQ needs"), format_error);
    // Calibrate on one sequence of 512 tokens; compare GPTQ and RTN on those tokens (what GPTQ minimises) and on
    // held-out data (reported only: on uniform random inputs H is close to isotropic, where GPTQ ≈ RTN).
    const Matrix<float> x = testing::random_matrix(512, s.d_model, 99);
    const nn::layer_calibration cal = collect<Q>(w, s, testing::to_double(x));
    const auto g = run_layer<config::llama, compress::int4_g128_gptq>(s, 7, &cal, &x);
    const auto r = run_layer<config::llama, compress::int4_g128>(s, 7, nullptr, &x);
    const auto gh = run_layer<config::llama, compress::int4_g128_gptq>(s, 7, &cal);
    const auto rh = run_layer<config::llama, compress::int4_g128>(s, 7);
    MESSAGE("llama int4_g128 held-out: rel. error vs fp32 dense, GPTQ ", gh.vs_fp32, " vs RTN ", rh.vs_fp32);
    MESSAGE("llama int4_g128 calibration tokens: rel. error vs fp32 dense, GPTQ ", g.vs_fp32, " vs RTN ", r.vs_fp32);
    CHECK(g.vs_dequantised <= 1e-5);
    CHECK(gh.vs_dequantised <= 1e-5);
    CHECK(g.vs_fp32 < r.vs_fp32);
}

namespace {

/// ‖W − Ŵ‖_F / ‖W‖_F of a format's dequantised weights.
template <class F>
double weight_error(const Matrix<float>& w, const F& f) {
    return testing::rel_error(f.to_dense().view(), testing::to_double(w.view()));
}

/// Weights with a few large outliers per row: min-max scales waste most of the grid on them.
Matrix<float> outlier_weights(index_t n, index_t k, unsigned seed) {
    Matrix<float> w = testing::random_matrix(n, k, seed);
    for (index_t r = 0; r < n; ++r) w(r, (r * 13) % k) = (r % 2 ? 12.f : -12.f);
    return w;
}

}  // namespace

TEST_CASE("clipping rules and GPTQ knobs are reachable from the policy types") {
    using namespace compress;
    const Matrix<float> w = outlier_weights(24, 128, 11);
    SUBCASE("percentile and MSE clipping: the policy packs what the quantizer makes with those options") {
        using P = quantized<int4, per_channel, symmetric, rtn_with<clip_percentile<990>>>;
        using E = quantized<int4, per_channel, symmetric, rtn_with<clip_mse<50, 60>>>;
        using R = quantized<int4, per_channel, symmetric, rtn>;
        CHECK(P::options().clip == clipping::percentile);
        CHECK(P::options().percentile == doctest::Approx(99.0));
        CHECK(E::options().clip == clipping::mse);
        CHECK(E::options().mse_grid == 50);
        CHECK(E::options().mse_max_shrink == doctest::Approx(0.6));
        CHECK(P::name() == "int4_per_channel_sym_rtn_p99_a32");
        CHECK(E::name() == "int4_per_channel_sym_rtn_mse50s60_a32");
        quant_options o;
        o.bits = qbits::int4;
        o.gran = granularity::per_channel;
        o.clip = clipping::percentile;
        o.percentile = 99.0;
        const auto p = P::compress(w);
        const auto direct = quantize_rtn(w, o);
        for (index_t r = 0; r < w.rows(); ++r) CHECK(p.weights().scales()[r] == direct.scales()[r]);
        // Clipping the outliers shrinks the scale, so the dequantised maximum stays below the outlier; min-max
        // keeps it within a step. MSE clipping may keep or shrink it but never does worse than min-max on squared error.
        const auto r = R::compress(w);
        const auto e = E::compress(w);
        const double err_r = weight_error(w, r), err_p = weight_error(w, p), err_e = weight_error(w, e);
        MESSAGE("int4 per-channel weight error: minmax ", err_r, ", p99 ", err_p, ", mse ", err_e);
        CHECK(p.to_dense().view()(1, 13) < 2.f);
        CHECK(r.to_dense().view()(1, 13) > 10.f);
        CHECK(err_e <= err_r * (1 + 1e-9));
    }
    SUBCASE("gptq_with<Clip, Damp, Block> hands its damping and block width to GPTQ") {
        using G = quantized<int4, per_group<32>, symmetric, gptq_with<clip_minmax, 100, 32>>;
        using D = quantized<int4, per_group<32>, symmetric, gptq>;
        CHECK(G::name() == "int4_g32_sym_gptq_d100_b32_a32");
        CHECK(G::needs_hessian);
        const Matrix<float> x = testing::random_matrix(256, 128, 5);
        calibration cal;
        const Eigen::MatrixXd xd = as_eigen(x.view()).cast<double>();
        cal.hessian = Matrix<double>(128, 128);
        as_eigen(cal.hessian.view()) = xd.transpose() * xd;
        cal.samples = 256;
        const auto g = G::compress(w, &cal);
        quant_options o = G::options();
        gptq_options k;
        k.percdamp = 0.1;
        k.block = 32;
        const auto direct = quantize_gptq_hessian(w, as_eigen(cal.hessian.view()), o, k);
        const Matrix<float> a = g.to_dense(), b = G::format(direct).to_dense();
        CHECK(std::equal(a.data(), a.data() + a.size(), b.data()));
        // another damping gives other codes: the knob really reaches the quantizer
        const Matrix<float> d = D::compress(w, &cal).to_dense();
        CHECK(!std::equal(a.data(), a.data() + a.size(), d.data()));
    }
}

}  // namespace cpet_test_compress_quantized_policy
