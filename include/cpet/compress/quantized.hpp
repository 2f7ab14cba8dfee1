// cpet/compress/quantized.hpp — quantized weights as a WeightFormat and the CompressionPolicy types that make them.
//
// A policy is spelled by types, one per choice that changes the code (STYLE.md "policies are types"):
//     compress::quantized<Bits, Granularity, Symmetry, Quantizer, Activations>
//       Bits        int8 | int4
//       Granularity per_tensor | per_channel | per_group<G>   (G: k per scale, a multiple of 8 dividing K)
//       Symmetry    symmetric | asymmetric
//       Quantizer   rtn (round to nearest, data-free) | gptq (Frantar et al. 2022; needs the input Hessian)
//       Activations activations_fp32 (weight-only: kernels::gemm_wq dequantises in the kernel, the exact path)
//                 | activations_int8 (dynamic per-token int8 activations: W8A8 through kernels::gemm_s8 for int8
//                   per-channel / per-tensor weights, W4A8 through kernels::gemm_w4a8 for int4 of any granularity)
// and the usual ones have names: int8_per_channel, int4_g128, w8a8, w4a8_g128 and their _gptq twins.
//
// The format (quantized_format<Bits, Granularity, Symmetry, Activations>) holds formats::quantized_weights.
//   matmul : y = act(x·Ŵᵀ + bias + s·U·Bᵀ) + residual. The quantized kernels fuse only the bias, so the rest of
//            the epilogue is a second step over y: the low-rank term as one thin GEMM added into y, then one
//            SIMD pass for activation + residual (kernels::gemm_detail::store_tile, the fp32 GEMM's own tile
//            epilogue). MISSED FUSION: the fp32 GEMM applies all of it on the tile while it is in registers;
//            here it costs one extra read + write of y (two with a low-rank term). When the residual aliases y
//            (in-place residual add, as the layer does) it is saved first — a third copy, only in that case.
//   matmul_t: dx = dy·Ŵ, by dequantising 64-row blocks of Ŵ into a scratch tile and one Eigen GEMM per block
//            (exactly the values every kernel multiplies: s·(q − z) in fp32).
// The Activations choice is validated at compile time: int8 activations with group-wise int8 weights have no
// kernel (gemm_s8 needs one scale per row), so that combination is a static_assert with a sentence.
#pragma once

#include <algorithm>
#include <cstddef>
#include <string>
#include <string_view>
#include <type_traits>

#include <Eigen/Core>

#include "cpet/arch/dispatch.hpp"
#include "cpet/compress/calibration.hpp"
#include "cpet/compress/format.hpp"
#include "cpet/compress/formats/quantized.hpp"
#include "cpet/compress/policy.hpp"
#include "cpet/compress/quantize.hpp"
#include "cpet/compress/split_epilogue.hpp"
#include "cpet/core/buffer.hpp"
#include "cpet/core/eigen.hpp"
#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/kernels/gemm_f32.hpp"
#include "cpet/kernels/gemm_s8.hpp"
#include "cpet/kernels/gemm_wq.hpp"

namespace cpet::compress {

// ---- the choices, as types --------------------------------------------------------------------------------

/// Bits per weight.
struct int8 {
    static constexpr qbits bits = qbits::int8;
    static constexpr const char* name() noexcept { return "int8"; }
};
struct int4 {
    static constexpr qbits bits = qbits::int4;
    static constexpr const char* name() noexcept { return "int4"; }
};

/// Which weights share a scale.
struct per_tensor {
    static constexpr granularity gran = granularity::per_tensor;
    static constexpr index_t group = 0;
    static std::string name() { return "per_tensor"; }
};
struct per_channel {
    static constexpr granularity gran = granularity::per_channel;
    static constexpr index_t group = 0;
    static std::string name() { return "per_channel"; }
};
/// G consecutive inputs of one output row share a scale (G a multiple of 8 dividing K; checked when packing).
template <index_t G>
struct per_group {
    static_assert(G > 0 && G % 8 == 0, "cpet per_group<G>: G must be a positive multiple of 8 (32, 64, 128 usual)");
    static constexpr granularity gran = granularity::per_group;
    static constexpr index_t group = G;
    static std::string name() {
        std::string r("g");
        r.append(std::to_string(G));
        return r;
    }
};

/// Zero point or not.
struct symmetric {
    static constexpr bool value = true;
    static constexpr const char* name() noexcept { return "sym"; }
};
struct asymmetric {
    static constexpr bool value = false;
    static constexpr const char* name() noexcept { return "asym"; }
};

/// How the codes are chosen.
struct rtn {
    static constexpr const char* name() noexcept { return "rtn"; }
};
struct gptq {
    static constexpr const char* name() noexcept { return "gptq"; }
};

/// What the activations are multiplied as.
struct activations_fp32 {
    static constexpr const char* name() noexcept { return "a32"; }
};
struct activations_int8 {
    static constexpr const char* name() noexcept { return "a8"; }
};

namespace detail {

template <class T>
inline constexpr bool is_bits_v = std::is_same_v<T, int8> || std::is_same_v<T, int4>;
template <class T>
inline constexpr bool is_granularity_v = requires {
    { T::gran } -> std::convertible_to<granularity>;
    { T::group } -> std::convertible_to<index_t>;
};
template <class T>
inline constexpr bool is_symmetry_v = std::is_same_v<T, symmetric> || std::is_same_v<T, asymmetric>;
template <class T>
inline constexpr bool is_activations_v = std::is_same_v<T, activations_fp32> || std::is_same_v<T, activations_int8>;

/// Grows-only per-thread scratch for the epilogue and matmul_t (no allocation per call after warm-up).
inline float* quantized_scratch(int slot, std::size_t n) {
    thread_local aligned_buffer<float> buf[2];
    if (buf[slot].size() < n) buf[slot].reset(n);
    return buf[slot].data();
}

}  // namespace detail

// ---- the format -------------------------------------------------------------------------------------------

template <class Bits, class Gran, class Sym = symmetric, class Act = activations_fp32>
class quantized_format {
    static_assert(detail::is_bits_v<Bits>, "cpet quantized_format: Bits must be compress::int8 or compress::int4");
    static_assert(detail::is_granularity_v<Gran>,
                  "cpet quantized_format: Granularity must be per_tensor, per_channel or per_group<G>");
    static_assert(detail::is_symmetry_v<Sym>, "cpet quantized_format: Symmetry must be symmetric or asymmetric");
    static_assert(detail::is_activations_v<Act>,
                  "cpet quantized_format: Activations must be activations_fp32 or activations_int8");
    static_assert(!(std::is_same_v<Act, activations_int8> && Bits::bits == qbits::int8 &&
                    Gran::gran == granularity::per_group),
                  "cpet quantized_format: int8 activations with int8 weights need per_channel or per_tensor scales "
                  "(kernels::gemm_s8 has one scale per row); use activations_fp32 for group-wise int8");

public:
    using bits_type = Bits;
    using granularity_type = Gran;
    using symmetry_type = Sym;
    using activations_type = Act;
    static constexpr bool int8_activations = std::is_same_v<Act, activations_int8>;

    /// The kernel matmul() runs (what a test asserts and a report prints).
    static constexpr const char* kernel() noexcept {
        if constexpr (!int8_activations) return "gemm_wq";
        else if constexpr (Bits::bits == qbits::int8) return "gemm_s8";
        else return "gemm_w4a8";
    }

    quantized_format() = default;
    /// Takes packed weights made with this format's bits, granularity and symmetry (format_error otherwise).
    explicit quantized_format(quantized_weights q) : q_(std::move(q)) {
        require<format_error>(!q_.empty(), "quantized_format: empty quantized weights");
        require<format_error>(q_.bits() == Bits::bits, "quantized_format<", Bits::name(), ">: weights hold ",
                              static_cast<int>(q_.bits()), "-bit codes");
        require<format_error>(q_.gran() == Gran::gran, "quantized_format<", Gran::name(),
                              ">: weights have another granularity");
        if constexpr (Gran::gran == granularity::per_group)
            require<format_error>(q_.group() == Gran::group, "quantized_format<", Gran::name(), ">: weights use groups of ",
                                  q_.group());
        require<format_error>(q_.symmetric() == Sym::value, "quantized_format<", Sym::name(),
                              ">: weights have the other symmetry");
    }

    index_t out_features() const noexcept { return q_.rows(); }
    index_t in_features() const noexcept { return q_.cols(); }

    /// y [M, out] = ep(x [M, in]·Ŵᵀ) on the active path; throws shape_error on mismatched operands.
    void matmul(ConstMatrixView<float> x, MatrixView<float> y, const kernels::epilogue& ep) const {
        check_shape(x, -1, in_features(), "quantized_format::matmul: x");
        check_shape(y, x.rows(), out_features(), "quantized_format::matmul: y");
        if (ep.residual)
            require<shape_error>(ep.ld_residual >= out_features() || x.rows() <= 1,
                                 "quantized_format::matmul: residual row stride ", ep.ld_residual, " < ",
                                 out_features());
        if (ep.rank > 0)
            require<shape_error>(ep.lowrank_u && ep.lowrank_b && ep.ld_u >= ep.rank && ep.ld_b >= ep.rank,
                                 "quantized_format::matmul: low-rank term of rank ", ep.rank,
                                 " needs U and B with row strides >= rank");
        arch::dispatch([&](auto tag) { matmul(tag, x, y, ep); });
    }

    /// The same on path `tag`, unchecked. (The int8-activation kernels have no tagged entry, so they dispatch
    /// once more inside; they pick the same path, the one the caller forced or detected.)
    template <class Arch>
    void matmul(Arch tag, ConstMatrixView<float> x, MatrixView<float> y, const kernels::epilogue& ep) const {
        if (x.rows() == 0 || out_features() == 0) return;
        const kernels::wq_weights w = kernel_view(q_);
        run_split_epilogue(tag, y, ep, [&](const float* bias) {
            if constexpr (!int8_activations) kernels::gemm_wq(tag, x, w, y, bias);
            else if constexpr (Bits::bits == qbits::int8) kernels::gemm_s8(x, w, y, bias);
            else kernels::gemm_w4a8(x, w, y, bias);
        });
    }

    /// dx [M, in] = dy [M, out]·Ŵ.
    void matmul_t(ConstMatrixView<float> dy, MatrixView<float> dx) const {
        check_shape(dy, -1, out_features(), "quantized_format::matmul_t: dy");
        check_shape(dx, dy.rows(), in_features(), "quantized_format::matmul_t: dx");
        const index_t M = dy.rows(), N = out_features(), K = in_features();
        if (M == 0 || K == 0) return;
        auto out = as_eigen(dx);
        out.setZero();
        constexpr index_t block = 64;  // 64 rows × K floats: 768 KiB at K = 3072, an L2-sized tile
        float* tile = detail::quantized_scratch(1, static_cast<std::size_t>(block * K));
        for (index_t n0 = 0; n0 < N; n0 += block) {
            const index_t nb = std::min(block, N - n0);
            for (index_t r = 0; r < nb; ++r)
                for (index_t c = 0; c < K; ++c) tile[r * K + c] = q_.value(n0 + r, c);
            EigenConstMap<float> t(tile, nb, K, Eigen::OuterStride<>(K));
            out.noalias() += as_eigen(dy.middle_cols(n0, nb)) * t;
        }
    }

    Matrix<float> to_dense() const { return dequantize(q_); }
    std::size_t bytes() const noexcept { return q_.bytes(); }
    const quantized_weights& weights() const noexcept { return q_; }

private:
    quantized_weights q_;
};

// ---- the policies -----------------------------------------------------------------------------------------

/// Compression policy: quantise one linear with Quantizer into quantized_format<Bits, Gran, Sym, Act>.
/// RTN ignores calibration; GPTQ needs the input Hessian (calibration::hessian, Σ xᵀx over the calibration
/// tokens — its scale does not matter, the damping is relative) and throws format_error without one.
template <class Bits, class Gran, class Sym = symmetric, class Quantizer = rtn, class Act = activations_fp32>
struct quantized {
    static_assert(std::is_same_v<Quantizer, rtn> || std::is_same_v<Quantizer, gptq>,
                  "cpet quantized: Quantizer must be compress::rtn or compress::gptq");
    using format = quantized_format<Bits, Gran, Sym, Act>;

    static std::string_view name() {
        static const std::string n = [] {
            std::string r(Bits::name());
            for (const std::string& part : {std::string(Gran::name()), std::string(Sym::name()),
                                            std::string(Quantizer::name()), std::string(Act::name())})
                r.append("_").append(part);
            return r;
        }();
        return n;
    }

    static quant_options options() {
        quant_options o;
        o.bits = Bits::bits;
        o.gran = Gran::gran;
        o.group = Gran::gran == granularity::per_group ? Gran::group : 128;
        o.symmetric = Sym::value;
        return o;
    }

    static format compress(ConstMatrixView<float> dense_weight, const calibration* stats = nullptr) {
        if constexpr (std::is_same_v<Quantizer, rtn>) {
            return format(quantize_rtn(dense_weight, options()));
        } else {
            require<format_error>(stats != nullptr && stats->has_hessian(), "compress::quantized<", name(),
                                  ">: GPTQ needs calibration statistics with the input Hessian (collect them on a "
                                  "calibration set and pass an nn::layer_calibration), or use the rtn quantizer");
            const ConstMatrixView<double> h = stats->hessian.view();
            return format(quantize_gptq_hessian(dense_weight, as_eigen(h), options()));
        }
    }
};

/// The usual ones.
struct int8_per_channel : quantized<int8, per_channel, symmetric, rtn> {
    static constexpr const char* name() noexcept { return "int8_per_channel"; }
};
struct int4_g128 : quantized<int4, per_group<128>, symmetric, rtn> {
    static constexpr const char* name() noexcept { return "int4_g128"; }
};
struct w8a8 : quantized<int8, per_channel, symmetric, rtn, activations_int8> {
    static constexpr const char* name() noexcept { return "w8a8"; }
};
struct w4a8_g128 : quantized<int4, per_group<128>, symmetric, rtn, activations_int8> {
    static constexpr const char* name() noexcept { return "w4a8_g128"; }
};
struct int8_per_channel_gptq : quantized<int8, per_channel, symmetric, gptq> {
    static constexpr const char* name() noexcept { return "int8_per_channel_gptq"; }
};
struct int4_g128_gptq : quantized<int4, per_group<128>, symmetric, gptq> {
    static constexpr const char* name() noexcept { return "int4_g128_gptq"; }
};

static_assert(check_weight_format<quantized_format<int8, per_channel>>());
static_assert(check_weight_format<quantized_format<int4, per_group<128>>>());
static_assert(check_weight_format<quantized_format<int8, per_channel, symmetric, activations_int8>>());
static_assert(check_weight_format<quantized_format<int4, per_group<64>, asymmetric, activations_int8>>());
static_assert(check_compression_policy<int8_per_channel>());
static_assert(check_compression_policy<int4_g128>());
static_assert(check_compression_policy<w8a8>());
static_assert(check_compression_policy<w4a8_g128>());
static_assert(check_compression_policy<int8_per_channel_gptq>());
static_assert(check_compression_policy<int4_g128_gptq>());
static_assert(check_compression_policy<quantized<int8, per_tensor, asymmetric, rtn>>());

}  // namespace cpet::compress
