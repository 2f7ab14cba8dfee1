// tests/io/test_hf_checkpoint.cpp — HuggingFace checkpoints by name: the committed tiny BERT
// (BertForSequenceClassification) and tiny LLaMA (LlamaForCausalLM, GQA, RoPE) made by
// tests/reference/make_references.py load into nn::Model and reproduce transformers' hidden states and logits;
// broken checkpoints are refused with the file, the tensor and the rule.
#include <doctest/doctest.h>

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>

#include "cpet/compress/quantized.hpp"
#include "cpet/io/hf_checkpoint.hpp"
#include "cpet/io/safetensors.hpp"
#include "io/io_testing.hpp"

namespace cpet_test_io_hf_checkpoint {  // each test file's own namespace: the files of a room compile as one unit

namespace fs = std::filesystem;
using namespace cpet;

namespace {

double rel_error(const float* got, const float* ref, std::size_t n) {
    double num = 0, den = 0;
    for (std::size_t i = 0; i < n; ++i) {
        num += (double(got[i]) - ref[i]) * (double(got[i]) - ref[i]);
        den += double(ref[i]) * ref[i];
    }
    return std::sqrt(num / (den > 0 ? den : 1));
}

/// The reference ids [B, S] (and type ids, lengths when present) as a token_batch.
nn::token_batch batch_of(const io::safetensors_file& ref) {
    const auto& ids = ref.tensor("ids");
    nn::token_batch t;
    const auto B = index_t(ids.shape()[0]);
    t.seq_len = index_t(ids.shape()[1]);
    auto v = ids.as<std::int32_t>();
    t.ids.assign(v.begin(), v.end());
    if (const auto* ty = ref.find("type_ids")) {
        auto tv = ty->as<std::int32_t>();
        t.type_ids.assign(tv.begin(), tv.end());
    }
    if (const auto* l = ref.find("lengths")) {
        for (auto x : l->as<std::int32_t>()) t.lengths.push_back(x);
    } else {
        t.lengths.assign(std::size_t(B), t.seq_len);
    }
    return t;
}

fs::path scratch_copy(const fs::path& from, const std::string& name) {
    const auto d = fs::temp_directory_path() / ("cpet_hf_" + std::to_string(::getpid()) + "_" + name);
    fs::remove_all(d);
    fs::create_directories(d);
    for (const auto& e : fs::directory_iterator(from)) fs::copy_file(e.path(), d / e.path().filename());
    return d;
}

std::string slurp(const fs::path& p) {
    std::ifstream in(p);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}
void spit(const fs::path& p, const std::string& s) { std::ofstream(p) << s; }
void replace_in(const fs::path& p, const std::string& from, const std::string& to) {
    auto s = slurp(p);
    const auto at = s.find(from);
    REQUIRE(at != std::string::npos);
    s.replace(at, from.size(), to);
    spit(p, s);
}

/// Rewrites dir/model.safetensors without tensor `drop` (or with `reshape` given a new first dimension).
void rewrite_without(const fs::path& dir, const std::string& drop) {
    std::vector<std::byte> keep;
    {
        const auto f = io::safetensors_file::open(dir / "model.safetensors");
        std::vector<io::tensor_data> ts;
        for (const auto& t : f.tensors())
            if (t.name() != drop) ts.push_back({t.name(), t.type(), t.shape(), t.bytes()});
        keep = io::serialize_safetensors(ts, f.metadata());
    }
    std::ofstream(dir / "model.safetensors", std::ios::binary)
        .write(reinterpret_cast<const char*>(keep.data()), std::streamsize(keep.size()));
}

}  // namespace

TEST_CASE("hf checkpoint: tiny BertForSequenceClassification matches transformers (hidden states and logits)") {
    const auto dir = testing::reference_dir() / "tiny-bert";
    io::hf_config cfg;
    const auto model = io::load_model<config::bert<>>(dir, &cfg);
    CHECK(cfg.family == io::model_family::bert);
    CHECK(cfg.layers == 2);
    CHECK(cfg.num_labels == 3);
    REQUIRE(model.classifier().has_value());
    CHECK(model.classifier()->pooler.has_value());
    CHECK_FALSE(model.has_lm_head());

    const auto ref = io::safetensors_file::open(testing::reference_dir() / "tiny_bert_reference.safetensors");
    const auto t = batch_of(ref);
    CHECK(t.lengths == std::vector<index_t>{9, 5, 7});
    nn::workspace ws;
    const auto h = model.hidden_states(t, ws);
    const auto href = ref.tensor("hidden").to_f32();
    REQUIRE(std::size_t(h.size()) == href.size());
    CHECK(rel_error(h.data(), href.data(), href.size()) < 1e-5);
    const auto logits = model.classify(t, ws);
    const auto lref = ref.tensor("logits").to_f32();
    REQUIRE(std::size_t(logits.size()) == lref.size());
    CHECK(rel_error(logits.data(), lref.data(), lref.size()) < 1e-5);
}

TEST_CASE("hf checkpoint: tiny LlamaForCausalLM (GQA, RoPE, untied head) matches transformers' logits") {
    const auto dir = testing::reference_dir() / "tiny-llama";
    io::hf_config cfg;
    const auto model = io::load_model<config::llama<>>(dir, &cfg);
    CHECK(cfg.family == io::model_family::llama);
    CHECK(cfg.kv_heads == 2);
    CHECK(cfg.heads == 4);
    CHECK(model.has_lm_head());
    CHECK_FALSE(model.lm_head_tied());
    CHECK(model.embeddings().borrowed());  // the F32 table is read in place from the mapping, never copied
    const auto ref = io::safetensors_file::open(testing::reference_dir() / "tiny_llama_reference.safetensors");
    const auto t = batch_of(ref);
    nn::workspace ws;
    const auto logits = model.logits(t, ws);
    const auto lref = ref.tensor("logits").to_f32();
    REQUIRE(std::size_t(logits.size()) == lref.size());
    CHECK(rel_error(logits.data(), lref.data(), lref.size()) < 1e-5);

    // Compressed as it loads: int8 per-channel weights, a quarter of the stack's bytes (plus scales), logits close.
    const auto q = io::load_model<config::llama<compress::int8_per_channel>>(dir);
    CHECK(q.stack_bytes() < model.stack_bytes() / 3);
    const auto lq = q.logits(t, ws);
    const double e = rel_error(lq.data(), lref.data(), lref.size());
    CHECK(e < 2e-2);
    CHECK(e > 0);
}

TEST_CASE("hf checkpoint: BF16 and F16 checkpoints load (converted to fp32) and stay close to the F32 logits") {
    const auto src = testing::reference_dir() / "tiny-llama";
    const auto ref = io::safetensors_file::open(testing::reference_dir() / "tiny_llama_reference.safetensors");
    const auto lref = ref.tensor("logits").to_f32();
    for (const auto dt : {io::dtype::BF16, io::dtype::F16}) {
        CAPTURE(std::string(io::dtype_name(dt)));
        const auto d = scratch_copy(src, std::string(io::dtype_name(dt)));
        std::vector<std::vector<std::uint16_t>> store;
        std::vector<io::tensor_data> ts;
        {
            const auto f = io::safetensors_file::open(src / "model.safetensors");
            for (const auto& t : f.tensors()) {
                const auto v = t.to_f32();
                auto& h = store.emplace_back(v.size());
                for (std::size_t i = 0; i < v.size(); ++i) h[i] = dt == io::dtype::BF16 ? io::f32_to_bf16(v[i]) : io::f32_to_f16(v[i]);
                ts.push_back({t.name(), dt, t.shape(), std::as_bytes(std::span<const std::uint16_t>(h))});
            }
        }
        io::save_safetensors(d / "model.safetensors", ts);
        const auto m = io::load_model<config::llama<>>(d);
        CHECK_FALSE(m.embeddings().borrowed());  // not F32: copied and converted
        nn::workspace ws;
        const auto l = m.logits(batch_of(ref), ws);
        const double e = rel_error(l.data(), lref.data(), lref.size());
        CHECK(e > 0);
        CHECK(e < (dt == io::dtype::BF16 ? 3e-2 : 3e-3));  // 8 vs 11 significant bits in every weight
        fs::remove_all(d);
    }
}

TEST_CASE("hf checkpoint: a broken checkpoint is refused naming the file, the tensor and the rule") {
    const auto src = testing::reference_dir() / "tiny-llama";
    SUBCASE("missing tensor") {
        const auto d = scratch_copy(src, "missing");
        rewrite_without(d, "model.layers.1.mlp.up_proj.weight");
        CHECK_THROWS_WITH_AS(io::load_model<config::llama<>>(d),
                             doctest::Contains("has no tensor 'model.layers.1.mlp.up_proj.weight'"), io_error);
        fs::remove_all(d);
    }
    SUBCASE("missing final norm and missing lm_head without tying: no LM head") {
        const auto d = scratch_copy(src, "nohead");
        rewrite_without(d, "lm_head.weight");
        const auto m = io::load_model<config::llama<>>(d);
        CHECK_FALSE(m.has_lm_head());
        nn::workspace ws;
        nn::token_batch t{{5, 6}, {}, {2}, 2};
        CHECK_THROWS_WITH_AS((void)m.logits(t, ws), doctest::Contains("no LM head"), format_error);
        replace_in(d / "config.json", "\"tie_word_embeddings\": false", "\"tie_word_embeddings\": true");
        const auto tied = io::load_model<config::llama<>>(d);
        CHECK(tied.lm_head_tied());
        CHECK(tied.logits(t, ws).cols() == 256);
        fs::remove_all(d);
    }
    SUBCASE("tensor of the wrong shape for config.json") {
        const auto d = scratch_copy(src, "shape");
        replace_in(d / "config.json", "\"intermediate_size\": 96", "\"intermediate_size\": 97");
        CHECK_THROWS_WITH_AS(io::load_model<config::llama<>>(d),
                             doctest::Contains("model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' has "
                                               "shape [96, 64], expected [97, 64] (config.json)"),
                             io_error);
        fs::remove_all(d);
    }
    SUBCASE("config.json problems") {
        const auto d = scratch_copy(src, "config");
        const auto good = slurp(d / "config.json");
        replace_in(d / "config.json", "\"model_type\": \"llama\"", "\"model_type\": \"gpt_neox\"");
        CHECK_THROWS_WITH_AS(io::load_model<config::llama<>>(d), doctest::Contains("model_type \"gpt_neox\" is not supported"),
                             io_error);
        spit(d / "config.json", good);
        replace_in(d / "config.json", "\"rope_type\": \"default\"", "\"rope_type\": \"linear\"");
        CHECK_THROWS_WITH_AS(io::load_model<config::llama<>>(d), doctest::Contains("rope_type \"linear\" is not supported"),
                             io_error);
        spit(d / "config.json", good);
        replace_in(d / "config.json", "\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3");
        CHECK_THROWS_WITH_AS(io::load_model<config::llama<>>(d), doctest::Contains("not a multiple of num_key_value_heads 3"),
                             io_error);
        spit(d / "config.json", good);
        replace_in(d / "config.json", "\"hidden_size\": 64", "\"hidden_size\": \"64\"");
        CHECK_THROWS_WITH_AS(io::load_model<config::llama<>>(d),
                             doctest::Contains("\"hidden_size\" is \"64\", expected a non-negative integer"), io_error);
        spit(d / "config.json", good);
        replace_in(d / "config.json", "{", "[");
        CHECK_THROWS_WITH_AS(io::load_model<config::llama<>>(d), doctest::Contains("config.json: not valid JSON"), io_error);
        fs::remove(d / "config.json");
        CHECK_THROWS_WITH_AS(io::load_model<config::llama<>>(d), doctest::Contains("config.json: cannot open"), io_error);
        fs::remove_all(d);
    }
    SUBCASE("the other family's layer config") {
        CHECK_THROWS_WITH_AS(io::load_model<config::bert<>>(src), doctest::Contains("a LLaMA checkpoint needs a LLaMA layer config"),
                             io_error);
        CHECK_THROWS_WITH_AS(io::load_model<config::llama<>>(testing::reference_dir() / "tiny-bert"),
                             doctest::Contains("a BERT checkpoint needs a BERT layer config"), io_error);
    }
    SUBCASE("no weights in the folder; a shard index naming a missing shard") {
        const auto d = scratch_copy(src, "shards");
        fs::rename(d / "model.safetensors", d / "part-1.safetensors");
        CHECK_THROWS_WITH_AS(io::load_model<config::llama<>>(d), doctest::Contains("no model.safetensors"), io_error);
        std::string idx = "{\"metadata\":{},\"weight_map\":{";
        {
            const auto f = io::safetensors_file::open(d / "part-1.safetensors");
            for (const auto& t : f.tensors()) idx += "\"" + t.name() + "\":\"part-1.safetensors\",";
        }
        idx.back() = '}';
        spit(d / "model.safetensors.index.json", idx + "}");
        const auto m = io::load_model<config::llama<>>(d);  // a sharded checkpoint (one shard) loads
        CHECK(m.has_lm_head());
        replace_in(d / "model.safetensors.index.json", "\"lm_head.weight\":\"part-1.safetensors\"",
                   "\"lm_head.weight\":\"part-2.safetensors\"");
        CHECK_THROWS_WITH_AS(io::load_model<config::llama<>>(d), doctest::Contains("part-2.safetensors: cannot open"),
                             io_error);
        replace_in(d / "model.safetensors.index.json", "\"part-2.safetensors\"", "\"../x.safetensors\"");
        CHECK_THROWS_WITH_AS(io::load_model<config::llama<>>(d), doctest::Contains("is not a file in the folder"), io_error);
        fs::remove_all(d);
    }
}

TEST_CASE("nn::Model: token ids outside the vocabulary, over-long sequences and bad batches are refused") {
    const auto model = io::load_model<config::bert<>>(testing::reference_dir() / "tiny-bert");
    nn::workspace ws;
    nn::token_batch t{{1, 2, 120}, {}, {3}, 3};
    CHECK_THROWS_WITH_AS((void)model.hidden_states(t, ws), doctest::Contains("token id 120 of sequence 0 at 2 is outside the vocabulary [0, 120)"),
                         shape_error);
    t.ids = {1, 2, 3};
    t.type_ids = {0, 0, 2};
    CHECK_THROWS_WITH_AS((void)model.hidden_states(t, ws), doctest::Contains("token type id 2"), shape_error);
    nn::token_batch longer;
    longer.seq_len = 41;
    longer.ids.assign(41, 5);
    longer.lengths = {41};
    CHECK_THROWS_WITH_AS((void)model.hidden_states(longer, ws), doctest::Contains("the position table holds 40"),
                         shape_error);
    nn::token_batch wrong{{1, 2, 3}, {}, {2, 2}, 2};
    CHECK_THROWS_WITH_AS((void)model.hidden_states(wrong, ws), doctest::Contains("has 3 ids, expected 4"), shape_error);
    // Padding ids are never looked up: garbage in padded slots is fine.
    nn::token_batch padded{{1, 2, -7, 3, 4, 99999}, {}, {2, 2}, 3};
    const auto h = model.hidden_states(padded, ws);
    for (index_t c = 0; c < h.cols(); ++c) CHECK(h(2, c) == 0.f);
}

}  // namespace cpet_test_io_hf_checkpoint
