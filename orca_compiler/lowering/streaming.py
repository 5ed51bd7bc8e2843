"""The run-time side of place-memory: streamed weights in a memory-mapped file, copied into a
bounded fast-tier pool by the prefetch ops on a background thread, released after their last use.

When a partitioned program holds placement ops (orca_compiler/ops/placement.py), `bind`:
1. writes the weights they read into one file (64-byte aligned, under the cache folder's
   `streamed/`), maps it (torch.from_file: pages are read from disk when touched) and puts the
   mapped tensors in place of those weights in the program and in the IR, so no RAM copy stays
   behind; the file is deleted with the program;
2. turns each placement node into a call of the program's `WeightStream`: prefetch queues the
   copy on the stream's one background thread, fetch waits for it (or, where there was no
   prefetch, copies right away), release hands the bytes back.

A copy reads the weight's bytes from the file with `os.preadv` straight into its pool buffer
(the mapped tensor is never touched, so its pages do not stay in RAM): one system call that
releases the GIL, so the background thread reads while the main thread runs TVM (whose calls
release the GIL too), and a cold read waits on the disk, not on a core. Where the page cache
holds the file, the read is a kernel memcpy. `WeightStream.evict()` drops the file from the
page cache (posix_fadvise), which is how the benchmark measures reads from the disk itself.
The stream times its copies (`copy_seconds`, on whichever thread) and how long the main thread
waited in fetches (`wait_seconds`): the transfer time prefetching did not hide.

`WeightPool` is a byte-counting allocator with a condition variable: an allocation waits while
the pool would go over its capacity, so the pool never holds more than its budget, whatever the
plan. It records its high-water mark and the bytes copied into it; tests assert both against the
plan. The first placement op of each call first drops what a call that raised half-way left in
the pool. One call at a time: the stream is per program, not per thread.
"""
from __future__ import annotations

import os
import threading
import time
import uuid
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.fx as fx

from ..ops.placement import FETCH, PLACEMENT_OPS, PREFETCH, RELEASE
from .support import register_host_op

ALIGNMENT = 64


class WeightPool:
    """Fast-tier bytes for streamed weights: at most `capacity` allocated at any time."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self.high_water = 0
        self.bytes_moved = 0
        self.copies = 0
        self.copy_seconds = 0.0
        self._cond = threading.Condition()

    def allocate(self, like: torch.Tensor) -> torch.Tensor:
        nbytes = like.numel() * like.element_size()
        if nbytes > self.capacity:
            raise MemoryError(f"a {nbytes:,}-byte weight cannot fit a pool of {self.capacity:,} bytes")
        with self._cond:
            self._cond.wait_for(lambda: self.used + nbytes <= self.capacity)
            self.used += nbytes
            self.high_water = max(self.high_water, self.used)
        return torch.empty(like.shape, dtype=like.dtype)

    def free(self, tensor: torch.Tensor) -> None:
        with self._cond:
            self.used -= tensor.numel() * tensor.element_size()
            self._cond.notify_all()

    def load(self, weight: torch.Tensor, read) -> torch.Tensor:
        """A pool-resident copy of `weight` (waits for room), filled by `read(weight, into)`."""
        copy = self.allocate(weight)
        start = time.perf_counter()
        read(weight, copy)
        seconds = time.perf_counter() - start
        with self._cond:
            self.bytes_moved += copy.numel() * copy.element_size()
            self.copies += 1
            self.copy_seconds += seconds
        return copy

    def reset_counters(self) -> None:
        """Start counting the high-water mark, bytes moved, copies and copy time afresh (e.g. per call)."""
        with self._cond:
            self.high_water, self.bytes_moved, self.copies, self.copy_seconds = self.used, 0, 0, 0.0

    def stats(self) -> dict:
        return {"capacity": self.capacity, "used": self.used, "high_water": self.high_water,
                "bytes_moved": self.bytes_moved, "copies": self.copies, "copy_seconds": self.copy_seconds}


class WeightStream:
    """The placement ops of one program: a pool, a background copier and the pending copies."""

    def __init__(self, capacity: int, path: str | None = None, offsets: dict[int, int] | None = None):
        self.pool = WeightPool(capacity)
        self.wait_seconds = 0.0
        self._executor: ThreadPoolExecutor | None = None
        self._pending: dict[int, Future] = {}
        self._offsets = offsets or {}  # a mapped weight's data_ptr -> its offset in the file
        self._fd = os.open(path, os.O_RDONLY) if path is not None else None
        if self._fd is not None:
            weakref.finalize(self, os.close, self._fd)

    def _read(self, weight: torch.Tensor, into: torch.Tensor) -> None:
        """Fill `into` with `weight`'s bytes, read from the weights file where it came from."""
        offset = self._offsets.get(weight.data_ptr())
        if offset is None or self._fd is None:
            into.copy_(weight)
            return
        view = memoryview(into.view(-1).view(torch.uint8).numpy())
        done = 0
        while done < len(view):  # preadv may return fewer bytes than asked
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"the streamed weights file ended at byte {offset + done:,}")
            done += got

    def _load(self, weight: torch.Tensor) -> torch.Tensor:
        return self.pool.load(weight, self._read)

    def evict(self) -> None:
        """Drop the weights file from the page cache, so the next reads come from the disk."""
        if self._fd is not None:
            os.fsync(self._fd)  # dirty pages (the file was just written) are not dropped
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def reset_counters(self) -> None:
        """Start the pool's counters and the wait time afresh (e.g. per call)."""
        self.pool.reset_counters()
        self.wait_seconds = 0.0

    def stats(self) -> dict:
        """The pool's counters plus `wait_seconds`: time the main thread spent in fetches."""
        return {**self.pool.stats(), "wait_seconds": self.wait_seconds}

    def _copier(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="orca-prefetch")
            weakref.finalize(self, self._executor.shutdown, wait=False)
        return self._executor

    def _begin(self) -> None:
        """The first placement op of a call: drop what a call that raised half-way left behind
        (copies never fetched, copies never released), so the pool starts empty."""
        if not self._pending and not self.pool.used:
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

    def prefetch(self, weight: torch.Tensor, deps, pool_bytes: int) -> torch.Tensor:
        self._pending[weight.data_ptr()] = self._copier().submit(self._load, weight)
        return _TOKEN

    def fetch(self, weight: torch.Tensor, deps, pool_bytes: int) -> torch.Tensor:
        start = time.perf_counter()
        pending = self._pending.pop(weight.data_ptr(), None)
        fetched = pending.result() if pending is not None else self._load(weight)
        self.wait_seconds += time.perf_counter() - start
        return fetched

    def release(self, fetched: torch.Tensor, deps) -> torch.Tensor:
        self.pool.free(fetched)
        return _TOKEN


_TOKEN = torch.empty(0, dtype=torch.uint8)


def _aligned(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def map_weights(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str, dict[str, int]]:
    """Write `tensors` into one new file; return memory-mapped tensors of it, its path and each
    tensor's byte offset in it."""
    from ..cache_dir import cache_dir

    folder = cache_dir() / "streamed"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid.uuid4().hex}.bin"
    offsets, size = {}, 0
    with open(path, "wb") as f:
        for name, tensor in tensors.items():
            offsets[name] = size
            raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(raw)  # the tensor's own buffer: no bytes copy of it
            size += raw.nbytes
            pad = _aligned(size) - size
            f.write(b"\0" * pad)
            size += pad
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


def bind(parent: fx.GraphModule, source: fx.GraphModule | None = None) -> None:
    """Make `parent`'s placement nodes run against a WeightStream (see the module docstring);
    `source` (the IR's module) gets the mapped weights too."""
    nodes = [n for n in parent.graph.nodes if n.op == "call_function" and n.target in PLACEMENT_OPS]
    if not nodes:
        return
    from ..errors import TargetError
    from ..runtime import TVMGraphModule

    kinds = {m.target.kind for m in parent.children() if isinstance(m, TVMGraphModule)}
    if kinds - {"cpu"}:
        raise TargetError(f"place-memory streams weights on CPU only; this program is built for {', '.join(sorted(kinds))} "
                          "(compile without place-memory, or with a budget that keeps every weight resident)")
    capacity = max(n.args[2] for n in nodes if n.target in (PREFETCH, FETCH))
    # in the order the program reads them: a segment's weights are one run of the file
    names = list(dict.fromkeys(n.args[0].target for n in nodes if n.target in (PREFETCH, FETCH)))
    views, path, offsets = map_weights({name: getattr(parent, name) for name in names})
    for name, view in views.items():
        original = getattr(parent, name)
        _swap_buffer(parent, name, view)
        if source is not None and getattr(source, name, None) is original:
            _swap_buffer(source, name, view)
    stream = WeightStream(capacity, path, {views[name].data_ptr(): offsets[name] for name in names})
    calls = {PREFETCH: stream.prefetch, FETCH: stream.fetch, RELEASE: stream.release}
    for node in nodes:
        node.target = calls[node.target]
    # nodes[0] is the first placement op of a call (they are chained in this order)
    nodes[0].target = stream.begin_prefetch if nodes[0].target == stream.prefetch else stream.begin_fetch
    parent.orca_stream = stream
    weakref.finalize(parent, _remove, path)


def _remove(path: str) -> None:
    import os

    try:
        os.unlink(path)
    except OSError:
        pass


def stream_of(module) -> WeightStream | None:
    """The WeightStream of a compiled module (or its program), None if it streams nothing."""
    program = getattr(module, "program", module)
    return getattr(program, "orca_stream", None)


for _op in PLACEMENT_OPS:
    register_host_op(_op, bind)
