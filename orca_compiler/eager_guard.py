"""The eager guard: a compiled program must never be slower than the same graph in eager PyTorch.

After lowering, `compare` times the compiled program against the user's model in eager PyTorch,
interleaved on the example inputs, and the slower one is dropped: where eager wins by more than
`MARGIN`, compile() returns a module that calls the model itself (`EagerProgram`) and the report
says so with both times. Small models at batch 1 are where this happens (a few microseconds of
dispatch per kernel against eager's MKL calls: the zoo MLP at batch 1 measured 0.163 ms compiled
against 0.152 ms eager).

Only for CPU targets with static shapes (a symbolic dimension is timed at one size only).
`compile(..., eager_guard=False)` or `ORCA_EAGER_GUARD=off` turns it off; the test suite does,
so that tests exercise the compiled program.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree

ENV = "ORCA_EAGER_GUARD"
MARGIN = 0.05  # eager must be this much faster to win: near-ties keep the compiled program
REPEATS = 15


@dataclass
class GuardResult:
    """Medians of the compiled program and of the IR in eager (milliseconds), and the winner."""

    compiled_ms: float
    eager_ms: float
    chose: str  # "compiled" | "eager"

    def __str__(self) -> str:
        verdict = ("running the model in eager PyTorch, which was faster" if self.chose == "eager"
                   else "running the compiled program")
        return f"compiled {self.compiled_ms:.3f} ms vs eager {self.eager_ms:.3f} ms: {verdict}"


class EagerProgram(torch.nn.Module):
    """The user's model behind the compiled program's calling convention: flat tensors in (the
    leaves of `in_spec`, torch.export's (args, kwargs) spec), a flat tuple of tensors out."""

    def __init__(self, model: torch.nn.Module, in_spec):
        super().__init__()
        self.model = model
        self.in_spec = in_spec

    def forward(self, *flat):
        args, kwargs = pytree.tree_unflatten(list(flat), self.in_spec)
        return tuple(pytree.tree_leaves(self.model(*args, **kwargs)))


def enabled(options: dict, target, dynamic: bool) -> bool:
    """Whether to guard this compile: the option (default on), $ORCA_EAGER_GUARD, a CPU target
    whose device exists, and static shapes."""
    wanted = options.get("eager_guard")
    if wanted is None:
        wanted = os.environ.get(ENV, "on").lower() not in ("off", "0", "false", "no")
    return bool(wanted) and target.tvm_target.kind.name == "llvm" and target.device().exist and not dynamic


def time_both(program, eager, inputs: list) -> tuple[float, float]:
    """Median seconds of `program(*inputs)` and `eager(*inputs)`, interleaved."""
    from .timing import time_interleaved

    with torch.no_grad():
        times = time_interleaved({"compiled": lambda: program(*inputs), "eager": lambda: eager(*inputs)},
                                 repeats=REPEATS, warmup=2, block=3)
    return times["compiled"], times["eager"]


def compare(program, eager, inputs: list) -> GuardResult:
    """Time both and pick: eager only when it is faster by more than MARGIN."""
    compiled_s, eager_s = time_both(program, eager, inputs)
    chose = "eager" if eager_s < compiled_s * (1 - MARGIN) else "compiled"
    return GuardResult(compiled_s * 1e3, eager_s * 1e3, chose)
