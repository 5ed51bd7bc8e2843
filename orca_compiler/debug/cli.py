"""`orca debug MODEL [flags]`, `orca debug bisect MODEL`, `orca debug replay DIR`, `orca debug view MODEL`."""
from __future__ import annotations

import argparse

from .options import DebugOptionError, DebugOptions


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `orca debug` flags to `p`."""
    p.add_argument("target", nargs="+", metavar="MODEL",
                   help="zoo name or path/to/file.py:function; `bisect MODEL` is the same as MODEL --bisect; "
                        "`replay DIR` reruns a reproducer; `view MODEL` writes an HTML graph report (--out)")
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
    p.add_argument("--reproducer-dir", metavar="DIR",
                   help="where a failing pass or tolerance violation leaves a reproducer (default: "
                        "DUMP_DIR/reproducer when any --print-ir-* flag is given; otherwise none)")
    p.add_argument("--out", default="orca-debug/graph.html", help="`view`: the HTML file to write")
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
        raise DebugOptionError(f"MODEL: expected `orca debug MODEL`, `orca debug bisect MODEL`, `orca debug replay DIR` "
                               f"or `orca debug view MODEL`, got {' '.join(args.target)}")
    reproducer_dir = args.reproducer_dir
    if reproducer_dir is None and (args.print_ir_after_all or args.print_ir_after or args.print_ir_before
                                   or args.print_ir_after_change or args.print_ir_after_failure):
        reproducer_dir = f"{args.dump_dir}/reproducer"
    return target[0], DebugOptions(
        dump_dir=args.dump_dir, print_ir_after_all=args.print_ir_after_all,
        print_ir_after=_split(args.print_ir_after), print_ir_before=_split(args.print_ir_before),
        print_ir_after_change=args.print_ir_after_change, print_ir_after_failure=args.print_ir_after_failure,
        time_passes=args.time_passes, numerics=args.numerics, bisect=bisect, tol=args.tol,
        opt_bisect_limit=args.opt_bisect_limit, reproducer_dir=reproducer_dir,
    )


def _mode(args) -> tuple[str, list[str]]:
    """`replay` / `view` and the rest of the positionals, or `debug` and all of them."""
    if args.target[0] in ("replay", "view") and len(args.target) == 2:
        return args.target[0], args.target[1:]
    return "debug", list(args.target)


def run_replay(folder: str, out=print) -> int:
    """`orca debug replay DIR`: exit 1 when the recorded failure happens again, 0 when it does not."""
    from .reproducer import replay

    result = replay(folder)
    out(result.describe())
    return 1 if result.got is not None else 0


def run_view(args, load_model, out=print) -> int:
    """`orca debug view MODEL --out FILE`: the HTML graph report."""
    from .view import view_model

    model, inputs = load_model(args.target[1])
    path = view_model(model, inputs, args.pipeline, args.out, title=f"{args.target[1]}: pipeline {args.pipeline}")
    out(f"graph report written to {path}")
    return 0


def run(args, load_model, out=print) -> int:
    """Run `orca debug`; `load_model(spec)` resolves MODEL as `orca compile` does. Exit status 0,
    or 1 when bisect finds a pass that exceeds the tolerance."""
    from .session import debug_model

    mode, rest = _mode(args)
    if mode == "replay":
        return run_replay(rest[0], out)
    if mode == "view":
        return run_view(args, load_model, out)
    spec, options = options_from_args(args)
    model, inputs = load_model(spec)
    result = debug_model(model, inputs, args.pipeline, options)
    if result.bisect is not None:
        out(result.bisect.verdict())
        out(f"reproduce: {result.bisect.reproduce(spec)}")
        if result.reproducer:
            out(f"reproducer: {result.reproducer} (replay: orca debug replay {result.reproducer})")
        return 0 if result.bisect.pass_index is None else 1
    ran = [r for r in result.records if not r.skipped]
    out(f"orca debug {spec}: pipeline {args.pipeline}, {len(ran)} of {len(result.records)} passes ran")
    if result.time_table:
        out(result.time_table)
    if result.numerics_table:
        out(result.numerics_table)
    if result.files:
        out(f"{len(result.files)} file(s) written to {options.dump_dir}/: " + ", ".join(f.name for f in result.files))
    if result.reproducer:
        out(f"tolerance {options.tol:g} exceeded; reproducer: {result.reproducer} "
            f"(replay: orca debug replay {result.reproducer})")
    return 0
