// forward_checks.cpp -- see forward_checks.hpp.
#include "forward_checks.hpp"

#include <algorithm>
#include <string>
#include <vector>

#include "cpu_threads.hpp"
#include "error.hpp"
#include "fast_divide.cuh"

namespace escoin {

namespace {

size_t x_bytes(const Geometry& g, size_t element_bytes) {
  return size_t(g.d.batch * g.d.in_channels * g.d.in_height * g.d.in_width) * element_bytes;
}

size_t y_bytes(const Geometry& g, size_t element_bytes) {
  return size_t(g.d.batch * g.d.out_channels * g.out_plane) * element_bytes;
}

// A caller's array as the checks see it: where it starts, how many bytes, and its name.
struct Operand {
  const void* pointer;
  size_t bytes;
  const char* name;
};

}  // namespace

bool output_overlaps_input(const Geometry& g, size_t element_bytes, const void* x,
                           const void* y) {
  return memory_overlaps(x, x_bytes(g, element_bytes), y, y_bytes(g, element_bytes));
}

void check_forward_operands(const Geometry& g, escoin_dtype_t dtype, const void* x,
                            const void* filter, const char* filter_name, const void* y,
                            const void* bias, const void* residual, const void* workspace,
                            size_t workspace_size, size_t needed) {
  element_size(dtype);  // rejects unknown dtypes
  if (g.d.batch == 0) return;
  require_pointer(x, "x");
  require_pointer(y, "y");
  require_pointer(filter, filter_name);
  require_pointer(workspace, "workspace");
  if (workspace_size < needed)
    fail_invalid("workspace_bytes is ", workspace_size, " but this geometry needs ", needed);
  // The CUDA kernels read bias and residual through the read-only cache while they write y,
  // and the CPU kernel writes y a tile at a time: neither may overlap y. The workspace is
  // written before and while x, y, bias and residual are used: it may overlap none of them.
  const size_t element_bytes = element_size(dtype);
  const size_t y_size = y_bytes(g, element_bytes);
  const size_t bias_size = size_t(g.d.out_channels) * element_bytes;
  if (bias && memory_overlaps(bias, bias_size, y, y_size))
    fail_invalid("bias must not overlap y (pass a separate array of out_channels values)");
  if (residual && memory_overlaps(residual, y_size, y, y_size))
    fail_invalid("residual must not overlap y (pass a separate array of y's shape)");
  const Operand operands[] = {{x, x_bytes(g, element_bytes), "x"}, {y, y_size, "y"},
                              {bias, bias_size, "bias"}, {residual, y_size, "residual"}};
  for (const Operand& o : operands)
    if (o.pointer && memory_overlaps(workspace, needed, o.pointer, o.bytes))
      fail_invalid("workspace must not overlap ", o.name, " (the call writes ", needed,
                   " bytes of it while it uses ", o.name, ")");
}

void check_filter_not_overwritten(const Geometry& g, escoin_dtype_t dtype,
                                  const int64_t* row_ptr, const int32_t* offsets,
                                  const void* values, int64_t nnz, const void* y,
                                  const void* workspace, size_t needed) {
  if (g.d.batch == 0) return;
  const size_t value_bytes = dtype == ESCOIN_FLOAT64 ? sizeof(double) : sizeof(float);
  const Operand filter[] = {
      {row_ptr, size_t(g.d.out_channels + 1) * sizeof(int64_t), "row_ptr"},
      {offsets, size_t(nnz) * sizeof(int32_t), "offsets"},
      {values, size_t(nnz) * value_bytes, "values"}};
  const Operand written[] = {{y, y_bytes(g, element_size(dtype)), "y"},
                             {workspace, needed, "workspace"}};
  for (const Operand& w : written)
    for (const Operand& f : filter)
      if (f.pointer && f.bytes > 0 && memory_overlaps(w.pointer, w.bytes, f.pointer, f.bytes))
        fail_invalid(w.name, " must not overlap ", f.name, " (the call writes ", w.name,
                     " while it still reads the filter's arrays)");
}

void check_alignment(size_t bytes,
                     std::initializer_list<std::pair<const void*, const char*>> pointers) {
  for (const auto& [pointer, name] : pointers)
    if (reinterpret_cast<uintptr_t>(pointer) % bytes != 0)
      fail_invalid(name, " must be aligned to its ", bytes, "-byte elements, got address ",
                   uint64_t(reinterpret_cast<uintptr_t>(pointer)));
}

void check_row_ptr(const Geometry& g, const int64_t* row_ptr, const int32_t* offsets,
                   const void* values) {
  const int64_t rows = g.d.out_channels;
  if (row_ptr[0] != 0) fail_invalid("row_ptr[0] must be 0, got ", row_ptr[0]);
  for (int64_t m = 0; m < rows; ++m)
    if (row_ptr[m + 1] < row_ptr[m])
      fail_invalid("row_ptr must be non-decreasing at row ", m);
  if (row_ptr[rows] > 0) {  // an all-zero filter may pass NULL for both
    require_pointer(offsets, "offsets");
    require_pointer(values, "values");
  }
}

void check_csr_for_geometry(const Geometry& g, const int64_t* row_ptr, const int32_t* offsets,
                            const void* values) {
  check_row_ptr(g, row_ptr, offsets, values);
  const int64_t nnz = row_ptr[g.d.out_channels];
  // Every offset must be a tap: channel c < group_in of the group, at one of the kernel_h x
  // kernel_w places a tap reads within a channel (escoin_stretch_offsets). The kernels' reads,
  // an offset plus an output position, then stay inside the stretched group span plus the
  // workspace's tail slack, and the tile-program builder only meets chunks that exist. (A range
  // check is not enough: an offset between taps can make a staged tile read past its segment.)
  // The check runs on every CPU forward, so per offset it is a multiply-high division and a
  // lookup in a bitmap of the elements a tap reads in a channel, on every core: with a 64-bit
  // division on one core it took 0.78 ms of a 1.30 ms call (236k nonzeros, 7x7 plane, batch 1,
  // 2 cores). Channels over 16 M elements get no bitmap (2 MB): reads_a_tap's arithmetic.
  const int64_t channel_stride = g.layout.channel_stride;  // < 2^31, as a group's span is
  const FastDivisor by_channel = FastDivisor::of(channel_stride);
  std::vector<uint64_t> tap_bits;
  if (channel_stride <= (int64_t(1) << 24)) {
    tap_bits.assign(size_t((channel_stride + 63) / 64), 0);
    for (int64_t tap = 0; tap < g.d.kernel_h * g.d.kernel_w; ++tap) {
      const int64_t within = stretched_offset(g, tap);
      tap_bits[size_t(within / 64)] |= uint64_t(1) << (within % 64);
    }
  }
  const uint64_t* const is_tap = tap_bits.empty() ? nullptr : tap_bits.data();
  const uint32_t group_in = uint32_t(g.group_in);
  auto not_a_tap = [&](int64_t j) -> int {
    const int32_t offset = offsets[j];
    // The division is exact below 2^31; a negative offset fails by its sign alone.
    const uint32_t magnitude = uint32_t(offset) & 0x7fffffffu;
    const uint32_t channel = by_channel.divide(magnitude);
    const uint32_t within = magnitude - channel * uint32_t(channel_stride);
    return int(offset < 0) | int(channel >= group_in) |
           int(!(is_tap ? (is_tap[within / 64] >> (within % 64)) & 1
                        : reads_a_tap(g, within)));
  };
  // Counted without branches on every core; only a filter that fails is searched again, in
  // order, for the first offset to name (the count says there is one).
  int64_t failures = 0;
#pragma omp parallel for reduction(+ : failures) schedule(static) \
    if (nnz > (1 << 15) && cpu_threads_usable())
  for (int64_t j = 0; j < nnz; ++j) failures += not_a_tap(j);
  if (failures == 0) return;
  int64_t first_bad = 0;
  while (!not_a_tap(first_bad)) ++first_bad;
  const int64_t offset = offsets[first_bad];
  const int64_t channel = offset / channel_stride;
  if (offset < 0 || channel >= g.group_in)
    fail_invalid("offsets[", first_bad, "] = ", offset, " is ",
                 offset < 0 ? std::string("negative")
                            : "in input channel " + std::to_string(channel) + " of a group of " +
                                  std::to_string(g.group_in),
                 "; offsets must come from escoin_stretch_offsets for this geometry");
  fail_invalid("offsets[", first_bad, "] = ", offset, " is not a tap of this geometry (element ",
               offset - channel * channel_stride, " of input channel ", channel,
               "); offsets must come from escoin_stretch_offsets for this geometry");
}

}  // namespace escoin
