// tests/kernels/test_gemm_f32.cpp — fp32 GEMM y = act(x·Wᵀ + bias + s·U·Bᵀ) + residual and dx = dy·W against an
// Eigen double-precision reference, on every ISA path, over awkward shapes, strided views, every epilogue
// feature, 1 and 2 threads, the GEMV boundary (M <= 8) and bad input.
#include "support/testing.hpp"

#include <cmath>
#include <limits>
#include <optional>
#include <string>

#include "cpet/core/parallel.hpp"
#include "cpet/kernels/gemm_f32.hpp"

namespace cpet_test_kernels_gemm_f32 {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using namespace cpet::kernels;
using testing::MatD;

namespace {

constexpr double tol = 1e-5;

double activate_ref(activation a, double x) {
    switch (a) {
        case activation::relu: return x > 0 ? x : 0;
        case activation::gelu_erf: return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0)));
        case activation::gelu_tanh:
            return 0.5 * x * (1 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
        case activation::silu: return x / (1 + std::exp(-x));
        default: return x;
    }
}

/// Operands of one call; the epilogue points into them.
struct problem {
    Matrix<float> x, w, bias, u, b, residual;
    float scale = 1.f;
    activation act = activation::none;
    index_t rank = 0;
    bool use_bias = false, use_residual = false;

    problem(index_t m, index_t n, index_t k, unsigned seed) : x(testing::random_matrix(m, k, seed)),
                                                              w(testing::random_matrix(n, k, seed + 1)) {}
    void with_bias() {
        bias = testing::random_matrix(1, w.rows(), 77);
        use_bias = true;
    }
    void with_lowrank(index_t r, float s) {
        rank = r;
        scale = s;
        u = testing::random_matrix(x.rows(), r, 78);
        b = testing::random_matrix(w.rows(), r, 79);
    }
    void with_residual() {
        residual = testing::random_matrix(x.rows(), w.rows(), 80);
        use_residual = true;
    }
    epilogue ep() const {
        epilogue e;
        e.act = act;
        if (use_bias) e.bias = bias.data();
        if (use_residual) {
            e.residual = residual.data();
            e.ld_residual = residual.stride();
        }
        if (rank) {
            e.rank = rank;
            e.lowrank_u = u.data();
            e.ld_u = u.stride();
            e.lowrank_b = b.data();
            e.ld_b = b.stride();
            e.lowrank_scale = scale;
        }
        return e;
    }
    MatD reference() const {
        MatD acc = testing::to_double(x) * testing::to_double(w).transpose();
        if (use_bias) acc.rowwise() += testing::to_double(bias).row(0);
        if (rank) acc += double(scale) * testing::to_double(u) * testing::to_double(b).transpose();
        for (index_t i = 0; i < acc.rows(); ++i)
            for (index_t j = 0; j < acc.cols(); ++j) acc(i, j) = activate_ref(act, acc(i, j));
        if (use_residual) acc += testing::to_double(residual);
        return acc;
    }
};

/// A y view of rows × cols with row stride cols + pad inside a buffer with guard cells around it; checks
/// afterwards that nothing outside the view changed.
struct guarded_output {
    static constexpr float sentinel = -12345.f;
    static constexpr index_t guard = 40;
    std::vector<float> buf;
    index_t rows, cols, stride;
    guarded_output(index_t r, index_t c, index_t pad)
        : buf(static_cast<std::size_t>(2 * guard + r * (c + pad)), sentinel), rows(r), cols(c), stride(c + pad) {}
    MatrixView<float> view() { return {buf.data() + guard, rows, cols, stride}; }
    bool guards_intact() const {
        for (std::size_t i = 0; i < buf.size(); ++i) {
            const index_t off = static_cast<index_t>(i) - guard;
            const bool inside = off >= 0 && off < rows * stride && off % stride < cols;
            if (!inside && buf[i] != sentinel) return false;
        }
        return true;
    }
};

/// x copied into a view with row stride cols + pad (and garbage in the padding, which must never be read
/// into a result).
struct strided_input {
    std::vector<float> buf;
    ConstMatrixView<float> v;
    strided_input(const Matrix<float>& m, index_t pad)
        : buf(static_cast<std::size_t>(m.rows() * (m.cols() + pad) + 1), std::numeric_limits<float>::quiet_NaN()) {
        for (index_t r = 0; r < m.rows(); ++r)
            for (index_t c = 0; c < m.cols(); ++c) buf[static_cast<std::size_t>(r * (m.cols() + pad) + c)] = m(r, c);
        v = ConstMatrixView<float>(buf.data(), m.rows(), m.cols(), m.cols() + pad);
    }
};

/// Runs the problem through the checked entry with strided x and guarded, strided y; returns the rel. error.
double run_checked(const problem& pb, const packed_weights_f32& pw, index_t xpad = 3, index_t ypad = 5) {
    strided_input xs(pb.x, xpad);
    guarded_output y(pb.x.rows(), pb.w.rows(), ypad);
    gemm_f32(xs.v, pw, y.view(), pb.ep());
    CHECK(y.guards_intact());
    return testing::rel_error(y.view(), pb.reference());
}

struct thread_count {
    int saved = max_threads();
    explicit thread_count(int n) { set_num_threads(n); }
    ~thread_count() { set_num_threads(saved); }
};

}  // namespace

TEST_CASE("packed_weights_f32 packs into ISA-independent panels and unpacks exactly") {
    for (index_t n : {1, 31, 32, 33, 70})
        for (index_t k : {1, 5, 64, 130}) {
            const auto w = testing::random_matrix(n, k, 3);
            const packed_weights_f32 pw(w);
            CHECK(pw.rows() == n);
            CHECK(pw.cols() == k);
            CHECK(pw.panels() == (n + 31) / 32);
            CHECK(pw.bytes() == std::size_t(pw.panels() * 32 * k) * sizeof(float));
            const auto back = pw.unpack();
            CHECK(testing::max_abs_error(back, testing::to_double(w)) == 0.0);
        }
    // strided source
    const auto big = testing::random_matrix(20, 50, 4);
    const packed_weights_f32 pw(big.view().block(2, 3, 17, 40));
    CHECK(testing::max_abs_error(pw.unpack(), testing::to_double(big.view().block(2, 3, 17, 40))) == 0.0);
}

TEST_CASE("gemm_f32 matches the double reference over awkward shapes on every ISA") {
    const index_t sizes[] = {1, 7, 15, 16, 17, 33, 127};
    testing::for_each_isa([&](arch::isa) {
        for (index_t n : sizes)
            for (index_t k : sizes) {
                const problem base(1, n, k, 11);
                const packed_weights_f32 pw(base.w);
                for (index_t m : sizes) {
                    problem pb(m, n, k, unsigned(100 + m));
                    pb.w = base.w;
                    CAPTURE(m);
                    CAPTURE(n);
                    CAPTURE(k);
                    CHECK(run_checked(pb, pw) <= tol);
                }
            }
    });
}

TEST_CASE("gemm_f32 on larger shapes: several K slices, N blocks, M tails") {
    struct shape { index_t m, n, k; };
    for (auto s : {shape{130, 300, 257}, shape{9, 64, 1000}, shape{143, 97, 600}, shape{29, 1100, 70},
                   shape{200, 33, 513}}) {
        problem pb(s.m, s.n, s.k, 5);
        const packed_weights_f32 pw(pb.w);
        testing::for_each_isa([&](arch::isa) {
            CAPTURE(s.m);
            CAPTURE(s.n);
            CAPTURE(s.k);
            CHECK(run_checked(pb, pw) <= tol);
        });
    }
}

TEST_CASE("gemm_f32 across the GEMV boundary, M = 1..9") {
    for (index_t m = 1; m <= 9; ++m) {
        problem pb(m, 100, 700, unsigned(m));
        pb.with_bias();
        pb.with_lowrank(7, 0.5f);
        const packed_weights_f32 pw(pb.w);
        testing::for_each_isa([&](arch::isa) {
            CAPTURE(m);
            CHECK(run_checked(pb, pw) <= tol);
        });
    }
}

TEST_CASE("gemm_f32 GEMV streams: panel counts that do not divide into streams, 1 and 2 threads") {
    // The GEMV reads S panels at once (S = 4, 2 or 1 by the rows of x), each thread's panels cut into S runs and
    // the rest one at a time: panel counts 1..13 per call (with a partial last panel) on 1 and 2 threads put
    // every split, remainder and stream count on every path. K = 1100 keeps two threads worth starting.
    for (index_t n : {32, 64, 97, 128, 161, 357, 416})
        for (index_t m : {1, 2, 3, 4, 6, 8}) {
            problem pb(m, n, 1100, unsigned(7 * n + m));
            pb.with_bias();
            if (m % 2) pb.with_lowrank(5, 0.25f);
            const packed_weights_f32 pw(pb.w);
            for (int t : {1, 2}) {
                thread_count tc(t);
                testing::for_each_isa([&](arch::isa) {
                    CAPTURE(n);
                    CAPTURE(m);
                    CAPTURE(t);
                    CHECK(run_checked(pb, pw) <= tol);
                });
            }
        }
}

TEST_CASE("gemm_f32 epilogue: each feature alone and combined") {
    const activation acts[] = {activation::none, activation::relu, activation::gelu_erf, activation::gelu_tanh,
                               activation::silu};
    for (index_t m : {1, 5, 9, 37})
        for (index_t n : {33, 70}) {
            const index_t k = m == 37 ? 300 : 50;
            const packed_weights_f32 pw(problem(1, n, k, 21).w);
            auto make = [&] {
                problem pb(m, n, k, 22);
                pb.w = problem(1, n, k, 21).w;
                return pb;
            };
            testing::for_each_isa([&](arch::isa) {
                CAPTURE(m);
                CAPTURE(n);
                {
                    auto pb = make();
                    pb.with_bias();
                    CHECK(run_checked(pb, pw) <= tol);
                }
                for (auto a : acts) {
                    auto pb = make();
                    pb.act = a;
                    CAPTURE(std::string(activation_name(a)));
                    CHECK(run_checked(pb, pw) <= tol);
                }
                for (index_t r : {1, 7, 32}) {
                    auto pb = make();
                    pb.with_lowrank(r, 0.75f);
                    CAPTURE(r);
                    CHECK(run_checked(pb, pw) <= tol);
                }
                {
                    auto pb = make();
                    pb.with_residual();
                    CHECK(run_checked(pb, pw) <= tol);
                }
                for (auto a : acts) {  // everything at once
                    auto pb = make();
                    pb.with_bias();
                    pb.with_lowrank(7, -1.5f);
                    pb.with_residual();
                    pb.act = a;
                    CAPTURE(std::string(activation_name(a)));
                    CHECK(run_checked(pb, pw) <= tol);
                }
            });
        }
}

TEST_CASE("gemm_f32 residual may alias y (the transformer's x += f(x))") {
    for (index_t m : {3, 40})
        for (index_t k : {20, 600}) {
            problem pb(m, 50, k, 31);
            pb.with_bias();
            pb.with_lowrank(32, 0.25f);
            pb.with_residual();
            pb.act = activation::gelu_erf;
            const MatD ref = pb.reference();
            const packed_weights_f32 pw(pb.w);
            testing::for_each_isa([&](arch::isa) {
                CAPTURE(m);
                CAPTURE(k);
                Matrix<float> y(pb.residual.view());  // y starts as the residual, and the epilogue reads it there
                epilogue ep = pb.ep();
                ep.residual = y.data();
                ep.ld_residual = y.stride();
                gemm_f32(pb.x, pw, y, ep);
                CHECK(testing::rel_error(y, ref) <= tol);
            });
        }
}

TEST_CASE("gemm_f32 with 1 and 2 threads gives the reference") {
    struct shape { index_t m, n, k; };
    for (int threads : {1, 2}) {
        thread_count tc(threads);
        for (auto s : {shape{130, 300, 257}, shape{8, 300, 600}, shape{1, 1000, 600}, shape{300, 40, 100},
                       shape{64, 520, 300}}) {
            problem pb(s.m, s.n, s.k, 41);
            pb.with_bias();
            pb.with_lowrank(7, 0.5f);
            pb.with_residual();
            pb.act = activation::silu;
            const packed_weights_f32 pw(pb.w);
            testing::for_each_isa([&](arch::isa) {
                CAPTURE(threads);
                CAPTURE(s.m);
                CAPTURE(s.n);
                CHECK(run_checked(pb, pw) <= tol);
            });
        }
    }
}

TEST_CASE("the unchecked per-path body agrees with the checked entry") {
    problem pb(20, 45, 77, 51);
    pb.with_bias();
    const packed_weights_f32 pw(pb.w);
    const MatD ref = pb.reference();
    Matrix<float> y(20, 45);
    gemm_f32(arch::scalar{}, pb.x, pw, y, pb.ep());
    CHECK(testing::rel_error(y, ref) <= tol);
#if XSIMD_WITH_AVX512BW
    if (arch::available(arch::isa::avx512)) {
        gemm_f32(arch::avx512{}, pb.x, pw, y, pb.ep());
        CHECK(testing::rel_error(y, ref) <= tol);
    }
#endif
#if XSIMD_WITH_FMA3_AVX2
    if (arch::available(arch::isa::avx2)) {
        gemm_f32(arch::avx2{}, pb.x, pw, y, pb.ep());
        CHECK(testing::rel_error(y, ref) <= tol);
    }
#endif
}

TEST_CASE("gemm_f32_t computes dx = dy·W on every ISA") {
    struct shape { index_t m, n, k; };
    for (int threads : {1, 2}) {
        thread_count tc(threads);
        for (auto s : {shape{1, 1, 1}, shape{7, 33, 17}, shape{16, 15, 127}, shape{33, 127, 7}, shape{9, 300, 257},
                       shape{130, 64, 100}}) {
            const auto w = testing::random_matrix(s.n, s.k, 61);
            const auto dy = testing::random_matrix(s.m, s.n, 62);
            const packed_weights_f32 pw(w);
            const MatD ref = testing::to_double(dy) * testing::to_double(w);
            strided_input dys(dy, 3);
            testing::for_each_isa([&](arch::isa) {
                CAPTURE(threads);
                CAPTURE(s.m);
                CAPTURE(s.n);
                CAPTURE(s.k);
                guarded_output dx(s.m, s.k, 2);
                gemm_f32_t(dys.v, pw, dx.view());
                CHECK(dx.guards_intact());
                CHECK(testing::rel_error(dx.view(), ref) <= tol);
            });
        }
    }
}

TEST_CASE("gemm_f32 rejects mismatched shapes, naming the operand") {
    const auto w = testing::random_matrix(10, 20, 1);
    const packed_weights_f32 pw(w);
    Matrix<float> x(4, 20), y(4, 10), bad_x(4, 21), bad_y(4, 11), bad_rows(5, 10);
    auto message = [](auto&& fn) -> std::string {
        try {
            fn();
        } catch (const shape_error& e) {
            return e.what();
        }
        return "no shape_error";
    };
    CHECK(message([&] { gemm_f32(bad_x, pw, y); }).find("gemm_f32: x") != std::string::npos);
    CHECK(message([&] { gemm_f32(x, pw, bad_y); }).find("gemm_f32: y") != std::string::npos);
    CHECK(message([&] { gemm_f32(x, pw, bad_rows); }).find("gemm_f32: y") != std::string::npos);
    epilogue ep;
    ep.rank = 3;
    CHECK(message([&] { gemm_f32(x, pw, y, ep); }).find("lowrank_u") != std::string::npos);
    ep.residual = y.data();
    ep.ld_residual = 5;
    ep.rank = 0;
    CHECK(message([&] { gemm_f32(x, pw, y, ep); }).find("residual") != std::string::npos);
    Matrix<float> dy(4, 10), dx(4, 20), bad_dy(4, 9), bad_dx(4, 19);
    CHECK(message([&] { gemm_f32_t(bad_dy, pw, dx); }).find("gemm_f32_t: dy") != std::string::npos);
    CHECK(message([&] { gemm_f32_t(dy, pw, bad_dx); }).find("gemm_f32_t: dx") != std::string::npos);
    CHECK_THROWS_AS(gemm_f32(ConstMatrixView<float>(x.data(), 4, 20, 10), pw, y), shape_error);  // stride < cols
}

TEST_CASE("gemm_f32 with M = 0 touches nothing; NaN in x propagates without a crash") {
    const auto w = testing::random_matrix(40, 30, 1);
    const packed_weights_f32 pw(w);
    testing::for_each_isa([&](arch::isa) {
        gemm_f32(ConstMatrixView<float>(nullptr, 0, 30), pw, MatrixView<float>(nullptr, 0, 40));
        gemm_f32_t(ConstMatrixView<float>(nullptr, 0, 40), pw, MatrixView<float>(nullptr, 0, 30));
        for (index_t m : {1, 4, 20}) {
            auto x = testing::random_matrix(m, 30, 2);
            x(0, 7) = std::numeric_limits<float>::quiet_NaN();
            Matrix<float> y(m, 40);
            epilogue ep;
            ep.act = activation::relu;
            gemm_f32(x, pw, y, ep);
            for (index_t n = 0; n < 40; ++n) CHECK(std::isnan(y(0, n)));
            if (m > 1) CHECK(std::isfinite(y(m - 1, 0)));
        }
    });
}

}  // namespace cpet_test_kernels_gemm_f32
