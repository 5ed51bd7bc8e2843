"""The IR verifier: checks the conventions in `orca_compiler.ir` and that every recorded shape and
dtype agrees with what its op computes from its inputs' recorded shapes."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from .errors import VerificationError
from .ir import GraphIR
from .printer import format_type, op_name


def _same_type(a, b) -> bool:
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor) and (tuple(x.shape) != tuple(y.shape) or x.dtype != y.dtype):
            return False
    return True


def verify(ir: GraphIR) -> None:
    """Raise VerificationError naming the first node that breaks an IR invariant."""
    try:
        ir.graph.lint()
    except Exception as exc:  # fx's lint raises RuntimeError with its own message
        raise VerificationError(f"graph structure is invalid: {exc}") from exc
    seen_output = False
    for node in ir.graph.nodes:
        if seen_output:
            raise VerificationError("node after the output node", node=node.name)
        if node.op == "output":
            seen_output = True
            if not isinstance(node.args[0], (tuple, list)):
                raise VerificationError("the output node must return a flat tuple")
            continue
        if node.op not in ("placeholder", "get_attr", "call_function"):
            raise VerificationError(f"unexpected node kind '{node.op}'", node=node.name)
        val = node.meta.get("val")
        if val is None:
            raise VerificationError("has no recorded shape/dtype (meta['val'])", node=node.name)
        if node.op == "get_attr":
            if not hasattr(ir.gm, node.target):
                raise VerificationError(f"weight '{node.target}' is not registered on the module", node=node.name)
            tensor = ir.weight(node)
            if tuple(tensor.shape) != tuple(val.shape) or tensor.dtype != val.dtype:
                raise VerificationError(
                    f"weight '{node.target}' is {format_type(tensor)} but recorded as {format_type(val)}",
                    node=node.name,
                )
        elif node.op == "call_function":
            try:
                expected = ir.infer_val(node)
            except Exception as exc:
                raise VerificationError(
                    f"{op_name(node)} cannot run on its recorded input types: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                    node=node.name,
                ) from exc
            if not _same_type(expected, val):
                raise VerificationError(
                    f"{op_name(node)} computes {format_type(expected)} but the IR records {format_type(val)}",
                    node=node.name,
                )
    if not seen_output:
        raise VerificationError("the graph has no output node")
