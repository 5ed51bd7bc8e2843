"""The bundled model zoo: small models of each family orca claims, with fixed seeds and inputs.

`names()` lists them; `get(name)` returns `(model, example_inputs)` with the model in eval mode.
BatchNorm statistics are randomized (seeded) so BN folding is exercised on non-trivial values.
`get` also builds the models of `experiment_names()`: models for one feature's tests and
benchmarks (the hourglass of activation spilling), not part of the zoo every test runs.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _randomize_batchnorm(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


class MLP(nn.Module):
    """512-1024-1024-10 with ReLU (the MLP our TVM measurements used)."""

    def __init__(self, sizes=(512, 1024, 1024, 10)):
        super().__init__()
        layers = []
        for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


class ResNetSmall(nn.Module):
    """ResNet-style CNN: conv stem, three stages of basic blocks with residual adds, BN, pool, fc."""

    def __init__(self, widths=(16, 32, 64), num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int, groups: int = 1):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False, groups=groups), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False, groups=groups), nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_residual else y


class MobileNetSmall(nn.Module):
    """MobileNetV2-style CNN: depthwise 3x3 convs, grouped 1x1 convs, inverted residuals, ReLU6."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 1, 2),
            InvertedResidual(16, 24, 2, 4, groups=2),
            InvertedResidual(24, 24, 1, 4, groups=2),
            InvertedResidual(24, 32, 2, 4),
        )
        self.head = nn.Sequential(nn.Conv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU6())
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(x.mean((2, 3)))


class RNNModel(nn.Module):
    """A 2-layer LSTM or GRU with a linear head; returns (head(output), final state) like torch."""

    def __init__(self, cell: str, input_size=32, hidden=64, batch_first=True, bidirectional=False):
        super().__init__()
        rnn_cls = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn_cls(input_size, hidden, num_layers=2, batch_first=batch_first, bidirectional=bidirectional)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), 10)

    def forward(self, x):
        out, state = self.rnn(x)
        return self.head(out), state


class TransformerEncoderModel(nn.Module):
    """Token embedding + learned positions + 2 TransformerEncoder layers (MHA, LayerNorm, GELU) + head."""

    def __init__(self, vocab=1000, d_model=64, heads=4, ff=128, layers=2, seq=16, num_classes=10):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(1, seq, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.1, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, tokens):
        x = self.encoder(self.embed(tokens) + self.pos)
        return self.head(self.norm(x).mean(1))


class Hourglass(nn.Module):
    """Full-resolution features kept for a skip connection around a wide low-resolution middle:
    the activation peak is in the middle, where the skip is idle (place-memory's activation
    spilling)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 32, 3, stride=2, padding=1)
        self.wide = nn.Conv2d(32, 96, 3, padding=1)
        self.narrow = nn.Conv2d(96, 32, 1)
        self.up = nn.ConvTranspose2d(32, 8, 2, stride=2)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        skip = torch.relu(self.stem(x))
        h = torch.relu(self.down(skip))
        h = torch.relu(self.narrow(torch.relu(self.wide(h))))
        return self.head(torch.relu(self.up(h)) + skip)


def _rnn_input(batch: int, batch_first: bool, seq: int, features: int = 32) -> torch.Tensor:
    return torch.randn(batch, seq, features) if batch_first else torch.randn(seq, batch, features)


# name -> (builder, input maker(batch, seq_len), default batch, one-line description). Sequence
# models (SEQUENCE_MODELS) take any length; the others ignore it.
_ZOO: dict[str, tuple[Callable[[], nn.Module], Callable[[int, int], tuple], int, str]] = {
    "mlp": (MLP, lambda b, t: (torch.randn(b, 512),), 8, "MLP 512-1024-1024-10"),
    "resnet": (ResNetSmall, lambda b, t: (torch.randn(b, 3, 32, 32),), 1, "ResNet-style CNN, residual adds + BatchNorm"),
    "mobilenet": (MobileNetSmall, lambda b, t: (torch.randn(b, 3, 32, 32),), 1,
                  "MobileNetV2-style CNN, depthwise + grouped convs"),
    "lstm": (lambda: RNNModel("lstm", batch_first=True), lambda b, t: (_rnn_input(b, True, t),), 4,
             "2-layer LSTM, batch_first"),
    "lstm_bidir": (lambda: RNNModel("lstm", batch_first=False, bidirectional=True), lambda b, t: (_rnn_input(b, False, t),),
                   4, "2-layer bidirectional LSTM, seq-first"),
    "gru": (lambda: RNNModel("gru", batch_first=False), lambda b, t: (_rnn_input(b, False, t),), 4,
            "2-layer GRU, seq-first"),
    "gru_bidir": (lambda: RNNModel("gru", batch_first=True, bidirectional=True), lambda b, t: (_rnn_input(b, True, t),), 4,
                  "2-layer bidirectional GRU, batch_first"),
    "transformer": (TransformerEncoderModel, lambda b, t: (torch.randint(0, 1000, (b, 16)),), 2,
                    "Transformer encoder: embedding, 2 layers of MHA + LayerNorm + GELU"),
}
# Models of one feature's tests and benchmarks (same layout as _ZOO), built by get() but not listed
# by names(): the zoo-wide tests do not run them.
_EXPERIMENTS: dict[str, tuple[Callable[[], nn.Module], Callable[[int, int], tuple], int, str]] = {
    "hourglass": (Hourglass, lambda b, t: (torch.randn(b, 3, 64, 64),), 2,
                  "conv hourglass: a full-resolution skip around a wide half-resolution middle"),
}
SEQUENCE_MODELS = frozenset({"lstm", "lstm_bidir", "gru", "gru_bidir"})
DEFAULT_SEQ_LEN = 16


def names() -> list[str]:
    """The bundled model names."""
    return list(_ZOO)


def experiment_names() -> list[str]:
    """The models `get` builds for one feature's tests and benchmarks, outside the zoo."""
    return list(_EXPERIMENTS)


def describe(name: str) -> str:
    """A one-line description of a zoo (or experiment) model."""
    return {**_ZOO, **_EXPERIMENTS}[_check(name)][3]


def _check(name: str) -> str:
    if name not in _ZOO and name not in _EXPERIMENTS:
        from .errors import OrcaError

        raise OrcaError(f"unknown zoo model '{name}'; available: {', '.join(_ZOO)} (and {', '.join(_EXPERIMENTS)})")
    return name


def get(name: str, batch_size: int | None = None, seed: int = 0, seq_len: int | None = None) -> tuple[nn.Module, tuple]:
    """`(model, example_inputs)` for a zoo model: seeded weights, eval mode, standard input shape.

    `seq_len` sets the sequence length of a sequence model (SEQUENCE_MODELS; default 16)."""
    builder, make_inputs, default_batch, _ = {**_ZOO, **_EXPERIMENTS}[_check(name)]
    if seq_len is not None and name not in SEQUENCE_MODELS:
        from .errors import OrcaError

        raise OrcaError(f"zoo model '{name}' has no sequence length; sequence models: {', '.join(sorted(SEQUENCE_MODELS))}")
    torch.manual_seed(seed)
    model = _randomize_batchnorm(builder()).eval()
    inputs = make_inputs(batch_size or default_batch, seq_len or DEFAULT_SEQ_LEN)
    return model, inputs
