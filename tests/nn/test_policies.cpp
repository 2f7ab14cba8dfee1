// Policy plumbing: the concepts, and toy PET policies proving the layer calls each hook it finds (compared
// against the reference layer with the same modification).
#include <array>
#include <optional>
#include <vector>

#include "cpet/compress/compress.hpp"
#include "cpet/nn/nn.hpp"
#include "cpet/pet/pet.hpp"
#include "nn/reference_layer.hpp"
#include "support/testing.hpp"

namespace cpet_test_nn_policies {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using testing::MatD;

namespace {

/// LoRA-like: y_t += s·(x·A_tᵀ)·B_tᵀ for the targets with an A_t; counts the hook calls.
struct toy_lora {
    static constexpr const char* name() noexcept { return "toy_lora"; }
    struct modules {
        std::array<Matrix<float>, pet::target_count> A, B;  // A [r, in], B [out, r]; empty: not adapted
        float scale = 0.5f;
        mutable std::array<int, pet::target_count> calls{};
        static constexpr pet::hook_set hooks{pet::hook::linear};

        void check_fits(const pet::layer_dims& d, const char* who) const {
            for (int i = 0; i < pet::target_count; ++i)
                require<shape_error>(A[std::size_t(i)].empty() || A[std::size_t(i)].cols() == d.in(pet::target(i)), who,
                                     ": toy_lora A does not fit");
        }
        std::optional<pet::lowrank_args> lowrank(pet::target t, ConstMatrixView<float> x, pet::scratch& s) const {
            const auto i = std::size_t(t);
            ++calls[i];
            if (A[i].empty()) return std::nullopt;
            auto u = s.matrix(0, x.rows(), A[i].rows());
            as_eigen(u) = as_eigen(x) * as_eigen(A[i]).transpose();
            return pet::lowrank_args{u, B[i], scale};
        }
    };
};

/// Sequential bottleneck adapter (Houlsby): out += relu(out·D)·U on both sublayers; counts the hook calls.
struct toy_adapter {
    static constexpr const char* name() noexcept { return "toy_adapter"; }
    struct modules {
        std::array<Matrix<float>, 2> D, U;  // [d, r], [r, d] per sublayer
        mutable std::array<int, 2> calls{};
        static constexpr pet::hook_set hooks{pet::hook::sublayer};

        void check_fits(const pet::layer_dims& d, const char* who) const {
            for (const auto& m : D) require<shape_error>(m.empty() || m.rows() == d.d_model, who, ": toy_adapter D does not fit");
        }
        void sublayer(pet::sublayer w, ConstMatrixView<float> in, MatrixView<float> out, pet::scratch& s) const {
            const auto i = std::size_t(w);
            ++calls[i];
            auto hid = s.matrix(1, out.rows(), D[i].cols());
            as_eigen(hid) = (as_eigen(ConstMatrixView<float>(out)) * as_eigen(D[i])).cwiseMax(0.f);
            as_eigen(out) += as_eigen(ConstMatrixView<float>(hid)) * as_eigen(U[i]);
        }
    };
};

/// Prefix tuning: P extra keys / values per layer.
struct toy_prefix {
    static constexpr const char* name() noexcept { return "toy_prefix"; }
    struct modules {
        Matrix<float> k, v;
        static constexpr pet::hook_set hooks{pet::hook::attention};
        void check_fits(const pet::layer_dims& d, const char* who) const {
            require<shape_error>(k.empty() || k.cols() == d.kv_dim, who, ": toy_prefix k does not fit");
        }
        std::optional<pet::prefix_kv> prefix() const {
            if (k.empty()) return std::nullopt;
            return pet::prefix_kv{k, v};
        }
    };
};

struct not_a_format {
    int out_features() const { return 0; }
};
struct not_a_policy {};

nn::layer_shape bert_shape() {
    nn::layer_shape s;
    s.d_model = 64, s.n_heads = 4, s.n_kv_heads = 4, s.head_dim = 16, s.d_ff = 128, s.eps = 1e-12f;
    return s;
}
nn::layer_shape llama_shape() {
    nn::layer_shape s;
    s.d_model = 96, s.n_heads = 4, s.n_kv_heads = 2, s.head_dim = 24, s.d_ff = 176, s.eps = 1e-6f;
    return s;
}

index_t in_of(pet::target t, const nn::layer_shape& s) {
    return t == pet::target::o ? s.q_dim() : t == pet::target::down ? s.d_ff : s.d_model;
}
index_t out_of(pet::target t, const nn::layer_shape& s) {
    switch (t) {
        case pet::target::q: return s.q_dim();
        case pet::target::k:
        case pet::target::v: return s.kv_dim();
        case pet::target::o:
        case pet::target::down: return s.d_model;
        default: return s.d_ff;
    }
}

toy_lora::modules make_lora(const nn::layer_shape& s, std::vector<pet::target> targets, unsigned seed) {
    toy_lora::modules m;
    for (auto t : targets) {
        m.A[std::size_t(t)] = testing::random_matrix(3, in_of(t, s), seed++, -0.3f, 0.3f);
        m.B[std::size_t(t)] = testing::random_matrix(out_of(t, s), 3, seed++, -0.3f, 0.3f);
    }
    return m;
}
testing::reference_hooks lora_ref(const toy_lora::modules& m) {
    testing::reference_hooks h;
    h.linear_delta = [&m](pet::target t, const MatD& x) -> MatD {
        const auto i = std::size_t(t);
        if (m.A[i].empty()) return MatD();
        return m.scale * (x * testing::to_double(m.A[i]).transpose()) * testing::to_double(m.B[i]).transpose();
    };
    return h;
}

constexpr double tol = 1e-5;

double valid_error(ConstMatrixView<float> y, const MatD& ref, const std::vector<index_t>& lengths) {
    const index_t S = y.rows() / index_t(lengths.size());
    double worst = 0;
    for (std::size_t b = 0; b < lengths.size(); ++b)
        if (lengths[b] > 0)
            worst = std::max(worst, testing::rel_error(y.middle_rows(index_t(b) * S, lengths[b]),
                                                       ref.middleRows(index_t(b) * S, lengths[b])));
    return worst;
}

}  // namespace

// ---- concepts ----
static_assert(compress::WeightFormat<compress::dense_f32>);
static_assert(compress::CompressionPolicy<compress::dense>);
static_assert(!compress::WeightFormat<not_a_format>);
static_assert(!compress::WeightFormat<Matrix<float>>);
static_assert(!compress::CompressionPolicy<not_a_policy>);
static_assert(pet::PetPolicy<pet::none>);
static_assert(!pet::PetPolicy<not_a_policy>);
static_assert(pet::PetPolicy<toy_lora> && pet::hooks_of<toy_lora>::linear && !pet::hooks_of<toy_lora>::sublayer);
static_assert(pet::PetPolicy<toy_adapter> && pet::hooks_of<toy_adapter>::sublayer && !pet::hooks_of<toy_adapter>::linear);
static_assert(pet::PetPolicy<toy_prefix> && pet::hooks_of<toy_prefix>::attention);
static_assert(nn::LayerConfig<config::bert<>> && nn::LayerConfig<config::llama<compress::dense>>);
static_assert(nn::LayerConfig<config::bert<compress::int8_per_channel>>);

TEST_CASE("pet::target names") {
    CHECK(pet::target_name(pet::target::q) == "q");
    CHECK(pet::target_name(pet::target::gate) == "gate");
    CHECK(pet::target_name(pet::target::down) == "down");
    CHECK(pet::sublayer_name(pet::sublayer::ffn) == "ffn");
}

TEST_CASE_TEMPLATE("a linear-hook policy adds its low-rank term inside the base GEMMs", T,
                   testing::with<config::bert<compress::dense>, toy_lora>, testing::with<config::llama<compress::dense>, toy_lora>) {
    using C = typename T::config;
    constexpr bool is_llama = C::ffn == nn::ffn_kind::swiglu;
    const auto s = is_llama ? llama_shape() : bert_shape();
    const auto w = nn::random_layer_weights(s, 81, nn::kind_of<C>);
    const TransformerLayer<C> layer(w, s);
    std::vector<pet::target> targets{pet::target::q, pet::target::v, pet::target::o, pet::target::up,
                                     pet::target::down};
    if (is_llama) targets.push_back(pet::target::gate);
    const auto task = make_lora(s, targets, 90);
    const std::vector<index_t> lengths{7, 1, 5};
    const auto x = testing::random_matrix(21, s.d_model, 83);
    const MatD ref = testing::reference_batch<C>({w}, s, testing::to_double(x), lengths, {lora_ref(task)});
    const MatD plain = testing::reference_batch<C>({w}, s, testing::to_double(x), lengths);
    CHECK(testing::rel_error(Matrix<float>(21, s.d_model), ref) > 0.5);  // sanity
    testing::for_each_isa([&](arch::isa) {
        nn::workspace ws;
        Matrix<float> y(21, s.d_model);
        task.calls = {};
        layer.forward(x, lengths, y, ws, task);
        CHECK(valid_error(y, ref, lengths) <= tol);
        CHECK(valid_error(y, plain, lengths) > 1e-3);  // the modification is visible
        for (auto t : {pet::target::q, pet::target::k, pet::target::v, pet::target::o, pet::target::up,
                       pet::target::down})
            CHECK(task.calls[std::size_t(t)] == 1);
        CHECK(task.calls[std::size_t(pet::target::gate)] == (is_llama ? 1 : 0));
        // no adapted target: the backbone's own output
        const toy_lora::modules empty;
        layer.forward(x, lengths, y, ws, empty);
        CHECK(valid_error(y, plain, lengths) <= tol);
    });
}

TEST_CASE_TEMPLATE("a sublayer-hook policy transforms both sublayer outputs before the residual", T,
                   testing::with<config::bert<compress::dense>, toy_adapter>, testing::with<config::llama<compress::dense>, toy_adapter>) {
    using C = typename T::config;
    constexpr bool is_llama = C::ffn == nn::ffn_kind::swiglu;
    const auto s = is_llama ? llama_shape() : bert_shape();
    std::vector<nn::dense_layer_weights> w;
    std::vector<toy_adapter::modules> tasks(2);
    std::vector<testing::reference_hooks> hooks(2);
    for (unsigned l = 0; l < 2; ++l) {
        w.push_back(nn::random_layer_weights(s, 100 + l, nn::kind_of<C>));
        for (std::size_t i = 0; i < 2; ++i) {
            tasks[l].D[i] = testing::random_matrix(s.d_model, 8, 110 + 10 * l + i, -0.3f, 0.3f);
            tasks[l].U[i] = testing::random_matrix(8, s.d_model, 120 + 10 * l + i, -0.3f, 0.3f);
        }
        const auto* m = &tasks[l];
        hooks[l].sublayer = [m](pet::sublayer where, const MatD&, MatD& out) {
            const auto i = std::size_t(where);
            const MatD hid = (out * testing::to_double(m->D[i])).cwiseMax(0.0);
            out += hid * testing::to_double(m->U[i]);
        };
    }
    const std::vector<index_t> lengths{7, 1, 5};
    const auto x = testing::random_matrix(21, s.d_model, 130);
    const MatD ref1 = testing::reference_batch<C>({w[0]}, s, testing::to_double(x), lengths, {hooks[0]});
    const MatD ref2 = testing::reference_batch<C>(w, s, testing::to_double(x), lengths, hooks);
    const TransformerLayer<C> layer(w[0], s);
    const Stack<C> stack(w, s);
    testing::for_each_isa([&](arch::isa) {
        nn::workspace ws;
        Matrix<float> y(21, s.d_model);
        tasks[0].calls = {};
        layer.forward(x, lengths, y, ws, tasks[0]);
        CHECK(tasks[0].calls[0] == 1);
        CHECK(tasks[0].calls[1] == 1);
        CHECK(valid_error(y, ref1, lengths) <= tol);
        stack.forward(x, lengths, y, ws, tasks);
        CHECK(valid_error(y, ref2, lengths) <= tol);
        CHECK(tasks[1].calls[0] >= 1);
        CHECK_THROWS_AS(stack.forward(x, lengths, y, ws, std::span<const toy_adapter::modules>(tasks.data(), 1)),
                        shape_error);
    });
}

TEST_CASE("an attention-hook policy (prefix) adds keys every query sees, also when decoding") {
    using C = config::llama<compress::dense>;
    const auto s = llama_shape();
    const auto w = nn::random_layer_weights(s, 140, nn::kind_of<C>);
    const TransformerLayer<C> layer(w, s);
    toy_prefix::modules task;
    task.k = testing::random_matrix(3, s.kv_dim(), 141);
    task.v = testing::random_matrix(3, s.kv_dim(), 142);
    testing::reference_hooks hk;
    hk.prefix_k = testing::to_double(task.k);
    hk.prefix_v = testing::to_double(task.v);
    const std::vector<index_t> lengths{7, 1, 5};
    const auto x = testing::random_matrix(21, s.d_model, 143);
    const MatD ref = testing::reference_batch<C>({w}, s, testing::to_double(x), lengths, {hk});
    testing::for_each_isa([&](arch::isa) {
        nn::workspace ws;
        Matrix<float> y(21, s.d_model);
        layer.forward(x, lengths, y, ws, task);
        CHECK(valid_error(y, ref, lengths) <= tol);
        auto cache = layer.make_cache(3, 3 + 7);  // the 3 prefix rows live in the cache (nn/kv_cache.hpp)
        Matrix<float> xt(3, s.d_model), yt(3, s.d_model);
        for (index_t t = 0; t < 7; ++t) {
            std::vector<index_t> n(3);
            for (index_t b = 0; b < 3; ++b) {
                n[std::size_t(b)] = t < lengths[std::size_t(b)] ? 1 : 0;
                for (index_t c = 0; c < s.d_model; ++c) xt(b, c) = x(b * 7 + t, c);
            }
            layer.decode(xt, n, yt, cache, ws, task);
            for (index_t b = 0; b < 3; ++b)
                if (n[std::size_t(b)])
                    CHECK(testing::rel_error(yt.view().middle_rows(b, 1), ref.middleRows(b * 7 + t, 1)) <= tol);
        }
        toy_prefix::modules bad;
        bad.k = Matrix<float>(2, s.kv_dim() + 1);
        bad.v = Matrix<float>(2, s.kv_dim() + 1);
        CHECK_THROWS_WITH_AS(layer.forward(x, lengths, y, ws, bad), doctest::Contains("prefix k"), shape_error);
    });
}

TEST_CASE("a linear hook returning the wrong shapes is rejected with the target's name") {
    using C = config::bert<compress::dense>;
    const auto s = bert_shape();
    const TransformerLayer<C> layer(nn::random_layer_weights(s, 150, nn::kind_of<C>), s);
    toy_lora::modules task;
    task.A[std::size_t(pet::target::v)] = Matrix<float>(2, s.d_model);
    task.B[std::size_t(pet::target::v)] = Matrix<float>(s.kv_dim() + 1, 2);
    const std::vector<index_t> lengths{4};
    Matrix<float> x(4, s.d_model), y(4, s.d_model);
    nn::workspace ws;
    CHECK_THROWS_WITH_AS(layer.forward(x, lengths, y, ws, task), doctest::Contains("target v"), shape_error);
}

}  // namespace cpet_test_nn_policies
