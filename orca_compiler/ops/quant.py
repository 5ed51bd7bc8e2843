"""Quantized ops: what the quantize passes (passes/quantize.py) put in the IR.

Integers are symmetric (zero point 0) everywhere: int8 in [-127, 127], int4 in [-8, 7].
- `orca::linear_wq(x, qweight, scales, bias?, bits, group)`: weight-only quantized linear,
  `linear(x, dequantize(qweight), bias)`. `qweight` is int8 `[N, K]` (bits=8) or uint8
  `[N, ceil(K/2)]` (bits=4: two weights a byte, the even column in the low nibble, stored +8);
  `scales` is float32 `[N, ceil(K/group)]`: one scale per output row and group of `group`
  consecutive input columns (group = K: per channel).
- `orca::embedding_wq(qweight, scales, indices, bits)`: an embedding whose table is quantized
  like a weight-only linear's, one scale per row (`scales: [V, 1]`).
- `orca::conv2d_wq(x, qweight, scales, bias?, weight_shape, stride, padding, dilation, groups, bits,
  group)`: weight-only quantized conv2d, `conv2d(x, dequantize(qweight).reshape(weight_shape), bias)`.
  The weight `[O, C/groups, kh, kw]` is stored flattened to `[O, K]` (K = C/groups * kh * kw, in
  (c, kh, kw) order) and quantized like linear_wq's: int8 `[O, K]` or uint8 `[O, ceil(K/2)]`,
  scales `[O, ceil(K/group)]`.
- `orca::linear_dq(x, qweight, wscale, bias?, smooth?)`: dynamic int8 linear. Each row of `x`
  (times `smooth`, a per-input-channel factor `[K]` when given) is quantized at run time with its
  own scale (absmax / 127), multiplied with the int8 weight (per-output-channel `wscale: [N]`,
  its columns already divided by `smooth`) in int32, and the int32 sums are scaled back to
  float32. `smooth` is SmoothQuant's migration of activation outliers into the weight: the
  product is unchanged, but a few huge input channels no longer crush every other channel's
  resolution (BERT's hidden states have such channels).
- `orca::quantize(x, scale) -> int8` and `orca::dequantize(q, scale) -> float32`: per-tensor,
  with a scale frozen by calibration (static mode).
- `orca::linear_q(xq, x_scale, qweight, wscale, bias?, out_scale, activation)` and
  `orca::conv2d_q(xq, x_scale, qweight, wscale, bias?, stride, padding, dilation, groups, out_scale,
  activation)`: static int8 ops. int8 x int8 -> int32 accumulate; the epilogue scales by
  `x_scale * wscale[n]`, adds the float bias, applies the activation ("none" or "relu"), and
  requantizes to int8 with `out_scale` (the next int8 op's input scale) when `out_scale > 0`,
  else returns float32.

The eager implementations below are the reference semantics (and the lowering's "torch"
candidate): integer products are summed in float64, which is exact for these sizes, so they equal
an int32 accumulator bit for bit.
"""
from __future__ import annotations

import torch
from torch import Tensor

INT8_MAX = 127
INT4_MIN, INT4_MAX = -8, 7
INT4_OFFSET = 8
ACTIVATIONS = ("none", "relu")


# -- quantizing weights ---------------------------------------------------------------------------

def quantize_weight(weight: Tensor, bits: int, group: int | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric quantization of a 2-d `[N, K]` float weight: `(qweight, scales)` as the ops above
    store them (int4 packed). `group` columns share a scale (None: the whole row, per channel)."""
    weight = weight.detach().float()
    rows, cols = weight.shape
    group = cols if group is None or group >= cols else group
    groups = -(-cols // group)
    padded = torch.nn.functional.pad(weight, (0, groups * group - cols)).reshape(rows, groups, group)
    top = INT8_MAX if bits == 8 else INT4_MAX
    scales = (padded.abs().amax(-1) / top).clamp_min(torch.finfo(torch.float32).tiny)
    low = -INT8_MAX if bits == 8 else INT4_MIN
    q = torch.round(padded / scales[..., None]).clamp_(low, top).reshape(rows, groups * group)[:, :cols]
    q = q.to(torch.int8)
    return (q if bits == 8 else pack_int4(q)), scales.contiguous()


def pack_int4(q: Tensor) -> Tensor:
    """int8 values in [-8, 7], `[N, K]` -> uint8 `[N, ceil(K/2)]` (even column in the low nibble)."""
    shifted = (q.to(torch.int16) + INT4_OFFSET).to(torch.uint8)
    if shifted.shape[1] % 2:
        shifted = torch.nn.functional.pad(shifted, (0, 1), value=INT4_OFFSET)
    return (shifted[:, 0::2] | (shifted[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: Tensor, cols: int) -> Tensor:
    """The inverse of pack_int4: int8 `[N, cols]`."""
    low = (packed & 15).to(torch.int8) - INT4_OFFSET
    high = (packed >> 4).to(torch.int8) - INT4_OFFSET
    return torch.stack([low, high], -1).reshape(packed.shape[0], -1)[:, :cols]


def dequantize_weight(qweight: Tensor, scales: Tensor, bits: int, cols: int) -> Tensor:
    """The float32 `[N, cols]` weight a quantized one stands for."""
    q = qweight if bits == 8 else unpack_int4(qweight, cols)
    group = -(-cols // scales.shape[1])
    return (q.float() * scales.repeat_interleave(group, dim=1)[:, :cols]).contiguous()


def int_matmul(a: Tensor, b_t: Tensor) -> Tensor:
    """Exact `a @ b_t.T` of integer tensors, as float64 (an int32 accumulator's value)."""
    return a.double() @ b_t.double().t()


def quantize_rows(x: Tensor, smooth: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Dynamic quantization of each row (last dim) of `x` (times `smooth`, per column):
    `(int8 values, float32 scales [rows])`."""
    rows = x.reshape(-1, x.shape[-1]).float()
    if smooth is not None:
        rows = rows * smooth
    scales = (rows.abs().amax(-1) / INT8_MAX).clamp_min(1e-12)
    return torch.round(rows / scales[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scales


def quantize_tensor(x: Tensor, scale: float) -> Tensor:
    """Per-tensor symmetric int8 with a frozen `scale`."""
    return torch.round(x.float() / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)


def _epilogue(acc: Tensor, scale: Tensor, bias: Tensor | None, out_scale: float, activation: str) -> Tensor:
    out = acc * scale.double()
    if bias is not None:
        out = out + bias.double()
    out = out.float()
    if activation == "relu":
        out = out.clamp_min(0)
    return quantize_tensor(out, out_scale) if out_scale > 0 else out


# -- the ops --------------------------------------------------------------------------------------

def linear_wq_impl(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, bits: int, group: int) -> Tensor:
    return torch.nn.functional.linear(x, dequantize_weight(qweight, scales, bits, x.shape[-1]), bias)


def conv2d_wq_impl(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, weight_shape: list[int],
                   stride: list[int], padding: list[int], dilation: list[int], groups: int, bits: int,
                   group: int) -> Tensor:
    cols = weight_shape[1] * weight_shape[2] * weight_shape[3]
    weight = dequantize_weight(qweight, scales, bits, cols).reshape(weight_shape)
    return torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)


def embedding_wq_impl(qweight: Tensor, scales: Tensor, indices: Tensor, bits: int) -> Tensor:
    rows = qweight[indices]
    cols = rows.shape[-1] * (2 if bits == 4 else 1)
    flat = rows.reshape(-1, rows.shape[-1])
    q = flat if bits == 8 else unpack_int4(flat, cols)
    return (q.float() * scales[indices].reshape(-1, 1)).reshape(*indices.shape, -1)


def linear_dq_impl(x: Tensor, qweight: Tensor, wscale: Tensor, bias: Tensor | None,
                   smooth: Tensor | None = None) -> Tensor:
    xq, xscale = quantize_rows(x, smooth)
    acc = int_matmul(xq, qweight) * xscale.double()[:, None]
    out = _epilogue(acc, wscale, bias, 0.0, "none")
    return out.reshape(*x.shape[:-1], qweight.shape[0])


def quantize_impl(x: Tensor, scale: float) -> Tensor:
    return quantize_tensor(x, scale)


def dequantize_impl(q: Tensor, scale: float) -> Tensor:
    return q.float() * scale


def linear_q_impl(xq: Tensor, x_scale: float, qweight: Tensor, wscale: Tensor, bias: Tensor | None,
                  out_scale: float, activation: str) -> Tensor:
    flat = xq.reshape(-1, xq.shape[-1])
    acc = int_matmul(flat, qweight) * x_scale
    out = _epilogue(acc, wscale, bias, out_scale, activation)
    return out.reshape(*xq.shape[:-1], qweight.shape[0])


def conv2d_q_impl(xq: Tensor, x_scale: float, qweight: Tensor, wscale: Tensor, bias: Tensor | None,
                  stride: list[int], padding: list[int], dilation: list[int], groups: int, out_scale: float,
                  activation: str) -> Tensor:
    acc = torch.nn.functional.conv2d(xq.double(), qweight.double(), None, stride, padding, dilation, groups) * x_scale
    # the linear ops' epilogue, with channels last so that scale and bias broadcast over them
    return _epilogue(acc.movedim(1, -1), wscale, bias, out_scale, activation).movedim(-1, 1).contiguous()


# -- shape functions -------------------------------------------------------------------------------

def _check(condition: bool, op: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{op}: {message}")


def _linear_wq_fake(x, qweight, scales, bias, bits, group):
    cols = qweight.shape[1] * (2 if bits == 4 else 1)
    _check(bits in (4, 8), "linear_wq", f"bits must be 4 or 8, got {bits}")
    _check(x.shape[-1] in (cols, cols - 1), "linear_wq", f"x has {x.shape[-1]} features, the weight {cols}")
    return x.new_empty((*x.shape[:-1], qweight.shape[0]), dtype=torch.float32)


def _conv2d_wq_fake(x, qweight, scales, bias, weight_shape, stride, padding, dilation, groups, bits, group):
    _check(bits in (4, 8), "conv2d_wq", f"bits must be 4 or 8, got {bits}")
    _check(len(weight_shape) == 4, "conv2d_wq", f"weight_shape must be [O, C/groups, kh, kw], got {weight_shape}")
    cols = weight_shape[1] * weight_shape[2] * weight_shape[3]
    stored = qweight.shape[1] * (2 if bits == 4 else 1)
    _check(qweight.shape[0] == weight_shape[0] and stored in (cols, cols + 1), "conv2d_wq",
           f"the quantized weight {list(qweight.shape)} ({bits}-bit) does not hold {weight_shape}")
    _check(scales.shape == (weight_shape[0], -(-cols // group)), "conv2d_wq",
           f"scales {list(scales.shape)} do not match groups of {group} of {cols} input values")
    return torch.nn.functional.conv2d(x, x.new_empty(weight_shape), None, stride, padding, dilation, groups)


def _embedding_wq_fake(qweight, scales, indices, bits):
    cols = qweight.shape[1] * (2 if bits == 4 else 1)
    return scales.new_empty((*indices.shape, cols), dtype=torch.float32)


def _linear_dq_fake(x, qweight, wscale, bias, smooth=None):
    _check(x.shape[-1] == qweight.shape[1], "linear_dq", f"x has {x.shape[-1]} features, the weight {qweight.shape[1]}")
    return x.new_empty((*x.shape[:-1], qweight.shape[0]), dtype=torch.float32)


def _quantize_fake(x, scale):
    return x.new_empty(x.shape, dtype=torch.int8)


def _dequantize_fake(q, scale):
    return q.new_empty(q.shape, dtype=torch.float32)


def _out_dtype(out_scale: float):
    return torch.int8 if out_scale > 0 else torch.float32


def _linear_q_fake(xq, x_scale, qweight, wscale, bias, out_scale, activation):
    _check(activation in ACTIVATIONS, "linear_q", f"activation {activation!r} is not one of {ACTIVATIONS}")
    return xq.new_empty((*xq.shape[:-1], qweight.shape[0]), dtype=_out_dtype(out_scale))


def _conv2d_q_fake(xq, x_scale, qweight, wscale, bias, stride, padding, dilation, groups, out_scale, activation):
    _check(activation in ACTIVATIONS, "conv2d_q", f"activation {activation!r} is not one of {ACTIVATIONS}")
    meta = torch.nn.functional.conv2d(xq.new_empty(xq.shape, dtype=torch.float32),
                                      qweight.new_empty(qweight.shape, dtype=torch.float32), None, stride, padding,
                                      dilation, groups)
    return meta.new_empty(meta.shape, dtype=_out_dtype(out_scale))


def _define(name: str, impl, fake):
    torch.library.custom_op(f"orca::{name}", mutates_args=())(impl).register_fake(fake)
    return getattr(torch.ops.orca, name).default


LINEAR_WQ = _define("linear_wq", linear_wq_impl, _linear_wq_fake)
EMBEDDING_WQ = _define("embedding_wq", embedding_wq_impl, _embedding_wq_fake)
CONV2D_WQ = _define("conv2d_wq", conv2d_wq_impl, _conv2d_wq_fake)
LINEAR_DQ = _define("linear_dq", linear_dq_impl, _linear_dq_fake)
QUANTIZE = _define("quantize", quantize_impl, _quantize_fake)
DEQUANTIZE = _define("dequantize", dequantize_impl, _dequantize_fake)
LINEAR_Q = _define("linear_q", linear_q_impl, _linear_q_fake)
CONV2D_Q = _define("conv2d_q", conv2d_q_impl, _conv2d_q_fake)

# The eager code of each op, called directly by the lowering's "torch" candidate.
EAGER = {LINEAR_WQ: linear_wq_impl, EMBEDDING_WQ: embedding_wq_impl, CONV2D_WQ: conv2d_wq_impl, LINEAR_DQ: linear_dq_impl,
         QUANTIZE: quantize_impl, DEQUANTIZE: dequantize_impl, LINEAR_Q: linear_q_impl, CONV2D_Q: conv2d_q_impl}

# The heavy quantized ops: their kernel is chosen by measurement (an integer kernel against
# float32 kernels on the dequantized weight).
HEAVY = frozenset({LINEAR_WQ, LINEAR_DQ, LINEAR_Q, CONV2D_Q, CONV2D_WQ})
QUANT_OP_NAMES = frozenset(f"orca.{op._opname}" for op in HEAVY)
