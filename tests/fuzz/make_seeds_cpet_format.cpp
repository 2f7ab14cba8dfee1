// tests/fuzz/make_seeds_cpet_format.cpp — writes the backbone and sparse-weight seeds of corpus/cpet_format/ (small
// files the fuzzer mutates: every backbone layout path starts from a valid file). Run once after a layout change:
//   g++ -std=c++20 -O1 -Iinclude -I/usr/include/eigen3 tests/fuzz/make_seeds_cpet_format.cpp -o /tmp/seeds -fopenmp
//   /tmp/seeds tests/fuzz/corpus/cpet_format
#include <cstdio>
#include <filesystem>

#include "cpet/io/backbone_file.hpp"
#include "cpet/io/cpet_format.hpp"

using namespace cpet;

namespace {

nn::calibration_set samples(index_t d) {
    nn::calibration_set set;
    set.lengths = {5, 3};
    set.x = Matrix<float>(10, d);
    for (index_t i = 0; i < set.x.size(); ++i) set.x.data()[i] = float((i * 37) % 23) / 11.f - 1.f;
    return set;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s <corpus dir>\n", argv[0]);
        return 2;
    }
    const std::filesystem::path dir = argv[1];
    nn::layer_shape s{.d_model = 16, .n_heads = 2, .n_kv_heads = 2, .head_dim = 8, .d_ff = 32, .eps = 1e-12f};
    {  // BERT, dense fp32, one layer
        using C = config::bert<compress::dense>;
        io::save_backbone(dir / "backbone_bert_dense",
                          std::vector<nn::TransformerLayer<C>>{nn::TransformerLayer<C>(nn::random_layer_weights(s, 1, nn::kind_of<C>), s)});
    }
    {  // LLaMA (GQA), int8 per channel, layer 1 pruned with compensated biases
        using C = config::llama<compress::int8_per_channel>;
        nn::layer_shape l = s;
        l.n_heads = 4, l.n_kv_heads = 2, l.head_dim = 4, l.eps = 1e-6f;
        const auto set = samples(l.d_model);
        std::vector<nn::compressed_layer<C>> layers;
        layers.push_back(nn::compress<C>(nn::random_layer_weights(l, 2, nn::kind_of<C>), l, set));
        nn::compress_options o;
        o.prune = {.head_ratio = 0.5, .neuron_ratio = 0.25, .score = compress::prune_score::fluctuation,
                   .bias_compensation = true};
        layers.push_back(nn::compress<C>(nn::random_layer_weights(l, 3, nn::kind_of<C>), l, set, o));
        io::save_backbone(dir / "backbone_llama_int8_pruned", layers, l);
    }
    {  // BERT, 2:4 with int8 values
        using C = config::bert<compress::nm_sparse<2, 4, compress::sparsity_score::magnitude, compress::sparse_values::int8>>;
        io::save_backbone(dir / "backbone_bert_nm24_int8",
                          std::vector<nn::TransformerLayer<C>>{nn::TransformerLayer<C>(nn::random_layer_weights(s, 4, nn::kind_of<C>), s)});
    }
    {  // weights: unstructured and N:M int8, as the weights reader sees them
        Matrix<float> w(20, 24);
        for (index_t i = 0; i < w.size(); ++i) w.data()[i] = float((i * 13) % 17) - 8.f;
        io::weights_writer wr;
        wr.add("layers.0.up", compress::unstructured_sparse<50>::compress(w));
        wr.add("layers.0.down",
               compress::nm_sparse<2, 4, compress::sparsity_score::magnitude, compress::sparse_values::int8>::compress(w));
        wr.save(dir / "weights_sparse");
    }
    return 0;
}
