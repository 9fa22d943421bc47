"""LeNet5 written in plain JAX, its convolutions pruned 60% by magnitude and run by escoin
(``escoin_jax.conv2d``, jitted), checked against the dense network in float64: the outputs, and
the gradient of a loss with respect to the input (through escoin's VJP).

    python examples/jax_lenet5_check.py          # prints SUCCESS, or exits with status 1
"""
from __future__ import annotations

import sys
from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import escoin
import escoin_jax
from verdict import verdict

TOLERANCE = 1e-5  # a few float32 ulps per layer, through five layers
SPARSITY = 0.6


def init_params(seed: int) -> Dict[str, np.ndarray]:
    """LeNet5's weights (NCHW / OIHW), He-scaled normal draws."""
    rng = np.random.default_rng(seed)
    shapes = {"conv1": (6, 1, 5, 5), "conv2": (16, 6, 5, 5), "fc1": (120, 400), "fc2": (84, 120),
              "fc3": (10, 84)}
    params = {}
    for name, shape in shapes.items():
        fan_in = int(np.prod(shape[1:]))
        params[name] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        params[name + ".bias"] = (0.1 * rng.standard_normal(shape[0])).astype(np.float32)
    return params


def prune(weight: np.ndarray, sparsity: float) -> np.ndarray:
    """The smallest-magnitude `sparsity` of the weights set to zero."""
    cut = np.quantile(np.abs(weight), sparsity)
    return np.where(np.abs(weight) > cut, weight, 0).astype(weight.dtype)


def lenet5(params: Dict[str, np.ndarray], conv: Callable) -> Callable:
    """The network as a function of its input, with `conv(x, name)` for the convolutions."""
    def pool(x):
        return lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")

    def forward(x):
        x = pool(conv(x, "conv1"))          # (N, 6, 14, 14)
        x = pool(conv(x, "conv2"))          # (N, 16, 5, 5)
        x = x.reshape(x.shape[0], -1)
        for name in ("fc1", "fc2"):
            x = jax.nn.relu(dense(x, name))
        return dense(x, "fc3")

    def dense(x, name):  # strict float32 on a GPU too (XLA's default there is TF32-like)
        return (jnp.matmul(x, params[name].astype(x.dtype).T, precision=lax.Precision.HIGHEST)
                + params[name + ".bias"])
    return forward


def main() -> int:
    params = init_params(seed=0)
    for name in ("conv1", "conv2"):
        params[name] = prune(params[name], SPARSITY)
    filters = {name: escoin.SparseFilter.from_dense(params[name]) for name in ("conv1", "conv2")}
    for name, filt in filters.items():
        print(f"{name}: {'x'.join(map(str, filt.shape))}, density {filt.density:.2f}")

    def sparse_conv(x, name):  # escoin, bias and ReLU fused into the kernel's epilogue
        return escoin_jax.conv2d(x, filters[name], params[name + ".bias"], padding=2 if
                                 name == "conv1" else 0, relu=True)

    def dense_conv(x, name):   # XLA, in x's dtype
        pad = 2 if name == "conv1" else 0
        y = lax.conv_general_dilated(x, params[name].astype(x.dtype), (1, 1),
                                     ((pad, pad), (pad, pad)),
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                     precision=lax.Precision.HIGHEST)
        return jax.nn.relu(y + params[name + ".bias"].astype(x.dtype)[None, :, None, None])

    x = np.random.default_rng(1).standard_normal((8, 1, 28, 28)).astype(np.float32)
    sparse = jax.jit(lenet5(params, sparse_conv))
    sparse_grad = jax.jit(jax.grad(lambda x: sparse(x).sum()))
    y, grad = sparse(x), sparse_grad(x)
    with jax.enable_x64(True):
        dense = lenet5(params, dense_conv)
        x64 = jnp.asarray(x, jnp.float64)
        y64, grad64 = dense(x64), jax.grad(lambda x: dense(x).sum())(x64)

        def error(a, b):
            return float(jnp.linalg.norm(jnp.asarray(a, jnp.float64) - b) / jnp.linalg.norm(b))

        ok = verdict("LeNet5 logits", error(y, y64), TOLERANCE)
        ok &= verdict("LeNet5 input gradient", error(grad, grad64), TOLERANCE)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
