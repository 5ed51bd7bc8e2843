"""Relax converters for the fused ops (ops/fused.py): each emits its group's ops back to back, and
TVM's FuseOps makes one kernel of them (a conv or matmul with its elementwise epilogue, a chain of
elementwise ops). Imported lazily by support.py, which registers them.

Converters take `(node, importer)` (TVM's custom_convert_map form), read their operands from
`importer.env` and emit through `importer.block_builder`.
"""
from __future__ import annotations

import functools
import operator

import torch
import torch.fx as fx

from ..errors import LoweringError
from ..ops import fused
from ..ops.pointwise import POINTWISE, arguments, run_program
from .support import register_converter


def _env(importer, value):
    return None if value is None else importer.env[value]


def _dtype(node: fx.Node) -> str:
    return str(node.meta["val"].dtype).replace("torch.", "")


def _emit_epilogue(importer, out, residual, activation: str, act_args: list[float]):
    """`act(out + residual)` in Relax, the order of the fused op's eager code."""
    from tvm import relax as rx

    bb = importer.block_builder
    if residual is not None:
        out = bb.emit(rx.op.add(out, residual))
    if activation == fused.NO_ACTIVATION:
        return out
    fused.check_activation(activation, act_args)
    return bb.emit(POINTWISE[activation].relax(rx, out, *act_args))


def convert_conv_epilogue(node: fx.Node, importer):
    a = arguments(node)
    weight = importer.env[a["weight"]]
    impl = {3: importer._conv1d_impl, 4: importer._conv2d_impl, 5: importer._conv3d_impl}[weight.ty.ndim]
    out = impl(importer.env[a["x"]], weight, bias=_env(importer, a["bias"]), strides=a["stride"],
               padding=a["padding"], dilation=a["dilation"], groups=a["groups"])
    return _emit_epilogue(importer, out, _env(importer, a["residual"]), a["activation"], a["act_args"])


def convert_linear_epilogue(node: fx.Node, importer):
    from tvm import relax as rx

    a = arguments(node)
    x, weight, bias = (_env(importer, a[k]) for k in ("x", "weight", "bias"))
    bb, dtype = importer.block_builder, _dtype(node)
    if dtype in ("float16", "bfloat16"):  # accumulate in float32 as torch does (lowering/low_precision.py)
        bias = None if bias is None else bb.emit(rx.op.astype(bias, "float32"))
        out = bb.emit(rx.op.astype(bb.emit(rx.op.linear(x, weight, bias, "float32")), dtype))
    else:
        out = bb.emit(rx.op.linear(x, weight, bias, dtype))
    return _emit_epilogue(importer, out, _env(importer, a["residual"]), a["activation"], a["act_args"])


def convert_attention(node: fx.Node, importer):
    """orca.attention -> Relax's fused attention (see _emit_attention)."""
    a = arguments(node)
    return _emit_attention(importer, a["q"], a["k"], a["v"], a["mask"], a["scale"], a["is_causal"])


def convert_aten_sdpa(node: fx.Node, importer):
    """aten.scaled_dot_product_attention, which TVM 0.27's own converter gets wrong: it drops
    `scale` (an explicit scale=0.3 gave errors of 0.23). Dropout and grouped heads are refused
    (the node then runs in eager and is reported)."""
    a = arguments(node)
    if a["dropout_p"] or a["enable_gqa"]:
        raise LoweringError(f"%{node.name}: sdpa with dropout or grouped-query heads is not lowered")
    return _emit_attention(importer, a["query"], a["key"], a["value"], a["attn_mask"], a["scale"], a["is_causal"])


def _relax_dtype(expr) -> str:
    dtype = expr.ty.dtype
    return str(getattr(dtype, "dtype", dtype))


def _emit_attention(importer, q_node, k_node, v_node, mask_node, scale, is_causal):
    """Relax's fused attention (layout [batch, seq, heads, dim]) on q/k/v of any rank >= 2: a 4-d
    [batch, heads, seq, dim] input swaps its middle axes, as TVM's own sdpa converter does; other
    ranks fold their batch dims into one and use one head. Sizes are read from the Relax types,
    so symbolic (dynamic) dimensions stay symbolic."""
    from tvm import relax as rx

    bb = importer.block_builder
    a = {"mask": mask_node, "scale": scale, "is_causal": is_causal}
    q, k, v = (importer.env[n] for n in (q_node, k_node, v_node))
    q_shape, k_shape, v_shape = (list(importer.shape_of(t)) for t in (q, k, v))
    batch = q_shape[:-2]
    four_d = len(q_shape) == 4
    groups = functools.reduce(operator.mul, batch, 1)
    if four_d:
        to_bsnh = [bb.emit(rx.op.permute_dims(t, [0, 2, 1, 3])) for t in (q, k, v)]
    else:
        to_bsnh = [bb.emit(rx.op.reshape(t, [groups, shape[-2], 1, shape[-1]]))
                   for t, shape in ((q, q_shape), (k, k_shape), (v, v_shape))]
    bias = None
    if a["mask"] is not None:
        scores = batch + [q_shape[-2], k_shape[-2]]
        mask = importer.env[a["mask"]]
        if a["mask"].meta["val"].dtype == torch.bool:
            # torch: True attends, False is masked out. Relax's bias is added to the scores, so a
            # bool mask becomes 0 / the dtype's lowest value (Hugging Face BERT's sdpa mask is bool;
            # added as 1/0 it gave embeddings of cosine 0.56 against eager). The astype: Relax may
            # carry a bool computed by its own ops as another integer type.
            dtype = _relax_dtype(q)
            lowest = rx.const(float(torch.finfo(getattr(torch, dtype)).min), dtype)
            mask = bb.emit(rx.op.where(bb.emit(rx.op.astype(mask, "bool")), rx.const(0.0, dtype), lowest))
        bias = bb.emit(rx.op.broadcast_to(mask, scores))
        if not four_d:
            bias = bb.emit(rx.op.reshape(bias, [groups, 1] + scores[-2:]))
    out = bb.emit(rx.op.nn.attention(*to_bsnh, bias=bias, scale=a["scale"],
                                     causal_mask="TopLeft" if a["is_causal"] else None))
    if four_d:
        return bb.emit(rx.op.permute_dims(out, [0, 2, 1, 3]))
    return bb.emit(rx.op.reshape(out, q_shape[:-1] + [v_shape[-1]]))


def convert_elementwise(node: fx.Node, importer):
    from tvm import relax as rx

    bb, dtype = importer.block_builder, _dtype(node)
    inputs = [importer.env[n] for n in node.args[0]]

    def emit(entry, operands):
        tensors = [rx.const(o, dtype) if not isinstance(o, rx.Expr) and i < entry.arity else o
                   for i, o in enumerate(operands)]
        return bb.emit(entry.relax(rx, *tensors))

    return run_program(node.args[1], inputs, emit)


register_converter(fused.CONV_EPILOGUE, convert_conv_epilogue)
register_converter(fused.LINEAR_EPILOGUE, convert_linear_epilogue)
register_converter(fused.ATTENTION, convert_attention)
register_converter(torch.ops.aten.scaled_dot_product_attention.default, convert_aten_sdpa)
register_converter(fused.ELEMENTWISE, convert_elementwise)
