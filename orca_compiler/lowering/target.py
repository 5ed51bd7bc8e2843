"""Target resolution: names ("llvm", "cpu", "cuda") or TVM target dicts -> tvm.target.Target.

TVM 0.27 takes targets as dicts only ("llvm -mcpu=..." strings are rejected). For the host CPU we
fill in `mcpu` from LLVM's host detection and `num-cores` (meta_schedule requires it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import TargetError

TARGET_NAMES = ("llvm", "cpu", "cuda")


@dataclass(frozen=True)
class ResolvedTarget:
    """A TVM target plus what the runtime needs: the device kind ("cpu"/"cuda") and a cache key."""

    tvm_target: Any
    kind: str
    key: str

    def device(self):
        import tvm

        return tvm.cpu(0) if self.kind == "cpu" else tvm.cuda(0)


def host_cpu_target(num_cores: int | None = None) -> dict:
    """The dict for this machine's CPU: LLVM's host triple and CPU name, and the core count."""
    import tvm

    cpu = tvm.get_global_func("target.llvm_get_system_cpu")()
    triple = tvm.get_global_func("target.llvm_get_system_triple")()
    return {"kind": "llvm", "mtriple": triple, "mcpu": cpu, "num-cores": int(num_cores or torch.get_num_threads())}


def resolve_target(target: str | dict | Any = "llvm", *, cuda_arch: str = "sm_80") -> ResolvedTarget:
    """Turn a target name or dict into a ResolvedTarget; TargetError names the bad value."""
    import tvm

    if isinstance(target, tvm.target.Target):
        spec = target
    elif isinstance(target, str):
        name = target.strip()
        if name in ("llvm", "cpu"):
            spec = host_cpu_target()
        elif name == "cuda":
            spec = {"kind": "cuda", "arch": cuda_arch}
        else:
            raise TargetError(
                f"unknown target {target!r}: use one of {', '.join(TARGET_NAMES)} or a TVM target dict "
                "such as {'kind': 'llvm', 'mcpu': 'znver3', 'num-cores': 2} (TVM 0.27 rejects '-flag' strings)"
            )
    elif isinstance(target, dict):
        spec = dict(target)
    else:
        raise TargetError(f"target must be a name or a dict, got {type(target).__name__}")
    try:
        if isinstance(spec, tvm.target.Target):
            tvm_target = spec
        elif spec.get("kind") == "cuda":
            tvm_target = tvm.target.Target(spec, host=host_cpu_target())
        else:
            tvm_target = tvm.target.Target(spec)
    except Exception as exc:  # TVM raises its own error types with C++ backtraces
        message = str(exc).strip().splitlines()
        raise TargetError(f"TVM rejected target {spec!r}: {message[-1] if message else type(exc).__name__}") from None
    kind = "cuda" if tvm_target.kind.name == "cuda" else "cpu"
    if tvm_target.kind.name not in ("llvm", "cuda"):
        raise TargetError(f"target kind '{tvm_target.kind.name}' is not supported yet: use llvm or cuda")
    return ResolvedTarget(tvm_target, kind, str(tvm_target.export()) if hasattr(tvm_target, "export") else str(tvm_target))
