// serve::registry: tasks of mixed kinds over one shared const backbone, checked when registered; 8 threads
// forwarding while a writer adds, replaces and removes tasks lose no request and corrupt none (each forward
// equals the single-threaded output of the task version it was served by); bad input changes nothing; memory is
// the backbone once plus each task's modules. (CI runs the serve room under ThreadSanitizer.)
#include <atomic>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cpet/pet/pet.hpp"
#include "cpet/pet/task.hpp"
#include "cpet/serve/registry.hpp"
#include "pet/pet_references.hpp"

namespace cpet_test_serve_registry {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;
using testing::MatD;

namespace {

using C = config::llama<compress::int8_per_channel>;

std::shared_ptr<const Stack<C>> make_backbone(const nn::layer_shape& s) {
    std::vector<nn::dense_layer_weights> w{nn::random_layer_weights(s, 1, nn::kind_of<C>),
                                           nn::random_layer_weights(s, 2, nn::kind_of<C>)};
    return std::make_shared<const Stack<C>>(w, s);
}

/// Task `kind` (0..5) of variant `v`, one pet::task per layer: LoRA, adapter, MAM, IA3, BitFit, CPET.
std::vector<pet::task> make_task(const Stack<C>& stack, int kind, int v) {
    std::vector<pet::task> layers(stack.size());
    for (std::size_t l = 0; l < stack.size(); ++l) {
        const auto d = stack.layer(l).pet_dims();
        const unsigned seed = 100u * unsigned(kind) + 10u * unsigned(v) + unsigned(l);
        auto lora = [&] {
            auto m = pet::lora::make(d, {.rank = 4 + 4 * v, .alpha = 8}, seed);
            testing::randomize_up(m, d, seed + 1);
            return m;
        };
        switch (kind) {
            case 0: layers[l].add(lora()); break;
            case 1: layers[l].add(testing::random_adapter<pet::adapter>(d, {.bottleneck = 8}, seed)); break;
            case 2:
                layers[l].add(pet::prefix_tuning::make(d, {.length = 2 + v}, seed));
                layers[l].add(testing::random_adapter<pet::scaled_parallel_adapter>(d, {.bottleneck = 4}, seed + 3));
                break;
            case 3: layers[l].add(testing::random_ia3(d, {pet::target::k, pet::target::v, pet::target::down}, seed)); break;
            case 4: layers[l].add(testing::random_bitfit(d, seed)); break;
            default: {
                auto r = pet::recovery::make(d, {.rank = 8}, seed);
                testing::randomize_up(r, d, seed + 2);
                layers[l].add(std::move(r));
                layers[l].add(lora());
            }
        }
    }
    return layers;
}

constexpr int kinds = 6;
std::string name_of(int k) { return "task" + std::to_string(k); }

}  // namespace

TEST_CASE("8 threads forward while tasks are added, replaced and removed: no request lost, none corrupted") {
    const auto s = testing::llama_shape();
    const auto backbone = make_backbone(s);
    serve::registry<C> reg(backbone);
    const std::vector<index_t> lengths{3, 1};
    const index_t M = 2 * 3;
    const auto x = testing::random_matrix(M, s.d_model, 7);

    // the expected output of every (kind, variant), single-threaded
    std::map<std::pair<int, int>, Matrix<float>> expected;
    for (int k = 0; k < kinds; ++k)
        for (int v = 0; v < 2; ++v) {
            const auto t = make_task(*backbone, k, v);
            nn::workspace ws;
            Matrix<float> y(M, s.d_model);
            backbone->forward(x, lengths, y, ws, std::span<const pet::task>(t));
            expected.emplace(std::pair{k, v}, std::move(y));
        }
    std::mutex versions_mu;
    std::map<std::uint64_t, std::pair<int, int>> versions;  // registry version -> (kind, variant)
    auto record = [&](const serve::task_ptr& p, int k, int v) {
        std::lock_guard g(versions_mu);
        versions[p->version] = {k, v};
    };
    for (int k = 0; k < kinds; ++k) record(reg.add(name_of(k), make_task(*backbone, k, 0)), k, 0);
    const auto mem = reg.memory();
    CHECK(mem.backbone_bytes == backbone->bytes());
    CHECK(mem.tasks == std::size_t(kinds));
    std::size_t sum = 0;
    for (int k = 0; k < kinds; ++k) {
        const auto t = reg.get(name_of(k));
        std::size_t params = 0;
        for (const auto& l : t->layers) params += std::size_t(pet::count_parameters(l.task(), 0).trainable);
        CHECK(t->bytes == params * sizeof(float));  // each task adds exactly its modules
        sum += t->bytes;
    }
    CHECK(mem.task_bytes == sum);
    CHECK(mem.total() == mem.backbone_bytes + sum);

    // variants made up front: the writer only swaps them in
    std::vector<std::vector<std::vector<pet::task>>> made(kinds);
    for (int k = 0; k < kinds; ++k)
        for (int v = 0; v < 2; ++v) made[std::size_t(k)].push_back(make_task(*backbone, k, v));

    constexpr int readers = 8, requests = 24;
    std::atomic<int> served{0}, refused{0}, wrong{0}, lost{0};
    std::atomic<bool> stop{false};
    std::thread writer([&] {
        std::mt19937 gen(3);
        int round = 0;
        while (!stop.load()) {
            const int k = int(gen() % kinds), v = ++round % 2;
            if (k == 0 && round % 3 == 0) {  // remove task0 for a while, then add it back
                reg.remove(name_of(0));
                std::this_thread::yield();
                record(reg.add(name_of(0), made[0][std::size_t(v)]), 0, v);
            } else {
                record(reg.replace(name_of(k), made[std::size_t(k)][std::size_t(v)]), k, v);
            }
            std::this_thread::yield();
        }
    });
    std::vector<std::thread> pool;
    for (int r = 0; r < readers; ++r)
        pool.emplace_back([&, r] {
            std::mt19937 gen(unsigned(100 + r));
            nn::workspace ws;  // each caller owns its workspace
            Matrix<float> y(M, s.d_model);
            for (int i = 0; i < requests; ++i) {
                const int k = int(gen() % kinds);
                try {
                    const auto p = reg.forward(name_of(k), x, lengths, y, ws);
                    // The writer records a version after add / replace returns, so a forward may see it first:
                    // wait for the record (bounded; a version never recorded still throws and counts as lost).
                    std::pair<int, int> kv;
                    for (int tries = 0;; ++tries) {
                        {
                            std::lock_guard g(versions_mu);
                            const auto it = versions.find(p->version);
                            if (it != versions.end() || tries == 100000) {
                                kv = versions.at(p->version);
                                break;
                            }
                        }
                        std::this_thread::yield();
                    }
                    const auto& want = expected.at(kv);
                    double diff = 0;
                    for (index_t j = 0; j < y.size(); ++j) diff = std::max(diff, double(std::abs(y.data()[j] - want.data()[j])));
                    (diff <= 1e-5 && kv.first == k ? served : wrong)++;
                } catch (const format_error&) {
                    refused++;  // task0 was removed just then: a clear refusal, not a lost request
                } catch (...) {
                    lost++;
                }
            }
        });
    for (auto& t : pool) t.join();
    stop = true;
    writer.join();
    CHECK(lost.load() == 0);
    CHECK(wrong.load() == 0);
    CHECK(served.load() + refused.load() == readers * requests);
    CHECK(served.load() > readers * requests / 2);
    MESSAGE("served ", served.load(), ", refused while removed ", refused.load(), ", versions ", versions.size());
    CHECK(reg.size() == std::size_t(kinds));
}

TEST_CASE("a version in flight outlives its replacement and removal; memory goes with its last user") {
    const auto s = testing::llama_shape();
    const auto backbone = make_backbone(s);
    serve::registry<C> reg(backbone);
    auto v1 = reg.add("a", make_task(*backbone, 0, 0));
    std::weak_ptr<const serve::task_version> weak = v1;
    auto v2 = reg.replace("a", make_task(*backbone, 0, 1));
    CHECK(v2->version > v1->version);
    CHECK(reg.get("a") == v2);
    CHECK(v1->layers.size() == 2);  // still usable by whoever holds it
    v1.reset();
    CHECK(weak.expired());  // the registry no longer held it: freed with its last user
    std::weak_ptr<const serve::task_version> weak2 = v2;
    CHECK(reg.remove("a"));
    CHECK(!reg.remove("a"));
    CHECK(!weak2.expired());  // v2 is still held here
    v2.reset();
    CHECK(weak2.expired());
}

TEST_CASE("registry bad input is refused with a clear error and changes nothing") {
    const auto s = testing::llama_shape();
    const auto backbone = make_backbone(s);
    serve::registry<C> reg(backbone, /*max_cache_rows=*/6);
    reg.add("lora", make_task(*backbone, 0, 0));
    const std::vector<index_t> lengths{2};
    const auto x = testing::random_matrix(2, s.d_model, 9);
    Matrix<float> y(2, s.d_model);
    nn::workspace ws;
    CHECK_THROWS_WITH_AS(reg.forward("nope", x, lengths, y, ws), doctest::Contains("unknown task \"nope\""), format_error);
    CHECK_THROWS_WITH_AS(reg.add("lora", make_task(*backbone, 1, 0)), doctest::Contains("already registered"),
                         format_error);
    CHECK_THROWS_WITH_AS(reg.replace("other", make_task(*backbone, 1, 0)), doctest::Contains("no task named \"other\""),
                         format_error);
    // modules for another layer shape
    auto wide = s;
    wide.d_ff = 200;
    const auto other = make_backbone(wide);
    CHECK_THROWS_WITH_AS(reg.add("wide", make_task(*other, 3, 0)), doctest::Contains("ia3 vector of down has 200"),
                         shape_error);
    // a prefix that leaves no room in the cache
    std::vector<pet::task> long_prefix(2);
    for (std::size_t l = 0; l < 2; ++l)
        long_prefix[l].add(pet::prefix_tuning::make(backbone->layer(l).pet_dims(), {.length = 6}, 1));
    CHECK_THROWS_WITH_AS(reg.add("long", long_prefix), doctest::Contains("no room for a token"), shape_error);
    // one layer of modules for a two-layer backbone
    std::vector<pet::task> one(1);
    CHECK_THROWS_WITH_AS(reg.add("one", one), doctest::Contains("modules for 1 layers, the backbone has 2"), shape_error);
    CHECK(reg.names() == std::vector<std::string>{"lora"});
    CHECK(reg.get("lora")->version == 1);
}

}  // namespace cpet_test_serve_registry
