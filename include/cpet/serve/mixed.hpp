// cpet/serve/mixed.hpp — one layer's modules for a batch whose sequences belong to different tasks, of any PET
// methods (and stacks of them: CPET's recovery + LoRA, MAM's prefix + scaled parallel adapter, ...).
//
// The backbone runs ONCE over the whole batch; every sequence gets its own task's modules:
//   linear hook (LoRA / rsLoRA / recovery, and BitFit's Δb)  a segmented low-rank term (kernels::lowrank_segment,
//       the S-LoRA / Punica SGMV idea on a CPU): sequences are grouped into runs of consecutive sequences of one
//       task, and each run is one segment of rows with its task's own term — shrink U_run = x_run·A_jᵀ into the
//       run's rows of a compact U [M, max_j r_j], expand s_j·U_run·B_jᵀ added inside the base GEMM's output tiles
//       of those rows (or, for formats that cannot fuse, one thin GEMM per segment), so the rows of task j pay its
//       rank r_j only. B_j is the task's own factor where it has one low-rank member (no copy); a task with
//       several (CPET's recovery + LoRA) or a BitFit Δb of that linear has them concatenated, [s_1·B_1 | s_2·B_2 |
//       Δb], as its single-task path does, Δb as one more column with U = 1 on the task's rows, so it is added
//       before the activation exactly where the single-task path adds b + Δb.
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
        // each distinct task's term, per target (fixed by the tasks, so lowrank() only reads)
        for (int ti = 0; ti < pet::target_count; ++ti) {
            const auto g = pet::target(ti);
            auto& tt = targets_[std::size_t(ti)];
            tt.terms.assign(distinct_.size(), term{});
            for (std::size_t i = 0; i < distinct_.size(); ++i) {
                const pet::task& task = *distinct_[i];
                term& tm = tt.terms[i];
                int members = 0;
                for_parts(task, [&](const auto& m) {
                    if (const index_t r = m.rank(g)) {
                        ++members, tm.rank += r;
                        tm.b = m.up(g);
                        tm.scale = m.lowrank_scale(g);
                    }
                });
                const auto db = task.bias_delta(g);
                if (db) ++tm.rank;
                if (tm.rank == 0) continue;
                tt.n = db ? index_t(db->size()) : tm.b.rows();
                if (members != 1 || db) {  // concatenated per call, in columns [column, column + rank) of scratch
                    tm.column = tt.concat;
                    tt.concat += tm.rank;
                    tm.scale = 1.f;
                }
                tt.rmax = std::max(tt.rmax, tm.rank);
            }
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

    /// The segmented term of target t for x [M, in] (M = the batch's rows, M / B per sequence): one segment per
    /// run of a task with a term there, each with its task's own U, B, rank and scale.
    std::optional<pet::lowrank_args> lowrank(pet::target t, ConstMatrixView<float> x, pet::scratch& s) const {
        const auto& tt = targets_[std::size_t(t)];
        if (tt.rmax == 0 || per_sequence_.empty() || x.rows() == 0) return std::nullopt;
        const index_t S = x.rows() / sequences(), N = tt.n;
        // expand factors of the tasks that need one concatenated: [s_1·B_1 | s_2·B_2 | Δb], each task once
        MatrixView<float> cat;
        if (tt.concat > 0) {
            cat = s.matrix(pet::slot::lowrank_b, N, tt.concat);
            for (std::size_t i = 0; i < distinct_.size(); ++i) {
                const term& tm = tt.terms[i];
                if (tm.rank == 0 || tm.column < 0) continue;
                index_t c = tm.column;
                for_parts(*distinct_[i], [&](const auto& m) {
                    const index_t r = m.rank(t);
                    if (!r) return;
                    const ConstMatrixView<float> bi = m.up(t);
                    const float si = m.lowrank_scale(t);
                    for (index_t n = 0; n < N; ++n)
                        for (index_t j = 0; j < r; ++j) cat(n, c + j) = si * bi(n, j);
                    c += r;
                });
                if (const auto db = distinct_[i]->bias_delta(t))
                    for (index_t n = 0; n < N; ++n) cat(n, c) = (*db)[std::size_t(n)];
            }
        }
        // shrink: each run's rows into the first r_j columns of its rows of a compact U
        auto u = s.matrix(pet::slot::lowrank_u, x.rows(), tt.rmax);
        auto& segs = s.segments(runs_.size());
        for (const auto& run : runs_) {
            if (!run.task) continue;
            const term& tm = tt.terms[std::size_t(run.index)];
            if (tm.rank == 0) continue;
            const index_t row0 = run.first * S, rows = run.count * S;
            const auto xs = x.middle_rows(row0, rows);
            auto us = u.middle_rows(row0, rows);
            index_t c = 0;
            for_parts(*run.task, [&](const auto& m) {
                const index_t r = m.rank(t);
                if (!r) return;
                m.project(t, xs, us.middle_cols(c, r), s);
                c += r;
            });
            if (c < tm.rank)  // the Δb column
                for (index_t i = 0; i < rows; ++i) us(i, c) = 1.f;
            kernels::lowrank_segment sg;
            sg.row0 = row0, sg.rows = rows;
            sg.u = us.data(), sg.ld_u = u.stride();
            if (tm.column >= 0) sg.b = cat.data() + tm.column, sg.ld_b = cat.stride();
            else sg.b = tm.b.data(), sg.ld_b = tm.b.stride();
            sg.rank = tm.rank, sg.scale = tm.scale;
            segs.push_back(sg);
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
    /// f(member) for every low-rank member of task t, in order.
    template <class F>
    static void for_parts(const pet::task& t, F&& f) {
        for (std::size_t i = 0; i < t.size(); ++i)
            std::visit([&](const auto& m) {
                if constexpr (pet::LowrankParts<std::decay_t<decltype(m)>>) f(m);
            }, t.at(i));
    }
    /// One distinct task's term of one target.
    struct term {
        index_t rank = 0;                ///< its low-rank members' ranks, plus one for a BitFit Δb
        ConstMatrixView<float> b;        ///< the member's B where it has one member and no Δb
        float scale = 1.f;               ///< its scale (1 when concatenated: the scales are folded in)
        index_t column = -1;             ///< first column of its concatenated [s_1·B_1 | ... | Δb], or -1
    };
    struct per_target {
        std::vector<term> terms;         ///< per distinct task
        index_t n = 0;                   ///< B rows (the linear's out features)
        index_t rmax = 0;                ///< the largest rank: U's columns
        index_t concat = 0;              ///< columns of the concatenated factors
    };

    std::vector<const pet::task*> per_sequence_;
    std::vector<run> runs_;
    std::vector<const pet::task*> distinct_;  ///< the batch's tasks, each once
    std::array<per_target, pet::target_count> targets_;
    bool sublayer_ = false;
};

static_assert(pet::check_modules<mixed_batch>());

}  // namespace cpet::serve
