// tests/io/test_cpet_format.cpp — cpet's own files: a task of every PET method and packed weights of every
// quantized and sparse kind (N:M with fp32 and int8 values, unstructured SELL-16) written and read back bit for bit (the re-written file is byte-identical, the repacked weights
// are the same bytes); a file of another version, kind, method or layer count, a foreign file, an unknown tensor
// and a module that does not fit the layer are refused with a message that says which.
#include <doctest/doctest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "cpet/compress/prune.hpp"
#include "cpet/io/cpet_format.hpp"
#include "io/io_testing.hpp"

namespace cpet_test_io_cpet_format {  // each test file's own namespace: the files of a room compile as one unit

namespace fs = std::filesystem;
using namespace cpet;

namespace {

pet::layer_dims dims() {
    pet::layer_dims d;
    d.d_model = 32, d.q_dim = 32, d.kv_dim = 16, d.d_ff = 48, d.gated = true, d.bias = true, d.norm_bias = true;
    return d;
}

fs::path scratch(const std::string& name) {
    const auto d = fs::temp_directory_path() / ("cpet_fmt_" + std::to_string(::getpid()));
    fs::create_directories(d);
    return d / name;
}

std::vector<std::byte> read_all(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    std::vector<char> c((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::vector<std::byte> v(c.size());
    std::memcpy(v.data(), c.data(), c.size());
    return v;
}

/// Three layers of Policy's modules with every value random (fresh modules are often all zero or one).
template <class Policy>
std::vector<typename Policy::modules> random_task(unsigned seed) {
    std::mt19937 gen(seed);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    std::vector<typename Policy::modules> out;
    for (int l = 0; l < 3; ++l) {
        typename Policy::options o{};
        if constexpr (requires { o.targets; }) {
            if constexpr (std::is_same_v<Policy, pet::ia3>) o.targets = {pet::target::k, pet::target::down};
            else if constexpr (requires { o.rank; }) o.targets = {pet::target::q, pet::target::v, pet::target::gate};
        }
        if constexpr (requires { o.rank; }) o.rank = 2 + l;
        if constexpr (requires { o.bottleneck; }) o.bottleneck = 4 + l;
        if constexpr (requires { o.length; }) o.length = 3;
        auto m = Policy::make(dims(), o, seed + l);
        io::detail::task_fields<Policy>(m, [&](const std::string&, auto& field) {
            using T = std::decay_t<decltype(field)>;
            if constexpr (std::is_same_v<T, float>) field = u(gen) + 2.f;
            else
                for (auto& x : field.size() ? std::span<float>(field.data(), std::size_t(field.size())) : std::span<float>{})
                    x = u(gen);
        });
        out.push_back(std::move(m));
    }
    return out;
}

template <class Policy>
void round_trip(unsigned seed) {
    CAPTURE(std::string(Policy::name()));
    const auto task = random_task<Policy>(seed);
    const auto p = scratch(std::string(Policy::name()) + ".safetensors");
    io::save_task<Policy>(p, task);
    const auto back = io::load_task<Policy>(p, dims(), 3);
    REQUIRE(back.size() == 3);
    const auto p2 = scratch(std::string(Policy::name()) + "2.safetensors");
    io::save_task<Policy>(p2, back);
    CHECK(read_all(p) == read_all(p2));  // every field bit for bit, nothing lost, nothing added
    std::size_t fields = 0;
    io::detail::task_fields<Policy>(back[1], [&](const std::string&, auto& f) {
        if constexpr (std::is_same_v<std::decay_t<decltype(f)>, float>) ++fields;
        else fields += f.size() ? 1 : 0;
    });
    CHECK(fields > 0);
    fs::remove(p);
    fs::remove(p2);
}

}  // namespace

TEST_CASE("cpet task files: every PET method round-trips bit for bit") {
    round_trip<pet::lora>(1);
    round_trip<pet::rslora>(2);
    round_trip<pet::recovery>(3);
    round_trip<pet::recovery_linear>(4);
    round_trip<pet::adapter>(5);
    round_trip<pet::parallel_adapter>(6);
    round_trip<pet::scaled_parallel_adapter>(7);
    round_trip<pet::ia3>(8);
    round_trip<pet::bitfit>(9);
    round_trip<pet::prefix_tuning>(10);
    round_trip<pet::p_tuning_v2>(11);
    round_trip<pet::prompt_tuning>(12);
}

TEST_CASE("cpet task files: another version, kind, method, layer count, a foreign or unfitting file is refused") {
    const auto task = random_task<pet::lora>(20);
    const auto p = scratch("lora.safetensors");
    io::save_task<pet::lora>(p, task);
    CHECK_THROWS_WITH_AS(io::load_task<pet::ia3>(p, dims()), doctest::Contains("holds a 'lora' task, expected 'ia3'"), io_error);
    CHECK_THROWS_WITH_AS(io::load_task<pet::rslora>(p, dims()), doctest::Contains("expected 'rslora'"), io_error);
    CHECK_THROWS_WITH_AS(io::load_task<pet::lora>(p, dims(), 4), doctest::Contains("the task has 3 layers, the model 4"),
                         io_error);
    auto narrow = dims();
    narrow.d_model = 16;
    CHECK_THROWS_WITH_AS(io::load_task<pet::lora>(p, narrow), doctest::Contains("layer 0:"), io_error);
    // Rewrite the same tensors under other metadata.
    auto rewrite = [&](std::map<std::string, std::string> md, bool extra = false) {
        const auto f = io::safetensors_file::open(p);
        std::vector<io::tensor_data> ts;
        for (const auto& t : f.tensors()) ts.push_back({t.name(), t.type(), t.shape(), t.bytes()});
        static const std::vector<float> one{1.f};
        if (extra) ts.push_back(io::make_tensor("layers.0.q.lora_C", {1}, one));
        const auto q = scratch("edited.safetensors");
        io::save_safetensors(q, ts, md);
        return q;
    };
    auto md = io::safetensors_file::open(p).metadata();
    auto v2 = md;
    v2["cpet.version"] = "2";
    CHECK_THROWS_WITH_AS(io::load_task<pet::lora>(rewrite(v2), dims()),
                         doctest::Contains("written in cpet file format version 2, this cpet reads version 1"), io_error);
    auto weights = md;
    weights["cpet.format"] = "weights";
    CHECK_THROWS_WITH_AS(io::load_task<pet::lora>(rewrite(weights), dims()),
                         doctest::Contains("holds cpet weights data, expected task"), io_error);
    CHECK_THROWS_WITH_AS(io::load_task<pet::lora>(rewrite(md, true), dims()),
                         doctest::Contains("tensor 'layers.0.q.lora_C' is not a field of a lora task"), io_error);
    CHECK_THROWS_WITH_AS(io::load_task<pet::lora>(testing::reference_dir() / "peft_bert_lora" / "adapter_model.safetensors", dims()),
                         doctest::Contains("not a cpet file"), io_error);
    fs::remove_all(p.parent_path());
}

namespace {

template <class Policy>
void weights_round_trip(const Matrix<float>& w) {
    CAPTURE(std::string(Policy::name()));
    using F = typename Policy::format;
    const F f = Policy::compress(w, nullptr);
    const auto p = scratch("weights.safetensors");
    io::weights_writer wr;
    wr.add("layers.0.q", f);
    wr.save(p);
    const io::weights_reader rd(p);
    const F g = rd.get<F>("layers.0.q");
    REQUIRE(g.out_features() == f.out_features());
    REQUIRE(g.bytes() == f.bytes());
    if constexpr (std::is_same_v<F, compress::dense_f32>) {
        CHECK(std::memcmp(g.packed().panel(0), f.packed().panel(0), f.packed().bytes()) == 0);
    } else if constexpr (std::is_same_v<F, compress::nm_sparse_f32>) {
        // the whole packed layout, padding rows included
        const auto& a = f.packed();
        const auto& b = g.packed();
        REQUIRE(a.slots() == b.slots());
        REQUIRE(a.value_type() == b.value_type());
        const std::size_t cells = std::size_t(a.panels() * a.slots() * 16);
        if (a.value_type() == compress::sparse_values::f32) {
            CHECK(std::memcmp(a.values(), b.values(), cells * sizeof(float)) == 0);
        } else {
            CHECK(std::memcmp(a.qvalues(), b.qvalues(), cells) == 0);
            CHECK(std::memcmp(a.scales(), b.scales(), std::size_t(a.panels() * 16) * sizeof(float)) == 0);
        }
        CHECK(std::memcmp(a.index_words(), b.index_words(), std::size_t(a.panels() * a.words_per_lane() * 16) * 4) == 0);
    } else if constexpr (std::is_same_v<F, compress::unstructured_sparse_f32>) {
        const auto& a = f.packed();
        const auto& b = g.packed();
        REQUIRE(a.panels() == b.panels());
        CHECK(a.nnz() == b.nnz());
        CHECK(std::memcmp(a.offsets(), b.offsets(), std::size_t(a.panels() + 1) * sizeof(index_t)) == 0);
        const std::size_t cells = std::size_t(a.offsets()[a.panels()] * 16);
        CHECK(std::memcmp(a.values(), b.values(), cells * sizeof(float)) == 0);
        CHECK(std::memcmp(a.col_indices(), b.col_indices(), cells * sizeof(std::uint16_t)) == 0);
    } else {
        const auto& a = f.weights();
        const auto& b = g.weights();
        const std::size_t data_bytes = std::size_t(a.panels() * (a.cols_padded() / compress::formats::chunk_k(a.bits())) *
                                                   compress::formats::chunk_bytes);
        CHECK(std::memcmp(a.data(), b.data(), data_bytes) == 0);
        CHECK(std::memcmp(a.scales(), b.scales(), std::size_t(a.panels() * a.groups() * 16) * sizeof(float)) == 0);
        if (a.zeros()) CHECK(std::memcmp(a.zeros(), b.zeros(), std::size_t(a.panels() * a.groups() * 16) * sizeof(float)) == 0);
    }
    // The same products, bit for bit.
    const Matrix<float> x = Matrix<float>(5, w.cols());
    Matrix<float> xs(5, w.cols()), y1(5, w.rows()), y2(5, w.rows());
    std::mt19937 gen(3);
    std::uniform_real_distribution<float> u(-1, 1);
    for (index_t i = 0; i < xs.size(); ++i) xs.data()[i] = u(gen);
    f.matmul(xs, y1, {});
    g.matmul(xs, y2, {});
    CHECK(std::memcmp(y1.data(), y2.data(), sizeof(float) * std::size_t(y1.size())) == 0);
    CHECK_THROWS_WITH_AS((void)rd.get<F>("layers.1.q"), doctest::Contains("no weight 'layers.1.q'"), io_error);
    if constexpr (std::is_same_v<F, compress::dense_f32>)
        CHECK_THROWS_WITH_AS((void)rd.get<compress::int8_per_channel::format>("layers.0.q"),
                             doctest::Contains("is stored as dense_f32, expected quantized:int8:per_channel"), io_error);
    else
        CHECK_THROWS_WITH_AS((void)rd.get<compress::dense_f32>("layers.0.q"),
                             doctest::Contains("is stored as "), io_error);
    fs::remove(p);
}

}  // namespace

TEST_CASE("cpet weight files: dense and quantized formats repack to the same bytes") {
    Matrix<float> w(40, 256);
    std::mt19937 gen(9);
    std::normal_distribution<float> n(0.f, 0.05f);
    for (index_t i = 0; i < w.size(); ++i) w.data()[i] = n(gen);
    weights_round_trip<compress::dense>(w);
    weights_round_trip<compress::int8_per_channel>(w);
    weights_round_trip<compress::int4_g128>(w);
    weights_round_trip<compress::quantized<compress::int4, compress::per_group<64>, compress::asymmetric, compress::rtn>>(w);
    weights_round_trip<compress::w8a8>(w);
    weights_round_trip<compress::nm_sparse<2, 4>>(w);
    weights_round_trip<compress::nm_sparse<2, 4, compress::sparsity_score::magnitude, compress::sparse_values::int8>>(w);
    weights_round_trip<compress::nm_sparse<4, 8, compress::sparsity_score::magnitude, compress::sparse_values::int8>>(w);
    weights_round_trip<compress::unstructured_sparse<60>>(w);
    weights_round_trip<compress::unstructured_sparse<0>>(w);
}

TEST_CASE("cpet weight files: unstructured weights keep a stored zero and refuse bad entries") {
    // a kept 0 at column 0 looks like SELL padding; the stored row counts keep it
    Matrix<float> w(20, 40);
    for (index_t i = 0; i < w.size(); ++i) w.data()[i] = float(i % 5) - 2.f;
    for (index_t r = 0; r < 20; ++r) w(r, 0) = 0.f;
    std::vector<std::uint8_t> keep(std::size_t(w.size()), 0);
    for (index_t r = 0; r < 20; ++r)
        for (index_t c = 0; c < 40; c += 1 + r % 3) keep[std::size_t(r * 40 + c)] = 1;
    const compress::unstructured_sparse_f32 f(compress::unstructured_sparse_weights::from_mask(w, keep.data()));
    const auto p = scratch("sell.safetensors");
    io::weights_writer wr;
    wr.add("w", f);
    wr.save(p);
    const auto g = io::weights_reader(p).get<compress::unstructured_sparse_f32>("w");
    CHECK(g.packed().nnz() == f.packed().nnz());
    for (index_t r = 0; r < 20; ++r) CHECK(g.packed().row_nnz(r) == f.packed().row_nnz(r));
    CHECK(io::safetensors_file::open(p).metadata().at("cpet.weight.w") == "unstructured:40:f32");
    // Columns out of order within a row, a count past K, the wrong K: refused naming the weight.
    auto edit = [&](const std::string& tensor, auto&& change, std::map<std::string, std::string> md = {}) {
        const auto src = io::safetensors_file::open(p);
        std::vector<io::tensor_data> ts;
        std::vector<std::byte> b;
        for (const auto& t : src.tensors()) {
            if (t.name() == tensor) {
                b.assign(t.bytes().begin(), t.bytes().end());
                change(b);
                ts.push_back({t.name(), t.type(), t.shape(), b});
            } else {
                ts.push_back({t.name(), t.type(), t.shape(), t.bytes()});
            }
        }
        auto m = src.metadata();
        for (const auto& [k, v] : md) m[k] = v;
        const auto q = scratch("sell_bad.safetensors");
        io::save_safetensors(q, ts, m);
        return q;
    };
    CHECK_THROWS_WITH_AS((void)io::weights_reader(edit("w.sp_cols", [](auto& b) { std::swap(b[0], b[2]); }))
                             .get<compress::unstructured_sparse_f32>("w"),
                         doctest::Contains("weight 'w': unstructured_sparse_weights::from_rows: row 0 entry 1"), io_error);
    CHECK_THROWS_WITH_AS((void)io::weights_reader(edit("w.sp_counts", [](auto& b) { b[0] = std::byte(41); }))
                             .get<compress::unstructured_sparse_f32>("w"),
                         doctest::Contains("'w.sp_counts': row 0 has 41 entries, expected 0..40"), io_error);
    CHECK_THROWS_WITH_AS((void)io::weights_reader(edit("w.sp_counts", [](auto& b) { b[0] = std::byte(1); }))
                             .get<compress::unstructured_sparse_f32>("w"),
                         doctest::Contains("tensor 'w.sp_cols' is U16"), io_error);
    CHECK_THROWS_WITH_AS((void)io::weights_reader(edit("w.sp_counts", [](auto&) {}, {{"cpet.weight.w", "unstructured:x:f32"}}))
                             .get<compress::unstructured_sparse_f32>("w"),
                         doctest::Contains("format 'unstructured:x:f32' is not unstructured:K:f32"), io_error);
    fs::remove(p);
}

TEST_CASE("cpet weight files: N:M int8 codes and scales out of range are refused") {
    Matrix<float> w(16, 32);
    for (index_t i = 0; i < w.size(); ++i) w.data()[i] = float(i % 9) - 4.f;
    const auto f = compress::nm_sparse<2, 4, compress::sparsity_score::magnitude, compress::sparse_values::int8>::compress(w);
    const auto p = scratch("nm8.safetensors");
    io::weights_writer wr;
    wr.add("w", f);
    wr.save(p);
    CHECK(io::safetensors_file::open(p).metadata().at("cpet.weight.w") == "nm_sparse:2:4:int8");
    auto edit = [&](const std::string& tensor, std::size_t at, std::vector<std::byte> bytes) {
        const auto src = io::safetensors_file::open(p);
        std::vector<io::tensor_data> ts;
        std::vector<std::byte> b;
        for (const auto& t : src.tensors()) {
            if (t.name() == tensor) {
                b.assign(t.bytes().begin(), t.bytes().end());
                std::copy(bytes.begin(), bytes.end(), b.begin() + std::ptrdiff_t(at));
                ts.push_back({t.name(), t.type(), t.shape(), b});
            } else {
                ts.push_back({t.name(), t.type(), t.shape(), t.bytes()});
            }
        }
        const auto q = scratch("nm8_bad.safetensors");
        io::save_safetensors(q, ts, src.metadata());
        return q;
    };
    using F = compress::nm_sparse_f32;
    CHECK_THROWS_WITH_AS((void)io::weights_reader(edit("w.nm_codes", 3, {std::byte(0x80)})).get<F>("w"),
                         doctest::Contains("code -128 is outside [-127, 127]"), io_error);
    const float neg = -1.f;
    std::vector<std::byte> nb(4);
    std::memcpy(nb.data(), &neg, 4);
    CHECK_THROWS_WITH_AS((void)io::weights_reader(edit("w.nm_scales", 8, nb)).get<F>("w"),
                         doctest::Contains("row 2: scale -1 is not a positive finite number"), io_error);
    CHECK_THROWS_WITH_AS((void)io::weights_reader(edit("w.nm_index", 0, {std::byte(4)})).get<F>("w"),
                         doctest::Contains("in-group index 4 at kept slot 0 is not below M = 4"), io_error);
    fs::remove(p);
}

TEST_CASE("cpet weight files: kept-index maps, and N:M weights with a corrupt index are refused") {
    const auto p = scratch("idx.safetensors");
    io::weights_writer wr;
    const std::vector<index_t> kept{0, 2, 3, 7};
    wr.add_indices("layers.0.kept_heads", kept);
    Matrix<float> w(16, 32);
    for (index_t i = 0; i < w.size(); ++i) w.data()[i] = float(i % 7) - 3.f;
    wr.add("layers.0.up", compress::nm_sparse<2, 4>::compress(w, nullptr));
    wr.save(p);
    const io::weights_reader rd(p);
    CHECK(rd.indices("layers.0.kept_heads") == kept);
    CHECK_THROWS_WITH_AS((void)rd.indices("layers.0.up"), doctest::Contains("no indices 'layers.0.up'"), io_error);
    // Two kept slots of one group pointing at the same column: the mask no longer has N per group.
    const auto f = io::safetensors_file::open(p);
    std::vector<io::tensor_data> ts;
    std::vector<std::byte> idx;
    for (const auto& t : f.tensors()) {
        if (t.name() == "layers.0.up.nm_index") {
            idx.assign(t.bytes().begin(), t.bytes().end());
            idx[1] = idx[0];
            ts.push_back({t.name(), t.type(), t.shape(), idx});
        } else {
            ts.push_back({t.name(), t.type(), t.shape(), t.bytes()});
        }
    }
    const auto q = scratch("idx_bad.safetensors");
    io::save_safetensors(q, ts, f.metadata());
    CHECK_THROWS_WITH_AS((void)io::weights_reader(q).get<compress::nm_sparse_f32>("layers.0.up"),
                         doctest::Contains("weight 'layers.0.up'"), io_error);
    fs::remove(p);
    fs::remove(q);
}

}  // namespace cpet_test_io_cpet_format
