// cpet/serve/mixed.hpp — one layer's modules for a batch whose sequences belong to different tasks, of any PET
// methods (and stacks of them: CPET's recovery + LoRA, MAM's prefix + scaled parallel adapter, ...), with their
// low-rank factors in fp32, bf16 or int8 (serve::task_layer, serve/compact.hpp).
//
// The backbone runs ONCE over the whole batch; every sequence gets its own task's modules:
//   linear hook (LoRA / rsLoRA / recovery, and BitFit's Δb)  a segmented low-rank term (kernels::lowrank_segment,
//       the S-LoRA / Punica SGMV idea on a CPU): sequences are grouped into runs of consecutive sequences of one
//       task, and each run's rows get its task's own terms — shrink U_run = x_run·A_jᵀ into the run's rows of a
//       compact U [M, max_j r_j], expand s_j·U_run·B_jᵀ added inside the base GEMM's output tiles of those rows
//       (or, for formats that cannot fuse, one thin GEMM per segment), so the rows of task j pay its rank r_j
//       only. Each low-rank member of a task is one segment over the run's rows, its B read where the task keeps
//       it (fp32, bf16 or int8: no copy, no concatenation); a BitFit Δb of that linear is a rank-1 segment (U = 1,
//       B = Δb), added before the activation exactly where the single-task path adds b + Δb.
//   sublayer hook (adapters)  each run's own adapters on its rows (they are row-wise), chained as its task chains
//       them; runs without adapters keep their sublayer output (the layer then adds the residual separately,
//       the same sum as the fused add).
//   IA3 scales, BitFit's Δβ, prefixes, prompt tokens  asked by the layer of each sequence's own task on its rows
//       (nn::SequenceTasks: this object names each sequence's task): each sequence attends to its own task's
//       prefix (none without one; in decode the prefix sits at the front of that sequence's cache), and prompt
//       tokens go before each sequence's own tokens, the batch padded to S + P_max rows per sequence (nn::Stack).
// This object holds sequences, never row counts: a matrix of R rows holds R / B rows per sequence, so the same
// object serves a prompt-extended batch (more rows per sequence) and a decode step.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <optional>
#include <span>
#include <type_traits>
#include <variant>
#include <vector>

#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/kernels/epilogue.hpp"
#include "cpet/pet/policy.hpp"
#include "cpet/pet/task.hpp"
#include "cpet/serve/compact.hpp"

namespace cpet::serve {

class mixed_batch {
public:
    static constexpr pet::hook_set hooks{pet::hook::linear, pet::hook::sublayer};

    /// Consecutive sequences [first, first + count) of one task (null: no task, the bare backbone).
    struct run {
        index_t first = 0, count = 0;
        const task_layer* task = nullptr;
        index_t index = -1;  ///< of task among the batch's distinct tasks
    };

    mixed_batch() = default;
    /// `per_sequence[b]`: the task of sequence b (null: none). Consecutive sequences of one task become one run
    /// (order the batch by task to get fewer, larger ones). The tasks must outlive this object.
    explicit mixed_batch(std::span<const task_layer* const> per_sequence)
        : per_sequence_(per_sequence.begin(), per_sequence.end()) {
        for (std::size_t b = 0; b < per_sequence.size(); ++b) {
            const task_layer* t = per_sequence[b];
            if (!runs_.empty() && runs_.back().task == t) {
                ++runs_.back().count;
                continue;
            }
            index_t idx = -1;
            if (t) {
                const auto it = std::find(distinct_.begin(), distinct_.end(), t);
                idx = index_t(it - distinct_.begin());
                if (it == distinct_.end()) distinct_.push_back(t);
                sublayer_ = sublayer_ || t->active(pet::hook::sublayer);
            }
            runs_.push_back({index_t(b), 1, t, idx});
        }
        // per target: the widest task term (U's columns) and the most terms a task has (segments per run)
        for (int ti = 0; ti < pet::target_count; ++ti) {
            auto& tt = targets_[std::size_t(ti)];
            for (const auto* t : distinct_) {
                index_t r = 0, n = 0;
                each_term(*t, pet::target(ti), [&](index_t rank) { r += rank, ++n; });
                tt.rmax = std::max(tt.rmax, r);
                tt.terms = std::max(tt.terms, n);
            }
        }
    }

    // ---- nn::SequenceTasks ----
    index_t sequences() const noexcept { return index_t(per_sequence_.size()); }
    const task_layer* task_of(index_t b) const noexcept { return per_sequence_[std::size_t(b)]; }
    /// The runs, covering sequences 0 .. B-1 in order.
    std::span<const run> runs() const noexcept { return runs_; }
    /// The batch's tasks, each once.
    std::span<const task_layer* const> tasks() const noexcept { return distinct_; }

    /// Whether some task of the batch uses hook h (the layer fuses the residual add when none has a sublayer
    /// hook).
    bool active(pet::hook h) const noexcept {
        if (h == pet::hook::sublayer) return sublayer_;
        for (const auto* t : distinct_)
            if (t->active(h)) return true;
        return false;
    }

    /// Every task fits the layer (each module's shapes; the layer asks the per-sequence hooks of each as well).
    void check_fits(const pet::layer_dims& d, const char* who) const {
        for (const auto* t : distinct_) t->check_fits(d, who);
    }

    /// The segmented term of target t for x [M, in] (M = the batch's rows, M / B per sequence): per run, one
    /// segment for each of its task's terms there, each with its own U columns, B, rank and scale.
    std::optional<pet::lowrank_args> lowrank(pet::target t, ConstMatrixView<float> x, pet::scratch& s) const {
        const auto& tt = targets_[std::size_t(t)];
        if (tt.rmax == 0 || per_sequence_.empty() || x.rows() == 0) return std::nullopt;
        const index_t S = x.rows() / sequences();
        auto u = s.matrix(pet::slot::lowrank_u, x.rows(), tt.rmax);
        auto& segs = s.segments(runs_.size() * std::size_t(tt.terms));
        for (const auto& run : runs_) {
            if (!run.task) continue;
            const index_t row0 = run.first * S, rows = run.count * S;
            const auto xs = x.middle_rows(row0, rows);
            auto us = u.middle_rows(row0, rows);
            index_t c = 0;  // the run's next U column
            auto segment = [&](index_t r) {
                kernels::lowrank_segment sg;
                sg.row0 = row0, sg.rows = rows, sg.u = us.data() + c, sg.ld_u = u.stride(), sg.rank = r;
                return sg;
            };
            const task_layer& task = *run.task;
            for_parts(task.task(), [&](const auto& m) {  // fp32 members: B where the member keeps it
                const index_t r = m.rank(t);
                if (!r) return;
                m.project(t, xs, us.middle_cols(c, r), s);
                auto sg = segment(r);
                const ConstMatrixView<float> b = m.up(t);
                sg.b = b.data(), sg.ld_b = b.stride(), sg.scale = m.lowrank_scale(t);
                segs.push_back(sg);
                c += r;
            });
            for (const auto& m : task.compact()) {  // compact members: B read as stored
                const index_t r = m.rank(t);
                if (!r) continue;
                m.project(t, xs, us.middle_cols(c, r), s);
                segs.push_back(m.segment(t, row0, rows, us.data() + c, u.stride()));
                c += r;
            }
            if (const auto db = task.task().bias_delta(t)) {  // Δb: rank 1, U = 1, B = Δb [N, 1]
                for (index_t i = 0; i < rows; ++i) us(i, c) = 1.f;
                auto sg = segment(1);
                sg.b = db->data(), sg.ld_b = 1;
                segs.push_back(sg);
                ++c;
            }
        }
        if (segs.empty()) return std::nullopt;
        pet::lowrank_args out;
        out.segments = segs;
        return out;
    }

    /// Each run's own sublayer hooks (adapters) on its rows.
    void sublayer(pet::sublayer w, ConstMatrixView<float> in, MatrixView<float> out, pet::scratch& s) const {
        if (!sublayer_ || per_sequence_.empty()) return;
        const index_t S = out.rows() / sequences();
        for (const auto& run : runs_)
            if (run.task && run.task->active(pet::hook::sublayer))
                run.task->sublayer(w, in.middle_rows(run.first * S, run.count * S),
                                   out.middle_rows(run.first * S, run.count * S), s);
    }

private:
    /// f(member) for every fp32 low-rank member of task t, in order.
    template <class F>
    static void for_parts(const pet::task& t, F&& f) {
        for (std::size_t i = 0; i < t.size(); ++i)
            std::visit([&](const auto& m) {
                if constexpr (pet::LowrankParts<std::decay_t<decltype(m)>>) f(m);
            }, t.at(i));
    }
    /// f(rank) for every term task t has for target g: its fp32 and compact low-rank members, then a Δb (rank 1).
    template <class F>
    static void each_term(const task_layer& t, pet::target g, F&& f) {
        for_parts(t.task(), [&](const auto& m) {
            if (const index_t r = m.rank(g)) f(r);
        });
        for (const auto& m : t.compact())
            if (const index_t r = m.rank(g)) f(r);
        if (t.task().bias_delta(g)) f(1);
    }

    struct per_target {
        index_t rmax = 0;   ///< the widest task term: U's columns
        index_t terms = 0;  ///< the most terms (segments) a task has
    };

    std::vector<const task_layer*> per_sequence_;
    std::vector<run> runs_;
    std::vector<const task_layer*> distinct_;  ///< the batch's tasks, each once
    std::array<per_target, pet::target_count> targets_;
    bool sublayer_ = false;
};

static_assert(pet::check_modules<mixed_batch>());

}  // namespace cpet::serve
