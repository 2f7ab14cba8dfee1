// tests/pet/pet_testing.hpp — what the PET tests share: small layer shapes, a test-only LOSSY weight format
// (`rounded`), the list of compression policies every method is tested on, and error helpers.
#pragma once

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "cpet/compress/compress.hpp"
#include "cpet/nn/nn.hpp"
#include "cpet/nn/pet_layer.hpp"
#include "nn/reference_layer.hpp"
#include "support/testing.hpp"

namespace cpet::testing {

/// A real lossy format for tests: every weight rounded to a grid of step max|W_row| / 2^(Bits-1) per output row
/// (symmetric round-to-nearest with `Bits` bits, per-channel), kept in a dense_f32 for the product. It is not
/// dense_f32, so merges must refuse it; its to_dense() is what it computes with.
template <int Bits>
class rounded_format {
public:
    rounded_format() = default;
    explicit rounded_format(ConstMatrixView<float> w) : w_(round(w)) {}
    index_t out_features() const noexcept { return w_.out_features(); }
    index_t in_features() const noexcept { return w_.in_features(); }
    void matmul(ConstMatrixView<float> x, MatrixView<float> y, const kernels::epilogue& ep) const { w_.matmul(x, y, ep); }
    template <class Arch>
    void matmul(Arch tag, ConstMatrixView<float> x, MatrixView<float> y, const kernels::epilogue& ep) const {
        w_.matmul(tag, x, y, ep);
    }
    void matmul_t(ConstMatrixView<float> dy, MatrixView<float> dx) const { w_.matmul_t(dy, dx); }
    Matrix<float> to_dense() const { return w_.to_dense(); }
    std::size_t bytes() const noexcept { return w_.bytes() * Bits / 32; }

private:
    static compress::dense_f32 round(ConstMatrixView<float> w) {
        Matrix<float> r(w);
        const float levels = float(1 << (Bits - 1));
        for (index_t i = 0; i < r.rows(); ++i) {
            float mx = 0;
            for (index_t j = 0; j < r.cols(); ++j) mx = std::max(mx, std::abs(r(i, j)));
            const float step = mx > 0 ? mx / levels : 1.f;
            for (index_t j = 0; j < r.cols(); ++j) r(i, j) = std::round(r(i, j) / step) * step;
        }
        return compress::dense_f32(r);
    }
    compress::dense_f32 w_;
};

template <int Bits>
struct rounded {
    using format = rounded_format<Bits>;
    static constexpr const char* name() noexcept { return Bits == 4 ? "rounded4 (test)" : "rounded (test)"; }
    static format compress(ConstMatrixView<float> w, const compress::calibration* = nullptr) { return format(w); }
};
static_assert(compress::check_compression_policy<rounded<4>>());

/// Every compression policy the PET methods are tested on: adding a format is one line here. Dense, a test-only
/// lossy format, weight-only int8/int4 and 2:4 sparse. (W8A8 quantises activations too, so it cannot meet the
/// 1e-5 bound against a reference built from its dequantised weights.) Group 16 divides every test width.
using compression_policies =
    std::tuple<compress::dense, rounded<4>, compress::int8_per_channel,
               compress::quantized<compress::int4, compress::per_group<16>, compress::asymmetric>,
               compress::nm_sparse<2, 4>>;

inline nn::layer_shape bert_shape() {
    nn::layer_shape s;
    s.d_model = 64, s.n_heads = 4, s.n_kv_heads = 4, s.head_dim = 16, s.d_ff = 128, s.eps = 1e-12f;
    return s;
}
inline nn::layer_shape llama_shape() {  // GQA 4/2
    nn::layer_shape s;
    s.d_model = 96, s.n_heads = 4, s.n_kv_heads = 2, s.head_dim = 24, s.d_ff = 176, s.eps = 1e-6f;
    return s;
}
template <class C>
nn::layer_shape shape_for() {
    return C::ffn == nn::ffn_kind::swiglu ? llama_shape() : bert_shape();
}

inline constexpr double pet_tol = 1e-5;

/// Worst relative error over the valid rows of every sequence.
inline double valid_error(ConstMatrixView<float> y, const MatD& ref, const std::vector<index_t>& lengths) {
    const index_t S = y.rows() / index_t(lengths.size());
    double worst = 0;
    for (std::size_t b = 0; b < lengths.size(); ++b)
        if (lengths[b] > 0)
            worst = std::max(worst, rel_error(y.middle_rows(index_t(b) * S, lengths[b]),
                                              ref.middleRows(index_t(b) * S, lengths[b])));
    return worst;
}

/// Random values in a matrix, in place.
inline void randomize(Matrix<float>& m, unsigned seed, float lo = -0.3f, float hi = 0.3f) {
    m = random_matrix(m.rows(), m.cols(), seed, lo, hi);
}

/// A reference linear_delta summing several.
inline reference_hooks combine_linear(std::vector<std::function<MatD(pet::target, const MatD&)>> fs) {
    reference_hooks h;
    h.linear_delta = [fs](pet::target t, const MatD& x) -> MatD {
        MatD sum;
        for (const auto& f : fs) {
            MatD d = f(t, x);
            if (!d.size()) continue;
            if (!sum.size()) sum = d;
            else sum += d;
        }
        return sum;
    };
    return h;
}

}  // namespace cpet::testing
