// The trainer on a least-squares toy problem with a hand-written backward: the loss goes down, accumulation of
// half batches equals full batches, a NaN stops the run naming the step with nothing changed, the data order is
// seeded and resumable, the default report, option checks.
#include <cstdio>
#include <string>
#include <vector>

#include "cpet/train/trainer.hpp"
#include "train/train_testing.hpp"

using namespace cpet;
using testing::least_squares;
using testing::same_bits;

namespace {

train::trainer_options quiet(std::int64_t steps, std::int64_t batches, std::int64_t k = 1) {
    train::trainer_options o;
    o.max_steps = steps;
    o.batches = batches;
    o.accumulation = k;
    o.progress = train::progress_mode::none;
    o.schedule.lr = 0.05;
    o.schedule.kind = train::schedule_kind::cosine;
    o.schedule.warmup_steps = 2;
    o.optimizer.adamw.weight_decay = 0.01;
    o.clip_norm = 5.0;
    o.seed = 42;
    return o;
}

std::string read_all(std::FILE* f) {
    std::rewind(f);
    std::string s;
    char buf[512];
    std::size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) s.append(buf, n);
    return s;
}

}  // namespace

TEST_CASE("the loss goes down on least squares; on_step reports step, loss, lr, norm and tokens") {
    least_squares prob(32, 8);
    auto ps = prob.p.params();
    auto opts = quiet(60, 4);
    opts.schedule.lr = 0.2;
    opts.eval_every = 20;
    train::trainer t(opts);
    std::vector<train::step_info> seen;
    t.on_step = [&](const train::step_info& i) { seen.push_back(i); };
    const train::trainer::eval_fn eval = [&](std::int64_t) {
        return train::loss_parts::of("mse", [&] {
            auto saved = prob.p.grads;
            const double l = prob.run(ps, 0, 32).loss.total();
            prob.p.grads = saved;
            return l;
        }());
    };
    const double start = eval(0).total();
    const auto summary = t.run(ps, prob.step_fn(ps), eval);
    CHECK(summary.steps == 60);
    CHECK(summary.step == 60);
    CHECK(t.done());
    REQUIRE(summary.eval.has_value());
    CHECK(summary.eval->total() < 0.05 * start);
    REQUIRE(seen.size() == 60);
    CHECK(seen[0].step == 1);
    CHECK(seen[0].lr == 0.0);  // HF: the first step of a warm-up uses lr_at(0) = 0
    CHECK(seen[1].lr == doctest::Approx(0.1));
    CHECK(seen[2].lr == doctest::Approx(0.2));
    CHECK(seen[59].total_steps == 60);
    CHECK(seen[59].tokens == 8);
    CHECK(seen[59].epoch == 14);
    CHECK(seen[19].eval.has_value());
    CHECK_FALSE(seen[20].eval.has_value());
    CHECK(seen[10].grad_norm > 0);
    CHECK(seen[10].loss.find("mse") != nullptr);
}

TEST_CASE("gradient accumulation: k = 2 over half batches equals k = 1 over full batches (fp rounding)") {
    for (auto kind : {train::optimizer_options::kind::adamw, train::optimizer_options::kind::sgd}) {
        least_squares full(32, 8), half(32, 4);
        auto pf = full.p.params(), ph = half.p.params();
        auto of = quiet(12, 4, 1), oh = quiet(12, 8, 2);
        for (auto* o : {&of, &oh}) {
            o->shuffle = false;  // micro-batches 2i, 2i+1 of 4 rows are full batch i of 8
            o->optimizer.type = kind;
            o->optimizer.sgd.momentum = 0.9;
        }
        train::trainer tf(of), th(oh);
        std::vector<double> lf, lh;
        tf.on_step = [&](const train::step_info& i) { lf.push_back(i.loss.total()); };
        th.on_step = [&](const train::step_info& i) { lh.push_back(i.loss.total()); };
        tf.run(pf, full.step_fn(pf));
        th.run(ph, half.step_fn(ph));
        REQUIRE(lf.size() == lh.size());
        for (std::size_t i = 0; i < lf.size(); ++i) CHECK(lh[i] == doctest::Approx(lf[i]).epsilon(1e-5));
        for (std::size_t i = 0; i < 2; ++i) CHECK(testing::rel_diff(half.p.values[i], full.p.values[i]) <= 1e-5);
        CHECK(th.micro_batches() == 24);
    }
}

TEST_CASE("a NaN loss or gradient throws numeric_error naming the step; parameters, state and order unchanged") {
    for (const bool in_grad : {false, true}) {
        CAPTURE(in_grad);
        least_squares ref(30, 6), prob(30, 6);
        auto pr = ref.p.params(), pp = prob.p.params();
        auto opts = quiet(8, 5, 2);
        train::trainer tr(opts), tp(opts);
        tr.run(pr, ref.step_fn(pr), {}, 2);
        tp.run(pp, prob.step_fn(pp), {}, 2);
        const auto values = prob.p.values;
        const auto state = tp.state();
        (in_grad ? prob.nan_grad_at_call : prob.nan_at_call) = 5;  // the second micro-batch of step 3
        CHECK_THROWS_WITH_AS(tp.run(pp, prob.step_fn(pp)),
                             doctest::Contains(in_grad ? "step 3: the gradient of parameter \"b\" is not finite"
                                                       : "step 3: loss is nan (parts mse nan); parameters left unchanged"),
                             numeric_error);
        for (std::size_t i = 0; i < values.size(); ++i) CHECK(same_bits(prob.p.values[i], values[i]));
        const auto after = tp.state();
        CHECK(after.step == 2);
        CHECK(after.micro_batches == state.micro_batches);
        CHECK(after.rng == state.rng);
        CHECK(after.order == state.order);
        for (std::size_t i = 0; i < after.optimizer.tensors.size(); ++i)
            CHECK(same_bits(after.optimizer.tensors[i].values, state.optimizer.tensors[i].values));
        // The run can go on (the bad batch was transient) and ends where an uninterrupted one does.
        tp.run(pp, prob.step_fn(pp));
        tr.run(pr, ref.step_fn(pr));
        for (std::size_t i = 0; i < values.size(); ++i) CHECK(same_bits(prob.p.values[i], ref.p.values[i]));
    }
}

TEST_CASE("same seed, same result bit for bit; another seed, another order; run in pieces equals one run") {
    least_squares a(40, 4), b(40, 4), c(40, 4);
    auto pa = a.p.params(), pb = b.p.params(), pc = c.p.params();
    auto opts = quiet(10, 10, 3);  // 30 micro-batches: steps straddle epochs
    train::trainer ta(opts), tb(opts);
    ta.run(pa, a.step_fn(pa));
    tb.run(pb, b.step_fn(pb), {}, 3);
    tb.run(pb, b.step_fn(pb), {}, 4);
    tb.run(pb, b.step_fn(pb));
    for (std::size_t i = 0; i < 2; ++i) CHECK(same_bits(a.p.values[i], b.p.values[i]));
    CHECK(ta.state().rng == tb.state().rng);
    opts.seed = 43;
    train::trainer tc(opts);
    tc.run(pc, c.step_fn(pc));
    CHECK_FALSE(same_bits(a.p.values[0], c.p.values[0]));
    CHECK(std::vector<std::int64_t>(ta.order().begin(), ta.order().end()) !=
          std::vector<std::int64_t>(tc.order().begin(), tc.order().end()));
    // Each epoch's order is a permutation of the micro-batches.
    auto sorted = std::vector<std::int64_t>(ta.order().begin(), ta.order().end());
    std::sort(sorted.begin(), sorted.end());
    for (std::int64_t i = 0; i < 10; ++i) CHECK(sorted[std::size_t(i)] == i);
}

TEST_CASE("trainer state through state() / load_state() into fresh objects continues bit for bit") {
    for (auto kind : {train::optimizer_options::kind::adamw, train::optimizer_options::kind::sgd}) {
        least_squares a(36, 4), b(36, 4);
        auto pa = a.p.params(), pb = b.p.params();
        auto opts = quiet(10, 9, 2);
        opts.optimizer.type = kind;
        opts.optimizer.sgd.momentum = 0.8;
        opts.optimizer.sgd.weight_decay = 0.001;
        train::trainer ta(opts), first(opts);
        ta.run(pa, a.step_fn(pa));
        first.run(pb, b.step_fn(pb), {}, 4);
        const auto saved = first.state();
        const auto values = b.p.values;
        least_squares fresh(36, 4);
        auto pf = fresh.p.params();
        for (std::size_t i = 0; i < values.size(); ++i) testing::assign(fresh.p.values[i], values[i]);
        train::trainer resumed(opts);
        resumed.load_state(saved, pf);
        CHECK(resumed.step() == 4);
        resumed.run(pf, [&](std::int64_t i) { return fresh.run(pf, index_t(i) * 4, 4); });
        for (std::size_t i = 0; i < 2; ++i) CHECK(same_bits(fresh.p.values[i], a.p.values[i]));
        const auto sa = ta.state(), sr = resumed.state();
        CHECK(sa.optimizer.step == sr.optimizer.step);
        REQUIRE(sa.optimizer.tensors.size() == sr.optimizer.tensors.size());
        for (std::size_t i = 0; i < sa.optimizer.tensors.size(); ++i)
            CHECK(same_bits(sa.optimizer.tensors[i].values, sr.optimizer.tensors[i].values));
        CHECK(sa.rng == sr.rng);
        CHECK(sa.order == sr.order);
    }
}

TEST_CASE("load_state rejects a state that does not fit and changes nothing") {
    least_squares a(16, 4);
    auto pa = a.p.params();
    train::trainer t(quiet(6, 4));
    t.run(pa, a.step_fn(pa), {}, 2);
    const auto good = t.state();
    auto bad = good;
    bad.micro_batches = 3;
    CHECK_THROWS_WITH_AS(t.load_state(bad, pa), doctest::Contains("3 micro-batches consumed after 2 steps of 1"),
                         shape_error);
    bad = good;
    bad.order[0] = bad.order[1];
    CHECK_THROWS_WITH_AS(t.load_state(bad, pa), doctest::Contains("not a permutation of [0, 4)"), shape_error);
    bad = good;
    bad.rng = "not a generator";
    CHECK_THROWS_WITH_AS(t.load_state(bad, pa), doctest::Contains("generator state does not parse"), shape_error);
    bad = good;
    bad.step = 7;
    CHECK_THROWS_WITH_AS(t.load_state(bad, pa), doctest::Contains("step 7 is outside [0, 6]"), shape_error);
    bad = good;
    bad.optimizer.tensors[1].values.push_back(0.f);
    CHECK_THROWS_WITH_AS(t.load_state(bad, pa), doctest::Contains("\"w.exp_avg_sq\" has 16 values"), shape_error);
    const auto now = t.state();
    CHECK(now.step == good.step);
    CHECK(now.rng == good.rng);
    CHECK(now.order == good.order);
}

TEST_CASE("the default report writes plain lines every log_every steps when not on a terminal") {
    least_squares a(16, 4);
    auto pa = a.p.params();
    auto opts = quiet(7, 4);
    opts.progress = train::progress_mode::automatic;
    opts.log_every = 3;
    opts.eval_every = 5;
    std::FILE* f = std::tmpfile();
    REQUIRE(f != nullptr);
    opts.log = f;
    train::trainer t(opts);
    t.run(pa, a.step_fn(pa), [](std::int64_t) { return train::loss_parts::of("mse", 0.125); });
    const std::string out = read_all(f);
    std::fclose(f);
    CAPTURE(out);
    CHECK(out.find("step 3/7  loss ") != std::string::npos);
    CHECK(out.find("step 6/7") != std::string::npos);
    CHECK(out.find("step 7/7") != std::string::npos);  // the last step always
    CHECK(out.find("step 4/7") == std::string::npos);
    CHECK(out.find("eval at step 5: loss 0.125") != std::string::npos);
    CHECK(out.find("eval at step 7: loss 0.125") != std::string::npos);
    CHECK(out.find("tok/s") != std::string::npos);
    CHECK(out.find("ETA") != std::string::npos);
    CHECK(out.find('\r') == std::string::npos);
}

TEST_CASE("trainer options are checked; epochs give the step count") {
    train::trainer_options o;
    o.batches = 10;
    CHECK_THROWS_WITH_AS(train::trainer{o}, doctest::Contains("set max_steps or epochs"), shape_error);
    o.epochs = 3;
    o.accumulation = 4;
    CHECK(train::trainer(o).total_steps() == 7);
    CHECK(train::trainer(o).schedule().total_steps == 7);
    o.accumulation = 0;
    CHECK_THROWS_WITH_AS(train::trainer{o}, doctest::Contains("accumulation must be >= 1"), shape_error);
    o.accumulation = 31;
    CHECK_THROWS_WITH_AS(train::trainer{o}, doctest::Contains("make no step"), shape_error);
    o.accumulation = 1;
    o.batches = 0;
    CHECK_THROWS_WITH_AS(train::trainer{o}, doctest::Contains("batches (micro-batches per epoch) must be > 0"),
                         shape_error);
    o.batches = 10;
    o.clip_norm = -1;
    CHECK_THROWS_WITH_AS(train::trainer{o}, doctest::Contains("clip_norm must be finite"), shape_error);
    o.clip_norm = 0;
    o.schedule.warmup_steps = 31;
    CHECK_THROWS_WITH_AS(train::trainer{o}, doctest::Contains("warmup_steps (31) exceeds total_steps (30)"),
                         shape_error);
}

#if __has_include(<unistd.h>) && __has_include(<fcntl.h>)
#include <fcntl.h>
#include <unistd.h>

namespace cpet_test_train_trainer {  // each test file's own namespace: the files of a room compile as one unit

TEST_CASE("on a terminal the default report rewrites one progress line with \\r") {
    // A pseudo-terminal stands in for the user's: isatty() is true on its slave side.
    const int master = ::posix_openpt(O_RDWR | O_NOCTTY);
    if (master < 0 || ::grantpt(master) != 0 || ::unlockpt(master) != 0) {
        MESSAGE("skipped: no pseudo-terminal available");
        if (master >= 0) ::close(master);
        return;
    }
    const int slave = ::open(::ptsname(master), O_RDWR | O_NOCTTY);
    REQUIRE(slave >= 0);
    std::FILE* tty = ::fdopen(slave, "w");
    REQUIRE(tty != nullptr);
    least_squares a(16, 4);
    auto pa = a.p.params();
    auto opts = quiet(5, 4);
    opts.progress = train::progress_mode::automatic;
    opts.log_every = 100;
    opts.log = tty;
    train::trainer t(opts);
    t.run(pa, a.step_fn(pa));
    std::fclose(tty);
    std::string out;
    char buf[4096];
    ::fcntl(master, F_SETFL, O_NONBLOCK);
    for (ssize_t n; (n = ::read(master, buf, sizeof buf)) > 0;) out.append(buf, std::size_t(n));
    ::close(master);
    CAPTURE(out);
    for (int s = 1; s <= 5; ++s)  // every step is shown, each rewriting the line
        CHECK(out.find("\r\x1b[Kstep " + std::to_string(s) + "/5") != std::string::npos);
    CHECK(out.find("ETA") != std::string::npos);
}
#endif

}  // namespace cpet_test_train_trainer
