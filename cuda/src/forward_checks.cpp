// forward_checks.cpp -- see forward_checks.hpp.
#include "forward_checks.hpp"

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
  // A stretched offset plus the output plane (q < out_height * plane_w) stays within the group's
  // span plus one row (the column shift of the last row's dropped columns), which the workspace's
  // tail slack covers for the last group of the batch. With a one-row output that bound reaches
  // one element past the group's last channel, which no tap does.
  const int64_t plane_q = g.layout.out_height * g.layout.plane_w;
  const int64_t limit = g.group_span + g.layout.plane_w - plane_q;
  for (int64_t j = 0; j < nnz; ++j) {
    if (offsets[j] < 0 || offsets[j] > limit)
      fail_invalid("offsets[", j, "] = ", offsets[j], " is outside [0, ", limit,
                   "]; offsets must come from escoin_stretch_offsets for this geometry");
    const int64_t channel = offsets[j] / g.layout.channel_stride;
    if (channel >= g.group_in)
      fail_invalid("offsets[", j, "] = ", offsets[j], " is in input channel ", channel,
                   " of a group of ", g.group_in,
                   "; offsets must come from escoin_stretch_offsets for this geometry");
  }
}

}  // namespace escoin
