"""place-memory (issue 8): weights homed on ram or disk under a fast-tier budget, streamed through
a bounded pool by prefetch/fetch/release ops.

Every zoo model is checked at budgets of 100%, 50% and 25% of its weight bytes: outputs equal
eager, the pool's measured peak stays within its capacity and the budget, and the bytes the
runtime moved equal the plan's. Where a budget is below the model's minimum (one layer's weights
do not fit), the error says the minimum, and the model is checked at that minimum instead.
"""
from __future__ import annotations

import re
import threading
import time

import pytest
import torch

import orca_compiler
from orca_compiler import zoo
from orca_compiler.capture import capture
from orca_compiler.errors import PassError, PassInputError
from orca_compiler.lowering.streaming import WeightPool, stream_of
from orca_compiler.lowering.support import keep_op_in_capture
from orca_compiler.ops.placement import FETCH, PLACEMENT_OPS, PREFETCH, RELEASE
from orca_compiler.pass_manager import PassManager
from orca_compiler.runtime import TVMGraphModule

from conftest import assert_outputs_close


def _ir(name, pipeline, rows=None):
    model, inputs = zoo.get(name)
    if rows is not None:  # the example repeated along dim 0: more compute per weight byte
        inputs = tuple(x.repeat(rows // x.shape[0], *[1] * (x.dim() - 1)) for x in inputs)
    return PassManager(pipeline).run(capture(model, inputs, keep_op=keep_op_in_capture).ir)


def _eager(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def _minimum_in(exc: PassError) -> int:
    assert isinstance(exc.__cause__, PassInputError)
    return int(re.search(r"minimum feasible budget is (\d+) bytes", str(exc)).group(1))


def _check_streamed(name, budget: str, policy="prefetch", pipeline="O1", model_inputs=None, arena=True):
    """Compile at `budget`, run once, and check outputs, the pool's bound and the bytes moved
    (a zoo model, or `model_inputs` = (model, inputs)); with `arena`, that the pool is one arena."""
    model, inputs = model_inputs or zoo.get(name)
    compiled = orca_compiler.compile(model, inputs, pipeline=f"{pipeline},place-memory{{budget={budget},policy={policy}}}",
                                     kernels="tvm")
    stats = compiled.report.passes[-1].stats
    stream = stream_of(compiled)
    assert stream is not None and stats["streamed"] > 0
    assert_outputs_close(_eager(model, inputs), compiled(*inputs))  # the first call reads wrap-around weights itself
    stream.settle()
    stream.pool.reset_counters()
    assert_outputs_close(_eager(model, inputs), compiled(*inputs))  # a call after a call: the steady state
    stream.settle()
    pool = stream.pool
    assert pool.arena == stats["arena"]  # the pass says whether the chain's regions fit one arena
    if arena:
        assert pool.arena  # the chain's regions fit the pool: one arena, no buffer per copy
    # everything fetched was released; the wrap-around copies wait in the pool for the next call
    assert pool.used == stream.pending_bytes() and (pool.used > 0) == (stats["wrapped"] > 0)
    assert 0 < pool.high_water <= pool.capacity == stats["pool_bytes"]
    assert stats["resident_bytes"] + pool.capacity <= stats["budget"]
    assert pool.bytes_moved == stats["bytes_moved"] and pool.copies == stats["streamed"]
    assert not [f for f in compiled.report.fallbacks if f.op.startswith(("orca.prefetch", "orca.fetch", "orca.release"))]
    # on CPU the placement ops run inside the TVM program: streaming cuts it into no partitions
    assert isinstance(compiled.program, TVMGraphModule) and compiled.report.partitions == 1
    return compiled


@pytest.mark.parametrize("name", zoo.names())
def test_full_budget_keeps_every_weight_resident(name):
    ir, records = _ir(name, "O1,place-memory{budget=100%}")
    assert records[-1].modified is False and records[-1].stats["streamed"] == 0
    assert not [n for n in ir.compute_nodes() if n.target in PLACEMENT_OPS]
    model, inputs = zoo.get(name)
    assert_outputs_close(_eager(model, inputs), ir.run(*inputs)[0] if len(ir.output_values()) == 1 else
                         _unflatten(ir, ir.run(*inputs)))


def _unflatten(ir, flat):
    from torch.utils import _pytree as pytree

    return pytree.tree_unflatten(list(flat), ir.out_spec)


# The models whose minimum budget is over 25% of their weights: the recurrence kernel of layer 0
# reads all of its w_hh at every time step, and it has no split rule.
OVER_25_PERCENT = {"lstm", "gru"}


@pytest.mark.parametrize("percent", [50, 25])
@pytest.mark.parametrize("name", zoo.names())
def test_streamed_weights_match_eager_within_budget(name, percent):
    budget = f"{percent}%"
    try:
        _ir(name, f"O1,place-memory{{budget={budget}}}")
    except PassError as exc:  # one layer's weights are more than the budget: run at the minimum
        assert percent == 25 and name in OVER_25_PERCENT, exc
        assert "not split: %" in str(exc) and "has no split rule" in str(exc)
        budget = str(_minimum_in(exc))
    _check_streamed(name, budget)


@pytest.mark.parametrize("percent", [50, 25])
@pytest.mark.parametrize("name", ["mlp", "transformer", "resnet"])
def test_fused_models_stream_within_budget(name, percent):
    """After O2 the linears and convs are epilogue ops (orca.linear_epilogue, orca.conv_epilogue):
    they split as well, and the models fit 25% as at O1."""
    compiled = _check_streamed(name, f"{percent}%", pipeline="O2")
    if name == "mlp" and percent == 25:  # its 1024x1024 linear+ReLU is 66% of the weights
        assert compiled.report.passes[-1].stats["split"] >= 1


def test_budget_too_small_names_the_minimum():
    with pytest.raises(PassError) as info:
        _ir("transformer", "O1,place-memory{budget=1000,split=false}")
    assert _minimum_in(info.value) == 256000  # the embedding table, read by one op
    assert "too small" in str(info.value) and "%embed_weight" in str(info.value)
    with pytest.raises(PassError) as info:
        _ir("transformer", "O1,place-memory{budget=1000}")
    # split into its 64 columns, the table needs two of them (4,000 bytes each) in the budget
    assert "not split: %embed_weight: one of its 64 cols (4,000 bytes) is more than half" in str(info.value)
    assert _minimum_in(info.value) == 8000
    assert _ir("transformer", "O1,place-memory{budget=8000}")[1][-1].stats["split"] > 1


def test_ir_shows_prefetch_ahead_of_fetch_and_release_after_last_use():
    ir, records = _ir("mlp", "O1,place-memory{budget=50%}", rows=512)  # milliseconds of compute per layer
    text = str(ir)
    assert re.search(r"\{(from=place-memory, )?tier=disk\}", text) and "{tier=ram}" in text
    order = {n: i for i, n in enumerate(ir.graph.nodes)}
    fetches = [n for n in ir.compute_nodes() if n.target is FETCH]
    prefetched = {n.args[0] for n in ir.compute_nodes() if n.target is PREFETCH}
    assert prefetched and prefetched <= {f.args[0] for f in fetches}
    assert records[-1].stats["prefetched"] == len(prefetched)
    ahead = 0
    for fetch in fetches:
        users = [u for u in fetch.users if u.target is not RELEASE]
        release = next(u for u in fetch.users if u.target is RELEASE)
        assert all(order[u] < order[release] for u in users)
        prefetch = next((n for n in ir.compute_nodes() if n.target is PREFETCH and n.args[0] is fetch.args[0]), None)
        if prefetch is None:  # a weight read when its segment starts
            continue
        ahead += any(n.op == "call_function" and n.target not in PLACEMENT_OPS
                     for n in list(ir.graph.nodes)[order[prefetch]:order[fetch]])
    assert ahead > 0  # some copies overlap compute


def _first_fetched_bytes(ir) -> int:
    fetch = next(n for n in ir.compute_nodes() if n.target is FETCH)
    return ir.weight(fetch.args[0]).numel() * 4


def test_pipelining_splits_the_copy_nothing_hides():
    """mlp:512 at 50%: no compute precedes the 2 MB first layer, and the pool has no room to
    prefetch it in the previous call's tail. Without pipelining the call waits for its whole copy;
    with it, the layer is split into blocks whose copies overlap the blocks before them, the first
    block is smaller than the layer, and the estimated stall drops (8.0 to 4.5 ms; the rest is the
    fixed costs of streaming, which both plans pay)."""
    off_ir, off = _ir("mlp", "O1,place-memory{budget=50%,pipeline=false}", rows=512)
    on_ir, on = _ir("mlp", "O1,place-memory{budget=50%}", rows=512)
    off, on = off[-1].stats, on[-1].stats
    assert off["pipelined"] == 0 and on["pipelined"] >= 1
    assert _first_fetched_bytes(off_ir) == 512 * 1024 * 4  # the whole first layer
    assert _first_fetched_bytes(on_ir) < 512 * 1024 * 4
    assert on["est_stall_us"] < 0.7 * off["est_stall_us"]
    assert on["bytes_moved"] <= off["bytes_moved"]  # the same weights, in blocks (a block's bias may stay resident)
    # naive plans have nothing to overlap: never pipelined
    assert _ir("mlp", "O1,place-memory{budget=50%,policy=naive}", rows=512)[1][-1].stats["pipelined"] == 0


@pytest.mark.parametrize("pipeline", ["O1", "O2"])
def test_pipelined_model_matches_eager_on_onednn_with_streamed_weights(pipeline):
    """The pipelined mlp:512 compiles, equals eager, keeps its pool bound, and its streamed linears
    (weights fetched at run time, as aten.linear at O1 and orca.linear_epilogue at O2) can run on
    oneDNN, which takes the weight on every call."""
    model, inputs = zoo.get("mlp")
    inputs = tuple(x.repeat(512 // x.shape[0], 1) for x in inputs)
    compiled = orca_compiler.compile(model, inputs, pipeline=f"{pipeline},place-memory{{budget=50%}}", kernels="mkldnn")
    assert compiled.report.passes[-1].stats["pipelined"] >= 1
    streamed = [k for k in compiled.report.kernels if "_rows" in k.node]
    assert len(streamed) >= 4 and {k.choice for k in streamed} == {"mkldnn"}, compiled.report.kernels
    # its blocks (1 MB and 1.4 MB, in a 3.1 MB pool) fragment: each copy gets a buffer of its own
    _check_streamed("mlp", "50%", pipeline=pipeline, model_inputs=(model, inputs), arena=False)


@pytest.mark.parametrize("mode", ["weight-only", "dynamic"])
def test_quantized_weights_stream_and_match_the_resident_program(mode):
    """Quantized weights stream like float ones. The int8 embedding table, fetched at run time,
    is read by the same TVM gather-and-dequantize kernel as a constant one (no fallback), and the
    streamed program equals the quantized program that keeps every weight resident."""
    model, inputs = zoo.get("transformer")
    resident = orca_compiler.compile(model, inputs, pipeline=f"O2,quantize{{mode={mode}}}")
    streamed = orca_compiler.compile(model, inputs, pipeline=f"O2,quantize{{mode={mode}}},place-memory{{budget=50%}}")
    ir = str(streamed.ir)
    assert re.search(r"%fetch_embed_weight_q8\w* = orca.fetch", ir), "the int8 table is streamed"
    assert streamed.report.fallbacks == []
    torch.testing.assert_close(streamed(*inputs), resident(*inputs), rtol=1e-5, atol=1e-5)
    stream = stream_of(streamed)
    stream.settle()
    stream.pool.reset_counters()
    streamed(*inputs)
    assert stream.pool.bytes_moved == streamed.report.passes[-1].stats["bytes_moved"]
    assert stream.pool.high_water <= stream.pool.capacity


@pytest.mark.parametrize("mode", ["weight-only", "dynamic"])
def test_quantized_linears_split_into_row_blocks_with_their_scales(mode):
    """A quantized linear larger than the budget splits like a float one: int8 rows with their
    per-row scales and bias (a dynamic linear's smoothing factor, per input column, is shared). At
    25% the zoo mlp's quantized 1024x1024 linear does not fit whole; split, the program equals the
    quantized program that keeps every weight resident."""
    from orca_compiler.ops.quant import LINEAR_DQ, LINEAR_WQ

    model, inputs = zoo.get("mlp")
    with pytest.raises(PassError, match="minimum feasible budget"):
        _ir("mlp", f"O1,quantize{{mode={mode}}},place-memory{{budget=25%,split=false}}")
    ir, records = _ir("mlp", f"O1,quantize{{mode={mode}}},place-memory{{budget=25%}}")
    assert records[-1].stats["split"] >= 1
    op = LINEAR_WQ if mode == "weight-only" else LINEAR_DQ
    blocks = [n for n in ir.compute_nodes() if n.target is op and "_rows" in n.name]
    assert len(blocks) >= 2
    for block in blocks:  # each block's scales have one row per row of its int8 weight
        qweight, scales = block.args[1], block.args[2]
        rows = qweight.meta["val"].shape[0]
        assert scales.meta["val"].shape[0] == rows and "_rows" in (qweight.target if qweight.op == "get_attr"
                                                                  else qweight.args[0].target)
    resident = orca_compiler.compile(model, inputs, pipeline=f"O1,quantize{{mode={mode}}}")
    streamed = orca_compiler.compile(model, inputs, pipeline=f"O1,quantize{{mode={mode}}},place-memory{{budget=25%}}")
    torch.testing.assert_close(streamed(*inputs), resident(*inputs), rtol=1e-5, atol=1e-5)
    stream, stats = stream_of(streamed), streamed.report.passes[-1].stats
    stream.settle()
    stream.pool.reset_counters()
    torch.testing.assert_close(streamed(*inputs), resident(*inputs), rtol=1e-5, atol=1e-5)
    stream.settle()
    assert stream.pool.bytes_moved == stats["bytes_moved"] and 0 < stream.pool.high_water <= stream.pool.capacity
    assert stats["resident_bytes"] + stream.pool.capacity <= stats["budget"]


def test_tier_bandwidths_can_be_measured_once_and_remembered(tmp_path, monkeypatch):
    """With ORCA_MEASURE_BANDWIDTH=1 the default CPU tiers take the disk's and RAM's bandwidths
    from a probe run once per machine and recorded in the cache folder; a corrupt record is
    measured afresh; off (the default), the constants."""
    from orca_compiler import bandwidth
    from orca_compiler.placement import DISK_BANDWIDTH, cpu_tiers

    monkeypatch.setenv("ORCA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ORCA_MEASURE_BANDWIDTH", "1")
    first = bandwidth.machine_bandwidths()
    assert first["disk"] > 10e6 and first["ram"] > 100e6  # a probe of 32 MB that really read
    assert (tmp_path / bandwidth.FILE_NAME).exists()
    assert not list(tmp_path.glob("bandwidth-probe-*"))  # the probe file is gone

    def must_not_measure(*args):
        raise AssertionError("measured again")

    monkeypatch.setattr(bandwidth, "measure_disk", must_not_measure)
    assert bandwidth.machine_bandwidths() == first
    assert cpu_tiers()[1].bandwidth == first["disk"] and cpu_tiers()[0].bandwidth == first["ram"]
    (tmp_path / bandwidth.FILE_NAME).write_text("{not json")
    monkeypatch.setattr(bandwidth, "measure_disk", lambda folder: 123e6)
    assert bandwidth.machine_bandwidths()["disk"] == 123e6
    monkeypatch.setenv("ORCA_MEASURE_BANDWIDTH", "0")
    assert bandwidth.machine_bandwidths() == {} and cpu_tiers()[1].bandwidth == DISK_BANDWIDTH


def test_prefetch_is_left_out_where_it_would_overlap_too_little_compute():
    """Where the ops between a prefetch and its fetch take microseconds, a background copy would
    cost more than it hides: the weight is read when its segment starts, as with policy=naive."""
    from orca_compiler.placement import Tier, cpu_tiers, plan_placement

    ir = _ir("transformer", "O1")[0]
    steps, budget = len(ir.compute_nodes()), ir.weight_bytes() // 2
    quick = plan_placement(ir, budget, cpu_tiers(), "prefetch", ops=[1e-7] * steps)
    assert quick.streamed and not quick.prefetch_at
    # milliseconds of compute per op and a 50 MB/s disk (its 262 KB after the embedding wait 5 ms
    # unprefetched): prefetching ahead pays for its hand-offs, contention and cuts
    ram, disk = cpu_tiers()
    slow_disk = [ram, Tier("disk", disk.capacity, 50e6)]
    slow = plan_placement(ir, budget, slow_disk, "prefetch", ops=[1e-3] * steps)
    ahead = [n for n in slow.prefetch_at if n not in slow.wrapped]
    assert ahead and all(slow.prefetch_at[n] < slow.fetch_at[n] for n in ahead)
    # any wrap-around prefetch (none here: the embedding does not fit beside the last segment's weights)
    # is of a first-segment weight, for the next call, after its release in this one
    assert all(slow.fetch_at[n] == 0 and slow.prefetch_at[n] > slow.release_after[n] for n in slow.wrapped)


def test_naive_policy_fetches_when_needed_and_saved_programs_stream_too(tmp_path):
    ir, _ = _ir("transformer", "O1,place-memory{budget=50%,policy=naive}")
    assert not [n for n in ir.compute_nodes() if n.target is PREFETCH]
    compiled = _check_streamed("transformer", "50%", policy="naive")
    compiled.save(tmp_path / "t.orca")
    loaded = orca_compiler.load(tmp_path / "t.orca")
    model, inputs = zoo.get("transformer")
    assert_outputs_close(_eager(model, inputs), loaded(*inputs))
    assert stream_of(loaded).pool.bytes_moved == compiled.report.passes[-1].stats["bytes_moved"]
    # the tiers place-memory homed each weight on come back with the IR (the CUDA runtime reads them)
    assert str(loaded.ir).count("tier=disk}") == str(compiled.ir).count("tier=disk}") > 0


def test_a_linear_larger_than_the_budget_is_split_into_row_blocks():
    model, inputs = zoo.get("mlp")  # its 1024x1024 linear is 66% of the weights
    ir, records = _ir("mlp", "O1,place-memory{budget=25%}")
    assert records[-1].stats["split"] >= 1 and records[-1].stats["min_budget"] <= records[-1].stats["budget"]
    assert_outputs_close(_eager(model, inputs), ir.run(*inputs)[0])
    with pytest.raises(PassError):
        _ir("mlp", "O1,place-memory{budget=25%,split=false}")


class _Wide(torch.nn.Module):
    """An embedding, a linear with a residual add and ReLU, and a conv with a residual add and
    ReLU (at O2: orca.linear_epilogue and orca.conv_epilogue with residuals), each weight most of
    a budget of 4,000 bytes."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(100, 32)  # 12,800 bytes
        self.fc = torch.nn.Linear(32, 32)  # 4,096 + 128
        self.conv = torch.nn.Conv2d(16, 16, 3, padding=1)  # 9,216 + 64

    def forward(self, tokens, image):
        e = self.embed(tokens)
        return torch.relu(self.fc(e) + e), torch.relu(self.conv(image) + image)


@pytest.mark.parametrize("pipeline", ["O1", "O2"])
def test_embedding_linear_epilogue_and_conv_are_split_into_blocks(pipeline):
    from orca_compiler.ops.fused import CONV_EPILOGUE, LINEAR_EPILOGUE

    torch.manual_seed(0)
    model = _Wide().eval()
    inputs = (torch.randint(0, 100, (2, 8)), torch.randn(1, 16, 8, 8))
    ir, records = PassManager(f"{pipeline},place-memory{{budget=4000}}").run(
        capture(model, inputs, keep_op=keep_op_in_capture).ir)
    assert records[-1].stats["split"] == 3
    aten = torch.ops.aten
    linear, conv = (aten.linear.default, aten.conv2d.default) if pipeline == "O1" else (LINEAR_EPILOGUE, CONV_EPILOGUE)
    for target, unit, dim in [(aten.embedding.default, "cols", -1), (linear, "rows", -1), (conv, "channels", 1)]:
        blocks = [n for n in ir.compute_nodes() if n.target is target]
        assert len(blocks) >= 2 and all(f"_{unit}" in n.name for n in blocks)
        cat = next(iter(blocks[0].users))
        assert cat.target is aten.cat.default and cat.args == (blocks, dim)
        if pipeline == "O2" and target is not aten.embedding.default:  # each block adds its slice of the residual
            residuals = [n.args[7 if target is CONV_EPILOGUE else 3] for n in blocks]
            assert all(r.target is aten.slice.Tensor and r.args[1] == dim % r.meta["val"].dim()
                       for r in residuals)
    for w in ir.weights().values():  # a block is at most half of what the budget leaves it
        assert w.numel() * w.element_size() <= 2000
    assert_outputs_close(_eager(model, inputs), _unflatten(ir, ir.run(*inputs)))
    _check_streamed("wide", "4000", pipeline=pipeline, model_inputs=(model, inputs))
    # oneDNN runs the streamed linear blocks on weights fetched at run time (at O2 with the
    # residual add as its binary post-op)
    compiled = orca_compiler.compile(model, inputs, pipeline=f"{pipeline},place-memory{{budget=4000}}", kernels="mkldnn")
    assert_outputs_close(_eager(model, inputs), compiled(*inputs))
    rows = [k for k in compiled.report.kernels if "_rows" in k.node]
    assert len(rows) >= 2 and {k.choice for k in rows} == {"mkldnn"}, compiled.report.kernels


class _Grouped(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(16, 16, 3, padding=1, groups=4)  # 2,304 + 64 bytes
        self.head = torch.nn.Conv2d(16, 8, 1)  # 512 + 32

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


@pytest.mark.parametrize("pipeline", ["O1", "O2"])
def test_a_grouped_conv_is_not_split(pipeline):
    """A block of a grouped conv's output channels would read only its groups' input channels:
    not split, and a budget below its weights is an error that names the minimum and why."""
    torch.manual_seed(0)
    model, inputs = _Grouped().eval(), (torch.randn(1, 16, 8, 8),)
    with pytest.raises(PassError) as info:
        PassManager(f"{pipeline},place-memory{{budget=1500}}").run(capture(model, inputs, keep_op=keep_op_in_capture).ir)
    assert _minimum_in(info.value) == 2304 + 64
    assert "grouped convolution (groups=4)" in str(info.value)
    compiled = _check_streamed("grouped", str(_minimum_in(info.value)), pipeline=pipeline, model_inputs=(model, inputs))
    assert compiled.report.passes[-1].stats["split"] == 0


def test_placement_ops_survive_dce_and_the_pass_does_not_run_twice():
    ir, records = _ir("mlp", "O1,place-memory{budget=70%},dce,place-memory{budget=70%}")
    releases = [n for n in ir.compute_nodes() if n.target is RELEASE]
    assert len(releases) == records[-3].stats["streamed"] > 0
    assert records[-1].modified is False


def test_pool_blocks_an_allocation_until_a_release_makes_room():
    pool = WeightPool(1000)
    first = pool.allocate(torch.empty(160, dtype=torch.float32))  # 640 bytes
    got = []
    thread = threading.Thread(target=lambda: got.append(pool.allocate(torch.empty(120))))  # 480 (a 512-byte region): waits
    thread.start()
    time.sleep(0.05)
    assert not got and pool.used == 640
    pool.free(first)
    thread.join(5)
    assert got and pool.high_water == 640 and pool.used == 512


def test_memory_report_and_cli_show_the_tiers(capsys):
    from orca_compiler.cli import main

    assert main(["memory", "transformer", "--pipeline", "O1", "--budget", "50%"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    moved = re.search(r"([0-9,]+) bytes moved per call", out).group(1)
    assert lines[1].split()[0] == "ram" and lines[2].split()[:2] == ["disk", moved]
    assert lines[1].split()[-1] == moved  # moved into ram from disk
    assert "orca.fetch(" in out and "orca.release(" in out


@pytest.mark.parametrize("policy", ["naive", "prefetch"])
def test_segments_group_the_streamed_weights_in_one_tvm_program(policy):
    """Fetches sit before a segment and releases after it (fewer segments than streamed weights),
    and the placement ops run inside the one TVM program (_check_streamed): no partition per
    segment, as when they ran on the host."""
    compiled = _check_streamed("transformer", "50%", policy=policy)
    stats = compiled.report.passes[-1].stats
    assert 1 < stats["segments"] < stats["streamed"]
    fetches = [n for n in compiled.ir.compute_nodes() if n.target is FETCH]
    assert len(fetches) == stats["streamed"] and len(compiled.program.externs) >= 2 * len(fetches)


def test_segments_respect_their_capacity():
    from orca_compiler.placement import WeightUse, segments

    uses = [WeightUse(None, 64 * units, first, last) for units, first, last in  # 64-byte multiples: no rounding
            [(40, 0, 0), (30, 1, 1), (30, 2, 5), (50, 3, 3), (20, 4, 4), (100, 6, 6)]]
    runs = segments(uses, 7, 6400)
    assert runs == [(0, 2), (3, 5), (6, 6)]
    for first, last in runs:  # each run's weights fit, unless one step alone needs more
        held = sum(w.nbytes for w in uses if w.first <= last and w.last >= first)
        assert held <= 6400 or first == last


def test_cold_reads_come_from_the_weights_file():
    """After the file is dropped from the page cache the copies read the disk; outputs are equal,
    and the stream times the copies and the main thread's waits."""
    model, inputs = zoo.get("resnet")
    compiled = _check_streamed("resnet", "25%")
    stream = stream_of(compiled)
    stream.set_direct_io(False)
    stream.evict()
    stream.reset_counters()
    assert_outputs_close(_eager(model, inputs), compiled(*inputs))
    stream.settle()
    stats = stream.stats()
    assert stats["bytes_moved"] == compiled.report.passes[-1].stats["bytes_moved"]
    assert stats["copy_seconds"] > 0 and stats["wait_seconds"] > 0


def test_the_stream_reads_each_weight_from_its_offset():
    from orca_compiler.lowering.streaming import WeightStream, map_weights

    weights = {"a": torch.randn(1000), "b": torch.arange(24, dtype=torch.int64).reshape(4, 6), "c": torch.randn(3, 7)}
    views, path, offsets = map_weights(weights)
    stream = WeightStream(1 << 20, path, {views[n].data_ptr(): offsets[n] for n in weights})
    stream.evict()
    for name in ("c", "a", "b"):
        stream.prefetch(views[name], [], 0)
    fetched = {name: stream.fetch(views[name], [], 0) for name in weights}
    assert all(torch.equal(fetched[n], weights[n]) for n in weights)
    assert stream.pool.bytes_moved == sum(w.numel() * w.element_size() for w in weights.values())


def test_pool_regions_never_overlap_while_in_use():
    """plan_regions replays a chain of allocations and frees: regions in use at the same time are
    disjoint, 64-byte aligned and inside the capacity; where fragmentation leaves no hole big
    enough, it says so (None) instead of going over."""
    from orca_compiler.pool_regions import _replay_first_fit, plan_regions

    gen = torch.Generator().manual_seed(0)
    for trial in range(50):
        live, events, used = {}, [], 0
        for i in range(40):
            if live and (torch.rand(1, generator=gen).item() < 0.45 or used > 3000):
                key = sorted(live)[int(torch.randint(len(live), (1,), generator=gen))]
                events.append(("free", key, 0))
                used -= live.pop(key)
            else:
                size = int(torch.randint(1, 700, (1,), generator=gen))
                events.append(("alloc", i, size))
                live[i] = -(-size // 64) * 64
                used += live[i]
        regions = plan_regions(events, 6000)
        if regions is None:
            continue
        in_use = {}
        for kind, key, size in events:
            if kind == "free":
                del in_use[key]
                continue
            start, end = regions[key], regions[key] + size
            assert start % 64 == 0 and end <= 6000
            assert all(end <= a or start >= b for a, b in in_use.values())
            in_use[key] = (start, end)
    # replayed first fit, b's hole is too small for d; planned ahead, d goes where b never overlaps it
    fragmented = [("alloc", "a", 64), ("alloc", "b", 64), ("alloc", "c", 64), ("free", "b", 0), ("alloc", "d", 128)]
    assert _replay_first_fit(fragmented, 256) is None
    assert plan_regions(fragmented, 256) == {"d": 0, "a": 128, "b": 0, "c": 192}
    assert plan_regions(fragmented[:-1] + [("alloc", "d", 64)], 256) == {"a": 0, "b": 64, "c": 128, "d": 64}
    assert plan_regions([("alloc", "a", 128), ("alloc", "b", 192)], 256) is None  # more than the pool at once
    # a wrap-around weight (allocated again at the end) keeps one region for both lives: double
    # buffering through a pool with room for two and a half blocks, which first fit fragments
    chain = [("alloc_top", "w0", 1000), ("alloc", "w1", 1000), ("free", "w0", 0), ("alloc", "w2", 1400),
             ("free", "w1", 0), ("alloc", "w3", 1400), ("free", "w2", 0), ("alloc", "w0", 1000), ("free", "w3", 0)]
    assert _replay_first_fit(chain, 3000) is None
    regions = plan_regions(chain, 3000)
    assert regions is not None
    spans = {k: (regions[k], regions[k] + -(-n // 64) * 64) for _, k, n in chain if n}
    for a, b in [("w0", "w1"), ("w1", "w2"), ("w2", "w3"), ("w3", "w0")]:  # the pairs alive at once
        assert spans[a][1] <= spans[b][0] or spans[b][1] <= spans[a][0], (a, b, spans)


@pytest.mark.parametrize("direct", [True, False])
def test_direct_reads_fill_regions_whatever_their_alignment(direct):
    """Weights of odd sizes land in arena regions that start mid-page: the whole pages in the
    middle are read with O_DIRECT (where the file system allows it), head and tail buffered, and
    every byte arrives. With direct reads off, all of it goes through the page cache."""
    from orca_compiler.lowering.streaming import WeightStream, map_weights
    from orca_compiler.pool_regions import _replay_first_fit

    weights = {"a": torch.randn(70000), "b": torch.arange(24, dtype=torch.int64).reshape(4, 6), "c": torch.randn(70, 1111),
               "d": torch.randn(1), "e": torch.randn(3000)}
    events = [("alloc", n, w.numel() * w.element_size()) for n, w in weights.items()]
    regions = _replay_first_fit(events, 1 << 20)  # in the order given: c starts mid-page
    assert regions["c"] % 4096 != 0  # a region that starts mid-page
    views, path, offsets = map_weights(weights, {n: o % 4096 for n, o in regions.items()})
    stream = WeightStream(1 << 20, path, {views[n].data_ptr(): offsets[n] for n in weights},
                          {views[n].data_ptr(): regions[n] for n in weights})
    if direct and not stream.direct_io:
        pytest.skip("this file system refuses O_DIRECT")
    stream.set_direct_io(direct)
    fetched = {name: stream.fetch(views[name], [], 0) for name in weights}
    assert all(torch.equal(fetched[n], weights[n]) for n in weights)
    stats = stream.stats()
    assert stats["arena"] and stats["bytes_moved"] == sum(w.numel() * w.element_size() for w in weights.values())
    if direct:  # a and c are large enough to read directly (but for a head and tail under a page each); b, d, e are not
        large = (70000 + 70 * 1111) * 4
        assert large - 4 * 4096 < stats["direct_bytes"] <= large
    else:
        assert stats["direct_bytes"] == 0


def test_a_streamed_model_reads_its_weights_directly_and_equals_eager():
    model, inputs = zoo.get("mlp")
    compiled = _check_streamed("mlp", "25%")
    stream = stream_of(compiled)
    if not stream.direct_io:
        pytest.skip("this file system refuses O_DIRECT")
    stream.reset_counters()
    compiled(*inputs)
    stream.settle()
    stats = stream.stats()
    assert stats["direct_bytes"] > 0.9 * stats["bytes_moved"]  # MB-sized weights: all but a few heads and tails
    stream.set_direct_io(False)
    stream.reset_counters()
    assert_outputs_close(_eager(model, inputs), compiled(*inputs))
    assert stream.stats()["direct_bytes"] == 0


def test_wrap_around_prefetch_copies_the_first_segment_for_the_next_call():
    """mlp:512 at 25%: the first layer's weight is prefetched during the last segment for the next
    call (the first call reads it itself); each call after a call copies every streamed weight
    once; after a call that raised half-way the next one starts from an empty pool."""
    model, inputs = zoo.get("mlp")
    inputs = tuple(x.repeat(512 // x.shape[0], 1) for x in inputs)
    compiled = orca_compiler.compile(model, inputs, pipeline="O1,place-memory{budget=25%}", kernels="tvm")
    stats = compiled.report.passes[-1].stats
    assert stats["wrapped"] >= 1
    ir = compiled.ir
    order = {n: i for i, n in enumerate(ir.graph.nodes)}
    wrapped = [n for n in ir.compute_nodes() if n.target is PREFETCH
               and any(f.target is FETCH and f.args[0] is n.args[0] and order[f] < order[n] for f in ir.compute_nodes())]
    assert len(wrapped) == stats["wrapped"]
    stream = stream_of(compiled)
    expected = _eager(model, inputs)
    assert_outputs_close(expected, compiled(*inputs))
    stream.settle()
    assert stream.pending_bytes() > 0  # the next call's first weights, already in the pool
    stream.pool.reset_counters()
    assert_outputs_close(expected, compiled(*inputs))
    stream.settle()
    assert stream.pool.copies == stats["streamed"] and stream.pool.high_water <= stream.pool.capacity
    # its nine 0.7 MB blocks alternate between two slots, so the wrap-around weight's region would have
    # to change from call to call: each copy gets its own page-aligned buffer, still read directly
    if stream.direct_io:
        assert stream.pool.direct_bytes > 0.9 * stream.pool.bytes_moved
    stream._complete = False  # as if the call had raised half-way: the next one starts from an empty pool
    stream.pool.reset_counters()
    assert_outputs_close(expected, compiled(*inputs))
    stream.settle()
    assert stream.pool.used == stream.pending_bytes()


def test_switching_read_modes_closes_each_descriptor_once():
    """set_direct_io reopens the direct descriptor; a stream that is collected closes what it has
    open then, never a number it closed before (which another file may have been given since)."""
    import gc
    import os

    from orca_compiler.lowering.streaming import WeightStream, map_weights

    weights = {"a": torch.randn(100000)}
    views, path, offsets = map_weights(weights)
    stream = WeightStream(1 << 20, path, {views["a"].data_ptr(): offsets["a"]})
    for on in (False, True, True, False, True):
        stream.set_direct_io(on)
    assert torch.equal(stream.fetch(views["a"], [], 0), weights["a"])
    owned = stream._open_fds
    assert len(owned) == 1 + stream.direct_io  # the buffered and the current direct descriptor, no earlier one
    other = os.open(path, os.O_RDONLY)  # may get a number the stream used and closed
    del stream
    gc.collect()
    assert not owned  # the finalizer closed what was open
    os.fstat(other)  # still open: nothing closed a number the stream had given back
    os.close(other)
