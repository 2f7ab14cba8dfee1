// cpet/kernels/epilogue.hpp — what every GEMM-like kernel applies to an output tile before storing it.
//
// Its own header (not kernels/gemm_f32.hpp) because the weight-format and PET concepts (compress/format.hpp,
// pet/policy.hpp) speak of it, and they should not pull the fp32 GEMM into every translation unit that only
// names a format or a hook.
#pragma once

#include "cpet/core/matrix.hpp"
#include "cpet/kernels/activations.hpp"

namespace cpet::kernels {

/// What the GEMM applies to each output tile before it is stored, in this order:
/// y = act(acc + bias + lowrank_scale · U·Bᵀ) + residual.
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
};

}  // namespace cpet::kernels
