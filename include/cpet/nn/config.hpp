// cpet/nn/config.hpp — what a Transformer layer is made of: compile-time policies (Config) and runtime sizes
// (layer_shape).
//
// Choices that change the code are types / constants of a Config: where the norms sit, which norm, which FFN and
// activation, the attention mask, RoPE, biases and the compression policy. Sizes are values. PET methods are
// NOT part of a Config: the backbone's type names its architecture and compression only, and a task's modules
// (any pet:: modules type, or a run-time pet::task holding any methods) are an argument of each call, so tasks
// of every kind run on one backbone object.
//   post-LN (BERT):    h = LN1(x + Attn(x));        y = LN2(h + FFN(h))
//   pre-LN (LLaMA, T5, GPT-2): h = x + Attn(N1(x)); y = h + FFN(N2(h))
#pragma once

#include <concepts>
#include <type_traits>

#include "cpet/compress/dense.hpp"
#include "cpet/compress/policy.hpp"
#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/kernels/activations.hpp"
#include "cpet/kernels/rope.hpp"

namespace cpet::nn {

enum class norm_placement { post, pre };
enum class norm_kind { layernorm, rmsnorm };
/// mlp: down(act(up·x + b_up)) + b_down;  swiglu: down(silu(gate·x) ⊙ (up·x)) (Shazeer 2020, LLaMA).
enum class ffn_kind { mlp, swiglu };
enum class attention_mask { bidirectional, causal };

/// Which tensors a layer's weights hold (used by random_layer_weights and the weight checks).
struct layer_kind {
    norm_kind norm = norm_kind::layernorm;
    ffn_kind ffn = ffn_kind::mlp;
    bool bias = true;  ///< q, k, v, o, up, down carry biases (BERT, GPT-2); LLaMA has none
};

/// Runtime sizes of one layer.
struct layer_shape {
    index_t d_model = 0;
    index_t n_heads = 0;
    index_t n_kv_heads = 0;  ///< == n_heads for MHA, a divisor of it for GQA, 1 for MQA
    index_t head_dim = 0;
    index_t d_ff = 0;
    float eps = 1e-5f;           ///< norm epsilon (BERT 1e-12, LLaMA 1e-5 / 1e-6)
    float rope_base = 10000.f;   ///< RoPE θ base
    kernels::rope_style rope = kernels::rope_style::half;

    index_t q_dim() const noexcept { return n_heads * head_dim; }
    index_t kv_dim() const noexcept { return n_kv_heads * head_dim; }

    /// Throws shape_error when the sizes cannot describe a layer.
    void validate() const {
        require<shape_error>(d_model > 0 && n_heads > 0 && n_kv_heads > 0 && head_dim > 0 && d_ff > 0,
                             "layer_shape: d_model (", d_model, "), n_heads (", n_heads, "), n_kv_heads (", n_kv_heads,
                             "), head_dim (", head_dim, ") and d_ff (", d_ff, ") must be positive");
        require<shape_error>(n_heads % n_kv_heads == 0, "layer_shape: n_heads (", n_heads,
                             ") must be a multiple of n_kv_heads (", n_kv_heads, ")");
        require<shape_error>(eps >= 0.f, "layer_shape: eps must be >= 0, got ", eps);
    }
};

/// A layer configuration: the constants below plus `compression` (a CompressionPolicy).
template <class C>
concept LayerConfig = requires {
    { C::placement } -> std::convertible_to<norm_placement>;
    { C::norm } -> std::convertible_to<norm_kind>;
    { C::ffn } -> std::convertible_to<ffn_kind>;
    { C::act } -> std::convertible_to<kernels::activation>;
    { C::mask } -> std::convertible_to<attention_mask>;
    { C::rope } -> std::convertible_to<bool>;
    { C::bias } -> std::convertible_to<bool>;
    typename C::compression;
} && compress::CompressionPolicy<typename C::compression>;

template <LayerConfig C>
inline constexpr layer_kind kind_of{C::norm, C::ffn, C::bias};

}  // namespace cpet::nn

namespace cpet::config {

/// The general configuration; the named ones below are aliases of it. `Act` is the MLP activation (SwiGLU
/// always gates with SiLU).
template <nn::norm_placement Placement, nn::norm_kind Norm, nn::ffn_kind Ffn, kernels::activation Act,
          nn::attention_mask Mask, bool Rope, bool Bias, class Compression = compress::dense>
struct layer {
    static constexpr nn::norm_placement placement = Placement;
    static constexpr nn::norm_kind norm = Norm;
    static constexpr nn::ffn_kind ffn = Ffn;
    static constexpr kernels::activation act = Ffn == nn::ffn_kind::swiglu ? kernels::activation::silu : Act;
    static constexpr nn::attention_mask mask = Mask;
    static constexpr bool rope = Rope;
    static constexpr bool bias = Bias;
    using compression = Compression;
    static_assert(compress::check_compression_policy<Compression>());
};

/// BERT / RoBERTa encoder layer: post-LN LayerNorm, GELU (erf) MLP, bidirectional, biases, no RoPE.
template <class Compression = compress::dense>
using bert = layer<nn::norm_placement::post, nn::norm_kind::layernorm, nn::ffn_kind::mlp, kernels::activation::gelu_erf,
                   nn::attention_mask::bidirectional, false, true, Compression>;

/// LLaMA decoder layer: pre-LN RMSNorm, SwiGLU, causal, RoPE, no biases (GQA through layer_shape::n_kv_heads).
template <class Compression = compress::dense>
using llama = layer<nn::norm_placement::pre, nn::norm_kind::rmsnorm, nn::ffn_kind::swiglu, kernels::activation::silu,
                    nn::attention_mask::causal, true, false, Compression>;

/// GPT-2 decoder layer: pre-LN LayerNorm, GELU (tanh) MLP, causal, biases, no RoPE.
template <class Compression = compress::dense>
using gpt2 = layer<nn::norm_placement::pre, nn::norm_kind::layernorm, nn::ffn_kind::mlp, kernels::activation::gelu_tanh,
                   nn::attention_mask::causal, false, true, Compression>;

}  // namespace cpet::config
