// cpet/kernels/gemm_f32.hpp — fp32 GEMM y = x·Wᵀ with W stored [out, in] like torch.nn.Linear.
//
// W is packed once (at load) into panels; x is packed per call; a register-tiled microkernel computes each
// output tile, and the epilogue (bias, activation, low-rank add, residual) is applied to the tile while hot:
//     y = act(x·Wᵀ + bias + s·U·Bᵀ) + residual
// M <= 8 takes a GEMV path bound by memory bandwidth.
#pragma once

#include <cstddef>

#include "cpet/arch/dispatch.hpp"
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

/// W [N, K] packed for the microkernels. The layout does not depend on the ISA, so one packed weight serves
/// every path (and a test may force each path on the same object).
class packed_weights_f32 {
public:
    packed_weights_f32() = default;
    /// Packs w ([out, in], any row stride).
    explicit packed_weights_f32(ConstMatrixView<float> w) : n_(w.rows()), k_(w.cols()), data_(w) {}

    index_t rows() const noexcept { return n_; }  ///< N (out features)
    index_t cols() const noexcept { return k_; }  ///< K (in features)
    std::size_t bytes() const noexcept { return data_.bytes(); }
    /// Back to [N, K].
    Matrix<float> unpack() const { return Matrix<float>(data_.view()); }
    const Matrix<float>& raw() const noexcept { return data_; }

private:
    index_t n_ = 0, k_ = 0;
    Matrix<float> data_;
};

/// The kernel body on one path; no checks (callers checked the shapes).
template <class Arch>
void gemm_f32(Arch, ConstMatrixView<float> x, const packed_weights_f32& w, MatrixView<float> y, const epilogue& ep) {
    const index_t M = x.rows(), N = w.rows(), K = w.cols();
    const Matrix<float>& W = w.raw();
    for (index_t m = 0; m < M; ++m)
        for (index_t n = 0; n < N; ++n) {
            float acc = 0.f;
            for (index_t k = 0; k < K; ++k) acc += x(m, k) * W(n, k);
            if (ep.bias) acc += ep.bias[n];
            if (ep.rank > 0) {
                float lr = 0.f;
                for (index_t r = 0; r < ep.rank; ++r) lr += ep.lowrank_u[m * ep.ld_u + r] * ep.lowrank_b[n * ep.ld_b + r];
                acc += ep.lowrank_scale * lr;
            }
            acc = activate(ep.act, acc);
            if (ep.residual) acc += ep.residual[m * ep.ld_residual + n];
            y(m, n) = acc;
        }
}

/// y [M, N] = epilogue(x [M, K] · Wᵀ) on the active path. Throws shape_error on mismatched operands.
inline void gemm_f32(ConstMatrixView<float> x, const packed_weights_f32& w, MatrixView<float> y,
                     const epilogue& ep = {}) {
    check_shape(x, -1, w.cols(), "gemm_f32: x");
    check_shape(y, x.rows(), w.rows(), "gemm_f32: y");
    arch::dispatch([&](auto tag) { gemm_f32(tag, x, w, y, ep); });
}

/// dx [M, K] = dy [M, N] · W (backward through a frozen weight).
inline void gemm_f32_t(ConstMatrixView<float> dy, const packed_weights_f32& w, MatrixView<float> dx) {
    check_shape(dy, -1, w.rows(), "gemm_f32_t: dy");
    check_shape(dx, dy.rows(), w.cols(), "gemm_f32_t: dx");
    const Matrix<float>& W = w.raw();
    for (index_t m = 0; m < dy.rows(); ++m)
        for (index_t k = 0; k < w.cols(); ++k) {
            float acc = 0.f;
            for (index_t n = 0; n < w.rows(); ++n) acc += dy(m, n) * W(n, k);
            dx(m, k) = acc;
        }
}

}  // namespace cpet::kernels
