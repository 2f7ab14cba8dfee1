// cpet/pet/task.hpp — a task as a run-time value: one layer's modules of ANY of the library's PET methods, mixed
// as the task needs (LoRA alone, CPET's recovery + LoRA, MAM's prefix + scaled parallel adapter, ...), chosen when
// the task is made rather than in the layer's type.
//
// A layer or stack takes it like any modules type (its type names no PET method), so one backbone object runs
// tasks of every kind, and a registry can hold tasks of different kinds in one container. A task holds its methods in the order they were added and combines
// them exactly as pet::stack combines its members (pet/stack.hpp): the low-rank terms of all linear-hook methods
// concatenated along the rank into ONE fused term (a single method's term passes through untouched, so a
// LoRA-only task costs what pet::lora's modules cost), sublayer hooks chained in order, and at most one method per
// attention / input / scale / bias / norm hook (add() refuses a second). Which hooks are present is run-time
// data (`active(h)`): the layer fuses the residual add into the GEMM when no method has a sublayer hook.
#pragma once

#include <cstddef>
#include <optional>
#include <span>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "cpet/pet/accounting.hpp"
#include "cpet/pet/adapter.hpp"
#include "cpet/pet/bitfit.hpp"
#include "cpet/pet/ia3.hpp"
#include "cpet/pet/lora.hpp"
#include "cpet/pet/policy.hpp"
#include "cpet/pet/prefix.hpp"
#include "cpet/pet/prompt.hpp"
#include "cpet/pet/recovery.hpp"

namespace cpet::pet {

namespace detail {

template <class... Ps>
struct method_list {
    using variant = std::variant<typename Ps::modules...>;
    /// The policy name of alternative i.
    static constexpr std::string_view names[] = {Ps::name()...};
};

/// Every method a task may hold (a new method of the library is one more line here).
using methods = method_list<lora, rslora, recovery, recovery_linear, adapter, parallel_adapter,
                            scaled_parallel_adapter, prefix_tuning, p_tuning_v2, prompt_tuning, ia3, bitfit>;

template <class M, class V>
inline constexpr bool is_alternative = false;
template <class M, class... Ts>
inline constexpr bool is_alternative<M, std::variant<Ts...>> = (std::is_same_v<M, Ts> || ...);

/// The index of M among the alternatives of V (is_alternative<M, V>).
template <class M, class V>
inline constexpr std::size_t index_in = 0;
template <class M, class... Ts>
inline constexpr std::size_t index_in<M, std::variant<Ts...>> = [] {
    std::size_t i = 0;
    (void)((std::is_same_v<M, Ts> ? true : (++i, false)) || ...);
    return i;
}();

}  // namespace detail

/// One layer's modules of a task, of any methods (see the top of this file).
class task {
public:
    using method = detail::methods::variant;
    /// Every hook may be present; which are is known at run time (active()).
    static constexpr hook_set hooks{hook::linear, hook::sublayer, hook::attention, hook::input,
                                    hook::scale,  hook::bias,     hook::norm};

    task() = default;
    /// A task of the given methods' modules, in this order.
    template <class... Ms>
        requires(sizeof...(Ms) > 0 && (detail::is_alternative<std::decay_t<Ms>, method> && ...))
    explicit task(Ms&&... ms) {
        methods_.reserve(sizeof...(Ms));
        (add(std::forward<Ms>(ms)), ...);
    }

    /// Appends one method's modules. Throws format_error when the task already holds a method using the same
    /// single-member hook (attention, input, scale, bias or norm: two prefixes or two IA3 vectors would have to be
    /// merged, which is the caller's decision, not ours).
    template <class M>
    task& add(M&& m) {
        using D = std::decay_t<M>;
        static_assert(detail::is_alternative<D, method>,
                      "cpet pet::task: not the modules of one of the library's PET methods (see detail::methods in "
                      "pet/task.hpp; a new method is one more entry there)");
        constexpr hook_set h = declared_hooks<D>();
        for (hook single : {hook::attention, hook::input, hook::scale, hook::bias, hook::norm})
            require<format_error>(!(h.contains(single) && present_.contains(single)), "pet::task: the task already "
                                  "holds a method using the ", hook_name(single), " hook; a task may hold one (adding ",
                                  detail::methods::names[detail::index_in<D, method>], ")");
        methods_.emplace_back(std::in_place_type<D>, std::forward<M>(m));
        present_ = present_ | h;
        return *this;
    }

    std::size_t size() const noexcept { return methods_.size(); }
    bool empty() const noexcept { return methods_.empty(); }
    const method& at(std::size_t i) const { return methods_.at(i); }
    /// The modules of method i as type M (throws std::bad_variant_access when it holds another).
    template <class M>
    const M& get(std::size_t i) const {
        return std::get<M>(methods_.at(i));
    }
    /// Method i as type M for in-place changes of its values (a trainer's optimizer updates the tensors of the
    /// methods it trains; the method's kind, and so the task's hooks, cannot change this way).
    template <class M>
    M& get(std::size_t i) {
        return std::get<M>(methods_.at(i));
    }
    /// Calls f(modules) with method i's modules, mutable (see the non-const get).
    template <class F>
    decltype(auto) visit_method(std::size_t i, F&& f) {
        return std::visit(std::forward<F>(f), methods_.at(i));
    }
    template <class F>
    decltype(auto) visit_method(std::size_t i, F&& f) const {
        return std::visit(std::forward<F>(f), methods_.at(i));
    }
    /// Whether some method uses hook h.
    bool active(hook h) const noexcept { return present_.contains(h); }
    /// "lora", "prefix_tuning", ... of method i.
    std::string_view method_name(std::size_t i) const { return name_of(methods_.at(i)); }

    // ---- the check against a layer ----
    void check_fits(const layer_dims& d, const char* who) const {
        for (const auto& m : methods_) std::visit([&](const auto& x) { x.check_fits(d, who); }, m);
    }

    // ---- linear hook: one fused term (as pet::stack) ----
    index_t rank(target t) const noexcept {
        index_t r = 0;
        for (const auto& m : methods_)
            std::visit([&](const auto& x) {
                if constexpr (LowrankParts<std::decay_t<decltype(x)>>) r += x.rank(t);
            }, m);
        return r;
    }
    std::optional<lowrank_args> lowrank(target t, ConstMatrixView<float> x, scratch& s) const {
        if (!present_.contains(hook::linear)) return std::nullopt;
        index_t R = 0, N = 0;
        int active_terms = 0;
        const method* only = nullptr;
        for (const auto& m : methods_)
            std::visit([&](const auto& mm) {
                if constexpr (LowrankParts<std::decay_t<decltype(mm)>>) {
                    if (const index_t r = mm.rank(t)) ++active_terms, R += r, N = mm.up(t).rows(), only = &m;
                }
            }, m);
        if (R == 0) return std::nullopt;
        std::optional<lowrank_args> out;
        if (active_terms == 1) {  // nothing to concatenate: the method's own term
            std::visit([&](const auto& mm) {
                if constexpr (LowrankParts<std::decay_t<decltype(mm)>>) out = lowrank_from_parts(mm, t, x, s);
            }, *only);
            return out;
        }
        auto u = s.matrix(slot::lowrank_u, x.rows(), R);
        auto b = s.matrix(slot::lowrank_b, N, R);
        index_t c = 0;
        for (const auto& m : methods_)
            std::visit([&](const auto& mm) {
                if constexpr (LowrankParts<std::decay_t<decltype(mm)>>) {
                    const index_t r = mm.rank(t);
                    if (!r) return;
                    const ConstMatrixView<float> bi = mm.up(t);  // [N, r]: rows agree, check_fits made sure
                    mm.project(t, x, u.middle_cols(c, r), s);
                    const float si = mm.lowrank_scale(t);
                    for (index_t i = 0; i < N; ++i)
                        for (index_t j = 0; j < r; ++j) b(i, c + j) = si * bi(i, j);
                    c += r;
                }
            }, m);
        return lowrank_args{u, b, 1.f};
    }

    // ---- sublayer hooks: chained in order ----
    void sublayer(pet::sublayer w, ConstMatrixView<float> in, MatrixView<float> out, scratch& s) const {
        if (!present_.contains(hook::sublayer)) return;
        for (const auto& m : methods_)
            std::visit([&](const auto& mm) {
                if constexpr (uses_hook<std::decay_t<decltype(mm)>, hook::sublayer>) mm.sublayer(w, in, out, s);
            }, m);
    }

    // ---- the single-method hooks ----
    std::optional<prefix_kv> prefix() const {
        std::optional<prefix_kv> p;
        if (present_.contains(hook::attention))
            each_with<hook::attention>([&](const auto& mm) { p = mm.prefix(); });
        return p;
    }
    ConstMatrixView<float> virtual_tokens() const {
        ConstMatrixView<float> v;
        if (present_.contains(hook::input))
            each_with<hook::input>([&](const auto& mm) { v = mm.virtual_tokens(); });
        return v;
    }
    std::optional<std::span<const float>> scale(target t) const {
        std::optional<std::span<const float>> v;
        if (present_.contains(hook::scale)) each_with<hook::scale>([&](const auto& mm) { v = mm.scale(t); });
        return v;
    }
    std::optional<std::span<const float>> bias_delta(target t) const {
        std::optional<std::span<const float>> v;
        if (present_.contains(hook::bias)) each_with<hook::bias>([&](const auto& mm) { v = mm.bias_delta(t); });
        return v;
    }
    std::optional<std::span<const float>> norm_bias_delta(norm_site n) const {
        std::optional<std::span<const float>> v;
        if (present_.contains(hook::norm)) each_with<hook::norm>([&](const auto& mm) { v = mm.norm_bias_delta(n); });
        return v;
    }

    /// Every method's groups, prefixed by its name ("lora.q.lora_A").
    std::vector<parameter_group> parameters() const {
        std::vector<parameter_group> out;
        for (const auto& m : methods_) {
            const std::string_view n = name_of(m);
            std::visit([&](const auto& mm) {
                for (auto g : mm.parameters()) {
                    g.name = cpet::detail::concat(n, '.', g.name);
                    out.push_back(std::move(g));
                }
            }, m);
        }
        return out;
    }
    /// Bytes of the task's parameters (fp32 values: what it adds to a resident backbone).
    std::size_t bytes() const {
        std::size_t n = 0;
        for (const auto& g : parameters()) n += std::size_t(g.count) * sizeof(float);
        return n;
    }

private:
    static std::string_view name_of(const method& m) noexcept { return detail::methods::names[m.index()]; }
    template <hook H, class F>
    void each_with(F&& f) const {
        for (const auto& m : methods_)
            std::visit([&](const auto& mm) {
                if constexpr (uses_hook<std::decay_t<decltype(mm)>, H>) f(mm);
            }, m);
    }

    std::vector<method> methods_;
    hook_set present_;
};

static_assert(check_modules<task>());

}  // namespace cpet::pet
