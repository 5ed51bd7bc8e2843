"""Measure our rule-based CPU schedules (orca_compiler/lowering/cpu_schedules.py) on small ops.

For each case: torch eager, TVM's default pipeline (`tvm.compile(mod, target)`), and TVM with
`relax_pipeline=cpu_pipeline(target)`; median ms per call over interleaved rounds, and the max
abs error of each TVM build against eager.

    python tools/schedule_probe.py [--cases add_relu,softmax] [--threads 2] [--rounds 7]

TVM's thread pool is configured before first use: as many threads as torch, no core pinning, no
spinning after a parallel kernel (each can be overridden with its TVM_* environment variable).
The machine is shared: expect noise (torch with 2 threads swung from 0.04 to 15 ms per add+relu
while another process held a core); `--threads 1` gives steadier numbers.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


class AddRelu(nn.Module):
    def forward(self, x, y):
        return torch.relu(x + y)


class GeluLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(256)

    def forward(self, x):
        return self.norm(F.gelu(x))


class Softmax(nn.Module):
    def forward(self, x):
        return torch.softmax(x, dim=-1)


class AvgPool(nn.Module):
    def forward(self, x):
        return F.adaptive_avg_pool2d(x, 1)


def _depthwise(channels: int, stride: int) -> nn.Module:
    return nn.Conv2d(channels, channels, 3, stride, 1, groups=channels)


def cases() -> dict:
    """name -> (module, example inputs)."""
    r = torch.randn
    return {
        "add_relu 1x64x56x56": (AddRelu(), (r(1, 64, 56, 56), r(1, 64, 56, 56))),
        "gelu+layer_norm 2x64x256": (GeluLayerNorm(), (r(2, 64, 256),)),
        "softmax 2x4x64x64": (Softmax(), (r(2, 4, 64, 64),)),
        "adaptive_avg_pool 1x512x7x7": (AvgPool(), (r(1, 512, 7, 7),)),
        "max_pool 3x3/2 1x64x112x112": (nn.MaxPool2d(3, 2, 1), (r(1, 64, 112, 112),)),
        "depthwise 3x3 1x32x112x112": (_depthwise(32, 1), (r(1, 32, 112, 112),)),
        "depthwise 3x3/2 1x96x56x56": (_depthwise(96, 2), (r(1, 96, 56, 56),)),
        "linear 8x512->1024": (nn.Linear(512, 1024), (r(8, 512),)),
        "conv 3x3 1x64x56x56 64->64": (nn.Conv2d(64, 64, 3, 1, 1), (r(1, 64, 56, 56),)),
    }


def _per_call_ms(fn, budget_s: float = 0.02) -> tuple[int, float]:
    """Calls per timing block (about `budget_s` each) and the first estimate."""
    fn()
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    return max(1, int(budget_s / max(once, 1e-7))), once * 1e3


def measure(fns: dict, rounds: int) -> dict:
    """Median ms per call of each function, timed in interleaved rounds."""
    plan = {name: _per_call_ms(fn) for name, fn in fns.items()}
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            calls, first = plan[name]
            if first > 200 and samples[name]:  # a slow unscheduled build: a few samples are enough
                continue
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - start) / calls * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def main(argv=None) -> int:
    """Build every case three ways, time them and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="", help="comma-separated name prefixes (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    # Read by TVM when its pool starts (first parallel kernel), so set before any TVM call.
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    # TVM's workers spin (300000 iterations) after each parallel kernel; in these interleaved
    # rounds they took the cores from torch's next call (eager add_relu: 10 ms instead of 0.04).
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from orca_compiler.lowering.cpu_schedules import cpu_pipeline
    from orca_compiler.lowering.target import host_cpu_target

    target = tvm.target.Target(host_cpu_target(args.threads))
    print(f"target {target.attrs['mcpu']}, {args.threads} threads, torch {torch.__version__}, tvm {tvm.__version__}")
    wanted = [c for c in args.cases.split(",") if c]
    torch.manual_seed(0)
    rows = []
    for name, (model, inputs) in cases().items():
        if wanted and not any(name.startswith(w) for w in wanted):
            continue
        model.eval()
        mod = from_exported_program(torch.export.export(model, inputs))
        start = time.perf_counter()
        default_vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
        ours_vm = relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(target)), tvm.cpu())
        build_s = time.perf_counter() - start
        tvm_inputs = [tvm.runtime.from_dlpack(x) for x in inputs]
        with torch.no_grad():
            expected = model(*inputs)
            errors = [
                (torch.from_dlpack(vm["main"](*tvm_inputs)[0]) - expected).abs().max().item()
                for vm in (default_vm, ours_vm)
            ]
            times = measure(
                {
                    "eager": lambda: model(*inputs),
                    "default": lambda: default_vm["main"](*tvm_inputs),
                    "ours": lambda: ours_vm["main"](*tvm_inputs),
                },
                args.rounds,
            )
        rows.append((name, times, errors, build_s))
        print(f"  {name}: done ({build_s:.1f} s to build both)", file=sys.stderr)

    print("\n| case | eager ms | TVM default ms | TVM cpu_pipeline ms | vs default | vs eager "
          "| max abs err default / ours |")
    print("|---|---|---|---|---|---|---|")
    for name, t, (err_default, err_ours), _ in rows:
        print(
            f"| {name} | {t['eager']:.4f} | {t['default']:.4f} | {t['ours']:.4f} | "
            f"{t['default'] / t['ours']:.1f}x | {t['eager'] / t['ours']:.2f}x | {err_default:.1e} / {err_ours:.1e} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
