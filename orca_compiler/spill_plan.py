"""Where activations can leave the fast tier: the idle gaps in each activation's reads.

An activation is read at some steps after the one that computes it. Between two consecutive reads
(or between its producer and its first read) it only occupies memory. Spilling it across such a
gap (place-memory's `activation_budget`, passes/placement_spill.py) copies it to the slow tier
after the earlier read and back before the later one, so during the gap its bytes are not in the
fast tier. This module finds the gaps and chooses which to spill; the pass rewrites the IR.

A gap qualifies when:
- the activation is one tensor computed by a compute node (not a view, not an element of a
  multi-output op, not a spilled copy itself, not a fetched weight), of a static shape (the spill
  file's regions are sized when the program is bound; a dynamic dimension is not spilled);
- at least one step runs strictly inside it (else nothing is saved);
- every read after it can be pointed at the reloaded copy: each such reader takes the activation
  itself, or a view of it made after the gap (a view made before the gap and read after it would
  keep the activation's bytes alive across the gap).
Model outputs count as read at the end of the program (`steps`), so an output computed early can be
spilled until the end.

Assumes the IR conventions of orca_compiler.ir and the step numbering of memory_plan.liveness.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .errors import PassInputError
from .ir import GraphIR
from .memory_plan import MemoryPlan, _nbytes, is_view, live_bytes_by_step, storage_of
from .ops.placement import FETCH, RELOAD, SPILL


@dataclass(frozen=True)
class SpillGap:
    """An activation (`node`, `nbytes`) idle strictly between steps `after` (its producer or a
    read) and `before` (its next read; `steps` for the program's output)."""

    node: fx.Node
    nbytes: int
    after: int
    before: int

    def covers(self, step: int) -> bool:
        return self.after < step < self.before


def _reads(ir: GraphIR, steps: dict[fx.Node, int]) -> dict[fx.Node, list[tuple[int, fx.Node, fx.Node]]]:
    """storage node -> (step, reader, the argument it reads the storage through) for every read of
    an unindexed activation storage; the output node reads at step len(steps)."""
    reads: dict[fx.Node, list] = {}
    readers = list(steps.items()) + [(ir.output_node(), len(steps))]
    for reader, step in readers:
        for arg in reader.all_input_nodes:
            storage, index = storage_of(arg)
            if index is None and storage in steps:
                reads.setdefault(storage, []).append((step, reader, arg))
    return reads


def _spillable(node: fx.Node) -> bool:
    """One static-shaped tensor of its own (the spill file's regions are sized when it is bound)."""
    val = node.meta.get("val")
    return (isinstance(val, torch.Tensor) and not is_view(node) and node.target not in (SPILL, FETCH)
            and all(isinstance(size, int) for size in val.shape) and _nbytes(val) > 0)


def spill_gaps(ir: GraphIR) -> list[SpillGap]:
    """Every gap of every activation that could be spilled (see the module docstring)."""
    steps = {node: i for i, node in enumerate(ir.compute_nodes())}
    gaps = []
    for node, reads in _reads(ir, steps).items():
        if not _spillable(node):
            continue
        read_steps = sorted({step for step, _, _ in reads})
        for after, before in zip([steps[node]] + read_steps, read_steps):
            if before - after < 2:
                continue
            # after the gap each read must be of the node itself or of a view made after the gap
            if all(arg is node or steps.get(arg, -1) >= before for step, _, arg in reads if step >= before):
                gaps.append(SpillGap(node, _nbytes(node.meta["val"]), after, before))
    return gaps


def next_spill(ir: GraphIR, budget: int, plan: MemoryPlan) -> SpillGap | None:
    """The gap to spill next to bring the activation plan under `budget`: at the busiest step
    whose live activation bytes are over it and that some gap covers (where every step is under
    it and only the arena's fragmentation is over, at the busiest covered step of all), the
    largest activation idle there (the longest gap on ties). Only steps of the model's own ops
    count: a spill or reload op never holds more than the step before or after it. None when no
    gap covers such a step. `plan`: plan_activations(ir)."""
    nodes = ir.compute_nodes()
    live = live_bytes_by_step(plan.lives, len(nodes))
    own = [s for s, node in enumerate(nodes) if node.target not in (SPILL, RELOAD)]
    gaps = spill_gaps(ir)
    for steps in ([s for s in own if live[s] > budget], own):
        for step in sorted(steps, key=lambda s: -live[s]):
            helping = [g for g in gaps if g.covers(step)]
            if helping:
                return max(helping, key=lambda g: (g.nbytes, g.before - g.after))
        if steps:
            return None
    return None


def activation_budget_error(ir: GraphIR, budget: int, plan: MemoryPlan) -> PassInputError:
    """The error for an activation budget that spilling cannot reach: names the busiest step and
    the lowest peak spilling reached (the minimum feasible activation budget; `plan`:
    plan_activations(ir))."""
    peak = plan.peak
    nodes = ir.compute_nodes()
    live = live_bytes_by_step(plan.lives, len(nodes))
    step = max(range(len(nodes)), key=lambda s: live[s])
    held = sorted((t for t in plan.lives if t.first <= step <= t.last), key=lambda t: -t.nbytes)[:3]
    names = ", ".join(f"%{t.name} ({t.nbytes:,})" for t in held)
    return PassInputError(
        f"an activation budget of {budget:,} bytes is too small: at %{nodes[step].name} (step {step}) "
        f"{live[step]:,} bytes of activations must be in the fast tier at once ({names}, ...), and no "
        f"spill helps further; the minimum feasible activation budget is {peak} bytes ({peak:,})")
