"""Error types: every failure orca_compiler reports is an OrcaError naming what is at fault."""
from __future__ import annotations


class OrcaError(Exception):
    """Base of every error orca_compiler raises on purpose."""


class CaptureError(OrcaError):
    """The model could not be captured into a graph (torch.export and the fallbacks failed)."""


class PipelineError(OrcaError):
    """A pipeline string names an unknown pass or option, or an option value is malformed."""


class PassError(OrcaError):
    """A pass raised, or left the IR in a state that does not verify.

    Carries the pass name, the passes that ran before it and, when known, the node at fault.
    """

    def __init__(self, message: str, *, pass_name: str, previous: list[str], node: str | None = None):
        where = f"pass '{pass_name}'"
        if node:
            where += f" at node %{node}"
        before = ", ".join(previous) if previous else "none"
        super().__init__(f"{where}: {message} (passes run before it: {before})")
        self.pass_name = pass_name
        self.previous = list(previous)
        self.node = node


class PassInputError(OrcaError):
    """A pass cannot work on this IR or with this data (e.g. a criterion that needs calibration
    inputs got none); the pass manager adds the pass name and the passes before it."""


class VerificationError(OrcaError):
    """The IR breaks an invariant: a missing or wrong shape/dtype, a dangling weight, a bad graph."""

    def __init__(self, message: str, *, node: str | None = None):
        super().__init__(f"node %{node}: {message}" if node else message)
        self.node = node


class UnsupportedOpError(OrcaError):
    """An op has no lowering and fallback to eager was not allowed (fullgraph=True)."""


class LoweringError(OrcaError):
    """TVM rejected a graph (import or build); the message names the partition and its ops."""


class TargetError(OrcaError):
    """The target name or dict is not understood, or the machine cannot run that target."""


class InputMismatchError(OrcaError):
    """A compiled module was called with inputs whose count, shape, dtype or device differ."""


class StreamingError(OrcaError):
    """A streamed program's weight stream cannot do what its plan says (e.g. a copy would take the
    device pool over its capacity)."""
