// cpet/train/clip.hpp — what happens to the gradients between the backward and the optimizer step: the global
// norm and clipping to it (torch.nn.utils.clip_grad_norm_), the finiteness check, scaling (accumulation).
//
// The norm sums squares in double, one tensor after another in order, so it is exact to double rounding and the
// same on every run; torch sums in float, which differs from it by float rounding only.
#pragma once

#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>

#include "cpet/core/error.hpp"
#include "cpet/train/parameter.hpp"

namespace cpet::train {

/// The L2 norm of all gradients together.
inline double grad_norm(std::span<const parameter> ps) noexcept {
    double sq = 0;
    for (const auto& p : ps) {
        double t = 0;
        for (const float g : p.grad) t += static_cast<double>(g) * static_cast<double>(g);
        sq += t;
    }
    return std::sqrt(sq);
}

/// Index of the first parameter whose gradient holds a NaN or an infinity, or ps.size() when all are finite.
inline std::size_t first_nonfinite_grad(std::span<const parameter> ps) noexcept {
    for (std::size_t i = 0; i < ps.size(); ++i) {
        // NaN and the infinities are the floats whose exponent bits are all ones; an integer OR-reduction over
        // that test vectorises without fast-math (a float reduction would not).
        std::uint32_t bad = 0;
        for (const float g : ps[i].grad)
            bad |= static_cast<std::uint32_t>((std::bit_cast<std::uint32_t>(g) & 0x7f800000u) == 0x7f800000u);
        if (bad) return i;
    }
    return ps.size();
}

/// Whether every gradient is finite.
inline bool all_finite(std::span<const parameter> ps) noexcept { return first_nonfinite_grad(ps) == ps.size(); }

/// Multiplies every gradient by `s` (1/k after k accumulated micro-batches whose losses were means).
inline void scale_grads(std::span<const parameter> ps, float s) noexcept {
    for (const auto& p : ps)
        for (float& g : p.grad) g *= s;
}

/// torch.nn.utils.clip_grad_norm_: when the global norm exceeds max_norm, scales every gradient by
/// max_norm / (norm + 1e-6); returns the norm before clipping. A non-finite norm is returned and nothing is
/// scaled (torch would scale by NaN; the trainer stops before that).
inline double clip_grad_norm(std::span<const parameter> ps, double max_norm) {
    require<shape_error>(max_norm > 0 && std::isfinite(max_norm), "clip_grad_norm: max_norm must be finite and > 0, got ",
                         max_norm);
    const double norm = grad_norm(ps);
    if (!std::isfinite(norm)) return norm;
    const double coef = max_norm / (norm + 1e-6);
    if (coef < 1.0) scale_grads(ps, static_cast<float>(coef));
    return norm;
}

}  // namespace cpet::train
