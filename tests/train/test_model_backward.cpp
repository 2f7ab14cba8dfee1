// tests/train/test_model_backward.cpp — train::forward / backward of whole models (embeddings, stack, final norm,
// pooling, heads) against central finite differences of a double-precision reference built from the reference
// layer; recomputation gives the same gradients as the stored tape.
#include <cmath>
#include <random>
#include <vector>

#include "cpet/nn/nn.hpp"
#include "cpet/train/model.hpp"
#include "nn/reference_layer.hpp"
#include "support/testing.hpp"
#include "train/model_testing.hpp"

namespace cpet_test_train_model_backward {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using testing::MatD;

namespace {

/// A LoRA per layer with random non-zero B on every target.
template <class C>
std::vector<pet::lora::modules> loras(const nn::Model<C>& m, unsigned seed) {
    std::vector<pet::lora::modules> out;
    for (std::size_t l = 0; l < m.stack().size(); ++l) {
        pet::lora::options o;
        o.rank = 2;
        o.targets = pet::target_set{pet::target::q, pet::target::v, pet::target::down};
        auto x = pet::lora::make(m.stack().layer(l).pet_dims(), o, seed + unsigned(l));
        for (auto& b : x.f.B)
            if (!b.empty()) b = testing::random_matrix(b.rows(), b.cols(), seed + 7 + unsigned(l), -0.3f, 0.3f);
        out.push_back(std::move(x));
    }
    return out;
}

testing::reference_hooks lora_hooks(const pet::lora::modules& m, const std::vector<MatD>& A, const std::vector<MatD>& B) {
    testing::reference_hooks h;
    h.linear_delta = [&m, &A, &B](pet::target t, const MatD& x) -> MatD {
        if (m.rank(t) == 0) return {};
        return double(m.lowrank_scale(t)) * x * A[std::size_t(t)].transpose() * B[std::size_t(t)].transpose();
    };
    return h;
}

}  // namespace

TEST_CASE("train::pool_backward and linear_head::backward match finite differences") {
    for (auto p : {nn::pooling::mean, nn::pooling::cls, nn::pooling::last}) {
        const std::vector<index_t> lengths{3, 0, 7, 1};
        const index_t S = 7, d = 5, B = 4;
        const auto L = nn::batch_layout::of(B * S, lengths, "test");
        Matrix<float> h = testing::random_matrix(B * S, d, 1);
        auto head = train::linear_head::make(d, 3, 2);
        Matrix<float> G = testing::random_matrix(B, 3, 3);
        auto loss = [&](const MatD& hd, const MatD& W, const MatD& bias) {
            double l = 0;
            for (index_t b = 0; b < B; ++b) {
                const index_t n = lengths[std::size_t(b)];
                Eigen::RowVectorXd pooled = Eigen::RowVectorXd::Zero(d);
                if (n > 0) {
                    if (p == nn::pooling::mean) pooled = hd.middleRows(b * S, n).colwise().mean();
                    else pooled = hd.row(b * S + (p == nn::pooling::cls ? 0 : n - 1));
                }
                const Eigen::RowVectorXd z = pooled * W.transpose() + bias;
                for (index_t j = 0; j < 3; ++j) l += G(b, j) * z(j);
            }
            return l;
        };
        Matrix<float> pooled(B, d), logits(B, 3), dpooled(B, d), dh(B * S, d);
        nn::pool(h, L, p, pooled);
        head.forward(pooled, logits);
        head.backward(pooled, G, dpooled);
        train::pool_backward(dpooled, L, p, dh);
        const MatD hd = testing::to_double(h), W = testing::to_double(head.W), bb = testing::to_double(head.b);
        const double e = 1e-6;
        for (index_t r = 0; r < B * S; ++r)
            for (index_t c = 0; c < d; ++c) {
                MatD a = hd, m = hd;
                a(r, c) += e, m(r, c) -= e;
                CHECK(dh(r, c) == doctest::Approx((loss(a, W, bb) - loss(m, W, bb)) / (2 * e)).epsilon(1e-5));
            }
        for (index_t r = 0; r < 3; ++r)
            for (index_t c = 0; c < d; ++c) {
                MatD a = W, m = W;
                a(r, c) += e, m(r, c) -= e;
                CHECK(head.gW(r, c) == doctest::Approx((loss(hd, a, bb) - loss(hd, m, bb)) / (2 * e)).epsilon(1e-5));
            }
        for (index_t c = 0; c < 3; ++c) {
            MatD a = bb, m = bb;
            a(0, c) += e, m(0, c) -= e;
            CHECK(head.gb(0, c) == doctest::Approx((loss(hd, W, a) - loss(hd, W, m)) / (2 * e)).epsilon(1e-5));
        }
    }
}

TEST_CASE("train::backward of a LLaMA model (embeddings, 2 layers, final RMSNorm, tied LM head) matches finite differences") {
    using C = config::llama<>;
    const auto s = testing::tiny_shape(2);
    const index_t V = 23;
    const auto w = testing::tiny_model<C>(s, 2, V, true, 5);
    const nn::Model<C> model(w);
    auto tasks = loras(model, 9);
    std::vector<pet::lora::modules> grads;
    std::vector<train::layer_terms> terms;
    for (auto& t : tasks) grads.push_back(train::zeros_like(t));
    for (std::size_t l = 0; l < tasks.size(); ++l) terms.push_back(train::bind(model.stack().layer(l).pet_dims(), tasks[l], grads[l]));
    const auto batch = testing::tiny_batch(V, {5, 2, 6}, 6, 3);

    train::model_tape tape;
    train::forward(model, batch, terms, tape);
    const Matrix<float> logits = train::lm_logits(model, tape);
    nn::workspace ws;
    const Matrix<float> ref_logits = model.logits(batch, ws, tasks);
    CHECK(testing::rel_error(logits, testing::to_double(ref_logits)) < 2e-5);

    Matrix<float> G = testing::random_matrix(logits.rows(), V, 4);
    nn::detail::zero_padding(G, batch.layout("test"));
    train::backward(model, tape, terms, train::lm_backward(model, G));

    // the same gradients when each layer's tape is recomputed in the backward
    {
        std::vector<pet::lora::modules> g2;
        std::vector<train::layer_terms> t2;
        for (auto& t : tasks) g2.push_back(train::zeros_like(t));
        for (std::size_t l = 0; l < tasks.size(); ++l) t2.push_back(train::bind(model.stack().layer(l).pet_dims(), tasks[l], g2[l]));
        train::model_tape rt;
        train::forward(model, batch, t2, rt, {.recompute = true});
        CHECK(rt.bytes() < tape.bytes());
        train::backward(model, rt, t2, train::lm_backward(model, G));
        for (std::size_t l = 0; l < tasks.size(); ++l)
            for (int i = 0; i < pet::target_count; ++i) {
                const auto& a = grads[l].f.A[std::size_t(i)];
                const auto& b = g2[l].f.A[std::size_t(i)];
                for (index_t k = 0; k < a.size(); ++k) REQUIRE(a.data()[k] == b.data()[k]);
            }
    }

    // the double reference: embeddings (frozen: their float output is the reference's input), the reference layers
    // with the LoRA as hooks, final RMSNorm, tied head
    Matrix<float> x(batch.rows(), s.d_model);
    model.embeddings().forward(batch, batch.layout("test"), x);
    const MatD xd = testing::to_double(x), Gd = testing::to_double(G);
    std::vector<std::vector<MatD>> A(tasks.size()), B(tasks.size());
    for (std::size_t l = 0; l < tasks.size(); ++l)
        for (int i = 0; i < pet::target_count; ++i) {
            A[l].push_back(testing::to_double(tasks[l].f.A[std::size_t(i)]));
            B[l].push_back(testing::to_double(tasks[l].f.B[std::size_t(i)]));
        }
    const MatD E = testing::to_double(w.embeddings.word);
    auto ref_loss = [&] {
        std::vector<testing::reference_hooks> hooks;
        for (std::size_t l = 0; l < tasks.size(); ++l) hooks.push_back(lora_hooks(tasks[l], A[l], B[l]));
        const MatD h = testing::reference_batch<C>(w.layers, s, xd, batch.lengths, hooks);
        const MatD hn = testing::ref_norm(nn::norm_kind::rmsnorm, h, w.final_norm_gamma, {}, s.eps);
        return ((hn * E.transpose()).array() * Gd.array()).sum();
    };
    std::mt19937 gen(8);
    const double e = 1e-5;
    for (std::size_t l = 0; l < tasks.size(); ++l)
        for (int i = 0; i < pet::target_count; ++i) {
            if (tasks[l].rank(pet::target(i)) == 0) continue;
            for (int which = 0; which < 2; ++which) {
                MatD& P = which == 0 ? A[l][std::size_t(i)] : B[l][std::size_t(i)];
                const auto& g = which == 0 ? grads[l].f.A[std::size_t(i)] : grads[l].f.B[std::size_t(i)];
                double worst = 0, scale = 0;
                for (int n = 0; n < 6; ++n) {
                    const index_t r = index_t(gen() % unsigned(P.rows())), c = index_t(gen() % unsigned(P.cols()));
                    const double v0 = P(r, c);
                    P(r, c) = v0 + e;
                    const double lp = ref_loss();
                    P(r, c) = v0 - e;
                    const double lm = ref_loss();
                    P(r, c) = v0;
                    const double fd = (lp - lm) / (2 * e);
                    worst = std::max(worst, std::abs(fd - g(r, c)));
                    scale = std::max(scale, std::abs(fd));
                }
                INFO("layer " << l << " target " << pet::target_name(pet::target(i)) << (which ? " B" : " A"));
                CHECK(worst <= 2e-3 * scale);
            }
        }
}

TEST_CASE("train::forward of a BERT model with a classification head equals the inference model") {
    using C = config::bert<>;
    const auto s = testing::tiny_shape(4);
    const auto w = testing::tiny_model<C>(s, 3, 17, false, 6);
    const nn::Model<C> model(w);
    auto tasks = loras(model, 2);
    std::vector<pet::lora::modules> grads;
    std::vector<train::layer_terms> terms;
    for (auto& t : tasks) grads.push_back(train::zeros_like(t));
    for (std::size_t l = 0; l < tasks.size(); ++l) terms.push_back(train::bind(model.stack().layer(l).pet_dims(), tasks[l], grads[l]));
    const auto batch = testing::tiny_batch(17, {4, 1, 6, 3}, 6, 9);
    train::model_tape tape;
    train::forward(model, batch, terms, tape);
    nn::workspace ws;
    const Matrix<float> h = model.hidden_states(batch, ws, tasks);
    CHECK(testing::rel_error(tape.hidden, testing::to_double(h)) < 2e-5);
    std::vector<train::layer_terms> wrong(2);
    CHECK_THROWS_WITH_AS(train::forward(model, batch, wrong, tape), doctest::Contains("2 layer_terms for 3 layers"),
                         shape_error);
}

}  // namespace cpet_test_train_model_backward
