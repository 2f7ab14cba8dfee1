// tests/train/train_testing.hpp — what the train/ tests share: the torch reference file, parameters owning their
// storage, and a toy least-squares problem with a hand-written backward for the trainer.
#pragma once

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "cpet/train/loss.hpp"
#include "cpet/train/parameter.hpp"
#include "cpet/train/trainer.hpp"
#include "io/io_testing.hpp"

namespace cpet::testing {

/// tests/reference/train_reference.json (tests/reference/make_train_references.py writes it).
inline const nlohmann::json& train_reference() {
    static const nlohmann::json j = [] {
        std::ifstream in(reference_dir() / "train_reference.json");
        REQUIRE_MESSAGE(in.good(), "tests/reference/train_reference.json is missing");
        return nlohmann::json::parse(in);
    }();
    return j;
}

inline std::vector<float> floats(const nlohmann::json& j) { return j.get<std::vector<float>>(); }

/// max |a − b| / max |b| (|b| floored at 1e-30): the relative error the torch comparisons use.
inline double rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
    REQUIRE(a.size() == b.size());
    double num = 0, den = 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
        num = std::max(num, std::abs(double(a[i]) - double(b[i])));
        den = std::max(den, std::abs(double(b[i])));
    }
    return den > 1e-30 ? num / den : num;
}

/// Copies `src` into `dst` keeping dst's storage (parameters view it).
inline void assign(std::vector<float>& dst, const std::vector<float>& src) {
    REQUIRE(dst.size() == src.size());
    std::copy(src.begin(), src.end(), dst.begin());
}

inline bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

/// Trainable tensors that own their values and gradients; params() views them.
struct owned_params {
    std::vector<std::string> names;
    std::vector<std::vector<float>> values, grads;
    std::vector<bool> decay;

    void add(std::string name, std::vector<float> v, bool d = true) {
        names.push_back(std::move(name));
        grads.emplace_back(v.size(), 0.f);
        values.push_back(std::move(v));
        decay.push_back(d);
    }
    std::vector<train::parameter> params() {
        std::vector<train::parameter> ps;
        for (std::size_t i = 0; i < names.size(); ++i) ps.push_back({names[i], values[i], grads[i], decay[i]});
        return ps;
    }
};

/// y = x·Wᵀ + b fitted to targets by MSE; rows [i·rows_per_batch, (i+1)·rows_per_batch) are micro-batch i.
struct least_squares {
    static constexpr index_t in = 5, out = 3;
    index_t rows = 0, rows_per_batch = 0;
    std::vector<float> x, y;
    owned_params p;
    int calls = 0;
    int nan_at_call = -1;   ///< the call (from 0) whose loss is NaN
    int nan_grad_at_call = -1;  ///< the call whose gradient of "b" is NaN

    least_squares(index_t rows_, index_t per_batch, unsigned seed = 7) : rows(rows_), rows_per_batch(per_batch) {
        std::mt19937 gen(seed);
        std::normal_distribution<float> nd(0.f, 1.f);
        std::vector<float> w_true(out * in);
        for (auto& v : w_true) v = nd(gen);
        x.resize(std::size_t(rows * in));
        for (auto& v : x) v = nd(gen);
        y.resize(std::size_t(rows * out));
        for (index_t r = 0; r < rows; ++r)
            for (index_t o = 0; o < out; ++o) {
                float s = 0.5f * float(o);
                for (index_t k = 0; k < in; ++k) s += w_true[std::size_t(o * in + k)] * x[std::size_t(r * in + k)];
                y[std::size_t(r * out + o)] = s + 0.01f * nd(gen);
            }
        std::vector<float> w0(out * in), b0(out);
        for (auto& v : w0) v = 0.1f * nd(gen);
        for (auto& v : b0) v = 0.1f * nd(gen);
        p.add("w", w0);
        p.add("b", b0, false);
    }

    /// Loss and gradient of rows [r0, r0 + n), added into the gradients of `ps` (w, b).
    train::micro_batch_result run(std::span<const train::parameter> ps, index_t r0, index_t n) {
        const int call = calls++;
        Matrix<float> pred(n, out), dpred(n, out);
        for (index_t r = 0; r < n; ++r)
            for (index_t o = 0; o < out; ++o) {
                float s = ps[1].value[std::size_t(o)];
                for (index_t k = 0; k < in; ++k)
                    s += ps[0].value[std::size_t(o * in + k)] * x[std::size_t((r0 + r) * in + k)];
                pred(r, o) = s;
            }
        const ConstMatrixView<float> target(y.data() + r0 * out, n, out);
        double loss = train::mse(pred, target, dpred);
        for (index_t r = 0; r < n; ++r)
            for (index_t o = 0; o < out; ++o) {
                ps[1].grad[std::size_t(o)] += dpred(r, o);
                for (index_t k = 0; k < in; ++k)
                    ps[0].grad[std::size_t(o * in + k)] += dpred(r, o) * x[std::size_t((r0 + r) * in + k)];
            }
        if (call == nan_at_call) loss = std::nan("");
        if (call == nan_grad_at_call) ps[1].grad[0] = std::nanf("");
        return {train::loss_parts::of("mse", loss), n};
    }
    train::trainer::step_fn step_fn(std::span<const train::parameter> ps) {
        return [this, ps](std::int64_t i) { return run(ps, index_t(i) * rows_per_batch, rows_per_batch); };
    }
};

}  // namespace cpet::testing
