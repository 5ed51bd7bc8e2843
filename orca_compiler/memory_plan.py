"""Liveness of every tensor of the IR and an activation memory plan with buffer reuse.

Execution order is the order of the IR's call_function nodes (step i runs node i). For each
tensor the analysis records the step that creates it and the last step that reads it:
- weights (get_attr) and model inputs live from their first use to their last;
- activations live from their producer to their last reader, and model outputs to the end;
- views (ops whose schema says the result aliases an input: view, transpose, select, expand, ...)
  take no memory of their own and keep their base alive as long as they are read;
- each element of a multi-output op (an LSTM's output and states) is its own tensor.

`plan_activations` places the activations in one arena: greedy by size (largest first, each at
the lowest aligned offset where it overlaps no tensor whose lifetime overlaps its own), the
"greedy by size" planner of TFLite and of the memory-planning literature. Its peak lies between
the lower bound (the most bytes live at any one step) and the no-reuse total.

Assumes the IR conventions of orca_compiler.ir; symbolic dimensions are sized at their example
value (the plan is then for the example shapes).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .ir import GraphIR
from .ops.placement import FETCH, PREFETCH, RELEASE, SPILL

ALIGNMENT = 64


@dataclass
class TensorLife:
    """One tensor: what it is, its size and the steps [first, last] during which it must exist."""

    name: str
    # "weight" | "input" | "activation" | "streamed" (a fetched weight, in the pool) | "spilled"
    # (an activation's copy on the slow tier, orca.spill)
    kind: str
    nbytes: int
    first: int
    last: int
    node: fx.Node | None = None
    index: int | None = None  # the element of a multi-output node
    is_output: bool = False

    def overlaps(self, other: "TensorLife") -> bool:
        return self.first <= other.last and other.first <= self.last


def _nbytes(val) -> int:
    if not isinstance(val, torch.Tensor):
        return 0
    numel = 1
    for s in val.shape:
        numel *= int(s) if isinstance(s, int) else int(s.node.hint)
    return numel * val.element_size()


def is_view(node: fx.Node) -> bool:
    """Whether `node`'s result aliases an input (schema alias info; getitem of a tuple too)."""
    if node.target is operator.getitem:
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.returns:
        return False
    return schema.returns[0].alias_info is not None and not schema.is_mutable


def storage_of(node: fx.Node) -> tuple[fx.Node, int | None]:
    """The (node, element) whose memory `node`'s value lives in, following views."""
    index = None
    while node.op == "call_function" and is_view(node):
        if node.target is operator.getitem:
            node, index = node.args[0], node.args[1]
            if node.op == "call_function" and not is_view(node):
                return node, index
            continue
        node = node.args[0]
    return node, index


def liveness(ir: GraphIR) -> list[TensorLife]:
    """Every tensor that takes memory (weights, inputs, activations), with its lifetime in steps."""
    steps = {node: i for i, node in enumerate(ir.compute_nodes())}
    end = len(steps)
    lives: dict[tuple[fx.Node, int | None], TensorLife] = {}

    def life(storage: tuple[fx.Node, int | None]) -> TensorLife:
        if storage not in lives:
            node, index = storage
            val = node.meta.get("val")
            if index is not None:
                val = val[index]
            kind = {"get_attr": "weight", "placeholder": "input"}.get(node.op, "activation")
            if node.target is FETCH:
                kind = "streamed"  # a weight's copy in place-memory's pool, not an activation
            elif node.target is SPILL:
                kind = "spilled"  # an activation's copy on the slow tier, alive until its reload
            computed = kind in ("activation", "spilled")
            first = steps.get(node, end) if computed else end
            name = node.name if index is None else f"{node.name}[{index}]"
            # weights and inputs: first and last come from their uses (an unused one stays empty)
            last = first if computed else -1
            lives[storage] = TensorLife(name, kind, _nbytes(val), first, last, node, index)
        return lives[storage]

    for node in ir.compute_nodes():
        if not is_view(node):
            val = node.meta.get("val")
            for index in (range(len(val)) if isinstance(val, (tuple, list)) else [None]):
                life((node, index))
        for arg in node.all_input_nodes:
            used = life(storage_of(arg))
            used.first = min(used.first, steps[node])
            used.last = max(used.last, steps[node])
    for value in ir.output_values():
        if isinstance(value, fx.Node):
            used = life(storage_of(value))
            used.last = end
            used.is_output = True
    return [t for t in lives.values() if t.nbytes > 0 and isinstance(t.node.meta.get("val"), (torch.Tensor, tuple, list))]


@dataclass
class MemoryPlan:
    """Arena offsets of the activations, the arena size (peak) and two references: the bytes
    without reuse and the lower bound (most bytes live at one step)."""

    offsets: dict[str, int]
    sizes: dict[str, int]
    peak: int
    no_reuse: int
    lower_bound: int
    lives: list[TensorLife] = field(default_factory=list)


def _aligned(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def live_bytes_by_step(lives: list[TensorLife], steps: int) -> list[int]:
    """Bytes of the given tensors alive at each step."""
    totals = [0] * (steps + 1)
    for t in lives:
        for s in range(t.first, min(t.last, steps) + 1):
            totals[s] += t.nbytes
    return totals


def place_by_size(sizes: dict, lives: dict, alignment: int = ALIGNMENT) -> dict:
    """Offsets in one arena for buffers of `sizes[key]` bytes, each alive during the closed
    intervals `lives[key]` ([(first, last), ...]; one or more): greedy by size (largest first,
    earliest first on ties), each at the lowest `alignment`-aligned offset where it overlaps no
    buffer placed before it whose life overlaps its own. The arena's size is the largest
    offset + aligned size."""
    def overlaps(a, b) -> bool:
        return any(f1 <= l2 and f2 <= l1 for f1, l1 in lives[a] for f2, l2 in lives[b])

    offsets: dict = {}
    for key in sorted(sizes, key=lambda k: (-sizes[k], min(f for f, _ in lives[k]))):
        size = _aligned(sizes[key], alignment)
        busy = sorted((offsets[o], offsets[o] + _aligned(sizes[o], alignment)) for o in offsets if overlaps(key, o))
        offset = 0
        for lo, hi in busy:
            if offset + size <= lo:
                break
            offset = max(offset, hi)
        offsets[key] = offset
    return offsets


def plan_activations(ir: GraphIR, alignment: int = ALIGNMENT, reuse: bool = True) -> MemoryPlan:
    """Place every activation in one arena (greedy by size, place_by_size; `reuse=False`: one
    slot each)."""
    lives = [t for t in liveness(ir) if t.kind == "activation"]
    steps = len(ir.compute_nodes())
    if reuse:
        offsets = place_by_size({t.name: t.nbytes for t in lives}, {t.name: [(t.first, t.last)] for t in lives}, alignment)
    else:
        starts = [0]
        for t in lives:
            starts.append(starts[-1] + _aligned(t.nbytes, alignment))
        offsets = {t.name: start for t, start in zip(lives, starts)}
    no_reuse = sum(_aligned(t.nbytes, alignment) for t in lives)
    peak = max((offsets[t.name] + _aligned(t.nbytes, alignment) for t in lives), default=0)
    bound = max(live_bytes_by_step(lives, steps), default=0)
    return MemoryPlan(offsets, {t.name: t.nbytes for t in lives}, peak, no_reuse, bound, lives)


def run_in_arena(ir: GraphIR, plan: MemoryPlan, *inputs: torch.Tensor) -> tuple:
    """Run the IR with every planned activation copied into its arena slot right after it is
    computed (and read from there); outputs equal a normal run only if the plan is valid. A test
    of the plan, not a runtime: the copies cost time."""
    arena = torch.empty(max(plan.peak, 1), dtype=torch.uint8)
    by_node = {(t.node, t.index): t for t in plan.lives}

    def place(value, life: TensorLife):
        if not isinstance(value, torch.Tensor) or life.name not in plan.offsets:
            return value
        start = plan.offsets[life.name]
        raw = arena[start:start + value.numel() * value.element_size()].view(value.dtype)
        slot = raw.as_strided(value.shape, value.stride())  # the kernel's layout (e.g. sdpa's output)
        slot.copy_(value)
        return slot

    class ArenaInterpreter(fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if n.op != "call_function" or is_view(n):
                return result
            if isinstance(result, (tuple, list)):
                return type(result)(place(v, by_node[(n, i)]) if (n, i) in by_node else v for i, v in enumerate(result))
            return place(result, by_node[(n, None)]) if (n, None) in by_node else result

    ir.recompile()
    with torch.no_grad():
        out = ArenaInterpreter(ir.gm).run(*inputs)
    return tuple(t.clone() for t in (out if isinstance(out, (tuple, list)) else (out,)))


def pool_peak(ir: GraphIR) -> tuple[int, int]:
    """(capacity, planned peak) of place-memory's pool: bytes taken from each prefetch (or fetch
    without one) to its release, in IR order; (0, 0) if nothing is streamed."""
    capacity = used = peak = 0
    held: set = set()
    for node in ir.compute_nodes():
        if node.target in (PREFETCH, FETCH):
            capacity = max(capacity, node.args[2])
            if node.args[0] not in held:
                held.add(node.args[0])
                used += _nbytes(node.args[0].meta.get("val"))
                peak = max(peak, used)
        elif node.target is RELEASE:
            weight = node.args[0].args[0]
            held.discard(weight)
            used -= _nbytes(weight.meta.get("val"))
    return capacity, peak


# How the report orders tiers that place-memory named (fastest first); other names come after.
_TIER_ORDER = ("device", "ram", "host", "disk")


def _fast_tier_name(ir: GraphIR, streamed: set) -> str:
    """The fastest tier's name as place-memory annotated the resident weights (`ram` if none is)."""
    for node in ir.graph.nodes:
        if node.op == "get_attr" and node not in streamed and "tier" in node.meta.get("orca_annotations", {}):
            return node.meta["orca_annotations"]["tier"]
    return "ram"


def _homed_bytes(streamed: set) -> dict[str, int]:
    """Bytes of the streamed weights per home tier (their `tier` annotation; `disk` if none)."""
    homed: dict[str, int] = {}
    for node in streamed:
        tier = node.meta.get("orca_annotations", {}).get("tier", "disk")
        homed[tier] = homed.get(tier, 0) + _nbytes(node.meta.get("val"))
    rank = {name: i for i, name in enumerate(_TIER_ORDER)}
    return dict(sorted(homed.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])))


def memory_report(ir: GraphIR) -> str:
    """A table per tier: bytes resident, the activation peak with and without reuse and the
    lower bound (fast tier), place-memory's pool (capacity and planned peak) and the bytes moved
    into it per call from the slow tier."""
    lives = liveness(ir)
    plan = plan_activations(ir)
    streamed = {n.args[0] for n in ir.compute_nodes() if n.target is FETCH}
    weights = sum(t.nbytes for t in lives if t.kind == "weight" and t.node not in streamed)
    slow = sum(t.nbytes for t in lives if t.kind == "weight" and t.node in streamed)
    inputs = sum(t.nbytes for t in lives if t.kind == "input")
    capacity, peak = pool_peak(ir)
    largest = sorted(plan.lives, key=lambda t: -t.nbytes)[:5]
    fast = _fast_tier_name(ir, streamed)
    lines = [
        "tier  resident weights  inputs  activation peak (reuse)  without reuse  lower bound  moved",
        f"{fast:<5} {weights:>16,}  {inputs:>6,}  {plan.peak:>23,}  {plan.no_reuse:>13,}  {plan.lower_bound:>11,}  {slow:,}",
    ]
    if streamed:
        for tier, homed in _homed_bytes(streamed).items():  # streamed weights by home tier (host, disk)
            lines.append(f"{tier:<5} {homed:>16,}  {'-':>6}  {'-':>23}  {'-':>13}  {'-':>11}  0")
        lines.append(f"pool ({fast}, for streamed weights): capacity {capacity:,}, planned peak {peak:,}; "
                     f"fast-tier weights at most {weights + capacity:,} (resident + pool), "
                     f"{len(streamed)} weights streamed, {slow:,} bytes moved per call")
    spilled = [t for t in lives if t.kind == "spilled"]
    if spilled:  # place-memory's activation_budget: copies on the slow tier across idle gaps
        tier = spilled[0].node.meta.get("orca_annotations", {}).get("tier", "slow tier")
        at_once = max(live_bytes_by_step(spilled, len(ir.compute_nodes())), default=0)
        lines.append(f"spilled activations: {len(spilled)} to {tier}, {sum(t.nbytes for t in spilled):,} bytes written "
                     f"and read back per call, at most {at_once:,} there at once")
    lines.append("largest activations (bytes, live steps):")
    lines += [f"  %{t.name}: {t.nbytes:,} [{t.first}, {t.last}]" for t in largest]
    return "\n".join(lines)
