// cpet/compress/split_epilogue.hpp — the GEMM epilogue for formats whose kernels fuse only part of it.
//
// A format's matmul promises y = act(x·Ŵᵀ + bias + s·U·Bᵀ) + residual (kernels::epilogue). Kernels that fuse
// only the bias (quantized) or everything but the low-rank term (sparse) run their product with the bias, then
// this helper finishes the rest in order: the low-rank term as one thin GEMM added into y (a segmented term: one
// per segment on its rows, each of its own rank — the generic twin of the fused segmented kernel), then activation +
// residual in one SIMD pass (the fp32 GEMM's own tile epilogue). Cost: one extra read + write of y, two with a
// low-rank term. A residual that overlaps y (the layer's in-place residual add) is saved first, since the
// product's store would overwrite it.
#pragma once

#include <algorithm>
#include <cstddef>

#include <Eigen/Core>

#include "cpet/core/buffer.hpp"
#include "cpet/core/eigen.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/core/parallel.hpp"
#include "cpet/kernels/gemm_f32.hpp"

namespace cpet::compress {

/// Runs `product(bias)` — which must store x·Ŵᵀ + bias into y — then the rest of `ep`, on path `tag`.
template <class Arch, class Product>
void run_split_epilogue(Arch tag, MatrixView<float> y, const kernels::epilogue& ep, Product&& product) {
    const index_t M = y.rows(), N = y.cols();
    if (M == 0 || N == 0) return;
    const float* residual = ep.residual;
    index_t ld_res = ep.ld_residual;
    if (kernels::residual_overlaps(residual, ld_res, y)) {
        thread_local aligned_buffer<float> saved;
        if (saved.size() < static_cast<std::size_t>(M * N)) saved.reset(static_cast<std::size_t>(M * N));
        for (index_t m = 0; m < M; ++m) std::copy_n(residual + m * ld_res, N, saved.data() + m * N);
        residual = saved.data();
        ld_res = N;
    }
    product(ep.bias);
    if (ep.rank > 0) {  // y += s·U·Bᵀ (one thin GEMM)
        EigenConstMap<float> u(ep.lowrank_u, M, ep.rank, Eigen::OuterStride<>(ep.ld_u));
        EigenConstMap<float> b(ep.lowrank_b, N, ep.rank, Eigen::OuterStride<>(ep.ld_b));
        as_eigen(y).noalias() += ep.lowrank_scale * (u * b.transpose());
    }
    for (index_t i = 0; i < ep.segment_count; ++i) {  // segmented: each segment's rows += s·U_s·B_sᵀ, rank r_s
        const kernels::lowrank_segment& sg = ep.segments[i];
        if (sg.rank <= 0 || sg.rows <= 0) continue;
        EigenConstMap<float> u(sg.u, sg.rows, sg.rank, Eigen::OuterStride<>(sg.ld_u));
        const float* bp = static_cast<const float*>(sg.b);
        index_t ldb = sg.ld_b;
        if (sg.b_type != kernels::factor_type::f32) {  // a compact B: decoded [N, r] for this segment's GEMM
            thread_local aligned_buffer<float> decoded;
            if (decoded.size() < static_cast<std::size_t>(N * sg.rank))
                decoded.reset(static_cast<std::size_t>(N * sg.rank));
            for (index_t n = 0; n < N; ++n)
                for (index_t r = 0; r < sg.rank; ++r) decoded[static_cast<std::size_t>(n * sg.rank + r)] = sg.b_at(n, r);
            bp = decoded.data();
            ldb = sg.rank;
        }
        EigenConstMap<float> b(bp, N, sg.rank, Eigen::OuterStride<>(ldb));
        as_eigen(y.middle_rows(sg.row0, sg.rows)).noalias() += sg.scale * (u * b.transpose());
    }
    if (ep.act != kernels::activation::none || residual) {  // y = act(y) + residual, one SIMD pass
        kernels::epilogue rest;
        rest.act = ep.act;
        rest.residual = residual;
        rest.ld_residual = ld_res;
        // rows in parallel (each row reads its residual before writing it): the product before it was parallel,
        // and a serial pass here cost the two-thread W8A8 layer ~10 % before gemm_s8 fused it
        const auto row = [&](index_t m) { kernels::gemm_detail::store_tile(tag, y.row(m), N, 1, N, m, 0, y, rest); };
        if (M * N >= (index_t{1} << 16))
            parallel_for(index_t{0}, M, row);
        else
            for (index_t m = 0; m < M; ++m) row(m);
    }
}

}  // namespace cpet::compress
