// A task is checked against the layer before anything runs: modules built for another layer shape (LoRA,
// recovery, adapters, IA3, BitFit) are refused with a message naming the part, the expected and the actual size
// (they used to make the kernels read past x, A or B); a decode that is refused changes no cache (a stack's caches
// stay in step); prompt-tuning tokens where none can be applied are refused instead of ignored; RoPE needs an
// even head_dim, and the RoPE kernel never writes outside a head.
#include <vector>

#include "cpet/pet/pet.hpp"
#include "pet/pet_references.hpp"

namespace cpet_test_nn_task_checks {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using testing::MatD;

namespace {

// One configuration for every case (each configuration is a full layer compiled for every ISA): members the test
// does not set are empty and do nothing.
using task_stack = pet::stack<pet::lora, pet::recovery, pet::ia3, pet::parallel_adapter, pet::prompt_tuning>;
using C = config::llama<compress::dense>;
using modules = task_stack::modules;

nn::layer_shape wider_attention() {  // the same d_model, kv_dim and d_ff, wider q (and input of o)
    auto s = testing::llama_shape();
    s.n_heads = 6;  // q_dim 144 instead of 96
    return s;
}
nn::layer_shape wider_ffn() {
    auto s = testing::llama_shape();
    s.d_ff = 200;
    return s;
}
nn::layer_shape wider_model() {
    auto s = testing::llama_shape();
    s.d_model = 128;
    return s;
}
pet::layer_dims dims_of(const nn::layer_shape& s) {
    return TransformerLayer<config::llama<>>(nn::random_layer_weights(s, 1, nn::kind_of<C>), s).pet_dims();
}

const std::vector<index_t> lengths{5, 3};

/// y filled with a marker, to see that a refused call wrote nothing.
Matrix<float> marked(index_t rows, index_t cols) {
    Matrix<float> y(rows, cols);
    for (index_t i = 0; i < y.size(); ++i) y.data()[i] = 42.f;
    return y;
}
bool untouched(const Matrix<float>& y) {
    for (index_t i = 0; i < y.size(); ++i)
        if (y.data()[i] != 42.f) return false;
    return true;
}

}  // namespace

TEST_CASE("a LoRA, recovery, adapter or IA3 module built for another layer shape is refused before it runs") {
    const auto s = testing::llama_shape();
    const TransformerLayer<C> layer(nn::random_layer_weights(s, 10, nn::kind_of<C>), s);
    const auto x = testing::random_matrix(10, s.d_model, 11);
    nn::workspace ws;
    auto y = marked(10, s.d_model);

    SUBCASE("LoRA on o made for a wider attention (o's input q_dim 144, the layer's 96)") {
        modules m;
        m.get<0>() = pet::lora::make(dims_of(wider_attention()), {.rank = 4, .targets = {pet::target::o}}, 1);
        CHECK_THROWS_WITH_AS(layer.forward(x, lengths, y, ws, m),
                             doctest::Contains("lora: target o expects A [r, 96] and B [96, r] for this layer, the "
                                               "module holds A 4x144 and B 96x4"),
                             shape_error);
    }
    SUBCASE("recovery on down made for a wider FFN") {
        modules m;
        m.get<1>() = pet::recovery::make(dims_of(wider_ffn()), {.rank = 8, .targets = {pet::target::down}}, 1);
        CHECK_THROWS_WITH_AS(layer.forward(x, lengths, y, ws, m),
                             doctest::Contains("recovery: target down expects A [r, 176]"), shape_error);
    }
    SUBCASE("LoRA on q made for a wider model") {
        modules m;
        m.get<0>() = pet::lora::make(dims_of(wider_model()), {.rank = 4, .targets = {pet::target::q}}, 1);
        CHECK_THROWS_WITH_AS(layer.forward(x, lengths, y, ws, m), doctest::Contains("target q expects A [r, 96]"),
                             shape_error);
    }
    SUBCASE("an adapter made for a wider model") {
        modules m;
        m.get<3>() = pet::parallel_adapter::make(dims_of(wider_model()), {.bottleneck = 8}, 1);
        CHECK_THROWS_WITH_AS(layer.forward(x, lengths, y, ws, m),
                             doctest::Contains("parallel_adapter (attention) expects W_down [r, 96]"), shape_error);
    }
    SUBCASE("an IA3 vector of the FFN hidden made for a wider FFN") {
        modules m;
        m.get<2>() = pet::ia3::make(dims_of(wider_ffn()));
        CHECK_THROWS_WITH_AS(layer.forward(x, lengths, y, ws, m),
                             doctest::Contains("ia3 vector of down has 200 values, this layer needs 176"), shape_error);
    }
    CHECK(untouched(y));

    // the same modules made for this layer run
    modules ok;
    ok.get<0>() = pet::lora::make(layer.pet_dims(), {.rank = 4, .targets = {pet::target::o, pet::target::q}}, 1);
    ok.get<1>() = pet::recovery::make(layer.pet_dims(), {.rank = 8, .targets = {pet::target::down}}, 1);
    ok.get<2>() = pet::ia3::make(layer.pet_dims());
    ok.get<3>() = pet::parallel_adapter::make(layer.pet_dims(), {.bottleneck = 8}, 1);
    layer.forward(x, lengths, y, ws, ok);
    CHECK(!untouched(y));
}

TEST_CASE("a refused decode leaves the caches as they were; a stack's caches stay in step") {
    const auto s = testing::llama_shape();
    std::vector<nn::dense_layer_weights> w{nn::random_layer_weights(s, 20, nn::kind_of<C>),
                                           nn::random_layer_weights(s, 21, nn::kind_of<C>)};
    const Stack<C> stack(w, s);
    std::vector<modules> good(2), bad(2);
    for (std::size_t l = 0; l < 2; ++l) {
        good[l].get<0>() = pet::lora::make(stack.layer(l).pet_dims(), {.rank = 4}, 3 + unsigned(l));
        testing::randomize_up(good[l].get<0>(), stack.layer(l).pet_dims(), 5 + unsigned(l));
        good[l].get<2>() = testing::random_ia3(stack.layer(l).pet_dims(), {pet::target::k, pet::target::down}, 7);
        bad[l] = good[l];
    }
    // layer 1's IA3 vector of the FFN hidden is one of a wider FFN: its check comes after layer 0 and after
    // layer 1's attention wrote its keys, where the cache used to be advanced already
    bad[1].get<2>() = testing::random_ia3(dims_of(wider_ffn()), {pet::target::k, pet::target::down}, 7);

    const index_t B = 2, S = 4;
    const auto x = testing::random_matrix(B * S, s.d_model, 22);
    const std::vector<index_t> prefill{4, 2}, step{1, 1};
    nn::workspace ws;

    auto caches = stack.make_cache(B, 8);
    Matrix<float> y(B * S, s.d_model);
    stack.decode(x, prefill, y, caches, ws, good);
    auto lengths_of = [&] {
        std::vector<index_t> l;
        for (const auto& c : caches)
            for (index_t b = 0; b < B; ++b) l.push_back(c.length(b));
        return l;
    };
    const auto before = lengths_of();
    CHECK(before == std::vector<index_t>{4, 2, 4, 2});
    const auto xt = testing::random_matrix(B, s.d_model, 23);
    Matrix<float> yt(B, s.d_model);
    CHECK_THROWS_WITH_AS(stack.decode(xt, step, yt, caches, ws, bad),
                         doctest::Contains("ia3 vector of down has 200 values"), shape_error);
    CHECK(lengths_of() == before);
    // a single layer's decode too
    CHECK_THROWS_AS(stack.layer(1).decode(xt, step, yt, caches[1], ws, bad[1]), shape_error);
    CHECK(lengths_of() == before);

    // and the step that follows equals one on caches that never saw the refused calls
    auto fresh = stack.make_cache(B, 8);
    Matrix<float> y2(B * S, s.d_model), yt2(B, s.d_model);
    stack.decode(x, prefill, y2, fresh, ws, good);
    stack.decode(xt, step, yt, caches, ws, good);
    stack.decode(xt, step, yt2, fresh, ws, good);
    CHECK(testing::rel_error(yt, testing::to_double(yt2)) == 0.0);
    CHECK(lengths_of() == std::vector<index_t>{5, 3, 5, 3});
}

TEST_CASE("prompt-tuning tokens where none can be applied are refused, not ignored") {
    const auto s = testing::llama_shape();
    std::vector<nn::dense_layer_weights> w{nn::random_layer_weights(s, 30, nn::kind_of<C>),
                                           nn::random_layer_weights(s, 31, nn::kind_of<C>)};
    const Stack<C> stack(w, s);
    const auto x = testing::random_matrix(10, s.d_model, 32);
    nn::workspace ws;
    auto y = marked(10, s.d_model);
    modules prompted;
    prompted.get<4>() = pet::prompt_tuning::make(stack.layer(0).pet_dims(), {.length = 2}, 3);

    CHECK_THROWS_WITH_AS(stack.layer(0).forward(x, lengths, y, ws, prompted),
                         doctest::Contains("TransformerLayer::forward: the task carries 2 virtual tokens"), shape_error);
    auto cache = stack.layer(0).make_cache(2, 8);
    CHECK_THROWS_WITH_AS(stack.layer(0).decode(x, lengths, y, cache, ws, prompted),
                         doctest::Contains("virtual tokens"), shape_error);
    CHECK(cache.length(0) == 0);
    std::vector<modules> later(2);
    later[1] = prompted;  // tokens on layer 1: a stack takes them from layer 0 only
    CHECK_THROWS_WITH_AS(stack.forward(x, lengths, y, ws, later), doctest::Contains("Stack::forward: the task carries 2"),
                         shape_error);
    CHECK(untouched(y));
    // tokens of the wrong width on layer 0
    modules narrow;
    narrow.get<4>().tokens = Matrix<float>(2, s.d_model - 1);
    std::vector<modules> first{narrow, modules{}};
    CHECK_THROWS_WITH_AS(stack.forward(x, lengths, y, ws, first), doctest::Contains("expects tokens [P, 96]"),
                         shape_error);
    // on layer 0 they are applied
    std::vector<modules> ok{prompted, modules{}};
    stack.forward(x, lengths, y, ws, ok);
    CHECK(!untouched(y));
}

TEST_CASE("RoPE needs an even head_dim: a layer refuses an odd one") {
    auto s = testing::llama_shape();
    s.head_dim = 23, s.n_heads = 4, s.n_kv_heads = 2;
    const auto w = nn::random_layer_weights(s, 40, nn::kind_of<C>);
    CHECK_THROWS_WITH_AS((TransformerLayer<C>(w, s)), doctest::Contains("head_dim must be even with RoPE, got 23"),
                         shape_error);
}

}  // namespace cpet_test_nn_task_checks
