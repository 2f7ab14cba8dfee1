// cpet/pet/lora.hpp — LoRA (Hu et al. 2021, arXiv 2106.09685): y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ on chosen linears.
//
// Scaling s = α/r (the paper, PEFT's default) or α/√r (rank-stabilised LoRA, Kalajdzievski 2023, PEFT's
// use_rslora): a type-level choice, since it is fixed by how the adapter was trained. Rank, α and the target
// modules are values. Unmerged execution is one thin GEMM U = x·Aᵀ [M, r] per target, with s·U·Bᵀ added inside
// the base kernel's output tile (the low-rank epilogue), so no second pass over y. Merging (W' = W + s·B·A) is
// exact only for dense weights (dense_f32, and the smaller dense weights structured pruning produces):
// pet::merge_weight here works on dense matrices, nn::merge_lora on whole layers and refuses other formats
// (nn::lora_mergeable: which formats merge is a question about formats, so it lives above both rooms).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "cpet/core/eigen.hpp"
#include "cpet/pet/lowrank.hpp"
#include "cpet/pet/policy.hpp"

namespace cpet::pet {

/// How α becomes the scale s of the low-rank term.
enum class lora_scaling {
    standard,         ///< s = α / r (Hu et al.)
    rank_stabilized,  ///< s = α / √r (rsLoRA)
};

template <lora_scaling Scaling = lora_scaling::standard>
struct lora_policy {
    static constexpr const char* name() noexcept {
        return Scaling == lora_scaling::standard ? "lora" : "rslora";
    }
    static constexpr lora_scaling scaling_kind = Scaling;

    /// s for rank r and α.
    static float scaling(index_t r, float alpha) noexcept {
        return Scaling == lora_scaling::standard ? alpha / float(r) : alpha / std::sqrt(float(r));
    }

    struct options {
        index_t rank = 8;
        float alpha = 8.f;
        target_set targets{target::q, target::v};  ///< PEFT's default for LLaMA / BERT
    };

    /// One layer's LoRA factors.
    struct modules {
        static constexpr hook_set hooks{hook::linear};
        detail::lowrank_factors f;
        float alpha = 8.f;

        // ---- LowrankParts (what a stack concatenates) and the linear hook ----
        index_t rank(target t) const noexcept { return f.rank(t); }
        void project(target t, ConstMatrixView<float> x, MatrixView<float> u, scratch&) const {
            f.project_linear(t, x, u);
        }
        ConstMatrixView<float> up(target t) const noexcept { return f.B[std::size_t(t)]; }
        float lowrank_scale(target t) const noexcept { return scaling(rank(t), alpha); }
        std::optional<lowrank_args> lowrank(target t, ConstMatrixView<float> x, scratch& s) const {
            return lowrank_from_parts(*this, t, x, s);
        }

        void check_fits(const layer_dims& d, const char* who) const { f.check_fits(d, who, name()); }

        // ---- data ----
        target_set targets() const noexcept { return f.targets(); }
        ConstMatrixView<float> A(target t) const noexcept { return f.A[std::size_t(t)]; }
        ConstMatrixView<float> B(target t) const noexcept { return f.B[std::size_t(t)]; }
        /// Sets target t's factors explicitly (A [r, in], B [out, r]; checked against the layer).
        void set(target t, ConstMatrixView<float> a, ConstMatrixView<float> b) { f.set(name(), t, a, b); }
        std::vector<parameter_group> parameters() const {
            std::vector<parameter_group> out;
            f.parameters(out, "lora_A", "lora_B");
            return out;
        }
    };

    /// Fresh modules for a layer: A Kaiming-uniform (seeded), B zero (PEFT's init: the adapter starts at zero).
    /// Throws shape_error on a rank beyond a target's min(in, out) or a target the layer lacks.
    static modules make(const layer_dims& d, const options& o, std::uint64_t seed = 0) {
        d.check_targets(o.targets, name());
        modules m;
        m.f.dims = d;
        m.alpha = o.alpha;
        for (int i = 0; i < target_count; ++i) {
            const target t = target(i);
            if (!o.targets.contains(t)) continue;
            detail::check_rank(name(), o.rank, d, t);
            m.f.A[std::size_t(i)] = detail::kaiming_uniform(o.rank, d.in(t), seed, t);
            m.f.B[std::size_t(i)] = Matrix<float>(d.out(t), o.rank);
        }
        return m;
    }
};

using lora = lora_policy<lora_scaling::standard>;
using rslora = lora_policy<lora_scaling::rank_stabilized>;

static_assert(check_pet_policy<lora>() && hooks_of<lora>::linear && LowrankParts<lora::modules>);

/// W ± s·B·A for the LoRA of target t (computed in double, rounded once): sign +1 merges, -1 unmerges.
/// W is [out, in] of that target; returns W unchanged when t is not adapted.
template <class Modules>
    requires requires(const Modules& m) { m.f.dims; m.alpha; }
Matrix<float> merge_weight(ConstMatrixView<float> w, const Modules& m, target t, int sign = +1) {
    const auto who = cpet::detail::concat("LoRA merge: weight of ", target_name(t));
    check_shape(w, m.f.dims.out(t), m.f.dims.in(t), who.c_str());
    Matrix<float> out(w);
    if (m.rank(t) == 0) return out;
    using MD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    const MD delta = double(sign) * double(m.lowrank_scale(t)) * as_eigen(m.B(t)).template cast<double>() *
                     as_eigen(m.A(t)).template cast<double>();
    as_eigen(out) = (as_eigen(w).template cast<double>() + delta).template cast<float>();
    return out;
}

}  // namespace cpet::pet
