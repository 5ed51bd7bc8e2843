"""`orca_compiler.compile()`: capture -> passes -> lowering -> CompiledModule."""
from __future__ import annotations

import time
from typing import Any, Sequence

import torch
from torch.utils import _pytree as pytree

from .capture import capture
from .errors import CaptureError, OrcaError
from .instruments import Instrument
from .pass_base import PassContext
from .pass_manager import PassManager
from .report import CompileReport
from .ir import GraphIR
from .runtime import CompiledModule, IndexGuard, InputSignature

_OPTIONS = ("fullgraph", "verify_each", "instruments", "pass_config", "kernels", "tuning_db", "dynamic_shapes", "eager_guard",
            "calibration_data", "calibration_loss", "cache", "cache_dir")


def _normalize_inputs(example_inputs: Any) -> tuple:
    """The example inputs as a tuple (a bare tensor becomes a 1-tuple); its leaves must be
    tensors (nested tuples/lists such as an LSTM's `(h0, c0)` are kept as they are)."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise OrcaError(f"example_inputs must be a tuple of tensors, got {type(example_inputs).__name__}")
    leaves, _ = pytree.tree_flatten(tuple(example_inputs))
    for i, value in enumerate(leaves):
        if not isinstance(value, torch.Tensor):
            raise OrcaError(f"example input leaf {i} must be a tensor, got {type(value).__name__}")
    return tuple(example_inputs)


def _pass_config(options: dict, target_kind: str = "cpu") -> dict:
    """ctx.config for the passes: the user's pass_config, calibration data, and `target_kind`
    ("cpu" or "cuda": the device the program is compiled for, e.g. place-memory's default tiers)."""
    config = dict(options.get("pass_config") or {})
    config.setdefault("target_kind", target_kind)
    if options.get("calibration_data") is not None:
        config["calibration_data"] = list(options["calibration_data"])
    if options.get("calibration_loss") is not None:
        config["calibration_loss"] = options["calibration_loss"]
    return config


def _symbolic_dims(placeholder) -> set[int]:
    """The dimensions of an input the IR holds as symbols (sized at call time)."""
    return {i for i, s in enumerate(placeholder.meta["val"].shape) if not isinstance(s, int)}


def index_guards(ir: GraphIR) -> list[IndexGuard]:
    """Guards for user inputs used directly as embedding indices (see runtime.IndexGuard)."""
    positions = {node: i for i, node in enumerate(ir.input_nodes())}
    guards = []
    for node in ir.compute_nodes():
        if node.target is torch.ops.aten.embedding.default and node.args[1] in positions:
            rows = node.args[0].meta["val"].shape[0]
            guards.append(IndexGuard(positions[node.args[1]], int(rows), node.name))
    return guards


def compile(
    model: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    pipeline: str = "O1",
    target: str | dict = "llvm",
    **options: Any,
) -> CompiledModule:
    """Compile `model` for `target` and return a CompiledModule that is called like `model`.

    `example_inputs` is a tuple of tensors (nested tuples/lists allowed, e.g. an LSTM's
    `(x, (h0, c0))`) with the shapes and dtypes the module will be called with. Shapes are static
    unless `dynamic_shapes` (torch.export's format, e.g. `({1: torch.export.Dim("T")},)`) marks
    dimensions that vary: those are symbols in the IR and the program, and any size is accepted
    at call time without recompiling. `pipeline` is pipeline text or a named pipeline (O0..O3). Options:
    `fullgraph` (default False: unsupported ops and capture failures fall back to eager and are
    reported; True makes them errors), `verify_each` (verify the IR after every pass, default
    True), `instruments` (a list of orca_compiler.instruments.Instrument), `pass_config` (a dict
    handed to passes as ctx.config), `kernels` ("measure", the default: each heavy op gets the
    fastest of its TVM and external kernels, measured once per shape and cached on disk; or
    "tvm" / "torch" / "mkldnn" / "mkl" to force that kernel wherever it applies), `tuning_db` (a
    meta_schedule database folder, see lowering/tuning.py: TVM kernels use its schedules where it
    has records), `dynamic_shapes` (above), `calibration_data` / `calibration_loss` (inputs, or
    (inputs, target) pairs with a loss, for passes that need data: see orca_compiler.prune), `cache`
    ("on", the default unless $ORCA_COMPILE_CACHE says otherwise: a compile of the same model,
    weights, input signature, pipeline, target and options is served from this process's cache or
    from disk; "read-only": use the disk cache but never write it; "off"), `cache_dir` (the disk
    cache's folder; default $ORCA_COMPILE_CACHE_DIR or `orca_compiler.cache_dir.cache_dir()/compiled`;
    see docs/caching.md), `eager_guard` (default True, or $ORCA_EAGER_GUARD: on CPU, time the
    compiled program against the model in eager PyTorch and run eager unless the compiled
    program is at least eager_guard.MARGIN (5%) faster; see
    orca_compiler/eager_guard.py). Assumes an inference model (model.eval()).
    """
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise OrcaError(f"unknown compile option(s) {', '.join(unknown)}; valid options: {', '.join(_OPTIONS)}")
    from .lowering import lower
    from .lowering.support import keep_op_in_capture

    inputs = _normalize_inputs(example_inputs)
    fullgraph = bool(options.get("fullgraph", False))
    manager = PassManager(pipeline)  # parse first: a typo fails in milliseconds, not after capture
    from .compile_cache import CacheRequest

    cache = CacheRequest.make(model, inputs, manager.text, target, options)  # a hit imports no tvm
    hit = cache.lookup()
    if hit is not None:
        return hit
    resolved = cache.resolved_target()
    report = CompileReport(pipeline=manager.text, target=str(resolved.tvm_target.kind.name))
    t0 = time.perf_counter()
    try:
        captured = capture(model, inputs, keep_op=keep_op_in_capture, dynamic_shapes=options.get("dynamic_shapes"))
    except CaptureError as exc:
        if fullgraph:
            raise
        from .graph_breaks import compile_with_graph_breaks

        compiled = compile_with_graph_breaks(model, inputs, exc, pipeline=manager.text, target=target,
                                             report=report, options=options)
        cache.store(compiled)  # reports why it is not cached
        return compiled
    t1 = time.perf_counter()
    report.capture_method = captured.method
    report.capture_failures = captured.failed_attempts
    ctx = PassContext(
        example_inputs=tuple(pytree.tree_leaves(inputs)),
        instruments=list(options.get("instruments") or []),
        verify_each=bool(options.get("verify_each", True)),
        config=_pass_config(options, resolved.kind),
    )
    for inst in ctx.instruments:
        if not isinstance(inst, Instrument):
            raise OrcaError(f"instruments must be orca_compiler.instruments.Instrument objects, got {type(inst).__name__}")
    ir, records = manager.run(captured.ir, ctx)
    t2 = time.perf_counter()
    lowered = lower(ir, resolved, fullgraph=fullgraph, kernels=options.get("kernels", "measure"),
                    tuning_db=options.get("tuning_db"))
    t3 = time.perf_counter()
    report.passes = records
    report.fallbacks = lowered.fallbacks
    report.partitions = lowered.partitions
    report.kernels = lowered.kernels
    report.seconds = {"capture": t1 - t0, "passes": t2 - t1, "kernel selection": lowered.selection_seconds,
                      "lowering": t3 - t2 - lowered.selection_seconds, "total": t3 - t0}
    program = lowered.module
    signature = [InputSignature.of(t, _symbolic_dims(node)) for t, node in zip(pytree.tree_leaves(inputs), ir.input_nodes())]
    from . import eager_guard

    guards = index_guards(ir)

    def module(runs) -> CompiledModule:
        return CompiledModule(runs, signature=signature, in_spec=ir.in_spec, out_spec=ir.out_spec, report=report,
                              ir=ir, guards=guards)

    compiled = module(program)
    if eager_guard.enabled(options, resolved, any(None in s.shape for s in signature)):
        fallback = module(eager_guard.EagerProgram(model, ir.in_spec))
        report.eager_guard = eager_guard.compare(compiled, fallback, inputs)
        if report.eager_guard.chose == "eager":
            compiled, program = fallback, fallback.program
        compiled.l1_calls[0] = 0  # the guard's calls are not the user's
    compiled.executables = lowered.executables
    from .serialize import Artifact

    if isinstance(program, eager_guard.EagerProgram):
        cache.key = None  # the decision is this machine's, now: the next compile measures again
        cache.info.events.append("not cached: the eager guard chose eager PyTorch")
    else:
        compiled.artifact = Artifact.of(ir, lowered)
    cache.store(compiled)
    return compiled
