// tests/kernels/test_norms.cpp — LayerNorm and RMSNorm against double-precision references.
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "cpet/kernels/norms.hpp"
#include "support/testing.hpp"

namespace cpet_test_kernels_norms {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using cpet::testing::MatD;

namespace {

MatD layernorm_ref(const MatD& x, const float* gamma, const float* beta, double eps) {
    MatD y(x.rows(), x.cols());
    for (index_t r = 0; r < x.rows(); ++r) {
        const double mean = x.row(r).mean();
        const double var = (x.row(r).array() - mean).square().mean();
        for (index_t c = 0; c < x.cols(); ++c)
            y(r, c) = (x(r, c) - mean) / std::sqrt(var + eps) * (gamma ? gamma[c] : 1.0) + (beta ? beta[c] : 0.0);
    }
    return y;
}

MatD rmsnorm_ref(const MatD& x, const float* gamma, double eps) {
    MatD y(x.rows(), x.cols());
    for (index_t r = 0; r < x.rows(); ++r) {
        const double inv = 1.0 / std::sqrt(x.row(r).squaredNorm() / double(x.cols()) + eps);
        for (index_t c = 0; c < x.cols(); ++c) y(r, c) = x(r, c) * inv * (gamma ? gamma[c] : 1.0);
    }
    return y;
}

std::vector<float> random_vec(index_t n, unsigned seed, float lo, float hi) {
    const Matrix<float> m = testing::random_matrix(1, n, seed, lo, hi);
    return {m.data(), m.data() + n};
}

constexpr double tol = 1e-5;

}  // namespace

TEST_CASE("layernorm and rmsnorm match the double reference on every path") {
    const index_t rows_list[] = {1, 3, 50};
    std::vector<index_t> cols_list = testing::awkward_sizes();
    cols_list.push_back(768);
    cols_list.push_back(4096 + 3);
    unsigned seed = 1;
    testing::for_each_isa([&](arch::isa) {
        for (index_t rows : rows_list)
            for (index_t cols : cols_list) {
                CAPTURE(rows);
                CAPTURE(cols);
                // An offset mean (3) checks the two-pass variance; eps 1e-5 like BERT / 1e-6 like LLaMA.
                const Matrix<float> x = testing::random_matrix(rows, cols, seed++, 2.f, 4.f);
                const auto gamma = random_vec(cols, seed++, 0.5f, 1.5f), beta = random_vec(cols, seed++, -1.f, 1.f);
                Matrix<float> y(rows, cols);
                kernels::layernorm(x, gamma.data(), beta.data(), 1e-5f, y);
                CHECK(testing::rel_error(y, layernorm_ref(testing::to_double(x), gamma.data(), beta.data(), 1e-5)) <=
                      tol);
                kernels::layernorm(x, nullptr, nullptr, 1e-5f, y);
                CHECK(testing::rel_error(y, layernorm_ref(testing::to_double(x), nullptr, nullptr, 1e-5)) <= tol);
                kernels::rmsnorm(x, gamma.data(), 1e-6f, y);
                CHECK(testing::rel_error(y, rmsnorm_ref(testing::to_double(x), gamma.data(), 1e-6)) <= tol);
                kernels::rmsnorm(x, nullptr, 1e-6f, y);
                CHECK(testing::rel_error(y, rmsnorm_ref(testing::to_double(x), nullptr, 1e-6)) <= tol);
            }
    });
}

TEST_CASE("norms: in place (y aliases x), strided views and guard cells") {
    testing::for_each_isa([&](arch::isa) {
        const index_t rows = 9, cols = 37, pad = 3;
        Matrix<float> big = testing::random_matrix(rows + 2, cols + 2 * pad, 7);
        const Matrix<float> orig = big;
        MatrixView<float> x = big.view().block(1, pad, rows, cols);
        const MatD xd = testing::to_double(x);
        const auto gamma = random_vec(cols, 8, 0.5f, 1.5f), beta = random_vec(cols, 9, -1.f, 1.f);
        kernels::layernorm(x, gamma.data(), beta.data(), 1e-5f, x);
        CHECK(testing::rel_error(x, layernorm_ref(xd, gamma.data(), beta.data(), 1e-5)) <= tol);
        int touched = 0;
        for (index_t r = 0; r < big.rows(); ++r)
            for (index_t c = 0; c < big.cols(); ++c) {
                const bool inside = r >= 1 && r <= rows && c >= pad && c < pad + cols;
                if (!inside && big(r, c) != orig(r, c)) ++touched;
            }
        CHECK(touched == 0);

        Matrix<float> z = testing::random_matrix(rows, cols, 10);
        const MatD zd = testing::to_double(z);
        kernels::rmsnorm(z, gamma.data(), 1e-6f, z);
        CHECK(testing::rel_error(z, rmsnorm_ref(zd, gamma.data(), 1e-6)) <= tol);
    });
}

TEST_CASE("norms: empty, constant and NaN rows; bad shapes") {
    testing::for_each_isa([&](arch::isa) {
        Matrix<float> e(0, 8), ey(0, 8);
        kernels::layernorm(e, nullptr, nullptr, 1e-5f, ey);
        kernels::rmsnorm(e, nullptr, 1e-5f, ey);
        Matrix<float> c(2, 33), cy(2, 33);
        c.fill(5.f);
        kernels::layernorm(c, nullptr, nullptr, 1e-5f, cy);  // variance 0: (x − mean) = 0, no division by 0
        CHECK(as_eigen(cy).cwiseAbs().maxCoeff() == 0.f);
        Matrix<float> n = testing::random_matrix(3, 20, 3);
        n(1, 4) = std::numeric_limits<float>::quiet_NaN();
        kernels::layernorm(n, nullptr, nullptr, 1e-5f, n);
        CHECK(std::isfinite(n(0, 0)));
        CHECK(std::isfinite(n(2, 19)));
    });
    Matrix<float> x(4, 8), y(4, 9);
    CHECK_THROWS_WITH_AS(kernels::layernorm(x, nullptr, nullptr, 1e-5f, y), doctest::Contains("layernorm: y"),
                         shape_error);
    CHECK_THROWS_WITH_AS(kernels::rmsnorm(x, nullptr, 1e-5f, y), doctest::Contains("rmsnorm: y"), shape_error);
}

}  // namespace cpet_test_kernels_norms
