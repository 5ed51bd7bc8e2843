"""`orca debug view`: one offline HTML file with a graph per pass, the pass table and the numerics table."""
from __future__ import annotations

import re

from orca_compiler import zoo
from orca_compiler.cli import main
from orca_compiler.debug.session import capture_ir
from orca_compiler.debug.view import layout, node_classes, view_model
from orca_compiler.pass_manager import PassManager
from orca_compiler.pipeline import parse_pipeline


def test_resnet_o2_report_has_a_graph_per_pass_and_both_tables(tmp_path):
    model, inputs = zoo.get("resnet")
    page = view_model(model, inputs, "O2", tmp_path / "r.html").read_text()
    passes = [s.name for s in parse_pipeline("O2")]
    assert page.count("<svg") == len(passes) + 1  # the captured graph, then one per pass
    for i, name in enumerate(passes):
        assert f"#{i} after {name}" in page
    assert '<table id="passes">' in page and '<table id="numerics">' in page
    assert page.count('<td class="name">fuse</td>') == 2  # a pass row and a numerics row
    fused = re.findall(r'<g class="op fused[^"]*" data-node="([^"]+)"><title>[^<]*orca\.conv_epilogue', page)
    assert fused  # fused convs are drawn (and named) as such
    final = page.rsplit("<svg", 1)[1]
    assert all(f'data-node="{n}"' in final for n in fused[-3:])
    assert "orca.conv_epilogue" in final and 'class="op new"' not in page.split("after fold-bn")[0]
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing to fetch


def test_node_classes_mark_provenance_inputs_weights_and_later_hooks():
    model, inputs = zoo.get("resnet")
    ir, _ = PassManager("fold-bn").run(capture_ir(model, inputs))
    kinds = {n.name: node_classes(n, "fold-bn") for n in ir.graph.nodes}
    assert kinds["x"] == ["input"] and kinds["output"] == ["output"]
    assert any(c == ["weight", "new"] for c in kinds.values())  # folded weights come from fold-bn
    node = next(n for n in ir.graph.nodes if n.op == "call_function")
    node.meta.update(orca_quant={"dtype": "int8"}, orca_tier="sram")
    assert {"quant", "tier-sram"} <= set(node_classes(node, "fuse"))


def test_layout_puts_every_user_below_its_inputs():
    model, inputs = zoo.get("resnet")
    ir = capture_ir(model, inputs)
    pos = layout(ir)
    assert set(pos) == {n.name for n in ir.graph.nodes}
    assert len(set(pos.values())) == len(pos)  # no two boxes in one place
    for node in ir.graph.nodes:
        for user in node.users:
            assert pos[node.name][0] < pos[user.name][0]


def test_view_cli_writes_the_report(tmp_path, capsys):
    out = tmp_path / "mlp.html"
    assert main(["debug", "view", "mlp", "--pipeline", "cse,dce", "--out", str(out)]) == 0
    assert f"graph report written to {out}" in capsys.readouterr().out
    assert out.read_text().count("<svg") == 3
