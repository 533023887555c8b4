"""PyTorch: a plain ResNet50 with torchvision's layout and state-dict key names, and the `torch`
benchmark row that trains it.

The ResNet50 is the reference the torchvision weight conversion is proven against (tests) and
the network of the PyTorch row (:func:`run`: eager, channels_last, SGD momentum; autocast for
bfloat16; CUDA when present). It is written here rather than imported from torchvision so that
both work with torch alone. Requires ``pip install -e .[torch]``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from cifar_flax.bench.workload import LR, MOMENTUM, NUM_CLASSES, Workload, time_steps


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (v1.5: stride in the 3x3 conv)."""

    def __init__(self, inplanes: int, width: int, stride: int, downsample: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 4 * width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if downsample:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, 4 * width, 1, stride=stride, bias=False),
                nn.BatchNorm2d(4 * width),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + identity)


class ResNet50(nn.Module):
    """conv1/bn1/maxpool, layer1..layer4, avgpool, fc: the keys of torchvision's resnet50."""

    def __init__(self, num_classes: int = 1000, stage_sizes: Sequence[int] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for i, n in enumerate(stage_sizes):
            width = 64 * 2**i
            blocks = []
            for b in range(n):
                stride = 2 if (b == 0 and i > 0) else 1
                blocks.append(Bottleneck(inplanes, width, stride, downsample=b == 0))
                inplanes = 4 * width
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled (N, 2048) features from NCHW input already normalised."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def run(w: Workload) -> dict:
    """Time PyTorch's forward + backward + update on one batch already on the device."""
    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = ResNet50(NUM_CLASSES, stage_sizes=w.stage_sizes).to(dev)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    x = torch.randn(w.batch, 3, w.size, w.size, device=dev)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (w.batch,), device=dev)
    loss_fn = torch.nn.CrossEntropyLoss()
    amp = w.dtype == "bfloat16"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss

    def sync(_):
        if dev.type == "cuda":
            torch.cuda.synchronize()

    timing = time_steps(step, sync, w.warmup, w.steps)
    out = {
        "layout": "v1.5 (channels_last)",
        "mode": "eager" + (", autocast bf16" if amp else ""),
        "compile_s": 0.0,
        "final_loss": float(step()),
        "threads": torch.get_num_threads(),
    }
    if dev.type == "cuda":
        out["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return {**out, **timing}
