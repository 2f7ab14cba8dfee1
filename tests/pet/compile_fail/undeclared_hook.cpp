// Must NOT compile: the modules have a prefix() attention hook but do not declare pet::hook::attention, so a
// layer would never call it. CTest expects the sentence saying so.
#include "cpet/pet/policy.hpp"

struct undeclared {
    static constexpr const char* name() noexcept { return "undeclared"; }
    struct modules {
        cpet::Matrix<float> k, v;
        std::optional<cpet::pet::prefix_kv> prefix() const { return cpet::pet::prefix_kv{k, v}; }
    };
};

static_assert(cpet::pet::check_pet_policy<undeclared>());
