// cpet/pet/ia3.hpp — (IA)³ (Liu et al. 2022, arXiv 2205.05638): learned rescaling vectors.
//
//   k ← l_k ⊙ k,  v ← l_v ⊙ v  (the projections' outputs, before RoPE),  h_ff ← l_ff ⊙ h_ff (the FFN hidden
//   activation, i.e. the input of down: PEFT's `feedforward_modules`)
// q may be rescaled too (PEFT allows it). Vectors start at one (the identity). Applied through the scale hook
// (pet/policy.hpp): one pass over k, v and the FFN hidden activation.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "cpet/pet/policy.hpp"

namespace cpet::pet {

struct ia3 {
    static constexpr const char* name() noexcept { return "ia3"; }
    /// The targets IA3 can rescale: outputs of q, k, v and the input of down.
    static constexpr target_set supported{target::q, target::k, target::v, target::down};

    struct options {
        target_set targets{target::k, target::v, target::down};  ///< the paper's choice
    };

    struct modules {
        static constexpr hook_set hooks{hook::scale};
        std::array<std::vector<float>, target_count> l;  ///< empty: target not rescaled
        layer_dims dims;

        std::optional<std::span<const float>> scale(target t) const {
            const auto& v = l[std::size_t(t)];
            if (v.empty()) return std::nullopt;
            return std::span<const float>(v);
        }
        /// Throws shape_error unless every vector has the width of its target in layer `d` (a format_error for a
        /// target IA3 cannot rescale).
        void check_fits(const layer_dims& d, const char* who) const {
            for (int i = 0; i < target_count; ++i) {
                const target t = target(i);
                const auto& v = l[std::size_t(i)];
                if (v.empty()) continue;
                require<format_error>(supported.contains(t), who, ": ia3 rescales target ", target_name(t),
                                      ", which IA3 does not support (q, k, v outputs and the input of down)");
                const index_t w = t == target::down ? d.in(t) : d.out(t);
                require<shape_error>(index_t(v.size()) == w, who, ": ia3 vector of ", target_name(t), " has ",
                                     v.size(), " values, this layer needs ", w);
            }
        }
        /// The width of target t's vector: the output of q/k/v, the input of down.
        index_t width(target t) const noexcept { return t == target::down ? dims.in(t) : dims.out(t); }
        void set(target t, std::span<const float> v) {
            check_supported(target_set{t});
            require<shape_error>(index_t(v.size()) == width(t), "ia3: vector of ", target_name(t), " has ", v.size(),
                                 " values, expected ", width(t));
            l[std::size_t(t)].assign(v.begin(), v.end());
        }
        std::vector<parameter_group> parameters() const {
            std::vector<parameter_group> out;
            for (int i = 0; i < target_count; ++i)
                if (!l[std::size_t(i)].empty())
                    out.push_back({cpet::detail::concat(target_name(target(i)), ".ia3_l"), index_t(l[std::size_t(i)].size())});
            return out;
        }
    };

    static void check_supported(target_set ts) {
        for (int i = 0; i < target_count; ++i)
            require<format_error>(!ts.contains(target(i)) || supported.contains(target(i)), "ia3: target ",
                                  target_name(target(i)), " is not supported (IA3 rescales the outputs of q, k, v and "
                                  "the input of down, the FFN hidden activation)");
    }

    /// Vectors of ones for the chosen targets.
    static modules make(const layer_dims& d) { return make(d, options{}); }
    static modules make(const layer_dims& d, const options& o, std::uint64_t /*seed*/ = 0) {
        d.check_targets(o.targets, name());
        check_supported(o.targets);
        modules m;
        m.dims = d;
        for (int i = 0; i < target_count; ++i)
            if (o.targets.contains(target(i))) m.l[std::size_t(i)].assign(std::size_t(m.width(target(i))), 1.f);
        return m;
    }
};

static_assert(check_pet_policy<ia3>() && hooks_of<ia3>::scale && !hooks_of<ia3>::linear);

}  // namespace cpet::pet
