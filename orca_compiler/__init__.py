"""orca_compiler: compile PyTorch models through a pass pipeline and Apache TVM.

    import orca_compiler
    compiled = orca_compiler.compile(model.eval(), (x,), pipeline="O1", target="llvm")
    y = compiled(x)
"""
from __future__ import annotations

from . import zoo
from .api import compile
from .errors import (
    CaptureError, InputMismatchError, LoweringError, OrcaError, PassError, PipelineError, TargetError,
    UnsupportedOpError, VerificationError,
)
from .finetune import FinetuneReport, finetune
from .ir import GraphIR
from .pass_base import Pass, PassContext, PassResult, register_pass, registered_passes
from .pipeline import NAMED_PIPELINES, format_pipeline, parse_pipeline
from .runtime import CompiledModule
from .sensitivity import LayerSensitivity, quantize_sensitivity
from .serialize import LoadError, load
from .transform import TransformedModule, TransformReport, prune
from .tune import TuneReport, tune

__version__ = "0.1.0"

# The "orca" torch.compile backend is found through the torch_dynamo_backends entry point
# (pyproject.toml); registering here would import torch._dynamo (~1.4 s) on every import.
# Running from a source tree without installing: call orca_compiler.backend.register().
from . import passes  # noqa: E402,F401  (registers the pass library)

__all__ = [
    "compile", "prune", "finetune", "tune", "TuneReport", "FinetuneReport", "TransformedModule", "TransformReport", "CompiledModule",
    "GraphIR", "Pass",
    "PassContext", "PassResult", "register_pass",
    "registered_passes", "parse_pipeline", "format_pipeline", "NAMED_PIPELINES", "zoo",
    "OrcaError", "CaptureError", "PipelineError", "PassError", "VerificationError",
    "UnsupportedOpError", "LoweringError", "TargetError", "InputMismatchError", "load", "LoadError",
    "quantize_sensitivity", "LayerSensitivity",
]
