"""The main job: compile every zoo model and print eager vs orca latency, the ratio and the error."""
from __future__ import annotations

import time

import torch
from torch.utils import _pytree as pytree

from . import eager_guard, zoo
from .api import compile as orca_compile
from .timing import time_interleaved


def max_abs_error(expected, actual) -> float:
    """Largest absolute difference over all tensor leaves of two output pytrees."""
    exp, act = pytree.tree_leaves(expected), pytree.tree_leaves(actual)
    return max(((a.float() - e.float()).abs().max().item() for e, a in zip(exp, act)), default=0.0)


def run_demo(models: list[str] | None = None, *, pipeline: str = "O1", target="llvm", repeats: int = 20,
             out=print) -> list[dict]:
    """Compile each model, check it against eager, time both; print a table and return its rows."""
    rows = []
    out(f"orca demo: pipeline {pipeline}, target {target}, torch threads {torch.get_num_threads()}, "
        f"median of at least {repeats} interleaved runs (1 s per model)")
    header = f"{'model':<12}{'compile s':>10}{'eager ms':>10}{'orca ms':>10}{'speedup':>9}{'max abs err':>13}  fallbacks  runs"
    out(header)
    for name in models or zoo.names():
        model, inputs = zoo.get(name)
        t0 = time.perf_counter()
        compiled = orca_compile(model, inputs, pipeline=pipeline, target=target)
        compile_s = time.perf_counter() - t0
        with torch.no_grad():
            error = max_abs_error(model(*inputs), compiled(*inputs))
        # at least a second of rounds (20 rounds of a 0.6 ms model swung by 10% here), each block
        # after a pause that lets the other side's worker threads go idle (as orca bench does)
        times = time_interleaved({"eager": lambda: model(*inputs), "orca": lambda: compiled(*inputs)}, repeats=repeats,
                                 min_seconds=1.0, pause=0.01)
        row = {"model": name, "compile_s": compile_s, "eager_ms": times["eager"] * 1e3, "orca_ms": times["orca"] * 1e3,
               "speedup": times["eager"] / times["orca"], "max_abs_err": error,
               "fallbacks": len(compiled.report.all_fallbacks()),
               "runs": "eager" if eager_guard.ran_eager(compiled) else "compiled"}
        rows.append(row)
        out(f"{name:<12}{compile_s:>10.1f}{row['eager_ms']:>10.3f}{row['orca_ms']:>10.3f}{row['speedup']:>8.2f}x"
            f"{error:>13.2e}  {row['fallbacks']:<9}  {row['runs']}")
    if any(row["runs"] != "compiled" for row in rows):
        out(f"runs = eager: the eager guard timed the compiled program less than {eager_guard.MARGIN:.0%} faster than "
            "eager, so compile() runs the model itself; the difference left is a few microseconds of input checks "
            "and noise")
    return rows
