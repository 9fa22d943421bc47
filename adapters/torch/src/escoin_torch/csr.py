"""The compressed weight as torch tensors: building it, indexing it, transposing it.

The CSR layout is escoin's: one row per output channel, columns ``(c_local, kh, kw)`` of that
channel's group flattened row-major, ``row_ptr`` int64 and ``col_idx`` int32. Keeping it as tensors
(rather than an ``escoin.SparseFilter``) is what lets it be a custom-op argument, live on the
weight's device and take part in autograd.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import escoin
import numpy as np
import torch

WeightShape = Tuple[int, int, int, int]


class CSRWeight(NamedTuple):
    """A convolution weight ``(M, C/groups, kh, kw)`` in escoin's CSR layout."""

    row_ptr: torch.Tensor  # int64, M + 1
    col_idx: torch.Tensor  # int32, nnz
    values: torch.Tensor   # the weight's dtype, nnz
    shape: WeightShape
    groups: int

    @property
    def nnz(self) -> int:
        return self.col_idx.numel()

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.shape[0] * self.shape[1] * self.shape[2] * self.shape[3])

    def flat_index(self) -> torch.Tensor:
        """Position of each stored value in the flattened dense weight (int64, nnz)."""
        return flat_index(self.row_ptr, self.col_idx, self.shape)


def from_dense(weight: torch.Tensor, groups: int = 1, threshold: float = 0.0) -> CSRWeight:
    """Compresses ``weight`` (entries with ``|w| > threshold`` are kept) on the weight's device.

    Compression goes through ``escoin.SparseFilter.from_dense`` so that what counts as a nonzero
    is decided by the core, exactly as for every other escoin user.
    """
    return compress(weight, groups, threshold)[0]


def compress(weight: torch.Tensor, groups: int = 1,
             threshold: float = 0.0) -> Tuple[CSRWeight, escoin.SparseFilter]:
    """:func:`from_dense`, and the host ``escoin.SparseFilter`` it compressed through. The CSR
    tensors are copies of the filter's (read-only) arrays: what is written into them later
    does not reach the filter."""
    if weight.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"escoin compresses float32, float64, float16 or bfloat16 weights, got "
                        f"{weight.dtype}; convert the layer with .float() first")
    host = escoin.SparseFilter.from_dense(host_numpy(weight), groups=groups, threshold=threshold)
    device = weight.device
    csr = CSRWeight(torch.tensor(host.row_ptr, device=device),
                    torch.tensor(host.col_idx, device=device),
                    torch.tensor(host.values, device=device, dtype=weight.dtype),
                    tuple(int(v) for v in weight.shape), groups)  # type: ignore[arg-type]
    return csr, host


def host_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A host NumPy copy of a weight tensor for escoin, float16 and bfloat16 widened to float32
    (exactly: escoin computes them in float32, and NumPy has no bfloat16)."""
    host = tensor.detach().cpu()
    return (host.float() if host.dtype in (torch.float16, torch.bfloat16) else host).numpy()


def flat_index(row_ptr: torch.Tensor, col_idx: torch.Tensor, shape: WeightShape) -> torch.Tensor:
    """Position of each CSR entry in the flattened dense weight.

    Written with static output sizes only (``output_size=nnz``) so it traces under torch.compile.
    """
    rows = torch.repeat_interleave(torch.arange(shape[0], device=row_ptr.device),
                                   row_ptr.diff(), output_size=col_idx.numel())
    return rows * (shape[1] * shape[2] * shape[3]) + col_idx.long()


class Transposition(NamedTuple):
    """The pattern of a CSR weight's transpose (:func:`transpose`), which depends on the forward
    pattern alone: the transposed values are ``values[order]``."""

    row_ptr: torch.Tensor  # int64, C + 1
    col_idx: torch.Tensor  # int32, nnz
    order: torch.Tensor    # int64, nnz: the forward entry each transposed entry takes
    shape: WeightShape
    groups: int
    # int64, nnz: each forward entry's place in the flattened dense forward weight (where the
    # weight gradient's values are)
    flat_index: torch.Tensor

    def of(self, values: torch.Tensor) -> CSRWeight:
        """The transposed CSR of a weight with this pattern and `values` (differentiable in
        them: a gather)."""
        return CSRWeight(self.row_ptr, self.col_idx, values[self.order], self.shape,
                         self.groups)


def transpose(csr: CSRWeight) -> CSRWeight:
    """The filter of the input gradient: per group, channels swapped and the kernel flipped.

    ``grad_x = conv(zero-inserted, padded grad_y, W')`` with
    ``W'[g*Cg + c, m, kh-1-r, kw-1-s] = W[g*Mg + m, c, r, s]``, shape ``(C, M/groups, kh, kw)``.
    Only the nonzeros move, so the transposed conv is as sparse as the forward one. Pure tensor
    ops with static sizes, so it also traces inside a compiled backward.
    """
    return transposition(csr).of(csr.values)


def transposition(csr: CSRWeight) -> Transposition:
    """The pattern of :func:`transpose`'s result, and where its values come from."""
    m_total, c_group, kh, kw = csr.shape
    m_group = m_total // csr.groups
    cols = csr.col_idx.long()
    flat = flat_index(csr.row_ptr, csr.col_idx, csr.shape)
    rows = flat // (c_group * kh * kw)
    group, m_local = rows // m_group, rows % m_group
    c_local, r, s = cols // (kh * kw), (cols // kw) % kh, cols % kw
    new_rows = group * c_group + c_local
    new_cols = (m_local * kh + (kh - 1 - r)) * kw + (kw - 1 - s)
    order = torch.argsort(new_rows * (m_group * kh * kw) + new_cols)
    counts = torch.zeros(csr.groups * c_group, dtype=torch.int64, device=cols.device)
    counts.scatter_add_(0, new_rows, torch.ones_like(new_rows))
    row_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return Transposition(row_ptr, new_cols[order].to(torch.int32), order,
                         (csr.groups * c_group, m_group, kh, kw), csr.groups, flat)
