// tensor_copy.cu -- the tensor map through which Hopper's copy engine copies x into the staged
// kernel's shared memory with the padding added (StagedPlan::tensor_copy), so that no stretch
// runs. The driver's encoder is reached through the runtime, so nothing links the driver.
#include <cstdint>

#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled_v12000

#include "conv_cuda_kernels.hpp"

namespace escoin {
namespace {

// cuTensorMapEncodeTiled, looked up once; null where the driver has none.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encoder = [] {
    void* entry = nullptr;
    cudaDriverEntryPointQueryResult found{};
    const cudaError_t status = cudaGetDriverEntryPointByVersion(
        "cuTensorMapEncodeTiled", &entry, 12000, cudaEnableDefault, &found);
    return status == cudaSuccess && found == cudaDriverEntryPointSuccess
               ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(entry)
               : nullptr;
  }();
  return encoder;
}

}  // namespace

bool encode_tensor_copy(const Geometry& g, const float* x, CUtensorMap* x_map) {
  const StagedPlan& s = g.staged;
  if (!s.tensor_copy || reinterpret_cast<uintptr_t>(x) % 16 != 0 ||
      !staged_kernel_copies_tensors())
    return false;
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (!encode) return false;
  const escoin_conv_desc_t& d = g.d;
  // x as (W, H, C, N), innermost first; strides in bytes of the outer three dimensions (16-byte
  // multiples: in_width % 4 == 0 in a plan with tensor copies).
  const cuuint64_t dims[4] = {cuuint64_t(d.in_width), cuuint64_t(d.in_height),
                              cuuint64_t(d.in_channels), cuuint64_t(d.batch)};
  const cuuint64_t row = cuuint64_t(d.in_width) * sizeof(float);
  const cuuint64_t strides[3] = {row, row * cuuint64_t(d.in_height),
                                 row * cuuint64_t(d.in_height) * cuuint64_t(d.in_channels)};
  // A box: a stretched row's plane_w columns, a segment's rows, a chunk's channels, one image.
  const cuuint32_t box[4] = {cuuint32_t(s.layout.plane_w),
                             cuuint32_t(s.segment / s.layout.plane_w),
                             cuuint32_t(s.chunk_channels), 1};
  const cuuint32_t unit_steps[4] = {1, 1, 1, 1};
  // Out-of-bounds elements are filled with zeros (OOB_FILL_NONE); a box's neighbours in x are
  // read again by the next tile and chunk, so L2 keeps 128-byte lines of them.
  return encode(x_map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, const_cast<float*>(x), dims, strides,
                box, unit_steps, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
                CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace escoin
