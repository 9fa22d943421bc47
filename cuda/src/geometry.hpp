// geometry.hpp -- validated convolution geometry and the stretched input layout, shared by the
// CPU and CUDA forward paths.
#pragma once

#include <algorithm>
#include <cstdint>

#include "escoin/escoin.h"

namespace escoin {

// Kernels walk the output plane flattened in the stretched coordinates (q = oh * plane_w + ow)
// in tiles of up to kMaxTile elements. Dropped columns (ow >= out_width) of the last row, shifted
// by a tap's column offset, and a tile's overrun read past the last group's data: the workspace
// ends with Geometry::tail_slack zeroed elements so those reads stay inside it.
constexpr int64_t kMaxTile = 128;

// The CUDA kernel's block shape (positions x output channels x images), shared here because the
// workspace size depends on how the GPU splits small problems (see Geometry::gpu_splits).
constexpr int64_t kGpuPositionsPerBlock = 128;
constexpr int64_t kGpuChannelsPerBlock = 8;
constexpr int64_t kGpuImagesPerBlock = 4;  // when the batch has at least 4 images, else 1
// At most this many splits of an output channel's nonzeros (or of the staged kernel's chunks).
constexpr int64_t kGpuMaxSplits = 16;

// The staged CUDA kernel (tile_kernel.cu): a block of kStagedWarps warps covers kStagedRows
// output channels (kStagedRowsPerWarp per warp) and, in its plan, 32 * P positions of 8 / P
// images (rounded down), P in {8, 7, 4, 2} (a launch may take fewer of either: StagedLaunch);
// input channels go through shared memory in chunks of at most kStagedSharedFloats elements. It
// runs from
// kTileMinBatch images up (every batch: it beat the streaming kernel at batch 1 too, 1.17x
// over the suite on an H100), when the caller passes a tile program (tile_program.hpp).
constexpr int64_t kStagedWarps = 8;
constexpr int64_t kStagedRowsPerWarp = 4;
constexpr int64_t kStagedRows = kStagedWarps * kStagedRowsPerWarp;
constexpr int64_t kStagedProducts = 8;  // images x positions per thread
constexpr int64_t kStagedMaxPositions = 32 * kStagedProducts;
// 48 KB less 128 bytes; the kernel adds its warps' entries (2 KB) and its barrier past the chunk.
constexpr int64_t kStagedSharedFloats = 12256;
constexpr int64_t kTileMinBatch = 1;
// A block's images each own a fixed share of the chunk's shared memory, starting 128-byte
// aligned (as the copy engine's tensor form writes it).
constexpr int64_t staged_image_share(int64_t images) {
  return kStagedSharedFloats / images / 32 * 32;
}
// The copy engine's tensor form copies boxes of at most this many elements a side.
constexpr int64_t kTensorBoxMax = 256;

// How the staged kernel cuts a geometry, a function of the descriptor without its batch (so one
// tile program serves every batch).
struct StagedPlan {
  // The stretched layout the kernel reads: the public one (escoin_conv_layout), or with
  // tensor_copy rows of `lead` more zeros on the left and a multiple of 4 long, which may leave
  // their right padding to the next row's leading zeros (staged_plan in geometry.cpp).
  escoin_layout_t layout;
  // On Hopper the copy engine's tensor form copies the chunks from x itself, adding the padding
  // (what falls outside x reads as zero): no stretch. It needs stride 1 (no phase planes), x's
  // rows in 16-byte multiples (in_width % 4 == 0), rows of whole 16-byte multiples in shared
  // memory (plane_w % 4 == 0), a box's first column at a multiple of 4 (`lead` more zero
  // columns before each row's padding; the right padding is the next row's leading zeros) and
  // boxes within kTensorBoxMax a side; a segment then covers whole rows from the row of the
  // tile's first position (see tile_program.hpp).
  // Elsewhere (an earlier GPU, x not 16-byte aligned) the stretch writes this layout as usual.
  bool tensor_copy;
  // The layout is x's own (a 1x1 filter at stride 1 without padding): the kernel copies x
  // itself, with no stretch. On planes of a multiple of 4 elements that is the public layout
  // (input_already_stretched); on others, channels H * W apart, whole channels only, in chunks
  // of a multiple of 4 channels (staged_plan).
  bool reads_x;
  int64_t lead;  // with tensor_copy: pad_left rounded up to 4, less pad_left; else 0
  int64_t positions;       // P: positions per thread (8, 7, 4 or 2), 32 apart across a warp
  int64_t images;          // NB = kStagedProducts / P images per block
  int64_t phases;          // phases_h * phases_w phase planes per channel
  int64_t phase_plane;     // plane_h * plane_w
  bool whole_channels;     // one tile covers the plane: a chunk of an image is copied whole
  // Elements each segment's copy starts on a multiple of (from the boundary at or before its
  // first element): 8 (a 32-byte sector) where the layout's channels are a multiple of 8 apart,
  // else 4 (16 bytes, what the copy needs).
  int64_t copy_align;
  int64_t segment;         // staged elements per channel and phase: 32 * P + the filter's reach
                           // (+ copy_align - 1 where phase planes start off that), rounded to
                           // 4; with tensor_copy whole rows (plane_w - 4 more: the first
                           // position's column); with whole channels, per channel: the layout's
                           // channel_stride
  int64_t chunk_channels;  // input channels per chunk; 0 when one channel does not fit
  int64_t chunks;          // ceil(group_in / chunk_channels)
  int64_t items;           // groups * ceil(group_out / kStagedRows) blocks of output channels
};
// Everything a forward pass derives from a descriptor, validated once.
struct Geometry {
  escoin_conv_desc_t d;
  escoin_layout_t layout;
  int64_t group_in;     // input channels per group
  int64_t group_out;    // output channels per group
  int64_t window;       // CSR columns per row: group_in * kernel_h * kernel_w
  int64_t group_span;   // stretched elements of one group of one image (< 2^31)
  int64_t out_plane;    // out_height * out_width
  int64_t tail_slack;   // zeroed elements after the batch's stretched input: 256 + plane_w
                        // (of either layout)
  // Small problems give the GPU too few blocks (a 7x7 plane at batch 1: 64 blocks for 132 SMs),
  // so each output channel's nonzeros are split into gpu_splits ranges whose partial sums go to
  // the workspace and are added in a fixed order (deterministic). 1: no split.
  int64_t gpu_splits;
  StagedPlan staged;
  // The tensor-core kernel's stretched layout (mma_program.hpp): the public one with rows
  // rounded up to a multiple of 8 elements where it has one phase plane, so that every tap of a
  // channel reads from a word of the same residue mod 8 as its column (its loads' bank groups
  // then follow from the packing); else the public one. Only that kernel's workspace holds it.
  escoin_layout_t mma_layout;
  int64_t gpu_staged_splits;  // the staged kernel splits its chunks likewise, at most this often
  int64_t partial_elements;  // max(splits) * batch * out_channels * out_plane when split, else 0
};

// How the staged kernel launches g, which needs no other program than the plan's:
// - images: a block computes the batch's images only, up to the plan's (the next power of two;
//   image 0's part of a chunk starts at the same place in shared memory for any image count);
// - positions (P' <= P): a tile of 32 * P' positions reads the first 32 * P' + reach elements
//   of the plan's segments (with whole channels: the channels from its first position, or with
//   tensor copies from its first position's row), so it
//   runs the same program on more, smaller blocks;
// - splits of the chunks, 1..gpu_staged_splits (in the even form below);
// - how the jobs go to blocks. A job is a tile x an item (kStagedRows output channels) x a block
//   of images, all its chunks; jobs are numbered tile fastest, then item, then image block.
//   In the even form (tail_splits 0) every job runs in `splits` blocks, each an even share of
//   its chunks (a grid of tiles x items * splits x image blocks). In the uneven form the first
//   lead_jobs jobs run so too, as far as their blocks fill whole rounds of the SMs, and the
//   others (the tail) in tail_splits > splits blocks each, shorter ones. Split lead jobs' partial
//   sums go where the even form's do; the tail's follow them (tail_partial_offset). (The even
//   form's grid leaves some SMs a block more than others where its blocks are not a multiple of
//   the SMs: at batch 1 the VGG layers' busiest SM had 1.13-1.30x the mean SM's work, "How
//   evenly the SMs are busy" in docs/performance.md.)
struct StagedLaunch {
  int64_t images, positions, splits, lead_jobs, tail_splits;
};
// The launch for a GPU of `sms` SMs that each hold `blocks_per_sm` staged blocks at once. First
// the even form: splits, the count whose grid runs the fewest chunks per block slot (a wave is
// sms x blocks_per_sm blocks), waves x chunks per block, plus one for splitting at all (the
// fewest splits on a tie, since each split adds partial sums to write and add); positions, P/2
// (7: 4) instead of P where that costs no more chunks per slot and no more splits (measured on
// an H100 at batch 1: 10-16% faster on planes that one tile covers, where the blocks were few;
// halving again, or where it adds waves or splits, was slower). Then the uneven form with the
// same splits if its busiest SM runs fewer chunk rounds (the SMs are throughput-bound: an SM's
// time follows the rounds of all its blocks; one more for the partial sums), within the
// workspace's room for the partial sums, and in one wave where the even form is one.
StagedLaunch staged_launch(const Geometry& g, int64_t sms, int64_t blocks_per_sm);

// The jobs of a launch: tiles x items x image blocks.
int64_t staged_jobs(const Geometry& g, const StagedLaunch& launch);

// The partial sums of one tail block of the uneven form: its job's images x kStagedRows output
// channels x its tile's positions, in that order (position fastest), padding included. That form
// keeps them in the workspace's partial-sum area as [tail block][these], where the even form
// keeps [split][image][channel][plane].
int64_t tail_block_outputs(const StagedLaunch& launch);

// Where the tail's partial sums start in the partial-sum area: after the split lead jobs' (as
// many as the even form's, `splits` x batch x out_channels x out_plane), or at its start where
// the lead jobs are unsplit.
int64_t tail_partial_offset(const Geometry& g, const StagedLaunch& launch);

// Tiles of 32 * positions the staged kernel cuts its output plane (out_height x plane_w positions
// of its layout) into.
int64_t staged_tiles(const Geometry& g, int64_t positions);

// Elements of the workspace's stretched input: the batch in whichever layout a forward pass
// stretches it to (the public one, or the staged kernel's; the tensor-core kernel's workspace is
// sized apart: mma_workspace_bytes).
inline int64_t stretched_input_elements(const Geometry& g) {
  return g.d.batch * std::max(g.layout.image_stride, g.staged.layout.image_stride);
}

// Whether x (N, C, H, W) already has the stretched layout: a 1x1 filter at stride 1 without
// padding, on planes of a multiple of 4 elements (so no alignment gap between channels).
inline bool input_already_stretched(const Geometry& g) {
  const escoin_conv_desc_t& d = g.d;
  return d.kernel_h == 1 && d.kernel_w == 1 && d.stride_h == 1 && d.stride_w == 1 &&
         d.pad_top == 0 && d.pad_bottom == 0 && d.pad_left == 0 && d.pad_right == 0 &&
         g.layout.channel_stride == d.in_height * d.in_width;
}

// The stretched offset of filter-window column `col` (< g.window): input channel c of the group,
// tap (r, s) read at c * channel_stride + its phase plane + its row and column shift.
int64_t stretched_offset(const Geometry& g, int64_t col);
// Whether `within` (< channel_stride) is where a tap reads in a channel: the inverse of
// stretched_offset without the channel, in constant time (no table of the taps).
bool reads_a_tap(const Geometry& g, int64_t within);

// Validates desc (throws escoin::Error naming the bad field) and derives the layout.
Geometry make_geometry(const escoin_conv_desc_t* desc);

// Bytes of one stored element of dtype (x, y, bias, residual), and of one element it is computed
// in (the workspace, the weights): float32 for the 16-bit types.
size_t element_size(escoin_dtype_t dtype);
size_t compute_element_size(escoin_dtype_t dtype);

// Bytes of workspace a forward call needs (escoin_workspace_size for an already-built geometry).
size_t workspace_bytes(const Geometry& g, escoin_dtype_t dtype);
// Bytes of workspace the tensor-core forward needs: the batch split into g.mma_layout, one
// word per element, and the tail slack (escoin_mma_workspace_size).
size_t mma_workspace_bytes(const Geometry& g);

}  // namespace escoin
