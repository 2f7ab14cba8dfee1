// cpet/compress/formats/quantized.hpp — packed int8 / int4 weights with fp32 scales (and zero points).
//
// Free of xsimd and Eigen so io/ and cuda/ can share it. The quantizers that fill it live in compress/quantize.hpp,
// the kernels that read it in kernels/gemm_wq.hpp (weight-only, fp32 activations) and kernels/gemm_s8.hpp (W8A8).
//
// Value model. A weight W[n, k] (n = output channel, k = input) is represented as
//     W[n, k] ≈ s[n, g] · (q[n, k] − z[n, g]),  g = k / group
//   int8, symmetric : q ∈ [−127, 127], z = 0                (s = absmax / 127)
//   int8, asymmetric: q ∈ [−128, 127], z ∈ [−128, 127] integer
//   int4, symmetric : q ∈ [0, 15] (unsigned nibble), z = 8   (s = absmax / 7.5, the GPTQ convention)
//   int4, asymmetric: q ∈ [0, 15], z ∈ [0, 15] integer
// Per-tensor and per-channel scales are stored like per-group ones with a single group spanning the padded K
// (per-tensor repeats its one scale on every row), so the kernels see one layout.
//
// Byte layout (ggml-repack style: rows interleaved so one 64-byte line feeds one SIMD register of 16 outputs).
// Rows are grouped in panels of `panel_rows` = 16 (N padded with zero rows); K is padded to a multiple of the
// chunk (4 for int8, 8 for int4) with q = 0 (int8) / q = z (int4), i.e. padded weights are exactly zero.
//   data  = panel 0 chunk 0, panel 0 chunk 1, …, panel 0 chunk K_pad/chunk_k − 1, panel 1 chunk 0, …
//   int8 chunk (block_q8x16, 64 B): byte [i][j] = q[16·p + i, 4·c + j]        — i row, j = 0..3 (a VNNI dword)
//   int4 chunk (block_q4x16, 64 B): byte [i][j] = q[16·p + i, 8·c + j]     (low nibble, bits 0..3)
//                                              | q[16·p + i, 8·c + 4 + j] << 4 (high nibble, bits 4..7)
//     so one dword of row i holds k = 0..7 of the chunk in nibble order k0 k4 k1 k5 k2 k6 k3 k7 (from bit 0),
//     and `byte & 0xF` / `byte >> 4` give two VNNI-ready int8 dwords.
//   scales[(p · groups + g) · 16 + i] = s[16·p + i, g]  — one 64-byte line per (panel, group)
//   zeros : same layout as scales, integer-valued floats (empty for symmetric int8; all 8 for symmetric int4)
//   row_sums[n] = Σ_k q[n, k] (int8 only): the correction a u8·s8 kernel needs when it shifts x by +128
//                 (cpet's own VNNI kernel shifts the weights instead; cpet's pair-bounded AVX2 kernel shifts x).
//   pair_bounded (int8 only): every code pair q[n, 2t], q[n, 2t + 1] (K padded with zeros) has |q| + |q'| ≤ 128.
//                 Then a vpmaddubsw pair (x + 128) · q + (x' + 128) · q' stays within ±255·128 = ±32640 and never
//                 saturates int16, so AVX2 CPUs without VNNI can run W8A8 exactly without the per-product sign
//                 step. Computed from the codes, whatever quantised them (quant_options::pair_bound asks for it).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "cpet/core/buffer.hpp"
#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"

namespace cpet::compress {

/// Bits per stored weight.
enum class qbits : int { int4 = 4, int8 = 8 };
/// Which weights share one scale (and zero point).
enum class granularity : int { per_tensor, per_channel, per_group };

namespace formats {

/// Output rows per packed panel (one AVX-512 register of fp32 or int32 lanes).
inline constexpr index_t panel_rows = 16;
/// Bytes of one packed chunk (one cache line).
inline constexpr index_t chunk_bytes = 64;
/// Largest |q| + |q'| of an int8 code pair for which u8 · s8 pair sums of vpmaddubsw cannot saturate.
inline constexpr int pair_bound = 128;

/// 16 rows × 4 consecutive k of int8 weights: q[i][j] = W[row0 + i, k0 + j]. One vpdpbusd operand.
struct block_q8x16 {
    std::int8_t q[panel_rows][4];  ///< row-major [row][k within the quad]
};
static_assert(sizeof(block_q8x16) == chunk_bytes, "block_q8x16 must be one 64-byte line");

/// 16 rows × 8 consecutive k of int4 weights: q[i][j] = W[row0+i, k0+j] | W[row0+i, k0+4+j] << 4.
struct block_q4x16 {
    std::uint8_t q[panel_rows][4];  ///< low nibble: k0 + j, high nibble: k0 + 4 + j
};
static_assert(sizeof(block_q4x16) == chunk_bytes, "block_q4x16 must be one 64-byte line");

/// Compile-time facts about each bit width.
template <qbits B>
struct quant_traits;

template <>
struct quant_traits<qbits::int8> {
    using block = block_q8x16;
    static constexpr index_t chunk_k = 4;  ///< k per chunk
    static constexpr int qmin_sym = -127, qmax_sym = 127;
    static constexpr int qmin_asym = -128, qmax_asym = 127;
    static constexpr int zero_sym = 0;
};
template <>
struct quant_traits<qbits::int4> {
    using block = block_q4x16;
    static constexpr index_t chunk_k = 8;
    static constexpr int qmin_sym = 0, qmax_sym = 15;
    static constexpr int qmin_asym = 0, qmax_asym = 15;
    static constexpr int zero_sym = 8;
};

inline constexpr index_t chunk_k(qbits b) noexcept { return b == qbits::int8 ? 4 : 8; }
inline constexpr int qmin(qbits b, bool symmetric) noexcept {
    return b == qbits::int8 ? (symmetric ? -127 : -128) : 0;
}
inline constexpr int qmax(qbits b, bool /*symmetric*/) noexcept { return b == qbits::int8 ? 127 : 15; }
inline constexpr int zero_symmetric(qbits b) noexcept { return b == qbits::int8 ? 0 : 8; }
inline constexpr index_t round_up(index_t v, index_t m) noexcept { return (v + m - 1) / m * m; }

/// The packed weights of one linear layer W [n, k]. Built by compress::quantize_rtn / quantize_gptq (or
/// from_codes); immutable afterwards.
class quantized_weights {
public:
    quantized_weights() = default;

    /// Packs integer codes q [n, k] (int32, already in range) and per-row-per-group scales / zeros [n, groups].
    /// `group` is the group length along k for per_group, ignored otherwise. `zeros` may be null for symmetric
    /// formats. Throws on inconsistent arguments; never returns a half-built object.
    static quantized_weights from_codes(qbits bits, granularity gran, index_t group, bool symmetric, index_t n,
                                        index_t k, const std::int32_t* q, const float* scales, const float* zeros) {
        require<shape_error>(n > 0 && k > 0, "quantized_weights: shape must be positive, got ", shape_str(n, k));
        quantized_weights w;
        w.bits_ = bits;
        w.gran_ = gran;
        w.symmetric_ = symmetric;
        w.n_ = n;
        w.k_ = k;
        const index_t ck = chunk_k(bits);
        if (gran == granularity::per_group) {
            require<shape_error>(group > 0 && group % 8 == 0, "quantized_weights: group size ", group,
                                 " must be a positive multiple of 8");
            require<shape_error>(k % group == 0, "quantized_weights: group size ", group,
                                 " does not divide the input dimension K = ", k);
            w.k_pad_ = k;
            w.group_ = group;
        } else {
            w.k_pad_ = round_up(k, ck);
            w.group_ = w.k_pad_;
        }
        w.groups_ = w.k_pad_ / w.group_;
        w.panels_ = round_up(n, panel_rows) / panel_rows;
        const index_t ng = gran == granularity::per_group ? w.groups_ : 1;  // groups in the caller's arrays
        const int lo = qmin(bits, symmetric), hi = qmax(bits, symmetric);
        for (index_t i = 0; i < n * k; ++i)
            require<format_error>(q[i] >= lo && q[i] <= hi, "quantized_weights: code ", q[i], " at (", i / k, ", ",
                                  i % k, ") outside [", lo, ", ", hi, "]");
        const bool has_zero = !(bits == qbits::int8 && symmetric);
        w.data_.reset(static_cast<std::size_t>(w.panels_ * (w.k_pad_ / ck) * chunk_bytes));
        w.scales_.reset(static_cast<std::size_t>(w.panels_ * w.groups_ * panel_rows));
        if (has_zero) w.zeros_.reset(w.scales_.size());
        if (bits == qbits::int8) w.row_sums_.reset(static_cast<std::size_t>(w.panels_ * panel_rows));
        w.pair_bounded_ = bits == qbits::int8;  // until a pair says otherwise (k_pad is even for int8)
        for (index_t r = 0; r < w.panels_ * panel_rows; ++r) {
            for (index_t g = 0; g < w.groups_; ++g) {
                const std::size_t at = w.scale_index(r, g);
                const index_t src = r < n ? r * ng + (ng == 1 ? 0 : g) : -1;
                const float s = src >= 0 ? scales[src] : 0.f;
                require<numeric_error>(s == s && s - s == 0.f, "quantized_weights: scale of row ", r,
                                       " is not finite");
                w.scales_[at] = s;
                if (has_zero) {
                    float z = static_cast<float>(zero_symmetric(bits));
                    if (!symmetric && src >= 0) {
                        require<format_error>(zeros != nullptr, "quantized_weights: asymmetric format needs zeros");
                        z = zeros[src];
                    }
                    w.zeros_[at] = z;
                }
            }
            std::int32_t sum = 0;
            int prev = 0;  // the even code of the current pair
            for (index_t c = 0; c < w.k_pad_; ++c) {
                int v = 0;  // padding: exactly-zero weight
                if (r < n && c < k)
                    v = q[r * k + c];
                else if (bits == qbits::int4)
                    v = static_cast<int>(w.zeros_[w.scale_index(r, c / w.group_)]);
                w.set_code(r, c, v);
                sum += v;
                if (c % 2 == 0)
                    prev = v;
                else if (std::abs(prev) + std::abs(v) > pair_bound)
                    w.pair_bounded_ = false;
            }
            if (bits == qbits::int8) w.row_sums_[static_cast<std::size_t>(r)] = sum;
        }
        return w;
    }

    qbits bits() const noexcept { return bits_; }
    granularity gran() const noexcept { return gran_; }
    bool symmetric() const noexcept { return symmetric_; }
    bool has_zeros() const noexcept { return !zeros_.empty(); }
    index_t rows() const noexcept { return n_; }          ///< N (out features)
    index_t cols() const noexcept { return k_; }          ///< K (in features)
    index_t cols_padded() const noexcept { return k_pad_; }
    index_t group() const noexcept { return group_; }     ///< k per scale group (K_pad unless per_group)
    index_t groups() const noexcept { return groups_; }   ///< groups per row
    index_t panels() const noexcept { return panels_; }
    bool empty() const noexcept { return n_ == 0; }

    const std::uint8_t* data() const noexcept { return data_.data(); }
    const float* scales() const noexcept { return scales_.data(); }
    const float* zeros() const noexcept { return zeros_.empty() ? nullptr : zeros_.data(); }
    const std::int32_t* row_sums() const noexcept { return row_sums_.empty() ? nullptr : row_sums_.data(); }
    /// int8 codes whose every pair (k = 2t, 2t + 1) of a row has |q| + |q'| ≤ pair_bound (see the file comment).
    bool pair_bounded() const noexcept { return pair_bounded_; }
    /// Bytes of the packed representation (codes + scales + zeros + row sums).
    std::size_t bytes() const noexcept {
        return data_.size() + 4 * (scales_.size() + zeros_.size() + row_sums_.size());
    }

    /// Index of s[row, g] in scales() / zeros().
    std::size_t scale_index(index_t row, index_t g) const noexcept {
        return static_cast<std::size_t>(((row / panel_rows) * groups_ + g) * panel_rows + row % panel_rows);
    }
    float scale(index_t row, index_t col) const noexcept { return scales_[scale_index(row, col / group_)]; }
    float zero(index_t row, index_t col) const noexcept {
        return zeros_.empty() ? 0.f : zeros_[scale_index(row, col / group_)];
    }
    /// The stored integer code of W[row, col] (int8: signed; int4: 0..15).
    int code(index_t row, index_t col) const noexcept {
        const std::size_t at = byte_index(row, col);
        if (bits_ == qbits::int8) return static_cast<std::int8_t>(data_[at]);
        const int j = static_cast<int>(col % 8);
        return j < 4 ? (data_[at] & 0xF) : (data_[at] >> 4);
    }
    /// s · (q − z) in fp32, exactly what every kernel multiplies.
    float value(index_t row, index_t col) const noexcept {
        return scale(row, col) * (static_cast<float>(code(row, col)) - zero(row, col));
    }

private:
    std::size_t byte_index(index_t row, index_t col) const noexcept {
        const index_t ck = chunk_k(bits_);
        const index_t p = row / panel_rows, i = row % panel_rows;
        const index_t chunk = p * (k_pad_ / ck) + col / ck;
        return static_cast<std::size_t>(chunk * chunk_bytes + i * 4 + (col % ck) % 4);
    }
    void set_code(index_t row, index_t col, int v) noexcept {
        const std::size_t at = byte_index(row, col);
        if (bits_ == qbits::int8) {
            data_[at] = static_cast<std::uint8_t>(static_cast<std::int8_t>(v));
        } else if (col % 8 < 4) {
            data_[at] = static_cast<std::uint8_t>((data_[at] & 0xF0) | (v & 0xF));
        } else {
            data_[at] = static_cast<std::uint8_t>((data_[at] & 0x0F) | ((v & 0xF) << 4));
        }
    }

    qbits bits_ = qbits::int8;
    granularity gran_ = granularity::per_channel;
    bool symmetric_ = true;
    bool pair_bounded_ = false;
    index_t n_ = 0, k_ = 0, k_pad_ = 0, group_ = 0, groups_ = 0, panels_ = 0;
    aligned_buffer<std::uint8_t> data_;
    aligned_buffer<float> scales_;
    aligned_buffer<float> zeros_;
    aligned_buffer<std::int32_t> row_sums_;
};

}  // namespace formats

using formats::quantized_weights;

}  // namespace cpet::compress
