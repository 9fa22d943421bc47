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
// Layout, in 32-bit words:
//   header  [kTileHeaderWords]: kTileProgramMagic, items, chunks, entries
//   begins  [items * chunks * kStagedRows + 1]: first entry of (item, chunk, row of the item);
//           a row's entries end where the next begin starts
//   entries int2[entries]: (shared offset, weight bits), starting at an even word
#pragma once

#include <cstdint>

#include "geometry.hpp"

namespace escoin {

constexpr int32_t kTileProgramMagic = 0x45534336;  // "ESC6": tiles of 7 x 32, phase planes
constexpr int64_t kTileHeaderWords = 4;

inline int64_t tile_begin_words(const StagedPlan& s) {
  return s.items * s.chunks * kStagedRows + 1;
}
inline int64_t tile_entries_word(const StagedPlan& s) {
  return (kTileHeaderWords + tile_begin_words(s) + 1) / 2 * 2;
}

}  // namespace escoin
