// cpet/io/mapped_file.hpp — a read-only memory mapping of a whole file (POSIX mmap), and the atomic replacement of
// a file (temporary file in the same folder, write, fsync, rename, fsync of the folder).
//
// A mapping is what makes safetensors zero-copy: tensor views point into the page cache and no byte is read before
// it is used. MAP_PRIVATE + PROT_READ: the process never writes through it, and a file replaced by rename() while
// mapped keeps the old inode alive, so views stay valid (truncating the file in place would not; cpet's own writer
// never does that).
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <span>
#include <string>
#include <utility>

#include "cpet/core/error.hpp"

namespace cpet::io {

namespace detail {

inline std::string errno_text(int e) { return std::string(std::strerror(e)); }

}  // namespace detail

/// The bytes of a file, mapped read-only. Move-only; an empty file maps to an empty span (mmap refuses length 0).
class mapped_file {
public:
    mapped_file() = default;
    explicit mapped_file(const std::filesystem::path& path) : path_(path.string()) {
        const int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) throw io_error(cpet::detail::concat(path_, ": cannot open for reading: ", detail::errno_text(errno)));
        struct stat st {};
        if (::fstat(fd, &st) != 0) {
            const int e = errno;
            ::close(fd);
            throw io_error(cpet::detail::concat(path_, ": cannot stat: ", detail::errno_text(e)));
        }
        if (!S_ISREG(st.st_mode)) {
            ::close(fd);
            throw io_error(cpet::detail::concat(path_, ": not a regular file"));
        }
        size_ = static_cast<std::size_t>(st.st_size);
        if (size_ > 0) {
            void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
            if (p == MAP_FAILED) {
                const int e = errno;
                ::close(fd);
                throw io_error(cpet::detail::concat(path_, ": cannot map ", size_, " bytes: ", detail::errno_text(e)));
            }
            data_ = static_cast<const std::byte*>(p);
        }
        ::close(fd);  // the mapping keeps the file alive
    }
    mapped_file(const mapped_file&) = delete;
    mapped_file& operator=(const mapped_file&) = delete;
    mapped_file(mapped_file&& o) noexcept
        : path_(std::move(o.path_)), data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
    mapped_file& operator=(mapped_file&& o) noexcept {
        if (this != &o) {
            unmap();
            path_ = std::move(o.path_);
            data_ = std::exchange(o.data_, nullptr);
            size_ = std::exchange(o.size_, 0);
        }
        return *this;
    }
    ~mapped_file() { unmap(); }

    std::span<const std::byte> bytes() const noexcept { return {data_, size_}; }
    const std::string& path() const noexcept { return path_; }

private:
    void unmap() noexcept {
        if (data_) ::munmap(const_cast<std::byte*>(data_), size_);
        data_ = nullptr;
        size_ = 0;
    }
    std::string path_;
    const std::byte* data_ = nullptr;
    std::size_t size_ = 0;
};

/// Called by atomic_write after each chunk with (bytes written so far, total): a progress report, and the test
/// hook that simulates an interrupted write by throwing.
using write_progress = std::function<void(std::uint64_t written, std::uint64_t total)>;

/// Writes `total` bytes produced by `emit(sink)` to `path` atomically: into a temporary file beside it, then
/// fsync, rename over `path`, fsync of the folder. If anything throws (emit, the progress hook, a full disk), the
/// temporary file is removed and `path` is left exactly as it was. `emit` calls sink(ptr, n) for each piece.
template <class Emit>
void atomic_write(const std::filesystem::path& path, std::uint64_t total, Emit&& emit,
                  const write_progress& progress = {}) {
    namespace fs = std::filesystem;
    const fs::path dir = path.has_parent_path() ? path.parent_path() : fs::path(".");
    std::string leaf(1, '.');
    leaf += path.filename().string();
    leaf += ".tmp.XXXXXX";
    std::string tmpl = (dir / leaf).string();
    const int fd = ::mkstemp(tmpl.data());
    if (fd < 0)
        throw io_error(cpet::detail::concat(path.string(), ": cannot create a temporary file in ", dir.string(), ": ",
                                            detail::errno_text(errno)));
    struct guard {
        int fd;
        std::string tmp;
        bool done = false;
        ~guard() {
            if (fd >= 0) ::close(fd);
            if (!done) ::unlink(tmp.c_str());
        }
    } g{fd, tmpl};
    std::uint64_t written = 0;
    auto sink = [&](const void* p, std::size_t n) {
        const auto* b = static_cast<const char*>(p);
        while (n > 0) {
            // Chunks of at most 64 MiB so the progress hook sees a large tensor in several pieces.
            const std::size_t chunk = n < (std::size_t(64) << 20) ? n : (std::size_t(64) << 20);
            const ssize_t w = ::write(g.fd, b, chunk);
            if (w < 0) {
                if (errno == EINTR) continue;
                throw io_error(cpet::detail::concat(path.string(), ": write failed after ", written, " of ", total,
                                                    " bytes: ", detail::errno_text(errno)));
            }
            b += w;
            n -= static_cast<std::size_t>(w);
            written += static_cast<std::uint64_t>(w);
            if (progress) progress(written, total);
        }
    };
    emit(sink);
    if (written != total)
        throw io_error(cpet::detail::concat(path.string(), ": internal: wrote ", written, " bytes, expected ", total));
    if (::fsync(g.fd) != 0)
        throw io_error(cpet::detail::concat(path.string(), ": fsync failed: ", detail::errno_text(errno)));
    // mkstemp creates 0600; give the file the mode a plain create would (0666 & ~umask).
    const mode_t mask = ::umask(0);
    ::umask(mask);
    ::fchmod(g.fd, 0666 & ~mask);
    const int cfd = std::exchange(g.fd, -1);
    if (::close(cfd) != 0)
        throw io_error(cpet::detail::concat(path.string(), ": close failed: ", detail::errno_text(errno)));
    if (::rename(g.tmp.c_str(), path.c_str()) != 0)
        throw io_error(cpet::detail::concat(path.string(), ": cannot rename the temporary file over it: ",
                                            detail::errno_text(errno)));
    g.done = true;
    // Make the rename itself durable; a failure here leaves a complete file, so it is not an error.
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        ::fsync(dfd);
        ::close(dfd);
    }
}

}  // namespace cpet::io
