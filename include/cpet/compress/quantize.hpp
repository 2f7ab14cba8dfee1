// cpet/compress/quantize.hpp — weight quantizers (round-to-nearest and GPTQ) into formats::quantized_weights,
// dequantize() back to dense, and matmul() that runs the packed weights through the integer kernels.
//
//   RTN : each group's scale / zero point from its range (min-max, a percentile of the values, or the range
//         shrink factor that minimises the squared quantisation error — GPTQ's `mse` search), then round.
//   GPTQ: Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
//         Transformers", Algorithm 1. With H = 2·XᵀX/n (X [n, K] calibration inputs), damped by
//         λ = percdamp·mean(diag H), and U the upper Cholesky factor of H⁻¹, column i is quantised and its error
//         e = (w_i − q_i)/U_ii is fed back into the not yet quantised columns j > i as w_j −= e·U_ij — inside a
//         block of `block` columns immediately, to the columns after the block in one lazy rank-`block` update.
//         Group scales are computed from the (already error-updated) weights when a group starts.
//
// Bad input: NaN/Inf in weights or calibration data → numeric_error; a group that does not divide K, empty
// calibration data, mismatched shapes → shape_error. An all-zero group gets scale 1 and dequantises to exactly 0.
// A column that no calibration input ever activates (diag H = 0) is set to zero by GPTQ, as in the reference.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <vector>

#include <Eigen/Cholesky>
#include <Eigen/Core>

#include "cpet/compress/formats/quantized.hpp"
#include "cpet/core/eigen.hpp"
#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/kernels/gemm_s8.hpp"
#include "cpet/kernels/gemm_wq.hpp"

namespace cpet::compress {

/// How the range that one scale covers is chosen.
enum class clipping : int {
    minmax,      ///< the full range of the group: no weight is clipped
    percentile,  ///< the `percentile`-th percentile of |w| (symmetric) or of each tail (asymmetric)
    mse,         ///< the shrink of the min-max range (1, 1 − 1/grid, …, 1 − max_shrink) with least squared error
};

/// What a quantizer produces: bits × granularity × symmetry, and how the clipping range is chosen.
struct quant_options {
    qbits bits = qbits::int8;
    granularity gran = granularity::per_channel;
    index_t group = 128;  ///< k per scale when gran == per_group (a positive multiple of 8 dividing K)
    bool symmetric = true;
    clipping clip = clipping::minmax;
    double percentile = 99.9;     ///< clipping::percentile, in (0, 100]
    int mse_grid = 100;           ///< clipping::mse: candidate shrink steps of 1/grid
    double mse_max_shrink = 0.8;  ///< clipping::mse: smallest candidate is (1 − max_shrink) · range
    /// Symmetric int8 only: keep |q[n, 2t]| + |q[n, 2t + 1]| ≤ 128 for every pair of codes (formats::pair_bound),
    /// so that W8A8 on AVX2 CPUs without VNNI takes the exact u8 · s8 tile (kernels/gemm_s8.hpp), which runs
    /// 1.2–1.7× the signed one on Zen 3 (M = 8 to 512). The price is precision: each scale grows to
    /// max(absmax / 127, largest pair sum / 128) — for Gaussian rows of 256–4096 weights about 1.3–1.4×, between
    /// 8 and 7 bits — and a pair that rounding still puts over the bound loses magnitude where that costs the
    /// least squared error (RTN), or in GPTQ its second code is clamped and the error fed forward like any
    /// rounding error.
    bool pair_bound = false;
};

/// GPTQ knobs (the reference defaults).
struct gptq_options {
    double percdamp = 0.01;  ///< λ = percdamp · mean(diag H)
    index_t block = 128;     ///< lazy-batch width (rounded up to a multiple of the group size)
};

namespace detail {

/// One group's parameters: w ≈ scale · (q − zero).
struct qparam {
    float scale = 1.f;
    float zero = 0.f;
};

inline qparam params_from_range(double lo, double hi, qbits b, bool symmetric) {
    qparam p;
    const int qlo = formats::qmin(b, symmetric), qhi = formats::qmax(b, symmetric);
    if (symmetric) {
        const double a = std::max(std::abs(lo), std::abs(hi));
        p.scale = static_cast<float>(b == qbits::int8 ? a / 127.0 : a / 7.5);
        p.zero = static_cast<float>(formats::zero_symmetric(b));
    } else {
        lo = std::min(lo, 0.0);
        hi = std::max(hi, 0.0);
        p.scale = static_cast<float>((hi - lo) / (qhi - qlo));
    }
    // All-zero (or denormal-only) range: any finite scale makes q = zero, i.e. exactly 0 after dequantisation.
    if (!(p.scale >= std::numeric_limits<float>::min())) p.scale = 1.f;
    if (!symmetric) {
        const double z = qlo + std::nearbyint(-lo / static_cast<double>(p.scale));
        p.zero = static_cast<float>(std::clamp(z, static_cast<double>(qlo), static_cast<double>(qhi)));
    }
    return p;
}

inline int quantize_one(float w, qparam p, int qlo, int qhi) {
    const float v = std::nearbyint(w / p.scale) + p.zero;
    return static_cast<int>(std::clamp(v, static_cast<float>(qlo), static_cast<float>(qhi)));
}
inline float dequantize_one(int q, qparam p) { return p.scale * (static_cast<float>(q) - p.zero); }

/// Parameters for the values v (copied, any order) under the options' clipping rule.
inline qparam find_params(std::vector<float>& v, const quant_options& o) {
    const auto [mn, mx] = std::minmax_element(v.begin(), v.end());
    double lo = *mn, hi = *mx;
    const int qlo = formats::qmin(o.bits, o.symmetric), qhi = formats::qmax(o.bits, o.symmetric);
    switch (o.clip) {
        case clipping::minmax: break;
        case clipping::percentile: {
            const auto nth = [&](double pct, auto proj) {
                std::vector<float> t(v.size());
                std::transform(v.begin(), v.end(), t.begin(), proj);
                const auto at = static_cast<std::size_t>(std::floor(pct / 100.0 * static_cast<double>(t.size() - 1)));
                std::nth_element(t.begin(), t.begin() + static_cast<std::ptrdiff_t>(at), t.end());
                return static_cast<double>(t[at]);
            };
            if (o.symmetric) {
                const double a = nth(o.percentile, [](float x) { return std::abs(x); });
                lo = -a;
                hi = a;
            } else {
                hi = nth(o.percentile, [](float x) { return x; });
                lo = nth(100.0 - o.percentile, [](float x) { return x; });
            }
            break;
        }
        case clipping::mse: {
            double best = std::numeric_limits<double>::infinity();
            double best_lo = lo, best_hi = hi;
            const int steps = static_cast<int>(o.mse_max_shrink * o.mse_grid);
            for (int i = 0; i <= steps; ++i) {
                const double f = 1.0 - static_cast<double>(i) / o.mse_grid;
                const qparam p = params_from_range(f * lo, f * hi, o.bits, o.symmetric);
                double err = 0;
                for (float x : v) {
                    const double d = dequantize_one(quantize_one(x, p, qlo, qhi), p) - static_cast<double>(x);
                    err += d * d;
                }
                if (err < best) {
                    best = err;
                    best_lo = f * lo;
                    best_hi = f * hi;
                }
            }
            lo = best_lo;
            hi = best_hi;
            break;
        }
    }
    return params_from_range(lo, hi, o.bits, o.symmetric);
}

inline void check_options(index_t n, index_t k, const quant_options& o, const char* who) {
    require<shape_error>(n > 0 && k > 0, who, ": weight shape must be positive, got ", shape_str(n, k));
    require<format_error>(o.bits == qbits::int8 || o.bits == qbits::int4, who, ": bits must be int8 or int4");
    require<format_error>(!o.pair_bound || (o.bits == qbits::int8 && o.symmetric), who,
                          ": pair_bound applies to symmetric int8 weights only (int4 codes never saturate a pair)");
    if (o.gran == granularity::per_group) {
        require<shape_error>(o.group > 0 && o.group % 8 == 0, who, ": group size ", o.group,
                             " must be a positive multiple of 8 (32, 64, 128 are usual)");
        require<shape_error>(k % o.group == 0, who, ": group size ", o.group,
                             " does not divide the input dimension K = ", k);
    }
    if (o.clip == clipping::percentile)
        require<format_error>(o.percentile > 0 && o.percentile <= 100, who, ": percentile ", o.percentile,
                              " outside (0, 100]");
    if (o.clip == clipping::mse)
        require<format_error>(o.mse_grid > 0 && o.mse_max_shrink >= 0 && o.mse_max_shrink < 1, who,
                              ": mse search needs grid > 0 and max_shrink in [0, 1)");
}

inline void check_finite(ConstMatrixView<float> m, const char* who, const char* what) {
    for (index_t r = 0; r < m.rows(); ++r)
        for (index_t c = 0; c < m.cols(); ++c)
            require<numeric_error>(std::isfinite(m(r, c)), who, ": ", what, "(", r, ", ", c, ") = ", m(r, c),
                                   " is not finite");
}

/// find_params, and with o.pair_bound the scale widened so that the largest pair |w| + |w'| (w clipped to the
/// range, pairs (2t, 2t + 1) counted inside each row of `row_len` values of v) maps to formats::pair_bound.
inline qparam find_params_for(std::vector<float>& v, const quant_options& o, index_t row_len) {
    qparam p = find_params(v, o);
    if (!o.pair_bound) return p;
    const double cap = 127.0 * static_cast<double>(p.scale);
    double widest = 0;
    const auto len = static_cast<std::size_t>(row_len);
    for (std::size_t r0 = 0; r0 < v.size(); r0 += len)
        for (std::size_t c = 0; c < len; c += 2) {
            const double a = std::min<double>(std::abs(v[r0 + c]), cap);
            const double b = c + 1 < len ? std::min<double>(std::abs(v[r0 + c + 1]), cap) : 0.0;
            widest = std::max(widest, a + b);
        }
    p.scale = std::max(p.scale, static_cast<float>(widest / formats::pair_bound));
    return p;
}

/// Makes one row's codes pair-bounded: each pair (2t, 2t + 1) with |q| + |q'| > formats::pair_bound moves its
/// codes toward zero one step at a time, each step on the code whose squared error (against the unrounded target
/// t = w / s + z) grows the least. Moving toward zero stays inside [qlo, qhi], which holds 0.
template <class Target>
void bound_pairs(std::int32_t* q, index_t k, Target&& target) {
    for (index_t c = 0; c + 1 < k; c += 2) {
        std::int32_t& a = q[c];
        std::int32_t& b = q[c + 1];
        int excess = std::abs(a) + std::abs(b) - formats::pair_bound;
        if (excess <= 0) continue;
        const double ta = target(c), tb = target(c + 1);
        const auto cost = [](std::int32_t v, double t) {  // growth of (v − t)² when |v| drops by one
            const std::int32_t n = v > 0 ? v - 1 : v + 1;
            return (n - t) * (n - t) - (v - t) * (v - t);
        };
        for (; excess > 0; --excess) {
            const bool take_a = b == 0 || (a != 0 && cost(a, ta) <= cost(b, tb));
            std::int32_t& v = take_a ? a : b;
            v += v > 0 ? -1 : 1;
        }
    }
}

/// Scale groups per row in the caller-facing [n, ng] arrays.
inline index_t caller_groups(index_t k, const quant_options& o) {
    return o.gran == granularity::per_group ? k / o.group : 1;
}

}  // namespace detail

/// Round-to-nearest quantisation of w [N, K] (rows = output channels).
inline quantized_weights quantize_rtn(ConstMatrixView<float> w, const quant_options& o = {}) {
    check_shape(w, -1, -1, "quantize_rtn: w");
    const index_t n = w.rows(), k = w.cols();
    detail::check_options(n, k, o, "quantize_rtn");
    detail::check_finite(w, "quantize_rtn", "w");
    const index_t ng = detail::caller_groups(k, o), gk = k / ng;
    const int qlo = formats::qmin(o.bits, o.symmetric), qhi = formats::qmax(o.bits, o.symmetric);
    std::vector<detail::qparam> params(static_cast<std::size_t>(n * ng));
    std::vector<float> vals;
    if (o.gran == granularity::per_tensor) {
        vals.assign(static_cast<std::size_t>(n * k), 0.f);
        for (index_t r = 0; r < n; ++r)
            for (index_t c = 0; c < k; ++c) vals[static_cast<std::size_t>(r * k + c)] = w(r, c);
        std::fill(params.begin(), params.end(), detail::find_params_for(vals, o, k));
    } else {
        for (index_t r = 0; r < n; ++r)
            for (index_t g = 0; g < ng; ++g) {
                vals.assign(w.row(r) + g * gk, w.row(r) + (g + 1) * gk);
                params[static_cast<std::size_t>(r * ng + g)] = detail::find_params_for(vals, o, gk);
            }
    }
    std::vector<std::int32_t> codes(static_cast<std::size_t>(n * k));
    std::vector<float> scales(params.size()), zeros(params.size());
    for (std::size_t i = 0; i < params.size(); ++i) {
        scales[i] = params[i].scale;
        zeros[i] = params[i].zero;
    }
    for (index_t r = 0; r < n; ++r) {
        for (index_t c = 0; c < k; ++c)
            codes[static_cast<std::size_t>(r * k + c)] =
                detail::quantize_one(w(r, c), params[static_cast<std::size_t>(r * ng + c / gk)], qlo, qhi);
        if (o.pair_bound)
            detail::bound_pairs(codes.data() + r * k, k, [&](index_t c) {
                const detail::qparam p = params[static_cast<std::size_t>(r * ng + c / gk)];
                return static_cast<double>(w(r, c)) / p.scale + p.zero;
            });
    }
    return quantized_weights::from_codes(o.bits, o.gran, o.group, o.symmetric, n, k, codes.data(), scales.data(),
                                         zeros.data());
}

/// The dense [N, K] fp32 matrix the packed weights stand for (s · (q − z), computed as every kernel does).
inline Matrix<float> dequantize(const quantized_weights& q) {
    Matrix<float> out(q.rows(), q.cols());
    for (index_t r = 0; r < q.rows(); ++r)
        for (index_t c = 0; c < q.cols(); ++c) out(r, c) = q.value(r, c);
    return out;
}

/// H = 2·XᵀX / n of calibration inputs x [n, K] (double). Throws on empty or non-finite input.
inline Eigen::MatrixXd gptq_hessian(ConstMatrixView<float> x) {
    check_shape(x, -1, -1, "gptq_hessian: calibration x");
    require<shape_error>(x.rows() > 0 && x.cols() > 0, "gptq_hessian: calibration data is empty (",
                         shape_str(x), ")");
    detail::check_finite(x, "gptq_hessian", "calibration x");
    const Eigen::MatrixXd xd = as_eigen(x).cast<double>();
    Eigen::MatrixXd h = Eigen::MatrixXd::Zero(x.cols(), x.cols());
    h.selfadjointView<Eigen::Lower>().rankUpdate(xd.transpose(), 2.0 / static_cast<double>(x.rows()));
    h.triangularView<Eigen::StrictlyUpper>() = h.transpose();
    return h;
}

/// GPTQ with a precomputed Hessian h [K, K] (e.g. accumulated over many calibration batches). A template only so
/// that the Cholesky code is compiled in the translation units that quantise, not in every one that includes this.
template <class = void>
quantized_weights quantize_gptq_hessian(ConstMatrixView<float> w, Eigen::MatrixXd h, const quant_options& o = {},
                                        const gptq_options& g = {}) {
    check_shape(w, -1, -1, "quantize_gptq: w");
    const index_t n = w.rows(), k = w.cols();
    detail::check_options(n, k, o, "quantize_gptq");
    detail::check_finite(w, "quantize_gptq", "w");
    require<shape_error>(h.rows() == k && h.cols() == k, "quantize_gptq: Hessian must be ", shape_str(k, k),
                         ", got ", shape_str(h.rows(), h.cols()));
    require<numeric_error>(h.allFinite(), "quantize_gptq: Hessian has non-finite entries");
    require<format_error>(g.percdamp >= 0 && g.block > 0, "quantize_gptq: percdamp must be >= 0 and block > 0");

    using MatRD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    MatRD W = as_eigen(w).cast<double>();
    // Inputs that never fire carry no information: GPTQ zeroes those columns and keeps H invertible.
    for (index_t i = 0; i < k; ++i)
        if (h(i, i) == 0.0) {
            h(i, i) = 1.0;
            W.col(i).setZero();
        }
    const double damp = g.percdamp * h.diagonal().mean();
    h.diagonal().array() += damp;
    Eigen::LLT<Eigen::MatrixXd> llt(h);
    require<numeric_error>(llt.info() == Eigen::Success,
                           "quantize_gptq: the damped Hessian is not positive definite (raise percdamp)");
    Eigen::MatrixXd hinv = llt.solve(Eigen::MatrixXd::Identity(k, k));
    Eigen::LLT<Eigen::MatrixXd> llt_inv(hinv);
    require<numeric_error>(llt_inv.info() == Eigen::Success,
                           "quantize_gptq: H⁻¹ is not positive definite (raise percdamp)");
    const Eigen::MatrixXd U = llt_inv.matrixU();  // H⁻¹ = UᵀU

    const index_t ng = detail::caller_groups(k, o), gk = k / ng;
    const int qlo = formats::qmin(o.bits, o.symmetric), qhi = formats::qmax(o.bits, o.symmetric);
    std::vector<detail::qparam> params(static_cast<std::size_t>(n * ng));
    std::vector<float> vals;
    if (o.gran != granularity::per_group) {  // one range for the whole row (or tensor), from the original weights
        if (o.gran == granularity::per_tensor) {
            vals.resize(static_cast<std::size_t>(n * k));
            for (index_t r = 0; r < n; ++r)
                for (index_t c = 0; c < k; ++c) vals[static_cast<std::size_t>(r * k + c)] = static_cast<float>(W(r, c));
            std::fill(params.begin(), params.end(), detail::find_params_for(vals, o, k));
        } else {
            for (index_t r = 0; r < n; ++r) {
                vals.resize(static_cast<std::size_t>(k));
                for (index_t c = 0; c < k; ++c) vals[static_cast<std::size_t>(c)] = static_cast<float>(W(r, c));
                params[static_cast<std::size_t>(r)] = detail::find_params_for(vals, o, k);
            }
        }
    }
    const index_t block = o.gran == granularity::per_group ? formats::round_up(g.block, o.group) : g.block;
    std::vector<std::int32_t> codes(static_cast<std::size_t>(n * k));
    MatRD err(n, block);
    for (index_t i1 = 0; i1 < k; i1 += block) {
        const index_t i2 = std::min(i1 + block, k), count = i2 - i1;
        for (index_t i = i1; i < i2; ++i) {
            if (o.gran == granularity::per_group && i % o.group == 0) {
                vals.resize(static_cast<std::size_t>(o.group));
                for (index_t r = 0; r < n; ++r) {
                    for (index_t c = 0; c < o.group; ++c)
                        vals[static_cast<std::size_t>(c)] = static_cast<float>(W(r, i + c));
                    params[static_cast<std::size_t>(r * ng + i / o.group)] = detail::find_params_for(vals, o, o.group);
                }
            }
            const double d = U(i, i);
            for (index_t r = 0; r < n; ++r) {
                const detail::qparam p = params[static_cast<std::size_t>(r * ng + i / gk)];
                int q = detail::quantize_one(static_cast<float>(W(r, i)), p, qlo, qhi);
                if (o.pair_bound && i % 2 == 1) {  // the second code of a pair: clamp, GPTQ carries the error
                    const int room = formats::pair_bound - std::abs(codes[static_cast<std::size_t>(r * k + i - 1)]);
                    q = std::clamp(q, -room, room);
                }
                codes[static_cast<std::size_t>(r * k + i)] = q;
                err(r, i - i1) = (W(r, i) - static_cast<double>(detail::dequantize_one(q, p))) / d;
            }
            // Error feedback inside the block (columns i+1 .. i2-1).
            if (i + 1 < i2)
                W.block(0, i + 1, n, i2 - i - 1).noalias() -=
                    err.col(i - i1) * U.block(i, i + 1, 1, i2 - i - 1);
        }
        // Lazy batch update of everything after the block.
        if (i2 < k) W.rightCols(k - i2).noalias() -= err.leftCols(count) * U.block(i1, i2, count, k - i2);
    }
    std::vector<float> scales(params.size()), zeros(params.size());
    for (std::size_t i = 0; i < params.size(); ++i) {
        scales[i] = params[i].scale;
        zeros[i] = params[i].zero;
    }
    return quantized_weights::from_codes(o.bits, o.gran, o.group, o.symmetric, n, k, codes.data(), scales.data(),
                                         zeros.data());
}

/// GPTQ of w [N, K] with calibration inputs x [n, K] (the activations that multiply w).
template <class = void>
quantized_weights quantize_gptq(ConstMatrixView<float> w, ConstMatrixView<float> calib, const quant_options& o = {},
                                const gptq_options& g = {}) {
    check_shape(calib, -1, w.cols(), "quantize_gptq: calibration x");
    return quantize_gptq_hessian(w, gptq_hessian(calib), o, g);
}

/// The kernel-facing view of packed weights (raw pointers and sizes; kernels know nothing of compress/).
inline kernels::wq_weights kernel_view(const quantized_weights& q) {
    static_assert(kernels::wq_panel_rows == formats::panel_rows, "kernels and format disagree on the panel");
    static_assert(kernels::wq_chunk_bytes == formats::chunk_bytes, "kernels and format disagree on the chunk");
    kernels::wq_weights v;
    v.data = q.data();
    v.scales = q.scales();
    v.zeros = q.zeros();
    v.row_sums = q.row_sums();
    v.pair_bounded = q.pair_bounded();
    v.bits = static_cast<int>(q.bits());
    v.n = q.rows();
    v.k = q.cols();
    v.k_pad = q.cols_padded();
    v.group = q.group();
    v.groups = q.groups();
    return v;
}

/// How matmul() runs packed weights.
enum class execution : int {
    weight_only,       ///< fp32 activations, weights dequantised in the kernel (the exact decode path)
    int8_activations,  ///< activations quantised per token to int8: W8A8 (int8 weights, per-channel or
                       ///< per-tensor scales: kernels::gemm_s8) or W4A8 (int4 weights, any granularity:
                       ///< kernels::gemm_w4a8)
    automatic,         ///< int8_activations for int8 per-channel/per-tensor weights when M ≥ 16, else weight_only
};

/// y [M, N] = x [M, K] · Ŵᵀ (+ bias [N]) with the packed weights.
inline void matmul(ConstMatrixView<float> x, const quantized_weights& q, MatrixView<float> y,
                   const float* bias = nullptr, execution e = execution::automatic) {
    const bool s8_ok = q.bits() == qbits::int8 && q.gran() != granularity::per_group;
    if (e == execution::automatic) e = (s8_ok && x.rows() >= 16) ? execution::int8_activations : execution::weight_only;
    if (e == execution::int8_activations) {
        if (q.bits() == qbits::int4) return kernels::gemm_w4a8(x, kernel_view(q), y, bias);
        require<format_error>(s8_ok, "matmul: int8 activations with int8 weights need per-channel or per-tensor "
                                     "scales (group-wise int8 runs weight_only)");
        kernels::gemm_s8(x, kernel_view(q), y, bias);
    } else {
        kernels::gemm_wq(x, kernel_view(q), y, bias);
    }
}

}  // namespace cpet::compress
