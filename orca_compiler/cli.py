"""The `orca` command line: list passes and models, compile or debug a model, run the demo or the benchmark."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import typing


def _cmd_passes(args) -> int:
    from .pass_base import registered_passes
    from .pipeline import NAMED_PIPELINES

    for name, cls in registered_passes().items():
        print(f"{name:<18} {cls.summary()}")
        hints = typing.get_type_hints(cls.Options)
        for fld in dataclasses.fields(cls.Options):
            typ = getattr(hints.get(fld.name), "__name__", str(hints.get(fld.name)))
            print(f"{'':<20}{fld.name}: {typ} = {fld.default!r}")
    print("\nnamed pipelines:")
    for name, text in NAMED_PIPELINES.items():
        print(f"  {name}: {text or '(no passes)'}")
    return 0


def _cmd_zoo(args) -> int:
    from . import zoo

    for name in zoo.names():
        _, inputs = zoo.get(name)
        shapes = ", ".join(f"{tuple(t.shape)}:{str(t.dtype).replace('torch.', '')}" for t in inputs)
        print(f"{name:<12} {zoo.describe(name)}  inputs {shapes}")
    return 0


def load_model(spec: str):
    """A zoo name, or `path/to/file.py:function` where function() returns (model, example_inputs)."""
    from . import zoo
    from .errors import OrcaError

    if ":" not in spec:
        return zoo.get(spec)
    path, func = spec.rsplit(":", 1)
    module_spec = importlib.util.spec_from_file_location("orca_user_model", path)
    if module_spec is None or module_spec.loader is None:
        raise OrcaError(f"cannot load {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, func):
        raise OrcaError(f"{path} has no function {func!r}")
    model, inputs = getattr(module, func)()
    return model.eval(), tuple(inputs)


def _cmd_compile(args) -> int:
    import torch

    from .api import compile as orca_compile
    from .demo import max_abs_error
    from .instruments import PassTimer, PrintIRAfter

    model, inputs = load_model(args.model)
    instruments = []
    timer = PassTimer()
    if args.time_passes:
        instruments.append(timer)
    if args.print_ir_after_all:
        instruments.append(PrintIRAfter(stream=sys.stdout))
    compiled = orca_compile(model, inputs, pipeline=args.pipeline, target=args.target,
                            fullgraph=args.fullgraph, instruments=instruments)
    print(compiled.report)
    if args.time_passes:
        print(timer.table())
    if args.print_ir:
        compiled.print_ir()
    if args.emit_cuda_source:
        from .lowering.relax_build import cuda_source

        with open(args.emit_cuda_source, "w") as f:
            for executable in compiled.executables:
                f.write(cuda_source(executable))
        print(f"CUDA source written to {args.emit_cuda_source}")
    if compiled.report.target != "cuda":
        with torch.no_grad():
            print(f"max abs error against eager: {max_abs_error(model(*inputs), compiled(*inputs)):.3e}")
    return 0


def _cmd_prune(args) -> int:
    import torch

    from .demo import max_abs_error
    from .transform import prune

    model, inputs = load_model(args.model)
    pruned, report = prune(model, inputs, args.pipeline)
    print(report)
    with torch.no_grad():
        print(f"max abs change of the outputs: {max_abs_error(model(*inputs), pruned(*inputs)):.3e}")
    return 0


def _cmd_quantize_sensitivity(args) -> int:
    from .sensitivity import quantize_sensitivity

    model, inputs = load_model(args.model)
    results = quantize_sensitivity(model, inputs, args.quantize, pipeline=args.pipeline)
    print(f"output error with only that layer quantized ({args.quantize}, after {args.pipeline}), worst first:")
    print(f"{'rel. error':>10}  {'kind':<9}  layer")
    for result in results:
        print(result)
    return 0


def _cmd_memory(args) -> int:
    from .capture import capture
    from .lowering.support import keep_op_in_capture
    from .memory_plan import memory_report
    from .pass_manager import PassManager

    model, inputs = load_model(args.model)
    options = ",".join(f"{key}={value}" for key, value in (("budget", args.budget),
                                                            ("activation_budget", args.activation_budget)) if value)
    pipeline = args.pipeline + (f",place-memory{{{options}}}" if options else "")
    from .pass_base import PassContext

    ctx = PassContext(config={"target_kind": "cuda" if args.target == "cuda" else "cpu"})  # place-memory's tiers
    ir, _ = PassManager(pipeline).run(capture(model, inputs, keep_op=keep_op_in_capture).ir, ctx)
    print(memory_report(ir))
    if options:
        from .printer import format_ir

        print("IR with the placement ops:")
        print(format_ir(ir), end="")
    return 0


def _cmd_debug(args) -> int:
    from .debug.cli import run

    return run(args, load_model)


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.models or None, pipeline=args.pipeline, target=args.target, repeats=args.repeats)
    return 0


def _cmd_bench(args) -> int:
    from .bench import run

    run(args)
    return 0


def _cmd_cache(args) -> int:
    import time

    from .compile_cache import DiskStore, parse_size
    from .errors import OrcaError

    store = DiskStore(args.dir)
    if args.action == "stats":
        entries = store.entries()
        total = sum(e["bytes"] for e in entries)
        print(f"{store.root}: {len(entries)} entries, {total / 2**20:.1f} MiB")
        for e in entries:
            age = time.time() - e["last_used"]
            print(f"  {e['key'][:16]}  {e['bytes'] / 2**20:7.2f} MiB  used {age / 3600:6.1f} h ago  {e['what']}")
    elif args.action == "clear":
        print(f"removed {store.clear()} entries from {store.root}")
    else:
        if args.max_size is None:
            raise OrcaError("orca cache prune needs --max-size SIZE (e.g. 500M, 2G)")
        removed = store.prune(parse_size(args.max_size))
        left = store.entries()
        print(f"removed {len(removed)} least recently used entries ({sum(e['bytes'] for e in removed) / 2**20:.1f} MiB); "
              f"{len(left)} entries, {sum(e['bytes'] for e in left) / 2**20:.1f} MiB left in {store.root}")
    return 0


def _cmd_tune(args) -> int:
    from .errors import OrcaError
    from .lowering import tuning_db

    if args.model == "show":
        if len(args.paths) != 1:
            raise OrcaError("usage: orca tune show DIR")
        print(tuning_db.show(args.paths[0]))
        return 0
    if args.model == "merge":
        if len(args.paths) < 2 or not args.output:
            raise OrcaError("usage: orca tune merge A B [C ...] -o OUT")
        for key, count in tuning_db.merge(args.paths, args.output).items():
            print(f"{args.output}/{key}: {count} records")
        return 0
    if args.paths:
        raise OrcaError(f"orca tune takes one MODEL, got extra arguments {args.paths} (or: orca tune merge|show ...)")
    from .tune import tune

    report = tune(args.model, pipeline=args.pipeline, target=args.target, trials=args.trials,
                  time_budget=args.time_budget, db=args.db, rpc=args.rpc, device_key=args.device_key,
                  trials_per_round=args.trials_per_round, compare=not args.no_compare, progress=not args.quiet)
    print(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orca", description="orca_compiler: compile PyTorch models through TVM.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("passes", help="list every registered pass with its summary and options")
    p.set_defaults(fn=_cmd_passes)

    p = sub.add_parser("zoo", help="list the bundled models")
    p.set_defaults(fn=_cmd_zoo)

    p = sub.add_parser("compile", help="compile a zoo model (or file.py:function) and print the report")
    p.add_argument("model", help="zoo name, or path/to/file.py:function returning (model, example_inputs)")
    p.add_argument("--pipeline", default="O1", help="pipeline text or O0..O3 (default O1)")
    p.add_argument("--target", default="llvm", help="llvm (default) or cuda")
    p.add_argument("--fullgraph", action="store_true", help="fail instead of falling back to eager")
    p.add_argument("--print-ir", action="store_true", help="print the IR after the pipeline")
    p.add_argument("--print-ir-after-all", action="store_true", help="print the IR after every pass")
    p.add_argument("--time-passes", action="store_true", help="print a table of time per pass")
    p.add_argument("--emit-cuda-source", metavar="FILE", help="write the generated CUDA source (cuda target)")
    p.set_defaults(fn=_cmd_compile)

    p = sub.add_parser("prune", help="prune / factor a zoo model (or file.py:function); print the channel "
                                     "groups, what each pass removed and the weight bytes")
    p.add_argument("model", help="zoo name, or path/to/file.py:function returning (model, example_inputs)")
    p.add_argument("--pipeline", default="prune-channels{ratio=0.5}",
                   help="passes that change the model (default: prune-channels{ratio=0.5})")
    p.set_defaults(fn=_cmd_prune)

    p = sub.add_parser("quantize-sensitivity", help="per layer, the output error when only that layer is "
                                                    "quantized, worst first (what to skip)")
    p.add_argument("model", help="zoo name, or path/to/file.py:function returning (model, example_inputs)")
    p.add_argument("--quantize", default="quantize{mode=weight-only,dtype=int8}",
                   help="the quantize pass spec (default: quantize{mode=weight-only,dtype=int8})")
    p.add_argument("--pipeline", default="O1", help="passes before it (default: O1)")
    p.set_defaults(fn=_cmd_quantize_sensitivity)

    p = sub.add_parser("memory", help="liveness and the activation memory plan of a model after a pipeline: "
                                      "bytes resident, activation peak with and without buffer reuse")
    p.add_argument("model", help="zoo name, or path/to/file.py:function returning (model, example_inputs)")
    p.add_argument("--pipeline", default="O2", help="pipeline to run first (default O2)")
    p.add_argument("--budget", help="fast-tier bytes for weights (bytes, 512K, or 50%% of the weights): "
                                    "run place-memory with it and print the plan and the IR")
    p.add_argument("--activation-budget", help="fast-tier bytes for activations (bytes, 64K, or 80%% of the planned "
                                               "peak): place-memory spills activations across idle gaps to fit it")
    p.add_argument("--target", default="llvm", choices=("llvm", "cpu", "cuda"),
                   help="the tiers place-memory plans with: ram/disk (llvm, cpu; default) or device/host/disk (cuda)")
    p.set_defaults(fn=_cmd_memory)

    from .debug import cli as debug_cli

    p = sub.add_parser("debug", help="pass debugging: IR dumps, pass timing, per-pass numerics, bisect",
                       description=debug_cli.__doc__)
    debug_cli.add_arguments(p).set_defaults(fn=_cmd_debug)

    p = sub.add_parser("demo", help="compile the zoo; print eager vs orca latency, speedup, max abs error")
    p.add_argument("models", nargs="*", help="zoo names (default: all)")
    p.add_argument("--pipeline", default="O1")
    p.add_argument("--target", default="llvm")
    p.add_argument("--repeats", type=int, default=20)
    p.set_defaults(fn=_cmd_demo)

    from . import bench

    p = sub.add_parser("bench", help="time the zoo against eager, torch.compile, onnxruntime and the machine's limits",
                       description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(p).set_defaults(fn=_cmd_bench)

    p = sub.add_parser("cache", help="the on-disk compile cache: stats, clear, prune --max-size SIZE")
    p.add_argument("action", choices=("stats", "clear", "prune"))
    p.add_argument("--max-size", metavar="SIZE", help="prune: drop least recently used entries down to SIZE (500M, 2G)")
    p.add_argument("--dir", help="the cache folder (default: $ORCA_COMPILE_CACHE_DIR, else <cache dir>/compiled)")
    p.set_defaults(fn=_cmd_cache)

    p = sub.add_parser("tune", help="tune a model's TVM kernels into a target-aware database; "
                                    "`orca tune merge A B -o C`, `orca tune show DIR`",
                       description="orca tune MODEL [options] | orca tune merge A B -o OUT | orca tune show DIR")
    p.add_argument("model", help="zoo name or path/to/file.py:function; or the word merge / show")
    p.add_argument("paths", nargs="*", help="merge: the databases to merge; show: the database")
    p.add_argument("-o", "--output", help="merge: the database to write (may be one of the inputs)")
    p.add_argument("--trials", type=int, default=64, help="trials for the model's tasks in the database (default 64)")
    p.add_argument("--time-budget", type=float, metavar="S",
                   help="stop S seconds after the start (checked after each round)")
    p.add_argument("--db", default="tuning_db", help="the database folder (default ./tuning_db)")
    p.add_argument("--target", default="llvm", help="llvm (default: this CPU) or cuda")
    p.add_argument("--pipeline", default="O2", help="the pipeline whose lowered graph is tuned (default O2)")
    p.add_argument("--rpc", metavar="HOST:PORT", help="measure on the servers of this TVM RPC tracker")
    p.add_argument("--device-key", metavar="KEY", help="with --rpc: the key the RPC servers registered")
    p.add_argument("--trials-per-round", type=int, default=8,
                   help="trials the search proposes and measures per round (default 8)")
    p.add_argument("--no-compare", action="store_true", help="skip timing eager / untuned / tuned at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=_cmd_tune)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `orca` console script; OrcaErrors print as one line and exit 2."""
    from .errors import OrcaError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 0
    try:
        return args.fn(args)
    except OrcaError as exc:
        print(f"orca: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
