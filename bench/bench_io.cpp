// bench/bench_io.cpp — loading a real checkpoint: all-MiniLM-L6-v2's model.safetensors (87 MiB, F32).
//
// io/read/minilm             plain read() of the file's bytes into a buffer (the floor: one pass over the file)
// io/map_validate/minilm     safetensors_file::open: mmap + header validation (no tensor byte touched)
// io/map_touch/minilm        the same, then every tensor byte read once (what a loader that copies must pay)
// io/load/minilm/<policy>    io::load_model<config::bert<policy>>: config.json, every tensor to fp32, each linear
//                            packed / compressed as its layer is read (dense, int8 per channel, int4 g128)
// Each reports bytes/s of the file. The page cache is warm after the first iteration, for read() and mmap alike,
// so these measure CPU cost, not the disk. Needs the checkpoint: CPET_MINILM_DIR, or build*/models/all-MiniLM-L6-v2
// under the source root (cmake/fetch_minilm.sh); without it every benchmark reports "skipped: ...".
#include <benchmark/benchmark.h>

#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "cpet/compress/quantized.hpp"
#include "cpet/io/hf_checkpoint.hpp"
#include "cpet/io/safetensors.hpp"

namespace {

namespace fs = std::filesystem;

fs::path minilm() {
    if (const char* e = std::getenv("CPET_MINILM_DIR"); e && *e) return e;
    const auto root = fs::path(__FILE__).parent_path().parent_path();
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator(root, ec)) {
        const auto d = entry.path() / "models" / "all-MiniLM-L6-v2";
        if (entry.path().filename().string().rfind("build", 0) == 0 && fs::exists(d / "model.safetensors")) return d;
    }
    return {};
}

bool have(benchmark::State& state, fs::path& dir) {
    dir = minilm();
    if (dir.empty() || !fs::exists(dir / "model.safetensors")) {
        state.SkipWithError("skipped: all-MiniLM-L6-v2 not found (CPET_MINILM_DIR or cmake/fetch_minilm.sh)");
        return false;
    }
    return true;
}

void set_bytes(benchmark::State& state, const fs::path& dir) {
    state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(fs::file_size(dir / "model.safetensors")));
}

void read_plain(benchmark::State& state) {
    fs::path dir;
    if (!have(state, dir)) return;
    const auto p = (dir / "model.safetensors").string();
    std::vector<char> buf(fs::file_size(p));
    for (auto _ : state) {
        const int fd = ::open(p.c_str(), O_RDONLY);
        std::size_t got = 0;
        while (got < buf.size()) {
            const ssize_t n = ::read(fd, buf.data() + got, buf.size() - got);
            if (n <= 0) break;
            got += std::size_t(n);
        }
        ::close(fd);
        benchmark::DoNotOptimize(buf.data());
        benchmark::ClobberMemory();
    }
    set_bytes(state, dir);
}

void map_validate(benchmark::State& state) {
    fs::path dir;
    if (!have(state, dir)) return;
    for (auto _ : state) {
        auto f = cpet::io::safetensors_file::open(dir / "model.safetensors");
        benchmark::DoNotOptimize(f.size());
    }
    set_bytes(state, dir);
}

void map_touch(benchmark::State& state) {
    fs::path dir;
    if (!have(state, dir)) return;
    for (auto _ : state) {
        auto f = cpet::io::safetensors_file::open(dir / "model.safetensors");
        std::uint64_t sum = 0;
        for (const auto& t : f.tensors()) {
            const auto b = t.bytes();
            const auto* w = reinterpret_cast<const std::uint64_t*>(b.data());  // F32 tensors: 8-byte aligned
            for (std::size_t i = 0; i < b.size() / 8; ++i) sum += w[i];
        }
        benchmark::DoNotOptimize(sum);
    }
    set_bytes(state, dir);
}

template <class Policy>
void load(benchmark::State& state) {
    fs::path dir;
    if (!have(state, dir)) return;
    std::size_t bytes = 0;
    for (auto _ : state) {
        const auto m = cpet::io::load_model<cpet::config::bert<Policy>>(dir);
        bytes = m.stack_bytes();
        benchmark::DoNotOptimize(bytes);
    }
    set_bytes(state, dir);
    state.counters["stack_MiB"] = double(bytes) / 1048576.0;
}

}  // namespace

BENCHMARK(read_plain)->Name("io/read/minilm")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(map_validate)->Name("io/map_validate/minilm")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(map_touch)->Name("io/map_touch/minilm")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(load<cpet::compress::dense>)->Name("io/load/minilm/dense")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(load<cpet::compress::int8_per_channel>)
    ->Name("io/load/minilm/int8_per_channel")
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(load<cpet::compress::int4_g128>)->Name("io/load/minilm/int4_g128")->Unit(benchmark::kMillisecond)->UseRealTime();

BENCHMARK_MAIN();
