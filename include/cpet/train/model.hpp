// cpet/train/model.hpp — the backward of a whole nn::Model: frozen embeddings, the layer stack (train/layer.hpp per
// layer), the frozen final norm, pooling, a trainable classification head and the frozen LM head.
//
//   forward:  x = Embeddings(ids);  h_l = layer_l(h_{l-1});  h = N_final(h_L);  then pool + head, or the LM head
//   backward: dh → N_final' → layer_L' → … → layer_1' (the embeddings are frozen: their gradient is not formed)
//
// Prompt tuning: layer 0's terms may carry the task's P virtual tokens (the only place nn::Stack takes them from);
// the forward puts them before each sequence after the embeddings, runs the layers on P + S rows per sequence and
// keeps the real tokens' rows as the hidden states, as nn::Stack::forward does; the backward runs the layers on the
// same rows and adds the rows of layer 0's input gradient at the virtual tokens, summed over the sequences, to
// their gradient.
//
// Memory: the tape keeps every layer's activations (layer_tape::bytes()), or with model_options::recompute only each
// layer's input, and the backward re-runs that layer's forward right before its backward — one extra forward for
// roughly 1/(layers) of the activation memory, what long sequences need.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "cpet/compress/dense.hpp"
#include "cpet/core/eigen.hpp"
#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/nn/model.hpp"
#include "cpet/train/layer.hpp"
#include "cpet/train/parameter.hpp"

namespace cpet::train {

/// A trainable linear head, logits = x·Wᵀ + b (a new task's classifier: HF PEFT trains it as modules_to_save).
struct linear_head {
    Matrix<float> W, gW;  ///< [labels, in]
    Matrix<float> b, gb;  ///< [1, labels]

    index_t labels() const noexcept { return W.rows(); }
    index_t in_features() const noexcept { return W.cols(); }

    /// torch.nn.Linear's initialisation: W and b uniform in ±1/√in (seeded).
    static linear_head make(index_t in, index_t labels, std::uint64_t seed) {
        require<shape_error>(in > 0 && labels > 0, "train::linear_head: in (", in, ") and labels (", labels,
                             ") must be positive");
        linear_head h;
        h.W = Matrix<float>(labels, in);
        h.b = Matrix<float>(1, labels);
        h.gW = Matrix<float>(labels, in);
        h.gb = Matrix<float>(1, labels);
        std::mt19937_64 gen(seed * 0x2545F4914F6CDD1Dull + 17);
        const float bound = 1.f / std::sqrt(float(in));
        std::uniform_real_distribution<float> u(-bound, bound);
        for (index_t i = 0; i < h.W.size(); ++i) h.W.data()[i] = u(gen);
        for (index_t i = 0; i < h.b.size(); ++i) h.b.data()[i] = u(gen);
        return h;
    }
    void forward(ConstMatrixView<float> x, MatrixView<float> y) const {
        check_shape(x, -1, in_features(), "train::linear_head: x");
        check_shape(y, x.rows(), labels(), "train::linear_head: y");
        as_eigen(y).noalias() = as_eigen(x) * as_eigen(W).transpose();
        as_eigen(y).rowwise() += as_eigen(b).row(0);
    }
    /// gW += dyᵀ·x, gb += Σ dy; dx = dy·W when dx is non-empty.
    void backward(ConstMatrixView<float> x, ConstMatrixView<float> dy, MatrixView<float> dx) {
        check_shape(dy, x.rows(), labels(), "train::linear_head: dy");
        as_eigen(gW).noalias() += as_eigen(dy).transpose() * as_eigen(x);
        as_eigen(gb).row(0) += as_eigen(dy).colwise().sum();
        if (dx.rows() > 0) {
            check_shape(dx, x.rows(), in_features(), "train::linear_head: dx");
            as_eigen(dx).noalias() = as_eigen(dy) * as_eigen(W);
        }
    }
    void append_parameters(const std::string& prefix, std::vector<parameter>& out) {
        out.push_back({prefix + "weight", std::span<float>(W.data(), std::size_t(W.size())),
                       std::span<float>(gW.data(), std::size_t(gW.size())), true});
        out.push_back({prefix + "bias", std::span<float>(b.data(), std::size_t(b.size())),
                       std::span<float>(gb.data(), std::size_t(gb.size())), false});
    }
};

/// dh [B·S, d] = the gradient of nn::pool's output dp [B, d] spread back over the pooled rows (padded rows zero).
inline void pool_backward(ConstMatrixView<float> dp, const nn::batch_layout& L, nn::pooling p, MatrixView<float> dh) {
    check_shape(dp, L.batch, -1, "train::pool_backward: dp");
    check_shape(dh, L.rows(), dp.cols(), "train::pool_backward: dh");
    const index_t d = dp.cols();
    for (index_t r = 0; r < dh.rows(); ++r)
        for (index_t c = 0; c < d; ++c) dh(r, c) = 0.f;
    for (index_t b = 0; b < L.batch; ++b) {
        const index_t n = L.length(b);
        if (n == 0) continue;
        if (p == nn::pooling::mean) {
            const float inv = 1.f / float(n);
            for (index_t i = 0; i < n; ++i)
                for (index_t c = 0; c < d; ++c) dh(b * L.seq_len + i, c) = dp(b, c) * inv;
        } else {
            const index_t i = p == nn::pooling::cls ? 0 : n - 1;
            for (index_t c = 0; c < d; ++c) dh(b * L.seq_len + i, c) = dp(b, c);
        }
    }
}

struct model_options {
    /// Keep only each layer's input and recompute its tape in the backward (see the top of this file).
    bool recompute = false;
};

/// What a model's backward needs from its forward.
struct model_tape {
    std::vector<index_t> lengths;
    index_t seq_len = 0;
    bool recompute = false;
    index_t prompt = 0;                  ///< virtual tokens before each sequence (prompt tuning)
    std::vector<index_t> layer_lengths;  ///< lengths + prompt: what the layers ran on (seq_len + prompt rows each)
    std::vector<layer_tape> layers;     ///< one per layer (none when recomputing)
    std::vector<Matrix<float>> inputs;  ///< each layer's input (recomputing only)
    detail::norm_saved final_norm;      ///< when the model has a final norm
    Matrix<float> hidden;               ///< the last hidden states [B·S, d] (after the final norm)
    detail::scratch_handle scratch;     ///< the layers' shared temporaries (layer.hpp's step_scratch)

    nn::batch_layout layout() const noexcept {
        nn::batch_layout L;
        L.batch = index_t(lengths.size());
        L.seq_len = seq_len;
        L.lengths = lengths;
        return L;
    }
    /// Bytes of activations kept between the forward and the backward (the peak adds one layer's tape when
    /// recomputing, see peak_bytes()).
    std::size_t bytes() const noexcept {
        std::size_t n = hidden.bytes() + final_norm.hat.bytes() + final_norm.rstd.size() * sizeof(float);
        for (const auto& l : layers) n += l.bytes();
        for (const auto& x : inputs) n += x.bytes();
        return n;
    }
};

/// The stack's per-layer terms: one layer_terms per layer of m; virtual tokens (prompt tuning) only in layer 0's,
/// d_model wide (nn::Stack's rule).
template <nn::LayerConfig C>
void check_terms(const nn::Model<C>& m, std::span<const layer_terms> terms, const char* who) {
    require<shape_error>(terms.size() == m.stack().size(), who, ": ", terms.size(), " layer_terms for ",
                         m.stack().size(), " layers");
    for (std::size_t l = 1; l < terms.size(); ++l)
        require<shape_error>(!terms[l].prompt, who, ": layer ", l, "'s terms carry ", terms[l].prompt.length(),
                             " virtual tokens (prompt tuning); only layer 0's are put before the sequence");
    if (!terms.empty() && terms[0].prompt)
        check_shape(terms[0].prompt.tokens, -1, m.d_model(),
                    cpet::detail::concat(who, ": layer 0's virtual tokens (prompt tuning)").c_str());
}

namespace detail {
/// out [B·(S+P), d] = [tokens; x_b] per sequence (padded rows zero).
inline void prepend_prompt(ConstMatrixView<float> x, index_t B, index_t S, ConstMatrixView<float> tokens,
                           MatrixView<float> out) {
    const index_t P = tokens.rows(), d = x.cols(), Se = S + P;
    for (index_t b = 0; b < B; ++b) {
        for (index_t r = 0; r < P; ++r)
            for (index_t c = 0; c < d; ++c) out(b * Se + r, c) = tokens(r, c);
        for (index_t r = 0; r < S; ++r)
            for (index_t c = 0; c < d; ++c) out(b * Se + P + r, c) = x(b * S + r, c);
    }
}
}  // namespace detail

/// tape.hidden = the model's last hidden states for `t` with the task whose per-layer terms are `terms`.
template <nn::LayerConfig C>
void forward(const nn::Model<C>& m, const nn::token_batch& t, std::span<const layer_terms> terms, model_tape& tape,
             const model_options& o = {}) {
    const char* who = "train::forward(model)";
    check_terms(m, terms, who);
    const auto L0 = t.layout(who);
    m.embeddings().check(t, L0, who);
    tape.lengths = t.lengths;
    tape.seq_len = L0.seq_len;
    tape.recompute = o.recompute;
    const auto L = tape.layout();
    const index_t M = L.rows(), d = m.d_model(), B = L.batch, S = L.seq_len;
    const prompt_term pt = terms.empty() ? prompt_term{} : terms[0].prompt;
    const index_t P = pt.length(), Se = S + P;
    tape.prompt = P;
    tape.layer_lengths = t.lengths;
    for (auto& n : tape.layer_lengths) n += P;
    Matrix<float> x(M, d);
    if (M > 0) m.embeddings().forward(t, L, x);
    if (P > 0) {
        Matrix<float> xe(B * Se, d);
        detail::prepend_prompt(x, B, S, pt.tokens, xe);
        x = std::move(xe);
    }
    Matrix<float> y(x.rows(), d);
    const std::size_t n = m.stack().size();
    // the same tape from step to step refills the buffers it holds (their pages stay)
    if (o.recompute) {
        tape.layers.clear();
        tape.inputs.resize(n);
    } else {
        tape.inputs.clear();
        tape.layers.resize(n);
    }
    tape.scratch.get();
    layer_tape scratch;
    scratch.scratch.p = tape.scratch.p;
    for (std::size_t l = 0; l < n; ++l) {
        if (o.recompute) tape.inputs[l].assign(x);
        else tape.layers[l].scratch.p = tape.scratch.p;
        detail::layer_forward(m.stack().layer(l), x, tape.layer_lengths, y, terms[l],
                              o.recompute ? scratch : tape.layers[l]);
        std::swap(x, y);
    }
    if (P > 0) {  // the real tokens' rows
        Matrix<float> h(M, d);
        for (index_t b = 0; b < B; ++b)
            for (index_t r = 0; r < S; ++r)
                for (index_t c = 0; c < d; ++c) h(b * S + r, c) = x(b * Se + P + r, c);
        x = std::move(h);
    }
    if (const auto* fn = m.final_norm()) {
        tape.hidden.reset(M, d);
        detail::norm_forward<C::norm>(x, fn->gamma(), fn->beta(), fn->eps(), tape.hidden, tape.final_norm);
        nn::detail::zero_padding(tape.hidden, L);
    } else {
        tape.hidden = std::move(x);
        tape.final_norm = {};
    }
}

/// Backpropagates dL/d(hidden) through the final norm and every layer, accumulating the terms' gradients.
template <nn::LayerConfig C>
void backward(const nn::Model<C>& m, const model_tape& tape, std::span<const layer_terms> terms,
              ConstMatrixView<float> dhidden) {
    const char* who = "train::backward(model)";
    check_terms(m, terms, who);
    const auto L = tape.layout();
    const index_t M = L.rows(), d = m.d_model();
    check_shape(dhidden, M, d, "train::backward(model): dhidden");
    Matrix<float> g(dhidden);
    nn::detail::zero_padding(g, L);
    if (const auto* fn = m.final_norm()) detail::norm_backward<C::norm>(tape.final_norm, fn->gamma(), g, g);
    const index_t P = tape.prompt, B = L.batch, S = L.seq_len, Se = S + P;
    require<shape_error>(P == (terms.empty() ? 0 : terms[0].prompt.length()), who, ": the tape was filled with ", P,
                         " virtual tokens, the terms have ", terms.empty() ? 0 : terms[0].prompt.length());
    if (P > 0) {  // the virtual tokens' rows receive nothing from above
        Matrix<float> ge(B * Se, d);
        for (index_t b = 0; b < B; ++b)
            for (index_t r = 0; r < S; ++r)
                for (index_t c = 0; c < d; ++c) ge(b * Se + P + r, c) = g(b * S + r, c);
        g = std::move(ge);
    }
    layer_tape scratch;
    scratch.scratch.p = tape.scratch.p;  // null when the tape was not filled by forward: it then makes its own
    Matrix<float> y(g.rows(), d);
    for (std::size_t l = m.stack().size(); l-- > 0;) {
        const auto& layer = m.stack().layer(l);
        // the first layer's input gradient feeds only the virtual tokens (the embeddings are frozen)
        const MatrixView<float> dx = l == 0 && P == 0 ? MatrixView<float>() : MatrixView<float>(g);
        if (tape.recompute) {
            detail::layer_forward(layer, tape.inputs[l], tape.layer_lengths, y, terms[l], scratch);
            backward(layer, scratch, terms[l], g, dx);
        } else {
            backward(layer, tape.layers[l], terms[l], g, dx);
        }
    }
    if (P > 0) {  // dL/d(tokens) = Σ_b the rows of layer 0's input gradient at the virtual tokens
        const MatrixView<float> gt = terms[0].prompt.g;
        for (index_t b = 0; b < B; ++b)
            for (index_t r = 0; r < P; ++r)
                for (index_t c = 0; c < d; ++c) gt(r, c) += g(b * Se + r, c);
    }
}

/// Next-token logits [B·S, vocab] of the model's LM head (padded rows zero).
template <nn::LayerConfig C>
Matrix<float> lm_logits(const nn::Model<C>& m, const model_tape& tape) {
    const auto* head = m.lm_head();
    require<format_error>(head != nullptr, "train::lm_logits: the model has no LM head");
    Matrix<float> y(tape.hidden.rows(), head->out_features());
    if (y.rows() > 0) head->forward(tape.hidden, y);
    nn::detail::zero_padding(y, tape.layout());
    return y;
}
/// dL/d(hidden) from dL/d(logits) through the frozen LM head.
template <nn::LayerConfig C>
Matrix<float> lm_backward(const nn::Model<C>& m, ConstMatrixView<float> dlogits) {
    const auto* head = m.lm_head();
    require<format_error>(head != nullptr, "train::lm_backward: the model has no LM head");
    Matrix<float> dh(dlogits.rows(), head->in_features());
    if (dh.rows() > 0) head->weight().matmul_t(dlogits, dh);
    return dh;
}

}  // namespace cpet::train
