"""Compile through TorchDynamo when torch.export cannot capture the whole model (graph breaks).

Dynamo splits the model at what it cannot trace (data-dependent control flow, unsupported Python)
and hands each graph to the orca backend; the code between graphs runs in Python, like
torch.compile's graph breaks. The report lists each break with its reason and location.
"""
from __future__ import annotations

import torch

from .errors import CaptureError, OrcaError
from .report import CompileReport
from .runtime import CompiledModule, InputSignature


def _break_reasons(model, inputs) -> list[str]:
    import torch._dynamo

    try:
        explanation = torch._dynamo.explain(model)(*inputs)
    except Exception as exc:  # explain itself can fail on exotic code: report, do not abort
        return [f"(could not explain graph breaks: {type(exc).__name__}: {exc})"]
    reasons = []
    for br in explanation.break_reasons:
        where = ""
        if br.user_stack:
            frame = br.user_stack[-1]
            where = f" at {frame.filename}:{frame.lineno} ({frame.name})"
        reasons.append(f"{br.reason.splitlines()[0]}{where}")
    return reasons


def compile_with_graph_breaks(model, inputs: tuple, capture_error: CaptureError, *, pipeline: str, target,
                              report: CompileReport, options: dict) -> CompiledModule:
    """Compile `model` with torch.compile(backend=orca) and run it once on `inputs` to build every graph."""
    import torch._dynamo

    from .api import compile as orca_compile

    sub_options = {k: v for k, v in options.items() if k in ("verify_each", "pass_config", "kernels", "tuning_db")}

    def backend(gm: torch.fx.GraphModule, example_inputs):
        compiled = orca_compile(gm, tuple(example_inputs), pipeline=pipeline, target=target, **sub_options)
        report.subgraphs.append(compiled.report)
        return compiled

    report.capture_method = "torch.compile graph breaks"
    report.capture_failures = [("torch.export", str(capture_error))]
    report.graph_breaks = _break_reasons(model, inputs)
    torch._dynamo.reset()
    program = torch.compile(model, backend=backend, dynamic=False)
    try:
        with torch.no_grad():
            program(*inputs)
    except OrcaError:
        raise
    except Exception as exc:
        raise CaptureError(f"torch.export failed ({capture_error}) and so did torch.compile: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    report.partitions = sum(s.partitions for s in report.subgraphs)
    return CompiledModule(program, signature=[InputSignature.of(t) for t in inputs], in_spec=None,
                          out_spec=None, report=report, ir=None)
