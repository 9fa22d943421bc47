"""The whole-network benchmark (``escoin_torch.bench``) and the examples, on the CPU.

The benchmark is run through ``main()`` on networks small enough for a test; its JSON must show
that escoin was checked against a non-zero float64 reference and met the tolerance. The examples
must run as a user would run them.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from torch import nn

from escoin_torch.bench import main
from escoin_torch.bench.models import build
from escoin_torch.bench.prune import prune_convs
from escoin_torch.bench.paths import ESCOIN, ESCOIN_HALF, PathResult
from escoin_torch.bench.report import network_table, summary_table
from escoin_torch.bench.runner import NetworkResult

# The repository holding these tests, or None where they run from this package's sdist.
_ABOVE = Path(__file__).resolve().parents
REPOSITORY = (_ABOVE[3] if len(_ABOVE) > 3 and (_ABOVE[3] / "adapters" / "torch").is_dir()
              else None)


def _run_bench(out: Path, *args: str) -> Dict[str, Any]:
    assert main([*args, "--device", "cpu", "--out", str(out)]) == 0
    return json.loads((out / "networks.json").read_text())


def _check_run(run: Dict[str, Any], paths: List[str]) -> None:
    assert run["passed"] and run["output_norm"] > 0
    assert 0 < run["escoin_rel_error"] <= run["rtol"]
    assert [p["path"] for p in run["paths"]] == paths
    for p in run["paths"]:
        assert p["ms"] > 0 and math.isfinite(p["rel_error"]) and p["escoin_speedup"] > 0
    assert run["layers"], "no layer ran on escoin"
    assert set(run["calibrated_sparse"]) == {"graphs" if p["graphs"] else "eager"
                                             for p in run["paths"]}
    assert all(0 <= n <= len(run["layers"]) for n in run["calibrated_sparse"].values())
    for layer in run["layers"]:
        assert layer["dense_ms"] > 0 and layer["escoin_ms"] > 0
        assert 0 < layer["csr_bytes"] < layer["dense_bytes"]
    weights = run["weights_bytes"]
    assert weights["conv_escoin"] < weights["conv_dense"] <= weights["all_dense"]


def test_lenet5(tmp_path: Path) -> None:
    record = _run_bench(tmp_path, "--nets", "lenet5", "--batches", "1", "3", "--repeats", "2",
                        "--warmup", "1")
    runs = record["runs"]
    assert [(r["net"], r["batch"], r["input_shape"]) for r in runs] == [
        ("lenet5", 1, [1, 1, 32, 32]), ("lenet5", 3, [3, 1, 32, 32])]
    for run in runs:
        _check_run(run, ["dense fp32", "escoin fp32", "escoin calibrated"])
        # global magnitude pruning at 0.9 over LeNet5's two convs: 10% of their weights remain
        assert run["conv_density"] == pytest.approx(0.1, abs=0.005)
    assert record["meta"]["config"]["nets"] == ["lenet5"]
    assert (tmp_path / "networks.png").stat().st_size > 0


def test_alexnet_quick_random_pruning(tmp_path: Path) -> None:
    record = _run_bench(tmp_path, "--nets", "alexnet", "--batches", "1", "--quick",
                        "--prune", "random", "--repeats", "1", "--warmup", "0")
    (run,) = record["runs"]
    assert run["input_shape"] == [1, 3, 112, 112]
    _check_run(run, ["dense fp32", "escoin fp32", "escoin calibrated"])
    assert len(run["layers"]) == 5  # random pruning leaves every conv ~90% sparse: all converted


def test_networks_pruned_in_blocks(tmp_path: Path) -> None:
    """--block 4: LeNet5's convs pruned in blocks of four output channels (its first conv has 6
    channels: a block of 4 and one of 2), escoin still checked against float64."""
    record = _run_bench(tmp_path, "--nets", "lenet5", "--batches", "2", "--block", "4",
                        "--prune", "random", "--repeats", "1", "--warmup", "0")
    (run,) = record["runs"]
    _check_run(run, ["dense fp32", "escoin fp32", "escoin calibrated"])
    assert record["meta"]["config"]["block"] == 4
    assert run["conv_density"] == pytest.approx(0.1, abs=0.02)


def test_block_pruning_shares_each_blocks_pattern() -> None:
    model = prune_convs(build("vgg16", 0), 0.9, "random", 0, block=4)
    for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
        kept = (conv.weight != 0).reshape(conv.out_channels // 4, 4, -1)
        assert torch.equal(kept, kept[:, :1].expand_as(kept))


def test_exceeding_the_tolerance_fails(tmp_path: Path) -> None:
    # float32 cannot meet 1e-12 against float64: the run must report failure, not pass silently.
    assert main(["--nets", "lenet5", "--batches", "2", "--repeats", "1", "--warmup", "0",
                 "--rtol", "1e-12", "--device", "cpu", "--out", str(tmp_path)]) == 1
    (run,) = json.loads((tmp_path / "networks.json").read_text())["runs"]
    assert not run["passed"]


def _result(half_error: float) -> NetworkResult:
    paths = [PathResult("dense fp16", True, 2.0, 3e-4), PathResult(ESCOIN, True, 1.0, 4e-7),
             PathResult(ESCOIN_HALF, True, 0.5, half_error)]
    return NetworkResult("lenet5", 2, (2, 1, 32, 32), 0.1, 1.0, 1e-4, 1e-2, paths, [],
                         {"conv_dense": 4, "conv_escoin": 2, "all_dense": 8, "all_escoin": 6})


def test_the_float16_path_has_its_own_tolerance() -> None:
    # Within 1e-2 passes although above the float32 rtol; above it (or NaN) fails.
    ok, wrong, nan = _result(5e-3), _result(0.3), _result(math.nan)
    assert ok.passed and not wrong.passed and not nan.passed
    assert ok.escoin_error == 4e-7 and ok.half_error == 5e-3
    assert "in fp16 5.00e-03 <= 1e-02: ok" in network_table(ok)
    assert "in fp16 3.00e-01 <= 1e-02: FAILED" in network_table(wrong)
    # escoin fp16 over dense fp16: 2.0 / 0.5
    assert "escoin fp16 (graph)     0.500 ms: 4.00x vs dense fp16" in summary_table([ok])


@pytest.mark.parametrize("script", ["single_layer_check.py", "lenet5_check.py", "my_model.py"])
def test_example(script: str) -> None:
    if REPOSITORY is None:
        pytest.skip("run outside the repository (from this package's sdist): the examples are "
                    "the repository's")
    done = subprocess.run([sys.executable, str(REPOSITORY / "examples" / script)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
