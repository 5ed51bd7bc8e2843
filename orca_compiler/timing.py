"""Latency measurement shared by the demo and the benchmark: interleaved, warmed up, median."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def time_interleaved(fns: dict[str, Callable[[], object]], *, repeats: int = 30, warmup: int = 3,
                     min_seconds: float = 0.0, block: int = 5, pause: float = 0.0) -> dict[str, float]:
    """Median seconds per call of each function, calling them round-robin so that machine noise
    hits all alike. Runs at least `repeats` rounds (and at least `min_seconds` in total).

    Each round calls each function `block` times in a row: runtimes whose worker threads spin
    after a call (onnxruntime, OpenMP, TVM's pool) would otherwise steal the cores from the next
    function's call; within a block only its first call pays for that, and the median drops it.
    `pause` seconds of sleep before each block let those threads go idle first (onnxruntime
    spins for a while after each run), so no function starts its block on a busy machine.
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        start = time.perf_counter()
        rounds = 0
        while rounds < repeats or time.perf_counter() - start < min_seconds:
            for name, fn in fns.items():
                if pause:
                    time.sleep(pause)
                for _ in range(block):
                    t0 = time.perf_counter()
                    fn()
                    samples[name].append(time.perf_counter() - t0)
            rounds += 1
    return {name: statistics.median(values) for name, values in samples.items()}
