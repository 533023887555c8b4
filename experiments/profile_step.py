"""Where the ResNet50 training step spends its time, per op, in XLA:CPU and in PyTorch.

    python experiments/profile_step.py --size 64 --batch 128 --steps 3 --rounds 2 \
        --json experiments/results/profile_64.json

XLA: the bare jit step (cifar_flax.bench.bare_step, the `flax_bare` benchmark row; the real step
runs the same network ops) is traced with ``jax.profiler`` (a Perfetto trace). Each executed HLO
thunk's time is attributed through the compiled HLO: a thunk that contains a convolution (or the
matmuls of models.MatmulConv) is a convolution; its ``metadata.op_name`` names
the Flax module (``stage2/block1/conv2``) and, with ``transpose(...)``, the backward pass; a
backward convolution whose output has as many elements as the module's kernel is the weight
gradient, else the input gradient. Thunks of BatchNorm modules are BatchNorm; everything else
(ReLU, adds, pooling, loss, the SGD update, layout copies) is "rest". XLA fuses BatchNorm's
elementwise parts into neighbouring fusions; a fusion counts where its root op comes from.

PyTorch: ``torch.profiler`` on the `torch` benchmark row's step, self CPU time per aten op with
input shapes: ``convolution`` (forward) and ``convolution_backward`` (input and weight gradient
in one oneDNN call), ``batch_norm`` forward and backward, the rest.

Both run the same network at the same batch; each framework is timed in ``--rounds`` rounds and
the round with the fastest step counts (the machine may be shared). Prints a markdown table of
milliseconds per step by convolution shape and direction.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import math
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax

from cifar_flax.bench import bare_step
from cifar_flax.bench.workload import LR, MOMENTUM, NUM_CLASSES, Workload, stage_sizes

Key = tuple  # (kh, kw, cin, cout, input H): one convolution shape

_CONV_PATH = re.compile(r"/((?:stem|stage\d/block\d+)/(?:conv\d?|proj_conv))/")
_BN_PATH = re.compile(r"/((?:stem|stage\d/block\d+)/(?:bn\d?|proj_bn))/")
_SHAPE = re.compile(r"= \w+\[([\d,]*)\]")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


# ------------------------------------------------------------------------------------- XLA


def conv_shapes(model: Any, variables: dict, x: Any) -> dict[str, dict]:
    """``{"stage1/block1/conv2": {kernel, stride, key}}`` for every convolution of the model,
    read by intercepting each nn.Conv call on an abstract forward pass."""
    found = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, nn.Conv) and context.method_name == "__call__":
            path = "/".join(module.path)
            x_in = args[0]
            found[path] = {"in_hw": int(x_in.shape[1]), "stride": int(module.strides[0]),
                           "cin": int(x_in.shape[-1]), "cout": int(module.features),
                           "k": int(module.kernel_size[0])}
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
                       variables, x)
    for info in found.values():
        info["kernel_size"] = info["k"] * info["k"] * info["cin"] * info["cout"]
        info["key"] = (info["k"], info["k"], info["cin"], info["cout"], info["in_hw"])
    return found


def hlo_index(hlo: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(instruction name -> its line, computation name -> its lines) of an HLO module's text."""
    lines, comps, current = {}, collections.defaultdict(list), None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if head:
            current = head.group(1)
            continue
        m = re.match(r"^\s*(?:ROOT )?%(\S+) = ", line)
        if m and current:
            lines[m.group(1)] = line
            comps[current].append(line)
    return lines, comps


def _called_lines(line: str, comps: dict[str, list[str]], depth: int = 0) -> list[str]:
    """The lines of every computation ``line`` calls, recursively."""
    out = []
    for name in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", line):
        for inner in comps.get(name, []):
            out.append(inner)
            if depth < 4:
                out += _called_lines(inner, comps, depth + 1)
    return out


def classify_thunk(line: str, comps: dict, convs: dict[str, dict]) -> tuple[str, Any]:
    """(category, convolution key or None) for one executed HLO instruction."""
    body = [line] + _called_lines(line, comps)
    conv_lines = [s for s in body if " convolution(" in s or " dot(" in s]
    names = [n for s in conv_lines + [line] for n in _OP_NAME.findall(s)]
    op_name = next((n for n in names if _CONV_PATH.search("/" + n + "/")), names[0] if names else "")
    backward = "transpose(" in op_name
    conv = _CONV_PATH.search("/" + op_name + "/")
    if conv_lines and conv and conv.group(1) in convs:
        info = convs[conv.group(1)]
        if not backward:
            return "fwd", info["key"]
        out = _SHAPE.search(conv_lines[-1])
        size = math.prod(int(d) for d in out.group(1).split(",") if d) if out else -1
        return ("wgrad" if size == info["kernel_size"] else "dgrad"), info["key"]
    if conv_lines and " convolution(" in "".join(conv_lines):
        key = _weight_grad_key(conv_lines[-1], convs)
        return ("wgrad", key) if key else ("conv (unattributed)", None)
    if _BN_PATH.search("/" + op_name + "/"):
        return ("BatchNorm bwd" if backward else "BatchNorm fwd"), None
    return "rest", None


def _weight_grad_key(line: str, convs: dict[str, dict]) -> Key | None:
    """The conv shape of a weight-gradient convolution that XLA rewrote without metadata.

    XLA:CPU computes a weight gradient as a convolution of the activations (batch as the
    contracted feature) with the output gradient as the window: its result is the kernel as
    (cin, kh, kw, cout) and its window is the output map.
    """
    out, window = _SHAPE.search(line), re.search(r"window=\{size=(\d+)x", line)
    if not out or not window:
        return None
    dims = [int(d) for d in out.group(1).split(",") if d]
    if len(dims) != 4:
        return None
    cin, kh, _, cout = dims
    for info in convs.values():
        out_hw = -(-info["in_hw"] // info["stride"])
        if (info["k"], info["cin"], info["cout"]) == (kh, cin, cout) and out_hw == int(
                window.group(1)):
            return info["key"]
    return None


def _trace_durations(trace_dir: str, names: set[str]) -> collections.Counter:
    """Total microseconds per HLO instruction name in a Perfetto trace written by jax.profiler."""
    path = sorted(Path(trace_dir).rglob("*.trace.json.gz"))[-1]
    with gzip.open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    total = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in names:
            total[e["name"]] += float(e.get("dur", 0.0))
    return total


def profile_xla(args: argparse.Namespace) -> dict[str, Any]:
    """Per-op milliseconds per step of the bare jit step (best of ``args.rounds`` rounds)."""
    w = Workload(size=args.size, batch=args.batch, stage_sizes=args.stage_sizes,
                 conv_impl=args.conv_impl)
    fn, state, x, y = bare_step.build(w)
    model_vars = {"params": state[0], "batch_stats": state[1]}
    convs = conv_shapes(bare_step.bare_model(w), model_vars, x)
    compiled = fn.lower(state, x, y).compile()
    lines, comps = hlo_index(compiled.as_text())
    for _ in range(args.warmup):
        state, loss = compiled(state, x, y)
    jax.block_until_ready(loss)
    best = None
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            jax.profiler.start_trace(tmp, create_perfetto_trace=True)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                state, loss = compiled(state, x, y)
            jax.block_until_ready(loss)
            wall = (time.perf_counter() - t0) / args.steps
            jax.profiler.stop_trace()
            durations = _trace_durations(tmp, set(lines))
        if best is None or wall < best[0]:
            best = (wall, durations)
    wall, durations = best
    return _xla_summary(wall, durations, lines, comps, convs, args.steps)


def _xla_summary(wall, durations, lines, comps, convs, steps) -> dict[str, Any]:
    per_conv: dict[Key, dict[str, float]] = collections.defaultdict(collections.Counter)
    other: collections.Counter = collections.Counter()
    rest_ops: collections.Counter = collections.Counter()
    for name, us in durations.items():
        category, key = classify_thunk(lines[name], comps, convs)
        ms = us / 1000.0 / steps
        if key is not None:
            per_conv[key][category] += ms
        else:
            other[category] += ms
            if category == "rest":
                rest_ops[name] += ms
    modules = collections.Counter(info["key"] for info in convs.values())
    strides = {info["key"]: info["stride"] for info in convs.values()}
    return {"step_ms": 1000.0 * wall,
            "convs": {key_str(k): dict(v, modules=modules[k], stride=strides[k])
                      for k, v in per_conv.items()},
            "other": dict(other), "top_rest": dict(rest_ops.most_common(8)),
            "rest_by_kind": _by_kind(rest_ops)}


def _by_kind(ops: collections.Counter) -> dict[str, float]:
    """Rest time by HLO op kind (``transpose_copy_fusion.83`` -> ``transpose_copy_fusion``)."""
    kinds: collections.Counter = collections.Counter()
    for name, ms in ops.items():
        kinds[re.sub(r"\.\d+$", "", name)] += ms
    return dict(kinds.most_common(10))


def key_str(key: Key) -> str:
    """"3x3 64->64 @16x16": kernel, input and output channels, input map."""
    kh, kw, cin, cout, hw = key
    return f"{kh}x{kw} {cin}->{cout} @{hw}x{hw}"


# ------------------------------------------------------------------------------------- torch


def _torch_key(shapes: list) -> Key | None:
    """(kh, kw, cin, cout, H) from an aten convolution op's input shapes (NCHW, OIHW)."""
    four = [s for s in shapes if isinstance(s, list) and len(s) == 4]
    if len(four) == 2:  # forward: input, weight
        x, w = four
    elif len(four) == 3:  # convolution_backward: grad_out, input, weight
        x, w = four[1], four[2]
    else:
        return None
    return (w[2], w[3], w[1], w[0], x[2])


def profile_torch(args: argparse.Namespace) -> dict[str, Any]:
    """Per-op milliseconds per step of the torch row's step (best of ``args.rounds`` rounds)."""
    import torch  # Optional (pip install -e ".[torch]"): only with --frameworks ...,torch.

    from cifar_flax.bench.torch_resnet import ResNet50  # Imports torch too.

    torch.manual_seed(0)
    model = ResNet50(NUM_CLASSES, stage_sizes=args.stage_sizes)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (args.batch,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    best = None
    for _ in range(args.rounds):
        acts = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            wall = (time.perf_counter() - t0) / args.steps
        if best is None or wall < best[0]:
            best = (wall, prof.key_averages(group_by_input_shape=True))
    wall, events = best
    return _torch_summary(wall, events, args.steps)


def _torch_summary(wall, events, steps) -> dict[str, Any]:
    per_conv: dict[str, dict[str, float]] = collections.defaultdict(collections.Counter)
    other: collections.Counter = collections.Counter()
    rest_ops: collections.Counter = collections.Counter()
    for e in events:
        ms = e.self_cpu_time_total / 1000.0 / steps
        name = e.key
        if "convolution" in name:
            direction = "bwd" if "backward" in name else "fwd"
            key = _torch_key(e.input_shapes)
            if key is None:
                other[f"conv {direction} (wrappers)"] += ms
            else:
                per_conv[key_str(key)][direction] += ms
        elif "batch_norm" in name:
            other["BatchNorm bwd" if "backward" in name else "BatchNorm fwd"] += ms
        else:
            other["rest"] += ms
            rest_ops[name] += ms
    return {"step_ms": 1000.0 * wall, "convs": {k: dict(v) for k, v in per_conv.items()},
            "other": dict(other), "top_rest": dict(rest_ops.most_common(8))}


# ------------------------------------------------------------------------------------- table


def format_table(xla: dict[str, Any], torch_: dict[str, Any] | None) -> str:
    """Markdown: ms per step by conv shape and direction, XLA next to PyTorch; then the rest."""
    tc = (torch_ or {}).get("convs", {})
    rows = ["| conv (kernel/stride cin->cout @input map) | n | XLA fwd | XLA input grad | "
            "XLA weight grad | XLA total | torch fwd | torch bwd (both grads) | torch total | "
            "XLA / torch |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    totals = collections.Counter()
    xt_of = {k: sum(v.get(d, 0.0) for d in ("fwd", "dgrad", "wgrad"))
             for k, v in xla["convs"].items()}
    for k in sorted(xla["convs"], key=lambda k: -xt_of[k]):
        v, t = xla["convs"][k], tc.get(k, {})
        tt = t.get("fwd", 0.0) + t.get("bwd", 0.0)
        totals.update({"xla": xt_of[k], "torch": tt})
        label = k.replace(" ", f"/{v['stride']} ", 1)
        rows.append(f"| {label} | {v['modules']} | {v.get('fwd', 0):.1f} | "
                    f"{v.get('dgrad', 0):.1f} | {v.get('wgrad', 0):.1f} | {xt_of[k]:.1f} | "
                    f"{t.get('fwd', 0):.1f} | {t.get('bwd', 0):.1f} | {tt:.1f} | "
                    f"{_ratio(xt_of[k], tt)} |")
    rows.append(f"| **all convolutions** | | | | | **{totals['xla']:.0f}** | | | "
                f"**{totals['torch']:.0f}** | {_ratio(totals['xla'], totals['torch'])} |")
    to = (torch_ or {}).get("other", {})
    for cat in sorted(set(xla["other"]) | set(to)):
        a, b = xla["other"].get(cat, 0.0), to.get(cat, 0.0)
        rows.append(f"| {cat} | | | | | {a:.1f} | | | {b:.1f} | {_ratio(a, b)} |")
    a, b = xla["step_ms"], (torch_ or {}).get("step_ms", 0.0)
    rows.append(f"| **step (wall)** | | | | | **{a:.0f}** | | | **{b:.0f}** | {_ratio(a, b)} |")
    return "\n".join(rows)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b else ""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="traced steps per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="the fastest round counts")
    p.add_argument("--conv-impl", default="auto", choices=["auto", "xla", "im2col"])
    p.add_argument("--frameworks", default="xla,torch")
    p.add_argument("--tiny", action="store_true", help="stage_sizes (1,1,1,1) (tests only)")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    args.stage_sizes = stage_sizes(args.tiny)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    which = set(args.frameworks.split(","))
    xla = profile_xla(args) if "xla" in which else {"convs": {}, "other": {}, "step_ms": 0.0}
    torch_ = profile_torch(args) if "torch" in which else None
    print(f"ResNet50 train step, {args.size}x{args.size}, batch {args.batch}, float32, "
          f"ms per step (best of {args.rounds} rounds of {args.steps} steps)\n")
    print(format_table(xla, torch_))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"config": {k: v for k, v in vars(args).items()},
                                               "xla": xla, "torch": torch_}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
