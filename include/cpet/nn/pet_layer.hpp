// cpet/nn/pet_layer.hpp — layer-level operations that need both a backbone and a task's PET modules: LoRA
// merge / unmerge (and merge-and-recompress for lossy formats), parameter counts, the dense weights of a layer.
//
// The backbone stays const: a merge builds a NEW layer (one backbone may serve other tasks unmerged meanwhile).
#pragma once

#include <array>
#include <cmath>
#include <vector>

#include "cpet/compress/calibration.hpp"
#include "cpet/compress/format.hpp"
#include "cpet/core/error.hpp"
#include "cpet/nn/config.hpp"
#include "cpet/nn/layer.hpp"
#include "cpet/nn/weights.hpp"
#include "cpet/pet/lora.hpp"
#include "cpet/pet/none.hpp"
#include "cpet/pet/policy.hpp"
#include "cpet/pet/recovery.hpp"

namespace cpet::nn {

/// Whether LoRA merges exactly into format F: only dense fp32 weights (a quantized or sparse weight would have
/// to be recompressed, losing part of the update). Specialise for a new exact format.
template <class F>
inline constexpr bool lora_mergeable = std::is_same_v<F, compress::dense_f32>;

namespace detail {

template <class F>
std::vector<float> bias_of(const Linear<F>& l) {
    const float* b = l.bias();
    return b ? std::vector<float>(b, b + l.out_features()) : std::vector<float>{};
}

/// The linear of `layer` that target t names (gate: null without one).
template <class C>
const Linear<typename C::compression::format>* linear_of(const TransformerLayer<C>& layer, pet::target t) {
    switch (t) {
        case pet::target::q: return &layer.attention().q();
        case pet::target::k: return &layer.attention().k();
        case pet::target::v: return &layer.attention().v();
        case pet::target::o: return &layer.attention().o();
        case pet::target::up: return &layer.ffn().up();
        case pet::target::gate: return layer.ffn().gate();
        default: return &layer.ffn().down();
    }
}

/// The weight of target t in `w` (const or not).
template <class W>
    requires std::is_same_v<std::remove_const_t<W>, dense_layer_weights>
auto& weight_of(W& w, pet::target t) {
    switch (t) {
        case pet::target::q: return w.wq;
        case pet::target::k: return w.wk;
        case pet::target::v: return w.wv;
        case pet::target::o: return w.wo;
        case pet::target::up: return w.w_up;
        case pet::target::gate: return w.w_gate;
        default: return w.w_down;
    }
}

}  // namespace detail

/// The calibration of target t's input in a layer_calibration (null when absent or empty).
inline const compress::calibration* calibration_of(const layer_calibration* stats, pet::target t) {
    if (!stats) return nullptr;
    const compress::calibration* c = t == pet::target::o      ? &stats->o_in
                                     : t == pet::target::down ? &stats->down_in
                                     : (t == pet::target::q || t == pet::target::k || t == pet::target::v)
                                         ? &stats->attention_in
                                         : &stats->ffn_in;
    return c->samples > 0 ? c : nullptr;
}

/// The weights of a layer as dense matrices (each format's to_dense(): for a lossy format, what it computes with).
template <class C>
dense_layer_weights dense_weights_of(const TransformerLayer<C>& layer) {
    dense_layer_weights w;
    const auto& a = layer.attention();
    const auto& f = layer.ffn();
    w.wq = a.q().weight().to_dense(), w.wk = a.k().weight().to_dense(), w.wv = a.v().weight().to_dense();
    w.wo = a.o().weight().to_dense();
    w.w_up = f.up().weight().to_dense(), w.w_down = f.down().weight().to_dense();
    if (f.gate()) w.w_gate = f.gate()->weight().to_dense();
    w.bq = detail::bias_of(a.q()), w.bk = detail::bias_of(a.k()), w.bv = detail::bias_of(a.v());
    w.bo = detail::bias_of(a.o()), w.b_up = detail::bias_of(f.up()), w.b_down = detail::bias_of(f.down());
    w.norm1_gamma = layer.norm1().gamma(), w.norm1_beta = layer.norm1().beta();
    w.norm2_gamma = layer.norm2().gamma(), w.norm2_beta = layer.norm2().beta();
    return w;
}

/// Parameters of the backbone layer (weights, biases, norms), counted as logical values, not bytes.
template <class C>
index_t parameter_count(const TransformerLayer<C>& layer) {
    index_t n = 0;
    for (int i = 0; i < pet::target_count; ++i)
        if (const auto* l = detail::linear_of(layer, pet::target(i)))
            n += l->out_features() * l->in_features() + (l->bias() ? l->out_features() : 0);
    n += 2 * layer.norm1().features() * (C::norm == norm_kind::layernorm ? 2 : 1);
    return n;
}

/// A new layer whose weights are W + s·B·A for every target the LoRA `m` adapts (the same configuration; the
/// merged layer runs the other tasks, or none). Exact for dense formats; any other format throws format_error, since folding
/// an update into a quantized or sparse weight loses part of it: see merge_lora_and_recompress.
template <class C, class Modules>
TransformerLayer<C> merge_lora(const TransformerLayer<C>& layer, const Modules& m, int sign = +1) {
    using F = typename C::compression::format;
    require<format_error>(lora_mergeable<F>, "merge_lora: the layer's weights are compressed (compression "
                          "policy \"", C::compression::name(), "\"), not dense; merging a LoRA into them is lossy. "
                          "Keep the LoRA unmerged (it runs fused), or call merge_lora_and_recompress, which "
                          "reports the error it introduces");
    auto w = dense_weights_of(layer);
    for (int i = 0; i < pet::target_count; ++i) {
        const auto t = pet::target(i);
        if (m.rank(t) > 0) detail::weight_of(w, t) = pet::merge_weight(detail::weight_of(w, t), m, t, sign);
    }
    return TransformerLayer<C>(w, layer.shape());
}

/// The inverse of merge_lora: W − s·B·A (exact up to fp32 rounding of the merged weight).
template <class C, class Modules>
TransformerLayer<C> unmerge_lora(const TransformerLayer<C>& layer, const Modules& m) {
    return merge_lora(layer, m, -1);
}

/// What merge_lora_and_recompress produced and the error it introduced.
template <class C>
struct recompressed_merge {
    TransformerLayer<C> layer;
    /// Per target: ‖C(Ŵ + s·B·A) − (Ŵ + s·B·A)‖_F / ‖Ŵ + s·B·A‖_F (0 for targets the LoRA does not adapt), where
    /// Ŵ is the compressed weight and C the layer's compression policy: how far the merged layer is from the
    /// compressed layer running the LoRA unmerged.
    std::array<double, pet::target_count> weight_error{};
    double max_weight_error() const noexcept {
        double e = 0;
        for (double x : weight_error) e = std::max(e, x);
        return e;
    }
};

/// Merges the LoRA into any format by recompressing Ŵ + s·B·A with the layer's own compression policy (with
/// `stats` when given), and reports the relative weight error that introduces.
template <class C, class Modules>
recompressed_merge<C> merge_lora_and_recompress(const TransformerLayer<C>& layer, const Modules& m,
                                                               const layer_calibration* stats = nullptr) {
    using Out = C;
    auto w = dense_weights_of(layer);
    std::array<double, pet::target_count> err{};
    for (int i = 0; i < pet::target_count; ++i) {
        const auto t = pet::target(i);
        if (m.rank(t) == 0) continue;
        auto& wt = detail::weight_of(w, t);
        wt = pet::merge_weight(wt, m, t);
        const Matrix<float> back = C::compression::compress(wt, calibration_of(stats, t)).to_dense();
        const double ref = as_eigen(wt).template cast<double>().norm();
        const double diff = (as_eigen(back).template cast<double>() - as_eigen(wt).template cast<double>()).norm();
        err[std::size_t(i)] = ref > 0 ? diff / ref : diff;
    }
    return {TransformerLayer<Out>(w, layer.shape(), stats), err};
}

/// Linear recovery modules for a compressed layer, initialised from the truncated SVD of each linear's residual
/// E = W − Ŵ (`original` holds the dense weights the layer was compressed from). With `stats` of a linear's input
/// site the init is activation-aware (o.weighting = automatic picks the richest the statistics allow):
///   Gram matrix Σxᵀx collected (nn::calibrate with {.hessian = true}) → EoRA, min ‖X(E − BA)ᵀ‖_F exactly;
///   Σx² only                                                          → min ‖(E − BA)·diag(√mean x²)‖_F;
///   no statistics for the site                                        → the plain SVD, min ‖E − BA‖_F.
/// Take the statistics from the inputs the compressed layer's linears see (nn::calibrate(compressed, set)): that
/// is where the recovery term runs. After structured pruning they must be the pruned layer's (narrower sites).
template <class C>
pet::recovery_linear::modules init_recovery(const TransformerLayer<C>& compressed, const dense_layer_weights& original,
                                            const pet::recovery_linear::options& o = {},
                                            const layer_calibration* stats = nullptr) {
    check_weights(original, compressed.shape(), kind_of<C>);
    std::array<Matrix<float>, pet::target_count> hat;
    return pet::recovery_linear::from_residual(
        compressed.pet_dims(), o, [&](pet::target t) -> ConstMatrixView<float> { return detail::weight_of(original, t); },
        [&](pet::target t) -> ConstMatrixView<float> {
            return hat[std::size_t(t)] = detail::linear_of(compressed, t)->weight().to_dense();
        },
        [&](pet::target t) { return calibration_of(stats, t); });
}

}  // namespace cpet::nn
