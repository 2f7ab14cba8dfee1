// Every PET method of the library, and stacks of them, in one mixed batch: each sequence gets the output it gets
// alone with its task (≤ 1e-6 relative) on every ISA, on the compression policies the mixed tests use (dense BERT,
// int8 and 2:4 LLaMA), prefill and decode (sequences of tasks with prefixes and prompt tokens of different lengths
// joining and leaving; each step equals the same sequence decoded alone, and the full recomputation); tasks that do
// not fit are refused when registered or bound, with a sentence naming the problem, and change nothing.
#include <algorithm>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "cpet/pet/pet.hpp"
#include "cpet/pet/task.hpp"
#include "cpet/serve/registry.hpp"
#include "pet/pet_references.hpp"
#include "serve/serve_testing.hpp"

namespace cpet_test_serve_mixed_methods {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;

namespace {

constexpr int kinds = 16;
const char* const kind_names[kinds] = {"lora",         "rslora",  "recovery", "recovery_linear", "adapter",
                                       "parallel",     "scaled",  "prefix",   "p_tuning_v2",     "prompt",
                                       "ia3",          "bitfit",  "mam",      "cpet",            "prompt+lora+bitfit",
                                       "ia3+adapter+lora+p2"};

/// Task `kind` with one pet::task per layer, every module with a visible effect.
template <class C>
std::vector<pet::task> make_task(const Stack<C>& stack, int kind, unsigned seed) {
    std::vector<pet::task> layers(stack.size());
    for (std::size_t l = 0; l < stack.size(); ++l) {
        const auto d = stack.layer(l).pet_dims();
        const unsigned sd = seed + 31 * unsigned(l);
        auto& t = layers[l];
        auto lora = [&](index_t r, pet::target_set ts) {
            auto m = pet::lora::make(d, {.rank = r, .alpha = float(2 * r), .targets = ts}, sd + 1);
            testing::randomize_up(m, d, sd + 2);
            return m;
        };
        auto recovery = [&] {
            auto m = pet::recovery::make(d, {.rank = 6}, sd + 3);
            testing::randomize_up(m, d, sd + 4);
            return m;
        };
        auto prompt = [&](index_t p) {  // tokens in layer 0 only (the stack puts them before each sequence)
            return l == 0 ? pet::prompt_tuning::make(d, {.length = p}, sd + 5) : pet::prompt_tuning::modules{};
        };
        switch (kind) {
            case 0: t.add(lora(4, {pet::target::q, pet::target::v})); break;
            case 1: {
                auto m = pet::rslora::make(d, {.rank = 8, .alpha = 4, .targets = pet::target_set::attention() |
                                                                                   pet::target_set{pet::target::down}}, sd);
                testing::randomize_up(m, d, sd + 6);
                t.add(std::move(m));
                break;
            }
            case 2: t.add(recovery()); break;
            case 3: {
                auto m = pet::recovery_linear::make(d, {.rank = 3, .targets = {pet::target::o, pet::target::up}}, sd);
                testing::randomize_up(m, d, sd + 7);
                t.add(std::move(m));
                break;
            }
            case 4: t.add(testing::random_adapter<pet::adapter>(d, {.bottleneck = 4}, sd)); break;
            case 5: t.add(testing::random_adapter<pet::parallel_adapter>(d, {.bottleneck = 6, .ffn = false}, sd)); break;
            case 6: t.add(testing::random_adapter<pet::scaled_parallel_adapter>(d, {.bottleneck = 4, .scale = 2}, sd)); break;
            case 7: t.add(pet::prefix_tuning::make(d, {.length = 2}, sd)); break;
            case 8: t.add(pet::p_tuning_v2::make(d, {.length = 3}, sd)); break;
            case 9: t.add(prompt(3)); break;
            case 10: t.add(testing::random_ia3(d, {pet::target::q, pet::target::k, pet::target::v, pet::target::down}, sd)); break;
            case 11: t.add(testing::random_bitfit(d, sd)); break;
            case 12:  // MAM: prefix + scaled parallel adapter
                t.add(pet::prefix_tuning::make(d, {.length = 4}, sd));
                t.add(testing::random_adapter<pet::scaled_parallel_adapter>(d, {.bottleneck = 4}, sd + 8));
                break;
            case 13:  // CPET: recovery + LoRA
                t.add(recovery());
                t.add(lora(2, {pet::target::v, pet::target::up, pet::target::down}));
                break;
            case 14:
                t.add(prompt(2));
                t.add(lora(3, {pet::target::q, pet::target::o}));
                t.add(testing::random_bitfit(d, sd + 9));
                break;
            default:
                t.add(testing::random_ia3(d, {pet::target::v, pet::target::down}, sd + 10));
                t.add(testing::random_adapter<pet::adapter>(d, {.bottleneck = 3, .attention = false}, sd + 11));
                t.add(lora(2, {pet::target::k, d.gated ? pet::target::gate : pet::target::up}));
                t.add(pet::p_tuning_v2::make(d, {.length = 1}, sd + 12));
        }
    }
    return layers;
}

template <class C>
std::unique_ptr<serve::registry<C>> registry_of_every_kind(std::shared_ptr<const Stack<C>> bb, index_t cache_rows = 0) {
    auto reg = std::make_unique<serve::registry<C>>(bb, cache_rows);
    for (int k = 0; k < kinds; ++k) reg->add(kind_names[k], make_task(*bb, k, 1000u + 100u * unsigned(k)));
    return reg;
}

/// The sequences' tasks: every kind, some twice and not next to each other, and one sequence with none.
std::vector<std::string_view> batch_names() {
    std::vector<std::string_view> n;
    for (int k = 0; k < kinds; ++k) n.push_back(kind_names[k]);
    n.insert(n.begin() + 3, "");
    n.insert(n.begin() + 7, "prompt");
    n.push_back("mam");
    n.push_back("mam");
    n.push_back("lora");
    return n;
}

template <class C>
void every_method_mixed_equals_alone(unsigned seed) {
    const auto s = testing::shape_for<C>();
    const auto owner = registry_of_every_kind<C>(testing::backbone_for<C>(s, seed));
    const auto& reg = *owner;
    const auto names = batch_names();
    const index_t B = index_t(names.size()), S = 4;
    std::vector<index_t> lengths;
    for (index_t b = 0; b < B; ++b) lengths.push_back(1 + (b * 7 + 2) % S);
    const auto x = testing::random_matrix(B * S, s.d_model, seed + 5);
    testing::for_each_isa([&](arch::isa) {
        nn::workspace ws;
        Matrix<float> y(B * S, s.d_model);
        const auto used = reg.forward_batch(names, x, lengths, y, ws);
        REQUIRE(used.size() == names.size());
        for (index_t b = 0; b < B; ++b) {
            const std::string task(names[std::size_t(b)]);
            CAPTURE(task);
            const index_t n = lengths[std::size_t(b)];
            const auto want = testing::alone(reg, task, x.view().middle_rows(b * S, S), n);
            CHECK(testing::rel_error(y.view().middle_rows(b * S, n), testing::to_double(want.view().middle_rows(0, n))) <= 1e-6);
            for (index_t r = n; r < S; ++r)  // padding stays zero
                for (index_t c = 0; c < s.d_model; ++c) REQUIRE(y(b * S + r, c) == 0.f);
        }
        // the batch without its one sequence of no task differs from the bare backbone where a task acts
        const auto bare = testing::alone(reg, "", x.view().middle_rows(0, S), lengths[0]);
        CHECK(testing::rel_error(y.view().middle_rows(0, lengths[0]), testing::to_double(bare.view().middle_rows(0, lengths[0]))) > 1e-3);
    });
}

}  // namespace

TEST_CASE("every PET method and stacks of them in one mixed batch: each sequence gets its output alone") {
    every_method_mixed_equals_alone<config::bert<compress::dense>>(100);
    every_method_mixed_equals_alone<config::llama<compress::int8_per_channel>>(200);
    every_method_mixed_equals_alone<config::llama<compress::nm_sparse<2, 4>>>(300);
}

namespace {

/// Decode steps of sequences of every kind joining and leaving slots; each sequence's outputs so far equal the
/// same sequence decoded alone in its own caches (≤ 1e-6; one step's single row alone would be a noisier measure:
/// on this data the single-task decode and full forward already differ by up to 9e-7 on one row), and each step
/// its full recomputation (≤ 1e-5).
template <class C>
void every_method_decode(unsigned seed) {
    const auto s = testing::llama_shape();
    const index_t cap = 16;
    const auto owner = registry_of_every_kind<C>(testing::backbone_for<C>(s, seed), cap);
    const auto& reg = *owner;
    const index_t slots = 6;
    auto caches = reg.backbone().make_cache(slots, cap);
    struct sequence {
        std::string name;
        Matrix<float> tokens;               // every token so far [n, d]
        std::vector<nn::kv_cache> own;      // its caches when decoded alone
        Matrix<float> got, want;            // its outputs so far: in the mixed batch, alone
    };
    auto append = [&](Matrix<float>& all, ConstMatrixView<float> rows) {
        Matrix<float> grown(all.rows() + rows.rows(), s.d_model);
        for (index_t r = 0; r < all.rows(); ++r)
            for (index_t c = 0; c < s.d_model; ++c) grown(r, c) = all(r, c);
        for (index_t r = 0; r < rows.rows(); ++r)
            for (index_t c = 0; c < s.d_model; ++c) grown(all.rows() + r, c) = rows(r, c);
        all = std::move(grown);
    };
    std::vector<sequence> seqs;
    for (int k = 0; k <= kinds; ++k)
        seqs.push_back({k < kinds ? kind_names[k] : "", Matrix<float>(0, s.d_model), reg.backbone().make_cache(1, cap),
                        Matrix<float>(0, s.d_model), Matrix<float>(0, s.d_model)});
    std::vector<int> slot_of{9, 12, 0, 7, -1, 14};  // prompt, mam, lora, prefix, idle, prompt+lora+bitfit
    unsigned data = seed + 50;
    int steps = 0;
    auto step = [&](std::vector<index_t> new_len) {
        const index_t S = std::max<index_t>(1, *std::max_element(new_len.begin(), new_len.end()));
        Matrix<float> x(slots * S, s.d_model);
        std::vector<std::string_view> names(slots);
        for (index_t b = 0; b < slots; ++b) {
            const int q = slot_of[std::size_t(b)];
            if (q < 0) continue;
            auto& sq = seqs[std::size_t(q)];
            names[std::size_t(b)] = sq.name;
            const auto fresh = testing::random_matrix(new_len[std::size_t(b)], s.d_model, data++);
            Matrix<float> grown(sq.tokens.rows() + fresh.rows(), s.d_model);
            for (index_t r = 0; r < sq.tokens.rows(); ++r)
                for (index_t c = 0; c < s.d_model; ++c) grown(r, c) = sq.tokens(r, c);
            for (index_t r = 0; r < fresh.rows(); ++r)
                for (index_t c = 0; c < s.d_model; ++c) grown(sq.tokens.rows() + r, c) = x(b * S + r, c) = fresh(r, c);
            sq.tokens = std::move(grown);
        }
        nn::workspace ws;
        Matrix<float> y(slots * S, s.d_model);
        reg.decode_batch(names, x, new_len, y, caches, ws);
        ++steps;
        for (index_t b = 0; b < slots; ++b) {
            const int q = slot_of[std::size_t(b)];
            const index_t n = new_len[std::size_t(b)];
            if (q < 0 || n == 0) continue;
            auto& sq = seqs[std::size_t(q)];
            CAPTURE(steps);
            CAPTURE(sq.name);
            // the same tokens through the sequence's own caches, alone
            Matrix<float> ya(n, s.d_model);
            const std::vector<std::string_view> one{sq.name};
            const std::vector<index_t> len{n};
            reg.decode_batch(one, x.view().middle_rows(b * S, n), len, ya, sq.own, ws);
            append(sq.got, y.view().middle_rows(b * S, n));
            append(sq.want, ya);
            CHECK(testing::rel_error(sq.got, testing::to_double(sq.want)) <= 1e-6);  // its output so far
            const auto full = testing::alone(reg, sq.name, sq.tokens, sq.tokens.rows());
            CHECK(testing::rel_error(y.view().middle_rows(b * S, n),
                                     testing::to_double(full.view().middle_rows(sq.tokens.rows() - n, n))) <= 1e-5);
            for (std::size_t l = 0; l < caches.size(); ++l) REQUIRE(caches[l].length(b) == sq.own[l].length(0));
        }
    };
    auto leave = [&](index_t b, int next) {
        for (auto& c : caches) c.truncate(b, 0);
        slot_of[std::size_t(b)] = next;
    };
    step({3, 2, 1, 2, 0, 1});  // prefill: prompts of 3 and 2 tokens, prefixes of 4 and 2 rows
    step({1, 1, 1, 1, 0, 1});
    slot_of[4] = 15;           // ia3+adapter+lora+p2 joins the idle slot beside the others' steps
    step({1, 1, 2, 1, 3, 1});
    leave(0, 8);               // prompt leaves, p_tuning_v2 takes its slot
    leave(2, 16);              // lora leaves, a sequence of no task takes its slot
    step({2, 1, 1, 0, 1, 1});  // the prefix sequence pauses a step
    leave(1, 11);              // mam leaves for bitfit
    step({1, 1, 1, 1, 1, 2});
    step({1, 0, 1, 1, 1, 1});
    CHECK(caches[0].prefix_length(0) == 3);  // p_tuning_v2's prefix at the front of its slot
    CHECK(caches[0].prefix_length(4) == 1);
    CHECK(caches[0].prefix_length(1) == 0);  // bitfit: none
}

}  // namespace

TEST_CASE("decode: sequences of every PET method join and leave a mixed batch; each step equals decoding alone") {
    every_method_decode<config::llama<compress::int8_per_channel>>(400);
    every_method_decode<config::llama<compress::nm_sparse<2, 4>>>(500);
}

TEST_CASE("a task that does not fit is refused when registered or bound, naming the problem, and changes nothing") {
    using C = config::llama<compress::int8_per_channel>;
    const auto s = testing::llama_shape();
    auto owner = registry_of_every_kind<C>(testing::backbone_for<C>(s, 600), 8);
    auto& reg = *owner;
    const auto d = reg.backbone().layer(0).pet_dims();
    auto wide = d;  // a layer twice as wide
    wide.d_model *= 2, wide.q_dim *= 2, wide.kv_dim *= 2, wide.d_ff *= 2;
    auto two = [](auto m0, auto m1) {
        std::vector<pet::task> t(2);
        t[0].add(std::move(m0));
        t[1].add(std::move(m1));
        return t;
    };
    const std::size_t before = reg.size();
    CHECK_THROWS_WITH_AS(reg.add("wide_adapter", two(testing::random_adapter<pet::adapter>(wide, {.bottleneck = 4}, 1),
                                                     testing::random_adapter<pet::adapter>(d, {.bottleneck = 4}, 2))),
                         doctest::Contains("adapter (attention) expects W_down [r, 96]"), shape_error);
    CHECK_THROWS_WITH_AS(reg.add("wide_prefix", two(pet::prefix_tuning::make(d, {.length = 2}, 1),
                                                    pet::prefix_tuning::make(wide, {.length = 2}, 2))),
                         doctest::Contains("prefix_tuning expects k and v [L, 48]"), shape_error);
    CHECK_THROWS_WITH_AS(reg.add("late_prompt", two(pet::prompt_tuning::modules{},
                                                    pet::prompt_tuning::make(d, {.length = 2}, 1))),
                         doctest::Contains("virtual tokens (PET input hook, prompt tuning) where none can be applied"),
                         shape_error);
    CHECK_THROWS_WITH_AS(reg.add("long_prefix", two(pet::prefix_tuning::make(d, {.length = 8}, 1),
                                                    pet::prefix_tuning::make(d, {.length = 1}, 2))),
                         doctest::Contains("puts 8 prefix rows in layer 0's kv_cache, which holds 8 rows"), shape_error);
    CHECK(reg.size() == before);

    // bound by hand (no registry): a misfit task in a mixed batch is refused before anything runs
    const auto x = testing::random_matrix(2 * 2, s.d_model, 601);
    const std::vector<index_t> lengths{2, 2};
    Matrix<float> y(4, s.d_model);
    nn::workspace ws;
    pet::task good_t, misfit_t;
    good_t.add(pet::lora::make(d, {.rank = 2}, 3));
    misfit_t.add(testing::random_ia3(wide, {pet::target::k}, 4));
    const serve::task_layer good(good_t), misfit(misfit_t), empty;
    std::vector<serve::mixed_batch> layers;
    for (std::size_t l = 0; l < 2; ++l) {
        const std::vector<const serve::task_layer*> per_seq{&good, l == 0 ? &misfit : &empty};
        layers.emplace_back(per_seq);
    }
    CHECK_THROWS_WITH_AS(reg.backbone().forward(x, lengths, y, ws, std::span<const serve::mixed_batch>(layers)),
                         doctest::Contains("ia3 vector of k has 96 values, this layer needs 48"), shape_error);

    // a slot keeps the task it started with: one of another prefix length is refused, no cache changes
    auto caches = reg.backbone().make_cache(2, 8);
    const std::vector<std::string_view> first{"prefix", "lora"};
    reg.decode_batch(first, x, lengths, y, caches, ws);
    const std::vector<std::string_view> swapped{"p_tuning_v2", "lora"};
    CHECK_THROWS_WITH_AS(reg.decode_batch(swapped, x, lengths, y, caches, ws),
                         doctest::Contains("kv_cache sequence 0 holds a prefix of 2 rows, the task's prefix has 3"),
                         shape_error);
    CHECK(caches[0].length(0) == 4);
    CHECK(caches[1].length(1) == 2);
}

}  // namespace cpet_test_serve_mixed_methods
