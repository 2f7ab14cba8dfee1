// cpet/kernels/activations.hpp — element-wise activations shared by the GEMM epilogue and the FFN.
//
// GELU in both forms PyTorch offers: the exact erf form, 0.5·x·(1 + erf(x/√2)) (BERT, nn.GELU()), and the tanh
// approximation 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) (GPT-2, gelu_new); SiLU x·σ(x) (LLaMA's SwiGLU).
#pragma once

#include <cmath>
#include <cstddef>

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

/// Scalar definition of each activation (the oracle of the SIMD forms).
inline float activate(activation a, float x) noexcept {
    switch (a) {
        case activation::relu: return x > 0.f ? x : 0.f;
        case activation::gelu_erf: return 0.5f * x * (1.f + std::erf(x * 0.70710678118654752f));
        case activation::gelu_tanh: {
            const float c = 0.79788456080286536f;  // sqrt(2/pi)
            return 0.5f * x * (1.f + std::tanh(c * (x + 0.044715f * x * x * x)));
        }
        case activation::silu: return x / (1.f + std::exp(-x));
        default: return x;
    }
}

/// x[i] = act(x[i]) for i < n, on the given path.
template <class Arch>
void activate_inplace(Arch, activation a, float* x, index_t n) noexcept {
    if (a == activation::none) return;
    for (index_t i = 0; i < n; ++i) x[i] = activate(a, x[i]);
}

/// x[i] = act(x[i]) on the active path.
inline void activate_inplace(activation a, float* x, index_t n) {
    arch::dispatch([&](auto tag) { activate_inplace(tag, a, x, n); });
}

}  // namespace cpet::kernels
