// Tasks whose low-rank factors are stored in bf16 or int8 with per-row scales (serve::factor_storage): the bytes
// shrink 2x / ~4x; the kernels read the codes as stored, so a compact task gives exactly what the same task gives
// with the decoded factors in fp32 (≤ 1e-6), alone and in mixed batches with fp32 and other tasks, prefill and
// decode, on dense BERT, int8 and 2:4 LLaMA; and what the rounding changes against the fp32 factors is measured
// and reported (MESSAGE lines), within bounds that say what each storage costs. (Measured here, 2 LLaMA layers
// of d 96, 16 tokens: bf16 changes a task's effect on the output by 0.08-0.3 %, int8 by 0.2-0.6 %.)
#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "cpet/pet/pet.hpp"
#include "cpet/pet/task.hpp"
#include "cpet/serve/registry.hpp"
#include "pet/pet_references.hpp"
#include "serve/serve_testing.hpp"

namespace cpet_test_serve_compact {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using serve::factor_storage;
using testing::MatD;

namespace {

constexpr int kinds = 5;
const char* const kind_names[kinds] = {"lora", "cpet", "recovery_linear+bitfit", "rslora+ia3", "mam"};

template <class C>
std::vector<pet::task> make_task(const Stack<C>& stack, int kind, unsigned seed) {
    std::vector<pet::task> layers(stack.size());
    for (std::size_t l = 0; l < stack.size(); ++l) {
        const auto d = stack.layer(l).pet_dims();
        const unsigned sd = seed + 31 * unsigned(l);
        auto& t = layers[l];
        auto randomized = [&](auto m, unsigned s2) {
            testing::randomize_up(m, d, s2);
            return m;
        };
        switch (kind) {
            case 0: t.add(randomized(pet::lora::make(d, {.rank = 8, .alpha = 16}, sd), sd + 1)); break;
            case 1:
                t.add(randomized(pet::recovery::make(d, {.rank = 6}, sd), sd + 2));
                t.add(randomized(pet::lora::make(d, {.rank = 4, .alpha = 8, .targets = {pet::target::v, pet::target::up}}, sd + 3), sd + 4));
                break;
            case 2:
                t.add(randomized(pet::recovery_linear::make(d, {.rank = 3, .targets = {pet::target::o, pet::target::down}}, sd), sd + 5));
                t.add(testing::random_bitfit(d, sd + 6));
                break;
            case 3:
                t.add(randomized(pet::rslora::make(d, {.rank = 8, .alpha = 4, .targets = pet::target_set::attention()}, sd), sd + 7));
                t.add(testing::random_ia3(d, {pet::target::k, pet::target::down}, sd + 8));
                break;
            default:
                t.add(pet::prefix_tuning::make(d, {.length = 3}, sd));
                t.add(testing::random_adapter<pet::scaled_parallel_adapter>(d, {.bottleneck = 4, .scale = 2}, sd + 9));
        }
    }
    return layers;
}

/// `t` with every LoRA / recovery factor replaced by what storage `s` keeps of it, decoded (the fp32 task the
/// compact one must equal).
std::vector<pet::task> decoded(std::vector<pet::task> layers, factor_storage s) {
    for (auto& t : layers)
        for (std::size_t i = 0; i < t.size(); ++i)
            t.visit_method(i, [&](auto& m) {
                using M = std::decay_t<decltype(m)>;
                if constexpr (serve::detail::compactable<M>) {
                    for (int j = 0; j < pet::target_count; ++j) {
                        const auto tg = pet::target(j);
                        if (!m.rank(tg)) continue;
                        const serve::compact_matrix a(m.A(tg), s), b(m.B(tg), s);
                        Matrix<float> ad(a.rows(), a.cols()), bd(b.rows(), b.cols());
                        a.decode(ad);
                        b.decode(bd);
                        m.set(tg, ad, bd);
                    }
                }
            });
    return layers;
}

std::string name_of(int k, factor_storage s, bool dec = false) {
    return std::string(kind_names[k]) + "@" + serve::factor_storage_name(s) + (dec ? "_decoded" : "");
}

/// Every kind in fp32, bf16, int8, and the decoded twins of the compact ones.
template <class C>
std::unique_ptr<serve::registry<C>> registry_of(std::shared_ptr<const Stack<C>> bb, index_t cache_rows = 0) {
    auto reg = std::make_unique<serve::registry<C>>(bb, cache_rows);
    for (int k = 0; k < kinds; ++k) {
        const auto t = make_task(*bb, k, 100u * unsigned(k) + 7);
        for (auto s : {factor_storage::fp32, factor_storage::bf16, factor_storage::int8}) {
            reg->add(name_of(k, s), t, s);
            if (s != factor_storage::fp32) reg->add(name_of(k, s, true), decoded(t, s));
        }
    }
    return reg;
}

template <class C>
void compact_equals_decoded(unsigned seed) {
    const auto s = testing::shape_for<C>();
    const auto owner = registry_of<C>(testing::backbone_for<C>(s, seed));
    const auto& reg = *owner;
    std::vector<std::string> names;
    for (auto st : {factor_storage::bf16, factor_storage::int8, factor_storage::fp32})
        for (int k = 0; k < kinds; ++k) names.push_back(name_of(k, st));
    names.insert(names.begin() + 4, "");
    std::vector<std::string_view> views(names.begin(), names.end());
    const index_t B = index_t(names.size()), S = 3;
    std::vector<index_t> lengths;
    for (index_t b = 0; b < B; ++b) lengths.push_back(1 + b % S);
    const auto x = testing::random_matrix(B * S, s.d_model, seed + 3);
    testing::for_each_isa([&](arch::isa) {
        nn::workspace ws;
        Matrix<float> y(B * S, s.d_model);
        reg.forward_batch(views, x, lengths, y, ws);
        for (index_t b = 0; b < B; ++b) {
            const std::string& n = names[std::size_t(b)];
            CAPTURE(n);
            const index_t len = lengths[std::size_t(b)];
            const auto xb = x.view().middle_rows(b * S, S);
            const auto got = y.view().middle_rows(b * S, len);
            const auto a = testing::alone(reg, n, xb, len);  // alone with the compact task
            CHECK(testing::rel_error(got, testing::to_double(a.view().middle_rows(0, len))) <= 1e-6);
            if (n.find("@bf16") != std::string::npos || n.find("@int8") != std::string::npos) {
                const auto d = testing::alone(reg, n + "_decoded", xb, len);  // the fp32 task of the decoded factors
                CHECK(testing::rel_error(got, testing::to_double(d.view().middle_rows(0, len))) <= 1e-6);
            }
        }
    });
}

}  // namespace

TEST_CASE("a compact task equals its decoded fp32 twin, alone and in a mixed batch") {
    compact_equals_decoded<config::bert<compress::dense>>(10);
    compact_equals_decoded<config::llama<compress::int8_per_channel>>(20);
    compact_equals_decoded<config::llama<compress::nm_sparse<2, 4>>>(30);
}

TEST_CASE("bf16 halves and int8 quarters a task's low-rank bytes; the output change against fp32 is reported") {
    using C = config::llama<compress::int8_per_channel>;
    const auto s = testing::llama_shape();
    const auto owner = registry_of<C>(testing::backbone_for<C>(s, 40));
    const auto& reg = *owner;
    const auto lora32 = reg.get(name_of(0, factor_storage::fp32))->bytes;
    const auto lora16 = reg.get(name_of(0, factor_storage::bf16))->bytes;
    const auto lora8 = reg.get(name_of(0, factor_storage::int8))->bytes;
    CHECK(lora16 * 2 == lora32);
    CHECK(3 * lora8 <= lora32);  // codes + one fp32 scale per row (B [out, r] has r = 8 codes a row here)
    CHECK(double(lora8) >= 0.25 * double(lora32));
    // MAM has no low-rank factors: nothing to compact
    CHECK(reg.get(name_of(4, factor_storage::int8))->bytes == reg.get(name_of(4, factor_storage::fp32))->bytes);
    MESSAGE("LoRA r8 (q, v) on 2 layers of d " << s.d_model << ": fp32 " << lora32 << " B, bf16 " << lora16 << " B, int8 "
                                               << lora8 << " B");

    const index_t S = 16;
    const std::vector<index_t> len{S};
    const auto x = testing::random_matrix(S, s.d_model, 41);
    const auto bare = testing::alone(reg, "", x, S);
    for (int k = 0; k < 4; ++k) {
        const auto y32 = testing::alone(reg, name_of(k, factor_storage::fp32), x, S);
        const MatD term32 = testing::to_double(y32) - testing::to_double(bare);  // what the task changes
        for (auto st : {factor_storage::bf16, factor_storage::int8}) {
            const auto yc = testing::alone(reg, name_of(k, st), x, S);
            const double out_change = testing::rel_error(yc, testing::to_double(y32));
            const double term_change = (testing::to_double(yc) - testing::to_double(y32)).norm() / term32.norm();
            MESSAGE(std::string(kind_names[k]) << " with " << std::string(serve::factor_storage_name(st))
                                               << " factors: output changes by "
                                  << out_change << " relative to fp32 factors, the task's effect by " << term_change);
            CHECK(out_change > 0);  // really stored compact
            CHECK(term_change <= (st == factor_storage::bf16 ? 1e-2 : 2e-2));
        }
    }
}

TEST_CASE("decode: compact tasks join and leave a mixed batch; each sequence equals its decoded fp32 twin") {
    using C = config::llama<compress::int8_per_channel>;
    const auto s = testing::llama_shape();
    const index_t cap = 12, slots = 4;
    const auto owner = registry_of<C>(testing::backbone_for<C>(s, 50), cap);
    const auto& reg = *owner;
    auto caches = reg.backbone().make_cache(slots, cap);
    std::vector<std::string> slot_task{name_of(1, factor_storage::int8), name_of(0, factor_storage::bf16),
                                       name_of(4, factor_storage::fp32), name_of(2, factor_storage::int8)};
    std::vector<std::vector<nn::kv_cache>> own;  // each slot's twin: the decoded fp32 task, alone
    for (index_t b = 0; b < slots; ++b) own.push_back(reg.backbone().make_cache(1, cap));
    std::vector<MatD> got(slots), want(slots);   // each slot's outputs so far: mixed, twin
    auto append = [](MatD& all, const MatD& rows) {
        MatD grown(all.rows() + rows.rows(), rows.cols());
        if (all.rows() > 0) grown.topRows(all.rows()) = all;
        grown.bottomRows(rows.rows()) = rows;
        all = std::move(grown);
    };
    unsigned data = 60;
    nn::workspace ws;
    auto step = [&](std::vector<index_t> n) {
        const index_t S = *std::max_element(n.begin(), n.end());
        const auto x = testing::random_matrix(slots * S, s.d_model, data++);
        std::vector<std::string_view> names(slot_task.begin(), slot_task.end());
        Matrix<float> y(slots * S, s.d_model);
        reg.decode_batch(names, x, n, y, caches, ws);
        for (index_t b = 0; b < slots; ++b) {
            if (n[std::size_t(b)] == 0) continue;
            const std::string& t = slot_task[std::size_t(b)];
            CAPTURE(t);
            const bool compact = t.find("@fp32") == std::string::npos;
            const std::string twin = compact ? t + "_decoded" : t;
            const std::vector<std::string_view> one{twin};
            const std::vector<index_t> len{n[std::size_t(b)]};
            Matrix<float> ya(len[0], s.d_model);
            reg.decode_batch(one, x.view().middle_rows(b * S, len[0]), len, ya, own[std::size_t(b)], ws);
            append(got[std::size_t(b)], testing::to_double(y.view().middle_rows(b * S, len[0])));
            append(want[std::size_t(b)], testing::to_double(ya));
            const MatD& g = got[std::size_t(b)];
            const MatD& w = want[std::size_t(b)];
            CHECK((g - w).norm() / w.norm() <= 1e-6);  // the sequence's outputs so far
        }
    };
    step({3, 2, 2, 1});
    step({1, 1, 1, 1});
    for (auto& c : caches) c.truncate(1, 0);
    own[1] = reg.backbone().make_cache(1, cap);
    got[1] = want[1] = MatD();
    slot_task[1] = name_of(3, factor_storage::bf16);  // a compact rslora + IA3 task joins slot 1
    step({1, 2, 1, 1});
    step({1, 1, 0, 1});
}

}  // namespace cpet_test_serve_compact
