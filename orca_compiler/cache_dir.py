"""Where orca keeps what it learns between processes (kernel selections, tuning records)."""
from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "ORCA_CACHE_DIR"


def cache_dir() -> Path:
    """`$ORCA_CACHE_DIR`, else `$XDG_CACHE_HOME/orca_compiler`, else `~/.cache/orca_compiler`.

    The folder is created on first use.
    """
    root = os.environ.get(ENV_VAR)
    if root:
        path = Path(root)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "orca_compiler"
    path.mkdir(parents=True, exist_ok=True)
    return path
