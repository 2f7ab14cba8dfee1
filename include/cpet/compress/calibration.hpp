// cpet/compress/calibration.hpp — what a data-aware compressor knows about the activations entering one linear.
//
// Data-aware methods weigh a weight by the size of the input channel it multiplies: Wanda prunes by
// |W_ij|·‖X_j‖₂ (sqrt of sum_sq), AWQ / SmoothQuant scale by max |X_j|, GPTQ quantises column by column using the
// Hessian H = XᵀX of the layer-wise reconstruction loss. One `calibration` describes the input of ONE linear
// (in_features channels); the layer keeps one per input site. This issue only defines the container; collecting
// the statistics (hooks on a calibration set) comes with the quantised and sparse formats.
#pragma once

#include <cstdint>
#include <vector>

#include "cpet/core/matrix.hpp"

namespace cpet::compress {

/// Per-input-channel activation statistics of one linear layer's input, gathered over `samples` rows (tokens).
struct calibration {
    std::vector<double> sum_sq;  ///< [in] Σ_rows x_j²
    std::vector<float> max_abs;  ///< [in] max_rows |x_j|
    std::int64_t samples = 0;    ///< rows seen
    Matrix<double> hessian;      ///< [in, in] Σ_rows xᵀx (GPTQ); empty unless collected

    index_t channels() const noexcept { return static_cast<index_t>(sum_sq.size()); }
    bool has_hessian() const noexcept { return !hessian.empty(); }
};

}  // namespace cpet::compress
