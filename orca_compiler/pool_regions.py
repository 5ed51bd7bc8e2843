"""Where each streamed weight lives in the fast-tier pool: regions of one arena, planned from the
placement chain (the prefetch / fetch / release ops place-memory writes into the IR).

The placement ops form one chain that runs in a fixed order, so the pool's allocations and frees
are known before the program runs (`placement_events`): a weight is allocated at its prefetch
(or its fetch, where it has none) and freed at its release. Regions planned from that sequence
(`plan_regions`) never overlap a region still in use, whichever thread does the copy. The
runtime (lowering/streaming.py) lays its arena out by them; place-memory checks its choices
against them (a plan whose regions do not fit the pool runs with a buffer per copy).
"""
from __future__ import annotations

import torch.fx as fx

from .memory_plan import place_by_size
from .ops.placement import FETCH, RELEASE
from .placement import POOL_ALIGNMENT, Placement, placement_chain, pool_footprint


def plan_regions(events: list[tuple[str, object, int]], capacity: int) -> dict | None:
    """Offsets (POOL_ALIGNMENT-aligned) in a pool of `capacity` bytes for a fixed sequence of
    ("alloc" | "alloc_top", key, nbytes) / ("free", key, 0) events; a key allocated again (a
    wrap-around weight) keeps one region for all its lives. The whole sequence is known, so the
    regions are planned ahead, greedy by size (memory_plan.place_by_size, as for activations);
    where that goes over the capacity, the chain is replayed first fit (`_replay_first_fit`, with
    and without placing wrap-around weights at the top). None where nothing fits."""
    sizes: dict = {}
    lives: dict = {}
    opened: dict = {}
    for i, (kind, key, nbytes) in enumerate(events):
        if kind.startswith("alloc"):
            opened[key] = i
            sizes[key] = max(sizes.get(key, 0), pool_footprint(max(nbytes, 1)))
        else:
            lives.setdefault(key, []).append((opened.pop(key), i))
    for key, i in opened.items():  # held to the end of the sequence
        lives.setdefault(key, []).append((i, len(events)))
    offsets = place_by_size(sizes, lives, POOL_ALIGNMENT)
    if all(offsets[key] + sizes[key] <= capacity for key in offsets):
        return offsets
    return _replay_first_fit(events, capacity) or _replay_first_fit(
        [(kind.replace("_top", ""), key, nbytes) for kind, key, nbytes in events], capacity)


def _replay_first_fit(events: list[tuple[str, object, int]], capacity: int) -> dict | None:
    """plan_regions by replaying the events: first fit ("alloc_top": the highest fit); a key
    allocated again gets its first region back. None where fragmentation would take the pool over
    its capacity, or the region to get back is taken."""
    holes = [(0, capacity)]  # (start, end), sorted, disjoint
    where: dict = {}
    for kind, key, nbytes in events:
        if kind.startswith("alloc"):
            size = pool_footprint(max(nbytes, 1))
            if key in where:  # its region again
                start = where[key][0]
                i = next((i for i, (a, b) in enumerate(holes) if a <= start and start + size <= b), None)
            elif kind == "alloc_top":
                i = next((i for i in reversed(range(len(holes))) if holes[i][1] - holes[i][0] >= size), None)
                start = (holes[i][1] - size) // POOL_ALIGNMENT * POOL_ALIGNMENT if i is not None else 0
                i = i if i is not None and start >= holes[i][0] else None
            else:
                i = next((i for i, (a, b) in enumerate(holes) if b - a >= size), None)
                start = holes[i][0] if i is not None else 0
            if i is None:
                return None
            a, b = holes[i]
            where[key] = (start, size)
            holes[i:i + 1] = [(x, y) for x, y in ((a, start), (start + size, b)) if x < y]
        else:
            a, size = where[key]
            holes.append((a, a + size))
            holes.sort()
            merged = [holes[0]]
            for start, end in holes[1:]:
                if start <= merged[-1][1]:
                    merged[-1] = (merged[-1][0], max(merged[-1][1], end))
                else:
                    merged.append((start, end))
            holes = merged
    return {key: offset for key, (offset, _) in where.items()}


def placement_events(nodes: list[fx.Node], nbytes: dict[str, int]) -> list[tuple[str, str, int]]:
    """pool_events of a program's placement nodes (in chain order), keyed by weight name."""
    def named(node: fx.Node) -> tuple[str, str]:
        if node.target == RELEASE:
            return "release", node.args[0].args[0].target
        return ("fetch" if node.target == FETCH else "prefetch"), node.args[0].target

    return pool_events([named(n) for n in nodes], nbytes)


def pool_events(chain: list[tuple[str, str]], nbytes: dict[str, int]) -> list[tuple[str, str, int]]:
    """The pool's allocations and frees for a placement chain of ("prefetch" | "fetch" | "release",
    weight) in the order it runs: a weight is allocated at its prefetch (or its fetch, where none)
    and freed at its release. A wrap-around prefetch's weight (prefetched after its fetch, for the
    next call) is held when a call starts ("alloc_top"), and gets its region back at that prefetch."""
    fetched_first = set()
    wrapped = []
    for kind, name in chain:
        if kind == "fetch":
            fetched_first.add(name)
        elif kind == "prefetch" and name in fetched_first:
            wrapped.append(name)
    events = [("alloc_top", name, nbytes[name]) for name in wrapped]
    allocated = set(wrapped)
    for kind, name in chain:
        if kind == "release":
            events.append(("free", name, 0))
            allocated.discard(name)
        elif name not in allocated:
            allocated.add(name)
            events.append(("alloc", name, nbytes[name]))
    return events


def regions_fit(plan: Placement) -> bool:
    """Whether the pool's regions for `plan` can be planned in one arena of its capacity (else the
    runtime gives each copy a buffer of its own: fresh pages to fault in on every copy)."""
    chain = [(kind, w.name) for _, kind, w in placement_chain(plan)]
    return plan_regions(pool_events(chain, {w.name: w.nbytes for w in plan.streamed}), plan.pool_bytes) is not None
