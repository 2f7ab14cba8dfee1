// cpet/nn/weights.hpp — one layer's dense weights as a checkpoint holds them, and a seeded random initialiser.
//
// Linears are [out, in] like torch.nn.Linear (HF: q_proj / query, k_proj / key, v_proj / value, o_proj /
// attention.output.dense, up_proj / intermediate.dense, gate_proj, down_proj / output.dense). norm1 is the norm
// around attention (BERT attention.output.LayerNorm, LLaMA input_layernorm), norm2 the one around the FFN.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "cpet/core/matrix.hpp"
#include "cpet/nn/config.hpp"

namespace cpet::nn {

struct dense_layer_weights {
    Matrix<float> wq, wk, wv, wo;      ///< [q_dim, d], [kv_dim, d], [kv_dim, d], [d, q_dim]
    Matrix<float> w_up, w_gate, w_down;  ///< [d_ff, d], [d_ff, d] (SwiGLU only, else empty), [d, d_ff]
    std::vector<float> bq, bk, bv, bo, b_up, b_down;  ///< empty when the layer has no biases
    std::vector<float> norm1_gamma, norm1_beta;       ///< [d]; beta empty for RMSNorm
    std::vector<float> norm2_gamma, norm2_beta;
};

namespace detail {

inline void fill_uniform(std::mt19937_64& gen, float* p, std::size_t n, float lo, float hi) {
    std::uniform_real_distribution<float> dist(lo, hi);
    for (std::size_t i = 0; i < n; ++i) p[i] = dist(gen);
}
inline Matrix<float> random_linear(std::mt19937_64& gen, index_t out, index_t in) {
    // Kaiming-uniform bound 1/sqrt(in) as torch.nn.Linear: activations keep their scale through the layer.
    Matrix<float> w(out, in);
    const float a = 1.f / std::sqrt(float(in));
    fill_uniform(gen, w.data(), static_cast<std::size_t>(w.size()), -a, a);
    return w;
}
inline std::vector<float> random_vector(std::mt19937_64& gen, index_t n, float lo, float hi) {
    std::vector<float> v(static_cast<std::size_t>(n));
    fill_uniform(gen, v.data(), v.size(), lo, hi);
    return v;
}

}  // namespace detail

/// Random weights of the given shape and kind, reproducible from `seed` (same seed, same weights on every
/// machine with the same standard library). Gammas are near 1, betas and biases small.
inline dense_layer_weights random_layer_weights(const layer_shape& s, std::uint64_t seed, layer_kind kind) {
    s.validate();
    std::mt19937_64 gen(seed);
    dense_layer_weights w;
    const index_t d = s.d_model;
    w.wq = detail::random_linear(gen, s.q_dim(), d);
    w.wk = detail::random_linear(gen, s.kv_dim(), d);
    w.wv = detail::random_linear(gen, s.kv_dim(), d);
    w.wo = detail::random_linear(gen, d, s.q_dim());
    w.w_up = detail::random_linear(gen, s.d_ff, d);
    if (kind.ffn == ffn_kind::swiglu) w.w_gate = detail::random_linear(gen, s.d_ff, d);
    w.w_down = detail::random_linear(gen, d, s.d_ff);
    if (kind.bias) {
        w.bq = detail::random_vector(gen, s.q_dim(), -0.1f, 0.1f);
        w.bk = detail::random_vector(gen, s.kv_dim(), -0.1f, 0.1f);
        w.bv = detail::random_vector(gen, s.kv_dim(), -0.1f, 0.1f);
        w.bo = detail::random_vector(gen, d, -0.1f, 0.1f);
        w.b_up = detail::random_vector(gen, s.d_ff, -0.1f, 0.1f);
        w.b_down = detail::random_vector(gen, d, -0.1f, 0.1f);
    }
    w.norm1_gamma = detail::random_vector(gen, d, 0.8f, 1.2f);
    w.norm2_gamma = detail::random_vector(gen, d, 0.8f, 1.2f);
    if (kind.norm == norm_kind::layernorm) {
        w.norm1_beta = detail::random_vector(gen, d, -0.1f, 0.1f);
        w.norm2_beta = detail::random_vector(gen, d, -0.1f, 0.1f);
    }
    return w;
}

/// Throws shape_error naming the first tensor of `w` that does not fit `s` and `kind`.
inline void check_weights(const dense_layer_weights& w, const layer_shape& s, layer_kind kind) {
    s.validate();
    const index_t d = s.d_model;
    auto mat = [](const Matrix<float>& m, index_t r, index_t c, const char* what) {
        check_shape(m.view(), r, c, what);
    };
    mat(w.wq, s.q_dim(), d, "dense_layer_weights.wq");
    mat(w.wk, s.kv_dim(), d, "dense_layer_weights.wk");
    mat(w.wv, s.kv_dim(), d, "dense_layer_weights.wv");
    mat(w.wo, d, s.q_dim(), "dense_layer_weights.wo");
    mat(w.w_up, s.d_ff, d, "dense_layer_weights.w_up");
    if (kind.ffn == ffn_kind::swiglu) mat(w.w_gate, s.d_ff, d, "dense_layer_weights.w_gate");
    mat(w.w_down, d, s.d_ff, "dense_layer_weights.w_down");
    auto vec = [](const std::vector<float>& v, index_t n, bool needed, const char* what) {
        const index_t got = static_cast<index_t>(v.size());
        if (needed)
            require<shape_error>(got == n, what, ": expected ", n, " values, got ", got);
        else
            require<shape_error>(got == 0 || got == n, what, ": expected ", n, " values or none, got ", got);
    };
    vec(w.bq, s.q_dim(), kind.bias, "dense_layer_weights.bq");
    vec(w.bk, s.kv_dim(), kind.bias, "dense_layer_weights.bk");
    vec(w.bv, s.kv_dim(), kind.bias, "dense_layer_weights.bv");
    vec(w.bo, d, kind.bias, "dense_layer_weights.bo");
    vec(w.b_up, s.d_ff, kind.bias, "dense_layer_weights.b_up");
    vec(w.b_down, d, kind.bias, "dense_layer_weights.b_down");
    vec(w.norm1_gamma, d, true, "dense_layer_weights.norm1_gamma");
    vec(w.norm2_gamma, d, true, "dense_layer_weights.norm2_gamma");
    const bool ln = kind.norm == norm_kind::layernorm;
    vec(w.norm1_beta, d, ln, "dense_layer_weights.norm1_beta");
    vec(w.norm2_beta, d, ln, "dense_layer_weights.norm2_beta");
    require<shape_error>(ln || (w.norm1_beta.empty() && w.norm2_beta.empty()),
                         "dense_layer_weights.norm1_beta / norm2_beta: RMSNorm has no beta, expected none");
}

}  // namespace cpet::nn
