"""Capture: nn.Module + example inputs -> GraphIR, through torch.export (symbolic_trace as a fallback).

The exported graph is decomposed to ATen, except for the ops that `keep_op` accepts: the lowering
passes the set of ops it converts natively, so high-level ops (linear, conv2d, layer_norm,
scaled_dot_product_attention, lstm) stay whole for the passes and the kernel selection.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import CaptureError
from .ir import GraphIR, from_exported_program
from .ops.rnn import rnn_capture_shim


@dataclass
class CaptureResult:
    """The captured IR, how it was captured, and why earlier methods failed."""

    ir: GraphIR
    method: str
    failed_attempts: list[tuple[str, str]] = field(default_factory=list)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


@contextlib.contextmanager
def _quiet_torch_internals():
    """Silence warnings about torch's own internals that a user cannot act on."""
    with warnings.catch_warnings():
        # pytree's own deprecation, raised from inside torch.export (torch 2.13)
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
        # nn.RNN re-assigns _flat_weights while being traced; the weights are captured correctly
        warnings.filterwarnings("ignore", message=r"The tensor attributes .*_flat_weights.* were assigned during export")
        yield


def _decompose(ep: torch.export.ExportedProgram, keep_op: Callable | None) -> torch.export.ExportedProgram:
    table = torch.export.default_decompositions()
    if keep_op is not None:
        for op in list(table.keys()):
            if keep_op(op):
                del table[op]
    return ep.run_decompositions(table)


def _drop_metadata_checks(ep: torch.export.ExportedProgram) -> None:
    """Erase the aten._assert_tensor_metadata checks torch.export records for `.to(dtype)` calls
    (Hugging Face models make several): they return nothing, so they carry no meta["val"], and
    what they assert (a dtype, a device) is already in the IR's recorded types."""
    graph = ep.graph_module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default and not node.users:
            graph.erase_node(node)
    ep.graph_module.recompile()


def _check_no_mutation(ep: torch.export.ExportedProgram) -> None:
    mutated = list(ep.graph_signature.buffers_to_mutate.values())
    mutated += list(getattr(ep.graph_signature, "user_inputs_to_mutate", {}).values())
    if mutated:
        raise CaptureError(
            f"the model mutates {', '.join(sorted(mutated))} in forward; orca compiles inference graphs "
            "(is the model in training mode? call model.eval())"
        )


def capture(
    model: torch.nn.Module,
    example_inputs: tuple,
    *,
    keep_op: Callable[[torch._ops.OpOverload], bool] | None = None,
    dynamic_shapes=None,
) -> CaptureResult:
    """Capture `model` called on `example_inputs` (a tuple of tensors) as a GraphIR.

    Tries torch.export (non-strict), then torch.fx.symbolic_trace followed by torch.export of the
    traced module. Raises CaptureError listing each attempt's failure if none works.
    `dynamic_shapes` (torch.export's format) marks input dimensions that vary between calls; the
    IR then carries them as symbols. nn.LSTM / nn.GRU are captured as orca::lstm / orca::gru:
    torch.export would trace aten.lstm's shape function step by step (15 s at T=512) and
    specialize the sequence length (ops/rnn.py).
    """
    attempts: list[tuple[str, str]] = []
    candidates = [("torch.export", lambda: model)]
    if isinstance(model, torch.nn.Module) and not isinstance(model, torch.fx.GraphModule):
        candidates.append(("symbolic_trace+torch.export", lambda: torch.fx.symbolic_trace(model)))
    for method, make in candidates:
        try:
            with torch.no_grad(), _quiet_torch_internals(), rnn_capture_shim():
                ep = torch.export.export(make(), tuple(example_inputs), dynamic_shapes=dynamic_shapes, strict=False)
        except CaptureError:
            raise
        except Exception as exc:  # export raises many types (UserError, Unsupported, RuntimeError...)
            attempts.append((method, _first_line(exc)))
            continue
        with _quiet_torch_internals():
            ep = _decompose(ep, keep_op)
        _drop_metadata_checks(ep)
        _check_no_mutation(ep)  # functionalization (in the decomposition) exposes in-place updates
        return CaptureResult(from_exported_program(ep), method, attempts)
    detail = "; ".join(f"{m}: {e}" for m, e in attempts)
    raise CaptureError(f"could not capture {type(model).__name__}: {detail}")
