"""The machine's memory-tier bandwidths, measured once and remembered: how fast the cache folder's
disk reads into RAM (with O_DIRECT, as the streaming runtime reads large weights), and how fast
RAM copies. Opt-in: ORCA_MEASURE_BANDWIDTH=1.

With it, place-memory's default CPU tiers (`placement.cpu_tiers`) take their bandwidths from here
instead of the constants. A probe writes and reads PROBE_BYTES (a fraction of a second on an SSD)
the first time; the result is kept in `<cache folder>/machine-bandwidth.json`, keyed by the host
name and the cache folder's device, so later compiles read it. A missing, corrupt or foreign file
is measured afresh.

Why it is not the default: the probe reads alone, and measured 1.6-2.5 GB/s on our 2-core VM,
where the runtime's reads beside the kernels got 0.9-1.3 GB/s. Planned with the probe's figure,
mlp:512 at 50% got the benchmark's no-pipe plan, which measured 1.69x slower than 100%, where the
pipelined plan (planned with DISK_BANDWIDTH) measured 1.39x (docs/placement.md). A probe that reads
beside a busy core would fit better; not done.
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import socket
import time

import torch

PROBE_BYTES = 32 << 20  # the disk probe's file
CHUNK = 4 << 20  # read in chunks of this size, as a streamed weight of a few MB is
RAM_PROBE_BYTES = 64 << 20
FILE_NAME = "machine-bandwidth.json"


def measuring() -> bool:
    """Whether default tiers use measured bandwidths (ORCA_MEASURE_BANDWIDTH=1; off by default)."""
    return os.environ.get("ORCA_MEASURE_BANDWIDTH", "0").strip().lower() in ("1", "on", "true", "yes")


def machine_bandwidths() -> dict[str, float]:
    """{"disk": bytes/s, "ram": bytes/s} of this machine: read from the cache folder's record, or
    measured now and recorded. Empty where measuring is off or the probe cannot run (a read-only
    cache folder): callers then use their constants."""
    from .cache_dir import cache_dir

    if not measuring():
        return {}
    folder = cache_dir()
    key = f"{socket.gethostname()}:{os.stat(folder).st_dev}"
    path = folder / FILE_NAME
    try:
        record = json.loads(path.read_text())
        if record.get("key") == key and record["disk"] > 0 and record["ram"] > 0:
            return {"disk": float(record["disk"]), "ram": float(record["ram"])}
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none yet, or unreadable: measure
    try:
        measured = {"disk": measure_disk(folder), "ram": measure_ram()}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, **measured, "measured_at": time.time()}))
        os.replace(tmp, path)
    except OSError:
        return {}
    return measured


def measure_disk(folder, nbytes: int = PROBE_BYTES) -> float:
    """Bytes/s of reading a fresh, synced file of `nbytes` in `folder` from the disk, in CHUNK
    reads: with O_DIRECT where the file system allows it, else buffered after dropping the file
    from the page cache. The better of two passes."""
    path = os.path.join(folder, f"bandwidth-probe-{os.getpid()}.bin")
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8).numpy()  # incompressible
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return max(_read_rate(path, nbytes) for _ in range(2))
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def _read_rate(path: str, nbytes: int) -> float:
    """Bytes/s of one pass reading `path` from the disk in CHUNK reads (O_DIRECT where allowed)."""
    buffer = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
    view = memoryview(buffer)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError:
        fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # buffered reads come from the disk too
        start = time.perf_counter()
        offset = 0
        while offset < nbytes:
            try:
                got = os.preadv(fd, [view], offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                os.close(fd)  # the device wants another alignment: buffered
                fd = os.open(path, os.O_RDONLY)
                continue
            if got <= 0:
                break
            offset += got
        return offset / (time.perf_counter() - start)
    finally:
        os.close(fd)
        view.release()
        buffer.close()


def measure_ram(nbytes: int = RAM_PROBE_BYTES) -> float:
    """Bytes/s of copying `nbytes` from RAM to RAM (one copy_, the better of three)."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return nbytes / best
