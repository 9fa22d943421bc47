"""torch.export of sparsified models: exported with a dynamic batch, saved and loaded, and
compiled ahead of time by AOTInductor; each must still run escoin's op (not a dense
decomposition) and match the dense model in float64."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Optional, Tuple

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


# Loads an AOTInductor package and runs it on a saved input, in a fresh interpreter: a crash in
# torch's loader then fails (or skips) one test instead of ending the test run.
_RUN_PACKAGE = """
import sys, torch
if sys.argv[4] == "escoin":
    import escoin_torch  # registers torch.ops.escoin, which the package calls
runner = torch._inductor.aoti_load_package(sys.argv[1])
torch.save(runner(torch.load(sys.argv[2])), sys.argv[3])
"""


def _run_package(package: str, x: torch.Tensor, directory: Path,
                 with_escoin: bool) -> Tuple[int, Optional[torch.Tensor]]:
    """The subprocess's return code and, where it succeeded, the package's output on x."""
    x_path, y_path = directory / "x.pt", directory / "y.pt"
    torch.save(x, x_path)
    done = subprocess.run([sys.executable, "-c", _RUN_PACKAGE, package, str(x_path),
                           str(y_path), "escoin" if with_escoin else "plain"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode <= 0, done.stderr[-3000:]  # (a Python error fails the test here)
    return done.returncode, torch.load(y_path) if done.returncode == 0 else None


def test_aot_inductor_package_runs_escoin(tmp_path: Path) -> None:
    dense, sparse = _models("cpu", fused=True)
    x = torch.randn(2, 3, 16, 16)
    program = torch.export.export(sparse, (x,),
                                  dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    package = torch._inductor.aoti_compile_and_package(
        program, package_path=str(tmp_path / "model_aoti.pt2"))
    x = torch.randn(3, 3, 16, 16)
    code, y = _run_package(package, x, tmp_path, with_escoin=True)
    if code < 0:  # killed by a signal: is it escoin's, or the loader's wherever it runs?
        plain = nn.Conv2d(3, 4, 3).eval()
        plain_package = torch._inductor.aoti_compile_and_package(
            torch.export.export(plain, (x,)), package_path=str(tmp_path / "plain_aoti.pt2"))
        plain_code, _ = _run_package(plain_package, x, tmp_path, with_escoin=False)
        if plain_code < 0:
            pytest.skip(f"torch's AOTInductor loader is killed by signal {-plain_code} here "
                        "on a package without escoin too")
        pytest.fail(f"the escoin package's run was killed by signal {-code}; a plain "
                    "package runs")
    assert relative_error(y, _float64(dense, x)) < 1e-5
