// cpet/core/buffer.hpp — an owning, 64-byte aligned array.
//
// 64 bytes is one cache line and one AVX-512 register, so every packed panel and every row of an owning matrix
// starts on a line boundary and the kernels may use aligned loads where they choose to.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>
#include <utility>

namespace cpet {

inline constexpr std::size_t cache_line = 64;

/// Owning aligned storage for trivially copyable elements (float, int8_t, uint8_t, int32_t, ...).
/// Elements are value-initialised (zero) on construction; moves are O(1) and leave the source empty.
template <class T>
class aligned_buffer {
    static_assert(std::is_trivially_copyable_v<T>, "aligned_buffer holds trivially copyable elements only");

public:
    aligned_buffer() = default;
    explicit aligned_buffer(std::size_t n) { allocate(n); }
    aligned_buffer(const aligned_buffer& other) : aligned_buffer(other.size_) {
        if (size_) std::memcpy(data_, other.data_, size_ * sizeof(T));
    }
    aligned_buffer(aligned_buffer&& other) noexcept
        : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
    aligned_buffer& operator=(aligned_buffer other) noexcept {
        swap(other);
        return *this;
    }
    ~aligned_buffer() { std::free(data_); }

    void swap(aligned_buffer& other) noexcept {
        std::swap(data_, other.data_);
        std::swap(size_, other.size_);
    }

    /// Discards the content and holds `n` zeroed elements afterwards. An unchanged size keeps the allocation (and
    /// its pages: a buffer refilled every step, like a training tape, then costs a memset, not fresh pages).
    void reset(std::size_t n) {
        if (n == size_) {
            if (n) std::memset(static_cast<void*>(data_), 0, n * sizeof(T));
            return;
        }
        aligned_buffer fresh(n);
        swap(fresh);
    }

    T* data() noexcept { return data_; }
    const T* data() const noexcept { return data_; }
    std::size_t size() const noexcept { return size_; }
    bool empty() const noexcept { return size_ == 0; }
    T& operator[](std::size_t i) noexcept { return data_[i]; }
    const T& operator[](std::size_t i) const noexcept { return data_[i]; }
    T* begin() noexcept { return data_; }
    T* end() noexcept { return data_ + size_; }
    const T* begin() const noexcept { return data_; }
    const T* end() const noexcept { return data_ + size_; }

private:
    void allocate(std::size_t n) {
        if (n == 0) return;
        if (n > (std::size_t(-1) - cache_line) / sizeof(T)) throw std::bad_alloc();
        std::size_t bytes = (n * sizeof(T) + cache_line - 1) / cache_line * cache_line;
        data_ = static_cast<T*>(std::aligned_alloc(cache_line, bytes));
        if (!data_) throw std::bad_alloc();
        std::memset(static_cast<void*>(data_), 0, bytes);
        size_ = n;
    }

    T* data_ = nullptr;
    std::size_t size_ = 0;
};

}  // namespace cpet
