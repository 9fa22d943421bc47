// mma_kernel.cu -- the tensor-core kernel: a float32 convolution as 2:4 sparse bf16 MMAs of
// split operands (three products per pair of parts), from the MMA program (mma_program.hpp) and
// the input stretched as split parts (launch_split_stretch).
#include <algorithm>
#include <atomic>
#include <cstdint>

#include "async_copy.cuh"
#include "conv_cuda_kernels.hpp"
#include "cuda_check.cuh"
#include "dependent_launch.cuh"
#include "error.hpp"
#include "forward_checks.hpp"
#include "mma_program.hpp"

namespace escoin {
namespace {

constexpr int kThreads = int(kMmaWarps * 32);
constexpr int kFragments = int(kMmaWarpPositions / 8);  // n-fragments of 8 positions per warp
constexpr int kStepGroups = int(kMmaStepWords / 4);     // 16-byte words per lane and step

struct MmaParams {
  int64_t image_stride, channel_stride;
  int64_t readable;  // workspace words the copies may read: the batch's input and its slack
  int32_t in_channels, out_channels, chunk_channels, chunks, span, span_stride;
  int32_t tiles, plane_q, plane_w, out_width, out_plane;
  int32_t steps_word;  // where the program's steps start (mma_steps_word)
};

// d += a * b on the 2:4 sparse bf16 MMA (m16n8k32), metadata from lanes 4g and 4g + 1. Not
// volatile: the compiler may move MMAs of independent accumulators between dependent ones.
__device__ __forceinline__ void sparse_mma(float (&d)[4], const uint4& a, const uint32_t (&b)[4],
                                           uint32_t metadata) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),
        "r"(metadata));
#endif
}

// One step of the program as a lane holds it (mma_program.hpp): A's hi and lo parts of both
// 16-row halves, the metadata and the B columns' offsets.
struct StepWords {
  uint4 a_hi0, a_lo0, a_hi1, a_lo1;
  uint4 meta_offsets;  // metadata of both halves, offsets of columns 2t, 2t+1, 8+2t, 8+2t+1
  uint2 offsets_high;  // offsets of columns 16+2t, 16+2t+1, 24+2t, 24+2t+1 (then two zeros)
};

__device__ __forceinline__ StepWords load_step(const uint4* __restrict__ steps, int step,
                                               int lane) {
  const uint4* words = steps + int64_t(step) * kStepGroups * 32 + lane;
  return StepWords{__ldg(words),      __ldg(words + 32),  __ldg(words + 64),
                   __ldg(words + 96), __ldg(words + 128),
                   __ldg(reinterpret_cast<const uint2*>(words + 160))};
}

// Where a thread's 16-byte copies of a chunk fall: the thread copies words [w, w + 4) of the
// chunk's channel c, then every kThreads-th copy after it. The same for every chunk, so the
// division that places the first copy runs once; the later ones are found by adding (dividing
// per copy took ~50 instructions a copy; without it vgg.c3_2 runs 7% fewer instructions).
struct CopyWalk {
  int c, w;            // the thread's first copy
  int c_step, w_step;  // how far the next one is: kThreads copies further
};

__device__ __forceinline__ CopyWalk copy_walk(const MmaParams& p) {
  const int per_channel = p.span / 4;
  const int c = int(threadIdx.x) / per_channel;
  const int c_step = kThreads / per_channel;
  return CopyWalk{c, (int(threadIdx.x) - c * per_channel) * 4, c_step,
                  (kThreads - c_step * per_channel) * 4};
}

// The thread's copies of one chunk, from `at` (words into the input) and `to` (a shared-memory
// address). CHECKED: words past `readable` read as zeros (only chunks that reach the input's
// end need it, so the others skip that arithmetic).
template <bool CHECKED>
__device__ __forceinline__ void walk_copies(const uint32_t* __restrict__ input,
                                            const MmaParams& p, const CopyWalk& walk,
                                            int channels, int64_t at, unsigned to) {
  // Moving on by kThreads copies: c_step channels and w_step words, and one channel more where
  // the words pass the span.
  const int64_t at_step = int64_t(walk.c_step) * p.channel_stride + walk.w_step;
  const int64_t at_wrap = p.channel_stride - p.span;
  const unsigned to_step = unsigned(walk.c_step * p.span_stride + walk.w_step) * 4;
  const unsigned to_wrap = unsigned(p.span_stride - p.span) * 4;
  const uint32_t* from = input + at;
  for (int c = walk.c, w = walk.w; c < channels;) {
    int bytes = 16;
    if (CHECKED) {
      const int64_t left = p.readable - (from - input);
      bytes = left >= 4 ? 16 : left > 0 ? int(left) * 4 : 0;
    }
    copy_16_bytes(to, bytes ? from : input, bytes);
    c += walk.c_step;
    w += walk.w_step;
    from += at_step;
    to += to_step;
    if (w >= p.span) {
      w -= p.span;
      ++c;
      from += at_wrap;
      to += to_wrap;
    }
  }
}

// Copies chunk `chunk` of image n's spans for the block's positions [q0, q0 + span) into
// `buffer`, as one group of 16-byte copies; words past `readable` read as zeros.
__device__ __forceinline__ void copy_chunk(const uint32_t* __restrict__ input, uint32_t* buffer,
                                           const MmaParams& p, const CopyWalk& walk, int64_t n,
                                           int chunk, int q0) {
  const int first = chunk * p.chunk_channels;
  const int channels = min(p.chunk_channels, p.in_channels - first);
  const int64_t chunk_at = n * p.image_stride + int64_t(first) * p.channel_stride + q0;
  const int64_t at = chunk_at + int64_t(walk.c) * p.channel_stride + walk.w;
  const unsigned to =
      unsigned(__cvta_generic_to_shared(buffer + walk.c * p.span_stride + walk.w));
  if (chunk_at + int64_t(channels - 1) * p.channel_stride + p.span <= p.readable)
    walk_copies<false>(input, p, walk, channels, at, to);
  else
    walk_copies<true>(input, p, walk, channels, at, to);
  commit_copies();
}

// Block (x: kMmaTilesPerBlock tiles of kMmaRows output channels, y: a run of kMmaPositions
// positions, z: the image). Warp w computes positions
// [q0 + 32 (w % 4), q0 + 32 (w % 4) + 32) of tile w / 4's 32 channels: per step, for each of its
// four n-fragments of 8 positions, 8 shared-memory loads make the split B fragment (hi and lo
// registers) and six MMAs add the three products of both 16-row halves. Both tiles read the
// same copy of the input (half the copies per output of one tile a block).
__global__ void __launch_bounds__(kThreads, 2)
mma_conv_kernel(const uint32_t* __restrict__ input, const uint32_t* __restrict__ program,
                Epilogue e, float* __restrict__ y, MmaParams p) {
  extern __shared__ uint4 shared_words[];
  uint32_t* shared = reinterpret_cast<uint32_t*>(shared_words);
  const int buffer_words = p.chunk_channels * p.span_stride;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int32_t* begins = reinterpret_cast<const int32_t*>(program) + kMmaHeaderWords;
  const uint4* steps = reinterpret_cast<const uint4*>(program + p.steps_word);
  const int tile = blockIdx.x * int(kMmaTilesPerBlock) + warp / int(kMmaWarpsPerTile);
  const int warp_in_tile = warp % int(kMmaWarpsPerTile);
  // An odd tile count leaves the last block's second tile empty: its warps copy and wait only.
  const bool computes = tile < p.tiles;
  const int q0 = blockIdx.y * int(kMmaPositions);
  const int64_t n = blockIdx.z;
  wait_for_previous_grid();  // the stretched input
  float sums[2][kFragments][4] = {};
  // The tile's steps run on from chunk to chunk, and the source asks for each step's words
  // during the previous step (loaded at the step's start, a third of them waited on L2: ncu, L1
  // hit rate 66%). At 128 registers ptxas issues those loads only after most of the previous
  // step's MMAs (benchmarks/sass_loops.py); even so batch 1 gained 5%. The last step loads
  // itself again rather than read past the tile's steps.
  const int tile_last = computes ? __ldg(begins + (tile + 1) * p.chunks) - 1 : -1;
  StepWords next{};
  if (computes && tile_last >= __ldg(begins + tile * p.chunks))
    next = load_step(steps, __ldg(begins + tile * p.chunks), lane);
  const CopyWalk walk = copy_walk(p);
  copy_chunk(input, shared, p, walk, n, 0, q0);
  for (int chunk = 0; chunk < p.chunks; ++chunk) {
    if (chunk + 1 < p.chunks)
      copy_chunk(input, shared + (chunk + 1) % 2 * buffer_words, p, walk, n, chunk + 1, q0);
    else
      commit_copies();  // an empty group, so that the wait below leaves none pending
    wait_copies<1>();
    __syncthreads();  // every thread's copies of this chunk have landed
    const uint32_t* buffer = shared + chunk % 2 * buffer_words + warp_in_tile * 32 + g;
    const int step_end = computes ? __ldg(begins + tile * p.chunks + chunk + 1) : 0;
    const int step_begin = computes ? __ldg(begins + tile * p.chunks + chunk) : 0;
    for (int step = step_begin; step < step_end; ++step) {
      const StepWords current = next;
      next = load_step(steps, min(step + 1, tile_last), lane);
      const uint4 &a_hi0 = current.a_hi0, &a_lo0 = current.a_lo0;
      const uint4 &a_hi1 = current.a_hi1, &a_lo1 = current.a_lo1;
      const uint4& meta_offsets = current.meta_offsets;
      const uint32_t offset_words[4] = {meta_offsets.z, meta_offsets.w,
                                        current.offsets_high.x, current.offsets_high.y};
#pragma unroll
      for (int f = 0; f < kFragments; ++f) {
        uint32_t hi[4], lo[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const uint32_t first = buffer[(offset_words[r] & 0xffffu) + 8 * f];
          const uint32_t second = buffer[(offset_words[r] >> 16) + 8 * f];
          hi[r] = __byte_perm(first, second, 0x5410);
          lo[r] = __byte_perm(first, second, 0x7632);
        }
        // The tensor cores' float32 accumulation truncates, so a step's products leave them
        // into the sums (ordinary rounding) at once: the error stays near the parts' own
        // (the accuracy probe on an H100, K = 2304: 4.2e-6 with sums every 4 steps, 5.6e-6
        // left on the tensor cores), and only one fragment's products hold registers.
        float products[2][4] = {};
        sparse_mma(products[0], a_hi0, hi, meta_offsets.x);
        sparse_mma(products[1], a_hi1, hi, meta_offsets.y);
        sparse_mma(products[0], a_hi0, lo, meta_offsets.x);
        sparse_mma(products[1], a_hi1, lo, meta_offsets.y);
        sparse_mma(products[0], a_lo0, hi, meta_offsets.x);
        sparse_mma(products[1], a_lo1, hi, meta_offsets.y);
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int i = 0; i < 4; ++i) sums[h][f][i] += products[h][i];
      }
    }
    __syncthreads();  // this buffer is read before the next chunk but one is copied into it
  }
  // D fragment: rows g and g + 8 of each half, positions 2t and 2t + 1 of each fragment.
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int m = tile * int(kMmaRows) + 16 * h + g + 8 * (i / 2);
      if (!computes || m >= p.out_channels) continue;
      const float bias = e.bias ? __ldg(e.bias + m) : 0.f;
#pragma unroll
      for (int f = 0; f < kFragments; ++f) {
        const int q = q0 + warp_in_tile * int(kMmaWarpPositions) + 8 * f + 2 * t + i % 2;
        const int oh = q / p.plane_w, ow = q - oh * p.plane_w;
        if (q >= p.plane_q || ow >= p.out_width) continue;
        const int64_t out = (n * p.out_channels + m) * p.out_plane + oh * p.out_width + ow;
        y[out] = bias_relu(with_residual(sums[h][f][i], e.residual, out), bias, e.relu);
      }
    }
}

constexpr size_t kSharedBytes = size_t(kMmaSharedWords) * sizeof(uint32_t);

// Lets the kernel use its shared memory on the current device, once per device.
void prepare_device() {
  static std::atomic<int64_t> known[64] = {};
  once_per_device(known, [](int) -> int64_t {
    check_cuda(cudaFuncSetAttribute(reinterpret_cast<const void*>(&mma_conv_kernel),
                                    cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    int(kSharedBytes)),
               "cudaFuncSetAttribute");
    return 1;
  });
}

// Whether the kernel's code here has its MMAs: compiled for sm_80 or newer (ptxVersion is the
// virtual architecture of the code the device runs; below 80 the kernel is empty).
bool mma_code_runs() {
  static std::atomic<int64_t> known[64] = {};  // 1: no, 2: yes
  return once_per_device(known, [](int) -> int64_t {
           cudaFuncAttributes attributes{};
           check_cuda(cudaFuncGetAttributes(&attributes,
                                            reinterpret_cast<const void*>(&mma_conv_kernel)),
                      "cudaFuncGetAttributes");
           return attributes.ptxVersion >= 80 ? 2 : 1;
         }) == 2;
}

}  // namespace

void launch_mma_conv(const Geometry& g, const uint32_t* input, const uint32_t* program,
                     const Epilogue& epilogue, float* y, cudaStream_t stream) {
  const MmaPlan plan = mma_plan(g);
  const escoin_layout_t& L = g.mma_layout;
  MmaParams p;
  p.image_stride = L.image_stride;
  p.channel_stride = L.channel_stride;
  p.readable = g.d.batch * L.image_stride + g.tail_slack;
  p.in_channels = int32_t(g.d.in_channels);
  p.out_channels = int32_t(g.d.out_channels);
  p.chunk_channels = int32_t(plan.chunk_channels);
  p.chunks = int32_t(plan.chunks);
  p.span = int32_t(plan.span);
  p.span_stride = int32_t(plan.span_stride);
  p.tiles = int32_t(plan.tiles);
  p.steps_word = int32_t(mma_steps_word(plan));
  p.plane_q = int32_t(L.out_height * L.plane_w);
  p.plane_w = int32_t(L.plane_w);
  p.out_width = int32_t(L.out_width);
  p.out_plane = int32_t(g.out_plane);
  if (!mma_code_runs())
    fail_invalid("the tensor-core kernel needs a GPU of compute capability 8.0 or newer and a "
                 "build for one (this device runs code for an older architecture)");
  prepare_device();
  if (plan.position_tiles > 65535 || g.d.batch > 65535)
    fail_invalid("the tensor-core kernel takes at most 65535 images and 65535 runs of ",
                 kMmaPositions, " positions; got ", g.d.batch, " and ", plan.position_tiles);
  const dim3 grid(unsigned((plan.tiles + kMmaTilesPerBlock - 1) / kMmaTilesPerBlock),
                  unsigned(plan.position_tiles), unsigned(g.d.batch));
  launch_dependent(mma_conv_kernel, grid, dim3(kThreads),
                   size_t(2 * plan.chunk_channels * plan.span_stride) * sizeof(uint32_t), stream,
                   "mma_conv_kernel", input, program, epilogue, y, p);
}

}  // namespace escoin

extern "C" escoin_status_t escoin_conv2d_forward_cuda_mma(
    const escoin_conv_desc_t* desc, escoin_dtype_t dtype, const void* x, const void* mma_program,
    const void* bias, const void* residual, int relu, void* y, void* workspace,
    size_t workspace_bytes, int device, void* stream) {
  return escoin::guarded([&] {
    const escoin::Geometry g = escoin::make_geometry(desc);
    if (dtype != ESCOIN_FLOAT32)
      escoin::fail_invalid("dtype must be ESCOIN_FLOAT32 for the tensor-core kernel, got ",
                           static_cast<int>(dtype));
    escoin::check_forward_operands(g, dtype, x, mma_program, "mma_program", y, bias, residual,
                                   workspace, workspace_bytes, escoin::mma_workspace_bytes(g));
    if (g.d.batch == 0) return;
    if (!escoin::mma_kernel_runs(escoin::mma_plan(g)))
      escoin::fail_invalid("the tensor-core kernel cannot run this geometry (more than one "
                           "group, phase planes of a stride, or rows too long); "
                           "escoin_mma_program_size gives 0 for it");
    if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0)
      escoin::fail_invalid("workspace must be 16-byte aligned for the tensor-core kernel");
    escoin::DeviceScope scope(device);
    auto s = static_cast<cudaStream_t>(stream);
    auto* ws = static_cast<float*>(workspace);
    const escoin::Epilogue epilogue{static_cast<const float*>(bias),
                                    static_cast<const float*>(residual), relu != 0 ? 1 : 0};
    escoin::launch_split_stretch(g, static_cast<const float*>(x), ws, s);
    escoin::launch_mma_conv(g, reinterpret_cast<const uint32_t*>(ws),
                            static_cast<const uint32_t*>(mma_program), epilogue,
                            static_cast<float*>(y), s);
  });
}
