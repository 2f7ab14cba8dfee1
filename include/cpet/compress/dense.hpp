// cpet/compress/dense.hpp — the uncompressed format (fp32, packed for the GEMM) and its identity policy.
//
// `dense_f32` is the baseline every other format is measured against and the format of the dense model that
// knowledge inheritance starts from. `compress::dense` ignores calibration and only packs.
#pragma once

#include <cstddef>

#include "cpet/compress/calibration.hpp"
#include "cpet/compress/format.hpp"
#include "cpet/compress/policy.hpp"
#include "cpet/kernels/gemm_f32.hpp"

namespace cpet::compress {

/// W [out, in] in fp32, packed once into the GEMM's panel layout (kernels::packed_weights_f32).
class dense_f32 {
public:
    dense_f32() = default;
    /// Packs `w` ([out, in], any row stride).
    explicit dense_f32(ConstMatrixView<float> w) : w_(checked(w)) {}

    index_t out_features() const noexcept { return w_.rows(); }
    index_t in_features() const noexcept { return w_.cols(); }

    /// y [M, out] = ep(x [M, in]·Wᵀ) on the active path; throws shape_error on mismatched operands.
    void matmul(ConstMatrixView<float> x, MatrixView<float> y, const kernels::epilogue& ep) const {
        kernels::gemm_f32(x, w_, y, ep);
    }
    /// The same on path `tag`, unchecked (the layer checked the shapes and dispatched once).
    template <class Arch>
    void matmul(Arch tag, ConstMatrixView<float> x, MatrixView<float> y, const kernels::epilogue& ep) const {
        kernels::gemm_f32(tag, x, w_, y, ep);
    }
    /// dx [M, in] = dy [M, out]·W.
    void matmul_t(ConstMatrixView<float> dy, MatrixView<float> dx) const { kernels::gemm_f32_t(dy, w_, dx); }

    Matrix<float> to_dense() const { return w_.unpack(); }
    std::size_t bytes() const noexcept { return w_.bytes(); }
    const kernels::packed_weights_f32& packed() const noexcept { return w_; }

private:
    static ConstMatrixView<float> checked(ConstMatrixView<float> w) {
        check_shape(w, -1, -1, "dense_f32: weight");
        return w;
    }
    kernels::packed_weights_f32 w_;
};

/// Compression policy "no compression": pack the dense weight as it is.
struct dense {
    using format = dense_f32;
    static constexpr const char* name() noexcept { return "dense"; }
    static format compress(ConstMatrixView<float> dense_weight, const calibration* /*stats*/ = nullptr) {
        return format(dense_weight);
    }
};

static_assert(check_weight_format<dense_f32>());
static_assert(check_compression_policy<dense>());

}  // namespace cpet::compress
