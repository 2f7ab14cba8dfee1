// cpet/nn/prune.hpp — structured pruning of a whole layer: remove attention heads and FFN neurons, returning a
// smaller dense layer, its shape and the maps of what was kept (knowledge inheritance slices PET modules with
// them). The per-matrix pieces (scores, slicing, bias compensation) are compress/structured.hpp.
//
// Units removed:
//   heads   — whole KV groups: KV head g with its n_heads/n_kv_heads query heads (q rows, k/v rows, o columns).
//             For MHA a group is one head. Removing whole groups keeps n_heads/n_kv_heads (the GQA ratio), so
//             the pruned layer is an ordinary layer_shape. A group's score is the sum over the o-input channels
//             of its query heads.
//   neurons — FFN intermediate channels: up (and gate) rows with their bias, down columns.
// head_ratio / neuron_ratio ∈ [0, 1) are the fractions of units removed (rounded to the nearest count; at least one
// unit must remain). Scores: compress::prune_score (magnitude of the o / down columns, or FLAP's fluctuation with
// the calibration variance of their inputs). With bias_compensation (needs the calibration means) the o / down
// biases absorb the removed channels' mean contribution; the pruned layer then has those biases even when the
// dense one had none (LLaMA) — TransformerLayer accepts a bias on any linear.
#pragma once

#include <vector>

#include "cpet/compress/structured.hpp"
#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/nn/config.hpp"
#include "cpet/nn/weights.hpp"

namespace cpet::nn {

/// Moments of the inputs of o (the concatenated heads, [q_dim]) and down (the FFN hidden activation, [d_ff]) over
/// calibration tokens — what the fluctuation score and bias compensation need.
struct prune_calibration {
    compress::channel_moments o_in;
    compress::channel_moments down_in;
};

/// A structurally pruned layer: dense weights of the new shape and, for each pruned dimension, the indices (in
/// the dense layer, ascending) of what was kept.
struct pruned_layer {
    dense_layer_weights weights;
    layer_shape shape;
    std::vector<index_t> kept_heads;     ///< query heads  [shape.n_heads]
    std::vector<index_t> kept_kv_heads;  ///< KV heads     [shape.n_kv_heads]
    std::vector<index_t> kept_neurons;   ///< FFN neurons  [shape.d_ff]
};

/// Removes head groups and FFN neurons from the dense layer (w, s) as `o` says; `stats` is needed for the
/// fluctuation score and for bias compensation (format_error without it). The layer kind (gated FFN, biases) is
/// read from w. Throws format_error on bad ratios, shape_error on inconsistent weights or statistics.
inline pruned_layer prune_structured(const dense_layer_weights& w, const layer_shape& s,
                                     const compress::structured_options& o, const prune_calibration* stats = nullptr) {
    const layer_kind kind{w.norm1_beta.empty() ? norm_kind::rmsnorm : norm_kind::layernorm,
                          w.w_gate.empty() ? ffn_kind::mlp : ffn_kind::swiglu, !w.bq.empty()};
    check_weights(w, s, kind);
    const bool needs_data = o.score == compress::prune_score::fluctuation || o.bias_compensation;
    require<format_error>(!needs_data || stats != nullptr, "prune_structured: ",
                          o.bias_compensation ? "bias compensation" : "the fluctuation score",
                          " needs calibration statistics (prune_calibration of the o and down inputs)");
    if (needs_data) {
        require<shape_error>(stats->o_in.channels() == s.q_dim() && stats->o_in.samples > 0,
                             "prune_structured: prune_calibration.o_in has ", stats->o_in.channels(), " channels (",
                             stats->o_in.samples, " samples), expected ", s.q_dim());
        require<shape_error>(stats->down_in.channels() == s.d_ff && stats->down_in.samples > 0,
                             "prune_structured: prune_calibration.down_in has ", stats->down_in.channels(),
                             " channels (", stats->down_in.samples, " samples), expected ", s.d_ff);
    }
    const compress::channel_moments* o_stats = stats ? &stats->o_in : nullptr;
    const compress::channel_moments* d_stats = stats ? &stats->down_in : nullptr;
    const index_t hd = s.head_dim, group = s.n_heads / s.n_kv_heads;

    pruned_layer out;
    // Heads: rank KV groups by the summed scores of their query heads' o columns.
    const index_t keep_groups = compress::kept_count(s.n_kv_heads, o.head_ratio, "head group");
    const auto o_scores = compress::channel_scores(w.wo, o.score, o_stats, "prune_structured: wo");
    out.kept_kv_heads = compress::top_indices(compress::group_scores(o_scores, group * hd), keep_groups);
    out.kept_heads = compress::expand_groups(out.kept_kv_heads, group);
    // Neurons: rank by the down columns.
    const index_t keep_neurons = compress::kept_count(s.d_ff, o.neuron_ratio, "neuron");
    const auto d_scores = compress::channel_scores(w.w_down, o.score, d_stats, "prune_structured: w_down");
    out.kept_neurons = compress::top_indices(d_scores, keep_neurons);

    const auto q_rows = compress::expand_groups(out.kept_heads, hd);
    const auto kv_rows = compress::expand_groups(out.kept_kv_heads, hd);
    dense_layer_weights& p = out.weights;
    p.wq = compress::select_rows(w.wq, q_rows);
    p.wk = compress::select_rows(w.wk, kv_rows);
    p.wv = compress::select_rows(w.wv, kv_rows);
    p.wo = compress::select_cols(w.wo, q_rows);
    p.bq = compress::select(w.bq, q_rows);
    p.bk = compress::select(w.bk, kv_rows);
    p.bv = compress::select(w.bv, kv_rows);
    p.bo = w.bo;
    p.w_up = compress::select_rows(w.w_up, out.kept_neurons);
    if (!w.w_gate.empty()) p.w_gate = compress::select_rows(w.w_gate, out.kept_neurons);
    p.w_down = compress::select_cols(w.w_down, out.kept_neurons);
    p.b_up = compress::select(w.b_up, out.kept_neurons);
    p.b_down = w.b_down;
    p.norm1_gamma = w.norm1_gamma;
    p.norm1_beta = w.norm1_beta;
    p.norm2_gamma = w.norm2_gamma;
    p.norm2_beta = w.norm2_beta;
    if (o.bias_compensation) {
        const auto removed_o = compress::removed_indices(q_rows, s.q_dim());
        const auto removed_d = compress::removed_indices(out.kept_neurons, s.d_ff);
        if (!removed_o.empty()) p.bo = compress::compensated_bias(w.wo, w.bo, removed_o, stats->o_in);
        if (!removed_d.empty()) p.b_down = compress::compensated_bias(w.w_down, w.b_down, removed_d, stats->down_in);
    }

    out.shape = s;
    out.shape.n_kv_heads = keep_groups;
    out.shape.n_heads = keep_groups * group;
    out.shape.d_ff = keep_neurons;
    return out;
}

}  // namespace cpet::nn
