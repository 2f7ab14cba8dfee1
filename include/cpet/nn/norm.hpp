// cpet/nn/norm.hpp — the normalisation of a layer (LayerNorm with gamma/beta, or RMSNorm with gamma).
#pragma once

#include <vector>

#include "cpet/core/buffer.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/kernels/norms.hpp"
#include "cpet/nn/config.hpp"

namespace cpet::nn {

template <norm_kind Kind>
class Norm {
public:
    Norm() = default;
    Norm(const std::vector<float>& gamma, const std::vector<float>& beta, float eps) : eps_(eps) {
        copy(gamma, gamma_);
        if constexpr (Kind == norm_kind::layernorm) copy(beta, beta_);
    }

    index_t features() const noexcept { return static_cast<index_t>(gamma_.size()); }
    /// Copies of the parameters (beta empty for RMSNorm), e.g. to rebuild a layer around merged weights.
    std::vector<float> gamma() const { return {gamma_.begin(), gamma_.end()}; }
    std::vector<float> beta() const { return {beta_.begin(), beta_.end()}; }
    float eps() const noexcept { return eps_; }

    /// y = norm(x) row by row on path `tag`; y may alias x. Unchecked.
    template <class Arch>
    void apply(Arch tag, ConstMatrixView<float> x, MatrixView<float> y) const {
        if constexpr (Kind == norm_kind::layernorm)
            kernels::layernorm(tag, x, ptr(gamma_), ptr(beta_), eps_, y);
        else
            kernels::rmsnorm(tag, x, ptr(gamma_), eps_, y);
    }
    /// LayerNorm with `beta` [features] in place of the layer's own β (a task's tuned β, BitFit); unchecked.
    template <class Arch>
    void apply(Arch tag, ConstMatrixView<float> x, MatrixView<float> y, const float* beta) const
        requires(Kind == norm_kind::layernorm)
    {
        kernels::layernorm(tag, x, ptr(gamma_), beta, eps_, y);
    }
    /// The layer's β (null for RMSNorm or when absent).
    const float* beta_data() const noexcept { return ptr(beta_); }
    /// Checked, on the active path.
    void apply(ConstMatrixView<float> x, MatrixView<float> y) const {
        check_shape(x, -1, features(), "Norm: x");
        if constexpr (Kind == norm_kind::layernorm)
            kernels::layernorm(x, ptr(gamma_), ptr(beta_), eps_, y);
        else
            kernels::rmsnorm(x, ptr(gamma_), eps_, y);
    }

private:
    static void copy(const std::vector<float>& v, aligned_buffer<float>& out) {
        out.reset(v.size());
        for (std::size_t i = 0; i < v.size(); ++i) out[i] = v[i];
    }
    static const float* ptr(const aligned_buffer<float>& b) noexcept { return b.empty() ? nullptr : b.data(); }

    aligned_buffer<float> gamma_, beta_;
    float eps_ = 1e-5f;
};

}  // namespace cpet::nn
