// cpet/kernels/norms.hpp — LayerNorm (BERT) and RMSNorm (LLaMA, T5) over the rows of a matrix.
//   layernorm: y = (x − mean) / sqrt(var + eps) · gamma + beta   (biased variance, like torch)
//   rmsnorm:   y = x / sqrt(mean(x²) + eps) · gamma
// y may alias x (same pointer and stride): each row is read completely (statistics) before it is written, and
// the write of element c reads only element c.
//
// LayerNorm takes two passes over the row for its statistics (mean, then Σ(x − mean)²) rather than the one-pass
// E[x²] − E[x]², which cancels catastrophically when |mean| ≫ std. Rows are split over threads when the matrix is
// large enough to pay for a parallel region (~32k elements).
#pragma once

#include <cmath>

#include "cpet/arch/dispatch.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/core/parallel.hpp"

namespace cpet::kernels {

namespace detail::norms {

inline constexpr index_t parallel_elements = index_t(1) << 15;

/// Σ x[c] and (with `centre`) Σ (x[c] − centre)², both in one helper so both norms share the loop shape.
template <class Arch, bool Squares>
float row_sum(const float* x, index_t n, float centre) {
    if constexpr (arch::is_simd_v<Arch>) {
        using B = xsimd::batch<float, Arch>;
        constexpr index_t W = B::size;
        const B cb(centre);
        B a0(0.f), a1(0.f), a2(0.f), a3(0.f);  // four chains hide the add latency
        auto term = [&](const float* p) {
            if constexpr (Squares) {
                const B d = B::load_unaligned(p) - cb;
                return d * d;
            } else {
                return B::load_unaligned(p);
            }
        };
        index_t c = 0;
        for (; c + 4 * W <= n; c += 4 * W) {
            a0 += term(x + c);
            a1 += term(x + c + W);
            a2 += term(x + c + 2 * W);
            a3 += term(x + c + 3 * W);
        }
        for (; c + W <= n; c += W) a0 += term(x + c);
        float s = xsimd::hadd((a0 + a1) + (a2 + a3));
        for (; c < n; ++c) s += Squares ? (x[c] - centre) * (x[c] - centre) : x[c];
        return s;
    } else {
        double s = 0;
        for (index_t c = 0; c < n; ++c) s += Squares ? double(x[c] - centre) * double(x[c] - centre) : double(x[c]);
        return float(s);
    }
}

/// y[c] = (x[c] − shift) · mul · gamma[c] + beta[c]  (gamma/beta may be null).
template <class Arch>
void row_affine(const float* x, index_t n, float shift, float mul, const float* gamma, const float* beta, float* y) {
    index_t c = 0;
    if constexpr (arch::is_simd_v<Arch>) {
        using B = xsimd::batch<float, Arch>;
        constexpr index_t W = B::size;
        const B sb(shift), mb(mul);
        for (; c + W <= n; c += W) {
            B t = (B::load_unaligned(x + c) - sb) * mb;
            if (gamma) t *= B::load_unaligned(gamma + c);
            if (beta) t += B::load_unaligned(beta + c);
            t.store_unaligned(y + c);
        }
    }
    for (; c < n; ++c) y[c] = (x[c] - shift) * mul * (gamma ? gamma[c] : 1.f) + (beta ? beta[c] : 0.f);
}

template <class Fn>
void for_rows(index_t rows, index_t cols, Fn&& fn) {
    if (rows > 1 && rows * cols >= parallel_elements) parallel_for(index_t(0), rows, fn);
    else
        for (index_t r = 0; r < rows; ++r) fn(r);
}

}  // namespace detail::norms

template <class Arch>
void layernorm(Arch, ConstMatrixView<float> x, const float* gamma, const float* beta, float eps, MatrixView<float> y) {
    const index_t n = x.cols();
    if (n == 0) return;
    detail::norms::for_rows(x.rows(), n, [&](index_t r) {
        const float* xr = x.row(r);
        const float mean = detail::norms::row_sum<Arch, false>(xr, n, 0.f) / float(n);
        const float var = detail::norms::row_sum<Arch, true>(xr, n, mean) / float(n);
        const float inv = float(1.0 / std::sqrt(double(var) + double(eps)));
        detail::norms::row_affine<Arch>(xr, n, mean, inv, gamma, beta, y.row(r));
    });
}

template <class Arch>
void rmsnorm(Arch, ConstMatrixView<float> x, const float* gamma, float eps, MatrixView<float> y) {
    const index_t n = x.cols();
    if (n == 0) return;
    detail::norms::for_rows(x.rows(), n, [&](index_t r) {
        const float* xr = x.row(r);
        const float ms = detail::norms::row_sum<Arch, true>(xr, n, 0.f) / float(n);
        const float inv = float(1.0 / std::sqrt(double(ms) + double(eps)));
        detail::norms::row_affine<Arch>(xr, n, 0.f, inv, gamma, nullptr, y.row(r));
    });
}

/// LayerNorm over each row of x into y (same shape); gamma/beta of length cols (null means 1 / 0).
inline void layernorm(ConstMatrixView<float> x, const float* gamma, const float* beta, float eps, MatrixView<float> y) {
    check_shape(x, -1, -1, "layernorm: x");
    check_shape(y, x.rows(), x.cols(), "layernorm: y");
    arch::dispatch([&](auto tag) { layernorm(tag, x, gamma, beta, eps, y); });
}

/// RMSNorm over each row of x into y (same shape); gamma of length cols (null means 1).
inline void rmsnorm(ConstMatrixView<float> x, const float* gamma, float eps, MatrixView<float> y) {
    check_shape(x, -1, -1, "rmsnorm: x");
    check_shape(y, x.rows(), x.cols(), "rmsnorm: y");
    arch::dispatch([&](auto tag) { rmsnorm(tag, x, gamma, eps, y); });
}

}  // namespace cpet::kernels
