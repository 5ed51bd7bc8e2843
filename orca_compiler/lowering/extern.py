"""External kernels: PyTorch's own (oneDNN / MKL) implementations of heavy ops, called from the
Relax VM.

An `ExternImpl` says which ops it implements and how to turn one fx node into a Python callable
that takes the node's activation tensors (weights and scalar arguments are bound in the closure,
prepacked where the library wants that). `bind_extern` wraps that callable as a TVM global
function, which the Relax importer calls with `R.call_pure_packed` (see relax_build.py). The VM
passes activations over DLPack (no copies) and takes the torch result back the same way.
"""
from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..ops import fused
from ..ops.placement import FETCH
from ..ops import quant as quant_ops
from ..ops import rnn as rnn_ops
from ..ops import sparse as sparse_ops
from ..ops.pointwise import POINTWISE, arguments

aten = torch.ops.aten


@dataclass(frozen=True)
class _Slot:
    """Where the i-th activation goes in a node's argument template."""

    index: int


@dataclass(frozen=True)
class ExternImpl:
    """One external implementation of some ops.

    `make(node, args, kwargs)` gets the node (for its op and shapes) and its arguments with
    weights as real tensors and activations as `_Slot`s, and returns
    `fn(*activations) -> tensor or tuple of tensors`.
    `applies(node)` says whether it can run that node (dtype, rank, device).
    `raw_args`: `fn` takes the VM's tensors as they come (no DLPack conversion to torch), for
    calls that only need their operands to order them (place-memory's ops).
    """

    name: str
    ops: frozenset
    make: Callable
    applies: Callable[[fx.Node], bool] = lambda node: True
    raw_args: bool = False


def _binder(args, kwargs) -> Callable:
    """`bind(activations) -> (args, kwargs)` with each `_Slot` of the templates replaced.

    Runs on every call of an extern kernel, so the slots are located once here: the common case
    (activations only among the top-level positional arguments) is a list copy, and only nested
    templates (lstm's `hx` list) rebuild the tree.
    """
    top = [(pos, a.index) for pos, a in enumerate(args) if isinstance(a, _Slot)]
    leaves, spec = pytree.tree_flatten((args, kwargs))
    slots = [(i, leaf.index) for i, leaf in enumerate(leaves) if isinstance(leaf, _Slot)]
    if len(top) == len(slots):
        def bind(activations):
            filled = list(args)
            for pos, index in top:
                filled[pos] = activations[index]
            return filled, kwargs
    else:
        def bind(activations):
            filled = list(leaves)
            for i, index in slots:
                filled[i] = activations[index]
            return pytree.tree_unflatten(filled, spec)
    return bind


def _contiguous(result):
    """The VM reads results as compact row-major tensors: make sure they are."""
    if isinstance(result, torch.Tensor):
        return result if result.is_contiguous() else result.contiguous()
    return tuple(_contiguous(r) for r in result)


_EAGER = {**fused.EAGER, **sparse_ops.EAGER, **quant_ops.EAGER}


def _make_generic(node, args, kwargs):
    # Our fused ops run their Python code directly: the dispatcher would only add overhead.
    op, bind = _EAGER.get(node.target, node.target), _binder(args, kwargs)

    def run(*activations):
        filled_args, filled_kwargs = bind(activations)
        return _contiguous(op(*filled_args, **filled_kwargs))

    return run


def _val(node: fx.Node):
    return node.meta.get("val")


def _all_float32_cpu(node: fx.Node) -> bool:
    tensors = [_val(a) for a in node.all_input_nodes] + [_val(node)]
    leaves = [t for t in pytree.tree_leaves(tensors) if isinstance(t, torch.Tensor)]
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in leaves)


def _make_mkldnn_linear(node, args, kwargs):
    """oneDNN's inner product (what Inductor's CPU freezing uses), with the weight bound; a weight
    streamed by place-memory (fetched at run time) is passed to it on every call."""
    linear = torch.ops.mkldnn._linear_pointwise
    if isinstance(args[1], _Slot):
        bind = _binder(args, kwargs)

        def run_streamed(*activations):
            filled, filled_kwargs = bind(activations)
            bias = filled[2] if len(filled) > 2 else filled_kwargs.get("bias")
            return linear(filled[0], filled[1], bias, "none", [], "")

        return run_streamed
    weight = args[1].contiguous()
    bias = args[2] if len(args) > 2 else kwargs.get("bias")

    def run(activation):
        return linear(activation, weight, bias, "none", [], "")

    return run


def _make_mkl_linear(node, args, kwargs):
    """MKL's sgemm with the weight prepacked for a fixed number of rows (torch's mkl._mkl_linear)."""
    weight = args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    rows = 1
    for size in _val(node.args[0]).shape[:-1]:
        rows *= int(size)
    packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.contiguous(), rows)
    out_features, in_features = weight.shape

    def run(activation):
        flat = activation.reshape(rows, in_features)
        out = torch.ops.mkl._mkl_linear(flat, packed, weight, bias, rows)
        return out.reshape(*activation.shape[:-1], out_features)

    return run


def _streamed(arg) -> bool:
    """Whether `arg` is a weight place-memory streams: fetched into the pool at run time."""
    return isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target is FETCH


def _linear_with_streamed_weight(node: fx.Node) -> bool:
    """A float32 CPU linear whose weight is streamed (its bias a weight, streamed or not): oneDNN
    takes a plain weight on each call where MKL's packed kernel needs it at bind time."""
    args = node.args
    if not isinstance(args[0], fx.Node) or args[0].op == "get_attr" or not _streamed(args[1]):
        return False
    bias = args[2] if len(args) > 2 else node.kwargs.get("bias")
    bias_ok = bias is None or (isinstance(bias, fx.Node) and (bias.op == "get_attr" or _streamed(bias)))
    return bias_ok and _all_float32_cpu(node)


def _linear_with_constant_weight(node: fx.Node) -> bool:
    args = node.args
    if not isinstance(args[0], fx.Node) or args[0].op == "get_attr":
        return False
    weight_ok = isinstance(args[1], fx.Node) and args[1].op == "get_attr"
    bias = args[2] if len(args) > 2 else None
    bias_ok = bias is None or (isinstance(bias, fx.Node) and bias.op == "get_attr")
    return weight_ok and bias_ok and _all_float32_cpu(node)


def _sparse_linear_with_constant_weight(node: fx.Node) -> bool:
    """A sparse linear the dense kernels can take: float32 on CPU, CSR arrays and bias constant."""
    x, values, bias = node.args[0], node.args[1], node.args[4]
    if not isinstance(x, fx.Node) or x.op == "get_attr":
        return False
    constants = node.args[1:4] + (() if bias is None else (bias,))
    if not all(isinstance(c, fx.Node) and c.op == "get_attr" for c in constants):
        return False
    floats = [_val(x), _val(values), _val(node)] + ([] if bias is None else [_val(bias)])
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in floats)


def _densified(make_linear: Callable) -> Callable:
    """A dense linear kernel's maker taking a sparse linear: the CSR weight is re-densified once,
    when the kernel is bound (so the program holds the dense weight)."""
    def make(node, args, kwargs):
        x, values, cols, crows, bias, out_features, in_features = args
        weight = sparse_ops.densify(values, cols, crows, out_features, in_features)
        return make_linear(node, (x, weight, bias), {})

    return make


def _quantized_linear_fits(node: fx.Node) -> bool:
    """A weight-only or dynamic quantized linear a float32 kernel can run on its dequantized
    weight: the input computed at run time, float32 on CPU, the weights and bias constant."""
    x, bias = node.args[0], node.args[3]
    extra = [a for a in node.args[4:5] if isinstance(a, fx.Node)]  # linear_dq's smoothing factor
    return _float_input_constant_weights(x, [*node.args[1:3]] + ([] if bias is None else [bias]) + extra)


def _float_input_constant_weights(x, constants: list) -> bool:
    """`x` is computed at run time, float32 on CPU, and every one of `constants` is a weight."""
    if not isinstance(x, fx.Node) or x.op == "get_attr":
        return False
    if not all(isinstance(c, fx.Node) and c.op == "get_attr" for c in constants):
        return False
    return _val(x).dtype == torch.float32 and _val(x).device.type == "cpu"


def _dequantized(make_linear: Callable) -> Callable:
    """A float32 linear kernel's maker taking a weight-only or dynamic quantized linear: the
    weight is dequantized once, when the kernel is bound (the program then holds it in float32)."""
    def make(node, args, kwargs):
        if node.target is quant_ops.LINEAR_WQ:
            x, qweight, scales, bias, bits, _group = args
            weight = quant_ops.dequantize_weight(qweight, scales, bits, _val(node.args[0]).shape[-1])
        else:
            x, qweight, wscale, bias, *smooth = args
            weight = qweight.float() * wscale[:, None]
            if smooth and smooth[0] is not None:  # the weight's columns were divided by it
                weight = weight * smooth[0]
        return make_linear(node, (x, weight, bias), {})

    return make


def _quantized_conv_fits(node: fx.Node) -> bool:
    """A weight-only quantized conv2d a float32 convolution can run on its dequantized weight: the input computed
    at run time, float32 on CPU, the weights and bias constant."""
    x, qweight, scales, bias = node.args[:4]
    return _float_input_constant_weights(x, [qweight, scales] + ([] if bias is None else [bias]))


def _make_float_conv_wq(node, args, kwargs):
    """torch's CPU convolution (oneDNN where torch's heuristics pick it) on a weight-only quantized
    conv's weight, dequantized once when the kernel is bound (the program then holds it in
    float32). Not oneDNN's `_convolution_pointwise` directly: on the zoo's 1x1 stride-2 convs that
    took 78 us where torch's dispatch took 26 us."""
    x, qweight, scales, bias, weight_shape, stride, padding, dilation, groups, bits, _group = args
    cols = weight_shape[1] * weight_shape[2] * weight_shape[3]
    weight = quant_ops.dequantize_weight(qweight, scales, bits, cols).reshape(weight_shape).contiguous()
    conv = torch.nn.functional.conv2d

    def run(activation):
        return conv(activation, weight, bias, stride, padding, dilation, groups)

    return run


def _onednn_post_op(activation: str, act_args) -> tuple[str, list, str] | None:
    """oneDNN's post-op `(attr, scalars, algorithm)` for an activation; None if it has none."""
    if activation == fused.NO_ACTIVATION:
        return ("none", [], "")
    entry = POINTWISE.get(activation)
    return entry.onednn(*act_args) if entry is not None and entry.onednn is not None else None


def _epilogue_fits_mkldnn(node: fx.Node) -> bool:
    """A fused conv2d/linear epilogue oneDNN can run: float32 on CPU, weights bound as constants,
    the input computed at run time, and an activation oneDNN has as a post-op (with a residual,
    the activation may run in torch after oneDNN's fused add)."""
    if node.kwargs or len(node.args) != len(node.target._schema.arguments):
        return False  # the kernels below find the residual by position, as the fuse pass writes it
    a = arguments(node)
    if node.target is fused.CONV_EPILOGUE and a["weight"].meta["val"].dim() != 4:
        return False  # oneDNN's pointwise convolution is 2-d
    constants = [a["weight"]] + ([a["bias"]] if a["bias"] is not None else [])
    # a linear's weight and bias may be streamed (fetched at run time): oneDNN takes them per call
    per_call = node.target is fused.LINEAR_EPILOGUE
    if not all(isinstance(c, fx.Node) and (c.op == "get_attr" or (per_call and _streamed(c))) for c in constants):
        return False
    if not isinstance(a["x"], fx.Node) or a["x"].op == "get_attr" or not _all_float32_cpu(node):
        return False
    return a["residual"] is not None or _onednn_post_op(a["activation"], a["act_args"]) is not None


def _mkldnn_applies(node: fx.Node) -> bool:
    if node.target is aten.linear.default:
        return _linear_with_constant_weight(node) or _linear_with_streamed_weight(node)
    if node.target is sparse_ops.SPARSE_LINEAR:
        return _sparse_linear_with_constant_weight(node)
    if node.target in _DEQUANTIZABLE:
        return _quantized_linear_fits(node)
    if node.target is quant_ops.CONV2D_WQ:
        return _quantized_conv_fits(node)
    return _epilogue_fits_mkldnn(node)


def _then_activation(activation: str, act_args) -> Callable:
    """The activation applied in place by torch (identity for "none")."""
    if activation == fused.NO_ACTIVATION:
        return lambda out: out
    inplace = POINTWISE[activation].inplace
    return lambda out: inplace(out, *act_args)


def _make_mkldnn_conv_epilogue(node, args, kwargs):
    """oneDNN's convolution with its bias, residual add and activation as post-ops (what
    Inductor's CPU freezing calls). Its binary form takes ReLU as the only unary post-op; another
    activation after a residual runs in place in torch. The weight stays in PyTorch's layout:
    oneDNN's prepacked (`_reorder_convolution_weight`) layout makes it return channels-last
    results, whose copy back to NCHW cost more than the prepacking saved on our zoo's shapes."""
    bind = _binder(args, kwargs)
    a = dict(zip((arg.name for arg in fused.CONV_EPILOGUE._schema.arguments), args))
    weight, bias = a["weight"].contiguous(), a["bias"]
    geometry = (list(a["padding"]), list(a["stride"]), list(a["dilation"]), a["groups"])
    conv = torch.ops.mkldnn._convolution_pointwise
    if not isinstance(a["residual"], (_Slot, torch.Tensor)):
        attr, scalars, algorithm = _onednn_post_op(a["activation"], a["act_args"])

        def run(*activations):
            x = bind(activations)[0][0]
            return conv(x, weight, bias, *geometry, attr, scalars, algorithm or None)

        return run
    unary = "relu" if a["activation"] == "relu" else None
    after = _then_activation(fused.NO_ACTIVATION if unary else a["activation"], a["act_args"])

    def run_binary(*activations):
        filled = bind(activations)[0]
        return after(conv.binary(filled[0], filled[7], weight, bias, *geometry, "add", None, unary, [], None))

    return run_binary


def _make_mkldnn_linear_epilogue(node, args, kwargs):
    """oneDNN's inner product with the activation as a post-op, or with the residual add as a
    binary post-op (which takes no unary one: the activation then runs in place in torch)."""
    a = dict(zip((arg.name for arg in fused.LINEAR_EPILOGUE._schema.arguments), args))
    if isinstance(a["weight"], torch.Tensor):  # a constant; a streamed one (a slot) is filled per call
        args = (args[0], a["weight"].contiguous(), *args[2:])
    bind = _binder(args, kwargs)
    linear = torch.ops.mkldnn._linear_pointwise
    if not isinstance(a["residual"], (_Slot, torch.Tensor)):
        attr, scalars, algorithm = _onednn_post_op(a["activation"], a["act_args"])

        def run(*activations):
            filled = bind(activations)[0]
            return linear(filled[0], filled[1], filled[2], attr, scalars, algorithm)

        return run
    after = _then_activation(a["activation"], a["act_args"])

    def run_binary(*activations):
        filled = bind(activations)[0]
        return after(linear.binary(filled[0], filled[3], filled[1], filled[2], "add"))

    return run_binary


HEAVY_OPS = frozenset({
    aten.linear.default, aten.addmm.default, aten.mm.default, aten.bmm.default, aten.matmul.default,
    aten.conv1d.default, aten.conv2d.default, aten.convolution.default,
    aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input,
    aten.scaled_dot_product_attention.default, aten.lstm.input, aten.gru.input,
    rnn_ops.LSTM, rnn_ops.GRU,  # whole RNNs that decompose-rnn did not take (or did not run)
})

# The fused ops (ops/fused.py) whose kernel is chosen by measurement too.
FUSED_HEAVY_OPS = frozenset({fused.CONV_EPILOGUE, fused.LINEAR_EPILOGUE, fused.ATTENTION})

# Ops with a sparse weight (ops/sparse.py). Their "torch" candidate is the op's sparse kernel;
# the other candidates are dense kernels on the re-densified weight (see `kernel_layout`).
SPARSE_HEAVY_OPS = sparse_ops.SPARSE_OPS

# Quantized ops (ops/quant.py): "tvm" is the integer kernel, "torch" the op's eager code, and for
# weight-only and dynamic linears and weight-only convs the float32 kernels run on the dequantized weight.
QUANT_HEAVY_OPS = quant_ops.HEAVY
_DEQUANTIZABLE = frozenset({quant_ops.LINEAR_WQ, quant_ops.LINEAR_DQ})

# torch's own kernel for every heavy op: the eager baseline, always a candidate.
TORCH = ExternImpl("torch", HEAVY_OPS | FUSED_HEAVY_OPS | SPARSE_HEAVY_OPS | QUANT_HEAVY_OPS, _make_generic)
_MKLDNN_MAKERS = {
    aten.linear.default: _make_mkldnn_linear,
    sparse_ops.SPARSE_LINEAR: _densified(_make_mkldnn_linear),
    fused.CONV_EPILOGUE: _make_mkldnn_conv_epilogue,
    fused.LINEAR_EPILOGUE: _make_mkldnn_linear_epilogue,
    **{op: _dequantized(_make_mkldnn_linear) for op in _DEQUANTIZABLE},
    quant_ops.CONV2D_WQ: _make_float_conv_wq,
}
MKLDNN = ExternImpl("mkldnn", frozenset(_MKLDNN_MAKERS), lambda node, *rest: _MKLDNN_MAKERS[node.target](node, *rest),
                    applies=lambda n: _mkldnn_applies(n) and torch.backends.mkldnn.is_available())
_MKL_MAKERS = {aten.linear.default: _make_mkl_linear, sparse_ops.SPARSE_LINEAR: _densified(_make_mkl_linear)}
MKL_LINEAR = ExternImpl("mkl", frozenset(_MKL_MAKERS), lambda node, *rest: _MKL_MAKERS[node.target](node, *rest),
                        applies=lambda n: torch._C.has_mkl and (_sparse_linear_with_constant_weight(n)
                                                                if n.target is sparse_ops.SPARSE_LINEAR
                                                                else _linear_with_constant_weight(n)))

EXTERN_IMPLS: tuple[ExternImpl, ...] = (TORCH, MKLDNN, MKL_LINEAR)


def extern_impls_for(node: fx.Node) -> list[ExternImpl]:
    """The external implementations that can run `node` (empty for glue ops)."""
    if node.op != "call_function":
        return []
    return [impl for impl in EXTERN_IMPLS if node.target in impl.ops and impl.applies(node)]


def has_extern(op) -> bool:
    """Whether some external implementation exists for `op` (capture keeps such ops whole)."""
    return any(op in impl.ops for impl in EXTERN_IMPLS)


def impl_named(name: str) -> ExternImpl:
    """The external implementation called `name`: a kernel candidate, or one that runs an op
    inside the TVM program (support.register_vm_op)."""
    for impl in EXTERN_IMPLS:
        if impl.name == name:
            return impl
    from .support import vm_op_impls

    return next(impl for impl in vm_op_impls() if impl.name == name)


# The candidates that run a sparse op on its sparse weight; every other candidate of a sparse op
# (tvm, mkldnn, mkl) runs a dense kernel on the re-densified weight.
SPARSE_KERNELS = frozenset({"torch"})


def is_tvm_kernel(name: str) -> bool:
    """Whether kernel choice `name` is TVM's: "tvm", or a variant of it that the converters emit
    on request ("tvm-plain": an int8 conv on Relax's conv2d instead of the VNNI conv)."""
    return name == "tvm" or name.startswith("tvm-")


def kernel_layout(op: str, choice: str) -> str:
    """For an op with a sparse weight (by printed name, e.g. "orca.sparse_linear"): "sparse" if
    kernel `choice` runs on the sparse weight, "dense" if on the re-densified one. For a quantized
    op: "integer" if the chosen kernel computes on the integer weights (our TVM kernel), "float32"
    if it runs on dequantized ones. "" for other ops."""
    if op in quant_ops.QUANT_OP_NAMES:
        return "integer" if is_tvm_kernel(choice) else "float32"
    if op not in sparse_ops.SPARSE_OP_NAMES:
        return ""
    return "sparse" if choice in SPARSE_KERNELS else "dense"


@dataclass
class ExternCall:
    """One node bound to an external implementation: the global function the VM calls, and
    the names of the fx nodes whose values it takes (in order)."""

    func_name: str
    activation_names: list[str]
    fn: Callable
    impl: str
    _finalizer: object = field(default=None, repr=False)


_counter = itertools.count()


def bind_extern(node: fx.Node, gm: fx.GraphModule, impl: ExternImpl) -> ExternCall:
    """Build `impl`'s callable for `node` (weights read from `gm`) and register it with TVM.

    The registration is removed when the returned ExternCall is garbage collected.
    """
    import tvm_ffi  # not tvm: loading a cached program binds these without importing all of tvm

    activations: list[fx.Node] = []

    def template(arg):
        if arg.op == "get_attr":
            return getattr(gm, arg.target)
        if arg not in activations:
            activations.append(arg)
        return _Slot(activations.index(arg))

    args = fx.node.map_arg(node.args, template)
    kwargs = fx.node.map_arg(node.kwargs, template)
    fn = impl.make(node, args, kwargs)

    def packed(*tvm_tensors):
        return fn(*(torch.from_dlpack(t) for t in tvm_tensors))

    if impl.raw_args:
        packed = fn

    name = f"orca.extern.{impl.name}.{node.name}.{next(_counter)}"
    tvm_ffi.register_global_func(name, packed, override=True)
    call = ExternCall(name, [a.name for a in activations], fn, impl.name)
    call._finalizer = weakref.finalize(call, _unregister, name)
    return call


def _unregister(name: str) -> None:
    try:
        import tvm_ffi

        tvm_ffi.remove_global_func(name)
    except Exception:  # interpreter shutdown: the registry may already be gone
        pass
