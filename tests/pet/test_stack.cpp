// Stacks of PET policies: CPET's recovery + LoRA as ONE fused low-rank term, the MAM adapter (prefix + scaled
// parallel adapter), sublayer hooks chained in the stack's order, every hook kind at once; against the reference
// applying the parts in the documented order (pet/stack.hpp).
#include <functional>
#include <sstream>
#include <vector>

#include "cpet/pet/pet.hpp"
#include "pet/pet_references.hpp"

namespace cpet_test_pet_stack {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using testing::MatD;

namespace {
const std::vector<index_t> lengths{7, 1, 5};

template <class C, class Task>
void check_layer(const TransformerLayer<C>& layer, const Task& task, const testing::reference_hooks& hk,
                 const std::function<nn::dense_layer_weights(nn::dense_layer_weights)>& ref_weights = {}) {
    const auto s = layer.shape();
    const auto wd0 = nn::dense_weights_of(layer);
    const auto wd = ref_weights ? ref_weights(wd0) : wd0;  // the reference's weights (BitFit's β + Δβ)
    const auto x = testing::random_matrix(21, s.d_model, 700);
    const MatD ref = testing::reference_batch<C>({wd}, s, testing::to_double(x), lengths, {hk});
    const MatD plain = testing::reference_batch<C>({wd0}, s, testing::to_double(x), lengths);
    testing::for_each_isa([&](arch::isa) {
        nn::workspace ws;
        Matrix<float> y(21, s.d_model);
        layer.forward(x, lengths, y, ws, task);
        CHECK(testing::valid_error(y, ref, lengths) <= testing::pet_tol);
        CHECK(testing::valid_error(y, plain, lengths) > 1e-3);
    });
}
}  // namespace

using cpet_setting = pet::stack<pet::recovery, pet::lora>;
using mam = pet::stack<pet::prefix_tuning, pet::scaled_parallel_adapter>;
static_assert(pet::hooks_of<cpet_setting>::linear && !pet::hooks_of<cpet_setting>::sublayer);
static_assert(pet::hooks_of<mam>::attention && pet::hooks_of<mam>::sublayer && !pet::hooks_of<mam>::linear);

TEST_CASE_TEMPLATE("CPET's recovery + LoRA stack is one fused term equal to the sum of its parts", C,
                   config::bert<testing::rounded<4>>, config::llama<testing::rounded<4>>) {
    const auto s = testing::shape_for<C>();
    const TransformerLayer<C> layer(nn::random_layer_weights(s, 710, nn::kind_of<C>), s);
    const auto d = layer.pet_dims();
    auto rec = pet::recovery::make(d, {.rank = 8, .scale = 0.7f}, 1);
    testing::randomize_up(rec, d, 711);
    auto lora = pet::lora::make(d, {.rank = 4, .alpha = 8, .targets = {pet::target::q, pet::target::v, pet::target::down}}, 2);
    testing::randomize_up(lora, d, 712);
    const cpet_setting::modules task(rec, lora);
    pet::scratch sc;
    const auto x = testing::random_matrix(5, s.d_model, 713);
    auto lr = task.lowrank(pet::target::q, x, sc);
    REQUIRE(lr);
    CHECK(lr->u.cols() == 12);  // ranks concatenated: one GEMM epilogue term
    CHECK(lr->scale == 1.f);
    CHECK(task.lowrank(pet::target::k, x, sc)->u.cols() == 8);  // recovery only: its own term
    check_layer(layer, task,
                testing::combine_linear({[&](pet::target t, const MatD& in) { return testing::lowrank_delta(task.template get<0>(), t, in, true); },
                                         [&](pet::target t, const MatD& in) { return testing::lowrank_delta(task.template get<1>(), t, in, false); }}));
    std::ostringstream os;
    pet::count_parameters(task, nn::parameter_count(layer)).print(os);
    CHECK(os.str().find("layers.0.lora.q.lora_A: ") != std::string::npos);
    CHECK(os.str().find("layers.0.recovery.down.recovery_A2: ") != std::string::npos);
    CHECK(cpet_setting::full_name() == "stack<recovery,lora>");
}

TEST_CASE_TEMPLATE("the MAM adapter (prefix + scaled parallel adapter) equals prefix then adapter", C,
                   config::bert<compress::dense>, config::llama<testing::rounded<4>>) {
    const auto s = testing::shape_for<C>();
    const TransformerLayer<C> layer(nn::random_layer_weights(s, 720, nn::kind_of<C>), s);
    const auto d = layer.pet_dims();
    const mam::modules task(pet::prefix_tuning::make(d, {.length = 3}, 1),
                                        testing::random_adapter<pet::scaled_parallel_adapter>(d, {.bottleneck = 8}, 2));
    auto hk = testing::prefix_ref(task.template get<0>());
    hk.sublayer = testing::adapter_ref<pet::scaled_parallel_adapter>(task.template get<1>()).sublayer;
    check_layer(layer, task, hk);
}

TEST_CASE("sublayer hooks chain in the stack's order (sequential after parallel differs from the reverse)") {
    using S1 = pet::stack<pet::parallel_adapter, pet::adapter>;
    using S2 = pet::stack<pet::adapter, pet::parallel_adapter>;
    using C1 = config::bert<compress::dense>;
    const auto s = testing::bert_shape();
    const auto w = nn::random_layer_weights(s, 730, nn::kind_of<C1>);
    const TransformerLayer<C1> l1(w, s);
    const TransformerLayer<C1>& l2 = l1;  // one backbone object runs both stacks
    const auto d = l1.pet_dims();
    const auto par = testing::random_adapter<pet::parallel_adapter>(d, {.bottleneck = 8}, 3);
    const auto seq = testing::random_adapter<pet::adapter>(d, {.bottleneck = 8}, 4);
    testing::reference_hooks h1, h2;
    h1.sublayer = [&](pet::sublayer wh, const MatD& in, MatD& out) {
        testing::adapter_apply<pet::parallel_adapter>(par, wh, in, out);
        testing::adapter_apply<pet::adapter>(seq, wh, in, out);
    };
    h2.sublayer = [&](pet::sublayer wh, const MatD& in, MatD& out) {
        testing::adapter_apply<pet::adapter>(seq, wh, in, out);
        testing::adapter_apply<pet::parallel_adapter>(par, wh, in, out);
    };
    check_layer(l1, S1::modules(par, seq), h1);
    check_layer(l2, S2::modules(seq, par), h2);
    const auto x = testing::random_matrix(21, s.d_model, 731);
    nn::workspace ws;
    Matrix<float> y1(21, s.d_model), y2(21, s.d_model);
    l1.forward(x, lengths, y1, ws, S1::modules(par, seq));
    l2.forward(x, lengths, y2, ws, S2::modules(seq, par));
    CHECK(testing::valid_error(y1, testing::to_double(y2), lengths) > 1e-4);
}

TEST_CASE_TEMPLATE("every hook at once: IA3 + BitFit + LoRA + prefix + adapter in one stack", T,
                   testing::with<config::llama<testing::rounded<4>>, pet::stack<pet::ia3, pet::bitfit, pet::lora, pet::p_tuning_v2, pet::adapter>>,
                   testing::with<config::bert<compress::dense>, pet::stack<pet::ia3, pet::bitfit, pet::lora, pet::p_tuning_v2, pet::adapter>>) {
    using C = typename T::config;
    using P = typename T::pet;
    const auto s = testing::shape_for<C>();
    const TransformerLayer<C> layer(nn::random_layer_weights(s, 740, nn::kind_of<C>), s);
    const auto d = layer.pet_dims();
    auto lora = pet::lora::make(d, {.rank = 4, .alpha = 4, .targets = pet::target_set::attention()}, 5);
    testing::randomize_up(lora, d, 741);
    const typename P::modules task(
        testing::random_ia3(d, {pet::target::k, pet::target::v, pet::target::down}, 742), testing::random_bitfit(d, 743),
        lora, pet::p_tuning_v2::make(d, {.length = 2}, 744), testing::random_adapter<pet::adapter>(d, {.bottleneck = 8}, 745));
    auto hk = testing::combine_linear(
        {[&](pet::target t, const MatD& in) { return testing::bitfit_delta(task.template get<1>(), t, in); },
         [&](pet::target t, const MatD& in) { return testing::lowrank_delta(task.template get<2>(), t, in, false); }});
    hk.scale = [&](pet::target t) { return testing::ia3_vector(task.template get<0>(), t); };
    const auto pr = testing::prefix_ref(task.template get<3>());
    hk.prefix_k = pr.prefix_k, hk.prefix_v = pr.prefix_v;
    hk.sublayer = testing::adapter_ref<pet::adapter>(task.template get<4>()).sublayer;
    static_assert(pet::hooks_of<P>::norm);
    CHECK(task.norm_bias_delta(pet::norm_site::norm2).has_value() == (C::norm == nn::norm_kind::layernorm));
    check_layer(layer, task, hk, [&](nn::dense_layer_weights w) { return testing::bitfit_weights(w, task.template get<1>()); });
}

}  // namespace cpet_test_pet_stack
