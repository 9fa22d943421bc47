// csr.cpp -- dense -> CSR compression and CSR validation (host memory).
#include <cmath>
#include <cstdint>
#include <limits>

#include "error.hpp"
#include "geometry.hpp"

namespace escoin {
namespace {

void require_matrix(const void* dense, int64_t rows, int64_t cols) {
  if (rows < 0) fail_invalid("rows must be >= 0, got ", rows);
  if (cols < 0) fail_invalid("cols must be >= 0, got ", cols);
  if (cols > std::numeric_limits<int32_t>::max())
    fail_invalid("cols (", cols, ") exceeds the 32-bit column index range");
  if (rows > 0 && cols > 0) require_pointer(dense, "dense");
}

template <typename T>
bool kept(T w, double threshold) {
  // NaN weights are kept: dropping them would silently change the result.
  return !(std::fabs(double(w)) <= threshold);
}

template <typename T>
int64_t count(const T* dense, int64_t rows, int64_t cols, double threshold) {
  int64_t nnz = 0;
  for (int64_t i = 0; i < rows * cols; ++i) nnz += kept(dense[i], threshold);
  return nnz;
}

template <typename T>
void compress(const T* dense, int64_t rows, int64_t cols, double threshold, int64_t* row_ptr,
              int32_t* col_idx, T* values) {
  int64_t nnz = 0;
  row_ptr[0] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = dense + r * cols;
    for (int64_t c = 0; c < cols; ++c) {
      if (kept(row[c], threshold)) {
        col_idx[nnz] = static_cast<int32_t>(c);
        values[nnz] = row[c];
        ++nnz;
      }
    }
    row_ptr[r + 1] = nnz;
  }
}

// The dense matrices compressed here are float32 or float64 (a 16-bit weight is widened first:
// every float16 and bfloat16 value is a float32 value).
bool is_float32(escoin_dtype_t dtype) {
  if (dtype != ESCOIN_FLOAT32 && dtype != ESCOIN_FLOAT64)
    fail_invalid("dtype must be ESCOIN_FLOAT32 or ESCOIN_FLOAT64 for a dense matrix, got ",
                 static_cast<int>(dtype));
  return dtype == ESCOIN_FLOAT32;
}

void require_threshold(double threshold) {
  if (!(threshold >= 0.0)) fail_invalid("threshold must be >= 0, got ", threshold);
}

}  // namespace
}  // namespace escoin

extern "C" escoin_status_t escoin_csr_count(const void* dense, escoin_dtype_t dtype, int64_t rows,
                                            int64_t cols, double threshold, int64_t* nnz) {
  return escoin::guarded([&] {
    escoin::require_matrix(dense, rows, cols);
    escoin::require_threshold(threshold);
    escoin::require_pointer(nnz, "nnz");
    if (escoin::is_float32(dtype))
      *nnz = escoin::count(static_cast<const float*>(dense), rows, cols, threshold);
    else
      *nnz = escoin::count(static_cast<const double*>(dense), rows, cols, threshold);
  });
}

extern "C" escoin_status_t escoin_csr_compress(const void* dense, escoin_dtype_t dtype,
                                               int64_t rows, int64_t cols, double threshold,
                                               int64_t* row_ptr, int32_t* col_idx, void* values) {
  return escoin::guarded([&] {
    escoin::require_matrix(dense, rows, cols);
    escoin::require_threshold(threshold);
    escoin::require_pointer(row_ptr, "row_ptr");
    if (escoin::is_float32(dtype))
      escoin::compress(static_cast<const float*>(dense), rows, cols, threshold, row_ptr, col_idx,
                       static_cast<float*>(values));
    else
      escoin::compress(static_cast<const double*>(dense), rows, cols, threshold, row_ptr, col_idx,
                       static_cast<double*>(values));
  });
}

extern "C" escoin_status_t escoin_csr_validate(int64_t rows, int64_t cols, const int64_t* row_ptr,
                                               const int32_t* col_idx, int64_t nnz) {
  return escoin::guarded([&] {
    if (rows < 0) escoin::fail_invalid("rows must be >= 0, got ", rows);
    if (cols < 0) escoin::fail_invalid("cols must be >= 0, got ", cols);
    if (nnz < 0) escoin::fail_invalid("nnz must be >= 0, got ", nnz);
    escoin::require_pointer(row_ptr, "row_ptr");
    if (nnz > 0) escoin::require_pointer(col_idx, "col_idx");
    if (row_ptr[0] != 0) escoin::fail_invalid("row_ptr[0] must be 0, got ", row_ptr[0]);
    for (int64_t r = 0; r < rows; ++r)
      if (row_ptr[r + 1] < row_ptr[r])
        escoin::fail_invalid("row_ptr must be non-decreasing: row_ptr[", r + 1, "] = ",
                             row_ptr[r + 1], " < row_ptr[", r, "] = ", row_ptr[r]);
    if (row_ptr[rows] != nnz)
      escoin::fail_invalid("row_ptr[", rows, "] must equal nnz (", nnz, "), got ", row_ptr[rows]);
    for (int64_t j = 0; j < nnz; ++j)
      if (col_idx[j] < 0 || col_idx[j] >= cols)
        escoin::fail_invalid("col_idx[", j, "] = ", col_idx[j], " is outside [0, ", cols, ")");
  });
}
