"""The eager guard: a compiled program must never be slower than the same graph in eager PyTorch.

After lowering, `compare` times the compiled module against the same module running the user's
model in eager PyTorch (`EagerProgram`), interleaved on the example inputs, each called the way
the user will call it (CompiledModule, its input checks included). The compiled program stays only
where it is faster by at least MARGIN. Otherwise compile() returns a module that calls the model
itself, and the report says so with both times.

Why the margin is in eager's favour: the fallback costs next to nothing, because CompiledModule
calls the user's model directly with the user's own arguments after its input check (~3 us on a
slow 2-core machine). A compiled program within a few percent of eager is a coin flip on a noisy
machine. On the zoo MLP at batch 8 (~0.85 ms, the same MKL GEMMs as eager), the guard timed the
compiled program 4.5% faster, and 200 interleaved rounds right after timed it 3% slower; the demo
then printed 0.88x. So where the two are that close, eager is the safe choice. Small models at
batch 1 are where eager wins outright: a few microseconds of dispatch per kernel against eager's
MKL calls.

The timing runs at least MIN_SECONDS after WARMUP rounds, each side in blocks of calls after a
PAUSE. The old one (15 rounds, ~20 ms on the zoo
MLP) kept that MLP's compiled program on a 1% difference, where separate processes then ran it in
230-290 us against eager's 180-190 us.

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
REPEATS = 15  # interleaved rounds, at least
WARMUP = 5
MIN_SECONDS = 0.3  # of timing in all, at least (a 0.2 ms model gets ~700 rounds)
MARGIN = 0.05  # the compiled program stays only where it takes at most (1 - MARGIN) of eager's time
# Seconds of sleep before each block, so that neither side starts on cores the other's spinning
# worker threads (TVM's pool, OpenMP) still hold: without it the zoo MLP at batch 8 timed 0.97x of
# eager in one run and 1.05-1.12x in others; with it 1.12-1.30x, every run (as orca bench pauses).
PAUSE = 0.01


@dataclass
class GuardResult:
    """Medians of the compiled program and of the IR in eager (milliseconds), and the winner."""

    compiled_ms: float
    eager_ms: float
    chose: str  # "compiled" | "eager"

    def __str__(self) -> str:
        verdict = (f"running the model in eager PyTorch (the compiled program was not {MARGIN:.0%} faster)"
                   if self.chose == "eager" else "running the compiled program")
        return f"compiled {self.compiled_ms:.3f} ms vs eager {self.eager_ms:.3f} ms: {verdict}"


class EagerProgram(torch.nn.Module):
    """The user's model behind the compiled program's calling convention: flat tensors in (the
    leaves of `in_spec`, torch.export's (args, kwargs) spec), a flat tuple of tensors out.
    CompiledModule does not go through `forward`: it calls `model` with the user's own arguments."""

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


def time_both(compiled, fallback, inputs: tuple) -> tuple[float, float]:
    """Median seconds of `compiled(*inputs)` and `fallback(*inputs)` (the CompiledModule with the
    compiled program, and the one running eager), interleaved."""
    from .timing import time_interleaved

    with torch.no_grad():
        times = time_interleaved({"compiled": lambda: compiled(*inputs), "eager": lambda: fallback(*inputs)},
                                 repeats=REPEATS, warmup=WARMUP, block=5, pause=PAUSE, min_seconds=MIN_SECONDS)
    return times["compiled"], times["eager"]


def ran_eager(compiled) -> bool:
    """Whether the guard replaced `compiled`'s program (a CompiledModule) by the model in eager."""
    guard = compiled.report.eager_guard
    return guard is not None and guard.chose == "eager"


def compare(compiled, fallback, inputs: tuple) -> GuardResult:
    """Time both modules and pick: the compiled program only where it is faster than eager by at
    least MARGIN."""
    compiled_s, eager_s = time_both(compiled, fallback, inputs)
    chose = "compiled" if compiled_s <= eager_s * (1 - MARGIN) else "eager"
    return GuardResult(compiled_s * 1e3, eager_s * 1e3, chose)
