// Must NOT compile: the modules declare the linear hook, but lowrank takes a mutable MatrixView (a near miss of
// `lowrank(pet::target, ConstMatrixView<float>, pet::scratch&) const`). Before hooks were declared, such a
// member was silently never called. CTest expects the sentence naming concept pet::LinearHook.
#include "cpet/pet/policy.hpp"

struct near_miss {
    static constexpr const char* name() noexcept { return "near_miss"; }
    struct modules {
        static constexpr cpet::pet::hook_set hooks{cpet::pet::hook::linear};
        std::optional<cpet::pet::lowrank_args> lowrank(cpet::pet::target, cpet::MatrixView<float>,
                                                       cpet::pet::scratch&) const {
            return std::nullopt;
        }
        void check_fits(const cpet::pet::layer_dims&, const char*) const {}
    };
};

static_assert(cpet::pet::check_pet_policy<near_miss>());
