# cython: language_level=3, boundscheck=False, wraparound=False
"""The C API of the escoin core, one Python function per entry.

Pointers travel as Python ints (from NumPy's ``__array_interface__`` or a CUDA array's interface):
the Python layer above checks shapes, dtypes and contiguity and keeps the arrays alive. Every
call releases the GIL; a failed status raises :class:`escoin.EscoinError` with the core's text.
"""
from libc.stdint cimport int32_t, int64_t, uintptr_t
from cpython.number cimport PyNumber_Index
from cpython.pycapsule cimport PyCapsule_New

from escoin._errors import EscoinError

DESC_FIELDS = ("batch", "in_channels", "in_height", "in_width", "out_channels", "kernel_h",
               "kernel_w", "stride_h", "stride_w", "pad_top", "pad_bottom", "pad_left",
               "pad_right", "dilation_h", "dilation_w", "groups")


cdef int check(escoin_status_t status) except -1:
    if status != ESCOIN_SUCCESS:
        raise EscoinError(escoin_last_error().decode("utf-8", "replace"))
    return 0


cdef escoin_conv_desc_t make_desc(tuple d) except *:
    if len(d) != len(DESC_FIELDS):
        raise EscoinError("a descriptor needs %d fields, got %d" % (len(DESC_FIELDS), len(d)))
    cdef escoin_conv_desc_t desc
    desc.batch, desc.in_channels, desc.in_height, desc.in_width = d[0], d[1], d[2], d[3]
    desc.out_channels, desc.kernel_h, desc.kernel_w = d[4], d[5], d[6]
    desc.stride_h, desc.stride_w = d[7], d[8]
    desc.pad_top, desc.pad_bottom, desc.pad_left, desc.pad_right = d[9], d[10], d[11], d[12]
    desc.dilation_h, desc.dilation_w, desc.groups = d[13], d[14], d[15]
    return desc


cdef inline void* ptr(object address):
    return <void*><uintptr_t>address


cdef escoin_dtype_t dtype_code(str name) except *:
    if name == "float32":
        return ESCOIN_FLOAT32
    if name == "float64":
        return ESCOIN_FLOAT64
    if name == "float16":
        return ESCOIN_FLOAT16
    if name == "bfloat16":
        return ESCOIN_BFLOAT16
    raise EscoinError("dtype must be float32, float64, float16 or bfloat16, got %s" % name)


def version() -> str:
    return escoin_version().decode()


def cuda_compiled() -> bool:
    return escoin_cuda_compiled() != 0


def cuda_architectures() -> str:
    return escoin_cuda_architectures().decode()


def openmp_enabled() -> bool:
    return escoin_openmp_enabled() != 0


def openmp_max_threads() -> int:
    return escoin_openmp_max_threads()


def cpu_kernels() -> str:
    cdef const char* name = NULL
    check(escoin_cpu_kernels(&name))
    return name.decode()


def cuda_device_count() -> int:
    return escoin_cuda_device_count()


def conv_layout(tuple desc) -> dict:
    cdef escoin_conv_desc_t d = make_desc(desc)
    cdef escoin_layout_t layout
    check(escoin_conv_layout(&d, &layout))
    return dict(out_height=layout.out_height, out_width=layout.out_width,
                plane_h=layout.plane_h, plane_w=layout.plane_w,
                phases_h=layout.phases_h, phases_w=layout.phases_w,
                channel_stride=layout.channel_stride, image_stride=layout.image_stride)


def workspace_size(tuple desc, str dtype) -> int:
    cdef escoin_conv_desc_t d = make_desc(desc)
    cdef size_t nbytes = 0
    check(escoin_workspace_size(&d, dtype_code(dtype), &nbytes))
    return nbytes

def mma_workspace_size(tuple desc) -> int:
    cdef escoin_conv_desc_t d = make_desc(desc)
    cdef size_t nbytes = 0
    check(escoin_mma_workspace_size(&d, &nbytes))
    return nbytes


def csr_count(object dense, str dtype, int64_t rows, int64_t cols, double threshold) -> int:
    cdef int64_t nnz = 0
    cdef void* p = ptr(dense)
    cdef escoin_dtype_t code = dtype_code(dtype)
    cdef escoin_status_t status
    with nogil:
        status = escoin_csr_count(p, code, rows, cols, threshold, &nnz)
    check(status)
    return nnz


def csr_compress(object dense, str dtype, int64_t rows, int64_t cols, double threshold,
                 object row_ptr, object col_idx, object values) -> None:
    cdef void* p = ptr(dense)
    cdef int64_t* rp = <int64_t*>ptr(row_ptr)
    cdef int32_t* ci = <int32_t*>ptr(col_idx)
    cdef void* v = ptr(values)
    cdef escoin_dtype_t code = dtype_code(dtype)
    cdef escoin_status_t status
    with nogil:
        status = escoin_csr_compress(p, code, rows, cols, threshold, rp, ci, v)
    check(status)


def csr_validate(int64_t rows, int64_t cols, object row_ptr, object col_idx, int64_t nnz) -> None:
    cdef const int64_t* rp = <const int64_t*>ptr(row_ptr)
    cdef const int32_t* ci = <const int32_t*>ptr(col_idx)
    cdef escoin_status_t status
    with nogil:
        status = escoin_csr_validate(rows, cols, rp, ci, nnz)
    check(status)


def stretch_offsets(tuple desc, object col_idx, int64_t nnz, object offsets) -> None:
    cdef escoin_conv_desc_t d = make_desc(desc)
    cdef const int32_t* ci = <const int32_t*>ptr(col_idx)
    cdef int32_t* out = <int32_t*>ptr(offsets)
    cdef escoin_status_t status
    with nogil:
        status = escoin_stretch_offsets(&d, ci, nnz, out)
    check(status)


def tile_min_batch() -> int:
    return escoin_tile_min_batch()


def staged_launch(tuple desc, int64_t sms, int64_t blocks_per_sm) -> dict:
    """How the CUDA forward launches the staged kernel for desc on a GPU of `sms` SMs holding
    `blocks_per_sm` of its blocks each (escoin_staged_launch): images, positions, splits,
    lead_jobs, tail_splits, jobs and chunks, by name."""
    cdef escoin_conv_desc_t d = make_desc(desc)
    cdef int64_t launch[7]
    cdef escoin_status_t status
    with nogil:
        status = escoin_staged_launch(&d, sms, blocks_per_sm, launch)
    check(status)
    names = ("images", "positions", "splits", "lead_jobs", "tail_splits", "jobs", "chunks")
    return {name: launch[i] for i, name in enumerate(names)}


ctypedef escoin_status_t (*ProgramSize)(const escoin_conv_desc_t*, const int64_t*,
                                        const int32_t*, const float*, size_t*) noexcept nogil
ctypedef escoin_status_t (*ProgramBuild)(const escoin_conv_desc_t*, const int64_t*,
                                         const int32_t*, const float*, void*,
                                         size_t) noexcept nogil


cdef ProgramSize program_size_entry(str kind) except NULL:
    if kind == "tile":
        return escoin_tile_program_size
    if kind == "mma":
        return escoin_mma_program_size
    raise ValueError(f"program kind must be 'tile' or 'mma', got {kind!r}")


def program_size(str kind, tuple desc, object row_ptr, object offsets, object values) -> int:
    """Bytes of the staged kernel's ("tile") or the tensor-core kernel's ("mma") program."""
    cdef ProgramSize entry = program_size_entry(kind)
    cdef escoin_conv_desc_t d = make_desc(desc)
    cdef const int64_t* rp = <const int64_t*>ptr(row_ptr)
    cdef const int32_t* off = <const int32_t*>ptr(offsets)
    cdef const float* v = <const float*>ptr(values)
    cdef size_t nbytes = 0
    cdef escoin_status_t status
    with nogil:
        status = entry(&d, rp, off, v, &nbytes)
    check(status)
    return nbytes


cdef ProgramBuild program_build_entry(str kind) except NULL:
    program_size_entry(kind)  # rejects other kinds
    return escoin_tile_program_build if kind == "tile" else escoin_mma_program_build


def tile_program_weight_slots(tuple desc, object row_ptr, object offsets, object slots,
                              size_t count) -> None:
    """Writes into `slots` (count int64) the word of the tile program that holds each value."""
    cdef escoin_conv_desc_t d = make_desc(desc)
    cdef const int64_t* rp = <const int64_t*>ptr(row_ptr)
    cdef const int32_t* off = <const int32_t*>ptr(offsets)
    cdef int64_t* out = <int64_t*>ptr(slots)
    cdef escoin_status_t status
    with nogil:
        status = escoin_tile_program_weight_slots(&d, rp, off, out, count)
    check(status)


def tile_program_write_weights(object program, object layout, size_t nbytes, object slots,
                               object values, int64_t count, int device,
                               object stream) -> None:
    """Queues on `stream` the tile program of `values` (device float32, count of them) at
    `program`: the layout's nbytes with each value at its slot (all device memory)."""
    cdef void* out = ptr(program)
    cdef const void* src = ptr(layout)
    cdef const int64_t* at = <const int64_t*>ptr(slots)
    cdef const float* v = <const float*>ptr(values)
    cdef void* queue = ptr(stream)
    cdef escoin_status_t status
    with nogil:
        status = escoin_tile_program_write_weights(out, src, nbytes, at, v, count, device, queue)
    check(status)


def program_build(str kind, tuple desc, object row_ptr, object offsets, object values,
                  object program, size_t nbytes) -> None:
    """Writes the program of program_size's kind into `nbytes` bytes at `program`."""
    cdef ProgramBuild entry = program_build_entry(kind)
    cdef escoin_conv_desc_t d = make_desc(desc)
    cdef const int64_t* rp = <const int64_t*>ptr(row_ptr)
    cdef const int32_t* off = <const int32_t*>ptr(offsets)
    cdef const float* v = <const float*>ptr(values)
    cdef void* out = ptr(program)
    cdef escoin_status_t status
    with nogil:
        status = entry(&d, rp, off, v, out, nbytes)
    check(status)


def forward_cpu(tuple desc, str dtype, object x, object row_ptr, object offsets, object values,
                object bias, object residual, bint relu, object y, object workspace,
                size_t workspace_bytes, bint offsets_trusted=False) -> None:
    cdef escoin_conv_desc_t d = make_desc(desc)
    cdef escoin_dtype_t code = dtype_code(dtype)
    cdef const void* px = ptr(x)
    cdef const int64_t* prp = <const int64_t*>ptr(row_ptr)
    cdef const int32_t* poff = <const int32_t*>ptr(offsets)
    cdef const void* pv = ptr(values)
    cdef const void* pb = ptr(bias)
    cdef const void* pres = ptr(residual)
    cdef void* py = ptr(y)
    cdef void* pws = ptr(workspace)
    cdef int r = relu
    cdef escoin_status_t status
    with nogil:
        if offsets_trusted:
            status = escoin_conv2d_forward_cpu_trusted(&d, code, px, prp, poff, pv, pb, pres, r,
                                                       py, pws, workspace_bytes)
        else:
            status = escoin_conv2d_forward_cpu(&d, code, px, prp, poff, pv, pb, pres, r, py, pws,
                                               workspace_bytes)
    check(status)


def forward_cuda(tuple desc, str dtype, object x, object row_ptr, object offsets, object values,
                 object tile_program, object bias, object residual, bint relu, object y,
                 object workspace, size_t workspace_bytes, int device, object stream) -> None:
    cdef escoin_conv_desc_t d = make_desc(desc)
    cdef escoin_dtype_t code = dtype_code(dtype)
    cdef const void* px = ptr(x)
    cdef const int64_t* prp = <const int64_t*>ptr(row_ptr)
    cdef const int32_t* poff = <const int32_t*>ptr(offsets)
    cdef const void* pv = ptr(values)
    cdef const void* pt = ptr(tile_program)
    cdef const void* pb = ptr(bias)
    cdef const void* pres = ptr(residual)
    cdef void* py = ptr(y)
    cdef void* pws = ptr(workspace)
    cdef void* ps = ptr(stream)
    cdef int r = relu
    cdef escoin_status_t status
    with nogil:
        status = escoin_conv2d_forward_cuda(&d, code, px, prp, poff, pv, pt, pb, pres, r, py,
                                            pws, workspace_bytes, device, ps)
    check(status)


def forward_cuda_mma(tuple desc, object x, object mma_program, object bias, object residual,
                     bint relu, object y, object workspace, size_t workspace_bytes, int device,
                     object stream) -> None:
    cdef escoin_conv_desc_t d = make_desc(desc)
    cdef const void* px = ptr(x)
    cdef const void* pm = ptr(mma_program)
    cdef const void* pb = ptr(bias)
    cdef const void* pres = ptr(residual)
    cdef void* py = ptr(y)
    cdef void* pws = ptr(workspace)
    cdef void* ps = ptr(stream)
    cdef int r = relu
    cdef escoin_status_t status
    with nogil:
        status = escoin_conv2d_forward_cuda_mma(&d, ESCOIN_FLOAT32, px, pm, pb, pres, r, py, pws,
                                                workspace_bytes, device, ps)
    check(status)


def cuda_malloc(int device, size_t nbytes) -> int:
    cdef void* p = NULL
    check(escoin_cuda_malloc(device, nbytes, &p))
    return <uintptr_t>p


def cuda_free(int device, object address) -> None:
    check(escoin_cuda_free(device, ptr(address)))


def cuda_malloc_async(int device, size_t nbytes, object stream) -> int:
    cdef void* p = NULL
    check(escoin_cuda_malloc_async(device, nbytes, ptr(stream), &p))
    return <uintptr_t>p


def cuda_free_async(int device, object address, object stream) -> None:
    check(escoin_cuda_free_async(device, ptr(address), ptr(stream)))


def cuda_memcpy(int device, object dst, object src, size_t nbytes, int kind) -> None:
    cdef void* pd = ptr(dst)
    cdef const void* ps = ptr(src)
    cdef escoin_status_t status
    with nogil:
        status = escoin_cuda_memcpy(device, pd, ps, nbytes, kind)
    check(status)


def cuda_stream_synchronize(int device, object stream) -> None:
    cdef void* ps = ptr(stream)
    cdef escoin_status_t status
    with nogil:
        status = escoin_cuda_stream_synchronize(device, ps)
    check(status)


def cuda_pointer_device(object address) -> int:
    cdef int device = -1
    check(escoin_cuda_pointer_device(ptr(address), &device))
    return device


def c_api() -> object:
    """The core's entry table (escoin_api_t in escoin.h) as a PyCapsule named "escoin.c_api"."""
    return PyCapsule_New(<void*>escoin_api(), b"escoin.c_api", NULL)


def as_flag(object value, str name) -> bool:
    """A yes/no argument as a bool, named in the error where it has no single truth value (an
    array of several elements)."""
    try:
        return bool(value)
    except (TypeError, ValueError) as error:
        raise EscoinError("%s must be a bool, got %s: %s"
                          % (name, type(value).__name__, error)) from None


cdef uintptr_t address(object value, str name) except? 0:
    """A pointer argument as an address: an int (not a bool) in [0, 2^64), else EscoinError
    naming the argument."""
    if isinstance(value, bool):
        raise EscoinError("%s must be a non-negative int pointer, got %r" % (name, value))
    try:
        # (an integer only: a float would convert by truncation)
        return <uintptr_t>PyNumber_Index(value)
    except (OverflowError, TypeError):
        raise EscoinError("%s must be a non-negative int pointer, got %r" % (name, value))


cdef class PreparedCall:
    """One filter's forward call on one input geometry, dtype and device, with everything that
    does not change from call to call derived and validated once (the descriptor, the filter's
    arrays, the workspace size): run() passes the data pointers straight to the core's entry.
    Built by ``SparseFilter.prepare``; `owner` is the filter's store, whose `generation` changes
    when its per-geometry arrays are freed (release_geometries), after which run() refuses;
    `borrowed` holds what else the call's addresses point into, and a call with a `stream`
    runs on that stream only (prepare(values=...): its program is written and freed there).
    A call with a `program_layout` (prepare_for_values) has no values of its own: compiled
    code passes them per launch, and run() refuses."""

    cdef escoin_conv_desc_t desc
    cdef escoin_dtype_t dtype
    cdef int device  # a CUDA device index, or -1: the CPU (the arrays are host memory)
    cdef const int64_t* row_ptr
    cdef const int32_t* offsets
    cdef const void* values
    cdef const void* tile_program
    cdef readonly size_t workspace_bytes
    cdef readonly tuple output_shape
    cdef object owner
    cdef object generation
    cdef object borrowed
    # The stream a call on borrowed memory runs on (None: any): its program was written there.
    cdef readonly object stream
    # (layout address, bytes, slots address, count) for a call whose values come per launch.
    cdef object program_layout

    def __init__(self, *args, **kwargs):
        # Its CPU run() skips the core's check of the offsets, which only escoin's own arrays
        # may: built from a caller's addresses it could read out of bounds.
        raise EscoinError("PreparedCall is made by SparseFilter.prepare or prepare_for_values "
                          "(its run() trusts the filter's arrays escoin derived), not from "
                          "addresses; escoin.sconv takes a caller's arrays and checks them")

    cdef bint _current(self):
        return self.owner.generation == self.generation

    @property
    def current(self) -> bool:
        """Whether run() may run: the filter has kept its per-geometry arrays since."""
        return self._current()

    def native_arguments(self) -> tuple:
        """What run() hands the core's entry besides the call's own addresses, for compiled
        code that calls the entry itself through c_api() (escoin-torch's C++ kernel): the
        descriptor's 16 fields in escoin_conv_desc_t's order, the escoin_dtype_t code, the
        device (-1: the CPU), the addresses of row_ptr, offsets, values and the tile program,
        the workspace bytes, and the address of the filter's generation (an int64) with the
        value it must hold. The addresses stay valid while this call object is alive (it holds
        the filter's store and what it borrowed) and that int64 holds that value (`current`:
        release_geometries frees the arrays and moves it on); values borrowed from a caller
        (prepare(values=...)) stay valid as long as the caller keeps them; a call of
        prepare_for_values gives 0 for the values and the program. A call with a
        `stream` must be launched on that stream only."""
        if not self._current():
            raise EscoinError("the filter's per-geometry arrays were freed since this call was "
                              "prepared (SparseFilter.release_geometries): prepare it again")
        d = self.desc
        return ((d.batch, d.in_channels, d.in_height, d.in_width, d.out_channels, d.kernel_h,
                 d.kernel_w, d.stride_h, d.stride_w, d.pad_top, d.pad_bottom, d.pad_left,
                 d.pad_right, d.dilation_h, d.dilation_w, d.groups),
                <int>self.dtype, self.device, <uintptr_t>self.row_ptr, <uintptr_t>self.offsets,
                <uintptr_t>self.values, <uintptr_t>self.tile_program, self.workspace_bytes,
                self.owner.generation_cell.ctypes.data, self.generation)

    def native_program_layout(self) -> tuple:
        """For a call of prepare_for_values, where the program of each launch's values comes
        from: the addresses of the uploaded layout and of the slots (int64, one per nonzero),
        the layout's bytes and the count of nonzeros, as escoin_tile_program_write_weights
        takes them: (layout, bytes, slots, count). (0, 0, 0, count) where the staged kernel
        does not run this geometry: the launch then takes no program. Valid as long as
        native_arguments' are."""
        if self.program_layout is None:
            raise EscoinError("this call computes with its filter's values; only a call of "
                              "SparseFilter.prepare_for_values has a program layout")
        if not self._current():
            raise EscoinError("the filter's per-geometry arrays were freed since this call was "
                              "prepared (SparseFilter.release_geometries): prepare it again")
        return self.program_layout

    def run(self, x, y, workspace, bias=0, residual=0, relu=False, stream=0) -> None:
        """y = conv2d(x) (+ residual) (+ bias), then the ReLU if `relu`; every argument an
        address (stream: a CUDA stream handle, 0 for the default stream; on the CPU it must
        be 0)."""
        if not self._current():
            raise EscoinError("the filter's per-geometry arrays were freed since this call was "
                              "prepared (SparseFilter.release_geometries): prepare it again")
        if self.program_layout is not None:
            raise EscoinError("this call has no values (SparseFilter.prepare_for_values: "
                              "compiled code passes them per launch); run() needs a call of "
                              "prepare, with values= for values on the device")
        cdef const void* px = <const void*>address(x, "x")
        cdef void* py = <void*>address(y, "y")
        cdef void* pws = <void*>address(workspace, "workspace")
        cdef const void* pb = <const void*>address(bias, "bias")
        cdef const void* pres = <const void*>address(residual, "residual")
        cdef void* ps = <void*>address(stream, "stream")
        if self.stream is not None and <uintptr_t>ps != <uintptr_t>self.stream:
            raise EscoinError("stream must be %d, the stream this call was prepared on (its "
                              "program was written there, for the device values it was "
                              "prepared with), got %r" % (self.stream, stream))
        cdef int r = as_flag(relu, "relu")
        cdef escoin_status_t status
        if self.device < 0:
            if ps != NULL:
                raise EscoinError("stream must be 0 for a call prepared for the CPU, got %r"
                                  % (stream,))
            with nogil:
                # The offsets are the filter's own (host_pointers), checked when derived.
                status = escoin_conv2d_forward_cpu_trusted(
                    &self.desc, self.dtype, px, self.row_ptr, self.offsets, self.values, pb,
                    pres, r, py, pws, self.workspace_bytes)
        else:
            with nogil:
                status = escoin_conv2d_forward_cuda(
                    &self.desc, self.dtype, px, self.row_ptr, self.offsets, self.values,
                    self.tile_program, pb, pres, r, py, pws, self.workspace_bytes, self.device,
                    ps)
        check(status)


def prepared_call(tuple desc, str dtype, int device, object row_ptr, object offsets,
                  object values, object tile_program, size_t workspace_bytes,
                  tuple output_shape, object owner, object borrowed=None, object stream=None,
                  object program_layout=None) -> PreparedCall:
    """A PreparedCall of arrays escoin derived for this geometry (SparseFilter.prepare's and
    prepare_for_values'; PreparedCall's own constructor refuses)."""
    cdef PreparedCall call = PreparedCall.__new__(PreparedCall)
    call.desc = make_desc(desc)
    call.dtype = dtype_code(dtype)
    call.device = device
    call.row_ptr = <const int64_t*>ptr(row_ptr)
    call.offsets = <const int32_t*>ptr(offsets)
    call.values = ptr(values)
    call.tile_program = ptr(tile_program)
    call.workspace_bytes = workspace_bytes
    call.output_shape = output_shape
    call.owner = owner
    call.generation = owner.generation
    # Memory the call reads that is not the filter's (values a caller passed to prepare and
    # the program written for them), kept alive as long as the call is.
    call.borrowed = borrowed
    call.stream = stream
    call.program_layout = program_layout
    return call
