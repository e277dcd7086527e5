"""The checkpoints a long-running process (the dashboard's server) has open, and its users' what-if sessions.

One `Opened` per checkpoint content (sha256): its `ModelRuntime` (and through it the `Workspace`) is shared by every
user who opens the same content. Both caches are bounded and least-recently-used: at most `capacity` checkpoints and
`session_capacity` what-if sessions are kept. An evicted checkpoint is dropped from every index here (sessions made
from it included), so nothing here keeps its memory alive; `path` lets a user's choice reopen it.
"""
from __future__ import annotations

import gc
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from spectral.checkpoint import DEMO_DIR, Checkpoint, load_checkpoint
from spectral.devices import CPU, Device
from spectral.heap import release_freed_memory
from spectral.runtime import BatchSpec, ModelRuntime
from spectral.whatif import WhatIfSession
from spectral.workspace import Workspace


@dataclass(eq=False)
class Opened:
    """One open checkpoint: its runtime (shared, read-only to users) and how it was opened."""

    runtime: ModelRuntime
    label: str  # what the sidebar and figure titles call it
    origin: str  # "demo" | "upload" | "server" | "gallery"
    path: str | None = None  # "demo" or a path on the server: enough to reopen it after eviction
    opened: float = field(default_factory=time.time)

    @property
    def sha256(self) -> str:
        return self.runtime.workspace.checkpoint.sha256

    @property
    def workspace(self) -> Workspace:
        return self.runtime.workspace

    @property
    def checkpoint(self) -> Checkpoint:
        return self.runtime.workspace.checkpoint


def file_stamp(path: str) -> tuple:
    """(path, (name, size, mtime) of each file): equal stamps mean the content was hashed already."""
    target = DEMO_DIR if path == "demo" else Path(path)
    try:
        files = [target] if target.is_file() else sorted(p for p in target.iterdir() if p.is_file())
        return (path, tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    except OSError:
        return (path, None)


class Library:
    """Bounded LRU of open checkpoints by content, a path index so a server file is hashed once, and a bounded LRU
    of what-if sessions by (owner, content, model generation, evaluation batch). Thread-safe."""

    def __init__(self, capacity: int = 4, session_capacity: int = 6, *, mapper=None, device: Device = CPU,
                 compute_note: str = ""):
        """`mapper` (a RayMap) computes every checkpoint's spectra, `device` holds models and local spectra;
        `compute_note` says where the work goes (the Overview card shows it)."""
        self.mapper, self.device = mapper, device
        self.compute_note = compute_note or f"this server, {device.describe()}"
        self.capacity = max(1, capacity)
        self.session_capacity = max(1, session_capacity)
        self._items: OrderedDict[str, Opened] = OrderedDict()
        self._paths: dict[tuple, str] = {}
        self._sessions: OrderedDict[tuple, WhatIfSession] = OrderedDict()
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, sha256: str) -> Opened | None:
        with self._lock:
            item = self._items.get(sha256)
            if item is not None:
                self._items.move_to_end(sha256)
            return item

    def put(self, opened: Opened) -> Opened:
        """Add (or return the already open object with the same content); evicts the least recently used."""
        with self._lock:
            existing = self._items.get(opened.sha256)
            if existing is not None:
                self._items.move_to_end(opened.sha256)
                return existing
            self._items[opened.sha256] = opened
            evicted = False
            while len(self._items) > self.capacity:
                old, _ = self._items.popitem(last=False)
                self._paths = {k: v for k, v in self._paths.items() if v != old}
                self._sessions = OrderedDict((k, v) for k, v in self._sessions.items() if k[1] != old)
                evicted = True
        if evicted:  # what the evicted checkpoint held in reference cycles is freed now, not at Python's next full
            gc.collect()  # collection (the server runs none after each script: .streamlit/config.toml), and
            release_freed_memory()  # handed back to the system (spectral/heap.py)
        return opened

    def open_checkpoint(self, checkpoint: Checkpoint, label: str, origin: str, path: str | None = None) -> Opened:
        """A loaded checkpoint as an `Opened` (the one already open when its content is known)."""
        found = self.get(checkpoint.sha256)
        if found is not None:
            return found
        workspace = Workspace(checkpoint, mapper=self.mapper, device=self.device)
        return self.put(Opened(ModelRuntime(workspace, device=self.device), label, origin, path))

    def open_path(self, path: str, label: str, origin: str,
                  loader: Callable[[str], Checkpoint] = load_checkpoint) -> Opened:
        """Open "demo" or a path with `loader` (CheckpointError propagates), reusing what is open while the files
        are unchanged."""
        stamp = file_stamp(path)
        with self._lock:
            sha = self._paths.get(stamp)
            if sha is not None and (item := self.get(sha)) is not None:
                return item
        opened = self.open_checkpoint(loader(path), label, origin, path)
        with self._lock:
            if opened.sha256 in self._items:
                self._paths[stamp] = opened.sha256
        return opened

    def session(self, owner: str, opened: Opened, spec: BatchSpec = BatchSpec()) -> WhatIfSession:
        """`owner`'s what-if session on this checkpoint and evaluation batch, made once (`NotRunnable` without a
        forward pass, `EvaluationError` for a text that cannot make a batch)."""
        key = (owner, opened.sha256, opened.runtime.generation, spec.key)
        with self._lock:
            found = self._sessions.get(key)
            if found is not None:
                self._sessions.move_to_end(key)
                return found
        session = WhatIfSession(opened.runtime, spec)
        with self._lock:
            if opened.sha256 in self._items:
                self._sessions[key] = session
                while len(self._sessions) > self.session_capacity:
                    self._sessions.popitem(last=False)
        return session
