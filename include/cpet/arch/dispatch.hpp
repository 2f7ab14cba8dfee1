// cpet/arch/dispatch.hpp — the one place a run-time ISA choice becomes a compile-time arch tag.
//
// `dispatch(fn)` calls fn(Tag{}) with Tag = xsimd::avx512bw, xsimd::fma3<xsimd::avx2> or cpet::arch::scalar,
// for the active path. Kernels are templates over that tag and never branch on the ISA inside; a layer calls
// dispatch once per call (Highway's "dispatch hoisted high").
#pragma once

#include <type_traits>
#include <utility>

#include "cpet/arch/isa.hpp"

namespace cpet::arch {

/// Tag of the scalar path (plain loops; every kernel's generic twin).
struct scalar {
    static constexpr const char* name() noexcept { return "scalar"; }
};

#if XSIMD_WITH_AVX512BW
using avx512 = xsimd::avx512bw;
#endif
#if XSIMD_WITH_FMA3_AVX2
using avx2 = xsimd::fma3<xsimd::avx2>;
#endif

/// True for the tag of a SIMD path (an xsimd arch), false for `scalar`.
template <class Arch>
inline constexpr bool is_simd_v = !std::is_same_v<Arch, scalar>;

/// The isa enumerator of a tag.
template <class Arch>
constexpr isa isa_of() noexcept {
    if constexpr (std::is_same_v<Arch, scalar>) return isa::scalar;
#if XSIMD_WITH_FMA3_AVX2
    else if constexpr (std::is_same_v<Arch, avx2>) return isa::avx2;
#endif
    else return isa::avx512;
}

/// Calls fn(Tag{}) for the given path. `i` must be available (see isa.hpp); an unavailable one falls to scalar.
template <class Fn>
decltype(auto) dispatch(isa i, Fn&& fn) {
    switch (i) {
#if XSIMD_WITH_AVX512BW
        case isa::avx512: return std::forward<Fn>(fn)(avx512{});
#endif
#if XSIMD_WITH_FMA3_AVX2
        case isa::avx2: return std::forward<Fn>(fn)(avx2{});
#endif
        default: return std::forward<Fn>(fn)(scalar{});
    }
}

/// Calls fn(Tag{}) for the active path.
template <class Fn>
decltype(auto) dispatch(Fn&& fn) {
    return dispatch(active(), std::forward<Fn>(fn));
}

}  // namespace cpet::arch
