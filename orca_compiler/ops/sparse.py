"""Sparse ops: a linear layer whose weight is stored in CSR form (created by the pruning passes).

- `orca::sparse_linear(x, values, col_indices, crow_indices, bias?, out_features, in_features)` =
  `linear(x, W, bias)` where `W: [out_features, in_features]` is the CSR matrix of `values`
  (the non-zeros, row by row), `col_indices` (their columns) and `crow_indices` (`[out + 1]`:
  where each row starts in `values`). Indices are int32, as torch's CPU CSR kernels take them.

The eager implementation multiplies with torch's sparse CSR kernel (`torch.addmm` with a CSR
first operand: MKL's sparse BLAS on CPU); it is also the "torch" kernel candidate of the
lowering. The lowering's dense candidates run on the weight re-densified with `densify`.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

INDEX_DTYPE = torch.int32


def to_csr(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(values, col_indices, crow_indices) of a 2-d dense `weight` (zeros dropped, int32 indices)."""
    if weight.dim() != 2:
        raise ValueError(f"to_csr takes a 2-d weight, got {weight.dim()}-d")
    weight = weight.detach()
    nonzero = weight != 0
    crow = torch.zeros(weight.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(nonzero.sum(1), 0, out=crow[1:])
    return (weight[nonzero].contiguous(), nonzero.nonzero()[:, 1].to(INDEX_DTYPE).contiguous(),
            crow.to(INDEX_DTYPE))


def csr_bytes(values: Tensor, col_indices: Tensor, crow_indices: Tensor) -> int:
    """Bytes the three CSR arrays take."""
    return sum(t.numel() * t.element_size() for t in (values, col_indices, crow_indices))


def csr_bytes_for(nonzeros: int, rows: int, value_size: int) -> int:
    """Bytes a CSR matrix with `nonzeros` entries and `rows` rows would take (int32 indices)."""
    index_size = torch.empty((), dtype=INDEX_DTYPE).element_size()
    return nonzeros * (value_size + index_size) + (rows + 1) * index_size


def csr_matrix(values: Tensor, col_indices: Tensor, crow_indices: Tensor, out_features: int,
               in_features: int) -> Tensor:
    """The torch sparse CSR tensor of the arrays (no copies, invariants not re-checked)."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta": we rely on it knowingly
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow_indices, col_indices, values, (out_features, in_features),
                                       check_invariants=False)


def densify(values: Tensor, col_indices: Tensor, crow_indices: Tensor, out_features: int,
            in_features: int) -> Tensor:
    """The dense `[out_features, in_features]` weight of the CSR arrays."""
    return csr_matrix(values, col_indices, crow_indices, out_features, in_features).to_dense()


def csr_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`linear(x, weight, bias)` with `weight` a torch sparse CSR tensor: `(W @ x^T)^T` by torch's
    CSR-times-dense kernel (it has no dense-times-CSR kernel on CPU worth calling), and for one row
    its CSR-times-vector kernel (2.5x faster than the matrix one on a 1024x1024 weight, 1 thread)."""
    out_features, in_features = weight.shape
    rows = x.reshape(-1, in_features)
    if rows.shape[0] == 1:
        result = torch.mv(weight, rows[0])
        return (result if bias is None else result.add_(bias)).reshape(*x.shape[:-1], out_features)
    if bias is None:
        result = torch.sparse.mm(weight, rows.t())
    else:
        result = torch.addmm(bias.unsqueeze(1), weight, rows.t())
    return result.t().contiguous().reshape(*x.shape[:-1], out_features)


def sparse_linear_impl(x: Tensor, values: Tensor, col_indices: Tensor, crow_indices: Tensor,
                       bias: Tensor | None, out_features: int, in_features: int) -> Tensor:
    matrix = csr_matrix(values, col_indices, crow_indices, out_features, in_features)
    return csr_linear(x, matrix, bias)


def _sparse_linear_fake(x: Tensor, values: Tensor, col_indices: Tensor, crow_indices: Tensor,
                        bias: Tensor | None, out_features: int, in_features: int) -> Tensor:
    if x.shape[-1] != in_features:
        raise ValueError(f"sparse_linear: x has {x.shape[-1]} features, the weight {in_features}")
    if crow_indices.shape[0] != out_features + 1 or values.shape != col_indices.shape:
        raise ValueError("sparse_linear: the CSR arrays do not describe an "
                         f"[{out_features}, {in_features}] matrix")
    return x.new_empty((*x.shape[:-1], out_features))


torch.library.custom_op("orca::sparse_linear", mutates_args=())(sparse_linear_impl).register_fake(
    _sparse_linear_fake)
SPARSE_LINEAR = torch.ops.orca.sparse_linear.default

# The eager code of each sparse op, called directly by the lowering's "torch" candidate (the
# dispatcher would only add overhead), as ops/fused.py's EAGER.
EAGER = {SPARSE_LINEAR: sparse_linear_impl}

# The ops whose weights are stored sparse, by their printed name (printer.op_name).
SPARSE_OPS = frozenset({SPARSE_LINEAR})
SPARSE_OP_NAMES = frozenset({"orca.sparse_linear"})
