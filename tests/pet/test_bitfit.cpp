// BitFit: bias deltas through the GEMM epilogue, against the Eigen reference (also on a bias-free LLaMA layer).
#include <vector>

#include "cpet/pet/pet.hpp"
#include "pet/pet_references.hpp"

using namespace cpet;
using testing::MatD;

namespace {
const std::vector<index_t> lengths{7, 1, 5};
}


TEST_CASE_TEMPLATE("BitFit bias deltas match the Eigen reference", C, config::bert<compress::dense, pet::bitfit>,
                   config::llama<compress::dense, pet::bitfit>, config::bert<testing::rounded<4>, pet::bitfit>) {
    const auto s = testing::shape_for<C>();
    const TransformerLayer<C> layer(nn::random_layer_weights(s, 400, nn::kind_of<C>), s);
    const auto task = testing::random_bitfit(layer.pet_dims(), 401);
    CHECK(task.delta[std::size_t(pet::target::gate)].empty() == !layer.pet_dims().gated);
    const auto wd = nn::dense_weights_of(layer);
    const auto x = testing::random_matrix(21, s.d_model, 402);
    const MatD ref = testing::reference_batch<C>({wd}, s, testing::to_double(x), lengths, {testing::bitfit_ref(task)});
    const MatD plain = testing::reference_batch<C>({wd}, s, testing::to_double(x), lengths);
    testing::for_each_isa([&](arch::isa) {
        nn::workspace ws;
        Matrix<float> y(21, s.d_model);
        layer.forward(x, lengths, y, ws, task);
        CHECK(testing::valid_error(y, ref, lengths) <= testing::pet_tol);
        CHECK(testing::valid_error(y, plain, lengths) > 1e-3);
        layer.forward(x, lengths, y, ws, pet::bitfit::make(layer.pet_dims()));  // zero deltas: the base layer
        CHECK(testing::valid_error(y, plain, lengths) <= testing::pet_tol);
    });
}

TEST_CASE("BitFit bad input and accounting") {
    const auto s = testing::bert_shape();
    const TransformerLayer<config::bert<compress::dense, pet::bitfit>> layer(
        nn::random_layer_weights(s, 410, nn::kind_of<config::bert<>>), s);
    CHECK_THROWS_WITH_AS(pet::bitfit::make(layer.pet_dims(), {.targets = {pet::target::gate}}),
                         doctest::Contains("gate does not exist"), shape_error);
    auto m = pet::bitfit::make(layer.pet_dims());
    std::vector<float> v(3);
    CHECK_THROWS_WITH_AS(m.set(pet::target::up, v), doctest::Contains("expected 128"), shape_error);
    CHECK(pet::count_parameters(m, 0).trainable == 3 * 64 + 64 + 128 + 64);
}
