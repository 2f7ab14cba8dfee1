// tests/strategy/test_cpet_fortunes.cpp — the CPET method in small, on the real model and real data: MiniLM's first
// two layers quantised to int4 (g128, GPTQ), three fortunes categories. CPET (the dense teacher's inherited LoRA and
// head + GELU recovery modules distilled from the teacher) must reach a lower held-out loss than the same LoRA
// tuned from scratch on the compressed backbone with the same number of task-tuning steps.
//
// Needs the checkpoint (cmake/fetch_minilm.sh; CPET_MINILM_DIR) and Debian's fortunes corpus; without either the case
// says "skipped: ..." and passes.
#include <chrono>
#include <filesystem>
#include <string>
#include <vector>

#include "../../examples/fortunes_data.hpp"
#include "cpet/compress/compress.hpp"
#include "cpet/io/io.hpp"
#include "cpet/strategy/pipeline.hpp"
#include "io/io_testing.hpp"
#include "support/testing.hpp"

namespace cpet_test_strategy_cpet_fortunes {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
namespace fs = std::filesystem;

TEST_CASE("CPET beats plain LoRA on an int4 MiniLM (2 layers) on held-out fortunes topics") {
    std::string why;
    const fs::path dir = testing::minilm_dir(why);
    if (dir.empty()) {
        MESSAGE("skipped: " << why);
        return;
    }
    const std::vector<std::string> cats{"computers", "startrek", "food"};
    fortunes::dataset data;
    try {
        data = fortunes::load(cats, 100, fortunes::default_dir(), 100);
    } catch (const std::exception& e) {
        MESSAGE("skipped: " << e.what());
        return;
    }
    using C = config::bert<>;
    const auto t0 = std::chrono::steady_clock::now();
    auto secs = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
    const auto tok = io::wordpiece_tokenizer::from_model_dir(dir);
    const auto full = io::load_model<C>(dir);
    std::vector<nn::TransformerLayer<C>> first{full.stack().layer(0), full.stack().layer(1)};
    const nn::Model<C> dense(full.embeddings(), nn::Stack<C>(std::move(first)), {}, {}, 1e-12f, std::nullopt, false,
                             std::nullopt);
    const auto train = fortunes::batches(data.train, tok, 20, 16);
    const auto test = fortunes::batches(data.test, tok, 20, 64);

    strategy::classifier_task teacher;
    for (std::size_t l = 0; l < dense.stack().size(); ++l) {
        pet::lora::options o;
        o.rank = 8;
        o.alpha = 16;
        teacher.layers.emplace_back(pet::lora::make(dense.stack().layer(l).pet_dims(), o, l));
    }
    teacher.head = train::linear_head::make(dense.d_model(), index_t(cats.size()), 3);
    strategy::tune_options to;
    to.epochs = 2;
    to.lr = 3e-3;
    to.seed = 5;
    MESSAGE("loaded at " << secs() << " s");
    strategy::tune(dense, teacher, train, to);
    MESSAGE("teacher tuned at " << secs() << " s");
    const auto teacher_eval = strategy::evaluate(dense, teacher, test);

    const std::vector<nn::token_batch> calib{train.front().tokens, train.back().tokens};
    const auto cm = strategy::compress_model<compress::int4_g128_gptq>(dense, strategy::calibration_inputs(dense, calib));
    MESSAGE("compressed at " << secs() << " s");
    REQUIRE(cm.model.stack_bytes() * 5 < dense.stack_bytes());

    // plain PET on the compressed backbone: fresh LoRA and head
    strategy::classifier_task plain;
    for (std::size_t l = 0; l < cm.model.stack().size(); ++l)
        plain.layers.push_back(strategy::fresh_like(teacher.layers[l], cm.model.stack().layer(l).pet_dims(), 40 + l));
    plain.head = train::linear_head::make(dense.d_model(), index_t(cats.size()), 41);
    strategy::tune(cm.model, plain, train, to);
    const auto plain_eval = strategy::evaluate(cm.model, plain, test);
    MESSAGE("plain tuned at " << secs() << " s");

    strategy::cpet_options co;
    co.recovery_rank = 8;
    co.recover = to;
    co.recover.epochs = 1;
    co.tune = to;
    co.tune.epochs = 1;
    strategy::cpet_report rep;
    const auto student = strategy::cpet(dense, teacher, cm, train, co, &rep);
    const auto cpet_eval = strategy::evaluate(cm.model, student, test);
    REQUIRE(rep.recover.has_value());
    CHECK(rep.recover->summary.loss.total() < 1.0);  // the distillation MSE went somewhere finite and small
    MESSAGE("held-out loss / accuracy: teacher " << teacher_eval.loss << " / " << teacher_eval.accuracy << ", plain LoRA "
                                                 << plain_eval.loss << " / " << plain_eval.accuracy << ", CPET "
                                                 << cpet_eval.loss << " / " << cpet_eval.accuracy);
    CHECK(cpet_eval.loss < plain_eval.loss);
    CHECK(cpet_eval.examples == index_t(data.test.size()));
}

}  // namespace cpet_test_strategy_cpet_fortunes
