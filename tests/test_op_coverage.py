"""Common torch ops, one small graph each, against eager: the ops TVM lowers (fullgraph=True, so
none may fall back) and the ops that may run in eager (reported), whose results must still be
torch's. Every wrong result TVM 0.27's importer gave in a sweep of these is routed around
(docs/debugging.md); this keeps them routed."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import orca_compiler as oc
from conftest import assert_outputs_close

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(4, 6, generator=torch.Generator().manual_seed(0)) * 5
COUNTS = torch.randint(-20, 20, (4, 6), generator=torch.Generator().manual_seed(1))
IMAGE = torch.randn(2, 3, 7, 9, generator=torch.Generator().manual_seed(2)) * 3 + 1

# (x, counts) -> outputs; each must lower whole
LOWERED = {
    "true_division": lambda x, c: (c / 3, c / (c.abs() + 1), x / 3),
    "rounding_division": lambda x, c: (torch.div(c, -3, rounding_mode="floor"), torch.div(c, 3, rounding_mode="trunc"),
                                       torch.div(x, -3, rounding_mode="floor"), torch.div(x, 3, rounding_mode="trunc"),
                                       torch.div(c, 2.5, rounding_mode="floor")),
    "floor_divide": lambda x, c: (torch.floor_divide(x, 3.0), torch.floor_divide(c, 3)),
    "remainder": lambda x, c: (torch.remainder(x, 3.0), torch.remainder(c, 3), torch.remainder(c, -3)),
    "fmod": lambda x, c: (torch.fmod(x, 3.0), torch.fmod(c, 3)),
    "round": lambda x, c: (torch.round(x * 2), torch.round(x, decimals=1)),
    "sign": lambda x, c: torch.sign(c) * torch.sign(x),
    "bitwise": lambda x, c: (c & 5) | (c ^ 3),
    "integer_power": lambda x, c: c ** 2,
    "slices": lambda x, c: (x[::2, 1::3], x[-3:-1, -2:]),
    "negative_index": lambda x, c: (x[:, [-1, 0]], x[[-1, 1]], x.select(1, -2)),
    "cumprod_cumsum": lambda x, c: ((x / 5).cumprod(1), x.cumsum(0)),
    "clamp_tensor": lambda x, c: torch.clamp(x, min=torch.zeros(6), max=torch.ones(6)),
    "max_min_dim": lambda x, c: (torch.max(x, dim=1), torch.min(x, dim=0), torch.min(x, 1, keepdim=True)),
    "amax_amin": lambda x, c: (x.amax(1), x.amax((0, 1)), x.amin(0, keepdim=True), x.amin()),
    "logsumexp": lambda x, c: x.logsumexp(1),
    "argmax_ties": lambda x, c: torch.zeros(4, 6).index_fill(1, torch.tensor([1, 4]), 1.0).argmax(1),
    "unary_math": lambda x, c: torch.expm1(x / 10) + torch.log1p(x.abs()) + torch.atan2(x, x.flip(0)),
    "nan_handling": lambda x, c: (torch.nan_to_num(torch.log(x)), torch.isnan(torch.sqrt(x))),
    "where_scalar": lambda x, c: torch.where(x > 0, x, 0.0),
    "masked_fill_inf": lambda x, c: torch.exp(x.masked_fill(c > 5, float("-inf")) / 5),
    "like_with_dtype": lambda x, c: torch.zeros_like(c > 0, dtype=torch.float32) + torch.ones_like(c, dtype=torch.float32) + x,
    "casts": lambda x, c: (x.to(torch.int64), c.float().mean(0).to(torch.int32), (x > 0).sum(1)),
    "topk_sort": lambda x, c: (x.topk(2, dim=0, largest=False), x.sort(1, descending=True)),
    "one_hot": lambda x, c: F.one_hot(c.abs() % 5, 5),
    "softmax_family": lambda x, c: (F.log_softmax(x, 0), F.softmin(x, 1)),
    "cross_entropy": lambda x, c: F.cross_entropy(x, torch.tensor([0, 1, 2, 5])),
    "activations": lambda x, c: (F.hardtanh(x, -2, 3) + F.relu6(x) + F.hardsigmoid(x) + F.selu(x) + F.celu(x),
                                 F.gelu(x, approximate="tanh") + F.silu(x) + F.mish(x) + F.softplus(x)),
    "norms": lambda x, c: (torch.linalg.vector_norm(x, 3, dim=1), x.norm(dim=0), F.normalize(x, dim=1)),
    "statistics": lambda x, c: (x.std(dim=1), x.std(), x.var(dim=0, correction=0), x.std(dim=1, correction=2)),
    "triangles": lambda x, c: x.tril(-1) + x.triu(2),
    "repeat": lambda x, c: (x.repeat_interleave(2, dim=0), x.repeat(2, 1), torch.outer(x[0], x[1])),
}

# (image,) -> outputs; each must lower whole
LOWERED_IMAGE = {
    "nearest_to_size": lambda y: (F.interpolate(y, size=(5, 11), mode="nearest"),
                                  F.interpolate(y, size=(7, 7), mode="nearest")),
    "nearest_x2": lambda y: F.interpolate(y, scale_factor=2, mode="nearest"),
    "nearest_exact": lambda y: F.interpolate(y, size=(11, 5), mode="nearest-exact"),
    "bilinear": lambda y: (F.interpolate(y, size=(11, 5), mode="bilinear"),
                           F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=True)),
    "pools": lambda y: (F.max_pool2d(y, 3, 2, ceil_mode=True), F.avg_pool2d(y, 3, 2, padding=1, count_include_pad=False),
                        F.adaptive_avg_pool2d(y, (3, 3))),
    "reflect_pad": lambda y: F.pad(y, (1, 1, 1, 1), mode="reflect"),
    "pixel_shuffle": lambda y: (F.pixel_shuffle(y.repeat(1, 4, 1, 1), 2), F.pixel_unshuffle(y[..., :6, :8], 2)),
    "image_statistics": lambda y: (y.std(dim=(2, 3), keepdim=True), y.var(dim=1)),
}

# may run in eager (reported); the results must be torch's all the same
ANY = {
    "integer_root": lambda x, c: c.abs() ** 0.5,
    "spectrum": lambda x, c: torch.fft.rfft(x).abs() + 1,
    "shifts": lambda x, c: c.abs() >> 1,
    "unfold_prod": lambda x, c: (x.unfold(1, 2, 2), (x / 5).prod(1)),
    "scatter_add": lambda x, c: torch.zeros_like(x).scatter_add(1, c.abs() % 6, x),
    "nearest_inexact_scale": lambda x, c: F.interpolate(x.reshape(1, 2, 3, 4), scale_factor=1.5, mode="nearest"),
}


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *inputs):
        return self.fn(*inputs)


def _check(fn, inputs, fullgraph):
    model = _Fn(fn)
    compiled = oc.compile(model, inputs, cache="off", fullgraph=fullgraph)
    expected, actual = model(*inputs), compiled(*inputs)
    assert_outputs_close(expected, actual)
    leaves = lambda tree: torch.utils._pytree.tree_flatten(tree)[0]  # noqa: E731
    assert [t.dtype for t in leaves(actual)] == [t.dtype for t in leaves(expected)]
    return compiled


@pytest.mark.parametrize("name", sorted(LOWERED))
def test_op_lowers_and_equals_eager(name):
    _check(LOWERED[name], (X, COUNTS), fullgraph=True)


@pytest.mark.parametrize("name", sorted(LOWERED_IMAGE))
def test_image_op_lowers_and_equals_eager(name):
    _check(LOWERED_IMAGE[name], (IMAGE,), fullgraph=True)


@pytest.mark.parametrize("name", sorted(ANY))
def test_op_equals_eager_where_it_runs(name):
    compiled = _check(ANY[name], (X, COUNTS), fullgraph=False)
    assert all(f.reason for f in compiled.report.fallbacks)


class _PaddedEncoder(torch.nn.Module):
    """An encoder layer over a padded batch: attention with a boolean key_padding_mask (which
    torch turns into a float mask by zeros_like(dtype=...) and masked_fill(-inf))."""

    def __init__(self):
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0, norm_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.attention = torch.nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x, padding):
        y = self.encoder(x, src_key_padding_mask=padding)
        return self.attention(y, y, y, key_padding_mask=padding)


def test_attention_over_a_padded_batch_lowers_whole():
    torch.manual_seed(0)
    model = _PaddedEncoder().eval()
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    inputs = (torch.randn(2, 5, 16), padding)
    compiled = oc.compile(model, inputs, cache="off", fullgraph=True)
    assert_outputs_close(model(*inputs), compiled(*inputs))
