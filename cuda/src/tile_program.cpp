// tile_program.cpp -- builds the tile program (layout in tile_program.hpp) from a CSR filter and
// its stretched offsets, on the host, once per filter and geometry.
#include "tile_program.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "error.hpp"
#include "forward_checks.hpp"

namespace escoin {
namespace {

struct Program {
  bool grouped = false;          // the row-group form (tile_program.hpp)
  bool shared_patterns = true;   // row groups: every entry has a nonzero in each of its rows
  std::vector<int32_t> begins;   // tile_begin_words(plan)
  std::vector<int32_t> entries;  // rows: (shared offset, weight bits) pairs; row groups: offsets
  std::vector<float> weights;    // row groups: kStagedRowsPerWarp per entry
  // Where each CSR entry's weight went (filled only where asked for): rows, the index in
  // `entries` of its weight word; row groups, its index in `weights`.
  std::vector<int64_t> weight_at;
  int64_t entry_count() const {
    return grouped ? int64_t(entries.size()) : int64_t(entries.size()) / 2;
  }
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

// Where a nonzero at stretched offset `offset` reads: its chunk, and its offset in the chunk's
// shared memory.
struct StagedPlace {
  int64_t chunk;
  int32_t shared;
};

// The chunk alone (the rows form's counting pass).
int64_t staged_chunk(const Geometry& g, int32_t offset) {
  return offset / g.layout.channel_stride / g.staged.chunk_channels;
}

StagedPlace staged_place(const Geometry& g, int32_t offset) {
  const StagedPlan& s = g.staged;
  const int64_t within = staged_within(g, s, offset % g.layout.channel_stride);
  const int64_t channel = offset / g.layout.channel_stride % s.chunk_channels;
  // (a tensor-copy layout has one phase, whose taps may read past its plane)
  const int64_t phase = std::min(within / s.phase_plane, s.phases - 1);
  const int64_t d = within - phase * s.phase_plane;
  // Whole channels sit in shared memory as in the input; segments are copied from the
  // copy_align boundary before each phase's first element.
  const int64_t shift = phase * s.phase_plane % s.copy_align;
  const int64_t shared = s.whole_channels ? channel * s.segment + within
                                           : (channel * s.phases + phase) * s.segment + shift + d;
  return StagedPlace{staged_chunk(g, offset), int32_t(shared)};
}

// The rows form: per item, a counting sort of its rows' nonzeros by (chunk, row) (the CSR need
// not be sorted by column).
Program build_rows(const Geometry& g, const int64_t* row_ptr, const int32_t* offsets,
                   const float* values, bool record_places) {
  const StagedPlan& s = g.staged;
  const int64_t items_per_group = s.items / g.d.groups;
  const int64_t keys = s.chunks * kStagedRows;  // (chunk, row of the item), chunk-major
  Program p;
  p.begins.reserve(size_t(tile_begin_words(s)));
  p.entries.resize(size_t(2 * (row_ptr[g.d.out_channels] - row_ptr[0])));
  if (record_places) p.weight_at.resize(size_t(row_ptr[g.d.out_channels] - row_ptr[0]));
  std::vector<int64_t> next(size_t(keys) + 1);
  int64_t written = 0;
  for (int64_t item = 0; item < s.items; ++item) {
    const int64_t group = item / items_per_group;
    const int64_t first = (item % items_per_group) * kStagedRows;
    const int64_t rows = std::min(kStagedRows, g.group_out - first);
    std::fill(next.begin(), next.end(), 0);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t m = group * g.group_out + first + r;
      for (int64_t j = row_ptr[m]; j < row_ptr[m + 1]; ++j)
        ++next[size_t(staged_chunk(g, offsets[j]) * kStagedRows + r + 1)];
    }
    for (int64_t key = 0; key < keys; ++key) {
      next[size_t(key + 1)] += next[size_t(key)];
      p.begins.push_back(int32_t(written + next[size_t(key)]));
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t m = group * g.group_out + first + r;
      for (int64_t j = row_ptr[m]; j < row_ptr[m + 1]; ++j) {
        const StagedPlace place = staged_place(g, offsets[j]);
        const int64_t at = written + next[size_t(place.chunk * kStagedRows + r)]++;
        p.entries[size_t(2 * at)] = place.shared;
        std::memcpy(&p.entries[size_t(2 * at + 1)], &values[j], sizeof(float));
        if (record_places) p.weight_at[size_t(j - row_ptr[0])] = 2 * at + 1;
      }
    }
    written += next[size_t(keys - 1)];
  }
  p.begins.push_back(int32_t(written));
  return p;
}

// The row-group form: per warp of an item (kStagedRowsPerWarp rows) and chunk, the union of its
// rows' shared offsets in increasing order, each with one weight per row (a column a row repeats
// adds its weights, as the rows form applies both). shared_patterns says whether each entry has
// a stored nonzero in every row of its warp that exists (rows past the group's channels have
// none and are never written).
// With `exact_only` it stops at the first entry that is not shared (the program is then
// incomplete, and only its shared_patterns is meaningful): a random filter costs one item.
Program build_row_groups(const Geometry& g, const int64_t* row_ptr, const int32_t* offsets,
                         const float* values, bool exact_only, bool record_places) {
  const StagedPlan& s = g.staged;
  const int64_t items_per_group = s.items / g.d.groups;
  struct Nonzero {
    int64_t chunk;
    int32_t shared;
    int32_t row;  // of the warp
    float value;
    int64_t entry;  // in the CSR
  };
  Program p;
  p.grouped = true;
  p.begins.reserve(size_t(tile_begin_words(s)));
  std::vector<std::vector<Nonzero>> warps(static_cast<size_t>(kStagedWarps));
  std::vector<size_t> taken(static_cast<size_t>(kStagedWarps));
  if (record_places) p.weight_at.resize(size_t(row_ptr[g.d.out_channels] - row_ptr[0]));
  for (int64_t item = 0; item < s.items; ++item) {
    const int64_t group = item / items_per_group;
    const int64_t first = (item % items_per_group) * kStagedRows;
    const int64_t rows = std::min(kStagedRows, g.group_out - first);
    for (int64_t w = 0; w < kStagedWarps; ++w) {
      std::vector<Nonzero>& list = warps[size_t(w)];
      list.clear();
      for (int64_t r = 0; r < kStagedRowsPerWarp && w * kStagedRowsPerWarp + r < rows; ++r) {
        const int64_t m = group * g.group_out + first + w * kStagedRowsPerWarp + r;
        for (int64_t j = row_ptr[m]; j < row_ptr[m + 1]; ++j) {
          const StagedPlace place = staged_place(g, offsets[j]);
          list.push_back(Nonzero{place.chunk, place.shared, int32_t(r), values[j], j});
        }
      }
      std::sort(list.begin(), list.end(), [](const Nonzero& a, const Nonzero& b) {
        return a.chunk != b.chunk ? a.chunk < b.chunk : a.shared < b.shared;
      });
      taken[size_t(w)] = 0;
    }
    for (int64_t chunk = 0; chunk < s.chunks; ++chunk)
      for (int64_t w = 0; w < kStagedWarps; ++w) {
        const std::vector<Nonzero>& list = warps[size_t(w)];
        size_t& at = taken[size_t(w)];
        p.begins.push_back(int32_t(p.entries.size()));
        const int64_t real_rows = std::min(kStagedRowsPerWarp, rows - w * kStagedRowsPerWarp);
        const unsigned every_row = real_rows > 0 ? (1u << real_rows) - 1 : 0u;
        while (at < list.size() && list[at].chunk == chunk) {
          const int32_t shared = list[at].shared;
          float weights[kStagedRowsPerWarp] = {};
          unsigned stored = 0;
          for (; at < list.size() && list[at].chunk == chunk && list[at].shared == shared; ++at) {
            weights[list[at].row] += list[at].value;
            stored |= 1u << list[at].row;
            if (record_places)
              p.weight_at[size_t(list[at].entry - row_ptr[0])] =
                  int64_t(p.entries.size()) * kStagedRowsPerWarp + list[at].row;
          }
          p.shared_patterns = p.shared_patterns && stored == every_row;
          if (exact_only && !p.shared_patterns) return p;
          p.entries.push_back(shared);
          p.weights.insert(p.weights.end(), weights, weights + kStagedRowsPerWarp);
        }
        for (int64_t r = 1; r < kStagedRowsPerWarp; ++r)
          p.begins.push_back(int32_t(p.entries.size()));
      }
  }
  p.begins.push_back(int32_t(p.entries.size()));
  return p;
}

// build() takes the row-group form where it is exact and costs the staged kernel's loop less
// (else the rows form). Exact: each entry has a stored nonzero in every row of its warp, so no
// row multiplies an input its own weights do not read (a zero weight would let a NaN or infinity
// there reach that row's output, which the rows form and the CPU never do; escoin.h). Cost: a
// rows entry waits on ~9 shared-memory wavefronts (8 loads for the thread's 8 products, one for
// the entry); a row-group entry issues ~46 instructions (8 loads, 2 entry loads, 32 FMAs, the
// loop's own). Measured on an H100 with either form forced on random filters
// (docs/performance.md, "the row-group form"), a union entry costs ~1.55 rows entries, so the
// groups pay below ~0.65 union entries per nonzero: a filter pruned in blocks of four output
// channels has 0.25 (more where a warp's rows run past the group's channels).
// ESCOIN_TILE_FORM=rows or =groups forces a form, exact or not (read at build time; tests and
// benchmarks).
enum class Form { chosen, rows, groups };

Form forced_form() {
  const char* forced = std::getenv("ESCOIN_TILE_FORM");
  if (forced && std::strcmp(forced, "rows") == 0) return Form::rows;
  if (forced && std::strcmp(forced, "groups") == 0) return Form::groups;
  return Form::chosen;
}

// The form build() takes, and the row-group program where that is it: the rows form's size needs
// no program (two words a nonzero), so escoin_tile_program_size builds the rows form never and
// the row-group form only where it is taken (a random filter stops at its first unshared entry).
struct Choice {
  bool grouped;
  Program groups;  // grouped only
};

Choice choose_form(const Geometry& g, const int64_t* row_ptr, const int32_t* offsets,
                   const float* values) {
  check_csr_for_geometry(g, row_ptr, offsets, values);
  const int64_t nonzeros = row_ptr[g.d.out_channels] - row_ptr[0];
  if (nonzeros > std::numeric_limits<int32_t>::max())
    fail_invalid("the filter has too many nonzeros for the staged CUDA kernel");
  const Form forced = forced_form();
  if (forced != Form::rows) {
    Program groups = build_row_groups(g, row_ptr, offsets, values, forced == Form::chosen,
                                      false);
    if (forced == Form::groups ||
        (groups.shared_patterns && groups.entry_count() * 5 <= nonzeros * 3))
      return Choice{true, std::move(groups)};
  }
  return Choice{false, Program{}};
}

// With `record_places`, the program's weight_at says where each CSR entry's weight went. The
// form and every word but the weights depend on row_ptr and offsets only (choose_form reads
// which rows store an entry, not its value).
Program build(const Geometry& g, const int64_t* row_ptr, const int32_t* offsets,
              const float* values, bool record_places) {
  Choice choice = choose_form(g, row_ptr, offsets, values);
  if (!choice.grouped) return build_rows(g, row_ptr, offsets, values, record_places);
  if (!record_places) return std::move(choice.groups);
  return build_row_groups(g, row_ptr, offsets, values, false, true);
}

// Whether the staged kernel is expected to beat the streaming one: one channel's segments must
// fit in shared memory, and a block of kStagedRows output channels should be at least half used
// (depthwise and narrow grouped filters keep the streaming kernel).
bool staged_kernel_pays(const Geometry& g) {
  return g.staged.chunk_channels > 0 && g.group_out * 2 >= kStagedRows;
}

// A program builder's first check: the staged kernel must pay for the geometry (else callers
// pass no program).
void require_staged_kernel(const Geometry& g, const int64_t* row_ptr, const int32_t* offsets,
                           const float* values) {
  if (staged_kernel_pays(g)) return;
  check_csr_for_geometry(g, row_ptr, offsets, values);
  fail_invalid("the staged kernel does not pay for this filter and geometry "
               "(escoin_tile_program_size gave 0 bytes); pass no tile program");
}

// The program's length in words, in either form, from its count of entries.
size_t program_words(const Geometry& g, bool grouped, int64_t entries) {
  const int64_t entries_word = tile_entries_word(g.staged);
  if (!grouped) return size_t(entries_word + 2 * entries);
  return size_t(tile_weights_word(entries_word, entries) + kStagedRowsPerWarp * entries);
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
    if (!escoin::staged_kernel_pays(g)) {
      escoin::check_csr_for_geometry(g, row_ptr, offsets, values);
      *bytes = 0;
      return;
    }
    const escoin::Choice choice = escoin::choose_form(g, row_ptr, offsets, values);
    const int64_t entries = choice.grouped ? choice.groups.entry_count()
                                           : row_ptr[g.d.out_channels] - row_ptr[0];
    *bytes = escoin::program_words(g, choice.grouped, entries) * sizeof(int32_t);
  });
}

extern "C" escoin_status_t escoin_tile_program_build(const escoin_conv_desc_t* desc,
                                                     const int64_t* row_ptr,
                                                     const int32_t* offsets, const float* values,
                                                     void* program, size_t bytes) {
  return escoin::guarded([&] {
    escoin::require_pointer(program, "program");
    const escoin::Geometry g = escoin::make_geometry(desc);
    escoin::require_staged_kernel(g, row_ptr, offsets, values);
    const escoin::Program p = escoin::build(g, row_ptr, offsets, values, false);
    const size_t words = escoin::program_words(g, p.grouped, p.entry_count());
    if (bytes < words * sizeof(int32_t))
      escoin::fail_invalid("program has ", bytes, " bytes, the tile program needs ",
                           words * sizeof(int32_t));
    auto* out = static_cast<int32_t*>(program);
    const int64_t entries_at = escoin::tile_entries_word(g.staged);
    std::memset(out, 0, size_t(entries_at) * sizeof(int32_t));
    out[0] = p.grouped ? escoin::kGroupedTileProgramMagic : escoin::kTileProgramMagic;
    out[1] = int32_t(g.staged.items);
    out[2] = int32_t(g.staged.chunks);
    out[3] = int32_t(p.entry_count());
    std::copy(p.begins.begin(), p.begins.end(), out + escoin::kTileHeaderWords);
    std::copy(p.entries.begin(), p.entries.end(), out + entries_at);
    if (p.grouped) {
      const int64_t weights_at = escoin::tile_weights_word(entries_at, p.entry_count());
      std::fill(out + entries_at + p.entry_count(), out + weights_at, 0);
      std::memcpy(out + weights_at, p.weights.data(), p.weights.size() * sizeof(float));
    }
  });
}

extern "C" escoin_status_t escoin_tile_program_weight_slots(const escoin_conv_desc_t* desc,
                                                            const int64_t* row_ptr,
                                                            const int32_t* offsets,
                                                            int64_t* slots, size_t count) {
  return escoin::guarded([&] {
    const escoin::Geometry g = escoin::make_geometry(desc);
    escoin::require_pointer(row_ptr, "row_ptr");
    // The form and the places depend on the pattern only: any values will do (the builder
    // checks row_ptr before it reads them).
    const std::vector<float> values(size_t(std::max<int64_t>(row_ptr[g.d.out_channels], 1)));
    escoin::require_staged_kernel(g, row_ptr, offsets, values.data());
    const escoin::Program p = escoin::build(g, row_ptr, offsets, values.data(), true);
    if (count != p.weight_at.size())
      escoin::fail_invalid("slots has room for ", count, " entries, the filter has ",
                           p.weight_at.size(), " nonzeros");
    if (count > 0) escoin::require_pointer(slots, "slots");
    const int64_t entries_at = escoin::tile_entries_word(g.staged);
    const int64_t first = p.grouped ? escoin::tile_weights_word(entries_at, p.entry_count())
                                    : entries_at;
    for (size_t j = 0; j < count; ++j) slots[j] = first + p.weight_at[j];
  });
}
