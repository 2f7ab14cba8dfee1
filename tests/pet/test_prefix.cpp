// Prefix tuning / P-tuning v2: per-layer key/value prefixes against the Eigen reference (bidirectional and
// causal), the causal KV cache equal to a full recompute, the reparametrisation MLP folded away, bad input.
#include <vector>

#include "cpet/pet/pet.hpp"
#include "pet/pet_testing.hpp"

namespace cpet_test_pet_prefix {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using testing::MatD;

namespace {

const std::vector<index_t> lengths{7, 1, 5};

template <class M>
testing::reference_hooks prefix_ref(const M& m) {
    testing::reference_hooks h;
    h.prefix_k = testing::to_double(m.k);
    h.prefix_v = testing::to_double(m.v);
    return h;
}

}  // namespace

TEST_CASE_TEMPLATE("prefix tuning matches the Eigen reference with bidirectional and causal attention", T,
                   testing::with<config::bert<compress::dense>, pet::prefix_tuning>, testing::with<config::llama<compress::dense>, pet::p_tuning_v2>,
                   testing::with<config::gpt2<testing::rounded<4>>, pet::prefix_tuning>) {
    using C = typename T::config;
    using P = typename T::pet;
    const auto s = testing::shape_for<C>();
    const TransformerLayer<C> layer(nn::random_layer_weights(s, 500, nn::kind_of<C>), s);
    for (index_t L : {1, 5}) {
        const auto task = P::make(layer.pet_dims(), {.length = L}, 501);
        CHECK(task.length() == L);
        const auto wd = nn::dense_weights_of(layer);
        const auto x = testing::random_matrix(21, s.d_model, 502);
        const MatD ref = testing::reference_batch<C>({wd}, s, testing::to_double(x), lengths, {prefix_ref(task)});
        const MatD plain = testing::reference_batch<C>({wd}, s, testing::to_double(x), lengths);
        testing::for_each_isa([&](arch::isa) {
            nn::workspace ws;
            Matrix<float> y(21, s.d_model);
            layer.forward(x, lengths, y, ws, task);
            CHECK(testing::valid_error(y, ref, lengths) <= testing::pet_tol);
            CHECK(testing::valid_error(y, plain, lengths) > 1e-3);
        });
    }
}

TEST_CASE("P-tuning v2 deep prompts with the causal KV cache equal a full recompute (prefill + decode steps)") {
    using C = config::llama<compress::dense>;
    const auto s = testing::llama_shape();
    std::vector<nn::dense_layer_weights> w{nn::random_layer_weights(s, 510, nn::kind_of<C>),
                                           nn::random_layer_weights(s, 511, nn::kind_of<C>)};
    const Stack<C> stack(w, s);
    std::vector<pet::p_tuning_v2::modules> tasks{pet::p_tuning_v2::make(stack.layer(0).pet_dims(), {.length = 4}, 1),
                                                 pet::p_tuning_v2::make(stack.layer(1).pet_dims(), {.length = 4}, 2)};
    const auto x = testing::random_matrix(21, s.d_model, 512);
    const MatD ref = testing::reference_batch<C>(w, s, testing::to_double(x), lengths,
                                                 {prefix_ref(tasks[0]), prefix_ref(tasks[1])});
    testing::for_each_isa([&](arch::isa) {
        nn::workspace ws;
        Matrix<float> y(21, s.d_model);
        stack.forward(x, lengths, y, ws, tasks);
        CHECK(testing::valid_error(y, ref, lengths) <= testing::pet_tol);
        // prefill the first 3 tokens of each sequence (fewer where shorter), then one token per step
        auto caches = stack.make_cache(3, 4 + 7);
        const std::vector<index_t> pre{3, 1, 3};
        Matrix<float> xp(9, s.d_model), yp(9, s.d_model);
        for (index_t b = 0; b < 3; ++b)
            for (index_t t = 0; t < 3; ++t)
                for (index_t c = 0; c < s.d_model; ++c) xp(b * 3 + t, c) = x(b * 7 + t, c);
        stack.decode(xp, pre, yp, caches, ws, tasks);
        for (index_t b = 0; b < 3; ++b)
            CHECK(testing::rel_error(yp.view().middle_rows(b * 3, pre[std::size_t(b)]),
                                     ref.middleRows(b * 7, pre[std::size_t(b)])) <= testing::pet_tol);
        CHECK(caches[0].prefix_length(0) == 4);
        CHECK(caches[1].length(0) == 4 + 3);
        CHECK(caches[1].tokens(1) == 1);
        Matrix<float> xt(3, s.d_model), yt(3, s.d_model);
        for (index_t t = 1; t < 7; ++t) {
            std::vector<index_t> n(3);
            for (index_t b = 0; b < 3; ++b) {
                const index_t pos = caches[0].tokens(b);
                n[std::size_t(b)] = pos < lengths[std::size_t(b)] ? 1 : 0;
                for (index_t c = 0; c < s.d_model; ++c) xt(b, c) = n[std::size_t(b)] ? x(b * 7 + pos, c) : 0.f;
            }
            std::vector<index_t> pos(3);
            for (index_t b = 0; b < 3; ++b) pos[std::size_t(b)] = caches[0].tokens(b);
            stack.decode(xt, n, yt, caches, ws, tasks);
            for (index_t b = 0; b < 3; ++b)
                if (n[std::size_t(b)])
                    CHECK(testing::rel_error(yt.view().middle_rows(b, 1), ref.middleRows(b * 7 + pos[std::size_t(b)], 1)) <=
                          testing::pet_tol);
        }
        // truncating keeps the prefix; clearing forgets it
        caches[0].truncate(0, 2);
        CHECK(caches[0].length(0) == 6);
        caches[0].clear();
        CHECK(caches[0].prefix_length(0) == 0);
    });
}

TEST_CASE("the prefix reparametrisation MLP folds away: folded prefixes equal the MLP's output") {
    using C = config::bert<compress::dense>;
    const auto s = testing::bert_shape();
    std::vector<nn::dense_layer_weights> w{nn::random_layer_weights(s, 520, nn::kind_of<C>),
                                           nn::random_layer_weights(s, 521, nn::kind_of<C>)};
    const Stack<C> stack(w, s);
    const auto rp = pet::prefix_reparam::random(6, 32, 48, 2, s.kv_dim(), 522);
    const auto tasks = rp.fold();
    REQUIRE(tasks.size() == 2);
    // the MLP in double, straight from its formula
    MatD h = testing::to_double(rp.embedding) * testing::to_double(rp.w1).transpose();
    for (Eigen::Index r = 0; r < h.rows(); ++r)
        for (Eigen::Index c = 0; c < h.cols(); ++c) h(r, c) = std::tanh(h(r, c) + rp.b1[std::size_t(c)]);
    MatD p = h * testing::to_double(rp.w2).transpose();
    for (Eigen::Index r = 0; r < p.rows(); ++r)
        for (Eigen::Index c = 0; c < p.cols(); ++c) p(r, c) += rp.b2[std::size_t(c)];
    std::vector<testing::reference_hooks> hooks(2);
    for (index_t l = 0; l < 2; ++l) {
        hooks[std::size_t(l)].prefix_k = p.middleCols(2 * l * s.kv_dim(), s.kv_dim());
        hooks[std::size_t(l)].prefix_v = p.middleCols((2 * l + 1) * s.kv_dim(), s.kv_dim());
        CHECK(testing::rel_error(tasks[std::size_t(l)].k, hooks[std::size_t(l)].prefix_k) <= 1e-6);
    }
    const auto x = testing::random_matrix(21, s.d_model, 523);
    const MatD ref = testing::reference_batch<C>(w, s, testing::to_double(x), lengths, hooks);
    nn::workspace ws;
    Matrix<float> y(21, s.d_model);
    stack.forward(x, lengths, y, ws, tasks);
    CHECK(testing::valid_error(y, ref, lengths) <= testing::pet_tol);
    CHECK(rp.parameter_count() == 6 * 32 + 48 * 32 + 48 + 2 * 2 * s.kv_dim() * 48 + 2 * 2 * s.kv_dim());
}

TEST_CASE("prefix bad input: beyond the KV cache capacity, a cache of another task, wrong widths") {
    using C = config::llama<compress::dense>;
    const auto s = testing::llama_shape();
    const TransformerLayer<C> layer(nn::random_layer_weights(s, 530, nn::kind_of<C>), s);
    const auto task = pet::prefix_tuning::make(layer.pet_dims(), {.length = 8}, 1);
    nn::workspace ws;
    const std::vector<index_t> one{3};
    Matrix<float> x = testing::random_matrix(3, s.d_model, 531), y(3, s.d_model);
    auto small = layer.make_cache(1, 10);
    CHECK_THROWS_WITH_AS(layer.decode(x, one, y, small, ws, task),
                         doctest::Contains("prefix of 8 rows plus 3 new tokens of sequence 0 exceed the kv_cache "
                                           "capacity of 10"),
                         shape_error);
    CHECK(small.length(0) == 0);  // nothing changed
    auto cache = layer.make_cache(1, 16);
    layer.decode(x, one, y, cache, ws, task);
    CHECK(cache.length(0) == 11);
    const auto other = pet::prefix_tuning::make(layer.pet_dims(), {.length = 2}, 2);
    CHECK_THROWS_WITH_AS(layer.decode(x.view().middle_rows(0, 1), std::vector<index_t>{1}, y.view().middle_rows(0, 1),
                                      cache, ws, other),
                         doctest::Contains("holds a prefix of 8 rows, the task's prefix has 2"), shape_error);
    CHECK_THROWS_WITH_AS(pet::prefix_tuning::make(layer.pet_dims(), {.length = 0}), doctest::Contains("length"),
                         shape_error);
    pet::prefix_tuning::modules bad;
    CHECK_THROWS_AS(bad.set(Matrix<float>(2, 4), Matrix<float>(3, 4)), shape_error);
}

}  // namespace cpet_test_pet_prefix
