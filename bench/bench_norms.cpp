// bench/bench_norms.cpp — the row-wise memory-bound kernels: layernorm, rmsnorm, softmax, rope.
//
// <family>/cpet/<rows>x<cols>/t<threads> vs <family>/eigen/<rows>x<cols>/t<threads> (Eigen array expressions, the
// way a user would write them). Bytes count one read and one write of the matrix (gamma/beta and the rope tables
// are small and stay in cache). rope uses heads of 64 (768 columns: 12 heads) and 128 (4096 columns: 32 heads).
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <cmath>
#include <string>
#include <vector>

#include "cpet/core/eigen.hpp"
#include "cpet/core/parallel.hpp"
#include "cpet/kernels/norms.hpp"
#include "cpet/kernels/rope.hpp"
#include "cpet/kernels/softmax.hpp"

#include "roofline.hpp"

namespace {

using cpet::index_t;
using ArrF = Eigen::Array<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

struct shape {
    index_t rows, cols;
    std::string name() const { return std::to_string(rows) + "x" + std::to_string(cols); }
    index_t head_dim() const { return cols >= 4096 ? 128 : 64; }
};

struct data {
    cpet::Matrix<float> x, y;
    std::vector<float> gamma, beta;
    explicit data(const shape& s) : x(s.rows, s.cols), y(s.rows, s.cols), gamma(s.cols, 1.1f), beta(s.cols, 0.1f) {
        cpet::as_eigen(x).setRandom();
    }
};

enum class family { layernorm, rmsnorm, softmax, rope };
const char* family_name(family f) {
    switch (f) {
        case family::layernorm: return "layernorm";
        case family::rmsnorm: return "rmsnorm";
        case family::softmax: return "softmax";
        default: return "rope";
    }
}

void run_cpet(benchmark::State& st, family f, shape s, int threads) {
    cpet::set_num_threads(threads);
    data d(s);
    for (auto _ : st) {
        switch (f) {
            case family::layernorm: cpet::kernels::layernorm(d.x, d.gamma.data(), d.beta.data(), 1e-5f, d.y); break;
            case family::rmsnorm: cpet::kernels::rmsnorm(d.x, d.gamma.data(), 1e-6f, d.y); break;
            case family::softmax: cpet::kernels::softmax_rows(d.x); break;  // in place; values stay finite
            case family::rope: cpet::kernels::rope(d.x, s.cols / s.head_dim(), s.head_dim(), 0); break;
        }
        benchmark::DoNotOptimize(d.y.data());
        benchmark::DoNotOptimize(d.x.data());
        benchmark::ClobberMemory();
    }
    cpet::bench::report_bytes(st, 2.0 * double(s.rows * s.cols) * sizeof(float), threads);
}

void run_eigen(benchmark::State& st, family f, shape s, int threads) {
    cpet::set_num_threads(threads);
    data d(s);
    auto X = cpet::as_eigen(d.x).array();
    auto Y = cpet::as_eigen(d.y).array();
    const Eigen::Map<const Eigen::Array<float, 1, Eigen::Dynamic>> gamma(d.gamma.data(), s.cols);
    const Eigen::Map<const Eigen::Array<float, 1, Eigen::Dynamic>> beta(d.beta.data(), s.cols);
    const index_t D = s.head_dim(), half = D / 2, heads = s.cols / D;
    Eigen::ArrayXf inv_freq(half);
    for (index_t i = 0; i < half; ++i) inv_freq(i) = std::pow(10000.f, -2.f * float(i) / float(D));
    for (auto _ : st) {
        switch (f) {
            case family::layernorm: {
                const Eigen::ArrayXf mean = X.rowwise().mean();
                Y = X.colwise() - mean;
                const Eigen::ArrayXf inv = (Y.square().rowwise().mean() + 1e-5f).rsqrt();
                Y = (Y.colwise() * inv).rowwise() * gamma;
                Y.rowwise() += beta;
                break;
            }
            case family::rmsnorm: {
                const Eigen::ArrayXf inv = (X.square().rowwise().mean() + 1e-6f).rsqrt();
                Y = (X.colwise() * inv).rowwise() * gamma;
                break;
            }
            case family::softmax: {
                X = (X.colwise() - X.rowwise().maxCoeff()).exp();
                X.colwise() /= X.rowwise().sum();
                break;
            }
            case family::rope: {
                for (index_t t = 0; t < s.rows; ++t) {
                    const Eigen::ArrayXf ang = float(t) * inv_freq;
                    const Eigen::ArrayXf c = ang.cos(), sn = ang.sin();
                    for (index_t h = 0; h < heads; ++h) {
                        auto a = X.row(t).segment(h * D, half).transpose();
                        auto b = X.row(t).segment(h * D + half, half).transpose();
                        const Eigen::ArrayXf a0 = a;
                        a = a0 * c - b * sn;
                        b = b * c + a0 * sn;
                    }
                }
                break;
            }
        }
        benchmark::DoNotOptimize(d.y.data());
        benchmark::DoNotOptimize(d.x.data());
        benchmark::ClobberMemory();
    }
    cpet::bench::report_bytes(st, 2.0 * double(s.rows * s.cols) * sizeof(float), threads);
}

}  // namespace

int main(int argc, char** argv) {
    for (family f : {family::layernorm, family::rmsnorm, family::softmax, family::rope})
        for (shape s : {shape{128, 768}, shape{512, 4096}})
            for (int t : {1, 2}) {
                const std::string suffix = s.name() + "/t" + std::to_string(t);
                const std::string fam = family_name(f);
                benchmark::RegisterBenchmark((fam + "/cpet/" + suffix).c_str(),
                                             [f, s, t](benchmark::State& st) { run_cpet(st, f, s, t); })
                    ->Repetitions(5)
                    ->ReportAggregatesOnly(true)
                    ->UseRealTime()
                    ->Unit(benchmark::kMicrosecond);
                benchmark::RegisterBenchmark((fam + "/eigen/" + suffix).c_str(),
                                             [f, s, t](benchmark::State& st) { run_eigen(st, f, s, t); })
                    ->Repetitions(5)
                    ->ReportAggregatesOnly(true)
                    ->UseRealTime()
                    ->Unit(benchmark::kMicrosecond);
            }
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
