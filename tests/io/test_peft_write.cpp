// tests/io/test_peft_write.cpp — cpet writes PEFT IA3 adapters: a PEFT-made IA3 adapter read, written by cpet and
// read again gives the same vectors bit for bit, and the file is PEFT's layout (with CPET_WRITE_ADAPTERS=dir the
// written adapter and PEFT's own outputs for the original go to dir/llama_ia3, for make_references.py
// --check-cpet-adapter, which loads cpet's file in PEFT and compares).
#include <doctest/doctest.h>

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "cpet/io/peft.hpp"
#include "io/io_testing.hpp"

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
