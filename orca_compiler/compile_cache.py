"""The three-level compile cache: each module's built functions (L1), a process-wide LRU (L2), an on-disk store (L3).

L1 is the CompiledModule itself: its TVM functions and VM are built once and serve every call.
L2 maps a key to the parts of a CompiledModule already built in this process (the program, the
IR, the report), least recently used first out once their bytes pass a bound. L3 is a folder of
saved programs (serialize.py's format, with the tuning records the build applied) under
`cache_dir()/compiled`, consulted only when L2 misses; a hit there rebuilds the module without
capture, passes or TVM build, and without importing the `tvm` package (tvm_lite.py; the target's
key is remembered in the L3 folder, see "the target's key" below).

The key is computed without capturing the model, so that a hit costs milliseconds. What it
assumes is written in docs/caching.md: the model's behaviour is fixed by its module tree (repr,
classes and the code of their methods, plain attributes), its parameters and buffers (hashed
byte for byte), the input signature (pytree structure, shapes, dtypes, devices; not the values)
and dynamic dims, the pipeline text, the target, the thread count, the compile options that
change code (kernels, fullgraph, tuning_db's contents, pass_config, calibration data) and the
versions of orca (with a hash of its source), torch, TVM and Python. Code a method reaches
outside the model's classes (a helper function in another module) is not part of the key.
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import marshal
import os
import shutil
import tempfile
import threading
import time
import types
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

from . import serialize
from .cache_dir import cache_dir
from .errors import OrcaError

log = logging.getLogger(__name__)

MODES = ("on", "off", "read-only")
ENV_MODE = "ORCA_COMPILE_CACHE"  # default mode when compile(cache=...) is not given
ENV_DIR = "ORCA_COMPILE_CACHE_DIR"  # the L3 folder when compile(cache_dir=...) is not given
ENV_MEMORY = "ORCA_COMPILE_CACHE_MEMORY"  # L2 bound, e.g. "512M"
DEFAULT_MEMORY = 512 << 20
KEY_FORMAT = 1

# Process-wide hit/miss counts, per level (the report shows them as of each compile).
COUNTS = {"L2": {"hits": 0, "misses": 0}, "L3": {"hits": 0, "misses": 0}}


class Uncacheable(Exception):
    """This compile cannot be keyed (the reason is reported); it is compiled as without a cache."""


@dataclass
class CacheInfo:
    """The cache's part of a CompileReport: the level that served this compile, the key, the
    hit/miss counts per level and what happened (bypasses, entries rebuilt, failed writes)."""

    served: str = "compile"  # "L2", "L3" or "compile" (a miss everywhere, or the cache off)
    mode: str = "on"
    key: str | None = None
    events: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)  # "L2"/"L3" -> hits, misses in this process so far
    l1_calls: list = field(default_factory=lambda: [0])  # shared with the module: calls served

    def l1(self) -> dict:
        """L1 is the module's own built functions: each call is a hit; building them was the miss."""
        return {"hits": self.l1_calls[0], "misses": 1 if self.served == "compile" else 0}

    def __str__(self) -> str:
        levels = {"L1": self.l1(), **self.counts}
        counts = ", ".join(f"{level} {c['hits']} hit(s)/{c['misses']} miss(es)" for level, c in levels.items())
        head = f"cache ({self.mode}): served by {self.served}" + (f", key {self.key[:12]}" if self.key else "")
        return "\n".join([f"{head}; {counts}"] + [f"  - {e}" for e in self.events])


# -- the key -----------------------------------------------------------------------------------

def _tensor_digest(t: torch.Tensor) -> str:
    if t.is_meta or t.layout != torch.strided or t.is_quantized or type(t) not in (torch.Tensor, torch.nn.Parameter):
        raise Uncacheable(f"a {type(t).__name__} with layout {t.layout} cannot be hashed")
    data = t.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    data = data.contiguous().reshape(-1)
    raw = data.view(torch.uint8).numpy() if data.numel() else b""
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def _code_digest(fn) -> str:
    code = getattr(fn, "__code__", None)
    if code is None:
        return getattr(fn, "__qualname__", type(fn).__name__)
    return hashlib.blake2b(marshal.dumps(code), digest_size=12).hexdigest()


_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.Size)


def _describe(value, depth: int = 0) -> str:
    """A stable text for an attribute's value: plain values as they are, tensors by content,
    functions by code, containers element-wise; other objects by type only."""
    if isinstance(value, _PLAIN):
        return repr(value)
    if isinstance(value, torch.Tensor):
        return f"tensor({value.dtype},{tuple(value.shape)},{_tensor_digest(value)})"
    if isinstance(value, (types.FunctionType, types.MethodType, types.BuiltinFunctionType)):
        return f"fn({getattr(value, '__qualname__', '?')},{_code_digest(value)})"
    if depth < 3 and isinstance(value, (tuple, list)):
        return "[" + ",".join(_describe(v, depth + 1) for v in value) + "]"
    if depth < 3 and isinstance(value, dict):
        return "{" + ",".join(f"{k!r}:{_describe(v, depth + 1)}" for k, v in value.items()) + "}"
    cls = type(value)
    return f"<{cls.__module__}.{cls.__qualname__}>"


_SKIP_ATTRS = {"_parameters", "_buffers", "_modules", "_flat_weights"}  # hashed below, by name


def _class_digest(cls: type, memo: dict) -> str:
    """The code of every method of the classes a module is made of, up to torch's own (those are
    covered by torch's version)."""
    if cls not in memo:
        parts = []
        for klass in cls.__mro__:
            if klass.__module__.startswith("torch.") or klass is object:
                continue
            parts.append(f"{klass.__module__}.{klass.__qualname__}")
            for name, value in sorted(vars(klass).items()):
                fn = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
                if isinstance(fn, types.FunctionType):
                    parts.append(f"{name}={_code_digest(fn)}")
        memo[cls] = hashlib.blake2b("\n".join(parts).encode(), digest_size=16).hexdigest()
    return memo[cls]


def model_digest(model: torch.nn.Module) -> str:
    """A hash of what fixes the model's behaviour (see the module docstring)."""
    if not isinstance(model, torch.nn.Module):
        raise Uncacheable(f"the model is a {type(model).__name__}, not an nn.Module")
    h = hashlib.sha256()
    h.update(repr(model).encode())
    memo: dict = {}
    for name, module in model.named_modules(remove_duplicate=False):
        cls = type(module)
        h.update(f"\n{name}:{cls.__module__}.{cls.__qualname__}:{_class_digest(cls, memo)}".encode())
        if isinstance(module, torch.fx.GraphModule):
            h.update(module.code.encode())
        for attr, value in sorted(vars(module).items()):
            if attr in _SKIP_ATTRS:
                continue
            if "hook" in attr and isinstance(value, dict):
                value = list(value.values())  # keyed by handle ids, which differ between processes
            h.update(f"\n {attr}={_describe(value)}".encode())
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        h.update(f"\n{name}:{tensor.dtype}:{tuple(tensor.shape)}:{tensor.requires_grad}:{_tensor_digest(tensor)}".encode())
    return h.hexdigest()


def _dims(spec):
    """dynamic_shapes in a stable form (Dim objects by name and range)."""
    if spec is None or isinstance(spec, (int, str, bool)):
        return spec
    if isinstance(spec, dict):
        return {str(k): _dims(v) for k, v in spec.items()}
    if isinstance(spec, (tuple, list)):
        return [_dims(v) for v in spec]
    name = getattr(spec, "__name__", None)
    if name is not None:
        return f"Dim({name},{getattr(spec, 'min', None)},{getattr(spec, 'max', None)})"
    text = repr(spec)
    if " at 0x" in text:
        raise Uncacheable(f"dynamic_shapes holds a {type(spec).__name__} with no stable form")
    return text


def _folder_digest(path) -> str:
    """A digest of a tuning database: its record and target files only (not logs or curves)."""
    folder = Path(path)
    h = hashlib.sha256()
    wanted = ("database_*.json", "target.json")
    files = sorted(p for pattern in wanted for p in folder.rglob(pattern) if p.is_file()) if folder.is_dir() else []
    for p in files:
        h.update(str(p.relative_to(folder)).encode())
        h.update(p.read_bytes())
    return f"{folder.resolve()}:{h.hexdigest()[:16]}"


def key_parts(model, inputs: tuple, pipeline: str, target, options: dict) -> dict:
    """What the key of this compile is made of (stored in each L3 entry's metadata)."""
    if options.get("instruments"):
        raise Uncacheable("instruments observe the passes, which a cached program does not run")
    if options.get("calibration_loss") is not None:
        raise Uncacheable("a calibration_loss function is not hashed")
    leaves, spec = pytree.tree_flatten(tuple(inputs))
    try:
        pass_config = json.dumps(options.get("pass_config") or {}, sort_keys=True)
    except (TypeError, ValueError):
        raise Uncacheable("pass_config holds values that are not JSON") from None
    calibration = options.get("calibration_data")
    return {
        "format": KEY_FORMAT,
        "model": model_digest(model),
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "inputs": [str(spec)] + [f"{t.dtype}{list(t.shape)}@{t.device.type}" for t in leaves],
        "dynamic_shapes": _dims(options.get("dynamic_shapes")),
        "pipeline": pipeline,
        "target": target.key,
        "threads": torch.get_num_threads(),
        "options": {
            "kernels": options.get("kernels", "measure"),
            "fullgraph": bool(options.get("fullgraph", False)),
            "tuning_db": _folder_digest(options["tuning_db"]) if options.get("tuning_db") else None,
            "pass_config": pass_config,
            "calibration_data": None if calibration is None else _describe(list(calibration)),
        },
        "versions": serialize.versions(),
    }


def key_of(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# -- the target's key without importing tvm ----------------------------------------------------
#
# The key holds the resolved target (resolve_target: a tvm.target.Target, which imports all of
# tvm, 1.2-2 s in a fresh process). What resolving a name or dict gives depends only on the
# request, LLVM's host CPU and triple, the thread count (num-cores) and the TVM/FFI versions, so
# the L3 folder remembers the result under exactly those (`.targets.json`); LLVM's host CPU is
# asked from libtvm_compiler.so directly (tvm_lite.py). A miss compiles with the real target
# and corrects a remembered key that differs (the entry is then written under the right key).

TARGET_MEMO = ".targets.json"


@dataclass(frozen=True)
class KnownTarget:
    """What the key needs of a resolved target, remembered from an earlier compile."""

    key: str
    kind: str


def _target_request(target) -> str | None:
    """The text of what resolve_target(target) depends on, or None when it cannot be remembered
    (a tvm.target.Target object; TVM's shared libraries not where tvm_lite looks)."""
    if not isinstance(target, (str, dict)):
        return None
    try:
        from . import tvm_lite
        from .lowering.tuning_db import _ffi_version

        cpu, triple = tvm_lite.host_cpu()
        return json.dumps({"target": target if isinstance(target, dict) else target.strip(), "cpu": cpu,
                           "triple": triple, "threads": torch.get_num_threads(), "tvm": tvm_lite.version(),
                           "tvm_ffi": _ffi_version()}, sort_keys=True)
    except (ImportError, OSError, TypeError, ValueError, AttributeError, RuntimeError):
        return None


def _read_memo(root: Path) -> dict:
    try:
        memo = json.loads((root / TARGET_MEMO).read_text())
        return memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember(root: Path, request: str, resolved) -> None:
    memo = _read_memo(root)
    if memo.get(request) == {"key": resolved.key, "kind": resolved.kind}:
        return
    memo[request] = {"key": resolved.key, "kind": resolved.kind}
    with contextlib.suppress(OSError):  # a read-only cache folder: resolve with TVM each time
        fd, tmp = tempfile.mkstemp(prefix=".tmp-targets-", dir=root)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(memo, indent=1))
        os.replace(tmp, root / TARGET_MEMO)


# -- L2: the process-wide LRU ----------------------------------------------------------------------

@dataclass
class _Entry:
    """The parts of a built CompiledModule that a new one can share."""

    program: torch.nn.Module
    signature: list
    in_spec: object
    out_spec: object
    ir: object
    guards: list
    executables: list
    report: object
    artifact: object
    nbytes: int
    # (tensor, digest) of the IR weights that share storage with the model compiled: extern
    # kernels read them at run time, so an in-place change of the model's weights after the
    # compile would reach this entry's program (a new compile of the old weights must not get it)
    shared: list = field(default_factory=list)

    @classmethod
    def of(cls, compiled, nbytes: int, model=None) -> "_Entry":
        shared = []
        if model is not None and compiled.artifact is not None:
            storages = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
            shared = [(w, _tensor_digest(w)) for w in compiled.artifact.ir.weights().values()
                      if w.untyped_storage().data_ptr() in storages]
        return cls(compiled.program, compiled.signature, compiled.in_spec, compiled.out_spec, compiled.ir,
                   compiled.guards, list(getattr(compiled, "executables", [])), compiled.report, compiled.artifact, nbytes,
                   shared)

    def unchanged(self) -> bool:
        return all(_tensor_digest(t) == digest for t, digest in self.shared)

    def instantiate(self, info: CacheInfo, seconds: float):
        from .runtime import CompiledModule

        report = copy.copy(self.report)
        report.seconds = {"cache lookup": seconds, "total": seconds}
        report.cache = info
        compiled = CompiledModule(self.program, signature=self.signature, in_spec=self.in_spec, out_spec=self.out_spec,
                                  report=report, ir=self.ir, guards=self.guards)
        compiled.executables = self.executables
        compiled.artifact = self.artifact
        info.l1_calls = compiled.l1_calls
        return compiled


def parse_size(text) -> int:
    """"512M", "2G", "100k", "4096" -> bytes."""
    if isinstance(text, int):
        return text
    value = str(text).strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(value[-1:], 1)
    try:
        return int(float(value[:-1] if scale > 1 else value) * scale)
    except ValueError:
        raise OrcaError(f"cannot read size {text!r}: use bytes or a number with K, M, G or T (e.g. 500M)") from None


class MemoryCache:
    """L2: key -> _Entry, least recently used out first once the entries' bytes pass `limit`
    (the IR's weights, the executables' copy of them and the libraries' size)."""

    def __init__(self, limit: int | None = None):
        self.limit = limit if limit is not None else parse_size(os.environ.get(ENV_MEMORY, DEFAULT_MEMORY))
        self.entries: OrderedDict[str, _Entry] = OrderedDict()
        self.nbytes = 0
        self.evictions = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> _Entry | None:
        with self._lock:
            entry = self.entries.get(key)
            if entry is not None:
                self.entries.move_to_end(key)
            return entry

    def put(self, key: str, entry: _Entry) -> bool:
        with self._lock:
            if entry.nbytes > self.limit:
                return False
            old = self.entries.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self.entries[key] = entry
            self.nbytes += entry.nbytes
            self._evict()
            return True

    def _evict(self) -> None:
        while self.nbytes > self.limit and self.entries:
            _, evicted = self.entries.popitem(last=False)
            self.nbytes -= evicted.nbytes
            self.evictions += 1

    def drop(self, key: str) -> None:
        with self._lock:
            entry = self.entries.pop(key, None)
            if entry is not None:
                self.nbytes -= entry.nbytes

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()
            self.nbytes = 0


MEMORY = MemoryCache()


def set_memory_limit(nbytes) -> None:
    """Bound L2 (bytes, or a size such as "512M"); entries past it are dropped, oldest first."""
    with MEMORY._lock:
        MEMORY.limit = parse_size(nbytes)
        MEMORY._evict()


def clear_memory() -> None:
    """Empty L2 (the next compile of each model goes to L3 or compiles)."""
    MEMORY.clear()


# -- L3: the on-disk store ---------------------------------------------------------------------

def store_dir(directory=None) -> Path:
    """The L3 folder: `directory`, else `$ORCA_COMPILE_CACHE_DIR`, else `cache_dir()/compiled`."""
    chosen = directory or os.environ.get(ENV_DIR)
    path = Path(chosen) if chosen else cache_dir() / "compiled"
    path.mkdir(parents=True, exist_ok=True)
    return path


class DiskStore:
    """L3: one folder per key (serialize.py's format, plus the key and its parts in the metadata).

    Entries are written to a temporary folder and renamed into place under a per-key file lock,
    so readers never see half an entry and two writers of one key leave one valid entry. An entry
    that does not check out (a file altered or truncated, unreadable metadata, other versions) is
    removed and rebuilt by the compile that found it, which says so in its report.
    """

    def __init__(self, root=None):
        self.root = store_dir(root)

    def entry(self, key: str) -> Path:
        return self.root / key

    @contextlib.contextmanager
    def _lock(self, name: str):
        locks = self.root / ".locks"
        locks.mkdir(exist_ok=True)
        with open(locks / f"{name}.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _problem(self, folder: Path, key: str) -> str | None:
        """Why the entry in `folder` cannot be used (None when it checks out), without loading it."""
        try:
            meta = serialize.read_meta(folder)
            serialize.check_versions(meta, folder)
            if meta.get("key") != key:
                return f"{folder / serialize.META} is for key {str(meta.get('key'))[:12]}"
            for name in meta.get("files") or {}:
                serialize._verified_bytes(folder, name, meta)
        except serialize.LoadError as exc:
            return str(exc)
        return None

    def load(self, key: str, info: CacheInfo, read_only: bool = False):
        """The module stored under `key`, or None (a miss, or an invalid entry, which is removed
        unless `read_only`)."""
        folder = self.entry(key)
        if not (folder / serialize.META).exists():
            return None
        entry_id = self._entry_id(folder)
        try:
            compiled, meta = serialize.read(folder)
            if meta.get("key") != key:
                raise serialize.LoadError(f"{folder / serialize.META} is for key {str(meta.get('key'))[:12]}")
        except Exception as exc:  # serialize.read turns what it expects into LoadError; never crash on the rest
            text = str(exc) if isinstance(exc, OrcaError) else f"{type(exc).__name__}: {exc}"
            message = f"L3 entry {key[:12]} {'ignored' if read_only else 'rebuilt'}: {text}"
            info.events.append(message)
            log.warning("%s", message)
            if not read_only:
                self._discard(key, entry_id)
            return None
        with contextlib.suppress(OSError):
            os.utime(folder / serialize.META)  # last use, for prune
        return compiled

    @staticmethod
    def _entry_id(folder: Path) -> str | None:
        try:
            return json.loads((folder / serialize.META).read_text()).get("id")
        except (OSError, ValueError, AttributeError):
            return None

    def _discard(self, key: str, entry_id: str | None) -> None:
        """Remove the entry that failed to load, unless another process has replaced it since."""
        with self._lock(key):
            folder = self.entry(key)
            current = self._entry_id(folder)
            if folder.exists() and (current is None or current == entry_id):
                trash = self.root / f".trash-{key}-{uuid.uuid4().hex[:8]}"
                with contextlib.suppress(OSError):
                    os.rename(folder, trash)
                    shutil.rmtree(trash, ignore_errors=True)

    def put(self, key: str, compiled, parts: dict) -> str:
        """Write `compiled` under `key`; returns "written" or "kept" (a valid entry was there)."""
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        try:
            serialize.write(compiled, staging, extra={"key": key, "key_parts": parts})
            with self._lock(key):
                final = self.entry(key)
                if (final / serialize.META).exists() and self._problem(final, key) is None:
                    return "kept"
                serialize.replace_dir(staging, final)
                return "written"
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def entries(self) -> list[dict]:
        """One dict per entry: key, bytes, last use, and what it holds."""
        out = []
        for folder in self.root.iterdir():
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            files = [p for p in folder.rglob("*") if p.is_file()]
            try:
                meta = json.loads((folder / serialize.META).read_text())
                parts = meta.get("key_parts") or {}
                what = f"{parts.get('model_class', '?').rsplit('.', 1)[-1]} {parts.get('pipeline', '')}"
                if meta.get("tuning"):
                    what += f", tuned ({meta['tuning']['records']} records of {meta['tuning']['workloads']} kernels)"
            except (OSError, ValueError):
                what = "(unreadable metadata)"
            last = max((p.stat().st_mtime for p in files), default=folder.stat().st_mtime)
            out.append({"key": folder.name, "bytes": sum(p.stat().st_size for p in files), "last_used": last,
                        "what": what, "path": folder})
        return sorted(out, key=lambda e: e["last_used"])

    def _remove(self, key: str) -> None:
        with self._lock(key):
            trash = self.root / f".trash-{key}-{uuid.uuid4().hex[:8]}"
            with contextlib.suppress(OSError):
                os.rename(self.entry(key), trash)
                shutil.rmtree(trash, ignore_errors=True)

    def _sweep(self, older_than: float = 3600.0) -> None:
        """Remove temporary and trash folders left by killed processes."""
        now = time.time()
        for folder in self.root.iterdir():
            if folder.name.startswith((".tmp-", ".trash-")) and now - folder.stat().st_mtime > older_than:
                shutil.rmtree(folder, ignore_errors=True)

    def clear(self) -> int:
        """Remove every entry; returns how many."""
        entries = self.entries()
        for e in entries:
            self._remove(e["key"])
        self._sweep()
        return len(entries)

    def prune(self, max_bytes: int) -> list[dict]:
        """Remove least recently used entries until the store holds at most `max_bytes`."""
        entries = self.entries()
        total = sum(e["bytes"] for e in entries)
        removed = []
        for e in entries:
            if total <= max_bytes:
                break
            self._remove(e["key"])
            total -= e["bytes"]
            removed.append(e)
        self._sweep()
        return removed


# -- one compile's use of the cache ----------------------------------------------------------------

class CacheRequest:
    """What compile() asks of the cache: `lookup()` before capturing, `store()` after building."""

    def __init__(self, mode: str, key: str | None, parts: dict | None, store: DiskStore | None, info: CacheInfo,
                 model=None, tuning_db=None, target=None, resolved=None, request=None):
        self.mode, self.key, self.parts, self.store_, self.info = mode, key, parts, store, info
        self.model = model
        self.target, self.resolved, self.request = target, resolved, request
        self.start = time.perf_counter()
        # With a tuning database, note which of its records the builds apply: they are kept
        # with the program (L3 entry, save) so that it says what it was built with.
        self.applied = None
        if tuning_db is not None:
            from .lowering.tuning import AppliedRecords

            self.applied = AppliedRecords().open()
            weakref.finalize(self, self.applied.close)  # a compile that raises never calls store()

    @classmethod
    def make(cls, model, inputs: tuple, pipeline: str, target, options: dict) -> "CacheRequest":
        """`target`: what compile() was given (a name, dict or ResolvedTarget); it is resolved with
        TVM only when the L3 folder does not remember its key (`resolved_target()` after a miss)."""
        from .lowering.target import ResolvedTarget, resolve_target

        mode = options.get("cache") or os.environ.get(ENV_MODE) or "on"
        if mode not in MODES:
            raise OrcaError(f"unknown cache option {mode!r}; valid: {', '.join(MODES)}")
        info = CacheInfo(mode=mode)
        tuning_db = options.get("tuning_db")
        resolved = target if isinstance(target, ResolvedTarget) else None
        if mode == "off":
            return cls(mode, None, None, None, info, tuning_db=tuning_db, target=target, resolved=resolved)
        root = store_dir(options.get("cache_dir"))
        request = None if resolved is not None else _target_request(target)
        remembered = _read_memo(root).get(request) if request is not None else None
        known = None
        if isinstance(remembered, dict) and isinstance(remembered.get("key"), str):
            known = KnownTarget(remembered["key"], str(remembered.get("kind")))
        if known is None or known.kind != "cpu":
            resolved = resolved or resolve_target(target)
        keyed = known if resolved is None else resolved
        try:
            parts = key_parts(model, inputs, pipeline, keyed, options)
        except Uncacheable as exc:
            info.events.append(f"not cached: {exc}")
            return cls(mode, None, None, None, info, tuning_db=tuning_db, target=target, resolved=resolved)
        store = None
        if keyed.kind == "cuda" and not resolved.device().exist:
            info.events.append("L3 not used: this machine cannot load CUDA libraries (no GPU)")
        else:
            store = DiskStore(root)
        info.key = key_of(parts)
        return cls(mode, info.key, parts, store, info, model, tuning_db, target, resolved, request)

    def resolved_target(self):
        """The ResolvedTarget of this compile (resolved with TVM now if the key was made from a
        remembered one, whose key is then checked and remembered)."""
        if self.resolved is None:
            from .lowering.target import resolve_target

            self.resolved = resolve_target(self.target)
            if self.parts is not None and self.parts["target"] != self.resolved.key:
                self.parts["target"] = self.resolved.key
                self.key = self.info.key = key_of(self.parts)
                self.info.events.append("the remembered target key was stale; corrected")
        if self.request is not None and self.store_ is not None and self.mode == "on" and self.resolved.kind == "cpu":
            _remember(self.store_.root, self.request, self.resolved)
        return self.resolved

    def _snapshot(self) -> None:
        self.info.counts = {level: dict(c) for level, c in COUNTS.items()}

    def lookup(self):
        """A CompiledModule from L2 or L3, or None (then compile and call `store`)."""
        if self.key is None:
            return None
        entry = MEMORY.get(self.key)
        if self.applied is not None:
            self.applied.close()  # reopened below on a miss
        if entry is not None and not entry.unchanged():
            MEMORY.drop(self.key)
            self.info.events.append("L2 entry dropped: weights it shares with the model it was compiled from "
                                    "were changed in place since")
            entry = None
        if entry is not None:
            COUNTS["L2"]["hits"] += 1
            self.info.served = "L2"
            self._snapshot()
            return entry.instantiate(self.info, time.perf_counter() - self.start)
        COUNTS["L2"]["misses"] += 1
        if self.store_ is not None:
            compiled = self.store_.load(self.key, self.info, read_only=self.mode == "read-only")
            if compiled is not None:
                COUNTS["L3"]["hits"] += 1
                self.info.served = "L3"
                self._snapshot()
                seconds = time.perf_counter() - self.start
                compiled.report.seconds = {"cache lookup and load": seconds, "total": seconds}
                compiled.report.cache = self.info
                self.info.l1_calls = compiled.l1_calls
                MEMORY.put(self.key, _Entry.of(compiled, self._nbytes(compiled)))
                return compiled
            COUNTS["L3"]["misses"] += 1
        if self.applied is not None:
            self.applied.open()
        return None

    @staticmethod
    def _nbytes(compiled, library_bytes: int = 0) -> int:
        artifact = compiled.artifact
        if artifact is None:
            return 0
        library_bytes = library_bytes or sum(len(b) for b in artifact.lib_bytes.values())
        # the IR's weights, plus the executables' constants (about as much again) and code
        return artifact.weight_bytes() * (2 if artifact.executables else 1) + library_bytes

    def store(self, compiled) -> None:
        """Put a freshly compiled module in L2 and (cache "on") L3, and report the cache."""
        compiled.report.cache = self.info
        self.info.l1_calls = compiled.l1_calls
        if self.applied is not None:
            self.applied.close()
            if compiled.artifact is not None:
                compiled.artifact.tuning = self.applied.subset()
        if self.key is None:
            self._snapshot()
            return
        if compiled.artifact is None:
            self.info.events.append("not cached: compiled through graph breaks (no single program to keep)")
            self._snapshot()
            return
        library_bytes = 0
        if self.store_ is not None and self.mode == "on":
            start = time.perf_counter()
            try:
                outcome = self.store_.put(self.key, compiled, self.parts)
                folder = self.store_.entry(self.key)
                library_bytes = sum(p.stat().st_size for p in folder.glob("lib-*.so"))
                if outcome == "kept":
                    self.info.events.append("L3 already held a valid entry (written by another process)")
            except Exception as exc:  # a full disk or an unwritable folder must not fail the compile
                message = f"L3 write failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                self.info.events.append(message)
                log.warning("%s", message)
            compiled.report.seconds["cache write"] = time.perf_counter() - start
        if not MEMORY.put(self.key, _Entry.of(compiled, self._nbytes(compiled, library_bytes), self.model)):
            self.info.events.append(f"not kept in L2: larger than its bound ({MEMORY.limit} bytes)")
        self._snapshot()
