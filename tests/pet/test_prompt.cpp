// Prompt tuning: soft tokens before every sequence (Stack::forward applies the input hook), against the Eigen
// reference run on the prepended batch; a decoder prefilled with the tokens through the KV cache.
#include <vector>

#include "cpet/pet/pet.hpp"
#include "pet/pet_testing.hpp"

using namespace cpet;
using testing::MatD;

TEST_CASE_TEMPLATE("prompt tuning equals the reference on [virtual tokens; sequence], real rows returned", C,
                   config::bert<compress::dense, pet::prompt_tuning>, config::llama<testing::rounded<4>, pet::prompt_tuning>) {
    const auto s = testing::shape_for<C>();
    std::vector<nn::dense_layer_weights> w{nn::random_layer_weights(s, 600, nn::kind_of<C>),
                                           nn::random_layer_weights(s, 601, nn::kind_of<C>)};
    const Stack<C> stack(w, s);
    std::vector<pet::prompt_tuning::modules> tasks(2);
    tasks[0] = pet::prompt_tuning::make(stack.layer(0).pet_dims(), {.length = 3}, 602);
    const std::vector<index_t> lengths{7, 1, 5};
    const auto x = testing::random_matrix(21, s.d_model, 603);
    Matrix<float> xe;
    std::vector<index_t> le;
    pet::prepend_virtual_tokens(x, lengths, tasks[0].tokens, xe, le);
    CHECK(xe.rows() == 30);
    CHECK(le == std::vector<index_t>{10, 4, 8});
    std::vector<nn::dense_layer_weights> wd{nn::dense_weights_of(stack.layer(0)), nn::dense_weights_of(stack.layer(1))};
    const MatD full = testing::reference_batch<C>(wd, s, testing::to_double(xe), le);
    MatD ref = MatD::Zero(21, s.d_model);
    for (index_t b = 0; b < 3; ++b) ref.middleRows(b * 7, 7) = full.middleRows(b * 10 + 3, 7);
    const MatD plain = testing::reference_batch<C>(wd, s, testing::to_double(x), lengths);
    testing::for_each_isa([&](arch::isa) {
        nn::workspace ws;
        Matrix<float> y(21, s.d_model);
        stack.forward(x, lengths, y, ws, tasks);
        CHECK(testing::valid_error(y, ref, lengths) <= testing::pet_tol);
        CHECK(testing::valid_error(y, plain, lengths) > 1e-3);
        for (index_t c = 0; c < s.d_model; ++c) CHECK(y(7 + 1, c) == 0.f);  // padding stays zero
        if constexpr (Stack<C>::causal) {  // prefill [tokens; prompt] through the cache, then compare
            auto caches = stack.make_cache(3, 10);
            Matrix<float> ye(30, s.d_model);
            stack.decode(xe, le, ye, caches, ws, tasks);
            CHECK(testing::valid_error(ye, full, le) <= testing::pet_tol);
        }
        const auto allocs = ws.allocations();
        stack.forward(x, lengths, y, ws, tasks);
        CHECK(ws.allocations() == allocs);
    });
    tasks[0].tokens = Matrix<float>(2, s.d_model + 1);
    nn::workspace ws;
    Matrix<float> y(21, s.d_model);
    CHECK_THROWS_WITH_AS(stack.forward(x, lengths, y, ws, tasks), doctest::Contains("virtual tokens"), shape_error);
}
