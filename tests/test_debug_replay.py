"""Reproducers: a failing pass (or a numeric violation) leaves a folder that `replay` fails on the same way."""
from __future__ import annotations

import json

import pytest
import torch

from orca_compiler import PassError
from orca_compiler.cli import main
from orca_compiler.debug.reproducer import ReproducerError, load_ir, read_manifest, replay
from orca_compiler.pass_base import Pass, PassResult

from conftest import debug_zoo, passes_registered
from orca_compiler.printer import format_ir


class _Explode(Pass):
    """Test pass: always raises, with the node count in the message (so a replay must see the same IR)."""

    name = "test-replay-explode"

    def run(self, ir, ctx):
        raise ValueError(f"boom at {len(ir.compute_nodes())} nodes")


class _Perturb(Pass):
    """Test pass: adds 0.25 to the bias of the first linear (a deliberate numeric bug)."""

    name = "test-replay-perturb"

    def run(self, ir, ctx):
        linear = next(n for n in ir.compute_nodes() if n.target == torch.ops.aten.linear.default)
        bias = linear.args[2]
        with ir.graph.inserting_before(linear):
            new_bias = ir.add_weight(bias.target + "_perturbed", ir.weight(bias) + 0.25)
        linear.replace_input_with(bias, new_bias)
        return PassResult(ir, True)


@pytest.fixture
def broken_passes():
    with passes_registered(_Explode, _Perturb):
        yield


_debug = debug_zoo


def test_pass_error_writes_a_reproducer_that_replays_the_same_error(tmp_path, broken_passes):
    folder = tmp_path / "repro"
    with pytest.raises(PassError) as info:
        _debug("mlp", "cse,fold-constants,test-replay-explode,dce", reproducer_dir=str(folder))
    assert f"orca debug replay {folder}" in str(info.value)
    manifest = read_manifest(folder)
    assert manifest["pipeline"] == "test-replay-explode,dce"
    assert manifest["failure"] == {"kind": "pass-error", "pass": "test-replay-explode", "type": "ValueError",
                                   "message": "boom at 5 nodes"}
    result = replay(folder)
    assert result.got == manifest["failure"] and result.reproduced
    assert isinstance(result.error, PassError) and result.error.pass_name == "test-replay-explode"
    assert "boom at 5 nodes" in str(result.error)


def test_loaded_ir_prints_like_the_saved_one_with_orca_meta(tmp_path, broken_passes):
    folder = tmp_path / "repro"
    with pytest.raises(PassError):  # resnet after fuse: orca ops, weights made by fold-bn
        _debug("resnet", "O2,test-replay-explode", reproducer_dir=str(folder))
    text = (folder / "input.ir").read_text()
    assert "orca.conv_epilogue" in text and "{from=fold-bn}" in text
    assert format_ir(load_ir(folder, read_manifest(folder))) == text


def test_numeric_violation_replays_with_the_same_max_error(tmp_path, broken_passes):
    folder = tmp_path / "repro"
    result = _debug("mlp", "cse,test-replay-perturb,dce", numerics=True, tol=1e-3, reproducer_dir=str(folder))
    assert result.reproducer == folder
    recorded = read_manifest(folder)
    assert recorded["pipeline"] == "test-replay-perturb,dce" and recorded["tol"] == 1e-3
    row = next(r for r in result.numerics_table.splitlines() if "test-replay-perturb" in r)
    assert recorded["failure"]["max_abs"] == pytest.approx(float(row.split()[3]), rel=1e-3)
    again = replay(folder)
    assert again.reproduced and again.got["pass"] == "test-replay-perturb"
    assert again.got["max_abs"] == pytest.approx(recorded["failure"]["max_abs"], rel=1e-9)


def test_bisect_writes_the_culprits_reproducer(tmp_path, broken_passes):
    folder = tmp_path / "repro"
    result = _debug("mlp", "fold-constants,test-replay-perturb,cse", bisect=True, tol=1e-4, reproducer_dir=str(folder))
    assert result.bisect.pass_name == "test-replay-perturb" and result.reproducer == folder
    again = replay(folder)
    assert again.reproduced
    assert again.got["max_abs"] == pytest.approx(result.bisect.error_after, rel=1e-9)


def test_no_failure_writes_no_reproducer(tmp_path):
    result = _debug("mlp", "cse,dce", numerics=True, reproducer_dir=str(tmp_path / "repro"))
    assert result.reproducer is None and not (tmp_path / "repro").exists()


def test_replay_that_no_longer_fails_is_not_reproduced(tmp_path, broken_passes):
    folder = tmp_path / "repro"
    with pytest.raises(PassError):
        _debug("mlp", "test-replay-explode", reproducer_dir=str(folder))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["pipeline"] = "dce"  # as if the pass had been fixed
    (folder / "manifest.json").write_text(json.dumps(manifest))
    result = replay(folder)
    assert result.got is None and not result.reproduced
    assert "NOT reproduced" in result.describe()


def test_replay_cli_fails_the_same_way(tmp_path, broken_passes, capsys):
    folder = tmp_path / "repro"
    rc = main(["debug", "mlp", "--pipeline", "cse,test-replay-explode", "--reproducer-dir", str(folder)])
    assert rc == 2 and "orca debug replay" in capsys.readouterr().err
    assert main(["debug", "replay", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "pass 'test-replay-explode' failed: ValueError: boom at 5 nodes -- reproduced" in out


@pytest.mark.parametrize("make, words", [
    (lambda d: None, ["no such folder"]),
    (lambda d: d.mkdir(), ["is not a reproducer", "manifest.json"]),
    (lambda d: (d.mkdir(), (d / "manifest.json").write_text("{}")), ["not an orca-reproducer manifest"]),
    (lambda d: (d.mkdir(), (d / "manifest.json").write_text(
        '{"format": "orca-reproducer", "pipeline": "dce", "failure": {"kind": "numeric"}, "nodes": []}')),
     ["missing input.pt2, inputs.pt, reference.pt"]),
])
def test_a_folder_that_is_not_a_reproducer_names_what_is_missing(tmp_path, make, words, capsys):
    folder = tmp_path / "repro"
    make(folder)
    with pytest.raises(ReproducerError) as info:
        replay(folder)
    for word in words:
        assert word in str(info.value)
    assert main(["debug", "replay", str(folder)]) == 2
    assert words[0] in capsys.readouterr().err
