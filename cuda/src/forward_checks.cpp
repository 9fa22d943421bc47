// forward_checks.cpp -- see forward_checks.hpp.
#include "forward_checks.hpp"

#include <string>

#include "error.hpp"

namespace escoin {

void check_forward_operands(const Geometry& g, escoin_dtype_t dtype, const void* x,
                            const int64_t* row_ptr, const void* y, const void* workspace,
                            size_t workspace_size) {
  const size_t needed = workspace_bytes(g, dtype);  // also rejects unknown dtypes
  if (g.d.batch == 0) return;
  require_pointer(x, "x");
  require_pointer(y, "y");
  require_pointer(row_ptr, "row_ptr");
  require_pointer(workspace, "workspace");
  if (workspace_size < needed)
    fail_invalid("workspace_bytes is ", workspace_size, " but this geometry needs ", needed);
}

void check_csr_for_geometry(const Geometry& g, const int64_t* row_ptr, const int32_t* offsets,
                            const void* values) {
  const int64_t rows = g.d.out_channels;
  if (row_ptr[0] != 0) fail_invalid("row_ptr[0] must be 0, got ", row_ptr[0]);
  for (int64_t m = 0; m < rows; ++m)
    if (row_ptr[m + 1] < row_ptr[m])
      fail_invalid("row_ptr must be non-decreasing at row ", m);
  const int64_t nnz = row_ptr[rows];
  if (nnz > 0) {  // an all-zero filter may pass NULL for both
    require_pointer(offsets, "offsets");
    require_pointer(values, "values");
  }
  // Every offset must be a tap: channel c < group_in of the group, at one of the kernel_h x
  // kernel_w places a tap reads within a channel (escoin_stretch_offsets). The kernels' reads,
  // an offset plus an output position, then stay inside the stretched group span plus the
  // workspace's tail slack, and the tile-program builder only meets chunks that exist. (A range
  // check is not enough: an offset between taps can make a staged tile read past its segment.)
  const int64_t channel_stride = g.layout.channel_stride;
  for (int64_t j = 0; j < nnz; ++j) {
    const int64_t offset = offsets[j];
    const int64_t channel = offset / channel_stride;
    if (offset < 0 || channel >= g.group_in)
      fail_invalid("offsets[", j, "] = ", offset, " is ",
                   offset < 0 ? std::string("negative")
                              : "in input channel " + std::to_string(channel) +
                                    " of a group of " + std::to_string(g.group_in),
                   "; offsets must come from escoin_stretch_offsets for this geometry");
    if (!reads_a_tap(g, offset % channel_stride))
      fail_invalid("offsets[", j, "] = ", offset, " is not a tap of this geometry (element ",
                   offset % channel_stride, " of input channel ", channel,
                   "); offsets must come from escoin_stretch_offsets for this geometry");
  }
}

}  // namespace escoin
