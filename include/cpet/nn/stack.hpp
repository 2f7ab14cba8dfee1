// cpet/nn/stack.hpp — N TransformerLayers applied in sequence (an encoder for bidirectional configs, a decoder
// for causal ones). The first layer reads x and writes y, the others work on y in place, so a stack needs no
// activation storage beyond one workspace. Dispatch happens once per stack call.
#pragma once

#include <algorithm>
#include <span>
#include <type_traits>
#include <vector>

#include "cpet/arch/dispatch.hpp"
#include "cpet/nn/kv_cache.hpp"
#include "cpet/nn/layer.hpp"
#include "cpet/nn/weights.hpp"
#include "cpet/nn/workspace.hpp"

namespace cpet::nn {

template <LayerConfig C>
class Stack {
public:
    using layer_type = TransformerLayer<C>;
    static constexpr bool causal = layer_type::causal;

    Stack() = default;
    explicit Stack(std::vector<layer_type> layers) : layers_(std::move(layers)) { check_same_shape(); }
    /// Compresses every layer; `stats`, when given, has one entry per layer.
    Stack(const std::vector<dense_layer_weights>& w, const layer_shape& s,
          const std::vector<layer_calibration>* stats = nullptr) {
        require<shape_error>(!stats || stats->size() == w.size(), "Stack: ", stats ? stats->size() : 0,
                             " layer_calibrations for ", w.size(), " layers");
        layers_.reserve(w.size());
        for (std::size_t i = 0; i < w.size(); ++i) layers_.emplace_back(w[i], s, stats ? &(*stats)[i] : nullptr);
    }

    std::size_t size() const noexcept { return layers_.size(); }
    const layer_type& layer(std::size_t i) const { return layers_.at(i); }
    std::size_t bytes() const noexcept {
        std::size_t n = 0;
        for (const auto& l : layers_) n += l.bytes();
        return n;
    }

    /// y = layer_{N-1}(... layer_0(x)); `tasks` holds one modules object per layer, of any modules type (the same
    /// for every layer: a pet::task per layer mixes methods freely).
    /// With an input hook (prompt tuning), layer 0's virtual tokens [P, d] are put before every sequence, the
    /// stack runs on the P + S rows, and y receives the rows of the real tokens only (a model front end's job,
    /// done here since the stack is the front-most object cpet has).
    template <class Task>
    void forward(ConstMatrixView<float> x, std::span<const index_t> lengths, MatrixView<float> y, workspace& ws,
                 std::span<const Task> tasks) const {
        require<shape_error>(tasks.size() == layers_.size(), "Stack::forward: ", tasks.size(),
                             " PET task modules for ", layers_.size(), " layers");
        const auto L = check(x, lengths, y, "Stack::forward");
        for (std::size_t i = 0; i < layers_.size(); ++i) layers_[i].check_task(tasks[i], "Stack::forward", i == 0);
        auto task_at = [&](std::size_t i) -> const Task& { return tasks[i]; };
        if constexpr (pet::uses_hook<Task, pet::hook::input> || SequenceTasks<Task>) {
            if (!layers_.empty()) {
                const auto vt_of = [&](index_t b) { return virtual_tokens_of(tasks[0], b); };
                index_t P_max = 0;
                for (index_t b = 0; b < L.batch; ++b) {
                    const ConstMatrixView<float> vt = vt_of(b);
                    if (vt.rows() > 0) check_shape(vt, -1, x.cols(), "Stack::forward: PET input hook (virtual tokens)");
                    P_max = std::max(P_max, vt.rows());
                }
                if (P_max > 0) {
                    prompted(x, L, y, ws, vt_of, P_max, task_at);
                    return;
                }
            }
        }
        run(x, L, y, ws, task_at, nullptr);
    }
    template <class Task>
    void forward(ConstMatrixView<float> x, std::span<const index_t> lengths, MatrixView<float> y, workspace& ws,
                 const std::vector<Task>& tasks) const {
        forward(x, lengths, y, ws, std::span<const Task>(tasks));
    }
    void forward(ConstMatrixView<float> x, std::span<const index_t> lengths, MatrixView<float> y, workspace& ws) const {
        const auto L = check(x, lengths, y, "Stack::forward");
        run(x, L, y, ws, no_task, nullptr);
    }

    /// One kv_cache per layer.
    std::vector<kv_cache> make_cache(index_t batch, index_t capacity) const {
        std::vector<kv_cache> c;
        c.reserve(layers_.size());
        for (const auto& l : layers_) c.push_back(l.make_cache(batch, capacity));
        return c;
    }

    /// Incremental forward through every layer (see TransformerLayer::decode); `caches` has one per layer.
    /// With an input hook (prompt tuning) the task's P virtual tokens are put before a sequence once, when it
    /// starts: in the call where its cache holds no tokens yet and it has new tokens. They stay in the cache as
    /// its first P tokens (positions 0..P-1, as Stack::forward places them), so prefill + decode steps equal the
    /// full causal forward over [virtual tokens; sequence]; y receives the real tokens' rows only. A sequence
    /// truncated below P tokens must be truncated to 0 (it then starts again with its virtual tokens).
    template <class Task>
    void decode(ConstMatrixView<float> x, std::span<const index_t> new_lengths, MatrixView<float> y,
                std::span<kv_cache> caches, workspace& ws, std::span<const Task> tasks) const
        requires causal
    {
        require<shape_error>(tasks.size() == layers_.size(), "Stack::decode: ", tasks.size(),
                             " PET task modules for ", layers_.size(), " layers");
        auto task_at = [&](std::size_t i) -> const Task& { return tasks[i]; };
        if constexpr (pet::uses_hook<Task, pet::hook::input> || SequenceTasks<Task>) {
            if (!layers_.empty()) {
                const auto vt_of = [&](index_t b) { return virtual_tokens_of(tasks[0], b); };
                bool any = false;
                for (index_t b = 0; b < index_t(new_lengths.size()) && !any; ++b) any = vt_of(b).rows() > 0;
                if (any) {
                    const auto L = check(x, new_lengths, y, "Stack::decode");
                    require<shape_error>(caches.size() == layers_.size(), "Stack::decode: ", caches.size(),
                                         " kv_caches for ", layers_.size(), " layers");
                    require<shape_error>(caches[0].batch() == L.batch, "Stack::decode: kv_cache holds ",
                                         caches[0].batch(), " sequences, the batch has ", L.batch);
                    index_t P_max = 0;  // over the sequences that start now, each with its own task's tokens
                    for (index_t b = 0; b < L.batch; ++b) {
                        const ConstMatrixView<float> vt = vt_of(b);
                        if (vt.rows() > 0) check_shape(vt, -1, x.cols(), "Stack::decode: PET input hook (virtual tokens)");
                        if (starting(caches[0], L, b)) P_max = std::max(P_max, vt.rows());
                    }
                    if (P_max > 0) {
                        prompted_decode(x, L, y, caches, ws, vt_of, P_max, tasks, task_at);
                        return;
                    }
                }
            }
        }
        const auto L = check_decode(x, new_lengths, y, caches, tasks);
        run(x, L, y, ws, task_at, caches.data());
    }
    template <class Task>
    void decode(ConstMatrixView<float> x, std::span<const index_t> new_lengths, MatrixView<float> y,
                std::span<kv_cache> caches, workspace& ws, const std::vector<Task>& tasks) const
        requires causal
    {
        decode(x, new_lengths, y, caches, ws, std::span<const Task>(tasks));
    }
    void decode(ConstMatrixView<float> x, std::span<const index_t> new_lengths, MatrixView<float> y,
                std::span<kv_cache> caches, workspace& ws) const
        requires causal
    {
        const auto L = check_decode(x, new_lengths, y, caches);
        run(x, L, y, ws, no_task, caches.data());
    }

private:
    static const pet::none::modules& no_task(std::size_t) noexcept {
        static const pet::none::modules none{};
        return none;
    }
    /// One dispatch for the whole stack; layer 0 reads x, the others update y in place. The caches are committed
    /// after the last layer ran, all together: a failure in any layer leaves every layer's cache as it was, so
    /// they never get out of step.
    template <class TaskAt>
    void run(ConstMatrixView<float> x, const batch_layout& L, MatrixView<float> y, workspace& ws, TaskAt&& task_at,
             kv_cache* caches) const {
        if (layers_.empty()) {
            copy(x, y);
            return;
        }
        arch::dispatch([&](auto tag) {
            for (std::size_t i = 0; i < layers_.size(); ++i)
                layers_[i].forward_on(tag, i == 0 ? x : ConstMatrixView<float>(y), L, y, ws, task_at(i),
                                      caches ? caches + i : nullptr);
        });
        if (caches)
            for (std::size_t i = 0; i < layers_.size(); ++i)
                layer_type::commit(caches[i], L, [&](index_t b) { return layers_[i].attention().prefix_rows_of(task_at(i), b); });
    }
    /// Sequence b's prompt-tuning tokens: layer 0's input hook (its own task's where the modules differ per
    /// sequence); empty without one.
    template <class Task>
    static ConstMatrixView<float> virtual_tokens_of(const Task& first, index_t b) {
        if constexpr (SequenceTasks<Task>) {
            using T = std::decay_t<decltype(*first.task_of(b))>;
            if constexpr (pet::uses_hook<T, pet::hook::input>)
                if (const auto* t = first.task_of(b)) return t->virtual_tokens();
            return {};
        } else if constexpr (pet::uses_hook<Task, pet::hook::input>) {
            (void)b;
            return first.virtual_tokens();
        } else {
            (void)first, (void)b;
            return {};
        }
    }
    /// Sequence b starts in this call: no tokens cached yet (an attention-hook prefix may be) and new tokens.
    static bool starting(const kv_cache& c, const batch_layout& L, index_t b) {
        return c.tokens(b) == 0 && L.length(b) > 0;
    }
    /// Decode where some sequences start: those get [virtual tokens; new tokens] (vt_of(b): sequence b's
    /// tokens), the others their new tokens, in one workspace buffer of S + P_max rows per sequence (in place;
    /// P_max the most tokens a starting sequence takes, the rows past a sequence's own are padding); then the
    /// real tokens' rows to y. Every check (capacity included) runs before a cache changes.
    template <class VtOf, class Tasks, class TaskAt>
    void prompted_decode(ConstMatrixView<float> x, const batch_layout& L, MatrixView<float> y,
                         std::span<kv_cache> caches, workspace& ws, const VtOf& vt_of, index_t P_max,
                         const Tasks& tasks, TaskAt&& task_at) const {
        const index_t S = L.seq_len, B = L.batch, d = x.cols(), Se = S + P_max;
        auto& lens = ws.lengths_scratch(static_cast<std::size_t>(B));
        auto skip = [&](index_t b) { return lens[std::size_t(b)] - L.length(b); };  // rows before the real tokens
        for (index_t b = 0; b < B; ++b) {
            const bool st = starting(caches[0], L, b);
            const index_t P = vt_of(b).rows();
            lens[std::size_t(b)] = L.length(b) + (st ? P : 0);
            if (st && P > 0) {  // rows it will hold: its attention-hook prefix (held or to come), P, its new tokens
                const index_t pre =
                    caches[0].length(b) ? caches[0].length(b) : layers_[0].attention().prefix_rows_of(tasks[0], b);
                const index_t rows = pre + P + L.length(b);
                require<shape_error>(rows <= caches[0].capacity(), "Stack::decode: sequence ", b,
                                     " starts with the task's ", P, " virtual tokens (prompt tuning)",
                                     pre ? " after its attention prefix" : "", " plus ", L.length(b), " new tokens: ",
                                     rows, " rows exceed the kv_cache capacity of ", caches[0].capacity());
            }
        }
        const auto Le = batch_layout::of(B * Se, lens, "Stack::decode (with virtual tokens)");
        for (std::size_t i = 0; i < layers_.size(); ++i) {
            layers_[i].check_task(tasks[i], "Stack::decode", i == 0);
            layers_[i].check_cache(caches[i], Le, "Stack::decode",
                                   [&](index_t b) { return layers_[i].attention().prefix_rows_of(tasks[i], b); });
        }
        auto xe = ws.get(workspace::prompt, B * Se, d);
        for (index_t b = 0; b < B; ++b) {
            auto xb = xe.middle_rows(b * Se, Se);
            const index_t P = skip(b);
            if (P) copy(vt_of(b), xb.middle_rows(0, P));
            copy(x.middle_rows(b * S, S), xb.middle_rows(P, S));
            fill_zero(xb.middle_rows(P + S, Se - P - S));  // padding
        }
        run(xe, Le, xe, ws, task_at, caches.data());
        for (index_t b = 0; b < B; ++b)  // rows past a sequence's length are zero padding in xe
            copy(xe.middle_rows(b * Se + skip(b), S), y.middle_rows(b * S, S));
    }
    /// The stack over [virtual tokens; sequence] per sequence (vt_of(b): sequence b's tokens, at most P_max), in
    /// one workspace buffer of S + P_max rows per sequence (in place), then the real tokens' rows to y. A sequence
    /// with fewer tokens than P_max (tasks that differ per sequence) has the rest of its rows as padding, which
    /// nothing attends to, so its output is the one it gets alone; its positions count from its first token.
    template <class VtOf, class TaskAt>
    void prompted(ConstMatrixView<float> x, const batch_layout& L, MatrixView<float> y, workspace& ws,
                  const VtOf& vt_of, index_t P_max, TaskAt&& task_at) const {
        const index_t S = L.seq_len, B = L.batch, d = x.cols(), Se = S + P_max;
        auto xe = ws.get(workspace::prompt, B * Se, d);
        auto& lens = ws.lengths_scratch(static_cast<std::size_t>(B));
        for (index_t b = 0; b < B; ++b) {
            const ConstMatrixView<float> vt = vt_of(b);
            const index_t P = vt.rows();
            lens[std::size_t(b)] = L.length(b) + P;
            copy(vt, xe.middle_rows(b * Se, P));
            copy(x.middle_rows(b * S, S), xe.middle_rows(b * Se + P, S));
            fill_zero(xe.middle_rows(b * Se + P + S, P_max - P));  // padding
        }
        const auto Le = batch_layout::of(B * Se, lens, "Stack::forward (with virtual tokens)");
        run(xe, Le, xe, ws, task_at, nullptr);
        for (index_t b = 0; b < B; ++b) copy(xe.middle_rows(b * Se + vt_of(b).rows(), S), y.middle_rows(b * S, S));
    }
    batch_layout check(ConstMatrixView<float> x, std::span<const index_t> lengths, MatrixView<float> y,
                       const char* who) const {
        if (layers_.empty()) {
            check_shape(y, x.rows(), x.cols(), "Stack: y");
            return batch_layout::of(x.rows(), lengths, who);
        }
        return layers_[0].check_call(x, lengths, y, who);
    }
    batch_layout check_decode(ConstMatrixView<float> x, std::span<const index_t> lengths, MatrixView<float> y,
                              std::span<kv_cache> caches) const {
        const auto L = check(x, lengths, y, "Stack::decode");
        require<shape_error>(caches.size() == layers_.size(), "Stack::decode: ", caches.size(), " kv_caches for ",
                             layers_.size(), " layers");
        for (std::size_t i = 0; i < layers_.size(); ++i) layers_[i].check_cache(caches[i], L, "Stack::decode");
        return L;
    }
    template <class Tasks>
    batch_layout check_decode(ConstMatrixView<float> x, std::span<const index_t> lengths, MatrixView<float> y,
                              std::span<kv_cache> caches, const Tasks& tasks) const {
        const auto L = check(x, lengths, y, "Stack::decode");
        require<shape_error>(caches.size() == layers_.size(), "Stack::decode: ", caches.size(), " kv_caches for ",
                             layers_.size(), " layers");
        for (std::size_t i = 0; i < layers_.size(); ++i) {
            layers_[i].check_task(tasks[i], "Stack::decode", i == 0);
            layers_[i].check_cache(caches[i], L, "Stack::decode",
                                   [&](index_t b) { return layers_[i].attention().prefix_rows_of(tasks[i], b); });
        }
        return L;
    }
    void check_same_shape() const {
        for (std::size_t i = 1; i < layers_.size(); ++i)
            require<shape_error>(layers_[i].shape().d_model == layers_[0].shape().d_model &&
                                     layers_[i].shape().kv_dim() == layers_[0].shape().kv_dim(),
                                 "Stack: layer ", i, " has d_model ", layers_[i].shape().d_model, ", layer 0 has ",
                                 layers_[0].shape().d_model);
    }
    static void copy(ConstMatrixView<float> x, MatrixView<float> y) noexcept {
        if (x.data() == y.data()) return;
        for (index_t r = 0; r < x.rows(); ++r)
            for (index_t c = 0; c < x.cols(); ++c) y(r, c) = x(r, c);
    }

    static void fill_zero(MatrixView<float> y) noexcept {
        for (index_t r = 0; r < y.rows(); ++r)
            for (index_t c = 0; c < y.cols(); ++c) y(r, c) = 0.f;
    }

    std::vector<layer_type> layers_;
};

}  // namespace cpet::nn

namespace cpet {
using nn::Stack;
}  // namespace cpet
