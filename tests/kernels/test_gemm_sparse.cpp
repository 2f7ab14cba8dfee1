// Sparse GEMM kernels (N:M fp32, N:M int8, unstructured SELL-16) on every ISA path against an Eigen double product
// with the dense-with-zeros (dequantised) matrix: awkward shapes, strided x / y with guard cells untouched, the
// epilogue, 1 vs 2 threads (bit-identical), and the errors of bad calls.
#include "cpet/compress/prune.hpp"
#include "cpet/kernels/gemm_sparse.hpp"

#include <cmath>
#include <limits>

#include "support/testing.hpp"

namespace cpet_test_kernels_gemm_sparse {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using compress::nm_pattern;
using compress::sparsity_score;
using compress::sparse_values;

namespace {

constexpr float guard = -12345.f;

/// y with guard columns on the right and a guard row below, all set to `guard`.
struct guarded {
    Matrix<float> store;
    index_t m, n;
    guarded(index_t m_, index_t n_) : store(m_ + 1, n_ + 3), m(m_), n(n_) { store.fill(guard); }
    MatrixView<float> view() { return MatrixView<float>(store.data(), m, n, store.cols()); }
    bool guards_intact() const {
        for (index_t r = 0; r < store.rows(); ++r)
            for (index_t c = 0; c < store.cols(); ++c)
                if ((r >= m || c >= n) && store(r, c) != guard) return false;
        return true;
    }
};

/// max_ij |got − ref| / (|x|·|W|ᵀ + |bias| + |residual|)_ij: accumulation error relative to the magnitudes summed.
double scaled_error(ConstMatrixView<float> got, const testing::MatD& ref, ConstMatrixView<float> x,
                    const Matrix<float>& wd, const std::vector<float>& bias) {
    const testing::MatD mag = testing::to_double(x).cwiseAbs() * testing::to_double(wd.view()).cwiseAbs().transpose();
    double worst = 0;
    for (index_t r = 0; r < ref.rows(); ++r)
        for (index_t c = 0; c < ref.cols(); ++c) {
            const double denom = mag(r, c) + std::abs(bias[static_cast<std::size_t>(c)]) + 1e-30;
            worst = std::max(worst, std::abs(double(got(r, c)) - ref(r, c)) / denom);
        }
    return worst;
}

/// y = x·Wᵀ + bias in double.
testing::MatD reference(ConstMatrixView<float> x, const Matrix<float>& wd, const std::vector<float>& bias) {
    Eigen::setNbThreads(1);
    testing::MatD y = testing::to_double(x) * testing::to_double(wd.view()).transpose();
    for (index_t r = 0; r < y.rows(); ++r)
        for (index_t c = 0; c < y.cols(); ++c) y(r, c) += bias[static_cast<std::size_t>(c)];
    return y;
}

/// x [m, k] inside a larger buffer (row stride k + 5) — the kernels must honour the stride.
struct strided_x {
    Matrix<float> store;
    ConstMatrixView<float> view;
    strided_x(index_t m, index_t k, unsigned seed)
        : store(testing::random_matrix(m, k + 5, seed)), view(store.data(), m, k, k + 5) {}
};

std::vector<float> random_bias(index_t n, unsigned seed) {
    const auto b = testing::random_matrix(1, n, seed);
    return std::vector<float>(b.data(), b.data() + n);
}

/// One kernel call through compress::matmul against the reference, with guard cells.
template <class Packed>
void check_one(const Packed& s, index_t m, unsigned seed) {
    const index_t n = s.rows(), k = s.cols();
    strided_x x(m, k, seed);
    const auto bias = random_bias(n, seed + 1);
    const Matrix<float> wd = s.to_dense();
    const testing::MatD ref = reference(x.view, wd, bias);
    guarded y(m, n);
    kernels::epilogue ep;
    ep.bias = bias.data();
    compress::matmul(x.view, s, y.view(), ep);
    CHECK(scaled_error(y.view(), ref, x.view, wd, bias) < 2e-6);
    CHECK(y.guards_intact());
}

}  // namespace

TEST_CASE("N:M fp32 and int8 kernels match the dense reference on every path and awkward shape") {
    // M >= kernels::sparse_detail::nm_lanes_m_threshold<Arch> (48 on AVX-512, 16 on AVX2) takes the x-rows-in-lanes
    // kernel on SIMD paths; below it AVX2 runs 8-wide x blocks (4 rows a tile) for groups of M <= 8 and 16-wide
    // ones (2 rows) for 3:16, so 1, 7, 8, 9 cover the tile tails of both, 33 and 47 the AVX-512 small-M kernel's
    // largest M and AVX2's lanes kernel, 48 and up the lanes kernel on both
    const std::vector<index_t> ms{1, 7, 8, 9, 33, 47, 48, 65, 128};
    const std::vector<index_t> ns{1, 7, 33, 127};
    for (nm_pattern pat : {nm_pattern{2, 4}, nm_pattern{1, 4}, nm_pattern{4, 8}, nm_pattern{1, 2}, nm_pattern{3, 16}}) {
        CAPTURE(pat.n);
        CAPTURE(pat.m);
        std::vector<index_t> ks;
        for (index_t k : {4, 8, 12, 16, 20, 36, 48, 260}) {
            if (k % pat.m == 0) ks.push_back(k);
            else if (pat.m == 8 || pat.m == 16) ks.push_back((k / pat.m + 1) * pat.m);
        }
        unsigned seed = 100;
        for (index_t n : ns)
            for (index_t k : ks) {
                const auto w = testing::random_matrix(n, k, ++seed);
                const auto f = compress::prune_nm(w.view(), pat);
                const auto q = compress::prune_nm(w.view(), pat, sparsity_score::magnitude, nullptr, sparse_values::int8);
                testing::for_each_isa([&](arch::isa) {
                    for (index_t m : ms) {
                        // the full cartesian product only for the smaller K (keeps the sanitizer run short)
                        if (k > 48 && m != 1 && m != 9 && m != 65) continue;
                        CAPTURE(m);
                        CAPTURE(n);
                        CAPTURE(k);
                        check_one(f, m, seed * 7 + unsigned(m));
                        check_one(q, m, seed * 11 + unsigned(m));
                    }
                });
            }
    }
}

TEST_CASE("N:M small-M panel groups: panel counts that do not divide into groups, 1 and 2 threads") {
    // Below the lanes threshold S = 4 or 2 consecutive panels run side by side (nm_group_streams: AVX-512 4 up to 4
    // rows, 2 up to 8; AVX2 2 for one row), the last group short. Panel counts 1–13 (the last panel partial) put
    // every remainder after full groups; M covers each S and the row tiles below it; 2:4 (4-wide x block), 4:8
    // (8-wide on AVX2) and 3:16 (16-wide), fp32 and int8. Then 2:4 with enough work to start threads (≥ 1e6 kept
    // multiply-adds), so the groups split over 2 threads.
    unsigned seed = 900;
    const auto run = [&](nm_pattern pat, index_t panels, index_t k, std::initializer_list<index_t> ms) {
        const index_t n = panels * kernels::sparse_panel_rows - (panels % 3);
        CAPTURE(pat.m);
        CAPTURE(n);
        CAPTURE(k);
        const auto w = testing::random_matrix(n, k, ++seed);
        const auto f = compress::prune_nm(w.view(), pat);
        const auto q = compress::prune_nm(w.view(), pat, sparsity_score::magnitude, nullptr, sparse_values::int8);
        testing::for_each_isa([&](arch::isa) {
            for (index_t m : ms) {
                CAPTURE(m);
                check_one(f, m, seed * 13 + unsigned(m));
                check_one(q, m, seed * 17 + unsigned(m));
            }
        });
    };
    set_num_threads(1);
    for (nm_pattern pat : {nm_pattern{2, 4}, nm_pattern{4, 8}, nm_pattern{3, 16}})
        for (index_t panels = 1; panels <= 13; ++panels) run(pat, panels, 48, {1, 2, 3, 4, 5, 6, 8, 9});
    set_num_threads(2);
    for (index_t panels : {5, 6, 7, 13}) run({2, 4}, panels, 9600, {1, 4, 8});
    set_num_threads(max_threads());
}

TEST_CASE("large-M N:M kernel: every row-block width, K blocks with a tail, several panel chunks") {
    // M >= 48 on SIMD paths: blocks of MV·L rows of x (MV = 8 on AVX-512, 4 on AVX2; the last block takes the MV
    // that covers it), K in blocks of kernels::sparse_detail::nm_t_kc with a shorter last block, panels in chunks
    // (32 panels at MV = 8 on AVX-512), finished chunks stored row segment by row segment.
    const std::vector<index_t> ms{48, 49, 63, 127, 128, 129, 200, 257};
    unsigned seed = 700;
    for (nm_pattern pat : {nm_pattern{2, 4}, nm_pattern{1, 4}, nm_pattern{4, 8}, nm_pattern{3, 16}}) {
        CAPTURE(pat.n);
        CAPTURE(pat.m);
        // K: one block plus a tail, and several blocks plus a tail (multiples of the group M)
        for (index_t k : {kernels::sparse_detail::nm_t_kc + 16, 3 * kernels::sparse_detail::nm_t_kc + 16})
            for (index_t n : {7, 33, 1100}) {
                if (n == 1100 && k > kernels::sparse_detail::nm_t_kc + 16) continue;  // keeps the run short
                const auto w = testing::random_matrix(n, k, ++seed);
                const auto f = compress::prune_nm(w.view(), pat);
                const auto q = compress::prune_nm(w.view(), pat, sparsity_score::magnitude, nullptr, sparse_values::int8);
                testing::for_each_isa([&](arch::isa) {
                    for (index_t m : ms) {
                        if (n == 1100 && m != 200) continue;
                        CAPTURE(m);
                        CAPTURE(n);
                        CAPTURE(k);
                        check_one(f, m, seed * 13 + unsigned(m));
                        check_one(q, m, seed * 17 + unsigned(m));
                    }
                });
            }
    }
}

TEST_CASE("unstructured SELL-16 kernel matches the dense reference on every path") {
    unsigned seed = 300;
    for (double sp : {0.0, 0.5, 0.9, 0.99})
        for (index_t n : {1, 7, 33, 127})
            for (index_t k : {1, 5, 64, 260}) {
                const auto w = testing::random_matrix(n, k, ++seed);
                const auto s = compress::prune_unstructured(w.view(), sp);
                testing::for_each_isa([&](arch::isa) {
                    for (index_t m : {1, 7, 8, 9, 33, 65, 128}) {  // >= 48: the x-rows-in-lanes kernel
                        if (k > 64 && m != 1 && m != 9 && m != 65) continue;
                        CAPTURE(sp);
                        CAPTURE(m);
                        CAPTURE(n);
                        CAPTURE(k);
                        check_one(s, m, seed * 5 + unsigned(m));
                    }
                });
            }
}

TEST_CASE("epilogue: bias, activation and an aliased residual on every path") {
  for (index_t m : {9, 70}) {  // 70: the large-M N:M kernel
    CAPTURE(m);
    const index_t n = 37, k = 64;
    const auto w = testing::random_matrix(n, k, 1);
    const auto f = compress::prune_nm(w.view(), {2, 4});
    const auto u = compress::prune_unstructured(w.view(), 0.8);
    const auto x = testing::random_matrix(m, k, 2);
    const auto bias = random_bias(n, 3);
    const auto res = testing::random_matrix(m, n, 4);
    for (int which = 0; which < 2; ++which) {
        const Matrix<float> wd = which == 0 ? f.to_dense() : u.to_dense();
        testing::MatD ref = reference(x.view(), wd, bias);
        for (index_t r = 0; r < m; ++r)
            for (index_t c = 0; c < n; ++c) ref(r, c) = std::max(ref(r, c), 0.0) + res(r, c);
        testing::for_each_isa([&](arch::isa) {
            Matrix<float> y = res;  // residual aliases y
            kernels::epilogue ep;
            ep.bias = bias.data();
            ep.act = kernels::activation::relu;
            ep.residual = y.data();
            ep.ld_residual = n;
            if (which == 0)
                compress::matmul(x.view(), f, y.view(), ep);
            else
                compress::matmul(x.view(), u, y.view(), ep);
            CHECK(testing::max_abs_error(y.view(), ref) < 1e-4);
        });
    }
  }
}

TEST_CASE("1 and 2 threads give identical results") {
  // enough kept multiply-adds to start threads; M = 8 takes the output-rows-in-lanes kernel, M = 64 the x-rows one
  for (index_t m : {8, 64}) {
    CAPTURE(m);
    const index_t n = 256, k = 512;
    const auto w = testing::random_matrix(n, k, 5);
    const auto f = compress::prune_nm(w.view(), {2, 4});
    const auto q = compress::prune_nm(w.view(), {2, 4}, sparsity_score::magnitude, nullptr, sparse_values::int8);
    const auto u = compress::prune_unstructured(w.view(), 0.7);
    const auto x = testing::random_matrix(m, k, 6);
    const auto run = [&](int threads, int which) {
        set_num_threads(threads);
        Matrix<float> y(m, n);
        if (which == 0) compress::matmul(x.view(), f, y.view());
        if (which == 1) compress::matmul(x.view(), q, y.view());
        if (which == 2) compress::matmul(x.view(), u, y.view());
        return y;
    };
    for (int which = 0; which < 3; ++which) {
        const auto a = run(1, which), b = run(2, which);
        CHECK(testing::max_abs_error(a.view(), testing::to_double(b.view())) == 0.0);
        CHECK(testing::rel_error(a.view(), reference(x.view(), which == 0 ? f.to_dense() : which == 1 ? q.to_dense()
                                                                                                   : u.to_dense(),
                                                     std::vector<float>(std::size_t(n), 0.f))) < 1e-5);
    }
  }
  set_num_threads(max_threads());
}

TEST_CASE("bad calls: wrong shapes, a low-rank term, inconsistent views") {
    const auto w = testing::random_matrix(8, 16, 1);
    const auto f = compress::prune_nm(w.view(), {2, 4});
    const auto u = compress::prune_unstructured(w.view(), 0.5);
    const auto x = testing::random_matrix(2, 16, 2);
    const auto xbad = testing::random_matrix(2, 12, 2);
    Matrix<float> y(2, 8), ybad(3, 8);
    CHECK_THROWS_AS(compress::matmul(xbad.view(), f, y.view()), shape_error);
    CHECK_THROWS_AS(compress::matmul(x.view(), f, ybad.view()), shape_error);
    CHECK_THROWS_AS(compress::matmul(xbad.view(), u, y.view()), shape_error);
    kernels::epilogue ep;
    ep.rank = 2;
    CHECK_THROWS_AS(compress::matmul(x.view(), f, y.view(), ep), format_error);
    CHECK_THROWS_AS(compress::matmul(x.view(), compress::nm_sparse_weights{}, y.view()), format_error);
    auto v = compress::kernel_view(f);
    v.group = 3;
    CHECK_THROWS_AS(kernels::gemm_nm(x.view(), v, y.view()), format_error);
    // M = 0 is a no-op
    Matrix<float> x0(0, 16), y0(0, 8);
    CHECK_NOTHROW(compress::matmul(x0.view(), f, y0.view()));
}

}  // namespace cpet_test_kernels_gemm_sparse
