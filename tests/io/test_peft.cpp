// tests/io/test_peft.cpp — PEFT adapters made by real PEFT 0.21 (tests/reference/peft_*, weights randomised by
// make_references.py) load into cpet's PET modules and reproduce PEFT's outputs on the tiny BERT and LLaMA; cpet's
// LoRA files read back bit-exact (and, written with CPET_WRITE_ADAPTERS=dir, load in PEFT: make_references.py
// --check-cpet-adapter dir/*); malformed or unsupported adapters are refused naming the file and the rule.
#include <doctest/doctest.h>

#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "cpet/io/hf_checkpoint.hpp"
#include "cpet/io/peft.hpp"
#include "cpet/io/safetensors.hpp"
#include "io/io_testing.hpp"

namespace cpet_test_io_peft {  // each test file's own namespace: the files of a room compile as one unit

namespace fs = std::filesystem;
using namespace cpet;

namespace {

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

fs::path ref_dir() { return testing::reference_dir(); }

nn::token_batch bert_batch(bool types = true) {
    const auto ref = io::safetensors_file::open(ref_dir() / "tiny_bert_reference.safetensors");
    nn::token_batch t;
    const auto& ids = ref.tensor("ids");
    t.seq_len = index_t(ids.shape()[1]);
    auto v = ids.as<std::int32_t>();
    t.ids.assign(v.begin(), v.end());
    if (types) {
        auto ty = ref.tensor("type_ids").as<std::int32_t>();
        t.type_ids.assign(ty.begin(), ty.end());
    }
    for (auto x : ref.tensor("lengths").as<std::int32_t>()) t.lengths.push_back(x);
    return t;
}
nn::token_batch llama_batch() {
    const auto ref = io::safetensors_file::open(ref_dir() / "tiny_llama_reference.safetensors");
    nn::token_batch t;
    const auto& ids = ref.tensor("ids");
    t.seq_len = index_t(ids.shape()[1]);
    auto v = ids.as<std::int32_t>();
    t.ids.assign(v.begin(), v.end());
    t.lengths.assign(ids.shape()[0], t.seq_len);
    return t;
}
std::vector<float> reference(const std::string& name, const char* tensor) {
    return io::safetensors_file::open(ref_dir() / ("peft_" + name + "_reference.safetensors")).tensor(tensor).to_f32();
}

fs::path scratch(const std::string& name) {
    const auto d = fs::temp_directory_path() / ("cpet_peft_" + std::to_string(::getpid()) + "_" + name);
    fs::remove_all(d);
    fs::create_directories(d);
    return d;
}
fs::path copy_of(const std::string& adapter) {
    const auto d = scratch(adapter);
    for (const auto& e : fs::directory_iterator(ref_dir() / ("peft_" + adapter))) fs::copy_file(e.path(), d / e.path().filename());
    return d;
}
void edit_config(const fs::path& d, const std::function<void(nlohmann::json&)>& f) {
    auto j = io::read_json(d / "adapter_config.json");
    f(j);
    std::ofstream(d / "adapter_config.json") << j.dump(2);
}

using bert_lora_model = nn::Model<config::bert<compress::dense>>;
using llama_lora_model = nn::Model<config::llama<compress::dense>>;

/// Writes the adapter and cpet's own outputs with it where CPET_WRITE_ADAPTERS points, for the Python check.
void export_for_peft(const char* name, const auto& modules, const io::peft_base& base, const Matrix<float>& out,
                     const char* tensor) {
    const char* env = std::getenv("CPET_WRITE_ADAPTERS");
    if (!env || !*env) return;
    using M = std::decay_t<decltype(modules[0])>;
    const auto d = fs::path(env) / name;
    if constexpr (std::is_same_v<M, pet::lora::modules>)
        io::write_peft_lora<pet::lora>(d, modules, base, "cpet");
    else
        io::write_peft_lora<pet::rslora>(d, modules, base, "cpet");
    io::save_safetensors(d / "cpet_outputs.safetensors",
                         {io::tensor_data{tensor, io::dtype::F32, {std::uint64_t(out.rows()), std::uint64_t(out.cols())},
                                          std::as_bytes(std::span<const float>(out.data(), std::size_t(out.size())))}});
    MESSAGE("wrote " << d.string() << " for make_references.py --check-cpet-adapter");
}

}  // namespace

TEST_CASE("peft LoRA on BERT (rank_pattern, alpha_pattern): PEFT's hidden states; cpet's file reads back bit-exact") {
    const auto model = io::load_model<config::bert<compress::dense>>(ref_dir() / "tiny-bert");
    const auto base = io::peft_base::of(model);
    const auto tasks = io::read_peft_lora<pet::lora>(ref_dir() / "peft_bert_lora", base);
    REQUIRE(tasks.size() == 2);
    CHECK(tasks[0].rank(pet::target::q) == 4);
    CHECK(tasks[0].rank(pet::target::k) == 2);  // rank_pattern
    CHECK(tasks[1].rank(pet::target::up) == 4);
    CHECK(tasks[1].rank(pet::target::down) == 0);
    const auto t = bert_batch();
    nn::workspace ws;
    const auto h = model.hidden_states(t, ws, tasks);
    CHECK(rel_error(h, reference("bert_lora", "hidden")) < 1e-5);
    // Without the adapter the outputs differ (the adapter matters).
    const auto plain = io::load_model<config::bert<>>(ref_dir() / "tiny-bert");
    CHECK(rel_error(plain.hidden_states(t, ws), reference("bert_lora", "hidden")) > 1e-2);

    const auto d = scratch("bert_lora_rt");
    io::write_peft_lora<pet::lora>(d, tasks, base, "tiny-bert");
    const auto again = io::read_peft_lora<pet::lora>(d, base);
    for (std::size_t l = 0; l < tasks.size(); ++l)
        for (int ti = 0; ti < pet::target_count; ++ti) {
            const auto tg = pet::target(ti);
            REQUIRE(again[l].rank(tg) == tasks[l].rank(tg));
            if (!tasks[l].rank(tg)) continue;
            CHECK(std::memcmp(again[l].A(tg).data(), tasks[l].A(tg).data(), sizeof(float) * std::size_t(tasks[l].A(tg).size())) == 0);
            CHECK(std::memcmp(again[l].B(tg).data(), tasks[l].B(tg).data(), sizeof(float) * std::size_t(tasks[l].B(tg).size())) == 0);
            CHECK(again[l].lowrank_scale(tg) == tasks[l].lowrank_scale(tg));
        }
    const auto h2 = model.hidden_states(t, ws, again);
    CHECK(std::memcmp(h2.data(), h.data(), sizeof(float) * std::size_t(h.size())) == 0);
    export_for_peft("bert_lora", tasks, base, h, "hidden");
    fs::remove_all(d);
}

TEST_CASE("peft rsLoRA on LLaMA (regex target_modules, all seven linears, rank_pattern): PEFT's logits") {
    const auto model = io::load_model<config::llama<compress::dense>>(ref_dir() / "tiny-llama");
    const auto base = io::peft_base::of(model);
    const auto tasks = io::read_peft_lora<pet::rslora>(ref_dir() / "peft_llama_lora", base);
    CHECK(tasks[0].targets() == pet::target_set::all());
    CHECK(tasks[1].rank(pet::target::down) == 2);
    const auto t = llama_batch();
    nn::workspace ws;
    const auto logits = model.logits(t, ws, tasks);
    CHECK(rel_error(logits, reference("llama_lora", "logits")) < 1e-5);
    export_for_peft("llama_lora", tasks, base, logits, "logits");
    // Read as plain LoRA, the file's use_rslora is refused with the type to use.
    CHECK_THROWS_WITH_AS(io::read_peft_lora<pet::lora>(ref_dir() / "peft_llama_lora", base),
                         doctest::Contains("use_rslora is true: read it as pet::rslora"), io_error);
}

TEST_CASE("peft IA3 on LLaMA and BERT (k, v outputs; down input as a feed-forward module): PEFT's outputs") {
    {
        const auto model = io::load_model<config::llama<compress::dense>>(ref_dir() / "tiny-llama");
        const auto tasks = io::read_peft_ia3(ref_dir() / "peft_llama_ia3", io::peft_base::of(model));
        nn::workspace ws;
        CHECK(rel_error(model.logits(llama_batch(), ws, tasks), reference("llama_ia3", "logits")) < 1e-5);
    }
    {
        const auto model = io::load_model<config::bert<compress::dense>>(ref_dir() / "tiny-bert");
        const auto tasks = io::read_peft_ia3(ref_dir() / "peft_bert_ia3", io::peft_base::of(model));
        nn::workspace ws;
        CHECK(rel_error(model.hidden_states(bert_batch(), ws, tasks), reference("bert_ia3", "hidden")) < 1e-5);
    }
}

TEST_CASE("peft prefix tuning on BERT: PEFT's hidden states with the real tokens after the prefix positions") {
    const auto model = io::load_model<config::bert<compress::dense>>(ref_dir() / "tiny-bert");
    const auto base = io::peft_base::of(model);
    const auto p = io::read_peft_prefix(ref_dir() / "peft_bert_prefix", base);
    CHECK(p.position_offset == 3);
    CHECK(p.layers[1].length() == 3);
    auto t = bert_batch(false);  // PEFT ignores token_type_ids with prompt learning
    t.position_offset = p.position_offset;
    nn::workspace ws;
    const auto ref = reference("bert_prefix", "hidden");
    CHECK(rel_error(model.hidden_states(t, ws, p.layers), ref) < 1e-5);
    t.position_offset = 0;  // cpet's own convention (positions from 0) is not PEFT's
    CHECK(rel_error(model.hidden_states(t, ws, p.layers), ref) > 1e-3);

}

TEST_CASE("peft prefix tuning on LLaMA (RoPE, GQA): PEFT's logits, its position shift folded into the prefix keys") {
    const auto lm = io::load_model<config::llama<compress::dense>>(ref_dir() / "tiny-llama");
    const auto p = io::read_peft_prefix(ref_dir() / "peft_llama_prefix", io::peft_base::of(lm));
    CHECK(p.position_offset == 0);  // re-based keys: nothing left for the caller to shift
    CHECK(p.layers[0].length() == 3);
    nn::workspace ws;
    const auto ref = reference("llama_prefix", "logits");
    CHECK(rel_error(lm.logits(llama_batch(), ws, p.layers), ref) < 1e-5);
    // The rows exactly as PEFT stored them (cpet's positions from 0, no re-basing) give other logits.
    auto raw = p;
    const auto f = io::safetensors_file::open(ref_dir() / "peft_llama_prefix" / "adapter_model.safetensors");
    const auto all = f.tensor("prompt_embeddings").to_f32();
    for (index_t l = 0; l < 2; ++l)
        for (index_t r = 0; r < 3; ++r)
            for (index_t c = 0; c < 32; ++c) raw.layers[std::size_t(l)].k(r, c) = all[std::size_t(r * 128 + 2 * l * 32 + c)];
    CHECK(rel_error(lm.logits(llama_batch(), ws, raw.layers), ref) > 1e-4);
}

TEST_CASE("peft: unsupported or malformed adapters are refused naming the file, the tensor and the rule") {
    const auto model = io::load_model<config::bert<compress::dense>>(ref_dir() / "tiny-bert");
    const auto base = io::peft_base::of(model);
    auto refused = [&](const fs::path& d, const char* says) {
        CHECK_THROWS_WITH_AS(io::read_peft_lora<pet::lora>(d, base), doctest::Contains(says), io_error);
    };
    const auto d = copy_of("bert_lora");
    const auto good = io::read_json(d / "adapter_config.json");
    auto reset = [&] { std::ofstream(d / "adapter_config.json") << good.dump(2); };
    edit_config(d, [](auto& j) { j["use_dora"] = true; });
    refused(d, "\"use_dora\" = true is not supported");
    reset();
    edit_config(d, [](auto& j) { j["modules_to_save"] = {"classifier"}; });
    refused(d, "\"modules_to_save\" = [\"classifier\"] is not supported");
    reset();
    edit_config(d, [](auto& j) { j["bias"] = "all"; });
    refused(d, "\"bias\" = \"all\" is not supported");
    reset();
    edit_config(d, [](auto& j) { j["fan_in_fan_out"] = true; });
    refused(d, "fan_in_fan_out");
    reset();
    edit_config(d, [](auto& j) { j["peft_type"] = "LOHA"; });
    refused(d, "peft_type is \"LOHA\", expected \"LORA\"");
    reset();
    edit_config(d, [](auto& j) { j["rank_pattern"] = nlohmann::json::object(); });
    refused(d, "attention.self.key.lora_A.weight' has shape [2, 32], expected [4, 32]");
    reset();
    edit_config(d, [](auto& j) { j["target_modules"] = {"query", "value"}; });
    refused(d, "which target_modules does not select");
    reset();
    edit_config(d, [](auto& j) { j["target_modules"] = "(unclosed"; });
    refused(d, "not a regex cpet can read");
    reset();
    // The adapter for a module the model lacks: a 2-layer model, a tensor for layer 5.
    {
        std::vector<io::tensor_data> ts;
        const auto f = io::safetensors_file::open(ref_dir() / "peft_bert_lora" / "adapter_model.safetensors");
        std::vector<std::string> names;
        for (const auto& tv : f.tensors()) names.push_back(tv.name());
        for (std::size_t i = 0; i < names.size(); ++i) {
            const auto& tv = f.tensor(names[i]);
            std::string n = names[i];
            if (n.find("encoder.layer.1.attention.self.query") != std::string::npos) n.replace(n.find("layer.1"), 7, "layer.5");
            ts.push_back({n, tv.type(), tv.shape(), tv.bytes()});
        }
        io::save_safetensors(d / "adapter_model.safetensors", ts);
        refused(d, "adapts module 'encoder.layer.5.attention.self.query', which is not one of the model's 2 layers");
        // A lora_A without its lora_B.
        ts.erase(std::remove_if(ts.begin(), ts.end(), [](const auto& x) {
                     return x.name.find("layer.5") != std::string::npos && x.name.find("lora_B") != std::string::npos;
                 }), ts.end());
        for (auto& x : ts)
            if (x.name.find("layer.5") != std::string::npos) x.name.replace(x.name.find("layer.5"), 7, "layer.1");
        io::save_safetensors(d / "adapter_model.safetensors", ts);
        refused(d, "'encoder.layer.1.attention.self.query' has lora_A but no lora_B");
        ts.push_back({"base_model.model.embeddings.word_embeddings.lora_embedding_A", io::dtype::F32, {0}, {}});
        io::save_safetensors(d / "adapter_model.safetensors", ts);
        refused(d, "is not a LoRA factor cpet reads");
    }
    fs::remove(d / "adapter_model.safetensors");
    std::ofstream(d / "adapter_model.bin") << "pickle";
    refused(d, "pickled torch files are not read");
    fs::remove_all(d);
    // IA3 on a module cpet's IA3 does not scale (o, at its output).
    const auto di = copy_of("bert_ia3");
    {
        const auto f = io::safetensors_file::open(di / "adapter_model.safetensors");
        std::vector<io::tensor_data> ts;
        for (const auto& tv : f.tensors()) ts.push_back({tv.name(), tv.type(), tv.shape(), tv.bytes()});
        std::vector<float> ones(32, 1.f);
        ts.push_back(io::make_tensor("base_model.model.encoder.layer.0.attention.output.dense.ia3_l", {32, 1}, ones));
        io::save_safetensors(di / "adapter_model.safetensors", ts);
    }
    edit_config(di, [](auto& j) { j["target_modules"] = ".*"; });
    const auto ia3_model = io::load_model<config::bert<compress::dense>>(ref_dir() / "tiny-bert");
    CHECK_THROWS_WITH_AS(io::read_peft_ia3(di, io::peft_base::of(ia3_model)),
                         doctest::Contains("IA3 on 'encoder.layer.0.attention.output.dense'"), io_error);
    fs::remove_all(di);
}

}  // namespace cpet_test_io_peft
