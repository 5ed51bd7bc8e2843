"""Run a pipeline over a captured model with the debugging instruments that DebugOptions ask for."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch.utils import _pytree as pytree

from ..capture import capture
from ..errors import PassError
from ..ir import GraphIR
from ..pass_base import PassContext
from ..pass_manager import PassManager, PassRecord
from .bisect import BisectResult, StopAfter, bisect_pipeline, reference_outputs
from .dump import IRDumper
from .numerics import NumericsCheck
from .options import DebugOptions
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


def capture_ir(model, inputs: tuple) -> GraphIR:
    """Capture `model` the way `orca_compiler.compile` does (same ops kept whole), without lowering."""
    from ..lowering.support import keep_op_in_capture

    return capture(model, tuple(inputs), keep_op=keep_op_in_capture).ir


def debug_model(model, inputs: tuple, pipeline: str, options: DebugOptions) -> DebugResult:
    """Capture `model`, then run `pipeline` with the tools of `options` (or bisect it).

    Flags are checked before capture. A failing pass still raises its PassError; the dumps
    written up to then (and the failure's, with --print-ir-after-failure) stay on disk.
    """
    manager = PassManager(pipeline)
    options.validate([p.name for p in manager.passes])
    ir = capture_ir(model, inputs)
    flat = tuple(pytree.tree_leaves(tuple(inputs)))
    result = DebugResult()
    if options.bisect:
        result.bisect = bisect_pipeline(ir, manager.text, flat, reference_outputs(model, inputs), options.tol)
        return result
    instruments, dumper, stats, numerics = _instruments(options, flat, lambda: reference_outputs(model, inputs))
    try:
        result.ir, result.records = manager.run(ir, PassContext(example_inputs=flat, instruments=instruments))
    except PassError as exc:
        if dumper and dumper.written:  # say where the dumps are: the error is all the CLI prints
            exc.args = (f"{exc} [IR dumps: {', '.join(str(f) for f in dumper.written)}]",)
        raise
    result.files = list(dumper.written) if dumper else []
    result.time_table = stats.table() if stats else None
    result.numerics_table = numerics.table() if numerics else None
    return result


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
