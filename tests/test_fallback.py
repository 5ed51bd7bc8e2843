"""Unsupported ops and capture failures fall back to eager and are reported; fullgraph makes them errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import orca_compiler as oc
from orca_compiler.lowering import support

from conftest import assert_outputs_close


@torch.library.custom_op("orca_test::wiggle", mutates_args=())
def wiggle(x: torch.Tensor) -> torch.Tensor:
    """An op TVM has never heard of: x * sigmoid(x) + 0.5."""
    return x * torch.sigmoid(x) + 0.5


@wiggle.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("orca_test::scaled_add", mutates_args=())
def scaled_add(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    return x + alpha * y


@scaled_add.register_fake
def _(x, y, alpha):
    return torch.empty_like(x)


class WiggleNet(nn.Module):
    """conv -> relu -> wiggle (unsupported) -> conv -> mean: two TVM partitions around one eager op."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = torch.ops.orca_test.wiggle(torch.relu(self.a(x)))
        return self.b(y).mean((2, 3)), y


def _inputs():
    torch.manual_seed(0)
    return (torch.randn(2, 3, 12, 12),)


def test_unsupported_op_falls_back_and_is_reported():
    model, inputs = WiggleNet().eval(), _inputs()
    compiled = oc.compile(model, inputs)
    [fallback] = compiled.report.fallbacks
    assert fallback.op == "orca_test.wiggle" and "no TVM converter" in fallback.reason
    assert compiled.report.partitions == 2
    assert "orca_test.wiggle" in str(compiled.report)
    assert_outputs_close(model(*inputs), compiled(*inputs))


def test_fullgraph_turns_fallback_into_error_naming_the_node():
    with pytest.raises(oc.UnsupportedOpError, match=r"%wiggle \(orca_test.wiggle\)"):
        oc.compile(WiggleNet().eval(), _inputs(), fullgraph=True)


class ScaledAddNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        return torch.ops.orca_test.scaled_add(self.lin(x), x, 0.25)


def test_custom_converter_lowers_our_own_op():
    from tvm import relax

    def convert(node, importer):
        x, y = importer.env[node.args[0]], importer.env[node.args[1]]
        scaled = relax.op.multiply(y, relax.const(node.args[2], "float32"))
        return importer.block_builder.emit(relax.op.add(x, scaled))

    op = torch.ops.orca_test.scaled_add.default
    support.register_converter(op, convert)
    try:
        model, inputs = ScaledAddNet().eval(), (torch.randn(4, 16),)
        compiled = oc.compile(model, inputs, fullgraph=True)
        assert compiled.report.fallbacks == []
        assert_outputs_close(model(*inputs), compiled(*inputs))
    finally:
        support.unregister_converter(op)


def test_converter_failure_falls_back_that_node_only():
    def broken(node, importer):
        raise NotImplementedError("this converter is broken on purpose")

    op = torch.ops.orca_test.scaled_add.default
    support.register_converter(op, broken)
    try:
        model, inputs = ScaledAddNet().eval(), (torch.randn(4, 16),)
        compiled = oc.compile(model, inputs)
        [fallback] = compiled.report.fallbacks
        assert fallback.node == "scaled_add" and "broken on purpose" in fallback.reason
        assert compiled.report.partitions == 1  # the linear still runs in TVM
        assert_outputs_close(model(*inputs), compiled(*inputs))
        with pytest.raises(oc.LoweringError, match="%scaled_add.*broken on purpose"):
            oc.compile(model, inputs, fullgraph=True)
    finally:
        support.unregister_converter(op)


class DataDependent(nn.Module):
    """torch.export cannot capture the branch on a tensor value: a graph break."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(8, 8)
        self.post = nn.Linear(8, 4)

    def forward(self, x):
        y = self.pre(x)
        if y.sum() > 0:
            y = y * 2
        else:
            y = y - 1
        return self.post(torch.relu(y))


class SpectrumNet(nn.Module):
    """rfft (no TVM converter) -> abs (a complex input, a float32 output) -> linear: only the two
    ops that touch a complex tensor are TVM's to refuse."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(17, 4)

    def forward(self, x):
        return self.head(torch.fft.rfft(x).abs() + 1.0)


def test_an_op_reading_a_complex_tensor_falls_back_alone_and_names_it():
    torch.manual_seed(0)
    model, inputs = SpectrumNet().eval(), (torch.randn(3, 32),)
    compiled = oc.compile(model, inputs, cache="off")
    reasons = {f.op: f.reason for f in compiled.report.fallbacks}
    assert set(reasons) == {"_fft_r2c", "abs"}
    assert reasons["abs"] == "its input %_fft_r2c is a torch.complex64 tensor, which is not lowered"
    assert compiled.report.partitions == 1  # the add and the linear after abs: TVM's
    assert_outputs_close(model(*inputs), compiled(*inputs))


@torch.library.custom_op("orca_test::shuffle", mutates_args=())
def shuffle(x: torch.Tensor) -> torch.Tensor:
    """pixel_shuffle by 2, as an op of our own: its converter below emits TVM's
    relax.nn.pixel_shuffle, which converts but cannot lower in TVM 0.27 (its legalization calls
    topi.nn.pixel_shuffle, which the wheel lacks): the build fails with no node named."""
    return nn.functional.pixel_shuffle(x, 2)


@shuffle.register_fake
def _(x):
    n, c, h, w = x.shape
    return x.new_empty(n, c // 4, h * 2, w * 2)


class ShuffleNet(nn.Module):
    """conv -> orca_test.shuffle -> conv."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.b(torch.ops.orca_test.shuffle(torch.relu(self.a(x))))


def test_an_op_tvm_cannot_lower_falls_back_alone_and_is_named():
    import tvm.topi
    from tvm import relax

    if hasattr(tvm.topi.nn, "pixel_shuffle"):
        pytest.skip("this TVM lowers relax.nn.pixel_shuffle: the premise of the test is gone")

    def convert(node, importer):
        return importer.block_builder.emit(relax.op.nn.pixel_shuffle(importer.env[node.args[0]], 2))

    op = torch.ops.orca_test.shuffle.default
    support.register_converter(op, convert)
    try:
        model, inputs = ShuffleNet().eval(), _inputs()
        compiled = oc.compile(model, inputs, cache="off")
        [fallback] = compiled.report.fallbacks
        assert fallback.op == "orca_test.shuffle"
        assert fallback.reason.startswith("TVM could not build %shuffle (orca_test.shuffle) for llvm:")
        assert compiled.report.partitions == 2  # the convs on either side stay TVM's
        assert_outputs_close(model(*inputs), compiled(*inputs))
    finally:
        support.unregister_converter(op)


def test_capture_failure_compiles_through_graph_breaks():
    model = DataDependent().eval()
    x = torch.randn(3, 8)
    compiled = oc.compile(model, (x,))
    report = compiled.report
    assert report.capture_method == "torch.compile graph breaks"
    assert report.graph_breaks, str(report)
    assert len(report.subgraphs) >= 2 and all(s.partitions >= 1 for s in report.subgraphs)
    assert not report.fully_compiled
    for sign in (1.0, -1.0):  # both branches
        probe = x.abs() * sign * 10
        assert_outputs_close(model(probe), compiled(probe))


def test_fullgraph_capture_failure_is_a_capture_error():
    with pytest.raises(oc.CaptureError, match="torch.export"):
        oc.compile(DataDependent().eval(), (torch.randn(3, 8),), fullgraph=True)


def test_training_mode_batchnorm_is_refused_with_a_hint():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    with pytest.raises(oc.CaptureError, match="model.eval"):
        oc.compile(model, (torch.randn(1, 3, 8, 8),), fullgraph=True)
