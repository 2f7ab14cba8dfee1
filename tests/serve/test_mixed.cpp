// Heterogeneous batches: each sequence names its task, the backbone runs once over the batch, and every sequence
// gets the output it gets alone with its task (≤ 1e-6 relative) on every ISA and several backbones; decode with
// sequences joining and leaving between steps equals the full recomputation of each sequence; bad input (a name
// list that does not match the sequences, an unknown task) is refused and changes no cache. (Tasks of every other
// PET method in a mixed batch: test_mixed_methods.cpp.)
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

namespace cpet_test_serve_mixed {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using testing::MatD;

namespace {

/// Low-rank tasks of different ranks, targets and methods.
template <class C>
std::vector<pet::task> low_rank_task(const Stack<C>& stack, int kind, unsigned seed) {
    std::vector<pet::task> layers(stack.size());
    for (std::size_t l = 0; l < stack.size(); ++l) {
        const auto d = stack.layer(l).pet_dims();
        const unsigned sd = seed + 17 * unsigned(l);
        if (kind == 0) {
            auto m = pet::lora::make(d, {.rank = 4, .alpha = 8, .targets = {pet::target::q, pet::target::v}}, sd);
            testing::randomize_up(m, d, sd + 1);
            layers[l].add(std::move(m));
        } else if (kind == 1) {
            auto m = pet::rslora::make(d, {.rank = 8, .alpha = 4, .targets = pet::target_set::attention() |
                                                                               pet::target_set{pet::target::down}}, sd);
            testing::randomize_up(m, d, sd + 2);
            layers[l].add(std::move(m));
        } else {
            auto r = pet::recovery::make(d, {.rank = 6}, sd);
            testing::randomize_up(r, d, sd + 3);
            auto m = pet::lora::make(d, {.rank = 2, .alpha = 2, .targets = {pet::target::v, pet::target::up}}, sd + 4);
            testing::randomize_up(m, d, sd + 5);
            layers[l].add(std::move(r));
            layers[l].add(std::move(m));
        }
    }
    return layers;
}

template <class C>
std::unique_ptr<serve::registry<C>> registry_with_tasks(std::shared_ptr<const Stack<C>> bb, index_t cache_rows = 0) {
    auto reg = std::make_unique<serve::registry<C>>(bb, cache_rows);
    reg->add("lora", low_rank_task(*bb, 0, 10));
    reg->add("rslora", low_rank_task(*bb, 1, 20));
    reg->add("cpet", low_rank_task(*bb, 2, 30));
    return reg;
}

template <class C>
void mixed_equals_alone(unsigned seed) {
    const auto s = testing::shape_for<C>();
    const auto owner = registry_with_tasks<C>(testing::backbone_for<C>(s, seed));
    const auto& reg = *owner;
    const std::vector<std::string_view> names{"lora", "lora", "rslora", "", "cpet", "rslora", "lora"};
    const std::vector<index_t> lengths{4, 1, 3, 2, 4, 1, 3};
    const index_t B = index_t(lengths.size()), S = 4;
    const auto x = testing::random_matrix(B * S, s.d_model, seed + 5);
    testing::for_each_isa([&](arch::isa) {
        nn::workspace ws;
        Matrix<float> y(B * S, s.d_model);
        const auto used = reg.forward_batch(names, x, lengths, y, ws);
        REQUIRE(used.size() == names.size());
        CHECK(used[0] == used[1]);  // one version per task, resolved once
        for (index_t b = 0; b < B; ++b) {
            CAPTURE(b);
            const auto want = testing::alone(reg, names[std::size_t(b)], x.view().middle_rows(b * S, S), lengths[std::size_t(b)]);
            const index_t n = lengths[std::size_t(b)];
            CHECK(testing::rel_error(y.view().middle_rows(b * S, n), testing::to_double(want.view().middle_rows(0, n))) <= 1e-6);
            for (index_t r = n; r < S; ++r)  // padding stays zero
                for (index_t c = 0; c < s.d_model; ++c) CHECK(y(b * S + r, c) == 0.f);
        }
    });
    // a batch of one task takes that task's own path and agrees too
    nn::workspace ws;
    Matrix<float> y1(2 * S, s.d_model), y2(2 * S, s.d_model);
    const std::vector<std::string_view> same{"cpet", "cpet"};
    const std::vector<index_t> two{4, 3};
    reg.forward_batch(same, x.view().middle_rows(0, 2 * S), two, y1, ws);
    const std::vector<std::string_view> mixed{"cpet", ""};
    reg.forward_batch(mixed, x.view().middle_rows(0, 2 * S), two, y2, ws);
    CHECK(testing::rel_error(y1.view().middle_rows(0, 4), testing::to_double(y2.view().middle_rows(0, 4))) <= 1e-6);
}

}  // namespace

TEST_CASE("a mixed batch gives every sequence the output it gets alone with its task") {
    mixed_equals_alone<config::bert<compress::dense>>(100);
    mixed_equals_alone<config::llama<compress::int8_per_channel>>(200);
    mixed_equals_alone<config::llama<compress::nm_sparse<2, 4>>>(300);
}

TEST_CASE("decode with sequences of different tasks joining and leaving equals the full recomputation") {
    using C = config::llama<compress::int8_per_channel>;
    const auto s = testing::llama_shape();
    const auto owner = registry_with_tasks<C>(testing::backbone_for<C>(s, 400), 8);
    const auto& reg = *owner;
    const index_t slots = 3, cap = 8;
    auto caches = reg.backbone().make_cache(slots, cap);
    struct sequence {
        std::string name;
        Matrix<float> tokens;  // all tokens so far [n, d]
    };
    std::vector<sequence> seqs(4);
    seqs[0].name = "lora", seqs[1].name = "rslora", seqs[2].name = "cpet", seqs[3].name = "";
    std::vector<int> slot_of{0, 1, -1};  // slot -> sequence (-1: idle)
    unsigned seed = 500;
    nn::workspace ws;
    auto step = [&](std::vector<index_t> new_len) {
        const index_t S = *std::max_element(new_len.begin(), new_len.end());
        Matrix<float> x(slots * S, s.d_model);
        std::vector<std::string_view> names(slots);
        for (index_t b = 0; b < slots; ++b) {
            const int q = slot_of[std::size_t(b)];
            if (q < 0) continue;
            names[std::size_t(b)] = seqs[std::size_t(q)].name;
            const auto fresh = testing::random_matrix(new_len[std::size_t(b)], s.d_model, seed++);
            auto& all = seqs[std::size_t(q)].tokens;
            Matrix<float> grown(all.rows() + fresh.rows(), s.d_model);
            for (index_t r = 0; r < all.rows(); ++r)
                for (index_t c = 0; c < s.d_model; ++c) grown(r, c) = all(r, c);
            for (index_t r = 0; r < fresh.rows(); ++r)
                for (index_t c = 0; c < s.d_model; ++c) grown(all.rows() + r, c) = x(b * S + r, c) = fresh(r, c);
            all = std::move(grown);
        }
        Matrix<float> y(slots * S, s.d_model);
        reg.decode_batch(names, x, new_len, y, caches, ws);
        for (index_t b = 0; b < slots; ++b) {
            const int q = slot_of[std::size_t(b)];
            if (q < 0 || new_len[std::size_t(b)] == 0) continue;
            CAPTURE(q);
            const auto& all = seqs[std::size_t(q)].tokens;
            const auto full = testing::alone(reg, seqs[std::size_t(q)].name, all, all.rows());
            const index_t n = new_len[std::size_t(b)];
            CHECK(testing::rel_error(y.view().middle_rows(b * S, n), testing::to_double(full.view().middle_rows(all.rows() - n, n))) <=
                  1e-5);
        }
    };
    step({3, 2, 0});   // prefill two sequences, slot 2 idle
    step({1, 1, 0});
    slot_of[2] = 2;    // sequence 2 joins in the idle slot (its prefill beside the others' steps)
    step({1, 1, 2});
    caches[0].truncate(0, 0);  // sequence 0 leaves, sequence 3 (no task) takes its slot
    for (auto& c : caches) c.truncate(0, 0);
    slot_of[0] = 3;
    step({2, 1, 1});
    step({1, 0, 1});   // sequence 1 pauses a step
    CHECK(caches[0].length(1) == 5);  // 2 + 1 + 1 + 1 + 0
    CHECK(caches[1].length(2) == 4);  // 2 + 1 + 1
    CHECK(caches[1].length(0) == 3);  // sequence 3: 2 + 1
}

TEST_CASE("mixed-batch bad input is refused with a clear error and changes no cache") {
    using C = config::llama<compress::int8_per_channel>;
    const auto s = testing::llama_shape();
    auto owner = registry_with_tasks<C>(testing::backbone_for<C>(s, 600), 8);
    auto& reg = *owner;
    const auto x = testing::random_matrix(4, s.d_model, 601);
    const std::vector<index_t> lengths{2, 2};
    Matrix<float> y(4, s.d_model);
    nn::workspace ws;
    auto caches = reg.backbone().make_cache(2, 8);
    const std::vector<index_t> too_long{2, 9};
    const auto x9 = testing::random_matrix(18, s.d_model, 602);
    Matrix<float> y9(18, s.d_model);
    const std::vector<std::string_view> two{"lora", "cpet"};
    CHECK_THROWS_WITH_AS(reg.decode_batch(two, x9, too_long, y9, caches, ws),
                         doctest::Contains("exceed the kv_cache capacity of 8"), shape_error);
    CHECK(caches[0].length(0) == 0);
    CHECK(caches[1].length(1) == 0);
    const std::vector<std::string_view> one{"lora"};
    CHECK_THROWS_WITH_AS(reg.forward_batch(one, x, lengths, y, ws), doctest::Contains("1 task names for 2 sequences"),
                         shape_error);
    const std::vector<std::string_view> unknown{"lora", "nope"};
    CHECK_THROWS_WITH_AS(reg.forward_batch(unknown, x, lengths, y, ws), doctest::Contains("unknown task \"nope\""),
                         format_error);
}

}  // namespace cpet_test_serve_mixed
