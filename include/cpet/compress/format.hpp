// cpet/compress/format.hpp — the WeightFormat concept: what every packed weight of a linear layer must offer.
//
// A format owns a weight W [out, in] (torch.nn.Linear layout) in whatever packed layout its kernel wants, packed
// once when the format is built. The layers above never look inside: they need the shape, the forward product
// with the GEMM epilogue fused in (so bias, activation, residual and a PET low-rank term cost no extra pass over
// y), the product with W itself for backward passes through a frozen weight, a dense copy (for inheritance,
// recovery initialisation and tests) and its size (for compression reports).
#pragma once

#include <concepts>
#include <cstddef>

#include "cpet/core/matrix.hpp"
#include "cpet/kernels/epilogue.hpp"

namespace cpet::compress {

/// A model of WeightFormat provides, for its weight W [out, in]:
///   out_features(), in_features()         the shape;
///   matmul(x [M,in], y [M,out], ep)       y = ep(x·Wᵀ)  (kernels::epilogue: bias, activation, low-rank, residual);
///   matmul_t(dy [M,out], dx [M,in])       dx = dy·W     (backward through the frozen weight);
///   to_dense()                            W as Matrix<float> [out, in];
///   bytes()                               bytes of the packed representation.
/// Optionally `template <class Arch> matmul(Arch, x, y, ep)`: the unchecked body on one ISA path, which lets a
/// layer dispatch once per call (see matmul_on).
template <class F>
concept WeightFormat = std::movable<F> && requires(const F& f, ConstMatrixView<float> x, MatrixView<float> y,
                                                   const kernels::epilogue& ep) {
    { f.out_features() } -> std::convertible_to<index_t>;
    { f.in_features() } -> std::convertible_to<index_t>;
    f.matmul(x, y, ep);
    f.matmul_t(x, y);
    { f.to_dense() } -> std::same_as<Matrix<float>>;
    { f.bytes() } -> std::convertible_to<std::size_t>;
};

/// `static_assert(check_weight_format<F>())` names the first missing member instead of printing a concept trace.
template <class F>
constexpr bool check_weight_format() {
    static_assert(std::movable<F>, "cpet WeightFormat: the format must be movable");
    static_assert(requires(const F& f) {
        { f.out_features() } -> std::convertible_to<index_t>;
    }, "cpet WeightFormat: missing `index_t out_features() const`");
    static_assert(requires(const F& f) {
        { f.in_features() } -> std::convertible_to<index_t>;
    }, "cpet WeightFormat: missing `index_t in_features() const`");
    static_assert(requires(const F& f, ConstMatrixView<float> x, MatrixView<float> y, const kernels::epilogue& ep) {
        f.matmul(x, y, ep);
    }, "cpet WeightFormat: missing `void matmul(ConstMatrixView<float> x, MatrixView<float> y, "
       "const kernels::epilogue&) const` (y = epilogue(x·Wᵀ))");
    static_assert(requires(const F& f, ConstMatrixView<float> dy, MatrixView<float> dx) { f.matmul_t(dy, dx); },
                  "cpet WeightFormat: missing `void matmul_t(ConstMatrixView<float> dy, MatrixView<float> dx) const` "
                  "(dx = dy·W)");
    static_assert(requires(const F& f) {
        { f.to_dense() } -> std::same_as<Matrix<float>>;
    }, "cpet WeightFormat: missing `Matrix<float> to_dense() const` ([out, in])");
    static_assert(requires(const F& f) {
        { f.bytes() } -> std::convertible_to<std::size_t>;
    }, "cpet WeightFormat: missing `std::size_t bytes() const`");
    return WeightFormat<F>;
}

/// y = ep(x·Wᵀ) on the path `tag` without re-dispatching when the format has a tagged body, through its checked
/// matmul otherwise. Callers have checked the shapes.
template <class Arch, WeightFormat F>
void matmul_on(Arch tag, const F& f, ConstMatrixView<float> x, MatrixView<float> y, const kernels::epilogue& ep) {
    if constexpr (requires { f.matmul(tag, x, y, ep); })
        f.matmul(tag, x, y, ep);
    else
        f.matmul(x, y, ep);
}

}  // namespace cpet::compress
