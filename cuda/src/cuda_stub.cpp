// cuda_stub.cpp -- the CUDA entries of a CPU-only build: each says that CUDA was not compiled in.
#include "error.hpp"

namespace {
escoin_status_t not_compiled() {
  escoin::set_last_error(
      "escoin was built without CUDA; rebuild with nvcc available (ESCOIN_CUDA=ON)");
  return ESCOIN_ERROR_NOT_COMPILED;
}
}  // namespace

extern "C" {
escoin_status_t escoin_conv2d_forward_cuda(const escoin_conv_desc_t*, escoin_dtype_t,
                                           const void*, const int64_t*, const int32_t*,
                                           const void*, const void*, const void*, const void*,
                                           int, void*, void*, size_t, int, void*) {
  return not_compiled();
}
escoin_status_t escoin_conv2d_forward_cuda_mma(const escoin_conv_desc_t*, escoin_dtype_t,
                                               const void*, const void*, const void*, const void*,
                                               int, void*, void*, size_t, int, void*) {
  return not_compiled();
}
int escoin_cuda_device_count(void) { return 0; }
escoin_status_t escoin_cuda_malloc(int, size_t, void**) { return not_compiled(); }
escoin_status_t escoin_cuda_free(int, void*) { return not_compiled(); }
escoin_status_t escoin_cuda_malloc_async(int, size_t, void*, void**) { return not_compiled(); }
escoin_status_t escoin_cuda_free_async(int, void*, void*) { return not_compiled(); }
escoin_status_t escoin_cuda_memcpy(int, void*, const void*, size_t, int) {
  return not_compiled();
}
escoin_status_t escoin_cuda_stream_synchronize(int, void*) { return not_compiled(); }
escoin_status_t escoin_cuda_pointer_device(const void*, int*) { return not_compiled(); }
escoin_status_t escoin_tile_program_write_weights(void*, const void*, size_t, const int64_t*,
                                                  const float*, int64_t, int, void*) {
  return not_compiled();
}
}
