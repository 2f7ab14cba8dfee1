// cpet/strategy/inherit.hpp — CPET's knowledge inheritance (Zhao et al., arXiv 2307.07705, §3.2): a task's
// modules trained on the dense model become the starting point of the same task on its compressed version.
//
// Quantized and sparse backbones keep every shape, so the modules are copied once they are checked to fit the
// compressed layer. A structurally pruned layer (nn/prune.hpp) is the dense layer restricted to the kept query
// heads, KV heads and FFN neurons; its modules are the dense ones restricted the same way, which is exact: for a
// dense layer whose removed units contribute nothing, the pruned layer running the inherited modules computes what
// the dense layer running the dense modules computes. Per method (rank, bottleneck and prefix length unchanged;
// the d_model side of every linear never changes):
//   low-rank (LoRA, rsLoRA, recovery, recovery_linear)   B rows of q by the kept query channels, of k / v by the
//                                                        kept KV channels, of up / gate by the kept neurons;
//                                                        A columns of o by the kept query channels, of down by the
//                                                        kept neurons
//   IA3                                                  q / k / v output scales and the down input scale, sliced
//   BitFit                                               Δb of q, k / v, up / gate sliced as their outputs; Δb of
//                                                        o and down, Δβ of the norms: d_model, copied
//   prefix tuning, P-tuning v2                           key / value columns [P, kv_dim] by the kept KV channels
//   adapters (all forms), prompt tuning                  act on d_model: copied
// A channel of a head is head h's channels h·head_dim .. h·head_dim + head_dim − 1.
//
// Bad input (the source is never modified, nothing is returned half-built): modules that do not fit the dense
// layer, maps of the wrong length, an index out of range or repeated, query heads whose KV head was not kept, a
// compressed layer of another d_model or FFN kind → shape_error naming the operand.
#pragma once

#include <algorithm>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "cpet/compress/structured.hpp"
#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/nn/compress.hpp"
#include "cpet/nn/layer.hpp"
#include "cpet/nn/prune.hpp"
#include "cpet/pet/task.hpp"

namespace cpet::strategy {

/// What a structurally pruned layer kept of its dense layer, in units: indices in the dense layer (the order is
/// the pruned layer's, ascending when nn::prune_structured made them).
struct kept_units {
    std::vector<index_t> heads;     ///< query heads  [n_heads of the pruned layer]
    std::vector<index_t> kv_heads;  ///< KV heads     [n_kv_heads of the pruned layer]
    std::vector<index_t> neurons;   ///< FFN neurons  [d_ff of the pruned layer]
    index_t head_dim = 0;           ///< channels per head (pruning never changes it)

    static kept_units of(const nn::pruned_layer& p) {
        return {p.kept_heads, p.kept_kv_heads, p.kept_neurons, p.shape.head_dim};
    }
    template <nn::LayerConfig C>
    static kept_units of(const nn::compressed_layer<C>& c) {
        return {c.kept_heads, c.kept_kv_heads, c.kept_neurons, c.layer.shape().head_dim};
    }
    /// Every unit of a layer of shape s (what a quantized or sparse backbone keeps).
    static kept_units all(const nn::layer_shape& s) {
        kept_units k;
        k.head_dim = s.head_dim;
        for (index_t i = 0; i < s.n_heads; ++i) k.heads.push_back(i);
        for (index_t i = 0; i < s.n_kv_heads; ++i) k.kv_heads.push_back(i);
        for (index_t i = 0; i < s.d_ff; ++i) k.neurons.push_back(i);
        return k;
    }
};

/// The pet::layer_dims of the dense layer `dense` restricted to `kept` (what the pruned layer's pet_dims() is).
inline pet::layer_dims pruned_dims(const pet::layer_dims& dense, const kept_units& kept) {
    pet::layer_dims d = dense;
    d.q_dim = index_t(kept.heads.size()) * kept.head_dim;
    d.kv_dim = index_t(kept.kv_heads.size()) * kept.head_dim;
    d.d_ff = index_t(kept.neurons.size());
    return d;
}

namespace detail {

/// Per channel of the compressed layer, its channel in the dense layer (`same_shape`: none, every side kept).
struct channel_maps {
    std::vector<index_t> q, kv, ff;
    bool same_shape = false;

    static channel_maps identity() {
        channel_maps m;
        m.same_shape = true;
        return m;
    }

    /// The map of target t's output side (null: unchanged, d_model or a same-shape layer).
    const std::vector<index_t>* out(pet::target t) const noexcept {
        if (same_shape) return nullptr;
        switch (t) {
            case pet::target::q: return &q;
            case pet::target::k:
            case pet::target::v: return &kv;
            case pet::target::up:
            case pet::target::gate: return &ff;
            default: return nullptr;  // o, down
        }
    }
    /// The map of target t's input side (null: unchanged).
    const std::vector<index_t>* in(pet::target t) const noexcept {
        if (same_shape) return nullptr;
        return t == pet::target::o ? &q : t == pet::target::down ? &ff : nullptr;
    }
};

/// Throws unless `map` has `expected` distinct entries in [0, limit).
inline void check_map(const std::vector<index_t>& map, index_t expected, index_t limit, const char* name,
                      const char* unit, const char* who) {
    require<shape_error>(index_t(map.size()) == expected, who, ": ", name, " has ", map.size(), " entries, the "
                         "compressed layer has ", expected, " ", unit);
    std::vector<char> seen(std::size_t(std::max<index_t>(limit, 0)), 0);
    for (std::size_t i = 0; i < map.size(); ++i) {
        const index_t v = map[i];
        require<shape_error>(v >= 0 && v < limit, who, ": ", name, "[", i, "] = ", v, " is out of range [0, ", limit,
                             ") (the dense layer's ", unit, ")");
        require<shape_error>(!seen[std::size_t(v)], who, ": ", name, "[", i, "] = ", v, " is repeated (each ", unit,
                             " of the dense layer is kept at most once)");
        seen[std::size_t(v)] = 1;
    }
}

/// The channel maps of `kept`, checked against both layers (see the top of this file).
inline channel_maps maps_of(const pet::layer_dims& from, const pet::layer_dims& to, const kept_units& k,
                            const char* who) {
    require<shape_error>(from.d_model > 0 && from.q_dim > 0 && from.kv_dim > 0 && from.d_ff > 0, who,
                         ": the dense layer's layer_dims are not set");
    require<shape_error>(to.d_model == from.d_model, who, ": the compressed layer has d_model ", to.d_model,
                         ", the dense layer ", from.d_model, " (pruning never changes d_model)");
    require<shape_error>(to.gated == from.gated, who, ": the compressed layer's FFN ", to.gated ? "has" : "has no",
                         " gate, the dense layer's ", from.gated ? "has one" : "has none");
    const index_t hd = k.head_dim;
    require<shape_error>(hd > 0 && from.q_dim % hd == 0 && from.kv_dim % hd == 0, who, ": head_dim ", hd,
                         " does not divide the dense layer's q_dim ", from.q_dim, " and kv_dim ", from.kv_dim);
    require<shape_error>(to.q_dim % hd == 0 && to.kv_dim % hd == 0, who, ": head_dim ", hd, " does not divide the "
                         "compressed layer's q_dim ", to.q_dim, " and kv_dim ", to.kv_dim);
    const index_t heads = from.q_dim / hd, kv_heads = from.kv_dim / hd;
    check_map(k.heads, to.q_dim / hd, heads, "kept_heads", "query heads", who);
    check_map(k.kv_heads, to.kv_dim / hd, kv_heads, "kept_kv_heads", "KV heads", who);
    check_map(k.neurons, to.d_ff, from.d_ff, "kept_neurons", "FFN neurons", who);
    // query head h reads KV head h / group in both layers, so the kept heads must come in whole groups, in the
    // kept KV heads' order
    require<shape_error>(heads % kv_heads == 0, who, ": the dense layer's ", heads, " query heads do not split "
                         "into its ", kv_heads, " KV heads");
    const index_t group = heads / kv_heads;
    require<shape_error>(index_t(k.heads.size()) == group * index_t(k.kv_heads.size()), who, ": kept_heads has ",
                         k.heads.size(), " query heads for ", k.kv_heads.size(), " kept KV heads, expected ", group,
                         " per KV head (the dense layer's ratio)");
    for (std::size_t i = 0; i < k.heads.size(); ++i) {
        const index_t g = k.kv_heads[i / std::size_t(group)];
        require<shape_error>(k.heads[i] / group == g, who, ": kept_heads[", i, "] = ", k.heads[i], " reads KV head ",
                             k.heads[i] / group, " in the dense layer, but position ", i, " of the compressed layer "
                             "reads kept_kv_heads[", i / std::size_t(group), "] = ", g);
    }
    channel_maps out;
    out.q = compress::expand_groups(k.heads, hd);
    out.kv = compress::expand_groups(k.kv_heads, hd);
    out.ff = k.neurons;
    return out;
}

inline Matrix<float> rows_of(const Matrix<float>& m, const std::vector<index_t>* map) {
    return map ? compress::select_rows(m, *map) : m;
}
inline Matrix<float> cols_of(const Matrix<float>& m, const std::vector<index_t>* map) {
    return map ? compress::select_cols(m, *map) : m;
}
inline std::vector<float> elems_of(const std::vector<float>& v, const std::vector<index_t>* map) {
    return map ? compress::select(v, *map) : v;
}

template <class M>
inline constexpr bool is_lowrank_modules = requires(const M& m) {
    { m.f } -> std::convertible_to<const pet::detail::lowrank_factors&>;
};

/// m restricted by the maps (m was checked to fit the dense layer; `to` is the compressed layer's dims).
template <class M>
M slice(const M& m, const pet::layer_dims& to, const channel_maps& c) {
    M out = m;
    if constexpr (is_lowrank_modules<M>) {
        out.f.dims = to;
        for (int i = 0; i < pet::target_count; ++i) {
            const auto t = pet::target(i);
            if (!m.f.adapted(t)) continue;
            out.f.A[std::size_t(i)] = cols_of(m.f.A[std::size_t(i)], c.in(t));
            out.f.B[std::size_t(i)] = rows_of(m.f.B[std::size_t(i)], c.out(t));
        }
    } else if constexpr (std::is_same_v<M, pet::ia3::modules>) {
        out.dims = to;
        for (int i = 0; i < pet::target_count; ++i) {
            const auto t = pet::target(i);  // q / k / v: outputs; down: its input
            out.l[std::size_t(i)] = elems_of(m.l[std::size_t(i)], t == pet::target::down ? c.in(t) : c.out(t));
        }
    } else if constexpr (std::is_same_v<M, pet::bitfit::modules>) {
        out.dims = to;
        for (int i = 0; i < pet::target_count; ++i)
            out.delta[std::size_t(i)] = elems_of(m.delta[std::size_t(i)], c.out(pet::target(i)));
    } else if constexpr (std::is_same_v<M, pet::prefix_tuning::modules> ||
                         std::is_same_v<M, pet::p_tuning_v2::modules>) {
        if (!m.k.empty()) {  // keys and values have k's / v's output channels
            out.k = cols_of(m.k, c.out(pet::target::k));
            out.v = cols_of(m.v, c.out(pet::target::v));
        }
    } else {
        // adapters (every form) and prompt tuning live on d_model: the copy is the inheritance
        static_assert(std::is_same_v<M, pet::adapter::modules> || std::is_same_v<M, pet::parallel_adapter::modules> ||
                          std::is_same_v<M, pet::scaled_parallel_adapter::modules> ||
                          std::is_same_v<M, pet::prompt_tuning::modules>,
                      "cpet strategy::inherit: a PET method without an inheritance rule (add its slicing here)");
    }
    return out;
}

template <class M>
inline constexpr bool inheritable = pet::detail::is_alternative<M, pet::task::method>;

}  // namespace detail

// ---- quantized / sparse backbones: same shapes, the modules are copied ----

/// `m` for a compressed layer of the dense layer's shape (`compressed`: its pet_dims()): checked to fit, then
/// copied. Throws shape_error (from the modules' check_fits, naming the part) when it does not fit.
template <class M>
    requires detail::inheritable<M>
M inherit(const M& m, const pet::layer_dims& compressed) {
    m.check_fits(compressed, "strategy::inherit");
    return detail::slice(m, compressed, detail::channel_maps::identity());
}
/// Every method of task t, copied for a same-shape compressed layer.
inline pet::task inherit(const pet::task& t, const pet::layer_dims& compressed) {
    t.check_fits(compressed, "strategy::inherit");
    pet::task out;
    for (std::size_t i = 0; i < t.size(); ++i)
        std::visit([&](const auto& m) { out.add(detail::slice(m, compressed, detail::channel_maps::identity())); },
                   t.at(i));
    return out;
}
template <class M, nn::LayerConfig C>
auto inherit(const M& m, const TransformerLayer<C>& compressed) {
    return inherit(m, compressed.pet_dims());
}

// ---- structurally pruned backbones: every method sliced by the kept units ----

/// `m`, trained on the dense layer `dense`, restricted to the units `kept` for the pruned layer `compressed`
/// (its pet_dims(); the quantization of a pruned + quantized layer does not matter). See the top of this file.
template <class M>
    requires detail::inheritable<M>
M inherit(const M& m, const pet::layer_dims& dense, const pet::layer_dims& compressed, const kept_units& kept) {
    constexpr const char* who = "strategy::inherit";
    m.check_fits(dense, who);
    const auto maps = detail::maps_of(dense, compressed, kept, who);
    M out = detail::slice(m, compressed, maps);
    out.check_fits(compressed, who);
    return out;
}
/// The same with the compressed layer's dims derived from the dense ones and `kept` (pruned_dims).
template <class M>
    requires detail::inheritable<M>
M inherit(const M& m, const pet::layer_dims& dense, const kept_units& kept) {
    return inherit(m, dense, pruned_dims(dense, kept), kept);
}
/// Every method of task t (in its order), restricted to `kept`. t is not modified.
inline pet::task inherit(const pet::task& t, const pet::layer_dims& dense, const pet::layer_dims& compressed,
                         const kept_units& kept) {
    constexpr const char* who = "strategy::inherit";
    t.check_fits(dense, who);
    const auto maps = detail::maps_of(dense, compressed, kept, who);
    pet::task out;
    for (std::size_t i = 0; i < t.size(); ++i)
        std::visit([&](const auto& m) { out.add(detail::slice(m, compressed, maps)); }, t.at(i));
    out.check_fits(compressed, who);
    return out;
}
inline pet::task inherit(const pet::task& t, const pet::layer_dims& dense, const kept_units& kept) {
    return inherit(t, dense, pruned_dims(dense, kept), kept);
}
/// From layer objects: the dense layer the modules were trained on and the pruned (and perhaps quantized) one.
template <class M, nn::LayerConfig Cd, nn::LayerConfig Cc>
auto inherit(const M& m, const TransformerLayer<Cd>& dense, const TransformerLayer<Cc>& compressed,
             const kept_units& kept) {
    return inherit(m, dense.pet_dims(), compressed.pet_dims(), kept);
}
/// From nn::compress's result, which carries the kept maps (all units when nothing was pruned).
template <class M, nn::LayerConfig Cd, nn::LayerConfig Cc>
auto inherit(const M& m, const TransformerLayer<Cd>& dense, const nn::compressed_layer<Cc>& compressed) {
    return inherit(m, dense.pet_dims(), compressed.layer.pet_dims(), kept_units::of(compressed));
}

}  // namespace cpet::strategy
