// cpet/io/cpet_format.hpp — cpet's own files: safetensors with cpet metadata, for task module sets (every PET
// method) and for packed weight formats (dense, every quantized variant, N:M with fp32 or int8 values,
// unstructured), read back bit-exact. Whole compressed backbones (layers of any policy, pruned ones with their
// kept-index maps) use the same weight layout: io/backbone_file.hpp.
//
// Layout (version 1). Metadata (the safetensors "__metadata__" map):
//   cpet.format   "task" | "weights" | "backbone"   what the file holds (another kind is refused naming both)
//   cpet.version  "1"                           layout version; another version is refused naming both
//   task files:    cpet.method  the PET policy's name (lora, rslora, recovery, recovery_linear, adapter,
//                               parallel_adapter, scaled_parallel_adapter, ia3, bitfit, prefix_tuning, p_tuning_v2,
//                               prompt_tuning); cpet.activation for adapters; cpet.layers  N
//   weight files:  cpet.weight.<name>  the weight's stored format: dense_f32, nm_sparse:N:M:f32, nm_sparse:N:M:int8,
//                                      unstructured:K:f32 (K its in_features: no tensor carries it),
//                                      quantized:<bits>:<granularity>:<sym>:<act>, or indices
// Tensors, all little-endian, names ASCII:
//   task   layers.<i>.<field>   one per non-empty field of layer i's modules, e.g. layers.0.q.lora_A [r, in] F32,
//                               layers.0.q.lora_B [out, r], layers.0.alpha [] F32 (scalars are 0-d tensors, so they
//                               round-trip bit for bit), layers.3.attention.down, layers.1.k.ia3_l, layers.0.prefix_k
//   weights <name>.dense [out, in] F32                          dense_f32 (repacked on load: packing is deterministic)
//           <name>.nm_index [out, slots] U8 (in-group index of kept slot t = g·N + j, ascending in a group) with
//           <name>.nm_values [out, slots] F32                   N:M with fp32 values, or
//           <name>.nm_codes [out, slots] I8 ∈ [−127, 127] and <name>.nm_scales [out] F32 (value = scale·code)
//                                                               N:M with int8 values (no re-quantisation on load)
//           <name>.sp_counts [out] I32 (kept entries per row), <name>.sp_cols [nnz] U16 (ascending within a row),
//           <name>.sp_values [nnz] F32                          unstructured (SELL-16 repacked from the rows)
//           <name> [n] I64                                       indices (kept heads / neurons of a pruned layer)
//           <name>.codes [out, in] I8, <name>.scales [out, groups] F32, <name>.zeros [out, groups] F32 (asymmetric
//           only), <name>.act_scale [in] F32 (SmoothQuant only)  quantized_format<…> (repacked through from_codes)
// Every format is rebuilt from what it stores into the same packed bytes (the tests compare them), so products
// are bit for bit the same. Reading checks every field against the layer it is for (the modules' own check_fits)
// and refuses tensors it does not know: a file is either read completely or not at all.
#pragma once

#include <array>
#include <cstdio>
#include <cstring>
#include <deque>
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpet/compress/dense.hpp"
#include "cpet/compress/prune.hpp"
#include "cpet/compress/quantized.hpp"
#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/io/safetensors.hpp"
#include "cpet/pet/adapter.hpp"
#include "cpet/pet/bitfit.hpp"
#include "cpet/pet/ia3.hpp"
#include "cpet/pet/lora.hpp"
#include "cpet/pet/policy.hpp"
#include "cpet/pet/prefix.hpp"
#include "cpet/pet/prompt.hpp"
#include "cpet/pet/recovery.hpp"

namespace cpet::io {

inline constexpr const char* cpet_format_version = "1";

namespace detail {

template <class T>
struct is_lora_policy : std::false_type {};
template <pet::lora_scaling S>
struct is_lora_policy<pet::lora_policy<S>> : std::true_type {};
template <class T>
struct is_recovery_policy : std::false_type {};
template <pet::recovery_form F>
struct is_recovery_policy<pet::recovery_policy<F>> : std::true_type {};
template <class T>
struct is_adapter_policy : std::false_type {};
template <pet::adapter_form F, kernels::activation A>
struct is_adapter_policy<pet::adapter_policy<F, A>> : std::true_type {};
template <class T>
struct is_prefix_policy : std::false_type {};
template <pet::prefix_kind K>
struct is_prefix_policy<pet::prefix_policy<K>> : std::true_type {};

/// Calls f(name, field) for every stored field of one layer's modules of Policy (M: the modules type, const or
/// not): field is a Matrix<float>&, a std::vector<float>& or a float& (const when M is).
template <class Policy, class M, class F>
void task_fields(M& m, F&& f) {
    auto per_target = [&](auto& A, auto& B, const char* an, const char* bn) {
        for (int i = 0; i < pet::target_count; ++i) {
            const std::string t(pet::target_name(pet::target(i)));
            f(t + "." + an, A[std::size_t(i)]);
            f(t + "." + bn, B[std::size_t(i)]);
        }
    };
    if constexpr (is_lora_policy<Policy>::value) {
        per_target(m.f.A, m.f.B, "lora_A", "lora_B");
        f(std::string("alpha"), m.alpha);
    } else if constexpr (is_recovery_policy<Policy>::value) {
        per_target(m.f.A, m.f.B, "A", "B");
        f(std::string("s"), m.s);
    } else if constexpr (is_adapter_policy<Policy>::value) {
        for (int w = 0; w < 2; ++w) {
            const std::string s = w == 0 ? "attention" : "ffn";
            f(s + ".down", m.down[std::size_t(w)]);
            f(s + ".up", m.up[std::size_t(w)]);
            f(s + ".b_down", m.b_down[std::size_t(w)]);
            f(s + ".b_up", m.b_up[std::size_t(w)]);
        }
        f(std::string("s"), m.s);
    } else if constexpr (std::is_same_v<Policy, pet::ia3>) {
        for (int i = 0; i < pet::target_count; ++i)
            f(std::string(pet::target_name(pet::target(i))) + ".ia3_l", m.l[std::size_t(i)]);
    } else if constexpr (std::is_same_v<Policy, pet::bitfit>) {
        for (int i = 0; i < pet::target_count; ++i)
            f(std::string(pet::target_name(pet::target(i))) + ".bias_delta", m.delta[std::size_t(i)]);
        for (int i = 0; i < pet::norm_site_count; ++i)
            f(std::string(pet::norm_site_name(pet::norm_site(i))) + ".beta_delta", m.norm_delta[std::size_t(i)]);
    } else if constexpr (is_prefix_policy<Policy>::value) {
        f(std::string("prefix_k"), m.k);
        f(std::string("prefix_v"), m.v);
    } else if constexpr (std::is_same_v<Policy, pet::prompt_tuning>) {
        f(std::string("virtual_tokens"), m.tokens);
    } else {
        static_assert(sizeof(Policy) == 0, "cpet::io task files: no field list for this PET policy");
    }
}

/// Sets the layer dimensions the modules carry (LoRA / recovery factors, IA3, BitFit keep them).
template <class M>
void set_dims(M& m, const pet::layer_dims& d) {
    if constexpr (requires { m.f.dims; }) m.f.dims = d;
    if constexpr (requires { m.dims; }) m.dims = d;
}

inline tensor_data f32_tensor(std::string name, std::vector<std::uint64_t> shape, const float* p, std::size_t n) {
    return {std::move(name), dtype::F32, std::move(shape), std::as_bytes(std::span<const float>(p, n))};
}

inline void check_cpet_header(const safetensors_file& f, const char* kind) {
    const auto& md = f.metadata();
    auto it = md.find("cpet.format");
    require<io_error>(it != md.end(), f.file_name(), ": not a cpet file (no cpet.format metadata; a PEFT adapter or a "
                      "HF checkpoint is read by io/peft.hpp or io/hf_checkpoint.hpp)");
    require<io_error>(it->second == kind, f.file_name(), ": holds cpet ", it->second, " data, expected ", kind);
    auto v = md.find("cpet.version");
    require<io_error>(v != md.end() && v->second == cpet_format_version, f.file_name(), ": written in cpet file format "
                      "version ", v == md.end() ? std::string("(none)") : v->second, ", this cpet reads version ",
                      cpet_format_version);
}

}  // namespace detail

/// The method name a task file records for Policy (adapters with their activation).
template <class Policy>
std::string task_method_name() {
    std::string n(Policy::name());
    if constexpr (detail::is_adapter_policy<Policy>::value) n += std::string(":") + kernels::activation_name(Policy::act);
    return n;
}

/// Writes one task (Policy's modules, one per layer) atomically.
template <class Policy>
void save_task(const std::filesystem::path& path, const std::vector<typename Policy::modules>& layers) {
    std::vector<tensor_data> ts;
    std::vector<float> scalars;  // stable storage for the 0-d tensors
    scalars.reserve(layers.size() * 4);
    for (std::size_t i = 0; i < layers.size(); ++i) {
        const auto& m = layers[i];
        const std::string pre = "layers." + std::to_string(i) + ".";
        detail::task_fields<Policy>(m, [&](const std::string& name, auto& field) {
            using T = std::decay_t<decltype(field)>;
            if constexpr (std::is_same_v<T, Matrix<float>>) {
                if (!field.empty())
                    ts.push_back(detail::f32_tensor(pre + name, {std::uint64_t(field.rows()), std::uint64_t(field.cols())},
                                                    field.data(), std::size_t(field.size())));
            } else if constexpr (std::is_same_v<T, std::vector<float>>) {
                if (!field.empty()) ts.push_back(detail::f32_tensor(pre + name, {field.size()}, field.data(), field.size()));
            } else {
                scalars.push_back(field);
                ts.push_back(detail::f32_tensor(pre + name, {}, &scalars.back(), 1));
            }
        });
    }
    save_safetensors(path, ts,
                     {{"cpet.format", "task"},
                      {"cpet.version", cpet_format_version},
                      {"cpet.method", task_method_name<Policy>()},
                      {"cpet.layers", std::to_string(layers.size())}});
}

/// Reads a task written by save_task<Policy> for layers of dimensions `dims`; io_error when the file is not a
/// cpet task, another version, another method, another layer count (when `layers` ≥ 0), holds an unknown tensor,
/// or a field does not fit the layer.
template <class Policy>
std::vector<typename Policy::modules> load_task(const std::filesystem::path& path, const pet::layer_dims& dims,
                                                index_t layers = -1) {
    const auto f = safetensors_file::open(path);
    const std::string& fn = f.file_name();
    detail::check_cpet_header(f, "task");
    const auto& md = f.metadata();
    const auto method = md.count("cpet.method") ? md.at("cpet.method") : std::string("(none)");
    require<io_error>(method == task_method_name<Policy>(), fn, ": holds a '", method, "' task, expected '",
                      task_method_name<Policy>(), "'");
    const std::string ls = md.count("cpet.layers") ? md.at("cpet.layers") : "";
    require<io_error>(!ls.empty() && ls.size() <= 6 && ls.find_first_not_of("0123456789") == std::string::npos, fn,
                      ": cpet.layers is '", ls, "', expected a layer count");
    const auto n = std::size_t(std::stoul(ls));
    require<io_error>(layers < 0 || n == std::size_t(layers), fn, ": the task has ", n, " layers, the model ", layers);
    std::vector<typename Policy::modules> out(n);
    std::set<std::string> used;
    for (std::size_t i = 0; i < n; ++i) {
        auto& m = out[i];
        detail::set_dims(m, dims);
        const std::string pre = "layers." + std::to_string(i) + ".";
        detail::task_fields<Policy>(m, [&](const std::string& name, auto& field) {
            using T = std::decay_t<decltype(field)>;
            const auto* t = f.find(pre + name);
            if (!t) return;
            used.insert(t->name());
            require<io_error>(t->type() == dtype::F32, fn, ": tensor '", t->name(), "' has dtype ", dtype_name(t->type()),
                              ", expected F32");
            if constexpr (std::is_same_v<T, Matrix<float>>) {
                require<io_error>(t->rank() == 2, fn, ": tensor '", t->name(), "' has shape ", t->shape_str(),
                                  ", expected a matrix");
                field = Matrix<float>(index_t(t->shape()[0]), index_t(t->shape()[1]));
                t->to_f32(field.data());
            } else if constexpr (std::is_same_v<T, std::vector<float>>) {
                require<io_error>(t->rank() == 1, fn, ": tensor '", t->name(), "' has shape ", t->shape_str(),
                                  ", expected a vector");
                field = t->to_f32();
            } else {
                require<io_error>(t->rank() == 0, fn, ": tensor '", t->name(), "' has shape ", t->shape_str(),
                                  ", expected a scalar []");
                t->to_f32(&field);
            }
        });
        if constexpr (requires { m.check_fits(dims, "x"); }) {
            try {
                m.check_fits(dims, "load_task");
            } catch (const cpet::error& e) {
                throw io_error(cpet::detail::concat(fn, ": layer ", i, ": ", e.what()));
            }
        }
    }
    for (const auto& t : f.tensors())
        require<io_error>(used.count(t.name()), fn, ": tensor '", t.name(), "' is not a field of a ",
                          task_method_name<Policy>(), " task of ", n, " layers");
    return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Packed weight formats

namespace detail {

template <class F>
struct is_quantized_format : std::false_type {};
template <class B, class G, class S, class A>
struct is_quantized_format<compress::quantized_format<B, G, S, A>> : std::true_type {};

template <class Format>
inline constexpr bool is_nm_format = std::is_same_v<Format, compress::sparse_format<compress::nm_sparse_weights>>;
template <class Format>
inline constexpr bool is_unstructured_format =
    std::is_same_v<Format, compress::sparse_format<compress::unstructured_sparse_weights>>;

/// The name a file records for Format; for N:M and unstructured weights only the prefix ("nm_sparse",
/// "unstructured"): the rest of their name (the pattern, K) comes from the weight itself (stored_format_name).
template <class Format>
std::string format_name() {
    if constexpr (std::is_same_v<Format, compress::dense_f32>) {
        return "dense_f32";
    } else if constexpr (is_nm_format<Format>) {
        return "nm_sparse";
    } else if constexpr (is_unstructured_format<Format>) {
        return "unstructured";
    } else if constexpr (is_quantized_format<Format>::value) {
        using B = typename Format::bits_type;
        using G = typename Format::granularity_type;
        using S = typename Format::symmetry_type;
        using A = typename Format::activations_type;
        return cpet::detail::concat("quantized:", B::name(), ":", G::name(), ":", S::name(), ":", A::name());
    } else {
        static_assert(sizeof(Format) == 0, "cpet::io weight files: no layout for this weight format");
    }
}

/// The full name recorded for weight w: format_name, with N:M's "N:M:f32|int8" and unstructured's "K:f32".
template <class Format>
std::string stored_format_name(const Format& w) {
    if constexpr (is_nm_format<Format>) {
        const auto& p = w.packed();
        return cpet::detail::concat("nm_sparse:", p.n_keep(), ":", p.m_group(), ":",
                                    p.value_type() == compress::sparse_values::int8 ? "int8" : "f32");
    } else if constexpr (is_unstructured_format<Format>) {
        return cpet::detail::concat("unstructured:", w.in_features(), ":f32");
    } else {
        return format_name<Format>();
    }
}

/// Tensors being written and the bytes they borrow (kept here until the file is saved), plus the metadata.
class tensor_store {
public:
    void add(std::string name, dtype t, std::vector<std::uint64_t> shape, std::vector<std::byte> bytes) {
        require<io_error>(names_.insert(name).second, "cpet file writer: tensor '", name, "' added twice");
        const auto& b = bytes_.emplace_back(std::move(bytes));
        tensors_.push_back({std::move(name), t, std::move(shape), b});
    }
    template <class T>
    void add(std::string name, std::vector<std::uint64_t> shape, const T* p, std::size_t n) {
        std::vector<std::byte> b(n * sizeof(T));
        if (n) std::memcpy(b.data(), p, b.size());
        add(std::move(name), dtype_of<T>, std::move(shape), std::move(b));
    }
    std::map<std::string, std::string>& metadata() noexcept { return meta_; }
    /// Writes the file atomically with the metadata and `header` (cpet.format, cpet.version, ...) added.
    void save(const std::filesystem::path& path, const std::map<std::string, std::string>& header) const {
        auto md = meta_;
        for (const auto& [k, v] : header) md[k] = v;
        save_safetensors(path, tensors_, md);
    }

private:
    std::vector<tensor_data> tensors_;
    std::map<std::string, std::string> meta_;
    std::set<std::string> names_;
    std::deque<std::vector<std::byte>> bytes_;  // a deque: adding never moves what earlier tensors borrow
};

/// Writes weight w as the tensors of its layout under `name` (see the file comment) and records its format in
/// the metadata ("cpet.weight.<name>").
template <class Format>
void encode_weight(tensor_store& st, const std::string& name, const Format& w) {
    st.metadata()["cpet.weight." + name] = stored_format_name(w);
    const auto n = std::uint64_t(w.out_features()), k = std::uint64_t(w.in_features());
    if constexpr (std::is_same_v<Format, compress::dense_f32>) {
        const Matrix<float> d = w.to_dense();
        st.add(name + ".dense", {n, k}, d.data(), std::size_t(d.size()));
    } else if constexpr (is_nm_format<Format>) {
        const auto& p = w.packed();
        const index_t slots = p.slots();
        const std::size_t cells = std::size_t(index_t(n) * slots);
        std::vector<std::uint8_t> idx(cells);
        const bool int8 = p.value_type() == compress::sparse_values::int8;
        std::vector<float> vals(int8 ? 0 : cells);
        std::vector<std::int8_t> codes(int8 ? cells : 0);
        for (index_t r = 0; r < index_t(n); ++r)
            for (index_t t = 0; t < slots; ++t) {
                const std::size_t at = std::size_t(r * slots + t);
                idx[at] = std::uint8_t(p.kept_index(r, t));
                if (int8) codes[at] = p.kept_code(r, t);
                else vals[at] = p.kept_value(r, t);
            }
        st.add(name + ".nm_index", {n, std::uint64_t(slots)}, idx.data(), cells);
        if (int8) {
            st.add(name + ".nm_codes", {n, std::uint64_t(slots)}, codes.data(), cells);
            st.add(name + ".nm_scales", {n}, p.scales(), std::size_t(n));
        } else {
            st.add(name + ".nm_values", {n, std::uint64_t(slots)}, vals.data(), cells);
        }
    } else if constexpr (is_unstructured_format<Format>) {
        const auto& p = w.packed();
        std::vector<std::int32_t> counts(n);
        std::vector<std::uint16_t> cols;
        std::vector<float> vals;
        cols.reserve(std::size_t(p.nnz()));
        vals.reserve(std::size_t(p.nnz()));
        for (index_t r = 0; r < index_t(n); ++r) {
            counts[std::size_t(r)] = std::int32_t(p.row_nnz(r));
            for (index_t j = 0; j < p.row_nnz(r); ++j) {
                cols.push_back(p.entry_col(r, j));
                vals.push_back(p.entry_value(r, j));
            }
        }
        st.add(name + ".sp_counts", {n}, counts.data(), counts.size());
        st.add(name + ".sp_cols", {cols.size()}, cols.data(), cols.size());
        st.add(name + ".sp_values", {vals.size()}, vals.data(), vals.size());
    } else {
        const auto& q = w.weights();
        std::vector<std::int8_t> codes(std::size_t(n * k));
        for (index_t r = 0; r < q.rows(); ++r)
            for (index_t c = 0; c < q.cols(); ++c) codes[std::size_t(r * q.cols() + c)] = std::int8_t(q.code(r, c));
        st.add(name + ".codes", {n, k}, codes.data(), codes.size());
        const index_t groups = Format::granularity_type::gran == compress::granularity::per_group ? q.groups() : 1;
        std::vector<float> sc(std::size_t(index_t(n) * groups)), z(sc.size());
        for (index_t r = 0; r < index_t(n); ++r)
            for (index_t g = 0; g < groups; ++g) {
                sc[std::size_t(r * groups + g)] = q.scale(r, g * q.group());
                z[std::size_t(r * groups + g)] = q.has_zeros() ? q.zero(r, g * q.group()) : 0.f;
            }
        st.add(name + ".scales", {n, std::uint64_t(groups)}, sc.data(), sc.size());
        if (!q.symmetric()) st.add(name + ".zeros", {n, std::uint64_t(groups)}, z.data(), z.size());
        if (const float* a = w.act_scale(); a && Format::smoothed) st.add(name + ".act_scale", {k}, a, std::size_t(k));
    }
}

/// A tensor's elements copied out (the mapping need not be aligned for T: hand-made files may not be).
template <class T>
std::vector<T> copy_elements(const tensor_view& t) {
    std::vector<T> v(t.bytes().size() / sizeof(T));
    if (!v.empty()) std::memcpy(v.data(), t.bytes().data(), v.size() * sizeof(T));
    return v;
}

/// Reads tensors of one file by the rules of its layout: every lookup names the file and the tensor, and the
/// names it handed out are recorded so a reader can refuse the tensors nobody asked for.
class tensor_source {
public:
    explicit tensor_source(const safetensors_file& f) : f_(f) {}
    const std::string& file_name() const noexcept { return f_.file_name(); }
    const safetensors_file& file() const noexcept { return f_; }
    bool has(const std::string& name) const { return f_.find(name) != nullptr; }

    /// Tensor `name` of dtype t and rank shape.size(); a negative extent in `shape` accepts any.
    const tensor_view& get(const std::string& name, dtype t, std::vector<std::int64_t> shape) {
        const tensor_view* v = f_.find(name);
        require<io_error>(v != nullptr, file_name(), ": tensor '", name, "' is missing");
        bool ok = v->type() == t && v->rank() == shape.size();
        for (std::size_t i = 0; ok && i < shape.size(); ++i)
            ok = shape[i] < 0 || v->shape()[i] == std::uint64_t(shape[i]);
        if (!ok) {
            std::string want = "[";
            for (std::size_t i = 0; i < shape.size(); ++i)
                want += (i ? ", " : "") + (shape[i] < 0 ? std::string("*") : std::to_string(shape[i]));
            throw io_error(cpet::detail::concat(file_name(), ": tensor '", name, "' is ", dtype_name(v->type()), " ",
                                                v->shape_str(), ", expected ", dtype_name(t), " ", want, "]"));
        }
        used_.insert(name);
        return *v;
    }
    std::vector<float> f32(const std::string& name, std::vector<std::int64_t> shape) {
        return copy_elements<float>(get(name, dtype::F32, std::move(shape)));
    }
    /// The first tensor not handed out, or null.
    const tensor_view* unused() const {
        for (const auto& t : f_.tensors())
            if (!used_.count(t.name())) return &t;
        return nullptr;
    }

private:
    const safetensors_file& f_;
    std::set<std::string> used_;
};

/// Parses the decimal integers of "<prefix>a:b:..." (each 1..9 digits); nullopt when `s` is not of that form.
inline std::optional<std::vector<index_t>> parse_fields(const std::string& s, const std::string& prefix,
                                                        std::size_t count, const std::string& tail) {
    if (s.rfind(prefix, 0) != 0 || s.size() < prefix.size() + tail.size() ||
        s.compare(s.size() - tail.size(), tail.size(), tail) != 0)
        return std::nullopt;
    const std::string mid = s.substr(prefix.size(), s.size() - prefix.size() - tail.size());
    std::vector<index_t> out;
    std::size_t at = 0;
    while (out.size() < count) {
        const std::size_t end = std::min(mid.find(':', at), mid.size());
        const std::string d = mid.substr(at, end - at);
        if (d.empty() || d.size() > 9 || d.find_first_not_of("0123456789") != std::string::npos) return std::nullopt;
        out.push_back(index_t(std::stol(d)));
        at = end + 1;
        if (end == mid.size()) break;
    }
    if (out.size() != count || at != mid.size() + 1) return std::nullopt;
    return out;
}

/// Reads weight `name` as Format, [n, k] when n, k ≥ 0 (else as stored). `expect`: the full stored name the
/// caller requires (empty: any of Format's). io_error naming file, weight, tensor and rule; nothing half-built.
template <class Format>
Format decode_weight(tensor_source& src, const std::string& name, index_t n, index_t k, const std::string& expect = {}) {
    const std::string& fn = src.file_name();
    const auto& md = src.file().metadata();
    auto it = md.find("cpet.weight." + name);
    require<io_error>(it != md.end(), fn, ": no weight '", name, "' (no cpet.weight.", name, " metadata)");
    const std::string& stored = it->second;
    const std::string prefix = format_name<Format>();
    const bool kind_ok = expect.empty() ? (is_nm_format<Format> || is_unstructured_format<Format>
                                               ? stored.rfind(prefix + ":", 0) == 0
                                               : stored == prefix)
                                        : stored == expect;
    require<io_error>(kind_ok, fn, ": weight '", name, "' is stored as ", stored, ", expected ",
                      expect.empty() ? prefix : expect);
    auto wrap = [&](auto&& build) -> Format {
        try {
            return build();
        } catch (const io_error&) {
            throw;
        } catch (const cpet::error& e) {
            throw io_error(cpet::detail::concat(fn, ": weight '", name, "': ", e.what()));
        }
    };
    if constexpr (std::is_same_v<Format, compress::dense_f32>) {
        const auto& t = src.get(name + ".dense", dtype::F32, {n, k});
        const index_t rows = index_t(t.shape()[0]), cols = index_t(t.shape()[1]);
        require<io_error>(rows > 0 && cols > 0, fn, ": tensor '", t.name(), "' has an empty shape ", t.shape_str());
        Matrix<float> d(rows, cols);
        t.to_f32(d.data());
        return wrap([&] { return Format(d.view()); });
    } else if constexpr (is_nm_format<Format>) {
        const bool int8 = stored.size() > 5 && stored.compare(stored.size() - 5, 5, ":int8") == 0;
        const auto nm = parse_fields(stored, "nm_sparse:", 2, int8 ? ":int8" : ":f32");
        require<io_error>(nm.has_value(), fn, ": weight '", name, "': format '", stored,
                          "' is not nm_sparse:N:M:f32 or nm_sparse:N:M:int8");
        const int N = int((*nm)[0]), M = int((*nm)[1]);
        require<io_error>((M == 2 || M == 4 || M == 8 || M == 16) && N >= 1 && N <= M, fn, ": weight '", name,
                          "': N:M pattern ", N, ":", M, " is not supported (M of 2, 4, 8 or 16, 1 <= N <= M)");
        const index_t slots = k >= 0 ? k / M * N : -1;
        require<io_error>(k < 0 || k % M == 0, fn, ": weight '", name, "': ", k, " inputs are not a multiple of M = ", M);
        const auto& ix = src.get(name + ".nm_index", dtype::U8, {n, slots});
        const index_t rows = index_t(ix.shape()[0]), sl = index_t(ix.shape()[1]);
        require<io_error>(rows > 0 && sl > 0 && sl % N == 0, fn, ": tensor '", ix.name(), "' has ", sl,
                          " kept slots per row, not a positive multiple of N = ", N);
        const auto idx = copy_elements<std::uint8_t>(ix);
        const index_t cols = sl / N * M;
        if (int8) {
            const auto codes = copy_elements<std::int8_t>(src.get(name + ".nm_codes", dtype::I8, {rows, sl}));
            const auto scales = src.f32(name + ".nm_scales", {rows});
            return wrap([&] {
                return Format(compress::nm_sparse_weights::from_kept(rows, cols, N, M, idx.data(), nullptr,
                                                                     codes.data(), scales.data()));
            });
        }
        const auto vals = src.f32(name + ".nm_values", {rows, sl});
        return wrap([&] { return Format(compress::nm_sparse_weights::from_kept(rows, cols, N, M, idx.data(), vals.data())); });
    } else if constexpr (is_unstructured_format<Format>) {
        const auto kk = parse_fields(stored, "unstructured:", 1, ":f32");
        require<io_error>(kk.has_value() && (*kk)[0] > 0 && (k < 0 || (*kk)[0] == k), fn, ": weight '", name,
                          "': format '", stored, "' is not unstructured:K:f32",
                          k >= 0 ? cpet::detail::concat(" with K = ", k) : std::string());
        const index_t cols = (*kk)[0];
        const auto counts32 = copy_elements<std::int32_t>(src.get(name + ".sp_counts", dtype::I32, {n}));
        const index_t rows = index_t(counts32.size());
        require<io_error>(rows > 0, fn, ": tensor '", name, ".sp_counts' is empty");
        std::vector<index_t> counts(counts32.begin(), counts32.end());
        std::uint64_t total = 0;
        for (index_t r = 0; r < rows; ++r) {
            require<io_error>(counts[std::size_t(r)] >= 0 && counts[std::size_t(r)] <= cols, fn, ": tensor '", name,
                              ".sp_counts': row ", r, " has ", counts[std::size_t(r)], " entries, expected 0..", cols);
            total += std::uint64_t(counts[std::size_t(r)]);
        }
        const auto sc = copy_elements<std::uint16_t>(src.get(name + ".sp_cols", dtype::U16, {std::int64_t(total)}));
        const auto vals = src.f32(name + ".sp_values", {std::int64_t(total)});
        return wrap([&] {
            return Format(compress::unstructured_sparse_weights::from_rows(rows, cols, counts.data(), sc.data(), vals.data()));
        });
    } else {
        using G = typename Format::granularity_type;
        const auto& c = src.get(name + ".codes", dtype::I8, {n, k});
        const index_t rows = index_t(c.shape()[0]), cols = index_t(c.shape()[1]);
        require<io_error>(rows > 0 && cols > 0, fn, ": weight '", name, "' has an empty shape");
        index_t group = 0, groups = 1;
        if constexpr (G::gran == compress::granularity::per_group) {
            group = G::group;
            require<io_error>(cols % group == 0, fn, ": weight '", name, "': ", cols,
                              " inputs are not a multiple of the group ", group);
            groups = cols / group;
        }
        const auto sv = src.f32(name + ".scales", {rows, groups});
        const auto codes = copy_elements<std::int8_t>(c);
        const std::vector<std::int32_t> q(codes.begin(), codes.end());
        constexpr bool sym = Format::symmetry_type::value;
        std::vector<float> zv;
        if constexpr (!sym) zv = src.f32(name + ".zeros", {rows, groups});
        std::vector<float> act;
        if constexpr (Format::smoothed) act = src.f32(name + ".act_scale", {cols});
        return wrap([&] {
            auto qw = compress::quantized_weights::from_codes(Format::bits_type::bits, G::gran, group, sym, rows, cols,
                                                              q.data(), sv.data(), sym ? nullptr : zv.data());
            return Format(std::move(qw), act);
        });
    }
}

inline void encode_indices(tensor_store& st, const std::string& name, std::span<const index_t> idx) {
    std::vector<std::int64_t> v(idx.begin(), idx.end());
    st.add(name, {idx.size()}, v.data(), v.size());
}
inline std::vector<index_t> decode_indices(tensor_source& src, const std::string& name, index_t n = -1) {
    const auto v = copy_elements<std::int64_t>(src.get(name, dtype::I64, {n}));
    return {v.begin(), v.end()};
}

}  // namespace detail

/// A set of named packed weights being written (formats add their tensors; storage lives here until saved).
class weights_writer {
public:
    template <class Format>
    void add(const std::string& name, const Format& w) {
        require<io_error>(names_.insert(name).second, "weights_writer: weight '", name, "' added twice");
        detail::encode_weight(st_, name, w);
    }
    /// Indices (a pruned layer's kept heads / KV heads / neurons) under `name`, as I64.
    void add_indices(const std::string& name, std::span<const index_t> idx) {
        require<io_error>(names_.insert(name).second, "weights_writer: '", name, "' added twice");
        st_.metadata()["cpet.weight." + name] = "indices";
        detail::encode_indices(st_, name, idx);
    }
    void save(const std::filesystem::path& path) const {
        st_.save(path, {{"cpet.format", "weights"}, {"cpet.version", cpet_format_version}});
    }

private:
    detail::tensor_store st_;
    std::set<std::string> names_;
};

/// An open weights file.
class weights_reader {
public:
    explicit weights_reader(const std::filesystem::path& path) : f_(safetensors_file::open(path)) {
        detail::check_cpet_header(f_, "weights");
    }
    /// Weight `name` as Format; io_error when it is absent, stored as another format, or its tensors are wrong.
    template <class Format>
    Format get(const std::string& name) const {
        detail::tensor_source src(f_);
        return detail::decode_weight<Format>(src, name, -1, -1);
    }
    /// Indices written by add_indices.
    std::vector<index_t> indices(const std::string& name) const {
        auto it = f_.metadata().find("cpet.weight." + name);
        require<io_error>(it != f_.metadata().end() && it->second == "indices", f_.file_name(), ": no indices '", name, "'");
        detail::tensor_source src(f_);
        return detail::decode_indices(src, name);
    }
    const safetensors_file& file() const noexcept { return f_; }

private:
    safetensors_file f_;
};

}  // namespace cpet::io
