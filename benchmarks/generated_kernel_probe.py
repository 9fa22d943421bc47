"""Probe: per-layer generated CUDA kernels with the filter's weights as immediates (SparseRT-style),
measured against the staged kernel's numbers in docs/performance.md ("Generated code").

    python benchmarks/generated_kernel_probe.py vgg.c3_2:32:32:8:8 rn.l3.3x3:32:32:14:16

Each spec is layer:batch:KG:TH:CC. The filter (90% sparse, suite.pruned_weight) is cut into groups
of KG output channels, one kernel each; a block computes TH full output rows of one image, a
thread one output position with KG accumulators in registers. The input goes through shared
memory CC channels at a time (double-buffered cp.async with zero fill for the padding); for each
(channel, tap) column of the group with any nonzero the kernel loads the input value once and
issues one FFMA per nonzero with the weight as an immediate: one load feeds several FMAs, which
the staged kernel's one load per FMA cannot. Stride 1 only. Needs cupy, torch, nvcc and an
installed escoin (for gpu_layers' strict-fp32 rate) on a CUDA machine; times are per call of all
the layer's kernels, replayed as a CUDA graph.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, NamedTuple

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from suite import LAYERS, Layer, output_size, pruned_weight  # noqa: E402


class Kernel(NamedTuple):
    source: str
    name: str
    first_channel: int
    threads: int
    shared_bytes: int
    row_tiles: int


def group_kernel(weight: np.ndarray, layer: Layer, first: int, rows: int, chunk: int) -> Kernel:
    """CUDA source of the kernel for output channels [first, first + len(weight))."""
    group = weight.shape[0]
    c, h, w, k, pad = layer.in_channels, layer.size, layer.size, layer.kernel, layer.padding
    oh = ow = output_size(layer)
    padded_w = w + 2 * pad
    slice_floats = (rows + k - 1) * padded_w  # one channel's input rows in shared memory
    threads = -(-rows * ow // 32) * 32
    slots = -(-slice_floats // threads)
    buffer_bytes = chunk * slice_floats * 4
    row_tiles = -(-oh // rows)
    name = f"group{first}"
    lines: List[str] = []
    emit = lines.append
    emit(f'extern "C" __global__ void __launch_bounds__({threads}) '
         f"{name}(const float* __restrict__ x, float* __restrict__ y, int out_channels) {{")
    emit("  extern __shared__ float tile[];")
    emit(f"  const int n = blockIdx.x / {row_tiles}, oh0 = blockIdx.x % {row_tiles} * {rows};")
    emit(f"  const int t = threadIdx.x, row = t / {ow}, col = t % {ow};")
    emit(f"  const bool active = t < {rows * ow} && oh0 + row < {oh};")
    emit("  const unsigned base = (unsigned)__cvta_generic_to_shared(tile);")
    emit(f"  const unsigned mine = base + (active ? row * {padded_w} + col : 0) * 4;")
    emit(f"  const float* image = x + (size_t)n * {c * h * w};")
    # Each thread copies the same slots of every channel: their offsets are computed once.
    emit(f"  int from[{slots}], bytes[{slots}]; unsigned to[{slots}];")
    emit(f"  for (int j = 0; j < {slots}; ++j) {{")
    emit(f"    const int at = t + j * {threads}, r = at / {padded_w}, s = at % {padded_w};")
    emit(f"    const int ih = oh0 - {pad} + r, iw = s - {pad};")
    emit(f"    const bool inside = at < {slice_floats} && ih >= 0 && ih < {h} && iw >= 0 "
         f"&& iw < {w};")
    emit(f"    from[j] = inside ? ih * {w} + iw : 0; bytes[j] = inside ? 4 : 0;")
    emit(f"    to[j] = at < {slice_floats} ? base + at * 4 : 0xffffffffu;")
    emit("  }")
    emit(f"  float acc[{group}];")
    emit(f"  for (int m = 0; m < {group}; ++m) acc[m] = 0.f;")

    def copy(index: int) -> None:  # chunk `index` into buffer index % 2, zero-filled padding
        c0, count = index * chunk, min(chunk, c - index * chunk)
        emit(f"  for (int ch = 0; ch < {count}; ++ch)")
        emit(f"    for (int j = 0; j < {slots}; ++j) if (to[j] != 0xffffffffu)")
        emit('      asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" :: '
             f'"r"(to[j] + {index % 2 * buffer_bytes} + ch * {slice_floats * 4}), '
             f'"l"(image + (size_t)({c0} + ch) * {h * w} + from[j]), "r"(bytes[j]) : "memory");')
        emit('  asm volatile("cp.async.commit_group;" ::: "memory");')

    chunks = -(-c // chunk)
    copy(0)
    for index in range(chunks):
        if index + 1 < chunks:
            copy(index + 1)
        emit(f'  asm volatile("cp.async.wait_group {1 if index + 1 < chunks else 0};" ::: '
             '"memory");')
        emit("  __syncthreads();")
        # Inline PTX keeps the compiler front end out of the straight-line body (as C++ it took
        # minutes per layer): one shared load per column, one FFMA per nonzero of the column.
        body: List[str] = []
        loads = 0
        for ch in range(min(chunk, c - index * chunk)):
            for r in range(k):
                for s in range(k):
                    column = weight[:, index * chunk + ch, r, s]
                    nonzero = np.nonzero(column)[0]
                    if len(nonzero) == 0:
                        continue
                    offset = index % 2 * buffer_bytes + (ch * slice_floats + r * padded_w + s) * 4
                    body.append(f"ld.shared.f32 v{loads}, [%{group}+{offset}];")
                    body += [f"fma.rn.f32 %{m}, v{loads}, "
                             f"0f{np.float32(column[m]).view(np.uint32):08X}, %{m};"
                             for m in nonzero]
                    loads += 1
        if body:
            emit(f'  asm volatile("{{ .reg .f32 v<{loads}>;\\n"')
            lines.extend(f'    "{instruction}\\n"' for instruction in body)
            emit('    "}" : ' + ", ".join(f'"+f"(acc[{m}])' for m in range(group))
                 + ' : "r"(mine));')
        emit("  __syncthreads();")
    emit("  if (active) {")
    emit(f"    float* out = y + ((size_t)(n * out_channels + {first}) * {oh} + oh0 + row) * {ow}"
         " + col;")
    lines.extend(f"    out[{m * oh * ow}] = acc[{m}];" for m in range(group))
    emit("  }")
    emit("}")
    return Kernel("\n".join(lines), name, first, threads, 2 * buffer_bytes, row_tiles)


def compile_all(kernels: List[Kernel], workdir: str) -> List[str]:
    """nvcc each kernel to a cubin, in parallel (NVRTC from one Python thread serialises)."""
    def build(kernel: Kernel) -> str:
        path = os.path.join(workdir, kernel.name)
        with open(path + ".cu", "w") as f:
            f.write(kernel.source)
        subprocess.run(["nvcc", "-arch=sm_90", "-O3", "-cubin", path + ".cu", "-o",
                        path + ".cubin"], check=True)
        return path + ".cubin"
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        return list(pool.map(build, kernels))


def probe(spec: str, rate: float) -> Dict:
    import cupy as cp
    import torch

    name, batch, group, rows, chunk = spec.split(":")
    layer = next(l for net in LAYERS.values() for l in net if l.name == name)
    if layer.stride != 1:
        raise SystemExit(f"{name}: the probe handles stride 1 only")
    batch, group, rows, chunk = int(batch), int(group), int(rows), int(chunk)
    weight = pruned_weight(layer, 0.9, np.random.default_rng(0))
    kernels = [group_kernel(weight[m:m + group], layer, m, rows, chunk)
               for m in range(0, layer.out_channels, group)]
    started = time.time()
    with tempfile.TemporaryDirectory() as workdir:
        functions = []
        for kernel, cubin in zip(kernels, compile_all(kernels, workdir)):
            function = cp.RawModule(path=cubin).get_function(kernel.name)
            if kernel.shared_bytes > 48 * 1024:
                function.max_dynamic_shared_size_bytes = kernel.shared_bytes
            functions.append((function, kernel))
    compile_s = time.time() - started
    oh = output_size(layer)
    x = cp.random.standard_normal((batch, layer.in_channels, layer.size, layer.size),
                                  dtype=cp.float32)
    y = cp.full((batch, layer.out_channels, oh, oh), cp.nan, dtype=cp.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    # x and y were written on the null stream, which a non-blocking stream does not wait for.
    cp.cuda.Device().synchronize()

    def run() -> None:
        for function, kernel in functions:
            function((batch * kernel.row_tiles,), (kernel.threads,),
                     (x, y, np.int32(layer.out_channels)), shared_mem=kernel.shared_bytes,
                     stream=stream)
    run()
    stream.synchronize()
    x_t, w_t = torch.as_tensor(x, device="cuda"), torch.as_tensor(weight, device="cuda")
    reference = torch.nn.functional.conv2d(x_t.double(), w_t.double(), padding=layer.padding)
    error = float((torch.as_tensor(y, device="cuda").double() - reference).norm()
                  / reference.norm())
    stream.begin_capture()
    run()
    graph = stream.end_capture()
    times = []
    for _ in range(23):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        graph.launch(stream)
        end.record(stream)
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end))
    ms = float(np.median(times[3:]))
    floor_ms = 2.0 * np.count_nonzero(weight) * batch * oh * oh / rate * 1e3
    return dict(spec=spec, kernels=len(kernels), compile_s=compile_s, ms=ms,
                over_floor=ms / floor_ms, rel_err=error)


def main() -> None:
    import torch
    from gpu_timing import fp32_rate

    rate = fp32_rate(torch)
    print(f"strict fp32 matmul {rate / 1e12:.1f} TFLOP/s")
    for spec in sys.argv[1:]:
        r = probe(spec, rate)
        print(f"{r['spec']:<24} kernels {r['kernels']:3d}  compile {r['compile_s']:5.1f} s  "
              f"{r['ms'] * 1e3:8.1f} us  {r['over_floor']:6.2f}x the floor  "
              f"error {r['rel_err']:.1e}", flush=True)


if __name__ == "__main__":
    main()
