// error.hpp -- how the core reports failures across the C boundary.
//
// Internally, code throws escoin::Error (carrying a status and a message). Every C entry wraps
// its body in escoin::guarded(), which catches everything, stores the message in a thread-local
// buffer (read back by escoin_last_error) and returns the status. No exception crosses the C API.
#pragma once

#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "escoin/escoin.h"

namespace escoin {

class Error : public std::runtime_error {
 public:
  Error(escoin_status_t status, const std::string& message)
      : std::runtime_error(message), status_(status) {}
  escoin_status_t status() const { return status_; }

 private:
  escoin_status_t status_;
};

// Message parts: text and numbers. Formatting avoids iostreams on purpose: inserting a number
// into a std::ostringstream crashed inside the CUDA translation units on an H100 host (a locale
// facet that was never initialised), while std::to_string needs no locale object.
inline void append_part(std::string& out, const char* text) { out += text; }
inline void append_part(std::string& out, const std::string& text) { out += text; }
template <typename Number, typename = std::enable_if_t<std::is_arithmetic_v<Number>>>
void append_part(std::string& out, Number value) {
  out += std::to_string(value);
}

// Builds a message: fail_invalid("stride_h must be >= 1, got ", s).
template <typename... Parts>
std::string concat(const Parts&... parts) {
  std::string out;
  (append_part(out, parts), ...);
  return out;
}

template <typename... Parts>
[[noreturn]] void fail_invalid(const Parts&... parts) {
  throw Error(ESCOIN_ERROR_INVALID_ARGUMENT, concat(parts...));
}

void set_last_error(const std::string& message);

// Runs body(), translating any exception into a status and the thread-local error text.
template <typename Body>
escoin_status_t guarded(Body&& body) noexcept {
  try {
    set_last_error("");
    body();
    return ESCOIN_SUCCESS;
  } catch (const Error& e) {
    set_last_error(e.what());
    return e.status();
  } catch (const std::bad_alloc&) {
    set_last_error("out of host memory");
    return ESCOIN_ERROR_INTERNAL;
  } catch (const std::exception& e) {
    set_last_error(e.what());
    return ESCOIN_ERROR_INTERNAL;
  } catch (...) {
    set_last_error("unknown internal error");
    return ESCOIN_ERROR_INTERNAL;
  }
}

template <typename T>
void require_pointer(const T* ptr, const char* name) {
  if (ptr == nullptr) fail_invalid(name, " must not be NULL");
}

}  // namespace escoin
