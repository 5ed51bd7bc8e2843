"""Quantized LSTM/GRU recurrent weights (orca::lstm_scan_q / gru_scan_q) and weight-only convs
(orca::conv2d_wq).

As in test_quantize.py, two references for every compiled model: the quantized IR run in eager
PyTorch (the ops' reference semantics), which the TVM kernels must equal up to float rounding, and
the float32 model, which bounds the quantization error (on trained models: < 1% top-1 lost).
"""
from __future__ import annotations

import re
import shutil

import pytest
import torch

import orca_compiler as oc
from orca_compiler import trained, zoo
from orca_compiler.errors import PassError
from orca_compiler.ops import quant
from orca_compiler.ops import rnn as rnn_ops

from conftest import relative_error

BATCH = 64
SCANS_Q = (rnn_ops.LSTM_SCAN_Q, rnn_ops.GRU_SCAN_Q)


pytestmark = pytest.mark.usefixtures("one_thread")




def _leaves(out) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _targets(module) -> list:
    return [n.target for n in module.graph_module.graph.nodes if n.op == "call_function"]


def _float_weights(module) -> list[torch.Size]:
    gm = module.graph_module
    return [getattr(gm, n.target).shape for n in gm.graph.nodes
            if n.op == "get_attr" and getattr(gm, n.target).dtype == torch.float32]


# -- LSTM/GRU: W_hh inside the scan kernels ---------------------------------------------------------

RNN_SPECS = [
    ("quantize{mode=dynamic}", 8, 1e-2, 0.02),
    ("quantize{mode=weight-only,dtype=int4,granularity=per-group,group=32}", 4, 1e-4, 0.15),
]
RNN_CASES = [(name, *spec) for name in ("lstm", "lstm_bidir", "gru", "gru_bidir") for spec in RNN_SPECS]
RNN_CASES.append(("lstm", "quantize{mode=weight-only,dtype=int8}", 8, 1e-4, 0.01))


@pytest.mark.parametrize("name,quantize,bits,ref_bound,float_bound", RNN_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in RNN_CASES])
def test_recurrent_weights_are_integer_and_the_kernels_equal_the_reference(name, quantize, bits, ref_bound,
                                                                          float_bound):
    model, inputs = zoo.get(name)
    expected = _leaves(model(*inputs))
    pipeline = f"O1,{quantize}"
    reference, _ = oc.prune(model, inputs, pipeline)
    targets = _targets(reference)
    directions = 2 if "bidir" in name else 1
    assert sum(t in SCANS_Q for t in targets) == 2 * directions  # every layer direction
    assert not {rnn_ops.LSTM_SCAN, rnn_ops.GRU_SCAN} & set(targets)
    hidden = 64
    gates = 4 if name.startswith("lstm") else 3
    # no float32 recurrent weight left in the program, in either orientation
    assert not {torch.Size([hidden, gates * hidden]), torch.Size([gates * hidden, hidden])} & set(_float_weights(reference))
    scan = next(n for n in reference.graph_module.graph.nodes if n.target in SCANS_Q)
    assert scan.args[1].meta["val"].dtype == (torch.int8 if bits == 8 else torch.uint8) and scan.args[5] == bits
    compiled = oc.compile(model, inputs, pipeline=pipeline, kernels="tvm")
    assert not compiled.report.all_fallbacks()
    got, want = _leaves(compiled(*inputs)), _leaves(reference(*inputs))
    for g, w, e in zip(got, want, expected):  # the output, then h_n (and c_n)
        assert relative_error(g, w) < ref_bound
        assert relative_error(g, e) < float_bound


def test_recurrent_weight_bytes_shrink_and_skip_keeps_a_scan_float():
    model, inputs = zoo.get("lstm")
    _, report = oc.prune(model, inputs, "O1,quantize{skip=*xproj*:head}")  # only the two W_hh
    stats = report.passes[-1].stats
    assert stats["int8"] == 2 and stats["bytes_before"] == 2 * 4 * 64 * 64 * 4
    assert stats["bytes_after"] == 2 * (4 * 64 * 64 + 4 * 64 * 4)  # int8 + one float scale a gate column
    _, report = oc.prune(model, inputs, "O1,quantize{dtype=int4,skip=*xproj*:head}")
    assert report.passes[-1].stats["bytes_after"] == 2 * (4 * 64 * 32 + 4 * 64 * 4)  # two a byte
    kept, report = oc.prune(model, inputs, "O1,quantize{skip=lstm_l1_scan}")
    targets = _targets(kept)
    assert targets.count(rnn_ops.LSTM_SCAN_Q) == 1 and targets.count(rnn_ops.LSTM_SCAN) == 1
    assert report.passes[-1].stats["skipped"] == 1


def test_a_skip_pattern_lists_the_scans_among_the_layers():
    with pytest.raises(PassError, match=r"'lstm_l9_scan'.*lstm_l[01]_scan"):
        oc.prune(*zoo.get("lstm"), "O1,quantize{skip=lstm_l9_scan}")


@pytest.mark.parametrize("trainer,quantize", [(trained.sequence_lstm, "quantize{mode=dynamic}"),
                                              (trained.sequence_gru, "quantize{mode=dynamic}"),
                                              # int4 W_hh, the linears int8 (all int4 loses 1.3% here)
                                              (trained.sequence_lstm, "quantize{dtype=int8,layers=*_scan=int4}")])
def test_trained_rnn_with_integer_recurrent_weights_loses_under_one_percent(trainer, quantize):
    base = trainer()
    inputs = base.example_inputs(BATCH)
    pipeline = f"O1,{quantize}"
    reference, _ = oc.prune(base.model, inputs, pipeline)
    assert sum(t in SCANS_Q for t in _targets(reference)) == 2
    compiled = oc.compile(base.model, inputs, pipeline=pipeline, kernels="tvm")
    assert not compiled.report.all_fallbacks()
    baseline = base.accuracy(base.model, BATCH)
    assert baseline - base.accuracy(compiled, BATCH) < 0.01


@pytest.mark.parametrize("name,quantize", [("lstm_bidir", "quantize{mode=dynamic}"),
                                           ("gru", "quantize{dtype=int4,granularity=per-group,group=32}")])
def test_quantized_scan_kernels_generate_cuda_code(name, quantize):
    from orca_compiler.lowering.relax_build import cuda_source

    model, inputs = zoo.get(name)
    compiled = oc.compile(model, inputs, target="cuda", pipeline=f"O1,{quantize}")
    assert compiled.report.fallbacks == []
    source = "".join(cuda_source(e) for e in compiled.executables)
    cell = name.split("_")[0]
    assert f"orca_{cell}_scan_q" in source  # the quantized scan's kernel, not the float one
    assert f"orca_{cell}_scan_kernel" not in source
    # W_hh reaches the kernel as integers: int8 (signed char) or packed int4 (uchar)
    w_type = "signed char" if "dynamic" in quantize else "uchar"
    assert re.search(rf"orca_{cell}_scan_q\w*kernel\([^)]*{w_type}\* __restrict__ w_ptr", source)
    if shutil.which("nvcc"):
        import tvm
        from tvm.support import nvcc

        with tvm.target.Target({"kind": "cuda", "arch": "sm_80"}):
            assert len(nvcc.compile_cuda(source, target_format="cubin", arch="sm_80", compiler="nvcc")) > 1000


# -- weight-only convs ------------------------------------------------------------------------------

CONV_CASES = [
    ("resnet", "O1", "quantize{mode=weight-only,dtype=int8}", 0.01),
    ("resnet", "O2", "quantize{mode=weight-only,dtype=int4,group=32}", 0.1),
    ("mobilenet", "O2", "quantize{mode=weight-only,dtype=int8}", 0.01),
    ("mobilenet", "O1", "quantize{mode=weight-only,dtype=int4,group=32}", 0.15),
]


@pytest.mark.parametrize("name,base,quantize,float_bound", CONV_CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CONV_CASES])
def test_weight_only_convs_equal_the_reference_and_stay_near_float(name, base, quantize, float_bound):
    # O2 first: conv epilogues (residual adds, ReLU6) are unpacked into conv2d_wq + a float epilogue
    model, inputs = zoo.get(name)
    expected = model(*inputs)
    pipeline = f"{base},{quantize}"
    reference, report = oc.prune(model, inputs, pipeline)
    targets = _targets(reference)
    assert targets.count(quant.CONV2D_WQ) == report.passes[-1].stats["int8" if "int8" in quantize else "int4"] - 1
    assert not any(len(shape) == 4 for shape in _float_weights(reference))  # no float32 conv weight left
    compiled = oc.compile(model, inputs, pipeline=pipeline, kernels="tvm")
    assert not compiled.report.all_fallbacks()
    assert {k.layout for k in compiled.report.kernels if k.op == "orca.conv2d_wq"} == {"integer"}
    got = compiled(*inputs)
    assert relative_error(got, reference(*inputs)) < 1e-4
    assert relative_error(got, expected) < float_bound


def test_in_register_and_prologue_dequantization_agree(monkeypatch):
    from orca_compiler.lowering import quant_conv_kernels

    model, inputs = zoo.get("mobilenet")
    pipeline = "O1,quantize{dtype=int4,group=32}"
    want = oc.prune(model, inputs, pipeline)[0](*inputs)
    for in_kernel in (True, False):
        monkeypatch.setattr(quant_conv_kernels, "DEQUANTIZE_IN_KERNEL", in_kernel)
        compiled = oc.compile(model, inputs, pipeline=pipeline, kernels="tvm", cache="off")
        assert relative_error(compiled(*inputs), want) < 1e-4


def test_float_kernels_on_the_dequantized_conv_weight_say_memory_not_time():
    model, inputs = zoo.get("resnet")
    pipeline = "O1,quantize{dtype=int8}"
    want = oc.prune(model, inputs, pipeline)[0](*inputs)
    compiled = oc.compile(model, inputs, pipeline=pipeline, kernels="mkldnn")  # torch's conv, float32 weight
    convs = [k for k in compiled.report.kernels if k.op == "orca.conv2d_wq"]
    assert len(convs) == 15 and {k.choice for k in convs} == {"mkldnn"} and {k.layout for k in convs} == {"float32"}
    sentences = [s for s in compiled.report.quantized_layers() if "conv2d_wq" in s]
    assert len(sentences) == 15 and all("saved the stored weight's memory, not time" in s for s in sentences)
    assert relative_error(compiled(*inputs), want) < 1e-4


@pytest.mark.parametrize("quantize", ["quantize{mode=weight-only,dtype=int8}", "quantize{dtype=int4,group=32}"])
def test_weight_only_digits_cnn_loses_under_one_percent(quantize):
    base = trained.digits_cnn()
    inputs = base.example_inputs(BATCH)
    pipeline = f"O1,{quantize}"
    reference, report = oc.prune(base.model, inputs, pipeline)
    assert _targets(reference).count(quant.CONV2D_WQ) == 4  # stem, residual, branch, down
    stats = report.passes[-1].stats
    assert stats["bytes_after"] < stats["bytes_before"] * (0.26 if "int8" in quantize else 0.16)
    compiled = oc.compile(base.model, inputs, pipeline=pipeline, kernels="tvm")
    baseline = base.accuracy(base.model, BATCH)
    assert baseline - base.accuracy(compiled, BATCH) < 0.01
    x = inputs[0]
    assert relative_error(compiled(x), reference(x)) < 1e-4


def test_sensitivity_lists_convs_and_recurrent_weights():
    kinds = {r.kind for r in oc.quantize_sensitivity(*zoo.get("mobilenet"), "quantize{dtype=int4}")}
    assert kinds == {"conv", "linear"}
    ranking = oc.quantize_sensitivity(*zoo.get("gru"), "quantize{mode=dynamic}")
    assert {r.kind for r in ranking} == {"rnn", "linear"}
    assert all(r.error > 0 for r in ranking if r.kind == "rnn")


def test_static_mode_leaves_recurrent_weights_float():
    model, inputs = zoo.get("lstm")
    quantized, _ = oc.prune(model, inputs, "O1,quantize{mode=static}", calibration_data=[inputs])
    targets = _targets(quantized)
    assert targets.count(rnn_ops.LSTM_SCAN) == 2 and not set(SCANS_Q) & set(targets)
