"""Pipelines as text, MLIR style: `fold-constants,fold-bn,cse,dce{keep_outputs=true}`.

`parse_pipeline` and `format_pipeline` round-trip; a named pipeline (`O0`..`O3`) may stand for its
passes anywhere in the text and is expanded when parsed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import PipelineError
from .pass_base import Pass, build_options, get_pass_class

# O0 runs nothing. O1 cleans the graph, folds BatchNorm into the weights before it, and turns
# LSTM/GRU into a hoisted input GEMM plus a recurrence kernel (decompose-rnn runs after
# fold-constants, which folds the zero initial states it slices).
# O2/O3 also fuse op groups into single kernels (epilogues, attention, elementwise chains; after
# fold-bn so a conv's BatchNorm is gone before its epilogue is matched); they grow as
# quantization and placement land (their issues add them here).
NAMED_PIPELINES: dict[str, str] = {
    "O0": "",
    "O1": "fold-constants,fold-bn,decompose-rnn,cse,dce",
    "O2": "fold-constants,fold-bn,decompose-rnn,fuse,cse,dce",
    "O3": "fold-constants,fold-bn,decompose-rnn,fuse,cse,dce",
}

_ELEMENT = re.compile(r"^(?P<name>[A-Za-z0-9_-]+)(\{(?P<opts>[^{}]*)\})?$")


@dataclass(frozen=True)
class PassSpec:
    """One pipeline element: a pass name and the options written for it (as text)."""

    name: str
    options: tuple[tuple[str, str], ...] = field(default=())

    def format(self) -> str:
        if not self.options:
            return self.name
        return self.name + "{" + ",".join(f"{k}={v}" for k, v in self.options) + "}"

    def instantiate(self) -> Pass:
        cls = get_pass_class(self.name)
        return cls(build_options(cls, dict(self.options)))


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"unbalanced '}}' in pipeline {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise PipelineError(f"unbalanced '{{' in pipeline {text!r}")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_pipeline(text: str) -> list[PassSpec]:
    """Parse pipeline text into PassSpecs; unknown passes and options raise PipelineError."""
    specs: list[PassSpec] = []
    for element in _split_top_level(text.strip()):
        if element in NAMED_PIPELINES:
            specs.extend(parse_pipeline(NAMED_PIPELINES[element]))
            continue
        match = _ELEMENT.match(element)
        if not match:
            raise PipelineError(f"cannot parse pipeline element {element!r}: expected name or name{{key=value,...}}")
        options = []
        for item in filter(None, (s.strip() for s in (match.group("opts") or "").split(","))):
            if "=" not in item:
                raise PipelineError(f"option {item!r} of pass '{match.group('name')}' needs the form key=value")
            key, value = (s.strip() for s in item.split("=", 1))
            options.append((key, value))
        spec = PassSpec(match.group("name"), tuple(options))
        spec.instantiate()  # validates the name and every option now, not halfway through a compile
        specs.append(spec)
    return specs


def format_pipeline(specs: list[PassSpec]) -> str:
    """The canonical text of a pipeline; `parse_pipeline(format_pipeline(p)) == p`."""
    return ",".join(spec.format() for spec in specs)
