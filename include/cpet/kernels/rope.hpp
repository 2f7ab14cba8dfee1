// cpet/kernels/rope.hpp — rotary position embedding (Su et al. 2021) applied in place to q or k rows.
//
// Row t of x holds n_heads heads of head_dim values; its position is pos0 + t. For pair index i < head_dim/2,
// θ_i = pos · base^(−2i/head_dim). Two pairings exist in the wild:
//   rope_style::half       — (x_i, x_{i+d/2}) rotated together: HF LLaMA / GPT-NeoX "rotate_half" (default);
//   rope_style::interleaved — (x_{2i}, x_{2i+1}): the original paper, GPT-J, Meta's LLaMA reference code.
#pragma once

#include <cmath>

#include "cpet/arch/dispatch.hpp"
#include "cpet/core/matrix.hpp"

namespace cpet::kernels {

enum class rope_style { half, interleaved };

template <class Arch>
void rope(Arch, MatrixView<float> x, index_t n_heads, index_t head_dim, index_t pos0, float base, rope_style style) {
    const index_t half = head_dim / 2;
    for (index_t t = 0; t < x.rows(); ++t) {
        const double pos = double(pos0 + t);
        for (index_t h = 0; h < n_heads; ++h) {
            float* v = x.row(t) + h * head_dim;
            for (index_t i = 0; i < half; ++i) {
                const double ang = pos * std::pow(double(base), -2.0 * double(i) / double(head_dim));
                const float c = float(std::cos(ang)), s = float(std::sin(ang));
                const index_t a = style == rope_style::half ? i : 2 * i;
                const index_t b = style == rope_style::half ? i + half : 2 * i + 1;
                const float x0 = v[a], x1 = v[b];
                v[a] = x0 * c - x1 * s;
                v[b] = x1 * c + x0 * s;
            }
        }
    }
}

/// Rotates x [T, n_heads·head_dim] in place for positions pos0 .. pos0+T−1. head_dim must be even.
inline void rope(MatrixView<float> x, index_t n_heads, index_t head_dim, index_t pos0, float base = 10000.f,
                 rope_style style = rope_style::half) {
    require<shape_error>(head_dim > 0 && head_dim % 2 == 0, "rope: head_dim must be positive and even, got ", head_dim);
    check_shape(x, -1, n_heads * head_dim, "rope: x");
    arch::dispatch([&](auto tag) { rope(tag, x, n_heads, head_dim, pos0, base, style); });
}

}  // namespace cpet::kernels
