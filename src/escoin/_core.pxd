# _core.pxd -- the C contract (cuda/include/escoin/escoin.h), declared for Cython.
from libc.stdint cimport int32_t, int64_t


cdef extern from "escoin/escoin.h" nogil:
    ctypedef enum escoin_status_t:
        ESCOIN_SUCCESS
        ESCOIN_ERROR_INVALID_ARGUMENT
        ESCOIN_ERROR_CUDA
        ESCOIN_ERROR_NOT_COMPILED
        ESCOIN_ERROR_INTERNAL

    ctypedef enum escoin_dtype_t:
        ESCOIN_FLOAT32
        ESCOIN_FLOAT64
        ESCOIN_FLOAT16
        ESCOIN_BFLOAT16

    ctypedef struct escoin_conv_desc_t:
        int64_t batch, in_channels, in_height, in_width
        int64_t out_channels, kernel_h, kernel_w
        int64_t stride_h, stride_w
        int64_t pad_top, pad_bottom, pad_left, pad_right
        int64_t dilation_h, dilation_w
        int64_t groups

    ctypedef struct escoin_layout_t:
        int64_t out_height, out_width
        int64_t plane_h, plane_w
        int64_t channel_stride
        int64_t image_stride
        int64_t phases_h, phases_w

    const char* escoin_last_error()
    const char* escoin_version()
    int escoin_cuda_compiled()
    const char* escoin_cuda_architectures()
    int escoin_openmp_enabled()
    int escoin_openmp_max_threads()
    escoin_status_t escoin_cpu_kernels(const char** name)

    escoin_status_t escoin_conv_layout(const escoin_conv_desc_t* desc, escoin_layout_t* layout)
    escoin_status_t escoin_workspace_size(const escoin_conv_desc_t* desc, escoin_dtype_t dtype,
                                          size_t* bytes)
    escoin_status_t escoin_csr_count(const void* dense, escoin_dtype_t dtype, int64_t rows,
                                     int64_t cols, double threshold, int64_t* nnz)
    escoin_status_t escoin_csr_compress(const void* dense, escoin_dtype_t dtype, int64_t rows,
                                        int64_t cols, double threshold, int64_t* row_ptr,
                                        int32_t* col_idx, void* values)
    escoin_status_t escoin_csr_validate(int64_t rows, int64_t cols, const int64_t* row_ptr,
                                        const int32_t* col_idx, int64_t nnz)
    escoin_status_t escoin_stretch_offsets(const escoin_conv_desc_t* desc, const int32_t* col_idx,
                                           int64_t nnz, int32_t* offsets)
    int escoin_tile_min_batch()
    escoin_status_t escoin_staged_launch(const escoin_conv_desc_t* desc, int64_t sms,
                                         int64_t blocks_per_sm, int64_t* launch)
    escoin_status_t escoin_tile_program_size(const escoin_conv_desc_t* desc,
                                             const int64_t* row_ptr, const int32_t* offsets,
                                             const float* values, size_t* bytes)
    escoin_status_t escoin_tile_program_build(const escoin_conv_desc_t* desc,
                                              const int64_t* row_ptr, const int32_t* offsets,
                                              const float* values, void* program, size_t bytes)
    escoin_status_t escoin_tile_program_weight_slots(const escoin_conv_desc_t* desc,
                                                     const int64_t* row_ptr,
                                                     const int32_t* offsets, int64_t* slots,
                                                     size_t count)
    escoin_status_t escoin_tile_program_write_weights(void* program, const void* layout,
                                                      size_t bytes, const int64_t* slots,
                                                      const float* values, int64_t count,
                                                      int device, void* stream)
    escoin_status_t escoin_mma_workspace_size(const escoin_conv_desc_t* desc, size_t* bytes)
    escoin_status_t escoin_mma_program_size(const escoin_conv_desc_t* desc,
                                            const int64_t* row_ptr, const int32_t* offsets,
                                            const float* values, size_t* bytes)
    escoin_status_t escoin_mma_program_build(const escoin_conv_desc_t* desc,
                                             const int64_t* row_ptr, const int32_t* offsets,
                                             const float* values, void* program, size_t bytes)
    escoin_status_t escoin_conv2d_forward_cuda_mma(const escoin_conv_desc_t* desc,
                                                   escoin_dtype_t dtype, const void* x,
                                                   const void* mma_program, const void* bias,
                                                   const void* residual, int relu, void* y,
                                                   void* workspace, size_t workspace_bytes,
                                                   int device, void* stream)
    escoin_status_t escoin_conv2d_forward_cpu(const escoin_conv_desc_t* desc, escoin_dtype_t dtype,
                                              const void* x, const int64_t* row_ptr,
                                              const int32_t* offsets, const void* values,
                                              const void* bias, const void* residual, int relu,
                                              void* y, void* workspace, size_t workspace_bytes)
    escoin_status_t escoin_conv2d_forward_cpu_trusted(
        const escoin_conv_desc_t* desc, escoin_dtype_t dtype, const void* x,
        const int64_t* row_ptr, const int32_t* offsets, const void* values, const void* bias,
        const void* residual, int relu, void* y, void* workspace, size_t workspace_bytes)
    escoin_status_t escoin_conv2d_forward_cuda(const escoin_conv_desc_t* desc, escoin_dtype_t dtype,
                                               const void* x, const int64_t* row_ptr,
                                               const int32_t* offsets, const void* values,
                                               const void* tile_program, const void* bias,
                                               const void* residual, int relu, void* y,
                                               void* workspace, size_t workspace_bytes,
                                               int device, void* stream)

    int escoin_cuda_device_count()
    escoin_status_t escoin_cuda_malloc(int device, size_t bytes, void** ptr)
    escoin_status_t escoin_cuda_free(int device, void* ptr)
    escoin_status_t escoin_cuda_malloc_async(int device, size_t bytes, void* stream, void** ptr)
    escoin_status_t escoin_cuda_free_async(int device, void* ptr, void* stream)
    escoin_status_t escoin_cuda_memcpy(int device, void* dst, const void* src, size_t bytes,
                                       int kind)
    escoin_status_t escoin_cuda_stream_synchronize(int device, void* stream)
    escoin_status_t escoin_cuda_pointer_device(const void* ptr, int* device)

    ctypedef struct escoin_api_t:
        int32_t version

    const escoin_api_t* escoin_api()
