"""Rule-based CPU schedules (lowering/cpu_schedules.py): which rule takes each kind of op, that it
made parallel / vectorized loops, and that the numbers match eager.

Tolerance: rtol=1e-4, atol=1e-5 for every case (fp32; reductions are reordered and exp/erf/tanh
are TVM's polynomial versions; the errors we measure are <= 3e-6 absolute on outputs of size ~10).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import assert_outputs_close

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.relax.frontend.torch import from_exported_program  # noqa: E402

from orca_compiler.lowering import cpu_schedules as cs  # noqa: E402
from orca_compiler.lowering.target import host_cpu_target, resolve_target  # noqa: E402

TARGET = tvm.target.Target(host_cpu_target(2))


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


class GeluLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(256)

    def forward(self, x):
        return self.norm(F.gelu(x))


def _relax(model, inputs):
    return from_exported_program(torch.export.export(model.eval(), inputs))


def _scheduled(model, inputs):
    """The module after legalization, fusion and our rules (what codegen will get)."""
    passes = [cs.fast_math_pass, *relax.backend.cpu_generic.legalize_passes(TARGET), cs.schedule_pass()]
    with TARGET:
        return tvm.transform.Sequential(passes)(_relax(model, inputs))


def _run(model, inputs, target=TARGET):
    """Compile with cpu_pipeline(target) (as relax_build does: the Target in scope) and run.
    `target` may be any form cpu_pipeline takes; tvm.compile itself gets a Target."""
    tvm_target = getattr(target, "tvm_target", target)
    tvm_target = tvm_target if isinstance(tvm_target, tvm.target.Target) else tvm.target.Target(tvm_target)
    with tvm_target:
        executable = tvm.compile(_relax(model, inputs), target=tvm_target, relax_pipeline=cs.cpu_pipeline(target))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    out = vm["main"](*[tvm.runtime.from_dlpack(x.contiguous()) for x in inputs])
    return tuple(torch.from_dlpack(o).clone() for o in out)


def _check_numbers(model, inputs):
    expected = model(*inputs)
    assert_outputs_close(expected if isinstance(expected, tuple) else (expected,), _run(model, inputs))


r = torch.randn
# name: (model, inputs, {PrimFunc name fragment: rule}, loops the scheduled TIR must contain)
CASES = {
    "add_relu": (Fn(lambda x, y: torch.relu(x + y)), (r(1, 64, 64, 64), r(1, 64, 64, 64)),
                 {"add_relu": "Injective"}, ("T.parallel", "T.vectorized")),
    "gelu_layer_norm": (GeluLayerNorm(), (r(2, 64, 256),),
                        {"gelu": "Injective", "layer_norm": "RowReduction"}, ("T.vectorized",)),
    "softmax": (Fn(lambda x: torch.softmax(x, -1)), (r(4, 8, 64, 128),),
                {"softmax": "RowReduction"}, ("T.parallel", "T.vectorized")),
    "adaptive_avg_pool": (Fn(lambda x: F.adaptive_avg_pool2d(x, 1)), (r(1, 512, 7, 7),),
                          {"mean": "RowReduction"}, ()),
    "depthwise_conv": (nn.Conv2d(32, 32, 3, 1, 1, groups=32), (r(1, 32, 112, 112),),
                       {"conv2d": "Tiled"}, ("T.parallel", "T.vectorized")),
    "linear": (nn.Linear(512, 1024), (r(8, 512),), {"matmul": "Tiled"}, ("T.parallel", "T.vectorized")),
    "conv_bn_relu": (nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()),
                     (r(1, 16, 32, 32),), {"conv2d": "Tiled"}, ("T.parallel", "T.vectorized")),
    "bmm": (Fn(torch.bmm), (r(4, 33, 17), r(4, 17, 48)), {"matmul": "Tiled"}, ("T.vectorized",)),
    "max_pool_stride1": (nn.MaxPool2d(3, 1, 1), (r(1, 8, 32, 32),), {"max_pool2d": "Tiled"}, ("T.vectorized",)),
    # Strided windows are left to LLVM (see Tiled): unscheduled, still correct.
    "max_pool_stride2": (nn.MaxPool2d(3, 2, 1), (r(1, 16, 56, 56),), {"max_pool2d": "-"}, ()),
    "depthwise_stride2": (nn.Conv2d(16, 16, 3, 2, 1, groups=16), (r(1, 16, 28, 28),), {"conv2d": "-"}, ()),
}


@pytest.mark.parametrize("name", CASES)
def test_rule_fires_and_matches_eager(name):
    model, inputs, rules, loops = CASES[name]
    mod = _scheduled(model, inputs)
    summary = cs.schedule_summary(mod)
    for fragment, rule in rules.items():
        matching = [fn for fn in summary if fragment in fn]
        assert matching, f"no PrimFunc named like {fragment!r} in {summary}"
        assert all(summary[fn] == rule for fn in matching), summary
    script = "\n".join(f.script() for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
    for loop in loops:
        assert loop in script, f"{name}: no {loop} loop in the scheduled TIR"
    _check_numbers(model, inputs)


@pytest.mark.parametrize("model, inputs", [
    (nn.Linear(64, 10), (r(5, 64),)),  # 10 outputs: no vector divides them, the tail is predicated
    (nn.Conv2d(8, 12, 3, padding=1), (r(1, 8, 7, 7),)),  # 7 wide
    (Fn(lambda x: x.sum(1)), (r(3, 64, 40),)),  # reduce a middle axis: vectorized over the last
    (Fn(lambda x: torch.cat([x, x * 2], 1).permute(0, 2, 1)), (r(2, 3, 33),)),
    (Fn(lambda x: x.argmax(-1)), (r(4, 50),)),
    (Fn(lambda x: x.cumsum(-1)), (r(4, 64),)),
    (Fn(lambda x: torch.exp(x) + torch.sigmoid(x) + torch.tanh(x) + F.gelu(x, approximate="tanh")),
     (torch.linspace(-20, 20, 4096).reshape(4, 1024),)),
    (nn.MultiheadAttention(64, 4, batch_first=True), (r(2, 10, 64), r(2, 10, 64), r(2, 10, 64))),
])
def test_odd_shapes_and_ops_stay_correct(model, inputs):
    expected = model.eval()(*inputs)
    expected = tuple(e for e in (expected if isinstance(expected, tuple) else (expected,)) if e is not None)
    assert_outputs_close(expected, _run(model, inputs))


def test_target_forms_that_relax_build_passes():
    model, inputs = nn.Linear(16, 32), (r(4, 16),)
    expected = (model(*inputs),)
    spec = dict(host_cpu_target(2), mtriple="x86_64-linux-gnu")
    for target in (spec, tvm.target.Target(spec), resolve_target("llvm")):
        assert_outputs_close(expected, _run(model, inputs, target))


def test_vector_lanes_follow_the_cpu():
    def lanes(mcpu):
        return cs.vector_lanes(tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu}))

    assert (lanes("znver4"), lanes("znver3"), lanes("x86-64")) == (16, 8, 4)


def test_a_rule_that_raises_is_skipped():
    class Broken(cs.CPURule):
        def schedule(self, sch, blocks, target):
            raise RuntimeError("boom")

    mod = _relax(Fn(lambda x: x + 1), (r(4, 64),))
    with TARGET:
        mod = tvm.transform.Sequential(relax.backend.cpu_generic.legalize_passes(TARGET))(mod)
        func = next(f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
        assert Broken().apply(func, TARGET, False) is None
        assert cs.Injective().apply(func, TARGET, False) is not None


def test_scheduling_twice_changes_nothing():
    mod = _scheduled(nn.Conv2d(8, 8, 3, padding=1), (r(1, 8, 16, 16),))
    with TARGET:
        again = cs.schedule_pass()(mod)
    tvm.ir.assert_structural_equal(mod, again)


def test_packed_calls_survive_fusion():
    """relax_build calls torch kernels with R.call_pure_packed; fusion must keep them."""
    calls = []

    @tvm.register_global_func("test_cpu_schedules.double", override=True)
    def double(x):
        calls.append(1)
        return tvm.runtime.from_dlpack(torch.from_dlpack(x) * 2)

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            double_x = relax.call_pure_packed("test_cpu_schedules.double", x, ty_args=x.ty)
            y = bb.emit(double_x)
            z = bb.emit_output(relax.op.nn.relu(relax.op.add(y, x)))
        bb.emit_func_output(z)
    with TARGET:
        executable = tvm.compile(bb.get(), target=TARGET, relax_pipeline=cs.cpu_pipeline(TARGET))
    data = r(4, 8)
    out = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.from_dlpack(data))
    assert calls
    assert_outputs_close((torch.relu(data * 3),), (torch.from_dlpack(out),))
