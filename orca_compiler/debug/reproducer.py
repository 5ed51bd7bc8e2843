"""Crash reproducers: the input IR of a failing pass, with its weights, plus the rest of the pipeline.

A reproducer folder holds (MLIR's `--mlir-pass-pipeline-crash-reproducer`):

- `input.pt2`: the IR the failing pass received, saved with `torch.export.save` (weights included);
- `input.ir`: the same IR as printer text, for reading;
- `inputs.pt`: the flat example inputs the pipeline ran with (`ctx.example_inputs`);
- `reference.pt`: for a numeric violation, the eager outputs the IR was compared with;
- `manifest.json`: the remaining pipeline, what failed and how, and what `torch.export` does not
  keep (node order and names, `meta["orca_*"]`, the pytree specs).

`replay(folder)` loads the IR, runs the remaining pipeline, and says whether it fails the same way.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..errors import OrcaError, PassError
from ..instruments import Instrument
from ..ir import GraphIR, from_exported_program, to_exported_program
from ..pass_base import PassContext
from ..pass_manager import PassManager
from ..pipeline import format_pipeline
from ..printer import format_ir
from .numerics import NumericsCheck, max_abs_of

FORMAT = "orca-reproducer"
VERSION = 1
MANIFEST, IR_FILE, IR_TEXT, INPUTS_FILE, REFERENCE_FILE = (
    "manifest.json", "input.pt2", "input.ir", "inputs.pt", "reference.pt")


class ReproducerError(OrcaError):
    """A folder given to `replay` is not a reproducer, or lacks one of its files (the message names it)."""


# -- saving and loading the IR -------------------------------------------------------------------


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _node_entries(ir: GraphIR) -> list[dict]:
    """Per node, in graph order: name, op, get_attr target and the JSON-able `meta["orca_*"]` keys
    (torch.export.save keeps neither our meta nor the order of weights among the other nodes)."""
    entries = []
    for node in ir.graph.nodes:
        meta = {k: v for k, v in node.meta.items() if k.startswith("orca_") and _jsonable(v)}
        entries.append({"name": node.name, "op": node.op,
                        "target": node.target if node.op == "get_attr" else None, "meta": meta})
    return entries


def _dump_spec(spec) -> str | None:
    if spec is None:
        return None
    try:
        return pytree.treespec_dumps(spec)
    except Exception:  # a pytree node type without a serializer: replay does not need the spec
        return None


def save_ir(ir: GraphIR, folder: Path) -> dict:
    """Write `ir` as `input.pt2` (+ `input.ir` text) into `folder`; return what the manifest must
    add so `load_ir` rebuilds the same IR (node order, names, orca meta, pytree specs)."""
    torch.export.save(to_exported_program(ir.gm), folder / IR_FILE)
    (folder / IR_TEXT).write_text(format_ir(ir))
    return {"nodes": _node_entries(ir), "in_spec": _dump_spec(ir.in_spec), "out_spec": _dump_spec(ir.out_spec)}


def _restore_nodes(ir: GraphIR, entries: list[dict]) -> None:
    """Rename, reorder and re-annotate the loaded nodes to match `entries` (graph order at save time).

    Assumes loaded placeholders and computed nodes kept their names and get_attr nodes are named
    after their target (what from_exported_program does); a weight used by several get_attr nodes
    comes back as one node, so the extra ones are recreated.
    """
    graph = ir.graph
    by_name = {n.name: n for n in graph.nodes if n.op != "get_attr"}
    by_target = {n.target: n for n in graph.nodes if n.op == "get_attr"}
    ordered: list[fx.Node] = []
    for entry in entries:
        if entry["op"] == "get_attr":
            node = by_target.get(entry["target"])
            if node is None or node in ordered:  # a second get_attr of the same weight
                source = node
                with graph.inserting_before(next(iter(graph.nodes))):
                    node = graph.get_attr(entry["target"])
                node.meta = dict(source.meta) if source is not None else {}
            if node.name != entry["name"]:
                node._rename(entry["name"])
        else:
            node = by_name[entry["name"]] if entry["op"] != "output" else ir.output_node()
        node.meta.update(entry["meta"])
        ordered.append(node)
    next(iter(graph.nodes)).prepend(ordered[0])
    for prev, node in zip(ordered, ordered[1:]):
        prev.append(node)
    ir.recompile()


def load_ir(folder: Path, manifest: dict) -> GraphIR:
    """The IR saved by `save_ir` (orca ops resolve because importing orca_compiler registers them)."""
    ir = from_exported_program(torch.export.load(folder / IR_FILE))
    _restore_nodes(ir, manifest["nodes"])
    ir.in_spec = pytree.treespec_loads(manifest["in_spec"]) if manifest.get("in_spec") else None
    ir.out_spec = pytree.treespec_loads(manifest["out_spec"]) if manifest.get("out_spec") else None
    return ir


# -- writing -----------------------------------------------------------------------------------


def failure_of(error: BaseException) -> dict:
    """What identifies a pass failure: the pass, and the type and message of the root error
    (a PassError's cause when it wraps one; the PassError's own 'passes run before it' part would
    differ in a replay, which starts at the failing pass)."""
    root = error.__cause__ if isinstance(error, PassError) and error.__cause__ is not None else error
    return {"pass": getattr(error, "pass_name", None), "type": type(root).__name__, "message": str(root)}


def write_reproducer(folder: str | Path, ir: GraphIR, pipeline: str, inputs: tuple, failure: dict,
                     *, reference=None, tol: float | None = None) -> Path:
    """Write a reproducer of `failure` into `folder` (created; files of an older one are replaced).

    `ir` is the failing pass's input, `pipeline` the text from that pass to the end, `inputs` the
    flat example inputs. `failure` has "kind" ("pass-error" or "numeric") and "pass", plus "type"
    and "message" for a pass error or "max_abs" for a numeric violation, which also needs the eager
    `reference` outputs and `tol`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "version": VERSION, "pipeline": pipeline, "failure": failure, "tol": tol}
    manifest.update(save_ir(ir, folder))
    torch.save(tuple(inputs), folder / INPUTS_FILE)
    if reference is not None:
        leaves = [t for t in pytree.tree_leaves(reference) if isinstance(t, torch.Tensor)]
        torch.save(leaves, folder / REFERENCE_FILE)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return folder


class ReproducerWriter(Instrument):
    """Keep each pass's input IR; `write_pass_error(error)` or, per pass, a numeric violation found
    by `numerics` (a NumericsCheck placed before this instrument) write a reproducer to `folder`.

    Only the first failure is written (the later ones follow from it). `specs` are the pipeline's
    PassSpecs, for the remaining pipeline text.
    """

    def __init__(self, folder: str | Path, specs: list, inputs: tuple, *, numerics: NumericsCheck | None = None,
                 tol: float | None = None):
        self.folder, self.specs, self.inputs = Path(folder), list(specs), tuple(inputs)
        self.numerics, self.tol = numerics, tol
        self.written: Path | None = None
        self._last: tuple[int, GraphIR] | None = None
        self._before_error = 0.0

    def enter_pipeline(self, ir, passes) -> None:
        if self.numerics is not None and self.numerics.rows:
            self._before_error = max_abs_of(self.numerics.rows[-1][2])

    def run_before_pass(self, index, pass_, ir) -> None:
        self._last = (index, ir)  # passes work on copies, so this IR stays as the pass received it

    def run_after_pass(self, index, pass_, record) -> None:
        if self.numerics is None or self.tol is None or self.written or self._last is None:
            return
        error = max_abs_of(self.numerics.rows[-1][2])
        if error > self.tol >= self._before_error:
            failure = {"kind": "numeric", "pass": record.name, "max_abs": error}
            self._write(failure, reference=self.numerics.reference)
        self._before_error = error

    def write_pass_error(self, error: BaseException) -> Path | None:
        """Write the reproducer of a PassError raised by the pass last started; None if none started."""
        if self.written or self._last is None:
            return None
        return self._write({"kind": "pass-error", **failure_of(error)})

    def _write(self, failure: dict, reference=None) -> Path:
        index, ir = self._last
        self.written = write_reproducer(self.folder, ir, format_pipeline(self.specs[index:]), self.inputs,
                                        failure, reference=reference, tol=self.tol)
        return self.written


# -- replay ------------------------------------------------------------------------------------


@dataclass
class ReplayResult:
    """What a replay did: `expected` is the recorded failure, `got` the replay's (None: it passed)."""

    folder: Path
    pipeline: str
    expected: dict
    got: dict | None = None
    error: PassError | None = field(default=None, repr=False)

    @property
    def reproduced(self) -> bool:
        """True when the replay failed the same way: same pass, and same error type and message, or
        the same max abs error (to 1e-6 relative: the same ops on the same CPU give the same bits)."""
        if self.got is None or self.got.get("kind") != self.expected.get("kind"):
            return False
        if self.expected["kind"] == "numeric":
            return (self.got["pass"] == self.expected["pass"]
                    and abs(self.got["max_abs"] - self.expected["max_abs"]) <= 1e-6 * abs(self.expected["max_abs"]))
        return all(self.got[k] == self.expected[k] for k in ("pass", "type", "message"))

    def describe(self) -> str:
        """One line: what failed in the replay and whether it matches the recording."""
        what = _describe_failure(self.got) if self.got else "the pipeline ran without a failure"
        verdict = "reproduced" if self.reproduced else f"NOT reproduced (recorded: {_describe_failure(self.expected)})"
        return f"replay {self.folder} (pipeline {self.pipeline}): {what} -- {verdict}"


def _describe_failure(failure: dict) -> str:
    if failure["kind"] == "numeric":
        return f"pass '{failure['pass']}' exceeds tol (max abs error {failure['max_abs']:.3e})"
    return f"pass '{failure['pass']}' failed: {failure['type']}: {failure['message']}"


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a reproducer folder; ReproducerError naming what is missing otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReproducerError(f"{folder}: no such folder (expected a reproducer written by `orca debug`)")
    path = folder / MANIFEST
    if not path.is_file():
        raise ReproducerError(f"{folder} is not a reproducer: it has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReproducerError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ReproducerError(f"{path}: not an {FORMAT} manifest (no \"format\": \"{FORMAT}\")")
    missing = [k for k in ("pipeline", "failure", "nodes") if k not in manifest]
    needed = [IR_FILE, INPUTS_FILE] + ([REFERENCE_FILE] if manifest.get("failure", {}).get("kind") == "numeric" else [])
    missing += [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise ReproducerError(f"{folder} is not a complete reproducer: missing {', '.join(missing)}")
    return manifest


def replay(folder: str | Path) -> ReplayResult:
    """Load a reproducer and run its remaining pipeline on its IR; the result says how it failed.

    Passes registered by a script (not by orca_compiler) must be registered before the call.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    ir = load_ir(folder, manifest)
    inputs = tuple(torch.load(folder / INPUTS_FILE, weights_only=True))
    result = ReplayResult(folder, manifest["pipeline"], manifest["failure"])
    manager = PassManager(manifest["pipeline"])
    numerics = None
    if result.expected["kind"] == "numeric":
        numerics = NumericsCheck(inputs, torch.load(folder / REFERENCE_FILE, weights_only=True))
    try:
        manager.run(ir, PassContext(example_inputs=inputs, instruments=[numerics] if numerics else []))
    except PassError as exc:
        result.got, result.error = {"kind": "pass-error", **failure_of(exc)}, exc
        return result
    if numerics is not None:
        result.got = _first_violation(numerics, manifest["tol"])
    return result


def _first_violation(numerics: NumericsCheck, tol: float) -> dict | None:
    """The first pass (rows after the captured one) whose max abs error exceeds `tol`."""
    for index, name, errors in numerics.rows:
        if index >= 0 and max_abs_of(errors) > tol:
            return {"kind": "numeric", "pass": name, "max_abs": max_abs_of(errors)}
    return None
