"""GPU check of place-memory on CUDA (lowering/streaming_cuda.py), to run where a GPU is lent.

    python tools/gpu_check_placement.py [--models mlp transformer ...] [--deadline 400] [--repeats 20]

For each zoo model (smallest compile first) it compiles for target="cuda" with the model and its
example inputs on the GPU, at budgets of 100% (nothing streamed: the baseline), 50% and 25% of the
weights' bytes (or the minimum the error names, where 25% is below it), with policy=prefetch and
policy=naive and the default CUDA tiers (device / host / disk: streamed weights homed in pinned
host memory), plus 50% with every streamed weight homed on disk (tiers with a 1-byte host tier:
the weights file and the pinned staging buffer). For each it checks:
- the outputs against eager PyTorch on the GPU (max abs error within ATOL + RTOL * |eager|);
- that the program streams through a CudaWeightStream with a device arena;
- after a warm-up call, over one call: the pool's high-water mark <= its capacity (the pass's
  pool_bytes), bytes moved == the plan's bytes_moved, copies == weights streamed;
and prints ms per call (median of --repeats, each synchronized) and the slowdown against 100%.
Then activation spilling (lowering/spilling_cuda.py) on --spill-models: each compiled with
`activation_budget` at its minimum (spilled activations in pinned host memory), checked against
eager over two calls, its CudaSpillFile's bytes against the pass's spilled_bytes, and timed
against the same model unspilled.
It stops starting new models once --deadline seconds have passed (default 400, well under the
8 minutes a device check may take) and says which it skipped. Exit status 1 if any check failed.

Written without a GPU: it has not run yet. What it checks is what tests/test_placement_cuda.py
checks against a fake device, now with torch's CUDA streams, events and pinned memory.
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
import traceback

import torch
from torch.utils import _pytree as pytree

ATOL, RTOL = 1e-3, 1e-3
# smallest compile first, so that a deadline cuts the slow ones
ORDER = ["mlp", "transformer", "mobilenet", "resnet", "gru", "lstm", "gru_bidir", "lstm_bidir"]


def _to_cuda(value):
    return pytree.tree_map(lambda t: t.cuda() if isinstance(t, torch.Tensor) else t, value)


def _max_error(expected, got) -> tuple[float, bool]:
    """(max abs error, within tolerance) over all output leaves."""
    worst, ok = 0.0, True
    for e, g in zip(pytree.tree_leaves(expected), pytree.tree_leaves(got)):
        if not isinstance(e, torch.Tensor):
            continue
        diff = (e.float() - g.float()).abs()
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
        ok &= bool((diff <= ATOL + RTOL * e.float().abs()).all())
    return worst, ok


def _ms_per_call(compiled, inputs, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        compiled(*inputs)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _compile(oc, model, inputs, budget: str, policy: str, tiers: str | None):
    """The compiled module at `budget`; where it is below the model's minimum, at that minimum."""
    options = f"budget={budget},policy={policy}" + (f",tiers={tiers}" if tiers else "")
    try:
        return oc.compile(model, inputs, target="cuda", pipeline=f"O1,place-memory{{{options}}}",
                          kernels="tvm", cache="off", eager_guard=False), budget
    except oc.OrcaError as exc:
        found = re.search(r"minimum feasible budget is (\d+) bytes", str(exc))
        if found is None:
            raise
        budget = found.group(1)
        options = f"budget={budget},policy={policy}" + (f",tiers={tiers}" if tiers else "")
        return oc.compile(model, inputs, target="cuda", pipeline=f"O1,place-memory{{{options}}}",
                          kernels="tvm", cache="off", eager_guard=False), budget


def check_model(oc, name: str, repeats: int) -> list[dict]:
    from orca_compiler import zoo
    from orca_compiler.lowering.streaming import stream_of
    from orca_compiler.lowering.streaming_cuda import CudaWeightStream

    model, inputs = zoo.get(name)
    model, inputs = model.cuda().eval(), _to_cuda(inputs)
    with torch.no_grad():
        expected = model(*inputs)
    rows = []
    variants = [("100%", "prefetch", None)] + [(b, p, None) for b in ("50%", "25%") for p in ("prefetch", "naive")]
    variants.append(("50%", "prefetch", "device:1T@1T;host:1@12G;disk:1T@1G"))  # every streamed weight on disk
    base_ms = None
    for budget, policy, tiers in variants:
        row = {"model": name, "budget": budget, "policy": policy, "homes": "disk" if tiers else "default"}
        try:
            compiled, used = _compile(oc, model, inputs, budget, policy, tiers)
            row["budget"] = used if used == budget else f"{used} (min)"
            stats = compiled.report.passes[-1].stats
            row.update(streamed=stats.get("streamed", 0), host=stats.get("tier_host", 0), disk=stats.get("tier_disk", 0))
            err, ok = _max_error(expected, compiled(*inputs))  # the first call (wrap-around weights read in it)
            torch.cuda.synchronize()
            err2, ok2 = _max_error(expected, compiled(*inputs))  # a call after a call
            row["max_err"], problems = max(err, err2), [] if ok and ok2 else ["outputs differ from eager"]
            stream = stream_of(compiled)
            if budget != "100%":
                if not isinstance(stream, CudaWeightStream):
                    problems.append(f"streams through {type(stream).__name__}, not CudaWeightStream")
                else:
                    stream.settle()
                    torch.cuda.synchronize()
                    stream.reset_counters()
                    compiled(*inputs)
                    stream.settle()
                    torch.cuda.synchronize()
                    pool = stream.pool
                    if not stream.arena:
                        problems.append("no device arena (a buffer per copy)")
                    if not 0 < pool.high_water <= pool.capacity == stats["pool_bytes"]:
                        problems.append(f"high water {pool.high_water} vs capacity {pool.capacity} (plan {stats['pool_bytes']})")
                    if pool.bytes_moved != stats["bytes_moved"] or pool.copies != stats["streamed"]:
                        problems.append(f"moved {pool.bytes_moved} in {pool.copies} copies, plan {stats['bytes_moved']} "
                                        f"in {stats['streamed']}")
            row["ms"] = _ms_per_call(compiled, inputs, repeats)
            if budget == "100%":
                base_ms = row["ms"]
            row["slowdown"] = row["ms"] / base_ms if base_ms else float("nan")
            row["ok"], row["problems"] = not problems, problems
        except Exception as exc:  # report and go on: one failure should not hide the other results
            row["ok"], row["problems"] = False, [f"{type(exc).__name__}: {exc}".splitlines()[0][:300]]
            traceback.print_exc(limit=4)
        rows.append(row)
        print(_format(row), flush=True)
    return rows


def check_spills(oc, name: str, repeats: int) -> dict:
    """The model at its minimum activation budget on CUDA against eager and against itself unspilled."""
    from orca_compiler import zoo
    from orca_compiler.lowering.spilling import spill_file_of
    from orca_compiler.lowering.spilling_cuda import CudaSpillFile

    model, inputs = zoo.get(name)
    model, inputs = model.cuda().eval(), _to_cuda(inputs)
    with torch.no_grad():
        expected = model(*inputs)
    row, problems = {"model": name}, []
    try:
        def build(options):
            return oc.compile(model, inputs, target="cuda", pipeline=f"O1,place-memory{{budget=100%{options}}}",
                              kernels="tvm", cache="off", eager_guard=False)

        try:
            build(",activation_budget=1000")
            raise AssertionError("an activation budget of 1,000 bytes compiled")
        except oc.OrcaError as exc:
            minimum = re.search(r"minimum feasible activation budget is (\d+) bytes", str(exc)).group(1)
        spilled, plain = build(f",activation_budget={minimum}"), build("")
        stats = spilled.report.passes[-1].stats
        row.update(minimum=int(minimum), spilled=stats["spilled"], spilled_bytes=stats["spilled_bytes"])
        spill_file = spill_file_of(spilled)
        if not isinstance(spill_file, CudaSpillFile):
            problems.append(f"spills through {type(spill_file).__name__}, not CudaSpillFile")
        for _ in range(2):
            spill_file.reset_counters()
            err, ok = _max_error(expected, spilled(*inputs))
            torch.cuda.synchronize()
            row["max_err"] = max(row.get("max_err", 0.0), err)
            if not ok:
                problems.append("outputs differ from eager")
            moved = spill_file.stats()
            if not moved["bytes_spilled"] == moved["bytes_reloaded"] == stats["spilled_bytes"]:
                problems.append(f"moved {moved}, plan {stats['spilled_bytes']} bytes")
        row["ms"], row["ms_unspilled"] = _ms_per_call(spilled, inputs, repeats), _ms_per_call(plain, inputs, repeats)
    except Exception as exc:  # report and go on
        problems.append(f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
        traceback.print_exc(limit=4)
    row["ok"], row["problems"] = not problems, problems
    print(f"spill {name:<11} min {row.get('minimum', '-')} B, {row.get('spilled', '-')} spills of "
          f"{row.get('spilled_bytes', '-')} B: {row.get('ms', float('nan')):.3f} ms vs "
          f"{row.get('ms_unspilled', float('nan')):.3f} unspilled, max err {row.get('max_err', float('nan')):.1e}  "
          f"{'ok' if row['ok'] else 'FAIL: ' + '; '.join(problems)}", flush=True)
    return row


def _format(row: dict) -> str:
    ms = f"{row['ms']:.3f}" if "ms" in row else "-"
    slow = f"{row['slowdown']:.2f}x" if "slowdown" in row else "-"
    err = f"{row['max_err']:.1e}" if "max_err" in row else "-"
    return (f"{row['model']:<11} {row['budget']:<14} {row['policy']:<8} {row['homes']:<7} "
            f"{row.get('streamed', '-'):>8} {row.get('host', '-'):>10} {row.get('disk', '-'):>10} {ms:>9} {slow:>8} "
            f"{err:>8}  {'ok' if row['ok'] else 'FAIL: ' + '; '.join(row['problems'])}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=ORDER)
    parser.add_argument("--deadline", type=float, default=400.0, help="seconds after which no new model starts")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--spill-models", nargs="*", default=["transformer", "hourglass"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device (torch.cuda.is_available() is False): nothing to check", file=sys.stderr)
        return 2
    import orca_compiler as oc

    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, "
          f"{torch.cuda.mem_get_info()[0] / 2**30:.1f} GiB free")
    print(f"{'model':<11} {'budget':<14} {'policy':<8} {'homes':<7} {'streamed':>8} {'host B':>10} {'disk B':>10} "
          f"{'ms/call':>9} {'vs 100%':>8} {'max err':>8}  check")
    start, rows, skipped = time.perf_counter(), [], []
    for name in args.models:
        if time.perf_counter() - start > args.deadline:
            skipped.append(name)
            continue
        rows += check_model(oc, name, args.repeats)
    for name in args.spill_models:
        if time.perf_counter() - start > args.deadline:
            skipped.append(f"spill {name}")
            continue
        rows.append(check_spills(oc, name, args.repeats))
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} checks passed in {time.perf_counter() - start:.0f} s"
          + (f"; skipped (deadline): {', '.join(skipped)}" if skipped else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
