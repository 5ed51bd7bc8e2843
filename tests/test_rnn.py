"""decompose-rnn and the recurrence kernels: every LSTM/GRU flavour equals eager, the time loop is
a loop (the program does not grow with T), and a trained model keeps its accuracy."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import orca_compiler as oc
from orca_compiler import trained
from conftest import assert_outputs_close
from orca_compiler.capture import capture
from orca_compiler.lowering.relax_build import import_relax
from orca_compiler.lowering.support import keep_op_in_capture
from orca_compiler.pass_manager import PassManager
from orca_compiler.printer import op_name

FLAVOURS = list(itertools.product(["lstm", "gru"], [False, True], [False, True], [False, True]))


def _flavour(cell: str, bidirectional: bool, batch_first: bool, with_state: bool, steps: int = 7, batch: int = 3):
    """A 2-layer RNN and its inputs; with_state passes initial states (the LSTM's as a tuple)."""
    torch.manual_seed(0)
    rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell](6, 12, num_layers=2, bidirectional=bidirectional,
                                                 batch_first=batch_first).eval()
    x = torch.randn(batch, steps, 6) if batch_first else torch.randn(steps, batch, 6)
    if not with_state:
        return rnn, (x,)
    h0 = torch.randn(2 * (2 if bidirectional else 1), batch, 12)
    return rnn, (x, (h0, torch.randn_like(h0)) if cell == "lstm" else h0)


def _ops(ir) -> list[str]:
    return [op_name(n) for n in ir.compute_nodes()]


@pytest.mark.parametrize("cell,bidirectional,batch_first,with_state", FLAVOURS)
def test_every_flavour_equals_eager(cell, bidirectional, batch_first, with_state):
    model, inputs = _flavour(cell, bidirectional, batch_first, with_state)
    compiled = oc.compile(model, inputs, pipeline="O1")
    assert compiled.report.fallbacks == []
    ops = _ops(compiled.ir)
    assert f"{cell}.input" not in ops
    assert ops.count(f"orca.{cell}_scan") == 2 * (2 if bidirectional else 1)
    assert ops.count("linear") == 2  # one hoisted input GEMM per layer, shared by both directions
    assert_outputs_close(model(*inputs), compiled(*inputs))


def test_pass_ir_shape_and_idempotence():
    model, inputs = _flavour("lstm", False, True, False, steps=5, batch=2)
    ir = capture(model, inputs, keep_op=keep_op_in_capture).ir
    ir, records = PassManager("fold-constants,decompose-rnn").run(ir)
    assert records[-1].stats == {"lstm": 1, "gru": 0, "skipped": 0}
    scans = [n for n in ir.compute_nodes() if op_name(n) == "orca.lstm_scan"]
    xproj = scans[0].args[0]
    assert op_name(xproj) == "linear" and list(xproj.meta["val"].shape) == [2, 5, 48]  # [B, T, 4H], all steps
    assert list(scans[0].args[1].meta["val"].shape) == [12, 48]  # W_hh transposed
    assert scans[0].args[4:] == (False, 0, True)  # forward, column 0, batch_first
    assert_outputs_close(tuple(pytree.tree_leaves(model(*inputs))), ir.run(*inputs))
    _, again = PassManager("decompose-rnn").run(ir)
    assert again[0].modified is False


def test_lstm_with_projections_stays_whole_and_runs():
    torch.manual_seed(0)
    model = nn.LSTM(6, 12, num_layers=2, proj_size=4).eval()
    inputs = (torch.randn(5, 2, 6),)
    compiled = oc.compile(model, inputs, pipeline="O1")
    assert next(r for r in compiled.report.passes if r.name == "decompose-rnn").stats["skipped"] == 1
    assert "lstm.input" in _ops(compiled.ir)
    assert_outputs_close(model(*inputs), compiled(*inputs))


def _relax_lines(steps: int) -> int:
    model, inputs = _flavour("lstm", True, False, False, steps=steps)
    ir = capture(model, inputs, keep_op=keep_op_in_capture).ir
    ir, _ = PassManager("O1").run(ir)
    return len(import_relax(ir.gm).script().splitlines())


def test_program_does_not_grow_with_sequence_length():
    # TVM's importer unrolls aten.lstm.input: 785 Relax lines at T=8, 5,713 at T=64.
    assert _relax_lines(8) == _relax_lines(512)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_trained_model_keeps_its_accuracy(cell):
    task = {"lstm": trained.sequence_lstm, "gru": trained.sequence_gru}[cell]()  # 2 layers, trained once
    model, x, y = task.model, task.x_test, task.y_test
    eager = model(x)
    accuracy = (eager.argmax(1) == y).float().mean().item()
    assert accuracy > 0.85, f"training did not learn the task ({accuracy:.2f})"
    compiled = oc.compile(model, (x,), pipeline="O1")
    assert compiled.report.fallbacks == []
    got = compiled(x)
    assert (got.argmax(1) == y).float().mean().item() == pytest.approx(accuracy, abs=1 / len(y))
    assert_outputs_close(eager, got)


def test_zoo_sequence_length():
    _, (x,) = oc.zoo.get("lstm", batch_size=1, seq_len=128)  # batch_first
    assert tuple(x.shape) == (1, 128, 32)
    _, (x,) = oc.zoo.get("gru", batch_size=2, seq_len=40)  # seq-first
    assert tuple(x.shape) == (40, 2, 32)
    with pytest.raises(oc.OrcaError, match="no sequence length"):
        oc.zoo.get("mlp", seq_len=8)


@pytest.mark.parametrize("name,time_dim", [("lstm_bidir", 0), ("gru_bidir", 1), ("lstm", 1)])
def test_variable_sequence_length_without_recompiling(name, time_dim):
    from torch.export import Dim

    model, (x,) = oc.zoo.get(name)
    compiled = oc.compile(model, (x,), dynamic_shapes=({time_dim: Dim("T", min=1, max=1 << 20)},))
    assert compiled.report.fallbacks == []
    executables = list(compiled.executables)
    for steps in (1, 5, 16, 61):
        shape = list(x.shape)
        shape[time_dim] = steps
        longer = torch.randn(shape)
        assert_outputs_close(model(longer), compiled(longer))
    assert compiled.executables == executables  # one program for every length
    wrong_batch = list(x.shape)
    wrong_batch[1 - time_dim] += 1
    with pytest.raises(oc.InputMismatchError, match=r"\* = any size"):
        compiled(torch.randn(wrong_batch))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("batch", [6, 8, 12])  # rows stepped in groups of 2, 4, 4 (and in parallel)
def test_batch_row_groups_equal_eager(cell, batch):
    model, inputs = _flavour(cell, True, True, True, steps=9, batch=batch)
    compiled = oc.compile(model, inputs, pipeline="O1")
    assert compiled.report.fallbacks == []
    assert_outputs_close(model(*inputs), compiled(*inputs))
