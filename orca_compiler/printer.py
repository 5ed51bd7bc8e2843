"""Deterministic text form of the IR, one line per node: the same text serves dumps, diffs and tests.

    %x = input : f32[1,3,32,32]
    %conv_weight = weight conv_weight : f32[16,3,3,3]
    %conv2d = conv2d(%x, %conv_weight, None, [1, 1]) : f32[1,16,32,32] {from=fold-bn}
    return (%conv2d)
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .ir import ORIGIN

_DTYPE_ABBREV = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "bool",
}


def format_type(val: Any) -> str:
    """`f32[1,64,56,56]` for a tensor, `(f32[..], f32[..])` for a tuple, `?` when unknown."""
    if isinstance(val, torch.Tensor):
        dims = ",".join(str(d) for d in val.shape)
        return f"{_DTYPE_ABBREV.get(val.dtype, str(val.dtype).replace('torch.', ''))}[{dims}]"
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(format_type(v) for v in val) + ")"
    if val is None:
        return "?"
    return type(val).__name__


def op_name(node: fx.Node) -> str:
    """Short op name: `conv2d` for aten.conv2d.default, `add.Tensor` where the overload matters."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        packet = target._overloadpacket.__name__
        overload = target._overloadname
        ns = target.namespace
        base = packet if ns == "aten" else f"{ns}.{packet}"
        return base if overload == "default" else f"{base}.{overload}"
    return getattr(target, "__name__", str(target))


def _format_arg(arg: Any) -> str:
    if isinstance(arg, fx.Node):
        return f"%{arg.name}"
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(_format_arg(a) for a in arg)
        return f"[{inner}]" if isinstance(arg, list) else f"({inner})"
    if isinstance(arg, float):
        return repr(arg)
    if isinstance(arg, torch.dtype):
        return _DTYPE_ABBREV.get(arg, str(arg))
    return str(arg)


def format_node(node: fx.Node, *, show_origin: bool = True) -> str:
    """One line for one node (see the module docstring for the form)."""
    val = node.meta.get("val")
    if node.op == "placeholder":
        text = f"%{node.name} = input : {format_type(val)}"
    elif node.op == "get_attr":
        text = f"%{node.name} = weight {node.target} : {format_type(val)}"
    elif node.op == "output":
        return "return (" + ", ".join(_format_arg(a) for a in node.args[0]) + ")"
    else:
        args = [_format_arg(a) for a in node.args]
        args += [f"{k}={_format_arg(v)}" for k, v in node.kwargs.items()]
        text = f"%{node.name} = {op_name(node)}({', '.join(args)}) : {format_type(val)}"
    annotations = []
    origin = node.meta.get(ORIGIN)
    if show_origin and origin and origin != "capture":
        annotations.append(f"from={origin}")
    for key, value in sorted(node.meta.get("orca_annotations", {}).items()):
        annotations.append(f"{key}={value}")
    if annotations:
        text += " {" + ", ".join(annotations) + "}"
    return text


def format_graph(graph: fx.Graph, *, show_origin: bool = True) -> str:
    return "\n".join(format_node(n, show_origin=show_origin) for n in graph.nodes) + "\n"


def format_ir(ir, *, show_origin: bool = True) -> str:
    """The whole IR as text, one line per node in graph order."""
    return format_graph(ir.graph, show_origin=show_origin)
