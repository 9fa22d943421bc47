"""Estimate: how close a tensor-core kernel could come to the floor at fp32 accuracy, per suite
layer, from the filters' nonzero patterns and the instruction rates `mma_rate_probe.cu` measures.

    python benchmarks/tensor_core_estimate.py --sparsity 0.9 [--probe rates.txt --floor-rate 51.6]

A tensor-core design computes each tile of 16 output channels (the MMA's rows) against only the
(input channel, tap) columns that have a nonzero in one of those rows; the 2:4 sparse f16 MMA
(1:2 for tf32) then skips half of each group of 4 (2) kept columns, once the columns are packed
so that no row has more than 2 (1) nonzeros in a group. fp32 accuracy needs each operand split
into a high and a low part and three products (hi*hi + hi*lo + lo*hi); the script checks that
error in NumPy for both formats. The estimate is a ceiling: operand loads, the split of x and
the epilogue are not counted.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from suite import LAYERS, pruned_weight  # noqa: E402



def packed_groups(masks: np.ndarray, group: int, per_row: int, tile_rows: int) -> int:
    """Groups of `group` columns needed to hold the columns whose row masks are `masks`, no row
    having more than `per_row` nonzeros in a group (first fit over the few newest open groups,
    fullest columns first; conflicts are rare, so this is near the lower bound)."""
    open_groups: List[List] = []  # [row counts, columns held]
    count = 0
    rows = np.arange(tile_rows)
    for mask in sorted(masks.tolist(), key=lambda m: -bin(m).count("1")):
        bits = (mask >> rows) & 1
        for index in range(max(0, len(open_groups) - 8), len(open_groups)):
            entry = open_groups[index]
            if np.all(entry[0] + bits <= per_row):
                entry[0] += bits
                entry[1] += 1
                if entry[1] == group:
                    del open_groups[index]
                break
        else:
            count += 1
            open_groups.append([bits.copy(), 1])
    return count


def tile_work(weight: np.ndarray, tile_rows: int) -> Dict[str, float]:
    """Dense-equivalent K summed over the tiles of `tile_rows` output channels (16, the MMA's M,
    or 32: two MMAs sharing their B operand), per scheme: the MMA columns paid for."""
    out_channels = weight.shape[0]
    columns = weight.reshape(out_channels, -1) != 0
    work = {"dense": 0.0, "sparse 1:2": 0.0, "sparse 2:4": 0.0}
    for first in range(0, out_channels, tile_rows):
        tile = columns[first:first + tile_rows]
        tile = np.pad(tile, ((0, tile_rows - tile.shape[0]), (0, 0)))
        masks = (tile * (1 << np.arange(tile_rows, dtype=np.int64))[:, None]).sum(axis=0)
        masks = masks[masks != 0]
        work["dense"] += tile_rows * len(masks)
        work["sparse 1:2"] += tile_rows * 2 * packed_groups(masks, 2, 1, tile_rows)
        work["sparse 2:4"] += tile_rows * 4 * packed_groups(masks, 4, 2, tile_rows)
    return work


def round_bits(values: np.ndarray, dropped: int) -> np.ndarray:
    """float32 values rounded to nearest (ties to even) with their `dropped` low mantissa bits
    cleared: 13 gives tf32's 10-bit mantissa, 16 bfloat16's 7-bit one."""
    bits = values.view(np.uint32).astype(np.uint64)
    half, keep = (1 << (dropped - 1)) - 1, (bits >> dropped) & 1
    rounded = ((bits + half + keep) >> dropped) << dropped
    return rounded.astype(np.uint32).view(np.float32)


def split(values: np.ndarray, fmt: str, parts: int = 2) -> List[np.ndarray]:
    """`values` as a sum of `parts` values of the format (f16 with a power-of-two scale that
    puts the largest value near the top of its range, so the low parts stay normal)."""
    out, rest = [], values.astype(np.float32)
    scale = 2.0 ** (14 - np.ceil(np.log2(np.abs(values).max()))) if fmt == "f16" else 1.0
    for _ in range(parts):
        if fmt == "f16":
            part = (rest * scale).astype(np.float16).astype(np.float32) / scale
            scale *= 2.0 ** 11
        else:
            part = round_bits(rest, {"tf32": 13, "bf16": 16}[fmt])
        out.append(part)
        rest = (rest - part).astype(np.float32)
    return out


def split_product_error(rng: np.random.Generator, fmt: str, parts: int) -> float:
    """Relative error norm of W @ X computed in float32 from the products of the parts whose
    orders sum to less than `parts` (2 parts: hi*hi + hi*lo + lo*hi), against float64 (W 90%
    sparse, X a ReLU's output)."""
    w = rng.standard_normal((256, 2304)).astype(np.float32) * (rng.random((256, 2304)) >= 0.9)
    x = np.maximum(rng.standard_normal((2304, 512)).astype(np.float32), 0)
    w_parts, x_parts = split(w, fmt, parts), split(x, fmt, parts)
    y = sum(w_parts[i] @ x_parts[j] for i in range(parts) for j in range(parts - i))
    exact = w.astype(np.float64) @ x.astype(np.float64)
    return float(np.linalg.norm(y - exact) / np.linalg.norm(exact))


# The probe's line name for each instruction, and the schemes estimated on it: (format of the
# parts, parts per operand, products, which work count).
PROBE_NAMES = {"tf32": "mma tf32 m16n8k8", "f16": "mma f16 m16n8k16",
               "tf32sp": "mma.sp tf32 m16n8k16", "f16sp": "mma.sp f16 m16n8k32"}
SCHEMES = {"tf32 x3": ("tf32", "dense"), "f16 x3": ("f16", "dense"),
           "tf32sp x3": ("tf32sp", "sparse 1:2"), "f16sp x3": ("f16sp", "sparse 2:4"),
           "bf16sp x6": ("f16sp", "sparse 2:4")}


def probe_rates(path: str) -> Dict[str, float]:
    """TFLOP/s per instruction from the output of mma_rate_probe.cu."""
    rates = {}
    with open(path) as lines:
        for line in lines:
            for key, name in PROBE_NAMES.items():
                if line.startswith(name + " "):
                    rates[key] = float(line[len(name):].split()[0])
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--tile-rows", type=int, choices=(16, 32), default=16)
    parser.add_argument("--probe", help="a file holding mma_rate_probe.cu's output")
    parser.add_argument("--floor-rate", type=float,
                        help="the strict-fp32 rate that defines the floor, TFLOP/s")
    args = parser.parse_args()
    rates = probe_rates(args.probe) if args.probe else {}
    if rates and not args.floor_rate:
        parser.error("--probe needs --floor-rate")
    rng = np.random.default_rng(0)
    for fmt, parts in (("tf32", 1), ("tf32", 2), ("f16", 2), ("bf16", 2), ("bf16", 3)):
        products = parts * (parts + 1) // 2
        print(f"{fmt} in {parts} part(s), {products} product(s): relative error "
              f"{split_product_error(rng, fmt, parts):.2e}")
    print(f"\nsparsity {args.sparsity}, tiles of {args.tile_rows} rows: " + (
        "ceiling in x the floor (products x columns paid per nonzero x floor rate / MMA rate)"
        if rates else "MMA columns paid per nonzero (dense-equivalent work / nnz)"))
    print("layer".ljust(14) + "".join(f"{name:>11}" for name in SCHEMES))
    ceilings: Dict[str, List[float]] = {name: [] for name in SCHEMES}
    for layer in (l for net in LAYERS.values() for l in net):
        weight = pruned_weight(layer, args.sparsity, rng)
        work = tile_work(weight, args.tile_rows)
        row = layer.name.ljust(14)
        for name, (instruction, count) in SCHEMES.items():
            value = work[count] / np.count_nonzero(weight)
            if rates:
                products = int(name.split("x")[-1])
                value = products * value * args.floor_rate / rates[instruction]
            ceilings[name].append(value)
            row += f"{value:>11.2f}"
        print(row)
    print("geomean".ljust(14) + "".join(
        f"{np.exp(np.mean(np.log(v))):>11.2f}" for v in ceilings.values()))


if __name__ == "__main__":
    main()
