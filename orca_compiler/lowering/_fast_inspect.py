"""A cheap inspect.stack/getouterframes: FrameInfo from frame attributes and linecache.

Why: TVMScript's parser calls inspect.stack() once per decorated prim_func, and the stdlib version
runs inspect.getmodule (a scan of sys.modules) for every frame. `import tvm.s_tir.tensor_intrin`
parses ~500 prim_funcs, so it takes 25-36 s instead of a few seconds; meta_schedule imports it in
the tuner and in every build worker.

Stdlib only and self-contained: tuning.py also sends this file's source to meta_schedule's
popen workers (`python -m tvm.exec.popen_worker`) and runs it there, without importing
orca_compiler (and torch) in each worker.
"""
import inspect
import linecache
import sys

try:  # Python >= 3.11: FrameInfo carries instruction positions
    from dis import Positions as _Positions
except ImportError:  # pragma: no cover
    _Positions = None


def _frame_info(frame, context):
    code = frame.f_code
    lineno = frame.f_lineno or code.co_firstlineno
    lines = index = None
    if context > 0:
        source = linecache.getlines(code.co_filename, frame.f_globals)
        if source:
            start = max(0, min(lineno - 1 - context // 2, len(source) - context))
            lines = source[start:start + context]
            index = lineno - 1 - start
    fields = (frame, code.co_filename, lineno, code.co_name, lines, index)
    if _Positions is None:
        return inspect.FrameInfo(*fields)
    # Columns left unknown: computing them walks co_positions(), and no caller we serve reads them.
    return inspect.FrameInfo(*fields, positions=_Positions(lineno, lineno, None, None))


def fast_getouterframes(frame, context=1):
    """inspect.getouterframes without the per-frame module lookup."""
    frames = []
    while frame is not None:
        frames.append(_frame_info(frame, context))
        frame = frame.f_back
    return frames


def fast_stack(context=1):
    """inspect.stack without the per-frame module lookup."""
    return fast_getouterframes(sys._getframe(1), context)


fast_stack._orca_fast = True


def install():
    """Replace inspect.stack and inspect.getouterframes; True if they were not replaced already."""
    if getattr(inspect.stack, "_orca_fast", False):
        return False
    inspect.stack = fast_stack
    inspect.getouterframes = fast_getouterframes
    return True
