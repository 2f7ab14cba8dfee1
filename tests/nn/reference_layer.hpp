// tests/nn/reference_layer.hpp — a plain Eigen (double) Transformer layer, the oracle of tests/nn and tests/pet.
//
// Written straight from the equations (HF BertLayer / LlamaDecoderLayer), one sequence at a time, with optional
// PET modifications given as functions so a test can apply the same change to the reference as to the layer.
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <functional>
#include <vector>

#include "cpet/nn/config.hpp"
#include "cpet/nn/weights.hpp"
#include "cpet/pet/policy.hpp"
#include "support/testing.hpp"

namespace cpet::testing {

/// Modifications of the reference matching a PET policy's hooks (empty functions mean "none").
struct reference_hooks {
    /// The low-rank term added to linear `t` before its activation, for input x [M, in]: returns [M, out]
    /// (an empty matrix: no change).
    std::function<MatD(pet::target, const MatD& x)> linear_delta;
    /// Transforms a sublayer output in place; `in` is what the sublayer consumed.
    std::function<void(pet::sublayer, const MatD& in, MatD& out)> sublayer;
    /// Prefix keys / values [P, kv_dim] (empty: none).
    MatD prefix_k, prefix_v;
    /// IA3-style rescaling: a factor per feature for the OUTPUT of q, k, v (before RoPE) and the INPUT of down
    /// (the FFN hidden activation); an empty vector means none.
    std::function<Eigen::VectorXd(pet::target)> scale;
};

inline MatD ref_linear(const MatD& x, const Matrix<float>& w, const std::vector<float>& b) {
    MatD y = x * to_double(w.view()).transpose();
    if (!b.empty())
        for (Eigen::Index r = 0; r < y.rows(); ++r)
            for (Eigen::Index c = 0; c < y.cols(); ++c) y(r, c) += b[static_cast<std::size_t>(c)];
    return y;
}

inline MatD ref_norm(nn::norm_kind kind, const MatD& x, const std::vector<float>& g, const std::vector<float>& b,
                     double eps) {
    MatD y(x.rows(), x.cols());
    const double n = double(x.cols());
    for (Eigen::Index r = 0; r < x.rows(); ++r) {
        if (kind == nn::norm_kind::layernorm) {
            const double mean = x.row(r).sum() / n;
            const double var = (x.row(r).array() - mean).square().sum() / n;
            for (Eigen::Index c = 0; c < x.cols(); ++c)
                y(r, c) = (x(r, c) - mean) / std::sqrt(var + eps) * g[std::size_t(c)] + (b.empty() ? 0.0 : b[std::size_t(c)]);
        } else {
            const double ms = x.row(r).squaredNorm() / n;
            for (Eigen::Index c = 0; c < x.cols(); ++c) y(r, c) = x(r, c) / std::sqrt(ms + eps) * g[std::size_t(c)];
        }
    }
    return y;
}

inline double ref_act(kernels::activation a, double x) {
    switch (a) {
        case kernels::activation::relu: return x > 0 ? x : 0;
        case kernels::activation::gelu_erf: return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0)));
        case kernels::activation::gelu_tanh:
            return 0.5 * x * (1 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
        case kernels::activation::silu: return x / (1 + std::exp(-x));
        default: return x;
    }
}

/// RoPE, rotate-half pairing, positions pos0 + row.
inline void ref_rope(MatD& x, index_t n_heads, index_t hd, index_t pos0, double base) {
    const index_t half = hd / 2;
    for (Eigen::Index t = 0; t < x.rows(); ++t)
        for (index_t h = 0; h < n_heads; ++h)
            for (index_t i = 0; i < half; ++i) {
                const double ang = double(pos0 + t) * std::pow(base, -2.0 * double(i) / double(hd));
                const double a = x(t, h * hd + i), b = x(t, h * hd + i + half);
                x(t, h * hd + i) = a * std::cos(ang) - b * std::sin(ang);
                x(t, h * hd + i + half) = b * std::cos(ang) + a * std::sin(ang);
            }
}

/// One sequence x [len, d] through the layer described by Config C, weights w and shape s.
template <class C>
MatD reference_layer(const nn::dense_layer_weights& w, const nn::layer_shape& s, const MatD& x,
                     const reference_hooks& hk = {}) {
    using namespace cpet::nn;
    const index_t len = x.rows(), hd = s.head_dim, group = s.n_heads / s.n_kv_heads;
    auto rescale = [&](pet::target t, MatD& m) {
        if (!hk.scale) return;
        const Eigen::VectorXd l = hk.scale(t);
        if (l.size()) m = m * l.asDiagonal();
    };
    auto lin = [&](pet::target t, const MatD& in0, const Matrix<float>& W, const std::vector<float>& b) {
        MatD in = in0;
        if (t == pet::target::down) rescale(t, in);
        MatD y = ref_linear(in, W, b);
        if (hk.linear_delta) {
            const MatD delta = hk.linear_delta(t, in);
            if (delta.size()) y += delta;
        }
        if (t == pet::target::q || t == pet::target::k || t == pet::target::v) rescale(t, y);
        return y;
    };
    auto attention = [&](const MatD& h) {
        MatD q = lin(pet::target::q, h, w.wq, w.bq), k = lin(pet::target::k, h, w.wk, w.bk),
             v = lin(pet::target::v, h, w.wv, w.bv);
        if (C::rope) {
            ref_rope(q, s.n_heads, hd, 0, s.rope_base);
            ref_rope(k, s.n_kv_heads, hd, 0, s.rope_base);
        }
        const index_t P = hk.prefix_k.rows();
        if (P > 0) {
            MatD kk(P + len, k.cols()), vv(P + len, v.cols());
            kk << hk.prefix_k, k;
            vv << hk.prefix_v, v;
            k = kk;
            v = vv;
        }
        MatD a = MatD::Zero(len, s.q_dim());
        for (index_t hh = 0; hh < s.n_heads; ++hh) {
            const index_t g = hh / group;
            for (index_t i = 0; i < len; ++i) {
                const index_t visible = C::mask == attention_mask::causal ? P + i + 1 : P + len;
                Eigen::VectorXd sc(visible);
                for (index_t j = 0; j < visible; ++j)
                    sc(j) = q.row(i).segment(hh * hd, hd).dot(k.row(j).segment(g * hd, hd)) / std::sqrt(double(hd));
                sc = (sc.array() - sc.maxCoeff()).exp();
                sc /= sc.sum();
                for (index_t j = 0; j < visible; ++j) a.row(i).segment(hh * hd, hd) += sc(j) * v.row(j).segment(g * hd, hd);
            }
        }
        MatD o = lin(pet::target::o, a, w.wo, w.bo);
        if (hk.sublayer) hk.sublayer(pet::sublayer::attention, h, o);
        return o;
    };
    auto ffn = [&](const MatD& h) {
        MatD f;
        if (C::ffn == ffn_kind::swiglu) {
            MatD g = lin(pet::target::gate, h, w.w_gate, {});
            MatD u = lin(pet::target::up, h, w.w_up, w.b_up);
            f = g.unaryExpr([](double z) { return ref_act(kernels::activation::silu, z); }).cwiseProduct(u);
        } else {
            f = lin(pet::target::up, h, w.w_up, w.b_up).unaryExpr([](double z) { return ref_act(C::act, z); });
        }
        MatD o = lin(pet::target::down, f, w.w_down, w.b_down);
        if (hk.sublayer) hk.sublayer(pet::sublayer::ffn, h, o);
        return o;
    };
    if constexpr (C::placement == norm_placement::post) {
        MatD h = ref_norm(C::norm, x + attention(x), w.norm1_gamma, w.norm1_beta, s.eps);
        return ref_norm(C::norm, h + ffn(h), w.norm2_gamma, w.norm2_beta, s.eps);
    } else {
        MatD t = x + attention(ref_norm(C::norm, x, w.norm1_gamma, w.norm1_beta, s.eps));
        return t + ffn(ref_norm(C::norm, t, w.norm2_gamma, w.norm2_beta, s.eps));
    }
}

/// A padded batch through the reference: rows [b·S, b·S + lengths[b]) per sequence, padded rows zero.
template <class C>
MatD reference_batch(const std::vector<nn::dense_layer_weights>& layers, const nn::layer_shape& s, const MatD& x,
                     const std::vector<index_t>& lengths, const std::vector<reference_hooks>& hooks = {}) {
    const index_t B = index_t(lengths.size()), S = B ? x.rows() / B : 0;
    MatD y = MatD::Zero(x.rows(), x.cols());
    for (index_t b = 0; b < B; ++b) {
        MatD h = x.middleRows(b * S, lengths[std::size_t(b)]);
        for (std::size_t l = 0; l < layers.size(); ++l)
            h = reference_layer<C>(layers[l], s, h, hooks.empty() ? reference_hooks{} : hooks[l]);
        y.middleRows(b * S, lengths[std::size_t(b)]) = h;
    }
    return y;
}

}  // namespace cpet::testing
