// cpet/serve/mixed.hpp — one layer's modules for a batch whose sequences belong to different tasks, of any PET
// methods (and stacks of them: CPET's recovery + LoRA, MAM's prefix + scaled parallel adapter, ...).
//
// The backbone runs ONCE over the whole batch; every sequence gets its own task's modules:
//   linear hook (LoRA / rsLoRA / recovery, and BitFit's Δb)  the terms of all the batch's tasks ride in the base
//       GEMM's epilogue as ONE block-structured term: sequences are grouped into runs of consecutive sequences of
//       one task; task j of the batch owns rank columns [c_j, c_j + r_j) of
//           U [M, R] (U = x_run·A_jᵀ in its runs' rows and its columns, zero elsewhere)   and
//           B [N, R] = [s_1·B_1 | s_2·B_2 | ...]   (each distinct task once),
//       so U·Bᵀ gives every row exactly its own task's s·U·Bᵀ, added inside the output tile by the same fused
//       kernel as a single task. A task's BitFit Δb of that linear is one more column of it: U = 1 on the task's
//       rows, B = Δb, so it is added before the activation exactly where the single-task path adds b + Δb. The
//       cost is that of rank R = Σ_j r_j (over the batch's distinct tasks) for every row.
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
#include <vector>

#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/pet/policy.hpp"
#include "cpet/pet/task.hpp"

namespace cpet::serve {

class mixed_batch {
public:
    static constexpr pet::hook_set hooks{pet::hook::linear, pet::hook::sublayer};

    /// Consecutive sequences [first, first + count) of one task (null: no task, the bare backbone).
    struct run {
        index_t first = 0, count = 0;
        const pet::task* task = nullptr;
        index_t index = -1;  ///< of task among the batch's distinct tasks
    };

    mixed_batch() = default;
    /// `per_sequence[b]`: the task of sequence b (null: none). Consecutive sequences of one task become one run
    /// (order the batch by task to get fewer, larger ones). The tasks must outlive this object.
    explicit mixed_batch(std::span<const pet::task* const> per_sequence)
        : per_sequence_(per_sequence.begin(), per_sequence.end()) {
        for (std::size_t b = 0; b < per_sequence.size(); ++b) {
            const pet::task* t = per_sequence[b];
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
        // each distinct task's first rank column, per target (fixed by the tasks, so lowrank() only reads)
        for (int ti = 0; ti < pet::target_count; ++ti) {
            auto& cols = column_[std::size_t(ti)];
            cols.assign(distinct_.size(), 0);
            index_t R = 0;
            for (std::size_t i = 0; i < distinct_.size(); ++i) {
                cols[i] = R;
                R += term_rank(*distinct_[i], pet::target(ti));
            }
            rank_[std::size_t(ti)] = R;
        }
    }

    // ---- nn::SequenceTasks ----
    index_t sequences() const noexcept { return index_t(per_sequence_.size()); }
    const pet::task* task_of(index_t b) const noexcept { return per_sequence_[std::size_t(b)]; }
    /// The runs, covering sequences 0 .. B-1 in order.
    std::span<const run> runs() const noexcept { return runs_; }
    /// The batch's tasks, each once.
    std::span<const pet::task* const> tasks() const noexcept { return distinct_; }

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

    /// The block-structured term of target t for x [M, in] (M = the batch's rows, M / B per sequence). Each
    /// distinct task owns one block of rank columns, shared by all its runs, so R is the sum over the batch's
    /// distinct tasks.
    std::optional<pet::lowrank_args> lowrank(pet::target t, ConstMatrixView<float> x, pet::scratch& s) const {
        const index_t R = rank_[std::size_t(t)];
        if (R == 0 || per_sequence_.empty()) return std::nullopt;
        const auto& column = column_[std::size_t(t)];
        index_t N = 0;
        for (const auto* task : distinct_) N = std::max(N, out_of(*task, t));
        const index_t S = x.rows() / sequences();
        auto u = s.matrix(pet::slot::lowrank_u, x.rows(), R);
        auto b = s.matrix(pet::slot::lowrank_b, N, R);
        for (index_t i = 0; i < u.rows(); ++i) {
            float* ur = u.row(i);
            for (index_t j = 0; j < R; ++j) ur[j] = 0.f;  // the other tasks' columns of each row
        }
        for (std::size_t i = 0; i < distinct_.size(); ++i) {  // expand factors: s·B (and Δb) of each task, once
            index_t c = column[i];
            for_parts(*distinct_[i], [&](const auto& m) {
                const index_t r = m.rank(t);
                if (!r) return;
                const ConstMatrixView<float> bi = m.up(t);
                const float si = m.lowrank_scale(t);
                for (index_t n = 0; n < N; ++n)
                    for (index_t j = 0; j < r; ++j) b(n, c + j) = si * bi(n, j);
                c += r;
            });
            if (const auto db = distinct_[i]->bias_delta(t))
                for (index_t n = 0; n < N; ++n) b(n, c) = (*db)[std::size_t(n)];
        }
        for (const auto& run : runs_) {  // shrink: each run's rows into its task's columns
            if (!run.task) continue;
            const auto xs = x.middle_rows(run.first * S, run.count * S);
            auto us = u.middle_rows(run.first * S, run.count * S);
            index_t c = column[std::size_t(run.index)];
            for_parts(*run.task, [&](const auto& m) {
                const index_t r = m.rank(t);
                if (!r) return;
                m.project(t, xs, us.middle_cols(c, r), s);
                c += r;
            });
            if (run.task->bias_delta(t))
                for (index_t i = 0; i < us.rows(); ++i) us(i, c) = 1.f;
        }
        return pet::lowrank_args{u, b, 1.f};
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
    /// f(member) for every low-rank member of task t, in order.
    template <class F>
    static void for_parts(const pet::task& t, F&& f) {
        for (std::size_t i = 0; i < t.size(); ++i)
            std::visit([&](const auto& m) {
                if constexpr (pet::LowrankParts<std::decay_t<decltype(m)>>) f(m);
            }, t.at(i));
    }
    /// Columns of task t's term for target g: its low-rank members' ranks, plus one for a BitFit Δb.
    static index_t term_rank(const pet::task& t, pet::target g) {
        index_t r = 0;
        for_parts(t, [&](const auto& m) { r += m.rank(g); });
        return r + (t.bias_delta(g) ? 1 : 0);
    }
    /// Rows of task t's B for target g (0 when it has no term there).
    static index_t out_of(const pet::task& t, pet::target g) {
        index_t n = 0;
        for_parts(t, [&](const auto& m) {
            if (m.rank(g)) n = m.up(g).rows();
        });
        if (const auto db = t.bias_delta(g)) n = index_t(db->size());
        return n;
    }

    std::vector<const pet::task*> per_sequence_;
    std::vector<run> runs_;
    std::vector<const pet::task*> distinct_;  ///< the batch's tasks, each once
    std::array<std::vector<index_t>, pet::target_count> column_;  ///< per target: first rank column of each task
    std::array<index_t, pet::target_count> rank_{};               ///< per target: R
    bool sublayer_ = false;
};

static_assert(pet::check_modules<mixed_batch>());

}  // namespace cpet::serve
