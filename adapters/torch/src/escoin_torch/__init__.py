"""escoin for PyTorch: sparse (CSR) convolutions of pruned weights.

* :func:`sparsify` turns the sparse-enough ``nn.Conv2d`` of a model into :class:`SparseConv2d`
  (folding ``torch.nn.utils.prune`` masks); :func:`fuse_for_inference` folds eval-mode
  BatchNorms into them and fuses ReLUs; :func:`calibrate` keeps the faster path per layer.
* :class:`SparseConv2d` is a drop-in ``nn.Conv2d``: dense in training, sparse in eval.
* :func:`sparse_conv2d` / ``torch.ops.escoin.sparse_conv2d`` is the op (CPU and CUDA, fake and
  autograd kernels, so it works with torch.compile, CUDA graphs and ``opcheck``).
* :func:`block_prune` and :func:`global_block_prune` prune in blocks of four output channels,
  the structure escoin's GPU kernel runs 1.75x faster than unstructured sparsity (an H100, 90%).
* :func:`refresh_csrs` brings a model's CSRs up to date after an optimiser step of sparse
  training, with one synchronisation for all its layers.
* :func:`set_native_training` switches the C++ path of sparse training's CUDA calls (on by
  default) off and on.
* :func:`release_geometries` frees the arrays escoin keeps per input size (for models fed many).
* :mod:`escoin_torch.seed` is the API of the seed port (``import escoin_torch.seed as sp``).

The core is reached only through the ``escoin`` Python package.
"""
from escoin_torch.block_pruning import block_prune, global_block_prune
from escoin_torch.convert import LayerReport, LayerTiming, calibrate, sparsify
from escoin_torch.csr import CSRWeight
from escoin_torch.fuse import fuse_for_inference
from escoin_torch.layer import SparseConv2d, refresh_csrs
from escoin_torch.ops import (SUPPORTED_DTYPES, release_geometries, set_native_training,
                              sparse_conv2d)
from escoin_torch.seed import SparseConv2D, SparseModel, Sparse_modes, set_mode
from escoin_torch.timing import PathTimes, time_paths

__version__ = "0.1.0"

__all__ = ["CSRWeight", "LayerReport", "LayerTiming", "PathTimes", "SUPPORTED_DTYPES",
           "SparseConv2D", "SparseConv2d", "SparseModel", "Sparse_modes", "block_prune",
           "calibrate", "fuse_for_inference", "global_block_prune", "refresh_csrs",
           "release_geometries", "set_mode", "set_native_training", "sparse_conv2d", "sparsify",
           "time_paths"]
