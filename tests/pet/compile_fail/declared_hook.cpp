// MUST compile: the control of near_miss_hook.cpp and undeclared_hook.cpp (the same shapes, declared and with
// the exact signatures), so a failure of those two is known to come from the near miss, not from the file.
#include "cpet/pet/policy.hpp"

struct declared {
    static constexpr const char* name() noexcept { return "declared"; }
    struct modules {
        static constexpr cpet::pet::hook_set hooks{cpet::pet::hook::linear, cpet::pet::hook::attention};
        cpet::Matrix<float> k, v;
        std::optional<cpet::pet::lowrank_args> lowrank(cpet::pet::target, cpet::ConstMatrixView<float>,
                                                       cpet::pet::scratch&) const {
            return std::nullopt;
        }
        std::optional<cpet::pet::prefix_kv> prefix() const { return cpet::pet::prefix_kv{k, v}; }
        void check_fits(const cpet::pet::layer_dims&, const char*) const {}
    };
};

static_assert(cpet::pet::check_pet_policy<declared>());
static_assert(cpet::pet::hooks_of<declared>::linear && cpet::pet::hooks_of<declared>::attention &&
              !cpet::pet::hooks_of<declared>::sublayer);

int main() {}
