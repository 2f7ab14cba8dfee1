// cpet/pet/recovery.hpp — CPET's recovery modules (Zhao et al., arXiv 2307.07705): a low-rank bypass beside each
// compressed linear that adds back what compression lost, y = Ĉ(x) + R(x).
//
// Two forms (a type-level choice):
//   recovery_form::gelu  — the paper's own, as in its released code (thunlp/CA-LoRA): R(x) = s·GELU(x·A1ᵀ)·A2ᵀ
//       on every linear of attention and FFN, bottleneck 32, A1 Kaiming-uniform and A2 zero so a fresh module
//       is exactly zero; it is trained (by distillation, see strategy/).
//   recovery_form::linear — R(x) = x·Aᵀ·Bᵀ initialised WITHOUT training from a truncated SVD of the compression
//       residual E = W − Ŵ (Ŵ = format.to_dense()), so it helps before any training. Activation-aware: with
//       calibration statistics, E·diag(d) is decomposed, d_j = √(mean x_j²), and diag(d)⁻¹ folded back into A, so
//       the rank goes where the inputs are large (min ‖X(E − BA)ᵀ‖ rather than ‖E − BA‖ for diagonal XᵀX).
// Both are linear hooks: U = x·A1ᵀ (GELU applied in place for the paper's form) is one thin GEMM, and s·U·Bᵀ is
// added inside the base GEMM's output tile, on any WeightFormat.
#pragma once

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

/// A and B of a truncated SVD of the residual W − Ŵ of one linear: W − Ŵ ≈ B·A, B [out, r], A [r, in].
struct residual_factors {
    Matrix<float> A, B;
    double residual_norm = 0;  ///< ‖W − Ŵ‖_F (weighted by d when activation-aware)
    double captured = 0;       ///< fraction of ‖·‖_F² the rank-r part captures (Σ_{i<r} σ_i² / Σ σ_i²)
};

/// Statistics of a linear's input that make the SVD activation-aware: per-channel Σ x_j² (`sum_sq`) over
/// `samples` rows. compress::calibration is one; pet/ takes any such type so it need not include compress/.
template <class S>
concept ChannelStats = requires(const S& s) {
    { s.sum_sq[0] } -> std::convertible_to<double>;
    { s.sum_sq.size() } -> std::convertible_to<std::size_t>;
    { s.samples } -> std::convertible_to<double>;
};

/// Truncated SVD (Eigen BDCSVD in double) of W − Ŵ, activation-aware when `stats` holds sum_sq for every input
/// channel. The singular values are split evenly (B = U·√Σ, A = √Σ·Vᵀ·diag(d)⁻¹) so neither factor is tiny.
/// A template only so that BDCSVD (~15 s of compile time) is instantiated in the translation units that call it,
/// not in every one that includes this header.
template <class Real = double, class Stats = const void>
    requires(std::is_void_v<Stats> || ChannelStats<Stats>)
residual_factors svd_residual(ConstMatrixView<float> w, ConstMatrixView<float> w_hat, index_t rank,
                              const Stats* stats = nullptr) {
    static_assert(std::is_floating_point_v<Real>, "svd_residual<Real>: Real is the SVD's precision");
    check_shape(w_hat, w.rows(), w.cols(), "recovery SVD init: compressed weight");
    const index_t out = w.rows(), in = w.cols();
    require<shape_error>(rank >= 1 && rank <= std::min(in, out), "recovery SVD init: rank ", rank,
                         " outside [1, min(in, out) = ", std::min(in, out), "]");
    using MD = Eigen::Matrix<Real, Eigen::Dynamic, Eigen::Dynamic>;
    using VD = Eigen::Matrix<Real, Eigen::Dynamic, 1>;
    MD e = as_eigen(w).template cast<Real>() - as_eigen(w_hat).template cast<Real>();
    VD d = VD::Ones(in);
    if constexpr (!std::is_void_v<Stats>) {
        const index_t channels = stats ? index_t(stats->sum_sq.size()) : 0;
        if (stats && stats->samples > 0 && channels > 0) {
            require<shape_error>(channels == in, "recovery SVD init: calibration has ", channels,
                                 " channels, the weight has ", in, " inputs");
            for (index_t j = 0; j < in; ++j)
                d(j) = Real(std::sqrt(double(stats->sum_sq[std::size_t(j)]) / double(stats->samples)));
            // a channel that never fired still gets a little weight (and a finite inverse)
            const Real floor = std::max<Real>(d.maxCoeff() * Real(1e-6), Real(1e-30));
            for (index_t j = 0; j < in; ++j) d(j) = std::max(d(j), floor);
            e = e * d.asDiagonal();
        }
    }
    residual_factors f;
    f.residual_norm = double(e.norm());
    f.A = Matrix<float>(rank, in);
    f.B = Matrix<float>(out, rank);
    if (f.residual_norm == 0) return f;  // nothing was lost: R = 0
    Eigen::BDCSVD<MD> svd(e, Eigen::ComputeThinU | Eigen::ComputeThinV);
    const VD& sv = svd.singularValues();
    const VD root = sv.head(rank).cwiseSqrt();
    f.captured = double(sv.head(rank).squaredNorm() / sv.squaredNorm());
    as_eigen(f.B) = (svd.matrixU().leftCols(rank) * root.asDiagonal()).template cast<float>();
    as_eigen(f.A) = (root.asDiagonal() * svd.matrixV().leftCols(rank).transpose() * d.cwiseInverse().asDiagonal())
                        .template cast<float>();
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
    /// `stats(t)` its calibration or null.
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
            auto f = svd_residual(weights(t), compressed(t), rank_for(d, o, t), stats(t));
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
