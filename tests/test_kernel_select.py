"""Kernel selection: every candidate kernel gives eager's numbers, and the selection cache is
reused across processes and rebuilt (not trusted) when corrupt or stale."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import orca_compiler as oc
from orca_compiler import zoo
from orca_compiler.capture import capture
from orca_compiler.errors import OrcaError
from orca_compiler.lowering import extern, kernel_select, resolve_target
from orca_compiler.lowering.selection_cache import SelectionCache
from orca_compiler.lowering.support import keep_op_in_capture

from conftest import assert_outputs_close

FORCED = [
    ("mlp", "torch"), ("mlp", "mkldnn"), ("mlp", "mkl"), ("mlp", "tvm"),
    ("transformer", "torch"), ("transformer", "mkl"), ("transformer", "tvm"),
    ("resnet", "torch"), ("resnet", "tvm"), ("mobilenet", "torch"),
    ("lstm_bidir", "torch"), ("gru", "torch"),
]


@pytest.mark.parametrize("model_name,kernel", FORCED)
def test_forced_kernel_matches_eager(model_name, kernel):
    model, inputs = zoo.get(model_name, batch_size=2)
    compiled = oc.compile(model, inputs, kernels=kernel)
    assert_outputs_close(model(*inputs), compiled(*inputs))
    chosen = {k.choice for k in compiled.report.kernels}
    assert kernel in chosen, compiled.report.kernel_summary()


def test_rnn_ops_left_whole_run_as_torch_kernels():
    # O0 has no decompose-rnn: the LSTM is one op, and torch's kernel its only candidate.
    model, inputs = zoo.get("lstm")
    compiled = oc.compile(model, inputs, pipeline="O0")
    (lstm,) = [k for k in compiled.report.kernels if k.op == "orca.lstm"]
    assert (lstm.choice, lstm.how) == ("torch", "only candidate")
    assert_outputs_close(model(*inputs), compiled(*inputs))


@pytest.mark.parametrize("kernel", ["torch", "tvm", "measure"])
def test_transposed_convolutions_choose_between_torch_and_tvm(kernel):
    """A transposed conv (the hourglass's upsampling) is a heavy op: TVM's untuned kernel ran it
    slower than torch's, which made the whole program slower than eager before it was measured."""
    model, inputs = zoo.get("hourglass")
    compiled = oc.compile(model, inputs, pipeline="O2", kernels=kernel)
    (up,) = [k for k in compiled.report.kernels if k.op.startswith("conv_transpose2d")]
    assert up.choice in ("torch", "tvm") and (kernel == "measure" or up.choice == kernel)
    if kernel == "measure":
        assert up.how == "cached" or set(up.times_us) == {"torch", "tvm"}
    with torch.no_grad():
        assert_outputs_close(model(*inputs), compiled(*inputs))


def _ir(name, **kw):
    model, inputs = zoo.get(name, **kw)
    return capture(model, inputs, keep_op=keep_op_in_capture).ir


def test_selection_key_tells_shapes_and_weights_apart():
    keys = {kernel_select.selection_key(n) for n in _ir("mlp").compute_nodes() if n.op == "call_function"}
    assert "linear('x:float32[8, 512]', 'w:float32[1024, 512]', 'w:float32[1024]'){}" in keys
    assert len({k for k in keys if k.startswith("linear")}) == 3


def test_measured_choice_is_cached_and_reused(tmp_path):
    ir = _ir("mlp", batch_size=1)
    target = resolve_target("llvm")
    first = kernel_select.select_kernels(ir, target, cache=SelectionCache(target.key, tmp_path))
    assert {c.how for c in first.values()} == {"measured"}
    for choice in first.values():
        assert choice.choice == min(choice.times_us, key=choice.times_us.get)
    files = list(tmp_path.glob("kernel-selection-*.json"))
    assert len(files) == 1 and len(json.loads(files[0].read_text())["entries"]) == 3
    # A new cache object reads the file, as the next process would: nothing is measured again.
    again = kernel_select.select_kernels(ir, target, cache=SelectionCache(target.key, tmp_path))
    assert {c.how for c in again.values()} == {"cached"}
    assert {n: c.choice for n, c in again.items()} == {n: c.choice for n, c in first.items()}


def test_corrupt_cache_file_is_rebuilt(tmp_path):
    target = resolve_target("llvm")
    path = SelectionCache(target.key, tmp_path).path
    path.write_text('{"header": {"format": 1}, "entries": {"linear(')  # a write cut short
    cache = SelectionCache(target.key, tmp_path)
    assert cache.rebuilt_because.startswith("unreadable") and cache.entries == {}
    choices = kernel_select.select_kernels(_ir("mlp", batch_size=1), target, cache=cache)
    assert {c.how for c in choices.values()} == {"measured"}
    assert len(json.loads(path.read_text())["entries"]) == 3


def test_cache_with_other_versions_or_target_is_not_trusted(tmp_path):
    target = resolve_target("llvm")
    cache = SelectionCache(target.key, tmp_path)
    cache.put("linear(...)", {"choice": "torch"})
    cache.save()
    data = json.loads(cache.path.read_text())
    data["header"]["torch"] = "1.0.0"  # written by another torch: its timings do not hold here
    cache.path.write_text(json.dumps(data))
    stale = SelectionCache(target.key, tmp_path)
    assert stale.rebuilt_because.startswith("stale") and stale.entries == {}
    other = SelectionCache(resolve_target({"kind": "llvm", "mcpu": "skylake", "num-cores": 1}).key, tmp_path)
    assert other.path != cache.path and other.entries == {}


def test_a_candidate_with_wrong_numbers_is_rejected(tmp_path, monkeypatch):
    def make_wrong(node, args, kwargs):
        return lambda x: torch.zeros(tuple(node.meta["val"].shape))

    wrong = extern.ExternImpl("wrong", frozenset({torch.ops.aten.linear.default}), make_wrong)
    monkeypatch.setattr(extern, "EXTERN_IMPLS", extern.EXTERN_IMPLS + (wrong,))
    monkeypatch.setattr(extern, "impl_named", lambda name: next(i for i in extern.EXTERN_IMPLS if i.name == name))
    monkeypatch.setattr(kernel_select, "impl_named", extern.impl_named)
    target = resolve_target("llvm")
    choices = kernel_select.select_kernels(_ir("mlp", batch_size=1), target, cache=SelectionCache(target.key, tmp_path))
    for choice in choices.values():
        assert choice.choice != "wrong"
        assert "max abs error" in choice.rejected["wrong"]


def test_unknown_kernels_option_is_an_error():
    model, inputs = zoo.get("mlp")
    with pytest.raises(OrcaError, match="unknown kernels option 'cudnn'.*valid: measure, mkl"):
        oc.compile(model, inputs, kernels="cudnn")


def test_kernel_choice_prints_times_and_rejections():
    choice = kernel_select.KernelChoice("linear", "linear", "mkl", "measured", {"mkl": 20.0, "tvm": 70.5},
                                        {"torch": "warm call 240us, >4x the fastest"})
    assert str(choice) == ("%linear (linear) -> mkl [measured: mkl 20.0us, tvm 70.5us] "
                           "[out: torch: warm call 240us, >4x the fastest]")
    assert dataclasses.asdict(choice)["times_us"] == {"mkl": 20.0, "tvm": 70.5}


def test_whole_program_check_offers_the_fastest_extern_for_each_tvm_choice():
    from orca_compiler.lowering.lower import _extern_alternative

    KC = kernel_select.KernelChoice
    choices = {
        "a": KC("a", "linear", "tvm", "measured", {"tvm": 30.0, "mkl": 31.0, "torch": 49.0}),
        "b": KC("b", "linear", "mkl", "measured", {"tvm": 40.0, "mkl": 20.0}),
        "c": KC("c", "lstm.input", "torch", "only candidate"),
    }
    alternative = _extern_alternative(choices)
    assert (alternative["a"].choice, alternative["a"].how) == ("mkl", "whole-program check")
    assert alternative["b"] is choices["b"] and alternative["c"] is choices["c"]
    assert _extern_alternative({"b": choices["b"], "c": choices["c"]}) is None


def test_cache_header_tracks_the_kernel_code(tmp_path, monkeypatch):
    # A converter fixed without a version bump must not stay "rejected" in the cache.
    from orca_compiler.lowering import selection_cache

    target = resolve_target("llvm")
    before = SelectionCache(target.key, tmp_path)
    assert "+" + selection_cache.code_digest() in before.header["orca"]
    monkeypatch.setattr(selection_cache, "code_digest", lambda: "edited")
    after = SelectionCache(target.key, tmp_path)
    assert after.path != before.path
