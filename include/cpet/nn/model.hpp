// cpet/nn/model.hpp — a whole Transformer from token ids: embeddings, the layer stack, a final norm, pooling and
// heads.
//
//   BERT:  x = LN(word[id] + position[t] + token_type[type]);  h = Stack(x)          (post-LN layers)
//   LLaMA: x = word[id];                                        h = RMSNorm(Stack(x)) (pre-LN layers, RoPE inside)
//   pooling:  CLS (row 0 of each sequence), mean over the real tokens (the attention mask), last real token
//   heads:    LM head  logits = h·Eᵀ (tied to the word embeddings) or h·Wᵀ (lm_head);
//             sequence classification  logits = W_c·tanh(W_p·h_cls + b_p) + b_c (BERT, pooler + classifier) or
//             W_s·h_last (LLaMA's score head, no bias).
//
// Model<C> is a template over the layer configuration and wraps Stack<C> without knowing what the stack's PET part
// is: every forward takes the stack's own trailing arguments (`task...`) and hands them over untouched, so the
// model follows any change of how tasks are passed to a stack. Embeddings and heads stay fp32 (HF keeps them
// uncompressed too); only the stack's linears carry C's compression policy.
//
// A batch is B sequences padded to S tokens (token_batch), the layout of nn/batch.hpp: sequence b owns rows
// [b·S, b·S + S), the first lengths[b] real. Positions count from 0 in each sequence (HF's default position_ids
// with right padding).
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "cpet/arch/dispatch.hpp"
#include "cpet/compress/dense.hpp"
#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/core/parallel.hpp"
#include "cpet/nn/batch.hpp"
#include "cpet/nn/config.hpp"
#include "cpet/nn/linear.hpp"
#include "cpet/nn/norm.hpp"
#include "cpet/nn/stack.hpp"
#include "cpet/nn/workspace.hpp"

namespace cpet::nn {

/// Token ids of B sequences padded to seq_len each (ids.size() == B·seq_len); type_ids empty (all 0) or the
/// same size. Padding ids are ignored (never looked up).
struct token_batch {
    std::vector<std::int32_t> ids;
    std::vector<std::int32_t> type_ids;
    std::vector<index_t> lengths;
    index_t seq_len = 0;
    /// Position of each sequence's first token in the learned position table (0; P for PEFT's prefix tuning on
    /// BERT, which puts the real tokens after the P virtual ones). RoPE layers ignore it.
    index_t position_offset = 0;

    index_t batch() const noexcept { return static_cast<index_t>(lengths.size()); }
    index_t rows() const noexcept { return batch() * seq_len; }
    batch_layout layout(const char* who) const {
        require<shape_error>(seq_len >= 0 && index_t(ids.size()) == rows(), who, ": token_batch has ", ids.size(),
                             " ids, expected ", rows(), " (", batch(), " sequences x seq_len ", seq_len, ")");
        require<shape_error>(type_ids.empty() || type_ids.size() == ids.size(), who, ": token_batch has ",
                             type_ids.size(), " type ids, expected ", ids.size(), " or none");
        return batch_layout::of(rows(), lengths, who);
    }
};

/// The embedding tables as a checkpoint holds them (BERT: all of them; LLaMA: `word` only).
struct embedding_weights {
    Matrix<float> word;        ///< [vocab, d] (or empty, with word_view set)
    /// Zero-copy alternative to `word`: a view into storage kept alive by `keep_alive` (a loader hands out the
    /// memory-mapped checkpoint's table: the largest tensor of a small model is then never copied, and only the
    /// rows actually looked up are paged in).
    ConstMatrixView<float> word_view;
    std::shared_ptr<const void> keep_alive;
    Matrix<float> position;    ///< [max_positions, d], empty when positions come from RoPE
    Matrix<float> token_type;  ///< [type_vocab, d] or empty
    std::vector<float> norm_gamma, norm_beta;  ///< the LayerNorm after the sum ([d] each), empty for none
    float norm_eps = 1e-12f;
};

class Embeddings {
public:
    Embeddings() = default;
    explicit Embeddings(embedding_weights w) : w_(std::move(w)) {
        const ConstMatrixView<float> table = word();
        check_shape(table, -1, -1, "Embeddings: word table");
        const index_t d = table.cols();
        require<shape_error>(table.rows() > 0 && d > 0, "Embeddings: word table is ", shape_str(table.rows(), d),
                             ", expected a non-empty [vocab, d]");
        if (!w_.position.empty()) check_shape(w_.position.view(), -1, d, "Embeddings: position table");
        if (!w_.token_type.empty()) check_shape(w_.token_type.view(), -1, d, "Embeddings: token_type table");
        require<shape_error>(w_.norm_gamma.empty() || index_t(w_.norm_gamma.size()) == d, "Embeddings: norm gamma has ",
                             w_.norm_gamma.size(), " values, expected ", d);
        require<shape_error>(w_.norm_beta.empty() || w_.norm_beta.size() == w_.norm_gamma.size(),
                             "Embeddings: norm beta has ", w_.norm_beta.size(), " values, expected ",
                             w_.norm_gamma.size());
        if (!w_.norm_gamma.empty()) norm_ = Norm<norm_kind::layernorm>(w_.norm_gamma, w_.norm_beta, w_.norm_eps);
    }

    index_t vocab() const noexcept { return word().rows(); }
    index_t d_model() const noexcept { return word().cols(); }
    /// Longest sequence the position table covers (unbounded, -1, without one).
    index_t max_positions() const noexcept { return w_.position.empty() ? -1 : w_.position.rows(); }
    index_t type_vocab() const noexcept { return w_.token_type.rows(); }
    /// The word table: formed on each call from what the embeddings hold (a stored view into an owned matrix would
    /// dangle in a copy of the object).
    ConstMatrixView<float> word() const noexcept {
        return w_.word.empty() ? w_.word_view : ConstMatrixView<float>(w_.word.view());
    }
    /// Whether the word table is a view into storage the embeddings do not own (a mapped checkpoint).
    bool borrowed() const noexcept { return w_.word.empty(); }
    std::size_t bytes() const noexcept {
        return std::size_t(word().size()) * sizeof(float) + w_.position.bytes() + w_.token_type.bytes() +
               (w_.norm_gamma.size() + w_.norm_beta.size()) * sizeof(float);
    }

    /// Checks every real token's id and type id and each sequence's length against the tables.
    void check(const token_batch& t, const batch_layout& L, const char* who) const {
        for (index_t b = 0; b < L.batch; ++b) {
            require<shape_error>(t.position_offset >= 0, who, ": position_offset ", t.position_offset, " is negative");
            require<shape_error>(max_positions() < 0 || t.position_offset + L.length(b) <= max_positions(), who,
                                 ": sequence ", b, " has ", L.length(b), " tokens",
                                 t.position_offset ? " after a position offset" : "", ", the position table holds ",
                                 max_positions(), " (truncate the input)");
            for (index_t i = 0; i < L.length(b); ++i) {
                const auto r = std::size_t(b * L.seq_len + i);
                require<shape_error>(t.ids[r] >= 0 && t.ids[r] < vocab(), who, ": token id ", t.ids[r], " of sequence ",
                                     b, " at ", i, " is outside the vocabulary [0, ", vocab(), ")");
                if (!t.type_ids.empty()) {
                    const index_t types = w_.token_type.empty() ? 1 : type_vocab();
                    require<shape_error>(t.type_ids[r] >= 0 && t.type_ids[r] < types, who, ": token type id ",
                                         t.type_ids[r], " of sequence ", b, " at ", i, " is outside [0, ", types, ")");
                }
            }
        }
    }

    /// x [B·S, d] = embeddings of t (checked by check()); padded rows are zero.
    void forward(const token_batch& t, const batch_layout& L, MatrixView<float> x) const {
        const index_t d = d_model();
        const ConstMatrixView<float> table = word();
        parallel_for(index_t(0), L.batch, [&](index_t b) {
            for (index_t i = 0; i < L.seq_len; ++i) {
                const index_t r = b * L.seq_len + i;
                float* xr = x.row(r);
                if (i >= L.length(b)) {
                    for (index_t c = 0; c < d; ++c) xr[c] = 0.f;
                    continue;
                }
                const float* wr = table.row(t.ids[std::size_t(r)]);
                for (index_t c = 0; c < d; ++c) xr[c] = wr[c];
                if (!w_.position.empty()) {
                    const float* pr = w_.position.row(t.position_offset + i);
                    for (index_t c = 0; c < d; ++c) xr[c] += pr[c];
                }
                if (!w_.token_type.empty()) {
                    const float* tr = w_.token_type.row(t.type_ids.empty() ? 0 : t.type_ids[std::size_t(r)]);
                    for (index_t c = 0; c < d; ++c) xr[c] += tr[c];
                }
            }
        });
        if (norm_) norm_->apply(x, x);
        detail::zero_padding(x, L);
    }

private:
    embedding_weights w_;
    std::optional<Norm<norm_kind::layernorm>> norm_;
};

enum class pooling { cls, mean, last };

inline const char* pooling_name(pooling p) noexcept {
    return p == pooling::cls ? "cls" : p == pooling::mean ? "mean" : "last";
}

/// out [B, d] = pooled rows of h [B·S, d]; a sequence of length 0 pools to zeros.
inline void pool(ConstMatrixView<float> h, const batch_layout& L, pooling p, MatrixView<float> out) {
    check_shape(out, L.batch, h.cols(), "nn::pool: out");
    check_shape(h, L.rows(), -1, "nn::pool: h");
    const index_t d = h.cols();
    for (index_t b = 0; b < L.batch; ++b) {
        float* o = out.row(b);
        for (index_t c = 0; c < d; ++c) o[c] = 0.f;
        const index_t n = L.length(b);
        if (n == 0) continue;
        if (p == pooling::mean) {
            // Sum in double: 512 rows of fp32 activations would otherwise lose ~1e-5 relative.
            std::vector<double> acc(static_cast<std::size_t>(d), 0.0);
            for (index_t i = 0; i < n; ++i) {
                const float* hr = h.row(b * L.seq_len + i);
                for (index_t c = 0; c < d; ++c) acc[std::size_t(c)] += hr[c];
            }
            for (index_t c = 0; c < d; ++c) o[c] = float(acc[std::size_t(c)] / double(n));
        } else {
            const float* hr = h.row(b * L.seq_len + (p == pooling::cls ? 0 : n - 1));
            for (index_t c = 0; c < d; ++c) o[c] = hr[c];
        }
    }
}

/// Sequence classification: logits = classifier(pooler(h_pool)) with an optional tanh pooler (BERT).
struct classification_head {
    pooling pool = pooling::cls;
    std::optional<Linear<compress::dense_f32>> pooler;  ///< [d, d] + tanh (BERT's pooler), or none
    Linear<compress::dense_f32> classifier;             ///< [labels, d]

    index_t labels() const noexcept { return classifier.out_features(); }
};

/// The weights a Model is built from (what io/ reads from a checkpoint).
struct model_weights {
    embedding_weights embeddings;
    std::vector<dense_layer_weights> layers;
    layer_shape shape;
    std::vector<float> final_norm_gamma, final_norm_beta;  ///< LLaMA model.norm; empty for BERT
    Matrix<float> lm_head;                                 ///< [vocab, d]; empty: tied to the word embeddings
    bool lm_head_tied = false;
    // Classification head (absent when classifier is empty).
    Matrix<float> pooler_w;
    std::vector<float> pooler_b;
    Matrix<float> classifier_w;
    std::vector<float> classifier_b;
    pooling classifier_pool = pooling::cls;
};

template <LayerConfig C>
class Model {
public:
    using config = C;
    using stack_type = Stack<C>;
    using layer_type = typename stack_type::layer_type;

    Model() = default;
    /// Takes built parts (the stack compressed already, e.g. layer by layer while a checkpoint loads).
    Model(Embeddings emb, stack_type stack, const std::vector<float>& final_gamma, const std::vector<float>& final_beta,
          float final_eps, std::optional<Linear<compress::dense_f32>> lm_head, bool lm_head_tied,
          std::optional<classification_head> cls)
        : emb_(std::move(emb)), stack_(std::move(stack)), lm_head_(std::move(lm_head)), tied_(lm_head_tied),
          cls_(std::move(cls)) {
        if (!final_gamma.empty()) final_norm_ = Norm<C::norm>(final_gamma, final_beta, final_eps);
        check_parts();
    }
    /// Compresses every layer of `w` with C's compression policy (no calibration data).
    explicit Model(const model_weights& w)
        : Model(Embeddings(copy(w.embeddings)), stack_type(w.layers, w.shape), w.final_norm_gamma, w.final_norm_beta,
                w.shape.eps, make_lm_head(w), w.lm_head_tied, make_cls(w)) {}

    const Embeddings& embeddings() const noexcept { return emb_; }
    const stack_type& stack() const noexcept { return stack_; }
    index_t d_model() const noexcept { return emb_.d_model(); }
    index_t vocab() const noexcept { return emb_.vocab(); }
    bool has_lm_head() const noexcept { return lm_head_.has_value(); }
    bool lm_head_tied() const noexcept { return tied_; }
    const std::optional<classification_head>& classifier() const noexcept { return cls_; }
    /// The final norm (LLaMA's model.norm) or null; the LM head or null (trainers run their backward).
    const Norm<C::norm>* final_norm() const noexcept { return final_norm_ ? &*final_norm_ : nullptr; }
    const Linear<compress::dense_f32>* lm_head() const noexcept { return lm_head_ ? &*lm_head_ : nullptr; }
    /// Bytes of the stack's packed weights (what compression changes).
    std::size_t stack_bytes() const noexcept { return stack_.bytes(); }

    /// h [B·S, d] = last hidden states of t (after the final norm, when the model has one); padded rows zero.
    /// `task...`: whatever Stack<C>::forward takes after the workspace (nothing for a bare backbone).
    template <class... Task>
    void hidden_states(const token_batch& t, MatrixView<float> h, workspace& ws, Task&&... task) const {
        const char* who = "Model::hidden_states";
        const auto L = t.layout(who);
        check_shape(h, L.rows(), d_model(), "Model::hidden_states: h");
        emb_.check(t, L, who);
        if (L.rows() == 0) return;
        Matrix<float> x(L.rows(), d_model());
        emb_.forward(t, L, x);
        stack_.forward(x, t.lengths, h, ws, std::forward<Task>(task)...);
        if (final_norm_) {
            final_norm_->apply(h, h);
            detail::zero_padding(h, L);
        }
    }
    template <class... Task>
    Matrix<float> hidden_states(const token_batch& t, workspace& ws, Task&&... task) const {
        Matrix<float> h(t.rows(), d_model());
        hidden_states(t, h, ws, std::forward<Task>(task)...);
        return h;
    }

    /// [B, d] sentence embeddings: pooled last hidden states (all-MiniLM / sentence-transformers: mean).
    template <class... Task>
    Matrix<float> embed(const token_batch& t, pooling p, workspace& ws, Task&&... task) const {
        const auto h = hidden_states(t, ws, std::forward<Task>(task)...);
        Matrix<float> out(t.batch(), d_model());
        pool(h, t.layout("Model::embed"), p, out);
        return out;
    }

    /// [B·S, vocab] next-token logits (padded rows zero); format_error without an LM head.
    template <class... Task>
    Matrix<float> logits(const token_batch& t, workspace& ws, Task&&... task) const {
        require<format_error>(lm_head_.has_value(), "Model::logits: the model has no LM head (an encoder checkpoint)");
        const auto h = hidden_states(t, ws, std::forward<Task>(task)...);
        Matrix<float> y(t.rows(), lm_head_->out_features());
        if (t.rows() > 0) lm_head_->forward(h, y);
        detail::zero_padding(y, t.layout("Model::logits"));
        return y;
    }

    /// [B, labels] sequence-classification logits; format_error without a classification head.
    template <class... Task>
    Matrix<float> classify(const token_batch& t, workspace& ws, Task&&... task) const {
        require<format_error>(cls_.has_value(), "Model::classify: the model has no classification head");
        const auto h = hidden_states(t, ws, std::forward<Task>(task)...);
        const auto L = t.layout("Model::classify");
        Matrix<float> p(t.batch(), d_model());
        pool(h, L, cls_->pool, p);
        if (cls_->pooler) {
            Matrix<float> q(t.batch(), d_model());
            if (t.batch() > 0) cls_->pooler->forward(p, q);
            for (index_t i = 0; i < q.size(); ++i) q.data()[i] = std::tanh(q.data()[i]);
            p = std::move(q);
        }
        Matrix<float> y(t.batch(), cls_->labels());
        if (t.batch() > 0) cls_->classifier.forward(p, y);
        return y;
    }

private:
    static embedding_weights copy(const embedding_weights& e) {
        embedding_weights c;
        c.word = e.word.empty() ? Matrix<float>() : Matrix<float>(e.word.view());
        c.word_view = e.word_view;
        c.keep_alive = e.keep_alive;
        c.position = Matrix<float>(e.position.view());
        c.token_type = Matrix<float>(e.token_type.view());
        c.norm_gamma = e.norm_gamma;
        c.norm_beta = e.norm_beta;
        c.norm_eps = e.norm_eps;
        return c;
    }
    static std::optional<Linear<compress::dense_f32>> make_lm_head(const model_weights& w) {
        if (w.lm_head_tied)
            return Linear<compress::dense_f32>(compress::dense_f32(
                w.embeddings.word.empty() ? w.embeddings.word_view : ConstMatrixView<float>(w.embeddings.word.view())));
        if (w.lm_head.empty()) return std::nullopt;
        return Linear<compress::dense_f32>(compress::dense_f32(w.lm_head.view()));
    }
    static std::optional<classification_head> make_cls(const model_weights& w) {
        if (w.classifier_w.empty()) return std::nullopt;
        classification_head h;
        h.pool = w.classifier_pool;
        if (!w.pooler_w.empty())
            h.pooler = Linear<compress::dense_f32>(compress::dense_f32(w.pooler_w.view()), w.pooler_b, "pooler bias");
        h.classifier = Linear<compress::dense_f32>(compress::dense_f32(w.classifier_w.view()), w.classifier_b,
                                                   "classifier bias");
        return h;
    }
    void check_parts() const {
        const index_t d = emb_.d_model();
        if (stack_.size() > 0)
            require<shape_error>(stack_.layer(0).shape().d_model == d, "Model: the embeddings have d = ", d,
                                 ", the layers d_model = ", stack_.layer(0).shape().d_model);
        if (final_norm_)
            require<shape_error>(final_norm_->features() == d, "Model: final norm has ", final_norm_->features(),
                                 " features, expected ", d);
        if (lm_head_)
            require<shape_error>(lm_head_->in_features() == d, "Model: LM head takes ", lm_head_->in_features(),
                                 " features, expected ", d);
        if (cls_) {
            if (cls_->pooler)
                require<shape_error>(cls_->pooler->in_features() == d && cls_->pooler->out_features() == d,
                                     "Model: pooler is ", cls_->pooler->out_features(), "x", cls_->pooler->in_features(),
                                     ", expected ", d, "x", d);
            require<shape_error>(cls_->classifier.in_features() == d, "Model: classifier takes ",
                                 cls_->classifier.in_features(), " features, expected ", d);
        }
    }

    Embeddings emb_;
    stack_type stack_;
    std::optional<Norm<C::norm>> final_norm_;
    std::optional<Linear<compress::dense_f32>> lm_head_;
    bool tied_ = false;
    std::optional<classification_head> cls_;
};

}  // namespace cpet::nn
