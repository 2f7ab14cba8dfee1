// Pruning into the sparse formats: N:M invariants (exactly N kept per group, the N best scores), magnitude vs
// Wanda selection, unstructured target sparsity (global for magnitude, per row for Wanda), round trips through the
// packed layouts (fp32 exact, int8 within half a step), bytes, and the errors of bad input (nothing half-built).
#include "cpet/compress/prune.hpp"

#include <cmath>
#include <limits>
#include <set>

#include "support/testing.hpp"

namespace cpet_test_compress_prune {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using compress::nm_pattern;
using compress::sparsity_score;
using compress::sparse_values;

namespace {

/// Calibration whose channel norms are `norms` (sum_sq = norm² · samples).
compress::calibration calib_with(const std::vector<double>& norms, std::int64_t samples = 8) {
    compress::calibration c;
    c.samples = samples;
    for (double v : norms) c.sum_sq.push_back(v * v * double(samples));
    return c;
}

std::vector<double> random_norms(index_t k, unsigned seed) {
    std::mt19937 gen(seed);
    std::uniform_real_distribution<double> d(0.05, 4.0);
    std::vector<double> v(static_cast<std::size_t>(k));
    for (auto& x : v) x = d(gen);
    return v;
}

/// Checks the N:M invariants of mask/packed weights against the scores |w|·norm.
void check_nm(const Matrix<float>& w, const compress::nm_sparse_weights& s, const std::vector<std::uint8_t>& keep,
              nm_pattern pat, const std::vector<double>& norm) {
    const index_t n = w.rows(), k = w.cols();
    REQUIRE(s.rows() == n);
    REQUIRE(s.cols() == k);
    REQUIRE(s.slots() == k / pat.m * pat.n);
    for (index_t r = 0; r < n; ++r)
        for (index_t g = 0; g < k / pat.m; ++g) {
            int kept = 0;
            double worst_kept = std::numeric_limits<double>::infinity(), best_pruned = -1.0;
            for (int e = 0; e < pat.m; ++e) {
                const index_t c = g * pat.m + e;
                const double sc = std::abs(double(w(r, c))) * norm[static_cast<std::size_t>(c)];
                if (keep[static_cast<std::size_t>(r * k + c)]) {
                    ++kept;
                    worst_kept = std::min(worst_kept, sc);
                } else {
                    best_pruned = std::max(best_pruned, sc);
                }
            }
            CHECK(kept == pat.n);
            CHECK(worst_kept >= best_pruned);
            // packed: N distinct in-group indices, ascending, exactly the mask's
            std::set<int> seen;
            int prev = -1;
            for (int j = 0; j < pat.n; ++j) {
                const int idx = s.kept_index(r, g * pat.n + j);
                CHECK(idx > prev);
                prev = idx;
                CHECK(keep[static_cast<std::size_t>(r * k + g * pat.m + idx)] == 1);
                seen.insert(idx);
            }
            CHECK(static_cast<int>(seen.size()) == pat.n);
        }
}

}  // namespace

TEST_CASE("N:M magnitude pruning keeps exactly N of every M, the largest, and round-trips exactly") {
    for (nm_pattern pat : {nm_pattern{2, 4}, nm_pattern{1, 4}, nm_pattern{4, 8}, nm_pattern{1, 2}, nm_pattern{3, 8},
                           nm_pattern{5, 16}, nm_pattern{4, 4}}) {
        CAPTURE(pat.n);
        CAPTURE(pat.m);
        for (index_t n : {1, 7, 33}) {
            const index_t k = pat.m * 5;
            const auto w = testing::random_matrix(n, k, 11 + unsigned(n));
            const auto keep = compress::nm_mask(w.view(), pat);
            const auto s = compress::nm_sparse_weights::from_mask(w.view(), keep.data(), pat.n, pat.m);
            check_nm(w, s, keep, pat, std::vector<double>(static_cast<std::size_t>(k), 1.0));
            const auto d = s.to_dense();
            for (index_t r = 0; r < n; ++r)
                for (index_t c = 0; c < k; ++c)
                    CHECK(d(r, c) == (keep[static_cast<std::size_t>(r * k + c)] ? w(r, c) : 0.f));
            const auto viaprune = compress::prune_nm(w.view(), pat);
            CHECK(testing::max_abs_error(viaprune.to_dense().view(), testing::to_double(d.view())) == 0.0);
        }
    }
}

TEST_CASE("2:4 storage: half the values plus 2 bits each, never the dense matrix") {
    const index_t n = 64, k = 256;
    const auto w = testing::random_matrix(n, k, 3);
    const auto s = compress::prune_nm(w.view(), {2, 4});
    CHECK(s.index_bits() == 2);
    CHECK(s.indices_per_word() == 16);
    const std::size_t expect = std::size_t(n * k / 2) * 4 + std::size_t(n * k / 2) / 4;  // fp32 + 2 bits
    CHECK(s.bytes() == expect);
    const auto q = compress::prune_nm(w.view(), {2, 4}, sparsity_score::magnitude, nullptr, sparse_values::int8);
    CHECK(q.bytes() == std::size_t(n * k / 2) + std::size_t(n * k / 2) / 4 + std::size_t(n) * 4);
    // 4:8 packs 10 three-bit indices per word
    const auto s48 = compress::prune_nm(w.view(), {4, 8});
    CHECK(s48.index_bits() == 3);
    CHECK(s48.indices_per_word() == 10);
}

TEST_CASE("N:M int8 values: dequantised within half a step of the kept fp32 weights") {
    const auto w = testing::random_matrix(19, 64, 5);
    const auto f = compress::prune_nm(w.view(), {2, 4});
    const auto q = compress::prune_nm(w.view(), {2, 4}, sparsity_score::magnitude, nullptr, sparse_values::int8);
    const auto df = f.to_dense(), dq = q.to_dense();
    for (index_t r = 0; r < w.rows(); ++r) {
        float amax = 0.f;
        for (index_t c = 0; c < w.cols(); ++c) amax = std::max(amax, std::abs(df(r, c)));
        const float step = amax / 127.f;
        for (index_t c = 0; c < w.cols(); ++c) {
            CHECK(std::abs(df(r, c) - dq(r, c)) <= 0.5f * step * 1.0001f);
            if (df(r, c) == 0.f) CHECK(dq(r, c) == 0.f);
        }
    }
    // an all-zero row quantises to exactly zero
    Matrix<float> z(3, 8);
    z.fill(0.f);
    const auto qz = compress::prune_nm(z.view(), {2, 4}, sparsity_score::magnitude, nullptr, sparse_values::int8);
    const auto dz = qz.to_dense();
    for (index_t i = 0; i < dz.size(); ++i) CHECK(dz.data()[i] == 0.f);
}

TEST_CASE("Wanda N:M ranks by |W|·‖X‖ and differs from magnitude when the channel norms disagree") {
    const index_t n = 9, k = 32;
    const auto w = testing::random_matrix(n, k, 7);
    const auto norms = random_norms(k, 8);
    const auto c = calib_with(norms);
    const auto keep = compress::nm_mask(w.view(), {2, 4}, sparsity_score::wanda, &c);
    const auto s = compress::prune_nm(w.view(), {2, 4}, sparsity_score::wanda, &c);
    check_nm(w, s, keep, {2, 4}, norms);
    CHECK(compress::nm_mask(w.view(), {2, 4}) != keep);
    // the number of samples does not change the ranking
    const auto c1000 = calib_with(norms, 1000);
    CHECK(compress::nm_mask(w.view(), {2, 4}, sparsity_score::wanda, &c1000) == keep);
}

TEST_CASE("unstructured pruning reaches the target: global for magnitude, per row for Wanda") {
    const index_t n = 33, k = 70;
    const auto w = testing::random_matrix(n, k, 9);
    for (double sp : {0.0, 0.5, 0.7, 0.9, 0.95}) {
        CAPTURE(sp);
        const auto keep = compress::unstructured_mask(w.view(), sp);
        index_t kept = 0;
        double worst_kept = 1e30, best_pruned = -1;
        for (index_t i = 0; i < n * k; ++i) {
            const double a = std::abs(double(w.data()[i]));
            if (keep[static_cast<std::size_t>(i)]) {
                ++kept;
                worst_kept = std::min(worst_kept, a);
            } else {
                best_pruned = std::max(best_pruned, a);
            }
        }
        CHECK(kept == std::llround((1.0 - sp) * double(n * k)));
        CHECK(worst_kept >= best_pruned);
        const auto s = compress::prune_unstructured(w.view(), sp);
        CHECK(s.nnz() == kept);
        const auto d = s.to_dense();
        for (index_t r = 0; r < n; ++r)
            for (index_t c2 = 0; c2 < k; ++c2)
                CHECK(d(r, c2) == (keep[static_cast<std::size_t>(r * k + c2)] ? w(r, c2) : 0.f));

        const auto norms = random_norms(k, 10);
        const auto cal = calib_with(norms);
        const auto kw = compress::unstructured_mask(w.view(), sp, sparsity_score::wanda, &cal);
        for (index_t r = 0; r < n; ++r) {
            index_t kr = 0;
            double wk = 1e30, bp = -1;
            for (index_t c2 = 0; c2 < k; ++c2) {
                const double sc = std::abs(double(w(r, c2))) * norms[static_cast<std::size_t>(c2)];
                if (kw[static_cast<std::size_t>(r * k + c2)]) {
                    ++kr;
                    wk = std::min(wk, sc);
                } else {
                    bp = std::max(bp, sc);
                }
            }
            CHECK(kr == std::llround((1.0 - sp) * double(k)));
            CHECK(wk >= bp);
        }
        const auto sw = compress::prune_unstructured(w.view(), sp, sparsity_score::wanda, &cal);
        CHECK(sw.nnz() == n * std::llround((1.0 - sp) * double(k)));
        // per-row targets: every panel's rows hold the same count, so SELL stores no padding
        CHECK(sw.bytes() == std::size_t(sw.nnz()) * 6 + std::size_t(sw.panels() + 1) * sizeof(index_t) +
                                std::size_t(sw.panels() * 16 - n) * std::size_t(std::llround((1.0 - sp) * double(k))) * 6);
    }
}

TEST_CASE("bad input: clear errors, nothing half-built") {
    const auto w = testing::random_matrix(8, 12, 1);
    auto good = compress::prune_nm(w.view(), {2, 4});
    const auto before = good.to_dense();

    // N:M block that does not divide K, unsupported patterns
    CHECK_THROWS_AS(good = compress::prune_nm(w.view(), {4, 8}), shape_error);
    CHECK_THROWS_WITH_AS(compress::prune_nm(w.view(), {4, 8}),
                         doctest::Contains("does not divide the input dimension K = 12"), shape_error);
    CHECK_THROWS_AS(compress::prune_nm(w.view(), {1, 3}), shape_error);
    CHECK_THROWS_AS(compress::prune_nm(w.view(), {0, 4}), shape_error);
    CHECK_THROWS_AS(compress::prune_nm(w.view(), {5, 4}), shape_error);
    CHECK_THROWS_AS(compress::prune_nm(ConstMatrixView<float>(w.data(), 0, 12), {2, 4}), shape_error);

    // NaN / Inf weights
    for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
        auto wb = w;
        wb(3, 5) = bad;
        CHECK_THROWS_AS(good = compress::prune_nm(wb.view(), {2, 4}), numeric_error);
        CHECK_THROWS_AS(compress::prune_unstructured(wb.view(), 0.5), numeric_error);
        std::vector<std::uint8_t> all(static_cast<std::size_t>(wb.size()), 1);
        CHECK_THROWS_AS(compress::unstructured_sparse_weights::from_mask(wb.view(), all.data()), numeric_error);
    }

    // a mask that breaks the N:M invariant
    auto keep = compress::nm_mask(w.view(), {2, 4});
    keep[0] = keep[1] = keep[2] = 1;
    CHECK_THROWS_AS(compress::nm_sparse_weights::from_mask(w.view(), keep.data(), 2, 4), format_error);

    // Wanda calibration: missing, empty, wrong channel count, NaN / negative sums
    CHECK_THROWS_AS(compress::prune_nm(w.view(), {2, 4}, sparsity_score::wanda, nullptr), shape_error);
    compress::calibration empty;
    CHECK_THROWS_WITH_AS(compress::prune_nm(w.view(), {2, 4}, sparsity_score::wanda, &empty),
                         doctest::Contains("empty"), shape_error);
    auto c = calib_with(std::vector<double>(12, 1.0));
    c.samples = 0;
    CHECK_THROWS_AS(compress::prune_nm(w.view(), {2, 4}, sparsity_score::wanda, &c), shape_error);
    auto c2 = calib_with(std::vector<double>(11, 1.0));
    CHECK_THROWS_AS(compress::prune_unstructured(w.view(), 0.5, sparsity_score::wanda, &c2), shape_error);
    auto c3 = calib_with(std::vector<double>(12, 1.0));
    c3.sum_sq[4] = std::numeric_limits<double>::quiet_NaN();
    CHECK_THROWS_AS(good = compress::prune_nm(w.view(), {2, 4}, sparsity_score::wanda, &c3), numeric_error);
    c3.sum_sq[4] = -1.0;
    CHECK_THROWS_AS(compress::prune_unstructured(w.view(), 0.5, sparsity_score::wanda, &c3), numeric_error);

    // sparsity outside [0, 1)
    CHECK_THROWS_AS(compress::prune_unstructured(w.view(), 1.0), shape_error);
    CHECK_THROWS_AS(compress::prune_unstructured(w.view(), -0.1), shape_error);
    CHECK_THROWS_AS(compress::prune_unstructured(w.view(), std::nan("")), shape_error);

    // K too large for 16-bit columns
    Matrix<float> wide(1, 65537);
    wide.fill(1.f);
    CHECK_THROWS_AS(compress::prune_unstructured(wide.view(), 0.5), shape_error);

    // the object assigned to before every failure is untouched
    const auto after = good.to_dense();
    CHECK(testing::max_abs_error(after.view(), testing::to_double(before.view())) == 0.0);
}

TEST_CASE("the N:M compression policy produces a WeightFormat") {
    const auto w = testing::random_matrix(20, 16, 2);
    const auto f = compress::nm_sparse<2, 4>::compress(w.view(), nullptr);
    CHECK(f.out_features() == 20);
    CHECK(f.in_features() == 16);
    const auto x = testing::random_matrix(3, 16, 4);
    Matrix<float> y(3, 20), dx(3, 16);
    f.matmul(x.view(), y.view(), {});
    const testing::MatD ref = testing::to_double(x.view()) * testing::to_double(f.to_dense().view()).transpose();
    CHECK(testing::rel_error(y.view(), ref) < 1e-6);
    const auto dy = testing::random_matrix(3, 20, 6);
    f.matmul_t(dy.view(), dx.view());
    const testing::MatD refdx = testing::to_double(dy.view()) * testing::to_double(f.to_dense().view());
    CHECK(testing::rel_error(dx.view(), refdx) < 1e-6);
}

TEST_CASE("the unstructured compression policy prunes its share and multiplies like its dense copy") {
    const auto w = testing::random_matrix(33, 40, 8);
    using P = compress::unstructured_sparse<70>;
    CHECK(P::name() == "unstructured70_magnitude");
    CHECK(compress::nm_sparse<2, 4, compress::sparsity_score::wanda, compress::sparse_values::int8>::name() ==
          "nm2:4_wanda_int8");
    const auto f = P::compress(w.view(), nullptr);
    const Matrix<float> d = f.to_dense();
    index_t zeros = 0;
    for (index_t i = 0; i < d.size(); ++i) zeros += d.data()[i] == 0.f;
    CHECK(zeros == d.size() - index_t(std::llround(0.3 * double(d.size()))));
    // what is kept is the original value
    for (index_t i = 0; i < d.size(); ++i)
        if (d.data()[i] != 0.f) CHECK(d.data()[i] == w.data()[i]);
    const auto x = testing::random_matrix(7, 40, 9);
    Matrix<float> y(7, 33);
    f.matmul(x.view(), y.view(), {});
    const testing::MatD ref = testing::to_double(x.view()) * testing::to_double(d.view()).transpose();
    CHECK(testing::rel_error(y.view(), ref) < 1e-6);
    // Wanda needs the calibration's Σx²
    CHECK_THROWS_AS((compress::unstructured_sparse<50, compress::sparsity_score::wanda>::compress(w.view(), nullptr)),
                    cpet::error);
}

TEST_CASE("sparse matmul_t: dx = dy·W block by block for N:M (fp32, int8) and unstructured weights") {
    struct shape { index_t m, n, k; };
    for (auto s : {shape{1, 4, 8}, shape{7, 33, 16}, shape{40, 300, 24}, shape{17, 37, 64}}) {
        const auto w = testing::random_matrix(s.n, s.k, 91);
        const auto dy = testing::random_matrix(s.m, s.n, 92);
        auto check = [&](const auto& f, const char* what) {
            const testing::MatD ref = testing::to_double(dy) * testing::to_double(f.to_dense());
            Matrix<float> dx(s.m, s.k);
            f.matmul_t(dy, dx);
            CAPTURE(what);
            CAPTURE(s.m);
            CAPTURE(s.n);
            CHECK(testing::rel_error(dx, ref) < 1e-5);
        };
        check(compress::nm_sparse<2, 4>::compress(w), "2:4 fp32");
        check(compress::nm_sparse<2, 4, compress::sparsity_score::magnitude, compress::sparse_values::int8>::compress(w),
              "2:4 int8");
        check(compress::unstructured_sparse<60>::compress(w), "unstructured 60%");
    }
}

}  // namespace cpet_test_compress_prune
