"""Run a pipeline over a captured model with the debugging instruments that DebugOptions ask for."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch.utils import _pytree as pytree

from ..capture import capture
from ..errors import PassError
from ..ir import GraphIR
from ..pass_base import PassContext
from ..pass_manager import PassManager, PassRecord
from ..pipeline import format_pipeline
from .bisect import BisectResult, StopAfter, bisect_pipeline, reference_outputs
from .dump import IRDumper
from .numerics import NumericsCheck
from .options import DebugOptions
from .reproducer import ReproducerWriter, write_reproducer
from .stats import PassStatsTable


@dataclass
class DebugResult:
    """What a debug run produced: the final IR, the pass records, and each requested tool's output."""

    ir: GraphIR | None = None
    records: list[PassRecord] = field(default_factory=list)
    files: list = field(default_factory=list)
    time_table: str | None = None
    numerics_table: str | None = None
    bisect: BisectResult | None = None
    reproducer: Path | None = None  # written when a pass failed or exceeded the tolerance


def capture_ir(model, inputs: tuple) -> GraphIR:
    """Capture `model` the way `orca_compiler.compile` does (same ops kept whole), without lowering."""
    from ..lowering.support import keep_op_in_capture

    return capture(model, tuple(inputs), keep_op=keep_op_in_capture).ir


def debug_model(model, inputs: tuple, pipeline: str, options: DebugOptions) -> DebugResult:
    """Capture `model`, then run `pipeline` with the tools of `options` (or bisect it).

    Flags are checked before capture. A failing pass still raises its PassError; the dumps
    written up to then (and the failure's, with --print-ir-after-failure) stay on disk. With
    `options.reproducer_dir`, a failing pass, a pass whose numerics first exceed `options.tol`
    (with `numerics`) or bisect's culprit leaves a reproducer there (see reproducer.py).
    """
    manager = PassManager(pipeline)
    options.validate([p.name for p in manager.passes])
    ir = capture_ir(model, inputs)
    flat = tuple(pytree.tree_leaves(tuple(inputs)))
    result = DebugResult()
    if options.bisect:
        reference = reference_outputs(model, inputs)
        result.bisect = bisect_pipeline(ir, manager.text, flat, reference, options.tol)
        result.reproducer = _bisect_reproducer(options, manager, result.bisect, flat, reference)
        return result
    instruments, dumper, stats, numerics = _instruments(options, flat, lambda: reference_outputs(model, inputs))
    writer = None
    if options.reproducer_dir:
        writer = ReproducerWriter(options.reproducer_dir, manager.specs, flat, numerics=numerics, tol=options.tol)
        instruments.append(writer)  # last: it reads the NumericsCheck row of the pass
    try:
        result.ir, result.records = manager.run(ir, PassContext(example_inputs=flat, instruments=instruments))
    except PassError as exc:
        notes = []  # say where the files are: the error is all the CLI prints
        if dumper and dumper.written:
            notes.append(f"IR dumps: {', '.join(str(f) for f in dumper.written)}")
        if writer and writer.write_pass_error(exc):
            notes.append(f"reproducer: {writer.written}; replay: orca debug replay {writer.written}")
        if notes:
            exc.args = (f"{exc} [{'; '.join(notes)}]",)
        raise
    result.reproducer = writer.written if writer else None
    result.files = list(dumper.written) if dumper else []
    result.time_table = stats.table() if stats else None
    result.numerics_table = numerics.table() if numerics else None
    return result


def _bisect_reproducer(options: DebugOptions, manager: PassManager, bisect: BisectResult, flat: tuple,
                       reference) -> Path | None:
    """Write the reproducer of bisect's culprit (its input IR and the passes from it on), if asked."""
    if not options.reproducer_dir or bisect.ir_before is None:
        return None
    failure = {"kind": "numeric", "pass": bisect.pass_name, "max_abs": bisect.error_after}
    return write_reproducer(options.reproducer_dir, bisect.ir_before, format_pipeline(manager.specs[bisect.pass_index:]),
                            flat, failure, reference=reference, tol=options.tol)


def _instruments(options: DebugOptions, flat_inputs: tuple, reference):
    """The instruments for `options` (StopAfter first, so a skipped pass is seen by none of them)."""
    instruments = []
    if options.opt_bisect_limit is not None:
        instruments.append(StopAfter(options.opt_bisect_limit))
    dumper = stats = numerics = None
    if options.wants_dump():
        dumper = IRDumper(options.dump_dir, after_all=options.print_ir_after_all, after=set(options.print_ir_after),
                          before=set(options.print_ir_before), after_change=options.print_ir_after_change,
                          after_failure=options.print_ir_after_failure)
        instruments.append(dumper)
    if options.time_passes:
        stats = PassStatsTable()
        instruments.append(stats)
    if options.numerics:
        numerics = NumericsCheck(flat_inputs, reference())
        instruments.append(numerics)
    return instruments, dumper, stats, numerics
