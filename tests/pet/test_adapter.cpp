// Adapters: sequential (Houlsby), parallel and scaled parallel, after attention and / or FFN, against the Eigen
// reference of the same formula; fresh adapters are the identity; bad input.
#include <vector>

#include "cpet/pet/pet.hpp"
#include "pet/pet_references.hpp"

namespace cpet_test_pet_adapter {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using testing::MatD;

namespace {
const std::vector<index_t> lengths{7, 1, 5};
}  // namespace

using testing::random_adapter;

TEST_CASE_TEMPLATE("adapters (sequential, parallel, scaled parallel) match the Eigen reference", P, pet::adapter,
                   pet::parallel_adapter, pet::scaled_parallel_adapter,
                   pet::adapter_policy<pet::adapter_form::sequential, kernels::activation::gelu_erf>) {
    auto check = [](auto config_tag, bool attention, bool ffn) {
        using C = decltype(config_tag);
        const auto s = testing::shape_for<C>();
        const TransformerLayer<C> layer(nn::random_layer_weights(s, 200, nn::kind_of<C>), s);
        typename P::options o;
        o.bottleneck = 8;
        o.attention = attention;
        o.ffn = ffn;
        const auto task = random_adapter<P>(layer.pet_dims(), o, 210);
        CHECK(task.has(pet::sublayer::attention) == attention);
        const auto wd = nn::dense_weights_of(layer);
        const auto x = testing::random_matrix(21, s.d_model, 201);
        const MatD ref = testing::reference_batch<C>({wd}, s, testing::to_double(x), lengths,
                                                     {testing::adapter_ref<P>(task)});
        const MatD plain = testing::reference_batch<C>({wd}, s, testing::to_double(x), lengths);
        testing::for_each_isa([&](arch::isa) {
            nn::workspace ws;
            Matrix<float> y(21, s.d_model);
            layer.forward(x, lengths, y, ws, task);
            CHECK(testing::valid_error(y, ref, lengths) <= testing::pet_tol);
            CHECK(testing::valid_error(y, plain, lengths) > 1e-3);
        });
    };
    check(config::bert<compress::dense>{}, true, true);
    check(config::llama<compress::dense>{}, true, true);
    check(config::bert<testing::rounded<4>>{}, false, true);
    check(config::gpt2<compress::dense>{}, true, false);
}

TEST_CASE("fresh adapters are the identity; bad input") {
    using C = config::bert<compress::dense>;
    const auto s = testing::bert_shape();
    const auto w = nn::random_layer_weights(s, 220, nn::kind_of<C>);
    const TransformerLayer<C> layer(w, s);
    const auto task = pet::scaled_parallel_adapter::make(layer.pet_dims(), {.bottleneck = 16}, 1);
    CHECK(task.scale() == 4.f);
    const auto x = testing::random_matrix(21, s.d_model, 221);
    const MatD plain = testing::reference_batch<C>({w}, s, testing::to_double(x), lengths);
    nn::workspace ws;
    Matrix<float> y(21, s.d_model);
    layer.forward(x, lengths, y, ws, task);
    CHECK(testing::valid_error(y, plain, lengths) <= testing::pet_tol);
    CHECK_THROWS_WITH_AS(pet::adapter::make(layer.pet_dims(), {.bottleneck = 65}),
                         doctest::Contains("bottleneck 65 outside [1, d_model = 64]"), shape_error);
    CHECK_THROWS_WITH_AS(pet::adapter::make(layer.pet_dims(), {.attention = false, .ffn = false}),
                         doctest::Contains("neither"), shape_error);
    auto m = pet::adapter::make(layer.pet_dims(), {});
    CHECK_THROWS_WITH_AS(m.set(pet::sublayer::ffn, Matrix<float>(8, 64), Matrix<float>(64, 9)),
                         doctest::Contains("W_up"), shape_error);
    CHECK(pet::count_parameters(m, 0).trainable == 2 * (64 * 64 + 64 + 64 * 64 + 64));
}

}  // namespace cpet_test_pet_adapter
