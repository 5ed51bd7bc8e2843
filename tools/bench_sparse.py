"""Benchmark unstructured and N:M pruning: the sparse-pruned compiled MLP vs the dense compiled one.

    python tools/bench_sparse.py                            # mlp, batch 1 and 8, 50% / 90% / 2:4
    python tools/bench_sparse.py --batches 8 --repeats 50 --threads 1 --json sparse.json

For each batch, the unpruned model compiled with O2, each pruned variant (`prune-magnitude` or
`prune-nm`, then O2; kernels measured) and eager PyTorch of the unpruned model are timed in one
process, interleaved round-robin (orca_compiler.timing), and reported as medians; a second compile
of the dense model (the control row) shows how far two identical programs differ. Below each table,
the kernel that won for every pruned layer: for a layer stored sparse (orca.sparse_linear), the
fastest sparse (CSR) and dense candidate as the kernel selection measured them; for a layer kept
dense (its CSR form would not be smaller), the CSR kernel timed against the dense one here, to
show what storing it sparse would have cost. Kernels are measured afresh (a temporary selection
cache, unless --keep-cache). Absolute times are comparable only within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
import torch.nn.functional as F

import orca_compiler as oc
from orca_compiler import zoo
from orca_compiler.ops import sparse as sparse_ops
from orca_compiler.passes.prune_sparse import collect_layers
from orca_compiler.timing import time_interleaved

CONTROL = "dense orca O2 (control)"
VARIANTS = {
    "unstructured 50%": "prune-magnitude{sparsity=0.5}",
    "unstructured 90%": "prune-magnitude{sparsity=0.9}",
    "2:4": "prune-nm{n=2,m=4}",
}


def _prune_stats(compiled) -> dict:
    return next((r.stats for r in compiled.report.passes if r.name.startswith("prune-")), {})


def _layer_kernels(compiled, inputs_of: dict, repeats: int) -> list[dict]:
    """Per pruned layer: its storage, the kernel that runs it, and sparse vs dense times (us)."""
    rows, choices = [], {k.node: k for k in compiled.report.kernels}
    for layer in collect_layers(compiled.ir)[0]:
        node, choice = layer.node, choices.get(layer.node.name)
        zeros = float((layer.weight == 0).float().mean())
        row = {"layer": node.name, "shape": list(layer.weight.shape), "zeros": zeros,
               "stored": "csr" if layer.stored_sparse else "dense",
               "kernel": choice.choice_text if choice else "tvm (fused)", "how": choice.how if choice else ""}
        if choice is not None and layer.stored_sparse:
            times = choice.times_us
            sparse = {k: v for k, v in times.items() if k == "torch"}
            dense = {k: v for k, v in times.items() if k != "torch"}
            row["sparse_us"] = min(sparse.values()) if sparse else None
            row["dense_us"] = min(dense.values()) if dense else None
            row["note"] = "; ".join(f"{k}: {v}" for k, v in choice.rejected.items())
        elif layer.weight.dim() == 2 and node.name in inputs_of:
            # What the CSR kernel would cost on this layer (kept dense: CSR would not be smaller).
            x, weight = inputs_of[node.name], layer.weight
            matrix = sparse_ops.csr_matrix(*sparse_ops.to_csr(weight), *weight.shape)
            times = time_interleaved({"sparse": lambda: sparse_ops.csr_linear(x, matrix, None),
                                      "dense": lambda: F.linear(x, weight)}, repeats=repeats)
            row["sparse_us"], row["dense_us"] = times["sparse"] * 1e6, times["dense"] * 1e6
            row["note"] = "CSR not stored (not smaller); timed here"
        rows.append(row)
    return rows


def _layer_inputs(compiled, inputs) -> dict:
    """Layer name -> the activation its weight multiplies (by running the pruned IR in eager)."""
    captured = {}
    layers = {l.node.name for l in collect_layers(compiled.ir)[0]}
    interpreter = torch.fx.Interpreter(compiled.ir.gm)
    original = interpreter.run_node

    def run_node(node):
        result = original(node)
        if node.name in layers:
            captured[node.name] = interpreter.env[node.args[0]]
        return result

    interpreter.run_node = run_node
    with torch.no_grad():
        interpreter.run(*inputs)
    return captured


def bench(batch: int, repeats: int) -> tuple[list[dict], list[dict]]:
    """Rows of (variant, median ms, ratios, weight bytes) and of per-layer kernels for one batch."""
    model, inputs = zoo.get("mlp", batch_size=batch)
    compiled = {"dense orca O2": oc.compile(model, inputs, pipeline="O2")}
    for label, pipeline in VARIANTS.items():
        if label == "2:4":  # a second, identical dense program: the noise between equal programs
            compiled[CONTROL] = oc.compile(model, inputs, pipeline="O2")
        compiled[label] = oc.compile(model, inputs, pipeline=f"{pipeline},O2")
    fns = {label: (lambda c=c: c(*inputs)) for label, c in compiled.items()}
    fns["eager"] = lambda: model(*inputs)
    times = time_interleaved(fns, repeats=repeats)
    base, eager = times["dense orca O2"], times["eager"]
    rows, layers = [], []
    for label in ["eager", *compiled]:
        stats = _prune_stats(compiled[label]) if label in VARIANTS else {}
        rows.append({"batch": batch, "variant": label, "ms": times[label] * 1e3, "vs_dense": base / times[label],
                     "vs_eager": eager / times[label], "bytes_dense": stats.get("bytes_dense"),
                     "bytes_stored": stats.get("bytes_stored"), "sparsity": stats.get("sparsity")})
    for label in VARIANTS:
        c = compiled[label]
        for row in _layer_kernels(c, _layer_inputs(c, inputs), repeats):
            layers.append({"batch": batch, "variant": label, **row})
    return rows, layers


def _us(value) -> str:
    return f"{value:.1f}" if value is not None else "-"


def markdown(rows: list[dict], layers: list[dict]) -> str:
    """The timing table and the per-layer kernel table."""
    lines = ["| batch | variant | ms | dense orca / variant | eager / variant | weights stored / dense KB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        kb = f"{r['bytes_stored'] / 1024:.0f} / {r['bytes_dense'] / 1024:.0f}" if r["bytes_dense"] else ""
        lines.append(f"| {r['batch']} | {r['variant']} | {r['ms']:.3f} | {r['vs_dense']:.2f}x "
                     f"| {r['vs_eager']:.2f}x | {kb} |")
    lines += ["", "| batch | variant | layer | weight | zeros | stored | kernel (how) | sparse us | dense us | note |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for l in layers:
        lines.append(f"| {l['batch']} | {l['variant']} | {l['layer']} | {'x'.join(map(str, l['shape']))} "
                     f"| {l['zeros']:.0%} | {l['stored']} | {l['kernel']} ({l['how']}) | {_us(l.get('sparse_us'))} "
                     f"| {_us(l.get('dense_us'))} | {l.get('note', '')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, help="torch (and so TVM) threads; default: torch's")
    parser.add_argument("--keep-cache", action="store_true", help="use the kernel selections cached on disk")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.keep_cache:
        os.environ["ORCA_CACHE_DIR"] = tempfile.mkdtemp(prefix="orca-bench-sparse-")
    rows, layers = [], []
    print(f"torch threads: {torch.get_num_threads()}", flush=True)
    for batch in args.batches:
        batch_rows, batch_layers = bench(batch, args.repeats)
        rows += batch_rows
        layers += batch_layers
        print(markdown(batch_rows, batch_layers), "\n", flush=True)
    if len(args.batches) > 1:
        print(markdown(rows, layers))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "layers": layers}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
