"""The main job: compile every zoo model and print eager vs orca latency, the ratio and the error."""
from __future__ import annotations

import time

import torch
from torch.utils import _pytree as pytree

from . import zoo
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
        f"median of {repeats} interleaved runs")
    header = f"{'model':<12}{'compile s':>10}{'eager ms':>10}{'orca ms':>10}{'speedup':>9}{'max abs err':>13}  fallbacks"
    out(header)
    for name in models or zoo.names():
        model, inputs = zoo.get(name)
        t0 = time.perf_counter()
        compiled = orca_compile(model, inputs, pipeline=pipeline, target=target)
        compile_s = time.perf_counter() - t0
        with torch.no_grad():
            error = max_abs_error(model(*inputs), compiled(*inputs))
        times = time_interleaved({"eager": lambda: model(*inputs), "orca": lambda: compiled(*inputs)}, repeats=repeats)
        row = {"model": name, "compile_s": compile_s, "eager_ms": times["eager"] * 1e3, "orca_ms": times["orca"] * 1e3,
               "speedup": times["eager"] / times["orca"], "max_abs_err": error,
               "fallbacks": len(compiled.report.all_fallbacks())}
        rows.append(row)
        out(f"{name:<12}{compile_s:>10.1f}{row['eager_ms']:>10.3f}{row['orca_ms']:>10.3f}{row['speedup']:>8.2f}x"
            f"{error:>13.2e}  {row['fallbacks']}")
    return rows
