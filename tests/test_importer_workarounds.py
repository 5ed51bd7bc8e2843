"""Ops TVM 0.27's importer converts wrongly, and that the lowering routes around."""
from __future__ import annotations

import re

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


class _Attention(torch.nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, q, k, v, mask):
        if "attn_mask" in self.options:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, **self.options) + 0 * mask.sum()


@pytest.mark.parametrize("options", [{"scale": 0.3}, {"is_causal": True}, {"attn_mask": True}, {}])
def test_sdpa_keeps_its_scale_mask_and_causality(options):
    # TVM's own sdpa converter dropped scale=0.3 (errors of 0.23); ours is used at every level.
    model = _Attention(**options)
    inputs = (torch.randn(2, 4, 8, 16), torch.randn(2, 4, 8, 16), torch.randn(2, 4, 8, 16), torch.randn(8, 8))
    compiled = oc.compile(model, inputs, pipeline="O1", kernels="tvm", fullgraph=True)
    assert_outputs_close(model(*inputs), compiled(*inputs))


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("shape", [(2, 8, 8, 8), (2, 3, 7, 9)])
@pytest.mark.parametrize("options", [
    {"size": (7, 7)},  # 8 -> 7 was off by whole pixels (TVM's half_pixel rule)
    {"size": (11, 5)},
    {"scale_factor": 2},
    {"scale_factor": 0.5},
    {"scale_factor": 1.5},
], ids=["size7", "size11x5", "x2", "x0.5", "x1.5"])
def test_nearest_interpolation_maps_pixels_as_torch_does(shape, options):
    model = _Fn(lambda x: torch.nn.functional.interpolate(x, mode="nearest", **options))
    inputs = (torch.randn(*shape),)
    compiled = oc.compile(model, inputs, cache="off")
    assert_outputs_close(model(*inputs), compiled(*inputs), rtol=0, atol=0)
    # where scale x size is not whole (7 x 1.5), torch's 1/scale is not out/in: that op runs eager
    scale = options.get("scale_factor")
    inexact = scale is not None and any(scale * size != int(scale * size) for size in shape[2:])
    refused = [f for f in compiled.report.fallbacks if f.op == "upsample_nearest2d.vec"]
    assert bool(refused) == inexact
    assert all("torch maps pixels by 1/scale" in f.reason for f in refused)


@pytest.mark.parametrize("fn", [
    lambda x: x.std(dim=(2, 3)),     # was the biased std: off by sqrt(n / (n - 1))
    lambda x: x.std(dim=(2, 3), keepdim=True),
    lambda x: x.std(),
    lambda x: x.std(dim=1, correction=0),
    lambda x: x.std(dim=-1, correction=2),
], ids=["dims", "keepdim", "all", "correction0", "correction2"])
def test_std_applies_the_correction(fn):
    model, inputs = _Fn(fn), (torch.randn(2, 8, 7, 9) * 3 + 1,)
    compiled = oc.compile(model, inputs, cache="off", fullgraph=True)
    assert_outputs_close(model(*inputs), compiled(*inputs))


class _Gather(torch.nn.Module):
    def forward(self, x, rows):
        return x[:, [-1, 0, -3]] * 2, x[rows] + 1, x[rows, -2]


def test_negative_indices_in_index_tensors():
    # x[:, [-1, 0]] gave errors of ~18 before: TVM's take read out of bounds, as for select
    model = _Gather()
    inputs = (torch.randn(5, 6), torch.tensor([-1, 2, -5, 0]))
    compiled = oc.compile(model, inputs, cache="off", fullgraph=True)
    assert_outputs_close(model(*inputs), compiled(*inputs), rtol=0, atol=0)
    other_rows = torch.tensor([4, -2, -4, 1])  # run-time indices: wrapped in the program, not at compile time
    assert_outputs_close(model(inputs[0], other_rows), compiled(inputs[0], other_rows), rtol=0, atol=0)


class _IntegerRoot(torch.nn.Module):
    def forward(self, counts, x):
        return counts ** 0.5 + x


def test_a_converter_giving_another_dtype_than_torch_sends_that_op_to_eager():
    # int64 ** 0.5 is float32 in torch; TVM's converter keeps int64
    model = _IntegerRoot()
    inputs = (torch.randint(0, 20, (4, 6)), torch.randn(4, 6))
    compiled = oc.compile(model, inputs, cache="off")
    [fallback] = compiled.report.fallbacks
    assert re.fullmatch(r"TVM's converter for %pow\w* \(pow.Tensor_Scalar\) gives int64, where torch gives float32",
                        fallback.reason)
    assert compiled.report.partitions == 1  # the add after it stays TVM's
    assert_outputs_close(model(*inputs), compiled(*inputs))
