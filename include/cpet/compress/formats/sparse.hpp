// cpet/compress/formats/sparse.hpp — packed sparse weights: N:M structured (fp32 or int8 values) and unstructured.
//
// Free of xsimd and Eigen so io/ and cuda/ can share it. The pruners that fill these formats live in
// compress/prune.hpp, the kernels that read them in kernels/gemm_sparse.hpp (which repeats the few layout constants;
// compress::kernel_view static_asserts that both sides agree). Nothing here ever stores the pruned zeros.
// Both classes can also be rebuilt from the kept entries their accessors return (from_kept, from_rows): the same
// packed bytes, no re-quantisation, which is how io/ reads them back bit-exact.
//
// ---- N:M (nm_sparse_weights) ----------------------------------------------------------------------------------
// W [n, k] with, in every group of M consecutive inputs k ∈ [g·M, g·M + M), exactly N kept entries (2:4, 1:4, 4:8, …;
// M a power of two ≤ 16, 1 ≤ N ≤ M, M divides K). Output rows are the SIMD lanes (as in gemm_wq): rows are grouped
// in panels of 16 (N padded with rows whose kept values are 0), and every line below holds one value per lane.
//   slot t = g·N + j  (j-th kept entry of group g, kept entries in ascending k within the group)
//   values (fp32) : values[(p·G·N + t)·16 + i]  = W[16p + i, g·M + idx]        G = K / M groups per row
//   values (int8) : qvalues[(p·G·N + t)·16 + i] = round(W / scale[16p + i]) ∈ [−127, 127],
//                   scales[16p + i] = max_kept |W[row]| / 127 (1 for an all-zero row): symmetric per output row
//   indices       : idx ∈ [0, M) is stored in b = log2(M) bits; each lane has its own stream of 32-bit words holding
//                   vpw = ⌊32 / b⌋ indices each (slot t in word t / vpw at bit (t % vpw)·b), the words of the 16 lanes
//                   interleaved: idx_words[(p·W + w)·16 + i], W = ⌈G·N / vpw⌉ words per lane. 2:4 and 1:4 (b = 2)
//                   and M = 2 or 16 (b = 1, 4) use every bit; M = 8 (b = 3) packs 10 per word (3.2 bits each) so
//                   no index straddles a word.
// So 2:4 fp32 costs (4 B + 2 bits)/2 = 2.125 B per dense element vs 4 B dense; 2:4 int8 costs (1 B + 2 bits)/2 =
// 0.625 B (+ one fp32 scale per row).
//
// ---- unstructured (unstructured_sparse_weights) ---------------------------------------------------------------------
// Sliced ELLPACK with slices of 16 rows (SELL-16): panel p holds slots(p) = max nnz over its 16 rows; row 16p + i's
// nonzeros (ascending k) fill lane i of slots 0, 1, …, shorter rows padded with value 0 at column 0.
//   values[(offset[p] + s)·16 + i] (fp32), cols[(offset[p] + s)·16 + i] (uint16, so K ≤ 65536), offset[p] = Σ_{q<p}
//   slots(q), offset[panels] = total slots. 6 bytes per stored entry. Measured against the dense fp32 GEMM at
//   4096² on one core of this Xeon (bench/bench_sparse.cpp): it breaks even near 50 % sparsity for decode (M = 1,
//   bandwidth-bound; 1.7× at 70 %, 4.9× at 90 %) and near 70 % for M = 128 (1.4× at 80 %, 2.7× at 90 %).
// Why SELL and not CSR: the kernel keeps output rows in SIMD lanes, so one vector load fetches 16 rows' next entries
// and one gather fetches their x values; with per-row pruning targets (Wanda) every row has the same count and the
// padding is zero.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "cpet/core/buffer.hpp"
#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"

namespace cpet::compress {

/// How the kept values of a sparse format are stored.
enum class sparse_values : int { f32, int8 };

namespace formats {

/// Output rows per sparse panel (one AVX-512 register of fp32 lanes).
inline constexpr index_t sparse_panel_rows = 16;

/// One line of a packed N:M panel: the values of 16 output rows at one slot (fp32).
struct nm_line_f32 {
    float v[sparse_panel_rows];
};
static_assert(sizeof(nm_line_f32) == 64, "nm_line_f32 must be one 64-byte line");
/// The same with int8 values (a quarter line).
struct nm_line_q8 {
    std::int8_t q[sparse_panel_rows];
};
static_assert(sizeof(nm_line_q8) == 16, "nm_line_q8 must be 16 bytes");
/// One line of packed index words: word w of each of the 16 lanes.
struct nm_index_line {
    std::uint32_t w[sparse_panel_rows];
};
static_assert(sizeof(nm_index_line) == 64, "nm_index_line must be one 64-byte line");

namespace sparse_detail {
inline constexpr index_t round_up(index_t v, index_t m) noexcept { return (v + m - 1) / m * m; }
inline int log2_exact(int m) noexcept {
    int b = 0;
    while ((1 << b) < m) ++b;
    return b;
}
inline void check_finite(ConstMatrixView<float> w, const char* who) {
    for (index_t r = 0; r < w.rows(); ++r)
        for (index_t c = 0; c < w.cols(); ++c)
            require<numeric_error>(std::isfinite(w(r, c)), who, ": weight (", r, ", ", c, ") is not finite (",
                                   w(r, c), ")");
}
}  // namespace sparse_detail

/// N:M structured-sparse weights W [n, k] (see the layout at the top of this file). Immutable once built.
class nm_sparse_weights {
public:
    nm_sparse_weights() = default;

    /// Packs the entries of `w` ([n, k], any stride) that `keep` ([n·k] row-major, nonzero = kept) marks; `keep`
    /// must mark exactly `n_keep` of every `m_group` consecutive inputs. Throws shape_error (pattern, shape),
    /// format_error (mask) or numeric_error (NaN/Inf weights); never returns a half-built object.
    static nm_sparse_weights from_mask(ConstMatrixView<float> w, const std::uint8_t* keep, int n_keep, int m_group,
                                       sparse_values vt = sparse_values::f32) {
        const char* who = "nm_sparse_weights";
        check_pattern(n_keep, m_group, who);
        check_shape(w, -1, -1, "nm_sparse_weights: weight");
        require<shape_error>(w.rows() > 0 && w.cols() > 0, who, ": weight shape must be positive, got ", shape_str(w));
        require<shape_error>(w.cols() % m_group == 0, who, ": the N:M block M = ", m_group,
                             " does not divide the input dimension K = ", w.cols());
        require<format_error>(keep != nullptr, who, ": null mask");
        sparse_detail::check_finite(w, who);
        const index_t n = w.rows(), k = w.cols(), G = k / m_group;
        for (index_t r = 0; r < n; ++r)
            for (index_t g = 0; g < G; ++g) {
                int c = 0;
                for (int e = 0; e < m_group; ++e) c += keep[r * k + g * m_group + e] != 0;
                require<format_error>(c == n_keep, who, ": row ", r, " group ", g, " keeps ", c, " entries, expected ",
                                      n_keep, " (", n_keep, ":", m_group, ")");
            }

        nm_sparse_weights s;
        s.n_ = n;
        s.k_ = k;
        s.keep_ = n_keep;
        s.group_ = m_group;
        s.bits_ = std::max(1, sparse_detail::log2_exact(m_group));
        s.vpw_ = 32 / s.bits_;
        s.vt_ = vt;
        s.panels_ = sparse_detail::round_up(n, sparse_panel_rows) / sparse_panel_rows;
        const index_t slots = G * n_keep;
        s.words_ = (slots + s.vpw_ - 1) / s.vpw_;
        const std::size_t lines = static_cast<std::size_t>(s.panels_ * slots);
        if (vt == sparse_values::f32)
            s.values_.reset(lines * sparse_panel_rows);
        else
            s.qvalues_.reset(lines * sparse_panel_rows);
        s.scales_.reset(static_cast<std::size_t>(s.panels_ * sparse_panel_rows));
        s.idx_.reset(static_cast<std::size_t>(s.panels_ * s.words_ * sparse_panel_rows));

        std::vector<float> kept(static_cast<std::size_t>(slots));
        std::vector<int> kidx(static_cast<std::size_t>(slots));
        for (index_t r = 0; r < s.panels_ * sparse_panel_rows; ++r) {
            // gather this row's kept values / indices (padding rows: zero values at indices 0..N-1)
            for (index_t g = 0; g < G; ++g) {
                int j = 0;
                for (int e = 0; e < m_group; ++e) {
                    const bool kp = r < n ? keep[r * k + g * m_group + e] != 0 : e < n_keep;
                    if (!kp) continue;
                    const std::size_t t = static_cast<std::size_t>(g * n_keep + j++);
                    kept[t] = r < n ? w(r, g * m_group + e) : 0.f;
                    kidx[t] = e;
                }
            }
            float scale = 1.f;
            if (vt == sparse_values::int8) {
                float amax = 0.f;
                for (float v : kept) amax = std::max(amax, std::abs(v));
                if (amax > 0.f) scale = amax / 127.f;
                if (!(scale >= 1e-30f)) scale = 1.f;
            }
            s.scales_[static_cast<std::size_t>(r)] = scale;
            const index_t p = r / sparse_panel_rows, i = r % sparse_panel_rows;
            for (index_t t = 0; t < slots; ++t) {
                const std::size_t at = static_cast<std::size_t>((p * slots + t) * sparse_panel_rows + i);
                if (vt == sparse_values::f32) {
                    s.values_[at] = kept[static_cast<std::size_t>(t)];
                } else {
                    const float q = std::nearbyint(kept[static_cast<std::size_t>(t)] / scale);
                    s.qvalues_[at] = static_cast<std::int8_t>(std::clamp(q, -127.f, 127.f));
                }
                const index_t wd = t / s.vpw_;
                const int sh = static_cast<int>(t % s.vpw_) * s.bits_;
                s.idx_[static_cast<std::size_t>((p * s.words_ + wd) * sparse_panel_rows + i)] |=
                    static_cast<std::uint32_t>(kidx[static_cast<std::size_t>(t)]) << sh;
            }
        }
        return s;
    }

    /// Rebuilds packed weights from their kept entries exactly as kept_index / kept_value (fp32) or kept_code /
    /// scales (int8) give them back, with no re-quantisation, so the packed bytes equal the original's (io/ reads
    /// stored weights this way). Row r's kept slot t = g·N + j has in-group index idx[r·slots + t] (strictly
    /// ascending within its group, below M) and either the value values[r·slots + t] (finite; codes and scales
    /// null) or the code codes[r·slots + t] ∈ [−127, 127] with the row scale scales[r] (positive, finite; values
    /// null). Throws shape_error (pattern, shape), format_error (indices, codes, which arrays are given) or
    /// numeric_error (values, scales); never returns a half-built object.
    static nm_sparse_weights from_kept(index_t n, index_t k, int n_keep, int m_group, const std::uint8_t* idx,
                                       const float* values, const std::int8_t* codes = nullptr,
                                       const float* scales = nullptr) {
        const char* who = "nm_sparse_weights::from_kept";
        check_pattern(n_keep, m_group, who);
        require<shape_error>(n > 0 && k > 0, who, ": weight shape must be positive, got [", n, ", ", k, "]");
        require<shape_error>(k % m_group == 0, who, ": the N:M block M = ", m_group,
                             " does not divide the input dimension K = ", k);
        const bool int8 = values == nullptr;
        require<format_error>(idx != nullptr && (int8 ? codes && scales : !codes && !scales), who,
                              ": give the in-group indices and either fp32 values or int8 codes with row scales");
        const index_t G = k / m_group, slots = G * n_keep;
        for (index_t r = 0; r < n; ++r) {
            for (index_t g = 0; g < G; ++g)
                for (int j = 0; j < n_keep; ++j) {
                    const index_t t = g * n_keep + j;
                    const int e = idx[r * slots + t];
                    require<format_error>(e < m_group && (j == 0 || e > idx[r * slots + t - 1]), who, ": row ", r,
                                          " group ", g, ": in-group index ", e, " at kept slot ", j,
                                          " is not below M = ", m_group, " and above the slot before it");
                    if (int8)
                        require<format_error>(codes[r * slots + t] >= -127, who, ": row ", r, " slot ", t, ": code ",
                                              int(codes[r * slots + t]), " is outside [-127, 127]");
                    else
                        require<numeric_error>(std::isfinite(values[r * slots + t]), who, ": row ", r, " slot ", t,
                                               ": value ", values[r * slots + t], " is not finite");
                }
            if (int8)
                require<numeric_error>(std::isfinite(scales[r]) && scales[r] > 0.f, who, ": row ", r, ": scale ",
                                       scales[r], " is not a positive finite number");
        }

        // The same fields and padding as from_mask: padding rows keep values 0 at indices 0..N-1 with scale 1.
        nm_sparse_weights s;
        s.n_ = n;
        s.k_ = k;
        s.keep_ = n_keep;
        s.group_ = m_group;
        s.bits_ = std::max(1, sparse_detail::log2_exact(m_group));
        s.vpw_ = 32 / s.bits_;
        s.vt_ = int8 ? sparse_values::int8 : sparse_values::f32;
        s.panels_ = sparse_detail::round_up(n, sparse_panel_rows) / sparse_panel_rows;
        s.words_ = (slots + s.vpw_ - 1) / s.vpw_;
        const std::size_t lines = static_cast<std::size_t>(s.panels_ * slots);
        if (int8)
            s.qvalues_.reset(lines * sparse_panel_rows);
        else
            s.values_.reset(lines * sparse_panel_rows);
        s.scales_.reset(static_cast<std::size_t>(s.panels_ * sparse_panel_rows));
        s.idx_.reset(static_cast<std::size_t>(s.panels_ * s.words_ * sparse_panel_rows));
        for (index_t r = 0; r < s.panels_ * sparse_panel_rows; ++r) {
            s.scales_[static_cast<std::size_t>(r)] = int8 && r < n ? scales[r] : 1.f;
            const index_t p = r / sparse_panel_rows, i = r % sparse_panel_rows;
            for (index_t t = 0; t < slots; ++t) {
                const std::size_t at = static_cast<std::size_t>((p * slots + t) * sparse_panel_rows + i);
                if (r < n) {
                    if (int8)
                        s.qvalues_[at] = codes[r * slots + t];
                    else
                        s.values_[at] = values[r * slots + t];
                }
                const int e = r < n ? idx[r * slots + t] : static_cast<int>(t % n_keep);
                const index_t wd = t / s.vpw_;
                const int sh = static_cast<int>(t % s.vpw_) * s.bits_;
                s.idx_[static_cast<std::size_t>((p * s.words_ + wd) * sparse_panel_rows + i)] |=
                    static_cast<std::uint32_t>(e) << sh;
            }
        }
        return s;
    }

    /// Throws shape_error unless N:M is a supported pattern (M ∈ {2, 4, 8, 16}, 1 ≤ N ≤ M).
    static void check_pattern(int n_keep, int m_group, const char* who) {
        require<shape_error>(m_group == 2 || m_group == 4 || m_group == 8 || m_group == 16, who, ": N:M block M = ",
                             m_group, " is not supported (expected 2, 4, 8 or 16)");
        require<shape_error>(n_keep >= 1 && n_keep <= m_group, who, ": N = ", n_keep, " must be in [1, M = ", m_group,
                             "]");
    }

    index_t rows() const noexcept { return n_; }   ///< out features
    index_t cols() const noexcept { return k_; }   ///< in features
    int n_keep() const noexcept { return keep_; }   ///< N
    int m_group() const noexcept { return group_; } ///< M
    int index_bits() const noexcept { return bits_; }
    index_t indices_per_word() const noexcept { return vpw_; }
    index_t words_per_lane() const noexcept { return words_; }
    index_t groups() const noexcept { return group_ ? k_ / group_ : 0; }
    index_t slots() const noexcept { return groups() * keep_; }  ///< kept entries per row
    index_t panels() const noexcept { return panels_; }
    sparse_values value_type() const noexcept { return vt_; }
    bool empty() const noexcept { return n_ == 0; }

    const float* values() const noexcept { return values_.empty() ? nullptr : values_.data(); }
    const std::int8_t* qvalues() const noexcept { return qvalues_.empty() ? nullptr : qvalues_.data(); }
    const float* scales() const noexcept { return scales_.data(); }
    const std::uint32_t* index_words() const noexcept { return idx_.data(); }

    /// Bytes of the packed representation (values + index words + scales for int8).
    std::size_t bytes() const noexcept {
        return values_.size() * 4 + qvalues_.size() + idx_.size() * 4 + (vt_ == sparse_values::int8 ? scales_.size() * 4 : 0);
    }

    /// In-group index (0..M-1) of kept slot t = g·N + j of `row`.
    int kept_index(index_t row, index_t t) const noexcept {
        const index_t p = row / sparse_panel_rows, i = row % sparse_panel_rows;
        const std::uint32_t wd = idx_[static_cast<std::size_t>((p * words_ + t / vpw_) * sparse_panel_rows + i)];
        return static_cast<int>((wd >> (static_cast<int>(t % vpw_) * bits_)) & ((1u << bits_) - 1));
    }
    /// The value every kernel multiplies at kept slot t of `row` (int8: scale · q).
    float kept_value(index_t row, index_t t) const noexcept {
        const index_t p = row / sparse_panel_rows, i = row % sparse_panel_rows;
        const std::size_t at = static_cast<std::size_t>((p * slots() + t) * sparse_panel_rows + i);
        if (vt_ == sparse_values::f32) return values_[at];
        return scales_[static_cast<std::size_t>(row)] * static_cast<float>(qvalues_[at]);
    }
    /// The int8 code at kept slot t of `row` (int8 values only; kept_value = scales()[row] · code).
    std::int8_t kept_code(index_t row, index_t t) const noexcept {
        const index_t p = row / sparse_panel_rows, i = row % sparse_panel_rows;
        return qvalues_[static_cast<std::size_t>((p * slots() + t) * sparse_panel_rows + i)];
    }
    /// W as a dense [n, k] matrix (zeros where pruned; int8 values dequantised).
    Matrix<float> to_dense() const {
        Matrix<float> d(n_, k_);
        dense_rows(0, d);
        return d;
    }
    /// Rows [r0, r0 + out.rows()) of W, dense, into out [rows, k] (a block at a time: backward passes never need
    /// the whole dense matrix). Unchecked beyond the debug assertion of the caller's range.
    void dense_rows(index_t r0, MatrixView<float> out) const {
        for (index_t i = 0; i < out.rows(); ++i) {
            float* o = out.row(i);
            for (index_t c = 0; c < k_; ++c) o[c] = 0.f;
            for (index_t t = 0; t < slots(); ++t) o[(t / keep_) * group_ + kept_index(r0 + i, t)] = kept_value(r0 + i, t);
        }
    }

private:
    index_t n_ = 0, k_ = 0;
    int keep_ = 0, group_ = 0, bits_ = 0;
    index_t vpw_ = 0, words_ = 0, panels_ = 0;
    sparse_values vt_ = sparse_values::f32;
    aligned_buffer<float> values_;
    aligned_buffer<std::int8_t> qvalues_;
    aligned_buffer<float> scales_;
    aligned_buffer<std::uint32_t> idx_;
};

/// Unstructured sparse weights W [n, k] in SELL-16 (see the layout at the top of this file). Immutable once built.
class unstructured_sparse_weights {
public:
    /// Largest K the 16-bit column indices address.
    static constexpr index_t max_cols = 65536;

    unstructured_sparse_weights() = default;

    /// Packs the entries of `w` that `keep` ([n·k] row-major, nonzero = kept) marks. Throws shape_error (shape,
    /// K > 65536), format_error (null mask) or numeric_error (NaN/Inf weights); never returns a half-built object.
    static unstructured_sparse_weights from_mask(ConstMatrixView<float> w, const std::uint8_t* keep) {
        const char* who = "unstructured_sparse_weights";
        check_shape(w, -1, -1, "unstructured_sparse_weights: weight");
        require<shape_error>(w.rows() > 0 && w.cols() > 0, who, ": weight shape must be positive, got ", shape_str(w));
        require<shape_error>(w.cols() <= max_cols, who, ": K = ", w.cols(), " exceeds the ", max_cols,
                             " columns 16-bit indices address");
        require<format_error>(keep != nullptr, who, ": null mask");
        sparse_detail::check_finite(w, who);
        unstructured_sparse_weights s;
        s.n_ = w.rows();
        s.k_ = w.cols();
        s.panels_ = sparse_detail::round_up(s.n_, sparse_panel_rows) / sparse_panel_rows;
        s.offsets_.reset(static_cast<std::size_t>(s.panels_ + 1));
        std::vector<index_t> nnz(static_cast<std::size_t>(s.n_), 0);
        for (index_t r = 0; r < s.n_; ++r)
            for (index_t c = 0; c < s.k_; ++c) nnz[static_cast<std::size_t>(r)] += keep[r * s.k_ + c] != 0;
        for (index_t p = 0; p < s.panels_; ++p) {
            index_t mx = 0;
            for (index_t r = p * sparse_panel_rows; r < std::min(s.n_, (p + 1) * sparse_panel_rows); ++r)
                mx = std::max(mx, nnz[static_cast<std::size_t>(r)]);
            s.offsets_[static_cast<std::size_t>(p + 1)] = s.offsets_[static_cast<std::size_t>(p)] + mx;
        }
        const std::size_t total = static_cast<std::size_t>(s.offsets_[static_cast<std::size_t>(s.panels_)]);
        s.values_.reset(total * sparse_panel_rows);
        s.cols_.reset(total * sparse_panel_rows);
        for (index_t r = 0; r < s.n_; ++r) {
            const index_t p = r / sparse_panel_rows, i = r % sparse_panel_rows;
            index_t slot = s.offsets_[static_cast<std::size_t>(p)];
            for (index_t c = 0; c < s.k_; ++c) {
                if (!keep[r * s.k_ + c]) continue;
                const std::size_t at = static_cast<std::size_t>(slot++ * sparse_panel_rows + i);
                s.values_[at] = w(r, c);
                s.cols_[at] = static_cast<std::uint16_t>(c);
            }
            s.nnz_ += nnz[static_cast<std::size_t>(r)];
        }
        s.row_nnz_ = std::move(nnz);
        return s;
    }

    /// Rebuilds packed weights from their entries row by row, as row_nnz / entry_col / entry_value give them back
    /// (io/ reads stored weights this way; the packing is the same bytes as from_mask's): row r holds row_nnz[r]
    /// entries, the rows' entries concatenated in cols / values with strictly ascending columns below k in each
    /// row. Throws shape_error (shape, K > 65536), format_error (counts, columns) or numeric_error (NaN/Inf);
    /// never returns a half-built object.
    static unstructured_sparse_weights from_rows(index_t n, index_t k, const index_t* row_nnz,
                                                 const std::uint16_t* cols, const float* values) {
        const char* who = "unstructured_sparse_weights::from_rows";
        require<shape_error>(n > 0 && k > 0, who, ": weight shape must be positive, got [", n, ", ", k, "]");
        require<shape_error>(k <= max_cols, who, ": K = ", k, " exceeds the ", max_cols,
                             " columns 16-bit indices address");
        require<format_error>(row_nnz != nullptr, who, ": null row counts");
        index_t total = 0;
        for (index_t r = 0; r < n; ++r) {
            const index_t c = row_nnz[r];
            require<format_error>(c >= 0 && c <= k, who, ": row ", r, " has ", c, " entries, expected 0..", k);
            require<format_error>(c == 0 || (cols && values), who, ": null entries");
            for (index_t j = 0; j < c; ++j) {
                const index_t col = cols[total + j];
                require<format_error>(col < k && (j == 0 || col > cols[total + j - 1]), who, ": row ", r, " entry ",
                                      j, ": column ", col, " is not below K = ", k, " and above the entry before it");
                require<numeric_error>(std::isfinite(values[total + j]), who, ": row ", r, " entry ", j, ": value ",
                                       values[total + j], " is not finite");
            }
            total += c;
        }
        unstructured_sparse_weights s;
        s.n_ = n;
        s.k_ = k;
        s.panels_ = sparse_detail::round_up(n, sparse_panel_rows) / sparse_panel_rows;
        s.offsets_.reset(static_cast<std::size_t>(s.panels_ + 1));
        s.row_nnz_.assign(row_nnz, row_nnz + n);
        for (index_t p = 0; p < s.panels_; ++p) {
            index_t mx = 0;
            for (index_t r = p * sparse_panel_rows; r < std::min(n, (p + 1) * sparse_panel_rows); ++r)
                mx = std::max(mx, row_nnz[r]);
            s.offsets_[static_cast<std::size_t>(p + 1)] = s.offsets_[static_cast<std::size_t>(p)] + mx;
        }
        const std::size_t slots = static_cast<std::size_t>(s.offsets_[static_cast<std::size_t>(s.panels_)]);
        s.values_.reset(slots * sparse_panel_rows);
        s.cols_.reset(slots * sparse_panel_rows);
        index_t e = 0;
        for (index_t r = 0; r < n; ++r) {
            const index_t p = r / sparse_panel_rows, i = r % sparse_panel_rows;
            for (index_t j = 0; j < row_nnz[r]; ++j, ++e) {
                const std::size_t at =
                    static_cast<std::size_t>((s.offsets_[static_cast<std::size_t>(p)] + j) * sparse_panel_rows + i);
                s.values_[at] = values[e];
                s.cols_[at] = cols[e];
            }
        }
        s.nnz_ = total;
        return s;
    }

    index_t rows() const noexcept { return n_; }
    index_t cols() const noexcept { return k_; }
    index_t panels() const noexcept { return panels_; }
    index_t nnz() const noexcept { return nnz_; }  ///< kept entries (without padding)
    double sparsity() const noexcept { return n_ ? 1.0 - double(nnz_) / (double(n_) * double(k_)) : 0.0; }
    bool empty() const noexcept { return n_ == 0; }
    const float* values() const noexcept { return values_.data(); }
    const std::uint16_t* col_indices() const noexcept { return cols_.data(); }
    const index_t* offsets() const noexcept { return offsets_.data(); }
    std::size_t bytes() const noexcept {
        return values_.size() * 4 + cols_.size() * 2 + offsets_.size() * sizeof(index_t);
    }
    /// Kept entries of `row` (its padding excluded: a padding entry and a kept 0 at column 0 look alike).
    index_t row_nnz(index_t row) const noexcept { return row_nnz_[static_cast<std::size_t>(row)]; }
    /// Column and value of `row`'s j-th kept entry (j < row_nnz(row); ascending columns).
    std::uint16_t entry_col(index_t row, index_t j) const noexcept { return cols_[entry_at(row, j)]; }
    float entry_value(index_t row, index_t j) const noexcept { return values_[entry_at(row, j)]; }
    /// W as a dense [n, k] matrix (zeros where pruned).
    Matrix<float> to_dense() const {
        Matrix<float> d(n_, k_);
        dense_rows(0, d);
        return d;
    }
    /// Rows [r0, r0 + out.rows()) of W, dense, into out [rows, k] (see nm_sparse_weights::dense_rows).
    void dense_rows(index_t r0, MatrixView<float> out) const {
        const index_t r1 = r0 + out.rows();
        for (index_t i = 0; i < out.rows(); ++i)
            for (index_t c = 0; c < k_; ++c) out(i, c) = 0.f;
        for (index_t p = r0 / sparse_panel_rows; p * sparse_panel_rows < r1 && p < panels_; ++p)
            for (index_t s = offsets_[static_cast<std::size_t>(p)]; s < offsets_[static_cast<std::size_t>(p + 1)]; ++s)
                for (index_t i = 0; i < sparse_panel_rows; ++i) {
                    const index_t r = p * sparse_panel_rows + i;
                    if (r < r0 || r >= r1 || r >= n_) continue;
                    const std::size_t at = static_cast<std::size_t>(s * sparse_panel_rows + i);
                    if (values_[at] != 0.f) out(r - r0, cols_[at]) = values_[at];
                }
    }

private:
    std::size_t entry_at(index_t row, index_t j) const noexcept {
        const index_t p = row / sparse_panel_rows, i = row % sparse_panel_rows;
        return static_cast<std::size_t>((offsets_[static_cast<std::size_t>(p)] + j) * sparse_panel_rows + i);
    }

    index_t n_ = 0, k_ = 0, panels_ = 0, nnz_ = 0;
    std::vector<index_t> row_nnz_;  ///< kept entries per row (not part of the packed layout: for row_nnz())
    aligned_buffer<index_t> offsets_;
    aligned_buffer<float> values_;
    aligned_buffer<std::uint16_t> cols_;
};

}  // namespace formats

using formats::nm_sparse_weights;
using formats::unstructured_sparse_weights;

}  // namespace cpet::compress
