// cpet/kernels/rope.hpp — rotary position embedding (Su et al. 2021) applied in place to q or k rows.
//
// Row t of x holds n_heads heads of head_dim values; its position is pos0 + t. For pair index i < head_dim/2,
// θ_i = pos · base^(−2i/head_dim). Two pairings exist in the wild:
//   rope_style::half       — (x_i, x_{i+d/2}) rotated together: HF LLaMA / GPT-NeoX "rotate_half" (default);
//   rope_style::interleaved — (x_{2i}, x_{2i+1}): the original paper, GPT-J, Meta's LLaMA reference code.
//
// The inverse frequencies base^(−2i/d) are computed once per call (double). Per row, the angles pos·inv_freq are
// formed and reduced to [−π, π] in double — positions reach thousands of radians, where a float angle would
// already be off by ~1e-4 — and cos/sin are then evaluated on float vectors (xsimd) once for all heads of the row.
// The interleaved pairing uses one pair swap (swizzle) per vector: y = x·[c,c] + swap(x)·[−s,s].
#pragma once

#include <cmath>
#include <vector>

#include "cpet/arch/dispatch.hpp"
#include "cpet/core/buffer.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/core/parallel.hpp"

namespace cpet::kernels {

enum class rope_style { half, interleaved };

namespace detail::rope {

struct pair_swap {
    static constexpr unsigned get(unsigned i, unsigned) { return i ^ 1u; }
};

/// cs/sn[i] = cos/sin(pos · inv_freq[i]) for i < half.
template <class Arch>
void angles(double pos, const double* inv_freq, index_t half, float* cs, float* sn) {
    constexpr double two_pi = 6.283185307179586476925286766559;
    if constexpr (arch::is_simd_v<Arch>) {
        using B = xsimd::batch<float, Arch>;
        constexpr index_t W = B::size;
        for (index_t i = 0; i < half; ++i) {
            const double a = pos * inv_freq[i];
            cs[i] = float(a - two_pi * std::nearbyint(a / two_pi));  // reduced angle, |r| <= π
        }
        index_t i = 0;
        for (; i + W <= half; i += W) {
            const auto sc = xsimd::sincos(B::load_aligned(cs + i));
            sc.first.store_aligned(sn + i);
            sc.second.store_aligned(cs + i);
        }
        for (; i < half; ++i) {
            const float r = cs[i];
            cs[i] = std::cos(r);
            sn[i] = std::sin(r);
        }
    } else {
        for (index_t i = 0; i < half; ++i) {
            const double a = pos * inv_freq[i];
            cs[i] = float(std::cos(a));
            sn[i] = float(std::sin(a));
        }
    }
}

template <class Arch>
void rotate_half(float* v, index_t half, const float* cs, const float* sn) {
    index_t i = 0;
    if constexpr (arch::is_simd_v<Arch>) {
        using B = xsimd::batch<float, Arch>;
        constexpr index_t W = B::size;
        for (; i + W <= half; i += W) {
            const B a = B::load_unaligned(v + i), b = B::load_unaligned(v + half + i);
            const B c = B::load_aligned(cs + i), s = B::load_aligned(sn + i);
            xsimd::fms(a, c, b * s).store_unaligned(v + i);
            xsimd::fma(b, c, a * s).store_unaligned(v + half + i);
        }
    }
    for (; i < half; ++i) {
        const float x0 = v[i], x1 = v[i + half];
        v[i] = x0 * cs[i] - x1 * sn[i];
        v[i + half] = x1 * cs[i] + x0 * sn[i];
    }
}

/// c2/s2 are the per-element tables [c0, c0, c1, c1, ...] and [−s0, s0, −s1, s1, ...] of length head_dim.
template <class Arch>
void rotate_interleaved(float* v, index_t head_dim, const float* c2, const float* s2) {
    index_t i = 0;
    if constexpr (arch::is_simd_v<Arch>) {
        using B = xsimd::batch<float, Arch>;
        constexpr index_t W = B::size;
        constexpr auto swap = xsimd::make_batch_constant<xsimd::batch<uint32_t, Arch>, pair_swap>();
        for (; i + W <= head_dim; i += W) {
            const B x = B::load_unaligned(v + i);
            xsimd::fma(x, B::load_aligned(c2 + i), xsimd::swizzle(x, swap) * B::load_aligned(s2 + i))
                .store_unaligned(v + i);
        }
    }
    // whole pairs only: with an odd head_dim (refused by the checked entry and by the layers) the last value has no
    // partner, and v[i + 1] would be the next head's first value, or past the row for the last head
    for (; i + 1 < head_dim; i += 2) {
        const float x0 = v[i], x1 = v[i + 1];
        v[i] = x0 * c2[i] + x1 * s2[i];
        v[i + 1] = x1 * c2[i + 1] + x0 * s2[i + 1];
    }
}

}  // namespace detail::rope

/// The unchecked body on one path. An odd head_dim (which the checked entry refuses) leaves each head's last value
/// unrotated in both styles and never touches a value outside its head.
template <class Arch>
void rope(Arch, MatrixView<float> x, index_t n_heads, index_t head_dim, index_t pos0, float base, rope_style style) {
    const index_t half = head_dim / 2, rows = x.rows();
    if (rows == 0 || half == 0) return;
    std::vector<double> inv_freq(static_cast<std::size_t>(half));
    for (index_t i = 0; i < half; ++i) inv_freq[i] = std::pow(double(base), -2.0 * double(i) / double(head_dim));

    const int threads = rows > 1 && rows * n_heads * head_dim >= (index_t(1) << 15) ? max_threads() : 1;
    // Per thread: cos, sin (half each) and the interleaved tables (head_dim each), vector aligned.
    const index_t hp = (half + 15) / 16 * 16, dp = (head_dim + 15) / 16 * 16;
    aligned_buffer<float> scratch(std::size_t(threads) * std::size_t(2 * hp + 2 * dp));
    parallel_region(threads, [&](int tid, int nt) {
        float* cs = scratch.data() + std::size_t(tid) * std::size_t(2 * hp + 2 * dp);
        float* sn = cs + hp;
        float* c2 = sn + hp;
        float* s2 = c2 + dp;
        const index_t lo = rows * tid / nt, hi = rows * (tid + 1) / nt;
        for (index_t t = lo; t < hi; ++t) {
            detail::rope::angles<Arch>(double(pos0 + t), inv_freq.data(), half, cs, sn);
            float* row = x.row(t);
            if (style == rope_style::half) {
                for (index_t h = 0; h < n_heads; ++h) detail::rope::rotate_half<Arch>(row + h * head_dim, half, cs, sn);
            } else {
                for (index_t i = 0; i < half; ++i) {
                    c2[2 * i] = c2[2 * i + 1] = cs[i];
                    s2[2 * i] = -sn[i];
                    s2[2 * i + 1] = sn[i];
                }
                for (index_t h = 0; h < n_heads; ++h)
                    detail::rope::rotate_interleaved<Arch>(row + h * head_dim, head_dim, c2, s2);
            }
        }
    });
}

/// Rotates x [T, n_heads·head_dim] in place for positions pos0 .. pos0+T−1. head_dim must be even.
inline void rope(MatrixView<float> x, index_t n_heads, index_t head_dim, index_t pos0, float base = 10000.f,
                 rope_style style = rope_style::half) {
    require<shape_error>(head_dim > 0 && head_dim % 2 == 0, "rope: head_dim must be positive and even, got ", head_dim);
    require<shape_error>(n_heads >= 0, "rope: n_heads must not be negative, got ", n_heads);
    check_shape(x, -1, n_heads * head_dim, "rope: x");
    arch::dispatch([&](auto tag) { rope(tag, x, n_heads, head_dim, pos0, base, style); });
}

}  // namespace cpet::kernels
