"""The run-time side of place-memory: streamed weights in a memory-mapped file, copied into a
bounded fast-tier pool by the prefetch ops on a background thread, released after their last use.
This is the CPU runtime; a program whose TVM partitions are built for CUDA is handed to
streaming_cuda.bind_cuda (a device arena fed on a side CUDA stream; not run on a GPU yet).

**On CPU the placement ops run inside the TVM program** (orca_compiler/ops/placement.py): each is
an external call of the VM (`vm_call`, registered with support.register_vm_op as the extern
implementation "stream"), so streaming cuts the program into no TVM partitions and a placement op
costs a call from the VM into Python (~2 us) instead of a partition boundary. Their operands (a
release's copy, the `deps` tokens) reach them unconverted (ExternImpl.raw_args) and only order
them: the VM runs the calls in the graph's order, and Relax keeps the calls whose tokens nothing
reads because the program returns those tokens (relax_build.unread_effects). The first placement
op bound opens the program's stream (`stream_for`, one per IR module):
1. it writes the weights they read into one file (64-byte aligned, under the cache folder's
   `streamed/`), maps it (torch.from_file: pages are read from disk when touched) and puts the
   mapped tensors in place of those weights in the IR, so no RAM copy stays behind; the file is
   deleted with the stream;
2. each placement op is a call of the `WeightStream`: prefetch queues the copy on the stream's one
   background thread, fetch waits for it (or, where there was no prefetch, copies right away),
   release hands the bytes back.
Where placement ops are left between partitions (CUDA), `bind` points the fx nodes at the same
calls (`attach`).

**The pool is one arena** of the pool's capacity, page-aligned anonymous memory allocated once
(so a call touches no fresh pages), and each streamed weight has a region in it, planned when the
program is bound (orca_compiler.pool_regions.plan_regions): the placement ops are one chain that
runs in a fixed order (allocate at the prefetch, or at the fetch where there is none; free at the
release), so regions planned from it never overlap a region still in use, whichever thread copies.
Where no layout of the chain's regions fits the capacity (the planner's and a first-fit replay's
both fragment), each copy gets its own page-aligned buffer instead, and `stats()["arena"]` says so
(as the pass statistic `arena` predicts).

**Reads need no core.** A copy reads the weight's bytes from the file straight into its region:
for a weight of at least DIRECT_MIN_BYTES (a direct read is a real I/O, ~100 us here, where a
small buffered read is a short memcpy), the whole pages in its middle through a second descriptor
opened with O_DIRECT (the disk's DMA writes the region; no page cache, no kernel memcpy), the head,
the tail and small weights through the ordinary one (`os.preadv`,
which releases the GIL like TVM's calls, so the background thread reads while the main thread
computes). On 2 cores this matters: a buffered read of the page cache is a memcpy that takes a
core from the kernels (a disk read still costs the kernels some time on a VM: docs/placement.md
measures it). File offsets and regions are page-aligned for that. Where the file system refuses O_DIRECT (tmpfs), or after
`set_direct_io(False)`, every read is buffered; then `evict()` (posix_fadvise) drops the file
from the page cache, which is how the benchmark measures buffered reads from the disk itself.
The stream times its copies (`copy_seconds`, on whichever thread) and how long the main thread
waited in fetches (`wait_seconds`): the transfer time prefetching did not hide.

**Wrap-around prefetches** (a prefetch after its weight's fetch in the chain) copy the first
segment's weights for the next call during the tail of this one. Their copies stay pending across
the call boundary, and their regions are planned as held from the start of a call to their
release, then again from the wrap-around prefetch to the end (placed at the top of the arena where
that fits). The first call, which finds nothing pending, reads them when it starts.

`WeightPool` counts bytes under a condition variable: an allocation waits while the pool would
go over its capacity, so the pool never holds more than its budget, whatever the plan. It records
its high-water mark and the bytes copied into it; tests assert both against the plan. The last
placement op of a call marks it complete; the first op of the next call keeps the wrap-around
copies of a complete call and otherwise drops what a call that raised half-way left in the pool.
One call at a time: the stream is per program, not per thread.
"""
from __future__ import annotations

import errno
import mmap
import os
import threading
import time
import uuid
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.fx as fx

from ..ops.placement import FETCH, PLACEMENT_OPS, PREFETCH, RELEASE
from ..placement import DIRECT_MIN_BYTES, pool_footprint
from ..pool_regions import placement_events, plan_regions
from .extern import ExternImpl
from .support import extern_state, register_host_op, register_vm_op

# O_DIRECT reads need the buffer, the file offset and the length aligned to the device's block
# (512 or 4096 bytes): each weight sits in the file at an offset congruent to its pool region's
# modulo PAGE, so the page-aligned middle of every region is read directly.
PAGE = 4096
# A direct read is a real I/O (about 100 us here, whatever its size up to ~100 KB), where a
# buffered read of a small weight is a few microseconds of memcpy: only weights from
# DIRECT_MIN_BYTES (placement.py, whose estimate counts on it) read their pages directly. Small
# weights go through the page cache.


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class WeightPool:
    """Fast-tier bytes for streamed weights: at most `capacity` allocated at any time. With
    `regions` (a key's offset, from plan_regions), the bytes are one page-aligned arena allocated
    once and a weight given with its key lands in its region."""

    def __init__(self, capacity: int, regions: dict | None = None):
        self.capacity = capacity
        self.used = 0
        self.high_water = 0
        self.bytes_moved = 0
        self.direct_bytes = 0  # of bytes_moved, those read with O_DIRECT (no page cache, no memcpy)
        self.copies = 0
        self.copy_seconds = 0.0
        # One plain lock guards the counts (a C-level `with`: ~0.25 us, a Condition's ~0.6 us);
        # the Condition on it is only waited on while the pool is full, and notified only then.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._waiting = 0
        self._regions = regions or {}
        self._views: dict = {}  # a key's region as a tensor of its weight's dtype and shape
        self._region_bytes: dict = {}  # ... and as the memoryview the reads fill
        self._arena = None
        if self._regions:
            self._mmap = mmap.mmap(-1, max(capacity, 1))  # anonymous: page-aligned, zero-filled
            self._arena = torch.frombuffer(self._mmap, dtype=torch.uint8)

    @property
    def arena(self) -> bool:
        """Whether the pool is one planned arena (else each copy gets its own buffer)."""
        return self._arena is not None

    def allocate(self, like: torch.Tensor, key=None) -> torch.Tensor:
        """Room for a copy of `like` (waits while the pool is full), counted as its region."""
        nbytes = pool_footprint(like.nbytes)
        if nbytes > self.capacity:
            raise MemoryError(f"a {nbytes:,}-byte weight cannot fit a pool of {self.capacity:,} bytes")
        with self._lock:
            if self.used + nbytes > self.capacity:
                self._waiting += 1
                try:
                    self._cond.wait_for(lambda: self.used + nbytes <= self.capacity)
                finally:
                    self._waiting -= 1
            self.used += nbytes
            if self.used > self.high_water:
                self.high_water = self.used
        region = self._views.get(key)
        if region is not None:  # the same region every call: its view is made once
            return region
        offset = self._regions.get(key) if self._arena is not None else None
        if offset is None:  # a buffer of its own, page-aligned for direct reads
            raw = torch.empty(_nbytes(like) + PAGE, dtype=torch.uint8)
            start = -raw.data_ptr() % PAGE
            return raw[start:start + _nbytes(like)].view(like.dtype).reshape(like.shape)
        region = self._views[key] = self._arena[offset:offset + _nbytes(like)].view(like.dtype).reshape(like.shape)
        self._region_bytes[key] = _bytes_of(region)
        return region

    def region_bytes(self, key) -> memoryview | None:
        """The bytes of `key`'s region in the arena, once it was allocated (None before, or
        without an arena)."""
        return self._region_bytes.get(key)

    def free(self, tensor: torch.Tensor) -> None:
        with self._lock:
            self.used -= pool_footprint(tensor.nbytes)
            if self._waiting:
                self._cond.notify_all()

    def load(self, weight: torch.Tensor, read, key=None) -> torch.Tensor:
        """A pool-resident copy of `weight` (waits for room; in `key`'s region), filled by
        `read(weight, into, key)`, which returns how many of the bytes it read directly."""
        copy = self.allocate(weight, key)
        start = time.perf_counter()
        direct = read(weight, copy, key)
        seconds = time.perf_counter() - start
        with self._lock:
            self.direct_bytes += direct
            self.bytes_moved += copy.nbytes
            self.copies += 1
            self.copy_seconds += seconds
        return copy

    def reset_counters(self) -> None:
        """Start counting the high-water mark, bytes moved, copies and copy time afresh (e.g. per call)."""
        with self._lock:
            self.high_water, self.bytes_moved, self.copies, self.copy_seconds = self.used, 0, 0, 0.0
            self.direct_bytes = 0

    def stats(self) -> dict:
        return {"capacity": self.capacity, "used": self.used, "high_water": self.high_water, "arena": self.arena,
                "bytes_moved": self.bytes_moved, "direct_bytes": self.direct_bytes, "copies": self.copies,
                "copy_seconds": self.copy_seconds}


class WeightFile:
    """The streamed weights file of a program, read into buffers: its descriptors (buffered, and
    O_DIRECT where the file system allows), closed with the object. Shared by the CPU stream
    (WeightStream) and the CUDA one (streaming_cuda.CudaWeightStream, which reads disk-homed
    weights into pinned staging memory)."""

    def __init__(self, path: str | None = None, offsets: dict | None = None):
        """`offsets`: a key (a mapped weight's data_ptr, or a name) -> its byte offset in the file at `path`."""
        self._offsets = offsets or {}
        self._fd = self._direct_fd = None
        # the descriptors open now, closed with the stream: one finalizer owns them, so a descriptor
        # closed early (set_direct_io) is never closed again after its number was reused
        self._open_fds: set[int] = set()
        weakref.finalize(self, _close_all, self._open_fds)
        if path is not None:
            self._fd = os.open(path, os.O_RDONLY)
            self._open_fds.add(self._fd)
            self.set_direct_io(True, path)

    def set_direct_io(self, on: bool, path: str | None = None) -> bool:
        """Read through O_DIRECT (on) or the page cache (off); returns whether reads are direct.
        O_DIRECT stays off where the file system refuses it."""
        if self._direct_fd is not None:
            self._open_fds.discard(self._direct_fd)
            os.close(self._direct_fd)
            self._direct_fd = None
        if on and self._fd is not None and hasattr(os, "O_DIRECT"):
            try:
                self._direct_fd = os.open(path or f"/proc/self/fd/{self._fd}", os.O_RDONLY | os.O_DIRECT)
            except OSError:
                return False
            self._open_fds.add(self._direct_fd)
        return self._direct_fd is not None

    @property
    def direct_io(self) -> bool:
        return self._direct_fd is not None

    def read_at(self, offset: int, into: torch.Tensor, view: memoryview | None = None) -> int:
        """Fill `into` (CPU memory; `view`: its bytes, where the caller has them already) with its
        bytes at `offset` in the weights file: the whole pages in the middle with O_DIRECT where
        `into` and the file agree modulo PAGE, the head and tail (and everything else) buffered.
        Returns the bytes read directly."""
        if view is None:
            view = _bytes_of(into)
        if self._direct_fd is None or len(view) < DIRECT_MIN_BYTES or (into.data_ptr() - offset) % PAGE:
            _read_all(self._fd, view, offset)  # all buffered: one read
            return 0
        head = min(-into.data_ptr() % PAGE, len(view))
        tail = head + (len(view) - head) // PAGE * PAGE
        if tail > head:
            try:
                _read_all(self._direct_fd, view[head:tail], offset + head)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.set_direct_io(False)  # the device wants another alignment: buffered from now on
                head = tail = len(view)
        _read_all(self._fd, view[:head], offset)
        _read_all(self._fd, view[tail:], offset + tail)
        return tail - head

    def evict(self) -> None:
        """Drop the weights file from the page cache, so the next reads come from the disk."""
        if self._fd is not None:
            os.fsync(self._fd)  # dirty pages (the file was just written) are not dropped
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)


class WeightStream(WeightFile):
    """The placement ops of one program: a pool, a background copier and the pending copies."""

    def __init__(self, capacity: int, path: str | None = None, offsets: dict[int, int] | None = None,
                 regions: dict[int, int] | None = None):
        """`offsets`: a mapped weight's data_ptr -> its byte offset in the file at `path`;
        `regions`: a data_ptr -> its offset in the pool's arena (plan_regions)."""
        super().__init__(path, offsets)
        self.pool = WeightPool(capacity, regions)
        self.wait_seconds = 0.0
        self._complete = False  # the last call ran to its last placement op
        self._executor: ThreadPoolExecutor | None = None
        self._pending: dict[int, Future] = {}

    def _read(self, weight: torch.Tensor, into: torch.Tensor, key: int) -> int:
        """Fill `into` with `weight`'s bytes (`key`: its data_ptr), from the weights file where it
        came from (read_at)."""
        offset = self._offsets.get(key)
        if offset is None or self._fd is None:
            into.copy_(weight)
            return 0
        return self.read_at(offset, into, self.pool.region_bytes(key))

    def _load(self, weight: torch.Tensor, key: int) -> torch.Tensor:
        return self.pool.load(weight, self._read, key)

    def reset_counters(self) -> None:
        """Start the pool's counters and the wait time afresh (e.g. per call)."""
        self.pool.reset_counters()
        self.wait_seconds = 0.0

    def stats(self) -> dict:
        """The pool's counters plus `wait_seconds` (time the main thread spent in fetches) and
        `direct_io` (whether reads bypass the page cache)."""
        return {**self.pool.stats(), "wait_seconds": self.wait_seconds, "direct_io": self.direct_io}

    def _copier(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="orca-prefetch")
            weakref.finalize(self, self._executor.shutdown, wait=False)
        return self._executor

    def _begin(self) -> None:
        """The first placement op of a call: after a complete call, keep its wrap-around copies;
        else drop what a call that raised half-way left behind (copies never fetched, copies never
        released), so the pool starts empty."""
        complete, self._complete = self._complete, False
        if complete or (not self._pending and not self.pool.used):
            return
        for pending in self._pending.values():
            try:
                pending.result()
            except Exception:  # the failed call's error was raised there already
                pass
        self._pending.clear()
        with self.pool._cond:
            self.pool.used = 0
            self.pool._cond.notify_all()

    def begin_prefetch(self, weight: torch.Tensor, deps, pool_bytes: int) -> torch.Tensor:
        self._begin()
        return self.prefetch(weight, deps, pool_bytes)

    def begin_fetch(self, weight: torch.Tensor, deps, pool_bytes: int) -> torch.Tensor:
        self._begin()
        return self.fetch(weight, deps, pool_bytes)

    def end_prefetch(self, weight: torch.Tensor, deps, pool_bytes: int) -> torch.Tensor:
        token = self.prefetch(weight, deps, pool_bytes)
        self._complete = True
        return token

    def end_release(self, fetched: torch.Tensor, deps) -> torch.Tensor:
        token = self.release(fetched, deps)
        self._complete = True
        return token

    def settle(self) -> None:
        """Wait for the copies in flight (wrap-around ones stay pending for the next call)."""
        for pending in list(self._pending.values()):
            pending.result()

    def pending_bytes(self) -> int:
        """Pool bytes held by finished copies that no fetch has taken yet."""
        return sum(pool_footprint(_nbytes(p.result())) for p in self._pending.values() if p.done())

    def prefetch(self, weight: torch.Tensor, deps, pool_bytes: int) -> torch.Tensor:
        key = weight.data_ptr()
        self._pending[key] = self._copier().submit(self._load, weight, key)
        return _TOKEN

    def fetch(self, weight: torch.Tensor, deps, pool_bytes: int) -> torch.Tensor:
        start = time.perf_counter()
        key = weight.data_ptr()
        pending = self._pending.pop(key, None)
        fetched = pending.result() if pending is not None else self._load(weight, key)
        self.wait_seconds += time.perf_counter() - start
        return fetched

    def release(self, fetched: torch.Tensor, deps) -> torch.Tensor:
        self.pool.free(fetched)
        return _TOKEN


_TOKEN = torch.empty(0, dtype=torch.uint8)


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable in place."""
    return memoryview(tensor.view(-1).view(torch.uint8).numpy())


def _read_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):  # preadv may return fewer bytes than asked
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"the streamed weights file ended at byte {offset + done:,}")
        done += got


def _close_all(fds: set[int]) -> None:
    for fd in list(fds):
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def map_weights(tensors: dict[str, torch.Tensor], residues: dict[str, int] | None = None
                ) -> tuple[dict[str, torch.Tensor], str, dict[str, int]]:
    """Write `tensors` into one new file, each at an offset congruent to `residues[name]` (0 by
    default) modulo PAGE, and sync it to the disk (so direct reads need not wait for write-back);
    return memory-mapped tensors of it, its path and each tensor's byte offset in it."""
    from ..cache_dir import cache_dir

    folder = cache_dir() / "streamed"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid.uuid4().hex}.bin"
    offsets, size = {}, 0
    with open(path, "wb") as f:
        for name, tensor in tensors.items():
            pad = ((residues or {}).get(name, 0) - size) % PAGE
            f.write(b"\0" * pad)
            size += pad
            offsets[name] = size
            raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(raw)  # the tensor's own buffer: no bytes copy of it
            size += raw.nbytes
        f.flush()
        os.fsync(f.fileno())
    mapped = torch.from_file(str(path), shared=False, size=max(size, 1), dtype=torch.uint8)
    views = {}
    for name, tensor in tensors.items():
        start = offsets[name]
        raw = mapped[start:start + tensor.numel() * tensor.element_size()]
        views[name] = raw.view(tensor.dtype).reshape(tensor.shape)
    return views, str(path), offsets


def _swap_buffer(module: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    if name in module._buffers:
        module._buffers[name] = tensor
    else:
        setattr(module, name, tensor)


def open_stream(nodes: list[fx.Node], modules: list[fx.GraphModule]) -> WeightStream:
    """A WeightStream for the placement nodes `nodes` (in chain order): plans the pool's regions,
    writes the weights they read into one file (map_weights) and puts the mapped tensors in place
    of those weights in `modules` (the first holds them), so no RAM copy stays behind; the file is
    deleted with the stream."""
    capacity, names = pool_and_weights(nodes)
    weights = {name: getattr(modules[0], name) for name in names}
    events = placement_events(nodes, {name: _nbytes(w) for name, w in weights.items()})
    regions = plan_regions(events, capacity) or {}
    views, path, offsets = map_weights(weights, {name: offset % PAGE for name, offset in regions.items()})
    for name, view in views.items():
        original = weights[name]
        for module in modules:
            if getattr(module, name, None) is original:
                _swap_buffer(module, name, view)
    stream = WeightStream(capacity, path, {views[name].data_ptr(): offsets[name] for name in names},
                          {views[name].data_ptr(): offset for name, offset in regions.items()})
    stream.chain_ends = (nodes[0].name, nodes[-1].name)
    weakref.finalize(stream, _remove, path)
    return stream


def placement_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The placement nodes of `gm`, in graph order (the order their chain runs)."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in PLACEMENT_OPS]


# The stream of each IR module whose placement ops run inside its TVM program (vm_call), opened
# by the first of them bound; weakly keyed, so it goes with the program's closures that hold it.
_STREAMS: "weakref.WeakKeyDictionary[fx.GraphModule, WeightStream]" = weakref.WeakKeyDictionary()


def stream_for(gm: fx.GraphModule) -> WeightStream:
    """The WeightStream of the IR module `gm` (opened, and its streamed weights mapped, at the
    first call; the same stream after, for every program lowered from `gm`)."""
    stream = _STREAMS.get(gm)
    if stream is None:
        stream = _STREAMS[gm] = open_stream(placement_nodes(gm), [gm])
    return stream


def vm_call(node: fx.Node, args, kwargs):
    """The external kernel (extern.ExternImpl `make`) of a placement node run from inside the
    TVM program: the call of its IR module's stream, with the weight and the pool size bound
    here. The VM's operands (a release's copy, the `deps` tokens) only order the calls and are
    not read: a release frees the bytes of its weight's copy, known from the weight."""
    gm = node.graph.owning_module
    stream = stream_for(gm)  # maps the streamed weights: read them from `gm` after this
    call = chain_call(stream, node)
    if node.target == RELEASE:
        weight = getattr(gm, node.args[0].args[0].target)

        def run(*operands):
            return call(weight, ())
    else:
        weight, pool_bytes = getattr(gm, node.args[0].target), args[2]

        def run(*operands):
            return call(weight, (), pool_bytes)

    run.stream = stream
    return run


def bind(parent: fx.GraphModule, source: fx.GraphModule | None = None) -> None:
    """Make `parent`'s placement nodes, left between its TVM partitions, run against a stream:
    a CudaWeightStream where the partitions are built for CUDA, else a WeightStream (see the
    module docstring); `source` (the IR's module) gets the mapped weights too."""
    nodes = placement_nodes(parent)
    if not nodes:
        return
    if "cuda" in program_kinds(parent):  # one target per compile: every TVM partition is built for CUDA
        from .streaming_cuda import bind_cuda

        return bind_cuda(parent, source, nodes)
    attach(parent, nodes, open_stream(nodes, [m for m in (parent, source) if m is not None]))


def pool_and_weights(nodes: list[fx.Node]) -> tuple[int, list[str]]:
    """(the pool's capacity, the streamed weights' names in the order the chain reads them: a
    segment's weights are one run of the file) of a program's placement nodes."""
    capacity = max(n.args[2] for n in nodes if n.target in (PREFETCH, FETCH))
    return capacity, list(dict.fromkeys(n.args[0].target for n in nodes if n.target in (PREFETCH, FETCH)))


def attach(parent: fx.GraphModule, nodes: list[fx.Node], stream) -> None:
    """Point the placement nodes (in chain order) at `stream`'s calls (`call_for`); keep the
    stream on `parent`."""
    stream.chain_ends = (nodes[0].name, nodes[-1].name)
    for node in nodes:
        node.target = chain_call(stream, node)
    parent.orca_stream = stream


def chain_call(stream, node: fx.Node):
    """The method of `stream` (a WeightStream or a CudaWeightStream) that runs placement node
    `node`: its prefetch / fetch / release, or the begin_* / end_* variant for the first and last
    node of the chain (`stream.chain_ends`), which mark where a call starts and completes."""
    first, last = stream.chain_ends
    kind = {PREFETCH: "prefetch", FETCH: "fetch", RELEASE: "release"}[node.target]
    if node.name == first:
        kind = f"begin_{kind}"
    elif node.name == last:
        kind = f"end_{kind}"
    return getattr(stream, kind)


def program_kinds(parent: fx.GraphModule) -> set[str]:
    """The device kinds ("cpu", "cuda") the TVM partitions of a program are built for."""
    from ..runtime import TVMGraphModule

    return {m.target.kind for m in parent.children() if isinstance(m, TVMGraphModule)}


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def stream_of(module) -> WeightStream | None:
    """The WeightStream of a compiled module (or its program), None if it streams nothing: kept
    on the program where the placement ops run between partitions, else held by the external
    kernels (vm_call) of its TVM program."""
    stream = getattr(getattr(module, "program", module), "orca_stream", None)
    return stream if stream is not None else extern_state(module, "stream")


STREAM = ExternImpl("stream", PLACEMENT_OPS, vm_call, raw_args=True)
for _op in PLACEMENT_OPS:
    register_host_op(_op, bind)  # on CUDA: TVM launches its kernels on its own stream (streaming_cuda)
    register_vm_op(_op, STREAM, kinds=("cpu",))
