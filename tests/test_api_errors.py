"""Bad input to the public API and the CLI gives OrcaErrors that name the culprit."""
from __future__ import annotations

import io
import contextlib

import pytest
import torch

import orca_compiler as oc
from orca_compiler import cli


@pytest.fixture(scope="module")
def mlp():
    model, inputs = oc.zoo.get("mlp")
    return model, inputs, oc.compile(model, inputs, pipeline="O0")


def test_input_checks_name_index_and_problem(mlp):
    _, (x,), compiled = mlp
    with pytest.raises(oc.InputMismatchError, match=r"input 0: shape \(4, 512\) \(compiled for \(8, 512\)\)"):
        compiled(torch.randn(4, 512))
    with pytest.raises(oc.InputMismatchError, match="dtype torch.float64"):
        compiled(x.double())
    with pytest.raises(oc.InputMismatchError, match="structure"):
        compiled(x, x)


def test_non_contiguous_input_is_accepted(mlp):
    model, (x,), compiled = mlp
    wide = torch.randn(512, 8).t()  # shape (8, 512), not contiguous
    torch.testing.assert_close(compiled(wide), model(wide), rtol=1e-4, atol=1e-5)


def test_bad_target_names_the_value():
    model, inputs = oc.zoo.get("mlp")
    with pytest.raises(oc.TargetError, match="unknown target 'llvm -mcpu=native'"):
        oc.compile(model, inputs, target="llvm -mcpu=native")
    with pytest.raises(oc.TargetError, match="TVM rejected target"):
        oc.compile(model, inputs, target={"kind": "no-such-kind"})


def test_bad_pipeline_and_options_fail_before_capture():
    model, inputs = oc.zoo.get("mlp")
    with pytest.raises(oc.PipelineError, match="unknown pass 'fold-bnn'.*fold-bn"):
        oc.compile(model, inputs, pipeline="fold-bnn")
    with pytest.raises(oc.OrcaError, match="unknown compile option.*fulgraph"):
        oc.compile(model, inputs, fulgraph=True)
    with pytest.raises(oc.OrcaError, match=r"example input leaf 0 must be a tensor, got int"):
        oc.compile(model, ([1, 2],))


def test_explicit_target_dict_is_accepted(mlp):
    model, inputs, _ = mlp
    compiled = oc.compile(model, inputs, pipeline="O0", target={"kind": "llvm", "num-cores": 2})
    torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)


def _run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def test_cli_help_lists_subcommands():
    code, out, _ = _run_cli("--help")
    assert code == 0
    for sub in ("passes", "zoo", "compile", "demo"):
        assert sub in out


def test_cli_passes_lists_every_pass_with_options():
    code, out, _ = _run_cli("passes")
    assert code == 0
    for name, cls in oc.registered_passes().items():
        assert f"{name:<18} {cls.summary()}" in out
    assert "max_growth: float = 2.0" in out and f"O1: {oc.NAMED_PIPELINES['O1']}" in out


def test_cli_compile_prints_report_and_error(tmp_path):
    code, out, _ = _run_cli("compile", "resnet", "--time-passes", "--print-ir")
    assert code == 0
    assert "fold-bn" in out and "fallback to eager: none" in out and "max abs error against eager" in out
    code, _, err = _run_cli("compile", "resnet", "--pipeline", "nope")
    assert code == 2 and "unknown pass 'nope'" in err


def test_cli_compile_loads_a_user_file(tmp_path):
    path = tmp_path / "my_model.py"
    path.write_text(
        "import torch\n"
        "def build():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh()), (torch.randn(2, 4),)\n"
    )
    code, out, _ = _run_cli("compile", f"{path}:build")
    assert code == 0 and "fallback to eager: none" in out


def test_out_of_range_token_is_an_error_not_a_crash():
    """TVM's take reads out of bounds; eager raises IndexError. We check before calling."""
    model, (tokens,) = oc.zoo.get("transformer")
    compiled = oc.compile(model, (tokens,), pipeline="O0")
    bad = tokens.clone()
    bad[0, 3] = 1000
    with pytest.raises(oc.InputMismatchError, match=r"input 0: index 1000 is out of range for %embedding with 1000 rows"):
        compiled(bad)
    bad[0, 3] = -1
    with pytest.raises(oc.InputMismatchError, match="index -1"):
        compiled(bad)
