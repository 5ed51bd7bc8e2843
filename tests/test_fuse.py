"""The fuse pass: every rule on a tiny model (golden IR, numbers in torch and compiled), the fused
ops with every kernel that applies, the rule options, and the fusion counts of every zoo model."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orca_compiler as oc
from orca_compiler import PipelineError, zoo
from orca_compiler.capture import capture
from orca_compiler.lowering.support import keep_op_in_capture
from orca_compiler.ops import fused
from orca_compiler.ops.pointwise import ACTIVATIONS, POINTWISE, parse_program
from orca_compiler.pass_base import PassContext
from orca_compiler.passes.fuse import ALL_RULES, FAMILIES, Fuse, FuseOptions
from orca_compiler.pipeline import parse_pipeline
from orca_compiler.printer import format_node, op_name
from orca_compiler.verify import verify

from conftest import assert_outputs_close

aten = torch.ops.aten

# Each activation of the pointwise table as a module, and the numbers the fused op records for it.
ACT_MODULES = {
    "relu": lambda: nn.ReLU(), "clamp": lambda: nn.ReLU6(), "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU("tanh"), "silu": lambda: nn.SiLU(), "sigmoid": lambda: nn.Sigmoid(),
    "tanh": lambda: nn.Tanh(), "leaky_relu": lambda: nn.LeakyReLU(0.2), "hardsigmoid": lambda: nn.Hardsigmoid(),
    "hardswish": lambda: nn.Hardswish(),
}
ACT_ARGS = {"clamp": "[0.0, 6.0]", "leaky_relu": "[0.2]"}


def _capture(model, inputs):
    return capture(model.eval(), inputs, keep_op=keep_op_in_capture).ir


def _fuse(ir, options=None):
    """Run the pass on a copy of `ir` as the pass manager does; the result must verify, and a
    second run must find nothing left to fuse."""
    result = Fuse(options).run(ir.copy(), PassContext())
    result.ir.recompile()
    verify(result.ir)
    again = Fuse(options).run(result.ir.copy(), PassContext())
    assert again.modified is False and again.stats == {}
    return result


def _compute_lines(ir):
    return [format_node(n) for n in ir.compute_nodes()]


def _check_numbers(model, inputs, ir):
    with torch.no_grad():
        expected = model(*inputs)
    got = ir.run(*inputs)
    assert_outputs_close(expected if isinstance(expected, tuple) else (expected,), got)


def test_every_activation_has_a_module_here():
    assert set(ACT_MODULES) == set(ACTIVATIONS)


# -- epilogues -------------------------------------------------------------------------------


GEOMETRIES = [dict(stride=1, groups=1), dict(stride=2, groups=1), dict(stride=1, groups=2), dict(stride=1, groups=4)]


class ConvBranches(nn.Module):
    """One branch per conv rule: act(conv(x)) and act(conv(x) + r) for every activation, and
    conv(x) + r; strided (plain branches only), grouped and depthwise convs among them."""

    def __init__(self):
        super().__init__()
        n = len(ACTIVATIONS)
        self.acts = [ACT_MODULES[a]() for a in ACTIVATIONS]
        self.plain = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1, **GEOMETRIES[i % 4]) for i in range(n))
        self.res = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1, **GEOMETRIES[(0, 2, 3)[i % 3]]) for i in range(n + 1))

    def forward(self, x, r):
        plain = [act(conv(x)) for act, conv in zip(self.acts, self.plain)]
        residual = [act(conv(x) + r) for act, conv in zip(self.acts, self.res)]
        return tuple(plain + residual + [self.res[-1](x) + r])

    def expected_ir(self) -> list[str]:
        """The fused ops (right-hand sides of their IR lines), branch by branch."""
        lines = []
        for group, residual in ((self.plain, None), (self.res, "%r")):
            for i, (act, conv) in enumerate(zip(list(ACTIVATIONS) + [None], group)):
                (s,), g = conv.stride[:1], conv.groups
                size = 8 // s
                lines.append(f"orca.conv_epilogue(%x, %{'plain' if residual is None else 'res'}_{i}_weight, "
                             f"%{'plain' if residual is None else 'res'}_{i}_bias, [{s}, {s}], [1, 1], [1, 1], {g}, "
                             f"{residual}, {act or 'none'}, {ACT_ARGS.get(act, '[]')}) : f32[2,4,{size},{size}]")
        return lines


class LinearBranches(nn.Module):
    """One branch per linear rule: act(linear(x)) and act(x + linear(x)) for every activation, and
    linear(x) + x; a third of the layers without bias."""

    def __init__(self):
        super().__init__()
        n = len(ACTIVATIONS)
        self.acts = [ACT_MODULES[a]() for a in ACTIVATIONS]
        self.plain = nn.ModuleList(nn.Linear(8, 8, bias=i % 3 != 0) for i in range(n))
        self.res = nn.ModuleList(nn.Linear(8, 8, bias=i % 3 != 1) for i in range(n + 1))

    def forward(self, x):
        plain = [act(fc(x)) for act, fc in zip(self.acts, self.plain)]
        # the residual first: the rules take the add's operands in either order
        residual = [act(x + fc(x)) for act, fc in zip(self.acts, self.res)]
        return tuple(plain + residual + [self.res[-1](x) + x])

    def expected_ir(self) -> list[str]:
        lines = []
        for group, residual in ((self.plain, None), (self.res, "%x")):
            for i, (act, fc) in enumerate(zip(list(ACTIVATIONS) + [None], group)):
                name = f"{'plain' if residual is None else 'res'}_{i}"
                bias = f"%{name}_bias" if fc.bias is not None else "None"
                lines.append(f"orca.linear_epilogue(%x, %{name}_weight, {bias}, {residual}, {act or 'none'}, "
                             f"{ACT_ARGS.get(act, '[]')}) : f32[3,5,8]")
        return lines


def _conv_inputs():
    return torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)


def _linear_inputs():
    return (torch.randn(3, 5, 8),)


def _every_rule_of(kind):
    rules = [f"{kind}-{act}" for act in ACTIVATIONS] + [f"{kind}-add-{act}" for act in ACTIVATIONS] + [f"{kind}-add"]
    return {rule: 1 for rule in rules}


@pytest.mark.parametrize("kind,make_model,make_inputs", [("conv", ConvBranches, _conv_inputs),
                                                         ("linear", LinearBranches, _linear_inputs)])
def test_every_epilogue_rule(kind, make_model, make_inputs):
    torch.manual_seed(0)
    model, inputs = make_model().eval(), make_inputs()
    res = _fuse(_capture(model, inputs))
    assert res.stats == _every_rule_of(kind)
    assert [line.split(" = ", 1)[1] for line in _compute_lines(res.ir)] == model.expected_ir()
    _check_numbers(model, inputs, res.ir)


class EpilogueBlockers(nn.Module):
    """Conv groups that must not fuse: the conv's result is also returned; the residual would
    broadcast the conv's output; the weight is computed at run time; the add scales its operand;
    the add's other operand is the conv itself."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x, w, bias_like):
        shared = self.conv(x)
        broadcast = F.conv2d(x, self.conv.weight) + bias_like  # bias_like is [4, 1, 1]
        computed = torch.relu(F.conv2d(x, w * 2.0))
        scaled = torch.add(F.conv2d(x, self.conv.weight), x[:, :1], alpha=2.0)
        doubled = F.conv2d(x, self.conv.weight, stride=2)
        return torch.relu(shared), shared, broadcast, computed, scaled, doubled + doubled


def test_epilogues_fuse_only_whole_groups():
    torch.manual_seed(0)
    model = EpilogueBlockers()
    inputs = (torch.randn(1, 3, 8, 8), torch.randn(4, 3, 1, 1), torch.randn(4, 1, 1))
    ir = _capture(model, inputs)
    res = Fuse().run(ir.copy(), PassContext())
    assert res.stats == {} and not res.modified
    assert str(res.ir) == str(ir)
    _check_numbers(model, inputs, res.ir)


def test_conv_add_of_two_convs_fuses_one_of_them():
    class TwoConvs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return torch.relu(self.a(x) + self.b(x))

    torch.manual_seed(0)
    model, inputs = TwoConvs(), (torch.randn(1, 3, 6, 6),)
    res = _fuse(_capture(model, inputs))
    assert res.stats == {"conv-add-relu": 1}
    assert _compute_lines(res.ir) == [
        "%conv2d_1 = conv2d(%x, %b_weight, %b_bias) : f32[1,4,6,6]",
        "%conv_epilogue = orca.conv_epilogue(%x, %a_weight, %a_bias, [1, 1], [1, 1], [1, 1], 1, %conv2d_1, relu, [])"
        " : f32[1,4,6,6]",
    ]
    _check_numbers(model, inputs, res.ir)


# -- attention -------------------------------------------------------------------------------


class ManualAttention(nn.Module):
    def __init__(self, scaled: bool, masked: bool, bmm: bool = False):
        super().__init__()
        self.scaled, self.masked, self.bmm = scaled, masked, bmm

    def forward(self, q, k, v, mask):
        scores = torch.bmm(q, k.transpose(1, 2)) if self.bmm else q @ k.transpose(-2, -1)
        if self.scaled:
            scores = scores / math.sqrt(q.shape[-1])
        if self.masked:
            scores = mask + scores
        probs = torch.softmax(scores, dim=-1)
        return torch.bmm(probs, v) if self.bmm else probs @ v


def _attention_inputs(shape_q=(2, 3, 5, 8), kv_len=6, mask_shape=(5, 6)):
    q = torch.randn(*shape_q)
    kv = torch.randn(*shape_q[:-2], kv_len, shape_q[-1])
    return q, kv, torch.randn_like(kv), torch.randn(*mask_shape)


@pytest.mark.parametrize("scaled", [True, False])
@pytest.mark.parametrize("masked", [True, False])
def test_attention_rules(scaled, masked):
    torch.manual_seed(0)
    model, inputs = ManualAttention(scaled, masked), _attention_inputs()
    res = _fuse(_capture(model, inputs))
    name = "-".join(["attention"] + (["scaled"] if scaled else []) + (["masked"] if masked else []))
    assert res.stats == {name: 1}
    scale = repr(1 / math.sqrt(8)) if scaled else "1.0"
    assert _compute_lines(res.ir) == [
        f"%attention = orca.attention(%q, %k, %v, {'%mask' if masked else 'None'}, {scale}, False) : f32[2,3,5,8]"
    ]
    _check_numbers(model, inputs, res.ir)


class Sdpa(nn.Module):
    def __init__(self, use_mask=False, **kwargs):
        super().__init__()
        self.use_mask, self.kwargs = use_mask, kwargs

    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask if self.use_mask else None, **self.kwargs)


@pytest.mark.parametrize("kwargs,expected", [
    ({}, "None, None, False"),
    ({"is_causal": True}, "None, None, True"),
    ({"use_mask": True, "scale": 0.5}, "%mask, 0.5, False"),
])
def test_sdpa_rule(kwargs, expected):
    torch.manual_seed(0)
    inputs = _attention_inputs(kv_len=5, mask_shape=(5, 5))
    res = _fuse(_capture(Sdpa(**kwargs), inputs))
    assert res.stats == {"sdpa": 1}
    assert _compute_lines(res.ir) == [f"%attention = orca.attention(%q, %k, %v, {expected}) : f32[2,3,5,8]"]
    _check_numbers(Sdpa(**kwargs), inputs, res.ir)


def test_attention_needs_the_whole_pattern():
    class ScoresAlsoReturned(nn.Module):
        def forward(self, q, k, v):
            probs = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
            return probs @ v, probs

    class SoftmaxOverQueries(nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-2, -1), dim=-2) @ v

    inputs = _attention_inputs(kv_len=5)[:3]
    for model in (ScoresAlsoReturned(), SoftmaxOverQueries()):
        res = Fuse().run(_capture(model, inputs), PassContext())
        assert res.stats == {}, type(model).__name__


# -- elementwise and copies ------------------------------------------------------------------


class Chain(nn.Module):
    def forward(self, x, y):
        a = x * torch.sigmoid(x)  # a DAG: x is read twice
        return (a + y) * 2.0 - 1.0, torch.relu(y)


def test_elementwise_rule():
    torch.manual_seed(0)
    model, inputs = Chain(), (torch.randn(4, 5), torch.randn(5))
    res = _fuse(_capture(model, inputs))
    assert res.stats == {"elementwise": 1}
    # the lone relu is not a group
    assert _compute_lines(res.ir) == [
        "%elementwise = orca.elementwise([%x, %y], sigmoid(%0); mul(%0, $0); add($1, %1); mul($2, 2.0); sub($3, 1.0))"
        " : f32[4,5]",
        "%relu = relu(%y) : f32[5]",
    ]
    _check_numbers(model, inputs, res.ir)


class EveryPointwise(nn.Module):
    """One group with every function of the pointwise table."""

    def forward(self, x, y):
        a = torch.abs(x) + 1.0
        b = torch.sqrt(a) * torch.rsqrt(a) - torch.log(a)
        c = torch.exp(-b) / (y.pow(2) + 2.0)
        acts = (F.relu(x) + F.relu6(x) + torch.clamp(x, min=-0.5) + F.hardtanh(x) + F.gelu(x)
                + F.gelu(x, approximate="tanh") + F.silu(x) + torch.sigmoid(x) + torch.tanh(x)
                + F.leaky_relu(x, 0.2) + F.hardsigmoid(x) + F.hardswish(x))
        return torch.erf(c) + acts + (1.0 - x)


def test_elementwise_covers_every_pointwise_function():
    torch.manual_seed(0)
    model, inputs = EveryPointwise(), (torch.randn(3, 7) * 3, torch.randn(7))
    res = _fuse(_capture(model, inputs))
    assert res.stats == {"elementwise": 1}
    (node,) = res.ir.compute_nodes()
    assert node.target is fused.ELEMENTWISE
    assert {step.name for step in parse_program(node.args[1])} == set(POINTWISE)
    _check_numbers(model, inputs, res.ir)
    compiled = oc.compile(model, inputs, pipeline="fuse", fullgraph=True)
    assert_outputs_close(model(*inputs), compiled(*inputs))


def test_elementwise_keeps_other_dtypes_apart():
    class IntAndFloat(nn.Module):
        def forward(self, x, n):
            return torch.relu(x * 2.0), (n + 1) * 3

    inputs = (torch.randn(3), torch.arange(3))
    res = _fuse(_capture(IntAndFloat(), inputs))
    assert res.stats == {"elementwise": 1}
    assert [op_name(n) for n in res.ir.compute_nodes()] == ["orca.elementwise", "add.Tensor", "mul.Tensor"]
    _check_numbers(IntAndFloat(), inputs, res.ir)


def test_drop_clone_exposes_a_linear_residual():
    class DropoutResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.drop = nn.Linear(6, 6), nn.Dropout(0.1)

        def forward(self, x):
            t = x.transpose(0, 1)
            return x + self.drop(self.fc(x)), t.clone(), x.clone()

    torch.manual_seed(0)
    model, inputs = DropoutResidual().eval(), (torch.randn(6, 6),)
    ir = _capture(model, inputs)
    assert sum(n.target is aten.clone.default for n in ir.compute_nodes()) == 3
    res = _fuse(ir)
    assert res.stats == {"drop-clone": 1, "linear-add": 1}
    # the copy of a transposed view and the returned copy of an input stay
    assert [op_name(n) for n in res.ir.compute_nodes()] == ["transpose.int", "orca.linear_epilogue", "clone", "clone"]
    _check_numbers(model, inputs, res.ir)


# -- options ---------------------------------------------------------------------------------


class ConvAddRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, r):
        return torch.relu(self.conv(x) + r)


def test_rule_options_select_families_and_rules():
    torch.manual_seed(0)
    ir = _capture(ConvAddRelu(), (torch.randn(1, 3, 8, 8), torch.randn(1, 4, 8, 8)))
    # without the epilogue rules, the add and the relu are an elementwise group
    assert _fuse(ir, FuseOptions(rules=("attention", "elementwise"))).stats == {"elementwise": 1}
    assert _fuse(ir, FuseOptions(skip=("conv-add-relu",))).stats == {"conv-add": 1}
    assert _fuse(ir, FuseOptions(rules=("conv-relu",))).stats == {}
    (spec,) = parse_pipeline("fuse{rules=epilogues:copies,skip=conv-add}")
    expected = {rule.name for rule in FAMILIES["epilogues"] + FAMILIES["copies"]} - {"conv-add"}
    assert spec.instantiate().options.selected == expected


@pytest.mark.parametrize("text", ["fuse{rules=conv-rleu}", "fuse{skip=fusion}"])
def test_unknown_rule_names_the_valid_ones(text):
    with pytest.raises(PipelineError, match=r"unknown rule .*valid: all, families copies, attention, epilogues, "
                                            r"elementwise, or rules drop-clone, .*conv-add-relu"):
        parse_pipeline(text)


def test_rule_names_are_unique():
    assert len({r.name for r in ALL_RULES}) == len(ALL_RULES)


# -- fused ops lowered with each kernel ------------------------------------------------------


class AttentionBranches(nn.Module):
    def forward(self, q, k, v, mask, q3, k3, v3):
        return (
            ManualAttention(True, True)(q, k, v, mask),
            ManualAttention(False, False, bmm=True)(q3, k3, v3, None),
            F.scaled_dot_product_attention(q, k, v, is_causal=True),
            F.scaled_dot_product_attention(q3, k3, v3, attn_mask=mask, scale=0.3),
        )


def _attention_branch_inputs():
    q, k, v, _ = _attention_inputs(kv_len=5)
    return q, k, v, torch.randn(5, 5), q[0], k[0], v[0]


LOWERED = [
    ("conv", ConvBranches, _conv_inputs, fused.CONV_EPILOGUE, ["tvm", "torch", "mkldnn"]),
    ("linear", LinearBranches, _linear_inputs, fused.LINEAR_EPILOGUE, ["tvm", "torch", "mkldnn"]),
    ("attention", AttentionBranches, _attention_branch_inputs, fused.ATTENTION, ["tvm", "torch"]),
]


@pytest.mark.parametrize("kind,make_model,make_inputs,op,kernels", LOWERED, ids=[c[0] for c in LOWERED])
def test_fused_ops_match_eager_with_every_kernel(kind, make_model, make_inputs, op, kernels):
    torch.manual_seed(0)
    model, inputs = make_model().eval(), make_inputs()
    expected = model(*inputs)
    for kernel in kernels:
        compiled = oc.compile(model, inputs, pipeline="fuse", kernels=kernel, fullgraph=True)
        fused_nodes = [n for n in compiled.ir.compute_nodes() if n.target is op]
        assert len(fused_nodes) == len(expected), f"every branch fuses into one {op_name(fused_nodes[0])}"
        chosen = {k.node: k.choice for k in compiled.report.kernels}
        assert {chosen[n.name] for n in fused_nodes} == {kernel}, compiled.report.kernel_summary()
        assert_outputs_close(expected, compiled(*inputs))


class DynamicBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, q, k, v, mask):
        attn = torch.softmax(q @ k.transpose(-2, -1) * 0.3 + mask, -1) @ v
        return torch.relu(self.conv(x) + x), attn, F.scaled_dot_product_attention(q[:, 0], k[:, 0], v[:, 0], mask)


def test_fusion_keeps_dynamic_dims_symbolic():
    from torch.export import Dim

    def inputs(batch):
        return (torch.randn(batch, 3, 6, 6),) + _attention_inputs(shape_q=(batch, 3, 5, 8))

    torch.manual_seed(0)
    model, batch = DynamicBatch().eval(), Dim("batch", min=1, max=64)
    compiled = oc.compile(model, inputs(2), pipeline="fuse", kernels="tvm", fullgraph=True,
                          dynamic_shapes=({0: batch}, {0: batch}, {0: batch}, {0: batch}, None))
    (record,) = compiled.report.passes
    assert record.stats == {"sdpa": 1, "attention-scaled-masked": 1, "conv-add-relu": 1}
    for size in (1, 5):
        example = inputs(size)
        assert_outputs_close(model(*example), compiled(*example))


# -- the zoo ---------------------------------------------------------------------------------

# Per-rule fusion counts of the O2 pipeline on each zoo model (the RNN models' recurrences have
# nothing to fuse around them).
ZOO_FUSIONS = {
    "mlp": {"linear-relu": 2},
    "resnet": {"conv-add-relu": 6, "conv-relu": 7},
    "mobilenet": {"conv-clamp": 10, "conv-add": 2},
    "lstm": {},
    "lstm_bidir": {},
    "gru": {},
    "gru_bidir": {},
    "transformer": {"drop-clone": 4, "sdpa": 2, "linear-gelu": 2, "linear-add": 2},
}


def test_zoo_table_lists_every_model():
    assert set(ZOO_FUSIONS) == set(zoo.names())


@pytest.mark.parametrize("name", zoo.names())
def test_zoo_fusion_counts_and_numbers(name):
    model, inputs = zoo.get(name)
    # oneDNN's fused kernels wherever they apply (the zoo's depthwise and grouped convs and
    # residual adds), TVM elsewhere; forced rather than measured to keep the test fast.
    compiled = oc.compile(model, inputs, pipeline="O2", kernels="mkldnn")
    (record,) = [r for r in compiled.report.passes if r.name == "fuse"]
    assert record.stats == ZOO_FUSIONS[name]
    assert compiled.report.fallbacks == [], str(compiled.report)
    assert_outputs_close(model(*inputs), compiled(*inputs))
