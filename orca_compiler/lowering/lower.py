"""Lower a GraphIR: build what TVM supports, leave the rest in eager PyTorch, report each fallback."""
from __future__ import annotations

import operator
import time
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.operator_support import OperatorSupportBase

from ..errors import LoweringError, UnsupportedOpError
from ..ir import GraphIR
from ..printer import op_name
from ..runtime import TVMGraphModule
from .extern import bind_extern, impl_named, is_tvm_kernel
from .kernel_select import MEASURE, KernelChoice, import_meta, select_kernels
from .relax_build import build_executable, unread_effects
from .support import bind_host_ops, is_host_op, unsupported_reason, vm_op_impl
from .target import ResolvedTarget, resolve_target


@dataclass
class Fallback:
    """One node that runs in eager PyTorch, and why."""

    node: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"%{self.node} ({self.op}): {self.reason}"


@dataclass
class LoweredProgram:
    """The runnable program (flat tensors in, tuple out) and what the lowering did."""

    module: torch.nn.Module
    target: ResolvedTarget
    fallbacks: list[Fallback] = field(default_factory=list)
    executables: list = field(default_factory=list)
    partitions: int = 0
    build_seconds: float = 0.0
    kernels: list[KernelChoice] = field(default_factory=list)
    selection_seconds: float = 0.0
    # What a saved program needs to be put back together without TVM (serialize.py): the nodes
    # left to eager before partitioning (name -> reason), and each partition's name, its nodes and
    # its executable (None where TVM failed on it and it runs in eager).
    unsupported: dict[str, str] = field(default_factory=dict)
    partition_nodes: dict[str, list[str]] = field(default_factory=dict)
    partition_executables: dict[str, object] = field(default_factory=dict)


class _Supported(OperatorSupportBase):
    def __init__(self, unsupported: dict):
        self.unsupported_names = {n.name for n in unsupported}

    def is_node_supported(self, submodules, node: fx.Node) -> bool:
        if node.op != "call_function" or node.name in self.unsupported_names:
            return False
        if node.target is operator.getitem:  # a getitem goes with the tuple it reads
            source = node.args[0]
            return isinstance(source, fx.Node) and source.name not in self.unsupported_names
        return True


def _inline_weights(parent: fx.GraphModule, call: fx.Node) -> bool:
    """Move weights a partition reads from the parent's get_attr into the partition itself, and
    make the partition return a tuple. Returns whether it returned a bare value before.

    The partitioner passes weights as inputs; as get_attr inside, TVM binds them as constants.
    """
    sub: fx.GraphModule = getattr(parent, call.target)
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    keep_args = []
    for ph, arg in zip(placeholders, call.args):
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            name = arg.target
            if not hasattr(sub, name):
                sub.register_buffer(name, getattr(parent, name))
            with sub.graph.inserting_before(ph):
                attr = sub.graph.get_attr(name)
            attr.meta = dict(arg.meta)
            ph.replace_all_uses_with(attr)
            sub.graph.erase_node(ph)
        else:
            ph.meta = dict(arg.meta)
            keep_args.append(arg)
    call.args = tuple(keep_args)
    out = next(n for n in sub.graph.nodes if n.op == "output")
    single = not isinstance(out.args[0], (tuple, list))
    if single:
        out.args = ((out.args[0],),)
    sub.recompile()
    return single


def _nodes_of(sub: fx.GraphModule) -> list[fx.Node]:
    return [n for n in sub.graph.nodes if n.op == "call_function"]


def lower(ir: GraphIR, target="llvm", *, fullgraph: bool = False, kernels: str = MEASURE,
          selection_cache=None, tuning_db=None) -> LoweredProgram:
    """Build `ir` for `target`.

    Heavy ops get the kernel `kernel_select.select_kernels` picks (`kernels`: "measure" or a
    candidate to force); those bound to external kernels are called from the VM. Ops without a
    converter, or whose conversion TVM rejects, run in eager PyTorch between TVM partitions and
    are listed in `fallbacks`; with `fullgraph=True` they raise UnsupportedOpError /
    LoweringError naming the nodes instead. `tuning_db` is a meta_schedule database folder whose
    schedules the TVM kernels use where it has records.
    """
    resolved = target if isinstance(target, ResolvedTarget) else resolve_target(target)
    start = time.perf_counter()
    choices = select_kernels(ir, resolved, kernels, selection_cache, tuning_db)
    selected = time.perf_counter()
    program = _lower_with(ir, resolved, choices, fullgraph, tuning_db)
    alternative = _extern_alternative(choices) if kernels == MEASURE else None
    if alternative is not None:
        program, choices = _faster_program(ir, resolved, (program, choices),
                                           (_lower_with(ir, resolved, alternative, fullgraph, tuning_db), alternative))
    program.build_seconds = time.perf_counter() - selected
    program.selection_seconds = selected - start
    program.kernels = list(choices.values())
    return program


def _extern_alternative(choices: dict[str, KernelChoice]) -> dict[str, KernelChoice] | None:
    """The same choices with every measured TVM kernel swapped for its fastest extern one, or
    None when no TVM kernel was chosen over an extern candidate.

    A TVM kernel measured alone can lose in the program, where TVM fuses it with its neighbours
    into a function our schedules may not cover; `_faster_program` settles it on the whole.
    """
    swapped = {}
    for name, choice in choices.items():
        externs = {k: v for k, v in choice.times_us.items() if not is_tvm_kernel(k)}
        if is_tvm_kernel(choice.choice) and externs:
            best = min(externs, key=externs.get)
            swapped[name] = KernelChoice(choice.node, choice.op, best, "whole-program check",
                                         choice.times_us, choice.rejected)
    return {**choices, **swapped} if swapped else None


def _faster_program(ir: GraphIR, target: ResolvedTarget, *candidates):
    """The (program, choices) pair that runs the whole graph faster on random inputs."""
    from ..timing import time_interleaved
    from .kernel_select import random_input

    if not target.device().exist:
        return candidates[0]
    inputs = [random_input(node.meta["val"]) for node in ir.input_nodes()]
    runners = {i: (lambda m: lambda: m(*inputs))(program.module) for i, (program, _) in enumerate(candidates)}
    times = time_interleaved(runners, repeats=5, warmup=2, block=3)
    return candidates[min(times, key=times.get)]


def _lower_with(ir: GraphIR, resolved: ResolvedTarget, choices: dict, fullgraph: bool, tuning_db) -> LoweredProgram:
    nodes = {node.name: node for node in ir.compute_nodes()}
    externs = {name: bind_extern(nodes[name], ir.gm, impl_named(c.choice))
               for name, c in choices.items() if not is_tvm_kernel(c.choice)}
    externs.update({node.name: bind_extern(node, ir.gm, impl) for node in nodes.values()
                    if (impl := vm_op_impl(node, resolved.kind)) is not None})
    for name, c in choices.items():  # which TVM variant the converters emit (also reset: lowered twice)
        nodes[name].meta.update(import_meta(c.choice))
    rejected: dict[str, str] = {}  # node name -> why TVM's converter failed on it
    while True:
        unsupported = {}
        for node in ir.compute_nodes():
            reason = rejected.get(node.name) or unsupported_reason(node, externs)
            if reason is not None:
                unsupported[node] = reason
        eager = {n: r for n, r in unsupported.items() if not is_host_op(n)}  # host ops stay out of TVM by design
        if eager and fullgraph:
            listing = "; ".join(f"%{n.name} ({op_name(n)}): {r}" for n, r in eager.items())
            raise UnsupportedOpError(f"fullgraph=True but {len(eager)} op(s) cannot be lowered: {listing}")
        try:
            program = _build(ir, resolved, unsupported, fullgraph, externs, tuning_db)
        except LoweringError as exc:
            node = getattr(exc, "node", None)
            if fullgraph or node is None or node in rejected:
                raise
            rejected[node] = str(exc)  # retry with that node in eager
            continue
        program.fallbacks = [Fallback(n.name, op_name(n), r) for n, r in eager.items()] + program.fallbacks
        program.unsupported = {n.name: r for n, r in unsupported.items()}
        return program


def assemble(ir: GraphIR, resolved: ResolvedTarget, unsupported: dict[str, str], externs: dict,
             executables: dict) -> LoweredProgram:
    """Put a partitioned program back together from executables built before (a saved or cached
    program, see serialize.py): the same partitioning of `ir` with `unsupported` (node name ->
    reason) left to eager, and `executables` (partition name -> executable, or None for a
    partition that runs in eager) instead of building with TVM."""
    nodes = {node.name: node for node in ir.compute_nodes()}
    return _build(ir, resolved, {nodes[name]: reason for name, reason in unsupported.items()}, False, externs,
                  None, prebuilt=executables)


def _build(ir: GraphIR, resolved: ResolvedTarget, unsupported: dict, fullgraph: bool, externs: dict,
           database, prebuilt: dict | None = None) -> LoweredProgram:
    if not unsupported:
        try:
            executable = build_executable(ir.gm, resolved, what="the graph", externs=externs, database=database)
        except LoweringError as exc:
            if fullgraph or getattr(exc, "node", None) is not None:
                raise
            fallbacks = [Fallback(n.name, op_name(n), str(exc)) for n in ir.compute_nodes()]
            return LoweredProgram(ir.copy().gm, resolved, fallbacks)
        program = TVMGraphModule(executable, resolved, externs=externs, drop=len(unread_effects(ir.gm, externs)))
        return LoweredProgram(program, resolved, [], [executable], 1)

    parent = ir.copy().gm
    partitioner = CapabilityBasedPartitioner(parent, _Supported(unsupported), allows_single_node_partition=True)
    # Partitions of only getitem glue are not worth a TVM call.
    partitions = [p for p in partitioner.propose_partitions() if any(op_name(n) != "getitem" for n in p.nodes)]
    parent = partitioner.fuse_partitions(partitions)
    fallbacks, executables = [], []
    partition_nodes, partition_executables = {}, {}
    for call in [n for n in parent.graph.nodes if n.op == "call_module"]:
        single_output = _inline_weights(parent, call)
        sub = getattr(parent, call.target)
        names = [f"%{n.name}" for n in _nodes_of(sub)]
        partition_nodes[call.target] = [n.name for n in sub.graph.nodes]
        what = f"partition '{call.target}' ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})"
        if prebuilt is not None:  # None: a partition TVM failed on when it was built, eager
            executable = prebuilt.get(call.target)
        else:
            try:
                executable = build_executable(sub, resolved, what=what, externs=externs, database=database)
            except LoweringError as exc:
                if fullgraph or getattr(exc, "node", None) is not None:
                    raise
                fallbacks.extend(Fallback(n.name, op_name(n), str(exc)) for n in _nodes_of(sub))
                executable = None
        partition_executables[call.target] = executable
        if executable is None:
            continue
        executables.append(executable)
        setattr(parent, call.target,
                TVMGraphModule(executable, resolved, externs=externs, drop=len(unread_effects(sub, externs))))
        if single_output:
            _take_first_result(parent, call)
    bind_host_ops(parent, ir.gm)
    parent.graph.lint()
    parent.recompile()
    program = LoweredProgram(parent, resolved, fallbacks, executables, len(executables))
    program.partition_nodes, program.partition_executables = partition_nodes, partition_executables
    return program


def _take_first_result(parent: fx.GraphModule, call: fx.Node) -> None:
    """Users of a one-output partition expect a bare value; a TVM partition returns a tuple."""
    with parent.graph.inserting_after(call):
        first = parent.graph.call_function(operator.getitem, (call, 0))
    first.meta = dict(call.meta)  # a later partition reading it takes its type from here
    call.replace_all_uses_with(first, delete_user_cb=lambda user: user is not first)
