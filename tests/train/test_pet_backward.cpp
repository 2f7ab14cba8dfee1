// tests/train/test_pet_backward.cpp — train::forward / backward with the PET methods beyond the linear hook:
// adapters (sequential, parallel, scaled parallel), prefix tuning / P-tuning v2, prompt tuning, and stacks of them
// (MAM = prefix + scaled parallel adapter, mixes with LoRA), against central finite differences of the
// double-precision reference layer (tests/nn/reference_layer.hpp); bad input; a short AdamW run.
//
// As in test_layer_backward.cpp the loss is L = Σ G ⊙ y over the real rows for a fixed random G, so dL/dy = G. The
// reference computes with double copies of every trainable tensor, so a finite difference perturbs one entry in
// double and nothing is rounded to float. Only bert<>, llama<> and gpt2<> are instantiated, and the tasks are
// pet::task values except one pet::stack (MAM), to keep this file's compile time modest.
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "cpet/nn/nn.hpp"
#include "cpet/train/model.hpp"
#include "cpet/train/loss.hpp"
#include "cpet/train/optim.hpp"
#include "nn/reference_layer.hpp"
#include "support/testing.hpp"
#include "train/model_testing.hpp"

namespace cpet_test_train_pet_backward {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using testing::MatD;

namespace {

// ---- double copies of a layer's terms, and the reference hooks they make ----

struct lowrank_ref {
    pet::target t;
    MatD A, B;
    double s;
    bool gelu;
};
struct adapter_ref {
    pet::sublayer w;
    MatD down, up;
    Eigen::RowVectorXd bd, bu;
    double s;
    kernels::activation act;
    bool sequential;
};
struct layer_ref {
    std::vector<lowrank_ref> lowrank;
    std::vector<adapter_ref> adapters;  // in the chain's order
    MatD pk, pv;                        // prefix rows (empty: none)
    MatD tokens;                        // virtual tokens (layer 0 of a model only)
};

Eigen::RowVectorXd row_of(std::span<const float> v) {
    Eigen::RowVectorXd r(Eigen::Index(v.size()));
    for (std::size_t i = 0; i < v.size(); ++i) r(Eigen::Index(i)) = v[i];
    return r;
}

layer_ref ref_of(const train::layer_terms& lt) {
    layer_ref r;
    for (int i = 0; i < pet::target_count; ++i)
        for (const auto& t : lt.of(pet::target(i)))
            r.lowrank.push_back({pet::target(i), testing::to_double(t.A), testing::to_double(t.B), double(t.scale), t.gelu});
    for (auto w : {pet::sublayer::attention, pet::sublayer::ffn})
        for (const auto& a : lt.after(w))
            r.adapters.push_back({w, testing::to_double(a.down), testing::to_double(a.up), row_of(a.b_down),
                                  row_of(a.b_up), double(a.scale), a.act, a.sequential});
    if (lt.prefix) r.pk = testing::to_double(lt.prefix.k), r.pv = testing::to_double(lt.prefix.v);
    if (lt.prompt) r.tokens = testing::to_double(lt.prompt.tokens);
    return r;
}

/// Hooks reading `r` through a pointer (a test perturbs r and evaluates again); the prefix is copied in.
testing::reference_hooks hooks_of(const layer_ref* r) {
    testing::reference_hooks h;
    h.linear_delta = [r](pet::target t, const MatD& x) -> MatD {
        MatD out;
        for (const auto& tr : r->lowrank) {
            if (tr.t != t) continue;
            MatD u = x * tr.A.transpose();
            if (tr.gelu) u = u.unaryExpr([](double z) { return testing::ref_act(kernels::activation::gelu_erf, z); });
            const MatD d = tr.s * u * tr.B.transpose();
            if (out.size() == 0) out = d;
            else out += d;
        }
        return out;
    };
    h.sublayer = [r](pet::sublayer w, const MatD& in, MatD& out) {
        for (const auto& a : r->adapters) {
            if (a.w != w) continue;
            const MatD& src = a.sequential ? out : in;
            MatD z = src * a.down.transpose();
            z.rowwise() += a.bd;
            const kernels::activation act = a.act;
            const MatD fz = z.unaryExpr([act](double v) { return testing::ref_act(act, v); });
            MatD add = fz * a.up.transpose();
            add.rowwise() += a.bu;
            out += a.s * add;
        }
    };
    h.prefix_k = r->pk;
    h.prefix_v = r->pv;
    return h;
}

/// max |analytic − fd| against max |fd|.
struct grad_check {
    double worst_abs = 0, scale = 0;
    void add(double analytic, double fd) {
        worst_abs = std::max(worst_abs, std::abs(analytic - fd));
        scale = std::max(scale, std::abs(fd));
    }
    double rel() const { return worst_abs / std::max(scale, 1e-4); }
};

/// A trainable tensor in double (the reference's copy) beside its analytic gradient.
struct checked_tensor {
    std::string name;
    double* values;  // into a MatD / RowVectorXd of a layer_ref
    index_t size;
    std::function<float(index_t)> grad;
};

std::vector<checked_tensor> tensors_of(layer_ref& r, const train::layer_terms& lt) {
    std::vector<checked_tensor> out;
    std::size_t k = 0;
    for (int i = 0; i < pet::target_count; ++i)
        for (const auto& t : lt.of(pet::target(i))) {
            auto& tr = r.lowrank[k++];
            const std::string n(pet::target_name(pet::target(i)));
            out.push_back({n + " A", tr.A.data(), index_t(tr.A.size()), [g = t.gA](index_t j) { return g.data()[j]; }});
            out.push_back({n + " B", tr.B.data(), index_t(tr.B.size()), [g = t.gB](index_t j) { return g.data()[j]; }});
        }
    k = 0;
    for (auto w : {pet::sublayer::attention, pet::sublayer::ffn})
        for (const auto& a : lt.after(w)) {
            auto& ar = r.adapters[k++];
            const std::string n = std::string(pet::sublayer_name(w)) + " adapter " + std::to_string(k) +
                                  (a.sequential ? " (sequential)" : " (parallel)");
            out.push_back({n + " W_down", ar.down.data(), index_t(ar.down.size()), [g = a.g_down](index_t j) { return g.data()[j]; }});
            out.push_back({n + " W_up", ar.up.data(), index_t(ar.up.size()), [g = a.g_up](index_t j) { return g.data()[j]; }});
            out.push_back({n + " b_down", ar.bd.data(), index_t(ar.bd.size()), [g = a.gb_down](index_t j) { return g[std::size_t(j)]; }});
            out.push_back({n + " b_up", ar.bu.data(), index_t(ar.bu.size()), [g = a.gb_up](index_t j) { return g[std::size_t(j)]; }});
        }
    if (lt.prefix) {
        out.push_back({"prefix k", r.pk.data(), index_t(r.pk.size()), [g = lt.prefix.gk](index_t j) { return g.data()[j]; }});
        out.push_back({"prefix v", r.pv.data(), index_t(r.pv.size()), [g = lt.prefix.gv](index_t j) { return g.data()[j]; }});
    }
    return out;
}

/// Checks each tensor's gradient at `samples` random entries against central differences of `loss`.
void check_tensors(std::vector<checked_tensor>& ts, const std::function<double()>& loss, std::mt19937& gen,
                   int samples) {
    const double h = 1e-5;
    for (auto& t : ts) {
        grad_check gc;
        for (int n = 0; n < samples; ++n) {
            const index_t j = index_t(gen() % unsigned(t.size));
            const double v0 = t.values[j];
            t.values[j] = v0 + h;
            const double lp = loss();
            t.values[j] = v0 - h;
            const double lm = loss();
            t.values[j] = v0;
            gc.add(t.grad(j), (lp - lm) / (2 * h));
        }
        INFO(t.name << ": worst |analytic - fd| = " << gc.worst_abs << " of scale " << gc.scale);
        CHECK(gc.scale > 0);  // every tensor checked here has a gradient
        CHECK(gc.rel() < 2e-3);
    }
}

/// forward equals the inference layer's; dx and every trainable tensor's gradient match finite differences.
template <class C, class Task>
void check_layer(const nn::layer_shape& s, const std::vector<index_t>& lengths, index_t S, const Task& task,
                 unsigned seed) {
    const auto wd = nn::random_layer_weights(s, seed, nn::kind_of<C>);
    const nn::TransformerLayer<C> layer(wd, s);
    const auto w = nn::dense_weights_of(layer);
    const index_t B = index_t(lengths.size()), M = B * S, d = s.d_model;
    Matrix<float> x = testing::random_matrix(M, d, seed + 1);
    const auto L = nn::batch_layout::of(M, lengths, "test");
    nn::detail::zero_padding(x, L);
    Task grads = train::zeros_like(task);
    const auto terms = train::bind(layer.pet_dims(), task, grads);

    Matrix<float> y(M, d), y_inf(M, d);
    train::layer_tape tape;
    train::forward(layer, x, lengths, y, terms, tape);
    nn::workspace ws;
    layer.forward(x, lengths, y_inf, ws, task);
    CHECK(testing::rel_error(y, testing::to_double(y_inf)) < 2e-5);

    Matrix<float> G = testing::random_matrix(M, d, seed + 2);
    Matrix<float> dx(M, d);
    train::backward(layer, tape, terms, G, dx);
    MatD Gd = testing::to_double(G);
    for (index_t b = 0; b < B; ++b)
        for (index_t t = lengths[std::size_t(b)]; t < S; ++t) {
            Gd.row(b * S + t).setZero();
            for (index_t c = 0; c < d; ++c) REQUIRE(dx(b * S + t, c) == 0.f);
        }

    layer_ref r = ref_of(terms);
    MatD xd = testing::to_double(x);
    auto loss = [&] {
        const MatD yr = testing::reference_batch<C>({w}, s, xd, lengths, {hooks_of(&r)});
        return (yr.array() * Gd.array()).sum();
    };
    std::mt19937 gen(seed + 3);
    {  // dx at sampled real rows
        grad_check gc;
        const double h = 1e-5;
        for (int n = 0; n < 12; ++n) {
            index_t b = index_t(gen() % unsigned(B));
            while (lengths[std::size_t(b)] == 0) b = (b + 1) % B;
            const index_t row = b * S + index_t(gen() % unsigned(lengths[std::size_t(b)])), c = index_t(gen() % unsigned(d));
            const double v0 = xd(row, c);
            xd(row, c) = v0 + h;
            const double lp = loss();
            xd(row, c) = v0 - h;
            const double lm = loss();
            xd(row, c) = v0;
            gc.add(dx(row, c), (lp - lm) / (2 * h));
        }
        INFO("dx: worst |analytic - fd| = " << gc.worst_abs << " of scale " << gc.scale);
        CHECK(gc.rel() < 2e-3);
    }
    auto ts = tensors_of(r, terms);
    REQUIRE(!ts.empty());
    check_tensors(ts, loss, gen, 6);
}

nn::layer_shape bert_shape() {
    nn::layer_shape s;
    s.d_model = 16, s.n_heads = 4, s.n_kv_heads = 4, s.head_dim = 4, s.d_ff = 24, s.eps = 1e-12f;
    return s;
}
nn::layer_shape llama_shape() {  // GQA: 4 query heads on 2 KV heads
    nn::layer_shape s;
    s.d_model = 16, s.n_heads = 4, s.n_kv_heads = 2, s.head_dim = 6, s.d_ff = 20, s.eps = 1e-6f;
    return s;
}

template <class C>
pet::layer_dims dims_of(const nn::layer_shape& s) {
    return nn::TransformerLayer<C>(nn::random_layer_weights(s, 1, nn::kind_of<C>), s).pet_dims();
}

/// An adapter of policy A with random non-zero W_up and biases (fresh ones start as the identity, W_up = 0,
/// where W_down would get no gradient).
template <class A>
typename A::modules random_adapter(const pet::layer_dims& d, index_t r, unsigned seed, bool attention = true,
                                   bool ffn = true, float scale = 2.f) {
    typename A::options o;
    o.bottleneck = r;
    o.attention = attention;
    o.ffn = ffn;
    o.scale = scale;
    auto m = A::make(d, o, seed);
    for (int i = 0; i < 2; ++i) {
        if (m.down[std::size_t(i)].empty()) continue;
        m.up[std::size_t(i)] = testing::random_matrix(d.d_model, r, seed + 10 + unsigned(i), -0.4f, 0.4f);
        const auto bd = testing::random_matrix(1, r, seed + 20 + unsigned(i), -0.3f, 0.3f);
        const auto bu = testing::random_matrix(1, d.d_model, seed + 30 + unsigned(i), -0.3f, 0.3f);
        m.b_down[std::size_t(i)].assign(bd.data(), bd.data() + bd.size());
        m.b_up[std::size_t(i)].assign(bu.data(), bu.data() + bu.size());
    }
    return m;
}

template <class Pre>
typename Pre::modules random_prefix(const pet::layer_dims& d, index_t P, unsigned seed) {
    return Pre::make(d, {.length = P}, seed);
}

pet::lora::modules random_lora(const pet::layer_dims& d, pet::target_set targets, unsigned seed) {
    pet::lora::options lo;
    lo.rank = 2;
    lo.alpha = 4.f;
    lo.targets = targets;
    auto m = pet::lora::make(d, lo, seed);
    for (int i = 0; i < pet::target_count; ++i) {
        auto& b = m.f.B[std::size_t(i)];
        if (!b.empty()) b = testing::random_matrix(b.rows(), b.cols(), seed + 40 + unsigned(i), -0.3f, 0.3f);
    }
    return m;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Layers
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("train::backward with each adapter form (sequential, parallel, scaled parallel) on a BERT layer, every ISA") {
    using C = config::bert<>;
    const auto d = dims_of<C>(bert_shape());
    testing::for_each_isa([&](arch::isa) {
        check_layer<C>(bert_shape(), {1, 7, 5}, 7, pet::task(random_adapter<pet::adapter>(d, 4, 1)), 31);
        check_layer<C>(bert_shape(), {1, 7, 5}, 7, pet::task(random_adapter<pet::parallel_adapter>(d, 3, 2)), 32);
        check_layer<C>(bert_shape(), {1, 7, 5}, 7,
                       pet::task(random_adapter<pet::scaled_parallel_adapter>(d, 5, 3, true, true, 4.f)), 33);
    });
}

TEST_CASE("train::backward with prefix tuning / P-tuning v2 on a BERT layer (padded batch), every ISA") {
    using C = config::bert<>;
    const auto d = dims_of<C>(bert_shape());
    testing::for_each_isa([&](arch::isa) {
        check_layer<C>(bert_shape(), {1, 7, 5}, 7, pet::task(random_prefix<pet::prefix_tuning>(d, 3, 4)), 34);
        check_layer<C>(bert_shape(), {7, 1}, 7, pet::task(random_prefix<pet::p_tuning_v2>(d, 1, 5)), 35);
    });
}

TEST_CASE("train::backward with MAM (pet::stack<prefix_tuning, scaled_parallel_adapter>) on a BERT layer, every ISA") {
    using C = config::bert<>;
    using MAM = pet::stack<pet::prefix_tuning, pet::scaled_parallel_adapter>;
    const auto d = dims_of<C>(bert_shape());
    const MAM::modules mam(random_prefix<pet::prefix_tuning>(d, 4, 6),
                           random_adapter<pet::scaled_parallel_adapter>(d, 4, 7, false, true, 4.f));
    testing::for_each_isa([&](arch::isa) { check_layer<C>(bert_shape(), {1, 7, 5}, 7, mam, 36); });
}

TEST_CASE("train::backward on a LLaMA layer (RoPE, GQA, causal, SwiGLU): prefix, adapters and a mix with LoRA") {
    using C = config::llama<>;
    const auto d = dims_of<C>(llama_shape());
    check_layer<C>(llama_shape(), {1, 7, 5}, 7, pet::task(random_prefix<pet::p_tuning_v2>(d, 3, 8)), 41);
    check_layer<C>(llama_shape(), {1, 7, 5}, 7, pet::task(random_adapter<pet::adapter>(d, 3, 9)), 42);
    // every kind at once: LoRA on q and v, the prefix, a sequential then a parallel adapter chained on each sublayer
    pet::task mix(random_lora(d, pet::target_set{pet::target::q, pet::target::v, pet::target::down}, 10),
                  random_prefix<pet::prefix_tuning>(d, 2, 11), random_adapter<pet::adapter>(d, 3, 12),
                  random_adapter<pet::parallel_adapter>(d, 2, 13));
    check_layer<C>(llama_shape(), {1, 7, 5}, 7, mix, 43);
}

TEST_CASE("train::backward on a GPT-2 layer (pre-LN, causal): scaled parallel adapter + prefix + LoRA") {
    using C = config::gpt2<>;
    const auto d = dims_of<C>(bert_shape());
    check_layer<C>(bert_shape(), {1, 7, 5}, 7, pet::task(random_adapter<pet::scaled_parallel_adapter>(d, 4, 14)), 51);
    pet::task mix(random_prefix<pet::p_tuning_v2>(d, 3, 15), random_adapter<pet::scaled_parallel_adapter>(d, 4, 16),
                  random_lora(d, pet::target_set{pet::target::k, pet::target::o}, 17));
    check_layer<C>(bert_shape(), {5, 1, 7}, 7, mix, 52);
}

namespace {
/// backward with an empty dx (the first layer over frozen embeddings) accumulates exactly the gradients a full
/// backward does.
template <class C>
void check_no_dx(const nn::layer_shape& s, const pet::task& task, unsigned seed) {
    const nn::TransformerLayer<C> layer(nn::random_layer_weights(s, seed, nn::kind_of<C>), s);
    const std::vector<index_t> lengths{7, 1, 5};
    const index_t S = 7, M = 3 * S, d = s.d_model;
    Matrix<float> x = testing::random_matrix(M, d, seed + 1);
    nn::detail::zero_padding(x, nn::batch_layout::of(M, lengths, "test"));
    const Matrix<float> G = testing::random_matrix(M, d, seed + 2);
    std::vector<std::vector<float>> got[2];
    for (int with_dx = 0; with_dx < 2; ++with_dx) {
        pet::task values = task;
        pet::task grads = train::zeros_like(values);
        const auto terms = train::bind(layer.pet_dims(), values, grads);
        Matrix<float> y(M, d), dx(M, d);
        train::layer_tape tape;
        train::forward(layer, x, lengths, y, terms, tape);
        train::backward(layer, tape, terms, G, with_dx ? MatrixView<float>(dx) : MatrixView<float>());
        std::vector<train::parameter> ps;
        train::append_parameters(values, grads, "l.", ps);
        for (const auto& p : ps) got[with_dx].emplace_back(p.grad.begin(), p.grad.end());
    }
    REQUIRE(got[0].size() == got[1].size());
    REQUIRE(!got[0].empty());
    for (std::size_t i = 0; i < got[0].size(); ++i) {
        double scale = 0;
        for (float g : got[1][i]) scale = std::max(scale, double(std::abs(g)));
        CHECK(scale > 0);  // every tensor got a gradient
        CHECK(got[0][i] == got[1][i]);
    }
}
}  // namespace

TEST_CASE("train::backward without dx (empty view) accumulates the same gradients, BitFit's pre-LN Δβ included") {
    {
        using C = config::bert<>;
        const auto d = dims_of<C>(bert_shape());
        check_no_dx<C>(bert_shape(),
                       pet::task(random_lora(d, pet::target_set{pet::target::q, pet::target::v}, 61),
                                 random_adapter<pet::parallel_adapter>(d, 3, 62)),
                       71);
    }
    {
        using C = config::gpt2<>;  // pre-LN LayerNorm: norm 1's Δβ needs d(attn_in) even when dx is not formed
        const auto d = dims_of<C>(bert_shape());
        check_no_dx<C>(bert_shape(),
                       pet::task(pet::bitfit::make(d), random_adapter<pet::parallel_adapter>(d, 3, 63),
                                 random_lora(d, pet::target_set{pet::target::q, pet::target::k}, 64)),
                       72);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Prompt tuning lives at the model: the virtual tokens go before each sequence after the embeddings
// ---------------------------------------------------------------------------------------------------------------

namespace {

/// The model's forward equals the inference model's (nn::Stack puts the tokens in); every gradient, the virtual
/// tokens' included, matches finite differences of the reference; recomputation gives the same gradients.
template <class C>
void check_model(const nn::model_weights& w, std::vector<pet::task> tasks, const nn::token_batch& batch, unsigned seed) {
    const nn::Model<C> model(w);
    const std::size_t n = tasks.size();
    std::vector<pet::task> grads;
    std::vector<train::layer_terms> terms;
    for (auto& t : tasks) grads.push_back(train::zeros_like(t));
    for (std::size_t l = 0; l < n; ++l) terms.push_back(train::bind(model.stack().layer(l).pet_dims(), tasks[l], grads[l]));
    REQUIRE(terms[0].prompt);
    const index_t M = batch.rows(), d = model.d_model(), S = batch.seq_len, B = batch.batch();
    const auto L = batch.layout("test");

    train::model_tape tape;
    train::forward(model, batch, terms, tape);
    nn::workspace ws;
    const Matrix<float> h = model.hidden_states(batch, ws, tasks);
    CHECK(testing::rel_error(tape.hidden, testing::to_double(h)) < 2e-5);
    CHECK(tape.prompt == terms[0].prompt.length());

    Matrix<float> G = testing::random_matrix(M, d, seed);
    nn::detail::zero_padding(G, L);
    train::backward(model, tape, terms, G);

    {  // recomputation: the same gradients, bit for bit
        std::vector<pet::task> g2;
        std::vector<train::layer_terms> t2;
        for (auto& t : tasks) g2.push_back(train::zeros_like(t));
        for (std::size_t l = 0; l < n; ++l) t2.push_back(train::bind(model.stack().layer(l).pet_dims(), tasks[l], g2[l]));
        train::model_tape rt;
        train::forward(model, batch, t2, rt, {.recompute = true});
        train::backward(model, rt, t2, G);
        std::vector<train::parameter> a, b;
        for (std::size_t l = 0; l < n; ++l) {
            train::append_parameters(tasks[l], grads[l], "l" + std::to_string(l) + ".", a);
            train::append_parameters(tasks[l], g2[l], "l" + std::to_string(l) + ".", b);
        }
        REQUIRE(a.size() == b.size());
        for (std::size_t i = 0; i < a.size(); ++i)
            for (std::size_t j = 0; j < a[i].grad.size(); ++j) REQUIRE(a[i].grad[j] == b[i].grad[j]);
    }

    // the reference: the embeddings' float output, [tokens; x_b] per sequence, the reference layers, the real rows,
    // the final norm
    Matrix<float> x(M, d);
    model.embeddings().forward(batch, L, x);
    const MatD xd = testing::to_double(x), Gd = testing::to_double(G);
    std::vector<layer_ref> refs;
    for (const auto& t : terms) refs.push_back(ref_of(t));
    auto loss = [&] {
        std::vector<testing::reference_hooks> hooks;
        for (const auto& r : refs) hooks.push_back(hooks_of(&r));
        const MatD& tok = refs[0].tokens;
        const index_t P = index_t(tok.rows());
        double l = 0;
        for (index_t b = 0; b < B; ++b) {
            const index_t len = L.length(b);
            MatD hb(P + len, d);
            hb << tok, xd.middleRows(b * S, len);
            std::vector<index_t> one{P + len};
            MatD yb = testing::reference_batch<C>(w.layers, w.shape, hb, one, hooks).bottomRows(len);
            if (!w.final_norm_gamma.empty())
                yb = testing::ref_norm(C::norm, yb, w.final_norm_gamma, w.final_norm_beta, w.shape.eps);
            l += (yb.array() * Gd.middleRows(b * S, len).array()).sum();
        }
        return l;
    };
    std::mt19937 gen(seed + 1);
    std::vector<checked_tensor> ts;
    for (std::size_t l = 0; l < n; ++l)
        for (auto& t : tensors_of(refs[l], terms[l])) {
            t.name = "layer " + std::to_string(l) + " " + t.name;
            ts.push_back(std::move(t));
        }
    const auto gt = terms[0].prompt.g;
    ts.push_back({"virtual tokens", refs[0].tokens.data(), index_t(refs[0].tokens.size()),
                  [gt](index_t j) { return gt.data()[j]; }});
    check_tensors(ts, loss, gen, 8);
}

}  // namespace

TEST_CASE("train::backward of a BERT model with prompt tuning (+ a parallel adapter, + LoRA in layer 1)") {
    using C = config::bert<>;
    const auto s = testing::tiny_shape(4);
    const auto w = testing::tiny_model<C>(s, 2, 17, false, 3);
    const auto d = dims_of<C>(s);
    std::vector<pet::task> tasks;
    tasks.emplace_back(pet::prompt_tuning::make(d, {.length = 3}, 1), random_adapter<pet::parallel_adapter>(d, 3, 2));
    tasks.emplace_back(random_lora(d, pet::target_set{pet::target::q, pet::target::v}, 3));
    check_model<C>(w, std::move(tasks), testing::tiny_batch(17, {1, 7, 5}, 7, 4), 61);
}

TEST_CASE("train::backward of a LLaMA model (GQA, RoPE, causal, final RMSNorm) with prompt tuning + LoRA, then P-tuning v2") {
    using C = config::llama<>;
    const auto s = testing::tiny_shape(2);
    const auto w = testing::tiny_model<C>(s, 2, 19, true, 5);
    const auto d = dims_of<C>(s);
    std::vector<pet::task> tasks;
    tasks.emplace_back(pet::prompt_tuning::make(d, {.length = 2}, 6),
                       random_lora(d, pet::target_set{pet::target::k, pet::target::up}, 7));
    tasks.emplace_back(random_prefix<pet::p_tuning_v2>(d, 2, 8), random_adapter<pet::adapter>(d, 2, 9));
    check_model<C>(w, std::move(tasks), testing::tiny_batch(19, {1, 7, 5}, 7, 10), 62);
}

// ---------------------------------------------------------------------------------------------------------------
// The parameters and the optimiser
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("train::append_parameters names every adapter / prefix / prompt tensor, decays weights only") {
    using C = config::bert<>;
    const auto d = dims_of<C>(bert_shape());
    pet::task t(pet::prompt_tuning::make(d, {.length = 2}, 1), random_prefix<pet::prefix_tuning>(d, 3, 2),
                random_adapter<pet::scaled_parallel_adapter>(d, 4, 3, true, false));
    pet::task g = train::zeros_like(t);
    std::vector<train::parameter> ps;
    train::append_parameters(t, g, "layer.0.", ps);
    train::check_parameters(ps, "test");
    std::vector<std::string> names;
    for (const auto& p : ps) names.push_back(p.name + (p.decay ? " decay" : ""));
    CHECK(names == std::vector<std::string>{
                       "layer.0.prompt_tuning.prompt_embeddings decay", "layer.0.prefix_tuning.prefix_k decay",
                       "layer.0.prefix_tuning.prefix_v decay",
                       "layer.0.scaled_parallel_adapter.attention.down.weight decay",
                       "layer.0.scaled_parallel_adapter.attention.down.bias",
                       "layer.0.scaled_parallel_adapter.attention.up.weight decay",
                       "layer.0.scaled_parallel_adapter.attention.up.bias"});
    CHECK(train::parameter_count(ps) == std::size_t(2 * 16 + 2 * 3 * 16 + 4 * 16 + 4 + 16 * 4 + 16));
    for (const auto& p : ps)
        for (float v : p.grad) REQUIRE(v == 0.f);  // zeros_like zeroed every tensor
    // the same for a pet::stack (MAM): the members' parameters in order
    using MAM = pet::stack<pet::prefix_tuning, pet::scaled_parallel_adapter>;
    MAM::modules mam(random_prefix<pet::prefix_tuning>(d, 3, 2), random_adapter<pet::scaled_parallel_adapter>(d, 4, 3));
    MAM::modules mg = train::zeros_like(mam);
    std::vector<train::parameter> ms;
    train::append_parameters(mam, mg, "", ms);
    REQUIRE(ms.size() == 2 + 8);
    CHECK(ms[0].name == "prefix_tuning.prefix_k");
    CHECK(ms[9].name == "scaled_parallel_adapter.ffn.up.bias");
    for (const auto& p : ms)
        for (float v : p.grad) REQUIRE(v == 0.f);
}

TEST_CASE("AdamW on an adapter + prefix task lowers a tiny BERT model's classification loss") {
    // label = whether token 1 occurs in the sequence; the backbone is frozen and random, so only the task's
    // modules and a fresh head can learn it
    using C = config::bert<>;
    const auto s = testing::tiny_shape(4);
    const index_t V = 11;
    const nn::Model<C> model(testing::tiny_model<C>(s, 2, V, false, 21));
    const auto d = model.stack().layer(0).pet_dims();
    std::vector<pet::task> tasks;
    for (int l = 0; l < 2; ++l) {
        auto ad = pet::parallel_adapter::make(d, {.bottleneck = 4}, 30 + unsigned(l));
        tasks.emplace_back(std::move(ad), random_prefix<pet::p_tuning_v2>(d, 2, 40 + unsigned(l)));
    }
    std::vector<pet::task> grads;
    std::vector<train::layer_terms> terms;
    for (auto& t : tasks) grads.push_back(train::zeros_like(t));
    for (std::size_t l = 0; l < tasks.size(); ++l) terms.push_back(train::bind(model.stack().layer(l).pet_dims(), tasks[l], grads[l]));
    auto head = train::linear_head::make(s.d_model, 2, 5);
    std::vector<train::parameter> ps;
    for (std::size_t l = 0; l < tasks.size(); ++l) train::append_parameters(tasks[l], grads[l], "layer." + std::to_string(l) + ".", ps);
    head.append_parameters("head.", ps);

    nn::token_batch batch = testing::tiny_batch(V, {6, 3, 5, 6, 4, 2, 6, 5}, 6, 9);
    std::vector<std::int32_t> labels;
    for (index_t b = 0; b < batch.batch(); ++b) {
        if (b % 2 == 0) batch.ids[std::size_t(b * 6 + 1)] = 1;  // half the sequences hold token 1
        else
            for (index_t i = 0; i < 6; ++i)
                if (batch.ids[std::size_t(b * 6 + i)] == 1) batch.ids[std::size_t(b * 6 + i)] = 2;
        labels.push_back(b % 2 == 0 ? 1 : 0);
    }
    const auto L = batch.layout("test");
    train::adamw opt({.weight_decay = 0.0});
    train::model_tape tape;
    auto step = [&](bool update) {
        train::zero_grad(ps);
        train::forward(model, batch, terms, tape);
        Matrix<float> pooled(batch.batch(), s.d_model), logits(batch.batch(), 2), dlogits(batch.batch(), 2),
            dpooled(batch.batch(), s.d_model), dh(tape.hidden.rows(), s.d_model);
        nn::pool(tape.hidden, L, nn::pooling::mean, pooled);
        head.forward(pooled, logits);
        const double l = train::cross_entropy(logits, labels, dlogits);
        if (update) {
            head.backward(pooled, dlogits, dpooled);
            train::pool_backward(dpooled, L, nn::pooling::mean, dh);
            train::backward(model, tape, terms, dh);
            opt.step(ps, 1e-2);
        }
        return l;
    };
    const std::vector<float> b_up0(tasks[0].get<pet::parallel_adapter::modules>(0).b_up[1]);
    const double first = step(false);
    for (int i = 0; i < 40; ++i) step(true);
    const double last = step(false);
    INFO("loss " << first << " -> " << last);
    CHECK(std::isfinite(last));
    CHECK(last < 0.5 * first);
    CHECK(tasks[0].get<pet::parallel_adapter::modules>(0).b_up[1] != b_up0);  // the adapter itself moved
}

// ---------------------------------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("train::bind / forward refuse misfit prefixes, adapters and virtual tokens, naming the problem, changing nothing") {
    using C = config::llama<>;
    const auto s = llama_shape();
    const nn::TransformerLayer<C> layer(nn::random_layer_weights(s, 1, nn::kind_of<C>), s);
    const auto d = layer.pet_dims();

    // a prefix made for a layer with another kv_dim
    pet::layer_dims other = d;
    other.kv_dim = d.kv_dim + 4;
    pet::task wrong(random_prefix<pet::p_tuning_v2>(other, 3, 1));
    pet::task wg = train::zeros_like(wrong);
    CHECK_THROWS_WITH_AS(train::bind(d, wrong, wg), doctest::Contains("p_tuning_v2 expects k and v [L, 12]"), shape_error);

    // a gradient store that does not mirror the values (a longer prefix, a wider bottleneck)
    pet::task t(random_prefix<pet::prefix_tuning>(d, 3, 2), random_adapter<pet::adapter>(d, 3, 3));
    pet::task g(random_prefix<pet::prefix_tuning>(d, 5, 2), random_adapter<pet::adapter>(d, 3, 3));
    CHECK_THROWS_WITH_AS(train::bind(d, t, g), doctest::Contains("prefix k is 5x12, the task's 3x12"), shape_error);
    pet::task g2(random_prefix<pet::prefix_tuning>(d, 3, 2), random_adapter<pet::adapter>(d, 4, 3));
    CHECK_THROWS_WITH_AS(train::bind(d, t, g2), doctest::Contains("attention adapter W_down"), shape_error);

    // virtual tokens in a single layer's forward, or past layer 0 of a model: refused before anything runs
    pet::task pt(pet::prompt_tuning::make(d, {.length = 2}, 4));
    pet::task pg = train::zeros_like(pt);
    const auto terms = train::bind(d, pt, pg);
    const index_t M = 2 * 4;
    Matrix<float> x = testing::random_matrix(M, s.d_model, 5), y(M, s.d_model);
    train::layer_tape tape;
    const std::vector<index_t> lengths{4, 2};
    CHECK_THROWS_WITH_AS(train::forward(layer, x, lengths, y, terms, tape), doctest::Contains("2 virtual tokens"),
                         shape_error);
    CHECK(tape.x.empty());

    const auto mw = testing::tiny_model<C>(testing::tiny_shape(2), 2, 13, true, 6);
    const nn::Model<C> model(mw);
    const auto md = model.stack().layer(0).pet_dims();
    std::vector<pet::task> tasks{pet::task(random_lora(md, pet::target_set{pet::target::q}, 7)),
                                 pet::task(pet::prompt_tuning::make(md, {.length = 2}, 8))};
    const Matrix<float> tokens_before(tasks[1].get<pet::prompt_tuning::modules>(0).tokens.view());
    std::vector<pet::task> grads;
    std::vector<train::layer_terms> mterms;
    for (auto& tk : tasks) grads.push_back(train::zeros_like(tk));
    for (std::size_t l = 0; l < 2; ++l) mterms.push_back(train::bind(model.stack().layer(l).pet_dims(), tasks[l], grads[l]));
    train::model_tape mt;
    CHECK_THROWS_WITH_AS(train::forward(model, testing::tiny_batch(13, {3, 2}, 3, 9), mterms, mt),
                         doctest::Contains("layer 1's terms carry 2 virtual tokens"), shape_error);
    CHECK(mt.layers.empty());
    CHECK(testing::rel_error(tasks[1].get<pet::prompt_tuning::modules>(0).tokens,
                             testing::to_double(tokens_before)) == 0.0);
    for (const auto& gk : grads) {
        std::vector<train::parameter> ps;
        pet::task copy = gk;
        train::append_parameters(copy, copy, "", ps);
        for (const auto& p : ps)
            for (float v : p.grad) REQUIRE(v == 0.f);
    }

    // a tape filled with other terms (no prefix) is refused by the backward
    pet::task pre(random_prefix<pet::prefix_tuning>(d, 2, 10));
    pet::task preg = train::zeros_like(pre);
    const auto pterms = train::bind(d, pre, preg);
    const train::layer_terms none;
    Matrix<float> x2 = testing::random_matrix(M, s.d_model, 11), dx(M, s.d_model);
    train::forward(layer, x2, lengths, y, none, tape);
    CHECK_THROWS_WITH_AS(train::backward(layer, tape, pterms, y, dx), doctest::Contains("other terms"), shape_error);
    const auto& gk = preg.get<pet::prefix_tuning::modules>(0).k;
    for (index_t i = 0; i < gk.size(); ++i) REQUIRE(gk.data()[i] == 0.f);
}

}  // namespace cpet_test_train_pet_backward
