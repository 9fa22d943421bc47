"""How evenly a staged kernel's work falls on the SMs: for each suite layer and batch, ncu's
cycles each SM was active (mean, least, most) against the kernel's elapsed cycles, and the
instructions the busiest SM executed over the mean SM's, beside the launch's grid and waves.
A kernel whose mean SM is busy for much less of its time than its busiest one, or whose
busiest SM has much more work than the mean, loses the difference to the split of its work
across blocks, which no launch shape of the same split recovers.

    python benchmarks/sm_balance.py --layers vgg.c3_2 rn.l3.3x3 --batches 1 32

Needs ncu on the PATH and a CUDA GPU; each case profiles the last of profile_layer.py's calls.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from typing import Dict

sys.path.insert(0, os.path.dirname(__file__))
from suite import LAYERS  # noqa: E402

METRICS = ["gpu__time_duration.sum", "launch__grid_size", "launch__waves_per_multiprocessor",
           "sm__cycles_active.avg", "sm__cycles_active.min", "sm__cycles_active.max",
           "sm__cycles_elapsed.max", "sm__inst_executed.avg", "sm__inst_executed.max"]


def profile(layer: str, batch: int, kernel: str) -> Dict[str, float]:
    """ncu's METRICS for the last launch of kernels matching `kernel` in one profile_layer.py
    run."""
    script = os.path.join(os.path.dirname(__file__), "profile_layer.py")
    command = ["ncu", "--clock-control", "none", "--csv", "--print-units", "base",
               "-k", f"regex:{kernel}", "--metrics", ",".join(METRICS),
               sys.executable, script, layer, str(batch)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    rows = csv.DictReader(line for line in result.stdout.splitlines() if line.startswith('"'))
    by_launch: Dict[str, Dict[str, float]] = {}
    for row in rows:
        value = row["Metric Value"].replace(",", "")
        by_launch.setdefault(row["ID"], {})[row["Metric Name"]] = float(value)
    if not by_launch:
        raise RuntimeError(f"ncu recorded no kernel matching {kernel!r} for {layer} at batch "
                           f"{batch}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return by_launch[max(by_launch, key=int)]


def main() -> None:
    names = [layer.name for net in LAYERS.values() for layer in net]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", nargs="+", default=names, choices=names)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--kernel", default="staged", help="ncu kernel-name regex")
    args = parser.parse_args()
    print("| layer | batch | blocks | waves | time us | mean SM busy % | least % | most % "
          "| most work / mean |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch in args.batches:
        for layer in args.layers:
            m = profile(layer, batch, args.kernel)
            elapsed = m["sm__cycles_elapsed.max"]
            busy = [100 * m[f"sm__cycles_active.{s}"] / elapsed for s in ("avg", "min", "max")]
            print(f"| {layer} | {batch} | {m['launch__grid_size']:.0f} | "
                  f"{m['launch__waves_per_multiprocessor']:.2f} | "
                  f"{m['gpu__time_duration.sum'] / 1e3:.1f} | "
                  + " | ".join(f"{b:.0f}" for b in busy) + " | "
                  f"{m['sm__inst_executed.max'] / m['sm__inst_executed.avg']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
