"""The compile report: what capture, the passes and the lowering did, and what fell back to eager."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompileReport:
    """Attached to every CompiledModule as `.report`; `str(report)` is a readable summary."""

    pipeline: str
    target: str
    capture_method: str = ""
    capture_failures: list = field(default_factory=list)
    passes: list = field(default_factory=list)  # PassRecord
    fallbacks: list = field(default_factory=list)  # lowering.Fallback
    graph_breaks: list = field(default_factory=list)  # str, when captured through torch.compile
    subgraphs: list = field(default_factory=list)  # CompileReport per graph between breaks
    partitions: int = 0
    kernels: list = field(default_factory=list)  # lowering.KernelChoice per heavy op
    seconds: dict = field(default_factory=dict)
    cache: object = None  # compile_cache.CacheInfo: the level that served this compile, hits/misses
    eager_guard: object = None  # eager_guard.GuardResult: compiled vs eager time, and which runs

    @property
    def fully_compiled(self) -> bool:
        """True when nothing runs in eager: no fallback op and no graph break."""
        return not self.fallbacks and not self.graph_breaks and all(s.fully_compiled for s in self.subgraphs)

    def all_fallbacks(self) -> list:
        out = list(self.fallbacks)
        for sub in self.subgraphs:
            out.extend(sub.all_fallbacks())
        return out

    def pass_table(self) -> str:
        lines = [f"{'pass':<22}{'changed':>8}{'ms':>9}{'nodes':>13}  stats"]
        for r in self.passes:
            if r.skipped:
                lines.append(f"{r.name:<22}{'skipped':>8}")
                continue
            stats = ", ".join(f"{k}={v}" for k, v in r.stats.items() if v)
            lines.append(f"{r.name:<22}{'yes' if r.modified else 'no':>8}{r.seconds * 1e3:>9.1f}"
                         f"{f'{r.nodes_before}->{r.nodes_after}':>13}  {stats}")
        return "\n".join(lines)

    def kernel_summary(self) -> str:
        """One line per (op, choice): how many nodes got which kernel, and how it was decided."""
        counts: dict[tuple, int] = {}
        for k in self.kernels:
            key = (k.op, getattr(k, "choice_text", k.choice), k.how)
            counts[key] = counts.get(key, 0) + 1
        return "\n".join(f"  - {op} -> {choice}: {n} ({how})" for (op, choice, how), n in sorted(counts.items()))

    def sparse_layers(self) -> list[str]:
        """One sentence per layer with a sparse weight (prune-magnitude, prune-nm): which kernel
        runs it and what the sparsity bought. No silent slow path: where a dense kernel won, it says
        the sparsity saved memory (the stored weight) but not time."""
        return [_sparse_sentence(k) for k in self.kernels if getattr(k, "layout", "") in ("sparse", "dense")]

    def quantized_layers(self) -> list[str]:
        """One sentence per quantized layer (the quantize pass): whether its integer kernel runs,
        or a float32 kernel on the dequantized weight because that measured faster here."""
        return [_quant_sentence(k) for k in self.kernels if getattr(k, "layout", "") in ("integer", "float32")]

    def __str__(self) -> str:
        lines = [f"orca compile report: pipeline '{self.pipeline or '(none)'}', target {self.target}"]
        lines.append(f"capture: {self.capture_method}" + (
            f" (after: {'; '.join(f'{m}: {e}' for m, e in self.capture_failures)})" if self.capture_failures else ""))
        if self.passes:
            lines.append(self.pass_table())
        if self.graph_breaks:
            lines.append(f"graph breaks ({len(self.graph_breaks)}):")
            lines.extend(f"  - {b}" for b in self.graph_breaks)
        fallbacks = self.all_fallbacks()
        if fallbacks:
            lines.append(f"fallback to eager ({len(fallbacks)} ops):")
            lines.extend(f"  - {f}" for f in fallbacks)
        else:
            lines.append("fallback to eager: none")
        if self.kernels:
            lines.append(f"kernels ({len(self.kernels)} heavy ops):")
            lines.append(self.kernel_summary())
        if self.eager_guard is not None:
            lines.append(f"eager guard: {self.eager_guard}")
        sparse = self.sparse_layers()
        if sparse:
            lines.append(f"sparse layers ({len(sparse)}):")
            lines.extend(f"  - {line}" for line in sparse)
        quantized = self.quantized_layers()
        if quantized:
            lines.append(f"quantized layers ({len(quantized)}):")
            lines.extend(f"  - {line}" for line in quantized)
        if self.cache is not None:
            lines.append(str(self.cache))
        if self.seconds:
            lines.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items()))
        return "\n".join(lines)


# Where a dense kernel runs a layer stored sparse. "Memory" is the stored weight (the IR, a saved
# model): the dense kernel itself holds the re-densified weight.
_MEMORY_NOT_TIME = "the sparsity saved memory (the stored weight), not time"


def _sparse_sentence(choice) -> str:
    """`%node -> kernel (...): what the sparsity bought` for one KernelChoice of a sparse op."""
    from .lowering.extern import SPARSE_KERNELS

    head = f"%{choice.node} -> {choice.choice}"
    if not choice.measured:
        return f"{head} ({choice.layout} kernel, {choice.how})" + ("" if choice.layout == "sparse" else f": {_MEMORY_NOT_TIME}")
    sparse = {k: v for k, v in choice.times_us.items() if k in SPARSE_KERNELS}
    dense = {k: v for k, v in choice.times_us.items() if k not in SPARSE_KERNELS}

    def fastest(group: dict) -> str:
        name = min(group, key=group.get) if group else None
        return f"{name} {group[name]:.1f}us" if name else "none measured"

    versus = f"sparse {fastest(sparse)} vs dense {fastest(dense)}, {choice.how}"
    if choice.layout == "dense":
        lost = "; ".join(f"{k} {reason}" for k, reason in choice.rejected.items() if k in SPARSE_KERNELS)
        return (f"{head} (dense kernel on the re-densified weight won: {versus}"
                + (f"; sparse rejected: {lost}" if lost else "") + f"): {_MEMORY_NOT_TIME}")
    if dense and min(sparse.values(), default=float("inf")) > min(dense.values()):
        # The whole-program check swapped a TVM kernel that was faster alone for this one.
        return (f"{head} (sparse kernel, though alone slower: {versus}): the sparsity saved memory; "
                "time only in the program as a whole")
    return f"{head} (sparse kernel won: {versus}): the sparsity saved memory and time"


def _quant_sentence(choice) -> str:
    """`%node -> kernel (...)` for one KernelChoice of a quantized op: integer or float32, and why."""
    from .lowering.extern import is_tvm_kernel

    head = f"%{choice.node} ({choice.op}) -> {choice.choice}"
    # "tvm" and its variants (an int8 conv: "tvm" the VNNI conv, "tvm-plain" Relax's int8 conv)
    integers = {k: v for k, v in choice.times_us.items() if is_tvm_kernel(k)}
    integer = min(integers.values(), default=None)
    floats = {k: v for k, v in choice.times_us.items() if not is_tvm_kernel(k)}
    best_float = min(floats, key=floats.get) if floats else None
    versus = (f"integer {integer:.1f}us vs float32 {best_float} {floats[best_float]:.1f}us"
              if integer is not None and best_float else "")
    if choice.layout == "integer":
        out = "; ".join(f"{k} out: {reason}" for k, reason in choice.rejected.items())
        if len(integers) > 1:
            versus = ", ".join(f"{k} {v:.1f}us" for k, v in sorted(integers.items(), key=lambda kv: kv[1])) + \
                (f" vs float32 {best_float} {floats[best_float]:.1f}us" if best_float else "")
        return f"{head} (integer kernel{': ' + versus if versus else ''}{'; ' + out if out else ''}, {choice.how})"
    reason = versus or choice.rejected.get("tvm", "") or choice.how
    return (f"{head} (kept float32 on the dequantized weight: the integer kernel was slower here; {reason}, "
            f"{choice.how}): the quantization saved the stored weight's memory, not time")
