"""int8 x int8 -> int32 linear and conv kernels on the hardware dot-product instructions (used
by quant_kernels.py for linear_dq, linear_q and conv2d_q).

- **AVX-512 VNNI** (llvm targets whose CPU has `avx512vnni`, e.g. znver4, cascadelake, icelake,
  sapphirerapids): `vpdpbusd` multiplies 4 unsigned bytes by 4 signed bytes and adds the 4
  products into an int32 lane, 16 lanes an instruction. It is u8 x s8, so the int8 activations
  are shifted to u8 (`x + 128`: a xor of the sign bit) and the excess `128 * sum_k w[n, k]` is
  subtracted: the accumulators start at `-128 * colsum(w)`, computed at compile time. The
  weight is repacked at compile time to `[ceil(N/16), K/4, 16]` int32 words (4 consecutive k
  of one column a word; padding columns are zeros), so one 64-byte load feeds one instruction. A register tile of `rows` x
  `16 * blocks` accumulators runs over all of K, then the float epilogue (scales, bias, ReLU,
  requantize) is applied to the tile; the tiles of output columns run in parallel when big.
- **VNNI conv** (the same CPUs; ungrouped conv2d_q that is not pointwise: 3x3, strided,
  padded, dilated): the same register tile with output pixels as its rows, reducing over
  (kh, kw, Cp/4) of an int8 input that a TE step pads and makes channels-last
  (`[B, Hp, Wp, Cp]`, Cp = C rounded up to 4, zeros). Each step reads 4 channels of one tap of
  each pixel: no im2col matrix (a TE im2col was tried: its gather cost more than Relax's whole
  int8 conv). The padding is int8 0 before the u8 shift, so the correction stays exact. A
  pointwise conv is the linear kernel on its channels-last pixels. Grouped and depthwise convs
  are not served.
- **CUDA `__dp4a`** (cuda targets, linears and pointwise convs only): the same dot of 4 int8
  pairs into an int32, one thread per output column and a few rows; the weight is packed
  `[K/4, N]` int32 so a warp's loads are coalesced.
- **CUDA int8 tensor cores** (arch >= sm_80, the same layers where M >= 16 and K % 16 == 0):
  `wmma::mma_sync` on 16x16x16 s8 x s8 -> s32 tiles. The kernel is the TE int8 matmul and its
  epilogue, scheduled by TVM's own dlight rule (MatmulInt8Tensorization: 128 x 128 block tiles
  staged in shared memory, the epilogue fused into the store); the weight stays int8 `[N, K]`
  (the col-major B operand). Rows and columns short of a tile are padded inside the kernel
  (predicated loads of zeros).

All give exactly the integer accumulators of the plain kernels (quant_kernels.py); the float
epilogue is the same expression (`quant_kernels._int8_epilogue`), so the float results match too.
(The CUDA kernels are checked by code generation and nvcc only: no GPU has run them.)
The kernels are hand-written TIR marked scheduled: our CPU rules and dlight leave them alone.
`dot_path(target, k, n)` says which kernel (if any) a layer gets, `conv_path(target)` whether
non-pointwise convs get the VNNI conv. CPUs without VNNI (znver3)
and AMX are not served here: AMX is not implemented (no machine to run it on).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import LoweringError

VNNI = "vnni"
DP4A = "dp4a"
MMA = "mma"
# vpdpbusd: 16 int32 lanes, each the dot of 4 u8 x s8 pairs.
VNNI_LANES = 16
# The int32 word of 4 bytes 0x80: xor-ing it into 4 packed int8 values adds 128 to each (-> u8).
_SIGN_BITS = -0x7F7F7F80  # 0x80808080 as a signed int32
# Multiply-adds from which the VNNI kernel runs its column tiles in parallel. Serially, a
# 1x1024x1024 GEMV took 11 us and 8x1024x1024 37 us here; a parallel launch costs 5-50 us
# (cpu_schedules.PARALLEL_MIN_WORK), so only bigger products pay for it.
PARALLEL_MIN_MACS = 1 << 24
# CUDA: threads a block (over output columns) and rows each thread accumulates.
DP4A_THREADS = 128
DP4A_ROWS = 4
# CUDA tensor cores: the first arch we serve with them (Ampere; Turing's int8 wmma exists but
# is not targeted), the rows from which they are used (one whole 16-row wmma tile; the rule's
# block tile is 128 rows, so below 128 rows part of a block multiplies padding: not measured,
# no GPU here), and the K step of the 16x16x16 wmma tile (K % MMA_K == 0: no partial K tile).
MMA_MIN_ARCH = 80
MMA_MIN_ROWS = 16
MMA_K = 16


class Int8DotError(LoweringError):
    """A layer that the int8 dot-product kernels cannot take (shape or target)."""


@dataclass(frozen=True)
class Epilogue:
    """What happens to an int32 accumulator `acc[m, n]`: `float(acc) * scale (+ bias[n])`, the
    activation, and a requantize to int8 when `out_scale > 0`. `scale` is `wscale[n] *
    row_scale[m]` (dynamic mode, `per_row_scale`) or `wscale[n] * x_scale` (static mode).
    `raw=True` writes the int32 accumulators themselves (tests, no scale operands)."""

    per_row_scale: bool = False
    x_scale: float | None = None
    has_bias: bool = False
    out_scale: float = 0.0
    activation: str = "none"
    raw: bool = False

    @property
    def out_dtype(self) -> str:
        """The kernel's output dtype."""
        if self.raw:
            return "int32"
        return "int8" if self.out_scale > 0 else "float32"


# -- which kernel ------------------------------------------------------------------------------

def target_has_vnni(target) -> bool:
    """Whether an llvm `target` (tvm.target.Target) may use AVX-512 VNNI: LLVM's feature list for
    its mcpu/mattr has avx512vnni (znver4: yes; znver3, a plain "llvm" without mcpu: no)."""
    if target is None or target.kind.name != "llvm":
        return False
    from tvm.target.codegen import target_has_features

    try:
        return bool(target_has_features("avx512vnni", target)) and bool(target_has_features("avx512bw", target))
    except Exception:  # non-x86 triples: LLVM does not know the feature name
        return False


_disabled = False


@contextlib.contextmanager
def disabled():
    """Within this block, dot_path answers None: the int8 layers get the plain TE kernels (for
    benchmarks and bisecting; compile with `cache="off"`, as the compile cache does not know)."""
    global _disabled
    previous, _disabled = _disabled, True
    try:
        yield
    finally:
        _disabled = previous


_conv_disabled = False


@contextlib.contextmanager
def conv_disabled():
    """Within this block, non-pointwise int8 convs get Relax's int8 conv as before the direct
    VNNI conv (linears and pointwise convs keep their dot-product kernels): for benchmarks."""
    global _conv_disabled
    previous, _conv_disabled = _conv_disabled, True
    try:
        yield
    finally:
        _conv_disabled = previous


def conv_path(target) -> str | None:
    """VNNI where a non-pointwise ungrouped int8 conv gets the direct VNNI conv on `target`, else
    None (Relax's int8 conv; CUDA included: dp4a serves linears and pointwise convs only)."""
    if _conv_disabled:
        return None
    return VNNI if dot_path(target, 4, VNNI_LANES) == VNNI else None


def cuda_arch(target) -> int | None:
    """The SM version of a cuda `target` ("sm_80" -> 80, "sm_90a" -> 90), None if it has none."""
    import re

    match = re.fullmatch(r"sm_(\d+)[a-z]?", str(target.attrs.get("arch", "")))
    return int(match.group(1)) if match else None


def dot_path(target, k: int, n: int, rows: int | None = None) -> str | None:
    """The dot-product kernel for an int8 linear with `k` input and `n` output columns (and
    `rows` rows, None if not known at compile time) on `target`: VNNI, MMA (CUDA tensor cores:
    arch >= sm_80, rows >= 16, k % 16 == 0), DP4A (other CUDA layers), or None (the plain TE
    kernel). Needs `k % 4 == 0` (one 32-bit word of x a step); any `n`."""
    if _disabled or target is None or k % 4:
        return None
    if target.kind.name == "cuda":
        arch = cuda_arch(target)
        if arch is not None and arch >= MMA_MIN_ARCH and rows is not None and rows >= MMA_MIN_ROWS and k % MMA_K == 0:
            return MMA
        return DP4A
    if target_has_vnni(target):
        return VNNI
    return None


# -- compile-time weight packing ------------------------------------------------------------------

def vnni_columns(n: int) -> int:
    """`n` rounded up to whole 16-lane vectors: the columns of the packed weight."""
    return -(-n // VNNI_LANES) * VNNI_LANES


def pack_vnni_weight(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 weight `[N, K]` (K % 4 == 0) -> (`[P/16, K/4, 16]` int32 words holding
    w[16 b + i, 4 k4 : 4 k4 + 4] little-endian, `[P]` int32 `-128 * sum_k w[n, k]`), with
    P = vnni_columns(N): the columns past N are zeros."""
    n, k = weight.shape
    if k % 4:
        raise Int8DotError(f"the VNNI kernel needs K % 4 == 0, got K={k}")
    cols = vnni_columns(n)
    w = np.zeros((cols, k), dtype=np.int8)
    w[:n] = weight
    packed = w.reshape(cols // VNNI_LANES, VNNI_LANES, k // 4, 4).transpose(0, 2, 1, 3)
    words = np.ascontiguousarray(packed).view("<i4").reshape(cols // VNNI_LANES, k // 4, VNNI_LANES)
    compensation = (-128 * w.astype(np.int32).sum(axis=1)).astype(np.int32)
    return words, compensation


def pack_mma_weight(weight: np.ndarray) -> np.ndarray:
    """int8 weight `[N, K]` as the tensor-core kernel reads it: unchanged, contiguous. Row n is
    column n of the wmma B operand (col-major), so each 16x16 tile is 16 runs of 16 bytes."""
    n, k = weight.shape
    if k % MMA_K:
        raise Int8DotError(f"the tensor-core kernel needs K % {MMA_K} == 0, got K={k}")
    return np.ascontiguousarray(weight, dtype=np.int8)


def pack_dp4a_weight(weight: np.ndarray) -> np.ndarray:
    """int8 weight `[N, K]` (K % 4 == 0) -> `[K/4, N]` int32 words holding w[n, 4 k4 : 4 k4 + 4]."""
    n, k = weight.shape
    if k % 4:
        raise Int8DotError(f"the dp4a kernel needs K % 4 == 0, got K={k}")
    w = np.ascontiguousarray(weight, dtype=np.int8)
    return np.ascontiguousarray(w.reshape(n, k // 4, 4).view("<i4").reshape(n, k // 4).T)


# -- convolutions: the VNNI tile over (kh, kw, C/4) of a padded channels-last input ---------------

def conv_channels(channels: int) -> int:
    """Input channels rounded up to whole 4-byte words: the padded input's and weight's C."""
    return -(-channels // 4) * 4


def pack_conv_weight(weight: np.ndarray) -> np.ndarray:
    """int8 conv weight `[O, C, kh, kw]` -> the `[O, kh * kw * Cp]` matrix of the VNNI conv
    kernel (Cp = conv_channels(C)): column `(i * kw + j) * Cp + c`, zeros for c >= C (so they add
    nothing to pack_vnni_weight's `-128 * sum_k w` correction either)."""
    out_channels, channels, kh, kw = weight.shape
    padded = np.zeros((out_channels, kh, kw, conv_channels(channels)), dtype=np.int8)
    padded[..., :channels] = weight.transpose(0, 2, 3, 1)
    return padded.reshape(out_channels, -1)


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def pad_nhwc_te(x, *, padding):
    """TE: int8 x `[B, C, H, W]` -> `[B, H + 2 ph, W + 2 pw, Cp]` int8, channels last, the
    border and channels >= C int8 zeros. They are zeros *before* the VNNI kernel's u8 shift, so
    there they become 128, and their `128 * w` is taken back by the correction as for any real 0:
    the result is the conv with zero padding, exactly."""
    from tvm import te, tirx

    batch, channels, height, width = (int(d) for d in x.shape)
    ph, pw = padding

    def value(b, h, w, c):
        inside = tirx.all(c < channels, h >= ph, h < height + ph, w >= pw, w < width + pw)
        return tirx.if_then_else(inside, x[b, c, h - ph, w - pw], tirx.const(0, "int8"))

    return te.compute((batch, height + 2 * ph, width + 2 * pw, conv_channels(channels)), value, name="pad_nhwc")


def vnni_conv_kernel(padded_shape, out_hw, kernel, stride, dilation, n: int, epilogue: Epilogue,
                     parallel: bool | None = None):
    """The PrimFunc `(xp int8 [B, Hp, Wp, Cp], w int32 [P/16, K/4, 16], comp int32 [P],
    <epilogue operands>, out [B * OH * OW, N])`: a direct conv of the padded channels-last input
    (pad_nhwc_te) with pack_conv_weight's matrix packed by pack_vnni_weight (K = kh * kw * Cp).
    The tile of the linear kernel, its rows being output pixels: each step reads 4 channels of
    one tap of each pixel, no im2col matrix. Row tiles run in parallel when big."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.tirx.script.builder import ir as T

    batch, height, width, channels = padded_shape
    out_h, out_w = out_hw
    kh, kw = kernel
    (sh, sw), (dh, dw) = stride, dilation
    if channels % 4:
        raise Int8DotError(f"the VNNI conv needs channels % 4 == 0 (padded), got {channels}")
    k = kh * kw * channels
    rows, cols = batch * out_h * out_w, vnni_columns(n)
    tile = vnni_tile(rows, n)
    width_cols = tile.blocks * VNNI_LANES
    full = rows // tile.rows
    if parallel is None:
        parallel = rows * n * k >= PARALLEL_MIN_MACS and full > 1
    with IRBuilder() as builder:
        with T.prim_func(private=True):
            T.func_name("orca_int8_vnni_conv")
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            xp = T.match_buffer(T.arg("xp", T.handle()), (batch, height, width, channels), "int8")
            w = T.match_buffer(T.arg("w", T.handle()), (cols // VNNI_LANES, k // 4, VNNI_LANES), "int32")
            comp = T.match_buffer(T.arg("comp", T.handle()), (cols,), "int32")
            buffers = _scale_args(T, epilogue, rows, n)
            out = T.match_buffer(T.arg("out", T.handle()), (rows, n), epilogue.out_dtype)
            finish = _epilogue_fn(epilogue, buffers)

            def pixel(T, row):
                return (T.Bind(row // (out_h * out_w)), T.Bind(row // out_w % out_h), T.Bind(row % out_w))

            def x_word(base, v):
                from tvm import tirx

                (b, y, xx), (i, j, c4) = base, v
                return tirx.reinterpret("int32", xp[b, y * sh + i * dh, xx * sw + j * dw, tirx.Ramp(c4 * 4, 1, 4)])

            red = _Reduction((kh, kw, channels // 4), pixel, x_word,
                             lambda v: (v[0] * kw + v[1]) * (channels // 4) + v[2])

            def columns(m0, count):
                with T.serial(0, cols // width_cols) as col_tile:
                    _vnni_tile(T, red, w, comp, out, finish, n, m0, col_tile * width_cols, count, tile.blocks)

            if full:
                with (T.parallel if parallel else T.serial)(0, full) as row_tile:
                    columns(row_tile * tile.rows, tile.rows)
            if rows % tile.rows:
                columns(full * tile.rows, rows % tile.rows)
    return builder.get()


# -- the epilogue, shared ---------------------------------------------------------------------------

def _epilogue_fn(epilogue: Epilogue, buffers: dict) -> Callable:
    """(acc value, row index, column index) -> the output value, reading the scale and bias
    buffers in `buffers` ("row_scale", "wscale", "bias"). The same expression as the plain kernel
    (quant_kernels._int8_matmul_te), so the float results are the same."""
    from .quant_kernels import _int8_epilogue

    if epilogue.raw:
        return lambda acc, m, n: acc

    def value(acc, m, n):
        if epilogue.per_row_scale:
            scale = buffers["wscale"][n] * buffers["row_scale"][m]
        else:
            scale = buffers["wscale"][n] * float(epilogue.x_scale)
        bias = buffers["bias"][n] if epilogue.has_bias else None
        return _int8_epilogue(acc, scale, bias, epilogue.activation, epilogue.out_scale)

    return value


def _scale_args(T, epilogue: Epilogue, m, n: int) -> dict:
    """Declare the epilogue's operands (after x and the weight operands) as PrimFunc args."""
    buffers = {}
    if epilogue.raw:
        return buffers
    if epilogue.per_row_scale:
        buffers["row_scale"] = T.match_buffer(T.arg("row_scale", T.handle()), (m,), "float32")
    buffers["wscale"] = T.match_buffer(T.arg("wscale", T.handle()), (n,), "float32")
    if epilogue.has_bias:
        buffers["bias"] = T.match_buffer(T.arg("bias", T.handle()), (n,), "float32")
    return buffers


def _rows_var(rows: int | None):
    """The row extent of a kernel: a constant, or a symbolic int64 Var (any batch)."""
    from tvm import tirx

    return tirx.Var("m", "int64") if rows is None else rows


# -- CPU: AVX-512 VNNI --------------------------------------------------------------------------------

@dataclass(frozen=True)
class VnniTile:
    """The register tile: `rows` rows x `blocks` 16-lane vectors of output columns."""

    rows: int
    blocks: int


def vnni_tile(rows: int | None, n: int) -> VnniTile:
    """The tile for an `rows` x `n` output: up to 4 rows x 4 vectors (16 accumulators of the 32
    zmm registers, each weight vector loaded once for all rows, each x word once for all
    vectors); fewer vectors where they do not divide `n / 16`, fewer rows for fewer rows."""
    blocks = next(b for b in (4, 2, 1) if (vnni_columns(n) // VNNI_LANES) % b == 0)
    return VnniTile(4 if rows is None else max(1, min(rows, 4)), blocks)


def vnni_linear_kernel(rows: int | None, k: int, n: int, epilogue: Epilogue, tile: VnniTile | None = None,
                       parallel: bool | None = None):
    """The PrimFunc `(x int8 [M, K], w int32 [P/16, K/4, 16], comp int32 [P], <epilogue operands>,
    out [M, N])` computing `epilogue(x @ w.T)` with vpdpbusd (P = vnni_columns(N):
    pack_vnni_weight's layout); `rows` None = any M (tail rows one at a time). Assumes K % 4 == 0."""
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.tirx.script.builder import ir as T

    if k % 4:
        raise Int8DotError(f"the VNNI kernel needs K % 4 == 0, got K={k}")
    cols = vnni_columns(n)
    tile = tile or vnni_tile(rows, n)
    width = tile.blocks * VNNI_LANES
    if parallel is None:
        parallel = (rows or 8) * n * k >= PARALLEL_MIN_MACS and cols // width > 1  # any batch: as 8 rows
    with IRBuilder() as builder:
        with T.prim_func(private=True):
            T.func_name("orca_int8_vnni")
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            m = _rows_var(rows)
            x = T.match_buffer(T.arg("x", T.handle()), (m, k), "int8")
            w = T.match_buffer(T.arg("w", T.handle()), (cols // VNNI_LANES, k // 4, VNNI_LANES), "int32")
            comp = T.match_buffer(T.arg("comp", T.handle()), (cols,), "int32")
            buffers = _scale_args(T, epilogue, m, n)
            out = T.match_buffer(T.arg("out", T.handle()), (m, n), epilogue.out_dtype)
            finish = _epilogue_fn(epilogue, buffers)
            loop = T.parallel if parallel else T.serial
            with loop(0, cols // width) as col_tile:
                n0 = col_tile * width
                full = m // tile.rows
                if not isinstance(full, int) or full > 0:
                    with T.serial(0, full) as row_tile:
                        _vnni_tile(T, _matrix_rows(x, k), w, comp, out, finish, n, row_tile * tile.rows, n0, tile.rows,
                                   tile.blocks)
                if isinstance(m, tirx.Var):  # any batch: the rows past the last full tile, one at a time
                    with T.serial(full * tile.rows, m) as row:
                        _vnni_tile(T, _matrix_rows(x, k), w, comp, out, finish, n, row, n0, 1, tile.blocks)
                elif m % tile.rows:  # one tile of the remaining rows
                    _vnni_tile(T, _matrix_rows(x, k), w, comp, out, finish, n, full * tile.rows, n0, m % tile.rows,
                               tile.blocks)
    return builder.get()


@dataclass(frozen=True)
class _Reduction:
    """What a VNNI tile reduces over: nested serial loops of `extents`, and for given loop
    variables the packed weight's K/4 step and (per tile row, given the row index) the int32
    word of 4 int8 activations. A matrix row: one loop over K/4; a conv pixel: (kh, kw, Cp/4)."""

    extents: tuple
    row_base: Callable  # (T, row) -> per-row values computed once before the loops
    x_word: Callable  # (base, loop vars) -> int32 word of 4 int8 activations
    w_step: Callable  # (loop vars) -> the packed weight's k4 index


def _matrix_rows(x, k: int) -> _Reduction:
    from tvm import tirx

    return _Reduction((k // 4,), lambda T, row: row,
                      lambda row, v: tirx.reinterpret("int32", x[row, tirx.Ramp(v[0] * 4, 1, 4)]), lambda v: v[0])


def _vnni_tile(T, red: _Reduction, w, comp, out, finish, n: int, m0, n0, rows: int, blocks: int) -> None:
    """Emit one register tile: `rows` x `blocks` vectors of accumulators from the compensation,
    vpdpbusd over the reduction `red`, then the epilogue into `out[m0 : m0 + rows, n0 : n0 + 16 blocks]`.

    Each accumulator is a 16-lane buffer of its own: small stack buffers, which LLVM keeps in
    registers over the K loop. (One buffer for the tile reached TVM's 1 KB stack limit at 4 x 4,
    became a heap workspace, and LLVM then stored every accumulator on every step.)"""
    from tvm import tirx

    lanes = lambda start: tirx.Ramp(start, 1, VNNI_LANES)  # noqa: E731
    acc = [[T.alloc_buffer((VNNI_LANES,), "int32") for _ in range(blocks)] for _ in range(rows)]
    for r in range(rows):
        for b in range(blocks):
            T.buffer_store(acc[r][b], comp[lanes(n0 + b * VNNI_LANES)], [lanes(0)])
    bases = [red.row_base(T, m0 + r) for r in range(rows)]
    with contextlib.ExitStack() as loops:
        v = [loops.enter_context(T.serial(0, extent)) for extent in red.extents]
        # 4 int8 of row r as one int32, shifted to u8, in all 16 lanes; each weight vector once.
        # (This LLVM's vpdpbusd takes <64 x i8> operands, not the <16 x i32> of older ones.)
        xs = [T.Bind(tirx.reinterpret("int8x64", tirx.Broadcast(tirx.bitwise_xor(
            red.x_word(bases[r], v), tirx.const(_SIGN_BITS, "int32")), VNNI_LANES))) for r in range(rows)]
        ws = [T.Bind(tirx.reinterpret("int8x64", w[n0 // VNNI_LANES + b, red.w_step(v), lanes(0)]))
              for b in range(blocks)]
        for r in range(rows):
            for b in range(blocks):
                dot = tirx.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc[r][b][lanes(0)],
                                                 xs[r], ws[b])
                T.buffer_store(acc[r][b], dot, [lanes(0)])
    for b in range(blocks):
        if n % VNNI_LANES == 0:
            _vnni_store(T, out, finish, acc, m0, n0 + b * VNNI_LANES, rows, T.vectorized, VNNI_LANES, b)
            continue
        with T.If(n0 + (b + 1) * VNNI_LANES <= n):  # a whole vector of real columns
            with T.Then():
                _vnni_store(T, out, finish, acc, m0, n0 + b * VNNI_LANES, rows, T.vectorized, VNNI_LANES, b)
            with T.Else():  # the last vector, part padding: its real columns one at a time
                with T.If(n0 + b * VNNI_LANES < n):
                    with T.Then():
                        _vnni_store(T, out, finish, acc, m0, n0 + b * VNNI_LANES, rows, T.serial, n % VNNI_LANES, b)


def _vnni_store(T, out, finish, acc, m0, col0, rows: int, loop, count: int, b: int) -> None:
    """The epilogue of accumulator vector `b` of each tile row into `out[m0 + r, col0 + j]`,
    j < `count`, over a `loop` (T.vectorized for whole vectors, T.serial for a partial one)."""
    for r in range(rows):
        with loop(0, count) as j:
            T.buffer_store(out, finish(acc[r][b][j], m0 + r, col0 + j), [m0 + r, col0 + j])


# -- CUDA: __dp4a ---------------------------------------------------------------------------------------

def dp4a_linear_kernel(rows: int | None, k: int, n: int, epilogue: Epilogue):
    """The PrimFunc `(x int8 [M, K], w int32 [K/4, N], <epilogue operands>, out [M, N])` for CUDA:
    thread (column j, row group g) accumulates DP4A_ROWS rows of column j with __dp4a over K/4
    words. Assumes K % 4 == 0 (pack_dp4a_weight's layout); any N and M (guarded)."""
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.tirx.script.builder import ir as T

    if k % 4:
        raise Int8DotError(f"the dp4a kernel needs K % 4 == 0, got K={k}")
    with IRBuilder() as builder:
        with T.prim_func(private=True):
            T.func_name("orca_int8_dp4a")
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            m = _rows_var(rows)
            x = T.match_buffer(T.arg("x", T.handle()), (m, k), "int8")
            w = T.match_buffer(T.arg("w", T.handle()), (k // 4, n), "int32")
            buffers = _scale_args(T, epilogue, m, n)
            out = T.match_buffer(T.arg("out", T.handle()), (m, n), epilogue.out_dtype)
            finish = _epilogue_fn(epilogue, buffers)
            groups = (m + DP4A_ROWS - 1) // DP4A_ROWS
            with T.thread_binding(0, groups, "blockIdx.y") as g:
                with T.thread_binding(0, (n + DP4A_THREADS - 1) // DP4A_THREADS, "blockIdx.x") as bx:
                    with T.thread_binding(0, DP4A_THREADS, "threadIdx.x") as tx:
                        col = bx * DP4A_THREADS + tx
                        acc = T.alloc_buffer((DP4A_ROWS,), "int32", scope="local")
                        for r in range(DP4A_ROWS):
                            T.buffer_store(acc, tirx.const(0, "int32"), [r])
                        with T.If(col < n):
                            with T.Then():
                                with T.serial(0, k // 4) as k4:
                                    word = T.Bind(w[k4, col])
                                    for r in range(DP4A_ROWS):
                                        row = tirx.min(g * DP4A_ROWS + r, m - 1)  # clamped: read in bounds
                                        xs = x[row, tirx.Ramp(k4 * 4, 1, 4)]
                                        dot = tirx.call_pure_extern("int32", "__dp4a", xs, word, acc[r])
                                        T.buffer_store(acc, dot, [r])
                                for r in range(DP4A_ROWS):
                                    row = g * DP4A_ROWS + r
                                    with T.If(row < m):
                                        with T.Then():
                                            T.buffer_store(out, finish(acc[r], row, col), [row, col])
    return builder.get()


# -- CUDA: int8 tensor cores (wmma) -----------------------------------------------------------------

def int8_matmul_te(rows, k: int, n: int, epilogue: Epilogue):
    """The TE definition the tensor-core kernel is scheduled from: placeholders `(x int8 [M, K],
    w int8 [N, K], <epilogue operands>)`, the int32 accumulator `x @ w.T` and the epilogue.
    Returns the PrimFunc's argument list (the output last). Also runs as a plain kernel on CPU."""
    from tvm import te

    x = te.placeholder((rows, k), "int8", name="x")
    w = te.placeholder((n, k), "int8", name="w")
    buffers = {}
    if not epilogue.raw:
        if epilogue.per_row_scale:
            buffers["row_scale"] = te.placeholder((rows,), "float32", name="row_scale")
        buffers["wscale"] = te.placeholder((n,), "float32", name="wscale")
        if epilogue.has_bias:
            buffers["bias"] = te.placeholder((n,), "float32", name="bias")
    r = te.reduce_axis((0, k), "k")
    acc = te.compute((rows, n), lambda i, j: te.sum(x[i, r].astype("int32") * w[j, r].astype("int32"), axis=r),
                     name="acc")
    finish = _epilogue_fn(epilogue, buffers)
    out = te.compute((rows, n), lambda i, j: finish(acc[i, j], i, j), name="out")
    return [x, w, *buffers.values(), out]


def mma_linear_kernel(rows: int, k: int, n: int, epilogue: Epilogue, target):
    """The PrimFunc `(x int8 [M, K], w int8 [N, K], <epilogue operands>, out [M, N])` for CUDA
    arch >= sm_80: int8_matmul_te scheduled by dlight's MatmulInt8Tensorization (wmma 16x16x16
    s8s8s32 tiles, the epilogue fused into the store), marked scheduled. Assumes K % 16 == 0."""
    import tvm
    from tvm.s_tir import dlight

    from . import _fast_inspect

    if k % MMA_K:
        raise Int8DotError(f"the tensor-core kernel needs K % {MMA_K} == 0, got K={k}")
    # The rule imports tvm.s_tir.tensor_intrin: ~500 TVMScript prim_funcs, 25-36 s with the
    # stdlib inspect.stack, a few seconds with ours.
    _fast_inspect.install()
    func = tvm.te.create_prim_func(int8_matmul_te(rows, k, n, epilogue))
    sch = dlight.gpu.matmul.MatmulInt8Tensorization().apply(func, target, False)
    if sch is None:
        raise Int8DotError(f"dlight's int8 tensor-core rule did not apply to a {rows}x{k}x{n} int8 matmul")
    _drop_software_pipeline(sch)
    scheduled = sch.mod["main"].without_attr("global_symbol")  # private, as the other kernels: add_func names it
    return scheduled.with_attr("tir.noalias", True).with_attr("tirx.is_scheduled", True)


def _drop_software_pipeline(sch) -> None:
    """Remove the rule's software-pipeline annotations: TVM 0.27's InjectSoftwarePipeline fails
    on the wmma fragments the rule creates ("Check failed: (it != fragment_info_.end())" in
    GetWmmaFragmentSize), so the K loop runs unpipelined."""
    pending = [sch.get_sblock("root")]
    while pending:
        block = pending.pop()
        children = sch.get_child_blocks(block)
        pending.extend(children)
        for child in children:
            for loop in sch.get_loops(child):
                for key in list(sch.get(loop).annotations.keys()):
                    if key.startswith("software_pipeline"):
                        sch.unannotate(loop, key)
