// cpet/core/error.hpp — the exception hierarchy every public entry point throws from.
//
// Hot loops never throw; shapes and formats are checked once at the entry of a call and the message names
// the operand together with the expected and the actual value, so a user can fix the call from the text alone.
#pragma once

#include <cstddef>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace cpet {

/// Base of every exception cpet throws on purpose.
class error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

/// An operand has the wrong shape (rows, columns, stride, a dimension that must divide another, ...).
class shape_error : public error {
public:
    using error::error;
};

/// A packed weight format or a configuration is malformed or unsupported.
class format_error : public error {
public:
    using error::error;
};

/// Non-finite or otherwise unusable numbers where finite ones are required.
class numeric_error : public error {
public:
    using error::error;
};

/// Reading or writing a file failed, or its content is not what it claims to be.
class io_error : public error {
public:
    using error::error;
};

namespace detail {

template <class... Parts>
std::string concat(Parts&&... parts) {
    std::ostringstream os;
    (os << ... << std::forward<Parts>(parts));
    return os.str();
}

}  // namespace detail

/// Throws `E` built from the streamed parts when `ok` is false; used at API entry points only.
template <class E = error, class... Parts>
inline void require(bool ok, Parts&&... parts) {
    if (!ok) throw E(detail::concat(std::forward<Parts>(parts)...));
}

}  // namespace cpet
