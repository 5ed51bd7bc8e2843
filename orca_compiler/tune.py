"""Tune a model's TVM kernels with meta_schedule into a target-aware database (`orca tune`).

    report = orca_compiler.tune("mlp", trials=128, db="tuning")     # or (model, example_inputs)
    print(report)                                                    # per task and end to end
    compiled = orca_compiler.compile(model, inputs, pipeline="O2", tuning_db="tuning")

The tasks are those of the compiled model: the model is captured, run through the pipeline and
lowered with a recording hook (lowering/tuning.py `recording_modules`), once with every heavy op
on TVM and once as kernel selection measures it (its per-op probes included), so a tuned kernel
can win the selection like any other candidate. Records go to `DIR/<target key>/`
(lowering/tuning_db.py). Rerunning the same command resumes: the records already there for the
model's tasks count against `trials`. Remote measurement goes through TVM's RPC tracker.
"""
from __future__ import annotations

import html
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cache_dir import ENV_VAR as CACHE_ENV
from .errors import OrcaError
from .lowering import tuning_db
from .lowering.tuning_db import TuningError

CURVE_FILE = "tuning_curve.html"
log = logging.getLogger(__name__)


@dataclass
class TaskResult:
    """One tuning task (a TIR function of the lowered model)."""

    name: str
    weight: float
    records: int = 0
    before_ms: float | None = None  # best record before this run (None: untuned)
    after_ms: float | None = None


@dataclass
class TuneReport:
    """What `tune` did: tasks, trials, end-to-end latencies and where the records are."""

    model: str
    target_key: str
    db_dir: Path
    trials_requested: int
    trials_before: int = 0
    trials_run: int = 0
    seconds: float = 0.0
    stopped_by: str = "trials"
    tasks: list[TaskResult] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)  # eager / orca without db / orca with db
    curve_path: Path | None = None

    @property
    def trials_total(self) -> int:
        return self.trials_before + self.trials_run

    def __str__(self) -> str:
        fmt = lambda v: f"{v:.4f}" if v is not None else "-"  # noqa: E731
        lines = [f"tuned {self.model} for {self.target_key} in {self.seconds:.0f} s: "
                 f"{self.trials_run} trials now, {self.trials_total}/{self.trials_requested} in the database "
                 f"({self.stopped_by}); records in {self.db_dir}"]
        width = max([len(t.name) for t in self.tasks] + [4])
        lines.append(f"  {'task':<{width}}  weight  records  best before ms  best after ms")
        for t in self.tasks:
            lines.append(f"  {t.name:<{width}}  {t.weight:>6g}  {t.records:>7}  {fmt(t.before_ms):>14}  {fmt(t.after_ms):>13}")
        if self.latency_ms:
            lines.append("  end to end (median ms): " + ", ".join(f"{k} {v:.4f}" for k, v in self.latency_ms.items()))
        if self.curve_path:
            lines.append(f"  tuning curve: {self.curve_path}")
        return "\n".join(lines)


class _BudgetSpent(Exception):
    """Raised from the progress callback to end meta_schedule's loop when time is up."""


# ---------------------------------------------------------------------------------------------
# the model's tasks


def _compile_options(**options) -> dict:
    from .api import _OPTIONS

    if "cache" in _OPTIONS:  # a compile served from a cache would not lower, so record nothing
        options["cache"] = "off"
    return options


def lowered_modules(model, inputs, pipeline: str, target, db_root: Path) -> list:
    """The Relax modules the lowering of `model` builds (prepared for tuning): with every
    heavy op on TVM, and as kernel selection measures and then builds it."""
    from .api import compile as orca_compile
    from .lowering.tuning import recording_modules

    db_root.mkdir(parents=True, exist_ok=True)
    saved = os.environ.get(CACHE_ENV)
    # A fresh selection cache, so that kernel selection measures (and builds) every probe.
    with tempfile.TemporaryDirectory(prefix="orca-tune-selection-") as fresh, recording_modules() as modules:
        os.environ[CACHE_ENV] = fresh
        try:
            for kernels in ("tvm", "measure"):
                orca_compile(model, inputs, pipeline=pipeline, target=target,
                             **_compile_options(kernels=kernels, tuning_db=db_root))
        finally:
            if saved is None:
                os.environ.pop(CACHE_ENV, None)
            else:
                os.environ[CACHE_ENV] = saved
    return modules


def extract_tasks(modules: list, tvm_target) -> list:
    """meta_schedule's tasks of `modules`, one per distinct TIR function (weights: the largest)."""
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    tasks: dict[int, Any] = {}
    for mod in modules:
        for task in ms.relax_integration.extract_tasks(mod, tvm_target):
            if task.mod.attrs is not None and task.mod.attrs.get("tirx.is_scheduled", False):
                continue
            key = tvm_ffi.structural_hash(task.dispatched[0])
            if key not in tasks or task.weight > tasks[key].weight:
                tasks[key] = task
    return list(tasks.values())


def _records_per_task(database, tasks) -> dict[int, list[float]]:
    """Task index -> measured seconds of each record in `database` for it (failed runs: inf)."""
    import tvm_ffi

    index = {tvm_ffi.structural_hash(t.dispatched[0]): i for i, t in enumerate(tasks)}
    out: dict[int, list[float]] = {i: [] for i in range(len(tasks))}
    for record in database.get_all_tuning_records():
        i = index.get(tvm_ffi.structural_hash(record.workload.mod))
        if i is not None:
            secs = [float(s) for s in record.run_secs] if record.run_secs is not None else []
            mean = sum(secs) / len(secs) if secs else math.inf
            out[i].append(mean if mean < tuning_db.FAILED_SECONDS else math.inf)
    return out


def _best_ms(values: list[float]) -> float | None:
    best = min(values, default=math.inf)
    return best * 1e3 if best < math.inf else None


# ---------------------------------------------------------------------------------------------
# measuring: locally or through an RPC tracker


def parse_rpc(rpc: str) -> tuple[str, int]:
    host, _, port = str(rpc).rpartition(":")
    if not host or not port.isdigit():
        raise TuningError(f"--rpc must be HOST:PORT of a TVM RPC tracker, got {rpc!r}")
    return host, int(port)


def check_tracker(host: str, port: int, key: str) -> int:
    """How many RPC servers the tracker at host:port has for `key`; TuningError if none or unreachable."""
    from tvm import rpc as tvm_rpc

    try:
        tracker = tvm_rpc.connect_tracker(host, port)
        summary = tracker.summary()
    except Exception as exc:  # noqa: BLE001  (TVM raises plain RuntimeErrors/OSErrors here)
        raise TuningError(f"cannot reach the TVM RPC tracker at {host}:{port}: {str(exc).strip().splitlines()[-1:]} "
                          "(start one with `python -m tvm.exec.rpc_tracker --host HOST --port PORT`)") from None
    queue = summary.get("queue_info", {})
    servers = queue.get(key, {})
    total = int(servers.get("free", 0)) + int(servers.get("pending", 0)) if isinstance(servers, dict) else 0
    if not servers:
        raise TuningError(f"the RPC tracker at {host}:{port} has no server with key {key!r} (keys: "
                          f"{', '.join(sorted(queue)) or 'none'}); start one with `python -m tvm.exec.rpc_server "
                          f"--tracker {host}:{port} --key {key}`")
    return max(total, 1)


def make_runner(rpc: str | None, device_key: str | None, timeout_s: float, initializer, target=None):
    """meta_schedule's runner: local, or RPCRunner on the servers of a tracker (checked first)."""
    from tvm.s_tir import meta_schedule as ms

    if rpc is None:
        if device_key is not None:
            raise TuningError("--device-key needs --rpc HOST:PORT (the tracker that knows the device)")
        if target is not None and not target.device().exist:
            raise TuningError(f"no local {target.kind} device to measure {target.tvm_target.kind.name} kernels on: "
                              "measure on a machine that has one through --rpc HOST:PORT --device-key KEY "
                              "(see docs/tuning.md)")
        return ms.runner.LocalRunner(timeout_sec=timeout_s, initializer=initializer)
    if not device_key:
        raise TuningError("--rpc needs --device-key KEY: the key the RPC servers registered with")
    host, port = parse_rpc(rpc)
    servers = check_tracker(host, port, device_key)
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=device_key,
                                 session_priority=1, session_timeout_sec=int(max(timeout_s, 10)))
    return ms.runner.RPCRunner(rpc_config=config, max_workers=servers, initializer=initializer)


def committing_runner(inner, scheduler, database):
    """`inner` (a Runner) wrapped so that each trial's record is saved as soon as its result is
    collected, not when the whole round is: a kill then loses only the trials still in flight.

    meta_schedule's AddToDatabase commits a round's records after its last trial; it still runs
    (it also saves failed builds), and the database skips the records saved here already. The
    candidates of the round are read from the scheduler's task in flight: the one whose
    builder results are set; runner inputs are its candidates that built, in order.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class SavingFuture(ms.runner.PyRunnerFuture):
        def __init__(self, future, save):
            super().__init__()
            self.future, self.save = future, save

        def done(self):
            return self.future.done()

        def result(self):
            result = self.future.result()
            if result.error_msg is None and result.run_secs is not None:
                self.save(result.run_secs)
            return result

    @derived_object
    class SavingRunner(ms.runner.PyRunner):
        def __init__(self):
            super().__init__()

        def run(self, runner_inputs):
            futures = inner.run(runner_inputs)
            running = [t for t in scheduler.tasks_ if t.builder_results is not None and t.measure_candidates is not None]
            built = [] if len(running) != 1 else \
                [c for c, b in zip(running[0].measure_candidates, running[0].builder_results) if b.error_msg is None]
            if len(built) != len(futures):  # not the layout we expect: AddToDatabase saves the round
                log.warning("orca tune: cannot match runner inputs to candidates; saving records per round")
                return futures
            task = running[0]

            def saver(candidate):
                def save(run_secs):
                    log.debug("saving a trial of %s as it finished", task.ctx.task_name)
                    workload = database.commit_workload(task.ctx.mod)
                    database.commit_tuning_record(ms.database.TuningRecord(
                        candidate.sch.trace, workload, run_secs, task.ctx.target, candidate.args_info))
                return save

            return [SavingFuture(f, saver(c)) for f, c in zip(futures, built)]

    return SavingRunner()


# ---------------------------------------------------------------------------------------------
# progress


def _progress_callback(tasks, total: int, deadline: float | None, show: bool, done_before: dict[int, list[float]]):
    from tqdm import tqdm
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    names = [t.task_name for t in tasks]

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def __init__(self):
            super().__init__()
            self.done = 0
            self.out_of_time = False
            self.best = {i: min(v, default=math.inf) for i, v in done_before.items()}
            self.bar = tqdm(total=total, unit="trial", desc="tuning", disable=not show, file=sys.stderr,
                            dynamic_ncols=True)

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            for result in runner_results:
                secs = [float(s) for s in result.run_secs] if result.run_secs is not None else []
                if secs and result.error_msg is None:
                    self.best[task_id] = min(self.best[task_id], sum(secs) / len(secs))
            self.done += len(runner_results)
            self.bar.update(len(runner_results))
            bests = ", ".join(f"{names[i][:18]} {self.best[i] * 1e3:.3f}ms" for i in self.best if self.best[i] < math.inf)
            left = f"{max(0.0, deadline - time.monotonic()):.0f}s left of budget; " if deadline else ""
            self.bar.set_postfix_str(f"{len(tasks)} tasks; {left}best: {bests}", refresh=True)
            if deadline is not None and time.monotonic() >= deadline:
                self.out_of_time = True
                raise _BudgetSpent("time budget spent")

    return Progress()


def write_curve(path: Path, tasks, database) -> Path:
    """An HTML page with the best latency of each task against its trials (records in order)."""
    import tvm_ffi

    index = {tvm_ffi.structural_hash(t.dispatched[0]): i for i, t in enumerate(tasks)}
    series: dict[int, list[tuple[int, float]]] = {i: [] for i in range(len(tasks))}
    counts = {i: 0 for i in range(len(tasks))}
    best = {i: math.inf for i in range(len(tasks))}
    for record in database.get_all_tuning_records():
        i = index.get(tvm_ffi.structural_hash(record.workload.mod))
        if i is None:
            continue
        counts[i] += 1
        secs = [float(s) for s in record.run_secs] if record.run_secs is not None else []
        if secs and sum(secs) / len(secs) < tuning_db.FAILED_SECONDS:
            best[i] = min(best[i], sum(secs) / len(secs))
        if best[i] < math.inf:
            series[i].append((counts[i], best[i] * 1e3))
    width, height, pad = 720, 360, 50
    points = [p for s in series.values() for p in s]
    max_x = max([p[0] for p in points] + [1])
    max_y = max([p[1] for p in points] + [1e-6]) * 1.1
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
    lines, legend = [], []
    for n, (i, pts) in enumerate(series.items()):
        if not pts:
            continue
        coords = " ".join(f"{pad + x / max_x * (width - 2 * pad):.1f},{height - pad - y / max_y * (height - 2 * pad):.1f}"
                          for x, y in pts)
        color = colors[n % len(colors)]
        lines.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{coords}"/>')
        legend.append(f'<li style="color:{color}">{html.escape(tasks[i].task_name)}: {pts[-1][1]:.4f} ms after '
                      f'{counts[i]} trials</li>')
    svg = (f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
           f'<rect width="{width}" height="{height}" fill="white" stroke="#ccc"/>'
           f'<text x="{width / 2}" y="{height - 10}" text-anchor="middle">trials of the task</text>'
           f'<text x="12" y="{height / 2}" transform="rotate(-90 12 {height / 2})" text-anchor="middle">best ms</text>'
           f'<text x="{pad}" y="{pad - 8}">{max_y:.3f} ms</text><text x="{width - pad}" y="{height - pad + 16}" '
           f'text-anchor="end">{max_x}</text>{"".join(lines)}</svg>')
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>orca tuning curve</title></head><body>"
                    f"<h3>Best latency per task vs trials ({html.escape(path.parent.name)})</h3>{svg}"
                    f"<ul>{''.join(legend)}</ul></body></html>")
    return path


# ---------------------------------------------------------------------------------------------
# the driver


def _load(model_or_name, example_inputs):
    if isinstance(model_or_name, str):
        from .cli import load_model

        model, inputs = load_model(model_or_name)
        return model_or_name, model, tuple(example_inputs) if example_inputs is not None else inputs
    if example_inputs is None:
        raise OrcaError("tune(model, example_inputs): example_inputs are needed with a module (or pass a zoo name)")
    inputs = (example_inputs,) if hasattr(example_inputs, "shape") else tuple(example_inputs)
    return type(model_or_name).__name__, model_or_name.eval(), inputs


def _latencies(model, inputs, pipeline, target, db_root: Path) -> dict[str, float]:
    """Median ms of eager, orca without the database and orca with it (interleaved)."""
    from .api import compile as orca_compile
    from .timing import time_interleaved

    without = orca_compile(model, inputs, pipeline=pipeline, target=target, **_compile_options())
    with_db = orca_compile(model, inputs, pipeline=pipeline, target=target, **_compile_options(tuning_db=db_root))
    fns = {"eager": lambda: model(*inputs), "orca (no db)": lambda: without(*inputs),
           "orca (tuned db)": lambda: with_db(*inputs)}
    return {k: v * 1e3 for k, v in time_interleaved(fns, repeats=20, warmup=3).items()}


def tune(
    model_or_name,
    example_inputs=None,
    *,
    pipeline: str = "O2",
    target: str | dict = "llvm",
    trials: int = 64,
    time_budget: float | None = None,
    db: str | Path = "tuning_db",
    rpc: str | None = None,
    device_key: str | None = None,
    trials_per_round: int = 8,
    workers: int = 1,
    timeout_s: float = 30.0,
    seed: int | None = None,
    compare: bool = True,
    progress: bool = True,
) -> TuneReport:
    """Tune the TVM kernels of a model (a module with `example_inputs`, a zoo name, or
    `file.py:function`) as `pipeline` lowers them for `target`, until the database holds
    `trials` records for its tasks or `time_budget` seconds have passed.

    Records go to `db/<target key>/` (see lowering/tuning_db.py) as each trial finishes (failed
    builds with their round of `trials_per_round`): a killed run loses only the trials in flight,
    and running the same call again continues from the records there. `rpc="host:port"` and
    `device_key` measure on the RPC servers registered with that TVM tracker under that key.
    `compare` times eager and the model compiled with and without the database at the end.
    """
    from .lowering.target import resolve_target
    from .lowering.tuning import (
        check_tuning_dependencies, fast_inspect_worker_initializer, install_fast_inspect_stack, meta_schedule_logging,
        tuning_target,
    )

    if trials < 1 or trials_per_round < 1:
        raise TuningError(f"trials and trials_per_round must be >= 1, got {trials}, {trials_per_round}")
    check_tuning_dependencies()
    start = time.monotonic()
    deadline = start + time_budget if time_budget else None
    name, model, inputs = _load(model_or_name, example_inputs)
    resolved = resolve_target(target)
    tvm_target = tuning_target(resolved)
    db_root = Path(db)
    if tuning_db.is_flat(db_root):
        raise TuningError(f"{db_root} is a plain meta_schedule work_dir; orca tune writes target-aware databases: "
                          "give it another folder (orca tune merge cannot read plain work_dirs either)")
    install_fast_inspect_stack()
    initializer = fast_inspect_worker_initializer()
    runner = make_runner(rpc, device_key, timeout_s, initializer, resolved)  # fail fast on a bad tracker
    import tvm.s_tir.tensor_intrin  # noqa: F401  (TuneContext imports it; do it with the fix on)
    from tvm.s_tir import meta_schedule as ms

    folder = tuning_db.target_dir(db_root, tvm_target, create=True)
    tasks = extract_tasks(lowered_modules(model, inputs, pipeline, target, db_root), tvm_target)
    report = TuneReport(name, folder.name, folder, trials)
    if not tasks:
        report.stopped_by = "nothing to tune (no TVM kernel in the lowered model)"
        report.seconds = time.monotonic() - start
        return report
    database = tuning_db.make_database(folder)
    before = _records_per_task(database, tasks)
    report.trials_before = sum(len(v) for v in before.values())
    report.tasks = [TaskResult(t.task_name, float(t.weight), before_ms=_best_ms(before[i])) for i, t in enumerate(tasks)]
    remaining = trials - report.trials_before
    callback = None
    with meta_schedule_logging():
        # meta_schedule may measure a trace the database holds already (its search starts from
        # the best records); those are not written twice, so loop until the count is reached.
        for _ in range(3):
            if remaining <= 0 or (deadline is not None and time.monotonic() >= deadline):
                break
            callback = _progress_callback(tasks, remaining, deadline, progress, _records_per_task(database, tasks))
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                tasks, work_dir=str(folder / "logs"), seed=seed)
            builder = ms.builder.LocalBuilder(max_workers=workers, timeout_sec=timeout_s, initializer=initializer)
            scheduler = ms.task_scheduler.TaskScheduler.create("gradient")
            try:
                ms.tune.tune_tasks(
                    tasks=contexts, task_weights=weights, work_dir=str(folder / "logs"),
                    max_trials_global=remaining, max_trials_per_task=remaining, num_trials_per_iter=trials_per_round,
                    builder=builder, runner=committing_runner(runner, scheduler, database), database=database,
                    measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), callback],
                    task_scheduler=scheduler,
                )
            except Exception as exc:  # noqa: BLE001
                if not callback.out_of_time:
                    from .lowering.relax_build import tvm_error_summary

                    raise TuningError(f"meta_schedule tuning failed ({folder}): {tvm_error_summary(exc)}") from exc
            finally:
                callback.bar.close()
            now = sum(len(v) for v in _records_per_task(database, tasks).values())
            added, remaining = now - report.trials_before - report.trials_run, trials - now
            report.trials_run += added
            if added == 0:
                break
    after = _records_per_task(database, tasks)
    for i, t in enumerate(report.tasks):
        t.records, t.after_ms = len(after[i]), _best_ms(after[i])
    if report.trials_total >= trials:
        report.stopped_by = "trials reached" if report.trials_run else "trials reached already: nothing to do"
    elif callback is not None and callback.out_of_time or (deadline and time.monotonic() >= deadline):
        report.stopped_by = "time budget spent"
    else:
        report.stopped_by = "search space exhausted"
    report.curve_path = write_curve(folder / CURVE_FILE, tasks, database)
    if compare:
        report.latency_ms = _latencies(model, inputs, pipeline, target, db_root)
    report.seconds = time.monotonic() - start
    (folder / "last_run.json").write_text(json.dumps({
        "model": name, "pipeline": pipeline, "trials": trials, "trials_total": report.trials_total,
        "stopped_by": report.stopped_by, "latency_ms": report.latency_ms,
        "tasks": [t.__dict__ for t in report.tasks]}, indent=1))
    return report
