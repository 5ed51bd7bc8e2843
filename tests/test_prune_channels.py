"""prune-channels: the dependency analysis and the pass, on every case the issue names.

The strongest check is the dead-unit test: half the units of every prunable group are made dead
in the original model (their producing weights zeroed, so they contribute exactly nothing), the
pass must find exactly those (criterion=activation) and remove them, and the pruned model must
equal the original within float rounding. A wrong index anywhere (a flatten's column blocks, a
concat offset, an LSTM gate row, a head's q/k/v rows, a grouped conv) breaks the equality.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import orca_compiler as oc
from orca_compiler import zoo
from orca_compiler.capture import capture
from orca_compiler.channel_deps import analyze, reshape_groups
from orca_compiler.errors import PassError, PipelineError
from orca_compiler.lowering.support import keep_op_in_capture
from orca_compiler.pass_base import PassContext
from orca_compiler.pass_manager import PassManager

aten = torch.ops.aten
TOL = 1e-5


class ConcatNet(nn.Module):
    """Two conv branches concatenated, BatchNorm, a conv, then a linear after a flatten of 4x4."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(14)
        self.c = nn.Conv2d(14, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))
        return self.fc(torch.flatten(torch.relu(self.c(y)), 1))


class OneChannelNet(nn.Module):
    """A conv with a single output channel between two wider ones."""

    def __init__(self):
        super().__init__()
        self.squeeze = nn.Conv2d(3, 1, 3, padding=1)
        self.expand = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.expand(torch.relu(self.squeeze(x)))).mean((2, 3)))


class RNNClassifier(nn.Module):
    """Linear input projection -> 2-layer (bi)LSTM/GRU -> head on the last step; only logits out."""

    def __init__(self, cell="lstm", bidirectional=True):
        super().__init__()
        self.proj = nn.Linear(12, 16)
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn(16, 24, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(24 * (2 if bidirectional else 1), 5)

    def forward(self, x):
        out, _ = self.rnn(torch.relu(self.proj(x)))
        return self.head(out[:, -1])


def _model(name):
    torch.manual_seed(0)
    if name in zoo.names():
        return zoo.get(name)
    if name == "concat":
        return ConcatNet().eval(), (torch.randn(2, 3, 8, 8),)
    if name == "one_channel":
        return OneChannelNet().eval(), (torch.randn(2, 3, 8, 8),)
    cell, bidirectional = name.split("_")[0], name.endswith("bidir")
    return RNNClassifier(cell, bidirectional).eval(), (torch.randn(3, 7, 12),)


def _capture(name):
    model, inputs = _model(name)
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return capture(model, inputs, keep_op=keep_op_in_capture).ir, inputs


def _prune(ir, inputs, options: str):
    ctx = PassContext(example_inputs=inputs, config={"calibration_data": [inputs]})
    pruned, records = PassManager(f"prune-channels{{{options}}}").run(ir, ctx)  # verifies the IR after the pass
    return pruned, records[0].stats


def _producing(slot) -> bool:
    """Whether a weight slot produces the unit (zeroing it makes the unit output exactly zero)."""
    node, _, dim = slot
    user = next(iter(node.users))
    if user.target in (aten.conv2d.default, aten.linear.default):
        return user.args[1] is not node or dim == 0
    if user.target is aten._native_batch_norm_legit_no_training.default:
        return node in user.args[1:3]
    if user.target is aten.embedding.default:
        return dim == 1
    if user.target in (torch.ops.orca.lstm.default, torch.ops.orca.gru.default):
        return dim == 0
    return False


def _kill_units(ir, fraction, protect=(), seed=0):
    """Zero the producing weights of `fraction` of the units of every prunable group (on a copy);
    returns the copy and the number of killed units per group."""
    ir = ir.copy()
    deps = analyze(ir, protect)
    gen = torch.Generator().manual_seed(seed)
    killed = {}
    for group in (g for g in deps.groups if g.prunable):
        k = int(fraction * group.units.numel())
        dead = group.units[torch.randperm(group.units.numel(), generator=gen)[:k]]
        killed[group.index] = k
        for slot in group.slots:
            if slot[0].op == "get_attr" and _producing(slot):
                node, _, dim = slot
                weight = ir.weight(node).clone()
                index = torch.isin(deps.labels(slot), dead).nonzero().squeeze(1)
                weight.index_fill_(dim, index, 0.0)
                ir.gm.register_buffer(node.target, weight)
    return ir, killed


CASES = {
    # name: protect option (LayerNorm statistics change when features go, so the transformer's
    # residual stream is protected in the exact test; heads and MLP units are pruned)
    "resnet": "", "mobilenet": "", "mlp": "", "concat": "", "transformer": "protect=embed",
    "lstm_classifier_bidir": "", "gru_classifier_bidir": "", "lstm_classifier": "",
}


@pytest.mark.parametrize("name", list(CASES))
def test_dead_units_are_found_and_removed_exactly(name):
    ir, inputs = _capture(name)
    protect = CASES[name]
    dead_ir, killed = _kill_units(ir, 0.5, protect=[protect.split("=", 1)[1]] if protect else [])
    reference = dead_ir.run(*inputs)
    pruned, stats = _prune(dead_ir, inputs, "ratio=0.5,criterion=activation" + (f",{protect}" if protect else ""))
    assert stats["units_pruned"] == sum(killed.values()) > 0
    assert pruned.weight_bytes() < dead_ir.weight_bytes()
    for got, want in zip(pruned.run(*inputs), reference):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "concat", "one_channel", "transformer", "lstm_classifier_bidir", "gru_classifier"])
def test_ratio_zero_is_bit_identical(name):
    ir, inputs = _capture(name)
    pruned, stats = _prune(ir, inputs, "ratio=0")
    assert stats["units_pruned"] == 0
    assert pruned.weights().keys() == ir.weights().keys()
    for got, want in zip(pruned.run(*inputs), ir.run(*inputs)):
        assert torch.equal(got, want)


def test_dependency_sentences_name_every_coupled_layer():
    ir, _ = _capture("resnet")
    sentences = analyze(ir).sentences()
    assert sentences[0] == (
        "out-channels of stem.0, out-channels of blocks.0.conv2, out-channels of blocks.1.conv2 => channels of "
        "stem.1, in-channels of blocks.0.conv1, channels of blocks.0.bn2, in-channels of blocks.1.conv1, channels of "
        "blocks.1.bn2, in-channels of blocks.2.conv1, in-channels of blocks.2.shortcut.0 [16 units]")
    assert "out-channels of blocks.0.conv1 => channels of blocks.0.bn1, in-channels of blocks.0.conv2 [16 units]" in sentences
    assert sentences[-1] == "out-features of fc => bias of fc [10 units] (kept: model output %linear)"


def test_concat_couples_each_branch_to_its_offset():
    ir, _ = _capture("concat")
    sentences = analyze(ir).sentences()
    assert any(s.startswith("out-channels of a, out-channels of b => bias of a, bias of b, channels of bn, in-channels of c")
               and s.endswith("[14 units]") for s in sentences), sentences
    assert any(s.startswith("out-channels of c => bias of c, in-features of fc [8 units]") for s in sentences), sentences


def test_lstm_hidden_units_and_attention_heads_are_units():
    ir, _ = _capture("lstm_classifier_bidir")
    text = "\n".join(analyze(ir).sentences())
    assert "hidden units of rnn.weight_hh_l0 =>" in text and "in-features of head [24 units]" in text
    ir, _ = _capture("transformer")
    heads = [s for s in analyze(ir).sentences() if "heads of encoder.layers.0.self_attn" in s]
    assert len(heads) == 1 and heads[0].endswith("[4 units]")
    assert "out-features of encoder.layers.0.self_attn.in_proj" in heads[0]
    assert "in-features of encoder.layers.0.self_attn.out_proj" in heads[0]


def test_a_one_channel_conv_and_the_outputs_are_kept():
    ir, inputs = _capture("one_channel")
    groups = {s.split(" =>")[0]: s for s in analyze(ir).sentences()}
    assert groups["out-channels of squeeze"].endswith("[1 units]")
    pruned, _ = _prune(ir, inputs, "ratio=0.5")
    shapes = {str(n.target): tuple(n.meta["val"].shape) for n in pruned.graph.nodes if n.op == "get_attr"}
    assert shapes["squeeze_weight"] == (1, 3, 3, 3)
    assert shapes["expand_weight"][0] == 4 and shapes["fc_weight"] == (4, 4)


def test_a_model_whose_state_is_an_output_keeps_its_hidden_size():
    ir, inputs = _capture("lstm")  # the zoo LSTM returns (logits, (h_n, c_n))
    pruned, stats = _prune(ir, inputs, "ratio=0.5")
    assert stats["prunable_groups"] == 0 and stats["units_pruned"] == 0
    assert [o.shape for o in pruned.run(*inputs)] == [o.shape for o in ir.run(*inputs)]


def test_grouped_convs_prune_the_same_positions_in_every_group():
    ir, inputs = _capture("mobilenet")
    pruned, _ = _prune(ir, inputs, "ratio=0.5")
    for node in pruned.compute_nodes():
        if node.target is aten.conv2d.default and len(node.args) > 6 and node.args[6] > 1:
            c_in = node.args[0].meta["val"].shape[1]
            c_out = node.meta["val"].shape[1]
            assert c_in % node.args[6] == 0 and c_out % node.args[6] == 0
    assert len(pruned.run(*inputs)) == 1


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn-scale", "taylor"])
def test_every_criterion_halves_the_resnet(criterion):
    ir, inputs = _capture("resnet")
    pruned, stats = _prune(ir, inputs, f"ratio=0.5,criterion={criterion}")
    assert stats["units_pruned"] == stats["units"] // 2
    assert stats.get("bn_scale_fallbacks", 0) == 0
    assert pruned.weight_bytes() < 0.3 * ir.weight_bytes()  # conv weights shrink in both channel dims
    assert pruned.run(*inputs)[0].shape == (1, 10)


def test_global_scope_prunes_the_ratio_of_all_units_and_keeps_every_group():
    ir, inputs = _capture("resnet")
    pruned, stats = _prune(ir, inputs, "ratio=0.5,scope=global,max_ratio=0.75")
    assert stats["units_pruned"] == int(0.5 * stats["units"])
    for node in pruned.compute_nodes():
        if node.target is aten.conv2d.default:
            assert node.meta["val"].shape[1] >= 1


def test_pruned_model_compiles_and_matches_its_eager_self():
    model, inputs = zoo.get("resnet", batch_size=2)
    pruned, report = oc.prune(model, inputs, "prune-channels{ratio=0.5}")
    assert "out-channels of blocks.0.conv1 =>" in str(report)
    before, after = report.weight_bytes
    assert after < 0.3 * before
    compiled = oc.compile(pruned, inputs, pipeline="O2", kernels="torch")
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), pruned(*inputs), atol=1e-4, rtol=1e-4)


def test_bad_options_and_missing_data_name_what_is_wrong():
    ir, inputs = _capture("resnet")
    with pytest.raises(PipelineError, match="ratio"):
        PassManager("prune-channels{ratio=1.5}")
    with pytest.raises(PipelineError, match="criterion"):
        PassManager("prune-channels{criterion=random}")
    with pytest.raises(PassError, match="calibration data"):
        PassManager("prune-channels{criterion=taylor}").run(ir, PassContext(example_inputs=inputs))
    with pytest.raises(PassError, match="'nosuchlayer'"):
        _prune(ir, inputs, "protect=nosuchlayer")


def test_protect_keeps_a_layers_channels():
    ir, inputs = _capture("resnet")
    pruned, _ = _prune(ir, inputs, "ratio=0.5,protect=blocks.0.conv1")
    conv = next(n for n in pruned.graph.nodes if n.op == "get_attr" and n.target == "blocks_0_conv1_weight")
    assert conv.meta["val"].shape[0] == 16


def test_reshape_groups_split_at_equal_products():
    assert reshape_groups([16, 2, 192], [16, 2, 3, 64]) == [([0], [0]), ([1], [1]), ([2], [2, 3])]
    assert reshape_groups([2, 8, 1, 1], [2, 8]) == [([0], [0]), ([1], [1]), ([2], []), ([3], [])]
    assert reshape_groups([16, 2, 64], [16, 8, 16]) == [([0], [0]), ([1, 2], [1, 2])]


def test_cli_prints_the_groups_and_the_weight_bytes(capsys):
    from orca_compiler.cli import main

    assert main(["prune", "mlp"]) == 0
    out = capsys.readouterr().out
    assert "out-features of net.0 => bias of net.0, in-features of net.2 [1024 units]" in out
    assert "weights: 6.341 MB -> 2.122 MB (33.5%)" in out
