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

The eager implementations loop in Python (reference semantics, and eager fallback); the lowering
(lowering/rnn_kernels.py) turns each op into one TVM kernel with the time loop inside.
"""
from __future__ import annotations

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


@torch.library.custom_op("orca::lstm_scan", mutates_args=())
def lstm_scan(xproj: Tensor, w_hh_t: Tensor, h0: Tensor, c0: Tensor, reverse: bool, column: int,
              batch_first: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM direction over all steps (see the module docstring for the layouts)."""
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


@torch.library.custom_op("orca::gru_scan", mutates_args=())
def gru_scan(xproj: Tensor, w_hh_t: Tensor, b_hn: Tensor, h0: Tensor, reverse: bool, column: int,
             batch_first: bool) -> tuple[Tensor, Tensor]:
    """One GRU direction over all steps (see the module docstring for the layouts)."""
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
