// cpet/compress/policy.hpp — the CompressionPolicy concept: a type that turns one dense weight into a format.
//
// Policies are types because they change the code (the format and its kernel); their parameters that do not
// (group size where it need not be static, calibration data) are values. A policy compresses one linear at a
// time: `compress(W [out, in], stats)` with the statistics of that linear's input (null when the method is
// data-free). Structured pruning (heads, neurons) does not fit this shape: it changes the shapes of several
// linears together, so it will be a whole-layer transform returning a smaller dense layer plus the index maps of
// what was kept, applied before a per-linear policy — not a CompressionPolicy.
#pragma once

#include <concepts>
#include <string_view>

#include "cpet/compress/calibration.hpp"
#include "cpet/compress/format.hpp"

namespace cpet::compress {

template <class P>
concept CompressionPolicy = requires(ConstMatrixView<float> w, const calibration* stats) {
    typename P::format;
    requires WeightFormat<typename P::format>;
    { P::compress(w, stats) } -> std::same_as<typename P::format>;
    { P::name() } -> std::convertible_to<std::string_view>;
};

/// Whether P's compress() needs calibration::hessian (Σ xᵀx): a policy says so with
/// `static constexpr bool needs_hessian = true` (GPTQ); nn::compress then collects it.
template <class P>
constexpr bool needs_hessian() noexcept {
    if constexpr (requires { { P::needs_hessian } -> std::convertible_to<bool>; })
        return P::needs_hessian;
    else
        return false;
}

/// `static_assert(check_compression_policy<P>())` for a readable error.
template <class P>
constexpr bool check_compression_policy() {
    static_assert(requires { typename P::format; },
                  "cpet CompressionPolicy: missing `using format = ...` (the WeightFormat it produces)");
    if constexpr (requires { typename P::format; }) {
        static_assert(check_weight_format<typename P::format>());
        static_assert(requires(ConstMatrixView<float> w, const calibration* s) {
            { P::compress(w, s) } -> std::same_as<typename P::format>;
        }, "cpet CompressionPolicy: missing `static format compress(ConstMatrixView<float> dense_weight, "
           "const compress::calibration* stats)`");
        static_assert(requires {
            { P::name() } -> std::convertible_to<std::string_view>;
        }, "cpet CompressionPolicy: missing `static constexpr const char* name()`");
    }
    return CompressionPolicy<P>;
}

}  // namespace cpet::compress
