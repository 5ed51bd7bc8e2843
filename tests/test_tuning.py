"""Meta-schedule tuning: a tiny tune, applying its database, empty/partial/corrupt databases."""
from __future__ import annotations

import inspect

import pytest
import torch

from orca_compiler.capture import capture
from orca_compiler.errors import OrcaError
from orca_compiler.lowering import tuning
from orca_compiler.lowering.relax_build import import_relax
from orca_compiler.lowering.support import keep_op_in_capture
from orca_compiler.lowering.target import resolve_target

from conftest import assert_outputs_close, needs_tuning_deps



def _model(*widths):
    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers += [torch.nn.Linear(a, b)] + ([torch.nn.ReLU()] if i == 0 else [])
    return torch.nn.Sequential(*layers).eval()


def _run(model, x, work_dir):
    """Build `model` with the database in `work_dir`; the output of `main` on x, and the module."""
    import tvm
    from tvm import relax

    target = resolve_target("llvm")
    mod = tuning.apply_database(import_relax(capture(model, (x,), keep_op=keep_op_in_capture).ir.gm), target, work_dir)
    vm = relax.VirtualMachine(tvm.compile(mod, target=target.tvm_target), tvm.cpu())
    return tuple(torch.from_dlpack(t) for t in vm["main"](x)), mod


def _prepacked(mod) -> int:
    return sum(gv.name_hint.endswith("_prepacked") for gv in mod.functions)


@pytest.fixture(scope="module")
def tuned_dir(tmp_path_factory):
    """A database for Linear(64,64)+ReLU at batch 4: 4 trials in one round (~10 s on 2 cores)."""
    work_dir = tmp_path_factory.mktemp("tuning")
    model, x = _model(64, 64), torch.randn(4, 64)
    gm = capture(model, (x,), keep_op=keep_op_in_capture).ir.gm
    tuning.tune_module(import_relax(gm), resolve_target("llvm"), work_dir, max_trials=4, num_trials_per_iter=4, seed=0)
    return work_dir


@needs_tuning_deps
def test_tuned_build_matches_eager_and_records_are_on_disk(tuned_dir):
    assert (tuned_dir / tuning.RECORD_FILE).read_text().count("\n") >= 1
    assert tuning.count_records(tuned_dir) >= 1
    model, x = _model(64, 64), torch.randn(4, 64)
    out, mod = _run(model, x, tuned_dir)
    assert_outputs_close((model(x),), out)
    # the tuned kernel reads a prepacked weight, folded at compile time: main keeps its signature
    assert _prepacked(mod) == 1 and not tuning.needs_transform_params(mod)
    assert len(mod["main"].params) == 1


@needs_tuning_deps
def test_task_without_record_is_left_untuned(tuned_dir):
    # The first layer is the tuned task; the second (64 -> 16, no ReLU) has no record.
    model, x = _model(64, 64, 16), torch.randn(4, 64)
    out, mod = _run(model, x, tuned_dir)
    assert_outputs_close((model(x),), out)
    assert _prepacked(mod) == 1


@needs_tuning_deps
def test_apply_database_takes_a_prepared_module_too(tuned_dir):
    model, x = _model(64, 64), torch.randn(4, 64)
    target = resolve_target("llvm")
    prepared = tuning.prepare_for_tuning(import_relax(capture(model, (x,), keep_op=keep_op_in_capture).ir.gm), target)
    assert tuning.is_prepared(prepared) and tuning.prepare_for_tuning(prepared, target) is prepared
    assert _prepacked(tuning.apply_database(prepared, target, tuned_dir)) == 1


def _empty_database(path):
    path.mkdir(exist_ok=True)
    for name in (tuning.WORKLOAD_FILE, tuning.RECORD_FILE):
        (path / name).write_text("")
    return path


def test_empty_database_still_compiles_and_matches(tmp_path):
    model, x = _model(32, 16), torch.randn(2, 32)
    out, mod = _run(model, x, _empty_database(tmp_path / "db"))
    assert_outputs_close((model(x),), out)
    assert _prepacked(mod) == 0


def test_missing_database_is_an_error(tmp_path):
    with pytest.raises(tuning.TuningError, match="no tuning database"):
        tuning.load_database(tmp_path)


@pytest.mark.parametrize(
    "records, match",
    [
        ("garbage{\n", "line 1 is not JSON"),
        ('["x", 1]\n', "corrupt"),
        ("[0, 1]\n", "corrupt"),
    ],
)
def test_corrupt_database_is_a_clear_error(tmp_path, records, match):
    db = _empty_database(tmp_path / "db")
    (db / tuning.RECORD_FILE).write_text(records)
    with pytest.raises(tuning.TuningError, match=match) as info:
        tuning.load_database(db)
    assert isinstance(info.value, OrcaError) and str(db) in str(info.value)


@needs_tuning_deps
def test_line_cut_by_a_killed_run_is_dropped_with_a_warning(tuned_dir, tmp_path):
    db = tmp_path / "db"
    db.mkdir()
    (db / tuning.WORKLOAD_FILE).write_text((tuned_dir / tuning.WORKLOAD_FILE).read_text())
    records = (tuned_dir / tuning.RECORD_FILE).read_text()
    (db / tuning.RECORD_FILE).write_text(records + records.splitlines()[0][:50])  # no final newline
    with pytest.warns(UserWarning, match="unfinished last line"):
        kept = len(tuning.load_database(db).get_all_tuning_records())
    assert kept == tuning.count_records(tuned_dir)


def _stdlib_stack(frame, context):
    infos = []  # inspect.stack itself may be the fast one already (tune_module installs it)
    while frame is not None:
        infos.append(inspect.getframeinfo(frame, context))
        frame = frame.f_back
    return infos


def test_fast_inspect_stack_matches_the_stdlib():
    from orca_compiler.lowering import _fast_inspect

    def frames():  # both on one line: each frame is at the same line for both
        return _fast_inspect.fast_stack(3), _stdlib_stack(inspect.currentframe(), 3)

    fast, slow = frames()
    fields = lambda f: (f.filename, f.lineno, f.function, f.code_context, f.index)  # noqa: E731
    assert len(fast) > 3 and [fields(f) for f in fast] == [fields(f) for f in slow]


def test_target_without_num_cores_is_rejected():
    with pytest.raises(tuning.TuningError, match="num-cores"):
        tuning.tuning_target({"kind": "llvm"})


def test_ffi_version_check(monkeypatch):
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.1.15.post2" if name == "apache-tvm-ffi" else real(name))
    monkeypatch.setattr(tuning.importlib.util, "find_spec", lambda name: object())
    with pytest.raises(tuning.TuningError, match="apache-tvm-ffi 0.1.15.post2"):
        tuning.check_tuning_dependencies()
    monkeypatch.setattr(tuning.importlib.util, "find_spec", lambda name: None if name == "xgboost" else object())
    with pytest.raises(tuning.TuningError, match="xgboost-cpu.*pip install"):
        tuning.check_tuning_dependencies()


@needs_tuning_deps
def test_compile_uses_a_tuning_database(tuned_dir):
    import orca_compiler as oc

    model, x = _model(64, 64), torch.randn(4, 64)
    for kernels in ("tvm", "measure"):  # the tuned TVM kernel alone, and competing with torch's
        compiled = oc.compile(model, (x,), kernels=kernels, tuning_db=tuned_dir)
        assert_outputs_close(model(x), compiled(x))


def test_compile_with_a_missing_tuning_database_names_it(tmp_path):
    import orca_compiler as oc

    model, x = _model(16, 16), torch.randn(2, 16)
    with pytest.raises(tuning.TuningError, match="nowhere"):
        oc.compile(model, (x,), kernels="tvm", tuning_db=tmp_path / "nowhere")
