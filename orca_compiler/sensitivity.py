"""Per-layer quantization sensitivity: what each layer alone costs in output error when quantized.

`quantize_sensitivity(model, inputs, "quantize{mode=dynamic}")` captures the model, runs the base
pipeline, then for every layer that quantize pass would rewrite, quantizes that layer only (all
others skipped) and measures the relative error of the model's outputs against the unquantized
IR, in eager PyTorch (the quantized ops' reference semantics; nothing is compiled). Sorted worst
first: the list a user reads to decide what to `skip` or to keep at int8 when the rest is int4.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch.utils import _pytree as pytree

from .errors import PipelineError
from .pass_base import PassContext
from .pipeline import parse_pipeline


@dataclass
class LayerSensitivity:
    """One layer: its module path, node, kind, and the relative output error (L2 norm of the
    change over the norm of the outputs) with only it quantized."""

    layer: str
    node: str
    kind: str
    error: float

    def __str__(self) -> str:
        return f"{self.error:10.3e}  {self.kind:<9}  {self.layer} (%{self.node})"


def _outputs(ir, inputs_list) -> torch.Tensor:
    flat = []
    for inputs in inputs_list:
        for value in pytree.tree_leaves(ir.run(*inputs)):
            if isinstance(value, torch.Tensor) and value.dtype.is_floating_point:
                flat.append(value.detach().double().flatten())
    return torch.cat(flat)


def quantize_sensitivity(model: torch.nn.Module, example_inputs: Sequence, quantize: str = "quantize", *,
                         pipeline: str = "O1", calibration_data: Iterable | None = None) -> list[LayerSensitivity]:
    """Per-layer output error of `quantize` (one `quantize{...}` pass spec) applied to one layer at
    a time, after `pipeline`; worst first. Errors are measured on `calibration_data` (a list of
    input tuples; static mode also calibrates on it) or else on `example_inputs`."""
    from .api import _normalize_inputs
    from .capture import capture
    from .lowering.support import keep_op_in_capture
    from .pass_manager import PassManager
    from .passes.quantize import quantizable_layers

    specs = parse_pipeline(quantize)
    if len(specs) != 1 or specs[0].name != "quantize":
        raise PipelineError(f"quantize_sensitivity takes one quantize{{...}} pass spec, got {quantize!r}")
    base_pass = specs[0].instantiate()
    inputs = _normalize_inputs(example_inputs)
    data = [tuple(pytree.tree_leaves(item)) for item in calibration_data] if calibration_data is not None else None
    eval_inputs = data or [tuple(pytree.tree_leaves(inputs))]
    ctx = PassContext(example_inputs=tuple(pytree.tree_leaves(inputs)), config={"calibration_data": eval_inputs})
    ir, _ = PassManager(pipeline).run(capture(model, inputs, keep_op=keep_op_in_capture).ir, ctx)
    reference = _outputs(ir, eval_inputs)
    layers = quantizable_layers(ir, base_pass.options.mode)
    results = []
    for layer in layers:
        others = tuple(other.node.name for other in layers if other is not layer)
        options = dataclasses.replace(base_pass.options, skip=others, layers=())
        single = type(base_pass)(options).run(ir.copy(), ctx).ir
        change = _outputs(single, eval_inputs) - reference
        error = float(change.norm() / reference.norm().clamp_min(1e-30))
        results.append(LayerSensitivity(layer.name, layer.node.name, layer.kind, error))
    return sorted(results, key=lambda r: r.error, reverse=True)
