// mma_program.hpp -- the filter as the tensor-core kernel reads it (the "MMA program"), shared by
// its host-side builder (mma_program.cpp) and the kernel (mma_kernel.cu).
//
// The tensor-core kernel computes a float32 convolution as sparse matrix products on the 2:4
// sparse bf16 MMA (mma.sp m16n8k32), with fp32-level accuracy from split operands: each weight
// w and each input x is a pair of bf16 parts, hi = bf16(v) and lo = bf16(v - hi), and the
// kernel adds hi_w * hi_x + hi_w * lo_x + lo_w * hi_x (the lo * lo term, ~2^-18 of the product,
// is no larger than the parts' own error). docs/performance.md ("Tensor cores at fp32 accuracy") gives the measured ceilings
// and errors that chose this form.
//
// Blocks: kMmaTilesPerBlock tiles of kMmaRows output channels (two MMA halves of 16 rows; four
// warps a tile) by kMmaPositions consecutive positions q = oh * plane_w + ow of the kernel's
// stretched layout (Geometry::mma_layout, with one phase plane: stride 1, or taps that all read
// phase (0, 0)) of one image; the tiles share the block's copy of the input. A channel's
// taps then read q + within, within the tap's shift (stretched_offset's, in rows of the kernel's
// layout) <= reach, so the
// block copies, per input channel, the span [q0, q0 + span) of that channel (span =
// kMmaPositions + reach, rounded up to 4) into shared memory, chunk_channels channels at a time
// (span_stride words apart), from the workspace where the stretch wrote each element as one
// 32-bit word: hi's bits in the low half, lo's in the high half.
//
// Per tile and chunk, the columns (channel, within) that have a nonzero in one of the tile's
// rows are packed into groups of 4 (no row with more than 2 nonzeros in a group: the 2:4
// pattern), 8 groups a "step" of 32 columns (one MMA's k); the builder picks the groups and
// their order so that a B load's four columns fall on four bank groups where it can
// (mma_program.cpp: pack, arrange_step). A step is, per lane (g = lane / 4,
// t = lane % 4), kMmaStepWords 32-bit words, stored word-group-major so that a warp reads each
// group of 4 words as one coalesced 512-byte load:
//   words 0-3   A fragment of rows 0-15, hi parts (the m16n8k16 A layout of the compressed
//               16 x 16 matrix: a0 rows g, columns 2t, 2t+1; a1 rows g+8; a2, a3 columns + 8)
//   words 4-7   the same, lo parts
//   words 8-15  the same for rows 16-31
//   word 16, 17 metadata of rows 0-15, of rows 16-31 (lanes with t < 2; others 0): lane 4g + t
//               holds groups 4t to 4t+3 of row g in its low half-word and of row g + 8 in the
//               high one, a nibble per group (first kept column in bits 0-1, second in 2-3)
//   words 18-21 shared-memory offsets (words, within a chunk buffer) of the step's columns
//               8i + 2t and 8i + 2t + 1, for i = 0..3, one per half-word (low: the first)
//   words 22-23 zero
// Empty columns (in a chunk's last step, or groups of fewer than 4) have zero weights and read
// the offset of another column of the same load (no extra wavefront).
//
// Layout, in 32-bit words:
//   header  [kMmaHeaderWords]: kMmaProgramMagic, tiles, chunks, steps
//   begins  [tiles * chunks + 1]: first step of (tile, chunk); a range ends at the next begin
//   steps   [steps][kMmaStepWords / 4][32 lanes][4], from the first multiple of 4 words
#pragma once

#include <cstdint>

#include "geometry.hpp"

namespace escoin {

constexpr int32_t kMmaProgramMagic = 0x45534d31;  // "ESM1"
constexpr int64_t kMmaHeaderWords = 4;
constexpr int64_t kMmaRows = 32;        // output channels per tile (two MMAs of 16)
constexpr int64_t kMmaTilesPerBlock = 2;
constexpr int64_t kMmaWarpsPerTile = 4;
constexpr int64_t kMmaWarps = kMmaTilesPerBlock * kMmaWarpsPerTile;
constexpr int64_t kMmaWarpPositions = 32;  // four MMA n-fragments of 8 positions
constexpr int64_t kMmaPositions = kMmaWarpsPerTile * kMmaWarpPositions;
constexpr int64_t kMmaStepColumns = 32;
constexpr int64_t kMmaStepWords = 24;   // per lane
// Shared memory for the two chunk buffers (the copy of the next chunk overlaps the current
// one's products): 96 KB, so that two blocks fit an SM of Hopper or Ampere.
constexpr int64_t kMmaSharedWords = 24576;

// How the tensor-core kernel cuts a geometry (a function of the descriptor without its batch,
// so that one program serves every batch). chunk_channels is 0 where the kernel cannot run it.
struct MmaPlan {
  int64_t reach;           // the largest tap shift within a channel
  int64_t span;            // words copied per channel: kMmaPositions + reach, rounded up to 4
  int64_t span_stride;     // words between channels in a chunk buffer
  int64_t chunk_channels;  // input channels per chunk
  int64_t chunks;
  int64_t tiles;           // ceil(out_channels / kMmaRows)
  int64_t position_tiles;  // ceil(out_height * plane_w / kMmaPositions)
};

// The plan of g: chunk_channels 0 unless g has one group and one phase plane and a channel's
// span fits half the shared memory.
MmaPlan mma_plan(const Geometry& g);

// Whether the tensor-core kernel runs g's plan: it exists, and a chunk's shared offsets fit the
// program's 16-bit fields.
inline bool mma_kernel_runs(const MmaPlan& p) {
  return p.chunk_channels > 0 && p.chunk_channels * p.span_stride <= 65535;
}

inline int64_t mma_steps_word(const MmaPlan& p) {
  return (kMmaHeaderWords + p.tiles * p.chunks + 1 + 3) / 4 * 4;
}

}  // namespace escoin
