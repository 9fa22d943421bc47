// conv_cuda.cu -- the CUDA forward entry: stretch the input into the workspace (stretch_cuda.cu),
// then run a direct sparse convolution kernel on the caller's stream: the streaming kernel here or
// the staged one (tile_kernel.cu). Nothing here allocates or synchronises.
#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

#include "conv_cuda_kernels.hpp"
#include "cuda_check.cuh"
#include "dependent_launch.cuh"
#include "element_type.cuh"
#include "error.hpp"
#include "forward_checks.hpp"

namespace escoin {
namespace {

// Adds the SPLITS partial sums of each output in split order (deterministic), then the
// epilogue in float32, and writes the output as a T (element_type.cuh). The split count is a
// template parameter so that a thread issues only its own loads, all before the first add
// (sum_in_split_order): at batch 1 a layer's outputs are few and this kernel waits on load
// latency.
template <int SPLITS, typename T>
__global__ void reduce_splits_kernel(const float* __restrict__ partial,
                                     const T* __restrict__ bias, const T* __restrict__ residual,
                                     int relu, T* __restrict__ y, int64_t outputs,
                                     int64_t out_channels, int64_t out_plane) {
  wait_for_previous_grid();  // the partial sums
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < outputs;
       i += int64_t(gridDim.x) * blockDim.x)
    write_finished(sum_in_split_order(partial + i, outputs, SPLITS), y, i, bias,
                   [&] { return (i / out_plane) % out_channels; }, residual, relu);
}

// The same where the uneven staged launch has a tail (SplitTail): a tail job's outputs are added
// from the tail's sums. A kernel of its own, so that the reduction without a tail runs the code
// it ran before (with the tail's test and parameters in it, layers without a tail took 3-4%
// longer at batch 1 on an H200). The tail is looked for only from its first output in y on: this
// kernel is short of issue slots at batch 1, and a test of every output's job doubled its time.
template <int SPLITS, typename T>
__global__ void reduce_splits_and_tail_kernel(const float* __restrict__ partial,
                                              const T* __restrict__ bias,
                                              const T* __restrict__ residual, int relu,
                                              T* __restrict__ y, int64_t outputs,
                                              int64_t out_channels, int64_t out_plane,
                                              SplitTail tail) {
  wait_for_previous_grid();  // the partial sums
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < outputs;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t place = i >= tail.first ? tail_place(tail, int(i)) : -1;
    const float sum =
        place < 0 ? sum_in_split_order(partial + i, outputs, SPLITS)
                  : sum_in_split_order(tail.sums + place, tail.job_outputs, tail.tail_splits);
    write_finished(sum, y, i, bias, [&] { return (i / out_plane) % out_channels; }, residual,
                   relu);
  }
}

// Each kernel above for split counts 1 + i at index i, up to kGpuMaxSplits.
template <typename T, int... I>
constexpr auto reduce_kernels(std::integer_sequence<int, I...>) {
  return std::array{&reduce_splits_kernel<I + 1, T>...};
}
template <typename T, int... I>
constexpr auto reduce_and_tail_kernels(std::integer_sequence<int, I...>) {
  return std::array{&reduce_splits_and_tail_kernel<I + 1, T>...};
}
template <typename T>
constexpr auto kReduceKernels =
    reduce_kernels<T>(std::make_integer_sequence<int, int(kGpuMaxSplits)>{});
template <typename T>
constexpr auto kReduceAndTailKernels =
    reduce_and_tail_kernels<T>(std::make_integer_sequence<int, int(kGpuMaxSplits)>{});

// ---- the direct sparse convolution ----

// Output positions per block (consecutive q: coalesced reads) and output channels per block.
constexpr int kThreads = int(kGpuPositionsPerBlock);
constexpr int kChannelsPerBlock = int(kGpuChannelsPerBlock);
constexpr int kStage = 512;         // CSR entries staged in shared memory at a time

struct ConvParams {
  int64_t batch, out_channels, group_out, groups, channel_blocks;
  int64_t plane_q, plane_w, out_width, out_plane, image_stride, group_span;
  int64_t splits;  // ranges each row's nonzeros are split into (Geometry::gpu_splits)
  float* partial;  // splits > 1: partial sums [split][image][channel][out_plane]
};

// Block (x: a run of kThreads positions q, y: a block of output channels of one group and one
// split of their nonzeros, z: a run of IMAGES images). Each thread keeps IMAGES accumulators: one
// staged (value, offset) pair feeds IMAGES FMAs, the feature-map batching of Escoin. Unsplit, the
// block writes the output through the epilogue (y, bias and residual of element type T);
// split, it writes its partial sums.
template <int IMAGES, typename T>
__global__ void __launch_bounds__(kThreads)
sparse_conv_kernel(const float* __restrict__ input, const int64_t* __restrict__ row_ptr,
                   const int32_t* __restrict__ offsets, const float* __restrict__ values,
                   const T* __restrict__ bias, const T* __restrict__ residual, int relu,
                   T* __restrict__ y, ConvParams p) {
  __shared__ float stage_values[kStage];
  __shared__ int32_t stage_offsets[kStage];
  const int64_t q = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t oh = q / p.plane_w, ow = q % p.plane_w;
  const bool writes = q < p.plane_q && ow < p.out_width;
  const int64_t channel_items = p.groups * p.channel_blocks * p.splits;
  const int64_t image_items = (p.batch + IMAGES - 1) / IMAGES;

  for (int64_t split_item = blockIdx.y; split_item < channel_items; split_item += gridDim.y) {
    const int64_t split = split_item % p.splits, item = split_item / p.splits;
    const int64_t group = item / p.channel_blocks;
    const int64_t m_begin = group * p.group_out + (item % p.channel_blocks) * kChannelsPerBlock;
    const int64_t m_end = min(m_begin + kChannelsPerBlock, (group + 1) * p.group_out);
    for (int64_t image_item = blockIdx.z; image_item < image_items; image_item += gridDim.z) {
      const int64_t n0 = image_item * IMAGES;
      const float* in = input + n0 * p.image_stride + group * p.group_span + q;
      for (int64_t m = m_begin; m < m_end; ++m) {
        float acc[IMAGES] = {};
        const int64_t row_length = row_ptr[m + 1] - row_ptr[m];
        const int64_t row_begin = row_ptr[m] + row_length * split / p.splits;
        const int64_t row_end = row_ptr[m] + row_length * (split + 1) / p.splits;
        for (int64_t chunk = row_begin; chunk < row_end; chunk += kStage) {
          const int count = int(row_end - chunk < kStage ? row_end - chunk : kStage);
          __syncthreads();  // the previous chunk is consumed
          for (int i = threadIdx.x; i < count; i += kThreads) {
            stage_values[i] = values[chunk + i];
            stage_offsets[i] = offsets[chunk + i];
          }
          __syncthreads();
          if (q < p.plane_q) {
            for (int i = 0; i < count; ++i) {
              const float v = stage_values[i];
              const float* src = in + stage_offsets[i];
#pragma unroll
              for (int b = 0; b < IMAGES; ++b)
                if (n0 + b < p.batch) acc[b] = fmaf(v, __ldg(src + b * p.image_stride), acc[b]);
            }
          }
        }
        if (writes) {
          const float b0 = bias ? to_float(bias[m]) : 0.f;
#pragma unroll
          for (int b = 0; b < IMAGES; ++b) {
            if (n0 + b >= p.batch) continue;
            const int64_t out =
                ((n0 + b) * p.out_channels + m) * p.out_plane + oh * p.out_width + ow;
            if (p.splits > 1) {
              p.partial[split * p.batch * p.out_channels * p.out_plane + out] = acc[b];
            } else {
              y[out] = from_float<T>(bias_relu(with_residual(acc[b], residual, out), b0, relu));
            }
          }
        }
      }
    }
  }
}

unsigned grid_limit(int64_t wanted, int64_t limit) {
  return unsigned(std::max<int64_t>(1, std::min(wanted, limit)));
}

template <int IMAGES>
void launch_conv(const Geometry& g, const float* input, float* ws, const int64_t* row_ptr,
                 const int32_t* offsets, const float* values, const Output& out,
                 cudaStream_t stream) {
  ConvParams p;
  p.batch = g.d.batch;
  p.out_channels = g.d.out_channels;
  p.group_out = g.group_out;
  p.groups = g.d.groups;
  p.channel_blocks = (g.group_out + kChannelsPerBlock - 1) / kChannelsPerBlock;
  p.plane_w = g.layout.plane_w;
  p.plane_q = g.layout.out_height * g.layout.plane_w;
  p.out_width = g.layout.out_width;
  p.out_plane = g.out_plane;
  p.image_stride = g.layout.image_stride;
  p.group_span = g.group_span;
  p.splits = g.gpu_splits;
  p.partial = partial_sums(g, ws);
  const int64_t position_blocks = (p.plane_q + kThreads - 1) / kThreads;
  if (position_blocks > INT32_MAX) fail_invalid("the output plane is too large for one launch");
  const dim3 grid(unsigned(position_blocks),
                  grid_limit(p.groups * p.channel_blocks * p.splits, 65535),
                  grid_limit((p.batch + IMAGES - 1) / IMAGES, 65535));
  with_element_type(out.dtype, [&](auto element) {
    using T = decltype(element);
    sparse_conv_kernel<IMAGES, T><<<grid, kThreads, 0, stream>>>(
        input, row_ptr, offsets, values, static_cast<const T*>(out.bias),
        static_cast<const T*>(out.residual), out.relu, static_cast<T*>(out.y), p);
  });
  check_launch("sparse_conv_kernel");
  if (p.splits > 1) launch_reduce_splits(g, p.partial, p.splits, out, stream);
}

}  // namespace

void launch_reduce_splits(const Geometry& g, const float* partial, int64_t splits,
                          const Output& out, cudaStream_t stream, const SplitTail& tail) {
  const int64_t outputs = g.d.batch * g.d.out_channels * g.out_plane;
  if (splits < 1 || splits > kGpuMaxSplits)
    fail_invalid("splits must be in [1, ", kGpuMaxSplits, "], got ", splits);
  const dim3 grid(grid_limit((outputs + 255) / 256, 1 << 20));
  with_element_type(out.dtype, [&](auto element) {
    using T = decltype(element);
    const auto* bias = static_cast<const T*>(out.bias);
    const auto* residual = static_cast<const T*>(out.residual);
    if (tail.sums)
      launch_dependent(kReduceAndTailKernels<T>[size_t(splits - 1)], grid, dim3(256), 0, stream,
                       "reduce_splits_and_tail_kernel", partial, bias, residual, out.relu,
                       static_cast<T*>(out.y), outputs, g.d.out_channels, g.out_plane, tail);
    else
      launch_dependent(kReduceKernels<T>[size_t(splits - 1)], grid, dim3(256), 0, stream,
                       "reduce_splits_kernel", partial, bias, residual, out.relu,
                       static_cast<T*>(out.y), outputs, g.d.out_channels, g.out_plane);
  });
}

}  // namespace escoin

extern "C" escoin_status_t escoin_conv2d_forward_cuda(
    const escoin_conv_desc_t* desc, escoin_dtype_t dtype, const void* x, const int64_t* row_ptr,
    const int32_t* offsets, const void* values, const void* tile_program, const void* bias,
    const void* residual, int relu, void* y, void* workspace, size_t workspace_bytes, int device,
    void* stream) {
  return escoin::guarded([&] {
    const escoin::Geometry g = escoin::make_geometry(desc);
    if (dtype != ESCOIN_FLOAT32 && dtype != ESCOIN_FLOAT16 && dtype != ESCOIN_BFLOAT16)
      escoin::fail_invalid("dtype must be ESCOIN_FLOAT32, ESCOIN_FLOAT16 or ESCOIN_BFLOAT16 on "
                           "CUDA (float64 runs on the CPU entry), got ",
                           static_cast<int>(dtype));
    escoin::check_forward_operands(g, dtype, x, row_ptr, "row_ptr", y, bias, residual,
                                   workspace, workspace_bytes, escoin::workspace_bytes(g, dtype));
    // (nnz lies in device memory: row_ptr's own extent only.)
    escoin::check_filter_not_overwritten(g, dtype, row_ptr, offsets, values, 0, y, workspace,
                                         escoin::workspace_bytes(g, dtype));
    if (g.d.batch == 0) return;
    escoin::DeviceScope scope(device);  // (first: a bad device index is named before anything)
    escoin::check_alignment(escoin::element_size(dtype),
                            {{x, "x"}, {y, "y"}, {bias, "bias"}, {residual, "residual"}});
    escoin::check_alignment(sizeof(float), {{workspace, "workspace"}});  // float32 throughout
    if (reinterpret_cast<uintptr_t>(tile_program) % 16 != 0)  // row-group weights: float4s
      escoin::fail_invalid("tile_program must be 16-byte aligned, got address ",
                           uint64_t(reinterpret_cast<uintptr_t>(tile_program)));
    auto s = static_cast<cudaStream_t>(stream);
    auto ws = static_cast<float*>(workspace);
    const auto* v = static_cast<const float*>(values);
    const escoin::Output out{y, bias, residual, relu != 0 ? 1 : 0, dtype};
    // The staged kernel needs its program (from kTileMinBatch images: every batch) and 16-byte
    // aligned input for its 16-byte copies. It copies a float32 x itself where its plan's
    // layout is x's own and x is aligned; on Hopper it may copy x padded by a tensor map; in
    // both cases nothing is stretched. Else the stretch writes the layout of the kernel that
    // runs, unless that is the streaming kernel's and x already has it
    // (input_already_stretched). A 16-bit x is always stretched: the stretch widens it. So is
    // an x that y overlaps (out=x): blocks write y while others still read x.
    auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
    const bool x_in_place = dtype == ESCOIN_FLOAT32 &&
                            !escoin::output_overlaps_input(g, sizeof(float), x, y);
    const auto* xf = static_cast<const float*>(x);  // read as such only where x_in_place
    const bool reads_x = x_in_place && g.staged.reads_x && aligned(x);
    const bool staged = tile_program && g.d.batch >= escoin::kTileMinBatch &&
                        escoin::tile_kernel_fits(g) && aligned(reads_x ? x : ws);
    const bool direct = staged ? reads_x : x_in_place && escoin::input_already_stretched(g);
    const float* input = direct ? xf : ws;
    CUtensorMap x_map;
    const bool tensor_copy = staged && x_in_place && escoin::encode_tensor_copy(g, xf, &x_map);
    if (!direct && !tensor_copy) escoin::launch_stretch(g, staged, x, dtype, ws, s);
    if (staged)
      escoin::launch_tile_conv(g, tensor_copy ? xf : input, direct ? 0 : g.tail_slack, ws,
                               tensor_copy ? &x_map : nullptr,
                               static_cast<const int32_t*>(tile_program), out, s);
    else if (g.d.batch >= escoin::kGpuImagesPerBlock)
      escoin::launch_conv<int(escoin::kGpuImagesPerBlock)>(g, input, ws, row_ptr, offsets, v,
                                                           out, s);
    else
      escoin::launch_conv<1>(g, input, ws, row_ptr, offsets, v, out, s);
  });
}
