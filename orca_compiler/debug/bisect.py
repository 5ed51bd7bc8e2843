"""Bisection (LLVM's opt-bisect): the first pass whose output exceeds a tolerance, then the node in it.

Assumes an error, once introduced, survives the later passes (as opt-bisect does): the prefix
length is found by binary search over `StopAfter(n)`, which skips every pass from the n-th on.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field

import torch

from ..instruments import Instrument
from ..ir import GraphIR
from ..pass_base import PassContext
from ..pass_manager import PassManager
from .numerics import compare_outputs, max_abs_of, node_values


class StopAfter(Instrument):
    """Run only the first `limit` passes of the pipeline (`should_run` is False from then on)."""

    def __init__(self, limit: int):
        self.limit = limit

    def should_run(self, index, pass_, ir) -> bool:
        return index < self.limit


@dataclass
class NodeBlame:
    """The first node whose value differs by more than the tolerance after the pass.

    `new_inputs` are inputs of that node that did not exist (by name) before the pass.
    """

    node: str
    max_abs: float
    new_inputs: list[str] = field(default_factory=list)
    matched: bool = True  # False: no same-named node before the pass; blamed as the first new node

    def describe(self) -> str:
        text = f"%{self.node} (max abs error {self.max_abs:.3e}"
        if not self.matched:
            text += ", a new node with nothing of its name before the pass to compare with"
        if self.new_inputs:
            text += ", new inputs " + ", ".join(f"%{n}" for n in self.new_inputs)
        return text + ")"


@dataclass
class BisectResult:
    """The verdict: `pass_index` / `pass_name` (None when no pass exceeds `tol`), the errors and the node."""

    pipeline: str
    tol: float
    num_passes: int
    pass_index: int | None = None
    pass_name: str | None = None
    error_before: float = 0.0
    error_after: float = 0.0
    node: NodeBlame | None = None
    runs: int = 0
    ir_before: GraphIR | None = field(default=None, repr=False)  # the culprit's input, for a reproducer

    def verdict(self) -> str:
        """One line saying which pass and node first exceed the tolerance, or that none does."""
        if self.pass_index is None:
            return (f"bisect: no pass exceeds tol {self.tol:g} (max abs error after all {self.num_passes} "
                    f"passes: {self.error_after:.3e})")
        if self.pass_index < 0:
            return f"bisect: the captured IR already exceeds tol {self.tol:g} (max abs error {self.error_after:.3e})"
        where = f", first diverging node {self.node.describe()}" if self.node else ", no single node diverges"
        return (f"bisect: pass #{self.pass_index} '{self.pass_name}' is the first to exceed tol {self.tol:g} "
                f"(max abs error {self.error_before:.3e} before it, {self.error_after:.3e} after it){where}")

    def reproduce(self, model_spec: str) -> str:
        """The `orca debug` command that runs the pipeline up to the culprit and dumps its diff."""
        base = f"orca debug {shlex.quote(model_spec)} --pipeline {shlex.quote(self.pipeline)}"
        if self.pass_index is None or self.pass_index < 0:
            return f"{base} --numerics"
        return (f"{base} --opt-bisect-limit {self.pass_index + 1} --numerics "
                f"--print-ir-after={self.pass_name}")


def _run_prefix(manager: PassManager, ir: GraphIR, inputs: tuple, limit: int) -> GraphIR:
    ctx = PassContext(example_inputs=tuple(inputs), instruments=[StopAfter(limit)])
    return manager.run(ir, ctx)[0]


def first_diverging_node(before: GraphIR, after: GraphIR, inputs: tuple, tol: float) -> NodeBlame | None:
    """The first node of `after` (graph order) whose value differs from its same-named node in `before`.

    Nodes are matched by name; a node with no same-named counterpart (or a different shape) is not
    compared. If no matched node differs by more than `tol` (max abs), the first new node of
    `after` is blamed instead; None when there is none either.
    """
    old, new = node_values(before, inputs), node_values(after, inputs)
    for node in after.graph.nodes:
        if node.op != "call_function" or node.name not in old:
            continue
        errors = compare_outputs(old[node.name], new[node.name])
        worst = max_abs_of(errors)
        if errors and worst > tol:
            inputs_new = [a.name for a in node.all_input_nodes if a.name not in old]
            return NodeBlame(node.name, worst, inputs_new)
    for node in after.graph.nodes:
        if node.op in ("call_function", "get_attr") and node.name not in old:
            return NodeBlame(node.name, float("nan"), matched=False)
    return None


def bisect_pipeline(ir: GraphIR, pipeline: str, inputs: tuple, reference, tol: float) -> BisectResult:
    """Find the first pass of `pipeline` after which the IR's outputs on the flat `inputs` differ
    from `reference` (eager outputs) by more than `tol` (max abs), then the node within it."""
    manager = PassManager(pipeline)
    result = BisectResult(manager.text, tol, len(manager.passes))
    cache: dict[int, tuple[GraphIR, float]] = {}

    def error_after(limit: int) -> float:
        if limit not in cache:
            out_ir = _run_prefix(manager, ir, inputs, limit)
            cache[limit] = (out_ir, max_abs_of(compare_outputs(reference, out_ir.run(*inputs))))
        return cache[limit][1]

    result.error_after = error_after(result.num_passes)
    if result.error_after <= tol:
        result.runs = len(cache)
        return result
    if error_after(0) > tol:
        result.pass_index, result.error_after, result.runs = -1, error_after(0), len(cache)
        return result
    good, bad = 0, result.num_passes
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if error_after(mid) <= tol else (good, mid)
    result.pass_index, result.pass_name = bad - 1, manager.passes[bad - 1].name
    result.error_before, result.error_after = error_after(good), error_after(bad)
    result.node = first_diverging_node(cache[good][0], cache[bad][0], inputs, tol)
    result.ir_before = cache[good][0]
    result.runs = len(cache)
    return result


def reference_outputs(model, inputs: tuple):
    """The eager model's outputs (no grad)."""
    with torch.no_grad():
        return model(*inputs)


