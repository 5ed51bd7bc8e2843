"""low-rank: truncated-SVD factoring of linear and 1x1-conv weights."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import orca_compiler as oc
from conftest import assert_outputs_close
from orca_compiler.capture import capture
from orca_compiler.lowering.support import keep_op_in_capture
from orca_compiler.pass_manager import PassManager
from orca_compiler.printer import op_name


class _LowRankNet(nn.Module):
    """A linear whose weight has rank 4 exactly, and a 1x1 conv whose weight has rank 3."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(32, 48, 1, stride=2, padding=1)
        self.fc = nn.Linear(48, 64)
        with torch.no_grad():
            self.conv.weight.copy_((torch.randn(48, 3) @ torch.randn(3, 32))[:, :, None, None])
            self.fc.weight.copy_(torch.randn(64, 4) @ torch.randn(4, 48))

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def _run(pipeline: str, model=None, inputs=None):
    model = model or _LowRankNet().eval()
    inputs = inputs or (torch.randn(2, 32, 9, 9),)
    ir = capture(model, inputs, keep_op=keep_op_in_capture).ir
    out, records = PassManager(pipeline).run(ir)
    return model, inputs, ir, out, records[-1]


def test_exact_low_rank_weights_are_factored_without_changing_results():
    model, inputs, before, after, record = _run("low-rank{energy=0.999999}")
    assert record.stats["factored"] == 2 and record.stats["kept"] == 0
    assert record.weight_bytes_after < record.weight_bytes_before
    ranks = sorted(n.meta["val"].shape[1] for n in after.compute_nodes() if n.name.endswith("_lowrank"))
    assert ranks == [3, 4]  # conv channels, linear features: the true ranks
    assert_outputs_close(model(*inputs), after.run(*inputs)[0])
    compiled = oc.compile(model, inputs, pipeline="low-rank{energy=0.999999}")
    assert_outputs_close(model(*inputs), compiled(*inputs))


def test_full_rank_layers_are_kept_bit_identical():
    model, inputs, before, after, record = _run("low-rank{energy=1.0}", nn.Linear(16, 16).eval(), (torch.randn(3, 16),))
    assert record.modified is False and record.stats == {"factored": 0, "kept": 1, "bytes_saved": 0}
    assert torch.equal(before.run(*inputs)[0], after.run(*inputs)[0])


def test_a_factoring_that_saves_too_little_is_not_made():
    from orca_compiler import zoo

    model, inputs = zoo.get("mlp")  # random weights: energy 0.9 needs rank 340/512 for net.0 (0.4% saved)
    _, _, ir, after, record = _run("low-rank{energy=0.9}", model, inputs)
    assert record.stats["factored"] == 0 and record.modified is False
    _, _, _, _, record = _run("low-rank{energy=0.9,min_saving=0}", model, inputs)
    assert record.stats["factored"] == 2  # net.0 and the 10-way head; net.2 would not save at all


def test_fixed_rank_and_its_error_bound():
    torch.manual_seed(0)
    model, inputs = nn.Linear(128, 128).eval(), (torch.randn(4, 128),)
    _, _, _, after, record = _run("low-rank{rank=8}", model, inputs)
    (inner,) = [n for n in after.compute_nodes() if n.name.endswith("_lowrank")]
    assert op_name(inner) == "linear" and inner.meta["val"].shape[-1] == 8
    # Eckart-Young: the error of the best rank-8 approximation is the 9th singular value onwards.
    s = torch.linalg.svdvals(model.weight.double())
    error = (model(*inputs) - after.run(*inputs)[0]).norm() / inputs[0].norm()
    assert error <= s[8] * 1.001


@pytest.mark.parametrize("text,words", [("low-rank{energy=0}", "energy"), ("low-rank{rank=-1}", "rank"),
                                        ("low-rank{min_saving=1}", "min_saving")])
def test_bad_options_are_named(text, words):
    with pytest.raises(oc.PipelineError, match=words):
        PassManager(text)
