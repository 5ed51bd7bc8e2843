"""TVM kernels of the quantized ops (ops/quant.py): integer weights stay integers in the program.

Each converter emits TE computes (`emit_te`), which our CPU schedule rules (cpu_schedules.py) then
schedule like any matmul: the weight is stored transposed (`[K, N]`, int8, or uint8 with two int4
values a byte) so that a vector of output columns reads a unit-stride vector of weights, and the
dequantization happens in registers inside the reduction (int8 -> float32 convert, or for int4 a
shift and mask first), never as a materialized float32 weight. So a weight-only int8 linear reads
a quarter of the bytes a float32 one does, which is what pays at batch 1, where a linear is a
matrix-vector product bound by the weight's memory traffic.

- weight-only (`linear_wq`): float32 activations x dequantized weights, float32 accumulate; a
  per-channel scale is applied once in the epilogue, a per-group one inside the reduction.
- dynamic (`linear_dq`): one function quantizes each row of x (absmax / 127), a second multiplies
  int8 x int8 into int32 and scales back in its epilogue.
- static (`linear_q`, `conv2d_q`, `quantize`, `dequantize`): int8 x int8 -> int32 with the
  requantize (or dequantize) epilogue fused; the conv is Relax's conv2d with `out_dtype=int32`,
  or on the int8 dot-product instructions (int8_dot_kernels.py) where the target has them.

On CUDA the same TE computes go through TVM's default GPU pipeline (dlight's rules). Imported
lazily by support.py, which registers the converters.
"""
from __future__ import annotations

import functools
import itertools
import operator

import torch
import torch.fx as fx

from ..errors import LoweringError
from ..ops import quant
from .support import register_converter


_kernel_ids = itertools.count()


def kernel_name(base: str) -> str:
    """A PrimFunc name unique in this process: the kernel selection puts the kernels of many
    separately imported probes into one module, where names must not clash."""
    return f"{base}_{next(_kernel_ids)}"


def _const(importer, node: fx.Node, what: str) -> torch.Tensor:
    try:
        return importer.weights[node.name]
    except (KeyError, AttributeError):
        raise LoweringError(f"the {what} of a quantized op must be a constant weight (got %{node.name})") from None


def _flatten_rows(importer, x):
    """x `[..., K]` -> (`[M, K]`, the leading dims) in Relax."""
    from tvm import relax as rx

    shape = list(importer.shape_of(x))
    lead = shape[:-1]
    rows = functools.reduce(operator.mul, lead, 1)
    flat = x if len(shape) == 2 else importer.block_builder.emit(rx.op.reshape(x, [rows, shape[-1]]))
    return flat, lead


def _restore_rows(importer, out, lead, n: int):
    from tvm import relax as rx

    if len(lead) == 1:
        return out
    return importer.block_builder.emit(rx.op.reshape(out, [*lead, n]))


def _nibble(byte, shift):
    """The float32 int4 value in bits [shift, shift + 4) of a packed (uint8) weight byte."""
    from tvm import tirx

    bits = tirx.bitwise_and(tirx.shift_right(byte.astype("int32"), shift), tirx.const(15, "int32"))
    return (bits - quant.INT4_OFFSET).astype("float32")


def _int4_pair(w):
    """(low, high) float32 values of byte (k2, j) of a packed int4 `[K/2, N]` weight: columns
    2*k2 and 2*k2 + 1, each a constant shift and mask (so a vector of bytes unpacks in registers)."""
    return (lambda k2, j: _nibble(w[k2, j], 0)), (lambda k2, j: _nibble(w[k2, j], 4))


def _int4_column(w):
    """The float32 value of column k, row j of a packed int4 `[K/2, N]` weight (shift by k's parity)."""
    return lambda k, j: _nibble(w[k // 2, j], (k % 2) * 4)


def _linear_wq_te(x, w, scales, *rest, bits: int, group: int, cols: int, pairs: bool = True):
    """x `[M, K]` (K even for int4) x the transposed quantized weight -> `[M, N]` float32.
    int4 with `pairs` takes a byte's two columns per reduction step (constant shifts: vectorizes
    on CPU); without, one column a step (the form dlight's GPU rules accept)."""
    from tvm import te

    bias = rest[0] if rest else None
    rows, n = x.shape[0], w.shape[1]
    per_channel = scales.shape[0] == 1

    def scale(k, j):
        return 1.0 if per_channel else scales[k // group, j]

    if bits == 8 or not pairs:
        value = (lambda k, j: w[k, j].astype("float32")) if bits == 8 else _int4_column(w)
        k = te.reduce_axis((0, cols), "k")
        acc = te.compute((rows, n), lambda i, j: te.sum(x[i, k] * (value(k, j) * scale(k, j)), axis=k), name="acc")
    else:  # each byte holds two columns: one reduction step takes both
        low, high = _int4_pair(w)
        k2 = te.reduce_axis((0, w.shape[0]), "k2")
        acc = te.compute((rows, n), lambda i, j: te.sum(
            (x[i, 2 * k2] * low(k2, j) + x[i, 2 * k2 + 1] * high(k2, j)) * scale(2 * k2, j), axis=k2), name="acc")
    scaled = (lambda i, j: acc[i, j] * scales[0, j]) if per_channel else (lambda i, j: acc[i, j])
    if bias is None:
        return te.compute((rows, n), scaled, name="out")
    return te.compute((rows, n), lambda i, j: scaled(i, j) + bias[j], name="out")


def convert_linear_wq(node: fx.Node, importer):
    """orca.linear_wq -> a dequantize-in-registers matmul on the transposed integer weight."""
    import tvm
    from tvm import relax as rx

    x, qweight, scales, bias, bits, group = node.args
    weight = _const(importer, qweight, "weight").t().contiguous()
    scale = _const(importer, scales, "scale").t().contiguous()
    flat, lead = _flatten_rows(importer, importer.env[x])
    cols = x.meta["val"].shape[-1]
    if bits == 4 and cols % 2:  # the pair step reads column K: one zero column more
        flat = importer.block_builder.emit(rx.op.nn.pad(flat, [0, 0, 0, 1]))
    operands = [flat, rx.const(weight.numpy()), rx.const(scale.numpy())]
    if bias is not None:
        operands.append(importer.env[bias])
    target = tvm.target.Target.current(allow_none=True)
    pairs = target is None or target.kind.name == "llvm"
    out = importer.block_builder.emit_te(functools.partial(_linear_wq_te, bits=bits, group=group, cols=cols, pairs=pairs),
                                         *operands, primfunc_name_hint=kernel_name("orca_linear_wq"))
    return _restore_rows(importer, out, lead, weight.shape[1])


def _embedding_wq_te(w, scales, indices, *, bits: int, cols: int):
    from tvm import te

    shape = list(indices.shape)

    def value(*index):
        *idx, d = index
        row = indices[tuple(idx)].astype("int64")
        q = w[row, d].astype("float32") if bits == 8 else _nibble(w[row, d // 2], (d % 2) * 4)
        return q * scales[row, 0]

    return te.compute((*shape, cols), value, name="embedding")


def _const_or_input(importer, node: fx.Node):
    """A weight as a Relax constant, or the run-time value where it is not one (a weight that
    place-memory streams is fetched into the pool at run time)."""
    from tvm import relax as rx

    weights = getattr(importer, "weights", {})
    return rx.const(weights[node.name].numpy()) if node.name in weights else importer.env[node]


def convert_embedding_wq(node: fx.Node, importer):
    """orca.embedding_wq -> gather and dequantize in one kernel; the table and scales may be
    constants or run-time values (streamed by place-memory): the kernel reads them as they are."""
    qweight, scales, indices, bits = node.args
    cols = node.meta["val"].shape[-1]
    operands = [_const_or_input(importer, qweight), _const_or_input(importer, scales), importer.env[indices]]
    return importer.block_builder.emit_te(functools.partial(_embedding_wq_te, bits=bits, cols=cols), *operands,
                                          primfunc_name_hint=kernel_name("orca_embedding_wq"))


def _quantize_rows_te(x, *smooth):
    from tvm import te, tirx

    rows, cols = x.shape
    if smooth:
        factor = smooth[0]
        x = te.compute((rows, cols), lambda i, c: x[i, c] * factor[c], name="smoothed")
    k = te.reduce_axis((0, cols), "k")
    amax = te.compute((rows,), lambda i: te.max(te.abs(x[i, k]), axis=k), name="amax")
    scale = te.compute((rows,), lambda i: te.max(amax[i], tirx.const(1e-12, "float32")) / float(quant.INT8_MAX),
                       name="scale")
    q = te.compute((rows, cols), lambda i, c: _round_int8(x[i, c] / scale[i]), name="xq")
    return q, scale


def _round_int8(value):
    from tvm import te, tirx

    top = tirx.const(float(quant.INT8_MAX), "float32")
    return te.min(te.max(te.round(value), -top), top).astype("int8")


def _int8_epilogue(acc_value, scale, bias_value, activation: str, out_scale: float):
    """int32 accumulator -> `acc * scale (+ bias)`, the activation, and a requantize to int8 when
    `out_scale > 0` (else the float32 value): the static and dynamic ops' shared epilogue."""
    from tvm import te

    value = acc_value.astype("float32") * scale
    if bias_value is not None:
        value = value + bias_value
    if activation == "relu":
        value = te.max(value, 0.0)
    return _round_int8(value / float(out_scale)) if out_scale > 0 else value


def _int8_matmul_te(xq, w, *operands, x_scale=None, per_row_scale: bool, has_bias: bool, out_scale: float,
                    activation: str):
    """int8 `[M, K]` x int8 `[K, N]` -> int32, then `acc * x_scale * wscale[n] (+ bias)`, the
    activation, and a requantize to int8 when `out_scale > 0`."""
    from tvm import te

    operands = list(operands)
    row_scale = operands.pop(0) if per_row_scale else None
    wscale = operands.pop(0)
    bias = operands.pop(0) if has_bias else None
    rows, cols = xq.shape
    n = w.shape[1]
    k = te.reduce_axis((0, cols), "k")
    acc = te.compute((rows, n), lambda i, j: te.sum(xq[i, k].astype("int32") * w[k, j].astype("int32"), axis=k),
                     name="acc")

    def epilogue(i, j):
        scale = wscale[j] * (row_scale[i] if per_row_scale else float(x_scale))
        return _int8_epilogue(acc[i, j], scale, None if bias is None else bias[j], activation, out_scale)

    return te.compute((rows, n), epilogue, name="out")


def _int8_weight(importer, qweight: fx.Node):
    from tvm import relax as rx

    weight = _const(importer, qweight, "weight")
    return rx.const(weight.t().contiguous().numpy()), weight.shape[0]


def _emit_int8_dot(importer, base: str, xq, weight: torch.Tensor, scale_operands: list, epilogue):
    """The int8 matmul `xq [M, K] x weight.T` (weight: int8 `[N, K]`) with `epilogue` (an
    int8_dot_kernels.Epilogue) as a call of a hardware dot-product kernel (VNNI on CPUs that
    have it, on CUDA tensor cores or dp4a), its weight repacked here; None where the current target has none for
    this shape (the plain kernel then runs). `scale_operands`: the epilogue's Relax operands
    (row scales, weight scales, bias) in the kernel's order."""
    import tvm
    from tvm import relax as rx

    from . import int8_dot_kernels as dot

    n, k = weight.shape
    target = tvm.target.Target.current(allow_none=True)
    rows_dim = importer.shape_of(xq)[0]
    rows = int(rows_dim) if isinstance(rows_dim, (int, tvm.tirx.IntImm)) else None
    path = dot.dot_path(target, k, n, rows)
    if path is None:
        return None
    if path == dot.VNNI:
        words, compensation = dot.pack_vnni_weight(weight.numpy())
        kernel = dot.vnni_linear_kernel(rows, k, n, epilogue)
        weights = [rx.const(words), rx.const(compensation)]
    elif path == dot.MMA:
        kernel = dot.mma_linear_kernel(rows, k, n, epilogue, target)
        weights = [rx.const(dot.pack_mma_weight(weight.numpy()))]
    else:
        kernel = dot.dp4a_linear_kernel(rows, k, n, epilogue)
        weights = [rx.const(dot.pack_dp4a_weight(weight.numpy()))]
    func = importer.block_builder.add_func(kernel, kernel_name(f"{base}_{path}"))
    out_type = rx.TensorType([rows_dim, n], epilogue.out_dtype)
    return importer.block_builder.emit(rx.call_tir(func, [xq, *weights, *scale_operands], out_type))


def convert_linear_dq(node: fx.Node, importer):
    """orca.linear_dq -> quantize the rows of x, then the int8 matmul with its float epilogue
    (on the int8 dot-product instructions where the target has them)."""
    from tvm import relax as rx

    from .int8_dot_kernels import Epilogue

    x, qweight, wscale, bias, *smooth = node.args
    smooth = smooth[0] if smooth else None
    bb = importer.block_builder
    flat, lead = _flatten_rows(importer, importer.env[x])
    factors = [] if smooth is None else [rx.const(_const(importer, smooth, "smoothing factor").numpy())]
    q = bb.emit_te(_quantize_rows_te, flat, *factors, primfunc_name_hint=kernel_name("orca_quantize_rows"))
    xq, row_scale = bb.emit(rx.TupleGetItem(q, 0)), bb.emit(rx.TupleGetItem(q, 1))
    scales = [row_scale, rx.const(_const(importer, wscale, "scale").numpy())]
    if bias is not None:
        scales.append(importer.env[bias])
    out = _emit_int8_dot(importer, "orca_linear_dq", xq, _const(importer, qweight, "weight"), scales,
                         Epilogue(per_row_scale=True, has_bias=bias is not None))
    if out is None:
        weight, _ = _int8_weight(importer, qweight)
        out = bb.emit_te(functools.partial(_int8_matmul_te, per_row_scale=True, has_bias=bias is not None,
                                           out_scale=0.0, activation="none"),
                         xq, weight, *scales, primfunc_name_hint=kernel_name("orca_linear_dq"),
                         primfunc_attrs=_plain_int8_matmul_attrs())
    return _restore_rows(importer, out, lead, _const(importer, qweight, "weight").shape[0])


# The plain int8 matmul on CUDA (no dot-product path: K % 4 != 0, or a CPU without VNNI) must not be handed
# to dlight's int8 tensor-core rule on CUDA: from 64 rows/columns its Matmul rule does so, and TVM
# 0.27's InjectSoftwarePipeline then fails on the rule's schedule (GetWmmaFragmentSize), so the
# whole partition fell back to torch. Layers that suit tensor cores take int8_dot_kernels' path.
# The kernel is opaque to FuseOps (op_pattern 8, kOpaque), since a fused function would not keep the
# attribute; its epilogue (scales, bias, activation) is inside it already. CPU builds keep fusion.
_CUDA_PLAIN_INT8_MATMUL_ATTRS = {"dlight.do_not_tensorize": True, "op_pattern": 8}


def _plain_int8_matmul_attrs() -> dict:
    """PrimFunc attributes of the plain int8 matmul for the current target (see above)."""
    import tvm

    target = tvm.target.Target.current(allow_none=True)
    return dict(_CUDA_PLAIN_INT8_MATMUL_ATTRS) if target is not None and target.kind.name == "cuda" else {}


def convert_linear_q(node: fx.Node, importer):
    """orca.linear_q -> the int8 matmul with its dequantize or requantize epilogue (on the int8
    dot-product instructions where the target has them)."""
    from tvm import relax as rx

    from .int8_dot_kernels import Epilogue

    xq, x_scale, qweight, wscale, bias, out_scale, activation = node.args
    flat, lead = _flatten_rows(importer, importer.env[xq])
    scales = [rx.const(_const(importer, wscale, "scale").numpy())]
    if bias is not None:
        scales.append(importer.env[bias])
    out = _emit_int8_dot(importer, "orca_linear_q", flat, _const(importer, qweight, "weight"), scales,
                         Epilogue(x_scale=x_scale, has_bias=bias is not None, out_scale=out_scale,
                                  activation=activation))
    if out is None:
        weight, _ = _int8_weight(importer, qweight)
        out = importer.block_builder.emit_te(
            functools.partial(_int8_matmul_te, x_scale=x_scale, per_row_scale=False, has_bias=bias is not None,
                              out_scale=out_scale, activation=activation), flat, weight, *scales,
            primfunc_name_hint=kernel_name("orca_linear_q"), primfunc_attrs=_plain_int8_matmul_attrs())
    return _restore_rows(importer, out, lead, _const(importer, qweight, "weight").shape[0])


def _conv_epilogue_te(acc, wscale, *rest, x_scale: float, out_scale: float, activation: str):
    from tvm import te

    bias = rest[0] if rest else None

    def epilogue(b, c, h, w):
        return _int8_epilogue(acc[b, c, h, w], wscale[c] * float(x_scale), None if bias is None else bias[c],
                              activation, out_scale)

    return te.compute(acc.shape, epilogue, name="out")


def _is_pointwise(weight: torch.Tensor, stride, padding, groups) -> bool:
    """Whether a conv is a 1x1, stride-1, unpadded, ungrouped one: a matmul over channels."""
    return (tuple(weight.shape[2:]) == (1, 1) and all(s == 1 for s in stride) and all(p == 0 for p in padding)
            and groups == 1)


# node.meta key: True on a conv2d_q whose kernel selection chose Relax's int8 conv ("tvm-plain")
# over the direct VNNI conv ("tvm"); the converter then emits the plain conv.
PLAIN_CONV_META = "orca_plain_int8_conv"
PLAIN_CONV = "tvm-plain"


def vnni_conv_applies(node: fx.Node, target) -> bool:
    """Whether `node` is a conv2d_q that becomes the direct VNNI conv on `target`: 2-d, static
    shapes, ungrouped, not pointwise (those take the linear kernel directly), on a CPU with VNNI.
    Grouped and depthwise convs keep Relax's int8 conv."""
    from . import int8_dot_kernels as dot

    if node.op != "call_function" or node.target is not quant.CONV2D_Q:
        return False
    xq, _, qweight, _, _, stride, padding, dilation, groups, *_ = node.args
    val = xq.meta.get("val") if isinstance(xq, fx.Node) else None
    weight = qweight.meta.get("val") if isinstance(qweight, fx.Node) else None
    if val is None or weight is None or val.dim() != 4 or weight.dim() != 4 or groups != 1:
        return False
    if _is_pointwise(weight, stride, padding, groups) or not all(isinstance(d, int) for d in val.shape):
        return False
    return dot.conv_path(target) == dot.VNNI


def _conv_int8_dot(importer, node: fx.Node):
    """orca.conv2d_q on the int8 dot-product instructions, or None where they do not apply:
    - pointwise (1x1, stride 1, unpadded, ungrouped): the linear kernel (VNNI, mma or dp4a) on the
      channels-last pixels (`[B*H*W, Cin]`), transposed back to NCHW;
    - other ungrouped convs with static shapes on VNNI CPUs: the direct VNNI conv (_vnni_conv),
      unless the kernel selection chose Relax's conv (PLAIN_CONV_META)."""
    import tvm
    from tvm import relax as rx

    from .int8_dot_kernels import Epilogue

    xq, x_scale, qweight, wscale, bias, stride, padding, dilation, groups, out_scale, activation = node.args
    weight = _const(importer, qweight, "weight")
    shape = list(importer.shape_of(importer.env[xq]))
    if len(shape) != 4 or node.meta.get(PLAIN_CONV_META):
        return None
    if vnni_conv_applies(node, tvm.target.Target.current(allow_none=True)):
        return _vnni_conv(importer, node, weight)
    if not _is_pointwise(weight, stride, padding, groups):
        return None
    bb = importer.block_builder
    batch, channels, height, width = shape
    pixels = bb.emit(rx.op.reshape(bb.emit(rx.op.permute_dims(importer.env[xq], [0, 2, 3, 1])),
                                   [batch * height * width, channels]))
    scales = [rx.const(_const(importer, wscale, "scale").numpy())]
    if bias is not None:
        scales.append(importer.env[bias])
    out = _emit_int8_dot(importer, "orca_conv2d_q_1x1", pixels, weight.reshape(weight.shape[0], -1), scales,
                         Epilogue(x_scale=x_scale, has_bias=bias is not None, out_scale=out_scale,
                                  activation=activation))
    if out is None:
        return None
    nhwc = bb.emit(rx.op.reshape(out, [batch, height, width, weight.shape[0]]))
    return bb.emit(rx.op.permute_dims(nhwc, [0, 3, 1, 2]))


def _vnni_conv(importer, node: fx.Node, weight: torch.Tensor):
    """A non-pointwise orca.conv2d_q as the direct VNNI conv: the int8 input padded and made
    channels-last (`[B, Hp, Wp, Cp]`, zeros), the kernel's register tiles over output pixels,
    the weight repacked here, and a transpose back to NCHW."""
    from tvm import relax as rx

    from . import int8_dot_kernels as dot
    from .int8_dot_kernels import Epilogue

    xq, x_scale, _, wscale, bias, stride, padding, dilation, _, out_scale, activation = node.args
    bb = importer.block_builder
    padded = bb.emit_te(functools.partial(dot.pad_nhwc_te, padding=list(padding)), importer.env[xq],
                        primfunc_name_hint=kernel_name("orca_pad_nhwc"))
    batch, height, width, channels = (int(d) for d in importer.shape_of(padded))
    kernel = tuple(int(d) for d in weight.shape[2:])
    out_hw = tuple(dot.conv_output_size(size, k, s, 0, d)
                   for size, k, s, d in zip((height, width), kernel, stride, dilation))
    out_channels = weight.shape[0]
    epilogue = Epilogue(x_scale=x_scale, has_bias=bias is not None, out_scale=out_scale, activation=activation)
    words, compensation = dot.pack_vnni_weight(dot.pack_conv_weight(weight.numpy()))
    func = bb.add_func(dot.vnni_conv_kernel((batch, height, width, channels), out_hw, kernel, list(stride),
                                            list(dilation), out_channels, epilogue),
                       kernel_name("orca_conv2d_q_vnni"))
    operands = [padded, rx.const(words), rx.const(compensation), rx.const(_const(importer, wscale, "scale").numpy())]
    if bias is not None:
        operands.append(importer.env[bias])
    out = bb.emit(rx.call_tir(func, operands, rx.TensorType([batch * out_hw[0] * out_hw[1], out_channels],
                                                            epilogue.out_dtype)))
    nhwc = bb.emit(rx.op.reshape(out, [batch, *out_hw, out_channels]))
    return bb.emit(rx.op.permute_dims(nhwc, [0, 3, 1, 2]))


def convert_conv2d_q(node: fx.Node, importer):
    """orca.conv2d_q -> Relax's conv2d on int8 with int32 output, and the epilogue (fused by
    TVM's FuseOps into the conv's kernel). A pointwise (1x1) conv runs as the int8 dot-product
    linear kernel instead where the target has one, another ungrouped conv as the direct VNNI
    conv on VNNI CPUs (unless the kernel selection chose this plain conv: PLAIN_CONV_META)."""
    from tvm import relax as rx

    dot_product = _conv_int8_dot(importer, node)
    if dot_product is not None:
        return dot_product
    xq, x_scale, qweight, wscale, bias, stride, padding, dilation, groups, out_scale, activation = node.args
    bb = importer.block_builder
    weight = rx.const(_const(importer, qweight, "weight").numpy())
    acc = bb.emit(rx.op.nn.conv2d(importer.env[xq], weight, strides=stride, padding=padding, dilation=dilation,
                                  groups=groups, out_dtype="int32"))
    operands = [acc, rx.const(_const(importer, wscale, "scale").numpy())]
    if bias is not None:
        operands.append(importer.env[bias])
    return bb.emit_te(functools.partial(_conv_epilogue_te, x_scale=x_scale, out_scale=out_scale,
                                        activation=activation), *operands, primfunc_name_hint=kernel_name("orca_conv2d_q_epilogue"))


def convert_quantize(node: fx.Node, importer):
    from tvm import te

    x, scale = node.args
    return importer.block_builder.emit_te(
        lambda t: te.compute(t.shape, lambda *i: _round_int8(t(*i) / float(scale)), name="q"), importer.env[x],
        primfunc_name_hint=kernel_name("orca_quantize"))


def convert_dequantize(node: fx.Node, importer):
    from tvm import te

    q, scale = node.args
    return importer.block_builder.emit_te(
        lambda t: te.compute(t.shape, lambda *i: t(*i).astype("float32") * float(scale), name="dq"), importer.env[q],
        primfunc_name_hint=kernel_name("orca_dequantize"))


register_converter(quant.LINEAR_WQ, convert_linear_wq)
register_converter(quant.EMBEDDING_WQ, convert_embedding_wq)
register_converter(quant.LINEAR_DQ, convert_linear_dq)
register_converter(quant.LINEAR_Q, convert_linear_q)
register_converter(quant.CONV2D_Q, convert_conv2d_q)
register_converter(quant.QUANTIZE, convert_quantize)
register_converter(quant.DEQUANTIZE, convert_dequantize)
