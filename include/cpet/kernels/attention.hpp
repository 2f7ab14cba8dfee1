// cpet/kernels/attention.hpp — multi-head / grouped-query scaled dot-product attention for one sequence.
//
//   out_h = softmax(q_h · k_gᵀ · scale + mask) · v_g,   g = h / (n_heads / n_kv_heads)
// Masks: keys j >= kv_len are padding; with `causal`, query i sees keys j <= q_pos0 + i (q_pos0 is the
// position of query row 0 among the keys: 0 for a full sequence, cache length for decoding). A query that sees
// no key gets a zero output.
#pragma once

#include <cmath>
#include <limits>
#include <vector>

#include "cpet/arch/dispatch.hpp"
#include "cpet/core/matrix.hpp"

namespace cpet::kernels {

struct attention_args {
    ConstMatrixView<float> q;  ///< [Sq, n_heads·head_dim]
    ConstMatrixView<float> k;  ///< [Sk, n_kv_heads·head_dim]
    ConstMatrixView<float> v;  ///< [Sk, n_kv_heads·head_dim]
    MatrixView<float> out;     ///< [Sq, n_heads·head_dim]
    index_t n_heads = 0;
    index_t n_kv_heads = 0;
    index_t head_dim = 0;
    float scale = 0.f;   ///< 0 means 1/sqrt(head_dim)
    bool causal = false;
    index_t q_pos0 = 0;   ///< causal offset: query row i sits at key position q_pos0 + i
    index_t kv_len = -1;  ///< keys at index >= kv_len are masked (padding); −1 means all Sk keys
};

template <class Arch>
void attention(Arch, const attention_args& a) {
    const index_t Sq = a.q.rows(), Sk = a.k.rows(), D = a.head_dim;
    const index_t group = a.n_heads / a.n_kv_heads;
    const float scale = a.scale != 0.f ? a.scale : 1.f / std::sqrt(float(D));
    const index_t kv_len = a.kv_len < 0 ? Sk : a.kv_len;
    std::vector<double> s(static_cast<std::size_t>(Sk));
    for (index_t h = 0; h < a.n_heads; ++h) {
        const index_t g = h / group;
        for (index_t i = 0; i < Sq; ++i) {
            index_t visible = kv_len;
            if (a.causal && a.q_pos0 + i + 1 < visible) visible = a.q_pos0 + i + 1;
            float* o = a.out.row(i) + h * D;
            if (visible <= 0) {
                for (index_t d = 0; d < D; ++d) o[d] = 0.f;
                continue;
            }
            double mx = -std::numeric_limits<double>::infinity();
            for (index_t j = 0; j < visible; ++j) {
                double dot = 0;
                for (index_t d = 0; d < D; ++d) dot += double(a.q(i, h * D + d)) * a.k(j, g * D + d);
                s[j] = dot * scale;
                mx = std::fmax(mx, s[j]);
            }
            double sum = 0;
            for (index_t j = 0; j < visible; ++j) sum += (s[j] = std::exp(s[j] - mx));
            for (index_t d = 0; d < D; ++d) {
                double acc = 0;
                for (index_t j = 0; j < visible; ++j) acc += s[j] * a.v(j, g * D + d);
                o[d] = float(acc / sum);
            }
        }
    }
}

/// Checks the arguments and runs attention on the active path.
inline void attention(const attention_args& a) {
    require<shape_error>(a.n_heads > 0 && a.n_kv_heads > 0 && a.head_dim > 0, "attention: n_heads (", a.n_heads,
                         "), n_kv_heads (", a.n_kv_heads, ") and head_dim (", a.head_dim, ") must be positive");
    require<shape_error>(a.n_heads % a.n_kv_heads == 0, "attention: n_heads (", a.n_heads,
                         ") must be a multiple of n_kv_heads (", a.n_kv_heads, ")");
    check_shape(a.q, -1, a.n_heads * a.head_dim, "attention: q");
    check_shape(a.k, -1, a.n_kv_heads * a.head_dim, "attention: k");
    check_shape(a.v, a.k.rows(), a.n_kv_heads * a.head_dim, "attention: v");
    check_shape(a.out, a.q.rows(), a.n_heads * a.head_dim, "attention: out");
    require<shape_error>(a.kv_len <= a.k.rows(), "attention: kv_len ", a.kv_len, " exceeds the ", a.k.rows(), " keys");
    arch::dispatch([&](auto tag) { attention(tag, a); });
}

}  // namespace cpet::kernels
