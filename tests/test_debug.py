"""`orca debug`: IR dumps, pass statistics, per-pass numerics and bisection to the pass and node."""
from __future__ import annotations

import pytest
import torch

from orca_compiler import PassError, PipelineError
from orca_compiler.cli import main
from orca_compiler.debug import DebugOptionError
from orca_compiler.pass_base import Pass, PassResult

from conftest import debug_zoo, passes_registered


class _PerturbBias(Pass):
    """Test pass: add 0.1 to the bias of the second linear (a deliberate numeric bug)."""

    name = "test-perturb-bias"

    def run(self, ir, ctx):
        linear = [n for n in ir.compute_nodes() if n.target == torch.ops.aten.linear.default][1]
        bias = linear.args[2]
        with ir.graph.inserting_before(linear):
            new_bias = ir.add_weight(bias.target + "_perturbed", ir.weight(bias) + 0.1)
        linear.replace_input_with(bias, new_bias)
        return PassResult(ir, True)


class _Explode(Pass):
    """Test pass: always raises."""

    name = "test-explode"

    def run(self, ir, ctx):
        raise RuntimeError("boom")


@pytest.fixture
def broken_passes():
    with passes_registered(_PerturbBias, _Explode):
        yield


_debug = debug_zoo


# -- IR dumps ----------------------------------------------------------------------------------


def test_print_ir_after_all_writes_one_file_per_pass_and_diffs_for_changes(tmp_path):
    result = _debug("resnet", "fold-constants,fold-bn,dce", dump_dir=str(tmp_path), print_ir_after_all=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00_fold-constants.after.ir", "01_fold-bn.after.ir", "01_fold-bn.diff", "02_dce.after.ir"]
    assert [p.name for p in result.files] == ["00_fold-constants.after.ir", "01_fold-bn.after.ir",
                                              "01_fold-bn.diff", "02_dce.after.ir"]
    after = (tmp_path / "01_fold-bn.after.ir").read_text()
    assert "batch_norm" not in after and "{from=fold-bn}" in after
    assert after == str(result.ir)  # dce changed nothing: the last dump is the final IR
    diff = (tmp_path / "01_fold-bn.diff").read_text().splitlines()
    assert diff[0] == "--- 01_fold-bn.before" and diff[1] == "+++ 01_fold-bn.after"
    assert any(line.startswith("-") and "batch_norm" in line for line in diff)
    assert any(line.startswith("+") and "{from=fold-bn}" in line for line in diff)


def test_print_ir_before_and_after_a_named_pass(tmp_path):
    _debug("resnet", "O1", dump_dir=str(tmp_path), print_ir_before=["fold-bn"], print_ir_after=["cse"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["01_fold-bn.before.ir", "03_cse.after.ir"]
    assert "batch_norm" in (tmp_path / "01_fold-bn.before.ir").read_text()
    assert "batch_norm" not in (tmp_path / "03_cse.after.ir").read_text()


def test_print_ir_after_change_skips_passes_that_change_nothing(tmp_path):
    _debug("resnet", "O1", dump_dir=str(tmp_path), print_ir_after_change=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["01_fold-bn.after.ir", "01_fold-bn.diff"]


def test_print_ir_after_failure_writes_the_input_ir_and_the_error(tmp_path, broken_passes):
    with pytest.raises(PassError, match="test-explode") as info:
        _debug("mlp", "cse,test-explode,dce", dump_dir=str(tmp_path), print_ir_after_failure=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["01_test-explode.before.ir", "01_test-explode.error.txt"]
    assert "%linear_2 = linear(" in (tmp_path / "01_test-explode.before.ir").read_text()
    assert "boom" in (tmp_path / "01_test-explode.error.txt").read_text()
    assert "01_test-explode.before.ir" in str(info.value)  # the error says where the dump is


@pytest.mark.parametrize("flag, value, error, words", [
    ("print_ir_after", ["no-such-pass"], PipelineError, ["--print-ir-after=no-such-pass", "unknown pass"]),
    ("print_ir_before", ["fuse"], PipelineError, ["--print-ir-before=fuse", "not in the pipeline"]),
    ("tol", 0.0, DebugOptionError, ["--tol"]),
    ("opt_bisect_limit", 9, DebugOptionError, ["--opt-bisect-limit", "between 0 and 5"]),
])
def test_bad_flags_are_named_in_the_error(flag, value, error, words):
    with pytest.raises(error) as info:
        _debug("mlp", "O1", **{flag: value})
    for word in words:
        assert word in str(info.value)


# -- tables ------------------------------------------------------------------------------------


def test_time_passes_table_has_time_nodes_and_weight_bytes_per_pass():
    result = _debug("resnet", "O1", time_passes=True)
    lines = result.time_table.splitlines()
    assert lines[0].split()[:4] == ["#", "pass", "ms", "%"]
    rows = {line.split()[1]: line.split() for line in lines[1:-1]}
    assert list(rows) == ["fold-constants", "fold-bn", "decompose-rnn", "cse", "dce"]
    fold_bn = rows["fold-bn"]
    record = next(r for r in result.records if r.name == "fold-bn")
    assert fold_bn[4] == "yes" and fold_bn[5] == f"{record.nodes_before}->{record.nodes_after}"
    assert record.nodes_after < record.nodes_before
    assert rows["cse"][4] == "no"
    assert lines[-1].split()[0] == "total"


def test_numerics_table_shows_the_error_appear_at_the_broken_pass(broken_passes):
    result = _debug("mlp", "cse,test-perturb-bias,dce", numerics=True)
    rows = [line.split() for line in result.numerics_table.splitlines()[1:]]
    assert [r[1] for r in rows] == ["(captured)", "cse", "test-perturb-bias", "dce"]
    errors = {r[1]: (float(r[3]), float(r[4]), float(r[5])) for r in rows}
    assert errors["cse"] == (0.0, 0.0, 1.0)
    max_abs, rel, cosine = errors["test-perturb-bias"]
    assert max_abs > 1e-2 and rel > 1e-3 and cosine < 1.0
    assert errors["dce"] == errors["test-perturb-bias"]


def test_opt_bisect_limit_runs_only_the_first_passes(broken_passes):
    result = _debug("mlp", "cse,test-perturb-bias,dce", opt_bisect_limit=1, numerics=True)
    assert [r.skipped for r in result.records] == [False, True, True]
    assert "test-perturb-bias" not in result.numerics_table


# -- bisect ------------------------------------------------------------------------------------


def test_bisect_names_the_broken_pass_and_node(broken_passes):
    result = _debug("mlp", "fold-constants,cse,test-perturb-bias,dce", bisect=True, tol=1e-4).bisect
    assert (result.pass_index, result.pass_name) == (2, "test-perturb-bias")
    assert result.node.node == "linear_1" and result.node.max_abs == pytest.approx(0.1, rel=1e-3)
    assert result.node.new_inputs == ["net_2_bias_perturbed"]
    assert result.error_before <= 1e-4 < result.error_after


def test_bisect_cli_prints_verdict_and_reproducer(broken_passes, capsys):
    rc = main(["debug", "bisect", "mlp", "--pipeline", "cse,test-perturb-bias,dce", "--tol", "1e-4"])
    verdict, reproduce = capsys.readouterr().out.strip().splitlines()
    assert rc == 1
    assert verdict.startswith("bisect: pass #1 'test-perturb-bias' is the first to exceed tol 0.0001")
    assert "first diverging node %linear_1" in verdict
    assert reproduce == ("reproduce: orca debug mlp --pipeline cse,test-perturb-bias,dce --opt-bisect-limit 2 "
                         "--numerics --print-ir-after=test-perturb-bias")


def test_bisect_of_a_correct_pipeline_says_no_pass_exceeds(capsys):
    rc = main(["debug", "resnet", "--pipeline", "O1", "--bisect"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith("bisect: no pass exceeds tol 0.0001 (max abs error after all 5 passes:")


def test_debug_cli_prints_tables_and_lists_dumps(tmp_path, capsys):
    rc = main(["debug", "mlp", "--pipeline", "cse,dce", "--time-passes", "--numerics",
               "--print-ir-after-all", "--dump-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "max abs err" in out and "weights MiB" in out
    assert "2 file(s) written" in out and "00_cse.after.ir, 01_dce.after.ir" in out


def test_debug_cli_rejects_extra_positionals(capsys):
    assert main(["debug", "mlp", "resnet"]) == 2
    assert "MODEL" in capsys.readouterr().err
