// tests/train/model_testing.hpp — tiny random models and token batches the model-level train/ tests share.
#pragma once

#include <cstdint>
#include <random>
#include <utility>
#include <vector>

#include "cpet/nn/model.hpp"
#include "support/testing.hpp"

namespace cpet::testing {

/// d 12, 4 query heads of 4 on `kv_heads` KV heads, d_ff 20.
inline nn::layer_shape tiny_shape(index_t kv_heads) {
    nn::layer_shape s;
    s.d_model = 12, s.n_heads = 4, s.n_kv_heads = kv_heads, s.head_dim = 4, s.d_ff = 20, s.eps = 1e-6f;
    return s;
}

/// Random weights of a `layers`-layer model: LLaMA-style (a final RMSNorm, the LM head tied to the embeddings) or
/// BERT-style (positions and an embedding LayerNorm).
template <class C>
nn::model_weights tiny_model(const nn::layer_shape& s, index_t layers, index_t vocab, bool llama, unsigned seed) {
    nn::model_weights w;
    w.shape = s;
    for (index_t l = 0; l < layers; ++l) w.layers.push_back(nn::random_layer_weights(s, seed + unsigned(l), nn::kind_of<C>));
    w.embeddings.word = random_matrix(vocab, s.d_model, seed + 100);
    if (llama) {
        w.final_norm_gamma.assign(std::size_t(s.d_model), 1.1f);
        w.lm_head_tied = true;
    } else {
        w.embeddings.position = random_matrix(16, s.d_model, seed + 101, -0.1f, 0.1f);
        w.embeddings.norm_gamma.assign(std::size_t(s.d_model), 1.f);
        w.embeddings.norm_beta.assign(std::size_t(s.d_model), 0.f);
    }
    return w;
}

/// Random token ids for sequences of `lengths`, padded to S.
inline nn::token_batch tiny_batch(index_t vocab, std::vector<index_t> lengths, index_t S, unsigned seed) {
    nn::token_batch t;
    t.lengths = std::move(lengths);
    t.seq_len = S;
    std::mt19937 gen(seed);
    for (index_t i = 0; i < t.batch() * S; ++i) t.ids.push_back(std::int32_t(gen() % unsigned(vocab)));
    return t;
}

}  // namespace cpet::testing
