// cpet/io/train_checkpoint.hpp — a training run as one safetensors file, to stop and resume it exactly.
//
// Tensors (F32 unless said):
//   param/<name>                  every trainable parameter's values
//   optimizer/<name>.<suffix>     the optimizer's state (AdamW: exp_avg, exp_avg_sq; SGD: momentum_buffer)
//   data/order                    I64, the current epoch's micro-batch order (empty before the first)
// __metadata__ (strings):
//   format "cpet.train_checkpoint", version "1"; step, micro_batches, rng (the std::mt19937_64 as text);
//   option.<key> for each of trainer_options::fingerprint(): the options that change the numbers;
//   decay.<name> "true" / "false" for each parameter (whether weight decay applies: it changes the numbers too).
//
// Saving goes through save_safetensors, so an interrupted write leaves the previous checkpoint in place. Loading
// reads and checks everything (each name, dtype, size and option) before it changes anything: on failure the
// parameters and the trainer are as they were, and the message names what differs. Gradients are not saved:
// every step starts by zeroing them.
#pragma once

#include <charconv>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "cpet/core/error.hpp"
#include "cpet/io/safetensors.hpp"
#include "cpet/train/parameter.hpp"
#include "cpet/train/trainer.hpp"

namespace cpet::io {

inline constexpr const char* train_checkpoint_format = "cpet.train_checkpoint";
inline constexpr const char* train_checkpoint_version = "1";

/// Writes the parameters' values, the trainer's state and its options to `path` (atomically replaced).
inline void save_train_checkpoint(const std::filesystem::path& path, std::span<const train::parameter> ps,
                                  const train::trainer& t) {
    train::check_parameters(ps, "save_train_checkpoint");
    const train::trainer_state s = t.state();
    std::vector<tensor_data> tensors;
    for (const auto& p : ps)
        tensors.push_back(make_tensor("param/" + p.name, {p.size()}, std::span<const float>(p.value)));
    for (const auto& st : s.optimizer.tensors)
        tensors.push_back(make_tensor("optimizer/" + st.name, {st.values.size()}, st.values));
    tensors.push_back(make_tensor("data/order", {s.order.size()}, s.order));
    std::map<std::string, std::string> meta;
    meta["format"] = train_checkpoint_format;
    meta["version"] = train_checkpoint_version;
    meta["step"] = std::to_string(s.step);
    meta["micro_batches"] = std::to_string(s.micro_batches);
    meta["rng"] = s.rng;
    for (const auto& [k, v] : t.options().fingerprint()) meta["option." + k] = v;
    for (const auto& p : ps) meta["decay." + p.name] = p.decay ? "true" : "false";
    save_safetensors(path, tensors, meta);
}

namespace detail {

inline const std::string& checkpoint_meta(const safetensors_file& f, const std::string& key) {
    auto it = f.metadata().find(key);
    if (it == f.metadata().end())
        throw io_error(cpet::detail::concat(f.file_name(), ": not a cpet training checkpoint: no metadata \"", key,
                                            "\""));
    return it->second;
}

inline std::int64_t checkpoint_int(const safetensors_file& f, const std::string& key) {
    const std::string& v = checkpoint_meta(f, key);
    std::int64_t x = 0;
    const auto r = std::from_chars(v.data(), v.data() + v.size(), x);
    require<io_error>(r.ec == std::errc{} && r.ptr == v.data() + v.size(), f.file_name(), ": metadata \"", key,
                      "\" is \"", v, "\", not an integer");
    return x;
}

/// The F32 tensor `name` of `n` elements copied into dst (bit for bit).
inline void checkpoint_f32(const safetensors_file& f, const std::string& name, std::size_t n, float* dst) {
    const tensor_view* t = f.find(name);
    require<io_error>(t != nullptr, f.file_name(), ": the checkpoint has no tensor \"", name, "\"");
    require<io_error>(t->type() == dtype::F32, f.file_name(), ": tensor \"", name, "\" is ", dtype_name(t->type()),
                      ", expected F32");
    require<shape_error>(t->numel() == n, f.file_name(), ": tensor \"", name, "\" holds ", t->numel(),
                         " values, this run's has ", n);
    if (n) std::memcpy(dst, t->bytes().data(), n * sizeof(float));
}

}  // namespace detail

/// Restores the parameters' values and the trainer's state from `path`. The trainer must be built with the same
/// options (those of fingerprint()) and `ps` must be the same parameters (names and sizes; order free).
/// io_error / shape_error naming the first difference; then nothing has changed.
inline void load_train_checkpoint(const std::filesystem::path& path, std::span<const train::parameter> ps,
                                  train::trainer& t) {
    train::check_parameters(ps, "load_train_checkpoint");
    const safetensors_file f = safetensors_file::open(path);
    const std::string& file = f.file_name();
    require<io_error>(detail::checkpoint_meta(f, "format") == train_checkpoint_format, file,
                      ": not a cpet training checkpoint (format \"", detail::checkpoint_meta(f, "format"), "\")");
    require<io_error>(detail::checkpoint_meta(f, "version") == train_checkpoint_version, file,
                      ": training checkpoint version \"", detail::checkpoint_meta(f, "version"), "\", this build reads ",
                      train_checkpoint_version);

    // Options: every one this run has must be in the file with the same text, and the file may hold no other.
    const auto want = t.options().fingerprint();
    for (const auto& [k, v] : want) {
        auto it = f.metadata().find("option." + k);
        require<io_error>(it != f.metadata().end(), file, ": the checkpoint does not record option \"", k,
                          "\" (this run has ", v, ")");
        require<io_error>(it->second == v, file, ": option \"", k, "\" is ", it->second,
                          " in the checkpoint, this run has ", v);
    }
    for (const auto& [k, v] : f.metadata()) {
        if (k.rfind("option.", 0) != 0) continue;
        const std::string key = k.substr(7);
        require<io_error>(want.count(key) != 0, file, ": the checkpoint has option \"", key, "\" = ", v,
                          ", which this run does not (a different optimizer?)");
    }

    train::trainer_state s;
    s.step = detail::checkpoint_int(f, "step");
    s.micro_batches = detail::checkpoint_int(f, "micro_batches");
    s.rng = detail::checkpoint_meta(f, "rng");
    s.optimizer.step = s.step;

    std::set<std::string> expected;
    {
        const tensor_view* o = f.find("data/order");
        require<io_error>(o != nullptr, file, ": the checkpoint has no tensor \"data/order\"");
        require<io_error>(o->type() == dtype::I64 && o->rank() == 1, file, ": tensor \"data/order\" is ",
                          dtype_name(o->type()), " ", o->shape_str(), ", expected a vector of I64");
        s.order.resize(o->numel());
        if (!s.order.empty()) std::memcpy(s.order.data(), o->bytes().data(), s.order.size() * sizeof(std::int64_t));
        expected.insert("data/order");
    }
    std::vector<std::vector<float>> values(ps.size());
    for (std::size_t i = 0; i < ps.size(); ++i) {
        const std::string name = "param/" + ps[i].name;
        values[i].resize(ps[i].size());
        detail::checkpoint_f32(f, name, ps[i].size(), values[i].data());
        const std::string& decay = detail::checkpoint_meta(f, "decay." + ps[i].name);
        require<io_error>(decay == (ps[i].decay ? "true" : "false"), file, ": parameter \"", ps[i].name,
                          "\" has weight decay ", decay, " in the checkpoint, ", ps[i].decay ? "true" : "false",
                          " in this run");
        expected.insert(name);
    }
    if (s.step > 0)
        for (const auto& p : ps)
            for (const char* suffix : t.optimizer().state_suffixes()) {
                train::state_tensor st{p.name + "." + suffix, std::vector<float>(p.size())};
                const std::string name = "optimizer/" + st.name;
                detail::checkpoint_f32(f, name, p.size(), st.values.data());
                expected.insert(name);
                s.optimizer.tensors.push_back(std::move(st));
            }
    for (const auto& tv : f.tensors())
        require<io_error>(expected.count(tv.name()) != 0, file, ": the checkpoint holds tensor \"", tv.name(),
                          "\", which this run has no place for");
    t.check_state(s, ps);

    // Everything checked: from here nothing throws but allocation.
    for (std::size_t i = 0; i < ps.size(); ++i)
        if (!values[i].empty()) std::memcpy(ps[i].value.data(), values[i].data(), values[i].size() * sizeof(float));
    t.load_state(s, ps);
}

}  // namespace cpet::io
