"""Presenting benchmark results: text tables, a JSON record and a PNG chart.

The JSON holds everything measured (so charts and comparisons can be redone without rerunning);
the chart is optional because matplotlib is not a dependency of escoin-torch.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Sequence

from escoin_torch.bench.paths import (DENSE_HALF, ESCOIN, ESCOIN_CALIBRATED, ESCOIN_HALF,
                                      ESCOIN_PATHS)
from escoin_torch.bench.runner import NetworkResult

__all__ = ["layer_table", "network_table", "summary_table", "to_dict", "write_chart",
           "write_json"]

_MB = 1e6


def network_table(result: NetworkResult) -> str:
    """Whole-network table: time per path, escoin's speed-up over it, error against float64."""
    converted = len(result.layers)
    lines = [f"{result.net}, batch {result.batch}, input {'x'.join(map(str, result.input_shape))}"
             f", conv density {result.conv_density:.3f}, {converted} convs on escoin"
             + (f", {len(result.kept_dense)} kept dense" if result.kept_dense else "")
             + "".join(f"; calibration ({mode}) kept {n} of them on escoin"
                       for mode, n in result.calibrated_sparse.items()),
             f"  {'path':<19}{'graph':<7}{'ms':>10}{'escoin speed-up':>17}{'rel err vs fp64':>17}"]
    for p in result.paths:
        lines.append(f"  {p.path:<19}{'yes' if p.graphs else 'no':<7}{p.ms:>10.3f}"
                     f"{result.speedup(p):>16.2f}x{p.rel_error:>17.2e}")
    w = result.weights
    lines.append(f"  weights: convs {w['conv_dense'] / _MB:.2f} MB dense -> "
                 f"{w['conv_escoin'] / _MB:.2f} MB with CSR "
                 f"({w['conv_dense'] / w['conv_escoin']:.2f}x smaller); all parameters "
                 f"{w['all_dense'] / _MB:.2f} -> {w['all_escoin'] / _MB:.2f} MB")
    lines += [f"  kept dense: {name}: {why}" for name, why in result.kept_dense.items()]
    verdict = "ok" if result.passed else "FAILED"
    half = "" if result.half_error is None else \
        f", in fp16 {result.half_error:.2e} <= {result.half_rtol:.0e}"
    lines.append(f"  check: escoin rel err {result.escoin_error:.2e} <= {result.rtol:.0e}{half}: "
                 f"{verdict}")
    return "\n".join(lines)


def layer_table(result: NetworkResult) -> str:
    """Per-layer table: each escoin conv's dense and sparse time (in CUDA graphs on a GPU) and
    weight memory."""
    lines = [f"  {'layer':<26}{'weight':<18}{'density':>8}{'dense ms':>10}{'escoin ms':>11}"
             f"{'speed-up':>10}{'dense KB':>11}{'CSR KB':>10}"]
    for r in result.layers:
        lines.append(f"  {r.name:<26}{'x'.join(map(str, r.weight_shape)):<18}{r.density:>8.3f}"
                     f"{r.dense_ms:>10.3f}{r.sparse_ms:>11.3f}{r.speedup:>9.2f}x"
                     f"{r.dense_bytes / 1e3:>11.1f}{r.csr_bytes / 1e3:>10.1f}")
    if result.layers:
        dense = sum(r.dense_ms for r in result.layers)
        sparse = sum(r.sparse_ms for r in result.layers)
        lines.append(f"  {'sum of convs':<52}{dense:>10.3f}{sparse:>11.3f}"
                     f"{dense / sparse:>9.2f}x   (geomean "
                     f"{_geomean([r.speedup for r in result.layers]):.2f}x)")
    return "\n".join(lines)


def summary_table(results: Sequence[NetworkResult]) -> str:
    """One line per case: escoin's time and speed-up over each dense path."""
    lines = []
    for r in results:
        ours = [p for p in r.paths if p.path in ESCOIN_PATHS]
        for mine in ours:
            others = ", ".join(f"{r.speedup(p, mine.path):.2f}x vs {p.path}" for p in r.paths
                               if p.graphs == mine.graphs and p.path not in ESCOIN_PATHS)
            graph = " (graph)" if mine.graphs else ""
            label = _LABELS[mine.path]
            lines.append(f"  {r.net:<9} batch {r.batch:<4} {label}{graph} {mine.ms:9.3f} ms: "
                         f"{others}; rel err {mine.rel_error:.1e} "
                         f"{'ok' if r.within_tolerance(mine) else 'FAILED'}")
    return "\n".join(lines)


# summary_table's name for each of escoin's paths.
_LABELS = {ESCOIN: "escoin", ESCOIN_CALIBRATED: "calibrated", ESCOIN_HALF: "escoin fp16"}


def to_dict(result: NetworkResult) -> Dict[str, Any]:
    """A JSON-ready record of one case (times in ms, memory in bytes)."""
    return {
        "net": result.net, "batch": result.batch, "input_shape": list(result.input_shape),
        "conv_density": result.conv_density, "output_norm": result.output_norm,
        "rtol": result.rtol, "half_rtol": result.half_rtol,
        "escoin_rel_error": result.escoin_error, "escoin_half_rel_error": result.half_error,
        "passed": result.passed,
        "paths": [{"path": p.path, "graphs": p.graphs, "ms": p.ms, "rel_error": p.rel_error,
                   "escoin_speedup": result.speedup(p)} for p in result.paths],
        "weights_bytes": result.weights,
        "kept_dense": result.kept_dense,
        "calibrated_sparse": result.calibrated_sparse,
        "layers": [{"name": r.name, "weight_shape": list(r.weight_shape),
                    "input_shape": list(r.input_shape), "density": r.density,
                    "dense_ms": r.dense_ms, "escoin_ms": r.sparse_ms, "speedup": r.speedup,
                    "dense_bytes": r.dense_bytes, "csr_bytes": r.csr_bytes}
                   for r in result.layers],
    }


def write_json(results: Sequence[NetworkResult], meta: Dict[str, Any], path: Path) -> None:
    """``meta`` (configuration, environment) and every case's record, to ``path``."""
    path.write_text(json.dumps({"meta": meta, "runs": [to_dict(r) for r in results]}, indent=1))


def write_chart(results: Sequence[NetworkResult], path: Path) -> bool:
    """A PNG: escoin's whole-network speed-up over each dense path, then one panel of per-layer
    speed-ups per case. Returns False (writing nothing) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(1 + len(results), 1, squeeze=False,
                                figsize=(12, 3.5 * (1 + len(results))))
    _network_bars(axes[0][0], results)
    for ax, result in zip((row[0] for row in axes[1:]), results):
        names = [r.name for r in result.layers]
        ax.bar(range(len(names)), [r.speedup for r in result.layers], color="tab:green")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel("escoin speed-up")
        ax.set_title(f"{result.net} batch {result.batch}: per conv layer, dense / escoin time "
                     "(on a GPU each in CUDA graphs, TF32 off)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _network_bars(ax: Any, results: Sequence[NetworkResult]) -> None:
    """Grouped bars: one group per case, one bar per dense path (and graph setting), and where
    escoin ran in float16 too, its speed-up over dense float16."""
    labels = [f"{r.net}\nbatch {r.batch}" for r in results]
    series: Dict[str, List[float]] = {}
    for i, r in enumerate(results):
        half_graphs = {p.graphs for p in r.paths if p.path == ESCOIN_HALF}
        for p in r.paths:
            if p.path in ESCOIN_PATHS:
                continue
            graph = " (graph)" if p.graphs else ""
            series.setdefault(f"vs {p.path}{graph}", [math.nan] * len(results))[i] = \
                r.speedup(p)
            if p.path == DENSE_HALF and p.graphs in half_graphs:
                series.setdefault(f"{ESCOIN_HALF} vs {p.path}{graph}",
                                  [math.nan] * len(results))[i] = r.speedup(p, ESCOIN_HALF)
    width = 0.8 / max(1, len(series))
    for k, (key, values) in enumerate(series.items()):
        ax.bar([i + k * width for i in range(len(results))], values, width, label=key)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(results))], labels)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel("escoin speed-up")
    ax.set_title("whole network, end to end (dense time / escoin fp32 time, unless named)")
    ax.legend(fontsize=8)


def _geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))
