"""Build one graph (GraphIR conventions) into a TVM Relax executable for a target."""
from __future__ import annotations

import torch.fx as fx

from ..errors import LoweringError
from ..ir import to_exported_program
from .support import custom_converters
from .target import ResolvedTarget


def tvm_error_summary(exc: BaseException) -> str:
    """The informative line of a TVM error (its C++ backtrace dropped)."""
    lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
    lines = [l for l in lines if not l.startswith(("File ", "Traceback", "at ", "^", "~"))]
    text = lines[-1] if lines else ""
    return f"{type(exc).__name__}: {text[:400]}"


def _tracking_importer():
    """TVM's importer, subclassed so that a converter failure tells us which fx node it was on."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    class TrackingImporter(ExportedProgramImporter):
        current_node: str | None = None

        def _track(self, fn):
            def converter(node, *args):
                self.current_node = node.name
                return fn(node, *args)

            return converter

        def create_convert_map(self):
            return {name: self._track(fn) for name, fn in super().create_convert_map().items()}

        def update_convert_map(self, custom_convert_map):
            super().update_convert_map({name: self._track(fn) for name, fn in custom_convert_map.items()})

    return TrackingImporter()


def import_relax(gm: fx.GraphModule):
    """GraphIR-convention GraphModule -> Relax IRModule (weights bound as constants).

    LoweringError carries `.node`: the fx node whose conversion failed, when known.
    """
    ep = to_exported_program(gm)
    importer = _tracking_importer()
    try:
        return importer.from_exported_program(ep, False, False, False, custom_converters() or None)
    except Exception as exc:
        error = LoweringError(f"TVM could not convert %{importer.current_node}: {tvm_error_summary(exc)}")
        error.node = importer.current_node
        raise error from exc


def build_executable(gm: fx.GraphModule, target: ResolvedTarget, *, what: str = "graph"):
    """Import and compile `gm`; LoweringError names `what` (the partition) and TVM's complaint."""
    import tvm

    mod = import_relax(gm)
    try:
        with target.tvm_target:
            return tvm.compile(mod, target=target.tvm_target)
    except Exception as exc:
        error = LoweringError(f"TVM could not build {what} for {target.tvm_target.kind.name}: {tvm_error_summary(exc)}")
        error.node = None
        raise error from exc


def cuda_source(executable) -> str:
    """The CUDA C source TVM generated for a CUDA-target executable (it compiles it at load time)."""
    stack = [executable.mod]
    while stack:
        module = stack.pop()
        if module.kind == "cuda":
            return module.inspect_source("")
        stack.extend(module.imports)
    raise LoweringError("the executable has no CUDA module (was it built for a cuda target?)")
