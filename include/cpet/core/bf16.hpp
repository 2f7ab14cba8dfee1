// cpet/core/bf16.hpp — bfloat16 (the upper 16 bits of a binary32: 8 exponent bits, 7 mantissa bits) as a storage
// type: conversion to and from float, rounding to nearest even as torch does.
#pragma once

#include <bit>
#include <cstdint>

namespace cpet {

/// bfloat16 bits → float (exact).
inline float from_bf16(std::uint16_t b) noexcept { return std::bit_cast<float>(std::uint32_t(b) << 16); }

/// float → bfloat16 bits, round to nearest even (a NaN stays a NaN).
inline std::uint16_t to_bf16(float f) noexcept {
    const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return std::uint16_t((u >> 16) | 0x40u);
    return std::uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace cpet
