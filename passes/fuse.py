"""Fuse op groups into single kernels by pattern rules: conv/linear epilogues, attention, elementwise chains."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from orca_compiler.errors import PipelineError
from orca_compiler.ir import GraphIR
from orca_compiler.pass_base import Pass, PassContext, PassResult, register_pass
from orca_compiler.patterns import FusionRule, Match, Op, Value, apply_rules

from . import fuse_attention, fuse_elementwise, fuse_epilogue

aten = torch.ops.aten


def _identity_clone(node: fx.Node) -> bool:
    """A clone whose result equals its input in values and layout, in a functional graph: it can
    go. (Dropout in eval mode leaves such clones; one between a linear and its residual add would
    hide the epilogue.) Clones of inputs or weights and returned clones stay: the result must not
    alias what the caller owns."""
    source = node.args[0]
    if not (isinstance(source, fx.Node) and source.op == "call_function"):
        return False
    if node.kwargs.get("memory_format") not in (None, torch.contiguous_format, torch.preserve_format):
        return False
    if not source.meta["val"].is_contiguous():
        return False  # the copy makes it contiguous: a view after it needs that
    if any(user.op == "output" for user in node.users):
        return False
    users = list(node.users) + list(source.users)
    return not any(isinstance(u.target, torch._ops.OpOverload) and u.target._schema.is_mutable for u in users)


def _source(ir: GraphIR, m: Match) -> fx.Node:
    return m["source"]


COPY_RULES = [
    FusionRule("drop-clone", "copies", Op({aten.clone.default}, Value("source"), where=_identity_clone), _source),
]

# In the order they run: copies first (they hide the other patterns), then attention (its scale
# and mask are pointwise ops), epilogues (their activations are too), and elementwise last.
FAMILIES: dict[str, list[FusionRule]] = {
    "copies": COPY_RULES,
    "attention": fuse_attention.RULES,
    "epilogues": fuse_epilogue.RULES,
    "elementwise": fuse_elementwise.RULES,
}
ALL_RULES: list[FusionRule] = [rule for rules in FAMILIES.values() for rule in rules]


def _expand(names: tuple[str, ...], option: str) -> set[str]:
    """Rule names meant by `names` (each "all", a family or a rule); PipelineError for others."""
    rule_names = {rule.name for rule in ALL_RULES}
    chosen: set[str] = set()
    for name in names:
        if name == "all":
            chosen |= rule_names
        elif name in FAMILIES:
            chosen |= {rule.name for rule in FAMILIES[name]}
        elif name in rule_names:
            chosen.add(name)
        else:
            raise PipelineError(
                f"pass 'fuse': option '{option}' names an unknown rule {name!r}; valid: all, families "
                f"{', '.join(FAMILIES)}, or rules {', '.join(rule.name for rule in ALL_RULES)}"
            )
    return chosen


@dataclass
class FuseOptions:
    # Rules to apply: "all", family names (copies, attention, epilogues, elementwise) or rule
    # names, separated by ':' in pipeline text (`fuse{rules=epilogues:attention}`).
    rules: tuple[str, ...] = ("all",)
    # Rules (or families) not to apply, e.g. `fuse{skip=elementwise}`.
    skip: tuple[str, ...] = ()

    def __post_init__(self):
        self.rules, self.skip = tuple(self.rules), tuple(self.skip)
        self.selected = _expand(self.rules, "rules") - _expand(self.skip, "skip")


@register_pass
class Fuse(Pass):
    """Fuse op groups into one op each by pattern rules: conv/linear epilogues, attention, elementwise chains.

    Rules are data (passes/fuse_*.py): conv and linear followed by a residual add and/or an
    activation become `orca.conv_epilogue` / `orca.linear_epilogue` (rules `conv-add-relu`,
    `conv-relu`, `conv-add`, `linear-gelu`, ... for every activation); matmul-softmax-matmul and
    `scaled_dot_product_attention` become `orca.attention` (`attention`, `attention-scaled`,
    `attention-masked`, `attention-scaled-masked`, `sdpa`); the remaining groups of pointwise ops
    become `orca.elementwise` (`elementwise`); identity clones go first (`drop-clone`). A group
    fuses only where no other op reads its intermediate values. Stats: how often each rule fired.
    The lowering runs each fused op as one TVM kernel or one extern (oneDNN / torch) call.
    """

    name = "fuse"
    Options = FuseOptions
    establishes = ("fused",)

    def run(self, ir: GraphIR, ctx: PassContext) -> PassResult:
        rules = [rule for rule in ALL_RULES if rule.name in self.options.selected]
        fired = apply_rules(ir, rules)
        return PassResult(ir, bool(fired), fired)
