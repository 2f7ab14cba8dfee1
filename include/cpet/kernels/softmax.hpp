// cpet/kernels/softmax.hpp — numerically stable row softmax, in place: x_i ← exp(x_i − max) / Σ exp(x_j − max).
// A row of all −inf (fully masked) becomes all zeros rather than NaN.
#pragma once

#include <cmath>
#include <limits>

#include "cpet/arch/dispatch.hpp"
#include "cpet/core/matrix.hpp"

namespace cpet::kernels {

template <class Arch>
void softmax_rows(Arch, MatrixView<float> x) {
    for (index_t r = 0; r < x.rows(); ++r) {
        float mx = -std::numeric_limits<float>::infinity();
        for (index_t c = 0; c < x.cols(); ++c) mx = std::fmax(mx, x(r, c));
        if (mx == -std::numeric_limits<float>::infinity()) {
            for (index_t c = 0; c < x.cols(); ++c) x(r, c) = 0.f;
            continue;
        }
        double s = 0;
        for (index_t c = 0; c < x.cols(); ++c) s += (x(r, c) = std::exp(x(r, c) - mx));
        const float inv = float(1.0 / s);
        for (index_t c = 0; c < x.cols(); ++c) x(r, c) *= inv;
    }
}

inline void softmax_rows(MatrixView<float> x) {
    check_shape(x, -1, -1, "softmax_rows: x");
    arch::dispatch([&](auto tag) { softmax_rows(tag, x); });
}

}  // namespace cpet::kernels
