// cpet/nn/ffn.hpp — the feed-forward sublayer.
//   MLP (BERT, GPT-2):  out = act(h·W_upᵀ + b_up)·W_downᵀ + b_down   (bias + GELU fused into the up GEMM)
//   SwiGLU (LLaMA):     out = (silu(h·W_gateᵀ) ⊙ h·W_upᵀ)·W_downᵀ   (SiLU fused into the gate GEMM)
// A residual, when given, is fused into the down GEMM's epilogue.
#pragma once

#include <optional>
#include <type_traits>
#include <utility>

#include "cpet/compress/calibration.hpp"
#include "cpet/compress/policy.hpp"
#include "cpet/core/parallel.hpp"
#include "cpet/nn/batch.hpp"
#include "cpet/nn/config.hpp"
#include "cpet/nn/linear.hpp"
#include "cpet/nn/weights.hpp"
#include "cpet/nn/workspace.hpp"
#include "cpet/pet/policy.hpp"

namespace cpet::nn {

template <LayerConfig C>
class FFN {
public:
    using format = typename C::compression::format;
    static constexpr bool gated = C::ffn == ffn_kind::swiglu;

    FFN() = default;
    /// `in_stats` describes the input of up/gate, `down_stats` that of down (either may be null).
    FFN(const dense_layer_weights& w, const layer_shape& s, const compress::calibration* in_stats,
        const compress::calibration* down_stats)
        : d_ff_(s.d_ff),
          up_(C::compression::compress(w.w_up, in_stats), w.b_up, "dense_layer_weights.b_up"),
          down_(C::compression::compress(w.w_down, down_stats), w.b_down, "dense_layer_weights.b_down") {
        if constexpr (gated) gate_.emplace(C::compression::compress(w.w_gate, in_stats));
    }
    /// From built linears (a layer read back from a file): up (and gate, SwiGLU only) [d_ff, d_model], down
    /// [d_model, d_ff] as `s` gives them, up and down with biases when the config has them; shape_error naming
    /// the part otherwise.
    FFN(const layer_shape& s, Linear<format> up, std::optional<Linear<format>> gate, Linear<format> down)
        : d_ff_(s.d_ff), up_(std::move(up)), down_(std::move(down)), gate_(std::move(gate)) {
        check_part(up_, s.d_ff, s.d_model, "up", "[d_ff, d_model]", C::bias);
        check_part(down_, s.d_model, s.d_ff, "down", "[d_model, d_ff]", C::bias);
        require<shape_error>(gated == gate_.has_value(), "FFN: part gate is ", gate_ ? "given" : "missing", "; the ",
                             gated ? "SwiGLU FFN needs one" : "MLP FFN has none");
        if (gate_) check_part(*gate_, s.d_ff, s.d_model, "gate", "[d_ff, d_model]", false);
    }

    const Linear<format>& up() const noexcept { return up_; }
    const Linear<format>& down() const noexcept { return down_; }
    const Linear<format>* gate() const noexcept { return gate_ ? &*gate_ : nullptr; }
    std::size_t bytes() const noexcept { return up_.bytes() + down_.bytes() + (gate_ ? gate_->bytes() : 0); }

    /// out [M, d] = ffn(h) (+ residual with row stride ld_res when non-null; it may alias out). Unchecked.
    template <class Arch, class Modules>
    void forward(Arch tag, ConstMatrixView<float> h, MatrixView<float> out, const float* residual, index_t ld_res,
                 workspace& ws, const Modules& m) const {
        const index_t M = h.rows();
        auto& ps = ws.pet_scratch();
        auto f1 = ws.get(workspace::ff1, M, d_ff_);
        if constexpr (gated) {
            kernels::epilogue silu;
            silu.act = kernels::activation::silu;
            detail::project(tag, *gate_, pet::target::gate, h, f1, silu, m, ps);
            auto f2 = ws.get(workspace::ff2, M, d_ff_);
            detail::project(tag, up_, pet::target::up, h, f2, {}, m, ps);
            parallel_for(index_t(0), M, [&](index_t r) {
                float* a = f1.row(r);
                const float* b = f2.row(r);
                for (index_t c = 0; c < d_ff_; ++c) a[c] *= b[c];
            });
        } else {
            kernels::epilogue act;
            act.act = C::act;
            detail::project(tag, up_, pet::target::up, h, f1, act, m, ps);
        }
        if constexpr (pet::uses_hook<Modules, pet::hook::scale>)
            if (auto l = m.scale(pet::target::down)) detail::scale_columns(f1, *l, "FFN hidden (input of down)");
        if constexpr (SequenceTasks<Modules>)  // each sequence's own IA3 scale of the hidden, on its rows
            for_each_run(m, f1, [&](MatrixView<float> rows, const auto& task) {
                if constexpr (pet::uses_hook<std::decay_t<decltype(task)>, pet::hook::scale>)
                    if (auto l = task.scale(pet::target::down))
                        detail::scale_columns(rows, *l, "FFN hidden (input of down)");
            });
        kernels::epilogue ep;
        ep.residual = residual;
        ep.ld_residual = ld_res;
        detail::project(tag, down_, pet::target::down, f1, out, ep, m, ps);
    }

private:
    static void check_part(const Linear<format>& l, index_t out, index_t in, const char* name, const char* dims,
                           bool needs_bias) {
        require<shape_error>(l.out_features() == out && l.in_features() == in, "FFN: part ", name, " is [",
                             l.out_features(), ", ", l.in_features(), "], expected ", dims, " = [", out, ", ", in, "]");
        require<shape_error>(!needs_bias || l.bias(), "FFN: part ", name,
                             " has no bias; the layer configuration has biases on up and down");
    }

    index_t d_ff_ = 0;
    Linear<format> up_, down_;
    std::optional<Linear<format>> gate_;
};

}  // namespace cpet::nn
