// compress::dense_f32 / compress::dense: the format round trip, its products, and the policy.
#include "cpet/compress/compress.hpp"
#include "support/testing.hpp"

namespace cpet_test_compress_dense {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using testing::MatD;

static_assert(compress::WeightFormat<compress::dense_f32>);
static_assert(compress::CompressionPolicy<compress::dense>);
static_assert(std::is_same_v<compress::dense::format, compress::dense_f32>);

TEST_CASE("dense_f32 round trip: to_dense equals the input, bytes cover the weights") {
    for (index_t out : {1, 7, 33})
        for (index_t in : {1, 16, 17}) {
            const auto w = testing::random_matrix(out, in, unsigned(out * 100 + in));
            const auto f = compress::dense::compress(w, nullptr);
            CHECK(f.out_features() == out);
            CHECK(f.in_features() == in);
            CHECK(f.bytes() >= std::size_t(out * in) * sizeof(float));
            const Matrix<float> back = f.to_dense();
            REQUIRE(back.rows() == out);
            REQUIRE(back.cols() == in);
            for (index_t r = 0; r < out; ++r)
                for (index_t c = 0; c < in; ++c) REQUIRE(back(r, c) == w(r, c));
        }
}

TEST_CASE("dense_f32 packs from a strided view") {
    const auto big = testing::random_matrix(9, 20, 3);
    const auto f = compress::dense_f32(big.view().block(2, 3, 5, 11));
    const auto back = f.to_dense();
    for (index_t r = 0; r < 5; ++r)
        for (index_t c = 0; c < 11; ++c) REQUIRE(back(r, c) == big(r + 2, c + 3));
}

TEST_CASE("dense_f32 matmul applies the epilogue; matmul_t multiplies by W") {
    const index_t M = 5, N = 13, K = 17, R = 3;
    const auto w = testing::random_matrix(N, K, 1);
    const auto x = testing::random_matrix(M, K, 2);
    const auto bias = testing::random_matrix(1, N, 3);
    const auto res = testing::random_matrix(M, N, 4);
    const auto u = testing::random_matrix(M, R, 5);
    const auto b = testing::random_matrix(N, R, 6);
    const compress::dense_f32 f(w);
    kernels::epilogue ep;
    ep.bias = bias.data();
    ep.act = kernels::activation::relu;
    ep.residual = res.data();
    ep.ld_residual = N;
    ep.lowrank_u = u.data(), ep.ld_u = R, ep.lowrank_b = b.data(), ep.ld_b = R, ep.rank = R, ep.lowrank_scale = 0.5;
    MatD pre = testing::to_double(x) * testing::to_double(w).transpose() +
               MatD::Ones(M, 1) * testing::to_double(bias) +
               0.5 * testing::to_double(u) * testing::to_double(b).transpose();
    const MatD ref = pre.cwiseMax(0.0) + testing::to_double(res);
    const auto dy = testing::random_matrix(M, N, 7);
    const MatD ref_t = testing::to_double(dy) * testing::to_double(w);
    testing::for_each_isa([&](arch::isa i) {
        Matrix<float> y(M, N), dx(M, K);
        f.matmul(x, y, ep);
        CHECK(testing::rel_error(y, ref) <= 1e-6);
        Matrix<float> y2(M, N);
        arch::dispatch([&](auto tag) { compress::matmul_on(tag, f, x, y2, ep); });
        CHECK(testing::rel_error(y2, ref) <= 1e-6);
        f.matmul_t(dy, dx);
        CHECK(testing::rel_error(dx, ref_t) <= 1e-6);
    });
}

TEST_CASE("dense_f32 rejects mismatched operands") {
    const compress::dense_f32 f(testing::random_matrix(4, 6, 1));
    Matrix<float> x(2, 5), y(2, 4);
    CHECK_THROWS_AS(f.matmul(x, y, {}), shape_error);
    Matrix<float> dy(2, 3), dx(2, 6);
    CHECK_THROWS_AS(f.matmul_t(dy, dx), shape_error);
}

TEST_CASE("calibration is an empty container until filled") {
    compress::calibration c;
    CHECK(c.channels() == 0);
    CHECK(!c.has_hessian());
    c.sum_sq.assign(8, 0.0);
    c.hessian = Matrix<double>(8, 8);
    CHECK(c.channels() == 8);
    CHECK(c.has_hessian());
}

}  // namespace cpet_test_compress_dense
