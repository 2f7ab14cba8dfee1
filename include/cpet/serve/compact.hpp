// cpet/serve/compact.hpp — a registered task's layer, with its low-rank factors kept in fp32, bf16 or int8.
//
// Many tasks resident means the tasks' bytes matter once the backbone is shared: a LoRA r = 16 on q and v of a
// TinyLlama layer is 0.6 MiB in fp32. A task registered with factor_storage::bf16 keeps its LoRA / rsLoRA /
// recovery factors A [r, in] and B [out, r] as bf16 (2x smaller), with factor_storage::int8 as int8 codes with
// one fp32 scale per row (symmetric, scale = max|row| / 127: ~4x smaller); its other methods stay as they are.
// The kernels read them as stored: the expand factor B rides in the GEMM epilogue as a (segmented) low-rank term
// whose packing — the fused GEMMs pack B per call anyway — or generic twin decodes it (kernels/epilogue.hpp);
// the shrink factor A is decoded one target at a time into the caller's scratch for the thin U = x·Aᵀ GEMM (r·in
// values, what one row of x costs in multiply-adds). What the rounding changes in a layer's output against fp32
// factors is measured by tests/serve/test_compact.cpp and printed by bench_serve.
//
// serve::task_layer is the modules type the registry stores and the layers run (every hook, like pet::task): the
// task's methods, with the low-rank ones moved into compact_lowrank members when stored compact. Stored as fp32
// it IS the pet::task (every hook forwards to it, so the single-task fused path is today's).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <type_traits>
#include <vector>

#include "cpet/core/bf16.hpp"
#include "cpet/core/eigen.hpp"
#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/kernels/activations.hpp"
#include "cpet/kernels/epilogue.hpp"
#include "cpet/pet/policy.hpp"
#include "cpet/pet/task.hpp"

namespace cpet::serve {

/// How a registered task keeps its low-rank factors.
enum class factor_storage { fp32, bf16, int8 };

inline constexpr const char* factor_storage_name(factor_storage s) noexcept {
    return s == factor_storage::fp32 ? "fp32" : s == factor_storage::bf16 ? "bf16" : "int8";
}

/// A factor matrix [rows, cols], row-major, stored as fp32, bf16 or int8 with one fp32 scale per row.
class compact_matrix {
public:
    compact_matrix() = default;
    compact_matrix(ConstMatrixView<float> m, factor_storage s) : rows_(m.rows()), cols_(m.cols()) {
        const auto n = static_cast<std::size_t>(rows_ * cols_);
        if (s == factor_storage::fp32) {
            type_ = kernels::factor_type::f32;
            f32_.resize(n);
            for (index_t r = 0; r < rows_; ++r) std::copy_n(m.row(r), cols_, f32_.data() + r * cols_);
        } else if (s == factor_storage::bf16) {
            type_ = kernels::factor_type::bf16;
            bf16_.resize(n);
            for (index_t r = 0; r < rows_; ++r)
                for (index_t c = 0; c < cols_; ++c) bf16_[std::size_t(r * cols_ + c)] = to_bf16(m(r, c));
        } else {
            type_ = kernels::factor_type::s8;
            s8_.resize(n);
            scale_.resize(std::size_t(rows_));
            for (index_t r = 0; r < rows_; ++r) {
                float mx = 0.f;
                for (index_t c = 0; c < cols_; ++c) mx = std::max(mx, std::abs(m(r, c)));
                const float sc = mx / 127.f;
                scale_[std::size_t(r)] = sc;
                for (index_t c = 0; c < cols_; ++c)
                    s8_[std::size_t(r * cols_ + c)] =
                        sc > 0 ? std::int8_t(std::clamp(std::nearbyint(m(r, c) / sc), -127.f, 127.f)) : std::int8_t(0);
            }
        }
    }

    index_t rows() const noexcept { return rows_; }
    index_t cols() const noexcept { return cols_; }
    bool empty() const noexcept { return rows_ == 0; }
    kernels::factor_type type() const noexcept { return type_; }
    const void* data() const noexcept {
        return type_ == kernels::factor_type::f32    ? static_cast<const void*>(f32_.data())
               : type_ == kernels::factor_type::bf16 ? static_cast<const void*>(bf16_.data())
                                                     : static_cast<const void*>(s8_.data());
    }
    /// Per-row scales (int8 only).
    const float* scales() const noexcept { return scale_.data(); }
    /// Element (r, c) as a float.
    float at(index_t r, index_t c) const noexcept {
        const auto i = std::size_t(r * cols_ + c);
        return type_ == kernels::factor_type::f32    ? f32_[i]
               : type_ == kernels::factor_type::bf16 ? from_bf16(bf16_[i])
                                                     : scale_[std::size_t(r)] * float(s8_[i]);
    }
    /// The whole matrix decoded into out [rows, cols] (any row stride).
    void decode(MatrixView<float> out) const noexcept {
        for (index_t r = 0; r < rows_; ++r)
            for (index_t c = 0; c < cols_; ++c) out(r, c) = at(r, c);
    }
    /// Bytes held (codes and scales).
    std::size_t bytes() const noexcept {
        return f32_.size() * 4 + bf16_.size() * 2 + s8_.size() + scale_.size() * 4;
    }

private:
    kernels::factor_type type_ = kernels::factor_type::f32;
    index_t rows_ = 0, cols_ = 0;
    std::vector<float> f32_;
    std::vector<std::uint16_t> bf16_;
    std::vector<std::int8_t> s8_;
    std::vector<float> scale_;
};

/// One low-rank member of a task (LoRA, rsLoRA, recovery in either form) with its factors compact: per target
/// A [r, in] and B [out, r], the member's scale s and the nonlinearity on U (GELU for the paper's recovery form):
/// its term is s·act(x·Aᵀ)·Bᵀ, as the member's own.
struct compact_lowrank {
    std::string_view method;  ///< the member's method name ("lora", "recovery", ...)
    std::array<compact_matrix, pet::target_count> A, B;
    std::array<float, pet::target_count> scale{};
    kernels::activation act = kernels::activation::none;

    index_t rank(pet::target t) const noexcept { return A[std::size_t(t)].rows(); }

    /// U [M, rank(t)] = act(x·Aᵀ) into u (any row stride): A decoded into the caller's scratch, then one thin GEMM.
    void project(pet::target t, ConstMatrixView<float> x, MatrixView<float> u, pet::scratch& s) const {
        const compact_matrix& a = A[std::size_t(t)];
        auto ad = s.matrix(pet::slot::factor, a.rows(), a.cols());
        a.decode(ad);
        as_eigen(u).noalias() = as_eigen(x) * as_eigen(ad).transpose();
        if (act != kernels::activation::none)
            for (index_t r = 0; r < u.rows(); ++r) kernels::activate_inplace(act, u.row(r), u.cols());
    }
    /// The epilogue term of target t for rows [row0, row0 + rows) whose U is u (row stride ld_u).
    kernels::lowrank_segment segment(pet::target t, index_t row0, index_t rows, const float* u, index_t ld_u) const {
        const compact_matrix& b = B[std::size_t(t)];
        kernels::lowrank_segment sg;
        sg.row0 = row0, sg.rows = rows, sg.u = u, sg.ld_u = ld_u;
        sg.b = b.data(), sg.ld_b = b.cols(), sg.b_type = b.type(), sg.b_scale = b.scales();
        sg.rank = rank(t), sg.scale = scale[std::size_t(t)];
        return sg;
    }
    void check_fits(const pet::layer_dims& d, const char* who) const {
        for (int i = 0; i < pet::target_count; ++i) {
            const auto t = pet::target(i);
            if (A[std::size_t(i)].empty()) continue;
            const auto& a = A[std::size_t(i)];
            const auto& b = B[std::size_t(i)];
            require<shape_error>(d.has(t) && a.cols() == d.in(t) && b.rows() == d.out(t) && b.cols() == a.rows(), who,
                                 ": ", method, " (compact): target ", pet::target_name(t), " expects A [r, ", d.in(t),
                                 "] and B [", d.out(t), ", r] for this layer, it holds A ", shape_str(a.rows(), a.cols()),
                                 " and B ", shape_str(b.rows(), b.cols()));
        }
    }
    std::size_t bytes() const noexcept {
        std::size_t n = 0;
        for (int i = 0; i < pet::target_count; ++i) n += A[std::size_t(i)].bytes() + B[std::size_t(i)].bytes();
        return n;
    }
    /// Values held (factor entries).
    index_t parameters() const noexcept {
        index_t n = 0;
        for (int i = 0; i < pet::target_count; ++i)
            n += A[std::size_t(i)].rows() * A[std::size_t(i)].cols() + B[std::size_t(i)].rows() * B[std::size_t(i)].cols();
        return n;
    }
};

namespace detail {

/// The low-rank methods whose factors compact storage keeps: U = x·Aᵀ (GELU'd for the paper's recovery).
template <class M>
inline constexpr bool compactable = std::is_same_v<M, pet::lora::modules> || std::is_same_v<M, pet::rslora::modules> ||
                                    std::is_same_v<M, pet::recovery::modules> ||
                                    std::is_same_v<M, pet::recovery_linear::modules>;

/// Member m's factors stored as s.
template <class M>
    requires compactable<M>
compact_lowrank compact_member(const M& m, factor_storage s) {
    constexpr bool rec = std::is_same_v<M, pet::recovery::modules>;
    compact_lowrank out;
    out.method = std::is_same_v<M, pet::lora::modules>     ? "lora"
                 : std::is_same_v<M, pet::rslora::modules> ? "rslora"
                 : rec                                     ? "recovery"
                                                           : "recovery_linear";
    out.act = rec ? pet::recovery::act : kernels::activation::none;
    for (int i = 0; i < pet::target_count; ++i) {
        const auto t = pet::target(i);
        if (!m.rank(t)) continue;
        out.A[std::size_t(i)] = compact_matrix(m.A(t), s);
        out.B[std::size_t(i)] = compact_matrix(m.B(t), s);
        out.scale[std::size_t(i)] = m.lowrank_scale(t);
    }
    return out;
}

}  // namespace detail

/// One layer of a registered task (see the top of this file): a modules type with every hook.
class task_layer {
public:
    static constexpr pet::hook_set hooks = pet::task::hooks;

    task_layer() = default;
    /// `t` as it is (fp32), or with its low-rank members' factors stored as `s`.
    explicit task_layer(pet::task t, factor_storage s = factor_storage::fp32) : storage_(s) {
        if (s == factor_storage::fp32) {
            task_ = std::move(t);
            return;
        }
        for (std::size_t i = 0; i < t.size(); ++i)
            t.visit_method(i, [&](const auto& m) {
                using M = std::decay_t<decltype(m)>;
                if constexpr (detail::compactable<M>) {
                    compact_.push_back(detail::compact_member(m, s));
                } else {
                    static_assert(!pet::LowrankParts<M>, "cpet serve::task_layer: a low-rank method compact storage "
                                                         "does not know; add it to serve::detail::compactable");
                    task_.add(m);
                }
            });
    }

    /// The task's methods kept as they are (all of them in fp32 storage).
    const pet::task& task() const noexcept { return task_; }
    /// The low-rank members stored compact (none in fp32 storage).
    std::span<const compact_lowrank> compact() const noexcept { return compact_; }
    factor_storage storage() const noexcept { return storage_; }

    bool active(pet::hook h) const noexcept {
        return task_.active(h) || (h == pet::hook::linear && !compact_.empty());
    }
    void check_fits(const pet::layer_dims& d, const char* who) const {
        task_.check_fits(d, who);
        for (const auto& c : compact_) c.check_fits(d, who);
    }
    /// Bytes of the task's parameters as stored.
    std::size_t bytes() const {
        std::size_t n = task_.bytes();
        for (const auto& c : compact_) n += c.bytes();
        return n;
    }

    // ---- hooks ----
    /// fp32: the task's own fused term. Compact: one segment per member over all rows (kernels/epilogue.hpp),
    /// each B read as stored, U of every member side by side in one scratch matrix.
    std::optional<pet::lowrank_args> lowrank(pet::target t, ConstMatrixView<float> x, pet::scratch& s) const {
        if (compact_.empty()) return task_.lowrank(t, x, s);
        index_t R = 0;
        for (const auto& c : compact_) R += c.rank(t);
        if (R == 0 || x.rows() == 0) return std::nullopt;
        auto u = s.matrix(pet::slot::lowrank_u, x.rows(), R);
        auto& segs = s.segments(compact_.size());
        index_t col = 0;
        for (const auto& c : compact_) {
            const index_t r = c.rank(t);
            if (!r) continue;
            c.project(t, x, u.middle_cols(col, r), s);
            segs.push_back(c.segment(t, 0, x.rows(), u.data() + col, u.stride()));
            col += r;
        }
        pet::lowrank_args out;
        out.segments = segs;
        return out;
    }
    void sublayer(pet::sublayer w, ConstMatrixView<float> in, MatrixView<float> out, pet::scratch& s) const {
        task_.sublayer(w, in, out, s);
    }
    std::optional<pet::prefix_kv> prefix() const { return task_.prefix(); }
    ConstMatrixView<float> virtual_tokens() const { return task_.virtual_tokens(); }
    std::optional<std::span<const float>> scale(pet::target t) const { return task_.scale(t); }
    std::optional<std::span<const float>> bias_delta(pet::target t) const { return task_.bias_delta(t); }
    std::optional<std::span<const float>> norm_bias_delta(pet::norm_site n) const { return task_.norm_bias_delta(n); }

private:
    pet::task task_;
    std::vector<compact_lowrank> compact_;
    factor_storage storage_ = factor_storage::fp32;
};

static_assert(pet::check_modules<task_layer>());

}  // namespace cpet::serve
