"""Benchmark place-memory: latency with the weights' fast-tier budget at 50% and 25% against 100%,
with prefetch (the plan), the plan without pipelining (`pipeline=false`: no layer split only to
overlap its copy) and policy=naive (each weight copied when its segment starts), in three read
modes: "direct" (the runtime's default: O_DIRECT reads from the disk into the pool, no page
cache), and buffered reads with the weights file in the page cache ("hot") or dropped from it
before every call ("cold": the copies read the disk through the page cache).

    python tools/bench_placement.py                               # transformer, resnet, gru_bidir, mlp:512
    python tools/bench_placement.py --models mlp:512 --modes direct cold --repeats 20 --json placement.json

A model is `name` or `name:N`, which repeats the zoo example along dim 0 up to N (more compute per
byte of weights, where prefetching has something to hide the copies behind). Each variant is
compiled at O1 + `place-memory{budget=B,...}`; where a budget is below the model's minimum
(one layer's weights do not fit) the minimum is used and the row says so. All variants of a model
are timed in one process, interleaved round-robin, medians of `--repeats` rounds; in cold mode
the page cache is dropped (WeightStream.evict) before each call, outside the timed region. The
modes run one after another, each with all variants interleaved.

Printed per variant: the layers split for overlap (`piped`), whether the pool is one arena, the
pool, its measured peak and the bytes moved per call, the time and the slowdown against 100%, and from the stream's own clocks (medians per call) `copy`, the time the
copies took, and `wait`, the time the main thread waited for weights in fetches; `hidden` is
1 - wait / copy, the share of the transfer time that prefetching kept off the critical path
(with policy=naive the main thread does the copies itself: wait >= copy), and `direct`, the share
of the bytes read with O_DIRECT (heads and tails of regions are read buffered). Also the activation
peak with and without buffer reuse (memory_plan). Absolute times are comparable only within one
run.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import time

import torch

import orca_compiler as oc
from orca_compiler import zoo
from orca_compiler.errors import PassError
from orca_compiler.lowering.streaming import stream_of
from orca_compiler.memory_plan import plan_activations

# (label, budget, place-memory options): the plan, the plan without pipelining, and naive
VARIANTS = [("100% prefetch", "100%", "policy=prefetch")] + [
    (f"{budget} {label}", budget, options) for budget in ("50%", "25%")
    for label, options in (("prefetch", "policy=prefetch"), ("no-pipe", "policy=prefetch,pipeline=false"),
                           ("naive", "policy=naive"))]
DEFAULT_MODELS = ["transformer", "resnet", "gru_bidir", "mlp:512"]


def _compile(model, inputs, budget: str, options: str):
    """(compiled, budget actually used, note)."""
    pipeline = "O1,place-memory{budget=%s,%s}"
    try:
        return oc.compile(model, inputs, pipeline=pipeline % (budget, options), cache="off", eager_guard=False), budget, ""
    except PassError as exc:
        match = re.search(r"minimum feasible budget is (\d+) bytes", str(exc))
        if match is None:
            raise
        minimum = match.group(1)
        return (oc.compile(model, inputs, pipeline=pipeline % (minimum, options), cache="off", eager_guard=False),
                minimum, f"{budget} < minimum")


def model_and_inputs(spec: str):
    """`name` or `name:N`: the zoo model and its example, repeated along dim 0 up to N rows."""
    name, _, rows = spec.partition(":")
    model, inputs = zoo.get(name)
    if rows:
        inputs = tuple(x.repeat(-(-int(rows) // x.shape[0]), *[1] * (x.dim() - 1))[:int(rows)] for x in inputs)
    return model, inputs


def set_mode(variants: dict, mode: str) -> None:
    """Direct reads in mode "direct", buffered reads (page cache) in "hot" and "cold"."""
    for compiled, _, _ in variants.values():
        stream = stream_of(compiled)
        if stream is not None and stream.set_direct_io(mode == "direct") != (mode == "direct"):
            raise SystemExit("this file system refuses O_DIRECT: run --modes hot cold")


def time_variants(variants: dict, inputs, repeats: int, cold: bool) -> dict[str, dict[str, float]]:
    """Median seconds per call, and the stream's copy and wait seconds per call, of each variant."""
    samples = {label: {"seconds": [], "copy": [], "wait": []} for label in variants}
    with torch.no_grad():
        for round_ in range(repeats + 3):  # three warm-up rounds
            for label, (compiled, _, _) in variants.items():
                stream = stream_of(compiled)
                if stream is not None:
                    if cold:
                        stream.evict()
                    stream.reset_counters()
                start = time.perf_counter()
                compiled(*inputs)
                seconds = time.perf_counter() - start
                if round_ < 3:
                    continue
                samples[label]["seconds"].append(seconds)
                if stream is not None:
                    stats = stream.stats()
                    samples[label]["copy"].append(stats["copy_seconds"])
                    samples[label]["wait"].append(stats["wait_seconds"])
    return {label: {k: statistics.median(v) if v else 0.0 for k, v in s.items()} for label, s in samples.items()}


def bench_model(spec: str, repeats: int, modes: list[str]) -> dict:
    model, inputs = model_and_inputs(spec)
    torch.manual_seed(0)
    variants = {label: _compile(model, inputs, budget, options) for label, budget, options in VARIANTS}
    result = {"model": spec, "modes": {}}
    for mode in modes:
        set_mode(variants, mode)
        times = time_variants(variants, inputs, repeats, cold=mode == "cold")
        base = times["100% prefetch"]["seconds"]
        rows = []
        for label, (compiled, used, note) in variants.items():
            stats = compiled.report.passes[-1].stats
            stream = stream_of(compiled)
            moved = high = direct = 0
            if stream is not None:
                stream.reset_counters()
                compiled(*inputs)
                moved, high, direct = stream.pool.bytes_moved, stream.pool.high_water, stream.pool.direct_bytes
            t = times[label]
            rows.append({"variant": label, "budget": int(stats.get("budget", 0)), "used": used, "note": note,
                         "streamed": int(stats.get("streamed", 0)), "segments": int(stats.get("segments", 0)),
                         "pipelined": int(stats.get("pipelined", 0)), "arena": stream.pool.arena if stream else None,
                         "pool": int(stats.get("pool_bytes", 0)), "pool_high_water": high, "bytes_moved": moved,
                         "direct": direct / moved if moved else None,
                         "ms": t["seconds"] * 1e3, "slowdown": t["seconds"] / base, "copy_ms": t["copy"] * 1e3,
                         "wait_ms": t["wait"] * 1e3,
                         "hidden": 1 - t["wait"] / t["copy"] if t["copy"] > 0 else None})
        result["modes"][mode] = rows
    ir = variants["100% prefetch"][0].ir
    reuse, no_reuse = plan_activations(ir), plan_activations(ir, reuse=False)
    result.update(weight_bytes=ir.weight_bytes(), activation_peak_reuse=reuse.peak, activation_peak_no_reuse=no_reuse.peak)
    return result


def print_result(result: dict) -> None:
    print(f"\n{result['model']}: weights {result['weight_bytes']:,} bytes; activation peak "
          f"{result['activation_peak_reuse']:,} with reuse, {result['activation_peak_no_reuse']:,} without")
    for mode, rows in result["modes"].items():
        print(f"[{mode}] {'variant':<13}{'budget':>11}{'streamed':>9}{'segs':>5}{'piped':>6}{'arena':>6}{'pool':>11}{'pool peak':>11}"
              f"{'moved/call':>12}{'ms':>9}{'slowdown':>9}{'copy ms':>9}{'wait ms':>9}{'hidden':>8}{'direct':>8}  note")
        for r in rows:
            hidden = "" if r["hidden"] is None else f"{r['hidden']:.0%}"
            direct = "" if r["direct"] is None else f"{r['direct']:.0%}"
            arena = "" if r["arena"] is None else "yes" if r["arena"] else "no"
            print(f"{'':7}{r['variant']:<13}{r['budget']:>11,}{r['streamed']:>9}{r['segments']:>5}{r['pipelined']:>6}{arena:>6}{r['pool']:>11,}"
                  f"{r['pool_high_water']:>11,}{r['bytes_moved']:>12,}{r['ms']:>9.3f}{r['slowdown']:>8.2f}x"
                  f"{r['copy_ms']:>9.3f}{r['wait_ms']:>9.3f}{hidden:>8}{direct:>8}  {r['note']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=DEFAULT_MODELS)
    parser.add_argument("--modes", nargs="*", default=["direct", "hot", "cold"], choices=["direct", "hot", "cold"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    results = []
    for spec in args.models:
        results.append(bench_model(spec, args.repeats, args.modes))
        print_result(results[-1])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
