// tests/fuzz/fuzz_cpet_format.cpp — cpet's own files on arbitrary bytes: the input is written to a temporary file
// and read as a task of several PET methods, as weights of every stored format, and as a backbone of several
// architectures and policies (dense, int8, N:M int8, unstructured; the readers take paths, as users call them).
// The backbone seeds in corpus/cpet_format/ come from make_seeds_cpet_format.cpp.
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <string>

#include "cpet/io/backbone_file.hpp"
#include "cpet/io/cpet_format.hpp"
#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    using namespace cpet;
    static const std::string path = "/tmp/cpet_fuzz_format_" + std::to_string(::getpid()) + ".safetensors";
    {
        std::ofstream out(path, std::ios::binary | std::ios::trunc);
        out.write(reinterpret_cast<const char*>(data), std::streamsize(size));
    }
    pet::layer_dims d;
    d.d_model = 32, d.q_dim = 32, d.kv_dim = 16, d.d_ff = 48, d.gated = true, d.bias = true, d.norm_bias = true;
    cpet::fuzz::guarded([&] { (void)io::load_task<pet::lora>(path, d); });
    cpet::fuzz::guarded([&] { (void)io::load_task<pet::ia3>(path, d); });
    cpet::fuzz::guarded([&] { (void)io::load_task<pet::adapter>(path, d); });
    cpet::fuzz::guarded([&] { (void)io::load_task<pet::bitfit>(path, d); });
    cpet::fuzz::guarded([&] { (void)io::load_task<pet::prefix_tuning>(path, d); });
    cpet::fuzz::guarded([&] {
        const io::weights_reader r(path);
        for (const auto& t : r.file().tensors()) {
            const auto dot = t.name().rfind('.');
            const std::string w = dot == std::string::npos ? t.name() : t.name().substr(0, dot);
            cpet::fuzz::guarded([&] { (void)r.get<compress::dense_f32>(w); });
            cpet::fuzz::guarded([&] { (void)r.get<compress::int8_per_channel::format>(w); });
            cpet::fuzz::guarded([&] { (void)r.get<compress::int4_g128::format>(w); });
            cpet::fuzz::guarded([&] { (void)r.get<compress::nm_sparse_f32>(w); });
            cpet::fuzz::guarded([&] { (void)r.get<compress::unstructured_sparse_f32>(w); });
            cpet::fuzz::guarded([&] { (void)r.indices(t.name()); });
        }
    });
    using nm8 = compress::nm_sparse<2, 4, compress::sparsity_score::magnitude, compress::sparse_values::int8>;
    cpet::fuzz::guarded([&] { (void)io::load_backbone<config::bert<compress::dense>>(path); });
    cpet::fuzz::guarded([&] { (void)io::load_backbone<config::llama<compress::int8_per_channel>>(path); });
    cpet::fuzz::guarded([&] { (void)io::load_backbone<config::bert<nm8>>(path); });
    cpet::fuzz::guarded([&] { (void)io::load_backbone<config::llama<compress::unstructured_sparse<50>>>(path); });
    return 0;
}
