"""Constant folding: evaluate ops whose inputs are all weights or literals, store the results as weights."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from orca_compiler.ir import GraphIR, iter_tensor_vals
from orca_compiler.pass_base import Pass, PassContext, PassResult, register_pass


@dataclass
class FoldConstantsOptions:
    # A folded result may grow at most this many times over the weights it reads (so an `expand`
    # of a bias to a full activation shape is not baked into the program).
    max_growth: float = 2.0
    # Results smaller than this many elements are always folded (e.g. a zeros() initial RNN state).
    always_fold_numel: int = 4096


def _is_foldable_op(node: fx.Node) -> bool:
    target = node.target
    if node.op != "call_function" or node.is_impure():
        return False
    if isinstance(target, torch._ops.OpOverload):
        if torch.Tag.nondeterministic_seeded in target.tags:
            return False
        return True
    return target.__name__ == "getitem"


@register_pass
class FoldConstants(Pass):
    """Evaluate ops whose inputs are all weights or literals and replace them by the computed weight."""

    name = "fold-constants"
    Options = FoldConstantsOptions

    def run(self, ir: GraphIR, ctx: PassContext) -> PassResult:
        const: dict[fx.Node, object] = {}
        # Elements of stored weights each constant is computed from: a constant left unfolded (an
        # `expand` too large to store) is computed at run time from the weights it reads, so an op
        # on it must be measured against those weights, not against the unfolded result.
        stored: dict[fx.Node, int] = {}
        folded = 0
        for node in list(ir.graph.nodes):
            if node.op == "get_attr":
                const[node] = ir.weight(node)
                stored[node] = sum(t.numel() for t in iter_tensor_vals(const[node]))
                continue
            inputs = node.all_input_nodes
            if not _is_foldable_op(node) or not all(n in const for n in inputs):
                continue
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: const[a])
            with torch.no_grad():
                value = node.target(*args, **kwargs)
            const[node] = value
            read = sum(stored[n] for n in inputs)
            stored[node] = read
            if not isinstance(value, torch.Tensor) or not self._worth_folding(node, value, inputs, read):
                continue
            with ir.graph.inserting_before(node):
                weight = ir.add_weight(f"folded_{node.name}", value)
            node.replace_all_uses_with(weight)
            ir.graph.erase_node(node)
            const[weight] = value
            stored[weight] = value.numel()
            folded += 1
        if folded:
            # get_attr nodes are left to drop_unused_weights, which also frees their tensors.
            ir.graph.eliminate_dead_code(is_impure_node=lambda n: n.op == "get_attr" or n.is_impure())
            ir.drop_unused_weights()
        return PassResult(ir, folded > 0, {"folded": folded})

    def _worth_folding(self, node: fx.Node, value: torch.Tensor, inputs: list[fx.Node], read: int) -> bool:
        if any(user.op == "output" for user in node.users) and not inputs:
            return True
        if value.numel() <= self.options.always_fold_numel:
            return True
        return value.numel() <= self.options.max_growth * max(read, 1)
