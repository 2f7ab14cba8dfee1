// tests/io/test_safetensors.cpp — the safetensors reader against a corpus of hand-made files (each bad one breaks
// one rule and must be refused with io_error naming the file, the tensor and the rule), the writer's byte layout
// against the reference implementation's own test vectors, bit-exact round trips, and atomic replacement.
#include <doctest/doctest.h>

#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "cpet/io/safetensors.hpp"

namespace cpet_test_io_safetensors {  // each test file's own namespace: the files of a room compile as one unit

namespace fs = std::filesystem;
using namespace cpet;
using namespace cpet::io;

namespace {

/// An 8-byte length (the header's own unless `n` is given), the header, then `data` bytes of zeros.
std::vector<std::byte> file_of(std::string_view header, std::size_t data, std::optional<std::uint64_t> n = {}) {
    std::vector<std::byte> v(8 + header.size() + data);
    const std::uint64_t len = n ? *n : header.size();
    for (int i = 0; i < 8; ++i) v[std::size_t(i)] = std::byte((len >> (8 * i)) & 0xff);
    std::memcpy(v.data() + 8, header.data(), header.size());
    return v;
}

/// The io_error message of parsing `f`, or "" when it parses.
std::string error_of(const std::vector<std::byte>& f) {
    try {
        (void)safetensors_file::parse(f, "bad.safetensors");
    } catch (const io_error& e) {
        return e.what();
    }
    return "";
}

bool contains(const std::string& s, std::string_view part) { return s.find(part) != std::string::npos; }

fs::path temp_dir() {
    auto d = fs::temp_directory_path() / ("cpet_io_test_" + std::to_string(::getpid()));
    fs::create_directories(d);
    return d;
}

std::vector<std::byte> read_all(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    std::vector<char> c((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::vector<std::byte> v(c.size());
    std::memcpy(v.data(), c.data(), c.size());
    return v;
}

}  // namespace

TEST_CASE("safetensors: the reference implementation's serialisation test vectors, byte for byte") {
    // safetensors/src/tensor.rs test_serialization: attn.0, F32 [1, 2, 3], values 0..5.
    const std::vector<float> vals{0, 1, 2, 3, 4, 5};
    auto out = serialize_safetensors({make_tensor("attn.0", {1, 2, 3}, vals)});
    const std::vector<unsigned char> expected{
        64, 0, 0, 0, 0, 0, 0, 0, 123, 34, 97, 116, 116, 110, 46, 48, 34, 58, 123, 34, 100, 116, 121, 112, 101, 34, 58,
        34, 70, 51, 50, 34, 44, 34, 115, 104, 97, 112, 101, 34, 58, 91, 49, 44, 50, 44, 51, 93, 44, 34, 100, 97, 116,
        97, 95, 111, 102, 102, 115, 101, 116, 115, 34, 58, 91, 48, 44, 50, 52, 93, 125, 125, 0, 0, 0, 0, 0, 0, 128, 63,
        0, 0, 0, 64, 0, 0, 64, 64, 0, 0, 128, 64, 0, 0, 160, 64};
    REQUIRE(out.size() == expected.size());
    CHECK(std::memcmp(out.data(), expected.data(), expected.size()) == 0);

    // test_empty (with and without metadata): "{}" and "{"__metadata__":{"framework":"pt"}}" padded to 8.
    auto empty = serialize_safetensors({});
    const std::vector<unsigned char> e0{8, 0, 0, 0, 0, 0, 0, 0, 123, 125, 32, 32, 32, 32, 32, 32};
    REQUIRE(empty.size() == e0.size());
    CHECK(std::memcmp(empty.data(), e0.data(), e0.size()) == 0);
    auto meta = serialize_safetensors({}, {{"framework", "pt"}});
    const std::string h = "{\"__metadata__\":{\"framework\":\"pt\"}}     ";
    REQUIRE(meta.size() == 8 + h.size());
    CHECK(std::to_integer<int>(meta[0]) == 40);
    CHECK(std::memcmp(meta.data() + 8, h.data(), h.size()) == 0);

    // test_serialization_forced_alignement: a 7-space pad so the data starts 8-aligned.
    auto al = serialize_safetensors({make_tensor("attn0", {1, 1, 2, 3}, vals)});
    const std::vector<unsigned char> expected_al{
        72, 0, 0, 0, 0, 0, 0, 0, 123, 34, 97, 116, 116, 110, 48, 34, 58, 123, 34, 100, 116, 121, 112, 101, 34, 58, 34,
        70, 51, 50, 34, 44, 34, 115, 104, 97, 112, 101, 34, 58, 91, 49, 44, 49, 44, 50, 44, 51, 93, 44, 34, 100, 97,
        116, 97, 95, 111, 102, 102, 115, 101, 116, 115, 34, 58, 91, 48, 44, 50, 52, 93, 125, 125, 32, 32, 32, 32, 32,
        32, 32, 0, 0, 0, 0, 0, 0, 128, 63, 0, 0, 0, 64, 0, 0, 64, 64, 0, 0, 128, 64, 0, 0, 160, 64};
    REQUIRE(al.size() == expected_al.size());
    CHECK(std::memcmp(al.data(), expected_al.data(), al.size()) == 0);
}

TEST_CASE("safetensors: the writer orders tensors by dtype (widest first) then name, as the reference") {
    const std::vector<float> f{1.f};
    const std::vector<std::uint16_t> h{0x3c00, 0};
    const std::vector<std::int8_t> c{1, 2, 3};
    tensor_data half{"b", dtype::F16, {2}, std::as_bytes(std::span<const std::uint16_t>(h))};
    auto out = serialize_safetensors({half, make_tensor("a", {1}, f), make_tensor("c", {3}, c), make_tensor("B", {1}, f)},
                                     {{"z", "1"}, {"a", "\"x\n\xc3\xa9"}});
    // What safetensors 0.8 (Python) writes for the same tensors (metadata keys sorted here, in dict order there).
    const std::string ref = "{\"__metadata__\":{\"a\":\"\\\"x\\n\xc3\xa9\",\"z\":\"1\"},"
                            "\"B\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                            "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]},"
                            "\"b\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[8,12]},"
                            "\"c\":{\"dtype\":\"I8\",\"shape\":[3],\"data_offsets\":[12,15]}}  ";
    REQUIRE(out.size() == 8 + ref.size() + 15);
    CHECK(std::string(reinterpret_cast<const char*>(out.data() + 8), ref.size()) == ref);
    auto f2 = safetensors_file::parse(out);
    CHECK(f2.metadata().at("a") == "\"x\n\xc3\xa9");
    CHECK(f2.tensor("b").to_f32() == std::vector<float>{1.f, 0.f});
    CHECK(f2.tensor("c").as<std::int8_t>()[2] == 3);
}

TEST_CASE("safetensors: round trip of every dtype is bit-exact, views are zero-copy and aligned") {
    std::mt19937 gen(7);
    std::vector<std::vector<std::byte>> store;
    std::vector<tensor_data> ts;
    for (int i = 0; i <= int(dtype::U64); ++i) {
        const auto t = dtype(i);
        const std::vector<std::uint64_t> shape{3, std::uint64_t(i % 4 + 1)};
        std::vector<std::byte> b(shape[0] * shape[1] * dtype_size(t));
        for (auto& x : b) x = std::byte(gen() & 0xff);
        store.push_back(std::move(b));
        std::string name = "t";
        name += std::to_string(i);
        name += ".";
        name += dtype_name(t);
        ts.push_back({name, t, shape, store.back()});
    }
    ts.push_back({"empty", dtype::F32, {0, 5}, {}});
    ts.push_back({"scalar", dtype::I32, {}, std::as_bytes(std::span<const std::byte>(store[9].data(), 4))});
    const auto dir = temp_dir();
    const auto path = dir / "all.safetensors";
    save_safetensors(path, ts, {{"format", "pt"}});
    auto f = safetensors_file::open(path);
    REQUIRE(f.size() == ts.size());
    CHECK(f.metadata().at("format") == "pt");
    for (const auto& t : ts) {
        const auto& v = f.tensor(t.name);
        CAPTURE(t.name);
        CHECK(v.type() == t.type);
        CHECK(v.shape() == t.shape);
        REQUIRE(v.bytes().size() == t.bytes.size());
        if (!t.bytes.empty()) CHECK(std::memcmp(v.bytes().data(), t.bytes.data(), t.bytes.size()) == 0);
        CHECK(reinterpret_cast<std::uintptr_t>(v.bytes().data()) % dtype_size(t.type) == 0);
    }
    // The file on disk is what serialize_safetensors makes, and a rewrite of what was read is the same file.
    CHECK(read_all(path) == serialize_safetensors(ts, {{"format", "pt"}}));
    std::vector<tensor_data> again;
    for (const auto& v : f.tensors()) again.push_back({v.name(), v.type(), v.shape(), v.bytes()});
    CHECK(serialize_safetensors(again, f.metadata()) == read_all(path));
    fs::remove_all(dir);
}

TEST_CASE("safetensors: F16 / BF16 convert to fp32 exactly, and back with round to nearest even") {
    CHECK(f16_to_f32(0x3c00) == 1.f);
    CHECK(f16_to_f32(0xc000) == -2.f);
    CHECK(f16_to_f32(0x7bff) == 65504.f);
    CHECK(f16_to_f32(0x0001) == std::ldexp(1.f, -24));  // smallest subnormal
    CHECK(f16_to_f32(0x03ff) == std::ldexp(1023.f, -24));
    CHECK(std::isinf(f16_to_f32(0x7c00)));
    CHECK(std::isnan(f16_to_f32(0x7e00)));
    CHECK(bf16_to_f32(0x3f80) == 1.f);
    CHECK(bf16_to_f32(0xc2f7) == -123.5f);
    // Every half converts to a float that converts back to the same half (NaNs to a NaN).
    for (std::uint32_t h = 0; h < 0x10000; ++h) {
        const float f = f16_to_f32(std::uint16_t(h));
        if (std::isnan(f)) {
            CHECK(std::isnan(f16_to_f32(f32_to_f16(f))));
            continue;
        }
        if (f32_to_f16(f) != h) {
            CHECK(f32_to_f16(f) == h);
            break;
        }
    }
    CHECK(f32_to_f16(65520.f) == 0x7c00);            // rounds up to infinity
    CHECK(f32_to_f16(1.f + std::ldexp(1.f, -11)) == 0x3c00);  // tie to even (down)
    CHECK(f32_to_f16(std::ldexp(1.f, -25)) == 0);              // tie to even (zero)
    CHECK(f32_to_bf16(1.f) == 0x3f80);
    CHECK(f32_to_bf16(std::bit_cast<float>(0x3f808000u)) == 0x3f80);  // tie to even
    CHECK(f32_to_bf16(std::bit_cast<float>(0x3f818000u)) == 0x3f82);
}

TEST_CASE("safetensors: accepted edge cases (as the reference accepts them)") {
    const std::string t = R"("a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]})";
    CHECK(error_of(file_of(" \n\t{" + t + "}", 4)) == "");          // leading JSON whitespace
    CHECK(error_of(file_of("{" + t + "} \t\r\n", 4)) == "");        // trailing JSON whitespace
    CHECK(error_of(file_of("{}", 0)) == "");                        // no tensors
    CHECK(error_of(file_of(R"({"__metadata__":null,)" + t + "}", 4)) == "");
    CHECK(error_of(file_of(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":{"x":1}}})", 4)) == "");
    CHECK(error_of(file_of(R"({"a":{"dtype":"I32","shape":[],"data_offsets":[0,4]}})", 4)) == "");   // scalar
    CHECK(error_of(file_of(R"({"a":{"dtype":"I32","shape":[2,0],"data_offsets":[0,0]}})", 0)) == "");  // empty
    // Two zero-sized tensors at the same offset, and one before a tensor at the same start.
    CHECK(error_of(file_of(R"({"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}})", 4)) == "");
    // Tensors listed out of offset order.
    auto f = safetensors_file::parse(file_of(
        R"({"y":{"dtype":"U8","shape":[2],"data_offsets":[4,6]},"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 6));
    REQUIRE(f.size() == 2);
    CHECK(f.tensors()[0].name() == "x");
    CHECK(f.tensors()[1].name() == "y");
    CHECK(f.header_size() % 1 == 0);
}

TEST_CASE("safetensors: every malformed file is refused with the file, the tensor and the rule in the message") {
    const std::string a4 = R"("a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]})";
    struct bad_case {
        const char* what;
        std::vector<std::byte> file;
        std::vector<const char*> says;
    };
    std::vector<std::byte> truncated = file_of("{" + a4 + "}", 4);
    truncated.pop_back();
    std::vector<std::byte> extra = file_of("{" + a4 + "}", 5);
    std::vector<std::byte> non_utf8 = file_of("{\"\xff\":1}", 0);
    std::vector<std::byte> overlong = file_of("{\"\xc0\xaf\":1}", 0);
    std::vector<std::byte> surrogate = file_of("{\"\xed\xa0\x80\":1}", 0);
    const std::vector<bad_case> cases{
        {"empty file", {}, {"0 bytes", "8-byte header length"}},
        {"7 bytes", std::vector<std::byte>(7), {"7 bytes"}},
        {"header length past the end", file_of("{}", 0, 3), {"header length 3", "past the end"}},
        {"header length huge", file_of("{}", 0, 0xffffffff00000000ull), {"exceeds the limit"}},
        {"header length 100 MB + 1", file_of("{}", 0, 100'000'001), {"exceeds the limit"}},
        {"header length 0", file_of("", 0), {"not valid JSON"}},
        {"truncated data", truncated, {"'a'", "past the 3 bytes", "truncated"}},
        {"trailing bytes", extra, {"cover 4 bytes of the 5-byte", "trailing bytes"}},
        {"offsets outside the file", file_of(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 4),
         {"'b'", "past the 4 bytes"}},
        {"overlap", file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8),
         {"'b'", "overlap"}},
        {"hole", file_of(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})", 12),
         {"'b'", "hole after byte 4"}},
        {"hole at the start", file_of(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8), {"'a'", "hole after byte 0"}},
        {"end before begin", file_of(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})", 4), {"'a'", "end before"}},
        {"dtype size mismatch", file_of(R"({"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,4]}})", 4),
         {"'a'", "shape [2, 2] of F32 needs 16 bytes", "give 4"}},
        {"wrong dtype size (F16 as 4 bytes)", file_of(R"({"a":{"dtype":"F16","shape":[1],"data_offsets":[0,4]}})", 4), {"'a'", "needs 2 bytes"}},
        {"shape overflow", file_of(R"({"a":{"dtype":"I32","shape":[2,18446744073709551614],"data_offsets":[0,16]}})", 16),
         {"'a'", "overflows"}},
        {"shape x dtype overflow", file_of(R"({"a":{"dtype":"I32","shape":[2,9223372036854775807],"data_offsets":[0,16]}})", 16),
         {"'a'", "overflows"}},
        {"shape beyond u64", file_of(R"({"a":{"dtype":"F32","shape":[18446744073709551616],"data_offsets":[0,4]}})", 4),
         {"'a'", "non-negative integers"}},
        {"negative shape", file_of(R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4), {"'a'", "-1"}},
        {"float shape", file_of(R"({"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}})", 4), {"'a'", "\"shape\""}},
        {"shape not an array", file_of(R"({"a":{"dtype":"F32","shape":true,"data_offsets":[0,4]}})", 4), {"'a'", "boolean"}},
        {"three offsets", file_of(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4,4]}})", 4), {"'a'", "[begin, end]"}},
        {"missing shape", file_of(R"({"a":{"dtype":"F32","data_offsets":[0,4]}})", 4), {"'a'", "missing field \"shape\""}},
        {"unknown dtype", file_of(R"({"a":{"dtype":"F31","shape":[1],"data_offsets":[0,4]}})", 4), {"'a'", "F31"}},
        {"lower-case dtype", file_of(R"({"a":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}})", 4), {"'a'", "f32"}},
        {"tensor entry not an object", file_of(R"({"a":1})", 0), {"'a'", "expected an object"}},
        {"bad JSON", file_of("{", 0), {"not valid JSON"}},
        {"trailing garbage after the JSON", file_of("{} x", 0), {"not valid JSON"}},
        {"trailing NUL padding", file_of(std::string("{}\0", 3), 0), {"not valid JSON", "NUL"}},
        {"NUL then garbage", file_of(std::string("{}\0{\"a\":1}", 10), 0), {"not valid JSON", "NUL"}},
        {"comment", file_of("{}//", 0), {"not valid JSON"}},
        {"byte order mark", file_of("\xef\xbb\xbf{}", 0), {"not valid JSON"}},
        {"top-level array", file_of("[]", 0), {"array", "expected an object"}},
        {"non-UTF-8 header", non_utf8, {"not valid UTF-8"}},
        {"overlong UTF-8", overlong, {"not valid UTF-8"}},
        {"UTF-8 surrogate", surrogate, {"not valid UTF-8"}},
        {"escaped lone surrogate", file_of(R"({"\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4), {"not valid JSON"}},
        {"non-string metadata", file_of(R"({"__metadata__":{"k":1},)" + a4 + "}", 4), {"__metadata__", "'k'", "number"}},
        {"metadata not an object", file_of(R"({"__metadata__":"x",)" + a4 + "}", 4), {"__metadata__", "string"}},
        {"metadata array of strings", file_of(R"({"__metadata__":["x"],)" + a4 + "}", 4), {"__metadata__", "array"}},
        {"duplicate names (same span)", file_of("{" + a4 + "," + a4 + "}", 4), {"'a'", "twice"}},
        {"duplicate names (other span)", file_of("{" + a4 + R"(,"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8),
         {"'a'", "twice"}},
        {"duplicate metadata", file_of(R"({"__metadata__":{},"__metadata__":{},)" + a4 + "}", 4), {"__metadata__", "twice"}},
        {"duplicate metadata key", file_of(R"({"__metadata__":{"k":"v","k":"w"},)" + a4 + "}", 4), {"'k'", "twice"}},
        {"duplicate field", file_of(R"({"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4), {"'dtype'", "twice"}},
    };
    for (const auto& c : cases) {
        const std::string what = c.what;
        CAPTURE(what);
        const std::string msg = error_of(c.file);
        CAPTURE(msg);
        REQUIRE(!msg.empty());
        CHECK(contains(msg, "bad.safetensors: "));
        for (const char* s : c.says) CHECK(contains(msg, s));
    }
}

TEST_CASE("safetensors: open names the file when it is missing, a folder or unreadable; views check their dtype") {
    const auto dir = temp_dir();
    CHECK_THROWS_WITH_AS(safetensors_file::open(dir / "nope.safetensors"),
                         doctest::Contains("nope.safetensors: cannot open"), io_error);
    CHECK_THROWS_WITH_AS(safetensors_file::open(dir), doctest::Contains("not a regular file"), io_error);
    {
        std::ofstream(dir / "empty.safetensors").flush();
    }
    CHECK_THROWS_WITH_AS(safetensors_file::open(dir / "empty.safetensors"),
                         doctest::Contains("empty.safetensors: file has 0 bytes"), io_error);
    const std::vector<std::int32_t> v{1, 2};
    const auto bytes = serialize_safetensors({make_tensor("ids", {2}, v)});
    auto f = safetensors_file::parse(bytes, "ids.safetensors");
    CHECK_THROWS_WITH_AS(f.tensor("nope"), doctest::Contains("ids.safetensors: no tensor 'nope'"), io_error);
    CHECK_THROWS_WITH_AS((void)f.tensor("ids").as<float>(), doctest::Contains("its dtype is I32"), io_error);
    CHECK_THROWS_WITH_AS((void)f.tensor("ids").to_f32(), doctest::Contains("not a floating type"), io_error);
    CHECK(f.tensor("ids").as<std::int32_t>()[1] == 2);
    fs::remove_all(dir);
}

TEST_CASE("safetensors: the writer refuses what it cannot write correctly") {
    const std::vector<float> v{1, 2, 3};
    CHECK_THROWS_WITH_AS(serialize_safetensors({make_tensor("a", {2, 2}, v)}),
                         doctest::Contains("tensor 'a': shape [2, 2] of F32 needs 16 bytes, 12 given"), io_error);
    CHECK_THROWS_WITH_AS(serialize_safetensors({make_tensor("a", {3}, v), make_tensor("a", {3}, v)}),
                         doctest::Contains("'a' given twice"), io_error);
    CHECK_THROWS_WITH_AS(serialize_safetensors({make_tensor("__metadata__", {3}, v)}),
                         doctest::Contains("may not be called __metadata__"), io_error);
    CHECK_THROWS_WITH_AS(serialize_safetensors({make_tensor("\xff", {3}, v)}), doctest::Contains("not valid UTF-8"),
                         io_error);
    CHECK_THROWS_WITH_AS(serialize_safetensors({}, {{"k", "\xc0\x80"}}), doctest::Contains("metadata entry 'k'"),
                         io_error);
}

TEST_CASE("safetensors: an interrupted write leaves the previous file intact and no temporary file behind") {
    const auto dir = temp_dir();
    const auto path = dir / "model.safetensors";
    const std::vector<float> old_vals(1000, 1.f), new_vals(300000, 2.f);
    save_safetensors(path, {make_tensor("w", {1000}, old_vals)});
    const auto before = read_all(path);
    std::uint64_t seen = 0, total_seen = 0;
    auto hook = [&](std::uint64_t written, std::uint64_t total) {
        seen = written;
        total_seen = total;
        if (written > 8) throw std::runtime_error("simulated crash mid-write");
    };
    CHECK_THROWS_WITH(save_safetensors(path, {make_tensor("w", {300000}, new_vals)}, {}, hook),
                      "simulated crash mid-write");
    CHECK(seen > 8);
    CHECK(seen < total_seen);
    CHECK(read_all(path) == before);
    int files = 0;
    for (const auto& e : fs::directory_iterator(dir)) files += e.is_regular_file();
    CHECK(files == 1);
    // A file mapped while it is replaced keeps its old bytes (rename swaps the inode, never truncates it).
    auto mapped = safetensors_file::open(path);
    save_safetensors(path, {make_tensor("w", {300000}, new_vals)});
    CHECK(mapped.tensor("w").to_f32()[999] == 1.f);
    CHECK(safetensors_file::open(path).tensor("w").numel() == 300000);
    fs::remove_all(dir);
}

}  // namespace cpet_test_io_safetensors
