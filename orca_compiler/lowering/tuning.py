"""Meta-schedule tuning: tune a Relax module into a work_dir, then build with that database.

    mod = import_relax(gm)                           # weights bound as constants
    tune_module(mod, target, "tuning/mlp", max_trials=64)          # optional, slow
    executable = tvm.compile(apply_database(mod, target, "tuning/mlp"), target)
    relax.VirtualMachine(executable, tvm.cpu())["main"](x)         # same call as untuned

Weights stay bound constants (our importer's convention). The tuned schedules prepack weights into
a blocked layout; with constant weights FoldConstant runs that prepack at compile time, so `main`
keeps its signature and no `main_transform_params` call is needed. A module with weights as
parameters (the `num_input` attribute, e.g. from `detach_params`) gets a `main_transform_params`
function instead: see `needs_transform_params`.

The work_dir holds meta_schedule's JSON database (`database_workload.json`,
`database_tuning_record.json`, one record per line, appended as trials finish), so a killed run
keeps the records measured so far; `load_database` drops a line cut short by the kill.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import logging
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

from ..errors import OrcaError
from . import _fast_inspect, tuning_db

TUNE_PIP = 'pip install "apache-tvm-ffi<0.1.15" psutil cloudpickle xgboost-cpu tqdm'
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"

# module name -> pip package that provides it (meta_schedule's wheel extras)
_TUNING_MODULES = {"psutil": "psutil", "cloudpickle": "cloudpickle", "xgboost": "xgboost-cpu", "tqdm": "tqdm"}
_MS_LOGGER = "tvm.s_tir.meta_schedule"
_PREPARED = "orca.prepared_for_tuning"  # IRModule attribute


TuningError = tuning_db.TuningError  # defined there (no import cycle), raised here too


# ---------------------------------------------------------------------------------------------
# environment


def install_fast_inspect_stack() -> bool:
    """Replace inspect.stack/getouterframes in this process with cheap equivalents.

    `import tvm.s_tir.tensor_intrin` (done by meta_schedule) drops from ~25-36 s to ~2-4 s. The
    replacement returns the same FrameInfo fields (filename, lineno, function, code_context,
    index) except the column numbers in `positions`. Idempotent; True if it changed anything.
    """
    return _fast_inspect.install()


def fast_inspect_worker_initializer():
    """An initializer for meta_schedule's popen workers that installs the same fix in them.

    The builder starts fresh workers for every batch of candidates, and each imports
    tensor_intrin; without the fix that import outlasts the builder's timeout and no candidate
    ever builds. The initializer is `exec` of `_fast_inspect.py`'s source (stdlib only), so a
    worker does not import orca_compiler or torch to run it.
    """
    source = Path(_fast_inspect.__file__).read_text() + "\ninstall()\n"
    return functools.partial(exec, source, {"__name__": "_orca_fast_inspect"})


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def check_tuning_dependencies() -> None:
    """Raise TuningError naming what meta_schedule tuning lacks here, with the pip command."""
    missing = [pkg for module, pkg in _TUNING_MODULES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise TuningError(
            f"tuning needs the package(s) {', '.join(missing)}, which are not installed: {TUNE_PIP}"
        )
    try:
        ffi = importlib.metadata.version("apache-tvm-ffi")
    except importlib.metadata.PackageNotFoundError:
        return  # a source build of TVM bundles its own FFI
    if _version_tuple(ffi) >= (0, 1, 15):
        # 0.1.15.x breaks the ABI of apache-tvm 0.27.0.post1: SaveJSON, which TuneContext calls,
        # segfaults (applying an existing database still works).
        raise TuningError(
            f"apache-tvm-ffi {ffi} crashes meta_schedule with apache-tvm 0.27 (tvm.ir.save_json "
            f"segfaults); install a 0.1.14 release: {TUNE_PIP}"
        )


def tuning_target(target) -> Any:
    """A tvm.target.Target for tuning: a name, dict, Target or ResolvedTarget with num-cores."""
    from .target import ResolvedTarget, resolve_target

    tvm_target = target.tvm_target if isinstance(target, ResolvedTarget) else resolve_target(target).tvm_target
    if tvm_target.kind.name == "llvm" and "num-cores" not in tvm_target.attrs:
        raise TuningError(
            f"meta_schedule needs 'num-cores' in an llvm target, got {tvm_target}: "
            "use resolve_target('llvm') or add 'num-cores' to the target dict"
        )
    return tvm_target


# ---------------------------------------------------------------------------------------------
# Relax passes around tuning


def prepare_for_tuning(mod, target):
    """The Relax passes before tuning: legalize, fold, fuse into TIR tasks, mark weights.

    AttachAttrLayoutFreeBuffers marks the PrimFunc arguments fed by weights (constants or
    parameters) as layout-free, which lets the tuned schedules prepack them. `tune_module` and
    `apply_database` both call this on the module they get: the database matches tasks by their
    structure, so both must see the same TIR. A module prepared already is returned as is.
    """
    import tvm
    from tvm import relax
    from tvm.relax import transform as T

    target = tuning_target(target)
    passes = [
        T.DecomposeOpsForInference(),
        T.CanonicalizeBindings(),
        relax.pipeline.zero_pipeline(),
        T.AttachAttrLayoutFreeBuffers(),
    ]
    if is_prepared(mod):
        return mod  # a second run would change PrimFunc attributes, so no record would match
    with target:
        return tvm.transform.Sequential(passes)(mod).with_attr(_PREPARED, tvm.tirx.IntImm("int32", 1))


def is_prepared(mod) -> bool:
    """True if `mod` went through prepare_for_tuning already."""
    return mod.attrs is not None and _PREPARED in mod.attrs


def needs_transform_params(mod) -> bool:
    """True if the built module has `main_transform_params`, to call once on the weights.

    Only modules whose weights are parameters (the `num_input` attribute) get one; run
    `params = vm["main_transform_params"](weights)` once, then `vm["main"](x, *params)`.
    """
    return any(gv.name_hint.endswith("_transform_params") for gv in mod.functions)


@contextlib.contextmanager
def meta_schedule_logging(verbose: bool = False):
    """meta_schedule's logger set up for one tuning run, and put back as it was afterwards.

    Its console handler takes the level the logger has when tuning starts (WARNING unless
    `verbose`). Each run calls logging.config.dictConfig with the names of the handlers on its
    logger, and fails on a handler without a name (pytest's capture handlers end up there after
    a first run in the process): those are set aside meanwhile, and the run's own handlers
    (console, log files) are closed after it.
    """
    logger = logging.getLogger(_MS_LOGGER)
    level, before = logger.level, list(logger.handlers)
    for handler in before:
        if handler.get_name() is None:
            logger.removeHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
        for handler in logger.handlers[:]:
            if handler not in before:
                logger.removeHandler(handler)
                handler.close()
        for handler in before:
            if handler not in logger.handlers:
                logger.addHandler(handler)


# ---------------------------------------------------------------------------------------------
# tuning


def tune_module(
    mod,
    target,
    work_dir: str | Path,
    *,
    max_trials: int,
    num_trials_per_iter: int = 16,
    max_trials_per_task: int | None = None,
    workers: int = 1,
    timeout_s: float = 30.0,
    seed: int | None = None,
    verbose: bool = False,
) -> Path:
    """Tune the TIR tasks of Relax module `mod` for `target`; return the work_dir (the database).

    `mod` is what `apply_database` will get (e.g. `import_relax(gm)`); it is prepared here.
    Records are appended to the work_dir's JSON database as trials finish and are reused by a
    later run on the same work_dir. The trial budget is shared by the tasks: meta_schedule's
    scheduler gives `num_trials_per_iter` trials at a time to the task it expects to gain most,
    so keep `num_trials_per_iter` small when the budget is (relax.pipeline's
    static_shape_tuning_pipeline uses 64, which spends a small budget on the first task only).
    `workers` is the number of build processes; `timeout_s` bounds each build and each run.
    `verbose` shows meta_schedule's progress tables (they always go to work_dir/logs).
    """
    check_tuning_dependencies()
    if max_trials < 1 or num_trials_per_iter < 1:
        raise TuningError(f"max_trials and num_trials_per_iter must be >= 1, got {max_trials}, {num_trials_per_iter}")
    target = tuning_target(target)
    install_fast_inspect_stack()
    import tvm.s_tir.tensor_intrin  # noqa: F401  (TuneContext imports it; do it with the fix on)
    from tvm.s_tir import meta_schedule as ms

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    prepared = prepare_for_tuning(mod, target)
    initializer = fast_inspect_worker_initializer()
    builder = ms.builder.LocalBuilder(max_workers=workers, timeout_sec=timeout_s, initializer=initializer)
    runner = ms.runner.LocalRunner(timeout_sec=timeout_s, initializer=initializer)
    try:
        with target, meta_schedule_logging(verbose):
            ms.relax_integration.tune_relax(
                prepared,
                params={},
                target=target,
                work_dir=str(work_dir),
                max_trials_global=max_trials,
                max_trials_per_task=max_trials_per_task,
                num_trials_per_iter=num_trials_per_iter,
                builder=builder,
                runner=runner,
                seed=seed,
            )
    except OrcaError:
        raise
    except Exception as exc:
        from .relax_build import tvm_error_summary

        raise TuningError(f"meta_schedule tuning failed in {work_dir}: {tvm_error_summary(exc)}") from exc
    return work_dir


# ---------------------------------------------------------------------------------------------
# using a database


def _write_lines(path: Path, values: list[Any]) -> None:
    path.write_text("".join(json.dumps(v) + "\n" for v in values))


def database_paths(work_dir: str | Path) -> tuple[Path, Path]:
    """The workload and tuning-record files of the database in `work_dir`."""
    return Path(work_dir) / WORKLOAD_FILE, Path(work_dir) / RECORD_FILE


def load_database(work_dir: str | Path):
    """Load the JSON database in `work_dir` as a meta_schedule Database, read-only.

    A corrupt file raises TuningError rather than falling back to untuned code: whoever passes a
    database wants the tuned kernels, and untuned dense ops are 30-100x slower. The one exception
    is the unfinished last line a killed run can leave: it is dropped with a warning, along with
    records of a workload whose line was dropped.
    """
    from tvm.s_tir import meta_schedule as ms

    workload_path, record_path = database_paths(work_dir)
    missing = [p.name for p in (workload_path, record_path) if not p.is_file()]
    if missing:
        raise TuningError(
            f"no tuning database in {work_dir}: {', '.join(missing)} not found (tune_module writes them)"
        )
    # A target folder of `orca tune` may be appended to by a running tuner: read under its lock.
    shared = tuning_db.locked(work_dir, exclusive=False) if (Path(work_dir) / tuning_db.TARGET_FILE).is_file() \
        else contextlib.nullcontext()
    with shared:
        workloads, cut_w = tuning_db.json_lines(workload_path)
        records, cut_r = tuning_db.json_lines(record_path)
    if not (cut_w or cut_r):
        source, tmp = (workload_path, record_path), None
    else:
        kept = records
        if cut_w:  # records of the workload whose line was cut refer past the end of the table
            kept = [r for r in records if not (isinstance(r, list) and r and isinstance(r[0], int) and r[0] >= len(workloads))]
        warnings.warn(
            f"tuning database in {work_dir}: dropped the unfinished last line of "
            f"{' and '.join(p.name for p, cut in ((workload_path, cut_w), (record_path, cut_r)) if cut)} "
            f"(a killed run?) and {len(records) - len(kept)} record(s) of its workload; "
            f"using the other {len(kept)} record(s)",
            stacklevel=2,
        )
        tmp = tempfile.TemporaryDirectory(prefix="orca-tuning-db-")
        source = database_paths(tmp.name)
        _write_lines(source[0], workloads)
        _write_lines(source[1], kept)
    try:
        return ms.database.JSONDatabase(str(source[0]), str(source[1]), allow_missing=False)
    except Exception as exc:  # TVM reports a bad record as a RuntimeError with a C++ backtrace
        from .relax_build import tvm_error_summary

        raise TuningError(f"tuning database in {work_dir} is corrupt: {tvm_error_summary(exc)}") from None
    finally:
        if tmp is not None:
            tmp.cleanup()  # the database reads its files when created


def count_records(work_dir: str | Path, target=None) -> int:
    """How many tuning records the database in `work_dir` holds (0 if there is none); for a
    target-aware root, those of `target`'s subfolder."""
    if target is not None and not tuning_db.is_flat(work_dir):
        work_dir = tuning_db.records_dir_for(work_dir, tuning_target(target))
        if work_dir is None:
            return 0
    if not all(p.is_file() for p in database_paths(work_dir)):
        return 0
    return len(load_database(work_dir).get_all_tuning_records())


def apply_database(mod, target, work_dir: str | Path):
    """`mod` with the best schedules of the database in `work_dir`, ready for `tvm.compile`.

    `mod` is the same module given to `tune_module` (it is prepared here the same way). Tasks
    with no record in the database keep their untuned TIR and still compile. Weight prepacking
    of the tuned kernels is split out (SplitLayoutRewritePreproc); on constant weights FoldConstant
    runs it now, on parameter weights LiftTransformParams moves it to `main_transform_params`
    (see `needs_transform_params`). Raises TuningError for a missing or corrupt database.

    `work_dir` is a plain meta_schedule work_dir (used as it is), or a target-aware root written
    by `orca_compiler.tune` (tuning_db.py): only the subfolder of `target` is read, so records
    measured on another CPU/GPU or with other TVM versions are never applied.
    """
    import tvm
    from tvm.relax import transform as T
    from tvm.s_tir import meta_schedule as ms

    target = tuning_target(target)
    if not Path(work_dir).is_dir():
        raise TuningError(f"no tuning database in {work_dir}: the folder does not exist")
    records_dir = tuning_db.records_dir_for(work_dir, target)
    if records_dir is None:
        _warn_no_records(Path(work_dir), target)
    database = load_database(records_dir) if records_dir is not None else ms.database.MemoryDatabase()
    if records_dir is not None and _APPLIED:
        database = _noting_database(database, records_dir)
    prepared = prepare_for_tuning(mod, target)
    for recorder in _RECORDERS:
        recorder.append(prepared)
    with target, database:  # MetaScheduleApplyDatabase reads both when it is created
        passes = [
            T.MetaScheduleApplyDatabase(),
            T.SplitLayoutRewritePreproc(),
            T.LiftTransformParams(),
            T.FoldConstant(),
            T.DeadCodeElimination(),  # the prepack PrimFuncs, once folded into the constants
        ]
        return tvm.transform.Sequential(passes)(prepared)


_RECORDERS: list[list] = []
_WARNED: set[tuple[str, str]] = set()


def _warn_no_records(root: Path, target) -> None:
    """Say once per (database, target) that its records are for other targets only."""
    key = tuning_db.target_key(target)
    others = [folder.name for folder, _ in tuning_db.target_dirs(root) if folder.name != key]
    if others and (str(root), key) not in _WARNED:
        _WARNED.add((str(root), key))
        warnings.warn(f"tuning database {root} has no records for this target ({key}), only for "
                      f"{', '.join(others)}: TVM kernels build untuned", stacklevel=3)


@contextlib.contextmanager
def recording_modules():
    """Collect every module `apply_database` prepares meanwhile (the modules a compile with a
    `tuning_db` builds: whole programs, partitions, kernel-selection probes). `orca tune`
    extracts its tasks from them, so it tunes exactly the kernels the lowering asks for."""
    modules: list = []
    _RECORDERS.append(modules)
    try:
        yield modules
    finally:
        _RECORDERS.remove(modules)


# ---------------------------------------------------------------------------------------------
# which records a compile applied (kept with its L3 entry / saved program)


class AppliedRecords:
    """The tuning records the builds apply while it is open: for each records folder read, the
    workloads (TVM's structural-hash strings) that had a record. `subset()` is then the part of
    that folder those workloads own, in meta_schedule's JSON-lines form, so a saved program says
    which schedules it was built with and can be rebuilt from them (`tuning_db=<its folder>`).

    Kernel-selection probes apply records too (a probe's tuned latency decided the choice), so
    they count as used. Open recorders see every build in the process, a concurrent compile's
    included.
    """

    def __init__(self):
        self.found: dict[str, set[str]] = {}

    def open(self) -> "AppliedRecords":
        _APPLIED.append(self)
        return self

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            _APPLIED.remove(self)

    def note(self, records_dir: Path, shash: str) -> None:
        self.found.setdefault(str(records_dir), set()).add(shash)

    def subset(self) -> dict | None:
        """{"source", "workloads", "records"} of the folder whose records were applied (records
        renumbered to the subset's workload table), or None when no record was applied."""
        if not self.found:
            return None
        source, wanted = next(iter(self.found.items()))  # one tuning_db and target per compile
        raw = tuning_db.RawDatabase.read(source)
        keep = {i: w for i, w in enumerate(raw.workloads) if str(w[0]) in wanted}
        index = {i: n for n, i in enumerate(keep)}
        return {"source": source, "workloads": list(keep.values()),
                "records": [[index[i], rec] for i, rec in raw.records if i in index]}


_APPLIED: list[AppliedRecords] = []


def _noting_database(inner, records_dir: Path):
    """`inner` (a Database) behind a proxy that tells the open AppliedRecords which workloads
    MetaScheduleApplyDatabase found a record for."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    def note(record):
        if record is not None:
            shash = str(record.workload.as_json()[0])
            for recorder in list(_APPLIED):
                recorder.note(Path(records_dir), shash)
        return record

    @derived_object
    class NotingDatabase(ms.database.PyDatabase):
        def __init__(self):
            super().__init__()

        def has_workload(self, mod):
            return inner.has_workload(mod)

        def commit_workload(self, mod):
            return inner.commit_workload(mod)

        def commit_tuning_record(self, record):
            inner.commit_tuning_record(record)

        def get_top_k(self, workload, top_k):
            return inner.get_top_k(workload, top_k)

        def get_all_tuning_records(self):
            return inner.get_all_tuning_records()

        def query_tuning_record(self, mod, target, workload_name):
            return note(inner.query_tuning_record(mod, target, workload_name))

        def query_schedule(self, mod, target, workload_name):
            note(inner.query_tuning_record(mod, target, workload_name))
            return inner.query_schedule(mod, target, workload_name)

        def query_ir_module(self, mod, target, workload_name):
            note(inner.query_tuning_record(mod, target, workload_name))
            return inner.query_ir_module(mod, target, workload_name)

        def __len__(self):
            return len(inner)

    return NotingDatabase()
