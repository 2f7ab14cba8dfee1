// cpet/compress/prune.hpp — pruning into the sparse formats of compress/formats/sparse.hpp: N:M structured
// (2:4, 1:4, 4:8, …) and unstructured to a target sparsity, the kept entries chosen by magnitude or by Wanda.
//
//   magnitude: score |W_ij|.
//   Wanda    : Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models":
//              score |W_ij|·‖X_j‖₂ with ‖X_j‖₂ = sqrt(sum_sq_j / samples) from compress::calibration (the per-sample
//              RMS; dividing every channel by the same `samples` does not change any ranking).
//   N:M        : in every group of M consecutive inputs of a row the N highest scores are kept (ties: lower k first).
//   unstructured: magnitude keeps the (1 − s)·n·k highest scores of the whole matrix; Wanda compares within each
//              output row, as in the paper, keeping round((1 − s)·k) per row (ties: lower index first).
//
// Bad input: an N:M block that does not divide K, an unsupported N:M → shape_error; NaN/Inf weights → numeric_error;
// Wanda without calibration, with a channel count other than K, no samples, or NaN/Inf/negative sums → shape_error
// (empty / mismatched) or numeric_error (non-finite); a sparsity outside [0, 1) → shape_error. Every check runs
// before anything is built.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <string_view>
#include <vector>

#include "cpet/arch/dispatch.hpp"
#include "cpet/compress/calibration.hpp"
#include "cpet/compress/format.hpp"
#include "cpet/compress/formats/sparse.hpp"
#include "cpet/compress/policy.hpp"
#include "cpet/compress/split_epilogue.hpp"
#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/kernels/gemm_f32.hpp"
#include "cpet/kernels/gemm_sparse.hpp"

namespace cpet::compress {

/// How the kept entries are chosen.
enum class sparsity_score : int { magnitude, wanda };

/// An N:M pattern: keep N of every M consecutive inputs.
struct nm_pattern {
    int n = 2;
    int m = 4;
};

namespace prune_detail {

inline void check_weights(ConstMatrixView<float> w, const char* who) {
    check_shape(w, -1, -1, who);
    require<shape_error>(w.rows() > 0 && w.cols() > 0, who, ": weight shape must be positive, got ", shape_str(w));
    formats::sparse_detail::check_finite(w, who);
}

/// Per-input-channel factor of the score: 1 (magnitude) or sqrt(sum_sq / samples) (Wanda).
inline std::vector<double> channel_norms(index_t k, sparsity_score score, const calibration* calib, const char* who) {
    std::vector<double> norm(static_cast<std::size_t>(k), 1.0);
    if (score == sparsity_score::magnitude) return norm;
    require<shape_error>(calib != nullptr, who, ": Wanda needs calibration statistics (got none)");
    require<shape_error>(calib->samples > 0, who, ": Wanda calibration is empty (0 samples)");
    require<shape_error>(calib->channels() == k, who, ": calibration has ", calib->channels(),
                         " channels, expected K = ", k);
    for (index_t j = 0; j < k; ++j) {
        const double s = calib->sum_sq[static_cast<std::size_t>(j)];
        require<numeric_error>(std::isfinite(s) && s >= 0.0, who, ": calibration sum_sq[", j, "] = ", s,
                               " is not a finite non-negative number");
        norm[static_cast<std::size_t>(j)] = std::sqrt(s / static_cast<double>(calib->samples));
    }
    return norm;
}

inline double score_of(ConstMatrixView<float> w, const std::vector<double>& norm, index_t r, index_t c) {
    return std::abs(static_cast<double>(w(r, c))) * norm[static_cast<std::size_t>(c)];
}

}  // namespace prune_detail

/// The N:M keep mask ([n·k] row-major, 1 = kept) of `w` under `score`. Throws as listed at the top of this file.
inline std::vector<std::uint8_t> nm_mask(ConstMatrixView<float> w, nm_pattern pat,
                                         sparsity_score score = sparsity_score::magnitude,
                                         const calibration* calib = nullptr) {
    const char* who = "prune_nm";
    formats::nm_sparse_weights::check_pattern(pat.n, pat.m, who);
    prune_detail::check_weights(w, who);
    require<shape_error>(w.cols() % pat.m == 0, who, ": the N:M block M = ", pat.m,
                         " does not divide the input dimension K = ", w.cols());
    const auto norm = prune_detail::channel_norms(w.cols(), score, calib, who);
    const index_t n = w.rows(), k = w.cols();
    std::vector<std::uint8_t> keep(static_cast<std::size_t>(n * k), 0);
    std::vector<int> order(static_cast<std::size_t>(pat.m));
    std::vector<double> sc(static_cast<std::size_t>(pat.m));
    for (index_t r = 0; r < n; ++r)
        for (index_t g = 0; g < k / pat.m; ++g) {
            for (int e = 0; e < pat.m; ++e) sc[static_cast<std::size_t>(e)] = prune_detail::score_of(w, norm, r, g * pat.m + e);
            std::iota(order.begin(), order.end(), 0);
            std::stable_sort(order.begin(), order.end(),
                             [&](int a, int b) { return sc[static_cast<std::size_t>(a)] > sc[static_cast<std::size_t>(b)]; });
            for (int j = 0; j < pat.n; ++j) keep[static_cast<std::size_t>(r * k + g * pat.m + order[static_cast<std::size_t>(j)])] = 1;
        }
    return keep;
}

/// The unstructured keep mask for target `sparsity` ∈ [0, 1) (fraction pruned).
inline std::vector<std::uint8_t> unstructured_mask(ConstMatrixView<float> w, double sparsity,
                                                   sparsity_score score = sparsity_score::magnitude,
                                                   const calibration* calib = nullptr) {
    const char* who = "prune_unstructured";
    require<shape_error>(sparsity >= 0.0 && sparsity < 1.0, who, ": sparsity ", sparsity, " must be in [0, 1)");
    prune_detail::check_weights(w, who);
    const auto norm = prune_detail::channel_norms(w.cols(), score, calib, who);
    const index_t n = w.rows(), k = w.cols();
    std::vector<std::uint8_t> keep(static_cast<std::size_t>(n * k), 0);
    // Keep the `count` best of the index range [base, base + len) (score descending, lower index first on ties).
    std::vector<double> sc;
    std::vector<index_t> order;
    const auto keep_best = [&](index_t base, index_t len, index_t count) {
        sc.resize(static_cast<std::size_t>(len));
        order.resize(static_cast<std::size_t>(len));
        for (index_t i = 0; i < len; ++i) {
            const index_t at = base + i;
            sc[static_cast<std::size_t>(i)] = prune_detail::score_of(w, norm, at / k, at % k);
        }
        std::iota(order.begin(), order.end(), index_t{0});
        const auto better = [&](index_t a, index_t b) {
            const double sa = sc[static_cast<std::size_t>(a)], sb = sc[static_cast<std::size_t>(b)];
            return sa > sb || (sa == sb && a < b);
        };
        if (count < len) std::nth_element(order.begin(), order.begin() + count, order.end(), better);
        for (index_t i = 0; i < count; ++i) keep[static_cast<std::size_t>(base + order[static_cast<std::size_t>(i)])] = 1;
    };
    if (score == sparsity_score::wanda) {
        const auto per_row = static_cast<index_t>(std::llround((1.0 - sparsity) * double(k)));
        for (index_t r = 0; r < n; ++r) keep_best(r * k, k, per_row);
    } else {
        keep_best(0, n * k, static_cast<index_t>(std::llround((1.0 - sparsity) * double(n) * double(k))));
    }
    return keep;
}

/// Prunes `w` [out, in] to N:M and packs it (fp32 or int8 values with per-row scales).
inline nm_sparse_weights prune_nm(ConstMatrixView<float> w, nm_pattern pat, sparsity_score score = sparsity_score::magnitude,
                                  const calibration* calib = nullptr, sparse_values vt = sparse_values::f32) {
    const auto keep = nm_mask(w, pat, score, calib);
    return nm_sparse_weights::from_mask(w, keep.data(), pat.n, pat.m, vt);
}

/// Prunes `w` [out, in] to the target sparsity and packs it (SELL-16).
inline unstructured_sparse_weights prune_unstructured(ConstMatrixView<float> w, double sparsity,
                                                      sparsity_score score = sparsity_score::magnitude,
                                                      const calibration* calib = nullptr) {
    const auto keep = unstructured_mask(w, sparsity, score, calib);
    return unstructured_sparse_weights::from_mask(w, keep.data());
}

/// Kernel-facing views (raw pointers and sizes; kernels know nothing of compress/).
inline kernels::nm_weights kernel_view(const nm_sparse_weights& s) {
    static_assert(kernels::sparse_panel_rows == formats::sparse_panel_rows, "kernels and format disagree on the panel");
    kernels::nm_weights v;
    v.values = s.values();
    v.qvalues = s.qvalues();
    v.scales = s.scales();
    v.idx = s.index_words();
    v.n = s.rows();
    v.k = s.cols();
    v.keep = s.n_keep();
    v.group = s.m_group();
    v.bits = s.index_bits();
    v.vpw = s.indices_per_word();
    v.words = s.words_per_lane();
    return v;
}
inline kernels::sell_weights kernel_view(const unstructured_sparse_weights& s) {
    static_assert(kernels::sparse_panel_rows == formats::sparse_panel_rows, "kernels and format disagree on the panel");
    kernels::sell_weights v;
    v.values = s.values();
    v.cols = s.col_indices();
    v.offsets = s.offsets();
    v.n = s.rows();
    v.k = s.cols();
    return v;
}

/// y [M, out] = ep(x [M, in]·Ŵᵀ) with the packed sparse weights (bias, activation, residual; no low-rank term:
/// sparse_format::matmul adds that).
inline void matmul(ConstMatrixView<float> x, const nm_sparse_weights& s, MatrixView<float> y,
                   const kernels::epilogue& ep = {}) {
    require<format_error>(!s.empty(), "matmul: empty N:M weights");
    kernels::gemm_nm(x, kernel_view(s), y, ep);
}
inline void matmul(ConstMatrixView<float> x, const unstructured_sparse_weights& s, MatrixView<float> y,
                   const kernels::epilogue& ep = {}) {
    require<format_error>(!s.empty(), "matmul: empty sparse weights");
    kernels::gemm_sell(x, kernel_view(s), y, ep);
}

/// A sparse packed weight as a WeightFormat (N:M or unstructured): the sparse kernel forward, a plain loop backward.
template <class Packed>
class sparse_format {
public:
    sparse_format() = default;
    explicit sparse_format(Packed w) : w_(std::move(w)) {}

    index_t out_features() const noexcept { return w_.rows(); }
    index_t in_features() const noexcept { return w_.cols(); }
    /// The sparse kernels fuse bias, activation and residual; a low-rank term (LoRA, recovery) is added by the
    /// split epilogue (one thin GEMM and one more pass over y).
    void matmul(ConstMatrixView<float> x, MatrixView<float> y, const kernels::epilogue& ep) const {
        if (!ep.has_lowrank()) return compress::matmul(x, w_, y, ep);
        check_shape(x, -1, in_features(), "sparse_format::matmul: x");
        check_shape(y, x.rows(), out_features(), "sparse_format::matmul: y");
        kernels::check_lowrank(ep, x.rows(), out_features(), "sparse_format::matmul");
        arch::dispatch([&](auto tag) {
            run_split_epilogue(tag, y, ep, [&](const float* bias) {
                kernels::epilogue base;
                base.bias = bias;
                compress::matmul(x, w_, y, base);
            });
        });
    }
    /// dx [M, in] = dy [M, out]·W (backward passes through the frozen weight).
    void matmul_t(ConstMatrixView<float> dy, MatrixView<float> dx) const {
        check_shape(dy, -1, w_.rows(), "sparse matmul_t: dy");
        check_shape(dx, dy.rows(), w_.cols(), "sparse matmul_t: dx");
        // dx = Σ_blocks dy[:, block]·W[block, :], 256 rows of W decoded at a time (never the whole dense matrix),
        // each product the fp32 GEMM (kernels::gemm_f32_t_rows)
        const index_t N = w_.rows(), K = w_.cols();
        constexpr index_t block = 256;
        Matrix<float> wb(std::min(block, N), K);
        for (index_t n0 = 0; n0 < N; n0 += block) {
            const index_t nb = std::min(block, N - n0);
            auto rows = wb.view().middle_rows(0, nb);
            w_.dense_rows(n0, rows);
            kernels::gemm_f32_t_rows(dy.middle_cols(n0, nb), rows, dx, n0 > 0);
        }
    }
    Matrix<float> to_dense() const { return w_.to_dense(); }
    std::size_t bytes() const noexcept { return w_.bytes(); }
    const Packed& packed() const noexcept { return w_; }

private:
    Packed w_;
};

using nm_sparse_f32 = sparse_format<nm_sparse_weights>;
using unstructured_sparse_f32 = sparse_format<unstructured_sparse_weights>;

/// Compression policy: N:M pruning (score chosen by type), values kept in fp32 or int8.
template <int N, int M, sparsity_score Score = sparsity_score::magnitude, sparse_values V = sparse_values::f32>
struct nm_sparse {
    using format = sparse_format<nm_sparse_weights>;
    /// e.g. "nm2:4_magnitude", "nm2:4_wanda_int8".
    static std::string_view name() {
        static const std::string n = "nm" + std::to_string(N) + ":" + std::to_string(M) +
                                     (Score == sparsity_score::wanda ? "_wanda" : "_magnitude") +
                                     (V == sparse_values::int8 ? "_int8" : "");
        return n;
    }
    static format compress(ConstMatrixView<float> w, const calibration* stats = nullptr) {
        return format(prune_nm(w, {N, M}, Score, stats, V));
    }
};

/// Compression policy: unstructured pruning of SparsityPercent % of the weights (score chosen by type), the rest
/// kept in fp32 in the SELL-16 layout. Wanda needs calibration (Σx² per input channel).
template <int SparsityPercent, sparsity_score Score = sparsity_score::magnitude>
struct unstructured_sparse {
    static_assert(SparsityPercent >= 0 && SparsityPercent < 100,
                  "cpet unstructured_sparse: SparsityPercent must be in [0, 100)");
    using format = unstructured_sparse_f32;
    /// e.g. "unstructured70_wanda".
    static std::string_view name() {
        static const std::string n = "unstructured" + std::to_string(SparsityPercent) +
                                     (Score == sparsity_score::wanda ? "_wanda" : "_magnitude");
        return n;
    }
    static format compress(ConstMatrixView<float> w, const calibration* stats = nullptr) {
        return format(prune_unstructured(w, SparsityPercent / 100.0, Score, stats));
    }
};

static_assert(check_weight_format<nm_sparse_f32>());
static_assert(check_weight_format<unstructured_sparse_f32>());
static_assert(check_compression_policy<nm_sparse<2, 4>>());
static_assert(check_compression_policy<unstructured_sparse<50>>());

}  // namespace cpet::compress
