// tile_program.cpp -- builds the tile program (layout in tile_program.hpp) from a CSR filter and
// its stretched offsets, on the host, once per filter and geometry.
#include "tile_program.hpp"

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "error.hpp"
#include "forward_checks.hpp"

namespace escoin {
namespace {

struct Entry {
  int32_t offset;
  int32_t channel;  // within the tile
  float value;
};

struct Program {
  std::vector<int32_t> item_first;  // items + 1
  std::vector<int32_t> windows;     // (base, first entry) pairs, sentinel included
  std::vector<int32_t> entries;     // (case, weight bits) pairs, padding included
};

// The nonzeros of one tile, ordered by offset so that a window's entries are consecutive.
std::vector<Entry> tile_entries(const Geometry& g, const int64_t* row_ptr, const int32_t* offsets,
                                const float* values, int64_t group, int64_t tile) {
  std::vector<Entry> out;
  const int64_t first = group * g.group_out + tile * kTileChannels;
  const int64_t last = std::min(first + kTileChannels, (group + 1) * g.group_out);
  for (int64_t m = first; m < last; ++m)
    for (int64_t j = row_ptr[m]; j < row_ptr[m + 1]; ++j)
      out.push_back({offsets[j], int32_t(m - first), values[j]});
  std::stable_sort(out.begin(), out.end(),
                   [](const Entry& a, const Entry& b) { return a.offset < b.offset; });
  return out;
}

Program build(const Geometry& g, const int64_t* row_ptr, const int32_t* offsets,
              const float* values) {
  check_csr_for_geometry(g, row_ptr, offsets, values);
  Program p;
  for (int64_t group = 0; group < g.d.groups; ++group) {
    for (int64_t tile = 0; tile < tiles_per_group(g); ++tile) {
      p.item_first.push_back(int32_t(p.windows.size() / 2));
      const std::vector<Entry> entries = tile_entries(g, row_ptr, offsets, values, group, tile);
      for (size_t i = 0; i < entries.size();) {
        const int32_t base = entries[i].offset & ~3;
        p.windows.push_back(base);
        p.windows.push_back(int32_t(p.entries.size() / 2));
        for (; i < entries.size() && entries[i].offset - base < kTileShifts; ++i) {
          int32_t bits;
          std::memcpy(&bits, &entries[i].value, sizeof bits);
          p.entries.push_back(entries[i].channel * kTileShifts + (entries[i].offset - base));
          p.entries.push_back(bits);
        }
      }
      if (p.entries.size() / 2 > size_t(std::numeric_limits<int32_t>::max()))
        fail_invalid("the filter has too many nonzeros for the tiled CUDA kernel");
    }
  }
  p.item_first.push_back(int32_t(p.windows.size() / 2));
  p.windows.push_back(0);
  p.windows.push_back(int32_t(p.entries.size() / 2));
  p.entries.push_back(0);  // read ahead, never applied
  p.entries.push_back(0);
  return p;
}

// Whether the tiled kernel is expected to beat the streaming one (measured on an H100 over the
// layer suite, docs/performance.md): it needs at least 2 nonzeros per window on average (a 3x3
// stride-1 filter at 90% sparsity gives ~2.6; 1x1 and stride-2 filters ~1, and then the 16-value
// window loads cost more than they save), and an output plane that keeps at least 70% of a
// warp's 256 positions busy (a 7x7 plane keeps 25%).
bool tiled_kernel_pays(const Geometry& g, const Program& p) {
  const double windows = double(p.windows.size() / 2 - 1);
  const double entries = double(p.entries.size() / 2 - 1);
  const int64_t plane_q = g.layout.out_height * g.layout.plane_w;
  const int64_t warp_positions = 32 * kTilePositions;
  const double busy = double(plane_q) / double((plane_q + warp_positions - 1) / warp_positions *
                                                warp_positions);
  return windows > 0 && entries >= 2.0 * windows && busy >= 0.7;
}

size_t program_words(const Program& p) {
  return size_t(tile_windows_word(int64_t(p.item_first.size()) - 1)) + p.windows.size() +
         p.entries.size();
}

}  // namespace
}  // namespace escoin

extern "C" escoin_status_t escoin_tile_program_size(const escoin_conv_desc_t* desc,
                                                    const int64_t* row_ptr,
                                                    const int32_t* offsets, const float* values,
                                                    size_t* bytes) {
  return escoin::guarded([&] {
    escoin::require_pointer(bytes, "bytes");
    const escoin::Geometry g = escoin::make_geometry(desc);
    const escoin::Program p = escoin::build(g, row_ptr, offsets, values);
    *bytes = escoin::tiled_kernel_pays(g, p) ? escoin::program_words(p) * sizeof(int32_t) : 0;
  });
}

extern "C" escoin_status_t escoin_tile_program_build(const escoin_conv_desc_t* desc,
                                                     const int64_t* row_ptr,
                                                     const int32_t* offsets, const float* values,
                                                     void* program, size_t bytes) {
  return escoin::guarded([&] {
    escoin::require_pointer(program, "program");
    const escoin::Geometry g = escoin::make_geometry(desc);
    const escoin::Program p = escoin::build(g, row_ptr, offsets, values);
    if (!escoin::tiled_kernel_pays(g, p))
      escoin::fail_invalid("the tiled kernel does not pay for this filter and geometry "
                           "(escoin_tile_program_size gave 0 bytes); pass no tile program");
    const size_t words = escoin::program_words(p);
    if (bytes < words * sizeof(int32_t))
      escoin::fail_invalid("program has ", bytes, " bytes, the tile program needs ",
                           words * sizeof(int32_t));
    auto* out = static_cast<int32_t*>(program);
    const int64_t items = int64_t(p.item_first.size()) - 1;
    const int64_t windows_at = escoin::tile_windows_word(items);
    std::memset(out, 0, size_t(windows_at) * sizeof(int32_t));
    out[0] = escoin::kTileProgramMagic;
    out[1] = int32_t(items);
    out[2] = int32_t(p.windows.size() / 2 - 1);
    out[3] = int32_t(p.entries.size() / 2 - 1);
    std::copy(p.item_first.begin(), p.item_first.end(), out + escoin::kTileHeaderWords);
    std::copy(p.windows.begin(), p.windows.end(), out + windows_at);
    std::copy(p.entries.begin(), p.entries.end(), out + windows_at + p.windows.size());
  });
}
