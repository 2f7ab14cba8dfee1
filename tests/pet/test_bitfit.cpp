// BitFit: bias deltas through the GEMM epilogue and LayerNorm β deltas through the norm step, against the Eigen
// reference (β + Δβ in the reference's weights); on a bias-free RMSNorm LLaMA layer the norm part is absent by
// default and refused when asked for.
#include <vector>

#include "cpet/pet/pet.hpp"
#include "pet/pet_references.hpp"

namespace cpet_test_pet_bitfit {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using testing::MatD;

namespace {
const std::vector<index_t> lengths{7, 1, 5};
}

TEST_CASE_TEMPLATE("BitFit bias and LayerNorm β deltas match the Eigen reference", T, testing::with<config::bert<compress::dense>, pet::bitfit>,
                   testing::with<config::llama<compress::dense>, pet::bitfit>, testing::with<config::bert<testing::rounded<4>>, pet::bitfit>,
                   testing::with<config::gpt2<compress::int8_per_channel>, pet::bitfit>) {
    using C = typename T::config;
    const auto s = testing::shape_for<C>();
    const TransformerLayer<C> layer(nn::random_layer_weights(s, 400, nn::kind_of<C>), s);
    const auto task = testing::random_bitfit(layer.pet_dims(), 401);
    constexpr bool ln = C::norm == nn::norm_kind::layernorm;
    CHECK(task.delta[std::size_t(pet::target::gate)].empty() == !layer.pet_dims().gated);
    for (const auto& v : task.norm_delta) CHECK(v.size() == (ln ? std::size_t(s.d_model) : 0));
    const auto wd = nn::dense_weights_of(layer);
    const auto x = testing::random_matrix(21, s.d_model, 402);
    const MatD ref = testing::reference_batch<C>({testing::bitfit_weights(wd, task)}, s, testing::to_double(x), lengths,
                                                 {testing::bitfit_ref(task)});
    const MatD plain = testing::reference_batch<C>({wd}, s, testing::to_double(x), lengths);
    // Only the norms' Δβ: isolates the norm step from the linear biases.
    auto norms_only = pet::bitfit::make(layer.pet_dims());
    norms_only.norm_delta = task.norm_delta;
    const MatD ref_norms = testing::reference_batch<C>({testing::bitfit_weights(wd, task)}, s, testing::to_double(x), lengths);
    testing::for_each_isa([&](arch::isa) {
        nn::workspace ws;
        Matrix<float> y(21, s.d_model);
        layer.forward(x, lengths, y, ws, task);
        CHECK(testing::valid_error(y, ref, lengths) <= testing::pet_tol);
        CHECK(testing::valid_error(y, plain, lengths) > 1e-3);
        if constexpr (ln) {
            layer.forward(x, lengths, y, ws, norms_only);
            CHECK(testing::valid_error(y, ref_norms, lengths) <= testing::pet_tol);
            CHECK(testing::valid_error(y, plain, lengths) > 1e-3);
        }
        layer.forward(x, lengths, y, ws, pet::bitfit::make(layer.pet_dims()));  // zero deltas: the base layer
        CHECK(testing::valid_error(y, plain, lengths) <= testing::pet_tol);
    });
    // The backbone's β is shared: a task's Δβ never lands in it.
    CHECK(layer.norm1().beta() == wd.norm1_beta);
    CHECK(layer.norm2().beta() == wd.norm2_beta);
}

TEST_CASE("BitFit bad input and accounting") {
    const auto s = testing::bert_shape();
    const TransformerLayer<config::bert<compress::dense>> layer(
        nn::random_layer_weights(s, 410, nn::kind_of<config::bert<>>), s);
    CHECK_THROWS_WITH_AS(pet::bitfit::make(layer.pet_dims(), {.targets = {pet::target::gate}}),
                         doctest::Contains("gate does not exist"), shape_error);
    auto m = pet::bitfit::make(layer.pet_dims());
    std::vector<float> v(3);
    CHECK_THROWS_WITH_AS(m.set(pet::target::up, v), doctest::Contains("expected 128"), shape_error);
    CHECK_THROWS_WITH_AS(m.set_norm(pet::norm_site::norm2, v), doctest::Contains("has 3 values, expected 64"), shape_error);
    // q, k, v, o and down: 64 each but up 128; then β of norm1 and norm2: 64 each.
    const auto r = pet::count_parameters(m, nn::parameter_count(layer));
    CHECK(r.trainable == 3 * 64 + 64 + 128 + 64 + 2 * 64);
    CHECK(r.total == nn::parameter_count(layer) + r.trainable);
    bool norm2_listed = false;
    for (const auto& g : r.groups) norm2_listed = norm2_listed || (g.name == "layers.0.norm2.bias" && g.count == 64);
    CHECK(norm2_listed);
    CHECK(pet::count_parameters(pet::bitfit::make(layer.pet_dims(), {.norms = false}), 0).trainable ==
          3 * 64 + 64 + 128 + 64);

    // A Δβ of the wrong size (set directly) is refused before the layer runs.
    const auto x = testing::random_matrix(7, s.d_model, 411);
    Matrix<float> y(7, s.d_model);
    nn::workspace ws;
    m.norm_delta[0].assign(5, 0.f);
    CHECK_THROWS_WITH_AS(layer.forward(x, std::vector<index_t>{7}, y, ws, m),
                         doctest::Contains("bitfit β delta of norm1 has 5 values, this layer needs 64"), shape_error);
}

TEST_CASE("BitFit on RMSNorm layers: no β to tune, the norm part is absent or refused") {
    using C = config::llama<compress::dense>;
    const auto s = testing::llama_shape();
    const TransformerLayer<C> layer(nn::random_layer_weights(s, 420, nn::kind_of<C>), s);
    const auto d = layer.pet_dims();
    CHECK_FALSE(d.norm_bias);
    auto m = pet::bitfit::make(d);  // default: only what the layer has
    for (const auto& v : m.norm_delta) CHECK(v.empty());
    CHECK_THROWS_WITH_AS(pet::bitfit::make(d, {.norms = true}), doctest::Contains("norms have no β"), shape_error);
    std::vector<float> beta(std::size_t(s.d_model), 0.1f);
    CHECK_THROWS_WITH_AS(m.set_norm(pet::norm_site::norm1, beta), doctest::Contains("norms have no β"), shape_error);
    // Modules made for a LayerNorm layer of the same width, run on this one: the layer refuses, through a Stack too.
    m.norm_delta[1] = beta;
    const auto x = testing::random_matrix(7, s.d_model, 421);
    Matrix<float> y(7, s.d_model);
    nn::workspace ws;
    CHECK_THROWS_WITH_AS(layer.forward(x, std::vector<index_t>{7}, y, ws, m),
                         doctest::Contains("tunes the β of norm2 (bitfit), but the layer's norms are RMSNorm"),
                         shape_error);
    const Stack<C> stack(std::vector<TransformerLayer<C>>{layer});
    auto caches = stack.make_cache(1, 8);
    const std::vector<pet::bitfit::modules> tasks{m};
    CHECK_THROWS_WITH_AS(stack.decode(x, std::vector<index_t>{7}, y, caches, ws, tasks),
                         doctest::Contains("RMSNorm"), shape_error);
    CHECK(caches[0].length(0) == 0);  // refused before the cache changed
}

}  // namespace cpet_test_pet_bitfit
