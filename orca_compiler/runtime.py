"""Runtime: nn.Modules that run TVM-built code on torch tensors (DLPack, no copies)."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree

from .eager_guard import EagerProgram
from .errors import InputMismatchError, TargetError


class TVMGraphModule(torch.nn.Module):
    """One built Relax executable as an nn.Module: flat tensors in, a tuple of tensors out.

    The VirtualMachine is created on first call, so a module built for CUDA can exist (and be
    inspected) on a machine without a GPU; calling it there raises TargetError. The last `drop`
    results of the executable are not returned (the results of side-effecting external calls
    that nothing reads, returned only so that Relax keeps the calls: relax_build.unread_effects).
    """

    def __init__(self, executable, target, name: str = "main", externs: dict | None = None, drop: int = 0):
        super().__init__()
        self.drop = drop
        self.executable = executable
        self.target = target
        self.name = name
        self.externs = dict(externs or {})  # the extern kernels the executable calls, kept alive
        self._fn = None

    def _function(self):
        if self._fn is None:
            from tvm import relax

            from .threads import configure_tvm_threads

            configure_tvm_threads()
            device = self.target.device()
            if not device.exist:
                raise TargetError(
                    f"this module was built for {self.target.kind} but this machine has no {self.target.kind} device"
                )
            self._vm = relax.VirtualMachine(self.executable, device)
            self._fn = self._vm[self.name]
        return self._fn

    def forward(self, *inputs: torch.Tensor) -> tuple:
        fn = self._fn or self._function()
        for t in inputs:
            if not t.is_contiguous():
                inputs = tuple(t.contiguous() for t in inputs)
                break
        # Called with torch tensors, the VM hands back torch tensors (DLPack, no copy); tensors
        # of TVM's own type appear only when an output is one of TVM's constants.
        results = fn(*inputs)
        if type(results) is torch.Tensor:  # one output, returned bare (relax_build.return_single_output_bare)
            return (results,)
        if hasattr(results, "__dlpack__"):  # ... and one of TVM's constants
            return (torch.from_dlpack(results),)
        # Each element read from the returned tvm_ffi Array is converted to a torch tensor then
        # (~1.5 us): read only those returned, by index (tuple(results) costs ~1.4 us more).
        outputs = tuple(map(results.__getitem__, range(len(results) - self.drop)))
        for r in outputs:
            if type(r) is not torch.Tensor:
                return tuple(r if type(r) is torch.Tensor else torch.from_dlpack(r) for r in outputs)
        return outputs


@dataclass(frozen=True)
class InputSignature:
    """Shape, dtype and device of one input, as compiled; None in `shape` is a dimension compiled
    as symbolic (any size at call time)."""

    shape: tuple
    dtype: torch.dtype
    device: str

    @classmethod
    def of(cls, tensor: torch.Tensor, dynamic_dims=()) -> "InputSignature":
        shape = tuple(None if i in dynamic_dims else s for i, s in enumerate(tensor.shape))
        return cls(shape, tensor.dtype, tensor.device.type)

    @functools.cached_property
    def _static(self) -> bool:
        return None not in self.shape

    def _shape_matches(self, shape) -> bool:
        if self._static:  # the per-call path of static shapes: one tuple comparison
            return shape == self.shape
        return len(shape) == len(self.shape) and all(a is None or a == b for a, b in zip(self.shape, shape))

    def matches(self, tensor) -> bool:
        """The fast check run on every call; `check` explains a mismatch."""
        return (type(tensor) is torch.Tensor and self._shape_matches(tensor.shape) and tensor.dtype == self.dtype
                and (tensor.is_cpu if self.device == "cpu" else tensor.device.type == self.device))  # .device: ~0.4 us

    def check(self, index: int, tensor) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise InputMismatchError(f"input {index}: expected a tensor, got {type(tensor).__name__}")
        problems = []
        if not self._shape_matches(tuple(tensor.shape)):
            compiled = tuple("*" if s is None else s for s in self.shape)
            problems.append(f"shape {tuple(tensor.shape)} (compiled for {compiled}; * = any size)"
                            if None in self.shape else f"shape {tuple(tensor.shape)} (compiled for {self.shape})")
        if tensor.dtype != self.dtype:
            problems.append(f"dtype {tensor.dtype} (compiled for {self.dtype})")
        if tensor.device.type != self.device:
            problems.append(f"device {tensor.device.type} (compiled for {self.device})")
        if problems:
            raise InputMismatchError(f"input {index}: " + ", ".join(problems))


@dataclass(frozen=True)
class IndexGuard:
    """An integer input that indexes a table (an embedding): its values must be in [0, rows).

    TVM's `take` reads out of bounds (and can crash the process) where eager raises IndexError,
    so these inputs are checked before the call.
    """

    input_index: int
    rows: int
    node: str

    def check(self, tensor: torch.Tensor) -> None:
        if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) >= self.rows):
            bad = int(tensor.max()) if int(tensor.max()) >= self.rows else int(tensor.min())
            raise InputMismatchError(
                f"input {self.input_index}: index {bad} is out of range for %{self.node} with {self.rows} rows"
            )


class CompiledModule(torch.nn.Module):
    """What `orca_compiler.compile` returns: call it like the original model.

    `report` holds the pipeline, per-pass statistics and the ops that fell back to eager;
    `print_ir()` shows the IR after the pipeline.
    """

    def __init__(self, program: torch.nn.Module, *, signature, in_spec, out_spec, report, ir=None, guards=()):
        super().__init__()
        self.guards = list(guards)
        self.program = program
        self.signature = list(signature)
        self.in_spec = in_spec
        self.out_spec = out_spec
        self.report = report
        self.ir = ir
        # What save() and the compile cache write (serialize.Artifact); None for programs that
        # cannot be saved (compiled through graph breaks).
        self.artifact = None
        self.l1_calls = [0]  # calls served by the functions built into this module (report's L1 hits)
        # Per-call fast path (dispatch dominates small models at batch 1): positional tensors
        # only, one TVM executable, outputs that are a flat tuple or a single tensor.
        n = len(self.signature)
        self._positional_spec = pytree.tree_flatten((tuple(range(n)), {}))[1]
        self._positional = in_spec is None or in_spec == self._positional_spec
        # Static CPU inputs are checked inline, (shape, dtype) per input: ~1 us less an input than
        # InputSignature.matches; anything else goes through _flatten_inputs.
        static_cpu = self._positional and all(s._static and s.device == "cpu" for s in self.signature)
        self._static_cpu = tuple((s.shape, s.dtype) for s in self.signature) if static_cpu else None
        self._run = program.forward if isinstance(program, TVMGraphModule) else None
        # The eager guard's fallback (eager_guard.EagerProgram): the user's model, called with the
        # user's own arguments once they match the signature (no flattening of inputs or outputs).
        # A plain attribute, not a submodule (self.program holds the model already), so each call
        # finds it in __dict__ rather than through nn.Module.__getattr__ (~1.5 us a lookup here).
        object.__setattr__(self, "_eager_model", program.model if isinstance(program, EagerProgram) else None)
        self._single_output = out_spec is not None and out_spec == pytree.tree_flatten(0)[1]
        # a flat tuple of tensors (an RNN's (output, h)) is returned as it comes: tree_unflatten costs ~5 us
        self._flat_tuple_output = out_spec is not None and out_spec == pytree.tree_flatten(tuple(range(out_spec.num_leaves)))[1]

    def _flatten_inputs(self, args, kwargs) -> list:
        if not kwargs and self._positional and len(args) == len(self.signature):
            if all(sig.matches(t) for sig, t in zip(self.signature, args)):
                return list(args)
        flat, spec = pytree.tree_flatten((args, kwargs))
        if self.in_spec is not None and spec != self.in_spec:
            raise InputMismatchError(
                f"called with {len(flat)} input leaves in a different structure than compiled "
                f"({len(self.signature)} inputs); compiled for {self.in_spec}"
            )
        if len(flat) != len(self.signature):
            raise InputMismatchError(f"expected {len(self.signature)} inputs, got {len(flat)}")
        for i, (sig, tensor) in enumerate(zip(self.signature, flat)):
            sig.check(i, tensor)
        return flat

    def _matches_static_cpu(self, args, kwargs) -> bool:
        expected = self._static_cpu
        if expected is None or kwargs or len(args) != len(expected):
            return False
        for tensor, (shape, dtype) in zip(args, expected):
            if type(tensor) is not torch.Tensor or tensor.shape != shape or tensor.dtype != dtype or not tensor.is_cpu:
                return False
        return True

    def forward(self, *args, **kwargs):
        self.l1_calls[0] += 1
        flat = args if self._matches_static_cpu(args, kwargs) else self._flatten_inputs(args, kwargs)
        if self._eager_model is not None:  # eager checks its own indices
            if not torch.is_grad_enabled():
                return self._eager_model(*args, **kwargs)
            with torch.no_grad():
                return self._eager_model(*args, **kwargs)
        for guard in self.guards:
            guard.check(flat[guard.input_index])
        if self._run is not None:  # TVM code only: no autograd graph can be built, skip no_grad
            outputs = self._run(*flat)
        else:
            with torch.no_grad():
                outputs = self.program(*flat)
        if self._single_output:
            return outputs[0]
        if self._flat_tuple_output:
            return outputs if type(outputs) is tuple else tuple(outputs)
        if self.out_spec is None:
            return outputs[0] if len(outputs) == 1 else outputs
        return pytree.tree_unflatten(list(outputs), self.out_spec)

    def save(self, path) -> None:
        """Write this module to the folder `path` (replaced atomically if it exists): the TVM
        libraries, the IR and the metadata that `orca_compiler.load(path)` needs to rebuild it
        without capturing, running passes or building with TVM (the compile cache's format)."""
        from .serialize import save

        save(self, path)

    def print_ir(self, file=None) -> str:
        """Print (and return) the IR after the pipeline, one line per node."""
        from .printer import format_ir

        text = format_ir(self.ir) if self.ir is not None else "<no IR: compiled through graph breaks>\n"
        print(text, end="", file=file)
        return text
