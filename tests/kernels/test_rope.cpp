// tests/kernels/test_rope.cpp — rotary embeddings (both pairings) against a double-precision reference.
#include <cmath>

#include "cpet/kernels/rope.hpp"
#include "support/testing.hpp"

namespace cpet_test_kernels_rope {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using cpet::testing::MatD;
using kernels::rope_style;

namespace {

MatD rope_ref(const MatD& x, index_t n_heads, index_t d, index_t pos0, double base, rope_style style) {
    MatD y = x;
    for (index_t t = 0; t < x.rows(); ++t)
        for (index_t h = 0; h < n_heads; ++h)
            for (index_t i = 0; i < d / 2; ++i) {
                const double ang = double(pos0 + t) * std::pow(base, -2.0 * double(i) / double(d));
                const index_t a = h * d + (style == rope_style::half ? i : 2 * i);
                const index_t b = h * d + (style == rope_style::half ? i + d / 2 : 2 * i + 1);
                y(t, a) = x(t, a) * std::cos(ang) - x(t, b) * std::sin(ang);
                y(t, b) = x(t, b) * std::cos(ang) + x(t, a) * std::sin(ang);
            }
    return y;
}

constexpr double tol = 1e-5;

}  // namespace

TEST_CASE("rope matches the double reference on every path, both pairings") {
    struct cfg {
        index_t rows, heads, dim, pos0;
    };
    const cfg cfgs[] = {{1, 1, 2, 0},   {7, 3, 8, 5},    {33, 2, 16, 0},  {5, 4, 64, 4000},
                        {17, 2, 80, 1}, {3, 2, 128, 77}, {40, 1, 34, 300}, {2, 32, 128, 2047}};
    unsigned seed = 1;
    testing::for_each_isa([&](arch::isa) {
        for (const cfg& c : cfgs)
            for (auto style : {rope_style::half, rope_style::interleaved})
                for (float base : {10000.f, 500000.f}) {
                    CAPTURE(c.rows);
                    CAPTURE(c.heads);
                    CAPTURE(c.dim);
                    CAPTURE(c.pos0);
                    CAPTURE(int(style));
                    Matrix<float> x = testing::random_matrix(c.rows, c.heads * c.dim, seed++);
                    const MatD ref = rope_ref(testing::to_double(x), c.heads, c.dim, c.pos0, base, style);
                    kernels::rope(x, c.heads, c.dim, c.pos0, base, style);
                    CHECK(testing::rel_error(x, ref) <= tol);
                    CHECK(testing::max_abs_error(x, ref) <= tol);
                }
    });
}

TEST_CASE("rope: strided views keep guard cells; large matrices take the threaded path") {
    testing::for_each_isa([&](arch::isa) {
        const index_t rows = 6, heads = 2, dim = 24, pad = 3;
        Matrix<float> big = testing::random_matrix(rows + 2, heads * dim + 2 * pad, 9);
        const Matrix<float> orig = big;
        MatrixView<float> x = big.view().block(1, pad, rows, heads * dim);
        const MatD ref = rope_ref(testing::to_double(x), heads, dim, 10, 10000.0, rope_style::interleaved);
        kernels::rope(x, heads, dim, 10, 10000.f, rope_style::interleaved);
        CHECK(testing::max_abs_error(x, ref) <= tol);
        int touched = 0;
        for (index_t r = 0; r < big.rows(); ++r)
            for (index_t c = 0; c < big.cols(); ++c) {
                const bool inside = r >= 1 && r <= rows && c >= pad && c < pad + heads * dim;
                if (!inside && big(r, c) != orig(r, c)) ++touched;
            }
        CHECK(touched == 0);

        Matrix<float> l = testing::random_matrix(130, 8 * 64, 10);
        const MatD lref = rope_ref(testing::to_double(l), 8, 64, 3, 10000.0, rope_style::half);
        kernels::rope(l, 8, 64, 3);
        CHECK(testing::max_abs_error(l, lref) <= tol);
    });
}

TEST_CASE("rope: empty input, bad head_dim and shapes") {
    Matrix<float> e(0, 16);
    kernels::rope(e, 2, 8, 0);
    Matrix<float> x(3, 18);
    CHECK_THROWS_WITH_AS(kernels::rope(x, 2, 9, 0), doctest::Contains("head_dim"), shape_error);
    CHECK_THROWS_WITH_AS(kernels::rope(x, 2, 8, 0), doctest::Contains("rope: x"), shape_error);
}

TEST_CASE("rope's unchecked body with an odd head_dim rotates whole pairs and writes nothing outside a head") {
    // The checked entry refuses an odd head_dim; the tagged body the layers call must still stay inside each head
    // (the interleaved pairing used to write the next head's first value, and past the row for the last head).
    const index_t heads = 2, rows = 3;
    for (index_t dim : {3, 17, 33}) {
        for (auto style : {rope_style::half, rope_style::interleaved}) {
            CAPTURE(dim);
            CAPTURE(int(style));
            const index_t width = heads * dim;
            testing::for_each_isa([&](arch::isa) {
                Matrix<float> buf = testing::random_matrix(rows, width + 1, unsigned(dim));  // + a sentinel column
                for (index_t r = 0; r < rows; ++r) buf(r, width) = 1234.5f;
                MatrixView<float> x(buf.data(), rows, width, width + 1);
                MatD in(rows, width);
                for (index_t r = 0; r < rows; ++r)
                    for (index_t c = 0; c < width; ++c) in(r, c) = buf(r, c);
                const MatD ref = rope_ref(in, heads, dim, 3, 10000.0, style);  // leaves each head's last value
                arch::dispatch([&](auto tag) { kernels::rope(tag, x, heads, dim, 3, 10000.f, style); });
                for (index_t r = 0; r < rows; ++r) CHECK(buf(r, width) == 1234.5f);
                CHECK(testing::rel_error(x, ref) <= tol);
            });
        }
    }
    Matrix<float> x(1, 6);
    CHECK_THROWS_WITH_AS(kernels::rope(x, 2, 3, 0), doctest::Contains("head_dim must be positive and even, got 3"),
                         shape_error);
}

}  // namespace cpet_test_kernels_rope
