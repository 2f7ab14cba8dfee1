// cpet/train/parameter.hpp — what an optimizer, a gradient clipper and a checkpoint see of a trainable tensor.
//
// The values live where the forward reads them (a task's PET modules, a classification head); the gradients in a
// store of the same shapes that the backward accumulates into (train/layer.hpp, train/model.hpp). A parameter is
// a pair of views onto both, so the optimizer updates the task in place and nothing is copied per step. The
// backbone has no parameter: it is frozen.
#pragma once

#include <cstddef>
#include <span>
#include <string>
#include <vector>

#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"

namespace cpet::train {

/// One trainable tensor: `value` and `grad` have the same size. `decay`: whether decoupled weight decay applies
/// (HF's Trainer exempts biases and norm parameters; LoRA / recovery factors and head weights decay).
struct parameter {
    std::string name;
    std::span<float> value;
    std::span<float> grad;
    bool decay = true;

    std::size_t size() const noexcept { return value.size(); }
};

/// Throws shape_error unless every parameter's value and grad agree in size and names are unique.
inline void check_parameters(std::span<const parameter> ps, const char* who) {
    for (std::size_t i = 0; i < ps.size(); ++i) {
        require<shape_error>(ps[i].value.size() == ps[i].grad.size(), who, ": parameter \"", ps[i].name, "\" has ",
                             ps[i].value.size(), " values but ", ps[i].grad.size(), " gradients");
        for (std::size_t j = 0; j < i; ++j)
            require<shape_error>(ps[i].name != ps[j].name, who, ": two parameters are named \"", ps[i].name, "\"");
    }
}

/// Sets every gradient to zero (the start of an accumulation window).
inline void zero_grad(std::span<const parameter> ps) noexcept {
    for (const auto& p : ps)
        for (float& g : p.grad) g = 0.f;
}

/// Total number of trainable values.
inline std::size_t parameter_count(std::span<const parameter> ps) noexcept {
    std::size_t n = 0;
    for (const auto& p : ps) n += p.size();
    return n;
}

}  // namespace cpet::train
