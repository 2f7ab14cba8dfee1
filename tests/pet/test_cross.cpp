// The cross product: every PET method on every compression policy (testing::compression_policies, one line per
// format) on a BERT-style layer (and a LLaMA-style one for dense and int4) runs on every ISA and matches the Eigen
// reference of a 2-layer stack computed with the weights the format really uses (to_dense()). The methods run as
// run-time tasks (pet::task), so each configuration's stack is compiled once for all of them, not once per method
// (each method's own static path is tested in its own file).
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpet/pet/pet.hpp"
#include "cpet/pet/task.hpp"
#include "pet/pet_references.hpp"

namespace cpet_test_pet_cross {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using testing::MatD;

namespace {

const std::vector<index_t> lengths{5, 2};

/// How a test makes a method's modules (with a visible effect) and its reference hooks.
template <class P>
struct method;

template <pet::lora_scaling S>
struct method<pet::lora_policy<S>> {
    template <class L>
    static auto make(const L& layer, const nn::dense_layer_weights&, unsigned seed) {
        auto m = pet::lora_policy<S>::make(layer.pet_dims(), {.rank = 4, .alpha = 8, .targets = pet::target_set::attention() | pet::target_set{pet::target::down}}, seed);
        testing::randomize_up(m, layer.pet_dims(), seed);
        return m;
    }
    static testing::reference_hooks ref(const auto& m) { return testing::lowrank_ref(m); }
};
template <>
struct method<pet::recovery> {
    template <class L>
    static auto make(const L& layer, const nn::dense_layer_weights&, unsigned seed) {
        auto m = pet::recovery::make(layer.pet_dims(), {.rank = 8}, seed);
        testing::randomize_up(m, layer.pet_dims(), seed);
        return m;
    }
    static testing::reference_hooks ref(const auto& m) { return testing::lowrank_ref(m, true); }
};
template <>
struct method<pet::recovery_linear> {
    template <class L>
    static auto make(const L& layer, const nn::dense_layer_weights& w, unsigned) {
        return nn::init_recovery(layer, w, {.rank = 8});
    }
    static testing::reference_hooks ref(const auto& m) { return testing::lowrank_ref(m); }
};
template <pet::adapter_form F, kernels::activation A>
struct method<pet::adapter_policy<F, A>> {
    template <class L>
    static auto make(const L& layer, const nn::dense_layer_weights&, unsigned seed) {
        return testing::random_adapter<pet::adapter_policy<F, A>>(layer.pet_dims(), {.bottleneck = 8}, seed);
    }
    static testing::reference_hooks ref(const auto& m) { return testing::adapter_ref<pet::adapter_policy<F, A>>(m); }
};
template <pet::prefix_kind K>
struct method<pet::prefix_policy<K>> {
    template <class L>
    static auto make(const L& layer, const nn::dense_layer_weights&, unsigned seed) {
        return pet::prefix_policy<K>::make(layer.pet_dims(), {.length = 3}, seed);
    }
    static testing::reference_hooks ref(const auto& m) { return testing::prefix_ref(m); }
};
template <>
struct method<pet::ia3> {
    template <class L>
    static auto make(const L& layer, const nn::dense_layer_weights&, unsigned seed) {
        return testing::random_ia3(layer.pet_dims(), {pet::target::k, pet::target::v, pet::target::down}, seed);
    }
    static testing::reference_hooks ref(const auto& m) { return testing::ia3_ref(m); }
};
template <>
struct method<pet::bitfit> {
    template <class L>
    static auto make(const L& layer, const nn::dense_layer_weights&, unsigned seed) {
        return testing::random_bitfit(layer.pet_dims(), seed);
    }
    static testing::reference_hooks ref(const auto& m) { return testing::bitfit_ref(m); }
};
template <>
struct method<pet::prompt_tuning> {  // only the first layer carries tokens (run_one clears the others)
    template <class L>
    static auto make(const L& layer, const nn::dense_layer_weights&, unsigned seed) {
        return pet::prompt_tuning::make(layer.pet_dims(), {.length = 2}, seed);
    }
    static testing::reference_hooks ref(const auto&) { return {}; }
};
template <class P1, class P2>
struct method<pet::stack<P1, P2>> {
    template <class L>
    static auto make(const L& layer, const nn::dense_layer_weights& w, unsigned seed) {
        return typename pet::stack<P1, P2>::modules(method<P1>::make(layer, w, seed), method<P2>::make(layer, w, seed + 50));
    }
    static testing::reference_hooks ref(const auto& m) {
        auto a = method<P1>::ref(m.template get<0>());
        const auto b = method<P2>::ref(m.template get<1>());
        if (a.linear_delta && b.linear_delta) a = testing::combine_linear({a.linear_delta, b.linear_delta});
        else if (b.linear_delta) a.linear_delta = b.linear_delta;
        if (b.sublayer) a.sublayer = b.sublayer;
        if (b.prefix_k.size()) a.prefix_k = b.prefix_k, a.prefix_v = b.prefix_v;
        if (b.scale) a.scale = b.scale;
        return a;
    }
};

/// A method's modules into a run-time task (a stack's members one by one, in order).
template <class M>
void add_to(pet::task& t, const M& m) {
    if constexpr (requires { m.parts; })
        std::apply([&](const auto&... part) { (t.add(part), ...); }, m.parts);
    else
        t.add(m);
}

template <class C, class P>
void run_one(unsigned seed) {
    const auto s = testing::shape_for<C>();
    std::vector<nn::dense_layer_weights> w{nn::random_layer_weights(s, seed, nn::kind_of<C>),
                                           nn::random_layer_weights(s, seed + 1, nn::kind_of<C>)};
    const Stack<C> stack(w, s);
    std::vector<typename P::modules> tasks;
    std::vector<testing::reference_hooks> hooks;
    std::vector<nn::dense_layer_weights> wd;
    for (std::size_t l = 0; l < 2; ++l) {
        tasks.push_back(method<P>::make(stack.layer(l), w[l], seed + 11 + unsigned(2 * l)));
        // a stack takes virtual tokens from layer 0 only (and refuses them on later layers)
        if constexpr (std::is_same_v<P, pet::prompt_tuning>)
            if (l > 0) tasks.back() = {};
        wd.push_back(nn::dense_weights_of(stack.layer(l)));
        if constexpr (std::is_same_v<P, pet::bitfit>) wd.back() = testing::bitfit_weights(wd.back(), tasks.back());
    }
    for (const auto& t : tasks) hooks.push_back(method<P>::ref(t));  // after the vector stopped growing
    const index_t M = index_t(lengths.size()) * 5;
    const auto x = testing::random_matrix(M, s.d_model, seed + 3);
    MatD ref;
    if constexpr (std::is_same_v<P, pet::prompt_tuning>) {
        Matrix<float> xe;
        std::vector<index_t> le;
        pet::prepend_virtual_tokens(x, lengths, tasks[0].tokens, xe, le);
        const MatD full = testing::reference_batch<C>(wd, s, testing::to_double(xe), le);
        ref = MatD::Zero(M, s.d_model);
        for (index_t b = 0; b < 2; ++b) ref.middleRows(b * 5, 5) = full.middleRows(b * 7 + 2, 5);
    } else {
        ref = testing::reference_batch<C>(wd, s, testing::to_double(x), lengths, hooks);
    }
    std::vector<pet::task> runtime(2);
    for (std::size_t l = 0; l < 2; ++l) add_to(runtime[l], tasks[l]);
    testing::for_each_isa([&](arch::isa) {
        nn::workspace ws;
        Matrix<float> y(M, s.d_model);
        stack.forward(x, lengths, y, ws, runtime);
        bool finite = true;
        for (index_t i = 0; i < y.size(); ++i) finite = finite && std::isfinite(y.data()[i]);
        CHECK(finite);
        CHECK(testing::valid_error(y, ref, lengths) <= testing::pet_tol);
    });
}

using methods = std::tuple<pet::lora, pet::rslora, pet::recovery, pet::recovery_linear, pet::adapter,
                           pet::parallel_adapter, pet::scaled_parallel_adapter, pet::prefix_tuning, pet::p_tuning_v2,
                           pet::prompt_tuning, pet::ia3, pet::bitfit, pet::stack<pet::recovery, pet::lora>,
                           pet::stack<pet::prefix_tuning, pet::scaled_parallel_adapter>>;

/// Every method × every policy on the BERT layer; the LLaMA layer (pre-LN, RoPE, GQA, causal, SwiGLU) with the
/// dense and the int4 policy only: each combination is a full layer instantiated for three ISAs, and the whole
/// cross product on both layers was a third of the suite's compile time. The LLaMA-specific paths of each method
/// are covered by that method's own test file.
template <class Comp>
inline constexpr bool with_llama =
    std::is_same_v<Comp, compress::dense> ||
    std::is_same_v<Comp, compress::quantized<compress::int4, compress::per_group<16>, compress::asymmetric>>;

template <class Comp, class P>
void run_method(unsigned seed) {
    CAPTURE(std::string(Comp::name()));
    CAPTURE(std::string(P::name()));
    run_one<config::bert<Comp>, P>(seed);
    if constexpr (with_llama<Comp>) run_one<config::llama<Comp>, P>(seed + 100);
}

template <class Comp>
void run_policy(unsigned& seed) {
    std::apply([&](auto... p) { (run_method<Comp, decltype(p)>(seed += 7), ...); }, methods{});
}

}  // namespace

TEST_CASE("every PET method on every compression policy (BERT; LLaMA for dense and int4) matches the reference") {
    unsigned seed = 800;
    std::apply([&](auto... comp) { (run_policy<decltype(comp)>(seed), ...); }, testing::compression_policies{});
}

}  // namespace cpet_test_pet_cross
