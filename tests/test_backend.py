"""torch.compile(model, backend="orca") works on zoo models."""
from __future__ import annotations

import pytest
import torch

import orca_compiler as oc

from conftest import assert_outputs_close


@pytest.mark.parametrize("name", ["mlp", "resnet", "transformer"])
def test_torch_compile_backend_matches_eager(name):
    torch._dynamo.reset()
    model, inputs = oc.zoo.get(name)
    compiled = torch.compile(model, backend="orca")
    assert_outputs_close(model(*inputs), compiled(*inputs))


def test_backend_options_reach_the_compiler():
    torch._dynamo.reset()
    model, inputs = oc.zoo.get("mlp")
    compiled = torch.compile(model, backend="orca", options={"pipeline": "O0"})
    assert_outputs_close(model(*inputs), compiled(*inputs))
    torch._dynamo.reset()
    bad = torch.compile(model, backend="orca", options={"pipeline": "no-such-pass"})
    with pytest.raises(Exception, match="unknown pass 'no-such-pass'"):
        bad(*inputs)
