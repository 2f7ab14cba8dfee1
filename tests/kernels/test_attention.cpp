// tests/kernels/test_attention.cpp — flash-style attention against softmax(QKᵀ·scale + mask)·V in double.
#include <cmath>
#include <limits>
#include <string>

#include "cpet/core/parallel.hpp"
#include "cpet/kernels/attention.hpp"
#include "support/testing.hpp"

namespace cpet_test_kernels_attention {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using cpet::testing::MatD;
using kernels::attention_args;

namespace {

/// The textbook definition, plainly, in double: per head S = Q_h K_gᵀ·scale, mask, softmax, S·V_g.
MatD reference(const attention_args& a) {
    const index_t Sq = a.q.rows(), Sk = a.k.rows(), D = a.head_dim, group = a.n_heads / a.n_kv_heads;
    const double scale = a.scale != 0.f ? double(a.scale) : 1.0 / std::sqrt(double(D));
    const index_t kv_len = a.kv_len < 0 ? Sk : a.kv_len;
    const MatD q = testing::to_double(a.q), k = testing::to_double(a.k), v = testing::to_double(a.v);
    MatD out = MatD::Zero(Sq, a.n_heads * D);
    for (index_t h = 0; h < a.n_heads; ++h) {
        const index_t g = h / group;
        const MatD s = q.middleCols(h * D, D) * k.middleCols(g * D, D).transpose() * scale;  // Sq x Sk
        for (index_t i = 0; i < Sq; ++i) {
            index_t vis = kv_len;
            if (a.causal) vis = std::min(vis, a.q_pos0 + i + 1);
            if (vis <= 0) continue;  // sees no key: zeros
            const double mx = s.row(i).head(vis).maxCoeff();
            Eigen::RowVectorXd p = (s.row(i).head(vis).array() - mx).exp().matrix();
            p /= p.sum();
            out.block(i, h * D, 1, D) = p * v.block(0, g * D, vis, D);
        }
    }
    return out;
}

struct problem {
    Matrix<float> q, k, v, out;
    attention_args args;
};

problem make_problem(index_t Sq, index_t Sk, index_t H, index_t Hkv, index_t D, unsigned seed, float amp = 1.f) {
    problem p{testing::random_matrix(Sq, H * D, seed, -amp, amp), testing::random_matrix(Sk, Hkv * D, seed + 1),
              testing::random_matrix(Sk, Hkv * D, seed + 2), Matrix<float>(Sq, H * D), {}};
    p.out.fill(-7.f);
    p.args.n_heads = H;
    p.args.n_kv_heads = Hkv;
    p.args.head_dim = D;
    return p;
}

void bind(problem& p) {
    p.args.q = p.q.view();
    p.args.k = p.k.view();
    p.args.v = p.v.view();
    p.args.out = p.out.view();
}

// fp32 with exp and sums over up to 300 keys and 128 dims: every product and sum is O(1) and rounds at ~6e-8,
// the error grows like sqrt(terms), so a relative error ~1e-6 is expected; 1e-5 leaves a margin.
constexpr double tol = 1e-5;

}  // namespace

TEST_CASE("attention matches the double reference on every path (shapes, GQA, causal, padding)") {
    const index_t dims[] = {1, 8, 16, 64, 80, 128};
    struct seq {
        index_t sq, sk;
    };
    const seq seqs[] = {{1, 1}, {7, 33}, {33, 7}, {127, 300}, {300, 127}, {1, 300}, {33, 33}};
    struct heads {
        index_t h, kv;
    };
    const heads hs[] = {{2, 2}, {8, 2}, {8, 1}, {3, 1}};
    unsigned seed = 1;
    testing::for_each_isa([&](arch::isa) {
        int n = 0;
        for (index_t D : dims)
            for (const seq& s : seqs) {
                ++n;
                const bool big = s.sq * s.sk * D >= 300 * 127 * 64;
                const heads hh = big ? heads{2, 1} : hs[n % 4];
                for (int variant = big ? 1 : 0; variant < 3; ++variant) {  // the big ones: masked variants only
                    problem p = make_problem(s.sq, s.sk, hh.h, hh.kv, D, seed += 7, n % 5 == 0 ? 4.f : 1.f);
                    bind(p);
                    p.args.causal = variant != 0;
                    if (variant == 1) p.args.q_pos0 = std::max<index_t>(s.sk - s.sq, 0);  // queries at the end
                    if (variant == 2) {
                        p.args.q_pos0 = n % 3;
                        p.args.kv_len = s.sk - s.sk / 3;  // padding on top of causal
                    }
                    if (variant == 0 && n % 2) p.args.kv_len = (s.sk + 1) / 2;
                    CAPTURE(D);
                    CAPTURE(s.sq);
                    CAPTURE(s.sk);
                    CAPTURE(hh.h);
                    CAPTURE(hh.kv);
                    CAPTURE(variant);
                    kernels::attention(p.args);
                    const MatD ref = reference(p.args);
                    CHECK(testing::rel_error(p.out.view(), ref) <= tol);
                    CHECK(testing::max_abs_error(p.out.view(), ref) <= tol);
                }
            }
    });
}

TEST_CASE("attention: explicit scale, and the unchecked per-arch body agrees with dispatch") {
    problem p = make_problem(19, 45, 4, 2, 24, 99);
    bind(p);
    p.args.scale = 0.37f;
    p.args.causal = true;
    p.args.q_pos0 = 20;
    kernels::attention(kernels::attention_args(p.args));
    const MatD ref = reference(p.args);
    CHECK(testing::rel_error(p.out.view(), ref) <= tol);
    Matrix<float> o2(19, 4 * 24);
    attention_args a2 = p.args;
    a2.out = o2.view();
    kernels::attention(arch::scalar{}, a2);
    CHECK(testing::rel_error(o2.view(), ref) <= tol);
}

TEST_CASE("attention: decoding token by token equals the rows of one causal pass") {
    const index_t T = 70, H = 8, Hkv = 2, D = 64;
    testing::for_each_isa([&](arch::isa) {
        problem full = make_problem(T, T, H, Hkv, D, 5);
        bind(full);
        full.args.causal = true;
        kernels::attention(full.args);
        CHECK(testing::rel_error(full.out.view(), reference(full.args)) <= tol);

        Matrix<float> row(1, H * D), row_cache(1, H * D);
        for (index_t t = 0; t < T; ++t) {
            CAPTURE(t);
            attention_args a = full.args;
            a.q = full.q.view().middle_rows(t, 1);
            a.k = full.k.view().middle_rows(0, t + 1);
            a.v = full.v.view().middle_rows(0, t + 1);
            a.out = row.view();
            a.q_pos0 = t;
            kernels::attention(a);
            // The same step against a preallocated cache of T rows, masked by kv_len instead of cut.
            attention_args b = full.args;
            b.q = a.q;
            b.out = row_cache.view();
            b.q_pos0 = t;
            b.kv_len = t + 1;
            b.causal = false;
            kernels::attention(b);
            const MatD expect = testing::to_double(full.out.view().middle_rows(t, 1));
            CHECK(testing::max_abs_error(row.view(), expect) <= 1e-6);
            CHECK(testing::max_abs_error(row_cache.view(), expect) <= 1e-6);
        }
    });
}

TEST_CASE("attention: strided views, and guard cells around the output stay untouched") {
    const index_t Sq = 37, Sk = 53, H = 6, Hkv = 3, D = 20, pad = 5;
    testing::for_each_isa([&](arch::isa) {
        Matrix<float> qs = testing::random_matrix(Sq + 2, H * D + 2 * pad, 11);
        Matrix<float> ks = testing::random_matrix(Sk, Hkv * D + pad, 12);
        Matrix<float> vs = testing::random_matrix(Sk, Hkv * D + 3, 13);
        Matrix<float> os(Sq + 2, H * D + 2 * pad);
        const float guard = 1234.5f;
        os.fill(guard);
        attention_args a;
        a.q = qs.view().block(1, pad, Sq, H * D);
        a.k = ks.view().block(0, pad, Sk, Hkv * D);
        a.v = vs.view().block(0, 0, Sk, Hkv * D);
        a.out = os.view().block(1, pad, Sq, H * D);
        a.n_heads = H;
        a.n_kv_heads = Hkv;
        a.head_dim = D;
        a.causal = true;
        a.q_pos0 = 9;
        kernels::attention(a);
        CHECK(testing::rel_error(a.out, reference(a)) <= tol);
        int touched = 0;
        for (index_t r = 0; r < os.rows(); ++r)
            for (index_t c = 0; c < os.cols(); ++c) {
                const bool inside = r >= 1 && r < 1 + Sq && c >= pad && c < pad + H * D;
                if (!inside && os(r, c) != guard) ++touched;
            }
        CHECK(touched == 0);
    });
}

TEST_CASE("attention: queries that see no key output zeros") {
    testing::for_each_isa([&](arch::isa) {
        problem p = make_problem(9, 16, 4, 2, 16, 21);
        bind(p);
        p.args.kv_len = 0;
        kernels::attention(p.args);
        CHECK(as_eigen(p.out).cwiseAbs().maxCoeff() == 0.f);

        // No keys at all (Sk = 0).
        problem e = make_problem(3, 0, 4, 2, 16, 22);
        bind(e);
        kernels::attention(e.args);
        CHECK(as_eigen(e.out).cwiseAbs().maxCoeff() == 0.f);

        // Causal with a negative offset: the first rows sit before key 0.
        problem c = make_problem(6, 6, 2, 1, 8, 23);
        bind(c);
        c.args.causal = true;
        c.args.q_pos0 = -3;
        kernels::attention(c.args);
        const MatD ref = reference(c.args);
        CHECK(testing::max_abs_error(c.out.view(), ref) <= tol);
        CHECK(as_eigen(c.out).topRows(3).cwiseAbs().maxCoeff() == 0.f);
    });
}

TEST_CASE("attention: empty queries do nothing; NaN inputs do not crash and stay within their group") {
    testing::for_each_isa([&](arch::isa) {
        problem p = make_problem(0, 10, 4, 2, 16, 31);
        bind(p);
        kernels::attention(p.args);  // nothing to do, nothing to crash

        problem n = make_problem(12, 40, 4, 2, 16, 32);
        n.k(5, 3) = std::numeric_limits<float>::quiet_NaN();  // KV head 0 → query heads 0 and 1
        n.q(2, 3 * 16) = std::numeric_limits<float>::infinity();
        bind(n);
        kernels::attention(n.args);
        // Query head 2 (KV head 1) is untouched by the NaN key; its rows other than 2 are exact.
        const MatD ref = reference(n.args);
        for (index_t i = 0; i < 12; ++i) {
            if (i == 2) continue;
            for (index_t d = 0; d < 16; ++d) CHECK(std::abs(n.out(i, 2 * 16 + d) - ref(i, 2 * 16 + d)) <= tol);
        }
    });
}

TEST_CASE("attention: one and two threads give identical results") {
    problem p = make_problem(150, 150, 8, 2, 64, 41);
    bind(p);
    p.args.causal = true;
    set_num_threads(1);
    kernels::attention(p.args);
    const Matrix<float> one = p.out;
    set_num_threads(2);
    kernels::attention(p.args);
    CHECK((as_eigen(one).array() == as_eigen(p.out).array()).all());
    CHECK(testing::rel_error(p.out.view(), reference(p.args)) <= tol);
}

TEST_CASE("attention: bad arguments throw shape_error naming the operand") {
    problem p = make_problem(4, 6, 4, 2, 8, 51);
    bind(p);
    auto throws_with = [](attention_args a, const std::string& what) {
        try {
            kernels::attention(a);
            FAIL("no exception for " << what);
        } catch (const shape_error& e) {
            CHECK_MESSAGE(std::string(e.what()).find(what) != std::string::npos, e.what());
        }
    };
    attention_args a = p.args;
    a.n_kv_heads = 3;
    throws_with(a, "n_kv_heads");
    a = p.args;
    a.head_dim = 0;
    throws_with(a, "head_dim");
    a = p.args;
    a.head_dim = 16;
    a.n_kv_heads = 1;  // q has 32 columns = 4 x 8 but 4 x 16 expected
    throws_with(a, "attention: q");
    a = p.args;
    a.k = p.k.view().middle_cols(0, 8);
    throws_with(a, "attention: k");
    a = p.args;
    a.v = p.v.view().middle_rows(0, 5);
    throws_with(a, "attention: v");
    a = p.args;
    a.out = p.out.view().middle_rows(0, 3);
    throws_with(a, "attention: out");
    a = p.args;
    a.kv_len = 7;
    throws_with(a, "kv_len");
    // Nothing was written by the rejected calls.
    CHECK((as_eigen(p.out).array() == -7.f).all());
}

}  // namespace cpet_test_kernels_attention
