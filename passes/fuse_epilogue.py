"""Epilogue fusion rules: conv/linear + residual add + activation -> one orca epilogue op.

`conv-add-relu` fuses `relu(conv2d(x, w, b) + r)` into `orca.conv_epilogue(..., residual=r,
activation="relu")`. Rules exist for conv and linear, with and without the residual add, and for
every activation of ops/pointwise.py; the longest patterns are tried first. They fuse only where
the weights are constants (the oneDNN kernels bind them) and the residual has the output's shape
and dtype (no broadcast).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from orca_compiler.ir import GraphIR
from orca_compiler.ops import fused
from orca_compiler.ops.pointwise import ACTIVATIONS, ATEN_OPS, activation_of, arguments
from orca_compiler.patterns import FusionRule, Match, Op, Value, same_shape

aten = torch.ops.aten
FAMILY = "epilogues"
CONVS = frozenset({aten.conv1d.default, aten.conv2d.default, aten.conv3d.default})


def _is_activation(name: str):
    def check(node: fx.Node) -> bool:
        found = activation_of(node)
        return found is not None and found[0] == name
    return check


def _unit_alpha(node: fx.Node) -> bool:
    return arguments(node).get("alpha", 1) == 1


def _anchor(kind: str) -> Op:
    targets = CONVS if kind == "conv" else {aten.linear.default}
    return Op(targets, name="anchor")


def _add(inner: Op) -> Op:
    return Op({aten.add.Tensor}, inner, Value("residual"), name="add", where=_unit_alpha, commutative=True)


def _act(name: str, inner: Op) -> Op:
    return Op(ATEN_OPS, inner, name="act", where=_is_activation(name))


# -- constraints ----------------------------------------------------------------------------------

def _is_weight(value) -> bool:
    return isinstance(value, fx.Node) and value.op == "get_attr"


def constant_weights(m: Match) -> bool:
    """The weight (and the bias, if any) are weights of the model, not computed values."""
    a = arguments(m["anchor"])
    return _is_weight(a["weight"]) and (a["bias"] is None or _is_weight(a["bias"]))


def floating_output(m: Match) -> bool:
    return m["anchor"].meta["val"].dtype.is_floating_point


def residual_like_output(m: Match) -> bool:
    """The residual is a tensor of the conv's output shape and dtype (an add that would broadcast
    the conv's result, or promote its dtype, is not an epilogue)."""
    if "residual" not in m.bindings:
        return True
    residual = m["residual"]
    if not isinstance(residual, fx.Node):
        return False
    r, out = residual.meta.get("val"), m["anchor"].meta["val"]
    return isinstance(r, torch.Tensor) and same_shape(r.shape, out.shape) and r.dtype == out.dtype


# -- replacements ---------------------------------------------------------------------------------

def _spatial(value, rank: int) -> list[int]:
    values = [value] if isinstance(value, int) else list(value)
    return values * rank if len(values) == 1 else values


def _activation(m: Match) -> tuple[str, list[float]]:
    return activation_of(m["act"]) if "act" in m.bindings else (fused.NO_ACTIVATION, [])


def conv_epilogue(ir: GraphIR, m: Match) -> fx.Node:
    a = arguments(m["anchor"])
    rank = a["weight"].meta["val"].dim() - 2
    activation, act_args = _activation(m)
    args = (a["input"], a["weight"], a["bias"], _spatial(a["stride"], rank), _spatial(a["padding"], rank),
            _spatial(a["dilation"], rank), a["groups"], m.get("residual"), activation, act_args)
    return ir.create_node(fused.CONV_EPILOGUE, args, name="conv_epilogue")


def linear_epilogue(ir: GraphIR, m: Match) -> fx.Node:
    a = arguments(m["anchor"])
    activation, act_args = _activation(m)
    args = (a["input"], a["weight"], a["bias"], m.get("residual"), activation, act_args)
    return ir.create_node(fused.LINEAR_EPILOGUE, args, name="linear_epilogue")


def _rules(kind: str) -> list[FusionRule]:
    replace = conv_epilogue if kind == "conv" else linear_epilogue
    checks = (constant_weights, floating_output, residual_like_output)
    rules = [FusionRule(f"{kind}-add-{act}", FAMILY, _act(act, _add(_anchor(kind))), replace, checks)
             for act in ACTIVATIONS]
    rules += [FusionRule(f"{kind}-{act}", FAMILY, _act(act, _anchor(kind)), replace, checks) for act in ACTIVATIONS]
    rules.append(FusionRule(f"{kind}-add", FAMILY, _add(_anchor(kind)), replace, checks))
    return rules


RULES: list[FusionRule] = _rules("conv") + _rules("linear")
