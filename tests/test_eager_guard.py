"""The eager guard: where the model in eager PyTorch beats the compiled program, compile() runs eager
and says so. Timings are replaced by fixed numbers here (never assert on a real timing)."""
from __future__ import annotations

import pytest
import torch

import orca_compiler as oc
from orca_compiler import eager_guard, zoo
from orca_compiler.runtime import TVMGraphModule


@pytest.fixture(autouse=True)
def guard_on(monkeypatch):
    monkeypatch.setenv(eager_guard.ENV, "on")


def _fake_times(monkeypatch, compiled_s, eager_s):
    calls = []
    monkeypatch.setattr(eager_guard, "time_both", lambda program, eager, inputs: calls.append(1) or (compiled_s, eager_s))
    return calls


def test_eager_runs_where_it_is_faster_and_the_report_says_so(monkeypatch):
    calls = _fake_times(monkeypatch, 2e-4, 1e-4)
    model, inputs = zoo.get("mlp", batch_size=1)
    compiled = oc.compile(model, inputs, kernels="torch", cache="on")
    assert calls and compiled.report.eager_guard.chose == "eager"
    assert isinstance(compiled.program, eager_guard.EagerProgram) and compiled.program.model is model
    assert "eager guard: compiled 0.200 ms vs eager 0.100 ms: running the model in eager PyTorch" in str(compiled.report)
    assert "not cached: the eager guard chose eager PyTorch" in str(compiled.report.cache.events)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("compiled_s,eager_s,chose", [(1e-4, 2e-4, "compiled"), (0.95e-4, 1e-4, "compiled"),
                                                      (0.97e-4, 1e-4, "eager"), (1e-4, 1e-4, "eager"),
                                                      (1.0e-4, 0.97e-4, "eager")])
def test_the_compiled_program_stays_only_where_it_is_faster_by_the_margin(monkeypatch, compiled_s, eager_s, chose):
    """Within eager_guard.MARGIN (5%) of eager, eager runs: that close, the timing is a coin flip."""
    _fake_times(monkeypatch, compiled_s, eager_s)
    model, inputs = zoo.get("mlp", batch_size=1)
    compiled = oc.compile(model, inputs, kernels="torch", cache="off")
    assert compiled.report.eager_guard.chose == chose
    assert isinstance(compiled.program, TVMGraphModule if chose == "compiled" else eager_guard.EagerProgram)


def test_the_guard_times_the_modules_the_user_calls(monkeypatch):
    """Both sides are CompiledModules called with the example inputs; the eager one calls the model
    itself with those arguments, and the guard's calls are not counted as the user's."""
    timed = []

    def fake(compiled, fallback, inputs):
        timed.append((compiled, fallback, inputs))
        with torch.no_grad():
            compiled(*inputs), fallback(*inputs)
        return 2e-4, 1e-4

    monkeypatch.setattr(eager_guard, "time_both", fake)
    model, inputs = zoo.get("mlp", batch_size=1)
    compiled = oc.compile(model, inputs, kernels="torch", cache="off")
    (timed_compiled, fallback, timed_inputs), = timed
    assert fallback is compiled and isinstance(timed_compiled.program, TVMGraphModule)
    assert timed_inputs == inputs and compiled.l1_calls[0] == 0
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(args))
    with torch.no_grad():
        out = compiled(*inputs)
    assert len(calls) == 1 and calls[0][0] is inputs[0]  # the user's tensor, not a flattened copy
    torch.testing.assert_close(out, model(*inputs))
    with pytest.raises(oc.InputMismatchError, match="shape"):  # still checked against the signature
        compiled(torch.randn(3, 512))


def test_eager_program_keeps_nested_inputs_and_outputs(monkeypatch):
    _fake_times(monkeypatch, 2e-4, 1e-4)
    model, inputs = zoo.get("lstm", batch_size=2)  # returns (logits, (h_n, c_n))
    compiled = oc.compile(model, inputs, kernels="torch", cache="off")
    assert isinstance(compiled.program, eager_guard.EagerProgram)
    with torch.no_grad():
        got, want = compiled(*inputs), model(*inputs)
    torch.testing.assert_close(got, want)


def test_off_by_option_and_for_dynamic_shapes(monkeypatch):
    calls = _fake_times(monkeypatch, 2e-4, 1e-4)
    model, inputs = zoo.get("mlp", batch_size=2)
    assert oc.compile(model, inputs, kernels="torch", cache="off", eager_guard=False).report.eager_guard is None
    dynamic = oc.compile(model, inputs, kernels="torch", cache="off", dynamic_shapes=({0: torch.export.Dim("B")},))
    assert dynamic.report.eager_guard is None and not calls
