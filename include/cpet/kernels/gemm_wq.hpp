// cpet/kernels/gemm_wq.hpp — weight-only quantized GEMM: y = x·Ŵᵀ (+ bias), fp32 activations, int8 / int4 weights
// dequantised inside the kernel (the decode path, bound by the bandwidth of reading the packed weights).
//
// The packed layout is the one compress/formats/quantized.hpp documents (kernels may not include compress/, so
// the few constants are repeated here and compress::kernel_view static_asserts that both sides agree):
// panels of 16 output rows, each a sequence of 64-byte chunks, one 32-bit lane per row:
//   int8 chunk: lane i = rows 16p+i, bytes k0..k3 of that row;
//   int4 chunk: lane i = nibbles k0 k4 k1 k5 k2 k6 k3 k7 (from bit 0) of row 16p+i.
// So one SIMD register of int32 lanes is 16 (AVX-512) or 8 (AVX2) output rows at 4 or 8 consecutive k; decoding
// one k is a shift (and a mask) plus an int→float conversion, and it feeds MR rows of x by broadcast FMA, each
// broadcast shared by the panel's registers. On AVX2 (the M = 1 int4 loop is bound by its decode there) an int4
// nibble is one AND + one conversion, q·2^(4p) unshifted, with x pre-scaled by 2^(−4p) (nibble_prescale); measured
// on Zen (one thread, CPU time, 4096²): M = 1 0.91 → 0.72 ms, M = 8 5.9 → 4.2 ms; int8 M = 8 6.8 → 4.4 ms.
// The scale (and zero point) are applied once per group:  y += s_g · (Σ_k x_k q_k − z_g · Σ_k x_k).
//
// Blocking: threads split the panels (parallel_for, contiguous chunks of panels per thread); inside a panel the
// rows of x go in blocks of MR (8 on AVX-512, 3 on AVX2) so each decoded weight register is used MR times.
//
// That decode kernel keeps output rows in lanes, so every FMA pays a decode: at large M it is compute-bound and
// slower than the fp32 GEMM. From wq_blocked_rows rows of x the SIMD paths run the fp32 GEMM's blocked loops and
// microkernels (gemm_f32.hpp) instead, over a "B source" that dequantises two 16-row panels at a time into a
// per-thread 32-column × kc fp32 slice (s·q − s·z: one FMA per 16 values), once per slice and row block, and
// the GEMM's tile epilogue applies bias, activation, low-rank term and residual (gemm_wq_fuses_epilogue).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "cpet/arch/dispatch.hpp"
#include "cpet/core/buffer.hpp"
#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/core/parallel.hpp"
#include "cpet/kernels/gemm_f32.hpp"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#ifndef CPET_WQ_PREFETCH
#define CPET_WQ_PREFETCH 8192
#endif
#ifndef CPET_WQ_PREFETCH_LOCALITY
#define CPET_WQ_PREFETCH_LOCALITY 2
#endif
#ifndef CPET_WQ_PREFETCH_NEAR
#define CPET_WQ_PREFETCH_NEAR 1024
#endif

namespace cpet::kernels {

inline constexpr index_t wq_panel_rows = 16;   ///< output rows per packed panel
inline constexpr index_t wq_chunk_bytes = 64;  ///< bytes per packed chunk (16 rows × one 32-bit lane)
/// How far ahead of the packed-weight stream the decode kernels prefetch (bytes), and into which level: L2
/// (prefetcht1, locality 2) like the fp32 GEMV; plus a second, L1 prefetch `wq_prefetch_near_bytes` ahead.
/// Measured at M = 1, 4096² weights streamed from DRAM, one thread (CPU time, the machine shared): no software
/// prefetch ~1.4x slower; far prefetch into L1 instead of L2 ~5-10 % slower; 4-32 KiB ahead alike; the near
/// prefetch (1 KiB; 2-4 KiB about as good) ~8 % faster for int8, ~4 % for int4 (which is bound by its decode).
inline constexpr index_t wq_prefetch_bytes = CPET_WQ_PREFETCH;
inline constexpr index_t wq_prefetch_near_bytes = CPET_WQ_PREFETCH_NEAR;

/// Kernel-facing view of packed quantized weights (see compress::kernel_view).
struct wq_weights {
    const std::uint8_t* data = nullptr;   ///< panels × (k_pad / chunk_k) chunks of 64 bytes
    const float* scales = nullptr;        ///< [panels][groups][16]
    const float* zeros = nullptr;         ///< like scales, integer-valued; null when symmetric int8
    const std::int32_t* row_sums = nullptr;  ///< [panels·16] Σ_k q (int8 only)
    bool pair_bounded = false;            ///< int8: every code pair (k = 2t, 2t + 1) has |q| + |q'| ≤ 128
    int bits = 8;                         ///< 8 or 4
    index_t n = 0, k = 0, k_pad = 0, group = 0, groups = 0;

    index_t panels() const noexcept { return (n + wq_panel_rows - 1) / wq_panel_rows; }
    index_t chunk_k() const noexcept { return bits == 8 ? 4 : 8; }
    const std::uint8_t* panel(index_t p) const noexcept { return data + p * (k_pad / chunk_k()) * wq_chunk_bytes; }
    const float* scale_line(index_t p, index_t g) const noexcept { return scales + (p * groups + g) * wq_panel_rows; }
    const float* zero_line(index_t p, index_t g) const noexcept {
        return zeros ? zeros + (p * groups + g) * wq_panel_rows : nullptr;
    }
};

namespace detail {

/// Activations copied into rows of k_pad floats (zero tail) plus per-group sums (for zero points).
struct wq_activations {
    aligned_buffer<float> x;     ///< [M, k_pad]
    aligned_buffer<float> sums;  ///< [M, groups] (only when the weights have zero points)
    index_t ld = 0;
};

/// The AVX2 int4 tile multiplies float(lane & (0xF << 4p)) = q · 2^(4p) for the nibble at position p (one AND and
/// one conversion, no shift; p = 7 is shifted down instead, as its mask would reach the sign bit), so its
/// activations carry 2^(−4p): x scaled per k by the power of two of its nibble's position (the chunk holds
/// k0 k4 k1 k5 k2 k6 k3 k7 from bit 0). Products and sums are exactly those of x · q (powers of two scale exactly).
inline float nibble_prescale(index_t k) noexcept {
    constexpr float scale[8] = {1.f, 0x1p-8f, 0x1p-16f, 0x1p-24f, 0x1p-4f, 0x1p-12f, 0x1p-20f, 1.f};  // by k % 8
    return scale[k % 8];
}

/// `prescale_nibbles`: x is stored scaled by nibble_prescale (for the AVX2 int4 tile); sums stay unscaled.
inline wq_activations pack_wq_activations(ConstMatrixView<float> x, const wq_weights& w, bool prescale_nibbles = false) {
    wq_activations a;
    const index_t M = x.rows();
    a.ld = w.k_pad;
    a.x.reset(static_cast<std::size_t>(M * w.k_pad));
    for (index_t m = 0; m < M; ++m) std::memcpy(a.x.data() + m * a.ld, x.row(m), sizeof(float) * w.k);
    if (w.zeros) {
        a.sums.reset(static_cast<std::size_t>(M * w.groups));
        for (index_t m = 0; m < M; ++m)
            for (index_t g = 0; g < w.groups; ++g) {
                float s = 0.f;
                const float* xr = a.x.data() + m * a.ld + g * w.group;
                for (index_t k = 0; k < w.group; ++k) s += xr[k];
                a.sums[static_cast<std::size_t>(m * w.groups + g)] = s;
            }
    }
    if (prescale_nibbles)
        for (index_t m = 0; m < M; ++m) {
            float* xr = a.x.data() + m * a.ld;
            for (index_t k = 0; k < w.k; ++k) xr[k] *= nibble_prescale(k);
        }
    return a;
}

/// Starting threads costs microseconds; below ~1M multiply-adds one thread finishes first.
inline bool worth_threads(index_t rows, const wq_weights& w) noexcept {
    return static_cast<double>(rows) * static_cast<double>(w.n) * static_cast<double>(w.k) >= 1.0e6;
}

/// Scalar twin (the oracle of the SIMD paths): one panel, rows [m0, m0 + mr).
inline void gemm_wq_panel(arch::scalar, const wq_weights& w, const wq_activations& a, index_t p, index_t m0,
                          index_t mr, MatrixView<float> y, const float* bias) {
    const index_t ck = w.chunk_k();
    const std::uint8_t* base = w.panel(p);
    for (index_t i = 0; i < wq_panel_rows; ++i) {
        const index_t n = p * wq_panel_rows + i;
        if (n >= w.n) break;
        for (index_t m = m0; m < m0 + mr; ++m) {
            const float* xr = a.x.data() + m * a.ld;
            float total = 0.f;
            for (index_t g = 0; g < w.groups; ++g) {
                float acc = 0.f;
                for (index_t k = g * w.group; k < (g + 1) * w.group; ++k) {
                    const std::uint8_t byte = base[(k / ck) * wq_chunk_bytes + i * 4 + (k % ck) % 4];
                    const int q = w.bits == 8 ? static_cast<int>(static_cast<std::int8_t>(byte))
                                              : ((k % 8) < 4 ? (byte & 0xF) : (byte >> 4));
                    acc += xr[k] * static_cast<float>(q);
                }
                if (w.zeros) acc -= w.zero_line(p, g)[i] * a.sums[static_cast<std::size_t>(m * w.groups + g)];
                total += w.scale_line(p, g)[i] * acc;
            }
            y(m, n) = bias ? total + bias[n] : total;
        }
    }
}

template <class Arch>
using fbatch = xsimd::batch<float, Arch>;
template <class Arch>
using ibatch = xsimd::batch<std::int32_t, Arch>;

/// float(q) of the nibble at position `pos` (bits 4·pos .. 4·pos+3) of every lane.
template <int Pos, class Arch>
inline fbatch<Arch> decode_nibble(const ibatch<Arch>& v) {
#if defined(__AVX512F__) && XSIMD_WITH_AVX512BW
    if constexpr (std::is_same_v<Arch, xsimd::avx512bw>) {
        // vpermps reads only bits 0..3 of each index lane: a 16-entry table turns a nibble into its float in one
        // shuffle, no mask and no int→float conversion.
        const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        __m512i idx = v;
        if constexpr (Pos > 0) idx = _mm512_srli_epi32(idx, 4 * Pos);
        return _mm512_permutexvar_ps(idx, table);
    } else
#endif
    {
        return xsimd::to_float((v >> (4 * Pos)) & ibatch<Arch>(0xF));
    }
}

/// Whether the int4 tile on Arch uses decode_nibble_scaled (and activations packed with prescale_nibbles).
template <class Arch>
inline constexpr bool wq_scaled_nibbles =
#if defined(__AVX2__) && XSIMD_WITH_FMA3_AVX2
    std::is_same_v<Arch, xsimd::fma3<xsimd::avx2>>;
#else
    false;
#endif

/// float(q · 2^(4·Pos)) of the nibble at `Pos` of every lane, q itself for Pos = 7 (see nibble_prescale): two
/// instructions where decode_nibble's generic form takes three, on the loop that bounds the AVX2 int4 decode.
template <int Pos, class Arch>
inline fbatch<Arch> decode_nibble_scaled(const ibatch<Arch>& v) {
#if defined(__AVX2__) && XSIMD_WITH_FMA3_AVX2
    if constexpr (std::is_same_v<Arch, xsimd::fma3<xsimd::avx2>>) {
        const __m256i q = v;
        if constexpr (Pos == 7) return _mm256_cvtepi32_ps(_mm256_srli_epi32(q, 28));
        else return _mm256_cvtepi32_ps(_mm256_and_si256(q, _mm256_set1_epi32(0xF << (4 * Pos))));
    } else
#endif
    {
        static_assert(Pos < 0, "decode_nibble_scaled: only the AVX2 tile uses it");
        return {};
    }
}

/// vpshufb control that moves byte J of every dword to the dword's top byte and zeroes the three below.
template <int J>
constexpr std::int32_t byte_to_top(int dword) {
    return static_cast<std::int32_t>(0x00808080u | (static_cast<unsigned>(4 * dword + J) << 24));
}

/// float(q · 2²⁴) of byte `J` (signed) of every lane: the byte moved to the top of its lane (low bytes zero)
/// converts exactly, with no sign-extending shift; the tile multiplies the group sums by 2⁻²⁴ (exact). On x86
/// the move is one vpshufb (port 5), which keeps port 0 — shifts and conversions — from bounding the M = 1 loop.
template <int J, class Arch>
inline fbatch<Arch> decode_byte(const ibatch<Arch>& v) {
    using I = ibatch<Arch>;
    if constexpr (J == 3) {
        return xsimd::to_float(v & I(static_cast<std::int32_t>(0xFF000000u)));
    } else {
#if defined(__AVX512BW__) && XSIMD_WITH_AVX512BW
        if constexpr (std::is_same_v<Arch, xsimd::avx512bw>) {
            const __m512i ctl = _mm512_set_epi32(byte_to_top<J>(3), byte_to_top<J>(2), byte_to_top<J>(1),
                                                 byte_to_top<J>(0), byte_to_top<J>(3), byte_to_top<J>(2),
                                                 byte_to_top<J>(1), byte_to_top<J>(0), byte_to_top<J>(3),
                                                 byte_to_top<J>(2), byte_to_top<J>(1), byte_to_top<J>(0),
                                                 byte_to_top<J>(3), byte_to_top<J>(2), byte_to_top<J>(1),
                                                 byte_to_top<J>(0));
            return _mm512_cvtepi32_ps(_mm512_shuffle_epi8(v, ctl));
        }
#endif
#if defined(__AVX2__) && XSIMD_WITH_FMA3_AVX2
        if constexpr (std::is_same_v<Arch, xsimd::fma3<xsimd::avx2>>) {
            const __m256i ctl = _mm256_set_epi32(byte_to_top<J>(3), byte_to_top<J>(2), byte_to_top<J>(1),
                                                 byte_to_top<J>(0), byte_to_top<J>(3), byte_to_top<J>(2),
                                                 byte_to_top<J>(1), byte_to_top<J>(0));
            return _mm256_cvtepi32_ps(_mm256_shuffle_epi8(v, ctl));
        }
#endif
        return xsimd::to_float((v << (24 - 8 * J)) & I(static_cast<std::int32_t>(0xFF000000u)));
    }
}

/// SIMD microkernel: one panel of 16 rows × MR rows of x. Lanes are output rows.
template <int MR, int Bits, class Arch>
void gemm_wq_tile(const wq_weights& w, const wq_activations& a, index_t p, index_t m0, MatrixView<float> y,
                  const float* bias) {
    using F = fbatch<Arch>;
    using I = ibatch<Arch>;
    constexpr int L = static_cast<int>(F::size);
    constexpr int V = static_cast<int>(wq_panel_rows) / L;  // registers per panel
    constexpr index_t ck = Bits == 8 ? 4 : 8;
    constexpr int C = std::min<int>(Bits == 8 ? 4 : 8, std::max(1, 8 / (MR * V)));  // accumulator chains
    const std::uint8_t* base = w.panel(p);
    const float* xr[MR];
    for (int m = 0; m < MR; ++m) xr[m] = a.x.data() + (m0 + m) * a.ld;

    F total[MR][V];
    for (int m = 0; m < MR; ++m)
        for (int v = 0; v < V; ++v) total[m][v] = F(0.f);
    const index_t chunks_per_group = w.group / ck;
    for (index_t g = 0; g < w.groups; ++g) {
        // C independent accumulator chains per (row, register): an FMA has 4 cycles of latency and two ports,
        // so fewer than ~8 chains in flight leave the small-M (decode) loop latency-bound.
        F acc[MR][V][C];
        for (int m = 0; m < MR; ++m)
            for (int v = 0; v < V; ++v)
                for (int t = 0; t < C; ++t) acc[m][v][t] = F(0.f);
        const std::uint8_t* chunk = base + g * chunks_per_group * wq_chunk_bytes;
        index_t k0 = g * w.group;
        for (index_t c = 0; c < chunks_per_group; ++c, chunk += wq_chunk_bytes, k0 += ck) {
            // Software prefetch ahead of the stream: at M = 1 the decode work between loads keeps too few misses
            // in flight for the hardware prefetcher alone to reach DRAM bandwidth. Far ahead into L2, and again
            // a little ahead into L1 so that the demand loads do not wait on L2 either.
            if constexpr (wq_prefetch_bytes > 0)
                __builtin_prefetch(chunk + wq_prefetch_bytes, 0, CPET_WQ_PREFETCH_LOCALITY);
            if constexpr (wq_prefetch_near_bytes > 0) __builtin_prefetch(chunk + wq_prefetch_near_bytes, 0, 3);
            I q[V];
            for (int v = 0; v < V; ++v) q[v] = I::load_aligned(reinterpret_cast<const std::int32_t*>(chunk) + v * L);
            // One broadcast of x[k] per row serves the V registers of the panel (the compiler does not share it
            // across a loop over v by itself).
            auto step = [&](auto decode, index_t kk, int t) {
                F xb[MR];
                for (int m = 0; m < MR; ++m) xb[m] = F(xr[m][k0 + kk]);
                for (int v = 0; v < V; ++v) {
                    const F wf = decode(q[v]);
                    for (int m = 0; m < MR; ++m) acc[m][v][t % C] = xsimd::fma(xb[m], wf, acc[m][v][t % C]);
                }
            };
            if constexpr (Bits == 8) {
                step([](const I& r) { return decode_byte<0, Arch>(r); }, 0, 0);
                step([](const I& r) { return decode_byte<1, Arch>(r); }, 1, 1);
                step([](const I& r) { return decode_byte<2, Arch>(r); }, 2, 2);
                step([](const I& r) { return decode_byte<3, Arch>(r); }, 3, 3);
            } else {
                // positions 0..7 hold k0 k4 k1 k5 k2 k6 k3 k7
                [&]<int... P>(std::integer_sequence<int, P...>) {
                    constexpr index_t kk[8] = {0, 4, 1, 5, 2, 6, 3, 7};
                    (step(
                         [](const I& r) {
                             if constexpr (wq_scaled_nibbles<Arch>) return decode_nibble_scaled<P, Arch>(r);
                             else return decode_nibble<P, Arch>(r);
                         },
                         kk[P], P),
                     ...);
                }(std::make_integer_sequence<int, 8>{});
            }
        }
        if constexpr (C > 1)
            for (int m = 0; m < MR; ++m)
                for (int v = 0; v < V; ++v)
                    for (int t = 1; t < C; ++t) acc[m][v][0] += acc[m][v][t];
        if constexpr (Bits == 8)  // decode_byte produced q · 2²⁴
            for (int m = 0; m < MR; ++m)
                for (int v = 0; v < V; ++v) acc[m][v][0] *= F(0x1p-24f);
        const float* sl = w.scale_line(p, g);
        const float* zl = w.zero_line(p, g);
        for (int v = 0; v < V; ++v) {
            const F s = F::load_aligned(sl + v * L);
            if (zl) {
                const F z = F::load_aligned(zl + v * L);
                for (int m = 0; m < MR; ++m)
                    acc[m][v][0] = xsimd::fnma(z, F(a.sums[static_cast<std::size_t>((m0 + m) * w.groups + g)]), acc[m][v][0]);
            }
            for (int m = 0; m < MR; ++m) total[m][v] = xsimd::fma(acc[m][v][0], s, total[m][v]);
        }
    }
    // Store (the last panel may hold padding rows past N).
    const index_t n0 = p * wq_panel_rows;
    const index_t valid = std::min<index_t>(wq_panel_rows, w.n - n0);
    alignas(64) float tmp[wq_panel_rows];
    for (int m = 0; m < MR; ++m) {
        for (int v = 0; v < V; ++v) total[m][v].store_aligned(tmp + v * L);
        float* yr = y.row(m0 + m) + n0;
        if (bias)
            for (index_t i = 0; i < valid; ++i) yr[i] = tmp[i] + bias[n0 + i];
        else
            for (index_t i = 0; i < valid; ++i) yr[i] = tmp[i];
    }
}

template <class Arch>
inline constexpr int wq_mr = fbatch<Arch>::size >= 16 ? 8 : 3;

template <int MR, int Bits, class Arch>
void gemm_wq_rows(const wq_weights& w, const wq_activations& a, index_t p, index_t m0, index_t rem,
                  MatrixView<float> y, const float* bias) {
    if constexpr (MR > 1) {
        if (rem < MR) return gemm_wq_rows<MR - 1, Bits, Arch>(w, a, p, m0, rem, y, bias);
    }
    gemm_wq_tile<MR, Bits, Arch>(w, a, p, m0, y, bias);
}

template <class Arch>
void gemm_wq_panel(Arch, const wq_weights& w, const wq_activations& a, index_t p, index_t m0, index_t mr,
                   MatrixView<float> y, const float* bias) {
    constexpr int MR = wq_mr<Arch>;
    for (index_t m = m0; m < m0 + mr; m += MR) {
        const index_t rem = std::min<index_t>(MR, m0 + mr - m);
        if (w.bits == 8)
            gemm_wq_rows<MR, 8, Arch>(w, a, p, m, rem, y, bias);
        else
            gemm_wq_rows<MR, 4, Arch>(w, a, p, m, rem, y, bias);
    }
}

// ---- large M (wq_blocked_rows and up): the fp32 blocked GEMM over dequantised slices -----------------------

/// Dequantises rows k0 .. k1 (multiples of the chunk) of wq panel q into dst (K-major, row stride
/// gemm_detail::nr, 16 columns): dst[(k − k0)·nr + i] = s·q − s·z, the scale line folded into one FMA per value.
/// Prefetches the same chunks of panel q + 2, which the next slice of the blocked GEMM decodes.
template <int Bits, class Arch>
inline void wq_dequant_panel(const wq_weights& w, index_t q, index_t k0, index_t k1, float* dst) noexcept {
    using F = fbatch<Arch>;
    using I = ibatch<Arch>;
    constexpr int L = static_cast<int>(F::size);
    constexpr int V = static_cast<int>(wq_panel_rows) / L;
    constexpr index_t ck = Bits == 8 ? 4 : 8;
    constexpr index_t nr = gemm_detail::nr;
    const std::uint8_t* chunk = w.panel(q) + (k0 / ck) * wq_chunk_bytes;
    const index_t ahead = q + 2 < w.panels() ? 2 * (w.k_pad / ck) * wq_chunk_bytes : 0;
    for (index_t g = k0 / w.group; g * w.group < k1; ++g) {
        const index_t ga = std::max(k0, g * w.group), gb = std::min(k1, (g + 1) * w.group);
        const float* sl = w.scale_line(q, g);
        const float* zl = w.zero_line(q, g);
        F s[V], c[V];
        for (int v = 0; v < V; ++v) {
            const F sv = F::load_aligned(sl + v * L);
            c[v] = zl ? -(sv * F::load_aligned(zl + v * L)) : F(0.f);
            s[v] = Bits == 8 ? sv * F(0x1p-24f) : sv;  // decode_byte yields q·2²⁴ (exact rescale)
        }
        for (index_t k = ga; k < gb; k += ck, chunk += wq_chunk_bytes) {
            if (ahead) __builtin_prefetch(chunk + ahead);
            float* d = dst + (k - k0) * nr;
            for (int v = 0; v < V; ++v) {
                const I qv = I::load_aligned(reinterpret_cast<const std::int32_t*>(chunk) + v * L);
                auto put = [&](const F& qf, index_t kk) {
                    xsimd::fma(qf, s[v], c[v]).store_aligned(d + kk * nr + v * L);
                };
                if constexpr (Bits == 8) {
                    put(decode_byte<0, Arch>(qv), 0);
                    put(decode_byte<1, Arch>(qv), 1);
                    put(decode_byte<2, Arch>(qv), 2);
                    put(decode_byte<3, Arch>(qv), 3);
                } else {  // nibble order k0 k4 k1 k5 k2 k6 k3 k7
                    put(decode_nibble<0, Arch>(qv), 0);
                    put(decode_nibble<1, Arch>(qv), 4);
                    put(decode_nibble<2, Arch>(qv), 1);
                    put(decode_nibble<3, Arch>(qv), 5);
                    put(decode_nibble<4, Arch>(qv), 2);
                    put(decode_nibble<5, Arch>(qv), 6);
                    put(decode_nibble<6, Arch>(qv), 3);
                    put(decode_nibble<7, Arch>(qv), 7);
                }
            }
        }
    }
}

/// B source of gemm_detail::gemm_block (see gemm_f32.hpp) over packed int8 / int4 weights: the 32-column slice of
/// fp32 panel p is wq panels 2p and 2p + 1, dequantised into a per-thread buffer. The blocked GEMM asks for each
/// slice once per row block (up to gemm_detail::mc_rows rows of x), so decoding costs ~1/mc of the FMAs.
template <class Arch>
struct wq_b_source {
    const wq_weights& w;
    static constexpr index_t k_align = 8;  // slices start on a chunk boundary (int4: 8 k, int8: 4 k)
    static constexpr bool in_place = false;
    index_t rows() const noexcept { return w.n; }
    index_t cols() const noexcept { return w.k; }
    index_t panels() const noexcept { return (w.n + gemm_detail::nr - 1) / gemm_detail::nr; }
    const float* slice(index_t p, index_t k0, index_t kc) const noexcept {
        constexpr index_t nr = gemm_detail::nr;
        // + 8 rows: the last slice's final chunk is decoded whole (rows past kc, zero weights, are not read)
        float* buf = gemm_detail::scratch(3, static_cast<std::size_t>((gemm_detail::kc_max + 8) * nr));
        const index_t ck = w.chunk_k();
        const index_t k1 = (k0 + kc + ck - 1) / ck * ck;
        for (index_t half = 0; half < 2; ++half) {
            const index_t q = 2 * p + half;
            float* dst = buf + half * wq_panel_rows;
            if (q >= w.panels()) {  // N ≤ 32p + 16: columns past N are computed but never stored; keep them finite
                for (index_t k = 0; k < k1 - k0; ++k) std::fill_n(dst + k * nr, wq_panel_rows, 0.f);
            } else if (w.bits == 8) {
                wq_dequant_panel<8, Arch>(w, q, k0, k1, dst);
            } else {
                wq_dequant_panel<4, Arch>(w, q, k0, k1, dst);
            }
        }
        return buf;
    }
};

/// The blocked path at any M (gemm_wq takes it from wq_blocked_rows rows; tests force it below): the fp32 GEMM's
/// blocking, microkernels and full epilogue over dequantised slices; no checks.
template <class Arch>
void gemm_wq_blocked(Arch, ConstMatrixView<float> x, const wq_weights& w, MatrixView<float> y, const epilogue& ep) {
    static_assert(arch::is_simd_v<Arch>, "gemm_wq_blocked: SIMD paths only");
    const wq_b_source<Arch> src{w};
    const gemm_detail::lowrank_b_pack lr = gemm_detail::pack_lowrank(ep, w.n, src.panels());
    gemm_detail::gemm_blocked<Arch>(x, src, y, ep, lr, gemm_detail::threads_for(x.rows(), w.n, w.k));
}

}  // namespace detail

/// Rows of x from which the SIMD paths run the blocked fp32 GEMM over dequantised slices instead of the decode
/// kernel. Measured on the target Xeon (bench_quantized, gemm_wq/cpet_* against gemm_wq/decode_*, 4096², one
/// thread): the decode kernel is ~20 % faster at M = 16 and ~5 % at 24 (decoding a slice costs ~1/M of its
/// FMAs, and the 14-row tiles leave a short sliver), they tie at 32, the blocked GEMM is ~10 % faster at 64.
inline constexpr index_t wq_blocked_rows = 32;

/// Whether gemm_wq(tag, ...) with M rows applies the whole epilogue (bias, activation, low-rank, residual) on
/// the tile; otherwise (the decode kernel, and the scalar path) it fuses only the bias.
template <class Arch>
constexpr bool gemm_wq_fuses_epilogue(Arch, index_t m) noexcept {
    return arch::is_simd_v<Arch> && m >= wq_blocked_rows;
}

/// The decode kernel on one path (any M; the bias only); no checks.
template <class Arch>
void gemm_wq_decode(Arch tag, ConstMatrixView<float> x, const wq_weights& w, MatrixView<float> y, const float* bias) {
    const detail::wq_activations a =
        detail::pack_wq_activations(x, w, w.bits == 4 && detail::wq_scaled_nibbles<Arch>);
    const index_t M = x.rows();
    // Decode (small M) streams each panel once for all rows of x; a large M is split into row blocks that stay
    // in L2 while the panels stream past them.
    constexpr index_t row_block = 64;
    for (index_t m0 = 0; m0 < M; m0 += row_block) {
        const index_t mr = std::min(row_block, M - m0);
        const auto body = [&](index_t p) { detail::gemm_wq_panel(tag, w, a, p, m0, mr, y, bias); };
        if (detail::worth_threads(mr, w))
            parallel_for(index_t{0}, w.panels(), body);
        else
            for (index_t p = 0; p < w.panels(); ++p) body(p);
    }
}

/// The kernel body on one path; no checks (callers checked the shapes). Applies all of `ep` when
/// gemm_wq_fuses_epilogue(tag, M); otherwise `ep` may hold only a bias (shape_error if it holds more).
template <class Arch>
void gemm_wq(Arch tag, ConstMatrixView<float> x, const wq_weights& w, MatrixView<float> y, const epilogue& ep) {
    const index_t M = x.rows();
    if (M == 0) return;
    if constexpr (arch::is_simd_v<Arch>) {
        if (gemm_wq_fuses_epilogue(tag, M)) return detail::gemm_wq_blocked(tag, x, w, y, ep);
    }
    require<shape_error>(ep.act == activation::none && !ep.residual && !ep.has_lowrank(), "gemm_wq: with ", M,
                         " rows on the ", arch::name(arch::isa_of<Arch>()),
                         " path the kernel fuses only the bias; apply the rest of the epilogue after it");
    gemm_wq_decode(tag, x, w, y, ep.bias);
}

/// The same with a bias only (or none).
template <class Arch>
void gemm_wq(Arch tag, ConstMatrixView<float> x, const wq_weights& w, MatrixView<float> y, const float* bias) {
    epilogue ep;
    ep.bias = bias;
    gemm_wq(tag, x, w, y, ep);
}

/// Throws shape_error / format_error unless w is a consistent packed weight of the documented layout.
inline void check_wq_weights(const wq_weights& w, const char* who) {
    require<format_error>(w.bits == 8 || w.bits == 4, who, ": bits must be 8 or 4, got ", w.bits);
    require<format_error>(w.data && w.scales && w.n > 0 && w.k > 0, who, ": empty packed weights");
    require<format_error>(w.k_pad >= w.k && w.k_pad % w.chunk_k() == 0 && w.group > 0 && w.group % w.chunk_k() == 0 &&
                              w.groups * w.group == w.k_pad,
                          who, ": inconsistent packed layout (k=", w.k, ", k_pad=", w.k_pad, ", group=", w.group,
                          ", groups=", w.groups, ")");
    require<format_error>(w.bits == 8 || w.zeros, who, ": int4 weights need zero points");
}

/// y [M, N] = x [M, K] · Ŵᵀ (+ bias [N]) on the active path, fp32 activations. Throws shape_error on mismatched
/// operands. y must not alias x.
inline void gemm_wq(ConstMatrixView<float> x, const wq_weights& w, MatrixView<float> y, const float* bias = nullptr) {
    check_wq_weights(w, "gemm_wq");
    check_shape(x, -1, w.k, "gemm_wq: x");
    check_shape(y, x.rows(), w.n, "gemm_wq: y");
    if (x.rows() == 0) return;
    arch::dispatch([&](auto tag) { gemm_wq(tag, x, w, y, bias); });
}

}  // namespace cpet::kernels
