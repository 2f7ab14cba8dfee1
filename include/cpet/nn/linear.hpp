// cpet/nn/linear.hpp — a linear layer y = x·Wᵀ + b over any weight format.
#pragma once

#include <utility>
#include <vector>

#include "cpet/compress/format.hpp"
#include "cpet/core/buffer.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/kernels/gemm_f32.hpp"

namespace cpet::nn {

template <compress::WeightFormat Format>
class Linear {
public:
    using format_type = Format;

    Linear() = default;
    /// `bias` has out_features values or is empty (no bias).
    explicit Linear(Format w, const std::vector<float>& bias = {}, const char* name = "Linear")
        : w_(std::move(w)) {
        const auto n = static_cast<index_t>(bias.size());
        require<shape_error>(n == 0 || n == w_.out_features(), name, ": bias has ", n, " values, expected ",
                             w_.out_features(), " (out_features) or none");
        if (n) {
            bias_.reset(bias.size());
            for (std::size_t i = 0; i < bias.size(); ++i) bias_[i] = bias[i];
        }
    }

    index_t in_features() const noexcept { return w_.in_features(); }
    index_t out_features() const noexcept { return w_.out_features(); }
    const Format& weight() const noexcept { return w_; }
    const float* bias() const noexcept { return bias_.empty() ? nullptr : bias_.data(); }
    std::size_t bytes() const noexcept { return w_.bytes() + bias_.size() * sizeof(float); }

    /// y [M, out] = ep(x [M, in]·Wᵀ + b): `ep` brings activation, residual and low-rank term; the bias is ours.
    void forward(ConstMatrixView<float> x, MatrixView<float> y, kernels::epilogue ep = {}) const {
        ep.bias = bias();
        w_.matmul(x, y, ep);
    }
    /// The same on path `tag`, unchecked.
    template <class Arch>
    void forward(Arch tag, ConstMatrixView<float> x, MatrixView<float> y, kernels::epilogue ep) const {
        ep.bias = bias();
        compress::matmul_on(tag, w_, x, y, ep);
    }

private:
    Format w_;
    aligned_buffer<float> bias_;
};

}  // namespace cpet::nn
