// cpet/train/trainer.hpp — the training loop, independent of what is trained.
//
// The trainer sees parameters (value + gradient views) and two callables: step_fn(i) runs the forward and the
// backward of micro-batch i, adding into the gradients, and returns its loss terms and token count; eval_fn(step)
// returns held-out loss terms. One optimizer step is
//
//   zero grads → k micro-batches (step_fn) → grads ·= 1/k → loss and gradients finite? → clip → lr from the
//   schedule → optimizer step → on_step(step_info) → every eval_every steps eval_fn.
//
// The micro-batch order is a stream of epochs, each a permutation of [0, batches) drawn from a std::mt19937_64
// seeded with `seed` (a Fisher–Yates shuffle written here, not std::shuffle, whose draws the standard leaves to
// the library), so the same seed gives the same order everywhere. A step's k micro-batches may straddle two
// epochs. The generator, the current epoch's order and the count of micro-batches consumed are part of state(),
// with the step count and the optimizer's tensors: a run stopped after any step and resumed from that state
// (io/train_checkpoint.hpp) continues bit for bit as if it had not stopped, given the same threads.
//
// A step whose loss or gradient is NaN or infinite throws numeric_error naming the step before anything is
// updated: parameters, optimizer state, step count and data order are those before the step.
#pragma once

#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#if __has_include(<unistd.h>)
#include <unistd.h>
#define CPET_TRAIN_HAVE_ISATTY 1
#elif __has_include(<io.h>)
#include <io.h>
#define CPET_TRAIN_HAVE_WIN_ISATTY 1
#endif

#include "cpet/core/error.hpp"
#include "cpet/train/clip.hpp"
#include "cpet/train/loss.hpp"
#include "cpet/train/optim.hpp"
#include "cpet/train/parameter.hpp"
#include "cpet/train/schedule.hpp"

namespace cpet::train {

/// What step_fn returns for one micro-batch: its loss terms (means over the micro-batch) and how many tokens it
/// held (for tokens/s).
struct micro_batch_result {
    loss_parts loss;
    std::int64_t tokens = 0;
};

/// What on_step receives after each optimizer step.
struct step_info {
    std::int64_t step = 0;         ///< optimizer steps done, this one included (1 after the first)
    std::int64_t total_steps = 0;  ///< steps of the whole run
    std::int64_t epoch = 0;        ///< epoch of the step's last micro-batch (from 0)
    loss_parts loss;               ///< mean over the step's micro-batches
    double lr = 0;                 ///< learning rate this step used
    double grad_norm = 0;          ///< global L2 norm of the gradients before clipping
    std::int64_t tokens = 0;       ///< tokens of the step's micro-batches
    double tokens_per_s = 0;       ///< of this step
    double elapsed_s = 0;          ///< since this run() began
    double eta_s = 0;              ///< to total_steps at this run's mean step time
    std::optional<loss_parts> eval;  ///< eval_fn's result when this step evaluated
};

/// The default report: a progress line rewritten in place on a terminal, plain lines otherwise, or nothing.
enum class progress_mode : std::uint8_t { automatic, lines, none };

/// Everything a run is made of. The values that change the numbers (all but the reporting ones) are part of a
/// checkpoint and must match to resume: fingerprint().
struct trainer_options {
    std::int64_t max_steps = 0;     ///< optimizer steps of the run; 0: epochs · batches / accumulation
    std::int64_t epochs = 0;
    std::int64_t batches = 0;       ///< micro-batches in one epoch: step_fn's index runs over [0, batches)
    std::int64_t accumulation = 1;  ///< micro-batches per optimizer step (k)
    double clip_norm = 0;           ///< max global gradient norm; 0: no clipping
    train::schedule schedule;       ///< total_steps 0: the run's steps
    optimizer_options optimizer;
    std::uint64_t seed = 0;
    bool shuffle = true;            ///< false: each epoch visits 0, 1, …, batches − 1
    std::int64_t eval_every = 0;    ///< 0: never (eval_fn is also called after the last step when > 0)
    std::int64_t log_every = 10;    ///< plain report lines every n steps (and after the last)
    progress_mode progress = progress_mode::automatic;
    std::FILE* log = stderr;        ///< where the default report goes

    void check() const {
        const char* who = "trainer";
        require<shape_error>(batches > 0, who, ": batches (micro-batches per epoch) must be > 0, got ", batches);
        require<shape_error>(accumulation >= 1, who, ": accumulation must be >= 1, got ", accumulation);
        require<shape_error>(max_steps >= 0 && epochs >= 0, who, ": max_steps and epochs must be >= 0, got ",
                             max_steps, " and ", epochs);
        require<shape_error>(max_steps > 0 || epochs > 0, who, ": set max_steps or epochs (both are 0)");
        require<shape_error>(total_steps() > 0, who, ": ", epochs, " epochs of ", batches,
                             " micro-batches make no step of ", accumulation, " micro-batches");
        require<shape_error>(clip_norm >= 0 && std::isfinite(clip_norm), who,
                             ": clip_norm must be finite and >= 0, got ", clip_norm);
        require<shape_error>(eval_every >= 0 && log_every >= 0, who, ": eval_every and log_every must be >= 0, got ",
                             eval_every, " and ", log_every);
        optimizer.check();
        resolved_schedule().check();
    }
    std::int64_t total_steps() const noexcept {
        return max_steps > 0 ? max_steps : epochs * batches / std::max<std::int64_t>(1, accumulation);
    }
    /// The schedule with total_steps filled in.
    train::schedule resolved_schedule() const noexcept {
        train::schedule s = schedule;
        if (s.total_steps == 0) s.total_steps = total_steps();
        return s;
    }

    /// The options a resumed run must share with the one that saved the checkpoint, as exact text
    /// (shortest round-trip form of each double).
    std::map<std::string, std::string> fingerprint() const {
        std::map<std::string, std::string> f;
        const auto s = resolved_schedule();
        f["total_steps"] = std::to_string(total_steps());
        f["batches"] = std::to_string(batches);
        f["accumulation"] = std::to_string(accumulation);
        f["clip_norm"] = text(clip_norm);
        f["seed"] = std::to_string(seed);
        f["shuffle"] = shuffle ? "true" : "false";
        f["schedule"] = schedule_name(s.kind);
        f["schedule.lr"] = text(s.lr);
        f["schedule.warmup_steps"] = std::to_string(s.warmup_steps);
        f["schedule.total_steps"] = std::to_string(s.total_steps);
        f["optimizer"] = optimizer.name();
        if (optimizer.type == optimizer_options::kind::adamw) {
            f["adamw.beta1"] = text(optimizer.adamw.beta1);
            f["adamw.beta2"] = text(optimizer.adamw.beta2);
            f["adamw.eps"] = text(optimizer.adamw.eps);
            f["adamw.weight_decay"] = text(optimizer.adamw.weight_decay);
        } else {
            f["sgd.momentum"] = text(optimizer.sgd.momentum);
            f["sgd.dampening"] = text(optimizer.sgd.dampening);
            f["sgd.weight_decay"] = text(optimizer.sgd.weight_decay);
            f["sgd.nesterov"] = optimizer.sgd.nesterov ? "true" : "false";
        }
        return f;
    }

private:
    static std::string text(double v) {
        char buf[32];
        const auto r = std::to_chars(buf, buf + sizeof buf, v);
        return std::string(buf, r.ptr);
    }
};

/// Where a run stands: enough to continue it exactly (with the parameters' values).
struct trainer_state {
    std::int64_t step = 0;           ///< optimizer steps done
    std::int64_t micro_batches = 0;  ///< micro-batches consumed (step · accumulation)
    std::string rng;                 ///< the std::mt19937_64 as its operator<< writes it
    std::vector<std::int64_t> order; ///< the current epoch's micro-batch order (empty before the first)
    optimizer_state optimizer;
};

/// What run() did.
struct run_summary {
    std::int64_t steps = 0;  ///< steps this call took
    std::int64_t step = 0;   ///< steps done in all
    loss_parts loss;         ///< of the last step
    std::optional<loss_parts> eval;  ///< the last evaluation
    double elapsed_s = 0;
};

class trainer {
public:
    using step_fn = std::function<micro_batch_result(std::int64_t micro_batch)>;
    using eval_fn = std::function<loss_parts(std::int64_t step)>;

    explicit trainer(trainer_options o) : opts_(std::move(o)), rng_(opts_.seed) {
        opts_.check();
        schedule_ = opts_.resolved_schedule();
        optimizer_ = train::optimizer(opts_.optimizer);
    }

    /// Called after every step, beside the default report.
    std::function<void(const step_info&)> on_step;

    const trainer_options& options() const noexcept { return opts_; }
    const train::schedule& schedule() const noexcept { return schedule_; }
    const train::optimizer& optimizer() const noexcept { return optimizer_; }
    std::int64_t step() const noexcept { return step_; }
    std::int64_t total_steps() const noexcept { return opts_.total_steps(); }
    bool done() const noexcept { return step_ >= total_steps(); }
    /// The current epoch's micro-batch order (empty before the first micro-batch).
    std::span<const std::int64_t> order() const noexcept { return order_; }
    /// Micro-batches consumed so far; the next one is order()[micro_batches() % batches] unless an epoch starts.
    std::int64_t micro_batches() const noexcept { return consumed_; }

    /// Runs steps until total_steps, or at most `max_new_steps` of them when >= 0. Exceptions of step_fn and
    /// eval_fn pass through; the step they interrupt leaves everything as it was before it.
    run_summary run(std::span<const parameter> ps, const step_fn& step, const eval_fn& eval = {},
                    std::int64_t max_new_steps = -1) {
        check_parameters(ps, "trainer");
        require<shape_error>(static_cast<bool>(step), "trainer: step_fn is empty");
        using clock = std::chrono::steady_clock;
        const auto t0 = clock::now();
        run_summary summary;
        const bool tty = opts_.progress == progress_mode::automatic && is_terminal(opts_.log);
        const std::int64_t total = total_steps();
        const std::int64_t stop = max_new_steps < 0 ? total : std::min(total, step_ + max_new_steps);
        bool line_open = false;
        while (step_ < stop) {
            const auto ts = clock::now();
            step_info info = one_step(ps, step);
            const auto te = clock::now();
            info.total_steps = total;
            info.elapsed_s = std::chrono::duration<double>(te - t0).count();
            const double dt = std::chrono::duration<double>(te - ts).count();
            info.tokens_per_s = dt > 0 ? static_cast<double>(info.tokens) / dt : 0.0;
            ++summary.steps;
            info.eta_s = info.elapsed_s / static_cast<double>(summary.steps) * static_cast<double>(total - step_);
            if (eval && opts_.eval_every > 0 && (step_ % opts_.eval_every == 0 || step_ == total)) {
                info.eval = eval(step_);
                summary.eval = info.eval;
            }
            report(info, tty, line_open, step_ == stop);
            if (on_step) on_step(info);
            summary.loss = std::move(info.loss);
        }
        if (line_open) std::fputc('\n', opts_.log);
        summary.step = step_;
        summary.elapsed_s = std::chrono::duration<double>(clock::now() - t0).count();
        return summary;
    }

    trainer_state state() const {
        trainer_state s;
        s.step = step_;
        s.micro_batches = consumed_;
        std::ostringstream os;
        os << rng_;
        s.rng = os.str();
        s.order = order_;
        s.optimizer = optimizer_.state();
        return s;
    }

    /// Replaces where the run stands by `s` after checking all of it against the options and `ps`
    /// (shape_error naming what differs; nothing changes then).
    void load_state(const trainer_state& s, std::span<const parameter> ps) {
        check_state(s, ps);
        std::mt19937_64 rng;
        std::istringstream is(s.rng);
        is >> rng;
        train::optimizer next = optimizer_;
        next.load_state(s.optimizer, ps);
        optimizer_ = std::move(next);
        rng_ = rng;
        step_ = s.step;
        consumed_ = s.micro_batches;
        order_ = s.order;
    }

    /// The checks of load_state without the change.
    void check_state(const trainer_state& s, std::span<const parameter> ps) const {
        const char* who = "trainer: load_state";
        check_parameters(ps, who);
        require<shape_error>(s.step >= 0 && s.step <= total_steps(), who, ": step ", s.step, " is outside [0, ",
                             total_steps(), "]");
        require<shape_error>(s.micro_batches == s.step * opts_.accumulation, who, ": ", s.micro_batches,
                             " micro-batches consumed after ", s.step, " steps of ", opts_.accumulation);
        require<shape_error>(s.optimizer.step == s.step, who, ": the optimizer took ", s.optimizer.step,
                             " steps, the trainer ", s.step);
        if (s.micro_batches == 0) {
            require<shape_error>(s.order.empty(), who, ": an order of ", s.order.size(),
                                 " micro-batches before the first one");
        } else {
            require<shape_error>(static_cast<std::int64_t>(s.order.size()) == opts_.batches, who, ": the order holds ",
                                 s.order.size(), " micro-batches, an epoch has ", opts_.batches);
            std::vector<char> seen(s.order.size(), 0);
            for (const auto i : s.order) {
                require<shape_error>(i >= 0 && i < opts_.batches && !seen[static_cast<std::size_t>(i)], who,
                                     ": the order is not a permutation of [0, ", opts_.batches, ") (entry ", i, ")");
                seen[static_cast<std::size_t>(i)] = 1;
            }
        }
        std::mt19937_64 rng;
        std::istringstream is(s.rng);
        is >> rng;
        require<shape_error>(static_cast<bool>(is), who, ": the generator state does not parse");
        train::optimizer probe(opts_.optimizer);
        probe.load_state(s.optimizer, ps);
    }

private:
    struct cursor {
        std::int64_t consumed;
        std::vector<std::int64_t> order;
        std::mt19937_64 rng;
    };

    std::int64_t next_micro_batch() {
        const std::int64_t pos = consumed_ % opts_.batches;
        if (pos == 0) draw_order();
        ++consumed_;
        return order_[static_cast<std::size_t>(pos)];
    }

    /// Fisher–Yates with an unbiased bounded draw (rejection of the short last interval).
    void draw_order() {
        order_.resize(static_cast<std::size_t>(opts_.batches));
        for (std::size_t i = 0; i < order_.size(); ++i) order_[i] = static_cast<std::int64_t>(i);
        if (!opts_.shuffle) return;
        for (std::size_t i = order_.size(); i > 1; --i) {
            const std::uint64_t bound = i;
            const std::uint64_t limit = std::numeric_limits<std::uint64_t>::max() -
                                        std::numeric_limits<std::uint64_t>::max() % bound;
            std::uint64_t r = rng_();
            while (r >= limit) r = rng_();
            std::swap(order_[i - 1], order_[static_cast<std::size_t>(r % bound)]);
        }
    }

    step_info one_step(std::span<const parameter> ps, const step_fn& fn) {
        cursor saved{consumed_, order_, rng_};
        try {
            return one_step_unchecked(ps, fn);
        } catch (...) {
            consumed_ = saved.consumed;
            order_ = std::move(saved.order);
            rng_ = saved.rng;
            throw;
        }
    }

    step_info one_step_unchecked(std::span<const parameter> ps, const step_fn& fn) {
        const std::int64_t number = step_ + 1;
        step_info info;
        info.step = number;
        zero_grad(ps);
        for (std::int64_t k = 0; k < opts_.accumulation; ++k) {
            micro_batch_result r = fn(next_micro_batch());
            info.loss += r.loss;
            info.tokens += r.tokens;
        }
        info.epoch = (consumed_ - 1) / opts_.batches;
        if (opts_.accumulation > 1) {
            info.loss *= 1.0 / static_cast<double>(opts_.accumulation);
            scale_grads(ps, static_cast<float>(1.0 / static_cast<double>(opts_.accumulation)));
        }
        require<numeric_error>(info.loss.finite(), "step ", number, ": loss is ", number_text(info.loss.total()),
                               " (parts ", parts_text(info.loss), "); parameters left unchanged");
        const std::size_t bad = first_nonfinite_grad(ps);
        require<numeric_error>(bad == ps.size(), "step ", number, ": the gradient of parameter \"",
                               bad < ps.size() ? ps[bad].name : std::string(), "\" is not finite (loss ",
                               info.loss.str(), "); parameters left unchanged");
        info.grad_norm = opts_.clip_norm > 0 ? clip_grad_norm(ps, opts_.clip_norm) : grad_norm(ps);
        info.lr = schedule_.lr_at(step_);
        optimizer_.step(ps, info.lr);
        step_ = number;
        return info;
    }

    static std::string number_text(double v) {
        char buf[32];
        std::snprintf(buf, sizeof buf, "%.6g", v);
        return buf;
    }
    static std::string parts_text(const loss_parts& l) {
        std::string s;
        for (const auto& p : l.parts()) {
            if (!s.empty()) s += ", ";
            s += p.name + " " + number_text(p.value);
            if (p.weight != 1.0) s += " weight " + number_text(p.weight);
        }
        return s.empty() ? std::string("none") : s;
    }

    static bool is_terminal(std::FILE* f) noexcept {
#if defined(CPET_TRAIN_HAVE_ISATTY)
        return f && ::isatty(::fileno(f)) == 1;
#elif defined(CPET_TRAIN_HAVE_WIN_ISATTY)
        return f && ::_isatty(::_fileno(f)) != 0;
#else
        (void)f;
        return false;
#endif
    }

    static std::string clock_text(double s) {
        const auto t = static_cast<long long>(s + 0.5);
        char buf[32];
        if (t >= 3600) std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", t / 3600, t / 60 % 60, t % 60);
        else std::snprintf(buf, sizeof buf, "%lld:%02lld", t / 60, t % 60);
        return buf;
    }

    void report(const step_info& i, bool tty, bool& line_open, bool last) const {
        if (opts_.progress == progress_mode::none || !opts_.log) return;
        char buf[160];
        std::snprintf(buf, sizeof buf, "  lr %.3g  |g| %.4g  %.0f tok/s  %s elapsed  ETA %s", i.lr, i.grad_norm,
                      i.tokens_per_s, clock_text(i.elapsed_s).c_str(), clock_text(i.eta_s).c_str());
        const std::string line = "step " + std::to_string(i.step) + "/" + std::to_string(i.total_steps) + "  loss " +
                                 i.loss.str() + buf;
        const std::string eval = i.eval ? "eval at step " + std::to_string(i.step) + ": loss " + i.eval->str() : "";
        if (tty) {
            // \r and erase-to-end-of-line rewrite the one progress line; an evaluation gets a line of its own.
            if (!eval.empty()) std::fprintf(opts_.log, "\r\x1b[K%s\n", eval.c_str());
            std::fprintf(opts_.log, "\r\x1b[K%s", line.c_str());
            line_open = true;
        } else {
            if (last || (opts_.log_every > 0 && i.step % opts_.log_every == 0))
                std::fprintf(opts_.log, "%s\n", line.c_str());
            if (!eval.empty()) std::fprintf(opts_.log, "%s\n", eval.c_str());
        }
        std::fflush(opts_.log);
    }

    trainer_options opts_;
    train::schedule schedule_;
    train::optimizer optimizer_;
    std::mt19937_64 rng_;
    std::vector<std::int64_t> order_;
    std::int64_t consumed_ = 0;
    std::int64_t step_ = 0;
};

}  // namespace cpet::train
