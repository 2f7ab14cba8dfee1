// cpet/io/hf_checkpoint.hpp — HuggingFace checkpoints by name: config.json, model.safetensors (or a sharded
// model.safetensors.index.json), the BERT and LLaMA name maps, and a Model<C> built from them, each linear
// compressed with C's policy as its layer is read.
//
// Names (torch.nn.Linear weights are [out, in], cpet's layout, so no transpose):
//   BERT  [bert.]embeddings.{word,position,token_type}_embeddings.weight, embeddings.LayerNorm.{weight,bias}
//         [bert.]encoder.layer.N.attention.self.{query,key,value}.{weight,bias}
//                encoder.layer.N.attention.output.dense.{weight,bias}, .attention.output.LayerNorm.*  (norm1)
//                encoder.layer.N.intermediate.dense.*  (up),  .output.dense.*  (down),  .output.LayerNorm.*  (norm2)
//         [bert.]pooler.dense.*, classifier.*   (BertForSequenceClassification)
//   LLaMA model.embed_tokens.weight, model.layers.N.self_attn.{q,k,v,o}_proj.weight,
//         model.layers.N.mlp.{gate,up,down}_proj.weight, .input_layernorm.weight (norm1),
//         .post_attention_layernorm.weight (norm2), model.norm.weight, lm_head.weight (absent when tied), score.weight
// The "bert." prefix (task heads' checkpoints) is detected; tensors may be F32, F16 or BF16 (converted to fp32).
//
// Refused with io_error naming the file and the tensor or key: a missing tensor, a tensor of the wrong rank or shape
// for config.json, a config that cpet would run differently from transformers (RoPE scaling, relative position
// embeddings, an activation the layer config does not have, biases LLaMA's layer config lacks), and a layer config
// C of the other family.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/io/safetensors.hpp"
#include "cpet/nn/config.hpp"
#include "cpet/nn/model.hpp"
#include "cpet/nn/stack.hpp"
#include "cpet/nn/weights.hpp"

namespace cpet::io {

namespace fs = std::filesystem;

/// JSON text parsed; io_error naming `name` when it is not JSON.
inline nlohmann::json parse_json(std::string_view text, const std::string& name) {
    try {
        return nlohmann::json::parse(text.begin(), text.end());
    } catch (const nlohmann::json::exception& e) {
        throw io_error(cpet::detail::concat(name, ": not valid JSON: ", e.what()));
    }
}

/// A JSON file parsed; io_error naming the file when it cannot be read or is not JSON.
inline nlohmann::json read_json(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    if (!in) throw io_error(cpet::detail::concat(p.string(), ": cannot open for reading"));
    std::ostringstream ss;
    ss << in.rdbuf();
    return parse_json(ss.str(), p.string());
}

enum class model_family { bert, llama };

/// What config.json says about the architecture (the fields cpet uses).
struct hf_config {
    std::string file;
    model_family family = model_family::bert;
    std::string model_type;
    index_t vocab_size = 0, hidden = 0, layers = 0, heads = 0, kv_heads = 0, head_dim = 0, intermediate = 0;
    index_t max_positions = 0, type_vocab = 0, num_labels = 0, pad_token_id = 0;
    float eps = 1e-12f;
    float rope_theta = 10000.f;
    bool tie_word_embeddings = false;
    std::string hidden_act;

    nn::layer_shape layer_shape() const {
        nn::layer_shape s;
        s.d_model = hidden;
        s.n_heads = heads;
        s.n_kv_heads = kv_heads;
        s.head_dim = head_dim;
        s.d_ff = intermediate;
        s.eps = eps;
        s.rope_base = rope_theta;
        s.rope = kernels::rope_style::half;  // HF LLaMA's rotate_half
        return s;
    }
    /// The activation transformers applies for hidden_act.
    kernels::activation activation() const {
        if (hidden_act == "gelu") return kernels::activation::gelu_erf;
        if (hidden_act == "gelu_new" || hidden_act == "gelu_pytorch_tanh") return kernels::activation::gelu_tanh;
        if (hidden_act == "silu" || hidden_act == "swish") return kernels::activation::silu;
        if (hidden_act == "relu") return kernels::activation::relu;
        throw io_error(cpet::detail::concat(file, ": hidden_act \"", hidden_act, "\" is not supported by cpet"));
    }
};

namespace detail {

inline const nlohmann::json* field(const nlohmann::json& j, const char* key) {
    auto it = j.find(key);
    return it == j.end() || it->is_null() ? nullptr : &*it;
}
inline index_t int_field(const nlohmann::json& j, const char* key, const std::string& file,
                         std::optional<index_t> fallback = std::nullopt) {
    const auto* v = field(j, key);
    if (!v) {
        if (fallback) return *fallback;
        throw io_error(cpet::detail::concat(file, ": missing \"", key, "\""));
    }
    if (!v->is_number_integer() || v->get<std::int64_t>() < 0)
        throw io_error(cpet::detail::concat(file, ": \"", key, "\" is ", v->dump(), ", expected a non-negative integer"));
    return static_cast<index_t>(v->get<std::int64_t>());
}
inline double num_field(const nlohmann::json& j, const char* key, const std::string& file,
                        std::optional<double> fallback = std::nullopt) {
    const auto* v = field(j, key);
    if (!v) {
        if (fallback) return *fallback;
        throw io_error(cpet::detail::concat(file, ": missing \"", key, "\""));
    }
    if (!v->is_number()) throw io_error(cpet::detail::concat(file, ": \"", key, "\" is ", v->dump(), ", expected a number"));
    return v->get<double>();
}
inline std::string str_field(const nlohmann::json& j, const char* key, const std::string& file,
                             std::optional<std::string> fallback = std::nullopt) {
    const auto* v = field(j, key);
    if (!v) {
        if (fallback) return *fallback;
        throw io_error(cpet::detail::concat(file, ": missing \"", key, "\""));
    }
    if (!v->is_string()) throw io_error(cpet::detail::concat(file, ": \"", key, "\" is ", v->dump(), ", expected a string"));
    return v->get<std::string>();
}
inline bool bool_field(const nlohmann::json& j, const char* key, const std::string& file, bool fallback) {
    const auto* v = field(j, key);
    if (!v) return fallback;
    if (!v->is_boolean()) throw io_error(cpet::detail::concat(file, ": \"", key, "\" is ", v->dump(), ", expected true/false"));
    return v->get<bool>();
}

}  // namespace detail

/// The architecture of a parsed config.json (`file` names it in messages).
inline hf_config parse_hf_config(const nlohmann::json& j, std::string file) {
    hf_config c;
    c.file = std::move(file);
    const std::string& f = c.file;
    if (!j.is_object()) throw io_error(cpet::detail::concat(f, ": expected a JSON object"));
    c.model_type = detail::str_field(j, "model_type", f);
    if (c.model_type == "bert") c.family = model_family::bert;
    else if (c.model_type == "llama") c.family = model_family::llama;
    else
        throw io_error(cpet::detail::concat(f, ": model_type \"", c.model_type, "\" is not supported (bert, llama)"));
    c.vocab_size = detail::int_field(j, "vocab_size", f);
    c.hidden = detail::int_field(j, "hidden_size", f);
    c.layers = detail::int_field(j, "num_hidden_layers", f);
    c.heads = detail::int_field(j, "num_attention_heads", f);
    c.intermediate = detail::int_field(j, "intermediate_size", f);
    c.pad_token_id = detail::int_field(j, "pad_token_id", f, 0);
    require<io_error>(c.vocab_size > 0 && c.hidden > 0 && c.heads > 0 && c.intermediate > 0, f,
                      ": vocab_size, hidden_size, num_attention_heads and intermediate_size must be positive");
    if (const auto* l = detail::field(j, "id2label"); l && l->is_object()) c.num_labels = index_t(l->size());
    c.num_labels = detail::int_field(j, "num_labels", f, c.num_labels);
    if (c.family == model_family::bert) {
        c.kv_heads = c.heads;
        require<io_error>(c.hidden % c.heads == 0, f, ": hidden_size ", c.hidden,
                          " is not a multiple of num_attention_heads ", c.heads);
        c.head_dim = c.hidden / c.heads;
        c.max_positions = detail::int_field(j, "max_position_embeddings", f);
        c.type_vocab = detail::int_field(j, "type_vocab_size", f, 2);
        c.eps = float(detail::num_field(j, "layer_norm_eps", f, 1e-12));
        c.hidden_act = detail::str_field(j, "hidden_act", f, std::string("gelu"));
        const auto pos = detail::str_field(j, "position_embedding_type", f, std::string("absolute"));
        require<io_error>(pos == "absolute", f, ": position_embedding_type \"", pos,
                          "\" is not supported (cpet's BERT has absolute learned positions)");
        c.tie_word_embeddings = false;  // BertModel has no LM head in cpet
    } else {
        c.kv_heads = detail::int_field(j, "num_key_value_heads", f, c.heads);
        c.head_dim = detail::int_field(j, "head_dim", f, c.hidden / c.heads);
        require<io_error>(c.kv_heads > 0 && c.heads % c.kv_heads == 0, f, ": num_attention_heads ", c.heads,
                          " is not a multiple of num_key_value_heads ", c.kv_heads);
        c.max_positions = detail::int_field(j, "max_position_embeddings", f, 0);
        c.eps = float(detail::num_field(j, "rms_norm_eps", f, 1e-6));
        c.hidden_act = detail::str_field(j, "hidden_act", f, std::string("silu"));
        require<io_error>(c.hidden_act == "silu", f, ": hidden_act \"", c.hidden_act,
                          "\" is not supported for LLaMA (SwiGLU gates with silu)");
        c.tie_word_embeddings = detail::bool_field(j, "tie_word_embeddings", f, false);
        require<io_error>(!detail::bool_field(j, "attention_bias", f, false), f,
                          ": attention_bias true is not supported (cpet's LLaMA layer has no biases)");
        require<io_error>(!detail::bool_field(j, "mlp_bias", f, false), f,
                          ": mlp_bias true is not supported (cpet's LLaMA layer has no biases)");
        // transformers ≤ 4.x: rope_theta + rope_scaling; 5.x: rope_parameters {rope_theta, rope_type}.
        double theta = detail::num_field(j, "rope_theta", f, 10000.0);
        auto check_rope_type = [&](const nlohmann::json& r, const char* where) {
            const auto* t = detail::field(r, "rope_type");
            if (!t) t = detail::field(r, "type");
            const std::string type = t && t->is_string() ? t->get<std::string>() : std::string("?");
            require<io_error>(type == "default", f, ": ", where, " rope_type \"", type,
                              "\" is not supported (cpet applies plain RoPE)");
        };
        if (const auto* rp = detail::field(j, "rope_parameters")) {
            require<io_error>(rp->is_object(), f, ": \"rope_parameters\" is not an object");
            theta = detail::num_field(*rp, "rope_theta", f, theta);
            check_rope_type(*rp, "rope_parameters");
        }
        if (const auto* rs = detail::field(j, "rope_scaling")) {
            require<io_error>(rs->is_object(), f, ": \"rope_scaling\" is not an object");
            check_rope_type(*rs, "rope_scaling");
        }
        c.rope_theta = float(theta);
    }
    try {
        c.layer_shape().validate();
    } catch (const shape_error& e) {
        throw io_error(cpet::detail::concat(f, ": ", e.what()));
    }
    require<io_error>(c.layers <= 4096 && c.hidden <= (1 << 20) && c.intermediate <= (1 << 22) && c.vocab_size <= (1 << 24) &&
                          c.max_positions <= (1 << 24) && c.type_vocab <= 4096,
                      f, ": sizes beyond what cpet accepts (layers ≤ 4096, hidden_size ≤ 2^20, intermediate_size ≤ 2^22, "
                      "vocab_size and max_position_embeddings ≤ 2^24, type_vocab_size ≤ 4096)");
    return c;
}

/// Reads `dir/config.json` (or the file itself) for a BERT or LLaMA checkpoint.
inline hf_config read_hf_config(const fs::path& dir_or_file) {
    const fs::path p = fs::is_directory(dir_or_file) ? dir_or_file / "config.json" : dir_or_file;
    return parse_hf_config(read_json(p), p.string());
}

/// The safetensors files of a checkpoint folder (one, or the shards of model.safetensors.index.json), looked up
/// by tensor name.
class checkpoint {
public:
    /// One already open file as a checkpoint (tests, fuzzing).
    static checkpoint of(safetensors_file f) {
        checkpoint c;
        c.dir_ = f.file_name();
        c.files_.push_back(std::make_unique<safetensors_file>(std::move(f)));
        for (const auto& t : c.files_[0]->tensors()) c.where_.emplace(t.name(), 0);
        return c;
    }
    static checkpoint open(const fs::path& dir) {
        checkpoint c;
        c.dir_ = dir.string();
        const fs::path single = dir / "model.safetensors", index = dir / "model.safetensors.index.json";
        if (fs::exists(single)) {
            c.files_.push_back(std::make_unique<safetensors_file>(safetensors_file::open(single)));
        } else if (fs::exists(index)) {
            const auto j = read_json(index);
            const auto* wm = detail::field(j, "weight_map");
            require<io_error>(wm && wm->is_object(), index.string(), ": missing \"weight_map\" object");
            std::map<std::string, std::size_t> shard;
            for (auto& [name, file] : wm->items()) {
                require<io_error>(file.is_string(), index.string(), ": weight_map[\"", name, "\"] is not a file name");
                const auto fn = file.get<std::string>();
                require<io_error>(fn.find('/') == std::string::npos && fn != ".." && fn != ".", index.string(),
                                  ": weight_map[\"", name, "\"] = \"", fn, "\" is not a file in the folder");
                if (!shard.count(fn)) {
                    shard[fn] = c.files_.size();
                    c.files_.push_back(std::make_unique<safetensors_file>(safetensors_file::open(dir / fn)));
                }
            }
        } else {
            throw io_error(cpet::detail::concat(dir.string(), ": no model.safetensors or model.safetensors.index.json"));
        }
        for (std::size_t i = 0; i < c.files_.size(); ++i)
            for (const auto& t : c.files_[i]->tensors()) {
                const auto [it, fresh] = c.where_.emplace(t.name(), i);
                if (!fresh)
                    throw io_error(cpet::detail::concat(c.files_[i]->file_name(), ": tensor '", t.name(),
                                                        "' is also in ", c.files_[it->second]->file_name()));
            }
        return c;
    }

    const std::string& dir() const noexcept { return dir_; }
    const tensor_view* find(const std::string& name) const {
        auto it = where_.find(name);
        return it == where_.end() ? nullptr : files_[it->second]->find(name);
    }
    bool contains(const std::string& name) const { return find(name) != nullptr; }
    const tensor_view& tensor(const std::string& name) const {
        const auto* t = find(name);
        if (!t) throw io_error(cpet::detail::concat(dir_, ": checkpoint has no tensor '", name, "'"));
        return *t;
    }
    /// The file holding `name` (for messages).
    const std::string& file_of(const std::string& name) const { return files_[where_.at(name)]->file_name(); }
    std::size_t size() const noexcept { return where_.size(); }

    /// The checked tensor `name` of shape [rows, cols] and a floating dtype; io_error naming the file and the
    /// tensor when it is absent, not 2-D, of another shape or of another dtype.
    const tensor_view& matrix_tensor(const std::string& name, index_t rows, index_t cols, const char* why) const {
        const auto& t = tensor(name);
        require<io_error>(t.rank() == 2 && t.shape()[0] == std::uint64_t(rows) && t.shape()[1] == std::uint64_t(cols),
                          file_of(name), ": tensor '", name, "' has shape ", t.shape_str(), ", expected [", rows, ", ",
                          cols, "] (", why, ")");
        require<io_error>(is_float_dtype(t.type()), file_of(name), ": tensor '", name, "' has dtype ",
                          dtype_name(t.type()), ", expected F32, F16 or BF16");
        return t;
    }
    /// [rows, cols] in fp32 (see matrix_tensor).
    Matrix<float> matrix(const std::string& name, index_t rows, index_t cols, const char* why = "config.json") const {
        Matrix<float> m;
        matrix_into(name, rows, cols, m, why);
        return m;
    }
    /// The same into `dst`, reusing its storage when it already has the shape (a loader reading N layers of one
    /// shape then touches fresh memory once, not N times).
    void matrix_into(const std::string& name, index_t rows, index_t cols, Matrix<float>& dst,
                     const char* why = "config.json") const {
        const auto& t = matrix_tensor(name, rows, cols, why);
        if (dst.rows() != rows || dst.cols() != cols) dst = Matrix<float>(rows, cols);
        t.to_f32(dst.data());
    }
    /// A zero-copy view of an F32 [rows, cols] tensor in the mapping (nothing when it is another dtype or
    /// misaligned, then the caller copies).
    std::optional<ConstMatrixView<float>> matrix_view(const std::string& name, index_t rows, index_t cols,
                                                      const char* why = "config.json") const {
        const auto& t = matrix_tensor(name, rows, cols, why);
        if (t.type() != dtype::F32 || reinterpret_cast<std::uintptr_t>(t.bytes().data()) % alignof(float) != 0)
            return std::nullopt;
        return ConstMatrixView<float>(reinterpret_cast<const float*>(t.bytes().data()), rows, cols);
    }
    std::vector<float> vector(const std::string& name, index_t n, const char* why = "config.json") const {
        std::vector<float> v;
        vector_into(name, n, v, why);
        return v;
    }
    void vector_into(const std::string& name, index_t n, std::vector<float>& dst, const char* why = "config.json") const {
        const auto& t = tensor(name);
        require<io_error>(t.rank() == 1 && t.shape()[0] == std::uint64_t(n), file_of(name), ": tensor '", name,
                          "' has shape ", t.shape_str(), ", expected [", n, "] (", why, ")");
        require<io_error>(is_float_dtype(t.type()), file_of(name), ": tensor '", name, "' has dtype ",
                          dtype_name(t.type()), ", expected F32, F16 or BF16");
        dst.resize(std::size_t(n));
        t.to_f32(dst.data());
    }

private:
    std::string dir_;
    std::vector<std::unique_ptr<safetensors_file>> files_;
    std::map<std::string, std::size_t> where_;
};

/// Where a family's tensors live under the checkpoint's naming.
struct hf_names {
    model_family family;
    std::string prefix;  ///< "bert." for BERT task checkpoints, "" for BertModel; "model." for LLaMA

    static hf_names detect(const checkpoint& ck, const hf_config& c) {
        if (c.family == model_family::llama) return {c.family, "model."};
        if (ck.contains("bert.embeddings.word_embeddings.weight")) return {c.family, "bert."};
        return {c.family, ""};
    }
    std::string layer(index_t i) const {
        return prefix + (family == model_family::bert ? "encoder.layer." : "layers.") + std::to_string(i) + ".";
    }
};

/// Layer i's dense weights by name into `w` (its storage reused when the shapes already match), every shape
/// checked against the config.
inline void read_layer_weights_into(const checkpoint& ck, const hf_config& c, const hf_names& n, index_t i,
                                    nn::dense_layer_weights& w) {
    const auto s = c.layer_shape();
    const index_t d = s.d_model;
    const std::string p = n.layer(i);
    if (c.family == model_family::bert) {
        ck.matrix_into(p + "attention.self.query.weight", s.q_dim(), d, w.wq);
        ck.vector_into(p + "attention.self.query.bias", s.q_dim(), w.bq);
        ck.matrix_into(p + "attention.self.key.weight", s.kv_dim(), d, w.wk);
        ck.vector_into(p + "attention.self.key.bias", s.kv_dim(), w.bk);
        ck.matrix_into(p + "attention.self.value.weight", s.kv_dim(), d, w.wv);
        ck.vector_into(p + "attention.self.value.bias", s.kv_dim(), w.bv);
        ck.matrix_into(p + "attention.output.dense.weight", d, s.q_dim(), w.wo);
        ck.vector_into(p + "attention.output.dense.bias", d, w.bo);
        ck.vector_into(p + "attention.output.LayerNorm.weight", d, w.norm1_gamma);
        ck.vector_into(p + "attention.output.LayerNorm.bias", d, w.norm1_beta);
        ck.matrix_into(p + "intermediate.dense.weight", s.d_ff, d, w.w_up);
        ck.vector_into(p + "intermediate.dense.bias", s.d_ff, w.b_up);
        ck.matrix_into(p + "output.dense.weight", d, s.d_ff, w.w_down);
        ck.vector_into(p + "output.dense.bias", d, w.b_down);
        ck.vector_into(p + "output.LayerNorm.weight", d, w.norm2_gamma);
        ck.vector_into(p + "output.LayerNorm.bias", d, w.norm2_beta);
    } else {
        ck.matrix_into(p + "self_attn.q_proj.weight", s.q_dim(), d, w.wq);
        ck.matrix_into(p + "self_attn.k_proj.weight", s.kv_dim(), d, w.wk);
        ck.matrix_into(p + "self_attn.v_proj.weight", s.kv_dim(), d, w.wv);
        ck.matrix_into(p + "self_attn.o_proj.weight", d, s.q_dim(), w.wo);
        ck.matrix_into(p + "mlp.gate_proj.weight", s.d_ff, d, w.w_gate);
        ck.matrix_into(p + "mlp.up_proj.weight", s.d_ff, d, w.w_up);
        ck.matrix_into(p + "mlp.down_proj.weight", d, s.d_ff, w.w_down);
        ck.vector_into(p + "input_layernorm.weight", d, w.norm1_gamma);
        ck.vector_into(p + "post_attention_layernorm.weight", d, w.norm2_gamma);
    }
}

/// Layer i's dense weights by name, every shape checked against the config.
inline nn::dense_layer_weights read_layer_weights(const checkpoint& ck, const hf_config& c, const hf_names& n,
                                                  index_t i) {
    nn::dense_layer_weights w;
    read_layer_weights_into(ck, c, n, i, w);
    return w;
}

/// The word table: a view into the mapping kept alive by `keep` when it is F32 and aligned, a copy otherwise.
inline void read_word_table(const checkpoint& ck, const std::string& name, const hf_config& c, nn::embedding_weights& e,
                            const std::shared_ptr<const checkpoint>& keep) {
    if (keep) {
        if (auto v = ck.matrix_view(name, c.vocab_size, c.hidden)) {
            e.word_view = *v;
            e.keep_alive = keep;
            return;
        }
    }
    e.word = ck.matrix(name, c.vocab_size, c.hidden);
}

/// Everything but the layers: embeddings, final norm, heads (model_weights with `layers` empty). With `keep` (the
/// same checkpoint, shared), the word table is borrowed from the mapping rather than copied.
inline nn::model_weights read_non_layer_weights(const checkpoint& ck, const hf_config& c, const hf_names& n,
                                                const std::shared_ptr<const checkpoint>& keep = nullptr) {
    nn::model_weights w;
    w.shape = c.layer_shape();
    const index_t d = c.hidden;
    if (c.family == model_family::bert) {
        const std::string e = n.prefix + "embeddings.";
        read_word_table(ck, e + "word_embeddings.weight", c, w.embeddings, keep);
        w.embeddings.position = ck.matrix(e + "position_embeddings.weight", c.max_positions, d);
        if (c.type_vocab > 0) w.embeddings.token_type = ck.matrix(e + "token_type_embeddings.weight", c.type_vocab, d);
        w.embeddings.norm_gamma = ck.vector(e + "LayerNorm.weight", d);
        w.embeddings.norm_beta = ck.vector(e + "LayerNorm.bias", d);
        w.embeddings.norm_eps = c.eps;
        if (ck.contains("classifier.weight")) {
            const index_t labels = ck.tensor("classifier.weight").rank() == 2
                                       ? index_t(ck.tensor("classifier.weight").shape()[0]) : 0;
            require<io_error>(c.num_labels == 0 || labels == c.num_labels, ck.file_of("classifier.weight"),
                              ": tensor 'classifier.weight' has ", labels, " rows, config.json has ", c.num_labels,
                              " labels");
            w.classifier_w = ck.matrix("classifier.weight", labels, d);
            w.classifier_b = ck.vector("classifier.bias", labels);
            w.pooler_w = ck.matrix(n.prefix + "pooler.dense.weight", d, d);
            w.pooler_b = ck.vector(n.prefix + "pooler.dense.bias", d);
            w.classifier_pool = nn::pooling::cls;
        }
    } else {
        read_word_table(ck, "model.embed_tokens.weight", c, w.embeddings, keep);
        w.final_norm_gamma = ck.vector("model.norm.weight", d);
        if (ck.contains("lm_head.weight")) {
            w.lm_head = ck.matrix("lm_head.weight", c.vocab_size, d);
        } else if (c.tie_word_embeddings) {
            w.lm_head_tied = true;
        }
        if (ck.contains("score.weight")) {
            const auto& t = ck.tensor("score.weight");
            const index_t labels = t.rank() == 2 ? index_t(t.shape()[0]) : 0;
            w.classifier_w = ck.matrix("score.weight", labels, d);
            w.classifier_pool = nn::pooling::last;
        }
    }
    return w;
}

/// Every weight of the checkpoint in `dir`, dense (for calibrated compression, which needs the dense layers).
inline nn::model_weights read_model_weights(const fs::path& dir, hf_config* config_out = nullptr) {
    const auto c = read_hf_config(dir);
    const auto ck = checkpoint::open(dir);
    const auto n = hf_names::detect(ck, c);
    auto w = read_non_layer_weights(ck, c, n);
    for (index_t i = 0; i < c.layers; ++i) w.layers.push_back(read_layer_weights(ck, c, n, i));
    if (config_out) *config_out = c;
    return w;
}

/// Whether layer config C runs checkpoints of `family` the way transformers does.
template <nn::LayerConfig C>
void check_layer_config(const hf_config& c) {
    using nn::norm_placement, nn::norm_kind, nn::ffn_kind, nn::attention_mask;
    if (c.family == model_family::bert) {
        constexpr bool ok = C::placement == norm_placement::post && C::norm == norm_kind::layernorm &&
                            C::ffn == ffn_kind::mlp && C::mask == attention_mask::bidirectional && !C::rope && C::bias;
        require<io_error>(ok, c.file, ": a BERT checkpoint needs a BERT layer config (post-LN LayerNorm, MLP, "
                          "bidirectional, biases, no RoPE; cpet::config::bert<...>)");
        require<io_error>(C::act == c.activation(), c.file, ": hidden_act \"", c.hidden_act, "\" is ",
                          kernels::activation_name(c.activation()), ", the layer config applies ",
                          kernels::activation_name(C::act));
    } else {
        constexpr bool ok = C::placement == norm_placement::pre && C::norm == norm_kind::rmsnorm &&
                            C::ffn == ffn_kind::swiglu && C::mask == attention_mask::causal && C::rope && !C::bias;
        require<io_error>(ok, c.file, ": a LLaMA checkpoint needs a LLaMA layer config (pre-LN RMSNorm, SwiGLU, "
                          "causal, RoPE, no biases; cpet::config::llama<...>)");
    }
}

/// Loads the checkpoint in `dir` (config.json + model.safetensors) as a Model<C>, compressing each layer's linears
/// with C's compression policy right after reading it, so at most one dense layer is held at a time. Policies that
/// need calibration statistics (GPTQ, SmoothQuant) cannot run here: read_model_weights + nn::compress instead.
template <nn::LayerConfig C>
nn::Model<C> load_model(const fs::path& dir, hf_config* config_out = nullptr) {
    const auto c = read_hf_config(dir);
    check_layer_config<C>(c);
    const auto shared = std::make_shared<const checkpoint>(checkpoint::open(dir));
    const checkpoint& ck = *shared;
    const auto n = hf_names::detect(ck, c);
    auto w = read_non_layer_weights(ck, c, n, shared);  // the word table stays in the mapping
    const auto s = c.layer_shape();
    std::vector<typename nn::Model<C>::layer_type> layers;
    layers.reserve(std::size_t(c.layers));
    nn::dense_layer_weights scratch;  // one layer's fp32 weights, reused: fresh pages are touched once
    for (index_t i = 0; i < c.layers; ++i) {
        read_layer_weights_into(ck, c, n, i, scratch);
        layers.emplace_back(scratch, s);
    }
    std::optional<nn::Linear<compress::dense_f32>> lm_head;
    if (w.lm_head_tied)
        lm_head.emplace(compress::dense_f32(w.embeddings.word.empty() ? w.embeddings.word_view
                                                                      : ConstMatrixView<float>(w.embeddings.word.view())));
    else if (!w.lm_head.empty()) lm_head.emplace(compress::dense_f32(w.lm_head.view()));
    std::optional<nn::classification_head> cls;
    if (!w.classifier_w.empty()) {
        nn::classification_head h;
        h.pool = w.classifier_pool;
        if (!w.pooler_w.empty())
            h.pooler = nn::Linear<compress::dense_f32>(compress::dense_f32(w.pooler_w.view()), w.pooler_b, "pooler bias");
        h.classifier = nn::Linear<compress::dense_f32>(compress::dense_f32(w.classifier_w.view()), w.classifier_b,
                                                   "classifier bias");
        cls = std::move(h);
    }
    if (config_out) *config_out = c;
    return nn::Model<C>(nn::Embeddings(std::move(w.embeddings)), typename nn::Model<C>::stack_type(std::move(layers)),
                        w.final_norm_gamma, w.final_norm_beta, s.eps, std::move(lm_head), w.lm_head_tied,
                        std::move(cls));
}

}  // namespace cpet::io
