"""place-memory on CUDA without a GPU: the three-tier plan (device / host / disk), code generation
of a streamed program for target="cuda" and the clear error when it is called here, and the CUDA
weight stream's bookkeeping (regions, events, the pool bound) against a fake device.

The fake device (FakeDevice) is CPU memory whose copies run at once and whose stream operations
are logged; the end-to-end tests build the program for llvm and bind it to the CUDA stream (what
`streaming.bind` does for a CUDA build), so the real TVM partitions read the fetched weights out of
the fake arena and the outputs are checked against eager. Nothing here runs on a GPU: the torch
CUDA calls themselves (TorchCudaBackend) are exercised only by tools/gpu_check_placement.py.
"""
from __future__ import annotations

import importlib
import re

import pytest
import torch

import orca_compiler
from orca_compiler import zoo
from orca_compiler.capture import capture
from orca_compiler.errors import OrcaError, StreamingError, TargetError
from orca_compiler.lowering import streaming, streaming_cuda
from orca_compiler.lowering.streaming import stream_of
from orca_compiler.lowering.support import keep_op_in_capture
from orca_compiler.ops.placement import FETCH
from orca_compiler.pass_base import PassContext
from orca_compiler.pass_manager import PassManager
from orca_compiler.placement import Tier, parse_tiers, plan_placement, plan_with_homes, tier_bytes
from orca_compiler.pool_regions import plan_regions

from conftest import assert_outputs_close

# device 1 MB (the budget is given), host 300 KB, disk 1 TB: the transformer's streamed weights
# (522,240 bytes at 50%) do not all fit the host
TIERS = "device:1M@1T;host:300K@12G;disk:1T@1G"


def _ir(name, pipeline, target_kind="cpu"):
    model, inputs = zoo.get(name)
    ctx = PassContext(config={"target_kind": target_kind})
    return PassManager(pipeline).run(capture(model, inputs, keep_op=keep_op_in_capture).ir, ctx)


def _eager(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def test_three_tier_plan_homes_weights_on_host_then_disk_by_capacity():
    ir, _ = _ir("transformer", "O1")
    tiers = parse_tiers(TIERS)
    plan = plan_with_homes(ir, ir.weight_bytes() // 2, tiers)
    assert plan.streamed and set(plan.home) == {w.name for w in plan.streamed}
    host = [w for w in plan.streamed if plan.home[w.name] == "host"]
    disk = [w for w in plan.streamed if plan.home[w.name] == "disk"]
    assert host and disk
    assert sum(w.nbytes for w in host) <= tiers[1].capacity
    # first fit in first-use order: every disk-homed weight was too large for what the host had left then
    room = tiers[1].capacity
    for w in sorted(plan.streamed, key=lambda w: (w.first, w.name)):
        assert (plan.home[w.name] == "host") == (w.nbytes <= room)
        room -= w.nbytes if plan.home[w.name] == "host" else 0
    totals = tier_bytes(plan)
    assert list(totals) == ["device", "host", "disk"]
    assert totals["device"] == plan.resident_bytes
    assert totals["host"] == sum(w.nbytes for w in host) and totals["disk"] == sum(w.nbytes for w in disk)
    assert sum(totals.values()) == ir.weight_bytes()
    # two tiers: every streamed weight is homed on the last
    two = plan_with_homes(ir, ir.weight_bytes() // 2, parse_tiers("ram:1M@10G;disk:1T@1G"))
    assert set(two.home.values()) == {"disk"} and tier_bytes(two)["disk"] == two.bytes_moved


def test_the_estimate_uses_each_homes_bandwidth():
    ir, _ = _ir("transformer", "O1")
    steps, budget = len(ir.compute_nodes()), ir.weight_bytes() // 2
    ops = [1e-6] * steps  # too short to prefetch behind: every copy is on the critical path
    slow = parse_tiers("device:1M@1T;host:1T@1G;disk:1T@1G")  # host as slow as disk
    fast = parse_tiers("device:1M@1T;host:1T@100G;disk:1T@1G")
    a, b = plan_with_homes(ir, budget, slow, ops=ops), plan_with_homes(ir, budget, fast, ops=ops)
    assert set(a.home.values()) == set(b.home.values()) == {"host"}  # 1 TB of host holds all of them
    assert [w.name for w in a.streamed] == [w.name for w in b.streamed]
    moved = a.bytes_moved
    # the same copies at 1 GiB/s and at 100 GiB/s: the difference is the transfer time saved
    saved = moved / slow[1].bandwidth - moved / fast[1].bandwidth
    assert a.estimated_seconds - b.estimated_seconds == pytest.approx(saved, rel=1e-6)
    # with every weight on the last tier the estimate is plan_placement's own (two-tier behaviour)
    tight = parse_tiers("device:1M@1T;host:1@100G;disk:1T@1G")
    c = plan_with_homes(ir, budget, tight, ops=ops)
    assert set(c.home.values()) == {"disk"}
    assert c.estimated_seconds == pytest.approx(plan_placement(ir, budget, tight, ops=ops).estimated_seconds)


def test_ir_annotations_and_memory_report_show_three_tiers():
    from orca_compiler.memory_plan import memory_report

    ir, records = _ir("transformer", f"O1,place-memory{{budget=50%,tiers={TIERS}}}")
    stats = records[-1].stats
    text = str(ir)
    streamed = {n.args[0] for n in ir.compute_nodes() if n.target is FETCH}
    homes = {n.name: n.meta["orca_annotations"]["tier"] for n in streamed}
    assert set(homes.values()) == {"host", "disk"}
    for name, tier in homes.items():
        assert re.search(rf"%{name} = get_attr\[.*\{{tier={tier}\}}", text) or f"{{tier={tier}}}" in text
    # a weight a split created prints {from=place-memory, tier=...}
    assert text.count("tier=host}") == sum(t == "host" for t in homes.values())
    assert text.count("tier=disk}") == sum(t == "disk" for t in homes.values())
    assert "{tier=device}" in text and "{tier=ram}" not in text
    report = memory_report(ir).splitlines()
    rows = {line.split()[0]: line.split() for line in report[1:4]}
    assert list(rows) == ["device", "host", "disk"]
    assert int(rows["host"][1].replace(",", "")) == stats["tier_host"] > 0
    assert int(rows["disk"][1].replace(",", "")) == stats["tier_disk"] > 0
    assert int(rows["device"][-1].replace(",", "")) == stats["tier_host"] + stats["tier_disk"] == stats["bytes_moved"]
    assert "pool (device," in report[4]


def test_the_pass_plans_with_the_targets_tiers():
    ir, records = _ir("transformer", "O1,place-memory{budget=50%}", target_kind="cuda")
    assert "{tier=device}" in str(ir) and "{tier=ram}" not in str(ir)
    stats = records[-1].stats
    assert {"tier_device", "tier_host", "tier_disk"} <= set(stats)
    ir, records = _ir("transformer", "O1,place-memory{budget=50%}")  # no target kind: CPU
    assert {"tier_ram", "tier_disk"} <= set(records[-1].stats) and "{tier=disk}" in str(ir)
    ir, records = _ir("transformer", "O1,place-memory{budget=50%,tiers=ram:1M@10G;disk:1T@1G}", target_kind="cuda")
    assert "tier_ram" in records[-1].stats  # an explicit tiers= overrides the target's


def test_cuda_tiers_without_a_gpu_need_a_budget():
    from orca_compiler.placement import cuda_tiers

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    device, host, disk = cuda_tiers()
    assert (device.name, device.capacity, host.name, disk.name) == ("device", 0, "host", "disk")
    assert host.capacity > 0 and disk.capacity > 0
    with pytest.raises(OrcaError, match="device tier's capacity is unknown here.*give place-memory a budget"):
        _ir("transformer", "O1,place-memory", target_kind="cuda")


@pytest.fixture(scope="module")
def cuda_streamed():
    model, inputs = zoo.get("transformer")
    compiled = orca_compiler.compile(model, inputs, target="cuda",
                                     pipeline=f"O1,place-memory{{budget=50%,tiers={TIERS}}}")
    return compiled


def test_a_streamed_model_compiles_for_cuda_and_calling_it_without_a_gpu_is_a_clear_error(cuda_streamed):
    from orca_compiler.lowering.relax_build import cuda_source

    stats = cuda_streamed.report.passes[-1].stats
    assert stats["streamed"] > 0 and stats["tier_host"] > 0 and stats["tier_disk"] > 0
    assert cuda_streamed.report.target == "cuda" and cuda_streamed.report.fallbacks == []
    assert "__global__" in "".join(cuda_source(e) for e in cuda_streamed.executables)
    stream = stream_of(cuda_streamed)
    assert isinstance(stream, streaming_cuda.CudaWeightStream) and stream.arena
    assert stream._backend is None  # nothing touched torch.cuda at compile time
    assert sorted(stream.homes.items()) == sorted(
        (n.args[0].name, n.args[0].meta["orca_annotations"]["tier"]) for n in cuda_streamed.ir.compute_nodes()
        if n.target is FETCH)
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    _, inputs = zoo.get("transformer")
    with pytest.raises(TargetError, match="no cuda device"):
        cuda_streamed(*inputs)


class FakeDevice:
    """CPU memory standing in for the device: copies run at once; events are numbered and every
    stream operation is logged in order (the order the host issues them)."""

    def __init__(self):
        self.log: list[tuple] = []
        self._events = 0

    def _event(self, kind):
        self._events += 1
        return (kind, self._events)

    def device_buffer(self, nbytes):
        return torch.full((max(nbytes, 1),), 0xAB, dtype=torch.uint8)  # garbage until copied

    def pinned_buffer(self, nbytes):
        raw = torch.empty(nbytes + 4096, dtype=torch.uint8)
        start = -raw.data_ptr() % 4096
        return raw[start:start + nbytes]

    def pin(self, tensor):
        self.log.append(("pin",))
        return tensor.clone()

    def copy(self, dst, src, after):
        dst.copy_(src)
        event = self._event("copy")
        self.log.append(("copy", dst.data_ptr(), dst.numel(), tuple(after), event))
        return event

    def keep_for_copy(self, buffer):
        self.log.append(("keep", buffer.data_ptr()))

    def record(self):
        event = self._event("compute")
        self.log.append(("record", event))
        return event

    def wait(self, event):
        self.log.append(("wait", event))

    def synchronize(self, event):
        self.log.append(("sync", event))


def _bind_as_cuda(monkeypatch, model, inputs, pipeline):
    """Compile for llvm but bind the streamed program as streaming.bind does for a CUDA build,
    against a FakeDevice; log the stream's fetches and releases beside the device's operations."""
    device = FakeDevice()
    # as for a CUDA target: the placement ops stay host ops between partitions, bound as for CUDA
    monkeypatch.setattr(importlib.import_module("orca_compiler.lowering.lower"), "vm_op_impl", lambda node, kind: None)
    monkeypatch.setattr(streaming, "program_kinds", lambda parent: {"cuda"})
    monkeypatch.setattr(streaming_cuda, "make_backend", lambda: device)
    cls = streaming_cuda.CudaWeightStream
    for op in ("fetch", "release", "_copy"):  # markers in the device log, before the stream's own entries
        def marked(self, name, *args, _real=getattr(cls, op), _op=op):
            device.log.append((_op, name))
            return _real(self, name, *args)
        monkeypatch.setattr(cls, op, marked)  # before compiling: the nodes are bound to these
    compiled = orca_compiler.compile(model, inputs, pipeline=pipeline, kernels="tvm", cache="off", eager_guard=False)
    stream = stream_of(compiled)
    assert isinstance(stream, cls)
    return compiled, stream, device


def _check_event_order(stream, device):
    """Every fetch makes the compute stream wait on its copy's event; every copy into bytes an
    earlier weight held is ordered (itself, or an earlier copy on the one side stream) after that
    weight's release event; every release records one."""
    base = stream._arena.data_ptr()
    tenant = {}  # arena byte range -> the weight whose copy wrote it last: (start, end, name, copy event)
    last_copy = {}  # name -> event of its latest copy
    released_at = {}  # name -> release event (recorded on the compute stream)
    waited_by_copies = set()  # events the side stream waited on so far
    pending_release = pending_fetch = copying = None
    checked = 0
    for entry in device.log:
        kind = entry[0]
        if kind == "copy":
            _, ptr, nbytes, after, event = entry
            start = ptr - base
            name = copying
            waited_by_copies |= set(after)
            for (a, b), (prev, _) in list(tenant.items()):
                if a < start + nbytes and start < b:  # an earlier tenant of these bytes (itself, a call ago)
                    assert prev in released_at, f"{name} copied over {prev}, which was never released"
                    assert released_at[prev] in waited_by_copies, f"{name} copied over {prev} before its release"
                    del tenant[(a, b)]
                    checked += 1
            tenant[(start, start + nbytes)] = (name, event)
            last_copy[name] = event
        elif kind == "_copy":
            copying = entry[1]
        elif kind == "fetch":
            assert pending_fetch is None, f"the fetch of {pending_fetch} did not make the compute stream wait"
            pending_fetch = entry[1]
        elif kind == "wait":
            assert entry[1] == last_copy[pending_fetch], f"the fetch of {pending_fetch} waited on another copy"
            pending_fetch = None
        elif kind == "release":
            pending_release = entry[1]
        elif kind == "record" and pending_release is not None:
            released_at[pending_release] = entry[1]
            pending_release = None
    assert pending_fetch is None and not pending_release
    return checked


@pytest.mark.parametrize("name,budget,host", [("transformer", "50%", "64K"), ("resnet", "25%", "64K"),
                                              ("mlp", "25%", "2M")])
def test_cuda_stream_bookkeeping_against_a_fake_device(monkeypatch, name, budget, host):
    """Outputs equal eager over calls; the pool's bound, bytes and copies match the plan; host
    weights are pinned once, disk ones staged from the file; copies and fetches are ordered by
    events (_check_event_order)."""
    model, inputs = zoo.get(name)
    compiled, stream, device = _bind_as_cuda(
        monkeypatch, model, inputs, f"O1,place-memory{{budget={budget},tiers=device:1T@1T;host:{host}@12G;disk:1T@1G}}")
    stats = compiled.report.passes[-1].stats
    assert stats["tier_host"] > 0 and stats["tier_disk"] > 0
    expected = _eager(model, inputs)
    for _ in range(3):  # the first call, then calls after a call (wrap-around copies in flight between them)
        stream.reset_counters()
        assert_outputs_close(expected, compiled(*inputs))
        stream.settle()
        pool = stream.pool
        assert 0 < pool.high_water <= pool.capacity == stats["pool_bytes"]
        assert pool.used == stream.pending_bytes() and (pool.used > 0) == (stats["wrapped"] > 0)
    assert pool.bytes_moved == stats["bytes_moved"] and pool.copies == stats["streamed"]
    assert stream.stats()["arena"] and stream.stats()["device"] == "cuda"
    # host-homed weights were pinned once, and the program holds the pinned tensors
    assert sum(e[0] == "pin" for e in device.log) == sum(h == "host" for h in stream.homes.values())
    # disk-homed weights come from the weights file (through the staging buffer)
    assert stream._staging is not None and set(stream._offsets) == {n for n, h in stream.homes.items() if h == "disk"}
    assert _check_event_order(stream, device) > 0  # some region was reused, and only after its release


def test_a_call_that_raised_half_way_leaves_no_copy_racing_its_kernels(monkeypatch):
    model, inputs = zoo.get("transformer")
    compiled, stream, device = _bind_as_cuda(monkeypatch, model, inputs, f"O1,place-memory{{budget=50%,tiers={TIERS}}}")
    expected = _eager(model, inputs)
    assert_outputs_close(expected, compiled(*inputs))
    stream._complete = False  # as if the last call had raised after some fetches
    stream._held["stale"] = None
    mark = len(device.log)
    assert_outputs_close(expected, compiled(*inputs))
    fence = next(e[1] for e in device.log[mark:] if e[0] == "record")  # recorded before anything else
    first_copy = next(e for e in device.log[mark:] if e[0] == "copy")
    assert fence in first_copy[3]  # the next copy into the arena waits for the failed call's kernels
    assert stream.pool.used == stream.pending_bytes()


def test_the_device_pool_never_goes_over_its_capacity(monkeypatch):
    device = FakeDevice()
    monkeypatch.setattr(streaming_cuda, "make_backend", lambda: device)
    weights = {"a": torch.randn(100), "b": torch.randn(100), "c": torch.randn(20)}
    regions = plan_regions([("alloc", "a", 400), ("alloc", "b", 400), ("free", "a", 0),
                                      ("alloc", "c", 80)], 1024)
    stream = streaming_cuda.CudaWeightStream(1024, weights, {n: "host" for n in weights}, regions)
    stream._start()
    stream.prefetch("a", [], 1024)
    stream.prefetch("b", [], 1024)
    assert stream.pool.used == 896 and stream.pool.high_water == 896  # two 448-byte regions (64-aligned)
    with pytest.raises(StreamingError, match="over its capacity"):
        stream.prefetch("a", [], 1024)  # a third 448-byte region does not fit 1,024 bytes
    assert stream.pool.used == 896
    fetched = stream.fetch("a", [], 1024)
    assert torch.equal(fetched, weights["a"])
    stream.release("a", fetched, [])
    stream.prefetch("c", [], 1024)  # into a's bytes: after a's release
    copy_c = next(e for e in reversed(device.log) if e[0] == "copy")
    release_a = next(e[1] for e in reversed(device.log) if e[0] == "record")
    assert copy_c[1] == stream._arena.data_ptr() + regions["c"] and regions["c"] == regions["a"]
    assert release_a in copy_c[3]
    assert torch.equal(stream.fetch("c", [], 1024), weights["c"])


def test_without_regions_each_copy_gets_its_own_device_buffer(monkeypatch):
    """Where the chain's regions do not fit (regions=None), a copy goes to a buffer of its own
    (kept from reuse until the side stream ran it), disk-homed weights are staged per copy, and
    the byte bound holds as with the arena."""
    device = FakeDevice()
    monkeypatch.setattr(streaming_cuda, "make_backend", lambda: device)
    weights = {"a": torch.randn(70000), "b": torch.arange(24, dtype=torch.int64).reshape(4, 6)}
    views, path, offsets = streaming.map_weights(weights)
    stream = streaming_cuda.CudaWeightStream(1 << 20, views, {"a": "disk", "b": "host"}, None, path, offsets)
    stream._start()
    assert not stream.arena and stream._arena is None and stream._staging is None
    stream.prefetch("a", [], 0)
    fetched = {name: stream.fetch(name, [], 0) for name in ("a", "b")}
    assert all(torch.equal(fetched[n], weights[n]) for n in weights)
    assert sum(e[0] == "keep" for e in device.log) == 2  # both buffers held for the side stream
    assert stream.pool.used == sum(streaming.pool_footprint(w.numel() * w.element_size()) for w in weights.values())
    for name in ("a", "b"):
        stream.release(name, fetched[name], [])
    assert stream.pool.used == 0 and stream.stats()["bytes_moved"] == 70000 * 4 + 24 * 8
    assert stream.stats()["arena"] is False
