#include "support/testing.hpp"

#include <cstdlib>

#include "cpet/arch/dispatch.hpp"

namespace cpet_test_arch_dispatch {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;

TEST_CASE("the active ISA is the best available one unless forced") {
    const auto best = arch::supported_best();
    CHECK(arch::available(arch::isa::scalar));
    CHECK(static_cast<int>(best) <= static_cast<int>(arch::compiled_best()));
    CHECK(static_cast<int>(best) <= static_cast<int>(arch::cpu_best()));
    MESSAGE("compiled best: ", arch::name(arch::compiled_best()), ", cpu best: ", arch::name(arch::cpu_best()),
            ", vnni: ", arch::cpu().avx512_vnni, ", bf16: ", arch::cpu().avx512_bf16);
}

TEST_CASE("force_isa selects each available path and dispatch hands the matching tag") {
    testing::for_each_isa([](arch::isa i) {
        CHECK(arch::active() == i);
        const arch::isa seen = arch::dispatch([](auto tag) { return arch::isa_of<decltype(tag)>(); });
        CHECK(seen == i);
    });
}

TEST_CASE("scoped_isa restores the previous choice") {
    const auto before = arch::active();
    {
        arch::scoped_isa s(arch::isa::scalar);
        CHECK(arch::active() == arch::isa::scalar);
    }
    CHECK(arch::active() == before);
}

TEST_CASE("unknown or unavailable ISA names are rejected with a message") {
    CHECK_THROWS_AS(arch::parse_isa("sse9"), format_error);
    try {
        arch::parse_isa("neon");
        FAIL("no throw");
    } catch (const format_error& e) {
        CHECK(std::string(e.what()).find("neon") != std::string::npos);
    }
    CHECK(arch::parse_isa("avx2") == arch::isa::avx2);
    if (!arch::available(arch::isa::avx512)) CHECK_THROWS_AS(arch::force_isa(arch::isa::avx512), format_error);
}

TEST_CASE("CPET_ISA in the environment caps the automatic choice") {
    // CTest runs this file a second and third time with CPET_ISA=avx2 and CPET_ISA=scalar (tests/CMakeLists.txt).
    const char* env = std::getenv("CPET_ISA");
    if (!env || !*env) {
        CHECK(arch::active() == arch::supported_best());
        return;
    }
    const auto wanted = arch::parse_isa(env);
    const auto expect = static_cast<int>(wanted) < static_cast<int>(arch::supported_best()) ? wanted
                                                                                            : arch::supported_best();
    CHECK(arch::active() == expect);
    // force_isa still overrides the environment, within what is available.
    arch::scoped_isa s(arch::isa::scalar);
    CHECK(arch::active() == arch::isa::scalar);
}

}  // namespace cpet_test_arch_dispatch
