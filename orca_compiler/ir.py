"""The graph IR: an ATen-level torch.fx graph with weights as get_attr nodes and shapes on every node.

Conventions every pass keeps (the verifier checks them):
- placeholders are the user's tensor inputs, in call order; weights and constants are `get_attr`
  nodes whose target names a tensor registered on the module;
- the output node returns a flat tuple of values; `out_spec` rebuilds the user's pytree;
- every value node carries `meta["val"]`, a FakeTensor (or a tuple of them) with its shape and dtype;
- `meta["orca_origin"]` names what created the node ("capture" or a pass name).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import networkx as nx
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import _pytree as pytree

ORIGIN = "orca_origin"


def _fake_mode_of(gm: fx.GraphModule) -> FakeTensorMode:
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        for leaf in pytree.tree_leaves(val):
            mode = getattr(leaf, "fake_mode", None)
            if mode is not None:
                return mode
    return FakeTensorMode(allow_non_fake_inputs=True)


def sanitize_name(name: str) -> str:
    """Turn a dotted module path ("layer1.0.conv.weight") into an attribute name."""
    cleaned = re.sub(r"[^0-9a-zA-Z_]", "_", name)
    return cleaned if not cleaned[:1].isdigit() else "_" + cleaned


class GraphIR:
    """A captured model: an fx.GraphModule plus the pytree specs of its call convention.

    Assumes the conventions in the module docstring. Weight tensors are never mutated in place;
    a pass that changes a weight registers a new one with `add_weight`.
    """

    def __init__(self, gm: fx.GraphModule, *, in_spec=None, out_spec=None):
        self.gm = gm
        self.in_spec = in_spec
        self.out_spec = out_spec
        self.fake_mode = _fake_mode_of(gm)

    # -- structure -------------------------------------------------------------------------
    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def input_nodes(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if n.op == "placeholder"]

    def output_node(self) -> fx.Node:
        return next(n for n in reversed(self.graph.nodes) if n.op == "output")

    def output_values(self) -> list[Any]:
        return list(self.output_node().args[0])

    def compute_nodes(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if n.op == "call_function"]

    def num_nodes(self) -> int:
        return len(self.compute_nodes())

    # -- weights ---------------------------------------------------------------------------
    def weight(self, node_or_name: fx.Node | str) -> torch.Tensor:
        name = node_or_name.target if isinstance(node_or_name, fx.Node) else node_or_name
        return getattr(self.gm, name)

    def weights(self) -> dict[str, torch.Tensor]:
        return {n.target: self.weight(n) for n in self.graph.nodes if n.op == "get_attr"}

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weights().values())

    def add_weight(self, name_hint: str, tensor: torch.Tensor) -> fx.Node:
        """Register `tensor` on the module and return a new get_attr node for it.

        The node is inserted at the graph's current insertion point (use `graph.inserting_before`).
        """
        name = base = sanitize_name(name_hint)
        i = 1
        while hasattr(self.gm, name):
            name = f"{base}_{i}"
            i += 1
        self.gm.register_buffer(name, tensor.detach().contiguous())
        node = self.graph.get_attr(name)
        node.meta["val"] = self.fake_mode.from_tensor(getattr(self.gm, name), static_shapes=True)
        return node

    def drop_unused_weights(self) -> int:
        """Erase get_attr nodes without users and free their tensors; returns how many."""
        removed = 0
        for node in list(self.graph.nodes):
            if node.op == "get_attr" and not node.users:
                target = node.target
                self.graph.erase_node(node)
                if not any(n.op == "get_attr" and n.target == target for n in self.graph.nodes):
                    if target in self.gm._buffers:
                        del self.gm._buffers[target]
                    elif hasattr(self.gm, target):
                        delattr(self.gm, target)
                removed += 1
        return removed

    # -- shapes ----------------------------------------------------------------------------
    def infer_val(self, node: fx.Node) -> Any:
        """Compute `node`'s FakeTensor result from its inputs' recorded `meta["val"]`."""
        if node.op == "get_attr":
            return self.fake_mode.from_tensor(self.weight(node), static_shapes=True)
        if node.op != "call_function":
            raise ValueError(f"cannot infer a value for {node.op} node %{node.name}")
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: a.meta["val"])
        with self.fake_mode:
            return node.target(*args, **kwargs)

    def create_node(self, target: Callable, args: tuple, kwargs: dict | None = None, *, name: str | None = None) -> fx.Node:
        """Insert a call_function node (at the current insertion point) with its shape inferred."""
        node = self.graph.call_function(target, args, kwargs or {})
        if name:
            node.name = self.graph._graph_namespace.create_name(name, None)
        node.meta["val"] = self.infer_val(node)
        return node

    # -- execution and views ----------------------------------------------------------------
    def recompile(self) -> None:
        self.gm.recompile()

    def run(self, *inputs: torch.Tensor) -> tuple:
        """Run the IR in eager PyTorch (each ATen op called directly) and return the flat outputs."""
        self.gm.recompile()  # a pass may have edited the graph since the code was generated
        with torch.no_grad():
            out = self.gm(*inputs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def to_networkx(self) -> nx.DiGraph:
        """A DiGraph of node names with an edge for each use (attrs: op, target)."""
        g = nx.DiGraph()
        for node in self.graph.nodes:
            g.add_node(node.name, op=node.op, target=str(node.target))
            for user in node.users:
                g.add_edge(node.name, user.name)
        return g

    def copy(self) -> "GraphIR":
        """A copy with its own graph; weight tensors are shared (they are never mutated)."""
        root = torch.nn.Module()
        for name, tensor in self.gm.named_buffers():
            root.register_buffer(name, tensor)
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for node in self.graph.nodes:
            env[node] = graph.node_copy(node, lambda a: env[a])
            env[node].meta = dict(node.meta)
        return GraphIR(fx.GraphModule(root, graph), in_spec=self.in_spec, out_spec=self.out_spec)

    def __str__(self) -> str:
        from .printer import format_ir

        return format_ir(self)


def from_exported_program(ep: torch.export.ExportedProgram) -> GraphIR:
    """Build a GraphIR from an ExportedProgram: lifted parameters/buffers/constants become get_attr."""
    sig = ep.graph_signature
    lifted = {
        **sig.inputs_to_parameters,
        **sig.inputs_to_buffers,
        **sig.inputs_to_lifted_tensor_constants,
    }
    tensors = {**ep.state_dict, **ep.constants}
    root = torch.nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    user_outputs = set(sig.user_outputs)
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in lifted:
            source = lifted[node.name]
            name = sanitize_name(source)
            if not hasattr(root, name):
                root.register_buffer(name, tensors[source].detach())
            new = graph.get_attr(name)
            new.meta = dict(node.meta)
            new.meta["orca_source"] = source  # the parameter's path in the user's module
        elif node.op == "output":
            outs = [a for a in node.args[0] if getattr(a, "name", None) in user_outputs or not isinstance(a, fx.Node)]
            new = graph.output(tuple(fx.node.map_arg(tuple(outs), lambda a: env[a])))
        else:
            new = graph.node_copy(node, lambda a: env[a])
            new.meta = dict(node.meta)
        new.meta.setdefault(ORIGIN, "capture")
        env[node] = new
    gm = fx.GraphModule(root, graph)
    return GraphIR(gm, in_spec=ep.call_spec.in_spec, out_spec=ep.call_spec.out_spec)


def to_exported_program(gm: fx.GraphModule, extra_outputs: Iterable[fx.Node] = ()) -> torch.export.ExportedProgram:
    """Wrap a GraphIR-convention GraphModule as an ExportedProgram (get_attr lifted to inputs),
    its outputs followed by the values of `extra_outputs` (nodes of `gm`).

    No retracing: the graph is reused as is, so this is cheap. Used by the lowering, whose
    importer (TVM's from_exported_program) reads the graph signature.
    """
    from torch.export import ExportedProgram
    from torch.export.graph_signature import (
        ExportGraphSignature, InputKind, InputSpec, OutputKind, OutputSpec, TensorArgument,
    )

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    specs: list[InputSpec] = []
    state: dict[str, torch.Tensor] = {}
    lifted_for: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in lifted_for:
            p = graph.placeholder("w_" + sanitize_name(node.target))
            p.meta = dict(node.meta)
            lifted_for[node.target] = p
            state[node.target] = getattr(gm, node.target)
            specs.append(InputSpec(InputKind.BUFFER, TensorArgument(p.name), target=node.target, persistent=True))
        if node.op == "get_attr":
            env[node] = lifted_for[node.target]
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            p = graph.placeholder(node.name)
            p.meta = dict(node.meta)
            env[node] = p
            specs.append(InputSpec(InputKind.USER_INPUT, TensorArgument(p.name), target=None))
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        env[node] = graph.node_copy(node, lambda a: env[a])
        env[node].meta = dict(node.meta)
    out = next(n for n in graph.nodes if n.op == "output")
    if extra_outputs:
        out.args = ((*out.args[0], *(env[n] for n in extra_outputs)),)
    out_specs = [OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(a.name), target=None) for a in out.args[0]]
    root = torch.nn.Module()
    for name, tensor in state.items():
        root.register_buffer(name, tensor)
    new_gm = fx.GraphModule(root, graph)
    return ExportedProgram(
        root=new_gm,
        graph=new_gm.graph,
        graph_signature=ExportGraphSignature(specs, out_specs),
        state_dict=state,
        range_constraints={},
        module_call_graph=[],
        example_inputs=None,
        constants={},
    )


def iter_tensor_vals(val: Any) -> Iterable[torch.Tensor]:
    return (v for v in pytree.tree_leaves(val) if isinstance(v, torch.Tensor))
