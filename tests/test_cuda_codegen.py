"""CUDA lowering generates code on a machine without a GPU; nvcc compiles it for sm_80 and sm_90a."""
from __future__ import annotations

import shutil

import pytest
import torch

import orca_compiler as oc
from orca_compiler.lowering.relax_build import cuda_source


@pytest.fixture(scope="module")
def cuda_mlp():
    model, inputs = oc.zoo.get("mlp")
    return oc.compile(model, inputs, target="cuda")


def test_cuda_build_has_kernels(cuda_mlp):
    assert cuda_mlp.report.target == "cuda" and cuda_mlp.report.fallbacks == []
    source = "".join(cuda_source(e) for e in cuda_mlp.executables)
    assert source.count("__global__") >= 3  # at least one kernel per linear layer


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_generated_cuda_compiles_with_nvcc(cuda_mlp, arch):
    import tvm
    from tvm.support import nvcc

    source = "".join(cuda_source(e) for e in cuda_mlp.executables)
    with tvm.target.Target({"kind": "cuda", "arch": arch}):
        cubin = nvcc.compile_cuda(source, target_format="cubin", arch=arch, compiler="nvcc")
    assert len(cubin) > 1000


def test_calling_cuda_module_without_gpu_is_a_clear_error(cuda_mlp):
    import tvm

    if tvm.cuda(0).exist:
        pytest.skip("a CUDA device is present")
    _, inputs = oc.zoo.get("mlp")
    with pytest.raises(oc.OrcaError, match="no cuda device"):
        cuda_mlp(*inputs)


def test_cuda_conv_and_transformer_generate_code():
    for name in ("resnet", "transformer"):
        model, inputs = oc.zoo.get(name)
        compiled = oc.compile(model, inputs, target="cuda")
        assert "__global__" in cuda_source(compiled.executables[0]), name


@pytest.mark.parametrize("name", ["lstm_bidir", "gru_bidir"])
def test_cuda_rnn_scan_kernels_generate_code(name):
    # The recurrence runs as one persistent kernel per direction (no eager fallback on CUDA).
    model, inputs = oc.zoo.get(name)
    compiled = oc.compile(model, inputs, target="cuda")
    assert compiled.report.fallbacks == []
    source = "".join(cuda_source(e) for e in compiled.executables)
    cell = name.split("_")[0]
    assert source.count(f"orca_{cell}_scan") >= 4 and "__syncthreads()" in source
