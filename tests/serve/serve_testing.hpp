// tests/serve/serve_testing.hpp — what the mixed-batch tests share: a two-layer backbone and a sequence run alone.
#pragma once

#include <memory>
#include <string_view>
#include <vector>

#include "cpet/nn/stack.hpp"
#include "cpet/serve/registry.hpp"

namespace cpet::testing {

/// Two random layers of kind C, shared and const as a registry holds them.
template <class C>
std::shared_ptr<const Stack<C>> backbone_for(const nn::layer_shape& s, unsigned seed) {
    std::vector<nn::dense_layer_weights> w{nn::random_layer_weights(s, seed, nn::kind_of<C>),
                                           nn::random_layer_weights(s, seed + 1, nn::kind_of<C>)};
    return std::make_shared<const Stack<C>>(w, s);
}

/// x (one sequence of `len` real rows) alone through the backbone with task `name` ("" = none).
template <class C>
Matrix<float> alone(const serve::registry<C>& reg, std::string_view name, ConstMatrixView<float> x, index_t len) {
    nn::workspace ws;
    Matrix<float> y(x.rows(), x.cols());
    const std::vector<index_t> l{len};
    if (name.empty()) reg.backbone().forward(x, l, y, ws);
    else reg.forward(name, x, l, y, ws);
    return y;
}

}  // namespace cpet::testing
