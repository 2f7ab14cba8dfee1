// cpet/serve/mixed.hpp — one layer's modules for a batch whose sequences belong to different tasks.
//
// The backbone runs ONCE over the whole batch; each sequence gets its own task's low-rank terms (LoRA / rsLoRA /
// recovery, and mixes of them: the S-LoRA / Punica setting). The terms of all tasks in the batch ride in the base
// GEMM's epilogue as ONE block-structured term: sequences are grouped into segments of consecutive rows with the
// same task; task j of the batch owns rank columns [c_j, c_j + r_j) of
//     U [M, R] (U = x_seg·A_jᵀ in its segments' rows and its columns, zero elsewhere)   and
//     B [N, R] = [s_1·B_1 | s_2·B_2 | ...]   (each distinct task once),
// so U·Bᵀ gives every row exactly its own task's s·U·Bᵀ, added inside the output tile by the same fused kernel as
// a single task (shrink per segment, expand in the tile). Its cost is that of rank R = Σ_j r_j (over the batch's
// distinct tasks) for every row; a kernel that skips the other tasks' columns per row block (a segmented
// epilogue) would make it r_j for the rows of task j only — not done yet.
//
// Only linear hooks are batched this way: a task with adapters, a prefix, prompt tokens, IA3 or BitFit is refused
// (format_error) by check_fits, which the layer calls at the entry; such tasks run on their own.
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

class mixed_lowrank {
public:
    static constexpr pet::hook_set hooks{pet::hook::linear};

    /// A run of consecutive rows [row0, row0 + rows) of one task (null: no task, the bare backbone).
    struct segment {
        index_t row0 = 0, rows = 0;
        const pet::task* task = nullptr;
        index_t index = -1;  ///< of task among the batch's distinct tasks
    };

    mixed_lowrank() = default;
    /// `per_sequence[b]`: the task of sequence b (null: none) in a batch padded to `seq_len` rows per sequence.
    /// Consecutive sequences of one task become one segment (order the batch by task to get fewer, larger ones).
    mixed_lowrank(std::span<const pet::task* const> per_sequence, index_t seq_len) {
        require<shape_error>(seq_len >= 0, "serve::mixed_lowrank: seq_len must be >= 0, got ", seq_len);
        for (std::size_t b = 0; b < per_sequence.size(); ++b) {
            const pet::task* t = per_sequence[b];
            if (!segments_.empty() && segments_.back().task == t) {
                segments_.back().rows += seq_len;
                continue;
            }
            index_t idx = -1;
            if (t) {
                const auto it = std::find(distinct_.begin(), distinct_.end(), t);
                idx = index_t(it - distinct_.begin());
                if (it == distinct_.end()) distinct_.push_back(t);
            }
            segments_.push_back({index_t(b) * seq_len, seq_len, t, idx});
        }
        // each distinct task's first rank column, per target (fixed by the tasks, so lowrank() only reads)
        for (int ti = 0; ti < pet::target_count; ++ti) {
            auto& cols = column_[std::size_t(ti)];
            cols.assign(distinct_.size(), 0);
            index_t R = 0;
            for (std::size_t i = 0; i < distinct_.size(); ++i) {
                cols[i] = R;
                for_parts(*distinct_[i], [&](const auto& m) { R += m.rank(pet::target(ti)); });
            }
        }
        rows_ = index_t(per_sequence.size()) * seq_len;
    }

    std::span<const segment> segments() const noexcept { return segments_; }

    /// Every task fits the layer and uses linear hooks only.
    void check_fits(const pet::layer_dims& d, const char* who) const {
        for (const auto& s : segments_) {
            if (!s.task) continue;
            for (pet::hook h : {pet::hook::sublayer, pet::hook::attention, pet::hook::input, pet::hook::scale,
                                pet::hook::bias, pet::hook::norm})
                require<format_error>(!s.task->active(h), who, ": a task in a mixed batch uses the ",
                                      pet::hook_name(h), " hook; a mixed batch carries low-rank methods only (LoRA, "
                                      "rsLoRA, recovery): run that task on its own");
            s.task->check_fits(d, who);
        }
    }

    /// The block-structured term of target t for x [M, in] (M = the batch's rows). Each distinct task owns one
    /// block of rank columns, shared by all its segments, so R is the sum over the batch's distinct tasks.
    std::optional<pet::lowrank_args> lowrank(pet::target t, ConstMatrixView<float> x, pet::scratch& s) const {
        const auto& column = column_[std::size_t(t)];
        index_t R = 0, N = 0;
        for (std::size_t i = 0; i < distinct_.size(); ++i)
            for_parts(*distinct_[i], [&](const auto& m) {
                if (const index_t r = m.rank(t)) R += r, N = m.up(t).rows();
            });
        if (R == 0) return std::nullopt;
        auto u = s.matrix(pet::slot::lowrank_u, x.rows(), R);
        auto b = s.matrix(pet::slot::lowrank_b, N, R);
        for (index_t i = 0; i < u.rows(); ++i) {
            float* ur = u.row(i);
            for (index_t j = 0; j < R; ++j) ur[j] = 0.f;  // the other tasks' columns of each row
        }
        for (std::size_t i = 0; i < distinct_.size(); ++i) {  // expand factors: s·B of each task, once
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
        }
        for (const auto& seg : segments_) {  // shrink: each segment's rows into its task's columns
            if (!seg.task) continue;
            const auto xs = x.middle_rows(seg.row0, seg.rows);
            auto us = u.middle_rows(seg.row0, seg.rows);
            index_t c = column[std::size_t(seg.index)];
            for_parts(*seg.task, [&](const auto& m) {
                const index_t r = m.rank(t);
                if (!r) return;
                m.project(t, xs, us.middle_cols(c, r), s);
                c += r;
            });
        }
        return pet::lowrank_args{u, b, 1.f};
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

    std::vector<segment> segments_;
    std::vector<const pet::task*> distinct_;  ///< the batch's tasks, each once
    std::array<std::vector<index_t>, pet::target_count> column_;  ///< per target: first rank column of each task
    index_t rows_ = 0;
};

static_assert(pet::check_modules<mixed_lowrank>());

}  // namespace cpet::serve
