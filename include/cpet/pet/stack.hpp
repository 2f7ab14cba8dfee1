// cpet/pet/stack.hpp — several PET policies at once in one layer: pet::stack<P1, P2, ...> is itself a policy.
//
// CPET's setting is stack<recovery, lora> (recovery modules beside the compressed weights plus the task's LoRA);
// the MAM adapter (He et al. 2022) is stack<prefix_tuning, scaled_parallel_adapter>. The order of application
// within a layer is the one of pet/policy.hpp, for any stack:
//   1. linear hooks: all members' low-rank terms are concatenated along the rank, U = [U1 | U2 | ...] and
//      B = [s1·B1 | s2·B2 | ...] with scale 1, so the stack still adds ONE fused term in the base GEMM's epilogue
//      (a sum, so the members' order does not matter); bias deltas ride in the same epilogue;
//   2. scale hooks (IA3) on q/k/v outputs and the FFN hidden activation;
//   3. the attention hook's prefix rows;
//   4. sublayer hooks, in the stack's order P1, P2, ...: each sees the output the previous one left.
// At most one member may use each of the attention, input, scale, bias and norm hooks (concatenating prefixes or
// multiplying scales would need storage the const modules do not have); the static_asserts say so.
#pragma once

#include <cstddef>
#include <optional>
#include <span>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpet/pet/accounting.hpp"
#include "cpet/pet/policy.hpp"

namespace cpet::pet {

template <PetPolicy... Ps>
struct stack {
    static_assert(sizeof...(Ps) >= 1, "cpet pet::stack: stack at least one policy");
    static constexpr const char* name() noexcept { return "stack"; }
    /// "stack<recovery,lora>".
    static std::string full_name() {
        std::string s = "stack<";
        ((s += std::string(Ps::name()) + ","), ...);
        s.back() = '>';
        return s;
    }

private:
    /// How many members declare hook H.
    template <hook H>
    static constexpr int count = (int(uses_hook<typename Ps::modules, H>) + ...);

public:
    static constexpr bool any_linear = count<hook::linear> > 0;
    static constexpr bool any_sublayer = count<hook::sublayer> > 0;
    static_assert(count<hook::attention> <= 1, "cpet pet::stack: at most one member may use the attention hook (prefix)");
    static_assert(count<hook::input> <= 1, "cpet pet::stack: at most one member may use the input hook (prompt)");
    static_assert(count<hook::scale> <= 1, "cpet pet::stack: at most one member may use the scale hook (IA3)");
    static_assert(count<hook::bias> <= 1, "cpet pet::stack: at most one member may use the bias hook (BitFit)");
    static_assert(count<hook::norm> <= 1, "cpet pet::stack: at most one member may use the norm hook (BitFit's β)");
    static_assert(((!uses_hook<typename Ps::modules, hook::linear> || LowrankParts<typename Ps::modules>) && ...),
                  "cpet pet::stack: a stacked linear-hook policy must expose LowrankParts (rank, project, up, "
                  "lowrank_scale) so its term can be concatenated along the rank into one fused term");

    struct modules {
        /// Every hook some member declares.
        static constexpr hook_set hooks = (declared_hooks<typename Ps::modules>() | ...);
        std::tuple<typename Ps::modules...> parts;

        modules() = default;
        explicit modules(typename Ps::modules... ms) : parts(std::move(ms)...) {}

        template <std::size_t I>
        auto& get() noexcept { return std::get<I>(parts); }
        template <std::size_t I>
        const auto& get() const noexcept { return std::get<I>(parts); }

        // ---- linear hook: one fused term ----
        index_t rank(target t) const noexcept
            requires any_linear
        {
            index_t r = 0;
            each([&](const auto& m) {
                if constexpr (LowrankParts<std::decay_t<decltype(m)>>) r += m.rank(t);
            });
            return r;
        }
        std::optional<lowrank_args> lowrank(target t, ConstMatrixView<float> x, scratch& s) const
            requires any_linear
        {
            index_t R = 0, N = 0;
            int active = 0;
            each([&](const auto& m) {
                if constexpr (LowrankParts<std::decay_t<decltype(m)>>) {
                    const index_t r = m.rank(t);
                    if (r) ++active, R += r, N = m.up(t).rows();
                }
            });
            if (R == 0) return std::nullopt;
            if (active == 1) {  // nothing to concatenate: the member's own term
                std::optional<lowrank_args> out;
                each([&](const auto& m) {
                    if constexpr (LowrankParts<std::decay_t<decltype(m)>>)
                        if (m.rank(t)) out = lowrank_from_parts(m, t, x, s);
                });
                return out;
            }
            auto u = s.matrix(slot::lowrank_u, x.rows(), R);
            auto b = s.matrix(slot::lowrank_b, N, R);
            index_t c = 0;
            each([&](const auto& m) {
                if constexpr (LowrankParts<std::decay_t<decltype(m)>>) {
                    const index_t r = m.rank(t);
                    if (!r) return;
                    const ConstMatrixView<float> bi = m.up(t);
                    require<shape_error>(bi.rows() == N, "pet::stack: members' B of target ", target_name(t),
                                         " have ", bi.rows(), " and ", N, " rows");
                    m.project(t, x, u.middle_cols(c, r), s);
                    const float si = m.lowrank_scale(t);
                    for (index_t i = 0; i < N; ++i)
                        for (index_t j = 0; j < r; ++j) b(i, c + j) = si * bi(i, j);
                    c += r;
                }
            });
            return lowrank_args{u, b, 1.f};
        }
        // ---- sublayer hooks: chained in order ----
        void sublayer(pet::sublayer w, ConstMatrixView<float> in, MatrixView<float> out, scratch& s) const
            requires any_sublayer
        {
            each([&](const auto& m) {
                if constexpr (uses_hook<std::decay_t<decltype(m)>, hook::sublayer>) m.sublayer(w, in, out, s);
            });
        }

        // ---- the single-member hooks ----
        std::optional<prefix_kv> prefix() const
            requires(count<hook::attention> == 1)
        {
            std::optional<prefix_kv> p;
            each([&](const auto& m) {
                if constexpr (uses_hook<std::decay_t<decltype(m)>, hook::attention>) p = m.prefix();
            });
            return p;
        }
        ConstMatrixView<float> virtual_tokens() const
            requires(count<hook::input> == 1)
        {
            ConstMatrixView<float> v;
            each([&](const auto& m) {
                if constexpr (uses_hook<std::decay_t<decltype(m)>, hook::input>) v = m.virtual_tokens();
            });
            return v;
        }
        std::optional<std::span<const float>> scale(target t) const
            requires(count<hook::scale> == 1)
        {
            std::optional<std::span<const float>> v;
            each([&](const auto& m) {
                if constexpr (uses_hook<std::decay_t<decltype(m)>, hook::scale>) v = m.scale(t);
            });
            return v;
        }
        std::optional<std::span<const float>> bias_delta(target t) const
            requires(count<hook::bias> == 1)
        {
            std::optional<std::span<const float>> v;
            each([&](const auto& m) {
                if constexpr (uses_hook<std::decay_t<decltype(m)>, hook::bias>) v = m.bias_delta(t);
            });
            return v;
        }
        std::optional<std::span<const float>> norm_bias_delta(norm_site n) const
            requires(count<hook::norm> == 1)
        {
            std::optional<std::span<const float>> v;
            each([&](const auto& m) {
                if constexpr (uses_hook<std::decay_t<decltype(m)>, hook::norm>) v = m.norm_bias_delta(n);
            });
            return v;
        }

        /// Every member that can check itself against the layer does; then the concatenated low-rank terms must
        /// agree on each target's output width (they do when each member fits).
        void check_fits(const layer_dims& d, const char* who) const {
            each([&](const auto& m) {
                if constexpr (FitsCheck<std::decay_t<decltype(m)>>) m.check_fits(d, who);
            });
        }

        /// Members' groups, prefixed by the member's name ("lora.q.lora_A").
        std::vector<parameter_group> parameters() const {
            std::vector<parameter_group> out;
            each_named([&](const char* n, const auto& m) {
                if constexpr (CountsParameters<std::decay_t<decltype(m)>>)
                    for (auto g : m.parameters()) {
                        g.name = cpet::detail::concat(n, '.', g.name);
                        out.push_back(std::move(g));
                    }
            });
            return out;
        }

    private:
        template <class F>
        void each(F&& f) const {
            std::apply([&](const auto&... m) { (f(m), ...); }, parts);
        }
        template <class F>
        void each_named(F&& f) const {
            each_named_impl(f, std::index_sequence_for<Ps...>{});
        }
        template <class F, std::size_t... I>
        void each_named_impl(F& f, std::index_sequence<I...>) const {
            (f(std::tuple_element_t<I, std::tuple<Ps...>>::name(), std::get<I>(parts)), ...);
        }
    };
};

}  // namespace cpet::pet
