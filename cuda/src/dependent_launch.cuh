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
#include <cstdint>
#include <utility>

#include <cuda_runtime.h>

#include "cuda_check.cuh"

namespace escoin {

__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Whether the current device runs Hopper's code of this build: it has compute capability 9.0 or
// up, and the code it runs was compiled for a virtual architecture of 9.0 and up (a build for
// sm_80 only runs on an H100 as JIT-compiled compute_80 PTX, where wait_for_previous_grid() is
// empty and there are no bulk copies). Kernels then launch as programmatic dependents, and the
// staged kernel may copy by tensor maps. Every kernel of a build is compiled for the same
// architectures, so `kernel` stands for all of them; looked up once per device.
inline bool hopper_code_runs(const void* kernel) {
  static std::atomic<int64_t> known[64] = {};  // 1: no, 2: yes
  return once_per_device(known, [kernel](int device) -> int64_t {
           int major = 0;
           check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
                      "cudaDeviceGetAttribute");
           cudaFuncAttributes attributes{};
           check_cuda(cudaFuncGetAttributes(&attributes, kernel), "cudaFuncGetAttributes");
           return major >= 9 && attributes.ptxVersion >= 90 ? 2 : 1;
         }) == 2;
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
  config.numAttrs = hopper_code_runs(reinterpret_cast<const void*>(kernel)) ? 1 : 0;
  check_cuda(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...), name);
}

}  // namespace escoin
