// cpet/kernels/epilogue.hpp — what every GEMM-like kernel applies to an output tile before storing it.
//
// Its own header (not kernels/gemm_f32.hpp) because the weight-format and PET concepts (compress/format.hpp,
// pet/policy.hpp) speak of it, and they should not pull the fp32 GEMM into every translation unit that only
// names a format or a hook.
//
// The low-rank term comes in two forms. The plain one (rank > 0) is one U·Bᵀ for every row: a task's LoRA /
// recovery term. The segmented one (segments) gives each run of rows its own terms — the rows of a mixed batch's
// sequences of task j get s_j·U_j·B_jᵀ and nothing of the other tasks' (S-LoRA / Punica's SGMV, on a CPU): a row
// of task j costs r_j extra multiply-adds per output, not the sum of the batch's ranks. Segments may overlap (a
// row takes the term of every segment that covers it), so a task whose term has several members (CPET's recovery
// + LoRA) or a BitFit Δb (a rank-1 term, U = 1) needs no concatenated copy of its factors. A segment's B may be
// stored compactly — bf16, or int8 codes with one fp32 scale per row (a task's factors kept 2-4x smaller) — and
// is read as stored. Kernels that fuse the low-rank term apply each segment's term inside the output tiles of its
// rows (a tile that straddles segments adds each one's term to its own rows); the others add it afterwards, one
// thin GEMM per segment (compress/split_epilogue.hpp).
#pragma once

#include <cstdint>

#include "cpet/core/bf16.hpp"
#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/kernels/activations.hpp"

namespace cpet::kernels {

/// How a low-rank factor is stored: fp32, bf16 (uint16 bit patterns), or int8 codes with one fp32 scale per row
/// (value = scale[row]·code).
enum class factor_type : std::uint8_t { f32, bf16, s8 };

inline constexpr const char* factor_type_name(factor_type t) noexcept {
    return t == factor_type::f32 ? "fp32" : t == factor_type::bf16 ? "bf16" : "int8";
}

/// The low-rank term of rows [row0, row0 + rows) of y: scale · U_s·B_sᵀ with U_s [rows, rank] (its row i, the
/// term of y's row row0 + i, at u + i·ld_u) and B_s [N, rank] (row stride ld_b elements, stored as b_type says;
/// int8 with b_scale [N]).
struct lowrank_segment {
    index_t row0 = 0, rows = 0;
    const float* u = nullptr;
    index_t ld_u = 0;
    const void* b = nullptr;
    index_t ld_b = 0;
    index_t rank = 0;
    float scale = 1.f;
    factor_type b_type = factor_type::f32;
    const float* b_scale = nullptr;

    /// B_s[n, r] as a float.
    float b_at(index_t n, index_t r) const noexcept {
        const index_t i = n * ld_b + r;
        switch (b_type) {
            case factor_type::f32: return static_cast<const float*>(b)[i];
            case factor_type::bf16: return from_bf16(static_cast<const std::uint16_t*>(b)[i]);
            default: return b_scale[n] * float(static_cast<const std::int8_t*>(b)[i]);
        }
    }
};

/// What the GEMM applies to each output tile before it is stored, in this order:
/// y = act(acc + bias + lowrank_scale · U·Bᵀ + [the row's segment term]) + residual.
struct epilogue {
    const float* bias = nullptr;  ///< [N] or null
    activation act = activation::none;
    const float* residual = nullptr;  ///< [M, N] with row stride ld_residual, or null; may alias y
    index_t ld_residual = 0;
    // Low-rank term (unmerged LoRA / recovery): U [M, rank] (row stride ld_u), B [N, rank] (row stride ld_b).
    const float* lowrank_u = nullptr;
    index_t ld_u = 0;
    const float* lowrank_b = nullptr;
    index_t ld_b = 0;
    index_t rank = 0;
    float lowrank_scale = 1.f;
    // Segmented low-rank term (a mixed-task batch): segment_count terms of row runs in non-decreasing row0
    // order, which may overlap; a row gets the sum of the terms of the segments covering it (none outside every
    // segment). Used instead of the plain term (rank must then be 0).
    const lowrank_segment* segments = nullptr;
    index_t segment_count = 0;

    /// Whether there is a low-rank term of either form.
    bool has_lowrank() const noexcept { return rank > 0 || segment_count > 0; }
};

/// Whether the M × N block at r (row stride ld) shares memory with y [M, N] (a residual read while y is written).
inline bool residual_overlaps(const float* r, index_t ld, MatrixView<float> y) noexcept {
    const index_t M = y.rows(), N = y.cols();
    if (!r || M == 0 || N == 0) return false;
    const float* r_end = r + (M - 1) * ld + N;
    return r < y.row(M - 1) + N && y.data() < r_end;
}

/// Throws shape_error unless the low-rank term of `ep` is usable for y [M, N] (`who` prefixes the message): the
/// plain term's pointers and strides, or the segments' order, rows, pointers and strides. O(segments): a
/// kernel's checked entry calls it once, the hot loops trust it.
inline void check_lowrank(const epilogue& ep, index_t M, index_t N, const char* who) {
    require<shape_error>(ep.rank >= 0, who, ": low-rank rank must be >= 0, got ", ep.rank);
    if (ep.rank > 0) {
        require<shape_error>(ep.lowrank_u != nullptr, who, ": lowrank_u is null with rank ", ep.rank);
        require<shape_error>(ep.lowrank_b != nullptr, who, ": lowrank_b is null with rank ", ep.rank);
        require<shape_error>(M <= 1 || ep.ld_u >= ep.rank, who, ": lowrank_u row stride ", ep.ld_u,
                             " is smaller than the rank ", ep.rank);
        require<shape_error>(N <= 1 || ep.ld_b >= ep.rank, who, ": lowrank_b row stride ", ep.ld_b,
                             " is smaller than the rank ", ep.rank);
    }
    require<shape_error>(ep.segment_count >= 0 && (ep.segment_count == 0 || ep.segments != nullptr), who,
                         ": ", ep.segment_count, " low-rank segments but no segment array");
    require<shape_error>(ep.segment_count == 0 || ep.rank == 0, who, ": a plain low-rank term (rank ", ep.rank,
                         ") and a segmented one together; a segment per row run carries every term");
    index_t start = 0;
    for (index_t i = 0; i < ep.segment_count; ++i) {
        const lowrank_segment& s = ep.segments[i];
        require<shape_error>(s.row0 >= start && s.rows >= 0 && s.row0 + s.rows <= M, who, ": low-rank segment ", i,
                             " covers rows [", s.row0, ", ", s.row0 + s.rows, "), expected runs in non-decreasing "
                             "order of their first row within the ", M, " rows (the previous one starts at ", start, ")");
        require<shape_error>(s.rank >= 0, who, ": low-rank segment ", i, " has rank ", s.rank);
        if (s.rank > 0 && s.rows > 0) {
            require<shape_error>(s.u && s.b && (s.rows <= 1 || s.ld_u >= s.rank) && (N <= 1 || s.ld_b >= s.rank), who,
                                 ": low-rank segment ", i, " of rank ", s.rank, " needs U and B with row strides >= "
                                 "the rank (U stride ", s.ld_u, ", B stride ", s.ld_b, ")");
            require<shape_error>(s.b_type != factor_type::s8 || s.b_scale, who, ": low-rank segment ", i,
                                 " has int8 B without its per-row scales");
        }
        start = s.row0;
    }
}

}  // namespace cpet::kernels
