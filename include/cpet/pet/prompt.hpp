// cpet/pet/prompt.hpp — prompt tuning (Lester et al. 2021, arXiv 2104.08691): P learned soft tokens put before
// every sequence's embeddings (the input hook). Only the first layer's modules carry tokens; nn::Stack::forward
// puts them before each sequence, runs the stack on P + S rows and returns the real tokens' rows. nn::Stack::decode
// puts them before a sequence once, when it starts (no tokens cached yet), and the KV cache keeps them as the
// sequence's first P tokens. pet::prepend_virtual_tokens builds [tokens; x] for callers below the stack (a single
// TransformerLayer, or a reference).
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "cpet/pet/policy.hpp"

namespace cpet::pet {

struct prompt_tuning {
    static constexpr const char* name() noexcept { return "prompt_tuning"; }

    struct options {
        index_t length = 20;  ///< P virtual tokens
    };

    struct modules {
        static constexpr hook_set hooks{hook::input};
        Matrix<float> tokens;  ///< [P, d_model]; empty: none (every layer but the first)

        ConstMatrixView<float> virtual_tokens() const noexcept { return tokens; }
        /// Throws shape_error unless the tokens are [P, d_model] of the layer.
        void check_fits(const layer_dims& d, const char* who) const {
            require<shape_error>(tokens.empty() || tokens.cols() == d.d_model, who, ": prompt_tuning expects tokens "
                                 "[P, ", d.d_model, "] (d_model) for this layer, the module holds ",
                                 shape_str(tokens.rows(), tokens.cols()));
        }
        void set(ConstMatrixView<float> t) {
            check_shape(t, -1, -1, "prompt_tuning: tokens");
            tokens = Matrix<float>(t);
        }
        std::vector<parameter_group> parameters() const {
            if (tokens.empty()) return {};
            return {{"prompt_embeddings", tokens.size()}};
        }
    };

    /// Random tokens, U(-0.5, 0.5) (seeded): the first layer's modules; other layers take modules{}.
    static modules make(const layer_dims& d, const options& o, std::uint64_t seed = 0) {
        require<shape_error>(d.d_model > 0, name(), ": layer_dims are not set");
        require<shape_error>(o.length >= 1, name(), ": prompt length must be >= 1, got ", o.length);
        modules m;
        m.tokens = Matrix<float>(o.length, d.d_model);
        std::mt19937_64 gen(seed);
        std::uniform_real_distribution<float> dist(-0.5f, 0.5f);
        for (index_t i = 0; i < m.tokens.size(); ++i) m.tokens.data()[i] = dist(gen);
        return m;
    }
};

static_assert(check_pet_policy<prompt_tuning>() && hooks_of<prompt_tuning>::input);

/// [tokens; x_b] for every sequence b of a padded batch x [B·S, d]: out [B·(P+S), d] and lengths + P.
inline void prepend_virtual_tokens(ConstMatrixView<float> x, std::span<const index_t> lengths,
                                   ConstMatrixView<float> tokens, Matrix<float>& out, std::vector<index_t>& out_lengths) {
    const index_t B = index_t(lengths.size()), P = tokens.rows();
    require<shape_error>(B > 0 && x.rows() % B == 0, "prepend_virtual_tokens: x has ", x.rows(),
                         " rows, not a multiple of the ", B, " sequences");
    check_shape(tokens, -1, x.cols(), "prepend_virtual_tokens: tokens");
    const index_t S = x.rows() / B, d = x.cols();
    out = Matrix<float>(B * (S + P), d);
    out_lengths.assign(lengths.begin(), lengths.end());
    for (index_t b = 0; b < B; ++b) {
        out_lengths[std::size_t(b)] += P;
        for (index_t r = 0; r < P; ++r)
            for (index_t c = 0; c < d; ++c) out(b * (S + P) + r, c) = tokens(r, c);
        for (index_t r = 0; r < S; ++r)
            for (index_t c = 0; c < d; ++c) out(b * (S + P) + P + r, c) = x(b * S + r, c);
    }
}

}  // namespace cpet::pet
