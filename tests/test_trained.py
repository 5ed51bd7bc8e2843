"""The trained models: they reach their stated accuracy, have the structure pruning must handle,
are deterministic, leave the caller's RNG alone, and each call gets its own copy."""
from __future__ import annotations

import torch

from orca_compiler import trained
from orca_compiler.capture import capture
from orca_compiler.lowering.support import keep_op_in_capture
from orca_compiler.printer import op_name


def _ops(model, inputs) -> list[str]:
    return [op_name(n) for n in capture(model, inputs, keep_op=keep_op_in_capture).ir.compute_nodes()]


def test_digits_cnn_accuracy_and_structure():
    task = trained.digits_cnn()
    assert task.test_accuracy >= 0.95
    assert task.accuracy(task.model) == task.test_accuracy and not task.model.training
    assert (len(task.y_train), len(task.y_test)) == (1257, 540) and tuple(task.x_test.shape[1:]) == (1, 8, 8)
    ops = _ops(task.model, task.example_inputs(8))
    assert {"add.Tensor", "cat", "linear"} <= set(ops) and ops.count("conv2d") == 4


def test_sequence_lstm_accuracy_and_outputs():
    task = trained.sequence_lstm()
    assert task.test_accuracy >= 0.9
    logits = task.model(task.x_test[:5])
    assert isinstance(logits, torch.Tensor) and tuple(logits.shape) == (5, 4)  # logits only, no state
    assert "orca.lstm" in _ops(task.model, task.example_inputs(8))


def test_batches_accuracy_in_chunks_and_loss_of_a_tuple():
    task = trained.digits_cnn()
    batches = task.batches(64)
    assert len(batches) == 1257 // 64 and all(len(x) == len(y) == 64 for x, y in batches)
    assert not torch.equal(batches[0][1], task.y_train[:64])  # shuffled
    assert task.accuracy(task.model, batch_size=64) == task.test_accuracy  # last chunk padded
    x, y = batches[0]
    assert torch.equal(task.loss((task.model(x),), y), task.loss(task.model(x), y))


def test_copies_are_independent_and_training_is_deterministic():
    first, second = trained.digits_cnn(), trained.digits_cnn()
    assert first.model is not second.model
    with torch.no_grad():
        first.model.fc.weight.zero_()
    assert trained.digits_cnn().model.fc.weight.abs().sum() > 0
    rng = torch.get_rng_state()
    retrained = trained._digits_cnn.__wrapped__(0)  # noqa: SLF001  (the uncached training)
    assert torch.equal(torch.get_rng_state(), rng)
    for (name, a), b in zip(second.model.state_dict().items(), retrained.model.state_dict().values()):
        assert torch.equal(a, b), name
