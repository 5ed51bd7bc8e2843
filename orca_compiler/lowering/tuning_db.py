"""Target-aware tuning databases: meta_schedule's JSON records, one folder per target and versions.

meta_schedule's JSON database does not know which machine its records were measured on, so a
schedule tuned for one CPU (or GPU) would be applied on another. Here a database is a root folder
with one subfolder per target key; a key hashes the full target (kind, mtriple, mcpu, num-cores,
arch, host, ...) and the versions that change what a record means (TVM, its FFI):

    DIR/llvm-znver3-3f2a9c01d4e5b6a7/target.json                 what the key stands for
    DIR/llvm-znver3-3f2a9c01d4e5b6a7/database_workload.json      meta_schedule's own format,
    DIR/llvm-znver3-3f2a9c01d4e5b6a7/database_tuning_record.json one JSON value per line

Lookups read only the subfolder of the current target. Appends take an fcntl lock on the folder
(two tuning runs may share one database), write one whole line with one write() on an O_APPEND
descriptor, and first cut off a line a killed writer left unfinished.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import OrcaError

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
TARGET_FILE = "target.json"
LOCK_FILE = ".lock"
FAILED_SECONDS = 1e9  # meta_schedule stores a failed build/run as a huge latency (1e10 s)


class TuningError(OrcaError):
    """Tuning cannot run (a missing package, a bad target, an unreachable RPC tracker) or a
    tuning database cannot be used."""


# ---------------------------------------------------------------------------------------------
# target keys


def _ffi_version() -> str:
    try:
        return importlib.metadata.version("apache-tvm-ffi")
    except importlib.metadata.PackageNotFoundError:
        return "bundled"


def _versions() -> dict:
    from .. import tvm_lite

    return {"tvm": tvm_lite.version(), "tvm_ffi": _ffi_version()}


def _plain(value):
    """A TVM Map/Array (Target.export()) as plain JSON values."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or hasattr(value, "__len__"):
        return [_plain(v) for v in value]
    return str(value)


def target_identity(tvm_target) -> dict:
    """What a record's validity depends on: the full target as JSON and the TVM/FFI versions."""
    return {"target": _plain(tvm_target.export()), **_versions()}


def target_key(tvm_target) -> str:
    """The subfolder name for `tvm_target`: readable prefix (kind, CPU or arch) + hash of the identity."""
    identity = target_identity(tvm_target)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    attrs = identity["target"] if isinstance(identity["target"], dict) else {}
    detail = attrs.get("mcpu") or attrs.get("arch") or "generic"
    return f"{tvm_target.kind.name}-{detail}-{digest}"


def is_flat(path: str | Path) -> bool:
    """A plain meta_schedule work_dir (the JSON files directly in it), not a target-aware root."""
    return (Path(path) / WORKLOAD_FILE).is_file() or (Path(path) / RECORD_FILE).is_file()


def target_dirs(root: str | Path) -> list[tuple[Path, dict]]:
    """Every target subfolder of a database root with what its target.json says."""
    found = []
    for info in sorted(Path(root).glob(f"*/{TARGET_FILE}")):
        try:
            found.append((info.parent, json.loads(info.read_text())))
        except (OSError, ValueError) as exc:
            raise TuningError(f"{info} is unreadable: {exc}") from None
    return found


def target_dir(root: str | Path, tvm_target, *, create: bool = False) -> Path:
    """The folder of `root` holding the records for `tvm_target` (made, with target.json, if asked)."""
    path = Path(root) / target_key(tvm_target)
    if create and not (path / TARGET_FILE).is_file():
        path.mkdir(parents=True, exist_ok=True)
        _atomic_write(path / TARGET_FILE, json.dumps({"key": path.name, **target_identity(tvm_target)}, indent=1))
    return path


def records_dir_for(work_dir: str | Path, tvm_target) -> Path | None:
    """Where compile-time lookups read records for `tvm_target`: a flat work_dir as it is (the
    caller chose it), else the root's subfolder of this target, or None when it has none."""
    path = Path(work_dir)
    if is_flat(path):
        return path
    sub = target_dir(path, tvm_target)
    return sub if (sub / WORKLOAD_FILE).is_file() and (sub / RECORD_FILE).is_file() else None


# ---------------------------------------------------------------------------------------------
# files: lock, append, read


@contextlib.contextmanager
def locked(folder: str | Path, exclusive: bool = True) -> Iterator[None]:
    """An fcntl lock on `folder` (shared for readers, exclusive for writers)."""
    folder = Path(folder)
    if exclusive:
        folder.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        if exclusive:
            raise
        yield  # a read-only database (shipped with an application): nobody appends to it
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name, dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _drop_unfinished_tail(path: Path) -> None:
    """Cut a last line without its newline (a writer killed mid-line), so that the next append
    does not glue a record onto it. Call with the folder locked."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def append_line(path: Path, value: Any) -> None:
    """Append one JSON value as one line, in a single write (call with the folder locked)."""
    _drop_unfinished_tail(path)
    data = (json.dumps(value) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


def json_lines(path: Path) -> tuple[list[Any], bool]:
    """The JSON values of a database file's lines, and whether a last line cut short by a kill
    (no newline, not JSON) was dropped: the trial in flight is lost, nothing else. Any other bad
    line raises TuningError."""
    text = path.read_text()
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    values = []
    for i, (n, line) in enumerate(lines):
        try:
            values.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1 and not text.endswith("\n"):
                return values, True
            raise TuningError(f"tuning database file {path} is corrupt: line {n} is not JSON ({exc.msg})") from None
    return values, False


def read_lines(path: Path) -> list[Any]:
    """The JSON values of a database file ([] if there is none); see `json_lines`."""
    return json_lines(path)[0] if path.is_file() else []


@dataclass
class RawDatabase:
    """One target folder as JSON: workloads ([shash, module]) and records ([workload index, record])."""

    workloads: list = field(default_factory=list)
    records: list = field(default_factory=list)

    @classmethod
    def read(cls, folder: str | Path) -> "RawDatabase":
        folder = Path(folder)
        with locked(folder, exclusive=False):
            workloads = read_lines(folder / WORKLOAD_FILE)
            records = read_lines(folder / RECORD_FILE)
        # A record whose workload line was lost with a kill points past the table: drop it.
        valid = [r for r in records if isinstance(r, list) and len(r) == 2 and isinstance(r[0], int)
                 and 0 <= r[0] < len(workloads)]
        return cls(workloads, valid)

    def write(self, folder: str | Path) -> None:
        folder = Path(folder)
        with locked(folder):
            _atomic_write(folder / WORKLOAD_FILE, "".join(json.dumps(w) + "\n" for w in self.workloads))
            _atomic_write(folder / RECORD_FILE, "".join(json.dumps(r) + "\n" for r in self.records))


def record_seconds(record_json) -> float:
    """Mean measured seconds of a record's JSON ([trace, run_secs, target, args_info])."""
    secs = record_json[1] if len(record_json) > 1 else None
    return sum(secs) / len(secs) if secs else float("inf")


def trace_key(record_json) -> str:
    return json.dumps(record_json[0], sort_keys=True)


def merge_into(out: RawDatabase, other: RawDatabase) -> int:
    """Add `other`'s records to `out`, one per (workload, trace) keeping the fastest. Returns
    how many records were added or improved."""
    index = {tuple(w): i for i, w in enumerate(out.workloads)}
    best = {(r[0], trace_key(r[1])): n for n, r in enumerate(out.records)}
    changed = 0
    for widx, rec in other.records:
        wkey = tuple(other.workloads[widx])
        if wkey not in index:
            index[wkey] = len(out.workloads)
            out.workloads.append(list(wkey))
        key = (index[wkey], trace_key(rec))
        if key not in best:
            best[key] = len(out.records)
            out.records.append([index[wkey], rec])
            changed += 1
        elif record_seconds(rec) < record_seconds(out.records[best[key]][1]):
            out.records[best[key]] = [index[wkey], rec]
            changed += 1
    return changed


def merge(sources: list[str | Path], output: str | Path) -> dict[str, int]:
    """Merge database roots into `output` (may be one of them): per target key, records deduped
    per (workload, trace), keeping the fastest. Returns records per target key in the output."""
    merged: dict[str, tuple[dict, RawDatabase]] = {}
    for source in sources:
        source = Path(source)
        if not source.is_dir():
            raise TuningError(f"no tuning database at {source}")
        if is_flat(source):
            raise TuningError(
                f"{source} is a plain meta_schedule work_dir without a target: only target-aware "
                "databases (written by orca tune) can be merged")
        for folder, info in target_dirs(source):
            key = folder.name
            entry = merged.setdefault(key, (info, RawDatabase()))
            if entry[0].get("target") != info.get("target"):
                raise TuningError(f"{folder}/{TARGET_FILE} differs from another database's {key}")
            merge_into(entry[1], RawDatabase.read(folder))
    output = Path(output)
    counts = {}
    for key, (info, raw) in merged.items():
        folder = output / key
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / TARGET_FILE).is_file():
            _atomic_write(folder / TARGET_FILE, json.dumps(info, indent=1))
        with locked(folder):  # records appended to the output meanwhile are kept too
            merge_into(raw, RawDatabase(read_lines(folder / WORKLOAD_FILE), read_lines(folder / RECORD_FILE))
                       if (folder / WORKLOAD_FILE).is_file() else RawDatabase())
            _atomic_write(folder / WORKLOAD_FILE, "".join(json.dumps(w) + "\n" for w in raw.workloads))
            _atomic_write(folder / RECORD_FILE, "".join(json.dumps(r) + "\n" for r in raw.records))
        counts[key] = len(raw.records)
    return counts


# ---------------------------------------------------------------------------------------------
# the live database of a tuning run


def _module_name(mod) -> str:
    """A workload as its compute blocks and buffer shapes: `matmul+T_add (8,1024)(1024,10)(10)->(8,10)`."""
    text = mod.script()
    blocks = [b for b in re.findall(r'T\.s?block\("(\w+)"\)', text) if b != "root"]
    signature = next((line for line in text.splitlines() if line.strip().startswith("def ")), "")
    signature = re.sub(r"T\.int(?:32|64)\((\d+)\)", r"\1", signature)
    shapes = ["(" + shape.replace(" ", "").rstrip(",") + ")" for shape in re.findall(r"T\.Buffer\(\(([^)]*)\)", signature)]
    io = "".join(shapes[:-1]) + ("->" + shapes[-1] if shapes else "")
    return f"{'+'.join(blocks) or 'main'} {io}".strip()


def make_database(folder: str | Path):
    """A meta_schedule Database over one target folder: the records present are loaded, and
    each committed record is appended to the folder's files at once, under its lock. A record
    whose (workload, trace) is there already is not written again.

    Inside, a JSONDatabase on a private copy does the work (TVM serializes traces itself, index
    maps included); each line it appends is copied to the shared files with its workload index
    renumbered, since other processes may have added workloads meanwhile.
    """
    import tvm_ffi
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class OrcaDatabase(ms.database.PyDatabase):
        def __init__(self, path: Path):
            super().__init__()
            self.path = Path(path)
            self.path.mkdir(parents=True, exist_ok=True)
            self.private = tempfile.TemporaryDirectory(prefix="orca-tuning-")
            raw = RawDatabase.read(self.path)
            self.wfile, self.rfile = Path(self.private.name) / WORKLOAD_FILE, Path(self.private.name) / RECORD_FILE
            self.wfile.write_text("".join(json.dumps(w) + "\n" for w in raw.workloads))
            self.rfile.write_text("".join(json.dumps(r) + "\n" for r in raw.records))
            self.read_upto = self.rfile.stat().st_size
            self.seen = {(json.dumps(raw.workloads[i]), trace_key(rec)) for i, rec in raw.records}
            self.committed: set[tuple[int, str]] = set()
            try:
                self.inner = ms.database.JSONDatabase(str(self.wfile), str(self.rfile), allow_missing=False)
            except Exception as exc:  # noqa: BLE001  (TVM's error with a C++ backtrace)
                raise TuningError(f"tuning database {self.path} has a bad record: {str(exc).strip().splitlines()[-1]}") from None

        def _publish(self) -> None:
            with open(self.rfile, "rb") as f:
                f.seek(self.read_upto)
                new = f.read()
            self.read_upto += len(new)
            lines = [json.loads(line) for line in new.decode().splitlines() if line.strip()]
            if not lines:
                return
            private_workloads = read_lines(self.wfile)
            with locked(self.path):
                wpath = self.path / WORKLOAD_FILE
                _drop_unfinished_tail(wpath)
                shared = read_lines(wpath)
                for pidx, rec in lines:
                    workload = private_workloads[pidx]
                    key = (json.dumps(workload), trace_key(rec))
                    if key in self.seen:
                        continue
                    self.seen.add(key)
                    try:
                        sidx = shared.index(workload)
                    except ValueError:
                        sidx = len(shared)
                        shared.append(workload)
                        append_line(wpath, workload)
                    append_line(self.path / RECORD_FILE, [sidx, rec])

        def has_workload(self, mod):
            return self.inner.has_workload(mod)

        def commit_workload(self, mod):
            return self.inner.commit_workload(mod)

        def commit_tuning_record(self, record):
            # A trial saved as it finished (tune.committing_runner) comes again with its round.
            key = (tvm_ffi.structural_hash(record.workload.mod), str(record.trace))
            if key in self.committed:
                return
            self.committed.add(key)
            self.inner.commit_tuning_record(record)
            self._publish()

        def get_top_k(self, workload, top_k):
            return self.inner.get_top_k(workload, top_k)

        def get_all_tuning_records(self):
            return self.inner.get_all_tuning_records()

        def query_tuning_record(self, mod, target, workload_name):
            return self.inner.query_tuning_record(mod, target, workload_name)

        def query_schedule(self, mod, target, workload_name):
            return self.inner.query_schedule(mod, target, workload_name)

        def query_ir_module(self, mod, target, workload_name):
            return self.inner.query_ir_module(mod, target, workload_name)

        def __len__(self):
            return len(self.inner)

    return OrcaDatabase(Path(folder))


@dataclass
class WorkloadSummary:
    name: str
    shash: str
    records: int
    best_ms: float | None


def summarize(folder: str | Path) -> list[WorkloadSummary]:
    """Per workload of one target folder: its function name, records and best latency."""
    from tvm.s_tir import meta_schedule as ms

    raw = RawDatabase.read(folder)
    out = []
    for i, w in enumerate(raw.workloads):
        recs = [r[1] for r in raw.records if r[0] == i]
        best = min((record_seconds(r) for r in recs), default=float("inf"))
        try:
            name = _module_name(ms.database.Workload.from_json(w).mod)
        except Exception:  # noqa: BLE001  (a name is a courtesy; the counts still print)
            name = "?"
        out.append(WorkloadSummary(name, str(w[0]), len(recs), best * 1e3 if best < FAILED_SECONDS else None))
    return out


def show(root: str | Path) -> str:
    """A text summary of a database root: targets, workloads, records, best latency per workload."""
    root = Path(root)
    if not root.is_dir():
        raise TuningError(f"no tuning database at {root}")
    folders = [(root, {"key": "(plain work_dir, no target)"})] if is_flat(root) else target_dirs(root)
    if not folders:
        return f"{root}: no target folders (nothing tuned yet)"
    lines = []
    for folder, info in folders:
        target = info.get("target", {})
        desc = (", ".join(f"{k}={target[k]}" for k in ("kind", "mtriple", "mcpu", "arch", "num-cores") if k in target)
                if isinstance(target, dict) else str(target))
        summary = summarize(folder)
        lines.append(f"target {info.get('key', folder.name)}: {desc}  (tvm {info.get('tvm', '?')}, "
                     f"ffi {info.get('tvm_ffi', '?')})")
        lines.append(f"  {len(summary)} workload(s), {sum(s.records for s in summary)} record(s)")
        for s in summary:
            best = f"{s.best_ms:.4f} ms" if s.best_ms is not None else "no valid run"
            lines.append(f"  {s.name:<56} {s.records:>5} records  best {best}")
    return "\n".join(lines)
