"""fp16/bf16 linear, conv and matmul through TVM's importer (for the `cast` pass's graphs).

TVM 0.27's importer asks linear, conv1d/2d/3d and matmul/mm/bmm for a float32 result whatever
their inputs' dtype. With fp16/bf16 inputs a linear's or conv's bias add then fails to type-check
(f32 + f16), and a matmul's result no longer has the dtype the IR records, so every such op fell
back to torch's CPU kernel (torch's fp16 conv is very slow on CPUs without AVX512-FP16). This
mixin keeps the float32 accumulation, which is also what torch does on CPU, adds the bias in
float32, and rounds the result once to the recorded dtype. Float32 graphs are untouched.
"""
from __future__ import annotations

_LOW = ("float16", "bfloat16")


def expr_dtype(expr) -> str:
    """The dtype name of a Relax tensor expression ("float32")."""
    dtype = expr.ty.dtype
    return str(getattr(dtype, "dtype", dtype))


def recorded_dtype(node) -> str | None:
    """The dtype name torch records for an fx node ("float32"); None for a non-tensor value."""
    val = node.meta.get("val")
    return str(val.dtype).replace("torch.", "") if hasattr(val, "dtype") else None


class LowPrecisionImporter:
    """Mixin for TVM's ExportedProgramImporter (put it first among the bases)."""

    def _linear(self, node):
        args = self.retrieve_args(node)
        x, weight = args[0], args[1]
        bias = args[2] if len(args) > 2 else None
        dtype = expr_dtype(x)
        if dtype not in _LOW:
            return super()._linear(node)
        from tvm import relax

        bb = self.block_builder
        out = bb.emit(relax.op.linear(x, weight, None, "float32"))
        if bias is not None:
            out = bb.emit(relax.op.add(out, bb.emit(relax.op.astype(bias, "float32"))))
        return bb.emit(relax.op.astype(out, dtype))

    def _conv1d_impl(self, x, weight, bias, *args, **kwargs):
        return self._low_precision_conv(super()._conv1d_impl, x, weight, bias, *args, **kwargs)

    def _conv2d_impl(self, x, weight, bias, *args, **kwargs):
        return self._low_precision_conv(super()._conv2d_impl, x, weight, bias, *args, **kwargs)

    def _conv3d_impl(self, x, weight, bias, *args, **kwargs):
        return self._low_precision_conv(super()._conv3d_impl, x, weight, bias, *args, **kwargs)

    def _low_precision_conv(self, impl, x, weight, bias, *args, **kwargs):
        dtype = expr_dtype(x)
        if dtype not in _LOW:
            return impl(x, weight, bias, *args, **kwargs)
        from tvm import relax

        bb = self.block_builder
        if not self._is_no_bias(bias):
            bias = bb.emit(relax.op.astype(bias, "float32"))
        return bb.emit(relax.op.astype(impl(x, weight, bias, *args, **kwargs), dtype))

    def create_convert_map(self):
        return {name: self._to_recorded_dtype(fn) for name, fn in super().create_convert_map().items()}

    def _to_recorded_dtype(self, fn):
        """A converter whose float32 result is cast to the node's recorded fp16/bf16 dtype."""
        def convert(node, *args):
            out = fn(node, *args)
            recorded = recorded_dtype(node)
            if recorded in _LOW and getattr(getattr(out, "ty", None), "dtype", None) is not None and expr_dtype(out) == "float32":
                from tvm import relax

                out = self.block_builder.emit(relax.op.astype(out, recorded))
            return out

        return convert
