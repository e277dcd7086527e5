"""A training run as a series: its checkpoints in step order, and every per-matrix metric against the step.

`find_checkpoints(folder)` reads a run's folder the way training scripts write them:
- Hugging Face Trainer: subfolders `checkpoint-N` (step N); when there are any, nothing else in the folder counts
  (the Trainer's top level holds the final model and `training_args.bin`, not points of the run);
- otherwise weight files (and model folders) whose step is known: nanoGPT's `iter_num` (saved beside the model in
  `ckpt.pt`), a `step` / `global_step` entry in the file's metadata (models/train_demo.py's snapshots), or else the
  last number in the file or folder name (`ckpt_2000.pt`, `step-000300.safetensors`). Entries with no step are
  left out, with a note.

`trajectory(folder, settings)` maps spectra over checkpoint × matrix: on the local workspace, or on a Ray cluster
(spectral/distributed.py's `RayMap.spectra_many`) when an address is given. Spectra are kept per process, keyed
by each file's path, size and modification time, so a re-run (or new settings) is arithmetic only, and on disk
(spectral/cache.py, by checkpoint sha256 and matrix name; `SPECTRA_CACHE=off` disables it), so a new process only
hashes the files.
Matrices are matched across checkpoints by name, as spectral/compare.py matches two checkpoints.
"""
from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from spectral.analysis import MatrixReport, Settings
from spectral.checkpoint import WEIGHT_SUFFIXES, Checkpoint, CheckpointError, load_checkpoint, open_in_folder
from spectral.compare import normalised
from spectral.distributed import Job, RayMap
from spectral.library import file_stamp
from spectral.matrices import MatrixInfo
from spectral.workspace import Workspace

Progress = Callable[[int, int, str], None]
CACHED_CHECKPOINTS = 256  # checkpoints whose spectra a process keeps (singular values only: small)
STEP_METADATA = ("iter_num", "step", "global_step")  # nanoGPT, our snapshots, Hugging Face trainer states
_HF_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_NUMBER = re.compile(r"(\d+)")
SERIES_METRICS = ("sigma", "n_signal", "energy_rank", "alpha", "stable_rank")


@dataclass(frozen=True)
class TrajectoryPoint:
    """One checkpoint of a run: where it is (relative to the run's folder), its step and where the step came from."""

    path: str
    step: int
    step_from: str  # "folder name" | "iter_num" | "step" | "global_step" | "file name"

    def to_dict(self) -> dict:
        return {"path": self.path, "step": self.step}


@dataclass
class MatrixSeries:
    """One matrix across the run: its metrics at each step where it was analysed (DESIGN.md units)."""

    name: str
    role: str
    rank: int  # min(shape): the full rank
    step: list[int] = field(default_factory=list)
    sigma: list[float] = field(default_factory=list)
    n_signal: list[int] = field(default_factory=list)
    energy_rank: list[int] = field(default_factory=list)
    alpha: list[float | None] = field(default_factory=list)
    stable_rank: list[float] = field(default_factory=list)

    def add(self, step: int, row: MatrixReport) -> None:
        self.step.append(step)
        for key in SERIES_METRICS:
            getattr(self, key).append(getattr(row, key))

    def to_dict(self) -> dict:
        d = {"name": self.name, "role": self.role, "step": list(self.step)}
        for key in SERIES_METRICS:
            d[key] = [_finite(v) for v in getattr(self, key)]
        return d


@dataclass
class RoleSeries:
    """Per role and step: signal and energy ranks summed over the role's matrices, and as % of their full rank."""

    role: str
    matrices: int
    step: list[int]
    n_signal: list[int]
    energy_rank: list[int]
    full_rank: list[int]

    @property
    def signal_pct(self) -> list[float]:
        return [100.0 * s / f for s, f in zip(self.n_signal, self.full_rank)]

    @property
    def energy_pct(self) -> list[float]:
        return [100.0 * e / f for e, f in zip(self.energy_rank, self.full_rank)]


@dataclass
class Trajectory:
    """`trajectory`'s result (the issue's `trajectory` JSON through `to_dict`), checkpoints sorted by step."""

    folder: str
    settings: Settings
    checkpoints: list[TrajectoryPoint]
    matrices: list[MatrixSeries]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    where: str = "local"  # "local" or the Ray cluster's description

    @property
    def steps(self) -> list[int]:
        return [p.step for p in self.checkpoints]

    def by_role(self) -> list[RoleSeries]:
        """One line per role: at each step, the sums over the role's matrices analysed at that step."""
        roles: dict[str, dict[int, list[int]]] = {}
        counts: dict[str, int] = {}
        for series in self.matrices:
            counts[series.role] = counts.get(series.role, 0) + 1
            per_step = roles.setdefault(series.role, {})
            for i, step in enumerate(series.step):
                acc = per_step.setdefault(step, [0, 0, 0])
                acc[0] += series.n_signal[i]
                acc[1] += series.energy_rank[i]
                acc[2] += series.rank
        out = []
        for role, per_step in roles.items():
            steps = sorted(per_step)
            out.append(RoleSeries(role, counts[role], steps, [per_step[s][0] for s in steps],
                                  [per_step[s][1] for s in steps], [per_step[s][2] for s in steps]))
        return out

    def to_dict(self) -> dict:
        return {"checkpoints": [p.to_dict() for p in self.checkpoints],
                "matrices": [m.to_dict() for m in self.matrices]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def _finite(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


# ------------------------------------------------------------------------------------------------- discovery

def step_from_name(name: str) -> int | None:
    """The last number in a file or folder name without its suffix ('ckpt_2000.pt' -> 2000), or None."""
    stem = name
    for suffix in WEIGHT_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    numbers = _NUMBER.findall(stem)
    return int(numbers[-1]) if numbers else None


def step_from_metadata(checkpoint: Checkpoint) -> tuple[int, str] | None:
    """(step, key) from the checkpoint's own record: nanoGPT's iter_num, or a step/global_step metadata entry."""
    for key in STEP_METADATA:
        text = checkpoint.metadata.get(key)
        if text is not None:
            try:
                value = float(text)
            except ValueError:
                continue
            if value >= 0 and value == int(value):
                return int(value), key
    return None


def _entries(folder: Path) -> tuple[list[Path], bool]:
    """(candidate checkpoints, Hugging Face Trainer layout?) in a run's folder, in name order."""
    hf = sorted((p for p in folder.iterdir() if p.is_dir() and _HF_CHECKPOINT.match(p.name)),
                key=lambda p: int(_HF_CHECKPOINT.match(p.name).group(1)))
    if hf:
        return hf, True
    found = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        weights = p.is_file() and p.name.lower().endswith(WEIGHT_SUFFIXES)
        model_folder = p.is_dir() and any(c.is_file() and c.name.lower().endswith(WEIGHT_SUFFIXES) for c in p.iterdir())
        if weights or model_folder:
            found.append(p)
    return found, False


# ------------------------------------------------------------------------------------------------ the cache

@dataclass
class _Entry:
    """One checkpoint as a process keeps it: content digest, step record, matrices and spectra (once computed)."""

    sha256: str
    metadata_step: tuple[int, str] | None
    summary: dict
    infos: list[MatrixInfo]
    workspace: Workspace  # its spectra: computed here, read from the disk cache, or adopted from a Ray map
    rows: dict[Settings, list[MatrixReport]] = field(default_factory=dict)  # analysis rows per settings seen


_CACHE: OrderedDict[tuple, _Entry] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def _cached(stamp: tuple) -> _Entry | None:
    with _CACHE_LOCK:
        entry = _CACHE.get(stamp)
        if entry is not None:
            _CACHE.move_to_end(stamp)
        return entry


def _remember(stamp: tuple, entry: _Entry) -> None:
    if stamp[1] is None:  # the file could not be stat'ed: nothing to key it by
        return
    with _CACHE_LOCK:
        _CACHE[stamp] = entry
        while len(_CACHE) > CACHED_CHECKPOINTS:
            _CACHE.popitem(last=False)


def clear_cache() -> None:
    """Forget every kept spectrum (tests and benchmarks measure cold runs with it)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _open(path: Path, label: str, root: Path | None = None) -> tuple[tuple, _Entry, Checkpoint | None]:
    """(stamp, entry, checkpoint if it was opened now): from the cache when the files are unchanged. With a server
    `root`, the checkpoint is opened through `open_in_folder`, so every file it reads must resolve inside it."""
    stamp = file_stamp(str(path))
    entry = _cached(stamp)
    if entry is not None:
        return stamp, entry, None
    try:
        if root is not None:
            checkpoint = open_in_folder(root, path.relative_to(root).as_posix())
        else:
            checkpoint = load_checkpoint(path)
    except CheckpointError as e:  # name it as the run's folder names it
        raise CheckpointError(label, e.problem) from None
    ws = Workspace(checkpoint)
    entry = _Entry(checkpoint.sha256, step_from_metadata(checkpoint), ws.checkpoint_summary(), list(ws.matrices), ws)
    return stamp, entry, checkpoint


def run_folders(root) -> list[str]:
    """Subfolders of a server folder that look like a training run (two or more checkpoints with a step), as
    relative paths, for the dashboard to offer; anything resolving outside `root` is left out."""
    base = Path(str(root))
    try:
        base = base.resolve(strict=True)
        children = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []
    found = []
    for child in children:
        try:
            if base not in child.resolve(strict=True).parents:
                continue
            entries, hf = _entries(child)
        except OSError:
            continue
        if hf or sum(step_from_name(p.name) is not None for p in entries) >= 2:
            found.append(child.name)
    return found


def find_checkpoints(folder, *, root=None) -> tuple[list[TrajectoryPoint], list[str]]:
    """The run's checkpoints sorted by step, and notes on what was left out (unreadable entries among them).
    `CheckpointError` when the folder is missing or holds no readable checkpoint with a step. With a server `root`,
    `folder` is relative to it and every file opened must resolve inside it."""
    points, notes = _discover(folder, root)
    return [p for p, _, _ in points], notes


def _discover(folder, root=None) -> tuple[list[tuple[TrajectoryPoint, tuple, _Entry]], list[str]]:
    """`find_checkpoints` with each point's cache key and entry."""
    label = str(folder)
    base = Path(str(root)).resolve() if root is not None else None
    run = base.joinpath(*Path(label).parts) if base is not None else Path(label)
    if base is not None and (Path(label).is_absolute() or ".." in Path(label).parts
                             or not run.resolve().is_relative_to(base)):
        raise CheckpointError(label, "not a folder inside the server's checkpoint folder")
    if not run.is_dir():
        raise CheckpointError(label, "no such folder" if not run.exists() else "not a folder of checkpoints")
    entries, hf = _entries(run)
    points, notes = [], []
    problems: list[CheckpointError] = []
    for path in entries:
        name = path.name
        try:
            stamp, entry, _ = _open(path, f"{label.rstrip('/')}/{name}", base)
        except CheckpointError as e:  # one bad file does not lose the run; a run of bad files says why
            problems.append(e)
            notes.append(f"{name}: left out: {e.problem}")
            continue
        if hf:
            step, source = int(_HF_CHECKPOINT.match(name).group(1)), "folder name"
        elif entry.metadata_step is not None:
            step, source = entry.metadata_step
        elif (number := step_from_name(name)) is not None:
            step, source = number, "file name" if path.is_file() else "folder name"
        else:
            notes.append(f"{name}: no step (no iter_num or step in the file, no number in its name); left out")
            continue
        _remember(stamp, entry)
        points.append((TrajectoryPoint(name + ("/" if path.is_dir() else ""), step, source), stamp, entry))
    if not points and problems:
        raise problems[0]
    if not points:
        raise CheckpointError(label, "no checkpoints with a step: expected checkpoint-N folders, files with iter_num "
                                     "or step metadata, or numbered weight files")
    points.sort(key=lambda item: (item[0].step, item[0].path))
    steps = [p.step for p, _, _ in points]
    if len(set(steps)) < len(steps):
        twice = sorted({s for s in steps if steps.count(s) > 1})
        notes.append(f"step {twice[0]} appears more than once; those checkpoints are plotted at the same step")
    return points, notes


# --------------------------------------------------------------------------------------------------- the map

def _rows(entry: _Entry, settings: Settings) -> list[MatrixReport]:
    """The analysis rows of one checkpoint at these settings, kept per settings (the workspace computes what a null
    other than MP needs from the weights)."""
    if settings not in entry.rows:
        entry.rows[settings] = entry.workspace.analyze(settings).matrices
        while len(entry.rows) > 16:
            entry.rows.pop(next(iter(entry.rows)))
    return entry.rows[settings]


def _local_spectra(points, progress: Progress | None) -> None:
    """Spectra of each checkpoint in its workspace (which reads and writes the disk cache itself)."""
    total = sum(len(entry.infos) for _, _, entry in points)
    done = 0
    for point, _, entry in points:
        def within(i: int, n: int, label: str, base=done, step=point.step) -> None:
            if progress and label:
                progress(base + i, total, f"step {step}: {label}")
        entry.workspace.spectra(within)
        done += len(entry.infos)
    if progress and total:
        progress(total, total, "")


def _ray_spectra(points, address: str, progress: Progress | None) -> str:
    """Spectra of every checkpoint not yet computed (nor in the disk cache), as one Ray map over checkpoint × matrix,
    adopted by each workspace (so they land in the same caches as a local run's); returns where the work ran."""
    todo = [entry for _, _, entry in points if entry.workspace.pending()]
    with RayMap(address) as ray_map:
        where = ray_map.describe()
        todo = [entry for entry in todo if entry.workspace.spectra_from_disk()]
        if todo:
            found = ray_map.spectra_many([Job(e.workspace.checkpoint, tuple(e.workspace.pending())) for e in todo],
                                         progress)
            for entry, results in zip(todo, found):
                entry.workspace.adopt(results)
    return where


def trajectory(folder, settings: Settings = Settings(), *, ray: str | None = None, root=None,
               progress: Progress | None = None) -> Trajectory:
    """Every metric of every matrix against step for the run in `folder` (see the module docstring).

    `ray`: a Ray address ("local" for a throwaway cluster on this machine): the spectra are mapped there
    (spectral.distributed.RayMap); otherwise the local workspace computes them. `root`: `folder` is a run inside
    this server folder, and nothing outside it is read. `CheckpointError` for an unreadable run,
    `spectral.distributed.DistributedError` when the cluster cannot be used."""
    start = time.perf_counter()
    points, notes = _discover(folder, root)
    where = "local"
    if ray is not None:  # the MP spectra on the cluster; what another null needs is computed here from the weights
        where = _ray_spectra(points, ray, progress)
    else:
        _local_spectra(points, progress)
    series: dict[str, MatrixSeries] = {}
    alias: dict[str, str] = {}
    for point, _, entry in points:
        infos = {info.name: info for info in entry.infos}
        for row in _rows(entry, settings):
            info = infos[row.name]
            keys = [normalised(n) for n in (info.name, *info.tied_with)]
            key = next((alias[k] for k in keys if k in alias), keys[0])
            for k in keys:
                alias.setdefault(k, key)
            if key not in series:
                series[key] = MatrixSeries(row.name, row.role, row.rank)
            series[key].add(point.step, row)
        skipped = {s["name"]: s["reason"] for s in entry.workspace.skipped}
        notes += [f"{point.path}: {name}: {reason}" for name, reason in skipped.items()]
    return Trajectory(str(folder), settings, [p for p, _, _ in points], list(series.values()), notes,
                      time.perf_counter() - start, where)


def summary_rows(result: Trajectory) -> list[dict]:
    """Per role and step: signal and energy rank as counts and % of the full rank (the CLI's table)."""
    rows = []
    for role in result.by_role():
        for i, step in enumerate(role.step):
            rows.append({"role": role.role, "step": step, "matrices": role.matrices, "n_signal": role.n_signal[i],
                         "energy_rank": role.energy_rank[i], "full_rank": role.full_rank[i],
                         "signal_pct": role.signal_pct[i], "energy_pct": role.energy_pct[i]})
    return rows
