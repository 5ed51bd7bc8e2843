"""The compile cache (L2 in memory, L3 on disk), save/load, and `orca cache`."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import orca_compiler as oc
from orca_compiler import api, compile_cache, serialize
from orca_compiler.cli import main as cli_main

from conftest import assert_outputs_close

REPO = Path(__file__).resolve().parent.parent


@torch.library.custom_op("orca_cache_test::wiggle", mutates_args=())
def wiggle(x: torch.Tensor) -> torch.Tensor:
    """An op TVM lacks: it runs in eager between two TVM partitions."""
    return x * torch.sigmoid(x) + 0.5


@wiggle.register_fake
def _(x):
    return torch.empty_like(x)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class WithFallback(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = torch.ops.orca_cache_test.wiggle(torch.relu(self.a(x)))
        return self.b(y).mean((2, 3)), y


def _tiny():
    torch.manual_seed(0)
    return Tiny().eval(), (torch.randn(2, 8),)


@pytest.fixture(scope="module", autouse=True)
def _cache_on():
    """The suite runs with the cache off (conftest); these tests are about it, so on by default."""
    before = os.environ.get(compile_cache.ENV_MODE)
    os.environ[compile_cache.ENV_MODE] = "on"
    yield
    if before is None:
        os.environ.pop(compile_cache.ENV_MODE, None)
    else:
        os.environ[compile_cache.ENV_MODE] = before


@pytest.fixture(autouse=True)
def _empty_l2():
    compile_cache.clear_memory()
    yield
    compile_cache.clear_memory()


@pytest.fixture(scope="module")
def resnet_cold(tmp_path_factory):
    """The zoo resnet compiled once into a fresh L3 folder: (model, inputs, compiled, folder)."""
    folder = tmp_path_factory.mktemp("l3-resnet")
    model, inputs = oc.zoo.get("resnet")
    compile_cache.clear_memory()
    compiled = oc.compile(model, inputs, cache_dir=folder)
    return model, inputs, compiled, folder


def _subprocess(code: str, timeout: int = 120) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _skip_if_sources_changed() -> None:
    """Skip when orca's sources changed since this process hashed them (someone edited the
    checkout during the run): a process started since has another key, so a miss is right."""
    cached = serialize.package_digest()
    serialize._PACKAGE_DIGEST = None
    try:
        fresh = serialize.package_digest()
    finally:
        serialize._PACKAGE_DIGEST = cached
    if fresh != cached:
        pytest.skip("orca's sources were edited during the run, so the key changed between processes")


def test_cold_compile_is_a_miss_and_reports_it(resnet_cold):
    _, _, compiled, folder = resnet_cold
    info = compiled.report.cache
    assert info.served == "compile" and info.key and "cache (on): served by compile" in str(compiled.report)
    entry = folder / info.key
    meta = json.loads((entry / serialize.META).read_text())
    assert meta["key"] == info.key and meta["key_parts"]["pipeline"] == compiled.report.pipeline
    assert all((entry / name).stat().st_size == f["bytes"] for name, f in meta["files"].items())


def test_l2_hit_does_not_capture_again(monkeypatch, tmp_path):
    model, inputs = _tiny()
    first = oc.compile(model, inputs, cache_dir=tmp_path)

    def no_capture(*args, **kwargs):
        raise AssertionError("capture ran on what should be an L2 hit")

    monkeypatch.setattr(api, "capture", no_capture)
    again = oc.compile(model, inputs, cache_dir=tmp_path)
    assert again is not first and again.report.cache.served == "L2"
    assert again.report.cache.counts["L2"]["hits"] >= 1
    assert_outputs_close(model(*inputs), again(*inputs))
    # a new instance with equal weights and code is the same key
    twin, _ = _tiny()
    assert oc.compile(twin, inputs, cache_dir=tmp_path).report.cache.served == "L2"


def test_other_weights_other_inputs_other_options_miss(tmp_path):
    model, inputs = _tiny()
    key = oc.compile(model, inputs, cache_dir=tmp_path).report.cache.key
    with torch.no_grad():
        model.a.weight[0, 0] += 1.0
    changed = oc.compile(model, inputs, cache_dir=tmp_path)
    assert changed.report.cache.served == "compile" and changed.report.cache.key != key
    assert_outputs_close(model(*inputs), changed(*inputs))
    assert oc.compile(model, (torch.randn(3, 8),), cache_dir=tmp_path).report.cache.served == "compile"
    assert oc.compile(model, inputs, pipeline="O0", cache_dir=tmp_path).report.cache.served == "compile"
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 4


def test_l2_entry_sharing_weights_with_a_changed_model_is_dropped(tmp_path):
    """The extern kernels of a program may read the model's own weight tensors: after they change
    in place, a compile of the old weights (same key) must not get that program."""
    model, inputs = _tiny()
    oc.compile(model, inputs, kernels="torch", cache="read-only", cache_dir=tmp_path)
    with torch.no_grad():
        model.b.weight.mul_(2.0)
    original, _ = _tiny()
    again = oc.compile(original, inputs, kernels="torch", cache="read-only", cache_dir=tmp_path)
    assert again.report.cache.served == "compile" and "L2 entry dropped" in str(again.report)
    assert_outputs_close(original(*inputs), again(*inputs))


def test_l3_hit_in_a_fresh_process_equals_eager(resnet_cold):
    _, _, compiled, folder = resnet_cold
    proc = _subprocess(f"""
        import json, sys, torch, orca_compiler as oc
        assert "tvm" not in sys.modules, "import orca_compiler imported tvm"
        model, inputs = oc.zoo.get("resnet")
        compiled = oc.compile(model, inputs, cache_dir={str(folder)!r})
        with torch.no_grad():
            error = (compiled(*inputs) - model(*inputs)).abs().max().item()
        info = compiled.report.cache
        print(json.dumps({{"served": info.served, "key": info.key, "events": info.events, "error": error,
                          "tvm": "tvm" in sys.modules}}))
    """)
    result = _result(proc)
    if result["served"] != "L3":
        _skip_if_sources_changed()
    assert result["served"] == "L3", result
    assert result["key"] == compiled.report.cache.key and result["error"] < 1e-4
    assert result["tvm"] is False, "a warm L3 compile imported the tvm package (tvm_lite.py avoids it)"


def test_l3_hit_after_clearing_l2(resnet_cold):
    model, inputs, compiled, folder = resnet_cold
    again = oc.compile(model, inputs, cache_dir=folder)
    assert again.report.cache.served == "L3"
    assert again.report.kernels and [k.choice for k in again.report.kernels] == [k.choice for k in compiled.report.kernels]
    assert_outputs_close(model(*inputs), again(*inputs))
    assert again.print_ir(file=open(os.devnull, "w")) == compiled.print_ir(file=open(os.devnull, "w"))


def _truncate_lib(entry: Path, meta: dict) -> None:
    lib = next(entry.glob("lib-*.so"))
    lib.write_bytes(lib.read_bytes()[: lib.stat().st_size // 2])


def _flip_lib_byte(entry: Path, meta: dict) -> None:
    lib = next(entry.glob("lib-*.so"))
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))


def _garble_meta(entry: Path, meta: dict) -> None:
    (entry / serialize.META).write_text((entry / serialize.META).read_text()[:100])


def _change_version(entry: Path, meta: dict) -> None:
    meta["versions"]["tvm"] = "0.0.1"
    (entry / serialize.META).write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def tiny_entry(tmp_path_factory):
    """A pristine L3 folder holding the tiny model's entry, and its key."""
    folder = tmp_path_factory.mktemp("l3-tiny")
    model, inputs = _tiny()
    compile_cache.clear_memory()
    return folder, oc.compile(model, inputs, cache_dir=folder).report.cache.key


@pytest.mark.parametrize("corrupt,says", [
    (_truncate_lib, "truncated"), (_flip_lib_byte, "content hash differs"),
    (_garble_meta, "unreadable"), (_change_version, "other versions: tvm '0.0.1'"),
])
def test_corrupt_l3_entry_is_rebuilt_and_reported(tiny_entry, tmp_path, corrupt, says):
    pristine, key = tiny_entry
    folder = tmp_path / "l3"
    shutil.copytree(pristine, folder)
    entry = folder / key
    corrupt(entry, json.loads((entry / serialize.META).read_text()))
    model, inputs = _tiny()
    rebuilt = oc.compile(model, inputs, cache_dir=folder)
    info = rebuilt.report.cache
    assert info.served == "compile" and any("rebuilt" in e and says in e for e in info.events), info.events
    assert "rebuilt" in str(rebuilt.report)
    assert_outputs_close(model(*inputs), rebuilt(*inputs))
    compile_cache.clear_memory()  # the rebuilt entry on disk is whole again
    again = oc.compile(model, inputs, cache_dir=folder)
    assert again.report.cache.served == "L3" and again.report.cache.events == []
    assert_outputs_close(model(*inputs), again(*inputs))


def test_concurrent_writers_leave_one_valid_entry(tmp_path):
    code = f"""
        import json, torch, orca_compiler as oc
        model, inputs = oc.zoo.get("mlp", batch_size=2)
        compiled = oc.compile(model, inputs, cache_dir={str(tmp_path)!r}, kernels="torch")
        print(json.dumps({{"served": compiled.report.cache.served, "events": compiled.report.cache.events}}))
    """
    procs = [_subprocess(code), _subprocess(code)]
    results = [_result(p) for p in procs]
    assert all(r["served"] in ("compile", "L3") for r in results), results
    entries = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    model, inputs = oc.zoo.get("mlp", batch_size=2)
    loaded = oc.compile(model, inputs, cache_dir=tmp_path, kernels="torch")
    if loaded.report.cache.served != "L3":
        _skip_if_sources_changed()
    assert loaded.report.cache.served == "L3", loaded.report.cache.events
    assert_outputs_close(model(*inputs), loaded(*inputs))


def _round_trip(compiled, model, inputs, path):
    compiled.save(path)
    loaded = oc.load(path)
    assert_outputs_close(model(*inputs), loaded(*inputs))
    assert loaded.print_ir(file=open(os.devnull, "w")) == compiled.print_ir(file=open(os.devnull, "w"))
    return loaded


def test_save_load_resnet(resnet_cold, tmp_path):
    model, inputs, compiled, _ = resnet_cold
    loaded = _round_trip(compiled, model, inputs, tmp_path / "resnet")
    fresh = torch.randn_like(inputs[0])
    assert_outputs_close(model(fresh), loaded(fresh))
    _round_trip(loaded, model, inputs, tmp_path / "again")  # a loaded module saves as well


def test_save_load_lstm_with_scan_kernels(tmp_path):
    model, inputs = oc.zoo.get("lstm")
    compiled = oc.compile(model, inputs, cache="off")
    assert "decompose-rnn" in compiled.report.pipeline
    _round_trip(compiled, model, inputs, tmp_path / "lstm")


def test_save_load_eager_fallback_and_extern_kernels(tmp_path):
    torch.manual_seed(0)
    model, inputs = WithFallback().eval(), (torch.randn(2, 3, 12, 12),)
    compiled = oc.compile(model, inputs, kernels="torch", cache="off")
    assert compiled.report.partitions == 2 and len(compiled.report.fallbacks) == 1
    assert compiled.artifact.kind == "partitioned" and compiled.artifact.externs
    loaded = _round_trip(compiled, model, inputs, tmp_path / "fallback")
    assert loaded.report.partitions == 2 and loaded.report.fallbacks[0].op == "orca_cache_test.wiggle"


def test_load_refuses_altered_files(tmp_path):
    model, inputs = _tiny()
    oc.compile(model, inputs, cache="off").save(tmp_path / "m")
    _flip_lib_byte(tmp_path / "m", {})
    with pytest.raises(oc.LoadError, match="content hash differs"):
        oc.load(tmp_path / "m")
    with pytest.raises(oc.LoadError, match="does not exist"):
        oc.load(tmp_path / "nothing")


def test_a_module_without_artifact_cannot_be_saved(tmp_path):
    from orca_compiler.report import CompileReport

    through_breaks = oc.CompiledModule(nn.Identity(), signature=[], in_spec=None, out_spec=None,
                                       report=CompileReport(pipeline="O1", target="llvm"))
    with pytest.raises(oc.OrcaError, match="compiled through graph breaks"):
        through_breaks.save(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_load_checks_the_host_cpu(tmp_path):
    model, inputs = _tiny()
    oc.compile(model, inputs, cache="off").save(tmp_path / "m")
    meta_path = tmp_path / "m" / serialize.META
    meta = json.loads(meta_path.read_text())
    meta["target"]["spec"]["mcpu"] = "a-cpu-from-elsewhere"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(oc.TargetError, match="built for CPU 'a-cpu-from-elsewhere'"):
        oc.load(tmp_path / "m")
    assert_outputs_close(model(*inputs), oc.load(tmp_path / "m", check_host=False)(*inputs))


def test_cache_modes(tmp_path):
    model, inputs = _tiny()
    off = oc.compile(model, inputs, cache="off", cache_dir=tmp_path)
    assert off.report.cache.served == "compile" and not list(tmp_path.iterdir())
    oc.compile(model, inputs, cache="read-only", cache_dir=tmp_path)
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    with pytest.raises(oc.OrcaError, match="unknown cache option 'sometimes'"):
        oc.compile(model, inputs, cache="sometimes")


def test_instruments_bypass_the_cache(tmp_path):
    from orca_compiler.instruments import PassTimer

    model, inputs = _tiny()
    compiled = oc.compile(model, inputs, instruments=[PassTimer()], cache_dir=tmp_path)
    assert compiled.report.cache.key is None and "not cached: instruments" in str(compiled.report)


def test_l2_memory_bound_evicts_least_recently_used():
    cache = compile_cache.MemoryCache(limit=100)
    entry = lambda n: compile_cache._Entry(*[None] * 9, n)  # noqa: E731  (only nbytes matters here)
    assert cache.put("a", entry(60)) and cache.put("b", entry(30))
    cache.get("a")
    assert cache.put("c", entry(30))  # over 100: "b" (least recently used) goes
    assert list(cache.entries) == ["a", "c"] and cache.nbytes == 90 and cache.evictions == 1
    assert not cache.put("huge", entry(101))


def test_cli_cache_stats_prune_clear(tmp_path, capsys):
    for width in (3, 5):
        model = nn.Sequential(nn.Linear(4, width)).eval()
        oc.compile(model, (torch.randn(1, 4),), cache_dir=tmp_path)
    assert cli_main(["cache", "stats", "--dir", str(tmp_path)]) == 0
    assert "2 entries" in capsys.readouterr().out
    assert cli_main(["cache", "prune", "--max-size", "1", "--dir", str(tmp_path)]) == 0
    assert "removed 2 least recently used" in capsys.readouterr().out
    oc.compile(model, (torch.randn(1, 4),), cache_dir=tmp_path, cache="on")  # L2 hit: nothing written
    compile_cache.clear_memory()
    oc.compile(model, (torch.randn(1, 4),), cache_dir=tmp_path)
    assert cli_main(["cache", "clear", "--dir", str(tmp_path)]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert cli_main(["cache", "prune", "--dir", str(tmp_path)]) == 2  # --max-size is required
    assert compile_cache.parse_size("1.5K") == 1536 and compile_cache.parse_size("2G") == 2 << 30


def test_load_in_a_fresh_process_imports_no_tvm(tmp_path):
    """Partitions, an eager fallback and extern (torch) kernels, loaded through tvm_ffi only."""
    # Saved by a process of its own just before, not by this one: the saved orca version holds a
    # hash of orca's sources, which this long-lived process read when it started.
    setup = f"""
        import json, sys, torch, orca_compiler as oc
        sys.path.insert(0, {str(REPO / "tests")!r})
        from test_compile_cache import WithFallback
        torch.manual_seed(0)
        model, inputs = WithFallback().eval(), (torch.randn(2, 3, 12, 12),)
    """
    _result(_subprocess(setup + f"""
        oc.compile(model, inputs, kernels="torch", cache="off").save({str(tmp_path / "m")!r})
        print("{{}}")
    """))
    proc = _subprocess(setup + f"""
        loaded = oc.load({str(tmp_path / "m")!r})
        with torch.no_grad():
            error = max((a - b).abs().max().item() for a, b in zip(loaded(*inputs), model(*inputs)))
        print(json.dumps({{"error": error, "tvm": "tvm" in sys.modules}}))
    """)
    result = _result(proc)
    assert result["error"] < 1e-4 and result["tvm"] is False, result


def test_a_stale_remembered_target_key_is_corrected(tmp_path):
    model, inputs = _tiny()
    first = oc.compile(model, inputs, cache_dir=tmp_path)
    memo_path = tmp_path / compile_cache.TARGET_MEMO
    memo = json.loads(memo_path.read_text())
    (request, known), = [(r, dict(k)) for r, k in memo.items()]
    assert json.loads(request)["target"] == "llvm" and known["kind"] == "cpu"
    memo[request]["key"] = "a target key from elsewhere"
    memo_path.write_text(json.dumps(memo))
    compile_cache.clear_memory()
    again = oc.compile(model, inputs, cache_dir=tmp_path)
    info = again.report.cache
    assert info.served == "compile" and any("stale" in e for e in info.events), info.events
    assert info.key == first.report.cache.key  # written under the right key
    assert json.loads(memo_path.read_text())[request] == known
    compile_cache.clear_memory()
    assert oc.compile(model, inputs, cache_dir=tmp_path).report.cache.served == "L3"
