"""The orca pass library: one module per pass family. Importing this package registers them all."""
from . import cast, cleanup, fold_bn, fold_constants, fuse, low_rank, placement, prune_channels, prune_sparse, quantize, rnn  # noqa: F401
