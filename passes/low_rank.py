"""Factor linear and 1x1-conv weights by SVD into two smaller layers where that saves work.

`linear(x, W, b)` with `W: [out, in]` becomes `linear(linear(x, A), B, b)` with `A = sqrt(S_r) Vh_r`
(`[r, in]`) and `B = U_r sqrt(S_r)` (`[out, r]`), the rank-r truncated SVD of W. A 1x1 convolution
(no groups) is factored the same way into two 1x1 convolutions; the first keeps the stride and
padding. A layer is factored only where `r * (in + out) <= (1 - min_saving) * in * out`, i.e.
where the multiply-adds and the weight bytes shrink by at least `min_saving` (two GEMMs cost
more than their FLOPs say: on the zoo MLP's random weights, energy 0.9 needs rank 340 of 512 for
the first layer, a 0.4% saving that would run slower); the others are counted as `kept`.

The rank is `rank=` when given, else the smallest r whose singular values keep `energy` of the
squared Frobenius norm (`energy=1` keeps every non-zero direction, so the result is exact up to
rounding). The SVD runs in float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from orca_compiler.errors import PipelineError
from orca_compiler.ir import GraphIR
from orca_compiler.pass_base import Pass, PassContext, PassResult, register_pass

aten = torch.ops.aten


@dataclass
class LowRankOptions:
    """energy: fraction of the squared singular values to keep (0 < energy <= 1);
    rank: a fixed rank instead (0 = choose by energy); min_saving: factor a layer only where its
    multiply-adds drop by at least this fraction (0 <= min_saving < 1)."""

    energy: float = 0.9
    rank: int = 0
    min_saving: float = 0.25


def choose_rank(singular_values: torch.Tensor, energy: float, rank: int) -> int:
    """The rank to keep: `rank` (capped at the full rank) or the smallest holding `energy`."""
    if rank > 0:
        return min(rank, singular_values.numel())
    squared = singular_values.double() ** 2
    kept = torch.cumsum(squared, 0) / squared.sum().clamp_min(torch.finfo(torch.float64).tiny)
    return int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype) - 1e-12).item()) + 1


def factor(weight: torch.Tensor, energy: float, rank: int, min_saving: float = 0.0
           ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A [r, in], B [out, r]) with B @ A ~ weight, or None when rank r saves less than `min_saving`
    of the multiply-adds (or nothing at all)."""
    out_features, in_features = weight.shape
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    r = choose_rank(s, energy, rank)
    dense = in_features * out_features
    if r * (in_features + out_features) >= dense or r * (in_features + out_features) > (1 - min_saving) * dense:
        return None
    root = s[:r].sqrt()
    first = (root[:, None] * vh[:r]).to(weight.dtype)
    second = (u[:, :r] * root[None, :]).to(weight.dtype)
    return first, second


def _constant(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def _is_pointwise_conv(node: fx.Node, ir: GraphIR) -> bool:
    if node.target is not aten.conv2d.default or not _constant(node.args[1]):
        return False
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    dilation = node.args[5] if len(node.args) > 5 else 1
    return ir.weight(node.args[1]).shape[2:] == (1, 1) and groups == 1 and dilation in (1, [1, 1], (1, 1))


def _factor_node(ir: GraphIR, node: fx.Node, options: LowRankOptions) -> bool:
    """Replace one linear / 1x1 conv by its two factors; False if it is kept."""
    weight = ir.weight(node.args[1])
    is_conv = node.target is aten.conv2d.default
    matrix = weight.flatten(1) if is_conv else weight
    factors = factor(matrix, options.energy, options.rank, options.min_saving)
    if factors is None:
        return False
    first, second = factors
    x, bias = node.args[0], (node.args[2] if len(node.args) > 2 else None)
    with ir.graph.inserting_before(node):
        if is_conv:
            stride = node.args[3] if len(node.args) > 3 else 1
            padding = node.args[4] if len(node.args) > 4 else 0
            a = ir.add_weight(f"{node.name}_lowrank_a", first[:, :, None, None])
            b = ir.add_weight(f"{node.name}_lowrank_b", second[:, :, None, None])
            inner = ir.create_node(aten.conv2d.default, (x, a, None, stride, padding), name=f"{node.name}_lowrank")
            outer = ir.create_node(aten.conv2d.default, (inner, b, bias), name=node.name)
        else:
            a = ir.add_weight(f"{node.name}_lowrank_a", first)
            b = ir.add_weight(f"{node.name}_lowrank_b", second)
            inner = ir.create_node(aten.linear.default, (x, a), name=f"{node.name}_lowrank")
            outer = ir.create_node(aten.linear.default, (inner, b, bias), name=node.name)
    node.replace_all_uses_with(outer)
    ir.graph.erase_node(node)
    return True


@register_pass
class LowRank(Pass):
    """Factor linear and 1x1-conv weights by truncated SVD into two smaller layers where that saves work."""

    name = "low-rank"
    Options = LowRankOptions

    def __init__(self, options: LowRankOptions | None = None):
        super().__init__(options)
        if not 0.0 < self.options.energy <= 1.0:
            raise PipelineError(f"pass 'low-rank': option 'energy' must be in (0, 1], got {self.options.energy}")
        if not 0.0 <= self.options.min_saving < 1.0:
            raise PipelineError(f"pass 'low-rank': option 'min_saving' must be in [0, 1), got {self.options.min_saving}")
        if self.options.rank < 0:
            raise PipelineError(f"pass 'low-rank': option 'rank' must be >= 0, got {self.options.rank}")

    def run(self, ir: GraphIR, ctx: PassContext) -> PassResult:
        params_before = ir.weight_bytes()
        factored = kept = 0
        for node in list(ir.graph.nodes):
            linear = node.target is aten.linear.default and _constant(node.args[1])
            if node.op != "call_function" or not (linear or _is_pointwise_conv(node, ir)):
                continue
            if ir.weight(node.args[1]).dtype not in (torch.float32, torch.float64):
                kept += 1
                continue
            if _factor_node(ir, node, self.options):
                factored += 1
            else:
                kept += 1
        if factored:
            ir.drop_unused_weights()
        saved = params_before - ir.weight_bytes()
        return PassResult(ir, factored > 0, {"factored": factored, "kept": kept, "bytes_saved": saved})
