// embed — sentence embeddings from a HuggingFace BERT checkpoint (e.g. all-MiniLM-L6-v2), optionally compressed.
//
//   embed <model dir> [policy] [sentence ...]        sentences from the command line, else one per line on stdin
//   policy: dense (default) | int8 | int4 | w8a8 | w8a8-smooth | 2:4 | pruned50
//
// Prints the cosine-similarity matrix of the mean-pooled embeddings. With a policy other than dense, the model is
// compressed as it loads — each layer by nn::compress, calibrated on the given sentences as they flow through the
// layers already compressed — and the per-layer bytes and output error are printed, with every sentence's
// agreement (cosine) with the dense model's embedding.
//
//   cmake/fetch_minilm.sh build/models/all-MiniLM-L6-v2
//   ./build/examples/embed build/models/all-MiniLM-L6-v2 int8 "A man plays guitar." "Someone plays music."
#include <cmath>
#include <cpet/cpet.hpp>
#include <cpet/io/hf_checkpoint.hpp>
#include <cpet/io/wordpiece.hpp>
#include <cpet/nn/compress.hpp>
#include <cpet/nn/model.hpp>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

using namespace cpet;

namespace {

double cosine(const float* a, const float* b, index_t n) {
    double ab = 0, aa = 0, bb = 0;
    for (index_t i = 0; i < n; ++i) ab += double(a[i]) * b[i], aa += double(a[i]) * a[i], bb += double(b[i]) * b[i];
    return ab / std::sqrt(aa * bb);
}

void print_similarity(const Matrix<float>& e) {
    std::printf("cosine similarity:\n");
    for (index_t i = 0; i < e.rows(); ++i) {
        std::printf("  [%2td]", i);
        for (index_t j = 0; j < e.rows(); ++j) std::printf(" %6.3f", cosine(e.row(i), e.row(j), e.cols()));
        std::printf("\n");
    }
}

/// The model compressed layer by layer with policy P: layer i is calibrated on what the compressed layers before it
/// make of `calib` (the sentences), reporting bytes and error per layer.
template <class P>
nn::Model<config::bert<P>> compress_model(const nn::model_weights& w, const nn::token_batch& calib,
                                          const nn::compress_options& o) {
    using C = config::bert<P>;
    nn::embedding_weights ew;
    ew.word = Matrix<float>(w.embeddings.word.view());
    ew.position = Matrix<float>(w.embeddings.position.view());
    ew.token_type = Matrix<float>(w.embeddings.token_type.view());
    ew.norm_gamma = w.embeddings.norm_gamma;
    ew.norm_beta = w.embeddings.norm_beta;
    ew.norm_eps = w.embeddings.norm_eps;
    nn::Embeddings emb(std::move(ew));
    nn::calibration_set cur;
    cur.x = Matrix<float>(calib.rows(), emb.d_model());
    cur.lengths = calib.lengths;
    const auto L = calib.layout("embed");
    emb.check(calib, L, "embed");
    emb.forward(calib, L, cur.x);
    std::vector<TransformerLayer<C>> layers;
    std::size_t dense = 0, packed = 0;
    for (std::size_t i = 0; i < w.layers.size(); ++i) {
        auto c = nn::compress<C>(w.layers[i], w.shape, cur, o);
        std::printf("  layer %zu: %s\n", i, c.report.str().c_str());
        dense += c.report.dense_bytes;
        packed += c.report.bytes;
        Matrix<float> next(cur.x.rows(), cur.x.cols());
        nn::workspace ws;
        c.layer.forward(cur.x, cur.lengths, next, ws);
        cur.x = std::move(next);
        layers.push_back(std::move(c.layer));
    }
    std::printf("  all layers: %.2f MiB -> %.2f MiB (%.2fx)\n", double(dense) / 1048576.0, double(packed) / 1048576.0,
                packed ? double(dense) / double(packed) : 0.0);
    return nn::Model<C>(std::move(emb), nn::Stack<C>(std::move(layers)), {}, {}, w.shape.eps, std::nullopt, false,
                        std::nullopt);
}

template <class P>
int run_compressed(const std::string& dir, const nn::token_batch& batch, const Matrix<float>& dense_embeddings,
                   const nn::compress_options& o = {}) {
    const auto w = io::read_model_weights(dir);
    const auto model = compress_model<P>(w, batch, o);
    nn::workspace ws;
    const auto e = model.embed(batch, nn::pooling::mean, ws);
    print_similarity(e);
    std::printf("agreement with the dense model (cosine per sentence):");
    double worst = 1;
    for (index_t i = 0; i < e.rows(); ++i) {
        const double c = cosine(e.row(i), dense_embeddings.row(i), e.cols());
        worst = std::min(worst, c);
        std::printf(" %.5f", c);
    }
    std::printf("\nworst: %.5f\n", worst);
    return 0;
}

}  // namespace

int main(int argc, char** argv) try {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s <model dir> [dense|int8|int4|w8a8|w8a8-smooth|2:4|pruned50] [sentence ...]\n",
                     argv[0]);
        return 2;
    }
    const std::string dir = argv[1];
    std::string policy = "dense";
    int first = 2;
    const std::vector<std::string> policies{"dense", "int8", "int4", "w8a8", "w8a8-smooth", "2:4", "pruned50"};
    if (argc > 2 && std::find(policies.begin(), policies.end(), std::string(argv[2])) != policies.end()) {
        policy = argv[2];
        first = 3;
    }
    std::vector<std::string> sentences(argv + first, argv + argc);
    if (sentences.empty())
        for (std::string line; std::getline(std::cin, line);)
            if (!line.empty()) sentences.push_back(line);
    if (sentences.empty()) {
        std::fprintf(stderr, "embed: no sentences (give them as arguments or on stdin, one per line)\n");
        return 2;
    }

    const auto tok = io::wordpiece_tokenizer::from_model_dir(dir);
    const auto batch = tok.encode_batch(sentences, 256);
    const auto dense = io::load_model<config::bert<>>(dir);
    nn::workspace ws;
    const auto e = dense.embed(batch, nn::pooling::mean, ws);
    for (std::size_t i = 0; i < sentences.size(); ++i)
        std::printf("[%2zu] %3td tokens  %s\n", i, batch.lengths[i], sentences[i].c_str());
    std::printf("dense fp32, %zu layers, %.2f MiB of layer weights\n", dense.stack().size(),
                double(dense.stack_bytes()) / 1048576.0);
    if (policy == "dense") {
        print_similarity(e);
        return 0;
    }
    std::printf("policy %s:\n", policy.c_str());
    if (policy == "int8") return run_compressed<compress::int8_per_channel>(dir, batch, e);
    if (policy == "int4") return run_compressed<compress::int4_g128>(dir, batch, e);
    if (policy == "w8a8") return run_compressed<compress::w8a8>(dir, batch, e);
    if (policy == "w8a8-smooth") return run_compressed<compress::w8a8_smooth>(dir, batch, e);
    if (policy == "2:4") return run_compressed<compress::nm_sparse<2, 4>>(dir, batch, e);
    nn::compress_options o;  // pruned50: half the heads and half the FFN neurons, FLAP score, bias compensation
    o.prune.head_ratio = 0.5;
    o.prune.neuron_ratio = 0.5;
    o.prune.score = compress::prune_score::fluctuation;
    o.prune.bias_compensation = true;
    return run_compressed<compress::dense>(dir, batch, e, o);
} catch (const cpet::error& ex) {
    std::fprintf(stderr, "embed: %s\n", ex.what());
    return 1;
}
