// cpet/pet/lowrank.hpp — what LoRA and recovery modules share: per-target low-rank factors and their checks.
//
// A factor pair of one linear W [out, in] is A [r, in] (the "down" projection, U = x·Aᵀ) and B [out, r] (the "up"
// projection), torch.nn.Linear layout like PEFT's lora_A.weight / lora_B.weight. Initialisation follows PEFT:
// A Kaiming-uniform with a = √5 (bound 1/√in, what torch.nn.Linear does), B zero, so a fresh module adds
// exactly nothing.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "cpet/core/eigen.hpp"
#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/pet/policy.hpp"

namespace cpet::pet::detail {

/// Kaiming-uniform (a = √5) init of an [rows, in] matrix: U(-1/√in, 1/√in); seeded per target so adding a
/// target does not change the others.
inline Matrix<float> kaiming_uniform(index_t rows, index_t in, std::uint64_t seed, target t) {
    Matrix<float> m(rows, in);
    std::mt19937_64 gen(seed * 0x9E3779B97F4A7C15ull + static_cast<std::uint64_t>(t) + 1);
    const float bound = 1.f / std::sqrt(float(in));
    std::uniform_real_distribution<float> dist(-bound, bound);
    for (index_t i = 0; i < m.size(); ++i) m.data()[i] = dist(gen);
    return m;
}

/// Throws shape_error unless 1 <= r <= min(in, out) of target t (`who` names the method).
inline void check_rank(const char* who, index_t r, const layer_dims& d, target t) {
    require<shape_error>(r >= 1, who, ": rank must be >= 1, got ", r);
    const index_t lim = std::min(d.in(t), d.out(t));
    require<shape_error>(r <= lim, who, ": rank ", r, " exceeds min(in, out) = min(", d.in(t), ", ", d.out(t),
                         ") = ", lim, " of target ", target_name(t), " (a low-rank term cannot have a larger rank)");
}

/// Per-target factors A [r, in], B [out, r]; an empty A means "target not adapted".
struct lowrank_factors {
    std::array<Matrix<float>, target_count> A, B;
    layer_dims dims;

    index_t rank(target t) const noexcept { return A[std::size_t(t)].rows(); }
    bool adapted(target t) const noexcept { return !A[std::size_t(t)].empty(); }
    target_set targets() const noexcept {
        target_set s;
        for (int i = 0; i < target_count; ++i)
            if (adapted(target(i))) s.insert(target(i));
        return s;
    }
    /// Sets target t's factors (copies; shapes checked against the layer: A [r, in], B [out, r], r <= min(in, out)).
    void set(const char* who, target t, ConstMatrixView<float> a, ConstMatrixView<float> b) {
        dims.check_targets(target_set{t}, who);
        const std::string an = cpet::detail::concat(who, ": ", target_name(t), " A");
        const std::string bn = cpet::detail::concat(who, ": ", target_name(t), " B");
        check_shape(a, -1, dims.in(t), an.c_str());
        check_rank(who, a.rows(), dims, t);
        check_shape(b, dims.out(t), a.rows(), bn.c_str());
        A[std::size_t(t)] = Matrix<float>(a);
        B[std::size_t(t)] = Matrix<float>(b);
    }
    /// Throws shape_error unless every adapted target exists in `d` and its A is [r, in], B [out, r] there (a
    /// module built for another layer would make the kernels read past x, A or B).
    void check_fits(const layer_dims& d, const char* who, const char* method) const {
        for (int i = 0; i < target_count; ++i) {
            const target t = target(i);
            if (!adapted(t)) continue;
            require<shape_error>(d.has(t), who, ": ", method, ": target ", target_name(t),
                                 " is adapted but the layer has no such linear (its FFN has no gate)");
            const auto& a = A[std::size_t(i)];
            const auto& b = B[std::size_t(i)];
            require<shape_error>(a.cols() == d.in(t) && b.rows() == d.out(t) && b.cols() == a.rows(), who,
                                 ": ", method, ": target ", target_name(t), " expects A [r, ", d.in(t), "] and B [", d.out(t),
                                 ", r] for this layer, the module holds A ", shape_str(a.rows(), a.cols()), " and B ",
                                 shape_str(b.rows(), b.cols()), " (built for another layer shape?)");
        }
    }
    /// Removes target t.
    void clear(target t) {
        A[std::size_t(t)] = Matrix<float>();
        B[std::size_t(t)] = Matrix<float>();
    }
    /// U = x·Aᵀ (Eigen's GEMM: a thin [M, in]×[in, r] product, r/out of the base GEMM's work).
    void project_linear(target t, ConstMatrixView<float> x, MatrixView<float> u) const {
        as_eigen(u).noalias() = as_eigen(x) * as_eigen(A[std::size_t(t)]).transpose();
    }
    /// "q.lora_A" / "q.lora_B" groups.
    void parameters(std::vector<parameter_group>& out, const char* a_name, const char* b_name) const {
        for (int i = 0; i < target_count; ++i)
            if (adapted(target(i))) {
                out.push_back({cpet::detail::concat(target_name(target(i)), '.', a_name), A[std::size_t(i)].size()});
                out.push_back({cpet::detail::concat(target_name(target(i)), '.', b_name), B[std::size_t(i)].size()});
            }
    }
};

}  // namespace cpet::pet::detail
