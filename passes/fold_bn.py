"""Fold eval-mode BatchNorm into the convolution or linear layer that feeds it."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from orca_compiler.ir import GraphIR
from orca_compiler.pass_base import Pass, PassContext, PassResult, register_pass

aten = torch.ops.aten
_BN = aten._native_batch_norm_legit_no_training.default
_CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}


def _weight_or_none(ir: GraphIR, arg) -> torch.Tensor | None:
    if arg is None:
        return None
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        return ir.weight(arg)
    raise LookupError


def _bn_output(bn: fx.Node) -> fx.Node | None:
    """The getitem(bn, 0) that carries BatchNorm's result, if the other outputs are unused."""
    users = list(bn.users)
    if len(users) != 1 or users[0].target is not operator.getitem or users[0].args[1] != 0:
        return None
    return users[0]


@register_pass
class FoldBatchNorm(Pass):
    """Fold eval BatchNorm into the preceding conv/linear weights and bias (exact up to fp rounding)."""

    name = "fold-bn"
    establishes = ("bn-folded",)

    def run(self, ir: GraphIR, ctx: PassContext) -> PassResult:
        folded = 0
        for bn in list(ir.graph.nodes):
            if bn.op != "call_function" or bn.target is not _BN:
                continue
            producer = bn.args[0]
            out = _bn_output(bn)
            if out is None or not isinstance(producer, fx.Node) or len(producer.users) != 1:
                continue
            is_conv = producer.target in _CONVS
            # Linear + BatchNorm1d folds only for [N, C] outputs, where C is the linear's out dim.
            is_linear_2d = producer.target is aten.linear.default and producer.meta["val"].dim() == 2
            if not (is_conv or is_linear_2d):
                continue
            try:
                gamma, beta, mean, var = (_weight_or_none(ir, a) for a in bn.args[1:5])
                weight = _weight_or_none(ir, producer.args[1])
                bias = _weight_or_none(ir, producer.args[2] if len(producer.args) > 2 else None)
            except LookupError:
                continue  # an operand is computed at run time: nothing to fold
            if weight is None or mean is None or var is None:
                continue
            eps = bn.args[6]
            scale = torch.rsqrt(var.double() + eps)
            if gamma is not None:
                scale = scale * gamma.double()
            shape = (-1,) + (1,) * (weight.dim() - 1)
            new_weight = (weight.double() * scale.reshape(shape)).to(weight.dtype)
            new_bias = -mean.double() * scale
            if bias is not None:
                new_bias = new_bias + bias.double() * scale
            if beta is not None:
                new_bias = new_bias + beta.double()
            new_bias = new_bias.to(weight.dtype)
            with ir.graph.inserting_before(producer):
                w_node = ir.add_weight(f"{producer.name}_bn_weight", new_weight)
                b_node = ir.add_weight(f"{producer.name}_bn_bias", new_bias)
                args = list(producer.args) + [None] * (3 - len(producer.args))
                args[1], args[2] = w_node, b_node
                fused = ir.create_node(producer.target, tuple(args), dict(producer.kwargs), name=producer.name)
            out.replace_all_uses_with(fused)
            for dead in (out, bn, producer):
                ir.graph.erase_node(dead)
            folded += 1
        if folded:
            ir.drop_unused_weights()
        return PassResult(ir, folded > 0, {"folded": folded})
