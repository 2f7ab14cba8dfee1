// tests/train/test_layer_backward.cpp — train::forward / backward of a TransformerLayer against central finite
// differences of the double-precision reference layer (tests/nn/reference_layer.hpp), for every layer kind, the
// trainable PET methods alone and stacked, dense and compressed weight formats, padded batches of awkward lengths.
//
// The loss is L = Σ G ⊙ y over the real rows for a fixed random G, so dL/dy = G. The reference evaluates the same
// layer (the compressed layer's weights as it computes with them: to_dense()) in double with the task's low-rank
// terms given as hooks whose factors are double copies, so each finite difference perturbs one factor entry (or
// one input entry) in double and nothing is rounded to float.
#include <cmath>
#include <functional>
#include <random>
#include <vector>

#include "cpet/compress/compress.hpp"
#include "cpet/nn/nn.hpp"
#include "cpet/train/layer.hpp"
#include "nn/reference_layer.hpp"
#include "support/testing.hpp"

namespace cpet_test_train_layer_backward {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using testing::MatD;

namespace {

struct term_ref {
    pet::target t;
    MatD A, B;  // double copies
    double s;
    bool gelu;
};

/// IA3 scales and BitFit bias deltas in double (empty: none).
struct vec_refs {
    std::array<Eigen::VectorXd, pet::target_count> scale, bias;
};

/// The reference hooks of a list of terms (read through the pointers, so a test can perturb them).
testing::reference_hooks hooks_of(const std::vector<term_ref>* terms, const vec_refs* vr) {
    testing::reference_hooks h;
    h.scale = [vr](pet::target t) -> Eigen::VectorXd { return vr->scale[std::size_t(t)]; };
    h.linear_delta = [terms, vr](pet::target t, const MatD& x) -> MatD {
        MatD out;
        if (const auto& b = vr->bias[std::size_t(t)]; b.size()) out = MatD::Ones(x.rows(), 1) * b.transpose();
        for (const auto& tr : *terms) {
            if (tr.t != t) continue;
            MatD u = x * tr.A.transpose();
            if (tr.gelu) u = u.unaryExpr([](double z) { return testing::ref_act(kernels::activation::gelu_erf, z); });
            MatD d = tr.s * u * tr.B.transpose();
            if (out.size() == 0) out = d;
            else out += d;
        }
        return out;
    };
    return h;
}

std::vector<term_ref> refs_of(const train::layer_terms& lt) {
    std::vector<term_ref> out;
    for (int i = 0; i < pet::target_count; ++i)
        for (const auto& t : lt.of(pet::target(i)))
            out.push_back({pet::target(i), testing::to_double(t.A), testing::to_double(t.B), double(t.scale), t.gelu});
    return out;
}

/// Random, non-zero B so that every factor gets a gradient.
template <class M>
void randomise_b(M& m, unsigned seed) {
    for (int i = 0; i < pet::target_count; ++i) {
        auto& b = m.f.B[std::size_t(i)];
        if (b.empty()) continue;
        b = testing::random_matrix(b.rows(), b.cols(), seed + unsigned(i), -0.3f, 0.3f);
    }
}

vec_refs vec_refs_of(const train::layer_terms& lt) {
    vec_refs v;
    for (int i = 0; i < pet::target_count; ++i) {
        auto to_vec = [](std::span<const float> f) {
            Eigen::VectorXd e(Eigen::Index(f.size()));
            for (std::size_t j = 0; j < f.size(); ++j) e(Eigen::Index(j)) = f[j];
            return e;
        };
        if (lt.scale[std::size_t(i)]) v.scale[std::size_t(i)] = to_vec(lt.scale[std::size_t(i)].v);
        if (lt.bias[std::size_t(i)]) v.bias[std::size_t(i)] = to_vec(lt.bias[std::size_t(i)].v);
    }
    return v;
}

vec_refs no_vec_refs;

template <class C>
double ref_loss(const std::vector<nn::dense_layer_weights>& w, const nn::layer_shape& s, const MatD& x,
                const std::vector<index_t>& lengths, const std::vector<term_ref>& terms, const MatD& G,
                const vec_refs& vr = no_vec_refs) {
    const MatD y = testing::reference_batch<C>(w, s, x, lengths, {hooks_of(&terms, &vr)});
    return (y.array() * G.array()).sum();
}

/// max |a − f| / max |f| over the sampled entries (f: finite difference).
struct grad_check {
    double worst_abs = 0, scale = 0;
    void add(double analytic, double fd) {
        worst_abs = std::max(worst_abs, std::abs(analytic - fd));
        scale = std::max(scale, std::abs(fd));
    }
    // a gradient that is exactly zero (a Δb on k: softmax ignores a shift common to all keys) leaves float noise
    double rel() const { return worst_abs / std::max(scale, 1e-4); }
};

/// Checks forward (against the layer's own inference forward) and backward (dx and every factor's gradient
/// against finite differences of the reference) for one layer and task.
template <class C, class Task>
void check_layer(const nn::layer_shape& s, const std::vector<index_t>& lengths, index_t S, Task task, unsigned seed) {
    const auto wd = nn::random_layer_weights(s, seed, nn::kind_of<C>);
    const nn::TransformerLayer<C> layer(wd, s);
    auto w = nn::dense_weights_of(layer);  // what the compressed layer computes with
    const index_t B = index_t(lengths.size()), M = B * S, d = s.d_model;
    Matrix<float> x = testing::random_matrix(M, d, seed + 1);
    nn::detail::zero_padding(x, nn::batch_layout::of(M, lengths, "test"));
    Task grads = train::zeros_like(task);
    const auto terms = train::bind(layer.pet_dims(), task, grads);

    // forward: the same values as the inference path (the tape changes nothing)
    Matrix<float> y(M, d), y_inf(M, d);
    train::layer_tape tape;
    train::forward(layer, x, lengths, y, terms, tape);
    nn::workspace ws;
    layer.forward(x, lengths, y_inf, ws, task);
    CHECK(testing::rel_error(y, testing::to_double(y_inf)) < 2e-5);
    CHECK(tape.bytes() > 0);

    Matrix<float> G = testing::random_matrix(M, d, seed + 2);
    Matrix<float> dx(M, d);
    train::backward(layer, tape, terms, G, dx);
    MatD Gd = testing::to_double(G);
    const auto L = nn::batch_layout::of(M, lengths, "test");
    for (index_t b = 0; b < B; ++b)
        for (index_t t = lengths[std::size_t(b)]; t < S; ++t) {
            Gd.row(b * S + t).setZero();
            for (index_t c = 0; c < d; ++c) REQUIRE(dx(b * S + t, c) == 0.f);  // padded rows get nothing
        }
    (void)L;

    const MatD xd = testing::to_double(x);
    auto refs = refs_of(terms);
    auto vr = vec_refs_of(terms);
    for (int i = 0; i < pet::norm_site_count; ++i)  // BitFit's Δβ folded into the reference's β
        if (const auto& db = terms.norm_beta[std::size_t(i)]) {
            auto& b = i == 0 ? w.norm1_beta : w.norm2_beta;
            for (std::size_t c = 0; c < b.size(); ++c) b[c] += db.v[c];
        }
    const double h = 1e-5;
    std::mt19937 gen(seed + 3);
    // dx at sampled real rows
    {
        grad_check gc;
        for (int n = 0; n < 12; ++n) {
            index_t b = index_t(gen() % unsigned(B));
            while (lengths[std::size_t(b)] == 0) b = (b + 1) % B;
            const index_t r = b * S + index_t(gen() % unsigned(lengths[std::size_t(b)])), c = index_t(gen() % unsigned(d));
            MatD xp = xd, xm = xd;
            xp(r, c) += h;
            xm(r, c) -= h;
            const double fd = (ref_loss<C>({w}, s, xp, lengths, refs, Gd, vr) - ref_loss<C>({w}, s, xm, lengths, refs, Gd, vr)) / (2 * h);
            gc.add(dx(r, c), fd);
        }
        INFO("dx: worst |analytic - fd| = " << gc.worst_abs << " of scale " << gc.scale);
        CHECK(gc.rel() < 2e-3);
    }
    // every factor of every term
    std::size_t k = 0;
    for (int i = 0; i < pet::target_count; ++i)
        for (const auto& t : terms.of(pet::target(i))) {
            auto& tr = refs[k++];
            for (int which = 0; which < 2; ++which) {
                MatD& P = which == 0 ? tr.A : tr.B;
                const ConstMatrixView<float> g = which == 0 ? ConstMatrixView<float>(t.gA) : ConstMatrixView<float>(t.gB);
                grad_check gc;
                for (int n = 0; n < 8; ++n) {
                    const index_t r = index_t(gen() % unsigned(P.rows())), c = index_t(gen() % unsigned(P.cols()));
                    const double v0 = P(r, c);
                    P(r, c) = v0 + h;
                    const double lp = ref_loss<C>({w}, s, xd, lengths, refs, Gd, vr);
                    P(r, c) = v0 - h;
                    const double lm = ref_loss<C>({w}, s, xd, lengths, refs, Gd, vr);
                    P(r, c) = v0;
                    gc.add(g(r, c), (lp - lm) / (2 * h));
                }
                INFO("target " << pet::target_name(pet::target(i)) << (which == 0 ? " A" : " B")
                               << (t.gelu ? " (gelu recovery)" : "") << ": worst |analytic - fd| = " << gc.worst_abs
                               << " of scale " << gc.scale);
                CHECK(gc.rel() < 2e-3);
            }
        }
    // IA3 scales and BitFit bias deltas (double copies perturbed)
    for (int i = 0; i < pet::target_count; ++i)
        for (int which = 0; which < 2; ++which) {
            const auto& vt = which == 0 ? terms.scale[std::size_t(i)] : terms.bias[std::size_t(i)];
            if (!vt) continue;
            Eigen::VectorXd& P = which == 0 ? vr.scale[std::size_t(i)] : vr.bias[std::size_t(i)];
            grad_check gc;
            for (int n = 0; n < 8; ++n) {
                const Eigen::Index c = Eigen::Index(gen() % unsigned(P.size()));
                const double v0 = P(c);
                P(c) = v0 + h;
                const double lp = ref_loss<C>({w}, s, xd, lengths, refs, Gd, vr);
                P(c) = v0 - h;
                const double lm = ref_loss<C>({w}, s, xd, lengths, refs, Gd, vr);
                P(c) = v0;
                gc.add(vt.g[std::size_t(c)], (lp - lm) / (2 * h));
            }
            INFO("target " << std::string(pet::target_name(pet::target(i))) << std::string(which == 0 ? " IA3 scale" : " BitFit bias")
                           << ": worst |analytic - fd| = " << gc.worst_abs << " of scale " << gc.scale);
            CHECK(gc.rel() < 2e-3);
        }
    // BitFit's Δβ: the reference's β is float, so the step is 1e-3 and the difference quotient uses the step the
    // float really took
    for (int i = 0; i < pet::norm_site_count; ++i) {
        const auto& vt = terms.norm_beta[std::size_t(i)];
        if (!vt) continue;
        auto& b = i == 0 ? w.norm1_beta : w.norm2_beta;
        grad_check gc;
        for (int n = 0; n < 6; ++n) {
            const std::size_t c = gen() % unsigned(b.size());
            const float v0 = b[c];
            b[c] = v0 + 1e-3f;
            const double up = double(b[c]) - double(v0);
            const double lp = ref_loss<C>({w}, s, xd, lengths, refs, Gd, vr);
            b[c] = v0 - 1e-3f;
            const double down = double(v0) - double(b[c]);
            const double lm = ref_loss<C>({w}, s, xd, lengths, refs, Gd, vr);
            b[c] = v0;
            gc.add(vt.g[c], (lp - lm) / (up + down));
        }
        INFO(pet::norm_site_name(pet::norm_site(i)) << " BitFit beta: worst |analytic - fd| = " << gc.worst_abs
                                                    << " of scale " << gc.scale);
        CHECK(gc.rel() < 2e-3);
    }
}

nn::layer_shape bert_shape() {
    nn::layer_shape s;
    s.d_model = 16, s.n_heads = 4, s.n_kv_heads = 4, s.head_dim = 4, s.d_ff = 24, s.eps = 1e-12f;
    return s;
}
nn::layer_shape llama_shape() {
    nn::layer_shape s;
    s.d_model = 16, s.n_heads = 4, s.n_kv_heads = 2, s.head_dim = 6, s.d_ff = 20, s.eps = 1e-6f;
    return s;
}

template <class C>
pet::task cpet_task(const nn::layer_shape& s, unsigned seed) {
    nn::TransformerLayer<C> probe(nn::random_layer_weights(s, 1, nn::kind_of<C>), s);
    const auto dims = probe.pet_dims();
    pet::recovery::options ro;
    ro.rank = 3;
    auto rec = pet::recovery::make(dims, ro, seed);
    randomise_b(rec, seed + 10);
    pet::lora::options lo;
    lo.rank = 2;
    lo.alpha = 4.f;
    lo.targets = pet::target_set{pet::target::q, pet::target::k, pet::target::o, pet::target::up};
    auto lora = pet::lora::make(dims, lo, seed + 1);
    randomise_b(lora, seed + 20);
    return pet::task(std::move(rec), std::move(lora));
}

}  // namespace

TEST_CASE("train::backward of a BERT layer (post-LN, GELU MLP) with CPET's recovery + LoRA matches finite differences") {
    using C = config::bert<>;
    testing::for_each_isa([&](arch::isa) { check_layer<C>(bert_shape(), {3, 1, 5}, 5, cpet_task<C>(bert_shape(), 7), 11); });
}

TEST_CASE("train::backward of a LLaMA layer (pre-RMSNorm, SwiGLU, causal, RoPE, GQA) matches finite differences") {
    using C = config::llama<>;
    check_layer<C>(llama_shape(), {4, 7, 1}, 7, cpet_task<C>(llama_shape(), 8), 12);
}

TEST_CASE("train::backward of a GPT-2 layer (pre-LN, tanh GELU, causal) with LoRA alone matches finite differences") {
    using C = config::gpt2<>;
    nn::TransformerLayer<C> probe(nn::random_layer_weights(bert_shape(), 1, nn::kind_of<C>), bert_shape());
    pet::lora::options lo;
    lo.rank = 3;
    lo.targets = pet::target_set{pet::target::q, pet::target::k, pet::target::v, pet::target::o, pet::target::up,
                                 pet::target::down};
    auto m = pet::lora::make(probe.pet_dims(), lo, 5);
    randomise_b(m, 6);
    check_layer<C>(bert_shape(), {2, 6}, 6, m, 13);
}

TEST_CASE("train::backward through compressed weights (int8, 2:4 sparse) uses what the format computes") {
    check_layer<config::bert<compress::int8_per_channel>>(bert_shape(), {5, 2}, 5,
                                                          cpet_task<config::bert<compress::int8_per_channel>>(bert_shape(), 9), 14);
    check_layer<config::llama<compress::nm_sparse<2, 4>>>(llama_shape(), {3, 3}, 3,
                                                           cpet_task<config::llama<compress::nm_sparse<2, 4>>>(llama_shape(), 10), 15);
}

/// IA3 (random scales near 1) and BitFit (random Δb on every linear that exists, Δβ where the norms have one).
template <class C>
pet::task ia3_bitfit_task(const nn::layer_shape& s, unsigned seed, bool with_lora) {
    nn::TransformerLayer<C> probe(nn::random_layer_weights(s, 1, nn::kind_of<C>), s);
    const auto dims = probe.pet_dims();
    pet::ia3::options io;
    io.targets = pet::target_set{pet::target::q, pet::target::k, pet::target::v, pet::target::down};
    auto ia = pet::ia3::make(dims, io);
    for (auto& l : ia.l)
        for (std::size_t j = 0; j < l.size(); ++j) l[j] = 0.8f + 0.4f * float((j * 37 + seed) % 11) / 10.f;
    pet::bitfit::modules bf;
    bf.dims = dims;
    for (int i = 0; i < pet::target_count; ++i)
        if (dims.has(pet::target(i))) {
            const auto r = testing::random_matrix(1, dims.out(pet::target(i)), seed + unsigned(i), -0.2f, 0.2f);
            bf.delta[std::size_t(i)].assign(r.data(), r.data() + r.size());
        }
    if (dims.norm_bias)
        for (int i = 0; i < pet::norm_site_count; ++i) {
            const auto r = testing::random_matrix(1, dims.d_model, seed + 20 + unsigned(i), -0.2f, 0.2f);
            bf.norm_delta[std::size_t(i)].assign(r.data(), r.data() + r.size());
        }
    pet::task t(std::move(ia), std::move(bf));
    if (with_lora) {
        pet::lora::options lo;
        lo.rank = 2;
        lo.targets = pet::target_set{pet::target::v, pet::target::down};
        auto l = pet::lora::make(dims, lo, seed);
        randomise_b(l, seed + 3);
        t.add(std::move(l));
    }
    return t;
}

TEST_CASE("train::backward with IA3 and BitFit (alone and beside LoRA) matches finite differences") {
    check_layer<config::bert<>>(bert_shape(), {3, 5}, 5, ia3_bitfit_task<config::bert<>>(bert_shape(), 3, false), 21);
    check_layer<config::bert<>>(bert_shape(), {4, 1, 2}, 4, ia3_bitfit_task<config::bert<>>(bert_shape(), 4, true), 22);
    check_layer<config::llama<>>(llama_shape(), {5, 2}, 5, ia3_bitfit_task<config::llama<>>(llama_shape(), 5, true), 23);
    check_layer<config::gpt2<compress::int8_per_channel>>(
        bert_shape(), {2, 3}, 3, ia3_bitfit_task<config::gpt2<compress::int8_per_channel>>(bert_shape(), 6, false), 24);
}

TEST_CASE("train::bind refuses gradient stores that do not mirror the task") {
    using C = config::bert<>;
    nn::TransformerLayer<C> layer(nn::random_layer_weights(bert_shape(), 1, nn::kind_of<C>), bert_shape());
    const auto dims = layer.pet_dims();
    pet::task t(pet::lora::make(dims, {}, 1), pet::parallel_adapter::make(dims, {.bottleneck = 4}, 1));
    pet::task g = pet::task(pet::lora::make(dims, {}, 1));
    CHECK_THROWS_WITH_AS(train::bind(dims, t, g), doctest::Contains("2 methods"), shape_error);
    pet::task other(pet::lora::make(dims, {}, 1), pet::scaled_parallel_adapter::make(dims, {.bottleneck = 4}, 1));
    CHECK_THROWS_WITH_AS(train::bind(dims, t, other), doctest::Contains("is scaled_parallel_adapter, not parallel_adapter"),
                         shape_error);

    // a module for a wider layer is refused at bind time, not read past in a kernel
    nn::layer_shape wide = bert_shape();
    wide.d_model = 24;
    nn::TransformerLayer<C> wl(nn::random_layer_weights(wide, 1, nn::kind_of<C>), wide);
    auto m = pet::lora::make(wl.pet_dims(), {}, 1);
    auto gm = train::zeros_like(m);
    CHECK_THROWS_AS(train::bind(dims, m, gm), shape_error);
}

}  // namespace cpet_test_train_layer_backward
