// tile_program_weights.cu -- the staged kernel's program for new values, written on the device.
//
// A filter's values change every training step and its pattern does not; every word of a tile
// program but its weights depends on the pattern alone (escoin_tile_program_weight_slots). So the
// program of a step's values is the pattern's program (a layout, uploaded once) copied, with each
// value stored at its word: a copy and one small kernel queued on the caller's stream, where
// building on the host cost a copy of the values back, a build and an upload, each a
// synchronisation.
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda_check.cuh"
#include "error.hpp"

namespace {

__global__ void store_weights(uint32_t* program, const int64_t* slots, const float* values,
                              int64_t count) {
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < count; j += step)
    program[slots[j]] = __float_as_uint(values[j]);
}

}  // namespace

extern "C" escoin_status_t escoin_tile_program_write_weights(void* program, const void* layout,
                                                             size_t bytes, const int64_t* slots,
                                                             const float* values, int64_t count,
                                                             int device, void* stream) {
  return escoin::guarded([&] {
    escoin::require_pointer(program, "program");
    escoin::require_pointer(layout, "layout");
    if (count < 0) escoin::fail_invalid("count must be >= 0, got ", count);
    if (count > 0) {
      escoin::require_pointer(slots, "slots");
      escoin::require_pointer(values, "values");
    }
    if (reinterpret_cast<uintptr_t>(program) % 16 != 0)
      escoin::fail_invalid("program must be 16-byte aligned (the forward reads it so)");
    escoin::DeviceScope scope(device);
    const cudaStream_t queue = static_cast<cudaStream_t>(stream);
    escoin::check_cuda(cudaMemcpyAsync(program, layout, bytes, cudaMemcpyDeviceToDevice, queue),
                       "cudaMemcpyAsync");
    if (count == 0) return;
    constexpr int threads = 256;
    // Enough blocks to fill an H100 several times over; the loop covers the rest.
    const int64_t blocks = (count + threads - 1) / threads;
    store_weights<<<unsigned(blocks < 4096 ? blocks : 4096), threads, 0, queue>>>(
        static_cast<uint32_t*>(program), slots, values, count);
    escoin::check_launch("store_weights");
  });
}
