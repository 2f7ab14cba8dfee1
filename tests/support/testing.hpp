// tests/support/testing.hpp — what every cpet test uses: run a body on every SIMD path, random data,
// relative errors against double-precision references.
#pragma once

#include <doctest/doctest.h>

#include <Eigen/Core>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "cpet/arch/dispatch.hpp"
#include "cpet/core/eigen.hpp"
#include "cpet/core/matrix.hpp"

namespace cpet::testing {

/// True in the sanitizer builds (ASan / TSan): code there runs 10-30x slower, so the few long training tests may
/// run fewer steps there (never weaker checks).
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
inline constexpr bool sanitized = true;
#else
inline constexpr bool sanitized = false;
#endif

/// A test case's backbone configuration and PET policy: the backbone's type names no PET method, so a case that
/// runs a method on a configuration names both (TEST_CASE_TEMPLATE over testing::with<config, policy>).
template <class Config, class Pet>
struct with {
    using config = Config;
    using pet = Pet;
};

/// Every path this build compiled and this CPU runs (always includes scalar).
inline std::vector<arch::isa> available_isas() {
    std::vector<arch::isa> out;
    for (auto i : {arch::isa::scalar, arch::isa::avx2, arch::isa::avx512})
        if (arch::available(i)) out.push_back(i);
    return out;
}

/// Runs body() once per available path with that path forced; the path name is attached to any failure.
template <class Body>
void for_each_isa(Body&& body) {
    for (auto i : available_isas()) {
        arch::scoped_isa forced(i);
        const std::string isa_name(arch::name(i));
        CAPTURE(isa_name);
        body(i);
    }
}

/// Shapes that catch tails and edge cases: 1, primes, one off a vector width, a few larger ones.
inline const std::vector<index_t>& awkward_sizes() {
    static const std::vector<index_t> s{1, 2, 7, 15, 16, 17, 33, 64, 127};
    return s;
}

/// Uniform random matrix in [lo, hi).
inline Matrix<float> random_matrix(index_t rows, index_t cols, unsigned seed, float lo = -1.f, float hi = 1.f) {
    std::mt19937 gen(seed);
    std::uniform_real_distribution<float> dist(lo, hi);
    Matrix<float> m(rows, cols);
    for (index_t i = 0; i < m.size(); ++i) m.data()[i] = dist(gen);
    return m;
}

using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// A float view copied to double (for references).
inline MatD to_double(ConstMatrixView<float> v) { return as_eigen(v).cast<double>(); }

/// ‖got − ref‖_F / ‖ref‖_F (absolute error when ref is ~0).
inline double rel_error(ConstMatrixView<float> got, const MatD& ref) {
    REQUIRE(got.rows() == ref.rows());
    REQUIRE(got.cols() == ref.cols());
    const MatD g = to_double(got);
    const double denom = ref.norm();
    const double num = (g - ref).norm();
    return denom > 1e-30 ? num / denom : num;
}

/// Largest |got − ref| element-wise.
inline double max_abs_error(ConstMatrixView<float> got, const MatD& ref) {
    const MatD g = to_double(got);
    return g.rows() == 0 || g.cols() == 0 ? 0.0 : (g - ref).cwiseAbs().maxCoeff();
}

}  // namespace cpet::testing
