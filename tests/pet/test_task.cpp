// pet::task, a task as a run-time value: ONE backbone object runs tasks of every method and of
// mixes of methods, each against the Eigen reference of its formula, on every ISA; a single-method task is the
// static method exactly; a task refuses a second method on a single-member hook; bad shapes are refused at entry.
// The methods are a run-time list here, so the whole list costs one layer instantiation per configuration.
#include <functional>
#include <string>
#include <vector>

#include "cpet/pet/pet.hpp"
#include "cpet/pet/task.hpp"
#include "pet/pet_references.hpp"

namespace cpet_test_pet_task {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using testing::MatD;

namespace {

const std::vector<index_t> lengths{5, 2};

/// What one method (or mix) adds to a layer's task.
struct kind {
    std::string name;
    std::function<void(pet::task&, const pet::layer_dims&, const nn::dense_layer_weights& dense_w, unsigned seed)> add;
};

/// The reference hooks of every method of t (their sum / chain, as a task combines them).
testing::reference_hooks reference_of(const pet::task& t) {
    std::vector<std::function<MatD(pet::target, const MatD&)>> deltas;
    std::vector<std::function<void(pet::sublayer, const MatD&, MatD&)>> subs;
    testing::reference_hooks h;
    for (std::size_t i = 0; i < t.size(); ++i) {
        testing::reference_hooks r = std::visit(
            [](const auto& m) -> testing::reference_hooks {
                using M = std::decay_t<decltype(m)>;
                if constexpr (std::is_same_v<M, pet::lora::modules> || std::is_same_v<M, pet::rslora::modules> ||
                              std::is_same_v<M, pet::recovery_linear::modules>)
                    return testing::lowrank_ref(m);
                else if constexpr (std::is_same_v<M, pet::recovery::modules>) return testing::lowrank_ref(m, true);
                else if constexpr (std::is_same_v<M, pet::adapter::modules>) return testing::adapter_ref<pet::adapter>(m);
                else if constexpr (std::is_same_v<M, pet::parallel_adapter::modules>)
                    return testing::adapter_ref<pet::parallel_adapter>(m);
                else if constexpr (std::is_same_v<M, pet::scaled_parallel_adapter::modules>)
                    return testing::adapter_ref<pet::scaled_parallel_adapter>(m);
                else if constexpr (std::is_same_v<M, pet::prefix_tuning::modules> ||
                                   std::is_same_v<M, pet::p_tuning_v2::modules>)
                    return testing::prefix_ref(m);
                else if constexpr (std::is_same_v<M, pet::ia3::modules>) return testing::ia3_ref(m);
                else if constexpr (std::is_same_v<M, pet::bitfit::modules>) return testing::bitfit_ref(m);
                else return {};  // prompt tuning: the reference runs on [tokens; x]
            },
            t.at(i));
        if (r.linear_delta) deltas.push_back(r.linear_delta);
        if (r.sublayer) subs.push_back(r.sublayer);
        if (r.prefix_k.size()) h.prefix_k = r.prefix_k, h.prefix_v = r.prefix_v;
        if (r.scale) h.scale = r.scale;
    }
    if (!deltas.empty()) h.linear_delta = testing::combine_linear(deltas).linear_delta;
    if (!subs.empty())
        h.sublayer = [subs](pet::sublayer w, const MatD& in, MatD& out) {
            for (const auto& s : subs) s(w, in, out);
        };
    return h;
}

/// `svd_recovery(w)`: linear recovery modules from the residual of the layer whose dense weights are w.
std::vector<kind> kinds(std::function<pet::recovery_linear::modules(const nn::dense_layer_weights&)> svd_recovery) {
    auto lora = [](pet::task& t, const pet::layer_dims& d, const nn::dense_layer_weights&, unsigned seed) {
        auto m = pet::lora::make(d, {.rank = 4, .alpha = 8, .targets = pet::target_set::attention() |
                                                                          pet::target_set{pet::target::down}}, seed);
        testing::randomize_up(m, d, seed);
        t.add(std::move(m));
    };
    auto recovery = [](pet::task& t, const pet::layer_dims& d, const nn::dense_layer_weights&, unsigned seed) {
        auto m = pet::recovery::make(d, {.rank = 8}, seed);
        testing::randomize_up(m, d, seed + 1);
        t.add(std::move(m));
    };
    auto prefix = [](pet::task& t, const pet::layer_dims& d, const nn::dense_layer_weights&, unsigned seed) {
        t.add(pet::prefix_tuning::make(d, {.length = 3}, seed));
    };
    auto scaled = [](pet::task& t, const pet::layer_dims& d, const nn::dense_layer_weights&, unsigned seed) {
        t.add(testing::random_adapter<pet::scaled_parallel_adapter>(d, {.bottleneck = 8}, seed));
    };
    std::vector<kind> k;
    k.push_back({"lora", lora});
    k.push_back({"rslora", [](pet::task& t, const pet::layer_dims& d, const nn::dense_layer_weights&, unsigned seed) {
                     auto m = pet::rslora::make(d, {.rank = 4, .alpha = 8, .targets = {pet::target::q, pet::target::v}}, seed);
                     testing::randomize_up(m, d, seed);
                     t.add(std::move(m));
                 }});
    k.push_back({"recovery", recovery});
    k.push_back({"recovery_linear", [svd_recovery](pet::task& t, const pet::layer_dims&, const nn::dense_layer_weights& w,
                                                   unsigned) { t.add(svd_recovery(w)); }});
    k.push_back({"adapter", [](pet::task& t, const pet::layer_dims& d, const nn::dense_layer_weights&, unsigned seed) {
                     t.add(testing::random_adapter<pet::adapter>(d, {.bottleneck = 8}, seed));
                 }});
    k.push_back({"parallel_adapter", [](pet::task& t, const pet::layer_dims& d, const nn::dense_layer_weights&,
                                        unsigned seed) {
                     t.add(testing::random_adapter<pet::parallel_adapter>(d, {.bottleneck = 8, .ffn = false}, seed));
                 }});
    k.push_back({"scaled_parallel_adapter", scaled});
    k.push_back({"prefix_tuning", prefix});
    k.push_back({"p_tuning_v2", [](pet::task& t, const pet::layer_dims& d, const nn::dense_layer_weights&, unsigned seed) {
                     t.add(pet::p_tuning_v2::make(d, {.length = 2}, seed));
                 }});
    k.push_back({"ia3", [](pet::task& t, const pet::layer_dims& d, const nn::dense_layer_weights&, unsigned seed) {
                     t.add(testing::random_ia3(d, {pet::target::k, pet::target::v, pet::target::down}, seed));
                 }});
    k.push_back({"bitfit", [](pet::task& t, const pet::layer_dims& d, const nn::dense_layer_weights&, unsigned seed) {
                     t.add(testing::random_bitfit(d, seed));
                 }});
    k.push_back({"recovery+lora (CPET)", [=](pet::task& t, const pet::layer_dims& d, const nn::dense_layer_weights& w,
                                             unsigned seed) {
                     recovery(t, d, w, seed);
                     lora(t, d, w, seed + 50);
                 }});
    k.push_back({"prefix+scaled_parallel_adapter (MAM)", [=](pet::task& t, const pet::layer_dims& d,
                                                              const nn::dense_layer_weights& w, unsigned seed) {
                     prefix(t, d, w, seed);
                     scaled(t, d, w, seed + 50);
                 }});
    k.push_back({"lora+ia3+bitfit+adapter", [=](pet::task& t, const pet::layer_dims& d, const nn::dense_layer_weights& w,
                                                unsigned seed) {
                     lora(t, d, w, seed);
                     t.add(testing::random_ia3(d, {pet::target::v, pet::target::down}, seed + 1));
                     t.add(testing::random_bitfit(d, seed + 2));
                     t.add(testing::random_adapter<pet::adapter>(d, {.bottleneck = 4}, seed + 3));
                 }});
    return k;
}

template <class C>
void every_kind_on_one_backbone(unsigned seed) {
    const auto s = testing::shape_for<C>();
    std::vector<nn::dense_layer_weights> w{nn::random_layer_weights(s, seed, nn::kind_of<C>),
                                           nn::random_layer_weights(s, seed + 1, nn::kind_of<C>)};
    const Stack<C> stack(w, s);  // one backbone object for every task below
    auto svd_recovery = [&](const nn::dense_layer_weights& wl) {
        return nn::init_recovery(stack.layer(&wl == &w[0] ? 0 : 1), wl, {.rank = 8});
    };
    const index_t M = index_t(lengths.size()) * 5;
    const auto x = testing::random_matrix(M, s.d_model, seed + 3);
    for (const auto& k : kinds(svd_recovery)) {
        CAPTURE(k.name);
        std::vector<pet::task> tasks(2);
        std::vector<nn::dense_layer_weights> wd;
        for (std::size_t l = 0; l < 2; ++l) {
            k.add(tasks[l], stack.layer(l).pet_dims(), w[l], seed + 11 + unsigned(2 * l));
            wd.push_back(nn::dense_weights_of(stack.layer(l)));
            for (std::size_t i = 0; i < tasks[l].size(); ++i)
                if (const auto* b = std::get_if<pet::bitfit::modules>(&tasks[l].at(i)))
                    wd.back() = testing::bitfit_weights(wd.back(), *b);
        }
        std::vector<testing::reference_hooks> hooks{reference_of(tasks[0]), reference_of(tasks[1])};
        const MatD ref = testing::reference_batch<C>(wd, s, testing::to_double(x), lengths, hooks);
        const MatD plain = testing::reference_batch<C>(wd, s, testing::to_double(x), lengths);
        testing::for_each_isa([&](arch::isa) {
            nn::workspace ws;
            Matrix<float> y(M, s.d_model);
            stack.forward(x, lengths, y, ws, tasks);
            CHECK(testing::valid_error(y, ref, lengths) <= testing::pet_tol);
            // the task did something (a linear recovery of a lossless backbone is zero)
            if (k.name != "recovery_linear" || !std::is_same_v<typename C::compression, compress::dense>)
                CHECK(testing::valid_error(y, plain, lengths) > 1e-4);
        });
    }
    // prompt tuning: layer 0's tokens, the reference on [tokens; x]
    std::vector<pet::task> tasks(2);
    tasks[0].add(pet::prompt_tuning::make(stack.layer(0).pet_dims(), {.length = 2}, seed + 5));
    Matrix<float> xe;
    std::vector<index_t> le;
    pet::prepend_virtual_tokens(x, lengths, tasks[0].get<pet::prompt_tuning::modules>(0).tokens, xe, le);
    const MatD full = testing::reference_batch<C>({nn::dense_weights_of(stack.layer(0)), nn::dense_weights_of(stack.layer(1))},
                                                  s, testing::to_double(xe), le);
    MatD ref = MatD::Zero(M, s.d_model);
    for (index_t b = 0; b < 2; ++b) ref.middleRows(b * 5, 5) = full.middleRows(b * 7 + 2, 5);
    testing::for_each_isa([&](arch::isa) {
        nn::workspace ws;
        Matrix<float> y(M, s.d_model);
        stack.forward(x, lengths, y, ws, tasks);
        CHECK(testing::valid_error(y, ref, lengths) <= testing::pet_tol);
    });
}

}  // namespace

TEST_CASE("one backbone object runs tasks of every PET method and of mixes, each matching its reference") {
    every_kind_on_one_backbone<config::bert<compress::dense>>(900);
    every_kind_on_one_backbone<
        config::llama<compress::quantized<compress::int4, compress::per_group<16>, compress::asymmetric>>>(950);
}

TEST_CASE("a single-method task is that method exactly; tasks refuse a second method on a single-member hook") {
    using C = config::bert<compress::dense>;
    const auto s = testing::bert_shape();
    const auto w = nn::random_layer_weights(s, 960, nn::kind_of<C>);
    const TransformerLayer<C> layer(w, s);
    const TransformerLayer<config::bert<compress::dense>> static_layer(w, s);
    auto lora = pet::lora::make(layer.pet_dims(), {.rank = 4, .targets = pet::target_set::attention() | pet::target_set{pet::target::up, pet::target::down}}, 3);
    testing::randomize_up(lora, layer.pet_dims(), 4);
    const pet::task t(lora);
    CHECK(t.active(pet::hook::linear));
    CHECK(!t.active(pet::hook::sublayer));
    const auto x = testing::random_matrix(14, s.d_model, 961);
    const std::vector<index_t> two{7, 4};
    testing::for_each_isa([&](arch::isa) {
        nn::workspace ws;
        Matrix<float> y(14, s.d_model), ys(14, s.d_model);
        layer.forward(x, two, y, ws, t);
        static_layer.forward(x, two, ys, ws, lora);
        CHECK(testing::max_abs_error(y, testing::to_double(ys)) == 0.0);  // the same fused path
    });

    pet::task mam(pet::prefix_tuning::make(layer.pet_dims(), {.length = 2}, 1));
    CHECK_THROWS_WITH_AS(mam.add(pet::p_tuning_v2::make(layer.pet_dims(), {.length = 2}, 1)),
                         doctest::Contains("already holds a method using the attention hook"), format_error);
    CHECK(mam.size() == 1);
    pet::task scaled(pet::ia3::make(layer.pet_dims()));
    CHECK_THROWS_AS(scaled.add(pet::ia3::make(layer.pet_dims())), format_error);
    mam.add(pet::scaled_parallel_adapter::make(layer.pet_dims(), {.bottleneck = 8}, 2));
    CHECK(mam.method_name(1) == "scaled_parallel_adapter");
    const auto groups = mam.parameters();
    REQUIRE(!groups.empty());
    CHECK(groups.front().name == "prefix_tuning.prefix_k");
    CHECK(mam.bytes() == std::size_t(pet::count_parameters(mam, 0).trainable) * sizeof(float));

    // a module made for another layer shape is refused at the entry, by the method's own check
    auto wide = testing::bert_shape();
    wide.d_ff = 192;
    const TransformerLayer<config::bert<>> other(nn::random_layer_weights(wide, 1, nn::kind_of<C>), wide);
    const pet::task bad(pet::lora::make(layer.pet_dims(), {.rank = 4, .targets = {pet::target::q}}, 1),
                        pet::recovery::make(other.pet_dims(), {.rank = 4, .targets = {pet::target::down}}, 1));
    nn::workspace ws;
    Matrix<float> y(14, s.d_model);
    CHECK_THROWS_WITH_AS(layer.forward(x, two, y, ws, bad), doctest::Contains("recovery: target down expects A [r, 128]"),
                         shape_error);
}

}  // namespace cpet_test_pet_task
