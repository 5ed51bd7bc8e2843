"""Activation spilling for place-memory's `activation_budget`: lower the fast tier's activation
peak by homing activations on the slow tier across the gaps where nothing reads them.

Each spill writes `orca.spill(x)` right after the activation's last read before a gap and
`orca.reload(spilled)` right before the next read, and points every later reader at the reloaded
copy (orca_compiler.spill_plan finds the gaps and picks them: at the busiest step, the largest
idle activation). Spills are added one at a time until the planned activation arena
(memory_plan.plan_activations, where a spilled copy does not count and a reloaded one does) fits
the budget; a budget that no set of spills reaches is a PassInputError naming the busiest step
and the minimum feasible activation budget. Values are copied, never changed: results equal
the unspilled program's bit for bit.
"""
from __future__ import annotations

import torch.fx as fx

from orca_compiler.ir import GraphIR
from orca_compiler.memory_plan import plan_activations
from orca_compiler.ops.placement import RELOAD, SPILL
from orca_compiler.spill_plan import SpillGap, activation_budget_error, next_spill


def spill_activation(ir: GraphIR, gap: SpillGap, tier: str) -> tuple[fx.Node, fx.Node]:
    """Spill `gap.node` across `gap` to the tier named `tier`: (the spill node, the reload node)."""
    nodes = ir.compute_nodes()
    node = gap.node
    before = nodes[gap.before] if gap.before < len(nodes) else ir.output_node()
    later = set(nodes[gap.before:]) | {ir.output_node()}
    with ir.graph.inserting_after(nodes[gap.after]):
        spilled = ir.create_node(SPILL, (node,), name=f"spill_{node.name}")
    with ir.graph.inserting_before(before):
        reloaded = ir.create_node(RELOAD, (spilled,), name=f"reload_{node.name}")
    for user in list(node.users):
        if user in later:
            user.replace_input_with(node, reloaded)
    for created in (spilled, reloaded):
        created.meta["orca_origin"] = "place-memory"
    spilled.meta.setdefault("orca_annotations", {})["tier"] = tier
    return spilled, reloaded


def spill_to_fit(ir: GraphIR, budget: int, tier: str, strict: bool = True) -> list[SpillGap]:
    """Spill activations (to `tier`) until the planned activation peak is at most `budget` bytes;
    returns the gaps spilled, in order. When no further spill helps: PassInputError if `strict`,
    else return what was spilled (a later pass step may check again)."""
    spilled: list[SpillGap] = []
    # each spill lowers the bytes of an over-budget step and raises none: this ends; the bound
    # only stops spilling against the arena's fragmentation where every step is under budget
    for _ in range(2 * len(ir.compute_nodes()) + 1):
        plan = plan_activations(ir)
        if plan.peak <= budget:
            return spilled
        gap = next_spill(ir, budget, plan)
        if gap is None:
            break
        spill_activation(ir, gap, tier)
        spilled.append(gap)
    else:
        plan = plan_activations(ir)
    if not strict:
        return spilled
    raise activation_budget_error(ir, budget, plan)
