// cpet/core/matrix.hpp — row-major matrices: cheap non-owning views and an owning aligned matrix.
//
// A view is (pointer, rows, cols, stride) with stride >= cols counted in elements, exactly what BLAS calls
// a row-major matrix with leading dimension `stride`. Kernels take raw pointers and strides; the layers above
// pass views. `MatrixView<const T>` is the read-only view, and a mutable view converts to it implicitly.
#pragma once

#include <cstddef>
#include <string>
#include <type_traits>

#include "cpet/core/buffer.hpp"
#include "cpet/core/error.hpp"

namespace cpet {

using index_t = std::ptrdiff_t;

template <class T>
class MatrixView {
public:
    using value_type = std::remove_const_t<T>;

    constexpr MatrixView() = default;
    constexpr MatrixView(T* data, index_t rows, index_t cols, index_t stride)
        : data_(data), rows_(rows), cols_(cols), stride_(stride) {}
    constexpr MatrixView(T* data, index_t rows, index_t cols) : MatrixView(data, rows, cols, cols) {}

    /// A view of mutable elements converts to a view of const elements.
    template <class U>
        requires(std::is_const_v<T> && std::is_same_v<std::remove_const_t<T>, U>)
    constexpr MatrixView(const MatrixView<U>& other)  // NOLINT(google-explicit-constructor)
        : MatrixView(other.data(), other.rows(), other.cols(), other.stride()) {}

    constexpr T* data() const noexcept { return data_; }
    constexpr index_t rows() const noexcept { return rows_; }
    constexpr index_t cols() const noexcept { return cols_; }
    constexpr index_t stride() const noexcept { return stride_; }
    constexpr index_t size() const noexcept { return rows_ * cols_; }
    constexpr bool empty() const noexcept { return rows_ == 0 || cols_ == 0; }
    constexpr bool contiguous() const noexcept { return stride_ == cols_ || rows_ <= 1; }

    constexpr T* row(index_t r) const noexcept { return data_ + r * stride_; }
    constexpr T& operator()(index_t r, index_t c) const noexcept { return data_[r * stride_ + c]; }

    /// Rows [r0, r0 + n) as a view sharing this storage.
    MatrixView middle_rows(index_t r0, index_t n) const {
        require<shape_error>(r0 >= 0 && n >= 0 && r0 + n <= rows_, "middle_rows(", r0, ", ", n, ") out of range for ",
                             rows_, " rows");
        return {data_ + r0 * stride_, n, cols_, stride_};
    }
    /// Columns [c0, c0 + n) as a view sharing this storage (stride unchanged).
    MatrixView middle_cols(index_t c0, index_t n) const {
        require<shape_error>(c0 >= 0 && n >= 0 && c0 + n <= cols_, "middle_cols(", c0, ", ", n, ") out of range for ",
                             cols_, " cols");
        return {data_ + c0, rows_, n, stride_};
    }
    /// The block [r0, r0+nr) x [c0, c0+nc).
    MatrixView block(index_t r0, index_t c0, index_t nr, index_t nc) const {
        return middle_rows(r0, nr).middle_cols(c0, nc);
    }

private:
    T* data_ = nullptr;
    index_t rows_ = 0;
    index_t cols_ = 0;
    index_t stride_ = 0;
};

template <class T>
using ConstMatrixView = MatrixView<const T>;

/// "3x4" — used in every shape message.
inline std::string shape_str(index_t rows, index_t cols) { return detail::concat(rows, 'x', cols); }
template <class T>
std::string shape_str(const MatrixView<T>& m) {
    return shape_str(m.rows(), m.cols());
}

/// Throws shape_error naming `what` unless `m` is rows x cols. A negative expectation matches anything.
template <class T>
void check_shape(const MatrixView<T>& m, index_t rows, index_t cols, const char* what) {
    const bool ok = (rows < 0 || m.rows() == rows) && (cols < 0 || m.cols() == cols);
    if (!ok)
        throw shape_error(detail::concat(what, ": expected shape ", rows < 0 ? std::string("*") : std::to_string(rows),
                                         'x', cols < 0 ? std::string("*") : std::to_string(cols), ", got ",
                                         shape_str(m)));
    if (m.stride() < m.cols() && m.rows() > 1)
        throw shape_error(detail::concat(what, ": row stride ", m.stride(), " is smaller than its ", m.cols(),
                                         " columns"));
    if (m.data() == nullptr && !m.empty()) throw shape_error(detail::concat(what, ": null data for a non-empty view"));
}

/// An owning, row-major matrix whose rows are contiguous (stride == cols) and whose storage is 64-byte aligned.
template <class T>
class Matrix {
public:
    Matrix() = default;
    Matrix(index_t rows, index_t cols) : buf_(checked_size(rows, cols)), rows_(rows), cols_(cols) {}
    /// Deep copy of any view.
    explicit Matrix(ConstMatrixView<T> v) : Matrix(v.rows(), v.cols()) {
        for (index_t r = 0; r < rows_; ++r)
            for (index_t c = 0; c < cols_; ++c) (*this)(r, c) = v(r, c);
    }

    T* data() noexcept { return buf_.data(); }
    const T* data() const noexcept { return buf_.data(); }
    index_t rows() const noexcept { return rows_; }
    index_t cols() const noexcept { return cols_; }
    index_t stride() const noexcept { return cols_; }
    index_t size() const noexcept { return rows_ * cols_; }
    bool empty() const noexcept { return rows_ == 0 || cols_ == 0; }
    T* row(index_t r) noexcept { return data() + r * cols_; }
    const T* row(index_t r) const noexcept { return data() + r * cols_; }
    T& operator()(index_t r, index_t c) noexcept { return buf_[static_cast<std::size_t>(r * cols_ + c)]; }
    const T& operator()(index_t r, index_t c) const noexcept { return buf_[static_cast<std::size_t>(r * cols_ + c)]; }

    MatrixView<T> view() noexcept { return {data(), rows_, cols_, cols_}; }
    ConstMatrixView<T> view() const noexcept { return {data(), rows_, cols_, cols_}; }
    operator MatrixView<T>() noexcept { return view(); }               // NOLINT(google-explicit-constructor)
    operator ConstMatrixView<T>() const noexcept { return view(); }    // NOLINT(google-explicit-constructor)

    /// Holds rows × cols zeros afterwards, keeping the allocation when the element count is unchanged.
    void reset(index_t rows, index_t cols) {
        buf_.reset(checked_size(rows, cols));
        rows_ = rows;
        cols_ = cols;
    }
    /// A deep copy of `v`, keeping the allocation when the element count is unchanged. `v` must not view this.
    void assign(ConstMatrixView<T> v) {
        const std::size_t n = checked_size(v.rows(), v.cols());
        if (n != buf_.size()) buf_.reset(n);  // every element is written below
        rows_ = v.rows();
        cols_ = v.cols();
        for (index_t r = 0; r < rows_; ++r) {
            const T* src = v.row(r);
            T* dst = row(r);
            for (index_t c = 0; c < cols_; ++c) dst[c] = src[c];
        }
    }

    void fill(T value) noexcept {
        for (auto& x : buf_) x = value;
    }
    std::size_t bytes() const noexcept { return buf_.size() * sizeof(T); }

private:
    static std::size_t checked_size(index_t rows, index_t cols) {
        require<shape_error>(rows >= 0 && cols >= 0, "Matrix: negative shape ", shape_str(rows, cols));
        return static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols);
    }

    aligned_buffer<T> buf_;
    index_t rows_ = 0;
    index_t cols_ = 0;
};

}  // namespace cpet
