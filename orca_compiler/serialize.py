"""Save and load compiled programs: TVM libraries, the IR and metadata in one folder.

`CompiledModule.save(path)`, `orca_compiler.load(path)` and the on-disk level of the compile cache
(compile_cache.py) all use this format. A folder holds:

- `lib-<sha256>.so`: one exported TVM library per TVM program or partition (weights bound as
  constants are inside);
- the IR after the pipeline: extern (torch) kernels are bound again from it, eager partitions run
  it, `print_ir` shows it. `ir.json` + `weights.pt` (graph_json.py) when its shapes are static,
  else `ir.pt2` (`torch.export.save` of `ir.to_exported_program`, whose loading imports Dynamo);
- `tuning/database_workload.json`, `tuning/database_tuning_record.json` (when the compile used a
  tuning database): the records of the workloads its builds applied, in meta_schedule's JSON-lines
  form, so the folder says which schedules it holds and `tuning_db=<folder>/tuning` rebuilds them;
- `meta.json`: versions, target, the content hash and size of every file, the program's shape
  (one TVM program, partitions with the nodes each holds, or all eager), the extern kernels (node,
  implementation, the global function name the library calls), the input signature and pytree
  specs, and the compile report.

A library is loaded only after its bytes hash to what the metadata says; anything that does not
check out is a `LoadError` naming the file or field, never a crash or a stale kernel. Loading does
not import the `tvm` package (tvm_lite.py: 1.2-2 s saved in a fresh process): the libraries are
loaded and their VMs created through tvm_ffi, and the target stays its exported form until
something asks for a tvm.target.Target.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

from . import tvm_lite
from .errors import OrcaError, TargetError

FORMAT = 1
META = "meta.json"
IR_FILE = "ir.pt2"
GRAPH_FILE, WEIGHTS_FILE = "ir.json", "weights.pt"
TUNING_DIR = "tuning"
TUNING_WORKLOADS = f"{TUNING_DIR}/database_workload.json"  # meta_schedule's own file names
TUNING_RECORDS = f"{TUNING_DIR}/database_tuning_record.json"


class LoadError(OrcaError):
    """A saved program cannot be loaded: a file is missing, truncated or altered, the metadata does
    not parse, or it was written by other versions of orca/torch/TVM or for another target."""


@dataclass
class Artifact:
    """What a CompiledModule needs to be written out: the IR, the target, and the program's shape.

    `kind` is "tvm" (one executable, `executables["main"]`), "partitioned" (TVM partitions between
    eager ops: `executables` maps each partition to its executable, None where it runs in eager)
    or "eager" (TVM took nothing). `externs` lists (node, implementation, global function name)
    of every node bound to an extern kernel. `lib_bytes` holds the libraries of a loaded program
    (a library loaded from disk cannot be exported again). `tuning` holds the tuning records the
    builds applied ({"source", "workloads", "records"}, lowering/tuning.py AppliedRecords), or None.
    """

    ir: object
    target: object
    kind: str
    executables: dict
    partition_nodes: dict = field(default_factory=dict)
    unsupported: dict = field(default_factory=dict)
    externs: list = field(default_factory=list)
    lib_bytes: dict = field(default_factory=dict)
    tuning: dict | None = None

    @classmethod
    def of(cls, ir, lowered) -> "Artifact":
        from .runtime import TVMGraphModule

        module = lowered.module
        if isinstance(module, TVMGraphModule):
            kind, executables, tvm_modules = "tvm", {"main": module.executable}, [module]
        elif lowered.partition_nodes:
            kind, executables = "partitioned", dict(lowered.partition_executables)
            tvm_modules = [m for m in module.children() if isinstance(m, TVMGraphModule)]
        else:
            kind, executables, tvm_modules = "eager", {}, []
        externs = {name: (call.impl, call.func_name) for m in tvm_modules for name, call in m.externs.items()}
        return cls(ir, lowered.target, kind, executables, dict(lowered.partition_nodes), dict(lowered.unsupported),
                   [(name, impl, func) for name, (impl, func) in sorted(externs.items())])

    def weight_bytes(self) -> int:
        return self.ir.weight_bytes()


def versions() -> dict:
    """The versions a saved program depends on: a library is only valid for the TVM that built it,
    the IR for the torch that wrote it, the program for the orca code that made it."""
    import sys

    from . import __version__
    from .lowering.selection_cache import code_digest

    return {"orca": f"{__version__}+{code_digest()}", "orca_code": package_digest(), "torch": torch.__version__,
            "tvm": tvm_lite.version(), "python": f"{sys.version_info.major}.{sys.version_info.minor}"}


_PACKAGE_DIGEST: str | None = None


def package_digest() -> str:
    """A hash of every .py file of orca_compiler and of the pass library: the passes and the
    capture shape the IR as much as the kernels do (selection_cache.code_digest covers only those)."""
    global _PACKAGE_DIGEST
    if _PACKAGE_DIGEST is None:
        from . import passes

        digest = hashlib.sha256()
        roots = [Path(__file__).resolve().parent, Path(passes.__file__).resolve().parent]
        for root in dict.fromkeys(roots):
            for path in sorted(root.rglob("*.py")):
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
        _PACKAGE_DIGEST = digest.hexdigest()[:16]
    return _PACKAGE_DIGEST


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- writing ---------------------------------------------------------------------------------------

def _report_json(report) -> dict:
    from .pass_manager import PassRecord

    record_fields = [f.name for f in dataclasses.fields(PassRecord) if f.name != "ir_after"]
    return {
        "pipeline": report.pipeline, "target": report.target, "capture_method": report.capture_method,
        "capture_failures": [list(f) for f in report.capture_failures],
        "passes": [{name: getattr(r, name) for name in record_fields} for r in report.passes],
        "fallbacks": [dataclasses.asdict(f) for f in report.fallbacks],
        "partitions": report.partitions,
        "kernels": [dataclasses.asdict(k) for k in report.kernels],
        "seconds": dict(report.seconds),
    }


def _signature_json(signature) -> list:
    return [{"shape": list(s.shape), "dtype": str(s.dtype).replace("torch.", ""), "device": s.device} for s in signature]


def _plain(value):
    """A TVM container (Map, Array, String) as plain JSON-able Python."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value if type(value) in (str, int, float, bool) or value is None else str(value)
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if hasattr(value, "__iter__"):
        return [_plain(v) for v in value]
    return str(value)


@contextlib.contextmanager
def _quiet_scope_warnings():
    """TVM 0.27 logs an empty "Warning: Scope Saving:" ("Scope Loaded:") line per function when it
    writes (reads) an executable, tens per model; its C++ logging goes to fd 2, so filter that fd
    for the call and pass every other line through."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if "Warning: Scope Saving:" not in line
                           and "Warning: Scope Loaded:" not in line)
            if kept:
                sys.stderr.write(kept)


def write(compiled, directory: Path, extra: dict | None = None) -> dict:
    """Write `compiled` (a CompiledModule with an `artifact`) into the existing empty folder
    `directory`; returns the metadata written. `extra` is merged into the metadata (the cache's key)."""
    from .ir import to_exported_program

    artifact = compiled.artifact
    if artifact is None:
        raise OrcaError("this module cannot be saved: it was compiled through graph breaks (torch.compile "
                        "runs the Python between its graphs), so there is no single program to write")
    directory = Path(directory)
    files, libs = {}, {}
    for name, executable in artifact.executables.items():
        if executable is None:
            libs[name] = None
            continue
        if name in artifact.lib_bytes:
            data = artifact.lib_bytes[name]
        else:
            staging = directory / f"export-{name}.so"
            with _quiet_scope_warnings():
                executable.export_library(str(staging))
            data = staging.read_bytes()
            staging.unlink()
        digest = sha256_bytes(data)
        file_name = f"lib-{digest[:16]}.so"  # a new content never reuses a path dlopen has seen
        (directory / file_name).write_bytes(data)
        files[file_name] = {"sha256": digest, "bytes": len(data)}
        libs[name] = file_name
    ir = artifact.ir
    from . import graph_json

    try:
        graph, weights = graph_json.encode(ir)
        (directory / GRAPH_FILE).write_text(json.dumps(graph))
        torch.save(weights, str(directory / WEIGHTS_FILE))
        ir_files = [GRAPH_FILE, WEIGHTS_FILE]
    except graph_json.NotEncodable:
        with warnings.catch_warnings():
            # weights that share storage (an RNN's zero states): torch.export.save warns and copes
            warnings.filterwarnings("ignore", message=r".*No complete tensor found.*")
            torch.export.save(to_exported_program(ir.gm), str(directory / IR_FILE))
        ir_files = [IR_FILE]
    if artifact.tuning:
        (directory / TUNING_DIR).mkdir()
        (directory / TUNING_WORKLOADS).write_text(_json_lines(artifact.tuning["workloads"]))
        (directory / TUNING_RECORDS).write_text(_json_lines(artifact.tuning["records"]))
        ir_files += [TUNING_WORKLOADS, TUNING_RECORDS]
    for name in ir_files:
        data = (directory / name).read_bytes()
        files[name] = {"sha256": sha256_bytes(data), "bytes": len(data)}
    meta = {
        "format": FORMAT,
        "id": uuid.uuid4().hex,
        "created": time.time(),
        "versions": versions(),
        "target": {"key": artifact.target.key, "kind": artifact.target.kind,
                   "spec": _plain(artifact.target.tvm_target.export())},
        "files": files,
        "program": {"kind": artifact.kind, "libraries": libs, "partitions": artifact.partition_nodes,
                    "unsupported": artifact.unsupported, "externs": [list(e) for e in artifact.externs]},
        "nodes": [n.name for n in ir.graph.nodes],
        "origins": {n.name: n.meta["orca_origin"] for n in ir.graph.nodes if "orca_origin" in n.meta},
        # e.g. {tier=host}: where place-memory homed a weight (the CUDA runtime reads it when bound)
        "annotations": {n.name: {k: str(v) for k, v in n.meta["orca_annotations"].items()}
                        for n in ir.graph.nodes if n.meta.get("orca_annotations")},
        "signature": _signature_json(compiled.signature),
        "in_spec": pytree.treespec_dumps(compiled.in_spec) if compiled.in_spec is not None else None,
        "out_spec": pytree.treespec_dumps(compiled.out_spec) if compiled.out_spec is not None else None,
        "report": _report_json(compiled.report),
        "tuning": None if not artifact.tuning else {
            "source": artifact.tuning["source"], "workloads": len(artifact.tuning["workloads"]),
            "records": len(artifact.tuning["records"])},
        **(extra or {}),
    }
    (directory / META).write_text(json.dumps(meta, indent=1, default=str))
    return meta


def _json_lines(values: list) -> str:
    return "".join(json.dumps(v) + "\n" for v in values)


def _load_tuning(directory: Path, meta: dict) -> dict | None:
    """The tuning records saved with the program (hash-checked, one JSON value per line)."""
    if not meta.get("tuning"):
        return None
    tables = {}
    for name in (TUNING_WORKLOADS, TUNING_RECORDS):
        text = _verified_bytes(directory, name, meta).decode(errors="replace")
        try:
            tables[name] = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError:
            raise LoadError(f"{directory / name} is not meta_schedule's JSON-lines format") from None
    workloads, records = tables[TUNING_WORKLOADS], tables[TUNING_RECORDS]
    if any(not (isinstance(r, list) and len(r) == 2 and isinstance(r[0], int) and 0 <= r[0] < len(workloads))
           for r in records):
        raise LoadError(f"{directory / TUNING_RECORDS} has a record of no saved workload")
    return {"source": meta["tuning"].get("source"), "workloads": workloads, "records": records}


def replace_dir(staging: Path, final: Path) -> None:
    """Move the finished folder `staging` to `final` atomically, replacing what is there."""
    try:
        os.rename(staging, final)
        return
    except OSError:
        if not final.exists():
            raise
    trash = final.with_name(f".trash-{final.name}-{uuid.uuid4().hex[:8]}")
    os.rename(final, trash)
    os.rename(staging, final)
    shutil.rmtree(trash, ignore_errors=True)


def save(compiled, path) -> None:
    """`CompiledModule.save`: write to a temporary folder beside `path`, then rename it into place."""
    final = Path(path).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        write(compiled, staging)
        replace_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# -- reading ---------------------------------------------------------------------------------------

def read_meta(directory: Path) -> dict:
    """The metadata of a saved folder; LoadError if it is missing or does not parse."""
    path = Path(directory) / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise LoadError(f"{path} does not exist (not a saved orca program?)") from None
    except (OSError, ValueError) as exc:
        raise LoadError(f"{path} is unreadable ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LoadError(f"{path} has format {meta.get('format') if isinstance(meta, dict) else '?'}, "
                        f"this orca reads format {FORMAT}")
    return meta


def check_versions(meta: dict, where) -> None:
    ours = versions()
    theirs = meta.get("versions") or {}
    changed = [f"{k} {theirs.get(k)!r} (now {v!r})" for k, v in ours.items() if theirs.get(k) != v]
    if changed:
        raise LoadError(f"{where} was written by other versions: {', '.join(changed)}")


def _verified_bytes(directory: Path, name: str, meta: dict) -> bytes:
    info = (meta.get("files") or {}).get(name)
    path = directory / name
    if not isinstance(info, dict):
        raise LoadError(f"{path} is not listed in the metadata")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LoadError(f"{path} cannot be read ({type(exc).__name__})") from None
    if len(data) != info.get("bytes"):
        raise LoadError(f"{path} has {len(data)} bytes, the metadata says {info.get('bytes')} (truncated?)")
    if sha256_bytes(data) != info.get("sha256"):
        raise LoadError(f"{path}'s content hash differs from the metadata (the file was altered)")
    return data


def _report_from(meta: dict, seconds: dict):
    from .lowering.kernel_select import KernelChoice
    from .lowering.lower import Fallback
    from .pass_manager import PassRecord
    from .report import CompileReport

    data = meta["report"]
    return CompileReport(
        pipeline=data["pipeline"], target=data["target"], capture_method=data["capture_method"],
        capture_failures=[tuple(f) for f in data["capture_failures"]],
        passes=[PassRecord(**r) for r in data["passes"]],
        fallbacks=[Fallback(**f) for f in data["fallbacks"]],
        partitions=data["partitions"], kernels=[KernelChoice(**k) for k in data["kernels"]], seconds=seconds)


def _restore_order(ir, meta: dict) -> None:
    """Put the loaded IR's nodes back in the saved order (torch.export moves weights first) and
    restore each node's origin; weights it does not name go first (they have no inputs)."""
    graph = ir.graph
    by_name = {n.name: n for n in graph.nodes}
    order = [by_name[name] for name in meta["nodes"] if name in by_name]
    known = set(order)
    order = [n for n in graph.nodes if n not in known] + order
    output = next(n for n in order if n.op == "output")
    for node in order:
        if node is not output:
            output.prepend(node)
    graph.lint()
    origins = meta.get("origins") or {}
    for node in graph.nodes:
        if node.name in origins:
            node.meta["orca_origin"] = origins[node.name]
    ir.recompile()


def _restore_annotations(ir, meta: dict) -> None:
    """Put back the nodes' printed annotations (place-memory's {tier=...}) that `save` recorded."""
    annotations = meta.get("annotations") or {}
    for node in ir.graph.nodes:
        if node.name in annotations:
            node.meta["orca_annotations"] = dict(annotations[node.name])


def _load_ir(directory: Path, meta: dict):
    import io

    from .ir import from_exported_program

    if GRAPH_FILE in (meta.get("files") or {}):
        from . import graph_json

        graph = json.loads(_verified_bytes(directory, GRAPH_FILE, meta))
        weights = torch.load(io.BytesIO(_verified_bytes(directory, WEIGHTS_FILE, meta)), weights_only=True)
        try:
            ir = graph_json.decode(graph, weights)
        except AttributeError as exc:  # an op this process does not know
            raise LoadError(f"{directory / GRAPH_FILE} names an op this process lacks ({exc}); "
                            "are the model's custom ops imported?") from None
        ir.in_spec = pytree.treespec_loads(meta["in_spec"]) if meta.get("in_spec") else None
        ir.out_spec = pytree.treespec_loads(meta["out_spec"]) if meta.get("out_spec") else None
        _restore_annotations(ir, meta)
        return ir
    data = _verified_bytes(directory, IR_FILE, meta)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*No complete tensor found.*")
            ep = torch.export.load(io.BytesIO(data))
    except Exception as exc:  # an op this process does not know (a custom op not imported), ...
        raise LoadError(f"{directory / IR_FILE} cannot be loaded by torch.export: {_first_line(exc)} "
                        "(are the model's custom ops imported?)") from None
    ir = from_exported_program(ep)
    _restore_order(ir, meta)
    _restore_annotations(ir, meta)
    ir.in_spec = pytree.treespec_loads(meta["in_spec"]) if meta.get("in_spec") else None
    ir.out_spec = pytree.treespec_loads(meta["out_spec"]) if meta.get("out_spec") else None
    return ir


class SavedTarget:
    """A saved program's TVM target as its exported dict; a tvm.target.Target (which imports
    tvm) is made from it only when something asks for more than `export()`: loading needs only
    the target's key and kind, saving again only its exported form."""

    def __init__(self, spec: dict):
        self.spec = spec
        self._target = None

    def export(self) -> dict:
        return self.spec

    def real(self):
        if self._target is None:
            import tvm

            try:
                self._target = tvm.target.Target(self.spec)
            except Exception as exc:
                raise LoadError(f"the saved target {self.spec!r} is not understood: {_first_line(exc)}") from None
        return self._target

    def __getattr__(self, name):
        if name.startswith("__") or name in ("spec", "_target"):
            raise AttributeError(name)
        return getattr(self.real(), name)

    def __enter__(self):
        return self.real().__enter__()

    def __exit__(self, *exc):
        return self.real().__exit__(*exc)

    def __str__(self) -> str:
        return str(self.real())


def _target(meta: dict):
    from .lowering.target import ResolvedTarget

    spec = meta["target"]
    if not isinstance(spec.get("spec"), dict) or spec.get("kind") not in ("cpu", "cuda"):
        raise LoadError(f"the saved target {spec.get('spec')!r} ({spec.get('kind')!r}) is not understood")
    return ResolvedTarget(SavedTarget(spec["spec"]), spec["kind"], spec["key"])


def _start_vm(module) -> None:
    """Create the VM of a loaded TVMGraphModule now, as its `_function()` would, but from the
    library through tvm_ffi (tvm_lite.py) rather than tvm.relax, which imports all of tvm."""
    if module.target.kind != "cpu":
        module._function()  # CUDA: checks for the device, which needs tvm
        return
    from .threads import configure_tvm_threads

    configure_tvm_threads()  # before the first VM: TVM's pool reads it when it starts
    module._vm = tvm_lite.virtual_machine(module.executable)
    module._fn = module._vm[module.name]


@contextlib.contextmanager
def _globals_registered(functions: dict):
    """Register `functions` (name -> tvm Function) while the block runs, then put back what was
    there. The Relax VM resolves the packed functions a library calls when it is created, so the
    saved names (made unique in the process that compiled) are only needed for that moment, and
    never take the place of another live module's functions."""
    import tvm_ffi

    previous = {name: tvm_ffi.get_global_func(name, allow_missing=True) for name in functions}
    try:
        for name, fn in functions.items():
            tvm_ffi.register_global_func(name, fn, override=True)
        yield
    finally:
        for name, old in previous.items():
            if old is None:
                tvm_ffi.remove_global_func(name)
            else:
                tvm_ffi.register_global_func(name, old, override=True)


def _check_partitions(saved: dict, rebuilt: dict, directory: Path) -> None:
    if saved != rebuilt:
        raise LoadError(f"{directory}: the IR partitions differently than when it was saved "
                        f"({sorted(saved)} vs {sorted(rebuilt)}); the libraries would not fit it")


def read(directory, *, check_host: bool = False):
    """Load the CompiledModule saved in `directory` (no capture, passes or TVM build).

    Every file is checked against its content hash before use and the versions must match; any
    problem is a LoadError. `check_host`: refuse a CPU program built for another CPU than this one.
    """
    import tvm_ffi

    from .api import index_guards
    from .lowering.extern import bind_extern, impl_named
    from .lowering.lower import assemble
    from .lowering.relax_build import unread_effects
    from .runtime import CompiledModule, InputSignature, TVMGraphModule

    start = time.perf_counter()
    directory = Path(directory)
    meta = read_meta(directory)
    try:
        check_versions(meta, directory)
        target = _target(meta)
        if target.kind == "cuda" and not target.device().exist:
            raise TargetError(f"{directory} was built for CUDA and this machine has no CUDA device")
        if check_host and target.kind == "cpu":
            here, there = tvm_lite.host_cpu()[0], str(target.tvm_target.export().get("mcpu", ""))
            if there and here != there:
                raise TargetError(f"{directory} was built for CPU {there!r}, this machine is {here!r}: its code may "
                                  "use instructions this CPU lacks (load(..., check_host=False) runs it anyway)")
        program_meta = meta["program"]
        lib_bytes = {name: _verified_bytes(directory, file, meta)
                     for name, file in program_meta["libraries"].items() if file is not None}
        ir = _load_ir(directory, meta)
        tuning = _load_tuning(directory, meta)
        nodes = {n.name: n for n in ir.compute_nodes()}
        calls, functions = {}, {}
        for node_name, impl, func_name in program_meta["externs"]:
            if node_name not in nodes:
                raise LoadError(f"{directory}: extern kernel node %{node_name} is not in the saved IR")
            call = bind_extern(nodes[node_name], ir.gm, impl_named(impl))
            calls[node_name] = call
            functions[func_name] = tvm_ffi.get_global_func(call.func_name)
        executables = {name: None for name in program_meta["libraries"]}
        with _quiet_scope_warnings():
            for name in lib_bytes:
                executables[name] = tvm_lite.load_library(directory / program_meta["libraries"][name])
        kind = program_meta["kind"]
        if kind == "tvm":
            program = TVMGraphModule(executables["main"], target, externs=calls, drop=len(unread_effects(ir.gm, calls)))
            tvm_modules = [program]
        elif kind == "partitioned":
            lowered = assemble(ir, target, program_meta["unsupported"], calls, executables)
            _check_partitions(program_meta["partitions"], lowered.partition_nodes, directory)
            program = lowered.module
            tvm_modules = [m for m in program.children() if isinstance(m, TVMGraphModule)]
        elif kind == "eager":
            program, tvm_modules = ir.copy().gm, []
        else:
            raise LoadError(f"{directory}: unknown program kind {kind!r}")
        with _globals_registered(functions):
            for module in tvm_modules:
                _start_vm(module)  # the VM resolves the saved extern names when it is created
        signature = [InputSignature(tuple(s["shape"]), getattr(torch, s["dtype"]), s["device"])
                     for s in meta["signature"]]
        seconds = time.perf_counter() - start
        report = _report_from(meta, {"load": seconds, "total": seconds})
        compiled = CompiledModule(program, signature=signature, in_spec=ir.in_spec, out_spec=ir.out_spec,
                                  report=report, ir=ir, guards=index_guards(ir))
    except (LoadError, TargetError):
        raise
    except Exception as exc:  # anything else in a folder we did not expect: say where, never crash
        raise LoadError(f"{directory} could not be loaded: {_first_line(exc)}") from exc
    compiled.executables = [e for e in executables.values() if e is not None]
    compiled.artifact = Artifact(ir, target, kind, executables, program_meta["partitions"], program_meta["unsupported"],
                                 [tuple(e) for e in program_meta["externs"]], lib_bytes, tuning)
    return compiled, meta


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def load(path, *, check_host: bool = True):
    """`orca_compiler.load`: the CompiledModule saved with `CompiledModule.save(path)`.

    Raises LoadError when a file was altered or truncated, or the folder was written by other
    versions of orca/torch/TVM; TargetError when it was built for another CPU than this one
    (`check_host=False` loads it anyway) or for a device this machine lacks.
    """
    compiled, _ = read(path, check_host=check_host)
    return compiled
