// tests/fuzz/fuzz_peft.cpp — PEFT adapter reading on arbitrary input: 4 bytes (little endian) giving the length of
// an adapter_config.json, that JSON, then the adapter_model.safetensors bytes; read as LoRA, rsLoRA, IA3 and
// prefix tuning for the tiny BERT's dimensions (2 layers, d 32, d_ff 64) and the tiny LLaMA's (GQA, gated FFN).
#include <cstring>
#include <string_view>

#include "cpet/io/peft.hpp"
#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    using namespace cpet;
    if (size < 4) return 0;
    std::uint32_t n = 0;
    std::memcpy(&n, data, 4);
    if (n > size - 4) return 0;
    const std::string_view text(reinterpret_cast<const char*>(data + 4), n);
    const auto weights = cpet::fuzz::bytes(data + 4 + n, size - 4 - n);
    io::peft_base bert, llama;
    bert.family = io::model_family::bert;
    bert.layers = 2;
    bert.dims = pet::layer_dims{32, 32, 32, 64, false, true, true};
    llama.family = io::model_family::llama;
    llama.layers = 2;
    llama.prefix = "model.";
    llama.dims = pet::layer_dims{64, 64, 32, 96, true, false, false};
    llama.rope = true;
    llama.head_dim = 16;
    for (const auto* base : {&bert, &llama}) {
        cpet::fuzz::guarded([&] {
            const auto cfg = io::parse_json(text, "adapter_config.json");
            const auto f = io::safetensors_file::parse(weights, "adapter_model.safetensors");
            cpet::fuzz::guarded([&] { (void)io::read_peft_lora<pet::lora>(cfg, "adapter_config.json", f, *base); });
            cpet::fuzz::guarded([&] { (void)io::read_peft_lora<pet::rslora>(cfg, "adapter_config.json", f, *base); });
            cpet::fuzz::guarded([&] { (void)io::read_peft_ia3(cfg, "adapter_config.json", f, *base); });
            cpet::fuzz::guarded([&] { (void)io::read_peft_prefix(cfg, "adapter_config.json", f, *base); });
        });
    }
    return 0;
}
