"""prune-magnitude and prune-nm: zeroed weights, CSR storage, kernel choice and the report."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import orca_compiler as oc
from conftest import assert_outputs_close
from orca_compiler import zoo
from orca_compiler.capture import capture
from orca_compiler.lowering import kernel_select
from orca_compiler.lowering.selection_cache import SelectionCache
from orca_compiler.lowering.support import keep_op_in_capture
from orca_compiler.lowering.target import resolve_target
from orca_compiler.ops import sparse as sparse_ops
from orca_compiler.pass_manager import PassManager
from orca_compiler.passes.prune_sparse import collect_layers, layer_sparsity
from orca_compiler.printer import op_name
from orca_compiler.report import CompileReport
from orca_compiler.verify import verify


@functools.lru_cache(maxsize=None)
def _captured(name: str):
    """The zoo model's IR after fold-bn (captured once per session; passes work on copies)."""
    model, inputs = zoo.get(name)
    ir = capture(model, inputs, keep_op=keep_op_in_capture).ir
    return model, inputs, PassManager("fold-bn").run(ir)[0]


def _prune(name: str, pipeline: str):
    model, inputs, ir = _captured(name)
    after, records = PassManager(pipeline).run(ir)
    return ir, after, records[-1], inputs


def _weights(ir) -> dict[str, torch.Tensor]:
    """Prunable layer name -> its weight (dense view), before any `_sparse` renaming."""
    return {layer.node.name.removesuffix("_sparse"): layer.weight for layer in collect_layers(ir)[0]}


@pytest.mark.parametrize("name", ["mlp", "resnet"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_magnitude_per_layer_hits_the_sparsity_and_verifies(name, sparsity):
    before, after, record, inputs = _prune(name, f"prune-magnitude{{sparsity={sparsity}}}")
    verify(after)
    for layer, (zeros, entries) in layer_sparsity(after).items():
        assert abs(zeros - sparsity * entries) <= 1, layer
    assert record.stats["sparsity"] == pytest.approx(sparsity, abs=1e-3)
    # The zeroed entries are the smallest of each layer.
    for layer, weight in _weights(before).items():
        kept = _weights(after)[layer] != 0
        assert weight.abs()[~kept].max() <= weight.abs()[kept].min()
    sparse = [n for n in after.compute_nodes() if n.target is sparse_ops.SPARSE_LINEAR]
    if name == "mlp":
        # int32 CSR is smaller than dense only above ~50% zeros.
        assert len(sparse) == (3 if sparsity == 0.9 else 0)
        assert (record.stats["bytes_stored"] < 0.25 * record.stats["bytes_dense"]) == (sparsity == 0.9)
    biases = {n for n in before.weights() if n.endswith("bias")}
    assert all(torch.equal(before.weight(b), after.weight(b)) for b in biases)


def test_global_scope_uses_one_threshold():
    before, after, record, _ = _prune("mlp", "prune-magnitude{sparsity=0.7,scope=global}")
    verify(after)
    counts = layer_sparsity(after).values()
    zeros, entries = sum(z for z, _ in counts), sum(e for _, e in counts)
    assert abs(zeros - 0.7 * entries) <= 1
    assert len({round(z / e, 2) for z, e in counts}) > 1  # layers differ: one threshold, not one ratio
    old, new = _weights(before), _weights(after)
    largest_zeroed = max(float(old[k].abs()[new[k] == 0].max()) for k in old)
    smallest_kept = min(float(old[k].abs()[new[k] != 0].min()) for k in old)
    assert largest_zeroed <= smallest_kept


@pytest.mark.parametrize("name", ["mlp", "resnet"])
def test_two_of_four_pattern_holds_on_every_group(name):
    before, after, record, _ = _prune(name, "prune-nm{n=2,m=4}")
    verify(after)
    old, new = _weights(before), _weights(after)
    checked = 0
    for layer, weight in new.items():
        groups, original = weight.flatten(1), old[layer].flatten(1)
        if groups.shape[1] % 4:  # the resnet stem: 3*3*3 inputs, skipped and untouched
            assert torch.equal(weight, old[layer])
            continue
        groups, original = groups.reshape(-1, 4), original.reshape(-1, 4)
        assert bool(((groups != 0).sum(1) == 2).all()), layer
        kept, magnitude = groups != 0, original.abs()
        assert bool((magnitude.masked_fill(kept, 0).amax(1) <= magnitude.masked_fill(~kept, float("inf")).amin(1)).all())
        checked += 1
    assert record.stats["skipped"] == (1 if name == "resnet" else 0) and checked == record.stats["layers"]
    # 2:4 is exactly 50% zeros: int32 CSR would not be smaller, so the weights stay dense.
    assert record.stats["sparse"] == 0 and record.stats["bytes_stored"] == record.stats["bytes_dense"]


def test_one_of_four_is_stored_sparse_with_its_pattern():
    _, after, record, _ = _prune("mlp", "prune-nm{n=1,m=4}")
    verify(after)
    assert record.stats["sparse"] == 3 and record.stats["sparsity"] == 0.75
    for weight in _weights(after).values():
        assert bool(((weight.reshape(-1, 4) != 0).sum(1) == 1).all())


@pytest.mark.parametrize("pipeline", ["prune-magnitude{sparsity=0}", "prune-magnitude{sparsity=0,scope=global}"])
def test_sparsity_zero_is_bit_identical(pipeline):
    before, after, record, inputs = _prune("resnet", pipeline)
    assert record.modified is False and record.weight_bytes_after == record.weight_bytes_before
    assert str(after) == str(before)
    assert all(torch.equal(t, after.weight(n)) for n, t in before.weights().items())
    assert torch.equal(before.run(*inputs)[0], after.run(*inputs)[0])


@pytest.mark.parametrize("pipeline", ["prune-magnitude{sparsity=0.9,scope=global}", "prune-nm{n=2,m=4}",
                                      "prune-nm{n=1,m=4}"])
def test_running_twice_changes_nothing(pipeline):
    _, once, _, _ = _prune("mlp", pipeline)
    twice, records = PassManager(pipeline).run(once)
    assert records[-1].modified is False and str(twice) == str(once)


def test_fused_epilogues_are_pruned_dense():
    _, after, record, _ = _prune("mlp", "fuse,prune-magnitude{sparsity=0.9}")
    ops = sorted(op_name(n) for n in after.compute_nodes())
    assert ops == ["orca.linear_epilogue", "orca.linear_epilogue", "orca.sparse_linear"]
    assert record.stats["dense"] == 2 and record.stats["sparse"] == 1


class _TiedEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 32, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.relu(self.proj(self.emb(tokens))))


def test_embeddings_and_tied_weights_are_never_touched():
    model, inputs = _TiedEmbedding().eval(), (torch.randint(0, 32, (2, 5)),)
    ir = capture(model, inputs, keep_op=keep_op_in_capture).ir
    after, records = PassManager("prune-magnitude{sparsity=0.9}").run(ir)
    assert records[-1].stats["layers"] == 1 and records[-1].stats["skipped"] == 1
    emb = next(n for n in after.compute_nodes() if op_name(n) == "embedding").args[0]
    assert torch.equal(after.weight(emb), model.emb.weight)


@pytest.mark.parametrize("text,words", [
    ("prune-magnitude{sparsity=1}", "prune-magnitude.*'sparsity'"),
    ("prune-magnitude{sparsity=-0.1}", "prune-magnitude.*'sparsity'"),
    ("prune-magnitude{scope=channel}", "prune-magnitude.*'scope'"),
    ("prune-nm{n=4,m=4}", "prune-nm.*'n'"),
    ("prune-nm{n=0}", "prune-nm.*'n'"),
    ("prune-nm{m=1}", "prune-nm.*'m'"),
])
def test_bad_options_are_named(text, words):
    with pytest.raises(oc.PipelineError, match=words):
        PassManager(text)


# -- lowering: compiled output against the pruned IR's eager output, and the report ---------------

@pytest.mark.parametrize("name,pipeline", [
    ("mlp", "prune-magnitude{sparsity=0.9},O1"),
    ("resnet", "O1,prune-magnitude{sparsity=0.5,scope=global}"),
])
def test_compiled_pruned_model_matches_its_ir(name, pipeline):
    model, inputs = zoo.get(name)
    compiled = oc.compile(model, inputs, pipeline=pipeline)
    assert_outputs_close(compiled.ir.run(*inputs)[0], compiled(*inputs), rtol=0, atol=1e-4)
    sparse = [k for k in compiled.report.kernels if k.op == "orca.sparse_linear"]
    assert len(sparse) == (3 if name == "mlp" else 0)
    assert len(compiled.report.sparse_layers()) == len(sparse)
    for k in sparse:  # whichever kernel won, the report says which and on what layout
        assert f"orca.sparse_linear -> {k.choice} ({k.layout})" in str(compiled.report)


@pytest.mark.parametrize("kernels,layout", [("mkldnn", "dense"), ("torch", "sparse")])
def test_report_names_the_forced_kernel_and_what_sparsity_bought(kernels, layout):
    model, inputs = zoo.get("mlp")
    compiled = oc.compile(model, inputs, pipeline="prune-magnitude{sparsity=0.9}", kernels=kernels)
    assert_outputs_close(compiled.ir.run(*inputs)[0], compiled(*inputs), rtol=0, atol=1e-4)
    text = str(compiled.report)
    assert f"orca.sparse_linear -> {kernels} ({layout}): 3 (forced)" in text
    lines = compiled.report.sparse_layers()
    assert len(lines) == 3 and all(f"-> {kernels} ({layout} kernel, forced" in line for line in lines)
    assert all(("saved memory (the stored weight), not time" in line) == (layout == "dense") for line in lines)


@pytest.mark.parametrize("times,winner,sentence", [
    ({"torch": 90.0, "mkldnn": 40.0, "tvm": 60.0, "mkl": 45.0}, "mkldnn", "saved memory (the stored weight), not time"),
    ({"torch": 20.0, "mkldnn": 40.0, "tvm": 60.0, "mkl": 45.0}, "torch", "saved memory and time"),
])
def test_measured_winner_is_reported(monkeypatch, tmp_path, times, winner, sentence):
    """The measured path with fixed times (never real ones): the fastest wins and the report says
    whether the sparse or a dense kernel did."""
    _, after, _, _ = _prune("mlp", "prune-magnitude{sparsity=0.9}")
    target = resolve_target("llvm")
    monkeypatch.setattr(kernel_select, "measure", lambda ir, target, nodes, database=None:
                        {key: (dict(times), {}) for key in nodes})
    cache = SelectionCache(target.key, tmp_path)
    choices = kernel_select.select_kernels(after, target, cache=cache)
    report = CompileReport(pipeline="", target="llvm", kernels=list(choices.values()))
    assert {k.choice for k in choices.values()} == {winner}
    lines = report.sparse_layers()
    assert len(lines) == 3 and all(sentence in line and f"-> {winner} (" in line for line in lines)
    sparse_us, dense_us = times["torch"], min(v for k, v in times.items() if k != "torch")
    assert f"sparse torch {sparse_us:.1f}us vs dense" in lines[0] and f"{dense_us:.1f}us" in lines[0]
