"""torch.export of sparsified models: exported with a dynamic batch, saved and loaded, and
compiled ahead of time by AOTInductor; each must still run escoin's op (not a dense
decomposition) and match the dense model in float64."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Tuple

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from torch_helpers import pruned_small_cnn, relative_error
from escoin_torch import SparseConv2d, fuse_for_inference, sparsify

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _models(device: str, fused: bool) -> Tuple[nn.Module, nn.Module]:
    """A pruned dense CNN and its escoin copy (fused for inference, or not), both on device."""
    torch.manual_seed(0)
    dense = pruned_small_cnn().eval()
    sparse, _ = sparsify(dense)
    for conv in (m for m in dense.modules() if isinstance(m, nn.Conv2d)):
        prune.remove(conv, "weight")  # a plain weight, so that the float64 copy can be made
    if fused:
        sparse = fuse_for_inference(sparse)
    return dense.to(device), sparse.to(device)


def _float64(dense: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(dense).double()(x.double())


def _escoin_calls(program: torch.export.ExportedProgram) -> int:
    return sum(node.target is torch.ops.escoin.sparse_conv2d.default
               for node in program.graph.nodes)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [False, True])
def test_export_with_a_dynamic_batch_save_and_load(device: str, fused: bool,
                                                   tmp_path: Path) -> None:
    dense, sparse = _models(device, fused)
    x = torch.randn(2, 3, 16, 16, device=device)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(sparse, (x,), dynamic_shapes=({0: batch},))
    assert _escoin_calls(program) == sum(isinstance(m, SparseConv2d) for m in sparse.modules())
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2")
    for n in (1, 5):
        x = torch.randn(n, 3, 16, 16, device=device)
        with torch.no_grad():
            y = loaded.module()(x)
        assert y.shape == (n, 5) and y.device.type == device
        assert relative_error(y, _float64(dense, x)) < 1e-5


def test_aot_inductor_package_runs_escoin(tmp_path: Path) -> None:
    dense, sparse = _models("cpu", fused=True)
    x = torch.randn(2, 3, 16, 16)
    program = torch.export.export(sparse, (x,),
                                  dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    package = torch._inductor.aoti_compile_and_package(
        program, package_path=str(tmp_path / "model_aoti.pt2"))
    runner = torch._inductor.aoti_load_package(package)
    x = torch.randn(3, 3, 16, 16)
    assert relative_error(runner(x), _float64(dense, x)) < 1e-5
