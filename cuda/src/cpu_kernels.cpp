// cpu_kernels.cpp -- the CPU direct sparse convolution (compiled once per ISA; see the header).
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
#include <vector>

#include "cpu_kernels.hpp"

#ifndef ESCOIN_CPU_ISA
#error "ESCOIN_CPU_ISA must name the variant being compiled"
#endif
#ifndef ESCOIN_VECTOR_BYTES
#error "ESCOIN_VECTOR_BYTES must give the variant's vector register width"
#endif

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

// A vector of ESCOIN_VECTOR_BYTES (GCC/Clang vector extension): the accumulators are explicit
// registers, so the compiler cannot interchange the loops or keep the tile in memory (it did both
// when the tile was a plain array).
template <typename T>
struct Vector {
  typedef T type __attribute__((vector_size(ESCOIN_VECTOR_BYTES)));
  static constexpr int lanes = ESCOIN_VECTOR_BYTES / int(sizeof(T));
  static type load(const T* p) {
    type v;
    __builtin_memcpy(&v, p, sizeof v);  // one unaligned vector load
    return v;
  }
};

template <typename T, int TILE>
void run_tiles(const CpuConvArgs<T>& a) {
  using V = typename Vector<T>::type;
  constexpr int kLanes = Vector<T>::lanes;
  constexpr int kRegisters = TILE / kLanes;
  static_assert(TILE % kLanes == 0, "a tile is a whole number of vectors");
  const Geometry& g = *a.geometry;
  const int64_t groups = g.d.groups, out_channels = g.d.out_channels;
  const int64_t plane_q = g.layout.out_height * g.layout.plane_w;
  const int64_t tiles = (plane_q + TILE - 1) / TILE;
  const int64_t channel_blocks = (g.group_out + kChannelsPerItem - 1) / kChannelsPerItem;
  // Items ordered (image, group, tile, channel block): neighbours share input rows in cache.
  const int64_t items = g.d.batch * groups * tiles * channel_blocks;

#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t block = item % channel_blocks;
    const int64_t tile = (item / channel_blocks) % tiles;
    const int64_t group = (item / (channel_blocks * tiles)) % groups;
    const int64_t n = item / (channel_blocks * tiles * groups);
    const int64_t q0 = tile * TILE;
    Segment segments[TILE];
    const int segment_count = tile_segments<TILE>(g, q0, segments);
    const T* in = a.stretched + n * g.layout.image_stride + group * g.group_span + q0;
    const int64_t m_begin = group * g.group_out + block * kChannelsPerItem;
    const int64_t m_end = std::min(m_begin + kChannelsPerItem, (group + 1) * g.group_out);
    for (int64_t m = m_begin; m < m_end; ++m) {
      V acc[kRegisters];
      for (int r = 0; r < kRegisters; ++r) acc[r] = V{};
      for (int64_t j = a.row_ptr[m]; j < a.row_ptr[m + 1]; ++j) {
        const V v = V{} + a.values[j];
        const T* src = in + a.offsets[j];
#pragma GCC unroll 16
        for (int r = 0; r < kRegisters; ++r) acc[r] += v * Vector<T>::load(src + r * kLanes);
      }
      // Epilogue in vectors (bias, ReLU), then one copy per output-row segment: with few
      // nonzeros per channel, a per-lane epilogue would cost more than the products.
      const V bias = V{} + (a.bias ? a.bias[m] : T(0));
      for (int r = 0; r < kRegisters; ++r) acc[r] += bias;
      if (a.relu)
        for (int r = 0; r < kRegisters; ++r) acc[r] = acc[r] < V{} ? V{} : acc[r];  // NaN passes
      T sums[TILE];
      __builtin_memcpy(sums, acc, sizeof sums);
      T* out = a.y + (n * out_channels + m) * g.out_plane;
      for (int k = 0; k < segment_count; ++k)
        __builtin_memcpy(out + segments[k].dest, sums + segments[k].lane,
                         size_t(segments[k].length) * sizeof(T));
    }
  }
}

// Eight vector registers of accumulators keep both FMA pipes busy through the FMA latency; a
// smaller tile serves small output planes, where a wide tile would mostly compute dropped lanes.
template <typename T>
void dispatch_tile(const CpuConvArgs<T>& a) {
  constexpr int kWide = 8 * ESCOIN_VECTOR_BYTES / int(sizeof(T));
  const int64_t plane_q = a.geometry->layout.out_height * a.geometry->layout.plane_w;
  if (plane_q >= 2 * kWide)
    run_tiles<T, kWide>(a);
  else if (plane_q >= kWide / 2)
    run_tiles<T, kWide / 2>(a);
  else
    run_tiles<T, kWide / 4>(a);
}

}  // namespace

void sparse_conv(const CpuConvArgs<float>& args) { dispatch_tile(args); }
void sparse_conv(const CpuConvArgs<double>& args) { dispatch_tile(args); }

}  // namespace ESCOIN_CPU_ISA
}  // namespace escoin
