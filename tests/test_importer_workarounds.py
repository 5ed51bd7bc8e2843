"""Ops TVM 0.27's importer converts wrongly, and that the lowering routes around."""
from __future__ import annotations

import pytest
import torch

import orca_compiler as oc
from conftest import assert_outputs_close


class _Select(torch.nn.Module):
    def __init__(self, dim: int, index: int):
        super().__init__()
        self.dim, self.index = dim, index

    def forward(self, x):
        return x.select(self.dim, self.index) * 2


@pytest.mark.parametrize("dim,index", [(1, -1), (0, -2), (2, -4), (1, 3)])
def test_select_with_negative_index(dim, index):
    # x[:, -1] (the last RNN step) gave errors of ~5 before: TVM's take read out of bounds.
    model, inputs = _Select(dim, index), (torch.randn(8, 16, 4),)
    compiled = oc.compile(model, inputs, fullgraph=True)
    assert_outputs_close(model(*inputs), compiled(*inputs))
