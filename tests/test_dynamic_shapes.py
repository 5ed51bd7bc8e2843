"""Dynamic dimensions (torch.export's dynamic_shapes): one compile serves every size."""
from __future__ import annotations

import pytest
import torch
from torch.export import Dim

import orca_compiler as oc
from conftest import assert_outputs_close


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_dynamic_batch(name):
    model, (x,) = oc.zoo.get(name, batch_size=2)  # torch.export specializes a dimension of size 1
    compiled = oc.compile(model, (x,), dynamic_shapes=({0: Dim("batch", min=1, max=1024)},))
    assert compiled.report.fallbacks == []
    # Heavy ops whose sizes vary are not measured: torch's own kernel, never slower than eager.
    assert {k.how for k in compiled.report.kernels} == {"symbolic shape, not measured"}
    for batch in (1, 3, 9):
        inputs = oc.zoo.get(name, batch_size=batch)[1]
        assert_outputs_close(model(*inputs), compiled(*inputs))
