"""The IR printer, the verifier, and GraphIR's views and copies."""
from __future__ import annotations

import re

import networkx as nx
import pytest
import torch
from torch import nn

import orca_compiler
from orca_compiler import VerificationError
from orca_compiler.capture import capture
from orca_compiler.ir import ORIGIN
from orca_compiler.lowering.support import keep_op_in_capture
from orca_compiler.pass_base import PassContext
from orca_compiler.pass_manager import PassManager
from orca_compiler.printer import format_ir, format_node, format_type
from orca_compiler.verify import verify

aten = torch.ops.aten


class ConvBnRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def _make_model() -> nn.Module:
    torch.manual_seed(0)
    model = ConvBnRelu().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


def _capture(model, inputs):
    return capture(model, inputs, keep_op=keep_op_in_capture).ir


X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def small_ir():
    return _capture(_make_model(), (X,))


@pytest.fixture
def ir(small_ir):
    """A private copy of the small model's IR that a test may corrupt."""
    return small_ir.copy()


@pytest.fixture(scope="module")
def zoo_irs():
    irs = {}
    for name in ("resnet", "mobilenet", "mlp"):
        model, inputs = orca_compiler.zoo.get(name)
        irs[name] = (_capture(model, inputs), model, inputs)
    return irs


def _node(ir, pred):
    return next(n for n in ir.graph.nodes if pred(n))


def _conv(ir):
    return _node(ir, lambda n: n.target is aten.conv2d.default)


def _relu(ir):
    return _node(ir, lambda n: n.target is aten.relu.default)


# -- printer ---------------------------------------------------------------------------------


def test_printing_is_deterministic(small_ir):
    assert format_ir(small_ir) == format_ir(small_ir) == str(small_ir)


def test_two_captures_of_one_model_print_the_same():
    model = _make_model()
    assert str(_capture(model, (X,))) == str(_capture(model, (X,)))


def test_one_line_per_node(small_ir):
    lines = str(small_ir).splitlines()
    assert len(lines) == len(small_ir.graph.nodes)
    assert str(small_ir).endswith("\n")


def test_golden_lines(small_ir):
    text = str(small_ir)
    lines = text.splitlines()
    assert "%x = input : f32[1,3,8,8]" in lines
    assert "%conv_weight = weight conv_weight : f32[4,3,3,3]" in lines
    assert "%conv_bias = weight conv_bias : f32[4]" in lines
    conv_lines = [l for l in lines if re.match(r"%\w+ = conv2d\(", l)]
    assert len(conv_lines) == 1
    assert re.fullmatch(r"%conv2d = conv2d\(%x, %conv_weight, %conv_bias, \[1, 1\], \[1, 1\]\) : f32\[1,4,8,8\]",
                        conv_lines[0]), conv_lines[0]
    bn_line = next(l for l in lines if "_native_batch_norm_legit_no_training(" in l)
    # a tuple-valued op prints a tuple type; its float arguments print with repr
    assert bn_line.endswith(": (f32[1,4,8,8], f32[0], f32[0])")
    assert ", 0.1, 1e-05)" in bn_line
    assert re.search(r"= getitem\(%_native_batch_norm_legit_no_training, 0\) : f32\[1,4,8,8\]$", text, re.M)
    assert re.search(r"^%relu = relu\(%\w+\) : f32\[1,4,8,8\]$", text, re.M)
    assert lines[-1] == "return (%relu)"
    # captured nodes carry no origin annotation
    assert "{from=" not in text


def test_fold_bn_nodes_print_their_origin(small_ir):
    folded, _ = PassManager("fold-bn").run(small_ir, PassContext())
    lines = str(folded).splitlines()
    tagged = [l for l in lines if l.endswith("{from=fold-bn}")]
    # the new weight, the new bias and the new conv
    assert len(tagged) == 3
    assert any(re.match(r"%\w+ = conv2d\(%x, %\w+, %\w+, \[1, 1\], \[1, 1\]\) : f32\[1,4,8,8\] \{from=fold-bn\}$", l)
               for l in tagged)
    assert sum(" = weight " in l for l in tagged) == 2
    # untouched nodes stay unannotated
    assert "%x = input : f32[1,3,8,8]" in lines
    assert any(re.fullmatch(r"%relu = relu\(%\w+\) : f32\[1,4,8,8\]", l) for l in lines)
    assert not any("batch_norm" in l for l in lines)
    assert "{from=" not in format_ir(folded, show_origin=False)


def test_annotations_are_printed_sorted(ir):
    relu = _relu(ir)
    relu.meta["orca_annotations"] = {"zeta": 1, "alpha": "b"}
    relu.meta[ORIGIN] = "my-pass"
    assert format_node(relu).endswith("f32[1,4,8,8] {from=my-pass, alpha=b, zeta=1}")
    assert format_node(relu, show_origin=False).endswith("f32[1,4,8,8] {alpha=b, zeta=1}")


def test_format_type():
    assert format_type(torch.empty(2, 3)) == "f32[2,3]"
    assert format_type(torch.empty((), dtype=torch.int64)) == "i64[]"
    assert format_type((torch.empty(1, dtype=torch.float16), torch.empty(0, dtype=torch.bool))) == "(f16[1], bool[0])"
    assert format_type(None) == "?"


def test_unknown_type_prints_question_mark(ir):
    relu = _relu(ir)
    del relu.meta["val"]
    assert format_node(relu).endswith(" : ?")


# -- verifier --------------------------------------------------------------------------------


def test_verifier_accepts_captured_small_model(small_ir):
    verify(small_ir)


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "mlp"])
def test_verifier_accepts_captured_zoo_models(zoo_irs, name):
    ir, model, inputs = zoo_irs[name]
    verify(ir)
    # and the captured graph computes what the model does
    with torch.no_grad():
        expected = model(*inputs)
    torch.testing.assert_close(ir.run(*inputs)[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
def test_verifier_accepts_zoo_models_after_o1(zoo_irs, name):
    ir, _, _ = zoo_irs[name]
    out, _ = PassManager("O1").run(ir, PassContext(verify_each=False))
    verify(out)


def test_missing_val_is_reported_with_the_node(ir):
    conv = _conv(ir)
    del conv.meta["val"]
    with pytest.raises(VerificationError) as info:
        verify(ir)
    assert info.value.node == conv.name
    assert f"%{conv.name}" in str(info.value) and "meta['val']" in str(info.value)


def test_missing_val_on_an_input_is_reported(ir):
    x = ir.input_nodes()[0]
    del x.meta["val"]
    with pytest.raises(VerificationError) as info:
        verify(ir)
    assert info.value.node == "x"


def test_wrong_recorded_shape_is_reported_with_the_node(ir):
    conv = _conv(ir)
    conv.meta["val"] = ir.fake_mode.from_tensor(torch.empty(1, 4, 7, 7), static_shapes=True)
    with pytest.raises(VerificationError) as info:
        verify(ir)
    assert info.value.node == conv.name
    msg = str(info.value)
    assert f"%{conv.name}" in msg and "f32[1,4,8,8]" in msg and "f32[1,4,7,7]" in msg


def test_wrong_recorded_dtype_is_reported(ir):
    relu = _relu(ir)
    relu.meta["val"] = ir.fake_mode.from_tensor(torch.empty(1, 4, 8, 8, dtype=torch.float16), static_shapes=True)
    with pytest.raises(VerificationError) as info:
        verify(ir)
    assert info.value.node == relu.name and "f16[1,4,8,8]" in str(info.value)


def test_wrong_shape_on_an_input_is_caught_downstream(ir):
    x = ir.input_nodes()[0]
    x.meta["val"] = ir.fake_mode.from_tensor(torch.empty(1, 5, 8, 8), static_shapes=True)
    with pytest.raises(VerificationError) as info:
        verify(ir)
    # conv2d cannot take 5 channels with a [4,3,3,3] weight: the conv is the node at fault
    assert info.value.node == _conv(ir).name
    assert "cannot run" in str(info.value)


def test_replaced_weight_of_another_shape_is_reported(ir):
    conv = _conv(ir)
    weight_node = conv.args[1]
    assert weight_node.op == "get_attr"
    setattr(ir.gm, weight_node.target, torch.zeros(4, 3, 5, 5))
    with pytest.raises(VerificationError) as info:
        verify(ir)
    assert info.value.node == weight_node.name
    msg = str(info.value)
    assert weight_node.target in msg and "f32[4,3,5,5]" in msg and "f32[4,3,3,3]" in msg


def test_missing_weight_is_reported(ir):
    conv = _conv(ir)
    weight_node = conv.args[1]
    delattr(ir.gm, weight_node.target)
    with pytest.raises(VerificationError) as info:
        verify(ir)
    # fx's lint or our own check: either way the message names the missing weight
    assert weight_node.target in str(info.value)


def test_structural_errors_are_reported(ir):
    # a use before its definition breaks fx's lint
    relu = _relu(ir)
    x = ir.input_nodes()[0]
    x.prepend(relu)
    with pytest.raises(VerificationError, match="graph structure"):
        verify(ir)


def test_verifier_does_not_report_the_original_after_copy_is_corrupted(small_ir):
    bad = small_ir.copy()
    del _conv(bad).meta["val"]
    with pytest.raises(VerificationError):
        verify(bad)
    verify(small_ir)


# -- networkx view and copies ----------------------------------------------------------------


def test_to_networkx(small_ir):
    g = small_ir.to_networkx()
    nodes = list(small_ir.graph.nodes)
    assert g.number_of_nodes() == len(nodes)
    assert set(g.nodes) == {n.name for n in nodes}
    assert g.number_of_edges() == sum(len(n.users) for n in nodes)
    assert nx.is_directed_acyclic_graph(g)
    conv = _conv(small_ir)
    assert g.has_edge("x", conv.name)
    assert g.has_edge("conv_weight", conv.name)
    assert g.has_edge("relu", "output")
    assert not g.has_edge(conv.name, "x")
    assert g.nodes[conv.name]["op"] == "call_function"
    assert g.nodes["x"]["op"] == "placeholder"
    assert g.nodes["conv_weight"]["op"] == "get_attr"
    # every path from the input reaches the output
    assert nx.has_path(g, "x", "output")
    assert list(nx.topological_sort(g))[-1] == "output"


def test_copy_is_independent(small_ir):
    original_text = str(small_ir)
    dup = small_ir.copy()
    assert str(dup) == original_text
    # erase the relu from the copy: return the getitem instead
    relu = _relu(dup)
    relu.replace_all_uses_with(relu.args[0])
    dup.graph.erase_node(relu)
    # and change metadata on another node
    _conv(dup).meta[ORIGIN] = "someone"
    dup.recompile()
    assert str(dup) != original_text
    assert "relu" not in str(dup)
    assert str(small_ir) == original_text
    verify(small_ir)
    assert small_ir.num_nodes() == dup.num_nodes() + 1


def test_copy_runs_like_the_original(small_ir):
    dup = small_ir.copy()
    torch.testing.assert_close(dup.run(X), small_ir.run(X), rtol=0, atol=0)
    assert dup.weights().keys() == small_ir.weights().keys()
    assert dup.fake_mode is small_ir.fake_mode


def test_captured_ir_runs_like_eager(small_ir):
    model = _make_model()
    (out,) = small_ir.run(X)
    with torch.no_grad():
        torch.testing.assert_close(out, model(X), rtol=1e-6, atol=1e-6)
