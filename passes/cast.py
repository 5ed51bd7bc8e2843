"""Mixed precision: run float32 compute in fp16 or bf16, keeping softmax, norms and reductions in fp32.

`cast{dtype=fp16|bf16,keep=...,skip=...}` stores the weights of the converted ops in the low
dtype (their bytes halve) and runs those ops in it. Activations are cast at the boundaries only:
each float32 model input once, before its first low-precision reader; each output back to float32,
so callers still see float32; and around every op that stays in float32. A cast is inserted where
a value is first needed in the other dtype and shared by every later reader; a round trip that
changes nothing (low -> f32 -> low) is removed.

What stays float32:
- `keep` (op names, ':'-separated in pipeline text): by default softmax, log_softmax,
  scaled_dot_product_attention (a softmax inside), layer_norm, batch_norm, group_norm, rms_norm,
  and the reductions mean, sum, var and norm (linalg_vector_norm): their sums and exponentials
  overflow or lose the small terms in 10 (fp16) or 7 (bf16) mantissa bits. Other aten op names
  are accepted too (`keep=softmax:exp`); `keep=none` keeps nothing.
- `skip` (':'-separated): layers left in float32, each a node name (`linear_2`) or a module path
  of the user's model (`encoder.layers.0`, covering every op in that module);
- our own ops (orca.lstm/gru, fused kernels, sparse linear): their kernels are float32;
- explicit casts in the model (`x.to(torch.float32)`) and ops creating float32 tensors (arange,
  full) keep their dtype; the values they make are cast down where low-precision ops read them.

Lowering on CPU (TVM llvm): the oneDNN/MKL kernels the kernel selection offers are float32 only,
so fp16/bf16 linears and convs run as TVM kernels (or torch's own aten kernel, when measured
faster). Like torch, they multiply in float32 and round the result once (TVM's importer asks for
a float32 result; lowering/low_precision.py casts it back). x86 CPUs without AVX512-FP16 have no
fp16 arithmetic (F16C only converts), and our schedules do not use the avx512_bf16 dot products,
so the low dtype halves the weights' memory and bandwidth but does not double the arithmetic
rate: expect speed about that of float32, not better; torch's own fp16 conv kernel on such CPUs
is very slow. Run the pass before `fuse` (`fold-constants,fold-bn,cast{dtype=bf16},fuse,cse,dce`):
after it, the fused ops it meets stay float32 (see above).

Statistics: `low` ops run in the low dtype, `kept` (keep list or own ops) and `skipped` (skip
list) ops in float32, `casts` (the pass's casts in the IR), `weights` converted, and
`bytes_before` / `bytes_after` of all the IR's weights.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
import torch.fx as fx

from orca_compiler.errors import PassInputError, PipelineError
from orca_compiler.ir import ORIGIN, GraphIR
from orca_compiler.pass_base import Pass, PassContext, PassResult, register_pass

aten = torch.ops.aten

DTYPES = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}

# keep names -> the aten op packets they stand for (the packets a capture or a decomposition
# may leave: layer_norm is kept whole, native_layer_norm is what decomposing it gives).
KEEP_ALIASES: dict[str, tuple[str, ...]] = {
    "softmax": ("softmax", "_softmax", "_safe_softmax"),
    "log_softmax": ("log_softmax", "_log_softmax"),
    "scaled_dot_product_attention": ("scaled_dot_product_attention",),
    "layer_norm": ("layer_norm", "native_layer_norm"),
    "batch_norm": ("batch_norm", "native_batch_norm", "_native_batch_norm_legit_no_training",
                   "_native_batch_norm_legit", "_native_batch_norm_legit_functional"),
    "group_norm": ("group_norm", "native_group_norm"),
    "rms_norm": ("rms_norm", "_fused_rms_norm"),
    "mean": ("mean",),
    "sum": ("sum",),
    "var": ("var", "var_mean"),
    "norm": ("linalg_vector_norm", "norm"),
}
DEFAULT_KEEP: tuple[str, ...] = tuple(KEEP_ALIASES)

# Ops that convert explicitly: they keep their own dtype argument and their input as it is.
_CONVERSIONS = frozenset({aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
                          aten.to.other, aten.type_as.default})
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class CastOptions:
    """dtype: fp16 or bf16; keep: op names that stay float32 (':'-separated; "none" for none);
    skip: node names or module paths of layers that stay float32 (':'-separated)."""

    dtype: str = "fp16"
    keep: tuple[str, ...] = DEFAULT_KEEP
    skip: tuple[str, ...] = ()


def _packet(node: fx.Node) -> str | None:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._overloadpacket.__name__
    return None


def _float_val(node) -> torch.dtype | None:
    """The floating dtype of the tensor `node` makes (None for non-tensors and other dtypes)."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor) and val.dtype in _FLOATS:
        return val.dtype
    return None


def _module_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _ in stack.values() if path]


def _keep_packets(names: tuple[str, ...]) -> set[str]:
    if tuple(names) in ((), ("none",)):
        return set()
    packets: set[str] = set()
    for name in names:
        if name in KEEP_ALIASES:
            packets.update(KEEP_ALIASES[name])
        elif isinstance(getattr(aten, name, None), torch._ops.OpOverloadPacket):
            packets.add(name)
        else:
            near = difflib.get_close_matches(name, list(KEEP_ALIASES), n=3)
            raise PipelineError(
                f"pass 'cast': option 'keep' names {name!r}, which is neither a keep name "
                f"({', '.join(KEEP_ALIASES)}) nor an aten op" + (f"; did you mean {', '.join(near)}?" if near else ""))
    return packets


class _Rewriter:
    """Walks the graph once in order, giving every op its inputs in the dtype it runs in."""

    def __init__(self, ir: GraphIR):
        self.ir = ir
        self.versions: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}  # (value, dtype) -> node
        self.casts = self.weights = 0

    def value_in(self, value: fx.Node, dtype: torch.dtype, before: fx.Node) -> fx.Node:
        """`value` as `dtype`: itself, or a cast (a converted weight) made once and shared."""
        if _float_val(value) in (None, dtype):
            return value
        key = (value, dtype)
        if key not in self.versions:
            with self.ir.graph.inserting_before(before):
                if value.op == "get_attr":
                    tensor = self.ir.weight(value)
                    new = self.ir.add_weight(f"{value.target}_{str(dtype).replace('torch.', '')}", tensor.to(dtype))
                    new.meta.update({k: v for k, v in value.meta.items() if k not in ("val", "tensor_meta")})
                    self.weights += 1
                else:
                    new = self.ir.create_node(aten._to_copy.default, (value,), {"dtype": dtype},
                                              name=f"{value.name}_{str(dtype).replace('torch.', '')}")
                    self.casts += 1
                new.meta[ORIGIN] = "cast"
            self.versions[key] = new
        return self.versions[key]

    def retype(self, node: fx.Node, dtype: torch.dtype | None) -> bool:
        """Give `node` its float inputs as `dtype` (None: as they are) and re-infer its type;
        returns whether anything about it changed."""
        changed = False
        if dtype is not None:
            def convert(arg: fx.Node) -> fx.Node:
                return self.value_in(arg, dtype, node)

            args, kwargs = fx.node.map_arg((node.args, node.kwargs), convert)
            if args != node.args or kwargs != node.kwargs:
                node.args, node.kwargs = args, kwargs
                changed = True
        before = node.meta.get("val")
        after = self.ir.infer_val(node)
        if _types(before) != _types(after):
            node.meta["val"] = after
            node.meta.pop("tensor_meta", None)  # torch.export's copy of the old type
            changed = True
        return changed


def _types(val) -> list:
    leaves = val if isinstance(val, (tuple, list)) else [val]
    return [(v.dtype, tuple(v.shape)) if isinstance(v, torch.Tensor) else type(v) for v in leaves]


def _drop_round_trips(ir: GraphIR) -> int:
    """Replace this pass's casts `to(to(x, f32), dtype(x))` (f16/bf16 -> f32 -> back: exact) by x,
    and its casts to the dtype a value already has by the value; returns how many went."""
    removed = 0
    for node in list(ir.graph.nodes):
        if node.meta.get(ORIGIN) != "cast" or node.target is not aten._to_copy.default:
            continue
        source, dtype = node.args[0], node.kwargs.get("dtype")
        replacement = None
        if _float_val(source) == dtype:
            replacement = source
        elif (isinstance(source, fx.Node) and source.target is aten._to_copy.default and len(source.args) == 1
              and set(source.kwargs) <= {"dtype"} and source.kwargs.get("dtype") == torch.float32
              and _float_val(source.args[0]) == dtype and dtype in (torch.float16, torch.bfloat16)):
            replacement = source.args[0]
        if replacement is not None:
            node.replace_all_uses_with(replacement)
            ir.graph.erase_node(node)
            removed += 1
    for node in reversed(list(ir.graph.nodes)):  # casts nothing reads any more
        if node.target is aten._to_copy.default and not node.users and node.meta.get(ORIGIN) == "cast":
            ir.graph.erase_node(node)
    return removed


@register_pass
class Cast(Pass):
    """Run float32 ops in fp16/bf16 (weights stored low), keeping softmax, norms and reductions in fp32."""

    name = "cast"
    Options = CastOptions

    def __init__(self, options: CastOptions | None = None):
        super().__init__(options)
        dtype = self.options.dtype
        if dtype not in DTYPES:
            raise PipelineError(f"pass 'cast': option 'dtype' got {dtype!r}, which is not supported; "
                                "supported: fp16 (float16, half) or bf16 (bfloat16)")
        self.low = DTYPES[dtype]
        self.keep = _keep_packets(tuple(self.options.keep))
        self.skip = tuple(s for s in self.options.skip if s)

    def _skipped_nodes(self, ir: GraphIR) -> set[fx.Node]:
        """The nodes the skip option names (a node name, or a module path and what is inside);
        PassInputError listing near matches for a name that matches nothing."""
        nodes = ir.compute_nodes()
        chosen: set[fx.Node] = set()
        for name in self.skip:
            hits = {n for n in nodes if n.name == name
                    or any(p == name or p.startswith(name + ".") for p in _module_paths(n))}
            if not hits:
                known = sorted({n.name for n in nodes} | {p for n in nodes for p in _module_paths(n)})
                near = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
                raise PassInputError(
                    f"option 'skip' names {name!r}, which is neither a node nor a module path of the model"
                    + (f"; near matches: {', '.join(near)}" if near else "; see `orca compile ... --print-ir` for node names"))
            chosen |= hits
        return chosen

    def _dtype_for(self, node: fx.Node, skipped: set[fx.Node]) -> tuple[torch.dtype | None, str]:
        """The dtype `node` runs in (None: leave its inputs as they are) and why."""
        if node.target in _CONVERSIONS or not isinstance(node.target, torch._ops.OpOverload):
            return None, "neutral"  # getitem, explicit casts, ...
        floats = [_float_val(a) for a in node.all_input_nodes]
        if not any(floats) or any(f is None and _is_float64(a) for f, a in zip(floats, node.all_input_nodes)):
            return None, "neutral"  # creates its tensors (arange, full) or reads float64
        if node in skipped:
            return torch.float32, "skipped"
        if node.target.namespace not in ("aten", "prims") or _packet(node) in self.keep:
            return torch.float32, "kept"
        if any(f is not None and f not in (torch.float32, self.low) for f in floats):
            return None, "neutral"  # already in another low dtype (a cast pass with the other dtype ran)
        return self.low, "low"

    def run(self, ir: GraphIR, ctx: PassContext) -> PassResult:
        bytes_before = ir.weight_bytes()
        skipped = self._skipped_nodes(ir)
        rewriter = _Rewriter(ir)
        counts = {"low": 0, "kept": 0, "skipped": 0}
        changed = False
        outputs_before = [_float_val(v) for v in ir.output_values()]
        for node in list(ir.graph.nodes):
            if node.op != "call_function" or node.meta.get(ORIGIN) == "cast":
                continue
            dtype, why = self._dtype_for(node, skipped)
            if why in counts:
                counts[why] += 1
            changed |= rewriter.retype(node, dtype)
        out = ir.output_node()
        results = [rewriter.value_in(v, dtype, out) if isinstance(v, fx.Node) and dtype is not None else v
                   for v, dtype in zip(ir.output_values(), outputs_before)]
        if results != ir.output_values():
            out.args = (tuple(results),)
            changed = True
        changed |= _drop_round_trips(ir) > 0
        if changed:
            ir.drop_unused_weights()
        stats = {**counts, "casts": sum(n.target is aten._to_copy.default and n.meta.get(ORIGIN) == "cast"
                                        for n in ir.graph.nodes),
                 "weights": rewriter.weights, "bytes_before": bytes_before, "bytes_after": ir.weight_bytes()}
        changed = changed or rewriter.weights > 0 or rewriter.casts > 0
        return PassResult(ir, changed, stats)


def _is_float64(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype == torch.float64
