"""Structured pruning on real trained models: accuracy before / after pruning and after a short
fine-tune, and the compiled pruned model predicts what the eager pruned model predicts.
(The full 30/50/70% table is tools/prune_accuracy.py's, in docs/pruning.md.)"""
from __future__ import annotations

import time

import pytest
import torch

import orca_compiler as oc
from orca_compiler import trained

BATCH = 64


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread trains them as fast as two and is not slowed 50x when the
    other core is busy (CI shares its 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _prune_and_tune(model_name: str, pipeline: str, epochs: int, calibrate: bool = False):
    base = getattr(trained, model_name)()
    inputs = base.example_inputs(BATCH)
    calibration = base.batches(BATCH)[:2] if calibrate else None
    pruned, report = oc.prune(base.model, inputs, pipeline, calibration_data=calibration,
                              calibration_loss=base.loss if calibrate else None)
    pruned_accuracy = base.accuracy(pruned, BATCH)
    start = time.perf_counter()
    oc.finetune(pruned, base.loss, base.batches(BATCH), epochs=epochs, lr=1e-3)
    print(f"{model_name}: fine-tune {time.perf_counter() - start:.1f} s")
    return base, inputs, pruned, report, pruned_accuracy, base.accuracy(pruned, BATCH)


def test_digits_cnn_at_half_the_channels_recovers_with_a_short_finetune():
    base, inputs, pruned, report, pruned_acc, tuned_acc = _prune_and_tune(
        "digits_cnn", "prune-channels{ratio=0.5}", epochs=2)
    assert base.test_accuracy > 0.97
    before, after = report.weight_bytes
    assert after < 0.45 * before
    assert pruned_acc > 0.9  # measured 0.961
    assert tuned_acc > base.test_accuracy - 0.03  # measured 0.981 from 0.991
    compiled = oc.compile(pruned, inputs, pipeline="O2")
    assert abs(base.accuracy(compiled, BATCH) - tuned_acc) <= 1 / len(base.y_test)


def test_lstm_hidden_units_pruned_by_taylor_recover_with_a_short_finetune():
    base, inputs, pruned, report, pruned_acc, tuned_acc = _prune_and_tune(
        "sequence_lstm", "prune-channels{ratio=0.3,criterion=taylor}", epochs=1, calibrate=True)
    assert "hidden units of rnn.weight_hh_l0" in "\n".join(report.channel_groups)
    assert report.weight_bytes[1] < 0.6 * report.weight_bytes[0]
    assert tuned_acc > base.test_accuracy - 0.05 and tuned_acc > pruned_acc
