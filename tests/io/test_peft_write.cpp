// tests/io/test_peft_write.cpp — cpet writes PEFT IA3 and prefix-tuning adapters: a PEFT-made adapter read, written
// by cpet and read again gives the same modules (bit for bit; RoPE prefix keys within fp32 rounding), the files are
// PEFT's layout, and bad input is refused with nothing written. With CPET_WRITE_ADAPTERS=dir the written adapters
// go to dir/llama_ia3, dir/bert_prefix, dir/llama_prefix with outputs beside them (cpet_outputs.safetensors: PEFT's
// reference for IA3, cpet's own outputs from the written-and-read-back prefix), for make_references.py
// --check-cpet-adapter dir/*, which loads cpet's files in PEFT and compares.
#include <doctest/doctest.h>

#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "cpet/io/hf_checkpoint.hpp"
#include "cpet/io/peft.hpp"
#include "io/io_testing.hpp"

namespace cpet_test_io_peft_write {  // each test file's own namespace: the files of a room compile as one unit

namespace fs = std::filesystem;
using namespace cpet;

TEST_CASE("peft IA3: cpet writes what it read, PEFT's layout, bit for bit") {
    io::peft_base llama;  // the tiny LLaMA of tests/reference (d 64, GQA kv_dim 32, d_ff 96, 2 layers)
    llama.family = io::model_family::llama;
    llama.layers = 2;
    llama.prefix = "model.";
    llama.dims = pet::layer_dims{64, 64, 32, 96, true, false, false};
    const auto src = testing::reference_dir() / "peft_llama_ia3";
    const auto a = io::read_peft_ia3(src, llama);
    const char* env = std::getenv("CPET_WRITE_ADAPTERS");
    const fs::path d = env && *env ? fs::path(env) / "llama_ia3"
                                   : fs::temp_directory_path() / ("cpet_ia3_" + std::to_string(::getpid()));
    io::write_peft_ia3(d, a, llama, "tiny-llama");
    const auto b = io::read_peft_ia3(d, llama);
    for (std::size_t l = 0; l < a.size(); ++l)
        for (int t = 0; t < pet::target_count; ++t) CHECK(a[l].l[std::size_t(t)] == b[l].l[std::size_t(t)]);
    CHECK(b[1].l[std::size_t(pet::target::down)].size() == 96);
    // Same tensor names and shapes as PEFT wrote.
    const auto fp = io::safetensors_file::open(src / "adapter_model.safetensors");
    const auto fc = io::safetensors_file::open(d / "adapter_model.safetensors");
    REQUIRE(fc.size() == fp.size());
    for (const auto& t : fp.tensors()) {
        CAPTURE(t.name());
        REQUIRE(fc.contains(t.name()));
        CHECK(fc.tensor(t.name()).shape() == t.shape());
    }
    if (env && *env) {
        fs::copy_file(testing::reference_dir() / "peft_llama_ia3_reference.safetensors", d / "cpet_outputs.safetensors",
                      fs::copy_options::overwrite_existing);
        MESSAGE("wrote " << d.string() << " for make_references.py --check-cpet-adapter");
    } else {
        fs::remove_all(d);
    }
    CHECK_THROWS_WITH_AS(io::write_peft_ia3(d, {a[0]}, llama), doctest::Contains("1 layers of modules for a 2-layer model"),
                         io_error);
}

namespace {

fs::path ref_dir() { return testing::reference_dir(); }

double rel_error(const Matrix<float>& got, const std::vector<float>& ref) {
    REQUIRE(std::size_t(got.size()) == ref.size());
    double num = 0, den = 0;
    for (std::size_t i = 0; i < ref.size(); ++i) {
        const double d = double(got.data()[i]) - ref[i];
        num += d * d;
        den += double(ref[i]) * ref[i];
    }
    return std::sqrt(num / den);
}

std::vector<float> reference(const std::string& name, const char* tensor) {
    return io::safetensors_file::open(ref_dir() / ("peft_" + name + "_reference.safetensors")).tensor(tensor).to_f32();
}

// The reference batches without token types (PEFT drops token_type_ids with prompt learning).
nn::token_batch batch_of(const char* file, bool lengths_from_file) {
    const auto ref = io::safetensors_file::open(ref_dir() / file);
    nn::token_batch t;
    const auto& ids = ref.tensor("ids");
    t.seq_len = index_t(ids.shape()[1]);
    auto v = ids.as<std::int32_t>();
    t.ids.assign(v.begin(), v.end());
    if (lengths_from_file)
        for (auto x : ref.tensor("lengths").as<std::int32_t>()) t.lengths.push_back(x);
    else
        t.lengths.assign(ids.shape()[0], t.seq_len);
    return t;
}

// Where an adapter goes: CPET_WRITE_ADAPTERS/name (kept for make_references.py), else a scratch folder.
fs::path out_dir(const std::string& name, bool& keep) {
    const char* env = std::getenv("CPET_WRITE_ADAPTERS");
    keep = env && *env;
    const auto d = keep ? fs::path(env) / name : fs::temp_directory_path() / ("cpet_" + name + "_" + std::to_string(::getpid()));
    fs::remove_all(d);
    return d;
}

// cpet's outputs beside the adapter: make_references.py compares PEFT's outputs on the written adapter with
// these, and with the reference of the PEFT adapter they came from (metadata "reference").
void save_outputs(const fs::path& d, const char* key, const Matrix<float>& out, const std::string& ref_name) {
    io::save_safetensors(d / "cpet_outputs.safetensors",
                         {io::make_tensor(key, {std::uint64_t(out.rows()), std::uint64_t(out.cols())},
                                          std::span<const float>(out.data(), std::size_t(out.size())))},
                         {{"reference", "peft_" + ref_name + "_reference.safetensors"}});
    MESSAGE("wrote " << d.string() << " for make_references.py --check-cpet-adapter");
}

bool same_bits(const Matrix<float>& a, const Matrix<float>& b) {
    return a.rows() == b.rows() && a.cols() == b.cols() &&
           std::equal(a.data(), a.data() + a.size(), b.data(), [](float x, float y) {
               return std::bit_cast<std::uint32_t>(x) == std::bit_cast<std::uint32_t>(y);
           });
}

float max_abs_diff(const Matrix<float>& a, const Matrix<float>& b) {
    REQUIRE(a.size() == b.size());
    float m = 0;
    for (index_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a.data()[i] - b.data()[i]));
    return m;
}

}  // namespace

TEST_CASE("peft prefix on BERT: cpet writes what it read bit for bit, PEFT's config, PEFT's outputs") {
    const auto model = io::load_model<config::bert<compress::dense>>(ref_dir() / "tiny-bert");
    const auto base = io::peft_base::of(model);
    const auto src = ref_dir() / "peft_bert_prefix";
    const auto a = io::read_peft_prefix(src, base);
    bool keep = false;
    const auto d = out_dir("bert_prefix", keep);
    io::write_peft_prefix(d, a, base, "tiny-bert");
    const auto b = io::read_peft_prefix(d, base);
    CHECK(b.position_offset == a.position_offset);
    REQUIRE(b.layers.size() == a.layers.size());
    for (std::size_t l = 0; l < a.layers.size(); ++l) {
        CHECK(same_bits(a.layers[l].k, b.layers[l].k));
        CHECK(same_bits(a.layers[l].v, b.layers[l].v));
    }
    // No rotation on BERT: the file's bytes are PEFT's own.
    const auto fp = io::safetensors_file::open(src / "adapter_model.safetensors");
    const auto fc = io::safetensors_file::open(d / "adapter_model.safetensors");
    REQUIRE(fc.size() == 1);
    CHECK(fc.tensor("prompt_embeddings").shape() == fp.tensor("prompt_embeddings").shape());
    CHECK(fc.tensor("prompt_embeddings").to_f32() == fp.tensor("prompt_embeddings").to_f32());
    // The config carries PEFT's fields with PEFT's values (only the name and PEFT's version stamp differ).
    auto want = io::read_json(src / "adapter_config.json");
    auto got = io::read_json(d / "adapter_config.json");
    CHECK(got["base_model_name_or_path"] == "tiny-bert");
    for (auto* j : {&want, &got}) {
        j->erase("base_model_name_or_path");
        j->erase("peft_version");
    }
    CHECK(got.dump() == want.dump());
    auto t = batch_of("tiny_bert_reference.safetensors", true);
    t.position_offset = b.position_offset;
    nn::workspace ws;
    const auto h = model.hidden_states(t, ws, b.layers);
    CHECK(rel_error(h, reference("bert_prefix", "hidden")) < 1e-5);
    if (keep) save_outputs(d, "hidden", h, "bert_prefix");
    else fs::remove_all(d);
}

TEST_CASE("peft prefix on LLaMA (RoPE): the re-based keys rotated back, read again within fp32 rounding") {
    const auto lm = io::load_model<config::llama<compress::dense>>(ref_dir() / "tiny-llama");
    const auto base = io::peft_base::of(lm);
    REQUIRE(base.rope);
    const auto src = ref_dir() / "peft_llama_prefix";
    const auto a = io::read_peft_prefix(src, base);
    bool keep = false;
    const auto d = out_dir("llama_prefix", keep);
    io::write_peft_prefix(d, a, base, "tiny-llama");
    const auto b = io::read_peft_prefix(d, base);
    CHECK(b.position_offset == 0);
    REQUIRE(b.layers.size() == 2);
    for (std::size_t l = 0; l < 2; ++l) {
        CHECK(same_bits(a.layers[l].v, b.layers[l].v));  // values are never rotated
        // Keys: R_{-P}(float(R_{+P} k')) — two rotations, each result rounded to float: a few ulps of |k| ≲ 2.
        CHECK(max_abs_diff(a.layers[l].k, b.layers[l].k) < 2e-6f);
    }
    // The written file is PEFT's rows again (to fp32 rounding), not cpet's re-based ones.
    const auto want = io::safetensors_file::open(src / "adapter_model.safetensors").tensor("prompt_embeddings").to_f32();
    const auto got = io::safetensors_file::open(d / "adapter_model.safetensors").tensor("prompt_embeddings").to_f32();
    REQUIRE(got.size() == want.size());
    float worst = 0;
    for (std::size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::abs(got[i] - want[i]));
    CHECK(worst < 2e-6f);
    const auto cfg = io::read_json(d / "adapter_config.json");
    CHECK(cfg["peft_type"] == "PREFIX_TUNING");
    CHECK(cfg["task_type"] == "CAUSAL_LM");
    CHECK(cfg["num_virtual_tokens"] == 3);
    CHECK(cfg["num_layers"] == 2);
    CHECK(cfg["token_dim"] == 32);            // kv_dim (GQA): 2 kv heads of 16
    CHECK(cfg["num_attention_heads"] == 2);   // PEFT counts the kv heads
    CHECK(cfg["encoder_hidden_size"] == 32);
    CHECK(cfg["prefix_projection"] == false);
    CHECK(cfg["num_transformer_submodules"] == 1);
    nn::workspace ws;
    const auto logits = lm.logits(batch_of("tiny_llama_reference.safetensors", false), ws, b.layers);
    CHECK(rel_error(logits, reference("llama_prefix", "logits")) < 1e-5);
    if (keep) save_outputs(d, "logits", logits, "llama_prefix");
    else fs::remove_all(d);
}

TEST_CASE("peft prefix: cpet's own modules written for a RoPE base read back to fp32 rounding") {
    io::peft_base llama;  // the tiny LLaMA's shape without loading it: 3 layers, kv_dim 32 in heads of 16
    llama.family = io::model_family::llama;
    llama.layers = 3;
    llama.prefix = "model.";
    llama.dims = pet::layer_dims{64, 64, 32, 96, true, false, false};
    llama.rope = true;
    llama.head_dim = 16;
    std::vector<pet::prefix_tuning::modules> mods;
    for (index_t l = 0; l < 3; ++l) mods.push_back(pet::prefix_tuning::make(llama.dims, {5}, 40 + std::uint64_t(l)));
    bool keep = false;
    const auto d = out_dir("llama_prefix_own", keep);
    io::write_peft_prefix(d, mods, llama);
    const auto back = io::read_peft_prefix(d, llama);
    REQUIRE(back.layers.size() == 3);
    for (std::size_t l = 0; l < 3; ++l) {
        CHECK(same_bits(mods[l].v, back.layers[l].v));
        CHECK(max_abs_diff(mods[l].k, back.layers[l].k) < 1e-6f);  // |k| ≤ 1
    }
    CHECK(io::read_json(d / "adapter_config.json")["num_virtual_tokens"] == 5);
    fs::remove_all(d);
    // The same modules on a learned-position base: exact, and PEFT's offset P is what the reader reports.
    io::peft_base bert = llama;
    bert.family = io::model_family::bert;
    bert.prefix = "";
    bert.rope = false;
    io::write_peft_prefix(d, mods, bert, "", "SEQ_CLS");
    const auto bb = io::read_peft_prefix(d, bert);
    CHECK(bb.position_offset == 5);
    for (std::size_t l = 0; l < 3; ++l) CHECK((same_bits(mods[l].k, bb.layers[l].k) && same_bits(mods[l].v, bb.layers[l].v)));
    CHECK(io::read_json(d / "adapter_config.json")["task_type"] == "SEQ_CLS");
    fs::remove_all(d);
}

TEST_CASE("peft prefix: inconsistent or empty prefixes are refused naming the problem, nothing written") {
    io::peft_base base;
    base.family = io::model_family::llama;
    base.layers = 2;
    base.prefix = "model.";
    base.dims = pet::layer_dims{64, 64, 32, 96, true, false, false};
    base.rope = true;
    base.head_dim = 16;
    const auto good = [&] {
        io::peft_prefix p;
        for (index_t l = 0; l < 2; ++l) p.layers.push_back(pet::prefix_tuning::make(base.dims, {3}, std::uint64_t(l)));
        return p;
    };
    const auto d = fs::temp_directory_path() / ("cpet_prefix_bad_" + std::to_string(::getpid()));
    fs::remove_all(d);
    auto refused = [&](const io::peft_prefix& p, const io::peft_base& b, const char* says, const char* task = "") {
        CAPTURE(says);
        CHECK_THROWS_WITH_AS(io::write_peft_prefix(d, p, b, "", task), doctest::Contains(says), io_error);
        CHECK_FALSE(fs::exists(d));
    };
    refused(io::peft_prefix{}, base, "the prefix has no layers");
    {
        auto p = good();
        p.layers.pop_back();
        refused(p, base, "1 layers of prefix rows for a 2-layer model");
    }
    {
        auto p = good();
        p.layers[1] = {};
        refused(p, base, "layer 1 has no prefix rows");
    }
    {
        auto p = good();
        p.layers[1] = pet::prefix_tuning::make(base.dims, {4}, 7);
        refused(p, base, "layer 1 holds keys 4x32 and values 4x32, but layer 0 has 3 rows");
    }
    {
        auto p = good();
        auto wide = base.dims;
        wide.kv_dim = 64;
        p.layers[0] = pet::prefix_tuning::make(wide, {3}, 7);
        refused(p, base, "layer 0 holds keys 3x64 and values 3x64, expected [P, 32] (kv_dim of the model)");
    }
    {
        auto p = good();
        p.layers[1].v = Matrix<float>(2, 32);
        refused(p, base, "layer 1 holds keys 3x32 and values 2x32");
    }
    {
        auto p = good();
        p.position_offset = 3;
        refused(p, base, "position_offset is 3, expected 0");
        auto bert = base;
        bert.rope = false;
        bert.family = io::model_family::bert;
        p.position_offset = 0;
        refused(p, bert, "position_offset is 0, expected 3");
    }
    {
        auto b = base;
        b.head_dim = 12;
        refused(good(), b, "head_dim 12 does not split kv_dim 32 into rotary heads");
    }
    refused(good(), base, "task_type \"SEQ_2_SEQ_LM\" is not one of PEFT's", "SEQ_2_SEQ_LM");
    // The good prefix is written.
    io::write_peft_prefix(d, good(), base);
    CHECK(fs::exists(d / "adapter_model.safetensors"));
    CHECK(fs::exists(d / "adapter_config.json"));
    fs::remove_all(d);
}

}  // namespace cpet_test_io_peft_write
