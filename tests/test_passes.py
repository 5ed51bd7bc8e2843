"""The pass library (dce, cse, fold-constants, fold-bn) and the pass manager."""
from __future__ import annotations

import io
import operator

import pytest
import torch
from torch import nn

import orca_compiler
from orca_compiler import PassError
from orca_compiler.capture import capture
from orca_compiler.instruments import CallbackInstrument, Instrument, PassTimer, PrintIRAfter
from orca_compiler.lowering.support import keep_op_in_capture
from orca_compiler.pass_base import Pass, PassContext, PassResult, register_pass, unregister_pass
from orca_compiler.pass_manager import PassManager
from orca_compiler.passes.cleanup import CommonSubexpressionElimination, DeadCodeElimination
from orca_compiler.passes.fold_bn import FoldBatchNorm
from orca_compiler.passes.fold_constants import FoldConstants, FoldConstantsOptions
from orca_compiler.verify import verify

aten = torch.ops.aten
BN = aten._native_batch_norm_legit_no_training.default
CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}
TOL = dict(rtol=1e-5, atol=1e-5)


# -- helpers ---------------------------------------------------------------------------------


def _capture(model, inputs):
    return capture(model, inputs, keep_op=keep_op_in_capture).ir


def _apply(pass_, ir):
    """Run a pass on a copy of `ir` the way the pass manager does; check the result verifies."""
    result = pass_.run(ir.copy(), PassContext())
    result.ir.recompile()
    verify(result.ir)
    return result


def _targets(ir):
    return [n.target for n in ir.compute_nodes()]


def _count(ir, target):
    return sum(t is target for t in _targets(ir))


def _eager(model, inputs):
    with torch.no_grad():
        out = model(*inputs)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _randomize_bn(model):
    torch.manual_seed(123)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _check_idempotent(pass_, ir):
    again = _apply(pass_, ir)
    assert again.modified is False, f"{pass_.name} changed its own output again: {again.stats}"
    assert str(again.ir) == str(ir)


# -- dce -------------------------------------------------------------------------------------


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)  # never called: capture keeps its weights as dead get_attrs

    def forward(self, x):
        return torch.relu(self.a(x))


def _with_dead_branch():
    torch.manual_seed(0)
    model = TwoLinears().eval()
    x = torch.randn(2, 4)
    ir = _capture(model, (x,))
    # add a branch whose result nobody uses, reading a weight that only it reads
    out = ir.output_node()
    xn = ir.input_nodes()[0]
    with ir.graph.inserting_before(out):
        w = ir.add_weight("dead_w", torch.randn(4, 4))
        mm = ir.create_node(aten.mm.default, (xn, w))
        ir.create_node(aten.sigmoid.default, (mm,))
    ir.recompile()
    verify(ir)
    return ir, model, x


def test_dce_removes_dead_branch_and_its_weights():
    ir, model, x = _with_dead_branch()
    assert {"dead_w", "unused_weight", "unused_bias"} <= set(ir.weights())
    res = _apply(DeadCodeElimination(), ir)
    assert res.modified
    assert res.stats == {"nodes_removed": 2, "weights_removed": 3}
    out = res.ir
    assert _count(out, aten.mm.default) == 0 and _count(out, aten.sigmoid.default) == 0
    assert set(out.weights()) == {"a_weight", "a_bias"}
    assert out.weight_bytes() < ir.weight_bytes()
    # the tensors are freed too, not only the get_attr nodes
    buffers = dict(out.gm.named_buffers())
    for name in ("dead_w", "unused_weight", "unused_bias"):
        assert name not in buffers
    torch.testing.assert_close(out.run(x), ir.run(x), rtol=0, atol=0)
    torch.testing.assert_close(out.run(x), _eager(model, (x,)), **TOL)
    _check_idempotent(DeadCodeElimination(), out)


def test_dce_keeps_everything_live():
    torch.manual_seed(0)
    x = torch.randn(2, 4)
    ir = _capture(nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval(), (x,))
    res = _apply(DeadCodeElimination(), ir)
    assert not res.modified and res.stats == {"nodes_removed": 0, "weights_removed": 0}
    assert str(res.ir) == str(ir)


# -- cse -------------------------------------------------------------------------------------


class DupRelu(nn.Module):
    def forward(self, x):
        return torch.relu(x) + torch.relu(x), torch.sigmoid(x * 2.0) * torch.sigmoid(x * 2.0)


class RandTwice(nn.Module):
    def forward(self, x):
        return torch.rand_like(x) + torch.rand_like(x), torch.relu(x) - torch.relu(x)


class DifferentScalars(nn.Module):
    def forward(self, x):
        m = x > 0
        return x + 1.0, x + 2.0, x * 0.0, x * -0.0, m + True, m + 1


def test_cse_merges_duplicated_subexpressions():
    x = torch.randn(2, 3)
    ir = _capture(DupRelu(), (x,))
    assert _count(ir, aten.relu.default) == 2
    res = _apply(CommonSubexpressionElimination(), ir)
    assert res.modified
    # relu, the x*2.0 mul and its sigmoid
    assert res.stats["merged"] == 3
    assert _count(res.ir, aten.relu.default) == 1
    assert _count(res.ir, aten.sigmoid.default) == 1
    assert res.ir.num_nodes() == ir.num_nodes() - 3
    relu = next(n for n in res.ir.compute_nodes() if n.target is aten.relu.default)
    (add,) = relu.users
    assert add.args == (relu, relu)
    torch.testing.assert_close(res.ir.run(x), ir.run(x), rtol=0, atol=0)
    torch.testing.assert_close(res.ir.run(x), _eager(DupRelu(), (x,)), **TOL)
    _check_idempotent(CommonSubexpressionElimination(), res.ir)


def test_cse_does_not_merge_nondeterministic_ops():
    x = torch.randn(2, 3)
    ir = _capture(RandTwice(), (x,))
    assert _count(ir, aten.rand_like.default) == 2
    res = _apply(CommonSubexpressionElimination(), ir)
    assert res.stats["merged"] == 1  # only the relu
    assert _count(res.ir, aten.rand_like.default) == 2
    rand_sum, zeros = res.ir.run(x)
    assert torch.equal(zeros, torch.zeros_like(x))
    # two independent draws: their sum is not twice either of them
    assert rand_sum.shape == x.shape and ((rand_sum >= 0) & (rand_sum < 2)).all()


def test_cse_keeps_different_scalars_apart():
    x = torch.randn(2, 3)
    ir = _capture(DifferentScalars(), (x,))
    res = _apply(CommonSubexpressionElimination(), ir)
    assert res.stats["merged"] == 0 and not res.modified
    outs = res.ir.run(x)
    expected = _eager(DifferentScalars(), (x,))
    assert [o.dtype for o in outs] == [e.dtype for e in expected]
    for o, e in zip(outs, expected):
        torch.testing.assert_close(o, e, rtol=0, atol=0)
    # x * -0.0 keeps its sign bits
    assert torch.equal(torch.signbit(outs[3]), torch.signbit(expected[3]))


def test_cse_merges_duplicate_get_attrs_of_one_weight():
    torch.manual_seed(0)
    x = torch.randn(2, 4)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    ir = _capture(model, (x,))
    linear = next(n for n in ir.compute_nodes() if n.target is aten.linear.default)
    first = linear.args[1]
    with ir.graph.inserting_before(linear):
        dup = ir.graph.get_attr(first.target)
    dup.meta = dict(first.meta)
    linear.replace_input_with(first, dup)
    ir.graph.eliminate_dead_code(is_impure_node=lambda n: n.op != "call_function")
    ir.recompile()
    assert sum(n.op == "get_attr" and n.target == first.target for n in ir.graph.nodes) == 2
    res = _apply(CommonSubexpressionElimination(), ir)
    assert res.stats["merged"] == 1
    assert sum(n.op == "get_attr" and n.target == first.target for n in res.ir.graph.nodes) == 1
    torch.testing.assert_close(res.ir.run(x), _eager(model, (x,)), **TOL)


# -- fold-constants --------------------------------------------------------------------------


class MatmulTransposedBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(6, 5))

    def forward(self, x):
        return x @ self.w.t()


class ExpandBias(nn.Module):
    """Adds a [64] bias broadcast to [2,64,32,32]; optionally scales the expanded bias first."""

    def __init__(self, scale_after_expand: bool):
        super().__init__()
        self.register_buffer("b", torch.randn(64))
        self.scale_after_expand = scale_after_expand

    def forward(self, x):
        big = self.b.reshape(1, 64, 1, 1).expand(2, 64, 32, 32)
        if self.scale_after_expand:
            big = big * 2.0
        return x + big


def test_fold_constants_folds_ops_on_weights_only():
    torch.manual_seed(0)
    model = MatmulTransposedBuffer().eval()
    x = torch.randn(3, 5)
    ir = _capture(model, (x,))
    transposes = [n for n in ir.compute_nodes() if n.all_input_nodes and all(a.op == "get_attr" for a in n.all_input_nodes)]
    assert len(transposes) == 1
    res = _apply(FoldConstants(), ir)
    assert res.modified and res.stats["folded"] == 1
    out = res.ir
    # only the matmul on the input is left, reading a folded [5, 6] weight
    (mm,) = out.compute_nodes()
    assert mm.args[0].op == "placeholder"
    folded = mm.args[1]
    assert folded.op == "get_attr" and tuple(out.weight(folded).shape) == (5, 6)
    torch.testing.assert_close(out.weight(folded), model.w.t(), rtol=0, atol=0)
    assert out.weight(folded).is_contiguous()
    # the transposed weight is no longer needed: not referenced, not kept alive
    assert "w" not in out.weights() and "w" not in dict(out.gm.named_buffers())
    torch.testing.assert_close(out.run(x), ir.run(x), **TOL)
    torch.testing.assert_close(out.run(x), _eager(model, (x,)), **TOL)
    _check_idempotent(FoldConstants(), out)


@pytest.mark.parametrize("scale_after_expand", [False, True])
def test_fold_constants_does_not_bake_a_large_expand(scale_after_expand):
    torch.manual_seed(0)
    model = ExpandBias(scale_after_expand).eval()
    x = torch.randn(2, 64, 32, 32)
    ir = _capture(model, (x,))
    res = _apply(FoldConstants(), ir)
    out = res.ir
    # an op computed from the expanded bias must not be folded either: the result would be a
    # 131072-element weight made from a 64-element one
    biggest = max(t.numel() for t in out.weights().values())
    assert biggest <= 64, {k: tuple(v.shape) for k, v in out.weights().items()}
    assert _count(out, aten.expand.default) == 1
    assert out.weight_bytes() <= ir.weight_bytes()
    torch.testing.assert_close(out.run(x), _eager(model, (x,)), **TOL)
    _check_idempotent(FoldConstants(), out)


def test_fold_constants_max_growth_option_allows_large_results():
    torch.manual_seed(0)
    model = ExpandBias(True).eval()
    x = torch.randn(2, 64, 32, 32)
    ir = _capture(model, (x,))
    res = _apply(FoldConstants(FoldConstantsOptions(max_growth=1e6)), ir)
    assert res.modified
    assert _count(res.ir, aten.expand.default) == 0
    assert max(t.numel() for t in res.ir.weights().values()) == 2 * 64 * 32 * 32
    torch.testing.assert_close(res.ir.run(x), _eager(model, (x,)), **TOL)


def test_fold_constants_always_folds_small_results():
    class SmallExpand(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("b", torch.randn(4))

        def forward(self, x):
            return x + self.b.reshape(1, 4, 1, 1).expand(1, 4, 8, 8)

    torch.manual_seed(0)
    model = SmallExpand().eval()
    x = torch.randn(1, 4, 8, 8)
    ir = _capture(model, (x,))
    res = _apply(FoldConstants(), ir)  # 256 elements: under always_fold_numel
    assert _count(res.ir, aten.expand.default) == 0
    (add,) = res.ir.compute_nodes()
    assert tuple(res.ir.weight(add.args[1]).shape) == (1, 4, 8, 8)
    res_small = _apply(FoldConstants(FoldConstantsOptions(max_growth=1.0, always_fold_numel=16)), ir)
    assert _count(res_small.ir, aten.expand.default) == 1
    for r in (res, res_small):
        torch.testing.assert_close(r.ir.run(x), _eager(model, (x,)), **TOL)


def test_fold_constants_leaves_random_ops():
    class Noise(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.ones(3))

        def forward(self, x):
            return x + torch.rand_like(self.w)

    x = torch.randn(2, 3)
    ir = _capture(Noise(), (x,))
    res = _apply(FoldConstants(), ir)
    assert _count(res.ir, aten.rand_like.default) == 1


# -- fold-bn ---------------------------------------------------------------------------------


class ConvBn(nn.Module):
    def __init__(self, affine=True, bias=True):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(4, affine=affine)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class LinearBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(self.fc(x))


class Conv1dBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3, groups=3)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(self.conv(x))


class ConvUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        c = self.conv(x)
        return self.bn(c) + c


class Linear3dBn(nn.Module):
    """Linear on [N, L, C] then BatchNorm1d over L: the BN channel is not the linear's out dim."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 7)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(self.fc(x))


def _bn_after_conv_or_linear(ir):
    return sum(
        1 for n in ir.compute_nodes()
        if n.target is BN and (n.args[0].target in CONVS or n.args[0].target is aten.linear.default)
    )


def _check_fold_bn(model, inputs, expect_folded, expect_bn_left=0):
    ir = _capture(model, inputs)
    res = _apply(FoldBatchNorm(), ir)
    assert res.stats["folded"] == expect_folded
    assert res.modified == (expect_folded > 0)
    assert _count(res.ir, BN) == expect_bn_left
    if expect_bn_left == 0:
        assert not any(n.target is operator.getitem for n in res.ir.compute_nodes())
    torch.testing.assert_close(res.ir.run(*inputs), ir.run(*inputs), **TOL)
    torch.testing.assert_close(res.ir.run(*inputs), _eager(model, inputs), **TOL)
    _check_idempotent(FoldBatchNorm(), res.ir)
    return ir, res


@pytest.mark.parametrize("affine, bias", [(True, True), (True, False), (False, True)])
def test_fold_bn_conv2d(affine, bias):
    torch.manual_seed(0)
    model = _randomize_bn(ConvBn(affine=affine, bias=bias))
    ir, res = _check_fold_bn(model, (torch.randn(1, 3, 8, 8),), expect_folded=1)
    (conv,) = [n for n in res.ir.compute_nodes() if n.target is aten.conv2d.default]
    assert conv.args[2] is not None  # the folded bias
    # BN parameters and statistics are gone from the weights
    assert not any(name.startswith("bn_") for name in res.ir.weights())
    assert res.ir.num_nodes() == 2  # conv2d, relu


def test_fold_bn_values():
    torch.manual_seed(0)
    model = _randomize_bn(ConvBn())
    _, res = _check_fold_bn(model, (torch.randn(1, 3, 8, 8),), expect_folded=1)
    (conv,) = [n for n in res.ir.compute_nodes() if n.target is aten.conv2d.default]
    bn = model.bn
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(res.ir.weight(conv.args[1]), model.conv.weight * scale.reshape(-1, 1, 1, 1))
    torch.testing.assert_close(res.ir.weight(conv.args[2]), (model.conv.bias - bn.running_mean) * scale + bn.bias)


def test_fold_bn_linear_batchnorm1d():
    torch.manual_seed(0)
    model = _randomize_bn(LinearBn())
    _, res = _check_fold_bn(model, (torch.randn(4, 5),), expect_folded=1)
    assert _targets(res.ir) == [aten.linear.default]


def test_fold_bn_grouped_conv1d():
    torch.manual_seed(0)
    model = _randomize_bn(Conv1dBn())
    _check_fold_bn(model, (torch.randn(2, 3, 10),), expect_folded=1)


def test_fold_bn_skips_conv_with_another_user():
    torch.manual_seed(0)
    model = _randomize_bn(ConvUsedTwice())
    ir, res = _check_fold_bn(model, (torch.randn(1, 3, 4, 4),), expect_folded=0, expect_bn_left=1)
    assert str(res.ir) == str(ir)


def test_fold_bn_skips_linear_on_3d_input():
    torch.manual_seed(0)
    model = _randomize_bn(Linear3dBn())
    _check_fold_bn(model, (torch.randn(2, 6, 5),), expect_folded=0, expect_bn_left=1)


@pytest.fixture(scope="module")
def zoo_captures():
    captured = {}
    for name in ("resnet", "mobilenet"):
        model, inputs = orca_compiler.zoo.get(name)
        captured[name] = (model, inputs, _capture(model, inputs))
    return captured


@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
def test_fold_bn_zoo_models(zoo_captures, name):
    model, inputs, ir = zoo_captures[name]
    expected_pairs = _bn_after_conv_or_linear(ir)
    n_bn = _count(ir, BN)
    n_bn_modules = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert expected_pairs == n_bn == n_bn_modules > 0
    res = _apply(FoldBatchNorm(), ir)
    assert res.stats["folded"] == expected_pairs
    assert _count(res.ir, BN) == 0
    assert not any("batch_norm" in str(n.target) for n in res.ir.graph.nodes)
    assert sum(n.target in CONVS for n in res.ir.compute_nodes()) == sum(n.target in CONVS for n in ir.compute_nodes())
    assert res.ir.num_nodes() == ir.num_nodes() - 2 * expected_pairs
    assert res.ir.weight_bytes() < ir.weight_bytes()
    if name == "mobilenet":
        groups = [n.args[6] for n in res.ir.compute_nodes() if n.target is aten.conv2d.default and len(n.args) > 6]
        assert any(g == 2 for g in groups), "grouped 1x1 convs"
        assert any(g > 2 for g in groups), "depthwise convs"
    torch.testing.assert_close(res.ir.run(*inputs), ir.run(*inputs), **TOL)
    torch.testing.assert_close(res.ir.run(*inputs), _eager(model, inputs), **TOL)
    _check_idempotent(FoldBatchNorm(), res.ir)


# -- pass manager ----------------------------------------------------------------------------


class _CorruptValPass(Pass):
    """Test pass: records a wrong shape on the first relu."""

    name = "test-corrupt-val"

    def run(self, ir, ctx):
        relu = next(n for n in ir.graph.nodes if n.target is aten.relu.default)
        relu.meta["val"] = ir.fake_mode.from_tensor(torch.empty(1, 1), static_shapes=True)
        return PassResult(ir, True)


class _DeleteValPass(Pass):
    """Test pass: deletes the recorded value of the first relu."""

    name = "test-delete-val"

    def run(self, ir, ctx):
        relu = next(n for n in ir.graph.nodes if n.target is aten.relu.default)
        del relu.meta["val"]
        return PassResult(ir, True)


class _RaisingPass(Pass):
    """Test pass: erases a node, then raises."""

    name = "test-raises"

    def run(self, ir, ctx):
        relu = next(n for n in ir.graph.nodes if n.target is aten.relu.default)
        relu.replace_all_uses_with(relu.args[0])
        ir.graph.erase_node(relu)
        raise RuntimeError("boom from the test pass")


@pytest.fixture
def broken_passes():
    classes = (_CorruptValPass, _DeleteValPass, _RaisingPass)
    for cls in classes:
        register_pass(cls)
    yield
    for cls in classes:
        unregister_pass(cls.name)


@pytest.fixture(scope="module")
def convbn():
    torch.manual_seed(0)
    model = _randomize_bn(ConvBn())
    x = torch.randn(1, 3, 8, 8)
    return model, x, _capture(model, (x,))


def test_pass_manager_records(convbn):
    model, x, ir = convbn
    out, records = PassManager("fold-constants,fold-bn,cse,dce").run(ir, PassContext())
    assert [r.name for r in records] == ["fold-constants", "fold-bn", "cse", "dce"]
    assert [r.spec for r in records] == ["fold-constants", "fold-bn", "cse", "dce"]
    assert [r.modified for r in records] == [False, True, False, False]
    assert not any(r.skipped for r in records)
    assert records[1].stats == {"folded": 1}
    assert records[0].nodes_before == ir.num_nodes() == 4  # conv2d, bn, getitem, relu
    assert records[1].nodes_before == 4 and records[1].nodes_after == 2
    for prev, nxt in zip(records, records[1:]):
        assert prev.nodes_after == nxt.nodes_before
        assert prev.weight_bytes_after == nxt.weight_bytes_before
    assert records[-1].nodes_after == out.num_nodes() == 2
    assert records[1].weight_bytes_after < records[1].weight_bytes_before
    assert all(r.seconds >= 0 for r in records)
    assert all(r.ir_after is None for r in records)
    torch.testing.assert_close(out.run(x), _eager(model, (x,)), **TOL)


def test_pass_manager_spec_text_and_options(convbn):
    _, _, ir = convbn
    pm = PassManager("fold-constants{max_growth=4.0},O0,dce")
    assert pm.text == "fold-constants{max_growth=4.0},dce"
    _, records = pm.run(ir, PassContext())
    assert [r.spec for r in records] == ["fold-constants{max_growth=4.0}", "dce"]
    assert pm.passes[0].options.max_growth == 4.0


def test_empty_pipeline_returns_the_input(convbn):
    _, _, ir = convbn
    out, records = PassManager("O0").run(ir, PassContext())
    assert records == [] and out is ir


@pytest.mark.parametrize("bad", ["test-corrupt-val", "test-delete-val"])
def test_pass_leaving_an_invalid_ir_is_named(convbn, broken_passes, bad):
    _, x, ir = convbn
    before = str(ir)
    failures = []

    class Recorder(Instrument):
        def run_after_failure(self, index, pass_, ir_, error):
            failures.append((index, pass_.name, type(error).__name__))

    with pytest.raises(PassError) as info:
        PassManager(f"cse,fold-bn,{bad},dce").run(ir, PassContext(instruments=[Recorder()]))
    err = info.value
    msg = str(err)
    assert err.pass_name == bad and f"pass '{bad}'" in msg
    assert err.node == "relu" and "%relu" in msg
    assert err.previous == ["cse", "fold-bn"]
    assert "passes run before it: cse, fold-bn" in msg
    assert failures == [(2, bad, "VerificationError")]
    # the input IR is untouched
    assert str(ir) == before
    verify(ir)
    assert ir.run(x)[0].shape == (1, 4, 8, 8)


def test_pass_raising_is_named(convbn, broken_passes):
    _, x, ir = convbn
    before = str(ir)
    with pytest.raises(PassError) as info:
        PassManager("fold-bn,test-raises").run(ir, PassContext())
    err = info.value
    msg = str(err)
    assert err.pass_name == "test-raises" and "pass 'test-raises'" in msg
    assert "RuntimeError" in msg and "boom from the test pass" in msg
    assert err.previous == ["fold-bn"] and "passes run before it: fold-bn" in msg
    assert isinstance(err.__cause__, RuntimeError)
    # the pass erased a node of its copy before raising: the input still has it
    assert str(ir) == before
    assert _count(ir, aten.relu.default) == 1
    verify(ir)


def test_first_pass_failing_reports_no_previous(convbn, broken_passes):
    _, _, ir = convbn
    with pytest.raises(PassError, match=r"passes run before it: none") as info:
        PassManager("test-corrupt-val").run(ir, PassContext())
    assert info.value.previous == []


def test_verify_each_off_lets_a_bad_pass_through(convbn, broken_passes):
    _, _, ir = convbn
    out, records = PassManager("test-corrupt-val").run(ir, PassContext(verify_each=False))
    assert records[0].modified
    with pytest.raises(orca_compiler.VerificationError):
        verify(out)


def test_instrument_can_skip_later_passes(convbn):
    model, x, ir = convbn
    seen = []

    class OnlyFirst(Instrument):
        def should_run(self, index, pass_, ir_):
            return index < 1

        def run_before_pass(self, index, pass_, ir_):
            seen.append(pass_.name)

    out, records = PassManager("fold-bn,cse,dce").run(ir, PassContext(instruments=[OnlyFirst()]))
    assert seen == ["fold-bn"]
    assert [r.name for r in records] == ["fold-bn", "cse", "dce"]
    assert [r.skipped for r in records] == [False, True, True]
    assert [r.modified for r in records] == [True, False, False]
    assert records[1].stats == {} and records[1].seconds == 0.0
    alone, _ = PassManager("fold-bn").run(ir, PassContext())
    assert str(out) == str(alone)
    assert _count(out, BN) == 0


def test_skipped_pass_is_not_listed_as_run_before_a_failure(convbn, broken_passes):
    _, _, ir = convbn

    class SkipCse(Instrument):
        def should_run(self, index, pass_, ir_):
            return pass_.name != "cse"

    with pytest.raises(PassError) as info:
        PassManager("fold-bn,cse,test-raises").run(ir, PassContext(instruments=[SkipCse()]))
    assert info.value.previous == ["fold-bn"]


def test_print_ir_after(convbn):
    _, _, ir = convbn
    stream = io.StringIO()
    out, _ = PassManager("fold-bn,cse").run(ir, PassContext(instruments=[PrintIRAfter(stream=stream)]))
    text = stream.getvalue()
    assert "// ----- IR after fold-bn (#0) -----\n" in text
    assert "// ----- IR after cse (#1) -----\n" in text
    after_cse = text.split("// ----- IR after cse (#1) -----\n", 1)[1]
    assert after_cse == str(out)
    assert "{from=fold-bn}" in text and "batch_norm" not in text

    only = io.StringIO()
    PassManager("fold-bn,cse").run(ir, PassContext(instruments=[PrintIRAfter(only={"cse"}, stream=only)]))
    assert "after cse" in only.getvalue() and "after fold-bn" not in only.getvalue()

    changed = io.StringIO()
    PassManager("fold-bn,cse").run(ir, PassContext(instruments=[PrintIRAfter(stream=changed, changed_only=True)]))
    assert "after fold-bn" in changed.getvalue() and "after cse" not in changed.getvalue()


def test_timer_and_callback_instruments(convbn):
    _, _, ir = convbn
    timer = PassTimer()
    seen = []
    PassManager("fold-bn,dce").run(
        ir, PassContext(instruments=[timer, CallbackInstrument(lambda r: seen.append((r.name, r.ir_after is not None)))])
    )
    assert [name for name, _ in timer.rows] == ["fold-bn", "dce"]
    assert all(s >= 0 for _, s in timer.rows)
    table = timer.table().splitlines()
    assert table[0].split() == ["pass", "ms", "%"] and len(table) == 3
    # the IR after the pass is available while instruments run
    assert seen == [("fold-bn", True), ("dce", True)]


@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
def test_o1_on_zoo_models(zoo_captures, name):
    model, inputs, ir = zoo_captures[name]
    out, records = PassManager("O1").run(ir, PassContext())
    by_name = {r.name: r for r in records}
    assert by_name["fold-bn"].stats["folded"] == _bn_after_conv_or_linear(ir)
    assert _count(out, BN) == 0
    torch.testing.assert_close(out.run(*inputs), _eager(model, inputs), **TOL)
    # O1 reaches a fixed point: running it again changes nothing
    again, records2 = PassManager("O1").run(out, PassContext())
    assert not any(r.modified for r in records2)
    assert str(again) == str(out)
