// Recovery modules (CPET): the paper's GELU bypass against the Eigen reference and at exactly zero when fresh;
// the linear SVD-initialised bypass reproducing the dense layer at full rank and lowering the compressed layer's
// output error at rank 32 on every compression policy; activation-aware SVD; bad input.
#include <tuple>
#include <vector>

#include "cpet/pet/pet.hpp"
#include "pet/pet_testing.hpp"

namespace cpet_test_pet_recovery {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using testing::MatD;

namespace {

const std::vector<index_t> lengths{7, 1, 5};

template <class Modules>
testing::reference_hooks recovery_ref(const Modules& m, bool gelu) {
    testing::reference_hooks h;
    h.linear_delta = [&m, gelu](pet::target t, const MatD& x) -> MatD {
        if (m.rank(t) == 0) return MatD();
        MatD u = x * testing::to_double(m.A(t)).transpose();
        if (gelu) u = u.unaryExpr([](double z) { return testing::ref_act(kernels::activation::gelu_erf, z); });
        return double(m.lowrank_scale(t)) * u * testing::to_double(m.B(t)).transpose();
    };
    return h;
}

template <class F>
void for_each_policy(F&& f) {
    std::apply([&](auto... p) { (f(p), ...); }, testing::compression_policies{});
}

}  // namespace

TEST_CASE_TEMPLATE("the paper's recovery module R(x) = s·GELU(x·A1ᵀ)·A2ᵀ matches the reference on every linear", T,
                   testing::with<config::bert<compress::dense>, pet::recovery>, testing::with<config::llama<testing::rounded<4>>, pet::recovery>) {
    using C = typename T::config;
    const auto s = testing::shape_for<C>();
    const TransformerLayer<C> layer(nn::random_layer_weights(s, 40, nn::kind_of<C>), s);
    pet::recovery::options o;
    o.rank = 16;
    o.scale = 0.5f;
    auto task = pet::recovery::make(layer.pet_dims(), o, 3);
    CHECK(task.targets() == (layer.pet_dims().gated ? pet::target_set::all()
                                                    : pet::target_set::attention() |
                                                          pet::target_set{pet::target::up, pet::target::down}));
    for (int i = 0; i < pet::target_count; ++i) {
        const auto t = pet::target(i);
        if (task.rank(t))
            task.set(t, task.A(t), testing::random_matrix(layer.pet_dims().out(t), 16, 50 + unsigned(i), -0.3f, 0.3f));
    }
    const auto wd = nn::dense_weights_of(layer);
    const auto x = testing::random_matrix(21, s.d_model, 41);
    const MatD ref = testing::reference_batch<C>({wd}, s, testing::to_double(x), lengths, {recovery_ref(task, true)});
    const MatD plain = testing::reference_batch<C>({wd}, s, testing::to_double(x), lengths);
    testing::for_each_isa([&](arch::isa) {
        nn::workspace ws;
        Matrix<float> y(21, s.d_model);
        layer.forward(x, lengths, y, ws, task);
        CHECK(testing::valid_error(y, ref, lengths) <= testing::pet_tol);
        CHECK(testing::valid_error(y, plain, lengths) > 1e-3);
    });
}

TEST_CASE("a fresh GELU recovery module (A2 = 0) leaves the output unchanged") {
    for_each_policy([](auto policy) {
        using Comp = decltype(policy);
        using C = config::llama<Comp>;
        CAPTURE(Comp::name());
        const auto s = testing::llama_shape();
        const auto w = nn::random_layer_weights(s, 42, nn::kind_of<C>);
        const TransformerLayer<C> layer(w, s);
        const TransformerLayer<config::llama<Comp>> base(w, s);
        const auto task = pet::recovery::make(layer.pet_dims(), {}, 1);  // rank 32 everywhere
        CHECK(task.rank(pet::target::gate) == 32);
        const auto x = testing::random_matrix(21, s.d_model, 43);
        testing::for_each_isa([&](arch::isa) {
            nn::workspace ws;
            Matrix<float> y(21, s.d_model), y0(21, s.d_model);
            layer.forward(x, lengths, y, ws, task);
            base.forward(x, lengths, y0, ws);
            CHECK(testing::max_abs_error(y, testing::to_double(y0)) == 0.0);
        });
    });
}

TEST_CASE_TEMPLATE("a full-rank linear recovery module makes the compressed layer reproduce the dense layer", T,
                   testing::with<config::bert<testing::rounded<4>>, pet::recovery_linear>,
                   testing::with<config::llama<testing::rounded<4>>, pet::recovery_linear>) {
    using C = typename T::config;
    const auto s = testing::shape_for<C>();
    const auto w = nn::random_layer_weights(s, 44, nn::kind_of<C>);
    const TransformerLayer<C> layer(w, s);
    pet::recovery_linear::options o;
    o.rank = 1 << 20;
    o.clamp_rank = true;
    const auto task = nn::init_recovery(layer, w, o);
    CHECK(task.rank(pet::target::q) == s.d_model);
    const auto x = testing::random_matrix(21, s.d_model, 45);
    const MatD dense = testing::reference_batch<C>({w}, s, testing::to_double(x), lengths);
    testing::for_each_isa([&](arch::isa) {
        nn::workspace ws;
        Matrix<float> y(21, s.d_model);
        layer.forward(x, lengths, y, ws, pet::recovery_linear::modules{});
        const double before = testing::valid_error(y, dense, lengths);
        layer.forward(x, lengths, y, ws, task);
        const double after = testing::valid_error(y, dense, lengths);
        CHECK(before > 1e-2);
        CHECK(after <= testing::pet_tol);
    });
}

TEST_CASE("a rank-32 SVD-initialised linear recovery module lowers the compressed layer's output error") {
    for_each_policy([](auto policy) {
        using Comp = decltype(policy);
        auto run = [](auto config_tag) {
            using C = decltype(config_tag);
            const auto s = testing::shape_for<C>();
            const auto w = nn::random_layer_weights(s, 46, nn::kind_of<C>);
            const TransformerLayer<C> layer(w, s);
            const auto task = nn::init_recovery(layer, w);  // rank 32
            const auto x = testing::random_matrix(21, s.d_model, 47);
            const MatD dense = testing::reference_batch<C>({w}, s, testing::to_double(x), lengths);
            nn::workspace ws;
            Matrix<float> y(21, s.d_model);
            layer.forward(x, lengths, y, ws, pet::recovery_linear::modules{});
            const double before = testing::valid_error(y, dense, lengths);
            layer.forward(x, lengths, y, ws, task);
            const double after = testing::valid_error(y, dense, lengths);
            MESSAGE(std::string(Comp::name()), std::string(C::ffn == nn::ffn_kind::swiglu ? " llama" : " bert"),
                    ": output error vs the dense layer ", before, " -> ", after, " with rank-32 SVD recovery (",
                    before > 0 ? after / before : 1.0, "x)");
            if (before > testing::pet_tol) CHECK(after < 0.7 * before);
            else CHECK(after <= testing::pet_tol);  // dense: nothing lost, nothing added
        };
        run(config::bert<Comp>{});
        run(config::llama<Comp>{});
    });
}

TEST_CASE("activation-aware SVD init beats the plain one on inputs with uneven channel scales") {
    const index_t out = 48, in = 64, rows = 256, r = 8;
    const auto w = testing::random_matrix(out, in, 60);
    const Matrix<float> w_hat = testing::rounded_format<3>(w).to_dense();
    auto x = testing::random_matrix(rows, in, 61);
    std::mt19937 gen(62);
    std::uniform_real_distribution<float> e(-2.5f, 2.5f);
    compress::calibration cal;
    cal.sum_sq.assign(std::size_t(in), 0.0);
    cal.samples = rows;
    for (index_t j = 0; j < in; ++j) {
        const float sc = std::exp(e(gen));
        for (index_t i = 0; i < rows; ++i) {
            x(i, j) *= sc;
            cal.sum_sq[std::size_t(j)] += double(x(i, j)) * x(i, j);
        }
    }
    const MatD X = testing::to_double(x), E = testing::to_double(w) - testing::to_double(w_hat);
    auto out_err = [&](const pet::residual_factors& f) {
        const MatD R = E - testing::to_double(f.B) * testing::to_double(f.A);
        return (X * R.transpose()).norm() / (X * testing::to_double(w).transpose()).norm();
    };
    const double none = (X * E.transpose()).norm() / (X * testing::to_double(w).transpose()).norm();
    const double plain = out_err(pet::svd_residual(w, w_hat, r));
    const double aware = out_err(pet::svd_residual(w, w_hat, r, &cal));
    MESSAGE("linear output error: compressed ", none, ", + plain SVD r=8 ", plain, ", + activation-aware ", aware);
    CHECK(plain < none);
    CHECK(aware < plain);
    // full rank recovers W exactly, aware or not
    const auto full = pet::svd_residual(w, w_hat, out, &cal);
    CHECK(out_err(full) <= 1e-6);
}

TEST_CASE("recovery bad input: rank beyond the dimensions, missing gate, calibration of the wrong width") {
    const auto s = testing::bert_shape();
    const auto w = nn::random_layer_weights(s, 70, nn::kind_of<config::bert<>>);
    const TransformerLayer<config::bert<testing::rounded<4>>> layer(w, s);
    pet::recovery_linear::options o;
    o.rank = 65;
    CHECK_THROWS_WITH_AS(nn::init_recovery(layer, w, o), doctest::Contains("exceeds min(in, out)"), shape_error);
    CHECK_THROWS_WITH_AS(pet::recovery::make(layer.pet_dims(), {.rank = 100}), doctest::Contains("rank 100"),
                         shape_error);
    CHECK_THROWS_WITH_AS(pet::recovery::make(layer.pet_dims(), {.targets = {pet::target::gate}}),
                         doctest::Contains("gate does not exist"), shape_error);
    nn::layer_calibration cal;
    cal.attention_in.sum_sq.assign(10, 1.0);
    cal.attention_in.samples = 4;
    CHECK_THROWS_WITH_AS(nn::init_recovery(layer, w, {}, &cal), doctest::Contains("calibration has 10 channels"),
                         shape_error);
    auto bad = w;
    bad.wq = Matrix<float>(3, 3);
    CHECK_THROWS_AS(nn::init_recovery(layer, bad), shape_error);
}

}  // namespace cpet_test_pet_recovery
