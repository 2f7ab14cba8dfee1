// tests/fuzz/fuzz_safetensors.cpp — the safetensors reader on arbitrary bytes: a valid file's every tensor is read
// in full (ASan sees a view reaching outside the input) and converted to fp32 where it is a float; the writer
// re-serialises it and the result must parse to the same tensors.
#include <cstring>

#include "cpet/io/safetensors.hpp"
#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    using namespace cpet::io;
    return cpet::fuzz::guarded([&] {
        const auto f = safetensors_file::parse(cpet::fuzz::bytes(data, size), "fuzz.safetensors");
        std::vector<tensor_data> again;
        unsigned sum = 0;
        for (const auto& t : f.tensors()) {
            for (auto b : t.bytes()) sum += std::to_integer<unsigned>(b);
            if (is_float_dtype(t.type()) && t.numel() <= (1u << 20)) (void)t.to_f32();
            again.push_back({t.name(), t.type(), t.shape(), t.bytes()});
        }
        const auto out = serialize_safetensors(again, f.metadata());
        const auto g = safetensors_file::parse(out, "fuzz-rewritten.safetensors");
        if (g.size() != f.size() || g.metadata() != f.metadata()) __builtin_trap();
        for (const auto& t : f.tensors()) {
            const auto& u = g.tensor(t.name());
            if (u.shape() != t.shape() || u.type() != t.type() || u.bytes().size() != t.bytes().size() ||
                (!t.bytes().empty() && std::memcmp(u.bytes().data(), t.bytes().data(), t.bytes().size()) != 0))
                __builtin_trap();
        }
        (void)sum;
    });
}
