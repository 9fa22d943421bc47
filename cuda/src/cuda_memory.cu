// cuda_memory.cu -- device memory helpers for callers without a framework (the NumPy-level API).
// These are not compute entries: they may allocate and synchronise.
#include <cuda_runtime.h>

#include "cuda_check.cuh"
#include "error.hpp"

extern "C" int escoin_cuda_device_count(void) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver / no device" error
    return 0;
  }
  return count;
}

extern "C" escoin_status_t escoin_cuda_malloc(int device, size_t bytes, void** ptr) {
  return escoin::guarded([&] {
    escoin::require_pointer(ptr, "ptr");
    escoin::DeviceScope scope(device);
    *ptr = nullptr;
    if (bytes > 0) escoin::check_cuda(cudaMalloc(ptr, bytes), "cudaMalloc");
  });
}

extern "C" escoin_status_t escoin_cuda_free(int device, void* ptr) {
  return escoin::guarded([&] {
    if (ptr == nullptr) return;
    escoin::DeviceScope scope(device);
    escoin::check_cuda(cudaFree(ptr), "cudaFree");
  });
}

extern "C" escoin_status_t escoin_cuda_malloc_async(int device, size_t bytes, void* stream,
                                                    void** ptr) {
  return escoin::guarded([&] {
    escoin::require_pointer(ptr, "ptr");
    escoin::DeviceScope scope(device);
    *ptr = nullptr;
    if (bytes > 0)
      escoin::check_cuda(cudaMallocAsync(ptr, bytes, static_cast<cudaStream_t>(stream)),
                         "cudaMallocAsync");
  });
}

extern "C" escoin_status_t escoin_cuda_free_async(int device, void* ptr, void* stream) {
  return escoin::guarded([&] {
    if (ptr == nullptr) return;
    escoin::DeviceScope scope(device);
    escoin::check_cuda(cudaFreeAsync(ptr, static_cast<cudaStream_t>(stream)), "cudaFreeAsync");
  });
}

extern "C" escoin_status_t escoin_cuda_memcpy(int device, void* dst, const void* src,
                                              size_t bytes, int kind) {
  return escoin::guarded([&] {
    if (bytes == 0) return;
    escoin::require_pointer(dst, "dst");
    escoin::require_pointer(src, "src");
    static const cudaMemcpyKind kinds[] = {cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost,
                                           cudaMemcpyDeviceToDevice};
    if (kind < 0 || kind > 2) escoin::fail_invalid("kind must be 0, 1 or 2, got ", kind);
    escoin::DeviceScope scope(device);
    escoin::check_cuda(cudaMemcpy(dst, src, bytes, kinds[kind]), "cudaMemcpy");
  });
}

extern "C" escoin_status_t escoin_cuda_stream_synchronize(int device, void* stream) {
  return escoin::guarded([&] {
    escoin::DeviceScope scope(device);
    escoin::check_cuda(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)),
                       "cudaStreamSynchronize");
  });
}

extern "C" escoin_status_t escoin_cuda_pointer_device(const void* ptr, int* device) {
  return escoin::guarded([&] {
    escoin::require_pointer(device, "device");
    cudaPointerAttributes attributes{};
    escoin::check_cuda(cudaPointerGetAttributes(&attributes, ptr), "cudaPointerGetAttributes");
    if (attributes.type != cudaMemoryTypeDevice && attributes.type != cudaMemoryTypeManaged)
      escoin::fail_invalid("the pointer is not CUDA device memory");
    *device = attributes.device;
  });
}
