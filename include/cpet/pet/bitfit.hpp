// cpet/pet/bitfit.hpp — BitFit (Ben Zaken et al. 2022, arXiv 2106.10199): only the biases are tuned.
//
// The task keeps Δb per linear (the backbone's biases stay shared and const): y = x·Wᵀ + (b + Δb). A backbone
// without biases (LLaMA) gets them, starting from zero. Applied through the bias hook: the layer sums b + Δb
// into scratch and hands it to the GEMM epilogue, so it costs no pass over y.
// The paper also tunes LayerNorm's β: the task keeps Δβ [d_model] for norm1 and norm2, applied through the norm
// hook (β + Δβ summed into scratch, handed to the norm kernel; the backbone's β stays shared). RMSNorm (LLaMA)
// has no β: with options::norms unset a LLaMA task simply has no norm part; asking for it (norms = true, or
// set_norm on such a layer) throws shape_error, and a layer with RMSNorm refuses a task carrying a Δβ.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "cpet/pet/policy.hpp"

namespace cpet::pet {

struct bitfit {
    static constexpr const char* name() noexcept { return "bitfit"; }

    struct options {
        target_set targets = target_set::all();  ///< every linear the layer has
        /// LayerNorm β of norm1 and norm2: unset, where the layer has them (LayerNorm: yes; RMSNorm: none);
        /// true: required (shape_error for an RMSNorm layer); false: linear biases only.
        std::optional<bool> norms = std::nullopt;
    };

    struct modules {
        static constexpr hook_set hooks{hook::bias, hook::norm};
        std::array<std::vector<float>, target_count> delta;  ///< Δb [out]; empty: bias not tuned
        std::array<std::vector<float>, norm_site_count> norm_delta;  ///< Δβ [d_model]; empty: β not tuned
        layer_dims dims;

        std::optional<std::span<const float>> bias_delta(target t) const {
            const auto& v = delta[std::size_t(t)];
            if (v.empty()) return std::nullopt;
            return std::span<const float>(v);
        }
        std::optional<std::span<const float>> norm_bias_delta(norm_site n) const {
            const auto& v = norm_delta[std::size_t(n)];
            if (v.empty()) return std::nullopt;
            return std::span<const float>(v);
        }
        /// Throws shape_error unless every Δb has its linear's out width in layer `d` and every Δβ d_model values
        /// (a Δβ on a layer without β is refused too: RMSNorm has none).
        void check_fits(const layer_dims& d, const char* who) const {
            for (int i = 0; i < target_count; ++i) {
                const target t = target(i);
                const auto& v = delta[std::size_t(i)];
                if (v.empty()) continue;
                require<shape_error>(d.has(t), who, ": bitfit tunes the bias of ", target_name(t),
                                     ", which this layer does not have");
                require<shape_error>(index_t(v.size()) == d.out(t), who, ": bitfit bias delta of ", target_name(t),
                                     " has ", v.size(), " values, this layer needs ", d.out(t));
            }
            for (int i = 0; i < norm_site_count; ++i) {
                const auto& v = norm_delta[std::size_t(i)];
                if (v.empty()) continue;
                require<shape_error>(d.norm_bias, who, ": the task tunes the β of ", norm_site_name(norm_site(i)),
                                     " (bitfit), but the layer's norms are RMSNorm, which have no β");
                require<shape_error>(index_t(v.size()) == d.d_model, who, ": bitfit β delta of ",
                                     norm_site_name(norm_site(i)), " has ", v.size(), " values, this layer needs ",
                                     d.d_model, " (d_model)");
            }
        }
        void set(target t, std::span<const float> v) {
            dims.check_targets(target_set{t}, name());
            require<shape_error>(index_t(v.size()) == dims.out(t), "bitfit: bias delta of ", target_name(t), " has ",
                                 v.size(), " values, expected ", dims.out(t));
            delta[std::size_t(t)].assign(v.begin(), v.end());
        }
        void set_norm(norm_site n, std::span<const float> v) {
            check_norms(dims, name());
            require<shape_error>(index_t(v.size()) == dims.d_model, "bitfit: β delta of ", norm_site_name(n), " has ",
                                 v.size(), " values, expected ", dims.d_model, " (d_model)");
            norm_delta[std::size_t(n)].assign(v.begin(), v.end());
        }
        std::vector<parameter_group> parameters() const {
            std::vector<parameter_group> out;
            for (int i = 0; i < target_count; ++i)
                if (!delta[std::size_t(i)].empty())
                    out.push_back({cpet::detail::concat(target_name(target(i)), ".bias"), index_t(delta[std::size_t(i)].size())});
            for (int i = 0; i < norm_site_count; ++i)
                if (!norm_delta[std::size_t(i)].empty())
                    out.push_back({cpet::detail::concat(norm_site_name(norm_site(i)), ".bias"),
                                   index_t(norm_delta[std::size_t(i)].size())});
            return out;
        }
    };

    /// Throws shape_error unless the layer's norms have a β to tune.
    static void check_norms(const layer_dims& d, const char* who) {
        require<shape_error>(d.norm_bias, who, ": the layer's norms have no β to tune (RMSNorm, or layer_dims."
                             "norm_bias unset); BitFit's norm part exists for LayerNorm layers only "
                             "(options::norms = false tunes the linear biases alone)");
    }

    /// Zero deltas for the chosen targets (with target_set::all(), the gate only where the layer has one).
    static modules make(const layer_dims& d) { return make(d, options{}); }
    static modules make(const layer_dims& d, const options& o, std::uint64_t /*seed*/ = 0) {
        target_set ts;
        for (int i = 0; i < target_count; ++i)
            if (o.targets.contains(target(i)) && (d.has(target(i)) || !(o.targets == target_set::all())))
                ts.insert(target(i));
        d.check_targets(ts, name());
        modules m;
        m.dims = d;
        for (int i = 0; i < target_count; ++i)
            if (ts.contains(target(i))) m.delta[std::size_t(i)].assign(std::size_t(d.out(target(i))), 0.f);
        if (o.norms.value_or(d.norm_bias)) {
            check_norms(d, name());
            for (auto& v : m.norm_delta) v.assign(std::size_t(d.d_model), 0.f);
        }
        return m;
    }
};

static_assert(check_pet_policy<bitfit>() && hooks_of<bitfit>::bias && hooks_of<bitfit>::norm && !hooks_of<bitfit>::linear);

}  // namespace cpet::pet
