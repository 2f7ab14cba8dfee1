// cpet/pet/policy.hpp — what a parameter-efficient tuning (PET) policy is, and the hook points a layer offers it.
//
// A PET policy `P` is a type; its trained parameters for one layer are DATA of type `P::modules`, kept apart from
// the (const, shared) backbone, so one backbone serves many tasks: `layer.forward(x, lengths, y, ws, modules)`.
// `P::modules` DECLARES the hooks it uses (`static constexpr pet::hook_set hooks{pet::hook::linear, ...}`) and the
// layer calls exactly those (`if constexpr (pet::uses_hook<M, pet::hook::linear>)`); a policy with no hooks
// (pet::none) costs nothing. A declared hook whose member does not match the signature below, or a hook member
// that is not declared, is a compile error naming the hook and its concept (check_modules), never a silent
// no-op. A modules type that declares any hook also says whether it fits a layer (`check_fits`, FitsCheck),
// which the layer asks once per call before anything runs. The hooks, all const members of `P::modules`:
//
//   linear hook (LoRA, recovery, IA3)      lowrank(target, x, scratch) -> std::optional<lowrank_args>
//       For the linear `target` with input x [M, in], return U [M, r] (= x·Aᵀ, computed once into scratch), B
//       [out, r] and a scale s; the layer adds s·U·Bᵀ inside the base GEMM's epilogue (before the activation), so
//       an unmerged adapter costs one thin GEMM and no second pass over y. std::nullopt: target not adapted.
//   sublayer hook (adapters)               sublayer(where, input, output, scratch)
//       Transforms the attention / FFN sublayer output [M, d] in place before the residual add; `input` is what
//       the sublayer consumed (post-LN: the layer input; pre-LN: the normalised input) for parallel adapters.
//   attention hook (prefix, P-tuning v2)   prefix() -> std::optional<prefix_kv>
//       Extra key/value rows [P, n_kv_heads·head_dim] placed before every sequence's keys (already projected;
//       no RoPE is applied to them); every query sees them.
//   input hook (prompt tuning)             virtual_tokens() -> ConstMatrixView<float>
//       Rows [P, d_model] put before each sequence's embeddings; a model front end applies it, not a layer
//       (nn::Stack::forward does, see pet/prompt.hpp).
//   scale hook (IA3)                       scale(target) -> std::optional<std::span<const float>>
//       A per-feature factor: for q, k, v it multiplies the linear's OUTPUT (after bias and low-rank term, before
//       RoPE); for down it multiplies its INPUT, i.e. the FFN hidden activation (PEFT's `feedforward_modules`).
//       Other targets are never asked. One extra pass over those activations (a per-column scale in the GEMM
//       epilogue would fold it away).
//   bias hook (BitFit)                     bias_delta(target) -> std::optional<std::span<const float>>
//       Δb [out] added to the linear's bias (the backbone's own, or zero where it has none) through the
//       epilogue's bias pointer: the layer sums b + Δb into scratch, no pass over y.
//   norm hook (BitFit's LayerNorm β)       norm_bias_delta(norm_site) -> std::optional<std::span<const float>>
//       Δβ [d_model] added to the β of norm1 / norm2 (LayerNorm only: RMSNorm has no β, and a layer refuses a
//       task that has a Δβ for one); the layer sums β + Δβ into scratch and hands it to the norm kernel.
//
// Order inside one layer (what a stack of policies composes to, and what the reference tests compute):
//   linear   y = act(x·Wᵀ + (b + Δb) + Σ_i s_i·U_i·B_iᵀ)   (all low-rank terms in ONE fused epilogue term)
//   scale    q/k/v ⊙= l (before RoPE);  FFN hidden ⊙= l_ff (before down)
//   norm     β ← β + Δβ of norm1 / norm2
//   prefix   keys = [P_k; k], values = [P_v; v]
//   sublayer out ← hook_1(out), then hook_2, ... in the stack's order, then the residual add
//
// A stack of policies (Recovery + LoRA, Prefix + parallel adapter) is itself a policy whose modules hold a tuple
// of the members' modules and whose hooks combine them (low-rank terms concatenate along the rank; sublayer hooks
// chain); the scratch therefore hands out several independent slots.
#pragma once

#include <array>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "cpet/core/buffer.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/kernels/epilogue.hpp"

namespace cpet::pet {

/// The linears a linear hook may target (PEFT's `target_modules`: q_proj, k_proj, v_proj, o_proj, up_proj,
/// gate_proj, down_proj; BERT's query, key, value, attention.output.dense, intermediate.dense, output.dense).
enum class target : int { q = 0, k, v, o, up, gate, down };
inline constexpr int target_count = 7;

inline constexpr std::string_view target_name(target t) noexcept {
    switch (t) {
        case target::q: return "q";
        case target::k: return "k";
        case target::v: return "v";
        case target::o: return "o";
        case target::up: return "up";
        case target::gate: return "gate";
        default: return "down";
    }
}

/// A set of targets (PEFT's `target_modules` as a bit set).
class target_set {
public:
    constexpr target_set() = default;
    constexpr target_set(std::initializer_list<target> ts) noexcept {
        for (auto t : ts) bits_ |= bit(t);
    }
    static constexpr target_set all() noexcept {
        target_set s;
        s.bits_ = (1u << target_count) - 1;
        return s;
    }
    /// q, k, v, o: the attention linears.
    static constexpr target_set attention() noexcept { return {target::q, target::k, target::v, target::o}; }
    /// up, gate, down: the FFN linears.
    static constexpr target_set ffn() noexcept { return {target::up, target::gate, target::down}; }

    constexpr bool contains(target t) const noexcept { return (bits_ & bit(t)) != 0; }
    constexpr bool empty() const noexcept { return bits_ == 0; }
    constexpr target_set& insert(target t) noexcept {
        bits_ |= bit(t);
        return *this;
    }
    constexpr target_set operator|(target_set o) const noexcept {
        target_set s;
        s.bits_ = bits_ | o.bits_;
        return s;
    }
    constexpr bool operator==(const target_set&) const = default;
    /// "q,v,down".
    std::string str() const {
        std::string out;
        for (int i = 0; i < target_count; ++i)
            if (contains(target(i))) {
                if (!out.empty()) out += ',';
                out += target_name(target(i));
            }
        return out.empty() ? std::string("(none)") : out;
    }

private:
    static constexpr std::uint32_t bit(target t) noexcept { return 1u << static_cast<int>(t); }
    std::uint32_t bits_ = 0;
};

/// The target a PEFT / HF module name means: our short names (q, k, v, o, up, gate, down), LLaMA's (q_proj, k_proj,
/// v_proj, o_proj, up_proj, gate_proj, down_proj) and BERT's (query, key, value, attention.output.dense,
/// intermediate.dense, output.dense). std::nullopt when the name means none of them.
inline std::optional<target> parse_target(std::string_view n) noexcept {
    struct entry {
        std::string_view name;
        target t;
    };
    static constexpr entry names[] = {
        {"q", target::q},          {"q_proj", target::q},         {"query", target::q},
        {"k", target::k},          {"k_proj", target::k},         {"key", target::k},
        {"v", target::v},          {"v_proj", target::v},         {"value", target::v},
        {"o", target::o},          {"o_proj", target::o},         {"attention.output.dense", target::o},
        {"up", target::up},        {"up_proj", target::up},       {"intermediate.dense", target::up},
        {"gate", target::gate},    {"gate_proj", target::gate},   {"down", target::down},
        {"down_proj", target::down}, {"output.dense", target::down},
    };
    for (const auto& e : names)
        if (e.name == n) return e.t;
    return std::nullopt;
}

/// PEFT-style `target_modules` names to a target_set; throws format_error naming an unknown module.
inline target_set parse_targets(std::initializer_list<std::string_view> names) {
    target_set s;
    for (auto n : names) {
        const auto t = parse_target(n);
        require<format_error>(t.has_value(), "target_modules: unknown module \"", n,
                              "\" (expected one of q, k, v, o, up, gate, down or the LLaMA / BERT names q_proj, "
                              "k_proj, v_proj, o_proj, up_proj, gate_proj, down_proj, query, key, value, "
                              "attention.output.dense, intermediate.dense, output.dense)");
        s.insert(*t);
    }
    return s;
}

/// What a PET factory needs to know of a layer (nn::TransformerLayer::pet_dims() makes one): the width of every
/// linear's input and output, and which linears exist.
struct layer_dims {
    index_t d_model = 0, q_dim = 0, kv_dim = 0, d_ff = 0;
    bool gated = false;  ///< the FFN has a gate linear (SwiGLU)
    bool bias = false;   ///< the backbone's linears carry biases
    bool norm_bias = false;  ///< the layer's norms have a β (LayerNorm; RMSNorm has none)

    bool has(target t) const noexcept { return t != target::gate || gated; }
    index_t in(target t) const noexcept {
        return t == target::o ? q_dim : t == target::down ? d_ff : d_model;
    }
    index_t out(target t) const noexcept {
        switch (t) {
            case target::q: return q_dim;
            case target::k:
            case target::v: return kv_dim;
            case target::o:
            case target::down: return d_model;
            default: return d_ff;
        }
    }
    /// Throws shape_error unless every target of `ts` exists in the layer (`who` prefixes the message).
    void check_targets(target_set ts, const char* who) const {
        require<shape_error>(d_model > 0 && q_dim > 0 && kv_dim > 0 && d_ff > 0, who,
                             ": layer_dims are not set (d_model ", d_model, ", q_dim ", q_dim, ", kv_dim ", kv_dim,
                             ", d_ff ", d_ff, ")");
        require<shape_error>(!ts.contains(target::gate) || gated, who,
                             ": target module gate does not exist in this layer (its FFN has no gate linear; "
                             "targets: ", ts.str(), ")");
    }
};

/// One named group of PET parameters (for parameter accounting, see pet/accounting.hpp).
struct parameter_group {
    std::string name;  ///< e.g. "q.lora_A"
    index_t count = 0;
    bool trainable = true;
};

/// Which sublayer's output a sublayer hook sees.
enum class sublayer { attention, ffn };
inline constexpr std::string_view sublayer_name(sublayer s) noexcept {
    return s == sublayer::attention ? "attention" : "ffn";
}

/// Which of a layer's two norms a norm hook is asked about (pre-LN: before attention / before the FFN; post-LN:
/// after the attention residual / after the FFN residual).
enum class norm_site : int { norm1 = 0, norm2 };
inline constexpr int norm_site_count = 2;
inline constexpr std::string_view norm_site_name(norm_site n) noexcept {
    return n == norm_site::norm1 ? "norm1" : "norm2";
}

/// A low-rank term s·U·Bᵀ for one linear: U [M, r] (M = rows of the linear's input), B [out, r]. Or, for
/// modules whose term differs per run of rows (a mixed-task batch), `segments` (kernels::lowrank_segment, each
/// with its own U, B, rank and scale; u and b then unused), which the GEMM applies to each segment's rows only.
struct lowrank_args {
    ConstMatrixView<float> u;
    ConstMatrixView<float> b;
    float scale = 1.f;
    std::span<const kernels::lowrank_segment> segments = {};
};

/// Fills the low-rank fields of a GEMM epilogue.
inline void apply(kernels::epilogue& ep, const lowrank_args& lr) noexcept {
    if (!lr.segments.empty()) {
        ep.segments = lr.segments.data();
        ep.segment_count = index_t(lr.segments.size());
        return;
    }
    ep.lowrank_u = lr.u.data();
    ep.ld_u = lr.u.stride();
    ep.lowrank_b = lr.b.data();
    ep.ld_b = lr.b.stride();
    ep.rank = lr.u.cols();
    ep.lowrank_scale = lr.scale;
}

/// Extra keys and values [P, n_kv_heads·head_dim] of an attention hook.
struct prefix_kv {
    ConstMatrixView<float> k;
    ConstMatrixView<float> v;
};

/// Which scratch slot each user takes, so hooks of stacked policies and the layer never overwrite each other's
/// live data. A slot's content lives until the same slot is requested again.
namespace slot {
inline constexpr int lowrank_u = 0;    ///< U of the linear hook (lives until the GEMM ran)
inline constexpr int lowrank_b = 1;    ///< a stack's concatenated [s1·B1 | s2·B2]
inline constexpr int hidden = 2;       ///< sublayer hooks' bottleneck activations
inline constexpr int hidden2 = 3;      ///< a second one (a chain of sublayer hooks)
inline constexpr int bias = 4;         ///< the layer's b + Δb (bias hook)
inline constexpr int norm_bias = 5;    ///< the layer's β + Δβ (norm hook)
inline constexpr int factor = 6;       ///< a compactly stored factor, decoded for one product
}  // namespace slot

/// Grow-only scratch memory the layer lends to hooks: slot i keeps its storage between calls, so after the first
/// call with the largest shape nothing is allocated.
class scratch {
public:
    static constexpr int slots = 8;

    /// A rows x cols matrix in slot `slot` (contents unspecified); valid until the next request for that slot.
    MatrixView<float> matrix(int slot, index_t rows, index_t cols) {
        require<shape_error>(slot >= 0 && slot < slots, "pet::scratch: slot ", slot, " out of range [0, ", slots,
                             ")");
        require<shape_error>(rows >= 0 && cols >= 0, "pet::scratch: negative shape ", shape_str(rows, cols));
        auto& b = bufs_[static_cast<std::size_t>(slot)];
        const auto n = static_cast<std::size_t>(rows * cols);
        if (b.size() < n) {
            b.reset(n);
            ++allocations_;
        }
        return {b.data(), rows, cols, cols};
    }
    /// An empty list of low-rank segments (a segmented linear hook's term) with room for n; valid until the next
    /// request.
    std::vector<kernels::lowrank_segment>& segments(std::size_t n) {
        if (segments_.capacity() < n) {
            segments_.reserve(n);
            ++allocations_;
        }
        segments_.clear();
        return segments_;
    }

    /// How often storage grew (a test that forward allocates nothing after warm-up reads it).
    std::size_t allocations() const noexcept { return allocations_; }

private:
    std::array<aligned_buffer<float>, slots> bufs_;
    std::vector<kernels::lowrank_segment> segments_;
    std::size_t allocations_ = 0;
};

// ---- hook declarations ----

/// The hook points a layer offers (see the top of this file).
enum class hook : std::uint32_t {
    linear = 1u << 0,     ///< lowrank(target, x, scratch)
    sublayer = 1u << 1,   ///< sublayer(where, input, output, scratch)
    attention = 1u << 2,  ///< prefix()
    input = 1u << 3,      ///< virtual_tokens()
    scale = 1u << 4,      ///< scale(target)
    bias = 1u << 5,       ///< bias_delta(target)
    norm = 1u << 6,       ///< norm_bias_delta(norm_site)
};

inline constexpr std::string_view hook_name(hook h) noexcept {
    switch (h) {
        case hook::linear: return "linear";
        case hook::sublayer: return "sublayer";
        case hook::attention: return "attention";
        case hook::input: return "input";
        case hook::scale: return "scale";
        case hook::bias: return "bias";
        default: return "norm";
    }
}

/// The hooks a modules type declares: `static constexpr pet::hook_set hooks{pet::hook::linear}`.
class hook_set {
public:
    constexpr hook_set() = default;
    constexpr hook_set(std::initializer_list<hook> hs) noexcept {
        for (auto h : hs) bits_ |= std::uint32_t(h);
    }
    constexpr bool contains(hook h) const noexcept { return (bits_ & std::uint32_t(h)) != 0; }
    constexpr bool empty() const noexcept { return bits_ == 0; }
    constexpr hook_set operator|(hook_set o) const noexcept {
        hook_set s;
        s.bits_ = bits_ | o.bits_;
        return s;
    }
    constexpr bool operator==(const hook_set&) const = default;

private:
    std::uint32_t bits_ = 0;
};

/// What M declares (nothing when it has no `hooks` member).
template <class M>
constexpr hook_set declared_hooks() noexcept {
    if constexpr (requires {
                      { M::hooks } -> std::convertible_to<hook_set>;
                  })
        return M::hooks;
    else
        return {};
}

/// Whether a layer calls hook H of modules M: exactly when M declares it (check_modules makes sure it exists).
template <class M, hook H>
inline constexpr bool uses_hook = declared_hooks<M>().contains(H);

/// Whether hook H of m takes part in this call: declared, and present where the modules say at run time which of
/// their hooks are (`bool active(hook) const`, pet::task). The layer fuses the residual add into the GEMM when
/// no sublayer hook is active, so a task without adapters keeps the fused path.
template <hook H, class M>
bool active_hook(const M& m) noexcept {
    if constexpr (!uses_hook<M, H>) {
        (void)m;
        return false;
    } else if constexpr (requires { m.active(H); }) {
        return m.active(H);
    } else {
        return true;
    }
}

// ---- hook concepts (on the per-layer modules type M): the signature each declared hook must have ----

template <class M>
concept LinearHook = requires(const M& m, target t, ConstMatrixView<float> x, scratch& s) {
    { m.lowrank(t, x, s) } -> std::same_as<std::optional<lowrank_args>>;
};

template <class M>
concept SublayerHook = requires(const M& m, sublayer w, ConstMatrixView<float> in, MatrixView<float> out, scratch& s) {
    m.sublayer(w, in, out, s);
};

template <class M>
concept AttentionHook = requires(const M& m) {
    { m.prefix() } -> std::same_as<std::optional<prefix_kv>>;
};

template <class M>
concept InputHook = requires(const M& m) {
    { m.virtual_tokens() } -> std::convertible_to<ConstMatrixView<float>>;
};

template <class M>
concept ScaleHook = requires(const M& m, target t) {
    { m.scale(t) } -> std::same_as<std::optional<std::span<const float>>>;
};

template <class M>
concept BiasHook = requires(const M& m, target t) {
    { m.bias_delta(t) } -> std::same_as<std::optional<std::span<const float>>>;
};

template <class M>
concept NormHook = requires(const M& m, norm_site n) {
    { m.norm_bias_delta(n) } -> std::same_as<std::optional<std::span<const float>>>;
};

/// Modules that can say whether they fit a layer: `check_fits(dims, who)` throws shape_error (prefixed by `who`,
/// naming the module part, the expected and the actual size) unless every stored matrix and vector has the width
/// the layer's linears, norms and attention have. The layer calls it once at the entry of a call (a task bound to
/// a backbone is checked there, never in the hot loops, which trust the shapes).
template <class M>
concept FitsCheck = requires(const M& m, const layer_dims& d, const char* who) { m.check_fits(d, who); };

/// The parts of a linear hook that a stack concatenates along the rank: `rank(t)` (0: not adapted),
/// `project(t, x, u, scratch)` writing U [M, rank(t)] into u (a view with its own stride), `up(t)` B [out, rank]
/// and `lowrank_scale(t)`. Policies with these get `lowrank` from pet::lowrank_from_parts.
template <class M>
concept LowrankParts = requires(const M& m, target t, ConstMatrixView<float> x, MatrixView<float> u, scratch& s) {
    { m.rank(t) } -> std::convertible_to<index_t>;
    m.project(t, x, u, s);
    { m.up(t) } -> std::convertible_to<ConstMatrixView<float>>;
    { m.lowrank_scale(t) } -> std::convertible_to<float>;
};

/// The linear hook of a policy with LowrankParts: U in slot lowrank_u.
template <class M>
std::optional<lowrank_args> lowrank_from_parts(const M& m, target t, ConstMatrixView<float> x, scratch& s) {
    const index_t r = m.rank(t);
    if (r == 0) return std::nullopt;
    auto u = s.matrix(slot::lowrank_u, x.rows(), r);
    m.project(t, x, u, s);
    return lowrank_args{u, m.up(t), m.lowrank_scale(t)};
}

/// Whether M has a member named like a hook (whatever its signature: a near miss counts, so that an undeclared
/// or misspelt-signature hook is reported instead of silently never being called). `scale` is asked with a
/// target only, since other modules may have an unrelated scale() (the scaled parallel adapter's s).
template <class M, hook H>
constexpr bool has_hook_member() noexcept {
    if constexpr (H == hook::linear) return requires { &M::lowrank; };
    else if constexpr (H == hook::sublayer) return requires { &M::sublayer; };
    else if constexpr (H == hook::attention) return requires { &M::prefix; };
    else if constexpr (H == hook::input) return requires { &M::virtual_tokens; };
    else if constexpr (H == hook::scale) return requires(const M& m, target t) { m.scale(t); };
    else if constexpr (H == hook::bias) return requires { &M::bias_delta; };
    else return requires { &M::norm_bias_delta; };
}

/// The concept of hook H.
template <class M, hook H>
constexpr bool implements_hook() noexcept {
    if constexpr (H == hook::linear) return LinearHook<M>;
    else if constexpr (H == hook::sublayer) return SublayerHook<M>;
    else if constexpr (H == hook::attention) return AttentionHook<M>;
    else if constexpr (H == hook::input) return InputHook<M>;
    else if constexpr (H == hook::scale) return ScaleHook<M>;
    else if constexpr (H == hook::bias) return BiasHook<M>;
    else return NormHook<M>;
}

/// `static_assert(check_modules<M>())`: every declared hook is implemented with its signature, every hook member
/// is declared, and a module with hooks can check itself against a layer. Each failure is one sentence naming
/// the hook and its concept.
template <class M>
constexpr bool check_modules() {
    constexpr hook_set d = declared_hooks<M>();
    static_assert(!d.contains(hook::linear) || LinearHook<M>,
                  "cpet PET modules: declares pet::hook::linear but has no `std::optional<pet::lowrank_args> "
                  "lowrank(pet::target, ConstMatrixView<float> x, pet::scratch&) const` (concept pet::LinearHook)");
    static_assert(!d.contains(hook::sublayer) || SublayerHook<M>,
                  "cpet PET modules: declares pet::hook::sublayer but has no `void sublayer(pet::sublayer, "
                  "ConstMatrixView<float> in, MatrixView<float> out, pet::scratch&) const` (concept pet::SublayerHook)");
    static_assert(!d.contains(hook::attention) || AttentionHook<M>,
                  "cpet PET modules: declares pet::hook::attention but has no `std::optional<pet::prefix_kv> prefix() "
                  "const` (concept pet::AttentionHook)");
    static_assert(!d.contains(hook::input) || InputHook<M>,
                  "cpet PET modules: declares pet::hook::input but has no `ConstMatrixView<float> virtual_tokens() "
                  "const` (concept pet::InputHook)");
    static_assert(!d.contains(hook::scale) || ScaleHook<M>,
                  "cpet PET modules: declares pet::hook::scale but has no `std::optional<std::span<const float>> "
                  "scale(pet::target) const` (concept pet::ScaleHook)");
    static_assert(!d.contains(hook::bias) || BiasHook<M>,
                  "cpet PET modules: declares pet::hook::bias but has no `std::optional<std::span<const float>> "
                  "bias_delta(pet::target) const` (concept pet::BiasHook)");
    static_assert(!d.contains(hook::norm) || NormHook<M>,
                  "cpet PET modules: declares pet::hook::norm but has no `std::optional<std::span<const float>> "
                  "norm_bias_delta(pet::norm_site) const` (concept pet::NormHook)");
    static_assert(d.contains(hook::linear) || !has_hook_member<M, hook::linear>(),
                  "cpet PET modules: has a member `lowrank` but does not declare pet::hook::linear in `static "
                  "constexpr pet::hook_set hooks` (the layer would never call it)");
    static_assert(d.contains(hook::sublayer) || !has_hook_member<M, hook::sublayer>(),
                  "cpet PET modules: has a member `sublayer` but does not declare pet::hook::sublayer in `static "
                  "constexpr pet::hook_set hooks` (the layer would never call it)");
    static_assert(d.contains(hook::attention) || !has_hook_member<M, hook::attention>(),
                  "cpet PET modules: has a member `prefix` but does not declare pet::hook::attention in `static "
                  "constexpr pet::hook_set hooks` (the layer would never call it)");
    static_assert(d.contains(hook::input) || !has_hook_member<M, hook::input>(),
                  "cpet PET modules: has a member `virtual_tokens` but does not declare pet::hook::input in `static "
                  "constexpr pet::hook_set hooks` (the layer would never call it)");
    static_assert(d.contains(hook::scale) || !has_hook_member<M, hook::scale>(),
                  "cpet PET modules: has a member `scale(pet::target)` but does not declare pet::hook::scale in "
                  "`static constexpr pet::hook_set hooks` (the layer would never call it)");
    static_assert(d.contains(hook::bias) || !has_hook_member<M, hook::bias>(),
                  "cpet PET modules: has a member `bias_delta` but does not declare pet::hook::bias in `static "
                  "constexpr pet::hook_set hooks` (the layer would never call it)");
    static_assert(d.contains(hook::norm) || !has_hook_member<M, hook::norm>(),
                  "cpet PET modules: has a member `norm_bias_delta` but does not declare pet::hook::norm in `static "
                  "constexpr pet::hook_set hooks` (the layer would never call it)");
    static_assert(d.empty() || FitsCheck<M>,
                  "cpet PET modules: declares hooks but has no `void check_fits(const pet::layer_dims&, const char* "
                  "who) const` (concept pet::FitsCheck): a task is checked against the layer once, before it runs");
    return true;
}

/// A PET policy: a name and the per-layer modules type (data, default-constructible so containers of them work).
template <class P>
concept PetPolicy = requires {
    typename P::modules;
    { P::name() } -> std::convertible_to<std::string_view>;
} && std::default_initializable<typename P::modules> && std::movable<typename P::modules>;

/// `static_assert(check_pet_policy<P>())` names what is missing instead of printing a concept trace.
template <class P>
constexpr bool check_pet_policy() {
    static_assert(requires { typename P::modules; },
                  "cpet PetPolicy: missing `using modules = ...` (the per-layer trained parameters)");
    static_assert(requires {
        { P::name() } -> std::convertible_to<std::string_view>;
    }, "cpet PetPolicy: missing `static constexpr const char* name()`");
    if constexpr (requires { typename P::modules; }) {
        static_assert(std::default_initializable<typename P::modules>,
                      "cpet PetPolicy: `modules` must be default-constructible");
        static_assert(std::movable<typename P::modules>, "cpet PetPolicy: `modules` must be movable");
        static_assert(check_modules<typename P::modules>());
    }
    return PetPolicy<P>;
}

/// Which hooks a policy declares, hence uses (for tests and reports).
template <PetPolicy P>
struct hooks_of {
    using M = typename P::modules;
    static constexpr bool linear = uses_hook<M, hook::linear>;
    static constexpr bool sublayer = uses_hook<M, hook::sublayer>;
    static constexpr bool attention = uses_hook<M, hook::attention>;
    static constexpr bool input = uses_hook<M, hook::input>;
    static constexpr bool scale = uses_hook<M, hook::scale>;
    static constexpr bool bias = uses_hook<M, hook::bias>;
    static constexpr bool norm = uses_hook<M, hook::norm>;
};

}  // namespace cpet::pet
