"""Lowering: GraphIR -> TVM Relax -> built code, with eager fallback for what TVM cannot take.

Knows nothing about which passes ran; it sees only the IR. TVM is imported lazily (1-2 s).
"""
from .lower import LoweredProgram, lower  # noqa: F401
from .target import resolve_target  # noqa: F401
