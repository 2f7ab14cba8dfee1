// cpet/nn/compress.hpp — compress a dense layer (or stack) with calibration data, and say what it cost.
//
//   calibrate(layer, samples)          runs the layer on sample inputs and collects, at each linear's input site,
//                                      Σx², max|x| (Wanda, SmoothQuant), optionally Σxᵀx (GPTQ), and the moments
//                                      of the o / down inputs (FLAP's fluctuation score, bias compensation)
//   compress<Policy>(dense, samples)   calibrate → [prune heads / neurons → calibrate the pruned layer] →
//                                      compress every linear with Policy → run both layers on the samples and
//                                      report bytes, compression ratio and relative output error
//   compress_stack<Config>(weights, …) the same layer by layer; layer i is calibrated on what the COMPRESSED
//                                      layers before it produce (the sequential scheme of GPTQ / SparseGPT), so
//                                      each layer's compression sees, and partly absorbs, the error upstream
//
// How the statistics are collected: the layer runs with a task whose linear hook records its input and adds
// nothing (detail::calibration_probe's modules), so the sites are exactly the inputs the kernels see (post-LN: the layer
// input; pre-LN: the normalised one; o: the concatenated heads; down: the activated FFN hidden state), padded rows
// excluded. q/k/v share one site, as do up/gate.
//
// Bad input: an empty sample set (no token) → shape_error; NaN/Inf in the samples → numeric_error naming the row
// and column; statistics that turn non-finite inside the layer (NaN/Inf weights) → numeric_error naming the site.
// Nothing is returned half-built: every check runs before the compressed layer is handed out.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <numeric>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "cpet/compress/calibration.hpp"
#include "cpet/compress/dense.hpp"
#include "cpet/compress/policy.hpp"
#include "cpet/compress/structured.hpp"
#include "cpet/core/eigen.hpp"
#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/nn/batch.hpp"
#include "cpet/nn/config.hpp"
#include "cpet/nn/layer.hpp"
#include "cpet/nn/pet_layer.hpp"
#include "cpet/nn/prune.hpp"
#include "cpet/nn/weights.hpp"
#include "cpet/nn/workspace.hpp"
#include "cpet/pet/none.hpp"
#include "cpet/pet/policy.hpp"

namespace cpet::nn {

/// C with its compression policy replaced by P.
template <class C, class P>
struct with_compression;
template <norm_placement Pl, norm_kind N, ffn_kind F, kernels::activation A, attention_mask M, bool R, bool B,
          class Comp, class P>
struct with_compression<config::layer<Pl, N, F, A, M, R, B, Comp>, P> {
    using type = config::layer<Pl, N, F, A, M, R, B, P>;
};
template <class C, class P>
using with_compression_t = typename with_compression<C, P>::type;

/// Sample inputs: B sequences padded to S rows each, laid out as TransformerLayer::forward takes them.
struct calibration_set {
    Matrix<float> x;               ///< [B·S, d_model]
    std::vector<index_t> lengths;  ///< [B] tokens of each sequence (≤ S)

    /// Real (unpadded) rows.
    index_t tokens() const noexcept { return std::accumulate(lengths.begin(), lengths.end(), index_t{0}); }
};

struct calibration_options {
    /// Also accumulate Σ xᵀx at every site (GPTQ needs it): in² doubles per site, d_ff² for the down input.
    bool hessian = false;
};

/// Everything calibrate() collects about one layer.
struct layer_statistics {
    layer_calibration linears;  ///< per input site: Σx², max|x| (+ Σxᵀx) — what compression policies read
    prune_calibration moments;  ///< Σx, Σx² of the o and down inputs — what structured pruning reads
};

namespace detail {

/// Accumulates the statistics of every site over the real rows of each call.
class calibration_sink {
public:
    calibration_sink(const layer_shape& s, bool hessian) : hessian_(hessian) {
        init(stats_.linears.attention_in, s.d_model);
        init(stats_.linears.o_in, s.q_dim());
        init(stats_.linears.ffn_in, s.d_model);
        init(stats_.linears.down_in, s.d_ff);
    }

    void set_layout(const batch_layout& l) noexcept { layout_ = l; }

    void record(pet::target t, ConstMatrixView<float> x) {
        switch (t) {
            case pet::target::q: add(stats_.linears.attention_in, nullptr, x); break;
            case pet::target::o: add(stats_.linears.o_in, &stats_.moments.o_in, x); break;
            case pet::target::up: add(stats_.linears.ffn_in, nullptr, x); break;
            case pet::target::down: add(stats_.linears.down_in, &stats_.moments.down_in, x); break;
            default: break;  // k, v read q's input; gate reads up's
        }
    }

    /// The statistics, Hessians symmetrised; numeric_error when a site saw NaN / Inf.
    layer_statistics finish(const char* who) && {
        check(stats_.linears.attention_in, "q/k/v input", who);
        check(stats_.linears.o_in, "o input (attention heads)", who);
        check(stats_.linears.ffn_in, "up/gate input", who);
        check(stats_.linears.down_in, "down input (FFN hidden)", who);
        for (auto* c : {&stats_.linears.attention_in, &stats_.linears.o_in, &stats_.linears.ffn_in,
                        &stats_.linears.down_in})
            if (c->has_hessian()) {  // rankUpdate filled the lower triangle
                Matrix<double>& h = c->hessian;
                for (index_t i = 0; i < h.rows(); ++i)
                    for (index_t j = i + 1; j < h.cols(); ++j) h(i, j) = h(j, i);
            }
        return std::move(stats_);
    }

private:
    void init(compress::calibration& c, index_t n) {
        c.sum_sq.assign(static_cast<std::size_t>(n), 0.0);
        c.max_abs.assign(static_cast<std::size_t>(n), 0.f);
        c.samples = 0;
        if (hessian_) {
            c.hessian = Matrix<double>(n, n);
            std::fill(c.hessian.data(), c.hessian.data() + c.hessian.size(), 0.0);
        }
    }

    void add(compress::calibration& c, compress::channel_moments* m, ConstMatrixView<float> x) {
        const index_t n = x.cols();
        for (index_t b = 0; b < layout_.batch; ++b) {
            const index_t len = layout_.length(b);
            if (len == 0) continue;
            const ConstMatrixView<float> rows = x.middle_rows(b * layout_.seq_len, len);
            for (index_t r = 0; r < len; ++r) {
                const float* xr = rows.row(r);
                for (index_t j = 0; j < n; ++j) {
                    const auto jj = static_cast<std::size_t>(j);
                    c.sum_sq[jj] += double(xr[j]) * double(xr[j]);
                    // std::max would drop a NaN; keep it so finish() sees it
                    const float a = std::abs(xr[j]);
                    if (!(a <= c.max_abs[jj])) c.max_abs[jj] = a;
                }
            }
            c.samples += len;
            if (m) m->add(rows);
            if (hessian_) {
                const Eigen::MatrixXd xd = as_eigen(rows).template cast<double>();
                as_eigen(c.hessian).template selfadjointView<Eigen::Lower>().rankUpdate(xd.transpose());
            }
        }
    }

    static void check(const compress::calibration& c, const char* site, const char* who) {
        bool finite = true;
        for (double v : c.sum_sq) finite = finite && std::isfinite(v);
        for (float v : c.max_abs) finite = finite && std::isfinite(v);
        require<numeric_error>(finite, who, ": the statistics of the ", site,
                               " are not finite (NaN or Inf reached it: check the layer's weights)");
    }

    bool hessian_;
    batch_layout layout_;
    layer_statistics stats_;
};

/// A PET policy whose only hook records each linear's input and adds nothing.
struct calibration_probe {
    struct modules {
        static constexpr pet::hook_set hooks{pet::hook::linear};
        calibration_sink* sink = nullptr;
        /// The probe stores no parameters, so it fits every layer.
        void check_fits(const pet::layer_dims&, const char*) const noexcept {}
        std::optional<pet::lowrank_args> lowrank(pet::target t, ConstMatrixView<float> x, pet::scratch&) const {
            if (sink) sink->record(t, x);
            return std::nullopt;
        }
    };
    static constexpr const char* name() noexcept { return "calibration_probe"; }
};

/// The checks every entry point runs on the samples before any work.
inline void check_samples(const calibration_set& set, index_t d_model, const char* who) {
    require<shape_error>(!set.lengths.empty() && set.tokens() > 0, who,
                         ": the calibration set is empty (no sequence with a token); give at least one sample");
    check_shape(set.x.view(), -1, d_model, "calibration_set.x");
    const batch_layout L = batch_layout::of(set.x.rows(), set.lengths, who);
    for (index_t b = 0; b < L.batch; ++b)
        for (index_t r = 0; r < L.length(b); ++r) {
            const float* xr = set.x.row(b * L.seq_len + r);
            for (index_t c = 0; c < set.x.cols(); ++c)
                require<numeric_error>(std::isfinite(xr[c]), who, ": calibration_set.x(", b * L.seq_len + r, ", ", c,
                                       ") = ", xr[c], " is not finite (sequence ", b, ", token ", r, ")");
        }
}

/// Runs a layer on the samples with the probe as its task; returns the statistics and (when y is non-null) the
/// output.
template <LayerConfig P>
layer_statistics run_probe(const TransformerLayer<P>& layer, const calibration_set& set, bool hessian,
                           Matrix<float>* y, const char* who) {
    calibration_sink sink(layer.shape(), hessian);
    sink.set_layout(batch_layout::of(set.x.rows(), set.lengths, who));
    typename calibration_probe::modules m;
    m.sink = &sink;
    Matrix<float> out(set.x.rows(), set.x.cols());
    workspace ws;
    layer.forward(set.x, set.lengths, out, ws, m);
    if (y) *y = std::move(out);
    return std::move(sink).finish(who);
}

template <class C>
using probe_config = with_compression_t<C, compress::dense>;

/// ‖y − ref‖_F / ‖ref‖_F over all rows (padded rows are zero in both).
inline double relative_error(ConstMatrixView<float> y, ConstMatrixView<float> ref) {
    double num = 0, den = 0;
    for (index_t r = 0; r < y.rows(); ++r)
        for (index_t c = 0; c < y.cols(); ++c) {
            const double d = double(y(r, c)) - double(ref(r, c));
            num += d * d;
            den += double(ref(r, c)) * double(ref(r, c));
        }
    return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

inline std::vector<index_t> iota(index_t n) {
    std::vector<index_t> v(static_cast<std::size_t>(n));
    std::iota(v.begin(), v.end(), index_t{0});
    return v;
}

}  // namespace detail

/// Statistics of the dense layer (w, s) of config C's kind (its compression policy does not matter: the dense
/// fp32 weights run) on the samples.
template <LayerConfig C>
layer_statistics calibrate(const dense_layer_weights& w, const layer_shape& s, const calibration_set& set,
                           const calibration_options& o = {}) {
    detail::check_samples(set, s.d_model, "nn::calibrate");
    const TransformerLayer<detail::probe_config<C>> layer(w, s);
    return detail::run_probe(layer, set, o.hessian, nullptr, "nn::calibrate");
}

/// Statistics of `layer` as it is (dense or already compressed) on the samples.
template <LayerConfig C>
layer_statistics calibrate(const TransformerLayer<C>& layer, const calibration_set& set,
                           const calibration_options& o = {}) {
    detail::check_samples(set, layer.shape().d_model, "nn::calibrate");
    return detail::run_probe(layer, set, o.hessian, nullptr, "nn::calibrate");
}

struct compress_options {
    /// Attention head groups / FFN neurons to remove before the per-linear policy runs (ratios 0: none). The
    /// fluctuation score and bias compensation use the calibration moments.
    compress::structured_options prune{};
    /// Collect Σxᵀx even when the policy does not ask for it (policies with `needs_hessian` get it anyway).
    bool hessian = false;
};

/// What compressing one layer cost.
struct compress_report {
    std::string policy;          ///< the compression policy's name (with the pruning, when any)
    layer_shape shape;           ///< after pruning
    std::size_t dense_bytes = 0; ///< the dense fp32 layer's weights and biases
    std::size_t bytes = 0;       ///< the compressed layer's
    double ratio = 0;            ///< dense_bytes / bytes
    double rel_error = 0;        ///< ‖y − y_dense‖_F / ‖y_dense‖_F on the calibration tokens
    index_t tokens = 0;          ///< calibration tokens

    /// "policy: 7.08 MiB -> 1.82 MiB (3.89x), rel. error 1.23e-02 on 512 tokens".
    std::string str() const {
        std::ostringstream os;
        os.setf(std::ios::fixed);
        os.precision(2);
        os << policy << ": " << double(dense_bytes) / 1048576.0 << " MiB -> " << double(bytes) / 1048576.0
           << " MiB (" << ratio << "x), rel. error ";
        os.unsetf(std::ios::fixed);
        os.setf(std::ios::scientific);
        os << rel_error << " on " << tokens << " tokens";
        return os.str();
    }
};

/// A compressed layer, its report, and which heads / neurons of the dense layer it kept (all of them when
/// nothing was pruned; knowledge inheritance slices PET modules with these).
template <LayerConfig C>
struct compressed_layer {
    TransformerLayer<C> layer;
    compress_report report;
    std::vector<index_t> kept_heads, kept_kv_heads, kept_neurons;
};

/// Compresses the dense layer (w, s) into a TransformerLayer<C> (C's compression policy),
/// calibrated on `set`. See the file comment.
template <LayerConfig C>
compressed_layer<C> compress(const dense_layer_weights& w, const layer_shape& s, const calibration_set& set,
                             const compress_options& o = {}) {
    using policy = typename C::compression;
    constexpr const char* who = "nn::compress";
    s.validate();
    check_weights(w, s, kind_of<C>);
    detail::check_samples(set, s.d_model, who);
    const bool hessian = o.hessian || compress::needs_hessian<policy>();
    const bool pruning = o.prune.head_ratio > 0 || o.prune.neuron_ratio > 0;

    // 1. The dense layer on the samples: the reference output, and the statistics (moments for pruning).
    Matrix<float> y_dense;
    layer_statistics stats;
    {
        const TransformerLayer<detail::probe_config<C>> dense(w, s);
        stats = detail::run_probe(dense, set, hessian && !pruning, &y_dense, who);
    }
    // 2. Structured pruning, then the pruned dense layer's own statistics (its sites are narrower).
    std::optional<pruned_layer> pruned;
    if (pruning) {
        pruned = prune_structured(w, s, o.prune, &stats.moments);
        const TransformerLayer<detail::probe_config<C>> p(pruned->weights, pruned->shape);
        stats = detail::run_probe(p, set, hessian, nullptr, who);
    }
    const dense_layer_weights& wc = pruned ? pruned->weights : w;
    const layer_shape& sc = pruned ? pruned->shape : s;
    // 3. Every linear through the policy, then the compressed layer on the same samples.
    TransformerLayer<C> layer(wc, sc, &stats.linears);
    Matrix<float> y(set.x.rows(), set.x.cols());
    workspace ws;
    layer.forward(set.x, set.lengths, y, ws);

    compress_report r;
    r.policy = std::string(policy::name());
    if (pruning) {
        std::ostringstream os;
        os << "pruned(heads " << o.prune.head_ratio << ", neurons " << o.prune.neuron_ratio << ")+" << r.policy;
        r.policy = os.str();
    }
    r.shape = sc;
    r.dense_bytes = TransformerLayer<with_compression_t<C, compress::dense>>(w, s).bytes();
    r.bytes = layer.bytes();
    r.ratio = r.bytes ? double(r.dense_bytes) / double(r.bytes) : 0.0;
    r.rel_error = detail::relative_error(y, y_dense);
    r.tokens = set.tokens();
    require<numeric_error>(std::isfinite(r.rel_error), who, ": the compressed layer's output on the calibration set "
                           "is not finite (policy ", r.policy, ")");

    auto finish = [&](auto&& l) {
        compressed_layer<C> out{std::forward<decltype(l)>(l), std::move(r), {}, {}, {}};
        if (pruned) {
            out.kept_heads = std::move(pruned->kept_heads);
            out.kept_kv_heads = std::move(pruned->kept_kv_heads);
            out.kept_neurons = std::move(pruned->kept_neurons);
        } else {
            out.kept_heads = detail::iota(s.n_heads);
            out.kept_kv_heads = detail::iota(s.n_kv_heads);
            out.kept_neurons = detail::iota(s.d_ff);
        }
        return out;
    };
    return finish(std::move(layer));
}

/// The same from a dense TransformerLayer (its weights are the reference): the result has compression policy P.
template <compress::CompressionPolicy P, LayerConfig C>
compressed_layer<with_compression_t<C, P>> compress(const TransformerLayer<C>& dense, const calibration_set& set,
                                                    const compress_options& o = {}) {
    static_assert(std::is_same_v<typename C::compression, compress::dense>,
                  "nn::compress<P>(layer, ...): start from a dense layer (compression policy compress::dense); its "
                  "fp32 weights are what the compressed layer is measured against");
    return compress<with_compression_t<C, P>>(dense_weights_of(dense), dense.shape(), set, o);
}

/// A compressed stack and one report per layer.
template <LayerConfig C>
struct compressed_stack {
    std::vector<TransformerLayer<C>> layers;  ///< hand to nn::Stack<C>
    std::vector<compress_report> reports;
};

/// Compresses N dense layers of one shape. Layer i is calibrated on, and its report measured on, what the
/// compressed layers 0..i−1 produce from `set` (GPTQ's sequential scheme). Structured pruning is not offered here:
/// pruned layers may differ in shape, which nn::Stack does not allow.
template <LayerConfig C>
compressed_stack<C> compress_stack(const std::vector<dense_layer_weights>& w, const layer_shape& s,
                                   const calibration_set& set, const compress_options& o = {}) {
    require<format_error>(o.prune.head_ratio == 0 && o.prune.neuron_ratio == 0,
                          "nn::compress_stack: structured pruning changes layer shapes; prune layer by layer with "
                          "nn::compress");
    detail::check_samples(set, s.d_model, "nn::compress_stack");
    compressed_stack<C> out;
    out.layers.reserve(w.size());
    calibration_set cur{set.x, set.lengths};
    for (std::size_t i = 0; i < w.size(); ++i) {
        auto c = compress<C>(w[i], s, cur, o);
        if (i + 1 < w.size()) {  // the next layer's samples: this compressed layer's output
            Matrix<float> next;
            (void)detail::run_probe(c.layer, cur, false, &next, "nn::compress_stack");
            cur.x = std::move(next);
        }
        out.layers.push_back(std::move(c.layer));
        out.reports.push_back(std::move(c.report));
    }
    return out;
}

}  // namespace cpet::nn
