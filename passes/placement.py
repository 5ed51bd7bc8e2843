"""Memory placement passes. `schedule-memory`: reorder execution to lower the activation peak;
`place-memory`: home each weight on a memory tier under a budget, and stream the others.

The IR's order is the order torch.export traced the Python code in, which can keep large
activations alive longer than needed: two branches whose big intermediates are both computed
before either is reduced hold both at once. `schedule-memory` reschedules the compute nodes with
a greedy list scheduler (of the ready nodes, run the one that adds the fewest live bytes: its
result minus the inputs it is the last reader of) and keeps the new order only when the planned
activation peak (orca_compiler.memory_plan) drops. Only the order changes, so results are equal
bit for bit.

`place-memory{budget=50%,tiers=...,policy=prefetch|naive}` plans with orca_compiler.placement
(the tier model, the choice of resident weights, where prefetches go) and writes the plan into
the IR as ops of orca_compiler/ops/placement.py: for each streamed weight a `prefetch` at its
planned step, a `fetch` before the segment of its first use (its users read the fetched tensor)
and a `release` after the segment of its last use (segments: see orca_compiler.placement).
The streamed weight's get_attr is annotated `{tier=disk}`. With
split=true, an aten.linear whose weight alone keeps the working set over the budget is first split
into row blocks (cat of the blocks' linears) that stream one by one. The pass
only decides and annotates: the lowering runs the three ops on the host, against a bounded pool
(orca_compiler/lowering/streaming.py). It should run last: a later reordering would move ops
away from the prefetches planned around them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx

from orca_compiler.ir import GraphIR
from orca_compiler.memory_plan import storage_of, is_view, liveness, plan_activations
from orca_compiler.ops.placement import FETCH, PLACEMENT_OPS, PREFETCH, RELEASE
from orca_compiler.pass_base import Pass, PassContext, PassResult, register_pass
from orca_compiler.placement import Placement, cpu_tiers, parse_budget, parse_tiers, plan_placement, tensor_anchor


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


def _splittable(weight: fx.Node) -> fx.Node | None:
    """The aten.linear that is `weight`'s only reader, as its weight (bias read by it alone)."""
    users = list(weight.users)
    if len(users) != 1 or users[0].target is not torch.ops.aten.linear.default or users[0].args[1] is not weight:
        return None
    bias = users[0].args[2] if len(users[0].args) > 2 else None
    if bias is not None and (not isinstance(bias, fx.Node) or bias.op != "get_attr" or len(bias.users) != 1):
        return None
    return users[0]


def split_linear(ir: GraphIR, linear: fx.Node, blocks: int) -> None:
    """linear(x, W, b) -> cat([linear(x, W[rows_i], b[rows_i]) for each block of rows], -1): each
    block's weight streams on its own, so one layer can be larger than the pool. The same dot
    products, so the same results up to the kernels' summation order."""
    weight_node, bias_node = linear.args[1], (linear.args[2] if len(linear.args) > 2 else None)
    weight = ir.weight(weight_node)
    bias = ir.weight(bias_node) if bias_node is not None else None
    rows = -(-weight.shape[0] // blocks)
    parts = []
    with ir.graph.inserting_before(linear):
        for start in range(0, weight.shape[0], rows):
            w = ir.add_weight(f"{weight_node.target}_rows{start}", weight[start:start + rows].clone())
            b = ir.add_weight(f"{bias_node.target}_rows{start}", bias[start:start + rows].clone()) if bias is not None else None
            parts.append(ir.create_node(torch.ops.aten.linear.default, (linear.args[0], w, b), name=f"{linear.name}_rows{start}"))
        cat = ir.create_node(torch.ops.aten.cat.default, (parts, -1), name=f"{linear.name}_cat")
    linear.replace_all_uses_with(cat)
    ir.graph.erase_node(linear)
    ir.drop_unused_weights()


def split_to_fit(ir: GraphIR, budget: int) -> int:
    """Split the linear weights that keep the working set over `budget` into row blocks of at most
    half of what the budget leaves them (so two blocks can be in flight). Returns how many."""
    from orca_compiler.placement import weight_uses, working_set

    split = 0
    while True:
        uses = weight_uses(ir)
        need, step = working_set(uses, len(ir.compute_nodes()))
        if need <= budget or sum(w.nbytes for w in uses) <= budget:
            return split
        live = sorted((w for w in uses if w.first <= step <= w.last), key=lambda w: -w.nbytes)
        target = next(((w, _splittable(w.node)) for w in live if _splittable(w.node) is not None), None)
        if target is None:
            return split
        w, linear = target
        room = (budget - (need - w.nbytes)) // 2
        rows = ir.weight(w.node).shape[0]
        row_bytes = w.nbytes // rows
        if room < row_bytes or rows < 2:
            return split
        split_linear(ir, linear, max(2, -(-w.nbytes // room)))
        split += 1


@dataclass
class PlaceMemoryOptions:
    """budget: the fast tier's bytes for weights (bytes, 512K / 2M, or a percentage of the
    weights' bytes such as 50%; default: the fast tier's capacity); tiers: fastest first,
    name:capacity@bandwidth joined by ';' (default: this machine's ram and disk); policy:
    "prefetch" (copies ahead of use on a background thread) or "naive" (each copy when needed);
    split: split a linear layer whose weight alone is over the budget into row blocks."""

    budget: str = ""
    tiers: str = ""
    policy: Literal["prefetch", "naive"] = "prefetch"
    split: bool = True


def plan_for(ir: GraphIR, options: PlaceMemoryOptions) -> Placement:
    """The placement plan of `ir` under `options` (what the pass writes into the IR)."""
    tiers = parse_tiers(options.tiers) if options.tiers else cpu_tiers()
    budget = parse_budget(options.budget, ir.weight_bytes(), tiers[0])
    return plan_placement(ir, budget, tiers, options.policy)


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        for parent in todo.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return seen


def _release_anchor(last_use: fx.Node, segment_end: fx.Node | None, ancestors: dict) -> fx.Node:
    """The tensor a release waits on: the segment's last tensor where the weight's last use is
    among its inputs' inputs (so the release needs nothing that would not cross the partition
    boundary anyway), else a tensor of the last use itself. `ancestors` caches _ancestors."""
    last = tensor_anchor(last_use)
    if segment_end is not None:
        if segment_end not in ancestors:
            ancestors[segment_end] = _ancestors(segment_end)
        if last is segment_end or last in ancestors[segment_end]:
            return segment_end
    return last


def insert_streaming(ir: GraphIR, plan: Placement) -> None:
    """Write the plan into the IR: prefetch / fetch / release nodes on one ordering chain."""
    nodes = ir.compute_nodes()
    events: dict[int, list] = {}
    for w in plan.streamed:
        if w.name in plan.prefetch_at:
            events.setdefault(plan.prefetch_at[w.name], []).append((1, "prefetch", w))
        events.setdefault(plan.fetch_at[w.name], []).append((2, "fetch", w))
        events.setdefault(plan.release_after[w.name] + 1, []).append((0, "release", w))
    for w in plan.streamed:  # a pass may have created the weight mid-graph (fold-bn): prefetches may come earlier
        nodes[0].prepend(w.node)
    chain: list[fx.Node] = []  # the previous placement op: every one takes it, so their order is kept
    tokens, fetched, ancestors = {}, {}, {}
    for step in sorted(events):
        before = nodes[step] if step < len(nodes) else ir.output_node()
        # the latest tensor computed before this step: a prefetch is not issued before it exists
        anchor = next((n for n in reversed(nodes[:step]) if isinstance(n.meta.get("val"), torch.Tensor)), None)
        for _, kind, w in sorted(events[step], key=lambda e: (e[0], e[2].first, e[2].name)):
            with ir.graph.inserting_before(before):
                if kind == "prefetch":
                    deps = chain[-1:] + ([anchor] if anchor is not None else [])
                    node = ir.create_node(PREFETCH, (w.node, deps, plan.pool_bytes), name=f"prefetch_{w.name}")
                    tokens[w.name] = node
                elif kind == "fetch":
                    deps = chain[-1:] + ([tokens[w.name]] if w.name in tokens and tokens[w.name] not in chain[-1:] else [])
                    node = ir.create_node(FETCH, (w.node, deps, plan.pool_bytes), name=f"fetch_{w.name}")
                    for user in list(w.node.users):
                        if user.target not in PLACEMENT_OPS:
                            user.replace_input_with(w.node, node)
                    fetched[w.name] = node
                else:
                    node = ir.create_node(RELEASE, (fetched[w.name], chain[-1:] + [_release_anchor(nodes[w.last], anchor, ancestors)]),
                                          name=f"release_{w.name}")
            node.meta["orca_origin"] = "place-memory"
            chain.append(node)
    for w in plan.weights:
        w.node.meta.setdefault("orca_annotations", {})["tier"] = plan.tiers[-1].name if w in plan.streamed else plan.tiers[0].name


@register_pass
class PlaceMemory(Pass):
    """Home each weight on a memory tier under a budget; stream the rest with prefetch/release ops."""

    name = "place-memory"
    Options = PlaceMemoryOptions

    def run(self, ir: GraphIR, ctx: PassContext) -> PassResult:
        if any(n.target in PLACEMENT_OPS for n in ir.compute_nodes()):
            return PassResult(ir, False, {})  # placed already
        split = 0
        if self.options.split:
            tiers = parse_tiers(self.options.tiers) if self.options.tiers else cpu_tiers()
            split = split_to_fit(ir, parse_budget(self.options.budget, ir.weight_bytes(), tiers[0]))
        plan = plan_for(ir, self.options)
        stats = {"split": split, "budget": plan.budget, "resident_bytes": plan.resident_bytes, "streamed": len(plan.streamed),
                 "pool_bytes": plan.pool_bytes, "bytes_moved": plan.bytes_moved, "min_budget": plan.min_budget,
                 "segments": len(plan.segments), "prefetched": len(plan.prefetch_at), "wrapped": len(plan.wrapped),
                 # the roofline estimate of the copies' time not hidden behind compute, per call
                 "est_stall_us": round((plan.estimated_seconds - plan.compute_seconds) * 1e6, 1)}
        if not plan.streamed:
            return PassResult(ir, False, stats)
        insert_streaming(ir, plan)
        ir.recompile()
        return PassResult(ir, True, stats)
