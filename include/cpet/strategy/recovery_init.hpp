// cpet/strategy/recovery_init.hpp — CPET's linear recovery modules initialised without training, EoRA's way: per
// compressed linear, the rank-r B·A that minimises ‖X(E − BA)ᵀ‖_F, E = W − Ŵ the compression residual and X the
// calibration inputs that linear sees (pet::svd_residual, Gram-whitened; see pet/recovery.hpp).
//
// X is collected from the COMPRESSED layers here, since that is where the recovery term runs: a compressed
// layer's o and down linears see what its compressed q/k/v and up/gate produce, and in a stack every layer sees
// what the compressed layers before it produce. The dense weights W are the ones the layer was compressed from:
// for a structurally pruned layer, the pruned dense weights (nn::pruned_layer::weights), whose shapes are the
// compressed layer's. The modules then go on to distillation (or serve as they are).
#pragma once

#include <span>
#include <vector>

#include "cpet/core/error.hpp"
#include "cpet/nn/compress.hpp"
#include "cpet/nn/pet_layer.hpp"
#include "cpet/nn/stack.hpp"
#include "cpet/pet/recovery.hpp"
#include "cpet/strategy/calibration.hpp"

namespace cpet::strategy {

namespace detail {
/// Gram matrices cost in² per site; collect them only when the objective may use them.
inline nn::calibration_options calibration_for(const pet::recovery_linear::options& o) {
    return {.hessian = o.weighting == pet::residual_weighting::automatic ||
                       o.weighting == pet::residual_weighting::gram};
}
}  // namespace detail

/// Linear recovery modules for `compressed` (compressed from the dense weights `original`), EoRA-initialised on the
/// calibration batches (o.weighting: automatic = gram here, since the Gram matrices are collected).
template <nn::LayerConfig C>
pet::recovery_linear::modules init_recovery(const TransformerLayer<C>& compressed,
                                            const nn::dense_layer_weights& original,
                                            std::span<const nn::calibration_set> batches,
                                            const pet::recovery_linear::options& o = {}) {
    require<shape_error>(!batches.empty(), "strategy::init_recovery: no calibration batch given");
    nn::layer_statistics st;
    for (const auto& b : batches) accumulate(st, nn::calibrate(compressed, b, detail::calibration_for(o)));
    return nn::init_recovery(compressed, original, o, &st.linears);
}
template <nn::LayerConfig C>
pet::recovery_linear::modules init_recovery(const TransformerLayer<C>& compressed,
                                            const nn::dense_layer_weights& original, const nn::calibration_set& batch,
                                            const pet::recovery_linear::options& o = {}) {
    return init_recovery(compressed, original, std::span<const nn::calibration_set>(&batch, 1), o);
}

/// One module set per layer of a compressed stack (`original[i]`: layer i's dense weights), each layer calibrated
/// on what the compressed layers before it produce from the batches.
template <nn::LayerConfig C>
std::vector<pet::recovery_linear::modules> init_recovery(const nn::Stack<C>& compressed,
                                                         const std::vector<nn::dense_layer_weights>& original,
                                                         std::span<const nn::calibration_set> batches,
                                                         const pet::recovery_linear::options& o = {}) {
    require<shape_error>(original.size() == compressed.size(), "strategy::init_recovery: ", original.size(),
                         " dense layers for a stack of ", compressed.size());
    const auto stats = calibrate_stack(compressed, batches, detail::calibration_for(o));
    std::vector<pet::recovery_linear::modules> out;
    out.reserve(compressed.size());
    for (std::size_t i = 0; i < compressed.size(); ++i)
        out.push_back(nn::init_recovery(compressed.layer(i), original[i], o, &stats[i].linears));
    return out;
}

}  // namespace cpet::strategy
