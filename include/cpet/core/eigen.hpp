// cpet/core/eigen.hpp — zero-copy interop between cpet views and Eigen.
//
// Eigen is the reference library of the tests and the natural container of a C++ user's weights; neither
// direction copies: `as_eigen(view)` maps cpet memory, `view_of(eigen_matrix)` views Eigen memory.
#pragma once

#include <Eigen/Core>

#include "cpet/core/matrix.hpp"

namespace cpet {

template <class T>
using EigenRowMajor = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

template <class T>
using EigenMap = Eigen::Map<EigenRowMajor<std::remove_const_t<T>>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class T>
using EigenConstMap = Eigen::Map<const EigenRowMajor<std::remove_const_t<T>>, Eigen::Unaligned, Eigen::OuterStride<>>;

/// An Eigen map over a cpet view (mutable).
template <class T>
    requires(!std::is_const_v<T>)
EigenMap<T> as_eigen(MatrixView<T> v) {
    return EigenMap<T>(v.data(), v.rows(), v.cols(), Eigen::OuterStride<>(v.stride()));
}
/// An Eigen map over a cpet view (read-only).
template <class T>
EigenConstMap<T> as_eigen(ConstMatrixView<T> v) {
    return EigenConstMap<T>(v.data(), v.rows(), v.cols(), Eigen::OuterStride<>(v.stride()));
}
template <class T>
EigenMap<T> as_eigen(Matrix<T>& m) {
    return as_eigen(m.view());
}
template <class T>
EigenConstMap<T> as_eigen(const Matrix<T>& m) {
    return as_eigen(m.view());
}

/// A cpet view of a row-major Eigen matrix, map or block (any Eigen object with direct row-major access).
template <class Derived>
    requires(static_cast<bool>(Derived::IsRowMajor) || Derived::ColsAtCompileTime == 1)
auto view_of(Eigen::PlainObjectBase<Derived>& m) {
    using T = typename Derived::Scalar;
    return MatrixView<T>(m.data(), m.rows(), m.cols(), m.outerStride());
}
template <class Derived>
    requires(static_cast<bool>(Derived::IsRowMajor) || Derived::ColsAtCompileTime == 1)
auto view_of(const Eigen::PlainObjectBase<Derived>& m) {
    using T = typename Derived::Scalar;
    return ConstMatrixView<T>(m.data(), m.rows(), m.cols(), m.outerStride());
}
template <class T>
MatrixView<T> view_of(EigenMap<T>& m) {
    return MatrixView<T>(m.data(), m.rows(), m.cols(), m.outerStride());
}
template <class T>
ConstMatrixView<T> view_of(const Eigen::Ref<const EigenRowMajor<T>, 0, Eigen::OuterStride<>>& m) {
    return ConstMatrixView<T>(m.data(), m.rows(), m.cols(), m.outerStride());
}

/// Deep copy of a view into an Eigen matrix (for references and tests).
template <class T>
EigenRowMajor<std::remove_const_t<T>> to_eigen(ConstMatrixView<T> v) {
    return as_eigen(v);
}
/// Deep copy of any Eigen expression into an owning cpet matrix.
template <class Derived>
Matrix<typename Derived::Scalar> to_matrix(const Eigen::MatrixBase<Derived>& e) {
    Matrix<typename Derived::Scalar> m(e.rows(), e.cols());
    as_eigen(m) = e;
    return m;
}

}  // namespace cpet
