// Quantized GEMM kernels: weight-only (gemm_wq) against the dequantised dense reference, W8A8 integer GEMM
// bit-exact against an int32 loop on every path (VNNI, vpmaddubsw, scalar), W8A8 fp32 against the reference
// built from the same quantised activations, guard cells, and the errors of unsupported combinations.
#include "cpet/compress/quantize.hpp"
#include "cpet/kernels/gemm_s8.hpp"
#include "cpet/kernels/gemm_wq.hpp"

#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>

#include "support/testing.hpp"

namespace cpet_test_kernels_gemm_quantized {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using compress::granularity;
using compress::qbits;
using compress::quant_options;

namespace {

constexpr float guard = -12345.f;

/// y with a guard column on the right and a guard row below, all set to `guard`.
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

/// While alive, gemm_s8 writes every output with non-temporal stores (threshold 0); the old threshold comes back
/// even when the call under test throws.
struct stream_every_output {
    std::size_t saved = kernels::detail::s8_stream_bytes().exchange(0);
    stream_every_output() = default;
    stream_every_output(const stream_every_output&) = delete;
    stream_every_output& operator=(const stream_every_output&) = delete;
    ~stream_every_output() { kernels::detail::s8_stream_bytes() = saved; }
};

/// Every ISA path, plus AVX-512 without VNNI where the CPU has VNNI (the vpmaddubsw route on AVX-512), plus, on
/// every SIMD ISA, the signed vpmaddubsw tile for pair-bounded weights (which otherwise take the u8 tile there).
template <class Body>
void for_each_s8_path(Body&& body) {
    testing::for_each_isa([&](arch::isa i) {
        body(i);
        if (i == arch::isa::avx512 && arch::cpu().avx512_vnni) {
            kernels::detail::s8_disable_vnni() = true;
            CAPTURE("avx512 without vnni");
            body(i);
            kernels::detail::s8_disable_vnni() = false;
        }
        if (i != arch::isa::scalar) {
            kernels::detail::s8_disable_pair_path() = true;
            kernels::detail::s8_disable_vnni() = true;
            CAPTURE("signed tile for pair-bounded weights");
            body(i);
            kernels::detail::s8_disable_vnni() = false;
            kernels::detail::s8_disable_pair_path() = false;
        }
    });
}

/// Random int8 codes [n, k] whose pairs (2t, 2t + 1) obey |q| + |q'| <= 128, a fifth of them exactly at the bound
/// ((64, 64), (127, 1), (-128, 0) when asymmetric, ...); `over` puts one pair at 129 (row 0, k 0..1).
std::vector<std::int32_t> bounded_codes(index_t n, index_t k, bool sym, unsigned seed, bool over = false) {
    std::mt19937 gen(seed);
    const int lo = sym ? -127 : -128;
    std::uniform_int_distribution<int> first(lo, 127), pick(0, 9);
    std::vector<std::int32_t> q(static_cast<std::size_t>(n * k));
    for (index_t r = 0; r < n; ++r)
        for (index_t c = 0; c < k; c += 2) {
            int a = first(gen), b = 0;
            const int room = 128 - std::abs(a);
            switch (pick(gen)) {
                case 0: a = 64, b = 64; break;
                case 1: a = 127, b = 1; break;
                case 2: a = sym ? -127 : -128, b = sym ? -1 : 0; break;
                default: b = std::uniform_int_distribution<int>(std::max(lo, -room), std::min(127, room))(gen);
            }
            q[static_cast<std::size_t>(r * k + c)] = a;
            if (c + 1 < k) q[static_cast<std::size_t>(r * k + c + 1)] = b;
        }
    if (over && k >= 2) q[0] = 65, q[1] = 64;
    return q;
}

compress::quantized_weights from_bounded(index_t n, index_t k, bool sym, unsigned seed, bool over = false) {
    const std::vector<std::int32_t> q = bounded_codes(n, k, sym, seed, over);
    std::vector<float> scales(static_cast<std::size_t>(n)), zeros(static_cast<std::size_t>(n));
    for (index_t r = 0; r < n; ++r) {
        scales[static_cast<std::size_t>(r)] = 0.01f * static_cast<float>(1 + r % 7);
        zeros[static_cast<std::size_t>(r)] = sym ? 0.f : static_cast<float>(r % 2 ? 100 - r % 200 : -128 + r % 50);
    }
    return compress::quantized_weights::from_codes(qbits::int8, granularity::per_channel, 0, sym, n, k, q.data(),
                                                   scales.data(), sym ? nullptr : zeros.data());
}

testing::MatD dense_reference(const Matrix<float>& x, const Matrix<float>& wd, const std::vector<float>& bias) {
    Eigen::setNbThreads(1);  // tiny reference products: OpenMP start-up would dominate (and crawls on a busy box)
    testing::MatD y = testing::to_double(x.view()) * testing::to_double(wd.view()).transpose();
    for (index_t r = 0; r < y.rows(); ++r)
        for (index_t c = 0; c < y.cols(); ++c) y(r, c) += bias[static_cast<std::size_t>(c)];
    return y;
}

/// max_ij |got − ref| / (|x|·|Ŵ|ᵀ + |bias|)_ij: fp32 accumulation error relative to the magnitudes summed.
double scaled_error(ConstMatrixView<float> got, const testing::MatD& ref, const Matrix<float>& x,
                    const Matrix<float>& wd, const std::vector<float>& bias) {
    testing::MatD mag = testing::to_double(x.view()).cwiseAbs() * testing::to_double(wd.view()).cwiseAbs().transpose();
    double worst = 0;
    for (index_t r = 0; r < ref.rows(); ++r)
        for (index_t c = 0; c < ref.cols(); ++c) {
            const double m = mag(r, c) + std::abs(bias[static_cast<std::size_t>(c)]) + 1e-30;
            worst = std::max(worst, std::abs(got(r, c) - ref(r, c)) / m);
        }
    return worst;
}

std::vector<float> random_bias(index_t n, unsigned seed) {
    const Matrix<float> b = testing::random_matrix(1, n, seed);
    return std::vector<float>(b.data(), b.data() + n);
}

/// W8A8 reference: per-token symmetric int8 activations, the exact integer dot with the codes (minus zero points),
/// the rescale and the bias in double.
template <class Q>
testing::MatD w8a8_reference(const Matrix<float>& x, const Q& q, const std::vector<float>& bias) {
    const index_t M = x.rows(), K = x.cols(), N = static_cast<index_t>(bias.size());
    testing::MatD ref(M, N);
    for (index_t m = 0; m < M; ++m) {
        float amax = 0.f;
        for (index_t k = 0; k < K; ++k) amax = std::max(amax, std::abs(x(m, k)));
        const float inv = amax > 0 ? 127.f / amax : 0.f;
        for (index_t n = 0; n < N; ++n) {
            double acc = 0;
            for (index_t k = 0; k < K; ++k) acc += std::nearbyint(x(m, k) * inv) * (q.code(n, k) - q.zero(n, k));
            ref(m, n) = acc * (amax / 127.0) * q.scale(n, 0) + bias[static_cast<std::size_t>(n)];
        }
    }
    return ref;
}

/// Every bits × symmetry × granularity combination, with per-group sizes `groups`.
struct cfg {
    qbits b;
    granularity g;
    index_t group;
    bool sym;

    quant_options options() const {
        quant_options o;
        o.bits = b;
        o.gran = g;
        o.group = group;
        o.symmetric = sym;
        return o;
    }
};
std::vector<cfg> quant_configs(std::initializer_list<index_t> groups) {
    std::vector<cfg> cfgs;
    for (qbits b : {qbits::int8, qbits::int4})
        for (bool sym : {true, false}) {
            cfgs.push_back({b, granularity::per_channel, 0, sym});
            cfgs.push_back({b, granularity::per_tensor, 0, sym});
            for (index_t g : groups) cfgs.push_back({b, granularity::per_group, g, sym});
        }
    return cfgs;
}

}  // namespace

TEST_CASE("gemm_wq: int8 / int4, every granularity and symmetry, awkward shapes, every ISA") {
    const std::vector<cfg> cfgs = quant_configs({32, 128});
    for (const cfg& c : cfgs) {
        std::vector<index_t> ks = c.g == granularity::per_group ? std::vector<index_t>{c.group, 3 * c.group}
                                                                : std::vector<index_t>{33, 127, 64};
        if (c.group == 32) ks.push_back(384);
        for (index_t K : ks)
            for (index_t N : {1, 7, 33, 127}) {
                const quant_options o = c.options();
                const Matrix<float> w = testing::random_matrix(N, K, static_cast<unsigned>(N * 131 + K));
                const auto q = compress::quantize_rtn(w.view(), o);
                const Matrix<float> wd = compress::dequantize(q);
                const auto kv = compress::kernel_view(q);
                const std::vector<float> bias = random_bias(N, 3);
                for (index_t M : {1, 2, 7, 8, 9, 33}) {
                    const Matrix<float> x = testing::random_matrix(M, K, static_cast<unsigned>(M + 17 * K));
                    const testing::MatD ref = dense_reference(x, wd, bias);
                    testing::for_each_isa([&](arch::isa) {
                        CAPTURE(static_cast<int>(c.b));
                        CAPTURE(static_cast<int>(c.g));
                        CAPTURE(c.group);
                        CAPTURE(c.sym);
                        CAPTURE(M);
                        CAPTURE(N);
                        CAPTURE(K);
                        guarded y(M, N);
                        kernels::gemm_wq(x.view(), kv, y.view(), bias.data());
                        CHECK(scaled_error(y.view(), ref, x, wd, bias) < 4e-6);
                        CHECK(y.guards_intact());
                    });
                }
            }
    }
}

TEST_CASE("gemm_s8_s32: integer GEMM bit-exact against the int32 reference on every path") {
    for (bool sym : {true, false})
        for (index_t K : {4, 33, 127, 256})
            for (index_t N : {1, 7, 33, 127}) {
                const Matrix<float> w = testing::random_matrix(N, K, static_cast<unsigned>(N + K));
                quant_options o;
                o.symmetric = sym;
                const auto q = compress::quantize_rtn(w.view(), o);
                const auto kv = compress::kernel_view(q);
                for (index_t M : {1, 2, 7, 8, 9, 33}) {
                    // Extreme codes included: ±127 activations against −128 / 127 weights.
                    Matrix<std::int8_t> xq(M, K);
                    std::mt19937 gen(static_cast<unsigned>(M * 7 + K));
                    std::uniform_int_distribution<int> d(-127, 127);
                    for (index_t i = 0; i < xq.size(); ++i) xq.data()[i] = static_cast<std::int8_t>(i % 5 == 0 ? (i % 2 ? 127 : -127) : d(gen));
                    Matrix<std::int32_t> ref(M, N);
                    for (index_t m = 0; m < M; ++m)
                        for (index_t n = 0; n < N; ++n) {
                            std::int32_t acc = 0;
                            for (index_t k = 0; k < K; ++k)
                                acc += static_cast<std::int32_t>(xq(m, k)) *
                                       (q.code(n, k) - static_cast<std::int32_t>(q.zero(n, k)));
                            ref(m, n) = acc;
                        }
                    for_each_s8_path([&](arch::isa) {
                        CAPTURE(sym);
                        CAPTURE(M);
                        CAPTURE(N);
                        CAPTURE(K);
                        Matrix<std::int32_t> c(M, N);
                        c.fill(-7);
                        kernels::gemm_s8_s32(xq.view(), kv, c.view());
                        CHECK(std::memcmp(c.data(), ref.data(), c.bytes()) == 0);
                    });
                }
            }
}

TEST_CASE("gemm_s8_s32: blocking edges (K beyond one 1024 block, M beyond one 256-row block)") {
    struct dims {
        index_t m, n, k;
    };
    for (dims d : {dims{3, 33, 2100}, dims{9, 17, 1024}, dims{260, 7, 40}, dims{1, 1, 4099}})
        for (bool sym : {true, false}) {
            const Matrix<float> w = testing::random_matrix(d.n, d.k, static_cast<unsigned>(d.n + d.k));
            quant_options o;
            o.symmetric = sym;
            const auto q = compress::quantize_rtn(w.view(), o);
            Matrix<std::int8_t> xq(d.m, d.k);
            std::mt19937 gen(static_cast<unsigned>(d.m + d.k));
            std::uniform_int_distribution<int> dist(-127, 127);
            for (index_t i = 0; i < xq.size(); ++i) xq.data()[i] = static_cast<std::int8_t>(dist(gen));
            Matrix<std::int32_t> ref(d.m, d.n);
            for (index_t m = 0; m < d.m; ++m)
                for (index_t n = 0; n < d.n; ++n) {
                    std::int32_t acc = 0;
                    for (index_t k = 0; k < d.k; ++k)
                        acc += static_cast<std::int32_t>(xq(m, k)) * (q.code(n, k) - static_cast<std::int32_t>(q.zero(n, k)));
                    ref(m, n) = acc;
                }
            for_each_s8_path([&](arch::isa) {
                CAPTURE(d.m);
                CAPTURE(d.n);
                CAPTURE(d.k);
                CAPTURE(sym);
                Matrix<std::int32_t> c(d.m, d.n);
                kernels::gemm_s8_s32(xq.view(), compress::kernel_view(q), c.view());
                CHECK(std::memcmp(c.data(), ref.data(), c.bytes()) == 0);
            });
        }
}

TEST_CASE("gemm_s8_s32: pair-bounded weights (the u8 tile) bit-exact at the bound on every path, and the flag") {
    struct dims {
        index_t m, n, k;
    };
    for (bool sym : {true, false})
        for (dims d : {dims{1, 1, 2}, dims{3, 16, 4}, dims{4, 17, 33}, dims{5, 33, 127}, dims{8, 7, 256},
                       dims{33, 16, 1030}, dims{260, 9, 20}}) {
            CAPTURE(sym);
            CAPTURE(d.m);
            CAPTURE(d.n);
            CAPTURE(d.k);
            const auto q = from_bounded(d.n, d.k, sym, static_cast<unsigned>(d.m + d.n + d.k));
            REQUIRE(q.pair_bounded());
            // Mostly the extremes ±127 (x + 128 = 255 or 1): with (64, 64) pairs the int16 sums reach ±32640.
            Matrix<std::int8_t> xq(d.m, d.k);
            std::mt19937 gen(static_cast<unsigned>(d.k));
            std::uniform_int_distribution<int> dist(-127, 127);
            for (index_t i = 0; i < xq.size(); ++i)
                xq.data()[i] = static_cast<std::int8_t>(i % 3 == 2 ? dist(gen) : (i % 7 < 4 ? 127 : -127));
            Matrix<std::int32_t> ref(d.m, d.n);
            for (index_t m = 0; m < d.m; ++m)
                for (index_t n = 0; n < d.n; ++n) {
                    std::int64_t acc = 0;
                    for (index_t k = 0; k < d.k; ++k)
                        acc += std::int64_t{xq(m, k)} * (q.code(n, k) - static_cast<std::int64_t>(q.zero(n, k)));
                    ref(m, n) = static_cast<std::int32_t>(acc);
                }
            for_each_s8_path([&](arch::isa) {
                Matrix<std::int32_t> c(d.m, d.n);
                c.fill(-7);
                kernels::gemm_s8_s32(xq.view(), compress::kernel_view(q), c.view());
                CHECK(std::memcmp(c.data(), ref.data(), c.bytes()) == 0);
            });
        }
    // One pair at 129 clears the flag (those weights take the signed tile, still exact).
    const auto over = from_bounded(5, 40, true, 3, true);
    CHECK_FALSE(over.pair_bounded());
    CHECK_FALSE(compress::kernel_view(over).pair_bounded);
    CHECK(from_bounded(5, 40, true, 3, false).pair_bounded());
    // int4 codes are never flagged (the flag is about int8 pairs).
    const Matrix<float> w4 = testing::random_matrix(4, 64, 5);
    quant_options o4;
    o4.bits = qbits::int4;
    CHECK_FALSE(compress::quantize_rtn(w4.view(), o4).pair_bounded());
}

TEST_CASE("gemm_s8: W8A8 fp32 against the reference from the same quantised activations, identical on every path") {
    for (bool bounded : {false, true})
    for (bool sym : {true, false})
        if (sym || !bounded)  // pair_bound: symmetric int8 only
        for (granularity g : {granularity::per_channel, granularity::per_tensor})
            for (index_t K : {33, 256})
                for (index_t N : {7, 127}) {
                    const Matrix<float> w = testing::random_matrix(N, K, static_cast<unsigned>(N * 3 + K));
                    quant_options o;
                    o.symmetric = sym;
                    o.gran = g;
                    o.pair_bound = bounded;
                    const auto q = compress::quantize_rtn(w.view(), o);
                    CAPTURE(bounded);
                    if (bounded) REQUIRE(q.pair_bounded());
                    const auto kv = compress::kernel_view(q);
                    const Matrix<float> wd = compress::dequantize(q);
                    const std::vector<float> bias = random_bias(N, 5);
                    for (index_t M : {1, 8, 9, 33}) {
                        Matrix<float> x = testing::random_matrix(M, K, static_cast<unsigned>(M + K));
                        for (index_t c = 0; c < K; ++c) x(0, c) = 0.f;  // an all-zero token: scale 0, no NaN
                        const testing::MatD ref = w8a8_reference(x, q, bias);
                        const testing::MatD dense = dense_reference(x, wd, bias);
                        Matrix<float> first;
                        for_each_s8_path([&](arch::isa) {
                            CAPTURE(sym);
                            CAPTURE(M);
                            CAPTURE(N);
                            CAPTURE(K);
                            guarded y(M, N);
                            kernels::gemm_s8(x.view(), kv, y.view(), bias.data());
                            CHECK(testing::rel_error(y.view(), ref) < 1e-6);
                            CHECK(testing::rel_error(y.view(), dense) < 2e-2);  // int8 activations
                            for (index_t n = 0; n < N; ++n) CHECK(y.view()(0, n) == bias[static_cast<std::size_t>(n)]);
                            CHECK(y.guards_intact());
                            const Matrix<float> got(ConstMatrixView<float>(y.view()));
                            if (first.empty())
                                first = got;
                            else
                                CHECK(std::memcmp(first.data(), got.data(), got.bytes()) == 0);
                        });
                    }
                }
}

TEST_CASE("gemm_s8: bias, activation and residual fused on the integer tiles, against the int32 reference, every path") {
    using kernels::activation;
    for (index_t K : {33, 256})
        for (index_t N : {1, 7, 127}) {
            const Matrix<float> w = testing::random_matrix(N, K, static_cast<unsigned>(N * 7 + K));
            quant_options o;
            o.gran = granularity::per_channel;
            const auto q = compress::quantize_rtn(w.view(), o);
            const auto kv = compress::kernel_view(q);
            const std::vector<float> bias = random_bias(N, 9);
            for (index_t M : {1, 9, 33})
                for (activation act : {activation::none, activation::gelu_erf, activation::relu})
                    for (int res_kind : {0, 1, 2}) {  // no residual, a separate one, y itself
                        const Matrix<float> x = testing::random_matrix(M, K, static_cast<unsigned>(M * 5 + K));
                        const Matrix<float> res = testing::random_matrix(M, N, static_cast<unsigned>(M + 3 * N));
                        // Reference: the W8A8 reference, then the scalar activation and the residual.
                        testing::MatD ref = w8a8_reference(x, q, bias);
                        for (index_t m = 0; m < M; ++m)
                            for (index_t n = 0; n < N; ++n)
                                ref(m, n) = kernels::activate(act, static_cast<float>(ref(m, n))) + (res_kind ? res(m, n) : 0.f);
                        for_each_s8_path([&](arch::isa) {
                            CAPTURE(M);
                            CAPTURE(N);
                            CAPTURE(K);
                            CAPTURE(static_cast<int>(act));
                            CAPTURE(res_kind);
                            guarded y(M, N);
                            kernels::epilogue ep;
                            ep.bias = bias.data();
                            ep.act = act;
                            if (res_kind == 1) {
                                ep.residual = res.data();
                                ep.ld_residual = res.cols();
                            } else if (res_kind == 2) {
                                for (index_t r = 0; r < M; ++r)
                                    for (index_t c = 0; c < N; ++c) y.view()(r, c) = res(r, c);
                                ep.residual = y.view().data();
                                ep.ld_residual = y.view().stride();
                            }
                            REQUIRE(kernels::gemm_s8_fuses(ep, y.view()));
                            // The result with non-temporal stores forced (every output streamed) must be the
                            // same bits; y's rows are not vector-aligned here, so mostly the fallback runs.
                            guarded ys(M, N);
                            kernels::epilogue eps = ep;
                            if (res_kind == 2) {
                                for (index_t r = 0; r < M; ++r)
                                    for (index_t c = 0; c < N; ++c) ys.view()(r, c) = res(r, c);
                                eps.residual = ys.view().data();
                                eps.ld_residual = ys.view().stride();
                            }
                            kernels::gemm_s8(x.view(), kv, y.view(), ep);
                            CHECK(testing::rel_error(y.view(), ref) < 2e-6);
                            CHECK(y.guards_intact());
                            {
                                const stream_every_output streamed;
                                kernels::gemm_s8(x.view(), kv, ys.view(), eps);
                            }
                            CHECK(std::memcmp(ys.store.data(), y.store.data(), sizeof(float) * std::size_t(y.store.size())) == 0);
                        });
                    }
        }
    // Non-temporal stores on vector-aligned rows (a dense y whose row stride is a multiple of the widest vector):
    // the same bits as the cached stores, with bias, activation and y as its own residual.
    {
        const index_t M = 9, N = 80, K = 33;
        const Matrix<float> w = testing::random_matrix(N, K, 21);
        const auto q = compress::quantize_rtn(w.view(), quant_options{});
        const auto kv = compress::kernel_view(q);
        const Matrix<float> x = testing::random_matrix(M, K, 22), res = testing::random_matrix(M, N, 23);
        const std::vector<float> bias = random_bias(N, 24);
        for_each_s8_path([&](arch::isa) {
            Matrix<float> y(res.view()), ys(res.view());
            REQUIRE(reinterpret_cast<std::uintptr_t>(ys.data()) % 64 == 0);
            kernels::epilogue ep;
            ep.bias = bias.data();
            ep.act = kernels::activation::gelu_erf;
            ep.residual = y.data();
            ep.ld_residual = N;
            kernels::gemm_s8(x.view(), kv, y.view(), ep);
            ep.residual = ys.data();
            {
                const stream_every_output streamed;
                kernels::gemm_s8(x.view(), kv, ys.view(), ep);
            }
            for (index_t i = 0; i < y.size(); ++i) REQUIRE(ys.data()[i] == y.data()[i]);
        });
    }
    // What it does not fuse is refused with a sentence, and y is left as it was.
    const Matrix<float> w = testing::random_matrix(16, 32, 3);
    const auto q = compress::quantize_rtn(w.view(), quant_options{});
    const auto kv = compress::kernel_view(q);
    const Matrix<float> x = testing::random_matrix(4, 32, 4);
    Matrix<float> y(5, 16);
    y.fill(1.f);
    const Matrix<float> u = testing::random_matrix(4, 2, 5), b = testing::random_matrix(16, 2, 6);
    kernels::epilogue lr;
    lr.lowrank_u = u.data();
    lr.ld_u = 2;
    lr.lowrank_b = b.data();
    lr.ld_b = 2;
    lr.rank = 2;
    MatrixView<float> y4(y.data(), 4, 16, 16);
    CHECK_FALSE(kernels::gemm_s8_fuses(lr, y4));
    CHECK_THROWS_WITH_AS(kernels::gemm_s8(x.view(), kv, y4, lr), doctest::Contains("low-rank"), shape_error);
    kernels::epilogue shifted;  // the residual one row below y: it overlaps y without being y
    shifted.residual = y.data() + 16;
    shifted.ld_residual = 16;
    CHECK_FALSE(kernels::gemm_s8_fuses(shifted, y4));
    CHECK_THROWS_AS(kernels::gemm_s8(x.view(), kv, y4, shifted), shape_error);
    for (index_t i = 0; i < y.size(); ++i) CHECK(y.data()[i] == 1.f);
}

TEST_CASE("gemm_w4a8: int4 weights x int8 activations, against the same-quantisation reference, identical on every path") {
    for (bool sym : {true, false})
        for (granularity g : {granularity::per_group, granularity::per_channel})
            for (index_t K : {32, 127, 256})
                for (index_t N : {1, 7, 33}) {
                    if (g == granularity::per_group && K % 32) continue;
                    const Matrix<float> w = testing::random_matrix(N, K, static_cast<unsigned>(N * 5 + K));
                    quant_options o;
                    o.bits = qbits::int4;
                    o.symmetric = sym;
                    o.gran = g;
                    o.group = 32;
                    const auto q = compress::quantize_rtn(w.view(), o);
                    const auto kv = compress::kernel_view(q);
                    const Matrix<float> wd = compress::dequantize(q);
                    const std::vector<float> bias = random_bias(N, 6);
                    for (index_t M : {1, 2, 7, 8, 9}) {
                        Matrix<float> x = testing::random_matrix(M, K, static_cast<unsigned>(M * 3 + K));
                        for (index_t c = 0; c < K; ++c) x(M - 1, c) = 0.f;  // an all-zero token
                        testing::MatD ref(M, N);
                        for (index_t m = 0; m < M; ++m) {
                            float amax = 0.f;
                            for (index_t k = 0; k < K; ++k) amax = std::max(amax, std::abs(x(m, k)));
                            const float inv = amax > 0 ? 127.f / amax : 0.f;
                            for (index_t n = 0; n < N; ++n) {
                                double acc = 0;
                                for (index_t k = 0; k < K; ++k)
                                    acc += std::nearbyint(x(m, k) * inv) * static_cast<double>(q.value(n, k));
                                ref(m, n) = acc * (amax / 127.0) + bias[static_cast<std::size_t>(n)];
                            }
                        }
                        const testing::MatD dense = dense_reference(x, wd, bias);
                        Matrix<float> first;
                        for_each_s8_path([&](arch::isa) {
                            CAPTURE(sym);
                            CAPTURE(static_cast<int>(g));
                            CAPTURE(M);
                            CAPTURE(N);
                            CAPTURE(K);
                            guarded y(M, N);
                            kernels::gemm_w4a8(x.view(), kv, y.view(), bias.data());
                            CHECK(scaled_error(y.view(), ref, x, wd, bias) < 4e-6);
                            CHECK(testing::rel_error(y.view(), dense) < 2e-2);
                            for (index_t n = 0; n < N; ++n)
                                CHECK(y.view()(M - 1, n) == bias[static_cast<std::size_t>(n)]);
                            CHECK(y.guards_intact());
                            const Matrix<float> got(ConstMatrixView<float>(y.view()));
                            if (first.empty())
                                first = got;
                            else
                                CHECK(std::memcmp(first.data(), got.data(), got.bytes()) == 0);
                        });
                    }
                }
}

TEST_CASE("quantized matmul: the path choice and unsupported combinations") {
    const Matrix<float> w = testing::random_matrix(40, 64, 1);
    const Matrix<float> x = testing::random_matrix(20, 64, 2);
    Matrix<float> y(20, 40);
    const auto q8 = compress::quantize_rtn(w.view(), {qbits::int8, granularity::per_channel});
    const auto q4 = compress::quantize_rtn(w.view(), {qbits::int4, granularity::per_group, 32});
    const testing::MatD ref4 = testing::to_double(x.view()) * testing::to_double(compress::dequantize(q4).view()).transpose();
    compress::matmul(x.view(), q4, y.view());
    CHECK(testing::rel_error(y.view(), ref4) < 2e-6);
    const auto q8g = compress::quantize_rtn(w.view(), {qbits::int8, granularity::per_group, 32});
    CHECK_THROWS_AS(compress::matmul(x.view(), q8g, y.view(), nullptr, compress::execution::int8_activations),
                    format_error);
    CHECK_THROWS_AS(kernels::gemm_w4a8(x.view(), compress::kernel_view(q8g), y.view()), format_error);
    compress::matmul(x.view(), q4, y.view(), nullptr, compress::execution::int8_activations);  // W4A8
    CHECK(testing::rel_error(y.view(), ref4) < 2e-2);
    CHECK_THROWS_AS(kernels::gemm_s8(x.view(), compress::kernel_view(q4), y.view()), format_error);
    const testing::MatD ref8 = testing::to_double(x.view()) * testing::to_double(compress::dequantize(q8).view()).transpose();
    compress::matmul(x.view(), q8, y.view());  // M = 20 → W8A8
    CHECK(testing::rel_error(y.view(), ref8) < 2e-2);
    compress::matmul(x.view(), q8, y.view(), nullptr, compress::execution::weight_only);
    CHECK(testing::rel_error(y.view(), ref8) < 2e-6);

    Matrix<float> bad_y(20, 39);
    CHECK_THROWS_AS(compress::matmul(x.view(), q8, bad_y.view()), shape_error);
    Matrix<float> bad_x(20, 63);
    CHECK_THROWS_AS(kernels::gemm_wq(bad_x.view(), compress::kernel_view(q8), y.view()), shape_error);
    Matrix<std::int8_t> xq(2, 64);
    xq.fill(0);
    xq(1, 3) = -128;
    Matrix<std::int32_t> c(2, 40);
    CHECK_THROWS_AS(kernels::gemm_s8_s32(xq.view(), compress::kernel_view(q8), c.view()), numeric_error);
}

TEST_CASE("gemm_wq / gemm_s8: multi-threaded runs agree with single-threaded ones") {
    // Large enough (M·N·K ≥ 1M) for the kernels to start threads.
    const Matrix<float> w = testing::random_matrix(200, 768, 8);
    const Matrix<float> x = testing::random_matrix(9, 768, 9);
    const auto q4 = compress::quantize_rtn(w.view(), {qbits::int4, granularity::per_group, 64, false});
    const auto q8 = compress::quantize_rtn(w.view(), {qbits::int8, granularity::per_channel});
    Matrix<float> a(9, 200), b(9, 200), c(9, 200), d(9, 200), e(9, 200), f(9, 200);
    const int before = max_threads();
    set_num_threads(1);
    kernels::gemm_wq(x.view(), compress::kernel_view(q4), a.view());
    kernels::gemm_s8(x.view(), compress::kernel_view(q8), c.view());
    kernels::gemm_w4a8(x.view(), compress::kernel_view(q4), e.view());
    set_num_threads(2);
    kernels::gemm_wq(x.view(), compress::kernel_view(q4), b.view());
    kernels::gemm_s8(x.view(), compress::kernel_view(q8), d.view());
    kernels::gemm_w4a8(x.view(), compress::kernel_view(q4), f.view());
    set_num_threads(before);
    CHECK(std::memcmp(a.data(), b.data(), a.bytes()) == 0);
    CHECK(std::memcmp(c.data(), d.data(), c.bytes()) == 0);
    CHECK(std::memcmp(e.data(), f.data(), e.bytes()) == 0);

    // W8A8 across two row blocks (300 > 256 rows) and two K blocks (1100 > 1024), GELU and an in-place residual
    // fused: the threads split (row block, panel group) items, and every tile is computed the same way.
    const Matrix<float> w2 = testing::random_matrix(100, 1100, 10);
    const Matrix<float> x2 = testing::random_matrix(300, 1100, 11);
    const auto q2 = compress::quantize_rtn(w2.view(), {qbits::int8, granularity::per_channel});
    const Matrix<float> res = testing::random_matrix(300, 100, 12);
    Matrix<float> g{ConstMatrixView<float>(res.view())}, h{ConstMatrixView<float>(res.view())};
    kernels::epilogue ep;
    ep.act = kernels::activation::gelu_erf;
    ep.ld_residual = 100;
    set_num_threads(1);
    ep.residual = g.data();
    kernels::gemm_s8(x2.view(), compress::kernel_view(q2), g.view(), ep);
    set_num_threads(2);
    ep.residual = h.data();
    kernels::gemm_s8(x2.view(), compress::kernel_view(q2), h.view(), ep);
    set_num_threads(before);
    CHECK(std::memcmp(g.data(), h.data(), g.bytes()) == 0);
    CHECK(std::memcmp(g.data(), res.data(), g.bytes()) != 0);
}

namespace {

/// One full epilogue of the blocked path's tests and its double reference.
struct wq_epilogue_case {
    kernels::activation act = kernels::activation::none;
    bool residual = false, in_place = false;  // in_place: the residual is y itself (the layer's residual add)
    index_t rank = 0;
};

/// act(x·Ŵᵀ + bias + s·U·Bᵀ) + residual in double, and the magnitudes summed into each element (for the
/// scaled error: fp32 accumulation over K, and dequantisation as s·q − s·z, round relative to those).
struct wq_reference {
    testing::MatD y, mag;
};

wq_reference epilogue_reference(const Matrix<float>& x, const Matrix<float>& wd, const std::vector<float>& bias,
                                const Matrix<float>& u, const Matrix<float>& b, float s, const Matrix<float>& res,
                                const wq_epilogue_case& c) {
    Eigen::setNbThreads(1);
    const testing::MatD xd = testing::to_double(x.view()), wdd = testing::to_double(wd.view());
    wq_reference r;
    r.y = xd * wdd.transpose();
    r.mag = xd.cwiseAbs() * wdd.cwiseAbs().transpose();
    if (c.rank > 0) {
        const testing::MatD ud = testing::to_double(u.view()), bd = testing::to_double(b.view());
        r.y += double(s) * ud * bd.transpose();
        r.mag += std::abs(double(s)) * ud.cwiseAbs() * bd.cwiseAbs().transpose();
    }
    for (index_t i = 0; i < r.y.rows(); ++i)
        for (index_t j = 0; j < r.y.cols(); ++j) {
            double v = r.y(i, j) + bias[static_cast<std::size_t>(j)];
            r.mag(i, j) += std::abs(bias[static_cast<std::size_t>(j)]);
            if (c.act == kernels::activation::relu) v = std::max(v, 0.0);
            else if (c.act != kernels::activation::none) v = kernels::activate(c.act, static_cast<float>(v));
            if (c.residual) {
                v += res(i, j);
                r.mag(i, j) += std::abs(res(i, j));
            }
            r.y(i, j) = v;
        }
    return r;
}

double scaled_error(ConstMatrixView<float> got, const wq_reference& ref) {
    double worst = 0;
    for (index_t i = 0; i < ref.y.rows(); ++i)
        for (index_t j = 0; j < ref.y.cols(); ++j)
            worst = std::max(worst, std::abs(got(i, j) - ref.y(i, j)) / (ref.mag(i, j) + 1e-30));
    return worst;
}

}  // namespace

TEST_CASE("gemm_wq blocked path: int8 / int4, every granularity and symmetry, full epilogue, awkward shapes, every ISA") {
    const std::vector<cfg> cfgs = quant_configs({32, 64, 128});
    // Epilogues rotated over the shapes: bias only; ReLU + residual; GELU + rank-3 low-rank + residual that is y
    // itself; SiLU + rank-1 low-rank.
    const wq_epilogue_case eps[] = {{},
                                    {kernels::activation::relu, true, false, 0},
                                    {kernels::activation::gelu_tanh, true, true, 3},
                                    {kernels::activation::silu, false, false, 1}};
    int turn = 0;
    for (const cfg& c : cfgs) {
        // K tails (33, 300: not a multiple of the chunk or of the 256-wide K slice) and several groups, with K
        // slices that start inside a group (608 = 19 groups of 32 in slices of 208; 384 = 3 × 128 in 2 × 192).
        std::vector<index_t> ks;
        if (c.g != granularity::per_group) ks = {33, 300};
        else if (c.group == 32) ks = {32, 608};
        else ks = {c.group, 3 * c.group};
        for (index_t K : ks)
            for (index_t N : {1, 7, 33, 100}) {
                const quant_options o = c.options();
                const Matrix<float> w = testing::random_matrix(N, K, static_cast<unsigned>(N * 31 + K));
                const auto q = compress::quantize_rtn(w.view(), o);
                const Matrix<float> wd = compress::dequantize(q);
                const auto kv = compress::kernel_view(q);
                const std::vector<float> bias = random_bias(N, 4);
                for (index_t M : {9, 33, 127, 200}) {
                    const wq_epilogue_case& e = eps[turn++ % 4];
                    const Matrix<float> x = testing::random_matrix(M, K, static_cast<unsigned>(M * 3 + K));
                    const Matrix<float> res = testing::random_matrix(M, N, static_cast<unsigned>(M + N));
                    const index_t rank = std::max<index_t>(e.rank, 1);
                    const Matrix<float> u = testing::random_matrix(M, rank, 5);
                    const Matrix<float> b = testing::random_matrix(N, rank, 6);
                    const float s = 0.75f;
                    const wq_reference ref = epilogue_reference(x, wd, bias, u, b, s, res, e);
                    testing::for_each_isa([&](arch::isa i) {
                        CAPTURE(static_cast<int>(c.b));
                        CAPTURE(static_cast<int>(c.g));
                        CAPTURE(c.group);
                        CAPTURE(c.sym);
                        CAPTURE(M);
                        CAPTURE(N);
                        CAPTURE(K);
                        CAPTURE(static_cast<int>(e.act));
                        CAPTURE(e.rank);
                        CAPTURE(e.in_place);
                        guarded y(M, N);
                        kernels::epilogue ep;
                        ep.bias = bias.data();
                        ep.act = e.act;
                        if (e.residual) {
                            if (e.in_place) {
                                for (index_t r = 0; r < M; ++r)
                                    for (index_t j = 0; j < N; ++j) y.view()(r, j) = res(r, j);
                                ep.residual = y.view().data();
                                ep.ld_residual = y.view().stride();
                            } else {
                                ep.residual = res.data();
                                ep.ld_residual = res.cols();
                            }
                        }
                        if (e.rank > 0) {
                            ep.lowrank_u = u.data();
                            ep.ld_u = u.cols();
                            ep.lowrank_b = b.data();
                            ep.ld_b = b.cols();
                            ep.rank = e.rank;
                            ep.lowrank_scale = s;
                        }
                        if (i == arch::isa::scalar) {
                            // The scalar path has only the decode kernel, which fuses the bias alone.
                            if (ep.act != kernels::activation::none || ep.residual || ep.rank)
                                arch::dispatch([&](auto tag) {
                                    CHECK_THROWS_AS(kernels::gemm_wq(tag, x.view(), kv, y.view(), ep), shape_error);
                                });
                            return;
                        }
                        arch::dispatch([&](auto tag) {
                            if constexpr (arch::is_simd_v<decltype(tag)>) {
                                // M >= wq_blocked_rows takes the blocked path through the public entry; below,
                                // force it
                                if (kernels::gemm_wq_fuses_epilogue(tag, M))
                                    kernels::gemm_wq(tag, x.view(), kv, y.view(), ep);
                                else
                                    kernels::detail::gemm_wq_blocked(tag, x.view(), kv, y.view(), ep);
                            }
                        });
                        CHECK(scaled_error(y.view(), ref) < 4e-6);
                        CHECK(y.guards_intact());
                    });
                }
            }
    }
}

TEST_CASE("gemm_wq blocked path: multi-threaded runs bit-identical to single-threaded, panels or rows split") {
    struct dims {
        index_t m, n, k;
    };
    // 200 × 1000: enough panels to split them; 300 × 40: two panels, so the threads split the rows.
    for (dims d : {dims{200, 1000, 200}, dims{300, 40, 520}})
        for (qbits bits : {qbits::int8, qbits::int4}) {
            const Matrix<float> w = testing::random_matrix(d.n, d.k, 11);
            const Matrix<float> x = testing::random_matrix(d.m, d.k, 12);
            const auto q = compress::quantize_rtn(w.view(), {bits, granularity::per_group, 40, false});
            const auto kv = compress::kernel_view(q);
            const testing::MatD ref =
                testing::to_double(x.view()) * testing::to_double(compress::dequantize(q).view()).transpose();
            Matrix<float> one(d.m, d.n), two(d.m, d.n);
            const int before = max_threads();
            set_num_threads(1);
            kernels::gemm_wq(x.view(), kv, one.view());
            set_num_threads(2);
            kernels::gemm_wq(x.view(), kv, two.view());
            set_num_threads(before);
            CAPTURE(d.m);
            CAPTURE(d.n);
            CHECK(testing::rel_error(one.view(), ref) < 2e-6);
            CHECK(std::memcmp(one.data(), two.data(), one.bytes()) == 0);
        }
}

}  // namespace cpet_test_kernels_gemm_quantized
