// cpet/kernels/norms.hpp — LayerNorm (BERT) and RMSNorm (LLaMA, T5) over the rows of a matrix.
//   layernorm: y = (x − mean) / sqrt(var + eps) · gamma + beta   (biased variance, like torch)
//   rmsnorm:   y = x / sqrt(mean(x²) + eps) · gamma
// y may alias x (same pointer and stride).
#pragma once

#include <cmath>

#include "cpet/arch/dispatch.hpp"
#include "cpet/core/matrix.hpp"

namespace cpet::kernels {

template <class Arch>
void layernorm(Arch, ConstMatrixView<float> x, const float* gamma, const float* beta, float eps, MatrixView<float> y) {
    const index_t n = x.cols();
    for (index_t r = 0; r < x.rows(); ++r) {
        double mean = 0, var = 0;
        for (index_t c = 0; c < n; ++c) mean += x(r, c);
        mean /= double(n);
        for (index_t c = 0; c < n; ++c) var += (x(r, c) - mean) * (x(r, c) - mean);
        var /= double(n);
        const float inv = float(1.0 / std::sqrt(var + eps));
        for (index_t c = 0; c < n; ++c)
            y(r, c) = (x(r, c) - float(mean)) * inv * (gamma ? gamma[c] : 1.f) + (beta ? beta[c] : 0.f);
    }
}

template <class Arch>
void rmsnorm(Arch, ConstMatrixView<float> x, const float* gamma, float eps, MatrixView<float> y) {
    const index_t n = x.cols();
    for (index_t r = 0; r < x.rows(); ++r) {
        double ss = 0;
        for (index_t c = 0; c < n; ++c) ss += double(x(r, c)) * x(r, c);
        const float inv = float(1.0 / std::sqrt(ss / double(n) + eps));
        for (index_t c = 0; c < n; ++c) y(r, c) = x(r, c) * inv * (gamma ? gamma[c] : 1.f);
    }
}

/// LayerNorm over each row of x into y (same shape); gamma/beta of length cols (null means 1 / 0).
inline void layernorm(ConstMatrixView<float> x, const float* gamma, const float* beta, float eps, MatrixView<float> y) {
    check_shape(y, x.rows(), x.cols(), "layernorm: y");
    arch::dispatch([&](auto tag) { layernorm(tag, x, gamma, beta, eps, y); });
}

/// RMSNorm over each row of x into y (same shape); gamma of length cols (null means 1).
inline void rmsnorm(ConstMatrixView<float> x, const float* gamma, float eps, MatrixView<float> y) {
    check_shape(y, x.rows(), x.cols(), "rmsnorm: y");
    arch::dispatch([&](auto tag) { rmsnorm(tag, x, gamma, eps, y); });
}

}  // namespace cpet::kernels
