"""One thread budget for TVM's pool and torch's: both use `torch.get_num_threads()` threads.

TVM 0.27 sizes its pool from TVM_NUM_THREADS, else from the hardware threads halved on x86 (it
assumes hyper-threading): on a 2-core machine every TVM kernel ran on one thread. We set
TVM_NUM_THREADS before TVM's pool starts (the first VM call), unless the user set it. Torch's
kernels (the extern kernels) and TVM's run one after the other in one VM call, never at the same
time, so the two pools of the same size do not oversubscribe the cores. TVM also pins its
threads, the calling thread included, to cores; torch's OpenMP threads then queue behind it (the
eager MLP ran 24 ms instead of 0.85 ms in the same process), so we set TVM_BIND_THREADS=0 too.
And TVM's workers spin after a parallel kernel (300000 rounds by default) while the next torch
kernel wants the cores: a torch conv followed by a TVM depthwise conv took 4.7-7.6 ms per pair
spinning, 1.5 ms with TVM_THREAD_POOL_SPIN_COUNT=0, which we set as well (a lone TVM kernel pays
for waking its workers instead).
"""
from __future__ import annotations

import os

import torch

_configured: int | None = None


def configure_tvm_threads() -> int:
    """Make TVM's pool as large as torch's thread count; returns TVM's pool size.

    Assumes it runs before the first TVM kernel does (the runtime and the kernel selection call
    it before creating a VirtualMachine). An explicit TVM_NUM_THREADS wins.
    """
    global _configured
    if _configured is None:
        os.environ.setdefault("TVM_NUM_THREADS", str(torch.get_num_threads()))
        os.environ.setdefault("TVM_BIND_THREADS", "0")
        os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
        _configured = int(os.environ["TVM_NUM_THREADS"])
    return _configured
