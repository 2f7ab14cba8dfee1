// tests/fuzz/fuzz_hf_config.cpp — config.json parsing on arbitrary text: a config is either refused with io_error
// or describes a valid layer shape.
#include <string_view>

#include "cpet/io/hf_checkpoint.hpp"
#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    using namespace cpet::io;
    return cpet::fuzz::guarded([&] {
        const std::string_view text(reinterpret_cast<const char*>(data), size);
        const auto c = parse_hf_config(parse_json(text, "config.json"), "config.json");
        c.layer_shape().validate();  // must hold for every accepted config
        (void)c.activation();
    });
}
