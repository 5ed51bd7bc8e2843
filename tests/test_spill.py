"""place-memory's activation_budget (issue 8): activations homed on the slow tier across the gaps
where nothing reads them, so the fast tier's activation peak fits a budget.

The checks: the gaps found (and the ones refused: a view made before a gap and read after it);
spilled programs equal eager, in the compiled program and in the planned arena (run_in_arena
runs the IR with every fast-tier activation in its planned slot of an arena no larger than the
budget); the spill file moves the bytes the pass planned; a budget too small names its minimum,
which then compiles; weights and activations placed together; save/load.
"""
from __future__ import annotations

import importlib
import re
import weakref

import pytest
import torch
from torch import nn

import orca_compiler
from orca_compiler import zoo
from orca_compiler.capture import capture
from orca_compiler.errors import PassError, PassInputError, TargetError
from orca_compiler.lowering import spilling, spilling_cuda
from orca_compiler.lowering.spilling import spill_file_of
from orca_compiler.lowering.streaming import stream_of
from orca_compiler.lowering.support import keep_op_in_capture
from orca_compiler.memory_plan import liveness, memory_report, plan_activations, run_in_arena
from orca_compiler.ops.placement import RELOAD, SPILL
from orca_compiler.pass_base import PassContext
from orca_compiler.pass_manager import PassManager
from orca_compiler.spill_plan import spill_gaps

from conftest import assert_outputs_close


def _hourglass():
    """zoo.get("hourglass"): a full-resolution skip around a wide low-resolution middle, where the
    activation peak is while the skip is idle."""
    return zoo.get("hourglass")


def _ir(model, inputs, pipeline, ctx=None):
    return PassManager(pipeline).run(capture(model, inputs, keep_op=keep_op_in_capture).ir, ctx)


def _eager(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def _place_stats(compiled) -> dict:
    return next(p.stats for p in compiled.report.passes if p.name == "place-memory")


def test_gaps_are_the_idle_spans_of_activations_and_a_view_across_one_refuses_it():
    model, inputs = _hourglass()
    ir, _ = _ir(model, inputs, "O1")
    skip = [g for g in spill_gaps(ir) if g.nbytes == 2 * 8 * 64 * 64 * 4]
    assert skip, "the skip connection's idle span is a gap"
    steps = {n: i for i, n in enumerate(ir.compute_nodes())}
    for gap in skip:
        readers = [steps[u] for u in gap.node.users]
        assert gap.after in readers + [steps[gap.node]] and gap.before in readers
        assert not any(gap.after < r < gap.before for r in readers)

    class Across(nn.Module):  # y is idle while z is computed, then read again: directly or via a view
        def __init__(self, view: bool):
            super().__init__()
            self.view = view

        def forward(self, x):
            y = torch.relu(x)
            t = y.transpose(0, 1) if self.view else y
            z = torch.tanh(torch.sigmoid(torch.exp(y * 2)))
            return z, t.sum(0)

    for view in (False, True):
        ir, _ = _ir(Across(view), (torch.randn(8, 8),), "O1")
        relu = next(n for n in ir.compute_nodes() if "relu" in n.name)
        # a view made before the gap and read after it would keep y's bytes alive: no gap then
        assert bool([g for g in spill_gaps(ir) if g.node is relu]) is not view


@pytest.mark.parametrize("pipeline", ["O1", "O2"])
def test_spilled_hourglass_fits_its_budget_and_matches_eager(pipeline):
    model, inputs = _hourglass()
    before = plan_activations(_ir(model, inputs, pipeline)[0]).peak
    budget = before * 90 // 100
    place = f"{pipeline},place-memory{{activation_budget={budget}}}"
    ir, _ = _ir(model, inputs, place)
    plan = plan_activations(ir)
    assert plan.peak <= budget < before
    spills = [n for n in ir.compute_nodes() if n.target is SPILL]
    assert spills and len(spills) == len([n for n in ir.compute_nodes() if n.target is RELOAD])
    assert all(n.meta["orca_annotations"]["tier"] == "disk" for n in spills)
    # the plan is valid: every fast-tier activation in its slot of an arena within the budget
    assert torch.equal(run_in_arena(ir, plan, *inputs)[0], ir.run(*inputs)[0])
    assert {t.kind for t in liveness(ir) if t.node in spills} == {"spilled"}

    compiled = orca_compiler.compile(model, inputs, pipeline=place)
    stats = _place_stats(compiled)
    assert stats["activation_peak"] <= budget < stats["activation_peak_before"] == before
    assert compiled.report.fallbacks == [] and compiled.report.partitions == 1  # spills run inside the TVM program
    spill_file = spill_file_of(compiled)
    for _ in range(2):  # the file's regions are reused call after call
        spill_file.reset_counters()
        assert_outputs_close(_eager(model, inputs), compiled(*inputs))
        moved = spill_file.stats()
        assert moved["bytes_spilled"] == moved["bytes_reloaded"] == stats["spilled_bytes"] > 0
        assert moved["spills"] == moved["reloads"] == stats["spilled"]
    assert moved["file_bytes"] <= stats["spilled_bytes"]


def _minimum_in(exc: PassError) -> int:
    assert isinstance(exc.__cause__, PassInputError)
    return int(re.search(r"minimum feasible activation budget is (\d+) bytes", str(exc)).group(1))


@pytest.mark.parametrize("name,weights", [("transformer", ""), ("hourglass", ""), ("mlp", "budget=50%,")])
def test_a_budget_too_small_names_the_minimum_which_compiles(name, weights):
    """mlp with its weights at 50%: its layers are split into row blocks, whose results and their
    concatenation are activations too, so the minimum is above the unsplit program's peak."""
    model, inputs = _hourglass() if name == "hourglass" else zoo.get(name)
    unspilled = plan_activations(_ir(model, inputs, "O2")[0]).peak
    with pytest.raises(PassError, match=r"activation budget of 1,000 bytes is too small: at %\w+ \(step \d+\)") as info:
        _ir(model, inputs, f"O2,place-memory{{{weights}activation_budget=1000}}")
    minimum = _minimum_in(info.value)
    assert minimum < unspilled if not weights else minimum > unspilled
    compiled = orca_compiler.compile(model, inputs, pipeline=f"O2,place-memory{{{weights}activation_budget={minimum}}}")
    assert _place_stats(compiled)["activation_peak"] <= minimum
    assert plan_activations(compiled.ir).peak <= minimum
    assert_outputs_close(_eager(model, inputs), compiled(*inputs))


def test_weights_and_activations_placed_together_save_and_load(tmp_path):
    model, inputs = zoo.get("transformer")
    pipeline = "O1,place-memory{budget=50%,activation_budget=49152}"
    compiled = orca_compiler.compile(model, inputs, pipeline=pipeline)
    stats = _place_stats(compiled)
    assert stats["streamed"] > 0 and stats["spilled"] > 0
    assert plan_activations(compiled.ir).peak <= stats["activation_peak"] <= 49152
    assert_outputs_close(_eager(model, inputs), compiled(*inputs))
    stream = stream_of(compiled)
    stream.settle()
    stream.pool.reset_counters()
    spill_file_of(compiled).reset_counters()
    assert_outputs_close(_eager(model, inputs), compiled(*inputs))
    assert stream.pool.bytes_moved == stats["bytes_moved"]
    assert spill_file_of(compiled).stats()["bytes_spilled"] == stats["spilled_bytes"]
    report = memory_report(compiled.ir)
    assert f"spilled activations: {stats['spilled']}" in report

    compiled.save(tmp_path / "t.orca")
    loaded = orca_compiler.load(tmp_path / "t.orca")
    assert_outputs_close(_eager(model, inputs), loaded(*inputs))
    assert spill_file_of(loaded).stats()["bytes_spilled"] == stats["spilled_bytes"]


def test_bad_activation_budgets_are_named():
    model, inputs = zoo.get("transformer")
    with pytest.raises(PassError, match="activation_budget=lots: not a size"):
        _ir(model, inputs, "O1,place-memory{activation_budget=lots}")
    # a dynamic batch: the spill file's regions would be sized for one batch, so nothing is spilled
    dynamic = capture(model, inputs, keep_op=keep_op_in_capture, dynamic_shapes=({0: torch.export.Dim("B")},)).ir
    with pytest.raises(PassError, match="minimum feasible activation budget is 57344 bytes"):
        PassManager("O1,place-memory{activation_budget=49152}").run(dynamic)


def test_spills_compile_for_cuda_homed_on_the_host_and_calling_without_a_gpu_is_a_clear_error():
    model, inputs = zoo.get("transformer")
    compiled = orca_compiler.compile(model, inputs, target="cuda",
                                     pipeline="O1,place-memory{budget=1M,activation_budget=49152}")
    stats = _place_stats(compiled)
    assert stats["spilled"] > 0 and stats["activation_peak"] <= 49152
    spills = [n for n in compiled.ir.compute_nodes() if n.target is SPILL]
    assert spills and all(n.meta["orca_annotations"]["tier"] == "host" for n in spills)
    assert compiled.report.fallbacks == []
    spill_file = spill_file_of(compiled)
    assert isinstance(spill_file, spilling_cuda.CudaSpillFile) and spill_file._backend is None  # no torch.cuda yet
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(TargetError, match="no cuda device"):
        compiled(*inputs)


class FakeSpillDevice:
    """CPU memory standing in for the device and its pinned host memory, with a side stream that
    runs a spill's copy only when the compute stream waits for its event (the latest a real GPU
    may run it). Host calls are logged in order."""

    def __init__(self):
        self.log: list[tuple] = []
        self.spill_file = None  # the CudaSpillFile using this device, set by the test
        self.pending: dict[int, tuple] = {}  # event -> (region, weakref to the spilled tensor)
        self.last_event = 0

    def pinned_buffer(self, nbytes):
        self.log.append(("pinned", nbytes))
        return torch.full((max(nbytes, 1),), 0xAB, dtype=torch.uint8)  # garbage until spilled into

    def to_host(self, region, x):
        assert region.shape == x.shape and region.dtype == x.dtype
        self.last_event += 1
        self.pending[self.last_event] = (region, weakref.ref(x))
        self.log.append(("to_host", region.data_ptr(), self.last_event))
        return self.last_event

    def wait(self, event):
        region, source = self.pending.pop(event)
        x = source()
        # TVM reuses a tensor's bytes once nothing holds it: the spill file must hold it until here
        assert x is not None and any(held is x for held, _ in self.spill_file._in_flight), \
            "a spilled tensor was let go before the compute stream waited for its copy"
        region.copy_(x)
        self.log.append(("wait", event))

    def to_device(self, region):
        assert all(r.data_ptr() != region.data_ptr() for r, _ in self.pending.values()), \
            "a reload read a region before the compute stream waited for the copy into it"
        self.log.append(("to_device", region.data_ptr()))
        return region.clone()


def _log_spill_returns(parent, spill_file, device) -> None:
    """Log ("spill returned", the copy it issued, the copies then pending) after each spill node of
    `parent` runs."""
    def spill(*args):
        region = spill_file.spill(*args)
        device.log.append(("spill returned", device.last_event, tuple(device.pending)))
        return region

    nodes = [n for n in parent.graph.nodes if n.op == "call_function" and n.target == spill_file.spill]
    assert nodes
    for node in nodes:
        node.target = spill
    parent.recompile()


def test_cuda_spills_against_a_fake_device(monkeypatch):
    """Bound as for a CUDA build (spill and reload as host ops between partitions, a
    CudaSpillFile): outputs equal eager over calls, the pinned buffer is made once and is no larger
    than the bytes spilled, each reload reads what a spill of the same call wrote, and the copies
    are the pass's."""
    device = FakeSpillDevice()
    monkeypatch.setattr(importlib.import_module("orca_compiler.lowering.lower"), "vm_op_impl", lambda node, kind: None)
    monkeypatch.setattr(spilling, "program_kinds", lambda parent: {"cuda"})
    monkeypatch.setattr(spilling_cuda, "make_backend", lambda: device)
    model, inputs = _hourglass()
    budget = plan_activations(_ir(model, inputs, "O1")[0]).peak * 90 // 100
    compiled = orca_compiler.compile(model, inputs, pipeline=f"O1,place-memory{{activation_budget={budget}}}",
                                     kernels="tvm", cache="off", eager_guard=False)
    stats = _place_stats(compiled)
    spill_file = spill_file_of(compiled)
    assert isinstance(spill_file, spilling_cuda.CudaSpillFile) and compiled.report.partitions >= 2
    device.spill_file = spill_file
    _log_spill_returns(compiled.program, spill_file, device)
    for _ in range(2):
        spill_file.reset_counters()
        start = len(device.log)
        assert_outputs_close(_eager(model, inputs), compiled(*inputs))
        moved = spill_file.stats()
        assert moved["bytes_spilled"] == moved["bytes_reloaded"] == stats["spilled_bytes"] > 0
        assert moved["spills"] == moved["reloads"] == stats["spilled"] and moved["device"] == "cuda"
        written, log = set(), device.log[start:]
        for kind, *rest in log:
            if kind == "to_host":
                written.add(rest[0])
            elif kind == "to_device":
                assert rest[0] in written, "a reload read a region no spill of this call wrote"
        assert sorted(e[1] for e in log if e[0] == "wait") == sorted(e[2] for e in log if e[0] == "to_host")
        # each copy overlaps the partition after its spill: the spill returns with it still pending
        returns = [e for e in log if e[0] == "spill returned"]
        assert len(returns) == stats["spilled"] and all(copy in pending for _, copy, pending in returns)
    assert [e for e in device.log if e[0] == "pinned"] == [("pinned", spill_file.size)]
    assert spill_file.size <= stats["spilled_bytes"]
