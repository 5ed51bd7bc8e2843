"""finetune: gradients of orca.lstm / orca.gru equal torch's; fine-tuning lowers the loss of a
damaged model on real data; in a captured graph it trains the weights, never the BatchNorm
statistics, and leaves plain buffers that capture again; bad inputs raise FinetuneError."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import orca_compiler as oc
from orca_compiler import trained
from orca_compiler.capture import capture
from orca_compiler.finetune import FinetuneError, finetune, graph_weight_targets
from orca_compiler.ir import sanitize_name
from orca_compiler.lowering.support import keep_op_in_capture
from orca_compiler.ops.rnn import GRU, LSTM
from orca_compiler.printer import op_name

BATCH = 64


def _capture_gm(model: nn.Module, inputs: tuple) -> torch.fx.GraphModule:
    return capture(model, inputs, keep_op=keep_op_in_capture).ir.gm


# -- autograd of the whole-RNN ops --------------------------------------------------------------

@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional,batch_first", [(False, False), (True, False), (True, True)])
def test_rnn_op_gradients_equal_torch(cell, bidirectional, batch_first):
    torch.manual_seed(0)
    rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell](5, 7, num_layers=2, bidirectional=bidirectional,
                                                 batch_first=batch_first)
    x = torch.randn(3, 6, 5) if batch_first else torch.randn(6, 3, 5)
    h0 = torch.randn(2 * (2 if bidirectional else 1), 3, 7)
    state = [h0, torch.randn_like(h0)] if cell == "lstm" else [h0]
    leaves = [t.requires_grad_() for t in (x, *state)] + list(rnn.parameters())
    flags = (True, 2, 0.0, False, bidirectional, batch_first)
    with torch.enable_grad():
        if cell == "lstm":
            out, (h, c) = rnn(x, tuple(state))
            expected = (out, h, c)
            got = LSTM(x, state, list(rnn._flat_weights), *flags)
        else:
            expected = rnn(x, h0)
            got = GRU(x, h0, list(rnn._flat_weights), *flags)
        weights = [torch.randn_like(t) for t in expected]
        want = torch.autograd.grad(sum((t * w).sum() for t, w in zip(expected, weights)), leaves)
        have = torch.autograd.grad(sum((t * w).sum() for t, w in zip(got, weights)), leaves, retain_graph=True)
        only_output = torch.autograd.grad(got[0].sum(), leaves[0], allow_unused=True)  # states unused
    for a, b in zip(have, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert only_output[0] is not None and only_output[0].shape == x.shape


# -- fine-tuning an nn.Module --------------------------------------------------------------------

def _damage(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.mul_(1 + 1.5 * torch.randn(module.weight.shape, generator=generator))


def _mean_loss(task: trained.TrainedModel, module) -> float:
    with torch.no_grad():
        return sum(task.loss(module(x), y).item() for x, y in task.batches(BATCH)) / len(task.batches(BATCH))


def test_finetune_recovers_a_damaged_digits_model():
    task = trained.digits_cnn()
    model = task.model
    _damage(model)
    statistics = {name: t.clone() for name, t in model.named_buffers()}
    loss_before, accuracy_before = _mean_loss(task, model), task.accuracy(model)
    report = finetune(model, task.loss, task.batches(BATCH), epochs=2, lr=3e-3)
    loss_after, accuracy_after = _mean_loss(task, model), task.accuracy(model)
    assert loss_after < 0.5 * loss_before
    assert accuracy_after > accuracy_before + 0.05 and accuracy_after >= 0.9, (accuracy_before, accuracy_after)
    steps_per_epoch = len(task.y_train) // BATCH
    assert report.steps == 2 * steps_per_epoch and len(report.epoch_losses) == 2
    assert report.epoch_losses[1] < report.epoch_losses[0]
    params = dict(model.named_parameters())
    assert report.trained == list(params) and report.trained_count == len(params)
    assert report.trained_bytes == sum(p.numel() * 4 for p in params.values())
    assert not model.training  # eval mode kept: BatchNorm statistics frozen
    for name, tensor in model.named_buffers():
        assert torch.equal(tensor, statistics[name]), name
    assert "2 epochs" in str(report)


def test_max_steps_and_frozen_parameters():
    task = trained.digits_cnn()
    model = task.model
    model.fc.requires_grad_(False)
    fc = model.fc.weight.clone()
    report = finetune(model, task.loss, task.batches(BATCH), epochs=3, max_steps=4, optimizer="sgd")
    assert report.steps == 4 and len(report.epoch_losses) == 1
    assert "fc.weight" not in report.trained and torch.equal(model.fc.weight, fc)


# -- fine-tuning a captured graph whose weights are buffers ------------------------------------

def test_graph_module_trains_weights_not_batchnorm_statistics():
    task = trained.digits_cnn()
    ir = capture(task.model, task.example_inputs(BATCH), keep_op=keep_op_in_capture).ir
    gm, untouched = ir.gm, ir.copy()  # the copy shares the weight tensors: none may change in place
    before = {name: t.clone() for name, t in gm.named_buffers()}
    weights = graph_weight_targets(gm)
    assert len(weights) == 14 and not any("running" in w for w in weights)  # 4 conv, 4 BN x2, fc x2
    report = finetune(gm, task.loss, task.batches(BATCH), max_steps=10, lr=1e-2)
    assert report.trained == weights and report.steps == 10
    assert list(gm.parameters()) == []
    for name, tensor in gm.named_buffers():
        assert not tensor.requires_grad and name in gm._buffers
        changed = not torch.equal(tensor, before[name])
        assert changed == (name in weights), name  # running_mean/var, num_batches_tracked unchanged
        assert torch.equal(untouched.weight(name), before[name]), f"{name} was mutated in place"
    recaptured = capture(gm, task.example_inputs(BATCH), keep_op=keep_op_in_capture).ir
    torch.testing.assert_close(recaptured.run(*task.example_inputs(BATCH)), gm(*task.example_inputs(BATCH)))


def test_graph_module_with_orca_lstm_trains_like_the_eager_model():
    task, eager = trained.sequence_lstm(), trained.sequence_lstm().model
    gm = _capture_gm(task.model, task.example_inputs(BATCH))
    assert "orca.lstm" in [op_name(n) for n in gm.graph.nodes if n.op == "call_function"]
    before = {name: t.clone() for name, t in gm.named_buffers()}
    options = dict(epochs=1, max_steps=3, optimizer="sgd", lr=0.05)
    report = finetune(gm, task.loss, task.batches(BATCH), **options)
    finetune(eager, task.loss, task.batches(BATCH), **options)
    assert report.trained == [sanitize_name(name) for name, _ in eager.named_parameters()]
    for name, param in eager.named_parameters():  # the same three steps: orca.lstm's gradients are torch's
        trained_tensor = getattr(gm, sanitize_name(name))
        assert not torch.equal(trained_tensor, before[sanitize_name(name)]), name
        torch.testing.assert_close(trained_tensor, param, rtol=1e-5, atol=1e-5)
    _capture_gm(gm, task.example_inputs(BATCH))  # plain buffers again: capture works


def test_zoo_graph_module_with_layer_norm_and_embedding():
    model, inputs = oc.zoo.get("transformer")
    gm = _capture_gm(model, inputs)
    targets = graph_weight_targets(gm)
    assert "embed_weight" in targets and "norm_weight" in targets and "pos" not in targets  # pos: an add
    target = torch.randint(0, 10, (inputs[0].shape[0],))
    report = finetune(gm, lambda out, y: nn.functional.cross_entropy(out[0], y), [(inputs, target)], epochs=2)
    assert report.steps == 2 and report.trained == targets


# -- errors --------------------------------------------------------------------------------------

def test_nothing_to_train():
    with pytest.raises(FinetuneError, match="no trainable tensors"):
        finetune(nn.ReLU(), nn.functional.mse_loss, [(torch.randn(2), torch.randn(2))])
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(oc.OrcaError, match="no trainable tensors"):
        finetune(frozen, nn.functional.mse_loss, [(torch.randn(2), torch.randn(2))])


def test_loss_not_a_scalar_and_bad_data():
    model = nn.Linear(3, 2)
    data = [(torch.randn(4, 3), torch.randint(0, 2, (4,)))]
    per_sample = lambda out, y: nn.functional.cross_entropy(out, y, reduction="none")  # noqa: E731
    with pytest.raises(FinetuneError, match=r"scalar float tensor, got a tensor of shape \[4\]"):
        finetune(model, per_sample, data)
    with pytest.raises(FinetuneError, match="does not depend on any trained tensor"):
        finetune(model, lambda out, y: nn.functional.cross_entropy(out.detach(), y), data)
    with pytest.raises(FinetuneError, match="no batches in epoch 1"):
        finetune(model, nn.functional.cross_entropy, [])
    with pytest.raises(FinetuneError, match="no batches in epoch 2.*generator"):
        finetune(model, nn.functional.cross_entropy, iter(data), epochs=2)
    with pytest.raises(FinetuneError, match=r"pair \(inputs, target\)"):
        finetune(model, nn.functional.cross_entropy, [torch.randn(4, 3)])
    with pytest.raises(FinetuneError, match="unknown optimizer 'lbfgs'"):
        finetune(model, nn.functional.cross_entropy, data, optimizer="lbfgs")


def test_fused_ops_have_no_gradient():
    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.randn(2, 3))

        def forward(self, x):
            return torch.ops.orca.linear_epilogue.default(x, self.w, None, None, "none", [])

    gm = torch.fx.symbolic_trace(Fused())
    with pytest.raises(FinetuneError, match="orca::linear_epilogue.*has no gradient"):
        finetune(gm, nn.functional.mse_loss, [(torch.randn(4, 3), torch.randn(4, 2))])
