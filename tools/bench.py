"""Benchmark the zoo: `python tools/bench.py ARGS` is `orca bench ARGS` (the code is orca_compiler/bench.py).

    python tools/bench.py --models mlp --batches 1 --repeats 5
    python tools/bench.py --write-docs         # rewrite docs/benchmarks.md and docs/benchmarks.json
"""
from orca_compiler.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
