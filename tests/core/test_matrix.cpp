#include "support/testing.hpp"

#include <cstdint>
#include <limits>

#include "cpet/core/core.hpp"

namespace cpet_test_core_matrix {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;

TEST_CASE("aligned_buffer is 64-byte aligned, zeroed, copyable and movable") {
    for (std::size_t n : {1u, 3u, 17u, 1000u}) {
        aligned_buffer<float> b(n);
        CHECK(reinterpret_cast<std::uintptr_t>(b.data()) % 64 == 0);
        for (std::size_t i = 0; i < n; ++i) CHECK(b[i] == 0.f);
        b[n - 1] = 3.f;
        aligned_buffer<float> c(b);
        CHECK(c[n - 1] == 3.f);
        CHECK(c.data() != b.data());
        aligned_buffer<float> d(std::move(c));
        CHECK(d[n - 1] == 3.f);
        CHECK(c.empty());
    }
    aligned_buffer<float> e(0);
    CHECK(e.empty());
    CHECK(e.data() == nullptr);
}

TEST_CASE("Matrix and views index row-major and slice without copying") {
    Matrix<float> m(4, 5);
    for (index_t r = 0; r < 4; ++r)
        for (index_t c = 0; c < 5; ++c) m(r, c) = float(10 * r + c);
    auto v = m.view();
    CHECK(v(2, 3) == 23.f);
    auto b = v.block(1, 2, 2, 3);
    CHECK(b.rows() == 2);
    CHECK(b.cols() == 3);
    CHECK(b.stride() == 5);
    CHECK(b(1, 2) == 24.f);
    CHECK(b.data() == m.data() + 7);
    ConstMatrixView<float> cv = b;  // mutable -> const view
    CHECK(cv(0, 0) == 12.f);
    CHECK_THROWS_AS(v.middle_rows(3, 2), shape_error);
    CHECK_THROWS_AS(v.middle_cols(-1, 1), shape_error);
    CHECK_THROWS_AS(Matrix<float>(-1, 2), shape_error);
}

TEST_CASE("Matrix::reset and assign refill in place when the size is unchanged") {
    Matrix<float> m(7, 33);
    m.fill(3.f);
    const float* p = m.data();
    m.reset(33, 7);  // same element count: the same storage, zeroed, the new shape
    CHECK(m.data() == p);
    CHECK(m.rows() == 33);
    CHECK(m.cols() == 7);
    for (index_t r = 0; r < m.rows(); ++r)
        for (index_t c = 0; c < m.cols(); ++c) CHECK(m(r, c) == 0.f);
    m.reset(1, 127);
    CHECK(m.size() == 127);
    for (index_t c = 0; c < 127; ++c) CHECK(m(0, c) == 0.f);
    m.reset(0, 5);
    CHECK(m.empty());
    CHECK_THROWS_AS(m.reset(-1, 2), shape_error);

    Matrix<float> src(3, 5);
    for (index_t r = 0; r < 3; ++r)
        for (index_t c = 0; c < 5; ++c) src(r, c) = float(10 * r + c);
    Matrix<float> dst(5, 3);
    const float* q = dst.data();
    dst.assign(src);  // same count: copied in place
    CHECK(dst.data() == q);
    Matrix<float> wide(3, 8);
    for (index_t r = 0; r < 3; ++r)
        for (index_t c = 0; c < 8; ++c) wide(r, c) = float(100 + 10 * r + c);
    dst.assign(wide.view().block(0, 2, 3, 5));  // a strided view
    CHECK(dst.rows() == 3);
    CHECK(dst.cols() == 5);
    for (index_t r = 0; r < 3; ++r)
        for (index_t c = 0; c < 5; ++c) CHECK(dst(r, c) == wide(r, c + 2));
    dst.assign(src);
    for (index_t r = 0; r < 3; ++r)
        for (index_t c = 0; c < 5; ++c) CHECK(dst(r, c) == src(r, c));
}

TEST_CASE("check_shape names the operand and both shapes") {
    Matrix<float> m(3, 4);
    CHECK_NOTHROW(check_shape(m.view(), 3, 4, "x"));
    CHECK_NOTHROW(check_shape(m.view(), -1, 4, "x"));
    try {
        check_shape(m.view(), 3, 5, "gemm: x");
        FAIL("no throw");
    } catch (const shape_error& e) {
        const std::string msg = e.what();
        CHECK(msg.find("gemm: x") != std::string::npos);
        CHECK(msg.find("3x5") != std::string::npos);
        CHECK(msg.find("3x4") != std::string::npos);
    }
    MatrixView<float> bad(m.data(), 2, 4, 3);  // stride < cols
    CHECK_THROWS_AS(check_shape(bad, 2, 4, "bad"), shape_error);
}

TEST_CASE("Eigen interop is zero-copy both ways") {
    Matrix<float> m = testing::random_matrix(7, 33, 1);
    auto e = as_eigen(m);
    CHECK(e.data() == m.data());
    e(3, 4) = 42.f;
    CHECK(m(3, 4) == 42.f);

    EigenRowMajor<float> em = EigenRowMajor<float>::Random(5, 6);
    auto v = view_of(em);
    CHECK(v.data() == em.data());
    CHECK(v(4, 5) == em(4, 5));
    auto blk = view_of(em).block(1, 1, 3, 3);
    CHECK(as_eigen(ConstMatrixView<float>(blk)).isApprox(em.block(1, 1, 3, 3)));

    Matrix<float> copy = to_matrix(em);
    CHECK(copy(2, 3) == em(2, 3));
    CHECK(copy.data() != em.data());
}

TEST_CASE("parallel_for visits every index exactly once") {
    for (int threads : {1, 2}) {
        set_num_threads(threads);
        std::vector<int> hits(1001, 0);
        parallel_for(index_t(0), index_t(1001), [&](index_t i) { hits[std::size_t(i)] += 1; });
        for (int h : hits) CHECK(h == 1);
        int calls = 0;
        parallel_for(index_t(5), index_t(5), [&](index_t) { ++calls; });
        CHECK(calls == 0);
    }
    set_num_threads(max_threads());
}

}  // namespace cpet_test_core_matrix
