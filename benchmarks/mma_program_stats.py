"""What the tensor-core kernel's programs cost on the layer suite, from the programs themselves
(CPU only, no GPU): the work they pay per nonzero, the positions a block computes for nothing,
the shared-memory wavefronts of their B loads, and the time that predicts at a given rate of
the kernel's inner loop (a loop probe's TFLOP/s of fp32-accurate dense-equivalent work).

    python benchmarks/mma_program_stats.py --sparsity 0.9 --loop-rate 136 --floor-rate 51.7
    python benchmarks/mma_program_stats.py --block 32   # filters pruned in blocks of 32 channels
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import escoin  # noqa: E402
from escoin import _core  # noqa: E402
from escoin.geometry import descriptor  # noqa: E402
from suite import LAYERS, geomean, layers, pruned_weight  # noqa: E402

ROWS, POSITIONS, STEP_WORDS, HEADER_WORDS = 32, 128, 24, 4  # cuda/src/mma_program.hpp


def step_offsets(program: np.ndarray) -> np.ndarray:
    """The shared-memory offsets of every step's 32 columns, (steps, 32)."""
    words = program.view(np.uint32)
    tiles, chunks, steps = (int(v) for v in words[1:4])
    steps_at = -(-(HEADER_WORDS + tiles * chunks + 1) // 4) * 4
    lanes = words[steps_at:].reshape(steps, STEP_WORDS // 4, 32, 4).transpose(0, 2, 1, 3)
    packed = lanes.reshape(steps, 32, STEP_WORDS)[:, :4, 18:22]  # lanes t = 0..3, i = 0..3
    offsets = np.zeros((steps, 32), np.int64)
    for t in range(4):
        for i in range(4):
            offsets[:, 8 * i + 2 * t] = packed[:, t, i] & 0xFFFF
            offsets[:, 8 * i + 2 * t + 1] = packed[:, t, i] >> 16
    return offsets


def wavefronts(offsets: np.ndarray) -> float:
    """Mean shared-memory wavefronts of a B load: lanes (g, t) read column 8i + 2t + e at
    position g, so a load is four runs of 8 banks; its wavefronts are the most lanes on a bank."""
    total = 0
    count = 0
    for i in range(4):
        for e in range(2):
            starts = offsets[:, [8 * i + 2 * t + e for t in range(4)]] % 32
            banks = (starts[:, :, None] + np.arange(8)[None, None, :]) % 32
            counts = np.zeros((offsets.shape[0], 32), np.int64)
            for t in range(4):
                np.add.at(counts, (np.arange(offsets.shape[0])[:, None], banks[:, t]), 1)
            total += counts.max(axis=1).sum()
            count += offsets.shape[0]
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--loop-rate", type=float, default=136.3,
                        help="the inner loop's TFLOP/s (the loop probe's, at random banks)")
    parser.add_argument("--block", type=int, default=1,
                        help="prune in blocks of this many output channels (1: unstructured)")
    parser.add_argument("--floor-rate", type=float, default=51.7,
                        help="strict fp32 TFLOP/s (the floor's rate)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"sparsity {args.sparsity}, blocks of {args.block}; predicted time / floor at a loop "
          f"rate of {args.loop_rate} TFLOP/s (floor rate {args.floor_rate})")
    print(f"{'layer':<13}{'paid/nnz':>9}{'positions':>10}{'wavefronts':>11}{'x floor':>9}")
    ratios = []
    for layer in layers(LAYERS):
        weight = pruned_weight(layer, args.sparsity, rng, args.block)
        filt = escoin.SparseFilter.from_dense(weight)
        shape = (1, layer.in_channels, layer.size, layer.size)
        program = filt.mma_program(shape, layer.stride, layer.padding)
        if program is None:
            print(f"{layer.name:<13}   (the tensor-core kernel does not run it)")
            continue
        desc = descriptor(shape, filt.shape, 1, layer.stride, layer.padding, 1)
        out = _core.conv_layout(desc)
        offsets = step_offsets(program)
        paid = offsets.shape[0] * 32 * ROWS / filt.nnz  # dense-equivalent MACs per nonzero
        # the kernel's layout: rows rounded up to 8 (geometry.cpp, Geometry::mma_layout)
        plane_q = out["out_height"] * -(-out["plane_w"] // 8) * 8
        computed = -(-plane_q // POSITIONS) * POSITIONS / (out["out_height"] * out["out_width"])
        ratio = paid * computed * args.floor_rate / args.loop_rate
        ratios.append(ratio)
        print(f"{layer.name:<13}{paid:>9.2f}{computed:>10.3f}{wavefronts(offsets):>11.2f}"
              f"{ratio:>9.2f}")
    print(f"{'geomean':<13}{'':>30}{geomean(ratios):>9.2f}")


if __name__ == "__main__":
    main()
