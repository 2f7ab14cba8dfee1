// cpet/pet/policy.hpp — what a parameter-efficient tuning (PET) policy is, and the hook points a layer offers it.
//
// A PET policy `P` is a type; its trained parameters for one layer are DATA of type `P::modules`, kept apart from
// the (const, shared) backbone, so one backbone serves many tasks: `layer.forward(x, lengths, y, ws, modules)`.
// The layer looks at which hooks `P::modules` has and calls only those (`if constexpr (requires ...)`); a policy
// with no hooks (pet::none) costs nothing. The hooks, all const members of `P::modules`:
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
//       Rows [P, d_model] put before each sequence's embeddings; a model front end applies it, not a layer.
//
// A stack of policies (Recovery + LoRA, Prefix + parallel adapter) is itself a policy whose modules hold a tuple
// of the members' modules and whose hooks combine them (low-rank terms concatenate along the rank; sublayer hooks
// chain); the scratch therefore hands out several independent slots.
#pragma once

#include <array>
#include <concepts>
#include <cstddef>
#include <optional>
#include <string_view>

#include "cpet/core/buffer.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/kernels/gemm_f32.hpp"

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

/// Which sublayer's output a sublayer hook sees.
enum class sublayer { attention, ffn };
inline constexpr std::string_view sublayer_name(sublayer s) noexcept {
    return s == sublayer::attention ? "attention" : "ffn";
}

/// A low-rank term s·U·Bᵀ for one linear: U [M, r] (M = rows of the linear's input), B [out, r].
struct lowrank_args {
    ConstMatrixView<float> u;
    ConstMatrixView<float> b;
    float scale = 1.f;
};

/// Fills the low-rank fields of a GEMM epilogue.
inline void apply(kernels::epilogue& ep, const lowrank_args& lr) noexcept {
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
    /// How often storage grew (a test that forward allocates nothing after warm-up reads it).
    std::size_t allocations() const noexcept { return allocations_; }

private:
    std::array<aligned_buffer<float>, slots> bufs_;
    std::size_t allocations_ = 0;
};

// ---- hook concepts (on the per-layer modules type M) ----

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
    }
    return PetPolicy<P>;
}

/// Which hooks a policy uses (for tests and reports).
template <PetPolicy P>
struct hooks_of {
    static constexpr bool linear = LinearHook<typename P::modules>;
    static constexpr bool sublayer = SublayerHook<typename P::modules>;
    static constexpr bool attention = AttentionHook<typename P::modules>;
    static constexpr bool input = InputHook<typename P::modules>;
};

}  // namespace cpet::pet
