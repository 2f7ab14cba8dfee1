// cpet/arch/isa.hpp — which SIMD paths exist, which this build compiled, which this CPU runs, which is active.
//
// Three paths: AVX-512 (F+CD+DQ+BW, xsimd::avx512bw), AVX2+FMA (xsimd::fma3<xsimd::avx2>) and scalar (plain C++
// loops, the kernels' generic_ twins). A path is *compiled* when the consumer's flags let xsimd define its batch
// (-march=native on this machine compiles all three) and *runnable* when the CPU (and OS) supports it. The
// active path is the best compiled-and-runnable one, lowered by `force_isa()` or the environment variable
// CPET_ISA=scalar|avx2|avx512 so that tests exercise every path on one machine. Extra features xsimd 8.1 does
// not know (AVX-512 VNNI, BF16) are detected here too, for the integer kernels.
#pragma once

#include <atomic>
#include <cstdlib>
#include <string>
#include <string_view>

#include <xsimd/xsimd.hpp>

#include "cpet/core/error.hpp"

namespace cpet::arch {

enum class isa : int { scalar = 0, avx2 = 1, avx512 = 2 };

inline constexpr std::string_view name(isa i) noexcept {
    switch (i) {
        case isa::avx512: return "avx512";
        case isa::avx2: return "avx2";
        default: return "scalar";
    }
}

/// Parses "scalar", "avx2", "avx512" (also "generic", "avx2_fma", "avx512bw"); throws format_error otherwise.
inline isa parse_isa(std::string_view s) {
    if (s == "scalar" || s == "generic") return isa::scalar;
    if (s == "avx2" || s == "avx2_fma" || s == "fma3_avx2") return isa::avx2;
    if (s == "avx512" || s == "avx512bw") return isa::avx512;
    throw format_error(detail::concat("CPET_ISA / force_isa: unknown ISA '", s,
                                      "' (expected scalar, avx2 or avx512)"));
}

/// The widest path this translation unit was compiled with.
inline constexpr isa compiled_best() noexcept {
#if XSIMD_WITH_AVX512BW
    return isa::avx512;
#elif XSIMD_WITH_FMA3_AVX2
    return isa::avx2;
#else
    return isa::scalar;
#endif
}

/// CPU features cpet cares about, read once.
struct cpu_features {
    bool avx2_fma = false;
    bool avx512 = false;       // F + CD + DQ + BW (+ VL, which every AVX-512BW CPU has)
    bool avx512_vnni = false;  // vpdpbusd
    bool avx512_bf16 = false;  // vdpbf16ps
    bool os_avx512 = false;    // the OS saves the zmm/opmask state
};

namespace detail {

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
inline void cpuid(unsigned leaf, unsigned sub, unsigned regs[4]) noexcept {
#if defined(_MSC_VER)
    int r[4];
    __cpuidex(r, static_cast<int>(leaf), static_cast<int>(sub));
    for (int i = 0; i < 4; ++i) regs[i] = static_cast<unsigned>(r[i]);
#else
    __asm__ volatile("cpuid" : "=a"(regs[0]), "=b"(regs[1]), "=c"(regs[2]), "=d"(regs[3]) : "a"(leaf), "c"(sub));
#endif
}
inline unsigned long long xgetbv0() noexcept {
#if defined(_MSC_VER)
    return _xgetbv(0);
#else
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (static_cast<unsigned long long>(hi) << 32) | lo;
#endif
}
#endif

inline cpu_features detect() noexcept {
    cpu_features f;
    const auto xs = xsimd::available_architectures();
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
    unsigned r[4];
    cpuid(1, 0, r);
    const bool osxsave = (r[2] >> 27) & 1u;
    const unsigned long long xcr0 = osxsave ? xgetbv0() : 0;
    const bool os_avx = (xcr0 & 0x6) == 0x6;
    f.os_avx512 = os_avx && (xcr0 & 0xe0) == 0xe0;
    f.avx2_fma = os_avx && xs.fma3_avx2;
    cpuid(7, 0, r);
    const bool avx512vl = (r[1] >> 31) & 1u;
    f.avx512 = f.os_avx512 && xs.avx512f && xs.avx512cd && xs.avx512dq && xs.avx512bw && avx512vl;
    f.avx512_vnni = f.avx512 && ((r[2] >> 11) & 1u);
    cpuid(7, 1, r);
    f.avx512_bf16 = f.avx512 && ((r[0] >> 5) & 1u);
#else
    (void)xs;
#endif
    return f;
}

inline std::atomic<int>& forced_isa() noexcept {
    static std::atomic<int> v{-1};
    return v;
}

inline int env_isa() {
    static const int v = [] {
        const char* s = std::getenv("CPET_ISA");
        return (s && *s) ? static_cast<int>(parse_isa(s)) : -1;
    }();
    return v;
}

}  // namespace detail

inline const cpu_features& cpu() noexcept {
    static const cpu_features f = detail::detect();
    return f;
}

/// The widest path this CPU runs (whatever was compiled).
inline isa cpu_best() noexcept {
    if (cpu().avx512) return isa::avx512;
    if (cpu().avx2_fma) return isa::avx2;
    return isa::scalar;
}

/// Best path both compiled and runnable here.
inline isa supported_best() noexcept {
    return static_cast<int>(cpu_best()) < static_cast<int>(compiled_best()) ? cpu_best() : compiled_best();
}

/// True when `i` is compiled into this build and runs on this CPU.
inline bool available(isa i) noexcept { return static_cast<int>(i) <= static_cast<int>(supported_best()); }

/// The path the kernels use now: supported_best(), lowered by CPET_ISA and by force_isa().
inline isa active() {
    int best = static_cast<int>(supported_best());
    const int env = detail::env_isa();
    if (env >= 0 && env < best) best = env;
    const int forced = detail::forced_isa().load(std::memory_order_relaxed);
    if (forced >= 0) best = forced < static_cast<int>(supported_best()) ? forced : static_cast<int>(supported_best());
    return static_cast<isa>(best);
}

/// Forces a path for all later calls (process-wide). Throws format_error when it is not available here.
inline void force_isa(isa i) {
    require<format_error>(available(i), "force_isa: ISA '", name(i), "' is not available (compiled best: ",
                          name(compiled_best()), ", CPU best: ", name(cpu_best()), ")");
    detail::forced_isa().store(static_cast<int>(i), std::memory_order_relaxed);
}
/// Returns to the automatic choice (CPET_ISA still applies).
inline void clear_forced_isa() noexcept { detail::forced_isa().store(-1, std::memory_order_relaxed); }

/// RAII: force a path for a scope, restoring the previous choice afterwards (used by the tests).
class scoped_isa {
public:
    explicit scoped_isa(isa i) : previous_(detail::forced_isa().load()) { force_isa(i); }
    ~scoped_isa() { detail::forced_isa().store(previous_); }
    scoped_isa(const scoped_isa&) = delete;
    scoped_isa& operator=(const scoped_isa&) = delete;

private:
    int previous_;
};

}  // namespace cpet::arch
