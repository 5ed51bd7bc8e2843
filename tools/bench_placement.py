"""Benchmark place-memory: latency with the weights' fast-tier budget at 50% and 25% against 100%,
with prefetch (the plan) next to policy=naive (each weight copied when needed).

    python tools/bench_placement.py                          # transformer, resnet, gru_bidir
    python tools/bench_placement.py --models mlp transformer --repeats 50 --json placement.json

Each model is compiled at O1 + `place-memory{budget=B,policy=P}`; where a budget is below the
model's minimum (one layer's weights do not fit) the minimum is used and the row says so. All
variants of a model are timed in one process, interleaved round-robin (orca_compiler.timing),
medians of `--repeats` rounds. The weights file is memory-mapped and, after the first call, in
the page cache: the times measure the copies into the pool and the ops' overhead, not a cold
disk. Also printed: the activation peak with and without buffer reuse (memory_plan), and per
variant the pool's measured high-water mark and the bytes moved per call. Absolute times are
comparable only within one run.
"""
from __future__ import annotations

import argparse
import json
import re

import torch

import orca_compiler as oc
from orca_compiler import zoo
from orca_compiler.errors import PassError
from orca_compiler.lowering.streaming import stream_of
from orca_compiler.memory_plan import plan_activations
from orca_compiler.timing import time_interleaved

VARIANTS = [("100%", "prefetch"), ("50%", "prefetch"), ("50%", "naive"), ("25%", "prefetch"), ("25%", "naive")]


def _compile(model, inputs, budget: str, policy: str):
    """(compiled, budget actually used, note)."""
    pipeline = "O1,place-memory{budget=%s,policy=%s}"
    try:
        return oc.compile(model, inputs, pipeline=pipeline % (budget, policy), cache="off", eager_guard=False), budget, ""
    except PassError as exc:
        match = re.search(r"minimum feasible budget is (\d+) bytes", str(exc))
        if match is None:
            raise
        minimum = match.group(1)
        return (oc.compile(model, inputs, pipeline=pipeline % (minimum, policy), cache="off", eager_guard=False),
                minimum, f"{budget} < minimum")


def bench_model(name: str, repeats: int) -> dict:
    model, inputs = zoo.get(name)
    torch.manual_seed(0)
    variants = {}
    for budget, policy in VARIANTS:
        compiled, used, note = _compile(model, inputs, budget, policy)
        variants[f"{budget} {policy}"] = (compiled, used, note)
    runners = {label: (lambda c: lambda: c(*inputs))(c) for label, (c, _, _) in variants.items()}
    times = time_interleaved(runners, repeats=repeats, warmup=3, block=3)
    base = times["100% prefetch"]
    rows = []
    for label, (compiled, used, note) in variants.items():
        stats = compiled.report.passes[-1].stats
        stream = stream_of(compiled)
        moved = high = 0
        if stream is not None:
            stream.pool.reset_counters()
            compiled(*inputs)
            moved, high = stream.pool.bytes_moved, stream.pool.high_water
        rows.append({"variant": label, "budget": int(stats.get("budget", 0)), "used": used, "note": note,
                     "streamed": int(stats.get("streamed", 0)), "pool": int(stats.get("pool_bytes", 0)),
                     "pool_high_water": high, "bytes_moved": moved, "ms": times[label] * 1e3,
                     "slowdown": times[label] / base})
    ir = variants["100% prefetch"][0].ir
    reuse, no_reuse = plan_activations(ir), plan_activations(ir, reuse=False)
    return {"model": name, "weight_bytes": ir.weight_bytes(), "activation_peak_reuse": reuse.peak,
            "activation_peak_no_reuse": no_reuse.peak, "rows": rows}


def print_result(result: dict) -> None:
    print(f"\n{result['model']}: weights {result['weight_bytes']:,} bytes; activation peak "
          f"{result['activation_peak_reuse']:,} with reuse, {result['activation_peak_no_reuse']:,} without")
    print(f"{'variant':<14}{'budget':>11}{'streamed':>9}{'pool':>11}{'pool peak':>11}{'moved/call':>12}"
          f"{'ms':>9}{'slowdown':>10}  note")
    for r in result["rows"]:
        print(f"{r['variant']:<14}{r['budget']:>11,}{r['streamed']:>9}{r['pool']:>11,}{r['pool_high_water']:>11,}"
              f"{r['bytes_moved']:>12,}{r['ms']:>9.3f}{r['slowdown']:>9.2f}x  {r['note']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["transformer", "resnet", "gru_bidir"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    results = []
    for name in args.models:
        results.append(bench_model(name, args.repeats))
        print_result(results[-1])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
