"""Fused ops: one node for a group of ATen ops that one kernel runs (created by the `fuse` pass).

- `orca::conv_epilogue(x, weight, bias?, stride, padding, dilation, groups, residual?, activation,
  act_args)` = `act(conv(x, weight, bias) + residual)`: conv1d/2d/3d by the weight's rank, and the
  order of oneDNN's (and Inductor's) conv post-ops: bias, then the residual add, then the activation.
- `orca::linear_epilogue(x, weight, bias?, residual?, activation, act_args)` = `act(linear(x) + residual)`.
- `orca::attention(q, k, v, mask?, scale?, is_causal)`: scaled_dot_product_attention without dropout
  (a float `mask` is added to the scores; `scale` None means 1/sqrt(head dim)).
- `orca::elementwise(inputs, program)`: a group of pointwise ops as one program over the inputs
  (program text: ops/pointwise.py).

`activation` names an activation of ops/pointwise.py, or "none"; `act_args` are its numbers (clamp's
bounds, leaky_relu's slope). The implementations below are the ops' eager semantics, their fake
(shape) functions, and the "torch" kernel candidates of the lowering (`EAGER`, called directly).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .pointwise import ACTIVATIONS, POINTWISE, run_program

NO_ACTIVATION = "none"
_CONVS = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def check_activation(activation: str, act_args) -> None:
    """ValueError unless `activation` is "none" or an activation of the pointwise table."""
    if activation != NO_ACTIVATION and activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {NO_ACTIVATION}, {', '.join(ACTIVATIONS)}")


def _epilogue(out: Tensor, residual: Tensor | None, activation: str, act_args: list[float]) -> Tensor:
    """`act(out + residual)`, in place on `out` (a fresh result of the conv or linear)."""
    if residual is not None:
        out = out.add_(residual)
    if activation == NO_ACTIVATION:
        return out
    check_activation(activation, act_args)
    return POINTWISE[activation].inplace(out, *act_args)


def conv_epilogue_impl(x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int],
                       dilation: list[int], groups: int, residual: Tensor | None, activation: str,
                       act_args: list[float]) -> Tensor:
    conv = _CONVS.get(weight.dim())
    if conv is None:
        raise ValueError(f"conv_epilogue takes a 3-, 4- or 5-d weight (conv1d/2d/3d), got {weight.dim()}-d")
    return _epilogue(conv(x, weight, bias, stride, padding, dilation, groups), residual, activation, act_args)


def linear_epilogue_impl(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None, activation: str,
                         act_args: list[float]) -> Tensor:
    return _epilogue(F.linear(x, weight, bias), residual, activation, act_args)


def attention_impl(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None,
                   is_causal: bool) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=is_causal)


def elementwise_impl(inputs: list[Tensor], program: str) -> Tensor:
    return run_program(program, inputs, lambda entry, operands: entry.torch(*operands))


def _define(name: str, impl: Callable) -> torch._ops.OpOverload:
    op = torch.library.custom_op(f"orca::{name}", mutates_args=())(impl)
    # The eager code only calls ATen ops, so it computes shapes on FakeTensors as well.
    op.register_fake(impl)
    return getattr(torch.ops.orca, name).default


CONV_EPILOGUE = _define("conv_epilogue", conv_epilogue_impl)
LINEAR_EPILOGUE = _define("linear_epilogue", linear_epilogue_impl)
ATTENTION = _define("attention", attention_impl)
ELEMENTWISE = _define("elementwise", elementwise_impl)

# The Python implementations, for callers that skip the dispatcher (the "torch" kernels).
EAGER: dict[torch._ops.OpOverload, Callable] = {
    CONV_EPILOGUE: conv_epilogue_impl,
    LINEAR_EPILOGUE: linear_epilogue_impl,
    ATTENTION: attention_impl,
    ELEMENTWISE: elementwise_impl,
}
