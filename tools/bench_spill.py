"""Benchmark place-memory's activation spilling: the activation peak and the latency of each model
compiled at O2 against the same program with `activation_budget` at its minimum (the lowest
budget spilling reaches, read from the error of a budget of 0), side by side with eager.

    python tools/bench_spill.py                                  # hourglass, transformer, mobilenet
    python tools/bench_spill.py --models hourglass:8 --repeats 30

A model is `name` or `name:N` (the example repeated along dim 0 up to N rows); `hourglass` is the
experiment model of zoo.get. The variants are timed in one process, interleaved round-robin,
medians of `--repeats` rounds (each the median of 20 calls). Printed per model: the planned
activation peak without and with spilling, the spills and the bytes each call writes to the spill
file and reads back, and the times (the spilled program's slowdown against O2, and eager's).
Absolute times are comparable only within one run.
"""
from __future__ import annotations

import argparse
import re
import statistics
import time

import torch

import orca_compiler as oc
from orca_compiler.errors import PassError

from bench_placement import model_and_inputs


def minimum_activation_budget(model, inputs) -> int:
    """The minimum feasible activation budget of `model` at O2, as place-memory's error names it."""
    try:
        oc.compile(model, inputs, pipeline="O2,place-memory{activation_budget=0}", cache="off", eager_guard=False)
    except PassError as exc:
        return int(re.search(r"minimum feasible activation budget is (\d+) bytes", str(exc)).group(1))
    return 0


def _median_call(fn, inputs, calls: int = 20) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(*inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(spec: str, repeats: int) -> dict:
    """One model's row: peaks, spills, and median times of O2, spilled and eager."""
    model, inputs = model_and_inputs(spec)
    minimum = minimum_activation_budget(model, inputs)
    base = oc.compile(model, inputs, pipeline="O2", cache="off", eager_guard=False)
    spilled = oc.compile(model, inputs, pipeline=f"O2,place-memory{{activation_budget={minimum}}}", cache="off",
                         eager_guard=False)
    stats = next(p.stats for p in spilled.report.passes if p.name == "place-memory")
    variants = {"O2": base, "spilled": spilled, "eager": model}
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for fn in variants.values():
            fn(*inputs)
        for _ in range(repeats):
            for name, fn in variants.items():
                rounds[name].append(_median_call(fn, inputs))
    times = {name: statistics.median(values) for name, values in rounds.items()}
    return {"model": spec, "peak": stats["activation_peak_before"], "spilled_peak": stats["activation_peak"],
            "spills": stats["spilled"], "spilled_bytes": stats["spilled_bytes"], **{f"{k}_ms": v * 1e3 for k, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["hourglass", "transformer", "mobilenet"])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(f"{'model':<14}{'peak':>11}{'spilled':>11}{'ratio':>7}{'spills':>7}{'bytes/call':>12}"
          f"{'O2 ms':>9}{'spilled':>9}{'eager':>8}")
    for spec in args.models:
        row = bench(spec, args.repeats)
        print(f"{row['model']:<14}{row['peak']:>11,}{row['spilled_peak']:>11,}{row['spilled_peak'] / row['peak']:>7.0%}"
              f"{row['spills']:>7}{row['spilled_bytes']:>12,}{row['O2_ms']:>9.3f}"
              f"{row['spilled_ms'] / row['O2_ms']:>8.2f}x{row['eager_ms'] / row['O2_ms']:>7.2f}x")


if __name__ == "__main__":
    main()
