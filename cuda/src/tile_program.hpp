// tile_program.hpp -- the filter as the staged CUDA kernel reads it (the "tile program"), shared
// by its host-side builder (tile_program.cpp) and the kernel (tile_kernel.cu).
//
// The kernel gives each block kStagedRows output channels of one group (an "item") and copies
// the input it needs into shared memory a chunk of input channels at a time (StagedPlan in
// geometry.hpp). Shared memory holds, per image b of the block, chunk channel c and phase ph, a
// segment of StagedPlan::segment elements: stretched positions [q0, q0 + segment) of that phase
// plane, from the StagedPlan::copy_align boundary at or before q0 + ph * phase_plane (shift: 0
// to copy_align - 1 elements; copy_align is 8, a 32-byte sector, where channels are a multiple
// of 8 elements apart, else 4).
// A nonzero at stretched offset c * channel_stride + ph * phase_plane + d becomes the entry
//   (shared offset = (c % chunk_channels) * phases * segment + ph * segment + shift + d, weight)
// so that a thread computing position q0 + i reads shared element offset + i. With whole
// channels (one tile covers the plane, q0 = 0) the chunk is copied as it lies in the input,
// channel_stride (= segment) elements per channel, and the offset is
// (c % chunk_channels) * segment + ph * phase_plane + d.
// All of this is in the plan's stretched layout (StagedPlan::layout): with tensor copies its rows
// are StagedPlan::lead zeros longer on the left and a different length, and the builder moves
// each offset's row and column there (d = row * plane_w + lead + column; a tap's right padding
// may then be the next row's leading zeros within a segment; whole-channel plans keep rows that
// hold their padding). Where the tensor copy runs, a segment starts at the row of q0,
// q0 % plane_w elements before q0 (a multiple of 4, so no shift), which the thread adds to
// every offset; where the stretch writes the same layout, segments start at q0 as above.
//
// Two forms, one per filter and geometry (tile_program.cpp's choose_form):
// - rows: each row (output channel) lists its own entries.
// - row groups: a warp's kStagedRowsPerWarp rows (channels 4w..4w+3 of the item) list the union
//   of their entries per chunk, each an offset and one weight per row (0 where that row has no
//   nonzero there). One input value loaded from shared memory then feeds four FMAs instead of
//   one: a filter whose rows come in groups of four with one pattern (block pruning) needs a
//   quarter of the loads. Built where every warp's rows share their pattern exactly and the
//   union costs less than the rows (choose_form).
//
// Layout, in 32-bit words:
//   header  [kTileHeaderWords]: magic (kTileProgramMagic: rows; kGroupedTileProgramMagic: row
//           groups), items, chunks, entries
//   begins  [items * chunks * kStagedRows + 1]: first entry of (item, chunk, row of the item);
//           a row's entries end where the next begin starts. In the row-group form, row 4w's
//           begin is where warp w's run starts and rows 4w+1..4w+3 begin where it ends (empty)
//   rows:       entries int2[entries]: (shared offset, weight bits), starting at an even word
//   row groups: shared offsets int32[entries], from the same even word, then the weights
//               float[entries][kStagedRowsPerWarp] from the next multiple of 4 words (16-byte
//               loads; the program must be 16-byte aligned on the device)
#pragma once

#include <cstdint>

#include "geometry.hpp"

namespace escoin {

constexpr int32_t kTileProgramMagic = 0x45534336;         // "ESC6": tiles of 7 x 32, phase planes
constexpr int32_t kGroupedTileProgramMagic = 0x45534736;  // "ESG6": the row-group form
constexpr int64_t kTileHeaderWords = 4;

inline int64_t tile_begin_words(const StagedPlan& s) {
  return s.items * s.chunks * kStagedRows + 1;
}
inline int64_t tile_entries_word(const StagedPlan& s) {
  return (kTileHeaderWords + tile_begin_words(s) + 1) / 2 * 2;
}
// The row-group form's weights, after `entries` offsets.
inline int64_t tile_weights_word(int64_t entries_word, int64_t entries) {
  return (entries_word + entries + 3) / 4 * 4;
}

}  // namespace escoin
