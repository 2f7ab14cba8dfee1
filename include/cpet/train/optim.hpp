// cpet/train/optim.hpp — AdamW and SGD with momentum, step for step what torch.optim computes.
//
// Both follow torch's single-tensor CPU path (torch/optim/adamw.py, sgd.py, foreach=False): the per-step
// scalars (bias corrections, step size) in double as Python computes them, the element updates in float in
// torch's order, so a run matches PyTorch to float rounding. State (AdamW's first and second moments, SGD's
// momentum buffer) is created at the first step, one tensor per parameter, and bound to the parameters' names
// and sizes then; every later step and every load checks that binding, so a state cannot be applied to a
// different set of tensors by accident. state() / load_state() carry it through a checkpoint for an exact resume.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <variant>
#include <vector>

#include "cpet/core/error.hpp"
#include "cpet/train/parameter.hpp"

namespace cpet::train {

/// One named state tensor of an optimizer ("<parameter>.exp_avg", ...).
struct state_tensor {
    std::string name;
    std::vector<float> values;
};

/// Everything an optimizer needs to continue exactly: the number of steps taken and its tensors (empty before
/// the first step).
struct optimizer_state {
    std::int64_t step = 0;
    std::vector<state_tensor> tensors;
};

/// torch.optim.AdamW's hyper-parameters (the learning rate is an argument of each step: it comes from the
/// schedule). Defaults are torch's.
struct adamw_options {
    double beta1 = 0.9;
    double beta2 = 0.999;
    double eps = 1e-8;
    double weight_decay = 0.01;

    void check() const {
        require<shape_error>(beta1 >= 0 && beta1 < 1, "adamw: beta1 must be in [0, 1), got ", beta1);
        require<shape_error>(beta2 >= 0 && beta2 < 1, "adamw: beta2 must be in [0, 1), got ", beta2);
        require<shape_error>(eps >= 0 && std::isfinite(eps), "adamw: eps must be finite and >= 0, got ", eps);
        require<shape_error>(weight_decay >= 0 && std::isfinite(weight_decay),
                             "adamw: weight_decay must be finite and >= 0, got ", weight_decay);
    }
};

/// torch.optim.SGD's hyper-parameters. Nesterov needs momentum > 0 and dampening 0, as in torch.
struct sgd_options {
    double momentum = 0.0;
    double dampening = 0.0;
    double weight_decay = 0.0;
    bool nesterov = false;

    void check() const {
        require<shape_error>(momentum >= 0 && momentum < 1, "sgd: momentum must be in [0, 1), got ", momentum);
        require<shape_error>(dampening >= 0 && dampening <= 1, "sgd: dampening must be in [0, 1], got ", dampening);
        require<shape_error>(weight_decay >= 0 && std::isfinite(weight_decay),
                             "sgd: weight_decay must be finite and >= 0, got ", weight_decay);
        require<shape_error>(!nesterov || (momentum > 0 && dampening == 0),
                             "sgd: nesterov momentum requires momentum > 0 and dampening 0, got momentum ", momentum,
                             " and dampening ", dampening);
    }
};

namespace detail {

/// The state tensors of one parameter, in a fixed order; `suffixes` names them ("exp_avg", "exp_avg_sq").
class bound_state {
public:
    bool empty() const noexcept { return names_.empty(); }
    std::int64_t step() const noexcept { return step_; }

    /// Creates zeroed tensors for `ps` (the first step) or checks that `ps` are the tensors bound before.
    void bind(std::span<const parameter> ps, std::span<const char* const> suffixes, const char* who) {
        if (names_.empty()) {
            check_parameters(ps, who);
            for (const auto& p : ps) {
                names_.push_back(p.name);
                for (std::size_t s = 0; s < suffixes.size(); ++s) tensors_.emplace_back(p.size(), 0.f);
            }
            return;
        }
        require<shape_error>(ps.size() == names_.size(), who, ": the state holds ", names_.size(),
                             " parameters, this step has ", ps.size());
        for (std::size_t i = 0; i < ps.size(); ++i) {
            require<shape_error>(ps[i].name == names_[i], who, ": parameter ", i, " is \"", ps[i].name,
                                 "\", the state was made for \"", names_[i], "\"");
            require<shape_error>(ps[i].value.size() == tensors_[i * suffixes.size()].size() &&
                                     ps[i].grad.size() == ps[i].value.size(),
                                 who, ": parameter \"", ps[i].name, "\" has ", ps[i].value.size(), " values and ",
                                 ps[i].grad.size(), " gradients, the state holds ",
                                 tensors_[i * suffixes.size()].size());
        }
    }
    std::vector<float>& tensor(std::size_t param, std::size_t which, std::size_t per_param) noexcept {
        return tensors_[param * per_param + which];
    }
    void advance() noexcept { ++step_; }

    optimizer_state export_state(std::span<const char* const> suffixes) const {
        optimizer_state s;
        s.step = step_;
        for (std::size_t i = 0; i < names_.size(); ++i)
            for (std::size_t k = 0; k < suffixes.size(); ++k)
                s.tensors.push_back({names_[i] + "." + suffixes[k], tensors_[i * suffixes.size() + k]});
        return s;
    }

    /// Checks `s` against `ps` completely, then replaces this state; on any mismatch nothing changes.
    void import_state(const optimizer_state& s, std::span<const parameter> ps, std::span<const char* const> suffixes,
                      const char* who) {
        check_parameters(ps, who);
        require<shape_error>(s.step >= 0, who, ": state step count is negative (", s.step, ")");
        if (s.step == 0 && s.tensors.empty()) {  // a state saved before the first step
            *this = bound_state{};
            return;
        }
        require<shape_error>(s.tensors.size() == ps.size() * suffixes.size(), who, ": state holds ", s.tensors.size(),
                             " tensors, expected ", ps.size() * suffixes.size(), " (", suffixes.size(), " for each of ",
                             ps.size(), " parameters)");
        for (std::size_t i = 0; i < ps.size(); ++i)
            for (std::size_t k = 0; k < suffixes.size(); ++k) {
                const auto& t = s.tensors[i * suffixes.size() + k];
                const std::string want = ps[i].name + "." + suffixes[k];
                require<shape_error>(t.name == want, who, ": state tensor ", i * suffixes.size() + k, " is \"",
                                     t.name, "\", expected \"", want, "\"");
                require<shape_error>(t.values.size() == ps[i].size(), who, ": state tensor \"", t.name, "\" has ",
                                     t.values.size(), " values, parameter \"", ps[i].name, "\" has ", ps[i].size());
            }
        bound_state next;
        next.step_ = s.step;
        for (const auto& p : ps) next.names_.push_back(p.name);
        for (const auto& t : s.tensors) next.tensors_.push_back(t.values);
        *this = std::move(next);
    }

private:
    std::int64_t step_ = 0;
    std::vector<std::string> names_;
    std::vector<std::vector<float>> tensors_;
};

}  // namespace detail

/// torch.optim.AdamW: p ← p·(1 − lr·wd) (decoupled, only where `decay`), m ← β1·m + (1 − β1)·g,
/// v ← β2·v + (1 − β2)·g², p ← p − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + eps).
class adamw {
public:
    adamw() = default;
    explicit adamw(adamw_options o) : opts_(o) { opts_.check(); }

    const adamw_options& options() const noexcept { return opts_; }
    /// Steps taken so far.
    std::int64_t steps() const noexcept { return state_.step(); }

    void step(std::span<const parameter> ps, double lr) {
        require<shape_error>(lr >= 0 && std::isfinite(lr), "adamw: learning rate must be finite and >= 0, got ", lr);
        state_.bind(ps, suffixes, "adamw");
        state_.advance();
        const auto t = static_cast<double>(state_.step());
        // torch: bias_correction1 = 1 − β1ᵗ, step_size = lr / bc1, denom = √v / √bc2 + eps (Python doubles; the
        // tensor ops then see them as float scalars).
        const double bc1 = 1.0 - std::pow(opts_.beta1, t);
        const double bc2_sqrt = std::sqrt(1.0 - std::pow(opts_.beta2, t));
        const auto step_size = static_cast<float>(lr / bc1);
        const auto inv_bc2 = static_cast<float>(bc2_sqrt);
        const auto eps = static_cast<float>(opts_.eps);
        const auto b1c = static_cast<float>(1.0 - opts_.beta1);
        const auto b2 = static_cast<float>(opts_.beta2);
        const auto b2c = static_cast<float>(1.0 - opts_.beta2);
        const auto keep = static_cast<float>(1.0 - lr * opts_.weight_decay);
        for (std::size_t i = 0; i < ps.size(); ++i) {
            float* p = ps[i].value.data();
            const float* g = ps[i].grad.data();
            float* m = state_.tensor(i, 0, 2).data();
            float* v = state_.tensor(i, 1, 2).data();
            const std::size_t n = ps[i].size();
            if (ps[i].decay && opts_.weight_decay != 0)
                for (std::size_t j = 0; j < n; ++j) p[j] *= keep;
            for (std::size_t j = 0; j < n; ++j) {
                m[j] += (g[j] - m[j]) * b1c;  // torch's exp_avg.lerp_(grad, 1 − β1)
                v[j] = v[j] * b2 + g[j] * g[j] * b2c;
                p[j] -= step_size * (m[j] / (std::sqrt(v[j]) / inv_bc2 + eps));
            }
        }
    }

    /// "<name>.exp_avg", "<name>.exp_avg_sq" for every parameter, and the step count.
    optimizer_state state() const { return state_.export_state(suffixes); }
    /// Replaces the state by `s` after checking it against `ps` (names, sizes, order); shape_error naming the
    /// first tensor that differs, and nothing changes then.
    void load_state(const optimizer_state& s, std::span<const parameter> ps) {
        state_.import_state(s, ps, suffixes, "adamw: load_state");
    }

    static constexpr const char* suffix_names[] = {"exp_avg", "exp_avg_sq"};
    static constexpr std::span<const char* const> suffixes{suffix_names};

private:
    adamw_options opts_;
    detail::bound_state state_;
};

/// torch.optim.SGD: g ← g + wd·p (where `decay`), b ← g at the first step, else μ·b + (1 − dampening)·g;
/// the update direction is g + μ·b (Nesterov) or b; p ← p − lr·direction. Without momentum there is no state
/// tensor (torch keeps none either), only the step count.
class sgd {
public:
    sgd() = default;
    explicit sgd(sgd_options o) : opts_(o) { opts_.check(); }

    const sgd_options& options() const noexcept { return opts_; }
    std::int64_t steps() const noexcept { return state_.step(); }

    void step(std::span<const parameter> ps, double lr) {
        require<shape_error>(lr >= 0 && std::isfinite(lr), "sgd: learning rate must be finite and >= 0, got ", lr);
        check_parameters(ps, "sgd");
        const bool first = state_.step() == 0;
        if (opts_.momentum != 0) state_.bind(ps, suffixes, "sgd");
        state_.advance();
        const auto wd = static_cast<float>(opts_.weight_decay);
        const auto mu = static_cast<float>(opts_.momentum);
        const auto damp = static_cast<float>(1.0 - opts_.dampening);
        const auto neg_lr = static_cast<float>(-lr);
        for (std::size_t i = 0; i < ps.size(); ++i) {
            float* p = ps[i].value.data();
            const float* g = ps[i].grad.data();
            const std::size_t n = ps[i].size();
            const bool decay = ps[i].decay && opts_.weight_decay != 0;
            if (opts_.momentum == 0) {
                for (std::size_t j = 0; j < n; ++j) {
                    const float d = decay ? g[j] + wd * p[j] : g[j];
                    p[j] += neg_lr * d;
                }
                continue;
            }
            float* b = state_.tensor(i, 0, 1).data();
            for (std::size_t j = 0; j < n; ++j) {
                const float d = decay ? g[j] + wd * p[j] : g[j];
                b[j] = first ? d : b[j] * mu + damp * d;
                const float dir = opts_.nesterov ? d + mu * b[j] : b[j];
                p[j] += neg_lr * dir;
            }
        }
    }

    /// "<name>.momentum_buffer" for every parameter (none without momentum), and the step count.
    optimizer_state state() const {
        if (opts_.momentum == 0) return {state_.step(), {}};
        return state_.export_state(suffixes);
    }
    void load_state(const optimizer_state& s, std::span<const parameter> ps) {
        if (opts_.momentum != 0) {
            state_.import_state(s, ps, suffixes, "sgd: load_state");
            return;
        }
        check_parameters(ps, "sgd: load_state");
        require<shape_error>(s.tensors.empty(), "sgd: load_state: SGD without momentum keeps no tensors, the state "
                                                "holds ", s.tensors.size(), " (first \"", s.tensors.empty() ? "" : s.tensors[0].name, "\")");
        require<shape_error>(s.step >= 0, "sgd: load_state: step count is negative (", s.step, ")");
        detail::bound_state next;
        for (std::int64_t k = 0; k < s.step; ++k) next.advance();
        state_ = std::move(next);
    }

    static constexpr const char* suffix_names[] = {"momentum_buffer"};
    static constexpr std::span<const char* const> suffixes{suffix_names};

private:
    sgd_options opts_;
    detail::bound_state state_;
};

/// Which optimizer a trainer builds, with the hyper-parameters of each.
struct optimizer_options {
    enum class kind : std::uint8_t { adamw, sgd };
    kind type = kind::adamw;
    adamw_options adamw;
    sgd_options sgd;

    void check() const {
        if (type == kind::adamw) adamw.check();
        else sgd.check();
    }
    const char* name() const noexcept { return type == kind::adamw ? "adamw" : "sgd"; }
};

/// AdamW or SGD chosen at run time (one dispatch per step, none per element).
class optimizer {
public:
    optimizer() : impl_(train::adamw{}) {}
    explicit optimizer(const optimizer_options& o) : opts_(o) {
        o.check();
        if (o.type == optimizer_options::kind::adamw) impl_ = train::adamw(o.adamw);
        else impl_ = train::sgd(o.sgd);
    }

    const optimizer_options& options() const noexcept { return opts_; }
    std::int64_t steps() const noexcept {
        return std::visit([](const auto& o) { return o.steps(); }, impl_);
    }
    void step(std::span<const parameter> ps, double lr) {
        std::visit([&](auto& o) { o.step(ps, lr); }, impl_);
    }
    optimizer_state state() const {
        return std::visit([](const auto& o) { return o.state(); }, impl_);
    }
    void load_state(const optimizer_state& s, std::span<const parameter> ps) {
        std::visit([&](auto& o) { o.load_state(s, ps); }, impl_);
    }
    /// The names of the state tensors each parameter gets ("<name>.<suffix>", in this order); none for SGD
    /// without momentum.
    std::span<const char* const> state_suffixes() const noexcept {
        if (opts_.type == optimizer_options::kind::adamw) return train::adamw::suffixes;
        if (opts_.sgd.momentum == 0) return {};
        return train::sgd::suffixes;
    }

private:
    optimizer_options opts_;
    std::variant<train::adamw, train::sgd> impl_;
};

}  // namespace cpet::train
