"""Memory placement passes. `schedule-memory`: reorder execution to lower the activation peak;
`place-memory`: home each weight on a memory tier under a budget, and stream the others (and,
with `activation_budget`, spill activations across the gaps where nothing reads them:
placement_spill.py).

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
The streamed weight's get_attr is annotated with its home tier (`{tier=disk}`, or on CUDA
`{tier=host}` / `{tier=disk}`), a resident one with the fastest tier's name. The default tiers
follow the compile target (ctx.config["target_kind"], set by orca_compiler.compile). With
split=true, a layer whose weight keeps the working set over the budget is first split into blocks
of output units that stream one by one, by the table SPLIT_RULES: linears and O2's linear
epilogues by weight rows (an epilogue's residual sliced to match), embeddings by table columns,
convolutions and conv epilogues by output channels (not grouped or transposed ones); the blocks'
results are concatenated. With pipeline=true (and policy=prefetch) a layer whose copy nothing
hides (the first layer's: no compute precedes it) is split further where the estimate says the
blocks' copies, each behind the blocks before it, save time (split_for_overlap). The pass
only decides and annotates: the lowering runs the three ops on the host, against a bounded pool
(orca_compiler/lowering/streaming.py). It should run last: a later reordering would move ops
away from the prefetches planned around them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.fx as fx

from orca_compiler.errors import PassInputError
from orca_compiler.ir import GraphIR
from orca_compiler.memory_plan import storage_of, is_view, liveness, plan_activations
from orca_compiler.ops import fused
from orca_compiler.ops import quant as quant_ops
from orca_compiler.ops.placement import FETCH, PLACEMENT_OPS, PREFETCH, RELEASE, SPILL_OPS
from orca_compiler.ops.pointwise import POINTWISE, arguments
from orca_compiler.pass_base import Pass, PassContext, PassResult, register_pass
from orca_compiler.placement import (PREFETCH_MIN_OVERLAP, Placement, Tier, default_tiers, overheads_for, parse_budget,
                                     parse_bytes, parse_tiers, placement_chain, plan_with_homes, tensor_anchor, tier_bytes)
from orca_compiler.pool_regions import regions_fit

from .placement_spill import spill_to_fit

aten = torch.ops.aten


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


@dataclass(frozen=True)
class SplitRule:
    """How an op splits into blocks of its weight's output units, each block its own op on a slice
    of the weight, concatenated along the result's `out_dim`.

    `weight_dim` is the weight's dim of output units (linear rows, embedding columns, conv output
    channels); the bias, if any, and the `per_unit` weights (a quantized linear's scales) are
    sliced along their dim 0 with it. `sliced` names arguments cut
    like the result (an epilogue's residual, added per block). `refuse(args)` says why an op may not
    be split (grouped convs, whose blocks would each read a slice of the input's channels), or None.
    Each block computes the same dot products as the whole, so results are equal up to summation
    order; an epilogue's activation is elementwise (ops/pointwise.py), so it applies per block."""

    weight_dim: int
    out_dim: int
    unit: str  # names the blocks: %linear_rows0, %embedding_cols16, ...
    sliced: tuple[str, ...] = ()
    refuse: Callable[[dict], str | None] = lambda args: None
    weight_arg: str = "weight"  # the argument holding the weight ("qweight" for quantized ops)
    per_unit: tuple[str, ...] = ()  # weights with one row per unit, sliced like the bias (scales)


def _grouped(args: dict) -> str | None:
    if args.get("transposed"):
        return "a transposed convolution"
    return f"a grouped convolution (groups={args['groups']})" if args["groups"] != 1 else None


def _not_elementwise(args: dict) -> str | None:
    act = args["activation"]
    elementwise = act == fused.NO_ACTIVATION or (act in POINTWISE and POINTWISE[act].activation)
    return None if elementwise else f"fused with {act}, which is not elementwise"


_CONV = SplitRule(0, 1, "channels", refuse=_grouped)
SPLIT_RULES: dict[Callable, SplitRule] = {
    aten.linear.default: SplitRule(0, -1, "rows"),
    fused.LINEAR_EPILOGUE: SplitRule(0, -1, "rows", sliced=("residual",), refuse=_not_elementwise),
    aten.embedding.default: SplitRule(1, -1, "cols"),
    aten.conv1d.default: _CONV,
    aten.conv2d.default: _CONV,
    aten.conv3d.default: _CONV,
    aten.convolution.default: _CONV,
    fused.CONV_EPILOGUE: SplitRule(0, 1, "channels", sliced=("residual",),
                                   refuse=lambda args: _grouped(args) or _not_elementwise(args)),
    # quantized linears: int8 / packed int4 rows with their per-row (or per-row-group) scales; a
    # dynamic linear's smoothing factor is per input column, shared by the blocks as it is
    quant_ops.LINEAR_WQ: SplitRule(0, -1, "rows", weight_arg="qweight", per_unit=("scales",)),
    quant_ops.LINEAR_DQ: SplitRule(0, -1, "rows", weight_arg="qweight", per_unit=("wscale",)),
}


def _position(node: fx.Node, name: str) -> int:
    return [a.name for a in node.target._schema.arguments].index(name)


def splittable(weight: fx.Node) -> tuple[fx.Node, SplitRule] | str:
    """(the op, its rule) where `weight` is the weight of its only reader, an op of SPLIT_RULES
    whose bias (if any) is a weight read by that op alone; else why not (a sentence)."""
    users = list(weight.users)
    if len(users) != 1:
        return f"%{weight.name} has {len(users)} readers"
    op = users[0]
    rule = SPLIT_RULES.get(op.target)
    if rule is None:
        return f"%{op.name} ({op.target}) has no split rule"
    args = arguments(op)
    if args[rule.weight_arg] is not weight:
        return f"%{weight.name} is not the weight of %{op.name}"
    for name in ("bias", *rule.per_unit):
        value = args.get(name)
        if value is not None and (not isinstance(value, fx.Node) or value.op != "get_attr" or len(value.users) != 1):
            return f"the {name} of %{op.name} is not a weight of its own"
    for name in rule.sliced:
        value = args.get(name)
        if value is not None and tuple(value.meta["val"].shape) != tuple(op.meta["val"].shape):
            return f"the {name} of %{op.name} is broadcast"
    why = rule.refuse(args)
    return f"%{op.name} is {why}" if why else (op, rule)


def split_op(ir: GraphIR, op: fx.Node, rule: SplitRule, blocks: int) -> None:
    """op(.., W, b, ..) -> cat([op(.., W[units_i], b[units_i], ..) for each block], out_dim): each
    block's weight streams on its own, so one layer can be larger than the pool."""
    args = arguments(op)
    weight = ir.weight(args[rule.weight_arg])
    units = weight.shape[rule.weight_dim]
    out_rank = op.meta["val"].dim()
    origin = op.meta.get("orca_split_of", op.name)
    parts, slices = [], []
    with ir.graph.inserting_before(op):
        for i in range(blocks):  # sizes differ by at most one unit
            start, end = i * units // blocks, (i + 1) * units // blocks
            new = {rule.weight_arg: ir.add_weight(f"{args[rule.weight_arg].target}_{rule.unit}{start}",
                                                  weight.narrow(rule.weight_dim, start, end - start).clone())}
            for name in ("bias", *rule.per_unit):
                if args.get(name) is not None:
                    new[name] = ir.add_weight(f"{args[name].target}_{rule.unit}{start}", ir.weight(args[name])[start:end].clone())
            for name in rule.sliced:
                if args.get(name) is not None:
                    new[name] = ir.create_node(aten.slice.Tensor, (args[name], rule.out_dim % out_rank, start, end),
                                               name=f"{args[name].name}_{rule.unit}{start}")
                    slices.append(new[name])
            call_args, call_kwargs = list(op.args), dict(op.kwargs)
            for name, value in new.items():
                at = _position(op, name)
                if at < len(call_args):
                    call_args[at] = value
                else:
                    call_kwargs[name] = value
            parts.append(ir.create_node(op.target, tuple(call_args), call_kwargs, name=f"{op.name}_{rule.unit}{start}"))
        cat = ir.create_node(aten.cat.default, (parts, rule.out_dim), name=f"{op.name}_cat")
    # the layer each node comes from, so that split_to_fit counts a block split again as one layer
    # (the pass manager marks the new nodes {from=place-memory})
    for node in [*parts, *slices, cat]:
        node.meta["orca_split_of"] = origin
    op.replace_all_uses_with(cat)
    ir.graph.erase_node(op)
    ir.drop_unused_weights()


def split_to_fit(ir: GraphIR, budget: int) -> tuple[int, list[str]]:
    """Split the layers whose weights keep the working set over `budget` into blocks of at most
    half of what the budget leaves them (so two blocks can be in flight). Returns how many layers
    were split, and why the largest weight of a working set still over the budget was not."""
    from orca_compiler.placement import weight_uses, working_set

    split: set[str] = set()
    while True:
        uses = weight_uses(ir)
        need, step = working_set(uses, len(ir.compute_nodes()))
        if need <= budget or sum(w.nbytes for w in uses) <= budget:
            return len(split), []
        live = sorted((w for w in uses if w.first <= step <= w.last), key=lambda w: -w.nbytes)
        found = [(w, splittable(w.node)) for w in live]
        target = next(((w, s) for w, s in found if not isinstance(s, str)), None)
        if target is None:
            return len(split), [s for _, s in found[:1]]
        w, (op, rule) = target
        room = (budget - (need - w.nbytes)) // 2
        units = ir.weight(w.node).shape[rule.weight_dim]
        if room < w.nbytes // units or units < 2:
            return len(split), [f"%{w.name}: one of its {units} {rule.unit} "
                                f"({w.nbytes // units:,} bytes) is more than half of the {max(2 * room, 0):,} bytes "
                                f"the budget leaves it"]
        split.add(op.meta.get("orca_split_of", op.name))
        per_block = room // (w.nbytes // units)  # then no block of the balanced split is over `room`
        split_op(ir, op, rule, max(2, -(-units // per_block)))


def lowest_split_budget(ir: GraphIR, budget: int) -> int:
    """The lowest budget over `budget` at which split_to_fit brings the largest working set of
    `ir` (not split yet) within it, by bisection (each try splits a copy: well under a second on
    the zoo models). Splits depend on the budget, so the error of a budget too small names this
    minimum, not the working set of the layers as split for that budget."""
    from orca_compiler.placement import weight_uses, working_set

    def split_need(b: int) -> int:
        trial = ir.copy()
        split_to_fit(trial, b)
        return working_set(weight_uses(trial), len(trial.compute_nodes()))[0]

    low, high = budget, working_set(weight_uses(ir), len(ir.compute_nodes()))[0]  # high fits unsplit
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if split_need(mid) <= mid else (mid, high)
    return high


def _named(ir: GraphIR, name: str) -> fx.Node:
    return next(n for n in ir.graph.nodes if n.name == name)


def split_for_overlap(ir: GraphIR, options: "PlaceMemoryOptions", plan: Placement, target_kind: str = "cpu",
                      tries: int = 8) -> tuple[GraphIR, Placement, int]:
    """Pipeline the copies that nothing hides: where the main thread waits for a streamed weight
    (the first layer's, which no compute precedes, or one the pool had no room to prefetch), split
    its layer into 2, 4 or 8 blocks, so that the first block's copy is all that waits and each
    next block's is prefetched behind the blocks before it. A split is kept only where the plan's
    estimate (which counts the fixed cost of each block and each cut, `Overheads`) drops by more
    than 2% and by PREFETCH_MIN_OVERLAP at least (the estimate's copies and ops are rough: a split
    of a sub-millisecond model saves less than its extra ops and cuts cost); the largest wait is
    tried first, at most `tries` times. Returns the IR (a split copy of `ir`, or `ir` itself), its
    plan and how many layers were split."""
    from orca_compiler.placement import stalls

    split, refused = 0, set()
    for _ in range(tries):
        waits = stalls(plan, plan.tiers[-1].bandwidth)
        candidates = [(seconds, name) for name, seconds in waits.items()
                      if seconds > 0 and name not in refused and not isinstance(splittable(_named(ir, name)), str)]
        if not candidates:
            break
        _, name = max(candidates)
        best = None
        for blocks in (2, 4, 8):
            trial = ir.copy()
            op, rule = splittable(_named(trial, name))
            if trial.weight(_named(trial, name)).shape[rule.weight_dim] < blocks:
                break
            split_op(trial, op, rule, blocks)
            try:
                trial_plan = plan_for(trial, options, target_kind)
            except PassInputError:
                continue
            if best is None or trial_plan.estimated_seconds < best[1].estimated_seconds:
                best = (trial, trial_plan)
        if best is None or best[1].estimated_seconds > min(0.98 * plan.estimated_seconds,
                                                           plan.estimated_seconds - PREFETCH_MIN_OVERLAP):
            refused.add(name)
            continue
        (ir, plan), split = best, split + 1
    return ir, plan, split


@dataclass
class PlaceMemoryOptions:
    """budget: the fast tier's bytes for weights (bytes, 512K / 2M, or a percentage of the
    weights' bytes such as 50%; default: the fast tier's capacity); tiers: fastest first,
    name:capacity@bandwidth joined by ';' (default: this machine's ram and disk, or for a CUDA
    target its device, host and disk); policy:
    "prefetch" (copies ahead of use on a background thread) or "naive" (each copy when needed);
    split: split a layer whose weight keeps the working set over the budget into blocks of
    output units (SPLIT_RULES: linears, linear and conv epilogues, embeddings, convolutions);
    pipeline: with split and policy=prefetch, also split a layer whose copy the plan cannot hide
    into blocks whose copies overlap the blocks before them (split_for_overlap);
    activation_budget: the fast tier's bytes for activations (bytes, 64K, or a percentage of the
    planned activation peak such as 50%; default: no bound), reached by spilling activations to
    the tier below the fastest (disk on CPU, pinned host memory on CUDA) across the gaps where
    nothing reads them (placement_spill)."""

    budget: str = ""
    tiers: str = ""
    policy: Literal["prefetch", "naive"] = "prefetch"
    split: bool = True
    pipeline: bool = True
    activation_budget: str = ""


def tiers_for(options: PlaceMemoryOptions, target_kind: str = "cpu") -> list[Tier]:
    """The tiers option, or the default tiers of the compile target ("cpu" or "cuda")."""
    return parse_tiers(options.tiers) if options.tiers else default_tiers(target_kind)


def plan_for(ir: GraphIR, options: PlaceMemoryOptions, target_kind: str = "cpu") -> Placement:
    """The placement plan of `ir` under `options` (what the pass writes into the IR), each
    streamed weight with its home tier."""
    tiers = tiers_for(options, target_kind)
    budget = parse_budget(options.budget, ir.weight_bytes(), tiers[0])
    return plan_with_homes(ir, budget, tiers, options.policy, overheads=overheads_for(target_kind))


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
    for w in plan.streamed:  # a pass may have created the weight mid-graph (fold-bn): prefetches may come earlier
        nodes[0].prepend(w.node)
    chain: list[fx.Node] = []  # the previous placement op: every one takes it, so their order is kept
    tokens, fetched, ancestors, anchors = {}, {}, {}, {}
    for step, kind, w in placement_chain(plan):
        before = nodes[step] if step < len(nodes) else ir.output_node()
        # the latest tensor computed before this step: a prefetch is not issued before it exists
        if step not in anchors:
            anchors[step] = next((n for n in reversed(nodes[:step]) if isinstance(n.meta.get("val"), torch.Tensor)), None)
        anchor = anchors[step]
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
        home = plan.home.get(w.name, plan.tiers[-1].name)
        w.node.meta.setdefault("orca_annotations", {})["tier"] = home if w in plan.streamed else plan.tiers[0].name


_MINIMUM = re.compile(r"; the minimum feasible budget is (\d+) bytes \([\d,]+\)")


@register_pass
class PlaceMemory(Pass):
    """Home weights and activations on memory tiers under budgets: stream weights with prefetch/fetch/release ops, spill idle activations."""

    name = "place-memory"
    Options = PlaceMemoryOptions

    def run(self, ir: GraphIR, ctx: PassContext) -> PassResult:
        if any(n.target in PLACEMENT_OPS | SPILL_OPS for n in ir.compute_nodes()):
            return PassResult(ir, False, {})  # placed already
        split, unsplit = 0, []
        target_kind = ctx.config.get("target_kind", "cpu")
        activation_budget, peak_before = self.activation_budget(ir)
        # spilled copies go one tier down: disk on CPU (a mapped file), pinned host memory on CUDA
        tier = tiers_for(self.options, target_kind)[1].name
        # spill before planning the weights (which plan with the activations' steps); checked after
        gaps = spill_to_fit(ir, activation_budget, tier, strict=False) if activation_budget is not None else []
        if self.options.split:
            tiers = tiers_for(self.options, target_kind)
            budget, unsplit_ir = parse_budget(self.options.budget, ir.weight_bytes(), tiers[0]), ir.copy()
            split, unsplit = split_to_fit(ir, budget)
        try:
            plan = plan_for(ir, self.options, target_kind)
        except PassInputError as exc:
            if not unsplit:
                raise
            message = f"{exc}; not split: {'; '.join(unsplit)}"
            found = _MINIMUM.search(message)
            if found:  # split differently, a budget lower than this IR's working set may fit
                lowest = lowest_split_budget(unsplit_ir, budget)
                if lowest != int(found.group(1)):
                    message = message.replace(found.group(0), "") + (
                        f"; splitting layers, the minimum feasible budget is {lowest} bytes ({lowest:,})")
            raise PassInputError(message) from exc
        pipelined = 0
        if plan.streamed and self.options.split and self.options.pipeline and self.options.policy == "prefetch":
            ir, plan, pipelined = split_for_overlap(ir, self.options, plan, target_kind)
        stats = {"split": split, "pipelined": pipelined, "budget": plan.budget, "resident_bytes": plan.resident_bytes, "streamed": len(plan.streamed),
                 "pool_bytes": plan.pool_bytes, "bytes_moved": plan.bytes_moved, "min_budget": plan.min_budget,
                 "segments": len(plan.segments), "prefetched": len(plan.prefetch_at), "wrapped": len(plan.wrapped),
                 # whether the pool's regions fit one arena (else the runtime gives each copy its own buffer)
                 "arena": regions_fit(plan) if plan.streamed else True,
                 # the roofline estimate of the copies' time not hidden behind compute, per call
                 "est_stall_us": round((plan.estimated_seconds - plan.compute_seconds) * 1e6, 1),
                 # bytes of weights homed on each tier (resident on the fastest), e.g. tier_host
                 **{f"tier_{name}": n for name, n in tier_bytes(plan).items()}}
        if plan.streamed:
            insert_streaming(ir, plan)
        if activation_budget is not None:
            gaps += spill_to_fit(ir, activation_budget, tier)  # the blocks of a split layer are activations too
            stats.update({"activation_budget": activation_budget, "activation_peak_before": peak_before,
                          "activation_peak": plan_activations(ir).peak, "spilled": len(gaps),
                          "spilled_bytes": sum(g.nbytes for g in gaps)})  # each spilled copy is read back once
        ir.recompile()
        return PassResult(ir, bool(plan.streamed or gaps), stats)

    def activation_budget(self, ir: GraphIR) -> tuple[int | None, int]:
        """(activation_budget in bytes, the planned activation peak before placement); (None, 0)
        where the option is not given."""
        text = self.options.activation_budget.strip()
        if not text:
            return None, 0
        peak = plan_activations(ir).peak
        try:
            return (int(peak * float(text[:-1]) / 100) if text.endswith("%") else parse_bytes(text)), peak
        except ValueError as exc:
            raise PassInputError(f"activation_budget={text}: {exc}") from exc
