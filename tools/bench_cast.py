"""Benchmark mixed precision: eager float32 vs orca float32 vs orca with cast{dtype=fp16|bf16}.

    python tools/bench_cast.py                                  # mlp, transformer, resnet at batch 1
    python tools/bench_cast.py --models mlp --batch 8 --repeats 50 --json cast.json
    python tools/bench_cast.py --models minilm                  # all-MiniLM-L6-v2 (`pretrained` extra)

Per model: eager PyTorch (float32), orca O2 (float32) and orca with `cast` before fusion
(`fold-constants,fold-bn,cast{dtype=...},fuse,cse,dce`), timed in one process, interleaved
round-robin (orca_compiler.timing), medians. Also each variant's weight bytes, its error against
eager float32 (max |diff| / max |eager|; for minilm the lowest cosine similarity of the
embeddings) and the kernels the selection chose. Absolute times are comparable only within one run.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

import orca_compiler as oc
from orca_compiler import zoo
from orca_compiler.timing import time_interleaved

DTYPES = ("fp16", "bf16")


def _model(name: str, batch: int):
    if name == "minilm":
        from orca_compiler import pretrained

        net = pretrained.minilm()
        ids, mask = net.inputs
        return net.model, (ids[:batch], mask[:batch])
    return zoo.get(name, batch_size=batch)


def _error(name: str, out: torch.Tensor, ref: torch.Tensor) -> float:
    if name == "minilm":
        return float(torch.nn.functional.cosine_similarity(out, ref).min())
    return float((out - ref).abs().max() / ref.abs().max())


def bench(name: str, batch: int, repeats: int, kernels: str) -> list[dict]:
    model, inputs = _model(name, batch)
    with torch.no_grad():
        ref = model(*inputs)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = [{"model": name, "variant": "eager fp32", "weight_bytes": model_bytes, "error": 0.0 if name != "minilm" else 1.0,
             "kernels": "torch"}]
    runners = {"eager fp32": lambda: model(*inputs)}
    pipelines = {"orca fp32": "O2", **{f"orca {d}": f"fold-constants,fold-bn,cast{{dtype={d}}},fuse,cse,dce" for d in DTYPES}}
    for variant, pipeline in pipelines.items():
        compiled = oc.compile(model, inputs, pipeline=pipeline, kernels=kernels, eager_guard=False)
        with torch.no_grad():
            out = compiled(*inputs)
        kinds = sorted({k.choice for k in compiled.report.kernels}) or ["tvm"]
        rows.append({"model": name, "variant": variant, "weight_bytes": compiled.ir.weight_bytes(),
                     "error": _error(name, out, ref), "kernels": ",".join(kinds),
                     "fallbacks": len(compiled.report.fallbacks)})
        runners[variant] = (lambda c: lambda: c(*inputs))(compiled)
    times = time_interleaved(runners, repeats=repeats)
    for row in rows:
        row["ms"] = times[row["variant"]] * 1e3
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,transformer,resnet")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--kernels", default="measure", help='kernel choice for compile(): "measure" or "tvm", ...')
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'model':12} {'variant':12} {'ms':>9} {'weights MB':>11} {'error':>10}  kernels")
    for name in args.models.split(","):
        for row in bench(name, args.batch, args.repeats, args.kernels):
            rows.append(row)
            error = f"{row['error']:10.6f}" if name == "minilm" else f"{row['error']:10.2e}"
            fallbacks = f" ({row['fallbacks']} fallbacks)" if row.get("fallbacks") else ""
            print(f"{row['model']:12} {row['variant']:12} {row['ms']:9.3f} {row['weight_bytes'] / 1e6:11.3f} "
                  f"{error}  {row['kernels']}{fallbacks}")
    print("error: max |orca - eager| / max |eager| (minilm: lowest cosine similarity of the embeddings)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
