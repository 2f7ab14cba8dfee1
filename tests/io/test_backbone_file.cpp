// tests/io/test_backbone_file.cpp — whole compressed backbones in cpet's files: layers of every compression
// policy (dense, int8 / int4 per channel and per group, symmetric and asymmetric, W8A8 with and without
// SmoothQuant, GPTQ, N:M with fp32 and int8 values, unstructured), on BERT and LLaMA (GQA, RoPE) layers, one
// unpruned and one structurally pruned with bias compensation, written and read back: the reloaded layer's forward
// output equals the original's bit for bit on every ISA path, re-writing it gives the same file byte for byte,
// the kept maps come back. Then every refusal: another policy, architecture, kind, version or layer count, and
// hand-made bad files (missing tensor, wrong shape, wrong dtype, map index out of range, map of the wrong length,
// maps off the GQA grouping, an unknown tensor, a bad shape entry, a weight of another format), each an io_error
// naming the file, the tensor and the rule; and TransformerLayer's constructor from parts refusing a wrong part.
#include <doctest/doctest.h>

#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "cpet/io/backbone_file.hpp"
#include "io/io_testing.hpp"
#include "support/testing.hpp"

namespace cpet_test_io_backbone_file {  // each test file's own namespace: the files of a room compile as one unit

namespace fs = std::filesystem;
using namespace cpet;

namespace {

fs::path scratch(const std::string& name) {
    const auto d = fs::temp_directory_path() / ("cpet_backbone_" + std::to_string(::getpid()));
    fs::create_directories(d);
    return d / name;
}

std::vector<char> read_all(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

template <class C>
nn::layer_shape shape() {
    nn::layer_shape s;
    s.d_model = 64, s.head_dim = 16, s.d_ff = 128;
    if constexpr (C::rope) {
        s.n_heads = 4, s.n_kv_heads = 2, s.eps = 1e-6f, s.rope_base = 500000.f;
        s.rope = kernels::rope_style::interleaved;
    } else {
        s.n_heads = 4, s.n_kv_heads = 4, s.eps = 1e-12f;
    }
    return s;
}

nn::calibration_set samples(index_t d, unsigned seed) {
    nn::calibration_set set;
    set.lengths = {9, 4, 7};
    set.x = testing::random_matrix(27, d, seed);
    for (index_t r = 0; r < set.x.rows(); ++r)
        for (index_t c = 0; c < d; c += 13) set.x(r, c) *= 6.f;
    return set;
}

/// Two layers of C: layer 0 compressed as it is, layer 1 with half its KV groups and a quarter of its neurons
/// removed (fluctuation score, bias compensation: o / down gain biases even on LLaMA).
template <class C>
std::vector<nn::compressed_layer<C>> two_layers() {
    const auto s = shape<C>();
    const auto set = samples(s.d_model, 5);
    std::vector<nn::compressed_layer<C>> out;
    out.push_back(nn::compress<C>(nn::random_layer_weights(s, 11, nn::kind_of<C>), s, set));
    nn::compress_options o;
    o.prune = {.head_ratio = 0.5, .neuron_ratio = 0.25, .score = compress::prune_score::fluctuation,
               .bias_compensation = true};
    out.push_back(nn::compress<C>(nn::random_layer_weights(s, 12, nn::kind_of<C>), s, set, o));
    return out;
}

template <class C>
void same_forward(const nn::TransformerLayer<C>& a, const nn::TransformerLayer<C>& b) {
    const index_t d = a.shape().d_model;
    const std::vector<index_t> lengths{7, 3};
    const Matrix<float> x = testing::random_matrix(14, d, 77);
    testing::for_each_isa([&](arch::isa) {
        Matrix<float> y1(14, d), y2(14, d);
        nn::workspace ws;
        a.forward(x, lengths, y1, ws);
        b.forward(x, lengths, y2, ws);
        CHECK(std::memcmp(y1.data(), y2.data(), sizeof(float) * std::size_t(y1.size())) == 0);
    });
}

bool same_shape(const nn::layer_shape& a, const nn::layer_shape& b) {
    return a.d_model == b.d_model && a.n_heads == b.n_heads && a.n_kv_heads == b.n_kv_heads &&
           a.head_dim == b.head_dim && a.d_ff == b.d_ff && std::memcmp(&a.eps, &b.eps, 4) == 0 &&
           std::memcmp(&a.rope_base, &b.rope_base, 4) == 0 && a.rope == b.rope;
}

template <class C>
void round_trip() {
    CAPTURE(std::string(C::compression::name()));
    const auto layers = two_layers<C>();
    REQUIRE(layers[1].layer.shape().n_heads < layers[0].layer.shape().n_heads);
    const auto p = scratch(std::string(C::compression::name()) + (C::rope ? "_llama" : "_bert") + ".safetensors");
    io::save_backbone(p, layers, shape<C>());
    const auto back = io::load_backbone<C>(p, 2);
    REQUIRE(back.size() == 2);
    for (std::size_t i = 0; i < 2; ++i) {
        CAPTURE(i);
        const auto& a = layers[i];
        const auto& b = back[i];
        CHECK(same_shape(a.layer.shape(), b.layer.shape()));
        CHECK(a.layer.bytes() == b.layer.bytes());
        CHECK(b.kept.heads == a.kept_heads);
        CHECK(b.kept.kv_heads == a.kept_kv_heads);
        CHECK(b.kept.neurons == a.kept_neurons);
        CHECK(b.kept.dense_heads == shape<C>().n_heads);
        CHECK(b.kept.dense_d_ff == shape<C>().d_ff);
        same_forward(a.layer, b.layer);
    }
    if constexpr (!C::bias) CHECK(back[1].layer.attention().o().bias() != nullptr);  // compensated
    // Everything stored comes back: writing what was read gives the same bytes.
    std::vector<nn::TransformerLayer<C>> again;
    std::vector<io::kept_maps> maps;
    for (const auto& b : back) again.push_back(b.layer), maps.push_back(b.kept);
    const auto p2 = scratch("again.safetensors");
    io::save_backbone(p2, again, maps);
    CHECK(read_all(p) == read_all(p2));
    fs::remove(p);
    fs::remove(p2);
}

using int4_g32 = compress::quantized<compress::int4, compress::per_group<32>, compress::symmetric, compress::rtn>;
using int4_g32_asym = compress::quantized<compress::int4, compress::per_group<32>, compress::asymmetric, compress::rtn>;
using nm24_int8 = compress::nm_sparse<2, 4, compress::sparsity_score::wanda, compress::sparse_values::int8>;

}  // namespace

TEST_CASE("cpet backbone files: BERT layers of every compression policy round-trip bit for bit") {
    round_trip<config::bert<compress::dense>>();
    round_trip<config::bert<compress::int8_per_channel>>();
    round_trip<config::bert<int4_g32>>();
    round_trip<config::bert<int4_g32_asym>>();
    round_trip<config::bert<compress::w8a8>>();
    round_trip<config::bert<compress::w8a8_smooth>>();
    round_trip<config::bert<compress::int8_per_channel_gptq>>();
    round_trip<config::bert<compress::nm_sparse<2, 4>>>();
    round_trip<config::bert<nm24_int8>>();
    round_trip<config::bert<compress::unstructured_sparse<50>>>();
    round_trip<config::bert<compress::unstructured_sparse<70, compress::sparsity_score::wanda>>>();
}

TEST_CASE("cpet backbone files: LLaMA layers (GQA, RoPE, pruned with compensated biases) round-trip bit for bit") {
    round_trip<config::llama<compress::dense>>();
    round_trip<config::llama<int4_g32_asym>>();
    round_trip<config::llama<compress::w8a8_smooth>>();
    round_trip<config::llama<compress::nm_sparse<1, 4, compress::sparsity_score::magnitude, compress::sparse_values::int8>>>();
    round_trip<config::llama<compress::unstructured_sparse<60>>>();
}

TEST_CASE("cpet backbone files: a stack round-trips and runs bit for bit") {
    using C = config::llama<compress::int8_per_channel>;
    const auto s = shape<C>();
    std::vector<nn::dense_layer_weights> w;
    for (unsigned i = 0; i < 3; ++i) w.push_back(nn::random_layer_weights(s, 40 + i, nn::kind_of<C>));
    const nn::Stack<C> stack(w, s);
    const auto p = scratch("stack.safetensors");
    io::save_backbone(p, stack);
    const auto back = io::load_stack<C>(p, 3);
    REQUIRE(back.size() == 3);
    const std::vector<index_t> lengths{5, 8};
    const Matrix<float> x = testing::random_matrix(16, s.d_model, 3);
    testing::for_each_isa([&](arch::isa) {
        Matrix<float> y1(16, s.d_model), y2(16, s.d_model);
        nn::workspace ws;
        stack.forward(x, lengths, y1, ws);
        back.forward(x, lengths, y2, ws);
        CHECK(std::memcmp(y1.data(), y2.data(), sizeof(float) * std::size_t(y1.size())) == 0);
    });
    const auto maps = io::load_backbone<C>(p);
    CHECK(maps[2].kept.heads == std::vector<index_t>{0, 1, 2, 3});  // nothing pruned: the identity
    CHECK(maps[2].kept.neurons.size() == std::size_t(s.d_ff));
    fs::remove(p);
}

namespace {

using bad_c = config::llama<compress::int8_per_channel>;

/// The tensors and metadata of `p`, edited by `edit`, written to a new file.
template <class Edit>
fs::path rewrite(const fs::path& p, const std::string& name, Edit&& edit) {
    const auto f = io::safetensors_file::open(p);
    std::vector<io::tensor_data> ts;
    for (const auto& t : f.tensors()) ts.push_back({t.name(), t.type(), t.shape(), t.bytes()});
    auto md = f.metadata();
    std::vector<std::vector<std::byte>> keep;
    keep.reserve(8);
    edit(ts, md, keep);
    const auto q = scratch(name + ".safetensors");
    io::save_safetensors(q, ts, md);
    return q;
}

io::tensor_data* find(std::vector<io::tensor_data>& ts, const std::string& name) {
    for (auto& t : ts)
        if (t.name == name) return &t;
    FAIL("no tensor " << name);
    return nullptr;
}

/// Replaces tensor `name`'s I64 values.
void set_i64(std::vector<io::tensor_data>& ts, std::vector<std::vector<std::byte>>& keep, const std::string& name,
             const std::vector<std::int64_t>& v) {
    auto* t = find(ts, name);
    auto& b = keep.emplace_back(v.size() * 8);
    std::memcpy(b.data(), v.data(), b.size());
    t->shape = {v.size()};
    t->bytes = b;
}

template <class Edit>
void refused(const fs::path& good, const std::string& name, Edit&& edit, const std::string& what) {
    CAPTURE(name);
    const auto q = rewrite(good, name, edit);
    std::string msg;
    try {
        (void)io::load_backbone<bad_c>(q);
    } catch (const io_error& e) {
        msg = e.what();
    }
    CAPTURE(msg);
    CHECK(msg.find(q.string()) != std::string::npos);  // the file
    CHECK(msg.find(what) != std::string::npos);        // the tensor / entry and the rule
    fs::remove(q);
}

}  // namespace

TEST_CASE("cpet backbone files: another policy, architecture, kind, version or layer count is refused by name") {
    const auto layers = two_layers<bad_c>();
    const auto p = scratch("good.safetensors");
    io::save_backbone(p, layers, shape<bad_c>());
    CHECK_THROWS_WITH_AS((void)io::load_backbone<config::llama<compress::w8a8>>(p),
                         doctest::Contains("holds a backbone compressed with 'int8_per_channel', loaded as one "
                                           "compressed with 'w8a8'"),
                         io_error);
    CHECK_THROWS_WITH_AS((void)io::load_backbone<config::gpt2<compress::int8_per_channel>>(p),
                         doctest::Contains("holds layers of architecture 'placement=pre norm=rmsnorm ffn=swiglu"),
                         io_error);
    CHECK_THROWS_WITH_AS((void)io::load_backbone<bad_c>(p, 3), doctest::Contains("the backbone has 2 layers, expected 3"),
                         io_error);
    CHECK_THROWS_WITH_AS((void)io::weights_reader(p), doctest::Contains("holds cpet backbone data, expected weights"),
                         io_error);
    CHECK_THROWS_WITH_AS((void)io::load_task<pet::lora>(p, layers[0].layer.pet_dims()),
                         doctest::Contains("holds cpet backbone data, expected task"), io_error);
    refused(p, "v2", [](auto&, auto& md, auto&) { md["cpet.version"] = "2"; },
            "written in cpet file format version 2, this cpet reads version 1");
    refused(p, "weights_kind", [](auto&, auto& md, auto&) { md["cpet.format"] = "weights"; },
            "holds cpet weights data, expected backbone");
    // a stack needs one shape; the pruned layer 1 differs from layer 0
    CHECK_THROWS_WITH_AS((void)io::load_stack<bad_c>(p), doctest::Contains("Stack: layer 1"), io_error);
    fs::remove_all(p.parent_path());
}

TEST_CASE("cpet backbone files: hand-made bad files are refused naming the file, the tensor and the rule") {
    const auto layers = two_layers<bad_c>();
    const auto p = scratch("good.safetensors");
    io::save_backbone(p, layers, shape<bad_c>());
    REQUIRE_NOTHROW((void)io::load_backbone<bad_c>(p));
    const auto& kept = layers[1].kept_kv_heads;
    REQUIRE(kept.size() == 1);

    refused(p, "missing", [](auto& ts, auto&, auto&) { ts.erase(ts.begin() + std::ptrdiff_t(find(ts, "layers.1.o.bias") - ts.data())); },
            "tensor 'layers.1.o.bias' is missing");  // a compensated bias on LLaMA: cpet.layer.1.biases lists it
    refused(p, "biases_entry", [](auto&, auto& md, auto&) { md["cpet.layer.0.biases"] = "o q"; },
            "cpet.layer.0.biases is 'o q', expected 'none' or some of 'q k v o up gate down' in that order");
    refused(p, "missing_codes",
            [](auto& ts, auto&, auto&) { ts.erase(ts.begin() + std::ptrdiff_t(find(ts, "layers.0.k.codes") - ts.data())); },
            "tensor 'layers.0.k.codes' is missing");
    refused(p, "missing_norm",
            [](auto& ts, auto&, auto&) { ts.erase(ts.begin() + std::ptrdiff_t(find(ts, "layers.1.norm2.gamma") - ts.data())); },
            "tensor 'layers.1.norm2.gamma' is missing");
    refused(p, "shape",
            [](auto& ts, auto&, auto&) {
                auto* t = find(ts, "layers.0.norm1.gamma");
                t->shape = {32};
                t->bytes = t->bytes.first(128);
            },
            "tensor 'layers.0.norm1.gamma' is F32 [32], expected F32 [64]");
    refused(p, "codes_shape",
            [](auto& ts, auto&, auto&) { find(ts, "layers.1.up.codes")->shape = {64, 96}; },
            "tensor 'layers.1.up.codes' is I8 [64, 96], expected I8 [96, 64]");
    refused(p, "dtype",
            [](auto& ts, auto&, auto&) {
                auto* t = find(ts, "layers.0.kept_kv_heads");
                t->type = io::dtype::F64;
            },
            "tensor 'layers.0.kept_kv_heads' is F64 [2], expected I64 [*]");
    refused(p, "scales_dtype",
            [](auto& ts, auto&, auto&) {
                auto* t = find(ts, "layers.0.q.scales");
                t->type = io::dtype::I32;
            },
            "tensor 'layers.0.q.scales' is I32 [64, 1], expected F32 [64, 1]");
    refused(p, "range",
            [&](auto& ts, auto&, auto& keep) {
                std::vector<std::int64_t> v(layers[1].kept_neurons.begin(), layers[1].kept_neurons.end());
                v.back() = 1000;
                set_i64(ts, keep, "layers.1.kept_neurons", v);
            },
            "layer 1: layers.1.kept_neurons[95] = 1000 is not an ascending index below the dense layer's 128 FFN neurons");
    refused(p, "order",
            [&](auto& ts, auto&, auto& keep) {
                std::vector<std::int64_t> v(layers[1].kept_neurons.begin(), layers[1].kept_neurons.end());
                std::swap(v[0], v[1]);
                set_i64(ts, keep, "layers.1.kept_neurons", v);
            },
            "layers.1.kept_neurons[1]");
    refused(p, "length",
            [](auto& ts, auto&, auto& keep) { set_i64(ts, keep, "layers.0.kept_heads", {0, 1, 2}); },
            "layer 0: layers.0.kept_heads has 3 indices, the layer has 4 query heads");
    refused(p, "grouping",
            [&](auto& ts, auto&, auto& keep) {
                // layer 1 kept KV head g and so query heads 2g, 2g+1; claim the other group's query heads
                const std::int64_t g = kept[0], o = 1 - g;
                set_i64(ts, keep, "layers.1.kept_heads", {2 * o, 2 * o + 1});
            },
            "is not query head 0 of kept KV head");
    refused(p, "dense_counts", [](auto&, auto& md, auto&) { md["cpet.layer.1.dense"] = "n_heads=4 n_kv_heads=2 d_ff=90"; },
            "layers.1.kept_neurons: the dense layer's 90 FFN neurons are fewer than the 96 kept");
    refused(p, "unknown",
            [](auto& ts, auto&, auto&) {
                static const std::vector<float> one{1.f};
                ts.push_back(io::make_tensor("layers.0.q.lora_A", {1}, one));
            },
            "tensor 'layers.0.q.lora_A' is not part of a backbone of 2 layers");
    refused(p, "shape_entry", [](auto&, auto& md, auto&) { md["cpet.layer.0.shape"] = "d_model=64 n_heads=4"; },
            "cpet.layer.0.shape is 'd_model=64 n_heads=4', expected 'd_model=<n>");
    refused(p, "shape_values",
            [](auto&, auto& md, auto&) {
                md["cpet.layer.0.shape"] =
                    "d_model=64 n_heads=3 n_kv_heads=2 head_dim=16 d_ff=128 eps=1e-06 rope_base=500000 rope=interleaved";
            },
            "n_heads (3) must be a multiple of n_kv_heads (2)");
    refused(p, "no_shape", [](auto&, auto& md, auto&) { md.erase("cpet.layer.1.shape"); },
            "layer 1: no cpet.layer.1.shape metadata");
    refused(p, "layer_count", [](auto&, auto& md, auto&) { md["cpet.layers"] = "3"; }, "layer 2: no cpet.layer.2.shape metadata");
    refused(p, "layer_count_text", [](auto&, auto& md, auto&) { md["cpet.layers"] = "two"; },
            "cpet.layers is 'two', expected a layer count");
    refused(p, "format", [](auto&, auto& md, auto&) { md["cpet.weight.layers.0.q"] = "dense_f32"; },
            "weight 'layers.0.q' is stored as dense_f32, expected quantized:int8:per_channel:sym:a32");
    refused(p, "code", [](auto& ts, auto&, auto& keep) {
                auto* t = find(ts, "layers.0.q.scales");
                auto& b = keep.emplace_back(t->bytes.begin(), t->bytes.end());
                const float nan = std::numeric_limits<float>::quiet_NaN();
                std::memcpy(b.data(), &nan, 4);
                t->bytes = b;
            },
            "weight 'layers.0.q'");
    fs::remove_all(p.parent_path());
}

TEST_CASE("TransformerLayer from parts: a part of the wrong shape or kind is refused by name") {
    using C = config::llama<compress::dense>;
    const auto s = shape<C>();
    const auto w = nn::random_layer_weights(s, 3, nn::kind_of<C>);
    using L = nn::Linear<compress::dense_f32>;
    auto parts = [&] {
        nn::layer_parts<C> p;
        p.q = L(compress::dense_f32(w.wq.view()));
        p.k = L(compress::dense_f32(w.wk.view()));
        p.v = L(compress::dense_f32(w.wv.view()));
        p.o = L(compress::dense_f32(w.wo.view()));
        p.up = L(compress::dense_f32(w.w_up.view()));
        p.gate = L(compress::dense_f32(w.w_gate.view()));
        p.down = L(compress::dense_f32(w.w_down.view()));
        p.norm1 = nn::Norm<nn::norm_kind::rmsnorm>(w.norm1_gamma, {}, s.eps);
        p.norm2 = nn::Norm<nn::norm_kind::rmsnorm>(w.norm2_gamma, {}, s.eps);
        return p;
    };
    // Built from the same weights, the parts constructor gives the layer the dense constructor does.
    const nn::TransformerLayer<C> from_parts(parts(), s), from_weights(w, s);
    same_forward(from_parts, from_weights);

    auto p = parts();
    p.q = L(compress::dense_f32(w.wk.view()));
    CHECK_THROWS_WITH_AS(nn::TransformerLayer<C>(std::move(p), s),
                         "Attention: part q is [32, 64], expected [q_dim, d_model] = [64, 64]", shape_error);
    p = parts();
    p.down = L(compress::dense_f32(w.w_up.view()));
    CHECK_THROWS_WITH_AS(nn::TransformerLayer<C>(std::move(p), s), doctest::Contains("FFN: part down is [128, 64]"),
                         shape_error);
    p = parts();
    p.gate.reset();
    CHECK_THROWS_WITH_AS(nn::TransformerLayer<C>(std::move(p), s), doctest::Contains("FFN: part gate is missing"),
                         shape_error);
    p = parts();
    p.norm2 = nn::Norm<nn::norm_kind::rmsnorm>(w.norm2_gamma, {}, 1e-5f);
    CHECK_THROWS_WITH_AS(nn::TransformerLayer<C>(std::move(p), s), doctest::Contains("part norm2 has eps"), shape_error);

    using B = config::bert<compress::dense>;
    const auto sb = shape<B>();
    const auto wb = nn::random_layer_weights(sb, 4, nn::kind_of<B>);
    auto bert_parts = [&](bool q_bias, bool beta2) {
        nn::layer_parts<B> pb;
        pb.q = q_bias ? L(compress::dense_f32(wb.wq.view()), wb.bq) : L(compress::dense_f32(wb.wq.view()));
        pb.k = L(compress::dense_f32(wb.wk.view()), wb.bk);
        pb.v = L(compress::dense_f32(wb.wv.view()), wb.bv);
        pb.o = L(compress::dense_f32(wb.wo.view()), wb.bo);
        pb.up = L(compress::dense_f32(wb.w_up.view()), wb.b_up);
        pb.down = L(compress::dense_f32(wb.w_down.view()), wb.b_down);
        pb.norm1 = nn::Norm<nn::norm_kind::layernorm>(wb.norm1_gamma, wb.norm1_beta, sb.eps);
        pb.norm2 = nn::Norm<nn::norm_kind::layernorm>(wb.norm2_gamma, beta2 ? wb.norm2_beta : std::vector<float>{}, sb.eps);
        return pb;
    };
    CHECK_NOTHROW(nn::TransformerLayer<B>(bert_parts(true, true), sb));
    CHECK_THROWS_WITH_AS(nn::TransformerLayer<B>(bert_parts(false, true), sb),
                         doctest::Contains("Attention: part q has no bias"), shape_error);
    CHECK_THROWS_WITH_AS(nn::TransformerLayer<B>(bert_parts(true, false), sb),
                         doctest::Contains("part norm2 has 0 β values"), shape_error);
}

TEST_CASE("cpet backbone files: the fuzzer's committed seeds are valid files of the current layout") {
    const auto dir = testing::source_root() / "tests" / "fuzz" / "corpus" / "cpet_format";
    using nm8 = compress::nm_sparse<2, 4, compress::sparsity_score::magnitude, compress::sparse_values::int8>;
    CHECK(io::load_backbone<config::bert<compress::dense>>(dir / "backbone_bert_dense", 1).size() == 1);
    const auto l = io::load_backbone<config::llama<compress::int8_per_channel>>(dir / "backbone_llama_int8_pruned", 2);
    CHECK(l[1].kept.heads.size() == 2);
    CHECK(io::load_backbone<config::bert<nm8>>(dir / "backbone_bert_nm24_int8", 1).size() == 1);
    const io::weights_reader w(dir / "weights_sparse");
    CHECK(w.get<compress::unstructured_sparse_f32>("layers.0.up").packed().nnz() == 240);
    CHECK(w.get<compress::nm_sparse_f32>("layers.0.down").packed().value_type() == compress::sparse_values::int8);
}

}  // namespace cpet_test_io_backbone_file
