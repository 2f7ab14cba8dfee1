// Prompt tuning: soft tokens before every sequence (Stack::forward applies the input hook), against the Eigen
// reference run on the prepended batch; Stack::decode putting them before a sequence when it starts, so that
// prefill + decode steps of a ragged batch equal the full causal recompute with the prompt.
#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpet/pet/pet.hpp"
#include "pet/pet_references.hpp"

namespace cpet_test_pet_prompt {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using testing::MatD;

TEST_CASE_TEMPLATE("prompt tuning equals the reference on [virtual tokens; sequence], real rows returned", T,
                   testing::with<config::bert<compress::dense>, pet::prompt_tuning>, testing::with<config::llama<testing::rounded<4>>, pet::prompt_tuning>) {
    using C = typename T::config;
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
        if constexpr (Stack<C>::causal) {  // prefill through the cache: decode puts the tokens first itself
            auto caches = stack.make_cache(3, 10);
            Matrix<float> yd(21, s.d_model);
            stack.decode(x, lengths, yd, caches, ws, tasks);
            CHECK(testing::valid_error(yd, ref, lengths) <= testing::pet_tol);
            CHECK(caches[1].tokens(0) == 10);
        }
        const auto allocs = ws.allocations();
        stack.forward(x, lengths, y, ws, tasks);
        CHECK(ws.allocations() == allocs);
    });
    tasks[0].tokens = Matrix<float>(2, s.d_model + 1);
    nn::workspace ws;
    Matrix<float> y(21, s.d_model);
    CHECK_THROWS_WITH_AS(stack.forward(x, lengths, y, ws, tasks), doctest::Contains("prompt_tuning expects tokens [P, "),
                         shape_error);
}

namespace {

/// Sequence b's tokens [from, from + n) of X_b as rows b·S.. of a padded batch; padding rows hold garbage (1e3),
/// which must not reach any output.
Matrix<float> gather(const std::vector<Matrix<float>>& X, const std::vector<index_t>& from, const std::vector<index_t>& n) {
    index_t S = 1;
    for (auto v : n) S = std::max(S, v);
    const index_t B = index_t(X.size()), d = X[0].cols();
    Matrix<float> x(B * S, d);
    for (index_t i = 0; i < x.size(); ++i) x.data()[i] = 1e3f;
    for (index_t b = 0; b < B; ++b)
        for (index_t t = 0; t < n[std::size_t(b)]; ++t)
            for (index_t c = 0; c < d; ++c) x(b * S + t, c) = X[std::size_t(b)](from[std::size_t(b)] + t, c);
    return x;
}

/// The first layer's prompt modules of a task (a stack member or the task itself).
template <class M>
const pet::prompt_tuning::modules& prompt_of(const M& m) {
    if constexpr (std::is_same_v<M, pet::prompt_tuning::modules>) return m;
    else return m.template get<1>();
}

template <class P>
typename P::modules make_task(const pet::layer_dims& d, std::size_t layer, unsigned seed) {
    auto prompt = layer == 0 ? pet::prompt_tuning::make(d, {.length = 4}, seed) : pet::prompt_tuning::modules{};
    if constexpr (std::is_same_v<P, pet::prompt_tuning>) return prompt;
    else return typename P::modules(pet::prefix_tuning::make(d, {.length = 3}, seed + 1), prompt);
}
template <class M>
testing::reference_hooks ref_hooks(const M& m) {
    if constexpr (std::is_same_v<M, pet::prompt_tuning::modules>) return {};
    else return testing::prefix_ref(m.template get<0>());
}

}  // namespace

TEST_CASE_TEMPLATE("prompt-tuned decode: prefill and steps of a ragged batch equal the full causal recompute", T,
                   testing::with<config::gpt2<compress::dense>, pet::prompt_tuning>, testing::with<config::llama<testing::rounded<4>>, pet::prompt_tuning>,
                   testing::with<config::gpt2<compress::dense>, pet::stack<pet::prefix_tuning, pet::prompt_tuning>>) {
    using C = typename T::config;
    using P = typename T::pet;
    const auto s = testing::shape_for<C>();
    std::vector<nn::dense_layer_weights> w{nn::random_layer_weights(s, 620, nn::kind_of<C>),
                                           nn::random_layer_weights(s, 621, nn::kind_of<C>)};
    const Stack<C> stack(w, s);
    std::vector<typename P::modules> tasks;
    for (std::size_t l = 0; l < 2; ++l) tasks.push_back(make_task<P>(stack.layer(l).pet_dims(), l, 622 + unsigned(l)));
    std::vector<testing::reference_hooks> hooks;
    for (const auto& t : tasks) hooks.push_back(ref_hooks(t));
    const auto& vt = prompt_of(tasks[0]).tokens;
    const index_t P_ = vt.rows(), d = s.d_model;
    std::vector<nn::dense_layer_weights> wd{nn::dense_weights_of(stack.layer(0)), nn::dense_weights_of(stack.layer(1))};

    // Three sequences of 6, 3 and 5 tokens; sequence 2 starts one call later than the others.
    const std::vector<index_t> total{6, 3, 5};
    const std::vector<std::vector<index_t>> steps{{4, 1, 0}, {1, 2, 3}, {1, 0, 1}, {0, 0, 1}};
    std::vector<Matrix<float>> X;
    std::vector<MatD> full, plain;  // per sequence: reference over [virtual tokens; X_b], and over X_b alone
    for (std::size_t b = 0; b < total.size(); ++b) {
        X.push_back(testing::random_matrix(total[b], d, 630 + unsigned(b)));
        Matrix<float> xe(P_ + total[b], d);
        for (index_t r = 0; r < xe.rows(); ++r)
            for (index_t c = 0; c < d; ++c) xe(r, c) = r < P_ ? vt(r, c) : X[b](r - P_, c);
        full.push_back(testing::reference_batch<C>(wd, s, testing::to_double(xe), {xe.rows()}, hooks));
        plain.push_back(testing::reference_batch<C>(wd, s, testing::to_double(X[b]), {total[b]}, hooks));
    }
    testing::for_each_isa([&](arch::isa) {
        nn::workspace ws;
        auto caches = stack.make_cache(3, 16);
        std::vector<index_t> done(3, 0);
        double worst = 0, worst_plain = 0;
        for (const auto& n : steps) {
            const auto x = gather(X, done, n);
            Matrix<float> y(x.rows(), d);
            stack.decode(x, n, y, caches, ws, tasks);
            const index_t S = x.rows() / 3;
            for (index_t b = 0; b < 3; ++b) {
                const auto nb = n[std::size_t(b)], db = done[std::size_t(b)];
                if (nb > 0) {
                    const MatD r = full[std::size_t(b)].middleRows(P_ + db, nb);
                    worst = std::max(worst, testing::rel_error(y.view().middle_rows(b * S, nb), r));
                    worst_plain = std::max(worst_plain, testing::rel_error(y.view().middle_rows(b * S, nb),
                                                                           plain[std::size_t(b)].middleRows(db, nb)));
                }
                for (index_t t = nb; t < S; ++t)
                    for (index_t c = 0; c < d; ++c) CHECK(y(b * S + t, c) == 0.f);  // padding stays zero
            }
            for (std::size_t b = 0; b < 3; ++b) done[b] += n[b];
        }
        CHECK(worst <= testing::pet_tol);
        CHECK(worst_plain > 1e-3);  // the prompt mattered
        for (std::size_t l = 0; l < 2; ++l)
            for (index_t b = 0; b < 3; ++b) CHECK(caches[l].tokens(b) == P_ + total[std::size_t(b)]);

        // A sequence truncated to 0 starts again, with its virtual tokens: all of it in one prefill.
        for (auto& c : caches) c.truncate(0, 0);
        const auto x = gather(X, {0, 0, 0}, {6, 0, 0});
        Matrix<float> y(x.rows(), d);
        stack.decode(x, std::vector<index_t>{6, 0, 0}, y, caches, ws, tasks);
        CHECK(testing::rel_error(y.view().middle_rows(0, 6), full[0].middleRows(P_, 6)) <= testing::pet_tol);
        CHECK(caches[0].tokens(1) == P_ + 3);  // the others untouched
    });
}

TEST_CASE("prompt-tuned decode: bad input throws before any cache changes") {
    using C = config::gpt2<compress::dense>;
    const auto s = testing::shape_for<C>();
    std::vector<nn::dense_layer_weights> w{nn::random_layer_weights(s, 640, nn::kind_of<C>),
                                           nn::random_layer_weights(s, 641, nn::kind_of<C>)};
    const Stack<C> stack(w, s);
    std::vector<pet::prompt_tuning::modules> tasks(2);
    tasks[0] = pet::prompt_tuning::make(stack.layer(0).pet_dims(), {.length = 4}, 642);
    nn::workspace ws;
    auto unchanged = [](const std::vector<nn::kv_cache>& cs, std::vector<index_t> want) {
        for (const auto& c : cs)
            for (index_t b = 0; b < c.batch(); ++b) CHECK(c.length(b) == want[std::size_t(b)]);
    };
    // Capacity 8: 5 tokens fit, 4 virtual tokens + 5 do not.
    auto caches = stack.make_cache(2, 8);
    {
        const auto x = testing::random_matrix(10, s.d_model, 643);
        Matrix<float> y(10, s.d_model);
        CHECK_THROWS_WITH_AS(stack.decode(x, std::vector<index_t>{2, 5}, y, caches, ws, tasks),
                             doctest::Contains("4 virtual tokens"), shape_error);
        unchanged(caches, {0, 0});
    }
    {  // sequence 0 fits (4 + 3) and starts; sequence 1 already holds 4 + 4 = 8 and cannot take one more
        const auto x = testing::random_matrix(8, s.d_model, 644);
        Matrix<float> y(8, s.d_model);
        stack.decode(x, std::vector<index_t>{0, 4}, y, caches, ws, tasks);
        unchanged(caches, {0, 8});
        CHECK_THROWS_WITH_AS(stack.decode(x, std::vector<index_t>{3, 1}, y, caches, ws, tasks),
                             doctest::Contains("exceed the capacity"), shape_error);
        unchanged(caches, {0, 8});
    }
    {  // virtual tokens of the wrong width
        auto bad = tasks;
        bad[0].tokens = Matrix<float>(4, s.d_model + 1);
        const auto x = testing::random_matrix(2, s.d_model, 645);
        Matrix<float> y(2, s.d_model);
        CHECK_THROWS_WITH_AS(stack.decode(x, std::vector<index_t>{1, 0}, y, caches, ws, bad),
                             doctest::Contains("virtual tokens"), shape_error);
        unchanged(caches, {0, 8});
    }
}

}  // namespace cpet_test_pet_prompt
