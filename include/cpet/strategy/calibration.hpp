// cpet/strategy/calibration.hpp — calibration statistics of whole stacks and models over several batches: what the
// data-aware steps of CPET read (GPTQ's and EoRA's Gram matrices Σxᵀx, Wanda's Σx², FLAP's moments).
//
// nn::calibrate collects one layer's statistics on one calibration_set (per input site: Σx², max |x|, optionally
// Σxᵀx, and the moments of the o / down inputs; padded rows excluded). Here:
//   accumulate(into, from)             adds the statistics of more tokens into `into` (sums add, maxima max)
//   calibrate_stack(stack, batches)    layer i's statistics on what layers 0..i−1 of the stack, as they are (dense
//                                      or compressed), produce from every batch: the inputs each layer sees at
//                                      run time, which is what a recovery module beside a compressed linear faces
//   calibrate_model(model, batches)    the same from token batches through the model's embeddings
// Batches may differ in size and padding; the statistics are those of all their real tokens together.
#pragma once

#include <algorithm>
#include <cstddef>
#include <span>
#include <utility>
#include <vector>

#include "cpet/compress/calibration.hpp"
#include "cpet/compress/structured.hpp"
#include "cpet/core/eigen.hpp"
#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/nn/compress.hpp"
#include "cpet/nn/model.hpp"
#include "cpet/nn/stack.hpp"

namespace cpet::strategy {

namespace detail {

inline bool empty_site(const compress::calibration& c) noexcept { return c.samples == 0 && c.sum_sq.empty(); }
inline bool empty_site(const compress::channel_moments& m) noexcept { return m.samples == 0 && m.sum.empty(); }

inline void check_site(const compress::calibration& into, const compress::calibration& from, const char* site) {
    if (empty_site(from) || empty_site(into)) return;
    require<shape_error>(into.channels() == from.channels() && from.max_abs.size() == from.sum_sq.size() &&
                             into.max_abs.size() == into.sum_sq.size(),
                         "strategy::accumulate: the ", site, " statistics have ", from.channels(),
                         " channels, the accumulated ones ", into.channels());
    require<shape_error>(into.has_hessian() == from.has_hessian(), "strategy::accumulate: the ", site,
                         " statistics ", from.has_hessian() ? "carry" : "lack", " a Gram matrix, the accumulated ones ",
                         into.has_hessian() ? "carry one" : "do not");
    if (from.has_hessian())
        check_shape(from.hessian.view(), into.hessian.rows(), into.hessian.cols(),
                    "strategy::accumulate: Gram matrix");
}
inline void check_site(const compress::channel_moments& into, const compress::channel_moments& from,
                       const char* site) {
    if (empty_site(from) || empty_site(into)) return;
    require<shape_error>(into.channels() == from.channels() && into.sum_sq.size() == into.sum.size() &&
                             from.sum_sq.size() == from.sum.size(),
                         "strategy::accumulate: the ", site, " moments have ", from.channels(),
                         " channels, the accumulated ones ", into.channels());
}

inline void add_site(compress::calibration& into, const compress::calibration& from) {
    if (empty_site(from)) return;
    if (empty_site(into)) {
        into = from;
        return;
    }
    for (std::size_t j = 0; j < from.sum_sq.size(); ++j) {
        into.sum_sq[j] += from.sum_sq[j];
        if (!(from.max_abs[j] <= into.max_abs[j])) into.max_abs[j] = from.max_abs[j];  // keeps a NaN visible
    }
    into.samples += from.samples;
    if (from.has_hessian()) as_eigen(into.hessian) += as_eigen(from.hessian);
}
inline void add_site(compress::channel_moments& into, const compress::channel_moments& from) {
    if (empty_site(from)) return;
    if (empty_site(into)) {
        into = from;
        return;
    }
    for (std::size_t j = 0; j < from.sum.size(); ++j) {
        into.sum[j] += from.sum[j];
        into.sum_sq[j] += from.sum_sq[j];
    }
    into.samples += from.samples;
}

}  // namespace detail

/// Adds `from` (statistics of more tokens at the same sites) into `into`; an empty `into` becomes `from`. Throws
/// shape_error, leaving `into` as it was, when the sites differ in width or one has a Gram matrix and the other not.
inline void accumulate(nn::layer_statistics& into, const nn::layer_statistics& from) {
    detail::check_site(into.linears.attention_in, from.linears.attention_in, "q/k/v input");
    detail::check_site(into.linears.o_in, from.linears.o_in, "o input");
    detail::check_site(into.linears.ffn_in, from.linears.ffn_in, "up/gate input");
    detail::check_site(into.linears.down_in, from.linears.down_in, "down input");
    detail::check_site(into.moments.o_in, from.moments.o_in, "o input");
    detail::check_site(into.moments.down_in, from.moments.down_in, "down input");
    detail::add_site(into.linears.attention_in, from.linears.attention_in);
    detail::add_site(into.linears.o_in, from.linears.o_in);
    detail::add_site(into.linears.ffn_in, from.linears.ffn_in);
    detail::add_site(into.linears.down_in, from.linears.down_in);
    detail::add_site(into.moments.o_in, from.moments.o_in);
    detail::add_site(into.moments.down_in, from.moments.down_in);
}

/// Per layer of `stack`, the statistics of its input sites over every batch, layer i fed by what layers 0..i−1
/// produce (see the top of this file). `o.hessian` adds the Gram matrices. Throws shape_error on no batch or an
/// empty one, numeric_error on non-finite samples or statistics (as nn::calibrate).
template <nn::LayerConfig C>
std::vector<nn::layer_statistics> calibrate_stack(const nn::Stack<C>& stack,
                                                  std::span<const nn::calibration_set> batches,
                                                  const nn::calibration_options& o = {}) {
    constexpr const char* who = "strategy::calibrate_stack";
    require<shape_error>(!batches.empty(), who, ": no calibration batch given");
    require<shape_error>(stack.size() > 0, who, ": the stack has no layer");
    const index_t d = stack.layer(0).shape().d_model;
    for (const auto& b : batches) nn::detail::check_samples(b, d, who);
    std::vector<nn::layer_statistics> out(stack.size());
    for (const auto& b : batches) {
        nn::calibration_set cur{b.x, b.lengths};
        for (std::size_t i = 0; i < stack.size(); ++i) {
            const bool last = i + 1 == stack.size();
            Matrix<float> next;
            accumulate(out[i], nn::detail::run_probe(stack.layer(i), cur, o.hessian, last ? nullptr : &next, who));
            if (!last) cur.x = std::move(next);
        }
    }
    return out;
}
template <nn::LayerConfig C>
std::vector<nn::layer_statistics> calibrate_stack(const nn::Stack<C>& stack, const nn::calibration_set& batch,
                                                  const nn::calibration_options& o = {}) {
    return calibrate_stack(stack, std::span<const nn::calibration_set>(&batch, 1), o);
}

/// The same for a model: each token batch goes through the model's embeddings, then the stack (the final norm and
/// heads read no linear site of a layer).
template <nn::LayerConfig C>
std::vector<nn::layer_statistics> calibrate_model(const nn::Model<C>& model, std::span<const nn::token_batch> batches,
                                                  const nn::calibration_options& o = {}) {
    constexpr const char* who = "strategy::calibrate_model";
    require<shape_error>(!batches.empty(), who, ": no calibration batch given");
    std::vector<nn::calibration_set> sets;
    sets.reserve(batches.size());
    for (const auto& t : batches) {
        const auto L = t.layout(who);
        model.embeddings().check(t, L, who);
        nn::calibration_set s{Matrix<float>(L.rows(), model.d_model()), t.lengths};
        model.embeddings().forward(t, L, s.x);
        sets.push_back(std::move(s));
    }
    return calibrate_stack(model.stack(), std::span<const nn::calibration_set>(sets), o);
}

/// The layer_calibration of every layer (what compression policies and nn::init_recovery read).
inline std::vector<nn::layer_calibration> linears_of(std::vector<nn::layer_statistics> stats) {
    std::vector<nn::layer_calibration> out;
    out.reserve(stats.size());
    for (auto& s : stats) out.push_back(std::move(s.linears));
    return out;
}

}  // namespace cpet::strategy
