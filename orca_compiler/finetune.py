"""Fine-tune a model for a few epochs of a user-given loss on user-given data (accuracy recovery after pruning).

`finetune(module, loss_fn, data)` trains what a model's weights are:
- the parameters of an ordinary nn.Module (those with `requires_grad`), in place, as any training
  loop would;
- in a captured graph (a torch.fx.GraphModule anywhere in `module`, e.g. `GraphIR.gm` or what
  `orca_compiler.prune` returns) the float tensors its weight ops read: conv/linear/matmul weights
  and biases, embedding tables, LayerNorm/GroupNorm/BatchNorm affine parameters and the weights of
  orca.lstm / orca.gru, also through views (`t`, `permute`, `view`...). BatchNorm running statistics
  and other constants are not trained. Each is replaced by a trainable copy for the duration (the
  IR never mutates a weight in place: copies of a GraphIR share them) and registered back as a
  plain buffer without grad at the end, so the module can be captured and compiled again.

The module's train/eval mode is left as it is: finetune never calls `.train()`. A captured graph
has eval semantics built in (`_native_batch_norm_legit_no_training`, no dropout); an nn.Module in
eval mode is fine-tuned with frozen BatchNorm statistics, the function the compiler captures.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from .errors import OrcaError
from .ops.rnn import GRU, LSTM

aten = torch.ops.aten


class FinetuneError(OrcaError):
    """finetune cannot run: nothing to train, a loss that is not a scalar, no data, a bad option."""


# Weight ops -> the argument positions that hold weights (None: any tensor argument that is a
# graph constant, for the matmul family where either operand may be the weight).
_WEIGHT_ARGS: dict[Any, tuple[int, ...] | None] = {
    aten.linear.default: (1, 2),
    aten.conv1d.default: (1, 2), aten.conv2d.default: (1, 2), aten.conv3d.default: (1, 2),
    aten.conv_transpose1d.default: (1, 2), aten.conv_transpose2d.input: (1, 2),
    aten.conv_transpose3d.input: (1, 2), aten.convolution.default: (1, 2),
    aten.mm.default: None, aten.bmm.default: None, aten.matmul.default: None, aten.addmm.default: None,
    aten.embedding.default: (0,),
    aten.layer_norm.default: (2, 3), aten.native_layer_norm.default: (2, 3),
    aten.group_norm.default: (2, 3), aten.native_group_norm.default: (1, 2),
    # args 3 and 4 are the running mean and variance: statistics, not trained
    aten._native_batch_norm_legit_no_training.default: (1, 2),
    aten.batch_norm.default: (1, 2), aten.native_batch_norm.default: (1, 2),
    aten.prelu.default: (1,),
    LSTM: (2,), GRU: (2,), aten.lstm.input: (2,), aten.gru.input: (2,),
}

# Ops through which a weight reaches its consumer unchanged in value (layout, dtype, aliasing).
_VIEW_OPS = frozenset({
    aten.t.default, aten.permute.default, aten.transpose.int, aten.view.default, aten.reshape.default,
    aten._unsafe_view.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.expand.default, aten.clone.default, aten.alias.default, aten.detach.default,
    aten._to_copy.default, aten.contiguous.default,
})

# The only ops of ours with a gradient (ops/rnn.py); fused ops and scans have none.
_DIFFERENTIABLE_ORCA_OPS = frozenset({LSTM, GRU})

_OPTIMIZERS: dict[str, Callable[[list[torch.Tensor], float], torch.optim.Optimizer]] = {
    "adam": lambda tensors, lr: torch.optim.Adam(tensors, lr=lr),
    "adamw": lambda tensors, lr: torch.optim.AdamW(tensors, lr=lr),
    "sgd": lambda tensors, lr: torch.optim.SGD(tensors, lr=lr, momentum=0.9),
}


@dataclass
class FinetuneReport:
    """What a finetune run did: mean training loss per epoch, optimizer steps, wall time, and the
    tensors it trained (qualified names relative to the module, their count and bytes)."""

    epoch_losses: list[float]
    steps: int
    seconds: float
    trained: list[str] = field(default_factory=list)
    trained_bytes: int = 0
    optimizer: str = "adam"
    lr: float = 1e-3

    @property
    def trained_count(self) -> int:
        """How many tensors were trained."""
        return len(self.trained)

    def __str__(self) -> str:
        losses = " -> ".join(f"{loss:.4g}" for loss in self.epoch_losses)
        return (f"fine-tuned {self.trained_count} tensors ({self.trained_bytes / 1e6:.3g} MB) with {self.optimizer} "
                f"lr={self.lr:g}: {len(self.epoch_losses)} epochs, {self.steps} steps in {self.seconds:.2f} s; "
                f"loss per epoch {losses}")


def graph_weight_targets(gm: fx.GraphModule) -> list[str]:
    """The `get_attr` targets of `gm` that its weight ops read as weights (see `_WEIGHT_ARGS`),
    directly or through view-like ops, in graph order. Assumes an ATen-level graph (call_function
    nodes); call_module nodes are ordinary submodules whose parameters train as parameters."""
    targets: dict[str, None] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _WEIGHT_ARGS:
            continue
        positions = _WEIGHT_ARGS[node.target]
        args = node.args if positions is None else [node.args[i] for i in positions if i < len(node.args)]
        for leaf in pytree.tree_leaves(list(args)):
            source = _constant_source(leaf)
            if source is not None:
                targets.setdefault(source.target)
    return list(targets)


def _constant_source(value: Any) -> fx.Node | None:
    """The get_attr node `value` is a view of, or None when it is computed from the inputs."""
    while isinstance(value, fx.Node) and value.op == "call_function" and value.target in _VIEW_OPS:
        value = value.args[0]
    return value if isinstance(value, fx.Node) and value.op == "get_attr" else None


class _BufferSlot:
    """A float tensor attribute of a graph module, swapped for a trainable copy while training."""

    def __init__(self, name: str, owner: nn.Module, attr: str):
        self.name, self.owner, self.attr = name, owner, attr
        self.tensor = getattr(owner, attr).detach().clone().requires_grad_(True)
        self._set(self.tensor)

    def _set(self, tensor: torch.Tensor) -> None:
        if self.attr in self.owner._buffers:
            self.owner._buffers[self.attr] = tensor
        else:
            setattr(self.owner, self.attr, tensor)

    def release(self) -> None:
        """Register the trained values back as a plain tensor without grad."""
        self._set(self.tensor.detach())


def _graph_modules(module: nn.Module) -> Iterable[tuple[str, fx.GraphModule]]:
    return ((prefix, m) for prefix, m in module.named_modules() if isinstance(m, fx.GraphModule))


def _check_differentiable(module: nn.Module) -> None:
    for prefix, gm in _graph_modules(module):
        for node in gm.graph.nodes:
            target = node.target
            if (node.op == "call_function" and isinstance(target, torch._ops.OpOverload)
                    and target.namespace == "orca" and target not in _DIFFERENTIABLE_ORCA_OPS):
                raise FinetuneError(
                    f"node %{node.name} ({target.name()}) in {prefix or 'the graph'} has no gradient: fine-tune "
                    "the graph before fusion and decompose-rnn (e.g. right after capture or pruning)")


def _collect(module: nn.Module) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, nn.Module, str]]]:
    """(parameters to train in place, graph buffers to train through a copy)."""
    params = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    seen_params = {id(p) for _, p in params}
    buffers: list[tuple[str, nn.Module, str]] = []
    seen_slots: set[tuple[int, str]] = set()
    for prefix, gm in _graph_modules(module):
        for target in graph_weight_targets(gm):
            owner_path, _, attr = target.rpartition(".")
            owner = gm.get_submodule(owner_path)
            tensor = getattr(owner, attr, None)
            if (attr in owner._parameters or not isinstance(tensor, torch.Tensor)
                    or not tensor.is_floating_point() or id(tensor) in seen_params):
                continue  # parameters train as parameters (or stay frozen); integer tables never do
            if (id(owner), attr) not in seen_slots:
                seen_slots.add((id(owner), attr))
                buffers.append((f"{prefix}.{target}" if prefix else target, owner, attr))
    return params, buffers


def _split_batch(batch: Any) -> tuple[tuple, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise FinetuneError(f"each batch of data must be a pair (inputs, target), got {type(batch).__name__}")
    inputs, target = batch
    return (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), target


def _check_loss(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        what = f"a tensor of shape {list(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise FinetuneError(f"loss_fn must return a scalar float tensor, got {what} (reduce it, e.g. with .mean())")
    if not loss.requires_grad:
        raise FinetuneError("the loss does not depend on any trained tensor (does loss_fn detach the outputs?)")
    return loss


def _check_options(epochs: int, lr: float, optimizer: str, max_steps: int | None) -> None:
    if epochs < 1:
        raise FinetuneError(f"epochs must be >= 1, got {epochs}")
    if not lr > 0:
        raise FinetuneError(f"lr must be > 0, got {lr}")
    if optimizer not in _OPTIMIZERS:
        raise FinetuneError(f"unknown optimizer {optimizer!r}; valid: {', '.join(_OPTIMIZERS)}")
    if max_steps is not None and max_steps < 1:
        raise FinetuneError(f"max_steps must be >= 1 or None, got {max_steps}")


def finetune(module: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], data: Iterable, *, epochs: int = 1,
             lr: float = 1e-3, optimizer: str = "adam", max_steps: int | None = None) -> FinetuneReport:
    """Train `module`'s weights (module docstring) for `epochs` passes over `data`; return a report.

    `data` yields `(inputs, target)` batches, `inputs` a tensor or a tuple of tensors passed as
    `module(*inputs)`; it is iterated once per epoch, so give a list or a DataLoader, not a generator,
    when `epochs > 1`. A captured graph specializes shapes: give it batches of the shape it was
    captured with. `loss_fn(outputs, target)` receives what the module returns (a graph module
    returns a flat tuple) and returns a scalar. `optimizer` is "adam", "adamw" or "sgd" (momentum
    0.9); `max_steps` stops after that many steps in all. Raises FinetuneError when there is nothing
    to train, the loss is not a scalar, or an epoch gets no batch. On an error during training the
    module keeps the weights of the last step taken, as plain tensors.
    """
    _check_options(epochs, lr, optimizer, max_steps)
    if not isinstance(module, nn.Module):
        raise FinetuneError(f"finetune takes an nn.Module (the eager model or its captured graph), "
                            f"got {type(module).__name__}")
    _check_differentiable(module)
    params, buffers = _collect(module)
    if not params and not buffers:
        raise FinetuneError(f"{type(module).__name__} has no trainable tensors: no parameter requires grad and no "
                            "graph buffer is read as a weight by conv/linear/embedding/norm/RNN ops")
    slots = [_BufferSlot(name, owner, attr) for name, owner, attr in buffers]
    try:
        tensors = [p for _, p in params] + [slot.tensor for slot in slots]
        return _train(module, loss_fn, data, _OPTIMIZERS[optimizer](tensors, lr), epochs, max_steps,
                      FinetuneReport([], 0, 0.0, [n for n, _ in params] + [s.name for s in slots],
                                     sum(t.numel() * t.element_size() for t in tensors), optimizer, lr))
    finally:
        for slot in slots:
            slot.release()


def _train(module, loss_fn, data, opt, epochs, max_steps, report: FinetuneReport) -> FinetuneReport:
    start = time.perf_counter()
    with torch.enable_grad():
        for epoch in range(epochs):
            total, count = 0.0, 0
            for batch in data:
                inputs, target = _split_batch(batch)
                loss = _check_loss(loss_fn(module(*inputs), target))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, count = total + loss.item(), count + 1
                report.steps += 1
                if report.steps == max_steps:
                    break
            if count == 0:
                hint = " (a generator is used up after one epoch: pass a list)" if epoch else ""
                raise FinetuneError(f"data yielded no batches in epoch {epoch + 1}{hint}")
            report.epoch_losses.append(total / count)
            if report.steps == max_steps:
                break
    report.seconds = time.perf_counter() - start
    return report
