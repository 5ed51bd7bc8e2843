"""Pass declarations and the pass registry.

A pass is a small declared class: a kebab-case `name`, a one-line `summary` (the first line of its
docstring), typed `Options` (a dataclass), the invariants it `requires` and `establishes`, and
`run(ir, ctx) -> PassResult`. `@register_pass` makes it available to pipelines and `orca passes`.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import PipelineError
from .ir import GraphIR

_KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


@dataclass
class NoOptions:
    """A pass without options."""


@dataclass
class PassResult:
    """What a pass returns: the IR, whether anything changed, and counters (e.g. {"folded": 3})."""

    ir: GraphIR
    modified: bool
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class PassContext:
    """State shared by the passes of one pipeline run.

    `example_inputs` are the user's inputs (for passes that need data); `config` holds free-form
    settings for passes; `instruments` observe and steer the run (see orca_compiler.instruments).
    """

    example_inputs: tuple = ()
    instruments: list = field(default_factory=list)
    verify_each: bool = True
    config: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class of every pass. Subclasses set `name`, `Options`, and implement `run`."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    requires: ClassVar[tuple[str, ...]] = ()
    establishes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def run(self, ir: GraphIR, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<pass {self.name} {self.options}>"


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: add a pass to the registry (its name must be kebab-case and unique)."""
    if not _KEBAB.match(cls.name or ""):
        raise ValueError(f"pass class {cls.__name__} needs a kebab-case name, got {cls.name!r}")
    if not dataclasses.is_dataclass(cls.Options):
        raise ValueError(f"pass '{cls.name}': Options must be a dataclass")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"pass name '{cls.name}' is already registered by {existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_pass(name: str) -> None:
    """Remove a pass from the registry (tests register throwaway passes)."""
    _REGISTRY.pop(name, None)


def registered_passes() -> dict[str, type[Pass]]:
    """All registered passes by name, sorted by name."""
    _load_pass_library()
    return dict(sorted(_REGISTRY.items()))


def get_pass_class(name: str) -> type[Pass]:
    """The pass class called `name`; PipelineError listing the valid names if there is none."""
    passes = registered_passes()
    if name not in passes:
        raise PipelineError(f"unknown pass '{name}'; registered passes: {', '.join(passes)}")
    return passes[name]


def _load_pass_library() -> None:
    from . import passes  # noqa: F401  (importing registers the library's passes)


def option_fields(cls: type[Pass]) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls.Options))


def coerce_option(pass_name: str, fld: dataclasses.Field, text: Any, hints: dict) -> Any:
    """Convert an option value from pipeline text to the field's declared type."""
    typ = hints.get(fld.name, str)
    if not isinstance(text, str):
        return text
    origin = typing.get_origin(typ)
    try:
        if typ is bool:
            low = text.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError(text)
        if typ in (int, float, str):
            return typ(text)
        if origin is typing.Literal:
            allowed = typing.get_args(typ)
            if text not in allowed:
                raise ValueError(f"expected one of {', '.join(map(str, allowed))}")
            return text
        if origin in (tuple, list):
            items = [t for t in text.split(":") if t]
            return tuple(items)
    except ValueError as exc:
        raise PipelineError(
            f"pass '{pass_name}': option '{fld.name}' got {text!r}, which is not a valid {getattr(typ, '__name__', typ)}"
            + (f" ({exc})" if str(exc) != text else "")
        ) from None
    return text


def build_options(cls: type[Pass], given: dict[str, Any]) -> Any:
    """The Options dataclass of `cls` from pipeline text values; errors list the valid options."""
    fields = {f.name: f for f in option_fields(cls)}
    hints = typing.get_type_hints(cls.Options)
    for key in given:
        if key not in fields:
            valid = ", ".join(fields) if fields else "none"
            raise PipelineError(f"pass '{cls.name}' has no option '{key}'; its options: {valid}")
    values = {k: coerce_option(cls.name, fields[k], v, hints) for k, v in given.items()}
    return cls.Options(**values)
