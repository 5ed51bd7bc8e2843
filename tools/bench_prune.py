"""Benchmark structured pruning and low-rank factoring: pruned compiled model vs unpruned compiled.

    python tools/bench_prune.py                       # resnet b1/b8 at 30/50/70%, mlp low-rank
    python tools/bench_prune.py --models resnet --batches 8 --ratios 0.5 --repeats 20

For each (model, batch) every variant is compiled (O2) and then timed in one process, interleaved
round-robin (orca_compiler.timing), and reported as medians with the ratio unpruned/variant
(> 1: the variant is faster) and the weight bytes. Eager PyTorch of the unpruned model is timed
alongside. Absolute times are comparable only within one run.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

import orca_compiler as oc
from orca_compiler import zoo
from orca_compiler.timing import time_interleaved


def _weight_bytes(module: torch.nn.Module) -> int:
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def decayed_spectrum(model: torch.nn.Module, alpha: float = 0.75) -> torch.nn.Module:
    """Give every linear weight singular values falling as (i+1)^-alpha (norm kept), like trained
    layers have; random init has a flat spectrum that no rank cut can shorten."""
    gen = torch.Generator().manual_seed(0)
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            out_f, in_f = layer.weight.shape
            k = min(out_f, in_f)
            u, _ = torch.linalg.qr(torch.randn(out_f, k, generator=gen))
            v, _ = torch.linalg.qr(torch.randn(in_f, k, generator=gen))
            s = (torch.arange(k) + 1.0) ** -alpha
            w = u @ torch.diag(s) @ v.T
            with torch.no_grad():
                layer.weight.copy_(w * layer.weight.norm() / w.norm())
    return model


def _zoo(name: str, batch: int):
    if name == "mlp_decayed":
        model, inputs = zoo.get("mlp", batch_size=batch)
        return decayed_spectrum(model), inputs
    return zoo.get(name, batch_size=batch)


def variants(name: str, ratios: list[float], energies: list[float]) -> dict[str, str]:
    """Variant label -> pipeline that transforms the model (before O2 compiles it)."""
    out = {f"prune {r:.0%}": f"prune-channels{{ratio={r}}}" for r in ratios}
    out.update({f"low-rank e={e}": f"low-rank{{energy={e}}}" for e in energies})
    return out


def bench(name: str, batch: int, ratios, energies, repeats: int) -> list[dict]:
    """Time the unpruned compiled model, eager, and each variant; one row per variant."""
    model, inputs = _zoo(name, batch)
    compiled = {"orca O2": oc.compile(model, inputs, pipeline="O2")}
    sizes = {"orca O2": _weight_bytes(model)}
    stats = {}
    for label, pipeline in variants(name, ratios, energies).items():
        transformed, report = oc.prune(model, inputs, pipeline)
        compiled[label] = oc.compile(transformed, inputs, pipeline="O2")
        sizes[label] = report.weight_bytes[1]
        stats[label] = {k: v for r in report.passes for k, v in r.stats.items()}
    fns = {label: (lambda c=c: c(*inputs)) for label, c in compiled.items()}
    with torch.no_grad():
        fns["eager"] = lambda: model(*inputs)
        times = time_interleaved(fns, repeats=repeats)
    base = times["orca O2"]
    return [{"model": name, "batch": batch, "variant": label, "ms": times[label] * 1e3,
             "vs_unpruned": base / times[label], "vs_eager": times["eager"] / times[label],
             "weight_bytes": sizes.get(label), "stats": stats.get(label, {})}
            for label in ["eager", "orca O2", *variants(name, ratios, energies)]]


def markdown(rows: list[dict]) -> str:
    lines = ["| model | batch | variant | ms | vs unpruned orca | vs eager | weights KB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        kb = f"{r['weight_bytes'] / 1024:.0f}" if r["weight_bytes"] else ""
        lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['ms']:.3f} | {r['vs_unpruned']:.2f}x "
                     f"| {r['vs_eager']:.2f}x | {kb} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet", "mlp", "mlp_decayed"],
                        help="zoo names, or mlp_decayed: the zoo MLP with power-law singular values")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--energies", nargs="+", type=float, default=[0.9])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = []
    for name in args.models:
        for batch in args.batches:
            energies = args.energies if name.startswith("mlp") else []
            ratios = [] if name == "mlp_decayed" else args.ratios if name != "mlp" else [0.5]
            rows += bench(name, batch, ratios, energies, args.repeats)
            print(markdown([r for r in rows if r["model"] == name and r["batch"] == batch]), flush=True)
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
