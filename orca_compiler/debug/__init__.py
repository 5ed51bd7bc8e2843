"""Pass debugging tools: IR dumps, pass statistics, per-pass numerics against eager, and bisection.

Each tool is an instrument (orca_compiler.instruments) or a function over a captured IR, so the
same pieces serve `orca debug` and Python:

    from orca_compiler.debug import DebugOptions, debug_model
    result = debug_model(model, inputs, "O1", DebugOptions(numerics=True, time_passes=True))
"""
from __future__ import annotations

from .bisect import BisectResult, StopAfter, bisect_pipeline, first_diverging_node
from .dump import IRDumper, ir_diff
from .numerics import NumericsCheck, OutputError, compare_outputs
from .options import DebugOptionError, DebugOptions
from .session import DebugResult, capture_ir, debug_model
from .reproducer import ReplayResult, ReproducerError, replay
from .stats import PassStatsTable
from .view import view_model

__all__ = [
    "BisectResult", "StopAfter", "bisect_pipeline", "first_diverging_node", "IRDumper", "ir_diff",
    "NumericsCheck", "OutputError", "compare_outputs", "DebugOptionError", "DebugOptions",
    "DebugResult", "capture_ir", "debug_model", "PassStatsTable", "ReplayResult", "ReproducerError", "replay",
    "view_model",
]
