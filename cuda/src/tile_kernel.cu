// tile_kernel.cu -- the staged sparse convolution kernel: chunks of input channels copied into
// shared memory, each block's output channels walking their nonzeros of the chunk as a tile
// program lists them (tile_program.hpp).
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstdint>

#include <cuda.h>  // CUtensorMap
#include <cuda/ptx>

#include "async_copy.cuh"
#include "conv_cuda_kernels.hpp"
#include "cuda_check.cuh"
#include "dependent_launch.cuh"
#include "element_type.cuh"
#include "error.hpp"
#include "fast_divide.cuh"
#include "tile_program.hpp"

namespace escoin {
namespace {

constexpr int kWarps = int(kStagedWarps);
constexpr int kRowsPerWarp = int(kStagedRowsPerWarp);
constexpr int kRows = int(kStagedRows);
constexpr int kThreads = 32 * kWarps;
// The block's shared memory: the chunk, then (SHARED_ENTRIES) each warp's slots for its current
// 32 entries of the filter (kSlotFloats: 32 (offset, weight) pairs in the rows form, 32 offsets
// and 32 x kRowsPerWarp weights in the row-group form), then the bulk copies' barrier. With the
// slots it is 54 KB, over the 48 KB a launch gets without opting in (prepare_device); four
// blocks still fit an H100's SM.
constexpr int kSlotFloats = (1 + kRowsPerWarp) * 32;
template <bool SHARED_ENTRIES>
constexpr int kEntryFloats = SHARED_ENTRIES ? kSlotFloats * kWarps : 0;
template <bool SHARED_ENTRIES>
constexpr size_t kSharedBytes =
    (size_t(kStagedSharedFloats) + kEntryFloats<SHARED_ENTRIES>) * sizeof(float) +
    sizeof(uint64_t);

struct StagedParams {
  int batch, out_channels, group_out, items_per_group, chunks, chunk_channels, group_in;
  int phases, phase_plane, segment;
  int segment_copied;  // of each segment, the part a tile of this launch reads (StagedLaunch)
  int whole_channels;  // StagedPlan::whole_channels: one copy per image of the chunk
  int plane_q, plane_w, out_width, out_plane, splits;
  int channel_stride;  // fits 32 bits: a group's channels do (make_geometry)
  int64_t image_stride, group_span, entries_word;
  int64_t readable;  // elements of the input from its start that may be read
  // Partial sums: a split's at [split][image][channel][plane] (the even form's, and the uneven
  // form's lead jobs'); a tail block's at tail_partial[tail block][tail_block_outputs] (a tail
  // job's blocks are adjacent).
  float* partial;
  float* tail_partial;
  // How jobs go to blocks (StagedLaunch): with tail_splits 0 (the even form) the grid is tiles x
  // items * splits x image blocks; else one row, the first lead_jobs jobs in `splits` blocks each
  // (lead_blocks in all), then the others (the tail) in tail_splits blocks each.
  int tiles, items, lead_jobs, lead_blocks, tail_splits;
  FastDivisor by_tiles, by_items, by_tail_splits;  // a job's tile and item; a tail job's split
  int relu;
  const float* residual;  // Output::residual (with 16-bit outputs, of their type)
  int tensor_copy;  // chunks copied from x by the kernel's tensor map (StagedPlan::tensor_copy)
  int copy_align;   // StagedPlan::copy_align
  int pad_top, pad_left;  // pad_left: of the stretched layout, StagedPlan::lead included
  // Divisions by launch-time values, as multiply-highs (fast_divide.cuh): a signed 32-bit
  // division by a runtime value is ~20 instructions, which per output and per copied segment
  // was a third of the work of a small layer's block.
  FastDivisor by_phases, by_splits, by_items_per_group;
  FastDivisor by_plane_w;  // a position q's output row: q / plane_w
  // A chunk's segments per image: channels * phases (1 with whole channels), in every chunk but
  // the last, and in the last, which may hold fewer channels.
  FastDivisor by_segments_per_image, by_last_segments_per_image;
  escoin_dtype_t out_type;  // y's, bias's and residual's element type (element_type.cuh)
};

// Where image b's part of a chunk starts in shared memory: a fixed share of it, so that an
// entry's loads for every image use one address register and compile-time offsets (the staged
// plan keeps a chunk's per-image part, chunk_channels * phases * segment, within the share).
template <int IMAGES>
constexpr int kImageShare = int(staged_image_share(IMAGES));

// Hopper (sm_90) copies a chunk with the copy engine and an mbarrier; earlier GPUs, which have
// neither, with their threads. The wheel carries both.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define ESCOIN_BULK_COPY 1
#else
#define ESCOIN_BULK_COPY 0
#endif

// What both copies (bulk and by threads) need of chunk `chunk`: its first channel, its segments
// per image (channels * phases, 1 with whole channels; the last chunk may hold fewer channels)
// and the elements each segment copies.
struct ChunkShape {
  int c0;
  FastDivisor by_per_image;  // its divisor: the segments per image
  int length;
};

__device__ __forceinline__ ChunkShape chunk_shape(int chunk, const StagedParams& p) {
  const int c0 = chunk * p.chunk_channels;
  const int channels = min(p.chunk_channels, p.group_in - c0);
  return ChunkShape{c0,
                    chunk + 1 < p.chunks ? p.by_segments_per_image
                                         : p.by_last_segments_per_image,
                    p.whole_channels ? channels * p.segment : p.segment_copied};
}

// Segment s of a chunk's copy (images outermost, then channels, then phases): where it is read
// from, the copy_align boundary at or before its first stretched element, and where it goes in
// shared memory. With whole channels an image's chunk is one segment, copied from the tile's
// first position q0 (0 unless the launch cut the plan's one tile in two). (Tensor copies start
// at q0's row instead: stage_chunk.)
struct ChunkSegment {
  const float* src;
  float* dst;
};

template <int IMAGES>
__device__ __forceinline__ ChunkSegment chunk_segment(int s, const ChunkShape& chunk,
                                                      const float* in, float* tile, int n0,
                                                      int q0, const StagedParams& p) {
  const int b = IMAGES == 1 ? 0 : int(chunk.by_per_image.divide(uint32_t(s)));
  const int cp = s - b * int(chunk.by_per_image.divisor);
  const int c = int(p.by_phases.divide(uint32_t(cp))), phase = cp - c * p.phases;
  const int start = c * p.channel_stride + phase * p.phase_plane;  // < 2^31: within a group
  // channel_stride and q0 are multiples of copy_align, so only the phase can leave start
  // unaligned.
  return ChunkSegment{in + (n0 + b) * p.image_stride + int64_t(chunk.c0) * p.channel_stride + q0 +
                          (start & -p.copy_align),
                      tile + b * kImageShare<IMAGES> + cp * p.segment};
}

#if ESCOIN_BULK_COPY
// Copies chunk `chunk` of the block's IMAGES images into shared memory: per image, channel and
// phase, the first `segment_copied` of `segment` stretched elements from the copy_align boundary
// at or before position q0 (the tile program's offsets include that shift), or with whole channels
// the image's chunk at once. Each segment goes to the copy engine as one bulk copy
// (cp.async.bulk): a few instructions per segment instead of tens per 16 bytes, and no registers
// held. The copy takes its operands from uniform registers, so a warp issues its lanes' copies
// one lane at a time: segments are dealt to the warps in turn (segment s to warp s mod W, lane
// s / W mod 32), which keeps each warp's share of that serial issue short. (One lane per warp
// issuing every copy was 2x slower on a 1x1 layer: the waiting warps' polling took the issue
// slots.) Every thread of the block then arrives on `landed` with the bytes it
// started; the chunk is in shared memory once the barrier's phase completes. Images past the
// batch are not copied, and a segment is cut at the readable input (the end of x read
// directly, or of the workspace's slack): the elements left unwritten feed only positions past
// the plane, whose sums are never written.
//
// With tensor copies each image's chunk is one box of x through the tensor map: the chunk's
// channels (from the group's first, `channel0`), segment / plane_w stretched rows from the row
// of the tile's first position (`row0`), plane_w columns from -pad_left (pad_left + lead: the
// first column must be a multiple of 4, or the copy faults); the copy engine reads
// what falls outside x as zeros, which is the padding the stretch would have written. A box's
// rows land in shared memory plane_w elements apart, the chunk's channels `segment` apart: the
// staged layout, from the start of row0.
template <int IMAGES>
__device__ void stage_chunk(const float* __restrict__ input, const float* __restrict__ in,
                            float* tile, int n0, int chunk, int q0, const StagedParams& p,
                            uint64_t* landed, const CUtensorMap* x_map, int channel0, int row0) {
  namespace ptx = cuda::ptx;
  if (p.tensor_copy) {
    uint32_t bytes = 0;
    const int b = int(threadIdx.x);
    if (b < min(IMAGES, p.batch - n0)) {
      const int32_t corner[4] = {-p.pad_left, row0 - p.pad_top,
                                 channel0 + chunk * p.chunk_channels, n0 + b};
      ptx::cp_async_bulk_tensor(ptx::space_cluster, ptx::space_global,
                                tile + b * kImageShare<IMAGES>, x_map, corner, landed);
      bytes = uint32_t(p.chunk_channels * p.segment) * sizeof(float);
    }
    ptx::mbarrier_arrive_expect_tx(ptx::sem_release, ptx::scope_cta, ptx::space_shared, landed,
                                   bytes);
    return;
  }
  const ChunkShape shape = chunk_shape(chunk, p);
  const int segments = min(IMAGES, p.batch - n0) * int(shape.by_per_image.divisor);
  const float* const readable_end = input + p.readable;
  uint32_t bytes = 0;
  for (int s = int(threadIdx.x) / 32 + kWarps * (int(threadIdx.x) % 32); s < segments;
       s += kThreads) {
    const ChunkSegment segment = chunk_segment<IMAGES>(s, shape, in, tile, n0, q0, p);
    const int64_t readable = readable_end - segment.src;
    const int64_t elements = readable < shape.length ? readable : shape.length;
    if (elements < 4) continue;
    const uint32_t size = uint32_t(elements / 4 * 16);  // whole float4s
    ptx::cp_async_bulk(ptx::space_cluster, ptx::space_global, segment.dst, segment.src, size,
                       landed);
    bytes += size;
  }
  ptx::mbarrier_arrive_expect_tx(ptx::sem_release, ptx::scope_cta, ptx::space_shared, landed,
                                 bytes);
}
#else
// Before Hopper: the same copy by the block's threads, 16 bytes each per step, as Ampere's
// asynchronous copies (no registers held, and every copy of a thread in flight at once; the
// caller waits for them before its barrier completes the chunk). Segments are dealt to the warps
// in turn and a segment's 16-byte steps to its warp's lanes, so that a segment's place is worked
// out once per segment, not per 16 bytes (a flat loop over the chunk's steps divided per step, by
// the segment length and then in chunk_segment). A step past the readable input writes zeros.
// Below sm_80 the copies are synchronous (async_copy.cuh). (No tensor copies: the host uses them
// only where the running code is Hopper's.)
template <int IMAGES>
__device__ void stage_chunk(const float* __restrict__ input, const float* __restrict__ in,
                            float* tile, int n0, int chunk, int q0, const StagedParams& p,
                            uint64_t*, const CUtensorMap*, int, int) {
  const ChunkShape shape = chunk_shape(chunk, p);
  const int vectors = shape.length / 4;
  const int segments = min(IMAGES, p.batch - n0) * int(shape.by_per_image.divisor);
  const float* const readable_end = input + p.readable;
  for (int s = int(threadIdx.x) / 32; s < segments; s += kWarps) {
    const ChunkSegment segment = chunk_segment<IMAGES>(s, shape, in, tile, n0, q0, p);
    const unsigned dst = unsigned(__cvta_generic_to_shared(segment.dst));
    for (int v = int(threadIdx.x) % 32; v < vectors; v += 32) {
      const float* src = segment.src + 4 * v;
      const bool readable = src + 4 <= readable_end;
      copy_16_bytes(dst + 16 * v, readable ? src : input, readable ? 16 : 0);
    }
  }
  commit_copies();
}
#endif

// One entry (a nonzero of one output channel) applied to a thread's sums: its positions of each
// image times the weight, the inputs read at the entry's offset from the thread's lane.
template <int IMAGES, int POSITIONS>
__device__ __forceinline__ void apply_entry(float (&acc)[IMAGES][POSITIONS], const float* src,
                                            float w) {
#pragma unroll
  for (int b = 0; b < IMAGES; ++b)
#pragma unroll
    for (int i = 0; i < POSITIONS; ++i)
      acc[b][i] = fmaf(w, src[b * kImageShare<IMAGES> + 32 * i], acc[b][i]);
}

// One row-group entry (tile_program.hpp) applied to the sums of the warp's rows: each input value
// the thread reads feeds one FMA per row, weight w.x for row 0 to w.w for row 3.
template <int IMAGES, int POSITIONS>
__device__ __forceinline__ void apply_group_entry(float (&acc)[kRowsPerWarp][IMAGES][POSITIONS],
                                                  const float* src, float4 w) {
  static_assert(kRowsPerWarp == 4, "a row-group entry holds one float4 of weights");
#pragma unroll
  for (int b = 0; b < IMAGES; ++b)
#pragma unroll
    for (int i = 0; i < POSITIONS; ++i) {
      const float v = src[b * kImageShare<IMAGES> + 32 * i];
      acc[0][b][i] = fmaf(w.x, v, acc[0][b][i]);
      acc[1][b][i] = fmaf(w.y, v, acc[1][b][i]);
      acc[2][b][i] = fmaf(w.z, v, acc[2][b][i]);
      acc[3][b][i] = fmaf(w.w, v, acc[3][b][i]);
    }
}

// The element type of a staged kernel's y, bias and residual: float32, or with NARROW_Y
// float16 (whose 2 bytes also carry bfloat16: StagedParams::out_type says which).
template <bool NARROW_Y>
using YElement = std::conditional_t<NARROW_Y, __half, float>;

// Writes a thread's sums, plus the residual's element where RESIDUAL, finish(sum, row) each,
// into the planes (of element type T) of its warp's `channels` output channels (from
// `first_channel`) of each image of the block: the positions with a place in the plane
// (plane_offset >= 0).
template <bool RESIDUAL, int IMAGES, int POSITIONS, typename T, typename Finish>
__device__ __forceinline__ void write_sums(const float (&acc)[kRowsPerWarp][IMAGES][POSITIONS],
                                           T* planes, const int (&plane_offset)[POSITIONS],
                                           int first_channel, int channels, int n0,
                                           const StagedParams& p, Finish finish) {
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    if (r >= channels) break;
#pragma unroll
    for (int b = 0; b < IMAGES; ++b) {
      if (n0 + b >= p.batch) break;
      const int64_t plane = (int64_t(n0 + b) * p.out_channels + first_channel + r) * p.out_plane;
      T* const out = planes + plane;
      const T* const residual =
          RESIDUAL ? reinterpret_cast<const T*>(p.residual) + plane : nullptr;
#pragma unroll
      for (int i = 0; i < POSITIONS; ++i)
        if (plane_offset[i] >= 0)
          out[plane_offset[i]] = from_float<T>(finish(
              RESIDUAL ? acc[r][b][i] + to_float(__ldg(residual + plane_offset[i])) : acc[r][b][i],
              r));
    }
  }
}

// A tile's finished sums into y (of element type T): each output a bias add, the ReLU's select
// and a predicated store, with a residual one load more, the finish chosen once for the tile.
template <int IMAGES, int POSITIONS, typename T>
__device__ __forceinline__ void finish_tile(const float (&acc)[kRowsPerWarp][IMAGES][POSITIONS],
                                            const T* bias, T* y,
                                            const int (&plane_offset)[POSITIONS], int first_out,
                                            int channels, int n0, const StagedParams& p) {
  float channel_bias[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
    channel_bias[r] = bias && r < channels ? to_float(__ldg(bias + first_out + r)) : 0.f;
  if (p.residual)
    write_sums<true>(acc, y, plane_offset, first_out, channels, n0, p,
                     [&](float sum, int r) { return bias_relu(sum, channel_bias[r], p.relu); });
  else if (p.relu)
    write_sums<false>(acc, y, plane_offset, first_out, channels, n0, p,
                      [&](float sum, int r) { return bias_relu(sum, channel_bias[r], 1); });
  else
    write_sums<false>(acc, y, plane_offset, first_out, channels, n0, p,
                      [&](float sum, int r) { return sum + channel_bias[r]; });
}

// Where stretched position q goes in an output plane (oh * out_width + ow), or -1 past the plane
// or in a stretched row's padding.
__device__ __forceinline__ int plane_offset_of(int q, const StagedParams& p) {
  const int oh = int(p.by_plane_w.divide(uint32_t(q)));
  const int ow = q - oh * p.plane_w;
  return q < p.plane_q && ow < p.out_width ? oh * p.out_width + ow : -1;
}

// The chunks [begin, end) of split `split` of `splits` (by_splits divides by splits): an even
// share, the same for every job. chunks * splits < 2^31 (tile_kernel_fits; staged_launch for the
// tail's splits).
struct ChunkRange {
  int begin, end;
};
__device__ __forceinline__ ChunkRange split_chunks(int split, const FastDivisor& by_splits,
                                                   const StagedParams& p) {
  return ChunkRange{int(by_splits.divide(uint32_t(p.chunks * split))),
                    int(by_splits.divide(uint32_t(p.chunks * (split + 1))))};
}

// A block's part of one job (StagedLaunch): its tile's first position q0, its item, its first
// image n0, the chunks [chunk_begin, chunk_end), and the partial-sum slot (its split) its sums go
// to, or -1 where the block has the whole job and finishes its sums into y.
struct JobPart {
  int q0, item, n0, chunk_begin, chunk_end, slot;
};

// Job `job` (jobs are numbered tile fastest, then item, then image block) for tiles of
// tile_positions positions and blocks of `images` images: its q0, item and n0.
__device__ __forceinline__ JobPart job_at(int job, int tile_positions, int images,
                                          const StagedParams& p) {
  const int rest = int(p.by_tiles.divide(uint32_t(job)));
  const int image_block = int(p.by_items.divide(uint32_t(rest)));
  return JobPart{(job - rest * p.tiles) * tile_positions, rest - image_block * p.items,
                 image_block * images, 0, 0, -1};
}

// The block's part: in the even form its tile, item, split and image block from the grid's
// three axes; in the uneven form a lead job and its split, or a tail job and its split, from its
// place in the row. (A lead job's unsplit block finishes into y: slot -1.)
template <int IMAGES, int POSITIONS>
__device__ __forceinline__ JobPart block_part(const StagedParams& p) {
  if (p.tail_splits == 0) {
    const int item = int(p.by_splits.divide(blockIdx.y));
    const int split = int(blockIdx.y) - item * p.splits;
    const ChunkRange chunks = split_chunks(split, p.by_splits, p);
    return JobPart{int(blockIdx.x) * 32 * POSITIONS, item, int(blockIdx.z) * IMAGES,
                   chunks.begin, chunks.end, p.splits > 1 ? split : -1};
  }
  const int tail_block = int(blockIdx.x) - p.lead_blocks;
  if (tail_block < 0) {
    const int job = int(p.by_splits.divide(blockIdx.x));
    const int split = int(blockIdx.x) - job * p.splits;
    JobPart part = job_at(job, 32 * POSITIONS, IMAGES, p);
    const ChunkRange chunks = split_chunks(split, p.by_splits, p);
    part.chunk_begin = chunks.begin;
    part.chunk_end = chunks.end;
    part.slot = p.splits > 1 ? split : -1;
    return part;
  }
  const int tail_job = int(p.by_tail_splits.divide(uint32_t(tail_block)));
  const int split = tail_block - tail_job * p.tail_splits;
  JobPart part = job_at(p.lead_jobs + tail_job, 32 * POSITIONS, IMAGES, p);
  const ChunkRange chunks = split_chunks(split, p.by_tail_splits, p);
  part.chunk_begin = chunks.begin;
  part.chunk_end = chunks.end;
  part.slot = split;
  return part;
}

// A tail block's sums in the uneven form, into its partial sums (tail_block_outputs' order:
// image, then output channel, then position): every position, padding included, in coalesced
// stores.
template <int IMAGES, int POSITIONS>
__device__ __forceinline__ void write_tail_sums(
    const float (&acc)[kRowsPerWarp][IMAGES][POSITIONS], float* job_sums, int warp, int lane) {
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
    for (int b = 0; b < IMAGES; ++b)
#pragma unroll
      for (int i = 0; i < POSITIONS; ++i)
        job_sums[(b * kRows + warp * kRowsPerWarp + r) * 32 * POSITIONS + lane + 32 * i] =
            acc[r][b][i];
}

// Block (x: a tile of 32 * POSITIONS positions, y: an item (kRows output channels of one group)
// times a split of its chunks, z: IMAGES images; in the uneven form one row of lead jobs' and
// tail jobs' splits' blocks: block_part), kWarps warps. Thread `lane` of a warp computes
// positions q0 + lane + 32 * i of each image for its warp's kRowsPerWarp channels; an entry's
// loads are consecutive across the warp's lanes, so shared memory serves them without bank
// conflicts. (Blocks of two items, sharing each chunk between 64 channels, paid 5-15% on large
// grids while each entry was loaded in the loop; with the entries handed out by shuffles,
// one-item blocks were 2-6% faster there too.) A warp reads its rows' entries of a chunk row by
// row, or with ONE_RUN (1x1 filters, whose rows are short) as one run. y (and bias, residual)
// is float32, or with NARROW_Y of the 16-bit type p.out_type (a kernel of its own, so that the
// float32 kernels' code is what it was before 16-bit outputs).
template <int IMAGES, int POSITIONS, bool SHARED_ENTRIES, bool ONE_RUN, bool NARROW_Y>
__global__ void __launch_bounds__(kThreads, 4)
staged_conv_kernel(const float* __restrict__ input, const int32_t* __restrict__ program,
                   const YElement<NARROW_Y>* __restrict__ bias, YElement<NARROW_Y>* __restrict__ y,
                   StagedParams p, const __grid_constant__ CUtensorMap x_map) {
  extern __shared__ __align__(128) float4 shared4[];
  float* tile = reinterpret_cast<float*>(shared4);
  // Past the largest chunk (kStagedSharedFloats): with SHARED_ENTRIES each warp's slots for its
  // current 32 entries (rows: warp_entries; row groups: group_offsets, group_weights), then the
  // barrier that counts a chunk's bulk copies in.
  float* const slots = tile + kStagedSharedFloats + kSlotFloats * (threadIdx.x / 32);
  auto* warp_entries = reinterpret_cast<int2*>(slots);
  auto* group_offsets = reinterpret_cast<int*>(slots);
  auto* group_weights = reinterpret_cast<float4*>(slots + 32);
  auto* landed =
      reinterpret_cast<uint64_t*>(tile + kStagedSharedFloats + kEntryFloats<SHARED_ENTRIES>);
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const JobPart part = block_part<IMAGES, POSITIONS>(p);
  const int q0 = part.q0, item = part.item, n0 = part.n0;
  const int group = int(p.by_items_per_group.divide(uint32_t(item)));
  const int32_t* begins = program + kTileHeaderWords;
  const auto* entries = reinterpret_cast<const int2*>(program + p.entries_word);
  const float* in = input + group * p.group_span;
  // With tensor copies (Hopper only) a chunk starts at the row of the tile's first position,
  // `shift` elements before it.
#if ESCOIN_BULK_COPY
  const int row0 = int(p.by_plane_w.divide(uint32_t(q0)));
  const int shift = p.tensor_copy ? q0 - row0 * p.plane_w : 0;
#else
  constexpr int row0 = 0, shift = 0;
#endif

  float acc[kRowsPerWarp][IMAGES][POSITIONS];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
    for (int b = 0; b < IMAGES; ++b)
#pragma unroll
      for (int i = 0; i < POSITIONS; ++i) acc[r][b][i] = 0.f;

#if ESCOIN_BULK_COPY
  if (threadIdx.x == 0) {
    cuda::ptx::mbarrier_init(landed, kThreads);  // every thread arrives once per chunk
    cuda::ptx::fence_mbarrier_init(cuda::ptx::sem_release, cuda::ptx::scope_cluster);
  }
  uint32_t landed_phase = 0;
#endif
  wait_for_previous_grid();  // the stretched input, and the output an earlier kernel may read
  // The program's form (tile_program.hpp), and in the row-group form where its weights start.
  const bool grouped = __ldg(program) == kGroupedTileProgramMagic;
  const auto* group_offsets_in = program + p.entries_word;
  const auto* group_weights_in = reinterpret_cast<const float4*>(
      program + (p.entries_word + (grouped ? __ldg(program + 3) : 0) + 3) / 4 * 4);
  for (int chunk = part.chunk_begin; chunk < part.chunk_end; ++chunk) {
    __syncthreads();  // the previous chunk is consumed (and, at first, the barrier initialised)
    stage_chunk<IMAGES>(input, in, tile, n0, chunk, q0, p, landed, &x_map, group * p.group_in,
                        row0);
    const int32_t* row_begin =
        begins + (int64_t(item) * p.chunks + chunk) * kRows + warp * kRowsPerWarp;
    const float* lane_tile = tile + lane + shift;
    // Before waiting for the copy, lanes 0..kRowsPerWarp load the warp's rows' entry bounds,
    // then each lane one of the first 32 entries: the entries' load latency is paid under the
    // copy's, once per 32 entries, instead of once per few entries inside the loop. The loop
    // reads each 32 back from the warp's slots in shared memory, one broadcast load per entry
    // (SHARED_ENTRIES), or from their lanes by two shuffles.
    const int bound = lane <= kRowsPerWarp ? __ldg(row_begin + lane) : 0;
    auto wait_for_chunk = [&] {
#if ESCOIN_BULK_COPY
      while (!cuda::ptx::mbarrier_try_wait_parity(landed, landed_phase)) {
      }
      landed_phase ^= 1;
#else
      wait_copies<0>();
      __syncthreads();
#endif
    };
    // With SHARED_ENTRIES, puts the warp's current 32 entries in its slots: store() writes this
    // lane's, once the warp has consumed the previous ones. (Else the loop reads them from their
    // lanes by shuffles, and nothing is stored.)
    auto to_slots = [&](auto store) {
      if constexpr (SHARED_ENTRIES) {
        __syncwarp();
        store();
        __syncwarp();
      }
    };
    // Hands the warp's current 32 entries (`mine`, one a lane) to the loop, which applies the
    // j-th to a row's sums with apply(mine, j, sums).
    auto hand_over = [&](int2 mine) { to_slots([&] { warp_entries[lane] = mine; }); };
    auto apply = [&](int2 mine, int j, float (&row)[IMAGES][POSITIONS]) {
      if constexpr (SHARED_ENTRIES) {
        const int2 entry = warp_entries[j];
        apply_entry(row, lane_tile + entry.x, __int_as_float(entry.y));
      } else {
        apply_entry(row, lane_tile + __shfl_sync(~0u, mine.x, j),
                    __int_as_float(__shfl_sync(~0u, mine.y, j)));
      }
    };
    const int first = __shfl_sync(~0u, bound, 0);
    if (grouped) {
      // The warp's rows share one run of entries, 32 at a time, each next 32 loaded before the
      // current ones are applied, handed over as in the rows form (slots or shuffles).
      const int count = __shfl_sync(~0u, bound, kRowsPerWarp) - first;
      auto load = [&](int k, int& offset, float4& w) {
        offset = k < count ? __ldg(group_offsets_in + first + k) : 0;
        w = k < count ? __ldg(group_weights_in + first + k) : make_float4(0.f, 0.f, 0.f, 0.f);
      };
      int offset, ahead_offset;
      float4 w, ahead_w;
      load(lane, offset, w);
      wait_for_chunk();
      for (int base = 0; base < count; base += 32) {
        load(base + 32 + lane, ahead_offset, ahead_w);
        to_slots([&] {
          group_offsets[lane] = offset;
          group_weights[lane] = w;
        });
        const int n = min(32, count - base);
        for (int j = 0; j < n; ++j) {
          if constexpr (SHARED_ENTRIES) {
            apply_group_entry(acc, lane_tile + group_offsets[j], group_weights[j]);
          } else {
            apply_group_entry(acc, lane_tile + __shfl_sync(~0u, offset, j),
                              make_float4(__shfl_sync(~0u, w.x, j), __shfl_sync(~0u, w.y, j),
                                          __shfl_sync(~0u, w.z, j), __shfl_sync(~0u, w.w, j)));
          }
        }
        offset = ahead_offset;
        w = ahead_w;
      }
    } else if constexpr (ONE_RUN) {
      // The warp's rows' entries of the chunk as one run (the program stores its rows one after
      // another), 32 at a time however they fall into rows, each 32 loaded two before they are
      // applied: where rows are short (~6 entries a chunk with a 1x1 filter) one load and one
      // hand-over per 32 entries instead of per row.
      const int count = __shfl_sync(~0u, bound, kRowsPerWarp) - first;
      int2 mine = lane < count ? __ldg(entries + first + lane) : make_int2(0, 0);
      int2 ahead = 32 + lane < count ? __ldg(entries + first + 32 + lane) : make_int2(0, 0);
      wait_for_chunk();
      for (int base = 0; base < count; base += 32) {
        const int next = base + 64 + lane;
        const int2 later = next < count ? __ldg(entries + first + next) : make_int2(0, 0);
        hand_over(mine);
        // Each row's part of these 32: from where the previous row's ends to where its own
        // does (lane r + 1 holds where row r ends).
        const int row_end = min(max(bound - first - base, 0), 32);
        int begin = 0;
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          const int end = __shfl_sync(~0u, row_end, r + 1);
          for (int j = begin; j < end; ++j) apply(mine, j, acc[r]);
          begin = end;
        }
        mine = ahead;
        ahead = later;
      }
    } else {
      // Row by row, each row's entries 32 at a time, its first 32 loaded before the wait (as
      // many loads in flight as rows) and each next 32 before the current ones are applied.
      int row_first[kRowsPerWarp], count[kRowsPerWarp];
      int2 held[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        row_first[r] = r == 0 ? first : __shfl_sync(~0u, bound, r);
        count[r] = __shfl_sync(~0u, bound, r + 1) - row_first[r];
        held[r] = lane < count[r] ? __ldg(entries + row_first[r] + lane) : make_int2(0, 0);
      }
      wait_for_chunk();
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        int2 mine = held[r];
        for (int base = 0; base < count[r]; base += 32) {
          const int next = base + 32 + lane;
          const int2 ahead =
              next < count[r] ? __ldg(entries + row_first[r] + next) : make_int2(0, 0);
          hand_over(mine);
          const int n = min(32, count[r] - base);
          for (int j = 0; j < n; ++j) apply(mine, j, acc[r]);
          mine = ahead;
        }
      }
    }
  }

  // Where each of the thread's positions goes in an output plane: worked out once, not per
  // channel and image.
  int plane_offset[POSITIONS];
#pragma unroll
  for (int i = 0; i < POSITIONS; ++i)  // q < 2^31: plane_q <= INT32_MAX / 2 (tile_kernel_fits)
    plane_offset[i] = plane_offset_of(q0 + lane + 32 * i, p);
  const int first_channel = (item - group * p.items_per_group) * kRows + warp * kRowsPerWarp;
  const int channels = min(kRowsPerWarp, p.group_out - first_channel);  // the warp's, here
  const int first_out = group * p.group_out + first_channel;  // in all of y's channels
  // Split sums are finished by a second kernel (the even form's reduction, or the uneven form's
  // finish); a whole job's here, in y's type.
  if (part.slot >= 0) {
    constexpr int kTailBlockOutputs = IMAGES * kRows * 32 * POSITIONS;  // tail_block_outputs
    if (p.tail_splits > 0 && int(blockIdx.x) >= p.lead_blocks)
      write_tail_sums(
          acc, p.tail_partial + int64_t(int(blockIdx.x) - p.lead_blocks) * kTailBlockOutputs,
          warp, lane);
    else
      write_sums<false>(acc, p.partial + part.slot * (int64_t(p.batch) * p.out_channels *
                                                      p.out_plane),
                        plane_offset, first_out, channels, n0, p,
                        [](float sum, int) { return sum; });
    return;
  }
  if (NARROW_Y && p.out_type == ESCOIN_BFLOAT16)
    finish_tile(acc, reinterpret_cast<const __nv_bfloat16*>(bias),
                reinterpret_cast<__nv_bfloat16*>(y), plane_offset, first_out, channels, n0, p);
  else
    finish_tile(acc, bias, y, plane_offset, first_out, channels, n0, p);
}

// Finishes the tail jobs of the uneven form where its lead jobs are unsplit (StagedLaunch::
// tail_splits > 0, splits 1; split lead jobs leave the tail to the reduction: SplitTail): each
// output of such a job is the sum of its blocks' partial sums (`partial`: the tail's) in split
// order (deterministic, as the even form's reduction adds them), then the epilogue, written as
// a T. Block (x: 256 of a job's outputs in tail_block_outputs' order, y: a tail job); a job's
// tile is tile_positions positions of `images` images.
template <typename T>
__global__ void finish_tail_jobs_kernel(const float* __restrict__ partial,
                                        const T* __restrict__ bias,
                                        const T* __restrict__ residual, int relu,
                                        T* __restrict__ y, int tile_positions, int images,
                                        StagedParams p) {
  wait_for_previous_grid();  // the partial sums
  const int job_outputs = images * kRows * tile_positions;
  const int e = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (e >= job_outputs) return;
  const JobPart job = job_at(p.lead_jobs + int(blockIdx.y), tile_positions, images, p);
  const int row_image = e / tile_positions, row = row_image % kRows;
  const int q = job.q0 + e - row_image * tile_positions, n = job.n0 + row_image / kRows;
  const int group = int(p.by_items_per_group.divide(uint32_t(job.item)));
  const int channel = (job.item - group * p.items_per_group) * kRows + row;  // in the group
  const int offset = plane_offset_of(q, p);
  if (offset < 0 || channel >= p.group_out || n >= p.batch) return;
  const int64_t m = int64_t(group) * p.group_out + channel;
  const int64_t i = (int64_t(n) * p.out_channels + m) * p.out_plane + offset;
  const float* sums = partial + int64_t(blockIdx.y) * p.tail_splits * job_outputs + e;
  write_finished(sum_in_split_order(sums, job_outputs, p.tail_splits), y, i, bias,
                 [m] { return m; }, residual, relu);
}

template <bool NARROW_Y>
using StagedKernel = void (*)(const float*, const int32_t*, const YElement<NARROW_Y>*,
                              YElement<NARROW_Y>*, StagedParams, CUtensorMap);

// The launch shapes (StagedLaunch's images and positions) the staged kernel is compiled for, and
// the kernels, in the same order, in each form.
struct KernelShape {
  int64_t images, positions;
};
constexpr KernelShape kShapes[] = {{1, 8}, {1, 7}, {1, 4}, {1, 2}, {2, 4}, {2, 2}, {4, 2}};
constexpr size_t kShapeCount = sizeof(kShapes) / sizeof(kShapes[0]);
template <bool S, bool O, bool N>  // SHARED_ENTRIES, ONE_RUN, NARROW_Y
constexpr StagedKernel<N> kKernels[] = {
    &staged_conv_kernel<1, 8, S, O, N>, &staged_conv_kernel<1, 7, S, O, N>,
    &staged_conv_kernel<1, 4, S, O, N>, &staged_conv_kernel<1, 2, S, O, N>,
    &staged_conv_kernel<2, 4, S, O, N>, &staged_conv_kernel<2, 2, S, O, N>,
    &staged_conv_kernel<4, 2, S, O, N>};
static_assert(kShapeCount == sizeof(kKernels<true, true, true>) / sizeof(void*));
// The kernels of each form with one type of y, as [shared_entries][one_run].
template <bool N>
constexpr const StagedKernel<N>* kForms[2][2] = {
    {kKernels<false, false, N>, kKernels<false, true, N>},
    {kKernels<true, false, N>, kKernels<true, true, N>}};

// The kernel of shape kShapes[index] in a form: entries in shared memory or handed out by
// shuffles (prepare_device), and read as one run per warp or row by row (launch_tile_conv).
template <bool NARROW_Y>
StagedKernel<NARROW_Y> staged_kernel(bool shared_entries, bool one_run, size_t index) {
  return kForms<NARROW_Y>[shared_entries][one_run][index];
}

size_t kernel_index(const StagedLaunch& shape) {
  for (size_t i = 0; i < kShapeCount; ++i)
    if (kShapes[i].images == shape.images && kShapes[i].positions == shape.positions) return i;
  fail_invalid("no staged kernel for ", shape.images, " images and ", shape.positions,
               " positions per thread");
}

// Lets every kernel of a form use its shared memory on the current device; returns how many of
// its blocks an SM holds.
template <bool SHARED_ENTRIES>
int blocks_per_sm() {
  auto allow = [](const void* kernel) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    int(kSharedBytes<SHARED_ENTRIES>)),
               "cudaFuncSetAttribute");
  };
  for (size_t i = 0; i < kShapeCount; ++i)
    for (const bool one_run : {false, true}) {
      allow(reinterpret_cast<const void*>(staged_kernel<false>(SHARED_ENTRIES, one_run, i)));
      allow(reinterpret_cast<const void*>(staged_kernel<true>(SHARED_ENTRIES, one_run, i)));
    }
  int per_sm = 0;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                 &per_sm, kKernels<SHARED_ENTRIES, false, false>[0], kThreads,
                 kSharedBytes<SHARED_ENTRIES>),
             "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  return per_sm;
}

// What the staged kernels need to know of the current GPU.
struct DeviceShape {
  int64_t sms, blocks_per_sm;  // its SMs, and the blocks of the kernel each holds at once
  bool shared_entries;         // whether the SHARED_ENTRIES form runs (see prepare_device)
};

// The current GPU's shape for the staged kernels, worked out once per device. Each warp's entries
// in shared memory (one broadcast load per entry instead of two shuffles: 5% faster at batch 1 and
// 3% at batch 32 on an H100) take the block past 48 KB; that form runs where an SM still fits as
// many blocks (four of 54 KB on an H100), not where it would fit fewer (GPUs with 100 KB per SM
// fit two blocks of 48 KB, one of 54 KB). ESCOIN_SHUFFLED_ENTRIES=1 takes the shuffle form
// anyway, and leaves the kernels at 48 KB, so that the tests can run it on a GPU that would take
// the other (scripts/gpu_check.sh does).
DeviceShape prepare_device() {
  // (sms * 256 + blocks_per_sm) * 2 + shared_entries
  static std::atomic<int64_t> known[64] = {};
  const int64_t found = once_per_device(known, [](int device) -> int64_t {
    int sms = 0;
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
               "cudaDeviceGetAttribute");
    const char* shuffled = std::getenv("ESCOIN_SHUFFLED_ENTRIES");
    const int plain = blocks_per_sm<false>();
    const int with_entries = shuffled && shuffled[0] == '1' ? 0 : blocks_per_sm<true>();
    const bool shared_entries = with_entries >= plain;
    const int per_sm = std::clamp(shared_entries ? with_entries : plain, 1, 255);
    return (std::max<int64_t>(1, sms) * 256 + per_sm) * 2 + (shared_entries ? 1 : 0);
  });
  return DeviceShape{found / 512, found / 2 % 256, found % 2 == 1};
}

// The uneven launch's tail for the reduction, where its lead jobs split (SplitTail).
SplitTail split_tail(const Geometry& g, const StagedLaunch& shape, const StagedParams& p) {
  SplitTail t{};
  t.sums = p.tail_partial;
  t.lead_jobs = p.lead_jobs;
  t.tail_splits = p.tail_splits;
  t.job_outputs = int(tail_block_outputs(shape));
  t.tiles = p.tiles;
  t.items = p.items;
  t.items_per_group = p.items_per_group;
  t.tile_positions = int(32 * shape.positions);
  t.plane_w = p.plane_w;
  t.out_plane = p.out_plane;
  t.out_width = p.out_width;
  // The tail's first job: its row's image and channels (its planes), and its first tile's first
  // position's place in the plane (past the row's last place where that position is padding).
  const int row = p.lead_jobs / p.tiles, item = row % p.items;
  const int group = item / p.items_per_group;
  const int64_t first_channel = group * g.group_out + (item % p.items_per_group) * kRows;
  const int64_t past_channel = std::min(first_channel + kRows, (group + 1) * g.group_out);
  const int64_t first_plane = row / p.items * g.d.out_channels;
  t.first = (first_plane + first_channel) * p.out_plane;
  t.past_first_row = (first_plane + past_channel) * p.out_plane;
  const int first_q = (p.lead_jobs - row * p.tiles) * t.tile_positions;
  const int first_oh = first_q / p.plane_w;
  t.first_offset = first_oh * p.out_width + std::min(first_q - first_oh * p.plane_w, p.out_width);
  t.by_out_plane = FastDivisor::of(p.out_plane);
  t.by_out_channels = FastDivisor::of(g.d.out_channels);
  t.by_group_out = FastDivisor::of(g.group_out);
  t.by_out_width = FastDivisor::of(p.out_width);
  t.by_tile_positions = FastDivisor::of(t.tile_positions);
  return t;
}

}  // namespace

bool tile_kernel_fits(const Geometry& g) {
  const StagedPlan& s = g.staged;
  const int64_t plane_q = s.layout.out_height * s.layout.plane_w;
  return s.chunk_channels > 0 && (g.d.batch + s.images - 1) / s.images <= 65535 &&
         s.items * g.gpu_staged_splits <= 65535 && s.chunks * g.gpu_staged_splits <= INT32_MAX &&
         plane_q <= INT32_MAX / 2;
}

bool staged_kernel_copies_tensors() {
  return hopper_code_runs(reinterpret_cast<const void*>(kKernels<true, false, false>[0]));
}

void launch_tile_conv(const Geometry& g, const float* input, int64_t slack, float* ws,
                      const CUtensorMap* x_map, const int32_t* program, const Output& out,
                      cudaStream_t stream) {
  if (!tile_kernel_fits(g))  // the dispatcher checks first
    fail_invalid("the geometry is too large for the staged CUDA kernel");
  const StagedPlan& s = g.staged;
  const escoin_layout_t& L = s.layout;
  StagedParams p;
  p.batch = int(g.d.batch);
  p.out_channels = int(g.d.out_channels);
  p.group_out = int(g.group_out);
  p.items_per_group = int(s.items / g.d.groups);
  p.chunks = int(s.chunks);
  p.chunk_channels = int(s.chunk_channels);
  p.group_in = int(g.group_in);
  p.phases = int(s.phases);
  p.phase_plane = int(s.phase_plane);
  p.segment = int(s.segment);
  p.whole_channels = s.whole_channels ? 1 : 0;
  p.plane_q = int(L.out_height * L.plane_w);
  p.plane_w = int(L.plane_w);
  p.out_width = int(L.out_width);
  p.out_plane = int(g.out_plane);
  p.image_stride = L.image_stride;
  p.group_span = g.group_in * L.channel_stride;
  p.channel_stride = int(L.channel_stride);
  p.entries_word = tile_entries_word(s);
  p.readable = g.d.batch * L.image_stride + slack;
  p.partial = partial_sums(g, ws);
  p.relu = out.relu;
  p.residual = static_cast<const float*>(out.residual);  // (read as y's type)
  p.out_type = out.dtype;
  p.tensor_copy = x_map ? 1 : 0;
  p.copy_align = int(s.copy_align);
  p.pad_top = int(g.d.pad_top);
  p.pad_left = int(g.d.pad_left + s.lead);  // a multiple of 4 with tensor copies
  const CUtensorMap no_map{};  // passed, unread, when the kernel copies the stretched input
  p.by_phases = FastDivisor::of(s.phases);
  p.by_items_per_group = FastDivisor::of(p.items_per_group);
  p.by_plane_w = FastDivisor::of(p.plane_w);
  const int64_t last_channels = g.group_in - (s.chunks - 1) * s.chunk_channels;
  p.by_segments_per_image = FastDivisor::of(s.whole_channels ? 1 : s.chunk_channels * s.phases);
  p.by_last_segments_per_image = FastDivisor::of(s.whole_channels ? 1 : last_channels * s.phases);
  const DeviceShape device = prepare_device();
  const StagedLaunch shape = staged_launch(g, device.sms, device.blocks_per_sm);
  p.splits = int(shape.splits);
  p.by_splits = FastDivisor::of(shape.splits);
  p.tiles = int(staged_tiles(g, shape.positions));
  p.items = int(s.items);
  p.by_tiles = FastDivisor::of(p.tiles);
  p.by_items = FastDivisor::of(p.items);
  p.lead_jobs = int(shape.lead_jobs);
  p.lead_blocks = int(shape.lead_jobs * shape.splits);
  p.tail_splits = int(shape.tail_splits);
  p.tail_partial = p.partial + tail_partial_offset(g, shape);
  p.by_tail_splits = FastDivisor::of(std::max<int64_t>(shape.tail_splits, 1));
  // Whole channels are copied whole whatever the tile; segments as far as the tile reads.
  p.segment_copied =
      int(s.whole_channels ? s.segment : s.segment - 32 * (s.positions - shape.positions));
  const size_t index = kernel_index(shape);
  const int64_t jobs = staged_jobs(g, shape);
  const dim3 grid =
      shape.tail_splits > 0
          ? dim3(unsigned(p.lead_blocks + (jobs - shape.lead_jobs) * shape.tail_splits))
          : dim3(unsigned(p.tiles), unsigned(s.items * p.splits),
                 unsigned((g.d.batch + shape.images - 1) / shape.images));
  // A 1x1 filter gives each row ~6 entries a chunk at 90% sparsity (one tap per channel where a
  // 3x3 filter gives nine): its warps read their rows' entries as one run. Read so, the longer
  // rows of larger filters were 1-5% slower (each row's part of each 32 entries ends where it
  // may, which leaves the unrolled loop more remainders), the 1x1 layers 2-8% faster.
  const bool one_run = g.d.kernel_h * g.d.kernel_w == 1;
  const bool shared = device.shared_entries;
  auto launch = [&](auto kernel, const auto* bias, auto* y) {
    launch_dependent(kernel, grid, dim3(kThreads),
                     shared ? kSharedBytes<true> : kSharedBytes<false>, stream,
                     "staged_conv_kernel", input, program, bias, y, p, x_map ? *x_map : no_map);
  };
  if (out.dtype == ESCOIN_FLOAT32)
    launch(staged_kernel<false>(shared, one_run, index), static_cast<const float*>(out.bias),
           static_cast<float*>(out.y));
  else
    launch(staged_kernel<true>(shared, one_run, index), static_cast<const __half*>(out.bias),
           static_cast<__half*>(out.y));
  if (p.splits > 1)
    launch_reduce_splits(g, p.partial, p.splits, out, stream,
                         shape.tail_splits > 0 ? split_tail(g, shape, p) : SplitTail{});
  else if (shape.tail_splits > 0) {
    const int tile_positions = int(32 * shape.positions), images = int(shape.images);
    const dim3 finish_grid(unsigned((images * kRows * tile_positions + 255) / 256),
                           unsigned(jobs - shape.lead_jobs));
    with_element_type(out.dtype, [&](auto element) {
      using T = decltype(element);
      launch_dependent(&finish_tail_jobs_kernel<T>, finish_grid, dim3(256), 0, stream,
                       "finish_tail_jobs_kernel", p.tail_partial, static_cast<const T*>(out.bias),
                       static_cast<const T*>(out.residual), out.relu, static_cast<T*>(out.y),
                       tile_positions, images, p);
    });
  }
}

}  // namespace escoin
