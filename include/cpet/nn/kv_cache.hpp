// cpet/nn/kv_cache.hpp — keys and values of the tokens a decoder layer has already seen, per sequence.
//
// One cache per layer and batch: sequence b holds K and V [capacity, n_kv_heads·head_dim] (RoPE already applied
// to K) and its own length, so sequences of a batch may be at different positions. Storage is allocated once at
// construction; appending past the capacity throws before anything is written.
//
// A task with an attention hook (prefix tuning, P-tuning v2) keeps its P prefix rows at the front of each
// sequence's cache, written once when the sequence starts, so a decode step reads the keys in place instead of
// copying prefix + cache every step (as HF's past_key_values does). The prefix counts against the capacity:
// length(b) = prefix_length(b) + tokens(b), and a token's position (for RoPE) is its index among tokens.
#pragma once

#include <vector>

#include "cpet/core/buffer.hpp"
#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"

namespace cpet::nn {

class kv_cache {
public:
    kv_cache() = default;
    kv_cache(index_t batch, index_t capacity, index_t kv_dim)
        : batch_(batch),
          capacity_(capacity),
          kv_dim_(kv_dim),
          lengths_(static_cast<std::size_t>(batch > 0 ? batch : 0), 0),
          prefix_(lengths_.size(), 0) {
        require<shape_error>(batch >= 0 && capacity >= 0 && kv_dim > 0, "kv_cache: batch (", batch,
                             ") and capacity (", capacity, ") must be >= 0 and kv_dim (", kv_dim, ") > 0");
        const auto n = static_cast<std::size_t>(batch * capacity * kv_dim);
        k_.reset(n);
        v_.reset(n);
    }

    index_t batch() const noexcept { return batch_; }
    index_t capacity() const noexcept { return capacity_; }
    index_t kv_dim() const noexcept { return kv_dim_; }
    /// Rows held for sequence b (its prefix rows, if any, included).
    index_t length(index_t b) const { return lengths_.at(static_cast<std::size_t>(b)); }
    /// Prefix rows at the front of sequence b (0 without an attention hook).
    index_t prefix_length(index_t b) const { return prefix_.at(static_cast<std::size_t>(b)); }
    /// Tokens held for sequence b (length minus prefix).
    index_t tokens(index_t b) const { return length(b) - prefix_length(b); }

    /// All `capacity` rows of sequence b (rows >= length(b) are unspecified).
    MatrixView<float> keys(index_t b) { return {k_.data() + offset(b), capacity_, kv_dim_, kv_dim_}; }
    MatrixView<float> values(index_t b) { return {v_.data() + offset(b), capacity_, kv_dim_, kv_dim_}; }
    ConstMatrixView<float> keys(index_t b) const { return {k_.data() + offset(b), capacity_, kv_dim_, kv_dim_}; }
    ConstMatrixView<float> values(index_t b) const { return {v_.data() + offset(b), capacity_, kv_dim_, kv_dim_}; }

    /// Throws shape_error unless sequence b can take `n` more tokens.
    void check_room(index_t b, index_t n) const {
        require<shape_error>(b >= 0 && b < batch_, "kv_cache: sequence ", b, " out of range [0, ", batch_, ")");
        require<shape_error>(n >= 0 && length(b) + n <= capacity_, "kv_cache: sequence ", b, " holds ", length(b),
                             " of ", capacity_, " positions; appending ", n, " tokens would exceed the capacity");
    }
    /// Appends rows of already projected (and rotated) keys and values to sequence b.
    void append(index_t b, ConstMatrixView<float> k, ConstMatrixView<float> v) {
        check_shape(k, -1, kv_dim_, "kv_cache::append: k");
        check_shape(v, k.rows(), kv_dim_, "kv_cache::append: v");
        check_room(b, k.rows());
        auto K = keys(b), V = values(b);
        for (index_t t = 0; t < k.rows(); ++t)
            for (index_t c = 0; c < kv_dim_; ++c) {
                K(length(b) + t, c) = k(t, c);
                V(length(b) + t, c) = v(t, c);
            }
        advance(b, k.rows());
    }
    /// Marks n more rows of sequence b as filled (the layer writes them in place, then advances).
    void advance(index_t b, index_t n) {
        check_room(b, n);
        lengths_[static_cast<std::size_t>(b)] += n;
    }
    /// Marks the first n rows of the empty sequence b as a prefix (the layer has written them).
    void set_prefix(index_t b, index_t n) {
        require<shape_error>(b >= 0 && b < batch_ && length(b) == 0, "kv_cache::set_prefix(", b,
                             "): the sequence must be empty");
        check_room(b, n);
        lengths_[static_cast<std::size_t>(b)] = n;
        prefix_[static_cast<std::size_t>(b)] = n;
    }
    /// Keeps the first n tokens of sequence b, and its prefix (rolls back a rejected speculation, or re-runs a
    /// step). n = 0 also forgets the prefix.
    void truncate(index_t b, index_t n) {
        require<shape_error>(b >= 0 && b < batch_ && n >= 0 && n <= tokens(b), "kv_cache::truncate(", b, ", ", n,
                             "): sequence holds ", b >= 0 && b < batch_ ? tokens(b) : 0, " tokens");
        const auto i = static_cast<std::size_t>(b);
        if (n == 0) prefix_[i] = 0;
        lengths_[i] = prefix_[i] + n;
    }
    /// Forgets every sequence's tokens and prefix (storage is kept).
    void clear() noexcept {
        for (auto& l : lengths_) l = 0;
        for (auto& p : prefix_) p = 0;
    }

private:
    std::size_t offset(index_t b) const {
        require<shape_error>(b >= 0 && b < batch_, "kv_cache: sequence ", b, " out of range [0, ", batch_, ")");
        return static_cast<std::size_t>(b * capacity_ * kv_dim_);
    }

    index_t batch_ = 0, capacity_ = 0, kv_dim_ = 0;
    std::vector<index_t> lengths_, prefix_;
    aligned_buffer<float> k_, v_;
};

}  // namespace cpet::nn
