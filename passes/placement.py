"""Memory placement passes. `schedule-memory`: reorder execution to lower the activation peak.

The IR's order is the order torch.export traced the Python code in, which can keep large
activations alive longer than needed: two branches whose big intermediates are both computed
before either is reduced hold both at once. `schedule-memory` reschedules the compute nodes with
a greedy list scheduler (of the ready nodes, run the one that adds the fewest live bytes: its
result minus the inputs it is the last reader of) and keeps the new order only when the planned
activation peak (orca_compiler.memory_plan) drops. Only the order changes, so results are equal
bit for bit.
"""
from __future__ import annotations

import torch.fx as fx

from orca_compiler.ir import GraphIR
from orca_compiler.memory_plan import storage_of, is_view, liveness, plan_activations
from orca_compiler.pass_base import Pass, PassContext, PassResult, register_pass


def _bytes_of(ir: GraphIR) -> dict[fx.Node, int]:
    """Activation bytes each compute node allocates (all elements of a multi-output node)."""
    size: dict[fx.Node, int] = {}
    for t in liveness(ir):
        if t.kind == "activation":
            size[t.node] = size.get(t.node, 0) + t.nbytes
    return size


def greedy_order(ir: GraphIR) -> list[fx.Node]:
    """A topological order of the compute nodes that greedily keeps few activation bytes live."""
    nodes = ir.compute_nodes()
    position = {n: i for i, n in enumerate(nodes)}
    size = _bytes_of(ir)
    # the storages each node reads (a view's reader reads its base) and who reads each storage
    deps = {n: {storage_of(a)[0] if a.op == "call_function" else a for a in n.all_input_nodes} & position.keys()
            for n in nodes}
    unread: dict[fx.Node, set] = {}
    for n in nodes:
        for d in deps[n]:
            unread.setdefault(d, set()).add(n)
    waiting = {n: sum(a in position for a in n.all_input_nodes) for n in nodes}
    outputs = {storage_of(v)[0] for v in ir.output_values() if isinstance(v, fx.Node)}

    def cost(n: fx.Node) -> tuple:
        grows = 0 if is_view(n) else size.get(n, 0)
        frees = sum(size.get(d, 0) for d in deps[n] if unread[d] == {n} and d not in outputs)
        return (grows - frees, position[n])

    ready = [n for n in nodes if waiting[n] == 0]
    order = []
    while ready:  # the costs of ready nodes change as their inputs get read: rank them each step
        n = min(ready, key=cost)
        ready.remove(n)
        order.append(n)
        for d in deps[n]:
            unread[d].discard(n)
        for user in n.users:
            if user in waiting:
                waiting[user] -= 1
                if waiting[user] == 0:
                    ready.append(user)
    return order


def apply_order(ir: GraphIR, order: list[fx.Node]) -> None:
    """Move the compute nodes into `order` (weights and inputs stay first, the output last)."""
    out = ir.output_node()
    for n in order:
        out.prepend(n)


@register_pass
class ScheduleMemory(Pass):
    """Reorder execution to lower the activation memory peak (results unchanged)."""

    name = "schedule-memory"

    def run(self, ir: GraphIR, ctx: PassContext) -> PassResult:
        before = plan_activations(ir).peak
        old = ir.compute_nodes()
        order = greedy_order(ir)
        if order == old:
            return PassResult(ir, False, {"peak_before": before, "peak_after": before})
        apply_order(ir, order)
        after = plan_activations(ir).peak
        if after >= before:
            apply_order(ir, old)
            return PassResult(ir, False, {"peak_before": before, "peak_after": before})
        return PassResult(ir, True, {"peak_before": before, "peak_after": after})
