"""Recurrence ops: one LSTM or GRU layer direction over all time steps, after its input GEMM.

`decompose-rnn` (passes/rnn.py) hoists each layer's input projection out of the time loop (one
GEMM over every step, as cuDNN does) and leaves the recurrence to these ops:

- `orca::lstm_scan(xproj, w_hh_t, h0, c0, reverse, column, batch_first) -> (out, h_n, c_n)`
- `orca::gru_scan(xproj, w_hh_t, b_hn, h0, reverse, column, batch_first) -> (out, h_n)`

`xproj` is `[T, B, K]` (`[B, T, K]` when `batch_first`) and holds this direction's gate
pre-activations in columns `column : column + gates*H` (both directions of a bidirectional layer
share one projection). For the LSTM they include both biases (gates i, f, g, o); for the GRU
(gates r, z, n) the r and z columns include both biases and the n columns only `b_in`, because
torch applies `b_hn` inside the reset gate: `n = tanh(x_n + r * (W_hn h + b_hn))`.
`w_hh_t` is the recurrent weight transposed, `[H, gates*H]`, so a step's GEMV reads it row by row.
`out` has the layout of `xproj` with H features; `reverse` runs the time steps backwards (and
writes each step's output at its own time index), as torch's reverse direction does.

The quantize pass (weight-only and dynamic modes) turns them into

- `orca::lstm_scan_q(xproj, qweight, scales, h0, c0, bits, group, reverse, column, batch_first)`
- `orca::gru_scan_q(xproj, qweight, scales, b_hn, h0, bits, group, reverse, column, batch_first)`

whose W_hh is stored as a weight-only linear's weight (ops/quant.py, `linear_wq`): `qweight` int8
`[gates*H, H]` or uint8 `[gates*H, ceil(H/2)]` (int4, two a byte), `scales` float32
`[gates*H, ceil(H/group)]` (one scale per gate column and group of `group` state features). Their
reference semantics are the float scans on the dequantized weight; the kernels dequantize in
registers inside each step's GEMV.

The eager implementations loop in Python (reference semantics, and eager fallback); the lowering
(lowering/rnn_kernels.py) turns each op into one TVM kernel with the time loop inside.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def _time_steps(xproj: Tensor, batch_first: bool) -> int:
    return xproj.shape[1] if batch_first else xproj.shape[0]


def _step_input(xproj: Tensor, t: int, batch_first: bool, column: int, width: int) -> Tensor:
    rows = xproj[:, t] if batch_first else xproj[t]
    return rows[:, column:column + width]


def _stack_time(steps: list[Tensor], batch_first: bool) -> Tensor:
    return torch.stack(steps, dim=1 if batch_first else 0)


def _order(steps: int, reverse: bool) -> range:
    return range(steps - 1, -1, -1) if reverse else range(steps)


def _lstm_reference(xproj: Tensor, w_hh_t: Tensor, h0: Tensor, c0: Tensor, reverse: bool, column: int,
                    batch_first: bool) -> tuple[Tensor, Tensor, Tensor]:
    hidden = w_hh_t.shape[0]
    steps = _time_steps(xproj, batch_first)
    h, c = h0, c0
    outputs: list[Tensor] = [h0] * steps
    for t in _order(steps, reverse):
        gates = _step_input(xproj, t, batch_first, column, 4 * hidden) + h @ w_hh_t
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs[t] = h
    out = _stack_time(outputs, batch_first) if steps else xproj.new_empty(_out_shape(xproj, hidden, batch_first))
    return out, h.clone(), c.clone()


def _gru_reference(xproj: Tensor, w_hh_t: Tensor, b_hn: Tensor, h0: Tensor, reverse: bool, column: int,
                   batch_first: bool) -> tuple[Tensor, Tensor]:
    hidden = w_hh_t.shape[0]
    steps = _time_steps(xproj, batch_first)
    h = h0
    outputs: list[Tensor] = [h0] * steps
    for t in _order(steps, reverse):
        x_r, x_z, x_n = _step_input(xproj, t, batch_first, column, 3 * hidden).chunk(3, dim=-1)
        h_r, h_z, h_n = (h @ w_hh_t).chunk(3, dim=-1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * (h_n + b_hn))
        h = (1 - z) * n + z * h
        outputs[t] = h
    out = _stack_time(outputs, batch_first) if steps else xproj.new_empty(_out_shape(xproj, hidden, batch_first))
    return out, h.clone()


def _out_shape(xproj: Tensor, hidden: int, batch_first: bool) -> tuple:
    return (*xproj.shape[:2], hidden)


@torch.library.custom_op("orca::lstm_scan", mutates_args=())
def lstm_scan(xproj: Tensor, w_hh_t: Tensor, h0: Tensor, c0: Tensor, reverse: bool, column: int,
              batch_first: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM direction over all steps (see the module docstring for the layouts)."""
    return _lstm_reference(xproj, w_hh_t, h0, c0, reverse, column, batch_first)


@torch.library.custom_op("orca::gru_scan", mutates_args=())
def gru_scan(xproj: Tensor, w_hh_t: Tensor, b_hn: Tensor, h0: Tensor, reverse: bool, column: int,
             batch_first: bool) -> tuple[Tensor, Tensor]:
    """One GRU direction over all steps (see the module docstring for the layouts)."""
    return _gru_reference(xproj, w_hh_t, b_hn, h0, reverse, column, batch_first)


# -- quantized recurrent weights (the quantize pass, weight-only and dynamic modes) ---------------

def _dequantized_w_hh_t(qweight: Tensor, scales: Tensor, bits: int, hidden: int) -> Tensor:
    """The float32 `[H, gates*H]` W_hh^T a quantized W_hh stands for."""
    from .quant import dequantize_weight

    return dequantize_weight(qweight, scales, bits, hidden).t()


@torch.library.custom_op("orca::lstm_scan_q", mutates_args=())
def lstm_scan_q(xproj: Tensor, qweight: Tensor, scales: Tensor, h0: Tensor, c0: Tensor, bits: int, group: int,
                reverse: bool, column: int, batch_first: bool) -> tuple[Tensor, Tensor, Tensor]:
    """lstm_scan with W_hh quantized like a weight-only linear's weight (see the module docstring)."""
    w_hh_t = _dequantized_w_hh_t(qweight, scales, bits, h0.shape[-1])
    return _lstm_reference(xproj, w_hh_t, h0, c0, reverse, column, batch_first)


@torch.library.custom_op("orca::gru_scan_q", mutates_args=())
def gru_scan_q(xproj: Tensor, qweight: Tensor, scales: Tensor, b_hn: Tensor, h0: Tensor, bits: int, group: int,
               reverse: bool, column: int, batch_first: bool) -> tuple[Tensor, Tensor]:
    """gru_scan with W_hh quantized like a weight-only linear's weight (see the module docstring)."""
    w_hh_t = _dequantized_w_hh_t(qweight, scales, bits, h0.shape[-1])
    return _gru_reference(xproj, w_hh_t, b_hn, h0, reverse, column, batch_first)


def _check_quantized(op: str, qweight, scales, h0, bits: int, group: int, gates: int) -> int:
    hidden = h0.shape[-1]
    if bits not in (4, 8):
        raise ValueError(f"{op}: bits must be 4 or 8, got {bits}")
    cols = qweight.shape[1] * (2 if bits == 4 else 1)
    if qweight.shape[0] != gates * hidden or cols not in (hidden, hidden + 1):
        raise ValueError(f"{op}: W_hh is {list(qweight.shape)} ({bits}-bit), the state has {hidden} features")
    if scales.shape[0] != gates * hidden or scales.shape[1] != -(-hidden // group):
        raise ValueError(f"{op}: scales {list(scales.shape)} do not match {gates * hidden} rows in groups of {group}")
    return hidden


@lstm_scan_q.register_fake
def _lstm_scan_q_fake(xproj, qweight, scales, h0, c0, bits, group, reverse, column, batch_first):
    hidden = _check_quantized("lstm_scan_q", qweight, scales, h0, bits, group, 4)
    return xproj.new_empty(_out_shape(xproj, hidden, batch_first)), h0.new_empty(h0.shape), c0.new_empty(c0.shape)


@gru_scan_q.register_fake
def _gru_scan_q_fake(xproj, qweight, scales, b_hn, h0, bits, group, reverse, column, batch_first):
    hidden = _check_quantized("gru_scan_q", qweight, scales, h0, bits, group, 3)
    return xproj.new_empty(_out_shape(xproj, hidden, batch_first)), h0.new_empty(h0.shape)


@lstm_scan.register_fake
def _lstm_scan_fake(xproj, w_hh_t, h0, c0, reverse, column, batch_first):
    hidden = w_hh_t.shape[0]
    return xproj.new_empty(_out_shape(xproj, hidden, batch_first)), h0.new_empty(h0.shape), c0.new_empty(c0.shape)


@gru_scan.register_fake
def _gru_scan_fake(xproj, w_hh_t, b_hn, h0, reverse, column, batch_first):
    hidden = w_hh_t.shape[0]
    return xproj.new_empty(_out_shape(xproj, hidden, batch_first)), h0.new_empty(h0.shape)


LSTM_SCAN = torch.ops.orca.lstm_scan.default
GRU_SCAN = torch.ops.orca.gru_scan.default
LSTM_SCAN_Q = torch.ops.orca.lstm_scan_q.default
GRU_SCAN_Q = torch.ops.orca.gru_scan_q.default


# -- whole RNNs, captured in O(1) and with a symbolic time dimension ----------------------------
# aten.lstm.input's shape function is its Python decomposition, which loops over the steps: under
# torch.export (and on every shape re-check of the IR) that cost 15 s at T=512, and it specializes
# the sequence length. `rnn_capture_shim` (used by capture) routes nn.LSTM / nn.GRU calls to these
# ops instead: the same arguments as aten.lstm.input / aten.gru.input, torch's kernels in eager,
# and shape functions that cost nothing and keep T symbolic. decompose-rnn decomposes them.

def _whole_rnn_shapes(x: Tensor, params: list[Tensor], num_layers: int, bidirectional: bool,
                      batch_first: bool) -> tuple[tuple, tuple]:
    """Output and state shapes of a whole RNN (torch's layouts)."""
    directions = 2 if bidirectional else 1
    hidden = params[1].shape[1]  # w_hh_l0: [gates * H, H]
    out = (*x.shape[:2], directions * hidden)
    return out, (num_layers * directions, x.shape[0] if batch_first else x.shape[1], hidden)


@torch.library.custom_op("orca::lstm", mutates_args=())
def lstm(x: Tensor, hx: list[Tensor], params: list[Tensor], has_biases: bool, num_layers: int, dropout: float,
         train: bool, bidirectional: bool, batch_first: bool) -> tuple[Tensor, Tensor, Tensor]:
    """aten.lstm.input with a shape function that does not specialize the sequence length."""
    out, h, c = torch.ops.aten.lstm.input(x, hx, params, has_biases, num_layers, dropout, train, bidirectional,
                                          batch_first)
    return out, h, c


@torch.library.custom_op("orca::gru", mutates_args=())
def gru(x: Tensor, hx: Tensor, params: list[Tensor], has_biases: bool, num_layers: int, dropout: float,
        train: bool, bidirectional: bool, batch_first: bool) -> tuple[Tensor, Tensor]:
    """aten.gru.input with a shape function that does not specialize the sequence length."""
    out, h = torch.ops.aten.gru.input(x, hx, params, has_biases, num_layers, dropout, train, bidirectional,
                                      batch_first)
    return out, h


@lstm.register_fake
def _lstm_fake(x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    out, state = _whole_rnn_shapes(x, params, num_layers, bidirectional, batch_first)
    return x.new_empty(out), x.new_empty(state), x.new_empty(state)


@gru.register_fake
def _gru_fake(x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    out, state = _whole_rnn_shapes(x, params, num_layers, bidirectional, batch_first)
    return x.new_empty(out), x.new_empty(state)


LSTM = torch.ops.orca.lstm.default
GRU = torch.ops.orca.gru.default


class _VFShim:
    """Stands in for torch.nn.modules.rnn._VF: the input-tensor forms of lstm/gru go to our ops,
    everything else (packed sequences, other RNNs) to torch."""

    def __init__(self, vf):
        self._vf = vf

    def __getattr__(self, name):
        return getattr(self._vf, name)

    def lstm(self, *args):
        if len(args) == 9 and isinstance(args[1], (list, tuple)) and _plain_weights(args[2], *args[3:5], args[7]):
            return LSTM(args[0], list(args[1]), list(args[2]), *args[3:])
        return self._vf.lstm(*args)  # packed sequences, projections (proj_size)

    def gru(self, *args):
        if len(args) == 9 and isinstance(args[2], (list, tuple)) and _plain_weights(args[2], *args[3:5], args[7]):
            return GRU(args[0], args[1], list(args[2]), *args[3:])
        return self._vf.gru(*args)


def _plain_weights(params, has_biases: bool, num_layers: int, bidirectional: bool) -> bool:
    """Whether `params` are w_ih, w_hh[, b_ih, b_hh] per layer and direction (no projections)."""
    return len(params) == num_layers * (2 if bidirectional else 1) * (4 if has_biases else 2)


@contextlib.contextmanager
def rnn_capture_shim():
    """Within this context nn.LSTM / nn.GRU call orca::lstm / orca::gru (see above). Not thread-safe:
    it swaps a module global of torch.nn.modules.rnn for the duration."""
    from torch.nn.modules import rnn as rnn_module

    original = rnn_module._VF
    rnn_module._VF = _VFShim(original)
    try:
        yield
    finally:
        rnn_module._VF = original


# -- gradients of the whole-RNN ops (fine-tuning a captured graph) -----------------------------
# The backward recomputes torch's own differentiable RNN on detached copies of the inputs and
# differentiates that: torch's gradients, at the price of a second forward. It runs in the autograd
# engine, not inside an op, because a custom op's kernel runs below the Autograd dispatch key (it
# could not build a graph). It is written for eager training (orca_compiler.finetune); tracing a
# training graph through it (torch.compile, aot_autograd) is not something we rely on.

_RNN_FLAGS = ("has_biases", "num_layers", "dropout", "train", "bidirectional", "batch_first")


def _setup_rnn_context(ctx, inputs, output) -> None:
    x, hx, params, *flags = inputs
    hx = [hx] if isinstance(hx, Tensor) else list(hx)
    ctx.hx_is_list = not isinstance(inputs[1], Tensor)
    ctx.counts = (len(hx), len(params))
    ctx.flags = tuple(flags)
    ctx.save_for_backward(x, *hx, *params)


def _rnn_backward(aten_rnn, ctx, *grads: Tensor):
    """Gradients of `aten_rnn` (aten.lstm.input / aten.gru.input) for (x, hx, params)."""
    _, num_layers, dropout, train, _, _ = ctx.flags
    if train and dropout > 0 and num_layers > 1:
        # a recomputed forward would draw another dropout mask than the one the forward used
        raise NotImplementedError("orca.lstm / orca.gru have no gradient with dropout in training mode")
    saved = ctx.saved_tensors
    n_hx, n_params = ctx.counts
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in saved]
        x, hx, params = leaves[0], leaves[1:1 + n_hx], leaves[1 + n_hx:]
        outputs = aten_rnn(x, hx if ctx.hx_is_list else hx[0], params, *ctx.flags)
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None]
        wanted = [t for t in leaves if t.requires_grad]
        found = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
    result = [next(found) if t.requires_grad else None for t in leaves]
    grad_hx = result[1:1 + n_hx]
    return (result[0], grad_hx if ctx.hx_is_list else grad_hx[0], result[1 + n_hx:]) + (None,) * len(_RNN_FLAGS)


torch.library.register_autograd(
    "orca::lstm", lambda ctx, *grads: _rnn_backward(torch.ops.aten.lstm.input, ctx, *grads),
    setup_context=_setup_rnn_context,
)
torch.library.register_autograd(
    "orca::gru", lambda ctx, *grads: _rnn_backward(torch.ops.aten.gru.input, ctx, *grads),
    setup_context=_setup_rnn_context,
)
