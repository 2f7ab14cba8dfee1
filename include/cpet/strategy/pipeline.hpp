// cpet/strategy/pipeline.hpp — CPET end to end (Zhao et al., arXiv 2307.07705): compress a dense model, inherit the
// task's modules trained on it, add recovery modules, and tune by distillation from the dense model.
//
//   compress_model<P>(dense, calibration)    every layer through nn::compress with policy P (and structured pruning
//                                            when asked), calibrated sequentially on what the compressed layers
//                                            before it produce (GPTQ's scheme); keeps per layer what it kept (for
//                                            inheritance), the dense weights its format compressed and their input
//                                            statistics with Gram matrices (for the activation-aware SVD init)
//   cpet(dense, teacher, compressed, data)   the student task = recovery modules + the teacher's modules inherited
//                                            (sliced by the kept units when pruned) + the teacher's head; then
//                                            1. recovery modules by distillation alone (MSE of the final hidden
//                                               states against the teacher = dense model + its own task), and
//                                            2. the task modules and head by cross-entropy + β·MSE,
//                                            or both jointly; every step reports what it did.
// Its switches give the paper's ablations: no inheritance (fresh modules of the same shapes), no recovery,
// recovery without distillation (the SVD-initialised linear form, never trained), no distillation term.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "cpet/compress/policy.hpp"
#include "cpet/core/error.hpp"
#include "cpet/nn/compress.hpp"
#include "cpet/nn/model.hpp"
#include "cpet/nn/pet_layer.hpp"
#include "cpet/nn/stack.hpp"
#include "cpet/pet/lowrank.hpp"
#include "cpet/pet/recovery.hpp"
#include "cpet/pet/task.hpp"
#include "cpet/strategy/classify.hpp"
#include "cpet/strategy/inherit.hpp"

namespace cpet::strategy {

/// The embeddings of `batches` as one calibration set for the first layer (every batch padded to the longest).
template <nn::LayerConfig C>
nn::calibration_set calibration_inputs(const nn::Model<C>& m, std::span<const nn::token_batch> batches) {
    const char* who = "strategy::calibration_inputs";
    require<shape_error>(!batches.empty(), who, ": no calibration batches");
    index_t S = 0, B = 0;
    for (const auto& b : batches) S = std::max(S, b.seq_len), B += b.batch();
    nn::calibration_set set;
    set.x = Matrix<float>(B * S, m.d_model());
    index_t row = 0;
    for (const auto& b : batches) {
        const auto L = b.layout(who);
        m.embeddings().check(b, L, who);
        Matrix<float> x(b.rows(), m.d_model());
        if (b.rows() > 0) m.embeddings().forward(b, L, x);
        for (index_t i = 0; i < b.batch(); ++i, ++row) {
            set.lengths.push_back(L.length(i));
            for (index_t t = 0; t < L.length(i); ++t)
                for (index_t c = 0; c < m.d_model(); ++c) set.x(row * S + t, c) = x(i * L.seq_len + t, c);
        }
    }
    return set;
}

/// A compressed model and, per layer, what the pipeline's later steps need.
template <nn::LayerConfig C>
struct compressed_model {
    nn::Model<C> model;
    std::vector<nn::compress_report> reports;
    std::vector<kept_units> kept;                    ///< the dense layer's units each layer kept
    std::vector<nn::dense_layer_weights> reference;  ///< the dense weights (restricted to `kept`) each format compressed
    std::vector<nn::layer_calibration> stats;        ///< Σx², Σxᵀx of each layer's linear inputs on the calibration set
    bool pruned = false;  ///< heads / neurons were removed (the shapes differ from the dense model's)
    double seconds = 0;
};

namespace detail {

/// The dense weights of `w` restricted to the kept units (biases and norms from the compressed layer, which has
/// them already restricted, and bias-compensated when pruning compensated).
template <nn::LayerConfig C>
nn::dense_layer_weights restricted(const nn::dense_layer_weights& w, const pet::layer_dims& dense_dims,
                                   const nn::TransformerLayer<C>& compressed, const kept_units& kept) {
    nn::dense_layer_weights r = nn::dense_weights_of(compressed);
    const auto maps = detail::maps_of(dense_dims, compressed.pet_dims(), kept, "strategy::compress_model");
    for (int i = 0; i < pet::target_count; ++i) {
        const auto t = pet::target(i);
        const auto& src = nn::detail::weight_of(w, t);
        if (src.empty()) continue;
        nn::detail::weight_of(r, t) = detail::rows_of(detail::cols_of(src, maps.in(t)), maps.out(t));
    }
    return r;
}

}  // namespace detail

/// Compresses every layer of `dense` with policy P (see the top of this file); `set` holds the calibration
/// tokens' embeddings (calibration_inputs).
template <compress::CompressionPolicy P, nn::LayerConfig Cd>
compressed_model<nn::with_compression_t<Cd, P>> compress_model(const nn::Model<Cd>& dense, const nn::calibration_set& set,
                                                               const nn::compress_options& o = {}) {
    using Cc = nn::with_compression_t<Cd, P>;
    const auto t0 = std::chrono::steady_clock::now();
    compressed_model<Cc> out;
    std::vector<nn::TransformerLayer<Cc>> layers;
    nn::calibration_set cur{set.x, set.lengths};
    const std::size_t n = dense.stack().size();
    for (std::size_t l = 0; l < n; ++l) {
        const auto& dl = dense.stack().layer(l);
        const auto w = nn::dense_weights_of(dl);
        auto c = nn::compress<Cc>(w, dl.shape(), cur, o);
        const kept_units k = kept_units::of(c);
        auto ref = detail::restricted(w, dl.pet_dims(), c.layer, k);
        nn::calibration_options co;
        co.hessian = true;  // the full-Gram (EoRA) recovery init reads Σxᵀx
        out.stats.push_back(nn::calibrate<Cd>(ref, c.layer.shape(), cur, co).linears);
        if (l + 1 < n) {
            Matrix<float> next(cur.x.rows(), cur.x.cols());
            nn::workspace ws;
            c.layer.forward(cur.x, cur.lengths, next, ws);
            cur.x = std::move(next);
        }
        out.kept.push_back(k);
        out.reference.push_back(std::move(ref));
        out.reports.push_back(std::move(c.report));
        layers.push_back(std::move(c.layer));
    }
    out.pruned = o.prune.head_ratio > 0 || o.prune.neuron_ratio > 0;
    const auto* fn = dense.final_norm();
    std::optional<nn::Linear<compress::dense_f32>> lm;
    if (dense.lm_head()) lm = *dense.lm_head();
    out.model = nn::Model<Cc>(dense.embeddings(), nn::Stack<Cc>(std::move(layers)),
                              fn ? fn->gamma() : std::vector<float>{}, fn ? fn->beta() : std::vector<float>{},
                              fn ? fn->eps() : 1e-5f, std::move(lm), dense.lm_head_tied(), dense.classifier());
    out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return out;
}

enum class recovery_kind {
    none,
    gelu,  ///< the paper's GELU bypass, zero at start, trained by distillation
    svd,   ///< the linear form initialised from the activation-aware (full-Gram, EoRA) SVD of the residual
};

inline const char* recovery_kind_name(recovery_kind k) noexcept {
    return k == recovery_kind::none ? "none" : k == recovery_kind::gelu ? "gelu" : "svd";
}

/// Recovery modules for layer l of a compressed model: `rank` on every linear (clamped to each one's min(in, out)).
/// Where a linear lost nothing (pure pruning keeps the kept weights exactly) the SVD form starts as LoRA does
/// (A random, B zero) so distillation can still move it; otherwise A = B = 0 would never receive a gradient.
template <nn::LayerConfig C>
pet::task recovery_modules(const compressed_model<C>& cm, std::size_t l, recovery_kind kind, index_t rank,
                           std::uint64_t seed) {
    const auto& layer = cm.model.stack().layer(l);
    if (kind == recovery_kind::none) return {};
    if (kind == recovery_kind::gelu) {
        pet::recovery::options o;
        o.rank = rank;
        o.clamp_rank = true;
        return pet::task(pet::recovery::make(layer.pet_dims(), o, seed + l));
    }
    pet::recovery_linear::options o;
    o.rank = rank;
    o.clamp_rank = true;
    auto m = nn::init_recovery(layer, cm.reference.at(l), o, &cm.stats.at(l));
    for (int i = 0; i < pet::target_count; ++i) {
        auto& A = m.f.A[std::size_t(i)];
        if (A.empty()) continue;
        bool zero = true;
        for (index_t j = 0; j < A.size() && zero; ++j) zero = A.data()[j] == 0.f;
        if (zero) A = pet::detail::kaiming_uniform(A.rows(), A.cols(), seed + l, pet::target(i));
    }
    return pet::task(std::move(m));
}

/// Fresh modules of the same methods, targets and ranks as `t` for a layer of dims `d` (LoRA's init: A
/// Kaiming-uniform, B zero; IA3 ones; BitFit zero; adapters as their make() starts them, the identity: W_d
/// Kaiming-uniform, W_u and the biases zero, same bottleneck, sublayers and scale; prefix rows and virtual tokens
/// random as make() draws them, same length; a layer without virtual tokens keeps none): the "no inheritance"
/// baseline.
inline pet::task fresh_like(const pet::task& t, const pet::layer_dims& d, std::uint64_t seed) {
    pet::task out;
    for (std::size_t i = 0; i < t.size(); ++i)
        t.visit_method(i, [&](const auto& m) {
            using M = std::decay_t<decltype(m)>;
            if constexpr (std::is_same_v<M, pet::ia3::modules>) {  // IA3 starts at ones, BitFit at zero
                pet::ia3::options io;
                io.targets = pet::target_set{};
                for (int j = 0; j < pet::target_count; ++j)
                    if (!m.l[std::size_t(j)].empty()) io.targets.insert(pet::target(j));
                out.add(pet::ia3::make(d, io));
            } else if constexpr (std::is_same_v<M, pet::bitfit::modules>) {
                M f = m;
                f.dims = d;
                for (int j = 0; j < pet::target_count; ++j)
                    if (!f.delta[std::size_t(j)].empty()) f.delta[std::size_t(j)].assign(std::size_t(d.out(pet::target(j))), 0.f);
                for (auto& v : f.norm_delta)
                    if (!v.empty()) v.assign(std::size_t(d.d_model), 0.f);
                out.add(std::move(f));
            } else if constexpr (train::lowrank_method<M>) {
                M f = m;
                f.f.dims = d;
                for (int j = 0; j < pet::target_count; ++j) {
                    const auto tg = pet::target(j);
                    if (m.rank(tg) == 0) continue;
                    f.f.A[std::size_t(j)] = pet::detail::kaiming_uniform(m.rank(tg), d.in(tg), seed, tg);
                    f.f.B[std::size_t(j)] = Matrix<float>(d.out(tg), m.rank(tg));
                }
                out.add(std::move(f));
            } else if constexpr (train::adapter_method<M>) {
                using A = pet::adapter_policy<M::form, M::act>;
                const auto w = m.has(pet::sublayer::attention) ? pet::sublayer::attention : pet::sublayer::ffn;
                typename A::options ao;
                ao.bottleneck = m.bottleneck(w);
                ao.scale = m.s;
                ao.attention = m.has(pet::sublayer::attention);
                ao.ffn = m.has(pet::sublayer::ffn);
                if (!ao.attention && !ao.ffn) out.add(M{});  // an empty module stays empty
                else out.add(A::make(d, ao, seed));
            } else if constexpr (train::prefix_method<M>) {
                if (m.k.empty()) {
                    out.add(M{});
                } else {
                    using Pol = std::conditional_t<std::is_same_v<M, pet::prefix_tuning::modules>, pet::prefix_tuning,
                                                   pet::p_tuning_v2>;
                    out.add(Pol::make(d, {.length = m.length()}, seed));
                }
            } else if constexpr (std::is_same_v<M, pet::prompt_tuning::modules>) {
                if (m.tokens.empty()) out.add(M{});
                else out.add(pet::prompt_tuning::make(d, {.length = m.tokens.rows()}, seed));
            } else {
                throw format_error(cpet::detail::concat("strategy::fresh_like: ", t.method_name(i),
                                                        " cannot be re-initialised here (trainable methods only)"));
            }
        });
    return out;
}

struct cpet_options {
    bool inherit = true;                          ///< start from the teacher's modules and head (else fresh ones)
    recovery_kind recovery = recovery_kind::gelu;
    index_t recovery_rank = 32;                   ///< the paper's
    bool distill = true;                          ///< train recovery by distillation, add β·MSE to the task phase
    double beta = 0.005;                          ///< the authors' weight on a T5 encoder
    bool joint = false;                           ///< one phase for everything instead of recovery first
    tune_options recover;                         ///< phase 1 (distillation only); epochs etc.
    tune_options tune;                            ///< phase 2 (task modules and head)
    std::uint64_t seed = 0;
};

struct cpet_report {
    std::vector<std::string> steps;  ///< one line per step done
    std::optional<tune_report> recover, tune;
    double teacher_seconds = 0;
    double seconds() const noexcept {
        return teacher_seconds + (recover ? recover->seconds : 0) + (tune ? tune->seconds : 0);
    }
};

/// Builds the student task on `cm` from the teacher task trained on `dense` and tunes it on `data` (see the top of
/// this file). Returns the student task and a report of every step.
template <nn::LayerConfig Cd, nn::LayerConfig Cc>
classifier_task cpet(const nn::Model<Cd>& dense, const classifier_task& teacher, const compressed_model<Cc>& cm,
                     std::span<const labelled_batch> data, const cpet_options& o, cpet_report* report = nullptr) {
    const char* who = "strategy::cpet";
    detail::check_task(dense, teacher, who);
    require<shape_error>(cm.model.stack().size() == dense.stack().size(), who, ": the compressed model has ",
                         cm.model.stack().size(), " layers, the dense one ", dense.stack().size());
    cpet_report rep;
    classifier_task s;
    s.pool = teacher.pool;
    std::size_t inherited = 0;
    for (std::size_t l = 0; l < cm.model.stack().size(); ++l) {
        const auto& cl = cm.model.stack().layer(l);
        pet::task t = recovery_modules(cm, l, o.recovery, o.recovery_rank, o.seed + 1000);
        const pet::task lo = o.inherit ? inherit(teacher.layers[l], dense.stack().layer(l).pet_dims(), cl.pet_dims(), cm.kept[l])
                                       : fresh_like(teacher.layers[l], cl.pet_dims(), o.seed + l);
        for (std::size_t i = 0; i < lo.size(); ++i) lo.visit_method(i, [&](const auto& m) { t.add(m); });
        inherited += lo.size();
        s.layers.push_back(std::move(t));
    }
    s.head = o.inherit ? teacher.head : train::linear_head::make(teacher.head.in_features(), teacher.head.labels(), o.seed + 7);
    {
        std::ostringstream os;
        os << (o.inherit ? "inherit: " : "no inheritance: fresh ") << inherited << " modules over "
           << s.layers.size() << " layers" << (cm.pruned ? " (sliced by the kept heads and neurons)" : "")
           << (o.inherit ? " + the teacher's head" : " + a fresh head");
        rep.steps.push_back(os.str());
    }
    if (o.recovery != recovery_kind::none) {
        std::ostringstream os;
        os << "recover: " << recovery_kind_name(o.recovery) << " recovery modules, rank " << o.recovery_rank
           << " on every linear" << (o.recovery == recovery_kind::svd ? " (activation-aware SVD of the residual)" : " (zero at start)");
        rep.steps.push_back(os.str());
    }
    std::vector<Matrix<float>> teacher_h;
    if (o.distill) {
        const auto t0 = std::chrono::steady_clock::now();
        teacher_h = hidden_states(dense, teacher.layers, data);
        rep.teacher_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        rep.steps.push_back(cpet::detail::concat("teacher: final hidden states of the dense model + its task on ",
                                                 data.size(), " batches"));
    }
    auto is_recovery = [](std::string_view n) { return n.find(".recovery") != std::string_view::npos; };
    const bool train_recovery = o.recovery != recovery_kind::none && o.distill;
    if (train_recovery && !o.joint) {
        tune_options p = o.recover;
        p.task_weight = 0;
        p.distill_weight = 1;
        p.trainable = is_recovery;
        rep.recover = tune(cm.model, s, data, p, teacher_h);
        rep.steps.push_back(cpet::detail::concat("distil recovery: ", rep.recover->summary.steps, " steps, final MSE ",
                                                 rep.recover->summary.loss.total()));
    }
    tune_options p = o.tune;
    p.distill_weight = o.distill ? o.beta : 0.0;
    p.trainable = [&](std::string_view n) { return (o.joint && train_recovery) || !is_recovery(n); };
    rep.tune = tune(cm.model, s, data, p, teacher_h);
    rep.steps.push_back(cpet::detail::concat("tune: ", rep.tune->summary.steps, " steps", o.distill ? " (CE + β·MSE)" : " (CE)",
                                             ", final loss ", rep.tune->summary.loss.total()));
    if (report) *report = std::move(rep);
    return s;
}

}  // namespace cpet::strategy
