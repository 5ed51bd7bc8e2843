"""What `orca debug` was asked to do, validated against the pipeline before anything runs."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import OrcaError, PipelineError
from ..pass_base import registered_passes


class DebugOptionError(OrcaError):
    """An `orca debug` flag has a value that cannot be used (the message names the flag)."""


@dataclass
class DebugOptions:
    """The debugging tools to run; field names follow the CLI flags (`--print-ir-after` -> print_ir_after)."""

    dump_dir: str = "orca-debug"
    print_ir_after_all: bool = False
    print_ir_after: list[str] = field(default_factory=list)
    print_ir_before: list[str] = field(default_factory=list)
    print_ir_after_change: bool = False
    print_ir_after_failure: bool = False
    time_passes: bool = False
    numerics: bool = False
    bisect: bool = False
    tol: float = 1e-4
    opt_bisect_limit: int | None = None
    reproducer_dir: str | None = None  # None: write no reproducer on a failure

    def wants_dump(self) -> bool:
        return bool(self.print_ir_after_all or self.print_ir_after or self.print_ir_before
                    or self.print_ir_after_change or self.print_ir_after_failure)

    def validate(self, pipeline_passes: list[str]) -> None:
        """Raise PipelineError for a pass name that is unknown or not in the pipeline, and
        DebugOptionError for a bad --tol or --opt-bisect-limit."""
        for flag, names in (("--print-ir-after", self.print_ir_after), ("--print-ir-before", self.print_ir_before)):
            for name in names:
                if name not in registered_passes():
                    raise PipelineError(f"{flag}={name}: unknown pass '{name}'; registered passes: "
                                        f"{', '.join(registered_passes())}")
                if name not in pipeline_passes:
                    raise PipelineError(f"{flag}={name}: pass '{name}' is not in the pipeline "
                                        f"({', '.join(pipeline_passes) or 'no passes'})")
        if not self.tol > 0:
            raise DebugOptionError(f"--tol must be a positive number, got {self.tol}")
        if self.opt_bisect_limit is not None and not 0 <= self.opt_bisect_limit <= len(pipeline_passes):
            raise DebugOptionError(f"--opt-bisect-limit must be between 0 and {len(pipeline_passes)} "
                                   f"(the pipeline's passes), got {self.opt_bisect_limit}")
