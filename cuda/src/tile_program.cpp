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
    *bytes = escoin::program_words(escoin::build(g, row_ptr, offsets, values)) * sizeof(int32_t);
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
