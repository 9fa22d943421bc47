"""The loops of a CUDA kernel's SASS, read on a machine without a GPU: compiles one source file
of cuda/src for one architecture, and prints, per kernel, its registers and spills, and per loop
(a backward branch) its instruction count, its opcodes by count and, with --order, the order of
its memory and MMA instructions (where ptxas put the loads against the MMAs).

    python benchmarks/sass_loops.py cuda/src/mma_kernel.cu --order
    python benchmarks/sass_loops.py cuda/src/tile_kernel.cu --kernel staged --arch 90

Needs nvcc, and cuobjdump on PATH or from the `nvidia-cuda-cuobjdump` wheel
(`pip install nvidia-cuda-cuobjdump`)."""
from __future__ import annotations

import argparse
import collections
import glob
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
FUNCTION = re.compile(r"Function : (\S+)")
BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")
ORDERED = ("LDG", "LDS", "LDGSTS", "STS", "STG", "HMMA", "BAR", "FADD", "FFMA")


def cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    for path in sys.path:  # the nvidia-cuda-cuobjdump wheel
        for candidate in glob.glob(os.path.join(path, "nvidia", "cu*", "bin", "cuobjdump")):
            return candidate
    sys.exit("cuobjdump not found: put it on PATH or `pip install nvidia-cuda-cuobjdump`")


def compile_cubin(source: str, arch: str, out: str) -> str:
    """nvcc's resource report (registers, spills) for the file, leaving its cubin at out."""
    done = subprocess.run(
        ["nvcc", "-O3", "-std=c++17", f"-arch=sm_{arch}", "-I", os.path.join(ROOT, "cuda/include"),
         "-I", os.path.join(ROOT, "cuda/src"), "-Xptxas", "-v", "-cubin", "-o", out, source],
        capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(done.stderr)
    return done.stderr


def resource_lines(report: str) -> Dict[str, str]:
    """Per entry function, ptxas's lines on its stack, spills and registers, joined."""
    found: Dict[str, List[str]] = {}
    current: List[str] = []
    for line in report.splitlines():
        entry = re.search(r"entry function '([^']+)'", line)
        if entry:
            current = found.setdefault(entry.group(1), [])
        elif "spill" in line or "Used" in line:
            current.append(line.split(":", 1)[-1].strip())
    return {name: "; ".join(lines) for name, lines in found.items()}


def kernels(sass: str) -> Dict[str, List[Tuple[int, str, str]]]:
    """Per function: (address, opcode, operands) in order."""
    found: Dict[str, List[Tuple[int, str, str]]] = {}
    current: List[Tuple[int, str, str]] = []
    for line in sass.splitlines():
        name = FUNCTION.search(line)
        if name:
            current = found.setdefault(name.group(1), [])
            continue
        match = INSTRUCTION.match(line)
        if match and (match.group(2) or "").strip() != "@!PT":  # @!PT: never runs (padding)
            current.append((int(match.group(1), 16), match.group(3), match.group(4).strip()))
    return found


def loops(code: List[Tuple[int, str, str]]) -> List[Tuple[int, int]]:
    """(first, last) address of each loop: a branch back to an earlier address."""
    spans = []
    for address, opcode, operands in code:
        target = BRANCH_TARGET.search(operands) if opcode.startswith("BRA") else None
        if target and int(target.group(1), 16) < address:
            spans.append((int(target.group(1), 16), address))
    return spans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a .cu file, e.g. cuda/src/mma_kernel.cu")
    parser.add_argument("--arch", default="90", help="compute capability, digits only (90)")
    parser.add_argument("--kernel", default="", help="only kernels whose name contains this")
    parser.add_argument("--order", action="store_true",
                        help="print each loop's memory and MMA instructions in order")
    parser.add_argument("--min-length", type=int, default=8,
                        help="skip loops shorter than this many instructions")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        cubin = os.path.join(scratch, "kernel.cubin")
        report = compile_cubin(args.source, args.arch, cubin)
        sass = subprocess.run([cuobjdump(), "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
    resources = resource_lines(report)
    for name, code in kernels(sass).items():
        if args.kernel not in name:
            continue
        print(f"\n{name}: {len(code)} instructions; {resources.get(name, '')}")
        for first, last in loops(code):
            body = [(a, op, rest) for a, op, rest in code if first <= a <= last]
            if len(body) < args.min_length:
                continue
            counts = collections.Counter(op.split(".")[0] for _, op, _ in body)
            mix = ", ".join(f"{n} {op}" for op, n in counts.most_common(12))
            print(f"  loop {first:#06x}-{last:#06x}: {len(body)} instructions: {mix}")
            if args.order:
                shown = [op.split(".")[0] for _, op, _ in body if op.split(".")[0] in ORDERED]
                runs = [f"{len(list(group))} {op}" for op, group in itertools.groupby(shown)]
                print("    order: " + ", ".join(runs))


if __name__ == "__main__":
    main()
