"""``python -m escoin_torch.bench`` / ``escoin-bench``: whole pruned networks, escoin against dense.

For each network and batch size: build it (fixed seed), prune its convolutions globally, convert
them with ``escoin_torch.sparsify``, check the sparse output against the dense network in float64
(exit status 1 if any case exceeds ``--rtol``), then time every path end to end and every escoin
layer on its own. Prints the tables and writes ``networks.json`` and ``networks.png`` to ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import escoin
import torch

import escoin_torch
from escoin_torch.bench.models import NETS
from escoin_torch.bench.report import (layer_table, network_table, summary_table, write_chart,
                                       write_json)
from escoin_torch.bench.runner import Case, NetworkResult, run_case

__all__ = ["main", "parse_args"]

# --quick: what keeps a CPU run of all four networks to a few minutes on two cores.
QUICK_SIZE = 112
QUICK_MAX_BATCH = 4

# The default tolerance on ||escoin - fp64|| / ||fp64||. escoin's per-layer error is a few fp32
# ulps (measured below 4e-7 per layer); through ~50 layers such errors add up to about 1e-6, as
# they do for PyTorch's own fp32 path. 1e-4 keeps a 100x margin over that, while a wrong index,
# a dropped row or a stale CSR gives errors of order 1.
DEFAULT_RTOL = 1e-4
# The same for escoin's float16 path (GPU only): each layer's output is rounded to 11 bits, and
# over whole networks the error measured 4e-4 to 9e-4 on the CPU (VGG16, ResNet-50, AlexNet at
# 90%), as dense float16's did. 1e-2 keeps a 10x margin; a wrong answer is still of order 1.
DEFAULT_HALF_RTOL = 1e-2


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="escoin-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", choices=NETS, default=list(NETS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--sparsity", type=float, default=0.9,
                        help="fraction of all conv weights pruned, globally (default 0.9)")
    parser.add_argument("--prune", choices=("random", "magnitude"), default="random",
                        help="global random unstructured pruning (default, as the Escoin port's "
                             "benchmarks do) or global magnitude pruning (on freshly initialised "
                             "weights it leaves the first layers under 50%% sparse)")
    parser.add_argument("--block", type=int, default=1,
                        help="prune in blocks of this many output channels, which share their "
                             "pattern (escoin_torch.global_block_prune; 4 is the structure "
                             "escoin's GPU kernel runs fastest); default 1: single weights")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: CUDA when torch and escoin both can use it, else CPU")
    parser.add_argument("--graphs", choices=("on", "off", "both"), default="both",
                        help="time whole-forward CUDA graphs, eager runs, or both (GPU only)")
    parser.add_argument("--size", type=int, default=None,
                        help="input side for vgg16/resnet50/alexnet (default 224/224/227; "
                             "lenet5 is always 32)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per measurement (median taken)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs before timing")
    parser.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                        help="largest accepted relative-norm error of escoin against float64")
    parser.add_argument("--half-rtol", type=float, default=DEFAULT_HALF_RTOL,
                        help="the same for escoin in float16 (GPU only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help=f"a short run: inputs {QUICK_SIZE}x{QUICK_SIZE} (lenet5 32x32), "
                             f"batches capped at {QUICK_MAX_BATCH}, fewer repeats")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/networks"))
    args = parser.parse_args(argv)
    if min(args.batches) < 1:
        parser.error("--batches must be positive")
    if args.block < 1:
        parser.error("--block must be positive")
    if args.repeats is not None and args.repeats < 1 or args.warmup is not None \
            and args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the benchmark; returns 0 when every case's escoin output is within ``--rtol``."""
    args = parse_args(argv)
    device = _resolve_device(args.device)
    cases = _cases(args, device)
    torch.backends.cudnn.benchmark = True  # dense convolutions get cuDNN's best algorithm
    print(_environment_line(device), flush=True)
    load = _busy_cores()
    if device.type == "cpu" and load is not None and load > 0.25:
        # Both libraries use every core: another busy process slows them, and unevenly.
        print(f"warning: other processes keep {load:.1f} of {os.cpu_count()} cores busy; CPU "
              "timings will be noisy")
    if device.type == "cpu" and args.graphs != "off":
        print("(CUDA graphs apply to GPU runs only; timing eagerly)")
    results: List[NetworkResult] = []
    write = _progress_writer()
    for case, step in _progress(cases):
        result = run_case(case, step)
        results.append(result)
        write(network_table(result) + "\n" + layer_table(result) + "\n")
    print("summary (escoin speed-up over each dense path, end to end):")
    print(summary_table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(results, _meta(args, device, load), args.out / "networks.json")
    charted = write_chart(results, args.out / "networks.png")
    print(f"wrote {args.out / 'networks.json'}"
          + (f" and {args.out / 'networks.png'}" if charted else " (no matplotlib: no chart)"))
    failed = [f"{r.net} batch {r.batch}" for r in results if not r.passed]
    if failed:
        print(f"FAILED: escoin's output exceeds rtol {args.rtol:.0e} (float16: "
              f"{args.half_rtol:.0e}) for {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _cases(args: argparse.Namespace, device: torch.device) -> List[Case]:
    cuda = device.type == "cuda"
    size = QUICK_SIZE if args.quick and args.size is None else args.size
    batches = sorted({min(b, QUICK_MAX_BATCH) for b in args.batches}) if args.quick \
        else args.batches
    if cuda:
        repeats, warmup = (10, 3) if args.quick else (50, 10)
    else:
        repeats, warmup = (3, 1) if args.quick else (10, 2)
    repeats = repeats if args.repeats is None else args.repeats
    warmup = warmup if args.warmup is None else args.warmup
    graphs = {"off": (False,), "on": (True,), "both": (False, True)}[args.graphs] if cuda \
        else (False,)
    return [Case(net, batch, device, args.sparsity, args.prune, size, graphs, repeats, warmup,
                 args.rtol, args.half_rtol, args.seed, args.block)
            for net in args.nets for batch in batches]


def _resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when both torch and escoin can use it (escoin built with CUDA), else CPU."""
    usable = torch.cuda.is_available() and escoin.cuda_available()
    if name == "auto":
        return torch.device("cuda" if usable else "cpu")
    if name == "cuda" and not usable:
        raise SystemExit(f"--device cuda: torch.cuda.is_available()={torch.cuda.is_available()},"
                         f" escoin.cuda_available()={escoin.cuda_available()}")
    return torch.device(name)


def _busy_cores(interval_s: float = 0.5) -> Optional[float]:
    """How many cores other processes keep busy, from /proc/stat over ``interval_s`` (None where
    there is no /proc/stat). A load average would still count the previous run's last minute."""
    def sample() -> Tuple[int, int]:
        with open("/proc/stat") as stat:
            ticks = [int(v) for v in stat.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # all, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(interval_s)
        total1, idle1 = sample()
    except OSError:
        return None
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(1, total1 - total0))


def _environment_line(device: torch.device) -> str:
    info = escoin.build_info()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU, torch {torch.get_num_threads()} threads, escoin {info['openmp_threads']} threads")
    return f"escoin {info['version']}, escoin-torch {escoin_torch.__version__}, " \
           f"torch {torch.__version__}; {where}"


def _meta(args: argparse.Namespace, device: torch.device,
          load: Optional[float]) -> Dict[str, Any]:
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    try:
        import torchvision
        models = f"torchvision {torchvision.__version__}"
    except ImportError:
        models = "escoin_torch.bench.models (torchvision shapes)"
    return {"config": config, "device": str(device), "environment": _environment_line(device),
            "escoin": escoin.build_info(), "torch": torch.__version__, "models": models,
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
            "busy_cores_at_start": load,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _progress(cases: List[Case]) -> Iterable[Tuple[Case, Callable[[str], None]]]:
    """Each case with a ``step`` callback that names the current phase on a tqdm bar (tqdm is
    optional: without it, phases are not shown)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        yield from ((case, lambda _: None) for case in cases)
        return
    with tqdm(cases, desc="networks", unit="case", file=sys.stderr) as bar:
        for case in bar:
            def step(phase: str, case: Case = case) -> None:
                bar.set_postfix_str(f"{case.net} batch {case.batch}: {phase}")
            yield case, step


def _progress_writer() -> Callable[[str], None]:
    """Printing that does not tear the progress bar."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return lambda text: print(text, flush=True)
    return lambda text: tqdm.write(text, file=sys.stdout)
