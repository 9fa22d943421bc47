// tile_program.hpp -- the filter as the register-tiled CUDA kernel reads it (the "tile program"),
// shared by its host-side builder (tile_program.cpp) and the kernel (tile_kernel.cu).
//
// The kernel gives each warp a tile of kTileChannels output channels and each thread
// kTilePositions consecutive output positions, all in registers. The tile's nonzeros, sorted by
// stretched offset, are cut into windows: runs of offsets that fit in [base, base + kTileShifts)
// with base a multiple of 4. A thread loads a window's kTileWindow input values with four 16-byte
// loads and applies every nonzero of the window to them from registers, so one loaded value
// feeds several FMAs. Each nonzero is an entry (case, weight): case = channel * kTileShifts +
// (offset - base) picks, through a jump table, the code that does kTilePositions FMAs on fixed
// registers.
//
// Layout, in 32-bit words (int2 = two words, 8-byte aligned):
//   header     [kTileHeaderWords]: kTileProgramMagic, items, windows, entries
//   item_first [items + 1]: first window of item i (item = group * tiles_per_group + tile);
//                           padded to an even count
//   windows    int2[windows + 1]: (base offset, first entry); the last is a sentinel
//   entries    int2[entries + 1]: (case, weight bits); the last pads the kernel's read-ahead
#pragma once

#include <cstdint>

#include "geometry.hpp"

namespace escoin {

// kTileChannels, kTilePositions and kTileWarps are in geometry.hpp (the workspace depends on them).
constexpr int kTileWindow = 16;
constexpr int kTileShifts = kTileWindow - int(kTilePositions) + 1;
constexpr int32_t kTileProgramMagic = 0x45534354;  // "ESCT"
constexpr int64_t kTileHeaderWords = 4;

inline int64_t tiles_per_group(const Geometry& g) {
  return (g.group_out + kTileChannels - 1) / kTileChannels;
}
inline int64_t tile_items(const Geometry& g) { return g.d.groups * tiles_per_group(g); }
inline int64_t tile_windows_word(int64_t items) {
  return (kTileHeaderWords + items + 1 + 1) / 2 * 2;
}

}  // namespace escoin
