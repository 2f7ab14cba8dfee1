// tests/kernels/test_softmax.cpp — row softmax against a double-precision reference.
#include <cmath>
#include <limits>

#include "cpet/kernels/softmax.hpp"
#include "support/testing.hpp"

namespace cpet_test_kernels_softmax {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using cpet::testing::MatD;

namespace {

MatD softmax_ref(const MatD& x) {
    MatD y = MatD::Zero(x.rows(), x.cols());
    for (index_t r = 0; r < x.rows(); ++r) {
        const double m = x.row(r).maxCoeff();
        if (m == -std::numeric_limits<double>::infinity()) continue;
        y.row(r) = (x.row(r).array() - m).exp().matrix();
        y.row(r) /= y.row(r).sum();
    }
    return y;
}

constexpr double tol = 1e-5;
constexpr float ninf = -std::numeric_limits<float>::infinity();

}  // namespace

TEST_CASE("softmax_rows matches the double reference on every path") {
    std::vector<index_t> cols_list = testing::awkward_sizes();
    cols_list.push_back(300);
    cols_list.push_back(4096 + 5);
    unsigned seed = 1;
    testing::for_each_isa([&](arch::isa) {
        for (index_t rows : {1, 4, 40})
            for (index_t cols : cols_list) {
                CAPTURE(rows);
                CAPTURE(cols);
                Matrix<float> x = testing::random_matrix(rows, cols, seed++, -20.f, 20.f);
                if (cols > 2) x(0, 1) = ninf;  // a masked entry
                const MatD ref = softmax_ref(testing::to_double(x));
                kernels::softmax_rows(x);
                CHECK(testing::rel_error(x, ref) <= tol);
                CHECK(testing::max_abs_error(x, ref) <= tol);
            }
    });
}

TEST_CASE("softmax_rows: fully masked rows become zeros; strided views keep their guard cells") {
    testing::for_each_isa([&](arch::isa) {
        const index_t rows = 5, cols = 21, pad = 2;
        Matrix<float> big = testing::random_matrix(rows + 2, cols + 2 * pad, 4);
        const Matrix<float> orig = big;
        MatrixView<float> x = big.view().block(1, pad, rows, cols);
        for (index_t c = 0; c < cols; ++c) x(2, c) = ninf;
        const MatD ref = softmax_ref(testing::to_double(x));
        kernels::softmax_rows(x);
        CHECK(testing::max_abs_error(x, ref) <= tol);
        for (index_t c = 0; c < cols; ++c) CHECK(x(2, c) == 0.f);
        int touched = 0;
        for (index_t r = 0; r < big.rows(); ++r)
            for (index_t c = 0; c < big.cols(); ++c) {
                const bool inside = r >= 1 && r <= rows && c >= pad && c < pad + cols;
                if (!inside && big(r, c) != orig(r, c)) ++touched;
            }
        CHECK(touched == 0);

        Matrix<float> e(0, 5);
        kernels::softmax_rows(e);
        Matrix<float> z(3, 0);
        kernels::softmax_rows(z);
        Matrix<float> n = testing::random_matrix(2, 40, 5);
        n(0, 3) = std::numeric_limits<float>::quiet_NaN();
        kernels::softmax_rows(n);  // no crash; the clean row is still a distribution
        CHECK(as_eigen(n).row(1).sum() == doctest::Approx(1.0).epsilon(1e-5));
    });
}

}  // namespace cpet_test_kernels_softmax
