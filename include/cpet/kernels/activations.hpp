// cpet/kernels/activations.hpp — element-wise activations shared by the GEMM epilogue and the FFN.
//
// GELU in both forms PyTorch offers: the exact erf form, 0.5·x·(1 + erf(x/√2)) (BERT, nn.GELU()), and the tanh
// approximation 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) (GPT-2, gelu_new); SiLU x·σ(x) (LLaMA's SwiGLU).
//
// Each activation exists twice: `activate(a, float)` (the scalar oracle, std:: maths) and
// `activate(Arch, a, batch)` written once over xsimd batches (xsimd::erf / tanh / exp), used by the GEMM
// epilogue on a tile still in L1 and by `activate_inplace`.
#pragma once

#include <cmath>
#include <cstddef>
#include <type_traits>

#include "cpet/arch/dispatch.hpp"
#include "cpet/core/matrix.hpp"

namespace cpet::kernels {

enum class activation { none, relu, gelu_erf, gelu_tanh, silu };

inline constexpr const char* activation_name(activation a) noexcept {
    switch (a) {
        case activation::relu: return "relu";
        case activation::gelu_erf: return "gelu_erf";
        case activation::gelu_tanh: return "gelu_tanh";
        case activation::silu: return "silu";
        default: return "none";
    }
}

namespace activation_detail {
inline constexpr float inv_sqrt2 = 0.70710678118654752f;
inline constexpr float sqrt_2_over_pi = 0.79788456080286536f;
inline constexpr float gelu_tanh_cubic = 0.044715f;
}  // namespace activation_detail

/// Scalar definition of each activation (the oracle of the SIMD forms).
inline float activate(activation a, float x) noexcept {
    switch (a) {
        case activation::relu: return x > 0.f ? x : (x == x ? 0.f : x);  // NaN stays NaN, like torch.relu
        case activation::gelu_erf: return 0.5f * x * (1.f + std::erf(x * activation_detail::inv_sqrt2));
        case activation::gelu_tanh:
            return 0.5f * x * (1.f + std::tanh(activation_detail::sqrt_2_over_pi * (x + activation_detail::gelu_tanh_cubic * x * x * x)));
        case activation::silu: return x / (1.f + std::exp(-x));
        default: return x;
    }
}

/// The activation of one SIMD batch (Arch is an xsimd arch). For x → −∞, SiLU's exp(−x) overflows to +inf and
/// x / inf gives −0, the right limit; NaN propagates through every form.
template <class Arch>
    requires arch::is_simd_v<Arch>
inline xsimd::batch<float, Arch> activate(Arch, activation a, xsimd::batch<float, Arch> x) noexcept {
    using B = xsimd::batch<float, Arch>;
    switch (a) {
        case activation::relu: return xsimd::select(x < B(0.f), B(0.f), x);  // keeps NaN (NaN < 0 is false)
        case activation::gelu_erf: return B(0.5f) * x * (B(1.f) + xsimd::erf(x * B(activation_detail::inv_sqrt2)));
        case activation::gelu_tanh: {
            const B inner = B(activation_detail::sqrt_2_over_pi) * xsimd::fma(B(activation_detail::gelu_tanh_cubic) * x * x, x, x);
            return B(0.5f) * x * (B(1.f) + xsimd::tanh(inner));
        }
        case activation::silu: return x / (B(1.f) + xsimd::exp(-x));
        default: return x;
    }
}

/// x[i] = act(x[i]) for i < n, on the given path.
template <class Arch>
void activate_inplace(Arch, activation a, float* x, index_t n) noexcept {
    if (a == activation::none) return;
    index_t i = 0;
    if constexpr (arch::is_simd_v<Arch>) {
        using B = xsimd::batch<float, Arch>;
        constexpr index_t W = static_cast<index_t>(B::size);
        for (; i + W <= n; i += W) activate(Arch{}, a, B::load_unaligned(x + i)).store_unaligned(x + i);
    }
    for (; i < n; ++i) x[i] = activate(a, x[i]);
}

/// act'(x) of one SIMD batch (what a backward pass multiplies the incoming gradient by).
///   GELU (erf):  Φ(x) + x·φ(x);   GELU (tanh): ½(1 + t) + ½x(1 − t²)·√(2/π)(1 + 3·0.044715x²), t = tanh(√(2/π)(x + 0.044715x³));
///   SiLU: σ(x)(1 + x(1 − σ(x)));  ReLU: 1 for x > 0, else 0.
template <class Arch>
    requires arch::is_simd_v<Arch>
inline xsimd::batch<float, Arch> derivative(Arch, activation a, xsimd::batch<float, Arch> x) noexcept {
    using B = xsimd::batch<float, Arch>;
    switch (a) {
        case activation::relu: return xsimd::select(x > B(0.f), B(1.f), B(0.f));
        case activation::gelu_erf: {
            constexpr float inv_sqrt_2pi = 0.39894228040143267794f;
            return B(0.5f) * (B(1.f) + xsimd::erf(x * B(activation_detail::inv_sqrt2))) +
                   x * B(inv_sqrt_2pi) * xsimd::exp(B(-0.5f) * x * x);
        }
        case activation::gelu_tanh: {
            const B k(activation_detail::sqrt_2_over_pi), c(activation_detail::gelu_tanh_cubic);
            const B t = xsimd::tanh(k * xsimd::fma(c * x * x, x, x));
            return B(0.5f) * (B(1.f) + t) + B(0.5f) * x * (B(1.f) - t * t) * k * xsimd::fma(B(3.f) * c, x * x, B(1.f));
        }
        case activation::silu: {
            const B sg = B(1.f) / (B(1.f) + xsimd::exp(-x));
            return sg * xsimd::fma(x, B(1.f) - sg, B(1.f));
        }
        default: return B(1.f);
    }
}
/// act'(x), scalar (in double inside: the tail of the vector loop and the scalar path).
inline float derivative(activation a, float xf) noexcept {
    const double x = xf;
    switch (a) {
        case activation::relu: return x > 0 ? 1.f : 0.f;
        case activation::gelu_erf:
            return float(0.5 * (1.0 + std::erf(x * 0.70710678118654752440)) +
                         x * 0.39894228040143267794 * std::exp(-0.5 * x * x));
        case activation::gelu_tanh: {
            constexpr double k = 0.79788456080286535588, c = 0.044715;
            const double t = std::tanh(k * (x + c * x * x * x));
            return float(0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * c * x * x));
        }
        case activation::silu: {
            const double sg = 1.0 / (1.0 + std::exp(-x));
            return float(sg * (1.0 + x * (1.0 - sg)));
        }
        default: return 1.f;
    }
}

/// g[i] *= act'(x[i]) for i < n, on the given path.
template <class Arch>
void multiply_by_derivative(Arch, activation a, const float* x, float* g, index_t n) noexcept {
    if (a == activation::none) return;
    index_t i = 0;
    if constexpr (arch::is_simd_v<Arch>) {
        using B = xsimd::batch<float, Arch>;
        constexpr index_t W = static_cast<index_t>(B::size);
        for (; i + W <= n; i += W)
            (B::load_unaligned(g + i) * derivative(Arch{}, a, B::load_unaligned(x + i))).store_unaligned(g + i);
    }
    for (; i < n; ++i) g[i] *= derivative(a, x[i]);
}

/// x[i] = act(x[i]) on the active path.
inline void activate_inplace(activation a, float* x, index_t n) {
    arch::dispatch([&](auto tag) { activate_inplace(tag, a, x, n); });
}

}  // namespace cpet::kernels
