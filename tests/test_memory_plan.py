"""Liveness, the activation memory plan with buffer reuse, and schedule-memory (issue 8's analyses).

The plan is checked by running every zoo model with each activation copied into its planned arena
slot as soon as it is computed: if two tensors that are alive at once shared bytes, the later one
would overwrite the earlier and the outputs would differ from a normal run."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from orca_compiler import zoo
from orca_compiler.capture import capture
from orca_compiler.lowering.support import keep_op_in_capture
from orca_compiler.memory_plan import liveness, memory_report, plan_activations, run_in_arena
from orca_compiler.pass_manager import PassManager


def _ir(model, inputs, pipeline="O2"):
    ir = capture(model, inputs, keep_op=keep_op_in_capture).ir
    return PassManager(pipeline).run(ir)[0]


@pytest.mark.parametrize("name", zoo.names())
def test_every_zoo_model_runs_correctly_inside_its_planned_arena(name):
    model, inputs = zoo.get(name)
    ir = _ir(model, inputs)
    plan = plan_activations(ir)
    for got, want in zip(run_in_arena(ir, plan, *inputs), ir.run(*inputs)):
        assert torch.equal(got, want)
    assert plan.lower_bound <= plan.peak <= plan.no_reuse
    if name in ("resnet", "transformer"):
        assert plan.peak < plan.no_reuse / 2  # reuse matters on deep graphs


def test_planned_slots_never_overlap_while_both_tensors_live():
    ir = _ir(*zoo.get("resnet"))
    plan = plan_activations(ir)
    placed = [(t, plan.offsets[t.name], plan.offsets[t.name] + t.nbytes) for t in plan.lives]
    for i, (a, a0, a1) in enumerate(placed):
        assert a0 % 64 == 0
        for b, b0, b1 in placed[i + 1:]:
            if a.overlaps(b):
                assert a1 <= b0 or b1 <= a0, (a.name, b.name)


def test_views_keep_their_base_alive_and_outputs_live_to_the_end():
    ir = _ir(*zoo.get("transformer"))
    lives = {t.name: t for t in liveness(ir)}
    steps = len(ir.compute_nodes())
    assert all(not n.name.startswith(("view", "permute", "transpose")) for n in [t.node for t in lives.values()])
    out = ir.output_values()[0]
    assert lives[out.name].last == steps
    assert {t.kind for t in lives.values()} == {"weight", "input", "activation"}


class Branchy(nn.Module):
    """Two wide branches traced in an order that keeps both wide activations alive at once."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 4096), nn.Linear(64, 4096)

    def forward(self, x):
        a, b = torch.relu(self.a(x)), torch.relu(self.b(x))
        return a.sum(-1) + b.sum(-1)


def test_schedule_memory_cuts_the_peak_of_a_branchy_graph_without_changing_results():
    torch.manual_seed(0)
    inputs = (torch.randn(8, 64),)
    ir = _ir(Branchy().eval(), inputs, "O1")
    new, records = PassManager("schedule-memory").run(ir)
    stats = records[0].stats
    assert stats["peak_after"] <= 2 * stats["peak_before"] / 3 + 1024  # 3 wide tensors live -> 2
    for got, want in zip(new.run(*inputs), ir.run(*inputs)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["resnet", "lstm_bidir"])
def test_schedule_memory_never_raises_the_peak(name):
    model, inputs = zoo.get(name)
    ir = _ir(model, inputs)
    new, records = PassManager("schedule-memory").run(ir)
    assert records[0].stats["peak_after"] <= records[0].stats["peak_before"]
    for got, want in zip(new.run(*inputs), ir.run(*inputs)):
        assert torch.equal(got, want)


def test_memory_report_and_cli(capsys):
    from orca_compiler.cli import main

    ir = _ir(*zoo.get("mlp"))
    text = memory_report(ir)
    assert text.splitlines()[1].split()[:2] == ["ram", f"{ir.weight_bytes():,}"]
    assert main(["memory", "mlp"]) == 0
    assert "activation peak (reuse)" in capsys.readouterr().out
