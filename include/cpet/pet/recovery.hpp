// cpet/pet/recovery.hpp — CPET's recovery modules (Zhao et al., arXiv 2307.07705): a low-rank bypass beside each
// compressed linear that adds back what compression lost, y = Ĉ(x) + R(x).
//
// Two forms (a type-level choice):
//   recovery_form::gelu  — the paper's own, as in its released code (thunlp/CA-LoRA): R(x) = s·GELU(x·A1ᵀ)·A2ᵀ
//       on every linear of attention and FFN, bottleneck 32, A1 Kaiming-uniform and A2 zero so a fresh module
//       is exactly zero; it is trained (by distillation, see strategy/).
//   recovery_form::linear — R(x) = x·Aᵀ·Bᵀ initialised WITHOUT training from a truncated SVD of the compression
//       residual E = W − Ŵ (Ŵ = format.to_dense()), so it helps before any training. svd_residual picks the
//       objective from the calibration statistics it is given (X: the linear's calibration inputs, [N, in]):
//         Gram matrix G = XᵀX  → min ‖X(E − BA)ᵀ‖_F over rank-r BA, exactly: EoRA (Liu et al., NVIDIA 2024,
//                                arXiv 2410.21271). With G/N = QΛQᵀ, ‖X(E − BA)ᵀ‖_F² = N·‖(E − BA)·Q√Λ‖_F², so
//                                the truncated SVD of E' = E·Q√Λ is the optimum (Eckart–Young) and √Λ⁻¹Qᵀ maps
//                                it back: BA = [E']_r·√Λ⁻¹·Qᵀ. The rank goes where the outputs move.
//         Σx_j² only           → min ‖(E − BA)·diag(d)‖_F, d_j = √(mean x_j²): the same objective when the input
//                                channels are uncorrelated (XᵀX diagonal), a heuristic otherwise.
//         nothing              → min ‖E − BA‖_F (the plain SVD: every input direction counts alike).
// Both are linear hooks: U = x·A1ᵀ (GELU applied in place for the paper's form) is one thin GEMM, and s·U·Bᵀ is
// added inside the base GEMM's output tile, on any WeightFormat.
#pragma once

#include <Eigen/Eigenvalues>
#include <Eigen/SVD>
#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpet/core/eigen.hpp"
#include "cpet/kernels/activations.hpp"
#include "cpet/pet/lowrank.hpp"
#include "cpet/pet/policy.hpp"

namespace cpet::pet {

enum class recovery_form {
    gelu,    ///< R(x) = s·GELU(x·A1ᵀ)·A2ᵀ (the paper's, trained from zero)
    linear,  ///< R(x) = s·x·Aᵀ·Bᵀ (SVD of the compression residual, no training needed)
};

/// Which objective svd_residual minimises over rank-r B·A (see the top of this file).
enum class residual_weighting {
    automatic,  ///< the richest the statistics allow: gram when they carry a Gram matrix, else diagonal, else plain
    plain,      ///< ‖E − BA‖_F                        (no data)
    diagonal,   ///< ‖(E − BA)·diag(d)‖_F, d_j = √mean x_j²  (exact when the input channels are uncorrelated)
    gram,       ///< ‖X(E − BA)ᵀ‖_F                    (EoRA: exact for any inputs; needs XᵀX)
};

inline constexpr const char* residual_weighting_name(residual_weighting w) noexcept {
    switch (w) {
        case residual_weighting::automatic: return "automatic";
        case residual_weighting::plain: return "plain";
        case residual_weighting::diagonal: return "diagonal";
        default: return "gram";
    }
}

/// A and B of a truncated SVD of the residual W − Ŵ of one linear: W − Ŵ ≈ B·A, B [out, r], A [r, in].
struct residual_factors {
    Matrix<float> A, B;
    /// The weighted residual before truncation: ‖E‖_F (plain), ‖E·diag(d)‖_F (diagonal), ‖X·Eᵀ‖_F/√N (gram: the
    /// RMS over calibration rows of the output error compression causes).
    double residual_norm = 0;
    double captured = 0;  ///< fraction of that norm² the rank-r part captures (Σ_{i<r} σ_i² / Σ σ_i²)
    residual_weighting weighting = residual_weighting::plain;  ///< the objective that was minimised
};

/// Statistics of a linear's input that make the SVD activation-aware: per-channel Σ x_j² (`sum_sq`) over
/// `samples` rows. compress::calibration is one; pet/ takes any such type so it need not include compress/.
template <class S>
concept ChannelStats = requires(const S& s) {
    { s.sum_sq[0] } -> std::convertible_to<double>;
    { s.sum_sq.size() } -> std::convertible_to<std::size_t>;
    { s.samples } -> std::convertible_to<double>;
};

/// Statistics that also carry the Gram matrix `hessian` = Σ_rows xᵀx [in, in] (empty when not collected) over
/// `samples` rows: what EoRA whitens by. compress::calibration is one when collected with the Hessian (GPTQ's H).
template <class S>
concept GramStats = requires(const S& s, index_t i) {
    { s.hessian(i, i) } -> std::convertible_to<double>;
    { s.hessian.rows() } -> std::convertible_to<index_t>;
    { s.hessian.cols() } -> std::convertible_to<index_t>;
    { s.samples } -> std::convertible_to<double>;
};

namespace detail {

template <class Stats>
bool has_gram(const Stats* s) {
    if constexpr (!std::is_void_v<Stats> && GramStats<Stats>) return s && double(s->samples) > 0 && s->hessian.rows() > 0;
    else return false;
}
template <class Stats>
bool has_sum_sq(const Stats* s) {
    if constexpr (!std::is_void_v<Stats> && ChannelStats<Stats>) return s && double(s->samples) > 0 && s->sum_sq.size() > 0;
    else return false;
}

/// G / samples in Real, checked: [in, in], finite, symmetric to rounding (an accumulated Σxᵀx is symmetric;
/// anything else is not a Gram matrix and its eigenvectors would not whiten anything).
template <class MD, class Stats>
MD checked_gram(const Stats& s, index_t in) {
    const index_t n = s.hessian.rows(), m = s.hessian.cols();
    require<shape_error>(n == in && m == in, "recovery SVD init: the calibration Gram matrix (Σxᵀx) is ",
                         shape_str(n, m), ", the weight has ", in, " inputs, expected ", shape_str(in, in));
    const double inv = 1.0 / double(s.samples);
    MD g(in, in);
    double scale = 0;
    for (index_t i = 0; i < in; ++i)
        for (index_t j = 0; j < in; ++j) {
            const double v = double(s.hessian(i, j));
            require<numeric_error>(std::isfinite(v), "recovery SVD init: the calibration Gram matrix has a "
                                   "non-finite entry (", i, ", ", j, ") = ", v);
            g(i, j) = typename MD::Scalar(v * inv);
            scale = std::max(scale, std::abs(v * inv));
        }
    for (index_t i = 0; i < in; ++i)
        for (index_t j = i + 1; j < in; ++j) {
            const double d = std::abs(double(g(i, j)) - double(g(j, i)));
            require<format_error>(d <= 1e-6 * scale, "recovery SVD init: the calibration Gram matrix is not "
                                  "symmetric: entries (", i, ", ", j, ") and (", j, ", ", i, ") differ by ", d,
                                  " (its largest entry is ", scale, "); Σxᵀx of real inputs is symmetric");
        }
    return (g + g.transpose()) / 2;  // exactly symmetric for the eigensolver
}

}  // namespace detail

/// Truncated SVD (Eigen, in Real = double) of the compression residual E = W − Ŵ, minimising the objective `how`
/// asks for (automatic: gram when `stats` carries a Gram matrix, else diagonal when it carries sum_sq, else plain;
/// see the top of this file). The residual is whitened on the right by R (I, diag(d) or Q·√Λ), E·R = UΣVᵀ is
/// truncated to rank r, and R⁻¹ folded back into A; the singular values are split evenly (B = U_r·√Σ_r,
/// A = √Σ_r·V_rᵀ·R⁻¹) so neither factor is tiny. Tiny weights (d_j, λ_i below 1e-6 / 1e-12 of the largest) are
/// floored on both sides of R, so an input direction the calibration never excited still has a finite inverse and
/// is recovered as the plain SVD would (the floor makes R invertible without changing the optimum elsewhere).
/// Throws shape_error on a bad rank or statistics of the wrong width, numeric_error on NaN / Inf statistics,
/// format_error on a Gram matrix that is not symmetric (or not positive semi-definite), or on `how` naming
/// statistics that `stats` lacks.
/// A template only so that the SVD and eigensolver (~15 s of compile time) are instantiated in the translation
/// units that call it, not in every one that includes this header.
template <class Real = double, class Stats = const void>
    requires(std::is_void_v<Stats> || ChannelStats<Stats> || GramStats<Stats>)
residual_factors svd_residual(ConstMatrixView<float> w, ConstMatrixView<float> w_hat, index_t rank,
                              const Stats* stats = nullptr,
                              residual_weighting how = residual_weighting::automatic) {
    static_assert(std::is_floating_point_v<Real>, "svd_residual<Real>: Real is the SVD's precision");
    check_shape(w_hat, w.rows(), w.cols(), "recovery SVD init: compressed weight");
    const index_t out = w.rows(), in = w.cols();
    require<shape_error>(rank >= 1 && rank <= std::min(in, out), "recovery SVD init: rank ", rank,
                         " outside [1, min(in, out) = ", std::min(in, out), "]");
    using MD = Eigen::Matrix<Real, Eigen::Dynamic, Eigen::Dynamic>;
    using VD = Eigen::Matrix<Real, Eigen::Dynamic, 1>;

    const bool gram_given = detail::has_gram(stats), sum_sq_given = detail::has_sum_sq(stats);
    residual_weighting used = how;
    if (how == residual_weighting::automatic)
        used = gram_given ? residual_weighting::gram : sum_sq_given ? residual_weighting::diagonal
                                                                    : residual_weighting::plain;
    require<format_error>(used != residual_weighting::gram || gram_given, "recovery SVD init: the gram (EoRA) "
                          "objective needs a Gram matrix Σxᵀx of the linear's input; the statistics carry none "
                          "(collect it: nn::calibrate with calibration_options::hessian)");
    require<format_error>(used != residual_weighting::diagonal || sum_sq_given || gram_given, "recovery SVD init: "
                          "the diagonal objective needs the per-channel Σx² of the linear's input; no statistics "
                          "were given");

    MD e = as_eigen(w).template cast<Real>() - as_eigen(w_hat).template cast<Real>();
    VD d;      // diagonal: R = diag(d)
    MD q;      // gram:     R = Q·diag(root)
    VD root;
    if (used == residual_weighting::diagonal) {
        d = VD(in);
        if (sum_sq_given) {
            if constexpr (!std::is_void_v<Stats> && ChannelStats<Stats>) {
                const index_t channels = index_t(stats->sum_sq.size());
                require<shape_error>(channels == in, "recovery SVD init: calibration has ", channels,
                                     " channels, the weight has ", in, " inputs");
                for (index_t j = 0; j < in; ++j) {
                    const double v = double(stats->sum_sq[std::size_t(j)]);
                    require<numeric_error>(std::isfinite(v) && v >= 0, "recovery SVD init: calibration sum_sq[", j,
                                           "] = ", v, " is not a finite sum of squares");
                    d(j) = Real(std::sqrt(v / double(stats->samples)));
                }
            }
        } else {
            if constexpr (!std::is_void_v<Stats> && GramStats<Stats>) {
                const MD g = detail::checked_gram<MD>(*stats, in);
                d = g.diagonal().cwiseMax(Real(0)).cwiseSqrt();
            }
        }
        // a channel that never fired still gets a little weight (and a finite inverse)
        const Real floor = std::max<Real>(d.maxCoeff() * Real(1e-6), Real(1e-30));
        d = d.cwiseMax(floor);
        e = e * d.asDiagonal();
    } else if (used == residual_weighting::gram) {
        if constexpr (!std::is_void_v<Stats> && GramStats<Stats>) {
            const MD g = detail::checked_gram<MD>(*stats, in);
            const Eigen::SelfAdjointEigenSolver<MD> eig(g);
            require<numeric_error>(eig.info() == Eigen::Success, "recovery SVD init: the eigendecomposition of the "
                                   "calibration Gram matrix did not converge");
            const VD& lambda = eig.eigenvalues();  // ascending
            const Real top = std::max(lambda(in - 1), Real(0));
            require<format_error>(lambda(0) >= -Real(1e-6) * top, "recovery SVD init: the calibration Gram matrix "
                                  "is not positive semi-definite (eigenvalue ", double(lambda(0)), ", largest ",
                                  double(top), "); Σxᵀx of real inputs has no negative eigenvalue");
            const Real floor = std::max<Real>(top * Real(1e-12), Real(1e-60));
            root = lambda.cwiseMax(floor).cwiseSqrt();
            q = eig.eigenvectors();
            e = e * q * root.asDiagonal();
        }
    }

    residual_factors f;
    f.weighting = used;
    f.residual_norm = double(e.norm());
    f.A = Matrix<float>(rank, in);
    f.B = Matrix<float>(out, rank);
    if (f.residual_norm == 0) return f;  // nothing was lost: R = 0
    Eigen::BDCSVD<MD> svd(e, Eigen::ComputeThinU | Eigen::ComputeThinV);
    const VD& sv = svd.singularValues();
    const VD sroot = sv.head(rank).cwiseSqrt();
    f.captured = double(sv.head(rank).squaredNorm() / sv.squaredNorm());
    as_eigen(f.B) = (svd.matrixU().leftCols(rank) * sroot.asDiagonal()).template cast<float>();
    MD a = sroot.asDiagonal() * svd.matrixV().leftCols(rank).transpose();  // [r, in], in whitened coordinates
    if (used == residual_weighting::diagonal) a = a * d.cwiseInverse().asDiagonal();
    else if (used == residual_weighting::gram) a = (a * root.cwiseInverse().asDiagonal()) * q.transpose();
    as_eigen(f.A) = a.template cast<float>();
    return f;
}

template <recovery_form Form = recovery_form::gelu>
struct recovery_policy {
    static constexpr const char* name() noexcept {
        return Form == recovery_form::gelu ? "recovery" : "recovery_linear";
    }
    static constexpr recovery_form form = Form;
    /// The paper's nonlinearity (torch.nn.GELU, erf form).
    static constexpr kernels::activation act = kernels::activation::gelu_erf;

    struct options {
        index_t rank = 32;                              ///< bottleneck (the paper's 32)
        float scale = 1.f;                              ///< s
        target_set targets = target_set::all();         ///< every linear of attention and FFN (gate only if present)
        bool clamp_rank = false;  ///< use min(rank, in, out) where rank is too large instead of throwing
        /// Linear form: the objective of the SVD initialisation (see svd_residual); the GELU form ignores it.
        residual_weighting weighting = residual_weighting::automatic;
    };

    struct modules {
        static constexpr hook_set hooks{hook::linear};
        detail::lowrank_factors f;  ///< A = A1 [r, in], B = A2 [out, r]
        float s = 1.f;

        index_t rank(target t) const noexcept { return f.rank(t); }
        void project(target t, ConstMatrixView<float> x, MatrixView<float> u, scratch&) const {
            f.project_linear(t, x, u);
            if constexpr (Form == recovery_form::gelu)
                for (index_t r = 0; r < u.rows(); ++r) kernels::activate_inplace(act, u.row(r), u.cols());
        }
        ConstMatrixView<float> up(target t) const noexcept { return f.B[std::size_t(t)]; }
        float lowrank_scale(target) const noexcept { return s; }
        std::optional<lowrank_args> lowrank(target t, ConstMatrixView<float> x, scratch& sc) const {
            return lowrank_from_parts(*this, t, x, sc);
        }

        void check_fits(const layer_dims& d, const char* who) const { f.check_fits(d, who, name()); }

        target_set targets() const noexcept { return f.targets(); }
        ConstMatrixView<float> A(target t) const noexcept { return f.A[std::size_t(t)]; }
        ConstMatrixView<float> B(target t) const noexcept { return f.B[std::size_t(t)]; }
        void set(target t, ConstMatrixView<float> a, ConstMatrixView<float> b) { f.set(name(), t, a, b); }
        std::vector<parameter_group> parameters() const {
            std::vector<parameter_group> out;
            f.parameters(out, "recovery_A1", "recovery_A2");
            return out;
        }
    };

    /// The targets of `o` that exist in the layer (a gate only where the FFN has one), rank per target.
    static index_t rank_for(const layer_dims& d, const options& o, target t) {
        const index_t r = o.clamp_rank ? std::min(o.rank, std::min(d.in(t), d.out(t))) : o.rank;
        detail::check_rank(name(), r, d, t);
        return r;
    }
    static target_set present(const layer_dims& d, target_set ts) {
        target_set out;
        for (int i = 0; i < target_count; ++i)
            if (ts.contains(target(i)) && d.has(target(i))) out.insert(target(i));
        return out;
    }

    /// Fresh modules: A1 Kaiming-uniform (seeded), A2 zero, so R = 0 until trained. With target_set::all() the
    /// gate is skipped where the layer has none; naming it explicitly there is an error.
    static modules make(const layer_dims& d, const options& o, std::uint64_t seed = 0) {
        const target_set ts = o.targets == target_set::all() ? present(d, o.targets) : o.targets;
        d.check_targets(ts, name());
        modules m;
        m.f.dims = d;
        m.s = o.scale;
        for (int i = 0; i < target_count; ++i) {
            const target t = target(i);
            if (!ts.contains(t)) continue;
            const index_t r = rank_for(d, o, t);
            m.f.A[std::size_t(i)] = detail::kaiming_uniform(r, d.in(t), seed, t);
            m.f.B[std::size_t(i)] = Matrix<float>(d.out(t), r);
        }
        return m;
    }

    /// Linear form only: modules initialised from the residuals of the given linears. `weights(t)` and
    /// `compressed(t)` return the dense W and Ŵ of target t (nn::init_recovery does this for a layer);
    /// `stats(t)` its calibration or null (with a Gram matrix the init is EoRA's, see svd_residual).
    template <class Dense, class Compressed, class Stats>
        requires(Form == recovery_form::linear)
    static modules from_residual(const layer_dims& d, const options& o, Dense&& weights, Compressed&& compressed,
                                 Stats&& stats) {
        const target_set ts = o.targets == target_set::all() ? present(d, o.targets) : o.targets;
        d.check_targets(ts, name());
        modules m;
        m.f.dims = d;
        m.s = 1.f;  // the factors already are the residual
        for (int i = 0; i < target_count; ++i) {
            const target t = target(i);
            if (!ts.contains(t)) continue;
            residual_factors f;
            try {
                f = svd_residual(weights(t), compressed(t), rank_for(d, o, t), stats(t), o.weighting);
            } catch (const shape_error& e) {  // the same error, told which linear it came from
                throw shape_error(cpet::detail::concat(name(), " of target ", target_name(t), ": ", e.what()));
            } catch (const numeric_error& e) {
                throw numeric_error(cpet::detail::concat(name(), " of target ", target_name(t), ": ", e.what()));
            } catch (const format_error& e) {
                throw format_error(cpet::detail::concat(name(), " of target ", target_name(t), ": ", e.what()));
            }
            m.f.A[std::size_t(i)] = std::move(f.A);
            m.f.B[std::size_t(i)] = std::move(f.B);
        }
        return m;
    }
};

using recovery = recovery_policy<recovery_form::gelu>;
using recovery_linear = recovery_policy<recovery_form::linear>;

static_assert(check_pet_policy<recovery>() && hooks_of<recovery>::linear && LowrankParts<recovery::modules>);
static_assert(check_pet_policy<recovery_linear>() && LowrankParts<recovery_linear::modules>);

}  // namespace cpet::pet
