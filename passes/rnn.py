"""Decompose LSTM and GRU layers into a hoisted input GEMM and one recurrence op per direction.

`aten.lstm.input` / `aten.gru.input` (any number of layers, bidirectional or not, batch_first or
not, with or without initial state) become, for each layer:

    xproj = linear(layer_input, W_ih of all directions, input biases)      # all time steps at once
    out_d, h_d[, c_d] = orca.lstm_scan / orca.gru_scan(xproj, W_hh^T, ...)  # one per direction
    layer_output = out_0 (or cat([out_0, out_1], -1) when bidirectional)

and the final states are stacked as torch returns them. Only the `[B, H] x [H, gates*H]` recurrent
GEMV and the gate math stay inside the time loop (orca_compiler/ops/rnn.py has the layouts). The
input GEMM is an ordinary `linear`, so the kernel selection picks its kernel like any other.

Left whole (counted in `skipped`): LSTMs with projections (`proj_size`), non-float32 RNNs, and
RNNs whose weights are computed at run time rather than stored.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from orca_compiler.ir import GraphIR
from orca_compiler.ops.rnn import GRU, GRU_SCAN, LSTM, LSTM_SCAN
from orca_compiler.pass_base import Pass, PassContext, PassResult, register_pass

aten = torch.ops.aten


@dataclass(frozen=True)
class _Cell:
    """What differs between the LSTM and the GRU: gate count, states, and the scan op."""

    kind: str
    gates: int
    states: int
    scan: torch._ops.OpOverload


_CELLS = {
    aten.lstm.input: _Cell("lstm", 4, 2, LSTM_SCAN),
    aten.gru.input: _Cell("gru", 3, 1, GRU_SCAN),
    LSTM: _Cell("lstm", 4, 2, LSTM_SCAN),  # the same RNNs, captured with a symbolic sequence length
    GRU: _Cell("gru", 3, 1, GRU_SCAN),
}


@dataclass
class _RNNCall:
    """The arguments of one aten.lstm.input / aten.gru.input node, by name."""

    x: fx.Node
    states: list
    params: list
    has_biases: bool
    num_layers: int
    bidirectional: bool
    batch_first: bool

    @classmethod
    def of(cls, node: fx.Node, cell: _Cell) -> "_RNNCall":
        x, hx, params, has_biases, num_layers, _dropout, _train, bidirectional, batch_first = node.args
        states = list(hx) if cell.states > 1 else [hx]
        return cls(x, states, list(params), has_biases, num_layers, bidirectional, batch_first)

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def per_direction(self) -> int:
        return 4 if self.has_biases else 2

    def weights(self, layer: int, direction: int) -> list[fx.Node]:
        """[w_ih, w_hh] or [w_ih, w_hh, b_ih, b_hh] of one layer direction."""
        start = (layer * self.directions + direction) * self.per_direction
        return self.params[start:start + self.per_direction]


def _why_not(call: _RNNCall) -> str | None:
    """Why the node stays whole, or None."""
    if len(call.params) != call.num_layers * call.directions * call.per_direction:
        return "has projections (proj_size)"
    if not all(isinstance(p, fx.Node) and p.op == "get_attr" for p in call.params):
        return "weights computed at run time"
    if call.x.meta["val"].dtype != torch.float32:
        return f"dtype {call.x.meta['val'].dtype}"
    return None


class _Decomposer:
    """Rewrites one RNN node; `ir.graph`'s insertion point must be before the node."""

    def __init__(self, ir: GraphIR, node: fx.Node, cell: _Cell, call: _RNNCall):
        self.ir, self.node, self.cell, self.call = ir, node, cell, call

    def weight(self, node: fx.Node) -> torch.Tensor:
        return self.ir.weight(node)

    def input_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W_ih of all directions stacked, and the biases that can be added before the loop."""
        ws, bs = [], []
        for d in range(self.call.directions):
            w = self.call.weights(layer, d)
            ws.append(self.weight(w[0]))
            if self.call.has_biases:
                b_ih, b_hh = self.weight(w[2]), self.weight(w[3])
                if self.cell.kind == "gru":  # b_hn stays in the loop, inside r * (...)
                    hidden = b_hh.shape[0] // 3
                    b_hh = torch.cat([b_hh[:2 * hidden], torch.zeros_like(b_hh[2 * hidden:])])
                bs.append(b_ih + b_hh)
        return torch.cat(ws), (torch.cat(bs) if bs else None)

    def initial_state(self, which: int, index: int) -> fx.Node:
        state = self.call.states[which]
        if state.op == "get_attr":  # zeros folded by fold-constants, or a stored state
            return self.ir.add_weight(f"{self.node.name}_h{which}_{index}", self.weight(state)[index])
        return self.ir.create_node(aten.select.int, (state, 0, index))

    def scan(self, layer: int, direction: int, xproj: fx.Node) -> list[fx.Node]:
        """The scan node of one direction, unpacked: [out, h_n] or [out, h_n, c_n]."""
        w = self.call.weights(layer, direction)
        w_hh = self.weight(w[1])
        hidden = w_hh.shape[1]
        name = f"{self.node.name}_l{layer}{'_reverse' if direction else ''}"
        w_hh_t = self.ir.add_weight(f"{name}_w_hh_t", w_hh.t().contiguous())
        states = [self.initial_state(s, layer * self.call.directions + direction) for s in range(self.cell.states)]
        flags = (direction == 1, direction * self.cell.gates * hidden, self.call.batch_first)
        if self.cell.kind == "lstm":
            args = (xproj, w_hh_t, states[0], states[1], *flags)
        else:
            b_hn = self.weight(w[3])[2 * hidden:] if self.call.has_biases else w_hh.new_zeros(hidden)
            args = (xproj, w_hh_t, self.ir.add_weight(f"{name}_b_hn", b_hn), states[0], *flags)
        scan = self.ir.create_node(self.cell.scan, args, name=f"{name}_scan")
        return [self.ir.create_node(operator.getitem, (scan, i)) for i in range(1 + self.cell.states)]

    def rewrite(self) -> list[fx.Node]:
        """Emit the decomposition; returns the nodes standing for the RNN's outputs."""
        ir, call = self.ir, self.call
        layer_input = call.x
        finals: list[list[fx.Node]] = [[] for _ in range(self.cell.states)]
        for layer in range(call.num_layers):
            w_ih, bias = self.input_weights(layer)
            w_node = ir.add_weight(f"{self.node.name}_l{layer}_w_ih", w_ih)
            b_node = ir.add_weight(f"{self.node.name}_l{layer}_b_ih", bias) if bias is not None else None
            xproj = ir.create_node(aten.linear.default, (layer_input, w_node, b_node), name=f"{self.node.name}_l{layer}_xproj")
            outs = []
            for direction in range(call.directions):
                out, *states = self.scan(layer, direction, xproj)
                outs.append(out)
                for final, state in zip(finals, states):
                    final.append(state)
            layer_input = outs[0] if len(outs) == 1 else ir.create_node(aten.cat.default, (outs, 2))
        stacked = [ir.create_node(aten.stack.default, (final, 0)) for final in finals]
        return [layer_input, *stacked]


@register_pass
class DecomposeRNN(Pass):
    """Decompose LSTM/GRU into a hoisted input GEMM per layer and one recurrence op per direction."""

    name = "decompose-rnn"

    def run(self, ir: GraphIR, ctx: PassContext) -> PassResult:
        stats = {"lstm": 0, "gru": 0, "skipped": 0}
        for node in list(ir.graph.nodes):
            cell = _CELLS.get(node.target) if node.op == "call_function" else None
            if cell is None:
                continue
            call = _RNNCall.of(node, cell)
            if _why_not(call) is not None or not _outputs_are_getitems(node):
                stats["skipped"] += 1
                continue
            with ir.graph.inserting_before(node):
                results = _Decomposer(ir, node, cell, call).rewrite()
            for user in list(node.users):
                user.replace_all_uses_with(results[user.args[1]])
                ir.graph.erase_node(user)
            ir.graph.erase_node(node)
            stats[cell.kind] += 1
        changed = stats["lstm"] + stats["gru"] > 0
        if changed:
            ir.drop_unused_weights()
        return PassResult(ir, changed, stats)


def _outputs_are_getitems(node: fx.Node) -> bool:
    return all(u.target is operator.getitem and isinstance(u.args[1], int) for u in node.users)

