// io/train_checkpoint.hpp: 10 steps equal 4 steps + save + load into fresh objects + 6 steps, bit for bit; a
// checkpoint that does not fit (name, size, option, optimizer, not a checkpoint) fails naming what differs and
// changes nothing.
#include <unistd.h>

#include <filesystem>
#include <string>
#include <vector>

#include "cpet/io/train_checkpoint.hpp"
#include "train/train_testing.hpp"

namespace cpet_test_train_train_checkpoint {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using testing::least_squares;
using testing::same_bits;

namespace {

std::filesystem::path temp_path(const std::string& name) {
    return std::filesystem::temp_directory_path() / ("cpet_train_ckpt_" + std::to_string(::getpid()) + "_" + name);
}

train::trainer_options run_options(train::optimizer_options::kind kind) {
    train::trainer_options o;
    o.max_steps = 10;
    o.batches = 7;
    o.accumulation = 2;  // 20 micro-batches over 7 per epoch: steps straddle epochs, the order matters
    o.clip_norm = 1.0;
    o.schedule.kind = train::schedule_kind::linear;
    o.schedule.lr = 0.05;
    o.schedule.warmup_steps = 3;
    o.optimizer.type = kind;
    o.optimizer.sgd.momentum = 0.9;
    o.optimizer.sgd.nesterov = true;
    o.seed = 2024;
    o.progress = train::progress_mode::none;
    return o;
}

void check_same_state(const train::trainer_state& a, const train::trainer_state& b) {
    CHECK(a.step == b.step);
    CHECK(a.micro_batches == b.micro_batches);
    CHECK(a.rng == b.rng);
    CHECK(a.order == b.order);
    CHECK(a.optimizer.step == b.optimizer.step);
    REQUIRE(a.optimizer.tensors.size() == b.optimizer.tensors.size());
    for (std::size_t i = 0; i < a.optimizer.tensors.size(); ++i) {
        CHECK(a.optimizer.tensors[i].name == b.optimizer.tensors[i].name);
        CHECK(same_bits(a.optimizer.tensors[i].values, b.optimizer.tensors[i].values));
    }
}

}  // namespace

TEST_CASE("10 steps equal 4 steps + checkpoint + load into fresh objects + 6 steps, bit for bit") {
    for (auto kind : {train::optimizer_options::kind::adamw, train::optimizer_options::kind::sgd}) {
        CAPTURE(int(kind));
        const auto opts = run_options(kind);
        least_squares whole(28, 4);
        auto pw = whole.p.params();
        train::trainer tw(opts);
        tw.run(pw, whole.step_fn(pw));

        const auto path = temp_path("resume.safetensors");
        {
            least_squares first(28, 4);
            auto pf = first.p.params();
            train::trainer tf(opts);
            tf.run(pf, first.step_fn(pf), {}, 4);
            io::save_train_checkpoint(path, pf, tf);
        }
        least_squares fresh(28, 4);
        for (auto& v : fresh.p.values) std::fill(v.begin(), v.end(), 123.f);
        // Another order of the same parameters is fine: they are found by name.
        std::vector<train::parameter> pr{fresh.p.params()[1], fresh.p.params()[0]};
        train::trainer tr(opts);
        io::load_train_checkpoint(path, pr, tr);
        CHECK(tr.step() == 4);
        tr.run(pr, [&](std::int64_t i) {
            const std::vector<train::parameter> wb{pr[1], pr[0]};
            return fresh.run(wb, index_t(i) * 4, 4);
        });
        CHECK(tr.step() == 10);
        for (std::size_t i = 0; i < 2; ++i) CHECK(same_bits(fresh.p.values[i], whole.p.values[i]));
        // The optimizer's tensors follow the parameters' order of the resumed run; compare them by name.
        auto sw = tw.state(), sr = tr.state();
        auto by_name = [](train::trainer_state& s) {
            std::sort(s.optimizer.tensors.begin(), s.optimizer.tensors.end(),
                      [](const auto& a, const auto& b) { return a.name < b.name; });
        };
        by_name(sw);
        by_name(sr);
        check_same_state(sw, sr);
        std::filesystem::remove(path);
    }
}

TEST_CASE("a checkpoint saved before the first step loads and the run matches") {
    const auto opts = run_options(train::optimizer_options::kind::adamw);
    least_squares a(28, 4), b(28, 4);
    auto pa = a.p.params(), pb = b.p.params();
    train::trainer ta(opts), tb(opts);
    const auto path = temp_path("empty.safetensors");
    io::save_train_checkpoint(path, pb, tb);
    io::load_train_checkpoint(path, pb, tb);
    ta.run(pa, a.step_fn(pa));
    tb.run(pb, b.step_fn(pb));
    for (std::size_t i = 0; i < 2; ++i) CHECK(same_bits(a.p.values[i], b.p.values[i]));
    std::filesystem::remove(path);
}

TEST_CASE("a checkpoint that does not fit fails naming the difference and changes nothing") {
    const auto opts = run_options(train::optimizer_options::kind::adamw);
    const auto path = temp_path("bad.safetensors");
    {
        least_squares src(28, 4);
        auto ps = src.p.params();
        train::trainer t(opts);
        t.run(ps, src.step_fn(ps), {}, 3);
        io::save_train_checkpoint(path, ps, t);
    }
    // The objects a failed load must leave alone: 2 steps into a run of their own.
    least_squares dst(28, 4);
    auto pd = dst.p.params();
    auto check_unchanged = [&](train::trainer& t, const std::vector<std::vector<float>>& values,
                               const train::trainer_state& state) {
        for (std::size_t i = 0; i < values.size(); ++i) CHECK(same_bits(dst.p.values[i], values[i]));
        check_same_state(t.state(), state);
    };

    SUBCASE("a parameter of another name") {
        train::trainer t(opts);
        t.run(pd, dst.step_fn(pd), {}, 2);
        const auto values = dst.p.values;
        const auto state = t.state();
        auto renamed = pd;
        renamed[1].name = "bias";
        CHECK_THROWS_WITH_AS(io::load_train_checkpoint(path, renamed, t), doctest::Contains("no tensor \"param/bias\""),
                             io_error);
        check_unchanged(t, values, state);
    }
    SUBCASE("a parameter of another size") {
        train::trainer t(opts);
        t.run(pd, dst.step_fn(pd), {}, 2);
        const auto values = dst.p.values;
        const auto state = t.state();
        auto shorter = pd;
        shorter[0].value = shorter[0].value.first(14);
        shorter[0].grad = shorter[0].grad.first(14);
        CHECK_THROWS_WITH_AS(io::load_train_checkpoint(path, shorter, t),
                             doctest::Contains("tensor \"param/w\" holds 15 values, this run's has 14"), shape_error);
        check_unchanged(t, values, state);
    }
    SUBCASE("a parameter the checkpoint does not have, or one it has that the run does not") {
        train::trainer t(opts);
        t.run(pd, dst.step_fn(pd), {}, 2);
        const auto values = dst.p.values;
        const auto state = t.state();
        CHECK_THROWS_WITH_AS(io::load_train_checkpoint(path, std::span(pd).first(1), t),
                             doctest::Contains("holds tensor \"optimizer/b.exp_avg\", which this run has no place for"),
                             io_error);
        check_unchanged(t, values, state);
    }
    SUBCASE("a parameter whose weight decay differs") {
        train::trainer t(opts);
        const auto values = dst.p.values;
        const auto state = t.state();
        auto decayed = pd;
        decayed[1].decay = true;
        CHECK_THROWS_WITH_AS(io::load_train_checkpoint(path, decayed, t),
                             doctest::Contains("parameter \"b\" has weight decay false in the checkpoint, true in this run"),
                             io_error);
        check_unchanged(t, values, state);
    }
    SUBCASE("an option that differs") {
        auto other = opts;
        other.optimizer.adamw.beta1 = 0.85;
        train::trainer t(other);
        t.run(pd, dst.step_fn(pd), {}, 2);
        const auto values = dst.p.values;
        const auto state = t.state();
        CHECK_THROWS_WITH_AS(io::load_train_checkpoint(path, pd, t),
                             doctest::Contains("option \"adamw.beta1\" is 0.9 in the checkpoint, this run has 0.85"),
                             io_error);
        check_unchanged(t, values, state);
    }
    SUBCASE("another optimizer, seed or length of run") {
        for (int which = 0; which < 3; ++which) {
            auto other = opts;
            if (which == 0) other.optimizer.type = train::optimizer_options::kind::sgd;
            if (which == 1) other.seed = 7;
            if (which == 2) other.max_steps = 12;
            train::trainer t(other);
            const auto values = dst.p.values;
            const auto state = t.state();
            const char* want = which == 0 ? "option \"optimizer\" is adamw in the checkpoint, this run has sgd"
                               : which == 1 ? "option \"seed\" is 2024 in the checkpoint, this run has 7"
                                            : "is 10 in the checkpoint, this run has 12";
            CHECK_THROWS_WITH_AS(io::load_train_checkpoint(path, pd, t), doctest::Contains(want), io_error);
            check_unchanged(t, values, state);
        }
    }
    SUBCASE("a file that is not a training checkpoint") {
        const auto other = temp_path("plain.safetensors");
        const std::vector<float> v{1.f, 2.f};
        io::save_safetensors(other, {io::make_tensor("param/w", {2}, v)});
        train::trainer t(opts);
        const auto values = dst.p.values;
        const auto state = t.state();
        CHECK_THROWS_WITH_AS(io::load_train_checkpoint(other, pd, t),
                             doctest::Contains("not a cpet training checkpoint: no metadata \"format\""), io_error);
        check_unchanged(t, values, state);
        std::filesystem::remove(other);
        CHECK_THROWS_AS(io::load_train_checkpoint(temp_path("missing.safetensors"), pd, t), io_error);
    }
    std::filesystem::remove(path);
}

}  // namespace cpet_test_train_train_checkpoint
