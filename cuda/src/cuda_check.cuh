// cuda_check.cuh -- CUDA runtime errors as escoin::Error, and a guard that runs a scope on a
// given device and restores the caller's device afterwards.
#pragma once

#include <atomic>
#include <cstdint>

#include <cuda_runtime.h>

#include "error.hpp"

namespace escoin {

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw Error(ESCOIN_ERROR_CUDA, concat(what, ": ", cudaGetErrorName(status), ": ",
                                          cudaGetErrorString(status)));
}

// Reports a failed launch (bad configuration, missing kernel image for this GPU, ...).
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

// What compute() gives for the current device, worked out once per device: `cache` (a static of
// the caller's, zero-initialised) keeps it for devices 0..63; others compute it at every call.
// compute() must return a positive value (zero marks "not known yet").
template <typename Compute>
int64_t once_per_device(std::atomic<int64_t> (&cache)[64], Compute compute) {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  const bool cached = device >= 0 && device < 64;
  if (cached) {
    const int64_t known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  const int64_t value = compute(device);
  if (cached) cache[device].store(value, std::memory_order_relaxed);
  return value;
}

class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    int count = 0;
    check_cuda(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
    if (device < 0 || device >= count)
      fail_invalid("device must be in [0, ", count, "), got ", device);
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceScope() {
    int current = previous_;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace escoin
