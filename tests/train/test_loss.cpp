// Losses: values and gradients against torch (tests/reference/train_reference.json), gradients against central
// finite differences of an independent double-precision formula, ignore_index, bad labels, T != 1, masks.
#include <cmath>
#include <functional>
#include <vector>

#include "cpet/train/loss.hpp"
#include "train/train_testing.hpp"

namespace cpet_test_train_loss {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using testing::floats;
using testing::rel_diff;

namespace {

using fn_d = std::function<double(const std::vector<double>&)>;

/// Central differences of f at x in double, step h.
std::vector<double> numeric_grad(const fn_d& f, std::vector<double> x, double h = 1e-5) {
    std::vector<double> g(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) {
        const double x0 = x[i];
        x[i] = x0 + h;
        const double fp = f(x);
        x[i] = x0 - h;
        const double fm = f(x);
        x[i] = x0;
        g[i] = (fp - fm) / (2 * h);
    }
    return g;
}

std::vector<double> to_d(const std::vector<float>& v) { return {v.begin(), v.end()}; }

double max_rel(const std::vector<float>& got, const std::vector<double>& ref) {
    double num = 0, den = 0;
    for (std::size_t i = 0; i < got.size(); ++i) {
        num = std::max(num, std::abs(double(got[i]) - ref[i]));
        den = std::max(den, std::abs(ref[i]));
    }
    return den > 0 ? num / den : num;
}

double lse_d(const double* x, index_t n, double inv_t) {
    double m = -INFINITY;
    for (index_t j = 0; j < n; ++j) m = std::max(m, x[j] * inv_t);
    double s = 0;
    for (index_t j = 0; j < n; ++j) s += std::exp(x[j] * inv_t - m);
    return m + std::log(s);
}

// The formulas again, in double, written from their definitions.
double ce_ref(const std::vector<double>& z, index_t n, index_t c, const std::vector<std::int32_t>& y) {
    double s = 0;
    int valid = 0;
    for (index_t r = 0; r < n; ++r) {
        if (y[std::size_t(r)] == -100) continue;
        s += lse_d(&z[std::size_t(r * c)], c, 1.0) - z[std::size_t(r * c + y[std::size_t(r)])];
        ++valid;
    }
    return valid ? s / valid : 0.0;
}

double kl_ref(const std::vector<double>& s, const std::vector<double>& t, index_t n, index_t c, double T,
              const std::vector<std::uint8_t>& mask) {
    double total = 0;
    int rows = 0;
    for (index_t r = 0; r < n; ++r) {
        if (!mask.empty() && !mask[std::size_t(r)]) continue;
        ++rows;
        const double ls = lse_d(&s[std::size_t(r * c)], c, 1 / T), lt = lse_d(&t[std::size_t(r * c)], c, 1 / T);
        for (index_t j = 0; j < c; ++j) {
            const double pt = std::exp(t[std::size_t(r * c + j)] / T - lt);
            total += pt * ((t[std::size_t(r * c + j)] / T - lt) - (s[std::size_t(r * c + j)] / T - ls));
        }
    }
    return rows ? T * T * total / rows : 0.0;
}

double mse_ref(const std::vector<double>& s, const std::vector<double>& t, index_t n, index_t c,
               const std::vector<std::uint8_t>& mask) {
    double total = 0;
    int rows = 0;
    for (index_t r = 0; r < n; ++r) {
        if (!mask[std::size_t(r)]) continue;
        ++rows;
        for (index_t j = 0; j < c; ++j) {
            const double e = s[std::size_t(r * c + j)] - t[std::size_t(r * c + j)];
            total += e * e;
        }
    }
    return rows ? total / (double(rows) * double(c)) : 0.0;
}

std::vector<float> random_vec(std::size_t n, unsigned seed, float scale) {
    std::mt19937 gen(seed);
    std::normal_distribution<float> nd(0.f, scale);
    std::vector<float> v(n);
    for (auto& x : v) x = nd(gen);
    return v;
}

struct shape {
    index_t rows, cols;
};
const shape shapes[] = {{1, 1}, {1, 7}, {7, 33}, {33, 7}, {17, 2}, {3, 128}};

constexpr double fd_tol = 2e-5;  // float gradients against double central differences

}  // namespace

TEST_CASE("cross_entropy matches torch (ignore_index -100, mean over the counted rows) and its gradient") {
    for (const auto& r : testing::train_reference()["losses"]["cross_entropy"]) {
        const index_t n = r["rows"], c = r["cols"];
        CAPTURE(n);
        CAPTURE(c);
        const auto z = floats(r["logits"]);
        const auto y = r["labels"].get<std::vector<std::int32_t>>();
        std::vector<float> dz(z.size());
        const double loss = train::cross_entropy({z.data(), n, c}, y, {dz.data(), n, c});
        CHECK(loss == doctest::Approx(double(r["loss"])).epsilon(1e-6));
        CHECK(rel_diff(dz, floats(r["grad"])) <= 1e-6);
    }
}

TEST_CASE("cross_entropy's gradient matches central differences on awkward shapes, with ignored rows") {
    for (const auto& [n, c] : shapes) {
        CAPTURE(n);
        CAPTURE(c);
        const auto z = random_vec(std::size_t(n * c), unsigned(100 + n * c), 3.f);
        std::vector<std::int32_t> y(static_cast<std::size_t>(n));
        std::mt19937 gen(static_cast<unsigned>(n));
        for (index_t r = 0; r < n; ++r) y[std::size_t(r)] = std::int32_t(gen() % std::uint32_t(c));
        if (n > 2) y[1] = train::ignore_index;
        std::vector<float> dz(z.size());
        const double loss = train::cross_entropy({z.data(), n, c}, y, {dz.data(), n, c});
        const fn_d f = [&](const std::vector<double>& x) { return ce_ref(x, n, c, y); };
        CHECK(loss == doctest::Approx(f(to_d(z))).epsilon(1e-12));
        CHECK(max_rel(dz, numeric_grad(f, to_d(z))) <= fd_tol);
        if (n > 2)
            for (index_t j = 0; j < c; ++j) CHECK(dz[std::size_t(c + j)] == 0.f);
        // grad_scale scales the gradient only; in place and value-only give the same numbers.
        std::vector<float> dz2(z.size());
        CHECK(train::cross_entropy({z.data(), n, c}, y, {dz2.data(), n, c}, 0.25) == loss);
        for (std::size_t i = 0; i < dz.size(); ++i) CHECK(dz2[i] == doctest::Approx(0.25 * dz[i]).epsilon(1e-6));
        auto inplace = z;
        CHECK(train::cross_entropy({inplace.data(), n, c}, y, {inplace.data(), n, c}) == loss);
        CHECK(testing::same_bits(inplace, dz));
        CHECK(train::cross_entropy({z.data(), n, c}, y, {}) == loss);
    }
}

TEST_CASE("cross_entropy: every row ignored gives 0 and a zero gradient; bad labels throw naming the row") {
    const auto z = random_vec(4 * 5, 1, 1.f);
    std::vector<float> dz(z.size(), 7.f);
    const std::vector<std::int32_t> none(4, -100);
    CHECK(train::cross_entropy({z.data(), 4, 5}, none, {dz.data(), 4, 5}) == 0.0);
    for (float g : dz) CHECK(g == 0.f);
    std::vector<std::int32_t> y{0, 4, 5, 1};
    CHECK_THROWS_WITH_AS(train::cross_entropy({z.data(), 4, 5}, y, {dz.data(), 4, 5}),
                         doctest::Contains("label of row 2 is 5, expected a class in [0, 5) or -100"), shape_error);
    y = {0, -1, 2, 1};
    CHECK_THROWS_WITH_AS(train::cross_entropy({z.data(), 4, 5}, y, {dz.data(), 4, 5}),
                         doctest::Contains("label of row 1 is -1"), shape_error);
    y = {0, 1, 2};
    CHECK_THROWS_WITH_AS(train::cross_entropy({z.data(), 4, 5}, y, {dz.data(), 4, 5}),
                         doctest::Contains("3 labels for 4 rows"), shape_error);
    y = {0, 1, 2, 3};
    CHECK_THROWS_WITH_AS(train::cross_entropy({z.data(), 4, 5}, y, {dz.data(), 4, 4}),
                         doctest::Contains("dlogits: expected shape 4x5, got 4x4"), shape_error);
}

TEST_CASE("a NaN or infinite logit gives a NaN loss the caller can detect") {
    auto z = random_vec(3 * 4, 2, 1.f);
    std::vector<float> dz(z.size());
    const std::vector<std::int32_t> y{0, 1, 2};
    z[5] = std::nanf("");
    CHECK(std::isnan(train::cross_entropy({z.data(), 3, 4}, y, {dz.data(), 3, 4})));
    z[5] = INFINITY;
    CHECK_FALSE(std::isfinite(train::cross_entropy({z.data(), 3, 4}, y, {dz.data(), 3, 4})));
    auto t = random_vec(3 * 4, 3, 1.f);
    CHECK(std::isnan(train::kl_distillation({z.data(), 3, 4}, {t.data(), 3, 4}, 2.0, {dz.data(), 3, 4})));
    CHECK_FALSE(std::isfinite(train::mse({z.data(), 3, 4}, {t.data(), 3, 4}, {dz.data(), 3, 4})));
}

TEST_CASE("next_token_labels shifts each sequence by one and ignores its last token and the padding") {
    const std::vector<std::int32_t> ids{10, 11, 12, 13,  20, 21, 0, 0,  30, 0, 0, 0,  0, 0, 0, 0};
    const std::vector<index_t> lengths{4, 2, 1, 0};
    const auto labels = train::next_token_labels(ids, lengths, 4);
    const std::vector<std::int32_t> want{11, 12, 13, -100, 21, -100, -100, -100, -100, -100, -100, -100,
                                         -100, -100, -100, -100};
    CHECK(labels == want);
    CHECK_THROWS_WITH_AS(train::next_token_labels(ids, std::vector<index_t>{4, 5, 1, 0}, 4),
                         doctest::Contains("lengths[1] = 5 is outside [0, 4]"), shape_error);
    CHECK_THROWS_WITH_AS(train::next_token_labels(ids, std::vector<index_t>{4, 2, 1}, 4),
                         doctest::Contains("16 ids, expected 3 sequences x seq_len 4 = 12"), shape_error);
    // Token-level CE over [B·S, V] with these labels counts the 5 shifted tokens only.
    const index_t v = 40;
    const auto logits = random_vec(std::size_t(16 * v), 4, 2.f);
    std::vector<float> d(logits.size());
    const double loss = train::cross_entropy({logits.data(), 16, v}, labels, {d.data(), 16, v});
    CHECK(loss == doctest::Approx(ce_ref(to_d(logits), 16, v, labels)).epsilon(1e-12));
}

TEST_CASE("kl_distillation matches torch's T^2 kl_div(log_softmax(s/T), softmax(t/T), 'batchmean')") {
    for (const auto& r : testing::train_reference()["losses"]["kl"]) {
        const index_t n = r["rows"], c = r["cols"];
        const double temp = r["temperature"];
        CAPTURE(n);
        CAPTURE(temp);
        const auto s = floats(r["student"]), t = floats(r["teacher"]);
        std::vector<float> ds(s.size());
        const double loss = train::kl_distillation({s.data(), n, c}, {t.data(), n, c}, temp, {ds.data(), n, c});
        CHECK(loss == doctest::Approx(double(r["loss"])).epsilon(1e-5).scale(1e-7));
        CHECK(rel_diff(ds, floats(r["grad"])) <= 1e-5);
    }
}

TEST_CASE("kl_distillation's gradient w.r.t. the student matches central differences (T != 1, masked rows)") {
    for (const double temp : {0.5, 1.0, 3.0}) {
        for (const auto& [n, c] : shapes) {
            CAPTURE(temp);
            CAPTURE(n);
            CAPTURE(c);
            const auto s = random_vec(std::size_t(n * c), unsigned(200 + n * c), 2.f);
            const auto t = random_vec(std::size_t(n * c), unsigned(300 + n * c), 2.f);
            std::vector<std::uint8_t> mask(std::size_t(n), 1);
            if (n > 2) mask[2] = 0;
            const auto t_d = to_d(t);
            const fn_d f = [&](const std::vector<double>& x) { return kl_ref(x, t_d, n, c, temp, mask); };
            std::vector<float> ds(s.size(), 9.f);
            const double loss = train::kl_distillation({s.data(), n, c}, {t.data(), n, c}, temp, {ds.data(), n, c},
                                                       train::row_selection::mask(mask));
            CHECK(std::abs(loss - f(to_d(s))) <= 1e-12 * (1 + std::abs(loss)));
            CHECK(max_rel(ds, numeric_grad(f, to_d(s))) <= fd_tol);
            if (n > 2)
                for (index_t j = 0; j < c; ++j) CHECK(ds[std::size_t(2 * c + j)] == 0.f);
        }
    }
    // KL of a distribution with itself is 0 and so is the gradient.
    const auto s = random_vec(5 * 9, 5, 1.f);
    std::vector<float> ds(s.size());
    CHECK(train::kl_distillation({s.data(), 5, 9}, {s.data(), 5, 9}, 2.0, {ds.data(), 5, 9}) ==
          doctest::Approx(0.0).scale(1e-12));
    for (float g : ds) CHECK(std::abs(g) < 1e-7f);
    CHECK_THROWS_WITH_AS(train::kl_distillation({s.data(), 5, 9}, {s.data(), 5, 9}, 0.0, {}),
                         doctest::Contains("temperature must be finite and > 0"), shape_error);
    CHECK_THROWS_WITH_AS(train::kl_distillation({s.data(), 5, 9}, {s.data(), 9, 5}, 1.0, {}),
                         doctest::Contains("teacher logits (the student's shape): expected shape 5x9, got 9x5"),
                         shape_error);
}

TEST_CASE("mse matches torch's mse_loss over the selected rows, and central differences; lengths select tokens") {
    for (const auto& r : testing::train_reference()["losses"]["mse"]) {
        const index_t n = r["rows"], c = r["cols"];
        const auto s = floats(r["student"]), t = floats(r["teacher"]);
        const auto mask = r["mask"].get<std::vector<std::uint8_t>>();
        std::vector<float> ds(s.size());
        const double loss =
            train::mse({s.data(), n, c}, {t.data(), n, c}, {ds.data(), n, c}, train::row_selection::mask(mask));
        CHECK(loss == doctest::Approx(double(r["loss"])).epsilon(1e-6));
        CHECK(rel_diff(ds, floats(r["grad"])) <= 1e-6);
    }
    for (const auto& [n, c] : shapes) {
        CAPTURE(n);
        CAPTURE(c);
        const auto s = random_vec(std::size_t(n * c), unsigned(400 + n), 1.f);
        const auto t = random_vec(std::size_t(n * c), unsigned(500 + n), 1.f);
        std::vector<std::uint8_t> all(std::size_t(n), 1);
        const auto t_d = to_d(t);
        const fn_d f = [&](const std::vector<double>& x) { return mse_ref(x, t_d, n, c, all); };
        std::vector<float> ds(s.size());
        const double loss = train::mse({s.data(), n, c}, {t.data(), n, c}, {ds.data(), n, c});
        CHECK(loss == doctest::Approx(f(to_d(s))).epsilon(1e-12));
        CHECK(max_rel(ds, numeric_grad(f, to_d(s), 1e-4)) <= fd_tol);
    }
    // A padded batch of 3 sequences of seq_len 4: lengths select the real tokens, padding gets no gradient.
    const std::vector<index_t> lengths{4, 1, 3};
    const index_t rows = 12, d = 7;
    const auto s = random_vec(rows * d, 6, 1.f), t = random_vec(rows * d, 7, 1.f);
    std::vector<std::uint8_t> mask(rows, 0);
    for (index_t b = 0; b < 3; ++b)
        for (index_t i = 0; i < lengths[std::size_t(b)]; ++i) mask[std::size_t(b * 4 + i)] = 1;
    std::vector<float> d1(s.size()), d2(s.size(), 5.f);
    const double l1 = train::mse({s.data(), rows, d}, {t.data(), rows, d}, {d1.data(), rows, d},
                                 train::row_selection::lengths(lengths, 4));
    const double l2 = train::mse({s.data(), rows, d}, {t.data(), rows, d}, {d2.data(), rows, d},
                                 train::row_selection::mask(mask));
    CHECK(l1 == l2);
    CHECK(testing::same_bits(d1, d2));
    CHECK(l1 == doctest::Approx(mse_ref(to_d(s), to_d(t), rows, d, mask)).epsilon(1e-12));
    for (index_t j = 0; j < d; ++j) CHECK(d1[std::size_t(5 * d + j)] == 0.f);  // row 5: padding of sequence 1
    CHECK_THROWS_WITH_AS(train::mse({s.data(), rows, d}, {t.data(), rows, d}, {},
                                    train::row_selection::lengths(lengths, 5)),
                         doctest::Contains("3 sequences of seq_len 5 make 15 rows, the operand has 12"), shape_error);
    CHECK_THROWS_WITH_AS(train::mse({s.data(), rows, d}, {t.data(), rows, d}, {},
                                    train::row_selection::mask(std::span(mask).first(3))),
                         doctest::Contains("row mask has 3 entries for 12 rows"), shape_error);
}

TEST_CASE("loss_parts: weighted total, sums over micro-batches, text") {
    auto a = train::loss_parts::of("ce", 0.5).add("mse", 2.0, 0.005);
    CHECK(a.total() == doctest::Approx(0.51));
    CHECK(a.finite());
    CHECK(a.str() == "0.51 (ce 0.5, mse\xc3\x97" "0.005 2)");
    auto b = train::loss_parts::of("ce", 1.5).add("mse", 4.0, 0.005);
    a += b;
    a *= 0.5;
    CHECK(a.find("ce")->value == 1.0);
    CHECK(a.find("mse")->value == 3.0);
    CHECK(train::loss_parts::of("ce", 0.25).str() == "0.25");
    CHECK_THROWS_WITH_AS(a.add("ce", 1.0), doctest::Contains("two terms are named \"ce\""), shape_error);
    CHECK_THROWS_WITH_AS(a += train::loss_parts::of("mse", 1.0, 0.1), doctest::Contains("has weight 0.005 and 0.1"),
                         shape_error);
    CHECK_FALSE(train::loss_parts::of("ce", std::nan("")).finite());
    CHECK_FALSE(train::loss_parts::of("ce", 1.0).add("kd", INFINITY, 0.0).finite());
}

}  // namespace cpet_test_train_loss
