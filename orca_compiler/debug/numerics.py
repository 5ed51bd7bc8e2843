"""Per-pass numerics: run the IR (in torch) after each pass on the example inputs and compare with eager."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..instruments import Instrument
from ..ir import GraphIR


@dataclass(frozen=True)
class OutputError:
    """How far one output is from its reference: max abs error, max abs error / max |reference|, cosine."""

    max_abs: float
    relative: float
    cosine: float


def tensor_error(expected: torch.Tensor, actual: torch.Tensor) -> OutputError:
    """Compare two tensors of the same shape in float64 (non-float tensors compare as values)."""
    e, a = expected.detach().double().flatten(), actual.detach().double().flatten()
    if e.shape != a.shape:
        return OutputError(float("inf"), float("inf"), float("nan"))
    if e.numel() == 0:
        return OutputError(0.0, 0.0, 1.0)
    max_abs = (a - e).abs().max().item()
    scale = e.abs().max().item()
    relative = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    norms = e.norm() * a.norm()
    cosine = (e @ a / norms).item() if norms > 0 else (1.0 if max_abs == 0 else 0.0)
    return OutputError(max_abs, relative, cosine)


def compare_outputs(expected, actual) -> list[OutputError]:
    """One OutputError per tensor leaf of two output pytrees (flattened in the same order)."""
    exp = [t for t in pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
    act = [t for t in pytree.tree_leaves(actual) if isinstance(t, torch.Tensor)]
    return [tensor_error(e, a) for e, a in zip(exp, act)]


def max_abs_of(errors: list[OutputError]) -> float:
    return max((e.max_abs for e in errors), default=0.0)


class _Recorder(fx.Interpreter):
    """An interpreter that keeps every node's value (values are not freed after their last use)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=False)


def node_values(ir: GraphIR, inputs: tuple) -> dict[str, object]:
    """Run `ir` on the flat `inputs` and return each node's value by node name."""
    ir.recompile()
    recorder = _Recorder(ir.gm)
    with torch.no_grad():
        recorder.run(*inputs)
    return {node.name: value for node, value in recorder.env.items()}


class NumericsCheck(Instrument):
    """Run the input IR and the IR after every pass on `inputs` (flat) and compare with `reference`.

    `reference` is the eager model's output pytree. `rows` holds (pass index or -1 for the
    captured IR, pass name, per-output errors); `table()` prints one line per pass and output.
    """

    def __init__(self, inputs: tuple, reference):
        self.inputs = tuple(inputs)
        self.reference = reference
        self.rows: list[tuple[int, str, list[OutputError]]] = []

    def enter_pipeline(self, ir, passes) -> None:
        self.rows.append((-1, "(captured)", compare_outputs(self.reference, ir.run(*self.inputs))))

    def run_after_pass(self, index, pass_, record) -> None:
        self.rows.append((index, record.name, compare_outputs(self.reference, record.ir_after.run(*self.inputs))))

    def table(self) -> str:
        lines = [f"{'#':>3}  {'pass':<22}{'output':>7}{'max abs err':>14}{'rel err':>12}{'cosine':>12}"]
        for index, name, errors in self.rows:
            shown = "-" if index < 0 else str(index)
            for i, err in enumerate(errors):
                lines.append(f"{shown:>3}  {name:<22}{i:>7}{err.max_abs:>14.3e}{err.relative:>12.3e}{err.cosine:>12.8f}")
        return "\n".join(lines)
