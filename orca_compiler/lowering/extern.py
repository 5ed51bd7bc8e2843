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

from ..ops import rnn as rnn_ops

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
    """

    name: str
    ops: frozenset
    make: Callable
    applies: Callable[[fx.Node], bool] = lambda node: True


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


def _make_generic(node, args, kwargs):
    op, bind = node.target, _binder(args, kwargs)

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
    """oneDNN's inner product (what Inductor's CPU freezing uses), with the weight bound."""
    weight = args[1].contiguous()
    bias = args[2] if len(args) > 2 else kwargs.get("bias")

    def run(activation):
        return torch.ops.mkldnn._linear_pointwise(activation, weight, bias, "none", [], "")

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


def _linear_with_constant_weight(node: fx.Node) -> bool:
    args = node.args
    if not isinstance(args[0], fx.Node) or args[0].op == "get_attr":
        return False
    weight_ok = isinstance(args[1], fx.Node) and args[1].op == "get_attr"
    bias = args[2] if len(args) > 2 else None
    bias_ok = bias is None or (isinstance(bias, fx.Node) and bias.op == "get_attr")
    return weight_ok and bias_ok and _all_float32_cpu(node)


HEAVY_OPS = frozenset({
    aten.linear.default, aten.addmm.default, aten.mm.default, aten.bmm.default, aten.matmul.default,
    aten.conv1d.default, aten.conv2d.default, aten.convolution.default,
    aten.scaled_dot_product_attention.default, aten.lstm.input, aten.gru.input,
    rnn_ops.LSTM, rnn_ops.GRU,  # whole RNNs that decompose-rnn did not take (or did not run)
})

# torch's own kernel for every heavy op: the eager baseline, always a candidate.
TORCH = ExternImpl("torch", HEAVY_OPS, _make_generic)
MKLDNN_LINEAR = ExternImpl("mkldnn", frozenset({aten.linear.default}), _make_mkldnn_linear,
                           applies=lambda n: _linear_with_constant_weight(n) and torch.backends.mkldnn.is_available())
MKL_LINEAR = ExternImpl("mkl", frozenset({aten.linear.default}), _make_mkl_linear,
                        applies=lambda n: _linear_with_constant_weight(n) and torch._C.has_mkl)

EXTERN_IMPLS: tuple[ExternImpl, ...] = (TORCH, MKLDNN_LINEAR, MKL_LINEAR)


def extern_impls_for(node: fx.Node) -> list[ExternImpl]:
    """The external implementations that can run `node` (empty for glue ops)."""
    if node.op != "call_function":
        return []
    return [impl for impl in EXTERN_IMPLS if node.target in impl.ops and impl.applies(node)]


def has_extern(op) -> bool:
    """Whether some external implementation exists for `op` (capture keeps such ops whole)."""
    return any(op in impl.ops for impl in EXTERN_IMPLS)


def impl_named(name: str) -> ExternImpl:
    return next(impl for impl in EXTERN_IMPLS if impl.name == name)


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
    import tvm

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

    name = f"orca.extern.{impl.name}.{node.name}.{next(_counter)}"
    tvm.register_global_func(name, packed, override=True)
    call = ExternCall(name, [a.name for a in activations], fn, impl.name)
    call._finalizer = weakref.finalize(call, _unregister, name)
    return call


def _unregister(name: str) -> None:
    try:
        import tvm_ffi

        tvm_ffi.remove_global_func(name)
    except Exception:  # interpreter shutdown: the registry may already be gone
        pass
