// cpet/nn/attention.hpp — the attention sublayer: q, k, v projections, RoPE, masked MHA / GQA, o projection.
//
//   q = h·Wqᵀ (+bq), k = h·Wkᵀ (+bk), v = h·Wvᵀ (+bv)   (a PET linear hook may add s·U·Bᵀ to each)
//   [RoPE on q and k at absolute positions]
//   a_b = softmax(q_b·k_bᵀ/√d_h + mask)·v_b per sequence b (keys = [prefix;] cached keys + its own tokens)
//   out = a·Woᵀ (+bo) (+ residual, fused into the o GEMM's epilogue)
#pragma once

#include <algorithm>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpet/compress/calibration.hpp"
#include "cpet/compress/policy.hpp"
#include "cpet/core/parallel.hpp"
#include "cpet/kernels/attention.hpp"
#include "cpet/kernels/rope.hpp"
#include "cpet/nn/batch.hpp"
#include "cpet/nn/config.hpp"
#include "cpet/nn/kv_cache.hpp"
#include "cpet/nn/linear.hpp"
#include "cpet/nn/weights.hpp"
#include "cpet/nn/workspace.hpp"
#include "cpet/pet/policy.hpp"

namespace cpet::nn {

template <LayerConfig C>
class Attention {
public:
    using format = typename C::compression::format;
    static constexpr bool causal = C::mask == attention_mask::causal;

    Attention() = default;
    /// `in_stats` describes the input of q/k/v, `o_stats` that of o (either may be null).
    Attention(const dense_layer_weights& w, const layer_shape& s, const compress::calibration* in_stats,
              const compress::calibration* o_stats)
        : shape_(s),
          q_(C::compression::compress(w.wq, in_stats), w.bq, "dense_layer_weights.bq"),
          k_(C::compression::compress(w.wk, in_stats), w.bk, "dense_layer_weights.bk"),
          v_(C::compression::compress(w.wv, in_stats), w.bv, "dense_layer_weights.bv"),
          o_(C::compression::compress(w.wo, o_stats), w.bo, "dense_layer_weights.bo") {}
    /// From built projections (a layer read back from a file): q [q_dim, d_model], k and v [kv_dim, d_model],
    /// o [d_model, q_dim] as `s` gives them, with biases when the config has them (a part may carry one the config
    /// lacks: bias compensation of a pruned layer); shape_error naming the part otherwise.
    Attention(const layer_shape& s, Linear<format> q, Linear<format> k, Linear<format> v, Linear<format> o)
        : shape_(s), q_(std::move(q)), k_(std::move(k)), v_(std::move(v)), o_(std::move(o)) {
        check_part(q_, s.q_dim(), s.d_model, "q", "[q_dim, d_model]");
        check_part(k_, s.kv_dim(), s.d_model, "k", "[kv_dim, d_model]");
        check_part(v_, s.kv_dim(), s.d_model, "v", "[kv_dim, d_model]");
        check_part(o_, s.d_model, s.q_dim(), "o", "[d_model, q_dim]");
    }

    const Linear<format>& q() const noexcept { return q_; }
    const Linear<format>& k() const noexcept { return k_; }
    const Linear<format>& v() const noexcept { return v_; }
    const Linear<format>& o() const noexcept { return o_; }
    std::size_t bytes() const noexcept { return q_.bytes() + k_.bytes() + v_.bytes() + o_.bytes(); }

    /// Checks what `forward` will need from a task's attention hook; returns the prefix length. (Modules that
    /// differ per sequence have one per sequence: prefix_rows_of.)
    template <class Modules>
    index_t prefix_rows(const Modules& m) const {
        static_assert(!SequenceTasks<Modules>, "cpet Attention::prefix_rows: these modules differ per sequence; ask "
                                               "prefix_rows_of(modules, b) for sequence b");
        if constexpr (pet::uses_hook<Modules, pet::hook::attention>) {
            if (auto p = m.prefix()) {
                check_shape(p->k, -1, shape_.kv_dim(), "PET attention hook: prefix k");
                check_shape(p->v, p->k.rows(), shape_.kv_dim(), "PET attention hook: prefix v");
                return p->k.rows();
            }
        }
        return 0;
    }
    /// The prefix rows sequence b starts with (its own task's where the modules differ per sequence).
    template <class Modules>
    index_t prefix_rows_of(const Modules& m, index_t b) const {
        if constexpr (SequenceTasks<Modules>) {
            const auto* t = m.task_of(b);
            return t ? prefix_rows(*t) : 0;
        } else {
            (void)b;
            return prefix_rows(m);
        }
    }

    /// out [M, d] = o(attention(h)) (+ residual [M, d] with row stride ld_res when non-null; it may alias out).
    /// With a cache, sequence b's new tokens sit at positions cache.tokens(b) + t; their keys and values (and a
    /// starting sequence's prefix rows) are written into the cache's free rows, which the caller then commits
    /// (TransformerLayer::commit): the cache's lengths do not change here, so a call that fails later (in this
    /// layer or a later one of a stack) leaves every cache as it was. Unchecked: the layer checked shapes,
    /// lengths and cache room.
    template <class Arch, class Modules>
    void forward(Arch tag, ConstMatrixView<float> h, const batch_layout& L, MatrixView<float> out,
                 const float* residual, index_t ld_res, workspace& ws, const Modules& m, kv_cache* cache) const {
        const index_t M = h.rows(), S = L.seq_len, B = L.batch;
        const index_t qd = shape_.q_dim(), kvd = shape_.kv_dim(), hd = shape_.head_dim;
        auto& ps = ws.pet_scratch();
        auto q = ws.get(workspace::q, M, qd);
        auto k = ws.get(workspace::k, M, kvd);
        auto v = ws.get(workspace::v, M, kvd);
        detail::project(tag, q_, pet::target::q, h, q, {}, m, ps);
        detail::project(tag, k_, pet::target::k, h, k, {}, m, ps);
        detail::project(tag, v_, pet::target::v, h, v, {}, m, ps);

        // the prefix every sequence sees, or (modules that differ per sequence) sequence b's own task's
        std::optional<pet::prefix_kv> common;
        if constexpr (pet::uses_hook<Modules, pet::hook::attention>) common = m.prefix();
        auto prefix_of = [&](index_t b) -> std::optional<pet::prefix_kv> {
            if constexpr (SequenceTasks<Modules>) {
                using T = std::decay_t<decltype(*m.task_of(b))>;
                if constexpr (pet::uses_hook<T, pet::hook::attention>)
                    if (const auto* t = m.task_of(b)) return t->prefix();
                return std::nullopt;
            } else {
                (void)b;
                return common;
            }
        };
        index_t P_max = common ? common->k.rows() : 0;
        if constexpr (SequenceTasks<Modules>)
            for (index_t b = 0; b < B; ++b)
                if (auto p = prefix_of(b)) P_max = std::max(P_max, p->k.rows());
        const index_t keys_max = P_max + S;
        MatrixView<float> kcat, vcat;
        if (P_max > 0 && !cache) {  // with a cache the prefix lives at the front of it (see kv_cache.hpp)
            kcat = ws.get(workspace::prefix_k, B * keys_max, kvd);
            vcat = ws.get(workspace::prefix_v, B * keys_max, kvd);
        }

        auto a = ws.get(workspace::attn, M, qd);
        parallel_for(index_t(0), B, [&](index_t b) {
            const index_t len = L.length(b);
            const std::optional<pet::prefix_kv> prefix = prefix_of(b);
            const index_t P = prefix ? prefix->k.rows() : 0;
            const bool starts = cache && P > 0 && cache->length(b) == 0;
            if (starts) {  // the prefix goes to the front of the cache (committed with the tokens)
                auto K = cache->keys(b), V = cache->values(b);
                copy_rows(prefix->k, K.middle_rows(0, P));
                copy_rows(prefix->v, V.middle_rows(0, P));
            }
            const index_t pos0 = cache ? cache->tokens(b) : 0;                     // position of the first new token
            const index_t row0 = cache ? (starts ? P : cache->length(b)) : 0;     // its row in the cache
            auto qb = q.middle_rows(b * S, S);
            auto kb = k.middle_rows(b * S, len);
            auto vb = v.middle_rows(b * S, len);
            if constexpr (C::rope) {
                kernels::rope(tag, qb.middle_rows(0, len), shape_.n_heads, hd, pos0, shape_.rope_base, shape_.rope);
                kernels::rope(tag, kb, shape_.n_kv_heads, hd, pos0, shape_.rope_base, shape_.rope);
            }
            ConstMatrixView<float> keys = kb, values = vb;
            if (cache) {
                auto K = cache->keys(b), V = cache->values(b);
                copy_rows(kb, K.middle_rows(row0, len));
                copy_rows(vb, V.middle_rows(row0, len));
                keys = K.middle_rows(0, row0 + len);
                values = V.middle_rows(0, row0 + len);
            } else if (P > 0) {
                const index_t n = P + keys.rows();
                auto kc = kcat.middle_rows(b * keys_max, n), vc = vcat.middle_rows(b * keys_max, n);
                copy_rows(prefix->k, kc.middle_rows(0, P));
                copy_rows(prefix->v, vc.middle_rows(0, P));
                copy_rows(keys, kc.middle_rows(P, keys.rows()));
                copy_rows(values, vc.middle_rows(P, keys.rows()));
                keys = kc;
                values = vc;
            }
            kernels::attention_args args;
            args.q = qb;
            args.k = keys;
            args.v = values;
            args.out = a.middle_rows(b * S, S);
            args.n_heads = shape_.n_heads;
            args.n_kv_heads = shape_.n_kv_heads;
            args.head_dim = hd;
            args.causal = causal;
            args.q_pos0 = cache ? row0 : P;  // keys before the first query: prefix rows and cached tokens
            kernels::attention(tag, args);
        });

        kernels::epilogue ep;
        ep.residual = residual;
        ep.ld_residual = ld_res;
        detail::project(tag, o_, pet::target::o, a, out, ep, m, ps);
    }

private:
    static void check_part(const Linear<format>& l, index_t out, index_t in, const char* name, const char* dims) {
        require<shape_error>(l.out_features() == out && l.in_features() == in, "Attention: part ", name, " is [",
                             l.out_features(), ", ", l.in_features(), "], expected ", dims, " = [", out, ", ", in, "]");
        require<shape_error>(!C::bias || l.bias(), "Attention: part ", name,
                             " has no bias; the layer configuration has biases on every linear");
    }
    static void copy_rows(ConstMatrixView<float> from, MatrixView<float> to) noexcept {
        for (index_t r = 0; r < from.rows(); ++r) {
            const float* s = from.row(r);
            float* d = to.row(r);
            for (index_t c = 0; c < from.cols(); ++c) d[c] = s[c];
        }
    }

    layer_shape shape_;
    Linear<format> q_, k_, v_, o_;
};

}  // namespace cpet::nn
