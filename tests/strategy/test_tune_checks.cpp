// tests/strategy/test_tune_checks.cpp — strategy::tune / evaluate / cpet on bad input (labels out of range, a task
// that does not fit the model, a NaN loss, virtual tokens where none can go) on a tiny random BERT model: a clear
// exception, and the task's values left as they were.
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "cpet/nn/nn.hpp"
#include "cpet/strategy/pipeline.hpp"
#include "support/testing.hpp"

namespace cpet_test_strategy_tune_checks {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using C = config::bert<>;

namespace {

nn::Model<C> tiny_model() {
    nn::layer_shape s;
    s.d_model = 16, s.n_heads = 2, s.n_kv_heads = 2, s.head_dim = 8, s.d_ff = 24, s.eps = 1e-12f;
    nn::model_weights w;
    w.shape = s;
    for (unsigned l = 0; l < 2; ++l) w.layers.push_back(nn::random_layer_weights(s, 3 + l, nn::kind_of<C>));
    w.embeddings.word = testing::random_matrix(30, 16, 9);
    return nn::Model<C>(w);
}

std::vector<strategy::labelled_batch> tiny_data(index_t labels) {
    std::vector<strategy::labelled_batch> out;
    std::mt19937 gen(4);
    for (int b = 0; b < 3; ++b) {
        strategy::labelled_batch lb;
        lb.tokens.seq_len = 5;
        lb.tokens.lengths = {5, 3, 1, 4};
        for (int i = 0; i < 20; ++i) lb.tokens.ids.push_back(std::int32_t(gen() % 30));
        for (int i = 0; i < 4; ++i) lb.labels.push_back(std::int32_t(gen() % unsigned(labels)));
        out.push_back(std::move(lb));
    }
    return out;
}

strategy::classifier_task lora_task(const nn::Model<C>& m, index_t labels) {
    strategy::classifier_task t;
    for (std::size_t l = 0; l < m.stack().size(); ++l) t.layers.emplace_back(pet::lora::make(m.stack().layer(l).pet_dims(), {}, l));
    t.head = train::linear_head::make(m.d_model(), labels, 1);
    return t;
}

std::vector<float> values_of(const strategy::classifier_task& t) {
    std::vector<float> v(t.head.W.data(), t.head.W.data() + t.head.W.size());
    for (const auto& l : t.layers) {
        const auto& m = l.get<pet::lora::modules>(0);
        for (const auto& a : m.f.A) v.insert(v.end(), a.data(), a.data() + a.size());
        for (const auto& b : m.f.B) v.insert(v.end(), b.data(), b.data() + b.size());
    }
    return v;
}

}  // namespace

TEST_CASE("strategy::tune lowers the training loss and refuses bad labels and misfit tasks, changing nothing") {
    const auto m = tiny_model();
    auto data = tiny_data(3);
    auto t = lora_task(m, 3);
    strategy::tune_options o;
    o.epochs = 30;
    o.lr = 1e-2;
    o.progress = train::progress_mode::none;
    const double before = strategy::evaluate(m, t, data).loss;
    const auto rep = strategy::tune(m, t, data, o);
    CHECK(strategy::evaluate(m, t, data).loss < 0.7 * before);
    CHECK(rep.trainable_values == 2 * (8 * 16 * 2 + 16 * 8 * 2) + 3 * 16 + 3);
    CHECK(rep.activation_bytes > 0);

    const auto kept = values_of(t);
    auto bad = data;
    bad[1].labels[2] = 3;
    CHECK_THROWS_WITH_AS(strategy::tune(m, t, bad, o), doctest::Contains("batch 1 sequence 2 has label 3"), shape_error);
    bad = data;
    bad[0].labels.pop_back();
    CHECK_THROWS_WITH_AS(strategy::evaluate(m, t, bad), doctest::Contains("3 labels for 4 sequences"), shape_error);
    auto short_task = t;
    short_task.layers.pop_back();
    CHECK_THROWS_WITH_AS(strategy::tune(m, short_task, data, o), doctest::Contains("modules for 1 layers"), shape_error);
    CHECK(values_of(t) == kept);
}

TEST_CASE("a NaN loss stops strategy::tune naming the step, the task's values unchanged") {
    const auto m = tiny_model();
    const auto data = tiny_data(2);
    auto t = lora_task(m, 2);
    t.head.b(0, 1) = std::numeric_limits<float>::quiet_NaN();
    const auto kept = values_of(t);
    strategy::tune_options o;
    o.epochs = 1;
    o.progress = train::progress_mode::none;
    CHECK_THROWS_WITH_AS(strategy::tune(m, t, data, o), doctest::Contains("step 1"), numeric_error);
    CHECK(values_of(t) == kept);
}

TEST_CASE("a task with virtual tokens past layer 0 is refused before any step, the task unchanged") {
    // every method of a pet::task trains now; what a model cannot apply (prompt tuning's tokens on a later layer:
    // only layer 0's are put before the sequence) is still refused by name
    const auto m = tiny_model();
    const auto data = tiny_data(2);
    auto t = lora_task(m, 2);
    t.layers[1].add(pet::prompt_tuning::make(m.stack().layer(1).pet_dims(), {.length = 2}, 3));
    const auto kept = values_of(t);
    const auto& tok = t.layers[1].get<pet::prompt_tuning::modules>(1).tokens;
    const std::vector<float> tokens(tok.data(), tok.data() + tok.size());
    strategy::tune_options o;
    o.progress = train::progress_mode::none;
    CHECK_THROWS_WITH_AS(strategy::tune(m, t, data, o), doctest::Contains("layer 1's terms carry 2 virtual tokens"),
                         shape_error);
    CHECK(values_of(t) == kept);
    CHECK(std::vector<float>(tok.data(), tok.data() + tok.size()) == tokens);
}

TEST_CASE("fresh_like re-initialises adapters, prefixes and virtual tokens for a layer's dims; tune then trains them") {
    const auto m = tiny_model();
    const auto d = m.stack().layer(0).pet_dims();
    pet::task dense_layer0(pet::prompt_tuning::make(d, {.length = 3}, 1),
                           pet::prefix_tuning::make(d, {.length = 2}, 2),
                           pet::scaled_parallel_adapter::make(d, {.bottleneck = 4, .scale = 2.f, .attention = false}, 3),
                           pet::adapter::make(d, {.bottleneck = 3}, 4));
    // pretend the task was trained: non-zero W_up and biases everywhere
    auto& sp = dense_layer0.get<pet::scaled_parallel_adapter::modules>(2);
    sp.up[1].fill(0.5f);
    sp.b_up[1].assign(sp.b_up[1].size(), 0.25f);
    pet::layer_dims pruned = d;  // a structurally pruned layer: fewer KV channels, d_model kept
    pruned.q_dim = pruned.kv_dim = 8;
    pruned.d_ff = 12;
    const pet::task f = strategy::fresh_like(dense_layer0, pruned, 7);
    REQUIRE(f.size() == 4);
    CHECK(f.get<pet::prompt_tuning::modules>(0).tokens.rows() == 3);
    CHECK(f.get<pet::prompt_tuning::modules>(0).tokens.cols() == 16);
    const auto& pre = f.get<pet::prefix_tuning::modules>(1);
    CHECK((pre.k.rows() == 2 && pre.k.cols() == 8 && pre.v.rows() == 2 && pre.v.cols() == 8));
    const auto& fs = f.get<pet::scaled_parallel_adapter::modules>(2);
    CHECK((!fs.has(pet::sublayer::attention) && fs.has(pet::sublayer::ffn)));
    CHECK(fs.bottleneck(pet::sublayer::ffn) == 4);
    CHECK(fs.scale() == 2.f);
    for (index_t i = 0; i < fs.up[1].size(); ++i) REQUIRE(fs.up[1].data()[i] == 0.f);  // the identity at start
    for (float v : fs.b_up[1]) REQUIRE(v == 0.f);
    const auto& fa = f.get<pet::adapter::modules>(3);
    CHECK((fa.has(pet::sublayer::attention) && fa.has(pet::sublayer::ffn) && fa.bottleneck(pet::sublayer::attention) == 3));
    pet::task g = train::zeros_like(f);
    CHECK_NOTHROW(train::bind(pruned, f, g));
    // a later layer's empty prompt module stays empty (only layer 0 carries tokens)
    pet::task later(pet::prompt_tuning::modules{}, pet::p_tuning_v2::make(d, {.length = 2}, 5));
    const pet::task fl = strategy::fresh_like(later, d, 8);
    CHECK(fl.get<pet::prompt_tuning::modules>(0).tokens.empty());
    CHECK(fl.get<pet::p_tuning_v2::modules>(1).length() == 2);

    // tune trains a fresh task of these methods on the model: prompt tokens (layer 0), prefix and adapters
    strategy::classifier_task t;
    for (std::size_t l = 0; l < m.stack().size(); ++l)
        t.layers.push_back(strategy::fresh_like(l == 0 ? dense_layer0 : later, m.stack().layer(l).pet_dims(), 10 + l));
    t.head = train::linear_head::make(m.d_model(), 3, 1);
    const auto data = tiny_data(3);
    strategy::tune_options o;
    o.epochs = 30;
    o.lr = 1e-2;
    o.progress = train::progress_mode::none;
    const auto tok0 = t.layers[0].get<pet::prompt_tuning::modules>(0).tokens(0, 0);
    const double before = strategy::evaluate(m, t, data).loss;
    strategy::tune(m, t, data, o);
    CHECK(strategy::evaluate(m, t, data).loss < 0.7 * before);
    CHECK(t.layers[0].get<pet::prompt_tuning::modules>(0).tokens(0, 0) != tok0);
}

}  // namespace cpet_test_strategy_tune_checks
