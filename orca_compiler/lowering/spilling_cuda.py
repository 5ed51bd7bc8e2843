"""The run-time side of activation spilling (orca.spill / orca.reload) on CUDA: spilled activations
live in pinned host memory, the `host` tier. NOT RUN ON A GPU YET: written and tested on a machine
without one (tests/test_spill.py runs it against a fake device); tools/gpu_check_placement.py
is the check to run where a GPU is lent.

On CUDA both ops are host ops between the program's TVM partitions (spilling.bind_spills hands a
program whose partitions are built for CUDA here). `CudaSpillFile` holds one pinned buffer, its
regions planned as on CPU (spilling.spill_regions: copies whose lives do not overlap share
bytes), allocated at the first call, so nothing touches torch.cuda at compile time:
- `spill(x)` copies `x` into its pinned region on a side stream and returns the region;
- `reload(spilled)` copies the region into a fresh device tensor on the compute stream.

**Overlap and ordering, with no host waits.** The compute stream is torch's current stream, the
one TVM launches on while both are the default stream. A spill's copy runs on a side stream
(`non_blocking`, pinned memory), so it overlaps the partition that runs after it:
- the side stream first waits for everything queued on the compute stream: the kernel that wrote
  `x`, and the reloads of earlier tenants of the region's bytes;
- `x` is TVM's memory, which TVM reuses as soon as nothing holds it, so the spill file holds `x`
  until the next spill or reload (the next host op). There the compute stream waits for the copy's
  event, and only then is `x` let go: every kernel that may reuse its bytes is queued after the
  copy;
- a reload therefore reads the region only after its spill's copy, by stream order.
A reload does not overlap compute: fetching it earlier would hold its device bytes over the
partitions before it, which place-memory's activation budget does not count.
"""
from __future__ import annotations

import torch

from ..errors import TargetError
from ..memory_plan import _nbytes
from .spilling import SpillCounters


class TorchCudaSpillBackend:
    """The device side of a CudaSpillFile, through torch's CUDA API (tests substitute a fake with
    the same methods). Created at the first call: raises TargetError without a GPU."""

    def __init__(self):
        if not torch.cuda.is_available():
            raise TargetError("this program was built for cuda but this machine has no cuda device "
                              "(its spilled activations need one: torch.cuda is not available)")
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.copy_stream = torch.cuda.Stream(self.device)

    def pinned_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)

    def to_host(self, region: torch.Tensor, x: torch.Tensor) -> object:
        """Copy device tensor `x` into pinned `region` on the side stream, after all that is queued
        on the compute stream so far; returns the copy's event."""
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            region.copy_(x, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return event

    def wait(self, event) -> None:
        """The compute stream waits for `event` (the host does not)."""
        torch.cuda.current_stream(self.device).wait_event(event)

    def to_device(self, region: torch.Tensor) -> torch.Tensor:
        """A fresh device tensor filled from pinned `region`, queued on the compute stream."""
        return region.to(self.device, non_blocking=True)


# What builds the backend at the first call (tests replace it with a fake device).
make_backend = TorchCudaSpillBackend


class CudaSpillFile(SpillCounters):
    """The spilled activations of one CUDA program: one pinned host buffer and each spill node's
    region in it."""

    def __init__(self, regions: dict[str, tuple[int, torch.Tensor]], size: int):
        """`regions`: a spill node's name -> (its byte offset in the buffer, a tensor of its shape
        and dtype); `size`: the buffer's bytes (spilling.spill_regions)."""
        self.size = size
        self._regions = regions
        self._views: dict[str, torch.Tensor] = {}
        self._backend = None
        self._in_flight: list[tuple[torch.Tensor, object]] = []  # (a spilled tensor, its copy's event)
        self.reset_counters()

    def _start(self) -> None:
        """At the first call: the device and the pinned buffer."""
        backend = make_backend()
        pinned = backend.pinned_buffer(self.size)
        self._views = {name: pinned[offset:offset + _nbytes(like)].view(like.dtype).reshape(like.shape)
                       for name, (offset, like) in self._regions.items()}
        self._backend = backend

    def _settle(self) -> None:
        """At a host op: the compute stream waits for the spill copies issued at the host op
        before, and their sources are let go (TVM may reuse their bytes from here on)."""
        for _, event in self._in_flight:
            self._backend.wait(event)
        self._in_flight.clear()

    def spill(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self._backend is None:
            self._start()
        self._settle()
        region = self._views[name]
        self._in_flight.append((x, self._backend.to_host(region, x)))
        self.bytes_spilled += region.nbytes
        self.spills += 1
        return region

    def reload(self, spilled: torch.Tensor) -> torch.Tensor:
        self._settle()
        out = self._backend.to_device(spilled)
        self.bytes_reloaded += spilled.nbytes
        self.reloads += 1
        return out

    def stats(self) -> dict:
        return {**super().stats(), "device": "cuda"}
