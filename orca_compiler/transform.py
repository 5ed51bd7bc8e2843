"""`orca_compiler.prune()`: run model-changing passes and hand back a runnable, trainable module.

Pruning and low-rank factoring change what a model computes, so a user wants the changed model in
hand before compiling it: to measure its accuracy, fine-tune it (orca_compiler.finetune), and
compile it afterwards like any other module. `prune` captures the model, runs the pipeline (with
calibration data for data-driven criteria) and returns a `TransformedModule`: the pass IR as an
nn.Module with the user's calling convention, plus a report of what the passes did.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.utils import _pytree as pytree

from .capture import capture
from .ir import GraphIR
from .pass_base import PassContext
from .pass_manager import PassManager, PassRecord


class TransformedModule(torch.nn.Module):
    """The IR after the passes, called like the original model (same input and output pytrees).

    Its weights are the IR's buffers: `finetune` trains them, `orca_compiler.compile` compiles it."""

    def __init__(self, ir: GraphIR):
        super().__init__()
        self.graph_module = ir.gm
        self.in_spec = ir.in_spec
        self.out_spec = ir.out_spec

    def forward(self, *args, **kwargs):
        leaves = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        out = self.graph_module(*leaves)
        flat = list(out) if isinstance(out, (tuple, list)) else [out]
        return pytree.tree_unflatten(flat, self.out_spec) if self.out_spec is not None else tuple(flat)


@dataclass
class TransformReport:
    """What the passes did: per-pass records (stats, weight bytes before/after) and, for
    prune-channels, one sentence per channel group."""

    pipeline: str
    passes: list[PassRecord]
    channel_groups: list[str] = field(default_factory=list)

    @property
    def weight_bytes(self) -> tuple[int, int]:
        ran = [r for r in self.passes if not r.skipped]
        return (ran[0].weight_bytes_before, ran[-1].weight_bytes_after) if ran else (0, 0)

    def __str__(self) -> str:
        before, after = self.weight_bytes
        lines = [f"pipeline: {self.pipeline}",
                 f"weights: {before / 1e6:.3f} MB -> {after / 1e6:.3f} MB ({after / max(before, 1):.1%})"]
        for r in self.passes:
            stats = ", ".join(f"{k}={v}" for k, v in r.stats.items())
            lines.append(f"  {r.name}: {stats}")
        if self.channel_groups:
            lines.append("channel groups:")
            lines += [f"  {s}" for s in self.channel_groups]
        return "\n".join(lines)


def prune(model: torch.nn.Module, example_inputs: Sequence, pipeline: str = "prune-channels", *,
          calibration_data: Iterable | None = None, calibration_loss: Callable | None = None,
          pass_config: dict[str, Any] | None = None) -> tuple[TransformedModule, TransformReport]:
    """Capture `model`, run `pipeline` (e.g. "prune-channels{ratio=0.5,criterion=taylor}" or
    "low-rank{energy=0.9}") and return `(module, report)`.

    `calibration_data` is a list of inputs shaped like `example_inputs` (or, with
    `calibration_loss(outputs, target) -> loss`, of `(inputs, target)` pairs) for criteria that
    need data (taylor, activation). Assumes an inference model (model.eval()); the result keeps
    eval semantics (BatchNorm uses its running statistics)."""
    from .api import _normalize_inputs
    from .lowering.support import keep_op_in_capture

    inputs = _normalize_inputs(example_inputs)
    manager = PassManager(pipeline)
    captured = capture(model, inputs, keep_op=keep_op_in_capture)
    config = dict(pass_config or {})
    if calibration_data is not None:
        config["calibration_data"] = list(calibration_data)
    if calibration_loss is not None:
        config["calibration_loss"] = calibration_loss
    ctx = PassContext(example_inputs=tuple(pytree.tree_leaves(inputs)), config=config)
    ir, records = manager.run(captured.ir, ctx)
    report = TransformReport(manager.text, records, list(config.get("channel_groups", [])))
    return TransformedModule(ir), report
