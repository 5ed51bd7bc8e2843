"""`orca debug MODEL [flags]` and `orca debug bisect MODEL`: the debugging tools from the command line."""
from __future__ import annotations

import argparse

from .options import DebugOptionError, DebugOptions


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `orca debug` flags to `p`."""
    p.add_argument("target", nargs="+", metavar="MODEL",
                   help="zoo name or path/to/file.py:function; `bisect MODEL` is the same as MODEL --bisect")
    p.add_argument("--pipeline", default="O1", help="pipeline text or O0..O3 (default O1)")
    p.add_argument("--dump-dir", default="orca-debug", help="folder for the IR dumps (default orca-debug/)")
    p.add_argument("--print-ir-after-all", action="store_true", help="dump the IR after every pass")
    p.add_argument("--print-ir-after", action="append", default=[], metavar="PASS",
                   help="dump the IR after PASS (repeat, or comma-separate)")
    p.add_argument("--print-ir-before", action="append", default=[], metavar="PASS",
                   help="dump the IR before PASS (repeat, or comma-separate)")
    p.add_argument("--print-ir-after-change", action="store_true", help="dump the IR after passes that changed it")
    p.add_argument("--print-ir-after-failure", action="store_true",
                   help="dump the input IR and the error of a pass that fails")
    p.add_argument("--time-passes", action="store_true", help="table of time, nodes and weight bytes per pass")
    p.add_argument("--numerics", action="store_true", help="per pass and output: errors of the IR against eager")
    p.add_argument("--bisect", action="store_true", help="find the first pass (and node) that exceeds --tol")
    p.add_argument("--tol", type=float, default=1e-4, help="max abs error bisect accepts (default 1e-4)")
    p.add_argument("--opt-bisect-limit", type=int, metavar="N", help="run only the first N passes")
    return p


def _split(values: list[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def options_from_args(args) -> tuple[str, DebugOptions]:
    """The model spec and DebugOptions of parsed `orca debug` arguments."""
    target = list(args.target)
    bisect = args.bisect
    if target[0] == "bisect" and len(target) == 2:
        bisect, target = True, target[1:]
    if len(target) != 1:
        raise DebugOptionError(f"MODEL: expected `orca debug MODEL` or `orca debug bisect MODEL`, got {' '.join(args.target)}")
    return target[0], DebugOptions(
        dump_dir=args.dump_dir, print_ir_after_all=args.print_ir_after_all,
        print_ir_after=_split(args.print_ir_after), print_ir_before=_split(args.print_ir_before),
        print_ir_after_change=args.print_ir_after_change, print_ir_after_failure=args.print_ir_after_failure,
        time_passes=args.time_passes, numerics=args.numerics, bisect=bisect, tol=args.tol,
        opt_bisect_limit=args.opt_bisect_limit,
    )


def run(args, load_model, out=print) -> int:
    """Run `orca debug`; `load_model(spec)` resolves MODEL as `orca compile` does. Exit status 0,
    or 1 when bisect finds a pass that exceeds the tolerance."""
    from .session import debug_model

    spec, options = options_from_args(args)
    model, inputs = load_model(spec)
    result = debug_model(model, inputs, args.pipeline, options)
    if result.bisect is not None:
        out(result.bisect.verdict())
        out(f"reproduce: {result.bisect.reproduce(spec)}")
        return 0 if result.bisect.pass_index is None else 1
    ran = [r for r in result.records if not r.skipped]
    out(f"orca debug {spec}: pipeline {args.pipeline}, {len(ran)} of {len(result.records)} passes ran")
    if result.time_table:
        out(result.time_table)
    if result.numerics_table:
        out(result.numerics_table)
    if result.files:
        out(f"{len(result.files)} file(s) written to {options.dump_dir}/: " + ", ".join(f.name for f in result.files))
    return 0
