"""Converters of TVM 0.27's torch importer that give wrong results, replaced (relax_build mixes
`ImporterFixes` into the importer it uses). Each was found by comparing with eager:

- `std.correction`: TVM emits the biased std whatever the correction (x.std(dim) was off by a
  factor sqrt(n / (n - 1))). Here it is the square root of TVM's own `var.correction`, which
  applies the correction.
- `upsample_nearest2d.vec` (F.interpolate(mode="nearest")): TVM maps output pixel i to the input
  pixel nearest to (i + 0.5) * in / out - 0.5 ("half_pixel"); torch takes floor(i * in / out),
  with in / out replaced by 1 / scale_factor when one is given. They agree on integer upscales
  only (8 -> 7 pixels was off by whole pixels). Here it is resize2d with "asymmetric" coordinates
  and floor rounding, torch's rule, where the sizes are static; a scale factor whose inverse is
  not in / out is refused (the op then runs in eager), as resize2d has no scale of its own.
- `index.Tensor` (x[:, [-1, 0]], x[idx]): TVM's `take` reads a negative index out of bounds.
  Here each integer index tensor of a static-sized dimension is wrapped first
  (where(i < 0, i + size, i)), as relax_build does for `select`'s constant index.
- `zeros_like`, `ones_like`, `empty_like` with a `dtype` (what nn.MultiheadAttention makes of a
  boolean key_padding_mask): TVM kept the input's dtype (bool). Here the result has the dtype
  torch records for the node.
- `masked_fill(mask, -inf)` (attention masks): TVM lowers its full_like through topi.full, which
  fails on an infinite value ("argument of type 'PrimType' is not iterable"). Here it is
  where(mask, value, x) with the value a scalar constant.
- `a / b` and `div(a, b, rounding_mode=...)`: TVM divided int64 tensors as integers where torch's
  true division gives float32 (0.67 off), and made a scalar `b` a constant of its own default
  dtype, so rounding divisions of int64 tensors failed to convert. Here both operands take the
  dtype torch records for the result first.
- `pixel_shuffle`: TVM converts it to relax.nn.pixel_shuffle, whose lowering calls
  topi.nn.pixel_shuffle, which this wheel lacks (the build failed). Here it is the reshape /
  permute / reshape torch defines it by.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .low_precision import recorded_dtype


class ImporterFixes:
    """Mixed into an ExportedProgramImporter subclass before it: the converters above."""

    def _std(self, node: fx.Node):
        from tvm import relax

        if getattr(node.target, "_overloadname", None) != "correction":
            return super()._std(node)
        return self.block_builder.emit(relax.op.sqrt(self._var_correction(node)))

    def _upsample_nearest2d(self, node: fx.Node):
        from tvm import relax

        source, result = node.args[0].meta.get("val"), node.meta.get("val")
        sizes_in = [int(s) if isinstance(s, int) else None for s in source.shape[2:]]
        sizes_out = [int(s) if isinstance(s, int) else None for s in result.shape[2:]]
        if None in sizes_in + sizes_out:
            return super()._upsample_nearest2d(node)  # symbolic sizes: TVM's (right on integer upscales)
        scales = node.args[2] if len(node.args) > 2 else node.kwargs.get("scale_factors")
        if scales is not None:
            for scale, size_in, size_out in zip(scales, sizes_in, sizes_out):
                if float(scale) * size_in != size_out:
                    raise NotImplementedError(
                        f"nearest interpolation by scale factor {scale} from {size_in} to {size_out} pixels: "
                        "torch maps pixels by 1/scale, TVM's resize2d by in/out")
        return self.block_builder.emit(relax.op.image.resize2d(
            self.env[node.args[0]], tuple(sizes_out), layout="NCHW", method="nearest_neighbor",
            coordinate_transformation_mode="asymmetric", rounding_method="floor"))

    def _index_tensor(self, node: fx.Node):
        from tvm import relax

        source, indices = node.args[0], node.args[1]
        sizes = source.meta["val"].shape
        wrapped = {}
        for axis, index in enumerate(indices):
            value = index.meta.get("val") if isinstance(index, fx.Node) else None
            if (index in wrapped or not isinstance(value, torch.Tensor) or value.dtype == torch.bool
                    or value.is_floating_point() or not isinstance(sizes[axis], int)):
                continue
            expr = self.env[index]
            dtype = recorded_dtype(index)
            negative = relax.op.less(expr, relax.const(0, dtype))
            wrapped[index] = (expr, self.block_builder.emit(
                relax.op.where(negative, relax.op.add(expr, relax.const(sizes[axis], dtype)), expr)))
        for index, (_, fixed) in wrapped.items():
            self.env[index] = fixed
        try:
            return super()._index_tensor(node)
        finally:
            for index, (original, _) in wrapped.items():
                self.env[index] = original

    def _like(self, node: fx.Node, make):
        """`make(x, dtype=...)` of the node's input, with the dtype torch records for the node."""
        dtype = recorded_dtype(node)
        return self.block_builder.emit(make(self.env[node.args[0]], dtype=dtype))

    def _zeros_like(self, node: fx.Node):
        from tvm import relax

        return self._like(node, relax.op.zeros_like)

    def _empty_like(self, node: fx.Node):
        from tvm import relax

        return self._like(node, relax.op.zeros_like)

    def create_convert_map(self):
        from tvm import relax

        convert_map = super().create_convert_map()
        convert_map["ones_like.default"] = lambda node: self._like(node, relax.op.ones_like)
        convert_map["div.Tensor"] = self._true_divide
        return convert_map

    def _masked_fill(self, node: fx.Node):
        from tvm import relax

        value = node.args[2]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return super()._masked_fill(node)
        dtype = recorded_dtype(node)
        x, mask = self.env[node.args[0]], self.env[node.args[1]]
        return self.block_builder.emit(relax.op.where(mask, relax.const(value, dtype), x))

    def _operands_as_result(self, node: fx.Node) -> tuple:
        """The node's first two operands in the dtype torch records for its result (a scalar as a
        constant of that dtype, a tensor cast where it differs)."""
        from tvm import relax

        dtype = recorded_dtype(node)

        def operand(arg):
            if not isinstance(arg, fx.Node):
                return relax.const(arg, dtype)
            expr = self.env[arg]
            if recorded_dtype(arg) == dtype:
                return expr
            return self.block_builder.emit(relax.op.astype(expr, dtype))

        return operand(node.args[0]), operand(node.args[1])

    def _true_divide(self, node: fx.Node):
        from tvm import relax

        return self.block_builder.emit(relax.op.divide(*self._operands_as_result(node)))

    def _div(self, node: fx.Node):
        from tvm import relax

        rounding = node.args[2] if len(node.args) > 2 else node.kwargs.get("rounding_mode")
        bb = self.block_builder
        a, b = self._operands_as_result(node)
        if rounding == "floor":
            return bb.emit(relax.op.floor_divide(a, b))
        if rounding == "trunc":  # TVM divides integers truncating already; trunc keeps them
            return bb.emit(relax.op.trunc(bb.emit(relax.op.divide(a, b))))
        return bb.emit(relax.op.divide(a, b))

    def _pixel_shuffle(self, node: fx.Node):
        """[N, C*r*r, H, W] -> [N, C, H*r, W*r], as torch: view, permute, view."""
        from tvm import relax

        bb, r = self.block_builder, node.args[1]
        shape = node.args[0].meta["val"].shape
        if len(shape) != 4 or not all(isinstance(d, int) for d in shape):
            return super()._pixel_shuffle(node)  # fails to build: the op then runs in eager
        n, c, h, w = shape
        x = bb.emit(relax.op.reshape(self.env[node.args[0]], (n, c // (r * r), r, r, h, w)))
        x = bb.emit(relax.op.permute_dims(x, [0, 1, 4, 2, 5, 3]))
        return bb.emit(relax.op.reshape(x, (n, c // (r * r), h * r, w * r)))
