"""TVM kernels for the recurrence ops (orca::lstm_scan, orca::gru_scan): the time loop is a TIR loop.

One PrimFunc runs a whole layer direction: for each batch row, for each time step, the recurrent
GEMV `h @ W_hh^T` into a gate buffer (vectorized over gate columns, a few vector registers per
chunk), then the gate nonlinearities and the state update fused in one vectorized loop. The time
and batch extents are symbolic, so one kernel serves every sequence length and batch size, and
the program does not grow with T (TVM's own importer unrolls every step). Batch rows are
independent, so they run in parallel when there is enough work; the time loop is serial.

The converters emit `call_tir` of these kernels; they are marked scheduled, so our CPU schedule
rules (and dlight on GPU) leave them alone. On CUDA one thread block runs one batch row, with the
states in shared memory (the persistent-kernel design of cuDNN's small-batch RNNs). Other targets
get no kernel: the converter raises, and the op runs in eager PyTorch (reported as a fallback).

The quantized scans (orca::lstm_scan_q, orca::gru_scan_q: W_hh int8 or int4, from the quantize
pass) are the same kernels with the GEMV reading the integer W_hh^T and converting it to float32
in registers (int4: two state features a byte, unpacked with constant shifts); the per-column
scale multiplies each finished dot product, a per-group scale each term. No float32 W_hh exists.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch.fx as fx
import tvm
from tvm import relax
from tvm.script import tirx as T

from ..errors import LoweringError
from ..ops.rnn import GRU_SCAN, GRU_SCAN_Q, LSTM_SCAN, LSTM_SCAN_Q
from .support import register_converter
from .tir_math import fast_sigmoid, fast_tanh

# Gate columns per vectorized chunk of the GEMV: 64 float32 = 4 AVX-512 (8 AVX2) registers.
GATE_CHUNK = 64
# Parallel batch rows only above this many multiply-adds per call (a launch costs 20-50 us when
# TVM's workers do not spin; see cpu_schedules.PARALLEL_MIN_WORK).
PARALLEL_MIN_MACS = 1 << 21


@dataclass(frozen=True)
class ScanShape:
    """The static facts a scan kernel is specialized on (T and B stay symbolic)."""

    hidden: int
    gates: int           # 4 for the LSTM, 3 for the GRU
    xproj_width: int     # columns of xproj (gates * hidden, times 2 when directions share it)
    column: int          # this direction's first column in xproj
    reverse: bool
    batch_first: bool
    parallel: bool
    rows_per_group: int = 1  # batch rows stepped together, sharing each load of W_hh (divides B)
    dtype: str = "float32"


def _chunk(width: int, limit: int = GATE_CHUNK) -> int:
    """The largest vector chunk (<= min(limit, GATE_CHUNK)) that divides `width`."""
    for size in (GATE_CHUNK, 32, 16, 8, 4, 2):
        if size <= limit and width % size == 0:
            return size
    return 1


def _indexing(shape: ScanShape):
    """Helpers shared by the kernels: xproj/out shapes and flat row offsets for (t, b)."""

    def dims(steps, batch, width):
        return (batch, steps, width) if shape.batch_first else (steps, batch, width)

    def row(t, bi, steps, batch):
        return bi * steps + t if shape.batch_first else t * batch + bi

    def time_index(t, steps):
        return steps - 1 - t if shape.reverse else t

    return dims, row, time_index


def lstm_scan_kernel(shape: ScanShape) -> tvm.tirx.PrimFunc:
    """The PrimFunc for orca::lstm_scan with these static facts (see ops/rnn.py for semantics)."""
    H, K, col, dt, RB = shape.hidden, shape.xproj_width, shape.column, shape.dtype, shape.rows_per_group
    G = 4 * H
    CH = _chunk(G, GATE_CHUNK * 2 // RB)
    HC = _chunk(H)
    dims, row, time_index = _indexing(shape)
    groups = T.parallel if shape.parallel else T.serial

    @T.prim_func(private=True)
    def lstm_scan(xp_h: T.handle, w_h: T.handle, h0_h: T.handle, c0_h: T.handle, out_h: T.handle,
                  hn_h: T.handle, cn_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        n = T.int64()
        b = T.int64()
        xp3 = T.match_buffer(xp_h, dims(n, b, K), dt)
        w = T.match_buffer(w_h, (H, G), dt)
        h0 = T.match_buffer(h0_h, (b, H), dt)
        c0 = T.match_buffer(c0_h, (b, H), dt)
        out3 = T.match_buffer(out_h, dims(n, b, H), dt)
        hn = T.match_buffer(hn_h, (b, H), dt)
        cn = T.match_buffer(cn_h, (b, H), dt)
        xp = T.decl_buffer((n * b * K,), dt, data=xp3.data)
        out = T.decl_buffer((n * b * H,), dt, data=out3.data)
        for g in groups(b // RB):
            h = T.decl_buffer((RB * H,), dt)
            c = T.decl_buffer((RB * H,), dt)
            acc = T.decl_buffer((RB * G,), dt)
            for r, j in T.grid(RB, H):
                h[r * H + j] = h0[g * RB + r, j]
                c[r * H + j] = c0[g * RB + r, j]
            for t in range(n):
                ti = time_index(t, n)
                for jo in range(G // CH):
                    part = T.decl_buffer((RB * CH,), dt)  # RB x CH accumulators, kept in registers over k
                    for r in T.unroll(RB):
                        for ji in T.vectorized(CH):
                            part[r * CH + ji] = xp[row(ti, g * RB + r, n, b) * K + col + jo * CH + ji]
                    for k in range(H):
                        for r in T.unroll(RB):  # each W_hh chunk is loaded once for the RB rows
                            for ji in T.vectorized(CH):
                                part[r * CH + ji] = part[r * CH + ji] + h[r * H + k] * w[k, jo * CH + ji]
                    for r in T.unroll(RB):
                        for ji in T.vectorized(CH):
                            acc[r * G + jo * CH + ji] = part[r * CH + ji]
                for r, jo in T.grid(RB, H // HC):
                    for ji in T.vectorized(HC):
                        c[r * H + jo * HC + ji] = (
                            fast_sigmoid(acc[r * G + H + jo * HC + ji]) * c[r * H + jo * HC + ji]
                            + fast_sigmoid(acc[r * G + jo * HC + ji]) * fast_tanh(acc[r * G + 2 * H + jo * HC + ji]))
                        h[r * H + jo * HC + ji] = (fast_sigmoid(acc[r * G + 3 * H + jo * HC + ji])
                                                   * fast_tanh(c[r * H + jo * HC + ji]))
                        out[row(ti, g * RB + r, n, b) * H + jo * HC + ji] = h[r * H + jo * HC + ji]
            for r, j in T.grid(RB, H):
                hn[g * RB + r, j] = h[r * H + j]
                cn[g * RB + r, j] = c[r * H + j]

    return lstm_scan


def gru_scan_kernel(shape: ScanShape) -> tvm.tirx.PrimFunc:
    """The PrimFunc for orca::gru_scan with these static facts (see ops/rnn.py for semantics)."""
    H, K, col, dt, RB = shape.hidden, shape.xproj_width, shape.column, shape.dtype, shape.rows_per_group
    G = 3 * H
    CH = _chunk(G, GATE_CHUNK * 2 // RB)
    HC = _chunk(H)
    dims, row, time_index = _indexing(shape)
    groups = T.parallel if shape.parallel else T.serial

    @T.prim_func(private=True)
    def gru_scan(xp_h: T.handle, w_h: T.handle, bhn_h: T.handle, h0_h: T.handle, out_h: T.handle,
                 hn_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        n = T.int64()
        b = T.int64()
        xp3 = T.match_buffer(xp_h, dims(n, b, K), dt)
        w = T.match_buffer(w_h, (H, G), dt)
        bhn = T.match_buffer(bhn_h, (H,), dt)
        h0 = T.match_buffer(h0_h, (b, H), dt)
        out3 = T.match_buffer(out_h, dims(n, b, H), dt)
        hn = T.match_buffer(hn_h, (b, H), dt)
        xp = T.decl_buffer((n * b * K,), dt, data=xp3.data)
        out = T.decl_buffer((n * b * H,), dt, data=out3.data)
        for g in groups(b // RB):
            h = T.decl_buffer((RB * H,), dt)
            acc = T.decl_buffer((RB * G,), dt)
            for r, j in T.grid(RB, H):
                h[r * H + j] = h0[g * RB + r, j]
            for t in range(n):
                ti = time_index(t, n)
                for jo in range(G // CH):
                    part = T.decl_buffer((RB * CH,), dt)
                    for r in T.unroll(RB):
                        for ji in T.vectorized(CH):
                            part[r * CH + ji] = T.float32(0)
                    for k in range(H):
                        for r in T.unroll(RB):
                            for ji in T.vectorized(CH):
                                part[r * CH + ji] = part[r * CH + ji] + h[r * H + k] * w[k, jo * CH + ji]
                    for r in T.unroll(RB):
                        for ji in T.vectorized(CH):
                            acc[r * G + jo * CH + ji] = part[r * CH + ji]
                for r, jo in T.grid(RB, H // HC):
                    for ji in T.vectorized(HC):
                        h[r * H + jo * HC + ji] = _gru_update(
                            xp, row(ti, g * RB + r, n, b) * K + col, acc, bhn, h, jo * HC + ji, H, dt,
                            acc_offset=r * G, h_offset=r * H)
                        out[row(ti, g * RB + r, n, b) * H + jo * HC + ji] = h[r * H + jo * HC + ji]
            for r, j in T.grid(RB, H):
                hn[g * RB + r, j] = h[r * H + j]

    return gru_scan


def _gru_update(xp, base, acc, bhn, h, j, hidden, dtype, sigmoid=fast_sigmoid, tanh=fast_tanh, acc_offset=0,
                h_offset=0):
    """h' = (1 - z) * n + z * h with r, z, n from the step's inputs and the GEMV result (a row's
    gates start at `acc_offset` in `acc`, its state at `h_offset` in `h`)."""
    r = sigmoid(xp[base + j] + acc[acc_offset + j])
    z = sigmoid(xp[base + hidden + j] + acc[acc_offset + hidden + j])
    candidate = tanh(xp[base + 2 * hidden + j] + r * (acc[acc_offset + 2 * hidden + j] + bhn[j]))
    return (tvm.tirx.const(1.0, dtype) - z) * candidate + z * h[h_offset + j]

# -- CUDA: one thread block per batch row, threads over gate columns, states in shared memory ----

# Threads per block: one per gate column up to this many (then each thread takes several).
GPU_THREADS = 256


def _gpu_threads(columns: int) -> int:
    return min(GPU_THREADS, (columns + 31) // 32 * 32)


def lstm_scan_kernel_cuda(shape: ScanShape) -> tvm.tirx.PrimFunc:
    """orca::lstm_scan for CUDA: a persistent kernel, one block per batch row; each step is a
    GEMV over the block's threads, a barrier, the fused gate update, and a barrier."""
    H, K, col, dt = shape.hidden, shape.xproj_width, shape.column, shape.dtype
    G = 4 * H
    NT = _gpu_threads(G)
    dims, row, time_index = _indexing(shape)

    @T.prim_func(private=True)
    def lstm_scan(xp_h: T.handle, w_h: T.handle, h0_h: T.handle, c0_h: T.handle, out_h: T.handle,
                  hn_h: T.handle, cn_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        n = T.int64()
        b = T.int64()
        xp3 = T.match_buffer(xp_h, dims(n, b, K), dt)
        w = T.match_buffer(w_h, (H, G), dt)
        h0 = T.match_buffer(h0_h, (b, H), dt)
        c0 = T.match_buffer(c0_h, (b, H), dt)
        out3 = T.match_buffer(out_h, dims(n, b, H), dt)
        hn = T.match_buffer(hn_h, (b, H), dt)
        cn = T.match_buffer(cn_h, (b, H), dt)
        xp = T.decl_buffer((n * b * K,), dt, data=xp3.data)
        out = T.decl_buffer((n * b * H,), dt, data=out3.data)
        bi = T.launch_thread("blockIdx.x", b)
        tx = T.launch_thread("threadIdx.x", NT)
        h = T.decl_buffer((H,), dt, scope="shared")
        c = T.decl_buffer((H,), dt, scope="shared")
        acc = T.decl_buffer((G,), dt, scope="shared")
        s = T.decl_buffer((1,), dt, scope="local")
        for jo in range((H + NT - 1) // NT):
            if jo * NT + tx < H:
                h[jo * NT + tx] = h0[bi, jo * NT + tx]
                c[jo * NT + tx] = c0[bi, jo * NT + tx]
        T.tvm_storage_sync("shared")
        for t in range(n):
            ti = time_index(t, n)
            for jo in range((G + NT - 1) // NT):
                if jo * NT + tx < G:
                    s[0] = xp[row(ti, bi, n, b) * K + col + jo * NT + tx]
                    for k in range(H):
                        s[0] = s[0] + h[k] * w[k, jo * NT + tx]
                    acc[jo * NT + tx] = s[0]
            T.tvm_storage_sync("shared")
            for jo in range((H + NT - 1) // NT):
                if jo * NT + tx < H:
                    c[jo * NT + tx] = (T.sigmoid(acc[H + jo * NT + tx]) * c[jo * NT + tx]
                                       + T.sigmoid(acc[jo * NT + tx]) * T.tanh(acc[2 * H + jo * NT + tx]))
                    h[jo * NT + tx] = T.sigmoid(acc[3 * H + jo * NT + tx]) * T.tanh(c[jo * NT + tx])
                    out[row(ti, bi, n, b) * H + jo * NT + tx] = h[jo * NT + tx]
            T.tvm_storage_sync("shared")
        for jo in range((H + NT - 1) // NT):
            if jo * NT + tx < H:
                hn[bi, jo * NT + tx] = h[jo * NT + tx]
                cn[bi, jo * NT + tx] = c[jo * NT + tx]

    return lstm_scan


def gru_scan_kernel_cuda(shape: ScanShape) -> tvm.tirx.PrimFunc:
    """orca::gru_scan for CUDA, organized as lstm_scan_kernel_cuda."""
    H, K, col, dt = shape.hidden, shape.xproj_width, shape.column, shape.dtype
    G = 3 * H
    NT = _gpu_threads(G)
    dims, row, time_index = _indexing(shape)

    @T.prim_func(private=True)
    def gru_scan(xp_h: T.handle, w_h: T.handle, bhn_h: T.handle, h0_h: T.handle, out_h: T.handle,
                 hn_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        n = T.int64()
        b = T.int64()
        xp3 = T.match_buffer(xp_h, dims(n, b, K), dt)
        w = T.match_buffer(w_h, (H, G), dt)
        bhn = T.match_buffer(bhn_h, (H,), dt)
        h0 = T.match_buffer(h0_h, (b, H), dt)
        out3 = T.match_buffer(out_h, dims(n, b, H), dt)
        hn = T.match_buffer(hn_h, (b, H), dt)
        xp = T.decl_buffer((n * b * K,), dt, data=xp3.data)
        out = T.decl_buffer((n * b * H,), dt, data=out3.data)
        bi = T.launch_thread("blockIdx.x", b)
        tx = T.launch_thread("threadIdx.x", NT)
        h = T.decl_buffer((H,), dt, scope="shared")
        acc = T.decl_buffer((G,), dt, scope="shared")
        s = T.decl_buffer((1,), dt, scope="local")
        for jo in range((H + NT - 1) // NT):
            if jo * NT + tx < H:
                h[jo * NT + tx] = h0[bi, jo * NT + tx]
        T.tvm_storage_sync("shared")
        for t in range(n):
            ti = time_index(t, n)
            for jo in range((G + NT - 1) // NT):
                if jo * NT + tx < G:
                    s[0] = T.float32(0)
                    for k in range(H):
                        s[0] = s[0] + h[k] * w[k, jo * NT + tx]
                    acc[jo * NT + tx] = s[0]
            T.tvm_storage_sync("shared")
            for jo in range((H + NT - 1) // NT):
                if jo * NT + tx < H:
                    h[jo * NT + tx] = _gru_update(xp, row(ti, bi, n, b) * K + col, acc, bhn, h, jo * NT + tx, H, dt,
                                                  T.sigmoid, T.tanh)
                    out[row(ti, bi, n, b) * H + jo * NT + tx] = h[jo * NT + tx]
            T.tvm_storage_sync("shared")
        for jo in range((H + NT - 1) // NT):
            if jo * NT + tx < H:
                hn[bi, jo * NT + tx] = h[jo * NT + tx]

    return gru_scan


# -- quantized W_hh (orca::lstm_scan_q, orca::gru_scan_q) -----------------------------------------
# The integer W_hh^T is stored `[K, G]` (int8, K = H) or `[ceil(H/2), G]` (uint8, two int4 state
# features a byte, the even one in the low nibble), so a vector of gate columns reads a unit-stride
# vector of integers, converted to float32 in registers inside the GEMV: no float32 copy of W_hh
# exists. Scales are `[groups, G]`: with one group (per gate column) they multiply the finished
# dot product once per step; with several, each term inside the reduction.


@dataclass(frozen=True)
class QuantSpec:
    """How W_hh is quantized: bits (8 or 4) and the state features per scale (`group`)."""

    bits: int
    group: int
    hidden: int

    @property
    def groups(self) -> int:
        return -(-self.hidden // self.group)

    @property
    def per_channel(self) -> bool:
        return self.groups == 1

    @property
    def rows(self) -> int:
        """Rows of the stored integer W_hh^T."""
        return self.hidden if self.bits == 8 else -(-self.hidden // 2)

    @property
    def dtype(self) -> str:
        return "int8" if self.bits == 8 else "uint8"


def _cpu_term(q: QuantSpec, h, h_offset, w, s, k, j):
    """Step `k` of the CPU GEMV for gate column `j`: int8 one state feature; int4 the two of byte
    row `k` (constant shifts, so a vector of bytes unpacks in registers)."""
    from .quant_kernels import _nibble

    if q.bits == 8:
        term = h[h_offset + k] * w[k, j].astype("float32")
        first = k
    else:
        term = h[h_offset + 2 * k] * _nibble(w[k, j], 0) + h[h_offset + 2 * k + 1] * _nibble(w[k, j], 4)
        first = 2 * k
    return term if q.per_channel else term * s[first // q.group, j]


def _gpu_term(q: QuantSpec, h, w, s, k, j):
    """Step `k` (one state feature) of a CUDA thread's dot product for gate column `j`."""
    from .quant_kernels import _nibble

    value = w[k, j].astype("float32") if q.bits == 8 else _nibble(w[k // 2, j], (k % 2) * 4)
    return h[k] * (value if q.per_channel else value * s[k // q.group, j])


def _column_scale(q: QuantSpec, s, j, dtype):
    return s[0, j] if q.per_channel else tvm.tirx.const(1.0, dtype)


def lstm_scan_q_kernel(shape: ScanShape, q: QuantSpec) -> tvm.tirx.PrimFunc:
    """lstm_scan_kernel with the quantized W_hh dequantized in registers (see above)."""
    H, K, col, dt, RB = shape.hidden, shape.xproj_width, shape.column, shape.dtype, shape.rows_per_group
    G = 4 * H
    CH = _chunk(G, GATE_CHUNK * 2 // RB)
    HC = _chunk(H)
    KR, NG, WD = q.rows, q.groups, q.dtype
    dims, row, time_index = _indexing(shape)
    groups = T.parallel if shape.parallel else T.serial

    @T.prim_func(private=True)
    def lstm_scan_q(xp_h: T.handle, w_h: T.handle, s_h: T.handle, h0_h: T.handle, c0_h: T.handle, out_h: T.handle,
                    hn_h: T.handle, cn_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        n = T.int64()
        b = T.int64()
        xp3 = T.match_buffer(xp_h, dims(n, b, K), dt)
        w = T.match_buffer(w_h, (KR, G), WD)
        s = T.match_buffer(s_h, (NG, G), dt)
        h0 = T.match_buffer(h0_h, (b, H), dt)
        c0 = T.match_buffer(c0_h, (b, H), dt)
        out3 = T.match_buffer(out_h, dims(n, b, H), dt)
        hn = T.match_buffer(hn_h, (b, H), dt)
        cn = T.match_buffer(cn_h, (b, H), dt)
        xp = T.decl_buffer((n * b * K,), dt, data=xp3.data)
        out = T.decl_buffer((n * b * H,), dt, data=out3.data)
        for g in groups(b // RB):
            h = T.decl_buffer((RB * H + 1,), dt)  # one zero more: the odd feature of an int4 pair
            c = T.decl_buffer((RB * H,), dt)
            acc = T.decl_buffer((RB * G,), dt)
            h[RB * H] = T.float32(0)
            for r, j in T.grid(RB, H):
                h[r * H + j] = h0[g * RB + r, j]
                c[r * H + j] = c0[g * RB + r, j]
            for t in range(n):
                ti = time_index(t, n)
                for jo in range(G // CH):
                    part = T.decl_buffer((RB * CH,), dt)
                    for r in T.unroll(RB):
                        for ji in T.vectorized(CH):
                            part[r * CH + ji] = T.float32(0)
                    for k in range(KR):
                        for r in T.unroll(RB):  # each W_hh chunk is loaded (and converted) once for the RB rows
                            for ji in T.vectorized(CH):
                                part[r * CH + ji] = part[r * CH + ji] + _cpu_term(q, h, r * H, w, s, k, jo * CH + ji)
                    for r in T.unroll(RB):
                        for ji in T.vectorized(CH):
                            acc[r * G + jo * CH + ji] = (xp[row(ti, g * RB + r, n, b) * K + col + jo * CH + ji]
                                                         + part[r * CH + ji] * _column_scale(q, s, jo * CH + ji, dt))
                for r, jo in T.grid(RB, H // HC):
                    for ji in T.vectorized(HC):
                        c[r * H + jo * HC + ji] = (
                            fast_sigmoid(acc[r * G + H + jo * HC + ji]) * c[r * H + jo * HC + ji]
                            + fast_sigmoid(acc[r * G + jo * HC + ji]) * fast_tanh(acc[r * G + 2 * H + jo * HC + ji]))
                        h[r * H + jo * HC + ji] = (fast_sigmoid(acc[r * G + 3 * H + jo * HC + ji])
                                                   * fast_tanh(c[r * H + jo * HC + ji]))
                        out[row(ti, g * RB + r, n, b) * H + jo * HC + ji] = h[r * H + jo * HC + ji]
            for r, j in T.grid(RB, H):
                hn[g * RB + r, j] = h[r * H + j]
                cn[g * RB + r, j] = c[r * H + j]

    return lstm_scan_q


def gru_scan_q_kernel(shape: ScanShape, q: QuantSpec) -> tvm.tirx.PrimFunc:
    """gru_scan_kernel with the quantized W_hh dequantized in registers (see above)."""
    H, K, col, dt, RB = shape.hidden, shape.xproj_width, shape.column, shape.dtype, shape.rows_per_group
    G = 3 * H
    CH = _chunk(G, GATE_CHUNK * 2 // RB)
    HC = _chunk(H)
    KR, NG, WD = q.rows, q.groups, q.dtype
    dims, row, time_index = _indexing(shape)
    groups = T.parallel if shape.parallel else T.serial

    @T.prim_func(private=True)
    def gru_scan_q(xp_h: T.handle, w_h: T.handle, s_h: T.handle, bhn_h: T.handle, h0_h: T.handle, out_h: T.handle,
                   hn_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        n = T.int64()
        b = T.int64()
        xp3 = T.match_buffer(xp_h, dims(n, b, K), dt)
        w = T.match_buffer(w_h, (KR, G), WD)
        s = T.match_buffer(s_h, (NG, G), dt)
        bhn = T.match_buffer(bhn_h, (H,), dt)
        h0 = T.match_buffer(h0_h, (b, H), dt)
        out3 = T.match_buffer(out_h, dims(n, b, H), dt)
        hn = T.match_buffer(hn_h, (b, H), dt)
        xp = T.decl_buffer((n * b * K,), dt, data=xp3.data)
        out = T.decl_buffer((n * b * H,), dt, data=out3.data)
        for g in groups(b // RB):
            h = T.decl_buffer((RB * H + 1,), dt)
            acc = T.decl_buffer((RB * G,), dt)
            h[RB * H] = T.float32(0)
            for r, j in T.grid(RB, H):
                h[r * H + j] = h0[g * RB + r, j]
            for t in range(n):
                ti = time_index(t, n)
                for jo in range(G // CH):
                    part = T.decl_buffer((RB * CH,), dt)
                    for r in T.unroll(RB):
                        for ji in T.vectorized(CH):
                            part[r * CH + ji] = T.float32(0)
                    for k in range(KR):
                        for r in T.unroll(RB):
                            for ji in T.vectorized(CH):
                                part[r * CH + ji] = part[r * CH + ji] + _cpu_term(q, h, r * H, w, s, k, jo * CH + ji)
                    for r in T.unroll(RB):
                        for ji in T.vectorized(CH):
                            acc[r * G + jo * CH + ji] = part[r * CH + ji] * _column_scale(q, s, jo * CH + ji, dt)
                for r, jo in T.grid(RB, H // HC):
                    for ji in T.vectorized(HC):
                        h[r * H + jo * HC + ji] = _gru_update(
                            xp, row(ti, g * RB + r, n, b) * K + col, acc, bhn, h, jo * HC + ji, H, dt,
                            acc_offset=r * G, h_offset=r * H)
                        out[row(ti, g * RB + r, n, b) * H + jo * HC + ji] = h[r * H + jo * HC + ji]
            for r, j in T.grid(RB, H):
                hn[g * RB + r, j] = h[r * H + j]

    return gru_scan_q


def lstm_scan_q_kernel_cuda(shape: ScanShape, q: QuantSpec) -> tvm.tirx.PrimFunc:
    """lstm_scan_kernel_cuda with the quantized W_hh: each thread converts its column's integers
    (int8, or the int4 nibble of the state feature) in registers."""
    H, K, col, dt = shape.hidden, shape.xproj_width, shape.column, shape.dtype
    G = 4 * H
    NT = _gpu_threads(G)
    KR, NG, WD = q.rows, q.groups, q.dtype
    dims, row, time_index = _indexing(shape)

    @T.prim_func(private=True)
    def lstm_scan_q(xp_h: T.handle, w_h: T.handle, s_h: T.handle, h0_h: T.handle, c0_h: T.handle, out_h: T.handle,
                    hn_h: T.handle, cn_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        n = T.int64()
        b = T.int64()
        xp3 = T.match_buffer(xp_h, dims(n, b, K), dt)
        w = T.match_buffer(w_h, (KR, G), WD)
        s = T.match_buffer(s_h, (NG, G), dt)
        h0 = T.match_buffer(h0_h, (b, H), dt)
        c0 = T.match_buffer(c0_h, (b, H), dt)
        out3 = T.match_buffer(out_h, dims(n, b, H), dt)
        hn = T.match_buffer(hn_h, (b, H), dt)
        cn = T.match_buffer(cn_h, (b, H), dt)
        xp = T.decl_buffer((n * b * K,), dt, data=xp3.data)
        out = T.decl_buffer((n * b * H,), dt, data=out3.data)
        bi = T.launch_thread("blockIdx.x", b)
        tx = T.launch_thread("threadIdx.x", NT)
        h = T.decl_buffer((H,), dt, scope="shared")
        c = T.decl_buffer((H,), dt, scope="shared")
        acc = T.decl_buffer((G,), dt, scope="shared")
        sm = T.decl_buffer((1,), dt, scope="local")
        for jo in range((H + NT - 1) // NT):
            if jo * NT + tx < H:
                h[jo * NT + tx] = h0[bi, jo * NT + tx]
                c[jo * NT + tx] = c0[bi, jo * NT + tx]
        T.tvm_storage_sync("shared")
        for t in range(n):
            ti = time_index(t, n)
            for jo in range((G + NT - 1) // NT):
                if jo * NT + tx < G:
                    sm[0] = T.float32(0)
                    for k in range(H):
                        sm[0] = sm[0] + _gpu_term(q, h, w, s, k, jo * NT + tx)
                    acc[jo * NT + tx] = (xp[row(ti, bi, n, b) * K + col + jo * NT + tx]
                                         + sm[0] * _column_scale(q, s, jo * NT + tx, dt))
            T.tvm_storage_sync("shared")
            for jo in range((H + NT - 1) // NT):
                if jo * NT + tx < H:
                    c[jo * NT + tx] = (T.sigmoid(acc[H + jo * NT + tx]) * c[jo * NT + tx]
                                       + T.sigmoid(acc[jo * NT + tx]) * T.tanh(acc[2 * H + jo * NT + tx]))
                    h[jo * NT + tx] = T.sigmoid(acc[3 * H + jo * NT + tx]) * T.tanh(c[jo * NT + tx])
                    out[row(ti, bi, n, b) * H + jo * NT + tx] = h[jo * NT + tx]
            T.tvm_storage_sync("shared")
        for jo in range((H + NT - 1) // NT):
            if jo * NT + tx < H:
                hn[bi, jo * NT + tx] = h[jo * NT + tx]
                cn[bi, jo * NT + tx] = c[jo * NT + tx]

    return lstm_scan_q


def gru_scan_q_kernel_cuda(shape: ScanShape, q: QuantSpec) -> tvm.tirx.PrimFunc:
    """gru_scan_kernel_cuda with the quantized W_hh (see lstm_scan_q_kernel_cuda)."""
    H, K, col, dt = shape.hidden, shape.xproj_width, shape.column, shape.dtype
    G = 3 * H
    NT = _gpu_threads(G)
    KR, NG, WD = q.rows, q.groups, q.dtype
    dims, row, time_index = _indexing(shape)

    @T.prim_func(private=True)
    def gru_scan_q(xp_h: T.handle, w_h: T.handle, s_h: T.handle, bhn_h: T.handle, h0_h: T.handle, out_h: T.handle,
                   hn_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        n = T.int64()
        b = T.int64()
        xp3 = T.match_buffer(xp_h, dims(n, b, K), dt)
        w = T.match_buffer(w_h, (KR, G), WD)
        s = T.match_buffer(s_h, (NG, G), dt)
        bhn = T.match_buffer(bhn_h, (H,), dt)
        h0 = T.match_buffer(h0_h, (b, H), dt)
        out3 = T.match_buffer(out_h, dims(n, b, H), dt)
        hn = T.match_buffer(hn_h, (b, H), dt)
        xp = T.decl_buffer((n * b * K,), dt, data=xp3.data)
        out = T.decl_buffer((n * b * H,), dt, data=out3.data)
        bi = T.launch_thread("blockIdx.x", b)
        tx = T.launch_thread("threadIdx.x", NT)
        h = T.decl_buffer((H,), dt, scope="shared")
        acc = T.decl_buffer((G,), dt, scope="shared")
        sm = T.decl_buffer((1,), dt, scope="local")
        for jo in range((H + NT - 1) // NT):
            if jo * NT + tx < H:
                h[jo * NT + tx] = h0[bi, jo * NT + tx]
        T.tvm_storage_sync("shared")
        for t in range(n):
            ti = time_index(t, n)
            for jo in range((G + NT - 1) // NT):
                if jo * NT + tx < G:
                    sm[0] = T.float32(0)
                    for k in range(H):
                        sm[0] = sm[0] + _gpu_term(q, h, w, s, k, jo * NT + tx)
                    acc[jo * NT + tx] = sm[0] * _column_scale(q, s, jo * NT + tx, dt)
            T.tvm_storage_sync("shared")
            for jo in range((H + NT - 1) // NT):
                if jo * NT + tx < H:
                    h[jo * NT + tx] = _gru_update(xp, row(ti, bi, n, b) * K + col, acc, bhn, h, jo * NT + tx, H, dt,
                                                  T.sigmoid, T.tanh)
                    out[row(ti, bi, n, b) * H + jo * NT + tx] = h[jo * NT + tx]
            T.tvm_storage_sync("shared")
        for jo in range((H + NT - 1) // NT):
            if jo * NT + tx < H:
                hn[bi, jo * NT + tx] = h[jo * NT + tx]

    return gru_scan_q


# -- converters ---------------------------------------------------------------------------------

def _static_int(value) -> int | None:
    return int(value) if isinstance(value, (int, tvm.tirx.IntImm)) else None


def _target_kind() -> str:
    target = tvm.target.Target.current(allow_none=True)
    return "llvm" if target is None else target.kind.name


def _scan_shape(node: fx.Node, importer, gates: int) -> ScanShape:
    if _target_kind() not in KERNELS:
        raise LoweringError(f"%{node.name}: {node.target} has kernels for {', '.join(KERNELS)}, not {_target_kind()}")
    xproj = importer.env[node.args[0]]
    dtype = xproj.ty.dtype
    if dtype != "float32":
        raise LoweringError(f"%{node.name}: the {node.target} kernel is float32 only, got {dtype}")
    reverse, column, batch_first = node.args[-3:]
    d0, d1, width = xproj.ty.shape.values
    hidden = node.meta["val"][1].shape[-1]
    steps, batch = (d1, d0) if batch_first else (d0, d1)
    steps, batch = _static_int(steps), _static_int(batch)
    # A symbolic sequence length counts as long; a symbolic batch stays serial.
    macs = None if steps is None or batch is None else steps * batch * gates * hidden * hidden
    parallel = (_target_kind() == "llvm" and batch is not None and batch > 1
                and (macs is None or macs >= PARALLEL_MIN_MACS))
    return ScanShape(int(hidden), gates, int(width), int(column), bool(reverse), bool(batch_first), parallel,
                     _rows_per_group(batch) if _target_kind() == "llvm" else 1, dtype)


def _rows_per_group(batch: int | None) -> int:
    """Rows per group: 4 or 2 where that divides the batch and leaves a group per thread."""
    for rows in (4, 2):
        if batch is not None and batch % rows == 0 and batch // rows >= 2:
            return rows
    return 1


def _emit_scan(node: fx.Node, importer, cell: str, shape: ScanShape, operands: list, n_states: int,
               quant: QuantSpec | None = None):
    builder = importer.block_builder
    kernel = KERNELS[_target_kind()][cell]
    if quant is not None:
        kernel = functools.partial(kernel, q=quant)
    xproj = operands[0]
    d0, d1, _ = xproj.ty.shape.values
    state = operands[-1].ty
    out_types = [relax.TensorType((d0, d1, shape.hidden), shape.dtype)]
    out_types += [relax.TensorType(state.shape, shape.dtype)] * n_states
    func = builder.add_func(kernel(shape), f"orca_{node.target._overloadpacket.__name__}")
    return builder.emit(relax.call_tir(func, operands, out_types))


def convert_lstm_scan(node: fx.Node, importer):
    """orca::lstm_scan -> call_tir of lstm_scan_kernel (outputs out, h_n, c_n)."""
    shape = _scan_shape(node, importer, 4)
    operands = [importer.env[a] for a in node.args[:4]]
    return _emit_scan(node, importer, "lstm", shape, operands, 2)


def convert_gru_scan(node: fx.Node, importer):
    """orca::gru_scan -> call_tir of gru_scan_kernel (outputs out, h_n)."""
    shape = _scan_shape(node, importer, 3)
    operands = [importer.env[a] for a in node.args[:4]]
    return _emit_scan(node, importer, "gru", shape, operands, 1)


def _quantized_operands(node: fx.Node, importer, spec: QuantSpec) -> list:
    """The transposed integer W_hh (`[rows, G]`) and scales (`[groups, G]`) as Relax constants."""
    from .quant_kernels import _const

    qweight = _const(importer, node.args[1], "recurrent weight").t().contiguous()
    scales = _const(importer, node.args[2], "recurrent weight's scale").t().contiguous()
    if tuple(qweight.shape) != (spec.rows, node.args[1].meta["val"].shape[0]) or scales.shape[0] != spec.groups:
        raise LoweringError(f"%{node.name}: W_hh {list(qweight.shape)} / scales {list(scales.shape)} do not match "
                            f"{spec.bits}-bit groups of {spec.group} over {spec.hidden} state features")
    return [relax.const(qweight.numpy()), relax.const(scales.numpy())]


def convert_lstm_scan_q(node: fx.Node, importer):
    """orca::lstm_scan_q -> call_tir of lstm_scan_q_kernel (the integer W_hh stays integer)."""
    shape = _scan_shape(node, importer, 4)
    xproj, _, _, h0, c0, bits, group = node.args[:7]
    spec = QuantSpec(int(bits), int(group), shape.hidden)
    operands = [importer.env[xproj], *_quantized_operands(node, importer, spec), importer.env[h0], importer.env[c0]]
    return _emit_scan(node, importer, "lstm_q", shape, operands, 2, spec)


def convert_gru_scan_q(node: fx.Node, importer):
    """orca::gru_scan_q -> call_tir of gru_scan_q_kernel (the integer W_hh stays integer)."""
    shape = _scan_shape(node, importer, 3)
    xproj, _, _, b_hn, h0, bits, group = node.args[:7]
    spec = QuantSpec(int(bits), int(group), shape.hidden)
    operands = [importer.env[xproj], *_quantized_operands(node, importer, spec), importer.env[b_hn], importer.env[h0]]
    return _emit_scan(node, importer, "gru_q", shape, operands, 1, spec)


# target kind -> cell -> kernel generator
KERNELS = {
    "llvm": {"lstm": lstm_scan_kernel, "gru": gru_scan_kernel, "lstm_q": lstm_scan_q_kernel, "gru_q": gru_scan_q_kernel},
    "cuda": {"lstm": lstm_scan_kernel_cuda, "gru": gru_scan_kernel_cuda, "lstm_q": lstm_scan_q_kernel_cuda,
             "gru_q": gru_scan_q_kernel_cuda},
}

register_converter(LSTM_SCAN, convert_lstm_scan)
register_converter(GRU_SCAN, convert_gru_scan)
register_converter(LSTM_SCAN_Q, convert_lstm_scan_q)
register_converter(GRU_SCAN_Q, convert_gru_scan_q)
