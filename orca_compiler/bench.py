"""Benchmark zoo models under eager, torch.compile, onnxruntime and orca, and against the machine's limits.

    orca bench                                   # every model at batch 1 and 8, each in a fresh process
    orca bench --models mlp --batches 1 --repeats 5
    orca bench --write-docs                      # also rewrite docs/benchmarks.md and docs/benchmarks.json

All backends of one (model, batch) are timed in one process, interleaved round-robin after warm-up,
and reported as medians. Ratios are eager/backend (>1 = faster than eager) and best-peer/orca
(>1 = orca beats the fastest of eager and the peers). Compile times include the first call. The
GEMM peak and memory bandwidth are measured in the same run (orca_compiler.roofline); absolute
times are comparable only within one run. onnxruntime is optional (pip install onnxruntime onnxscript).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from . import eager_guard, roofline, zoo
from .api import compile as orca_compile
from .demo import max_abs_error
from .timing import time_interleaved

DOCS = Path(__file__).resolve().parent.parent / "docs"
PEERS = ("torch.compile", "onnxruntime")


def _onnxruntime_runner(model, inputs):
    import onnxruntime as ort

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, inputs, dynamo=True, verbose=False)
    program.save(buffer)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # Its threads otherwise busy-wait after each run on the cores the next backend needs (orca's
    # MLP at batch 8 ran 0.53 ms alone, 1.0-1.2 ms beside a spinning session).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return lambda: session.run(None, feeds)


def _torch_compile_runner(model, inputs):
    torch._dynamo.reset()
    compiled = torch.compile(model)
    return lambda: compiled(*inputs)


_PEER_BUILDERS = {"torch.compile": _torch_compile_runner, "onnxruntime": _onnxruntime_runner}


def build_runners(model, inputs, pipelines, peers=PEERS) -> tuple[dict, dict, dict]:
    """Runner callables per backend, compile seconds (first call included) per backend, and
    {"failures": peer -> error, "max_abs_err": orca pipeline -> error against eager}."""
    runners, compile_s, failures, errors = {"eager": lambda: model(*inputs)}, {}, {}, {}
    reference = model(*inputs)
    for peer in peers:
        t0 = time.perf_counter()
        try:
            runner = _PEER_BUILDERS[peer](model, inputs)
            runner()
        except Exception as exc:  # a peer failing is a result, not a crash of the benchmark
            failures[peer] = f"{type(exc).__name__}: {str(exc)[:120]}"
            continue
        compile_s[peer] = time.perf_counter() - t0
        runners[peer] = runner
    ran_eager = []  # orca pipelines whose compiled program the eager guard replaced by the model itself
    for pipeline in pipelines:
        name = f"orca {pipeline}"
        t0 = time.perf_counter()
        try:
            compiled = orca_compile(model, inputs, pipeline=pipeline)
            output = compiled(*inputs)
        except Exception as exc:  # reported in the tables; the other models still run
            failures[name] = f"{type(exc).__name__}: {str(exc)[:120]}"
            continue
        compile_s[name] = time.perf_counter() - t0
        errors[name] = max_abs_error(reference, output)
        runners[name] = (lambda c: lambda: c(*inputs))(compiled)
        if eager_guard.ran_eager(compiled):
            ran_eager.append(name)
    return runners, compile_s, {"failures": failures, "max_abs_err": errors, "ran_eager": ran_eager}


def bench_one(name: str, batch: int, pipelines, repeats: int, peers=PEERS, seq_len: int | None = None) -> dict:
    """Time one zoo model at one batch size (and sequence length) under every backend; a row of the results."""
    model, inputs = zoo.get(name, batch_size=batch, seq_len=seq_len)
    flops, nbytes = roofline.forward_flops(model, inputs), roofline.weight_bytes(model)
    with torch.no_grad():
        runners, compile_s, extra = build_runners(model, inputs, pipelines, peers)
        times = time_interleaved(runners, repeats=repeats, warmup=5, pause=0.01)
    eager = times["eager"]
    baselines = {k: v for k, v in times.items() if not k.startswith("orca")}
    best_peer = min(baselines, key=baselines.get)
    return {"model": name, "batch": batch, "seq": seq_len, "flops": flops, "weight_bytes": nbytes,
            "ms": {k: v * 1e3 for k, v in times.items()},
            "speedup_vs_eager": {k: eager / v for k, v in times.items()},
            "best_peer": best_peer,
            "orca_vs_best_peer": {k: baselines[best_peer] / v for k, v in times.items() if k.startswith("orca")},
            "compile_s": compile_s, **extra}


def _bench_isolated(name: str, batch: int, seq_len: int | None, args) -> dict:
    # A fresh interpreter per (model, batch): timings taken right after a tuning run in the same
    # process were 2-3x off (issue 3), and a crash of one model must not end the whole run.
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, "-m", "orca_compiler.bench", "--worker", "--models", name, "--batches", str(batch),
               "--repeats", str(args.repeats), "--pipelines", *args.pipelines, "--peers", *args.peers,
               "--json", str(out)] + (["--seq-lens", str(seq_len)] if seq_len else [])
        proc = subprocess.run(cmd)
        if proc.returncode != 0 or not out.exists():
            return {"model": name, "batch": batch, "seq": seq_len,
                    "error": f"worker process exited with status {proc.returncode}"}
        return json.loads(out.read_text())["rows"][0]


def add_efficiency(row: dict, limits: dict) -> dict:
    """Add achieved GFLOP/s and fraction of the GEMM peak per backend; at batch 1 also weight
    bytes / latency in GB/s and fraction of the memory bandwidth."""
    seconds = {k: v / 1e3 for k, v in row["ms"].items()}
    row["gflops"] = {k: row["flops"] / s / 1e9 for k, s in seconds.items()}
    row["frac_peak"] = {k: g / limits["gemm"]["gflops"] for k, g in row["gflops"].items()}
    if row["batch"] == 1:
        row["weight_gbs"] = {k: row["weight_bytes"] / s / 1e9 for k, s in seconds.items()}
        row["frac_bandwidth"] = {k: g / limits["bandwidth"]["gbs"] for k, g in row["weight_gbs"].items()}
    return row


def _geomean(values) -> float | None:
    values = list(values)
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def geomeans(rows: list[dict], pipelines) -> dict:
    """Geometric means over the (model, batch) rows: each backend's speedup over eager, and each
    orca pipeline's speedup over each peer and over the best peer (rows where both ran)."""
    rows = [r for r in rows if "ms" in r]
    backends = list(dict.fromkeys(k for r in rows for k in r["ms"]))
    orca = [f"orca {p}" for p in pipelines]
    result = {"runs": len(rows), "speedup_vs_eager": {}, "orca_vs": {}}
    for b in backends:
        result["speedup_vs_eager"][b] = _geomean(r["speedup_vs_eager"][b] for r in rows if b in r["ms"])
    for o in orca:
        versus = {p: _geomean(r["ms"][p] / r["ms"][o] for r in rows if o in r["ms"] and p in r["ms"])
                  for p in backends if p not in orca}
        versus["best peer"] = _geomean(r["orca_vs_best_peer"][o] for r in rows if o in r["ms"])
        result["orca_vs"][o] = versus
    return result


def machine_info() -> dict:
    """CPU model, core count, torch thread count and the versions of everything benchmarked."""
    import tvm

    from . import __version__

    info = {"cpu": platform.processor() or platform.machine(), "machine": platform.machine(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "tvm": tvm.__version__, "orca": __version__,
            "llvm_cpu": tvm.get_global_func("target.llvm_get_system_cpu")()}
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = "not installed"
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info["l3_bytes"] = _l3_bytes()
    return info


def _l3_bytes() -> int | None:
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "level").read_text().strip() == "3":
                size = (index / "size").read_text().strip()  # "32768K"
                return int(size.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1], 1)
        except (OSError, ValueError):
            pass
    return None


def _mib(nbytes: int | None) -> str:
    return "unknown" if nbytes is None else f"{nbytes / 2**20:.0f} MiB"


def _label(row: dict) -> str:
    """The model column: the zoo name, with the sequence length for sequence models."""
    return row["model"] + (f" T{row['seq']}" if row.get("seq") else "")


def _row_text(row: dict) -> str:
    if "error" in row:
        return f"{_label(row):<16} b{row['batch']:<3} {row['error']}"
    parts = [f"{_label(row):<16} b{row['batch']:<3}"]
    parts += [f"{k} {v:.3f}ms ({row['speedup_vs_eager'][k]:.2f}x){_ran_eager_mark(row, k)}" for k, v in row["ms"].items()]
    parts.append(f"best peer {row['best_peer']}")
    return " | ".join(parts)


def _ran_eager_mark(row: dict, backend: str) -> str:
    """" *" where the eager guard ran the model in eager PyTorch instead of the compiled program."""
    return " *" if backend in row.get("ran_eager", ()) else ""


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _cell(mapping: dict, key: str, fmt: str, suffix: str = "") -> str:
    value = mapping.get(key)
    return "-" if value is None else format(value, fmt) + suffix


def markdown(result: dict) -> str:
    """The results as docs/benchmarks.md: machine and limits, latency, geomeans, compile time, efficiency."""
    info, limits, config = result["machine"], result["limits"], result["config"]
    orca = [f"orca {p}" for p in config["pipelines"]]
    backends = ["eager", *config["peers"], *orca]
    rows = [r for r in result["rows"] if "ms" in r]
    gemm, bw = limits["gemm"], limits["bandwidth"]
    how = "each (model, batch) in a fresh process" if config["isolate"] else "all models in one process"
    lines = ["# Benchmark results", "",
             "Generated by `orca bench --write-docs` (same as `python tools/bench.py --write-docs`). Latency is",
             f"the median of {config['repeats']} interleaved rounds, {how}. Ratios are eager time / backend",
             "time (>1 is faster than eager); `vs best peer` = fastest of eager and the peers divided by orca",
             "(>1: orca wins). Compare numbers only within one run.", "",
             "Tuned kernels (`orca tune`, then the same comparison): [benchmarks-tuned.md](benchmarks-tuned.md),",
             "written by `python tools/bench_tuned.py --write-docs`.", "",
             "Weights streamed from disk under a memory budget (place-memory at 50% and 25%, against 100% and",
             "a naive policy): [placement.md](placement.md#benchmark), from `python tools/bench_placement.py`.",
             "Activations spilled to disk under an activation budget: "
             "[placement.md](placement.md#activations-on-the-slow-tier-activation_budget),",
             "from `python tools/bench_spill.py`.", "",
             "## Machine", ""]
    lines += _table(["", ""], [
        ["CPU", f"{info['cpu']} ({info['machine']}, LLVM cpu {info['llvm_cpu']}), {info['cores']} cores, "
                f"L3 {_mib(info.get('l3_bytes'))}"],
        ["torch threads", str(info["torch_threads"])],
        ["versions", f"torch {info['torch']}, tvm {info['tvm']}, onnxruntime {info['onnxruntime']}, "
                     f"orca {info['orca']}, python {info['python']}"],
        ["GEMM peak", f"{gemm['gflops']:.1f} GFLOP/s (fp32 torch.mm, n={gemm['n']}, best of {gemm['repeats']})"],
        ["memory bandwidth", f"{bw['gbs']:.1f} GB/s (copy of {bw['megabytes']} MB: {bw['copy_gbs']:.1f} GB/s "
                             f"read+write; sum: {bw['read_gbs']:.1f} GB/s read; best of {bw['repeats']})"],
    ])
    lines += ["", "## Latency: ms (speedup over eager)", ""]
    header = ["model", "batch", *backends, "best peer", *(f"{o} vs best peer" for o in orca), "orca max abs err"]
    lines += _table(header,
                    [[_label(r), str(r["batch"]),
                      *(f"{r['ms'][b]:.3f} ({r['speedup_vs_eager'][b]:.2f}x){_ran_eager_mark(r, b)}"
                        if b in r["ms"] else "failed" for b in backends),
                      r["best_peer"], *(_cell(r["orca_vs_best_peer"], o, ".2f", "x") for o in orca),
                      f"{max(r['max_abs_err'].values()):.1e}" if r["max_abs_err"] else "-"] for r in rows])
    lines += ["", f"`*`: compile()'s eager guard did not time the compiled program {eager_guard.MARGIN:.0%} faster than "
              "eager and runs the model", "in eager PyTorch instead (orca_compiler/eager_guard.py); such a cell times "
              "eager behind", "compile()'s input check, a few us of Python a call, within the run-to-run noise of a "
              "~0.2 ms model."]
    g = result["geomean"]
    lines += ["", f"## Geomean over {g['runs']} (model, batch) runs", ""]
    lines += _table(["backend", "speedup over eager"],
                    [[b, _cell(g["speedup_vs_eager"], b, ".2f", "x")] for b in backends if b in g["speedup_vs_eager"]])
    versus = [p for p in backends if p not in orca] + ["best peer"]
    lines += [""] + _table(["", *(f"vs {p}" for p in versus)],
                           [[o, *(_cell(g["orca_vs"][o], p, ".2f", "x") for p in versus)] for o in orca])
    compiled = [b for b in backends if b != "eager"]
    lines += ["", "## Compile time: s, first call included", ""]
    lines += _table(["model", "batch", *compiled],
                    [[_label(r), str(r["batch"]), *(_cell(r["compile_s"], b, ".1f") for b in compiled)] for r in rows])
    lines += ["", f"## Compute: GFLOP/s (% of the {gemm['gflops']:.0f} GFLOP/s GEMM peak)", "",
              "FLOPs of one forward as torch.utils.flop_counter counts them: matmul, conv and attention.", ""]
    lines += _table(["model", "batch", "MFLOP", *backends],
                    [[_label(r), str(r["batch"]), f"{r['flops'] / 1e6:.1f}",
                      *(f"{r['gflops'][b]:.2f} ({100 * r['frac_peak'][b]:.1f}%)" if b in r["ms"] else "-"
                        for b in backends)] for r in rows])
    batch1 = [r for r in rows if r["batch"] == 1]
    if batch1:
        lines += ["", f"## Weight streaming at batch 1: GB/s (% of the {bw['gbs']:.0f} GB/s bandwidth)", "",
                  "Parameter and buffer bytes / latency: a batch-1 forward reads every weight at least once.",
                  "Weights smaller than L3 stay cached between calls, so their rate can pass the DRAM bandwidth",
                  "(>100%); the DRAM bound is tight only for weights well beyond L3.", ""]
        lines += _table(["model", "weights MB", *backends],
                        [[_label(r), f"{r['weight_bytes'] / 1e6:.2f}",
                          *(f"{r['weight_gbs'][b]:.2f} ({100 * r['frac_bandwidth'][b]:.1f}%)" if b in r["ms"] else "-"
                            for b in backends)] for r in batch1])
    failures = [f"- {_label(r)} b{r['batch']}: {r['error']}" for r in result["rows"] if "error" in r]
    failures += [f"- {_label(r)} b{r['batch']} {k}: {v}" for r in rows for k, v in r["failures"].items()]
    if failures:
        lines += ["", "## Failures", ""] + failures
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's options, shared by `orca bench` and `python tools/bench.py`."""
    parser.add_argument("--models", nargs="*", default=zoo.names(), help="zoo names (default: all)")
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 8], help="batch sizes (default: 1 8)")
    parser.add_argument("--seq-lens", nargs="*", type=int, default=[16, 128],
                        help="sequence lengths of the sequence models (RNNs) (default: 16 128)")
    parser.add_argument("--pipelines", nargs="*", default=["O1", "O2"], help="orca pipelines (default: O1 O2)")
    parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=PEERS,
                        help="backends to compare besides eager (default: all)")
    parser.add_argument("--repeats", type=int, default=30, help="interleaved rounds per (model, batch) (default: 30)")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                        help="time each (model, batch) in a fresh process (default: on)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON here")
    parser.add_argument("--write-docs", nargs="?", const=str(DOCS), metavar="DIR",
                        help="write benchmarks.md and benchmarks.json into DIR (default: the repository's docs/)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one isolated (model, batch)
    return parser


def _seq_lens(name: str, args) -> list[int | None]:
    return list(args.seq_lens) if name in zoo.SEQUENCE_MODELS and args.seq_lens else [None]


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark the options describe; print rows as they finish and the Markdown at the end."""
    if args.worker:
        rows = [bench_one(m, b, args.pipelines, args.repeats, args.peers, t)
                for m in args.models for b in args.batches for t in _seq_lens(m, args)]
        for row in rows:
            print(_row_text(row), flush=True)
        Path(args.json).write_text(json.dumps({"rows": rows}))
        return {"rows": rows}
    info = machine_info()
    limits = roofline.machine_limits()
    print(f"GEMM peak {limits['gemm']['gflops']:.1f} GFLOP/s, memory bandwidth {limits['bandwidth']['gbs']:.1f} GB/s",
          flush=True)
    rows = []
    for name in args.models:
        for batch in args.batches:
            for seq_len in _seq_lens(name, args):
                if args.isolate:
                    row = _bench_isolated(name, batch, seq_len, args)
                else:
                    row = bench_one(name, batch, args.pipelines, args.repeats, args.peers, seq_len)
                    print(_row_text(row), flush=True)
                if "error" in row:
                    print(_row_text(row), flush=True)
                else:
                    add_efficiency(row, limits)
                rows.append(row)
    config = {k: getattr(args, k) for k in ("models", "batches", "seq_lens", "pipelines", "peers", "repeats", "isolate")}
    result = {"machine": info, "limits": limits, "config": config, "rows": rows,
              "geomean": geomeans(rows, args.pipelines)}
    text = markdown(result)
    for path in filter(None, [args.json, args.write_docs and Path(args.write_docs) / "benchmarks.json"]):
        Path(path).write_text(json.dumps(result, indent=1))
    if args.write_docs:
        (Path(args.write_docs) / "benchmarks.md").write_text(text)
    print(text)
    return result


def main(argv: list[str] | None = None) -> int:
    """`python -m orca_compiler.bench` / `python tools/bench.py`: the same as `orca bench`."""
    parser = add_arguments(argparse.ArgumentParser(prog="orca bench", description=__doc__.splitlines()[0]))
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
