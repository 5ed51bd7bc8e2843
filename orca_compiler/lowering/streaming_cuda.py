"""The run-time side of place-memory on CUDA: streamed weights homed in pinned host memory or in
the memory-mapped weights file, copied into a bounded device arena on a side stream, released
after their last use. NOT RUN ON A GPU YET: written and tested on a machine without one (the
bookkeeping runs in tests/test_placement_cuda.py against a fake device); tools/gpu_check_placement.py
is the check to run where a GPU is lent.

`streaming.bind` hands a program over here when its TVM partitions are built for CUDA. `bind_cuda`:
1. plans each streamed weight's region in the arena with `pool_regions.plan_regions` (from the
   placement chain, as on CPU) and reads each weight's home from its get_attr's
   `tier` annotation (place-memory: `host` or `disk`, kept when a program is saved; a weight
   without one is homed on disk);
2. writes the disk-homed weights into one file (`streaming.map_weights`) and puts the mapped
   tensors in place of them, and the host-homed ones as CPU tensors (moved off the device if the
   model was there), in the program and in the IR;
3. points the placement nodes at a `CudaWeightStream`, keyed by weight name.

**Nothing touches torch.cuda before the first call** (`CudaWeightStream._start`), so a program
compiles for CUDA on a machine without a GPU; calling it there raises TargetError. At the first
call the stream allocates the arena (`torch.empty(capacity, uint8, device="cuda")`), pins the
host-homed weights (`.pin_memory()`, swapped into the program so no unpinned copy stays) and,
where weights are disk-homed, a pinned staging buffer of the arena's size whose byte `i` stages
arena byte `i`.

**Ordering without host synchronization.** All copies go on one side `torch.cuda.Stream`, with
`non_blocking=True` from pinned memory:
- a copy first makes the side stream wait on the release events of every earlier tenant of its
  bytes in the arena (recorded on the compute stream when they were released), so it never
  overwrites bytes a kernel still reads; once the side stream waited on an event, every later copy
  (same stream) is ordered after it, so the event is dropped;
- a fetch makes the compute stream (torch's current stream) wait on its copy's event;
- a release records an event on the compute stream for the region's bytes.
The host waits only before a disk read overwrites staging bytes whose previous copy to the device
may not have finished (in practice long done: that copy was fetched and its region released).
A disk-homed weight is read on the calling thread (O_DIRECT where possible, `WeightFile.read_at`)
while the GPU runs the kernels already queued; there is no background reader thread (not done).
The compute stream is torch's current stream, which is the stream TVM launches its kernels on only
while both are the default stream (torch's default; TVM's unless set with tvm_ffi.use_torch_stream).

**The bound.** Bytes are counted as on CPU (`POOL_ALIGNMENT` regions, high-water mark); the
stream runs on one thread, so a copy that would take the pool over its capacity cannot wait for
room and raises StreamingError (a valid plan never does). Where the chain's regions do not fit
(fragmentation, a wrap-around slot that would alternate), each copy gets its own device buffer
from torch's caching allocator instead (`record_stream` orders its reuse) and `stats()["arena"]`
is false. `stats()` has the CPU stream's keys; `copy_seconds` is host time spent issuing copies and
reading disk-homed weights (device copy time is not measured), `wait_seconds` host time in fetches.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..errors import StreamingError, TargetError
from ..ops.placement import FETCH, PREFETCH, RELEASE
from ..placement import pool_footprint
from ..pool_regions import placement_events, plan_regions
from .streaming import (PAGE, WeightFile, WeightPool, _nbytes, _remove, _swap_buffer, attach, map_weights,
                        pool_and_weights)

_TOKEN = torch.empty(0, dtype=torch.uint8)


class TorchCudaBackend:
    """The device side of a CudaWeightStream, through torch's CUDA API (tests substitute a fake
    with the same methods). Created at the stream's first call: raises TargetError without a GPU."""

    def __init__(self):
        if not torch.cuda.is_available():
            raise TargetError("this program was built for cuda but this machine has no cuda device "
                              "(its streamed weights need one: torch.cuda is not available)")
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.copy_stream = torch.cuda.Stream(self.device)

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device)

    def pinned_buffer(self, nbytes: int) -> torch.Tensor:
        """Page-aligned pinned bytes (the staging buffer: O_DIRECT reads need the alignment)."""
        raw = torch.empty(nbytes + PAGE, dtype=torch.uint8, pin_memory=True)
        start = -raw.data_ptr() % PAGE
        return raw[start:start + nbytes]

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory()

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: list) -> object:
        """Copy on the side stream once the events `after` have happened; returns its event."""
        with torch.cuda.stream(self.copy_stream):
            for event in after:
                self.copy_stream.wait_event(event)
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return event

    def keep_for_copy(self, buffer: torch.Tensor) -> None:
        """A buffer allocated on the compute stream and written by the side stream: the caching
        allocator must not reuse it before that copy ran."""
        buffer.record_stream(self.copy_stream)

    def record(self) -> object:
        """An event on the compute stream (torch's current stream)."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def wait(self, event) -> None:
        """The compute stream waits for `event` (the host does not)."""
        torch.cuda.current_stream(self.device).wait_event(event)

    def synchronize(self, event) -> None:
        event.synchronize()


# What builds the backend at the first call (tests replace it with a fake device).
make_backend = TorchCudaBackend


@dataclass
class _Copy:
    name: str
    tensor: torch.Tensor  # its bytes in the arena (or its own device buffer)
    event: object  # the side stream's event after the copy
    region: tuple[int, int] | None  # [start, end) in the arena


class CudaWeightStream(WeightFile):
    """The placement ops of one CUDA program: a device arena, a side stream and the copies in flight."""

    def __init__(self, capacity: int, weights: dict[str, torch.Tensor], homes: dict[str, str],
                 regions: dict[str, int] | None, path: str | None = None, offsets: dict[str, int] | None = None,
                 owners: tuple = ()):
        """`weights`: each streamed weight's CPU tensor (host-homed: to be pinned; disk-homed: the
        mapped view); `homes`: name -> "host" | "disk"; `regions`: name -> arena offset
        (plan_regions; None: a device buffer per copy); `offsets`: a disk-homed weight's byte
        offset in the file at `path`; `owners`: modules whose attribute of a host-homed weight's
        name is swapped for the pinned tensor."""
        super().__init__(path, offsets)
        self.pool = WeightPool(capacity)  # the byte counters only: the bytes are on the device
        self.regions = regions
        self.homes = dict(homes)
        self.wait_seconds = 0.0
        self._weights = dict(weights)
        self._owners = [weakref.ref(m) for m in owners]
        self._backend = None
        self._arena = self._staging = None
        self._released: list[tuple[int, int, object]] = []  # arena bytes a kernel may still read: [start, end), event
        self._staged: list[tuple[int, int, object]] = []  # staging bytes a copy may still read
        self._pending: dict[str, _Copy] = {}  # prefetched, not fetched yet
        self._held: dict[str, _Copy] = {}  # fetched, not released yet
        self._complete = False

    @property
    def arena(self) -> bool:
        return bool(self.regions)

    def _start(self) -> None:
        """At the first call: the device, the arena, pinned host weights and staging memory."""
        if self._backend is not None:
            return
        backend = make_backend()
        if self.regions:
            self._arena = backend.device_buffer(self.pool.capacity)
        for name, home in self.homes.items():
            if home == "host":
                pinned = backend.pin(self._weights[name])
                self._weights[name] = pinned
                for ref in self._owners:  # no unpinned copy stays behind
                    owner = ref()
                    if owner is not None and isinstance(getattr(owner, name, None), torch.Tensor):
                        _swap_buffer(owner, name, pinned)
        if "disk" in self.homes.values() and self.regions:
            self._staging = backend.pinned_buffer(self.pool.capacity)
        self._backend = backend

    def _begin(self) -> None:
        """The first placement op of a call: after a complete call keep its wrap-around copies;
        else (a call that raised half-way) drop what it left, its bytes still possibly read by its
        kernels: the next copies into the arena wait for the compute stream to get past them."""
        self._start()
        complete, self._complete = self._complete, False
        if complete or (not self._pending and not self._held):
            return
        self._pending.clear()
        self._held.clear()
        self._released.append((0, self.pool.capacity, self._backend.record()))
        with self.pool._cond:
            self.pool.used = 0

    def _take(self, nbytes: int) -> None:
        size = pool_footprint(nbytes)
        with self.pool._cond:
            if self.pool.used + size > self.pool.capacity:
                raise StreamingError(f"a {size:,}-byte copy would take the device pool over its capacity "
                                     f"({self.pool.used:,} of {self.pool.capacity:,} bytes in use): the placement "
                                     "chain is not the plan's")
            self.pool.used += size
            self.pool.high_water = max(self.pool.high_water, self.pool.used)

    def _copy(self, name: str) -> _Copy:
        """Issue the copy of `name` into its region (or a buffer of its own) on the side stream."""
        source = self._weights[name]
        nbytes = _nbytes(source)
        self._take(nbytes)
        start = time.perf_counter()
        backend = self._backend
        offset = self.regions.get(name) if self.regions else None
        if offset is None:
            region = None
            target = backend.device_buffer(nbytes)
            backend.keep_for_copy(target)
            after = []
        else:
            region = (offset, offset + pool_footprint(nbytes))
            target = self._arena[offset:offset + nbytes]
            after = _take_overlapping(self._released, region)
        direct = 0
        if self.homes.get(name) == "disk":
            if region is None:
                staging = backend.pinned_buffer(nbytes)  # torch keeps it until the copy that reads it ran
            else:
                for event in _take_overlapping(self._staged, region):
                    backend.synchronize(event)  # the host is about to overwrite bytes a copy may still read
                staging = self._staging[offset:offset + nbytes]
            direct = self.read_at(self._offsets[name], staging)
            source = staging
        event = backend.copy(target, source.reshape(-1).view(torch.uint8), after)
        if region is not None and self.homes.get(name) == "disk":
            self._staged.append((*region, event))
        with self.pool._cond:
            self.pool.bytes_moved += nbytes
            self.pool.direct_bytes += direct
            self.pool.copies += 1
            self.pool.copy_seconds += time.perf_counter() - start
        return _Copy(name, target, event, region)

    def prefetch(self, name: str, deps, pool_bytes: int) -> torch.Tensor:
        self._pending[name] = self._copy(name)
        return _TOKEN

    def fetch(self, name: str, deps, pool_bytes: int) -> torch.Tensor:
        start = time.perf_counter()
        copy = self._pending.pop(name, None) or self._copy(name)
        self._backend.wait(copy.event)
        self._held[name] = copy
        self.wait_seconds += time.perf_counter() - start
        like = self._weights[name]
        return copy.tensor.view(like.dtype).reshape(like.shape)

    def release(self, name: str, fetched, deps) -> torch.Tensor:
        copy = self._held.pop(name)
        if copy.region is not None:
            self._released.append((*copy.region, self._backend.record()))
        with self.pool._cond:
            self.pool.used -= pool_footprint(_nbytes(copy.tensor))
        return _TOKEN

    def begin_prefetch(self, name: str, deps, pool_bytes: int) -> torch.Tensor:
        self._begin()
        return self.prefetch(name, deps, pool_bytes)

    def begin_fetch(self, name: str, deps, pool_bytes: int) -> torch.Tensor:
        self._begin()
        return self.fetch(name, deps, pool_bytes)

    def end_prefetch(self, name: str, deps, pool_bytes: int) -> torch.Tensor:
        token = self.prefetch(name, deps, pool_bytes)
        self._complete = True
        return token

    def end_release(self, name: str, fetched, deps) -> torch.Tensor:
        token = self.release(name, fetched, deps)
        self._complete = True
        return token

    def settle(self) -> None:
        """Wait (on the host) for the copies in flight; for tests and counters."""
        for copy in self._pending.values():
            self._backend.synchronize(copy.event)

    def pending_bytes(self) -> int:
        """Pool bytes held by copies that no fetch has taken yet (the wrap-around ones)."""
        return sum(pool_footprint(_nbytes(c.tensor)) for c in self._pending.values())

    def reset_counters(self) -> None:
        self.pool.reset_counters()
        self.wait_seconds = 0.0

    def stats(self) -> dict:
        """The CPU stream's keys (WeightStream.stats), `arena` meaning the device arena."""
        return {**self.pool.stats(), "arena": self.arena, "wait_seconds": self.wait_seconds,
                "direct_io": self.direct_io, "device": "cuda"}


def _take_overlapping(entries: list[tuple[int, int, object]], region: tuple[int, int]) -> list:
    """Remove and return the events of `entries` whose [start, end) overlaps `region`."""
    hits = [e for e in entries if e[0] < region[1] and region[0] < e[1]]
    entries[:] = [e for e in entries if not (e[0] < region[1] and region[0] < e[1])]
    return [event for _, _, event in hits]


def bind_cuda(parent: fx.GraphModule, source: fx.GraphModule | None, nodes: list[fx.Node]) -> None:
    """Make `parent`'s placement nodes run against a CudaWeightStream (see the module docstring);
    `nodes` are its placement nodes in chain order."""
    capacity, names = pool_and_weights(nodes)
    homes = {}
    for node in nodes:
        if node.target in (PREFETCH, FETCH):
            tier = node.args[0].meta.get("orca_annotations", {}).get("tier")
            homes[node.args[0].target] = "host" if tier == "host" else "disk"
    weights = {name: getattr(parent, name).detach() for name in names}
    regions = plan_regions(placement_events(nodes, {name: _nbytes(w) for name, w in weights.items()}), capacity)
    on_disk = [name for name in names if homes[name] == "disk"]
    path, offsets = None, {}
    if on_disk:
        views, path, offsets = map_weights({name: weights[name].cpu() for name in on_disk},
                                           {name: regions[name] % PAGE for name in on_disk} if regions else None)
        weights.update(views)
    for name in names:  # a model compiled on the device: its streamed weights leave it
        weights[name] = weights[name].cpu().contiguous()
        original = getattr(parent, name)
        if weights[name] is not original:
            _swap_buffer(parent, name, weights[name])
            if source is not None and getattr(source, name, None) is original:
                _swap_buffer(source, name, weights[name])
    stream = CudaWeightStream(capacity, weights, homes, regions, path, offsets,
                              owners=tuple(m for m in (parent, source) if m is not None))
    # keyed by name: a host-homed weight's tensor changes when it is pinned
    keys = [n.args[0].args[0].target if n.target == RELEASE else n.args[0].target for n in nodes]
    for node, name in zip(nodes, keys):
        node.args = (name, *node.args) if node.target == RELEASE else (name, *node.args[1:])
    attach(parent, nodes, stream)
    if path is not None:
        weakref.finalize(parent, _remove, path)
