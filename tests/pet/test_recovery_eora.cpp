// The recovery SVD init with a Gram matrix is EoRA's: it minimises ‖X(E − BA)ᵀ‖_F over rank-r BA exactly. Checked
// against the Eckart–Young optimum of X·Eᵀ computed independently (Eigen's SVD in double), against the diagonal
// and plain inits, on shapes 1 / 7 / 33 and every rank; the layer entry (nn::init_recovery) picks it when the
// calibration carries Σxᵀx; bad statistics are refused by name.
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include <Eigen/SVD>

#include "cpet/pet/pet.hpp"
#include "pet/pet_testing.hpp"

namespace cpet_test_pet_recovery_eora {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using testing::MatD;

namespace {

/// X [rows, in] with correlated columns of uneven scales: Z·M·diag(c), Z standard normal, M = I + 0.6·U(-1,1)/√in
/// (well conditioned, so X has full column rank), c_j = e^U(-1, 1). XᵀX is far from diagonal.
Matrix<float> correlated_inputs(index_t rows, index_t in, unsigned seed) {
    std::mt19937 gen(seed);
    std::normal_distribution<double> z(0.0, 1.0);
    std::uniform_real_distribution<double> u(-1.0, 1.0);
    MatD Z(rows, in), M = MatD::Identity(in, in);
    for (index_t i = 0; i < rows; ++i)
        for (index_t j = 0; j < in; ++j) Z(i, j) = z(gen);
    for (index_t i = 0; i < in; ++i)
        for (index_t j = 0; j < in; ++j) M(i, j) += 0.6 * u(gen) / std::sqrt(double(in));
    Eigen::VectorXd c(in);
    for (index_t j = 0; j < in; ++j) c(j) = std::exp(u(gen));
    const MatD X = Z * M * c.asDiagonal();
    Matrix<float> x(rows, in);
    for (index_t i = 0; i < rows; ++i)
        for (index_t j = 0; j < in; ++j) x(i, j) = float(X(i, j));
    return x;
}

/// What nn::calibrate collects at one site, computed naively in double from the rows of x.
compress::calibration stats_of(ConstMatrixView<float> x, bool gram) {
    compress::calibration c;
    c.samples = x.rows();
    c.sum_sq.assign(std::size_t(x.cols()), 0.0);
    c.max_abs.assign(std::size_t(x.cols()), 0.f);
    for (index_t i = 0; i < x.rows(); ++i)
        for (index_t j = 0; j < x.cols(); ++j) {
            c.sum_sq[std::size_t(j)] += double(x(i, j)) * double(x(i, j));
            c.max_abs[std::size_t(j)] = std::max(c.max_abs[std::size_t(j)], std::abs(x(i, j)));
        }
    if (gram) {
        c.hessian = Matrix<double>(x.cols(), x.cols());
        for (index_t i = 0; i < x.rows(); ++i)
            for (index_t a = 0; a < x.cols(); ++a)
                for (index_t b = 0; b < x.cols(); ++b) c.hessian(a, b) += double(x(i, a)) * double(x(i, b));
    }
    return c;
}

/// An int4 weight: 16 levels per tensor on a grid whose origin sits 0.37 of a step below the smallest weight (a
/// zero point that is not a weight), so even a 1x1 weight is not on it and every shape has a residual.
Matrix<float> int4_of(ConstMatrixView<float> w) {
    float lo = w(0, 0), hi = w(0, 0);
    for (index_t i = 0; i < w.rows(); ++i)
        for (index_t j = 0; j < w.cols(); ++j) lo = std::min(lo, w(i, j)), hi = std::max(hi, w(i, j));
    const float step = std::max(hi - lo, std::max(std::abs(lo), std::abs(hi))) / 15.f;
    const float origin = lo - 0.37f * step;
    Matrix<float> q(w);
    for (index_t i = 0; i < q.size(); ++i)
        q.data()[i] = origin + step * std::min(15.f, std::round((q.data()[i] - origin) / step));
    return q;
}

/// Σ_{i >= r} σ_i² of m, square-rooted: the Eckart–Young distance of m to the nearest rank-r matrix.
double eckart_young(const MatD& m, index_t r) {
    const Eigen::JacobiSVD<MatD> svd(m);  // another algorithm than the init's BDCSVD
    const Eigen::VectorXd& s = svd.singularValues();
    return r >= s.size() ? 0.0 : s.tail(s.size() - r).norm();
}

}  // namespace

TEST_CASE("EoRA: the Gram-whitened init reaches the Eckart–Young optimum of ‖X(E − BA)ᵀ‖_F, below the diagonal "
          "and plain inits, on every shape and rank") {
    const std::vector<index_t> sizes{1, 7, 33};
    int strictly_better = 0, cases = 0;
    for (index_t out : sizes)
        for (index_t in : sizes) {
            CAPTURE(out);
            CAPTURE(in);
            const unsigned seed = unsigned(100 * out + in);
            const auto w = testing::random_matrix(out, in, seed);
            const auto w_hat = int4_of(w);
            const auto x = correlated_inputs(3 * in + 11, in, seed + 1);
            const auto full = stats_of(x, true), diag_only = stats_of(x, false);
            const MatD X = testing::to_double(x), E = testing::to_double(w) - testing::to_double(w_hat);
            const MatD XE = X * E.transpose();
            const double scale = XE.norm();
            REQUIRE(scale > 0);
            auto err = [&](const pet::residual_factors& f) {
                return (X * (E - testing::to_double(f.B) * testing::to_double(f.A)).transpose()).norm();
            };
            for (index_t r = 1; r <= std::min(in, out); ++r) {
                CAPTURE(r);
                const auto gram = pet::svd_residual(w, w_hat, r, &full);
                const auto diag = pet::svd_residual(w, w_hat, r, &diag_only);
                const auto plain = pet::svd_residual(w, w_hat, r);
                CHECK(gram.weighting == pet::residual_weighting::gram);
                CHECK(diag.weighting == pet::residual_weighting::diagonal);
                CHECK(plain.weighting == pet::residual_weighting::plain);
                // (a) the optimum, computed from X·Eᵀ alone (X has full column rank, so every rank-r product
                // X·(BA)ᵀ is reachable); fp32 factors move the objective at second order only
                const double opt = eckart_young(XE, r), eg = err(gram);
                CHECK(std::abs(eg - opt) <= 1e-6 * opt + 1e-6 * scale);
                // (b) no other init does better on this objective
                const double ed = err(diag), ep = err(plain);
                CHECK(eg <= ed * (1 + 1e-9) + 1e-7 * scale);
                CHECK(eg <= ep * (1 + 1e-9) + 1e-7 * scale);
                if (r < std::min(in, out) && in > 1) {
                    ++cases;
                    if (eg < ed * (1 - 1e-3)) ++strictly_better;
                }
                // residual_norm is the RMS output error over the calibration rows
                CHECK(gram.residual_norm == doctest::Approx(scale / std::sqrt(double(x.rows()))).epsilon(1e-9));
                // (c) without statistics: the plain SVD, Eckart–Young on E itself
                CHECK(std::abs((E - testing::to_double(plain.B) * testing::to_double(plain.A)).norm() -
                               eckart_young(E, r)) <= 1e-6 * E.norm());
                // the objective can be asked for by name, and must match what automatic picked
                const auto named = pet::svd_residual(w, w_hat, r, &full, pet::residual_weighting::gram);
                CHECK(testing::max_abs_error(named.A, testing::to_double(gram.A)) == 0.0);
                const auto diag_of_full = pet::svd_residual(w, w_hat, r, &full, pet::residual_weighting::diagonal);
                CHECK(err(diag_of_full) == doctest::Approx(ed).epsilon(1e-6));
                const auto plain_of_full = pet::svd_residual(w, w_hat, r, &full, pet::residual_weighting::plain);
                CHECK(err(plain_of_full) == doctest::Approx(ep).epsilon(1e-6));
            }
        }
    MESSAGE("Gram-whitened init strictly below the diagonal one in ", strictly_better, " of ", cases,
            " truncated cases with correlated inputs");
    CHECK(strictly_better == cases);  // correlated columns: the diagonal weighting is not the optimum
}

TEST_CASE("EoRA: a rank-deficient Gram matrix (fewer calibration rows than inputs) still gives finite factors "
          "at the optimum over the excited directions") {
    const index_t out = 24, in = 40, rows = 16, r = 6;
    const auto w = testing::random_matrix(out, in, 7);
    const auto w_hat = int4_of(w);
    const auto x = testing::random_matrix(rows, in, 8);
    const auto st = stats_of(x, true);
    const auto f = pet::svd_residual(w, w_hat, r, &st);
    for (index_t i = 0; i < f.A.size(); ++i) REQUIRE(std::isfinite(f.A.data()[i]));
    for (index_t i = 0; i < f.B.size(); ++i) REQUIRE(std::isfinite(f.B.data()[i]));
    const MatD X = testing::to_double(x), E = testing::to_double(w) - testing::to_double(w_hat);
    const MatD XE = X * E.transpose();
    // X·(BA)ᵀ can be any rank-r matrix in X's column space: the optimum is still Eckart–Young's of X·Eᵀ
    const double got = (X * (E - testing::to_double(f.B) * testing::to_double(f.A)).transpose()).norm();
    CHECK(std::abs(got - eckart_young(XE, r)) <= 1e-5 * XE.norm());
}

TEST_CASE("EoRA through nn::init_recovery: a calibration with Σxᵀx selects it for every linear, the layer's "
          "output error falls below the diagonal init's") {
    using C = config::bert<testing::rounded<4>>;
    const auto s = testing::bert_shape();
    const auto w = nn::random_layer_weights(s, 90, nn::kind_of<C>);
    const TransformerLayer<C> layer(w, s);
    // correlated calibration tokens: a shared random mixing of the d_model channels
    const std::vector<index_t> lengths{40, 33, 40};
    nn::calibration_set set{correlated_inputs(120, s.d_model, 91), lengths};
    for (index_t r = 33; r < 40; ++r)
        for (index_t c = 0; c < s.d_model; ++c) set.x(r, c) = 0.f;  // sequence 1's padding
    const auto with_gram = nn::calibrate(layer, set, {.hessian = true}).linears;
    const auto sums_only = nn::calibrate(layer, set).linears;
    const pet::recovery_linear::options o{.rank = 8};
    const auto gram = nn::init_recovery(layer, w, o, &with_gram);
    const auto diag = nn::init_recovery(layer, w, o, &sums_only);
    const auto wc = nn::dense_weights_of(layer);
    for (int i = 0; i < pet::target_count; ++i) {
        const auto t = pet::target(i);
        if (!gram.rank(t)) continue;
        CAPTURE(pet::target_name(t));
        const auto* cal = nn::calibration_of(&with_gram, t);
        REQUIRE(cal != nullptr);
        const auto f = pet::svd_residual(nn::detail::weight_of(w, t), nn::detail::weight_of(wc, t), 8, cal);
        CHECK(f.weighting == pet::residual_weighting::gram);
        CHECK(testing::max_abs_error(gram.A(t), testing::to_double(f.A)) == 0.0);
        CHECK(testing::max_abs_error(gram.B(t), testing::to_double(f.B)) == 0.0);
    }
    const MatD dense = testing::reference_batch<C>({w}, s, testing::to_double(set.x), lengths);
    nn::workspace ws;
    Matrix<float> y(set.x.rows(), s.d_model);
    layer.forward(set.x, lengths, y, ws);
    const double before = testing::valid_error(y, dense, lengths);
    layer.forward(set.x, lengths, y, ws, diag);
    const double e_diag = testing::valid_error(y, dense, lengths);
    layer.forward(set.x, lengths, y, ws, gram);
    const double e_gram = testing::valid_error(y, dense, lengths);
    MESSAGE("int4 BERT layer, rank 8, on its calibration tokens: output error ", before, " -> diagonal ", e_diag,
            " -> Gram (EoRA) ", e_gram);
    CHECK(e_gram < before);
    CHECK(e_gram < e_diag);

    // bad statistics at one site: the error names the linear
    auto bad = with_gram;
    bad.o_in.hessian(3, 3) = std::numeric_limits<double>::quiet_NaN();
    CHECK_THROWS_WITH_AS(nn::init_recovery(layer, w, o, &bad), doctest::Contains("recovery_linear of target o:"),
                         numeric_error);
    auto small = with_gram;
    small.down_in.hessian = Matrix<double>(5, 5);
    CHECK_THROWS_WITH_AS(nn::init_recovery(layer, w, o, &small), doctest::Contains("of target down: recovery SVD "
                         "init: the calibration Gram matrix (Σxᵀx) is 5x5"), shape_error);
}

TEST_CASE("EoRA bad input: a Gram matrix of the wrong size, not symmetric, not PSD or with NaN; asking for "
          "statistics that are absent") {
    const index_t out = 9, in = 7;
    const auto w = testing::random_matrix(out, in, 3);
    const auto w_hat = int4_of(w);
    const auto x = correlated_inputs(30, in, 4);
    const auto good = stats_of(x, true);

    auto wrong_size = good;
    wrong_size.hessian = Matrix<double>(in + 1, in + 1);
    CHECK_THROWS_WITH_AS(pet::svd_residual(w, w_hat, 2, &wrong_size),
                         doctest::Contains("Gram matrix (Σxᵀx) is 8x8, the weight has 7 inputs, expected 7x7"), shape_error);
    auto not_square = good;
    not_square.hessian = Matrix<double>(in, in + 2);
    CHECK_THROWS_AS(pet::svd_residual(w, w_hat, 2, &not_square), shape_error);

    auto asym = good;
    asym.hessian(1, 4) += 1e-2 * good.hessian(1, 1);
    CHECK_THROWS_WITH_AS(pet::svd_residual(w, w_hat, 2, &asym), doctest::Contains("not symmetric"), format_error);
    auto tiny_asym = good;  // rounding-level asymmetry is accepted (and symmetrised)
    tiny_asym.hessian(1, 4) *= 1 + 1e-12;
    CHECK_NOTHROW(pet::svd_residual(w, w_hat, 2, &tiny_asym));

    auto nan = good;
    nan.hessian(2, 2) = std::numeric_limits<double>::quiet_NaN();
    CHECK_THROWS_WITH_AS(pet::svd_residual(w, w_hat, 2, &nan), doctest::Contains("non-finite entry (2, 2)"),
                         numeric_error);
    auto inf = good;
    inf.hessian(0, 3) = inf.hessian(3, 0) = std::numeric_limits<double>::infinity();
    CHECK_THROWS_AS(pet::svd_residual(w, w_hat, 2, &inf), numeric_error);

    auto indefinite = good;
    for (index_t i = 0; i < in; ++i) indefinite.hessian(i, i) = -indefinite.hessian(i, i);
    CHECK_THROWS_WITH_AS(pet::svd_residual(w, w_hat, 2, &indefinite), doctest::Contains("positive semi-definite"),
                         format_error);

    auto nan_sum = stats_of(x, false);
    nan_sum.sum_sq[5] = std::numeric_limits<double>::quiet_NaN();
    CHECK_THROWS_WITH_AS(pet::svd_residual(w, w_hat, 2, &nan_sum), doctest::Contains("sum_sq[5]"), numeric_error);

    const auto no_gram = stats_of(x, false);
    CHECK_THROWS_WITH_AS(pet::svd_residual(w, w_hat, 2, &no_gram, pet::residual_weighting::gram),
                         doctest::Contains("needs a Gram matrix"), format_error);
    CHECK_THROWS_WITH_AS(pet::svd_residual(w, w_hat, 2, static_cast<const compress::calibration*>(nullptr),
                                           pet::residual_weighting::diagonal),
                         doctest::Contains("no statistics"), format_error);
    // a Gram-only statistics type (no sum_sq) serves the diagonal objective from its diagonal
    struct gram_only {
        Matrix<double> hessian;
        std::int64_t samples = 0;
    };
    static_assert(pet::GramStats<gram_only> && !pet::ChannelStats<gram_only>);
    gram_only g{Matrix<double>(good.hessian), good.samples};
    const auto from_diag = pet::svd_residual(w, w_hat, 2, &g, pet::residual_weighting::diagonal);
    const auto ref_diag = pet::svd_residual(w, w_hat, 2, &no_gram);
    CHECK(testing::max_abs_error(from_diag.B, testing::to_double(ref_diag.B)) <= 1e-5);
    CHECK(pet::svd_residual(w, w_hat, 2, &g).weighting == pet::residual_weighting::gram);
}

}  // namespace cpet_test_pet_recovery_eora
