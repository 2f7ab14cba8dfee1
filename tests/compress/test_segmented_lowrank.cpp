// The segmented low-rank epilogue (kernels::lowrank_segment: each run of rows its own task's s·U·Bᵀ, a mixed-task
// batch's term) on every weight format and ISA: the fused kernels (fp32 GEMM and GEMV, the weight-only quantized
// blocked GEMM) and the generic twin (split epilogue: the quantized decode kernel, W8A8, N:M sparse) give each
// run of rows what it gets alone with its task's plain term (≤ 1e-6), match a double reference, and never read a
// row's U past its own segment's rank (those entries are NaN here) — with B stored in fp32, bf16 or int8 with row
// scales (read as stored; alone means the plain fp32 term of the decoded B), and with a run's term split into two
// overlapping segments; a malformed segment list is refused by name.
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <random>
#include <type_traits>
#include <tuple>
#include <vector>

#include "cpet/compress/compress.hpp"
#include "cpet/core/bf16.hpp"
#include "support/testing.hpp"

namespace cpet_test_compress_segmented_lowrank {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using testing::MatD;

namespace {

double ref_act(kernels::activation a, double x) {
    if (a != kernels::activation::gelu_tanh) return x;
    return 0.5 * x * (1 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
}

/// A task's expand factor B [N, r] as stored (fp32, bf16 or int8 with per-row scales) and as the kernels must
/// read it (`decoded`).
struct task_term {
    Matrix<float> b, decoded;
    float scale = 1.f;
    kernels::factor_type type = kernels::factor_type::f32;
    std::vector<std::uint16_t> h;
    std::vector<std::int8_t> q;
    std::vector<float> row_scale;

    task_term(Matrix<float> b_, float s, kernels::factor_type t) : b(std::move(b_)), decoded(b), scale(s), type(t) {
        const index_t N = b.rows(), r = b.cols();
        h.resize(std::size_t(N * r));
        q.resize(std::size_t(N * r));
        row_scale.resize(std::size_t(N));
        for (index_t n = 0; n < N; ++n) {
            float mx = 0.f;
            for (index_t j = 0; j < r; ++j) mx = std::max(mx, std::abs(b(n, j)));
            row_scale[std::size_t(n)] = mx / 127.f;
            for (index_t j = 0; j < r; ++j) {
                const auto i = std::size_t(n * r + j);
                h[i] = to_bf16(b(n, j));
                q[i] = std::int8_t(mx > 0 ? std::nearbyint(b(n, j) / row_scale[std::size_t(n)]) : 0);
                if (t == kernels::factor_type::bf16) decoded(n, j) = from_bf16(h[i]);
                if (t == kernels::factor_type::s8) decoded(n, j) = row_scale[std::size_t(n)] * float(q[i]);
            }
        }
    }
    index_t rank() const { return b.cols(); }
    /// Columns [c0, c0 + n) as a segment's B (the caller sets rows and U).
    void columns(kernels::lowrank_segment& sg, index_t c0, index_t n) const {
        sg.b_type = type, sg.ld_b = b.cols(), sg.rank = n, sg.scale = scale;
        if (type == kernels::factor_type::f32) sg.b = b.data() + c0;
        else if (type == kernels::factor_type::bf16) sg.b = h.data() + c0;
        else sg.b = q.data() + c0, sg.b_scale = row_scale.data();
    }
};

/// A row layout of M rows: runs of 1..13 rows (1..3 for M <= 8) with task t (or none, -1).
struct layout {
    struct run {
        index_t row0, rows;
        int task;  // -1: no segment (rows without a term)
    };
    std::vector<run> runs;
};

layout make_layout(index_t M, unsigned seed) {
    layout l;
    std::mt19937 gen(seed);
    index_t r = 0;
    int k = 0;
    while (r < M) {
        const index_t n = std::min<index_t>(M - r, 1 + index_t(gen() % (M <= 8 ? 3 : 13)));  // GEMV: short runs
        const int tasks[] = {0, 1, -1, 2, 3, 0, 4, 1};  // tasks repeat apart (their B is packed once)
        l.runs.push_back({r, n, tasks[k++ % 8]});
        r += n;
    }
    return l;
}

/// `storage`: how the tasks' B are kept; `split`: each run's term as two overlapping segments (columns
/// [0, r/2) and [r/2, r) of its factors over the same rows: a task of two members).
template <class Policy>
void segmented_equals_alone(kernels::factor_type storage, bool split) {
    const index_t N = 70, K = 288;  // 3 panels (the last partial), two K slices of the blocked GEMM
    const auto w = testing::random_matrix(N, K, 11, -0.5f, 0.5f);
    const auto f = Policy::compress(w, nullptr);
    std::vector<task_term> tasks;
    const index_t ranks[] = {3, 8, 16, 1, 0};
    const float scales[] = {0.5f, 2.f, 1.f, -1.f, 1.f};
    for (int t = 0; t < 5; ++t)
        tasks.emplace_back(testing::random_matrix(N, ranks[t], 20u + unsigned(t), -0.3f, 0.3f), scales[t], storage);
    const index_t R = 16;
    const auto bias = testing::random_matrix(1, N, 3);
    const Matrix<float> wd = f.to_dense();
    const std::string stored = kernels::factor_type_name(storage);
    CAPTURE(stored);
    CAPTURE(split);
    for (index_t M : {5, 8, 23, 45, 301}) {  // GEMV / decode kernels, blocked below and above 32 rows, several row blocks
        CAPTURE(M);
        const auto x = testing::random_matrix(M, K, unsigned(M));
        const auto res = testing::random_matrix(M, N, unsigned(M) + 1);
        Matrix<float> u = testing::random_matrix(M, R, unsigned(M) + 2);
        const layout L = make_layout(M, unsigned(M) + 3);
        std::vector<kernels::lowrank_segment> segs;
        for (const auto& rn : L.runs) {
            const int t = rn.task;
            for (index_t i = 0; i < rn.rows; ++i)  // what no kernel may read: U past the row's own rank
                for (index_t c = t < 0 ? 0 : tasks[std::size_t(t)].rank(); c < R; ++c)
                    u(rn.row0 + i, c) = std::numeric_limits<float>::quiet_NaN();
            if (t < 0) continue;
            if (segs.size() == 2) segs.push_back({rn.row0, 0, nullptr, 0, nullptr, 0, 5, 1.f});  // no rows
            const auto& tk = tasks[std::size_t(t)];
            const index_t h = split && tk.rank() >= 2 ? tk.rank() / 2 : tk.rank();
            kernels::lowrank_segment sg{rn.row0, rn.rows, u.row(rn.row0), R};
            tk.columns(sg, 0, h);
            segs.push_back(sg);
            if (h < tk.rank()) {  // the rest of its columns, over the same rows
                sg.u = u.row(rn.row0) + h;
                tk.columns(sg, h, tk.rank() - h);
                segs.push_back(sg);
            }
        }
        for (auto act : {kernels::activation::none, kernels::activation::gelu_tanh}) {
            if (act != kernels::activation::none && (split || storage != kernels::factor_type::f32)) continue;
            kernels::epilogue ep;
            ep.bias = bias.data();
            ep.act = act;
            ep.residual = res.data();
            ep.ld_residual = N;
            ep.segments = segs.data();
            ep.segment_count = index_t(segs.size());
            // the double reference (to_dense: the weights the format multiplies; W8A8 also rounds x, so it has
            // only the comparison with its own plain path)
            MatD pre = testing::to_double(x) * testing::to_double(wd).transpose() + MatD::Ones(M, 1) * testing::to_double(bias);
            for (const auto& rn : L.runs) {
                if (rn.task < 0 || tasks[std::size_t(rn.task)].rank() == 0) continue;
                const auto& tk = tasks[std::size_t(rn.task)];
                pre.middleRows(rn.row0, rn.rows) += double(tk.scale) *
                    testing::to_double(u.view().block(rn.row0, 0, rn.rows, tk.rank())) * testing::to_double(tk.decoded).transpose();
            }
            MatD ref = pre.unaryExpr([&](double v) { return ref_act(act, v); }) + testing::to_double(res);
            testing::for_each_isa([&](arch::isa) {
                Matrix<float> y(M, N);
                f.matmul(x, y, ep);
                for (index_t i = 0; i < y.size(); ++i) REQUIRE(std::isfinite(y.data()[i]));
                if constexpr (!std::is_same_v<Policy, compress::w8a8>) CHECK(testing::rel_error(y, ref) <= 1e-5);
                for (const auto& rn : L.runs) {  // each run alone, with its task's plain fp32 term of the decoded B
                    CAPTURE(rn.row0);
                    CAPTURE(rn.task);
                    kernels::epilogue one;
                    one.bias = bias.data();
                    one.act = act;
                    one.residual = res.row(rn.row0);
                    one.ld_residual = N;
                    Matrix<float> ua;
                    if (rn.task >= 0 && tasks[std::size_t(rn.task)].rank() > 0) {
                        const auto& tk = tasks[std::size_t(rn.task)];
                        ua = Matrix<float>(u.view().block(rn.row0, 0, rn.rows, tk.rank()));
                        one.lowrank_u = ua.data(), one.ld_u = ua.stride(), one.rank = tk.rank();
                        one.lowrank_b = tk.decoded.data(), one.ld_b = tk.decoded.stride(), one.lowrank_scale = tk.scale;
                    }
                    Matrix<float> ya(rn.rows, N);
                    f.matmul(x.view().middle_rows(rn.row0, rn.rows), ya, one);
                    CHECK(testing::rel_error(y.view().middle_rows(rn.row0, rn.rows), testing::to_double(ya)) <= 1e-6);
                }
            });
        }
    }
}

}  // namespace

using formats = std::tuple<compress::dense, compress::int8_per_channel,
                           compress::quantized<compress::int4, compress::per_group<16>, compress::asymmetric>,
                           compress::w8a8, compress::nm_sparse<2, 4>>;

TEST_CASE_TEMPLATE_DEFINE("a segmented low-rank term gives each run of rows its task's term alone", P, segmented_id) {
    for (auto storage : {kernels::factor_type::f32, kernels::factor_type::bf16, kernels::factor_type::s8})
        for (bool split : {false, true}) segmented_equals_alone<P>(storage, split);
}
TEST_CASE_TEMPLATE_APPLY(segmented_id, formats);

TEST_CASE("malformed low-rank segments are refused naming the problem") {
    const index_t M = 10, N = 8, K = 4;
    const auto w = testing::random_matrix(N, K, 1);
    const auto x = testing::random_matrix(M, K, 2);
    const auto u = testing::random_matrix(M, 2, 3);
    const auto b = testing::random_matrix(N, 2, 4);
    Matrix<float> y(M, N);
    const auto dense = compress::dense::compress(w, nullptr);
    const auto sparse = compress::nm_sparse<2, 4>::compress(w, nullptr);
    const auto q8 = compress::int8_per_channel::compress(w, nullptr);
    auto run = [&](std::vector<kernels::lowrank_segment> segs, const char* what, index_t rank = 0) {
        kernels::epilogue ep;
        ep.segments = segs.data();
        ep.segment_count = index_t(segs.size());
        ep.rank = rank, ep.lowrank_u = u.data(), ep.ld_u = 2, ep.lowrank_b = b.data(), ep.ld_b = 2;
        CHECK_THROWS_WITH_AS(dense.matmul(x, y, ep), doctest::Contains(what), shape_error);
        CHECK_THROWS_WITH_AS(sparse.matmul(x, y, ep), doctest::Contains(what), shape_error);
        CHECK_THROWS_WITH_AS(q8.matmul(x, y, ep), doctest::Contains(what), shape_error);
    };
    const kernels::lowrank_segment a{0, 4, u.data(), 2, b.data(), 2, 2, 1.f};
    const kernels::lowrank_segment c{6, 4, u.row(6), 2, b.data(), 2, 2, 1.f};
    run({c, a}, "low-rank segment 1 covers rows [0, 4), expected runs in non-decreasing order of their first row");
    run({a, {8, 4, u.row(8), 2, b.data(), 2, 2, 1.f}}, "within the 10 rows");
    run({a, {6, 4, u.row(6), 2, b.data(), 2, 2, 1.f, kernels::factor_type::s8}}, "has int8 B without its per-row scales");
    run({a, {6, 4, u.row(6), 1, b.data(), 2, 2, 1.f}}, "low-rank segment 1 of rank 2 needs U and B with row strides");
    run({a, {6, 4, nullptr, 2, b.data(), 2, 2, 1.f}}, "low-rank segment 1 of rank 2 needs U and B");
    run({a, c}, "a plain low-rank term (rank 2) and a segmented one together", 2);
    kernels::epilogue ep;
    ep.segment_count = 2;
    CHECK_THROWS_WITH_AS(dense.matmul(x, y, ep), doctest::Contains("2 low-rank segments but no segment array"), shape_error);
    // a well-formed list with gaps and an empty segment runs
    kernels::epilogue ok;
    const std::vector<kernels::lowrank_segment> segs{a, {5, 0, nullptr, 0, nullptr, 0, 3, 1.f}, c};
    ok.segments = segs.data();
    ok.segment_count = 3;
    dense.matmul(x, y, ok);
    sparse.matmul(x, y, ok);
    q8.matmul(x, y, ok);
}

}  // namespace cpet_test_compress_segmented_lowrank
