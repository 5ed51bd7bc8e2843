"""Rule-based CPU schedules for TVM Relax PrimFuncs: parallel and vectorized loops without search.

TVM 0.27's CPU pipeline schedules nothing, so every PrimFunc runs as scalar serial loops. The rules
below are dlight `ScheduleRule`s, tried in order on each PrimFunc after legalization and fusion;
the first that applies wins:

1. `Injective`: all blocks spatial (elementwise chains, broadcasts, copies, concat, pad).
2. `RowReduction`: reductions over the trailing axes (softmax, layer_norm, mean, sum).
3. `Tiled`: one reduction whose output's last axis is also a unit-stride last axis of an input
   (conv2d, depthwise conv2d, matmul/dense/batch_matmul, stride-1 pooling): register-tiled.

A rule that does not match, or whose scheduling raises, leaves the function to the next rule;
a function no rule takes stays unscheduled (it still compiles, and LLVM vectorizes its simple
inner loops by itself). There is deliberately no "parallel whatever is left" rule: TVM outlines
a parallel loop body into a closure whose pointers are not noalias, and LLVM then stops
vectorizing it, so a parallel loop only pays when we vectorize explicitly.

`cpu_pipeline(target)` is TVM's CPU Relax pipeline with these rules (and vectorizable fast math).
"""
from __future__ import annotations

import logging
import re

import tvm
from tvm import relax, s_tir, tirx, topi
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.sym.pattern import detect_linear_equation
from tvm.target.codegen import target_has_features

log = logging.getLogger(__name__)

# Parallel loops only above this much work (elements, or multiply-adds): a parallel launch costs
# ~5 us with spinning workers and 20-50 us without (TVM_THREAD_POOL_SPIN_COUNT=0). On 2 threads
# a vectorized add+relu went parallel-faster from 256k elements (0.025 vs 0.035 ms), not at 64k.
PARALLEL_MIN_WORK = 1 << 18
# TVM's kMaxStackAlloca: bigger buffers are heap workspaces, allocated on every loop iteration.
_MAX_STACK_BYTES = 1024
# Root-block annotation naming the rule that scheduled a PrimFunc.
RULE_ANNOTATION = "orca.schedule_rule"


def vector_lanes(target, dtype_bits: int = 32) -> int:
    """SIMD lanes for `dtype_bits`-bit elements on an llvm target: 512-bit vectors with AVX-512F,
    256-bit with AVX, else 128-bit. (This wheel's `llvm_get_vector_width` answers 512 for any x86
    mcpu, znver3 included, so we ask for the features instead.)"""
    bits = 128
    try:
        if target_has_features("avx512f", target):
            bits = 512
        elif target_has_features("avx", target):
            bits = 256
    except Exception:  # non-x86 triples: LLVM does not know the feature names
        pass
    return max(bits // max(dtype_bits, 8), 1)


def _extent(sch, loop) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _prod(values) -> int:
    result = 1
    for v in values:
        result *= v
    return result


def _vector_factor(extent: int, lanes: int) -> int | None:
    """The widest vector of at most `lanes` (and at least 4) that divides `extent`."""
    factor = lanes
    while factor >= 4:
        if extent % factor == 0:
            return factor
        factor //= 2
    return None


def _uses(node, var) -> bool:
    """Whether an expression, a Range or a region (list of Ranges) mentions `var`."""
    if isinstance(node, tvm.ir.Range):
        return _uses(node.min, var) or _uses(node.extent, var)
    if isinstance(node, (list, tuple, tvm.ir.Array)):
        return any(_uses(n, var) for n in node)
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(node))


def _unit_stride(index, var) -> bool:
    """Whether `index` is `var + (terms without var)`."""
    coeffs = detect_linear_equation(index, [var])
    return len(coeffs) == 2 and isinstance(coeffs[0], tirx.IntImm) and coeffs[0].value == 1


def _write_bits(sch, block_rv) -> int:
    writes = sch.get(block_rv).writes
    return writes[0].source.dtype.bits if writes else 32


def _vectorize_inner(sch, block_rv, lanes: int, outer: int = 0) -> None:
    """Vectorize a block's innermost loop (not one of its first `outer` loops) when full
    vectors divide it."""
    loops = sch.get_loops(block_rv)
    if len(loops) <= outer:
        return
    extent = _extent(sch, loops[-1])
    factor = _vector_factor(extent, lanes) if extent else None
    if factor is None:
        return
    if extent > factor:
        _, inner = sch.split(loops[-1], factors=[None, factor])
        sch.vectorize(inner)
    else:
        sch.vectorize(loops[-1])


def _loops_through(sch, block_rv, loop_rv) -> list:
    """The block's loops from the outermost down to `loop_rv` (unit loops included)."""
    loops = sch.get_loops(block_rv)
    target = sch.get(loop_rv)
    end = next(i for i, l in enumerate(loops) if sch.get(l).same_as(target))
    return list(loops[: end + 1])


def _fuse(sch, loops):
    return sch.fuse(*loops) if len(loops) > 1 else loops[0]


_block_realize = tvm.get_global_func("s_tir.schedule.GetSBlockRealize")


def _loop_of_iter(sch, block_rv, kind: str, extent: int | None = None):
    """The loop bound to the block's first iter var of `kind` ("S"/"R") and (if given) extent."""
    iter_type = tirx.IterVar.DataPar if kind == "S" else tirx.IterVar.CommReduce
    realize = _block_realize(sch, block_rv)
    loops = {sch.get(l).loop_var: l for l in sch.get_loops(block_rv)}
    for iv, value in zip(sch.get(block_rv).iter_vars, realize.iter_values):
        if iv.iter_type == iter_type and (extent is None or int(iv.dom.extent) == extent):
            return next(l for var, l in loops.items() if _uses(value, var))
    raise ValueError(f"no {kind} iter var")


class CPURule(dl.ScheduleRule):
    """A dlight rule for llvm targets. Subclasses implement `schedule(sch, blocks, target)`, which
    returns True when it scheduled the function; False, or any exception, means "not this rule"."""

    def schedule(self, sch, blocks, target) -> bool:
        """Schedule `sch` (whose blocks normalize_prim_func listed as `blocks`) in place; True if
        this rule took the function."""
        raise NotImplementedError

    def apply(self, func, target, tunable):
        """dlight's entry point: a Schedule of `func`, or None to leave it to the next rule."""
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func, error_render_level="fast")
        blocks = normalize_prim_func(sch)
        if not blocks:
            return None
        try:
            if not self.schedule(sch, blocks, target):
                return None
            # Which rule scheduled the function, for schedule_summary(), tests and debugging.
            sch.annotate(sch.get_sblock("root"), RULE_ANNOTATION, type(self).__name__)
            return sch
        except Exception as exc:  # a rule must never break the build: leave it to the next rule
            log.debug("%s did not apply: %s", type(self).__name__, str(exc).splitlines()[0] if str(exc) else exc)
            return None


class Injective(CPURule):
    """All blocks spatial: inline everything into the output block(s), then for each of those
    vectorize the innermost loop and run the fused outer loops in parallel when big."""

    def schedule(self, sch, blocks, target) -> bool:
        if not all(b.is_injective() for b in blocks):
            return False
        for block in dl.try_inline(sch, blocks):
            _parallel_vectorize(sch, block.block_rv, target)
        return True


def _parallel_vectorize(sch, block_rv, target) -> None:
    """Schedule a spatial block: its outer loops fused and parallel (when the block is big), its
    innermost loop split into vectors when they divide it. The innermost loop stays unfused:
    a fused index costs an integer div/mod per element (3-4x slower on a padding copy), and a
    vector across a row boundary becomes a gather."""
    loops = sch.get_loops(block_rv)
    extents = [_extent(sch, l) for l in loops]
    if not loops or None in extents:
        return
    factor = _vector_factor(extents[-1], vector_lanes(target, _write_bits(sch, block_rv)))
    if not factor:
        return  # serial: LLVM vectorizes the loop itself (it does not inside a parallel loop)
    _, inner = sch.split(loops[-1], factors=[None, factor])
    sch.vectorize(inner)
    if len(loops) > 1 and _prod(extents) >= PARALLEL_MIN_WORK:
        sch.parallel(_fuse(sch, loops[:-1]))


def _leading_spatial(dom_kind: str) -> int:
    return len(dom_kind) - len(dom_kind.lstrip("S"))


class RowReduction(CPURule):
    """Reductions over trailing axes (softmax, layer_norm, mean, sum over the last dims).

    All blocks go under the fused leading spatial loops ("rows"), in parallel when big. A
    reduction over one axis that full vectors divide is rfactored into one partial result per
    vector lane (vector loads and max/add); the spatial blocks are vectorized on their innermost
    axis. Assumes every block starts with the same row axes (true of TVM's legalized norms).
    """

    def schedule(self, sch, blocks, target) -> bool:
        reductions = [b for b in blocks if not b.is_injective()]
        if not reductions:
            return False
        n_rows = min(_leading_spatial(b.dom_kind()) for b in blocks)
        if n_rows == 0:
            return False
        for b in reductions:
            if not re.fullmatch("S*R+", b.dom_kind()):
                return False
            # A "row": the reduced axis is the innermost axis of the inputs it reduces, and no
            # output axis is (else it is a window or a contraction, which Tiled vectorizes over
            # the outputs). Inputs without the reduced axis (a row's mean) do not matter.
            r_var = b.iters[-1].var
            reduced = [r.region for r in sch.get(b.block_rv).reads if _uses(r.region, r_var)]
            s_vars = [i.var for i in b.iters if i.kind == "S"]
            if not any(_uses(region[-1].min, r_var) for region in reduced):
                return False
            if s_vars and any(_uses(region[-1].min, s_vars[-1]) for region in reduced):
                return False
        lanes = vector_lanes(target, _write_bits(sch, blocks[-1].block_rv))
        partials = [self._rfactor(sch, b, lanes) for b in reductions]
        last = blocks[-1].block_rv
        rows = _fuse(sch, _loops_through(sch, last, blocks[-1].iters[n_rows - 1].loop_rv))
        for block_rv in reversed(sch.get_child_blocks(sch.get_sblock("root"))[:-1]):
            sch.compute_at(block_rv, rows, preserve_unit_loops=True)
        # parallel/vectorize check that each block is complete or has its init: before decompose.
        if max(_prod(b.dom()) for b in blocks) >= PARALLEL_MIN_WORK:
            sch.parallel(rows)
        for b in blocks:
            if b.is_injective():
                _vectorize_inner(sch, b.block_rv, lanes, outer=1)
        for rf in filter(None, partials):
            # compute_at rebuilt the loops in block-iter order (lane loop first): put the lane
            # loop innermost, hoist the init out of the reduction loop, vectorize both.
            lane_loop, r_loop = _loop_of_iter(sch, rf, "S", lanes), _loop_of_iter(sch, rf, "R")
            sch.reorder(r_loop, lane_loop)
            sch.vectorize(lane_loop)
            sch.decompose_reduction(rf, r_loop)
        return True

    @staticmethod
    def _rfactor(sch, b, lanes):
        """Split a one-axis reduction into `lanes` partial results; the new block, or None."""
        if b.dom_kind().count("R") != 1:
            return None
        loop = sch.get_loops(b.block_rv)[-1]
        extent = _extent(sch, loop)
        if not extent or extent % lanes or extent < 2 * lanes:
            return None
        _, inner = sch.split(loop, factors=[None, lanes])
        return sch.rfactor(inner, factor_axis=len(b.dom_kind()) - 1)


def _vectors_per_tile(n: int) -> int:
    """How many vectors of the innermost axis one tile holds (dividing the `n` there are)."""
    return 2 if n % 2 == 0 else 1


class Tiled(CPURule):
    """One reduction (conv2d, depthwise conv2d, matmul, dense, batch_matmul, stride-1 pooling)
    whose output's innermost axis is also the unit-stride innermost axis of an input it reads.

    Output tile = `tile` rows of an axis the streamed input does not depend on (output channels
    for conv, rows for matmul; else the second-innermost axis) x `vec * nvec` columns of the
    innermost axis. The accumulators live in a small tile buffer (cache_write), the reduction
    loops run around the tile, elementwise epilogues (bias, relu) are inlined into the tile's
    write-back, and the fused outer tiles run in parallel when big. Vectors divide the innermost
    extent where they can; else the tail is predicated, which TVM vectorizes as scalar code
    (2.3x slower than a divisor on a 3x3 conv, still 20x faster than no schedule).
    """

    def schedule(self, sch, blocks, target) -> bool:
        reductions = [b for b in blocks if not b.is_injective()]
        if len(reductions) != 1 or not re.fullmatch("S+R+", reductions[0].dom_kind()):
            return False
        main = reductions[0]
        n_s = _leading_spatial(main.dom_kind())
        extents = main.dom()
        block = sch.get(main.block_rv)
        s_vars = [it.var for it in main.iters[:n_s]]
        streamed = [r for r in block.reads if len(r.region) and _uses(r.region[-1].min, s_vars[-1])]
        if (
            not streamed
            or not block.writes[0].region[-1].min.same_as(s_vars[-1])  # vectors along the output rows
            or not all(isinstance(e, int) for e in extents)
            or extents[n_s - 1] < 4
        ):
            return False
        # A strided input (stride-2 conv, pooling): our vectors would be built from scalar loads,
        # and in a parallel loop LLVM stops vectorizing by itself (the loop body becomes a closure
        # whose pointers are not noalias). The unscheduled loops were fastest (max_pool 3x3/2:
        # 0.19 ms vs 0.38 vectorized and 0.65 parallel), so leave those functions alone.
        if not all(_unit_stride(r.region[-1].min, s_vars[-1]) for r in streamed):
            return False
        position = blocks.index(main)
        producers, consumers = blocks[:position], blocks[position + 1 :]

        bits = block.writes[0].source.dtype.bits
        lanes = vector_lanes(target, bits)
        vec = _vector_factor(extents[n_s - 1], lanes) or lanes
        nvec = _vectors_per_tile(extents[n_s - 1] // vec)
        axis = self._tile_axis(s_vars, streamed)
        tile = 1
        if axis is not None:
            registers = 32 if lanes * bits >= 512 else 16
            budget = min(registers * 3 // 4 // nvec, (_MAX_STACK_BYTES - 1) // (vec * nvec * bits // 8))
            tile = next((t for t in (8, 6, 4, 3, 2) if t <= budget and extents[axis] % t == 0), 1)

        s_loops = [it.loop_rv for it in main.iters[:n_s]]
        r_loops = [it.loop_rv for it in main.iters[n_s:]]
        x_out, x_in = sch.split(s_loops[-1], factors=[None, vec * nvec])
        outer, inner = s_loops[:-1] + [x_out], [x_in]
        if tile > 1:
            t_out, t_in = sch.split(s_loops[axis], factors=[None, tile])
            outer[axis], inner = t_out, [t_in, x_in]
        sch.reorder(*outer, *r_loops, *inner)
        fused = _fuse(sch, _loops_through(sch, main.block_rv, x_out))

        # "global", not "local": TVM puts only small global-scope buffers on the stack; a local
        # one becomes a TVMBackendAllocWorkspace call per tile inside a parallel loop (4x slower).
        write_back = sch.cache_write(main.block_rv, 0, "global")
        sch.reverse_compute_at(write_back, fused)
        _inline_epilogue(sch, write_back, consumers)
        # parallel/vectorize need each block complete or with its init: decompose comes last.
        if _prod(extents) >= PARALLEL_MIN_WORK:
            sch.parallel(fused)
        for block_rv in (main.block_rv, write_back):
            loop = sch.get_loops(block_rv)[-1]
            if _extent(sch, loop) != vec:
                v_out, loop = sch.split(loop, factors=[None, vec])
                sch.unroll(v_out)
            sch.vectorize(loop)
        if tile > 1:
            sch.unroll(inner[0])
        sch.decompose_reduction(main.block_rv, r_loops[0])
        # Padding stays a stage of its own: inlined, its if_then_else makes our vectorized loop
        # scalar (4x slower on depthwise conv); computed per tile, it was no faster.
        for producer in producers:
            _parallel_vectorize(sch, producer.block_rv, target)
        return True

    @staticmethod
    def _tile_axis(s_vars, streamed) -> int | None:
        """An axis the streamed input does not depend on, so each loaded vector serves the whole
        tile (output channels of a conv, rows of a matmul); else the second-innermost axis."""
        reuse = [i for i in range(len(s_vars) - 1) if not any(_uses(r.region, s_vars[i]) for r in streamed)]
        if reuse:
            return reuse[-1]
        return len(s_vars) - 2 if len(s_vars) >= 2 else None


def _inline_epilogue(sch, write_back, consumers) -> None:
    """Inline the elementwise epilogue (bias, relu, ...) into the tile's write-back.

    A chain is reverse-inlined block by block. An epilogue that reads a value twice (silu =
    x * sigmoid(x), hardswish) is a DAG, where reverse-inlining its first block would leave the
    other readers of that value without their buffer (TVM does not check; the build then fails
    with "used before its definition"). There the blocks but the last are inlined forwards into
    their readers first, and the last, which then reads only the write-back's result, is
    reverse-inlined into it.
    """
    is_chain = all(len(sch.get_consumers(b)) <= 1 for b in [write_back] + [c.block_rv for c in consumers])
    if is_chain:
        for consumer in consumers:
            sch.reverse_compute_inline(consumer.block_rv)
        return
    for consumer in consumers[:-1]:
        sch.compute_inline(consumer.block_rv)
    sch.reverse_compute_inline(consumers[-1].block_rv)


def cpu_rules() -> list:
    """The schedule rules, in the order they are tried."""
    return [Injective(), RowReduction(), Tiled()]


def schedule_pass() -> tvm.transform.Pass:
    """dlight's ApplyDefaultSchedule with our rules: schedules every not-yet-scheduled PrimFunc.
    Needs the target in scope (`with target:`) or a "target" attribute on the functions."""
    return dl.ApplyDefaultSchedule(*cpu_rules())


def schedule_summary(mod: tvm.ir.IRModule) -> dict[str, str]:
    """PrimFunc name -> the rule that scheduled it ("-" for none), for a module after
    `schedule_pass`."""
    summary = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            annotations = getattr(getattr(func.body, "block", None), "annotations", {}) or {}
            summary[gv.name_hint] = str(annotations.get(RULE_ANNOTATION, "-"))
    return summary


def _fast_gelu(x):
    return topi.multiply(topi.multiply(x, 0.5), topi.add(topi.fast_erf(topi.multiply(x, 0.7071067811865476)), 1.0))


def _fast_gelu_tanh(x):
    cube = topi.multiply(topi.multiply(topi.multiply(x, x), x), 0.044715)
    inner = topi.multiply(topi.add(x, cube), 0.7978845608028654)
    return topi.multiply(topi.multiply(x, 0.5), topi.add(topi.fast_tanh(inner), 1.0))


def _fast_sigmoid(x):
    return topi.divide(1.0, topi.add(topi.fast_exp(topi.negative(x)), 1.0))


# Like TVM's FastMathTransform (exp, erf, tanh, softmax) plus gelu, gelu_tanh and sigmoid. LLVM has
# no vector exp/erf, so T.exp/T.erf/T.sigmoid in a vectorized loop become one libm call per lane.
_FAST_FP32 = {
    "relax.exp": topi.fast_exp,
    "relax.erf": topi.fast_erf,
    "relax.tanh": topi.fast_tanh,
    "relax.nn.softmax": lambda x, attrs: topi.nn.fast_softmax(x, attrs.axis),
    "relax.nn.gelu": _fast_gelu,
    "relax.nn.gelu_tanh": _fast_gelu_tanh,
    "relax.sigmoid": _fast_sigmoid,
}


@relax.expr_functor.mutator
class _FastMathRewriter(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        fast = _FAST_FP32.get(call.op.name) if isinstance(call.op, tvm.ir.Op) else None
        if fast is None or getattr(call.args[0].ty, "dtype", None) != "float32":
            return call
        name = "fast_" + call.op.name.rsplit(".", 1)[-1]
        if call.op.name == "relax.nn.softmax":
            return self.builder_.call_te(fast, call.args[0], call.attrs, primfunc_name_hint=name)
        return self.builder_.call_te(fast, call.args[0], primfunc_name_hint=name)


@tvm.transform.module_pass(opt_level=0, name="OrcaFastMath")
def fast_math_pass(mod: tvm.ir.IRModule, _ctx) -> tvm.ir.IRModule:
    """exp, erf, tanh, softmax, gelu, gelu_tanh and sigmoid -> TVM's vectorizable polynomial
    versions (topi.fast_exp/fast_erf/fast_tanh: relative error <= 4e-7 in our measurements;
    exp overflows to inf from x > 88.376 where the exact value is still finite). Relax level,
    before legalization."""
    rewriter = _FastMathRewriter(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return rewriter.builder_.get()


def _as_target(target) -> tvm.target.Target:
    target = getattr(target, "tvm_target", target)  # our ResolvedTarget
    return target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)


def cpu_pipeline(target, *, fast_math: bool = True) -> tvm.transform.Pass:
    """The Relax pipeline for `tvm.compile(mod, target=..., relax_pipeline=cpu_pipeline(target))`.

    TVM's CPU pipeline (`relax.backend.cpu_generic`: dispatch, legalize, fuse, lower, finalize)
    with our schedule rules run on every PrimFunc after FuseOps/FuseTIR, and (`fast_math`, on by
    default) exp/erf/tanh/sigmoid/gelu/softmax replaced by vectorizable polynomials first (see
    fast_math_pass). `target` is an llvm tvm.target.Target, a target dict, or a ResolvedTarget.
    PrimFuncs with the "tirx.is_scheduled" attribute are left as they are (dlight's rule).
    """
    target = _as_target(target)
    cpu = relax.backend.cpu_generic

    @tvm.transform.module_pass(opt_level=0, name="OrcaCPUPipeline")
    def _pipeline(mod: tvm.ir.IRModule, _ctx) -> tvm.ir.IRModule:
        with target:
            passes = (
                ([fast_math_pass] if fast_math else [])
                + cpu.library_dispatch_passes(target)
                + cpu.legalize_passes(target)
                + [schedule_pass()]
                + cpu.pipeline.dataflow_lower_passes(target)
                + cpu.finalize_passes(target)
            )
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline
