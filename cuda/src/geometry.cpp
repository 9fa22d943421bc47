// geometry.cpp -- descriptor validation, the stretched layout, workspace size, stretched offsets.
#include "geometry.hpp"

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <utility>

#include "error.hpp"

namespace escoin {
namespace {

void require_at_least(int64_t value, int64_t minimum, const char* name) {
  if (value < minimum) fail_invalid("desc.", name, " must be >= ", minimum, ", got ", value);
}

// Output extent of one axis, as torch.nn.functional.conv2d computes it.
int64_t out_extent(int64_t in, int64_t padded, int64_t dilation, int64_t kernel, int64_t stride) {
  const int64_t span = in + padded - dilation * (kernel - 1) - 1;
  return span < 0 ? 0 : span / stride + 1;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether the product of `factors` (each >= 1) is at most `limit` (>= 1), found without forming
// a product past it: padded extents near 2^32 on both axes multiply past int64.
bool product_at_most(std::initializer_list<int64_t> factors, int64_t limit) {
  int64_t product = 1;
  for (const int64_t factor : factors) {
    if (factor > limit / product) return false;
    product *= factor;
  }
  return true;
}

// The batch-1 grid the staged plan cuts its chunks small enough to reach: about a block per SM.
constexpr int64_t kSmallGridBlocks = 128;

// How many ranges to split each output channel's nonzeros into when a launch has too few blocks
// to fill an H100 (132 SMs) several times over; each split keeps at least 32 columns of the
// filter window, so a split still has work at 90% sparsity.
int64_t splits_for(int64_t blocks, int64_t window) {
  constexpr int64_t kTargetBlocks = 512, kMinColumnsPerSplit = 32;
  if (blocks >= kTargetBlocks) return 1;
  blocks = std::max<int64_t>(blocks, 1);
  return std::max<int64_t>(1, std::min({ceil_div(kTargetBlocks, blocks), kGpuMaxSplits,
                                        window / kMinColumnsPerSplit}));
}

// P (positions per thread): of 8, 4 and 2, the one that leaves the fewest empty positions in the
// plane's last tile, or, among choices within 10% of that, the largest (fewer, longer tiles, less
// of the filter's reach staged per position). Then 7 (one image a block) where that leaves at
// least 3% fewer positions than the choice: seven sums a thread load an entry per 7 FMAs instead
// of 8, but 14x14 planes (16 stretched columns: 224 positions) and 56-wide ones (3360 with the
// tensor copy's rows of 60) fill tiles of 7 x 32 exactly, and 13x13 ones waste 13% instead of 24%.
int64_t staged_positions(int64_t plane_q) {
  const int64_t choices[] = {8, 4, 2};
  auto padded = [&](int64_t p) { return ceil_div(plane_q, 32 * p) * 32 * p; };
  int64_t best = padded(2);
  for (int64_t p : choices) best = std::min(best, padded(p));
  int64_t chosen = 2;
  for (int64_t p : choices)
    if (padded(p) * 10 <= best * 11) {
      chosen = p;
      break;
    }
  return padded(7) * 100 < padded(chosen) * 97 ? 7 : chosen;
}

int64_t tiles_of(const escoin_layout_t& L, int64_t positions) {
  return ceil_div(L.out_height * L.plane_w, 32 * positions);
}

// The plan on stretched layout L: the public one, the tensor-copy layout (staged_plan), whose
// rows start `lead` zeros earlier, or x's own; chunks of a multiple of `channel_multiple`
// channels (0 channels where not even one multiple fits).
StagedPlan staged_plan_on(const Geometry& g, const escoin_layout_t& L, bool tensor_copy,
                          int64_t lead, int64_t channel_multiple = 1) {
  const escoin_conv_desc_t& d = g.d;
  StagedPlan s;
  s.layout = L;
  s.layout.image_stride = d.in_channels * L.channel_stride;
  s.tensor_copy = tensor_copy;
  s.reads_x = false;
  s.lead = lead;
  const int64_t plane_q = L.out_height * L.plane_w;
  s.positions = staged_positions(plane_q);
  s.images = kStagedProducts / s.positions;
  const int64_t tiles = tiles_of(L, s.positions);
  const int64_t share = staged_image_share(s.images);
  s.phases = L.phases_h * L.phases_w;
  s.phase_plane = L.plane_h * L.plane_w;
  // The largest offset of a tap inside its phase plane: the filter's reach past a position.
  const int64_t reach = (d.kernel_h - 1) * d.dilation_h / d.stride_h * L.plane_w +
                        (d.kernel_w - 1) * d.dilation_w / d.stride_w + lead;
  // A segment is copied from the copy_align boundary at or before its first element: phase
  // planes of a strided filter need not start on one, so their segments keep room for that
  // shift. A tensor copy starts at the row of the tile's first position, up to plane_w - 4
  // before it, and copies whole rows.
  s.copy_align = L.channel_stride % 8 == 0 ? 8 : 4;
  const bool shifted = s.phases > 1 && s.phase_plane % s.copy_align != 0;
  s.segment = tensor_copy ? ceil_div(L.plane_w - 4 + 32 * s.positions + reach, L.plane_w) *
                                L.plane_w
                          : ceil_div(32 * s.positions + reach + (shifted ? s.copy_align - 1 : 0),
                                     4) * 4;
  s.chunk_channels = std::min(g.group_in, share / (s.phases * s.segment));
  // Where one tile covers the plane, the tile reads all of each channel it stages, so an image's
  // chunk is one run of the input (its channels are channel_stride apart there): copied as one
  // piece instead of a segment per channel and phase (on a 7x7 1x1 layer, 4 copies per chunk
  // instead of 188). The tile's positions past the plane read up to 32 * P + reach past the
  // start of the chunk's last channel phase; their sums are discarded, but the reads must stay
  // inside the image's part of shared memory. (A launch may cut that tile in two, StagedLaunch:
  // each half copies the whole channels from its own first position and reads less past them.)
  // Valid positions read within their channel only where rows hold their right padding, which
  // staged_plan sees to for tensor-copy layouts.
  const int64_t whole_overrun = std::max<int64_t>(
      0, (s.phases - 1) * s.phase_plane + reach + 32 * s.positions - L.channel_stride);
  const int64_t whole_channels = (share - whole_overrun) / L.channel_stride;
  s.whole_channels = tiles == 1 && whole_channels > 0;
  if (s.whole_channels) {
    s.segment = L.channel_stride;
    s.chunk_channels = std::min(g.group_in, whole_channels);
  }
  s.items = d.groups * ceil_div(g.group_out, kStagedRows);
  // A batch-1 grid is the plane's tiles times the blocks of output channels, times the splits
  // of the chunks (at most one split per chunk): where that grid is small (rn.l3.3x3: 8 blocks
  // an image), chunks are cut smaller so that the splits can reach kSmallGridBlocks blocks.
  const int64_t image_blocks = tiles * s.items;
  const int64_t wanted_chunks = std::min(kGpuMaxSplits, ceil_div(kSmallGridBlocks, image_blocks));
  if (s.chunk_channels > 0)
    s.chunk_channels = std::min(s.chunk_channels, std::max(ceil_div(g.group_in, wanted_chunks),
                                                           channel_multiple)) /
                       channel_multiple * channel_multiple;
  s.chunks = s.chunk_channels > 0 ? ceil_div(g.group_in, s.chunk_channels) : 0;
  return s;
}

// Channels a chunk read from x's own layout holds a multiple of (plan_reading_x): an image's
// chunk then starts on 32 bytes, a whole sector, on any plane. Chunks of a multiple of 4 start
// on 16 bytes, enough for the copy, but half of them then start mid-sector: on a 7x7 plane
// (512 -> 2048 channels, batch 32, an H100) the staged kernel took 56.6 us instead of 50.4,
// reading 6% more sectors from L2 for 6% less data; with multiples of 8, 50.5 us.
constexpr int64_t kReadXChannelMultiple = 8;

// The plan on x's own layout where a 1x1 filter reads x as it lies (StagedPlan::reads_x), if
// the staged kernel can copy it from there. On planes of a multiple of 4 elements x is the public
// layout. On others its channels are H * W elements apart, not 16-byte aligned each: the kernel
// then copies whole channels (one tile covers the plane), an image's chunk as one run of x from
// its first channel, aligned where that channel, the channel count and the channels per group
// and per image are multiples of kReadXChannelMultiple. (A 7x7 plane otherwise had a stretch
// into 52-element channels before every call.)
bool plan_reading_x(const Geometry& g, StagedPlan* plan) {
  if (input_already_stretched(g)) {
    *plan = staged_plan_on(g, g.layout, false, 0);
    plan->reads_x = true;
    return true;
  }
  const escoin_conv_desc_t& d = g.d;
  const bool unpadded_1x1 = d.kernel_h == 1 && d.kernel_w == 1 && d.stride_h == 1 &&
                            d.stride_w == 1 && d.pad_top == 0 && d.pad_bottom == 0 &&
                            d.pad_left == 0 && d.pad_right == 0;
  if (!unpadded_1x1 || g.group_in % kReadXChannelMultiple != 0 ||
      d.in_channels % kReadXChannelMultiple != 0)
    return false;
  escoin_layout_t L = g.layout;
  L.channel_stride = d.in_height * d.in_width;
  StagedPlan s = staged_plan_on(g, L, false, 0, kReadXChannelMultiple);
  if (!s.whole_channels || s.chunk_channels == 0) return false;
  s.reads_x = true;
  *plan = s;
  return true;
}

// The plan on x's own layout where that works, else with tensor copies
// (StagedPlan::tensor_copy) where the geometry allows them, else on the public layout.
StagedPlan staged_plan(const Geometry& g) {
  StagedPlan reading_x;
  if (plan_reading_x(g, &reading_x)) return reading_x;
  const escoin_conv_desc_t& d = g.d;
  // A row of the tensor-copy layout: box_left zeros (a multiple of 4, the box's first column),
  // x's row, zeros to a multiple of 4. The right padding a tap reads past the row's end is the
  // next row's leading zeros, so a row need not hold it: 28 + 1 + 1 becomes 4 + 28 = 32. That
  // holds within a segment, whose reads end before its last row does; a whole-channel chunk's
  // last channel has no next row in shared memory, so there the rows hold their padding.
  const int64_t box_left = ceil_div(d.pad_left, 4) * 4;
  const int64_t lead = box_left - d.pad_left;
  const bool eligible = d.stride_h == 1 && d.stride_w == 1 && d.in_width % 4 == 0;
  for (const int64_t right : {int64_t{0}, d.pad_right}) {  // rows without, then with it
    escoin_layout_t L = g.layout;
    L.plane_w = ceil_div(std::max({box_left + d.in_width + right, d.in_width + d.pad_right,
                                   L.out_width}),
                         4) * 4;
    L.channel_stride = L.plane_h * L.plane_w;
    if (!eligible || L.plane_w > kTensorBoxMax ||
        L.channel_stride > std::numeric_limits<int32_t>::max() / g.group_in)
      break;
    const StagedPlan s = staged_plan_on(g, L, true, lead);
    const bool wraps = box_left + d.in_width + d.pad_right > L.plane_w;
    if (s.chunk_channels > 0 && s.chunk_channels <= kTensorBoxMax &&
        s.segment / L.plane_w <= kTensorBoxMax && !(s.whole_channels && wraps))
      return s;
  }
  // The public layout, its channels a multiple of 8 elements apart (the stretch writes this
  // layout for the staged kernel): every chunk and segment copy then starts on a 32-byte sector.
  // (Copies starting mid-sector read more sectors: measured on a 1x1 layer, "x read directly by
  // 1x1 filters" in docs/performance.md.) Not where that would take a group's span past the
  // 32-bit offsets make_geometry checked the public layout for: 4 apart there, as it is.
  escoin_layout_t L = g.layout;
  const int64_t sector_aligned = ceil_div(L.channel_stride, 8) * 8;
  if (sector_aligned <= std::numeric_limits<int32_t>::max() / g.group_in)
    L.channel_stride = sector_aligned;
  return staged_plan_on(g, L, false, 0);
}

// The staged kernel's blocks for one split of the chunks, with tiles of 32 * positions and
// blocks of `images`: tiles x blocks of output channels x blocks of images.
int64_t staged_blocks_per_split(const Geometry& g, int64_t positions, int64_t images) {
  return staged_tiles(g, positions) * g.staged.items * ceil_div(g.d.batch, images);
}

struct SplitChoice {
  int64_t splits, cost;  // cost: waves x chunks per block
};

SplitChoice best_splits(const Geometry& g, int64_t resident_blocks, int64_t positions,
                        int64_t images) {
  const int64_t blocks = staged_blocks_per_split(g, positions, images);
  SplitChoice best{1, std::numeric_limits<int64_t>::max()};
  for (int64_t splits = 1; splits <= g.gpu_staged_splits; ++splits) {
    // A split costs about one chunk round more: its partial sums are written, read back and
    // added by a second kernel (rn.l1.1x1up at batch 1 on an H100: 13.6 us in two splits of
    // 128-position tiles, 8.4-10.6 us unsplit, which the cost without this term called equal).
    const int64_t cost = ceil_div(blocks * splits, resident_blocks) *
                             ceil_div(g.staged.chunks, splits) + (splits > 1 ? 1 : 0);
    if (cost < best.cost) best = {splits, cost};
  }
  return best;
}

}  // namespace

int64_t staged_tiles(const Geometry& g, int64_t positions) {
  return tiles_of(g.staged.layout, positions);
}

int64_t staged_jobs(const Geometry& g, const StagedLaunch& launch) {
  return staged_blocks_per_split(g, launch.positions, launch.images);
}

int64_t tail_block_outputs(const StagedLaunch& launch) {
  return launch.images * kStagedRows * 32 * launch.positions;
}

int64_t tail_partial_offset(const Geometry& g, const StagedLaunch& launch) {
  return launch.splits > 1 ? launch.splits * g.d.batch * g.d.out_channels * g.out_plane : 0;
}

StagedLaunch staged_launch(const Geometry& g, int64_t sms, int64_t blocks_per_sm) {
  sms = std::max<int64_t>(sms, 1);
  blocks_per_sm = std::max<int64_t>(blocks_per_sm, 1);
  const int64_t resident_blocks = sms * blocks_per_sm;
  StagedLaunch launch{1, g.staged.positions, 1, 0, 0};
  while (launch.images < g.d.batch && launch.images < g.staged.images) launch.images *= 2;
  const SplitChoice plan = best_splits(g, resident_blocks, launch.positions, launch.images);
  launch.splits = plan.splits;
  if (launch.positions > 2) {
    const int64_t half_positions = (launch.positions + 1) / 2;  // 7 halves to 4
    const SplitChoice half = best_splits(g, resident_blocks, half_positions, launch.images);
    if (half.cost <= plan.cost && half.splits <= plan.splits)
      launch = {launch.images, half_positions, half.splits, 0, 0};
  }
  // The uneven form: the even form's blocks as far as they fill whole rounds of the SMs (the lead
  // jobs), the jobs after them (the tail) in more, shorter blocks. A tail block is never longer
  // than a lead one: a whole job where the even form split it left an SM running it alone
  // (vgg.c2_2 at batch 1 on an H100, 1.40x slower). The split lead jobs' partial sums stay in the
  // even form's layout, which the reduction adds on a flat index (adding them in the tail's
  // layout, each output's place worked out from its job's, cost 22.3 us on vgg.c2_2 against the
  // reduction's 5.9; docs/performance.md).
  const int64_t jobs = staged_jobs(g, launch), chunks = g.staged.chunks;
  const int64_t splits = launch.splits, even_blocks = jobs * splits;
  const int64_t rounds = even_blocks / sms, lead_jobs = rounds * sms / splits;
  const int64_t tail_room = g.partial_elements - tail_partial_offset(g, launch);
  // Split lead jobs need blocks of one image, whose jobs follow y's order (the reduction finds
  // the tail's outputs by their place in y), and a y of 32-bit indices.
  const bool finds_tail = launch.images == 1 &&
                          g.d.batch * g.d.out_channels * g.out_plane <=
                              std::numeric_limits<int32_t>::max();
  if (lead_jobs == 0 || even_blocks % sms == 0 || tail_room <= 0 ||
      (splits > 1 && !finds_tail) ||
      jobs > std::numeric_limits<int32_t>::max() / kGpuMaxSplits ||
      chunks > std::numeric_limits<int32_t>::max() / kGpuMaxSplits)
    return launch;
  const int64_t tail_jobs = jobs - lead_jobs;
  const int64_t gap = rounds * sms - lead_jobs * splits;  // the last lead round's slots left
  const int64_t lead_block_rounds = ceil_div(chunks, splits);
  int64_t best = ceil_div(even_blocks, sms) * lead_block_rounds + (splits > 1 ? 1 : 0);
  const StagedLaunch even = launch;
  for (int64_t tail_splits = splits + 1; tail_splits <= std::min(kGpuMaxSplits, chunks);
       ++tail_splits) {
    const int64_t tail_blocks = tail_jobs * tail_splits;
    if (tail_blocks * tail_block_outputs(even) > tail_room) break;  // more take more
    // Where the even form is one wave, so is this: no SM gets more blocks than it holds.
    const int64_t blocks = lead_jobs * splits + tail_blocks;
    if (rounds < blocks_per_sm && ceil_div(blocks, sms) > blocks_per_sm) continue;
    const int64_t cost = rounds * lead_block_rounds +
                         ceil_div(std::max<int64_t>(tail_blocks - gap, 0), sms) *
                             ceil_div(chunks, tail_splits) + 1;
    if (cost < best) {
      best = cost;
      launch = {even.images, even.positions, splits, lead_jobs, tail_splits};
    }
  }
  return launch;
}

int64_t stretched_offset(const Geometry& g, int64_t col) {
  const escoin_conv_desc_t& d = g.d;
  const int64_t taps = d.kernel_h * d.kernel_w;
  const int64_t c = col / taps, r = (col % taps) / d.kernel_w, s = col % d.kernel_w;
  const int64_t row_shift = r * d.dilation_h, col_shift = s * d.dilation_w;
  const int64_t phase = (row_shift % d.stride_h) * g.layout.phases_w + col_shift % d.stride_w;
  return c * g.layout.channel_stride + phase * g.layout.plane_h * g.layout.plane_w +
         (row_shift / d.stride_h) * g.layout.plane_w + col_shift / d.stride_w;
}

bool reads_a_tap(const Geometry& g, int64_t within) {
  const escoin_conv_desc_t& d = g.d;
  const int64_t plane = g.layout.plane_h * g.layout.plane_w;
  const int64_t phase = within / plane, rest = within % plane;
  const int64_t phases_w = g.layout.phases_w;
  if (within < 0 || phase >= g.layout.phases_h * phases_w) return false;  // or the alignment gap
  const int64_t row_shift = rest / g.layout.plane_w * d.stride_h + phase / phases_w;
  const int64_t col_shift = rest % g.layout.plane_w * d.stride_w + phase % phases_w;
  return row_shift % d.dilation_h == 0 && row_shift / d.dilation_h < d.kernel_h &&
         col_shift % d.dilation_w == 0 && col_shift / d.dilation_w < d.kernel_w;
}

size_t element_size(escoin_dtype_t dtype) {
  switch (dtype) {
    case ESCOIN_FLOAT32: return 4;
    case ESCOIN_FLOAT64: return 8;
    case ESCOIN_FLOAT16:
    case ESCOIN_BFLOAT16: return 2;
  }
  fail_invalid("dtype must be ESCOIN_FLOAT32, ESCOIN_FLOAT64, ESCOIN_FLOAT16 or ESCOIN_BFLOAT16, "
               "got ", static_cast<int>(dtype));
}

size_t compute_element_size(escoin_dtype_t dtype) {
  return element_size(dtype) == 8 ? 8 : 4;
}

size_t workspace_bytes(const Geometry& g, escoin_dtype_t dtype) {
  const size_t elem = compute_element_size(dtype);
  const double image = double(std::max(g.layout.image_stride, g.staged.layout.image_stride));
  const double total =
      (double(g.d.batch) * image + double(g.tail_slack) + double(g.partial_elements)) *
      double(elem);
  if (total > double(std::numeric_limits<int64_t>::max() / 2))
    fail_invalid("the workspace would need ", total, " bytes");
  return (size_t(stretched_input_elements(g)) + size_t(g.tail_slack) +
          size_t(g.partial_elements)) * elem;
}

size_t mma_workspace_bytes(const Geometry& g) {
  const double total =
      (double(g.d.batch) * double(g.mma_layout.image_stride) + double(g.tail_slack)) * 4.0;
  if (total > double(std::numeric_limits<int64_t>::max() / 2))
    fail_invalid("the workspace would need ", total, " bytes");
  return (size_t(g.d.batch * g.mma_layout.image_stride) + size_t(g.tail_slack)) * 4;
}

namespace {

// Every field of d in range (each error names the field).
void check_desc(const escoin_conv_desc_t& d) {
  require_at_least(d.batch, 0, "batch");
  require_at_least(d.in_channels, 1, "in_channels");
  require_at_least(d.in_height, 1, "in_height");
  require_at_least(d.in_width, 1, "in_width");
  require_at_least(d.out_channels, 1, "out_channels");
  require_at_least(d.kernel_h, 1, "kernel_h");
  require_at_least(d.kernel_w, 1, "kernel_w");
  require_at_least(d.stride_h, 1, "stride_h");
  require_at_least(d.stride_w, 1, "stride_w");
  require_at_least(d.pad_top, 0, "pad_top");
  require_at_least(d.pad_bottom, 0, "pad_bottom");
  require_at_least(d.pad_left, 0, "pad_left");
  require_at_least(d.pad_right, 0, "pad_right");
  require_at_least(d.dilation_h, 1, "dilation_h");
  require_at_least(d.dilation_w, 1, "dilation_w");
  require_at_least(d.groups, 1, "groups");
  if (d.in_channels % d.groups != 0)
    fail_invalid("desc.in_channels (", d.in_channels, ") must be divisible by desc.groups (",
                 d.groups, ")");
  if (d.out_channels % d.groups != 0)
    fail_invalid("desc.out_channels (", d.out_channels, ") must be divisible by desc.groups (",
                 d.groups, ")");
  // Generous caps keep every product below int64 overflow before the finer checks run.
  const int64_t cap = int64_t(1) << 31;
  const std::pair<int64_t, const char*> fields[] = {
      {d.batch, "batch"},          {d.in_channels, "in_channels"}, {d.in_height, "in_height"},
      {d.in_width, "in_width"},    {d.out_channels, "out_channels"}, {d.kernel_h, "kernel_h"},
      {d.kernel_w, "kernel_w"},    {d.stride_h, "stride_h"},       {d.stride_w, "stride_w"},
      {d.pad_top, "pad_top"},      {d.pad_bottom, "pad_bottom"},   {d.pad_left, "pad_left"},
      {d.pad_right, "pad_right"},  {d.dilation_h, "dilation_h"},   {d.dilation_w, "dilation_w"}};
  for (const auto& [value, name] : fields)
    if (value >= cap) fail_invalid("desc.", name, " is ", value, ", over the supported 2^31 - 1");
}

}  // namespace

Geometry make_geometry(const escoin_conv_desc_t* desc) {
  require_pointer(desc, "desc");
  check_desc(*desc);
  Geometry g;
  g.d = *desc;
  const escoin_conv_desc_t& d = g.d;
  // A stride past the padded input's last window start leaves one output along its axis, and
  // any such stride gives the same convolution: it is taken as that extent (the smallest stride
  // with one output), so that the stretch's stride x stride phase planes stay within the input's
  // size (a 5x5 input at stride 10000 would otherwise need 10^8 of them). With an extent of 1
  // that is stride 1, whose planes are then the padded input itself, as the other stride-1 plans
  // assume.
  g.d.stride_h = std::min(d.stride_h, std::max<int64_t>(1, d.in_height + d.pad_top +
                                                             d.pad_bottom -
                                                             d.dilation_h * (d.kernel_h - 1)));
  g.d.stride_w = std::min(d.stride_w, std::max<int64_t>(1, d.in_width + d.pad_left +
                                                             d.pad_right -
                                                             d.dilation_w * (d.kernel_w - 1)));
  // (d is g.d: everything below sees the strides as taken.)
  escoin_layout_t& L = g.layout;
  L.out_height = out_extent(d.in_height, d.pad_top + d.pad_bottom, d.dilation_h, d.kernel_h,
                            d.stride_h);
  L.out_width = out_extent(d.in_width, d.pad_left + d.pad_right, d.dilation_w, d.kernel_w,
                           d.stride_w);
  if (L.out_height < 1 || L.out_width < 1)
    fail_invalid("the dilated kernel (", d.dilation_h * (d.kernel_h - 1) + 1, "x",
                 d.dilation_w * (d.kernel_w - 1) + 1, ") is larger than the padded input (",
                 d.in_height + d.pad_top + d.pad_bottom, "x",
                 d.in_width + d.pad_left + d.pad_right, ")");
  // Phase planes: output row oh reads plane row oh + (r * dilation_h) / stride_h, so a plane needs
  // out_height + the largest tap shift rows; columns likewise.
  L.plane_h = L.out_height + (d.kernel_h - 1) * d.dilation_h / d.stride_h;
  L.plane_w = L.out_width + (d.kernel_w - 1) * d.dilation_w / d.stride_w;
  // A tap reads phase row r * dilation_h mod stride_h: only row 0 where every shift is a
  // multiple of the stride (a 1x1 filter, or a dilation that is a multiple of the stride), so
  // the other phases are not stretched at all.
  L.phases_h = d.kernel_h == 1 || d.dilation_h % d.stride_h == 0 ? 1 : d.stride_h;
  L.phases_w = d.kernel_w == 1 || d.dilation_w % d.stride_w == 0 ? 1 : d.stride_w;
  g.group_in = d.in_channels / d.groups;
  g.group_out = d.out_channels / d.groups;
  // A group of one image is addressed by 32-bit offsets. Checked on the factors first: their
  // product can pass int64 (it would wrap, to a channel stride of 0 or below).
  const int64_t most_per_channel = std::numeric_limits<int32_t>::max() / g.group_in;
  auto fail_too_large = [&] {
    fail_invalid("one group of one image needs ", g.group_in, " x ", L.phases_h, " x ",
                 L.phases_w, " x ", L.plane_h, " x ", L.plane_w,
                 " stretched elements (channels x phase planes x plane rows x plane columns),"
                 " over the 2^31 that 32-bit offsets address; split the input spatially or use"
                 " more groups");
  };
  if (!product_at_most({L.phases_h, L.phases_w, L.plane_h, L.plane_w}, most_per_channel))
    fail_too_large();
  // Rounded up to 4 elements so that every channel, group and image starts 16-byte aligned:
  // the staged CUDA kernel copies the input into shared memory in 16-byte units (bulk copies).
  L.channel_stride = ceil_div(L.phases_h * L.phases_w * L.plane_h * L.plane_w, 4) * 4;
  if (L.channel_stride > most_per_channel) fail_too_large();
  g.window = g.group_in * d.kernel_h * d.kernel_w;
  g.out_plane = L.out_height * L.out_width;
  if (g.window > std::numeric_limits<int32_t>::max())
    fail_invalid("the filter window (C/groups*kh*kw = ", g.window, ") exceeds 2^31 - 1");
  g.group_span = g.group_in * L.channel_stride;
  const int64_t images = d.batch >= kGpuImagesPerBlock ? kGpuImagesPerBlock : 1;
  const int64_t plane_q = L.out_height * L.plane_w;
  g.gpu_splits = splits_for(ceil_div(plane_q, kGpuPositionsPerBlock) * d.groups *
                                ceil_div(g.group_out, kGpuChannelsPerBlock) *
                                std::max<int64_t>(1, ceil_div(d.batch, images)),
                            g.window);
  g.staged = staged_plan(g);
  // The streaming kernel overruns by up to a tile (kMaxTile) + plane_w, the staged kernel by up
  // to its tile (kStagedMaxPositions) + plane_w of its layout.
  g.tail_slack = std::max(kMaxTile, kStagedMaxPositions) +
                 std::max(L.plane_w, g.staged.layout.plane_w);
  g.gpu_staged_splits =
      g.staged.chunk_channels == 0
          ? 1
          : std::min(g.staged.chunks,
                     splits_for(staged_blocks_per_split(g, g.staged.positions, g.staged.images),
                                g.window));
  const int64_t splits = std::max(g.gpu_splits, g.gpu_staged_splits);
  g.partial_elements = splits > 1 ? splits * d.batch * d.out_channels * g.out_plane : 0;
  L.image_stride = d.in_channels * L.channel_stride;
  g.mma_layout = L;
  if (L.phases_h * L.phases_w == 1) {
    escoin_layout_t& M = g.mma_layout;
    M.plane_w = ceil_div(L.plane_w, 8) * 8;
    M.channel_stride = M.plane_h * M.plane_w;
    M.image_stride = d.in_channels * M.channel_stride;
    if (M.channel_stride > std::numeric_limits<int32_t>::max() / g.group_in) M = L;
  }
  return g;
}

}  // namespace escoin

using escoin::Geometry;

extern "C" escoin_status_t escoin_conv_layout(const escoin_conv_desc_t* desc,
                                              escoin_layout_t* layout) {
  return escoin::guarded([&] {
    escoin::require_pointer(layout, "layout");
    *layout = escoin::make_geometry(desc).layout;
  });
}

extern "C" escoin_status_t escoin_workspace_size(const escoin_conv_desc_t* desc,
                                                 escoin_dtype_t dtype, size_t* bytes) {
  return escoin::guarded([&] {
    escoin::require_pointer(bytes, "bytes");
    *bytes = escoin::workspace_bytes(escoin::make_geometry(desc), dtype);
  });
}

extern "C" escoin_status_t escoin_mma_workspace_size(const escoin_conv_desc_t* desc,
                                                     size_t* bytes) {
  return escoin::guarded([&] {
    escoin::require_pointer(bytes, "bytes");
    *bytes = escoin::mma_workspace_bytes(escoin::make_geometry(desc));
  });
}

extern "C" escoin_status_t escoin_stretch_offsets(const escoin_conv_desc_t* desc,
                                                  const int32_t* col_idx, int64_t nnz,
                                                  int32_t* offsets) {
  return escoin::guarded([&] {
    const Geometry g = escoin::make_geometry(desc);
    if (nnz < 0) escoin::fail_invalid("nnz must be >= 0, got ", nnz);
    if (nnz > 0) {
      escoin::require_pointer(col_idx, "col_idx");
      escoin::require_pointer(offsets, "offsets");
    }
    for (int64_t j = 0; j < nnz; ++j) {
      const int64_t col = col_idx[j];
      if (col < 0 || col >= g.window)
        escoin::fail_invalid("col_idx[", j, "] = ", col, " is outside the filter window [0, ",
                             g.window, ")");
      offsets[j] = static_cast<int32_t>(escoin::stretched_offset(g, col));
    }
  });
}
