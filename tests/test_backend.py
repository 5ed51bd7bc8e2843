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


def test_backend_name_works_without_importing_orca():
    """The torch_dynamo_backends entry point lets dynamo find "orca" on its own."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()\n"
        "x = torch.randn(2, 4)\n"
        "assert 'orca_compiler' not in sys.modules\n"
        "with torch.no_grad():\n"
        "    torch.testing.assert_close(torch.compile(m, backend='orca')(x), m(x))\n"
        "assert 'orca_compiler' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
