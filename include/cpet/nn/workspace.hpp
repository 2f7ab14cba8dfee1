// cpet/nn/workspace.hpp — the activations of a forward pass, reused across calls.
//
// A layer is const and may be shared by threads; everything a call writes besides its output lives here, one
// workspace per concurrent caller (a Stack reuses one for all its layers). Buffers only grow, so after a first
// call with the largest batch nothing is allocated; `allocations()` lets a test check that.
#pragma once

#include <array>
#include <cstddef>
#include <vector>

#include "cpet/arch/isa.hpp"
#include "cpet/core/buffer.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/pet/policy.hpp"

namespace cpet::nn {

class workspace {
public:
    enum slot : int { normed, q, k, v, attn, sub, ff1, ff2, prefix_k, prefix_v, prompt, slot_count };

    /// A rows x cols view of buffer `s` (contents unspecified; valid until the next request for `s`).
    MatrixView<float> get(slot s, index_t rows, index_t cols) {
        auto& b = bufs_[static_cast<std::size_t>(s)];
        const auto n = static_cast<std::size_t>(rows * cols);
        if (b.size() < n) {
            b.reset(n);
            ++allocations_;
        }
        return {b.data(), rows, cols, cols};
    }

    /// Per-sequence lengths a caller rewrites (Stack's prompt-extended batch); grows only.
    std::vector<index_t>& lengths_scratch(std::size_t n) {
        if (lengths_.capacity() < n) ++allocations_;
        lengths_.resize(n);
        return lengths_;
    }

    /// Scratch lent to PET hooks.
    pet::scratch& pet_scratch() noexcept { return pet_; }

    /// Storage growths so far (own buffers and the PET scratch).
    std::size_t allocations() const noexcept { return allocations_ + pet_.allocations(); }

    /// The ISA path of the last layer call that used this workspace.
    arch::isa last_isa() const noexcept { return last_isa_; }
    void set_last_isa(arch::isa i) noexcept { last_isa_ = i; }

private:
    std::array<aligned_buffer<float>, slot_count> bufs_;
    pet::scratch pet_;
    std::vector<index_t> lengths_;
    std::size_t allocations_ = 0;
    arch::isa last_isa_ = arch::isa::scalar;
};

}  // namespace cpet::nn
