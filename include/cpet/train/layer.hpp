// cpet/train/layer.hpp — the backward pass of a TransformerLayer with respect to a task's PET modules and the
// layer's input, the backbone frozen.
//
// Training runs in two halves, as autograd does, but with the graph written out by hand for the one graph a layer
// is: `forward` computes the layer's output exactly as TransformerLayer::forward does (same weight formats, same
// SIMD GEMMs with bias / residual fused, packed once at load) and keeps on a tape what the backward needs; then
// `backward` takes dL/dy and returns dL/dx while accumulating the modules' gradients into the task's gradient store.
// Every frozen weight contributes dx = dy·W through its format's matmul_t (never a dense copy of a compressed
// weight). Norm parameters and biases are frozen too.
//
//   post-LN (BERT):  t = x + A(o(att(q,k,v of x)));  h = N1(t);  t2 = h + F(ffn(h));   y = N2(t2)
//   pre-LN (LLaMA):  t = x + A(o(att(q,k,v of N1(x))));          y = t + F(ffn(N2(t)))
//   attention per sequence b and head h (KV group g):  P = softmax(q_h·[pk_g; k_g]ᵀ/√d_h + mask), ctx_h = P·[pv_g; v_g]
//   (pk, pv: the prefix rows of prefix tuning / P-tuning v2, no RoPE, seen by every query, causal or not)
//   a linear with low-rank terms:  y = x·Wᵀ + b + Σ s·φ(x·Aᵀ)·Bᵀ,  φ = identity (LoRA, linear recovery) or GELU
//   (the paper's recovery bypass)
//   A, F: the adapters of the attention / FFN sublayer chained in the task's order, each out ← out + s·(f(src·W_dᵀ +
//   b_d)·W_uᵀ + b_u) with src = out (sequential, Houlsby) or the sublayer's input (parallel, scaled parallel);
//   identity without adapters (the residual then rides in the o / down GEMM again)
//
// The tape holds, per layer: the input, q/k/v after RoPE, the attention probabilities of every (sequence, head)
// (B·H·S·(P+S) values), the o-input, the normalised rows and 1/σ of both norms, the FFN pre-activations and hidden
// activation, U = x·Aᵀ of every low-rank term and each adapter's pre-activation, activation (and, sequential, its
// input): layer_tape::bytes() reports it; train/model.hpp offers to keep only the layers' inputs and recompute each
// layer's tape during the backward.
//
// Which methods train: every method a pet::task can hold — LoRA, rsLoRA, recovery (GELU) and linear recovery
// (linear hook), IA3 (scale hook: the outputs of q, k, v and the input of down), BitFit (Δb of the linears, Δβ of
// the LayerNorms), adapters in all three forms (sublayer hook: W_d, b_d, W_u, b_u), prefix tuning / P-tuning v2
// (attention hook: the per-layer rows pk, pv; prefix tuning's reparametrisation MLP is folded before training, so
// both train the rows directly) and prompt tuning (input hook: the virtual tokens, which train/model.hpp puts before
// each sequence and whose gradient it gathers from layer 0's input gradient) — alone, together in a pet::task, or
// in a pet::stack (MAM's prefix + scaled parallel adapter, CPET's recovery + LoRA).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <limits>
#include <memory>
#include <span>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpet/arch/dispatch.hpp"
#include "cpet/core/eigen.hpp"
#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/core/parallel.hpp"
#include "cpet/kernels/activations.hpp"
#include "cpet/kernels/rope.hpp"
#include "cpet/nn/batch.hpp"
#include "cpet/nn/config.hpp"
#include "cpet/nn/layer.hpp"
#include "cpet/pet/adapter.hpp"
#include "cpet/pet/bitfit.hpp"
#include "cpet/pet/ia3.hpp"
#include "cpet/pet/lora.hpp"
#include "cpet/pet/none.hpp"
#include "cpet/pet/prefix.hpp"
#include "cpet/pet/prompt.hpp"
#include "cpet/pet/recovery.hpp"
#include "cpet/pet/stack.hpp"
#include "cpet/pet/task.hpp"
#include "cpet/train/parameter.hpp"

namespace cpet::train {

// ---------------------------------------------------------------------------------------------------------------
// Trainable methods and their tensors
// ---------------------------------------------------------------------------------------------------------------

/// The methods whose terms are low-rank linear-hook terms.
template <class M>
inline constexpr bool lowrank_method =
    std::is_same_v<M, pet::lora::modules> || std::is_same_v<M, pet::rslora::modules> ||
    std::is_same_v<M, pet::recovery::modules> || std::is_same_v<M, pet::recovery_linear::modules>;

/// Adapters of the three forms and any nonlinearity (sublayer hook): the modules of some pet::adapter_policy.
template <class M>
concept adapter_method = requires {
    M::form;
    M::act;
} && std::is_same_v<M, typename pet::adapter_policy<M::form, M::act>::modules>;
/// Prefix tuning and P-tuning v2 (attention hook): both train their per-layer key / value rows.
template <class M>
inline constexpr bool prefix_method =
    std::is_same_v<M, pet::prefix_tuning::modules> || std::is_same_v<M, pet::p_tuning_v2::modules>;

/// Whether modules of type M train here: the low-rank methods, IA3 (scale hook), BitFit (bias and norm hooks),
/// adapters (sublayer hook), prefix tuning / P-tuning v2 (attention hook) and prompt tuning (input hook).
template <class M>
inline constexpr bool trainable_method = lowrank_method<M> || std::is_same_v<M, pet::ia3::modules> ||
                                         std::is_same_v<M, pet::bitfit::modules> || adapter_method<M> ||
                                         prefix_method<M> || std::is_same_v<M, pet::prompt_tuning::modules>;

namespace detail {
template <class T>
struct all_trainable : std::false_type {};
template <class... Ms>
struct all_trainable<std::tuple<Ms...>> : std::bool_constant<(trainable_method<Ms> && ...)> {};
}  // namespace detail

/// The modules of a pet::stack<P...> whose members all train here (their tuple `parts`).
template <class M>
concept trainable_stack = requires(M& m) { m.parts; } && detail::all_trainable<decltype(M::parts)>::value;

/// One low-rank term of one linear: y += s·φ(x·Aᵀ)·Bᵀ, and where its gradients go.
struct lowrank_term {
    ConstMatrixView<float> A;  ///< [r, in]
    ConstMatrixView<float> B;  ///< [out, r]
    MatrixView<float> gA;      ///< dL/dA, accumulated
    MatrixView<float> gB;      ///< dL/dB, accumulated
    float scale = 1.f;
    bool gelu = false;  ///< φ = GELU (erf), the paper's recovery bypass
    index_t rank() const noexcept { return A.rows(); }
};

/// A trainable vector (IA3's l, BitFit's Δb or Δβ) and its gradient.
struct vector_term {
    std::span<const float> v;
    std::span<float> g;
    explicit operator bool() const noexcept { return !v.empty(); }
};

/// One adapter after a sublayer: out ← out + s·(f(src·W_dᵀ + b_d)·W_uᵀ + b_u), and where its gradients go.
struct adapter_term {
    ConstMatrixView<float> down;  ///< W_d [r, d]
    ConstMatrixView<float> up;    ///< W_u [d, r]
    std::span<const float> b_down, b_up;
    MatrixView<float> g_down, g_up;  ///< accumulated
    std::span<float> gb_down, gb_up;
    float scale = 1.f;
    kernels::activation act = kernels::activation::relu;
    bool sequential = true;  ///< src = the sublayer's output (Houlsby); else its input (parallel forms)
    index_t bottleneck() const noexcept { return down.rows(); }
};

/// The prefix rows of one layer (prefix tuning / P-tuning v2) and their gradients.
struct prefix_term {
    ConstMatrixView<float> k, v;  ///< [P, kv_dim]
    MatrixView<float> gk, gv;     ///< accumulated
    index_t length() const noexcept { return k.rows(); }
    explicit operator bool() const noexcept { return k.rows() > 0; }
};

/// Prompt tuning's virtual tokens (layer 0 only; train/model.hpp puts them before each sequence) and their gradient.
struct prompt_term {
    ConstMatrixView<float> tokens;  ///< [P, d_model]
    MatrixView<float> g;            ///< accumulated
    index_t length() const noexcept { return tokens.rows(); }
    explicit operator bool() const noexcept { return tokens.rows() > 0; }
};

/// One layer's trainable terms, per target, in the task's order (what bind() found).
struct layer_terms {
    std::array<std::vector<lowrank_term>, pet::target_count> at;
    std::array<vector_term, pet::target_count> scale;       ///< IA3: outputs of q, k, v; the input of down
    std::array<vector_term, pet::target_count> bias;        ///< BitFit: Δb of a linear
    std::array<vector_term, pet::norm_site_count> norm_beta;  ///< BitFit: Δβ of a LayerNorm
    std::array<std::vector<adapter_term>, 2> adapters;        ///< [pet::sublayer]: chained in the task's order
    prefix_term prefix;                                       ///< attention hook
    prompt_term prompt;                                       ///< input hook (layer 0)
    const std::vector<lowrank_term>& of(pet::target t) const noexcept { return at[std::size_t(t)]; }
    const std::vector<adapter_term>& after(pet::sublayer w) const noexcept { return adapters[std::size_t(w)]; }
    bool empty() const noexcept {
        for (const auto& v : at)
            if (!v.empty()) return false;
        for (const auto& v : scale)
            if (v) return false;
        for (const auto& v : bias)
            if (v) return false;
        for (const auto& v : norm_beta)
            if (v) return false;
        for (const auto& v : adapters)
            if (!v.empty()) return false;
        return !prefix && !prompt;
    }
};

namespace detail {

template <class M>
constexpr const char* method_name() {
    if constexpr (std::is_same_v<M, pet::lora::modules>) return "lora";
    else if constexpr (std::is_same_v<M, pet::rslora::modules>) return "rslora";
    else if constexpr (std::is_same_v<M, pet::recovery::modules>) return "recovery";
    else if constexpr (std::is_same_v<M, pet::recovery_linear::modules>) return "recovery_linear";
    else if constexpr (std::is_same_v<M, pet::ia3::modules>) return "ia3";
    else if constexpr (std::is_same_v<M, pet::bitfit::modules>) return "bitfit";
    else if constexpr (adapter_method<M>) return pet::adapter_policy<M::form, M::act>::name();
    else if constexpr (std::is_same_v<M, pet::prefix_tuning::modules>) return pet::prefix_tuning::name();
    else if constexpr (std::is_same_v<M, pet::p_tuning_v2::modules>) return pet::p_tuning_v2::name();
    else return pet::prompt_tuning::name();
}

inline std::span<float> span_of(Matrix<float>& m) noexcept { return {m.data(), std::size_t(m.size())}; }
inline std::span<float> span_of(std::vector<float>& v) noexcept { return {v.data(), v.size()}; }

/// f(name, values span, decay) for every trainable tensor of m, in a fixed order.
template <class M, class F>
void each_tensor(M& m, F&& f) {
    using D = std::remove_const_t<M>;
    if constexpr (lowrank_method<D>) {
        const bool rec = !std::is_same_v<D, pet::lora::modules> && !std::is_same_v<D, pet::rslora::modules>;
        for (int i = 0; i < pet::target_count; ++i) {
            const auto t = pet::target(i);
            if (m.rank(t) == 0) continue;
            f(cpet::detail::concat(pet::target_name(t), rec ? ".recovery_A1" : ".lora_A"), span_of(m.f.A[std::size_t(i)]), true);
            f(cpet::detail::concat(pet::target_name(t), rec ? ".recovery_A2" : ".lora_B"), span_of(m.f.B[std::size_t(i)]), true);
        }
    } else if constexpr (std::is_same_v<D, pet::ia3::modules>) {
        for (int i = 0; i < pet::target_count; ++i)
            if (!m.l[std::size_t(i)].empty())
                f(cpet::detail::concat(pet::target_name(pet::target(i)), ".ia3_l"), span_of(m.l[std::size_t(i)]), false);
    } else if constexpr (std::is_same_v<D, pet::bitfit::modules>) {
        for (int i = 0; i < pet::target_count; ++i)
            if (!m.delta[std::size_t(i)].empty())
                f(cpet::detail::concat(pet::target_name(pet::target(i)), ".bitfit_bias"), span_of(m.delta[std::size_t(i)]), false);
        for (int i = 0; i < pet::norm_site_count; ++i)
            if (!m.norm_delta[std::size_t(i)].empty())
                f(cpet::detail::concat(pet::norm_site_name(pet::norm_site(i)), ".bitfit_beta"),
                  span_of(m.norm_delta[std::size_t(i)]), false);
    } else if constexpr (adapter_method<D>) {  // weights decay, biases do not (HF's Trainer)
        for (auto w : {pet::sublayer::attention, pet::sublayer::ffn}) {
            const auto i = std::size_t(w);
            if (m.down[i].empty()) continue;
            const auto n = pet::sublayer_name(w);
            f(cpet::detail::concat(n, ".down.weight"), span_of(m.down[i]), true);
            f(cpet::detail::concat(n, ".down.bias"), span_of(m.b_down[i]), false);
            f(cpet::detail::concat(n, ".up.weight"), span_of(m.up[i]), true);
            f(cpet::detail::concat(n, ".up.bias"), span_of(m.b_up[i]), false);
        }
    } else if constexpr (prefix_method<D>) {  // embeddings decay in HF's Trainer (neither bias nor norm)
        if (!m.k.empty()) {
            f(std::string("prefix_k"), span_of(m.k), true);
            f(std::string("prefix_v"), span_of(m.v), true);
        }
    } else {
        static_assert(std::is_same_v<D, pet::prompt_tuning::modules>);
        if (!m.tokens.empty()) f(std::string("prompt_embeddings"), span_of(m.tokens), true);
    }
}

inline void check_same_shape(ConstMatrixView<float> g, ConstMatrixView<float> v, const char* who, const char* method,
                             std::string_view what) {
    require<shape_error>(g.rows() == v.rows() && g.cols() == v.cols(), who, ": the gradient store of ", method, " ",
                         what, " is ", shape_str(g.rows(), g.cols()), ", the task's ", shape_str(v.rows(), v.cols()),
                         " (make it with zeros_like)");
}

inline vector_term vector_of(const std::vector<float>& v, std::vector<float>& g, const char* who, const char* method,
                             std::string_view what) {
    require<shape_error>(g.size() == v.size(), who, ": the gradient store of ", method, " ", what, " has ", g.size(),
                         " values, the task ", v.size(), " (make it with zeros_like)");
    return {std::span<const float>(v), std::span<float>(g)};
}

inline void claim(vector_term& slot, vector_term t, const char* who, const char* what, std::string_view where) {
    require<format_error>(!slot, who, ": two methods of the task train the ", what, " of ", where);
    slot = t;
}

template <class M>
void add_terms(const M& v, M& g, layer_terms& out, const char* who) {
    if constexpr (lowrank_method<M>) {
        for (int i = 0; i < pet::target_count; ++i) {
            const auto t = pet::target(i);
            if (v.rank(t) == 0) continue;
            auto& ga = g.f.A[std::size_t(i)];
            auto& gb = g.f.B[std::size_t(i)];
            require<shape_error>(ga.rows() == v.f.A[std::size_t(i)].rows() && ga.cols() == v.f.A[std::size_t(i)].cols() &&
                                     gb.rows() == v.f.B[std::size_t(i)].rows() &&
                                     gb.cols() == v.f.B[std::size_t(i)].cols(),
                                 who, ": the gradient store of ", method_name<M>(), " target ", pet::target_name(t),
                                 " does not have the values' shapes (make it with zeros_like)");
            lowrank_term term;
            term.A = v.f.A[std::size_t(i)];
            term.B = v.f.B[std::size_t(i)];
            term.gA = ga;
            term.gB = gb;
            term.scale = v.lowrank_scale(t);
            term.gelu = std::is_same_v<M, pet::recovery::modules>;
            out.at[std::size_t(i)].push_back(term);
        }
    } else if constexpr (std::is_same_v<M, pet::ia3::modules>) {
        for (int i = 0; i < pet::target_count; ++i)
            if (!v.l[std::size_t(i)].empty())
                claim(out.scale[std::size_t(i)],
                      vector_of(v.l[std::size_t(i)], g.l[std::size_t(i)], who, "ia3", pet::target_name(pet::target(i))),
                      who, "scale", pet::target_name(pet::target(i)));
    } else if constexpr (adapter_method<M>) {
        for (auto w : {pet::sublayer::attention, pet::sublayer::ffn}) {
            const auto i = std::size_t(w);
            if (!v.has(w)) continue;
            const auto where = cpet::detail::concat(pet::sublayer_name(w), " adapter");
            check_same_shape(g.down[i], v.down[i], who, method_name<M>(), where + " W_down");
            check_same_shape(g.up[i], v.up[i], who, method_name<M>(), where + " W_up");
            adapter_term a;
            a.down = v.down[i];
            a.up = v.up[i];
            a.g_down = g.down[i];
            a.g_up = g.up[i];
            const vector_term bd = vector_of(v.b_down[i], g.b_down[i], who, method_name<M>(), where + " b_down");
            const vector_term bu = vector_of(v.b_up[i], g.b_up[i], who, method_name<M>(), where + " b_up");
            a.b_down = bd.v, a.gb_down = bd.g, a.b_up = bu.v, a.gb_up = bu.g;
            a.scale = v.scale();
            a.act = M::act;
            a.sequential = M::form == pet::adapter_form::sequential;
            out.adapters[i].push_back(a);
        }
    } else if constexpr (prefix_method<M>) {
        if (v.k.empty()) return;
        check_same_shape(g.k, v.k, who, method_name<M>(), "prefix k");
        check_same_shape(g.v, v.v, who, method_name<M>(), "prefix v");
        require<format_error>(!out.prefix, who, ": two methods of the task train the attention prefix");
        out.prefix = prefix_term{v.k, v.v, g.k, g.v};
    } else if constexpr (std::is_same_v<M, pet::prompt_tuning::modules>) {
        if (v.tokens.empty()) return;
        check_same_shape(g.tokens, v.tokens, who, method_name<M>(), "virtual tokens");
        require<format_error>(!out.prompt, who, ": two methods of the task train virtual tokens");
        out.prompt = prompt_term{v.tokens, g.tokens};
    } else {
        for (int i = 0; i < pet::target_count; ++i)
            if (!v.delta[std::size_t(i)].empty())
                claim(out.bias[std::size_t(i)],
                      vector_of(v.delta[std::size_t(i)], g.delta[std::size_t(i)], who, "bitfit", pet::target_name(pet::target(i))),
                      who, "bias", pet::target_name(pet::target(i)));
        for (int i = 0; i < pet::norm_site_count; ++i)
            if (!v.norm_delta[std::size_t(i)].empty())
                claim(out.norm_beta[std::size_t(i)],
                      vector_of(v.norm_delta[std::size_t(i)], g.norm_delta[std::size_t(i)], who, "bitfit",
                                pet::norm_site_name(pet::norm_site(i))),
                      who, "β", pet::norm_site_name(pet::norm_site(i)));
    }
}

/// f(values member, gradient member) for every member of two pet::stack modules of one type, in order.
template <class V, class G, class F>
void each_part(V& values, G& grads, F&& f) {
    [&]<std::size_t... I>(std::index_sequence<I...>) {
        (f(std::get<I>(values.parts), std::get<I>(grads.parts)), ...);
    }(std::make_index_sequence<std::tuple_size_v<decltype(G::parts)>>{});
}

template <class M>
void zero_all(M& m) {
    each_tensor(m, [](const std::string&, std::span<float> t, bool) { std::fill(t.begin(), t.end(), 0.f); });
}

template <class M>
[[noreturn]] void refuse(const char* who, std::string_view name) {
    throw format_error(cpet::detail::concat(
        who, ": the task holds ", name, ", which has no backward in cpet yet; trainable methods are lora, rslora, "
        "recovery, recovery_linear, ia3, bitfit, the adapters, prefix_tuning, p_tuning_v2 and prompt_tuning (alone, "
        "in a pet::task or a pet::stack)"));
}

}  // namespace detail

/// The terms of `values` for a layer with dims `d`, their gradients in `grads` (same type and shapes: zeros_like).
/// Checks once that the modules fit the layer (the forward and backward trust it).
template <class M>
    requires trainable_method<M>
layer_terms bind(const pet::layer_dims& d, const M& values, M& grads, const char* who = "train::bind") {
    values.check_fits(d, who);
    layer_terms out;
    detail::add_terms(values, grads, out, who);
    return out;
}
inline layer_terms bind(const pet::layer_dims& d, const pet::task& values, pet::task& grads,
                        const char* who = "train::bind") {
    require<shape_error>(values.size() == grads.size(), who, ": the task has ", values.size(),
                         " methods, its gradient store ", grads.size(), " (make it with zeros_like)");
    values.check_fits(d, who);
    layer_terms out;
    for (std::size_t i = 0; i < values.size(); ++i)
        values.visit_method(i, [&](const auto& mv) {
            using M = std::decay_t<decltype(mv)>;
            if constexpr (trainable_method<M>) {
                require<shape_error>(grads.at(i).index() == values.at(i).index(), who, ": method ", i,
                                     " of the gradient store is ", grads.method_name(i), ", not ", values.method_name(i));
                detail::add_terms(mv, grads.get<M>(i), out, who);
            } else {
                detail::refuse<M>(who, values.method_name(i));
            }
        });
    return out;
}
/// A pet::stack's modules: every member's terms, in the stack's order (the order its sublayer hooks chain in).
template <trainable_stack M>
layer_terms bind(const pet::layer_dims& d, const M& values, M& grads, const char* who = "train::bind") {
    values.check_fits(d, who);
    layer_terms out;
    detail::each_part(values, grads, [&](const auto& v, auto& g) { detail::add_terms(v, g, out, who); });
    return out;
}
inline layer_terms bind(const pet::layer_dims&, const pet::none::modules&, pet::none::modules&, const char* = "") {
    return {};
}

/// A gradient store for `m`: the same modules with every trainable tensor zero.
template <class M>
    requires trainable_method<M>
M zeros_like(const M& m) {
    M g = m;
    detail::zero_all(g);
    return g;
}
inline pet::task zeros_like(const pet::task& m) {
    pet::task g = m;
    for (std::size_t i = 0; i < g.size(); ++i)
        g.visit_method(i, [&](auto& mm) {
            using M = std::decay_t<decltype(mm)>;
            if constexpr (trainable_method<M>) {
                detail::each_tensor(mm, [](const std::string&, std::span<float> t, bool) {
                    std::fill(t.begin(), t.end(), 0.f);
                });
            } else {
                detail::refuse<M>("train::zeros_like", m.method_name(i));
            }
        });
    return g;
}

template <trainable_stack M>
M zeros_like(const M& m) {
    M g = m;
    std::apply([](auto&... mm) { (detail::zero_all(mm), ...); }, g.parts);
    return g;
}

/// The parameters of `values` (names "<prefix><method>.<target>.<tensor>", e.g. "layer.0.lora.q.lora_A",
/// "layer.0.adapter.ffn.up.weight", "layer.0.prefix_tuning.prefix_k") with their gradients in `grads` (zeros_like).
/// IA3 and BitFit vectors and adapter biases take no weight decay (HF's Trainer exempts biases and norm parameters).
template <class M>
    requires trainable_method<M>
void append_parameters(M& values, M& grads, const std::string& prefix, std::vector<parameter>& out) {
    struct entry {
        std::string name;
        std::span<float> t;
        bool decay;
    };
    std::vector<entry> vs, gs;
    detail::each_tensor(values, [&](const std::string& n, std::span<float> t, bool d) { vs.push_back({n, t, d}); });
    detail::each_tensor(grads, [&](const std::string& n, std::span<float> t, bool d) { gs.push_back({n, t, d}); });
    require<shape_error>(vs.size() == gs.size(), "train::append_parameters: the gradient store of ", prefix,
                         " does not mirror its values (make it with zeros_like)");
    for (std::size_t i = 0; i < vs.size(); ++i) {
        require<shape_error>(vs[i].t.size() == gs[i].t.size(), "train::append_parameters: ", prefix, vs[i].name,
                             " has ", vs[i].t.size(), " values but ", gs[i].t.size(), " gradients");
        out.push_back({cpet::detail::concat(prefix, detail::method_name<M>(), '.', vs[i].name), vs[i].t, gs[i].t,
                       vs[i].decay});
    }
}
inline void append_parameters(pet::task& values, pet::task& grads, const std::string& prefix,
                              std::vector<parameter>& out) {
    require<shape_error>(values.size() == grads.size(), "train::append_parameters: ", prefix, ": the task has ",
                         values.size(), " methods, its gradient store ", grads.size());
    for (std::size_t i = 0; i < values.size(); ++i)
        values.visit_method(i, [&](auto& mv) {
            using M = std::decay_t<decltype(mv)>;
            if constexpr (trainable_method<M>) {
                append_parameters(mv, grads.get<M>(i), prefix, out);
            } else {
                detail::refuse<M>("train::append_parameters", values.method_name(i));
            }
        });
}
/// A pet::stack's members, in order (two members of one method would give two parameters of one name, which
/// check_parameters refuses).
template <trainable_stack M>
void append_parameters(M& values, M& grads, const std::string& prefix, std::vector<parameter>& out) {
    detail::each_part(values, grads, [&](auto& v, auto& g) { append_parameters(v, g, prefix, out); });
}

// ---------------------------------------------------------------------------------------------------------------
// Pieces of the backward
// ---------------------------------------------------------------------------------------------------------------

namespace detail {

/// Saved statistics of a norm over M rows: the normalised rows x̂ and 1/σ.
struct norm_saved {
    Matrix<float> hat;
    std::vector<float> rstd;
};

/// y = N(x) with x̂ and 1/σ saved (LayerNorm: x̂ = (x − μ)/σ, y = x̂·γ + β; RMSNorm: x̂ = x/rms, y = x̂·γ).
template <nn::norm_kind K>
void norm_forward(ConstMatrixView<float> x, const std::vector<float>& gamma, const std::vector<float>& beta, float eps,
                  MatrixView<float> y, norm_saved& s) {
    const index_t M = x.rows(), d = x.cols();
    s.hat.reset(M, d);
    s.rstd.assign(std::size_t(M), 0.f);
    parallel_for(index_t(0), M, [&](index_t r) {
        const float* xr = x.row(r);
        double mean = 0, sq = 0;
        if constexpr (K == nn::norm_kind::layernorm) {
            for (index_t c = 0; c < d; ++c) mean += xr[c];
            mean /= double(d);
            for (index_t c = 0; c < d; ++c) sq += (xr[c] - mean) * (xr[c] - mean);
        } else {
            for (index_t c = 0; c < d; ++c) sq += double(xr[c]) * xr[c];
        }
        const double rs = 1.0 / std::sqrt(sq / double(d) + double(eps));
        s.rstd[std::size_t(r)] = float(rs);
        float* hr = s.hat.row(r);
        float* yr = y.row(r);
        for (index_t c = 0; c < d; ++c) {
            hr[c] = float((xr[c] - mean) * rs);
            yr[c] = hr[c] * gamma[std::size_t(c)] + (beta.empty() ? 0.f : beta[std::size_t(c)]);
        }
    });
}

/// dx = dN/dx applied to dy (γ, β frozen). LayerNorm: dx = (g − mean(g) − x̂·mean(g·x̂))/σ with g = dy·γ;
/// RMSNorm: dx = (g − x̂·mean(g·x̂))/rms. dx may alias dy.
template <nn::norm_kind K>
void norm_backward(const norm_saved& s, const std::vector<float>& gamma, ConstMatrixView<float> dy,
                   MatrixView<float> dx) {
    const index_t M = dy.rows(), d = dy.cols();
    parallel_for(index_t(0), M, [&](index_t r) {
        const float* gr = dy.row(r);
        const float* hr = s.hat.row(r);
        double mg = 0, mgh = 0;
        for (index_t c = 0; c < d; ++c) {
            const double g = double(gr[c]) * gamma[std::size_t(c)];
            mg += g;
            mgh += g * hr[c];
        }
        mg /= double(d);
        mgh /= double(d);
        if constexpr (K == nn::norm_kind::rmsnorm) mg = 0;
        const double rs = s.rstd[std::size_t(r)];
        float* xr = dx.row(r);
        for (index_t c = 0; c < d; ++c) {
            const double g = double(gr[c]) * gamma[std::size_t(c)];
            xr[c] = float((g - mg - hr[c] * mgh) * rs);
        }
    });
}

/// The transpose of RoPE (a rotation by −θ) on the rows of a sequence at positions 0, 1, ...: the gradient with
/// respect to the un-rotated q or k.
inline void rope_transpose(MatrixView<float> x, index_t n_heads, index_t hd, float base, kernels::rope_style style) {
    const index_t half = hd / 2;
    std::vector<double> inv(static_cast<std::size_t>(half));
    for (index_t i = 0; i < half; ++i) inv[std::size_t(i)] = std::pow(double(base), -2.0 * double(i) / double(hd));
    std::vector<float> cs(static_cast<std::size_t>(half)), sn(static_cast<std::size_t>(half));
    for (index_t t = 0; t < x.rows(); ++t) {
        for (index_t i = 0; i < half; ++i) {
            const double a = double(t) * inv[std::size_t(i)];
            cs[std::size_t(i)] = float(std::cos(a));
            sn[std::size_t(i)] = float(std::sin(a));
        }
        float* row = x.row(t);
        for (index_t h = 0; h < n_heads; ++h) {
            float* v = row + h * hd;
            for (index_t i = 0; i < half; ++i) {
                const index_t i0 = style == kernels::rope_style::half ? i : 2 * i;
                const index_t i1 = style == kernels::rope_style::half ? i + half : 2 * i + 1;
                const float a = v[i0], b = v[i1], c = cs[std::size_t(i)], s = sn[std::size_t(i)];
                v[i0] = a * c + b * s;
                v[i1] = b * c - a * s;
            }
        }
    }
}

/// y (+)= s·φ(x·Aᵀ)·Bᵀ of every term of one linear: the base product with bias / activation / residual is the
/// caller's (fused epilogue); here U = x·Aᵀ is saved per term and the terms' sum rides in the base GEMM's
/// epilogue (one term: its own factors; several: concatenated along the rank with the scales folded into B).
struct lowrank_pack {
    Matrix<float> g;  ///< φ(U) concatenated [M, R]
    Matrix<float> b;  ///< s·B concatenated [N, R]
};

inline void lowrank_prepare(const std::vector<lowrank_term>& terms, ConstMatrixView<float> x,
                            std::vector<Matrix<float>>& u_saved, lowrank_pack& pack, kernels::epilogue& ep) {
    u_saved.resize(terms.size());
    if (terms.empty()) return;
    index_t R = 0;
    for (const auto& t : terms) R += t.rank();
    const index_t M = x.rows(), N = terms.front().B.rows();
    for (std::size_t i = 0; i < terms.size(); ++i) {
        u_saved[i].reset(M, terms[i].rank());
        as_eigen(u_saved[i]).noalias() = as_eigen(x) * as_eigen(terms[i].A).transpose();
    }
    if (terms.size() == 1 && !terms[0].gelu) {
        ep.lowrank_u = u_saved[0].data();
        ep.ld_u = u_saved[0].stride();
        ep.lowrank_b = terms[0].B.data();
        ep.ld_b = terms[0].B.stride();
        ep.rank = terms[0].rank();
        ep.lowrank_scale = terms[0].scale;
        return;
    }
    pack.g.reset(M, R);
    pack.b.reset(N, R);
    index_t c0 = 0;
    for (std::size_t i = 0; i < terms.size(); ++i) {
        const auto& t = terms[i];
        const index_t r = t.rank();
        for (index_t m = 0; m < M; ++m) {
            const float* u = u_saved[i].row(m);
            float* g = pack.g.row(m) + c0;
            for (index_t j = 0; j < r; ++j) g[j] = u[j];
            if (t.gelu) kernels::activate_inplace(kernels::activation::gelu_erf, g, r);
        }
        for (index_t n = 0; n < N; ++n)
            for (index_t j = 0; j < r; ++j) pack.b(n, c0 + j) = t.scale * t.B(n, j);
        c0 += r;
    }
    ep.lowrank_u = pack.g.data();
    ep.ld_u = pack.g.stride();
    ep.lowrank_b = pack.b.data();
    ep.ld_b = pack.b.stride();
    ep.rank = R;
    ep.lowrank_scale = 1.f;
}

/// The terms' part of a linear's backward: dB += s·dyᵀ·φ(U), dU = s·dy·B ⊙ φ'(U), dA += dUᵀ·x, dx += dU·A.
inline void lowrank_backward(const std::vector<lowrank_term>& terms, const std::vector<Matrix<float>>& u_saved,
                             ConstMatrixView<float> x, ConstMatrixView<float> dy, MatrixView<float> dx) {
    for (std::size_t i = 0; i < terms.size(); ++i) {
        const auto& t = terms[i];
        const auto& u = u_saved[i];
        const index_t M = u.rows(), r = u.cols();
        Matrix<float> g(M, r), du(M, r);
        as_eigen(du).noalias() = t.scale * (as_eigen(dy) * as_eigen(t.B));
        if (t.gelu) {
            for (index_t m = 0; m < M; ++m) {
                for (index_t j = 0; j < r; ++j) {
                    g(m, j) = kernels::activate(kernels::activation::gelu_erf, u(m, j));
                    du(m, j) *= kernels::derivative(kernels::activation::gelu_erf, u(m, j));
                }
            }
            as_eigen(t.gB).noalias() += t.scale * (as_eigen(dy).transpose() * as_eigen(g));
        } else {
            as_eigen(t.gB).noalias() += t.scale * (as_eigen(dy).transpose() * as_eigen(u));
        }
        as_eigen(t.gA).noalias() += as_eigen(du).transpose() * as_eigen(x);
        if (dx.rows() > 0) as_eigen(dx).noalias() += as_eigen(du) * as_eigen(t.A);
    }
}

inline void add_to(MatrixView<float> y, ConstMatrixView<float> x) noexcept { nn::detail::add_inplace(y, x); }

}  // namespace detail

// ---------------------------------------------------------------------------------------------------------------
// The tape and the two halves
// ---------------------------------------------------------------------------------------------------------------

namespace detail {
/// The temporaries of a layer's forward and backward, kept between calls: a training step then refills pages it
/// already holds instead of faulting in fresh ones (measured: ~12 % of a MiniLM step went to page faults and
/// zeroing fresh pages). Layers run one at a time, so a model's layers share one (model_tape hands it out).
struct step_scratch {
    Matrix<float> t, t2;  ///< forward: t = x + A(o(ctx)); post-LN t2 = h + F(down(hidden))
    Matrix<float> dy, dout, dsub, dffn_extra, dhidden, dz_up, dz_gate, dffn_in, dt, dsub_a, din_extra, dctx, dq, dk,
        dv, din;  ///< backward: the gradients at each stage (named as in backward)
};
/// A tape's handle on its scratch. Copies of a tape do not share it (each makes its own on first use), so copies
/// may run in different threads; model_tape shares one between its layers explicitly.
struct scratch_handle {
    std::shared_ptr<step_scratch> p;
    scratch_handle() = default;
    scratch_handle(const scratch_handle&) noexcept {}
    scratch_handle(scratch_handle&&) noexcept = default;
    scratch_handle& operator=(const scratch_handle&) noexcept { return *this; }
    scratch_handle& operator=(scratch_handle&&) noexcept = default;
    step_scratch& get() {
        if (!p) p = std::make_shared<step_scratch>();
        return *p;
    }
};
}  // namespace detail

/// What one layer's backward needs from its forward (see the top of this file).
struct layer_tape {
    std::vector<index_t> lengths;
    index_t seq_len = 0;
    Matrix<float> x;        ///< the layer's input
    Matrix<float> attn_in;  ///< input of q, k, v (pre-LN: N1(x); post-LN: empty, x is it)
    Matrix<float> q, k, v;  ///< after RoPE
    std::vector<Matrix<float>> probs;  ///< [b·H + h]: [len_b, len_b]
    Matrix<float> ctx;                 ///< input of o
    detail::norm_saved n1, n2;
    Matrix<float> ffn_in;          ///< input of up / gate
    Matrix<float> z_up, z_gate;    ///< pre-activations (z_gate: SwiGLU only)
    Matrix<float> hidden;          ///< input of down
    Matrix<float> hidden_raw;      ///< the hidden activation before IA3's down scale (empty without one)
    std::array<std::vector<Matrix<float>>, pet::target_count> u;  ///< U = x·Aᵀ per term
    std::array<Matrix<float>, pet::target_count> pre_scale;       ///< q, k, v before IA3's scale (empty without)
    index_t prefix = 0;  ///< prefix rows every query saw (probs then have P + len_b columns)
    /// Per adapter of each sublayer ([pet::sublayer], in order): its pre-activation z, activation f(z), and for the
    /// sequential form its input (the sublayer output as the previous adapters left it).
    struct adapter_saved {
        Matrix<float> src, z, fz;
    };
    std::array<std::vector<adapter_saved>, 2> adapters;
    /// Temporaries reused between steps (not activations: bytes() does not count them).
    mutable detail::scratch_handle scratch;

    nn::batch_layout layout() const noexcept {
        nn::batch_layout L;
        L.batch = index_t(lengths.size());
        L.seq_len = seq_len;
        L.lengths = lengths;
        return L;
    }
    /// Bytes of activations kept for the backward.
    std::size_t bytes() const noexcept {
        std::size_t n = x.bytes() + attn_in.bytes() + q.bytes() + k.bytes() + v.bytes() + ctx.bytes() + n1.hat.bytes() +
                        n2.hat.bytes() + ffn_in.bytes() + z_up.bytes() + z_gate.bytes() + hidden.bytes() +
                        (n1.rstd.size() + n2.rstd.size()) * sizeof(float);
        n += hidden_raw.bytes();
        for (const auto& p : pre_scale) n += p.bytes();
        for (const auto& p : probs) n += p.bytes();
        for (const auto& us : u)
            for (const auto& m : us) n += m.bytes();
        for (const auto& as : adapters)
            for (const auto& a : as) n += a.src.bytes() + a.z.bytes() + a.fz.bytes();
        return n;
    }
};

namespace detail {

template <nn::LayerConfig C>
struct layer_access {
    using L = nn::TransformerLayer<C>;
    using F = typename C::compression::format;
    static const nn::Linear<F>& lin(const L& l, pet::target t) {
        switch (t) {
            case pet::target::q: return l.attention().q();
            case pet::target::k: return l.attention().k();
            case pet::target::v: return l.attention().v();
            case pet::target::o: return l.attention().o();
            case pet::target::up: return l.ffn().up();
            case pet::target::gate: return *l.ffn().gate();
            default: return l.ffn().down();
        }
    }
};

/// g += s·Σ_rows d (a bias-like parameter's gradient).
inline void add_colsum(std::span<float> g, ConstMatrixView<float> d, float s = 1.f) noexcept {
    for (index_t r = 0; r < d.rows(); ++r) {
        const float* dr = d.row(r);
        for (index_t c = 0; c < d.cols(); ++c) g[std::size_t(c)] += s * dr[c];
    }
}
/// g += Σ_rows d ⊙ a (a per-column scale's gradient).
inline void add_colsum_product(std::span<float> g, ConstMatrixView<float> d, ConstMatrixView<float> a) noexcept {
    for (index_t r = 0; r < d.rows(); ++r) {
        const float* dr = d.row(r);
        const float* ar = a.row(r);
        for (index_t c = 0; c < d.cols(); ++c) g[std::size_t(c)] += dr[c] * ar[c];
    }
}
/// m(r, c) *= l[c].
inline void scale_cols(MatrixView<float> m, std::span<const float> l) noexcept {
    for (index_t r = 0; r < m.rows(); ++r) {
        float* mr = m.row(r);
        for (index_t c = 0; c < m.cols(); ++c) mr[c] *= l[std::size_t(c)];
    }
}

/// out = lin(x) + the terms of target t (U saved on the tape), with BitFit's Δb in the bias and IA3's scale on the
/// outputs of q, k, v (the value before it saved); `ep` brings activation / residual.
template <nn::LayerConfig C, class Arch>
void linear_forward(Arch tag, const nn::TransformerLayer<C>& layer, pet::target t, const layer_terms& terms,
                    ConstMatrixView<float> x, MatrixView<float> out, kernels::epilogue ep, layer_tape& tape) {
    lowrank_pack pack;
    lowrank_prepare(terms.of(t), x, tape.u[std::size_t(t)], pack, ep);
    const auto& lin = layer_access<C>::lin(layer, t);
    if (const auto& db = terms.bias[std::size_t(t)]) {
        std::vector<float> b(db.v.begin(), db.v.end());
        if (const float* b0 = lin.bias())
            for (std::size_t c = 0; c < b.size(); ++c) b[c] += b0[c];
        ep.bias = b.data();
        compress::matmul_on(tag, lin.weight(), x, out, ep);
    } else {
        lin.forward(tag, x, out, ep);
    }
    auto& pre = tape.pre_scale[std::size_t(t)];
    if (const auto& l = terms.scale[std::size_t(t)]; l && t != pet::target::down) {
        pre = Matrix<float>(ConstMatrixView<float>(out));
        scale_cols(out, l.v);
    } else {
        pre = Matrix<float>();
    }
}

/// dx (=, or += with accumulate) dy·W + the terms' dx; the terms' dA, dB accumulated.
template <nn::LayerConfig C>
void linear_backward(const nn::TransformerLayer<C>& layer, pet::target t, const layer_terms& terms,
                     const layer_tape& tape, ConstMatrixView<float> x, ConstMatrixView<float> dy, MatrixView<float> dx,
                     bool accumulate) {
    const auto& w = layer_access<C>::lin(layer, t).weight();
    Matrix<float> scaled;
    if (const auto& l = terms.scale[std::size_t(t)]; l && t != pet::target::down) {
        add_colsum_product(l.g, dy, tape.pre_scale[std::size_t(t)]);  // y = l ⊙ pre
        scaled = Matrix<float>(dy);
        scale_cols(scaled, l.v);
        dy = scaled;
    }
    if (const auto& db = terms.bias[std::size_t(t)]) add_colsum(db.g, dy);
    if (dx.rows() == 0) {  // the input gradient is not wanted (backward's `dx` is empty): the terms' only
    } else if (accumulate) {
        Matrix<float> tmp(dx.rows(), dx.cols());
        w.matmul_t(dy, tmp);
        add_to(dx, tmp);
    } else {
        w.matmul_t(dy, dx);
    }
    lowrank_backward(terms.of(t), tape.u[std::size_t(t)], x, dy, dx);
}

/// out ← out + s·(f(src·W_dᵀ + b_d)·W_uᵀ + b_u) for each adapter in order (src = out as the previous ones left it, or
/// `in`), as pet::adapter_policy's sublayer hook computes it, saving what adapters_backward needs.
template <class Arch>
void adapters_forward(Arch tag, const std::vector<adapter_term>& ts, ConstMatrixView<float> in, MatrixView<float> out,
                      std::vector<layer_tape::adapter_saved>& saved) {
    saved.resize(ts.size());
    const index_t M = out.rows(), d = out.cols();
    for (std::size_t i = 0; i < ts.size(); ++i) {
        const auto& a = ts[i];
        auto& sv = saved[i];
        const index_t r = a.bottleneck();
        sv.src = a.sequential ? Matrix<float>(ConstMatrixView<float>(out)) : Matrix<float>();
        const ConstMatrixView<float> src = a.sequential ? ConstMatrixView<float>(sv.src) : in;
        sv.z = Matrix<float>(M, r);
        as_eigen(sv.z).noalias() = as_eigen(src) * as_eigen(a.down).transpose();
        as_eigen(sv.z).rowwise() += Eigen::Map<const Eigen::RowVectorXf>(a.b_down.data(), r);
        sv.fz = Matrix<float>(ConstMatrixView<float>(sv.z));
        for (index_t row = 0; row < M; ++row) kernels::activate_inplace(tag, a.act, sv.fz.row(row), r);
        as_eigen(out).noalias() += a.scale * (as_eigen(sv.fz) * as_eigen(a.up).transpose());
        as_eigen(out).rowwise() += a.scale * Eigen::Map<const Eigen::RowVectorXf>(a.b_up.data(), d);
    }
}

/// The adapters' backward, last first: dout is dL/d(out after them) on entry and dL/d(the sublayer's own output) on
/// return; what the parallel forms send to the sublayer's input is added to din. Their gradients accumulate.
template <class Arch>
void adapters_backward(Arch tag, const std::vector<adapter_term>& ts,
                       const std::vector<layer_tape::adapter_saved>& saved, ConstMatrixView<float> in,
                       MatrixView<float> dout, MatrixView<float> din) {
    const index_t M = dout.rows();
    for (std::size_t i = ts.size(); i-- > 0;) {
        const auto& a = ts[i];
        const auto& sv = saved[i];
        const index_t r = a.bottleneck();
        const ConstMatrixView<float> src = a.sequential ? ConstMatrixView<float>(sv.src) : in;
        as_eigen(a.g_up).noalias() += a.scale * (as_eigen(dout).transpose() * as_eigen(sv.fz));
        add_colsum(a.gb_up, dout, a.scale);
        Matrix<float> dz(M, r);
        as_eigen(dz).noalias() = a.scale * (as_eigen(dout) * as_eigen(a.up));
        for (index_t row = 0; row < M; ++row) kernels::multiply_by_derivative(tag, a.act, sv.z.row(row), dz.row(row), r);
        add_colsum(a.gb_down, dz);
        as_eigen(a.g_down).noalias() += as_eigen(dz).transpose() * as_eigen(src);
        if (a.sequential) as_eigen(dout).noalias() += as_eigen(dz) * as_eigen(a.down);
        else as_eigen(din).noalias() += as_eigen(dz) * as_eigen(a.down);
    }
}

/// kc, vc [P + len, kv_dim] = [prefix; rows r0 .. r0 + len of k, v].
inline void concat_prefix(const prefix_term& p, const Matrix<float>& k, const Matrix<float>& v, index_t r0, index_t len,
                          Matrix<float>& kc, Matrix<float>& vc) {
    const index_t P = p.length(), kvd = k.cols();
    kc = Matrix<float>(P + len, kvd);
    vc = Matrix<float>(P + len, kvd);
    for (index_t r = 0; r < P; ++r)
        for (index_t c = 0; c < kvd; ++c) kc(r, c) = p.k(r, c), vc(r, c) = p.v(r, c);
    for (index_t r = 0; r < len; ++r)
        for (index_t c = 0; c < kvd; ++c) kc(P + r, c) = k(r0 + r, c), vc(P + r, c) = v(r0 + r, c);
}

template <class T>
using emap = Eigen::Map<std::conditional_t<std::is_const_v<T>, const EigenRowMajor<std::remove_const_t<T>>, EigenRowMajor<T>>,
                        Eigen::Unaligned, Eigen::OuterStride<>>;

}  // namespace detail

namespace detail {

/// The layer's forward with the tape (see forward below); the virtual tokens of a prompt term are the caller's
/// (train/model.hpp puts them before each sequence of x).
template <nn::LayerConfig C>
void layer_forward(const nn::TransformerLayer<C>& layer, ConstMatrixView<float> x, std::span<const index_t> lengths,
                   MatrixView<float> y, const layer_terms& terms, layer_tape& tape) {
    const auto L0 = layer.check_call(x, lengths, y, "train::forward");
    const nn::layer_shape& s = layer.shape();
    const index_t M = x.rows(), d = s.d_model, H = s.n_heads, G = s.n_kv_heads, hd = s.head_dim, S = L0.seq_len;
    const index_t qd = s.q_dim(), kvd = s.kv_dim(), ff = s.d_ff, group = H / G;
    tape.lengths.assign(lengths.begin(), lengths.end());
    tape.seq_len = S;
    const auto L = tape.layout();
    tape.x.assign(x);
    constexpr bool post = C::placement == nn::norm_placement::post;
    const auto g1 = layer.norm1().gamma(), g2 = layer.norm2().gamma();
    auto b1 = layer.norm1().beta(), b2 = layer.norm2().beta();
    for (int i = 0; i < pet::norm_site_count; ++i)  // BitFit's Δβ (bind checked the norms are LayerNorms)
        if (const auto& db = terms.norm_beta[std::size_t(i)]) {
            auto& b = i == 0 ? b1 : b2;
            for (std::size_t c = 0; c < b.size(); ++c) b[c] += db.v[c];
        }
    arch::dispatch([&](auto tag) {
        ConstMatrixView<float> a_in = tape.x;
        if constexpr (!post) {
            tape.attn_in.reset(M, d);
            detail::norm_forward<C::norm>(tape.x, g1, b1, layer.norm1().eps(), tape.attn_in, tape.n1);
            a_in = tape.attn_in;
        } else {
            tape.attn_in = Matrix<float>();
        }
        tape.q.reset(M, qd);
        tape.k.reset(M, kvd);
        tape.v.reset(M, kvd);
        detail::linear_forward<C>(tag, layer, pet::target::q, terms, a_in, tape.q, {}, tape);
        detail::linear_forward<C>(tag, layer, pet::target::k, terms, a_in, tape.k, {}, tape);
        detail::linear_forward<C>(tag, layer, pet::target::v, terms, a_in, tape.v, {}, tape);
        tape.ctx.reset(M, qd);
        tape.probs.resize(std::size_t(L.batch * H));  // each refilled below, its pages kept from the last step
        const index_t P = terms.prefix.length();
        tape.prefix = P;
        const float scale = 1.f / std::sqrt(float(hd));
        parallel_for(index_t(0), L.batch, [&](index_t b) {
            const index_t len = L.length(b);
            if (len == 0) {
                for (index_t h = 0; h < H; ++h) tape.probs[std::size_t(b * H + h)] = Matrix<float>();
                return;
            }
            if constexpr (C::rope) {
                kernels::rope(tag, tape.q.view().middle_rows(b * S, len), H, hd, 0, s.rope_base, s.rope);
                kernels::rope(tag, tape.k.view().middle_rows(b * S, len), G, hd, 0, s.rope_base, s.rope);
            }
            // the keys and values this sequence's queries see: [prefix; its own] (no RoPE on the prefix)
            Matrix<float> kc, vc;
            if (P > 0) detail::concat_prefix(terms.prefix, tape.k, tape.v, b * S, len, kc, vc);
            const index_t n_keys = P + len;
            const float* kp = P > 0 ? kc.data() : tape.k.row(b * S);
            const float* vp = P > 0 ? vc.data() : tape.v.row(b * S);
            const index_t kstride = P > 0 ? kc.stride() : tape.k.stride();
            const index_t vstride = P > 0 ? vc.stride() : tape.v.stride();
            for (index_t h = 0; h < H; ++h) {
                const index_t g = h / group;
                detail::emap<float> Q(tape.q.row(b * S) + h * hd, len, hd, Eigen::OuterStride<>(tape.q.stride()));
                detail::emap<const float> K(kp + g * hd, n_keys, hd, Eigen::OuterStride<>(kstride));
                detail::emap<const float> V(vp + g * hd, n_keys, hd, Eigen::OuterStride<>(vstride));
                detail::emap<float> O(tape.ctx.row(b * S) + h * hd, len, hd, Eigen::OuterStride<>(tape.ctx.stride()));
                auto& Pr = tape.probs[std::size_t(b * H + h)];
                Pr.reset(len, n_keys);
                as_eigen(Pr).noalias() = scale * (Q * K.transpose());
                for (index_t i = 0; i < len; ++i) {
                    float* p = Pr.row(i);
                    const index_t n = C::mask == nn::attention_mask::causal ? P + i + 1 : n_keys;
                    float mx = -std::numeric_limits<float>::infinity();
                    for (index_t j = 0; j < n; ++j) mx = std::max(mx, p[j]);
                    double sum = 0;
                    for (index_t j = 0; j < n; ++j) sum += (p[j] = std::exp(p[j] - mx));
                    const float inv = float(1.0 / sum);
                    for (index_t j = 0; j < n; ++j) p[j] *= inv;
                    for (index_t j = n; j < n_keys; ++j) p[j] = 0.f;
                }
                O.noalias() = as_eigen(Pr) * V;
            }
        });
        // t = x + A(o(ctx)): without adapters the residual rides in the o GEMM (post-LN: x; pre-LN: x as well)
        detail::step_scratch& sc = tape.scratch.get();
        Matrix<float>& t = sc.t;
        t.reset(M, d);
        const auto& ad_att = terms.after(pet::sublayer::attention);
        if (ad_att.empty()) {
            kernels::epilogue res;
            res.residual = tape.x.data();
            res.ld_residual = tape.x.stride();
            detail::linear_forward<C>(tag, layer, pet::target::o, terms, tape.ctx, t, res, tape);
        } else {
            detail::linear_forward<C>(tag, layer, pet::target::o, terms, tape.ctx, t, {}, tape);
            detail::adapters_forward(tag, ad_att, a_in, t, tape.adapters[0]);
            detail::add_to(t, tape.x);
        }
        if (ad_att.empty()) tape.adapters[0].clear();
        tape.ffn_in.reset(M, d);
        if constexpr (post) detail::norm_forward<C::norm>(t, g1, b1, layer.norm1().eps(), tape.ffn_in, tape.n1);
        else detail::norm_forward<C::norm>(t, g2, b2, layer.norm2().eps(), tape.ffn_in, tape.n2);
        tape.z_up.reset(M, ff);
        tape.hidden.reset(M, ff);
        detail::linear_forward<C>(tag, layer, pet::target::up, terms, tape.ffn_in, tape.z_up, {}, tape);
        if constexpr (C::ffn == nn::ffn_kind::swiglu) {
            tape.z_gate.reset(M, ff);
            detail::linear_forward<C>(tag, layer, pet::target::gate, terms, tape.ffn_in, tape.z_gate, {}, tape);
            parallel_for(index_t(0), M, [&](index_t r) {
                float* h = tape.hidden.row(r);
                const float* zg = tape.z_gate.row(r);
                const float* zu = tape.z_up.row(r);
                for (index_t c = 0; c < ff; ++c) h[c] = zg[c];
                kernels::activate_inplace(tag, kernels::activation::silu, h, ff);
                for (index_t c = 0; c < ff; ++c) h[c] *= zu[c];
            });
        } else {
            tape.z_gate = Matrix<float>();
            parallel_for(index_t(0), M, [&](index_t r) {
                float* h = tape.hidden.row(r);
                const float* z = tape.z_up.row(r);
                for (index_t c = 0; c < ff; ++c) h[c] = z[c];
                kernels::activate_inplace(tag, C::act, h, ff);
            });
        }
        if (const auto& l = terms.scale[std::size_t(pet::target::down)]) {  // IA3 on the input of down
            tape.hidden_raw.assign(tape.hidden);
            detail::scale_cols(tape.hidden, l.v);
        } else {
            tape.hidden_raw = Matrix<float>();
        }
        // t2 = residual + F(down(hidden)): post-LN the residual is h = N1(t), pre-LN it is t
        const auto& ad_ffn = terms.after(pet::sublayer::ffn);
        const ConstMatrixView<float> res_in = post ? ConstMatrixView<float>(tape.ffn_in) : ConstMatrixView<float>(t);
        Matrix<float>& t2 = sc.t2;
        MatrixView<float> out2 = y;
        if constexpr (post) {
            t2.reset(M, d);
            out2 = t2;
        }
        if (ad_ffn.empty()) {
            kernels::epilogue res2;
            res2.residual = res_in.data();
            res2.ld_residual = res_in.stride();
            detail::linear_forward<C>(tag, layer, pet::target::down, terms, tape.hidden, out2, res2, tape);
            tape.adapters[1].clear();
        } else {
            detail::linear_forward<C>(tag, layer, pet::target::down, terms, tape.hidden, out2, {}, tape);
            detail::adapters_forward(tag, ad_ffn, tape.ffn_in, out2, tape.adapters[1]);
            detail::add_to(out2, res_in);
        }
        if constexpr (post) detail::norm_forward<C::norm>(t2, g2, b2, layer.norm2().eps(), y, tape.n2);
    });
    nn::detail::zero_padding(y, L);
}

}  // namespace detail

/// y = layer(x) as TransformerLayer::forward computes it with the task whose terms are `terms` (bind), keeping on
/// `tape` what backward needs. Padded rows of y are zero. Terms with prompt tuning's virtual tokens are refused (as
/// TransformerLayer::forward refuses them): the model's forward puts them before each sequence (train/model.hpp).
template <nn::LayerConfig C>
void forward(const nn::TransformerLayer<C>& layer, ConstMatrixView<float> x, std::span<const index_t> lengths,
             MatrixView<float> y, const layer_terms& terms, layer_tape& tape) {
    require<shape_error>(!terms.prompt, "train::forward: the terms carry ", terms.prompt.length(),
                         " virtual tokens (prompt tuning), which a single layer cannot apply: train::forward of a "
                         "model puts them before each sequence (for one layer, pet::prepend_virtual_tokens)");
    detail::layer_forward(layer, x, lengths, y, terms, tape);
}

/// dx = dL/dx of the layer whose forward filled `tape`, given dy = dL/dy, accumulating the terms' gradients
/// (into the gradient store bind() took them from). dx may alias dy, and may be empty (a 0 × 0 view, with M > 0):
/// the input gradient is then not formed (a model's first layer over frozen embeddings), which saves the GEMMs
/// through q, k and v; every term's gradient is still accumulated. Padded rows of dy are ignored (the forward
/// zeroes them) and padded rows of dx are zero.
template <nn::LayerConfig C>
void backward(const nn::TransformerLayer<C>& layer, const layer_tape& tape, const layer_terms& terms,
              ConstMatrixView<float> dy_in, MatrixView<float> dx) {
    const auto L = tape.layout();
    const nn::layer_shape& s = layer.shape();
    const index_t M = tape.x.rows(), d = s.d_model, H = s.n_heads, G = s.n_kv_heads, hd = s.head_dim, S = L.seq_len;
    const index_t qd = s.q_dim(), kvd = s.kv_dim(), ff = s.d_ff, group = H / G;
    check_shape(dy_in, M, d, "train::backward: dy");
    const bool want_dx = !(M > 0 && dx.rows() == 0 && dx.cols() == 0);
    if (want_dx) check_shape(dx, M, d, "train::backward: dx");
    require<shape_error>(tape.prefix == terms.prefix.length() &&
                             tape.adapters[0].size() == terms.after(pet::sublayer::attention).size() &&
                             tape.adapters[1].size() == terms.after(pet::sublayer::ffn).size(),
                         "train::backward: the tape was filled with other terms (", tape.prefix, " prefix rows, ",
                         tape.adapters[0].size(), " + ", tape.adapters[1].size(), " adapters; the terms have ",
                         terms.prefix.length(), ", ", terms.after(pet::sublayer::attention).size(), " + ",
                         terms.after(pet::sublayer::ffn).size(), ")");
    constexpr bool post = C::placement == nn::norm_placement::post;
    const auto g1 = layer.norm1().gamma(), g2 = layer.norm2().gamma();
    detail::step_scratch& sc = tape.scratch.get();
    Matrix<float>& dy = sc.dy;
    dy.assign(dy_in);
    nn::detail::zero_padding(dy, L);

    // ---- FFN ----
    // post-LN: dt2 = N2'(dy); the FFN output's gradient is dt2 and the residual h receives it too.
    // pre-LN: the FFN output's gradient is dy, and dt = dy + N2'(dffn_in).
    Matrix<float>& dout = sc.dout;  // gradient at the FFN's output (= at t2 for post-LN)
    dout.reset(M, d);
    const auto& beta1 = terms.norm_beta[0];
    const auto& beta2 = terms.norm_beta[1];
    if constexpr (post) {
        if (beta2) detail::add_colsum(beta2.g, dy);
        detail::norm_backward<C::norm>(tape.n2, g2, dy, dout);
    } else {
        dout.assign(dy);
    }
    // the FFN adapters: dsub = dL/d(down's output), the parallel forms' share of dL/d(ffn_in) in dffn_extra
    const auto& ad_ffn = terms.after(pet::sublayer::ffn);
    Matrix<float>&dsub = sc.dsub, &dffn_extra = sc.dffn_extra;  // set and read only with FFN adapters
    if (!ad_ffn.empty()) {
        dsub.assign(dout);
        dffn_extra.reset(M, d);
        arch::dispatch([&](auto tag) {
            detail::adapters_backward(tag, ad_ffn, tape.adapters[1], tape.ffn_in, dsub, dffn_extra);
        });
    }
    Matrix<float>& dhidden = sc.dhidden;
    dhidden.reset(M, ff);
    detail::linear_backward<C>(layer, pet::target::down, terms, tape, tape.hidden, ad_ffn.empty() ? dout : dsub,
                               dhidden, false);
    if (const auto& l = terms.scale[std::size_t(pet::target::down)]) {  // hidden = l ⊙ raw
        detail::add_colsum_product(l.g, dhidden, tape.hidden_raw);
        detail::scale_cols(dhidden, l.v);
    }
    Matrix<float>&dz_up = sc.dz_up, &dz_gate = sc.dz_gate;
    dz_up.reset(M, ff);
    arch::dispatch([&](auto tag) {
        if constexpr (C::ffn == nn::ffn_kind::swiglu) {
            dz_gate.reset(M, ff);
            parallel_for(index_t(0), M, [&](index_t r) {
                const float* zg = tape.z_gate.row(r);
                const float* zu = tape.z_up.row(r);
                const float* dh = dhidden.row(r);
                float* du = dz_up.row(r);
                float* dg = dz_gate.row(r);
                for (index_t c = 0; c < ff; ++c) du[c] = zg[c];
                kernels::activate_inplace(tag, kernels::activation::silu, du, ff);  // silu(z_gate)
                for (index_t c = 0; c < ff; ++c) du[c] *= dh[c], dg[c] = dh[c] * zu[c];
                kernels::multiply_by_derivative(tag, kernels::activation::silu, zg, dg, ff);
            });
        } else {
            parallel_for(index_t(0), M, [&](index_t r) {
                float* du = dz_up.row(r);
                const float* dh = dhidden.row(r);
                for (index_t c = 0; c < ff; ++c) du[c] = dh[c];
                kernels::multiply_by_derivative(tag, C::act, tape.z_up.row(r), du, ff);
            });
        }
    });
    Matrix<float>& dffn_in = sc.dffn_in;
    dffn_in.reset(M, d);
    detail::linear_backward<C>(layer, pet::target::up, terms, tape, tape.ffn_in, dz_up, dffn_in, false);
    if constexpr (C::ffn == nn::ffn_kind::swiglu)
        detail::linear_backward<C>(layer, pet::target::gate, terms, tape, tape.ffn_in, dz_gate, dffn_in, true);
    if (!ad_ffn.empty()) detail::add_to(dffn_in, dffn_extra);
    Matrix<float>& dt = sc.dt;  // gradient at t = x + o(ctx)
    dt.reset(M, d);
    if constexpr (post) {
        detail::add_to(dffn_in, dout);  // the residual h
        if (beta1) detail::add_colsum(beta1.g, dffn_in);
        detail::norm_backward<C::norm>(tape.n1, g1, dffn_in, dt);
    } else {
        if (beta2) detail::add_colsum(beta2.g, dffn_in);
        detail::norm_backward<C::norm>(tape.n2, g2, dffn_in, dt);
        detail::add_to(dt, dy);
    }

    // ---- attention ----
    ConstMatrixView<float> a_in = post ? ConstMatrixView<float>(tape.x) : ConstMatrixView<float>(tape.attn_in);
    const auto& ad_att = terms.after(pet::sublayer::attention);
    Matrix<float>&dsub_a = sc.dsub_a, &din_extra = sc.din_extra;  // set and read only with attention adapters
    if (!ad_att.empty()) {
        dsub_a.assign(dt);
        din_extra.reset(M, d);
        arch::dispatch([&](auto tag) {
            detail::adapters_backward(tag, ad_att, tape.adapters[0], a_in, dsub_a, din_extra);
        });
    }
    Matrix<float>& dctx = sc.dctx;
    dctx.reset(M, qd);
    detail::linear_backward<C>(layer, pet::target::o, terms, tape, tape.ctx, ad_att.empty() ? dt : dsub_a, dctx, false);
    Matrix<float>&dq = sc.dq, &dk = sc.dk, &dv = sc.dv;
    dq.reset(M, qd);
    dk.reset(M, kvd);
    dv.reset(M, kvd);
    const float scale = 1.f / std::sqrt(float(hd));
    const index_t P = tape.prefix;
    // each sequence's share of the prefix rows' gradients, summed in sequence order below (deterministic)
    std::vector<Matrix<float>> dpk(P > 0 ? std::size_t(L.batch) : 0), dpv(dpk.size());
    parallel_for(index_t(0), L.batch, [&](index_t b) {
        const index_t len = L.length(b);
        if (len == 0) return;
        const index_t n_keys = P + len;
        Matrix<float> kc, vc, dkc, dvc;  // with a prefix: [prefix; own] keys / values and their gradients
        if (P > 0) {
            detail::concat_prefix(terms.prefix, tape.k, tape.v, b * S, len, kc, vc);
            dkc = Matrix<float>(n_keys, kvd);
            dvc = Matrix<float>(n_keys, kvd);
        }
        const float* kp = P > 0 ? kc.data() : tape.k.row(b * S);
        const float* vp = P > 0 ? vc.data() : tape.v.row(b * S);
        float* dkp = P > 0 ? dkc.data() : dk.row(b * S);
        float* dvp = P > 0 ? dvc.data() : dv.row(b * S);
        const index_t ks = P > 0 ? kvd : tape.k.stride(), vs = P > 0 ? kvd : tape.v.stride();
        const index_t dks = P > 0 ? kvd : dk.stride(), dvs = P > 0 ? kvd : dv.stride();
        Matrix<float> dP(len, n_keys);
        for (index_t h = 0; h < H; ++h) {
            const index_t g = h / group;
            const auto os = [](const Matrix<float>& m) { return Eigen::OuterStride<>(m.stride()); };
            detail::emap<const float> Q(tape.q.row(b * S) + h * hd, len, hd, os(tape.q));
            detail::emap<const float> K(kp + g * hd, n_keys, hd, Eigen::OuterStride<>(ks));
            detail::emap<const float> V(vp + g * hd, n_keys, hd, Eigen::OuterStride<>(vs));
            detail::emap<const float> dC(dctx.row(b * S) + h * hd, len, hd, os(dctx));
            detail::emap<float> dQ(dq.row(b * S) + h * hd, len, hd, os(dq));
            detail::emap<float> dK(dkp + g * hd, n_keys, hd, Eigen::OuterStride<>(dks));
            detail::emap<float> dV(dvp + g * hd, n_keys, hd, Eigen::OuterStride<>(dvs));
            const auto& Pr = tape.probs[std::size_t(b * H + h)];
            as_eigen(dP).noalias() = dC * V.transpose();
            dV.noalias() += as_eigen(Pr).transpose() * dC;
            for (index_t i = 0; i < len; ++i) {
                const float* p = Pr.row(i);
                float* g_ = dP.row(i);
                double dot = 0;
                for (index_t j = 0; j < n_keys; ++j) dot += double(g_[j]) * p[j];
                for (index_t j = 0; j < n_keys; ++j) g_[j] = p[j] * (g_[j] - float(dot)) * scale;
            }
            dQ.noalias() += as_eigen(dP) * K;
            dK.noalias() += as_eigen(dP).transpose() * Q;
        }
        if (P > 0) {
            dpk[std::size_t(b)] = Matrix<float>(P, kvd);
            dpv[std::size_t(b)] = Matrix<float>(P, kvd);
            for (index_t r = 0; r < P; ++r)
                for (index_t c = 0; c < kvd; ++c) dpk[std::size_t(b)](r, c) = dkc(r, c), dpv[std::size_t(b)](r, c) = dvc(r, c);
            for (index_t r = 0; r < len; ++r)
                for (index_t c = 0; c < kvd; ++c) dk(b * S + r, c) = dkc(P + r, c), dv(b * S + r, c) = dvc(P + r, c);
        }
        if constexpr (C::rope) {
            detail::rope_transpose(dq.view().middle_rows(b * S, len), H, hd, s.rope_base, s.rope);
            detail::rope_transpose(dk.view().middle_rows(b * S, len), G, hd, s.rope_base, s.rope);
        }
    });
    for (std::size_t b = 0; b < dpk.size(); ++b) {
        if (dpk[b].empty()) continue;
        detail::add_to(terms.prefix.gk, dpk[b]);
        detail::add_to(terms.prefix.gv, dpv[b]);
    }
    Matrix<float>& din = sc.din;
    // pre-LN BitFit's Δβ of norm 1 is the column sum of d(attn_in): then din is formed even when dx is not wanted
    const bool want_din = want_dx || (!post && beta1);
    if (want_din) din.reset(M, d);
    const MatrixView<float> din_v = want_din ? MatrixView<float>(din) : MatrixView<float>();
    detail::linear_backward<C>(layer, pet::target::q, terms, tape, a_in, dq, din_v, false);
    detail::linear_backward<C>(layer, pet::target::k, terms, tape, a_in, dk, din_v, true);
    detail::linear_backward<C>(layer, pet::target::v, terms, tape, a_in, dv, din_v, true);
    if (want_din && !ad_att.empty()) detail::add_to(din, din_extra);
    if (!want_dx) {
        if constexpr (!post)
            if (beta1) detail::add_colsum(beta1.g, din);
        return;
    }
    if constexpr (!post) {
        if (beta1) detail::add_colsum(beta1.g, din);
        detail::norm_backward<C::norm>(tape.n1, g1, din, din);
    }
    for (index_t r = 0; r < M; ++r)
        for (index_t c = 0; c < d; ++c) dx(r, c) = dt(r, c) + din(r, c);
    nn::detail::zero_padding(dx, L);
}

}  // namespace cpet::train
