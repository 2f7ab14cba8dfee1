// tests/pet/pet_references.hpp — the reference (plain Eigen, double) of every PET method's hooks, written from the
// method's formula, to plug into testing::reference_layer; and helpers making modules with visible effect.
#pragma once

#include <vector>

#include "cpet/pet/pet.hpp"
#include "pet/pet_testing.hpp"

namespace cpet::testing {

/// Low-rank term s·f(x·Aᵀ)·Bᵀ of LoRA (f = identity) or recovery (f = GELU for the paper's form).
template <class M>
MatD lowrank_delta(const M& m, pet::target t, const MatD& x, bool gelu) {
    if (m.rank(t) == 0) return MatD();
    MatD u = x * to_double(m.A(t)).transpose();
    if (gelu) u = u.unaryExpr([](double z) { return ref_act(kernels::activation::gelu_erf, z); });
    return double(m.lowrank_scale(t)) * u * to_double(m.B(t)).transpose();
}
template <class M>
reference_hooks lowrank_ref(const M& m, bool gelu = false) {
    reference_hooks h;
    h.linear_delta = [&m, gelu](pet::target t, const MatD& x) { return lowrank_delta(m, t, x, gelu); };
    return h;
}

template <class P>
void adapter_apply(const typename P::modules& m, pet::sublayer w, const MatD& in, MatD& out) {
    const auto i = std::size_t(w);
    if (m.down[i].empty()) return;
    const MatD src = P::form == pet::adapter_form::sequential ? out : in;
    MatD hid = src * to_double(m.down[i]).transpose();
    for (Eigen::Index r = 0; r < hid.rows(); ++r)
        for (Eigen::Index c = 0; c < hid.cols(); ++c) hid(r, c) = ref_act(P::act, hid(r, c) + m.b_down[i][std::size_t(c)]);
    MatD add = hid * to_double(m.up[i]).transpose();
    for (Eigen::Index r = 0; r < add.rows(); ++r)
        for (Eigen::Index c = 0; c < add.cols(); ++c) add(r, c) += m.b_up[i][std::size_t(c)];
    out += double(m.scale()) * add;
}
template <class P>
reference_hooks adapter_ref(const typename P::modules& m) {
    reference_hooks h;
    h.sublayer = [&m](pet::sublayer w, const MatD& in, MatD& out) { adapter_apply<P>(m, w, in, out); };
    return h;
}

inline Eigen::VectorXd ia3_vector(const pet::ia3::modules& m, pet::target t) {
    const auto& v = m.l[std::size_t(t)];
    Eigen::VectorXd out(Eigen::Index(v.size()));
    for (std::size_t i = 0; i < v.size(); ++i) out(Eigen::Index(i)) = v[i];
    return out;
}
inline reference_hooks ia3_ref(const pet::ia3::modules& m) {
    reference_hooks h;
    h.scale = [&m](pet::target t) { return ia3_vector(m, t); };
    return h;
}

inline MatD bitfit_delta(const pet::bitfit::modules& m, pet::target t, const MatD& x) {
    const auto& d = m.delta[std::size_t(t)];
    if (d.empty()) return MatD();
    MatD out(x.rows(), Eigen::Index(d.size()));
    for (Eigen::Index r = 0; r < out.rows(); ++r)
        for (Eigen::Index c = 0; c < out.cols(); ++c) out(r, c) = d[std::size_t(c)];
    return out;
}
inline reference_hooks bitfit_ref(const pet::bitfit::modules& m) {
    reference_hooks h;
    h.linear_delta = [&m](pet::target t, const MatD& x) { return bitfit_delta(m, t, x); };
    return h;
}
/// BitFit's norm part in the reference: the layer's weights with β + Δβ for norm1 / norm2.
inline nn::dense_layer_weights bitfit_weights(nn::dense_layer_weights w, const pet::bitfit::modules& m) {
    for (int i = 0; i < pet::norm_site_count; ++i) {
        const auto& d = m.norm_delta[std::size_t(i)];
        auto& beta = i == 0 ? w.norm1_beta : w.norm2_beta;
        for (std::size_t c = 0; c < d.size(); ++c) beta.at(c) += d[c];
    }
    return w;
}

template <class M>
reference_hooks prefix_ref(const M& m) {
    reference_hooks h;
    h.prefix_k = to_double(m.k);
    h.prefix_v = to_double(m.v);
    return h;
}

// ---- modules with a visible effect (the factories' init is the identity for most methods) ----

template <class M>
void randomize_up(M& m, const pet::layer_dims& d, unsigned seed) {
    for (int i = 0; i < pet::target_count; ++i) {
        const auto t = pet::target(i);
        if (m.rank(t) == 0) continue;
        m.set(t, m.A(t), random_matrix(d.out(t), m.rank(t), seed + 7 * unsigned(i), -0.3f, 0.3f));
    }
}

template <class P>
typename P::modules random_adapter(const pet::layer_dims& d, typename P::options o, unsigned seed) {
    auto m = P::make(d, o, seed);
    for (auto w : {pet::sublayer::attention, pet::sublayer::ffn}) {
        if (!m.has(w)) continue;
        const index_t r = m.bottleneck(w);
        const auto bd = random_matrix(1, r, seed + 1);
        const auto bu = random_matrix(1, d.d_model, seed + 2, -0.1f, 0.1f);
        m.set(w, random_matrix(r, d.d_model, seed + 3, -0.3f, 0.3f), random_matrix(d.d_model, r, seed + 4, -0.3f, 0.3f),
              std::span<const float>(bd.data(), std::size_t(r)), std::span<const float>(bu.data(), std::size_t(d.d_model)));
        seed += 10;
    }
    return m;
}

inline pet::ia3::modules random_ia3(const pet::layer_dims& d, pet::target_set ts, unsigned seed) {
    auto m = pet::ia3::make(d, {.targets = ts});
    for (int i = 0; i < pet::target_count; ++i) {
        const auto t = pet::target(i);
        if (!ts.contains(t)) continue;
        const auto r = random_matrix(1, m.width(t), seed++, 0.5f, 1.5f);
        m.set(t, std::span<const float>(r.data(), std::size_t(r.cols())));
    }
    return m;
}

inline pet::bitfit::modules random_bitfit(const pet::layer_dims& d, unsigned seed) {
    auto m = pet::bitfit::make(d);
    for (int i = 0; i < pet::target_count; ++i) {
        const auto t = pet::target(i);
        if (m.delta[std::size_t(i)].empty()) continue;
        const auto r = random_matrix(1, d.out(t), seed++, -0.2f, 0.2f);
        m.set(t, std::span<const float>(r.data(), std::size_t(r.cols())));
    }
    for (int i = 0; i < pet::norm_site_count; ++i) {
        if (m.norm_delta[std::size_t(i)].empty()) continue;
        const auto r = random_matrix(1, d.d_model, seed++, -0.2f, 0.2f);
        m.set_norm(pet::norm_site(i), std::span<const float>(r.data(), std::size_t(r.cols())));
    }
    return m;
}

}  // namespace cpet::testing
