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

struct Program {
  std::vector<int32_t> begins;   // tile_begin_words(plan)
  std::vector<int32_t> entries;  // (shared offset, weight bits) pairs
};

// Where a tap at `within` of its channel in the public layout reads in the staged kernel's layout
// (the same phase, row and column; a row there starts with s.lead more zeros and may be longer
// or shorter: in a segment, a tap of a tensor-copy layout may read the next row's leading zeros
// as its right padding).
int64_t staged_within(const Geometry& g, const StagedPlan& s, int64_t within) {
  const escoin_layout_t& L = g.layout;
  const int64_t phase_plane = L.plane_h * L.plane_w;
  const int64_t phase = within / phase_plane, d = within % phase_plane;
  return phase * s.phase_plane + d / L.plane_w * s.layout.plane_w + s.lead + d % L.plane_w;
}

Program build(const Geometry& g, const int64_t* row_ptr, const int32_t* offsets,
              const float* values) {
  check_csr_for_geometry(g, row_ptr, offsets, values);
  const StagedPlan& s = g.staged;
  const int64_t items_per_group = s.items / g.d.groups;
  const int64_t keys = s.chunks * kStagedRows;  // (chunk, row of the item), chunk-major
  const int64_t nonzeros = row_ptr[g.d.out_channels] - row_ptr[0];
  if (nonzeros > std::numeric_limits<int32_t>::max())
    fail_invalid("the filter has too many nonzeros for the staged CUDA kernel");
  Program p;
  p.begins.reserve(size_t(tile_begin_words(s)));
  p.entries.resize(size_t(2 * nonzeros));
  std::vector<int64_t> next(size_t(keys) + 1);
  int64_t written = 0;
  for (int64_t item = 0; item < s.items; ++item) {
    const int64_t group = item / items_per_group;
    const int64_t first = (item % items_per_group) * kStagedRows;
    const int64_t rows = std::min(kStagedRows, g.group_out - first);
    auto chunk_of = [&](int64_t j) {
      return offsets[j] / g.layout.channel_stride / s.chunk_channels;
    };
    // A counting sort of the item's nonzeros by key (the CSR need not be sorted by column).
    std::fill(next.begin(), next.end(), 0);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t m = group * g.group_out + first + r;
      for (int64_t j = row_ptr[m]; j < row_ptr[m + 1]; ++j)
        ++next[size_t(chunk_of(j) * kStagedRows + r + 1)];
    }
    for (int64_t key = 0; key < keys; ++key) {
      next[size_t(key + 1)] += next[size_t(key)];
      p.begins.push_back(int32_t(written + next[size_t(key)]));
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t m = group * g.group_out + first + r;
      for (int64_t j = row_ptr[m]; j < row_ptr[m + 1]; ++j) {
        const int64_t within = staged_within(g, s, offsets[j] % g.layout.channel_stride);
        const int64_t channel = offsets[j] / g.layout.channel_stride % s.chunk_channels;
        // (a tensor-copy layout has one phase, whose taps may read past its plane)
        const int64_t phase = std::min(within / s.phase_plane, s.phases - 1);
        const int64_t d = within - phase * s.phase_plane;
        const int64_t at = written + next[size_t(chunk_of(j) * kStagedRows + r)]++;
        // Whole channels sit in shared memory as in the input; segments are copied from the
        // copy_align boundary before each phase's first element.
        const int64_t shift = phase * s.phase_plane % s.copy_align;
        p.entries[size_t(2 * at)] =
            int32_t(s.whole_channels ? channel * s.segment + within
                                     : (channel * s.phases + phase) * s.segment + shift + d);
        std::memcpy(&p.entries[size_t(2 * at + 1)], &values[j], sizeof(float));
      }
    }
    written += next[size_t(keys - 1)];
  }
  p.begins.push_back(int32_t(written));
  return p;
}

// Whether the staged kernel is expected to beat the streaming one: one channel's segments must
// fit in shared memory, and a block of kStagedRows output channels should be at least half used
// (depthwise and narrow grouped filters keep the streaming kernel).
bool staged_kernel_pays(const Geometry& g) {
  return g.staged.chunk_channels > 0 && g.group_out * 2 >= kStagedRows;
}

size_t program_words(const Geometry& g, const Program& p) {
  return size_t(tile_entries_word(g.staged)) + p.entries.size();
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
    escoin::check_csr_for_geometry(g, row_ptr, offsets, values);
    *bytes = escoin::staged_kernel_pays(g)
                 ? (size_t(escoin::tile_entries_word(g.staged)) +
                    size_t(2 * (row_ptr[g.d.out_channels] - row_ptr[0]))) * sizeof(int32_t)
                 : 0;
  });
}

extern "C" escoin_status_t escoin_tile_program_build(const escoin_conv_desc_t* desc,
                                                     const int64_t* row_ptr,
                                                     const int32_t* offsets, const float* values,
                                                     void* program, size_t bytes) {
  return escoin::guarded([&] {
    escoin::require_pointer(program, "program");
    const escoin::Geometry g = escoin::make_geometry(desc);
    if (!escoin::staged_kernel_pays(g)) {
      escoin::check_csr_for_geometry(g, row_ptr, offsets, values);
      escoin::fail_invalid("the staged kernel does not pay for this filter and geometry "
                           "(escoin_tile_program_size gave 0 bytes); pass no tile program");
    }
    const escoin::Program p = escoin::build(g, row_ptr, offsets, values);
    const size_t words = escoin::program_words(g, p);
    if (bytes < words * sizeof(int32_t))
      escoin::fail_invalid("program has ", bytes, " bytes, the tile program needs ",
                           words * sizeof(int32_t));
    auto* out = static_cast<int32_t*>(program);
    const int64_t entries_at = escoin::tile_entries_word(g.staged);
    std::memset(out, 0, size_t(entries_at) * sizeof(int32_t));
    out[0] = escoin::kTileProgramMagic;
    out[1] = int32_t(g.staged.items);
    out[2] = int32_t(g.staged.chunks);
    out[3] = int32_t(p.entries.size() / 2);
    std::copy(p.begins.begin(), p.begins.end(), out + escoin::kTileHeaderWords);
    std::copy(p.entries.begin(), p.entries.end(), out + entries_at);
  });
}
