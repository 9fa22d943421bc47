"""The layer suite every escoin benchmark measures: VGG16, ResNet-50 and AlexNet conv shapes."""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, NamedTuple

import numpy as np


class Layer(NamedTuple):
    name: str
    in_channels: int
    out_channels: int
    size: int  # input height = width
    kernel: int
    stride: int
    padding: int


LAYERS: Dict[str, List[Layer]] = {
    "vgg16": [
        Layer("vgg.c1_2", 64, 64, 224, 3, 1, 1),
        Layer("vgg.c2_1", 64, 128, 112, 3, 1, 1),
        Layer("vgg.c2_2", 128, 128, 112, 3, 1, 1),
        Layer("vgg.c3_1", 128, 256, 56, 3, 1, 1),
        Layer("vgg.c3_2", 256, 256, 56, 3, 1, 1),
        Layer("vgg.c4_1", 256, 512, 28, 3, 1, 1),
        Layer("vgg.c4_2", 512, 512, 28, 3, 1, 1),
        Layer("vgg.c5_2", 512, 512, 14, 3, 1, 1),
    ],
    "resnet50": [
        Layer("rn.l1.3x3", 64, 64, 56, 3, 1, 1),
        Layer("rn.l2.3x3", 128, 128, 28, 3, 1, 1),
        Layer("rn.l3.3x3", 256, 256, 14, 3, 1, 1),
        Layer("rn.l4.3x3", 512, 512, 7, 3, 1, 1),
        Layer("rn.l2.3x3s2", 128, 128, 56, 3, 2, 1),
        Layer("rn.l1.1x1up", 64, 256, 56, 1, 1, 0),
        Layer("rn.l3.1x1dn", 1024, 256, 14, 1, 1, 0),
        Layer("rn.l4.1x1up", 512, 2048, 7, 1, 1, 0),
    ],
    "alexnet": [
        Layer("alex.c2", 64, 192, 27, 5, 1, 2),
        Layer("alex.c3", 192, 384, 13, 3, 1, 1),
        Layer("alex.c4", 384, 256, 13, 3, 1, 1),
    ],
}


def layers(nets: Iterable[str]) -> List[Layer]:
    return [layer for net in nets for layer in LAYERS[net]]


def pruned_weight(layer: Layer, sparsity: float, rng: np.random.Generator,
                  block: int = 1) -> np.ndarray:
    """Random pruning: each weight survives with probability 1 - sparsity (block 1:
    unstructured), or in blocks of `block` consecutive output channels that keep weights at the
    same places (channels block * k .. block * k + block - 1, as block pruning leaves them)."""
    shape = (layer.out_channels, layer.in_channels, layer.kernel, layer.kernel)
    weight = rng.standard_normal(shape, dtype=np.float32)
    blocks = (-(-layer.out_channels // block), *shape[1:])
    kept = rng.random(blocks, dtype=np.float32) >= sparsity
    return weight * np.repeat(kept, block, axis=0)[:layer.out_channels]


def output_size(layer: Layer) -> int:
    return (layer.size + 2 * layer.padding - layer.kernel) // layer.stride + 1


def sparse_flops(nnz: int, batch: int, layer: Layer) -> float:
    """2 * nnz * N * OH * OW: the arithmetic a sparse convolution cannot avoid."""
    return 2.0 * nnz * batch * output_size(layer) ** 2


def geomean(values: Iterable[float]) -> float:
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")
