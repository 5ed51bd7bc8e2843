"""Pass instruments: objects the pass manager calls around every pass (the TVM/MLIR design).

Timing, IR printing and verification are instruments, and so will be the debugging tools
(bisect stops the pipeline through `should_run`). Hooks are no-ops by default.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

from .ir import GraphIR
from .printer import format_ir


class Instrument:
    """Base instrument: override the hooks you need."""

    def enter_pipeline(self, ir: GraphIR, passes: list) -> None:
        pass

    def exit_pipeline(self, ir: GraphIR) -> None:
        pass

    def should_run(self, index: int, pass_, ir: GraphIR) -> bool:
        return True

    def run_before_pass(self, index: int, pass_, ir: GraphIR) -> None:
        pass

    def run_after_pass(self, index: int, pass_, record) -> None:
        pass

    def run_after_failure(self, index: int, pass_, ir: GraphIR, error: Exception) -> None:
        pass


class PassTimer(Instrument):
    """Collect (pass name, seconds) for each pass; `table()` formats them."""

    def __init__(self):
        self.rows: list[tuple[str, float]] = []

    def run_after_pass(self, index, pass_, record) -> None:
        self.rows.append((record.name, record.seconds))

    def table(self) -> str:
        total = sum(s for _, s in self.rows) or 1e-12
        lines = [f"{'pass':<24}{'ms':>10}{'%':>8}"]
        for name, seconds in self.rows:
            lines.append(f"{name:<24}{seconds * 1e3:>10.2f}{100 * seconds / total:>8.1f}")
        return "\n".join(lines)


class PrintIRAfter(Instrument):
    """Print the IR after each pass (all of them, or only those named in `only`)."""

    def __init__(self, only: set[str] | None = None, stream: TextIO | None = None, changed_only: bool = False):
        self.only = only
        self.stream = stream or sys.stderr
        self.changed_only = changed_only
        self._ir: GraphIR | None = None

    def run_after_pass(self, index, pass_, record) -> None:
        if self.only is not None and record.name not in self.only:
            return
        if self.changed_only and not record.modified:
            return
        self.stream.write(f"// ----- IR after {record.name} (#{index}) -----\n{format_ir(record.ir_after)}")


class CallbackInstrument(Instrument):
    """Call `fn(record)` after every pass (handy for tests and notebooks)."""

    def __init__(self, fn):
        self.fn = fn

    def run_after_pass(self, index, pass_, record) -> None:
        self.fn(record)


def now() -> float:
    return time.perf_counter()
