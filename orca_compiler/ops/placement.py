"""Weight streaming ops (created by `place-memory`): bring a weight from the slow tier into the
fast-tier pool ahead of its use, hand it to its users, and give its bytes back after.

- `orca::prefetch(weight, deps, pool_bytes) -> token`: start copying `weight` (homed on the slow
  tier) into the pool on a background thread.
- `orca::fetch(weight, deps, pool_bytes) -> tensor`: the pool-resident copy; waits for the
  prefetch, or copies right now where there was none (policy=naive).
- `orca::release(fetched, deps) -> token`: the copy's bytes go back to the pool.

`deps` orders the ops without a data flow of their own: every placement op takes the previous
one's result (one chain through all of them, so a prefetch never runs before the release that
makes room for it), and a release also takes a result of its weight's last user (so it cannot be
scheduled before that user). `pool_bytes` is the pool's capacity, kept in the IR so that a saved
program brings it along. All three are side-effecting for fx: dead-code elimination keeps them.

Activations leave the fast tier across an idle gap (place-memory's `activation_budget`):
- `orca::spill(x) -> tensor`: `x` copied to the slow tier, right after its last read before the
  gap; the result is that copy (a memory-mapped file's bytes on CPU), and `x` is dead after it;
- `orca::reload(spilled) -> tensor`: a fast-tier copy of it again, right before the next read.
Their eager implementations are copies.

The eager implementations here give the IR its meaning in plain PyTorch (ir.run, numerics
checks): fetch is a copy, the others do nothing. The compiled program runs them against a
bounded pool (orca_compiler/lowering/streaming.py): on CPU as external calls from inside the TVM
program, on CUDA on the host between TVM partitions.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _token(like: Tensor) -> Tensor:
    return torch.empty(0, dtype=torch.uint8, device=like.device)


@torch.library.custom_op("orca::prefetch", mutates_args=())
def prefetch(weight: Tensor, deps: list[Tensor], pool_bytes: int) -> Tensor:
    return _token(weight)


@torch.library.custom_op("orca::fetch", mutates_args=())
def fetch(weight: Tensor, deps: list[Tensor], pool_bytes: int) -> Tensor:
    return weight.clone(memory_format=torch.contiguous_format)


@torch.library.custom_op("orca::release", mutates_args=())
def release(fetched: Tensor, deps: list[Tensor]) -> Tensor:
    return _token(fetched)


@torch.library.custom_op("orca::spill", mutates_args=())
def spill(x: Tensor) -> Tensor:
    return x.clone(memory_format=torch.contiguous_format)


@torch.library.custom_op("orca::reload", mutates_args=())
def reload(spilled: Tensor) -> Tensor:
    return spilled.clone(memory_format=torch.contiguous_format)


spill.register_fake(lambda x: x.new_empty(x.shape))
reload.register_fake(lambda spilled: spilled.new_empty(spilled.shape))
prefetch.register_fake(lambda weight, deps, pool_bytes: _token(weight))
fetch.register_fake(lambda weight, deps, pool_bytes: weight.new_empty(weight.shape))
release.register_fake(lambda fetched, deps: _token(fetched))

PREFETCH = torch.ops.orca.prefetch.default
FETCH = torch.ops.orca.fetch.default
RELEASE = torch.ops.orca.release.default
PLACEMENT_OPS = frozenset({PREFETCH, FETCH, RELEASE})
SPILL = torch.ops.orca.spill.default
RELOAD = torch.ops.orca.reload.default
SPILL_OPS = frozenset({SPILL, RELOAD})

for _op in PLACEMENT_OPS:
    torch.fx.node.has_side_effect(_op)
