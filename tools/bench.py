"""Benchmark every zoo model under eager, torch.compile (Inductor), onnxruntime and orca, side by side.

    python tools/bench.py                      # all models, batch 1 and the zoo's default batch
    python tools/bench.py --models mlp resnet --batches 1 8 --repeats 50
    python tools/bench.py --write-docs         # also rewrite docs/benchmarks.md and docs/benchmarks.json

All backends of one (model, batch) are timed in one process, interleaved round-robin after
warm-up, and reported as medians; ratios are eager/backend (>1 = faster than eager) and
best-peer/orca (>1 = orca beats the fastest of eager, torch.compile and onnxruntime). Absolute
times are comparable only within one run. onnxruntime is optional (pip install onnxruntime onnxscript).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
import warnings
from pathlib import Path

import torch

import orca_compiler as oc
from orca_compiler.demo import max_abs_error
from orca_compiler.timing import time_interleaved

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _onnxruntime_runner(model, inputs):
    import onnxruntime as ort

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, inputs, dynamo=True, verbose=False)
    program.save(buffer)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = {n: t.numpy() for n, t in zip(names, inputs)}
    return lambda: session.run(None, feeds)


def build_runners(model, inputs, pipelines) -> tuple[dict, dict, dict]:
    """Runner callables per backend, compile seconds per backend, and errors for those that failed."""
    runners, compile_s, failures = {"eager": lambda: model(*inputs)}, {}, {}
    reference = model(*inputs)
    t0 = time.perf_counter()
    try:
        torch._dynamo.reset()
        inductor = torch.compile(model)
        inductor(*inputs)
        runners["torch.compile"] = lambda: inductor(*inputs)
        compile_s["torch.compile"] = time.perf_counter() - t0
    except Exception as exc:  # a peer failing is a result, not a crash of the benchmark
        failures["torch.compile"] = f"{type(exc).__name__}: {str(exc)[:120]}"
    t0 = time.perf_counter()
    try:
        runners["onnxruntime"] = _onnxruntime_runner(model, inputs)
        compile_s["onnxruntime"] = time.perf_counter() - t0
    except Exception as exc:
        failures["onnxruntime"] = f"{type(exc).__name__}: {str(exc)[:120]}"
    errors = {}
    for pipeline in pipelines:
        name = f"orca {pipeline}"
        t0 = time.perf_counter()
        compiled = oc.compile(model, inputs, pipeline=pipeline)
        compile_s[name] = time.perf_counter() - t0
        errors[name] = max_abs_error(reference, compiled(*inputs))
        runners[name] = (lambda c: lambda: c(*inputs))(compiled)
    return runners, compile_s, {"failures": failures, "max_abs_err": errors}


def bench(models, batches, pipelines, repeats) -> list[dict]:
    rows = []
    for name in models:
        for batch in batches:
            model, inputs = oc.zoo.get(name, batch_size=batch)
            with torch.no_grad():
                runners, compile_s, extra = build_runners(model, inputs, pipelines)
                times = time_interleaved(runners, repeats=repeats, warmup=5)
            eager = times["eager"]
            peers = {k: v for k, v in times.items() if not k.startswith("orca")}
            best_peer = min(peers, key=peers.get)
            row = {"model": name, "batch": batch, "ms": {k: v * 1e3 for k, v in times.items()},
                   "speedup_vs_eager": {k: eager / v for k, v in times.items()},
                   "best_peer": best_peer,
                   "orca_vs_best_peer": {k: peers[best_peer] / v for k, v in times.items() if k.startswith("orca")},
                   "compile_s": compile_s, **extra}
            rows.append(row)
            print(_row_text(row), flush=True)
    return rows


def _row_text(row) -> str:
    parts = [f"{row['model']:<12} b{row['batch']:<3}"]
    for k, v in row["ms"].items():
        parts.append(f"{k} {v:.3f}ms ({row['speedup_vs_eager'][k]:.2f}x)")
    parts.append(f"best peer {row['best_peer']}")
    return " | ".join(parts)


def machine_info() -> dict:
    import tvm

    info = {"machine": platform.machine(), "cpu": platform.processor() or "", "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "tvm": tvm.__version__, "orca": oc.__version__,
            "llvm_cpu": tvm.get_global_func("target.llvm_get_system_cpu")()}
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = "not installed"
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def markdown(rows, info, pipelines) -> str:
    backends = ["eager", "torch.compile", "onnxruntime"] + [f"orca {p}" for p in pipelines]
    lines = ["# Benchmark results", "",
             "Generated by `python tools/bench.py --write-docs`. Median latency of interleaved runs in one process;",
             "ratios are eager time / backend time (>1 is faster than eager). `vs best peer` = fastest of eager,",
             "torch.compile and onnxruntime divided by orca (>1: orca wins). Compare numbers only within one table.", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
             "| model | batch | " + " | ".join(f"{b} ms (x eager)" for b in backends) + " | best peer | "
             + " | ".join(f"orca {p} vs best peer" for p in pipelines) + " | orca max abs err |",
             "|---|---|" + "---|" * (len(backends) + 1 + len(pipelines) + 1)]
    for r in rows:
        cells = []
        for b in backends:
            cells.append(f"{r['ms'][b]:.3f} ({r['speedup_vs_eager'][b]:.2f}x)" if b in r["ms"] else "failed")
        vs = [f"{r['orca_vs_best_peer'][f'orca {p}']:.2f}x" for p in pipelines]
        err = max(r["max_abs_err"].values())
        lines.append(f"| {r['model']} | {r['batch']} | " + " | ".join(cells) + f" | {r['best_peer']} | "
                     + " | ".join(vs) + f" | {err:.1e} |")
    lines += ["", "Compile time (s), first call included:", "",
              "| model | batch | " + " | ".join(b for b in backends if b != "eager") + " |",
              "|---|---|" + "---|" * (len(backends) - 1)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | "
                     + " | ".join(f"{r['compile_s'][b]:.1f}" if b in r["compile_s"] else "-" for b in backends if b != "eager") + " |")
    failures = [(r["model"], r["batch"], k, v) for r in rows for k, v in r["failures"].items()]
    if failures:
        lines += ["", "Peers that failed:", ""] + [f"- {m} b{b} {k}: {v}" for m, b, k, v in failures]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=oc.zoo.names())
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    parser.add_argument("--pipelines", nargs="*", default=["O1", "O2"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--write-docs", action="store_true", help="rewrite docs/benchmarks.md and docs/benchmarks.json")
    args = parser.parse_args(argv)
    info = machine_info()
    rows = bench(args.models, args.batches, args.pipelines, args.repeats)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    if args.write_docs:
        (DOCS / "benchmarks.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
        (DOCS / "benchmarks.md").write_text(markdown(rows, info, args.pipelines))
    print(markdown(rows, info, args.pipelines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
