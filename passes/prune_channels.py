"""Structured channel pruning that physically removes channels, heads and hidden units.

The channel dependency analysis (orca_compiler.channel_deps) splits the IR into groups of slots
that must shrink together: a conv's out-channels, its BatchNorm, the next conv's in-channels, the
other branch of a residual add, the columns of a linear after a flatten, the rows of every LSTM
gate. Each group's units (channels, heads, hidden units) are scored by `criterion`, the lowest
`ratio` of them are removed from every weight of the group, and the shape arguments of views,
expands, layer norms and constant tensors are rewritten to the new sizes. Groups that touch a
model input or output, an op without a channel rule, or a protected layer are kept whole.

Criteria: `l1` / `l2` (the norm of each unit's weights over the whole group), `bn-scale` (|gamma|
of the group's BatchNorms; l1 where a group has none), `taylor` (|sum of weight * gradient| per
unit, gradients of the calibration loss: `ctx.config["calibration_data"]` with
`ctx.config["calibration_loss"]`, or the outputs' squared norm when no loss is given) and
`activation` (mean |activation| of the unit on the calibration data). `scope=layer` prunes
`ratio` of every group; `scope=global` ranks all units by importance normalized per group and
removes the lowest `ratio` overall (at most `max_ratio` of any one group).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from orca_compiler.channel_deps import BATCH_NORMS, CONVS, ChannelDependencies, ChannelGroup, analyze, weight_slots
from orca_compiler.errors import PassInputError, PipelineError
from orca_compiler.ir import GraphIR
from orca_compiler.pass_base import Pass, PassContext, PassResult, register_pass

aten = torch.ops.aten
log = logging.getLogger(__name__)

_SHAPE_ARG = {aten.view.default: 1, aten.reshape.default: 1, aten._unsafe_view.default: 1, aten.expand.default: 1,
              aten.zeros.default: 0, aten.ones.default: 0, aten.empty.memory_format: 0, aten.full.default: 0}


@dataclass
class PruneChannelsOptions:
    """ratio: fraction of each group's units to remove (layer scope) or of all units (global);
    criterion: how units are scored; scope: layer or global; protect: ':'-separated fnmatch patterns
    of layer paths or node names whose output channels stay; max_ratio: at most this fraction of one
    group is removed under global scope."""

    ratio: float = 0.5
    criterion: Literal["l1", "l2", "bn-scale", "taylor", "activation"] = "l1"
    scope: Literal["layer", "global"] = "layer"
    protect: tuple[str, ...] = ()
    max_ratio: float = 0.9


# -- importance ------------------------------------------------------------------------------------

def _unit_positions(deps: ChannelDependencies, group: ChannelGroup, slot) -> torch.Tensor:
    return torch.searchsorted(group.units, deps.labels(slot))


def _per_index(tensor: torch.Tensor, dim: int, reduce) -> torch.Tensor:
    moved = tensor.detach().double().movedim(dim, 0).reshape(tensor.shape[dim], -1)
    return reduce(moved)


def _role(node: fx.Node) -> str:
    """'matrix' for conv/linear/embedding/RNN weights, 'gamma' for a norm's scale, else 'other'."""
    for user in node.users:
        if user.target in BATCH_NORMS:
            return "gamma" if user.args[1] is node else "other"
    val = node.meta["val"]
    return "matrix" if val.dim() >= 2 and val.dtype.is_floating_point else "other"


def _group_scores(deps, group, criterion, ir, grads, activations) -> tuple[torch.Tensor, bool]:
    """Importance of each unit of `group` (float64, one per unit) and whether bn-scale fell back."""
    scores = torch.zeros(group.units.numel(), dtype=torch.float64)
    slots = weight_slots(group)
    fell_back = False
    if criterion == "bn-scale":
        gammas = [s for s in slots if _role(s[0]) == "gamma"]
        if gammas:
            for s in gammas:
                scores.index_add_(0, _unit_positions(deps, group, s), ir.weight(s[0]).detach().double().abs())
            return scores, False
        criterion, fell_back = "l1", True
    if criterion == "activation":
        for s in group.slots:
            if s[0] in activations and s[1] is None:
                scores.index_add_(0, _unit_positions(deps, group, s), _per_index(activations[s[0]], s[2], lambda m: m.mean(1)))
        return scores, fell_back
    for s in slots:
        if _role(s[0]) != "matrix":
            continue
        weight = ir.weight(s[0])
        if criterion == "l1":
            value = _per_index(weight.abs(), s[2], lambda m: m.sum(1))
        elif criterion == "l2":
            value = _per_index(weight.square(), s[2], lambda m: m.sum(1))
        else:  # taylor: the first-order change of the loss when the unit's weights are zeroed
            grad = grads.get(s[0].target)
            if grad is None:
                continue
            value = _per_index(weight * grad, s[2], lambda m: m.sum(1))
        scores.index_add_(0, _unit_positions(deps, group, s), value)
    if criterion == "l2":
        scores = scores.sqrt()
    if criterion == "taylor":
        scores = scores.abs()
    return scores, fell_back


def _calibration(ctx: PassContext, criterion: str) -> list:
    data = ctx.config.get("calibration_data")
    if not data:
        raise PassInputError(f"criterion={criterion} needs calibration data "
                        "(compile(..., calibration_data=[inputs, ...]) or pass_config={'calibration_data': ...})")
    return list(data)


def _flat_inputs(item) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(item) if isinstance(t, torch.Tensor)]


def taylor_gradients(ir: GraphIR, ctx: PassContext) -> dict[str, torch.Tensor]:
    """Sum over the calibration data of d loss / d weight, for every conv / linear / embedding /
    RNN weight matrix of the IR."""
    loss_fn = ctx.config.get("calibration_loss")
    matrices = {n.target for n in ir.graph.nodes if n.op == "get_attr" and _role(n) == "matrix"}
    params = {name: w.detach().clone().requires_grad_(name in matrices) for name, w in ir.weights().items()}
    trained = [name for name in params if name in matrices]
    grads = {name: torch.zeros_like(params[name]) for name in trained}
    ir.recompile()
    for item in _calibration(ctx, "taylor"):
        inputs, target = item if loss_fn is not None else (item, None)
        with torch.enable_grad():
            outputs = torch.func.functional_call(ir.gm, params, tuple(_flat_inputs(inputs)))
            outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
            if loss_fn is not None:
                loss = loss_fn(pytree.tree_unflatten(list(outputs), ir.out_spec) if ir.out_spec else outputs[0], target)
            else:
                loss = sum(0.5 * o.float().square().sum() for o in outputs if o.dtype.is_floating_point)
            step = torch.autograd.grad(loss, [params[name] for name in trained], allow_unused=True)
        for name, g in zip(trained, step):
            if g is not None:
                grads[name] += g
    return grads


def mean_activations(ir: GraphIR, ctx: PassContext, nodes: set[fx.Node]) -> dict[fx.Node, torch.Tensor]:
    """Mean |value| of each node in `nodes` over the calibration data (same shape as the value)."""
    sums: dict[fx.Node, torch.Tensor] = {}
    count = 0

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if n in nodes and isinstance(result, torch.Tensor) and result.dtype.is_floating_point:
                sums[n] = sums.get(n, 0) + result.detach().abs().double()
            return result

    ir.recompile()
    with torch.no_grad():
        for item in _calibration(ctx, "activation"):
            Recorder(ir.gm).run(*_flat_inputs(item))
            count += 1
    return {n: s / count for n, s in sums.items()}


# -- choosing the units ----------------------------------------------------------------------------

def _slot_units(deps: ChannelDependencies, group: ChannelGroup) -> list[torch.Tensor]:
    """For each slot of the group, the positions (in group.units) of the units it holds."""
    return [torch.unique(_unit_positions(deps, group, s)) for s in group.slots]


def _pick(order: list[int], count: int, slot_units: list[torch.Tensor], n: int) -> list[int]:
    """The first `count` units of `order` whose removal leaves every slot at least one unit (a
    concat's branch or a conv is never emptied)."""
    remaining = [u.numel() for u in slot_units]
    holders: list[list[int]] = [[] for _ in range(n)]
    for i, units in enumerate(slot_units):
        for u in units.tolist():
            holders[u].append(i)
    picked = []
    for unit in order:
        if len(picked) == count:
            break
        if all(remaining[i] > 1 for i in holders[unit]):
            for i in holders[unit]:
                remaining[i] -= 1
            picked.append(unit)
    return picked


def _layer_choice(deps, groups, scores, ratio) -> dict[int, torch.Tensor]:
    chosen = {}
    for g in groups:
        n = g.units.numel()
        k = min(int(ratio * n + 1e-9), n - 1)
        if k > 0:
            order = torch.argsort(scores[g.index], stable=True).tolist()
            picked = _pick(order, k, _slot_units(deps, g), n)
            if picked:
                chosen[g.index] = torch.tensor(sorted(picked))
    return chosen


def _global_choice(deps, groups, scores, ratio, max_ratio) -> dict[int, torch.Tensor]:
    entries = []
    for g in groups:
        s = scores[g.index]
        normalized = s / s.mean().clamp_min(1e-30)
        entries += [(float(v), g.index, i) for i, v in enumerate(normalized.tolist())]
    budget = int(ratio * len(entries) + 1e-9)
    caps = {g.index: min(int(max_ratio * g.units.numel() + 1e-9), g.units.numel() - 1) for g in groups}
    orders: dict[int, list[int]] = {}
    for _, gi, i in sorted(entries):
        orders.setdefault(gi, []).append(i)
    # take units in global order, group by group caps and the never-empty-a-slot rule
    by_index = {g.index: g for g in groups}
    quota: dict[int, int] = {}
    for _, gi, _ in sorted(entries):
        if budget <= 0:
            break
        if quota.get(gi, 0) < caps[gi]:
            quota[gi] = quota.get(gi, 0) + 1
            budget -= 1
    chosen = {}
    for gi, count in quota.items():
        g = by_index[gi]
        picked = _pick(orders[gi], count, _slot_units(deps, g), g.units.numel())
        if picked:
            chosen[gi] = torch.tensor(sorted(picked))
    return chosen


# -- rewriting the IR ------------------------------------------------------------------------------

def _keep_masks(deps: ChannelDependencies, pruned_labels: torch.Tensor) -> dict:
    masks = {}
    for slot in deps.atoms:
        keep = ~torch.isin(deps.labels(slot), pruned_labels)
        if not bool(keep.all()):
            masks[slot] = keep
    return masks


def _shrink_weights(ir: GraphIR, masks: dict) -> None:
    by_node: dict[fx.Node, dict[int, torch.Tensor]] = {}
    for (node, _, dim), keep in masks.items():
        if node.op == "get_attr":
            by_node.setdefault(node, {})[dim] = keep
    for node, dims in by_node.items():
        tensor = ir.weight(node)
        for dim, keep in dims.items():
            tensor = tensor.index_select(dim, keep.nonzero().squeeze(1))
        target = str(node.target)
        if sum(n.op == "get_attr" and n.target == target for n in ir.graph.nodes) == 1:
            del ir.gm._buffers[target]  # the pruned tensor takes over the name
        with ir.graph.inserting_before(node):
            new = ir.add_weight(target, tensor)
        new.meta = {**node.meta, "val": new.meta["val"]}
        node.replace_all_uses_with(new)
        ir.graph.erase_node(node)


def _new_sizes(node: fx.Node, old: list, masks: dict) -> list:
    sizes = []
    for dim, size in enumerate(old):
        keep = masks.get((node, None, dim))
        sizes.append(size if keep is None or (isinstance(size, int) and size == -1) else int(keep.sum()))
    return sizes


def _rewrite_shape_args(ir: GraphIR, masks: dict) -> None:
    for node in ir.compute_nodes():
        if node.target in _SHAPE_ARG:
            i = _SHAPE_ARG[node.target]
            old = list(node.args[i])
            new = _new_sizes(node, old, masks)
            if new != old:
                node.args = node.args[:i] + (new,) + node.args[i + 1:]
        elif node.target in CONVS and len(node.args) > 6 and node.args[6] != 1:
            x, weight = node.args[0], node.args[1]
            keep = masks.get((x, None, 1))
            depthwise = node.args[6] == x.meta["val"].shape[1] and weight.meta["val"].shape[1] == 1
            if keep is not None and depthwise:
                node.args = (*node.args[:6], int(keep.sum()), *node.args[7:])
        elif node.target is aten.layer_norm.default:
            x = node.args[0]
            rank = x.meta["val"].dim()
            keep = masks.get((x, None, rank - 1))
            if keep is not None:
                node.args = (x, [int(keep.sum())], *node.args[2:])
        elif node.target is aten.unflatten.int:
            x, dim, sizes = node.args[:3]
            dim %= x.meta["val"].dim()
            new = [s if masks.get((node, None, dim + k)) is None else int(masks[(node, None, dim + k)].sum())
                   for k, s in enumerate(sizes)]
            node.args = (x, dim, new, *node.args[3:])


def _reinfer(ir: GraphIR) -> None:
    for node in ir.graph.nodes:
        if node.op != "call_function":
            continue
        try:
            node.meta["val"] = ir.infer_val(node)
        except Exception as exc:  # noqa: BLE001 - report which node the new shapes break
            raise PassInputError(f"node %{node.name} ({node.target}) does not accept the "
                            f"pruned shapes: {exc}") from exc


@register_pass
class PruneChannels(Pass):
    """Remove the least important channels, heads and hidden units, and everything coupled to them."""

    name = "prune-channels"
    Options = PruneChannelsOptions

    def __init__(self, options: PruneChannelsOptions | None = None):
        super().__init__(options)
        for opt in ("ratio", "max_ratio"):
            value = getattr(self.options, opt)
            if not 0.0 <= value < 1.0:
                raise PipelineError(f"pass 'prune-channels': option '{opt}' must be in [0, 1), got {value}")

    def run(self, ir: GraphIR, ctx: PassContext) -> PassResult:
        opts = self.options
        deps = analyze(ir, opts.protect)
        self._check_protect(deps, ir)
        for sentence in deps.sentences():
            log.info("prune-channels: %s", sentence)
        ctx.config.setdefault("channel_groups", []).extend(deps.sentences())
        groups = [g for g in deps.groups if g.prunable]
        stats = {"groups": len([g for g in deps.groups if g.seeds]), "prunable_groups": len(groups),
                 "units": int(sum(g.units.numel() for g in groups))}
        if opts.ratio == 0.0 or not groups:
            return PassResult(ir, False, {**stats, "units_pruned": 0, "bytes_saved": 0})
        grads = taylor_gradients(ir, ctx) if opts.criterion == "taylor" else {}
        activations = {}
        if opts.criterion == "activation":
            wanted = {s[0] for g in groups for s in g.slots if s[0].op == "call_function"}
            activations = mean_activations(ir, ctx, wanted)
        scores, fallbacks = {}, 0
        for g in groups:
            scores[g.index], fell_back = _group_scores(deps, g, opts.criterion, ir, grads, activations)
            fallbacks += fell_back
        if opts.scope == "layer":
            chosen = _layer_choice(deps, groups, scores, opts.ratio)
        else:
            chosen = _global_choice(deps, groups, scores, opts.ratio, opts.max_ratio)
        by_index = {g.index: g for g in groups}
        pruned = torch.cat([by_index[gi].units[ix] for gi, ix in chosen.items()]) if chosen else torch.empty(0, dtype=torch.long)
        if pruned.numel() == 0:
            return PassResult(ir, False, {**stats, "units_pruned": 0, "bytes_saved": 0})
        before = ir.weight_bytes()
        masks = _keep_masks(deps, pruned)
        _shrink_weights(ir, masks)
        _rewrite_shape_args(ir, masks)
        _reinfer(ir)
        ir.drop_unused_weights()
        stats.update(units_pruned=int(pruned.numel()), bytes_saved=before - ir.weight_bytes())
        if opts.criterion == "bn-scale":
            stats["bn_scale_fallbacks"] = fallbacks
        return PassResult(ir, True, stats)

    def _check_protect(self, deps: ChannelDependencies, ir: GraphIR) -> None:
        import fnmatch

        from orca_compiler.channel_deps import layer_name

        names = {layer_name(n) for n in ir.compute_nodes()} | {n.name for n in ir.compute_nodes()}
        for pattern in self.options.protect:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise PassInputError(f"protect pattern {pattern!r} matches no layer; "
                                f"layers: {', '.join(sorted(n for n in names if '.' in n)[:20])}")


