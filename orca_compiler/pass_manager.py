"""Runs a pipeline of passes over the IR, with instruments, verification and per-pass records."""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import OrcaError, PassError, VerificationError
from .instruments import now
from .ir import ORIGIN, GraphIR
from .pass_base import Pass, PassContext
from .pipeline import PassSpec, format_pipeline, parse_pipeline
from .verify import verify


@dataclass
class PassRecord:
    """What one pass did: timing, change, statistics, and node/weight counts before and after."""

    name: str
    spec: str
    modified: bool
    seconds: float
    stats: dict = field(default_factory=dict)
    nodes_before: int = 0
    nodes_after: int = 0
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    skipped: bool = False
    ir_after: GraphIR | None = field(default=None, repr=False)  # only while instruments run


def _tag_origin(ir: GraphIR, pass_name: str) -> None:
    for node in ir.graph.nodes:
        node.meta.setdefault(ORIGIN, pass_name)


class PassManager:
    """Run `pipeline` (text or PassSpecs) on an IR: `PassManager("cse,dce").run(ir, ctx)`.

    Each pass gets its own copy of the IR, so a failing pass leaves the input intact; the result is
    verified after every pass when `ctx.verify_each` (the default).
    """

    def __init__(self, pipeline: str | list[PassSpec]):
        self.specs = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
        self.passes: list[Pass] = [spec.instantiate() for spec in self.specs]

    @property
    def text(self) -> str:
        return format_pipeline(self.specs)

    def run(self, ir: GraphIR, ctx: PassContext | None = None) -> tuple[GraphIR, list[PassRecord]]:
        ctx = ctx or PassContext()
        records: list[PassRecord] = []
        for inst in ctx.instruments:
            inst.enter_pipeline(ir, self.passes)
        for index, (spec, pass_) in enumerate(zip(self.specs, self.passes)):
            if not all(inst.should_run(index, pass_, ir) for inst in ctx.instruments):
                records.append(PassRecord(pass_.name, spec.format(), False, 0.0, skipped=True))
                continue
            for inst in ctx.instruments:
                inst.run_before_pass(index, pass_, ir)
            previous = [r.name for r in records if not r.skipped]
            work = ir.copy()
            start = now()
            try:
                result = pass_.run(work, ctx)
                result.ir.recompile()
                _tag_origin(result.ir, pass_.name)
                if ctx.verify_each:
                    verify(result.ir)
            except VerificationError as exc:
                self._fail(ctx, index, pass_, ir, exc)
                raise PassError(f"left an IR that does not verify: {exc}", pass_name=pass_.name,
                                previous=previous, node=exc.node) from exc
            except PassError:
                raise
            except OrcaError as exc:
                self._fail(ctx, index, pass_, ir, exc)
                raise PassError(f"{type(exc).__name__}: {exc}", pass_name=pass_.name, previous=previous) from exc
            except Exception as exc:
                self._fail(ctx, index, pass_, ir, exc)
                raise PassError(f"{type(exc).__name__}: {exc}", pass_name=pass_.name, previous=previous) from exc
            record = PassRecord(
                name=pass_.name, spec=spec.format(), modified=result.modified, seconds=now() - start,
                stats=dict(result.stats), nodes_before=ir.num_nodes(), nodes_after=result.ir.num_nodes(),
                weight_bytes_before=ir.weight_bytes(), weight_bytes_after=result.ir.weight_bytes(),
                ir_after=result.ir,
            )
            for inst in ctx.instruments:
                inst.run_after_pass(index, pass_, record)
            record.ir_after = None
            records.append(record)
            ir = result.ir
        for inst in ctx.instruments:
            inst.exit_pipeline(ir)
        return ir, records

    @staticmethod
    def _fail(ctx, index, pass_, ir, exc) -> None:
        for inst in ctx.instruments:
            inst.run_after_failure(index, pass_, ir, exc)
