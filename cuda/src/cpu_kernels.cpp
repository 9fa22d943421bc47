// cpu_kernels.cpp -- the CPU direct sparse convolution (compiled once per ISA; see the header):
// the stretch (cpu_stretch.hpp), then the tiles below.
//
// The output plane of one (image, output channel) is walked in the stretched coordinates
// q = oh * plane_w + ow, where every tap (c, r, s) of the filter reads the stretched input at
// offset(c, r, s) + q: a unit-stride run for every stride and dilation. A tile of TILE
// consecutive q stays in vector registers while the loop runs over the channel's nonzeros:
//     acc[0..TILE) += value[j] * stretched[offset[j] + q0 .. + TILE)
// one load per FMA, no stores inside the loop. Columns q with ow >= out_width are computed and
// dropped (a (kernel_w - 1) / out_width share of the work).
#include <algorithm>
#include <cstdint>
#include <type_traits>

#ifndef ESCOIN_CPU_ISA
#error "ESCOIN_CPU_ISA must name the variant being compiled"
#endif

#include "cpu_kernels.hpp"
#include "cpu_stretch.hpp"
#include "cpu_threads.hpp"
#include "cpu_vectors.hpp"
#include "forward_checks.hpp"

namespace escoin {
namespace ESCOIN_CPU_ISA {
namespace {

// Output channels handled per work item: enough to amortise the tile's index bookkeeping while
// the item's input rows stay in cache, few enough to give two cores work at batch 1.
constexpr int64_t kChannelsPerItem = 16;

// A run of consecutive lanes of a tile that lands in one output row: lanes [lane, lane + length)
// go to output elements [dest, dest + length) of the (image, channel) plane.
struct Segment {
  int lane, length;
  int64_t dest;
};

// Splits the tile starting at q0 into its row segments, skipping dropped columns; returns how many.
template <int TILE>
int tile_segments(const Geometry& g, int64_t q0, Segment segments[TILE]) {
  const int64_t plane_w = g.layout.plane_w, out_width = g.layout.out_width;
  int count = 0;
  for (int lane = 0; lane < TILE;) {
    const int64_t q = q0 + lane, oh = q / plane_w, ow = q % plane_w;
    if (oh >= g.layout.out_height) break;
    if (ow >= out_width) {  // dropped columns up to the next row
      lane += int(plane_w - ow);
      continue;
    }
    const int length = int(std::min<int64_t>(out_width - ow, TILE - lane));
    segments[count++] = Segment{lane, length, oh * out_width + ow};
    lane += length;
  }
  return count;
}

// Input channels per pass over a tile: the tile's input rows of that many channels (and the
// block's partial sums) should stay in the 32-48 KiB L1 data cache while every output channel
// of the block walks its nonzeros among them. Without this, each nonzero's load came from L2.
template <typename C, int TILE>
int64_t chunk_channels(const Geometry& g, int64_t nnz) {
  const escoin_conv_desc_t& d = g.d;
  const int64_t phases = g.layout.phases_h * g.layout.phases_w;
  const int64_t row_shift = (d.kernel_h - 1) * d.dilation_h / d.stride_h;
  const int64_t column_shift = (d.kernel_w - 1) * d.dilation_w / d.stride_w;
  const int64_t per_channel =
      phases * (TILE + row_shift * g.layout.plane_w + column_shift) * int64_t(sizeof(C));
  const int64_t fits_l1 = (24 << 10) / per_channel;
  // A pass also reloads and stores each channel's partial sums: keep a few dozen nonzeros per
  // row and pass so that this stays small against the products.
  const double nnz_per_row_channel =
      double(nnz) / double(std::max<int64_t>(1, d.out_channels * g.group_in));
  const int64_t enough_work = int64_t(24.0 / std::max(nnz_per_row_channel, 1e-3));
  return std::max<int64_t>(1, std::min(g.group_in, std::max(fits_l1, enough_work)));
}

// Where the kernel reads x in place (stretch_and_run), every tile reads x except the last
// image's last tile, whose overrun past the plane would read past x's end: it reads the
// workspace, where each channel's last plane_q - last_tile elements are copied at their place
// and the overrun is zeroed (into the next channel's start, short of that channel's own copy,
// and the slack after the image).
template <typename C>
void copy_last_tile(const Geometry& g, const C* x, C* ws, int64_t last_tile, int64_t tile) {
  const int64_t plane = g.layout.channel_stride;  // = H * W: x's own layout
  const int64_t first = (g.d.batch - 1) * g.layout.image_stride;
  const int64_t overrun = last_tile + tile - plane;
  for (int64_t c = 0; c < g.d.in_channels; ++c) {
    const int64_t at = first + c * plane;
    std::copy(x + at + last_tile, x + at + plane, ws + at + last_tile);
    std::fill(ws + at + plane, ws + at + plane + std::min(overrun, last_tile), C(0));
  }
  std::fill(ws + first + g.layout.image_stride, ws + first + g.layout.image_stride + g.tail_slack,
            C(0));
}

template <typename S, int TILE>
void run_tiles(const CpuConvArgs<S>& a) {
  using C = Compute<S>;
  using V = typename Vector<C>::type;
  constexpr int kLanes = Vector<C>::lanes;
  constexpr int kRegisters = TILE / kLanes;
  static_assert(TILE % kLanes == 0, "a tile is a whole number of vectors");
  const Geometry& g = *a.geometry;
  const int64_t groups = g.d.groups, out_channels = g.d.out_channels;
  const int64_t plane_q = g.layout.out_height * g.layout.plane_w;
  const int64_t tiles = (plane_q + TILE - 1) / TILE;
  const int64_t channel_blocks = (g.group_out + kChannelsPerItem - 1) / kChannelsPerItem;
  // Items ordered (image, group, tile, channel block): neighbours share input rows in cache.
  const int64_t items = g.d.batch * groups * tiles * channel_blocks;
  // Offsets grow with the input channel (offset / channel_stride), so "offset < limit" selects
  // a row's nonzeros of the channels below a chunk boundary. Rows need not be sorted: whatever a
  // pass leaves is taken by a later one, and the last limit exceeds every legal offset.
  const int64_t chunk_span =
      chunk_channels<C, TILE>(g, a.row_ptr[out_channels]) * g.layout.channel_stride;
  const int64_t last_limit = g.group_span + g.layout.plane_w;

  if (a.x_in_place) copy_last_tile(g, a.x_in_place, a.workspace, (tiles - 1) * TILE, TILE);

#pragma omp parallel for schedule(dynamic, 1) if (cpu_threads_usable())
  for (int64_t item = 0; item < items; ++item) {
    const int64_t block = item % channel_blocks;
    const int64_t tile = (item / channel_blocks) % tiles;
    const int64_t group = (item / (channel_blocks * tiles)) % groups;
    const int64_t n = item / (channel_blocks * tiles * groups);
    const int64_t q0 = tile * TILE;
    const bool reads_x = a.x_in_place != nullptr && (n + 1 < g.d.batch || tile + 1 < tiles);
    const C* base = reads_x ? a.x_in_place : a.workspace;
    const C* in = base + n * g.layout.image_stride + group * g.group_span + q0;
    const int64_t m_begin = group * g.group_out + block * kChannelsPerItem;
    const int channels = int(std::min(kChannelsPerItem, (group + 1) * g.group_out - m_begin));

    V partial[kChannelsPerItem][kRegisters];
    int64_t cursor[kChannelsPerItem];
    for (int i = 0; i < channels; ++i) {
      cursor[i] = a.row_ptr[m_begin + i];
      for (int r = 0; r < kRegisters; ++r) partial[i][r] = V{};
    }
    for (int64_t limit = chunk_span;; limit += chunk_span) {
      for (int i = 0; i < channels; ++i) {
        const int64_t row_end = a.row_ptr[m_begin + i + 1];
        int64_t j = cursor[i];
        if (j == row_end || a.offsets[j] >= limit) continue;
        // Each pass sums from zero, then adds to the partial sums: sums in blocks of a pass's
        // few dozen products gather less rounding error than one running sum over a long row
        // (4.5x less in float32 at 4096 channels, 3x3). A row's first pass stores its sum,
        // which also leaves one-pass rows (1x1 layers) with no add.
        const bool first_pass = j == a.row_ptr[m_begin + i];
        V acc[kRegisters];
        for (int r = 0; r < kRegisters; ++r) acc[r] = V{};
        for (; j < row_end && a.offsets[j] < limit; ++j) {
          const V v = a.values[j] - V{};  // broadcast (x - 0 folds to x, unlike 0 + x)
          const C* src = in + a.offsets[j];
#pragma GCC unroll 16
          for (int r = 0; r < kRegisters; ++r) acc[r] += v * Vector<C>::load(src + r * kLanes);
        }
        if (first_pass)
          for (int r = 0; r < kRegisters; ++r) partial[i][r] = acc[r];
        else
          for (int r = 0; r < kRegisters; ++r) partial[i][r] += acc[r];
        cursor[i] = j;
      }
      if (limit >= last_limit) break;
    }

    // Epilogue in vectors (bias, residual, ReLU), then one converted copy per output-row
    // segment: with few nonzeros per channel, a per-lane epilogue would cost more than the
    // products. The residual's segments are widened into the tile's lanes (the dropped lanes
    // stay zero), so that one path serves calls with and without it.
    Segment segments[TILE];
    const int segment_count = tile_segments<TILE>(g, q0, segments);
    C residual_lanes[TILE];
    if (a.residual) std::fill(residual_lanes, residual_lanes + TILE, C(0));
    for (int i = 0; i < channels; ++i) {
      const int64_t m = m_begin + i;
      const V bias = (a.bias ? widen(a.bias[m]) : C(0)) - V{};
      const int64_t plane = (n * out_channels + m) * g.out_plane;
      if (a.residual)
        for (int k = 0; k < segment_count; ++k)
          widen_run(a.residual + plane + segments[k].dest, residual_lanes + segments[k].lane,
                    segments[k].length);
      C sums[TILE];
      for (int r = 0; r < kRegisters; ++r) {
        V t = partial[i][r] + bias;
        if (a.residual) t += Vector<C>::load(residual_lanes + r * kLanes);
        if (a.relu) t = t < V{} ? V{} : t;  // NaN passes, as in torch
        std::memcpy(sums + r * kLanes, &t, sizeof t);
      }
      S* out = a.y + plane;
      for (int k = 0; k < segment_count; ++k)
        narrow_run(sums + segments[k].lane, out + segments[k].dest, segments[k].length);
    }
  }
}

// Eight vector registers of accumulators keep both FMA pipes busy through the FMA latency; a
// smaller tile serves small output planes, where a wide tile would mostly compute dropped lanes.
template <typename S>
constexpr int kWideTile = 8 * ESCOIN_VECTOR_BYTES / int(sizeof(Compute<S>));

template <typename S>
void dispatch_tile(const CpuConvArgs<S>& a) {
  constexpr int kWide = kWideTile<S>;
  const int64_t plane_q = a.geometry->layout.out_height * a.geometry->layout.plane_w;
  if (plane_q >= 2 * kWide)
    run_tiles<S, kWide>(a);
  else if (plane_q >= kWide / 2)
    run_tiles<S, kWide / 2>(a);
  else
    run_tiles<S, kWide / 4>(a);
}

// Where x is already in the stretched layout (a 1x1 filter at stride 1 without padding, on
// planes of a multiple of 4 elements), needs no widening and is not overwritten by y, the kernel
// reads it in place, with no stretch (copy_last_tile). An image's last tile reads up to a tile
// past the image, into the next one: images smaller than a tile are stretched, or that read
// would leave x from an image before the last.
template <typename S>
void stretch_and_run(const CpuConvArgs<S>& args) {
  if constexpr (std::is_same_v<S, Compute<S>>) {
    const Geometry& g = *args.geometry;
    if (input_already_stretched(g) && g.layout.image_stride >= kWideTile<S> &&
        !output_overlaps_input(g, sizeof(S), args.x, args.y)) {
      CpuConvArgs<S> in_place = args;
      in_place.x_in_place = args.x;
      return dispatch_tile(in_place);
    }
  }
  stretch_input(*args.geometry, args.x, args.workspace);
  dispatch_tile(args);
}

}  // namespace

void sparse_conv(const CpuConvArgs<float>& args) { stretch_and_run(args); }
void sparse_conv(const CpuConvArgs<double>& args) { stretch_and_run(args); }
void sparse_conv(const CpuConvArgs<Float16>& args) { stretch_and_run(args); }
void sparse_conv(const CpuConvArgs<BFloat16>& args) { stretch_and_run(args); }

}  // namespace ESCOIN_CPU_ISA
}  // namespace escoin
