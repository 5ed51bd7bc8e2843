"""`--time-passes`: wall time, node count and weight bytes before/after for every pass that ran."""
from __future__ import annotations

from ..instruments import Instrument


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


class PassStatsTable(Instrument):
    """Keep the PassRecord of every pass that ran; `table()` formats one row per pass plus a total."""

    def __init__(self):
        self.records: list[tuple[int, object]] = []

    def run_after_pass(self, index, pass_, record) -> None:
        self.records.append((index, record))

    def table(self) -> str:
        """Columns: #, pass, ms, % of the pipeline, changed, nodes before->after, MiB before->after."""
        total = sum(r.seconds for _, r in self.records) or 1e-12
        lines = [f"{'#':>3}  {'pass':<22}{'ms':>9}{'%':>7}  {'changed':<8}{'nodes':>12}{'weights MiB':>18}"]
        for index, r in self.records:
            nodes = f"{r.nodes_before}->{r.nodes_after}"
            weights = f"{_mib(r.weight_bytes_before)}->{_mib(r.weight_bytes_after)}"
            lines.append(f"{index:>3}  {r.name:<22}{r.seconds * 1e3:>9.2f}{100 * r.seconds / total:>7.1f}  "
                         f"{'yes' if r.modified else 'no':<8}{nodes:>12}{weights:>18}")
        lines.append(f"{'':>3}  {'total':<22}{total * 1e3:>9.2f}")
        return "\n".join(lines)
