// IA3: learned rescaling of k, v (and q) outputs and the FFN hidden activation, against the Eigen reference.
#include <vector>

#include "cpet/pet/pet.hpp"
#include "pet/pet_references.hpp"

namespace cpet_test_pet_ia3 {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using testing::MatD;

namespace {
const std::vector<index_t> lengths{7, 1, 5};
}


TEST_CASE_TEMPLATE("IA3 rescaling matches the Eigen reference (k, v before RoPE; FFN hidden before down)", T,
                   testing::with<config::bert<compress::dense>, pet::ia3>, testing::with<config::llama<compress::dense>, pet::ia3>,
                   testing::with<config::llama<testing::rounded<4>>, pet::ia3>) {
    using C = typename T::config;
    const auto s = testing::shape_for<C>();
    const TransformerLayer<C> layer(nn::random_layer_weights(s, 300, nn::kind_of<C>), s);
    for (auto ts : {pet::target_set{pet::target::k, pet::target::v, pet::target::down},
                    pet::target_set{pet::target::q, pet::target::v}}) {
        const auto task = testing::random_ia3(layer.pet_dims(), ts, 301);
        const auto wd = nn::dense_weights_of(layer);
        const auto x = testing::random_matrix(21, s.d_model, 302);
        const MatD ref = testing::reference_batch<C>({wd}, s, testing::to_double(x), lengths, {testing::ia3_ref(task)});
        const MatD plain = testing::reference_batch<C>({wd}, s, testing::to_double(x), lengths);
        testing::for_each_isa([&](arch::isa) {
            nn::workspace ws;
            Matrix<float> y(21, s.d_model);
            layer.forward(x, lengths, y, ws, task);
            CHECK(testing::valid_error(y, ref, lengths) <= testing::pet_tol);
            CHECK(testing::valid_error(y, plain, lengths) > 1e-3);
            // fresh vectors (ones) are the identity
            layer.forward(x, lengths, y, ws, pet::ia3::make(layer.pet_dims()));
            CHECK(testing::valid_error(y, plain, lengths) <= testing::pet_tol);
        });
    }
}

TEST_CASE("IA3 bad input and accounting") {
    const auto s = testing::llama_shape();
    const TransformerLayer<config::llama<compress::dense>> layer(
        nn::random_layer_weights(s, 310, nn::kind_of<config::llama<>>), s);
    CHECK_THROWS_WITH_AS(pet::ia3::make(layer.pet_dims(), {.targets = {pet::target::o}}),
                         doctest::Contains("target o is not supported"), format_error);
    auto m = pet::ia3::make(layer.pet_dims());
    std::vector<float> v(5, 1.f);
    CHECK_THROWS_WITH_AS(m.set(pet::target::down, v), doctest::Contains("expected 176"), shape_error);
    CHECK(pet::count_parameters(m, 1000).trainable == 2 * s.kv_dim() + s.d_ff);
}

}  // namespace cpet_test_pet_ia3
