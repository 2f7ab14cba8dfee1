// cpet/train/schedule.hpp — learning-rate schedules: linear warm-up, then constant, linear decay or cosine.
//
// The formulas are HuggingFace transformers' (optimization.py: get_constant_schedule_with_warmup,
// get_linear_schedule_with_warmup, get_cosine_schedule_with_warmup with num_cycles 0.5), which multiply the peak
// learning rate through torch's LambdaLR. As there, `step` counts optimizer steps already taken: the first step
// uses lr_at(0), which is 0 when there is a warm-up.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>

#include "cpet/core/error.hpp"

namespace cpet::train {

enum class schedule_kind : std::uint8_t {
    constant,  ///< warm-up, then the peak rate
    linear,    ///< warm-up, then linearly down to 0 at total_steps
    cosine,    ///< warm-up, then half a cosine down to 0 at total_steps
};

inline const char* schedule_name(schedule_kind k) noexcept {
    switch (k) {
        case schedule_kind::constant: return "constant";
        case schedule_kind::linear: return "linear";
        case schedule_kind::cosine: return "cosine";
    }
    return "?";
}

/// A schedule as a value: peak rate, warm-up length and (for the decays) the length of the whole run.
struct schedule {
    schedule_kind kind = schedule_kind::linear;
    double lr = 1e-3;                ///< peak learning rate (torch's default for AdamW)
    std::int64_t warmup_steps = 0;
    std::int64_t total_steps = 0;   ///< where linear / cosine reach 0; a trainer fills it in when 0

    void check() const {
        require<shape_error>(lr >= 0 && std::isfinite(lr), "schedule: lr must be finite and >= 0, got ", lr);
        require<shape_error>(warmup_steps >= 0, "schedule: warmup_steps must be >= 0, got ", warmup_steps);
        require<shape_error>(kind == schedule_kind::constant || total_steps > 0, "schedule: a ", schedule_name(kind),
                             " schedule needs total_steps > 0, got ", total_steps);
        require<shape_error>(kind == schedule_kind::constant || warmup_steps <= total_steps, "schedule: warmup_steps (",
                             warmup_steps, ") exceeds total_steps (", total_steps, ")");
    }

    /// The multiplier of the peak rate after `step` optimizer steps (HF's lr_lambda).
    double factor(std::int64_t step) const noexcept {
        const auto s = static_cast<double>(step);
        if (step < warmup_steps) return s / static_cast<double>(std::max<std::int64_t>(1, warmup_steps));
        if (kind == schedule_kind::constant) return 1.0;
        const auto span = static_cast<double>(std::max<std::int64_t>(1, total_steps - warmup_steps));
        if (kind == schedule_kind::linear)
            return std::max(0.0, static_cast<double>(total_steps - step) / span);
        const double progress = static_cast<double>(step - warmup_steps) / span;
        return std::max(0.0, 0.5 * (1.0 + std::cos(std::numbers::pi * 0.5 * 2.0 * progress)));
    }
    /// The learning rate for the step that follows `step` steps already taken.
    double lr_at(std::int64_t step) const noexcept { return lr * factor(step); }
};

}  // namespace cpet::train
