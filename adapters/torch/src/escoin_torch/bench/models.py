"""The benchmark's networks: VGG16, ResNet-50 and AlexNet as torchvision builds them, and LeNet5.

torchvision's own builders are used when it is importable; otherwise the same layer shapes and
initialisations are defined here, so the benchmark measures the same convolutions either way and
needs nothing beyond torch. Initialisation matters even without trained weights: global magnitude
pruning keeps the largest weights across layers, so each layer's resulting sparsity depends on its
initial weight scale (torchvision's Kaiming fan-out for VGG and ResNet, PyTorch's default for
AlexNet), exactly as in torchvision.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

__all__ = ["NETS", "build", "input_shape"]

# name -> (default input size, input channels); LeNet5's size is fixed by its classifier.
_INPUT: Dict[str, Tuple[int, int]] = {"vgg16": (224, 3), "resnet50": (224, 3),
                                      "alexnet": (227, 3), "lenet5": (32, 1)}
NETS: Tuple[str, ...] = tuple(_INPUT)


def build(name: str, seed: int = 0) -> nn.Module:
    """A freshly initialised ``name`` network in eval mode, identical for a given ``seed``."""
    if name not in _INPUT:
        raise ValueError(f"unknown network {name!r}; choose from {', '.join(NETS)}")
    torch.manual_seed(seed)
    return _torchvision_builder(name)().eval() if _has_torchvision(name) \
        else _BUILDERS[name]().eval()


def input_shape(name: str, batch: int, size: Optional[int] = None) -> Tuple[int, int, int, int]:
    """(N, C, H, W) for ``name``: its standard size unless ``size`` overrides it (LeNet5's 32x32
    cannot be overridden: its first linear layer expects 5x5 feature maps)."""
    default, channels = _INPUT[name]
    side = default if size is None or name == "lenet5" else size
    return (batch, channels, side, side)


def _has_torchvision(name: str) -> bool:
    if name == "lenet5":
        return False
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


def _torchvision_builder(name: str) -> Callable[[], nn.Module]:
    import torchvision

    return lambda: getattr(torchvision.models, name)(weights=None)


class LeNet5(nn.Module):
    """LeCun's LeNet5 on 32x32 single-channel images (ReLU and max pooling, as usually trained
    today)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True), nn.Linear(84, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


_VGG16_CONFIG: List[Union[int, str]] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                        512, 512, 512, "M", 512, 512, 512, "M"]


class VGG16(nn.Module):
    """torchvision's ``vgg16`` (configuration D, no batch norm), with its initialisation."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        channels = 3
        for item in _VGG16_CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, int(item), 3, padding=1), nn.ReLU(inplace=True)]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class AlexNet(nn.Module):
    """torchvision's ``alexnet`` (the one-tower variant, PyTorch's default initialisation)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
            nn.Dropout(), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class Bottleneck(nn.Module):
    """torchvision's ResNet-50 block (ResNet v1.5: the stride sits on the 3x3 convolution)."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet50(nn.Module):
    """torchvision's ``resnet50``, with its initialisation."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages: List[nn.Module] = []
        channels = 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            stage, channels = self._stage(channels, width, blocks, stride)
            stages.append(stage)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(in_channels: int, width: int, blocks: int,
               stride: int) -> Tuple[nn.Sequential, int]:
        out_channels = width * Bottleneck.expansion
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels))
        layers = [Bottleneck(in_channels, width, stride, downsample)]
        layers += [Bottleneck(out_channels, width) for _ in range(blocks - 1)]
        return nn.Sequential(*layers), out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


_BUILDERS: Dict[str, Callable[[], nn.Module]] = {"vgg16": VGG16, "resnet50": ResNet50,
                                                 "alexnet": AlexNet, "lenet5": LeNet5}
