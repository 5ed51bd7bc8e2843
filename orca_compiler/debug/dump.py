"""IR dumps to a folder: NN_<pass>.before.ir / NN_<pass>.after.ir / NN_<pass>.diff (MLIR's print-ir-* flags)."""
from __future__ import annotations

import difflib
from pathlib import Path

from ..instruments import Instrument
from ..printer import format_ir


def ir_diff(before: str, after: str, name: str) -> str:
    """A unified diff of two printer texts, labelled `name.before` / `name.after` ('' if equal)."""
    lines = difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                 fromfile=f"{name}.before", tofile=f"{name}.after")
    return "".join(lines)


class IRDumper(Instrument):
    """Write the IR around selected passes into `dump_dir`.

    `after_all`: after every pass; `after` / `before`: pass names to dump after / before;
    `after_change`: after every pass whose printed IR differs from its input; `after_failure`: the
    input IR of a pass that raised plus `NN_<pass>.error.txt`. Every `.after.ir` of a pass that
    changed the IR comes with its `.diff`. NN is the pass's position in the pipeline (from 00), so
    a pass listed twice gets two sets of files. `written` lists the paths in the order written.
    """

    def __init__(self, dump_dir: str | Path, *, after_all: bool = False, after: set[str] = frozenset(),
                 before: set[str] = frozenset(), after_change: bool = False, after_failure: bool = False):
        self.dir = Path(dump_dir)
        self.after_all, self.after, self.before = after_all, set(after), set(before)
        self.after_change, self.after_failure = after_change, after_failure
        self.written: list[Path] = []
        self._text_before = ""

    def run_before_pass(self, index, pass_, ir) -> None:
        self._text_before = format_ir(ir)
        if pass_.name in self.before:
            self._write(index, pass_.name, "before.ir", self._text_before)

    def run_after_pass(self, index, pass_, record) -> None:
        text_after = format_ir(record.ir_after)
        changed = text_after != self._text_before
        if self.after_all or pass_.name in self.after or (self.after_change and changed):
            self._write(index, pass_.name, "after.ir", text_after)
            if changed:
                self._write(index, pass_.name, "diff", ir_diff(self._text_before, text_after, f"{index:02d}_{pass_.name}"))

    def run_after_failure(self, index, pass_, ir, error) -> None:
        if self.after_failure:
            self._write(index, pass_.name, "before.ir", format_ir(ir))
            self._write(index, pass_.name, "error.txt", f"{type(error).__name__}: {error}\n")

    def _write(self, index: int, name: str, suffix: str, text: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{index:02d}_{name}.{suffix}"
        path.write_text(text)
        self.written.append(path)
