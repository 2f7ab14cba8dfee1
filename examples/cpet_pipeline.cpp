// examples/cpet_pipeline.cpp — the CPET paper's four paradigms in miniature, on a real model and real data.
//
//   cpet_pipeline <all-MiniLM-L6-v2 dir> [--quick] [--epochs N] [--fortunes DIR] [--no-ablations]
//
// Task: topic classification of Debian's fortunes (apt-get install fortunes): 6 categories, up to 160 texts each,
// a fixed 80/20 split by a hash of the text, accuracy on the held-out 20 %. Paradigms (Zhao et al., 2023, Fig. 1):
//   1. dense MiniLM + LoRA (the teacher)
//   2. a small dense model + LoRA (MiniLM's first 3 layers)
//   3. compressed MiniLM + LoRA (tuned from scratch on the compressed backbone)
//   4. compressed MiniLM + CPET (inherited LoRA and head + recovery modules + distillation)
// for every compression policy: W8A8, int4 g128 (GPTQ), 2:4 (Wanda), 50 % of heads and neurons pruned, and pruned +
// W8A8; plus ablations on int4: inheritance only, recovery only, recovery without distillation (SVD init only).
// One table: held-out accuracy and loss, backbone bytes, inference speed, training time.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include <cpet/compress/compress.hpp>
#include <cpet/io/io.hpp>
#include <cpet/nn/nn.hpp>
#include <cpet/strategy/classify.hpp>
#include <cpet/strategy/pipeline.hpp>

#include "fortunes_data.hpp"

using namespace cpet;
using Dense = config::bert<>;

namespace {

struct row {
    std::string paradigm, policy;
    strategy::eval_result eval;
    std::size_t bytes = 0;
    double fwd_tokens_per_s = 0;
    double train_s = 0;
};

struct setup {
    std::vector<strategy::labelled_batch> train, test;
    std::vector<nn::token_batch> calib;
    index_t labels = 0;
    strategy::tune_options tune;
    int cpet_epochs = 2;
    int recover_epochs = 1;
};

/// Inference tokens/s of m running task t over the held-out batches (one pass after a warm-up batch).
template <class C>
double forward_speed(const nn::Model<C>& m, const strategy::classifier_task& t, const setup& su) {
    nn::workspace ws;
    (void)m.hidden_states(su.test.front().tokens, ws, t.layers);
    const auto t0 = std::chrono::steady_clock::now();
    std::int64_t tokens = 0;
    for (const auto& b : su.test) {
        (void)m.hidden_states(b.tokens, ws, t.layers);
        for (index_t l : b.tokens.lengths) tokens += l;
    }
    return double(tokens) / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

template <class C>
row finish(std::string paradigm, std::string policy, const nn::Model<C>& m, const strategy::classifier_task& t,
           const setup& su, double train_s) {
    row r{std::move(paradigm), std::move(policy), strategy::evaluate(m, t, su.test), m.stack_bytes(),
          forward_speed(m, t, su), train_s};
    std::printf("  %-34s %-22s acc %5.1f %%  loss %.3f  (%.0f s)\n", r.paradigm.c_str(), r.policy.c_str(),
                100 * r.eval.accuracy, r.eval.loss, train_s);
    std::fflush(stdout);
    return r;
}

/// A LoRA task (r 16, α 32 on q and v, PEFT's BERT default) and a fresh head for model m.
template <class C>
strategy::classifier_task lora_task(const nn::Model<C>& m, index_t labels, std::uint64_t seed) {
    strategy::classifier_task t;
    for (std::size_t l = 0; l < m.stack().size(); ++l) {
        pet::lora::options o;
        o.rank = 16;
        o.alpha = 32;
        o.targets = pet::target_set{pet::target::q, pet::target::v};
        t.layers.emplace_back(pet::lora::make(m.stack().layer(l).pet_dims(), o, seed + l));
    }
    t.head = train::linear_head::make(m.d_model(), labels, seed + 99);
    return t;
}

template <class P>
void run_policy(const char* name, const nn::Model<Dense>& dense, const strategy::classifier_task& teacher,
                const setup& su, const nn::compress_options& co, bool ablations, std::vector<row>& rows) {
    std::printf("%s\n", name);
    const auto set = strategy::calibration_inputs(dense, su.calib);
    const auto cm = strategy::compress_model<P>(dense, set, co);
    std::printf("  compressed in %.1f s: %s (layer 0)\n", cm.seconds, cm.reports[0].str().c_str());
    // 3. compressed + LoRA from scratch (same budget as the teacher)
    {
        strategy::classifier_task t;
        for (std::size_t l = 0; l < cm.model.stack().size(); ++l)
            t.layers.push_back(strategy::fresh_like(teacher.layers[l], cm.model.stack().layer(l).pet_dims(), 500 + l));
        t.head = train::linear_head::make(dense.d_model(), su.labels, 599);
        const auto rep = strategy::tune(cm.model, t, su.train, su.tune);
        rows.push_back(finish("3 compressed + LoRA", name, cm.model, t, su, rep.seconds));
    }
    auto cpet_run = [&](const char* label, strategy::cpet_options o) {
        o.recover = su.tune;
        o.recover.epochs = su.recover_epochs;
        o.tune = su.tune;
        o.tune.epochs = su.cpet_epochs;
        strategy::cpet_report rep;
        const auto t = strategy::cpet(dense, teacher, cm, su.train, o, &rep);
        for (const auto& s : rep.steps) std::printf("    %s\n", s.c_str());
        rows.push_back(finish(label, name, cm.model, t, su, rep.seconds()));
    };
    cpet_run("4 compressed + CPET", {});
    if (!ablations) return;
    strategy::cpet_options inh;
    inh.recovery = strategy::recovery_kind::none;
    inh.distill = false;
    cpet_run("  ablation: inheritance only", inh);
    strategy::cpet_options rec;
    rec.inherit = false;
    cpet_run("  ablation: recovery only", rec);
    strategy::cpet_options svd;
    svd.recovery = strategy::recovery_kind::svd;
    svd.distill = false;
    cpet_run("  ablation: SVD recovery, no distil", svd);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s <all-MiniLM-L6-v2 dir> [--quick] [--epochs N] [--fortunes DIR] [--no-ablations]\n",
                     argv[0]);
        return 2;
    }
    const std::string dir = argv[1];
    bool quick = false, ablations = true;
    int epochs = 3;
    std::string fdir = fortunes::default_dir().string();
    for (int i = 2; i < argc; ++i) {
        if (!std::strcmp(argv[i], "--quick")) quick = true;
        else if (!std::strcmp(argv[i], "--no-ablations")) ablations = false;
        else if (!std::strcmp(argv[i], "--epochs") && i + 1 < argc) epochs = std::atoi(argv[++i]);
        else if (!std::strcmp(argv[i], "--fortunes") && i + 1 < argc) fdir = argv[++i];
    }
    try {
        const auto t0 = std::chrono::steady_clock::now();
        const auto tok = io::wordpiece_tokenizer::from_model_dir(dir);
        const auto dense = io::load_model<Dense>(dir);
        const std::vector<std::string> cats{"computers", "science", "politics", "startrek", "food", "law"};
        const auto data = fortunes::load(cats, quick ? 140 : 160, fdir);
        setup su;
        su.labels = index_t(cats.size());
        const index_t max_len = quick ? 32 : 64;
        su.train = fortunes::batches(data.train, tok, max_len, 32);
        su.test = fortunes::batches(data.test, tok, max_len, 64);
        for (std::size_t i = 0; i < std::min<std::size_t>(4, su.train.size()); ++i) su.calib.push_back(su.train[i * su.train.size() / 4].tokens);
        su.tune.epochs = quick ? 1 : epochs;
        su.tune.lr = 2e-3;
        su.tune.seed = 1;
        su.cpet_epochs = quick ? 1 : std::max(1, epochs - 1);
        su.recover_epochs = 1;
        std::printf("fortunes: %zu categories, %zu train / %zu held-out texts (max %ld tokens); MiniLM %zu layers, d %ld\n",
                    cats.size(), data.train.size(), data.test.size(), long(max_len), dense.stack().size(),
                    long(dense.d_model()));
        std::vector<row> rows;

        // 1. the teacher
        auto teacher = lora_task(dense, su.labels, 1);
        {
            const auto rep = strategy::tune(dense, teacher, su.train, su.tune);
            rows.push_back(finish("1 dense + LoRA (teacher)", "dense fp32", dense, teacher, su, rep.seconds));
        }
        // 2. a small dense model: the first 3 layers
        {
            std::vector<nn::TransformerLayer<Dense>> first;
            for (std::size_t l = 0; l < 3; ++l) first.push_back(dense.stack().layer(l));
            const nn::Model<Dense> small(dense.embeddings(), nn::Stack<Dense>(std::move(first)), {}, {}, 1e-12f,
                                         std::nullopt, false, std::nullopt);
            auto t = lora_task(small, su.labels, 2);
            const auto rep = strategy::tune(small, t, su.train, su.tune);
            rows.push_back(finish("2 small dense (3 layers) + LoRA", "dense fp32", small, t, su, rep.seconds));
        }
        nn::compress_options none, pruned;
        pruned.prune.head_ratio = 0.5;
        pruned.prune.neuron_ratio = 0.5;
        run_policy<compress::w8a8>("W8A8", dense, teacher, su, none, false, rows);
        run_policy<compress::int4_g128_gptq>("int4 g128 GPTQ", dense, teacher, su, none, ablations, rows);
        run_policy<compress::nm_sparse<2, 4, compress::sparsity_score::wanda>>("2:4 Wanda", dense, teacher, su, none,
                                                                                false, rows);
        run_policy<compress::dense>("pruned 50% heads+neurons", dense, teacher, su, pruned, false, rows);
        run_policy<compress::w8a8>("pruned 50% + W8A8", dense, teacher, su, pruned, false, rows);

        std::printf("\n| paradigm | policy | held-out acc | held-out loss | backbone MiB | fwd tokens/s | train s |\n");
        std::printf("| --- | --- | ---: | ---: | ---: | ---: | ---: |\n");
        for (const auto& r : rows)
            std::printf("| %s | %s | %.1f %% | %.3f | %.2f | %.0f | %.0f |\n", r.paradigm.c_str(), r.policy.c_str(),
                        100 * r.eval.accuracy, r.eval.loss, double(r.bytes) / 1048576.0, r.fwd_tokens_per_s, r.train_s);
        std::printf("\ntotal %.0f s\n", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    } catch (const std::exception& e) {
        std::fprintf(stderr, "cpet_pipeline: %s\n", e.what());
        return 1;
    }
    return 0;
}
