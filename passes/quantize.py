"""Quantization: integer weights (and activations) that the compiled code really computes with.

`quantize{mode=weight-only|dynamic|static,dtype=int8|int4,...}` rewrites the model's linear,
conv2d and embedding layers, and the recurrent weights of LSTM/GRU scans, into the quantized ops
of ops/quant.py and ops/rnn.py, whose TVM kernels (lowering/quant_kernels.py,
quant_conv_kernels.py, rnn_kernels.py) compute on the integers; the float32 weights leave the
program.

- **weight-only** (int8 or int4, `granularity=per-channel` or `per-group` with `group` columns a
  scale): linear -> `orca.linear_wq`, embedding -> `orca.embedding_wq` (per row), conv2d ->
  `orca.conv2d_wq` (the weight flattened to `[O, C/groups*kh*kw]`; int8 per output channel, int4
  always in groups of `group` of those input values), and the `W_hh` of the scans that
  `decompose-rnn` made -> `orca.lstm_scan_q` / `orca.gru_scan_q` (per gate column, or per group
  of `group` state features). Activations stay float32; the dequantization happens in registers
  inside the matmul and the scans' GEMV, and for convs in a per-call prologue of the conv's own
  kernel (faster than in registers there, see quant_conv_kernels.py). The RNN input projections
  that `decompose-rnn` made linears are covered like any linear.
- **dynamic** (int8): linear -> `orca.linear_dq` (embeddings and `W_hh` as in weight-only int8:
  the recurrent state stays float32); each row of the activation gets its scale at run
  time. For linear-heavy models (transformers, RNN input projections). With `smooth=alpha` (0.5
  by default; 0 turns it off) the activation outliers are first migrated into the weight, as
  SmoothQuant does: input channel k is divided by `s_k = max|x_k|^alpha / max|W[:, k]|^(1-alpha)`
  at run time (fused into the row quantization) and the weight's column k multiplied by it. The
  channel maxima come from the calibration data, or else from the example inputs. On
  all-MiniLM-L6-v2 it lifted the worst sentence's cosine similarity to float32 from 0.976 to
  above 0.99.
- **static** (int8): linear and conv2d -> `orca.linear_q` / `orca.conv2d_q` on int8 activations
  quantized with scales frozen by calibration (`observer=minmax|percentile|mse` over
  `ctx.config["calibration_data"]`). int8 x int8 accumulates in int32; a layer whose output feeds
  only other int8 layers (through ReLU, max-pooling and reshapes, which commute with a symmetric
  quantization) requantizes in its epilogue, so no quantize/dequantize pair is left between them.

Quantization is symmetric everywhere (zero point 0): int8 in [-127, 127], int4 in [-8, 7]; weights
per output channel (or per group), activations per tensor (static) or per row (dynamic).

Per-layer control: `skip` (':'-separated fnmatch patterns of layer paths such as `net.2` or node
names) keeps layers in float32, and `layers` (`pattern=dtype` items, dtype int8, int4 or fp32)
sets a layer's dtype. A pattern that matches no quantizable layer is an error naming it.
Whether a quantized layer runs an integer kernel or a float32 one on its dequantized weight is the
lowering's kernel selection, by measurement; the compile report says per layer.

Statistics: layers quantized (`int8`, `int4`), `skipped`, `bytes_before` / `bytes_after` of the
weights of the layers touched, and for static mode `requantized` (int8 -> int8 edges).
"""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from orca_compiler.channel_deps import layer_name
from orca_compiler.errors import PassInputError
from orca_compiler.ir import GraphIR
from orca_compiler.ops import fused
from orca_compiler.ops import quant
from orca_compiler.ops import rnn as rnn_ops
from orca_compiler.ops.pointwise import Input, Result, Step, arguments, format_program
from orca_compiler.pass_base import Pass, PassContext, PassResult, register_pass

aten = torch.ops.aten
DTYPES = ("int8", "int4", "fp32")
# Ops that commute with a symmetric per-tensor quantization: quantize(op(x)) == op(quantize(x)).
_INT8_SAFE = {aten.max_pool2d.default, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
              aten.flatten.using_ints, aten.relu.default, aten.clone.default, aten.contiguous.default}


@dataclass
class QuantizeOptions:
    """mode: weight-only, dynamic or static; dtype: int8 or int4 (int4: weight-only only);
    granularity: per-channel or per-group (weight-only); group: columns per scale (per-group);
    observer: how static mode picks activation ranges; percentile: the |x| percentile of that
    observer; smooth: SmoothQuant's migration strength alpha for dynamic mode (0: off); skip: ':'-separated fnmatch patterns of layers kept in float32; layers:
    ':'-separated `pattern=dtype` per-layer dtypes (int8, int4, fp32)."""

    mode: Literal["weight-only", "dynamic", "static"] = "weight-only"
    dtype: Literal["int8", "int4"] = "int8"
    granularity: Literal["per-channel", "per-group"] = "per-channel"
    group: int = 128
    observer: Literal["minmax", "percentile", "mse"] = "minmax"
    percentile: float = 99.99
    smooth: float = 0.5
    skip: tuple[str, ...] = ()
    layers: tuple[str, ...] = ()


@dataclass
class Layer:
    """One quantizable layer: its node, kind, name and operands (fused epilogues unpacked)."""

    node: fx.Node
    kind: str  # "linear" | "conv" | "embedding" | "rnn" (the recurrent weight of an LSTM/GRU scan)
    name: str
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None = None
    residual: fx.Node | None = None
    activation: str = fused.NO_ACTIVATION
    act_args: tuple = ()
    conv_args: tuple = ()  # stride, padding, dilation, groups


def _attr(value) -> bool:
    return isinstance(value, fx.Node) and value.op == "get_attr"


def _float_input(value) -> bool:
    val = value.meta.get("val") if isinstance(value, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dtype == torch.float32 and not _attr(value)


def layer_of(node: fx.Node) -> Layer | None:
    """`node` as a quantizable layer (linear / conv2d, plain or fused epilogue, with a constant
    float32 weight; an embedding with a constant table), else None."""
    name = layer_name(node)
    if node.target is aten.linear.default:
        x, w, *rest = node.args
        layer = Layer(node, "linear", name, x, w, rest[0] if rest else node.kwargs.get("bias"))
    elif node.target is fused.LINEAR_EPILOGUE:
        a = arguments(node)
        layer = Layer(node, "linear", name, a["x"], a["weight"], a["bias"], a["residual"], a["activation"],
                      tuple(a["act_args"]))
    elif node.target is aten.conv2d.default:
        a = arguments(node)
        layer = Layer(node, "conv", name, a["input"], a["weight"], a["bias"],
                      conv_args=(list(a["stride"]), list(a["padding"]), list(a["dilation"]), a["groups"]))
    elif node.target is fused.CONV_EPILOGUE:
        a = arguments(node)
        layer = Layer(node, "conv", name, a["x"], a["weight"], a["bias"], a["residual"], a["activation"],
                      tuple(a["act_args"]), (list(a["stride"]), list(a["padding"]), list(a["dilation"]), a["groups"]))
    elif node.target is aten.embedding.default:
        w, indices = node.args[:2]
        layer = Layer(node, "embedding", name, indices, w)
    elif node.target in (rnn_ops.LSTM_SCAN, rnn_ops.GRU_SCAN):
        layer = Layer(node, "rnn", name, node.args[0], node.args[1])  # x: xproj, weight: W_hh^T
    else:
        return None
    weight_val = layer.weight.meta.get("val") if isinstance(layer.weight, fx.Node) else None
    if not _attr(layer.weight) or weight_val is None or weight_val.dtype != torch.float32:
        return None
    if layer.bias is not None and not _attr(layer.bias):
        return None
    if layer.kind == "conv" and weight_val.dim() != 4:
        return None
    if layer.kind != "embedding" and not _float_input(layer.x):
        return None
    return layer


def find_layers(ir: GraphIR) -> list[Layer]:
    """The layers of `ir` a quantize pass can rewrite (see `layer_of`), in execution order."""
    return [layer for layer in map(layer_of, ir.compute_nodes()) if layer is not None]


def _matches(layer: Layer, pattern: str) -> bool:
    return fnmatch.fnmatchcase(layer.name, pattern) or fnmatch.fnmatchcase(layer.node.name, pattern)


def _check_patterns(option: str, patterns, layers: list[Layer]) -> None:
    names = sorted({layer.name for layer in layers} | {layer.node.name for layer in layers})
    for pattern in patterns:
        if not any(_matches(layer, pattern) for layer in layers):
            near = difflib.get_close_matches(pattern, names, n=3, cutoff=0.4)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise PassInputError(f"quantize: {option} pattern {pattern!r} matches no quantizable layer{hint} "
                                 f"(layers: {', '.join(names[:24])}{', ...' if len(names) > 24 else ''})")


def layer_dtypes(opts: QuantizeOptions, layers: list[Layer]) -> dict[fx.Node, str]:
    """The dtype of every layer ("int8", "int4" or "fp32" for kept) after `skip` and `layers`."""
    overrides = []
    for item in opts.layers:
        pattern, sep, dtype = item.rpartition("=")
        if not sep or not pattern or dtype not in DTYPES:
            raise PassInputError(f"quantize: layers item {item!r} must read pattern=dtype with dtype one of "
                                 f"{', '.join(DTYPES)}")
        overrides.append((pattern, dtype))
    _check_patterns("skip", opts.skip, layers)
    _check_patterns("layers", [p for p, _ in overrides], layers)
    chosen = {}
    for layer in layers:
        dtype = opts.dtype
        for pattern, override in overrides:
            if _matches(layer, pattern):
                dtype = override
        if any(_matches(layer, p) for p in opts.skip):
            dtype = "fp32"
        chosen[layer.node] = dtype
    return chosen


# -- calibration (static mode) ---------------------------------------------------------------------

def _calibration_data(ctx: PassContext) -> list:
    data = ctx.config.get("calibration_data")
    if not data:
        raise PassInputError("quantize{mode=static} needs calibration data to freeze activation scales: "
                             "compile(..., calibration_data=[inputs, ...]) or pass_config={'calibration_data': ...}")
    return list(data)


def observe(ir: GraphIR, ctx: PassContext, nodes: set[fx.Node], observer: str, percentile: float) -> dict[fx.Node, float]:
    """The int8 scale of each activation in `nodes` over the calibration data."""
    samples: dict[fx.Node, list[torch.Tensor]] = {n: [] for n in nodes}
    _record(ir, _calibration_data(ctx), nodes, lambda n, value: samples[n].append(value.abs().flatten().float()))
    return {n: _scale(torch.cat(values), observer, percentile) for n, values in samples.items() if values}


def channel_maxima(ir: GraphIR, data: list, nodes: set[fx.Node]) -> dict[fx.Node, torch.Tensor]:
    """max |x| per last-dimension channel of each activation in `nodes`, over `data` (input tuples)."""
    maxima: dict[fx.Node, torch.Tensor] = {}

    def take(n: fx.Node, value: torch.Tensor) -> None:
        current = value.abs().reshape(-1, value.shape[-1]).amax(0).float()
        maxima[n] = current if n not in maxima else torch.maximum(maxima[n], current)

    _record(ir, data, nodes, take)
    return maxima


def _record(ir: GraphIR, data: list, nodes: set[fx.Node], take) -> None:
    """Run the IR on every input tuple of `data`, calling `take(node, value)` with the tensor value
    of each node in `nodes`; an item the graph cannot take (another batch size than the example
    inputs' static shapes) is a PassInputError."""

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if n in nodes and isinstance(result, torch.Tensor):
                take(n, result.detach())
            return result

    ir.recompile()
    with torch.no_grad():
        for index, item in enumerate(data):
            tensors = [t for t in pytree.tree_leaves(item) if isinstance(t, torch.Tensor)]
            try:
                Recorder(ir.gm).run(*tensors)
            except Exception as exc:
                shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
                raise PassInputError(f"quantize: calibration item {index} (shapes {shapes}) does not run through the "
                                     f"captured model; it must match the example inputs' shapes ({exc})") from exc


def _scale(magnitudes: torch.Tensor, observer: str, percentile: float) -> float:
    """int8 scale from the |values| an activation took: its max (minmax), a percentile of them,
    or the clipping range with the least quantize-dequantize error (mse, over 64 candidates)."""
    top = float(magnitudes.max()) if magnitudes.numel() else 0.0
    if top == 0.0:
        return 1.0
    if observer == "minmax":
        return top / quant.INT8_MAX
    sample = magnitudes
    if sample.numel() > 1 << 20:  # quantile and the mse search on a fixed random subset
        sample = sample[torch.randperm(sample.numel(), generator=torch.Generator().manual_seed(0))[: 1 << 20]]
    if observer == "percentile":
        return max(float(torch.quantile(sample, percentile / 100.0)), top * 1e-3) / quant.INT8_MAX
    best, best_error = top, float("inf")
    for fraction in torch.linspace(0.2, 1.0, 64).tolist():
        scale = top * fraction / quant.INT8_MAX
        error = float(((torch.round(sample / scale).clamp(max=quant.INT8_MAX) * scale - sample) ** 2).mean())
        if error < best_error:
            best, best_error = top * fraction, error
    return best / quant.INT8_MAX


# -- rewriting -------------------------------------------------------------------------------------

def _emit_epilogue(ir: GraphIR, out: fx.Node, layer: Layer, activation_done: bool) -> fx.Node:
    """The residual add and activation of a fused epilogue, after a quantized op's float output."""
    has_activation = layer.activation != fused.NO_ACTIVATION and not activation_done
    if layer.residual is None and not has_activation:
        return out
    steps, inputs = [], [out]
    if layer.residual is not None:
        inputs.append(layer.residual)
        steps.append(Step("add", (Input(0), Input(1))))
    if has_activation:
        source = Result(0) if steps else Input(0)
        steps.append(Step(layer.activation, (source, *layer.act_args)))
    return ir.create_node(fused.ELEMENTWISE, (inputs, format_program(steps)), name=f"{layer.node.name}_epilogue")


def _bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class _Rewriter:
    def __init__(self, ir: GraphIR, opts: QuantizeOptions):
        self.ir, self.opts = ir, opts
        self.stats = {"int8": 0, "int4": 0, "skipped": 0, "bytes_before": 0, "bytes_after": 0}

    def weight(self, layer: Layer) -> torch.Tensor:
        return self.ir.weight(layer.weight)

    def group_for(self, cols: int) -> int:
        return min(self.opts.group, cols) if self.opts.granularity == "per-group" else cols

    def replace(self, layer: Layer, new: fx.Node, activation_done: bool = False) -> None:
        with self.ir.graph.inserting_after(new):
            out = _emit_epilogue(self.ir, new, layer, activation_done)
        layer.node.replace_all_uses_with(out)
        self.ir.graph.erase_node(layer.node)

    def weight_only(self, layer: Layer, dtype: str) -> None:
        bits = 8 if dtype == "int8" else 4
        if layer.kind == "rnn":
            return self.recurrent(layer, bits)
        if layer.kind == "conv":
            return self.conv_weight_only(layer, bits)
        w = self.weight(layer)
        if layer.kind == "embedding":
            qweight, scales = quant.quantize_weight(w, bits, None)
        else:
            qweight, scales = quant.quantize_weight(w, bits, self.group_for(w.shape[1]))
        self.stats["bytes_before"] += _bytes(w)
        self.stats["bytes_after"] += _bytes(qweight, scales)
        with self.ir.graph.inserting_before(layer.node):
            q_node = self.ir.add_weight(f"{layer.weight.target}_q{bits}", qweight)
            s_node = self.ir.add_weight(f"{layer.weight.target}_scale", scales)
            if layer.kind == "embedding":
                new = self.ir.create_node(quant.EMBEDDING_WQ, (q_node, s_node, layer.x, bits), name=f"{layer.node.name}_q")
            else:
                group = -(-w.shape[1] // scales.shape[1])
                new = self.ir.create_node(quant.LINEAR_WQ, (layer.x, q_node, s_node, layer.bias, bits, group),
                                          name=f"{layer.node.name}_q")
        self.replace(layer, new)

    def recurrent(self, layer: Layer, bits: int) -> None:
        """An LSTM/GRU scan's W_hh (stored transposed, `[H, gates*H]`) -> the quantized scan, its
        W_hh stored as a weight-only linear's (`[gates*H, H]`, one scale per gate column and group
        of `group` state features)."""
        w_hh = self.weight(layer).t()
        hidden = w_hh.shape[1]
        qweight, scales = quant.quantize_weight(w_hh, bits, self.group_for(hidden))
        group = -(-hidden // scales.shape[1])
        self.stats["bytes_before"] += _bytes(w_hh)
        self.stats["bytes_after"] += _bytes(qweight, scales)
        node = layer.node
        with self.ir.graph.inserting_before(node):
            base = str(layer.weight.target).removesuffix("_t")  # stored untransposed, as a linear's weight
            q_node = self.ir.add_weight(f"{base}_q{bits}", qweight)
            s_node = self.ir.add_weight(f"{base}_scale", scales)
            if node.target is rnn_ops.LSTM_SCAN:
                xproj, _, h0, c0, *flags = node.args
                new = self.ir.create_node(rnn_ops.LSTM_SCAN_Q, (xproj, q_node, s_node, h0, c0, bits, group, *flags),
                                          name=f"{node.name}_q")
            else:
                xproj, _, b_hn, h0, *flags = node.args
                new = self.ir.create_node(rnn_ops.GRU_SCAN_Q, (xproj, q_node, s_node, b_hn, h0, bits, group, *flags),
                                          name=f"{node.name}_q")
        self.replace(layer, new)

    def conv_weight_only(self, layer: Layer, bits: int) -> None:
        """A conv2d's weight `[O, C/groups, kh, kw]`, flattened to `[O, K]` (K in (c, kh, kw)
        order) and quantized like a linear's: int8 per output channel (or per group with
        granularity=per-group), int4 always in groups of `group` of those K input values."""
        w = self.weight(layer)
        flat = w.reshape(w.shape[0], -1)
        cols = flat.shape[1]
        group = min(self.opts.group, cols) if bits == 4 else self.group_for(cols)
        qweight, scales = quant.quantize_weight(flat, bits, group)
        group = -(-cols // scales.shape[1])
        self.stats["bytes_before"] += _bytes(w)
        self.stats["bytes_after"] += _bytes(qweight, scales)
        stride, padding, dilation, groups = layer.conv_args
        with self.ir.graph.inserting_before(layer.node):
            q_node = self.ir.add_weight(f"{layer.weight.target}_q{bits}", qweight)
            s_node = self.ir.add_weight(f"{layer.weight.target}_scale", scales)
            args = (layer.x, q_node, s_node, layer.bias, list(w.shape), stride, padding, dilation, groups, bits, group)
            new = self.ir.create_node(quant.CONV2D_WQ, args, name=f"{layer.node.name}_q")
        self.replace(layer, new)

    def int8_weight(self, layer: Layer, column_factor: torch.Tensor | None = None) -> tuple[fx.Node, fx.Node]:
        """Per-output-channel int8 weight (its columns multiplied by `column_factor` first) and its
        scales (`[N]`) as new weights of the IR."""
        w = self.weight(layer)
        flat = w.reshape(w.shape[0], -1)
        if column_factor is not None:
            flat = flat * column_factor
        qweight, scales = quant.quantize_weight(flat, 8, None)
        qweight = qweight.reshape(w.shape)
        self.stats["bytes_before"] += _bytes(w)
        self.stats["bytes_after"] += _bytes(qweight, scales)
        return (self.ir.add_weight(f"{layer.weight.target}_q8", qweight),
                self.ir.add_weight(f"{layer.weight.target}_scale", scales.reshape(-1)))

    def dynamic(self, layer: Layer, x_maxima: torch.Tensor | None) -> None:
        alpha = self.opts.smooth
        with self.ir.graph.inserting_before(layer.node):
            if alpha > 0 and x_maxima is not None:
                w_maxima = self.weight(layer).abs().amax(0).clamp_min(1e-8)
                factor = (x_maxima.clamp_min(1e-8) ** alpha / w_maxima ** (1 - alpha)).clamp(1e-4, 1e4)
                q_node, s_node = self.int8_weight(layer, factor)
                smooth = self.ir.add_weight(f"{layer.weight.target}_smooth", 1.0 / factor)
                args = (layer.x, q_node, s_node, layer.bias, smooth)
            else:
                q_node, s_node = self.int8_weight(layer)
                args = (layer.x, q_node, s_node, layer.bias)
            new = self.ir.create_node(quant.LINEAR_DQ, args, name=f"{layer.node.name}_q")
        self.replace(layer, new)

    def static(self, layer: Layer, scale: float, quantized_inputs: dict) -> None:
        relu_inside = layer.residual is None and layer.activation == "relu"
        activation = "relu" if relu_inside else "none"
        with self.ir.graph.inserting_before(layer.node):
            key = (layer.x, scale)
            if key not in quantized_inputs:
                with self.ir.graph.inserting_after(layer.x):
                    quantized_inputs[key] = self.ir.create_node(quant.QUANTIZE, (layer.x, scale),
                                                                name=f"{layer.x.name}_q")
            xq = quantized_inputs[key]
            q_node, s_node = self.int8_weight(layer)
            if layer.kind == "linear":
                args = (xq, scale, q_node, s_node, layer.bias, 0.0, activation)
                new = self.ir.create_node(quant.LINEAR_Q, args, name=f"{layer.node.name}_q")
            else:
                args = (xq, scale, q_node, s_node, layer.bias, *layer.conv_args, 0.0, activation)
                new = self.ir.create_node(quant.CONV2D_Q, args, name=f"{layer.node.name}_q")
        self.replace(layer, new, activation_done=relu_inside)


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _retype(ir: GraphIR, node: fx.Node) -> None:
    """Re-infer `node`'s value after its inputs changed dtype; torch.export's `tensor_meta` copy
    of the old type goes (TVM's importer would read it)."""
    node.meta["val"] = ir.infer_val(node)
    node.meta.pop("tensor_meta", None)


def _hoist_quantize(ir: GraphIR) -> None:
    """quantize(op(x), s) -> op(quantize(x, s), ...) for ops that commute with quantization, where
    `op(x)` has no other reader: moves each quantize up to the int8 op that can requantize."""
    changed = True
    while changed:
        changed = False
        for q in [n for n in ir.compute_nodes() if n.target is quant.QUANTIZE]:
            source, scale = q.args
            if (source.op != "call_function" or source.target not in _INT8_SAFE or len(source.users) != 1
                    or not isinstance(source.args[0], fx.Node)):
                continue
            with ir.graph.inserting_before(source):
                inner = ir.create_node(quant.QUANTIZE, (source.args[0], scale), name=f"{source.args[0].name}_q")
            source.args = (inner, *source.args[1:])
            _retype(ir, source)
            q.replace_all_uses_with(source)
            ir.graph.erase_node(q)
            changed = True


def _fold_requantize(ir: GraphIR) -> int:
    """A static int8 op whose float output only feeds quantize nodes of one scale (directly, or
    through one ReLU it can take into its epilogue) outputs int8 at that scale instead."""
    folded = 0
    for node in [n for n in ir.compute_nodes() if n.target in (quant.LINEAR_Q, quant.CONV2D_Q)]:
        activation_index = len(node.args) - 1
        out_index = len(node.args) - 2
        reader, through_relu = node, False
        relu = _only_user(node)
        if relu is not None and relu.target is aten.relu.default and node.args[activation_index] == "none":
            reader, through_relu = relu, True
        users = list(reader.users)
        if not users or not all(u.target is quant.QUANTIZE for u in users):
            continue
        scales = {u.args[1] for u in users}
        if len(scales) != 1:
            continue
        args = list(node.args)
        args[out_index] = scales.pop()
        if through_relu:
            args[activation_index] = "relu"
        node.args = tuple(args)
        _retype(ir, node)
        for user in users:
            user.replace_all_uses_with(node)
            ir.graph.erase_node(user)
        if through_relu:
            ir.graph.erase_node(reader)
        folded += len(users)
    return folded


@register_pass
class Quantize(Pass):
    """Quantize linear / conv / embedding layers and LSTM/GRU W_hh to int8 or int4 (weight-only, dynamic, static)."""

    name = "quantize"
    Options = QuantizeOptions

    def run(self, ir: GraphIR, ctx: PassContext) -> PassResult:
        opts = self.options
        if opts.dtype == "int4" and opts.mode != "weight-only":
            raise PassInputError(f"quantize: dtype=int4 is weight-only; mode={opts.mode} takes dtype=int8")
        if not 0 <= opts.smooth <= 1:
            raise PassInputError(f"quantize: smooth (SmoothQuant's alpha) must be in [0, 1], got {opts.smooth}")
        if opts.granularity == "per-group" and (opts.group < 1 or opts.group % 2):
            raise PassInputError(f"quantize: group must be a positive even number of columns (int4 packs "
                                 f"column pairs), got {opts.group}")
        layers = [layer for layer in find_layers(ir) if self._takes(layer)]
        dtypes = layer_dtypes(opts, layers)
        rewriter = _Rewriter(ir, opts)
        # Activation statistics, by layer: a layer's input node is replaced when the layer that
        # produces it is rewritten first.
        quantized = {layer.x for layer in layers if dtypes[layer.node] != "fp32"}
        scales, maxima = {}, {}
        if opts.mode == "static":
            by_input = observe(ir, ctx, quantized, opts.observer, opts.percentile)
            scales = {layer.node: by_input.get(layer.x) for layer in layers}
        if opts.mode == "dynamic" and opts.smooth > 0:
            data = ctx.config.get("calibration_data") or ([ctx.example_inputs] if ctx.example_inputs else [])
            by_input = channel_maxima(ir, list(data), quantized)
            maxima = {layer.node: by_input.get(layer.x) for layer in layers}
        quantized_inputs: dict = {}
        for layer in layers:
            dtype = dtypes[layer.node]
            layer = layer_of(layer.node)  # its inputs may be layers rewritten before it
            if dtype == "fp32":
                rewriter.stats["skipped"] += 1
                continue
            if opts.mode != "weight-only" and dtype != "int8":
                raise PassInputError(f"quantize: layer {layer.name} asks for {dtype}, but mode={opts.mode} "
                                     "quantizes to int8 only")
            if opts.mode == "weight-only":
                rewriter.weight_only(layer, dtype)
            elif opts.mode == "dynamic" and layer.kind in ("embedding", "rnn"):
                # a table lookup: nothing to quantize at run time; a recurrent GEMV: the state stays
                # float32 (a per-step row quantization measured slower, see docs/quantization.md)
                rewriter.weight_only(layer, dtype)
            elif opts.mode == "dynamic":
                rewriter.dynamic(layer, maxima.get(layer.node))
            else:
                rewriter.static(layer, scales[layer.node], quantized_inputs)
            rewriter.stats[dtype] += 1
        stats = rewriter.stats
        if opts.mode == "static":
            _hoist_quantize(ir)
            stats["requantized"] = _fold_requantize(ir)
        ir.graph.eliminate_dead_code()
        ir.drop_unused_weights()
        ir.recompile()
        return PassResult(ir, bool(stats["int8"] + stats["int4"]), stats)

    def _takes(self, layer: Layer) -> bool:
        if self.options.mode == "weight-only":
            return layer.kind in ("linear", "embedding", "conv", "rnn")
        if self.options.mode == "dynamic":
            return layer.kind in ("linear", "embedding", "rnn")
        return layer.kind in ("linear", "conv")


def quantizable_layers(ir: GraphIR, mode: str) -> list[Layer]:
    """The layers `quantize{mode=...}` would rewrite in `ir` (before skip lists)."""
    probe = Quantize(QuantizeOptions(mode=mode))
    return [layer for layer in find_layers(ir) if probe._takes(layer)]


