/*
 * escoin.h -- the C contract of the escoin core: direct sparse convolution from CSR weights.
 *
 * This header is the only door into the core. Everything behind it is framework-agnostic C++/CUDA.
 *
 * Conventions
 * -----------
 * - Every entry returns an escoin_status_t. On failure, escoin_last_error() returns a thread-local,
 *   human-readable text naming the offending argument. No C++ exception ever crosses this boundary.
 * - Tensors are dense, C-contiguous, NCHW. Sizes and element counts are int64_t.
 * - Weights are a CSR matrix with one row per output channel (M rows) and, per row, column indices
 *   into the (in_channel_within_group, kh, kw) window of that channel's group:
 *       col = (c_local * kernel_h + r) * kernel_w + s,
 *       0 <= col < (C / groups) * kernel_h * kernel_w.
 *   Output channel m belongs to group m / (M / groups), so the CSR is the per-group CSRs stacked.
 *   row_ptr is int64_t (M + 1 entries), col_idx is int32_t.
 * - Before a forward call, columns are "stretched" (escoin_stretch_offsets) into int32 offsets into
 *   the padded, stride-phase-split copy of one image's group of channels (see escoin_layout_t). The
 *   offsets depend on the geometry only (not on the batch or the values); callers compute them once
 *   per geometry and cache them.
 * - Compute entries never allocate and never synchronise: the caller passes a workspace of at least
 *   escoin_workspace_size() bytes (and, on CUDA, a stream). That keeps the CUDA entry legal inside
 *   CUDA graph capture. The CUDA entry switches to the given device and restores the caller's.
 * - Semantics are exactly torch.nn.functional.conv2d (cross-correlation) with stride, zero padding,
 *   dilation and groups, plus an optional bias and a fused ReLU.
 */
#ifndef ESCOIN_ESCOIN_H
#define ESCOIN_ESCOIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  ESCOIN_SUCCESS = 0,
  ESCOIN_ERROR_INVALID_ARGUMENT = 1, /* a bad shape, pointer, size or index; the text names it */
  ESCOIN_ERROR_CUDA = 2,             /* the CUDA runtime reported an error; the text carries it */
  ESCOIN_ERROR_NOT_COMPILED = 3,     /* the entry needs CUDA and this build has none */
  ESCOIN_ERROR_INTERNAL = 4          /* an unexpected failure (e.g. out of host memory) */
} escoin_status_t;

/* The element type of a forward call's x, y, bias and residual. FLOAT16 (IEEE binary16) and
 * BFLOAT16 are stored in 16 bits and computed in float32, on the CPU and CUDA entries alike: the
 * weights (values) are then float32, the workspace holds the input widened to float32, and each
 * output is rounded to nearest even once. FLOAT64 runs on the CPU entry only. Dense matrices for
 * the CSR construction are FLOAT32 or FLOAT64. */
typedef enum {
  ESCOIN_FLOAT32 = 0,
  ESCOIN_FLOAT64 = 1,
  ESCOIN_FLOAT16 = 2,
  ESCOIN_BFLOAT16 = 3
} escoin_dtype_t;

/* Geometry of one convolution: input (batch, in_channels, in_height, in_width), weight
 * (out_channels, in_channels / groups, kernel_h, kernel_w). Zero padding per side, so that
 * padding="same" with an even dilated kernel (one more row/column at the end, as PyTorch does)
 * is expressible. */
typedef struct {
  int64_t batch, in_channels, in_height, in_width;
  int64_t out_channels, kernel_h, kernel_w;
  int64_t stride_h, stride_w;
  int64_t pad_top, pad_bottom, pad_left, pad_right;
  int64_t dilation_h, dilation_w;
  int64_t groups;
} escoin_conv_desc_t;

/* The stretched input layout derived from a geometry. For one image and one group, the workspace
 * holds, per input channel of the group, phases_h * phases_w "phase planes" of plane_h x plane_w
 * elements: phase (a, b) row i column j holds padded_input[i * stride_h + a][j * stride_w + b]
 * (zero outside the real input). phases_h is stride_h, or 1 where every tap's row shift
 * r * dilation_h is a multiple of stride_h (a 1x1 filter at stride 2 reads phase (0, 0) only);
 * phases_w likewise. Output (oh, ow) then reads tap (r, s) at
 *     image_group_base + offset(c, r, s) + oh * plane_w + ow,
 * a unit-stride access for every stride and dilation. Kernels walk q = oh * plane_w + ow in
 * tiles and may read up to 256 + plane_w elements past the last image, so the workspace ends
 * with that much zeroed slack. */
typedef struct {
  int64_t out_height, out_width;
  int64_t plane_h, plane_w;
  int64_t channel_stride; /* elements per input channel: phases_h * phases_w * plane_h * plane_w,
                             rounded up to a multiple of 4 (the gap is zeroed) */
  int64_t image_stride;   /* elements per image: in_channels * channel_stride */
  int64_t phases_h, phases_w; /* phase planes per axis: the stride, or 1 (above); last, so that
                                 the fields before keep their places */
} escoin_layout_t;

/* Thread-local text of the last failure in this thread ("" if none). Valid until the next call. */
const char* escoin_last_error(void);

/* Version string, e.g. "0.1.0". */
const char* escoin_version(void);

/* 1 if CUDA kernels were compiled into this build, else 0; the architectures, e.g.
 * "80-real,86-real,89-real,90". */
int escoin_cuda_compiled(void);
const char* escoin_cuda_architectures(void);
/* 1 if the CPU kernels were built with OpenMP; the number of threads they would use. In a
 * process forked after the library was loaded that is 1: GNU OpenMP's thread pool does not
 * survive fork(), so there the CPU entries run on the calling thread (instead of hanging). */
int escoin_openmp_enabled(void);
int escoin_openmp_max_threads(void);
/* The CPU kernel variant forward calls run: "avx512", "avx2" or "portable", the widest this
 * build and CPU support unless the environment variable ESCOIN_CPU_KERNELS names another (read
 * once per process; a name that cannot run makes this and every CPU forward call fail). */
escoin_status_t escoin_cpu_kernels(const char** name);

/* Validates the geometry (positive sizes, divisibility by groups, output at least 1x1, the
 * stretched layout addressable with 32-bit offsets) and fills the layout. */
escoin_status_t escoin_conv_layout(const escoin_conv_desc_t* desc, escoin_layout_t* layout);

/* Workspace bytes a forward call needs for this geometry and dtype: the stretched input (in
 * float32 for the 16-bit types) and, for problems too small to fill a GPU, room for the partial
 * sums of the CUDA entry's split over each output channel's nonzeros (the CPU entry leaves that
 * part unused). */
escoin_status_t escoin_workspace_size(const escoin_conv_desc_t* desc, escoin_dtype_t dtype,
                                      size_t* bytes);

/* ---- CSR construction (host memory) ---- */

/* Counts entries with |w| > threshold in a dense rows x cols matrix (row-major). */
escoin_status_t escoin_csr_count(const void* dense, escoin_dtype_t dtype, int64_t rows,
                                 int64_t cols, double threshold, int64_t* nnz);

/* Compresses a dense rows x cols matrix: keeps |w| > threshold. row_ptr has rows + 1 entries,
 * col_idx and values have room for the count escoin_csr_count returned with the same threshold. */
escoin_status_t escoin_csr_compress(const void* dense, escoin_dtype_t dtype, int64_t rows,
                                    int64_t cols, double threshold, int64_t* row_ptr,
                                    int32_t* col_idx, void* values);

/* Checks a CSR matrix: row_ptr[0] == 0, non-decreasing, row_ptr[rows] == nnz, and every column in
 * [0, cols). Columns need not be sorted. */
escoin_status_t escoin_csr_validate(int64_t rows, int64_t cols, const int64_t* row_ptr,
                                    const int32_t* col_idx, int64_t nnz);

/* Stretches nnz column indices (validated against the geometry's window) into offsets for the
 * layout of escoin_conv_layout. Only the geometry's channel/kernel/stride/padding/dilation/input
 * size matter; batch and out_channels are ignored beyond validation. Offsets and tile programs
 * belong to the library build that made them (the layout may change between versions): make
 * them again rather than storing them. */
escoin_status_t escoin_stretch_offsets(const escoin_conv_desc_t* desc, const int32_t* col_idx,
                                       int64_t nnz, int32_t* offsets);

/* ---- Forward convolution ----
 * x: (N, C, H, W); y: (N, M, OH, OW); bias: M values or NULL; residual: an (N, M, OH, OW) array
 * added to the output before the ReLU (a residual network's shortcut), or NULL. y may overlap x
 * (the kernels then copy x first); bias and residual must not overlap y, and the workspace's
 * bytes the call needs may overlap none of x, y, bias and residual (each is an error). Neither y
 * nor those workspace bytes may overlap the filter's arrays, which the call reads while it
 * writes them: an error for row_ptr, offsets and values on the CPU entries, for row_ptr on the
 * CUDA entry (the others' extent, nnz, lies in device memory there: the caller's to keep apart,
 * as the tile program's).
 * relu: nonzero applies max(0, .) last: y = relu(conv(x) + bias + residual). Only the stored
 * nonzeros multiply x: an element of x that only zero weights would read is never read, so a
 * NaN or infinity there does not reach y (a dense convolution's 0 * NaN would).
 * row_ptr/offsets/values: the CSR with stretched offsets for this geometry; values in the compute
 * type (float64 for FLOAT64, else float32).
 * The CPU entry runs on host memory with OpenMP; it checks row_ptr and offsets before use. It
 * takes every dtype. */
escoin_status_t escoin_conv2d_forward_cpu(const escoin_conv_desc_t* desc, escoin_dtype_t dtype,
                                          const void* x, const int64_t* row_ptr,
                                          const int32_t* offsets, const void* values,
                                          const void* bias, const void* residual, int relu,
                                          void* y, void* workspace, size_t workspace_bytes);
/* The same, for offsets the caller guarantees escoin_stretch_offsets made for this geometry and
 * nothing has changed since (a filter object's cached, read-only ones): row_ptr is checked (O(M)),
 * the offsets are not. Their O(nnz) check costs as much as the convolution itself on small planes
 * with many nonzeros (a 512 -> 2048 1x1 layer on a 4x4 plane: ~half its time). Offsets that are
 * not the geometry's taps are undefined behaviour here. */
escoin_status_t escoin_conv2d_forward_cpu_trusted(const escoin_conv_desc_t* desc,
                                                  escoin_dtype_t dtype, const void* x,
                                                  const int64_t* row_ptr, const int32_t* offsets,
                                                  const void* values, const void* bias,
                                                  const void* residual, int relu, void* y,
                                                  void* workspace, size_t workspace_bytes);

/* ---- The tile program: the filter re-ordered for the staged CUDA kernel ----
 * Built on the host from the CSR and its stretched offsets for one geometry (batch and
 * out_channels aside, as for the offsets), then copied to the device by the caller. The staged
 * kernel copies chunks of input channels into shared memory and works on blocks of 32 output
 * channels; the program lists, per block of output channels, chunk and channel, the nonzeros as
 * (shared-memory offset, weight) pairs: about 8 bytes per nonzero. Where the filter's output
 * channels share their nonzero pattern in groups of four (channels 4k..4k+3 of a group, as
 * block pruning leaves them), the program lists each group's pattern once with four weights
 * (20 bytes per four nonzeros), and the kernel feeds each input value it loads to four FMAs:
 * that form is built where every such group shares its pattern exactly (so no channel
 * multiplies an input its own weights do not read) and the filter's groups list at most 3/5 as
 * many entries as it has nonzeros. ESCOIN_TILE_FORM=rows or =groups, read by size and build,
 * forces a form, exact or not; a forced inexact one breaks the forward's NaN rule above. values is
 * float32. size gives the bytes that build writes, or 0 where the staged kernel would not pay
 * (fewer than 16 output channels per group, as in depthwise filters, or a stretched input row too
 * wide for one channel to fit in shared memory): pass no program then; size builds the row-group
 * form wherever every group of four shares its pattern, to count its entries, and otherwise costs
 * a fraction of build. Both check the CSR against the geometry as the CPU forward does. On the
 * device the program must be 16-byte aligned (cudaMalloc's is; the forward checks it). */
/* The smallest batch for which the CUDA forward runs the staged kernel (1: every batch, where a
 * tile program is passed); below it a tile program is not read, so callers need not build one. */
int escoin_tile_min_batch(void);
/* How the CUDA forward launches the staged kernel for this geometry on a GPU of `sms` SMs that
 * each hold `blocks_per_sm` of its blocks at once (an H100: 132 and 4; sms at most 65536,
 * blocks_per_sm at most 255), as seven numbers in launch: images and positions per thread of a
 * block, splits, lead_jobs, tail_splits, jobs and chunks. A job is a tile of positions x 32
 * output channels x a block of images, in `chunks` chunks of input channels. With tail_splits
 * 0 every job runs in `splits` blocks (an even share of its chunks each); else the first
 * lead_jobs jobs run so, their blocks within whole rounds of the SMs, and the others in
 * tail_splits (more than splits) blocks each, which evens out the SMs' work where the even
 * form's blocks are not a multiple of the SMs. Host only, for tests and benchmarks; fails where
 * the staged kernel has no plan for the geometry. */
escoin_status_t escoin_staged_launch(const escoin_conv_desc_t* desc, int64_t sms,
                                     int64_t blocks_per_sm, int64_t launch[7]);
escoin_status_t escoin_tile_program_size(const escoin_conv_desc_t* desc, const int64_t* row_ptr,
                                         const int32_t* offsets, const float* values,
                                         size_t* bytes);
escoin_status_t escoin_tile_program_build(const escoin_conv_desc_t* desc, const int64_t* row_ptr,
                                          const int32_t* offsets, const float* values,
                                          void* program, size_t bytes);
/* Where escoin_tile_program_build puts each weight: slots[j] is the index of the 32-bit word that
 * holds values[j] (as float32) in the program it builds for this row_ptr and these offsets, for
 * every j < count, count being the filter's nonzeros (row_ptr[M]; row_ptr[0] must be 0). Every
 * other word of the program depends on row_ptr, the offsets and ESCOIN_TILE_FORM only, so the
 * program of new values on the same pattern (built under the same ESCOIN_TILE_FORM) is the old
 * program with values[j] written at word slots[j]: callers whose weights
 * change but keep their pattern (training) need not build it again. In the row-group form a
 * word stays 0 where a row of the group has no entry; slots repeat only where a row repeats a
 * column (that form adds such values, so a caller rewriting them must add them too). Checks as
 * escoin_tile_program_build does, and fails where it would. */
escoin_status_t escoin_tile_program_weight_slots(const escoin_conv_desc_t* desc,
                                                 const int64_t* row_ptr, const int32_t* offsets,
                                                 int64_t* slots, size_t count);
/* The program of new values on the device, as the note above describes: copies `bytes` bytes of
 * `layout` (a program escoin_tile_program_build wrote for this pattern and geometry, uploaded) to
 * `program` and stores values[j] (float32) at 32-bit word slots[j] for every j < count (slots
 * from escoin_tile_program_weight_slots, uploaded). All four are device memory of `device`;
 * `program` is 16-byte aligned and does not overlap `layout`. Queued on `stream` (a
 * cudaStream_t, NULL for the legacy default stream): a forward queued after it on that stream
 * reads the new program. Slots are trusted: each below bytes / 4. */
escoin_status_t escoin_tile_program_write_weights(void* program, const void* layout, size_t bytes,
                                                  const int64_t* slots, const float* values,
                                                  int64_t count, int device, void* stream);

/* The CUDA entry: all pointers are device memory of `device`; work is queued on `stream`
 * (a cudaStream_t, NULL for the legacy default stream). dtype FLOAT32, FLOAT16 or BFLOAT16
 * (values float32 in every case); x, y, bias and residual must be aligned to their elements, the
 * workspace to 4 bytes.
 * The CSR arrays and the tile program are trusted (they live on the device; build them with the
 * functions above for this geometry). tile_program may be NULL; given, batches from
 * escoin_tile_min_batch() images up (every batch) run the staged kernel where its input is
 * 16-byte aligned: the workspace, or a FLOAT32 x itself for a 1x1 filter at stride 1 without
 * padding, on planes of a multiple of 4 elements or, with a multiple of 8 input channels per
 * group, on planes one tile of the kernel covers (7x7, 5x5 and 11x11 do, 13x13 does not); x is
 * then not stretched (else the streaming kernel runs).
 * Launch errors are reported; errors of the asynchronous execution surface at the caller's next
 * synchronisation. The first call on a device sets the staged kernel's shared-memory limit there
 * (cudaFuncSetAttribute; 54 KB, where the GPU still fits as many blocks per SM as with 48 KB);
 * the environment variable ESCOIN_SHUFFLED_ENTRIES=1, read then, keeps it to 48 KB (the form
 * GPUs with 100 KB per SM run; for testing). On sm_90 and
 * newer, with code compiled for them, the kernels are launched as programmatic dependents of the
 * stream's previous kernel and wait for it before touching memory: no ordering a caller can
 * observe changes. There too, the staged kernel copies x itself into shared memory, padded by
 * the copy engine (a tensor map of x, encoded per call; no stretch into the workspace) for
 * stride-1 geometries whose in_width is a multiple of 4, when x is FLOAT32 and 16-byte aligned.
 * A 16-bit x is always stretched (widened to float32 into the workspace), and so is an x that y
 * overlaps, in place of the readings of x itself above; the float32 sums are
 * finished (bias, residual, ReLU) and rounded to y's type by the kernel that computes them, or
 * where it splits its work, by the kernel that adds the partial sums. */
escoin_status_t escoin_conv2d_forward_cuda(const escoin_conv_desc_t* desc, escoin_dtype_t dtype,
                                           const void* x, const int64_t* row_ptr,
                                           const int32_t* offsets, const void* values,
                                           const void* tile_program, const void* bias,
                                           const void* residual, int relu, void* y,
                                           void* workspace, size_t workspace_bytes, int device,
                                           void* stream);

/* ---- The tensor-core kernel: float32 on the 2:4 sparse bf16 MMA, at fp32-level accuracy ----
 * An alternative to escoin_conv2d_forward_cuda for layers with many nonzeros per output
 * channel: weights and inputs are each split into two bf16 parts (hi = bf16(v), lo =
 * bf16(v - hi)) and the kernel adds three products of parts (hi*hi + hi*lo + lo*hi) on the
 * tensor cores, adding their sums into float32 registers every few steps. The result is not
 * strict float32: its relative error against float64 is a few 1e-6 (strict float32's is about
 * 1e-7, TF32's 1e-3), and the sums are added in another order than the other entries'. Weights
 * and inputs must be finite and below 3.38e38 in magnitude (a non-finite input may make
 * outputs it does not feed NaN: zero weights of the 2:4 pattern multiply it). Runs on sm_80 and
 * newer.
 * The MMA program is built on the host from the CSR and its stretched offsets (values float32)
 * for one geometry, batch and out_channels' sizes aside as for the tile program, and copied to
 * the device by the caller; size gives 0 where the kernel cannot run the geometry (more than
 * one group, a stride over 1 that needs phase planes: every tap not at a multiple of the
 * stride, or a stretched row too long for a channel's span to fit in shared memory). The
 * program is ~3 KB per 32 x 32 block of kept columns: about 12 bytes per nonzero at 90%
 * sparsity. */
escoin_status_t escoin_mma_program_size(const escoin_conv_desc_t* desc, const int64_t* row_ptr,
                                        const int32_t* offsets, const float* values,
                                        size_t* bytes);
escoin_status_t escoin_mma_program_build(const escoin_conv_desc_t* desc, const int64_t* row_ptr,
                                         const int32_t* offsets, const float* values,
                                         void* program, size_t bytes);
/* Workspace bytes the tensor-core forward needs for this geometry: the input stretched as split
 * parts into that kernel's layout (rows rounded up to a multiple of 8 elements), 4 bytes an
 * element, and the tail slack. Not included in escoin_workspace_size. */
escoin_status_t escoin_mma_workspace_size(const escoin_conv_desc_t* desc, size_t* bytes);
/* The forward pass on the tensor cores, as escoin_conv2d_forward_cuda (same operands, stream and
 * device rules, FLOAT32 only; a workspace of escoin_mma_workspace_size bytes, 16-byte aligned)
 * but with the filter given only by its MMA program, which is trusted: it must have been built
 * for this geometry. x is stretched into the workspace as split parts, then one kernel
 * computes and writes y through the epilogue. */
escoin_status_t escoin_conv2d_forward_cuda_mma(const escoin_conv_desc_t* desc,
                                               escoin_dtype_t dtype, const void* x,
                                               const void* mma_program, const void* bias,
                                               const void* residual, int relu, void* y,
                                               void* workspace, size_t workspace_bytes,
                                               int device, void* stream);

/* ---- CUDA memory helpers (not compute entries: these may allocate and synchronise) ---- */

/* Number of usable CUDA devices (0 when CUDA is not compiled in or no driver/device). */
int escoin_cuda_device_count(void);
escoin_status_t escoin_cuda_malloc(int device, size_t bytes, void** ptr);
escoin_status_t escoin_cuda_free(int device, void* ptr);
/* Stream-ordered allocation (legal inside graph capture). */
escoin_status_t escoin_cuda_malloc_async(int device, size_t bytes, void* stream, void** ptr);
escoin_status_t escoin_cuda_free_async(int device, void* ptr, void* stream);
/* Synchronous copies: kind 0 host->device, 1 device->host, 2 device->device. */
escoin_status_t escoin_cuda_memcpy(int device, void* dst, const void* src, size_t bytes, int kind);
escoin_status_t escoin_cuda_stream_synchronize(int device, void* stream);
/* The device a pointer lives on (error if it is not device memory). */
escoin_status_t escoin_cuda_pointer_device(const void* ptr, int* device);

/* ---- The entries as a table, for compiled code that reaches the core through Python ----
 * Code that does not link the core (the JAX adapter's XLA handlers) calls it through this table,
 * so that a process holds one core: one set of device caches, one CUDA runtime. The Python
 * package hands out its address (escoin.c_api(): a PyCapsule named "escoin.c_api"). version is
 * ESCOIN_API_VERSION; entries are only ever added at the end, so a table of a later version
 * serves callers compiled for an earlier one (check version >= the one you were compiled for). */
/* Version 2 added tile_program_write_weights. */
#define ESCOIN_API_VERSION 2
typedef struct {
  int32_t version;
  const char* (*last_error)(void);
  escoin_status_t (*conv_layout)(const escoin_conv_desc_t* desc, escoin_layout_t* layout);
  escoin_status_t (*workspace_size)(const escoin_conv_desc_t* desc, escoin_dtype_t dtype,
                                    size_t* bytes);
  escoin_status_t (*conv2d_forward_cpu)(const escoin_conv_desc_t* desc, escoin_dtype_t dtype,
                                        const void* x, const int64_t* row_ptr,
                                        const int32_t* offsets, const void* values,
                                        const void* bias, const void* residual, int relu, void* y,
                                        void* workspace, size_t workspace_bytes);
  escoin_status_t (*conv2d_forward_cpu_trusted)(const escoin_conv_desc_t* desc,
                                                escoin_dtype_t dtype, const void* x,
                                                const int64_t* row_ptr, const int32_t* offsets,
                                                const void* values, const void* bias,
                                                const void* residual, int relu, void* y,
                                                void* workspace, size_t workspace_bytes);
  escoin_status_t (*conv2d_forward_cuda)(const escoin_conv_desc_t* desc, escoin_dtype_t dtype,
                                         const void* x, const int64_t* row_ptr,
                                         const int32_t* offsets, const void* values,
                                         const void* tile_program, const void* bias,
                                         const void* residual, int relu, void* y,
                                         void* workspace, size_t workspace_bytes, int device,
                                         void* stream);
  escoin_status_t (*cuda_pointer_device)(const void* ptr, int* device);
  escoin_status_t (*tile_program_write_weights)(void* program, const void* layout, size_t bytes,
                                                const int64_t* slots, const float* values,
                                                int64_t count, int device, void* stream);
} escoin_api_t;

/* This build's table (static storage; never NULL). */
const escoin_api_t* escoin_api(void);

#ifdef __cplusplus
}
#endif

#endif /* ESCOIN_ESCOIN_H */
