"""Our own torch ops (torch.library, namespace `orca`), created by passes and lowered by the
lowering's converters.

Each op has an eager implementation in PyTorch (so the IR still runs in torch: for numerics,
debugging and eager fallback) and a fake implementation (shapes and dtypes for the IR). The
passes import the op modules they create nodes of; the lowering registers a Relax converter for
each op (see orca_compiler.lowering.support.register_converter).
"""
