"""Relax converters for reductions TVM 0.27's torch importer lacks: `amax`, `amin` (what
`logsumexp` and `F.softmax`-style code decompose to) and `min.dim` (it has `max.dim`). Without
them each such op ran in eager between two TVM partitions. Registered by support.py.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .support import register_converter

aten = torch.ops.aten


def _dims(node: fx.Node, position: int = 1):
    dims = node.args[position] if len(node.args) > position else node.kwargs.get("dim", [])
    return None if dims in ([], (), None) else ([dims] if isinstance(dims, int) else list(dims))


def _keepdim(node: fx.Node, position: int = 2) -> bool:
    return bool(node.args[position] if len(node.args) > position else node.kwargs.get("keepdim", False))


def convert_amax(node: fx.Node, importer):
    from tvm import relax

    x = importer.env[node.args[0]]
    return importer.block_builder.emit(relax.op.max(x, axis=_dims(node), keepdims=_keepdim(node)))


def convert_amin(node: fx.Node, importer):
    from tvm import relax

    x = importer.env[node.args[0]]
    return importer.block_builder.emit(relax.op.min(x, axis=_dims(node), keepdims=_keepdim(node)))


def convert_min_dim(node: fx.Node, importer):
    """(values, indices) of the smallest element along `dim`, as TVM's max.dim does the largest."""
    from tvm import relax

    bb = importer.block_builder
    x, dim = importer.env[node.args[0]], node.args[1]
    both = bb.emit(relax.op.topk(x, k=1, axis=dim, largest=False, ret_type="both", dtype="int64"))
    values, indices = bb.emit(relax.TupleGetItem(both, 0)), bb.emit(relax.TupleGetItem(both, 1))
    if not _keepdim(node):
        values = bb.emit(relax.op.squeeze(values, axis=[dim]))
        indices = bb.emit(relax.op.squeeze(indices, axis=[dim]))
    return bb.emit(relax.Tuple([values, indices]))


register_converter(aten.amax.default, convert_amax)
register_converter(aten.amin.default, convert_amin)
register_converter(aten.min.dim, convert_min_dim)
