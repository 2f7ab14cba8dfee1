// cpet/strategy/classify.hpp — tuning a task on a frozen (dense or compressed) backbone for sequence
// classification, with the CPET distillation term, and evaluating it.
//
// A classification task is its per-layer PET modules (a pet::task per layer: LoRA, recovery + LoRA, ...) and a new
// trainable head over pooled hidden states (HF PEFT trains the head as modules_to_save). One tuning run minimises
//
//   L = w_task · CE(head(pool(h)), labels) + β · MSE(h, h_teacher)     (h: final hidden states, real tokens only)
//
// where h_teacher are the final hidden states of the teacher — in CPET the uncompressed model carrying the
// inherited modules — computed once per batch before training (the teacher is frozen), as the authors' code
// distils (thunlp/CA-LoRA: MSE of final hidden states, β 0.005 on a T5 encoder). `trainable` chooses which
// parameters the optimizer updates, so the paper's order (recovery first by distillation, then the task modules)
// is two runs over the same task with different selections.
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/nn/model.hpp"
#include "cpet/nn/workspace.hpp"
#include "cpet/pet/task.hpp"
#include "cpet/train/layer.hpp"
#include "cpet/train/loss.hpp"
#include "cpet/train/model.hpp"
#include "cpet/train/trainer.hpp"

namespace cpet::strategy {

/// Token ids of a batch and one label per sequence.
struct labelled_batch {
    nn::token_batch tokens;
    std::vector<std::int32_t> labels;
};

/// What a classification task owns: per-layer modules and a head.
struct classifier_task {
    std::vector<pet::task> layers;
    train::linear_head head;
    nn::pooling pool = nn::pooling::mean;

    /// Bytes of the task's parameters (modules and head, fp32).
    std::size_t bytes() const {
        std::size_t n = std::size_t(head.W.size() + head.b.size()) * sizeof(float);
        for (const auto& t : layers) n += t.bytes();
        return n;
    }
};

struct tune_options {
    std::int64_t epochs = 3;
    std::int64_t max_steps = 0;  ///< > 0: overrides epochs
    double lr = 1e-3;
    double weight_decay = 0.01;
    double warmup_ratio = 0.06;
    double clip_norm = 1.0;
    double task_weight = 1.0;     ///< weight of the cross-entropy (0: distillation only, the head is not run)
    double distill_weight = 0.0;  ///< β of the hidden-state MSE (needs teacher hidden states)
    /// Which parameters the optimizer updates, by name ("layer.3.lora.q.lora_A", "head.weight"); null: all.
    std::function<bool(std::string_view)> trainable;
    bool recompute = false;
    std::uint64_t seed = 0;
    /// A progress line with ETA on a terminal, plain lines every log_every steps otherwise (train::trainer).
    train::progress_mode progress = train::progress_mode::automatic;
    std::int64_t log_every = 10;
    std::function<void(const train::step_info&)> on_step;
};

struct tune_report {
    train::run_summary summary;
    std::size_t trainable_values = 0;
    std::size_t activation_bytes = 0;  ///< the largest tape of a step (what the backward kept)
    std::int64_t tokens = 0;
    double seconds = 0;
    double tokens_per_s() const noexcept { return seconds > 0 ? double(tokens) / seconds : 0.0; }
};

struct eval_result {
    double loss = 0;      ///< mean cross-entropy
    double accuracy = 0;  ///< fraction of argmax == label
    index_t examples = 0;
};

namespace detail {

inline void check_data(std::span<const labelled_batch> data, index_t labels, const char* who) {
    require<shape_error>(!data.empty(), who, ": no batches");
    for (std::size_t i = 0; i < data.size(); ++i) {
        const auto& b = data[i];
        require<shape_error>(index_t(b.labels.size()) == b.tokens.batch(), who, ": batch ", i, " has ",
                             b.labels.size(), " labels for ", b.tokens.batch(), " sequences");
        for (std::size_t j = 0; j < b.labels.size(); ++j)
            require<shape_error>(b.labels[j] >= 0 && b.labels[j] < labels, who, ": batch ", i, " sequence ", j,
                                 " has label ", b.labels[j], ", outside [0, ", labels, ")");
    }
}

template <nn::LayerConfig C>
void check_task(const nn::Model<C>& m, const classifier_task& t, const char* who) {
    require<shape_error>(t.layers.size() == m.stack().size(), who, ": the task has modules for ", t.layers.size(),
                         " layers, the model has ", m.stack().size());
    require<shape_error>(t.head.in_features() == m.d_model(), who, ": the head takes ", t.head.in_features(),
                         " features, the model's hidden size is ", m.d_model());
    for (std::size_t l = 0; l < t.layers.size(); ++l) t.layers[l].check_fits(m.stack().layer(l).pet_dims(), who);
}

}  // namespace detail

/// The final hidden states of `m` running task `t`'s modules on every batch (the teacher's targets).
template <nn::LayerConfig C>
std::vector<Matrix<float>> hidden_states(const nn::Model<C>& m, const std::vector<pet::task>& layers,
                                         std::span<const labelled_batch> data) {
    std::vector<Matrix<float>> out;
    out.reserve(data.size());
    nn::workspace ws;
    for (const auto& b : data) out.push_back(m.hidden_states(b.tokens, ws, layers));
    return out;
}

/// Mean cross-entropy and accuracy of task `t` on `data` (the inference forward).
template <nn::LayerConfig C>
eval_result evaluate(const nn::Model<C>& m, const classifier_task& t, std::span<const labelled_batch> data) {
    const char* who = "strategy::evaluate";
    detail::check_task(m, t, who);
    detail::check_data(data, t.head.labels(), who);
    nn::workspace ws;
    double loss_sum = 0;
    index_t correct = 0, n = 0;
    for (const auto& b : data) {
        const Matrix<float> h = m.hidden_states(b.tokens, ws, t.layers);
        Matrix<float> pooled(b.tokens.batch(), m.d_model()), logits(b.tokens.batch(), t.head.labels());
        nn::pool(h, b.tokens.layout(who), t.pool, pooled);
        t.head.forward(pooled, logits);
        Matrix<float> scratch(logits.rows(), logits.cols());
        loss_sum += train::cross_entropy(logits, b.labels, scratch) * double(b.labels.size());
        for (index_t i = 0; i < logits.rows(); ++i) {
            index_t best = 0;
            for (index_t j = 1; j < logits.cols(); ++j)
                if (logits(i, j) > logits(i, best)) best = j;
            correct += best == b.labels[std::size_t(i)];
        }
        n += index_t(b.labels.size());
    }
    return {n ? loss_sum / double(n) : 0.0, n ? double(correct) / double(n) : 0.0, n};
}

/// Trains `t` on `data` (see the top of this file); `teacher` holds one [B·S, d] matrix per batch when
/// o.distill_weight > 0.
template <nn::LayerConfig C>
tune_report tune(const nn::Model<C>& m, classifier_task& t, std::span<const labelled_batch> data, const tune_options& o,
                 std::span<const Matrix<float>> teacher = {}) {
    const char* who = "strategy::tune";
    detail::check_task(m, t, who);
    detail::check_data(data, t.head.labels(), who);
    require<shape_error>(o.task_weight >= 0 && o.distill_weight >= 0 && o.task_weight + o.distill_weight > 0, who,
                         ": task_weight (", o.task_weight, ") and distill_weight (", o.distill_weight,
                         ") must be >= 0 and not both 0");
    if (o.distill_weight > 0) {
        require<shape_error>(teacher.size() == data.size(), who, ": distillation needs one teacher hidden-state matrix "
                             "per batch, got ", teacher.size(), " for ", data.size(), " batches");
        for (std::size_t i = 0; i < data.size(); ++i)
            check_shape(teacher[i].view(), data[i].tokens.rows(), m.d_model(), "strategy::tune: teacher hidden states");
    }
    const std::size_t L = t.layers.size();
    std::vector<pet::task> grads;
    grads.reserve(L);
    for (const auto& l : t.layers) grads.push_back(train::zeros_like(l));
    std::vector<train::layer_terms> terms;
    for (std::size_t l = 0; l < L; ++l) terms.push_back(train::bind(m.stack().layer(l).pet_dims(), t.layers[l], grads[l], who));
    std::vector<train::parameter> all, ps;
    for (std::size_t l = 0; l < L; ++l)
        train::append_parameters(t.layers[l], grads[l], cpet::detail::concat("layer.", l, '.'), all);
    if (o.task_weight > 0) t.head.append_parameters("head.", all);
    for (auto& p : all)
        if (!o.trainable || o.trainable(p.name)) ps.push_back(p);
    require<shape_error>(!ps.empty(), who, ": no parameter is trainable (the selection matched none of ", all.size(), ")");

    train::trainer_options to;
    to.epochs = o.epochs;
    to.max_steps = o.max_steps;
    to.batches = std::int64_t(data.size());
    to.clip_norm = o.clip_norm;
    to.seed = o.seed;
    to.progress = o.progress;
    to.log_every = o.log_every;
    to.optimizer.adamw.weight_decay = o.weight_decay;
    to.schedule.kind = train::schedule_kind::linear;
    to.schedule.lr = o.lr;
    to.schedule.warmup_steps = std::int64_t(std::llround(o.warmup_ratio * double(to.total_steps())));
    train::trainer tr(to);
    tr.on_step = o.on_step;

    tune_report rep;
    rep.trainable_values = train::parameter_count(ps);
    train::model_tape tape;
    const train::model_options mo{o.recompute};
    auto step = [&](std::int64_t i) {
        const auto& b = data[std::size_t(i)];
        train::forward(m, b.tokens, terms, tape, mo);
        rep.activation_bytes = std::max(rep.activation_bytes, tape.bytes());
        const auto layout = b.tokens.layout(who);
        Matrix<float> dh(tape.hidden.rows(), tape.hidden.cols());
        train::micro_batch_result r;
        if (o.task_weight > 0) {
            Matrix<float> pooled(b.tokens.batch(), m.d_model()), logits(b.tokens.batch(), t.head.labels());
            nn::pool(tape.hidden, layout, t.pool, pooled);
            t.head.forward(pooled, logits);
            Matrix<float> dlogits(logits.rows(), logits.cols()), dpooled(pooled.rows(), pooled.cols());
            r.loss.add("ce", train::cross_entropy(logits, b.labels, dlogits, o.task_weight), o.task_weight);
            t.head.backward(pooled, dlogits, dpooled);
            train::pool_backward(dpooled, layout, t.pool, dh);
        }
        if (o.distill_weight > 0) {
            Matrix<float> dm(dh.rows(), dh.cols());
            r.loss.add("mse", train::mse(tape.hidden, teacher[std::size_t(i)], dm,
                                         train::row_selection::lengths(b.tokens.lengths, b.tokens.seq_len),
                                         o.distill_weight),
                       o.distill_weight);
            nn::detail::add_inplace(dh, dm);
        }
        train::backward(m, tape, terms, dh);
        for (index_t len : b.tokens.lengths) r.tokens += len;
        rep.tokens += r.tokens;
        return r;
    };
    rep.summary = tr.run(ps, step);
    rep.seconds = rep.summary.elapsed_s;
    return rep;
}

}  // namespace cpet::strategy
