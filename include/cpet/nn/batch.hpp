// cpet/nn/batch.hpp — how a batch of sequences lies in one activation matrix, and the hooks' entry helpers.
//
// A batch of B sequences padded to S tokens is a [B·S, d] matrix: sequence b owns rows [b·S, b·S + S), of which
// the first lengths[b] are tokens and the rest padding. Padding never influences a token's output (attention
// masks padded keys; every other op is row-wise), and a layer writes zeros to the padded output rows.
#pragma once

#include <span>
#include <string_view>
#include <type_traits>

#include "cpet/compress/format.hpp"
#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/core/parallel.hpp"
#include "cpet/nn/linear.hpp"
#include "cpet/pet/policy.hpp"

namespace cpet::nn {

struct batch_layout {
    index_t batch = 0;    ///< B
    index_t seq_len = 0;  ///< S (padded length)
    std::span<const index_t> lengths;

    index_t rows() const noexcept { return batch * seq_len; }
    index_t length(index_t b) const noexcept { return lengths[static_cast<std::size_t>(b)]; }

    /// The layout of `rows` rows holding lengths.size() sequences; throws shape_error naming `who`.
    static batch_layout of(index_t rows, std::span<const index_t> lengths, const char* who) {
        batch_layout l;
        l.batch = static_cast<index_t>(lengths.size());
        l.lengths = lengths;
        if (l.batch == 0) {
            require<shape_error>(rows == 0, who, ": x has ", rows, " rows but lengths is empty (one length per sequence)");
            return l;
        }
        require<shape_error>(rows % l.batch == 0, who, ": x has ", rows, " rows, not a multiple of the batch size ",
                             l.batch, " (lengths.size())");
        l.seq_len = rows / l.batch;
        for (index_t b = 0; b < l.batch; ++b)
            require<shape_error>(l.length(b) >= 0 && l.length(b) <= l.seq_len, who, ": lengths[", b, "] = ", l.length(b),
                                 " is outside [0, ", l.seq_len, "] (padded sequence length)");
        return l;
    }
};

/// Modules whose task differs per sequence of the batch (serve's mixed batches, serve/mixed.hpp). Besides the pet
/// hooks they declare (which the layer calls on the whole batch, as for any modules) they name each sequence's
/// own modules: `sequences()` (B), `task_of(b)` (a pointer to sequence b's modules, null for none) and `runs()`
/// (consecutive sequences of one task: elements with .first, .count, .task). The layer asks the hooks whose values
/// are per task and cannot ride in one batched term — IA3 scales, BitFit's Δβ, a prefix, prompt tokens — of each
/// sequence's own modules, on that sequence's rows: a matrix of R rows holds R / B rows per sequence, whatever
/// its padded length (a prompt-extended batch has more), so the modules hold sequences, never row counts.
template <class M>
concept SequenceTasks = requires(const M& m, index_t b) {
    { m.sequences() } -> std::convertible_to<index_t>;
    { m.task_of(b) != nullptr } -> std::convertible_to<bool>;
    { m.runs().begin()->first } -> std::convertible_to<index_t>;
    { m.runs().begin()->count } -> std::convertible_to<index_t>;
    { m.runs().begin()->task != nullptr } -> std::convertible_to<bool>;
};

/// f(rows, task) for every run of sequences that has a task: `rows` the run's rows of y (R / B per sequence).
template <SequenceTasks M, class View, class F>
void for_each_run(const M& m, View y, F&& f) {
    const index_t B = m.sequences();
    if (B == 0) return;
    const index_t S = y.rows() / B;
    for (const auto& r : m.runs())
        if (r.task) f(y.middle_rows(r.first * S, r.count * S), *r.task);
}

namespace detail {

/// y(r, c) *= l[c] (the IA3 rescaling); throws shape_error when l does not have y.cols() values.
inline void scale_columns(MatrixView<float> y, std::span<const float> l, std::string_view who) {
    require<shape_error>(index_t(l.size()) == y.cols(), "PET scale hook (", who, "): expected ", y.cols(),
                         " values, got ", l.size());
    const float* lp = l.data();
    parallel_for(index_t(0), y.rows(), [&](index_t r) {
        float* yr = y.row(r);
        for (index_t c = 0; c < y.cols(); ++c) yr[c] *= lp[c];
    });
}

/// y = lin(x) with the task's hooks on linear `t`: the low-rank term (linear hook) and the bias delta (bias hook)
/// fused into the epilogue, then the output scale (scale hook; q, k and v only, see pet/policy.hpp).
template <class Arch, compress::WeightFormat F, class Modules>
void project(Arch tag, const Linear<F>& lin, pet::target t, ConstMatrixView<float> x, MatrixView<float> y,
             kernels::epilogue ep, const Modules& m, pet::scratch& s) {
    const auto tn = pet::target_name(t);
    const index_t N = lin.out_features();
    if constexpr (pet::uses_hook<Modules, pet::hook::linear>) {
        if (auto lr = m.lowrank(t, x, s)) {
            if (lr->segments.empty())
                require<shape_error>(lr->u.rows() == x.rows() && lr->b.rows() == N && lr->u.cols() == lr->b.cols(),
                                     "PET linear hook (target ", tn, "): expected U [", x.rows(), ", r] and B [", N,
                                     ", r], got U ", shape_str(lr->u), " and B ", shape_str(lr->b));
            pet::apply(ep, *lr);
            if (!lr->segments.empty())  // O(segments): their order, rows and strides
                kernels::check_lowrank(ep, x.rows(), N, cpet::detail::concat("PET linear hook (target ", tn, ")").c_str());
        }
    }
    bool done = false;
    if constexpr (pet::uses_hook<Modules, pet::hook::bias>) {
        if (auto db = m.bias_delta(t)) {
            require<shape_error>(index_t(db->size()) == N, "PET bias hook (target ", tn, "): expected ", N,
                                 " values, got ", db->size());
            auto b = s.matrix(pet::slot::bias, 1, N);
            const float* b0 = lin.bias();
            for (index_t c = 0; c < N; ++c) b(0, c) = (b0 ? b0[c] : 0.f) + (*db)[std::size_t(c)];
            ep.bias = b.data();
            compress::matmul_on(tag, lin.weight(), x, y, ep);
            done = true;
        }
    }
    if (!done) lin.forward(tag, x, y, ep);
    if constexpr (pet::uses_hook<Modules, pet::hook::scale>) {
        if (t == pet::target::q || t == pet::target::k || t == pet::target::v)
            if (auto l = m.scale(t)) scale_columns(y, *l, tn);
    }
    if constexpr (SequenceTasks<Modules>) {  // each sequence's own IA3 scale, on its rows
        if (t == pet::target::q || t == pet::target::k || t == pet::target::v)
            for_each_run(m, y, [&](MatrixView<float> rows, const auto& task) {
                if constexpr (pet::uses_hook<std::decay_t<decltype(task)>, pet::hook::scale>)
                    if (auto l = task.scale(t)) scale_columns(rows, *l, tn);
            });
    }
}

/// y += x element-wise (y may be x).
inline void add_inplace(MatrixView<float> y, ConstMatrixView<float> x) noexcept {
    for (index_t r = 0; r < y.rows(); ++r) {
        float* yr = y.row(r);
        const float* xr = x.row(r);
        for (index_t c = 0; c < y.cols(); ++c) yr[c] += xr[c];
    }
}

/// Zeroes the padded rows of every sequence.
inline void zero_padding(MatrixView<float> y, const batch_layout& l) noexcept {
    for (index_t b = 0; b < l.batch; ++b)
        for (index_t t = l.length(b); t < l.seq_len; ++t) {
            float* r = y.row(b * l.seq_len + t);
            for (index_t c = 0; c < y.cols(); ++c) r[c] = 0.f;
        }
}

}  // namespace detail
}  // namespace cpet::nn
