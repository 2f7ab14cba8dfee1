// cpet/io/dtype.hpp — the element types of a safetensors file, their sizes, names, and the conversion of the
// floating-point ones (F16, BF16, F32, F64) to fp32.
//
// The enum lists the reference implementation's dtypes in its declaration order, which is also the order its
// writer sorts tensors by (descending, i.e. widest alignment first): cpet's writer produces the same layout.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>
#include <type_traits>

namespace cpet::io {

enum class dtype : std::uint8_t { BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64 };

inline constexpr std::size_t dtype_size(dtype t) noexcept {
    switch (t) {
        case dtype::BOOL: case dtype::U8: case dtype::I8: case dtype::F8_E5M2: case dtype::F8_E4M3: return 1;
        case dtype::I16: case dtype::U16: case dtype::F16: case dtype::BF16: return 2;
        case dtype::I32: case dtype::U32: case dtype::F32: return 4;
        case dtype::F64: case dtype::I64: case dtype::U64: return 8;
    }
    return 0;
}

inline constexpr std::string_view dtype_name(dtype t) noexcept {
    switch (t) {
        case dtype::BOOL: return "BOOL";
        case dtype::U8: return "U8";
        case dtype::I8: return "I8";
        case dtype::F8_E5M2: return "F8_E5M2";
        case dtype::F8_E4M3: return "F8_E4M3";
        case dtype::I16: return "I16";
        case dtype::U16: return "U16";
        case dtype::F16: return "F16";
        case dtype::BF16: return "BF16";
        case dtype::I32: return "I32";
        case dtype::U32: return "U32";
        case dtype::F32: return "F32";
        case dtype::F64: return "F64";
        case dtype::I64: return "I64";
        case dtype::U64: return "U64";
    }
    return "?";
}

/// The dtype spelled `s` exactly as in a safetensors header ("F32", "BF16", ...), or nothing.
inline std::optional<dtype> parse_dtype(std::string_view s) noexcept {
    for (int i = 0; i <= int(dtype::U64); ++i)
        if (dtype_name(dtype(i)) == s) return dtype(i);
    return std::nullopt;
}

/// The dtype of a C++ element type, for typed views and the writer.
template <class T>
inline constexpr dtype dtype_of = [] {
    if constexpr (std::is_same_v<T, float>) return dtype::F32;
    else if constexpr (std::is_same_v<T, double>) return dtype::F64;
    else if constexpr (std::is_same_v<T, std::int8_t>) return dtype::I8;
    else if constexpr (std::is_same_v<T, std::uint8_t>) return dtype::U8;
    else if constexpr (std::is_same_v<T, std::int16_t>) return dtype::I16;
    else if constexpr (std::is_same_v<T, std::uint16_t>) return dtype::U16;
    else if constexpr (std::is_same_v<T, std::int32_t>) return dtype::I32;
    else if constexpr (std::is_same_v<T, std::uint32_t>) return dtype::U32;
    else if constexpr (std::is_same_v<T, std::int64_t>) return dtype::I64;
    else if constexpr (std::is_same_v<T, std::uint64_t>) return dtype::U64;
    else static_assert(sizeof(T) == 0, "cpet::io::dtype_of: no safetensors dtype for this element type");
}();

/// IEEE binary16 → binary32, exact (subnormals, infinities and NaN payloads included).
inline float f16_to_f32(std::uint16_t h) noexcept {
    const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
    std::uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal: renormalise
            int e = -1;
            do {
                ++e;
                man <<= 1;
            } while ((man & 0x400u) == 0);
            bits = sign | (std::uint32_t(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    return std::bit_cast<float>(bits);
}

/// bfloat16 → binary32: the upper half of the float's bits.
inline float bf16_to_f32(std::uint16_t b) noexcept { return std::bit_cast<float>(std::uint32_t(b) << 16); }

/// binary32 → bfloat16, round to nearest even (NaN kept NaN) — how torch rounds.
inline std::uint16_t f32_to_bf16(float f) noexcept {
    const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return std::uint16_t((u >> 16) | 0x40u);
    return std::uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/// binary32 → binary16, round to nearest even, overflow to infinity.
inline std::uint16_t f32_to_f16(float f) noexcept {
    const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
    const std::uint16_t sign = std::uint16_t((u >> 16) & 0x8000u);
    const std::uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return std::uint16_t(sign | 0x7e00u);  // NaN
    if (a >= 0x477ff000u) return std::uint16_t(sign | 0x7c00u);  // rounds to >= 65520: infinity
    if (a < 0x38800000u) {                                        // below the smallest normal half: subnormal / 0
        if (a < 0x33000000u) return sign;                          // < 2^-25 rounds to 0
        const std::uint32_t man = (a & 0x7fffffu) | 0x800000u;
        const int shift = 126 - int(a >> 23);  // 14 + (113 - exp)
        const std::uint32_t q = man >> shift, rem = man & ((1u << shift) - 1u), half = 1u << (shift - 1);
        const std::uint32_t r = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
        return std::uint16_t(sign | r);
    }
    const std::uint32_t r = a + 0xfffu + ((a >> 13) & 1u);  // round the 13 dropped bits to nearest even
    return std::uint16_t(sign | ((r - 0x38000000u) >> 13));
}

/// Element i of a little-endian buffer of floating dtype `t` as fp32; false when `t` is not F16/BF16/F32/F64.
inline bool is_float_dtype(dtype t) noexcept {
    return t == dtype::F16 || t == dtype::BF16 || t == dtype::F32 || t == dtype::F64;
}

/// dst[i] = src[i] converted to fp32 for n elements of floating dtype `t` (caller checked is_float_dtype and n).
/// memcpy per element: the source may be unaligned (a file written by another tool need not align its tensors).
inline void convert_to_f32(dtype t, const std::byte* src, std::size_t n, float* dst) noexcept {
    static_assert(std::endian::native == std::endian::little, "cpet::io reads safetensors (little endian) natively");
    switch (t) {
        case dtype::F32: std::memcpy(dst, src, n * 4); break;
        case dtype::F16:
            for (std::size_t i = 0; i < n; ++i) {
                std::uint16_t h;
                std::memcpy(&h, src + 2 * i, 2);
                dst[i] = f16_to_f32(h);
            }
            break;
        case dtype::BF16:
            for (std::size_t i = 0; i < n; ++i) {
                std::uint16_t h;
                std::memcpy(&h, src + 2 * i, 2);
                dst[i] = bf16_to_f32(h);
            }
            break;
        case dtype::F64:
            for (std::size_t i = 0; i < n; ++i) {
                double d;
                std::memcpy(&d, src + 8 * i, 8);
                dst[i] = float(d);
            }
            break;
        default: break;
    }
}

}  // namespace cpet::io
