// cpet/nn/layer.hpp — TransformerLayer<Config>: norms, attention and FFN composed by the Config's policies.
//
//   post-LN (BERT):  t = x + Attn(x);  h = N1(t);  y = N2(h + FFN(h))
//   pre-LN (LLaMA):  t = x + Attn(N1(x));          y = t + FFN(N2(t))
// Residual adds ride in the o and down GEMMs' epilogues, bias + activation in the up (or gate) GEMM. When the PET
// policy has a sublayer hook the hook sees the sublayer output before the residual, so that add becomes a
// separate pass. The backbone is const: every call takes a workspace (per caller) and the task's PET modules —
// any modules type (pet::lora::modules, a pet::stack's, a run-time pet::task of any methods), so the layer's type
// names architecture and compression only and one layer object serves tasks of every kind. A call checks the
// task against the layer once, at its entry (check_task); the kernels below trust it.
// A layer is built by compressing dense weights through the Config's policy, or from built parts (layer_parts:
// the packed linears and norms as they are, e.g. read back from a cpet backbone file by io/backbone_file.hpp).
#pragma once

#include <concepts>
#include <optional>
#include <span>
#include <type_traits>
#include <utility>

#include "cpet/arch/dispatch.hpp"
#include "cpet/compress/calibration.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/nn/attention.hpp"
#include "cpet/nn/batch.hpp"
#include "cpet/nn/config.hpp"
#include "cpet/nn/ffn.hpp"
#include "cpet/nn/kv_cache.hpp"
#include "cpet/nn/norm.hpp"
#include "cpet/nn/weights.hpp"
#include "cpet/nn/workspace.hpp"
#include "cpet/pet/none.hpp"
#include "cpet/pet/policy.hpp"

namespace cpet::nn {

/// Calibration statistics of a layer, one per input site (q/k/v share theirs, as do up/gate): a single
/// compress::calibration could not serve them all since the sites differ in width (d_model, q_dim, d_ff).
struct layer_calibration {
    compress::calibration attention_in;  ///< input of q, k, v  [d_model channels]
    compress::calibration o_in;          ///< input of o        [q_dim]
    compress::calibration ffn_in;        ///< input of up, gate [d_model]
    compress::calibration down_in;       ///< input of down     [d_ff]
};

/// A layer's built parts, which TransformerLayer(parts, shape) assembles as they are, compressing nothing (io/
/// reads a stored backbone into these). `gate` only for SwiGLU configs.
template <LayerConfig C>
struct layer_parts {
    using linear = Linear<typename C::compression::format>;
    linear q, k, v, o, up, down;
    std::optional<linear> gate;
    Norm<C::norm> norm1, norm2;
};

template <LayerConfig C>
class TransformerLayer {
public:
    using config = C;
    using compression = typename C::compression;
    using format = typename compression::format;
    static constexpr bool causal = C::mask == attention_mask::causal;

    TransformerLayer() = default;
    /// Compresses each linear of `w` through the Config's compression policy (with `stats` when given).
    TransformerLayer(const dense_layer_weights& w, const layer_shape& s, const layer_calibration* stats = nullptr)
        : shape_(checked(w, s)),
          norm1_(w.norm1_gamma, w.norm1_beta, s.eps),
          norm2_(w.norm2_gamma, w.norm2_beta, s.eps),
          attn_(w, s, stats ? &stats->attention_in : nullptr, stats ? &stats->o_in : nullptr),
          ffn_(w, s, stats ? &stats->ffn_in : nullptr, stats ? &stats->down_in : nullptr) {}
    /// From built parts, each of the shape `s` gives it (a pruned layer's `s` is its own, smaller shape): the
    /// linears as Attention's and FFN's part constructors check them, the norms with d_model features, a β for
    /// LayerNorm and s.eps as their epsilon. shape_error naming the part otherwise.
    TransformerLayer(layer_parts<C> p, const layer_shape& s)
        : shape_(checked(s)),
          norm1_(checked_norm(std::move(p.norm1), s, "norm1")),
          norm2_(checked_norm(std::move(p.norm2), s, "norm2")),
          attn_(s, std::move(p.q), std::move(p.k), std::move(p.v), std::move(p.o)),
          ffn_(s, std::move(p.up), std::move(p.gate), std::move(p.down)) {}

    const layer_shape& shape() const noexcept { return shape_; }
    const Attention<C>& attention() const noexcept { return attn_; }
    const FFN<C>& ffn() const noexcept { return ffn_; }
    const Norm<C::norm>& norm1() const noexcept { return norm1_; }
    const Norm<C::norm>& norm2() const noexcept { return norm2_; }
    /// Bytes of the packed weights, biases excluded from nothing (norm parameters not counted).
    std::size_t bytes() const noexcept { return attn_.bytes() + ffn_.bytes(); }

    /// y [B·S, d] = layer(x [B·S, d]) for B = lengths.size() sequences padded to S rows each (see batch.hpp).
    /// y may be x (in place). Padded rows of y are zero. The ISA used is recorded in ws.last_isa(). `task`: one
    /// layer's PET modules of any kind (none: the bare backbone).
    template <class Task>
    void forward(ConstMatrixView<float> x, std::span<const index_t> lengths, MatrixView<float> y, workspace& ws,
                 const Task& task) const {
        const auto L = check_call(x, lengths, y, "TransformerLayer::forward");
        check_task(task, "TransformerLayer::forward");
        arch::dispatch([&](auto tag) { forward_on(tag, x, L, y, ws, task, nullptr); });
    }
    void forward(ConstMatrixView<float> x, std::span<const index_t> lengths, MatrixView<float> y, workspace& ws) const {
        forward(x, lengths, y, ws, pet::none::modules{});
    }

    /// Incremental (causal) forward: sequence b's first new_lengths[b] rows are new tokens at positions
    /// cache.length(b), cache.length(b)+1, ...; their keys and values are appended to `cache`. Prefill is decode
    /// on an empty cache; a decode step is S = 1. Throws shape_error (before changing anything) when a sequence
    /// would exceed the cache's capacity.
    template <class Task>
    void decode(ConstMatrixView<float> x, std::span<const index_t> new_lengths, MatrixView<float> y, kv_cache& cache,
                workspace& ws, const Task& task) const
        requires causal
    {
        const auto L = check_call(x, new_lengths, y, "TransformerLayer::decode");
        check_task(task, "TransformerLayer::decode");
        const auto P = [&](index_t b) { return attn_.prefix_rows_of(task, b); };
        check_cache(cache, L, "TransformerLayer::decode", P);
        arch::dispatch([&](auto tag) { forward_on(tag, x, L, y, ws, task, &cache); });
        commit(cache, L, P);  // only once the whole layer ran: an exception above leaves the cache as it was
    }
    void decode(ConstMatrixView<float> x, std::span<const index_t> new_lengths, MatrixView<float> y, kv_cache& cache,
                workspace& ws) const
        requires causal
    {
        decode(x, new_lengths, y, cache, ws, pet::none::modules{});
    }

    /// A cache sized for this layer.
    kv_cache make_cache(index_t batch, index_t capacity) const { return kv_cache(batch, capacity, shape_.kv_dim()); }

    // ---- for Stack and tests: checks done once per call, then the unchecked body on one path ----

    /// Checks x, y and lengths; `who` prefixes the messages, which name the operand ("...: x: expected shape").
    batch_layout check_call(ConstMatrixView<float> x, std::span<const index_t> lengths, MatrixView<float> y,
                            const char* who) const {
        try {
            check_shape(x, -1, shape_.d_model, "x");
            check_shape(y, x.rows(), shape_.d_model, "y");
        } catch (const shape_error& e) {
            throw shape_error(cpet::detail::concat(who, ": ", e.what()));
        }
        return batch_layout::of(x.rows(), lengths, who);
    }
    /// Checks once, before anything runs, that the task's modules fit this layer: every module's shapes
    /// (check_fits against pet_dims()), the prefix rows, and the norm hook (BitFit's Δβ: only a LayerNorm has a β).
    /// `virtual_tokens_allowed`: only the first layer of a Stack may carry prompt-tuning tokens (the stack puts
    /// them before each sequence); a single layer's forward or decode, or a later stack layer, refuses them
    /// rather than silently ignoring them.
    /// Modules that differ per sequence (SequenceTasks) are checked as each of their tasks.
    template <class Task>
    void check_task(const Task& m, const char* who, bool virtual_tokens_allowed = false) const {
        static_assert(pet::check_modules<Task>(), "cpet TransformerLayer: the task's modules type is not usable");
        if constexpr (pet::FitsCheck<Task>) m.check_fits(pet_dims(), who);
        if constexpr (SequenceTasks<Task>) {
            for (const auto& r : m.runs())
                if (r.task) check_task(*r.task, who, virtual_tokens_allowed);
            return;
        } else {
            (void)attn_.prefix_rows(m);
        }
        if constexpr (pet::uses_hook<Task, pet::hook::input>) {
            const ConstMatrixView<float> vt = m.virtual_tokens();
            require<shape_error>(virtual_tokens_allowed || vt.rows() == 0, who, ": the task carries ", vt.rows(),
                                 " virtual tokens (PET input hook, prompt tuning) where none can be applied: a model "
                                 "front end puts them before the sequence (nn::Stack does, from layer 0's modules; "
                                 "for a single layer use pet::prepend_virtual_tokens), later layers take none");
            if (vt.rows() > 0)
                check_shape(vt, -1, shape_.d_model, cpet::detail::concat(who, ": PET input hook (virtual tokens)").c_str());
        }
        if constexpr (pet::uses_hook<Task, pet::hook::norm>) {
            for (int i = 0; i < pet::norm_site_count; ++i) {
                const auto n = pet::norm_site(i);
                if (auto db = m.norm_bias_delta(n)) {
                    require<shape_error>(C::norm == norm_kind::layernorm, who, ": the task tunes the β of ",
                                         pet::norm_site_name(n), " (PET norm hook), but the layer's norms are RMSNorm, "
                                         "which have no β");
                    require<shape_error>(index_t(db->size()) == shape_.d_model, who, ": PET norm hook (",
                                         pet::norm_site_name(n), "): expected ", shape_.d_model, " values, got ",
                                         db->size());
                }
            }
        } else {
            (void)m, (void)who;
        }
    }
    /// `prefix`: rows of the task's attention-hook prefix, which a sequence's cache takes when it starts.
    void check_cache(const kv_cache& cache, const batch_layout& L, const char* who, index_t prefix = 0) const {
        check_cache(cache, L, who, [prefix](index_t) { return prefix; });
    }
    /// The same with `prefix(b)` the prefix rows of sequence b (tasks that differ per sequence).
    template <class PrefixOf>
        requires std::invocable<const PrefixOf&, index_t>
    void check_cache(const kv_cache& cache, const batch_layout& L, const char* who, const PrefixOf& prefix_of) const {
        require<shape_error>(cache.batch() == L.batch, who, ": kv_cache holds ", cache.batch(),
                             " sequences, the batch has ", L.batch);
        require<shape_error>(cache.kv_dim() == shape_.kv_dim(), who, ": kv_cache rows have ", cache.kv_dim(),
                             " values, the layer's keys have ", shape_.kv_dim(), " (n_kv_heads·head_dim)");
        for (index_t b = 0; b < L.batch; ++b) {
            const index_t prefix = prefix_of(b);
            if (cache.length(b) == 0) {
                require<shape_error>(prefix + L.length(b) <= cache.capacity(), who, ": the task's prefix of ", prefix,
                                     " rows plus ", L.length(b), " new tokens of sequence ", b,
                                     " exceed the kv_cache capacity of ", cache.capacity(),
                                     " rows (the prefix is kept in the cache)");
            } else {
                require<shape_error>(cache.prefix_length(b) == prefix, who, ": kv_cache sequence ", b, " holds a prefix of ",
                                     cache.prefix_length(b), " rows, the task's prefix has ", prefix,
                                     " (a sequence keeps the task it started with; clear or truncate it to 0)");
                cache.check_room(b, L.length(b));
            }
        }
    }

    /// Makes the rows a call wrote into `cache` part of it: a sequence that started takes its prefix, then every
    /// sequence its new tokens. Separate from forward_on so a Stack commits all its layers' caches only after
    /// the last layer ran, and a failed call changes no cache.
    static void commit(kv_cache& cache, const batch_layout& L, index_t prefix) {
        commit(cache, L, [prefix](index_t) { return prefix; });
    }
    /// The same with `prefix(b)` the prefix rows of sequence b.
    template <class PrefixOf>
        requires std::invocable<const PrefixOf&, index_t>
    static void commit(kv_cache& cache, const batch_layout& L, const PrefixOf& prefix_of) {
        for (index_t b = 0; b < L.batch; ++b) {
            const index_t prefix = prefix_of(b);
            if (prefix > 0 && cache.length(b) == 0) cache.set_prefix(b, prefix);
            cache.advance(b, L.length(b));
        }
    }

    /// What PET factories need to know of this layer (pet::layer_dims).
    pet::layer_dims pet_dims() const noexcept {
        pet::layer_dims d;
        d.d_model = shape_.d_model;
        d.q_dim = shape_.q_dim();
        d.kv_dim = shape_.kv_dim();
        d.d_ff = shape_.d_ff;
        d.gated = C::ffn == ffn_kind::swiglu;
        d.bias = C::bias;
        d.norm_bias = C::norm == norm_kind::layernorm;
        return d;
    }

    template <class Arch, class Task>
    void forward_on(Arch tag, ConstMatrixView<float> x, const batch_layout& L, MatrixView<float> y, workspace& ws,
                    const Task& m, kv_cache* cache) const {
        ws.set_last_isa(arch::isa_of<Arch>());
        const index_t M = x.rows(), d = shape_.d_model;
        if (M == 0) return;
        const bool hook = pet::active_hook<pet::hook::sublayer>(m);
        auto& ps = ws.pet_scratch();
        // the sublayer hook, compiled only where the modules declare it
        auto sublayer = [&](pet::sublayer w, ConstMatrixView<float> in, MatrixView<float> out) {
            if constexpr (pet::uses_hook<Task, pet::hook::sublayer>) m.sublayer(w, in, out, ps);
            else (void)w, (void)in, (void)out;
        };
        auto h = ws.get(workspace::normed, M, d);
        if constexpr (C::placement == norm_placement::post) {
            auto t = ws.get(workspace::sub, M, d);
            if (hook) {
                attn_.forward(tag, x, L, t, nullptr, 0, ws, m, cache);
                sublayer(pet::sublayer::attention, x, t);
                detail::add_inplace(t, x);
            } else {
                attn_.forward(tag, x, L, t, x.data(), x.stride(), ws, m, cache);
            }
            norm(tag, norm1_, pet::norm_site::norm1, t, h, m, ps);
            if (hook) {
                ffn_.forward(tag, h, t, nullptr, 0, ws, m);
                sublayer(pet::sublayer::ffn, h, t);
                detail::add_inplace(t, h);
            } else {
                ffn_.forward(tag, h, t, h.data(), h.stride(), ws, m);
            }
            norm(tag, norm2_, pet::norm_site::norm2, t, y, m, ps);
        } else {
            norm(tag, norm1_, pet::norm_site::norm1, x, h, m, ps);
            if (hook) {
                auto t = ws.get(workspace::sub, M, d);
                attn_.forward(tag, h, L, t, nullptr, 0, ws, m, cache);
                sublayer(pet::sublayer::attention, h, t);
                add_into(y, x, t);
                norm(tag, norm2_, pet::norm_site::norm2, y, h, m, ps);
                ffn_.forward(tag, h, t, nullptr, 0, ws, m);
                sublayer(pet::sublayer::ffn, h, t);
                detail::add_inplace(y, t);
            } else {
                attn_.forward(tag, h, L, y, x.data(), x.stride(), ws, m, cache);
                norm(tag, norm2_, pet::norm_site::norm2, y, h, m, ps);
                ffn_.forward(tag, h, y, y.data(), y.stride(), ws, m);
            }
        }
        detail::zero_padding(y, L);
    }

private:
    static const layer_shape& checked(const dense_layer_weights& w, const layer_shape& s) {
        check_weights(w, s, kind_of<C>);
        return checked(s);
    }
    static const layer_shape& checked(const layer_shape& s) {
        s.validate();
        // RoPE rotates pairs of a head's values: an odd head_dim leaves one value without a partner (and the
        // interleaved pairing would reach into the next head, or past the row for the last one)
        require<shape_error>(!C::rope || s.head_dim % 2 == 0, "TransformerLayer: head_dim must be even with RoPE, got ",
                             s.head_dim);
        return s;
    }
    static Norm<C::norm> checked_norm(Norm<C::norm> n, const layer_shape& s, const char* name) {
        require<shape_error>(n.features() == s.d_model, "TransformerLayer: part ", name, " has ", n.features(),
                             " features, expected d_model = ", s.d_model);
        if constexpr (C::norm == norm_kind::layernorm)
            require<shape_error>(index_t(n.beta().size()) == s.d_model, "TransformerLayer: part ", name, " has ",
                                 n.beta().size(), " β values, expected d_model = ", s.d_model, " (LayerNorm)");
        require<shape_error>(n.eps() == s.eps, "TransformerLayer: part ", name, " has eps ", n.eps(),
                             ", the layer_shape ", s.eps);
        return n;
    }
    /// y = norm(x), with β + Δβ when the task's norm hook tunes this norm's β (summed into scratch: O(d)).
    /// Modules that differ per sequence: each run of sequences with its own task's β + Δβ, when some task has one.
    template <class Arch, class Task>
    void norm(Arch tag, const Norm<C::norm>& n, pet::norm_site site, ConstMatrixView<float> x, MatrixView<float> y,
              const Task& m, pet::scratch& ps) const {
        if constexpr (SequenceTasks<Task>) {
            using T = std::decay_t<decltype(*m.task_of(0))>;
            if constexpr (pet::uses_hook<T, pet::hook::norm> && C::norm == norm_kind::layernorm) {
                bool any = false;
                for (const auto& r : m.runs()) any = any || (r.task && r.task->norm_bias_delta(site));
                if (any) {
                    const index_t S = x.rows() / m.sequences();
                    for (const auto& r : m.runs()) {
                        const auto xs = x.middle_rows(r.first * S, r.count * S);
                        auto ys = y.middle_rows(r.first * S, r.count * S);
                        if (r.task) norm(tag, n, site, xs, ys, *r.task, ps);
                        else n.apply(tag, xs, ys);
                    }
                    return;
                }
            }
        }
        if constexpr (pet::uses_hook<Task, pet::hook::norm> && C::norm == norm_kind::layernorm) {
            if (auto db = m.norm_bias_delta(site)) {  // size checked by check_task
                const index_t d = n.features();
                auto b = ps.matrix(pet::slot::norm_bias, 1, d);
                const float* b0 = n.beta_data();
                for (index_t c = 0; c < d; ++c) b(0, c) = (b0 ? b0[c] : 0.f) + (*db)[std::size_t(c)];
                n.apply(tag, x, y, b.data());
                return;
            }
        }
        (void)site, (void)m, (void)ps;
        n.apply(tag, x, y);
    }
    /// y = x + t (y may be x).
    static void add_into(MatrixView<float> y, ConstMatrixView<float> x, ConstMatrixView<float> t) noexcept {
        for (index_t r = 0; r < y.rows(); ++r)
            for (index_t c = 0; c < y.cols(); ++c) y(r, c) = x(r, c) + t(r, c);
    }

    layer_shape shape_;
    Norm<C::norm> norm1_, norm2_;
    Attention<C> attn_;
    FFN<C> ffn_;
};

}  // namespace cpet::nn

namespace cpet {
using nn::TransformerLayer;
}  // namespace cpet
