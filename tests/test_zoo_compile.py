"""Every zoo model compiles at O0 and O1, runs fully in TVM, and matches eager."""
from __future__ import annotations

import pytest
import torch

import orca_compiler as oc
from orca_compiler.verify import verify

from conftest import assert_outputs_close


@pytest.mark.parametrize("pipeline", ["O0", "O1"])
@pytest.mark.parametrize("name", oc.zoo.names())
def test_zoo_model_matches_eager(name, pipeline):
    model, inputs = oc.zoo.get(name)
    compiled = oc.compile(model, inputs, pipeline=pipeline)
    assert compiled.report.fallbacks == [], str(compiled.report)
    assert compiled.report.partitions == 1
    verify(compiled.ir)
    assert_outputs_close(model(*inputs), compiled(*inputs))
    # a second call with other values of the same shape must also match (nothing is baked in)
    fresh = tuple(torch.randint_like(t, 0, 1000) if not t.is_floating_point() else torch.randn_like(t) for t in inputs)
    assert_outputs_close(model(*fresh), compiled(*fresh))


@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
def test_o1_folds_every_batchnorm(name):
    model, inputs = oc.zoo.get(name)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    compiled = oc.compile(model, inputs, pipeline="O1")
    fold = next(r for r in compiled.report.passes if r.name == "fold-bn")
    assert fold.stats["folded"] == n_bn
    assert "batch_norm" not in compiled.print_ir(file=open("/dev/null", "w"))


def test_rnn_outputs_keep_torch_structure():
    model, inputs = oc.zoo.get("lstm_bidir")
    out, (h, c) = oc.compile(model, inputs)(*inputs)
    ref_out, (ref_h, ref_c) = model(*inputs)
    assert out.shape == ref_out.shape and h.shape == ref_h.shape == (4, 4, 64) and c.shape == ref_c.shape


def test_one_output_comes_back_from_the_vm_as_the_tensor_itself():
    """A program with one output returns it bare, not in a 1-tuple (each element read from a
    returned tuple costs a conversion per call); models with several outputs keep their tuple."""
    model, inputs = oc.zoo.get("mlp")
    compiled = oc.compile(model, inputs, pipeline="O1", eager_guard=False, cache="off")
    returned = compiled.program._function()(*inputs)
    assert type(returned) is torch.Tensor
    assert_outputs_close(model(*inputs), compiled(*inputs))

    class TwoOutputs(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x), {"doubled": x * 2}

    x = torch.randn(3, 4)
    two = oc.compile(TwoOutputs(), (x,), eager_guard=False, cache="off")
    assert len(two.program._function()(x)) == 2
    assert_outputs_close(TwoOutputs()(x), two(x))
