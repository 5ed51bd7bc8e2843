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

import heapq

import torch.fx as fx

from orca_compiler.ir import GraphIR
from orca_compiler.memory_plan import _storage, is_view, liveness, plan_activations
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
    deps = {n: {_storage(a)[0] if a.op == "call_function" else a for a in n.all_input_nodes} & set(nodes) for n in nodes}
    preds = {n: {a for a in n.all_input_nodes if a in position} for n in nodes}
    readers: dict[fx.Node, set] = {}
    for n in nodes:
        for d in deps[n]:
            readers.setdefault(d, set()).add(n)
    remaining = {n: len(preds[n]) for n in nodes}
    unread = {d: set(r) for d, r in readers.items()}
    outputs = {_storage(v)[0] for v in ir.output_values() if isinstance(v, fx.Node)}

    def cost(n: fx.Node) -> tuple:
        grows = 0 if is_view(n) else size.get(n, 0)
        frees = sum(size.get(d, 0) for d in deps[n] if unread.get(d) == {n} and d not in outputs)
        return (grows - frees, position[n])

    ready = [(cost(n), n.name, n) for n in nodes if remaining[n] == 0]
    heapq.heapify(ready)
    order, done = [], set()
    while ready:
        _, _, n = heapq.heappop(ready)
        if n in done:
            continue
        done.add(n)
        order.append(n)
        for d in deps[n]:
            unread[d].discard(n)
        for user in n.users:
            if user in remaining:
                remaining[user] -= 1
                if remaining[user] == 0:
                    heapq.heappush(ready, (cost(user), user.name, user))
        # costs of ready nodes change as inputs get read: re-rank them
        ready = [(cost(m), m.name, m) for _, _, m in ready if m not in done]
        heapq.heapify(ready)
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
