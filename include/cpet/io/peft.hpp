// cpet/io/peft.hpp — HuggingFace PEFT adapters: adapter_config.json + adapter_model.safetensors, read into cpet's
// per-layer PET modules (LoRA / rsLoRA, IA3, prefix tuning) and written back so PEFT loads them.
//
// Keys (PEFT strips the adapter name): base_model.model.<module>.lora_A.weight [r, in], .lora_B.weight [out, r];
// <module>.ia3_l [out, 1] (or [1, in] for a feed-forward module, which IA3 scales at its input); prefix tuning has
// one tensor prompt_embeddings [virtual tokens, layers·2·kv_dim] (layer l's keys in columns 2l·kv_dim.., values
// in (2l+1)·kv_dim.., heads contiguous — PEFT's view(P, 2L, heads, head_dim).permute(2, 0, 3, 1, 4).split(2)).
// <module> is the base model's own module name: BERT [bert.]encoder.layer.N.attention.self.query, …, LLaMA
// model.layers.N.self_attn.q_proj, … (hf_checkpoint.hpp's naming), mapped to (layer N, pet::target).
//
// adapter_config.json is honoured field by field the way PEFT 0.21 reads it: target_modules (a list matched by
// exact name or ".name" suffix, or a string matched as a full regex), exclude_modules, layers_to_transform,
// rank_pattern / alpha_pattern (first key k with (.*\.)?(k)$ matching the module name), use_rslora (s = α/√r, else
// α/r). Refused with io_error naming the file and the field or tensor, where cpet would compute something else:
// use_dora, bias other than "none", lora_bias, fan_in_fan_out, modules_to_save, layer_replication, a tensor of a
// module the model lacks or one target_modules does not select, a shape that does not fit the layer, a rank that
// disagrees with r / rank_pattern, a module with lora_A but no lora_B.
//
// Per-target α (alpha_pattern) is folded into B: cpet's LoRA modules carry one α per layer and scale target t by
// α/r_t (or α/√r_t), so B_t is multiplied by s_t(file) / s_t(cpet) — the product s·B·A is the file's exactly.
//
// Prefix tuning and positions: PEFT runs the real tokens at positions P..P+S−1 after the P virtual tokens (BERT's
// learned positions via past_key_values_length, LLaMA's RoPE via shifted position_ids). For BERT read_peft_prefix
// returns P as `position_offset` (nn::token_batch::position_offset applies it); for RoPE models it re-bases the
// prefix keys instead (R_{−P} k, see read_peft_prefix), which is exact because RoPE scores depend on differences.
#pragma once

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <optional>
#include <regex>
#include <set>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/io/hf_checkpoint.hpp"
#include "cpet/io/safetensors.hpp"
#include "cpet/pet/ia3.hpp"
#include "cpet/pet/lora.hpp"
#include "cpet/pet/policy.hpp"
#include "cpet/pet/prefix.hpp"

namespace cpet::io {

/// What a PEFT adapter needs to know of the model it adapts.
struct peft_base {
    model_family family = model_family::bert;
    index_t layers = 0;
    pet::layer_dims dims;
    std::string prefix;  ///< module-name prefix of the layers: "" (BertModel), "bert." (BERT task models), "model."
    bool rope = false;       ///< the layers rotate q and k (LLaMA): a prefix adapter's keys are re-based (see below)
    index_t head_dim = 0;    ///< with rope: per-head width and θ base of the rotation
    float rope_base = 10000.f;

    template <nn::LayerConfig C>
    static peft_base of(const nn::Model<C>& m, std::string bert_prefix = "") {
        peft_base b;
        b.family = C::placement == nn::norm_placement::post ? model_family::bert : model_family::llama;
        b.layers = index_t(m.stack().size());
        require<io_error>(b.layers > 0, "peft: the model has no layers");
        b.dims = m.stack().layer(0).pet_dims();
        b.prefix = b.family == model_family::llama ? "model." : std::move(bert_prefix);
        b.rope = C::rope;
        b.head_dim = m.stack().layer(0).shape().head_dim;
        b.rope_base = m.stack().layer(0).shape().rope_base;
        require<io_error>(!C::rope || m.stack().layer(0).shape().rope == kernels::rope_style::half,
                          "peft: the model's RoPE pairs interleaved halves; HF LLaMA (and its adapters) use rotate_half");
        return b;
    }
};

/// The HF module name of target t in layer i ("encoder.layer.3.attention.self.query", "model.layers.0.mlp.up_proj").
inline std::string peft_module_name(const peft_base& b, index_t i, pet::target t) {
    using pet::target;
    static constexpr const char* bert[] = {"attention.self.query", "attention.self.key", "attention.self.value",
                                           "attention.output.dense", "intermediate.dense", "", "output.dense"};
    static constexpr const char* llama[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                            "self_attn.o_proj", "mlp.up_proj", "mlp.gate_proj", "mlp.down_proj"};
    if (b.family == model_family::bert)
        return cpet::detail::concat(b.prefix, "encoder.layer.", i, ".", bert[int(t)]);
    return cpet::detail::concat(b.prefix, "layers.", i, ".", llama[int(t)]);
}

namespace detail {

struct module_ref {
    index_t layer;
    pet::target target;
};

/// (layer, target) of an HF module name, or nothing when it is not one of the layers' linears.
inline std::optional<module_ref> parse_module(const peft_base& b, const std::string& name) {
    static const std::regex bert_re(R"(^(?:bert\.)?encoder\.layer\.(\d+)\.(attention\.self\.query|attention\.self\.key|attention\.self\.value|attention\.output\.dense|intermediate\.dense|output\.dense)$)");
    static const std::regex llama_re(R"(^model\.layers\.(\d+)\.(self_attn\.q_proj|self_attn\.k_proj|self_attn\.v_proj|self_attn\.o_proj|mlp\.gate_proj|mlp\.up_proj|mlp\.down_proj)$)");
    std::smatch m;
    if (!std::regex_match(name, m, b.family == model_family::bert ? bert_re : llama_re)) return std::nullopt;
    const std::string idx = m[1].str();
    if (idx.size() > 9) return std::nullopt;
    const std::string leaf = m[2].str();
    const auto dot = leaf.find('.');
    const std::string last = b.family == model_family::bert ? leaf.substr(leaf.rfind('.') + 1) : leaf.substr(dot + 1);
    std::optional<pet::target> t;
    if (b.family == model_family::bert) {
        if (leaf == "attention.output.dense") t = pet::target::o;
        else if (leaf == "intermediate.dense") t = pet::target::up;
        else if (leaf == "output.dense") t = pet::target::down;
        else t = pet::parse_target(last);
    } else {
        t = pet::parse_target(last);
    }
    if (!t) return std::nullopt;
    return module_ref{index_t(std::stol(idx)), *t};
}

/// PEFT's check_target_module_exists for a list or a regex string (+ exclude_modules, layers_to_transform).
inline bool peft_selects(const nlohmann::json& cfg, const char* field, const std::string& key, index_t layer,
                         const std::string& file) {
    auto matches = [&](const nlohmann::json& spec, bool allow_layers) {
        if (spec.is_null()) return false;
        if (spec.is_string()) {
            // libstdc++'s regex recurses per pattern element: a bound keeps a hostile config from exhausting the stack.
            require<io_error>(spec.get_ref<const std::string&>().size() <= 512, file, ": \"", field,
                              "\" regex is longer than 512 characters");
            try {
                return std::regex_match(key, std::regex(spec.get<std::string>()));
            } catch (const std::regex_error& e) {
                throw io_error(cpet::detail::concat(file, ": \"", field, "\" is not a regex cpet can read: ", e.what()));
            }
        }
        if (!spec.is_array())
            throw io_error(cpet::detail::concat(file, ": \"", field, "\" is ", spec.dump(), ", expected a list or a regex"));
        bool found = false;
        for (const auto& t : spec) {
            if (!t.is_string()) throw io_error(cpet::detail::concat(file, ": \"", field, "\" holds ", t.dump()));
            const auto s = t.get<std::string>();
            if (key == s) return true;
            if (key.size() > s.size() && key.compare(key.size() - s.size(), s.size(), s) == 0 &&
                key[key.size() - s.size() - 1] == '.')
                found = true;
        }
        if (found && allow_layers) {
            if (auto it = cfg.find("layers_to_transform"); it != cfg.end() && !it->is_null()) {
                if (it->is_number_integer()) return it->get<index_t>() == layer;
                if (it->is_array() && !it->empty())
                    return std::any_of(it->begin(), it->end(),
                                       [&](const nlohmann::json& v) { return v.is_number_integer() && v.get<index_t>() == layer; });
            }
        }
        return found;
    };
    if (auto ex = cfg.find("exclude_modules"); ex != cfg.end() && matches(*ex, false)) return false;
    auto it = cfg.find(field);
    if (it == cfg.end() || it->is_null())
        throw io_error(cpet::detail::concat(file, ": \"", field, "\" is missing (cpet needs explicit target modules)"));
    return matches(*it, true);
}

/// PEFT's get_pattern_key: the first pattern key k for which (.*\.)?(k)$ matches the module name.
inline const nlohmann::json* pattern_value(const nlohmann::json& cfg, const char* field, const std::string& key,
                                           const std::string& file) {
    auto it = cfg.find(field);
    if (it == cfg.end() || it->is_null()) return nullptr;
    if (!it->is_object()) throw io_error(cpet::detail::concat(file, ": \"", field, "\" is not an object"));
    for (auto& [k, v] : it->items()) {
        require<io_error>(k.size() <= 512, file, ": ", field, " key is longer than 512 characters");
        try {
            if (std::regex_match(key, std::regex("(.*\\.)?(" + k + ")"))) return &v;
        } catch (const std::regex_error& e) {
            throw io_error(cpet::detail::concat(file, ": ", field, " key \"", k, "\" is not a regex cpet can read: ",
                                                e.what()));
        }
    }
    return nullptr;
}

/// Checks the fields of an adapter_config.json that cpet refuses (see the file comment); `name` is its file name.
inline void check_adapter_config(const nlohmann::json& cfg, const std::string& name, const char* peft_type) {
    require<io_error>(cfg.is_object(), name, ": expected a JSON object");
    const auto* tj = field(cfg, "peft_type");
    const std::string type = tj && tj->is_string() ? tj->get<std::string>() : std::string("?");
    require<io_error>(type == peft_type, name, ": peft_type is \"", type, "\", expected \"", peft_type, "\"");
    auto refuse_set = [&cfg, &name](const char* key, const char* why) {
        auto it = cfg.find(key);
        if (it == cfg.end() || it->is_null()) return;
        if ((it->is_array() || it->is_object()) && it->empty()) return;
        if (it->is_boolean() && !it->get<bool>()) return;
        throw io_error(cpet::detail::concat(name, ": \"", key, "\" = ", it->dump(), " is not supported: ", why));
    };
    refuse_set("modules_to_save", "cpet loads only the adapter's own tensors, not replacement copies of base "
                                  "modules (a trained classifier head, say)");
    refuse_set("layer_replication", "cpet's layer stack is not duplicated");
    refuse_set("use_dora", "DoRA's magnitude vectors are not a cpet PET method");
    refuse_set("fan_in_fan_out", "cpet's linears are [out, in] (torch.nn.Linear), not GPT-2 Conv1D");
    refuse_set("lora_bias", "cpet's LoRA has no bias on lora_B");
    refuse_set("trainable_token_indices", "cpet does not train embedding rows");
    if (auto it = cfg.find("bias"); it != cfg.end() && !it->is_null())
        require<io_error>(*it == "none", name, ": \"bias\" = ", it->dump(),
                          " is not supported: the adapter would carry trained backbone biases, cpet's backbone is frozen");
}

inline nlohmann::json read_adapter_config(const fs::path& dir, const char* peft_type) {
    const auto p = dir / "adapter_config.json";
    auto cfg = read_json(p);
    check_adapter_config(cfg, p.string(), peft_type);
    return cfg;
}

inline safetensors_file open_adapter_weights(const fs::path& dir) {
    const auto p = dir / "adapter_model.safetensors";
    if (!fs::exists(p) && fs::exists(dir / "adapter_model.bin"))
        throw io_error(cpet::detail::concat((dir / "adapter_model.bin").string(),
                                            ": pickled torch files are not read by cpet (save with safe_serialization)"));
    return safetensors_file::open(p);
}

inline const char* strip(const std::string& name, const std::string& prefix, const std::string& suffix, std::string& mid) {
    if (name.size() <= prefix.size() + suffix.size() || name.compare(0, prefix.size(), prefix) != 0 ||
        name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0)
        return nullptr;
    mid = name.substr(prefix.size(), name.size() - prefix.size() - suffix.size());
    return suffix.c_str();
}

}  // namespace detail

/// Reads a PEFT LoRA adapter for `base` into one Policy::modules per layer (Policy: pet::lora or pet::rslora, as
/// the file's use_rslora says; the other is refused naming the right one).
template <class Policy = pet::lora>
std::vector<typename Policy::modules> read_peft_lora(const nlohmann::json& cfg, const std::string& cf,
                                                     const safetensors_file& file, const peft_base& base) {
    detail::check_adapter_config(cfg, cf, "LORA");
    const auto* rsj = detail::field(cfg, "use_rslora");
    require<io_error>(!rsj || rsj->is_boolean(), cf, ": \"use_rslora\" is ", rsj ? rsj->dump() : "", ", expected true/false");
    const bool rs = rsj && rsj->get<bool>();
    constexpr bool policy_rs = Policy::scaling_kind == pet::lora_scaling::rank_stabilized;
    require<io_error>(rs == policy_rs, cf, ": use_rslora is ", rs ? "true" : "false", ": read it as ",
                      rs ? "pet::rslora" : "pet::lora", " (s = α/", rs ? "√r" : "r", ")");
    const auto* rj = detail::field(cfg, "r");
    require<io_error>(rj && rj->is_number_integer() && rj->get<index_t>() > 0, cf, ": \"r\" must be a positive integer");
    const index_t r = rj->get<index_t>();
    const auto* aj = detail::field(cfg, "lora_alpha");
    require<io_error>(aj && aj->is_number(), cf, ": \"lora_alpha\" must be a number");
    const float alpha = aj->get<float>();
    require<io_error>(std::isfinite(alpha) && alpha != 0.f, cf, ": \"lora_alpha\" must be finite and non-zero");
    const std::string& wf = file.file_name();
    struct pair {
        const tensor_view* a = nullptr;
        const tensor_view* b = nullptr;
        std::string module;
    };
    std::map<std::pair<index_t, int>, pair> found;
    const std::string root = "base_model.model.";
    for (const auto& t : file.tensors()) {
        std::string module;
        const bool is_a = detail::strip(t.name(), root, ".lora_A.weight", module) != nullptr;
        const bool is_b = !is_a && detail::strip(t.name(), root, ".lora_B.weight", module) != nullptr;
        require<io_error>(is_a || is_b, wf, ": tensor '", t.name(), "' is not a LoRA factor cpet reads "
                          "(base_model.model.<module>.lora_A.weight / .lora_B.weight; embedding LoRA and biases are "
                          "not supported)");
        const auto ref = detail::parse_module(base, module);
        require<io_error>(ref.has_value() && ref->layer < base.layers && base.dims.has(ref->target), wf, ": tensor '",
                          t.name(), "' adapts module '", module, "', which is not one of the model's ", base.layers,
                          " layers' linears");
        require<io_error>(module == peft_module_name(base, ref->layer, ref->target), wf, ": tensor '", t.name(),
                          "': module '", module, "' does not use this model's naming (expected '",
                          peft_module_name(base, ref->layer, ref->target), "')");
        require<io_error>(detail::peft_selects(cfg, "target_modules", module, ref->layer, cf), wf, ": tensor '",
                          t.name(), "' adapts '", module, "', which target_modules does not select");
        auto& p = found[{ref->layer, int(ref->target)}];
        (is_a ? p.a : p.b) = &t;
        p.module = module;
    }
    std::vector<typename Policy::modules> out(std::size_t(base.layers));
    for (auto& m : out) m.f.dims = base.dims;
    std::vector<bool> alpha_set(out.size(), false);
    for (const auto& [key, p] : found) {
        const auto [layer, ti] = key;
        const auto t = pet::target(ti);
        require<io_error>(p.a && p.b, wf, ": module '", p.module, "' has ", p.a ? "lora_A" : "lora_B", " but no ",
                          p.a ? "lora_B" : "lora_A");
        index_t rank = r;
        if (const nlohmann::json* v = detail::pattern_value(cfg, "rank_pattern", p.module, cf)) {
            require<io_error>(v->is_number_integer() && v->get<index_t>() > 0, cf, ": rank_pattern value ", v->dump(),
                              " for '", p.module, "' is not a positive integer");
            rank = v->get<index_t>();
        }
        float a_t = alpha;
        if (const nlohmann::json* v = detail::pattern_value(cfg, "alpha_pattern", p.module, cf)) {
            require<io_error>(v->is_number() && std::isfinite(v->get<float>()) && v->get<float>() != 0.f, cf,
                              ": alpha_pattern value ", v->dump(), " for '", p.module, "' is not a finite non-zero number");
            a_t = v->get<float>();
        }
        const index_t in = base.dims.in(t), outd = base.dims.out(t);
        require<io_error>(p.a->rank() == 2 && p.a->shape()[0] == std::uint64_t(rank) && p.a->shape()[1] == std::uint64_t(in),
                          wf, ": tensor '", p.a->name(), "' has shape ", p.a->shape_str(), ", expected [", rank, ", ", in,
                          "] (r from adapter_config.json, in from the model)");
        require<io_error>(p.b->rank() == 2 && p.b->shape()[0] == std::uint64_t(outd) && p.b->shape()[1] == std::uint64_t(rank),
                          wf, ": tensor '", p.b->name(), "' has shape ", p.b->shape_str(), ", expected [", outd, ", ", rank, "]");
        require<io_error>(is_float_dtype(p.a->type()) && is_float_dtype(p.b->type()), wf, ": module '", p.module,
                          "': LoRA factors must be F32, F16 or BF16");
        Matrix<float> A(rank, in), B(outd, rank);
        p.a->to_f32(A.data());
        p.b->to_f32(B.data());
        auto& m = out[std::size_t(layer)];
        if (!alpha_set[std::size_t(layer)]) {
            m.alpha = a_t;
            alpha_set[std::size_t(layer)] = true;
        }
        const float fold = Policy::scaling(rank, a_t) / Policy::scaling(rank, m.alpha);
        if (fold != 1.f)
            for (index_t i = 0; i < B.size(); ++i) B.data()[i] *= fold;
        m.set(t, A, B);
    }
    return out;
}
template <class Policy = pet::lora>
std::vector<typename Policy::modules> read_peft_lora(const fs::path& dir, const peft_base& base) {
    const auto cfg = detail::read_adapter_config(dir, "LORA");
    return read_peft_lora<Policy>(cfg, (dir / "adapter_config.json").string(), detail::open_adapter_weights(dir), base);
}

/// Writes modules (one per layer) as a PEFT LoRA adapter: adapter_config.json (full module names in
/// target_modules, rank_pattern / alpha_pattern for every module whose rank / α differs from the first) and
/// adapter_model.safetensors (F32), both written atomically.
template <class Policy = pet::lora>
void write_peft_lora(const fs::path& dir, const std::vector<typename Policy::modules>& layers, const peft_base& base,
                     const std::string& base_model_name = "") {
    require<io_error>(index_t(layers.size()) == base.layers, "write_peft_lora: ", layers.size(), " layers of modules for a ",
                      base.layers, "-layer model");
    fs::create_directories(dir);
    std::vector<tensor_data> tensors;
    std::vector<std::string> names;
    nlohmann::json targets = nlohmann::json::array(), ranks = nlohmann::json::object(), alphas = nlohmann::json::object();
    std::optional<index_t> r0;
    std::optional<float> a0;
    for (index_t i = 0; i < base.layers; ++i) {
        const auto& m = layers[std::size_t(i)];
        m.check_fits(base.dims, "write_peft_lora");
        for (int ti = 0; ti < pet::target_count; ++ti) {
            const auto t = pet::target(ti);
            if (m.rank(t) == 0) continue;
            const auto module = peft_module_name(base, i, t);
            if (!r0) r0 = m.rank(t);
            if (!a0) a0 = m.alpha;
            targets.push_back(module);
            if (m.rank(t) != *r0) ranks[module] = m.rank(t);
            if (m.alpha != *a0) alphas[module] = m.alpha;
            const auto A = m.A(t), B = m.B(t);
            const std::string key = "base_model.model." + module;
            tensors.push_back({key + ".lora_A.weight", dtype::F32, {std::uint64_t(A.rows()), std::uint64_t(A.cols())},
                               std::as_bytes(std::span<const float>(A.data(), std::size_t(A.size())))});
            tensors.push_back({key + ".lora_B.weight", dtype::F32, {std::uint64_t(B.rows()), std::uint64_t(B.cols())},
                               std::as_bytes(std::span<const float>(B.data(), std::size_t(B.size())))});
        }
    }
    require<io_error>(r0.has_value(), "write_peft_lora: no layer has a LoRA target");
    nlohmann::json cfg = {
        {"peft_type", "LORA"},
        {"task_type", nullptr},
        {"base_model_name_or_path", base_model_name},
        {"r", *r0},
        {"lora_alpha", *a0},
        {"use_rslora", Policy::scaling_kind == pet::lora_scaling::rank_stabilized},
        {"target_modules", targets},
        {"rank_pattern", ranks},
        {"alpha_pattern", alphas},
        {"lora_dropout", 0.0},
        {"bias", "none"},
        {"fan_in_fan_out", false},
        {"modules_to_save", nullptr},
        {"use_dora", false},
        {"inference_mode", true},
        {"init_lora_weights", true},
        {"layers_to_transform", nullptr},
        {"layers_pattern", nullptr},
    };
    save_safetensors(dir / "adapter_model.safetensors", tensors, {{"format", "pt"}});
    const std::string text = cfg.dump(2);
    atomic_write(dir / "adapter_config.json", text.size(), [&](auto&& sink) { sink(text.data(), text.size()); });
}

/// Reads a PEFT IA3 adapter: target modules scaled at their output ([out, 1]: q, k, v) or, when listed in
/// feedforward_modules, at their input ([1, in]: down) — what cpet's IA3 rescales; any other is refused.
inline std::vector<pet::ia3::modules> read_peft_ia3(const nlohmann::json& cfg, const std::string& cf,
                                                     const safetensors_file& file, const peft_base& base) {
    detail::check_adapter_config(cfg, cf, "IA3");
    const std::string& wf = file.file_name();
    std::vector<pet::ia3::modules> out(std::size_t(base.layers));
    for (auto& m : out) m.dims = base.dims;
    for (const auto& t : file.tensors()) {
        std::string module;
        require<io_error>(detail::strip(t.name(), "base_model.model.", ".ia3_l", module) != nullptr, wf, ": tensor '",
                          t.name(), "' is not an IA3 vector (base_model.model.<module>.ia3_l)");
        const auto ref = detail::parse_module(base, module);
        require<io_error>(ref.has_value() && ref->layer < base.layers && base.dims.has(ref->target) &&
                              module == peft_module_name(base, ref->layer, ref->target),
                          wf, ": tensor '", t.name(), "' scales module '", module, "', which is not one of the model's ",
                          base.layers, " layers' linears");
        require<io_error>(detail::peft_selects(cfg, "target_modules", module, ref->layer, cf), wf, ": tensor '", t.name(),
                          "': target_modules does not select '", module, "'");
        bool ff = false;
        if (auto it = cfg.find("feedforward_modules"); it != cfg.end() && !it->is_null())
            ff = detail::peft_selects(cfg, "feedforward_modules", module, ref->layer, cf);
        const auto tg = ref->target;
        const bool ok = ff ? tg == pet::target::down
                           : (tg == pet::target::q || tg == pet::target::k || tg == pet::target::v);
        require<io_error>(ok, wf, ": tensor '", t.name(), "': IA3 on '", module, "' as a ",
                          ff ? "feed-forward module (input scaling)" : "module scaled at its output",
                          " is not what cpet's IA3 does (outputs of q, k, v; the input of down as a feed-forward module)");
        const index_t w = ff ? base.dims.in(tg) : base.dims.out(tg);
        const bool shape_ok = t.rank() == 2 && (ff ? (t.shape()[0] == 1 && t.shape()[1] == std::uint64_t(w))
                                                   : (t.shape()[0] == std::uint64_t(w) && t.shape()[1] == 1));
        require<io_error>(shape_ok, wf, ": tensor '", t.name(), "' has shape ", t.shape_str(), ", expected ",
                          ff ? "[1, " : "[", w, ff ? "]" : ", 1]");
        require<io_error>(is_float_dtype(t.type()), wf, ": tensor '", t.name(), "' has dtype ", dtype_name(t.type()),
                          ", expected F32, F16 or BF16");
        out[std::size_t(ref->layer)].set(tg, t.to_f32());
    }
    return out;
}
inline std::vector<pet::ia3::modules> read_peft_ia3(const fs::path& dir, const peft_base& base) {
    const auto cfg = detail::read_adapter_config(dir, "IA3");
    return read_peft_ia3(cfg, (dir / "adapter_config.json").string(), detail::open_adapter_weights(dir), base);
}

/// Writes IA3 modules (one per layer) as a PEFT IA3 adapter: q/k/v vectors as [out, 1] output scales, down's as a
/// feed-forward module's [1, in] input scale; full module names in target_modules / feedforward_modules.
inline void write_peft_ia3(const fs::path& dir, const std::vector<pet::ia3::modules>& layers, const peft_base& base,
                           const std::string& base_model_name = "") {
    require<io_error>(index_t(layers.size()) == base.layers, "write_peft_ia3: ", layers.size(),
                      " layers of modules for a ", base.layers, "-layer model");
    fs::create_directories(dir);
    std::vector<tensor_data> tensors;
    nlohmann::json targets = nlohmann::json::array(), ff = nlohmann::json::array();
    for (index_t i = 0; i < base.layers; ++i) {
        const auto& m = layers[std::size_t(i)];
        m.check_fits(base.dims, "write_peft_ia3");
        for (int ti = 0; ti < pet::target_count; ++ti) {
            const auto t = pet::target(ti);
            const auto& v = m.l[std::size_t(ti)];
            if (v.empty()) continue;
            const auto module = peft_module_name(base, i, t);
            targets.push_back(module);
            const bool is_ff = t == pet::target::down;
            if (is_ff) ff.push_back(module);
            tensors.push_back({"base_model.model." + module + ".ia3_l", dtype::F32,
                               is_ff ? std::vector<std::uint64_t>{1, v.size()} : std::vector<std::uint64_t>{v.size(), 1},
                               std::as_bytes(std::span<const float>(v))});
        }
    }
    require<io_error>(!tensors.empty(), "write_peft_ia3: no layer has an IA3 vector");
    const nlohmann::json cfg = {
        {"peft_type", "IA3"},           {"task_type", nullptr},        {"base_model_name_or_path", base_model_name},
        {"target_modules", targets},    {"feedforward_modules", ff},  {"fan_in_fan_out", false},
        {"modules_to_save", nullptr},   {"init_ia3_weights", true},    {"inference_mode", true},
    };
    save_safetensors(dir / "adapter_model.safetensors", tensors, {{"format", "pt"}});
    const std::string text = cfg.dump(2);
    atomic_write(dir / "adapter_config.json", text.size(), [&](auto&& sink) { sink(text.data(), text.size()); });
}

/// A PEFT prefix-tuning adapter as per-layer key / value rows, and where PEFT puts the real tokens.
struct peft_prefix {
    std::vector<pet::prefix_tuning::modules> layers;
    index_t position_offset = 0;  ///< PEFT's: the real tokens sit at positions P..P+S−1
};

namespace detail {

/// Rotates each head of every row of k [P, n·hd] by RoPE at position `pos` (rotate_half pairing, angles in double).
inline void rotate_rows(MatrixView<float> k, index_t hd, double base, double pos) {
    const index_t half = hd / 2;
    for (index_t r = 0; r < k.rows(); ++r)
        for (index_t h = 0; h < k.cols() / hd; ++h) {
            float* x = k.row(r) + h * hd;
            for (index_t i = 0; i < half; ++i) {
                const double a = pos * std::pow(base, -2.0 * double(i) / double(hd));
                const double c = std::cos(a), s = std::sin(a), x1 = x[i], x2 = x[i + half];
                x[i] = float(x1 * c - x2 * s);
                x[i + half] = float(x2 * c + x1 * s);
            }
        }
}

}  // namespace detail

/// Reads a PEFT prefix-tuning adapter (the final rows, prompt_embeddings [P, layers·2·kv_dim]).
///
/// Positions. PEFT runs the real tokens at P..P+S−1; cpet's attention rotates them from 0 and never rotates prefix
/// rows. For BERT the learned positions take `position_offset` (nn::token_batch::position_offset). For RoPE models
/// the offset is folded into the prefix keys instead: a query at position p + P meets an unrotated prefix key k in
/// PEFT, (R_{p+P} q)·k = (R_p q)·(R_{−P} k), and scores between real tokens depend on position differences only, so
/// storing k' = R_{−P} k makes cpet's attention (queries at p) compute PEFT's exactly; position_offset is then 0.
inline peft_prefix read_peft_prefix(const nlohmann::json& cfg, const std::string& cf, const safetensors_file& file,
                                    const peft_base& base) {
    detail::check_adapter_config(cfg, cf, "PREFIX_TUNING");
    require<io_error>(!base.rope || (base.head_dim > 0 && base.head_dim % 2 == 0 && base.dims.kv_dim % base.head_dim == 0),
                      cf, ": the model's head_dim ", base.head_dim, " does not split kv_dim ", base.dims.kv_dim,
                      " into rotary heads");
    const index_t P = detail::int_field(cfg, "num_virtual_tokens", cf);
    require<io_error>(P > 0, cf, ": num_virtual_tokens must be positive");
    const index_t L = detail::int_field(cfg, "num_layers", cf);
    const index_t D = detail::int_field(cfg, "token_dim", cf);
    const index_t subs = detail::int_field(cfg, "num_transformer_submodules", cf, 1);
    require<io_error>(subs == 1, cf, ": num_transformer_submodules ", subs, " (encoder-decoder) is not supported");
    require<io_error>(L == base.layers && D == base.dims.kv_dim, cf, ": num_layers ", L, " and token_dim ", D,
                      " do not fit the model (", base.layers, " layers, kv_dim ", base.dims.kv_dim, ")");
    const auto& t = file.tensor("prompt_embeddings");
    require<io_error>(file.size() == 1, file.file_name(), ": expected the single tensor 'prompt_embeddings', found ",
                      file.size(), " tensors (a prefix_projection encoder saved in inference mode?)");
    require<io_error>(t.rank() == 2 && t.shape()[0] == std::uint64_t(P) && t.shape()[1] == std::uint64_t(L * 2 * D),
                      file.file_name(), ": tensor 'prompt_embeddings' has shape ", t.shape_str(), ", expected [", P,
                      ", ", L * 2 * D, "] (num_virtual_tokens, num_layers·2·token_dim)");
    Matrix<float> all(P, L * 2 * D);
    t.to_f32(all.data());
    peft_prefix out;
    out.position_offset = base.rope ? 0 : P;
    out.layers.resize(std::size_t(L));
    for (index_t l = 0; l < L; ++l) {
        Matrix<float> k(all.view().block(0, 2 * l * D, P, D));
        if (base.rope) detail::rotate_rows(k, base.head_dim, double(base.rope_base), -double(P));
        out.layers[std::size_t(l)].set(k, all.view().block(0, (2 * l + 1) * D, P, D));
    }
    return out;
}
inline peft_prefix read_peft_prefix(const fs::path& dir, const peft_base& base) {
    const auto cfg = detail::read_adapter_config(dir, "PREFIX_TUNING");
    return read_peft_prefix(cfg, (dir / "adapter_config.json").string(), detail::open_adapter_weights(dir), base);
}

/// Writes a prefix as a PEFT prefix-tuning adapter, the inverse of read_peft_prefix: prompt_embeddings
/// [P, layers·2·kv_dim] (F32) and adapter_config.json with PEFT 0.21's fields (prefix_projection false: the rows
/// are the trained parameters themselves), both written atomically. `task_type` picks the PeftModel class PEFT
/// builds on load, and only the task classes inject the prefix, so it defaults to FEATURE_EXTRACTION (BERT) or
/// CAUSAL_LM (LLaMA); a sequence classifier wants "SEQ_CLS".
///
/// The prefix must be in PEFT's position convention, as read_peft_prefix returns it: position_offset P on a model
/// with learned positions (its real tokens run at P..P+S−1 in PEFT, which nothing in the rows can change), 0 on a
/// RoPE model, whose keys are stored re-based and are rotated back here (k = R_{+P} k'). read(write(x)) == x bit
/// for bit for the values and for every key without RoPE; RoPE keys come back within fp32 rounding (a few ulps:
/// the two rotations are evaluated in double but each result is stored as float).
/// Refused with io_error, before anything is written: a layer count other than the model's, an empty layer, a
/// layer whose rows are not [P, kv_dim] with the same P as layer 0, keys and values of different shapes, a
/// position_offset other than PEFT's, a head_dim that does not split kv_dim into heads, a task_type PEFT lacks.
inline void write_peft_prefix(const fs::path& dir, const peft_prefix& prefix, const peft_base& base,
                              const std::string& base_model_name = "", std::string task_type = "") {
    const char* who = "write_peft_prefix";
    const auto& layers = prefix.layers;
    require<io_error>(!layers.empty(), who, ": the prefix has no layers");
    require<io_error>(index_t(layers.size()) == base.layers, who, ": ", layers.size(), " layers of prefix rows for a ",
                      base.layers, "-layer model");
    const index_t D = base.dims.kv_dim;
    // PEFT views each layer's D columns as num_attention_heads heads of D / heads: the config must name that split.
    require<io_error>(base.head_dim > 0 && D % base.head_dim == 0 && (!base.rope || base.head_dim % 2 == 0), who,
                      ": the model's head_dim ", base.head_dim, " does not split kv_dim ", D,
                      base.rope ? " into rotary heads" : " into heads");
    const index_t P = layers[0].length();
    for (std::size_t l = 0; l < layers.size(); ++l) {
        const auto& m = layers[l];
        require<io_error>(!m.k.empty() && !m.v.empty(), who, ": layer ", l, " has no prefix rows (PEFT's prefix ",
                          "covers every layer)");
        require<io_error>(m.k.cols() == D && m.v.cols() == D, who, ": layer ", l, " holds keys ",
                          shape_str(m.k.rows(), m.k.cols()), " and values ", shape_str(m.v.rows(), m.v.cols()),
                          ", expected [P, ", D, "] (kv_dim of the model)");
        require<io_error>(m.k.rows() == P && m.v.rows() == P, who, ": layer ", l, " holds keys ",
                          shape_str(m.k.rows(), m.k.cols()), " and values ", shape_str(m.v.rows(), m.v.cols()),
                          ", but layer 0 has ", P, " rows (PEFT's num_virtual_tokens is one P for all layers)");
    }
    if (base.rope)
        require<io_error>(prefix.position_offset == 0, who, ": position_offset is ", prefix.position_offset,
                          ", expected 0: on a RoPE model PEFT's position shift is folded into the keys (as "
                          "read_peft_prefix returns them)");
    else
        require<io_error>(prefix.position_offset == P, who, ": position_offset is ", prefix.position_offset,
                          ", expected ", P, ": on a model with learned positions PEFT runs the real tokens at "
                          "P..P+S-1 after the P prefix rows, and no change to the rows can move them");
    if (task_type.empty()) task_type = base.family == model_family::bert ? "FEATURE_EXTRACTION" : "CAUSAL_LM";
    // PEFT's TaskType values for one-stack models (SEQ_2_SEQ_LM would need num_transformer_submodules 2).
    static constexpr const char* tasks[] = {"FEATURE_EXTRACTION", "CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"};
    require<io_error>(std::find(std::begin(tasks), std::end(tasks), task_type) != std::end(tasks), who,
                      ": task_type \"", task_type, "\" is not one of PEFT's FEATURE_EXTRACTION, CAUSAL_LM, SEQ_CLS, "
                      "TOKEN_CLS, QUESTION_ANS");

    Matrix<float> all(P, base.layers * 2 * D);
    for (index_t l = 0; l < base.layers; ++l) {
        const auto& m = layers[std::size_t(l)];
        Matrix<float> k(m.k.view());
        if (base.rope) detail::rotate_rows(k, base.head_dim, double(base.rope_base), double(P));
        for (index_t r = 0; r < P; ++r) {
            std::copy_n(k.row(r), D, all.row(r) + 2 * l * D);
            std::copy_n(m.v.row(r), D, all.row(r) + (2 * l + 1) * D);
        }
    }
    // Sorted keys, as PEFT's to_json_string writes them (nlohmann's object is a sorted map).
    const nlohmann::json cfg = {
        {"auto_mapping", nullptr},
        {"base_model_name_or_path", base_model_name},
        {"encoder_hidden_size", D},  // PEFT's default (token_dim); unused without prefix_projection
        {"inference_mode", true},
        {"init_weights", nullptr},
        {"modules_to_save", nullptr},
        {"num_attention_heads", D / base.head_dim},
        {"num_layers", base.layers},
        {"num_transformer_submodules", 1},
        {"num_virtual_tokens", P},
        {"peft_type", "PREFIX_TUNING"},
        {"prefix_projection", false},
        {"revision", nullptr},
        {"task_type", task_type},
        {"token_dim", D},
    };
    fs::create_directories(dir);
    const std::vector<tensor_data> tensors{
        {"prompt_embeddings", dtype::F32, {std::uint64_t(P), std::uint64_t(all.cols())},
         std::as_bytes(std::span<const float>(all.data(), std::size_t(all.size())))}};
    save_safetensors(dir / "adapter_model.safetensors", tensors, {{"format", "pt"}});
    const std::string text = cfg.dump(2);
    atomic_write(dir / "adapter_config.json", text.size(), [&](auto&& sink) { sink(text.data(), text.size()); });
}

/// Writes cpet prefix modules (one per layer) as a PEFT prefix adapter. On a RoPE model this is exact: PEFT then
/// computes what cpet computes with these rows. On a model with learned positions PEFT runs the real tokens at
/// P..P+S−1, so its outputs are cpet's with nn::token_batch::position_offset = P (rows trained with positions
/// from 0 give PEFT other outputs; train them with that offset to match).
inline void write_peft_prefix(const fs::path& dir, const std::vector<pet::prefix_tuning::modules>& layers,
                              const peft_base& base, const std::string& base_model_name = "",
                              std::string task_type = "") {
    peft_prefix p;
    p.layers = layers;
    p.position_offset = base.rope || layers.empty() ? 0 : layers[0].length();
    write_peft_prefix(dir, p, base, base_model_name, std::move(task_type));
}

}  // namespace cpet::io
