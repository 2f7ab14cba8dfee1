// AdamW, SGD, the schedules and gradient clipping against PyTorch / transformers
// (tests/reference/make_train_references.py), and the optimizers' state: export, import, binding checks.
#include <string>
#include <vector>

#include "cpet/train/clip.hpp"
#include "cpet/train/optim.hpp"
#include "cpet/train/schedule.hpp"
#include "train/train_testing.hpp"

namespace cpet_test_train_optim {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using testing::floats;
using testing::rel_diff;

namespace {

constexpr double torch_tol = 1e-6;

/// Runs the reference's steps with `opt`, comparing the values after each step and the final state.
template <class Opt>
void replay(Opt& opt, const nlohmann::json& r) {
    testing::owned_params o;
    const auto decay = r["decay"].get<std::vector<bool>>();
    for (std::size_t i = 0; i < r["init"].size(); ++i) o.add("p" + std::to_string(i), floats(r["init"][i]), decay[i]);
    auto ps = o.params();
    const auto lrs = r["lrs"].get<std::vector<double>>();
    for (std::size_t s = 0; s < lrs.size(); ++s) {
        CAPTURE(s);
        for (std::size_t i = 0; i < ps.size(); ++i) testing::assign(o.grads[i], floats(r["grads"][s][i]));
        opt.step(ps, lrs[s]);
        for (std::size_t i = 0; i < ps.size(); ++i) {
            CAPTURE(i);
            CHECK(rel_diff(o.values[i], floats(r["after"][s][i])) <= torch_tol);
        }
    }
    CHECK(opt.steps() == std::int64_t(lrs.size()));
    const auto st = opt.state();
    CHECK(st.tensors.size() == r["state"].size());
    for (const auto& t : st.tensors) {
        CAPTURE(t.name);
        REQUIRE(r["state"].contains(t.name));
        CHECK(rel_diff(t.values, floats(r["state"][t.name])) <= torch_tol);
    }
}

testing::owned_params three_params(unsigned seed) {
    testing::owned_params o;
    std::mt19937 gen(seed);
    std::normal_distribution<float> nd;
    for (std::size_t n : {1u, 7u, 33u}) {
        std::vector<float> v(n);
        for (auto& x : v) x = nd(gen);
        o.add("t" + std::to_string(n), v, n != 7);
    }
    return o;
}

void random_grads(testing::owned_params& o, unsigned seed) {
    std::mt19937 gen(seed);
    std::normal_distribution<float> nd;
    for (auto& g : o.grads)
        for (auto& x : g) x = nd(gen);
}

}  // namespace

TEST_CASE("adamw matches torch.optim.AdamW step for step (decoupled decay, bias corrections, no decay group)") {
    for (const auto& r : testing::train_reference()["adamw"]) {
        train::adamw_options opts;
        opts.beta1 = r["beta1"];
        opts.beta2 = r["beta2"];
        opts.eps = r["eps"];
        opts.weight_decay = r["weight_decay"];
        CAPTURE(opts.beta1);
        train::adamw opt(opts);
        replay(opt, r);
    }
}

TEST_CASE("sgd matches torch.optim.SGD (plain, momentum with dampening, Nesterov; weight decay)") {
    for (const auto& r : testing::train_reference()["sgd"]) {
        train::sgd_options opts;
        opts.momentum = r["momentum"];
        opts.dampening = r["dampening"];
        opts.nesterov = r["nesterov"];
        opts.weight_decay = r["weight_decay"];
        CAPTURE(opts.momentum);
        CAPTURE(opts.nesterov);
        train::sgd opt(opts);
        replay(opt, r);
    }
}

TEST_CASE("the default hyper-parameters are torch's") {
    const train::adamw_options a;
    CHECK(a.beta1 == 0.9);
    CHECK(a.beta2 == 0.999);
    CHECK(a.eps == 1e-8);
    CHECK(a.weight_decay == 0.01);
    CHECK(train::schedule{}.lr == 1e-3);
}

TEST_CASE("schedules match transformers' get_{constant,linear,cosine}_schedule_with_warmup") {
    for (const auto& r : testing::train_reference()["schedule"]) {
        train::schedule s;
        const std::string kind = r["kind"];
        s.kind = kind == "constant" ? train::schedule_kind::constant
                 : kind == "linear" ? train::schedule_kind::linear
                                    : train::schedule_kind::cosine;
        s.lr = r["lr"];
        s.warmup_steps = r["warmup"];
        s.total_steps = r["total"];
        s.check();
        CAPTURE(kind);
        CAPTURE(s.warmup_steps);
        const auto lrs = r["lrs"].get<std::vector<double>>();
        for (std::size_t i = 0; i < lrs.size(); ++i) {
            CAPTURE(i);
            CHECK(s.lr_at(std::int64_t(i)) == doctest::Approx(lrs[i]).epsilon(1e-12).scale(1e-3));
        }
    }
}

TEST_CASE("schedule options are checked") {
    train::schedule s;
    s.total_steps = 0;
    CHECK_THROWS_WITH_AS(s.check(), doctest::Contains("needs total_steps > 0"), shape_error);
    s.total_steps = 5;
    s.warmup_steps = 6;
    CHECK_THROWS_WITH_AS(s.check(), doctest::Contains("warmup_steps (6) exceeds total_steps (5)"), shape_error);
    s.warmup_steps = -1;
    CHECK_THROWS_AS(s.check(), shape_error);
    s = {};
    s.total_steps = 3;
    s.lr = -1;
    CHECK_THROWS_WITH_AS(s.check(), doctest::Contains("lr must be finite"), shape_error);
    s.kind = train::schedule_kind::constant;
    s.lr = 0.5;
    s.total_steps = 0;
    CHECK_NOTHROW(s.check());
    CHECK(s.lr_at(1000) == 0.5);
}

TEST_CASE("clip_grad_norm matches torch.nn.utils.clip_grad_norm_ (norm returned before clipping)") {
    for (const auto& r : testing::train_reference()["clip"]) {
        testing::owned_params o;
        for (std::size_t i = 0; i < r["grads"].size(); ++i) {
            o.add("g" + std::to_string(i), std::vector<float>(r["grads"][i].size(), 0.f));
            testing::assign(o.grads[i], floats(r["grads"][i]));
        }
        auto ps = o.params();
        const double max_norm = r["max_norm"];
        CAPTURE(max_norm);
        const double norm = train::clip_grad_norm(ps, max_norm);
        CHECK(norm == doctest::Approx(double(r["norm"])).epsilon(1e-6));
        for (std::size_t i = 0; i < ps.size(); ++i) CHECK(rel_diff(o.grads[i], floats(r["clipped"][i])) <= torch_tol);
        CHECK(train::grad_norm(ps) == doctest::Approx(std::min(norm, max_norm)).epsilon(1e-6));
    }
    testing::owned_params o;
    o.add("a", {0.f});
    auto ps = o.params();
    CHECK_THROWS_WITH_AS(train::clip_grad_norm(ps, 0.0), doctest::Contains("max_norm must be finite and > 0"),
                         shape_error);
}

TEST_CASE("all_finite / first_nonfinite_grad find NaN and infinities; scale_grads scales") {
    auto o = three_params(1);
    random_grads(o, 2);
    auto ps = o.params();
    CHECK(train::all_finite(ps));
    o.grads[2][31] = std::numeric_limits<float>::infinity();
    CHECK_FALSE(train::all_finite(ps));
    CHECK(train::first_nonfinite_grad(ps) == 2);
    o.grads[1][0] = std::nanf("");
    CHECK(train::first_nonfinite_grad(ps) == 1);
    o.grads[1][0] = -std::numeric_limits<float>::infinity();
    CHECK(train::first_nonfinite_grad(ps) == 1);
    random_grads(o, 2);
    const auto before = o.grads;
    train::scale_grads(ps, 0.5f);
    for (std::size_t i = 0; i < ps.size(); ++i)
        for (std::size_t j = 0; j < before[i].size(); ++j) CHECK(o.grads[i][j] == 0.5f * before[i][j]);
}

TEST_CASE_TEMPLATE("optimizer state exported after 3 steps and imported into a fresh optimizer continues bit for bit",
                   Opt, train::adamw, train::sgd) {
    auto make = [] {
        if constexpr (std::is_same_v<Opt, train::sgd>) {
            train::sgd_options s;
            s.momentum = 0.9;
            s.nesterov = true;
            s.weight_decay = 0.01;
            return Opt(s);
        } else {
            return Opt{};
        }
    };
    auto a = three_params(3);
    auto pa = a.params();
    Opt full = make();
    Opt first = make();
    auto b = three_params(3);
    auto pb = b.params();
    for (int s = 0; s < 3; ++s) {
        random_grads(a, 10 + s);
        random_grads(b, 10 + s);
        full.step(pa, 1e-2);
        first.step(pb, 1e-2);
    }
    const train::optimizer_state saved = first.state();
    CHECK(saved.step == 3);
    Opt resumed = make();
    resumed.load_state(saved, pb);
    for (int s = 3; s < 7; ++s) {
        random_grads(a, 10 + s);
        random_grads(b, 10 + s);
        full.step(pa, 1e-2 * (s + 1));
        resumed.step(pb, 1e-2 * (s + 1));
    }
    for (std::size_t i = 0; i < a.values.size(); ++i) CHECK(testing::same_bits(a.values[i], b.values[i]));
    const auto sa = full.state(), sb = resumed.state();
    REQUIRE(sa.tensors.size() == sb.tensors.size());
    CHECK(sa.step == sb.step);
    for (std::size_t i = 0; i < sa.tensors.size(); ++i) {
        CHECK(sa.tensors[i].name == sb.tensors[i].name);
        CHECK(testing::same_bits(sa.tensors[i].values, sb.tensors[i].values));
    }
}

TEST_CASE("load_state checks names and sizes and changes nothing when they differ") {
    auto a = three_params(4);
    auto ps = a.params();
    train::adamw opt;
    random_grads(a, 5);
    opt.step(ps, 1e-3);
    auto good = opt.state();
    CHECK(good.tensors.size() == 6);
    CHECK(good.tensors[0].name == "t1.exp_avg");
    CHECK(good.tensors[5].name == "t33.exp_avg_sq");

    train::adamw other;
    random_grads(a, 6);
    other.step(ps, 1e-3);
    other.step(ps, 1e-3);
    const auto before = other.state();

    auto bad = good;
    bad.tensors[3].name = "t7.wrong";
    CHECK_THROWS_WITH_AS(other.load_state(bad, ps), doctest::Contains("\"t7.wrong\", expected \"t7.exp_avg_sq\""),
                         shape_error);
    bad = good;
    bad.tensors[4].values.pop_back();
    CHECK_THROWS_WITH_AS(other.load_state(bad, ps), doctest::Contains("\"t33.exp_avg\" has 32 values"), shape_error);
    bad = good;
    bad.tensors.pop_back();
    CHECK_THROWS_WITH_AS(other.load_state(bad, ps), doctest::Contains("holds 5 tensors, expected 6"), shape_error);
    const auto after = other.state();
    CHECK(after.step == before.step);
    for (std::size_t i = 0; i < after.tensors.size(); ++i)
        CHECK(testing::same_bits(after.tensors[i].values, before.tensors[i].values));

    // A state is bound to the parameters of its first step.
    auto c = three_params(4);
    c.names[1] = "renamed";
    auto pc = c.params();
    CHECK_THROWS_WITH_AS(opt.step(pc, 1e-3), doctest::Contains("parameter 1 is \"renamed\", the state was made for \"t7\""),
                         shape_error);
    CHECK(opt.steps() == 1);
    CHECK_THROWS_WITH_AS(opt.step(std::span<const train::parameter>(ps).first(2), 1e-3),
                         doctest::Contains("the state holds 3 parameters, this step has 2"), shape_error);
}

TEST_CASE("optimizer options are checked; the run-time optimizer dispatches to the chosen one") {
    train::adamw_options a;
    a.beta1 = 1.0;
    CHECK_THROWS_WITH_AS(train::adamw{a}, doctest::Contains("beta1 must be in [0, 1)"), shape_error);
    train::sgd_options s;
    s.nesterov = true;
    CHECK_THROWS_WITH_AS(train::sgd{s}, doctest::Contains("nesterov momentum requires momentum > 0"), shape_error);
    train::adamw plain;
    auto o = three_params(8);
    auto ps = o.params();
    CHECK_THROWS_WITH_AS(plain.step(ps, -1.0), doctest::Contains("learning rate must be finite"), shape_error);

    train::optimizer_options oo;
    oo.type = train::optimizer_options::kind::sgd;
    oo.sgd.momentum = 0.5;
    train::optimizer dyn(oo);
    train::sgd direct(oo.sgd);
    auto p1 = three_params(9), p2 = three_params(9);
    auto ps1 = p1.params(), ps2 = p2.params();
    random_grads(p1, 1);
    random_grads(p2, 1);
    dyn.step(ps1, 0.1);
    direct.step(ps2, 0.1);
    for (std::size_t i = 0; i < 3; ++i) CHECK(testing::same_bits(p1.values[i], p2.values[i]));
    CHECK(dyn.state_suffixes().size() == 1);
    CHECK(train::optimizer{}.state_suffixes().size() == 2);
}

}  // namespace cpet_test_train_optim
