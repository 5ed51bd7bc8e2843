"""TVM kernel of the weight-only quantized conv2d (orca::conv2d_wq, ops/quant.py).

One TE compute: zero padding, then the convolution's reduction over (c, kh, kw) reading the int8
weight (or for int4 the nibble of a packed byte) and converting it to float32 inside the
reduction, in registers. The float32 weight is never stored in the program, and never
materialized either: a per-output-channel scale multiplies the finished sum in the epilogue
(with the bias), a per-group scale each term. Our CPU rule `Tiled` (cpu_schedules.py) schedules it
like Relax's own conv2d: a tile of output channels x a vector of output columns, the weight read
as scalars broadcast over the vector.

`DEQUANTIZE_IN_KERNEL = False` gives the other design: a prologue stage of the same PrimFunc
dequantizes the whole weight into a float32 scratch buffer on every call, and the conv reads that
(measured against the in-register form in docs/quantization.md). It cannot be a separate Relax
function: TVM's FoldConstant would evaluate a dequantization of constants at build time and store
the float32 weight.

Whether the integer kernel or a float32 one (oneDNN on the weight dequantized once, at bind time)
runs a layer is the kernel selection's measurement (extern.py); the report says which.
"""
from __future__ import annotations

import functools

import torch.fx as fx

from ..errors import LoweringError
from ..ops import quant
from .support import register_converter

# In-register dequantization (True) or a per-call dequantize prologue into scratch (False).
DEQUANTIZE_IN_KERNEL = False


def _conv2d_wq_te(x, w, scales, *rest, weight_shape, stride, padding, dilation, groups: int, bits: int, group: int,
                  in_kernel: bool):
    from tvm import te, topi

    from .quant_kernels import _nibble

    bias = rest[0] if rest else None
    out_channels, channels_per_group, kh_size, kw_size = weight_shape
    batch, _, height, width = x.shape
    ph, pw = padding
    sh, sw = stride
    dh, dw = dilation
    out_h = (height + 2 * ph - dh * (kh_size - 1) - 1) // sh + 1
    out_w = (width + 2 * pw - dw * (kw_size - 1) - 1) // sw + 1
    padded = topi.nn.pad(x, [0, 0, ph, pw], [0, 0, ph, pw], name="pad") if ph or pw else x
    per_channel = scales.shape[1] == 1
    per_group_out = out_channels // groups

    def dequantized(o, c, kh, kw):
        k = (c * kh_size + kh) * kw_size + kw
        value = w[o, k].astype("float32") if bits == 8 else _nibble(w[o, k // 2], (k % 2) * 4)
        return value if per_channel else value * scales[o, k // group]

    weight = dequantized
    if not in_kernel:
        stage = te.compute(tuple(weight_shape), dequantized, name="w_dequant")
        weight = lambda o, c, kh, kw: stage[o, c, kh, kw]  # noqa: E731

    rc = te.reduce_axis((0, channels_per_group), "rc")
    rh = te.reduce_axis((0, kh_size), "rh")
    rw = te.reduce_axis((0, kw_size), "rw")

    def channel(o):
        # groups == 1: the input does not depend on the output channel, so the CPU rule tiles them
        return rc if groups == 1 else (o // per_group_out) * channels_per_group + rc

    acc = te.compute(
        (batch, out_channels, out_h, out_w),
        lambda n, o, y, xx: te.sum(padded[n, channel(o), y * sh + rh * dh, xx * sw + rw * dw] * weight(o, rc, rh, rw),
                                   axis=[rc, rh, rw]),
        name="acc")

    def epilogue(n, o, y, xx):
        value = acc[n, o, y, xx] * scales[o, 0] if per_channel else acc[n, o, y, xx]
        return value if bias is None else value + bias[o]

    return te.compute(acc.shape, epilogue, name="out")


def convert_conv2d_wq(node: fx.Node, importer):
    """orca.conv2d_wq -> one TE conv that dequantizes its integer weight in registers."""
    from tvm import relax as rx

    from .quant_kernels import _const, kernel_name

    x, qweight, scales, bias, weight_shape, stride, padding, dilation, groups, bits, group = node.args
    if len(stride) != 2 or len(padding) != 2 or len(dilation) != 2:
        raise LoweringError(f"%{node.name}: conv2d_wq takes 2-d stride/padding/dilation, got "
                            f"{stride}, {padding}, {dilation}")
    if x.meta["val"].dtype != __import__("torch").float32:
        raise LoweringError(f"%{node.name}: conv2d_wq's kernel is float32 only, got {x.meta['val'].dtype}")
    operands = [importer.env[x], rx.const(_const(importer, qweight, "weight").numpy()),
                rx.const(_const(importer, scales, "scale").numpy())]
    if bias is not None:
        operands.append(importer.env[bias])
    te_fn = functools.partial(_conv2d_wq_te, weight_shape=list(weight_shape), stride=list(stride),
                              padding=list(padding), dilation=list(dilation), groups=int(groups), bits=int(bits),
                              group=int(group), in_kernel=DEQUANTIZE_IN_KERNEL)
    return importer.block_builder.emit_te(te_fn, *operands, primfunc_name_hint=kernel_name("orca_conv2d_wq"))


register_converter(quant.CONV2D_WQ, convert_conv2d_wq)
