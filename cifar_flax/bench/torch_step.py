"""The `torch` benchmark row: PyTorch eager on torch_resnet.ResNet50 (torchvision layout),
channels_last, SGD momentum; autocast for bfloat16; CUDA when present."""

from __future__ import annotations

import argparse

from cifar_flax.bench.timing import time_steps
from cifar_flax.bench.workload import LR, MOMENTUM, NUM_CLASSES, require


def run(args: argparse.Namespace) -> dict:
    """Time PyTorch's forward + backward + update on one batch already on the device."""
    require("torch", "torch")
    import torch

    from cifar_flax.bench.torch_resnet import ResNet50

    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = ResNet50(NUM_CLASSES, stage_sizes=args.stage_sizes).to(dev)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (args.batch,), device=dev)
    loss_fn = torch.nn.CrossEntropyLoss()
    amp = args.dtype == "bfloat16"

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

    timing = time_steps(step, sync, args.warmup, args.steps)
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
