"""Pointwise functions as data: one table gives each its PyTorch, Relax and oneDNN forms.

The fusion rules recognise ATen ops as entries of this table (`recognize`); the fused ops
(ops/fused.py) run the entries in PyTorch, the lowering emits them in Relax
(lowering/fused_kernels.py) and the oneDNN kernels take the activations among them as post-ops
(lowering/extern.py). Adding a function here makes it fusable everywhere at once.

An elementwise program (the `program` of `orca::elementwise`) is text over these names, one step
per `;`: `mul(%0, 2.0); add($0, %1); sigmoid($1)`. `%i` is the i-th input tensor, `$j` the result
of step j, and anything else a number; the last step is the result.
"""
from __future__ import annotations

import functools
import math
import numbers
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

aten = torch.ops.aten


@dataclass(frozen=True)
class Pointwise:
    """One pointwise function.

    `arity` leading operands are tensors (a number there acts as a scalar tensor); the operands
    after them are numbers (clamp's bounds, leaky_relu's slope). `torch(*operands)` and
    `relax(rx, *operands)` compute it (`rx` is the `tvm.relax` module, passed in so that this
    table does not import TVM). For an activation (a function of one tensor), `inplace` updates
    its operand in place and `onednn(*numbers)` gives oneDNN's post-op `(attr, scalars, algorithm)`,
    or is None where oneDNN has no such post-op.
    """

    name: str
    arity: int
    torch: Callable
    relax: Callable
    activation: bool = False
    inplace: Callable | None = None
    onednn: Callable | None = None


def _dtype(x) -> str:
    return x.ty.dtype


def _hardsigmoid_relax(rx, x):
    three, six = rx.const(3.0, _dtype(x)), rx.const(6.0, _dtype(x))
    return rx.op.divide(rx.op.clip(rx.op.add(x, three), 0.0, 6.0), six)


def _post_op(attr: str, algorithm: str = "") -> Callable:
    return lambda *scalars: (attr, list(scalars), algorithm)


def _binary(name: str, fn: Callable, relax_name: str) -> Pointwise:
    return Pointwise(name, 2, fn, lambda rx, a, b: getattr(rx.op, relax_name)(a, b))


def _unary(name: str, fn: Callable, relax_fn: Callable) -> Pointwise:
    return Pointwise(name, 1, fn, relax_fn)


def _activation(name: str, fn: Callable, relax_fn: Callable, inplace: Callable, onednn: Callable | None) -> Pointwise:
    return Pointwise(name, 1, fn, relax_fn, activation=True, inplace=inplace, onednn=onednn)


_TABLE = [
    _binary("add", operator.add, "add"),
    _binary("sub", operator.sub, "subtract"),
    _binary("mul", operator.mul, "multiply"),
    _binary("div", operator.truediv, "divide"),
    _binary("pow", operator.pow, "power"),
    _unary("neg", torch.neg, lambda rx, x: rx.op.negative(x)),
    _unary("exp", torch.exp, lambda rx, x: rx.op.exp(x)),
    _unary("log", torch.log, lambda rx, x: rx.op.log(x)),
    _unary("sqrt", torch.sqrt, lambda rx, x: rx.op.sqrt(x)),
    _unary("rsqrt", torch.rsqrt, lambda rx, x: rx.op.rsqrt(x)),
    _unary("abs", torch.abs, lambda rx, x: rx.op.abs(x)),
    _unary("erf", torch.erf, lambda rx, x: rx.op.erf(x)),
    _activation("relu", torch.relu, lambda rx, x: rx.op.nn.relu(x), torch.relu_, _post_op("relu")),
    # hardtanh and ReLU6 are clamps; oneDNN calls its clip post-op "hardtanh" (inf bounds work).
    _activation("clamp", torch.clamp, lambda rx, x, lo, hi: rx.op.clip(x, lo, hi), torch.clamp_, _post_op("hardtanh")),
    _activation("gelu", F.gelu, lambda rx, x: rx.op.nn.gelu(x), aten.gelu_, _post_op("gelu", "none")),
    _activation("gelu_tanh", functools.partial(F.gelu, approximate="tanh"), lambda rx, x: rx.op.nn.gelu_tanh(x),
                functools.partial(aten.gelu_, approximate="tanh"), _post_op("gelu", "tanh")),
    _activation("silu", F.silu, lambda rx, x: rx.op.nn.silu(x), functools.partial(F.silu, inplace=True),
                _post_op("swish")),
    _activation("sigmoid", torch.sigmoid, lambda rx, x: rx.op.sigmoid(x), torch.sigmoid_, _post_op("sigmoid")),
    _activation("tanh", torch.tanh, lambda rx, x: rx.op.tanh(x), torch.tanh_, _post_op("tanh")),
    _activation("leaky_relu", F.leaky_relu, lambda rx, x, slope: rx.op.nn.leakyrelu(x, slope),
                lambda x, slope: F.leaky_relu(x, slope, inplace=True), _post_op("leaky_relu")),
    _activation("hardsigmoid", F.hardsigmoid, _hardsigmoid_relax, functools.partial(F.hardsigmoid, inplace=True),
                _post_op("hardsigmoid")),
    _activation("hardswish", F.hardswish, lambda rx, x: rx.op.multiply(x, _hardsigmoid_relax(rx, x)),
                functools.partial(F.hardswish, inplace=True), _post_op("hardswish")),
]

POINTWISE: dict[str, Pointwise] = {p.name: p for p in _TABLE}
ACTIVATIONS: tuple[str, ...] = tuple(p.name for p in _TABLE if p.activation)


# -- recognising ATen ops ------------------------------------------------------------------------

def arguments(node: fx.Node) -> dict[str, Any]:
    """A call's arguments by schema name, defaults filled in (`node.target` is an OpOverload)."""
    values = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            values[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            values[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            values[arg.name] = arg.default_value
    return values


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _plain(name: str, *names: str) -> Callable:
    return lambda a: (name, [a[n] for n in names])


def _unit_alpha(name: str) -> Callable:
    return lambda a: (name, [a["self"], a["other"]]) if a.get("alpha", 1) == 1 else None


def _rsub(a):
    return ("sub", [a["other"], a["self"]]) if a.get("alpha", 1) == 1 else None


def _gelu(a):
    name = {"none": "gelu", "tanh": "gelu_tanh"}.get(a["approximate"])
    return (name, [a["self"]]) if name else None


def _clamp(lo_key: str | None, hi_key: str | None) -> Callable:
    def recognize(a):
        lo = a.get(lo_key) if lo_key else None
        hi = a.get(hi_key) if hi_key else None
        if any(b is not None and not _number(b) for b in (lo, hi)):
            return None  # tensor bounds
        return ("clamp", [a["self"], -math.inf if lo is None else float(lo), math.inf if hi is None else float(hi)])
    return recognize


# ATen op -> fn(arguments by name) -> (pointwise name, operands) or None where the call's
# arguments make it something else (an add with alpha, clamp with tensor bounds).
_ATEN: dict[Any, Callable] = {
    aten.add.Tensor: _unit_alpha("add"), aten.add.Scalar: _unit_alpha("add"),
    aten.sub.Tensor: _unit_alpha("sub"), aten.sub.Scalar: _unit_alpha("sub"),
    aten.rsub.Scalar: _rsub,
    aten.mul.Tensor: _plain("mul", "self", "other"), aten.mul.Scalar: _plain("mul", "self", "other"),
    aten.div.Tensor: _plain("div", "self", "other"), aten.div.Scalar: _plain("div", "self", "other"),
    aten.pow.Tensor_Scalar: _plain("pow", "self", "exponent"),
    aten.neg.default: _plain("neg", "self"), aten.exp.default: _plain("exp", "self"),
    aten.log.default: _plain("log", "self"), aten.sqrt.default: _plain("sqrt", "self"),
    aten.rsqrt.default: _plain("rsqrt", "self"), aten.abs.default: _plain("abs", "self"),
    aten.erf.default: _plain("erf", "self"),
    aten.relu.default: _plain("relu", "self"),
    aten.hardtanh.default: _clamp("min_val", "max_val"),
    aten.relu6.default: lambda a: ("clamp", [a["self"], 0.0, 6.0]),
    aten.clamp.default: _clamp("min", "max"),
    aten.clamp_min.default: _clamp("min", None), aten.clamp_max.default: _clamp(None, "max"),
    aten.gelu.default: _gelu,
    aten.silu.default: _plain("silu", "self"),
    aten.sigmoid.default: _plain("sigmoid", "self"), aten.tanh.default: _plain("tanh", "self"),
    aten.leaky_relu.default: _plain("leaky_relu", "self", "negative_slope"),
    aten.hardsigmoid.default: _plain("hardsigmoid", "self"), aten.hardswish.default: _plain("hardswish", "self"),
}
ATEN_OPS = frozenset(_ATEN)


def recognize(node: fx.Node) -> tuple[str, list] | None:
    """`(name, operands)` if `node` computes a function of the table, else None.

    Operands are the node's own arguments: fx nodes or numbers in the tensor positions, numbers
    after them.
    """
    if node.op != "call_function" or node.target not in _ATEN:
        return None
    found = _ATEN[node.target](arguments(node))
    if found is None:
        return None
    name, operands = found
    arity = POINTWISE[name].arity
    tensors_ok = all(isinstance(o, fx.Node) or _number(o) for o in operands[:arity])
    if not tensors_ok or not any(isinstance(o, fx.Node) for o in operands[:arity]):
        return None
    if not all(_number(o) for o in operands[arity:]):
        return None
    return name, [o if isinstance(o, fx.Node) else float(o) for o in operands]


def activation_of(node: fx.Node) -> tuple[str, list[float]] | None:
    """`(activation name, its numbers)` if `node` applies an activation to one tensor."""
    found = recognize(node)
    if found is None or not POINTWISE[found[0]].activation or not isinstance(found[1][0], fx.Node):
        return None
    return found[0], found[1][1:]


# -- elementwise programs ------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    """One step of a program: a pointwise name and its operands, each an `Input(i)`, a `Result(j)`
    or a float."""

    name: str
    operands: tuple


@dataclass(frozen=True)
class Input:
    index: int


@dataclass(frozen=True)
class Result:
    index: int


_STEP = re.compile(r"^\s*([a-z_0-9]+)\((.*)\)\s*$")


def _format_operand(operand) -> str:
    if isinstance(operand, Input):
        return f"%{operand.index}"
    if isinstance(operand, Result):
        return f"${operand.index}"
    return repr(float(operand))


def format_program(steps: list[Step]) -> str:
    """The text of a program (see the module docstring)."""
    return "; ".join(f"{s.name}({', '.join(_format_operand(o) for o in s.operands)})" for s in steps)


def _parse_operand(text: str, step: int):
    text = text.strip()
    if text.startswith("%"):
        return Input(int(text[1:]))
    if text.startswith("$"):
        index = int(text[1:])
        if index >= step:
            raise ValueError(f"step {step} reads ${index}, which is not computed yet")
        return Result(index)
    return float(text)


@functools.lru_cache(maxsize=256)
def parse_program(text: str) -> tuple[Step, ...]:
    """Parse program text; ValueError names the step that is malformed or unknown."""
    steps = []
    for i, part in enumerate(text.split(";")):
        match = _STEP.match(part)
        if not match or match.group(1) not in POINTWISE:
            raise ValueError(f"step {i} of elementwise program {text!r} is not a known pointwise call: "
                             f"{part.strip()!r}")
        args = [a for a in match.group(2).split(",") if a.strip()]
        steps.append(Step(match.group(1), tuple(_parse_operand(a, i) for a in args)))
    if not steps:
        raise ValueError("an elementwise program needs at least one step")
    return tuple(steps)


def run_program(text: str, inputs: list, apply: Callable[[Pointwise, list], Any]) -> Any:
    """Evaluate a program: `apply(entry, operands)` computes one step from its operands (input
    values, step results and floats); returns the last step's value. The same interpreter runs
    the program in PyTorch and emits it in Relax."""
    results: list = []
    for step in parse_program(text):
        operands = [inputs[o.index] if isinstance(o, Input) else results[o.index] if isinstance(o, Result) else o
                    for o in step.operands]
        results.append(apply(POINTWISE[step.name], operands))
    return results[-1]
