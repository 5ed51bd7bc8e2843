"""Which ATen ops the lowering converts natively (TVM's ExportedProgram importer plus our own).

Ops outside this set are decomposed at capture where PyTorch can, and otherwise run in eager
PyTorch as a fallback partition.
"""
from __future__ import annotations

import functools
import operator
from typing import Callable

import torch
import torch.fx as fx

# TVM 0.27 converts these names but gets them wrong, so we never hand them to its importer.
# - batch_norm.default: converted with training-mode statistics (max error ~0.1 on a conv+bn net);
#   capture decomposes it into _native_batch_norm_legit_no_training, which is exact.
# - lstm.input / gru.input: the converters handle one layer only ("Multi-layer LSTM is not yet
#   supported") and unroll every step. Capture records RNNs as orca.lstm / orca.gru, which
#   decompose-rnn lowers to a real loop; the aten ops left (LSTMs with projections) run as
#   torch's kernel.
KNOWN_WRONG = frozenset({"batch_norm.default", "lstm.input", "gru.input"})

# Our own ops (fused kernels from later passes) register converters here, in the format of TVM's
# custom_convert_map: fn(node, importer) -> relax.Var. Keyed by the op itself: TVM's importer keys
# by `__name__` alone ("wiggle.default"), which would let a custom op shadow an aten op's converter.
_CUSTOM_CONVERTERS: dict[torch._ops.OpOverload, Callable] = {}


# Modules of this package whose import registers converters for our own ops (orca_compiler.ops).
_CONVERTER_MODULES = ("rnn_kernels", "fused_kernels", "sparse_kernels", "quant_kernels", "quant_conv_kernels",
                      "streaming", "spilling", "reduction_converters")

# Ops the lowering keeps on the host on purpose (place-memory's prefetch/fetch/release): never
# handed to TVM and not reported as fallbacks. `bind(parent, source)` is called once on each
# partitioned program holding one (source: the IR's module) to turn its nodes into runtime calls.
_HOST_OPS: dict[torch._ops.OpOverload, Callable] = {}

# Ops that run inside the TVM program on some targets, as calls of one fixed external
# implementation (no kernel choice): op -> (its extern.ExternImpl, the target kinds). On those
# targets they are not host ops (place-memory's ops on CPU: no partition boundary per op).
_VM_OPS: dict[torch._ops.OpOverload, tuple] = {}
_VM_OP_MODULES = ("streaming", "spilling")  # the modules of this package that call register_vm_op


@functools.lru_cache(maxsize=1)
def _load_converter_modules() -> None:
    import importlib

    for name in _CONVERTER_MODULES:
        try:
            importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{name}":
                raise


def register_converter(op: torch._ops.OpOverload, converter: Callable) -> None:
    """Register a Relax converter for one of our own torch ops (a torch.library OpOverload)."""
    _CUSTOM_CONVERTERS[op] = converter


def register_host_op(op: torch._ops.OpOverload, bind: Callable) -> None:
    """Keep `op` on the host between TVM partitions by design (see _HOST_OPS)."""
    _HOST_OPS[op] = bind


def register_vm_op(op: torch._ops.OpOverload, impl, kinds: tuple[str, ...]) -> None:
    """Run `op` inside the TVM program as `impl` (an extern.ExternImpl) on targets of `kinds`."""
    _VM_OPS[op] = (impl, frozenset(kinds))


def vm_op_impl(node: fx.Node, kind: str):
    """The ExternImpl that runs `node` inside the TVM program on a `kind` target, or None."""
    _load_converter_modules()
    impl, kinds = _VM_OPS.get(node.target, (None, ()))
    return impl if node.op == "call_function" and kind in kinds else None


def vm_op_impls() -> list:
    """Every ExternImpl registered with register_vm_op (a saved program binds them by name).
    Imports only the modules that register them, which do not import tvm (a cached program
    loads without it)."""
    import importlib

    for name in _VM_OP_MODULES:
        importlib.import_module(f"{__package__}.{name}")
    return list({id(impl): impl for impl, _ in _VM_OPS.values()}.values())


def extern_state(module, attr: str):
    """The first `attr` found on the external kernels of a compiled module's (or program's) TVM
    programs: the runtime object that vm ops' kernels share (the weight stream, the spill file).
    None where no kernel has it."""
    from ..runtime import TVMGraphModule

    program = getattr(module, "program", module)
    if not isinstance(program, torch.nn.Module):
        return None
    for part in program.modules():
        if isinstance(part, TVMGraphModule):
            for call in part.externs.values():
                state = getattr(call.fn, attr, None)
                if state is not None:
                    return state
    return None


def is_host_op(node: fx.Node) -> bool:
    _load_converter_modules()
    return node.op == "call_function" and node.target in _HOST_OPS


def bind_host_ops(parent: fx.GraphModule, source: fx.GraphModule | None = None) -> None:
    """Run each binder of the host ops in `parent` once (before their targets are replaced)."""
    binders = {_HOST_OPS[n.target] for n in parent.graph.nodes if n.op == "call_function" and n.target in _HOST_OPS}
    for bind in binders:
        bind(parent, source)


def unregister_converter(op: torch._ops.OpOverload) -> None:
    _CUSTOM_CONVERTERS.pop(op, None)


def custom_converters() -> dict[str, Callable]:
    """The registered converters keyed the way TVM's importer looks them up."""
    _load_converter_modules()
    return {op.__name__: fn for op, fn in _CUSTOM_CONVERTERS.items()}


@functools.lru_cache(maxsize=1)
def native_op_names() -> frozenset[str]:
    """aten op names (`conv2d.default`, as TVM's importer keys them) the lowering converts."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    return frozenset(set(ExportedProgramImporter().create_convert_map()) - KNOWN_WRONG)


def op_key(target) -> str:
    return getattr(target, "__name__", str(target))


def _is_convertible(target) -> bool:
    _load_converter_modules()
    if target in _CUSTOM_CONVERTERS:
        return True
    if isinstance(target, torch._ops.OpOverload) and target.namespace not in ("aten", "prims"):
        return False
    return op_key(target) in native_op_names()


def keep_op_in_capture(op: torch._ops.OpOverload) -> bool:
    """For capture: keep `op` whole (do not decompose it) because the lowering converts it or
    has an external kernel for it."""
    from .extern import has_extern

    return _is_convertible(op) or has_extern(op)


def tvm_converts(node: fx.Node) -> bool:
    """Whether TVM's importer (or one of our converters) turns `node` into Relax."""
    return node.op == "call_function" and _tvm_reason(node) is None


def unsupported_reason(node: fx.Node, extern_nodes=frozenset()) -> str | None:
    """None if the node can be lowered (by TVM, or as an external kernel when its name is in
    `extern_nodes`); else a sentence saying why not."""
    if node.op != "call_function" or node.name in extern_nodes:
        return None
    if node.target is operator.getitem:
        source = node.args[0]
        if isinstance(source, fx.Node) and unsupported_reason(source, extern_nodes) is not None:
            return "reads an output of an op that runs in eager"
        return None
    return _tvm_reason(node)


def _tvm_reason(node: fx.Node) -> str | None:
    if node.target is operator.getitem:
        return None
    if not _is_convertible(node.target):
        return f"no TVM converter for {node.target}"
    kind = _untyped_in_tvm(node.meta.get("val"))
    if kind is not None:
        return f"{kind} tensors are not lowered"
    for operand in node.all_input_nodes:  # TVM's importer takes no complex or sparse input either
        kind = _untyped_in_tvm(operand.meta.get("val"))
        if kind is not None:
            return f"its input %{operand.name} is a {kind} tensor, which is not lowered"
    return None


def _untyped_in_tvm(value) -> str | None:
    """The kind of tensor in `value` (a tensor or a tuple of them) that TVM has no type for: a
    complex dtype ("torch.complex64") or a sparse layout ("torch.float32 sparse"); None if none."""
    for leaf in value if isinstance(value, (tuple, list)) else [value]:
        if isinstance(leaf, torch.Tensor) and (leaf.is_complex() or leaf.is_sparse):
            return f"{leaf.dtype}{' sparse' if leaf.is_sparse else ''}"
    return None
