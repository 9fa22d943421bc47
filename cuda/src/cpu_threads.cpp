// cpu_threads.cpp -- marks a forked child, whose OpenMP regions must stay serial (cpu_threads.hpp).
#include "cpu_threads.hpp"

#include <atomic>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

namespace escoin {
namespace {

std::atomic<bool> g_forked{false};

#if defined(__unix__) || defined(__APPLE__)
// Registered as the library loads (this file's object is linked wherever the kernels are).
const int g_registered = pthread_atfork(nullptr, nullptr, [] {
  g_forked.store(true, std::memory_order_relaxed);
});
#endif

}  // namespace

bool cpu_threads_usable() { return !g_forked.load(std::memory_order_relaxed); }

}  // namespace escoin
