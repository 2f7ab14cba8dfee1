// cpet/kernels/gemm_sparse.hpp — sparse GEMM y = epilogue(x·Ŵᵀ) that touches only the kept weights:
// N:M structured (fp32 or int8 values) and unstructured (SELL-16). Layouts: compress/formats/sparse.hpp (kernels may
// not include compress/, so the panel height is repeated here and compress::kernel_view static_asserts agreement).
//
// Decode-sized calls (M < 48) keep 16 output rows in SIMD lanes (one AVX-512 register, two AVX2 registers), like
// gemm_wq, so the weight stream is read once, 64 bytes at a time, for all MR rows of x:
//   N:M:  x is copied per call into rows padded to a multiple of 16 floats; a block of 16 consecutive x values
//         (16/M whole groups) sits in one register (AVX-512) or two (AVX2). For each kept slot the lanes' in-group
//         indices are one shift + mask of the index words (shared by all MR rows of x), plus the group's offset in
//         the block, and x[k0 + idx] of every lane is one in-register permute (vpermps; AVX2: two vpermps + blend,
//         or, for groups of M ≤ 8, blocks of 8 x values in one ymm and one vpermps, 4 rows of x a tile), then one
//         FMA with the 16 kept values. Groups of M = 4 (2:4, 1:4) instead broadcast each group's 4 x values to
//         every 128-bit lane and pick with the in-lane vpermilps, which reads only the low 2 index bits (no mask,
//         no offset); measured on Zen 5 against the 16-wide block: 2:4 M = 1 −6 %, M = 8 and 16 −0 to −5 %
//         (AVX2 path forced: −4 to −8 %), so the permute still bounds it at ~1 FMA per cycle. 2:4 moves (4 B + 2 bits)/2 per dense weight: decode is bound by the
//         weight stream, ~1.9× less than dense.
//   int8: the same with 16 int8 values per slot (sign-extended and converted), the per-row scale applied once.
//   SELL: per slot one load of 16 values, one of 16 uint16 columns (widened), and per row of x one gather of
//         x[col] (vgatherdps) and one FMA. Gathers are slow, so this pays only at high sparsity (bench_sparse).
// At larger M the permute (port 5, shared with the FMAs) would pair with every FMA and cap the N:M kernel at half
// the FMA peak, so N:M switches to x rows in lanes (nm_lanes_m below, from M = nm_lanes_m_threshold<Arch>: 48 on
// AVX-512, 16 on AVX2; x transposed per call, one broadcast of each kept value and up to 8 FMAs with contiguous x
// vectors; half the FMAs of dense at ~1.4 FMA/cycle in L1, bound by loads), and SELL likewise from M ≥ 48 (sell_lanes_m: the whole K of 64 rows of x transposed into L2, no gathers).
// Why not decompress-to-L1 + the dense microkernel: that keeps every FMA of the dense GEMM (it only saves weight
// bytes, which do not bound large M), so it cannot beat dense there.
// Threads split the panels (parallel_for / parallel_region, contiguous chunks) when a call has enough work; M is
// blocked by 64 rows so a panel's weights stay in L2 while its tiles run. The epilogue (bias, activation, residual)
// is gemm_f32's store_tile on finished tiles; the low-rank term is rejected (format_error).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpet/arch/dispatch.hpp"
#include "cpet/core/buffer.hpp"
#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/core/parallel.hpp"
#include "cpet/kernels/gemm_f32.hpp"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace cpet::kernels {

#ifndef CPET_SPARSE_PF
#define CPET_SPARSE_PF 1024
#endif
#ifndef CPET_SPARSE_PFL
#define CPET_SPARSE_PFL 2
#endif
#ifndef CPET_SPARSE_BLOCK4
#define CPET_SPARSE_BLOCK4 1
#endif

inline constexpr index_t sparse_panel_rows = 16;  ///< output rows per packed panel (lanes)

/// Kernel-facing view of N:M weights (see compress::kernel_view).
struct nm_weights {
    const float* values = nullptr;        ///< fp32 values [panels][slots][16], or null
    const std::int8_t* qvalues = nullptr; ///< int8 values [panels][slots][16], or null
    const float* scales = nullptr;        ///< [panels·16] per-row scales (int8 only)
    const std::uint32_t* idx = nullptr;   ///< [panels][words][16] index words
    index_t n = 0, k = 0;
    int keep = 0, group = 0, bits = 0;    ///< N, M, log2 M
    index_t vpw = 0, words = 0;           ///< indices per word, words per lane

    index_t panels() const noexcept { return (n + sparse_panel_rows - 1) / sparse_panel_rows; }
    index_t slots() const noexcept { return k / group * keep; }
    bool int8() const noexcept { return qvalues != nullptr; }
};

/// Kernel-facing view of unstructured SELL-16 weights.
struct sell_weights {
    const float* values = nullptr;        ///< [slots total][16]
    const std::uint16_t* cols = nullptr;  ///< [slots total][16]
    const index_t* offsets = nullptr;     ///< [panels + 1]
    index_t n = 0, k = 0;

    index_t panels() const noexcept { return (n + sparse_panel_rows - 1) / sparse_panel_rows; }
};

namespace sparse_detail {

template <class Arch>
using fbatch = xsimd::batch<float, Arch>;
template <class Arch>
using ibatch = xsimd::batch<std::int32_t, Arch>;

/// The few operations xsimd 8.1 lacks: a run-time permute of 16 floats, int8 / uint16 widening loads, gathers.
template <class Arch>
struct isa_ops {
    static_assert(!std::is_same_v<Arch, Arch>, "gemm_sparse: no SIMD specialisation for this arch");
};

#if XSIMD_WITH_AVX512BW
template <>
struct isa_ops<xsimd::avx512bw> {
    using F = fbatch<xsimd::avx512bw>;
    using I = ibatch<xsimd::avx512bw>;
    struct block {
        __m512 v;
    };
    static block load_block(const float* x) noexcept { return {_mm512_loadu_ps(x)}; }
    /// lane l ← x[idx_l] (idx in [0, 16)).
    static F pick(const block& b, const I& idx) noexcept { return _mm512_permutexvar_ps(idx, b.v); }
    static F load_q8(const std::int8_t* q) noexcept {
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
    }
    static I load_u16(const std::uint16_t* c) noexcept {
        return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c)));
    }
    static F gather(const float* base, const I& idx) noexcept { return _mm512_i32gather_ps(idx, base, 4); }
    /// One group of 4 x values in every 128-bit lane, for groups of M = 4: lane l ← x[idx_l] (idx in [0, 4), the
    /// low 2 bits of each index) is one in-lane vpermilps instead of a cross-lane vpermps.
    struct block4 {
        __m512 v;
    };
    static block4 load_block4(const float* x) noexcept { return {_mm512_broadcast_f32x4(_mm_loadu_ps(x))}; }
    static F pick4(const block4& b, const I& idx) noexcept { return _mm512_permutevar_ps(b.v, idx); }
    /// w0 = v[0], w1 = v[1] in every lane: one 8-byte broadcast load and two in-lane shuffles instead of two
    /// broadcast loads (the large-M N:M kernel is bound by its loads).
    static void broadcast_pair(const float* v, F& w0, F& w1) noexcept {
        double d;
        std::memcpy(&d, v, sizeof d);
        const __m512 t = _mm512_castpd_ps(_mm512_set1_pd(d));
        w0 = _mm512_permute_ps(t, 0x00);
        w1 = _mm512_permute_ps(t, 0x55);
    }
    /// dst[j·ldd + i] = src[i·lds + j] for a 16 × 16 block (unaligned rows).
    static void transpose(const float* src, index_t lds, float* dst, index_t ldd) noexcept {
        __m512 r[16], t[16];
        for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
        for (int i = 0; i < 16; i += 2) {
            t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
            t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
        }
        // r[i + c], i = 0, 4, 8, 12: 128-bit lane l holds rows i..i+3 of column 4l + c
        for (int i = 0; i < 16; i += 4) {
            r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
            r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
            r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
            r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
        }
        for (int c = 0; c < 4; ++c) {
            const __m512 a = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88), b = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xDD);
            const __m512 d = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
            const __m512 e = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xDD);
            t[c] = _mm512_shuffle_f32x4(a, d, 0x88);
            t[8 + c] = _mm512_shuffle_f32x4(a, d, 0xDD);
            t[4 + c] = _mm512_shuffle_f32x4(b, e, 0x88);
            t[12 + c] = _mm512_shuffle_f32x4(b, e, 0xDD);
        }
        for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ldd, t[i]);
    }
};
#endif

#if XSIMD_WITH_FMA3_AVX2
template <>
struct isa_ops<xsimd::fma3<xsimd::avx2>> {
    using A = xsimd::fma3<xsimd::avx2>;
    using F = fbatch<A>;
    using I = ibatch<A>;
    struct block {
        __m256 lo, hi;
    };
    static block load_block(const float* x) noexcept { return {_mm256_loadu_ps(x), _mm256_loadu_ps(x + 8)}; }
    /// lane l ← x[idx_l] (idx in [0, 16)): vpermps reads the low 3 bits; bit 3 picks the half.
    static F pick(const block& b, const I& idx) noexcept {
        const __m256i i = idx;
        const __m256 lo = _mm256_permutevar8x32_ps(b.lo, i), hi = _mm256_permutevar8x32_ps(b.hi, i);
        return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(i, 28)));
    }
    static F load_q8(const std::int8_t* q) noexcept {
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
    }
    static I load_u16(const std::uint16_t* c) noexcept {
        return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
    }
    static F gather(const float* base, const I& idx) noexcept { return _mm256_i32gather_ps(base, idx, 4); }
    /// 8 consecutive x in one register, for groups of M ≤ 8: lane l ← x[idx_l] (idx in [0, 8)) is one vpermps.
    struct block8 {
        __m256 v;
    };
    static block8 load_block8(const float* x) noexcept { return {_mm256_loadu_ps(x)}; }
    static F pick8(const block8& b, const I& idx) noexcept { return _mm256_permutevar8x32_ps(b.v, idx); }
    /// One group of 4 x values in each 128-bit lane, for groups of M = 4: one in-lane vpermilps.
    struct block4 {
        __m256 v;
    };
    static block4 load_block4(const float* x) noexcept {
        return {_mm256_broadcast_ps(reinterpret_cast<const __m128*>(x))};
    }
    static F pick4(const block4& b, const I& idx) noexcept { return _mm256_permutevar_ps(b.v, idx); }
    static void broadcast_pair(const float* v, F& w0, F& w1) noexcept {
        w0 = F(v[0]);
        w1 = F(v[1]);
    }
    /// dst[j·ldd + i] = src[i·lds + j] for an 8 × 8 block (unaligned rows).
    static void transpose(const float* src, index_t lds, float* dst, index_t ldd) noexcept {
        __m256 r[8], t[8];
        for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
        for (int i = 0; i < 8; i += 2) {
            t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
            t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
        }
        // r[i + c], i = 0, 4: 128-bit lane l holds rows i..i+3 of column 4l + c
        for (int i = 0; i < 8; i += 4) {
            r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
            r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
            r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
            r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
        }
        for (int c = 0; c < 4; ++c) {
            _mm256_storeu_ps(dst + c * ldd, _mm256_permute2f128_ps(r[c], r[4 + c], 0x20));
            _mm256_storeu_ps(dst + (4 + c) * ldd, _mm256_permute2f128_ps(r[c], r[4 + c], 0x31));
        }
    }
};
#endif

/// Starting threads costs microseconds; below ~1M kept multiply-adds one thread finishes first.
inline bool worth_threads(double macs) noexcept { return macs >= 1.0e6; }

/// Stores a finished 16-column tile (rows × 16, row stride 16) through the GEMM epilogue.
template <class Arch>
inline void store(Arch tag, const float* c, index_t rows, index_t p, index_t n, index_t m0, MatrixView<float> y,
                  const epilogue& ep) noexcept {
    const index_t n0 = p * sparse_panel_rows;
    gemm_detail::store_tile(tag, c, sparse_panel_rows, rows, std::min(sparse_panel_rows, n - n0), m0, n0, y, ep);
}

// ---- N:M ------------------------------------------------------------------------------------------------------

/// Scalar twin (the oracle of the SIMD paths): panel p, rows [m0, m0 + mr) of the padded x (row stride ldx).
inline void nm_panel(arch::scalar tag, const nm_weights& w, const float* x, index_t ldx, index_t p, index_t m0,
                     index_t mr, MatrixView<float> y, const epilogue& ep) {
    const index_t slots = w.slots();
    const std::uint32_t mask = (1u << w.bits) - 1;
    float c[sparse_panel_rows];
    for (index_t m = m0; m < m0 + mr; ++m) {
        const float* xr = x + m * ldx;
        for (index_t i = 0; i < sparse_panel_rows; ++i) {
            float acc = 0.f;
            for (index_t t = 0; t < slots; ++t) {
                const std::uint32_t wd = w.idx[(p * w.words + t / w.vpw) * sparse_panel_rows + i];
                const index_t kk = (t / w.keep) * w.group + ((wd >> ((t % w.vpw) * w.bits)) & mask);
                const std::size_t at = static_cast<std::size_t>((p * slots + t) * sparse_panel_rows + i);
                const float v = w.int8() ? static_cast<float>(w.qvalues[at]) : w.values[at];
                acc += v * xr[kk];
            }
            c[i] = w.int8() ? acc * w.scales[p * sparse_panel_rows + i] : acc;
        }
        store(tag, c, 1, p, w.n, m, y, ep);
    }
}

/// Whether Arch has an 8-wide x block (isa_ops::block8: one register and a one-instruction pick).
template <class Arch>
inline constexpr bool has_block8 = requires(const typename isa_ops<Arch>::block8& b, const ibatch<Arch>& i) {
    isa_ops<Arch>::pick8(b, i);
};

/// The x block type of width BW: isa_ops::block8 for BW = 8, isa_ops::block otherwise. A partial specialisation,
/// not std::conditional_t, which would name block8 on ISAs that have none (AVX-512).
template <class Arch, int BW>
struct x_block {
    using type = typename isa_ops<Arch>::block;
};
template <class Arch>
struct x_block<Arch, 8> {
    using type = typename isa_ops<Arch>::block8;
};
template <class Arch>
struct x_block<Arch, 4> {
    using type = typename isa_ops<Arch>::block4;
};

/// SIMD tile: S consecutive panels p … p + S − 1 × MR rows of x. Lanes are output rows (V registers of L lanes cover
/// the 16 rows). BW is the width of the x block one register set holds: 16 (isa_ops::block: one zmm, or two ymm
/// picked by two vpermps and a blend) or 8 (isa_ops::block8 on AVX2, for groups of M ≤ 8: one ymm and one vpermps,
/// so a row of x costs a third of the registers and a quarter of the pick instructions, and MR = 4 rows fit instead
/// of 2). The S panels are S weight streams read side by side, each with its own accumulators: at decode sizes one
/// panel is one sequential stream and one chain of dependent FMAs per accumulator (at M = 1 on AVX-512, one), and
/// one core keeps more DRAM misses in flight on several streams, which the hardware prefetchers follow separately
/// (see gemm_f32's gemv_tile_streams); the x picks are shared by the S panels' slot.
template <int MR, bool Q, int BW, int S, class Arch>
void nm_tile(const nm_weights& w, const float* x, index_t ldx, index_t p, index_t m0, MatrixView<float> y,
             const epilogue& ep) {
    using F = fbatch<Arch>;
    using I = ibatch<Arch>;
    using ops = isa_ops<Arch>;
    constexpr int L = static_cast<int>(F::size);
    constexpr int V = static_cast<int>(sparse_panel_rows) / L;
    const index_t slots = w.slots();
    const index_t keep = w.keep, group = w.group;
    const index_t gpb = BW / group;  // groups per x block
    const index_t G = w.k / group;
    const int bits = w.bits;
    const I mask(static_cast<std::int32_t>((1u << bits) - 1));
    const index_t vstride = slots * sparse_panel_rows;    // values per panel
    const index_t istride = w.words * sparse_panel_rows;  // index words per panel
    const float* vals = Q ? nullptr : w.values + p * vstride;
    const std::int8_t* qv = Q ? w.qvalues + p * vstride : nullptr;
    const std::uint32_t* iw = w.idx + p * istride;

    F acc[S][MR][V];
    for (int s = 0; s < S; ++s)
        for (int m = 0; m < MR; ++m)
            for (int v = 0; v < V; ++v) acc[s][m][v] = F(0.f);
    I word[S][V];
    index_t pos = w.vpw;  // index within the current word; reload when it reaches vpw
    index_t t = 0;
    for (index_t g0 = 0; g0 < G; g0 += gpb) {
        using block = typename x_block<Arch, BW>::type;
        block xb[MR];
        for (int m = 0; m < MR; ++m) {
            const float* xs = x + (m0 + m) * ldx + g0 * group;
            if constexpr (BW == 8) xb[m] = ops::load_block8(xs);
            else if constexpr (BW == 4) xb[m] = ops::load_block4(xs);
            else xb[m] = ops::load_block(xs);
        }
        const index_t gend = std::min(G, g0 + gpb);
        for (index_t g = g0; g < gend; ++g) {
            const I offset(static_cast<std::int32_t>((g - g0) * group));
            for (index_t j = 0; j < keep; ++j, ++t, ++pos) {
                if (pos == w.vpw) {
                    for (int s = 0; s < S; ++s)
                        for (int v = 0; v < V; ++v)
                            word[s][v] =
                                I::load_aligned(reinterpret_cast<const std::int32_t*>(iw + s * istride) + v * L);
                    iw += sparse_panel_rows;
                    pos = 0;
                }
                for (int s = 0; s < S; ++s) {
                    // fp32 values 4 KiB ahead into L2 (prefetcht1), int8 ones 1 KiB ahead into L1: measured on Zen
                    // 4 (2:4, 4096², alternately) L2 for fp32 took M = 4 −15 %, M = 8 −6 %, while for int8 it
                    // cost M = 1 +30 %
                    if constexpr (Q) __builtin_prefetch(qv + s * vstride + t * 16 + 1024, 0, 3);
                    else __builtin_prefetch(vals + s * vstride + t * 16 + CPET_SPARSE_PF, 0, CPET_SPARSE_PFL);
                    for (int v = 0; v < V; ++v) {
                        // BW 4: vpermilps reads only the low 2 bits, so neither the mask nor an offset is needed
                        const I idx = BW == 4 ? I(word[s][v] >> static_cast<int>(pos * bits))
                                              : I(((word[s][v] >> static_cast<int>(pos * bits)) & mask) + offset);
                        const F wv = Q ? ops::load_q8(qv + s * vstride + t * sparse_panel_rows + v * L)
                                       : F::load_aligned(vals + s * vstride + t * sparse_panel_rows + v * L);
                        for (int m = 0; m < MR; ++m) {
                            if constexpr (BW == 8)
                                acc[s][m][v] = xsimd::fma(ops::pick8(xb[m], idx), wv, acc[s][m][v]);
                            else if constexpr (BW == 4)
                                acc[s][m][v] = xsimd::fma(ops::pick4(xb[m], idx), wv, acc[s][m][v]);
                            else acc[s][m][v] = xsimd::fma(ops::pick(xb[m], idx), wv, acc[s][m][v]);
                        }
                    }
                }
            }
        }
    }
    for (int s = 0; s < S; ++s) {
        alignas(64) float c[MR * sparse_panel_rows];
        for (int v = 0; v < V; ++v) {
            F sc(1.f);
            if constexpr (Q) sc = F::load_unaligned(w.scales + (p + s) * sparse_panel_rows + v * L);
            for (int m = 0; m < MR; ++m) {
                const F r = Q ? acc[s][m][v] * sc : acc[s][m][v];
                r.store_aligned(c + m * sparse_panel_rows + v * L);
            }
        }
        store(Arch{}, c, MR, p + s, w.n, m0, y, ep);
    }
}

/// Rows of x per tile: 8 on AVX-512; on AVX2 2 with 16-wide x blocks, 4 with 8-wide ones (registers: MR·V
/// accumulators + MR blocks + V index words + 2 temporaries ≤ 16).
template <class Arch, int BW>
inline constexpr int sparse_mr = fbatch<Arch>::size >= 16 ? 8 : (BW <= 8 ? 4 : 2);

/// Panels a tile of `rows` rows of x reads side by side (nm_tile's S): as many as the registers hold (S·(rows·V
/// accumulators + V index words) + rows x blocks + 4 temporaries), 4 at most, 1 where two do not fit (AVX-512: 4 up
/// to 4 rows, 2 up to 8; AVX2 with 8- or 4-wide x blocks: 2 for one row). On AVX2 the 16-wide block takes two
/// registers a row, and keeps one stream.
template <class Arch, int BW>
constexpr int nm_stream_count(index_t rows) noexcept {
    constexpr index_t L = fbatch<Arch>::size, V = sparse_panel_rows / L;
    constexpr index_t regs = L >= 16 ? 32 : 16;
#ifdef CPET_SPARSE_SROWS
    rows = std::min<index_t>(rows, CPET_SPARSE_SROWS);
#endif
    const index_t xregs = L < 16 && BW == 16 ? 2 * rows : rows;
    const index_t s = (regs - xregs - 4) / (rows * V + V);
    return s >= 4 ? 4 : s >= 2 ? 2 : 1;
}

/// The most rows of x a tile of S streams takes (nm_stream_count(rows) ≥ S), at most sparse_mr: the row tiles of a
/// panel group stop there, so no tile is instantiated whose accumulators cannot fit.
template <class Arch, int BW, int S>
inline constexpr int nm_stream_rows = [] {
    int r = 1;
    while (r < sparse_mr<Arch, BW> && nm_stream_count<Arch, BW>(r + 1) >= S) ++r;
    return r;
}();

template <int MR, bool Q, int BW, int S, class Arch>
void nm_rows(const nm_weights& w, const float* x, index_t ldx, index_t p, index_t m0, index_t rem,
             MatrixView<float> y, const epilogue& ep) {
    if constexpr (MR > 1) {
        if (rem < MR) return nm_rows<MR - 1, Q, BW, S, Arch>(w, x, ldx, p, m0, rem, y, ep);
    }
    nm_tile<MR, Q, BW, S, Arch>(w, x, ldx, p, m0, y, ep);
}

template <int BW, int S, class Arch>
void nm_panels_bw(const nm_weights& w, const float* x, index_t ldx, index_t p, index_t m0, index_t mr,
                  MatrixView<float> y, const epilogue& ep) {
    constexpr int MR = nm_stream_rows<Arch, BW, S>;
    for (index_t m = m0; m < m0 + mr; m += MR) {
        const index_t rem = std::min<index_t>(MR, m0 + mr - m);
        if (w.int8())
            nm_rows<MR, true, BW, S, Arch>(w, x, ldx, p, m, rem, y, ep);
        else
            nm_rows<MR, false, BW, S, Arch>(w, x, ldx, p, m, rem, y, ep);
    }
}

/// Calls fn(std::integral_constant<int, BW>) with the x block width of w on Arch (nm_tile's BW): 4 for groups of
/// 4, 8 for groups of ≤ 8 where Arch has an 8-wide block, else 16. Only the widths Arch has are instantiated.
template <class Arch, class Fn>
decltype(auto) with_block_width(const nm_weights& w, Fn&& fn) {
#if CPET_SPARSE_BLOCK4
    if (w.group == 4) return fn(std::integral_constant<int, 4>{});
#endif
    if constexpr (has_block8<Arch>) {
        if (w.group <= 8) return fn(std::integral_constant<int, 8>{});
    }
    return fn(std::integral_constant<int, 16>{});
}

/// Panels side by side for M rows of x (M below the lanes threshold) on Arch: nm_stream_count for the rows of the
/// widest tile, so a group's narrower tiles (the remainder rows) fit too.
template <class Arch>
index_t nm_group_streams(const nm_weights& w, index_t M) noexcept {
    const auto count = [&](auto bw_tag) -> index_t {
        constexpr int BW = decltype(bw_tag)::value;
        return nm_stream_count<Arch, BW>(std::min<index_t>(M, sparse_mr<Arch, BW>));
    };
    return with_block_width<Arch>(w, count);
}

/// Panels p … p + s − 1, rows [m0, m0 + mr) of x: s = 4 or 2 run as one group of streams (s must not exceed
/// nm_group_streams for M ≥ mr), any other s one panel at a time.
template <class Arch>
void nm_panels(Arch, const nm_weights& w, const float* x, index_t ldx, index_t p, index_t s, index_t m0,
               index_t mr, MatrixView<float> y, const epilogue& ep) {
    const auto run = [&](auto bw_tag) {
        constexpr int BW = decltype(bw_tag)::value;
        if (s == 4) {
            if constexpr (nm_stream_count<Arch, BW>(1) >= 4) return nm_panels_bw<BW, 4, Arch>(w, x, ldx, p, m0, mr, y, ep);
        } else if (s == 2) {
            if constexpr (nm_stream_count<Arch, BW>(1) >= 2) return nm_panels_bw<BW, 2, Arch>(w, x, ldx, p, m0, mr, y, ep);
        }
        for (index_t q = p; q < p + s; ++q) nm_panels_bw<BW, 1, Arch>(w, x, ldx, q, m0, mr, y, ep);
    };
    with_block_width<Arch>(w, run);
}

// ---- N:M, large M: x rows in lanes ---------------------------------------------------------------------------
// At large M the permute of the kernel above (port 5, which is also an FMA port) pairs with every FMA, so that kernel
// runs at half the FMA peak. Here the lanes are MB = MV·L rows of x instead: the whole K of a block of MB rows of x
// is transposed once per call into xt[k][MB] (L × L register transposes), and for each output row n every kept
// (value, k) is one broadcast of the value and MV FMAs whose memory operand is the contiguous xt[k] vector.
// The kept index is data, so x cannot stay in registers: every FMA loads its x vector, and the loads bound the
// kernel (this machine sustains ~1.7 zmm loads per cycle). Per kept weight and output row the loads are MV x vectors
// plus, per row pair, one 8-byte load of both rows' offsets and one of both values (split by two in-lane shuffles,
// isa_ops::broadcast_pair), so MV is as large as the registers allow: 8 on AVX-512 (2 rows × 8 = 16 zmm
// accumulators, 1.125 loads per FMA; MV = 4 needed 1.5 and ran ~25 % slower), 4 on AVX2 (16 ymm). Measured in L1:
// ~1.4 FMA/cycle on half the dense work, i.e. ~1.8× the dense GEMM before overheads. The last block of rows
// (M % MB, or M < MB) takes the MV that just covers it, so few lanes idle.
// K runs in blocks of kc = 48 inputs (xt block 24 KiB on AVX-512 at MV = 8, in the 48 KiB L1 with the panel's
// partial sums; measured best of {32, 48, 64}: 64 spills L1, 32 doubles the partial-sum traffic). Before the FMA
// loop the in-group indices of a (panel, kc block) are decoded with vector shifts into byte offsets of the xt rows
// (nm_decode_offsets); int8 values are widened to float in the same pass (the per-row scale is applied at the end),
// so both value types share the FMA loop. Partial sums live in ct[n][MB] across kc blocks; panels go in chunks
// whose ct stays in L2 (nm_t_chunk_bytes), each chunk running all its kc blocks, and each row pair prefetches an
// eighth of the weights the next panel will read (spread, so the prefetches never queue up in one burst). A panel's finished ct is transposed (in registers, while in L1) into the chunk's [mr][16·chunk]
// output tile, and the chunk goes through gemm_f32's store_tile a row segment at a time: storing 16 columns of all
// rows per panel hit one L1 set with every line (rows of y are a power of two apart) and cost ~5 %.
#ifndef CPET_SPARSE_KC
#define CPET_SPARSE_KC 48
#endif
#ifndef CPET_SPARSE_CHUNK_KB
#define CPET_SPARSE_CHUNK_KB 256
#endif
inline constexpr index_t nm_t_kc = CPET_SPARSE_KC;  ///< inputs per kc block (a multiple of every M ≤ 16)
/// Partial sums of one panel chunk (L2; 128, 256 and 512 KiB measured alike).
inline constexpr std::size_t nm_t_chunk_bytes = std::size_t(CPET_SPARSE_CHUNK_KB) << 10;

/// Vectors of x rows per block (see above).
template <class Arch>
inline constexpr int nm_t_mv = fbatch<Arch>::size >= 16 ? 8 : 4;

/// M from which gemm_nm takes the x-rows-in-lanes kernel, per ISA, measured (CPET_SPARSE_LANES_M overrides both):
///   AVX-512: 48. On a Xeon (2048²) the lanes kernel was 1.25× faster at M = 32 than the output-rows-in-lanes
///   kernel of then, and on Zen 5 they tied there (2026-12-02); since that kernel's in-lane picks for groups of 4
///   and its panel streams it is the faster at 32: Zen 5 (4096², 2:4, one thread, old and new binaries alternately, three rounds) 4.6-6.1 ms against
///   6.9-7.1 ms, dense fp32 6.3-6.8 ms; int8 values 4.9-5.4 against 5.9-6.5 ms.
///   AVX2 (Zen, 4096², 2:4, one thread, CPU time on a shared machine): with 8-wide x blocks (MR = 4) the
///   output-rows-in-lanes kernel takes 2.4-3.5 ms at M = 4, 4.5-4.8 ms at M = 8 and 8.6 ms at M = 16, against
///   6.5, 6.8 and 8.4 ms for the lanes kernel (whose per-weight decode is a fixed cost): they tie at 16.
#ifdef CPET_SPARSE_LANES_M
template <class Arch>
inline constexpr index_t nm_lanes_m_threshold = CPET_SPARSE_LANES_M;
#else
template <class Arch>
inline constexpr index_t nm_lanes_m_threshold = fbatch<Arch>::size >= 16 ? 48 : 16;
#endif
/// The same for SELL-16 (sell_lanes_m; measured with the earlier 4-vector N:M kernel, which it still resembles).
inline constexpr index_t sell_lanes_m_threshold = 48;

template <class Arch>
inline float* nm_scratch(int slot, std::size_t n) {
    thread_local aligned_buffer<float> bufs[3];
    if (bufs[slot].size() < n) bufs[slot].reset(n);
    return bufs[slot].data();
}

/// offs[(t − t0)·16 + i] = (k − k0)·mb·4, the byte offset of xt row k in the kc block at k0, for kept slot t (input
/// k) of row 16p + i, t in [t0, t1); for int8 weights also vals[(t − t0)·16 + i] = q as float. Vector shifts / masks
/// of the index words, once per (panel, kc block), so the FMA loop below only loads an offset.
template <class Arch>
void nm_decode_offsets(const nm_weights& w, index_t p, index_t t0, index_t t1, index_t k0, index_t mb,
                       std::int32_t* offs, float* vals) {
    using I = ibatch<Arch>;
    using ops = isa_ops<Arch>;
    constexpr index_t L = static_cast<index_t>(I::size);
    constexpr index_t V = sparse_panel_rows / L;
    const I mask(static_cast<std::int32_t>((1u << w.bits) - 1));
    const I row_bytes(static_cast<std::int32_t>(mb * 4));
    const std::uint32_t* iw = w.idx + (p * w.words + t0 / w.vpw) * sparse_panel_rows;
    index_t pos = t0 % w.vpw, j = t0 % w.keep;
    I kb(static_cast<std::int32_t>((t0 / w.keep) * w.group - k0));
    const I group(static_cast<std::int32_t>(w.group));
    I word[V];
    // word[v] >> b·j holds slot t's index in its low bits (arithmetic shifts: the sign bits stay above the mask)
    for (index_t v = 0; v < V; ++v)
        word[v] = I::load_aligned(reinterpret_cast<const std::int32_t*>(iw) + v * L) >> static_cast<int>(pos * w.bits);
    for (index_t t = t0; t < t1; ++t) {
        if (pos == w.vpw) {
            iw += sparse_panel_rows;
            for (index_t v = 0; v < V; ++v) word[v] = I::load_aligned(reinterpret_cast<const std::int32_t*>(iw) + v * L);
            pos = 0;
        }
        for (index_t v = 0; v < V; ++v) {
            (((word[v] & mask) + kb) * row_bytes).store_aligned(offs + (t - t0) * sparse_panel_rows + v * L);
            word[v] = word[v] >> w.bits;
        }
        ++pos;
        if (++j == w.keep) {
            j = 0;
            kb += group;
        }
    }
    if (w.int8()) {
        const std::int8_t* qv = w.qvalues + (p * w.slots() + t0) * sparse_panel_rows;
        for (index_t e = 0; e < (t1 - t0) * sparse_panel_rows; e += L) ops::load_q8(qv + e).store_aligned(vals + e);
    }
}

/// All 16 rows of one panel over nt kept slots, two rows at a time: ct[row][MV·L] (+)= Σ value · xt[k] (offs and
/// vals as nm_decode_offsets writes them, vals with row stride 16; xb = the kc block of xt). `first`: start from 0
/// instead of ct. Each row pair prefetches an eighth of [pf, pf + pf_bytes) (the weights of the next panel to run),
/// so the prefetches never queue up in one burst. (Prefetching the next pair's ct from L2 as well measured ~1.5 %
/// slower.)
template <class Arch, int MV>
void nm_lanes_m_panel(const std::int32_t* offs, const float* vals, index_t nt, const float* xt, float* ct, bool first,
                      const char* pf, index_t pf_bytes) {
    using F = fbatch<Arch>;
    constexpr index_t L = static_cast<index_t>(F::size);
    constexpr index_t MB = MV * L;
    const char* xb = reinterpret_cast<const char*>(xt);
    for (index_t i = 0; i < sparse_panel_rows; i += 2) {
        F a0[MV], a1[MV];
        float* ct0 = ct + i * MB;
        float* ct1 = ct0 + MB;
        for (int v = 0; v < MV; ++v) {
            a0[v] = first ? F(0.f) : F::load_aligned(ct0 + v * L);
            a1[v] = first ? F(0.f) : F::load_aligned(ct1 + v * L);
        }
        for (index_t b = pf_bytes * i / sparse_panel_rows; b < pf_bytes * (i + 2) / sparse_panel_rows; b += 64)
            __builtin_prefetch(pf + b);
        const std::int32_t* oo = offs + i;
        const float* vv = vals + i;
#pragma GCC unroll 2
        for (index_t t = 0; t < nt; ++t) {
            // one 8-byte load for the two rows' offsets, one for their values (adjacent lanes)
            std::uint64_t o2;
            std::memcpy(&o2, oo + t * sparse_panel_rows, sizeof o2);
            const float* x0 = reinterpret_cast<const float*>(xb + static_cast<std::uint32_t>(o2));
            const float* x1 = reinterpret_cast<const float*>(xb + (o2 >> 32));
            F w0, w1;
            isa_ops<Arch>::broadcast_pair(vv + t * sparse_panel_rows, w0, w1);
            for (int v = 0; v < MV; ++v) {
                a0[v] = xsimd::fma(w0, F::load_aligned(x0 + v * L), a0[v]);
                a1[v] = xsimd::fma(w1, F::load_aligned(x1 + v * L), a1[v]);
            }
        }
        for (int v = 0; v < MV; ++v) {
            a0[v].store_aligned(ct0 + v * L);
            a1[v].store_aligned(ct1 + v * L);
        }
    }
}

/// Panels [p0, p1) × rows [m0, m0 + mr) of x with MV vectors of rows in lanes (mr ≤ MV·L).
template <class Arch, int MV>
void nm_lanes_m_block(Arch tag, ConstMatrixView<float> x, const nm_weights& w, index_t p0, index_t p1, index_t m0,
                      index_t mr, MatrixView<float> y, const epilogue& ep) {
    using F = fbatch<Arch>;
    using ops = isa_ops<Arch>;
    constexpr index_t L = static_cast<index_t>(F::size);
    constexpr index_t MB = MV * L, kc = nm_t_kc, R = sparse_panel_rows;
    const index_t K = w.k, slots = w.slots();
    const index_t chunk = std::max<index_t>(1, static_cast<index_t>(nm_t_chunk_bytes / (sizeof(float) * R * MB)));
    // xt: K·MB floats per thread (1 MiB at K = 2048 on AVX-512), each kc block read from L2 while its chunk runs
    float* xt = nm_scratch<Arch>(0, static_cast<std::size_t>(K * MB));
    float* ct = nm_scratch<Arch>(1, static_cast<std::size_t>(std::min(chunk, p1 - p0) * R * MB));
    // The finished chunk as y rows, [mr][chunk·16] (+ one line of padding per row, so the columns a panel writes do
    // not all fall in one L1 set), stored through the epilogue a whole row segment at a time (see above).
    const index_t ldt = std::min(chunk, p1 - p0) * R + R;
    float* tile = nm_scratch<Arch>(2, static_cast<std::size_t>(MB * ldt));
    alignas(64) std::int32_t offs[kc * R];  // ≤ kc slots per kc block (N ≤ M)
    alignas(64) float qvals[kc * R];
    // xt[k][m] = x[m0 + m, k], zero rows past mr: L × L register transposes, scalar tails
    const index_t kv = K / L * L, mv = mr / L * L;
    for (index_t m = 0; m < mv; m += L)
        for (index_t k = 0; k < kv; k += L) ops::transpose(x.row(m0 + m) + k, x.stride(), xt + k * MB + m, MB);
    for (index_t k = 0; k < K; ++k) {
        float* xk = xt + k * MB;
        for (index_t m = k < kv ? mv : 0; m < MB; ++m) xk[m] = m < mr ? x(m0 + m, k) : 0.f;
    }
    const bool q = w.int8();
    for (index_t c0 = p0; c0 < p1; c0 += chunk) {
        const index_t c1 = std::min(p1, c0 + chunk);
        for (index_t k0 = 0; k0 < K; k0 += kc) {
            const index_t kn = std::min(kc, K - k0);
            const bool last = k0 + kn == K;
            const index_t t0 = k0 / w.group * w.keep, t1 = (k0 + kn) / w.group * w.keep;
            const index_t vbytes = q ? 1 : 4;
            for (index_t p = c0; p < c1; ++p) {
                float* ctp = ct + (p - c0) * R * MB;
                // The next panel's slice of values and index words: a few KiB that start a new page each time,
                // where the hardware prefetcher would start late; fetch them while this panel computes (without it
                // the kernel runs ~17 % slower; also fetching the first panel of the next kc block gained nothing).
                const char* pf = nullptr;
                if (p + 1 < c1) {
                    pf = (q ? reinterpret_cast<const char*>(w.qvalues) : reinterpret_cast<const char*>(w.values)) +
                         ((p + 1) * slots + t0) * R * vbytes;
                    const std::uint32_t* ni = w.idx + ((p + 1) * w.words + t0 / w.vpw) * R;
                    for (index_t b = 0; b <= (t1 - 1) / w.vpw - t0 / w.vpw; ++b) __builtin_prefetch(ni + b * R);
                }
                nm_decode_offsets<Arch>(w, p, t0, t1, k0, MB, offs, qvals);
                const float* vals = q ? qvals : w.values + (p * slots + t0) * R;
                nm_lanes_m_panel<Arch, MV>(offs, vals, t1 - t0, xt + k0 * MB, ctp, k0 == 0, pf,
                                           pf ? (t1 - t0) * R * vbytes : 0);
                if (!last) continue;
                // finished: ct [n][m] → tile [m][n] (register transposes while ct is in L1)
                float* tp = tile + (p - c0) * R;
                for (index_t i = 0; i < R; i += L)
                    for (index_t m = 0; m < mr; m += L) ops::transpose(ctp + i * MB + m, MB, tp + m * ldt + i, ldt);
                if (q) {
                    F s[R / L];
                    for (index_t v = 0; v < R / L; ++v) s[v] = F::load_unaligned(w.scales + p * R + v * L);
                    for (index_t m = 0; m < mr; ++m)
                        for (index_t v = 0; v < R / L; ++v)
                            (F::load_unaligned(tp + m * ldt + v * L) * s[v]).store_unaligned(tp + m * ldt + v * L);
                }
            }
        }
        const index_t n0 = c0 * R;
        gemm_detail::store_tile(tag, tile, ldt, mr, std::min(w.n, c1 * R) - n0, m0, n0, y, ep);
    }
}

template <class Arch, int MV>
void nm_lanes_m_rows(Arch tag, ConstMatrixView<float> x, const nm_weights& w, index_t p0, index_t p1, index_t m0,
                     index_t mr, MatrixView<float> y, const epilogue& ep) {
    constexpr index_t L = static_cast<index_t>(fbatch<Arch>::size);
    if constexpr (MV > 1) {
        if (mr <= (MV - 1) * L) return nm_lanes_m_rows<Arch, MV - 1>(tag, x, w, p0, p1, m0, mr, y, ep);
    }
    nm_lanes_m_block<Arch, MV>(tag, x, w, p0, p1, m0, mr, y, ep);
}

/// Panels [p0, p1) × all rows of x, x rows in lanes (see above). SIMD paths only.
template <class Arch>
void nm_lanes_m(Arch tag, ConstMatrixView<float> x, const nm_weights& w, index_t p0, index_t p1, MatrixView<float> y,
                const epilogue& ep) {
    constexpr int MV = nm_t_mv<Arch>;
    constexpr index_t MB = MV * static_cast<index_t>(fbatch<Arch>::size);
    const index_t M = x.rows();
    for (index_t m0 = 0; m0 < M; m0 += MB)
        nm_lanes_m_rows<Arch, MV>(tag, x, w, p0, p1, m0, std::min(MB, M - m0), y, ep);
}

// ---- unstructured (SELL-16) ----------------------------------------------------------------------------------

inline void sell_panel(arch::scalar tag, const sell_weights& w, ConstMatrixView<float> x, index_t p, index_t m0,
                       index_t mr, MatrixView<float> y, const epilogue& ep) {
    float c[sparse_panel_rows];
    for (index_t m = m0; m < m0 + mr; ++m) {
        const float* xr = x.row(m);
        for (index_t i = 0; i < sparse_panel_rows; ++i) {
            float acc = 0.f;
            for (index_t s = w.offsets[p]; s < w.offsets[p + 1]; ++s)
                acc += w.values[s * sparse_panel_rows + i] * xr[w.cols[s * sparse_panel_rows + i]];
            c[i] = acc;
        }
        store(tag, c, 1, p, w.n, m, y, ep);
    }
}

template <int MR, class Arch>
void sell_tile(const sell_weights& w, ConstMatrixView<float> x, index_t p, index_t m0, MatrixView<float> y,
               const epilogue& ep) {
    using F = fbatch<Arch>;
    using ops = isa_ops<Arch>;
    constexpr int L = static_cast<int>(F::size);
    constexpr int V = static_cast<int>(sparse_panel_rows) / L;
    constexpr int C = MR * V >= 4 ? 1 : 2;  // accumulator chains: hide the FMA latency at M = 1
    F acc[MR][V][C];
    for (int m = 0; m < MR; ++m)
        for (int v = 0; v < V; ++v)
            for (int c = 0; c < C; ++c) acc[m][v][c] = F(0.f);
    const float* xr[MR];
    for (int m = 0; m < MR; ++m) xr[m] = x.row(m0 + m);
    const index_t s0 = w.offsets[p], s1 = w.offsets[p + 1];
    for (index_t s = s0; s < s1; ++s) {
        const int c = static_cast<int>(s & (C - 1));
        __builtin_prefetch(w.values + (s + 16) * sparse_panel_rows);
        __builtin_prefetch(w.cols + (s + 32) * sparse_panel_rows);
        for (int v = 0; v < V; ++v) {
            const F wv = F::load_aligned(w.values + s * sparse_panel_rows + v * L);
            const auto col = ops::load_u16(w.cols + s * sparse_panel_rows + v * L);
            for (int m = 0; m < MR; ++m) acc[m][v][c] = xsimd::fma(ops::gather(xr[m], col), wv, acc[m][v][c]);
        }
    }
    alignas(64) float cbuf[MR * sparse_panel_rows];
    for (int m = 0; m < MR; ++m)
        for (int v = 0; v < V; ++v) {
            F r = acc[m][v][0];
            if constexpr (C > 1) r += acc[m][v][1];
            r.store_aligned(cbuf + m * sparse_panel_rows + v * L);
        }
    store(Arch{}, cbuf, MR, p, w.n, m0, y, ep);
}

template <int MR, class Arch>
void sell_rows(const sell_weights& w, ConstMatrixView<float> x, index_t p, index_t m0, index_t rem,
               MatrixView<float> y, const epilogue& ep) {
    if constexpr (MR > 1) {
        if (rem < MR) return sell_rows<MR - 1, Arch>(w, x, p, m0, rem, y, ep);
    }
    sell_tile<MR, Arch>(w, x, p, m0, y, ep);
}

template <class Arch>
void sell_panel(Arch, const sell_weights& w, ConstMatrixView<float> x, index_t p, index_t m0, index_t mr,
                MatrixView<float> y, const epilogue& ep) {
    constexpr int MR = sparse_mr<Arch, 16>;
    for (index_t m = m0; m < m0 + mr; m += MR)
        sell_rows<MR, Arch>(w, x, p, m, std::min<index_t>(MR, m0 + mr - m), y, ep);
}

inline constexpr index_t sell_t_mv = 4;  ///< vectors of x rows per block of sell_lanes_m

/// Unstructured, large M: x rows in lanes as in nm_lanes_m, but with the whole K of a 64-row block of x transposed
/// (K·MB·4 bytes, L2: SELL rows are not split by k blocks). Per stored entry: one broadcast and MV FMAs with the
/// contiguous xt[col] vectors — no gathers. Padding slots (value 0, column 0) add zero.
template <class Arch>
void sell_lanes_m(Arch tag, ConstMatrixView<float> x, const sell_weights& w, index_t p0, index_t p1,
                  MatrixView<float> y, const epilogue& ep) {
    using F = fbatch<Arch>;
    constexpr index_t L = static_cast<index_t>(F::size);
    constexpr index_t MV = sell_t_mv, MB = MV * L;
    const index_t M = x.rows(), K = w.k;
    float* xt = nm_scratch<Arch>(0, static_cast<std::size_t>(K * MB));
    alignas(64) float ct[sparse_panel_rows * MB];
    alignas(64) float tile[MB * sparse_panel_rows];
    for (index_t m0 = 0; m0 < M; m0 += MB) {
        const index_t mr = std::min(MB, M - m0);
        for (index_t m = 0; m < MB; ++m) {
            const float* xr = m < mr ? x.row(m0 + m) : nullptr;
            for (index_t k = 0; k < K; ++k) xt[k * MB + m] = xr ? xr[k] : 0.f;
        }
        for (index_t p = p0; p < p1; ++p) {
            const index_t s0 = w.offsets[p], s1 = w.offsets[p + 1];
            for (index_t i = 0; i < sparse_panel_rows; i += 2) {
                F a0[MV], a1[MV];
                for (index_t v = 0; v < MV; ++v) a0[v] = a1[v] = F(0.f);
                const float* vals = w.values + s0 * sparse_panel_rows + i;
                const std::uint16_t* cols = w.cols + s0 * sparse_panel_rows + i;
                for (index_t t = 0; t < s1 - s0; ++t) {
                    __builtin_prefetch(vals + (t + 8) * sparse_panel_rows);
                    const F w0(vals[t * sparse_panel_rows]), w1(vals[t * sparse_panel_rows + 1]);
                    const float* x0 = xt + index_t(cols[t * sparse_panel_rows]) * MB;
                    const float* x1 = xt + index_t(cols[t * sparse_panel_rows + 1]) * MB;
                    for (index_t v = 0; v < MV; ++v) {
                        a0[v] = xsimd::fma(w0, F::load_aligned(x0 + v * L), a0[v]);
                        a1[v] = xsimd::fma(w1, F::load_aligned(x1 + v * L), a1[v]);
                    }
                }
                for (index_t v = 0; v < MV; ++v) {
                    a0[v].store_aligned(ct + i * MB + v * L);
                    a1[v].store_aligned(ct + (i + 1) * MB + v * L);
                }
            }
            for (index_t i = 0; i < sparse_panel_rows; ++i)
                for (index_t m = 0; m < mr; ++m) tile[m * sparse_panel_rows + i] = ct[i * MB + m];
            store(tag, tile, mr, p, w.n, m0, y, ep);
        }
    }
}

/// Runs body(p, m0, mr) over all panels × 64-row blocks of x, threaded over panels when worth it.
template <class Body>
void for_panels(index_t M, index_t panels, double macs_per_row, Body&& body) {
    constexpr index_t row_block = 64;
    for (index_t m0 = 0; m0 < M; m0 += row_block) {
        const index_t mr = std::min(row_block, M - m0);
        const auto one = [&](index_t p) { body(p, m0, mr); };
        if (worth_threads(macs_per_row * double(mr)))
            parallel_for(index_t{0}, panels, one);
        else
            for (index_t p = 0; p < panels; ++p) one(p);
    }
}

/// Shared entry checks of both kernels.
inline void check_call(ConstMatrixView<float> x, index_t n, index_t k, MatrixView<float> y, const epilogue& ep,
                       const char* who) {
    check_shape(x, -1, k, cpet::detail::concat(who, ": x").c_str());
    check_shape(y, x.rows(), n, cpet::detail::concat(who, ": y").c_str());
    require<format_error>(!ep.has_lowrank(), who, ": the low-rank epilogue term is not supported by sparse kernels "
                          "(rank ", ep.rank, ", ", ep.segment_count, " segments)");
    require<shape_error>(!ep.residual || x.rows() <= 1 || ep.ld_residual >= n, who, ": residual row stride ",
                         ep.ld_residual, " is smaller than its ", n, " columns");
}

}  // namespace sparse_detail

/// N:M body on one path; no checks (callers checked the shapes).
template <class Arch>
void gemm_nm(Arch tag, ConstMatrixView<float> x, const nm_weights& w, MatrixView<float> y, const epilogue& ep = {}) {
    const index_t M = x.rows();
    if (M == 0) return;
    if constexpr (arch::is_simd_v<Arch>) {
        if (M >= sparse_detail::nm_lanes_m_threshold<Arch>) {
            const index_t panels = w.panels();
            const int threads = sparse_detail::worth_threads(double(M) * double(w.n) * double(w.slots()))
                                    ? static_cast<int>(std::min<index_t>(panels, max_threads()))
                                    : 1;
            parallel_region(threads, [&](int t, int nt) {
                sparse_detail::nm_lanes_m(tag, x, w, panels * t / nt, panels * (t + 1) / nt, y, ep);
            });
            return;
        }
    }
    // x rows padded to a multiple of 16 floats with zeros, so every 16-wide block load stays in bounds.
    const index_t ld = (w.k + 15) / 16 * 16;
    aligned_buffer<float> xp(static_cast<std::size_t>(M * ld));
    for (index_t m = 0; m < M; ++m) std::memcpy(xp.data() + m * ld, x.row(m), sizeof(float) * w.k);
    if constexpr (arch::is_simd_v<Arch>) {
        // groups of S consecutive panels read side by side (the last group may be short)
        const index_t panels = w.panels(), S = sparse_detail::nm_group_streams<Arch>(w, M);
        sparse_detail::for_panels(M, (panels + S - 1) / S, double(w.n) * double(w.slots()),
                                  [&](index_t g, index_t m0, index_t mr) {
                                      const index_t p = g * S;
                                      sparse_detail::nm_panels(tag, w, xp.data(), ld, p, std::min(S, panels - p),
                                                               m0, mr, y, ep);
                                  });
    } else {
        sparse_detail::for_panels(M, w.panels(), double(w.n) * double(w.slots()),
                                  [&](index_t p, index_t m0, index_t mr) {
                                      sparse_detail::nm_panel(tag, w, xp.data(), ld, p, m0, mr, y, ep);
                                  });
    }
}

/// Throws format_error unless w is a consistent N:M view.
inline void check_nm_weights(const nm_weights& w, const char* who) {
    require<format_error>(w.n > 0 && w.k > 0 && w.idx && (w.values || w.qvalues), who, ": empty packed weights");
    require<format_error>((w.group == 2 || w.group == 4 || w.group == 8 || w.group == 16) && w.keep >= 1 &&
                              w.keep <= w.group && w.k % w.group == 0 && (1 << w.bits) >= w.group && w.vpw > 0 &&
                              w.vpw * w.bits <= 32 && w.words * w.vpw >= w.slots(),
                          who, ": inconsistent packed layout (", w.keep, ":", w.group, ", k=", w.k, ", bits=", w.bits,
                          ")");
    require<format_error>(!w.qvalues || w.scales, who, ": int8 values need scales");
}

/// y [M, n] = epilogue(x [M, k]·Ŵᵀ) with N:M sparse weights on the active path. Throws shape_error on mismatched
/// operands, format_error for a low-rank epilogue term. y must not alias x.
inline void gemm_nm(ConstMatrixView<float> x, const nm_weights& w, MatrixView<float> y, const epilogue& ep = {}) {
    check_nm_weights(w, "gemm_nm");
    sparse_detail::check_call(x, w.n, w.k, y, ep, "gemm_nm");
    if (x.rows() == 0) return;
    arch::dispatch([&](auto tag) { gemm_nm(tag, x, w, y, ep); });
}

/// Unstructured (SELL-16) body on one path; no checks.
template <class Arch>
void gemm_sell(Arch tag, ConstMatrixView<float> x, const sell_weights& w, MatrixView<float> y, const epilogue& ep = {}) {
    const index_t M = x.rows();
    if (M == 0) return;
    if constexpr (arch::is_simd_v<Arch>) {
        if (M >= sparse_detail::sell_lanes_m_threshold) {
            const index_t panels = w.panels();
            const double macs = double(M) * double(w.offsets[panels]) * double(sparse_panel_rows);
            const int threads = sparse_detail::worth_threads(macs) ? static_cast<int>(std::min<index_t>(panels, max_threads())) : 1;
            parallel_region(threads, [&](int t, int nt) {
                sparse_detail::sell_lanes_m(tag, x, w, panels * t / nt, panels * (t + 1) / nt, y, ep);
            });
            return;
        }
    }
    const double stored = double(w.offsets[w.panels()]) * double(sparse_panel_rows);
    sparse_detail::for_panels(M, w.panels(), stored, [&](index_t p, index_t m0, index_t mr) {
        sparse_detail::sell_panel(tag, w, x, p, m0, mr, y, ep);
    });
}

/// y [M, n] = epilogue(x [M, k]·Ŵᵀ) with unstructured SELL-16 weights on the active path.
inline void gemm_sell(ConstMatrixView<float> x, const sell_weights& w, MatrixView<float> y, const epilogue& ep = {}) {
    require<format_error>(w.n > 0 && w.k > 0 && w.offsets && w.k <= 65536, "gemm_sell: empty or inconsistent weights");
    sparse_detail::check_call(x, w.n, w.k, y, ep, "gemm_sell");
    if (x.rows() == 0) return;
    arch::dispatch([&](auto tag) { gemm_sell(tag, x, w, y, ep); });
}

}  // namespace cpet::kernels
