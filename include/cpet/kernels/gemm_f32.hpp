// cpet/kernels/gemm_f32.hpp — fp32 GEMM y = x·Wᵀ with W stored [out, in] like torch.nn.Linear.
//
// W is packed once (at load) into panels; x is packed per call; a register-tiled microkernel computes each
// output tile, and the epilogue (bias, activation, low-rank add, residual) is applied to the tile while hot:
//     y = act(x·Wᵀ + bias + s·U·Bᵀ) + residual
// M <= 8 takes a GEMV path bound by memory bandwidth.
//
// Layout of the packed weight (the same on every ISA, so one object serves every path):
//     panel p (p < ceil(N/32)) holds columns n = 32p .. 32p+31 of Wᵀ, K-major:
//         panel(p)[k·32 + j] = W[32p + j, k]        (0 where 32p + j >= N)
//     panels follow each other, so the whole weight is one sequential stream (what the GEMV path wants), and a
//     K range [k0, k0+kc) of one panel is one contiguous block of kc·128 bytes (what the GEMM microkernel wants).
//
// The SIMD path (one body over xsimd::batch<float, Arch>):
//     microkernel tile = MR rows × 2 vectors: AVX-512 14 × 32 (28 zmm accumulators + 2 loads of B + 1 broadcast
//     of A = 31 of the 32 zmm), AVX2 6 × 16 (12 + 2 + 1 = 15 of the 16 ymm; a panel is two such column tiles).
//     Per K step the tile does MR·2 FMAs against 2 vector loads of B and MR broadcasts of A, so the FMA ports,
//     not the load ports, are the limit.
// The low-rank term is folded into the microkernel as `rank` extra K steps: U [M, rank] is packed per call like
// x, and s·B [N, rank] like the weight panels (s folded in), so the unmerged adapter costs rank/K more work in
// the same pass over the output tile. A segmented term (a mixed-task batch, kernels/epilogue.hpp) packs each
// distinct B_s once (fp32 from whatever it is stored as: bf16, int8 with row scales); a sliver of MR rows inside
// one segment takes that segment's r_s steps only, and a sliver that straddles segments (or lies in overlapping
// ones) takes each one's steps in turn on the same tile, with U packed zero on the rows that are not that
// segment's (one extra pass of r_s steps per extra segment, no extra pass over x). The GEMV path cuts its row
// groups where a segment starts or ends, so every row of a group has the same segments.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "cpet/arch/dispatch.hpp"
#include "cpet/core/buffer.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/core/parallel.hpp"
#include "cpet/kernels/activations.hpp"
#include "cpet/kernels/epilogue.hpp"

namespace cpet::kernels {

/// W [N, K] packed for the microkernels. The layout does not depend on the ISA, so one packed weight serves
/// every path (and a test may force each path on the same object). See the top of this file for the layout.
class packed_weights_f32 {
public:
    /// Columns of Wᵀ per panel: two AVX-512 vectors, four AVX2 vectors, two cache lines per K step.
    static constexpr index_t panel_width = 32;

    packed_weights_f32() = default;
    /// Packs w ([out, in], any row stride).
    explicit packed_weights_f32(ConstMatrixView<float> w)
        : n_(w.rows()), k_(w.cols()), panels_((w.rows() + panel_width - 1) / panel_width) {
        check_shape(w, -1, -1, "packed_weights_f32: w");
        data_.reset(static_cast<std::size_t>(panels_ * k_ * panel_width));  // zeroed: the padding stays 0
        constexpr index_t kb = 64;  // K block: the 32 source rows × 64 floats and the 8 KiB target stay in L1
        parallel_for(index_t{0}, panels_, [&](index_t p) {
            float* dst = panel(p);
            const index_t cols = std::min(panel_width, n_ - p * panel_width);
            for (index_t k0 = 0; k0 < k_; k0 += kb) {
                const index_t k1 = std::min(k_, k0 + kb);
                for (index_t j = 0; j < cols; ++j) {
                    const float* src = w.row(p * panel_width + j);
                    for (index_t k = k0; k < k1; ++k) dst[k * panel_width + j] = src[k];
                }
            }
        });
    }

    index_t rows() const noexcept { return n_; }  ///< N (out features)
    index_t cols() const noexcept { return k_; }  ///< K (in features)
    std::size_t bytes() const noexcept { return data_.size() * sizeof(float); }
    /// Number of panels, ceil(N / panel_width).
    index_t panels() const noexcept { return panels_; }
    /// Panel p: K rows of panel_width floats (64-byte aligned).
    const float* panel(index_t p) const noexcept { return data_.data() + p * k_ * panel_width; }
    /// Back to [N, K].
    Matrix<float> unpack() const {
        Matrix<float> w(n_, k_);
        for (index_t n = 0; n < n_; ++n) {
            const float* src = panel(n / panel_width) + n % panel_width;
            for (index_t k = 0; k < k_; ++k) w(n, k) = src[k * panel_width];
        }
        return w;
    }

private:
    float* panel(index_t p) noexcept { return data_.data() + p * k_ * panel_width; }

    index_t n_ = 0, k_ = 0, panels_ = 0;
    aligned_buffer<float> data_;
};

namespace gemm_detail {

inline constexpr index_t nr = packed_weights_f32::panel_width;

/// Register tiling of one SIMD path: `mr` rows × `nv` vectors per microkernel tile (see the file comment).
template <class Arch>
struct tiling {
    using batch = xsimd::batch<float, Arch>;
    static constexpr index_t w = static_cast<index_t>(batch::size);
    static constexpr index_t registers = w >= 16 ? 32 : 16;  // zmm0-31 with AVX-512, ymm0-15 with AVX2
    static constexpr index_t nv = 2;
    static constexpr index_t tn = nv * w;                        // tile columns: 32 (AVX-512), 16 (AVX2)
    static constexpr index_t mr = (registers - nv - 1) / nv;     // 14 (AVX-512), 6 (AVX2)
    static constexpr index_t col_tiles = nr / tn;                // column tiles per panel: 1 or 2
    static_assert(nr % tn == 0, "a panel must hold a whole number of microkernel column tiles");
};

// Cache blocking (per thread; L1d 48 KiB, L2 2 MiB per core on the target machine):
//   kc = 256: one K slice of one panel, 256 × 32 floats = 32 KiB, stays in L1 while the microkernel runs every
//        MR-row sliver of the A block over it (the innermost loop); each sliver (14 × 256 floats = 14 KiB) is
//        streamed from L2, 56 bytes per 28 FMAs, far below what L2 delivers.
//   mc ≈ 140 rows (10 slivers of 14, 22 of 6): the packed A block mc × kc (140 KiB) stays in L2 across all the
//        panels of an nc block, and each B slice fetched from L3/DRAM is reused by every sliver of it.
//   nc = 32 panels (1024 columns): the accumulator block mc × nc (≤ 560 KiB) holds partial sums between K
//        slices; A is packed once per (nc, kc) block, so packing costs ~1/(2·nc) of the FMAs.
#ifndef CPET_GEMM_F32_KC
#define CPET_GEMM_F32_KC 256
#endif
#ifndef CPET_GEMM_F32_MC
#define CPET_GEMM_F32_MC 140
#endif
#ifndef CPET_GEMM_F32_NC
#define CPET_GEMM_F32_NC 32
#endif
inline constexpr index_t kc_max = CPET_GEMM_F32_KC;
inline constexpr index_t mc_rows = CPET_GEMM_F32_MC;
inline constexpr index_t nc_panels = CPET_GEMM_F32_NC;

/// Grows-only thread-local scratch: no allocation in the hot loops and, after the first call, none per call.
inline float* scratch(int slot, std::size_t n) {
    thread_local aligned_buffer<float> bufs[4];
    if (bufs[slot].size() < n) bufs[slot].reset(n);
    return bufs[slot].data();
}

/// Packs rows [0, rows) × cols [0, kc) of a (row stride lda) into MR-row slivers, K-major:
/// sliver s holds dst[s·MR·kc + k·MR + r] = a[(s·MR + r)·lda + k], zero for rows >= `rows`. (The low-rank U.)
template <index_t MR>
inline void pack_slivers(const float* a, index_t lda, index_t rows, index_t kc, float* dst) noexcept {
    const index_t slivers = (rows + MR - 1) / MR;
    for (index_t s = 0; s < slivers; ++s) {
        float* d = dst + s * MR * kc;
        for (index_t r = 0; r < MR; ++r) {
            const index_t m = s * MR + r;
            if (m < rows) {
                const float* src = a + m * lda;
                for (index_t k = 0; k < kc; ++k) d[k * MR + r] = src[k];
            } else {
                for (index_t k = 0; k < kc; ++k) d[k * MR + r] = 0.f;
            }
        }
    }
}

/// Row stride of the packed A block: kc_max plus one cache line, so the MR rows a microkernel broadcasts from
/// spread over L1 sets (x itself may have a row stride of a multiple of 4 KiB, which would put every row in the
/// same set), and the row offsets are compile-time displacements of one pointer.
inline constexpr index_t a_stride = kc_max + 16;

/// Copies rows [0, rows) × cols [0, kc) of a (row stride lda) to dst with row stride a_stride — a plain row copy,
/// ~16 floats per cycle — and zeroes the rows up to `rows_padded`, which the microkernel may read but whose
/// results are never stored.
inline void pack_a(const float* a, index_t lda, index_t rows, index_t rows_padded, index_t kc, float* dst) noexcept {
    for (index_t r = 0; r < rows; ++r) std::copy_n(a + r * lda, kc, dst + r * a_stride);
    for (index_t r = rows; r < rows_padded; ++r) std::fill_n(dst + r * a_stride, kc, 0.f);
}

/// The microkernel: an ROWS × NV-vector tile of C accumulated in registers over kc steps of (A rows with row
/// stride a_stride, B with row stride nr), then kc2 more steps over (a2 K-major with stride AS, b2) (the
/// low-rank term). Stores the tile to c (row stride ldc, 64-byte aligned, full tile), adding what c held when
/// `accumulate`. pf: a B slice to prefetch into L2 along the way.
template <class Arch, index_t ROWS, index_t NV, index_t AS>
inline void microkernel(index_t kc, const float* a, const float* b, index_t kc2, const float* a2, const float* b2,
                        float* c, index_t ldc, bool accumulate, const float* pf) noexcept {
    using B = xsimd::batch<float, Arch>;
    constexpr index_t W = static_cast<index_t>(B::size);
    B acc[ROWS][NV];
#pragma GCC unroll 16
    for (index_t r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
        for (index_t v = 0; v < NV; ++v) acc[r][v] = B(0.f);
    // the tile of c is needed at the end: start fetching it now, it arrives long before then
    for (index_t r = 0; r < ROWS; ++r) __builtin_prefetch(c + r * ldc, 1, 3);
#pragma GCC unroll 2
    for (index_t k = 0; k < kc; ++k) {
        // pf: the B slice the next column tile will use (L2 hint: it must not evict this slice from L1)
        __builtin_prefetch(pf + k * nr, 0, 2);
        __builtin_prefetch(pf + k * nr + 16, 0, 2);
        B bv[NV];
#pragma GCC unroll 4
        for (index_t v = 0; v < NV; ++v) bv[v] = B::load_aligned(b + k * nr + v * W);
#pragma GCC unroll 16
        for (index_t r = 0; r < ROWS; ++r) {
            const B av(a[r * a_stride + k]);
#pragma GCC unroll 4
            for (index_t v = 0; v < NV; ++v) acc[r][v] = xsimd::fma(av, bv[v], acc[r][v]);
        }
    }
    for (index_t k = 0; k < kc2; ++k) {
        B bv[NV];
#pragma GCC unroll 4
        for (index_t v = 0; v < NV; ++v) bv[v] = B::load_aligned(b2 + k * nr + v * W);
#pragma GCC unroll 16
        for (index_t r = 0; r < ROWS; ++r) {
            const B av(a2[k * AS + r]);
#pragma GCC unroll 4
            for (index_t v = 0; v < NV; ++v) acc[r][v] = xsimd::fma(av, bv[v], acc[r][v]);
        }
    }
#pragma GCC unroll 16
    for (index_t r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
        for (index_t v = 0; v < NV; ++v) {
            float* p = c + r * ldc + v * W;
            if (accumulate) acc[r][v] += B::load_aligned(p);
            acc[r][v].store_aligned(p);
        }
}

/// Calls microkernel<Arch, R, ...> with R = `rows` rounded up to an even count (at most one wasted row), so an
/// M tail costs what it holds rather than a full MR sliver.
template <class Arch, index_t MR, index_t NV, index_t R = 2>
inline void microkernel_rows(index_t rows, index_t kc, const float* a, const float* b, index_t kc2, const float* a2,
                             const float* b2, float* c, index_t ldc, bool accumulate, const float* pf) noexcept {
    if constexpr (R >= MR) {
        microkernel<Arch, MR, NV, MR>(kc, a, b, kc2, a2, b2, c, ldc, accumulate, pf);
    } else {
        if (rows <= R) microkernel<Arch, R, NV, MR>(kc, a, b, kc2, a2, b2, c, ldc, accumulate, pf);
        else microkernel_rows<Arch, MR, NV, R + 2>(rows, kc, a, b, kc2, a2, b2, c, ldc, accumulate, pf);
    }
}

/// A non-temporal store of one aligned batch (a plain aligned store where the ISA has none here).
template <class Arch, class B>
inline void stream_store(Arch, float* p, const B& v) noexcept {
#if defined(__AVX512F__)
    if constexpr (B::size == 16) return _mm512_stream_ps(p, v);
#endif
#if defined(__AVX__)
    if constexpr (B::size == 8) return _mm256_stream_ps(p, v);
#endif
    v.store_aligned(p);
}

/// Orders the non-temporal stores of the calling thread before what follows (a no-op without SSE).
inline void stream_fence() noexcept {
#if defined(__SSE2__)
    _mm_sfence();
#endif
}

/// Rows ahead at which store_tile_from prefetches the residual and y (see there).
inline constexpr index_t store_prefetch_rows = 8;

/// Epilogue of one finished tile: rows × cols of values → y at (m0, n0), applying bias, activation and residual
/// on SIMD batches (scalar for the column tail). The values come from src: src.batch(B, r, j) gives the batch of
/// row r at columns j.., src.scalar(r, j) one value (so a quantised GEMM can rescale its integer tile on the way,
/// without a float tile in between). Reads each residual element before writing the same element of y, so
/// residual may alias y.
/// With `stream`, whole aligned vectors go to y with non-temporal stores (the caller fences): for outputs much
/// larger than the caches, whose lines would otherwise be read for ownership and then crowd out the operands.
template <class Arch, class Src>
inline void store_tile_from(Arch, const Src& src, index_t rows, index_t cols, index_t m0, index_t n0,
                            MatrixView<float> y, const epilogue& ep, bool stream = false) noexcept {
    for (index_t r = 0; r < rows; ++r) {
        float* yr = y.row(m0 + r) + n0;
        const float* res = ep.residual ? ep.residual + (m0 + r) * ep.ld_residual + n0 : nullptr;
        const float* bias = ep.bias ? ep.bias + n0 : nullptr;
        // Rows of a tall call (gemm_s8 hands over a whole 256-row block of one 16-column panel) are a row stride
        // apart, too far for the hardware prefetcher: fetch the residual and y (for ownership; not when streamed)
        // 8 rows ahead. With a missed residual and y line per row, the epilogue of the BERT layer's K = 768 W8A8
        // GEMMs stalled on them (Zen 3: the epilogue 22 % → 15 % of the integer loop's time, sampled). Short
        // tiles (rows ≤ 8, the fp32 GEMM's) prefetch nothing.
        if (r + store_prefetch_rows < rows && cols > 0) {
            const index_t bytes = cols * index_t(sizeof(float));
            if (res) {
                const char* p = reinterpret_cast<const char*>(res + store_prefetch_rows * ep.ld_residual);
                for (index_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b);
                __builtin_prefetch(p + bytes - 1);
            }
            if (!stream) {
                const char* p = reinterpret_cast<const char*>(y.row(m0 + r + store_prefetch_rows) + n0);
                for (index_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 1);
                __builtin_prefetch(p + bytes - 1, 1);
            }
        }
        index_t j = 0;
        if constexpr (arch::is_simd_v<Arch>) {
            using B = xsimd::batch<float, Arch>;
            constexpr index_t W = static_cast<index_t>(B::size);
            for (; j + W <= cols; j += W) {
                B v = src.batch(B{}, r, j);
                if (bias) v += B::load_unaligned(bias + j);
                v = activate(Arch{}, ep.act, v);
                if (res) v += B::load_unaligned(res + j);
                if (stream && reinterpret_cast<std::uintptr_t>(yr + j) % (W * sizeof(float)) == 0)
                    stream_store(Arch{}, yr + j, v);
                else
                    v.store_unaligned(yr + j);
            }
        }
        for (; j < cols; ++j) {
            float v = src.scalar(r, j);
            if (bias) v += bias[j];
            v = activate(ep.act, v);
            if (res) v += res[j];
            yr[j] = v;
        }
    }
}

/// A float tile c (row stride ldc) as store_tile_from's source.
struct float_tile {
    const float* c;
    index_t ldc;
    template <class B>
    B batch(B, index_t r, index_t j) const noexcept {
        return B::load_unaligned(c + r * ldc + j);
    }
    float scalar(index_t r, index_t j) const noexcept { return c[r * ldc + j]; }
};

/// store_tile_from on a finished float tile: rows × cols of c (row stride ldc).
template <class Arch>
inline void store_tile(Arch, const float* c, index_t ldc, index_t rows, index_t cols, index_t m0, index_t n0,
                       MatrixView<float> y, const epilogue& ep) noexcept {
    store_tile_from(Arch{}, float_tile{c, ldc}, rows, cols, m0, n0, y, ep);
}

/// s·B [N, rank] packed like the weight panels: lr[p·rank·nr + r·nr + j] = s·B[p·nr + j, r] (0 past N).
inline aligned_buffer<float> pack_lowrank_b(const epilogue& ep, index_t n, index_t panels) {
    aligned_buffer<float> lr;
    if (ep.rank <= 0) return lr;
    lr.reset(static_cast<std::size_t>(panels * ep.rank * nr));
    for (index_t i = 0; i < n; ++i)
        for (index_t r = 0; r < ep.rank; ++r)
            lr[static_cast<std::size_t>((i / nr) * ep.rank * nr + r * nr + i % nr)] =
                ep.lowrank_scale * ep.lowrank_b[i * ep.ld_b + r];
    return lr;
}

/// The low-rank B of one call, packed like the weight panels: the plain term (pack_lowrank_b's layout) or, for a
/// segmented epilogue, each distinct B_s once (segments sharing b, its storage, ld_b, rank and scale share it),
/// segment i's at data + offset[i]: [p·rank_i·nr + r·nr + j] = scale_i·B_i[p·nr + j, r] (as a float).
struct lowrank_b_pack {
    aligned_buffer<float> data;
    std::vector<index_t> offset;  ///< per segment (segmented only)

    /// Where target columns of panel p start for segment i (segmented) or the plain term.
    const float* plain(index_t p, index_t rank) const noexcept { return data.data() + p * rank * nr; }
    const float* segment(const lowrank_segment& s, index_t i, index_t p) const noexcept {
        return data.data() + offset[std::size_t(i)] + p * s.rank * nr;
    }
};

inline lowrank_b_pack pack_lowrank(const epilogue& ep, index_t n, index_t panels) {
    lowrank_b_pack pk;
    if (ep.segment_count == 0) {
        pk.data = pack_lowrank_b(ep, n, panels);
        return pk;
    }
    const index_t count = ep.segment_count;
    pk.offset.assign(std::size_t(count), -1);
    index_t total = 0;
    auto same = [](const lowrank_segment& a, const lowrank_segment& b) {
        return a.b == b.b && a.ld_b == b.ld_b && a.rank == b.rank && a.scale == b.scale && a.b_type == b.b_type &&
               a.b_scale == b.b_scale;
    };
    for (index_t i = 0; i < count; ++i) {
        const lowrank_segment& s = ep.segments[i];
        if (s.rank <= 0 || s.rows <= 0) continue;
        for (index_t j = 0; j < i && pk.offset[std::size_t(i)] < 0; ++j)
            if (pk.offset[std::size_t(j)] >= 0 && same(ep.segments[j], s)) pk.offset[std::size_t(i)] = pk.offset[std::size_t(j)];
        if (pk.offset[std::size_t(i)] < 0) {
            pk.offset[std::size_t(i)] = total;
            total += panels * s.rank * nr;
        }
    }
    pk.data.reset(static_cast<std::size_t>(total));  // zeroed: columns past N stay 0
    std::vector<bool> done(std::size_t(count), false);
    for (index_t i = 0; i < count; ++i) {
        const lowrank_segment& s = ep.segments[i];
        if (s.rank <= 0 || s.rows <= 0) continue;
        bool packed = false;
        for (index_t j = 0; j < i && !packed; ++j) packed = done[std::size_t(j)] && pk.offset[std::size_t(j)] == pk.offset[std::size_t(i)];
        done[std::size_t(i)] = true;
        if (packed) continue;
        float* dst = pk.data.data() + pk.offset[std::size_t(i)];
        auto pack = [&](auto value) {  // value(c, r): B[c, r] as stored, to float
            for (index_t c = 0; c < n; ++c)
                for (index_t r = 0; r < s.rank; ++r)
                    dst[static_cast<std::size_t>((c / nr) * s.rank * nr + r * nr + c % nr)] = s.scale * value(c, r);
        };
        if (s.b_type == factor_type::f32) {
            const float* b = static_cast<const float*>(s.b);
            pack([&](index_t c, index_t r) { return b[c * s.ld_b + r]; });
        } else if (s.b_type == factor_type::bf16) {
            const auto* b = static_cast<const std::uint16_t*>(s.b);
            pack([&](index_t c, index_t r) { return from_bf16(b[c * s.ld_b + r]); });
        } else {
            const auto* b = static_cast<const std::int8_t*>(s.b);
            pack([&](index_t c, index_t r) { return s.b_scale[c] * float(b[c * s.ld_b + r]); });
        }
    }
    return pk;
}

/// A lower bound on the segments that can still cover row m or a later one: the first index from `from` whose
/// segment ends past m (every one before it ends at or before m; later ones may too when segments overlap, so
/// callers test each). `from`: the answer for an earlier row (rows are visited in increasing order).
inline index_t segment_at(const epilogue& ep, index_t m, index_t from = 0) noexcept {
    index_t i = from;
    while (i < ep.segment_count && ep.segments[i].row0 + ep.segments[i].rows <= m) ++i;
    return i;
}

/// Whether segment s has a term for rows [r0, r1).
inline bool overlaps(const lowrank_segment& s, index_t r0, index_t r1) noexcept {
    return s.rank > 0 && s.rows > 0 && s.row0 < r1 && s.row0 + s.rows > r0;
}

/// The thread count a call of M×N×K multiply-adds deserves: one below ~0.5 M MACs (a fork costs more).
inline int threads_for(index_t m, index_t n, index_t k) noexcept {
    const double macs = double(m) * double(n) * double(std::max<index_t>(k, 1));
    return macs < double(1 << 19) ? 1 : max_threads();
}

/// [begin, end) of part t out of nt, contiguous and balanced.
inline std::pair<index_t, index_t> split(index_t n, int t, int nt) noexcept {
    return {n * t / nt, n * (t + 1) / nt};
}

// ---------------------------------------------------------------------------------------------------------------
// GEMV path (M <= 8): streams the packed weight once; x rows are broadcast straight from x (no packing).

/// ROWS rows of x (row stride ldx) times one column tile (NV vectors, row stride nr) of a panel over k < kc, then
/// kc2 low-rank steps over (u, b2); stores the ROWS × NV·W result to out (row stride nr). K is unrolled by U
/// with independent accumulators so that even one row keeps 8 FMAs in flight (4-cycle latency × 2 ports).
template <class Arch, index_t ROWS, index_t NV>
inline void gemv_tile(index_t kc, const float* x, index_t ldx, const float* b, index_t kc2, const float* u,
                      index_t ldu, const float* b2, float* out) noexcept {
    using B = xsimd::batch<float, Arch>;
    constexpr index_t W = static_cast<index_t>(B::size);
    constexpr index_t U = ROWS * NV >= 8 ? 1 : 8 / (ROWS * NV);
    B acc[U][ROWS][NV];
#pragma GCC unroll 8
    for (index_t q = 0; q < U; ++q)
#pragma GCC unroll 8
        for (index_t r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
            for (index_t v = 0; v < NV; ++v) acc[q][r][v] = B(0.f);
    index_t k = 0;
    // Software prefetch 8 KiB ahead into L2 (prefetcht1): one core's DRAM bandwidth is bound by how many misses
    // are in flight, and the hardware streamer alone keeps too few; measured here, 4 KiB ahead or a
    // non-temporal hint are ~10-35% slower, L2 and 8-16 KiB the best.
#ifndef CPET_GEMV_PF
#define CPET_GEMV_PF 64
#endif
#ifndef CPET_GEMV_PFL
#define CPET_GEMV_PFL 2
#endif
#ifndef CPET_GEMV_STREAM_PF
#define CPET_GEMV_STREAM_PF 64
#endif
    constexpr index_t ahead = CPET_GEMV_PF * nr;
    for (; k + U <= kc; k += U) {
        if constexpr (ahead > 0) {
#pragma GCC unroll 16
        for (index_t line = 0; line < U * nr; line += 16) __builtin_prefetch(b + k * nr + ahead + line, 0, CPET_GEMV_PFL);
        }
#pragma GCC unroll 8
        for (index_t q = 0; q < U; ++q) {
            B bv[NV];
#pragma GCC unroll 4
            for (index_t v = 0; v < NV; ++v) bv[v] = B::load_aligned(b + (k + q) * nr + v * W);
#pragma GCC unroll 8
            for (index_t r = 0; r < ROWS; ++r) {
                const B av(x[r * ldx + k + q]);
#pragma GCC unroll 4
                for (index_t v = 0; v < NV; ++v) acc[q][r][v] = xsimd::fma(av, bv[v], acc[q][r][v]);
            }
        }
    }
    auto tail = [&](index_t k0, index_t k1, const float* pa, index_t lda, const float* pb) {
        for (index_t kk = k0; kk < k1; ++kk) {
            B bv[NV];
#pragma GCC unroll 4
            for (index_t v = 0; v < NV; ++v) bv[v] = B::load_aligned(pb + kk * nr + v * W);
#pragma GCC unroll 8
            for (index_t r = 0; r < ROWS; ++r) {
                const B av(pa[r * lda + kk]);
#pragma GCC unroll 4
                for (index_t v = 0; v < NV; ++v) acc[0][r][v] = xsimd::fma(av, bv[v], acc[0][r][v]);
            }
        }
    };
    tail(k, kc, x, ldx, b);
    tail(0, kc2, u, ldu, b2);
#pragma GCC unroll 8
    for (index_t r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
        for (index_t v = 0; v < NV; ++v) {
            B s = acc[0][r][v];
#pragma GCC unroll 8
            for (index_t q = 1; q < U; ++q) s += acc[q][r][v];
            s.store_aligned(out + r * nr + v * W);
        }
}

template <class Arch, index_t NV, index_t R, index_t RMAX>
inline void gemv_tile_rows(index_t rows, index_t kc, const float* x, index_t ldx, const float* b, index_t kc2,
                           const float* u, index_t ldu, const float* b2, float* out) noexcept {
    if constexpr (R >= RMAX) {
        gemv_tile<Arch, R, NV>(kc, x, ldx, b, kc2, u, ldu, b2, out);
    } else {
        if (rows == R) gemv_tile<Arch, R, NV>(kc, x, ldx, b, kc2, u, ldu, b2, out);
        else gemv_tile_rows<Arch, NV, R + 1, RMAX>(rows, kc, x, ldx, b, kc2, u, ldu, b2, out);
    }
}

/// S panels at once, each its own sequential stream (the thread's panels cut into S contiguous runs, a panel of
/// each per step): ROWS rows of x times the whole of each panel b[s] over k < kc, then kc2 low-rank steps over
/// (u, b2[s]) (b2 null without them); panel s's ROWS × nr result to out[s] (row stride nr). One core keeps more
/// DRAM misses in flight on several streams than on one, which the hardware prefetchers follow separately:
/// measured on Zen 4 (one thread, 64 MiB of weights) a plain read went from 21 GB/s on one stream to 24 GB/s on
/// four, and with both cores from 36 to 46 GB/s.
template <class Arch, index_t ROWS, index_t NV, index_t S>
inline void gemv_tile_streams(index_t kc, const float* x, index_t ldx, const float* const* b, index_t kc2,
                              const float* u, index_t ldu, const float* const* b2, float* const* out) noexcept {
    using B = xsimd::batch<float, Arch>;
    constexpr index_t W = static_cast<index_t>(B::size);
    B acc[S][ROWS][NV];
#pragma GCC unroll 4
    for (index_t s = 0; s < S; ++s)
#pragma GCC unroll 8
        for (index_t r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
            for (index_t v = 0; v < NV; ++v) acc[s][r][v] = B(0.f);
    constexpr index_t ahead = CPET_GEMV_STREAM_PF * nr;
    const float* bs[S];
#pragma GCC unroll 4
    for (index_t s = 0; s < S; ++s) bs[s] = b[s];
    for (index_t k = 0; k < kc; ++k) {
        B av[ROWS];
#pragma GCC unroll 8
        for (index_t r = 0; r < ROWS; ++r) av[r] = B(x[r * ldx + k]);
#pragma GCC unroll 4
        for (index_t s = 0; s < S; ++s) {
            if constexpr (ahead > 0) {
#pragma GCC unroll 4
                for (index_t line = 0; line < nr; line += 16) __builtin_prefetch(bs[s] + k * nr + ahead + line, 0, 2);
            }
            B bv[NV];
#pragma GCC unroll 4
            for (index_t v = 0; v < NV; ++v) bv[v] = B::load_aligned(bs[s] + k * nr + v * W);
#pragma GCC unroll 8
            for (index_t r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
                for (index_t v = 0; v < NV; ++v) acc[s][r][v] = xsimd::fma(av[r], bv[v], acc[s][r][v]);
        }
    }
#pragma GCC unroll 4
    for (index_t s = 0; s < S; ++s) {
        for (index_t k = 0; b2 && k < kc2; ++k) {
#pragma GCC unroll 8
            for (index_t r = 0; r < ROWS; ++r) {
                const B a(u[r * ldu + k]);
#pragma GCC unroll 4
                for (index_t v = 0; v < NV; ++v)
                    acc[s][r][v] = xsimd::fma(a, B::load_aligned(b2[s] + k * nr + v * W), acc[s][r][v]);
            }
        }
#pragma GCC unroll 8
        for (index_t r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
            for (index_t v = 0; v < NV; ++v) acc[s][r][v].store_aligned(out[s] + r * nr + v * W);
    }
}

/// Streams per GEMV pass for `rows` rows of x: as many as the registers hold (S·rows·NV accumulators + rows
/// broadcasts + NV loads), 4 at most, 1 where two do not fit (AVX-512: 4 up to 3 rows, 2 up to 6; AVX2: 2 for
/// one row).
template <class Arch>
constexpr index_t gemv_stream_count(index_t rows) noexcept {
    constexpr index_t nv = nr / tiling<Arch>::w, regs = tiling<Arch>::registers;
    const index_t s = (regs - rows - nv) / (rows * nv);
    return s >= 4 ? 4 : s >= 2 ? 2 : 1;
}

/// The most rows of x that S streams take (gemv_stream_count(rows) ≥ S): the row dispatch below stops there, so
/// tiles whose accumulators would not fit in the registers are never instantiated.
template <class Arch, index_t S>
inline constexpr index_t gemv_stream_rows = [] {
    index_t r = 1;
    while (r < 8 && gemv_stream_count<Arch>(r + 1) >= S) ++r;
    return r;
}();

template <class Arch, index_t NV, index_t S, index_t R, index_t RMAX>
inline void gemv_streams_rows(index_t rows, index_t kc, const float* x, index_t ldx, const float* const* b,
                              index_t kc2, const float* u, index_t ldu, const float* const* b2,
                              float* const* out) noexcept {
    if constexpr (R >= RMAX) {
        gemv_tile_streams<Arch, R, NV, S>(kc, x, ldx, b, kc2, u, ldu, b2, out);
    } else {
        if (rows == R) gemv_tile_streams<Arch, R, NV, S>(kc, x, ldx, b, kc2, u, ldu, b2, out);
        else gemv_streams_rows<Arch, NV, S, R + 1, RMAX>(rows, kc, x, ldx, b, kc2, u, ldu, b2, out);
    }
}

/// Rows of x per pass over a panel when one pass covers the whole panel (nr columns = nr / W vectors): as many as
/// the registers hold (acc ROWS·V + V loads + 1 broadcast ≤ registers), at most 8. AVX2: V = 4, so 2 rows.
template <class Arch>
inline constexpr index_t gemv_full_rows =
    std::min<index_t>(8, (tiling<Arch>::registers - nr / tiling<Arch>::w - 1) / (nr / tiling<Arch>::w));

/// Where a panel is wider than the microkernel's column tile (AVX2: 32 columns against 16), passing over it one
/// column tile at a time reads every other cache line of each 128-byte K row and comes back for the rest: on Zen
/// that streamed 12 GB/s where one pass over whole rows streams at the core's read bandwidth. So the GEMV walks
/// whole panels, gemv_full_rows<Arch> rows of x at a time (M ≤ 8 re-reads the panel from L2, not DRAM); where a
/// panel is one column tile (AVX-512) the two are the same.
template <class Arch>
void gemv_simd(ConstMatrixView<float> x, const packed_weights_f32& w, MatrixView<float> y, const epilogue& ep,
               const lowrank_b_pack& lr, int threads) {
    constexpr index_t NV = nr / tiling<Arch>::w;  // vectors per panel row
    constexpr index_t group = gemv_full_rows<Arch>;
    static_assert(group >= 1, "gemv: a whole panel row must fit in the registers");
    const index_t M = x.rows(), N = w.rows(), K = w.cols(), rank = ep.rank;
    // S streams per thread for the plain GEMV (see gemv_tile_streams), by the rows of its widest row group
    const index_t S = ep.segment_count == 0 ? gemv_stream_count<Arch>(std::min(group, M)) : 1;
    parallel_region(threads, [&](int t, int nt) {
        // plain variables, not a structured binding: the lambda below captures them (clang < 16 cannot)
        const auto part = split(w.panels(), t, nt);
        const index_t p0 = part.first, p1 = part.second;
        alignas(64) float tile[8 * nr];
        index_t p_rest = p0;  // panels from here on go one at a time
        const auto streamed = [&](auto s_tag) {
            constexpr index_t SN = decltype(s_tag)::value;
            alignas(64) float tiles[SN][8 * nr];
            const index_t run = (p1 - p0) / SN;  // stream s: panels [p0 + s·run, p0 + (s + 1)·run)
            // every row group has at most min(group, M) rows, and S ≥ SN streams fit those (the count only
            // falls as rows grow), so the row dispatch can stop at gemv_stream_rows
            constexpr index_t rmax = std::min(group, gemv_stream_rows<Arch, SN>);
            for (index_t i = 0; i < run; ++i) {
                const float* bs[SN];
                const float* b2s[SN];
                float* outs[SN];
                for (index_t si = 0; si < SN; ++si) {
                    bs[si] = w.panel(p0 + si * run + i);
                    b2s[si] = rank ? lr.plain(p0 + si * run + i, rank) : nullptr;
                    outs[si] = tiles[si];
                }
                for (index_t m0 = 0; m0 < M; m0 += group) {
                    const index_t rows = std::min(group, M - m0);
                    gemv_streams_rows<Arch, NV, SN, 1, rmax>(rows, K, x.row(m0), x.stride(), bs, rank,
                                                              rank ? ep.lowrank_u + m0 * ep.ld_u : nullptr, ep.ld_u,
                                                              rank ? b2s : nullptr, outs);
                    for (index_t si = 0; si < SN; ++si) {
                        const index_t n0 = (p0 + si * run + i) * nr;
                        store_tile(Arch{}, outs[si], nr, rows, std::min(nr, N - n0), m0, n0, y, ep);
                    }
                }
            }
            p_rest = p0 + SN * run;
        };
        if (S == 4 && p1 - p0 >= 4) streamed(std::integral_constant<index_t, 4>{});
        else if (S >= 2 && p1 - p0 >= 2) streamed(std::integral_constant<index_t, 2>{});
        for (index_t p = p_rest; p < p1; ++p) {
            const index_t n0 = p * nr;
            const index_t cols = std::min(nr, N - n0);
            if (ep.segment_count == 0) {
                for (index_t m0 = 0; m0 < M; m0 += group) {
                    const index_t rows = std::min(group, M - m0);
                    gemv_tile_rows<Arch, NV, 1, group>(rows, K, x.row(m0), x.stride(), w.panel(p), rank,
                                                       rank ? ep.lowrank_u + m0 * ep.ld_u : nullptr, ep.ld_u,
                                                       rank ? lr.plain(p, rank) : nullptr, tile);
                    store_tile(Arch{}, tile, nr, rows, cols, m0, n0, y, ep);
                }
                continue;
            }
            // segmented: a row group ends where a segment starts or ends, so all its rows have the same segments;
            // the first one's steps ride in the GEMV tile, any further (overlapping) ones are added to it
            index_t si = 0;
            for (index_t m0 = 0; m0 < M;) {
                si = segment_at(ep, m0, si);
                index_t rows = std::min(group, M - m0), first = -1;
                for (index_t i = si; i < ep.segment_count && ep.segments[i].row0 < m0 + rows; ++i) {
                    const lowrank_segment& sg = ep.segments[i];
                    if (sg.row0 > m0) rows = std::min(rows, sg.row0 - m0);  // starts inside the group: cut there
                    else if (overlaps(sg, m0, m0 + 1)) rows = std::min(rows, sg.row0 + sg.rows - m0);
                }
                for (index_t i = si; i < ep.segment_count && ep.segments[i].row0 <= m0 && first < 0; ++i)
                    if (overlaps(ep.segments[i], m0, m0 + 1)) first = i;
                index_t kc2 = 0, ldu = 0;
                const float* u = nullptr;
                const float* b2 = nullptr;
                if (first >= 0) {
                    const lowrank_segment& sg = ep.segments[first];
                    kc2 = sg.rank, ldu = sg.ld_u;
                    u = sg.u + (m0 - sg.row0) * sg.ld_u;
                    b2 = lr.segment(sg, first, p);
                }
                gemv_tile_rows<Arch, NV, 1, group>(rows, K, x.row(m0), x.stride(), w.panel(p), kc2, u, ldu, b2, tile);
                for (index_t i = first + 1; first >= 0 && i < ep.segment_count && ep.segments[i].row0 <= m0; ++i) {
                    const lowrank_segment& sg = ep.segments[i];
                    if (!overlaps(sg, m0, m0 + 1)) continue;
                    const float* bs = lr.segment(sg, i, p);
                    for (index_t r = 0; r < rows; ++r) {
                        const float* ur = sg.u + (m0 + r - sg.row0) * sg.ld_u;
                        float* t = tile + r * nr;
                        for (index_t k = 0; k < sg.rank; ++k)
                            for (index_t j = 0; j < nr; ++j) t[j] += ur[k] * bs[k * nr + j];
                    }
                }
                store_tile(Arch{}, tile, nr, rows, cols, m0, n0, y, ep);
                m0 += rows;
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------------------------
// Blocked GEMM (M > 8).
//
// The weights come from a "B source": something that hands out the 32-column × kc K-major slice of panel p at k0
// (row stride nr), the layout of packed_weights_f32's panels. Sources provide
//     rows(), cols(), panels()                  N, K and ceil(N / 32)
//     slice(p, k0, kc) -> const float*          valid until the next slice() call of the same thread
//     k_align                                   every K slice but the last starts and ends on a multiple of it
//     in_place                                  slices point into the stored weights (so the next panel's slice
//                                               is worth prefetching into L2 while this one is in use)
// packed_b_source reads the fp32 panels in place; kernels/gemm_wq.hpp dequantises int8 / int4 panels into a
// per-thread slice, once per (panel, K slice, row block), so the cost is spread over up to mc_rows rows of x.

/// B source over packed fp32 panels: the slice is the panel itself, no copy.
struct packed_b_source {
    const packed_weights_f32& w;
    static constexpr index_t k_align = 1;
    static constexpr bool in_place = true;
    index_t rows() const noexcept { return w.rows(); }
    index_t cols() const noexcept { return w.cols(); }
    index_t panels() const noexcept { return w.panels(); }
    const float* slice(index_t p, index_t k0, index_t) const noexcept { return w.panel(p) + k0 * nr; }
};

/// One (sliver, segment) pair of a row block of a segmented low-rank term: the sliver's rows of U_seg packed
/// K-major at upack + offset (zero on the sliver's rows outside the segment).
struct sliver_term {
    index_t seg = 0;
    index_t offset = 0;
};

/// Packs the segmented U of rows [mc0, mc0 + mc) (slivers of MR rows): fills terms (every (sliver, segment) pair
/// that overlaps, in sliver order) and first (sliver s's pairs are terms[first[s] .. first[s + 1])), and U into
/// upack (grown as needed, thread-local slot 2).
template <index_t MR>
inline float* pack_segmented_u(const epilogue& ep, index_t mc0, index_t mc, std::vector<sliver_term>& terms,
                               std::vector<index_t>& first) {
    const index_t slivers = (mc + MR - 1) / MR;
    terms.clear();
    first.assign(std::size_t(slivers + 1), 0);
    index_t size = 0, si = segment_at(ep, mc0);
    for (index_t s = 0; s < slivers; ++s) {
        first[std::size_t(s)] = index_t(terms.size());
        const index_t r0 = mc0 + s * MR, r1 = std::min(mc0 + mc, r0 + MR);
        si = segment_at(ep, r0, si);
        for (index_t i = si; i < ep.segment_count && ep.segments[i].row0 < r1; ++i) {
            const lowrank_segment& sg = ep.segments[i];
            if (!overlaps(sg, r0, r1)) continue;
            terms.push_back({i, size});
            size += sg.rank * MR;
        }
    }
    first[std::size_t(slivers)] = index_t(terms.size());
    float* upack = scratch(2, static_cast<std::size_t>(std::max<index_t>(size, 1)));
    for (index_t s = 0; s < slivers; ++s) {
        const index_t r0 = mc0 + s * MR;
        for (index_t e = first[std::size_t(s)]; e < first[std::size_t(s + 1)]; ++e) {
            const lowrank_segment& sg = ep.segments[terms[std::size_t(e)].seg];
            float* d = upack + terms[std::size_t(e)].offset;
            for (index_t r = 0; r < MR; ++r) {
                const index_t m = r0 + r;
                if (m < mc0 + mc && m >= sg.row0 && m < sg.row0 + sg.rows) {
                    const float* src = sg.u + (m - sg.row0) * sg.ld_u;
                    for (index_t k = 0; k < sg.rank; ++k) d[k * MR + r] = src[k];
                } else {
                    for (index_t k = 0; k < sg.rank; ++k) d[k * MR + r] = 0.f;
                }
            }
        }
    }
    return upack;
}

/// One thread's rectangle: rows [m0, m1) × panels [p0, p1) of the output.
template <class Arch, class Src>
void gemm_block(ConstMatrixView<float> x, const Src& w, MatrixView<float> y, const epilogue& ep,
                const lowrank_b_pack& lr, index_t m0, index_t m1, index_t p0, index_t p1) {
    using T = tiling<Arch>;
    constexpr index_t MR = T::mr;
    constexpr index_t MC = (mc_rows + MR - 1) / MR * MR;
    constexpr index_t KA = Src::k_align;
    static_assert(kc_max % KA == 0, "the K slice must hold whole k_align units");
    const index_t N = w.rows(), K = w.cols(), rank = ep.rank;
    if (m1 <= m0 || p1 <= p0) return;
    // K slices of (nearly) equal length ≤ kc_max, rounded up to k_align; K = 0 still takes one (empty) slice so
    // the epilogue runs.
    const index_t kslices = std::max<index_t>(1, (K + kc_max - 1) / kc_max);
    const index_t kc_len = ((K + kslices - 1) / kslices + KA - 1) / KA * KA;
    const index_t mc_cap = std::min(MC, (m1 - m0 + MR - 1) / MR * MR);
    // +16 floats: a row stride of a multiple of 4 KiB would put all MR rows of a tile in the same L1 set
    const index_t ldc = std::min(nc_panels, p1 - p0) * nr + 16;
    float* apack = scratch(0, static_cast<std::size_t>(mc_cap * a_stride));
    float* cbuf = scratch(1, static_cast<std::size_t>(mc_cap * ldc));
    float* upack = rank ? scratch(2, static_cast<std::size_t>(mc_cap * rank)) : nullptr;
    const bool segmented = ep.segment_count > 0;
    thread_local std::vector<sliver_term> terms;
    thread_local std::vector<index_t> first;

    for (index_t nc0 = p0; nc0 < p1; nc0 += nc_panels) {
        const index_t ncp = std::min(nc_panels, p1 - nc0);
        for (index_t mc0 = m0; mc0 < m1; mc0 += MC) {
            const index_t mc = std::min(MC, m1 - mc0);
            const index_t slivers = (mc + MR - 1) / MR;
            if (rank) pack_slivers<MR>(ep.lowrank_u + mc0 * ep.ld_u, ep.ld_u, mc, rank, upack);
            if (segmented) upack = pack_segmented_u<MR>(ep, mc0, mc, terms, first);
            for (index_t ks = 0; ks < kslices; ++ks) {
                const index_t k0 = ks * kc_len, kc = std::min(kc_len, K - k0);
                const bool last = ks + 1 == kslices;
                pack_a(x.row(mc0) + k0, x.stride(), mc, std::min(slivers * MR, (mc + 1) / 2 * 2), kc, apack);
                for (index_t p = 0; p < ncp; ++p) {
                    if ((nc0 + p) * nr >= N) break;
                    const float* slice = w.slice(nc0 + p, k0, kc);
                    // the first sliver fetches the next panel's slice into L2 (panels are K·128 bytes apart,
                    // too far for the hardware prefetcher to guess); the others re-touch their own slice
                    const float* next = Src::in_place && p + 1 < ncp ? w.slice(nc0 + p + 1, k0, kc) : slice;
                    for (index_t ct = 0; ct < T::col_tiles; ++ct) {
                        const index_t n0 = (nc0 + p) * nr + ct * T::tn;
                        if (n0 >= N) break;
                        const float* bp = slice + ct * T::tn;
                        const float* lp = rank ? lr.plain(nc0 + p, rank) + ct * T::tn : nullptr;
                        const float* pf = next == slice ? bp : next;
                        for (index_t s = 0; s < slivers; ++s) {
                            const index_t rows = std::min(MR, mc - s * MR);
                            float* c = cbuf + s * MR * ldc + p * nr + ct * T::tn;
                            if (segmented && last) {
                                // the main K steps with the sliver's first segment's term, then each further
                                // segment's steps on the same tile (rows outside a segment have U = 0 there)
                                const index_t e0 = first[std::size_t(s)], e1 = first[std::size_t(s + 1)];
                                for (index_t e = e0; e < e1 || e == e0; ++e) {
                                    index_t kc2 = 0;
                                    const float* u = nullptr;
                                    const float* b2 = nullptr;
                                    if (e < e1) {
                                        const sliver_term& tm = terms[std::size_t(e)];
                                        const lowrank_segment& sg = ep.segments[tm.seg];
                                        kc2 = sg.rank;
                                        u = upack + tm.offset;
                                        b2 = lr.segment(sg, tm.seg, nc0 + p) + ct * T::tn;
                                    }
                                    microkernel_rows<Arch, MR, T::nv>(rows, e == e0 ? kc : 0, apack + s * MR * a_stride,
                                                                      bp, kc2, u, b2, c, ldc, ks > 0 || e > e0,
                                                                      s == 0 ? pf : bp);
                                }
                            } else {
                                microkernel_rows<Arch, MR, T::nv>(rows, kc, apack + s * MR * a_stride, bp,
                                                                  last ? rank : 0, upack + s * MR * rank, lp, c, ldc,
                                                                  ks > 0, s == 0 ? pf : bp);
                            }
                            if (last)
                                store_tile(Arch{}, c, ldc, rows, std::min(T::tn, N - n0), mc0 + s * MR, n0, y, ep);
                        }
                    }
                }
            }
        }
    }
}

/// M > 8 over any B source: threads split the panels, or rows when there are too few panels to balance.
/// lr: the low-rank B packed by pack_lowrank (empty without a low-rank term).
template <class Arch, class Src>
void gemm_blocked(ConstMatrixView<float> x, const Src& w, MatrixView<float> y, const epilogue& ep,
                  const lowrank_b_pack& lr, int threads) {
    using T = tiling<Arch>;
    const index_t M = x.rows();
    const index_t panels = w.panels(), slivers = (M + T::mr - 1) / T::mr;
    parallel_region(threads, [&](int t, int nt) {
        // Split the panels (each thread streams its own part of W once) unless there are too few of them to
        // balance; then split M in whole slivers.
        if (panels >= 4 * nt || slivers < nt) {
            const auto [p0, p1] = split(panels, t, nt);
            gemm_block<Arch>(x, w, y, ep, lr, 0, M, p0, p1);
        } else {
            const auto [s0, s1] = split(slivers, t, nt);
            gemm_block<Arch>(x, w, y, ep, lr, s0 * T::mr, std::min(M, s1 * T::mr), 0, panels);
        }
    });
}

template <class Arch>
void gemm_simd(ConstMatrixView<float> x, const packed_weights_f32& w, MatrixView<float> y, const epilogue& ep) {
    const index_t M = x.rows(), N = w.rows(), K = w.cols();
    if (M == 0 || N == 0) return;
    const lowrank_b_pack lr = pack_lowrank(ep, N, w.panels());
    const int threads = threads_for(M, N, K);
    if (M <= 8) {
        gemv_simd<Arch>(x, w, y, ep, lr, threads);
        return;
    }
    gemm_blocked<Arch>(x, packed_b_source{w}, y, ep, lr, threads);
}

// ---------------------------------------------------------------------------------------------------------------
// Scalar path: plain loops over the same packed panels, correct for any shape (the oracle of the SIMD path).

inline void gemm_scalar(ConstMatrixView<float> x, const packed_weights_f32& w, MatrixView<float> y,
                        const epilogue& ep) {
    const index_t M = x.rows(), N = w.rows(), K = w.cols();
    if (M == 0 || N == 0) return;
    const lowrank_b_pack lr = pack_lowrank(ep, N, w.panels());
    parallel_for(index_t{0}, M, [&](index_t m) {
        // this row's low-rank terms: the plain one, or those of the segments covering it
        const index_t si = ep.segment_count > 0 ? segment_at(ep, m) : 0;
        float acc[nr];
        for (index_t p = 0; p < w.panels(); ++p) {
            const float* b = w.panel(p);
            for (index_t j = 0; j < nr; ++j) acc[j] = 0.f;
            for (index_t k = 0; k < K; ++k)
                for (index_t j = 0; j < nr; ++j) acc[j] += x(m, k) * b[k * nr + j];
            auto add = [&](index_t rank, const float* u, const float* lp) {
                for (index_t r = 0; r < rank; ++r)
                    for (index_t j = 0; j < nr; ++j) acc[j] += u[r] * lp[r * nr + j];
            };
            if (ep.rank > 0) add(ep.rank, ep.lowrank_u + m * ep.ld_u, lr.plain(p, ep.rank));
            for (index_t i = si; i < ep.segment_count && ep.segments[i].row0 <= m; ++i) {
                const lowrank_segment& sg = ep.segments[i];
                if (overlaps(sg, m, m + 1)) add(sg.rank, sg.u + (m - sg.row0) * sg.ld_u, lr.segment(sg, i, p));
            }
            store_tile(arch::scalar{}, acc, nr, 1, std::min(nr, N - p * nr), m, p * nr, y, ep);
        }
    });
}

// ---------------------------------------------------------------------------------------------------------------
// dx = dy·W from the panels: dx[m, k] = Σ_p Σ_j dy[m, 32p + j] · panel(p)[k·32 + j]. For a block of KB values of
// k the kernel keeps KB × (32 / W) vector accumulators over all panels (reading KB·128 contiguous bytes of each
// panel, a block that stays in L2 across the rows of dy) and reduces each horizontally once at the end.

template <class Arch, index_t KB>
inline void gemm_t_block(const float* dyr, index_t N, const packed_weights_f32& w, index_t k0, float* dxr) noexcept {
    using B = xsimd::batch<float, Arch>;
    constexpr index_t W = static_cast<index_t>(B::size);
    constexpr index_t NV = nr / W;
    B acc[KB][NV];
#pragma GCC unroll 8
    for (index_t q = 0; q < KB; ++q)
#pragma GCC unroll 4
        for (index_t v = 0; v < NV; ++v) acc[q][v] = B(0.f);
    alignas(64) float pad[nr];
    for (index_t p = 0; p < w.panels(); ++p) {
        const float* seg = dyr + p * nr;
        if (p * nr + nr > N) {  // last, partial panel: never read dy past its row
            for (index_t j = 0; j < nr; ++j) pad[j] = p * nr + j < N ? seg[j] : 0.f;
            seg = pad;
        }
        B d[NV];
#pragma GCC unroll 4
        for (index_t v = 0; v < NV; ++v) d[v] = B::load_unaligned(seg + v * W);
        const float* b = w.panel(p) + k0 * nr;
#pragma GCC unroll 8
        for (index_t q = 0; q < KB; ++q)
#pragma GCC unroll 4
            for (index_t v = 0; v < NV; ++v) acc[q][v] = xsimd::fma(d[v], B::load_aligned(b + q * nr + v * W), acc[q][v]);
    }
#pragma GCC unroll 8
    for (index_t q = 0; q < KB; ++q) {
        B s = acc[q][0];
#pragma GCC unroll 4
        for (index_t v = 1; v < NV; ++v) s += acc[q][v];
        dxr[k0 + q] = xsimd::hadd(s);
    }
}

/// dx = dy·W for many rows (training batches): the GEMV-shaped loop below streams all of W once per row of dy,
/// which is memory-bound once W leaves L2 (a 384×1536 weight at M = 2048 reads 5 GB). Here W is taken 256 rows
/// at a time: the block's transpose [K, 256] is packed into this file's own panel layout (256·K floats, never
/// the whole matrix) and dx (+)= dy[:, block]·W[block, :] runs as the forward GEMM, y = x·W'ᵀ with x = dy[:, block]
/// and W' = W[block, :]ᵀ, the accumulation riding in its residual epilogue. Eigen's GEMM on the same blocks ran
/// at about two thirds of the speed of this kernel on AVX2 (44 vs 66 GFLOP/s at 2048×384×1536).
template <class Arch>
void gemm_t_rows(Arch tag, ConstMatrixView<float> dy, const packed_weights_f32& w, MatrixView<float> dx) {
    const index_t N = w.rows(), K = w.cols();
    constexpr index_t block = 8 * nr;
    Matrix<float> wt(K, std::min(block, N));
    for (index_t n0 = 0; n0 < N; n0 += block) {
        const index_t nb = std::min(block, N - n0);
        auto t = wt.view().middle_cols(0, nb);
        parallel_for(index_t{0}, (nb + nr - 1) / nr, [&](index_t pi) {
            const index_t p = n0 / nr + pi;
            const float* src = w.panel(p);
            const index_t cols = std::min(nr, N - p * nr);
            for (index_t k = 0; k < K; ++k)
                for (index_t j = 0; j < cols; ++j) t(k, pi * nr + j) = src[k * nr + j];
        });
        const packed_weights_f32 pw(t);
        epilogue ep;
        if (n0 > 0) {
            ep.residual = dx.data();
            ep.ld_residual = dx.stride();
        }
        gemm_simd<Arch>(dy.middle_cols(n0, nb), pw, dx, ep);
    }
    (void)tag;
}

template <class Arch>
void gemm_t_simd(ConstMatrixView<float> dy, const packed_weights_f32& w, MatrixView<float> dx) {
    if (dy.rows() >= 16) {
        gemm_t_rows(Arch{}, dy, w, dx);
        return;
    }
    using T = tiling<Arch>;
    constexpr index_t KB = T::registers / 2 / (nr / T::w);  // 8 (AVX-512) or 2 (AVX2): half the registers
    const index_t M = dy.rows(), N = w.rows(), K = w.cols();
    if (M == 0 || K == 0) return;
    const index_t kblocks = (K + KB - 1) / KB;
    parallel_region(threads_for(M, N, K), [&](int t, int nt) {
        const auto [b0, b1] = split(kblocks, t, nt);
        for (index_t kb = b0; kb < b1; ++kb) {
            const index_t k0 = kb * KB;
            for (index_t m = 0; m < M; ++m) {
                if (k0 + KB <= K) {
                    gemm_t_block<Arch, KB>(dy.row(m), N, w, k0, dx.row(m));
                } else {
                    for (index_t k = k0; k < K; ++k) gemm_t_block<Arch, 1>(dy.row(m), N, w, k, dx.row(m));
                }
            }
        }
    });
}

inline void gemm_t_scalar(ConstMatrixView<float> dy, const packed_weights_f32& w, MatrixView<float> dx) {
    const index_t M = dy.rows(), N = w.rows(), K = w.cols();
    parallel_for(index_t{0}, M, [&](index_t m) {
        float* d = dx.row(m);
        for (index_t k = 0; k < K; ++k) d[k] = 0.f;
        for (index_t n = 0; n < N; ++n) {
            const float g = dy(m, n);
            const float* b = w.panel(n / nr) + n % nr;
            for (index_t k = 0; k < K; ++k) d[k] += g * b[k * nr];
        }
    });
}

}  // namespace gemm_detail

/// The kernel body on one path; no checks (callers checked the shapes).
template <class Arch>
void gemm_f32(Arch, ConstMatrixView<float> x, const packed_weights_f32& w, MatrixView<float> y, const epilogue& ep) {
    if constexpr (arch::is_simd_v<Arch>) gemm_detail::gemm_simd<Arch>(x, w, y, ep);
    else gemm_detail::gemm_scalar(x, w, y, ep);
}

/// dx = dy·W on one path; no checks.
template <class Arch>
void gemm_f32_t(Arch, ConstMatrixView<float> dy, const packed_weights_f32& w, MatrixView<float> dx) {
    if constexpr (arch::is_simd_v<Arch>) gemm_detail::gemm_t_simd<Arch>(dy, w, dx);
    else gemm_detail::gemm_t_scalar(dy, w, dx);
}

/// y [M, N] = epilogue(x [M, K] · Wᵀ) on the active path. Throws shape_error on mismatched operands.
inline void gemm_f32(ConstMatrixView<float> x, const packed_weights_f32& w, MatrixView<float> y,
                     const epilogue& ep = {}) {
    check_shape(x, -1, w.cols(), "gemm_f32: x");
    check_shape(y, x.rows(), w.rows(), "gemm_f32: y");
    const index_t M = x.rows(), N = w.rows();
    if (ep.residual) {
        require<shape_error>(M <= 1 || ep.ld_residual >= N, "gemm_f32: residual row stride ", ep.ld_residual,
                             " is smaller than its ", N, " columns");
    }
    check_lowrank(ep, M, N, "gemm_f32");
    if (M == 0 || N == 0) return;
    arch::dispatch([&](auto tag) { gemm_f32(tag, x, w, y, ep); });
}

/// dx [M, K] (+)= dy [M, n] · W_rows [n, K] for a block of rows of some weight, dense and row-major (formats that
/// decode their weight block by block for backward passes: quantized, sparse). The block's transpose is packed
/// and multiplied as gemm_t_rows does; with `accumulate` the product is added to dx.
inline void gemm_f32_t_rows(ConstMatrixView<float> dy, ConstMatrixView<float> w_rows, MatrixView<float> dx,
                            bool accumulate) {
    check_shape(dy, -1, w_rows.rows(), "gemm_f32_t_rows: dy");
    check_shape(dx, dy.rows(), w_rows.cols(), "gemm_f32_t_rows: dx");
    const index_t n = w_rows.rows(), K = w_rows.cols();
    if (dy.rows() == 0 || K == 0) return;
    Matrix<float> t(K, n);
    for (index_t r = 0; r < n; ++r)
        for (index_t k = 0; k < K; ++k) t(k, r) = w_rows(r, k);
    const packed_weights_f32 pw(t);
    epilogue ep;
    if (accumulate) {
        ep.residual = dx.data();
        ep.ld_residual = dx.stride();
    }
    arch::dispatch([&](auto tag) { gemm_f32(tag, dy, pw, dx, ep); });
}

/// dx [M, K] = dy [M, N] · W (backward through a frozen weight).
inline void gemm_f32_t(ConstMatrixView<float> dy, const packed_weights_f32& w, MatrixView<float> dx) {
    check_shape(dy, -1, w.rows(), "gemm_f32_t: dy");
    check_shape(dx, dy.rows(), w.cols(), "gemm_f32_t: dx");
    if (dy.rows() == 0 || w.cols() == 0) return;
    arch::dispatch([&](auto tag) { gemm_f32_t(tag, dy, w, dx); });
}

}  // namespace cpet::kernels
