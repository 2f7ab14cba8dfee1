// tests/fuzz/fuzz_common.hpp — what every cpet libFuzzer target shares: the source root (for committed reference
// files) and the rule that a reader may throw cpet::io_error (or another cpet::error) but nothing else, never crash,
// never read outside its input (ASan), never invoke UB (UBSan).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>

#include "cpet/core/error.hpp"

#ifndef CPET_SOURCE_DIR
#define CPET_SOURCE_DIR "."
#endif

namespace cpet::fuzz {

inline std::filesystem::path source_root() { return CPET_SOURCE_DIR; }

inline std::span<const std::byte> bytes(const std::uint8_t* data, std::size_t size) {
    return {reinterpret_cast<const std::byte*>(data), size};
}

/// Runs body(); cpet's own errors are the expected answer to bad input, anything else escapes and is a finding.
template <class Body>
int guarded(Body&& body) {
    try {
        body();
    } catch (const cpet::error&) {
    }
    return 0;
}

}  // namespace cpet::fuzz
