// LoRA: the fused unmerged forward against a plain Eigen reference, B = 0 is the base exactly, merge == unmerged,
// unmerge restores the weights, merges refuse lossy formats (or recompress and report), bad input, accounting.
#include <sstream>
#include <vector>

#include "cpet/pet/pet.hpp"
#include "pet/pet_testing.hpp"

namespace cpet_test_pet_lora {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using testing::MatD;

namespace {

template <class Modules>
testing::reference_hooks lora_ref(const Modules& m) {
    testing::reference_hooks h;
    h.linear_delta = [&m](pet::target t, const MatD& x) -> MatD {
        if (m.rank(t) == 0) return MatD();
        return double(m.lowrank_scale(t)) * (x * testing::to_double(m.A(t)).transpose()) *
               testing::to_double(m.B(t)).transpose();
    };
    return h;
}

/// LoRA modules with random (non-zero) B so the term is visible.
template <class P>
typename P::modules random_lora(const pet::layer_dims& d, typename P::options o, unsigned seed) {
    auto m = P::make(d, o, seed);
    for (int i = 0; i < pet::target_count; ++i) {
        const auto t = pet::target(i);
        if (m.rank(t) == 0) continue;
        auto b = testing::random_matrix(d.out(t), m.rank(t), seed + 7 * unsigned(i), -0.3f, 0.3f);
        m.set(t, m.A(t), b);
    }
    return m;
}

const std::vector<index_t> lengths{7, 1, 5};

}  // namespace

TEST_CASE_TEMPLATE("LoRA (fused, unmerged) matches the Eigen reference on every target and ISA", T,
                   testing::with<config::bert<compress::dense>, pet::lora>, testing::with<config::llama<compress::dense>, pet::lora>,
                   testing::with<config::gpt2<compress::dense>, pet::rslora>, testing::with<config::bert<testing::rounded<4>>, pet::lora>) {
    using C = typename T::config;
    using P = typename T::pet;
    const auto s = testing::shape_for<C>();
    const auto w = nn::random_layer_weights(s, 5, nn::kind_of<C>);
    const TransformerLayer<C> layer(w, s);
    typename P::options o;
    o.rank = 4;
    o.alpha = 16;
    o.targets = pet::target_set::all();
    if (!layer.pet_dims().gated) o.targets = pet::target_set::attention() | pet::target_set{pet::target::up, pet::target::down};
    const auto task = random_lora<P>(layer.pet_dims(), o, 11);
    CHECK(task.lowrank_scale(pet::target::q) ==
          doctest::Approx(P::scaling_kind == pet::lora_scaling::standard ? 4.0 : 8.0));
    const auto x = testing::random_matrix(21, s.d_model, 3);
    const auto wd = nn::dense_weights_of(layer);  // what the (possibly lossy) format computes with
    const MatD ref = testing::reference_batch<C>({wd}, s, testing::to_double(x), lengths, {lora_ref(task)});
    const MatD plain = testing::reference_batch<C>({wd}, s, testing::to_double(x), lengths);
    testing::for_each_isa([&](arch::isa) {
        nn::workspace ws;
        Matrix<float> y(21, s.d_model);
        layer.forward(x, lengths, y, ws, task);
        CHECK(testing::valid_error(y, ref, lengths) <= testing::pet_tol);
        CHECK(testing::valid_error(y, plain, lengths) > 1e-3);
    });
}

TEST_CASE_TEMPLATE("LoRA with B = 0 (a fresh adapter) equals the base layer exactly", T,
                   testing::with<config::bert<compress::dense>, pet::lora>, testing::with<config::llama<compress::dense>, pet::lora>) {
    using C = typename T::config;
    const auto s = testing::shape_for<C>();
    const auto w = nn::random_layer_weights(s, 6, nn::kind_of<C>);
    const TransformerLayer<C> layer(w, s);
    const TransformerLayer<C> base(w, s);
    pet::lora::options o;
    o.rank = 8;
    o.targets = pet::target_set::attention() | pet::target_set{pet::target::up, pet::target::down};
    const auto task = pet::lora::make(layer.pet_dims(), o, 1);
    const auto x = testing::random_matrix(21, s.d_model, 4);
    testing::for_each_isa([&](arch::isa) {
        nn::workspace ws;
        Matrix<float> y(21, s.d_model), y0(21, s.d_model);
        layer.forward(x, lengths, y, ws, task);
        base.forward(x, lengths, y0, ws);
        CHECK(testing::max_abs_error(y, testing::to_double(y0)) == 0.0);
    });
}

TEST_CASE_TEMPLATE("LoRA merged into dense weights equals the unmerged forward; unmerge restores the weights", T,
                   testing::with<config::bert<compress::dense>, pet::lora>, testing::with<config::llama<compress::dense>, pet::rslora>) {
    using C = typename T::config;
    using P = typename T::pet;
    const auto s = testing::shape_for<C>();
    const auto w = nn::random_layer_weights(s, 7, nn::kind_of<C>);
    const TransformerLayer<C> layer(w, s);
    typename P::options o;
    o.rank = 6;
    o.alpha = 12;
    o.targets = pet::target_set{pet::target::q, pet::target::v, pet::target::o, pet::target::down};
    const auto task = random_lora<P>(layer.pet_dims(), o, 21);
    const auto merged = nn::merge_lora(layer, task);
    static_assert(std::is_same_v<decltype(merged), const TransformerLayer<C>>);  // the same backbone type
    const auto x = testing::random_matrix(21, s.d_model, 8);
    testing::for_each_isa([&](arch::isa) {
        nn::workspace ws;
        Matrix<float> y(21, s.d_model), ym(21, s.d_model);
        layer.forward(x, lengths, y, ws, task);
        merged.forward(x, lengths, ym, ws);
        CHECK(testing::valid_error(ym, testing::to_double(y), lengths) <= testing::pet_tol);
    });
    const auto back = nn::unmerge_lora(merged, task);
    const auto wb = nn::dense_weights_of(back);
    CHECK(testing::rel_error(wb.wq, testing::to_double(w.wq)) <= 1e-6);
    CHECK(testing::rel_error(wb.w_down, testing::to_double(w.w_down)) <= 1e-6);
    // merging leaves the backbone untouched (it is const and shared)
    CHECK(testing::rel_error(nn::dense_weights_of(layer).wq, testing::to_double(w.wq)) == 0.0);
}

TEST_CASE_TEMPLATE("LoRA merge / unmerge on a structurally pruned dense layer", T, testing::with<config::bert<compress::dense>, pet::lora>,
                   testing::with<config::llama<compress::dense>, pet::lora>) {
    using C = typename T::config;
    const auto s = testing::shape_for<C>();
    const auto w = nn::random_layer_weights(s, 31, nn::kind_of<C>);
    const auto p = nn::prune_structured(w, s, {.head_ratio = 0.5, .neuron_ratio = 0.25});
    REQUIRE(p.shape.n_kv_heads < s.n_kv_heads);
    REQUIRE(p.shape.d_ff < s.d_ff);
    const TransformerLayer<C> layer(p.weights, p.shape);
    const auto d = layer.pet_dims();
    CHECK(d.q_dim == p.shape.q_dim());
    CHECK(d.d_ff == p.shape.d_ff);
    pet::lora::options o;
    o.rank = 5;
    o.alpha = 10;
    o.targets = d.gated ? pet::target_set::all() : pet::target_set::attention() | pet::target_set{pet::target::up, pet::target::down};
    const auto task = random_lora<pet::lora>(d, o, 32);
    const auto merged = nn::merge_lora(layer, task);
    CHECK(merged.shape().d_ff == p.shape.d_ff);
    CHECK(merged.shape().n_heads == p.shape.n_heads);
    const auto x = testing::random_matrix(21, s.d_model, 33);
    // The unmerged forward on the pruned layer against the reference on its (dense, pruned) weights.
    const MatD ref = testing::reference_batch<C>({p.weights}, p.shape, testing::to_double(x), lengths, {lora_ref(task)});
    const MatD plain = testing::reference_batch<C>({p.weights}, p.shape, testing::to_double(x), lengths);
    testing::for_each_isa([&](arch::isa) {
        nn::workspace ws;
        Matrix<float> y(21, s.d_model), ym(21, s.d_model);
        layer.forward(x, lengths, y, ws, task);
        merged.forward(x, lengths, ym, ws);
        CHECK(testing::valid_error(y, ref, lengths) <= testing::pet_tol);
        CHECK(testing::valid_error(y, plain, lengths) > 1e-3);
        CHECK(testing::valid_error(ym, testing::to_double(y), lengths) <= testing::pet_tol);
    });
    const auto back = nn::dense_weights_of(nn::unmerge_lora(merged, task));
    for (int i = 0; i < pet::target_count; ++i) {
        const auto t = pet::target(i);
        if (!d.has(t)) continue;
        CAPTURE(pet::target_name(t));
        const auto& want = nn::detail::weight_of(p.weights, t);
        CHECK(testing::rel_error(nn::detail::weight_of(back, t), testing::to_double(want)) <= 1e-6);
    }
    CHECK(back.bo == p.weights.bo);
    CHECK(back.b_up == p.weights.b_up);
    // A LoRA shaped for the unpruned layer does not fit the pruned one.
    const TransformerLayer<C> full(w, s);
    const auto wide = random_lora<pet::lora>(full.pet_dims(), o, 34);
    CHECK_THROWS_WITH_AS(nn::merge_lora(layer, wide), doctest::Contains("LoRA merge: weight of"), shape_error);
}

TEST_CASE("LoRA merge into a lossy format refuses with format_error; merge-and-recompress reports its error") {
    using C = config::bert<testing::rounded<4>>;
    const auto s = testing::bert_shape();
    const auto w = nn::random_layer_weights(s, 9, nn::kind_of<C>);
    const TransformerLayer<C> layer(w, s);
    pet::lora::options o;
    o.rank = 4;
    const auto task = random_lora<pet::lora>(layer.pet_dims(), o, 31);
    CHECK_THROWS_WITH_AS(nn::merge_lora(layer, task), doctest::Contains("lossy"), format_error);
    const auto r = nn::merge_lora_and_recompress(layer, task);
    MESSAGE("merge-and-recompress into the 4-bit rounded format: relative weight error q ",
            r.weight_error[std::size_t(pet::target::q)], ", v ", r.weight_error[std::size_t(pet::target::v)]);
    CHECK(r.weight_error[std::size_t(pet::target::q)] > 1e-3);
    CHECK(r.weight_error[std::size_t(pet::target::q)] < 0.2);
    CHECK(r.weight_error[std::size_t(pet::target::k)] == 0.0);  // not adapted
    // the same on a dense base is exact
    using D = config::bert<compress::dense>;
    const TransformerLayer<D> dense(w, s);
    CHECK(nn::merge_lora_and_recompress(dense, task).max_weight_error() <= 1e-7);
}

TEST_CASE("LoRA bad input: rank beyond the dimensions, missing targets, unknown module names, wrong shapes") {
    const auto s = testing::bert_shape();  // d_model 64, d_ff 128
    const TransformerLayer<config::bert<compress::dense>> layer(
        nn::random_layer_weights(s, 10, nn::kind_of<config::bert<>>), s);
    const auto d = layer.pet_dims();
    pet::lora::options o;
    o.rank = 65;
    CHECK_THROWS_WITH_AS(pet::lora::make(d, o), doctest::Contains("rank 65 exceeds min(in, out)"), shape_error);
    o.rank = 0;
    CHECK_THROWS_WITH_AS(pet::lora::make(d, o), doctest::Contains("rank must be >= 1"), shape_error);
    o.rank = 64;
    CHECK_NOTHROW(pet::lora::make(d, o));  // full rank is allowed
    o.rank = 4;
    o.targets = pet::target_set{pet::target::gate};
    CHECK_THROWS_WITH_AS(pet::lora::make(d, o), doctest::Contains("gate does not exist"), shape_error);
    CHECK_THROWS_WITH_AS(pet::parse_targets({"q_proj", "qkv_proj"}), doctest::Contains("qkv_proj"), format_error);
    CHECK(pet::parse_targets({"q_proj", "value", "output.dense"}) ==
          pet::target_set{pet::target::q, pet::target::v, pet::target::down});
    auto m = pet::lora::make(d, pet::lora::options{});
    CHECK_THROWS_WITH_AS(m.set(pet::target::q, Matrix<float>(4, 63), Matrix<float>(64, 4)), doctest::Contains("q A"),
                         shape_error);
    CHECK_THROWS_WITH_AS(m.set(pet::target::q, Matrix<float>(4, 64), Matrix<float>(64, 5)), doctest::Contains("q B"),
                         shape_error);
}

TEST_CASE("LoRA parameter accounting (print_trainable_parameters)") {
    const auto s = testing::bert_shape();
    const TransformerLayer<config::bert<compress::dense>> layer(
        nn::random_layer_weights(s, 12, nn::kind_of<config::bert<>>), s);
    pet::lora::options o;
    o.rank = 8;
    const std::vector<pet::lora::modules> tasks{pet::lora::make(layer.pet_dims(), o),
                                                pet::lora::make(layer.pet_dims(), o)};
    const index_t backbone = nn::parameter_count(layer);
    // 4·64·64 + 2·64·128 weights, 4·64 + 128 + 64 biases, 2 LayerNorms · 2 · 64
    CHECK(backbone == 4 * 64 * 64 + 2 * 64 * 128 + 4 * 64 + 128 + 64 + 4 * 64);
    const auto r = pet::count_parameters(std::span<const pet::lora::modules>(tasks), 2 * backbone);
    CHECK(r.trainable == 2 * 2 * (8 * 64 + 64 * 8));
    CHECK(r.total == r.trainable + 2 * backbone);
    std::ostringstream os;
    r.print(os);
    MESSAGE(os.str());
    CHECK(os.str().find("trainable params: 4,096 || all params: ") == 0);
    CHECK(os.str().find("layers.1.v.lora_B: 512") != std::string::npos);
    CHECK(pet::parameter_report::grouped(1234567) == "1,234,567");
    CHECK(pet::parameter_report::grouped(123) == "123");
    CHECK(pet::parameter_report::grouped(1000) == "1,000");
    CHECK(pet::parameter_report::grouped(-123456) == "-123,456");
    CHECK(pet::parameter_report::grouped(0) == "0");
}

}  // namespace cpet_test_pet_lora
