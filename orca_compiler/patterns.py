"""Rewrite rules as data: a small pattern language over the fx graph, and the rule applier.

A `FusionRule` is `(name, family, pattern, replacement, constraints)`. A pattern is a tree anchored
at its root, the last op of the group it matches:

- `Op(targets, *operands, name=, where=, commutative=)` matches a call of one of `targets` whose
  leading positional arguments match `operands` (`where(node)` checks anything else: scalar
  arguments, overload details); `commutative` also tries the first two arguments swapped;
- `Value(name)` matches any argument (an fx node or a literal) and binds it to `name`; a node
  the group reads this way cannot also be one it consumes (`relu(conv(x) + conv(x))` with one
  conv node is not a conv epilogue);
- `Region(accept, min_ops)` (at the root only) matches the largest group of ops `accept` takes
  that ends at the root and whose values are used only inside the group.

Every op matched below the root must have no user outside the match (an `Op` there has one user,
its parent), so once the root's uses go to the replacement the whole group is dead. The applier
erases it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .ir import GraphIR


def same_shape(a, b) -> bool:
    """Whether two shapes are provably equal, symbolic (dynamic) dimensions included: `s0` equals
    `s0` but not `s1`, whatever sizes the example inputs had. For rule constraints."""
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


@dataclass(frozen=True)
class Match:
    """What a pattern matched: values bound by name, the op nodes it consumes (users last), and
    the nodes it reads as operands (`Value`s), which it must not consume as well."""

    bindings: dict[str, Any] = field(default_factory=dict)
    nodes: tuple[fx.Node, ...] = ()
    operands: tuple[fx.Node, ...] = ()

    def __getitem__(self, name: str) -> Any:
        return self.bindings[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.bindings.get(name, default)

    def bind(self, name: str | None, value: Any) -> "Match | None":
        """This match with `name` bound to `value`; None if `name` is bound to something else."""
        if name is None:
            return self
        if name in self.bindings:
            return self if self.bindings[name] is value else None
        return Match({**self.bindings, name: value}, self.nodes, self.operands)

    def consume(self, *nodes: fx.Node) -> "Match":
        return Match(self.bindings, self.nodes + nodes, self.operands)

    def read(self, value: Any) -> "Match":
        operands = self.operands + ((value,) if isinstance(value, fx.Node) else ())
        return Match(self.bindings, self.nodes, operands)


class Pattern:
    """Base of the pattern elements: `match` yields every way `value` extends the match `m`."""

    def match(self, value: Any, m: Match, root: bool = False) -> Iterator[Match]:  # pragma: no cover
        raise NotImplementedError


@dataclass(frozen=True)
class Value(Pattern):
    """Any argument, bound to `name` (None: not bound)."""

    name: str | None = None

    def match(self, value, m, root=False):
        if value in m.nodes:
            return  # `relu(x + x)`: the group would consume the value it still reads
        bound = m.bind(self.name, value)
        if bound is not None:
            yield bound.read(value)


def _is_call(value: Any) -> bool:
    return isinstance(value, fx.Node) and value.op == "call_function"


@dataclass(frozen=True, init=False)
class Op(Pattern):
    """A call of one of `targets` whose leading positional arguments match `operands`."""

    targets: frozenset
    operands: tuple[Pattern, ...]
    name: str | None
    where: Callable[[fx.Node], bool] | None
    commutative: bool

    def __init__(self, targets, *operands: Pattern, name: str | None = None,
                 where: Callable[[fx.Node], bool] | None = None, commutative: bool = False):
        targets = frozenset(targets) if isinstance(targets, (set, frozenset, list, tuple)) else frozenset({targets})
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "operands", operands)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "where", where)
        object.__setattr__(self, "commutative", commutative)

    def match(self, value, m, root=False):
        if not _is_call(value) or value.target not in self.targets or value in m.nodes or value in m.operands:
            return
        if not root and len(value.users) != 1:
            return  # its value is used outside the group: fusing would compute it twice
        if len(value.args) < len(self.operands) or (self.where is not None and not self.where(value)):
            return
        orders = [tuple(value.args)]
        if self.commutative and len(value.args) >= 2:
            orders.append((value.args[1], value.args[0]) + tuple(value.args[2:]))
        for args in orders:
            for inner in _match_all(self.operands, args, m):
                bound = inner.bind(self.name, value)
                if bound is not None:
                    yield bound.consume(value)


def _match_all(patterns: tuple[Pattern, ...], values: tuple, m: Match) -> Iterator[Match]:
    if not patterns:
        yield m
        return
    for first in patterns[0].match(values[0], m):
        yield from _match_all(patterns[1:], values[1:], first)


@dataclass(frozen=True)
class Region(Pattern):
    """The largest group of ops that `accept` takes, ending at the root, whose values (but the
    root's) are used only inside the group; at least `min_ops` ops. Binds `name` to the group's
    nodes in graph order. Only valid as a rule's whole pattern."""

    accept: Callable[[fx.Node], bool]
    min_ops: int = 2
    name: str = "region"

    def match(self, value, m, root=False):
        if not root:
            raise ValueError("Region matches only at the root of a rule's pattern")
        if not _is_call(value) or not self.accept(value):
            return
        group = {value}
        grew = True
        while grew:
            grew = False
            for node in list(group):
                for arg in node.all_input_nodes:
                    if arg not in group and _is_call(arg) and self.accept(arg) and all(u in group for u in arg.users):
                        group.add(arg)
                        grew = True
        if len(group) < self.min_ops:
            return
        ordered = tuple(n for n in value.graph.nodes if n in group)
        yield Match({**m.bindings, self.name: ordered}, m.nodes + ordered, m.operands)


@dataclass(frozen=True)
class FusionRule:
    """A rewrite: where `pattern` matches at a node and every constraint holds on the match,
    `replacement(ir, match)` returns the value that takes the root's place (it inserts new nodes
    before the root) and the matched ops are erased."""

    name: str
    family: str
    pattern: Pattern
    replacement: Callable[[GraphIR, Match], fx.Node]
    constraints: tuple[Callable[[Match], bool], ...] = ()

    def find(self, node: fx.Node) -> Match | None:
        """The first match rooted at `node` that meets every constraint, or None."""
        for m in self.pattern.match(node, Match(), root=True):
            if all(check(m) for check in self.constraints):
                return m
        return None


def apply_rules(ir: GraphIR, rules: list[FusionRule]) -> dict[str, int]:
    """Apply each rule in turn everywhere it matches; returns {rule name: times fired} for the
    rules that fired, in rule order.

    Nodes are visited from the output backwards, so a group is matched at its last op (a Region
    is as large as it can be) and ops rewritten by an earlier rule are not matched again.
    """
    fired: dict[str, int] = {}
    erased: set[fx.Node] = set()
    for rule in rules:
        for node in reversed(list(ir.graph.nodes)):
            if node in erased or node.op != "call_function":
                continue
            m = rule.find(node)
            if m is None:
                continue
            with ir.graph.inserting_before(node):
                replacement = rule.replacement(ir, m)
            _keep_provenance(replacement, m.nodes)
            node.replace_all_uses_with(replacement)
            for dead in reversed(m.nodes):
                ir.graph.erase_node(dead)
                erased.add(dead)
            fired[rule.name] = fired.get(rule.name, 0) + 1
    return fired


def _keep_provenance(replacement: fx.Node, matched: list[fx.Node]) -> None:
    """Give a fused node the module path of the innermost layer it replaces (the linear of a
    linear + add + relu group), so layer names (skip lists, reports) still find it."""
    stacks = [n.meta["nn_module_stack"] for n in matched if n.meta.get("nn_module_stack")]
    if stacks and "nn_module_stack" not in replacement.meta:
        replacement.meta["nn_module_stack"] = max(stacks, key=len)
