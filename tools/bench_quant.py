"""Quantized models against float32: latency side by side, output error, and weight bytes.

    python tools/bench_quant.py                      # mlp and transformer at batch 1
    python tools/bench_quant.py --models mlp --batch 8 --repeats 50
    python tools/bench_quant.py --gemm               # one int8 linear: VNNI vs plain vs float32
    python tools/bench_quant.py --convs --threads 1  # static int8 convs: direct VNNI conv vs before

`--gemm` times a single 1024x1024 linear layer at batch 1 and 8: torch float32, orca float32,
and orca dynamic/static int8 on the dot-product kernel (VNNI where the CPU has it) and on the
plain kernel (int8_dot_kernels.disabled()), interleaved in one process.

`--convs` times static int8 convs at batch 1, each layer alone and the zoo resnet and mobilenet
whole: eager float32, and orca static int8 with the non-pointwise convs on the direct VNNI conv
("vnni conv") and on Relax's int8 conv as before it ("before": int8_dot_kernels.conv_disabled();
linears and 1x1 convs on VNNI in both), both with kernels="tvm" so that the conv path is what
differs; the whole models also as the kernel selection builds them ("measured"). One interleaved run.

For each model: eager float32, torch.compile, onnxruntime (float32), PyTorch's own dynamic int8
(`torch.ao.quantization.quantize_dynamic`, eager), and orca at O2 in float32 and with each
quantize mode. All timed interleaved in one process (orca_compiler.timing.time_interleaved), median
of the repeats; ratios are against eager float32 from the same run. Error is the relative L2 error
of the outputs against eager float32. The eager guard is off, so the compiled programs themselves
are timed. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time

os.environ.setdefault("ORCA_EAGER_GUARD", "off")

import torch  # noqa: E402

import orca_compiler as oc  # noqa: E402
from orca_compiler import zoo  # noqa: E402
from orca_compiler.bench import _onnxruntime_runner, _torch_compile_runner  # noqa: E402
from orca_compiler.timing import time_interleaved  # noqa: E402

VARIANTS = {
    "orca fp32": "O2",
    "orca int8 weight-only": "O2,quantize{mode=weight-only,dtype=int8}",
    "orca int4 weight-only (group 128)": "O2,quantize{mode=weight-only,dtype=int4,granularity=per-group,group=128}",
    "orca int8 dynamic": "O2,quantize{mode=dynamic}",
}


def _first(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def _error(out, reference) -> float:
    out, reference = _first(out).float(), _first(reference).float()
    return float((out - reference).norm() / reference.norm().clamp_min(1e-30))


def _weight_bytes(compiled) -> int:
    passes = compiled.report.passes
    return passes[-1].weight_bytes_after if passes else 0


def bench_model(name: str, batch: int, repeats: int, variants: dict) -> list[dict]:
    model, inputs = zoo.get(name, batch_size=batch)
    with torch.no_grad():
        reference = model(*inputs)
    float_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    rows = {"eager fp32": {"bytes": float_bytes, "error": 0.0}}
    runners = {"eager fp32": lambda: model(*inputs)}
    peers = {"torch.compile": _torch_compile_runner, "onnxruntime fp32": _onnxruntime_runner}
    for label, build in peers.items():
        try:
            runner = build(model, inputs)
            runners[label] = runner
            rows[label] = {"bytes": float_bytes, "error": _error(torch.as_tensor(_first(runner())) if label.startswith("onnx")
                                                                else runner(), reference)}
        except Exception as exc:  # a missing or failing peer is a row, not a crash
            rows[label] = {"failed": f"{type(exc).__name__}: {str(exc)[:80]}"}
    label = "torch dynamic int8 (eager)"
    try:
        torch_q = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        with torch.no_grad():
            rows[label] = {"bytes": None, "error": _error(torch_q(*inputs), reference)}
        runners[label] = lambda: torch_q(*inputs)
    except Exception as exc:  # nn.TransformerEncoderLayer's fast path rejects its packed weights
        rows[label] = {"failed": f"{type(exc).__name__}: {str(exc)[:80]}"}
    for label, pipeline in variants.items():
        t0 = time.perf_counter()
        compiled = oc.compile(model, inputs, pipeline=pipeline)
        rows[label] = {"bytes": _weight_bytes(compiled), "error": _error(compiled(*inputs), reference),
                       "compile_s": time.perf_counter() - t0,
                       "kernels": sorted({k.layout for k in compiled.report.kernels if k.layout})}
        runners[label] = (lambda c: lambda: c(*inputs))(compiled)
    times = time_interleaved(runners, repeats=repeats, warmup=3)
    for label, seconds in times.items():
        rows[label]["ms"] = seconds * 1e3
        rows[label]["vs_eager"] = times["eager fp32"] / seconds
    return [{"model": name, "batch": batch, "backend": label, **row} for label, row in rows.items()]


def bench_gemm(batches: list[int], repeats: int, features: int = 1024) -> list[dict]:
    """One `features` x `features` linear layer at each batch: latency of torch float32, orca
    float32, and orca int8 (dynamic and static) with and without the dot-product kernels."""
    from orca_compiler.lowering import int8_dot_kernels

    torch.manual_seed(0)
    layer = torch.nn.Linear(features, features).eval()
    runners, rows = {}, {}
    for batch in batches:
        x = torch.randn(batch, features)
        calibration = [(torch.randn(64, features),)]
        runners[f"{batch} torch fp32"] = (lambda x: lambda: layer(x))(x)
        variants = {"orca fp32 (TVM kernel)": ("O1", False), "orca int8 dynamic, plain": ("O1,quantize{mode=dynamic}", True),
                    "orca int8 dynamic, dot": ("O1,quantize{mode=dynamic}", False),
                    "orca int8 static, plain": ("O1,quantize{mode=static}", True),
                    "orca int8 static, dot": ("O1,quantize{mode=static}", False)}
        for label, (pipeline, plain) in variants.items():
            with int8_dot_kernels.disabled() if plain else contextlib.nullcontext():
                compiled = oc.compile(layer, (x,), pipeline=pipeline, kernels="tvm", cache="off",
                                      calibration_data=calibration)
            with torch.no_grad():
                rows[f"{batch} {label}"] = {"error": _error(compiled(x), layer(x))}
            runners[f"{batch} {label}"] = (lambda c, x: lambda: c(x))(compiled, x)
        rows[f"{batch} torch fp32"] = {"error": 0.0}
    times = time_interleaved(runners, repeats=repeats, warmup=3)
    out = []
    for key, seconds in times.items():
        batch, label = key.split(" ", 1)
        base = times[f"{batch} torch fp32"]
        out.append({"model": f"linear {features}x{features}", "batch": int(batch), "backend": label, "bytes": None,
                    "ms": seconds * 1e3, "vs_eager": base / seconds, **rows[key]})
    return out


# (name, C, O, kernel, stride, padding, H=W): the zoo resnet's convs, and ResNet-18's stem and a
# layer1 conv at 224x224 input.
CONV_LAYERS = [("zoo resnet stem 3x3 3->16 @32", 3, 16, 3, 1, 1, 32), ("3x3 16->16 @32", 16, 16, 3, 1, 1, 32),
               ("3x3/2 16->32 @32", 16, 32, 3, 2, 1, 32), ("1x1/2 16->32 @32 (downsample)", 16, 32, 1, 2, 0, 32),
               ("3x3 32->32 @16", 32, 32, 3, 1, 1, 16), ("3x3 64->64 @8", 64, 64, 3, 1, 1, 8),
               ("resnet18 stem 7x7/2 3->64 @224", 3, 64, 7, 2, 3, 224), ("resnet18 3x3 64->64 @56", 64, 64, 3, 1, 1, 56)]


def bench_convs(repeats: int, models=("resnet", "mobilenet")) -> list[dict]:
    """Static int8 convs: each CONV_LAYERS layer alone, then whole zoo models, at batch 1."""
    from orca_compiler.lowering import int8_dot_kernels

    def build(model, inputs, calibration, before: bool, kernels="tvm"):
        with int8_dot_kernels.conv_disabled() if before else contextlib.nullcontext():
            return oc.compile(model, inputs, pipeline="O2,quantize{mode=static}", kernels=kernels, cache="off",
                              calibration_data=calibration)

    cases = []
    for name, c, o, k, stride, padding, size in CONV_LAYERS:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(c, o, k, stride, padding), torch.nn.ReLU()).eval()
        cases.append((name, model, (torch.randn(1, c, size, size),), [(torch.randn(4, c, size, size),)], False))
    for name in models:
        model, inputs = zoo.get(name)
        cases.append((f"zoo {name}", model, inputs, [zoo.get(name, seed=s)[1] for s in (1, 2)], True))
    runners, rows = {}, {}
    for name, model, inputs, calibration, whole in cases:
        with torch.no_grad():
            reference = model(*inputs)
        runners[f"{name}|eager fp32"] = (lambda m, x: lambda: m(*x))(model, inputs)
        rows[f"{name}|eager fp32"] = {"error": 0.0}
        variants = {"int8 before": (True, "tvm"), "int8 vnni conv": (False, "tvm")}
        if whole:
            variants["int8 measured"] = (False, "measure")
        outputs = {}
        for label, (before, kernels) in variants.items():
            compiled = build(model, inputs, calibration, before, kernels)
            outputs[label] = _first(compiled(*inputs))
            rows[f"{name}|{label}"] = {"error": _error(outputs[label], reference),
                                       "kernels": sorted({k.choice for k in compiled.report.kernels
                                                          if k.op == "orca.conv2d_q"})}
            runners[f"{name}|{label}"] = (lambda m, x: lambda: m(*x))(compiled, inputs)
        assert torch.equal(outputs["int8 before"], outputs["int8 vnni conv"]), f"{name}: the conv paths differ"
    times = time_interleaved(runners, repeats=repeats, warmup=3, block=3)
    out = []
    for key, seconds in times.items():
        name, label = key.split("|")
        out.append({"model": name, "batch": 1, "backend": label, "bytes": None, "ms": seconds * 1e3,
                    "vs_eager": times[f"{name}|eager fp32"] / seconds, **rows[key]})
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| model | batch | backend | ms (median) | vs eager fp32 | rel. error | weight bytes | kernels |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['backend']} | failed: {r['failed']} | | | | |")
            continue
        size = f"{r['bytes']:,}" if r.get("bytes") else "-"
        lines.append(f"| {r['model']} | {r['batch']} | {r['backend']} | {r['ms']:.3f} | {r['vs_eager']:.2f}x | "
                     f"{r['error']:.2e} | {size} | {', '.join(r.get('kernels', [])) or '-'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "transformer"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--gemm", action="store_true", help="one 1024x1024 int8 linear at batch 1 and 8 instead")
    parser.add_argument("--convs", action="store_true", help="static int8 convs (layers, zoo resnet/mobilenet) instead")
    parser.add_argument("--threads", type=int, default=None, help="torch and TVM threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
    if args.convs:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; 'vs eager' = vs eager fp32")
        print(markdown(bench_convs(args.repeats)))
        return
    if args.gemm:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; 'vs eager' = vs torch fp32")
        print(markdown(bench_gemm([1, 8], args.repeats)))
        return
    rows = []
    for name in args.models:
        rows += bench_model(name, args.batch, args.repeats, VARIANTS)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(markdown(rows))


if __name__ == "__main__":
    main()
