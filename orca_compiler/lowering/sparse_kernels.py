"""The TVM candidate of the sparse ops (ops/sparse.py): a dense kernel on the re-densified weight.

TVM 0.27 has no sparse kernel to reach: `topi.nn.sparse_dense` and Relax's sparse ops are gone, and
its PyTorch importer densifies sparse tensors itself. So the converter here re-densifies the CSR
weight once, at conversion, and emits Relax's `linear` with it as a constant: the same kernel a
dense linear gets. Whether this, a dense extern kernel (mkldnn, mkl) or the sparse CSR kernel
("torch") runs is the kernel selection's measurement. Imported lazily by support.py.
"""
from __future__ import annotations

import torch.fx as fx

from ..errors import LoweringError
from ..ops import sparse as sparse_ops
from .support import register_converter


def convert_sparse_linear(node: fx.Node, importer):
    """orca.sparse_linear -> Relax linear with the dense weight as a constant."""
    from tvm import relax as rx

    x, values, cols, crows, bias, out_features, in_features = node.args
    try:
        arrays = [importer.weights[a.name] for a in (values, cols, crows)]
    except (KeyError, AttributeError):
        raise LoweringError(f"%{node.name}: the CSR arrays of a sparse linear must be constant weights") from None
    weight = sparse_ops.densify(*arrays, out_features, in_features)
    dtype = str(weight.dtype).replace("torch.", "")
    constant = rx.const(weight.numpy(), dtype)
    bias_var = None if bias is None else importer.env[bias]
    return importer.block_builder.emit(rx.op.linear(importer.env[x], constant, bias_var, dtype))


register_converter(sparse_ops.SPARSE_LINEAR, convert_sparse_linear)
