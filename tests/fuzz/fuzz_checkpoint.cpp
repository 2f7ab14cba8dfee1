// tests/fuzz/fuzz_checkpoint.cpp — a fuzzed model.safetensors read as the committed tiny BERT checkpoint
// (tests/reference/tiny-bert/config.json) and as the tiny LLaMA one: every name-map lookup and shape check runs on
// hostile tensors; on success the model is built and run once.
#include "cpet/io/hf_checkpoint.hpp"
#include "fuzz_common.hpp"

namespace {
const cpet::io::hf_config& family_config(const char* dir) {
    static const auto bert = cpet::io::read_hf_config(cpet::fuzz::source_root() / "tests/reference/tiny-bert");
    static const auto llama = cpet::io::read_hf_config(cpet::fuzz::source_root() / "tests/reference/tiny-llama");
    return std::string_view(dir) == "bert" ? bert : llama;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    using namespace cpet;
    for (const char* family : {"bert", "llama"}) {
        cpet::fuzz::guarded([&] {
            const auto& c = family_config(family);
            const auto ck = io::checkpoint::of(io::safetensors_file::parse(cpet::fuzz::bytes(data, size), "fuzz.safetensors"));
            const auto n = io::hf_names::detect(ck, c);
            auto w = io::read_non_layer_weights(ck, c, n);
            for (index_t i = 0; i < c.layers; ++i) w.layers.push_back(io::read_layer_weights(ck, c, n, i));
            nn::token_batch t{{1, 2, 3}, {}, {3}, 3};
            nn::workspace ws;
            if (c.family == io::model_family::bert)
                (void)nn::Model<config::bert<>>(w).hidden_states(t, ws);
            else
                (void)nn::Model<config::llama<>>(w).hidden_states(t, ws);
        });
    }
    return 0;
}
