// cpet/pet/accounting.hpp — parameter accounting like PEFT's print_trainable_parameters: trainable / total /
// percent, and the count of every PET module.
//
// Every modules type of cpet lists its parameters (`parameters()`: named groups with counts); the backbone's
// count comes from nn::parameter_count (per layer) and is frozen. Total = backbone + PET, as PEFT reports it.
#pragma once

#include <cstdio>
#include <ostream>
#include <span>
#include <string>
#include <vector>

#include "cpet/core/error.hpp"
#include "cpet/pet/policy.hpp"

namespace cpet::pet {

/// Modules that can list their parameters.
template <class M>
concept CountsParameters = requires(const M& m) {
    { m.parameters() } -> std::same_as<std::vector<parameter_group>>;
};

struct parameter_report {
    std::vector<parameter_group> groups;  ///< per module, "layers.3.q.lora_A"; the backbone as "backbone"
    index_t trainable = 0;
    index_t total = 0;

    double percent() const noexcept { return total ? 100.0 * double(trainable) / double(total) : 0.0; }
    /// "trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364" (PEFT's line).
    std::string summary() const {
        char pct[32];
        std::snprintf(pct, sizeof pct, "%.4f", percent());
        return cpet::detail::concat("trainable params: ", grouped(trainable), " || all params: ", grouped(total),
                                    " || trainable%: ", pct);
    }
    /// The summary, then one line per module group.
    void print(std::ostream& os, bool per_module = true) const {
        os << summary() << '\n';
        if (per_module)
            for (const auto& g : groups)
                os << "  " << g.name << ": " << grouped(g.count) << (g.trainable ? "" : " (frozen)") << '\n';
    }

    /// 1234567 -> "1,234,567".
    static std::string grouped(index_t n) {
        // Built by appending: std::string::insert here trips GCC 12's false -Wrestrict (PR 105651) at -O3.
        const std::string digits = std::to_string(n < 0 ? -n : n);
        std::string s = n < 0 ? "-" : "";
        for (std::size_t i = 0; i < digits.size(); ++i) {
            if (i > 0 && (digits.size() - i) % 3 == 0) s += ',';
            s += digits[i];
        }
        return s;
    }
};

/// The report of one task: one modules object per layer, over a backbone of `backbone_parameters` (frozen).
template <CountsParameters M>
parameter_report count_parameters(std::span<const M> per_layer, index_t backbone_parameters) {
    require<shape_error>(backbone_parameters >= 0, "count_parameters: negative backbone count ", backbone_parameters);
    parameter_report r;
    r.groups.push_back({"backbone", backbone_parameters, false});
    for (std::size_t l = 0; l < per_layer.size(); ++l)
        for (auto g : per_layer[l].parameters()) {
            g.name = cpet::detail::concat("layers.", l, '.', g.name);
            if (g.trainable) r.trainable += g.count;
            r.total += g.count;
            r.groups.push_back(std::move(g));
        }
    r.total += backbone_parameters;
    return r;
}
template <CountsParameters M>
parameter_report count_parameters(const M& one_layer, index_t backbone_parameters) {
    return count_parameters(std::span<const M>(&one_layer, 1), backbone_parameters);
}

}  // namespace cpet::pet
