"""The benchmark machinery on the MLP at batch 1: fields of the JSON, FLOP count, Markdown. No timing checks."""
from __future__ import annotations

import importlib.util
import json

import pytest

from orca_compiler import bench, roofline, zoo
from orca_compiler.cli import build_parser

PEERS = ["torch.compile"] + (["onnxruntime"] if importlib.util.find_spec("onnxruntime") else [])
BACKENDS = ["eager", *PEERS, "orca O1", "orca O2"]
MLP_SIZES = (512, 1024, 1024, 10)


def _mlp_flops(batch: int) -> int:
    return 2 * sum(a * b for a, b in zip(MLP_SIZES, MLP_SIZES[1:])) * batch


def _small_limits() -> dict:
    # The real sizes (2048^2 GEMMs, 256 MB copies) take seconds; the fields are what is tested here.
    return {"gemm": roofline.peak_gemm(sizes=(128,), repeats=2),
            "bandwidth": roofline.memory_bandwidth(megabytes=8, repeats=2)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`orca bench` on the MLP at batch 1, 2 rounds, in a worker process as by default; the JSON it wrote."""
    out = tmp_path_factory.mktemp("bench")
    args = build_parser().parse_args(["bench", "--models", "mlp", "--batches", "1", "--repeats", "2",
                                      "--peers", *PEERS, "--json", str(out / "result.json"), "--write-docs", str(out)])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(roofline, "machine_limits", _small_limits)
        assert args.fn(args) == 0
    return out


@pytest.mark.parametrize("batch", [1, 3])
def test_mlp_flops_are_analytic(batch):
    model, inputs = zoo.get("mlp", batch_size=batch)
    assert roofline.forward_flops(model, inputs) == _mlp_flops(batch)
    weights = sum(a * b + b for a, b in zip(MLP_SIZES, MLP_SIZES[1:]))
    assert roofline.weight_bytes(model) == 4 * weights


def test_limits_fields():
    limits = _small_limits()
    assert limits["gemm"]["gflops"] > 0 and limits["gemm"]["n"] == 128
    assert limits["bandwidth"]["gbs"] == max(limits["bandwidth"]["copy_gbs"], limits["bandwidth"]["read_gbs"]) > 0


def test_json_fields(run):
    result = json.loads((run / "result.json").read_text())
    assert json.loads((run / "benchmarks.json").read_text()) == result
    assert {"cpu", "cores", "torch_threads", "torch", "tvm", "onnxruntime", "orca"} <= result["machine"].keys()
    assert result["config"]["isolate"] is True
    (row,) = result["rows"]
    assert "error" not in row, row
    assert row["flops"] == _mlp_flops(1)
    assert row["failures"] == {}
    for field in ("ms", "speedup_vs_eager", "gflops", "frac_peak", "weight_gbs", "frac_bandwidth"):
        assert list(row[field]) == BACKENDS, field
    assert list(row["compile_s"]) == BACKENDS[1:]
    assert list(row["orca_vs_best_peer"]) == ["orca O1", "orca O2"]
    assert row["max_abs_err"]["orca O2"] < 1e-4
    assert set(row["ran_eager"]) <= {"orca O1", "orca O2"}  # the pipelines the eager guard sent to eager
    geomean = result["geomean"]
    assert geomean["runs"] == 1 and geomean["speedup_vs_eager"]["eager"] == pytest.approx(1.0)
    assert list(geomean["orca_vs"]["orca O2"]) == [b for b in BACKENDS if not b.startswith("orca")] + ["best peer"]


def test_markdown_renders(run):
    text = (run / "benchmarks.md").read_text()
    assert text == bench.markdown(json.loads((run / "result.json").read_text()))
    for heading in ("## Machine", "## Latency", "## Geomean", "## Compile time", "## Compute", "## Weight streaming"):
        assert heading in text
    assert "| GEMM peak |" in text and "| memory bandwidth |" in text and "| torch threads |" in text
    assert text.count("| mlp | 1 |") == 3  # latency, compile time, compute
    assert "## Failures" not in text
    result = json.loads((run / "result.json").read_text())
    result["rows"][0]["ran_eager"] = ["orca O1"]
    (o1_cell,) = [c for c in bench.markdown(result).split("| mlp | 1 |")[1].split("|") if c.strip().endswith("*")]
    assert o1_cell.strip() == f"{result['rows'][0]['ms']['orca O1']:.3f} ({result['rows'][0]['speedup_vs_eager']['orca O1']:.2f}x) *"


def test_bench_help_lists_options(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--help"])
    help_text = capsys.readouterr().out
    for option in ("--models", "--batches", "--pipelines", "--peers", "--repeats", "--isolate", "--json",
                   "--write-docs"):
        assert option in help_text
