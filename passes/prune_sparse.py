"""Unstructured (magnitude) and N:M pruning of linear and conv2d weights, stored sparse where smaller.

`prune-magnitude{sparsity=,scope=layer|global}` zeroes the smallest-|w| fraction `sparsity` of each
weight (`scope=layer`: exactly round(sparsity * numel) entries per weight) or of all of them at
once (`scope=global`: one threshold over every weight). `prune-nm{n=,m=}` keeps the `n` largest |w|
in every group of `m` consecutive weights along the input dimension (a conv's `in*kh*kw`, the
flattened weight's columns); a layer whose input dimension `m` does not divide is skipped.

The weights pruned are those of `linear` and `conv2d` (and of their fused epilogues, if the pass
runs after `fuse`); biases, norms and embeddings are never touched, nor a weight that anything
other than one such layer reads (a tied embedding). After zeroing, a `linear` weight is stored as
CSR (`orca.sparse_linear`, ops/sparse.py) where the CSR arrays take fewer bytes than the dense
weight: with int32 indices, above ~50% zeros, so 50% unstructured and 2:4 stay dense. Convolutions
(and fused epilogues) stay dense with their zeros: their storage shrinks only if a later pass
compresses it. Whether the sparse layers also run faster is for the lowering's kernel selection
to measure (the report says which kernel won).

Statistics: `layers` pruned (`sparse` of them stored as CSR, `dense` kept dense), `skipped`, the
`sparsity` achieved over the layers, and their weights' `bytes_dense` and `bytes_stored`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx

from orca_compiler.errors import PipelineError
from orca_compiler.ir import GraphIR
from orca_compiler.ops import fused
from orca_compiler.ops import sparse as sparse_ops
from orca_compiler.pass_base import Pass, PassContext, PassResult, register_pass

aten = torch.ops.aten

# Ops whose argument 1 is a weight this module prunes, and that weight's rank.
_WEIGHT_RANK = {aten.linear.default: 2, aten.conv2d.default: 4, fused.LINEAR_EPILOGUE: 2, fused.CONV_EPILOGUE: 4}
# dtypes stored as CSR (torch's CPU CSR kernels take them; half types stay dense with zeros).
_CSR_DTYPES = (torch.float32, torch.float64)


@dataclass
class _Layer:
    """One prunable layer: its node and its weight as a dense tensor."""

    node: fx.Node
    weight: torch.Tensor

    @property
    def stored_sparse(self) -> bool:
        """Whether the weight is stored as CSR (an orca.sparse_linear)."""
        return self.node.target is sparse_ops.SPARSE_LINEAR


def _attr(arg) -> bool:
    return isinstance(arg, fx.Node) and arg.op == "get_attr"


def _only_reader(node: fx.Node, weight: fx.Node, ir: GraphIR) -> bool:
    """Whether `node` is the one reader of the tensor behind get_attr `weight`."""
    readers = [user for n in ir.graph.nodes if n.op == "get_attr" and n.target == weight.target for user in n.users]
    return readers == [node] and len(weight.users) == 1 and list(node.args).count(weight) == 1


def collect_layers(ir: GraphIR) -> tuple[list[_Layer], int]:
    """The prunable layers of `ir` (linear / conv2d / their epilogues with a constant floating
    weight nothing else reads, and sparse linears) and how many weight-carrying layers are not."""
    layers, skipped = [], 0
    for node in ir.compute_nodes():
        if node.target is sparse_ops.SPARSE_LINEAR:
            x, values, cols, crows, bias, out_features, in_features = node.args
            if not all(_attr(a) and _only_reader(node, a, ir) for a in (values, cols, crows)):
                skipped += 1
                continue
            layers.append(_Layer(node, sparse_ops.densify(ir.weight(values), ir.weight(cols), ir.weight(crows),
                                                          out_features, in_features)))
            continue
        rank = _WEIGHT_RANK.get(node.target)
        if rank is None or len(node.args) < 2:
            continue
        weight = node.args[1]
        tensor = ir.weight(weight) if _attr(weight) else None
        if (tensor is None or tensor.dim() != rank or not tensor.dtype.is_floating_point
                or not _only_reader(node, weight, ir)):
            skipped += 1
            continue
        layers.append(_Layer(node, tensor))
    return layers, skipped


def layer_sparsity(ir: GraphIR) -> dict[str, tuple[int, int]]:
    """Node name -> (zero entries, entries) of every prunable layer's weight (sparse ones densified)."""
    return {layer.node.name: (int((layer.weight == 0).sum()), layer.weight.numel()) for layer in collect_layers(ir)[0]}


# -- masks: True where a weight is kept --------------------------------------------------------

def _smallest_zeroed(magnitudes: torch.Tensor, count: int) -> torch.Tensor:
    """A flat keep-mask with the `count` smallest entries of `magnitudes` (ties: first ones) False."""
    keep = torch.ones(magnitudes.numel(), dtype=torch.bool)
    if count > 0:
        keep[torch.argsort(magnitudes.flatten(), stable=True)[:count]] = False
    return keep


def magnitude_masks(weights: list[torch.Tensor], sparsity: float, scope: str) -> list[torch.Tensor]:
    """Keep-masks zeroing round(sparsity * numel) smallest-|w| entries of each weight (`layer`) or
    of all weights together (`global`)."""
    if scope == "layer":
        return [_smallest_zeroed(w.abs(), round(sparsity * w.numel())).view(w.shape) for w in weights]
    if not weights:
        return []
    flat = torch.cat([w.detach().abs().flatten().double() for w in weights])
    keep = _smallest_zeroed(flat, round(sparsity * flat.numel()))
    return [part.view(w.shape) for part, w in zip(keep.split([w.numel() for w in weights]), weights)]


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor | None:
    """Keep-mask with the `n` largest |w| of every `m` consecutive entries along the flattened input
    dimension; None when `m` does not divide it."""
    matrix = weight.flatten(1)
    if matrix.shape[1] % m:
        return None
    groups = matrix.abs().reshape(matrix.shape[0], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, torch.topk(groups, n, dim=-1, sorted=False).indices, True)
    return keep.reshape(weight.shape)


# -- storing the pruned weights ------------------------------------------------------------------

def _worth_csr(node: fx.Node, weight: torch.Tensor) -> bool:
    if node.target not in (aten.linear.default, sparse_ops.SPARSE_LINEAR) or weight.dtype not in _CSR_DTYPES:
        return False
    dense = weight.numel() * weight.element_size()
    return sparse_ops.csr_bytes_for(int(weight.count_nonzero()), weight.shape[0], weight.element_size()) < dense


def _store(ir: GraphIR, layer: _Layer, weight: torch.Tensor) -> fx.Node:
    """Put the pruned `weight` into the IR, as CSR where that is smaller, else dense; returns the
    node that now reads it."""
    node = layer.node
    if not layer.stored_sparse and not _worth_csr(node, weight):  # (more zeros never make CSR larger)
        with ir.graph.inserting_before(node):
            new = ir.add_weight(f"{node.args[1].target}_pruned", weight)
        node.replace_input_with(node.args[1], new)
        return node
    values, cols, crows = sparse_ops.to_csr(weight)
    with ir.graph.inserting_before(node):
        arrays = [ir.add_weight(f"{node.name}_csr_{part}", t)
                  for part, t in (("values", values), ("cols", cols), ("crows", crows))]
    if layer.stored_sparse:
        node.args = (node.args[0], *arrays, *node.args[4:])
        return node
    x, bias = node.args[0], (node.args[2] if len(node.args) > 2 else node.kwargs.get("bias"))
    with ir.graph.inserting_before(node):
        new = ir.create_node(sparse_ops.SPARSE_LINEAR, (x, *arrays, bias, *weight.shape), name=f"{node.name}_sparse")
    node.replace_all_uses_with(new)
    ir.graph.erase_node(node)
    return new


def _stored_bytes(ir: GraphIR, node: fx.Node) -> int:
    if node.target is sparse_ops.SPARSE_LINEAR:
        return sparse_ops.csr_bytes(*(ir.weight(a) for a in node.args[1:4]))
    weight = ir.weight(node.args[1])
    return weight.numel() * weight.element_size()


def apply_masks(ir: GraphIR, layers: list[_Layer], masks: list[torch.Tensor | None], skipped: int) -> PassResult:
    """Zero each layer's weight outside its keep-mask (None: skip the layer) and store the weights
    that changed; returns the pass result with the statistics over the layers pruned."""
    pruned: list[tuple[fx.Node, torch.Tensor]] = []  # (the node reading the weight, the weight)
    changed = False
    for layer, mask in zip(layers, masks):
        if mask is None:
            skipped += 1
            continue
        weight = layer.weight.masked_fill(~mask, 0)
        node = layer.node
        if not torch.equal(weight, layer.weight):  # else: bit-identical, as it was stored
            node = _store(ir, layer, weight)
            changed = True
        pruned.append((node, weight))
    if changed:
        ir.drop_unused_weights()
    entries = sum(w.numel() for _, w in pruned)
    sparse_count = sum(node.target is sparse_ops.SPARSE_LINEAR for node, _ in pruned)
    stats = {
        "layers": len(pruned), "sparse": sparse_count, "dense": len(pruned) - sparse_count, "skipped": skipped,
        "sparsity": round(sum(int((w == 0).sum()) for _, w in pruned) / entries, 4) if entries else 0.0,
        "bytes_dense": sum(w.numel() * w.element_size() for _, w in pruned),
        "bytes_stored": sum(_stored_bytes(ir, node) for node, _ in pruned),
    }
    return PassResult(ir, changed, stats)


# -- the passes ----------------------------------------------------------------------------------

@dataclass
class PruneMagnitudeOptions:
    """sparsity: fraction of the weight entries to zero (0 <= sparsity < 1); scope: "layer" (that
    fraction of each weight) or "global" (of all weights together, one threshold)."""

    sparsity: float = 0.5
    scope: Literal["layer", "global"] = "layer"


@register_pass
class PruneMagnitude(Pass):
    """Zero the smallest-magnitude linear/conv2d weights (per layer or globally); store sparse where smaller."""

    name = "prune-magnitude"
    Options = PruneMagnitudeOptions

    def __init__(self, options: PruneMagnitudeOptions | None = None):
        super().__init__(options)
        sparsity, scope = self.options.sparsity, self.options.scope
        if not 0.0 <= sparsity < 1.0:
            raise PipelineError(f"pass 'prune-magnitude': option 'sparsity' must be in [0, 1), got {sparsity}")
        if scope not in ("layer", "global"):
            raise PipelineError(f"pass 'prune-magnitude': option 'scope' must be layer or global, got {scope!r}")

    def run(self, ir: GraphIR, ctx: PassContext) -> PassResult:
        layers, skipped = collect_layers(ir)
        masks = magnitude_masks([l.weight for l in layers], self.options.sparsity, self.options.scope)
        return apply_masks(ir, layers, masks, skipped)


@dataclass
class PruneNMOptions:
    """n: weights kept in every group of m consecutive input weights (1 <= n < m)."""

    n: int = 2
    m: int = 4


@register_pass
class PruneNM(Pass):
    """Keep the n largest |w| in every m consecutive linear/conv2d inputs (2:4); store sparse where smaller."""

    name = "prune-nm"
    Options = PruneNMOptions

    def __init__(self, options: PruneNMOptions | None = None):
        super().__init__(options)
        n, m = self.options.n, self.options.m
        if m < 2:
            raise PipelineError(f"pass 'prune-nm': option 'm' must be >= 2, got {m}")
        if not 1 <= n < m:
            raise PipelineError(f"pass 'prune-nm': option 'n' must be in [1, m-1] = [1, {m - 1}], got {n}")

    def run(self, ir: GraphIR, ctx: PassContext) -> PassResult:
        layers, skipped = collect_layers(ir)
        masks = [nm_mask(l.weight, self.options.n, self.options.m) for l in layers]
        return apply_masks(ir, layers, masks, skipped)
