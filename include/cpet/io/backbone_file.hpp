// cpet/io/backbone_file.hpp — whole compressed backbones in cpet's own files: the layers of a TransformerLayer<C>
// list, an nn::Stack<C> or an nn::Model<C>'s stack, of any compression policy, structurally pruned ones included,
// written to one safetensors file and read back bit-exact (the rebuilt layer holds the same packed bytes, so its
// forward output equals the original's bit for bit on every ISA path).
//
// Layout (cpet file format version 1, file kind "backbone"; see cpet_format.hpp for the shared keys):
//   metadata   cpet.format        "backbone"
//              cpet.version       "1"
//              cpet.policy        C's compression policy's name (int4_g128, nm2:4_wanda_int8, unstructured50_…)
//              cpet.architecture  C's constants: "placement=post norm=layernorm ffn=mlp act=gelu_erf
//                                 mask=bidirectional rope=no bias=yes"
//              cpet.layers        N
//              cpet.layer.<i>.shape  "d_model=384 n_heads=12 n_kv_heads=12 head_dim=32 d_ff=1536
//                                 eps=9.99999996e-13 rope_base=10000 rope=half" (layer i's own shape: a pruned layer's
//                                 is smaller; floats with 9 significant digits, which round-trip every float)
//              cpet.layer.<i>.dense  "n_heads=12 n_kv_heads=12 d_ff=1536": the dense layer the kept maps index into
//              cpet.layer.<i>.biases "q k v o up down" (the linears that carry a bias, in this order; "none"), so
//                                 a missing bias tensor is noticed even where the configuration has no biases
//              cpet.weight.layers.<i>.<q|k|v|o|up|gate|down>  the weight's stored format, as in weights files
//   tensors    layers.<i>.<linear>.<…>      the weight's tensors in the weights-file layout (cpet_format.hpp)
//              layers.<i>.<linear>.bias     [out] F32, when the linear has one (a pruned layer's bias-compensated o /
//                                           down carry one even on configs without biases)
//              layers.<i>.norm1.gamma, .norm2.gamma [d_model] F32; .norm1.beta, .norm2.beta (LayerNorm only)
//              layers.<i>.kept_heads [n_heads] I64, kept_kv_heads [n_kv_heads] I64, kept_neurons [d_ff] I64:
//                                           ascending indices into the dense layer (0..n−1 when nothing was pruned)
// Reading refuses, with an io_error naming the file, the layer / tensor and the rule: another file kind or
// version, a policy or architecture other than C's (naming both), another layer count (when asked), a bad shape
// entry, a missing tensor or one of the wrong dtype or shape, a weight stored in another format, kept maps of the
// wrong length, out of range, not ascending or inconsistent with the GQA grouping (query head j belongs to KV
// head j / (n_heads / n_kv_heads)), and any tensor it does not know. A file is read completely or not at all.
#pragma once

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <numeric>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "cpet/compress/prune.hpp"
#include "cpet/io/cpet_format.hpp"
#include "cpet/nn/compress.hpp"
#include "cpet/nn/layer.hpp"
#include "cpet/nn/stack.hpp"

namespace cpet::io {

/// Which query heads, KV heads and FFN neurons of the dense layer a (structurally pruned) layer kept, and how
/// many the dense layer had. All empty and 0: nothing was pruned (the writer stores 0..n−1 of the layer's own
/// counts).
struct kept_maps {
    std::vector<index_t> heads, kv_heads, neurons;
    index_t dense_heads = 0, dense_kv_heads = 0, dense_d_ff = 0;

    bool empty() const noexcept {
        return heads.empty() && kv_heads.empty() && neurons.empty() && dense_heads == 0 && dense_kv_heads == 0 &&
               dense_d_ff == 0;
    }
    /// Everything of a layer of shape s kept.
    static kept_maps identity(const nn::layer_shape& s) {
        kept_maps m;
        m.heads = iota(s.n_heads);
        m.kv_heads = iota(s.n_kv_heads);
        m.neurons = iota(s.d_ff);
        m.dense_heads = s.n_heads, m.dense_kv_heads = s.n_kv_heads, m.dense_d_ff = s.d_ff;
        return m;
    }
    /// The maps nn::compress returned with a layer pruned from a dense layer of shape `dense`.
    template <nn::LayerConfig C>
    static kept_maps of(const nn::compressed_layer<C>& c, const nn::layer_shape& dense) {
        kept_maps m;
        m.heads = c.kept_heads, m.kv_heads = c.kept_kv_heads, m.neurons = c.kept_neurons;
        m.dense_heads = dense.n_heads, m.dense_kv_heads = dense.n_kv_heads, m.dense_d_ff = dense.d_ff;
        return m;
    }

private:
    static std::vector<index_t> iota(index_t n) {
        std::vector<index_t> v(std::size_t(n > 0 ? n : 0));
        std::iota(v.begin(), v.end(), index_t{0});
        return v;
    }
};

/// One layer read from a backbone file and what it kept of the dense layer.
template <nn::LayerConfig C>
struct backbone_layer {
    nn::TransformerLayer<C> layer;
    kept_maps kept;
};

namespace detail {

inline const char* placement_name(nn::norm_placement p) { return p == nn::norm_placement::post ? "post" : "pre"; }
inline const char* norm_name(nn::norm_kind n) { return n == nn::norm_kind::layernorm ? "layernorm" : "rmsnorm"; }
inline const char* ffn_name(nn::ffn_kind f) { return f == nn::ffn_kind::mlp ? "mlp" : "swiglu"; }
inline const char* mask_name(nn::attention_mask m) {
    return m == nn::attention_mask::bidirectional ? "bidirectional" : "causal";
}
inline const char* rope_name(kernels::rope_style r) { return r == kernels::rope_style::half ? "half" : "interleaved"; }

/// C's architecture as cpet.architecture records it (everything of C but the compression policy).
template <nn::LayerConfig C>
std::string architecture_name() {
    return cpet::detail::concat("placement=", placement_name(C::placement), " norm=", norm_name(C::norm),
                                " ffn=", ffn_name(C::ffn), " act=", kernels::activation_name(C::act),
                                " mask=", mask_name(C::mask), " rope=", C::rope ? "yes" : "no",
                                " bias=", C::bias ? "yes" : "no");
}

template <class P>
struct nm_policy_traits : std::false_type {};
template <int N, int M, compress::sparsity_score S, compress::sparse_values V>
struct nm_policy_traits<compress::nm_sparse<N, M, S, V>> : std::true_type {
    static std::string stored() {
        return cpet::detail::concat("nm_sparse:", N, ":", M, ":", V == compress::sparse_values::int8 ? "int8" : "f32");
    }
};

/// The stored format name every weight of policy P with `in` inputs must carry (empty: any of its format's).
template <class P>
std::string policy_weight_format(index_t in) {
    using F = typename P::format;
    if constexpr (nm_policy_traits<P>::value) return nm_policy_traits<P>::stored();
    else if constexpr (is_nm_format<F>) return {};  // a policy of its own over N:M weights: any pattern
    else if constexpr (is_unstructured_format<F>) return cpet::detail::concat("unstructured:", in, ":f32");
    else return format_name<F>();
}

inline std::string float_str(float v) {
    char b[32];
    std::snprintf(b, sizeof b, "%.9g", double(v));
    return b;
}

inline std::string shape_entry(const nn::layer_shape& s) {
    return cpet::detail::concat("d_model=", s.d_model, " n_heads=", s.n_heads, " n_kv_heads=", s.n_kv_heads,
                                " head_dim=", s.head_dim, " d_ff=", s.d_ff, " eps=", float_str(s.eps),
                                " rope_base=", float_str(s.rope_base), " rope=", rope_name(s.rope));
}
inline std::string dense_entry(const kept_maps& m) {
    return cpet::detail::concat("n_heads=", m.dense_heads, " n_kv_heads=", m.dense_kv_heads, " d_ff=", m.dense_d_ff);
}

/// "k1=v1 k2=v2 …" with exactly `keys` in that order; nullopt otherwise.
inline std::optional<std::vector<std::string>> parse_entry(const std::string& s, const std::vector<std::string>& keys) {
    std::vector<std::string> out;
    std::size_t at = 0;
    for (std::size_t i = 0; i < keys.size(); ++i) {
        const std::string k = keys[i] + "=";
        if (s.compare(at, k.size(), k) != 0) return std::nullopt;
        at += k.size();
        const std::size_t end = std::min(s.find(' ', at), s.size());
        if (end == at) return std::nullopt;
        out.push_back(s.substr(at, end - at));
        at = end + (i + 1 < keys.size() ? 1 : 0);
        if (i + 1 < keys.size() && end == s.size()) return std::nullopt;
    }
    if (at != s.size()) return std::nullopt;
    return out;
}
inline std::optional<index_t> parse_count(const std::string& v) {
    if (v.empty() || v.size() > 9 || v.find_first_not_of("0123456789") != std::string::npos) return std::nullopt;
    return index_t(std::stol(v));
}
inline std::optional<float> parse_float(const std::string& v) {
    if (v.empty() || v.size() > 40 || v.find_first_of(" \t\n") != std::string::npos) return std::nullopt;
    char* end = nullptr;
    const float f = std::strtof(v.c_str(), &end);
    if (end != v.c_str() + v.size()) return std::nullopt;
    return f;
}

inline nn::layer_shape parse_shape(const std::string& fn, const std::string& key, const std::string& v) {
    const auto f = parse_entry(v, {"d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "eps", "rope_base", "rope"});
    nn::layer_shape s;
    std::optional<index_t> n[5];
    std::optional<float> eps, base;
    if (f) {
        for (int i = 0; i < 5; ++i) n[i] = parse_count((*f)[std::size_t(i)]);
        eps = parse_float((*f)[5]);
        base = parse_float((*f)[6]);
    }
    const bool rope_ok = f && ((*f)[7] == "half" || (*f)[7] == "interleaved");
    require<io_error>(f && n[0] && n[1] && n[2] && n[3] && n[4] && eps && base && rope_ok, fn, ": ", key, " is '", v,
                      "', expected 'd_model=<n> n_heads=<n> n_kv_heads=<n> head_dim=<n> d_ff=<n> eps=<float> "
                      "rope_base=<float> rope=half|interleaved'");
    s.d_model = *n[0], s.n_heads = *n[1], s.n_kv_heads = *n[2], s.head_dim = *n[3], s.d_ff = *n[4];
    s.eps = *eps, s.rope_base = *base;
    s.rope = (*f)[7] == "half" ? kernels::rope_style::half : kernels::rope_style::interleaved;
    try {
        s.validate();
    } catch (const cpet::error& e) {
        throw io_error(cpet::detail::concat(fn, ": ", key, ": ", e.what()));
    }
    require<io_error>(s.q_dim() <= (index_t(1) << 24) && s.kv_dim() <= (index_t(1) << 24), fn, ": ", key,
                      ": n_heads·head_dim = ", s.q_dim(), " is beyond any layer cpet builds");
    return s;
}

/// Throws io_error (prefixed `who`, the maps named `pre` + kept_…) unless the maps fit a layer of shape s: lengths
/// of its counts, ascending indices below the dense counts, dense counts with the layer's GQA ratio, query heads
/// in their KV heads' groups.
inline void check_kept(const kept_maps& m, const nn::layer_shape& s, const std::string& who, const std::string& pre) {
    auto one = [&](const std::vector<index_t>& v, index_t len, index_t dense, const char* name, const char* what) {
        require<io_error>(index_t(v.size()) == len, who, pre, "kept_", name, " has ", v.size(), " indices, the layer has ",
                          len, " ", what);
        require<io_error>(dense >= len, who, pre, "kept_", name, ": the dense layer's ", dense, " ", what,
                          " are fewer than the ", len, " kept");
        for (std::size_t i = 0; i < v.size(); ++i)
            require<io_error>(v[i] >= 0 && v[i] < dense && (i == 0 || v[i] > v[i - 1]), who, pre, "kept_", name, "[", i,
                              "] = ", v[i], " is not an ascending index below the dense layer's ", dense, " ", what);
    };
    one(m.heads, s.n_heads, m.dense_heads, "heads", "query heads");
    one(m.kv_heads, s.n_kv_heads, m.dense_kv_heads, "kv_heads", "KV heads");
    one(m.neurons, s.d_ff, m.dense_d_ff, "neurons", "FFN neurons");
    const index_t g = s.n_heads / s.n_kv_heads;
    require<io_error>(m.dense_heads == m.dense_kv_heads * g, who, "the dense layer's ", m.dense_heads,
                      " query heads over ", m.dense_kv_heads, " KV heads do not keep the layer's ", g,
                      " query heads per KV head (structured pruning removes whole KV groups)");
    for (index_t j = 0; j < s.n_heads; ++j)
        require<io_error>(m.heads[std::size_t(j)] == m.kv_heads[std::size_t(j / g)] * g + j % g, who, pre, "kept_heads[",
                          j, "] = ", m.heads[std::size_t(j)], " is not query head ", j % g, " of kept KV head ",
                          m.kv_heads[std::size_t(j / g)], " (expected ", m.kv_heads[std::size_t(j / g)] * g + j % g, ")");
}

inline constexpr const char* linear_names[] = {"q", "k", "v", "o", "up", "gate", "down"};

/// Calls f(name, linear) for the layer's linears in linear_names order (gate only when the FFN has one).
template <nn::LayerConfig C, class F>
void for_each_linear(const nn::TransformerLayer<C>& l, F&& f) {
    f("q", l.attention().q());
    f("k", l.attention().k());
    f("v", l.attention().v());
    f("o", l.attention().o());
    f("up", l.ffn().up());
    if (const auto* g = l.ffn().gate()) f("gate", *g);
    f("down", l.ffn().down());
}

/// The cpet.layer.<i>.biases entry parsed into one flag per linear_names entry; nullopt when malformed.
inline std::optional<std::array<bool, 7>> parse_biases(const std::string& v) {
    std::array<bool, 7> has{};
    if (v == "none") return has;
    std::size_t at = 0, next = 0;
    while (at <= v.size()) {
        const std::size_t end = std::min(v.find(' ', at), v.size());
        const std::string name = v.substr(at, end - at);
        std::size_t i = next;
        while (i < 7 && name != linear_names[i]) ++i;
        if (i == 7) return std::nullopt;  // unknown, repeated or out of order
        has[i] = true;
        next = i + 1;
        at = end + 1;
    }
    return has;
}

template <nn::LayerConfig C>
void encode_linear(tensor_store& st, const std::string& name, const nn::Linear<typename C::compression::format>& l) {
    encode_weight(st, name, l.weight());
    if (const float* b = l.bias()) st.add(name + ".bias", {std::uint64_t(l.out_features())}, b, std::size_t(l.out_features()));
}

template <nn::LayerConfig C>
void encode_norm(tensor_store& st, const std::string& name, const nn::Norm<C::norm>& n) {
    const auto g = n.gamma();
    st.add(name + ".gamma", {g.size()}, g.data(), g.size());
    if constexpr (C::norm == nn::norm_kind::layernorm) {
        const auto b = n.beta();
        st.add(name + ".beta", {b.size()}, b.data(), b.size());
    }
}

template <nn::LayerConfig C>
void save_layers(const std::filesystem::path& path, const std::vector<const nn::TransformerLayer<C>*>& layers,
                 std::span<const kept_maps> kept) {
    const std::string fn = path.string();
    require<io_error>(kept.empty() || kept.size() == layers.size(), fn, ": ", kept.size(), " kept maps for ",
                      layers.size(), " layers (give one per layer, or none)");
    tensor_store st;
    auto& md = st.metadata();
    for (std::size_t i = 0; i < layers.size(); ++i) {
        const auto& l = *layers[i];
        const nn::layer_shape& s = l.shape();
        const std::string pre = "layers." + std::to_string(i) + ".";
        const kept_maps m = kept.empty() || kept[i].empty() ? kept_maps::identity(s) : kept[i];
        check_kept(m, s, cpet::detail::concat(fn, ": layer ", i, ": "), pre);
        md["cpet.layer." + std::to_string(i) + ".shape"] = shape_entry(s);
        md["cpet.layer." + std::to_string(i) + ".dense"] = dense_entry(m);
        std::string biases;
        for_each_linear<C>(l, [&](const char* name, const auto& lin) {
            encode_linear<C>(st, pre + name, lin);
            if (lin.bias()) biases += (biases.empty() ? "" : " ") + std::string(name);
        });
        md["cpet.layer." + std::to_string(i) + ".biases"] = biases.empty() ? "none" : biases;
        encode_norm<C>(st, pre + "norm1", l.norm1());
        encode_norm<C>(st, pre + "norm2", l.norm2());
        encode_indices(st, pre + "kept_heads", m.heads);
        encode_indices(st, pre + "kept_kv_heads", m.kv_heads);
        encode_indices(st, pre + "kept_neurons", m.neurons);
    }
    st.save(path, {{"cpet.format", "backbone"},
                   {"cpet.version", cpet_format_version},
                   {"cpet.policy", std::string(C::compression::name())},
                   {"cpet.architecture", architecture_name<C>()},
                   {"cpet.layers", std::to_string(layers.size())}});
}

template <nn::LayerConfig C>
nn::Linear<typename C::compression::format> decode_linear(tensor_source& src, const std::string& name, index_t out,
                                                          index_t in, bool has_bias) {
    using P = typename C::compression;
    using F = typename P::format;
    const std::string expect = policy_weight_format<P>(in);
    F w = decode_weight<F>(src, name, out, in, expect);
    std::vector<float> bias;
    if (has_bias) bias = src.f32(name + ".bias", {out});
    return nn::Linear<F>(std::move(w), bias, "backbone linear");
}

template <nn::LayerConfig C>
nn::Norm<C::norm> decode_norm(tensor_source& src, const std::string& name, const nn::layer_shape& s) {
    const auto g = src.f32(name + ".gamma", {s.d_model});
    std::vector<float> b;
    if constexpr (C::norm == nn::norm_kind::layernorm) b = src.f32(name + ".beta", {s.d_model});
    return nn::Norm<C::norm>(g, b, s.eps);
}

}  // namespace detail

/// Writes `layers` (one kept_maps per layer, or none: nothing pruned) atomically; io_error when the maps do not
/// fit their layers.
template <nn::LayerConfig C>
void save_backbone(const std::filesystem::path& path, const std::vector<nn::TransformerLayer<C>>& layers,
                   const std::vector<kept_maps>& kept = {}) {
    std::vector<const nn::TransformerLayer<C>*> ls;
    for (const auto& l : layers) ls.push_back(&l);
    detail::save_layers<C>(path, ls, kept);
}
/// A stack's layers (an nn::Model<C>'s: save_backbone(path, model.stack())).
template <nn::LayerConfig C>
void save_backbone(const std::filesystem::path& path, const nn::Stack<C>& stack, const std::vector<kept_maps>& kept = {}) {
    std::vector<const nn::TransformerLayer<C>*> ls;
    for (std::size_t i = 0; i < stack.size(); ++i) ls.push_back(&stack.layer(i));
    detail::save_layers<C>(path, ls, kept);
}
/// Layers as nn::compress returned them, with their kept maps into the dense layers of shape `dense`.
template <nn::LayerConfig C>
void save_backbone(const std::filesystem::path& path, const std::vector<nn::compressed_layer<C>>& layers,
                   const nn::layer_shape& dense) {
    std::vector<const nn::TransformerLayer<C>*> ls;
    std::vector<kept_maps> kept;
    for (const auto& c : layers) {
        ls.push_back(&c.layer);
        kept.push_back(kept_maps::of(c, dense));
    }
    detail::save_layers<C>(path, ls, kept);
}

/// Reads a backbone written by save_backbone as layers of config C (`layers` ≥ 0: the count it must hold).
/// See the file comment for what is refused.
template <nn::LayerConfig C>
std::vector<backbone_layer<C>> load_backbone(const std::filesystem::path& path, index_t layers = -1) {
    const auto f = safetensors_file::open(path);
    const std::string& fn = f.file_name();
    detail::check_cpet_header(f, "backbone");
    const auto& md = f.metadata();
    auto meta = [&](const std::string& key) { return md.count(key) ? md.at(key) : std::string("(none)"); };
    const std::string policy(C::compression::name());
    require<io_error>(meta("cpet.policy") == policy, fn, ": holds a backbone compressed with '", meta("cpet.policy"),
                      "', loaded as one compressed with '", policy, "'");
    const std::string arch = detail::architecture_name<C>();
    require<io_error>(meta("cpet.architecture") == arch, fn, ": holds layers of architecture '",
                      meta("cpet.architecture"), "', loaded as '", arch, "'");
    const auto n = detail::parse_count(meta("cpet.layers"));
    require<io_error>(n.has_value(), fn, ": cpet.layers is '", meta("cpet.layers"), "', expected a layer count");
    require<io_error>(layers < 0 || *n == layers, fn, ": the backbone has ", *n, " layers, expected ", layers);
    // every layer names tensors, so a count beyond the file's tensors is a lie caught before any allocation
    require<io_error>(std::size_t(*n) <= f.size(), fn, ": cpet.layers is ", *n, " but the file holds only ", f.size(),
                      " tensors");

    detail::tensor_source src(f);
    std::vector<backbone_layer<C>> out;
    out.reserve(std::size_t(*n));
    for (index_t i = 0; i < *n; ++i) {
        const std::string li = std::to_string(i), pre = "layers." + li + ".";
        const std::string skey = "cpet.layer." + li + ".shape", dkey = "cpet.layer." + li + ".dense";
        require<io_error>(md.count(skey), fn, ": layer ", i, ": no ", skey, " metadata");
        const nn::layer_shape s = detail::parse_shape(fn, skey, md.at(skey));
        require<io_error>(md.count(dkey), fn, ": layer ", i, ": no ", dkey, " metadata");
        const auto de = detail::parse_entry(md.at(dkey), {"n_heads", "n_kv_heads", "d_ff"});
        std::optional<index_t> dn[3];
        if (de)
            for (int j = 0; j < 3; ++j) dn[j] = detail::parse_count((*de)[std::size_t(j)]);
        require<io_error>(de && dn[0] && dn[1] && dn[2], fn, ": ", dkey, " is '", md.at(dkey),
                          "', expected 'n_heads=<n> n_kv_heads=<n> d_ff=<n>'");
        kept_maps m;
        m.dense_heads = *dn[0], m.dense_kv_heads = *dn[1], m.dense_d_ff = *dn[2];
        m.heads = detail::decode_indices(src, pre + "kept_heads");
        m.kv_heads = detail::decode_indices(src, pre + "kept_kv_heads");
        m.neurons = detail::decode_indices(src, pre + "kept_neurons");
        detail::check_kept(m, s, cpet::detail::concat(fn, ": layer ", i, ": "), pre);

        const std::string bkey = "cpet.layer." + li + ".biases";
        const auto biases = detail::parse_biases(meta(bkey));
        require<io_error>(biases.has_value(), fn, ": ", bkey, " is '", meta(bkey),
                          "', expected 'none' or some of 'q k v o up gate down' in that order");
        const auto& hb = *biases;
        if constexpr (C::bias)
            for (int j : {0, 1, 2, 3, 4, 6})
                require<io_error>(hb[std::size_t(j)], fn, ": layer ", i, ": ", bkey, " lists no bias for ",
                                  detail::linear_names[j], ", but the layer configuration has biases");

        const index_t d = s.d_model;
        nn::layer_parts<C> p;
        p.q = detail::decode_linear<C>(src, pre + "q", s.q_dim(), d, hb[0]);
        p.k = detail::decode_linear<C>(src, pre + "k", s.kv_dim(), d, hb[1]);
        p.v = detail::decode_linear<C>(src, pre + "v", s.kv_dim(), d, hb[2]);
        p.o = detail::decode_linear<C>(src, pre + "o", d, s.q_dim(), hb[3]);
        p.up = detail::decode_linear<C>(src, pre + "up", s.d_ff, d, hb[4]);
        if constexpr (C::ffn == nn::ffn_kind::swiglu)
            p.gate = detail::decode_linear<C>(src, pre + "gate", s.d_ff, d, hb[5]);
        else
            require<io_error>(!hb[5], fn, ": layer ", i, ": ", bkey, " lists a gate bias, but the FFN has no gate");
        p.down = detail::decode_linear<C>(src, pre + "down", d, s.d_ff, hb[6]);
        p.norm1 = detail::decode_norm<C>(src, pre + "norm1", s);
        p.norm2 = detail::decode_norm<C>(src, pre + "norm2", s);
        try {
            out.push_back({nn::TransformerLayer<C>(std::move(p), s), std::move(m)});
        } catch (const io_error&) {
            throw;
        } catch (const cpet::error& e) {
            throw io_error(cpet::detail::concat(fn, ": layer ", i, ": ", e.what()));
        }
    }
    if (const auto* t = src.unused())
        throw io_error(cpet::detail::concat(fn, ": tensor '", t->name(), "' is not part of a backbone of ", *n,
                                            " layers of architecture '", arch, "'"));
    return out;
}

/// The layers of a backbone file as an nn::Stack<C> (an nn::Model<C> takes it); io_error as load_backbone, and
/// when the layers cannot form one stack (d_model or KV width differ).
template <nn::LayerConfig C>
nn::Stack<C> load_stack(const std::filesystem::path& path, index_t layers = -1) {
    auto ls = load_backbone<C>(path, layers);
    std::vector<nn::TransformerLayer<C>> v;
    v.reserve(ls.size());
    for (auto& l : ls) v.push_back(std::move(l.layer));
    try {
        return nn::Stack<C>(std::move(v));
    } catch (const cpet::error& e) {
        throw io_error(cpet::detail::concat(path.string(), ": ", e.what()));
    }
}

}  // namespace cpet::io
