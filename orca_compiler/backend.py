"""`torch.compile(model, backend="orca")`: TorchDynamo hands us each captured graph to compile.

Registered through the `torch_dynamo_backends` entry point, so the name works even before
orca_compiler is imported (`register()` does it by hand from an uninstalled tree). Options: `torch.compile(m, backend="orca",
options={"pipeline": "O1", "target": "llvm"})`.
"""
from __future__ import annotations

import torch

_BACKEND_OPTIONS = ("pipeline", "target", "fullgraph", "verify_each", "kernels", "tuning_db")


def orca_backend(gm: torch.fx.GraphModule, example_inputs, **kwargs):
    """Dynamo backend: compile one captured graph with orca (its ops that TVM lacks run eager)."""
    from .api import compile as orca_compile
    from .errors import OrcaError

    options = dict(kwargs.pop("options", None) or {})
    options.update(kwargs)
    unknown = sorted(set(options) - set(_BACKEND_OPTIONS))
    if unknown:
        raise OrcaError(f"unknown orca backend option(s) {', '.join(unknown)}; valid: {', '.join(_BACKEND_OPTIONS)}")
    inputs = tuple(example_inputs)
    if not all(isinstance(t, torch.Tensor) for t in inputs):
        return gm.forward  # symbolic-int inputs (dynamic shapes) are not compiled yet: run eager
    return orca_compile(gm, inputs, **options)


def register() -> None:
    """Register the "orca" name with TorchDynamo (idempotent)."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "orca" not in _BACKENDS or _BACKENDS.get("orca") is None:
        register_backend(name="orca")(orca_backend)
