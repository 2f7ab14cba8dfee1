// tests/io/io_testing.hpp — where the io tests find their reference files and the real model.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <string>

namespace cpet::testing {

/// The source tree's root, from this header's own path (tests/io/io_testing.hpp).
inline std::filesystem::path source_root() {
    return std::filesystem::path(__FILE__).parent_path().parent_path().parent_path();
}
inline std::filesystem::path reference_dir() { return source_root() / "tests" / "reference"; }

/// all-MiniLM-L6-v2: $CPET_MINILM_DIR, else build*/models/all-MiniLM-L6-v2 under the source root (where
/// cmake/fetch_minilm.sh puts it); empty when neither holds model.safetensors, with the reason in `why`.
inline std::filesystem::path minilm_dir(std::string& why) {
    namespace fs = std::filesystem;
    auto ok = [](const fs::path& d) {
        return fs::exists(d / "model.safetensors") && fs::exists(d / "config.json") && fs::exists(d / "vocab.txt");
    };
    if (const char* e = std::getenv("CPET_MINILM_DIR"); e && *e) {
        if (ok(e)) return e;
        why = std::string("CPET_MINILM_DIR=") + e + " does not hold model.safetensors, config.json and vocab.txt";
        return {};
    }
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator(source_root(), ec)) {
        const auto d = entry.path() / "models" / "all-MiniLM-L6-v2";
        if (entry.is_directory() && entry.path().filename().string().rfind("build", 0) == 0 && ok(d)) return d;
    }
    why = "all-MiniLM-L6-v2 not found (set CPET_MINILM_DIR, or run cmake/fetch_minilm.sh build/models/all-MiniLM-L6-v2)";
    return {};
}

}  // namespace cpet::testing
