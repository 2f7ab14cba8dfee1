// cpet/compress/structured.hpp — structured pruning on plain matrices: score input channels (and groups of
// them), choose what to keep, slice rows / columns, and the bias that compensates removed channels.
//
// The whole-layer transform (which linears share which channels: a head's q/k/v rows and o columns, a neuron's
// up/gate rows and down column) lives in nn/prune.hpp, since compress/ may not know nn/'s layer types.
//
// Scores of input channel j of a linear W [out, in] (the o projection for heads, down for FFN neurons):
//   magnitude   : ‖W[:, j]‖₂²                                    (data-free)
//   fluctuation : Var(x_j) · ‖W[:, j]‖₂²  — FLAP (An et al. 2024, "Fluctuation-based Adaptive Structured Pruning
//                 for Large Language Models", AAAI): how much the channel's variation over the calibration
//                 tokens moves the output; a channel that is nearly constant can be replaced by its mean.
// A group's score (a head: head_dim consecutive channels) is the sum of its channels' scores.
// Bias compensation (FLAP): removing channels J replaces x_J by its calibration mean, which is the constant c
// that minimises E‖W[:, J]·(x_J − c)‖² — so the output bias gains Σ_{j∈J} W[:, j]·mean_j.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"

namespace cpet::compress {

/// How channels are ranked.
enum class prune_score : int {
    magnitude,    ///< ‖W[:, j]‖²  (no data needed)
    fluctuation,  ///< Var(x_j)·‖W[:, j]‖²  (FLAP; needs channel_moments of the linear's input)
};

/// What to remove from a layer.
struct structured_options {
    double head_ratio = 0.0;    ///< fraction of attention head groups to remove, in [0, 1) (see nn/prune.hpp)
    double neuron_ratio = 0.0;  ///< fraction of FFN intermediate neurons to remove, in [0, 1)
    prune_score score = prune_score::magnitude;
    bool bias_compensation = false;  ///< add removed channels' mean contribution into the output bias (needs data)
};

/// First and second moments of each input channel of one linear over calibration tokens (double sums).
struct channel_moments {
    std::vector<double> sum;     ///< [in] Σ_rows x_j
    std::vector<double> sum_sq;  ///< [in] Σ_rows x_j²
    std::int64_t samples = 0;    ///< rows seen

    index_t channels() const noexcept { return static_cast<index_t>(sum.size()); }
    /// Adds the rows of x [rows, in] (the first call fixes in).
    void add(ConstMatrixView<float> x) {
        check_shape(x, -1, -1, "channel_moments::add: x");
        if (sum.empty()) {
            sum.assign(static_cast<std::size_t>(x.cols()), 0.0);
            sum_sq.assign(static_cast<std::size_t>(x.cols()), 0.0);
        }
        require<shape_error>(x.cols() == channels(), "channel_moments::add: x has ", x.cols(),
                             " channels, the statistics have ", channels());
        for (index_t r = 0; r < x.rows(); ++r)
            for (index_t j = 0; j < x.cols(); ++j) {
                const double v = x(r, j);
                sum[static_cast<std::size_t>(j)] += v;
                sum_sq[static_cast<std::size_t>(j)] += v * v;
            }
        samples += x.rows();
    }
    double mean(index_t j) const noexcept { return sum[static_cast<std::size_t>(j)] / static_cast<double>(samples); }
    /// Unbiased sample variance (FLAP's 1/(N−1)); 0 for fewer than two samples.
    double variance(index_t j) const noexcept {
        if (samples < 2) return 0.0;
        const double n = static_cast<double>(samples), m = mean(j);
        return std::max(0.0, (sum_sq[static_cast<std::size_t>(j)] - n * m * m) / (n - 1.0));
    }
};

/// Score of every input channel of w [out, in] (see the file comment). `stats` is needed for fluctuation.
inline std::vector<double> channel_scores(ConstMatrixView<float> w, prune_score score, const channel_moments* stats,
                                          const char* who = "channel_scores") {
    check_shape(w, -1, -1, who);
    const index_t in = w.cols();
    if (score == prune_score::fluctuation) {
        require<format_error>(stats != nullptr && stats->samples > 0, who,
                              ": the fluctuation (FLAP) score needs calibration moments of the linear's input");
        require<shape_error>(stats->channels() == in, who, ": calibration moments have ", stats->channels(),
                             " channels, the weight has ", in, " inputs");
    }
    std::vector<double> s(static_cast<std::size_t>(in), 0.0);
    for (index_t r = 0; r < w.rows(); ++r)
        for (index_t j = 0; j < in; ++j) s[static_cast<std::size_t>(j)] += double(w(r, j)) * double(w(r, j));
    if (score == prune_score::fluctuation)
        for (index_t j = 0; j < in; ++j) s[static_cast<std::size_t>(j)] *= stats->variance(j);
    return s;
}

/// Sums of `group` consecutive scores: one per group (scores.size() must be a multiple of group).
inline std::vector<double> group_scores(const std::vector<double>& s, index_t group) {
    require<shape_error>(group > 0 && static_cast<index_t>(s.size()) % group == 0, "group_scores: ", s.size(),
                         " scores do not split into groups of ", group);
    std::vector<double> g(s.size() / static_cast<std::size_t>(group), 0.0);
    for (std::size_t i = 0; i < s.size(); ++i) g[i / static_cast<std::size_t>(group)] += s[i];
    return g;
}

/// How many of `count` units remain after removing round(ratio·count); throws unless ratio ∈ [0, 1) and at least
/// one unit remains.
inline index_t kept_count(index_t count, double ratio, const char* what) {
    require<format_error>(ratio >= 0.0 && ratio < 1.0, "prune_structured: ", what, " ratio ", ratio,
                          " outside [0, 1)");
    const auto removed = static_cast<index_t>(std::llround(ratio * static_cast<double>(count)));
    require<format_error>(removed < count, "prune_structured: ", what, " ratio ", ratio, " would remove all ", count,
                          " ", what, "s (at least one must remain)");
    return count - removed;
}

/// Indices of the `keep` highest scores, ascending (ties: the lower index wins, so the choice is reproducible).
inline std::vector<index_t> top_indices(const std::vector<double>& s, index_t keep) {
    std::vector<index_t> idx(s.size());
    std::iota(idx.begin(), idx.end(), index_t{0});
    std::stable_sort(idx.begin(), idx.end(),
                     [&](index_t a, index_t b) { return s[static_cast<std::size_t>(a)] > s[static_cast<std::size_t>(b)]; });
    idx.resize(static_cast<std::size_t>(keep));
    std::sort(idx.begin(), idx.end());
    return idx;
}

/// The complement of sorted `kept` in [0, n).
inline std::vector<index_t> removed_indices(const std::vector<index_t>& kept, index_t n) {
    std::vector<index_t> out;
    std::size_t k = 0;
    for (index_t i = 0; i < n; ++i) {
        if (k < kept.size() && kept[k] == i) ++k;
        else out.push_back(i);
    }
    return out;
}

/// Rows `idx` of w, in that order.
inline Matrix<float> select_rows(ConstMatrixView<float> w, const std::vector<index_t>& idx) {
    Matrix<float> out(static_cast<index_t>(idx.size()), w.cols());
    for (std::size_t i = 0; i < idx.size(); ++i)
        std::copy_n(w.row(idx[i]), w.cols(), out.row(static_cast<index_t>(i)));
    return out;
}
/// Columns `idx` of w, in that order.
inline Matrix<float> select_cols(ConstMatrixView<float> w, const std::vector<index_t>& idx) {
    Matrix<float> out(w.rows(), static_cast<index_t>(idx.size()));
    for (index_t r = 0; r < w.rows(); ++r)
        for (std::size_t i = 0; i < idx.size(); ++i) out(r, static_cast<index_t>(i)) = w(r, idx[i]);
    return out;
}
/// Elements `idx` of v (empty stays empty: a layer without biases).
inline std::vector<float> select(const std::vector<float>& v, const std::vector<index_t>& idx) {
    if (v.empty()) return {};
    std::vector<float> out(idx.size());
    for (std::size_t i = 0; i < idx.size(); ++i) out[i] = v[static_cast<std::size_t>(idx[i])];
    return out;
}
/// Channel index lists of whole groups: groups g ∈ `groups` → channels g·size .. g·size + size − 1.
inline std::vector<index_t> expand_groups(const std::vector<index_t>& groups, index_t size) {
    std::vector<index_t> out;
    out.reserve(groups.size() * static_cast<std::size_t>(size));
    for (index_t g : groups)
        for (index_t i = 0; i < size; ++i) out.push_back(g * size + i);
    return out;
}

/// Bias [out] that compensates removing input channels `removed` of w [out, in]: bias + Σ_{j∈removed} W[:, j]·mean_j
/// (an empty `bias` counts as zeros).
inline std::vector<float> compensated_bias(ConstMatrixView<float> w, const std::vector<float>& bias,
                                           const std::vector<index_t>& removed, const channel_moments& stats) {
    require<shape_error>(stats.channels() == w.cols() && stats.samples > 0, "compensated_bias: calibration moments "
                         "have ", stats.channels(), " channels (", stats.samples, " samples), the weight has ",
                         w.cols(), " inputs");
    std::vector<float> out(static_cast<std::size_t>(w.rows()));
    for (index_t r = 0; r < w.rows(); ++r) {
        double acc = bias.empty() ? 0.0 : bias[static_cast<std::size_t>(r)];
        for (index_t j : removed) acc += double(w(r, j)) * stats.mean(j);
        out[static_cast<std::size_t>(r)] = static_cast<float>(acc);
    }
    return out;
}

}  // namespace cpet::compress
