// cpet/serve/registry.hpp — many tasks over one shared, const backbone, changed at run time while other threads
// run forwards.
//
// The backbone (an nn::Stack<C>) is stored once and never changes; a task is a name and one pet::task per layer
// (any PET methods, mixed freely), stored once per version, its low-rank factors in fp32, bf16 or int8 as the
// caller chooses (serve::factor_storage, serve/compact.hpp). Tasks are checked against the backbone when they are
// added or replaced (every module's shapes, the prefix rows against the cache capacity the registry was given),
// so a request never meets a task that does not fit. A forward resolves the task name ONCE, under a shared lock,
// into a shared_ptr to that version: a replace or remove meanwhile changes the registry, not the version the
// forward already holds, and the version's memory is freed when its last user lets go. The lock guards only the
// name map (a lookup or an insert), never a forward, so forwards of many threads run concurrently; each caller
// owns its workspace.
//
// A heterogeneous batch names a task per sequence (forward_batch / decode_batch), tasks of any methods: the names
// are resolved once, the backbone runs once over the whole batch, and each sequence gets its own task's modules
// through serve::mixed_batch (low-rank terms and BitFit's Δb as a segmented epilogue term, each row paying its own
// task's rank; adapters, IA3, Δβ, prefixes and prompt tokens per sequence; a batch of one task takes that task's
// own fused path). For decode the
// caller owns the kv_caches: a sequence leaves by truncating its slot to 0, a new one joins in a free slot with
// its task (its prefix and prompt tokens go into its cache then), and idle slots pass a length of 0. A slot keeps
// the task it started with: one whose prefix length differs is refused by the decode; the caller truncates a slot
// before giving it to a sequence of another task.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/nn/stack.hpp"
#include "cpet/nn/workspace.hpp"
#include "cpet/pet/task.hpp"
#include "cpet/serve/compact.hpp"
#include "cpet/serve/mixed.hpp"

namespace cpet::serve {

/// One registered version of a task: immutable once registered.
struct task_version {
    std::string name;
    std::uint64_t version = 0;          ///< increases with every add or replace, across names
    std::vector<task_layer> layers;     ///< one per backbone layer
    factor_storage storage = factor_storage::fp32;  ///< how its low-rank factors are kept
    std::size_t bytes = 0;              ///< what this task adds to the resident backbone (as stored)

    std::span<const task_layer> modules() const noexcept { return layers; }
};
using task_ptr = std::shared_ptr<const task_version>;

/// Where the memory is: the backbone once, each task's modules on top.
struct memory_report {
    std::size_t backbone_bytes = 0;
    std::size_t task_bytes = 0;  ///< all registered tasks together
    std::size_t tasks = 0;
    std::size_t total() const noexcept { return backbone_bytes + task_bytes; }
};

template <nn::LayerConfig C>
class registry {
public:
    using backbone_type = nn::Stack<C>;

    /// `max_cache_rows`: the kv_cache capacity decode will use (0: no decode), so that a task whose prefix leaves
    /// no room for a token is refused when it is registered, not when a request arrives.
    explicit registry(std::shared_ptr<const backbone_type> backbone, index_t max_cache_rows = 0)
        : backbone_(std::move(backbone)), max_cache_rows_(max_cache_rows) {
        require<shape_error>(backbone_ != nullptr, "serve::registry: the backbone is null");
        require<shape_error>(max_cache_rows >= 0, "serve::registry: max_cache_rows must be >= 0, got ", max_cache_rows);
    }

    const backbone_type& backbone() const noexcept { return *backbone_; }

    /// Registers a new task, its low-rank factors kept as `storage`; throws (and changes nothing) when the name
    /// is taken or a module does not fit.
    task_ptr add(std::string name, std::vector<pet::task> layers, factor_storage storage = factor_storage::fp32) {
        auto v = make_version(std::move(name), std::move(layers), storage, "serve::registry::add");
        std::unique_lock lock(mu_);
        require<format_error>(tasks_.find(v->name) == tasks_.end(), "serve::registry::add: a task named \"", v->name,
                              "\" is already registered (replace() swaps a task's modules)");
        v->version = ++next_version_;
        task_ptr p = std::move(v);
        tasks_.emplace(p->name, p);
        return p;
    }
    /// Swaps the modules of a registered task; forwards that already hold the old version finish with it.
    task_ptr replace(std::string name, std::vector<pet::task> layers, factor_storage storage = factor_storage::fp32) {
        auto v = make_version(std::move(name), std::move(layers), storage, "serve::registry::replace");
        std::unique_lock lock(mu_);
        auto it = tasks_.find(v->name);
        require<format_error>(it != tasks_.end(), "serve::registry::replace: no task named \"", v->name, "\"");
        v->version = ++next_version_;
        it->second = std::move(v);
        return it->second;
    }
    /// Unregisters a task (false when there is none of that name); its memory goes with its last user.
    bool remove(std::string_view name) {
        std::unique_lock lock(mu_);
        auto it = tasks_.find(name);
        if (it == tasks_.end()) return false;
        tasks_.erase(it);
        return true;
    }

    /// The current version of a task, or null.
    task_ptr find(std::string_view name) const {
        std::shared_lock lock(mu_);
        auto it = tasks_.find(name);
        return it == tasks_.end() ? nullptr : it->second;
    }
    /// The current version of a task; throws format_error naming an unknown task.
    task_ptr get(std::string_view name) const {
        auto p = find(name);
        require<format_error>(p != nullptr, "serve::registry: unknown task \"", name, "\"");
        return p;
    }
    std::vector<std::string> names() const {
        std::shared_lock lock(mu_);
        std::vector<std::string> out;
        out.reserve(tasks_.size());
        for (const auto& [n, _] : tasks_) out.push_back(n);
        return out;
    }
    std::size_t size() const {
        std::shared_lock lock(mu_);
        return tasks_.size();
    }
    memory_report memory() const {
        memory_report r;
        r.backbone_bytes = backbone_->bytes();
        std::shared_lock lock(mu_);
        r.tasks = tasks_.size();
        for (const auto& [n, t] : tasks_) r.task_bytes += t->bytes;
        return r;
    }

    /// y = backbone(x) with the task's modules (the version current when the call starts); returns that version
    /// so a caller can tell which one served it. `ws` is the caller's own.
    task_ptr forward(std::string_view name, ConstMatrixView<float> x, std::span<const index_t> lengths,
                     MatrixView<float> y, nn::workspace& ws) const {
        task_ptr t = get(name);
        backbone_->forward(x, lengths, y, ws, t->modules());
        return t;
    }

    /// The versions a batch runs with (one per sequence, resolved once) and its per-layer modules.
    struct bound_batch {
        std::vector<task_ptr> versions;          ///< per sequence (null: no task)
        std::vector<mixed_batch> layers;         ///< per layer, when the batch mixes tasks
        bool single = false;                     ///< every sequence has the same task: its own fused path
    };
    /// Resolves `names` (one per sequence; "" = no task). Throws format_error naming an unknown task. (Every
    /// registered task was checked against the backbone when it was added, so a bound batch fits it.)
    bound_batch bind(std::span<const std::string_view> names) const {
        bound_batch bb;
        bb.versions.reserve(names.size());
        for (auto n : names) bb.versions.push_back(n.empty() ? nullptr : get(n));
        bb.single = !bb.versions.empty() && bb.versions.front() != nullptr;
        for (const auto& v : bb.versions) bb.single = bb.single && v == bb.versions.front();
        if (!bb.single) {
            std::vector<const task_layer*> per_seq(bb.versions.size());
            for (std::size_t l = 0; l < backbone_->size(); ++l) {
                for (std::size_t b = 0; b < per_seq.size(); ++b)
                    per_seq[b] = bb.versions[b] ? &bb.versions[b]->layers[l] : nullptr;
                bb.layers.emplace_back(per_seq);
            }
        }
        return bb;
    }

    /// y = backbone(x) where sequence b runs with task names[b] ("" = none). Returns the versions used.
    std::vector<task_ptr> forward_batch(std::span<const std::string_view> names, ConstMatrixView<float> x,
                                        std::span<const index_t> lengths, MatrixView<float> y, nn::workspace& ws) const {
        check_batch(names, x, lengths, "serve::registry::forward_batch");
        auto bb = bind(names);
        if (bb.single) backbone_->forward(x, lengths, y, ws, bb.versions.front()->modules());
        else backbone_->forward(x, lengths, y, ws, std::span<const mixed_batch>(bb.layers));
        return std::move(bb.versions);
    }
    /// The same as a decode step over the caller's caches (see the file comment for joining and leaving).
    std::vector<task_ptr> decode_batch(std::span<const std::string_view> names, ConstMatrixView<float> x,
                                       std::span<const index_t> new_lengths, MatrixView<float> y,
                                       std::span<nn::kv_cache> caches, nn::workspace& ws) const
        requires backbone_type::causal
    {
        check_batch(names, x, new_lengths, "serve::registry::decode_batch");
        auto bb = bind(names);
        if (bb.single) backbone_->decode(x, new_lengths, y, caches, ws, bb.versions.front()->modules());
        else backbone_->decode(x, new_lengths, y, caches, ws, std::span<const mixed_batch>(bb.layers));
        return std::move(bb.versions);
    }

private:
    /// One task name per sequence.
    static void check_batch(std::span<const std::string_view> names, ConstMatrixView<float> x,
                               std::span<const index_t> lengths, const char* who) {
        require<shape_error>(names.size() == lengths.size(), who, ": ", names.size(), " task names for ",
                             lengths.size(), " sequences (one name per sequence, \"\" for none)");
        require<shape_error>(!lengths.empty() && x.rows() % index_t(lengths.size()) == 0, who, ": x has ", x.rows(),
                             " rows, not a multiple of the ", lengths.size(), " sequences");
    }

    std::shared_ptr<task_version> make_version(std::string name, std::vector<pet::task> layers, factor_storage storage,
                                               const char* who) const {
        require<format_error>(!name.empty(), who, ": the task name is empty");
        require<shape_error>(layers.size() == backbone_->size(), who, ": task \"", name, "\" has modules for ",
                             layers.size(), " layers, the backbone has ", backbone_->size());
        for (std::size_t i = 0; i < layers.size(); ++i) {
            const auto& l = backbone_->layer(i);
            l.check_task(layers[i], who, i == 0);
            if (max_cache_rows_ > 0) {
                const index_t p = l.attention().prefix_rows(layers[i]);
                const index_t vt = i == 0 ? layers[i].virtual_tokens().rows() : 0;
                require<shape_error>(p + vt < max_cache_rows_, who, ": task \"", name, "\" puts ", p,
                                     " prefix rows", vt ? " and virtual tokens" : "", " in layer ", i,
                                     "'s kv_cache, which holds ", max_cache_rows_, " rows: no room for a token");
            }
        }
        auto v = std::make_shared<task_version>();
        v->name = std::move(name);
        v->storage = storage;
        v->layers.reserve(layers.size());
        for (auto& l : layers) v->layers.emplace_back(std::move(l), storage);
        for (const auto& l : v->layers) v->bytes += l.bytes();
        return v;
    }

    std::shared_ptr<const backbone_type> backbone_;
    index_t max_cache_rows_ = 0;
    mutable std::shared_mutex mu_;
    std::map<std::string, task_ptr, std::less<>> tasks_;
    std::uint64_t next_version_ = 0;
};

}  // namespace cpet::serve
