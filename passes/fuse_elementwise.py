"""Elementwise fusion: a group of pointwise ops -> one orca.elementwise op with its program.

The group is the largest set of ops of ops/pointwise.py that ends at one op and whose other
values are used only inside the group (a DAG such as `x * sigmoid(x)` included); every value and
input is a float tensor of one dtype, so the program needs no type promotion. Its inputs are the
tensors the group reads from outside; numbers become literals of the program.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from orca_compiler.ir import GraphIR
from orca_compiler.ops import fused
from orca_compiler.ops.pointwise import Input, Result, Step, format_program, recognize
from orca_compiler.patterns import FusionRule, Match, Region

FAMILY = "elementwise"


def _float_tensor_of(node: fx.Node, dtype: torch.dtype | None = None) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point and (dtype is None or val.dtype == dtype)


def fusable(node: fx.Node) -> bool:
    """A pointwise op on float tensors of its own result's dtype."""
    if recognize(node) is None or not _float_tensor_of(node):
        return False
    dtype = node.meta["val"].dtype
    return all(_float_tensor_of(arg, dtype) for arg in node.all_input_nodes)


def elementwise(ir: GraphIR, m: Match) -> fx.Node:
    nodes: tuple[fx.Node, ...] = m["region"]
    position = {node: i for i, node in enumerate(nodes)}
    inputs: list[fx.Node] = []
    steps = []
    for node in nodes:
        name, operands = recognize(node)
        refs = []
        for operand in operands:
            if not isinstance(operand, fx.Node):
                refs.append(operand)
            elif operand in position:
                refs.append(Result(position[operand]))
            else:
                if operand not in inputs:
                    inputs.append(operand)
                refs.append(Input(inputs.index(operand)))
        steps.append(Step(name, tuple(refs)))
    return ir.create_node(fused.ELEMENTWISE, (inputs, format_program(steps)), name="elementwise")


RULES: list[FusionRule] = [FusionRule("elementwise", FAMILY, Region(fusable, min_ops=2), elementwise)]
