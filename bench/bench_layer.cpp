// bench/bench_layer.cpp — whole Transformer layers: cpet's TransformerLayer against the same layer written with
// Eigen the way a user would.
//
// layer/cpet/bert_base_8x128/t<threads>       BERT-base layer (d 768, 12 heads, d_ff 3072), 8 sequences × 128 tokens
// layer/eigen/bert_base_8x128/t<threads>      the same layer with Eigen float products (Eigen's OpenMP threading)
// layer/cpet/llama7b_decode_kv512/t<threads>  LLaMA-7B layer (d 4096, 32 heads, d_ff 11008), one decode step
//                                             attending to 512 cached tokens; memory bound (810 MB of weights),
//                                             so it also reports GB/s against the measured read bandwidth.
// FLOPs: 2·tokens·(4d² + 2·d·d_ff) (BERT) or 2·(4d² + 3·d·d_ff) (LLaMA) for the linears plus 4·d per visible
// (query, key) pair for attention; norms and activations are not counted.
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "cpet/cpet.hpp"
#include "roofline.hpp"

namespace {

using cpet::index_t;
using MatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using VecF = Eigen::RowVectorXf;

cpet::nn::layer_shape bert_base() {
    cpet::nn::layer_shape s;
    s.d_model = 768, s.n_heads = 12, s.n_kv_heads = 12, s.head_dim = 64, s.d_ff = 3072, s.eps = 1e-12f;
    return s;
}
cpet::nn::layer_shape llama7b() {
    cpet::nn::layer_shape s;
    s.d_model = 4096, s.n_heads = 32, s.n_kv_heads = 32, s.head_dim = 128, s.d_ff = 11008, s.eps = 1e-6f;
    return s;
}
constexpr index_t bert_batch = 8, bert_seq = 128, llama_kv = 512;

double bert_flops() {
    const auto s = bert_base();
    const double T = double(bert_batch * bert_seq), d = double(s.d_model);
    return 2 * T * (4 * d * d + 2 * d * double(s.d_ff)) + 4 * double(bert_batch) * bert_seq * bert_seq * d;
}

cpet::Matrix<float> random_input(index_t rows, index_t cols, unsigned seed) {
    std::srand(seed);
    cpet::Matrix<float> m(rows, cols);
    cpet::as_eigen(m) = MatF::Random(rows, cols);
    return m;
}

const cpet::nn::dense_layer_weights& bert_weights() {
    static const auto w = cpet::nn::random_layer_weights(bert_base(), 1, cpet::nn::kind_of<cpet::config::bert<>>);
    return w;
}

void bm_cpet_bert(benchmark::State& st, int threads) {
    cpet::set_num_threads(threads);
    static const cpet::TransformerLayer<cpet::config::bert<>> layer(bert_weights(), bert_base());
    const std::vector<index_t> lengths(bert_batch, bert_seq);
    const auto x = random_input(bert_batch * bert_seq, bert_base().d_model, 2);
    cpet::Matrix<float> y(x.rows(), x.cols());
    cpet::nn::workspace ws;
    layer.forward(x, lengths, y, ws);
    for (auto _ : st) {
        layer.forward(x, lengths, y, ws);
        benchmark::DoNotOptimize(y.data());
    }
    st.SetLabel(std::string("isa=") + std::string(cpet::arch::name(ws.last_isa())));
    cpet::bench::report_flops(st, bert_flops(), threads);
}

/// The BERT layer as a user writes it with Eigen (float; per-sequence, per-head attention).
struct eigen_bert {
    MatF wq, wk, wv, wo, wu, wd;
    VecF bq, bk, bv, bo, bu, bd, g1, b1, g2, b2;
    float eps;
    explicit eigen_bert(const cpet::nn::dense_layer_weights& w, float eps_) : eps(eps_) {
        auto m = [](const cpet::Matrix<float>& a) { return MatF(cpet::as_eigen(a)); };
        auto v = [](const std::vector<float>& a) { return VecF(Eigen::Map<const VecF>(a.data(), index_t(a.size()))); };
        wq = m(w.wq), wk = m(w.wk), wv = m(w.wv), wo = m(w.wo), wu = m(w.w_up), wd = m(w.w_down);
        bq = v(w.bq), bk = v(w.bk), bv = v(w.bv), bo = v(w.bo), bu = v(w.b_up), bd = v(w.b_down);
        g1 = v(w.norm1_gamma), b1 = v(w.norm1_beta), g2 = v(w.norm2_gamma), b2 = v(w.norm2_beta);
    }
    void layernorm(MatF& x, const VecF& g, const VecF& b) const {
        for (index_t r = 0; r < x.rows(); ++r) {
            const float mean = x.row(r).mean();
            const float var = (x.row(r).array() - mean).square().mean();
            x.row(r) = ((x.row(r).array() - mean) / std::sqrt(var + eps) * g.array() + b.array()).matrix();
        }
    }
    void forward(const MatF& x, MatF& y, MatF& q, MatF& k, MatF& v, MatF& a, MatF& u, MatF& sc) const {
        const index_t H = 12, D = 64, S = bert_seq;
        q.noalias() = x * wq.transpose();
        q.rowwise() += bq;
        k.noalias() = x * wk.transpose();
        k.rowwise() += bk;
        v.noalias() = x * wv.transpose();
        v.rowwise() += bv;
        const float scale = 1.f / std::sqrt(float(D));
        for (index_t b = 0; b < bert_batch; ++b)
            for (index_t h = 0; h < H; ++h) {
                sc.noalias() = q.block(b * S, h * D, S, D) * k.block(b * S, h * D, S, D).transpose() * scale;
                for (index_t r = 0; r < S; ++r) {
                    sc.row(r) = (sc.row(r).array() - sc.row(r).maxCoeff()).exp();
                    sc.row(r) /= sc.row(r).sum();
                }
                a.block(b * S, h * D, S, D).noalias() = sc * v.block(b * S, h * D, S, D);
            }
        y.noalias() = a * wo.transpose();
        y.rowwise() += bo;
        y += x;
        layernorm(y, g1, b1);
        u.noalias() = y * wu.transpose();
        u.rowwise() += bu;
        u = u.unaryExpr([](float z) { return 0.5f * z * (1.f + std::erf(z * 0.70710678f)); });
        MatF t = y;  // residual
        y.noalias() = u * wd.transpose();
        y.rowwise() += bd;
        y += t;
        layernorm(y, g2, b2);
    }
};

void bm_eigen_bert(benchmark::State& st, int threads) {
    cpet::set_num_threads(threads);
    Eigen::setNbThreads(threads);
    static const eigen_bert layer(bert_weights(), bert_base().eps);
    const index_t T = bert_batch * bert_seq;
    const MatF x = cpet::as_eigen(random_input(T, 768, 2));
    MatF y(T, 768), q(T, 768), k(T, 768), v(T, 768), a(T, 768), u(T, 3072), sc(bert_seq, bert_seq);
    for (auto _ : st) {
        layer.forward(x, y, q, k, v, a, u, sc);
        benchmark::DoNotOptimize(y.data());
    }
    cpet::bench::report_flops(st, bert_flops(), threads);
}

void bm_cpet_llama_decode(benchmark::State& st, int threads) {
    cpet::set_num_threads(threads);
    const auto s = llama7b();
    static const auto layer = [&] {
        const auto w = cpet::nn::random_layer_weights(s, 3, cpet::nn::kind_of<cpet::config::llama<>>);
        return std::make_unique<cpet::TransformerLayer<cpet::config::llama<>>>(w, s);
    }();
    auto cache = layer->make_cache(1, llama_kv + 1);
    cache.append(0, random_input(llama_kv, s.kv_dim(), 4), random_input(llama_kv, s.kv_dim(), 5));
    const auto x = random_input(1, s.d_model, 6);
    cpet::Matrix<float> y(1, s.d_model);
    cpet::nn::workspace ws;
    const std::vector<index_t> one{1};
    for (auto _ : st) {
        layer->decode(x, one, y, cache, ws);
        cache.truncate(0, llama_kv);  // the next step again attends to 512 cached tokens + itself
        benchmark::DoNotOptimize(y.data());
    }
    const double d = double(s.d_model);
    st.SetLabel(std::string("isa=") + std::string(cpet::arch::name(ws.last_isa())));
    cpet::bench::report_flops(st, 2 * (4 * d * d + 3 * d * double(s.d_ff)) + 4 * double(llama_kv + 1) * d, threads);
    cpet::bench::report_bytes(st, double(layer->bytes()) + 2.0 * double(llama_kv + 1) * double(s.kv_dim()) * 4,
                              threads);
}

}  // namespace

int main(int argc, char** argv) {
    benchmark::Initialize(&argc, argv);
    for (int t : {1, 2}) {
        const std::string suffix = "/t" + std::to_string(t);
        auto configure = [](benchmark::internal::Benchmark* b) {
            b->Unit(benchmark::kMillisecond)->Repetitions(5)->ReportAggregatesOnly(true)->UseRealTime();
        };
        configure(benchmark::RegisterBenchmark(("layer/cpet/bert_base_8x128" + suffix).c_str(), bm_cpet_bert, t));
        configure(benchmark::RegisterBenchmark(("layer/eigen/bert_base_8x128" + suffix).c_str(), bm_eigen_bert, t));
        configure(benchmark::RegisterBenchmark(("layer/cpet/llama7b_decode_kv512" + suffix).c_str(),
                                               bm_cpet_llama_decode, t));
    }
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
