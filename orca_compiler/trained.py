"""Small real models trained in seconds: a CNN on scikit-learn's digits, LSTM/GRU sequence classifiers.

For accuracy tests and the pruning accuracy report, where random weights would say nothing:
- `digits_cnn()`: conv-BN-ReLU layers with a residual add and a channel concat, then flatten and
  a linear layer, on sklearn's bundled 8x8 digits (10 classes, a fixed stratified 70/30 split);
- `sequence_lstm()` / `sequence_gru()`: a linear input layer, a 2-layer LSTM (GRU) and a linear head
  on the last time step, on a synthetic task generated from a fixed seed: which of 4 channels has
  the largest sum over 16 steps (it needs a memory of every step).

Each returns a TrainedModel: the model in eval mode, its data and helpers (accuracy, batches for
fine-tuning, a cross-entropy loss). Training runs once per process and seed (later calls get a
fresh copy of the trained model), single-threaded so that the weights do not depend on the
machine's core count (and these models are too small to gain from more threads), and under a
forked RNG so that the caller's random state is untouched. scikit-learn is a dev dependency.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .errors import OrcaError


@dataclass
class TrainedModel:
    """A trained classifier with its data. `model` is in eval mode; inputs are float tensors with
    the batch first; `test_accuracy` is the model's top-1 accuracy on (x_test, y_test)."""

    name: str
    model: nn.Module
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    train_seconds: float
    test_accuracy: float

    def accuracy(self, module: Callable[..., Any], batch_size: int | None = None) -> float:
        """Top-1 accuracy of `module` (the model, a pruned or compiled version, any callable) on
        the test set. With `batch_size` the test set goes in chunks of exactly that size (the last
        one zero-padded), for modules captured or compiled for one batch size. When `module`
        returns a tuple (a graph module's flat outputs), its first element holds the logits."""
        size = batch_size or len(self.y_test)
        predictions = []
        with torch.no_grad():
            for start in range(0, len(self.y_test), size):
                chunk = self.x_test[start:start + size]
                real = len(chunk)
                if real < size:
                    chunk = torch.cat([chunk, chunk.new_zeros((size - real, *chunk.shape[1:]))])
                predictions.append(logits_of(module(chunk))[:real].argmax(-1))
        return (torch.cat(predictions) == self.y_test).float().mean().item()

    def batches(self, batch_size: int = 64, *, shuffle: bool = True, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
        """The training set as a list of `(inputs, labels)` batches, for `orca_compiler.finetune`.

        Every batch has exactly `batch_size` rows (the remainder is dropped) because a captured
        graph is specialized to one batch size. `shuffle` permutes the rows with `seed`."""
        n = len(self.y_train)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        return [(self.x_train[idx], self.y_train[idx])
                for idx in order[:n - n % batch_size].split(batch_size)]

    def example_inputs(self, batch_size: int = 64) -> tuple[Tensor]:
        """`(x,)` with the first `batch_size` test inputs: example inputs for capture or compile."""
        return (self.x_test[:batch_size],)

    @staticmethod
    def loss(outputs: Any, target: Tensor) -> Tensor:
        """Cross entropy of the logits (the first output of a tuple) against integer labels."""
        return nn.functional.cross_entropy(logits_of(outputs), target)


def logits_of(outputs: Any) -> Tensor:
    """The logits in a model's outputs: the outputs themselves, or the first of a tuple or list."""
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


# -- models ------------------------------------------------------------------------------------

def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class DigitsCNN(nn.Module):
    """[B, 1, 8, 8] -> 10 logits. stem conv-BN-ReLU (w channels); a residual block
    relu(BN(conv(x)) + x); a concat of that with a 1x1 conv-BN-ReLU branch (2w channels); a
    stride-2 conv-BN-ReLU to 4x4; flatten; linear. The add, the concat and the linear after
    flatten are the couplings a structured pruner must get right."""

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.stem = _conv_bn(1, width)
        self.residual = _conv_bn(width, width, relu=False)
        self.branch = _conv_bn(width, width, kernel=1)
        self.down = _conv_bn(2 * width, 2 * width, stride=2)
        self.fc = nn.Linear(2 * width * 4 * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = torch.relu(self.residual(x) + x)
        x = self.down(torch.cat([x, self.branch(x)], 1))
        return self.fc(torch.flatten(x, 1))


class SequenceClassifier(nn.Module):
    """[B, T, features] -> logits: a linear input layer, a `layers`-deep LSTM or GRU (batch_first),
    and a linear head on the last time step. Returns only the logits, not the RNN state."""

    def __init__(self, cell: str = "lstm", features: int = 4, embed: int = 16, hidden: int = 32, layers: int = 2,
                 num_classes: int = 4):
        super().__init__()
        self.embed = nn.Linear(features, embed)
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell](embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(self.embed(x))
        return self.head(out[:, -1])


# -- data --------------------------------------------------------------------------------------

def digits_data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """sklearn's digits as `(x_train, y_train, x_test, y_test)`: x `[N, 1, 8, 8]` scaled to [0, 1],
    integer labels; a fixed stratified split, 1257 train and 540 test images."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise OrcaError("the digits model needs scikit-learn: pip install scikit-learn "
                        "(or the dev extra: pip install -e '.[dev]')") from exc
    digits = load_digits()
    train, test = train_test_split(range(len(digits.target)), test_size=0.3, random_state=0, stratify=digits.target)
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    return x[train], y[train], x[test], y[test]


def channel_sum_task(n: int, generator: torch.Generator, steps: int = 16, channels: int = 4) -> tuple[Tensor, Tensor]:
    """`n` sequences `[n, steps, channels]` of standard normal noise, labelled with the channel
    whose sum over the steps is largest."""
    x = torch.randn(n, steps, channels, generator=generator)
    return x, x.sum(1).argmax(1)


# -- training ----------------------------------------------------------------------------------

def _fit(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, lr: float, batch_size: int, seed: int) -> None:
    """Adam with a cosine learning-rate decay on cross entropy; leaves the model in eval mode."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = len(y) // batch_size
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=generator)[:steps_per_epoch * batch_size]
            for idx in order.split(batch_size):
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    model.eval()


def _train(name: str, build: Callable[[], nn.Module], data: tuple[Tensor, ...], seed: int, **fit) -> TrainedModel:
    threads = torch.get_num_threads()
    start = time.perf_counter()
    try:
        torch.set_num_threads(1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build()
            _fit(model, data[0], data[1], seed=seed, **fit)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    result = TrainedModel(name, model, *data, train_seconds=seconds, test_accuracy=0.0)
    result.test_accuracy = result.accuracy(model)
    return result


def _fresh(trained: TrainedModel) -> TrainedModel:
    """A copy whose model the caller may change (prune, fine-tune); the data tensors are shared."""
    return dataclasses.replace(trained, model=copy.deepcopy(trained.model))


@functools.lru_cache(maxsize=None)
def _digits_cnn(seed: int) -> TrainedModel:
    return _train("digits_cnn", DigitsCNN, digits_data(), seed, epochs=8, lr=0.01, batch_size=64)


@functools.lru_cache(maxsize=None)
def _sequence(cell: str, seed: int) -> TrainedModel:
    generator = torch.Generator().manual_seed(1234)  # the data does not change with the seed
    x_train, y_train = channel_sum_task(8192, generator)
    x_test, y_test = channel_sum_task(1024, generator)
    return _train(f"sequence_{cell}", lambda: SequenceClassifier(cell), (x_train, y_train, x_test, y_test), seed,
                  epochs=6, lr=0.01, batch_size=64)


def digits_cnn(seed: int = 0) -> TrainedModel:
    """DigitsCNN trained on sklearn's digits (8 epochs of Adam; about 1 s). Test accuracy ~0.99."""
    return _fresh(_digits_cnn(seed))


def sequence_lstm(seed: int = 0) -> TrainedModel:
    """SequenceClassifier("lstm") trained on `channel_sum_task` (8192 train, 1024 test sequences,
    6 epochs; about 3 s). Test accuracy ~0.94."""
    return _fresh(_sequence("lstm", seed))


def sequence_gru(seed: int = 0) -> TrainedModel:
    """SequenceClassifier("gru") trained like `sequence_lstm` (about 5 s). Test accuracy ~0.95."""
    return _fresh(_sequence("gru", seed))
