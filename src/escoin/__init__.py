"""escoin: direct sparse convolution for pruned CNNs, from CSR weights, on CPUs and NVIDIA GPUs.

    import escoin
    filt = escoin.SparseFilter.from_dense(pruned_weight)          # (M, C/groups, kh, kw)
    y = escoin.conv2d(x, filt, bias, stride=1, padding="same")    # == F.conv2d semantics
"""
from escoin import _core
from escoin._core import PreparedCall
from escoin._errors import EscoinError
from escoin.conv import (conv2d, host_workspace, output_shape, sconv, stretch_offsets,
                         workspace_size)
from escoin.cuda_arrays import DeviceArray
from escoin.filter import DevicePointers, HostPointers, SparseFilter
from escoin.info import build_info, cuda_available, cuda_device_count
from escoin.native import c_api, get_include

__version__ = _core.version()

__all__ = [
    "DeviceArray",
    "DevicePointers",
    "EscoinError",
    "HostPointers",
    "PreparedCall",
    "SparseFilter",
    "build_info",
    "c_api",
    "conv2d",
    "cuda_available",
    "cuda_device_count",
    "get_include",
    "host_workspace",
    "output_shape",
    "sconv",
    "stretch_offsets",
    "workspace_size",
]
