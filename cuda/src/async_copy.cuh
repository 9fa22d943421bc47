// async_copy.cuh -- Ampere's asynchronous copies (cp.async, sm_80 and up): 16 bytes from global
// into shared memory without passing through registers, so that a thread can have all of its
// copies of a chunk in flight at once and wait for them together. Below sm_80 the same calls
// copy synchronously.
#pragma once

#include <cstdint>

namespace escoin {

// A 16-byte copy into shared memory (`shared`: its shared-memory address) of which the first
// `bytes` (a multiple of 4) come from `global`, the rest zeros.
__device__ __forceinline__ void copy_16_bytes(unsigned shared, const void* global, int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(shared), "l"(global),
               "r"(bytes)
               : "memory");
#else
  // A whole copy is one 16-byte load (global is then 16-byte aligned, as cp.async requires).
  uint4 w = make_uint4(0u, 0u, 0u, 0u);
  if (bytes == 16) {
    w = __ldg(static_cast<const uint4*>(global));
  } else {
    const auto* words = static_cast<const uint32_t*>(global);
    if (bytes > 0) w.x = __ldg(words);
    if (bytes > 4) w.y = __ldg(words + 1);
    if (bytes > 8) w.z = __ldg(words + 2);
  }
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(shared), "r"(w.x), "r"(w.y),
               "r"(w.z), "r"(w.w)
               : "memory");
#endif
}

// Closes the thread's copies issued since the last commit into one group.
__device__ __forceinline__ void commit_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

// Waits until at most PENDING of the thread's committed copy groups are unfinished (then the
// thread's own copies are visible to it; a block barrier makes them visible to the others).
template <int PENDING>
__device__ __forceinline__ void wait_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;" ::"n"(PENDING) : "memory");
#endif
}

}  // namespace escoin
