// cpet/compress/quantized.hpp — quantized weights as a WeightFormat and the CompressionPolicy types that make them.
//
// A policy is spelled by types, one per choice that changes the code (STYLE.md "policies are types"):
//     compress::quantized<Bits, Granularity, Symmetry, Quantizer, Activations>
//       Bits        int8 | int4
//       Granularity per_tensor | per_channel | per_group<G>   (G: k per scale, a multiple of 8 dividing K)
//       Symmetry    symmetric | asymmetric
//       Quantizer   rtn (round to nearest, data-free) | gptq (Frantar et al. 2022; needs the input Hessian);
//                   rtn_with<Clip> / gptq_with<Clip, DampPerMille, Block> choose the clipping rule
//                   (clip_minmax, clip_percentile<PerMille>, clip_mse<Grid, MaxShrinkPercent>) and GPTQ's knobs
//       Activations activations_fp32 (weight-only: kernels::gemm_wq dequantises in the kernel, the exact path)
//                 | activations_int8 (dynamic per-token int8 activations: W8A8 through kernels::gemm_s8 for int8
//                   per-channel / per-tensor weights, W4A8 through kernels::gemm_w4a8 for int4 of any granularity)
//                 | activations_int8_smooth<α%> (the same after SmoothQuant: W·diag(s) quantised, x·diag(1/s) in the
//                   kernel's activation quantiser; needs calibration max |x|)
// and the usual ones have names: int8_per_channel, int4_g128, w8a8, w8a8_smooth, w4a8_g128, and _gptq twins.
//
// The format (quantized_format<Bits, Granularity, Symmetry, Activations>) holds formats::quantized_weights.
//   matmul : y = act(x·Ŵᵀ + bias + s·U·Bᵀ) + residual. Weight-only at M ≥ kernels::wq_blocked_rows runs the
//            fp32 GEMM's blocked loops over slices dequantised into L1, so the whole epilogue is applied on the
//            tile like the dense GEMM's. W8A8 (kernels::gemm_s8) applies bias, activation and residual on its
//            integer tiles too, when there is no low-rank term. The decode kernel (small M), W4A8 and W8A8 with a
//            low-rank term fuse only the bias; the rest is a second step over y: the low-rank term as one thin
//            GEMM added into y, then one SIMD pass (rows in parallel) for activation + residual
//            (kernels::gemm_detail::store_tile). MISSED FUSION there: one extra read + write of y (two with a
//            low-rank term); a residual aliasing y is saved first.
//   matmul_t: dx = dy·Ŵ, by dequantising 64-row blocks of Ŵ into a scratch tile and one Eigen GEMM per block
//            (exactly the values every kernel multiplies: s·(q − z) in fp32).
// The Activations choice is validated at compile time: int8 activations with group-wise int8 weights have no
// kernel (gemm_s8 needs one scale per row), so that combination is a static_assert with a sentence.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

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

/// How each scale's range is chosen (quant_options::clip), for either quantizer.
struct clip_minmax {
    static constexpr bool is_clipping = true;
    static std::string name() { return ""; }
    static void apply(quant_options&) {}
};
/// The PerMille/10-th percentile of |w| (symmetric) or of each tail (asymmetric): clip_percentile<999> is 99.9 %.
template <int PerMille>
struct clip_percentile {
    static_assert(PerMille > 0 && PerMille <= 1000, "cpet clip_percentile: PerMille must be in (0, 1000]");
    static constexpr bool is_clipping = true;
    static std::string name() {
        return "_p" + std::to_string(PerMille / 10) + (PerMille % 10 ? "." + std::to_string(PerMille % 10) : "");
    }
    static void apply(quant_options& o) {
        o.clip = clipping::percentile;
        o.percentile = PerMille / 10.0;
    }
};
/// The shrink of the min-max range with least squared error, over Grid steps down to (1 − MaxShrinkPercent/100).
template <int Grid = 100, int MaxShrinkPercent = 80>
struct clip_mse {
    static_assert(Grid > 0 && MaxShrinkPercent > 0 && MaxShrinkPercent < 100,
                  "cpet clip_mse: Grid must be positive and MaxShrinkPercent in (0, 100)");
    static constexpr bool is_clipping = true;
    static std::string name() {
        return Grid == 100 && MaxShrinkPercent == 80
                   ? std::string("_mse")
                   : "_mse" + std::to_string(Grid) + "s" + std::to_string(MaxShrinkPercent);
    }
    static void apply(quant_options& o) {
        o.clip = clipping::mse;
        o.mse_grid = Grid;
        o.mse_max_shrink = MaxShrinkPercent / 100.0;
    }
};

/// How the codes are chosen. Round to nearest: data-free, each group from its (clipped) range.
template <class Clip = clip_minmax>
struct rtn_with {
    static_assert(Clip::is_clipping, "cpet rtn_with: Clip must be clip_minmax, clip_percentile<P> or clip_mse<G, S>");
    static constexpr bool uses_hessian = false;
    static std::string name() { return "rtn" + Clip::name(); }
    static void apply(quant_options& o) { Clip::apply(o); }
};
/// GPTQ (Frantar et al. 2022) with damping λ = DampPerMille/1000 · mean(diag H) and lazy batches of Block columns;
/// Clip chooses each group's range as the columns reach it. Needs the input Hessian.
template <class Clip = clip_minmax, int DampPerMille = 10, int Block = 128>
struct gptq_with {
    static_assert(Clip::is_clipping, "cpet gptq_with: Clip must be clip_minmax, clip_percentile<P> or clip_mse<G, S>");
    static_assert(DampPerMille >= 0 && Block > 0, "cpet gptq_with: DampPerMille must be >= 0 and Block > 0");
    static constexpr bool uses_hessian = true;
    static std::string name() {
        std::string n = "gptq" + Clip::name();
        if (DampPerMille != 10) n += "_d" + std::to_string(DampPerMille);
        if (Block != 128) n += "_b" + std::to_string(Block);
        return n;
    }
    static void apply(quant_options& o) { Clip::apply(o); }
    static gptq_options knobs() {
        gptq_options g;
        g.percdamp = DampPerMille / 1000.0;
        g.block = Block;
        return g;
    }
};
using rtn = rtn_with<>;
using gptq = gptq_with<>;

/// Quantizer Q with its int8 codes kept pair-bounded (quant_options::pair_bound: |q| + |q'| ≤ 128 for each pair
/// of k a vpmaddubsw adds), so W8A8 on AVX2 CPUs without VNNI runs the exact u8 · s8 tile, 1.2–1.7× the signed one
/// (kernels/gemm_s8.hpp). Symmetric int8 only; costs about 1.3–1.4× the rounding step (the scale widens to the
/// largest pair). The format is unchanged: whether codes are pair-bounded is read from the codes themselves.
template <class Q>
struct pair_bounded : Q {
    static std::string name() { return Q::name() + "_pairs"; }
    static void apply(quant_options& o) {
        Q::apply(o);
        o.pair_bound = true;
    }
};

/// What the activations are multiplied as.
struct activations_fp32 {
    static constexpr const char* name() noexcept { return "a32"; }
};
struct activations_int8 {
    static constexpr const char* name() noexcept { return "a8"; }
};
/// int8 activations after SmoothQuant (Xiao et al. 2023): per input channel j, s_j = max|X_j|^α / max|W_:j|^(1−α)
/// (α = AlphaPercent / 100) from the calibration's max |x|; the weights are quantised as W·diag(s) and the kernel
/// multiplies x by 1/s before quantising it per token. Activation outliers move into the weights, where a
/// per-channel scale absorbs them. Needs calibration (format_error without).
template <int AlphaPercent = 50>
struct activations_int8_smooth {
    static_assert(AlphaPercent > 0 && AlphaPercent < 100, "cpet activations_int8_smooth: alpha must be in (0, 100)%");
    static constexpr double alpha = AlphaPercent / 100.0;
    static std::string name() { return "a8sq" + std::to_string(AlphaPercent); }
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
inline constexpr bool is_smooth_v = false;
template <int A>
inline constexpr bool is_smooth_v<activations_int8_smooth<A>> = true;
template <class T>
inline constexpr bool is_quantizer_v = false;
template <class C>
inline constexpr bool is_quantizer_v<rtn_with<C>> = true;
template <class C, int D, int B>
inline constexpr bool is_quantizer_v<gptq_with<C, D, B>> = true;
template <class Q>
inline constexpr bool is_quantizer_v<pair_bounded<Q>> = is_quantizer_v<Q>;
template <class T>
inline constexpr bool is_pair_bounded_v = false;
template <class Q>
inline constexpr bool is_pair_bounded_v<pair_bounded<Q>> = true;
template <class T>
inline constexpr bool is_activations_v =
    std::is_same_v<T, activations_fp32> || std::is_same_v<T, activations_int8> || is_smooth_v<T>;

/// SmoothQuant's factors s [K] for w [N, K] from the calibration's max |x| (see activations_int8_smooth). A channel
/// the data or the weights never exercise keeps s = 1; s is clamped to [1e-4, 1e4] so neither side overflows.
inline std::vector<float> smoothing_factors(ConstMatrixView<float> w, const calibration* stats, double alpha,
                                            std::string_view who) {
    const index_t N = w.rows(), K = w.cols();
    require<format_error>(stats != nullptr && !stats->max_abs.empty() && stats->samples > 0, who,
                          ": SmoothQuant needs calibration statistics (max |x| per input channel): collect them "
                          "with nn::calibrate / nn::compress on sample inputs");
    require<shape_error>(index_t(stats->max_abs.size()) == K, who, ": calibration has ", stats->max_abs.size(),
                         " channels, the weight has ", K, " inputs");
    std::vector<float> wmax(static_cast<std::size_t>(K), 0.f);
    for (index_t n = 0; n < N; ++n)
        for (index_t k = 0; k < K; ++k) wmax[std::size_t(k)] = std::max(wmax[std::size_t(k)], std::abs(w(n, k)));
    std::vector<float> s(static_cast<std::size_t>(K), 1.f);
    for (index_t k = 0; k < K; ++k) {
        const double xm = stats->max_abs[std::size_t(k)], wm = wmax[std::size_t(k)];
        require<numeric_error>(std::isfinite(xm) && xm >= 0, who, ": calibration max |x| of channel ", k, " is ", xm);
        if (xm > 0 && wm > 0)
            s[std::size_t(k)] = float(std::clamp(std::pow(xm, alpha) / std::pow(wm, 1.0 - alpha), 1e-4, 1e4));
    }
    return s;
}

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
    static_assert(!(!std::is_same_v<Act, activations_fp32> && Bits::bits == qbits::int8 &&
                    Gran::gran == granularity::per_group),
                  "cpet quantized_format: int8 activations with int8 weights need per_channel or per_tensor scales "
                  "(kernels::gemm_s8 has one scale per row); use activations_fp32 for group-wise int8");

public:
    using bits_type = Bits;
    using granularity_type = Gran;
    using symmetry_type = Sym;
    using activations_type = Act;
    static constexpr bool int8_activations = !std::is_same_v<Act, activations_fp32>;
    static constexpr bool smoothed = detail::is_smooth_v<Act>;

    /// The kernel matmul() runs (what a test asserts and a report prints).
    static constexpr const char* kernel() noexcept {
        if constexpr (!int8_activations) return "gemm_wq";
        else if constexpr (Bits::bits == qbits::int8) return "gemm_s8";
        else return "gemm_w4a8";
    }

    quantized_format() = default;
    /// Takes packed weights made with this format's bits, granularity and symmetry (format_error otherwise).
    /// A SmoothQuant format also takes the activation factors 1/s [in_features] (its weights hold W·diag(s)).
    explicit quantized_format(quantized_weights q, const std::vector<float>& act_scale = {}) : q_(std::move(q)) {
        if constexpr (smoothed) {
            require<format_error>(index_t(act_scale.size()) == q_.cols(), "quantized_format<", Act::name(),
                                  ">: needs ", q_.cols(), " activation factors (1/s), got ", act_scale.size());
            for (float v : act_scale)
                require<numeric_error>(std::isfinite(v) && v > 0.f, "quantized_format<", Act::name(),
                                       ">: activation factor ", v, " is not a positive finite number");
            act_scale_.reset(act_scale.size());
            std::copy(act_scale.begin(), act_scale.end(), act_scale_.data());
        } else {
            require<format_error>(act_scale.empty(), "quantized_format: activation factors given to a format "
                                  "without SmoothQuant (use activations_int8_smooth)");
        }
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
        kernels::check_lowrank(ep, x.rows(), out_features(), "quantized_format::matmul");
        arch::dispatch([&](auto tag) { matmul(tag, x, y, ep); });
    }

    /// The same on path `tag`, unchecked. (The int8-activation kernels have no tagged entry, so they dispatch
    /// once more inside; they pick the same path, the one the caller forced or detected.)
    template <class Arch>
    void matmul(Arch tag, ConstMatrixView<float> x, MatrixView<float> y, const kernels::epilogue& ep) const {
        if (x.rows() == 0 || out_features() == 0) return;
        const kernels::wq_weights w = kernel_view(q_);
        if constexpr (!int8_activations) {  // the blocked path (large M) applies the whole epilogue on the tile
            if (kernels::gemm_wq_fuses_epilogue(tag, x.rows())) return kernels::gemm_wq(tag, x, w, y, ep);
        } else if constexpr (Bits::bits == qbits::int8) {  // W8A8: all but a low-rank term on the integer tiles
            if (kernels::gemm_s8_fuses(ep, y)) return kernels::gemm_s8(x, w, y, ep, act_scale());
        }
        run_split_epilogue(tag, y, ep, [&](const float* bias) {
            if constexpr (!int8_activations) kernels::gemm_wq(tag, x, w, y, bias);
            else if constexpr (Bits::bits == qbits::int8) kernels::gemm_s8(x, w, y, bias, act_scale());
            else kernels::gemm_w4a8(x, w, y, bias, act_scale());
        });
    }

    /// dx [M, in] = dy [M, out]·Ŵ.
    void matmul_t(ConstMatrixView<float> dy, MatrixView<float> dx) const {
        check_shape(dy, -1, out_features(), "quantized_format::matmul_t: dy");
        check_shape(dx, dy.rows(), in_features(), "quantized_format::matmul_t: dx");
        const index_t M = dy.rows(), N = out_features(), K = in_features();
        if (M == 0 || K == 0) return;
        // 256 rows of Ŵ dequantised at a time (never the whole dense matrix), each block's product with the
        // fp32 GEMM (kernels::gemm_f32_t_rows), the blocks' sum accumulated in dx
        constexpr index_t block = 256;
        float* tile = detail::quantized_scratch(1, static_cast<std::size_t>(block * K));
        for (index_t n0 = 0; n0 < N; n0 += block) {
            const index_t nb = std::min(block, N - n0);
            for (index_t r = 0; r < nb; ++r)
                for (index_t c = 0; c < K; ++c) tile[r * K + c] = q_.value(n0 + r, c);
            kernels::gemm_f32_t_rows(dy.middle_cols(n0, nb), ConstMatrixView<float>(tile, nb, K, K), dx, n0 > 0);
        }
        if constexpr (smoothed)
            for (index_t m = 0; m < M; ++m)
                for (index_t k = 0; k < K; ++k) dx(m, k) *= act_scale_[std::size_t(k)];
    }

    /// The weight the format multiplies x by: s·(q − z), times diag(1/s) after SmoothQuant.
    Matrix<float> to_dense() const {
        Matrix<float> w = dequantize(q_);
        if constexpr (smoothed)
            for (index_t n = 0; n < w.rows(); ++n)
                for (index_t k = 0; k < w.cols(); ++k) w(n, k) *= act_scale_[std::size_t(k)];
        return w;
    }
    std::size_t bytes() const noexcept { return q_.bytes() + act_scale_.size() * sizeof(float); }
    const quantized_weights& weights() const noexcept { return q_; }
    /// SmoothQuant's 1/s [in_features] (null without SmoothQuant).
    const float* act_scale() const noexcept { return act_scale_.empty() ? nullptr : act_scale_.data(); }

private:
    quantized_weights q_;
    aligned_buffer<float> act_scale_;
};

// ---- the policies -----------------------------------------------------------------------------------------

/// Compression policy: quantise one linear with Quantizer into quantized_format<Bits, Gran, Sym, Act>.
/// RTN ignores calibration; GPTQ needs the input Hessian (calibration::hessian, Σ xᵀx over the calibration
/// tokens — its scale does not matter, the damping is relative) and throws format_error without one.
template <class Bits, class Gran, class Sym = symmetric, class Quantizer = rtn, class Act = activations_fp32>
struct quantized {
    static_assert(detail::is_quantizer_v<Quantizer>,
                  "cpet quantized: Quantizer must be compress::rtn, rtn_with<Clip>, gptq or gptq_with<Clip, Damp, Block> "
                  "(or pair_bounded<one of them>)");
    static_assert(!detail::is_pair_bounded_v<Quantizer> || (Bits::bits == qbits::int8 && Sym::value),
                  "cpet quantized: pair_bounded<Q> applies to symmetric int8 weights only");
    using format = quantized_format<Bits, Gran, Sym, Act>;
    static constexpr bool needs_hessian = Quantizer::uses_hessian;

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
        Quantizer::apply(o);
        return o;
    }

    static format compress(ConstMatrixView<float> dense_weight, const calibration* stats = nullptr) {
        if constexpr (needs_hessian)
            require<format_error>(stats != nullptr && stats->has_hessian(), "compress::quantized<", name(),
                                  ">: GPTQ needs calibration statistics with the input Hessian (collect them on a "
                                  "calibration set and pass an nn::layer_calibration), or use the rtn quantizer");
        if constexpr (format::smoothed) {
            // W' = W·diag(s) is quantised; x' = x·diag(1/s) in the kernel; GPTQ sees the Hessian of x',
            // diag(1/s)·H·diag(1/s).
            const std::vector<float> s = detail::smoothing_factors(dense_weight, stats, Act::alpha,
                                                                   "compress::quantized");
            const index_t N = dense_weight.rows(), K = dense_weight.cols();
            Matrix<float> ws(N, K);
            for (index_t n = 0; n < N; ++n)
                for (index_t k = 0; k < K; ++k) ws(n, k) = dense_weight(n, k) * s[std::size_t(k)];
            std::vector<float> inv(s.size());
            for (std::size_t k = 0; k < s.size(); ++k) inv[k] = 1.f / s[k];
            if constexpr (!needs_hessian) {
                return format(quantize_rtn(ws, options()), inv);
            } else {
                Eigen::MatrixXd h = as_eigen(stats->hessian.view());
                const Eigen::VectorXd d = Eigen::Map<const Eigen::VectorXf>(inv.data(), K).cast<double>();
                h = d.asDiagonal() * h * d.asDiagonal();
                return format(quantize_gptq_hessian(ws, h, options(), Quantizer::knobs()), inv);
            }
        } else if constexpr (!needs_hessian) {
            return format(quantize_rtn(dense_weight, options()));
        } else {
            const ConstMatrixView<double> h = stats->hessian.view();
            return format(quantize_gptq_hessian(dense_weight, as_eigen(h), options(), Quantizer::knobs()));
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
/// W8A8 with pair-bounded codes: exact and 1.2–1.7× faster on AVX2 CPUs without VNNI, a little less precise.
struct w8a8_pairs : quantized<int8, per_channel, symmetric, pair_bounded<rtn>, activations_int8> {
    static constexpr const char* name() noexcept { return "w8a8_pairs"; }
};
/// W8A8 with SmoothQuant (α = 0.5); needs calibration max |x|.
struct w8a8_smooth : quantized<int8, per_channel, symmetric, rtn, activations_int8_smooth<50>> {
    static constexpr const char* name() noexcept { return "w8a8_smooth"; }
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
static_assert(check_compression_policy<w8a8_smooth>());
static_assert(check_compression_policy<w8a8_pairs>());
static_assert(check_compression_policy<quantized<int8, per_channel, symmetric, pair_bounded<gptq>, activations_int8>>());
static_assert(check_compression_policy<int8_per_channel_gptq>());
static_assert(check_compression_policy<int4_g128_gptq>());
static_assert(check_compression_policy<quantized<int8, per_tensor, asymmetric, rtn>>());
static_assert(check_compression_policy<quantized<int4, per_group<64>, symmetric, rtn_with<clip_mse<>>>>());
static_assert(check_compression_policy<quantized<int8, per_channel, symmetric, gptq_with<clip_percentile<999>, 50, 64>>>());

}  // namespace cpet::compress
