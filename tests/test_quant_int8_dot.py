"""The int8 kernels on the hardware dot-product instructions (lowering/int8_dot_kernels.py).

- AVX-512 VNNI (vpdpbusd): the int32 accumulators equal torch's integer matmul exactly, for
  every shape class (row tiles and their remainder, column tails, any batch), and the direct
  VNNI conv's equal torch's integer conv (padded, strided, dilated, 7x7 stems, C*kh*kw not a
  multiple of 4, batch > 1); compiled quantized models (linears, convs of every kind, the zoo
  resnet) equal the eager reference of the quantized ops and, bit for bit, the same model built
  for znver3 (no VNNI), whose code is the plain kernels'; the kernel selection measures the VNNI
  conv against Relax's int8 conv. The code is generated on any machine; running it needs a host
  with avx512_vnni (skipped elsewhere).
- CUDA __dp4a: the generated CUDA source calls it, and nvcc compiles it when on PATH.
- CUDA int8 tensor cores (sm_80+, layers of >= 16 rows and K % 16 == 0): the generated source
  calls wmma::mma_sync in those layers' kernels and __dp4a in the others, and nvcc compiles it
  for sm_80 and sm_90a when on PATH. No GPU runs it: the numbers checked on CPU are those of the
  TE definition the tensor-core schedule is derived from (padding rows and columns included).
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import orca_compiler as oc
from orca_compiler.lowering import int8_dot_kernels as dot
from orca_compiler.ops import quant

from conftest import relative_error

ZNVER4 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4", "num-cores": 2}
ZNVER3 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver3", "num-cores": 2}


def _host_has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_vnni" in f.read()
    except OSError:
        return False


HOST_VNNI = _host_has_vnni()
needs_vnni_host = pytest.mark.skipif(not HOST_VNNI, reason="host CPU lacks avx512_vnni: code generated, not run")


pytestmark = pytest.mark.usefixtures("one_thread")


def _target(spec: dict):
    import tvm

    return tvm.target.Target(spec)


def _llvm_asm(executable) -> str:
    """The x86 assembly of every LLVM module of a compiled executable (VM executable or module)."""
    stack, text = [getattr(executable, "mod", executable)], []
    while stack:
        module = stack.pop()
        if module.kind == "llvm":
            text.append(module.inspect_source("asm"))
        stack.extend(module.imports)
    return "\n".join(text)




# -- which kernel a target gets -------------------------------------------------------------------

def test_dot_path_follows_the_target_features():
    assert dot.dot_path(_target(ZNVER4), 64, 64) == dot.VNNI
    assert dot.dot_path(_target({**ZNVER4, "mcpu": "cascadelake"}), 64, 10) == dot.VNNI
    assert dot.dot_path(_target(ZNVER3), 64, 64) is None  # AVX2 only: the plain kernel
    assert dot.dot_path(_target({"kind": "llvm"}), 64, 64) is None  # no mcpu: nothing assumed
    assert dot.dot_path(_target(ZNVER4), 66, 64) is None  # K not whole 4-byte words
    assert dot.dot_path(_target({"kind": "cuda", "arch": "sm_80"}), 64, 64) == dot.DP4A  # rows unknown
    # CUDA tensor cores: sm_80 and later, from 16 rows, K whole 16-wide wmma steps
    for arch in ("sm_80", "sm_86", "sm_89", "sm_90", "sm_90a"):
        assert dot.dot_path(_target({"kind": "cuda", "arch": arch}), 64, 10, rows=16) == dot.MMA
    assert dot.dot_path(_target({"kind": "cuda", "arch": "sm_80"}), 64, 64, rows=15) == dot.DP4A
    assert dot.dot_path(_target({"kind": "cuda", "arch": "sm_80"}), 36, 64, rows=64) == dot.DP4A  # K % 16
    assert dot.dot_path(_target({"kind": "cuda", "arch": "sm_75"}), 64, 64, rows=64) == dot.DP4A
    assert dot.dot_path(_target(ZNVER4), 64, 64, rows=64) == dot.VNNI
    assert dot.dot_path(None, 64, 64) is None
    # non-pointwise convs: VNNI CPUs only (CUDA keeps Relax's conv for them)
    assert dot.conv_path(_target(ZNVER4)) == dot.VNNI
    assert dot.conv_path(_target(ZNVER3)) is None and dot.conv_path(_target({"kind": "cuda", "arch": "sm_80"})) is None
    with dot.conv_disabled():
        assert dot.conv_path(_target(ZNVER4)) is None and dot.dot_path(_target(ZNVER4), 64, 64) == dot.VNNI


def test_weight_packing_layouts():
    weight = torch.randint(-128, 128, (20, 8), dtype=torch.int8).numpy()
    words, compensation = dot.pack_vnni_weight(weight)
    assert words.shape == (2, 2, 16) and compensation.shape == (32,)
    as_bytes = words.view(np.int8).reshape(2, 2, 16, 4)  # [N/16, K/4, 16, 4]
    assert np.array_equal(as_bytes[1, 1, 3], weight[19, 4:8])
    assert np.all(as_bytes[1, :, 4:] == 0)  # padding columns 20..31
    assert np.array_equal(compensation[:20], -128 * weight.astype(np.int32).sum(1))
    dp4a = dot.pack_dp4a_weight(weight)
    assert dp4a.shape == (2, 20)
    assert np.array_equal(dp4a.view(np.int8).reshape(2, 20, 4)[1, 7], weight[7, 4:8])
    with pytest.raises(dot.Int8DotError, match="K % 4"):
        dot.pack_vnni_weight(weight[:, :6])
    mma = dot.pack_mma_weight(np.concatenate([weight, weight], axis=1))  # K = 16
    assert mma.shape == (20, 16) and mma.dtype == np.int8 and np.array_equal(mma[19, 8:], weight[19])
    with pytest.raises(dot.Int8DotError, match="K % 16"):
        dot.pack_mma_weight(weight)


# -- the VNNI kernel's integers -------------------------------------------------------------------

# (rows, K, N, symbolic rows): GEMV, a remainder tile of 3 rows after a full one (7), column
# tails (N = 10, 24, 40), one vector a tile (N = 16), 4 vectors (N = 128), any batch.
SHAPES = [(1, 256, 128, False), (7, 64, 24, False), (3, 32, 10, False), (8, 128, 16, False),
          (5, 64, 40, True), (1, 16, 10, True)]


@pytest.mark.parametrize("rows,k,n,symbolic", SHAPES, ids=[f"{m}x{k}x{n}{'-any' if s else ''}" for m, k, n, s in SHAPES])
def test_vnni_accumulators_equal_the_integer_matmul(rows, k, n, symbolic):
    import tvm

    kernel = dot.vnni_linear_kernel(None if symbolic else rows, k, n, dot.Epilogue(raw=True))
    built = tvm.compile(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}), target=_target(ZNVER4))
    assert "vpdpbusd" in _llvm_asm(built)
    if not HOST_VNNI:
        pytest.skip("host CPU lacks avx512_vnni")
    generator = torch.Generator().manual_seed(rows * 1000 + n)
    weight = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=generator)
    x = torch.randint(-128, 128, (rows, k), dtype=torch.int8, generator=generator)
    weight[0], x[0, :4] = 127, -128  # the extremes of both operands
    words, compensation = dot.pack_vnni_weight(weight.numpy())
    out = tvm.runtime.tensor(np.zeros((rows, n), np.int32))
    built["main"](tvm.runtime.tensor(x.numpy()), tvm.runtime.tensor(words), tvm.runtime.tensor(compensation), out)
    assert torch.equal(torch.from_numpy(out.numpy()).long(), x.long() @ weight.long().T)


# -- the direct VNNI conv: non-pointwise convs ---------------------------------------------------------

# (batch, C, H, W, O, kernel, stride, padding): 3x3 pad 1; 3x3 stride 2 (and unpadded); the
# resnet stem's 7x7 stride 2 pad 3 (C = 3: C*kh*kw = 147, not whole 4-byte words); C*kh*kw = 27;
# a 1x3 with a column tail of output channels (10) and a remainder row tile (3*5 pixels).
CONVS = [(1, 16, 8, 8, 32, (3, 3), 1, 1), (3, 8, 9, 7, 16, (3, 3), 2, 1), (2, 8, 8, 9, 16, (3, 3), 2, 0),
         (1, 3, 20, 18, 64, (7, 7), 2, 3), (2, 3, 6, 5, 24, (3, 3), 1, 1), (1, 5, 3, 9, 10, (1, 3), (1, 2), (0, 1))]


def _conv_id(case):
    batch, c, h, w, o, kernel, stride, padding = case
    return f"b{batch}-c{c}-{kernel[0]}x{kernel[1]}-s{stride}-p{padding}-o{o}"


@pytest.mark.parametrize("case", CONVS, ids=[_conv_id(c) for c in CONVS])
def test_vnni_conv_accumulators_equal_the_integer_conv(case):
    import tvm
    from tvm import te

    batch, c, h, w, o, kernel, stride, padding = case
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    stride, padding = pair(stride), pair(padding)
    dilation = [2, 1] if c == 16 else [1, 1]  # one dilated case
    x_te = te.placeholder((batch, c, h, w), "int8", name="x")
    target = _target(ZNVER4)
    pad = tvm.compile(tvm.IRModule({"main": te.create_prim_func([x_te, dot.pad_nhwc_te(x_te, padding=padding)])}),
                      target=target)
    padded_shape = (batch, h + 2 * padding[0], w + 2 * padding[1], dot.conv_channels(c))
    out_h, out_w = (dot.conv_output_size(size, k, s, p, d)
                    for size, k, s, p, d in zip((h, w), kernel, stride, padding, dilation))
    parallel = batch == 3  # row tiles in parallel (from PARALLEL_MIN_MACS in real layers)
    conv = dot.vnni_conv_kernel(padded_shape, (out_h, out_w), kernel, stride, dilation, o, dot.Epilogue(raw=True),
                                parallel=parallel)
    built = tvm.compile(tvm.IRModule({"main": conv.with_attr("global_symbol", "main")}), target=target)
    assert "vpdpbusd" in _llvm_asm(built)
    if not HOST_VNNI:
        pytest.skip("host CPU lacks avx512_vnni")
    generator = torch.Generator().manual_seed(batch * out_h * out_w + o)
    weight = torch.randint(-128, 128, (o, c, *kernel), dtype=torch.int8, generator=generator)
    x = torch.randint(-128, 128, (batch, c, h, w), dtype=torch.int8, generator=generator)
    weight[0], x[0, :, 0, :] = 127, -128  # the extremes, on the border next to the zero padding
    padded = tvm.runtime.tensor(np.zeros(padded_shape, np.int8))
    pad["main"](tvm.runtime.tensor(x.numpy()), padded)
    words, compensation = dot.pack_vnni_weight(dot.pack_conv_weight(weight.numpy()))
    out = tvm.runtime.tensor(np.zeros((batch * out_h * out_w, o), np.int32))
    built["main"](padded, tvm.runtime.tensor(words), tvm.runtime.tensor(compensation), out)
    want = torch.nn.functional.conv2d(x.double(), weight.double(), None, stride, padding, dilation)  # exact: < 2^53
    got = torch.from_numpy(out.numpy()).reshape(batch, out_h, out_w, o).permute(0, 3, 1, 2)
    assert torch.equal(got.double(), want)


class _ConvNet(torch.nn.Module):
    """The non-pointwise convs of CONVS's kinds in one static int8 model: a stem 7x7/2 pad 3 on 3
    channels (K = 147), a 3x3 pad 1, a 3x3 stride 2, a 1x1 (the linear kernel), a grouped 3x3
    (Relax's int8 conv) and an unpadded 3x3 on 5 channels (C*kh*kw = 45) to 10 (a column tail)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        relu = torch.nn.ReLU
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 7, 2, 3), relu(), torch.nn.Conv2d(16, 16, 3, 1, 1), relu(),
            torch.nn.Conv2d(16, 32, 3, 2, 1), relu(), torch.nn.Conv2d(32, 16, 1), relu(),
            torch.nn.Conv2d(16, 16, 3, 1, 1, groups=4), relu(), torch.nn.Conv2d(16, 5, 1), relu(),
            torch.nn.Conv2d(5, 10, 3))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("batch", [1, 3])
def test_vnni_convs_equal_the_reference_and_the_plain_kernels(batch):
    model = _ConvNet().eval()
    inputs = (torch.randn(batch, 3, 24, 22, generator=torch.Generator().manual_seed(batch)),)
    calibration = [(torch.randn(4, 3, 24, 22),)]
    pipeline = "O1,quantize{mode=static}"
    reference, _ = oc.prune(model, inputs, pipeline, calibration_data=calibration)
    vnni = _compile(model, inputs, pipeline, ZNVER4, calibration_data=calibration)
    plain = _compile(model, inputs, pipeline, ZNVER3, calibration_data=calibration)
    assert not vnni.report.all_fallbacks()
    asm = "".join(_llvm_asm(e) for e in vnni.executables)
    assert "vpdpbusd" in asm and "orca_conv2d_q_vnni" in asm
    assert "vpdpbusd" not in "".join(_llvm_asm(e) for e in plain.executables)
    if not HOST_VNNI:
        pytest.skip("host CPU lacks avx512_vnni")
    got = vnni(*inputs)
    assert relative_error(got, reference(*inputs)) < 1e-3
    assert torch.equal(got, plain(*inputs))


def test_vnni_convs_are_measured_against_relax_int8_conv():
    from orca_compiler.lowering import kernel_select
    from orca_compiler.lowering.quant_kernels import PLAIN_CONV
    from orca_compiler.lowering.target import resolve_target

    model = _ConvNet().eval()
    inputs = (torch.randn(1, 3, 24, 22),)
    quantized, _ = oc.prune(model, inputs, "O1,quantize{mode=static}", calibration_data=[(torch.randn(2, 3, 24, 22),)])
    convs = [n for n in quantized.graph_module.graph.nodes if n.target is quant.CONV2D_Q]
    offered = [PLAIN_CONV in kernel_select.candidates(n, resolve_target(ZNVER4)) for n in convs]
    # stem, 3x3, 3x3/2: the VNNI conv and Relax's; the 1x1 (linear kernel) and the grouped one: not
    assert offered == [True, True, True, False, False, False, True]
    assert not any(PLAIN_CONV in kernel_select.candidates(n, resolve_target(ZNVER3)) for n in convs)
    if not HOST_VNNI:
        pytest.skip("host CPU lacks avx512_vnni")
    compiled = oc.compile(model, inputs, pipeline="O1,quantize{mode=static}", cache="off",
                          calibration_data=[(torch.randn(2, 3, 24, 22),)])
    # both measured (or one out by the selection's 4x cutoff), the faster kept
    both = [k for k in compiled.report.kernels if k.op == "orca.conv2d_q"
            if {"tvm", PLAIN_CONV} <= {*k.times_us, *k.rejected}]
    assert len(both) == 4 and all(k.how == "measured" for k in both)
    assert all(k.choice == min(k.times_us, key=k.times_us.get) for k in both)
    assert all(k.layout == "integer" for k in both if k.choice in ("tvm", PLAIN_CONV))


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_vnni_zoo_resnet_static_equals_the_plain_kernels(level):
    model, inputs = oc.zoo.get("resnet")
    calibration = [oc.zoo.get("resnet", seed=1)[1], oc.zoo.get("resnet", seed=2)[1]]
    pipeline = f"{level},quantize{{mode=static}}"
    reference, _ = oc.prune(model, inputs, pipeline, calibration_data=calibration)
    vnni = _compile(model, inputs, pipeline, ZNVER4, calibration_data=calibration)
    plain = _compile(model, inputs, pipeline, ZNVER3, calibration_data=calibration)
    assert not vnni.report.all_fallbacks()
    assert "orca_conv2d_q_vnni" in "".join(_llvm_asm(e) for e in vnni.executables)
    if not HOST_VNNI:
        pytest.skip("host CPU lacks avx512_vnni")
    got = vnni(*inputs)
    assert relative_error(got, reference(*inputs)) < 1e-3
    assert torch.equal(got, plain(*inputs))


# -- compiled quantized models ----------------------------------------------------------------------

class _Net(torch.nn.Module):
    """Linear layers whose widths exercise whole vectors (64, 128) and a column tail (10)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64),
                                       torch.nn.ReLU(), torch.nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)


def _compile(model, inputs, pipeline, target, **options):
    return oc.compile(model, inputs, pipeline=pipeline, target=target, kernels="tvm", cache="off", **options)


MODES = ["quantize{mode=dynamic}", "quantize{mode=static}"]


@pytest.mark.parametrize("batch", [1, 6])
@pytest.mark.parametrize("spec", MODES, ids=["dynamic", "static"])
def test_vnni_model_equals_the_quantized_reference_and_the_plain_kernels(spec, batch):
    model = _Net().eval()
    inputs = (torch.randn(batch, 32, generator=torch.Generator().manual_seed(batch)),)
    calibration = [(torch.randn(16, 32),)] if "static" in spec else None
    pipeline = f"O1,{spec}"
    reference, _ = oc.prune(model, inputs, pipeline, calibration_data=calibration)
    vnni = _compile(model, inputs, pipeline, ZNVER4, calibration_data=calibration)
    plain = _compile(model, inputs, pipeline, ZNVER3, calibration_data=calibration)
    assert not vnni.report.all_fallbacks()
    assert "vpdpbusd" in "".join(_llvm_asm(e) for e in vnni.executables)
    assert "vpdpbusd" not in "".join(_llvm_asm(e) for e in plain.executables)
    if not HOST_VNNI:
        pytest.skip("host CPU lacks avx512_vnni")
    got, want = vnni(*inputs), reference(*inputs)
    # The eager reference sums in float64 and rounds once; TVM's float32 epilogue may differ by
    # float rounding, and (dynamic) a row scale a rounding apart can move a value by one step.
    assert relative_error(got, want) < (1e-2 if "dynamic" in spec else 1e-3)
    # Same integers and the same epilogue expression as the plain kernels: bit-identical.
    assert torch.equal(got, plain(*inputs))


class _PointwiseNet(torch.nn.Module):
    """A 3x3 conv (the plain int8 conv) between two 1x1 convs (the dot-product kernel), ReLUs
    folded into the requantizing epilogues."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(8, 32, 1), torch.nn.ReLU(), torch.nn.Conv2d(32, 16, 3, padding=1),
                                        torch.nn.ReLU(), torch.nn.Conv2d(16, 24, 1))

    def forward(self, x):
        return self.body(x)


def test_vnni_pointwise_convs_equal_the_reference_and_the_plain_kernels():
    model = _PointwiseNet().eval()
    inputs = (torch.randn(2, 8, 6, 5),)
    calibration = [(torch.randn(4, 8, 6, 5),)]
    pipeline = "O1,quantize{mode=static}"
    reference, report = oc.prune(model, inputs, pipeline, calibration_data=calibration)
    assert report.passes[-1].stats["requantized"] >= 1
    vnni = _compile(model, inputs, pipeline, ZNVER4, calibration_data=calibration)
    plain = _compile(model, inputs, pipeline, ZNVER3, calibration_data=calibration)
    assert "vpdpbusd" in "".join(_llvm_asm(e) for e in vnni.executables)
    if not HOST_VNNI:
        pytest.skip("host CPU lacks avx512_vnni")
    got = vnni(*inputs)
    assert relative_error(got, reference(*inputs)) < 1e-3
    assert torch.equal(got, plain(*inputs))


@needs_vnni_host
def test_vnni_any_batch_serves_every_batch_size():
    model = _Net().eval()
    x = torch.randn(6, 32)
    reference, _ = oc.prune(model, (x,), "O1,quantize{mode=dynamic}")
    compiled = _compile(model, (x,), "O1,quantize{mode=dynamic}", "llvm", dynamic_shapes=({0: torch.export.Dim("B")},))
    assert "vpdpbusd" in "".join(_llvm_asm(e) for e in compiled.executables)
    for batch in (1, 5, 9):  # one row, a remainder after a full 4-row tile, two tiles and one row
        x = torch.randn(batch, 32)
        assert relative_error(compiled(x), reference(x)) < 1e-2


@needs_vnni_host
def test_vnni_zoo_transformer_dynamic_matches_the_reference():
    model, inputs = oc.zoo.get("transformer")
    pipeline = "O1,quantize{mode=dynamic}"
    reference, _ = oc.prune(model, inputs, pipeline)
    compiled = _compile(model, inputs, pipeline, "llvm")
    assert {k.layout for k in compiled.report.kernels if k.op in quant.QUANT_OP_NAMES} == {"integer"}
    assert "vpdpbusd" in "".join(_llvm_asm(e) for e in compiled.executables)
    got, want = compiled(*inputs), reference(*inputs)
    got, want = (got if isinstance(got, torch.Tensor) else got[0]), (want if isinstance(want, torch.Tensor) else want[0])
    assert relative_error(got, want) < 1e-2


# -- CUDA dp4a ----------------------------------------------------------------------------------------

CUDA_CASES = [("linear", "quantize{mode=dynamic}"), ("linear", "quantize{mode=static}"),
              ("pointwise-conv", "quantize{mode=static}")]


def _nvcc_compiles(source: str, arch: str) -> None:
    """nvcc turns the generated CUDA source into a cubin for `arch` (skipped without nvcc)."""
    if not shutil.which("nvcc"):
        return
    import tvm
    from tvm.support import nvcc

    with tvm.target.Target({"kind": "cuda", "arch": arch}):
        assert len(nvcc.compile_cuda(source, target_format="cubin", arch=arch, compiler="nvcc")) > 1000


def _cuda_kernels(source: str) -> dict[str, str]:
    """Kernel name -> its body, for each `__global__` kernel defined in the generated source."""
    import re

    heads = list(re.finditer(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\([^)]*\) \{', source))
    return {head.group(1): source[head.end():(heads[i + 1].start() if i + 1 < len(heads) else len(source))]
            for i, head in enumerate(heads)}


_DP4A_CALL = "= __dp4a("  # a call site (the source's header also declares __dp4a)
_MMA_CALL = "nvcuda::wmma::mma_sync("


@pytest.mark.parametrize("net,spec", CUDA_CASES, ids=["linear-dynamic", "linear-static", "pointwise-conv-static"])
def test_cuda_int8_layers_use_dp4a_and_nvcc_compiles_them(net, spec):
    from orca_compiler.lowering.relax_build import cuda_source

    model = (_Net() if net == "linear" else _PointwiseNet()).eval()
    shape = (4, 32) if net == "linear" else (2, 8, 6, 5)
    inputs = (torch.randn(*shape),)
    calibration = [(torch.randn(*shape),)] if "static" in spec else None
    # sm_75: no tensor-core path, so every layer takes dp4a (on sm_80 the pointwise net's second
    # 1x1 conv, 60 pixels x K = 16, takes the tensor cores: test_cuda_int8_layers_use_tensor_cores...)
    compiled = oc.compile(model, inputs, target={"kind": "cuda", "arch": "sm_75"}, pipeline=f"O1,{spec}",
                          calibration_data=calibration, cache="off")
    assert compiled.report.fallbacks == []
    source = "".join(cuda_source(e) for e in compiled.executables)
    # every int8 linear (3) or pointwise conv (2), for each row a thread accumulates
    assert source.count(_DP4A_CALL) >= (3 if net == "linear" else 2) * dot.DP4A_ROWS
    assert _MMA_CALL not in source
    _nvcc_compiles(source, "sm_75")


# (net, quantize spec, arch, rows of each int8 layer): 32 and 16 rows take the tensor cores, 4
# and 15 keep dp4a; the pointwise net's first 1x1 conv has K = 8 (dp4a), its second K = 16.
TENSOR_CORE_CASES = [("linear", "dynamic", "sm_80", 32), ("linear", "static", "sm_80", 16),
                     ("linear", "dynamic", "sm_90a", 32), ("linear", "static", "sm_90a", 4),
                     ("linear", "dynamic", "sm_80", 15), ("pointwise-conv", "static", "sm_80", 60)]


@pytest.mark.parametrize("net,mode,arch,rows", TENSOR_CORE_CASES, ids=[f"{n}-{m}-{a}-{r}rows"
                                                                        for n, m, a, r in TENSOR_CORE_CASES])
def test_cuda_int8_layers_use_tensor_cores_from_16_rows_and_nvcc_compiles_them(net, mode, arch, rows):
    from orca_compiler.lowering.relax_build import cuda_source

    if net == "linear":
        model, shape = _Net().eval(), (rows, 32)
    else:
        model, shape = _PointwiseNet().eval(), (rows // 30, 8, 6, 5)
    inputs = (torch.randn(*shape),)
    calibration = [(torch.randn(*shape),)] if mode == "static" else None
    compiled = oc.compile(model, inputs, target={"kind": "cuda", "arch": arch}, pipeline=f"O1,quantize{{mode={mode}}}",
                          calibration_data=calibration, cache="off")
    assert compiled.report.fallbacks == []
    source = "".join(cuda_source(e) for e in compiled.executables)
    kernels = _cuda_kernels(source)
    # the path is in the kernel's name (orca_linear_dq_mma_3_kernel), and its body has the instruction
    mma = {name: body for name, body in kernels.items() if "_mma_" in name}
    dp4a = {name: body for name, body in kernels.items() if "_dp4a_" in name}
    if net == "linear":
        assert (len(mma), len(dp4a)) == ((3, 0) if rows >= dot.MMA_MIN_ROWS else (0, 3))
    else:
        assert [name.split("_")[4] for name in sorted(kernels) if "conv2d_q_1x1" in name] == ["dp4a", "mma"]
    assert all(_MMA_CALL in body and _DP4A_CALL not in body for body in mma.values())
    assert all(_DP4A_CALL in body and "wmma" not in body for body in dp4a.values())
    _nvcc_compiles(source, arch)


@pytest.mark.parametrize("mode", ["raw", "dynamic", "static-requantize"])
def test_tensor_core_definition_equals_the_integer_matmul_on_cpu(mode):
    """The TE int8 matmul + epilogue that the tensor-core kernel is scheduled from, run on CPU
    for a shape that pads both ways (17 rows: 2 wmma row tiles, 10 columns of 16), against
    torch; and the scheduled kernel for that shape generates wmma code. (The schedule's own index
    math cannot run without a GPU.)"""
    import tvm

    from orca_compiler.lowering.relax_build import cuda_source

    rows, k, n = 17, 48, 10
    epilogue = {"raw": dot.Epilogue(raw=True), "dynamic": dot.Epilogue(per_row_scale=True, has_bias=True),
                "static-requantize": dot.Epilogue(x_scale=0.02, out_scale=0.5, activation="relu")}[mode]
    generator = torch.Generator().manual_seed(7)
    x = torch.randint(-128, 128, (rows, k), dtype=torch.int8, generator=generator)
    weight = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=generator)
    x[0], weight[0] = -128, -128  # the extremes
    row_scale, wscale, bias = torch.rand(rows) / 100, torch.rand(n) / 100, torch.randn(n)
    cpu = tvm.compile(tvm.IRModule({"main": tvm.te.create_prim_func(dot.int8_matmul_te(rows, k, n, epilogue))}),
                      target=_target(ZNVER3))
    operands = [x.numpy(), dot.pack_mma_weight(weight.numpy())]
    acc = (x.long() @ weight.long().T)
    if mode == "dynamic":
        operands += [row_scale.numpy(), wscale.numpy(), bias.numpy()]
        want = acc.float() * (wscale[None, :] * row_scale[:, None]) + bias
    elif mode == "static-requantize":
        operands += [wscale.numpy()]
        want = torch.clamp(torch.round(torch.relu(acc.float() * (wscale * 0.02)) / 0.5), -127, 127)
    else:
        want = acc
    out = tvm.runtime.tensor(np.zeros((rows, n), epilogue.out_dtype))
    cpu["main"](*(tvm.runtime.tensor(np.ascontiguousarray(o)) for o in operands), out)
    got = torch.from_numpy(out.numpy())
    if mode == "raw":
        assert torch.equal(got.long(), want)
    elif mode == "dynamic":
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # a float rounding apart can move a value across a .5: at most one step
        assert (got.float() - want).abs().max() <= 1
    kernel = dot.mma_linear_kernel(rows, k, n, epilogue, _target({"kind": "cuda", "arch": "sm_80"}))
    built = tvm.compile(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}),
                        target=tvm.target.Target({"kind": "cuda", "arch": "sm_80"}, host={"kind": "llvm"}))
    assert _MMA_CALL in cuda_source(built)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_cuda_plain_int8_matmul_builds_where_k_rules_out_the_dot_paths(mode):
    """K = 130 (not a multiple of 4: neither dp4a nor tensor cores) at 128 x 128: the plain int8
    matmul is kept away from dlight's int8 tensor-core rule, whose schedule TVM 0.27 fails to build
    (InjectSoftwarePipeline), so the layer compiles for CUDA instead of falling back to torch."""
    from orca_compiler.lowering.relax_build import cuda_source

    model = torch.nn.Sequential(torch.nn.Linear(130, 128), torch.nn.ReLU()).eval()
    shape = (128, 130)
    calibration = [(torch.randn(*shape),)] if mode == "static" else None
    compiled = oc.compile(model, (torch.randn(*shape),), target={"kind": "cuda", "arch": "sm_80"},
                          pipeline=f"O1,quantize{{mode={mode}}}", calibration_data=calibration, cache="off")
    assert compiled.report.fallbacks == []
    source = "".join(cuda_source(e) for e in compiled.executables)
    assert _MMA_CALL not in source and _DP4A_CALL not in source
    _nvcc_compiles(source, "sm_80")
