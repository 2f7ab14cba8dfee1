// TransformerLayer / Stack against a plain Eigen (double) layer, on every ISA path.
#include <cmath>
#include <limits>
#include <vector>

#include "cpet/nn/nn.hpp"
#include "nn/reference_layer.hpp"
#include "support/testing.hpp"

namespace cpet_test_nn_layer {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using testing::MatD;

namespace {

nn::layer_shape bert_shape() {
    nn::layer_shape s;
    s.d_model = 64, s.n_heads = 4, s.n_kv_heads = 4, s.head_dim = 16, s.d_ff = 128, s.eps = 1e-12f;
    return s;
}
nn::layer_shape llama_shape() {  // GQA 4/2
    nn::layer_shape s;
    s.d_model = 96, s.n_heads = 4, s.n_kv_heads = 2, s.head_dim = 24, s.d_ff = 176, s.eps = 1e-6f;
    return s;
}

constexpr double tol = 1e-5;

/// Relative error of the valid rows of every sequence (padded rows must be zero).
double batch_error(ConstMatrixView<float> y, const MatD& ref, const std::vector<index_t>& lengths) {
    const index_t B = index_t(lengths.size()), S = B ? y.rows() / B : 0;
    double worst = 0;
    for (index_t b = 0; b < B; ++b) {
        const index_t len = lengths[std::size_t(b)];
        if (len > 0)
            worst = std::max(worst, testing::rel_error(y.middle_rows(b * S, len), ref.middleRows(b * S, len)));
        for (index_t t = len; t < S; ++t)
            for (index_t c = 0; c < y.cols(); ++c) CHECK(y(b * S + t, c) == 0.f);
    }
    return worst;
}

template <class C>
void check_against_reference(const nn::layer_shape& s, unsigned seed) {
    const auto w = nn::random_layer_weights(s, seed, nn::kind_of<C>);
    const TransformerLayer<C> layer(w, s);
    nn::workspace ws;
    const std::vector<std::vector<index_t>> batches{{1}, {7}, {7, 1, 5}, {3, 0, 2}};
    for (const auto& lengths : batches) {
        const index_t S = *std::max_element(lengths.begin(), lengths.end());
        const index_t M = index_t(lengths.size()) * S;
        const auto x = testing::random_matrix(M, s.d_model, seed + unsigned(M));
        const MatD ref = testing::reference_batch<C>({w}, s, testing::to_double(x), lengths);
        CAPTURE(M);
        testing::for_each_isa([&](arch::isa i) {
            Matrix<float> y(M, s.d_model);
            layer.forward(x, lengths, y, ws);
            CHECK(ws.last_isa() == i);
            const double err = batch_error(y, ref, lengths);
            CHECK(err <= tol);
        });
    }
}

}  // namespace

TEST_CASE("BERT-style layer (post-LN, LayerNorm, GELU-erf MLP, bidirectional, MHA) matches the reference") {
    check_against_reference<config::bert<>>(bert_shape(), 11);
}

TEST_CASE("LLaMA-style layer (pre-LN, RMSNorm, SwiGLU, causal, RoPE, GQA 4/2) matches the reference") {
    check_against_reference<config::llama<>>(llama_shape(), 12);
}

TEST_CASE("GPT-2-style layer (pre-LN, LayerNorm, GELU-tanh MLP, causal, biases) matches the reference") {
    check_against_reference<config::gpt2<>>(bert_shape(), 13);
}

TEST_CASE("padded rows do not affect valid rows") {
    const auto s = llama_shape();
    const auto w = nn::random_layer_weights(s, 21, nn::kind_of<config::llama<>>);
    const TransformerLayer<config::llama<>> layer(w, s);
    const auto wb = nn::random_layer_weights(bert_shape(), 22, nn::kind_of<config::bert<>>);
    const TransformerLayer<config::bert<>> bert(wb, bert_shape());
    const std::vector<index_t> lengths{7, 1, 5};
    nn::workspace ws;
    auto run = [&](const auto& l, index_t d) {
        auto x = testing::random_matrix(21, d, 5);
        Matrix<float> y1(21, d), y2(21, d);
        l.forward(x, lengths, y1, ws);
        for (index_t b = 0; b < 3; ++b)
            for (index_t t = lengths[std::size_t(b)]; t < 7; ++t)
                for (index_t c = 0; c < d; ++c)
                    x(b * 7 + t, c) = (c % 2) ? std::numeric_limits<float>::quiet_NaN() : 1e30f;
        l.forward(x, lengths, y2, ws);
        for (index_t r = 0; r < 21; ++r)
            for (index_t c = 0; c < d; ++c) REQUIRE(y1(r, c) == y2(r, c));
    };
    testing::for_each_isa([&](arch::isa) {
        run(layer, s.d_model);
        run(bert, bert_shape().d_model);
    });
}

TEST_CASE("the layer works in place and allocates nothing after warm-up") {
    const auto s = bert_shape();
    const auto w = nn::random_layer_weights(s, 31, nn::kind_of<config::bert<>>);
    const TransformerLayer<config::bert<>> layer(w, s);
    const std::vector<index_t> lengths{7, 1, 5};
    const auto x = testing::random_matrix(21, s.d_model, 32);
    nn::workspace ws;
    Matrix<float> y(21, s.d_model);
    layer.forward(x, lengths, y, ws);
    const auto allocs = ws.allocations();
    Matrix<float> z(x.view());
    layer.forward(z, lengths, z, ws);  // in place
    CHECK(ws.allocations() == allocs);
    for (index_t r = 0; r < 21; ++r)
        for (index_t c = 0; c < s.d_model; ++c) REQUIRE(z(r, c) == y(r, c));
}

TEST_CASE("decoding token by token with the KV cache equals the full causal forward") {
    const auto s = llama_shape();
    const auto w = nn::random_layer_weights(s, 41, nn::kind_of<config::llama<>>);
    const TransformerLayer<config::llama<>> layer(w, s);
    const std::vector<index_t> lengths{7, 1, 5};
    const index_t B = 3, S = 7, d = s.d_model;
    const auto x = testing::random_matrix(B * S, d, 42);
    testing::for_each_isa([&](arch::isa) {
        nn::workspace ws;
        Matrix<float> full(B * S, d);
        layer.forward(x, lengths, full, ws);
        const MatD ref = testing::to_double(full);

        // one token at a time
        auto cache = layer.make_cache(B, 8);
        Matrix<float> xt(B, d), yt(B, d);
        for (index_t t = 0; t < S; ++t) {
            std::vector<index_t> n(3);
            for (index_t b = 0; b < B; ++b) {
                n[std::size_t(b)] = t < lengths[std::size_t(b)] ? 1 : 0;
                for (index_t c = 0; c < d; ++c) xt(b, c) = x(b * S + t, c);
            }
            layer.decode(xt, n, yt, cache, ws);
            for (index_t b = 0; b < B; ++b)
                if (n[std::size_t(b)]) CHECK(testing::rel_error(yt.view().middle_rows(b, 1), ref.middleRows(b * S + t, 1)) <= tol);
        }
        for (index_t b = 0; b < B; ++b) CHECK(cache.length(b) == lengths[std::size_t(b)]);

        // prefill 4 then 3 more (chunks of several tokens)
        cache.clear();
        for (auto [t0, n0] : {std::pair<index_t, index_t>{0, 4}, {4, 3}}) {
            Matrix<float> xc(B * n0, d), yc(B * n0, d);
            std::vector<index_t> n(3);
            for (index_t b = 0; b < B; ++b) {
                n[std::size_t(b)] = std::clamp<index_t>(lengths[std::size_t(b)] - t0, 0, n0);
                for (index_t t = 0; t < n0; ++t)
                    for (index_t c = 0; c < d; ++c) xc(b * n0 + t, c) = t0 + t < S ? x(b * S + t0 + t, c) : 0.f;
            }
            layer.decode(xc, n, yc, cache, ws);
            for (index_t b = 0; b < B; ++b)
                if (n[std::size_t(b)] > 0)
                    CHECK(testing::rel_error(yc.view().middle_rows(b * n0, n[std::size_t(b)]),
                                             ref.middleRows(b * S + t0, n[std::size_t(b)])) <= tol);
        }
    });
}

TEST_CASE("a Stack equals chaining the reference layer; its decode equals its forward") {
    SUBCASE("BERT encoder, 3 layers") {
        const auto s = bert_shape();
        std::vector<nn::dense_layer_weights> ws_;
        for (unsigned l = 0; l < 3; ++l) ws_.push_back(nn::random_layer_weights(s, 50 + l, nn::kind_of<config::bert<>>));
        const Stack<config::bert<>> stack(ws_, s);
        CHECK(stack.size() == 3);
        const std::vector<index_t> lengths{7, 1, 5};
        const auto x = testing::random_matrix(21, s.d_model, 55);
        const MatD ref = testing::reference_batch<config::bert<>>(ws_, s, testing::to_double(x), lengths);
        testing::for_each_isa([&](arch::isa i) {
            nn::workspace ws;
            Matrix<float> y(21, s.d_model);
            stack.forward(x, lengths, y, ws);
            CHECK(ws.last_isa() == i);
            CHECK(batch_error(y, ref, lengths) <= tol);
        });
    }
    SUBCASE("LLaMA decoder, 2 layers") {
        const auto s = llama_shape();
        std::vector<nn::dense_layer_weights> ws_;
        for (unsigned l = 0; l < 2; ++l) ws_.push_back(nn::random_layer_weights(s, 60 + l, nn::kind_of<config::llama<>>));
        const Stack<config::llama<>> stack(ws_, s);
        const std::vector<index_t> lengths{7, 1, 5};
        const auto x = testing::random_matrix(21, s.d_model, 65);
        const MatD ref = testing::reference_batch<config::llama<>>(ws_, s, testing::to_double(x), lengths);
        testing::for_each_isa([&](arch::isa) {
            nn::workspace ws;
            Matrix<float> y(21, s.d_model);
            stack.forward(x, lengths, y, ws);
            CHECK(batch_error(y, ref, lengths) <= tol);
            auto caches = stack.make_cache(3, 7);
            Matrix<float> xt(3, s.d_model), yt(3, s.d_model);
            for (index_t t = 0; t < 7; ++t) {
                std::vector<index_t> n(3);
                for (index_t b = 0; b < 3; ++b) {
                    n[std::size_t(b)] = t < lengths[std::size_t(b)] ? 1 : 0;
                    for (index_t c = 0; c < s.d_model; ++c) xt(b, c) = x(b * 7 + t, c);
                }
                stack.decode(xt, n, yt, caches, ws);
                for (index_t b = 0; b < 3; ++b)
                    if (n[std::size_t(b)]) CHECK(testing::rel_error(yt.view().middle_rows(b, 1), ref.middleRows(b * 7 + t, 1)) <= tol);
            }
        });
    }
}

TEST_CASE("bad input: shapes, empty batch, cache overflow, NaN") {
    const auto s = llama_shape();
    const auto w = nn::random_layer_weights(s, 71, nn::kind_of<config::llama<>>);
    const TransformerLayer<config::llama<>> layer(w, s);
    nn::workspace ws;
    const std::vector<index_t> two{3, 2};

    SUBCASE("wrong input width names the operand") {
        Matrix<float> x(6, s.d_model - 1), y(6, s.d_model);
        try {
            layer.forward(x, two, y, ws);
            FAIL("no exception");
        } catch (const shape_error& e) {
            const std::string m = e.what();
            CHECK(m.find("x: expected shape *x96, got 6x95") != std::string::npos);
            MESSAGE(m);
        }
        Matrix<float> x2(6, s.d_model), y2(5, s.d_model);
        CHECK_THROWS_WITH_AS(layer.forward(x2, two, y2, ws), doctest::Contains("y: expected shape 6x96"), shape_error);
        Matrix<float> x3(7, s.d_model), y3(7, s.d_model);
        CHECK_THROWS_WITH_AS(layer.forward(x3, two, y3, ws), doctest::Contains("not a multiple of the batch size"),
                             shape_error);
        const std::vector<index_t> too_long{4, 2};
        CHECK_THROWS_WITH_AS(layer.forward(x2, too_long, y2.view().middle_rows(0, 5), ws), doctest::Contains("y"),
                             shape_error);
        Matrix<float> y4(6, s.d_model);
        CHECK_THROWS_WITH_AS(layer.forward(x2, too_long, y4, ws), doctest::Contains("lengths[0] = 4"), shape_error);
    }
    SUBCASE("weights that do not fit the shape name the tensor") {
        auto bad = w;
        bad.wk = Matrix<float>(s.kv_dim() + 1, s.d_model);
        CHECK_THROWS_WITH_AS(TransformerLayer<config::llama<>>(bad, s), doctest::Contains("wk"), shape_error);
        auto bad2 = nn::random_layer_weights(bert_shape(), 1, nn::kind_of<config::bert<>>);
        bad2.b_up.pop_back();
        CHECK_THROWS_WITH_AS(TransformerLayer<config::bert<>>(bad2, bert_shape()), doctest::Contains("b_up"),
                             shape_error);
    }
    SUBCASE("empty batch gives empty output") {
        Matrix<float> x(0, s.d_model), y(0, s.d_model);
        layer.forward(x, std::span<const index_t>{}, y, ws);
        CHECK(y.rows() == 0);
        const std::vector<index_t> zeros{0, 0};
        auto cache = layer.make_cache(2, 4);
        layer.decode(x, zeros, y, cache, ws);
        CHECK(cache.length(0) == 0);
    }
    SUBCASE("KV cache overflow throws before changing the cache") {
        auto cache = layer.make_cache(2, 4);
        const auto x = testing::random_matrix(6, s.d_model, 3);
        Matrix<float> y(6, s.d_model);
        layer.decode(x, two, y, cache, ws);
        CHECK(cache.length(0) == 3);
        CHECK_THROWS_WITH_AS(layer.decode(x, two, y, cache, ws), doctest::Contains("exceed the capacity"),
                             shape_error);
        CHECK(cache.length(0) == 3);
        CHECK(cache.length(1) == 2);
        auto wrong = layer.make_cache(3, 4);
        CHECK_THROWS_AS(layer.decode(x, two, y, wrong, ws), shape_error);
    }
    SUBCASE("NaN input does not crash and stays in its sequence") {
        auto x = testing::random_matrix(6, s.d_model, 4);
        x(1, 5) = std::numeric_limits<float>::quiet_NaN();
        Matrix<float> y(6, s.d_model);
        testing::for_each_isa([&](arch::isa) {
            layer.forward(x, two, y, ws);
            bool finite_other = true;
            for (index_t r = 3; r < 6; ++r)
                for (index_t c = 0; c < s.d_model; ++c) finite_other = finite_other && std::isfinite(y(r, c));
            CHECK(finite_other);
            CHECK(std::isnan(y(1, 0)));
        });
    }
}

}  // namespace cpet_test_nn_layer
