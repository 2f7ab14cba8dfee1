// cpet/kernels/attention.hpp — multi-head / grouped-query scaled dot-product attention for one sequence.
//
//   out_h = softmax(q_h · k_gᵀ · scale + mask) · v_g,   g = h / (n_heads / n_kv_heads)
// Masks: keys j >= kv_len are padding; with `causal`, query i sees keys j <= q_pos0 + i (q_pos0 is the
// position of query row 0 among the keys: 0 for a full sequence, cache length for decoding). A query that sees
// no key (kv_len 0, or a causal position before key 0) gets a zero output, not NaN: the softmax over an empty
// set is taken as the zero distribution, so a fully padded row contributes nothing downstream.
//
// Algorithm (FlashAttention, Dao et al. 2022, forward pass on a CPU): a work item is one KV head g and a tile of
// query tokens; its rows are every query head of the group × every token of the tile, so the query heads of a
// GQA group share each K/V load. For each tile of `key_tile` keys the item computes the score tile S = Q·Kᵀ,
// then per row the online softmax
//   m' = max(m, max_j S_j),  P = exp(S − m'),  l' = l·exp(m − m') + Σ_j P_j,  O' = O·exp(m − m') + P·V
// and finally out = O / l. Memory is O(tile) per thread, never Sq × Sk. Work items go to the threads from a
// shared counter, the heaviest (last causal tiles) first, so a causal triangle balances.
//
// Scores use two shapes. With >= 4 rows (prefill, or decode with a wide GQA group) the item works on the
// transposed score tile Sᵀ (keys × rows): the scaled queries are stored once per item as Qᵀ (D × rows, rows
// padded to a vector), and a register-tiled micro-kernel broadcasts k_j[d] straight from the K rows and multiplies
// it by vectors of Qᵀ — no copy of K at all, and the per-row softmax statistics (max, running max m, sum l,
// rescale factor) are lanes of vectors, so the online softmax needs no horizontal reduction and no per-row
// masking loop. P·V then broadcasts Pᵀ[j, r] and rescales O by exp(m − m') as it loads the accumulator. With
// fewer rows (decode: Sq = 1 and a small group) each score is a vector dot product straight from the K rows,
// since a row of Pᵀ would fill a fraction of a vector. When head_dim is not a multiple of the vector width, the V
// rows of a tile (and, on the dot-product path, the K rows) are copied into zero-padded scratch so the inner
// loops never need a tail.
//
// Parallelism is over (KV head, query tile) only: a decode step with one KV head (MQA, Sq = 1) runs on one thread.
// Splitting the keys across threads with a final merge of (m, l, O) ("flash-decoding") would fix that; not done.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpet/arch/dispatch.hpp"
#include "cpet/core/buffer.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/core/parallel.hpp"

namespace cpet::kernels {

struct attention_args {
    ConstMatrixView<float> q;  ///< [Sq, n_heads·head_dim]
    ConstMatrixView<float> k;  ///< [Sk, n_kv_heads·head_dim]
    ConstMatrixView<float> v;  ///< [Sk, n_kv_heads·head_dim]
    MatrixView<float> out;     ///< [Sq, n_heads·head_dim]
    index_t n_heads = 0;
    index_t n_kv_heads = 0;
    index_t head_dim = 0;
    float scale = 0.f;   ///< 0 means 1/sqrt(head_dim)
    bool causal = false;
    index_t q_pos0 = 0;   ///< causal offset: query row i sits at key position q_pos0 + i
    index_t kv_len = -1;  ///< keys at index >= kv_len are masked (padding); −1 means all Sk keys
};

/// Multiply-adds of one attention call counted the usual way (2·D per score, 2·D per P·V term, visible pairs
/// only); used by the benchmarks.
inline double attention_flops(const attention_args& a) {
    const index_t Sq = a.q.rows(), Sk = a.k.rows();
    const index_t kv_len = a.kv_len < 0 ? Sk : a.kv_len;
    double pairs = 0;
    for (index_t i = 0; i < Sq; ++i) {
        index_t vis = kv_len;
        if (a.causal) vis = std::min(vis, a.q_pos0 + i + 1);
        pairs += double(std::max<index_t>(vis, 0));
    }
    return pairs * 4.0 * double(a.head_dim) * double(a.n_heads);
}

namespace detail::attn {

inline constexpr index_t key_tile = 64;     // keys per tile: a multiple of 4 vectors of AVX-512 and of AVX2
inline constexpr index_t target_rows = 64;  // query rows (heads of a group × tokens) per work item
inline constexpr index_t gemm_rows = 4;     // below this many rows scores are dot products (decode shape)

template <class Arch>
struct widths {
    static constexpr index_t W = 1;
    static constexpr int NV = 1;
};
template <class Arch>
    requires arch::is_simd_v<Arch>
struct widths<Arch> {
    static constexpr index_t W = static_cast<index_t>(xsimd::batch<float, Arch>::size);
    static constexpr int NV = W >= 16 ? 4 : 2;  // vectors per micro-tile row: 16 (AVX-512) / 8 (AVX2) accumulators
};

inline index_t round_up(index_t x, index_t m) { return (x + m - 1) / m * m; }

/// Pins a loaded vector to a register. GCC otherwise folds a load that feeds four FMAs into each of them, one
/// load per FMA instead of one per four, which makes the micro-kernels below load-bound (measured: the score
/// kernel issued 20 loads per 16 FMAs on Zen 5, whose two 512-bit load ports then set its speed).
template <class B>
inline void in_register(B& b) noexcept {
#if defined(__GNUC__)
    asm("" : "+v"(b.data));
#endif
}

/// Per-thread tile scratch; sized once per call, outside the parallel region. R = rows rounded up to a vector.
struct scratch {
    aligned_buffer<float> q;   // rows × Dp, scaled queries, zero padded (dot-product path)
    aligned_buffer<float> qt;  // D × R, scaled queries transposed, padded rows zero (tile path)
    aligned_buffer<float> kt;  // key_tile × Dp (padded K rows, dot-product path)
    aligned_buffer<float> vp;  // key_tile × Dp (padded V rows, only when D % W != 0)
    aligned_buffer<float> s;   // rows × key_tile scores, then probabilities (dot-product path)
    aligned_buffer<float> st;  // key_tile × R transposed scores, then probabilities (tile path)
    aligned_buffer<float> o;   // rows × Dp unnormalised output accumulator
    aligned_buffer<float> mv, lv, alpha, limf;  // R each: running max, running sum, rescale, visible keys (tile path)
    std::vector<float> m, l;   // running max and running sum per row (dot-product path)
    std::vector<index_t> lim;  // keys [0, lim) are visible to the row
    std::vector<float*> out;   // output row pointers

    scratch(index_t rows, index_t D, index_t Dp, index_t R)
        : q(std::size_t(rows * Dp)),
          qt(std::size_t(D * R)),
          kt(std::size_t(key_tile * Dp)),
          vp(std::size_t(key_tile * Dp)),
          s(std::size_t(rows * key_tile)),
          st(std::size_t(key_tile * R)),
          o(std::size_t(rows * Dp)),
          mv(std::size_t(R)),
          lv(std::size_t(R)),
          alpha(std::size_t(R)),
          limf(std::size_t(R)),
          m(std::size_t(rows)),
          l(std::size_t(rows)),
          lim(std::size_t(rows)),
          out(std::size_t(rows)) {}
};

// ---- scores S[r, j] = q_r · k_j ------------------------------------------------------------------------------

template <class Arch>
struct tile_shape {
    static constexpr int JR = 4;                                    // keys per micro-tile
    static constexpr int RV = widths<Arch>::W >= 16 ? 4 : 3;        // row vectors per micro-tile
};

/// Sᵀ[j, c·W ..) for JR keys (rows of K from k, stride ks) × RV row vectors of Qᵀ (D × R, from qt): each step
/// broadcasts JR elements k_j[d] and loads RV vectors Qᵀ[d, ·] — JR·RV FMAs for JR + RV loads.
template <class Arch, int JR, int RV>
void scores_t_block(const float* qt, index_t R, const float* k, index_t ks, index_t D, float* st) {
    using B = xsimd::batch<float, Arch>;
    constexpr index_t W = widths<Arch>::W;
    B acc[JR][RV];
    for (int j = 0; j < JR; ++j)
        for (int c = 0; c < RV; ++c) acc[j][c] = B(0.f);
    for (index_t d = 0; d < D; ++d) {
        B qv[RV];
        for (int c = 0; c < RV; ++c) {
            qv[c] = B::load_aligned(qt + d * R + c * W);
            in_register(qv[c]);
        }
        for (int j = 0; j < JR; ++j) {
            const B kb(k[j * ks + d]);
            for (int c = 0; c < RV; ++c) acc[j][c] = xsimd::fma(kb, qv[c], acc[j][c]);
        }
    }
    for (int j = 0; j < JR; ++j)
        for (int c = 0; c < RV; ++c) acc[j][c].store_aligned(st + j * R + c * W);
}

template <class Arch, int RV>
void scores_t_rows(const float* qt, index_t R, const float* k, index_t ks, index_t D, index_t nk, float* st) {
    constexpr int JR = tile_shape<Arch>::JR;
    index_t j = 0;
    for (; j + JR <= nk; j += JR) scores_t_block<Arch, JR, RV>(qt, R, k + j * ks, ks, D, st + j * R);
    for (; j < nk; ++j) scores_t_block<Arch, 1, RV>(qt, R, k + j * ks, ks, D, st + j * R);
}

/// Sᵀ (nk × R) = K[0, nk) · Qᵀ.
template <class Arch>
void scores_t(const float* qt, index_t R, const float* k, index_t ks, index_t D, index_t nk, float* st) {
    constexpr index_t W = widths<Arch>::W;
    constexpr int RV = tile_shape<Arch>::RV;
    const index_t nv = R / W;
    index_t c = 0;
    for (; c + RV <= nv; c += RV) scores_t_rows<Arch, RV>(qt + c * W, R, k, ks, D, nk, st + c * W);
    switch (nv - c) {
        case 3: if constexpr (RV > 3) scores_t_rows<Arch, 3>(qt + c * W, R, k, ks, D, nk, st + c * W); break;
        case 2: scores_t_rows<Arch, 2>(qt + c * W, R, k, ks, D, nk, st + c * W); break;
        case 1: scores_t_rows<Arch, 1>(qt + c * W, R, k, ks, D, nk, st + c * W); break;
        default: break;
    }
}

/// MR (< 4) rows × nk keys as dot products over Dp straight from K rows (stride ks, padded to Dp).
template <class Arch, int MR>
void scores_dot_rows(const float* q, index_t Dp, const float* k, index_t ks, index_t nk, float* s) {
    using B = xsimd::batch<float, Arch>;
    constexpr index_t W = widths<Arch>::W;
    constexpr int KB = 4;  // keys per step: MR·KB accumulators, one K load feeds MR FMAs
    index_t j = 0;
    for (; j + KB <= nk; j += KB) {
        B acc[MR][KB];
        for (int r = 0; r < MR; ++r)
            for (int c = 0; c < KB; ++c) acc[r][c] = B(0.f);
        for (index_t d = 0; d < Dp; d += W) {
            B kv[KB];
            for (int c = 0; c < KB; ++c) kv[c] = B::load_unaligned(k + (j + c) * ks + d);
            for (int r = 0; r < MR; ++r) {
                const B qv = B::load_aligned(q + r * Dp + d);
                for (int c = 0; c < KB; ++c) acc[r][c] = xsimd::fma(qv, kv[c], acc[r][c]);
            }
        }
        for (int r = 0; r < MR; ++r)
            for (int c = 0; c < KB; ++c) s[r * key_tile + j + c] = xsimd::hadd(acc[r][c]);
    }
    for (; j < nk; ++j) {
        B acc[MR];
        for (int r = 0; r < MR; ++r) acc[r] = B(0.f);
        for (index_t d = 0; d < Dp; d += W) {
            const B kv = B::load_unaligned(k + j * ks + d);
            for (int r = 0; r < MR; ++r) acc[r] = xsimd::fma(B::load_aligned(q + r * Dp + d), kv, acc[r]);
        }
        for (int r = 0; r < MR; ++r) s[r * key_tile + j] = xsimd::hadd(acc[r]);
    }
}

// ---- O[r, :] = alpha_r · O[r, :] + Σ_j P[r, j] · v_j -----------------------------------------------------------
// P[r, j] sits at p[r·pr + j·pj]: pr = key_tile, pj = 1 for the row-major score tile, pr = 1, pj = R for Sᵀ.
// alpha (one per row) rescales the accumulator as it is loaded; nullptr means 1.

template <class Arch, int MR, int NC>
void pv_block(const float* p, index_t pr, index_t pj, const float* alpha, const float* v, index_t vs, index_t nk,
              float* o, index_t Dp) {
    using B = xsimd::batch<float, Arch>;
    constexpr index_t W = widths<Arch>::W;
    B acc[MR][NC];
    for (int r = 0; r < MR; ++r)
        for (int c = 0; c < NC; ++c) acc[r][c] = B::load_aligned(o + r * Dp + c * W);
    if (alpha != nullptr)
        for (int r = 0; r < MR; ++r) {
            const B ab(alpha[r]);
            for (int c = 0; c < NC; ++c) acc[r][c] *= ab;
        }
    for (index_t j = 0; j < nk; ++j) {
        B vv[NC];
        for (int c = 0; c < NC; ++c) {
            vv[c] = B::load_unaligned(v + j * vs + c * W);
            if constexpr (MR > 1) in_register(vv[c]);
        }
        for (int r = 0; r < MR; ++r) {
            const B pb(p[r * pr + j * pj]);
            for (int c = 0; c < NC; ++c) acc[r][c] = xsimd::fma(pb, vv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < MR; ++r)
        for (int c = 0; c < NC; ++c) acc[r][c].store_aligned(o + r * Dp + c * W);
}

template <class Arch, int MR>
void pv_rows(const float* p, index_t pr, index_t pj, const float* alpha, const float* v, index_t vs, index_t nk,
             float* o, index_t Dp) {
    constexpr index_t W = widths<Arch>::W;
    constexpr int NV = widths<Arch>::NV;
    index_t d = 0;
    for (; d + NV * W <= Dp; d += NV * W) pv_block<Arch, MR, NV>(p, pr, pj, alpha, v + d, vs, nk, o + d, Dp);
    switch ((Dp - d) / W) {
        case 3: pv_block<Arch, MR, 3>(p, pr, pj, alpha, v + d, vs, nk, o + d, Dp); break;
        case 2: pv_block<Arch, MR, 2>(p, pr, pj, alpha, v + d, vs, nk, o + d, Dp); break;
        case 1: pv_block<Arch, MR, 1>(p, pr, pj, alpha, v + d, vs, nk, o + d, Dp); break;
        default: break;
    }
}

/// Calls f(std::integral_constant<int, MR>{}, r0) over rows [0, rows) in blocks of 4 and a tail of 1..3.
template <class F>
void for_row_blocks(index_t rows, F&& f) {
    index_t r = 0;
    for (; r + 4 <= rows; r += 4) f(std::integral_constant<int, 4>{}, r);
    switch (rows - r) {
        case 3: f(std::integral_constant<int, 3>{}, r); break;
        case 2: f(std::integral_constant<int, 2>{}, r); break;
        case 1: f(std::integral_constant<int, 1>{}, r); break;
        default: break;
    }
}

// ---- per-row online softmax step ------------------------------------------------------------------------------

/// s[0, ncols) ← exp(s − m), returns the sum. ncols is a multiple of the vector width.
template <class Arch>
float exp_row(float* s, index_t ncols, float m) {
    if constexpr (arch::is_simd_v<Arch>) {
        using B = xsimd::batch<float, Arch>;
        constexpr index_t W = widths<Arch>::W;
        const B mb(m);
        B sum(0.f);
        for (index_t j = 0; j < ncols; j += W) {
            const B e = xsimd::exp(B::load_aligned(s + j) - mb);
            e.store_aligned(s + j);
            sum += e;
        }
        return xsimd::hadd(sum);
    } else {
        float sum = 0.f;
        for (index_t j = 0; j < ncols; ++j) sum += (s[j] = std::exp(s[j] - m));
        return sum;
    }
}

template <class Arch>
float max_row(const float* s, index_t ncols) {
    if constexpr (arch::is_simd_v<Arch>) {
        using B = xsimd::batch<float, Arch>;
        constexpr index_t W = widths<Arch>::W;
        B mx(-std::numeric_limits<float>::infinity());
        for (index_t j = 0; j < ncols; j += W) mx = xsimd::max(mx, B::load_aligned(s + j));
        alignas(64) float lanes[W];
        mx.store_aligned(lanes);
        float r = lanes[0];
        for (index_t i = 1; i < W; ++i) r = lanes[i] > r ? lanes[i] : r;
        return r;
    } else {
        float r = -std::numeric_limits<float>::infinity();
        for (index_t j = 0; j < ncols; ++j) r = s[j] > r ? s[j] : r;
        return r;
    }
}

template <class Arch>
void scale_row(float* o, index_t Dp, float alpha) {
    if constexpr (arch::is_simd_v<Arch>) {
        using B = xsimd::batch<float, Arch>;
        constexpr index_t W = widths<Arch>::W;
        const B ab(alpha);
        for (index_t d = 0; d < Dp; d += W) (B::load_aligned(o + d) * ab).store_aligned(o + d);
    } else {
        for (index_t d = 0; d < Dp; ++d) o[d] *= alpha;
    }
}

template <class Arch, int CV>
void softmax_t_block(float* st, index_t R, index_t nk, bool masked, index_t j0, const float* limf, float* m, float* l,
                     float* alpha) {
    using B = xsimd::batch<float, Arch>;
    constexpr index_t W = widths<Arch>::W;
    const B ninf(-std::numeric_limits<float>::infinity());
    B mx[CV], lim[CV];
    for (int c = 0; c < CV; ++c) mx[c] = ninf;
    if (masked) {
        for (int c = 0; c < CV; ++c) lim[c] = B::load_aligned(limf + c * W);
        for (index_t j = 0; j < nk; ++j) {
            const B key(float(j0 + j));
            for (int c = 0; c < CV; ++c) {
                const B sv = xsimd::select(key < lim[c], B::load_aligned(st + j * R + c * W), ninf);
                sv.store_aligned(st + j * R + c * W);
                mx[c] = xsimd::max(mx[c], sv);
            }
        }
    } else {
        for (index_t j = 0; j < nk; ++j)
            for (int c = 0; c < CV; ++c) mx[c] = xsimd::max(mx[c], B::load_aligned(st + j * R + c * W));
    }
    B mo[CV], ms[CV], sum[CV];
    for (int c = 0; c < CV; ++c) {
        mo[c] = B::load_aligned(m + c * W);
        const B mn = xsimd::max(mo[c], mx[c]);
        mn.store_aligned(m + c * W);
        ms[c] = xsimd::select(mn == ninf, B(0.f), mn);
        sum[c] = B(0.f);
    }
    for (index_t j = 0; j < nk; ++j)
        for (int c = 0; c < CV; ++c) {
            const B e = xsimd::exp(B::load_aligned(st + j * R + c * W) - ms[c]);
            e.store_aligned(st + j * R + c * W);
            sum[c] += e;
        }
    for (int c = 0; c < CV; ++c) {
        const B a = xsimd::exp(mo[c] - ms[c]);
        (B::load_aligned(l + c * W) * a + sum[c]).store_aligned(l + c * W);
        a.store_aligned(alpha + c * W);
    }
}

/// The online-softmax step on a transposed tile Sᵀ (nk × R), all rows at once, lane by lane: masks the keys a row
/// does not see (when `masked`: key j0 + j is visible to row r iff j0 + j < limf[r]), m' = max(m, max_j S),
/// P = exp(S − m'), l' = l·exp(m − m') + Σ_j P, and leaves exp(m − m') in alpha for P·V to rescale O with. A row
/// that has seen no key yet keeps m = −inf; its exponents are taken against 0 so that P = 0 and alpha = 0, not NaN.
/// Up to four row vectors go together, so the max and sum chains over the keys are independent.
template <class Arch>
void softmax_t(float* st, index_t R, index_t nk, bool masked, index_t j0, const float* limf, float* m, float* l,
               float* alpha) {
    constexpr index_t W = widths<Arch>::W;
    const index_t nv = R / W;
    index_t c = 0;
    for (; c + 4 <= nv; c += 4)
        softmax_t_block<Arch, 4>(st + c * W, R, nk, masked, j0, limf + c * W, m + c * W, l + c * W, alpha + c * W);
    const auto tail = [&](auto cv) {
        softmax_t_block<Arch, decltype(cv)::value>(st + c * W, R, nk, masked, j0, limf + c * W, m + c * W, l + c * W,
                                                   alpha + c * W);
    };
    switch (nv - c) {
        case 3: tail(std::integral_constant<int, 3>{}); break;
        case 2: tail(std::integral_constant<int, 2>{}); break;
        case 1: tail(std::integral_constant<int, 1>{}); break;
        default: break;
    }
}

/// The number of keys query token i of the call sees: kv_len, cut by the causal mask at its position.
inline index_t row_limit(const attention_args& a, index_t i, index_t kv_len) noexcept {
    index_t lim = kv_len;
    if (a.causal) lim = std::min(lim, a.q_pos0 + i + 1);
    return std::max<index_t>(lim, 0);
}

/// Copies n rows of D floats (row stride `stride`) into dst with row stride Dp, zeroing the padding columns; the
/// SIMD loops then read whole vectors of K or V rows when head_dim is not a multiple of the vector width.
inline const float* pad_rows(const float* src, index_t stride, index_t n, index_t D, index_t Dp, float* dst) noexcept {
    for (index_t j = 0; j < n; ++j) {
        std::memcpy(dst + j * Dp, src + j * stride, sizeof(float) * std::size_t(D));
        std::fill(dst + j * Dp + D, dst + (j + 1) * Dp, 0.f);
    }
    return dst;
}

/// out = O / l for every row of the item; a row that saw no key (l == 0) gets zeros.
inline void store_rows(const float* o, index_t Dp, const float* l, float* const* out, index_t rows,
                       index_t D) noexcept {
    for (index_t r = 0; r < rows; ++r) {
        const float* orow = o + r * Dp;
        float* dst = out[r];
        if (l[r] > 0.f) {
            const float inv = 1.f / l[r];
            for (index_t d = 0; d < D; ++d) dst[d] = orow[d] * inv;
        } else {
            std::fill(dst, dst + D, 0.f);
        }
    }
}

/// One work item on the dot-product path (fewer than gemm_rows rows, or no SIMD): KV head g, query tokens
/// [t0, t0 + tn).
template <class Arch>
void attention_item_dot(const attention_args& a, index_t g, index_t t0, index_t tn, index_t kv_len, float scale,
                    scratch& w) {
    constexpr index_t W = widths<Arch>::W;
    constexpr float ninf = -std::numeric_limits<float>::infinity();
    const index_t D = a.head_dim, Dp = round_up(D, W);
    const index_t group = a.n_heads / a.n_kv_heads;
    const index_t rows = group * tn;
    const bool padded = Dp != D;

    // Load the rows: scaled queries, limits, empty accumulators.
    index_t kend = 0;
    for (index_t hh = 0; hh < group; ++hh) {
        const index_t h = g * group + hh;
        for (index_t t = 0; t < tn; ++t) {
            const index_t r = hh * tn + t, i = t0 + t;
            const float* src = a.q.row(i) + h * D;
            float* dst = w.q.data() + r * Dp;
            for (index_t d = 0; d < D; ++d) dst[d] = src[d] * scale;
            for (index_t d = D; d < Dp; ++d) dst[d] = 0.f;
            const index_t lim = row_limit(a, i, kv_len);
            w.lim[r] = lim;
            w.m[r] = ninf;
            w.l[r] = 0.f;
            w.out[r] = a.out.row(i) + h * D;
            kend = std::max(kend, lim);
        }
    }
    std::memset(w.o.data(), 0, sizeof(float) * std::size_t(rows * Dp));

    const index_t ks = a.k.stride(), vs = a.v.stride();
    for (index_t j0 = 0; j0 < kend; j0 += key_tile) {
        const index_t nk = std::min(key_tile, kend - j0);
        const index_t ncols = round_up(nk, W);
        const float* kp = a.k.row(j0) + g * D;
        const float* vp = a.v.row(j0) + g * D;
        float* S = w.s.data();

        // 1. scores (dot products: the rows are too few to fill a vector of Pᵀ)
        if constexpr (arch::is_simd_v<Arch>) {
            const float* kk = kp;
            index_t kst = ks;
            if (padded) {
                kk = pad_rows(kp, ks, nk, D, Dp, w.kt.data());
                kst = Dp;
            }
            for_row_blocks(rows, [&](auto mr, index_t r0) {
                scores_dot_rows<Arch, decltype(mr)::value>(w.q.data() + r0 * Dp, Dp, kk, kst, nk,
                                                           S + r0 * key_tile);
            });
        } else {
            for (index_t r = 0; r < rows; ++r) {
                const float* qr = w.q.data() + r * D;
                for (index_t j = 0; j < nk; ++j) {
                    const float* kr = kp + j * ks;
                    float dot = 0.f;
                    for (index_t d = 0; d < D; ++d) dot += qr[d] * kr[d];
                    S[r * key_tile + j] = dot;
                }
            }
        }

        // 2. online softmax, row by row
        index_t nk_used = 0;
        for (index_t r = 0; r < rows; ++r) {
            float* sr = S + r * key_tile;
            const index_t cnt = std::clamp<index_t>(w.lim[r] - j0, 0, nk);
            float mx = ninf;
            if (cnt > 0) {
                std::fill(sr + cnt, sr + ncols, ninf);  // causal / padding mask inside the tile
                mx = max_row<Arch>(sr, ncols);
            }
            const float m_new = mx > w.m[r] ? mx : w.m[r];
            if (cnt == 0 || m_new == ninf) {  // row sees nothing here: P = 0
                std::fill(sr, sr + ncols, 0.f);
                continue;
            }
            const float alpha = std::exp(w.m[r] - m_new);  // 0 on the first visible tile
            const float sum = exp_row<Arch>(sr, ncols, m_new);
            w.l[r] = w.l[r] * alpha + sum;
            if (alpha != 1.f) scale_row<Arch>(w.o.data() + r * Dp, Dp, alpha);
            w.m[r] = m_new;
            nk_used = std::max(nk_used, cnt);
        }
        if (nk_used == 0) continue;

        // 3. O += P · V over the keys some row sees (never past kv_len or Sk)
        if constexpr (arch::is_simd_v<Arch>) {
            const float* vv = vp;
            index_t vst = vs;
            if (padded) {
                vv = pad_rows(vp, vs, nk_used, D, Dp, w.vp.data());
                vst = Dp;
            }
            for_row_blocks(rows, [&](auto mr, index_t r0) {
                pv_rows<Arch, decltype(mr)::value>(S + r0 * key_tile, key_tile, 1, nullptr, vv, vst, nk_used,
                                                   w.o.data() + r0 * Dp, Dp);
            });
        } else {
            for (index_t r = 0; r < rows; ++r) {
                float* orow = w.o.data() + r * D;
                const float* pr = S + r * key_tile;
                for (index_t j = 0; j < nk_used; ++j) {
                    const float p = pr[j];
                    if (p == 0.f) continue;
                    const float* vr = vp + j * vs;
                    for (index_t d = 0; d < D; ++d) orow[d] += p * vr[d];
                }
            }
        }
    }

    store_rows(w.o.data(), Dp, w.l.data(), w.out.data(), rows, D);
}

/// One work item on the tile path (SIMD, >= gemm_rows rows): KV head g, query tokens [t0, t0 + tn).
template <class Arch>
void attention_item_tile(const attention_args& a, index_t g, index_t t0, index_t tn, index_t kv_len, float scale,
                         scratch& w) {
    constexpr index_t W = widths<Arch>::W;
    constexpr float ninf = -std::numeric_limits<float>::infinity();
    const index_t D = a.head_dim, Dp = round_up(D, W);
    const index_t group = a.n_heads / a.n_kv_heads;
    const index_t rows = group * tn, R = round_up(rows, W);
    const bool padded = Dp != D;
    float* qt = w.qt.data();

    // Qᵀ (scaled), limits and statistics; the padding rows (zero queries) "see" every key so that they never force
    // a mask, and their results are never stored.
    index_t kend = 0, kmin = std::numeric_limits<index_t>::max();
    for (index_t hh = 0; hh < group; ++hh) {
        const index_t h = g * group + hh;
        for (index_t t = 0; t < tn; ++t) {
            const index_t r = hh * tn + t, i = t0 + t;
            const float* src = a.q.row(i) + h * D;
            for (index_t d = 0; d < D; ++d) qt[d * R + r] = src[d] * scale;
            const index_t lim = row_limit(a, i, kv_len);
            w.lim[r] = lim;
            w.out[r] = a.out.row(i) + h * D;
            kend = std::max(kend, lim);
            kmin = std::min(kmin, lim);
        }
    }
    for (index_t r = 0; r < R; ++r) {
        w.mv[r] = ninf;
        w.lv[r] = 0.f;
        w.limf[r] = float(r < rows ? w.lim[r] : kend);
    }
    for (index_t d = 0; d < D; ++d)
        for (index_t r = rows; r < R; ++r) qt[d * R + r] = 0.f;
    std::memset(w.o.data(), 0, sizeof(float) * std::size_t(rows * Dp));

    const index_t ks = a.k.stride(), vs = a.v.stride();
    float* St = w.st.data();
    for (index_t j0 = 0; j0 < kend; j0 += key_tile) {
        const index_t nk = std::min(key_tile, kend - j0);
        const float* kp = a.k.row(j0) + g * D;
        const float* vp = a.v.row(j0) + g * D;
        scores_t<Arch>(qt, R, kp, ks, D, nk, St);
        softmax_t<Arch>(St, R, nk, j0 + nk > kmin, j0, w.limf.data(), w.mv.data(), w.lv.data(), w.alpha.data());
        const float* vv = vp;
        index_t vst = vs;
        if (padded) {
            vv = pad_rows(vp, vs, nk, D, Dp, w.vp.data());
            vst = Dp;
        }
        for_row_blocks(rows, [&](auto mr, index_t r0) {
            pv_rows<Arch, decltype(mr)::value>(St + r0, 1, R, w.alpha.data() + r0, vv, vst, nk, w.o.data() + r0 * Dp,
                                               Dp);
        });
    }

    store_rows(w.o.data(), Dp, w.lv.data(), w.out.data(), rows, D);
}

template <class Arch>
void attention_item(const attention_args& a, index_t g, index_t t0, index_t tn, index_t kv_len, float scale,
                    scratch& w) {
    if constexpr (arch::is_simd_v<Arch>) {
        if ((a.n_heads / a.n_kv_heads) * tn >= gemm_rows) return attention_item_tile<Arch>(a, g, t0, tn, kv_len, scale, w);
    }
    attention_item_dot<Arch>(a, g, t0, tn, kv_len, scale, w);
}

}  // namespace detail::attn

/// Unchecked body: the arguments must already satisfy the checks of attention(const attention_args&).
template <class Arch>
void attention(Arch, const attention_args& a) {
    namespace da = detail::attn;
    const index_t Sq = a.q.rows(), Sk = a.k.rows(), D = a.head_dim;
    if (Sq == 0 || a.n_heads == 0) return;
    const index_t group = a.n_heads / a.n_kv_heads;
    const float scale = a.scale != 0.f ? a.scale : 1.f / std::sqrt(float(D));
    const index_t kv_len = a.kv_len < 0 ? Sk : std::min(a.kv_len, Sk);
    const index_t Dp = da::round_up(D, da::widths<Arch>::W);

    const index_t tq = std::min(Sq, std::max<index_t>(1, da::target_rows / group));  // tokens per item
    const index_t tiles = (Sq + tq - 1) / tq;
    const index_t items = a.n_kv_heads * tiles;

    // Tiny calls stay on one thread: a parallel region costs a few microseconds.
    const double work = double(Sq) * double(std::max<index_t>(kv_len, 1)) * double(D) * double(a.n_heads);
    const int threads = work < 65536.0 ? 1 : int(std::min<index_t>(max_threads(), items));

    std::vector<da::scratch> ws;
    ws.reserve(std::size_t(threads));
    for (int t = 0; t < threads; ++t) ws.emplace_back(group * tq, D, Dp, da::round_up(group * tq, da::widths<Arch>::W));

    // Items in decreasing order of work (last query tiles first when causal), handed out from a counter.
    std::atomic<index_t> next{0};
    parallel_region(threads, [&](int tid, int) {
        da::scratch& w = ws[std::size_t(tid)];
        for (index_t it = next.fetch_add(1, std::memory_order_relaxed); it < items;
             it = next.fetch_add(1, std::memory_order_relaxed)) {
            const index_t ti = tiles - 1 - it / a.n_kv_heads;
            const index_t g = it % a.n_kv_heads;
            const index_t t0 = ti * tq;
            da::attention_item<Arch>(a, g, t0, std::min(tq, Sq - t0), kv_len, scale, w);
        }
    });
}

/// Checks the arguments and runs attention on the active path.
inline void attention(const attention_args& a) {
    require<shape_error>(a.n_heads > 0 && a.n_kv_heads > 0 && a.head_dim > 0, "attention: n_heads (", a.n_heads,
                         "), n_kv_heads (", a.n_kv_heads, ") and head_dim (", a.head_dim, ") must be positive");
    require<shape_error>(a.n_heads % a.n_kv_heads == 0, "attention: n_heads (", a.n_heads,
                         ") must be a multiple of n_kv_heads (", a.n_kv_heads, ")");
    check_shape(a.q, -1, a.n_heads * a.head_dim, "attention: q");
    check_shape(a.k, -1, a.n_kv_heads * a.head_dim, "attention: k");
    check_shape(a.v, a.k.rows(), a.n_kv_heads * a.head_dim, "attention: v");
    check_shape(a.out, a.q.rows(), a.n_heads * a.head_dim, "attention: out");
    require<shape_error>(a.kv_len <= a.k.rows(), "attention: kv_len ", a.kv_len, " exceeds the ", a.k.rows(), " keys");
    arch::dispatch([&](auto tag) { attention(tag, a); });
}

}  // namespace cpet::kernels
