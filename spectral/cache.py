"""A disk cache of per-matrix results that are slow to compute (truncation factors, spectra), keyed by checkpoint
content (sha256) and matrix name, so reopening a checkpoint skips them.

The folder is `$SPECTRA_CACHE`, else `~/.cache/spectra-explorer`; `SPECTRA_CACHE=off` disables it. One safetensors
file per entry, under a folder named by the checkpoint's sha256; written to a temporary name and renamed, so a reader
never sees half a file. Only this program writes there, and reading goes through safetensors (no pickle), so a
corrupted or foreign file can only fail to load: it is then ignored and recomputed.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

DEFAULT_FOLDER = Path.home() / ".cache" / "spectra-explorer"
OFF = ("off", "0", "none", "false")


def default_cache() -> DiskCache | None:
    """The cache `$SPECTRA_CACHE` names (or the default folder); None when it is switched off."""
    setting = os.environ.get("SPECTRA_CACHE", "").strip()
    if setting.lower() in OFF:
        return None
    return DiskCache(Path(setting).expanduser() if setting else DEFAULT_FOLDER)


def _entry_name(name: str, kind: str) -> str:
    """A file name for (matrix, kind): readable, and unique through a digest of the exact name."""
    digest = hashlib.sha256(f"{kind}\0{name}".encode()).hexdigest()[:12]
    return f"{kind}-{re.sub(r'[^A-Za-z0-9._-]+', '_', name)[:80]}-{digest}.safetensors"


class DiskCache:
    """Tensors per (checkpoint sha256, matrix name, kind) on disk."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, sha256: str, name: str, kind: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ValueError(f"not a sha256 digest: {sha256!r}")
        return self.folder / sha256 / _entry_name(name, kind)

    def load(self, sha256: str, name: str, kind: str) -> dict[str, torch.Tensor] | None:
        """The tensors stored for this entry, or None (absent, or unreadable: then it is removed)."""
        path = self.path(sha256, name, kind)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError):
            path.unlink(missing_ok=True)
            return None

    def save(self, sha256: str, name: str, kind: str, tensors: dict[str, torch.Tensor]) -> None:
        """Store the tensors (best effort: a full disk or a read-only folder only costs the cache)."""
        path = self.path(sha256, name, kind)
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            os.close(fd)
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
            os.replace(tmp, path)
        except OSError:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def size(self, sha256: str | None = None) -> int:
        """Bytes held (for one checkpoint, or in all)."""
        root = self.folder / sha256 if sha256 else self.folder
        if not root.is_dir():
            return 0
        return sum(p.stat().st_size for p in root.rglob("*.safetensors") if p.is_file())

    def clear(self, sha256: str | None = None) -> int:
        """Remove one checkpoint's entries (or everything); returns the bytes freed."""
        freed = self.size(sha256)
        root = self.folder / sha256 if sha256 else self.folder
        if root.is_dir():
            shutil.rmtree(root, ignore_errors=True)
        return freed
