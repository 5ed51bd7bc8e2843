"""The machine's limits and a model's work, for the benchmark: GEMM peak, memory bandwidth, FLOPs, weight bytes.

Achieved GFLOP/s (forward FLOPs / latency) against the GEMM peak says how far a backend is from
the compute limit; at batch 1 a forward reads every weight once, so weight bytes / latency against
the bandwidth says how far it is from the memory limit.
"""
from __future__ import annotations

import time
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: page faults, thread pool start, kernel selection
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def peak_gemm(sizes=(1024, 1536, 2048), repeats: int = 5) -> dict:
    """Peak fp32 GFLOP/s of torch.mm (a tuned BLAS) on square matrices with torch's thread count.

    The best time of `repeats` per size and the best size: a peak is a maximum, and other
    processes on a shared machine only ever make a run slower.
    """
    best = {"gflops": 0.0, "n": 0, "repeats": repeats}
    for n in sizes:
        a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
        gflops = 2 * n**3 / _best_seconds(lambda: torch.mm(a, b, out=c), repeats) / 1e9
        if gflops > best["gflops"]:
            best = {"gflops": gflops, "n": n, "repeats": repeats}
    return best


def memory_bandwidth(megabytes: int = 256, repeats: int = 5) -> dict:
    """DRAM bandwidth in GB/s from a copy and a sum of a `megabytes` fp32 tensor (far beyond L3).

    A copy reads and writes the tensor (2x its bytes; the write-allocate read is not counted, as
    in STREAM); a sum only reads it. `gbs` is the better of the two.
    """
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    nbytes = src.nbytes
    copy = 2 * nbytes / _best_seconds(lambda: dst.copy_(src), repeats) / 1e9
    read = nbytes / _best_seconds(lambda: src.sum(), repeats) / 1e9
    return {"gbs": max(copy, read), "copy_gbs": copy, "read_gbs": read, "megabytes": megabytes, "repeats": repeats}


def machine_limits() -> dict:
    """Both microbenchmarks: {"gemm": peak_gemm(), "bandwidth": memory_bandwidth()}."""
    return {"gemm": peak_gemm(), "bandwidth": memory_bandwidth()}


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode formula for CPU flash attention: that of scaled_dot_product_attention."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def forward_flops(model: torch.nn.Module, inputs: tuple) -> int:
    """FLOPs of one forward (2 per multiply-add of matmul, conv and attention), as FlopCounterMode counts them."""
    # The counter only sees the aten ops it has formulas for. With grad disabled,
    # nn.TransformerEncoder runs one fused kernel and LSTM runs oneDNN's mkldnn_rnn_layer, both
    # opaque to it; with grad enabled and oneDNN off they run as counted matmuls. CPU attention
    # is a kernel the counter does not list, so it gets the generic attention formula.
    counter = FlopCounterMode(display=False,
                              custom_mapping={torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops})
    with warnings.catch_warnings(), torch.enable_grad():
        warnings.simplefilter("ignore")  # mkldnn.flags warns about TF32 on Intel GPUs
        with torch.backends.mkldnn.flags(enabled=False), counter:
            model(*inputs)
    return counter.get_total_flops()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers: what a batch-1 forward must read from memory at least once."""
    return sum(t.nbytes for t in list(model.parameters()) + list(model.buffers()))
