"""Attention fusion rules: matmul-softmax-matmul, and scaled_dot_product_attention, -> orca.attention.

`softmax(q @ k.transpose(-2, -1) * s + mask, -1) @ v` (the scale and the additive float mask
optional) becomes `orca.attention(q, k, v, mask, s)`, as does ATen's
`scaled_dot_product_attention` without dropout, so the lowering has one attention op to choose
kernels for (and the TVM converter honours `scale`, which TVM's own importer drops).
"""
from __future__ import annotations

import numbers

import torch
import torch.fx as fx

from orca_compiler.ir import GraphIR
from orca_compiler.ops import fused
from orca_compiler.ops.pointwise import arguments
from orca_compiler.patterns import FusionRule, Match, Op, Value, same_shape

aten = torch.ops.aten
FAMILY = "attention"
_MATMULS = {aten.matmul.default, aten.bmm.default}


def _val(value):
    return value.meta.get("val") if isinstance(value, fx.Node) else None


def _swaps_last_two_dims(node: fx.Node) -> bool:
    rank = _val(node).dim()
    a = arguments(node)
    return rank >= 2 and {a["dim0"] % rank, a["dim1"] % rank} == {rank - 2, rank - 1}


def _scalar_scale(node: fx.Node) -> bool:
    other = arguments(node)["other"]
    return isinstance(other, numbers.Real) and not isinstance(other, bool) and other != 0


def _unit_alpha(node: fx.Node) -> bool:
    return arguments(node).get("alpha", 1) == 1


def _softmax_last_dim(node: fx.Node) -> bool:
    a = arguments(node)
    if a.get("dtype") is not None or a.get("half_to_float"):
        return False
    return a["dim"] % _val(node).dim() == _val(node).dim() - 1


def _pattern(scaled: bool, masked: bool) -> Op:
    scores = Op(_MATMULS, Value("q"), Op({aten.transpose.int}, Value("k"), where=_swaps_last_two_dims))
    if scaled:
        scores = Op({aten.mul.Tensor, aten.div.Tensor}, scores, name="scale", where=_scalar_scale)
    if masked:
        scores = Op({aten.add.Tensor}, scores, Value("mask"), name="masked", where=_unit_alpha, commutative=True)
    probs = Op({aten.softmax.int, aten._softmax.default}, scores, where=_softmax_last_dim)
    return Op(_MATMULS, probs, Value("v"))


# -- constraints ----------------------------------------------------------------------------------

def same_batch_dims(m: Match) -> bool:
    """q, k and v are float tensors of one dtype and rank with the same batch dims (sdpa does not
    broadcast them as matmul does)."""
    vals = [_val(m[n]) for n in ("q", "k", "v")]
    if any(not isinstance(v, torch.Tensor) for v in vals):
        return False
    q = vals[0]
    return (q.dtype.is_floating_point and q.dim() >= 2
            and all(v.dtype == q.dtype and same_shape(v.shape[:-2], q.shape[:-2]) for v in vals))


def float_mask_without_broadcast(m: Match) -> bool:
    """The mask is a float tensor of q's dtype that broadcasts to the scores (not the other way)."""
    if "mask" not in m.bindings:
        return True
    mask, masked = _val(m["mask"]), m["masked"]
    scores = next(a for a in masked.args if a is not m["mask"])
    return (isinstance(mask, torch.Tensor) and mask.dtype == _val(m["q"]).dtype
            and same_shape(_val(masked).shape, _val(scores).shape))


def plain_sdpa(m: Match) -> bool:
    """sdpa without dropout or grouped-query heads, with no mask or a float one of q's dtype."""
    a = arguments(m["sdpa"])
    mask = _val(a["attn_mask"])
    mask_ok = a["attn_mask"] is None or (isinstance(mask, torch.Tensor) and mask.dtype == _val(a["query"]).dtype)
    return a["dropout_p"] == 0.0 and not a.get("enable_gqa", False) and mask_ok


# -- replacements ---------------------------------------------------------------------------------

def _scale(m: Match) -> float:
    if "scale" not in m.bindings:
        return 1.0  # the scores were not scaled (sdpa's default would be 1/sqrt(head dim))
    node = m["scale"]
    factor = float(arguments(node)["other"])
    return factor if node.target is aten.mul.Tensor else 1.0 / factor


def attention(ir: GraphIR, m: Match) -> fx.Node:
    args = (m["q"], m["k"], m["v"], m.get("mask"), _scale(m), False)
    return ir.create_node(fused.ATTENTION, args, name="attention")


def from_sdpa(ir: GraphIR, m: Match) -> fx.Node:
    a = arguments(m["sdpa"])
    args = (a["query"], a["key"], a["value"], a["attn_mask"], a.get("scale"), bool(a["is_causal"]))
    return ir.create_node(fused.ATTENTION, args, name="attention")


def _rules() -> list[FusionRule]:
    checks = (same_batch_dims, float_mask_without_broadcast)
    rules = []
    for scaled in (True, False):
        for masked in (True, False):
            name = "-".join(["attention"] + (["scaled"] if scaled else []) + (["masked"] if masked else []))
            rules.append(FusionRule(name, FAMILY, _pattern(scaled, masked), attention, checks))
    sdpa = Op({aten.scaled_dot_product_attention.default}, name="sdpa")
    rules.append(FusionRule("sdpa", FAMILY, sdpa, from_sdpa, (plain_sdpa,)))
    return rules


RULES: list[FusionRule] = _rules()
