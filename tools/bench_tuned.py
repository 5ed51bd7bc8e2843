"""Tune zoo models, then time eager, torch.compile, onnxruntime, orca untuned and orca tuned side by side.

    python tools/bench_tuned.py                                  # mlp and resnet, 128 trials or 600 s each
    python tools/bench_tuned.py --models mlp --trials 8 --time-budget 60 --repeats 5   # a quick look
    python tools/bench_tuned.py --no-tune --db tuning_db         # time with the records already there
    python tools/bench_tuned.py --write-docs                     # also rewrite docs/benchmarks-tuned.md

Each model is first tuned (`orca_compiler.tune`, the same as `orca tune NAME --trials N
--time-budget S --db DIR`; a rerun continues from the records in DIR), then timed in a fresh
process: timings taken in the process that tuned were 2-3x off (issue 3). There, all backends run
interleaved round-robin after warm-up (orca_compiler.timing.time_interleaved) and the medians are
reported; eager and the peers are built by orca_compiler.bench, as `orca bench` builds them.
"orca untuned" and "orca tuned" are the same pipeline compiled without and with `tuning_db`,
both with the cache and the eager guard off (the guard could swap either for eager PyTorch).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orca_compiler import bench  # noqa: E402

DOC = bench.DOCS / "benchmarks-tuned.md"
UNTUNED, TUNED = "orca untuned", "orca tuned"


def tune_model(name: str, args) -> dict:
    """Tune `name` into args.db; what the run did (or that it was skipped)."""
    if args.no_tune:
        return {"skipped": True}
    import orca_compiler

    report = orca_compiler.tune(name, pipeline=args.pipeline, trials=args.trials, time_budget=args.time_budget,
                                db=args.db, trials_per_round=args.trials_per_round, compare=False,
                                progress=not args.quiet)
    print(report, flush=True)
    return {"trials_run": report.trials_run, "trials_total": report.trials_total, "seconds": report.seconds,
            "stopped_by": report.stopped_by, "tasks": len(report.tasks), "target_key": report.target_key}


def bench_model(name: str, args) -> dict:
    """Time one model under every backend, in this process (run it in a fresh one)."""
    import torch

    from orca_compiler import zoo
    from orca_compiler.api import compile as orca_compile
    from orca_compiler.demo import max_abs_error
    from orca_compiler.timing import time_interleaved

    model, inputs = zoo.get(name, batch_size=args.batch)
    with torch.no_grad():
        runners, compile_s, extra = bench.build_runners(model, inputs, [], args.peers)
        reference = model(*inputs)
        for label, options in ((UNTUNED, {}), (TUNED, {"tuning_db": args.db})):
            start = time.perf_counter()
            try:
                compiled = orca_compile(model, inputs, pipeline=args.pipeline, cache="off", eager_guard=False,
                                        **options)
                output = compiled(*inputs)
            except Exception as exc:  # a result, not a crash of the benchmark
                extra["failures"][label] = f"{type(exc).__name__}: {str(exc)[:120]}"
                continue
            compile_s[label] = time.perf_counter() - start
            extra["max_abs_err"][label] = max_abs_error(reference, output)
            extra.setdefault("kernels", {})[label] = [f"%{k.node} -> {k.choice}" for k in compiled.report.kernels]
            runners[label] = (lambda c: lambda: c(*inputs))(compiled)
        times = time_interleaved(runners, repeats=args.repeats, warmup=5, pause=0.01)
    return {"model": name, "batch": inputs[0].shape[0], "ms": {k: v * 1e3 for k, v in times.items()},
            "compile_s": compile_s, **extra}


def _bench_isolated(name: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, __file__, "--worker", "--models", name, "--db", str(args.db),
               "--pipeline", args.pipeline, "--repeats", str(args.repeats), "--peers", *args.peers, "--json", str(out)]
        if args.batch:
            cmd += ["--batch", str(args.batch)]
        path = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
        proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": path})
        if proc.returncode != 0 or not out.exists():
            return {"model": name, "error": f"worker process exited with status {proc.returncode}"}
        return json.loads(out.read_text())


def _ms(row: dict, backend: str) -> str:
    value = row["ms"].get(backend)
    return "failed" if value is None else f"{value:.3f} ({row['ms']['eager'] / value:.2f}x)"


def markdown(result: dict) -> str:
    info, config = result["machine"], result["config"]
    backends = ["eager", *config["peers"], UNTUNED, TUNED]
    budget = " and ".join(filter(None, [f"{config['trials']} trials" if config["trials"] else "",
                                        f"{config['time_budget']:.0f} s" if config["time_budget"] else ""]))
    lines = ["# Tuned models", "",
             "Generated by `python tools/bench_tuned.py --write-docs`. Each model is tuned with `orca tune` "
             f"(pipeline {config['pipeline']}, budget per model: {budget or 'none'}, {config['trials_per_round']} "
             "trials per round, database `" + str(config["db"]) + "`), then timed in a fresh process: the "
             f"median of {config['repeats']} interleaved rounds, ms (speedup over eager). orca untuned / "
             "tuned: the same pipeline compiled without / with the database, cache and eager guard off. "
             "Compare numbers only within one run.", "",
             f"Machine: {info['cpu']} ({info['cores']} cores, LLVM cpu {info['llvm_cpu']}), torch threads "
             f"{info['torch_threads']}; torch {info['torch']}, tvm {info['tvm']}, onnxruntime {info['onnxruntime']}, "
             f"orca {info['orca']}.", ""]
    header = ["model", "batch", "tuning", *backends, "tuned vs untuned", "tuned vs best peer"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result["rows"]:
        tuning = row.get("tuning", {})
        tuned = "records already there" if tuning.get("skipped") else (
            f"{tuning.get('trials_total', '?')} records, {tuning.get('tasks', '?')} tasks, "
            f"{tuning.get('seconds', 0):.0f} s ({tuning.get('stopped_by', '?')})")
        if "error" in row:
            lines.append(f"| {row['model']} | - | {tuned} | {row['error']} |")
            continue
        peers = {k: v for k, v in row["ms"].items() if not k.startswith("orca")}
        best = min(peers, key=peers.get)
        t, u = row["ms"].get(TUNED), row["ms"].get(UNTUNED)
        lines.append("| " + " | ".join([row["model"], str(row["batch"]), tuned, *(_ms(row, b) for b in backends),
                                         f"{u / t:.2f}x" if t and u else "-",
                                         f"{peers[best] / t:.2f}x ({best})" if t else "-"]) + " |")
    failures = [f"- {r['model']} {k}: {v}" for r in result["rows"] for k, v in r.get("failures", {}).items()]
    if failures:
        lines += ["", "## Failures", ""] + failures
    kernels = [(r["model"], label, ks) for r in result["rows"] for label, ks in r.get("kernels", {}).items() if ks]
    if kernels:
        lines += ["", "## Kernels chosen", ""]
        lines += [f"- {model}, {label}: {', '.join(ks)}" for model, label, ks in kernels]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["mlp", "resnet"], help="zoo names (default: mlp resnet)")
    parser.add_argument("--batch", type=int, help="batch size (default: the zoo's)")
    parser.add_argument("--pipeline", default="O2", help="orca pipeline (default: O2)")
    parser.add_argument("--trials", type=int, default=128, help="tuning records wanted per model (default: 128)")
    parser.add_argument("--time-budget", type=float, default=600.0, help="tuning seconds per model (default: 600)")
    parser.add_argument("--trials-per-round", type=int, default=16, help="(default: 16)")
    parser.add_argument("--db", type=Path, default=Path("tuning_db"),
                        help="tuning database folder (default: ./tuning_db)")
    parser.add_argument("--no-tune", action="store_true", help="time with the records already in --db")
    parser.add_argument("--peers", nargs="*", default=list(bench.PEERS), choices=bench.PEERS)
    parser.add_argument("--repeats", type=int, default=30, help="interleaved rounds (default: 30)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON here")
    parser.add_argument("--write-docs", action="store_true", help=f"write {DOC.relative_to(REPO)}")
    parser.add_argument("--quiet", action="store_true", help="no tuning progress bar")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.db = args.db.absolute()
    if args.worker:
        rows = [bench_model(name, args) for name in args.models]
        Path(args.json).write_text(json.dumps(rows[0]))
        return 0
    rows = []
    for name in args.models:
        tuning = tune_model(name, args)
        row = _bench_isolated(name, args)
        row["tuning"] = tuning
        rows.append(row)
        print(json.dumps({k: row.get(k) for k in ("model", "ms", "error")}), flush=True)
    config = {k: getattr(args, k) for k in ("models", "batch", "pipeline", "trials", "time_budget", "trials_per_round",
                                            "peers", "repeats", "no_tune")}
    config["db"] = os.path.relpath(args.db, Path.cwd())
    result = {"machine": bench.machine_info(), "config": config, "rows": rows}
    text = markdown(result)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    if args.write_docs:
        DOC.write_text(text)
        print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
