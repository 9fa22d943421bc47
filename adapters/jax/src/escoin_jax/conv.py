"""conv2d on JAX arrays: escoin's forward as an XLA FFI call, derivatives by a custom JVP."""
from __future__ import annotations

import dataclasses
import functools
import threading
import weakref
from typing import Optional, Tuple

import escoin
import jax
import jax.numpy as jnp
import numpy as np
from escoin.geometry import IntPair, Padding, descriptor
from jax import lax
from jax.custom_derivatives import SymbolicZero

from escoin_jax._ffi import TARGET, ensure_registered

# The dtypes escoin computes in: float32 and float64 in their own type, 16-bit ones widened to
# float32 by its kernels (CUDA refuses float64).
_DTYPES = {np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16),
           np.dtype(jnp.bfloat16)}


@dataclasses.dataclass(frozen=True, eq=False)
class _Plan:
    """One filter's arrays for one input geometry (any batch), as the FFI call takes them; they
    become constants of the JAX program. Compared by identity: plans are cached per filter and
    geometry, so equal calls share one. It holds the filter's arrays, not the filter, so that
    the cache (weak on the filter) lets both go."""
    desc: tuple  # the C descriptor with batch 1
    out_hw: Tuple[int, int]
    row_ptr: np.ndarray  # int64 as bytes (JAX runs without 64-bit integers by default)
    col_idx: np.ndarray  # for the dense weight of the JVP's tangent
    offsets: np.ndarray
    values: np.ndarray  # in the compute type
    program: np.ndarray  # the staged CUDA kernel's, as bytes; empty where it would not pay
    # Copies of the arrays above on each device an eager call ran on, with an empty array per
    # dtype (the FFI call's absent bias or residual), made at the first such call.
    on_device: dict = dataclasses.field(default_factory=dict, repr=False)

    def operands(self, x: jax.Array) -> tuple:
        """The filter's arrays and an empty array of x's dtype, as the FFI call takes them:
        NumPy arrays where x is traced (they become constants of the program, copied to the
        device once), else copies already on x's device (from NumPy, an eager call would copy
        every array to the device on each call)."""
        arrays = (self.row_ptr, self.offsets, self.values, self.program)
        devices = None if isinstance(x, jax.core.Tracer) else x.devices()
        if devices is None or len(devices) != 1:
            return arrays + (np.empty(0, x.dtype),)
        key = (next(iter(devices)), np.dtype(x.dtype))
        found = self.on_device.get(key)
        if found is None:
            found = self.on_device.setdefault(
                key, tuple(jax.device_put(a, key[0]) for a in arrays + (np.empty(0, x.dtype),)))
        return found

    def attributes(self, relu: bool) -> dict:
        # The descriptor's fields after x's shape, in its order (escoin_conv_desc_t).
        names = ("out_channels", "kernel_h", "kernel_w", "stride_h", "stride_w", "pad_top",
                 "pad_bottom", "pad_left", "pad_right", "dilation_h", "dilation_w", "groups")
        attrs = {name: np.int64(value) for name, value in zip(names, self.desc[4:16])}
        attrs["relu"] = bool(relu)
        return attrs

    def dense_conv(self, x: jax.Array) -> jax.Array:
        """The same convolution, dense, through XLA: the tangent of the JVP (in x's dtype:
        float32 or float64)."""
        d = self.desc
        row_ptr = self.row_ptr.view(np.int64)
        rows = np.repeat(np.arange(d[4]), np.diff(row_ptr))
        dense = np.zeros((d[4], d[1] // d[15] * d[5] * d[6]), self.values.dtype)
        dense[rows, self.col_idx] = self.values
        weight = jnp.asarray(dense.reshape(d[4], d[1] // d[15], d[5], d[6]), x.dtype)
        return lax.conv_general_dilated(
            x, weight, window_strides=(d[7], d[8]), padding=((d[9], d[10]), (d[11], d[12])),
            rhs_dilation=(d[13], d[14]), dimension_numbers=("NCHW", "OIHW", "NCHW"),
            feature_group_count=d[15], precision=lax.Precision.HIGHEST)


# Plans per filter (weakly: a filter's plans go with it) and per (descriptor, padding, compute
# type). Filters are immutable, so a plan never goes stale.
_plans: "weakref.WeakKeyDictionary[escoin.SparseFilter, dict]" = weakref.WeakKeyDictionary()
_plans_lock = threading.Lock()


def _gpu_present() -> bool:
    """Whether this JAX has a GPU: only then is the CUDA kernel's program worth building (it
    becomes a constant of every program that calls the filter, ~8 bytes a nonzero)."""
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def _plan(filt: escoin.SparseFilter, desc: tuple, compute: np.dtype) -> _Plan:
    """desc: the C descriptor with batch 1, then the padding as the caller gave it."""
    with _plans_lock:
        found = _plans.setdefault(filt, {}).get((desc, compute))
    if found is not None:
        return found
    shape, padding = desc[:4], desc[16]
    geometry = dict(stride=(desc[7], desc[8]), padding=padding, dilation=(desc[13], desc[14]))
    _, _, oh, ow = escoin.output_shape(shape, filt, **geometry)
    program = filt.tile_program(shape, **geometry) if _gpu_present() else None
    plan = _Plan(
        desc=desc[:16], out_hw=(oh, ow),
        row_ptr=np.ascontiguousarray(filt.row_ptr, np.int64).view(np.uint8),
        col_idx=filt.col_idx,
        offsets=np.ascontiguousarray(escoin.stretch_offsets(filt, shape, **geometry)),
        values=np.ascontiguousarray(filt.values, compute),
        program=np.empty(0, np.uint8) if program is None else program)
    with _plans_lock:
        return _plans[filt].setdefault((desc, compute), plan)


def conv2d(x: jax.Array, filt: escoin.SparseFilter, bias: Optional[jax.Array] = None,
           stride: IntPair = 1, padding: Padding = 0, dilation: IntPair = 1,
           relu: bool = False, residual: Optional[jax.Array] = None,
           data_format: str = "NCHW") -> jax.Array:
    """``relu(conv2d(x, filt.to_dense(), bias) + residual)`` with torch.nn.functional.conv2d's
    semantics (NCHW, stride, padding including 'same'/'valid', dilation, the filter's groups),
    computed by escoin from the filter's nonzeros.

    data_format="NHWC" (Flax's layout) takes x and residual and returns the output channels-last;
    escoin's kernels are NCHW, so XLA transposes x in and the output out (two copies a call).
    The filter is always (M, C/groups, kh, kw): from a Flax kernel (kh, kw, C/groups, M) build it
    with ``SparseFilter.from_dense(np.transpose(kernel, (3, 2, 0, 1)))``.

    x is (N, C, H, W) or one image (C, H, W): float32, float16 or bfloat16, and float64 too on
    the CPU; 16-bit types are computed in float32 and each output rounded once. bias (M values)
    and residual (the output's shape) take x's dtype. Works under ``jax.jit``, ``jax.vmap`` (of
    any of x, bias and residual: where x and residual are mapped alike and bias is not, every
    mapped image joins one call's batch), ``jax.grad``, ``jax.jvp`` and their compositions with
    respect to x, bias and residual (the derivative with respect to x is computed densely by
    XLA, in float32 for 16-bit types); the filter itself is a constant.
    """
    if not isinstance(filt, escoin.SparseFilter):
        raise escoin.EscoinError(
            f"filt must be an escoin.SparseFilter, got {type(filt).__name__} (the filter is a "
            "constant of the program: under jax.jit close over it or mark it static)")
    if isinstance(relu, jax.core.Tracer):
        raise escoin.EscoinError("relu must be a Python bool, got a traced value: under jax.jit "
                                 "close over it or mark it static")
    relu = escoin._core.as_flag(relu, "relu")
    if data_format == "NHWC":
        x = jnp.asarray(x)
        if x.ndim not in (3, 4):
            raise escoin.EscoinError(f"x must have 3 or 4 dimensions (N, H, W, C), got {x.shape}")
        _check_extent(x, x.shape[-1], x.shape[-3:-1])
        lead = tuple(range(x.ndim - 3))  # the batch axis, if any
        to_nchw, to_nhwc = lead + (x.ndim - 1, x.ndim - 3, x.ndim - 2), lead + (
            x.ndim - 2, x.ndim - 1, x.ndim - 3)
        x = jnp.transpose(x, to_nchw)
        _check_residual(residual, x, filt, stride, padding, dilation, to_nhwc)
        y = conv2d(x, filt, bias, stride, padding, dilation, relu,
                   None if residual is None else jnp.transpose(jnp.asarray(residual), to_nchw))
        return jnp.transpose(y, to_nhwc)
    if data_format != "NCHW":
        raise escoin.EscoinError(f"data_format must be 'NCHW' or 'NHWC', got {data_format!r}")
    x = jnp.asarray(x)
    if np.dtype(x.dtype) not in _DTYPES:
        raise escoin.EscoinError(f"x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if x.ndim in (3, 4):
        _check_extent(x, x.shape[-3], x.shape[-2:])
    if x.ndim == 3:
        _check_residual(residual, x, filt, stride, padding, dilation, (0, 1, 2))
        return conv2d(x[None], filt, bias, stride, padding, dilation, relu,
                      None if residual is None else jnp.asarray(residual)[None])[0]
    if x.ndim != 4:
        raise escoin.EscoinError(f"x must have 3 or 4 dimensions (N, C, H, W), got {x.shape}")
    desc = descriptor((1,) + tuple(x.shape[1:]), filt.shape, filt.groups, stride, padding,
                      dilation)
    # The padding travels in the key as given (an int, a pair or a string): hashable forms only.
    key_padding = tuple(padding) if isinstance(padding, list) else padding
    compute = np.dtype(np.float64 if x.dtype == jnp.float64 else np.float32)
    plan = _plan(filt, desc + (key_padding,), compute)
    out_shape = (x.shape[0], desc[4]) + plan.out_hw
    for name, value in (("bias", bias), ("residual", residual)):
        if value is not None and jnp.iscomplexobj(value):  # (a cast would drop its imaginary part)
            raise escoin.EscoinError(f"{name} must be real, got {jnp.result_type(value)}")
    if bias is not None:
        bias = jnp.asarray(bias, x.dtype)
        if bias.shape != (desc[4],):
            raise escoin.EscoinError(f"bias must have shape ({desc[4]},), got {bias.shape}")
    if residual is not None:
        residual = jnp.asarray(residual, x.dtype)
        if residual.shape != out_shape:
            raise escoin.EscoinError(f"residual must have the output's shape {out_shape}, got "
                                     f"{residual.shape}")
    if x.shape[0] == 0:
        empty = jnp.zeros(out_shape, x.dtype)
        return empty if residual is None else empty + residual
    ensure_registered()
    return _sparse_conv(plan, _Options(relu, bias is not None, residual is not None), x,
                        bias, residual)


def _check_extent(x: jax.Array, channels: int, plane: Tuple[int, ...]) -> None:
    """At least one channel, row and column, named in the shape the caller passed (the checks
    after it see x made NCHW and batched)."""
    if min(channels, *plane) < 1:
        raise escoin.EscoinError(f"x must have at least one channel, row and column, got shape "
                                 f"{tuple(x.shape)}")


def _check_residual(residual: Optional[jax.Array], x: jax.Array, filt: escoin.SparseFilter,
                    stride: IntPair, padding: Padding, dilation: IntPair,
                    order: Tuple[int, ...]) -> None:
    """The residual's shape against the output's, both as the caller lays them out: x is
    NCHW or one CHW image, and `order` takes the output's axes to the caller's layout."""
    if residual is None:
        return
    out = escoin.output_shape((1,) * (4 - x.ndim) + tuple(x.shape), filt, stride, padding,
                              dilation)[4 - x.ndim:]
    expected = tuple(out[axis] for axis in order)
    if tuple(jnp.shape(residual)) != expected:
        raise escoin.EscoinError(f"residual must have the output's shape {expected}, got "
                                 f"{tuple(jnp.shape(residual))}")


@dataclasses.dataclass(frozen=True)
class _Options:
    """What a call does beyond the convolution: static to the JVP, whose tangent has no term for
    an absent bias or residual."""
    relu: bool
    has_bias: bool
    has_residual: bool


def _ffi_call(plan: _Plan, options: _Options, x: jax.Array, bias: Optional[jax.Array],
              residual: Optional[jax.Array]) -> jax.Array:
    row_ptr, offsets, values, program, empty = plan.operands(x)
    out = jax.ShapeDtypeStruct((x.shape[0], plan.desc[4]) + plan.out_hw, x.dtype)
    # expand_dims: under vmap every operand gets the mapped axes in front, of size 1 where it is
    # not mapped; the handler reads x, bias and residual per block of them, and the filter's
    # arrays (never mapped) by their element counts.
    call = jax.ffi.ffi_call(TARGET, out, vmap_method="expand_dims")
    return call(x, row_ptr, offsets, values, program, empty if bias is None else bias,
                empty if residual is None else residual, **plan.attributes(options.relu))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _sparse_conv(plan: _Plan, options: _Options, x: jax.Array, bias: Optional[jax.Array],
                 residual: Optional[jax.Array]) -> jax.Array:
    return _ffi_call(plan, options, x, bias, residual)


def _sparse_conv_jvp(plan: _Plan, options: _Options, primals: tuple, tangents: tuple) -> tuple:
    """The output from escoin; its tangent, linear in the inputs' tangents, through XLA's dense
    convolution, which JAX transposes for reverse mode (so jvp, grad and their compositions all
    work). 16-bit tangents are computed in float32 and rounded once, as the forward is; a
    tangent JAX knows to be zero costs nothing."""
    x, bias, residual = primals
    dx, dbias, dresidual = tangents
    # The output through _sparse_conv itself, so that a derivative of this rule (a Hessian,
    # forward over reverse) meets this rule again rather than the bare FFI call.
    y = _sparse_conv(plan, options, x, bias, residual)
    compute = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    terms = []
    if not isinstance(dx, SymbolicZero):
        terms.append(plan.dense_conv(dx.astype(compute)))
    if options.has_bias and not isinstance(dbias, SymbolicZero):
        terms.append(jnp.broadcast_to(dbias.astype(compute)[None, :, None, None], y.shape))
    if options.has_residual and not isinstance(dresidual, SymbolicZero):
        terms.append(dresidual.astype(compute))
    if not terms:
        return y, jnp.zeros_like(y)
    dy = functools.reduce(jnp.add, terms)
    if options.relu:
        dy = jnp.where(y > 0, dy, jnp.zeros_like(dy))
    return y, dy.astype(x.dtype)


_sparse_conv.defjvp(_sparse_conv_jvp, symbolic_zeros=True)
