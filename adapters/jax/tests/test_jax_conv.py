"""escoin_jax.conv2d against the float64 reference: random geometries on the CPU in every dtype,
under jit, vmap and grad; clear errors for bad input, from Python and from the handler."""
from __future__ import annotations

import escoin
import escoin_jax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax import lax

from escoin.testing import conv2d_reference, relative_error
from escoin.testing.strategies import ConvCase, conv_cases

# Relative-norm error allowed against float64: float32 sums; one rounding of a 16-bit output.
TOLERANCE = {"float32": 1e-5, "float64": 1e-12, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}


def run_case(case: ConvCase, dtype: str, residual: bool, device: jax.Device,
             jit: bool = True) -> float:
    """escoin-jax's relative error on the case in `dtype` on `device`, against float64 from the
    same (rounded) inputs."""
    x = jax.device_put(jnp.asarray(case.x, dtype), device)
    weight = np.asarray(jnp.asarray(case.weight, dtype).astype(jnp.float32))
    if dtype == "float64":
        weight = case.weight
    filt = escoin.SparseFilter.from_dense(weight, groups=case.groups)
    bias = None if case.bias is None else jnp.asarray(case.bias, dtype)
    shape = escoin.output_shape(x.shape, filt, case.stride, case.padding, case.dilation)
    res = (jnp.asarray(np.random.default_rng(case.x.size).standard_normal(shape), dtype)
           if residual else None)

    def call(x, bias, res):
        return escoin_jax.conv2d(x, filt, bias, stride=case.stride, padding=case.padding,
                                 dilation=case.dilation, relu=case.relu, residual=res)

    y = (jax.jit(call) if jit else call)(x, bias, res)
    assert y.dtype == x.dtype and y.shape == shape
    expected = conv2d_reference(
        np.asarray(x, np.float64), np.asarray(weight, np.float64),
        None if bias is None else np.asarray(bias, np.float64), case.stride, case.pads,
        case.dilation, case.groups, case.relu, None if res is None else np.asarray(res, np.float64))
    return relative_error(np.asarray(y, np.float64), expected)


CPU = jax.devices("cpu")[0]


@settings(max_examples=60, deadline=None)
@given(case=conv_cases())
def test_random_geometry_matches_reference_float32(case: ConvCase) -> None:
    assert run_case(case, "float32", residual=False, device=CPU) <= TOLERANCE["float32"]


@settings(max_examples=25, deadline=None)
@given(case=conv_cases())
def test_random_geometry_with_residual_eagerly(case: ConvCase) -> None:
    assert run_case(case, "float32", residual=True, device=CPU, jit=False) <= TOLERANCE["float32"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@settings(max_examples=20, deadline=None)
@given(case=conv_cases())
def test_16bit_types_round_once(dtype: str, case: ConvCase) -> None:
    assert run_case(case, dtype, residual=True, device=CPU) <= TOLERANCE[dtype]


@settings(max_examples=20, deadline=None)
@given(case=conv_cases())
def test_float64_with_x64_enabled(case: ConvCase) -> None:
    with jax.enable_x64(True):
        assert run_case(case, "float64", residual=True, device=CPU) <= TOLERANCE["float64"]


def sample_layer(seed: int = 0, groups: int = 1):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((12, 6 // groups, 3, 3)).astype(np.float32)
    weight *= rng.random(weight.shape) < 0.3
    x = rng.standard_normal((3, 6, 10, 9)).astype(np.float32)
    bias = rng.standard_normal(12).astype(np.float32)
    return escoin.SparseFilter.from_dense(weight, groups=groups), weight, x, bias


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gradients_match_float64(relu: bool, dtype: str) -> None:
    """d/dx, d/dbias and d/dresidual of a weighted sum, against jax's dense convolution in
    float64 on the same (rounded) inputs; 16-bit gradients are computed in float32 and rounded
    once."""
    filt, weight, x, bias = sample_layer()
    x, bias = np.asarray(jnp.asarray(x, dtype), np.float32), np.asarray(jnp.asarray(bias, dtype),
                                                                         np.float32)
    residual = np.asarray(jnp.asarray(
        np.random.default_rng(1).standard_normal((3, 12, 5, 6)), dtype), np.float32)
    probe = np.random.default_rng(2).standard_normal((3, 12, 5, 6))

    def sparse_loss(x, b, r):
        y = escoin_jax.conv2d(x, filt, b, stride=2, padding=(1, 2), relu=relu, residual=r)
        return (y.astype(jnp.float32) * probe.astype(np.float32)).sum()

    grads = jax.jit(jax.grad(sparse_loss, argnums=(0, 1, 2)))(
        *(jnp.asarray(a, dtype) for a in (x, bias, residual)))
    with jax.enable_x64(True):
        def dense_loss(x, b, r):
            y = lax.conv_general_dilated(x, jnp.asarray(weight, jnp.float64), (2, 2),
                                         ((1, 1), (2, 2)),
                                         dimension_numbers=("NCHW", "OIHW", "NCHW"))
            y = y + b[None, :, None, None] + r
            return ((jnp.maximum(y, 0) if relu else y) * probe).sum()

        expected = jax.grad(dense_loss, argnums=(0, 1, 2))(
            *(jnp.asarray(a, jnp.float64) for a in (x, bias, residual)))
        for got, want in zip(grads, expected):
            assert got.dtype == dtype
            assert relative_error(np.asarray(got, np.float64), np.asarray(want)) <= (
                1e-5 if dtype == "float32" else TOLERANCE[dtype])


def test_forward_mode_matches_float64() -> None:
    """jax.jvp in x, bias and residual at once, against the dense convolution's in float64."""
    filt, weight, x, bias = sample_layer()
    rng = np.random.default_rng(3)
    residual = rng.standard_normal((3, 12, 5, 6)).astype(np.float32)
    tangents = tuple(rng.standard_normal(a.shape).astype(np.float32) for a in (x, bias, residual))

    def sparse(x, b, r):
        return escoin_jax.conv2d(x, filt, b, stride=2, padding=(1, 2), relu=True, residual=r)

    y, dy = jax.jit(lambda p, t: jax.jvp(sparse, p, t))((x, bias, residual), tangents)
    with jax.enable_x64(True):
        def dense(x, b, r):
            z = lax.conv_general_dilated(x, jnp.asarray(weight, jnp.float64), (2, 2),
                                         ((1, 1), (2, 2)),
                                         dimension_numbers=("NCHW", "OIHW", "NCHW"))
            return jnp.maximum(z + b[None, :, None, None] + r, 0)

        want_y, want_dy = jax.jvp(dense, tuple(np.float64(a) for a in (x, bias, residual)),
                                  tuple(np.float64(t) for t in tangents))
    assert relative_error(np.asarray(y, np.float64), np.asarray(want_y)) <= 1e-5
    assert relative_error(np.asarray(dy, np.float64), np.asarray(want_dy)) <= 1e-5


def test_forward_and_reverse_jacobians_agree_and_second_order_runs() -> None:
    """jacfwd and jacrev of a small layer give one Jacobian; a Hessian-vector product (forward
    over reverse) of a squared loss matches the dense convolution's."""
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    weight *= rng.random(weight.shape) < 0.5
    filt = escoin.SparseFilter.from_dense(weight)
    x = rng.standard_normal((1, 2, 4, 4)).astype(np.float32)

    def f(x):
        return escoin_jax.conv2d(x, filt, padding=1)

    forward, reverse = jax.jacfwd(f)(x), jax.jacrev(f)(x)
    assert forward.shape == (1, 3, 4, 4, 1, 2, 4, 4)
    assert relative_error(np.asarray(forward, np.float64), np.asarray(reverse, np.float64)) <= 1e-6

    def loss(x):
        return (f(x) ** 2).sum()

    def dense_loss(x):
        y = lax.conv_general_dilated(x, weight, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                     precision=lax.Precision.HIGHEST)
        return (y ** 2).sum()

    v = rng.standard_normal(x.shape).astype(np.float32)
    hvp = jax.jvp(jax.grad(loss), (x,), (v,))[1]
    want = jax.jvp(jax.grad(dense_loss), (x,), (v,))[1]
    assert relative_error(np.asarray(hvp, np.float64), np.asarray(want, np.float64)) <= 1e-5


def test_vmap_over_x_and_residual_is_one_batch() -> None:
    filt, weight, x, bias = sample_layer(groups=2)
    stacked = np.stack([x, -2 * x])  # (2, 3, C, H, W)
    residual = np.random.default_rng(3).standard_normal((2, 3, 12, 10, 9)).astype(np.float32)
    y = jax.jit(jax.vmap(lambda x, r: escoin_jax.conv2d(x, filt, bias, padding="same",
                                                         residual=r)))(stacked, residual)
    expected = conv2d_reference(stacked.reshape(6, 6, 10, 9), weight, bias, (1, 1), (1, 1, 1, 1),
                                (1, 1), 2, residual=residual.reshape(6, 12, 10, 9))
    assert y.shape == (2, 3, 12, 10, 9)
    assert relative_error(np.asarray(y).reshape(expected.shape), expected) <= 1e-5


@pytest.mark.parametrize("in_axes", [(0, None, None), (0, 0, None), (None, 0, 0), (0, None, 0),
                                     (None, None, 0)])
def test_vmap_maps_any_of_x_bias_and_residual(in_axes: tuple) -> None:
    """Each operand mapped or not: the handler runs one call per mapped block where they are not
    mapped alike, and the result is the loop of the unmapped calls."""
    filt, weight, x, bias = sample_layer()
    rng = np.random.default_rng(5)
    xs = np.stack([x, rng.standard_normal(x.shape).astype(np.float32)])
    biases = np.stack([bias, -bias])
    residuals = rng.standard_normal((2, 3, 12, 8, 7)).astype(np.float32)
    args = [xs if in_axes[0] == 0 else x, biases if in_axes[1] == 0 else bias,
            residuals if in_axes[2] == 0 else residuals[0]]
    y = jax.jit(jax.vmap(lambda x, b, r: escoin_jax.conv2d(x, filt, b, relu=True, residual=r),
                         in_axes=in_axes))(*args)
    for k in range(2):
        pick = [a[k] if axis == 0 else a for a, axis in zip(args, in_axes)]
        expected = conv2d_reference(pick[0], weight, pick[1], (1, 1), (0, 0, 0, 0), (1, 1), 1,
                                    relu=True, residual=pick[2])
        assert relative_error(np.asarray(y[k]), expected) <= 1e-5


def test_nested_vmap_with_the_bias_mapped_on_the_outer_axis() -> None:
    filt, weight, x, bias = sample_layer()
    xs = np.stack([np.stack([x, 2 * x, -x]), np.stack([-x, x, 3 * x])])  # (2, 3, N, C, H, W)
    biases = np.stack([bias, 2 * bias])
    inner = jax.vmap(lambda x, b: escoin_jax.conv2d(x, filt, b, padding=1), in_axes=(0, None))
    y = jax.jit(jax.vmap(inner, in_axes=(0, 0)))(xs, biases)
    assert y.shape == (2, 3, 3, 12, 10, 9)
    for i in range(2):
        for j in range(3):
            expected = conv2d_reference(xs[i, j], weight, biases[i], (1, 1), (1, 1, 1, 1),
                                        (1, 1), 1)
            assert relative_error(np.asarray(y[i, j]), expected) <= 1e-5


def test_one_image_and_an_empty_batch() -> None:
    filt, weight, x, bias = sample_layer()
    y = escoin_jax.conv2d(x[1], filt, bias, dilation=2)
    expected = conv2d_reference(x[1:2], weight, bias, (1, 1), (0, 0, 0, 0), (2, 2), 1)[0]
    assert y.shape == expected.shape and relative_error(np.asarray(y), expected) <= 1e-5
    assert escoin_jax.conv2d(x[:0], filt, bias).shape == (0, 12, 8, 7)


@pytest.mark.parametrize("call, message", [
    (lambda f, x, b: escoin_jax.conv2d(x[:, :4], f, b), "x has 4 channels"),
    (lambda f, x, b: escoin_jax.conv2d(x[0, 0], f, b), "x must have 3 or 4 dimensions"),
    (lambda f, x, b: escoin_jax.conv2d(x.astype(np.int32), f, b), "x must be float32"),
    (lambda f, x, b: escoin_jax.conv2d(x, f, b[:5]), r"bias must have shape \(12,\)"),
    (lambda f, x, b: escoin_jax.conv2d(x, f, b, residual=x), "residual must have the output's"),
    (lambda f, x, b: escoin_jax.conv2d(x, f.to_dense(), b), "filt must be an escoin.SparseFilter"),
    (lambda f, x, b: escoin_jax.conv2d(x, f, b, stride=0), "stride must be >= 1"),
    (lambda f, x, b: escoin_jax.conv2d(x[0, 0], f, b, data_format="NHWC"), r"\(N, H, W, C\)"),
    # A residual's shape is named in the caller's layout: channels last, or one image.
    (lambda f, x, b: escoin_jax.conv2d(jnp.transpose(x, (0, 2, 3, 1)), f, b, residual=x[0],
                                       data_format="NHWC"),
     r"residual must have the output's shape \(3, \d+, \d+, 12\), got \(6, 10, 9\)"),
    (lambda f, x, b: escoin_jax.conv2d(x[0], f, b, residual=x),
     r"residual must have the output's shape \(12, \d+, \d+\), got \(3, 6, 10, 9\)"),
    (lambda f, x, b: jax.jit(lambda x_, f_: escoin_jax.conv2d(x_, f_))(x, f),
     "under jax.jit close over it or mark it static"),
    (lambda f, x, b: escoin_jax.conv2d(x, f, b * 1j), "bias must be real, got complex64"),
    (lambda f, x, b: escoin_jax.conv2d(x, f, b, relu=np.array([True, False])),
     "relu must be a bool, got ndarray"),
    (lambda f, x, b: jax.jit(lambda x_, r: escoin_jax.conv2d(x_, f, relu=r))(x, True),
     "relu must be a Python bool, got a traced value"),
    # An empty plane is named in the shape the caller passed.
    (lambda f, x, b: escoin_jax.conv2d(x[:, :, :0], f, b),
     r"at least one channel, row and column, got shape \(3, 6, 0, 9\)"),
    (lambda f, x, b: escoin_jax.conv2d(x[0, :, :, :0], f, b),
     r"at least one channel, row and column, got shape \(6, 10, 0\)"),
    (lambda f, x, b: escoin_jax.conv2d(jnp.transpose(x, (0, 2, 3, 1))[:, :, :0], f, b,
                                       data_format="NHWC"),
     r"at least one channel, row and column, got shape \(3, 10, 0, 6\)"),
])
def test_bad_arguments_are_named(call, message: str) -> None:
    filt, _, x, bias = sample_layer()
    with pytest.raises(escoin.EscoinError, match=message):
        call(filt, jnp.asarray(x), jnp.asarray(bias))


def check_eager_calls_copy_the_filter_once(device: jax.Device) -> None:
    """An eager call on arrays already on `device` copies nothing to it after the filter's
    first call there (the filter's arrays are kept on the device), and computes the same."""
    filt, _, x, bias = sample_layer()
    x, bias = jax.device_put(x, device), jax.device_put(bias, device)
    first = escoin_jax.conv2d(x, filt, bias, padding=1)
    with jax.transfer_guard("disallow"):
        again = escoin_jax.conv2d(x, filt, bias, padding=1)
        no_bias = escoin_jax.conv2d(x, filt, padding=1)  # (an empty operand in its place)
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert relative_error(np.asarray(no_bias) + np.asarray(bias)[:, None, None],
                          np.asarray(first, np.float64)) <= 1e-6


def test_eager_calls_copy_the_filter_once() -> None:
    check_eager_calls_copy_the_filter_once(CPU)


# The CPU handler checks the CSR it is given (the CUDA one trusts its device arrays, as the
# core's CUDA entry does: plans come from a SparseFilter's checked arrays), so the two direct
# calls below run on the CPU whatever the default device.
def on_the_cpu(test):
    def run() -> None:
        with jax.default_device(jax.devices("cpu")[0]):
            test()
    run.__name__, run.__doc__ = test.__name__, test.__doc__
    return run


@on_the_cpu
def test_the_handler_refuses_offsets_outside_the_input() -> None:
    """A direct FFI call with an offset past the stretched image: an error, not a wild read."""
    from escoin_jax._ffi import TARGET, ensure_registered
    from escoin_jax.conv import _Options, _ffi_call, _plan

    filt, _, x, bias = sample_layer()
    ensure_registered()
    from escoin.geometry import descriptor
    desc = descriptor((1, 6, 10, 9), filt.shape, 1, 1, 0, 1)
    plan = _plan(filt, desc + (0,), np.dtype(np.float32))
    bad = plan.offsets.copy()
    bad[-1] = 1 << 30
    broken = type(plan)(**{**plan.__dict__, "offsets": bad})
    assert TARGET == "escoin_conv2d"
    with pytest.raises(Exception, match="escoin: .*offset"):
        _ffi_call(broken, _Options(False, True, False), jnp.asarray(x), jnp.asarray(bias),
                     None).block_until_ready()


@on_the_cpu
def test_the_handler_refuses_a_row_ptr_counting_more_than_the_offsets() -> None:
    """row_ptr[M] is the core's count of offsets and values: one past theirs is an error, not a
    read past them (a large one crashed the process)."""
    from escoin.geometry import descriptor
    from escoin_jax._ffi import ensure_registered
    from escoin_jax.conv import _Options, _ffi_call, _plan

    filt, _, x, _ = sample_layer()
    ensure_registered()
    plan = _plan(filt, descriptor((1, 6, 10, 9), filt.shape, 1, 1, 0, 1) + (0,),
                 np.dtype(np.float32))
    row_ptr = np.asarray(filt.row_ptr).copy()
    row_ptr[-1] = 1 << 40
    broken = type(plan)(**{**plan.__dict__, "row_ptr": row_ptr.view(np.uint8)})
    with pytest.raises(Exception, match=r"row_ptr\[out_channels\]"):
        _ffi_call(broken, _Options(False, False, False), jnp.asarray(x), None,
                     None).block_until_ready()


@pytest.mark.cuda
@settings(max_examples=40, deadline=None)
@given(case=conv_cases(max_batch=9))
def test_random_geometry_on_the_gpu(case: ConvCase) -> None:
    gpu = jax.devices("gpu")[0]
    assert run_case(case, "float32", residual=case.relu, device=gpu) <= TOLERANCE["float32"]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@settings(max_examples=15, deadline=None)
@given(case=conv_cases(max_batch=9))
def test_16bit_types_on_the_gpu_round_once(dtype: str, case: ConvCase) -> None:
    gpu = jax.devices("gpu")[0]
    assert run_case(case, dtype, residual=True, device=gpu) <= TOLERANCE[dtype]


@pytest.mark.cuda
def test_eager_calls_on_the_gpu_copy_the_filter_once() -> None:
    check_eager_calls_copy_the_filter_once(jax.devices("gpu")[0])


@pytest.mark.cuda
def test_gpu_gradients_and_float64_refusal() -> None:
    gpu = jax.devices("gpu")[0]
    filt, weight, x, bias = sample_layer()
    xg = jax.device_put(x, gpu)
    # With the ReLU the gradient needs the forward's output, so the kernel runs (without it XLA
    # drops the call: the sum's gradient does not depend on its value).
    grad = jax.jit(jax.grad(
        lambda x: escoin_jax.conv2d(x, filt, bias, padding=1, relu=True).sum()))(xg)

    def dense(x):
        y = lax.conv_general_dilated(x, weight, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                     precision=lax.Precision.HIGHEST)
        return jnp.maximum(y + bias[None, :, None, None], 0).sum()

    assert relative_error(np.asarray(grad), np.asarray(jax.grad(dense)(x), np.float64)) <= 1e-5
    with jax.enable_x64(True), pytest.raises(Exception, match="float64 runs on the CPU"):
        escoin_jax.conv2d(jax.device_put(x.astype(np.float64), gpu), filt).block_until_ready()


def test_the_lenet5_example_agrees_with_float64() -> None:
    """examples/jax_lenet5_check.py: the whole network, logits and input gradient."""
    import subprocess
    import sys
    from pathlib import Path

    above = Path(__file__).resolve().parents  # [3]: the repository's root, in the repository
    if len(above) <= 3 or not (above[3] / "adapters" / "jax").is_dir():
        pytest.skip("run outside the repository (from this package's sdist): the example is the "
                    "repository's")
    script = above[3] / "examples" / "jax_lenet5_check.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("SUCCESS") == 2 and "FAILURE" not in done.stdout


@pytest.mark.parametrize("batched", [True, False])
def test_channels_last_matches_the_nchw_reference(batched: bool) -> None:
    """data_format='NHWC': x and residual channels-last in, the output channels-last out, and
    gradients through the transposes."""
    filt, weight, x, bias = sample_layer()
    residual = np.random.default_rng(4).standard_normal((3, 12, 10, 9)).astype(np.float32)
    expected = conv2d_reference(x, weight, bias, (1, 1), (1, 1, 1, 1), (1, 1), 1, relu=True,
                                residual=residual).transpose(0, 2, 3, 1)
    x_last, residual_last = x.transpose(0, 2, 3, 1), residual.transpose(0, 2, 3, 1)
    if not batched:
        x_last, residual_last, expected = x_last[0], residual_last[0], expected[0]

    def call(x, r):
        return escoin_jax.conv2d(x, filt, bias, padding=1, relu=True, residual=r,
                                 data_format="NHWC")

    y = jax.jit(call)(x_last, residual_last)
    assert y.shape == expected.shape
    assert relative_error(np.asarray(y), expected) <= 1e-5
    grad = jax.grad(lambda x: call(x, residual_last).sum())(x_last)

    def dense_loss(x):  # XLA's channels-last convolution, batched
        images = x if batched else x[None]
        y = lax.conv_general_dilated(images, weight.transpose(2, 3, 1, 0), (1, 1),
                                     ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=lax.Precision.HIGHEST)
        shortcut = residual_last if batched else residual_last[None]
        return jax.nn.relu(y + bias + shortcut).sum()

    dense = jax.grad(dense_loss)(x_last)
    assert relative_error(np.asarray(grad), np.asarray(dense, np.float64)) <= 1e-5
    with pytest.raises(escoin.EscoinError, match="data_format must be"):
        escoin_jax.conv2d(x, filt, data_format="CHWN")
