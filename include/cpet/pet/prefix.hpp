// cpet/pet/prefix.hpp — prefix tuning (Li & Liang 2021, arXiv 2101.00190) and P-tuning v2 (Liu et al. 2022,
// arXiv 2110.07602): per-layer learned key / value rows [L, n_kv_heads·head_dim] every query attends to.
//
// Both are the attention hook; they differ in training, not in inference: prefix tuning trains the prefixes
// through a reparametrisation MLP (PEFT's PrefixEncoder with prefix_projection: embedding E [L, d_e] → Linear →
// tanh → Linear to all layers' keys and values), which `prefix_reparam::fold()` evaluates once so inference keeps
// only the per-layer rows; P-tuning v2 ("deep prompts") trains the rows directly. Prefix rows get no RoPE and
// work with bidirectional and causal attention; with a KV cache they are kept at the front of each sequence's
// cache and count against its capacity (nn/kv_cache.hpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <random>
#include <vector>

#include "cpet/core/eigen.hpp"
#include "cpet/pet/policy.hpp"

namespace cpet::pet {

enum class prefix_kind { prefix_tuning, p_tuning_v2 };

template <prefix_kind Kind = prefix_kind::prefix_tuning>
struct prefix_policy {
    static constexpr const char* name() noexcept {
        return Kind == prefix_kind::prefix_tuning ? "prefix_tuning" : "p_tuning_v2";
    }

    struct options {
        index_t length = 16;  ///< L, prefix rows per layer
    };

    struct modules {
        static constexpr hook_set hooks{hook::attention};
        Matrix<float> k, v;  ///< [L, kv_dim]; empty: no prefix

        std::optional<prefix_kv> prefix() const {
            if (k.empty()) return std::nullopt;
            return prefix_kv{k, v};
        }
        index_t length() const noexcept { return k.rows(); }
        /// Throws shape_error unless k and v are both [L, kv_dim] of the layer.
        void check_fits(const layer_dims& d, const char* who) const {
            if (k.empty() && v.empty()) return;
            require<shape_error>(k.cols() == d.kv_dim && v.rows() == k.rows() && v.cols() == d.kv_dim, who, ": ",
                                 name(), " expects k and v [L, ", d.kv_dim, "] (n_kv_heads·head_dim) for this layer, "
                                 "the module holds k ", shape_str(k.rows(), k.cols()), " and v ",
                                 shape_str(v.rows(), v.cols()));
        }
        /// Sets the rows (k and v [L, kv_dim], copied).
        void set(ConstMatrixView<float> keys, ConstMatrixView<float> values) {
            check_shape(keys, -1, -1, "prefix: keys");
            check_shape(values, keys.rows(), keys.cols(), "prefix: values");
            k = Matrix<float>(keys);
            v = Matrix<float>(values);
        }
        std::vector<parameter_group> parameters() const {
            if (k.empty()) return {};
            return {{"prefix_k", k.size()}, {"prefix_v", v.size()}};
        }
    };

    /// Random rows (seeded, U(-1, 1): the scale of projected keys / values of a unit-scale input).
    static modules make(const layer_dims& d, const options& o, std::uint64_t seed = 0) {
        require<shape_error>(d.kv_dim > 0, name(), ": layer_dims are not set");
        require<shape_error>(o.length >= 1, name(), ": prefix length must be >= 1, got ", o.length);
        modules m;
        m.k = Matrix<float>(o.length, d.kv_dim);
        m.v = Matrix<float>(o.length, d.kv_dim);
        std::mt19937_64 gen(seed);
        std::uniform_real_distribution<float> dist(-1.f, 1.f);
        for (index_t i = 0; i < m.k.size(); ++i) m.k.data()[i] = dist(gen);
        for (index_t i = 0; i < m.v.size(); ++i) m.v.data()[i] = dist(gen);
        return m;
    }
};

using prefix_tuning = prefix_policy<prefix_kind::prefix_tuning>;
using p_tuning_v2 = prefix_policy<prefix_kind::p_tuning_v2>;

static_assert(check_pet_policy<prefix_tuning>() && hooks_of<prefix_tuning>::attention);

/// The training-time reparametrisation of prefix tuning (PEFT's PrefixEncoder, prefix_projection = True):
///   P = tanh(E·W1ᵀ + b1)·W2ᵀ + b2,   E [L, d_e], W1 [hidden, d_e], W2 [n_layers·2·kv_dim, hidden]
/// Column block 2l of P (kv_dim wide) is layer l's keys, block 2l+1 its values (PEFT's past_key_values order).
struct prefix_reparam {
    Matrix<float> embedding;  ///< E [L, d_e]
    Matrix<float> w1;         ///< [hidden, d_e]
    std::vector<float> b1;    ///< [hidden]
    Matrix<float> w2;         ///< [n_layers·2·kv_dim, hidden]
    std::vector<float> b2;    ///< [n_layers·2·kv_dim]
    index_t n_layers = 0, kv_dim = 0;

    /// Random (seeded) parameters, Kaiming-uniform-like scales.
    static prefix_reparam random(index_t length, index_t d_e, index_t hidden, index_t n_layers, index_t kv_dim,
                                 std::uint64_t seed = 0) {
        require<shape_error>(length >= 1 && d_e >= 1 && hidden >= 1 && n_layers >= 1 && kv_dim >= 1,
                             "prefix_reparam: length (", length, "), d_e (", d_e, "), hidden (", hidden,
                             "), n_layers (", n_layers, ") and kv_dim (", kv_dim, ") must be >= 1");
        prefix_reparam r;
        r.n_layers = n_layers, r.kv_dim = kv_dim;
        std::mt19937_64 gen(seed);
        auto fill = [&](Matrix<float>& m, index_t rows, index_t cols, float a) {
            m = Matrix<float>(rows, cols);
            std::uniform_real_distribution<float> dist(-a, a);
            for (index_t i = 0; i < m.size(); ++i) m.data()[i] = dist(gen);
        };
        fill(r.embedding, length, d_e, 1.f);
        fill(r.w1, hidden, d_e, 1.f / std::sqrt(float(d_e)));
        fill(r.w2, n_layers * 2 * kv_dim, hidden, 1.f / std::sqrt(float(hidden)));
        r.b1.assign(std::size_t(hidden), 0.01f);
        r.b2.assign(std::size_t(n_layers * 2 * kv_dim), -0.01f);
        return r;
    }

    /// Evaluates the MLP once (in double) and splits it into per-layer prefixes: after this the MLP is not needed.
    template <class Policy = prefix_tuning>
    std::vector<typename Policy::modules> fold() const {
        const index_t L = embedding.rows(), hidden = w1.rows(), cols = n_layers * 2 * kv_dim;
        check_shape(w1.view(), -1, embedding.cols(), "prefix_reparam: w1");
        check_shape(w2.view(), cols, hidden, "prefix_reparam: w2");
        require<shape_error>(index_t(b1.size()) == hidden && index_t(b2.size()) == cols, "prefix_reparam: b1 has ",
                             b1.size(), " values (expected ", hidden, "), b2 ", b2.size(), " (expected ", cols, ")");
        using MD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
        MD h = as_eigen(embedding).cast<double>() * as_eigen(w1).cast<double>().transpose();
        for (index_t r = 0; r < L; ++r)
            for (index_t c = 0; c < hidden; ++c) h(r, c) = std::tanh(h(r, c) + b1[std::size_t(c)]);
        MD p = h * as_eigen(w2).cast<double>().transpose();
        for (index_t r = 0; r < L; ++r)
            for (index_t c = 0; c < cols; ++c) p(r, c) += b2[std::size_t(c)];
        std::vector<typename Policy::modules> out(static_cast<std::size_t>(n_layers));
        for (index_t l = 0; l < n_layers; ++l) {
            auto& m = out[std::size_t(l)];
            m.k = Matrix<float>(L, kv_dim);
            m.v = Matrix<float>(L, kv_dim);
            as_eigen(m.k) = p.middleCols(2 * l * kv_dim, kv_dim).cast<float>();
            as_eigen(m.v) = p.middleCols((2 * l + 1) * kv_dim, kv_dim).cast<float>();
        }
        return out;
    }

    index_t parameter_count() const noexcept {
        return embedding.size() + w1.size() + w2.size() + index_t(b1.size() + b2.size());
    }
};

}  // namespace cpet::pet
