"""Shared test helpers: numeric comparison of output pytrees against eager."""
from __future__ import annotations

import contextlib
import os
import tempfile

import pytest
import torch
from torch.utils import _pytree as pytree

# fp32 through TVM: reductions are reordered and BN is folded in float64 then rounded, so results
# differ from eager by rounding only. These bounds are ~100x the errors we measure (<= 3e-7).
# Tests never read or write the user's cache: one fresh cache folder per test session (kernel
# selections measured by one test are reused by the next, as they would be on a user's machine).
os.environ["ORCA_CACHE_DIR"] = tempfile.mkdtemp(prefix="orca-test-cache-")
# The compile cache (L2/L3) is off for the suite: a test that monkeypatches the compiler must see
# its patch take effect, not a program cached by an earlier test. tests/test_compile_cache.py
# turns it on for itself.
os.environ.setdefault("ORCA_COMPILE_CACHE", "off")
# The eager guard (orca_compiler/eager_guard.py) is off too: tests check the compiled program,
# which the guard may replace by eager PyTorch on a noisy machine. tests/test_eager_guard.py
# turns it on.
os.environ.setdefault("ORCA_EAGER_GUARD", "off")
# Plans use the constant tier bandwidths (the default), not ones measured on the machine running the
# suite (orca_compiler/bandwidth.py, opt-in): a test of a plan must not depend on the disk.
# tests/test_placement.py measures them in a test of its own.
os.environ["ORCA_MEASURE_BANDWIDTH"] = "0"

RTOL = 1e-4
ATOL = 1e-5


def assert_outputs_close(expected, actual, rtol: float = RTOL, atol: float = ATOL) -> None:
    """Assert two output pytrees have the same structure and close tensor leaves."""
    exp_leaves, exp_spec = pytree.tree_flatten(expected)
    act_leaves, act_spec = pytree.tree_flatten(actual)
    assert exp_spec == act_spec, f"output structure differs: {act_spec} vs eager {exp_spec}"
    for e, a in zip(exp_leaves, act_leaves):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||."""
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-12))


@pytest.fixture
def one_thread():
    """Tiny models and kernels: one torch thread is as fast, and is not stalled when the other
    core is busy. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@contextlib.contextmanager
def passes_registered(*classes):
    """Register throwaway pass classes (tests' deliberately broken passes) for a `with` block."""
    from orca_compiler.pass_base import register_pass, unregister_pass

    for cls in classes:
        register_pass(cls)
    try:
        yield
    finally:
        for cls in classes:
            unregister_pass(cls.name)


def debug_zoo(name: str, pipeline: str, **options):
    """`orca_compiler.debug.debug_model` on a zoo model with DebugOptions(**options)."""
    from orca_compiler import zoo
    from orca_compiler.debug import DebugOptions, debug_model

    model, inputs = zoo.get(name)
    return debug_model(model, inputs, pipeline, DebugOptions(**options))


def _tuning_dependencies_missing() -> str | None:
    from orca_compiler.lowering import tuning

    try:
        tuning.check_tuning_dependencies()
    except tuning.TuningError as exc:
        return str(exc)
    return None


_MISSING_TUNING = _tuning_dependencies_missing()
# meta_schedule tuning needs the apache-tvm wheel's extras (the `tune` extra of pyproject.toml)
needs_tuning_deps = pytest.mark.skipif(_MISSING_TUNING is not None, reason=f"tuning deps missing: {_MISSING_TUNING}")
