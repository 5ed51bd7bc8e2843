"""Kernel selection by measurement, as TensorRT's tactics and Inductor's max-autotune do.

For every heavy op (linear, matmul, conv, attention, RNN) the candidates are the TVM kernel (our
rule-based schedules, or a tuned record when a database is given) and the external kernels of
extern.py (PyTorch's oneDNN / MKL implementations). Each candidate runs as its own function of one
Relax module built once for the whole graph, on random inputs of the node's shapes, through the
VM like the real program. The fastest correct one wins; the choice is stored in the selection
cache keyed by (op, argument shapes/dtypes/values) under a header of (target, threads, versions),
so the next compile does not measure again.
"""
from __future__ import annotations

import logging
import operator
import time
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..errors import LoweringError, OrcaError
from ..ir import GraphIR, sanitize_name
from ..printer import op_name
from ..timing import time_interleaved
from .extern import bind_extern, extern_impls_for, impl_named, is_tvm_kernel, kernel_layout
from .quant_kernels import PLAIN_CONV, PLAIN_CONV_META, vnni_conv_applies
from .selection_cache import SelectionCache
from .support import tvm_converts
from .target import ResolvedTarget

log = logging.getLogger(__name__)

MEASURE = "measure"
# A candidate whose warm call (best of two) is this many times slower than the fastest is out.
CUTOFF = 4.0
# Time spent timing the survivors of one key, at most (seconds).
BUDGET_PER_KEY = 0.06


@dataclass
class KernelChoice:
    """The kernel chosen for one node, and how: measured now, read from the cache, or forced."""

    node: str
    op: str
    choice: str
    how: str
    times_us: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)

    @property
    def measured(self) -> bool:
        """Whether the choice compared timings (now, from the cache, or by the whole-program
        check of lowering.lower), rather than being forced or a default."""
        return self.how in ("measured", "cached", "whole-program check")

    @property
    def layout(self) -> str:
        """For an op with a sparse weight: "sparse" when the chosen kernel runs on the sparse
        weight, "dense" when on the re-densified one; "" for other ops."""
        return kernel_layout(self.op, self.choice)

    @property
    def choice_text(self) -> str:
        """The choice, with the weight layout it runs on for sparse ops ("mkldnn (dense)")."""
        return f"{self.choice} ({self.layout})" if self.layout else self.choice

    def __str__(self) -> str:
        times = ", ".join(f"{k} {v:.1f}us" for k, v in sorted(self.times_us.items(), key=lambda kv: kv[1]))
        out = ", ".join(f"{k}: {v}" for k, v in self.rejected.items())
        return (f"%{self.node} ({self.op}) -> {self.choice_text} [{self.how}{': ' + times if times else ''}]"
                + (f" [out: {out}]" if out else ""))


def _describe(arg):
    if isinstance(arg, fx.Node):
        val = arg.meta.get("val")
        kind = "w" if arg.op == "get_attr" else "x"
        if isinstance(val, torch.Tensor):
            return f"{kind}:{str(val.dtype).replace('torch.', '')}{list(val.shape)}"
        return f"{kind}:?"
    return arg


def selection_key(node: fx.Node) -> str:
    """What a kernel choice depends on: the op, every tensor argument's kind (weight or
    activation), dtype and shape, and every other argument's value."""
    args = fx.node.map_arg(node.args, _describe)
    kwargs = fx.node.map_arg(dict(node.kwargs), _describe)
    return f"{op_name(node)}{args!r}{kwargs!r}"


# TVM candidates besides "tvm" (extern.is_tvm_kernel): an int8 conv that becomes the direct VNNI
# conv ("tvm") is also measured as Relax's plain int8 conv ("tvm-plain"), and the faster kept.


def candidates(node: fx.Node, target: ResolvedTarget | None = None) -> list[str]:
    """Names of the kernels that can run `node`: "tvm" (and on `target` its variants) and/or
    extern implementations."""
    names = ["tvm"] if tvm_converts(node) else []
    if names and target is not None and vnni_conv_applies(node, target.tvm_target):
        names.append(PLAIN_CONV)
    return names + [impl.name for impl in extern_impls_for(node)]


def import_meta(name: str) -> dict:
    """The node.meta entries that make the converters emit candidate `name` (a TVM variant)."""
    return {PLAIN_CONV_META: name == PLAIN_CONV}


def select_kernels(ir: GraphIR, target: ResolvedTarget, mode: str = MEASURE,
                   cache: SelectionCache | None = None, database=None) -> dict[str, KernelChoice]:
    """Choose a kernel for every heavy node of `ir` (node name -> KernelChoice).

    `mode` is "measure" (the fastest candidate, measured or cached), or a candidate name
    ("tvm", "torch", "mkldnn", "mkl") to force it wherever it applies (elsewhere: TVM if it
    converts the op, else torch). Without a device for the target nothing is measured: TVM
    wherever it converts the op. With a tuning `database` (folder), the TVM candidates use its
    schedules, and choices are cached apart from untuned ones.
    """
    valid = {MEASURE, "tvm", "torch", "mkldnn", "mkl"}
    if mode not in valid:
        raise OrcaError(f"unknown kernels option {mode!r}; valid: {', '.join(sorted(valid))}")
    choices: dict[str, KernelChoice] = {}
    to_measure: dict[str, list[fx.Node]] = {}
    can_measure = mode == MEASURE and target.device().exist
    if can_measure and cache is None:
        cache = SelectionCache(target.key + (f"|tuning:{_database_identity(database)}" if database else ""))
    for node in ir.compute_nodes():
        names = candidates(node, target)
        if not names or names == ["tvm"]:
            continue
        symbolic = has_symbolic_shape(node)
        if len(names) == 1 or not can_measure or symbolic:
            if len(names) == 1:
                preferred, how = names[0], "only candidate"
            elif symbolic and mode not in names:
                # Its size changes from call to call: a measurement at one size decides nothing,
                # and torch's own kernel is never slower than eager.
                preferred, how = ("torch" if "torch" in names else "tvm"), "symbolic shape, not measured"
            elif mode in names:
                preferred, how = mode, "forced"
            else:
                preferred, how = ("tvm" if "tvm" in names else "torch"), "default"
            choices[node.name] = KernelChoice(node.name, op_name(node), preferred, how)
            continue
        key = selection_key(node)
        record = cache.get(key)
        if record and record.get("choice") in names:
            choices[node.name] = KernelChoice(node.name, op_name(node), record["choice"], "cached",
                                              record.get("times_us", {}), record.get("rejected", {}))
        else:
            to_measure.setdefault(key, []).append(node)
    if to_measure:
        measured = measure(ir, target, {key: nodes[0] for key, nodes in to_measure.items()}, database)
        for key, nodes in to_measure.items():
            times, rejected = measured[key]
            best = min(times, key=times.get) if times else "torch"
            cache.put(key, {"choice": best, "times_us": times, "rejected": rejected})
            for node in nodes:
                choices[node.name] = KernelChoice(node.name, op_name(node), best, "measured", times, rejected)
        cache.save()
    return choices


def _database_identity(database) -> str:
    """A tuning database folder as a cache key part: its path and when its records last changed."""
    from pathlib import Path

    path = Path(database).resolve()
    # A target-aware root (orca tune) keeps its records one level down, per target.
    stamps = [f.stat().st_mtime_ns for f in [*path.glob("*.json"), *path.glob("*/*.json")]] if path.is_dir() else []
    return f"{path}@{max(stamps, default=0)}"


# -- measurement --------------------------------------------------------------------------------

def probe_graph(node: fx.Node, gm: fx.GraphModule) -> tuple[fx.GraphModule, fx.Node]:
    """A graph holding only `node`: its activations as placeholders, its weights as get_attr."""
    graph, root, env = fx.Graph(), torch.nn.Module(), {}
    for arg in node.all_input_nodes:
        if arg.op == "get_attr":
            name = sanitize_name(arg.target)
            root.register_buffer(name, getattr(gm, arg.target))
            new = graph.get_attr(name)
        else:
            new = graph.placeholder(arg.name)
        new.meta = dict(arg.meta)
        env[arg] = new
    copy = graph.node_copy(node, lambda a: env[a])
    copy.meta = dict(node.meta)
    val = node.meta["val"]
    outputs = [copy]
    if isinstance(val, (tuple, list)):
        outputs = []
        for i, leaf in enumerate(val):
            item = graph.call_function(operator.getitem, (copy, i))
            item.meta = {"val": leaf}
            outputs.append(item)
    graph.output(tuple(outputs))
    return fx.GraphModule(root, graph), copy


def example_shape(val) -> tuple[int, ...]:
    """FakeTensor `val`'s shape, with each symbolic dimension at its example value."""
    return tuple(int(s) if isinstance(s, int) else int(s.node.hint) for s in val.shape)


def has_symbolic_shape(node: fx.Node) -> bool:
    """Whether a tensor `node` reads or produces has a symbolic (call-time) dimension."""
    vals = [a.meta.get("val") for a in node.all_input_nodes] + [node.meta.get("val")]
    leaves = [v for v in torch.utils._pytree.tree_leaves(vals) if isinstance(v, torch.Tensor)]
    return any(not isinstance(s, int) for t in leaves for s in t.shape)


def random_input(val) -> torch.Tensor:
    """A tensor like FakeTensor `val`: normal floats, zeros for integers (valid indices)."""
    if val.dtype.is_floating_point:
        return torch.randn(example_shape(val), dtype=val.dtype, device=val.device)
    return torch.zeros(example_shape(val), dtype=val.dtype, device=val.device)


def _as_torch_list(result) -> list[torch.Tensor]:
    items = result if isinstance(result, (tuple, list)) or not hasattr(result, "shape") else [result]
    return [r if isinstance(r, torch.Tensor) else torch.from_dlpack(r) for r in items]


def _mismatch(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> str | None:
    for ref, out in zip(reference, outputs):
        if ref.shape != out.shape:
            return f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
        if ref.dtype.is_floating_point:
            scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
            err = float((ref - out).abs().max()) if ref.numel() else 0.0
            # fp16/bf16 results may differ from torch's by a rounding of their own (bf16: 2^-8 relative)
            if not err <= max(1e-3, 2 * torch.finfo(ref.dtype).eps) * scale:
                return f"max abs error {err:.3g} against torch"
        elif not torch.equal(ref, out):
            return "differs from torch"
    return None


def _best_of(calls: int, fn, args) -> float:
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best


def measure(ir: GraphIR, target: ResolvedTarget, nodes: dict[str, fx.Node], database=None) -> dict[str, tuple[dict, dict]]:
    """Time every candidate of each node (key -> node). Returns key -> (times in us, rejected).

    Rejected candidates (import/build failures, wrong numbers) are listed with the reason.
    """
    import tvm
    from tvm import relax

    from ..threads import configure_tvm_threads
    from .relax_build import compile_relax, import_relax, tvm_error_summary

    configure_tvm_threads()
    start = time.perf_counter()
    functions, keep_alive, inputs, rejected = {}, [], {}, {key: {} for key in nodes}
    for index, (key, node) in enumerate(nodes.items()):
        probe, copy = probe_graph(node, ir.gm)
        inputs[key] = [random_input(n.meta["val"]) for n in probe.graph.nodes if n.op == "placeholder"]
        for name in candidates(node, target):
            externs = None
            copy.meta.update(import_meta(name))
            if not is_tvm_kernel(name):
                call = bind_extern(copy, probe, impl_named(name))
                keep_alive.append(call)
                externs = {copy.name: call}
            try:
                imported = import_relax(probe, externs, target)
            except LoweringError as exc:
                rejected[key][name] = str(exc)
                continue
            symbol = f"k{index}_{name}"
            # Converters that emit their own kernels (call_tir) add PrimFuncs beside "main"; their
            # names are unique per process (see quant_kernels.kernel_name), so they can share a module.
            helpers = {gv: imported[gv] for gv in imported.get_global_vars() if gv.name_hint != "main"}
            functions[(key, name)] = (symbol, imported["main"].with_attr("global_symbol", symbol), helpers)

    def build(selected):
        module = tvm.IRModule({symbol: func for symbol, func, _ in selected.values()})
        for _, _, helpers in selected.values():
            for gv, func in helpers.items():
                module[gv] = func
        return relax.VirtualMachine(compile_relax(module, target, database), target.device())

    try:
        vm = build(functions)
    except OrcaError:  # ours already say what is wrong (a bad tuning database)
        raise
    except Exception as exc:  # one TVM candidate that does not build must not sink the others
        reason = f"TVM build failed: {tvm_error_summary(exc)}"
        log.info("kernel selection: %s; measuring the extern kernels only", reason)
        for key, name in [k for k in functions if is_tvm_kernel(k[1])]:
            rejected[key][name] = reason
            del functions[(key, name)]
        vm = build(functions)
    results = {}
    for key in nodes:
        args = inputs[key]
        runners, firsts, outputs = {}, {}, {}
        for (k, name), (symbol, _, _) in functions.items():
            if k != key:
                continue
            fn = vm[symbol]
            try:  # the first call also pays for one-time setup (oneDNN builds its primitives)
                outputs[name] = _as_torch_list(fn(*args))
            except Exception as exc:
                rejected[key][name] = f"failed to run: {tvm_error_summary(exc)}"
                continue
            firsts[name] = _best_of(2, fn, args)  # a preemption must not drop a candidate
            runners[name] = (lambda f: lambda: f(*args))(fn)
        reference = outputs.get("torch")
        for name in list(runners):
            problem = _mismatch(reference, outputs[name]) if reference is not None and name != "torch" else None
            if problem:
                rejected[key][name] = problem
                del runners[name]
        if runners:
            fastest_first = min(firsts[n] for n in runners)
            for name in list(runners):
                if len(runners) > 1 and firsts[name] > CUTOFF * fastest_first:
                    rejected[key][name] = f"warm call {firsts[name] * 1e6:.0f}us, >{CUTOFF:g}x the fastest"
                    del runners[name]
        times = {}
        if runners:
            per_round = sum(firsts[n] for n in runners) * 3
            repeats = max(3, min(30, int(BUDGET_PER_KEY / max(per_round, 1e-9))))
            medians = time_interleaved(runners, repeats=repeats, warmup=1, block=3)
            times = {name: round(seconds * 1e6, 2) for name, seconds in medians.items()}
        results[key] = (times, rejected[key])
    log.info("kernel selection: measured %d op shapes in %.2fs", len(nodes), time.perf_counter() - start)
    return results
