// cpet/kernels/softmax.hpp — numerically stable row softmax, in place: x_i ← exp(x_i − max) / Σ exp(x_j − max).
// A row of all −inf (fully masked) becomes all zeros rather than NaN.
//
// Three passes per row (max; exp, store and sum; scale). The row tail shorter than a vector goes through a
// small −inf padded buffer, so every element takes the same xsimd::exp and a row's values do not depend on where
// the vector boundary falls. Rows are split over threads for large matrices.
#pragma once

#include <cmath>
#include <limits>

#include "cpet/arch/dispatch.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/core/parallel.hpp"

namespace cpet::kernels {

namespace detail::softmax {

template <class Arch>
void row(float* x, index_t n) {
    constexpr float ninf = -std::numeric_limits<float>::infinity();
    if constexpr (arch::is_simd_v<Arch>) {
        using B = xsimd::batch<float, Arch>;
        constexpr index_t W = B::size;
        const index_t nv = n / W * W, tail = n - nv;
        B mx(ninf);
        for (index_t c = 0; c < nv; c += W) mx = xsimd::max(mx, B::load_unaligned(x + c));
        alignas(64) float buf[W];
        mx.store_aligned(buf);
        float m = ninf;
        for (index_t i = 0; i < W; ++i) m = buf[i] > m ? buf[i] : m;
        for (index_t c = nv; c < n; ++c) m = x[c] > m ? x[c] : m;
        if (m == ninf) {
            for (index_t c = 0; c < n; ++c) x[c] = 0.f;
            return;
        }
        const B mb(m);
        B sum(0.f);
        for (index_t c = 0; c < nv; c += W) {
            const B e = xsimd::exp(B::load_unaligned(x + c) - mb);
            e.store_unaligned(x + c);
            sum += e;
        }
        if (tail) {
            for (index_t i = 0; i < W; ++i) buf[i] = i < tail ? x[nv + i] : ninf;
            const B e = xsimd::exp(B::load_aligned(buf) - mb);  // exp(−inf) = 0 in the padding
            sum += e;
            e.store_aligned(buf);
            for (index_t i = 0; i < tail; ++i) x[nv + i] = buf[i];
        }
        const float invs = 1.f / xsimd::hadd(sum);
        const B inv(invs);
        for (index_t c = 0; c < nv; c += W) (B::load_unaligned(x + c) * inv).store_unaligned(x + c);
        for (index_t c = nv; c < n; ++c) x[c] *= invs;
    } else {
        float m = ninf;
        for (index_t c = 0; c < n; ++c) m = x[c] > m ? x[c] : m;
        if (m == ninf) {
            for (index_t c = 0; c < n; ++c) x[c] = 0.f;
            return;
        }
        double s = 0;
        for (index_t c = 0; c < n; ++c) s += (x[c] = std::exp(x[c] - m));
        const float inv = float(1.0 / s);
        for (index_t c = 0; c < n; ++c) x[c] *= inv;
    }
}

}  // namespace detail::softmax

template <class Arch>
void softmax_rows(Arch, MatrixView<float> x) {
    const index_t rows = x.rows(), n = x.cols();
    if (n == 0) return;
    auto one = [&](index_t r) { detail::softmax::row<Arch>(x.row(r), n); };
    if (rows > 1 && rows * n >= (index_t(1) << 15)) parallel_for(index_t(0), rows, one);
    else
        for (index_t r = 0; r < rows; ++r) one(r);
}

inline void softmax_rows(MatrixView<float> x) {
    check_shape(x, -1, -1, "softmax_rows: x");
    arch::dispatch([&](auto tag) { softmax_rows(tag, x); });
}

}  // namespace cpet::kernels
