// quickstart — build a BERT-base-shaped and a LLaMA-7B-shaped layer from seeded random weights, run them, check a
// few rows against a plain Eigen (double) implementation, and print error, ISA and speed.
//
//   cmake --build build --target quickstart && ./build/examples/quickstart
//
// The skeleton of every cpet program: dense weights -> TransformerLayer<Config> (compresses each linear through
// the Config's policy, dense here) -> forward(x, lengths, y, workspace [, task modules]).
#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cpet/cpet.hpp>
#include <cstdio>
#include <random>
#include <vector>

using namespace cpet;
using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

Matrix<float> random_input(index_t rows, index_t cols, unsigned seed) {
    std::mt19937 gen(seed);
    std::uniform_real_distribution<float> dist(-1.f, 1.f);
    Matrix<float> m(rows, cols);
    for (index_t i = 0; i < m.size(); ++i) m.data()[i] = dist(gen);
    return m;
}

// ---- a plain Eigen reference of the two layers (double precision, one sequence) ----

MatD dbl(const Matrix<float>& m) { return as_eigen(m).cast<double>(); }
MatD linear(const MatD& x, const Matrix<float>& w, const std::vector<float>& b) {
    MatD y = x * dbl(w).transpose();
    if (!b.empty()) y.rowwise() += Eigen::Map<const Eigen::VectorXf>(b.data(), Eigen::Index(b.size())).cast<double>().transpose();
    return y;
}
MatD layernorm(const MatD& x, const std::vector<float>& g, const std::vector<float>& b, double eps) {
    MatD y(x.rows(), x.cols());
    for (Eigen::Index r = 0; r < x.rows(); ++r) {
        const double mean = x.row(r).mean(), var = (x.row(r).array() - mean).square().mean();
        for (Eigen::Index c = 0; c < x.cols(); ++c) y(r, c) = (x(r, c) - mean) / std::sqrt(var + eps) * g[c] + b[c];
    }
    return y;
}
MatD rmsnorm(const MatD& x, const std::vector<float>& g, double eps) {
    MatD y(x.rows(), x.cols());
    for (Eigen::Index r = 0; r < x.rows(); ++r) {
        const double inv = 1.0 / std::sqrt(x.row(r).squaredNorm() / double(x.cols()) + eps);
        for (Eigen::Index c = 0; c < x.cols(); ++c) y(r, c) = x(r, c) * inv * g[c];
    }
    return y;
}
void rope(MatD& x, index_t heads, index_t hd, index_t pos0, double base) {
    for (Eigen::Index t = 0; t < x.rows(); ++t)
        for (index_t h = 0; h < heads; ++h)
            for (index_t i = 0; i < hd / 2; ++i) {
                const double a = double(pos0 + t) * std::pow(base, -2.0 * double(i) / double(hd));
                double& x0 = x(t, h * hd + i);
                double& x1 = x(t, h * hd + i + hd / 2);
                const double u = x0, v = x1;
                x0 = u * std::cos(a) - v * std::sin(a);
                x1 = v * std::cos(a) + u * std::sin(a);
            }
}
/// softmax(q kᵀ/√d (causal from q_pos0)) v, MHA/GQA.
MatD attention(const MatD& q, const MatD& k, const MatD& v, index_t heads, index_t kv_heads, index_t hd, bool causal,
               index_t q_pos0) {
    MatD out = MatD::Zero(q.rows(), q.cols());
    for (index_t h = 0; h < heads; ++h) {
        const index_t g = h / (heads / kv_heads);
        for (Eigen::Index i = 0; i < q.rows(); ++i) {
            const index_t n = causal ? q_pos0 + i + 1 : k.rows();
            Eigen::VectorXd s = k.block(0, g * hd, n, hd) * q.row(i).segment(h * hd, hd).transpose() / std::sqrt(double(hd));
            s = (s.array() - s.maxCoeff()).exp();
            s /= s.sum();
            out.row(i).segment(h * hd, hd) = s.transpose() * v.block(0, g * hd, n, hd);
        }
    }
    return out;
}

MatD bert_reference(const nn::dense_layer_weights& w, const nn::layer_shape& s, const MatD& x) {
    const MatD a = attention(linear(x, w.wq, w.bq), linear(x, w.wk, w.bk), linear(x, w.wv, w.bv), s.n_heads,
                             s.n_kv_heads, s.head_dim, false, 0);
    const MatD h = layernorm(x + linear(a, w.wo, w.bo), w.norm1_gamma, w.norm1_beta, s.eps);
    const MatD u = linear(h, w.w_up, w.b_up).unaryExpr([](double z) { return 0.5 * z * (1 + std::erf(z / std::sqrt(2.0))); });
    return layernorm(h + linear(u, w.w_down, w.b_down), w.norm2_gamma, w.norm2_beta, s.eps);
}

/// One LLaMA decode step: token x [1, d] at position `pos`, attending to cached K, V [pos, kv_dim] (rotated K).
MatD llama_decode_reference(const nn::dense_layer_weights& w, const nn::layer_shape& s, const MatD& x,
                            const MatD& k_cache, const MatD& v_cache) {
    const index_t pos = k_cache.rows();
    const MatD h = rmsnorm(x, w.norm1_gamma, s.eps);
    MatD q = linear(h, w.wq, {}), k = linear(h, w.wk, {}), v = linear(h, w.wv, {});
    rope(q, s.n_heads, s.head_dim, pos, s.rope_base);
    rope(k, s.n_kv_heads, s.head_dim, pos, s.rope_base);
    MatD K(pos + 1, s.kv_dim()), V(pos + 1, s.kv_dim());
    K << k_cache, k;
    V << v_cache, v;
    const MatD t = x + linear(attention(q, K, V, s.n_heads, s.n_kv_heads, s.head_dim, true, pos), w.wo, {});
    const MatD h2 = rmsnorm(t, w.norm2_gamma, s.eps);
    const MatD g = linear(h2, w.w_gate, {}).unaryExpr([](double z) { return z / (1 + std::exp(-z)); });
    return t + linear(g.cwiseProduct(linear(h2, w.w_up, {})), w.w_down, {});
}

double rel_error(ConstMatrixView<float> got, const MatD& ref) {
    return (as_eigen(got).cast<double>() - ref).norm() / ref.norm();
}

}  // namespace

int main() {
    const auto start = std::chrono::steady_clock::now();
    std::printf("cpet quickstart — ISA %s (compiled best %s, CPU best %s), %d thread(s)\n",
                std::string(arch::name(arch::active())).c_str(), std::string(arch::name(arch::compiled_best())).c_str(),
                std::string(arch::name(arch::cpu_best())).c_str(), max_threads());

    // ---------------- BERT-base layer, batch 8 x 128 ----------------
    {
        nn::layer_shape s;
        s.d_model = 768, s.n_heads = 12, s.n_kv_heads = 12, s.head_dim = 64, s.d_ff = 3072, s.eps = 1e-12f;
        using Bert = TransformerLayer<config::bert<>>;  // = config::bert<compress::dense>
        const auto w = nn::random_layer_weights(s, /*seed=*/1, nn::kind_of<config::bert<>>);
        const Bert layer(w, s);

        const index_t B = 8, S = 128;
        const std::vector<index_t> lengths(B, S);  // per-sequence lengths (padding mask); all full here
        const auto x = random_input(B * S, s.d_model, 2);
        Matrix<float> y(B * S, s.d_model);
        nn::workspace ws;  // reuse across calls: forward allocates nothing after the first one

        layer.forward(x, lengths, y, ws);  // warm-up
        double sec = 1e30;
        for (int rep = 0; rep < 3; ++rep) {  // best of 3
            const auto t0 = std::chrono::steady_clock::now();
            layer.forward(x, lengths, y, ws);
            sec = std::min(sec, seconds_since(t0));
        }

        const double T = double(B * S), d = double(s.d_model);
        const double flops = 2 * T * (4 * d * d + 2 * d * double(s.d_ff)) + 4 * double(B) * S * S * d;
        const index_t check_rows = 128;  // sequence 0 against the reference
        const MatD ref = bert_reference(w, s, as_eigen(x.view().middle_rows(0, check_rows)).cast<double>());
        const double err = rel_error(y.view().middle_rows(0, check_rows), ref);
        std::printf("BERT-base layer  d=768 heads=12 d_ff=3072, batch 8x128: %8.2f ms  %7.1f GFLOP/s  "
                    "max rel err %.2e (sequence 0 vs Eigen double)  isa %s  weights %.1f MB\n",
                    sec * 1e3, flops / sec * 1e-9, err, std::string(arch::name(ws.last_isa())).c_str(),
                    double(layer.bytes()) / 1e6);
        if (!(err <= 1e-4)) {
            std::printf("FAILED: BERT layer differs from the reference\n");
            return 1;
        }
    }

    // ---------------- LLaMA-7B layer, one decode step with 512 cached tokens ----------------
    {
        nn::layer_shape s;
        s.d_model = 4096, s.n_heads = 32, s.n_kv_heads = 32, s.head_dim = 128, s.d_ff = 11008, s.eps = 1e-6f;
        using Llama = TransformerLayer<config::llama<>>;
        const auto t_init = std::chrono::steady_clock::now();
        const auto w = nn::random_layer_weights(s, /*seed=*/3, nn::kind_of<config::llama<>>);
        const Llama layer(w, s);
        const double init_sec = seconds_since(t_init);

        // The cache stands for 512 tokens already processed: random (already rotated) keys and values.
        const index_t kv = 512;
        auto cache = layer.make_cache(/*batch=*/1, /*capacity=*/kv + 1);
        const auto k0 = random_input(kv, s.kv_dim(), 4), v0 = random_input(kv, s.kv_dim(), 5);

        const auto x = random_input(1, s.d_model, 6);
        Matrix<float> y(1, s.d_model);
        nn::workspace ws;
        const std::vector<index_t> one{1};
        double sec = 1e30;
        for (int rep = 0; rep < 6; ++rep) {  // a warm-up, then best of 5
            cache.clear();
            cache.append(0, k0, v0);
            const auto t0 = std::chrono::steady_clock::now();
            layer.decode(x, one, y, cache, ws);  // appends position 512, attends to 513 keys
            if (rep > 0) sec = std::min(sec, seconds_since(t0));
        }

        const double d = double(s.d_model);
        const double flops = 2 * (4 * d * d + 3 * d * double(s.d_ff)) + 4 * double(kv + 1) * d;
        const double bytes = double(layer.bytes()) + 2.0 * double(kv + 1) * double(s.kv_dim()) * 4;
        const MatD ref = llama_decode_reference(w, s, as_eigen(x).cast<double>(), as_eigen(k0).cast<double>(),
                                                as_eigen(v0).cast<double>());
        const double err = rel_error(y, ref);
        std::printf("LLaMA-7B layer   d=4096 heads=32 d_ff=11008, decode 1 token, KV 512: %8.2f ms  %7.1f GFLOP/s  "
                    "%6.1f GB/s  max rel err %.2e  isa %s  weights %.0f MB (built in %.1f s)\n",
                    sec * 1e3, flops / sec * 1e-9, bytes / sec * 1e-9, err,
                    std::string(arch::name(ws.last_isa())).c_str(), double(layer.bytes()) / 1e6, init_sec);
        if (!(err <= 1e-4)) {
            std::printf("FAILED: LLaMA layer differs from the reference\n");
            return 1;
        }
    }
    std::printf("total %.1f s\n", seconds_since(start));
    return 0;
}
