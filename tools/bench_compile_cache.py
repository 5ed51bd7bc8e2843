"""Time the compile cache on a zoo model: cold, warm L3 (a fresh process) and warm L2 (the same one).

    python tools/bench_compile_cache.py                       # zoo resnet, 5 repeats
    python tools/bench_compile_cache.py --model mlp --repeats 3 --json out.json

Every measurement is a fresh `python` process on a cache folder of its own (never the user's):

- cold: an empty folder; `compile()` captures, runs the passes, measures kernels, builds and
  writes the L3 entry (the kernel selection cache is empty too);
- warm L3: a new process on the folder the cold run filled; `compile()` is served from disk;
- warm L2: in that process, a second `compile()` of the same model (served from memory).

For each it reports the `compile()` call alone and the process's wall time (interpreter start,
`import orca_compiler`, which imports torch, and building the model included), best and median,
and whether the warm process imported the `tvm` package (it should not: see orca_compiler/tvm_lite.py).
Goals for the zoo resnet (issue 9): warm L3 <= 1 s, warm L2 <= 50 ms.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

WORKER = """
import json, sys, time
start = time.perf_counter()
import orca_compiler as oc
imported = time.perf_counter()
model, inputs = oc.zoo.get(sys.argv[1])
t0 = time.perf_counter()
compiled = oc.compile(model, inputs)
t1 = time.perf_counter()
again = oc.compile(model, inputs)
t2 = time.perf_counter()
print(json.dumps({"served": compiled.report.cache.served, "again": again.report.cache.served,
                  "compile_s": t1 - t0, "l2_s": t2 - t1, "import_s": imported - start,
                  "tvm_imported": "tvm" in sys.modules}))
"""


def _run(model: str, cache: Path) -> dict:
    env = {**os.environ, "ORCA_CACHE_DIR": str(cache), "ORCA_COMPILE_CACHE": "on",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("ORCA_COMPILE_CACHE_DIR", None)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WORKER, model], env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"worker failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = wall
    return result


def _stats(values: list[float]) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet", help="zoo name (default: resnet)")
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per measurement (default: 5)")
    parser.add_argument("--json", metavar="FILE", help="write the raw results here")
    args = parser.parse_args(argv)
    cold, warm = [], []
    with tempfile.TemporaryDirectory(prefix="orca-cache-bench-") as tmp:
        for i in range(args.repeats):
            folder = Path(tmp) / f"cold-{i}"
            cold.append(_run(args.model, folder))
            assert cold[-1]["served"] == "compile", cold[-1]
        for _ in range(args.repeats):  # on the newest entry: an edit of orca's sources is a new key
            result = _run(args.model, Path(tmp) / f"cold-{args.repeats - 1}")
            if result["served"] != "L3":  # (orca's sources changed since: the key is new)
                print(f"warning: a warm run was served by {result['served']}; not counted", file=sys.stderr)
                continue
            warm.append(result)
    if not warm:
        raise SystemExit("no warm run was served by L3")
    rows = [
        ("cold (empty cache)", [r["compile_s"] for r in cold], [r["process_s"] for r in cold]),
        ("warm L3 (fresh process)", [r["compile_s"] for r in warm], [r["process_s"] for r in warm]),
        ("warm L2 (second compile in a process)", [r["l2_s"] for r in warm], None),
    ]
    print(f"zoo {args.model}, {len(cold)} cold and {len(warm)} warm fresh processes; seconds, best / median")
    print("| compile | compile() | whole process |")
    print("|---|---|---|")
    for name, compile_s, process_s in rows:
        print(f"| {name} | {_stats(compile_s)} | {_stats(process_s) if process_s else '-'} |")
    imports = [r["import_s"] for r in warm]
    print(f"`import orca_compiler` in the warm processes: {_stats(imports)} s; "
          f"tvm imported by a warm L3 compile: {sorted({r['tvm_imported'] for r in warm})}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "cold": cold, "warm": warm}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
