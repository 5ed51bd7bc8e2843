"""Build one graph (GraphIR conventions) into a TVM Relax executable for a target."""
from __future__ import annotations

import contextlib
import operator

import torch
import torch.fx as fx

from ..errors import LoweringError, OrcaError
from ..ir import to_exported_program
from ..printer import op_name
from .support import custom_converters
from .target import ResolvedTarget


def tvm_error_summary(exc: BaseException) -> str:
    """The informative line of a TVM error (its C++ backtrace dropped)."""
    lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
    lines = [l for l in lines if not l.startswith(("File ", "Traceback", "at ", "^", "~", "# Metadata omitted"))]
    text = lines[-1] if lines else ""
    return f"{type(exc).__name__}: {text[:400]}"


def _tir_dim(size, symbols: dict):
    """One dimension of an extern result as Relax wants it: an int, or the TIR expression of a
    symbolic size in terms of the shape variables the operands carry (`symbols`: name -> Var)."""
    import sympy
    from tvm import tirx

    if isinstance(size, int):
        return size
    expr = size.node.expr

    def convert(e):
        if isinstance(e, sympy.Symbol) and str(e) in symbols:
            return symbols[str(e)]
        if isinstance(e, sympy.Integer):
            return tirx.const(int(e), "int64")
        if isinstance(e, (sympy.Add, sympy.Mul)):
            parts = [convert(a) for a in e.args]
            result = parts[0]
            for part in parts[1:]:
                result = result + part if isinstance(e, sympy.Add) else result * part
            return result
        raise LoweringError(f"an external kernel's result has a size ({expr}) not expressible in its inputs' sizes")

    return convert(expr)


def _extern_type(val, symbols: dict):
    """The Relax type of an extern call's result, from the node's FakeTensor value(s)."""
    from tvm import relax

    if isinstance(val, (tuple, list)):
        return relax.TupleType([_extern_type(v, symbols) for v in val])
    return relax.TensorType([_tir_dim(s, symbols) for s in val.shape], str(val.dtype).replace("torch.", ""))


def _shape_symbols(operands) -> dict:
    """name -> TIR Var of every symbol in the operands' shapes (`16 * s0` contributes s0)."""
    from tvm import tirx

    symbols = {}
    for operand in operands:
        shape = getattr(operand.ty, "shape", None)
        for dim in getattr(shape, "values", None) or ():
            for var in tirx.analysis.undefined_vars(dim, []):
                symbols[var.name] = var
    return symbols


def _tracking_importer(externs: dict | None = None):
    """TVM's importer, subclassed so that a converter failure tells us which fx node it was on,
    and so that nodes bound to external kernels (`externs`: node name -> ExternCall) become
    `R.call_pure_packed` calls of those kernels."""
    from tvm import relax
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    from .importer_fixes import ImporterFixes
    from .low_precision import LowPrecisionImporter

    externs = externs or {}

    class TrackingImporter(ImporterFixes, LowPrecisionImporter, ExportedProgramImporter):
        current_node: str | None = None
        # The weight tensors by the name of the placeholder that stands for them (import_relax
        # fills it): converters that transform a weight at conversion time read it here, as
        # TVM binds the weights only after converting the graph.
        weights: dict = {}

        def _track(self, fn):
            def converter(node, *args):
                self.current_node = node.name
                if node.name in externs:
                    return self._emit_extern(node, externs[node.name])
                result = fn(node, *args)
                _check_result_type(node, result)
                return result

            return converter

        def _emit_extern(self, node, call):
            by_name = {n.name: n for n in node.all_input_nodes}
            operands = [self.env[by_name[name]] for name in call.activation_names]
            result_type = _extern_type(node.meta["val"], _shape_symbols(operands))
            result = relax.call_pure_packed(call.func_name, *operands, ty_args=result_type)
            return self.block_builder.emit(result)

        def _check_unsupported_func_type(self, nodes):
            super()._check_unsupported_func_type([n for n in nodes if n.name not in externs])

        def create_convert_map(self):
            return {name: self._track(fn) for name, fn in super().create_convert_map().items()}

        def update_convert_map(self, custom_convert_map):
            super().update_convert_map({name: self._track(fn) for name, fn in custom_convert_map.items()})

    return TrackingImporter()


def _check_result_type(node: fx.Node, result) -> None:
    """Raise LoweringError (naming `node`, which then runs in eager) where TVM's converter gave a
    tensor of another dtype or static shape than torch records for the node: the importer's type
    rules are not torch's everywhere (int64 / 3 came out int64, where torch gives float32)."""
    from .low_precision import expr_dtype, recorded_dtype

    value = node.meta.get("val")
    ty = getattr(result, "ty", None)
    if not isinstance(value, torch.Tensor) or getattr(ty, "dtype", None) is None:
        return
    tvm_dtype, torch_dtype = expr_dtype(result), recorded_dtype(node)
    if tvm_dtype and tvm_dtype != torch_dtype:
        error = LoweringError(f"TVM's converter for %{node.name} ({op_name(node)}) gives {tvm_dtype}, "
                              f"where torch gives {torch_dtype}")
        error.node = node.name
        raise error
    shape = getattr(ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return
    tvm_shape = [int(d) if hasattr(d, "value") else None for d in shape.values]
    torch_shape = [d if isinstance(d, int) else None for d in value.shape]
    if len(tvm_shape) != len(torch_shape) or any(a is not None and b is not None and a != b
                                                  for a, b in zip(tvm_shape, torch_shape)):
        error = LoweringError(f"TVM's converter for %{node.name} ({op_name(node)}) gives shape {tvm_shape}, "
                              f"where torch gives {list(value.shape)}")
        error.node = node.name
        raise error


def _normalize_negative_select(graph: fx.Graph) -> None:
    """`select.int(x, dim, -1)` -> `select.int(x, dim, size - 1)`: TVM 0.27's importer takes the
    index as is, and its `take` then reads out of bounds (x[:, -1] gave errors of ~5 on random
    data). The size is static here; a symbolic dimension keeps its node (and TVM's result)."""
    import torch

    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.select.int:
            source, dim, index = node.args
            if isinstance(index, int) and index < 0:
                size = source.meta["val"].shape[dim]
                if isinstance(size, int):
                    node.args = (source, dim, index + size)


def _extern_only_ops(gm: fx.GraphModule, externs: dict, importer) -> dict:
    """Converter-map entries for ops that only run as external kernels here (a whole orca.lstm
    left by O0, say): TVM's importer looks the op up before our extern dispatch can see it."""
    def no_tvm_kernel(node, _importer):
        raise LoweringError(f"%{node.name}: {node.target} runs only as an external kernel")

    names = {n.target.__name__ for n in gm.graph.nodes if n.op == "call_function" and n.name in externs}
    return {name: no_tvm_kernel for name in names if name not in importer.convert_map}


def _lifted_weights(ep) -> dict:
    """Placeholder name -> tensor for every weight `to_exported_program` lifted to an input."""
    from torch.export.graph_signature import InputKind

    return {spec.arg.name: ep.state_dict[spec.target] for spec in ep.graph_signature.input_specs
            if spec.kind == InputKind.BUFFER and spec.target in ep.state_dict}


def unread_effects(gm: fx.GraphModule, externs: dict | None) -> list[fx.Node]:
    """The nodes of `gm` bound to external kernels that have side effects (fx's `is_impure`:
    place-memory's ops) and whose results nothing reads. Relax takes an extern call for pure and
    drops it when its result is unused, so the program returns these results after its own
    outputs (import_relax) and TVMGraphModule(..., drop=len(...)) hides them again."""
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and n.name in (externs or {}) and not n.users and n.is_impure()]


def import_relax(gm: fx.GraphModule, externs: dict | None = None, target: ResolvedTarget | None = None):
    """GraphIR-convention GraphModule -> Relax IRModule (weights bound as constants).

    Nodes named in `externs` (node name -> extern.ExternCall) call that external kernel; the
    results of those in `unread_effects` are returned after the graph's outputs.
    `target`, when given, is the current TVM target while converting (our own ops' converters
    emit target-specific kernels). LoweringError carries `.node`: the fx node whose conversion
    failed, when known.
    """
    ep = to_exported_program(gm, unread_effects(gm, externs))
    _normalize_negative_select(ep.graph)
    importer = _tracking_importer(externs)
    importer.weights = _lifted_weights(ep)
    converters = {**_extern_only_ops(gm, externs or {}, importer), **custom_converters()}
    try:
        with target.tvm_target if target is not None else contextlib.nullcontext():
            return importer.from_exported_program(ep, False, False, False, converters or None)
    except LoweringError as exc:
        if getattr(exc, "node", None) is None:
            exc.node = importer.current_node
        raise
    except Exception as exc:
        where = f"%{importer.current_node}" if importer.current_node else "the graph (its inputs, before any node)"
        error = LoweringError(f"TVM could not convert {where}: {tvm_error_summary(exc)}")
        error.node = importer.current_node
        raise error from exc


def return_single_output_bare(mod):
    """`mod` with its "main" returning its one output itself where it returns a 1-tuple (unchanged
    otherwise). The VM hands a returned tensor back as a torch tensor, where each element read
    from a returned tuple is converted on access: ~2 us less per call (runtime.TVMGraphModule
    accepts both). Assumes `mod` is import_relax's output, which it may change in place."""
    from tvm import relax

    main = mod["main"]
    returned = main.ret_ty
    if not isinstance(returned, relax.TupleType) or len(returned.fields) != 1:
        return mod
    if not isinstance(returned.fields[0], relax.TensorType):
        return mod
    seq = main.body
    builder = relax.BlockBuilder()
    output = relax.Var("output", returned.fields[0])
    unpack = relax.BindingBlock([relax.VarBinding(output, builder.normalize(relax.TupleGetItem(seq.body, 0)))])
    body = relax.SeqExpr(list(seq.blocks) + [unpack], output)
    mod["main"] = builder.normalize(relax.Function(main.params, body, returned.fields[0], main.is_pure, main.attrs, main.span))
    return mod


def compile_relax(mod, target: ResolvedTarget, database=None):
    """tvm.compile for our targets: on CPU with our rule-based schedules (cpu_schedules.py), and
    with the schedules of the meta_schedule database in the folder `database` where it has
    records (see tuning.py; our rules skip the functions it scheduled)."""
    import tvm

    if database is not None:
        from .tuning import apply_database

        mod = apply_database(mod, target, database)
    pipeline = "default"  # TVM's own: on CUDA it applies the dlight GPU rules
    if target.kind == "cpu":
        from .cpu_schedules import cpu_pipeline

        pipeline = cpu_pipeline(target)
    with target.tvm_target:
        return tvm.compile(mod, target=target.tvm_target, relax_pipeline=pipeline)


def build_executable(gm: fx.GraphModule, target: ResolvedTarget, *, what: str = "graph", externs: dict | None = None,
                     database=None):
    """Import and compile `gm`; LoweringError names `what` (the partition) and TVM's complaint."""
    mod = import_relax(gm, externs, target)
    if not unread_effects(gm, externs):
        mod = return_single_output_bare(mod)
    try:
        return compile_relax(mod, target, database)
    except OrcaError:  # ours already say what is wrong (a bad tuning database)
        raise
    except Exception as exc:
        culprit = failing_op(gm, externs, target)
        if culprit is not None:
            what = f"%{culprit.name} ({op_name(culprit)})"
        error = LoweringError(f"TVM could not build {what} for {target.tvm_target.kind.name}: {tvm_error_summary(exc)}")
        error.node = None if culprit is None else culprit.name
        raise error from exc


def failing_op(gm: fx.GraphModule, externs: dict | None, target: ResolvedTarget) -> fx.Node | None:
    """After `gm` failed to build: the first of its TVM ops that fails alone, imported into a graph
    of its own and legalized to TIR (the stage where an op TVM's frontend converts but cannot lower,
    like this wheel's pixel_shuffle, fails); None if each passes. Only run on the failure path: it
    imports every op once."""
    from tvm import relax

    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem or node.name in (externs or {}):
            continue
        try:
            mod = import_relax(_single_op_module(gm, node), None, target)
            with target.tvm_target:
                relax.transform.LegalizeOps()(mod)
        except Exception:
            return node
    return None


def _single_op_module(gm: fx.GraphModule, node: fx.Node) -> fx.GraphModule:
    """A GraphModule of `node` alone: its activations as inputs, its weights as `gm`'s, its tensor
    results as outputs."""
    graph, env, weights = fx.Graph(), {}, {}
    for operand in node.all_input_nodes:
        if operand.op == "get_attr":
            weights[operand.target] = getattr(gm, operand.target)
            env[operand] = graph.get_attr(operand.target)
        else:
            env[operand] = graph.placeholder(operand.name)
        env[operand].meta = dict(operand.meta)
    copy = graph.node_copy(node, env.__getitem__)
    value = node.meta.get("val")
    if isinstance(value, (tuple, list)):
        outputs = []
        for i, leaf in enumerate(value):
            if isinstance(leaf, torch.Tensor):
                outputs.append(graph.call_function(operator.getitem, (copy, i)))
                outputs[-1].meta = {"val": leaf}
    else:
        outputs = [copy]
    graph.output(tuple(outputs))
    return fx.GraphModule(weights, graph)


def cuda_source(executable) -> str:
    """The CUDA C source TVM generated for a CUDA-target executable (it compiles it at load time)."""
    stack = [executable.mod]
    while stack:
        module = stack.pop()
        if module.kind == "cuda":
            return module.inspect_source("")
        stack.extend(module.imports)
    raise LoweringError("the executable has no CUDA module (was it built for a cuda target?)")
