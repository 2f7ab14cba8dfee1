// cpet/pet/none.hpp — the PET policy with no modules and no hooks: the plain (frozen or fully fine-tuned) backbone.
#pragma once

#include "cpet/pet/policy.hpp"

namespace cpet::pet {

struct none {
    struct modules {};  ///< nothing per layer, no hooks declared
    static constexpr const char* name() noexcept { return "none"; }
};

static_assert(check_pet_policy<none>());
static_assert(!hooks_of<none>::linear && !hooks_of<none>::sublayer && !hooks_of<none>::attention &&
              !hooks_of<none>::input);

}  // namespace cpet::pet
