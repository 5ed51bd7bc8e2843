"""orca tune: resume after SIGKILL, concurrent writers, target-aware lookups, merge/show, RPC on loopback.

Tuning is slow on 2 cores (a round of 2 trials is ~10 s), so one killed-and-resumed run of a
single Linear(64, 64) makes the database the other tests read.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from orca_compiler.lowering import tuning, tuning_db
from orca_compiler.lowering.target import resolve_target

from conftest import _MISSING_TUNING as MISSING, needs_tuning_deps

try:  # TVM's RPC tracker needs it (the `tune` extra)
    import tornado  # noqa: F401
    NO_TORNADO = None
except ImportError as exc:
    NO_TORNADO = str(exc)

REPO = Path(__file__).resolve().parent.parent
MODEL_FILE = """
import torch

def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64)).eval(), (torch.randn(4, 64),)
"""
TRIALS = 4  # a round of 2 before the kill, one more after it


def _env():
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("ORCA_COMPILE_CACHE", None)
    return env


def _tune_cmd(model: Path, db: Path) -> list[str]:
    return [sys.executable, "-m", "orca_compiler.cli", "tune", f"{model}:build", "--trials", str(TRIALS),
            "--trials-per-round", "2", "--db", str(db), "--no-compare", "--quiet"]


def _record_lines(db: Path) -> list[str]:
    files = list(db.glob(f"*/{tuning_db.RECORD_FILE}"))
    return [l for l in files[0].read_text().splitlines() if l.strip()] if files else []


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """Run `orca tune` with TRIALS trials, SIGKILL it once a round is saved, run it again."""
    if MISSING:
        pytest.skip(MISSING)
    tmp = tmp_path_factory.mktemp("tune")
    model, db = tmp / "tiny.py", tmp / "db"
    model.write_text(MODEL_FILE)
    proc = subprocess.Popen(_tune_cmd(model, db), env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while len(_record_lines(db)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the tuner and its build/run workers
        proc.wait()
    before = _record_lines(db)
    second = subprocess.run(_tune_cmd(model, db), env=_env(), capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    return {"db": db, "model": model, "before": before, "after": _record_lines(db), "stdout": second.stdout}


@needs_tuning_deps
def test_sigkill_then_rerun_resumes_without_repeating(resumed):
    before, after = resumed["before"], resumed["after"]
    assert 2 <= len(before) < TRIALS, "the kill should land mid-run"
    assert after[:len(before)] == before  # the records of the killed run are kept as they were
    traces = [(json.loads(l)[0], json.dumps(json.loads(l)[1][0])) for l in after]
    assert len(set(traces)) == len(traces)  # nothing measured twice
    assert len(after) == TRIALS
    assert f"{TRIALS - len(before)} trials now" in resumed["stdout"]
    folder = next(resumed["db"].glob("*/target.json")).parent
    assert json.loads((folder / "target.json").read_text())["key"] == folder.name
    assert (folder / "tuning_curve.html").read_text().count("<polyline") == 1


def _applied(db, target) -> int:
    """Number of prepacked (tuned) kernels when the tiny model is built with `db`."""
    from orca_compiler.capture import capture
    from orca_compiler.lowering.relax_build import import_relax
    from orca_compiler.lowering.support import keep_op_in_capture

    torch.manual_seed(0)
    model, x = torch.nn.Sequential(torch.nn.Linear(64, 64)).eval(), torch.randn(4, 64)
    mod = tuning.apply_database(import_relax(capture(model, (x,), keep_op=keep_op_in_capture).ir.gm), target, db)
    return sum(gv.name_hint.endswith("_prepacked") for gv in mod.functions)


@needs_tuning_deps
def test_records_of_another_target_are_never_applied(resumed, tmp_path):
    target = resolve_target("llvm")
    assert _applied(resumed["db"], target) == 1
    assert tuning.count_records(resumed["db"], target) == TRIALS
    # The same records filed under another CPU's key (as `orca tune` on that CPU writes them).
    other = dict(target.tvm_target.export())
    other["mcpu"] = "skylake-avx512"
    other_target = resolve_target(other)
    foreign = tmp_path / "foreign"
    folder = tuning_db.target_dir(foreign, other_target.tvm_target, create=True)
    src = next(resumed["db"].glob("*/target.json")).parent
    for name in (tuning_db.WORKLOAD_FILE, tuning_db.RECORD_FILE):
        shutil.copy(src / name, folder / name)
    assert folder.name != src.name and folder.name.startswith("llvm-skylake-avx512-")
    with pytest.warns(UserWarning, match="no records for this target"):
        assert _applied(foreign, target) == 0
    assert tuning.count_records(foreign, target) == 0
    assert _applied(foreign, other_target) == 1
    # a different TVM version is another key too
    identity = tuning_db.target_identity(target.tvm_target)
    assert {"tvm", "tvm_ffi"} <= set(identity) and identity["target"]["num-cores"] >= 1


@needs_tuning_deps
def test_merge_dedups_keeping_the_best_and_show_lists_it(resumed, tmp_path, capsys):
    from orca_compiler.cli import main

    copy = tmp_path / "copy"
    shutil.copytree(resumed["db"], copy)
    rec_file = next(copy.glob(f"*/{tuning_db.RECORD_FILE}"))
    lines = [json.loads(l) for l in rec_file.read_text().splitlines()]
    lines[0][1][1] = [1e-7]  # the same (workload, trace), measured faster
    rec_file.write_text("".join(json.dumps(l) + "\n" for l in lines))
    out = tmp_path / "merged"
    assert main(["tune", "merge", str(resumed["db"]), str(copy), "-o", str(out)]) == 0
    merged = [json.loads(l) for l in _record_lines(out)]
    assert len(merged) == TRIALS and merged[0][1][1] == [1e-7]
    assert main(["tune", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    folder = next(out.glob("*/target.json")).parent.name
    assert f"target {folder}" in shown and f"1 workload(s), {TRIALS} record(s)" in shown and "best 0.0001 ms" in shown
    assert main(["tune", "show", str(tmp_path / "nothing")]) == 2


WRITER = """
import sys, time
from pathlib import Path
import tvm
from tvm import te
from tvm.s_tir import meta_schedule as ms
from orca_compiler.lowering import tuning_db

folder, first, go = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
db = tuning_db.make_database(folder)
target = tvm.target.Target({"kind": "llvm", "num-cores": 1})
while not go.exists():
    time.sleep(0.01)
for n in range(first, first + 25):
    a = te.placeholder((n,), name="a")
    mod = tvm.IRModule({"main": te.create_prim_func([a, te.compute((n,), lambda i: a[i] + 1.0, name="b")])})
    workload = db.commit_workload(mod)
    trace = tvm.s_tir.schedule.Trace([], {})
    db.commit_tuning_record(ms.database.TuningRecord(trace, workload, [n * 1e-6], target, None))
"""


def test_two_writers_at_once_keep_the_database_consistent(tmp_path):
    script, go, folder = tmp_path / "writer.py", tmp_path / "go", tmp_path / "db" / "llvm-test"
    script.write_text(WRITER)
    procs = [subprocess.Popen([sys.executable, str(script), str(folder), str(first), str(go)], env=_env(),
                              stderr=subprocess.PIPE, text=True) for first in (1, 101)]
    time.sleep(0.5)
    go.touch()
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()[-2000:]
    raw = tuning_db.RawDatabase.read(folder)
    assert len(raw.workloads) == 50 and len(raw.records) == 50
    from tvm.s_tir import meta_schedule as ms

    for widx, rec in raw.records:  # each record points at the workload it was measured for
        mod = ms.database.Workload.from_json(raw.workloads[widx]).mod
        n = int(re.search(r"\((\d+),\)", mod.script()).group(1))  # the size it was made with
        assert abs(rec[1][0] - n * 1e-6) < 1e-12


def test_unfinished_last_line_is_cut_before_the_next_append(tmp_path):
    path = tmp_path / "f.json"
    path.write_text('[0, 1]\n[1, "cut sho')
    assert tuning_db.read_lines(path) == [[0, 1]]
    tuning_db.append_line(path, [2, 3])
    assert path.read_text() == "[0, 1]\n[2, 3]\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rpc_farm(tmp_path_factory):
    """A TVM RPC tracker and two RPC servers on 127.0.0.1 (key "orca-test")."""
    if NO_TORNADO:
        pytest.skip(f"TVM's RPC tracker needs tornado: {NO_TORNADO}")
    tmp_path = tmp_path_factory.mktemp("rpc")
    port = _free_port()
    logs = [open(tmp_path / f"rpc{i}.log", "w") for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port),
                               "--port-end", str(port + 1)], stdout=logs[0], stderr=subprocess.STDOUT,
                              start_new_session=True)]
    for i in (1, 2):
        procs.append(subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1",
                                       "--port", str(_free_port()), "--port-end", "65535",
                                       "--tracker", f"127.0.0.1:{port}", "--key", "orca-test"],
                                      stdout=logs[i], stderr=subprocess.STDOUT, start_new_session=True))
    try:
        from tvm import rpc

        deadline = time.monotonic() + 60
        while True:
            try:
                free = rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"].get("orca-test", {}).get("free", 0)
            except Exception:  # noqa: BLE001  (tracker not up yet)
                free = 0
            if free >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert free >= 2, (tmp_path / "rpc1.log").read_text()[-2000:]
        yield port
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for log in logs:
            log.close()


@needs_tuning_deps
def test_tuning_through_an_rpc_tracker_on_loopback(rpc_farm, tmp_path):
    import orca_compiler

    torch.manual_seed(0)
    model, x = torch.nn.Sequential(torch.nn.Linear(32, 32)).eval(), torch.randn(2, 32)
    report = orca_compiler.tune(model, (x,), trials=2, trials_per_round=2, db=tmp_path / "db",
                                rpc=f"127.0.0.1:{rpc_farm}", device_key="orca-test", compare=False, progress=False)
    assert report.trials_run == 2 and len(_record_lines(tmp_path / "db")) == 2
    assert any(t.after_ms is not None for t in report.tasks), "no trial ran on the RPC servers"


@needs_tuning_deps
def test_rpc_errors_name_the_tracker_and_key(rpc_farm, tmp_path):
    import orca_compiler

    model, x = torch.nn.Linear(8, 8).eval(), torch.randn(1, 8)
    with pytest.raises(tuning.TuningError, match="no server with key 'gpu'"):
        orca_compiler.tune(model, (x,), db=tmp_path, rpc=f"127.0.0.1:{rpc_farm}", device_key="gpu", progress=False)
    with pytest.raises(tuning.TuningError, match="needs --device-key"):
        orca_compiler.tune(model, (x,), db=tmp_path, rpc=f"127.0.0.1:{rpc_farm}", progress=False)


def test_cli_usage_errors(capsys, tmp_path):
    from orca_compiler.cli import main

    assert main(["tune", "merge", "onlyone"]) == 2
    assert "usage: orca tune merge" in capsys.readouterr().err
    if MISSING is None and not torch.cuda.is_available():
        assert main(["tune", "mlp", "--target", "cuda", "--db", str(tmp_path)]) == 2
        assert "no local cuda device" in capsys.readouterr().err


BUDGET_S = 12.0
# The budget is checked after each round of `trials_per_round` candidates (and the compiles that
# find the tasks are not cut short), so a run may overshoot it by one round: with 2 candidates,
# builds and runs bounded by timeout_s=10, a round is at most ~40 s; measured 5-15 s here.
BUDGET_SLACK_S = 40.0


@needs_tuning_deps
def test_time_budget_stops_the_run_and_keeps_what_finished(tmp_path):
    import orca_compiler

    torch.manual_seed(0)
    model, x = torch.nn.Sequential(torch.nn.Linear(48, 48)).eval(), torch.randn(4, 48)
    db = tmp_path / "db"
    start = time.monotonic()
    report = orca_compiler.tune(model, (x,), trials=1000, time_budget=BUDGET_S, trials_per_round=2, timeout_s=10,
                                db=db, compare=False, progress=False)
    wall = time.monotonic() - start
    assert report.stopped_by == "time budget spent", report
    assert report.seconds <= wall <= BUDGET_S + BUDGET_SLACK_S, (wall, report)
    lines = _record_lines(db)
    # every trial that finished is in the database, one valid JSON line each, none lost
    assert len(lines) == report.trials_run == report.trials_total < 1000
    assert all(isinstance(json.loads(line), list) for line in lines)
    assert sum(t.records for t in report.tasks) == len(lines)
    if lines:  # (none when finding the tasks alone outlasted the budget on a very busy machine)
        # a rerun continues from those records instead of starting over
        again = orca_compiler.tune(model, (x,), trials=len(lines), db=db, compare=False, progress=False)
        assert again.trials_before == len(lines) and again.trials_run == 0
        assert again.stopped_by == "trials reached already: nothing to do"


@needs_tuning_deps
def test_l3_entry_carries_the_records_its_build_applied(resumed, tmp_path):
    import orca_compiler as oc
    from orca_compiler import compile_cache, serialize

    db, store = resumed["db"], tmp_path / "l3"
    torch.manual_seed(0)
    model, x = torch.nn.Sequential(torch.nn.Linear(64, 64)).eval(), torch.randn(4, 64)
    options = dict(kernels="tvm", tuning_db=db, cache="on", cache_dir=store)
    compile_cache.clear_memory()
    compiled = oc.compile(model, (x,), **options)
    entry = store / compiled.report.cache.key
    folder = entry / serialize.TUNING_DIR
    meta = json.loads((entry / serialize.META).read_text())
    assert {serialize.TUNING_WORKLOADS, serialize.TUNING_RECORDS} <= set(meta["files"])
    # meta_schedule's JSON-lines files, which it reads as a database (a plain work_dir)
    assert tuning.count_records(folder) == meta["tuning"]["records"] > 0
    lines = lambda path: [json.loads(l) for l in path.read_text().splitlines() if l.strip()]  # noqa: E731
    workloads, records = lines(folder / tuning_db.WORKLOAD_FILE), lines(folder / tuning_db.RECORD_FILE)
    # exactly the database's records of the workloads the build applied: the Linear's one kernel
    raw = tuning_db.RawDatabase.read(next(db.glob("*/target.json")).parent)
    assert len(workloads) == meta["tuning"]["workloads"] == 1 and workloads[0] in raw.workloads
    expected = sorted(json.dumps(rec) for i, rec in raw.records if raw.workloads[i] == workloads[0])
    assert sorted(json.dumps(rec) for _, rec in records) == expected and len(expected) == TRIALS
    # and they rebuild the same tuned kernel on their own
    assert _applied(folder, resolve_target("llvm")) == 1
    # an L3 hit keeps them, and saving the loaded module writes them again
    compile_cache.clear_memory()
    again = oc.compile(model, (x,), **options)
    assert again.report.cache.served == "L3" and again.artifact.tuning["records"] == records
    again.save(tmp_path / "saved")
    assert (tmp_path / "saved" / serialize.TUNING_RECORDS).read_text() == (folder / tuning_db.RECORD_FILE).read_text()
    # records altered on disk make the entry invalid like any other file
    (folder / tuning_db.RECORD_FILE).write_text("[0, not json]\n")
    compile_cache.clear_memory()
    rebuilt = oc.compile(model, (x,), **options)
    events = rebuilt.report.cache.events
    assert rebuilt.report.cache.served == "compile" and any(
        "rebuilt" in e and tuning_db.RECORD_FILE in e for e in events), events
    torch.testing.assert_close(rebuilt(x)[0] if isinstance(rebuilt(x), tuple) else rebuilt(x), model(x))
    assert tuning.count_records(folder) == TRIALS  # written whole again
