"""Graph clean-up passes: dead-code elimination and common-subexpression elimination."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from orca_compiler.ir import GraphIR
from orca_compiler.pass_base import Pass, PassContext, PassResult, register_pass


@register_pass
class DeadCodeElimination(Pass):
    """Remove nodes whose results are never used, and the weights only they read."""

    name = "dce"

    def run(self, ir: GraphIR, ctx: PassContext) -> PassResult:
        before = len(ir.graph.nodes)
        # Keep get_attr nodes here: drop_unused_weights erases them and frees their tensors (fx's
        # DCE would erase them but leave the tensors registered, and they would not be counted).
        ir.graph.eliminate_dead_code(is_impure_node=lambda n: n.op == "get_attr" or n.is_impure())
        weights = ir.drop_unused_weights()
        removed = before - len(ir.graph.nodes)
        return PassResult(ir, removed > 0, {"nodes_removed": removed - weights, "weights_removed": weights})


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_hashable(v) for v in value))
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, fx.Node):
        return ("node", value.name)
    if isinstance(value, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return str(value)
    if isinstance(value, float):
        return ("float", repr(value))  # keeps 0.0 and -0.0 (and 1 and 1.0) apart
    if isinstance(value, bool):
        return ("bool", value)  # True == 1 in Python, but add(bool_t, True) is bool and add(bool_t, 1) is int64
    return value


def _is_deterministic(node: fx.Node) -> bool:
    target = node.target
    if node.is_impure():
        return False
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags:
        return False
    return True


@register_pass
class CommonSubexpressionElimination(Pass):
    """Merge nodes that compute the same op on the same inputs (and get_attrs of the same weight)."""

    name = "cse"

    def run(self, ir: GraphIR, ctx: PassContext) -> PassResult:
        seen: dict[Any, fx.Node] = {}
        merged = 0
        for node in list(ir.graph.nodes):
            if node.op == "get_attr":
                key = ("get_attr", node.target)
            elif node.op == "call_function" and _is_deterministic(node):
                key = (node.target, _hashable(node.args), _hashable(node.kwargs))
            else:
                continue
            try:
                hash(key)
            except TypeError:
                continue
            if key in seen:
                node.replace_all_uses_with(seen[key])
                ir.graph.erase_node(node)
                merged += 1
            else:
                seen[key] = node
        return PassResult(ir, merged > 0, {"merged": merged})
