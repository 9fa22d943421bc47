"""The ``escoin::sparse_conv2d`` custom op: CPU and CUDA kernels, fake kernel, autograd.

Being a ``torch.library`` op (rather than a Python function calling escoin) is what makes the
convolution an opaque node that torch.compile can trace through, that CUDA graphs can capture
(escoin neither allocates nor synchronises inside a compute call and we pass the current stream),
and that ``torch.library.opcheck`` can verify.

Semantics are ``torch.nn.functional.conv2d`` (zero padding, NCHW or channels_last input), with the
weight given as escoin CSR tensors, plus an optional residual added and ReLU applied in the
kernel's epilogue (``relu(conv2d(x) + residual)``, as a residual network's block ends).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import numbers
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import escoin
import numpy as np
import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F

from escoin_torch._cache import TensorCache, when_freed
from escoin_torch.csr import CSRWeight, Transposition, host_numpy, transpose, transposition

__all__ = ["sparse_conv2d", "SUPPORTED_DTYPES"]

#: The dtypes escoin takes, per device type. float16 and bfloat16 are stored in 16 bits and
#: computed in float32, each output rounded once; float64 runs on the CPU only.
SUPPORTED_DTYPES = {"cpu": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
                    "cuda": (torch.float32, torch.float16, torch.bfloat16)}


def has_kernels_for(tensor: torch.Tensor) -> bool:
    """Whether escoin computes in the tensor's dtype on its device (a meta tensor: no)."""
    return tensor.dtype in SUPPORTED_DTYPES.get(tensor.device.type, ())


# escoin's name of each dtype it takes.
_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
                torch.bfloat16: "bfloat16"}


def escoin_dtype_name(dtype: torch.dtype) -> str:
    """escoin's name of a dtype it takes (KeyError for others)."""
    return _DTYPE_NAMES[dtype]


_SCHEMA = ("(Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values, int[4] weight_shape, "
           "Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu, "
           "Tensor? residual=None) -> Tensor")


# Every PreparedFilter alive (the op's cache below holds some, CPU layers their own): what
# release_geometries reaches.
_prepared: "weakref.WeakSet[PreparedFilter]" = weakref.WeakSet()
_prepared_lock = threading.Lock()


@dataclass(eq=False)  # compared and hashed by identity, as a member of _prepared
class PreparedFilter:
    """An escoin.SparseFilter and its calls prepared per input shape and geometry
    (:meth:`escoin.SparseFilter.prepare`: the descriptor, workspace size and the filter's device
    or host arrays, derived and validated once), so that a call costs the core's entry and
    little else (the descriptor alone, built and checked per call, was ~8 us of a ~40 us CPU
    call of a small layer)."""

    filt: escoin.SparseFilter
    launches: Dict[tuple, escoin.PreparedCall] = field(default_factory=dict)
    # CUDA values the calls compute with in place of filt's own (filt is then the first filter
    # of their pattern): a training step's new values, which thus never go to the host
    # (SparseFilter.prepare's `values`).
    values: Optional["CudaValues"] = None
    # Whether filt lists each row's entries as the CSR tensors do (from_csr sorts a row's
    # columns): only then can a call take new values in the tensors' order
    # (prepare_for_values, the C++ training path).
    in_tensor_order: bool = True

    def __post_init__(self) -> None:
        with _prepared_lock:
            _prepared.add(self)

    def launch(self, shape: tuple, device: Union[int, str], dtype: str, stride: tuple,
               padding: tuple, dilation: tuple) -> escoin.PreparedCall:
        """The call for x of `shape` in `dtype` on CUDA device `device` (an index), or on the
        host where `device` is "cpu"."""
        key: tuple = (shape, device, dtype, stride, padding, dilation)
        on_values = {}
        if self.values is not None:
            # The program for `values` is written on the current stream, ahead of the launch,
            # and the call is bound to that stream: one call per stream.
            stream = torch._C._cuda_getCurrentRawStream(device)
            on_values = dict(values=self.values, stream=stream)
            key += (stream,)
        found = self.launches.get(key)
        if found is None or not found.current:  # (not current: its filter freed its arrays)
            found = self.filt.prepare(shape, stride, padding, dilation, dtype=dtype,
                                      device=device, **on_values)
            self.launches[key] = found
        return found


# The filter per CSR contents (and hence per device): building one costs a host copy of the CSR
# and, on CUDA, an upload; both must stay out of the steady state and of graph capture. One per
# pattern (row_ptr, col_idx): a training step's values replace the last step's.
_filters: TensorCache[PreparedFilter] = TensorCache()
# The input-gradient CSR per forward CSR, so eval-mode input gradients (saliency, adversarial
# examples) transpose the weight once per weight version rather than once per backward.
_transposes: TensorCache[CSRWeight] = TensorCache()
# Per pattern (row_ptr, col_idx): a filter of its first values, in host memory only, and its
# transpose's pattern. A training step changes a CSR's values and keeps its pattern
# (escoin_torch.layer), so the next step's filter is that one's with_values on the host, or
# on a GPU that one computing with the new values where they are (the stretched offsets and
# program layouts shared, nothing derived again, no copy to the host), and its transpose a
# gather of the new values.
_patterns: TensorCache[escoin.SparseFilter] = TensorCache()
_transpositions: TensorCache[Transposition] = TensorCache()
# Set while the op records a call for autograd (_recorded) and while a backward computes the
# input gradient: such values are a training step's, which serve a call or two. Only they make
# a filter of a known pattern that computes with the values where they are on the GPU
# (CudaValues): its calls are bound to their stream, so neither the C++ kernel nor the eager
# path keeps them. Other new values (inference after a write to the weight) make a filter of
# host values, once, whose calls those paths keep. A training call also tells the C++ training
# path (native_training.cpp) its pattern and geometry, so that it takes the next steps' calls.
_training_values = contextvars.ContextVar("escoin_training_values", default=False)


@contextlib.contextmanager
def training_values() -> Iterator[None]:
    """Marks the op's calls in the block as a training step's (see _training_values)."""
    token = _training_values.set(True)
    try:
        yield
    finally:
        _training_values.reset(token)


class CudaValues:
    """A CUDA values tensor as float32, for SparseFilter.prepare, through the CUDA array
    interface. Where that is the tensor itself, without a reference to it: the op's caches key
    on it and never keep it alive (a filter of it is found only while it lives), and a reference
    from its calls would keep every training step's values, filters and calls. A converted copy
    (16-bit weights) is held: only these calls use it."""

    def __init__(self, values: torch.Tensor) -> None:
        converted = values.detach().to(torch.float32).contiguous()
        self.copy = None if converted.data_ptr() == values.data_ptr() else converted
        self.__cuda_array_interface__ = {
            "shape": (converted.numel(),), "typestr": "<f4", "strides": None, "version": 3,
            "data": (converted.data_ptr(), False), "stream": None}


def release_geometries() -> int:
    """Frees what escoin keeps per input geometry (stretched offsets, device copies, kernel
    programs: :meth:`escoin.SparseFilter.release_geometries`) for every weight it has been
    called with, and returns the bytes that held. For models fed many input sizes, whose layers
    otherwise keep every size's arrays; the next call of each size derives them again. CUDA
    graphs captured before must be captured again (torch.compile's "reduce-overhead" ones:
    ``torch.compiler.reset()`` and compile again), and no escoin call may run on another thread
    meanwhile."""
    if _native is not None:
        _native.forget()  # its calls hold the addresses freed below
    with _prepared_lock:
        prepared = list(_prepared)
    released = 0
    for p in prepared:
        p.launches.clear()  # its pointers are to the arrays freed next
        released += p.filt.release_geometries()
        p.launches.clear()  # (and again: a call against the rule may have stored some between)
    if _native is not None:
        _native.forget()  # (likewise)
    return released


def set_native_training(enabled: bool) -> bool:
    """Whether a training step's calls on a pattern escoin-torch has seen run in C++
    (``_native``'s training path: recorded for autograd and differentiated there, each call's
    program written on the GPU, no Python on the way) or through this module's
    autograd.Function and Python kernel (the path of every other call: the same kernels and
    results, more host time per layer and step). On by default: it learns each pattern from the
    first training step on it (which runs the Python path) and takes the steps after. Returns
    the previous setting; False, and nothing to switch, where the C++ path is not built."""
    if _native is None or not _native_trains:
        return False
    previous = bool(_native.training_stats()["enabled"])
    _native.set_training_calls(bool(enabled))
    return previous


def sparse_conv2d(x: torch.Tensor, weight: CSRWeight, bias: Optional[torch.Tensor] = None,
                  stride: Union[int, Sequence[int]] = 1,
                  padding: Union[int, Sequence[int], str] = 0,
                  dilation: Union[int, Sequence[int]] = 1, relu: bool = False,
                  residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.conv2d(x, weight.to_dense(), bias, stride, padding, dilation, weight.groups)``, computed
    by escoin from the CSR weight, plus ``residual`` (a tensor of the output's shape) if given,
    optionally followed by a ReLU; the residual and the ReLU are applied as the output is
    written, not by separate passes over it.

    Accepts what F.conv2d accepts: (N, C, H, W) or unbatched (C, H, W) input, int or pair
    arguments, and ``padding='same'`` / ``'valid'``.
    """
    return conv2d_with_filter(x, weight, None, bias, stride, padding, dilation, relu, residual)


def conv2d_with_filter(x: torch.Tensor, weight: CSRWeight,
                       host_filter: Optional[PreparedFilter],
                       bias: Optional[torch.Tensor] = None,
                       stride: Union[int, Sequence[int]] = 1,
                       padding: Union[int, Sequence[int], str] = 0,
                       dilation: Union[int, Sequence[int]] = 1, relu: bool = False,
                       residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`sparse_conv2d`, where a plain CPU inference call may use `host_filter`: the escoin
    filter `weight` was copied from (:func:`escoin_torch.csr.compress`), which spares the op's
    filter cache its per-call comparison of the CSR with a snapshot (O(nnz): ~70 us of a 1x1
    layer's 340 us at 26k nonzeros). None: that cache."""
    if x.dim() == 3:
        return conv2d_with_filter(x.unsqueeze(0), weight, host_filter, bias, stride, padding,
                                  dilation, relu, residual.unsqueeze(0)
                                  if isinstance(residual, torch.Tensor) else residual).squeeze(0)
    if x.dim() != 4:
        raise ValueError(f"sparse_conv2d expects a (N, C, H, W) or (C, H, W) input, got shape "
                         f"{tuple(x.shape)}")
    if not isinstance(weight, CSRWeight):
        raise TypeError(f"weight must be a CSRWeight (escoin_torch.csr.from_dense of a dense "
                        f"weight, or a SparseConv2d's .csr), got {type(weight).__name__}")
    stride_, dilation_ = _pair(stride, "stride", 1), _pair(dilation, "dilation", 1)
    if isinstance(padding, str):
        x, padding_ = _explicit_padding(x, padding, weight.shape[2:], stride_, dilation_)
    else:
        padding_ = _pair(padding, "padding", 0)
    if residual is not None and not _fits_output(residual, x, weight, stride_, padding_,
                                                 dilation_):
        # A residual that broadcasts, of another dtype or device, or not a tensor: added as
        # torch adds it.
        y = conv2d_with_filter(x, weight, host_filter, bias, stride_, padding_, dilation_)
        y = y + residual
        return torch.relu(y) if relu else y
    args = (x, weight.row_ptr, weight.col_idx, weight.values, list(weight.shape), bias, stride_,
            padding_, dilation_, weight.groups, relu, residual)
    device = x.device.type
    if _plain_call(device, x, weight.row_ptr, weight.col_idx, weight.values, bias, residual):
        if device == "cuda":
            return _cuda_kernel(*args)
        if device == "cpu":
            return _cpu_forward(host_filter, *args)
    return _call_op(*args)


def _fits_output(residual: object, x: torch.Tensor, weight: CSRWeight,
                 stride: List[int], padding: List[int], dilation: List[int]) -> bool:
    """Whether the kernels can add ``residual`` as they write: a tensor of the output's exact
    shape, x's dtype and device."""
    if not isinstance(residual, torch.Tensor):
        return False
    out_hw = _output_hw(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    return (tuple(residual.shape) == (x.shape[0], weight.shape[0], *out_hw)
            and residual.dtype == x.dtype and residual.device == x.device)


def _output_hw(in_hw: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
               padding: Sequence[int], dilation: Sequence[int]) -> List[int]:
    """Output height and width, as F.conv2d computes them (less than 1 where the padded input is
    smaller than the dilated kernel)."""
    # (Per axis rather than a comprehension over zip: it runs on every call.)
    return [(in_hw[0] + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1,
            (in_hw[1] + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1]


def _plain_call(device_type: str, *tensors: Optional[torch.Tensor]) -> bool:
    """Whether a call may skip the op's dispatch (the custom op's Python layers and autograd:
    ~50 us of a ~160 us eager call on an H100's host) and run the kernel function directly:
    plain tensors on `device_type`, no gradient to record, and nothing that must see the op
    (:func:`uninterposed`)."""
    present = [t for t in tensors if t is not None]
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type != device_type
           for t in present):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return False
    return uninterposed(device_type, present)


def uninterposed(device_type: str, tensors: Sequence[torch.Tensor]) -> bool:
    """Whether nothing must see a call of the op on `tensors` (on `device_type`): not
    torch.compile, TorchScript, dispatch or function modes such as FakeTensorMode, functorch
    transforms, autocast, forward-mode AD's tangents, nor a profiler, whose trace should name
    it."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False  # (first: the compiler cannot trace the checks below)
    if has_tangent(tensors):
        return False
    if torch.autograd._profiler_enabled() or torch.is_autocast_enabled(device_type):
        return False  # (autocast: the op's autocast kernel casts the inputs)
    internals = torch._C
    try:
        if internals._len_torch_dispatch_stack() or internals._is_torch_function_mode_enabled():
            return False
        # Inside a functorch transform even a call on plain tensors goes through the
        # dispatcher: the transform wraps what the call makes of them (a detached copy, the
        # output), which has no storage for the kernel to write.
        return internals._functorch.maybe_current_level() is None
    except AttributeError:  # a torch without these internals: keep the dispatch
        return False


def _sparse_conv2d_cpu(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                       values: torch.Tensor, weight_shape: List[int], bias: Optional[torch.Tensor],
                       stride: List[int], padding: List[int], dilation: List[int], groups: int,
                       relu: bool, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CPU kernel: escoin's OpenMP kernels write straight into a torch-allocated output."""
    return _cpu_forward(None, x, row_ptr, col_idx, values, weight_shape, bias, stride, padding,
                        dilation, groups, relu, residual)


def _cpu_forward(host_filter: Optional[PreparedFilter], x: torch.Tensor,
                 row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
                 weight_shape: List[int], bias: Optional[torch.Tensor], stride: List[int],
                 padding: List[int], dilation: List[int], groups: int, relu: bool,
                 residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The CPU kernel's work, with `host_filter` (conv2d_with_filter) or else the op's filter
    cache's filter for these CSR tensors: the raw-pointer entry on the tensors' memory, which
    takes every CPU dtype (NumPy has no bfloat16)."""
    out = _empty_output(x, row_ptr, col_idx, values, weight_shape, bias, stride, padding,
                        dilation, groups, residual)
    if out.numel() == 0:
        return _like_input_format(out, x)
    prepared = host_filter if host_filter is not None else _filter(row_ptr, col_idx, values,
                                                                   weight_shape, groups)
    x_c, bias_c, residual_c = (_raw(t) for t in (x, bias, residual))
    shape, dtype = tuple(x_c.shape), escoin_dtype_name(x.dtype)
    geometry = dict(stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation))
    # _empty_output has checked every tensor (dtype, device, shape).
    run_call(prepared.launch(shape, "cpu", dtype, **geometry), x_c, out, bias_c, residual_c,
             relu)
    return _like_input_format(out, x)


def _sparse_conv2d_cuda(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                        values: torch.Tensor, weight_shape: List[int],
                        bias: Optional[torch.Tensor], stride: List[int], padding: List[int],
                        dilation: List[int], groups: int, relu: bool,
                        residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CUDA kernel: output and workspace come from torch's caching allocator and the launch goes
    on torch's current stream, so the call is stream-ordered and legal inside graph capture."""
    out = _empty_output(x, row_ptr, col_idx, values, weight_shape, bias, stride, padding,
                        dilation, groups, residual)
    if out.numel() == 0:
        return _like_input_format(out, x)
    x_c, bias_c, residual_c = (_raw(t) for t in (x, bias, residual))
    shape, dtype = tuple(x_c.shape), escoin_dtype_name(x.dtype)
    geometry = dict(stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation))
    # Held until the launch is queued: its device arrays (float32 values whatever x's dtype)
    # live as long as the filter does.
    cached_filter = _filter(row_ptr, col_idx, values, weight_shape, groups)
    call = cached_filter.launch(shape, x.device.index, dtype, **geometry)
    # _empty_output has checked every tensor (dtype, device, shape).
    run_call(call, x_c, out, bias_c, residual_c, relu)
    try:
        if _native_trains and _training_values.get() and cached_filter.in_tensor_order:
            # A training step's call: the C++ training path takes the next steps' calls on
            # this pattern and geometry, each with its own values.
            device = x.device.index
            _native.remember_pattern(x, row_ptr, col_idx, weight_shape, stride, padding,
                                     dilation, groups, lambda: cached_filter.filt
                                     .prepare_for_values(shape, dtype=dtype, device=device,
                                                         **geometry))
            _forget_when_freed(row_ptr, col_idx)
        if _native_remembers and call.stream is None:
            # Later calls with these tensors' contents and x's shape skip this function (where
            # the C++ kernel can take them: contiguous NCHW x, no neg bit).
            _native.remember(x, row_ptr, col_idx, values, weight_shape, stride, padding,
                             dilation, groups, call)
            _forget_when_freed(row_ptr, col_idx, values)
    except RuntimeError as error:  # an escoin whose prepared calls it cannot read
        _stop_remembering(error)
    # An EscoinError (a ValueError) from prepare_for_values passes through: its arguments are
    # the launch's that just ran, so only the CUDA runtime can refuse it (out of memory for the
    # pattern's layout), and that is an error the caller must see, not a version mismatch.
    return _like_input_format(out, x)


# The CSR tensors whose freeing _native hears of (_forget_when_freed), by id.
_forgetting: Dict[int, weakref.finalize] = {}


def _forget_when_freed(*tensors: torch.Tensor) -> None:
    """Has the C++ kernel and training path forget what they learnt of these CSR tensors when
    each is freed: their entries hold the filter's device arrays (and a pattern's transposition),
    which would otherwise stay in memory after the model is deleted, until the next call learnt
    something. A view that outlives its tensor in the same storage only has its calls learnt
    again."""
    for tensor in tensors:
        when_freed(_forgetting, tensor, _native.forget_storage)


def _stop_remembering(error: Exception) -> None:
    """Leaves every later CUDA call to the Python kernel, with a warning: the C++ kernel cannot
    use this escoin's prepared calls (escoin and escoin-torch built from different versions)."""
    global _native_remembers, _native_trains
    _native_remembers = _native_trains = False
    if hasattr(_native, "set_training_calls"):
        _native.set_training_calls(False)
    warnings.warn(f"escoin-torch's C++ kernel cannot use this escoin ({error}); CUDA calls run "
                  "the Python kernel (install escoin and escoin-torch of one version)",
                  RuntimeWarning, stacklevel=3)


def run_call(call: escoin.PreparedCall, x: torch.Tensor, out: torch.Tensor,
             bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
             relu: bool) -> None:
    """Runs a prepared call on dense tensors of the shapes and dtype it was prepared for: on
    CUDA with a workspace from torch's caching allocator, on torch's current stream (so the
    call is stream-ordered and legal inside graph capture); on the CPU with this thread's host
    workspace."""
    bias_ptr = 0 if bias is None else bias.data_ptr()
    residual_ptr = 0 if residual is None else residual.data_ptr()
    if x.is_cuda:
        workspace = torch.empty(call.workspace_bytes, dtype=torch.uint8, device=x.device)
        # The current stream's handle as torch.compile's generated code reads it: a
        # torch.cuda.Stream object built per call (torch.cuda.current_stream) costs more.
        call.run(x.data_ptr(), out.data_ptr(), workspace.data_ptr(), bias_ptr, residual_ptr,
                 relu, torch._C._cuda_getCurrentRawStream(x.get_device()))
    else:
        call.run(x.data_ptr(), out.data_ptr(),
                 escoin.host_workspace(call.workspace_bytes).ctypes.data, bias_ptr,
                 residual_ptr, relu)


def _sparse_conv2d_fake(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                        values: torch.Tensor, weight_shape: List[int],
                        bias: Optional[torch.Tensor], stride: List[int], padding: List[int],
                        dilation: List[int], groups: int, relu: bool,
                        residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Shape, dtype, device and memory format of the result, with the same argument checks as
    the real kernels so that a bad call fails at trace time, not first run."""
    out = _empty_output(x, row_ptr, col_idx, values, weight_shape, bias, stride, padding,
                        dilation, groups, residual)
    return _like_input_format(out, x)


@dataclass(frozen=True)
class _ConvGeometry:
    """The op's arguments that are not tensors, as one object: to torch.func's pytrees a leaf
    (lists of ints would be leaves of their own, which the vmap rule generated for a nested
    transform, e.g. hessian, then miscounts)."""
    weight_shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    padding: Tuple[int, ...]
    dilation: Tuple[int, ...]
    groups: int
    relu: bool

    @staticmethod
    def of(weight_shape: Sequence[int], stride: Sequence[int], padding: Sequence[int],
           dilation: Sequence[int], groups: int, relu: bool) -> "_ConvGeometry":
        """From the op's arguments (lists, as its schema has them)."""
        return _ConvGeometry(tuple(weight_shape), tuple(stride), tuple(padding),
                             tuple(dilation), groups, relu)


def _gradients(saved: tuple, geometry: _ConvGeometry, grad: torch.Tensor,
               needs: Tuple[bool, bool, bool, bool]) -> tuple:
    """Gradients for x (a sparse conv with the transposed weight), for the stored weight values
    only (the sparsity pattern is fixed), for the bias and for the residual (the output's
    gradient, through the ReLU), each where `needs` asks: (x, values, bias, residual)."""
    x, row_ptr, col_idx, values, output = saved
    g = geometry
    csr = CSRWeight(row_ptr, col_idx, values, g.weight_shape, g.groups)
    pattern = _transposition_of(csr)
    if g.relu:
        grad = grad * (output > 0)
    grad_x = grad_values = grad_bias = None
    if needs[0]:
        grad_x = _input_grad(grad, csr, pattern, x.shape, g.stride, g.padding, g.dilation)
    if needs[1]:
        # The dense weight gradient is one cuDNN/oneDNN call; only its entries on the pattern
        # are kept. A sparse (SDDMM-style) kernel would be cheaper but escoin has none.
        dense = torch.nn.grad.conv2d_weight(x, g.weight_shape, grad, g.stride, g.padding,
                                            g.dilation, g.groups)
        index = csr.flat_index() if pattern is None else pattern.flat_index
        grad_values = dense.reshape(-1)[index]
    if needs[2]:
        grad_bias = grad.sum((0, 2, 3))
    if _native_trains and pattern is not None and values.is_cuda \
            and _unwrapped(row_ptr) is row_ptr and _unwrapped(col_idx) is col_idx:
        # The C++ training path computes the next backwards of this pattern itself.
        _native.remember_transposition(row_ptr, col_idx, list(g.weight_shape), g.groups,
                                       pattern.row_ptr, pattern.col_idx, pattern.order,
                                       pattern.flat_index)
        _forget_when_freed(row_ptr, col_idx)
    return grad_x, grad_values, grad_bias, grad if needs[3] else None


def _backward_of_native_call(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                             values: torch.Tensor, output: Optional[torch.Tensor],
                             weight_shape: List[int], stride: List[int], padding: List[int],
                             dilation: List[int], groups: int, relu: bool, grad: torch.Tensor,
                             needs: Tuple[bool, bool, bool, bool]) -> tuple:
    """The gradients (x, values, bias, residual) of a call the C++ training path
    (native_training.cpp) recorded, where it leaves them here: a backward that records its own
    graph (a double backward), or one whose input gradient's pattern it does not know yet."""
    geometry = _ConvGeometry.of(weight_shape, stride, padding, dilation, groups, relu)
    return _gradients((x, row_ptr, col_idx, values, output), geometry, grad, needs)


def _save(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, row_ptr: torch.Tensor,
          col_idx: torch.Tensor, values: torch.Tensor, output: torch.Tensor,
          geometry: _ConvGeometry) -> None:
    """What _gradients reads back (the output only for the ReLU's mask)."""
    ctx.save_for_backward(x, row_ptr, col_idx, values, output if geometry.relu else None)
    ctx.geometry = geometry


class _SparseConv2dFunction(torch.autograd.Function):
    """The op's derivatives: what its autograd kernel records where a gradient is wanted, and
    what torch.func transforms call (_call_op). It has a setup_context, which functorch needs
    (grad, vjp, jacrev), a forward-mode rule (jvp, jacfwd, torch.autograd.forward_ad) and a vmap
    rule generated from those (per-sample gradients: vmap of grad; hessian). Its arguments: x,
    row_ptr, col_idx, values, bias, residual, _ConvGeometry; its forward calls the op again, with
    gradients off."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, row_ptr: torch.Tensor,  # type: ignore[override]
                col_idx: torch.Tensor, values: torch.Tensor, bias: Optional[torch.Tensor],
                residual: Optional[torch.Tensor], g: _ConvGeometry) -> torch.Tensor:
        return _OP(x, row_ptr, col_idx, values, list(g.weight_shape), bias, list(g.stride),
                   list(g.padding), list(g.dilation), g.groups, g.relu, residual)

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple,
                      output: torch.Tensor) -> None:
        x, row_ptr, col_idx, values, _, _, geometry = inputs
        _save(ctx, x, row_ptr, col_idx, values, output, geometry)
        ctx.save_for_forward(x, row_ptr, col_idx, values, output)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx,  # type: ignore[override]
                 grad: torch.Tensor) -> tuple:
        needs = ctx.needs_input_grad
        grad_x, grad_values, grad_bias, grad_residual = _gradients(
            ctx.saved_tensors, ctx.geometry, grad, (needs[0], needs[3], needs[4], needs[5]))
        return grad_x, None, None, grad_values, grad_bias, grad_residual, None

    @staticmethod
    def jvp(ctx: torch.autograd.function.FunctionCtx, x_t: Optional[torch.Tensor], _row_ptr: None,
            _col_idx: None, values_t: Optional[torch.Tensor], bias_t: Optional[torch.Tensor],
            residual_t: Optional[torch.Tensor], _geometry: None) -> torch.Tensor:
        """The output's tangent: the convolution is linear in x, in the values, in the bias and
        in the residual, then the ReLU's mask."""
        x, row_ptr, col_idx, values, output = ctx.saved_tensors  # save_for_forward's
        g = ctx.geometry
        linear = dataclasses.replace(g, relu=False)
        tangent = torch.zeros_like(output)
        if x_t is not None:
            tangent = tangent + _SparseConv2dFunction.apply(
                x_t, row_ptr, col_idx, values, None, None, linear)
        if values_t is not None:
            tangent = tangent + _SparseConv2dFunction.apply(
                x, row_ptr, col_idx, values_t, None, None, linear)
        if bias_t is not None:
            tangent = tangent + bias_t[None, :, None, None]
        if residual_t is not None:
            tangent = tangent + residual_t
        return tangent * (output > 0) if g.relu else tangent


class _SparseConv2dRecorded(torch.autograd.Function):
    """_SparseConv2dFunction without setup_context, for calls with a gradient to record and
    no functorch transform nor tangent (those need setup_context): torch's apply then skips
    binding each call's arguments to the forward's signature (inspect.signature), a third of
    the Python path's host time on a small CPU call."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx,  # type: ignore[override]
                x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                values: torch.Tensor, bias: Optional[torch.Tensor],
                residual: Optional[torch.Tensor], g: _ConvGeometry) -> torch.Tensor:
        output = _SparseConv2dFunction.forward(x, row_ptr, col_idx, values, bias, residual, g)
        _save(ctx, x, row_ptr, col_idx, values, output, g)
        return output

    backward = staticmethod(_SparseConv2dFunction.backward)


def load_native_kernel() -> Optional[ModuleType]:
    """escoin_torch._native (native_kernel.cpp: the op's CUDA kernel in C++ for calls it has
    seen, which spares torch.compile's code the Python kernel's host time on every layer), or
    None with a warning where it was not built or was built for another torch. Without it the
    Python kernel runs every call: same results, more host time."""
    try:
        from escoin_torch import _native
    except ImportError as error:
        warnings.warn(f"escoin-torch's C++ kernel did not load ({error}); CUDA calls run the "
                      "Python kernel (reinstall escoin-torch against this torch with pip install "
                      "--no-build-isolation)", RuntimeWarning, stacklevel=2)
        return None
    return _native


def transformed(tensor: object) -> bool:
    """Whether a torch.func transform (grad, vmap, ...) wraps `tensor`."""
    try:
        return (isinstance(tensor, torch.Tensor)
                and torch._C._functorch.is_functorch_wrapped_tensor(tensor))
    except AttributeError:  # a torch without these internals
        return False


def _call_op(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
             values: torch.Tensor, weight_shape: List[int], bias: Optional[torch.Tensor],
             stride: List[int], padding: List[int], dilation: List[int], groups: int,
             relu: bool, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """torch.ops.escoin.sparse_conv2d, through _SparseConv2dFunction where a torch.func
    transform wraps one of the tensors (elsewhere the op itself, which torch.compile, export and
    TorchScript see)."""
    tensors = (x, row_ptr, col_idx, values, bias, residual)
    if not torch.compiler.is_compiling() and any(transformed(t) for t in tensors):
        geometry = _ConvGeometry.of(weight_shape, stride, padding, dilation, groups, relu)
        return _SparseConv2dFunction.apply(*tensors, geometry)
    return torch.ops.escoin.sparse_conv2d(x, row_ptr, col_idx, values, weight_shape, bias,
                                          stride, padding, dilation, groups, relu, residual)


# The op, defined with torch.library's low-level calls rather than torch.library.custom_op,
# whose Python layers around each kernel (argument aliasing checks, a wrapper per device) and
# whose autograd kernel (which dispatches a second time even with no gradient to record) cost
# ~18 us of a ~48 us call on a 2-core CPU: torch.compile's default mode pays that per layer.
_LIBRARY = torch.library.Library("escoin", "DEF")
_LIBRARY.define("sparse_conv2d" + _SCHEMA, tags=(torch.Tag.pt2_compliant_tag,))
_native = load_native_kernel()
_LIBRARY.impl("sparse_conv2d", _sparse_conv2d_cpu, "CPU")
if _native is not None:
    # Its import registered its C++ kernel for CUDA, which runs _sparse_conv2d_cuda on the calls
    # it has not seen (every call, if it cannot have the core's entries).
    _native.set_python_kernel(_sparse_conv2d_cuda)
    _native_remembers = True
    try:
        _native.set_api(escoin.c_api())
    except RuntimeError as error:  # an escoin older than the extension
        _stop_remembering(error)
    _cuda_kernel: Callable[..., torch.Tensor] = _native.sparse_conv2d_cuda
else:
    _LIBRARY.impl("sparse_conv2d", _sparse_conv2d_cuda, "CUDA")
    _native_remembers = False
    _cuda_kernel = _sparse_conv2d_cuda
torch.library.register_fake("escoin::sparse_conv2d", _sparse_conv2d_fake, lib=_LIBRARY)
_OP = torch.ops.escoin.sparse_conv2d.default


def has_tangent(args: Sequence[object]) -> bool:
    """Whether forward-mode AD (torch.autograd.forward_ad) gives one of the tensors in `args` a
    tangent, which the op's result must carry too."""
    if forward_ad._current_level < 0:  # no dual level open: one read, on every call
        return False
    return any(isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None
               for t in args)


def _recorded(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
              values: torch.Tensor, weight_shape: List[int], bias: Optional[torch.Tensor],
              stride: List[int], padding: List[int], dilation: List[int], groups: int,
              relu: bool, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A call of the op with a gradient to record or a tangent to carry, which the op's autograd
    kernel (native_kernel.cpp's, or _sparse_conv2d_autograd) hands here:
    _SparseConv2dFunction, or its plain form where nothing needs its setup_context."""
    geometry = _ConvGeometry.of(weight_shape, stride, padding, dilation, groups, relu)
    function = (_SparseConv2dFunction if torch._C._are_functorch_transforms_active()
                or has_tangent((x, values, bias, residual)) else _SparseConv2dRecorded)
    with training_values():  # (its values: a training step's, as a rule)
        return function.apply(x, row_ptr, col_idx, values, bias, residual, geometry)


def _sparse_conv2d_autograd(keyset: torch._C.DispatchKeySet, *args: object) -> torch.Tensor:
    """The op's autograd kernel where the C++ extension did not load (its own, in C++, spares
    calls with nothing to record the entry into Python): _recorded where a gradient is to be
    recorded or a tangent carried, elsewhere on down the dispatcher."""
    if (torch.is_grad_enabled() and torch._C._any_requires_grad(*args)) or has_tangent(args):
        return _recorded(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return _OP.redispatch(keyset & torch._C._after_autograd_keyset, *args)


# Whether the C++ training path (native_training.cpp) is there to be told of patterns.
_native_trains = (_native_remembers and hasattr(_native, "remember_pattern")
                  and hasattr(escoin.SparseFilter, "prepare_for_values"))
if _native_trains:
    _native.set_backward(_backward_of_native_call)
if _native is not None and hasattr(_native, "set_recorder"):
    _native.set_recorder(_recorded)  # (its autograd kernel was registered by its import)
else:  # no extension, or one built before it had an autograd kernel
    _LIBRARY.impl("sparse_conv2d", _sparse_conv2d_autograd, "Autograd", with_keyset=True)


@torch.library.register_vmap("escoin::sparse_conv2d")
def _sparse_conv2d_vmap(info: object, in_dims: tuple, x: torch.Tensor, row_ptr: torch.Tensor,
                        col_idx: torch.Tensor, values: torch.Tensor, weight_shape: List[int],
                        bias: Optional[torch.Tensor], stride: List[int], padding: List[int],
                        dilation: List[int], groups: int, relu: bool,
                        residual: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, int]:
    """torch.vmap of the op. Where only x and the residual are mapped (one weight for every
    sample: a vmapped forward, per-sample gradients) it is one call, the mapped dimension folded
    into the batch; else one call per sample, stacked."""
    x_dim, row_dim, col_dim, values_dim, _, bias_dim = in_dims[:6]
    residual_dim = in_dims[11] if len(in_dims) > 11 else None
    size = int(info.batch_size)  # type: ignore[attr-defined]
    unmapped = (weight_shape, bias, stride, padding, dilation, groups, relu)  # on this path
    if x_dim is not None and row_dim is None and col_dim is None and values_dim is None \
            and bias_dim is None:
        xs = x.movedim(x_dim, 0)
        folded = None
        if residual is not None:
            rs = (residual.movedim(residual_dim, 0) if residual_dim is not None
                  else residual.expand(size, *residual.shape))
            folded = rs.reshape(-1, *rs.shape[2:])
        y = torch.ops.escoin.sparse_conv2d(xs.reshape(-1, *xs.shape[2:]), row_ptr, col_idx,
                                           values, *unmapped, folded)
        return y.reshape(size, xs.shape[1], *y.shape[1:]), 0

    def sample(t: Optional[torch.Tensor], dim: Optional[int], i: int) -> Optional[torch.Tensor]:
        return t if t is None or dim is None else t.select(dim, i)

    return torch.stack([torch.ops.escoin.sparse_conv2d(
        sample(x, x_dim, i), sample(row_ptr, row_dim, i), sample(col_idx, col_dim, i),
        sample(values, values_dim, i), weight_shape, sample(bias, bias_dim, i), stride, padding,
        dilation, groups, relu, sample(residual, residual_dim, i)) for i in range(size)]), 0


# Under autocast the op runs in float32, its inputs cast there first (as PyTorch does for the
# ops it keeps in float32): a layer's float32 weights meet a 16-bit activation from the layers
# autocast ran before it, and escoin computes 16-bit types in float32 in any case.
torch.library.register_autocast("escoin::sparse_conv2d", "cpu", torch.float32)
torch.library.register_autocast("escoin::sparse_conv2d", "cuda", torch.float32)


def _input_grad(grad: torch.Tensor, csr: CSRWeight, pattern: Optional[Transposition],
                x_shape: torch.Size, stride: Tuple[int, int], padding: Tuple[int, int],
                dilation: Tuple[int, int]) -> torch.Tensor:
    """``conv_transpose2d(grad, W)`` as a stride-1 sparse conv: zeros inserted between grad
    elements (stride), the result padded (or cropped, when padding exceeds the kernel extent) so
    that the output is exactly (H, W), and the transposed, flipped CSR weight."""
    n, m, out_h, out_w = grad.shape
    if stride != (1, 1):
        spread = grad.new_zeros(n, m, (out_h - 1) * stride[0] + 1, (out_w - 1) * stride[1] + 1)
        spread[:, :, ::stride[0], ::stride[1]] = grad
        grad = spread
    sides = []  # (low, high) per axis; high >= low always, by the output-size formula
    for size, out_size, k, s, p, d in ((x_shape[2], out_h, csr.shape[2], stride[0], padding[0],
                                        dilation[0]),
                                       (x_shape[3], out_w, csr.shape[3], stride[1], padding[1],
                                        dilation[1])):
        sides.append((d * (k - 1) - p, size - 1 - (out_size - 1) * s + p))
    common = [max(0, low) for low, _ in sides]  # the symmetric part is padded by the kernel
    residual = (sides[1][0] - common[1], sides[1][1] - common[1],
                sides[0][0] - common[0], sides[0][1] - common[0])
    if any(v != 0 for v in residual):
        grad = F.pad(grad, residual)
    flipped = _transposed(csr, pattern)
    with training_values():  # (the transposed values of one backward)
        return _call_op(grad, flipped.row_ptr, flipped.col_idx, flipped.values,
                        list(flipped.shape), None, [1, 1], common, list(dilation),
                        flipped.groups, False, None)


def _transposition_of(csr: CSRWeight) -> Optional[Transposition]:
    """The pattern of csr's transpose, cached per pattern tensors: under torch.func's gradient
    transforms those are wrapped (the values they hold unchanged). None where they are traced
    (torch.compile's) or a vmap level maps them: no stable identity."""
    row_ptr, col_idx = _unwrapped(csr.row_ptr), _unwrapped(csr.col_idx)
    if row_ptr is None or col_idx is None:
        return None
    return _transpositions.get(
        (row_ptr, col_idx), (csr.shape, csr.groups),
        lambda: transposition(csr._replace(row_ptr=row_ptr, col_idx=col_idx)),
        verify=csr.values.device.type == "cpu")


def _transposed(csr: CSRWeight, pattern: Optional[Transposition]) -> CSRWeight:
    """The transposed CSR of csr, whose transposition's pattern is `pattern`
    (_transposition_of; None: computed here)."""
    if pattern is None:
        return transpose(csr)
    on_host = csr.values.device.type == "cpu"
    # A double backward needs the transposed values attached to the autograd graph.
    plain = (csr.row_ptr, csr.col_idx, csr.values)
    if torch.is_grad_enabled() or any(type(t) is not torch.Tensor or transformed(t)
                                      for t in plain):
        return pattern.of(csr.values)
    return _transposes.get(plain, (csr.shape, csr.groups), lambda: pattern.of(csr.values),
                           verify=on_host, one_per=2)


def _unwrapped(tensor: torch.Tensor) -> Optional[torch.Tensor]:
    """`tensor` without torch.func's gradient wrappers (the same values); None where it is
    traced (a torch.compile fake or functional tensor) or a vmap level maps it."""
    while transformed(tensor):
        if torch._C._functorch.is_batchedtensor(tensor):
            return None
        tensor = torch._C._functorch.get_unwrapped(tensor)
    return tensor if type(tensor) is torch.Tensor else None


def filter_of(csr: CSRWeight) -> PreparedFilter:
    """The op's escoin filter for a CSR weight's tensors (the one its calls use)."""
    return _filter(csr.row_ptr, csr.col_idx, csr.values, list(csr.shape), csr.groups)


def _filter(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
            weight_shape: Sequence[int], groups: int) -> PreparedFilter:
    """The escoin filter for these CSR tensors, on their device; built once per contents, from
    the first filter of their pattern where there is one (new values of a training step)."""
    on_host = values.device.type == "cpu"

    def on_device(filt: escoin.SparseFilter, in_tensor_order: bool) -> PreparedFilter:
        return PreparedFilter(filt if on_host else filt.cuda(values.device.index),
                              in_tensor_order=in_tensor_order)

    def from_csr() -> escoin.SparseFilter:
        return escoin.SparseFilter.from_csr(row_ptr.cpu().numpy(), col_idx.cpu().numpy(),
                                            host_numpy(values), tuple(weight_shape),
                                            groups=groups)

    def build() -> PreparedFilter:
        fresh: List[escoin.SparseFilter] = []

        def first_of_pattern() -> Optional[escoin.SparseFilter]:
            fresh.append(from_csr())
            # What later values derive from: its pattern, and values in host memory only (the
            # filter the calls run keeps its device arrays, and goes when its values do). Not
            # where a row's columns were out of order: from_csr sorted them, and with_values
            # takes values in the filter's order.
            in_order = np.array_equal(fresh[0].col_idx, col_idx.cpu().numpy())
            return fresh[0].with_values(fresh[0].values) if in_order else None

        base = _patterns.get((row_ptr, col_idx), (tuple(weight_shape), groups),
                             first_of_pattern, verify=on_host)
        # (A pattern has a base only where its rows were in order.)
        if fresh or base is None:
            return on_device(fresh[0] if fresh else from_csr(), base is not None)
        # (A CUDA graph being captured cannot copy the values to the host: its calls, a
        # compiled "reduce-overhead" training step's, compute with them where they are.)
        if on_host or not (_training_values.get() or torch.cuda.is_current_stream_capturing()):
            return on_device(base.with_values(host_numpy(values)), True)
        return PreparedFilter(base.cuda(values.device.index), values=CudaValues(values))

    return _filters.get((row_ptr, col_idx, values), (tuple(weight_shape), groups), build,
                        verify=on_host, one_per=2)


def _empty_output(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                  values: torch.Tensor, weight_shape: Sequence[int], bias: Optional[torch.Tensor],
                  stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                  groups: int, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Checks every argument (message names it) and allocates the contiguous NCHW output."""
    # (x's device and dtype read once, and plain comparisons: this runs on every call, where
    # each tensor attribute read builds a Python object.)
    if x.dim() != 4:
        raise ValueError(f"escoin::sparse_conv2d: x must be (N, C, H, W), got shape "
                         f"{tuple(x.shape)}")
    device, dtype = x.device, x.dtype
    supported = SUPPORTED_DTYPES.get(device.type)
    if supported is None:
        raise ValueError(f"escoin::sparse_conv2d: no escoin kernels for device {device}")
    if dtype not in supported:
        raise TypeError(f"escoin::sparse_conv2d: on {device.type} escoin computes in "
                        f"{', '.join(str(d) for d in supported)}; x is {dtype}")
    if values.dtype != dtype or (bias is not None and bias.dtype != dtype):
        raise TypeError(f"escoin::sparse_conv2d: x ({dtype}), values ({values.dtype}) and bias "
                        f"({None if bias is None else bias.dtype}) must have one dtype")
    if row_ptr.dtype != torch.int64 or col_idx.dtype != torch.int32:
        raise TypeError(f"escoin::sparse_conv2d: row_ptr must be int64 and col_idx int32, got "
                        f"{row_ptr.dtype} and {col_idx.dtype}")
    if row_ptr.device != device or col_idx.device != device or values.device != device \
            or (bias is not None and bias.device != device):
        others = [t for t in (row_ptr, col_idx, values, bias) if t is not None]
        raise ValueError(f"escoin::sparse_conv2d: x is on {device} but the weight/bias are on "
                         f"{sorted({str(t.device) for t in others})}")
    if len(weight_shape) != 4 or min(weight_shape) < 1 or groups < 1 \
            or weight_shape[0] % groups:
        raise ValueError(f"escoin::sparse_conv2d: weight_shape {list(weight_shape)} with groups "
                         f"{groups} is not an (M, C/groups, kh, kw) shape with M divisible by "
                         "groups")
    m, c_group, kh, kw = weight_shape
    n, c, h, w = x.shape
    if c != c_group * groups:
        raise ValueError(f"escoin::sparse_conv2d: x has {c} channels, the weight "
                         f"expects {c_group * groups} ({c_group} per group x {groups} groups)")
    if row_ptr.shape != (m + 1,) or col_idx.dim() != 1 or values.shape != col_idx.shape:
        raise ValueError(f"escoin::sparse_conv2d: CSR shapes row_ptr {tuple(row_ptr.shape)}, "
                         f"col_idx {tuple(col_idx.shape)}, values {tuple(values.shape)} do not "
                         f"fit {m} rows")
    if bias is not None and bias.shape != (m,):
        raise ValueError(f"escoin::sparse_conv2d: bias must have shape ({m},), got "
                         f"{tuple(bias.shape)}")
    if len(stride) != 2 or len(padding) != 2 or len(dilation) != 2 or min(stride) < 1 \
            or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"escoin::sparse_conv2d: need stride >= 1, padding >= 0, dilation >= 1 "
                         f"as pairs; got {list(stride)}, {list(padding)}, {list(dilation)}")
    out_hw = _output_hw((h, w), (kh, kw), stride, padding, dilation)
    if min(out_hw) < 1:
        raise ValueError(f"escoin::sparse_conv2d: input {(h, w)} padded by "
                         f"{list(padding)} is smaller than the dilated kernel; output would be "
                         f"{out_hw}")
    shape = (n, m, out_hw[0], out_hw[1])
    if residual is not None and (residual.shape != shape or residual.dtype != dtype
                                 or residual.device != device):
        raise ValueError(f"escoin::sparse_conv2d: residual must be a {dtype} tensor on "
                         f"{device} of the output's shape {shape}, got {residual.dtype} on "
                         f"{residual.device} of shape {tuple(residual.shape)}")
    return x.new_empty(shape)


def _raw(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The tensor as the kernels read it through its pointer: dense, and with a lazy negation
    (torch's neg bit) applied to its memory."""
    return None if tensor is None else tensor.detach().resolve_neg().contiguous()


def _like_input_format(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The output in the input's memory format, as F.conv2d returns it: escoin writes NCHW, so a
    channels_last input gets a channels_last copy (never a silently mislaid layout)."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return out.contiguous(memory_format=torch.channels_last)
    return out


def _explicit_padding(x: torch.Tensor, padding: str, kernel: Sequence[int],
                      stride: List[int], dilation: List[int]) -> Tuple[torch.Tensor, List[int]]:
    """Turns 'valid'/'same' into symmetric padding; an odd 'same' total puts the extra row and
    column at the end, as PyTorch does, by padding the input once."""
    if padding == "valid":
        return x, [0, 0]
    if padding != "same":
        raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    if stride != [1, 1]:
        raise ValueError(f"padding='same' needs stride 1 (as in F.conv2d), got stride {stride}")
    total = [d * (k - 1) for k, d in zip(kernel, dilation)]
    extra = [t % 2 for t in total]
    if any(extra):
        x = F.pad(x, (0, extra[1], 0, extra[0]))
    return x, [t // 2 for t in total]


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _pair(value: Union[int, Sequence[int]], name: str, least: int) -> List[int]:
    """An int or pair argument as a pair, each at least `least` (F.conv2d's ranges: stride and
    dilation from 1, padding from 0), else an error naming it."""
    if _is_integer(value):
        items = [int(value), int(value)]
    elif isinstance(value, (tuple, list, torch.Size)) and len(value) == 2 and all(
            _is_integer(v) for v in value):
        items = [int(v) for v in value]
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if items[0] < least or items[1] < least:
        raise ValueError(f"{name} must be at least {least}, got {value!r}")
    return items
