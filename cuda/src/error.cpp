// error.cpp -- the thread-local last-error text behind escoin_last_error().
#include "error.hpp"

namespace {
thread_local std::string last_error_text;
}

namespace escoin {
void set_last_error(const std::string& message) { last_error_text = message; }
}  // namespace escoin

extern "C" const char* escoin_last_error(void) { return last_error_text.c_str(); }
