// dependent_launch.cuh -- programmatic dependent launch (Hopper): a forward pass is two or three
// kernels in a row (stretch, convolution, split reduction), and at batch 1 each is a few
// microseconds, so the gap between one kernel's end and the next one's start is a large share.
// A kernel launched with launch_dependent may be scheduled while the stream's previous kernel is
// still running; it must call wait_for_previous_grid() before it touches memory that any earlier
// work in the stream reads or writes (the wait returns once that kernel has completed and its
// writes are visible). The kernels do not signal their dependents early: a dependent is
// scheduled as the previous kernel's blocks exit, so the launch latency overlaps its tail (an
// early signal let waiting blocks take SM slots from the running kernel: slower at batch 1).
// Before sm_90 the wait compiles to nothing and kernels launch as usual.
#pragma once

#include <atomic>
#include <utility>

#include <cuda_runtime.h>

#include "cuda_check.cuh"

namespace escoin {

__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Whether the current device supports programmatic dependent launch (compute capability 9.0 and
// up), looked up once per device.
inline bool dependent_launch_supported() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> known[kMaxDevices] = {};  // 0 unknown, 1 no, 2 yes
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  if (device >= 0 && device < kMaxDevices && known[device].load(std::memory_order_relaxed) > 0)
    return known[device].load(std::memory_order_relaxed) == 2;
  int major = 0;
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
             "cudaDeviceGetAttribute");
  if (device >= 0 && device < kMaxDevices)
    known[device].store(major >= 9 ? 2 : 1, std::memory_order_relaxed);
  return major >= 9;
}

// Launches kernel<<<grid, block, shared, stream>>>(args...) as a programmatic dependent of the
// stream's previous kernel where the device supports it, else as a plain launch.
template <typename... Params, typename... Args>
void launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared,
                      cudaStream_t stream, const char* name, Args&&... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = dependent_launch_supported() ? 1 : 0;
  check_cuda(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...), name);
}

}  // namespace escoin
