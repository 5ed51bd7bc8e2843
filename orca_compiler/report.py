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
            counts[(k.op, k.choice, k.how)] = counts.get((k.op, k.choice, k.how), 0) + 1
        return "\n".join(f"  - {op} -> {choice}: {n} ({how})" for (op, choice, how), n in sorted(counts.items()))

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
        if self.seconds:
            lines.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items()))
        return "\n".join(lines)
