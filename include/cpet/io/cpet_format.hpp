// cpet/io/cpet_format.hpp — cpet's own files: safetensors with cpet metadata, for task module sets (every PET
// method) and for packed weight formats (dense, every quantized variant), read back bit-exact.
//
// Layout (version 1). Metadata (the safetensors "__metadata__" map):
//   cpet.format   "task" | "weights"            what the file holds
//   cpet.version  "1"                           layout version; another version is refused naming both
//   task files:    cpet.method  the PET policy's name (lora, rslora, recovery, recovery_linear, adapter,
//                               parallel_adapter, scaled_parallel_adapter, ia3, bitfit, prefix_tuning, p_tuning_v2,
//                               prompt_tuning); cpet.activation for adapters; cpet.layers  N
//   weight files:  cpet.weight.<name>  the format's name (dense_f32, nm_sparse:N:M:f32, indices, or
//                                      quantized:<bits>:<granularity>:<sym>:<act>)
// Tensors, all little-endian, names ASCII:
//   task   layers.<i>.<field>   one per non-empty field of layer i's modules, e.g. layers.0.q.lora_A [r, in] F32,
//                               layers.0.q.lora_B [out, r], layers.0.alpha [] F32 (scalars are 0-d tensors, so they
//                               round-trip bit for bit), layers.3.attention.down, layers.1.k.ia3_l, layers.0.prefix_k
//   weights <name>.dense [out, in] F32                          dense_f32 (repacked on load: packing is deterministic)
//           <name>.nm_values [out, slots] F32, <name>.nm_index [out, slots] U8   N:M sparse with fp32 values
//                                                      (cpet.weight.<name> = nm_sparse:N:M:f32; repacked from the mask)
//           <name> [n] I64                                       indices (kept heads / neurons of a pruned layer)
//           <name>.codes [out, in] I8, <name>.scales [out, groups] F32, <name>.zeros [out, groups] F32 (asymmetric
//           only), <name>.act_scale [in] F32 (SmoothQuant only)  quantized_format<…> (repacked through from_codes)
// Reading checks every field against the layer it is for (the modules' own check_fits) and refuses tensors it
// does not know: a file is either read completely or not at all.
//
// Not here yet: N:M with int8 values and unstructured sparse weights (refused / no layout), and whole compressed backbones (layers of a compressed type rebuilt from their stored formats, pruned
// shapes with kept-index maps). TransformerLayer can only be built by compressing dense weights today; a
// constructor from built Linear<Format> parts is what loading one bit-exact needs (see the io report).
#pragma once

#include <array>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>
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
std::string format_name() {
    if constexpr (std::is_same_v<Format, compress::dense_f32>) {
        return "dense_f32";
    } else if constexpr (std::is_same_v<Format, compress::nm_sparse_f32>) {
        return "nm_sparse";  // + ":N:M:f32" in the file
    } else if constexpr (is_quantized_format<Format>::value) {
        using B = typename Format::bits_type;
        using G = typename Format::granularity_type;
        using S = typename Format::symmetry_type;
        using A = typename Format::activations_type;
        return cpet::detail::concat("quantized:", B::name(), ":", G::name(), ":", S::name(), ":", A::name());
    } else {
        static_assert(sizeof(Format) == 0, "cpet::io weight files: no layout for this weight format yet");
    }
}

}  // namespace detail

/// A set of named packed weights being written (formats add their tensors; storage lives here until saved).
class weights_writer {
public:
    template <class Format>
    void add(const std::string& name, const Format& w) {
        require<io_error>(names_.insert(name).second, "weights_writer: weight '", name, "' added twice");
        meta_["cpet.weight." + name] = detail::format_name<Format>();
        const auto n = std::uint64_t(w.out_features()), k = std::uint64_t(w.in_features());
        if constexpr (std::is_same_v<Format, compress::dense_f32>) {
            auto& d = keep(w.to_dense());
            tensors_.push_back(detail::f32_tensor(name + ".dense", {n, k}, d.data(), std::size_t(d.size())));
        } else if constexpr (std::is_same_v<Format, compress::nm_sparse_f32>) {
            const auto& p = w.packed();
            require<io_error>(p.value_type() == compress::sparse_values::f32, "weights_writer: weight '", name,
                              "': N:M weights with int8 values are not in cpet weights layout v1 (only fp32 values)");
            meta_["cpet.weight." + name] = cpet::detail::concat("nm_sparse:", p.n_keep(), ":", p.m_group(), ":f32");
            const index_t slots = p.slots();
            Matrix<float> v(index_t(n), slots);
            auto& idx = bytes_.emplace_back(std::size_t(index_t(n) * slots));
            for (index_t r = 0; r < index_t(n); ++r)
                for (index_t t = 0; t < slots; ++t) {
                    v(r, t) = p.kept_value(r, t);
                    idx[std::size_t(r * slots + t)] = std::byte(std::uint8_t(p.kept_index(r, t)));
                }
            auto& vk = keep(std::move(v));
            tensors_.push_back(detail::f32_tensor(name + ".nm_values", {n, std::uint64_t(slots)}, vk.data(), std::size_t(vk.size())));
            tensors_.push_back({name + ".nm_index", dtype::U8, {n, std::uint64_t(slots)}, idx});
        } else {
            const auto& q = w.weights();
            auto& codes = bytes_.emplace_back(std::size_t(n * k));
            for (index_t r = 0; r < q.rows(); ++r)
                for (index_t c = 0; c < q.cols(); ++c)
                    codes[std::size_t(r * q.cols() + c)] = std::byte(std::uint8_t(std::int8_t(q.code(r, c))));
            tensors_.push_back({name + ".codes", dtype::I8, {n, k}, codes});
            const index_t groups = Format::granularity_type::gran == compress::granularity::per_group ? q.groups() : 1;
            Matrix<float> s(index_t(n), groups), z(index_t(n), groups);
            for (index_t r = 0; r < index_t(n); ++r)
                for (index_t g = 0; g < groups; ++g) {
                    s(r, g) = q.scale(r, g * q.group());
                    z(r, g) = q.has_zeros() ? q.zero(r, g * q.group()) : 0.f;
                }
            auto& sk = keep(std::move(s));
            tensors_.push_back(detail::f32_tensor(name + ".scales", {n, std::uint64_t(groups)}, sk.data(), std::size_t(sk.size())));
            if (!q.symmetric()) {
                auto& zk = keep(std::move(z));
                tensors_.push_back(detail::f32_tensor(name + ".zeros", {n, std::uint64_t(groups)}, zk.data(), std::size_t(zk.size())));
            }
            if (const float* a = w.act_scale(); a && Format::smoothed)
                tensors_.push_back(detail::f32_tensor(name + ".act_scale", {k}, a, std::size_t(k)));
        }
    }
    /// Indices (a pruned layer's kept heads / KV heads / neurons) under `name`, as I64.
    void add_indices(const std::string& name, std::span<const index_t> idx) {
        require<io_error>(names_.insert(name).second, "weights_writer: '", name, "' added twice");
        meta_["cpet.weight." + name] = "indices";
        auto& b = bytes_.emplace_back(idx.size() * sizeof(std::int64_t));
        for (std::size_t i = 0; i < idx.size(); ++i) {
            const std::int64_t v = idx[i];
            std::memcpy(b.data() + i * 8, &v, 8);
        }
        tensors_.push_back({name, dtype::I64, {idx.size()}, b});
    }
    void save(const std::filesystem::path& path) const {
        auto md = meta_;
        md["cpet.format"] = "weights";
        md["cpet.version"] = cpet_format_version;
        save_safetensors(path, tensors_, md);
    }

private:
    Matrix<float>& keep(Matrix<float> m) { return mats_.emplace_back(std::move(m)); }
    std::vector<tensor_data> tensors_;
    std::map<std::string, std::string> meta_;
    std::set<std::string> names_;
    std::vector<Matrix<float>> mats_;
    std::vector<std::vector<std::byte>> bytes_;
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
        const std::string& fn = f_.file_name();
        auto it = f_.metadata().find("cpet.weight." + name);
        require<io_error>(it != f_.metadata().end(), fn, ": no weight '", name, "'");
        const std::string expect = detail::format_name<Format>();
        const bool nm = std::is_same_v<Format, compress::nm_sparse_f32>;
        require<io_error>(nm ? it->second.rfind("nm_sparse:", 0) == 0 : it->second == expect, fn, ": weight '", name,
                          "' is stored as ", it->second, ", expected ", expect);
        if constexpr (std::is_same_v<Format, compress::nm_sparse_f32>) {
            int N = 0, M = 0;
            char tail[8] = {};
            require<io_error>(std::sscanf(it->second.c_str(), "nm_sparse:%d:%d:%7s", &N, &M, tail) == 3 &&
                                  std::string(tail) == "f32" && N > 0 && M > N && M <= 64,
                              fn, ": weight '", name, "': format '", it->second, "' is not nm_sparse:N:M:f32");
            const auto& v = matrix(name + ".nm_values", dtype::F32, -1, -1);
            const index_t n = index_t(v.shape()[0]), slots = index_t(v.shape()[1]);
            require<io_error>(n > 0 && slots > 0 && slots % N == 0, fn, ": weight '", name, "': ", slots,
                              " kept slots per row is not a positive multiple of N = ", N);
            const auto& ix = matrix(name + ".nm_index", dtype::U8, n, slots);
            const index_t k = slots / N * M;
            Matrix<float> dense(n, k);
            std::vector<std::uint8_t> mask(std::size_t(n * k), 0);
            const auto vals = v.to_f32();
            const auto idx = ix.as<std::uint8_t>();
            for (index_t r = 0; r < n; ++r)
                for (index_t t = 0; t < slots; ++t) {
                    const int j = idx[std::size_t(r * slots + t)];
                    require<io_error>(j < M, fn, ": weight '", name, "': in-group index ", j, " at row ", r,
                                      " is not below M = ", M);
                    const index_t c = t / N * M + j;
                    dense(r, c) = vals[std::size_t(r * slots + t)];
                    mask[std::size_t(r * k + c)] = 1;
                }
            try {
                return Format(compress::nm_sparse_weights::from_mask(dense, mask.data(), N, M));
            } catch (const cpet::error& e) {
                throw io_error(cpet::detail::concat(fn, ": weight '", name, "': ", e.what()));
            }
        } else if constexpr (std::is_same_v<Format, compress::dense_f32>) {
            const auto& t = matrix(name + ".dense", dtype::F32, -1, -1);
            Matrix<float> d(index_t(t.shape()[0]), index_t(t.shape()[1]));
            t.to_f32(d.data());
            return Format(d.view());
        } else {
            using G = typename Format::granularity_type;
            const auto& c = matrix(name + ".codes", dtype::I8, -1, -1);
            const index_t n = index_t(c.shape()[0]), k = index_t(c.shape()[1]);
            require<io_error>(n > 0 && k > 0, fn, ": weight '", name, "' has an empty shape");
            index_t group = 0, groups = 1;
            if constexpr (G::gran == compress::granularity::per_group) {
                group = G::group;
                require<io_error>(k % group == 0, fn, ": weight '", name, "': ", k, " inputs are not a multiple of the group ",
                                  group);
                groups = k / group;
            }
            const auto& s = matrix(name + ".scales", dtype::F32, n, groups);
            std::vector<std::int32_t> q(std::size_t(n * k));
            const auto codes = c.as<std::int8_t>();
            for (std::size_t i = 0; i < q.size(); ++i) q[i] = codes[i];
            const auto sv = s.to_f32();
            std::vector<float> zv;
            constexpr bool sym = Format::symmetry_type::value;
            if constexpr (!sym) zv = matrix(name + ".zeros", dtype::F32, n, groups).to_f32();
            std::vector<float> act;
            if constexpr (Format::smoothed) {
                const auto& a = f_.tensor(name + ".act_scale");
                require<io_error>(a.rank() == 1 && a.shape()[0] == std::uint64_t(k) && a.type() == dtype::F32, fn,
                                  ": tensor '", a.name(), "' has shape ", a.shape_str(), ", expected [", k, "] F32");
                act = a.to_f32();
            }
            try {
                auto qw = compress::quantized_weights::from_codes(Format::bits_type::bits, G::gran, group, sym, n, k,
                                                                  q.data(), sv.data(), sym ? nullptr : zv.data());
                return Format(std::move(qw), act);
            } catch (const cpet::error& e) {
                throw io_error(cpet::detail::concat(fn, ": weight '", name, "': ", e.what()));
            }
        }
    }
    /// Indices written by add_indices.
    std::vector<index_t> indices(const std::string& name) const {
        auto it = f_.metadata().find("cpet.weight." + name);
        require<io_error>(it != f_.metadata().end() && it->second == "indices", f_.file_name(), ": no indices '", name, "'");
        const auto& t = f_.tensor(name);
        require<io_error>(t.type() == dtype::I64 && t.rank() == 1, f_.file_name(), ": tensor '", name, "' is ",
                          dtype_name(t.type()), " ", t.shape_str(), ", expected I64 [n]");
        std::vector<index_t> out(t.numel());
        for (std::size_t i = 0; i < out.size(); ++i) {
            std::int64_t v;
            std::memcpy(&v, t.bytes().data() + i * 8, 8);
            out[i] = index_t(v);
        }
        return out;
    }
    const safetensors_file& file() const noexcept { return f_; }

private:
    const tensor_view& matrix(const std::string& name, dtype t, index_t rows, index_t cols) const {
        const auto& v = f_.tensor(name);
        require<io_error>(v.type() == t && v.rank() == 2 && (rows < 0 || v.shape()[0] == std::uint64_t(rows)) &&
                              (cols < 0 || v.shape()[1] == std::uint64_t(cols)),
                          f_.file_name(), ": tensor '", name, "' is ", dtype_name(v.type()), " ", v.shape_str(),
                          ", expected a ", dtype_name(t), " matrix", rows >= 0 ? cpet::detail::concat(" [", rows, ", ", cols, "]") : "");
        return v;
    }
    safetensors_file f_;
};

}  // namespace cpet::io
