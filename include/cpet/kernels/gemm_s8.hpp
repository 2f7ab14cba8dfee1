// cpet/kernels/gemm_s8.hpp — W8A8 GEMM: y = x·Ŵᵀ (+ bias) with int8 weights (per-channel or per-tensor scales,
// optional zero points) and activations quantised per token to int8 on the fly; int8·int8 → int32 accumulation;
// the per-token × per-channel rescale, bias, activation and residual on each tile (the low-rank term through
// compress::run_split_epilogue); fp32 in and out.
//
//   x_q[m, k] = round(x[m, k] · 127 / max_k |x[m, k]|)            s_x[m] = max_k |x[m, k]| / 127   (symmetric)
//   C[m, n]   = Σ_k x_q[m, k] · (q[n, k] − z[n])                  exact in int32 (K ≤ 65536 checked)
//   y[m, n]   = (float(C[m, n]) · s_x[m]) · s_w[n] + bias[n]       the same fp32 operations on every path
//
// Integer paths (all give the same C, bit for bit):
//  - AVX-512 VNNI: vpdpbusd multiplies unsigned by signed bytes. The weights take the unsigned side as q + 128
//    (one xor per weight register, shared by 8 rows of x) and x_q the signed side, so
//    C = Σ (q + 128)·x_q − 128·Σ_k x_q[m, k] − z[n]·Σ_k x_q[m, k], with Σ_k x_q computed while quantising x.
//    (The mirror trick, x + 128 with a per-row weight sum, is what formats' row_sums would serve; measured no
//    faster here.) Tile: 8 rows of x × 2 panels (32 outputs) = 16 zmm accumulators; per 4 k, 2 weight loads and
//    8 broadcasts feed 16 vpdpbusd; K is blocked by 1024 so a panel pair's weights stay in L1 across the rows.
//  - AVX2 (and AVX-512 CPUs without VNNI): vpmaddubsw(|q|, sign(x_q, q)) then vpmaddwd(·, 1). Keeping x_q in
//    [−127, 127] and |q| ≤ 128 bounds each pair by 2·128·127 = 32512 < 2¹⁵, so the int16 step never saturates.
//  - AVX2, pair-bounded weights (wq_weights::pair_bounded: |q| + |q'| ≤ 128 for each pair of k the instruction
//    adds): vpmaddubsw(x_q + 128, q) then vpmaddwd(·, 1), C = Σ (x_q + 128)·q − 128·Σ_k q[n, k] (row_sums). Each
//    pair is at most 255·128 = 32640 in magnitude, so this is exact too, without the sign step. Measured on Zen 3
//    (one core): vpsignb issues on the same two pipes as vpmaddubsw / vpmaddwd, so the signed form needs three of
//    their slots per 32 products and this one two — 21 against 32 products per cycle at best. The widened
//    alternative (q and x_q as int16, vpmaddwd alone) was measured too: its widening and broadcast µops make it
//    no faster than the signed form. Arbitrary int8 weights keep the signed form; quant_options::pair_bound
//    quantises into the bounded set.
//  - scalar: the int32 reference loop.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpet/arch/dispatch.hpp"
#include "cpet/core/buffer.hpp"
#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/core/parallel.hpp"
#include "cpet/kernels/epilogue.hpp"
#include "cpet/kernels/gemm_f32.hpp"
#include "cpet/kernels/gemm_wq.hpp"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

// Locality of the integer tiles' weight prefetch (wq_prefetch_bytes ahead): 2 = prefetcht1, into L2, as the
// weight-only decode kernels do. Measured on Zen 4 (4096², old and new binaries alternately) against prefetcht0
// into L1: W8A8 M = 8 −22 to −27 % time at one and two threads, M = 1 at two threads −13 %, W4A8 M = 1 and 8
// −8 to −15 %; M = 128 unchanged; the AVX2 tiles (forced) unchanged, pair-bounded M = 8 −15 %. (Likely: lines
// pulled 8 KiB early into the 32 KiB L1 evict ones still in use; not confirmed, the machine has no PMU.)
#ifndef CPET_S8_PFL
#define CPET_S8_PFL 2
#endif

namespace cpet::kernels {

/// Activations quantised per token (row): q [rows, ld] int8 (or q + 128 as u8 when `shifted`), scales, Σ_k q.
struct s8_activations {
    aligned_buffer<std::int8_t> q;
    aligned_buffer<float> scale;
    aligned_buffer<std::int32_t> sum;
    index_t rows = 0, cols = 0, ld = 0;
    bool shifted = false;
};

namespace detail {

/// The calling thread's quantised activations, reused from call to call. A fresh M × K buffer per call cost a
/// serial zeroing pass over it (and, past glibc's mmap threshold, fresh pages) before the quantising pass wrote
/// it again. The guard gives buffers larger than 64 MiB back when the call ends, so one huge prefill does not pin
/// its buffer to the thread for good.
inline s8_activations& s8_scratch() noexcept {
    thread_local s8_activations a;
    return a;
}

struct s8_scratch_guard {
    s8_activations& a = s8_scratch();
    s8_scratch_guard() = default;
    s8_scratch_guard(const s8_scratch_guard&) = delete;
    s8_scratch_guard& operator=(const s8_scratch_guard&) = delete;
    ~s8_scratch_guard() {
        if (a.q.size() > (std::size_t{64} << 20)) a = s8_activations{};
    }
};

/// Test hook: when true, AVX-512 uses the vpmaddubsw path even on a VNNI CPU (so both are tested here).
inline std::atomic<bool>& s8_disable_vnni() noexcept {
    static std::atomic<bool> v{false};
    return v;
}

inline bool s8_use_vnni() noexcept {
#if defined(__AVX512VNNI__) && XSIMD_WITH_AVX512BW
    return arch::cpu().avx512_vnni && !s8_disable_vnni().load(std::memory_order_relaxed);
#else
    return false;
#endif
}

inline std::int32_t load_i32(const void* p) noexcept {
    std::int32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

// ---- integer tiles: C[MR][NP·16] for x rows m0.. and panels p0..p0+NP-1 ------------------------------------

/// The int32 reference loop.
struct s8_scalar {
    static constexpr int mr = 4, np = 1;
    static constexpr bool shifted = false;
    template <int MR, int NP>
    static void tile(const wq_weights& w, const s8_activations& a, index_t p0, index_t m0, std::int32_t* out,
                     index_t c0, index_t c1, bool first) {
        for (int m = 0; m < MR; ++m) {
            const std::int8_t* xr = a.q.data() + (m0 + m) * a.ld;
            for (int j = 0; j < NP; ++j) {
                const std::uint8_t* base = w.panel(p0 + j);
                for (index_t i = 0; i < wq_panel_rows; ++i) {
                    std::int32_t& o = out[m * NP * wq_panel_rows + j * wq_panel_rows + i];
                    std::int32_t acc = first ? 0 : o;
                    for (index_t k = 4 * c0; k < 4 * c1; ++k)
                        acc += static_cast<std::int32_t>(xr[k]) *
                               static_cast<std::int8_t>(base[(k / 4) * wq_chunk_bytes + i * 4 + k % 4]);
                    o = acc;
                }
            }
        }
    }
};

#if defined(__AVX2__)
struct s8_avx2 {
    static constexpr int mr = 4, np = 1;
    static constexpr bool shifted = false;
    template <int MR, int NP>
    static void tile(const wq_weights& w, const s8_activations& a, index_t p0, index_t m0, std::int32_t* out,
                     index_t c0, index_t c1, bool first) {
        const __m256i ones = _mm256_set1_epi16(1);
        __m256i acc[MR][2 * NP];
        for (int m = 0; m < MR; ++m)
            for (int h = 0; h < 2 * NP; ++h)
                acc[m][h] = first ? _mm256_setzero_si256()
                                  : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(out + m * NP * wq_panel_rows + 8 * h));
        const std::uint8_t* wp[NP];
        for (int j = 0; j < NP; ++j) wp[j] = w.panel(p0 + j);
        const std::int8_t* xr[MR];
        for (int m = 0; m < MR; ++m) xr[m] = a.q.data() + (m0 + m) * a.ld;
        for (index_t c = c0; c < c1; ++c) {
            __m256i wv[2 * NP], aw[2 * NP];
            for (int j = 0; j < NP; ++j)
                for (int h = 0; h < 2; ++h) {
                    wv[2 * j + h] = _mm256_load_si256(reinterpret_cast<const __m256i*>(wp[j] + c * wq_chunk_bytes + 32 * h));
                    aw[2 * j + h] = _mm256_abs_epi8(wv[2 * j + h]);
                }
            for (int m = 0; m < MR; ++m) {
                const __m256i xb = _mm256_set1_epi32(load_i32(xr[m] + 4 * c));
                for (int h = 0; h < 2 * NP; ++h) {
                    const __m256i prod = _mm256_maddubs_epi16(aw[h], _mm256_sign_epi8(xb, wv[h]));
                    acc[m][h] = _mm256_add_epi32(acc[m][h], _mm256_madd_epi16(prod, ones));
                }
            }
        }
        for (int m = 0; m < MR; ++m)
            for (int h = 0; h < 2 * NP; ++h)
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * NP * wq_panel_rows + 8 * h), acc[m][h]);
    }
};
#endif

#if defined(__AVX2__)
/// Pair-bounded weights (see the file comment): x_q + 128 is the unsigned operand, q the signed one. The full
/// tile (4 rows × 16 outputs) keeps its eight accumulators in named variables: with arrays GCC 12 copies each
/// accumulator through a second register and the stack every step (measured 21 against 32 products per cycle).
struct s8_avx2u {
    static constexpr int mr = 4, np = 1;
    static constexpr bool shifted = true;

    /// 128 · Σ_k q[n, k] for the 16 outputs of panel p, as two halves of 8 lanes.
    static void correction(const wq_weights& w, index_t p, __m256i& lo, __m256i& hi) {
        const auto* rs = reinterpret_cast<const __m256i*>(w.row_sums + p * wq_panel_rows);
        lo = _mm256_slli_epi32(_mm256_loadu_si256(rs), 7);
        hi = _mm256_slli_epi32(_mm256_loadu_si256(rs + 1), 7);
    }

    template <int MR, int NP>
    static void tile(const wq_weights& w, const s8_activations& a, index_t p0, index_t m0, std::int32_t* out,
                     index_t c0, index_t c1, bool first) {
        static_assert(NP == 1, "the pair-bounded AVX2 tile covers one panel");
        const bool last = c1 == w.k_pad / 4;
        const std::uint8_t* wp = w.panel(p0);
        const __m256i ones = _mm256_set1_epi16(1);
        if constexpr (MR == 4) {
            const std::int8_t* x0 = a.q.data() + m0 * a.ld;
            const std::int8_t* x1 = x0 + a.ld;
            const std::int8_t* x2 = x1 + a.ld;
            const std::int8_t* x3 = x2 + a.ld;
            const auto start = [&](int m, int h) {
                return first ? _mm256_setzero_si256()
                             : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(out + m * wq_panel_rows + 8 * h));
            };
            __m256i a00 = start(0, 0), a01 = start(0, 1), a10 = start(1, 0), a11 = start(1, 1);
            __m256i a20 = start(2, 0), a21 = start(2, 1), a30 = start(3, 0), a31 = start(3, 1);
            for (index_t c = c0; c < c1; ++c) {
                const std::uint8_t* wc = wp + c * wq_chunk_bytes;
                __builtin_prefetch(wc + wq_prefetch_bytes, 0, CPET_S8_PFL);
                const __m256i w0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(wc));
                const __m256i w1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(wc + 32));
#define CPET_S8U_ROW(X, A0, A1)                                                              \
    {                                                                                        \
        const __m256i xb = _mm256_set1_epi32(load_i32(X + 4 * c));                           \
        A0 = _mm256_add_epi32(A0, _mm256_madd_epi16(_mm256_maddubs_epi16(xb, w0), ones));    \
        A1 = _mm256_add_epi32(A1, _mm256_madd_epi16(_mm256_maddubs_epi16(xb, w1), ones));    \
    }
                CPET_S8U_ROW(x0, a00, a01)
                CPET_S8U_ROW(x1, a10, a11)
                CPET_S8U_ROW(x2, a20, a21)
                CPET_S8U_ROW(x3, a30, a31)
#undef CPET_S8U_ROW
            }
            if (last) {
                __m256i lo, hi;
                correction(w, p0, lo, hi);
                a00 = _mm256_sub_epi32(a00, lo), a01 = _mm256_sub_epi32(a01, hi);
                a10 = _mm256_sub_epi32(a10, lo), a11 = _mm256_sub_epi32(a11, hi);
                a20 = _mm256_sub_epi32(a20, lo), a21 = _mm256_sub_epi32(a21, hi);
                a30 = _mm256_sub_epi32(a30, lo), a31 = _mm256_sub_epi32(a31, hi);
            }
            const auto put = [&](int m, int h, __m256i v) {
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * wq_panel_rows + 8 * h), v);
            };
            put(0, 0, a00), put(0, 1, a01), put(1, 0, a10), put(1, 1, a11);
            put(2, 0, a20), put(2, 1, a21), put(3, 0, a30), put(3, 1, a31);
        } else {  // the last 1–3 rows of a block
            __m256i acc[MR][2];
            for (int m = 0; m < MR; ++m)
                for (int h = 0; h < 2; ++h)
                    acc[m][h] = first ? _mm256_setzero_si256()
                                      : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(out + m * wq_panel_rows + 8 * h));
            for (index_t c = c0; c < c1; ++c) {
                const std::uint8_t* wc = wp + c * wq_chunk_bytes;
                const __m256i w0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(wc));
                const __m256i w1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(wc + 32));
                for (int m = 0; m < MR; ++m) {
                    const __m256i xb = _mm256_set1_epi32(load_i32(a.q.data() + (m0 + m) * a.ld + 4 * c));
                    acc[m][0] = _mm256_add_epi32(acc[m][0], _mm256_madd_epi16(_mm256_maddubs_epi16(xb, w0), ones));
                    acc[m][1] = _mm256_add_epi32(acc[m][1], _mm256_madd_epi16(_mm256_maddubs_epi16(xb, w1), ones));
                }
            }
            __m256i lo = _mm256_setzero_si256(), hi = lo;
            if (last) correction(w, p0, lo, hi);
            for (int m = 0; m < MR; ++m) {
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * wq_panel_rows), _mm256_sub_epi32(acc[m][0], lo));
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * wq_panel_rows + 8), _mm256_sub_epi32(acc[m][1], hi));
            }
        }
    }
};
#endif

#if defined(__AVX512VNNI__) && XSIMD_WITH_AVX512BW
// Register tile of the VNNI kernel (rows of x × panels of 16 outputs); 8 × 2 measured best here (6 × 4, 12 × 2
// and 4 × 4 were 17–60 % slower at M = 128). Overridable for tuning on other CPUs.
#ifndef CPET_S8_MR
#define CPET_S8_MR 8
#define CPET_S8_NP 2
#endif
struct s8_vnni {
    static constexpr int mr = CPET_S8_MR, np = CPET_S8_NP;
    static constexpr bool shifted = false;
    template <int MR, int NP>
    static void tile(const wq_weights& w, const s8_activations& a, index_t p0, index_t m0, std::int32_t* out,
                     index_t c0, index_t c1, bool first) {
        // vpdpbusd multiplies its first source as u8 by its second as s8, and only the second may be an embedded
        // {1to16} broadcast from memory. So the weights take the unsigned side, q + 128 (one xor per weight
        // register, shared by MR rows), and x_q the signed side straight from memory:
        //   Σ (q + 128)·x_q = Σ q·x_q + 128·Σ x_q   → subtract 128·Σ_k x_q[m, k] per token.
        // C chains per accumulator (alternate chunks) keep small tiles (decode, M = 1..3) off vpdpbusd's latency.
        constexpr int C = MR * NP >= 8 ? 1 : (MR * NP >= 4 ? 2 : 4);
        const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
        __m512i acc[MR][NP][C];
        for (int m = 0; m < MR; ++m)
            for (int j = 0; j < NP; ++j)
                for (int t = 0; t < C; ++t)
                    acc[m][j][t] = (first || t > 0) ? _mm512_setzero_si512()
                                                    : _mm512_loadu_si512(reinterpret_cast<const void*>(
                                                          out + m * NP * wq_panel_rows + j * wq_panel_rows));
        const std::uint8_t* wp[NP];
        for (int j = 0; j < NP; ++j) wp[j] = w.panel(p0 + j);
        const std::int8_t* xr[MR];
        for (int m = 0; m < MR; ++m) xr[m] = a.q.data() + (m0 + m) * a.ld;
        const auto step = [&](index_t c, int t) {
            __m512i wv[NP];
            for (int j = 0; j < NP; ++j) {
                __builtin_prefetch(wp[j] + c * wq_chunk_bytes + wq_prefetch_bytes, 0, CPET_S8_PFL);
                wv[j] = _mm512_xor_si512(_mm512_load_si512(reinterpret_cast<const void*>(wp[j] + c * wq_chunk_bytes)), flip);
            }
            for (int m = 0; m < MR; ++m) {
                const __m512i xb = _mm512_set1_epi32(load_i32(xr[m] + 4 * c));
                for (int j = 0; j < NP; ++j) acc[m][j][t] = _mm512_dpbusd_epi32(acc[m][j][t], wv[j], xb);
            }
        };
        index_t c = c0;
        for (; c + C <= c1; c += C)
            for (int t = 0; t < C; ++t) step(c + t, t);
        for (; c < c1; ++c) step(c, 0);
        for (int m = 0; m < MR; ++m) {
            // The correction −128 · Σ_k x_q[m, k] goes in once, with the last K block.
            const bool last = c1 == w.k_pad / 4;
            const __m512i corr = _mm512_set1_epi32(last ? a.sum[static_cast<std::size_t>(m0 + m)] * 128 : 0);
            for (int j = 0; j < NP; ++j) {
                __m512i r = acc[m][j][0];
                for (int t = 1; t < C; ++t) r = _mm512_add_epi32(r, acc[m][j][t]);
                _mm512_storeu_si512(reinterpret_cast<void*>(out + m * NP * wq_panel_rows + j * wq_panel_rows),
                                    _mm512_sub_epi32(r, corr));
            }
        }
    }
};
#endif

template <class Path, int MR, int NP>
void s8_rows(const wq_weights& w, const s8_activations& a, index_t p0, index_t m0, index_t rem, std::int32_t* out,
             index_t c0, index_t c1, bool first) {
    if constexpr (MR > 1) {
        if (rem < MR) return s8_rows<Path, MR - 1, NP>(w, a, p0, m0, rem, out, c0, c1, first);
    }
    Path::template tile<MR, NP>(w, a, p0, m0, out, c0, c1, first);
}

/// Runs Path's tiles over every (row block, panel group) and hands each finished block of int32 sums — already
/// exact Σ x_q·(q − z) — to epi(m0, rows, p0, panels, const int32* tile [rows][panels·16]), rows ≤ s8_row_block.
inline constexpr index_t s8_row_block = 256;

template <class Path, class Epi>
void s8_drive(const wq_weights& w, const s8_activations& a, Epi&& epi) {
    constexpr int MR = Path::mr, NP = Path::np;
    const index_t panels = w.panels(), groups = (panels + NP - 1) / NP;
    // Blocking: rows of x in blocks of `row_block` (x_q block ≤ 1 MiB, in L2); inside a panel group, K in blocks
    // of `k_block` so the weights of the group (NP · 16 · k_block bytes) stay in L1 while every row
    // tile of the block passes over them; the int32 sums wait in `sums` between K blocks.
    constexpr index_t row_block = s8_row_block;
    constexpr index_t k_block_chunks = 256;  // 1024 k: 32 KiB of weights per group, inside the 48 KiB L1
    const index_t chunks = w.k_pad / 4;
    // One parallel region over every (row block, panel group) item, row block major: one barrier per call
    // instead of one per row block (the two-thread BERT layer spent ~6 % spinning at them).
    const index_t row_blocks = (a.rows + row_block - 1) / row_block;
    const auto body = [&](index_t item) {
        const index_t mb = (item / groups) * row_block, pg = item % groups;
        const index_t mb_end = std::min(a.rows, mb + row_block);
        alignas(64) std::int32_t sums[s8_row_block * Path::np * wq_panel_rows];
        const index_t p0 = pg * NP;
        const int np = static_cast<int>(std::min<index_t>(NP, panels - p0));
        for (index_t c0 = 0; c0 < chunks; c0 += k_block_chunks) {
            const index_t c1 = std::min(chunks, c0 + k_block_chunks);
            for (index_t m0 = mb; m0 < mb_end; m0 += MR) {
                const index_t rem = std::min<index_t>(MR, mb_end - m0);
                std::int32_t* tile = sums + (m0 - mb) * np * wq_panel_rows;
                if (np == NP)
                    s8_rows<Path, MR, NP>(w, a, p0, m0, rem, tile, c0, c1, c0 == 0);
                else
                    s8_rows<Path, MR, 1>(w, a, p0, m0, rem, tile, c0, c1, c0 == 0);
            }
        }
        // Zero points: − z[n] · Σ_k x_q[m, k].
        if (w.zeros)
            for (index_t m = mb; m < mb_end; ++m)
                for (index_t i = 0; i < np * wq_panel_rows; ++i)
                    sums[(m - mb) * np * wq_panel_rows + i] -=
                        static_cast<std::int32_t>(w.zeros[(p0 + i / wq_panel_rows) * wq_panel_rows + i % wq_panel_rows]) *
                        a.sum[static_cast<std::size_t>(m)];
        // The whole row block in one call (its row tiles lie contiguous in sums): per MR-row tile of one panel
        // (AVX2, 4 × 16 outputs) the call and its per-row set-up were a third of the epilogue's time, and in one
        // call store_tile_from can fetch the residual and y rows ahead (BERT layer, Zen 3).
        epi(mb, mb_end - mb, p0, np, static_cast<const std::int32_t*>(sums));
    };
    if (worth_threads(std::min(a.rows, row_block), w))
        parallel_for(index_t{0}, row_blocks * groups, body);
    else
        for (index_t item = 0; item < row_blocks * groups; ++item) body(item);
}

/// Test hook: when true, pair-bounded weights take the signed AVX2 tile too (so both are tested on them).
inline std::atomic<bool>& s8_disable_pair_path() noexcept {
    static std::atomic<bool> v{false};
    return v;
}

/// Calls fn with the integer path for weights w on ISA Arch: VNNI where the CPU has it, else on AVX2 the
/// pair-bounded tile when w allows it, else the signed AVX2 tile; scalar without SIMD.
template <class Arch, class Fn>
decltype(auto) s8_with_path(Arch, const wq_weights& w, Fn&& fn) {
    if constexpr (std::is_same_v<Arch, arch::scalar>) {
        return fn(s8_scalar{});
    } else {
#if defined(__AVX512VNNI__) && XSIMD_WITH_AVX512BW
        if constexpr (std::is_same_v<Arch, xsimd::avx512bw>)
            if (s8_use_vnni()) return fn(s8_vnni{});
#endif
#if defined(__AVX2__)
        if (w.pair_bounded && w.row_sums && !s8_disable_pair_path().load(std::memory_order_relaxed))
            return fn(s8_avx2u{});
        return fn(s8_avx2{});
#else
        return fn(s8_scalar{});
#endif
    }
}

/// Per-token symmetric quantisation of rows of x (SIMD over xsimd batches; the rounding is the same IEEE
/// round-to-nearest-even on every path, so x_q is identical on all of them). With `in_scale` [K] (SmoothQuant's
/// 1/s) the row quantised is x[m, k]·in_scale[k], formed in a per-thread row buffer first.
template <class Arch>
void quantize_rows_s8(Arch, ConstMatrixView<float> x, index_t k_pad, bool shifted, s8_activations& out,
                      const float* in_scale = nullptr) {
    const index_t M = x.rows(), K = x.cols();
    out.rows = M;
    out.cols = K;
    out.ld = k_pad;
    out.shifted = shifted;
    // Grow only: every byte of rows [0, M) × [0, k_pad) is written below, so a buffer reused from an earlier call
    // needs neither zeroing nor fresh pages.
    const auto grow = [](auto& buf, std::size_t n) {
        if (buf.size() < n) buf.reset(n);
    };
    grow(out.q, static_cast<std::size_t>(M * k_pad));
    grow(out.scale, static_cast<std::size_t>(M));
    grow(out.sum, static_cast<std::size_t>(M));
    const std::int8_t pad = shifted ? static_cast<std::int8_t>(-128) : 0;  // u8 128 == x_q 0
    const auto body = [&](index_t m) {
        const float* xr = x.row(m);
        if (in_scale) {
            thread_local aligned_buffer<float> row;
            if (row.size() < static_cast<std::size_t>(K)) row.reset(static_cast<std::size_t>(K));
            for (index_t k = 0; k < K; ++k) row[static_cast<std::size_t>(k)] = xr[k] * in_scale[k];
            xr = row.data();
        }
        std::int8_t* qr = out.q.data() + m * k_pad;
        float amax = 0.f;
        index_t k = 0;
        if constexpr (arch::is_simd_v<Arch>) {
            using F = xsimd::batch<float, Arch>;
            constexpr index_t L = F::size;
            F vmax(0.f), v1(0.f), v2(0.f), v3(0.f);  // four chains: vmaxps latency, not throughput, bounds one
            for (; k + 4 * L <= K; k += 4 * L) {
                vmax = xsimd::max(vmax, xsimd::abs(F::load_unaligned(xr + k)));
                v1 = xsimd::max(v1, xsimd::abs(F::load_unaligned(xr + k + L)));
                v2 = xsimd::max(v2, xsimd::abs(F::load_unaligned(xr + k + 2 * L)));
                v3 = xsimd::max(v3, xsimd::abs(F::load_unaligned(xr + k + 3 * L)));
            }
            for (; k + L <= K; k += L) vmax = xsimd::max(vmax, xsimd::abs(F::load_unaligned(xr + k)));
            vmax = xsimd::max(xsimd::max(vmax, v1), xsimd::max(v2, v3));
            alignas(64) float lanes[L];
            vmax.store_aligned(lanes);
            for (index_t l = 0; l < L; ++l) amax = std::max(amax, lanes[l]);
        }
        for (; k < K; ++k) amax = std::max(amax, std::abs(xr[k]));
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        out.scale[static_cast<std::size_t>(m)] = amax / 127.f;
        std::int32_t sum = 0;
        k = 0;
        if constexpr (arch::is_simd_v<Arch>) {
            using F = xsimd::batch<float, Arch>;
            using I = xsimd::batch<std::int32_t, Arch>;
            constexpr index_t L = F::size;
            const F vinv(inv);
            I vsum(0);
            const I lo(-127), hi(127), bias(shifted ? 128 : 0);
            for (; k + L <= K; k += L) {
                const I qi = xsimd::min(hi, xsimd::max(lo, xsimd::nearbyint_as_int(F::load_unaligned(xr + k) * vinv)));
                vsum += qi;
                const I st = qi + bias;
#if defined(__AVX512F__) && XSIMD_WITH_AVX512BW
                if constexpr (std::is_same_v<Arch, xsimd::avx512bw>) {
                    _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + k), _mm512_cvtepi32_epi8(st));
                    continue;
                }
#endif
                alignas(64) std::int32_t lanes[L];
                st.store_aligned(lanes);
                for (index_t l = 0; l < L; ++l) qr[k + l] = static_cast<std::int8_t>(static_cast<std::uint8_t>(lanes[l]));
            }
            sum = xsimd::hadd(vsum);
        }
        for (; k < K; ++k) {
            const int qi = static_cast<int>(std::clamp(std::nearbyint(xr[k] * inv), -127.f, 127.f));
            sum += qi;
            qr[k] = static_cast<std::int8_t>(static_cast<std::uint8_t>(shifted ? qi + 128 : qi));
        }
        for (k = K; k < k_pad; ++k) qr[k] = pad;
        out.sum[static_cast<std::size_t>(m)] = sum;
    };
    if (M * K >= (index_t{1} << 18))
        parallel_for(index_t{0}, M, body);
    else
        for (index_t m = 0; m < M; ++m) body(m);
}

inline void check_s8_weights(const wq_weights& w, const char* who) {
    check_wq_weights(w, who);
    require<format_error>(w.bits == 8 && w.groups == 1 && w.row_sums, who,
                          ": W8A8 needs int8 weights with per-channel or per-tensor scales (got ", w.bits,
                          "-bit weights with ", w.groups, " groups per row)");
    require<shape_error>(w.k_pad <= 65536, who, ": K = ", w.k, " exceeds 65536, where int32 accumulation could overflow");
}

// ---- int4 weights × int8 activations (W4A8): per-group integer dots, fp32 accumulation of the groups ---------
//
//   acc_g[m, n] = Σ_{k∈g} x_q[m, k] · u[n, k]                 (u = nibble 0..15, exact int32)
//   total[m, n] += float(acc_g − z[n, g] · Σ_{k∈g} x_q[m, k]) · (s[n, g] · s_x[m])   (one fma per group)
// The nibbles are the *unsigned* operand of vpdpbusd / vpmaddubsw and x_q the signed one, so no shift trick is
// needed, and a vpmaddubsw pair is at most 2·15·127, far from int16 saturation.

/// Σ_{k∈g} x_q[m, k] for every row and group of quantised activations (unshifted).
inline aligned_buffer<std::int32_t> group_sums(const s8_activations& a, const wq_weights& w) {
    aligned_buffer<std::int32_t> s(static_cast<std::size_t>(a.rows * w.groups));
    for (index_t m = 0; m < a.rows; ++m)
        for (index_t g = 0; g < w.groups; ++g) {
            std::int32_t t = 0;
            const std::int8_t* xr = a.q.data() + m * a.ld + g * w.group;
            for (index_t k = 0; k < w.group; ++k) t += xr[k];
            s[static_cast<std::size_t>(m * w.groups + g)] = t;
        }
    return s;
}

struct w4_scalar {
    static constexpr int mr = 4;
    template <int MR>
    static void tile(const wq_weights& w, const s8_activations& a, const std::int32_t* gsum, index_t p, index_t m0,
                     float* out) {
        const std::uint8_t* base = w.panel(p);
        for (int m = 0; m < MR; ++m) {
            const std::int8_t* xr = a.q.data() + (m0 + m) * a.ld;
            const float sx = a.scale[static_cast<std::size_t>(m0 + m)];
            for (index_t i = 0; i < wq_panel_rows; ++i) {
                float total = 0.f;
                for (index_t g = 0; g < w.groups; ++g) {
                    std::int32_t acc = 0;
                    for (index_t k = g * w.group; k < (g + 1) * w.group; ++k) {
                        const std::uint8_t byte = base[(k / 8) * wq_chunk_bytes + i * 4 + k % 4];
                        acc += static_cast<std::int32_t>(xr[k]) * ((k % 8) < 4 ? (byte & 0xF) : (byte >> 4));
                    }
                    acc -= static_cast<std::int32_t>(w.zero_line(p, g)[i]) * gsum[(m0 + m) * w.groups + g];
                    total = std::fma(static_cast<float>(acc), w.scale_line(p, g)[i] * sx, total);
                }
                out[m * wq_panel_rows + i] = total;
            }
        }
    }
};

#if defined(__AVX2__)
struct w4_avx2 {
    static constexpr int mr = 3;
    template <int MR>
    static void tile(const wq_weights& w, const s8_activations& a, const std::int32_t* gsum, index_t p, index_t m0,
                     float* out) {
        const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0F);
        const std::uint8_t* base = w.panel(p);
        const std::int8_t* xr[MR];
        __m256 total[MR][2];
        for (int m = 0; m < MR; ++m) {
            xr[m] = a.q.data() + (m0 + m) * a.ld;
            total[m][0] = total[m][1] = _mm256_setzero_ps();
        }
        const index_t cpg = w.group / 8;
        for (index_t g = 0; g < w.groups; ++g) {
            __m256i acc[MR][2];
            for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
            for (index_t c = g * cpg; c < (g + 1) * cpg; ++c) {
                for (int h = 0; h < 2; ++h) {
                    const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(base + c * wq_chunk_bytes + 32 * h));
                    const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                    for (int m = 0; m < MR; ++m) {
                        const __m256i xl = _mm256_set1_epi32(load_i32(xr[m] + 8 * c));
                        const __m256i xh = _mm256_set1_epi32(load_i32(xr[m] + 8 * c + 4));
                        const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
                        acc[m][h] = _mm256_add_epi32(acc[m][h], _mm256_madd_epi16(s16, ones));
                    }
                }
            }
            for (int h = 0; h < 2; ++h) {
                const __m256 s = _mm256_load_ps(w.scale_line(p, g) + 8 * h);
                const __m256i z = _mm256_cvttps_epi32(_mm256_load_ps(w.zero_line(p, g) + 8 * h));
                for (int m = 0; m < MR; ++m) {
                    const __m256i r = _mm256_sub_epi32(
                        acc[m][h], _mm256_mullo_epi32(z, _mm256_set1_epi32(gsum[(m0 + m) * w.groups + g])));
                    const __m256 sc = _mm256_mul_ps(s, _mm256_set1_ps(a.scale[static_cast<std::size_t>(m0 + m)]));
                    total[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(r), sc, total[m][h]);
                }
            }
        }
        for (int m = 0; m < MR; ++m)
            for (int h = 0; h < 2; ++h) _mm256_storeu_ps(out + m * wq_panel_rows + 8 * h, total[m][h]);
    }
};
#endif

#if defined(__AVX512VNNI__) && XSIMD_WITH_AVX512BW
struct w4_vnni {
    static constexpr int mr = 8;
    template <int MR>
    static void tile(const wq_weights& w, const s8_activations& a, const std::int32_t* gsum, index_t p, index_t m0,
                     float* out) {
        const __m512i low = _mm512_set1_epi8(0x0F);
        const std::uint8_t* base = w.panel(p);
        const std::int8_t* xr[MR];
        __m512 total[MR];
        for (int m = 0; m < MR; ++m) {
            xr[m] = a.q.data() + (m0 + m) * a.ld;
            total[m] = _mm512_setzero_ps();
        }
        // Low and high nibbles go to separate sums (two chains per row); small M alternates chunks as well.
        constexpr int C = MR >= 4 ? 1 : (MR >= 2 ? 2 : 4);
        const index_t cpg = w.group / 8;
        for (index_t g = 0; g < w.groups; ++g) {
            __m512i acc[MR][2 * C];
            for (int m = 0; m < MR; ++m)
                for (int t = 0; t < 2 * C; ++t) acc[m][t] = _mm512_setzero_si512();
            const auto step = [&](index_t c, int t) {
                __builtin_prefetch(base + c * wq_chunk_bytes + wq_prefetch_bytes, 0, CPET_S8_PFL);
                const __m512i v = _mm512_load_si512(reinterpret_cast<const void*>(base + c * wq_chunk_bytes));
                const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                for (int m = 0; m < MR; ++m) {
                    acc[m][2 * t] = _mm512_dpbusd_epi32(acc[m][2 * t], lo, _mm512_set1_epi32(load_i32(xr[m] + 8 * c)));
                    acc[m][2 * t + 1] =
                        _mm512_dpbusd_epi32(acc[m][2 * t + 1], hi, _mm512_set1_epi32(load_i32(xr[m] + 8 * c + 4)));
                }
            };
            index_t c = g * cpg;
            const index_t c_end = (g + 1) * cpg;
            for (; c + C <= c_end; c += C)
                for (int t = 0; t < C; ++t) step(c + t, t);
            for (; c < c_end; ++c) step(c, 0);
            const __m512 s = _mm512_load_ps(w.scale_line(p, g));
            const __m512i z = _mm512_cvttps_epi32(_mm512_load_ps(w.zero_line(p, g)));
            for (int m = 0; m < MR; ++m) {
                __m512i r = acc[m][0];
                for (int t = 1; t < 2 * C; ++t) r = _mm512_add_epi32(r, acc[m][t]);
                r = _mm512_sub_epi32(r, _mm512_mullo_epi32(z, _mm512_set1_epi32(gsum[(m0 + m) * w.groups + g])));
                const __m512 sc = _mm512_mul_ps(s, _mm512_set1_ps(a.scale[static_cast<std::size_t>(m0 + m)]));
                total[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(r), sc, total[m]);
            }
        }
        for (int m = 0; m < MR; ++m) _mm512_storeu_ps(out + m * wq_panel_rows, total[m]);
    }
};
#endif

template <class Path, int MR>
void w4_rows(const wq_weights& w, const s8_activations& a, const std::int32_t* gsum, index_t p, index_t m0,
             index_t rem, float* out) {
    if constexpr (MR > 1) {
        if (rem < MR) return w4_rows<Path, MR - 1>(w, a, gsum, p, m0, rem, out);
    }
    Path::template tile<MR>(w, a, gsum, p, m0, out);
}

template <class Arch, class Fn>
decltype(auto) w4_with_path(Arch, Fn&& fn) {
    if constexpr (std::is_same_v<Arch, arch::scalar>) {
        return fn(w4_scalar{});
    } else {
#if defined(__AVX512VNNI__) && XSIMD_WITH_AVX512BW
        if constexpr (std::is_same_v<Arch, xsimd::avx512bw>)
            if (s8_use_vnni()) return fn(w4_vnni{});
#endif
#if defined(__AVX2__)
        return fn(w4_avx2{});
#else
        return fn(w4_scalar{});
#endif
    }
}

}  // namespace detail

/// Exact integer GEMM on the active path: c [M, N] = Σ_k xq[m, k] · (q[n, k] − z[n]). xq values must lie in
/// [−127, 127] (the range the activation quantiser produces). This is the test oracle's entry point.
inline void gemm_s8_s32(ConstMatrixView<std::int8_t> xq, const wq_weights& w, MatrixView<std::int32_t> c) {
    detail::check_s8_weights(w, "gemm_s8_s32");
    check_shape(xq, -1, w.k, "gemm_s8_s32: xq");
    check_shape(c, xq.rows(), w.n, "gemm_s8_s32: c");
    for (index_t m = 0; m < xq.rows(); ++m)
        for (index_t k = 0; k < xq.cols(); ++k)
            require<numeric_error>(xq(m, k) >= -127, "gemm_s8_s32: xq(", m, ", ", k, ") = -128 is outside [-127, 127]");
    if (xq.rows() == 0) return;
    arch::dispatch([&](auto tag) {
        detail::s8_with_path(tag, w, [&](auto path) {
            using Path = decltype(path);
            s8_activations a;
            a.rows = xq.rows();
            a.cols = w.k;
            a.ld = w.k_pad;
            a.shifted = Path::shifted;
            a.q.reset(static_cast<std::size_t>(a.rows * a.ld));
            a.sum.reset(static_cast<std::size_t>(a.rows));
            for (index_t m = 0; m < a.rows; ++m) {
                std::int32_t s = 0;
                for (index_t k = 0; k < a.ld; ++k) {
                    const int v = k < w.k ? xq(m, k) : 0;
                    s += v;
                    a.q[static_cast<std::size_t>(m * a.ld + k)] =
                        static_cast<std::int8_t>(static_cast<std::uint8_t>(Path::shifted ? v + 128 : v));
                }
                a.sum[static_cast<std::size_t>(m)] = s;
            }
            detail::s8_drive<Path>(w, a, [&](index_t m0, index_t rows, index_t p0, int np, const std::int32_t* t) {
                const index_t n0 = p0 * wq_panel_rows, valid = std::min<index_t>(np * wq_panel_rows, w.n - n0);
                for (index_t m = 0; m < rows; ++m)
                    for (index_t i = 0; i < valid; ++i) c(m0 + m, n0 + i) = t[m * np * wq_panel_rows + i];
            });
        });
    });
}

namespace detail {
/// Outputs of at least this many bytes are written with non-temporal stores (gemm_s8). A test hook too: 0 streams
/// every output, so the tests run that path on small shapes.
inline std::atomic<std::size_t>& s8_stream_bytes() noexcept {
    static std::atomic<std::size_t> v{std::size_t{4} << 20};
    return v;
}

/// An int32 tile of gemm_s8 as store_tile_from's source: (float(C[r, j]) · s_x[r]) · s_w[j], in that order.
struct s8_tile {
    const std::int32_t* c;
    index_t ldc;
    const float* sx;  ///< per row of the tile
    const float* sw;  ///< per column of the tile
    template <class B>
    B batch(B, index_t r, index_t j) const noexcept {
        using A = typename B::arch_type;
        using I = xsimd::batch<std::int32_t, A>;
        return (xsimd::batch_cast<float>(I::load_unaligned(c + r * ldc + j)) * B(sx[r])) * B::load_unaligned(sw + j);
    }
    float scalar(index_t r, index_t j) const noexcept { return (static_cast<float>(c[r * ldc + j]) * sx[r]) * sw[j]; }
};
}  // namespace detail

/// Whether gemm_s8 can apply epilogue `ep` to y [M, N] on its tiles: no low-rank term, and a residual that either
/// is y itself (same rows, same stride: each element is read before the one store that overwrites it) or does not
/// overlap y.
inline bool gemm_s8_fuses(const epilogue& ep, MatrixView<float> y) noexcept {
    if (ep.has_lowrank()) return false;
    if (ep.residual == y.data() && (ep.ld_residual == y.stride() || y.rows() <= 1)) return true;
    return !residual_overlaps(ep.residual, ep.ld_residual, y);
}

/// y [M, N] = act(x [M, K] · Ŵᵀ + bias) + residual with dynamic per-token int8 activations, on the active path:
/// the rescale, bias, activation and residual applied on each integer tile while it is in L1 (no second pass
/// over y). Needs int8 per-channel / per-tensor weights (format_error otherwise) and an epilogue gemm_s8_fuses
/// accepts (shape_error otherwise: the low-rank term goes through compress::run_split_epilogue). y must not
/// alias x. `in_scale` [K], when given, multiplies x per input channel before it is quantised (SmoothQuant: Ŵ
/// holds W·diag(s), in_scale = 1/s).
inline void gemm_s8(ConstMatrixView<float> x, const wq_weights& w, MatrixView<float> y, const epilogue& ep,
                    const float* in_scale = nullptr) {
    detail::check_s8_weights(w, "gemm_s8");
    check_shape(x, -1, w.k, "gemm_s8: x");
    check_shape(y, x.rows(), w.n, "gemm_s8: y");
    require<shape_error>(gemm_s8_fuses(ep, y), "gemm_s8: the epilogue has a low-rank term or a residual that "
                                               "partly overlaps y (run it through compress::run_split_epilogue)");
    if (ep.residual)
        require<shape_error>(ep.ld_residual >= w.n || x.rows() <= 1, "gemm_s8: residual row stride ",
                             ep.ld_residual, " < ", w.n);
    if (x.rows() == 0) return;
    arch::dispatch([&](auto tag) {
        detail::s8_with_path(tag, w, [&](auto path) {
            using Path = decltype(path);
            const detail::s8_scratch_guard scratch;
            s8_activations& a = scratch.a;
            detail::quantize_rows_s8(tag, x, w.k_pad, Path::shifted, a, in_scale);
            // Outputs of several MiB (prefill of a whole batch) bypass the caches. Written through them, y's lines
            // were read for ownership and crowded out the activations and weights the next tiles reuse: measured on
            // Zen 4, streaming makes the BERT layer's K = 768 GEMMs at 1024 tokens 5–13 % faster.
            const bool stream = double(y.rows()) * double(y.cols()) * sizeof(float) >=
                                double(detail::s8_stream_bytes().load(std::memory_order_relaxed));
            detail::s8_drive<Path>(w, a, [&](index_t m0, index_t rows, index_t p0, int np, const std::int32_t* t) {
                // (float(C)·s_x)·s_w, then the fp32 GEMM's own tile epilogue (bias, activation, residual), in one
                // pass from the integer tile to y. (Through a float tile in L1 and a second pass, the epilogue was
                // ~12 % of the K = 768 GEMMs of a BERT layer on Zen 4.) The scales of consecutive panels are
                // contiguous (scales[p·16 + i]), so a row of the tile is one run of outputs. Separate multiplies:
                // the same fp32 operations on every path.
                const index_t n0 = p0 * wq_panel_rows, valid = std::min<index_t>(np * wq_panel_rows, w.n - n0);
                gemm_detail::store_tile_from(tag, detail::s8_tile{t, np * wq_panel_rows, a.scale.data() + m0, w.scales + n0},
                                             rows, valid, m0, n0, y, ep, stream);
                // One fence per work item (its last row tile: the end of a row block or of x), not per tile: an
                // sfence waits for the write-combining buffers to drain, and after every 8 × 32 tile the fences
                // were 10–20 % of the streamed BERT-layer GEMMs on Zen 5 (1024 × 2304 × 768: 6.1–6.4 → 5.0–5.3 ms).
                // The item's stores are ordered before the parallel region's closing barrier either way.
                if (stream && (m0 + rows == a.rows || (m0 + rows) % detail::s8_row_block == 0)) gemm_detail::stream_fence();
            });
        });
    });
}

/// y [M, N] = x [M, K] · Ŵᵀ (+ bias [N]) with dynamic per-token int8 activations, on the active path (gemm_s8
/// above with the bias alone).
inline void gemm_s8(ConstMatrixView<float> x, const wq_weights& w, MatrixView<float> y, const float* bias = nullptr,
                    const float* in_scale = nullptr) {
    epilogue ep;
    ep.bias = bias;
    gemm_s8(x, w, y, ep, in_scale);
}

/// y [M, N] = x [M, K] · Ŵᵀ (+ bias [N]) for int4 weights (any granularity) with dynamic per-token int8
/// activations (W4A8, the decode path of ggml's q4 × q8): integer dots per group, fp32 sums of the groups.
/// The fp32 operations are the same on every path, so all paths give identical y. `in_scale`: as for gemm_s8.
inline void gemm_w4a8(ConstMatrixView<float> x, const wq_weights& w, MatrixView<float> y, const float* bias = nullptr,
                      const float* in_scale = nullptr) {
    check_wq_weights(w, "gemm_w4a8");
    require<format_error>(w.bits == 4, "gemm_w4a8: needs int4 weights, got ", w.bits, "-bit");
    check_shape(x, -1, w.k, "gemm_w4a8: x");
    check_shape(y, x.rows(), w.n, "gemm_w4a8: y");
    if (x.rows() == 0) return;
    arch::dispatch([&](auto tag) {
        detail::w4_with_path(tag, [&](auto path) {
            using Path = decltype(path);
            constexpr int MR = Path::mr;
            const detail::s8_scratch_guard scratch;
            s8_activations& a = scratch.a;
            detail::quantize_rows_s8(tag, x, w.k_pad, false, a, in_scale);
            const aligned_buffer<std::int32_t> gsum = detail::group_sums(a, w);
            const auto body = [&](index_t p) {
                alignas(64) float tile[MR * wq_panel_rows];
                const index_t n0 = p * wq_panel_rows, valid = std::min<index_t>(wq_panel_rows, w.n - n0);
                for (index_t m0 = 0; m0 < a.rows; m0 += MR) {
                    const index_t rem = std::min<index_t>(MR, a.rows - m0);
                    detail::w4_rows<Path, MR>(w, a, gsum.data(), p, m0, rem, tile);
                    for (index_t m = 0; m < rem; ++m) {
                        float* yr = y.row(m0 + m) + n0;
                        for (index_t i = 0; i < valid; ++i)
                            yr[i] = bias ? tile[m * wq_panel_rows + i] + bias[n0 + i] : tile[m * wq_panel_rows + i];
                    }
                }
            };
            if (detail::worth_threads(a.rows, w))
                parallel_for(index_t{0}, w.panels(), body);
            else
                for (index_t p = 0; p < w.panels(); ++p) body(p);
        });
    });
}

}  // namespace cpet::kernels
