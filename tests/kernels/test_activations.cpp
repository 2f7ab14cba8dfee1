// tests/kernels/test_activations.cpp — SIMD activations (xsimd erf/tanh/exp over batches) against a double
// reference and the scalar oracle, on every ISA, including tails, extremes, ±inf and NaN.
#include "support/testing.hpp"

#include <cmath>
#include <limits>
#include <vector>

#include "cpet/kernels/activations.hpp"

namespace cpet_test_kernels_activations {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using namespace cpet::kernels;

namespace {

double reference(activation a, double x) {
    switch (a) {
        case activation::relu: return x > 0 ? x : 0;
        case activation::gelu_erf: return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0)));
        case activation::gelu_tanh:
            return 0.5 * x * (1 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
        case activation::silu: return x / (1 + std::exp(-x));
        default: return x;
    }
}

constexpr activation all[] = {activation::none, activation::relu, activation::gelu_erf, activation::gelu_tanh,
                              activation::silu};

}  // namespace

TEST_CASE("activation names") {
    CHECK(std::string(activation_name(activation::gelu_erf)) == "gelu_erf");
    CHECK(std::string(activation_name(activation::silu)) == "silu");
    CHECK(std::string(activation_name(activation::none)) == "none");
}

TEST_CASE("activate_inplace matches the double reference on every ISA, every length") {
    testing::for_each_isa([](arch::isa) {
        for (auto a : all)
            for (index_t n : {1, 7, 15, 16, 17, 33, 100, 1000}) {
                const auto src = testing::random_matrix(1, n, unsigned(n), -8.f, 8.f);
                std::vector<float> x(src.data(), src.data() + n);
                activate_inplace(a, x.data(), n);
                CAPTURE(std::string(activation_name(a)));
                CAPTURE(n);
                double worst = 0;
                for (index_t i = 0; i < n; ++i) {
                    const double ref = reference(a, src.data()[i]);
                    worst = std::max(worst, std::abs(x[std::size_t(i)] - ref) / std::max(1.0, std::abs(ref)));
                }
                CHECK(worst <= 2e-6);
            }
    });
}

TEST_CASE("activations at the extremes: large |x|, ±inf, NaN") {
    const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
    // 16 + 16 + 3 values so that the extremes land both in SIMD batches and in the scalar tail
    std::vector<float> base = {-100.f, -30.f, -10.f, -3.f, -1e-3f, 0.f, 1e-3f, 3.f, 10.f, 30.f, 100.f, 1e6f, -1e6f,
                               -87.f, 88.f, 5.f};
    std::vector<float> src = base;
    src.insert(src.end(), base.begin(), base.end());
    src.insert(src.end(), {-100.f, 100.f, 0.5f});
    testing::for_each_isa([&](arch::isa) {
        for (auto a : all) {
            CAPTURE(std::string(activation_name(a)));
            std::vector<float> x = src;
            activate_inplace(a, x.data(), index_t(x.size()));
            for (std::size_t i = 0; i < x.size(); ++i) {
                CAPTURE(src[i]);
                const double ref = reference(a, src[i]);
                CHECK(std::isfinite(x[i]));
                CHECK(std::abs(x[i] - ref) <= 2e-6 * std::max(1.0, std::abs(ref)));
            }
            // NaN propagates, +inf maps to +inf, -inf to what the scalar formula gives
            for (std::size_t pos : {std::size_t(0), std::size_t(9), std::size_t(16)}) {
                std::vector<float> y(17, 1.f);
                y[pos] = nan;
                activate_inplace(a, y.data(), 17);
                CHECK(std::isnan(y[pos]));
                y.assign(17, 1.f);
                y[pos] = inf;
                activate_inplace(a, y.data(), 17);
                CHECK(y[pos] == inf);
                y.assign(17, 1.f);
                y[pos] = -inf;
                activate_inplace(a, y.data(), 17);
                const float oracle = activate(a, -inf);  // 0 (relu), -inf (none), NaN (0·inf in the formulas)
                if (std::isnan(oracle)) CHECK(std::isnan(y[pos]));
                else CHECK(y[pos] == oracle);
            }
        }
    });
}

TEST_CASE("the batch form agrees with the scalar oracle element by element") {
#if XSIMD_WITH_AVX512BW
    if (arch::available(arch::isa::avx512)) {
        using B = xsimd::batch<float, arch::avx512>;
        alignas(64) float in[B::size], out[B::size];
        for (std::size_t i = 0; i < B::size; ++i) in[i] = -4.f + 0.5f * float(i);
        for (auto a : all) {
            activate(arch::avx512{}, a, B::load_aligned(in)).store_aligned(out);
            for (std::size_t i = 0; i < B::size; ++i) CHECK(out[i] == doctest::Approx(activate(a, in[i])).epsilon(2e-6));
        }
    }
#endif
}

TEST_CASE("multiply_by_derivative matches central differences of the double reference on every ISA") {
    testing::for_each_isa([](arch::isa) {
        for (auto a : all)
            for (index_t n : {1, 7, 17, 33, 127}) {
                const auto src = testing::random_matrix(1, n, unsigned(n) + 5, -6.f, 6.f);
                const auto gin = testing::random_matrix(1, n, unsigned(n) + 6);
                std::vector<float> g(gin.data(), gin.data() + n);
                arch::dispatch([&](auto tag) { multiply_by_derivative(tag, a, src.data(), g.data(), n); });
                CAPTURE(std::string(activation_name(a)));
                CAPTURE(n);
                double worst = 0;
                for (index_t i = 0; i < n; ++i) {
                    const double x = src.data()[i], h = 1e-5;
                    if (a == activation::relu && std::abs(x) < 2 * h) continue;  // the kink
                    const double d = a == activation::none ? 1.0 : (reference(a, x + h) - reference(a, x - h)) / (2 * h);
                    worst = std::max(worst, std::abs(g[std::size_t(i)] - gin.data()[i] * d));
                }
                CHECK(worst <= 1e-5);
            }
    });
}

}  // namespace cpet_test_kernels_activations
