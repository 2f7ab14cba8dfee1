// cpet/pet/adapter.hpp — bottleneck adapters after the attention and / or FFN sublayer (sublayer hook).
//
//   sequential (Houlsby et al. 2019, arXiv 1902.00751):      out ← out + f(out·W_dᵀ + b_d)·W_uᵀ + b_u
//   parallel (He et al. 2022, "unified view", 2110.04366):  out ← out + f(in·W_dᵀ + b_d)·W_uᵀ + b_u
//   scaled parallel (ibid., the MAM adapter's FFN part):      out ← out + s·(f(in·W_dᵀ + b_d)·W_uᵀ + b_u)
// `out` is the sublayer's output before the residual add, `in` what the sublayer consumed (post-LN: the layer /
// attention-block output; pre-LN: the normalised input). W_d [r, d], W_u [d, r] in torch.nn.Linear layout. The
// form and the nonlinearity f are types; bottleneck r, scale s and the placement are values. Fresh modules start
// as the identity: W_d Kaiming-uniform, W_u and both biases zero (the LoRA-style init He et al. use).
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <vector>

#include "cpet/core/eigen.hpp"
#include "cpet/kernels/activations.hpp"
#include "cpet/pet/lowrank.hpp"
#include "cpet/pet/policy.hpp"

namespace cpet::pet {

enum class adapter_form { sequential, parallel, scaled_parallel };

template <adapter_form Form = adapter_form::sequential, kernels::activation Act = kernels::activation::relu>
struct adapter_policy {
    static constexpr const char* name() noexcept {
        return Form == adapter_form::sequential ? "adapter"
               : Form == adapter_form::parallel ? "parallel_adapter"
                                                : "scaled_parallel_adapter";
    }
    static constexpr adapter_form form = Form;
    static constexpr kernels::activation act = Act;

    struct options {
        index_t bottleneck = 64;
        float scale = 4.f;  ///< s of the scaled parallel form (He et al.'s 4); the other forms ignore it
        bool attention = true;  ///< an adapter after the attention sublayer
        bool ffn = true;        ///< an adapter after the FFN sublayer
    };

    struct modules {
        static constexpr hook_set hooks{hook::sublayer};
        static constexpr adapter_form form = Form;      ///< (what a backward needs to know of the type)
        static constexpr kernels::activation act = Act;
        /// Per sublayer (index sublayer::attention = 0, ffn = 1); empty: no adapter there.
        std::array<Matrix<float>, 2> down, up;            ///< [r, d], [d, r]
        std::array<std::vector<float>, 2> b_down, b_up;  ///< [r], [d]
        float s = 1.f;

        bool has(sublayer w) const noexcept { return !down[std::size_t(w)].empty(); }
        index_t bottleneck(sublayer w) const noexcept { return down[std::size_t(w)].rows(); }
        float scale() const noexcept { return Form == adapter_form::scaled_parallel ? s : 1.f; }

        void sublayer(pet::sublayer w, ConstMatrixView<float> in, MatrixView<float> out, scratch& sc) const {
            const auto i = std::size_t(w);
            if (down[i].empty()) return;
            const ConstMatrixView<float> src = Form == adapter_form::sequential ? ConstMatrixView<float>(out) : in;
            const index_t M = out.rows(), r = down[i].rows();
            auto hid = sc.matrix(slot::hidden, M, r);
            auto H = as_eigen(hid);
            H.noalias() = as_eigen(src) * as_eigen(down[i]).transpose();
            H.rowwise() += Eigen::Map<const Eigen::RowVectorXf>(b_down[i].data(), r);
            for (index_t row = 0; row < M; ++row) kernels::activate_inplace(Act, hid.row(row), r);
            auto O = as_eigen(out);
            const float sc_ = scale();
            O.noalias() += sc_ * (H * as_eigen(up[i]).transpose());
            O.rowwise() += sc_ * Eigen::Map<const Eigen::RowVectorXf>(b_up[i].data(), out.cols());
        }

        /// Throws shape_error unless every adapter is W_d [r, d_model], W_u [d_model, r] with b_d [r], b_u [d_model].
        void check_fits(const layer_dims& d, const char* who) const {
            for (auto w : {pet::sublayer::attention, pet::sublayer::ffn}) {
                const auto i = std::size_t(w);
                if (down[i].empty()) continue;
                const index_t r = down[i].rows();
                require<shape_error>(down[i].cols() == d.d_model && up[i].rows() == d.d_model && up[i].cols() == r &&
                                         index_t(b_down[i].size()) == r && index_t(b_up[i].size()) == d.d_model,
                                     who, ": ", name(), " (", sublayer_name(w), ") expects W_down [r, ", d.d_model,
                                     "], W_up [", d.d_model, ", r], b_down [r], b_up [", d.d_model, "] for this layer, "
                                     "the module holds W_down ", shape_str(down[i].rows(), down[i].cols()), ", W_up ",
                                     shape_str(up[i].rows(), up[i].cols()), ", b_down [", b_down[i].size(), "], b_up [",
                                     b_up[i].size(), "]");
            }
        }

        /// Sets the adapter after sublayer w (W_d [r, d], W_u [d, r], b_d [r], b_u [d]; empty biases mean zero).
        void set(pet::sublayer w, ConstMatrixView<float> d, ConstMatrixView<float> u, std::span<const float> bd = {},
                 std::span<const float> bu = {}) {
            const auto i = std::size_t(w);
            const auto who = cpet::detail::concat(name(), " (", sublayer_name(w), ")");
            require<shape_error>(d.rows() >= 1 && d.cols() >= 1, who, ": W_down is empty");
            check_shape(u, d.cols(), d.rows(), (who + ": W_up").c_str());
            require<shape_error>(bd.empty() || index_t(bd.size()) == d.rows(), who, ": b_down has ", bd.size(),
                                 " values, expected ", d.rows());
            require<shape_error>(bu.empty() || index_t(bu.size()) == d.cols(), who, ": b_up has ", bu.size(),
                                 " values, expected ", d.cols());
            down[i] = Matrix<float>(d);
            up[i] = Matrix<float>(u);
            b_down[i] = bd.empty() ? std::vector<float>(std::size_t(d.rows()), 0.f) : std::vector<float>(bd.begin(), bd.end());
            b_up[i] = bu.empty() ? std::vector<float>(std::size_t(d.cols()), 0.f) : std::vector<float>(bu.begin(), bu.end());
        }

        std::vector<parameter_group> parameters() const {
            std::vector<parameter_group> out;
            for (auto w : {sublayer::attention, sublayer::ffn}) {
                const auto i = std::size_t(w);
                if (down[i].empty()) continue;
                const auto p = cpet::detail::concat("adapter_", sublayer_name(w));
                out.push_back({p + ".down", down[i].size() + index_t(b_down[i].size())});
                out.push_back({p + ".up", up[i].size() + index_t(b_up[i].size())});
            }
            return out;
        }
    };

    /// Identity-at-start modules for a layer of width d_model. Throws shape_error on a bottleneck outside
    /// [1, d_model] or when neither sublayer is chosen.
    static modules make(const layer_dims& d, const options& o, std::uint64_t seed = 0) {
        require<shape_error>(d.d_model > 0, name(), ": layer_dims are not set");
        require<shape_error>(o.bottleneck >= 1 && o.bottleneck <= d.d_model, name(), ": bottleneck ", o.bottleneck,
                             " outside [1, d_model = ", d.d_model, "]");
        require<shape_error>(o.attention || o.ffn, name(), ": neither the attention nor the FFN sublayer is chosen");
        modules m;
        m.s = o.scale;
        for (auto w : {sublayer::attention, sublayer::ffn}) {
            if ((w == sublayer::attention && !o.attention) || (w == sublayer::ffn && !o.ffn)) continue;
            const auto i = std::size_t(w);
            m.down[i] = detail::kaiming_uniform(o.bottleneck, d.d_model, seed + 101 * i, target::q);
            m.up[i] = Matrix<float>(d.d_model, o.bottleneck);
            m.b_down[i].assign(std::size_t(o.bottleneck), 0.f);
            m.b_up[i].assign(std::size_t(d.d_model), 0.f);
        }
        return m;
    }
};

using adapter = adapter_policy<adapter_form::sequential>;
using parallel_adapter = adapter_policy<adapter_form::parallel>;
using scaled_parallel_adapter = adapter_policy<adapter_form::scaled_parallel>;

static_assert(check_pet_policy<adapter>() && hooks_of<adapter>::sublayer && !hooks_of<adapter>::linear);

}  // namespace cpet::pet
