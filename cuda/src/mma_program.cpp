// mma_program.cpp -- builds the tensor-core kernel's program (layout in mma_program.hpp) from a
// CSR filter and its stretched offsets, on the host, once per filter and geometry.
#include "mma_program.hpp"

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <vector>

#include "error.hpp"
#include "forward_checks.hpp"

namespace escoin {

MmaPlan mma_plan(const Geometry& g) {
  const escoin_conv_desc_t& d = g.d;
  const escoin_layout_t& L = g.mma_layout;
  MmaPlan p{};
  // (with one phase plane, every tap's shift is a multiple of the stride: stretched_offset)
  p.reach = (d.kernel_h - 1) * d.dilation_h / d.stride_h * L.plane_w +
            (d.kernel_w - 1) * d.dilation_w / d.stride_w;
  p.span = (kMmaPositions + p.reach + 3) / 4 * 4;
  // Channels 8 words past a multiple of 32 apart: with rows of a multiple of 8 (the layout), a
  // column's word keeps its residue mod 8 (its tap column's) and its bank group (which 8 of
  // the 32 banks) turns with the channel, so the packing can put four columns of one residue
  // and four bank groups in a load: one wavefront.
  p.span_stride = p.span + (40 - p.span % 32) % 32;
  p.tiles = (d.out_channels + kMmaRows - 1) / kMmaRows;
  p.position_tiles = (L.out_height * L.plane_w + kMmaPositions - 1) / kMmaPositions;
  const bool one_plane = L.phases_h == 1 && L.phases_w == 1;
  const int64_t fits = kMmaSharedWords / 2 / p.span_stride;
  if (d.groups != 1 || !one_plane || fits < 1) return p;
  // A multiple of 32 channels where that many fit: a chunk's columns then fill whole steps more
  // often (a 1x1 filter's chunk of 48 channels paid 2 steps for ~47 columns).
  p.chunk_channels = std::min(fits >= 32 ? fits / 32 * 32 : fits, g.group_in);
  p.chunks = (g.group_in + p.chunk_channels - 1) / p.chunk_channels;
  return p;
}

namespace {

// The bf16 bits of v, rounded to nearest even.
uint16_t bf16_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}
float bf16_value(uint16_t b) {
  const uint32_t bits = uint32_t(b) << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

struct Split {
  uint16_t hi, lo;
};
Split split(float w) {
  const uint16_t hi = bf16_bits(w);
  return {hi, bf16_bits(w - bf16_value(hi))};
}

// One column of a tile: where it reads in the chunk buffer, and its weight per row of the tile.
struct Column {
  int32_t shared_offset;
  uint32_t rows;  // bit r: row r of the tile has a nonzero here
  std::vector<std::pair<int, float>> weights;  // (row of the tile, weight)
};

// A group of 4 columns of the 2:4 pattern; twice: the rows with at least one, with two nonzeros.
struct Group {
  int columns[4];
  int count = 0;
  uint32_t once = 0, twice = 0;
};

// First fit over the columns of one residue mod 8: each goes to the first group with room whose
// rows it does not fill past 2. The columns are taken from the four bank groups (offset mod 32
// / 8) in turn, so that a group's columns tend to sit on four bank groups and arrange_step can
// make each load of one wavefront (in offset order, one channel's taps of one column share a
// bank group where the rows are a multiple of 32 words: 64 for 56-wide planes).
void first_fit(const std::vector<Column>& columns, int32_t residue, std::vector<Group>& out) {
  std::vector<int> by_bank_group[4];
  for (int c = 0; c < int(columns.size()); ++c)
    if (columns[size_t(c)].shared_offset % 8 == residue)
      by_bank_group[columns[size_t(c)].shared_offset % 32 / 8].push_back(c);
  std::vector<int> order;
  for (size_t i = 0; order.size() < by_bank_group[0].size() + by_bank_group[1].size() +
                                        by_bank_group[2].size() + by_bank_group[3].size();
       ++i)
    for (const auto& bank_group : by_bank_group)
      if (i < bank_group.size()) order.push_back(bank_group[i]);
  std::vector<Group> groups;
  size_t open_from = 0;  // groups before this one are full
  for (int c : order) {
    const uint32_t m = columns[size_t(c)].rows;
    size_t at = open_from;
    while (at < groups.size() && (groups[at].count == 4 || (groups[at].twice & m) != 0)) ++at;
    if (at == groups.size()) groups.emplace_back();
    Group& group = groups[at];
    group.columns[group.count++] = c;
    group.twice |= group.once & m;
    group.once ^= m;
    group.once &= ~group.twice;
    while (open_from < groups.size() && groups[open_from].count == 4) ++open_from;
  }
  out.insert(out.end(), groups.begin(), groups.end());
}

// The columns in groups of 4 (the 2:4 pattern), each group of one residue mod 8 (the columns a
// load can read without a bank conflict: arrange_step), class by class.
std::vector<Group> pack(const std::vector<Column>& columns) {
  std::vector<Group> groups;
  for (int32_t residue = 0; residue < 8; ++residue) first_fit(columns, residue, groups);
  return groups;
}

uint32_t pair(uint16_t low, uint16_t high) { return low | (uint32_t(high) << 16); }

// A B load of the kernel reads, for lanes g = 0..7 and t = 0..3, column 8i + 2t + e of the step
// at position g: four runs of 8 words, one per column. Its shared-memory wavefronts are the most
// lanes on one bank (a bank serves one word a wavefront; equal words are one).
int load_wavefronts(const int32_t (&offsets)[4]) {
  int counts[32] = {};
  int most = 0;
  for (int t = 0; t < 4; ++t) {
    bool repeated = false;
    for (int u = 0; u < t; ++u) repeated |= offsets[u] == offsets[t];
    if (repeated) continue;  // the same words: one read serves both
    for (int g = 0; g < 8; ++g) most = std::max(most, ++counts[(offsets[t] + g) & 31]);
  }
  return most;
}

constexpr int kEmpty = -1;

// The offsets one B load reads for its four slots (columns, or kEmpty): an empty slot reads
// the offset of another column of the load, so that it costs no wavefront.
void load_offsets(const std::vector<Column>& columns, const int (&slots)[4],
                  int32_t (&offsets)[4]) {
  int32_t fill = 0;
  for (int column : slots)
    if (column != kEmpty) fill = columns[size_t(column)].shared_offset;
  for (int t = 0; t < 4; ++t)
    offsets[t] = slots[t] == kEmpty ? fill : columns[size_t(slots[t])].shared_offset;
}

// The two loads (e = 0, 1) of a pair of groups a and b, with a's columns at positions pa and
// b's at pb (group slots 0-3); returns their wavefronts added.
int pair_wavefronts(const std::vector<Column>& columns, const int (&a)[4], const int (&b)[4]) {
  int total = 0;
  for (int e = 0; e < 2; ++e) {
    int32_t offsets[4];
    load_offsets(columns, {a[e], a[2 + e], b[e], b[2 + e]}, offsets);
    total += load_wavefronts(offsets);
  }
  return total;
}

// The step's 32 slots (a column of `columns`, or kEmpty) from up to 8 groups (groups[first,
// first + 8)): a group's columns stay in one group of 4 slots (the 2:4 pattern holds in any
// order), but which groups share loads and which of a group's columns load together is free.
// Chosen to spend the fewest shared-memory wavefronts: for every pair of groups the best of
// the 18 ways to split both into the two loads, then the best pairing of the 8 groups (105).
std::array<int, kMmaStepColumns> arrange_step(const std::vector<Column>& columns,
                                              const std::vector<Group>& groups, size_t first) {
  int member[8][4];
  for (int k = 0; k < 8; ++k)
    for (int i = 0; i < 4; ++i) {
      const size_t at = first + size_t(k);
      member[k][i] = at < groups.size() && i < groups[at].count ? groups[at].columns[i] : kEmpty;
    }
  // Positions 0-3 of a group: which two load together (e = 0: positions 0 and 2).
  static constexpr int kSplits[3][4] = {{0, 1, 2, 3}, {0, 2, 1, 3}, {0, 3, 1, 2}};
  int best_cost[8][8];
  int best_layout[8][8][2][4];  // [a][b]: a's and b's columns by position
  for (int a = 0; a < 8; ++a)
    for (int b = a + 1; b < 8; ++b) {
      best_cost[a][b] = std::numeric_limits<int>::max();
      for (const auto& sa : kSplits)
        for (const auto& sb : kSplits)
          for (int swap = 0; swap < 2; ++swap) {
            int pa[4], pb[4];
            for (int i = 0; i < 4; ++i) {
              pa[i] = member[a][sa[i]];
              pb[i] = member[b][sb[swap ? (i ^ 1) : i]];
            }
            const int cost = pair_wavefronts(columns, pa, pb);
            if (cost < best_cost[a][b]) {
              best_cost[a][b] = cost;
              std::copy(pa, pa + 4, best_layout[a][b][0]);
              std::copy(pb, pb + 4, best_layout[a][b][1]);
            }
          }
    }
  // The cheapest perfect matching of the 8 groups into 4 load pairs, by exhaustive search.
  int pairs[4][2], best_pairs[4][2];
  int best_total = std::numeric_limits<int>::max();
  auto search = [&](auto&& self, unsigned used, int made, int total) -> void {
    if (total >= best_total) return;
    if (made == 4) {
      best_total = total;
      std::copy(&pairs[0][0], &pairs[0][0] + 8, &best_pairs[0][0]);
      return;
    }
    int a = 0;
    while (used & (1u << a)) ++a;
    for (int b = a + 1; b < 8; ++b) {
      if (used & (1u << b)) continue;
      pairs[made][0] = a;
      pairs[made][1] = b;
      self(self, used | (1u << a) | (1u << b), made + 1, total + best_cost[a][b]);
    }
  };
  search(search, 0u, 0, 0);
  std::array<int, kMmaStepColumns> slots;
  for (int i = 0; i < 4; ++i)
    for (int side = 0; side < 2; ++side)
      for (int position = 0; position < 4; ++position)
        slots[size_t(8 * i + 4 * side + position)] =
            best_layout[best_pairs[i][0]][best_pairs[i][1]][side][position];
  return slots;
}

// Writes the step whose 32 slots hold `slots` (arrange_step) at `out` (kMmaStepWords * 32
// words, word-group-major).
void write_step(const std::vector<Column>& columns, const std::array<int, kMmaStepColumns>& slots,
                uint32_t* out) {
  // Per row of the tile and group of the step: the two kept positions and their split weights.
  int kept[kMmaRows][8][2];
  Split value[kMmaRows][8][2];
  int32_t offset[kMmaStepColumns];
  for (int row = 0; row < kMmaRows; ++row)
    for (int k = 0; k < 8; ++k) {
      kept[row][k][0] = 0;
      kept[row][k][1] = 1;
      value[row][k][0] = value[row][k][1] = Split{0, 0};
    }
  for (int i = 0; i < 4; ++i)
    for (int e = 0; e < 2; ++e) {  // load (i, e) reads columns 8i + 2t + e
      int32_t loaded[4];
      load_offsets(columns,
                   {slots[size_t(8 * i + e)], slots[size_t(8 * i + 2 + e)],
                    slots[size_t(8 * i + 4 + e)], slots[size_t(8 * i + 6 + e)]},
                   loaded);
      for (int t = 0; t < 4; ++t) offset[8 * i + 2 * t + e] = loaded[t];
    }
  for (int k = 0; k < 8; ++k) {
    int found[kMmaRows] = {};
    int at[kMmaRows][2];
    float w[kMmaRows][2];
    for (int i = 0; i < 4; ++i) {
      const int c = slots[size_t(4 * k + i)];
      if (c == kEmpty) continue;
      for (const auto& [row, weight] : columns[size_t(c)].weights) {
        at[row][found[row]] = i;
        w[row][found[row]++] = weight;
      }
    }
    for (int row = 0; row < kMmaRows; ++row) {
      if (found[row] == 0) continue;
      if (found[row] == 1) {  // the other kept position: any other one, holding a zero
        at[row][1] = at[row][0] == 0 ? 1 : 0;
        w[row][1] = 0.f;
      }
      const int lower = at[row][0] < at[row][1] ? 0 : 1;
      for (int i = 0; i < 2; ++i) {
        kept[row][k][i] = at[row][i ^ lower];
        value[row][k][i] = split(w[row][i ^ lower]);
      }
    }
  }
  // The compressed 16 x 16 matrix of half h: column 2k + i is group k's i-th kept value.
  auto part = [&](int h, int row, int column, bool low) {
    const Split& s = value[16 * h + row][column / 2][column % 2];
    return low ? s.lo : s.hi;
  };
  auto metadata = [&](int h, int row) {
    uint32_t word = 0;
    for (int k = 0; k < 8; ++k)
      word |= uint32_t(kept[16 * h + row][k][0] | (kept[16 * h + row][k][1] << 2)) << (4 * k);
    return word;
  };
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    uint32_t words[kMmaStepWords] = {};
    for (int h = 0; h < 2; ++h)
      for (int low = 0; low < 2; ++low) {
        uint32_t* a = words + 8 * h + 4 * low;
        a[0] = pair(part(h, g, 2 * t, low), part(h, g, 2 * t + 1, low));
        a[1] = pair(part(h, g + 8, 2 * t, low), part(h, g + 8, 2 * t + 1, low));
        a[2] = pair(part(h, g, 2 * t + 8, low), part(h, g, 2 * t + 9, low));
        a[3] = pair(part(h, g + 8, 2 * t + 8, low), part(h, g + 8, 2 * t + 9, low));
      }
    if (t < 2)
      for (int h = 0; h < 2; ++h)
        words[16 + h] = ((metadata(h, g) >> (16 * t)) & 0xffffu) |
                        (((metadata(h, g + 8) >> (16 * t)) & 0xffffu) << 16);
    for (int i = 0; i < 4; ++i)
      words[18 + i] = pair(uint16_t(offset[8 * i + 2 * t]), uint16_t(offset[8 * i + 2 * t + 1]));
    for (int group = 0; group < kMmaStepWords / 4; ++group)
      for (int j = 0; j < 4; ++j) out[(group * 32 + lane) * 4 + j] = words[group * 4 + j];
  }
}

struct Program {
  std::vector<int32_t> begins;
  std::vector<uint32_t> steps;  // empty when only counted
};

// The program of g; with write false, only its begins (what the size needs: the packing, not
// the steps' words).
Program build(const Geometry& g, const MmaPlan& plan, const int64_t* row_ptr,
              const int32_t* offsets, const float* values, bool write) {
  const int64_t cs = g.layout.channel_stride, row = g.layout.plane_w;
  Program p;
  int64_t steps = 0;
  p.begins.reserve(size_t(plan.tiles * plan.chunks + 1));
  const size_t step_words = size_t(kMmaStepWords * 32);
  for (int64_t tile = 0; tile < plan.tiles; ++tile) {
    // The tile's nonzeros as (chunk, shared offset, row, weight), in column order.
    struct Entry {
      int64_t chunk;
      int32_t shared_offset;
      int row;
      float weight;
    };
    std::vector<Entry> entries;
    const int64_t tile_rows = std::min(kMmaRows, g.d.out_channels - tile * kMmaRows);
    for (int tile_row = 0; tile_row < tile_rows; ++tile_row) {
      const int64_t m = tile * kMmaRows + tile_row;
      for (int64_t j = row_ptr[m]; j < row_ptr[m + 1]; ++j) {
        // The offset's row and column in the public layout, moved to the kernel's rows.
        const int64_t channel = offsets[j] / cs, within_public = offsets[j] % cs;
        const int64_t within =
            within_public / row * g.mma_layout.plane_w + within_public % row;
        entries.push_back({channel / plan.chunk_channels,
                           int32_t(channel % plan.chunk_channels * plan.span_stride + within),
                           tile_row, values[j]});
      }
    }
    std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
      return a.chunk != b.chunk ? a.chunk < b.chunk : a.shared_offset < b.shared_offset;
    });
    size_t e = 0;
    for (int64_t chunk = 0; chunk < plan.chunks; ++chunk) {
      if (steps > std::numeric_limits<int32_t>::max())
        fail_invalid("the filter needs too many steps for the tensor-core kernel");
      p.begins.push_back(int32_t(steps));
      std::vector<Column> columns;
      for (; e < entries.size() && entries[e].chunk == chunk; ++e) {
        if (columns.empty() || columns.back().shared_offset != entries[e].shared_offset)
          columns.push_back({entries[e].shared_offset, 0u, {}});
        Column& column = columns.back();
        // A CSR may repeat a column within a row: such weights add, as on every other path.
        auto same = std::find_if(column.weights.begin(), column.weights.end(),
                                 [&](const auto& rw) { return rw.first == entries[e].row; });
        if (same != column.weights.end()) {
          same->second += entries[e].weight;
        } else {
          column.weights.emplace_back(entries[e].row, entries[e].weight);
          column.rows |= 1u << entries[e].row;
        }
      }
      const std::vector<Group> groups = pack(columns);
      for (size_t first = 0; first < groups.size(); first += 8, ++steps) {
        if (!write) continue;
        p.steps.resize(p.steps.size() + step_words);
        write_step(columns, arrange_step(columns, groups, first),
                   p.steps.data() + p.steps.size() - step_words);
      }
    }
  }
  if (steps > std::numeric_limits<int32_t>::max())
    fail_invalid("the filter needs too many steps for the tensor-core kernel");
  p.begins.push_back(int32_t(steps));
  return p;
}

}  // namespace
}  // namespace escoin

extern "C" escoin_status_t escoin_mma_program_size(const escoin_conv_desc_t* desc,
                                                   const int64_t* row_ptr, const int32_t* offsets,
                                                   const float* values, size_t* bytes) {
  return escoin::guarded([&] {
    escoin::require_pointer(bytes, "bytes");
    const escoin::Geometry g = escoin::make_geometry(desc);
    escoin::check_csr_for_geometry(g, row_ptr, offsets, values);
    const escoin::MmaPlan plan = escoin::mma_plan(g);
    if (!escoin::mma_kernel_runs(plan)) {
      *bytes = 0;
      return;
    }
    const escoin::Program p = escoin::build(g, plan, row_ptr, offsets, values, false);
    *bytes = (size_t(escoin::mma_steps_word(plan)) +
              size_t(p.begins.back()) * size_t(escoin::kMmaStepWords * 32)) * sizeof(uint32_t);
  });
}

extern "C" escoin_status_t escoin_mma_program_build(const escoin_conv_desc_t* desc,
                                                    const int64_t* row_ptr,
                                                    const int32_t* offsets, const float* values,
                                                    void* program, size_t bytes) {
  return escoin::guarded([&] {
    escoin::require_pointer(program, "program");
    const escoin::Geometry g = escoin::make_geometry(desc);
    escoin::check_csr_for_geometry(g, row_ptr, offsets, values);
    const escoin::MmaPlan plan = escoin::mma_plan(g);
    if (!escoin::mma_kernel_runs(plan))
      escoin::fail_invalid("the tensor-core kernel cannot run this geometry "
                           "(escoin_mma_program_size gave 0 bytes); pass no MMA program");
    const escoin::Program p = escoin::build(g, plan, row_ptr, offsets, values, true);
    const int64_t steps_at = escoin::mma_steps_word(plan);
    const size_t words = size_t(steps_at) + p.steps.size();
    if (bytes < words * sizeof(uint32_t))
      escoin::fail_invalid("program has ", bytes, " bytes, the MMA program needs ",
                           words * sizeof(uint32_t));
    auto* out = static_cast<uint32_t*>(program);
    std::memset(out, 0, size_t(steps_at) * sizeof(uint32_t));
    out[0] = uint32_t(escoin::kMmaProgramMagic);
    out[1] = uint32_t(plan.tiles);
    out[2] = uint32_t(plan.chunks);
    out[3] = uint32_t(p.begins.back());
    std::copy(p.begins.begin(), p.begins.end(), reinterpret_cast<int32_t*>(out) +
                                                    escoin::kMmaHeaderWords);
    std::copy(p.steps.begin(), p.steps.end(), out + steps_at);
  });
}
