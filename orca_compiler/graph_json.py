"""A GraphIR with static shapes as JSON plus a weights file: what serialize.py writes when it can.

`torch.export.load` imports TorchDynamo (~1 s in a fresh process), most of a warm-cache compile.
This format holds what the IR conventions need and nothing more: each node's op, name, target,
arguments and the shape/dtype/device of its value, and the weights in one `torch.save` file. On
load the values are meta tensors (shape and dtype: what the printer, the extern kernels and the
guards read), since making a FakeTensorMode imports TorchDynamo too; `LoadedIR` makes one only
when a pass asks for it. Graphs with symbolic shapes or arguments outside the ATen
vocabulary (`NotEncodable`) are written with torch.export instead.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from .ir import ORIGIN, GraphIR


class NotEncodable(Exception):
    """The graph holds something this format does not (a symbolic size, an unknown argument type)."""


def _target(target) -> str:
    if target is operator.getitem:
        return "operator.getitem"
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}::{target._opname}.{target._overloadname}"
    raise NotEncodable(f"call target {target!r}")


def _resolve(text: str):
    if text == "operator.getitem":
        return operator.getitem
    qualified, overload = text.rsplit(".", 1)
    namespace, name = qualified.split("::")
    return getattr(getattr(getattr(torch.ops, namespace), name), overload)


def _arg(value):
    if isinstance(value, fx.Node):
        return {"n": value.name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return {"l" if isinstance(value, list) else "t": [_arg(v) for v in value]}
    if isinstance(value, dict):
        return {"d": {str(k): _arg(v) for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).replace("torch.", "")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).replace("torch.", "")}
    if isinstance(value, torch.memory_format):
        return {"mf": str(value).replace("torch.", "")}
    raise NotEncodable(f"argument of type {type(value).__name__}")


def _unarg(value, env: dict):
    if not isinstance(value, dict):
        return value
    (kind, inner), = value.items()
    if kind == "n":
        return env[inner]
    if kind in ("l", "t"):
        items = [_unarg(v, env) for v in inner]
        return items if kind == "l" else tuple(items)
    if kind == "d":
        return {k: _unarg(v, env) for k, v in inner.items()}
    if kind == "device":
        return torch.device(inner)
    return getattr(torch, inner)  # dtype, layout, memory format


def _val(value):
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if not all(isinstance(s, int) for s in value.shape):
            raise NotEncodable("a symbolic size")
        return {"shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", ""), "device": str(value.device)}
    if isinstance(value, (list, tuple)):
        return [_val(v) for v in value]
    raise NotEncodable(f"a node value of type {type(value).__name__}")


def _unval(value):
    if value is None:
        return None
    if isinstance(value, list):
        return tuple(_unval(v) for v in value)
    return torch.empty(value["shape"], dtype=getattr(torch, value["dtype"]), device="meta")


class LoadedIR(GraphIR):
    """A GraphIR read by `decode`: node values are meta tensors, and its FakeTensorMode is made
    on first use (a pass adding nodes), not on load."""

    def __init__(self, gm: fx.GraphModule, *, in_spec=None, out_spec=None):  # noqa: super().__init__ skipped on purpose
        self.gm, self.in_spec, self.out_spec = gm, in_spec, out_spec
        self._fake_mode = None

    @property
    def fake_mode(self) -> FakeTensorMode:
        if self._fake_mode is None:
            self._fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        return self._fake_mode

    @fake_mode.setter
    def fake_mode(self, mode: FakeTensorMode) -> None:
        self._fake_mode = mode


def encode(ir: GraphIR) -> tuple[dict, dict]:
    """(graph as JSON-able dict, weights by attribute name); NotEncodable when it cannot."""
    nodes, weights = [], {}
    for node in ir.graph.nodes:
        entry = {"op": node.op, "name": node.name}
        if node.op == "call_function":
            entry["target"] = _target(node.target)
        elif node.op == "get_attr":
            entry["target"] = node.target
            weights[node.target] = ir.weight(node)
        if node.op in ("call_function", "output"):
            entry["args"] = _arg(node.args)
            entry["kwargs"] = _arg(node.kwargs)
        if "val" in node.meta:
            entry["val"] = _val(node.meta["val"])
        if ORIGIN in node.meta:
            entry["origin"] = node.meta[ORIGIN]
        nodes.append(entry)
    return {"nodes": nodes}, weights


def decode(data: dict, weights: dict) -> GraphIR:
    """The GraphIR `encode` wrote (specs are set by the caller)."""
    root = torch.nn.Module()
    for name, tensor in weights.items():
        root.register_buffer(name, tensor)
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for entry in data["nodes"]:
        op = entry["op"]
        if op == "output":
            node = graph.output(_unarg(entry["args"], env)[0])
        else:
            target = _resolve(entry["target"]) if op == "call_function" else entry.get("target", entry["name"])
            args = _unarg(entry.get("args", {"t": []}), env)
            kwargs = _unarg(entry.get("kwargs", {"d": {}}), env)
            node = graph.create_node(op, target, args, kwargs, name=entry["name"])
        if "val" in entry:
            node.meta["val"] = _unval(entry["val"])
        if "origin" in entry:
            node.meta[ORIGIN] = entry["origin"]
        env[entry["name"]] = node
    return LoadedIR(fx.GraphModule(root, graph))
