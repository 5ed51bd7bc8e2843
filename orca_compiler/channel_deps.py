"""Channel dependency analysis for structured pruning: which channels must be removed together.

Every tensor dimension of the IR is a *slot* `(node, output index or None, dim)`. Operators couple
slots index by index: a conv's output channels are its weight's rows; an add couples its operands'
channels; a flatten spreads channel c over the block of columns `c*HW .. (c+1)*HW - 1`; a view of
a `[.., E]` projection as `[.., heads, head_dim]` couples feature e with head e // head_dim. The
analysis starts at the *seeds*, the dimensions a pruner may shrink (conv / linear output channels,
embedding features, the hidden units of an LSTM / GRU, attention heads), gives each index an
*atom*, and propagates the couplings with a union-find over atoms until nothing changes. Atoms
that end up in one class are one prunable unit (a channel, a hidden unit, a head); slots linked by
a coupling form one *group*, the connected components of a networkx dependency graph.

A group is kept whole (not prunable) where it touches a model input or output, an op without a
coupling rule, a protected layer, or a view that mixes its channels with another dimension; the
reason is recorded and printed. Reshapes are analysed from the data layout itself, not by
pattern: an index map of the carrying dimension is reshaped like the tensor, and an output
dimension is coupled where the map is constant along its other dimensions.

Assumes the IR conventions of orca_compiler.ir, static shapes in the slots it couples, and that it
runs before fusion (fused ops have no rule and keep their channels).
"""
from __future__ import annotations

import fnmatch
import math
import operator
from dataclasses import dataclass, field
from typing import Callable, Iterable

import networkx as nx
import torch
import torch.fx as fx

from .ir import GraphIR
from .printer import op_name

aten = torch.ops.aten

Slot = tuple  # (fx.Node, output index or None, dim)


# -- union-find over atoms (vectorized: thousands of channels unite in one call) -------------------

class AtomSets:
    """A union-find over integer atoms, grown in blocks; `union` unites two index tensors pairwise."""

    def __init__(self):
        self.parent = torch.empty(0, dtype=torch.long)

    def fresh(self, count: int) -> torch.Tensor:
        start = self.parent.numel()
        new = torch.arange(start, start + count)
        self.parent = torch.cat([self.parent, new])
        return new

    def find(self, atoms: torch.Tensor) -> torch.Tensor:
        """The class label (smallest atom of the class) of each atom."""
        roots = self.parent[atoms]
        while True:
            up = self.parent[roots]
            if torch.equal(up, roots):
                return roots
            roots = up

    def compress(self) -> None:
        """Point every atom at its class label (keeps later `find`s short)."""
        self.parent = self.find(torch.arange(self.parent.numel()))

    def union(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        """Unite a[i] with b[i] for every i; True if any two classes merged."""
        merged = False
        while True:
            ra, rb = self.find(a), self.find(b)
            differ = ra != rb
            if not bool(differ.any()):
                return merged
            merged = True
            lo, hi = torch.minimum(ra[differ], rb[differ]), torch.maximum(ra[differ], rb[differ])
            self.parent.scatter_reduce_(0, hi, lo, reduce="amin")


# -- couplings ---------------------------------------------------------------------------------

@dataclass
class Coupling:
    """`b[j]` is the same channel as `a[index[j]]` (index[j] < 0: no counterpart, e.g. a concat)."""

    a: Slot
    b: Slot
    index: torch.Tensor | None = None  # None: the identity


@dataclass
class ReshapeGroup:
    """A view that regroups `in_dims` of `source` into `out_dims` of `node` (equal products)."""

    node: fx.Node
    source: fx.Node
    in_dims: list[int]
    out_dims: list[int]


@dataclass
class OpRules:
    """What one node contributes: couplings, reshape groups, seeds and slots that must stay whole."""

    couplings: list[Coupling] = field(default_factory=list)
    reshapes: list[ReshapeGroup] = field(default_factory=list)
    seeds: list[tuple[Slot, str]] = field(default_factory=list)
    fixed: list[tuple[Slot, str]] = field(default_factory=list)


def slot_size(slot: Slot) -> int | None:
    node, out, dim = slot
    val = node.meta.get("val")
    if out is not None:
        val = val[out]
    size = val.shape[dim]
    return size if isinstance(size, int) else None


def _val(node, out=None):
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val[out] if out is not None and val is not None else val


def _rank(node, out=None) -> int:
    val = _val(node, out)
    return val.dim() if isinstance(val, torch.Tensor) else 0


def _all_slots(node: fx.Node) -> list[Slot]:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return [(node, None, d) for d in range(val.dim())]
    if isinstance(val, (tuple, list)):
        return [(node, i, d) for i, v in enumerate(val) if isinstance(v, torch.Tensor) for d in range(v.dim())]
    return []


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]


# -- per-op coupling rules -----------------------------------------------------------------------

_SAME_SHAPE_UNARY = {
    aten.relu.default, aten.relu_.default, aten.gelu.default, aten.hardtanh.default, aten.sigmoid.default,
    aten.tanh.default, aten.silu.default, aten.hardswish.default, aten.hardsigmoid.default, aten.elu.default,
    aten.leaky_relu.default, aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default,
    aten.clone.default, aten.dropout.default, aten.alias.default, aten.contiguous.default, aten.detach.default,
    aten._to_copy.default, aten.to.dtype, aten.neg.default, aten.abs.default, aten.exp.default, aten.log.default,
    aten.sqrt.default, aten.rsqrt.default, aten.softmax.int, aten._softmax.default, aten.log_softmax.int,
    aten.mul.Scalar, aten.add.Scalar, aten.sub.Scalar, aten.div.Scalar, aten.pow.Tensor_Scalar,
    aten.lift_fresh_copy.default,
}
_BROADCAST_BINARY = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.maximum.default,
    aten.minimum.default, aten.where.self, aten.pow.Tensor_Tensor,
}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
             aten.unflatten.int}
_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default}
_POOLS = {aten.adaptive_avg_pool2d.default, aten.avg_pool2d.default, aten.max_pool2d.default,
          aten.adaptive_avg_pool1d.default, aten.avg_pool1d.default, aten.max_pool1d.default,
          aten._adaptive_avg_pool2d.default}
CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}
BATCH_NORMS = {aten._native_batch_norm_legit_no_training.default, aten.batch_norm.default}
_SOURCES = {aten.zeros.default, aten.ones.default, aten.full.default, aten.empty.memory_format}


def _identity_all(a: fx.Node, node: fx.Node, out=None) -> list[Coupling]:
    return [Coupling((a, None, d), (node, out, d)) for d in range(_rank(a))]


def _broadcast(node: fx.Node) -> OpRules:
    rules = OpRules()
    out_shape = _val(node).shape
    for a in _tensor_args(node):
        shape = _val(a).shape
        for k in range(1, len(shape) + 1):
            if shape[-k] == out_shape[-k] and shape[-k] != 1:
                rules.couplings.append(Coupling((a, None, len(shape) - k), (node, None, len(out_shape) - k)))
    return rules


def _dim_map(node: fx.Node) -> list[int | None] | None:
    """For ops that move dims around: out dim -> input dim (None: a new dim), or None if unknown."""
    src = node.args[0]
    rank_in, rank_out = _rank(src), _rank(node)
    t = node.target
    if t is aten.permute.default:
        return [d % rank_in for d in node.args[1]]
    if t is aten.transpose.int:
        d0, d1 = node.args[1] % rank_in, node.args[2] % rank_in
        order = list(range(rank_in))
        order[d0], order[d1] = order[d1], order[d0]
        return order
    if t is aten.t.default:
        return list(range(rank_in))[::-1]
    if t is aten.unsqueeze.default:
        d = node.args[1] % rank_out
        return [i if i < d else (None if i == d else i - 1) for i in range(rank_out)]
    if t in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
        dims = {i for i in range(rank_in) if _val(src).shape[i] == 1}
        if t is aten.squeeze.dim:
            dims &= {node.args[1] % rank_in}
        elif t is aten.squeeze.dims:
            dims &= {d % rank_in for d in node.args[1]}
        return [i for i in range(rank_in) if i not in dims]
    if t is aten.select.int:
        d = node.args[1] % rank_in
        return [i for i in range(rank_in) if i != d]
    if t is aten.expand.default:
        offset = rank_out - rank_in
        return [(i - offset if i >= offset and _val(src).shape[i - offset] == _val(node).shape[i] else None)
                for i in range(rank_out)]
    if t in _REDUCTIONS:
        dims = _arg(node, 1, "dim") or list(range(rank_in))
        dims = {d % rank_in for d in ([dims] if isinstance(dims, int) else dims)}
        keep = _arg(node, 2, "keepdim", False)
        kept = [i for i in range(rank_in) if i not in dims]
        return [(i if i not in dims else None) for i in range(rank_in)] if keep else kept
    if t in _POOLS:
        return [0, 1] + [None] * (rank_out - 2) if rank_in == rank_out else [0] + [None] * (rank_out - 1)
    return None


def _moves_dims(node: fx.Node) -> OpRules:
    rules = OpRules()
    mapping = _dim_map(node)
    src = node.args[0]
    if node.target is aten.select.int:  # the selected index names one channel: that dim stays whole
        rules.fixed.append(((src, None, node.args[1] % _rank(src)), f"indexed by %{node.name}"))
    for out_dim, in_dim in enumerate(mapping):
        if in_dim is not None:
            rules.couplings.append(Coupling((src, None, in_dim), (node, None, out_dim)))
    return rules


def _slice(node: fx.Node) -> OpRules:
    src = node.args[0]
    rank = _rank(src)
    dim = _arg(node, 1, "dim", 0) % rank
    start, end, step = _arg(node, 2, "start"), _arg(node, 3, "end"), _arg(node, 4, "step", 1)
    full = (start in (None, 0)) and (end is None or (isinstance(end, int) and end >= _val(src).shape[dim])) and step == 1
    rules = OpRules(couplings=[Coupling((src, None, d), (node, None, d)) for d in range(rank) if d != dim or full])
    if not full:
        rules.fixed.append(((src, None, dim), f"sliced by %{node.name}"))
    return rules


def _cat(node: fx.Node) -> OpRules:
    tensors = [t for t in node.args[0] if isinstance(t, fx.Node)]
    rank = _rank(node)
    dim = _arg(node, 1, "dim", 0) % rank
    size = _val(node).shape[dim]
    rules = OpRules()
    offset = 0
    for t in tensors:
        width = _val(t).shape[dim]
        for d in range(rank):
            if d == dim:
                index = torch.full((size,), -1, dtype=torch.long)
                index[offset:offset + width] = torch.arange(width)
                rules.couplings.append(Coupling((t, None, d), (node, None, d), index))
            else:
                rules.couplings.append(Coupling((t, None, d), (node, None, d)))
        offset += width
    return rules


def _getitem(node: fx.Node) -> OpRules:
    src, index = node.args
    if not isinstance(_val(src), (tuple, list)):
        return OpRules(fixed=[(s, f"unsupported getitem %{node.name}") for s in _all_slots(node)])
    return OpRules(couplings=[Coupling((src, index, d), (node, None, d)) for d in range(_rank(node))])


def _reshape(node: fx.Node) -> OpRules:
    src = node.args[0]
    in_shape, out_shape = list(_val(src).shape), list(_val(node).shape)
    if not all(isinstance(s, int) for s in in_shape + out_shape):
        return OpRules(fixed=[(s, f"view %{node.name} has a symbolic shape") for s in _all_slots(src) + _all_slots(node)])
    return OpRules(reshapes=[ReshapeGroup(node, src, gi, go) for gi, go in reshape_groups(in_shape, out_shape)])


def reshape_groups(in_shape: list[int], out_shape: list[int]) -> list[tuple[list[int], list[int]]]:
    """Split a reshape into runs of input and output dims with equal products."""
    groups, i, j = [], 0, 0
    while i < len(in_shape) or j < len(out_shape):
        gi, go, pi, po = [], [], 1, 1
        if i < len(in_shape):
            gi.append(i)
            pi, i = in_shape[i], i + 1
        if j < len(out_shape):
            go.append(j)
            po, j = out_shape[j], j + 1
        while pi != po and (i < len(in_shape) or j < len(out_shape)):
            if (pi < po and i < len(in_shape)) or j >= len(out_shape):
                gi.append(i)
                pi, i = pi * in_shape[i], i + 1
            else:
                go.append(j)
                po, j = po * out_shape[j], j + 1
        groups.append((gi, go))
    return groups


def _conv(node: fx.Node) -> OpRules:
    x, w = node.args[0], node.args[1]
    bias = _arg(node, 2, "bias")
    groups = _arg(node, 6, "groups", 1)
    c_in, c_out = _val(x).shape[1], _val(w).shape[0]
    rules = OpRules(couplings=[Coupling((w, None, 0), (node, None, 1)), Coupling((x, None, 0), (node, None, 0))])
    if isinstance(bias, fx.Node):
        rules.couplings.append(Coupling((w, None, 0), (bias, None, 0)))
    if isinstance(w, fx.Node) and w.op == "get_attr":
        rules.seeds.append(((w, None, 0), "out-channels"))
    if groups == 1:
        rules.couplings.append(Coupling((x, None, 1), (w, None, 1)))
    elif groups == c_in and _val(w).shape[1] == 1:  # depthwise: out channel o reads input channel o // mult
        rules.couplings.append(Coupling((x, None, 1), (node, None, 1), torch.arange(c_out) // (c_out // c_in)))
    else:  # grouped: the same positions are pruned in every group, so the groups stay equal
        per_in, per_out = c_in // groups, c_out // groups
        rules.couplings.append(Coupling((w, None, 1), (x, None, 1), torch.arange(c_in) % per_in))
        rules.couplings.append(Coupling((node, None, 1), (node, None, 1),
                                        (torch.arange(c_out) + per_out) % c_out))
    return rules


def _linear(node: fx.Node) -> OpRules:
    x, w = node.args[0], node.args[1]
    bias = _arg(node, 2, "bias")
    rank = _rank(x)
    rules = OpRules(couplings=[Coupling((w, None, 0), (node, None, rank - 1)), Coupling((x, None, rank - 1), (w, None, 1))]
                    + [Coupling((x, None, d), (node, None, d)) for d in range(rank - 1)])
    if isinstance(bias, fx.Node):
        rules.couplings.append(Coupling((w, None, 0), (bias, None, 0)))
    if w.op == "get_attr":
        rules.seeds.append(((w, None, 0), "out-features"))
    return rules


def _matmul(node: fx.Node) -> OpRules:
    a, b = node.args[0], node.args[1]
    ra, rb, ro = _rank(a), _rank(b), _rank(node)
    if ra < 2 or rb < 2:
        return OpRules(fixed=[(s, f"matmul %{node.name} of a vector") for s in _all_slots(node)])
    rules = OpRules(couplings=[Coupling((a, None, ra - 1), (b, None, rb - 2)),
                               Coupling((a, None, ra - 2), (node, None, ro - 2)),
                               Coupling((b, None, rb - 1), (node, None, ro - 1))])
    return rules


def _embedding(node: fx.Node) -> OpRules:
    w, idx = node.args[0], node.args[1]
    rank = _rank(node)
    rules = OpRules(couplings=[Coupling((w, None, 1), (node, None, rank - 1))]
                    + [Coupling((idx, None, d), (node, None, d)) for d in range(rank - 1)])
    if w.op == "get_attr":
        rules.seeds.append(((w, None, 1), "features"))
    return rules


def _batch_norm(node: fx.Node) -> OpRules:
    x = node.args[0]
    rules = OpRules()
    out = 0 if isinstance(_val(node), (tuple, list)) else None
    rules.couplings += _identity_all(x, node, out)
    for p in node.args[1:5]:
        if isinstance(p, fx.Node):
            rules.couplings.append(Coupling((x, None, 1), (p, None, 0)))
    return rules


def _layer_norm(node: fx.Node) -> OpRules:
    x, shape = node.args[0], node.args[1]
    rank = _rank(x)
    rules = OpRules(couplings=_identity_all(x, node, 0 if isinstance(_val(node), (tuple, list)) else None))
    if len(shape) != 1:
        rules.fixed += [((x, None, d), f"layer_norm %{node.name} over {len(shape)} dims") for d in range(rank - len(shape), rank)]
    for p in node.args[2:4]:
        if isinstance(p, fx.Node):
            rules.couplings.append(Coupling((x, None, rank - 1), (p, None, 0)))
    return rules


def _sdpa(node: fx.Node) -> OpRules:
    q, k, v = node.args[:3]
    rank = _rank(q)
    if rank != 4 or len(node.args) > 3 and node.args[3] is not None or node.kwargs.get("attn_mask") is not None \
            or node.kwargs.get("enable_gqa"):
        return OpRules(fixed=[(s, f"attention %{node.name} with a mask or grouped heads")
                              for a in (q, k, v, node) for s in _all_slots(a)])
    heads = [Coupling((q, None, 1), (t, None, 1)) for t in (k, v, node)]
    batch = [Coupling((q, None, 0), (t, None, 0)) for t in (k, v, node)]
    seq = [Coupling((q, None, 2), (node, None, 2)), Coupling((k, None, 2), (v, None, 2)),
           Coupling((v, None, 3), (node, None, 3))]
    return OpRules(couplings=heads + batch + seq, seeds=[((q, None, 1), "heads")])


def _rnn(node: fx.Node) -> OpRules:
    """orca.lstm / orca.gru: one hidden unit is its rows in every gate of W_ih, W_hh and the biases,
    its column of W_hh, its slot in the outputs and states, and the next layer's input column(s).
    nn.LSTM has one hidden size for all layers and directions, so unit h is one unit throughout."""
    x, hx, params, has_biases, num_layers = node.args[:5]
    bidirectional, batch_first = node.args[7], node.args[8]
    hx = list(hx) if isinstance(hx, (list, tuple)) else [hx]
    directions = 2 if bidirectional else 1
    per_layer = 4 if has_biases else 2
    w_hh0 = params[1]
    hidden = _val(w_hh0).shape[1]
    gates = _val(w_hh0).shape[0] // hidden
    unit = (w_hh0, None, 1)
    tiled_gates = torch.arange(gates * hidden) % hidden
    tiled_dirs = torch.arange(directions * hidden) % hidden
    rules = OpRules(seeds=[(unit, "hidden units")])
    add = rules.couplings.append
    for layer in range(num_layers):
        for direction in range(directions):
            base = (layer * directions + direction) * per_layer
            w_ih, w_hh = params[base], params[base + 1]
            add(Coupling(unit, (w_ih, None, 0), tiled_gates))
            add(Coupling(unit, (w_hh, None, 0), tiled_gates))
            add(Coupling(unit, (w_hh, None, 1)))
            if has_biases:
                add(Coupling(unit, (params[base + 2], None, 0), tiled_gates))
                add(Coupling(unit, (params[base + 3], None, 0), tiled_gates))
            if layer == 0:
                add(Coupling((x, None, 2), (w_ih, None, 1)))
            else:
                add(Coupling(unit, (w_ih, None, 1), tiled_dirs))
    add(Coupling(unit, (node, 0, 2), tiled_dirs))
    for state_index, state in enumerate(hx, start=1):
        add(Coupling(unit, (state, None, 2)))
        add(Coupling(unit, (node, state_index, 2)))
    time_dim = 1 if batch_first else 0
    for d in (0, 1):
        add(Coupling((x, None, d), (node, 0, d)))
    add(Coupling((x, None, 1 - time_dim), (node, 1, 1)))
    return rules


_RULES: dict[object, Callable[[fx.Node], OpRules]] = {
    **{t: (lambda n: OpRules(couplings=_identity_all(n.args[0], n))) for t in _SAME_SHAPE_UNARY},
    **{t: _broadcast for t in _BROADCAST_BINARY},
    **{t: _reshape for t in _RESHAPES},
    **{t: _moves_dims for t in _REDUCTIONS | _POOLS | {aten.permute.default, aten.transpose.int, aten.t.default,
                                                      aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
                                                      aten.squeeze.default, aten.select.int, aten.expand.default}},
    **{t: _conv for t in CONVS},
    **{t: _batch_norm for t in BATCH_NORMS},
    **{t: (lambda n: OpRules()) for t in _SOURCES},
    aten.slice.Tensor: _slice,
    aten.cat.default: _cat,
    operator.getitem: _getitem,
    aten.linear.default: _linear,
    aten.matmul.default: _matmul,
    aten.bmm.default: _matmul,
    aten.embedding.default: _embedding,
    aten.layer_norm.default: _layer_norm,
    aten.scaled_dot_product_attention.default: _sdpa,
}


def _rnn_rules() -> dict:
    from .ops import rnn

    return {rnn.LSTM: _rnn, rnn.GRU: _rnn}


def has_rule(target) -> bool:
    """Whether the analysis knows how `target` couples channels (else its channels stay whole)."""
    return target in _RULES or target in _rnn_rules()


def _rules_for(node: fx.Node) -> OpRules:
    rule = _RULES.get(node.target) or _rnn_rules().get(node.target)
    if rule is None:
        reason = f"op {op_name(node)} (%{node.name}) has no channel rule"
        slots = [s for a in _tensor_args(node) for s in _all_slots(a)] + _all_slots(node)
        return OpRules(fixed=[(s, reason) for s in slots])
    return rule(node)


# -- the analysis ----------------------------------------------------------------------------------

def layer_name(node: fx.Node) -> str:
    """The user's module path of the layer an op came from ("blocks.0.conv1"), else the node name."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if path:
            return path
    return node.name


@dataclass
class ChannelGroup:
    """Slots that must be pruned together, their prunable units and, if kept whole, why."""

    index: int
    slots: list[Slot]
    seeds: list[tuple[Slot, str]]
    units: torch.Tensor  # canonical atom ids, sorted
    fixed_reason: str | None = None
    sentence: str = ""

    @property
    def prunable(self) -> bool:
        return self.fixed_reason is None and bool(self.seeds) and self.units.numel() > 1


@dataclass
class ChannelDependencies:
    """The result of `analyze`: atoms per slot, the groups, and the networkx dependency graph."""

    ir: GraphIR
    atoms: dict[Slot, torch.Tensor]
    sets: AtomSets
    groups: list[ChannelGroup]
    graph: nx.Graph

    def labels(self, slot: Slot) -> torch.Tensor:
        return self.sets.find(self.atoms[slot])

    def sentences(self) -> list[str]:
        return [g.sentence for g in self.groups if g.seeds]


class _Analysis:
    def __init__(self, ir: GraphIR, protect: Iterable[str]):
        self.ir = ir
        self.protect = list(protect)
        self.sets = AtomSets()
        self.atoms: dict[Slot, torch.Tensor] = {}
        self.graph = nx.Graph()
        self.couplings: list[Coupling] = []
        self.reshapes: list[ReshapeGroup] = []
        self.seeds: list[tuple[Slot, str]] = []
        self.fixed: list[tuple[Slot, str]] = []
        self.consumer: dict[fx.Node, fx.Node] = {}

    def collect(self) -> None:
        for node in self.ir.graph.nodes:
            if node.op == "placeholder":
                self.fixed += [(s, f"model input %{node.name}") for s in _all_slots(node)]
            elif node.op == "output":
                for value in node.args[0]:
                    if isinstance(value, fx.Node):
                        self.fixed += [(s, f"model output %{value.name}") for s in _all_slots(value)]
            elif node.op == "call_function":
                rules = _rules_for(node)
                self.couplings += rules.couplings
                self.reshapes += rules.reshapes
                self.fixed += rules.fixed
                protected = self._protected(node)
                for seed, kind in rules.seeds:
                    self.consumer.setdefault(seed[0], node)
                    if protected:
                        self.fixed.append((seed, f"layer {layer_name(node)} is protected"))
                    self.seeds.append((seed, kind))
                for arg in node.all_input_nodes:
                    if arg.op == "get_attr":
                        self.consumer.setdefault(arg, node)

    def _protected(self, node: fx.Node) -> bool:
        names = (layer_name(node), node.name)
        return any(fnmatch.fnmatchcase(n, p) for p in self.protect for n in names)

    def _ensure(self, slot: Slot) -> torch.Tensor | None:
        if slot not in self.atoms:
            size = slot_size(slot)
            if size is None:
                return None
            self.atoms[slot] = self.sets.fresh(size)
        return self.atoms[slot]

    def _couple(self, a: Slot, b: Slot, index: torch.Tensor | None) -> bool:
        if a not in self.atoms and b not in self.atoms:
            return False
        atoms_a, atoms_b = self._ensure(a), self._ensure(b)
        if atoms_a is None or atoms_b is None:
            return False
        if index is None:
            if atoms_a.numel() != atoms_b.numel():
                return False
            pairs_a, pairs_b = atoms_a, atoms_b
        else:
            valid = index >= 0
            pairs_a, pairs_b = atoms_a[index[valid]], atoms_b[valid]
        self.graph.add_edge(a, b)
        return self.sets.union(pairs_a, pairs_b)

    def _couple_reshape(self, group: ReshapeGroup) -> bool:
        """Couple the dims of one reshape group whose index maps line up (see the module docstring)."""
        in_shape = [_val(group.source).shape[d] for d in group.in_dims]
        out_shape = [_val(group.node).shape[d] for d in group.out_dims]
        merged = False
        for src_node, src_dims, src_shape, dst_node, dst_dims, dst_shape in (
            (group.source, group.in_dims, in_shape, group.node, group.out_dims, out_shape),
            (group.node, group.out_dims, out_shape, group.source, group.in_dims, in_shape),
        ):
            carriers = [i for i, d in enumerate(src_dims) if (src_node, None, d) in self.atoms]
            if len(carriers) != 1:
                continue
            i = carriers[0]
            labels = self.sets.find(self.atoms[(src_node, None, src_dims[i])])
            view = [1] * len(src_shape)
            view[i] = -1
            spread = labels.view(view).expand(src_shape).reshape(dst_shape)
            for j, d in enumerate(dst_dims):
                along = spread.movedim(j, 0).reshape(dst_shape[j], -1)
                if along.shape[1] and bool((along == along[:, :1]).all()):
                    merged |= self._couple_labels((dst_node, None, d), along[:, 0], (src_node, None, src_dims[i]))
        return merged

    def _couple_labels(self, slot: Slot, labels: torch.Tensor, source: Slot) -> bool:
        atoms = self._ensure(slot)
        if atoms is None:
            return False
        self.graph.add_edge(source, slot)
        return self.sets.union(atoms, labels)

    def propagate(self) -> None:
        for seed, _ in self.seeds:
            self._ensure(seed)
        changed = True
        while changed:
            changed = False
            for c in self.couplings:
                changed |= self._couple(c.a, c.b, c.index)
            for r in self.reshapes:
                changed |= self._couple_reshape(r)
            self.sets.compress()
        # a second sweep: slots reached late may still need edges for the graph (unions are done)
        for c in self.couplings:
            self._couple(c.a, c.b, c.index)

    def check_reshapes(self) -> list[tuple[Slot, str]]:
        """Groups whose pruning a view cannot follow (channels mixed with another dim) stay whole."""
        bad = []
        for r in self.reshapes:
            in_slots = [(r.source, None, d) for d in r.in_dims]
            out_slots = [(r.node, None, d) for d in r.out_dims]
            carried = [s for s in in_slots + out_slots if s in self.atoms]
            if not carried:
                continue
            in_labels = [self.sets.find(self.atoms[s]) if s in self.atoms else None for s in in_slots]
            out_labels = [self.sets.find(self.atoms[s]) if s in self.atoms else None for s in out_slots]
            units = torch.unique(torch.cat([self.sets.find(self.atoms[s]) for s in carried]))
            in_shape = [slot_size(s) for s in in_slots]
            out_shape = [slot_size(s) for s in out_slots]
            if units.numel() * max(1, math.prod(in_shape)) > 20_000_000:
                bad += [(s, f"view %{r.node.name} is too large to check") for s in carried]
                continue
            for unit in units:
                if not torch.equal(_keep_mask(in_labels, in_shape, unit).reshape(out_shape),
                                   _keep_mask(out_labels, out_shape, unit)):
                    bad += [(s, f"view %{r.node.name} mixes channels with another dimension") for s in carried]
                    break
        return bad

    def build_groups(self) -> list[ChannelGroup]:
        fixed_labels: dict[int, str] = {}
        for slot, reason in self.fixed + self.check_reshapes():
            if slot in self.atoms:
                for label in self.sets.find(self.atoms[slot]).tolist():
                    fixed_labels.setdefault(label, reason)
        seeds_by_slot = dict(self.seeds)
        groups = []
        for component in nx.connected_components(self.graph.subgraph(list(self.atoms))) if self.graph else []:
            slots = [s for s in component if s in self.atoms]
            units = torch.unique(torch.cat([self.sets.find(self.atoms[s]) for s in slots]))
            reason = next((fixed_labels[u] for u in units.tolist() if u in fixed_labels), None)
            seeds = [(s, seeds_by_slot[s]) for s in slots if s in seeds_by_slot]
            groups.append(ChannelGroup(len(groups), _ordered(slots, self.ir), _ordered_seeds(seeds, self.ir), units, reason))
        for seed, kind in self.seeds:  # seeds coupled to nothing (e.g. a single conv feeding the output)
            if seed not in self.graph:
                units = self.sets.find(self.atoms[seed])
                reason = next((fixed_labels[u] for u in units.tolist() if u in fixed_labels), None)
                groups.append(ChannelGroup(len(groups), [seed], [(seed, kind)], torch.unique(units), reason))
        groups.sort(key=lambda g: _order_key(g.seeds[0][0] if g.seeds else g.slots[0], self.ir))
        for i, g in enumerate(groups):
            g.index = i
            g.sentence = describe_group(g, self.consumer)
        return groups


def _keep_mask(labels: list[torch.Tensor | None], shape: list[int], unit: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(shape, dtype=torch.bool)
    for i, lab in enumerate(labels):
        if lab is not None:
            view = [1] * len(shape)
            view[i] = -1
            mask = mask & (lab != unit).view(view)
    return mask


def _order_key(slot: Slot, ir: GraphIR) -> int:
    if not hasattr(ir, "_orca_order"):
        ir._orca_order = {n: i for i, n in enumerate(ir.graph.nodes)}
    return ir._orca_order.get(slot[0], 0)


def _ordered(slots, ir):
    return sorted(slots, key=lambda s: (_order_key(s, ir), s[1] or 0, s[2]))


def _ordered_seeds(seeds, ir):
    return sorted(seeds, key=lambda s: _order_key(s[0], ir))


def _param_path(node: fx.Node, user: fx.Node) -> str:
    """"blocks.0.conv1" for a layer's weight, "self_attn.in_proj" for a named projection."""
    source = node.meta.get("orca_source")
    if not source:
        return layer_name(user)
    for suffix in (".weight", ".bias", "_weight", "_bias"):
        if source.endswith(suffix):
            return source[: -len(suffix)]
    return source


def slot_phrase(slot: Slot, consumer: dict[fx.Node, fx.Node]) -> str | None:
    """"out-channels of blocks.0.conv1" for a weight slot; None for activations."""
    node, _, dim = slot
    if node.op != "get_attr":
        return None
    user = consumer.get(node) or next(iter(node.users), None)
    if user is None:
        return None
    layer = _param_path(node, user)
    is_bias = (node.meta.get("orca_source") or "").endswith("bias")
    if user.target in CONVS:
        if user.args[1] is node:
            return f"{'out' if dim == 0 else 'in'}-channels of {layer}"
        return f"bias of {layer}"
    if user.target is aten.linear.default:
        if user.args[1] is node:
            return f"{'out' if dim == 0 else 'in'}-features of {layer}"
        return f"bias of {layer}"
    if user.target is aten.embedding.default:
        return f"features of {layer}"
    if user.target in BATCH_NORMS or user.target is aten.layer_norm.default:
        return f"{'channels' if user.target in BATCH_NORMS else 'features'} of {layer_name(user)}"
    if user.target in _rnn_rules():
        params = list(user.args[2])
        position = params.index(node) if node in params else 0
        kind = "input columns" if position % 2 == 0 and dim == 1 else ("biases" if is_bias else "hidden units")
        return f"{kind} of {layer}"
    return f"dim {dim} of {layer}"


def describe_group(group: ChannelGroup, consumer: dict[fx.Node, fx.Node]) -> str:
    """One sentence: "out-channels of conv1 => in-channels of bn1, conv2" (and why it is kept)."""
    seen: dict[str, None] = {}
    for slot, kind in group.seeds:
        if kind == "heads":
            sdpa = consumer.get(slot[0])
            seen[f"heads of {layer_name(sdpa) if sdpa is not None else slot[0].name}"] = None
        else:
            phrase = slot_phrase(slot, consumer)
            if phrase:
                seen[phrase] = None
    head = list(seen)
    rest: dict[str, None] = {}
    for slot in group.slots:
        phrase = slot_phrase(slot, consumer)
        if phrase and phrase not in seen:
            rest[phrase] = None
    sentence = ", ".join(head) + (" => " + ", ".join(rest) if rest else "")
    sentence += f" [{group.units.numel()} units]"
    if group.fixed_reason:
        sentence += f" (kept: {group.fixed_reason})"
    return sentence


def analyze(ir: GraphIR, protect: Iterable[str] = ()) -> ChannelDependencies:
    """Find the channel groups of `ir` (see the module docstring); `protect` holds fnmatch patterns of
    layer paths or node names whose output channels must stay."""
    analysis = _Analysis(ir, protect)
    analysis.collect()
    analysis.propagate()
    groups = analysis.build_groups()
    return ChannelDependencies(ir, analysis.atoms, analysis.sets, groups, analysis.graph)


def weight_slots(group: ChannelGroup) -> list[Slot]:
    """The slots of `group` that are dims of weight tensors (get_attr nodes)."""
    return [s for s in group.slots if s[0].op == "get_attr"]

