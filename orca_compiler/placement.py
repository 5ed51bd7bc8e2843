"""Memory tiers and the weight placement plan: which weights stay in the fast tier, which are
streamed from the slow tier, and where their prefetches go.

**Tiers.** A tier is a name, a capacity and a bandwidth (bytes/s, for reading from it into the
fastest tier). On CPU there are two: `ram` (capacity: the RAM available now, psutil) and `disk`
(memory-mapped files; capacity: the free space of the cache folder). Their bandwidths are the
conservative constants DISK_BANDWIDTH and RAM_BANDWIDTH, or with ORCA_MEASURE_BANDWIDTH=1 measured
once per machine and remembered (orca_compiler/bandwidth.py, which says why that is not the
default). On CUDA there are
three (`cuda_tiers`): `device` (GPU memory), `host` (pinned RAM, PCIe bandwidth) and `disk`;
`default_tiers` picks by the compile target. The pipeline option `tiers=ram:16G@20G;disk:1T@1G`
replaces the defaults (capacity@bandwidth per second).

**Homes** (`plan_with_homes`): the plan below decides what is resident in the fastest tier and
what streams; with three tiers each streamed weight is then homed on the middle tier (`host`)
while its capacity holds it, in first-use order (first fit), else on the last (`disk`), and the
estimate is replayed with each weight's home bandwidth. The choice of streamed weights and of the
prefetch steps still assumes the slowest tier's bandwidth for every streamed weight (conservative).

**The plan** (`plan_placement`), for a fast-tier budget B in bytes for the weights:
1. Each weight's live range [first, last] comes from memory_plan.liveness (steps = compute
   nodes; a view of a weight keeps it live).
2. The working set at step s is the weights live at s. If every weight is streamed, the fast tier
   must still hold the largest working set: a budget below it is an error naming that minimum.
3. If all weights fit, all stay resident. Otherwise weights are kept resident greedily, by the
   cost per byte of streaming them (transfer time not hidden behind the compute before their
   first use, from a roofline estimate per op, plus a fixed cost per streamed weight, so small
   weights stay resident first; earliest use first on ties), while the rest
   still fit the pool: the budget left over. With policy=prefetch the pool must also hold the
   next streamed weight beside the working set (double buffering) where the budget allows it.
4. **Segments.** The steps are cut into segments, greedily as long as the streamed weights read
   in one segment fit its share of the pool: all of the pool with policy=naive, half of it with
   policy=prefetch (the other half holds the next segment's weights while they arrive). A
   streamed weight is fetched before the first step of the segment of its first use and released
   after the last step of the segment of its last use. Host ops then sit only between segments,
   so a segment compiles into one TVM partition instead of being cut at every streamed weight
   (each cut costs a call into TVM and the fusion across it).
5. Prefetches are issued in first-use order, at segment starts, each as early as the pool has
   room for it once the releases before it have run, and only where at least
   PREFETCH_MIN_OVERLAP of compute runs between it and its fetch (a shorter overlap hides less
   than the hand-off to the background thread costs). **Wrap-around:** the first segment's
   weights have nothing before them in a call, so they are prefetched for the next call during
   the tail of this one, from the first segment start after their release where the pool has room
   for them until the call ends (inference runs call after call; the first call reads them when
   it starts). Because every prefetch is placed where the
   pool has room, the background copies never wait on the pool in a valid plan; the pool's own
   bound is the safety net. policy=naive issues none: each weight is copied when its segment
   starts, with nothing to overlap. policy=prefetch plans both ways (double-buffered segments,
   and full-pool segments that prefetch where there is room) and keeps the one with the lower
   estimate.

The estimate (`estimated_seconds`) replays the plan on a timeline: ops on the main thread, copies
one at a time on the background thread, a fetch waiting for its copy (or copying itself), plus a
fixed cost per streamed weight and per segment.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .bandwidth import machine_bandwidths
from .errors import PassInputError
from .ir import GraphIR
from .memory_plan import liveness

# Conservative defaults where nothing is measured (bandwidth.py can measure the first two): a
# SATA-class SSD read, one socket's DRAM, and a few cores' fp32 GEMM rate. Only the ratios matter
# to the plan.
DISK_BANDWIDTH = 500e6
RAM_BANDWIDTH = 10e9
COMPUTE_FLOPS = 50e9
PCIE_BANDWIDTH = 12e9


@dataclass(frozen=True)
class Overheads:
    """The fixed costs of streaming, which depend on where the placement ops run: `copy` per
    streamed weight beyond its bytes (its ops, the fetch's hand-off, the kernels reading a run-time
    operand instead of a constant), `segment` per cut between segments; and the share of a
    prefetched copy's time by which it slows the kernels beside it when the weight is under
    DIRECT_MIN_BYTES (`small_contention`; PREFETCH_CONTENTION from that size)."""

    copy: float
    segment: float
    small_contention: float


# On CPU the placement ops are calls from inside the TVM program (lowering/streaming.py). Measured
# with policy=naive on the zoo transformer, resnet and gru_bidir at 50% and 25%: 6-12 us per
# streamed weight beyond its copy, and ~1 us per extra segment (the transformer's 3 and 7
# segments, with the same 10 weights, differed by 3 us). Small weights stay resident first.
VM_OVERHEADS = Overheads(copy=10e-6, segment=2e-6, small_contention=1.0)
# On CUDA they are host ops between TVM partitions, and a segment is a partition: a call into TVM,
# the fusion lost across it and the host ops around it. Measured with that runtime on CPU (session
# 8): zoo resnet at 50% streaming 8 weights ran 0.3 ms slower than streaming 4 (~75 us each), and
# at 25% cut into 12 segments ran 0.36 ms slower than cut into 5.
HOST_OP_OVERHEADS = Overheads(copy=60e-6, segment=50e-6, small_contention=0.3)


def overheads_for(target_kind: str) -> Overheads:
    """The fixed costs of streaming for a compile target ("cpu" or "cuda")."""
    return HOST_OP_OVERHEADS if target_kind == "cuda" else VM_OVERHEADS


# A prefetch pays only if this much compute runs between it and its fetch: handing a copy to the
# background thread and back costs tens of microseconds, and the copy takes a core from the kernels.
PREFETCH_MIN_OVERLAP = 200e-6
# What a prefetch costs the main thread even where its copy is hidden: handing the copy to the
# background thread and taking it back (HANDOFF), and the share of the copy's time by which it slows
# the kernels running beside it (CONTENTION: it takes a core, or the VM's I/O path, from them).
# Measured in tools/bench_placement.py on mlp:512 at 50%, direct reads: the compute beside 6.6 ms
# of background copies took ~2 ms longer than the same blocks' compute without them.
PREFETCH_HANDOFF = 30e-6
PREFETCH_CONTENTION = 0.3
# The CPU runtime reads weights from this size with O_DIRECT (the disk's DMA fills the region);
# smaller ones through the page cache, a memcpy by the background thread on a core the kernels
# would use. Such a copy slows the kernels beside it by about its whole time (VM_OVERHEADS'
# small_contention): in tools/bench_placement.py zoo resnet at 25% with 11 weights of 2-147 KB
# prefetched hid 0.06 ms of its copies' wait and ran 0.33 ms slower than fetching them when
# needed. lowering/streaming.py reads by the same threshold.
DIRECT_MIN_BYTES = 256 << 10
# A streamed weight takes a region of the pool that starts on this boundary (the alignment TVM's
# kernels and torch's allocator give a tensor), so the pool counts its bytes rounded up to it.
POOL_ALIGNMENT = 64


@dataclass(frozen=True)
class Tier:
    name: str
    capacity: int  # bytes
    bandwidth: float  # bytes/s into the fastest tier

    def __str__(self) -> str:
        return f"{self.name}:{self.capacity}@{self.bandwidth:.3g}"


def cpu_tiers() -> list[Tier]:
    """`ram` and `disk` as this machine has them (fastest first): capacities read now; bandwidths
    the constants, or measured once per machine with ORCA_MEASURE_BANDWIDTH=1 (bandwidth.py)."""
    from .cache_dir import cache_dir

    try:
        import psutil

        ram = int(psutil.virtual_memory().available)
    except ImportError:  # psutil is a dependency, but a bare install still plans
        ram = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    disk = shutil.disk_usage(cache_dir()).free
    measured = machine_bandwidths()
    return [Tier("ram", ram, measured.get("ram", RAM_BANDWIDTH)), Tier("disk", int(disk), measured.get("disk", DISK_BANDWIDTH))]


def cuda_tiers(device: int = 0) -> list[Tier]:
    """`device` (GPU memory), `host` (pinned RAM over PCIe) and `disk`: the tier model on CUDA
    (lowering/streaming_cuda.py runs it). Without a GPU here (a CPU-only torch, or compiling on a
    build machine) the device tier's capacity is 0: place-memory then needs an explicit budget."""
    free = torch.cuda.mem_get_info(device)[0] if torch.cuda.is_available() else 0
    ram, disk = cpu_tiers()
    return [Tier("device", int(free), 1e12), Tier("host", ram.capacity, PCIE_BANDWIDTH), disk]


def default_tiers(target_kind: str = "cpu") -> list[Tier]:
    """The tiers of the machine for a compile target kind: `cuda_tiers()` for "cuda", else `cpu_tiers()`."""
    return cuda_tiers() if target_kind == "cuda" else cpu_tiers()


_SIZE = re.compile(r"^\s*([0-9.]+)\s*([kKmMgGtT]?)i?[bB]?\s*$")


def parse_bytes(text: str) -> int:
    """`262144`, `512K`, `1.5G` (powers of 1024) -> bytes."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (write bytes, or a number with K, M, G or T)")
    scale = 1024 ** " KMGT".index(match.group(2).upper() or " ")
    return int(float(match.group(1)) * scale)


def parse_tiers(text: str) -> list[Tier]:
    """`ram:16G@20G;disk:1T@1G` -> tiers, fastest first (bandwidth in bytes/s)."""
    tiers = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        match = re.match(r"^([a-z]+):([^@]+)@(.+)$", part)
        if not match:
            raise ValueError(f"tier {part!r}: expected name:capacity@bandwidth, e.g. disk:1T@1G")
        tiers.append(Tier(match.group(1), parse_bytes(match.group(2)), float(parse_bytes(match.group(3)))))
    if len(tiers) < 2:
        raise ValueError("give at least two tiers, fastest first (e.g. ram:16G@20G;disk:1T@1G)")
    return tiers


def parse_budget(text: str, total: int, fast: Tier) -> int:
    """A budget in bytes, or a percentage of the weights' bytes (`50%`); empty: the fast tier."""
    text = text.strip()
    if not text:
        if fast.capacity <= 0:
            raise PassInputError(f"the {fast.name} tier's capacity is unknown here (0 bytes free: no such device on "
                                 "this machine?); give place-memory a budget (bytes, 512K, or 50%) or tiers=")
        return fast.capacity
    if text.endswith("%"):
        return int(total * float(text[:-1]) / 100)
    return parse_bytes(text)


@dataclass
class WeightUse:
    node: fx.Node  # the get_attr
    nbytes: int
    first: int  # steps: the first and last compute node that read it
    last: int
    streamable: bool = True  # False: no tensor marks the end of its last use; it stays resident

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def footprint(self) -> int:
        """The bytes it takes in the pool: its region, rounded up to POOL_ALIGNMENT."""
        return pool_footprint(self.nbytes)


def pool_footprint(nbytes: int) -> int:
    """Bytes a streamed weight of `nbytes` takes in the pool (the runtime counts the same)."""
    return -(-nbytes // POOL_ALIGNMENT) * POOL_ALIGNMENT


@dataclass
class Placement:
    """The plan: resident and streamed weights, the pool, and where each prefetch is issued
    (`prefetch_at[name]` = the step before which it runs)."""

    tiers: list[Tier]
    budget: int
    policy: str
    weights: list[WeightUse]
    streamed: list[WeightUse] = field(default_factory=list)
    pool_bytes: int = 0
    segments: list[tuple[int, int]] = field(default_factory=list)  # [first, last] steps of each
    fetch_at: dict[str, int] = field(default_factory=dict)  # the step before which it is fetched
    release_after: dict[str, int] = field(default_factory=dict)  # the step after which it is released
    prefetch_at: dict[str, int] = field(default_factory=dict)  # after fetch_at: a prefetch for the next call
    home: dict[str, str] = field(default_factory=dict)  # a streamed weight's tier (empty: the last tier)
    min_budget: int = 0
    op_seconds: list[float] = field(default_factory=list)
    overheads: Overheads = VM_OVERHEADS
    estimated_seconds: float = 0.0  # ops plus the copies that could not be hidden
    compute_seconds: float = 0.0

    @property
    def wrapped(self) -> list[str]:
        """Weights prefetched at the end of a call for the next one (wrap-around)."""
        return [name for name, step in self.prefetch_at.items() if step > self.fetch_at[name]]

    @property
    def resident(self) -> list[WeightUse]:
        names = {w.name for w in self.streamed}
        return [w for w in self.weights if w.name not in names]

    @property
    def resident_bytes(self) -> int:
        return sum(w.nbytes for w in self.resident)

    @property
    def bytes_moved(self) -> int:
        """Bytes copied from the slow tier into the pool per call."""
        return sum(w.nbytes for w in self.streamed)


def tensor_anchor(node: fx.Node) -> fx.Node | None:
    """A tensor that exists only once `node` ran: the node itself, or an element it returns."""
    if isinstance(node.meta.get("val"), torch.Tensor):
        return node
    return next((u for u in node.users if isinstance(u.meta.get("val"), torch.Tensor)), None)


def weight_uses(ir: GraphIR) -> list[WeightUse]:
    """The weights read by compute nodes, with their live steps. A weight whose last reader
    returns a tuple stays live until the first element is taken out (its release waits on that)."""
    nodes = ir.compute_nodes()
    step_of = {n: i for i, n in enumerate(nodes)}
    uses = []
    for t in liveness(ir):
        if t.kind != "weight" or t.last < 0 or t.node.op != "get_attr":
            continue
        anchor = tensor_anchor(nodes[t.last]) if t.last < len(nodes) else None
        last = step_of[anchor] if anchor is not None else len(nodes) - 1
        uses.append(WeightUse(t.node, t.nbytes, t.first, last, streamable=anchor is not None))
    return uses


def working_set(weights: list[WeightUse], steps: int) -> tuple[int, int]:
    """(bytes, step) of the largest set of these weights live at one step."""
    totals = [0] * max(steps, 1)
    for w in weights:
        for s in range(w.first, w.last + 1):
            totals[s] += w.footprint
    best = max(range(len(totals)), key=totals.__getitem__)
    return totals[best], best


def double_buffered_set(weights: list[WeightUse], steps: int) -> int:
    """The largest working set plus the next weight to arrive (what double buffering needs)."""
    order = sorted(weights, key=lambda w: (w.first, w.name))
    need = 0
    for s in range(steps):
        live = sum(w.footprint for w in weights if w.first <= s <= w.last)
        upcoming = next((w.footprint for w in order if w.first > s), 0)
        need = max(need, live + upcoming)
    return need


def op_seconds(ir: GraphIR, flops_per_s: float = COMPUTE_FLOPS, bytes_per_s: float = RAM_BANDWIDTH) -> list[float]:
    """A roofline time per compute node: max(FLOPs / compute rate, bytes read and written / RAM
    bandwidth), FLOPs as torch's FlopCounterMode counts them on the recorded shapes."""
    from torch.utils.flop_counter import FlopCounterMode

    from .memory_plan import _nbytes

    times = []
    for node in ir.compute_nodes():
        flops = 0
        if isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "aten":
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: a.meta["val"])
            counter = FlopCounterMode(display=False)
            try:
                with ir.fake_mode, counter:
                    node.target(*args, **kwargs)
                flops = counter.get_total_flops()
            except Exception:  # an op the counter or fake mode cannot run: count its bytes only
                flops = 0
        moved = sum(_nbytes(a.meta.get("val")) for a in node.all_input_nodes) + _nbytes(node.meta.get("val"))
        times.append(max(flops / flops_per_s, moved / bytes_per_s))
    return times


def _exposed_per_byte(w: WeightUse, ops: list[float], bandwidth: float, copy_overhead: float) -> float:
    """Transfer time of `w` not hidden by the compute before its first use, plus the fixed cost
    of streaming it, per byte."""
    hidden = sum(ops[:w.first])
    return (max(0.0, w.nbytes / bandwidth - hidden) + copy_overhead) / max(w.nbytes, 1)


def _overlapping_bytes(weights: list[WeightUse], start: int, end: int) -> int:
    return sum(w.footprint for w in weights if w.first <= end and w.last >= start)


def segments(streamed: list[WeightUse], steps: int, capacity: int, cuts: frozenset[int] = frozenset()
             ) -> list[tuple[int, int]]:
    """Cut steps 0..steps-1 into runs [first, last], each as long as the streamed weights read in
    it (and those live across it) fit `capacity` bytes, and a new run at every step of `cuts`; a
    run is at least one step long."""
    runs, start = [], 0
    while start < steps:
        end = start
        while end + 1 < steps and end + 1 not in cuts and _overlapping_bytes(streamed, start, end + 1) <= capacity:
            end += 1
        runs.append((start, end))
        start = end + 1
    return runs


def first_use_cuts(streamed: list[WeightUse]) -> frozenset[int]:
    """The steps where a streamed weight is first read. Runs cut there (and only there) hold the
    weights live at their first step, which fit the pool whenever each step's working set does, and
    each weight can then be prefetched behind the compute of every run before its own: the finest
    segmentation prefetching can use (each cut costs the plan's `overheads.segment`)."""
    return frozenset(w.first for w in streamed)


def _segment_of(runs: list[tuple[int, int]], step: int) -> tuple[int, int]:
    return next(r for r in runs if r[0] <= step <= r[1])


def _prefetch_steps(plan: Placement) -> dict[str, int]:
    """Each streamed weight's prefetch step: a segment start, in first-use order, as early as the
    pool has room for it once the releases before that start have run, and before its fetch. A
    weight with less than PREFETCH_MIN_OVERLAP of estimated compute between the two is not
    prefetched: handing its copy to the background thread would cost more than it hides."""
    starts = [first for first, _ in plan.segments]
    at: dict[str, int] = {}
    issued: list[WeightUse] = []
    earliest = 0
    for w in sorted(plan.streamed, key=lambda w: (w.first, w.name)):
        fetch = plan.fetch_at[w.name]
        step = next((b for b in starts if earliest <= b < fetch
                     and sum(o.footprint for o in issued if plan.release_after[o.name] >= b) + w.footprint <= plan.pool_bytes),
                    fetch)
        earliest = step
        issued.append(w)
        if sum(plan.op_seconds[step:fetch]) >= PREFETCH_MIN_OVERLAP:
            at[w.name] = step
    return at


def _wrap_around_steps(plan: Placement, at: dict[str, int]) -> dict[str, int]:
    """Prefetch steps, in the previous call, of the first segment's weights (see the module
    docstring): the first segment start after the weight's release from which the pool has room
    for it to the end of the call, given the prefetches `at`; only where PREFETCH_MIN_OVERLAP of
    compute runs from there to the end."""
    steps = len(plan.op_seconds)
    held = [0] * steps  # the pool's planned bytes at each step
    for w in plan.streamed:
        for s in range(at.get(w.name, plan.fetch_at[w.name]), plan.release_after[w.name] + 1):
            held[s] += w.footprint
    wrap: dict[str, int] = {}
    for w in sorted(plan.streamed, key=lambda w: (w.first, w.name)):
        if plan.fetch_at[w.name] != 0 or w.name in at:
            continue
        step = next((b for b, _ in plan.segments if b > plan.release_after[w.name]
                     and all(held[s] + w.footprint <= plan.pool_bytes for s in range(b, steps))), None)
        if step is None or sum(plan.op_seconds[step:]) < PREFETCH_MIN_OVERLAP:
            continue
        wrap[w.name] = step
        for s in range(step, steps):
            held[s] += w.footprint
    return wrap


def _timeline(plan: Placement, bandwidth: float) -> float:
    """Seconds of one call (in steady state, one call after another): see `stalls`."""
    return _replay(plan, bandwidth)[0]


def stalls(plan: Placement, bandwidth: float) -> dict[str, float]:
    """Seconds the main thread waits at each streamed weight's fetch (copying it itself where it
    was not prefetched), in the plan's timeline at `bandwidth` bytes/s."""
    return _replay(plan, bandwidth)[1]


def _contention(plan: Placement, w: WeightUse) -> float:
    """The share of a prefetched copy's time by which it slows the kernels beside it (Overheads:
    on CPU a weight under DIRECT_MIN_BYTES is a memcpy on a core the kernels use)."""
    return plan.overheads.small_contention if w.nbytes < DIRECT_MIN_BYTES else PREFETCH_CONTENTION


def _replay(plan: Placement, bandwidth: float) -> tuple[float, dict[str, float]]:
    """(seconds of one call, the wait at each fetch): ops one after another; prefetched copies one
    at a time beside them, the others on the main thread at their fetch; a wrap-around copy waited
    for only by what the previous call's tail did not hide; plus the fixed costs of each streamed
    weight, of each cut between segments and of each prefetch (PREFETCH_HANDOFF, and a share of
    the time its copy runs beside the kernels: `_contention`)."""
    clock = 0.0
    copies_free = 0.0
    waits: dict[str, float] = {}
    seconds_of = {w.name: w.nbytes / home_bandwidth(plan, w.name, bandwidth) for w in plan.streamed}
    wrapped = set(plan.wrapped)
    ready = {name: max(0.0, seconds_of[name] - sum(plan.op_seconds[plan.prefetch_at[name]:]))
             for name in wrapped}
    by_prefetch = sorted(((n, s) for n, s in plan.prefetch_at.items() if n not in wrapped), key=lambda item: item[1])
    # a hidden copy is not free: the hand-off, and the kernels slowed beside it
    contention = {w.name: _contention(plan, w) for w in plan.streamed}
    clock += sum(PREFETCH_HANDOFF + contention[name] * (seconds_of[name] - ready[name]) for name in wrapped)
    for step, seconds in enumerate(plan.op_seconds):
        for name, _ in [item for item in by_prefetch if item[1] == step]:
            copies_free = max(clock, copies_free) + seconds_of[name]
            ready[name] = copies_free
            clock += PREFETCH_HANDOFF + contention[name] * seconds_of[name]
        for w in plan.streamed:
            if plan.fetch_at[w.name] == step:
                done = max(clock, ready[w.name]) if w.name in ready else clock + seconds_of[w.name]
                waits[w.name], clock = done - clock, done
        clock += seconds
    return clock + plan.overheads.copy * len(plan.streamed) + plan.overheads.segment * len(plan.segments), waits


def _choose_streamed(weights: list[WeightUse], steps: int, budget: int, ops: list[float], slow: float,
                     double: bool, copy_overhead: float) -> tuple[list[WeightUse], int]:
    """(streamed weights, resident bytes): weights kept resident greedily by the cost per byte of
    streaming them, while the rest still fit (with room for the next weight in flight if `double`)."""
    pinned = [w for w in weights if not w.streamable]
    streamed = [w for w in weights if w.streamable]
    resident_bytes = sum(w.nbytes for w in pinned)
    need = double_buffered_set if double else (lambda ws, n: working_set(ws, n)[0])
    if resident_bytes + need(streamed, steps) > budget:
        raise PassInputError(f"a fast-tier budget of {budget:,} bytes is too small: weights that cannot be streamed "
                             f"need {resident_bytes:,} bytes beside the streamed working set; the minimum feasible "
                             f"budget is {resident_bytes + need(streamed, steps)} bytes")
    for w in sorted(streamed, key=lambda w: (-_exposed_per_byte(w, ops, slow, copy_overhead), w.first, w.name)):
        rest = [o for o in streamed if o is not w]
        # resident bytes are exact; the pool's (need) are counted as regions (footprint)
        if resident_bytes + w.nbytes + need(rest, steps) <= budget:
            streamed = rest
            resident_bytes += w.nbytes
    return sorted(streamed, key=lambda w: (w.first, w.name)), resident_bytes


def _streaming_plan(base: Placement, steps: int, slow: float, double: bool, prefetch: bool,
                    fine: bool = False) -> Placement:
    """`base` with its streamed weights, segments, fetches, releases and prefetches filled in;
    `fine`: a segment at every first use of a streamed weight (first_use_cuts)."""
    plan = dataclasses.replace(base)
    plan.streamed, resident_bytes = _choose_streamed(plan.weights, steps, plan.budget, plan.op_seconds, slow, double,
                                                     plan.overheads.copy)
    plan.pool_bytes = plan.budget - resident_bytes
    plan.segments = segments(plan.streamed, steps, plan.pool_bytes // 2 if double else plan.pool_bytes,
                             first_use_cuts(plan.streamed) if fine else frozenset())
    plan.fetch_at = {w.name: _segment_of(plan.segments, w.first)[0] for w in plan.streamed}
    plan.release_after = {w.name: _segment_of(plan.segments, w.last)[1] for w in plan.streamed}
    plan.prefetch_at = _prefetch_steps(plan) if prefetch else {}
    if prefetch:
        plan.prefetch_at.update(_wrap_around_steps(plan, plan.prefetch_at))
    plan.estimated_seconds = _timeline(plan, slow)
    return plan


def plan_placement(ir: GraphIR, budget: int, tiers: list[Tier], policy: str = "prefetch",
                   ops: list[float] | None = None, overheads: Overheads = VM_OVERHEADS) -> Placement:
    """The plan for a fast-tier budget of `budget` bytes (see the module docstring), estimated
    with the fixed costs `overheads` (overheads_for the target); raises PassInputError naming the
    minimum feasible budget when even one step's weights do not fit."""
    weights = weight_uses(ir)
    steps = len(ir.compute_nodes())
    ops = op_seconds(ir, bytes_per_s=tiers[0].bandwidth if tiers[0].bandwidth < 1e12 else RAM_BANDWIDTH) if ops is None else ops
    slow = tiers[-1].bandwidth
    minimum, at_step = working_set(weights, steps)
    plan = Placement(tiers, budget, policy, weights, min_budget=minimum, op_seconds=ops, overheads=overheads,
                     compute_seconds=sum(ops))
    plan.estimated_seconds = plan.compute_seconds
    total = sum(w.nbytes for w in weights)
    if total <= budget:
        return plan
    if budget < minimum:
        node = ir.compute_nodes()[at_step]
        live = sorted((w for w in weights if w.first <= at_step <= w.last), key=lambda w: -w.nbytes)
        names = ", ".join(f"%{w.name} ({w.footprint:,})" for w in live[:4]) + (", ..." if len(live) > 4 else "")
        raise PassInputError(
            f"a fast-tier budget of {budget:,} bytes is too small: %{node.name} (step {at_step}) needs its "
            f"weights {names} in the fast tier at once; the minimum feasible budget is {minimum} bytes "
            f"({minimum:,})")
    if policy != "prefetch":
        return _streaming_plan(plan, steps, slow, double=False, prefetch=False)
    # prefetch where it pays: double-buffered segments (fewer resident weights), or single ones
    # with prefetches only where the pool has room; long segments (few cuts) or one per first use
    # of a streamed weight (each prefetched behind all the compute before it); whichever the
    # estimate says is faster
    pinned = sum(w.nbytes for w in weights if not w.streamable)
    doubles = [False]
    if pinned + double_buffered_set([w for w in weights if w.streamable], steps) <= budget:
        doubles.append(True)
    options = [_streaming_plan(plan, steps, slow, double=double, prefetch=True, fine=fine)
               for double in doubles for fine in (False, True)]
    return min(options, key=lambda p: p.estimated_seconds)


def placement_chain(plan: Placement) -> list[tuple[int, str, WeightUse]]:
    """The placement ops of `plan` in the order their chain runs: (the step before which the op
    runs, "prefetch" | "fetch" | "release", the weight). At one step: releases, then prefetches,
    then fetches, each in first-use order."""
    events: dict[int, list] = {}
    for w in plan.streamed:
        if w.name in plan.prefetch_at:
            events.setdefault(plan.prefetch_at[w.name], []).append((1, "prefetch", w))
        events.setdefault(plan.fetch_at[w.name], []).append((2, "fetch", w))
        events.setdefault(plan.release_after[w.name] + 1, []).append((0, "release", w))
    return [(step, kind, w) for step in sorted(events)
            for _, kind, w in sorted(events[step], key=lambda e: (e[0], e[2].first, e[2].name))]


def home_bandwidth(plan: Placement, name: str, default: float) -> float:
    """The bandwidth of the tier a streamed weight is homed on (`default` where it has no home)."""
    home = plan.home.get(name)
    return next((t.bandwidth for t in plan.tiers if t.name == home), default)


def assign_homes(plan: Placement) -> dict[str, str]:
    """Each streamed weight's home tier. With three tiers or more, the second (`host` on CUDA) in
    first-use order while its capacity holds it (first fit: a later, smaller weight may still fit
    where a larger one did not), else the last (`disk`); with two tiers, the last."""
    last = plan.tiers[-1].name
    if len(plan.tiers) < 3:
        return {w.name: last for w in plan.streamed}
    middle, room, homes = plan.tiers[1], plan.tiers[1].capacity, {}
    for w in sorted(plan.streamed, key=lambda w: (w.first, w.name)):
        if w.nbytes <= room:
            homes[w.name], room = middle.name, room - w.nbytes
        else:
            homes[w.name] = last
    return homes


def tier_bytes(plan: Placement) -> dict[str, int]:
    """Weight bytes homed on each tier, fastest first: the resident weights on the first, each
    streamed weight on its home (the last tier where it has none). They add up to all weights."""
    totals = {t.name: 0 for t in plan.tiers}
    totals[plan.tiers[0].name] += plan.resident_bytes
    for w in plan.streamed:
        totals[plan.home.get(w.name, plan.tiers[-1].name)] += w.nbytes
    return totals


def plan_with_homes(ir: GraphIR, budget: int, tiers: list[Tier], policy: str = "prefetch",
                    ops: list[float] | None = None, overheads: Overheads = VM_OVERHEADS) -> Placement:
    """plan_placement, then each streamed weight homed (assign_homes) and the estimate replayed
    with each weight's home bandwidth (with two tiers: the same plan and estimate)."""
    plan = plan_placement(ir, budget, tiers, policy, ops, overheads)
    if plan.streamed:
        plan.home = assign_homes(plan)
        if len(tiers) > 2:  # with two, every home is the last tier: the estimate already used it
            plan.estimated_seconds = _timeline(plan, tiers[-1].bandwidth)
    return plan
