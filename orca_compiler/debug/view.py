"""`orca debug view`: one self-contained HTML file with the graph after every pass, the pass table and numerics.

The graph is laid out with networkx (`topological_generations`: one row per generation, weights
placed in the row above their first user) and drawn as inline SVG, so the file works offline.
CSS classes per node: `input`, `weight`, `output`, `fused` (an `orca.*` op), `created` (made by
some pass, `meta["orca_origin"]`), `new` (made by the pass just shown), and hooks for later passes:
`quant` (`meta["orca_quant"]`), `pruned` (`meta["orca_pruned"]`), `tier-NAME` (`meta["orca_tier"]`).
"""
from __future__ import annotations

import html
from pathlib import Path

import networkx as nx
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..instruments import Instrument
from ..ir import ORIGIN, GraphIR
from ..pass_base import PassContext
from ..pass_manager import PassManager
from ..printer import format_node, format_type, op_name
from .bisect import reference_outputs
from .numerics import NumericsCheck
from .session import capture_ir
from .stats import PassStatsTable

BOX_W, BOX_H, GAP_X, GAP_Y, MARGIN = 190, 34, 20, 26, 10

CSS = """
body { font-family: sans-serif; margin: 1em; }
table { border-collapse: collapse; margin-bottom: 1em; }
td, th { border: 1px solid #bbb; padding: 2px 8px; text-align: right; font-size: 13px; }
td.name, th.name { text-align: left; }
svg text { font: 11px monospace; text-anchor: middle; }
rect { fill: #fff; stroke: #555; stroke-width: 1; }
line { stroke: #999; stroke-width: 1; }
.input rect { fill: #d8ecff; } .weight rect { fill: #eee; stroke: #aaa; } .output rect { fill: #ffe9c7; }
.created rect { stroke: #2a7; stroke-width: 2; } .new rect { fill: #dff5e6; stroke: #2a7; stroke-width: 3; }
.fused rect { fill: #f3dcff; stroke: #82c; stroke-width: 2; }
.quant rect { stroke: #c60; stroke-dasharray: 4 2; } .pruned rect { opacity: 0.4; }
.legend span { display: inline-block; padding: 2px 6px; margin-right: 6px; border: 1px solid #555; font-size: 12px; }
"""


def node_classes(node: fx.Node, pass_name: str | None) -> list[str]:
    """The CSS classes of `node` in the graph shown after `pass_name` (None: the captured graph)."""
    classes = {"placeholder": ["input"], "get_attr": ["weight"], "output": ["output"]}.get(node.op, ["op"])
    target = node.target
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "orca":
        classes.append("fused")
    origin = node.meta.get(ORIGIN)
    if origin and origin != "capture":
        classes.append("new" if origin == pass_name else "created")
    if node.meta.get("orca_quant"):
        classes.append("quant")
    if node.meta.get("orca_pruned"):
        classes.append("pruned")
    if node.meta.get("orca_tier"):
        classes.append(f"tier-{node.meta['orca_tier']}")
    return classes


def node_label(node: fx.Node) -> tuple[str, str]:
    """Two lines: the printer's op name (or input/weight name, `return`) and the output type."""
    val = node.meta.get("val")
    if node.op == "placeholder":
        return f"input %{node.name}", format_type(val)
    if node.op == "get_attr":
        return str(node.target), format_type(val)
    if node.op == "output":
        return "return", ""
    return op_name(node), format_type(val)


def layout(ir: GraphIR) -> dict[str, tuple[int, int]]:
    """(row, column) per node name: a row per topological generation of the non-weight nodes; each
    weight sits in the row above its first user (so weights do not pile up in row 0)."""
    g = ir.to_networkx()
    weights = [n.name for n in ir.graph.nodes if n.op == "get_attr"]
    rows: dict[str, int] = {}
    for row, names in enumerate(nx.topological_generations(g.subgraph(set(g) - set(weights)))):
        for name in names:
            rows[name] = 2 * row + 1  # odd rows for values, even rows for the weights they use
    for name in weights:
        rows[name] = min((rows[u] for u in g.successors(name)), default=1) - 1
    order = {n.name: i for i, n in enumerate(ir.graph.nodes)}
    position, filled = {}, {}
    for name in sorted(rows, key=lambda n: (rows[n], order[n])):
        position[name] = (rows[name], filled.get(rows[name], 0))
        filled[rows[name]] = filled.get(rows[name], 0) + 1
    return position


def graph_svg(ir: GraphIR, pass_name: str | None) -> str:
    """An inline `<svg>` of `ir`: boxes (classes from node_classes, full printer line as tooltip)
    and a line from each value to each user."""
    pos = layout(ir)
    used_rows = sorted({r for r, _ in pos.values()})
    row_y = {r: MARGIN + i * (BOX_H + GAP_Y) for i, r in enumerate(used_rows)}
    xy = {name: (MARGIN + c * (BOX_W + GAP_X), row_y[r]) for name, (r, c) in pos.items()}
    width = max(x for x, _ in xy.values()) + BOX_W + MARGIN
    height = max(y for _, y in xy.values()) + BOX_H + MARGIN
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">']
    for node in ir.graph.nodes:
        for user in node.users:
            (x1, y1), (x2, y2) = xy[node.name], xy[user.name]
            parts.append(f'<line x1="{x1 + BOX_W // 2}" y1="{y1 + BOX_H}" x2="{x2 + BOX_W // 2}" y2="{y2}"/>')
    for node in ir.graph.nodes:
        x, y = xy[node.name]
        top, bottom = (html.escape(t[:30]) for t in node_label(node))
        parts.append(f'<g class="{" ".join(node_classes(node, pass_name))}" data-node="{html.escape(node.name)}">'
                     f'<title>{html.escape(format_node(node))}</title>'
                     f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="4"/>'
                     f'<text x="{x + BOX_W // 2}" y="{y + 14}">{top}</text>'
                     f'<text x="{x + BOX_W // 2}" y="{y + 27}">{bottom}</text></g>')
    parts.append("</svg>")
    return "\n".join(parts)


def html_table(header: list[str], rows: list[list], css_id: str) -> str:
    """An HTML table; the first column is left-aligned (names), the others right-aligned (numbers)."""
    head = "".join(f'<th class="name">{html.escape(h)}</th>' if i == 1 else f"<th>{html.escape(h)}</th>"
                   for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="name">{html.escape(str(c))}</td>' if i == 1 else
                                     f"<td>{html.escape(str(c))}</td>" for i, c in enumerate(row)) + "</tr>"
                   for row in rows)
    return f'<table id="{css_id}"><tr>{head}</tr>{body}</table>'


def pass_table(stats: PassStatsTable) -> str:
    """The `--time-passes` table as HTML."""
    rows = [[i, r.name, f"{r.seconds * 1e3:.2f}", "yes" if r.modified else "no", f"{r.nodes_before}->{r.nodes_after}",
             f"{r.weight_bytes_before / 2**20:.2f}->{r.weight_bytes_after / 2**20:.2f}",
             ", ".join(f"{k}={v}" for k, v in r.stats.items())] for i, r in stats.records]
    return html_table(["#", "pass", "ms", "changed", "nodes", "weights MiB", "statistics"], rows, "passes")


def numerics_table(numerics: NumericsCheck) -> str:
    """The `--numerics` table as HTML: one row per pass and output."""
    rows = [["-" if index < 0 else index, name, i, f"{e.max_abs:.3e}", f"{e.relative:.3e}", f"{e.cosine:.8f}"]
            for index, name, errors in numerics.rows for i, e in enumerate(errors)]
    return html_table(["#", "pass", "output", "max abs err", "rel err", "cosine"], rows, "numerics")


class GraphSnapshots(Instrument):
    """Keep (title, pass name, IR) for the captured IR and the IR after every pass that ran
    (an IR is never mutated after its pass returns: each pass works on a copy)."""

    def __init__(self):
        self.graphs: list[tuple[str, str | None, GraphIR]] = []

    def enter_pipeline(self, ir, passes) -> None:
        self.graphs.append(("captured graph", None, ir))

    def run_after_pass(self, index, pass_, record) -> None:
        self.graphs.append((f"#{index} after {record.name}", record.name, record.ir_after))


def render_report(title: str, snapshots: GraphSnapshots, stats: PassStatsTable, numerics: NumericsCheck) -> str:
    """The whole HTML page (styles inline, no script, no external resource)."""
    legend = "".join(f'<span class="{c}">{c}</span>' for c in ("input", "weight", "output", "fused", "created", "new",
                                                               "quant", "pruned"))
    sections = []
    for i, (heading, pass_name, ir) in enumerate(snapshots.graphs):
        is_open = " open" if i == len(snapshots.graphs) - 1 else ""
        sections.append(f"<details{is_open}><summary><b>{html.escape(heading)}</b> ({ir.num_nodes()} ops)</summary>"
                        f"{graph_svg(ir, pass_name)}</details>")
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<h2>Passes</h2>{pass_table(stats)}<h2>Numerics against eager</h2>{numerics_table(numerics)}"
            f'<h2>Graphs</h2><p class="legend">{legend}</p>' + "\n".join(sections) + "</body></html>\n")


def view_model(model, inputs: tuple, pipeline: str, out: str | Path, *, title: str | None = None) -> Path:
    """Capture `model`, run `pipeline` with pass statistics, numerics and graph snapshots, and write
    the HTML report to `out` (parents created). A failing pass raises its PassError."""
    manager = PassManager(pipeline)
    ir = capture_ir(model, inputs)
    flat = tuple(pytree.tree_leaves(tuple(inputs)))
    stats, numerics, snapshots = PassStatsTable(), NumericsCheck(flat, reference_outputs(model, inputs)), GraphSnapshots()
    manager.run(ir, PassContext(example_inputs=flat, instruments=[stats, numerics, snapshots]))
    name = title or f"{type(model).__name__}: pipeline {manager.text}"
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(name, snapshots, stats, numerics))
    return path
