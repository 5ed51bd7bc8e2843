"""The on-disk kernel selection cache: which candidate won for (op, shapes, dtypes), per target.

One JSON file per (target, thread count, versions of orca (with a hash of its kernel code)/torch/
tvm): the file name is a hash of
that header and the header is stored in the file too. A file that does not parse, or whose header
differs from ours (copied from another machine, other versions), is not trusted: it is discarded
and rebuilt, and `rebuilt_because` says why. Writes are atomic (temp file + rename), so a killed
compile never leaves a half-written file.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from ..cache_dir import cache_dir

log = logging.getLogger(__name__)

FORMAT = 1


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """A hash of the source of the package's kernels and their converters (lowering/ and ops/).

    A choice depends on the code that builds each candidate, not only on the version number: a
    converter fixed between two builds of one version must not stay "rejected" in the cache."""
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted([*package.glob("lowering/*.py"), *package.glob("ops/*.py")]):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _versions() -> dict:
    import tvm

    from .. import __version__

    return {"orca": f"{__version__}+{code_digest()}", "torch": torch.__version__, "tvm": tvm.__version__}


def selection_header(target_key: str) -> dict:
    """What a cached selection depends on: the target, the thread count and the versions."""
    return {"format": FORMAT, "target": target_key, "threads": torch.get_num_threads(), **_versions()}


class SelectionCache:
    """Kernel choices keyed by a selection key (see kernel_select.selection_key)."""

    def __init__(self, target_key: str, directory: Path | None = None):
        self.header = selection_header(target_key)
        digest = hashlib.sha256(json.dumps(self.header, sort_keys=True).encode()).hexdigest()[:16]
        self.path = Path(directory or cache_dir()) / f"kernel-selection-{digest}.json"
        self.entries: dict[str, dict] = {}
        self.rebuilt_because: str | None = None
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
                raise ValueError("not a selection cache file")
        except (OSError, ValueError) as exc:
            self._discard(f"unreadable ({type(exc).__name__}: {str(exc)[:80]})")
            return
        if data.get("header") != self.header:
            self._discard(f"stale (its header {data.get('header')} differs from {self.header})")
            return
        self.entries = data["entries"]

    def _discard(self, reason: str) -> None:
        self.rebuilt_because = reason
        log.warning("kernel selection cache %s is %s; rebuilding it", self.path, reason)

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, record: dict) -> None:
        self.entries[key] = record

    def save(self) -> None:
        """Write the cache atomically."""
        payload = json.dumps({"header": self.header, "entries": self.entries}, indent=1, sort_keys=True)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name, dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(payload)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
