"""The run-time side of activation spilling (orca.spill / orca.reload, written by place-memory's
`activation_budget`) on CPU: the spilled copies live in a memory-mapped file, the disk tier.

Both ops run inside the TVM program as external calls of the VM (like the weight-streaming ops,
streaming.py). The first one bound opens the program's `SpillFile` (one per IR module):
- one file under the cache folder (`spilled/<uuid>.bin`), mapped shared (torch.from_file), sized by
  the spilled copies' own plan: each copy lives from its spill to its last reload, and copies whose
  lives do not overlap share bytes (memory_plan.place_by_size, as the activation arena does);
- `spill(x)` copies `x` into its region of the file and returns that region, so the VM holds the
  spilled value without fast-tier bytes, and TVM's memory planner frees `x`'s storage after it;
- `reload(spilled)` copies the region back into a fresh tensor for the readers after the gap.
The file's pages are the kernel's page cache: written back to the disk and dropped from RAM
under memory pressure, as any mapped file. The file is deleted with the SpillFile. The counters
(`stats()`) say what moved per call. Both ops run on the calling thread, one call at a time per
compiled module.

Where the ops are left between TVM partitions, `bind_spills` binds them instead. That is a CUDA
build, whose spilled copies go to pinned host memory (spilling_cuda.CudaSpillFile).
"""
from __future__ import annotations

import os
import uuid
import weakref

import torch
import torch.fx as fx

from ..memory_plan import _nbytes, place_by_size
from ..ops.placement import SPILL, SPILL_OPS
from .extern import ExternImpl
from .streaming import _remove, program_kinds  # _remove: deletes a file, ignoring one already gone
from .support import extern_state, register_host_op, register_vm_op


class SpillCounters:
    """What a program's spill ops moved since the counters were reset (`size`: the bytes of the
    slow tier's store, set by the subclass)."""

    size = 0

    def reset_counters(self) -> None:
        self.bytes_spilled = self.bytes_reloaded = self.spills = self.reloads = 0

    def stats(self) -> dict:
        """Bytes and copies spilled and reloaded since the counters were reset; the store's size."""
        return {"file_bytes": self.size, "bytes_spilled": self.bytes_spilled, "bytes_reloaded": self.bytes_reloaded,
                "spills": self.spills, "reloads": self.reloads}


class SpillFile(SpillCounters):
    """The spilled activations of one program: a mapped file and the region of each spill node."""

    def __init__(self, regions: dict[str, tuple[int, torch.Tensor]], size: int):
        """`regions`: a spill node's name -> (its byte offset in the file, a tensor of its shape and
        dtype); `size`: the file's bytes."""
        from ..cache_dir import cache_dir

        folder = cache_dir() / "spilled"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = str(folder / f"{uuid.uuid4().hex}.bin")
        with open(self.path, "wb") as f:
            # blocks reserved now: a full disk is an error here, not a SIGBUS when a spill writes a page
            os.posix_fallocate(f.fileno(), 0, max(size, 1))
        weakref.finalize(self, _remove, self.path)
        mapped = torch.from_file(self.path, shared=True, size=max(size, 1), dtype=torch.uint8)
        self.size = size
        self._views = {name: mapped[offset:offset + _nbytes(like)].view(like.dtype).reshape(like.shape)
                       for name, (offset, like) in regions.items()}
        self.reset_counters()

    def region(self, name: str) -> torch.Tensor:
        """The file's bytes for spill node `name`, as a tensor of its value's shape and dtype."""
        return self._views[name]

    def spill(self, name: str, x: torch.Tensor) -> torch.Tensor:
        region = self._views[name]
        region.copy_(x)
        self.bytes_spilled += region.nbytes
        self.spills += 1
        return region

    def reload(self, spilled: torch.Tensor) -> torch.Tensor:
        out = spilled.clone()  # the region is contiguous: so is the copy
        self.bytes_reloaded += out.nbytes
        self.reloads += 1
        return out


def spill_regions(gm: fx.GraphModule) -> tuple[dict[str, tuple[int, torch.Tensor]], int]:
    """(spill node name -> (offset, its value), the file's size) for the spill nodes of `gm`: each
    copy alive from its spill to its last reader's step, placed by place_by_size."""
    steps = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "call_function")}
    spills = [n for n in steps if n.target is SPILL]
    values = {n.name: n.meta["val"] for n in spills}
    lives = {n.name: [(steps[n], max((steps.get(u, len(steps)) for u in n.users), default=steps[n]))] for n in spills}
    offsets = place_by_size({name: _nbytes(v) for name, v in values.items()}, lives)
    size = max((offsets[name] + _nbytes(v) for name, v in values.items()), default=0)
    return {name: (offsets[name], values[name]) for name in values}, size


# The SpillFile of each IR module whose spill ops run inside its TVM program, opened by the first
# of them bound; weakly keyed, so it goes with the program's closures that hold it.
_FILES: "weakref.WeakKeyDictionary[fx.GraphModule, SpillFile]" = weakref.WeakKeyDictionary()


def spill_file_for(gm: fx.GraphModule) -> SpillFile:
    """The SpillFile of the IR module `gm` (opened at the first call, the same one after)."""
    spill_file = _FILES.get(gm)
    if spill_file is None:
        spill_file = _FILES[gm] = SpillFile(*spill_regions(gm))
    return spill_file


def vm_call(node: fx.Node, args, kwargs):
    """The external kernel (extern.ExternImpl `make`) of a spill or reload node run from inside the
    TVM program: the call of its IR module's SpillFile."""
    spill_file = spill_file_for(node.graph.owning_module)
    if node.target is SPILL:
        name = node.name

        def run(x):
            return spill_file.spill(name, x)
    else:
        def run(spilled):
            return spill_file.reload(spilled)

    run.spill_file = spill_file
    return run


def bind_spills(parent: fx.GraphModule, source: fx.GraphModule | None = None) -> None:
    """Make `parent`'s spill and reload nodes, left between its TVM partitions, run against one
    store of spilled copies: a spilling_cuda.CudaSpillFile (pinned host memory) where the
    partitions are built for CUDA, else a SpillFile. Each spill node gets its own name as a first
    argument (its region); the store is kept on `parent` (spill_file_of)."""
    nodes = [n for n in parent.graph.nodes if n.op == "call_function" and n.target in SPILL_OPS]
    if not nodes:
        return
    regions, size = spill_regions(parent)
    if "cuda" in program_kinds(parent):
        from .spilling_cuda import CudaSpillFile

        spill_file = CudaSpillFile(regions, size)
    else:
        spill_file = SpillFile(regions, size)
    for node in nodes:
        if node.target is SPILL:
            node.args = (node.name, *node.args)
            node.target = spill_file.spill
        else:
            node.target = spill_file.reload
    parent.orca_spill_file = spill_file


def spill_file_of(module) -> SpillCounters | None:
    """The store of spilled copies of a compiled module (or its program), None if it spills
    nothing: kept on the program where the spill ops run between partitions (CUDA), else held by
    the external kernels of its TVM program."""
    spill_file = getattr(getattr(module, "program", module), "orca_spill_file", None)
    return spill_file if spill_file is not None else extern_state(module, "spill_file")


SPILL_IMPL = ExternImpl("spill", SPILL_OPS, vm_call)
for _op in SPILL_OPS:
    register_host_op(_op, bind_spills)  # on CUDA: copies to and from pinned host memory (spilling_cuda)
    register_vm_op(_op, SPILL_IMPL, kinds=("cpu",))
